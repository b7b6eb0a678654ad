//! vhost-user frontends: devices whose data plane runs in another process.
//!
//! skiff keeps the virtio transport (registers, config space, feature
//! negotiation with the guest) and hands the backend what it needs to serve
//! the queues itself: guest RAM as file descriptors (SET_MEM_TABLE), each
//! queue's addresses, the guest's doorbell (the transport's kick eventfd,
//! a KVM ioeventfd) and the interrupt (the call eventfd, a KVM irqfd under
//! MSI-X). No request and no interrupt passes through skiff.
//!
//! `Connection` is the process's side of one backend socket: it outlives
//! guest reboots (virtiofsd exits when its client goes away), so it belongs
//! to the VMM's backends, and each run's device drives it. The messages are
//! the `vhost` crate's; what is here is the order QEMU sends them in and
//! what skiff does when the other process misbehaves or dies.

pub mod fs;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod tests;
mod watchdog;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use watchdog::Watchdog;

use crate::virtio::{ActiveQueue, GuestMemoryMmap};

/// How long skiff waits for the replies of one request sequence (setting
/// up, starting or stopping the device). A backend that takes longer is
/// treated as dead: the vCPU that configures the device must not hang.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// What skiff asks for when the backend offers it: acknowledged requests
/// (errors surface at the message that caused them), queue count, config
/// space, and a reset that returns the backend to its initial state.
const WANTED_PROTOCOL: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::RESET_DEVICE);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to '{path}': {source}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("'{path}': {request} failed: {source}")]
    Request {
        path: String,
        request: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("'{path}': the backend serves {available} queues, the device needs {needed}")]
    TooFewQueues { path: String, available: u64, needed: usize },
    #[error("'{path}': the backend does not offer VIRTIO_F_VERSION_1")]
    NotModern { path: String },
    #[error("guest RAM is not shared with other processes (it needs a memfd backend)")]
    RamNotShared,
    #[error("queue {0} does not lie in one guest RAM region")]
    QueueOutsideRegion(usize),
    #[error("the connection is down (the backend went away)")]
    Down,
    #[error("'{path}': the backend no longer offers features the driver uses ({missing:#x})")]
    FeaturesGone { path: String, missing: u64 },
}

/// One backend socket, set up (SET_OWNER, features) and ready for a device.
pub struct Connection {
    path: PathBuf,
    frontend: Frontend,
    /// The socket, for watching it from a worker (see `socket_fd`).
    socket: UnixStream,
    /// The virtio features the backend offers.
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    /// Queues configured on the backend by the last `start`, stopped by `stop`.
    started: Vec<usize>,
    /// Set once the backend hung up or stopped answering.
    down: Arc<AtomicBool>,
    watchdog: Watchdog,
    num_queues: usize,
    timeout: Duration,
    reconnect: Option<Duration>,
}

/// A connected socket: the frontend on it, a duplicate to watch, and its
/// watchdog.
fn open(
    path: &Path,
    num_queues: usize,
    timeout: Duration,
    down: &Arc<AtomicBool>,
) -> Result<(Frontend, UnixStream, Watchdog), Error> {
    let socket = UnixStream::connect(path)
        .map_err(|source| Error::Connect { path: path.display().to_string(), source })?;
    wrap(socket, path, num_queues, timeout, down)
}

fn wrap(
    socket: UnixStream,
    path: &Path,
    num_queues: usize,
    timeout: Duration,
    down: &Arc<AtomicBool>,
) -> Result<(Frontend, UnixStream, Watchdog), Error> {
    let connect_err = |source| Error::Connect { path: path.display().to_string(), source };
    let watch = socket.try_clone().map_err(connect_err)?;
    let watchdog = Watchdog::new(socket.try_clone().map_err(connect_err)?, down.clone(), timeout)
        .map_err(connect_err)?;
    Ok((Frontend::from_stream(socket, num_queues as u64), watch, watchdog))
}

/// What the backend needs of one queue: the driver's rings and the
/// transport's kick and call eventfds.
pub struct QueueView<'a> {
    pub index: usize,
    pub queue: &'a Queue,
    pub kick: &'a EventFd,
    pub call: &'a EventFd,
}

impl<'a> From<&'a ActiveQueue> for QueueView<'a> {
    fn from(q: &'a ActiveQueue) -> Self {
        QueueView { index: q.index, queue: &q.queue, kick: &q.kick, call: &q.call }
    }
}

impl Connection {
    /// Connects to `path` and negotiates the protocol for a device with
    /// `num_queues` queues.
    pub fn connect(path: &Path, num_queues: usize) -> Result<Self, Error> {
        Self::connect_with_timeout(path, num_queues, REPLY_TIMEOUT)
    }

    /// `connect`, with at most `timeout` for each request sequence.
    pub fn connect_with_timeout(
        path: &Path,
        num_queues: usize,
        timeout: Duration,
    ) -> Result<Self, Error> {
        let stream = UnixStream::connect(path)
            .map_err(|source| Error::Connect { path: path.display().to_string(), source })?;
        Self::from_stream(stream, path, num_queues, timeout)
    }

    /// A connection on a socket already connected to the backend at `path`.
    pub fn from_stream(
        stream: UnixStream,
        path: &Path,
        num_queues: usize,
        timeout: Duration,
    ) -> Result<Self, Error> {
        let down = Arc::new(AtomicBool::new(false));
        let (frontend, socket, watchdog) = wrap(stream, path, num_queues, timeout, &down)?;
        let mut c = Connection {
            path: path.to_owned(),
            frontend,
            socket,
            backend_features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            started: Vec::new(),
            down,
            watchdog,
            num_queues,
            timeout,
            reconnect: None,
        };
        c.negotiate(num_queues)?;
        Ok(c)
    }

    /// With `-chardev socket,reconnect=`: how often to try the socket
    /// again once the backend went away.
    pub fn set_reconnect(&mut self, every: Option<Duration>) {
        self.reconnect = every;
    }

    pub fn reconnect_interval(&self) -> Option<Duration> {
        self.reconnect
    }

    /// Connects again to a backend that went away (a new virtiofsd on the
    /// same socket) and negotiates from scratch; the device then `start`s
    /// it with the queues as they stand.
    pub fn reconnect(&mut self) -> Result<(), Error> {
        let (frontend, socket, watchdog) =
            open(&self.path, self.num_queues, self.timeout, &self.down)?;
        // The old watchdog goes first: it shares `down`.
        self.watchdog = watchdog;
        self.frontend = frontend;
        self.socket = socket;
        self.started.clear();
        self.down.store(false, Ordering::SeqCst);
        let negotiated = self.negotiate(self.num_queues);
        if negotiated.is_err() {
            self.down.store(true, Ordering::SeqCst);
        }
        negotiated
    }

    /// QEMU's order (vhost_user_backend_init, vhost_dev_init): features,
    /// protocol features, queue count, then SET_OWNER.
    fn negotiate(&mut self, num_queues: usize) -> Result<(), Error> {
        let _deadline = self.watchdog.arm();
        self.backend_features =
            self.frontend.get_features().map_err(self.failed("GET_FEATURES"))?;
        if self.backend_features & crate::virtio::VIRTIO_F_VERSION_1 == 0 {
            return Err(Error::NotModern { path: self.shown() });
        }
        if self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = self
                .frontend
                .get_protocol_features()
                .map_err(self.failed("GET_PROTOCOL_FEATURES"))?;
            self.protocol = offered & WANTED_PROTOCOL;
            self.frontend
                .set_protocol_features(self.protocol)
                .map_err(self.failed("SET_PROTOCOL_FEATURES"))?;
            if self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every request from here on is acknowledged: a backend that
                // refuses SET_MEM_TABLE or a ring fails that request.
                self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if self.protocol.contains(VhostUserProtocolFeatures::MQ) {
                let available =
                    self.frontend.get_queue_num().map_err(self.failed("GET_QUEUE_NUM"))?;
                if available < num_queues as u64 {
                    return Err(Error::TooFewQueues {
                        path: self.shown(),
                        available,
                        needed: num_queues,
                    });
                }
            }
        }
        self.frontend.set_owner().map_err(self.failed("SET_OWNER"))
    }

    /// The virtio features the backend offers, without vhost-user's own bit.
    pub fn device_features(&self) -> u64 {
        self.backend_features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The socket, to watch for the backend's death (hang-up). Nothing
    /// but replies ever arrives on it, so it is watched for hang-up only.
    pub fn socket_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Set when the backend is gone: by the device's watcher when the
    /// socket hangs up, or here when a request fails.
    pub fn down_flag(&self) -> Arc<AtomicBool> {
        self.down.clone()
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    fn shown(&self) -> String {
        self.path.display().to_string()
    }

    /// Maps a request's failure; the connection is down from then on (a
    /// reply that did not come, or came malformed, leaves the protocol
    /// out of step).
    fn failed(&self, request: &'static str) -> impl Fn(vhost::Error) -> Error + '_ {
        move |source| {
            self.down.store(true, Ordering::SeqCst);
            Error::Request { path: self.shown(), request, source }
        }
    }

    /// Starts the backend on the driver's queues: the features the driver
    /// accepted, guest RAM, then each queue (QEMU's vhost_dev_start order).
    pub fn start<'a>(
        &mut self,
        acked_features: u64,
        mem: &GuestMemoryMmap,
        queues: impl IntoIterator<Item = QueueView<'a>> + Clone,
    ) -> Result<(), Error> {
        if self.is_down() {
            if self.reconnect.is_none() {
                return Err(Error::Down);
            }
            // The backend came back since (or will not: then this fails).
            self.reconnect()?;
        }
        match self.start_now(acked_features, mem, queues.clone()) {
            // A backend that went away while the device was not running is
            // only noticed here: with `reconnect=`, once more on a new one.
            Err(Error::Request { .. }) if self.is_down() && self.reconnect.is_some() => {
                self.reconnect()?;
                self.start_now(acked_features, mem, queues)
            }
            r => r,
        }
    }

    fn start_now<'a>(
        &mut self,
        acked_features: u64,
        mem: &GuestMemoryMmap,
        queues: impl IntoIterator<Item = QueueView<'a>>,
    ) -> Result<(), Error> {
        // A backend met again after a reconnect must still offer what the
        // driver chose; the rings would otherwise mean different things.
        let missing = acked_features & !self.device_features();
        if missing != 0 {
            return Err(Error::FeaturesGone { path: self.shown(), missing });
        }
        let _deadline = self.watchdog.arm();
        // vhost-user's own bit stays on: SET_VRING_ENABLE depends on it.
        let features =
            acked_features & self.device_features() | self.backend_features & PROTOCOL_BIT;
        self.frontend.set_features(features).map_err(self.failed("SET_FEATURES"))?;
        let regions = memory_table(mem)?;
        self.frontend.set_mem_table(&regions).map_err(self.failed("SET_MEM_TABLE"))?;
        for q in queues {
            // Counted before it is configured: a half-configured ring is
            // stopped too.
            self.started.push(q.index);
            self.start_queue(mem, &q)?;
        }
        Ok(())
    }

    fn start_queue(&mut self, mem: &GuestMemoryMmap, q: &QueueView) -> Result<(), Error> {
        let i = q.index;
        let queue = q.queue;
        let config = VringConfigData {
            queue_max_size: queue.max_size(),
            queue_size: queue.size(),
            flags: 0,
            desc_table_addr: host_address(mem, queue.desc_table(), 16 * queue.size() as u64, i)?,
            used_ring_addr: host_address(mem, queue.used_ring(), 6 + 8 * queue.size() as u64, i)?,
            avail_ring_addr: host_address(mem, queue.avail_ring(), 6 + 2 * queue.size() as u64, i)?,
            log_addr: None,
        };
        let f = &self.frontend;
        f.set_vring_num(i, queue.size()).map_err(self.failed("SET_VRING_NUM"))?;
        f.set_vring_base(i, queue.next_avail()).map_err(self.failed("SET_VRING_BASE"))?;
        f.set_vring_addr(i, &config).map_err(self.failed("SET_VRING_ADDR"))?;
        f.set_vring_kick(i, q.kick).map_err(self.failed("SET_VRING_KICK"))?;
        f.set_vring_call(i, q.call).map_err(self.failed("SET_VRING_CALL"))?;
        if self.backend_features & PROTOCOL_BIT != 0 {
            self.frontend.set_vring_enable(i, true).map_err(self.failed("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// Stops every queue `start` configured (GET_VRING_BASE stops a ring)
    /// and resets the backend where it offers that, so the next driver
    /// starts from scratch. Errors are reported and the stop goes on: the
    /// guest's reset must not fail because the other process did.
    pub fn stop(&mut self) {
        let started = std::mem::take(&mut self.started);
        if self.is_down() {
            return;
        }
        let _deadline = self.watchdog.arm();
        let mut result = Ok(());
        for &i in &started {
            if self.backend_features & PROTOCOL_BIT != 0 {
                result = result.and(
                    self.frontend
                        .set_vring_enable(i, false)
                        .map_err(self.failed("SET_VRING_ENABLE")),
                );
            }
            result = result.and(
                self.frontend.get_vring_base(i).map(drop).map_err(self.failed("GET_VRING_BASE")),
            );
        }
        if !started.is_empty() && self.protocol.contains(VhostUserProtocolFeatures::RESET_DEVICE) {
            result = result.and(self.frontend.reset_device().map_err(self.failed("RESET_DEVICE")));
        }
        if let Err(e) = result {
            crate::error_limited!("vhost-user: stopping the backend: {e}");
        }
    }
}

const PROTOCOL_BIT: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// Guest RAM as the backend maps it: each region's memfd and offset.
fn memory_table(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, Error> {
    mem.iter()
        .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|_| Error::RamNotShared))
        .collect()
}

/// skiff's address of `len` bytes of guest memory at `gpa`, which must lie
/// in one region: vhost-user gives ring addresses in the frontend's
/// address space, and the backend translates them through the memory table.
fn host_address(mem: &GuestMemoryMmap, gpa: u64, len: u64, queue: usize) -> Result<u64, Error> {
    let (region, offset) =
        mem.to_region_addr(GuestAddress(gpa)).ok_or(Error::QueueOutsideRegion(queue))?;
    let end = offset.0.checked_add(len);
    if end.filter(|&end| end <= region.len()).is_none() {
        return Err(Error::QueueOutsideRegion(queue));
    }
    let base = region.as_ptr() as u64;
    Ok(base + offset.0)
}

impl AsRawFd for Connection {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.socket.as_raw_fd()
    }
}
