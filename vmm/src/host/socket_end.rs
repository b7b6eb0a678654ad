//! A `-chardev socket` (or `null`) as the host end of a device's byte
//! stream (a virtio-serial port): QEMU's client (`path=`, connected at
//! start; `reconnect=` tries again while it is gone) and server
//! (`server=on`: one client at a time, the next accepted when it leaves;
//! `wait=on` holds the VM until the first connects).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use devices::virtio::console::PortHost;
use vmm_sys_util::timerfd::TimerFd;

/// Binds a Unix socket at `path`: a stale socket file (nobody answers) is
/// replaced as QEMU replaces it; one a live process answers on is not
/// taken from it, nor is a file that is not a socket. Returns the
/// (device, inode) of the socket file, so only that file is removed at
/// exit.
pub(crate) fn bind_unix(path: &Path) -> io::Result<(UnixListener, (u64, u64))> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use: another process answers on it", path.display()),
                ))
            }
            // Refused: nobody listens; the file is a leftover.
            Err(_) => std::fs::remove_file(path)?,
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    let m = std::fs::symlink_metadata(path)?;
    Ok((listener, (m.dev(), m.ino())))
}

/// Removes the socket file at `path` if it still is the one skiff bound.
pub(crate) fn remove_own_socket(path: &Path, id: (u64, u64)) {
    use std::os::unix::fs::MetadataExt;
    let ours = std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == id);
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

enum Mode {
    /// Connects to `path`; with `reconnect`, again this often while gone.
    Client { path: PathBuf, reconnect: Option<(Duration, TimerFd)> },
    /// Accepts one client at a time.
    Server { listener: UnixListener, path: PathBuf, id: (u64, u64) },
    /// `-chardev null`: takes everything, sends nothing.
    Null,
}

/// A chardev as a port's host end. The connection is kept as a `File`, so
/// its reads and writes are read(2) and write(2), which every worker may
/// call (a socket's `recv` is not).
pub struct SocketEnd {
    mode: Mode,
    stream: Option<File>,
    /// Ended connections, open until the worker stopped watching them.
    retired: Vec<File>,
    generation: u64,
}

impl SocketEnd {
    fn new(mode: Mode, stream: Option<UnixStream>) -> io::Result<Self> {
        let stream = stream.map(as_file).transpose()?;
        Ok(SocketEnd { mode, stream, retired: Vec::new(), generation: 0 })
    }

    pub fn null() -> Self {
        SocketEnd { mode: Mode::Null, stream: None, retired: Vec::new(), generation: 0 }
    }

    /// A client of `path`: connected now (QEMU fails at start when it
    /// cannot connect), unless `reconnect` is set, which tries again later.
    pub fn client(path: &Path, reconnect: Option<Duration>) -> io::Result<Self> {
        let stream = match (UnixStream::connect(path), reconnect) {
            (Ok(s), _) => Some(s),
            (Err(e), None) => return Err(e),
            (Err(_), Some(_)) => None,
        };
        let reconnect = match reconnect {
            Some(every) => {
                let mut timer = TimerFd::new()?;
                if stream.is_none() {
                    timer.reset(every, Some(every))?;
                }
                Some((every, timer))
            }
            None => None,
        };
        SocketEnd::new(Mode::Client { path: path.to_owned(), reconnect }, stream)
    }

    /// A server on `path`; with `wait`, returns once the first client is
    /// connected (or fails with `Interrupted` on a termination signal).
    pub fn server(path: &Path, wait: bool) -> io::Result<Self> {
        let (listener, id) = bind_unix(path)?;
        listener.set_nonblocking(true)?;
        let mut end = SocketEnd::new(Mode::Server { listener, path: path.to_owned(), id }, None)?;
        if wait {
            let Mode::Server { listener, .. } = &end.mode else { unreachable!() };
            match super::chardevs::wait_for_client(listener)? {
                Ok(s) => end.stream = Some(as_file(s)?),
                Err(signal) => {
                    return Err(io::Error::new(
                        io::ErrorKind::Interrupted,
                        format!("terminated by signal {signal} while waiting for a client"),
                    ))
                }
            }
        }
        Ok(end)
    }
}

/// A connected socket, non-blocking, as a file.
fn as_file(s: UnixStream) -> io::Result<File> {
    s.set_nonblocking(true)?;
    Ok(File::from(std::os::fd::OwnedFd::from(s)))
}

impl Drop for SocketEnd {
    fn drop(&mut self) {
        if let Mode::Server { path, id, .. } = &self.mode {
            remove_own_socket(path, *id);
        }
    }
}

impl PortHost for SocketEnd {
    fn watch(&self) -> Option<RawFd> {
        if let Some(s) = &self.stream {
            return Some(s.as_raw_fd());
        }
        match &self.mode {
            Mode::Client { reconnect: Some((_, timer)), .. } => Some(timer.as_raw_fd()),
            Mode::Server { listener, .. } => Some(listener.as_raw_fd()),
            Mode::Client { reconnect: None, .. } | Mode::Null => None,
        }
    }

    fn poll(&mut self) {
        if self.stream.is_some() {
            return;
        }
        let got = match &mut self.mode {
            Mode::Client { path, reconnect: Some((_, timer)) } => {
                // Consume the tick (the timer is readable: this does not block).
                let _ = timer.wait();
                match UnixStream::connect(&*path) {
                    Ok(s) => {
                        let _ = timer.clear();
                        Some(s)
                    }
                    Err(_) => None,
                }
            }
            Mode::Server { listener, .. } => match listener.accept() {
                Ok((s, _)) => Some(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) => {
                    devices::warn_limited!("chardev: accept failed: {e}");
                    None
                }
            },
            Mode::Client { reconnect: None, .. } | Mode::Null => None,
        };
        if let Some(s) = got.and_then(|s| as_file(s).ok()) {
            self.stream = Some(s);
            self.generation += 1;
        }
    }

    fn connected(&self) -> bool {
        self.stream.is_some() || matches!(self.mode, Mode::Null)
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.stream {
            Some(s) => s.read(buf),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.stream {
            Some(s) => s.write(buf),
            // Null takes everything.
            None => Ok(buf.len()),
        }
    }

    fn disconnect(&mut self) {
        let Some(s) = self.stream.take() else { return };
        self.retired.push(s);
        self.generation += 1;
        if let Mode::Client { reconnect: Some((every, timer)), .. } = &mut self.mode {
            if let Err(e) = timer.reset(*every, Some(*every)) {
                devices::warn_limited!("chardev: cannot arm the reconnect timer: {e}");
            }
        }
    }

    fn reap(&mut self) {
        self.retired.clear();
    }

    fn generation(&self) -> u64 {
        self.generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("skiff-socket-end-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The NixOS driver's form: it listens, skiff connects at start.
    #[test]
    fn client_connects_at_start_and_fails_without_a_listener() {
        let d = dir("client");
        let path = d.join("shell");
        assert!(SocketEnd::client(&path, None).is_err(), "nobody listens");
        let listener = UnixListener::bind(&path).unwrap();
        let mut end = SocketEnd::client(&path, None).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        assert!(end.connected());
        assert_eq!(end.write(b"hi").unwrap(), 2);
        let mut got = [0u8; 2];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        drop(peer);
        assert_eq!(end.read(&mut got).unwrap(), 0, "the end of the connection");
        end.disconnect();
        assert!(!end.connected() && end.watch().is_none(), "no reconnect= : gone for good");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// `reconnect=`: a client started before its peer connects once the
    /// peer is there, and again after it left.
    #[test]
    fn client_reconnects() {
        let d = dir("reconnect");
        let path = d.join("s");
        let mut end = SocketEnd::client(&path, Some(Duration::from_millis(10))).unwrap();
        assert!(!end.connected());
        let listener = UnixListener::bind(&path).unwrap();
        for round in 0..2 {
            let g = end.generation();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !end.connected() && std::time::Instant::now() < deadline {
                end.poll();
            }
            assert!(end.connected(), "round {round}");
            assert_ne!(end.generation(), g);
            let (peer, _) = listener.accept().unwrap();
            drop(peer);
            end.disconnect();
            assert!(end.watch().is_some(), "the timer");
            end.reap();
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A server takes one client, and the next once it left; its socket
    /// file goes with it.
    #[test]
    fn server_accepts_one_client_at_a_time() {
        let d = dir("server");
        let path = d.join("s");
        let mut end = SocketEnd::server(&path, false).unwrap();
        assert!(!end.connected());
        let _c1 = UnixStream::connect(&path).unwrap();
        end.poll();
        assert!(end.connected());
        end.disconnect();
        end.reap();
        let _c2 = UnixStream::connect(&path).unwrap();
        end.poll();
        assert!(end.connected());
        drop(end);
        assert!(!path.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
