//! What every virtio transport keeps the same way: feature negotiation, the
//! device status state machine (virtio 1.x, 3.1.1), the queue registers the
//! driver writes before DRIVER_OK, and activation and reset of the device.
//! virtio-mmio and virtio-pci differ only in how the driver reaches these
//! registers and in how the device interrupts, so each transport wraps one
//! `TransportState` and adds its own register map and interrupt.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FAILED as FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateError, ActivationContext, ActiveQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt,
    VirtioInterruptType, VIRTIO_F_VERSION_1,
};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("device offers queue {index} with invalid max size {size}")]
    QueueMaxSize { index: usize, size: u16 },
}

/// Which queue field a driver write targets. 64-bit addresses arrive as two
/// 32-bit halves on both transports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueField {
    Size,
    Ready,
    DescLow,
    DescHigh,
    DriverLow,
    DriverHigh,
    DeviceLow,
    DeviceHigh,
}

pub struct TransportState {
    /// Prefix for log lines: "virtio-mmio", "virtio-pci".
    name: &'static str,
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    /// What the driver wrote to the queue registers; validated into
    /// `Queue`s only at DRIVER_OK.
    pub queues: Vec<QueueState>,
    /// One eventfd per queue, kicked by the guest (through a KVM ioeventfd,
    /// or by the transport when the write reaches it).
    pub queue_evts: Vec<EventFd>,
    /// One call eventfd per queue, signalled by the device (or its backend)
    /// when it used buffers; the transport's interrupt delivers it.
    pub queue_calls: Vec<EventFd>,
    /// The call eventfd of configuration changes.
    pub config_call: EventFd,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    /// The status as the driver set it; see `status()` for what it reads.
    pub status: u32,
    /// Set by the device's worker (through the transport's interrupt) when
    /// the device needs a reset; shown as NEEDS_RESET until the reset.
    pub needs_reset: Arc<AtomicBool>,
}

impl TransportState {
    pub fn new(
        name: &'static str,
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<Self, TransportError> {
        let max_sizes = lock(&device).queue_max_sizes().to_vec();
        for (index, &size) in max_sizes.iter().enumerate() {
            Queue::new(size).map_err(|_| TransportError::QueueMaxSize { index, size })?;
        }
        let eventfd = || {
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(TransportError::EventFd)
        };
        let queue_evts = max_sizes.iter().map(|_| eventfd()).collect::<Result<_, _>>()?;
        let queue_calls = max_sizes.iter().map(|_| eventfd()).collect::<Result<_, _>>()?;
        Ok(TransportState {
            name,
            device,
            mem,
            queues: max_sizes.iter().map(|&m| initial_queue(m)).collect(),
            queue_evts,
            queue_calls,
            config_call: eventfd()?,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            needs_reset: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The device status register as the driver reads it.
    pub fn status(&self) -> u32 {
        if self.needs_reset.load(Ordering::SeqCst) {
            self.status | NEEDS_RESET
        } else {
            self.status
        }
    }

    pub fn device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        lock(&self.device)
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    pub fn selected_queue(&self) -> Option<&QueueState> {
        self.queues.get(self.queue_sel as usize)
    }

    /// The 32 feature bits the driver selected with `device_features_sel`.
    pub fn device_features_word(&self) -> u32 {
        match self.device_features_sel {
            0 => self.device().features() as u32,
            1 => (self.device().features() >> 32) as u32,
            _ => 0,
        }
    }

    /// Features are the driver's to write only between DRIVER and FEATURES_OK.
    pub fn write_driver_features_word(&mut self, v: u32) {
        if self.status & (DRIVER | FEATURES_OK | FAILED) != DRIVER {
            log::debug!("{}: driver features write in status {:#x}", self.name, self.status);
            return;
        }
        let v = u64::from(v);
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
            _ => {}
        }
    }

    /// Device config space is writable once the driver has found the device.
    pub fn config_writable(&self) -> bool {
        self.status & (DRIVER | FAILED) == DRIVER
    }

    /// Queue registers are writable between FEATURES_OK and DRIVER_OK.
    /// Values are stored as written and checked at DRIVER_OK.
    pub fn write_queue(&mut self, field: QueueField, v: u32) {
        if self.status & (FEATURES_OK | DRIVER_OK | FAILED) != FEATURES_OK {
            log::debug!("{}: queue write {field:?} in status {:#x}", self.name, self.status);
            return;
        }
        let name = self.name;
        let Some(q) = self.queues.get_mut(self.queue_sel as usize) else {
            log::debug!("{name}: queue write {field:?} for a missing queue");
            return;
        };
        let lo = |a: u64| (a & !0xffff_ffff) | u64::from(v);
        let hi = |a: u64| (a & 0xffff_ffff) | (u64::from(v) << 32);
        match field {
            // Out-of-range sizes show up as 0x10000-ish values; keep them
            // invalid rather than truncating them into valid ones.
            QueueField::Size => q.size = u16::try_from(v).unwrap_or(0),
            QueueField::Ready => q.ready = v == 1,
            QueueField::DescLow => q.desc_table = lo(q.desc_table),
            QueueField::DescHigh => q.desc_table = hi(q.desc_table),
            QueueField::DriverLow => q.avail_ring = lo(q.avail_ring),
            QueueField::DriverHigh => q.avail_ring = hi(q.avail_ring),
            QueueField::DeviceLow => q.used_ring = lo(q.used_ring),
            QueueField::DeviceHigh => q.used_ring = hi(q.used_ring),
        }
    }

    /// Duplicates of the call eventfds with the interrupt each stands for
    /// (queues in order, then the config change), for a `CallRelay`.
    pub fn calls(&self) -> std::io::Result<Vec<(VirtioInterruptType, EventFd)>> {
        let queues = self.queue_calls.iter().enumerate();
        let mut calls: Vec<_> = queues
            .map(|(i, c)| Ok((VirtioInterruptType::Queue(i as u16), c.try_clone()?)))
            .collect::<std::io::Result<_>>()?;
        calls.push((VirtioInterruptType::Config, self.config_call.try_clone()?));
        Ok(calls)
    }

    /// Signals queue `index`'s eventfd, for a notify write that reached the
    /// transport instead of a KVM ioeventfd.
    pub fn notify(&self, index: u32) {
        match self.queue_evts.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    crate::error_limited!("{}: cannot signal queue {index}: {e}", self.name);
                }
            }
            None => log::debug!("{}: notify for missing queue {index}", self.name),
        }
    }

    /// A driver write to the status register. Returns true when it was a
    /// reset (0) that the device accepted: the transport then clears its own
    /// registers too.
    pub fn set_status(&mut self, v: u32, interrupt: &Arc<dyn VirtioInterrupt>) -> bool {
        if v == 0 {
            return self.reset();
        }
        if v & FAILED != 0 {
            // The driver gave up; it must reset before trying again.
            self.status |= FAILED;
            return false;
        }
        if self.status() & (FAILED | NEEDS_RESET) != 0 {
            log::debug!("{}: status {v:#x} before a reset ignored", self.name);
            return false;
        }
        // NEEDS_RESET is the device's to set; unknown bits are dropped.
        let v = v & (ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        let in_order = [(DRIVER, ACKNOWLEDGE), (FEATURES_OK, DRIVER), (DRIVER_OK, FEATURES_OK)]
            .iter()
            .all(|&(bit, needs)| v & bit == 0 || v & needs != 0);
        if v & self.status != self.status || !in_order {
            crate::warn_limited!(
                "{}: invalid status transition {:#x} -> {v:#x}",
                self.name,
                self.status
            );
            return false;
        }
        let added = v & !self.status;
        if added & FEATURES_OK != 0 && !self.accept_features() {
            // The driver reads the status back and sees FEATURES_OK missing.
            self.status = v & !(FEATURES_OK | DRIVER_OK);
            return false;
        }
        self.status = v;
        if added & DRIVER_OK != 0 {
            if let Err(e) = self.activate(interrupt.clone()) {
                crate::error_limited!("{}: cannot activate device: {e}", self.name);
                self.status |= NEEDS_RESET;
                let _ = interrupt.trigger(VirtioInterruptType::Config);
            }
        }
        false
    }

    /// The driver may accept only offered features and must accept
    /// VERSION_1: skiff's transports have no legacy interface.
    fn accept_features(&mut self) -> bool {
        let mut dev = lock(&self.device);
        let offered = dev.features();
        let f = self.driver_features;
        if f & !offered != 0 || f & VIRTIO_F_VERSION_1 == 0 {
            crate::warn_limited!(
                "{}: driver features {f:#x} refused (offered {offered:#x})",
                self.name
            );
            return false;
        }
        dev.ack_features(f);
        true
    }

    fn activate(&mut self, interrupt: Arc<dyn VirtioInterrupt>) -> Result<(), ActivateError> {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::new();
        for (index, state) in self.queues.iter().enumerate().filter(|(_, s)| s.ready) {
            let mut q = Queue::try_from(*state)
                .map_err(|source| ActivateError::InvalidQueue { index, source })?;
            q.set_event_idx(event_idx);
            if !q.is_valid(&self.mem) {
                return Err(ActivateError::QueueOutsideMemory(index));
            }
            let kick = self.queue_evts[index].try_clone().map_err(ActivateError::EventFd)?;
            let call = self.queue_calls[index].try_clone().map_err(ActivateError::EventFd)?;
            queues.push(ActiveQueue { index, queue: q, kick, call });
        }
        lock(&self.device).activate(ActivationContext { mem: self.mem.clone(), queues, interrupt })
    }

    /// Returns false (and marks the transport FAILED) when the device
    /// cannot reset.
    fn reset(&mut self) -> bool {
        if self.status != 0 && !lock(&self.device).reset() {
            crate::error_limited!("{}: device cannot reset", self.name);
            self.status |= FAILED;
            return false;
        }
        for q in &mut self.queues {
            *q = initial_queue(q.max_size);
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.needs_reset.store(false, Ordering::SeqCst);
        // Kicks left in the eventfds only cause a spurious wakeup later;
        // calls from before the reset must not interrupt the next driver.
        for call in self.queue_calls.iter().chain([&self.config_call]) {
            let _ = call.read();
        }
        true
    }
}

/// `VirtioInterrupt::needs_reset` as both transports do it: the flag the
/// status register shows as NEEDS_RESET, then the config interrupt.
pub fn raise_needs_reset(flag: &AtomicBool, interrupt: &dyn VirtioInterrupt, name: &str) {
    flag.store(true, Ordering::SeqCst);
    if let Err(e) = interrupt.trigger(VirtioInterruptType::Config) {
        crate::error_limited!("{name}: cannot raise the config interrupt: {e}");
    }
}

fn initial_queue(max_size: u16) -> QueueState {
    QueueState { max_size, size: max_size, ..QueueState::default() }
}

/// Like the bus: a device that panicked is used as it was left.
fn lock(dev: &Mutex<dyn VirtioDevice>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}
