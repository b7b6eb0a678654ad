//! QMP sockets. A `QmpServer` lives as long as the process (across guest
//! resets): its listening socket, the connected client and that client's
//! session. One client at a time, as a QEMU monitor: later connections wait
//! in the listen backlog and get their greeting when the first one leaves.
//! Per VM run, a `QmpHandler` subscriber connects it to the run's devices.
//!
//! The event loop never waits for a client: sockets are non-blocking, what
//! a client has not read yet waits in its own buffer (bounded: a client
//! that stops reading is dropped), and a client that left is taken out of
//! epoll before its socket is closed, on every path, so the next client
//! (which may get the same descriptor number) is watched again.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde_json::Value;

use super::protocol::{self, Request, Session};
use crate::config::{QmpAddress, QmpConfig};
use crate::ctl::{Answer, Command, Controls, CtlError};

enum Listener {
    /// The socket, its path, and the (device, inode) of the file bind
    /// made: what is removed at exit, and only if the path still is it.
    Unix(UnixListener, PathBuf, (u64, u64)),
    Tcp(TcpListener),
}

use crate::host::socket_end::{bind_unix, remove_own_socket};

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn io(&mut self) -> &mut dyn ReadWrite {
        match self {
            Stream::Unix(s) => s,
            Stream::Tcp(s) => s,
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }

    /// Ends the connection but keeps the descriptor: epoll reports a
    /// hang-up, and the handler takes it out before closing it.
    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

struct Client {
    stream: Stream,
    session: Session,
    inbuf: Vec<u8>,
    /// Where in `inbuf` a whole message may end.
    framer: protocol::Framer,
    /// Replies and events the client has not read yet.
    outbuf: Vec<u8>,
    /// What epoll watches on its socket (None: not yet registered).
    watching: Option<EventSet>,
    /// It left, failed, or fell too far behind: the handler takes it out
    /// of epoll, and only then closes it.
    gone: bool,
}

/// The most a client may leave unread (replies and events) before it is
/// dropped; a client that reads keeps far less.
const MAX_UNREAD: usize = 1 << 20;

impl Client {
    fn new(stream: Stream) -> Client {
        Client {
            stream,
            session: Session::default(),
            inbuf: Vec::new(),
            framer: protocol::Framer::default(),
            outbuf: Vec::new(),
            watching: None,
            gone: false,
        }
    }

    /// Queues one JSON line and writes what the socket takes now.
    fn send(&mut self, value: &Value) {
        if self.gone {
            return;
        }
        self.outbuf.extend_from_slice(value.to_string().as_bytes());
        self.outbuf.extend_from_slice(b"\r\n");
        if self.outbuf.len() > MAX_UNREAD {
            devices::warn_limited!(
                "qmp: a client left {} bytes unread: dropping it",
                self.outbuf.len()
            );
            self.leave();
            return;
        }
        self.flush();
    }

    /// Marks the client gone and ends its connection, which wakes the
    /// handler (a hang-up) even when this happens outside it (`emit`).
    fn leave(&mut self) {
        self.gone = true;
        self.stream.shutdown();
    }

    /// Writes what the socket takes without blocking.
    fn flush(&mut self) {
        while !self.outbuf.is_empty() && !self.gone {
            match self.stream.io().write(&self.outbuf) {
                Ok(0) => self.leave(),
                Ok(n) => drop(self.outbuf.drain(..n)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => self.leave(),
            }
        }
    }

    /// What epoll should watch: input always, room to write while
    /// something waits to be written.
    fn interest(&self) -> EventSet {
        if self.outbuf.is_empty() {
            EventSet::IN
        } else {
            EventSet::IN | EventSet::OUT
        }
    }
}

pub struct QmpServer {
    listener: Listener,
    client: Option<Client>,
}

impl QmpServer {
    /// Binds the socket (replacing a stale Unix socket file, as QEMU does;
    /// refusing one a live process answers on).
    pub fn bind(cfg: &QmpConfig) -> std::io::Result<Self> {
        let listener = match &cfg.address {
            QmpAddress::Unix(path) => {
                let (l, id) = bind_unix(path)?;
                Listener::Unix(l, path.clone(), id)
            }
            QmpAddress::Tcp { host, port } => {
                Listener::Tcp(TcpListener::bind((host.as_str(), *port))?)
            }
        };
        let mut server = QmpServer { listener, client: None };
        server.set_listener_nonblocking()?;
        if cfg.wait {
            // QEMU's wait=on: the VM starts once a client is connected.
            server.wait_for_client()?;
        }
        Ok(server)
    }

    /// Blocks until a client connects, but gives up on a termination signal.
    fn wait_for_client(&mut self) -> std::io::Result<()> {
        let waited = crate::host::signals::poll_until_signal(|| Ok(self.accept()?.then_some(())))?;
        waited.map_err(|sig| {
            // Interrupted: the caller ends as a signal ends a run.
            std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                format!("terminated by signal {sig} while waiting for a client"),
            )
        })
    }

    fn set_listener_nonblocking(&self) -> std::io::Result<()> {
        match &self.listener {
            Listener::Unix(l, ..) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
    }

    fn listener_fd(&self) -> RawFd {
        match &self.listener {
            Listener::Unix(l, ..) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    /// Takes the next connection, if one waits, and greets it; true when
    /// a client is connected now (one that left at once is not kept).
    fn accept(&mut self) -> std::io::Result<bool> {
        let accepted = match &self.listener {
            Listener::Unix(l, ..) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(true)?;
                Ok(Stream::Unix(s))
            }),
            Listener::Tcp(l) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(true)?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }),
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        };
        let mut client = Client::new(stream);
        client.send(&protocol::greeting());
        if !client.gone {
            self.client = Some(client);
        }
        Ok(self.client.is_some())
    }

    /// Sends an event to the connected client, if any. A client it finds
    /// gone stays until the handler has taken it out of epoll.
    pub fn emit(&mut self, name: &str, data: Option<Value>) {
        let ev = protocol::event(name, data);
        if let Some(c) = self.client.as_mut() {
            c.send(&ev);
        }
    }
}

/// Sends an event to every server's client (the machine's events and the
/// devices' alike).
pub fn emit_all(servers: &[Arc<Mutex<QmpServer>>], name: &str, data: Option<Value>) {
    for s in servers {
        lock(s).emit(name, data.clone());
    }
}

/// Closing the socket removes its file, so a connect after exit fails (and
/// on every path out, not only the orderly one) — if the file still is the
/// one skiff made: another process's socket at the path stays.
impl Drop for QmpServer {
    fn drop(&mut self) {
        if let Listener::Unix(_, path, id) = &self.listener {
            remove_own_socket(path, *id);
        }
    }
}

pub struct QmpHandler {
    server: Arc<Mutex<QmpServer>>,
    vm: Controls,
    /// While set, the listener is out of the loop after an accept failed
    /// (EMFILE leaves it readable): the timer puts it back.
    backoff: Option<vmm_sys_util::timerfd::TimerFd>,
}

/// How long the listener rests after an accept failed.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

impl QmpHandler {
    pub fn new(server: Arc<Mutex<QmpServer>>, vm: Controls) -> Self {
        QmpHandler { server, vm, backoff: None }
    }

    /// Takes the listener out of the loop and arms a timer to put it back,
    /// so a failing accept neither spins nor sleeps on the event loop
    /// (which serves the vCPUs' devices and every other client).
    fn back_off(&mut self, listener: std::os::fd::RawFd, ops: &mut EventOps) {
        use vmm_sys_util::timerfd::TimerFd;
        let timer = match TimerFd::new() {
            Ok(mut t) => t.reset(ACCEPT_BACKOFF, None).map(|()| t),
            Err(e) => Err(e),
        };
        let timer = match timer {
            Ok(t) => t,
            // No timer (out of descriptors too): the listener stays, and
            // the next turn tries again.
            Err(e) => return devices::warn_limited!("qmp: no back-off timer: {e}"),
        };
        if ops.add(Events::new(&timer, EventSet::IN)).is_err() {
            return;
        }
        if let Err(e) = ops.remove(Events::new_raw(listener, EventSet::IN)) {
            devices::warn_limited!("qmp: cannot pause the listener: {e:?}");
        }
        self.backoff = Some(timer);
    }

    /// The back-off is over: the listener comes back.
    fn resume(&mut self, listener: std::os::fd::RawFd, ops: &mut EventOps) {
        if let Some(timer) = self.backoff.take() {
            let _ = ops.remove(Events::new(&timer, EventSet::IN));
        }
        if let Err(e) = ops.add(Events::new_raw(listener, EventSet::IN)) {
            devices::error_limited!("qmp: cannot watch the socket: {e:?}");
        }
    }

    fn carry_out(&self, server: &mut QmpServer, request: Request) {
        let sent = match request {
            Request::Powerdown => {
                server.emit("POWERDOWN", None);
                self.vm.faces.send(&Command::PowerButton).map(drop)
            }
            Request::Reset => {
                self.vm.machine.reset();
                Ok(())
            }
            Request::Quit => {
                self.vm.machine.quit();
                Ok(())
            }
            Request::Keys(events) => self.vm.faces.send(&Command::Keys(events)).map(drop),
            // Answered when they came (`answer`).
            Request::Balloon(_) | Request::QueryBalloon | Request::SetLink { .. } => Ok(()),
        };
        match sent {
            Ok(()) => {}
            // As QEMU: the request is accepted; nothing hears it.
            Err(e @ CtlError::NoDevice(_)) => devices::warn_limited!("qmp: no effect: {e}"),
            Err(e) => devices::warn_limited!("qmp: {e}"),
        }
    }

    /// Carries out a request whose answer is the response.
    fn answer(&self, request: &Request) -> Result<Answer, CtlError> {
        match *request {
            Request::SetLink { ref name, up } => {
                self.vm.faces.send_to(name, &Command::SetLink { up })
            }
            Request::QueryBalloon => self.vm.faces.send(&Command::QueryBalloon),
            Request::Balloon(value) => {
                // QEMU's order: no balloon first, then a bad size.
                self.vm.faces.send(&Command::QueryBalloon)?;
                let value = u64::try_from(value)
                    .ok()
                    .filter(|&v| v > 0)
                    .ok_or_else(|| CtlError::Failed("Parameter 'target' expects a size".into()))?;
                self.vm.faces.send(&Command::BalloonTarget(value))
            }
            _ => Ok(Answer::Done),
        }
    }

    /// Reads what the client sent and answers every complete JSON value;
    /// marks the client gone when it left.
    fn read_client(&self, server: &mut QmpServer) {
        let Some(client) = server.client.as_mut() else { return };
        let mut buf = [0u8; 4096];
        let n = match client.stream.io().read(&mut buf) {
            Ok(0) => {
                client.gone = true;
                return;
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                return
            }
            Err(_) => {
                client.gone = true;
                return;
            }
        };
        client.inbuf.extend_from_slice(&buf[..n]);
        // A client that never ends its JSON must not grow memory unbounded.
        if client.inbuf.len() > 1 << 20 {
            client.gone = true;
            return;
        }
        let mut requests = Vec::new();
        loop {
            let client = server.client.as_mut().expect("checked above");
            let Some(input) = client.framer.take(&mut client.inbuf) else { break };
            let running = self.vm.machine.running();
            let mut reply = client.session.handle(input, running, &self.vm.device_ids);
            if let Some(r) = reply.request.take_if(|r| r.answered_by_machine()) {
                reply.response = reply.answer(self.answer(&r));
            }
            // An answered command runs even if the client is already gone.
            requests.extend(reply.request);
            client.send(&reply.response);
            if client.gone {
                break;
            }
        }
        for r in requests {
            self.carry_out(server, r);
        }
    }

    /// After the client's turn: a client that is gone leaves epoll first
    /// and is closed after (closing first would leave its number in the
    /// event manager's table, and the next client on that number unheard),
    /// and the listener is watched again; otherwise epoll watches what the
    /// client's buffer needs.
    fn settle(server: &mut QmpServer, ops: &mut EventOps) {
        let listener = server.listener_fd();
        let Some(c) = server.client.as_mut() else { return };
        if c.gone {
            if let Some(set) = c.watching {
                if let Err(e) = ops.remove(Events::new_raw(c.stream.fd(), set)) {
                    devices::warn_limited!("qmp: cannot stop watching a client: {e:?}");
                }
            }
            server.client = None;
            if let Err(e) = ops.add(Events::new_raw(listener, EventSet::IN)) {
                devices::error_limited!("qmp: cannot watch the socket for the next client: {e:?}");
            }
            return;
        }
        let want = c.interest();
        let fd = c.stream.fd();
        let res = match c.watching {
            Some(set) if set == want => Ok(()),
            Some(_) => ops.modify(Events::new_raw(fd, want)),
            None => ops.add(Events::new_raw(fd, want)),
        };
        match res {
            Ok(()) => c.watching = Some(want),
            Err(e) => devices::warn_limited!("qmp: cannot watch a client: {e:?}"),
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MutEventSubscriber for QmpHandler {
    /// A run's event loop is new: the client (kept across a guest reset)
    /// or the listener is registered afresh.
    fn init(&mut self, ops: &mut EventOps) {
        // A back-off timer belonged to the last run's loop.
        self.backoff = None;
        let mut server = lock(&self.server);
        if let Some(c) = server.client.as_mut() {
            c.watching = None;
            if !c.gone {
                c.flush();
            }
            if c.gone {
                server.client = None;
            }
        }
        if server.client.is_some() {
            Self::settle(&mut server, ops);
        } else if let Err(e) = ops.add(Events::new_raw(server.listener_fd(), EventSet::IN)) {
            devices::error_limited!("qmp: cannot watch the socket: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let server = self.server.clone();
        let mut server = lock(&server);
        let listener = server.listener_fd();
        if self.backoff.as_ref().is_some_and(|t| events.fd() == t.as_raw_fd()) {
            drop(server);
            return self.resume(listener, ops);
        }
        if events.fd() == listener {
            match server.accept() {
                // One client at a time: watch it instead of the listener.
                Ok(true) => {
                    if let Err(e) = ops.remove(Events::new_raw(listener, EventSet::IN)) {
                        devices::warn_limited!("qmp: cannot pause the listener: {e:?}");
                    }
                }
                Ok(false) => return,
                Err(e) => {
                    devices::warn_limited!("qmp: accept failed: {e}");
                    // EMFILE and the like leave the listener readable: back
                    // off instead of spinning on it.
                    drop(server);
                    return self.back_off(listener, ops);
                }
            }
        } else if let Some(c) = server.client.as_mut() {
            let set = events.event_set();
            if set.intersects(EventSet::OUT) {
                c.flush();
            }
            if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                self.read_client(&mut server);
            }
        }
        Self::settle(&mut server, ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past `MAX_UNREAD` a client that does not read is given up, and its
    /// connection ended at once (the peer sees the end), while its
    /// descriptor stays for the handler to take out of epoll.
    #[test]
    fn a_client_past_the_unread_bound_is_dropped_and_hung_up() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut c = Client::new(Stream::Unix(ours));
        let event = serde_json::json!({ "event": "X", "data": "y".repeat(1000) });
        let mut sent = 0;
        while !c.gone && sent < 10_000 {
            c.send(&event);
            sent += 1;
        }
        assert!(c.gone, "never dropped");
        assert!(c.outbuf.len() > MAX_UNREAD && sent > MAX_UNREAD / 1024, "{sent} sent");
        // SAFETY: fcntl(F_GETFD) on a descriptor this test owns.
        assert!(unsafe { libc::fcntl(c.stream.fd(), libc::F_GETFD) } >= 0, "still open");
        peer.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).expect("the end of the connection, not a timeout");
        assert!(!got.is_empty());
    }

    fn unix(path: &std::path::Path) -> QmpConfig {
        QmpConfig { address: QmpAddress::Unix(path.to_owned()), wait: false }
    }

    /// A second skiff on a live QMP path is refused and the first stays
    /// reachable; a stale socket file is replaced; a path that is not a
    /// socket is left alone; at exit only skiff's own socket is removed.
    #[test]
    fn a_live_qmp_socket_is_not_taken_over() {
        let dir = std::env::temp_dir().join(format!("skiff-qmp-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("q.sock");
        let first = QmpServer::bind(&unix(&path)).unwrap();
        let e = QmpServer::bind(&unix(&path)).err().expect("refused");
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
        assert!(UnixStream::connect(&path).is_ok(), "the first still answers");
        // Its socket replaced behind its back: its exit leaves the new one.
        std::fs::remove_file(&path).unwrap();
        let other = UnixListener::bind(&path).unwrap();
        drop(first);
        assert!(path.exists(), "another's socket stays");
        // A leftover (nobody listens): replaced.
        drop(other);
        let again = QmpServer::bind(&unix(&path)).unwrap();
        drop(again);
        assert!(!path.exists(), "removed at exit");
        std::fs::write(&path, b"not a socket").unwrap();
        let e = QmpServer::bind(&unix(&path)).err().expect("refused");
        assert!(e.to_string().contains("is not a socket"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
