//! `-chardev`s that neither the serial port nor a device takes. QEMU opens
//! every chardev whether or not anything uses it, so a path that cannot be
//! created fails at startup and `server=on,wait=on` holds the VM until a
//! client connects; skiff does the same. Nothing writes to such a chardev and
//! what arrives on it is never read. Each is held for the process's life.

use std::fs::File;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::config::{ChardevBackend, VmConfig};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("-chardev file,id={id}: cannot open '{path}': {source}")]
    File {
        id: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("-chardev socket,id={id}: cannot connect to '{path}': {source}")]
    Connect {
        id: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("-chardev socket,id={id}: cannot listen on '{path}': {source}")]
    Listen {
        id: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// SIGTERM, SIGINT or SIGHUP while waiting (`wait=on`): the caller ends
    /// as a signal ends a run, with status 0.
    #[error("-chardev socket,id={id}: terminated by signal {signal} while waiting for a client")]
    Interrupted { id: String, signal: i32 },
}

/// A chardev's host side, kept open (only for being open).
#[allow(dead_code)]
enum Held {
    File(File),
    Stream(UnixStream),
    Server(Server),
}

/// A listening socket; its file goes with it, as QEMU removes it.
struct Server {
    listener: UnixListener,
    path: PathBuf,
    _client: Option<UnixStream>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Default)]
pub struct Chardevs {
    _held: Vec<Held>,
}

/// The chardevs something else opens: the serial port's, and those of
/// devices (`kinds`), which the command line resolved.
fn taken(cfg: &VmConfig) -> Vec<&str> {
    cfg.taken_chardevs.iter().map(String::as_str).collect()
}

/// Opens every chardev nothing else takes; `wait=on` servers block here
/// (giving up on a termination signal) until their client connects.
pub fn open_unused(cfg: &VmConfig) -> Result<Chardevs, Error> {
    let taken = taken(cfg);
    let mut held = Vec::new();
    for c in cfg.chardevs.iter().filter(|c| !taken.contains(&c.id.as_str())) {
        let id = || c.id.clone();
        let shown = |p: &Path| p.display().to_string();
        match &c.backend {
            ChardevBackend::Stdio { .. } | ChardevBackend::Null => {}
            ChardevBackend::File { path, append } => {
                let file = super::console::open_output(path, *append)
                    .map_err(|source| Error::File { id: id(), path: shown(path), source })?;
                held.push(Held::File(file));
            }
            ChardevBackend::Socket { path, server: false, .. } => {
                let stream = UnixStream::connect(path).map_err(|source| Error::Connect {
                    id: id(),
                    path: shown(path),
                    source,
                })?;
                held.push(Held::Stream(stream));
            }
            ChardevBackend::Socket { path, server: true, wait, .. } => {
                // A stale socket file from an earlier run is replaced.
                let _ = std::fs::remove_file(path);
                let listener = UnixListener::bind(path).map_err(|source| Error::Listen {
                    id: id(),
                    path: shown(path),
                    source,
                })?;
                // From here on the socket file goes with `server`.
                let mut server = Server { listener, path: path.clone(), _client: None };
                if *wait {
                    eprintln!(
                        "skiff: -chardev {}: waiting for a connection on unix:{},server=on",
                        c.id,
                        path.display()
                    );
                    let client = wait_for_client(&server.listener)
                        .map_err(|source| Error::Listen { id: id(), path: shown(path), source })?
                        .map_err(|signal| Error::Interrupted { id: id(), signal })?;
                    server._client = Some(client);
                }
                held.push(Held::Server(server));
            }
        }
    }
    Ok(Chardevs { _held: held })
}

/// The next client, once one connects; Err(signal) on a termination signal.
pub(crate) fn wait_for_client(listener: &UnixListener) -> std::io::Result<Result<UnixStream, i32>> {
    listener.set_nonblocking(true)?;
    super::signals::poll_until_signal(|| match listener.accept() {
        Ok((stream, _)) => Ok(Some(stream)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ChardevConfig;

    fn cfg(backends: Vec<(&str, ChardevBackend)>) -> VmConfig {
        let chardevs = backends
            .into_iter()
            .map(|(id, backend)| ChardevConfig { id: id.to_owned(), backend })
            .collect();
        VmConfig { chardevs, ..VmConfig::default() }
    }

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "skiff-chardev-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn an_unused_file_is_created_and_a_bad_path_names_it() {
        let d = dir();
        let log = d.join("log");
        let c = cfg(vec![("f", ChardevBackend::File { path: log.clone(), append: false })]);
        let held = open_unused(&c).unwrap();
        assert!(log.exists());
        drop(held);
        let bad = d.join("missing/log");
        let c = cfg(vec![("f", ChardevBackend::File { path: bad.clone(), append: false })]);
        let e = open_unused(&c).err().unwrap().to_string();
        assert!(e.starts_with(&format!("-chardev file,id=f: cannot open '{}'", bad.display())));
    }

    #[test]
    fn the_serial_ports_chardev_is_left_to_the_console() {
        let bad = dir().join("missing/serial");
        let file = format!("file,id=s,path={}", bad.display());
        let c = crate::cli::tests_support::config(&["-chardev", &file, "-serial", "chardev:s"]);
        assert!(open_unused(&c.unwrap()).is_ok());
    }

    #[test]
    fn a_client_socket_connects_or_names_the_path() {
        let d = dir();
        let path = d.join("client.sock");
        let c = cfg(vec![(
            "c",
            ChardevBackend::Socket {
                path: path.clone(),
                server: false,
                wait: true,
                reconnect_ms: None,
            },
        )]);
        let e = open_unused(&c).err().unwrap().to_string();
        assert!(e.contains(&format!("cannot connect to '{}'", path.display())), "{e}");
        let listener = UnixListener::bind(&path).unwrap();
        let held = open_unused(&c).unwrap();
        assert!(listener.accept().is_ok());
        drop(held);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_server_waits_for_its_client_and_removes_its_socket() {
        let path = dir().join("server.sock");
        // A stale file from an earlier run is replaced.
        std::fs::write(&path, b"").unwrap();
        let c = cfg(vec![(
            "s",
            ChardevBackend::Socket {
                path: path.clone(),
                server: true,
                wait: true,
                reconnect_ms: None,
            },
        )]);
        let connector = {
            let path = path.clone();
            std::thread::spawn(move || loop {
                if let Ok(s) = UnixStream::connect(&path) {
                    return s;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            })
        };
        let held = open_unused(&c).unwrap();
        let _client = connector.join().unwrap();
        assert!(path.exists());
        drop(held);
        assert!(!path.exists(), "the socket file goes with the chardev");
    }
}
