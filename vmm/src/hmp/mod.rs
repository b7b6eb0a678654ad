//! QEMU's human monitor (HMP) on a Unix socket: `-monitor unix:PATH` (skiff
//! connects, as the NixOS test driver wants it) or `...,server=on`. The
//! banner and prompt are QEMU's (the driver waits for `(qemu) ` before
//! anything else); typed characters are echoed and a line ends with
//! `\r\n`, as QEMU's readline does. Commands go through the same typed
//! control as QMP's (`ctl`).
//!
//! A `Monitor` lives as long as the process (its connection outlives a
//! guest reboot); per run, an `HmpHandler` on the event loop serves it.

mod commands;

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::virtio::console::PortHost;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::timerfd::TimerFd;

use crate::config::MonitorConfig;
use crate::ctl::{Command, Controls, KeyEvent};
use crate::host::socket_end::SocketEnd;
use commands::Line;

const PROMPT: &str = "(qemu) ";

/// The most a peer may leave unread, or send without a newline.
const MAX_BUFFER: usize = 1 << 20;

pub struct Monitor {
    end: SocketEnd,
    /// The line being typed.
    line: Vec<u8>,
    out: Vec<u8>,
    /// The connection the banner was sent on.
    greeted: Option<u64>,
}

impl Monitor {
    /// Connects (a client: failing when nobody listens, as QEMU fails) or
    /// binds (a server; `wait=on` blocks until the first client).
    pub fn open(cfg: &MonitorConfig) -> io::Result<Self> {
        let end = if cfg.server {
            SocketEnd::server(&cfg.path, cfg.wait)?
        } else {
            SocketEnd::client(&cfg.path, cfg.reconnect_ms.map(Duration::from_millis))?
        };
        Ok(Monitor { end, line: Vec::new(), out: Vec::new(), greeted: None })
    }

    /// QEMU's banner and first prompt, once per connection.
    fn greet(&mut self) {
        if !self.end.connected() || self.greeted == Some(self.end.generation()) {
            return;
        }
        self.greeted = Some(self.end.generation());
        self.line.clear();
        self.out.clear();
        let (a, b, c) = crate::qmp::QEMU_VERSION;
        self.say(&format!("QEMU {a}.{b}.{c} monitor - type 'help' for more information\n"));
        self.out.extend_from_slice(PROMPT.as_bytes());
    }

    /// Queues text, each `\n` as `\r\n` (QEMU's monitor_puts).
    fn say(&mut self, text: &str) {
        for b in text.bytes() {
            if b == b'\n' {
                self.out.push(b'\r');
            }
            self.out.push(b);
        }
    }

    /// Reads what the peer typed: echoes it, and returns the lines it
    /// finished (what is left waits for the next read).
    fn read_lines(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.end.read(&mut buf) {
                Ok(0) => {
                    self.end.disconnect();
                    break;
                }
                Ok(n) => {
                    for &b in &buf[..n] {
                        self.typed(b, &mut lines);
                    }
                    if self.line.len() > MAX_BUFFER {
                        // A line that never ends: the peer is not a person.
                        self.end.disconnect();
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.end.disconnect();
                    break;
                }
            }
        }
        lines
    }

    /// One typed byte, as QEMU's readline takes it.
    fn typed(&mut self, b: u8, lines: &mut Vec<String>) {
        match b {
            b'\r' | b'\n' => {
                self.out.extend_from_slice(b"\r\n");
                lines.push(String::from_utf8_lossy(&std::mem::take(&mut self.line)).into_owned());
            }
            // Backspace and DEL take the last character back.
            8 | 127 if self.line.pop().is_some() => self.out.extend_from_slice(b"\x08 \x08"),
            32..=126 => {
                self.line.push(b);
                self.out.push(b);
            }
            // Escape sequences and other control bytes: ignored.
            _ => {}
        }
    }

    /// Writes what the peer takes now.
    fn flush(&mut self) {
        while !self.out.is_empty() && self.end.connected() {
            match self.end.write(&self.out) {
                Ok(0) => self.end.disconnect(),
                Ok(n) => drop(self.out.drain(..n)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => self.end.disconnect(),
            }
        }
        if !self.end.connected() {
            self.out.clear();
        } else if self.out.len() > MAX_BUFFER {
            // A peer that never reads is dropped.
            self.end.disconnect();
            self.out.clear();
        }
    }
}

pub struct HmpHandler {
    monitor: Arc<Mutex<Monitor>>,
    vm: Controls,
    /// What epoll watches now: (fd, events, connection).
    watching: Option<(RawFd, EventSet, u64)>,
    /// Keys `sendkey` still holds down, and when to let them go.
    release: Option<(TimerFd, Vec<KeyEvent>)>,
}

/// Event data: the monitor's socket, and the key-release timer.
const SOCKET: u32 = 0;
const RELEASE: u32 = 1;

impl HmpHandler {
    pub fn new(monitor: Arc<Mutex<Monitor>>, vm: Controls) -> Self {
        HmpHandler { monitor, vm, watching: None, release: None }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Monitor> {
        self.monitor.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Carries out one line and says what QEMU says.
    fn execute(&mut self, line: &str, ops: &mut EventOps) -> String {
        match commands::parse(line) {
            Line::Empty => String::new(),
            Line::Say(text) => text,
            Line::Status => {
                let state = if self.vm.machine.running() { "running" } else { "shutdown" };
                format!("VM status: {state}\n")
            }
            Line::Quit => {
                self.vm.machine.quit();
                String::new()
            }
            Line::Reset => {
                self.vm.machine.reset();
                String::new()
            }
            Line::Powerdown => match self.vm.faces.send(&Command::PowerButton) {
                Ok(_) => String::new(),
                Err(e) => format!("Error: {e}\n"),
            },
            Line::HostFwd { netdev, command } => {
                let sent = match &netdev {
                    Some(id) => self.vm.faces.send_to(id, &command),
                    None => self.vm.faces.send(&command),
                };
                match sent {
                    Ok(crate::ctl::Answer::Message(m)) => format!("{m}\n"),
                    Ok(_) => String::new(),
                    Err(e) => format!("{e}\n"),
                }
            }
            Line::SetLink { name, up } => {
                match self.vm.faces.send_to(&name, &Command::SetLink { up }) {
                    Ok(_) => String::new(),
                    Err(e) => format!("Error: {e}\n"),
                }
            }
            Line::SendKey { down, up, hold_ms } => {
                // Keys still held from the last sendkey go up first.
                self.release_now(ops);
                if let Err(e) = self.vm.faces.send(&Command::Keys(down)) {
                    return format!("Error: {e}\n");
                }
                self.hold(up, hold_ms, ops);
                String::new()
            }
        }
    }

    /// Lets the keys go after `hold_ms` (at once if no timer can be had).
    fn hold(&mut self, up: Vec<KeyEvent>, hold_ms: u64, ops: &mut EventOps) {
        let timer = TimerFd::new().and_then(|mut t| {
            t.reset(Duration::from_millis(hold_ms.max(1)), None)?;
            Ok(t)
        });
        match timer {
            Ok(t) if ops.add(Events::with_data(&t, RELEASE, EventSet::IN)).is_ok() => {
                self.release = Some((t, up));
            }
            _ => {
                let _ = self.vm.faces.send(&Command::Keys(up));
            }
        }
    }

    fn release_now(&mut self, ops: &mut EventOps) {
        if let Some((t, up)) = self.release.take() {
            let _ = ops.remove(Events::with_data(&t, RELEASE, EventSet::IN));
            if let Err(e) = self.vm.faces.send(&Command::Keys(up)) {
                devices::warn_limited!("hmp: sendkey release: {e}");
            }
        }
    }

    /// Watches what the monitor needs now; the old descriptor leaves epoll
    /// before an ended connection is closed.
    fn settle(&mut self, ops: &mut EventOps) {
        let monitor = self.monitor.clone();
        let mut m = monitor.lock().unwrap_or_else(|e| e.into_inner());
        let want = m.end.watch().map(|fd| {
            let set = if m.end.connected() && !m.out.is_empty() {
                EventSet::IN | EventSet::OUT
            } else {
                EventSet::IN
            };
            (fd, set, m.end.generation())
        });
        if want != self.watching {
            if let Some((fd, set, _)) = self.watching.take() {
                let _ = ops.remove(Events::with_data_raw(fd, SOCKET, set));
            }
        }
        m.end.reap();
        if want == self.watching {
            return;
        }
        if let Some((fd, set, g)) = want {
            match ops.add(Events::with_data_raw(fd, SOCKET, set)) {
                Ok(()) => self.watching = Some((fd, set, g)),
                Err(e) => devices::error_limited!("hmp: cannot watch the monitor: {e:?}"),
            }
        }
    }

    fn serve(&mut self, ops: &mut EventOps) {
        let lines = {
            let mut m = self.lock();
            if !m.end.connected() {
                m.end.poll();
            }
            m.greet();
            if m.end.connected() {
                m.read_lines()
            } else {
                Vec::new()
            }
        };
        for line in lines {
            let answer = self.execute(&line, ops);
            let mut m = self.lock();
            m.say(&answer);
            m.out.extend_from_slice(PROMPT.as_bytes());
        }
        self.lock().flush();
        self.settle(ops);
    }
}

impl MutEventSubscriber for HmpHandler {
    /// A run's event loop is new: the connection (kept across a reboot) is
    /// watched afresh.
    fn init(&mut self, ops: &mut EventOps) {
        self.watching = None;
        self.release = None;
        self.serve(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() == RELEASE {
            self.release_now(ops);
            return;
        }
        self.serve(ops);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    use super::*;

    /// The NixOS test driver's exchange: it listens, skiff connects and
    /// greets; a command is echoed, answered, and followed by the prompt.
    #[test]
    fn banner_echo_and_prompt_as_qemus() {
        let dir = std::env::temp_dir().join(format!("skiff-hmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("monitor");
        let listener = UnixListener::bind(&path).unwrap();
        let cfg =
            MonitorConfig { path: path.clone(), server: false, wait: true, reconnect_ms: None };
        let mut m = Monitor::open(&cfg).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        m.greet();
        m.flush();
        let mut got = vec![0u8; 256];
        let n = peer.read(&mut got).unwrap();
        let text = String::from_utf8_lossy(&got[..n]).into_owned();
        assert!(text.starts_with("QEMU 10.0.0 monitor - type 'help' for more information\r\n"));
        assert!(text.ends_with("(qemu) "), "{text:?}");
        peer.write_all(b"info stt\x7fatus\n").unwrap();
        let lines = loop {
            let l = m.read_lines();
            if !l.is_empty() {
                break l;
            }
        };
        assert_eq!(lines, ["info status"]);
        m.say("VM status: running\n");
        m.out.extend_from_slice(PROMPT.as_bytes());
        m.flush();
        let n = peer.read(&mut got).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&got[..n]),
            "info stt\x08 \x08atus\r\nVM status: running\r\n(qemu) "
        );
        drop(peer);
        assert!(m.read_lines().is_empty());
        assert!(!m.end.connected(), "the driver left");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
