//! Virtio devices and their transports.
//!
//! A device (`VirtioDevice`) knows its queues, features and config space but
//! nothing of how the guest reaches it. A transport (`mmio::MmioTransport`,
//! later virtio-pci) owns the registers, builds the queues the driver set up
//! and hands them over in an `ActivationContext` at DRIVER_OK, together with
//! the `VirtioInterrupt` the device raises when it has used buffers.

pub mod mmio;
pub mod rng;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod transport;

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use mmio::{MmioError, MmioTransport, MMIO_WINDOW_SIZE, NOTIFY_REG_OFFSET};
pub use rng::{RateLimit, Rng, RngError};

/// Guest memory as every device sees it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// The feature bit every modern (virtio 1.x) device offers and requires.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Why the guest is being interrupted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioInterruptType {
    /// The device configuration changed (or the device needs a reset).
    Config,
    /// The device added buffers to the used ring of this queue.
    Queue(u16),
}

/// How a device interrupts the guest. The transport implements it: virtio-mmio
/// latches a bit in InterruptStatus and pulses one line; virtio-pci will pick
/// an MSI-X vector per queue.
pub trait VirtioInterrupt: Send + Sync {
    fn trigger(&self, t: VirtioInterruptType) -> std::io::Result<()>;
}

/// Everything a device needs to run, handed over by the transport when the
/// driver sets DRIVER_OK.
pub struct ActivationContext {
    pub mem: GuestMemoryMmap,
    /// (queue index, queue, the eventfd the guest kicks for that queue). Only
    /// the queues the driver marked ready are present.
    pub queues: Vec<(usize, Queue, EventFd)>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
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
}

/// A virtio device, independent of the transport that exposes it.
pub trait VirtioDevice: Send {
    /// The virtio device ID (4 for entropy, 2 for block, ...).
    fn device_type(&self) -> u32;

    /// One entry per queue: the largest size the device accepts (a power of 2).
    fn queue_max_sizes(&self) -> &[u16];

    /// The features offered to the driver; includes `VIRTIO_F_VERSION_1`.
    fn features(&self) -> u64;

    /// The features the driver accepted: a subset of `features()`, already
    /// checked by the transport.
    fn ack_features(&mut self, features: u64);

    /// Reads the device-specific config space; `data` is zeroed beyond it.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific config space; ignored where read-only.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device with the queues the driver set up.
    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError>;

    /// Returns the device to its initial state, dropping its queues and
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

    use event_manager::{EventManager, SubscriberOps};

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
        let rng = Arc::new(Mutex::new(Rng::new(None).unwrap()));
        let mut t = MmioTransport::new(mem.clone(), rng.clone()).unwrap();
        let mut em = EventManager::<Arc<Mutex<Rng>>>::new().unwrap();
        em.add_subscriber(rng);

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
        em.run_with_timeout(0).unwrap();
        assert_eq!(tq.used(), vec![(head.into(), 32)]);
        assert_eq!(r(&mut t, 0x60), 1, "used-buffer interrupt");
        assert_eq!(t.interrupt_evt().read().unwrap(), 1);
    }
}
