//! QMP sockets. A `QmpServer` lives as long as the process (across guest
//! resets): its listening socket, the connected client and that client's
//! session. One client at a time, as a QEMU monitor: later connections wait
//! in the listen backlog and get their greeting when the first one leaves.
//! Per VM run, a `QmpHandler` subscriber connects it to the run's devices.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::legacy::{EventFdTrigger, Ged, GED_EVT_POWER_BUTTON, I8042};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde_json::Value;

use super::keys;
use super::protocol::{self, Request, Session};
use crate::config::{QmpAddress, QmpConfig};
use crate::vm::control::Control;

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

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
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

struct Client {
    stream: Stream,
    session: Session,
    inbuf: Vec<u8>,
}

/// A slow client must not stall the event loop for long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct QmpServer {
    listener: Listener,
    client: Option<Client>,
}

impl QmpServer {
    /// Binds the socket (replacing a stale Unix socket file, as QEMU does).
    pub fn bind(cfg: &QmpConfig) -> std::io::Result<Self> {
        let listener = match &cfg.address {
            QmpAddress::Unix(path) => {
                let _ = std::fs::remove_file(path);
                Listener::Unix(UnixListener::bind(path)?, path.clone())
            }
            QmpAddress::Tcp { host, port } => {
                Listener::Tcp(TcpListener::bind((host.as_str(), *port))?)
            }
        };
        let mut server = QmpServer { listener, client: None };
        if cfg.wait {
            // QEMU's wait=on: the VM starts once a client is connected.
            server.wait_for_client()?;
        }
        Ok(server)
    }

    /// Blocks until a client connects, but gives up on a termination signal
    /// (std's accept would retry on EINTR and ignore it).
    fn wait_for_client(&mut self) -> std::io::Result<()> {
        self.set_listener_nonblocking(true)?;
        let result = loop {
            match self.accept() {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Some(sig) = crate::host::signals::last_signal() {
                        break Err(std::io::Error::other(format!(
                            "terminated by signal {sig} while waiting for a client"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other,
            }
        };
        self.set_listener_nonblocking(false)?;
        result
    }

    fn set_listener_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match &self.listener {
            Listener::Unix(l, _) => l.set_nonblocking(on),
            Listener::Tcp(l) => l.set_nonblocking(on),
        }
    }

    fn listener_fd(&self) -> RawFd {
        match &self.listener {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    fn accept(&mut self) -> std::io::Result<()> {
        let stream = match &self.listener {
            Listener::Unix(l, _) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))?;
                Stream::Unix(s)
            }
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        };
        let mut client = Client { stream, session: Session::default(), inbuf: Vec::new() };
        if send(&mut client, &protocol::greeting()) {
            self.client = Some(client);
        }
        Ok(())
    }

    /// Sends an event to the connected client, if any.
    pub fn emit(&mut self, name: &str, data: Option<Value>) {
        let ev = protocol::event(name, data);
        if let Some(c) = self.client.as_mut() {
            if !send(c, &ev) {
                self.client = None;
            }
        }
    }
}

/// Closing the socket removes its file, so a connect after exit fails (and
/// on every path out, not only the orderly one).
impl Drop for QmpServer {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = &self.listener {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Writes one JSON line; false when the client is gone.
fn send(client: &mut Client, value: &Value) -> bool {
    let mut line = value.to_string();
    line.push_str("\r\n");
    client.stream.io().write_all(line.as_bytes()).is_ok()
}

/// The run's devices that QMP commands act on.
pub struct VmHandles {
    pub control: Arc<Control>,
    pub ged: Option<Arc<Mutex<Ged<EventFdTrigger>>>>,
    pub i8042: Option<Arc<Mutex<I8042<EventFdTrigger>>>>,
}

pub struct QmpHandler {
    server: Arc<Mutex<QmpServer>>,
    vm: VmHandles,
}

impl QmpHandler {
    pub fn new(server: Arc<Mutex<QmpServer>>, vm: VmHandles) -> Self {
        QmpHandler { server, vm }
    }

    fn carry_out(&self, server: &mut QmpServer, request: Request) {
        match request {
            Request::Powerdown => {
                server.emit("POWERDOWN", None);
                match &self.vm.ged {
                    Some(ged) => {
                        let res = lock(ged).notify(GED_EVT_POWER_BUTTON);
                        if let Err(e) = res {
                            log::warn!("qmp: cannot raise the GED interrupt: {e}");
                        }
                    }
                    // As QEMU without ACPI: the request is accepted, nothing hears it.
                    None => log::warn!("qmp: system_powerdown without ACPI has no effect"),
                }
            }
            Request::Reset => self.vm.control.host_reset(),
            Request::Quit => self.vm.control.quit(),
            Request::Keys(events) => match &self.vm.i8042 {
                Some(kbd) => {
                    let mut kbd = lock(kbd);
                    for ev in events {
                        let translated = kbd.translating();
                        if let Some(bytes) = keys::scancode(&ev.qcode, ev.down, translated) {
                            kbd.push_keyboard_bytes(&bytes);
                        }
                    }
                }
                None => log::warn!("qmp: input-send-event without -device i8042 has no effect"),
            },
        }
    }

    /// Reads what the client sent and answers every complete JSON value.
    fn read_client(&self, server: &mut QmpServer) -> bool {
        let Some(client) = server.client.as_mut() else { return false };
        let mut buf = [0u8; 4096];
        let n = match client.stream.io().read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        client.inbuf.extend_from_slice(&buf[..n]);
        // A client that never ends its JSON must not grow memory unbounded.
        if client.inbuf.len() > 1 << 20 {
            return false;
        }
        let mut requests = Vec::new();
        loop {
            let client = server.client.as_mut().expect("checked above");
            let mut stream =
                serde_json::Deserializer::from_slice(&client.inbuf).into_iter::<Value>();
            let parsed = stream.next();
            let consumed = stream.byte_offset();
            let input = match parsed {
                None => {
                    client.inbuf.clear();
                    break;
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Ok(v)) => {
                    client.inbuf.drain(..consumed);
                    Ok(v)
                }
                Some(Err(e)) => {
                    // Skip the rest of the bad line, as QEMU's parser resyncs.
                    let buf = &client.inbuf;
                    let start =
                        buf.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(buf.len());
                    let end = buf[start..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(buf.len(), |p| start + p + 1);
                    client.inbuf.drain(..end);
                    Err(e.to_string())
                }
            };
            let running = self.vm.control.outcome().is_none();
            let reply = client.session.handle(input, running);
            // An answered command runs even if the client is already gone.
            requests.extend(reply.request);
            if !send(client, &reply.response) {
                server.client = None;
                break;
            }
        }
        for r in requests {
            self.carry_out(server, r);
        }
        // carry_out's events may also have found the client gone.
        server.client.is_some()
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MutEventSubscriber for QmpHandler {
    fn init(&mut self, ops: &mut EventOps) {
        let server = lock(&self.server);
        let fd = match &server.client {
            Some(c) => c.stream.fd(),
            None => server.listener_fd(),
        };
        if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
            log::warn!("qmp: cannot watch the socket: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let server = self.server.clone();
        let mut server = lock(&server);
        let listener = server.listener_fd();
        if events.fd() == listener {
            if let Err(e) = server.accept() {
                log::warn!("qmp: accept failed: {e}");
                // EMFILE and the like leave the listener readable: back off
                // instead of spinning on it.
                std::thread::sleep(Duration::from_millis(100));
                return;
            }
            if let Some(c) = &server.client {
                // One client at a time: watch it instead of the listener.
                let _ = ops.remove(Events::new_raw(listener, EventSet::IN));
                let _ = ops.add(Events::new_raw(c.stream.fd(), EventSet::IN));
            }
        } else if !self.read_client(&mut server) {
            // Gone (EOF, error, or a failed write): listen for the next one.
            let _ = ops.remove(Events::new_raw(events.fd(), EventSet::IN));
            server.client = None;
            let _ = ops.add(Events::new_raw(listener, EventSet::IN));
        }
    }
}
