//! Virtio devices and their transports.
//!
//! A device (`VirtioDevice`) knows its queues, features and config space but
//! nothing of how the guest reaches it. A transport (`mmio::MmioTransport`,
//! `pci::virtio_pci` in the `pci` crate) owns the registers, builds the
//! queues the driver set up and hands them over in an `ActivationContext`
//! at DRIVER_OK: each queue with its kick eventfd (the guest's doorbell,
//! a KVM ioeventfd) and its call eventfd (the device's "used buffers"
//! notification). An in-process device usually raises its interrupt through
//! `VirtioInterrupt::trigger`; an external backend (vhost) is handed the two
//! eventfds and never passes through skiff. The data plane runs on a
//! `worker::Worker` thread of the device's own.

pub mod balloon;
pub mod block;
pub mod chain;
pub mod console;
pub mod input;
pub mod mmio;
pub mod net;
pub mod notifier;
pub mod p9;
pub mod rng;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod test_utils;
pub mod transport;
pub mod worker;

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use mmio::{MmioError, MmioTransport, MMIO_WINDOW_SIZE, NOTIFY_REG_OFFSET};
pub use notifier::{CallRelay, RelayTarget};
pub use rng::{RateLimit, Rng, RngBackend, RngError};

/// Guest memory as every device sees it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// The feature bit every modern (virtio 1.x) device offers and requires.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Notification suppression with `used_event`/`avail_event` (virtio 1.2,
/// 2.7.10). A device offers it only when it writes `avail_event` and asks
/// `needs_notification` before interrupting: `worker::serve_queue` does both.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Why the guest is being interrupted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioInterruptType {
    /// The device configuration changed (or the device needs a reset).
    Config,
    /// The device added buffers to the used ring of this queue.
    Queue(u16),
}

/// How a device interrupts the guest. The transport implements it:
/// virtio-mmio latches a bit in InterruptStatus and pulses one line;
/// virtio-pci signals the queue's call eventfd, which KVM routes to the
/// MSI-X vector the driver chose, or raises INTx with the ISR.
pub trait VirtioInterrupt: Send + Sync {
    fn trigger(&self, t: VirtioInterruptType) -> std::io::Result<()>;

    /// The device cannot go on until the driver resets it: the transport
    /// sets NEEDS_RESET in the status the driver reads and raises a config
    /// interrupt (virtio 1.2, 2.1.2). Callable from a worker thread: it
    /// takes no lock a vCPU may hold.
    fn needs_reset(&self);
}

/// One queue the driver set up, handed to the device at DRIVER_OK.
pub struct ActiveQueue {
    pub index: usize,
    pub queue: Queue,
    /// Signalled when the guest kicks the queue (a KVM ioeventfd).
    pub kick: EventFd,
    /// The queue's call eventfd: what a backend outside skiff signals
    /// instead of `VirtioInterrupt::trigger` (the transport turns it into
    /// the interrupt: through KVM under MSI-X, through skiff otherwise).
    pub call: EventFd,
}

/// Everything a device needs to run, handed over by the transport when the
/// driver sets DRIVER_OK.
pub struct ActivationContext {
    pub mem: GuestMemoryMmap,
    /// Only the queues the driver marked ready, in index order.
    pub queues: Vec<ActiveQueue>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

impl ActivationContext {
    /// Takes queue `index` out of the context.
    pub fn take_queue(&mut self, index: usize) -> Result<ActiveQueue, ActivateError> {
        let at = self.queues.iter().position(|q| q.index == index);
        at.map(|at| self.queues.remove(at)).ok_or(ActivateError::MissingQueue(index))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device is already active")]
    AlreadyActive,
    #[error("device needs queue {0}, which the driver did not set up")]
    MissingQueue(usize),
    #[error("queue {index} has an invalid configuration")]
    InvalidQueue {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("queue {0} does not lie in guest memory")]
    QueueOutsideMemory(usize),
    #[error("eventfd operation failed")]
    EventFd(#[source] std::io::Error),
    #[error("the device's backend failed")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot start the device's worker thread")]
    Worker(#[source] std::io::Error),
}

/// A virtio device, independent of the transport that exposes it.
pub trait VirtioDevice: Send {
    /// The virtio device ID (4 for entropy, 2 for block, ...).
    fn device_type(&self) -> u32;

    /// One entry per queue: the largest size the device accepts (a power of 2).
    fn queue_max_sizes(&self) -> &[u16];

    /// The features offered to the driver; includes `VIRTIO_F_VERSION_1`,
    /// and `VIRTIO_RING_F_EVENT_IDX` only if the device suppresses
    /// notifications as that feature requires.
    fn features(&self) -> u64;

    /// The features the driver accepted: a subset of `features()`, already
    /// checked by the transport.
    fn ack_features(&mut self, features: u64);

    /// Reads the device-specific config space; `data` is zeroed beyond it.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific config space; ignored where read-only.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Whether something outside skiff (a vhost backend) signals the
    /// queues' call eventfds instead of `VirtioInterrupt::trigger`; the VMM
    /// then runs the transport's `CallRelay`. In-process devices say no, so
    /// their interrupts never wake the event loop.
    fn calls_from_outside(&self) -> bool {
        false
    }

    /// Starts the device with the queues the driver set up.
    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError>;

    /// Returns the device to its initial state: stops its worker (which
    /// finishes or cancels what is in flight first), drops its queues and
    /// interrupt. False when the device cannot reset; the transport then
    /// marks it FAILED.
    fn reset(&mut self) -> bool;
}

/// Serves a config-space read from a device's config bytes; bytes past the
/// end read as zero.
pub fn read_config_from(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else { return };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::virtio::test_utils::*;
    use crate::BusDevice;

    #[test]
    fn config_reads_clip_to_the_config_space() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_from(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_from(&config, 9, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_from(&config, u64::MAX, &mut data[..1]);
        assert_eq!(data[0], 0);
    }

    fn w(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    fn r(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn rng_behind_mmio_serves_a_driver() {
        let mem = guest_mem(0x20_0000);
        let mut tq = TestQueue::new(&mem, 16);
        let backend = Arc::new(RngBackend::new(None).unwrap());
        let rng = Arc::new(Mutex::new(Rng::new(backend)));
        let mut t = MmioTransport::new(mem.clone(), rng).unwrap();

        // What Linux's virtio_mmio + virtio_rng do, register by register.
        w(&mut t, 0x70, 1);
        w(&mut t, 0x70, 3);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x70, 0xb);
        assert_eq!(r(&mut t, 0x70), 0xb);
        w(&mut t, 0x30, 0);
        assert_eq!(r(&mut t, 0x34), 256);
        w(&mut t, 0x38, 16);
        w(&mut t, 0x80, tq.desc_table_addr() as u32);
        w(&mut t, 0x90, tq.avail_addr() as u32);
        w(&mut t, 0xa0, tq.used_addr() as u32);
        w(&mut t, 0x44, 1);
        w(&mut t, 0x70, 0xf);
        assert_eq!(r(&mut t, 0x70), 0xf);

        let head = tq.add_chain(&[(DATA, 32, WRITE)]);
        w(&mut t, NOTIFY_REG_OFFSET, 0);
        // The device's worker thread serves it.
        wait_until(10, || !tq.used().is_empty());
        assert_eq!(tq.used(), vec![(head.into(), 32)]);
        assert_eq!(r(&mut t, 0x60), 1, "used-buffer interrupt");
        assert_eq!(t.interrupt_evt().read().unwrap(), 1);
    }
}
