//! vhost-user-fs: virtio-fs (device type 26) served by virtiofsd.
//!
//! skiff owns the config space (the mount tag and the number of request
//! queues) and the transport; virtiofsd serves every queue (hiprio, then
//! the request queues) straight from guest RAM. While the device runs, a
//! worker watches the socket. If virtiofsd dies, one line on stderr names
//! the socket, the device asks the driver for a reset (NEEDS_RESET), and
//! the worker takes the queues over: every request still waiting, and
//! every later one, is answered ENOTCONN. Linux does not reset a virtio-fs
//! device on NEEDS_RESET, so without that the guest's next sync or stat on
//! the mount would wait for ever (busybox's `poweroff -f` syncs first).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::{Connection, QueueView};
use crate::virtio::chain::Chain;
use crate::virtio::worker::{Budget, Handler, Outcome, Request, Ring, Worker};
use crate::virtio::{
    read_config_from, ActivateError, ActivationContext, ActiveQueue, GuestMemoryMmap, VirtioDevice,
    VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// The family its workers are known by (`-device FAMILY-pci|FAMILY-device`).
pub const FAMILY: &str = "vhost-user-fs";

/// virtio-fs's device ID.
pub const DEVICE_TYPE: u32 = 26;
/// The tag's room in the config space; a shorter tag is NUL-padded.
pub const TAG_LEN: usize = 36;

/// What the transport can carry: split rings with indirect descriptors
/// and notification suppression, as QEMU's vhost-user-fs passes them on.
const PASSED_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_EVENT_IDX
    | 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

/// The shape of a vhost-user-fs device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsParams {
    pub tag: String,
    pub num_request_queues: u16,
    pub queue_size: u16,
}

pub struct VhostUserFs {
    connection: Arc<Mutex<Connection>>,
    config: Vec<u8>,
    queue_sizes: Vec<u16>,
    acked_features: u64,
    active: Option<Active>,
}

/// A started device: the watcher holds the queues the backend serves.
struct Active {
    watcher: Worker<Watch>,
}

impl VhostUserFs {
    /// `params.tag` is at most `TAG_LEN` bytes (the command line checks it).
    pub fn new(connection: Arc<Mutex<Connection>>, params: &FsParams) -> Self {
        let mut config = vec![0u8; TAG_LEN + 4];
        let tag = params.tag.as_bytes();
        let n = tag.len().min(TAG_LEN);
        config[..n].copy_from_slice(&tag[..n]);
        config[TAG_LEN..].copy_from_slice(&u32::from(params.num_request_queues).to_le_bytes());
        let queues = 1 + usize::from(params.num_request_queues);
        VhostUserFs {
            connection,
            config,
            queue_sizes: vec![params.queue_size; queues],
            acked_features: 0,
            active: None,
        }
    }

    fn connection(&self) -> MutexGuard<'_, Connection> {
        self.connection.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the watcher, then the backend's rings (nothing is sent when
    /// none was started, e.g. after an activation that failed half-way).
    /// Starts the backend on the driver's queues and the worker that
    /// watches it.
    fn start(&mut self, ctx: ActivationContext) -> Result<Worker<Watch>, ActivateError> {
        let (socket, down, path, reconnect) = {
            let mut c = self.connection();
            c.start(self.acked_features, &ctx.mem, ctx.queues.iter().map(Into::into))
                .map_err(|e| ActivateError::Backend(Box::new(e)))?;
            let socket = c.socket_fd().try_clone_to_owned().map_err(ActivateError::EventFd)?;
            (socket, c.down_flag(), c.path().display().to_string(), c.reconnect_interval())
        };
        let watch = Watch {
            socket,
            down,
            path,
            interrupt: ctx.interrupt,
            mem: ctx.mem,
            queues: ctx.queues,
            rings: Vec::new(),
            calls: Vec::new(),
            connection: self.connection.clone(),
            acked_features: self.acked_features,
            reconnect,
            timer: None,
            reconnect_told: false,
        };
        Worker::spawn(FAMILY, FAMILY, watch).map_err(ActivateError::Worker)
    }

    fn stop(&mut self) {
        if let Some(active) = self.active.take() {
            active.watcher.stop();
        }
        self.connection().stop();
    }
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.connection().device_features() & PASSED_FEATURES
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_from(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn calls_from_outside(&self) -> bool {
        true
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        match self.start(ctx) {
            Ok(watcher) => {
                self.active = Some(Active { watcher });
                Ok(())
            }
            Err(e) => {
                // Whatever the backend was given goes back to idle.
                self.connection().stop();
                Err(e)
            }
        }
    }

    fn reset(&mut self) -> bool {
        self.stop();
        self.acked_features = 0;
        true
    }
}

impl Drop for VhostUserFs {
    /// The run is over: the backend stops serving rings in memory that is
    /// about to go, and is ready for the next run's device.
    fn drop(&mut self) {
        self.stop();
    }
}

/// Watches the backend's socket for a hang-up while the device runs, then
/// answers the queues itself.
struct Watch {
    socket: OwnedFd,
    down: Arc<AtomicBool>,
    path: String,
    interrupt: Arc<dyn VirtioInterrupt>,
    mem: GuestMemoryMmap,
    /// The queues as the driver set them up, until the backend dies.
    queues: Vec<ActiveQueue>,
    /// The queues skiff serves once it has, and their call eventfds.
    rings: Vec<Ring>,
    calls: Vec<(usize, EventFd)>,
    /// For `reconnect=`: the connection, what the driver accepted, how
    /// often to try, and the timer that says when.
    connection: Arc<Mutex<Connection>>,
    acked_features: u64,
    reconnect: Option<Duration>,
    timer: Option<TimerFd>,
    reconnect_told: bool,
}

/// Requests answered per queue and wakeup once the backend is gone.
const REFUSED_PER_WAKEUP: usize = 64;

impl Watch {
    /// The backend hung up: report it, ask for a reset, and serve the
    /// queues from where the backend's used rings stop (what it took and
    /// did not finish is answered again, with an error). That assumes the
    /// backend finished requests in order, as virtiofsd does without
    /// `--thread-pool-size`; with a pool, a request finished out of order
    /// would be answered twice and the driver would mark the ring broken.
    /// Knowing exactly what was in flight needs the backend's inflight
    /// region (INFLIGHT_SHMFD), which skiff does not negotiate yet.
    fn take_over(&mut self, ops: &mut EventOps) {
        if !self.down.swap(true, Ordering::SeqCst) {
            crate::error_limited!(
                "vhost-user-fs: the backend on '{}' went away; the device needs a reset \
                 (requests now fail with ENOTCONN)",
                self.path
            );
        }
        self.interrupt.needs_reset();
        for q in std::mem::take(&mut self.queues) {
            let ActiveQueue { index, mut queue, kick, call } = q;
            let used_idx = GuestAddress(queue.used_ring()).checked_add(2);
            let done = used_idx.and_then(|a| self.mem.read_obj::<u16>(a).ok());
            let done = done.unwrap_or_else(|| queue.next_used());
            queue.set_next_avail(done);
            queue.set_next_used(done);
            let ring = call.try_clone().and_then(|dup| {
                let q = ActiveQueue { index, queue, kick, call: dup };
                Ring::new(self.mem.clone(), q, self.interrupt.clone())
            });
            self.calls.push((index, call));
            match ring {
                Ok(ring) => {
                    ring.init(ops, "vhost-user-fs");
                    self.rings.push(ring);
                }
                Err(e) => {
                    crate::error_limited!("vhost-user-fs: cannot take queue {index} over: {e}")
                }
            }
        }
        if let Some(every) = self.reconnect {
            match TimerFd::new().and_then(|mut t| t.reset(every, Some(every)).map(|()| t)) {
                Ok(timer) => {
                    if let Err(e) = ops.add(Events::with_data(&timer, TIMER, EventSet::IN)) {
                        crate::error_limited!(
                            "vhost-user-fs: cannot watch the reconnect timer: {e:?}"
                        );
                    }
                    self.timer = Some(timer);
                }
                Err(e) => crate::error_limited!("vhost-user-fs: no reconnect timer: {e}"),
            }
        }
    }

    /// `reconnect=`: the socket is tried again; once a backend answers,
    /// it gets the queues where skiff left them and the worker goes back
    /// to watching. The new backend has no FUSE session: the guest's mount
    /// keeps failing until it is mounted again, which sends FUSE_INIT. Old
    /// node IDs cannot reach the new session, since Linux keeps one
    /// superblock per virtio-fs device, and a new one exists only once the
    /// old one is gone.
    fn try_reconnect(&mut self, ops: &mut EventOps) {
        let connection = self.connection.clone();
        let mut c = connection.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = c.reconnect() {
            // Said once; the timer tries again quietly.
            if !std::mem::replace(&mut self.reconnect_told, true) {
                crate::warn_limited!(
                    "vhost-user-fs: reconnecting: {e} (trying again every {:?})",
                    self.reconnect.unwrap_or_default()
                );
            }
            return;
        }
        let views = self.rings.iter().filter_map(|r| {
            let index = usize::from(r.index);
            let call = &self.calls.iter().find(|(i, _)| *i == index)?.1;
            Some(QueueView { index, queue: &r.queue, kick: &r.kick, call })
        });
        if let Err(e) = c.start(self.acked_features, &self.mem, views) {
            // Nothing of it may stay live while skiff answers the rings.
            c.stop();
            if !std::mem::replace(&mut self.reconnect_told, true) {
                crate::warn_limited!(
                    "vhost-user-fs: reconnected, but the backend refused the queues: {e}"
                );
            }
            return;
        }
        self.reconnect_told = false;
        let socket = match c.socket_fd().try_clone_to_owned() {
            Ok(s) => s,
            Err(e) => {
                crate::error_limited!("vhost-user-fs: cannot watch the new connection: {e}");
                return;
            }
        };
        drop(c);
        crate::warn_limited!("vhost-user-fs: reconnected to '{}'", self.path);
        if let Some(timer) = self.timer.take() {
            let _ = ops.remove(Events::new(&timer, EventSet::IN));
        }
        for ring in std::mem::take(&mut self.rings) {
            let _ = ops.remove(Events::new(&ring.kick, EventSet::IN));
            let _ = ops.remove(Events::new(ring.rearm.eventfd(), EventSet::IN));
            let index = usize::from(ring.index);
            let Some(at) = self.calls.iter().position(|(i, _)| *i == index) else { continue };
            let (_, call) = self.calls.swap_remove(at);
            let Ring { queue, kick, .. } = ring;
            self.queues.push(ActiveQueue { index, queue, kick, call });
        }
        self.calls.clear();
        self.socket = socket;
        self.watch_socket(ops);
    }

    fn watch_socket(&self, ops: &mut EventOps) {
        // No IN: replies to the vCPU's requests arrive on this socket too.
        let set = EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR;
        if let Err(e) = ops.add(Events::with_data(&self.socket, SOCKET, set)) {
            crate::error_limited!("vhost-user-fs: cannot watch '{}': {e:?}", self.path);
        }
    }

    fn refuse_all(&mut self) {
        for ring in &mut self.rings {
            ring.rearm.clear();
            let max = usize::from(ring.queue.size());
            ring.serve(Budget { requests: REFUSED_PER_WAKEUP }, &mut Refuse { max });
        }
    }
}

impl MutEventSubscriber for Watch {
    fn init(&mut self, ops: &mut EventOps) {
        self.watch_socket(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            SOCKET => {
                // Once is enough: a hung-up socket stays readable for ever.
                let _ = ops.remove(events);
                self.take_over(ops);
            }
            TIMER => {
                if let Some(t) = &mut self.timer {
                    let _ = t.wait();
                }
                self.try_reconnect(ops);
                return;
            }
            _ => {}
        }
        // A kick or a re-arm of any ring: each wakeup looks at them all.
        self.refuse_all();
    }
}

impl Handler for Watch {}

/// The socket's and the reconnect timer's tokens in the worker's epoll set.
const SOCKET: u32 = 0;
const TIMER: u32 = 1;

/// FUSE requests that get no reply.
const FUSE_FORGET: u32 = 2;
const FUSE_BATCH_FORGET: u32 = 42;

/// Answers a FUSE request with ENOTCONN, as a FUSE server that lost its
/// connection would: a `fuse_out_header` (length, -errno, the request's
/// `unique`) in the first device-writable buffer. What cannot be parsed
/// is returned with nothing written.
struct Refuse {
    max: usize,
}

impl Request for Refuse {
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Outcome {
        let Ok(chain) = Chain::read(mem, chain, self.max) else { return Outcome::Used(0) };
        // fuse_in_header: len, opcode, unique, ... (Linux sends it in a
        // buffer of its own).
        let Some(head) = chain.descriptors.iter().find(|d| !d.is_write_only()) else {
            return Outcome::Used(0);
        };
        if head.len() < 16 {
            return Outcome::Used(0);
        }
        let Ok(header) = mem.read_obj::<[u8; 16]>(head.addr()) else {
            return Outcome::Used(0);
        };
        let opcode = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if matches!(opcode, FUSE_FORGET | FUSE_BATCH_FORGET) {
            return Outcome::Used(0);
        }
        let Some(out) = chain.writable().find(|d| d.len() >= 16) else {
            return Outcome::Used(0);
        };
        let mut reply = [0u8; 16];
        reply[..4].copy_from_slice(&16u32.to_le_bytes());
        reply[4..8].copy_from_slice(&(-libc::ENOTCONN).to_le_bytes());
        reply[8..].copy_from_slice(&header[8..16]);
        match mem.write_obj(reply, out.addr()) {
            Ok(()) => Outcome::Used(16),
            Err(_) => Outcome::Used(0),
        }
    }
}
