//! virtio-serial, the console device (type 3) with multiport: QEMU's
//! `virtio-serial` bus and its ports (`virtconsole`: a console, `/dev/hvcN`
//! in the guest; `virtserialport`: a named port, `/dev/virtio-ports/NAME`).
//!
//! Queues: port 0's receive and transmit (0, 1), the control queues (2: to
//! the driver, 3: from it), then port N's pair at 2N+2 and 2N+3. One worker
//! serves them all and the ports' host ends ([`PortHost`]: a socket that
//! may come and go), each wakeup bounded.
//!
//! No byte is lost while a host end is connected: what the guest writes
//! is taken off its queue into one bounded buffer per port and the worker
//! takes no more from that queue until the host end took it all (Linux's
//! hvc spins until the device returns a console buffer, so the guest waits
//! rather than loses). QEMU drops console output the socket cannot take at
//! once. With no host end connected, guest output is dropped, as QEMU's
//! disconnected socket drops it. What the host end sends is read only
//! when the guest has the port open, one staging buffer at a time (QEMU
//! reads a chardev only when the guest is ready).

mod control;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod tests;

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::DescriptorChain;

use super::chain::{Chain, ChainReader};
use super::worker::{Budget, Handler, Outcome, Request, Ring, Worker};
use super::{
    read_config_from, ActivateError, ActivationContext, GuestMemoryMmap, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use control::{Control, Message};

/// The family its workers are known by.
pub const FAMILY: &str = "virtio-serial";

/// VIRTIO_CONSOLE_F_MULTIPORT: ports beyond 0, names, and the control
/// queues.
const F_MULTIPORT: u64 = 1 << 1;

/// Data queues take up to this many descriptors, the control queues
/// fewer (QEMU's sizes).
const DATA_QUEUE_SIZE: u16 = 128;
const CONTROL_QUEUE_SIZE: u16 = 32;

/// QEMU's `max_ports` default, and the most a bus may have (the queue
/// count, 2 * (ports + 1), stays within what the transports allow).
pub const DEFAULT_MAX_PORTS: u32 = 31;
pub const MAX_PORTS: u32 = 31;

/// Most bytes taken from one guest buffer chain (Linux writes at most
/// 32 KiB per buffer); the rest of a longer chain is dropped.
const MAX_TX_CHAIN: usize = 64 * 1024;

/// How much is read from a host end at once, to wait for the guest's
/// receive buffers.
const STAGING: usize = 4096;

/// Chains served per queue per wakeup.
const REQUESTS_PER_WAKEUP: usize = 32;

/// A port's host end: a non-blocking byte stream that may connect and
/// disconnect while the guest runs (a socket chardev). The worker watches
/// what [`PortHost::watch`] names and calls [`PortHost::poll`] when it
/// fires.
pub trait PortHost: Send {
    /// The descriptor to watch now: the connection, else whatever brings
    /// one (a listening socket, a reconnect timer); None: nothing.
    fn watch(&self) -> Option<RawFd>;
    /// The watched descriptor fired while not connected: accept, or
    /// reconnect. Does nothing when connected.
    fn poll(&mut self);
    fn connected(&self) -> bool;
    /// Bytes from the host end; Ok(0) means it hung up (`disconnect`
    /// follows), WouldBlock that nothing waits.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// The connection ended (hang-up, error): listen or reconnect as
    /// configured. The ended connection's descriptor stays open until
    /// [`PortHost::reap`], so the worker can take it out of epoll first
    /// (a closed descriptor leaves the event manager's table stale, and
    /// the next connection on its number unwatched).
    fn disconnect(&mut self);
    /// Closes connections that ended.
    fn reap(&mut self);
    /// Changes at every connection and disconnection: what was watched
    /// belongs to the old one.
    fn generation(&self) -> u64;
}

/// A port's host end, shared between runs (a reboot keeps the connection).
pub type SharedHost = Arc<Mutex<dyn PortHost>>;

fn lock(h: &SharedHost) -> MutexGuard<'_, dyn PortHost + 'static> {
    h.lock().unwrap_or_else(|e| e.into_inner())
}

/// One port on the bus, as configured.
#[derive(Clone)]
pub struct PortConfig {
    /// Its number on the bus (queue pair 0, or 2N+2 and 2N+3).
    pub nr: u32,
    /// A console port (`virtconsole`): the guest makes it an hvc.
    pub console: bool,
    /// `name=`: the guest's `/dev/virtio-ports/NAME`.
    pub name: Option<String>,
    pub host: SharedHost,
}

pub struct Console {
    max_ports: u32,
    ports: Vec<PortConfig>,
    acked: u64,
    worker: Option<Worker<Bus>>,
    queue_sizes: Vec<u16>,
}

impl Console {
    /// A bus of `max_ports` ports (QEMU's `max_ports`), with `ports` on it;
    /// port numbers below `max_ports`, each used once (the caller checks).
    pub fn new(max_ports: u32, ports: Vec<PortConfig>) -> Self {
        let max_ports = max_ports.clamp(1, MAX_PORTS);
        let mut queue_sizes = vec![DATA_QUEUE_SIZE; 2 * (max_ports as usize + 1)];
        queue_sizes[2] = CONTROL_QUEUE_SIZE;
        queue_sizes[3] = CONTROL_QUEUE_SIZE;
        Console { max_ports, ports, acked: 0, worker: None, queue_sizes }
    }

    fn config(&self) -> [u8; 12] {
        // cols, rows (no VIRTIO_CONSOLE_F_SIZE), max_nr_ports, emerg_wr.
        let mut c = [0u8; 12];
        c[4..8].copy_from_slice(&self.max_ports.to_le_bytes());
        c
    }
}

/// The data queues' indices of port `nr`: (receive, transmit).
fn port_queues(nr: u32) -> (usize, usize) {
    if nr == 0 {
        (0, 1)
    } else {
        let rx = 2 * nr as usize + 2;
        (rx, rx + 1)
    }
}

/// One port while the device runs.
struct Port {
    nr: u32,
    console: bool,
    name: Option<String>,
    host: SharedHost,
    rx: Option<Ring>,
    tx: Option<Ring>,
    /// The driver said the port is ready (PORT_READY): it hears PORT_OPEN.
    ready: bool,
    /// The guest has the port open (PORT_OPEN from the driver; always,
    /// without multiport).
    guest_open: bool,
    /// Whether the driver was last told the host end is connected.
    told_connected: bool,
    /// Guest output the host end has not taken yet.
    out: Vec<u8>,
    /// Host input waiting for the guest's receive buffers.
    staged: Vec<u8>,
    /// What the worker's epoll watches for this port now, and for which
    /// connection.
    watching: Option<Watch>,
}

/// A host descriptor in the worker's epoll set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Watch {
    fd: RawFd,
    set: EventSet,
    generation: u64,
}

/// The running bus, on the worker thread.
struct Bus {
    ports: Vec<Port>,
    control: Option<Control>,
}

/// Event data of a port's host descriptor: `HOST_BASE + index into ports`
/// (rings carry their own, above these).
const HOST_BASE: u32 = 0x1000;

impl Bus {
    /// Serves what can be served now, everywhere: control messages both
    /// ways, each port's output and input. Each part is bounded.
    fn serve_all(&mut self) {
        if let Some(c) = self.control.as_mut() {
            for m in c.receive() {
                self.on_message(m);
            }
        }
        for i in 0..self.ports.len() {
            self.serve_port(i);
        }
        if let Some(c) = self.control.as_mut() {
            c.send_pending();
        }
    }

    fn on_message(&mut self, m: Message) {
        let Some(c) = self.control.as_mut() else { return };
        match m {
            Message::DeviceReady { ok: true } => {
                for p in &self.ports {
                    c.queue(control::device_add(p.nr));
                }
            }
            Message::DeviceReady { ok: false } => {
                crate::warn_limited!("virtio-serial: the driver failed to set up the bus");
            }
            Message::PortReady { id, ok } => {
                let Some(p) = self.ports.iter_mut().find(|p| p.nr == id) else { return };
                if !ok {
                    crate::warn_limited!("virtio-serial: the driver failed to add port {id}");
                    return;
                }
                p.ready = true;
                if p.console {
                    c.queue(control::console_port(id));
                }
                if let Some(name) = &p.name {
                    c.queue(control::port_name(id, name));
                }
                let connected = lock(&p.host).connected();
                if connected {
                    c.queue(control::port_open(id, true));
                }
                p.told_connected = connected;
            }
            Message::PortOpen { id, open } => {
                if let Some(p) = self.ports.iter_mut().find(|p| p.nr == id) {
                    p.guest_open = open;
                }
            }
        }
    }

    /// Moves what can move on port `i` in both directions.
    fn serve_port(&mut self, i: usize) {
        let p = &mut self.ports[i];
        let mut host = lock(&p.host);
        let budget = Budget { requests: REQUESTS_PER_WAKEUP };
        // Output: what the guest wrote, as far as the host end takes it.
        flush_out(&mut *host, &mut p.out);
        if let Some(tx) = p.tx.as_mut() {
            tx.serve(budget, &mut TakeOutput { out: &mut p.out, host: &mut *host });
        }
        // Input: only to a guest that has the port open.
        if p.guest_open {
            if let Some(rx) = p.rx.as_mut() {
                rx.serve(budget, &mut GiveInput { staged: &mut p.staged, host: &mut *host });
            }
        }
        let connected = host.connected();
        drop(host);
        if p.ready && connected != p.told_connected {
            p.told_connected = connected;
            if let Some(c) = self.control.as_mut() {
                c.queue(control::port_open(p.nr, connected));
            }
        }
    }

    /// What epoll should watch for port `i`'s host end.
    fn interest(&self, i: usize) -> Option<Watch> {
        let p = &self.ports[i];
        let host = lock(&p.host);
        let fd = host.watch()?;
        let generation = host.generation();
        if !host.connected() {
            return Some(Watch { fd, set: EventSet::IN, generation });
        }
        let mut set = EventSet::empty();
        if p.guest_open && p.staged.is_empty() {
            set |= EventSet::IN;
        }
        if !p.out.is_empty() {
            set |= EventSet::OUT;
        }
        // Nothing wanted: not watched at all, so a hang-up cannot spin the
        // loop; it shows on the next read or write.
        (!set.is_empty()).then_some(Watch { fd, set, generation })
    }

    /// Makes epoll watch what each port's host end needs now: the old
    /// descriptor leaves epoll before an ended connection is closed.
    fn settle(&mut self, ops: &mut EventOps) {
        for i in 0..self.ports.len() {
            let want = self.interest(i);
            let p = &mut self.ports[i];
            let data = HOST_BASE + i as u32;
            if want != p.watching {
                if let Some(w) = p.watching.take() {
                    if let Err(e) = ops.remove(Events::with_data_raw(w.fd, data, w.set)) {
                        log::debug!("virtio-serial: port {}: unwatch: {e:?}", p.nr);
                    }
                }
            }
            lock(&p.host).reap();
            if want == p.watching {
                continue;
            }
            if let Some(w) = want {
                match ops.add(Events::with_data_raw(w.fd, data, w.set)) {
                    Ok(()) => p.watching = want,
                    Err(e) => crate::warn_limited!("virtio-serial: port {}: watch: {e:?}", p.nr),
                }
            }
        }
    }
}

/// Writes what the host end takes of `out` without blocking. With no
/// host end (or once it failed) the output is dropped, as a disconnected
/// QEMU socket chardev drops it.
fn flush_out(host: &mut dyn PortHost, out: &mut Vec<u8>) {
    while !out.is_empty() {
        if !host.connected() {
            out.clear();
            return;
        }
        match host.write(out) {
            Ok(0) => host.disconnect(),
            Ok(n) => drop(out.drain(..n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => host.disconnect(),
        }
    }
}

/// Takes guest output chains into the port's buffer and on to the host
/// end; holds the next chain back while the buffer is not empty.
struct TakeOutput<'a> {
    out: &'a mut Vec<u8>,
    host: &'a mut dyn PortHost,
}

impl Request for TakeOutput<'_> {
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Outcome {
        if !self.out.is_empty() {
            // The host end's room (EPOLLOUT) brings the worker back.
            return Outcome::HoldBack;
        }
        match Chain::read(mem, chain, usize::from(DATA_QUEUE_SIZE)) {
            Ok(c) if self.host.connected() => {
                use std::io::Read;
                let mut r = ChainReader::new(mem, &c).take(MAX_TX_CHAIN as u64);
                if let Err(e) = r.read_to_end(self.out) {
                    log::debug!("virtio-serial: output chain: {e}");
                }
                flush_out(self.host, self.out);
            }
            Ok(_) => {}
            Err(e) => log::debug!("virtio-serial: output chain: {e}"),
        }
        // Output buffers are device-readable: nothing written back.
        Outcome::Used(0)
    }
}

/// Gives host input to guest receive chains, reading the host end one
/// staging buffer at a time; holds back once the host end has nothing.
struct GiveInput<'a> {
    staged: &'a mut Vec<u8>,
    host: &'a mut dyn PortHost,
}

impl GiveInput<'_> {
    /// Stages what the host end has; false if nothing.
    fn stage(&mut self) -> bool {
        while self.staged.is_empty() && self.host.connected() {
            let mut buf = [0u8; STAGING];
            match self.host.read(&mut buf) {
                Ok(0) => self.host.disconnect(),
                Ok(n) => self.staged.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.host.disconnect(),
            }
        }
        !self.staged.is_empty()
    }
}

impl Request for GiveInput<'_> {
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Outcome {
        if !self.stage() {
            // The host end's input (EPOLLIN) brings the worker back.
            return Outcome::HoldBack;
        }
        let n = match Chain::read(mem, chain, usize::from(DATA_QUEUE_SIZE)) {
            Ok(c) => c.write_from(mem, self.staged),
            Err(e) => {
                log::debug!("virtio-serial: input chain: {e}");
                0
            }
        };
        self.staged.drain(..n);
        Outcome::Used(n as u32)
    }
}

impl MutEventSubscriber for Bus {
    fn init(&mut self, ops: &mut EventOps) {
        for p in &self.ports {
            for r in [&p.rx, &p.tx].into_iter().flatten() {
                r.init(ops, FAMILY);
            }
        }
        if let Some(c) = &self.control {
            c.init(ops);
        }
        self.settle(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let host = events.data().checked_sub(HOST_BASE).map(|i| i as usize);
        match host.and_then(|i| self.ports.get(i)) {
            Some(p) => {
                // A listener or reconnect timer fired: connect. On a
                // connection, `serve_port` reads or writes.
                let mut host = lock(&p.host);
                if !host.connected() {
                    host.poll();
                }
            }
            None => {
                // A queue's kick or re-arm: its rings consume it (each
                // ring knows its own descriptors).
                if let Some(c) = &self.control {
                    c.take_event(&events);
                }
                for p in &self.ports {
                    for r in [&p.rx, &p.tx].into_iter().flatten() {
                        r.take_event(&events);
                    }
                }
            }
        }
        self.serve_all();
        self.settle(ops);
    }
}

impl Handler for Bus {}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_MULTIPORT
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_from(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // emerg_wr is not offered (no VIRTIO_CONSOLE_F_EMERG_WRITE).
        log::debug!("virtio-serial: config write at {offset:#x} ignored");
    }

    fn activate(&mut self, mut ctx: ActivationContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let multiport = self.acked & F_MULTIPORT != 0;
        let ring = |ctx: &mut ActivationContext, index: usize| -> Result<_, ActivateError> {
            match ctx.take_queue(index) {
                Ok(q) => Ok(Some(
                    Ring::new(ctx.mem.clone(), q, ctx.interrupt.clone())
                        .map_err(ActivateError::EventFd)?,
                )),
                Err(_) => Ok(None),
            }
        };
        let control = if multiport {
            let rx = ring(&mut ctx, 2)?.ok_or(ActivateError::MissingQueue(2))?;
            let tx = ring(&mut ctx, 3)?.ok_or(ActivateError::MissingQueue(3))?;
            Some(Control::new(rx, tx))
        } else {
            None
        };
        let mut ports = Vec::new();
        for p in &self.ports {
            // Without multiport only port 0 exists.
            if !multiport && p.nr != 0 {
                continue;
            }
            let (rx, tx) = port_queues(p.nr);
            ports.push(Port {
                nr: p.nr,
                console: p.console,
                name: p.name.clone(),
                host: p.host.clone(),
                rx: ring(&mut ctx, rx)?,
                tx: ring(&mut ctx, tx)?,
                ready: !multiport,
                guest_open: !multiport,
                told_connected: !multiport,
                out: Vec::new(),
                staged: Vec::new(),
                watching: None,
            });
        }
        let bus = Bus { ports, control };
        self.worker = Some(Worker::spawn(FAMILY, FAMILY, bus).map_err(ActivateError::Worker)?);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // The host ends stay connected: the next driver sees them open.
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        self.acked = 0;
        true
    }
}
