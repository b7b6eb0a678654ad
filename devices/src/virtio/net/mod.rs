//! virtio-net (type 1) on a tap: `-netdev tap` with `-device virtio-net-*`.
//!
//! The host side (`NetBackend`: the tap's queues, and with `vhost=on` one
//! vhost-net instance per queue pair) belongs to the process and outlives
//! guest reboots. The device offers what a tap with a virtio-net header
//! carries (checksum and TCP segmentation offloads both ways, mergeable
//! receive buffers), one queue pair per tap queue, and the control queue.
//! Each queue pair runs on a worker of its own (`queue_pair`), or in the
//! kernel (`vhost_kernel::net`); the control queue always on a worker.

pub mod ctrl;
pub mod queue_pair;
pub mod tap;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod tests;
pub mod user;

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};

use crate::vhost_kernel::net::VhostNetBackend;
use ctrl::{CtrlQueue, CtrlState};
use queue_pair::QueuePair;
use tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN};

use super::worker::{Ring, Worker};
use super::{
    read_config_from, ActivateError, ActivationContext, ActiveQueue, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

fn bit(b: u32) -> u64 {
    1 << b
}

/// Indirect descriptor tables: Linux puts a transmitted frame's pieces in
/// one, so a frame takes one ring entry instead of up to 19.
/// `chain::Chain` follows them (bounded by the queue size).
/// The family its workers are known by (`-device FAMILY-pci|FAMILY-device`).
pub const FAMILY: &str = "virtio-net";

const VIRTIO_RING_F_INDIRECT_DESC: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

/// The ring and transport features vhost-net must handle for the device
/// to offer them with `vhost=on`.
const RING_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC;

/// The device's shape, from `-device virtio-net-*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetParams {
    pub mac: [u8; 6],
    /// `queue-size=` (QEMU's default: 256) for every queue.
    pub queue_size: u16,
}

/// A tap's queues and, with `vhost=on`, the kernel instances that serve
/// them. Opened once; every run's device is built on it.
pub struct NetBackend {
    /// One per queue pair.
    pub taps: Vec<Arc<Tap>>,
    pub vhost: Option<VhostNetBackend>,
    /// `-netdev user`'s network thread, which the taps' stand-in reaches.
    pub user: Option<user::UserNet>,
    /// The link's state (`set_link`), kept across guest reboots as QEMU
    /// keeps it.
    pub link: Arc<Link>,
}

/// Whether the NIC's cable is in (`set_link NAME on|off`): the status bit
/// the driver reads, a configuration interrupt when it changes, and, while
/// it is out, frames dropped both ways (QEMU's `link_down`). Under vhost
/// the kernel moves the frames: only the status changes.
#[derive(Default)]
pub struct Link {
    down: std::sync::atomic::AtomicBool,
    /// The running device's interrupt (None while no driver runs it).
    interrupt: Mutex<Option<Arc<dyn super::VirtioInterrupt>>>,
}

impl Link {
    pub fn up(&self) -> bool {
        !self.down.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Plugs the cable in or pulls it; the driver hears of a change.
    pub fn set(&self, up: bool) {
        let was_up = !self.down.swap(!up, std::sync::atomic::Ordering::AcqRel);
        if was_up == up {
            return;
        }
        let irq = self.interrupt.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(irq) = irq {
            if let Err(e) = irq.trigger(super::VirtioInterruptType::Config) {
                crate::error_limited!("virtio-net: cannot tell the driver of the link: {e}");
            }
        }
    }

    fn attach(&self, irq: Option<Arc<dyn super::VirtioInterrupt>>) {
        *self.interrupt.lock().unwrap_or_else(|e| e.into_inner()) = irq;
    }
}

impl NetBackend {
    pub fn attach(&self, mem: &super::GuestMemoryMmap) {
        if let Some(v) = &self.vhost {
            v.attach(mem);
        }
    }

    pub fn detach(&self) {
        if let Some(v) = &self.vhost {
            v.detach();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] tap::TapError),
    #[error(transparent)]
    Vhost(#[from] crate::vhost_kernel::net::VhostNetError),
    #[error(transparent)]
    User(#[from] user::UserError),
}

pub struct Net {
    backend: Arc<NetBackend>,
    queue_sizes: Vec<u16>,
    /// `mac=`, which a reset restores (the driver may change `mac`).
    configured_mac: [u8; 6],
    mac: Arc<Mutex<[u8; 6]>>,
    acked_features: u64,
    workers: Vec<Worker<QueuePair>>,
    ctrl: Option<Worker<CtrlQueue>>,
    /// Pairs started in the kernel, and their queues (whose eventfds the
    /// kernel holds duplicates of).
    vhost_pairs: Vec<(usize, ActiveQueue, ActiveQueue)>,
}

impl Net {
    pub fn new(backend: Arc<NetBackend>, params: &NetParams) -> Self {
        // rx and tx per pair, then the control queue.
        let queue_sizes = vec![params.queue_size; 2 * backend.taps.len() + 1];
        Net {
            backend,
            queue_sizes,
            configured_mac: params.mac,
            mac: Arc::new(Mutex::new(params.mac)),
            acked_features: 0,
            workers: Vec::new(),
            ctrl: None,
            vhost_pairs: Vec::new(),
        }
    }

    fn pairs(&self) -> usize {
        self.backend.taps.len()
    }

    fn acked(&self, b: u32) -> bool {
        self.acked_features & bit(b) != 0
    }

    /// What the tap may hand the guest: the receive offloads it accepted.
    fn tap_offloads(&self) -> u32 {
        let mut flags = 0;
        if self.acked(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= TUN_F_CSUM;
            for (feature, flag) in [
                (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
                (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
                (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
            ] {
                if self.acked(feature) {
                    flags |= flag;
                }
            }
        }
        flags
    }

    fn start(&mut self, mut ctx: ActivationContext) -> Result<(), ActivateError> {
        let backend = self.backend.clone();
        let offloads = self.tap_offloads();
        for tap in &backend.taps {
            tap.set_offload(offloads).map_err(|e| ActivateError::Backend(Box::new(e)))?;
        }
        let mq = self.acked(VIRTIO_NET_F_MQ);
        // Without MQ the driver uses one pair, and the control queue is 2.
        let pairs = if mq { self.pairs() } else { 1 };
        backend.link.attach(Some(ctx.interrupt.clone()));
        let state = CtrlState { taps: backend.taps.clone(), mac: self.mac.clone(), mq };
        // The driver starts on the first pair (virtio 1.2, 5.1.6.5.5).
        state.use_pairs(1);
        if self.acked(VIRTIO_NET_F_CTRL_VQ) {
            let q = ctx.take_queue(2 * pairs)?;
            let ring = Ring::new(ctx.mem.clone(), q, ctx.interrupt.clone())
                .map_err(ActivateError::EventFd)?;
            let handler = CtrlQueue { ring, state };
            self.ctrl = Some(
                Worker::spawn(FAMILY, "virtio-net-ctrl", handler).map_err(ActivateError::Worker)?,
            );
        }
        let mergeable = self.acked(VIRTIO_NET_F_MRG_RXBUF);
        for pair in 0..pairs {
            // A driver may set up fewer pairs than offered; the first it must.
            let (rx, tx) = match (ctx.take_queue(2 * pair), ctx.take_queue(2 * pair + 1)) {
                (Ok(rx), Ok(tx)) => (rx, tx),
                (Err(e), _) | (_, Err(e)) if pair == 0 => return Err(e),
                _ => continue,
            };
            let tap = backend.taps[pair].clone();
            if let Some(vhost) = &backend.vhost {
                let started = vhost.start(pair, self.acked_features, &ctx.mem, (&rx, &tx), &tap);
                self.vhost_pairs.push((pair, rx, tx));
                started.map_err(|e| ActivateError::Backend(Box::new(e)))?;
                continue;
            }
            let name = format!("virtio-net-q{pair}");
            let rx = Ring::new(ctx.mem.clone(), rx, ctx.interrupt.clone())
                .map_err(ActivateError::EventFd)?;
            let tx = Ring::new(ctx.mem.clone(), tx, ctx.interrupt.clone())
                .map_err(ActivateError::EventFd)?;
            let handler =
                QueuePair::new(rx, tx, tap, backend.link.clone(), mergeable, name.clone());
            self.workers
                .push(Worker::spawn(FAMILY, &name, handler).map_err(ActivateError::Worker)?);
        }
        Ok(())
    }

    fn stop(&mut self) {
        self.backend.link.attach(None);
        for w in self.workers.drain(..) {
            w.stop();
        }
        if let Some(w) = self.ctrl.take() {
            w.stop();
        }
        if let Some(vhost) = &self.backend.vhost {
            for (pair, _, _) in self.vhost_pairs.drain(..) {
                vhost.stop(pair);
            }
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_CTRL_VQ)
            | bit(VIRTIO_NET_F_CTRL_RX)
            | bit(VIRTIO_NET_F_CTRL_MAC_ADDR);
        // Offloads only where the host side carries them (QEMU: a peer
        // with a virtio-net header); user networking wants whole frames.
        if self.backend.taps.iter().all(|t| t.offloads()) {
            f |= bit(VIRTIO_NET_F_CSUM)
                | bit(VIRTIO_NET_F_GUEST_CSUM)
                | bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(VIRTIO_NET_F_GUEST_TSO6)
                | bit(VIRTIO_NET_F_GUEST_ECN)
                | bit(VIRTIO_NET_F_HOST_TSO4)
                | bit(VIRTIO_NET_F_HOST_TSO6)
                | bit(VIRTIO_NET_F_HOST_ECN);
        }
        if self.pairs() > 1 {
            f |= bit(VIRTIO_NET_F_MQ);
        }
        if let Some(vhost) = &self.backend.vhost {
            // What the kernel does not handle on the rings is not offered.
            let kernel = vhost.features();
            f &= !(RING_FEATURES | bit(VIRTIO_NET_F_MRG_RXBUF)) | kernel;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    /// `struct virtio_net_config`: mac, status, max_virtqueue_pairs.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 10];
        config[..6].copy_from_slice(&*self.mac.lock().unwrap_or_else(|e| e.into_inner()));
        let status = if self.backend.link.up() { VIRTIO_NET_S_LINK_UP as u16 } else { 0 };
        config[6..8].copy_from_slice(&status.to_le_bytes());
        config[8..10].copy_from_slice(&(self.pairs() as u16).to_le_bytes());
        read_config_from(&config, offset, data);
    }

    /// The MAC address is writable through config space for drivers
    /// without VIRTIO_NET_F_CTRL_MAC_ADDR (legacy ones); modern drivers
    /// use the control queue.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut mac = self.mac.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(start) = usize::try_from(offset) else { return };
        if let Some(dst) = mac.get_mut(start..).filter(|d| d.len() >= data.len()) {
            dst[..data.len()].copy_from_slice(data);
        }
    }

    fn calls_from_outside(&self) -> bool {
        self.backend.vhost.is_some()
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        if !self.workers.is_empty() || !self.vhost_pairs.is_empty() || self.ctrl.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let result = self.start(ctx);
        if result.is_err() {
            // Whatever was started goes back to idle.
            self.stop();
        }
        result
    }

    fn reset(&mut self) -> bool {
        self.stop();
        self.acked_features = 0;
        *self.mac.lock().unwrap_or_else(|e| e.into_inner()) = self.configured_mac;
        true
    }
}

impl Drop for Net {
    /// The run is over: the kernel stops using the rings before RAM goes.
    fn drop(&mut self) {
        self.stop();
    }
}
