//! The virtio-mmio transport, version 2 ("modern"), as QEMU's microvm
//! exposes it: a 0x200-byte window of 32-bit registers, then config space.
//!
//! The VMM wires three things per transport:
//! - the window on the MMIO bus (`MMIO_WINDOW_SIZE` bytes at some base);
//! - one KVM ioeventfd per queue at base + `NOTIFY_REG_OFFSET`, 4 bytes,
//!   datamatch = queue index, signalling `queue_evts()[index]` (without
//!   them, a QueueNotify write reaches `write` and signals the same eventfd);
//! - a KVM irqfd binding `interrupt_evt()` to the device's GSI;
//! - `call_relay()` on the event loop, for backends outside skiff that
//!   signal the queues' call eventfds instead of calling `trigger`.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use vmm_sys_util::eventfd::EventFd;

use acpi_tables::{aml, Aml};

use super::notifier::{CallRelay, RelayTarget};
use super::transport::{raise_needs_reset, QueueField, TransportError, TransportState};
use super::{GuestMemoryMmap, VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use crate::aml::name;
use crate::BusDevice;

/// Registers (0x000-0x0ff) and device config space (0x100-0x1ff).
pub const MMIO_WINDOW_SIZE: u64 = 0x200;
/// Where the guest writes a queue index to kick that queue.
pub const NOTIFY_REG_OFFSET: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x554d_4551; // "QEMU", as QEMU reports it

const MAGIC_VALUE: u64 = 0x00;
const VERSION_REG: u64 = 0x04;
const DEVICE_ID: u64 = 0x08;
const VENDOR_ID_REG: u64 = 0x0c;
const DEVICE_FEATURES: u64 = 0x10;
const DEVICE_FEATURES_SEL: u64 = 0x14;
const DRIVER_FEATURES: u64 = 0x20;
const DRIVER_FEATURES_SEL: u64 = 0x24;
const QUEUE_SEL: u64 = 0x30;
const QUEUE_NUM_MAX: u64 = 0x34;
const QUEUE_NUM: u64 = 0x38;
const QUEUE_READY: u64 = 0x44;
const INTERRUPT_STATUS: u64 = 0x60;
const INTERRUPT_ACK: u64 = 0x64;
const STATUS: u64 = 0x70;
const QUEUE_DESC_LOW: u64 = 0x80;
const QUEUE_DESC_HIGH: u64 = 0x84;
const QUEUE_DRIVER_LOW: u64 = 0x90;
const QUEUE_DRIVER_HIGH: u64 = 0x94;
const QUEUE_DEVICE_LOW: u64 = 0xa0;
const QUEUE_DEVICE_HIGH: u64 = 0xa4;
const SHM_LEN_LOW: u64 = 0xb0;
const SHM_BASE_HIGH: u64 = 0xbc;
const CONFIG_GENERATION: u64 = 0xfc;
const CONFIG: u64 = 0x100;

/// The transport's interrupt, shared with the device: the InterruptStatus
/// word the guest reads and acks, and the line (an eventfd the VMM binds to
/// the GSI with irqfd).
struct MmioInterrupt {
    status: AtomicU32,
    evt: EventFd,
    /// The transport's NEEDS_RESET flag.
    needs_reset: Arc<AtomicBool>,
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, t: VirtioInterruptType) -> std::io::Result<()> {
        let bit = match t {
            VirtioInterruptType::Config => VIRTIO_MMIO_INT_CONFIG,
            VirtioInterruptType::Queue(_) => VIRTIO_MMIO_INT_VRING,
        };
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.evt.write(1)
    }

    fn needs_reset(&self) {
        raise_needs_reset(&self.needs_reset, self, "virtio-mmio");
    }
}

impl RelayTarget for MmioInterrupt {
    /// A call eventfd is always skiff's to deliver on virtio-mmio.
    fn relay(&self, source: VirtioInterruptType, call: &EventFd) {
        if call.read().is_ok() {
            if let Err(e) = self.trigger(source) {
                crate::error_limited!("virtio-mmio: cannot raise the interrupt: {e}");
            }
        }
    }
}

pub type MmioError = TransportError;

pub struct MmioTransport {
    state: TransportState,
    interrupt: Arc<MmioInterrupt>,
}

impl MmioTransport {
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<Self, MmioError> {
        let state = TransportState::new("virtio-mmio", mem, device)?;
        let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(TransportError::EventFd)?;
        let needs_reset = state.needs_reset.clone();
        let interrupt = Arc::new(MmioInterrupt { status: AtomicU32::new(0), evt, needs_reset });
        Ok(MmioTransport { state, interrupt })
    }

    /// One eventfd per queue, for KVM ioeventfds at base + NOTIFY_REG_OFFSET
    /// with datamatch = the index in this slice.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.state.queue_evts
    }

    /// The interrupt line, for a KVM irqfd on the device's GSI.
    pub fn interrupt_evt(&self) -> &EventFd {
        &self.interrupt.evt
    }

    /// Turns the call eventfds into InterruptStatus bits and the line, on
    /// the event loop.
    pub fn call_relay(&self) -> std::io::Result<CallRelay> {
        Ok(CallRelay::new(self.state.calls()?, self.interrupt.clone()))
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let s = &self.state;
        match offset {
            MAGIC_VALUE => MAGIC,
            VERSION_REG => VERSION,
            DEVICE_ID => s.device().device_type(),
            VENDOR_ID_REG => VENDOR_ID,
            DEVICE_FEATURES => s.device_features_word(),
            QUEUE_NUM_MAX => s.selected_queue().map_or(0, |q| q.max_size.into()),
            QUEUE_READY => s.selected_queue().map_or(0, |q| q.ready.into()),
            INTERRUPT_STATUS => self.interrupt.status.load(Ordering::SeqCst),
            STATUS => s.status(),
            // No shared memory regions: length and base read as all ones.
            SHM_LEN_LOW..=SHM_BASE_HIGH => u32::MAX,
            // Config space never changes under the driver.
            CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let s = &mut self.state;
        let queue_field = match offset {
            QUEUE_NUM => Some(QueueField::Size),
            QUEUE_READY => Some(QueueField::Ready),
            QUEUE_DESC_LOW => Some(QueueField::DescLow),
            QUEUE_DESC_HIGH => Some(QueueField::DescHigh),
            QUEUE_DRIVER_LOW => Some(QueueField::DriverLow),
            QUEUE_DRIVER_HIGH => Some(QueueField::DriverHigh),
            QUEUE_DEVICE_LOW => Some(QueueField::DeviceLow),
            QUEUE_DEVICE_HIGH => Some(QueueField::DeviceHigh),
            _ => None,
        };
        if let Some(field) = queue_field {
            return s.write_queue(field, v);
        }
        match offset {
            DEVICE_FEATURES_SEL => s.device_features_sel = v,
            DRIVER_FEATURES => s.write_driver_features_word(v),
            DRIVER_FEATURES_SEL => s.driver_features_sel = v,
            QUEUE_SEL => s.queue_sel = v,
            NOTIFY_REG_OFFSET => s.notify(v),
            INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!v, Ordering::SeqCst);
            }
            STATUS => {
                let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
                if s.set_status(v, &interrupt) {
                    self.interrupt.status.store(0, Ordering::SeqCst);
                }
            }
            _ => log::debug!("virtio-mmio: write {v:#x} to {offset:#x} ignored"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            self.state.device().read_config(offset - CONFIG, data);
        } else if data.len() == 4 && offset & 3 == 0 {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            log::debug!("virtio-mmio: {}-byte read at {offset:#x} ignored", data.len());
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            if self.state.config_writable() {
                self.state.device().write_config(offset - CONFIG, data);
            } else {
                log::debug!("virtio-mmio: config write in status {:#x} ignored", self.state.status);
            }
        } else if let (Ok(bytes), 0) = (<[u8; 4]>::try_from(data), offset & 3) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        } else {
            log::debug!("virtio-mmio: {}-byte write at {offset:#x} ignored", data.len());
        }
    }
}

/// Devices are named `VR00`..`VR99` in the DSDT.
pub const MAX_AML_DEVICES: usize = 100;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AmlError {
    #[error("too many virtio-mmio devices: {0} (at most {MAX_AML_DEVICES})")]
    TooMany(usize),
    #[error("virtio-mmio window {base:#x}+{size:#x} does not fit below 4 GiB")]
    Above4G { base: u64, size: u32 },
}

/// One virtio-mmio transport, as QEMU's `virtio_acpi_dsdt_add`.
pub fn aml(index: usize, base: u64, gsi: u32) -> Result<Vec<u8>, AmlError> {
    let mut out = Vec::new();
    let size = MMIO_WINDOW_SIZE as u32;
    let base32 = match base.checked_add(u64::from(size)) {
        Some(end) if end <= 1 << 32 => base as u32,
        _ => return Err(AmlError::Above4G { base, size }),
    };
    if index >= MAX_AML_DEVICES {
        return Err(AmlError::TooMany(index + 1));
    }
    let dev_name = format!("VR{index:02}");
    aml::Device::new(
        dev_name.as_str().into(),
        vec![
            &name("_HID", &"LNRO0005"),
            &name("_UID", &(index as u64)),
            &name("_CCA", &1u8),
            &name(
                "_CRS",
                &aml::ResourceTemplate::new(vec![
                    &aml::Memory32Fixed::new(true, base32, size),
                    // Edge-triggered, active high, exclusive. QEMU says level;
                    // skiff raises the line as an irqfd pulse, and a level
                    // line would need a resample eventfd (an exit per IRQ)
                    // to not lose a pulse that lands before the guest's EOI.
                    &aml::Interrupt::new(true, true, false, false, gsi),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut out);
    Ok(out)
}

#[cfg(any(test, feature = "fuzzing"))]
#[cfg_attr(not(test), allow(dead_code, unused_imports))]
pub(crate) mod tests {
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE as ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as DRIVER,
        VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FAILED as FAILED,
        VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
    };
    use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    use virtio_queue::QueueT;

    use super::*;
    use crate::virtio::test_utils::{guest_mem, logged_lines};
    use crate::virtio::{read_config_from, ActivateError, ActivationContext, VIRTIO_F_VERSION_1};

    const MEM: usize = 0x10_0000;
    const FEATURE_A: u64 = 1 << 5;
    const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
    const OFFERED: u64 = VIRTIO_F_VERSION_1 | EVENT_IDX | FEATURE_A;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    /// (index, size, desc, avail, used, event_idx) of each queue handed over.
    type QueueInfo = (usize, u16, u64, u64, u64, bool);

    #[derive(Default)]
    struct Fake {
        acked: Option<u64>,
        queues: Option<Vec<QueueInfo>>,
        interrupt: Option<Arc<dyn VirtioInterrupt>>,
        resets: u32,
        cannot_reset: bool,
        config: [u8; 8],
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            4
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            OFFERED
        }
        fn ack_features(&mut self, features: u64) {
            self.acked = Some(features);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_from(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let end = (offset as usize).saturating_add(data.len());
            if let Some(slot) = self.config.get_mut(offset as usize..end) {
                slot.copy_from_slice(data);
            }
        }
        fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
            if self.queues.is_some() {
                return Err(ActivateError::AlreadyActive);
            }
            let info = ctx.queues.iter().map(|a| {
                let q = &a.queue;
                (
                    a.index,
                    q.size(),
                    q.desc_table(),
                    q.avail_ring(),
                    q.used_ring(),
                    q.event_idx_enabled(),
                )
            });
            self.queues = Some(info.collect());
            self.interrupt = Some(ctx.interrupt);
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resets += 1;
            self.queues = None;
            self.interrupt = None;
            !self.cannot_reset
        }
    }

    fn setup() -> (Arc<Mutex<Fake>>, MmioTransport) {
        let dev = Arc::new(Mutex::new(Fake::default()));
        let t = MmioTransport::new(guest_mem(MEM), dev.clone()).unwrap();
        (dev, t)
    }

    fn r(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn w(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    /// ACKNOWLEDGE, DRIVER, driver features, FEATURES_OK; returns the status
    /// read back.
    fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
        w(t, STATUS, ACKNOWLEDGE);
        w(t, STATUS, ACKNOWLEDGE | DRIVER);
        w(t, DRIVER_FEATURES_SEL, 1);
        w(t, DRIVER_FEATURES, (features >> 32) as u32);
        w(t, DRIVER_FEATURES_SEL, 0);
        w(t, DRIVER_FEATURES, features as u32);
        w(t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        r(t, STATUS)
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, desc: u64) {
        w(t, QUEUE_SEL, index);
        w(t, QUEUE_NUM, size);
        for (lo, addr) in
            [(QUEUE_DESC_LOW, desc), (QUEUE_DRIVER_LOW, AVAIL), (QUEUE_DEVICE_LOW, USED)]
        {
            w(t, lo, addr as u32);
            w(t, lo + 4, (addr >> 32) as u32);
        }
        w(t, QUEUE_READY, 1);
    }

    fn driver_ok(t: &mut MmioTransport) -> u32 {
        w(t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        r(t, STATUS)
    }

    /// Sets queue 0 up with `size` and `desc` and returns the final status.
    fn init_with(t: &mut MmioTransport, size: u32, desc: u64) -> u32 {
        assert_eq!(negotiate(t, VIRTIO_F_VERSION_1), 0xb);
        setup_queue(t, 0, size, desc);
        driver_ok(t)
    }

    /// Fuzz target: the transport's registers as a hostile driver uses
    /// them: any offset (registers, config space, past both), any width,
    /// values at the edges, in any order; half the inputs first bring the
    /// device up properly (so queue and status writes meet an active
    /// device), with queue addresses anywhere, in memory or not.
    #[cfg(test)]
    #[test]
    fn fuzz_virtio_mmio_registers() {
        skiff_tests::fuzz::run("virtio-mmio-registers", 20_000, fuzz_registers);
    }

    /// One input of `fuzz_virtio_mmio_registers` (also a libFuzzer target: `fuzz/`).
    pub(crate) fn fuzz_registers(rng: &mut skiff_tests::fuzz::Rng) {
        let regs = [
            MAGIC_VALUE,
            DEVICE_FEATURES,
            DEVICE_FEATURES_SEL,
            DRIVER_FEATURES,
            DRIVER_FEATURES_SEL,
            QUEUE_SEL,
            QUEUE_NUM,
            QUEUE_READY,
            0x50, // QueueNotify
            INTERRUPT_ACK,
            STATUS,
            QUEUE_DESC_LOW,
            QUEUE_DESC_LOW + 4,
            QUEUE_DRIVER_LOW,
            QUEUE_DRIVER_LOW + 4,
            QUEUE_DEVICE_LOW,
            QUEUE_DEVICE_LOW + 4,
            0x100,
            0x104,
            0x1fc,
        ];
        let statuses = [
            0,
            ACKNOWLEDGE,
            ACKNOWLEDGE | DRIVER,
            ACKNOWLEDGE | DRIVER | FEATURES_OK,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
            0x40,
            0x80,
            0xff,
        ];
        let (_, mut t) = setup();
        if rng.one_in(2) {
            let size = *rng.pick(&[0u32, 1, 2, 3, 8, 16, 17, 256]);
            let desc = if rng.one_in(2) { DESC } else { rng.interesting() };
            let _ = negotiate(&mut t, VIRTIO_F_VERSION_1 | rng.interesting());
            setup_queue(&mut t, rng.below(3) as u32, size, desc);
            let _ = driver_ok(&mut t);
        }
        for _ in 0..rng.below(40) {
            let offset = match rng.below(4) {
                0 => rng.below(0x300),
                1 => rng.interesting(),
                _ => *rng.pick(&regs) + rng.below(4) * u64::from(rng.one_in(4)),
            };
            let len = *rng.pick(&[1usize, 2, 3, 4, 4, 4, 8]);
            if rng.one_in(3) {
                let mut data = [0u8; 8];
                t.read(offset, &mut data[..len]);
            } else {
                let value = if offset == STATUS && rng.one_in(2) {
                    u64::from(*rng.pick(&statuses))
                } else {
                    rng.interesting()
                };
                t.write(offset, &value.to_le_bytes()[..len]);
            }
        }
    }

    /// A driver that writes an invalid status a million times: the
    /// operator hears of it, at most once a second, not a million times.
    #[test]
    fn a_million_invalid_status_writes_log_a_handful_of_lines() {
        let is_ours = |l: &&String| l.contains("invalid status transition");
        let before = logged_lines().iter().filter(is_ours).count();
        let (_, mut t) = setup();
        let started = std::time::Instant::now();
        for _ in 0..1_000_000 {
            // DRIVER without ACKNOWLEDGE.
            w(&mut t, STATUS, DRIVER);
        }
        let secs = started.elapsed().as_secs() as usize;
        let lines = logged_lines().iter().filter(is_ours).count() - before;
        assert!((1..=secs + 2).contains(&lines), "{lines} lines in {secs} s");
        assert_eq!(r(&mut t, STATUS), 0, "and none of them was taken");
    }

    /// Nothing skiff starts (a helper, a bridge script) inherits the
    /// queues' eventfds.
    #[test]
    fn the_transports_eventfds_are_close_on_exec() {
        let (_, t) = setup();
        let s = &t.state;
        let fds =
            s.queue_evts.iter().chain(&s.queue_calls).chain([&s.config_call, &t.interrupt.evt]);
        for e in fds {
            // SAFETY: F_GETFD on an eventfd this test owns.
            let flags = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(e), libc::F_GETFD) };
            assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        }
    }

    #[test]
    fn identifies_itself() {
        let (_, mut t) = setup();
        assert_eq!(r(&mut t, MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&mut t, VERSION_REG), 2);
        assert_eq!(r(&mut t, DEVICE_ID), 4);
        assert_eq!(r(&mut t, VENDOR_ID_REG), 0x554d_4551);
        assert_eq!(r(&mut t, DEVICE_FEATURES), OFFERED as u32);
        w(&mut t, DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        w(&mut t, DEVICE_FEATURES_SEL, 2);
        assert_eq!(r(&mut t, DEVICE_FEATURES), 0);
        assert_eq!(r(&mut t, QUEUE_NUM_MAX), 16);
        w(&mut t, QUEUE_SEL, 2);
        assert_eq!(r(&mut t, QUEUE_NUM_MAX), 0, "no queue 2");
        assert_eq!(r(&mut t, SHM_LEN_LOW), u32::MAX);
        assert_eq!(r(&mut t, STATUS), 0);
    }

    #[test]
    fn driver_init_activates_the_ready_queues() {
        let (dev, mut t) = setup();
        assert_eq!(negotiate(&mut t, VIRTIO_F_VERSION_1 | EVENT_IDX), 0xb);
        assert_eq!(dev.lock().unwrap().acked, Some(VIRTIO_F_VERSION_1 | EVENT_IDX));
        setup_queue(&mut t, 0, 8, DESC);
        assert_eq!(r(&mut t, QUEUE_READY), 1);
        assert!(dev.lock().unwrap().queues.is_none());
        assert_eq!(driver_ok(&mut t), 0xf);
        // Queue 1 was never made ready, so it is not handed over.
        assert_eq!(dev.lock().unwrap().queues, Some(vec![(0, 8, DESC, AVAIL, USED, true)]));
        // Queue registers are frozen once the device runs.
        w(&mut t, QUEUE_READY, 0);
        assert_eq!(r(&mut t, QUEUE_READY), 1);
    }

    #[test]
    fn refuses_features_it_cannot_accept() {
        for features in [FEATURE_A, VIRTIO_F_VERSION_1 | 1 << 40] {
            let (dev, mut t) = setup();
            assert_eq!(negotiate(&mut t, features), 0x3, "FEATURES_OK not set");
            assert_eq!(driver_ok(&mut t), 0x3);
            assert_eq!(dev.lock().unwrap().acked, None);
            assert!(dev.lock().unwrap().queues.is_none());
        }
    }

    #[test]
    fn status_follows_the_init_sequence() {
        let (_, mut t) = setup();
        w(&mut t, STATUS, DRIVER);
        assert_eq!(r(&mut t, STATUS), 0, "DRIVER needs ACKNOWLEDGE");
        w(&mut t, STATUS, ACKNOWLEDGE | DRIVER_OK);
        assert_eq!(r(&mut t, STATUS), 0, "DRIVER_OK needs FEATURES_OK");
        w(&mut t, STATUS, ACKNOWLEDGE | DRIVER);
        w(&mut t, STATUS, ACKNOWLEDGE);
        assert_eq!(r(&mut t, STATUS), 0x3, "bits cannot be cleared");
        // Queues cannot be set up before FEATURES_OK.
        w(&mut t, QUEUE_READY, 1);
        assert_eq!(r(&mut t, QUEUE_READY), 0);
    }

    #[test]
    fn failed_holds_until_reset() {
        let (dev, mut t) = setup();
        w(&mut t, STATUS, ACKNOWLEDGE | DRIVER);
        w(&mut t, STATUS, ACKNOWLEDGE | DRIVER | FAILED);
        assert_eq!(r(&mut t, STATUS), 0x83);
        w(&mut t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(r(&mut t, STATUS), 0x83);
        w(&mut t, STATUS, 0);
        assert_eq!(r(&mut t, STATUS), 0);
        assert_eq!(init_with(&mut t, 16, DESC), 0xf);
        assert!(dev.lock().unwrap().queues.is_some());
    }

    #[test]
    fn notify_signals_the_queue_eventfd() {
        let (_, mut t) = setup();
        w(&mut t, NOTIFY_REG_OFFSET, 1);
        w(&mut t, NOTIFY_REG_OFFSET, 7);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
        assert!(t.queue_evts()[0].read().is_err(), "queue 0 was not kicked");
    }

    #[test]
    fn interrupt_status_and_ack() {
        let (dev, mut t) = setup();
        assert_eq!(init_with(&mut t, 16, DESC), 0xf);
        let irq = dev.lock().unwrap().interrupt.clone().unwrap();
        irq.trigger(VirtioInterruptType::Queue(0)).unwrap();
        assert_eq!(r(&mut t, INTERRUPT_STATUS), 1);
        assert_eq!(t.interrupt_evt().read().unwrap(), 1);
        irq.trigger(VirtioInterruptType::Config).unwrap();
        assert_eq!(r(&mut t, INTERRUPT_STATUS), 3);
        w(&mut t, INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, INTERRUPT_STATUS), 2);
        w(&mut t, INTERRUPT_ACK, 2);
        assert_eq!(r(&mut t, INTERRUPT_STATUS), 0);
    }

    /// A backend outside skiff signals a queue's call eventfd: the relay on
    /// the event loop latches the queue bit and pulses the line, once.
    #[test]
    fn a_call_eventfd_sets_the_interrupt_status_and_pulses_the_line() {
        use event_manager::{EventManager, SubscriberOps};

        let (_, mut t) = setup();
        assert_eq!(init_with(&mut t, 16, DESC), 0xf);
        let mut em = EventManager::<CallRelay>::new().unwrap();
        em.add_subscriber(t.call_relay().unwrap());
        assert_eq!(em.run_with_timeout(0).unwrap(), 0, "nothing signalled yet");
        t.state.queue_calls[0].write(1).unwrap();
        t.state.queue_calls[0].write(1).unwrap();
        assert_eq!(em.run_with_timeout(0).unwrap(), 1);
        assert_eq!(r(&mut t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        assert_eq!(t.interrupt_evt().read().unwrap(), 1, "one pulse");
        assert!(t.state.queue_calls[0].read().is_err(), "consumed");
        w(&mut t, INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        t.state.config_call.write(1).unwrap();
        assert_eq!(em.run_with_timeout(0).unwrap(), 1);
        assert_eq!(r(&mut t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(t.interrupt_evt().read().unwrap(), 1);
    }

    /// A device that gave up (its worker found a broken ring) shows
    /// NEEDS_RESET with a config interrupt until the driver resets it.
    #[test]
    fn needs_reset_shows_until_the_reset() {
        let (dev, mut t) = setup();
        assert_eq!(init_with(&mut t, 16, DESC), 0xf);
        dev.lock().unwrap().interrupt.clone().unwrap().needs_reset();
        assert_eq!(r(&mut t, STATUS), 0xf | NEEDS_RESET);
        assert_eq!(r(&mut t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(t.interrupt_evt().read().unwrap(), 1);
        w(&mut t, STATUS, 0);
        assert_eq!(r(&mut t, STATUS), 0);
        assert_eq!(init_with(&mut t, 16, DESC), 0xf);
    }

    #[test]
    fn status_zero_resets_device_and_queues() {
        let (dev, mut t) = setup();
        assert_eq!(init_with(&mut t, 16, DESC), 0xf);
        dev.lock()
            .unwrap()
            .interrupt
            .clone()
            .unwrap()
            .trigger(VirtioInterruptType::Queue(0))
            .unwrap();
        w(&mut t, STATUS, 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert!(dev.lock().unwrap().queues.is_none());
        assert_eq!(r(&mut t, STATUS), 0);
        assert_eq!(r(&mut t, INTERRUPT_STATUS), 0);
        assert_eq!(r(&mut t, QUEUE_READY), 0);
        // A second driver starts from scratch.
        assert_eq!(init_with(&mut t, 16, DESC), 0xf);
        assert_eq!(dev.lock().unwrap().queues, Some(vec![(0, 16, DESC, AVAIL, USED, false)]));
    }

    #[test]
    fn device_that_cannot_reset_is_failed() {
        let (dev, mut t) = setup();
        assert_eq!(init_with(&mut t, 16, DESC), 0xf);
        dev.lock().unwrap().cannot_reset = true;
        w(&mut t, STATUS, 0);
        assert_eq!(r(&mut t, STATUS) & FAILED, FAILED);
    }

    #[test]
    fn bad_queues_need_reset() {
        // Not a power of two, above the max, zero, beyond 16 bits,
        // misaligned, outside guest memory.
        let cases =
            [(3, DESC), (32, DESC), (0, DESC), (0x1_0010, DESC), (16, DESC + 1), (16, 1 << 40)];
        for (size, desc) in cases {
            let (dev, mut t) = setup();
            assert_eq!(
                init_with(&mut t, size, desc),
                0xf | NEEDS_RESET,
                "size {size} desc {desc:#x}"
            );
            assert!(dev.lock().unwrap().queues.is_none());
            assert_eq!(r(&mut t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
            assert_eq!(t.interrupt_evt().read().unwrap(), 1);
            // Nothing but a reset gets it going again.
            w(&mut t, STATUS, 0);
            assert_eq!(init_with(&mut t, 16, DESC), 0xf);
            assert!(dev.lock().unwrap().queues.is_some());
        }
    }

    #[test]
    fn config_space_at_any_width() {
        let (dev, mut t) = setup();
        dev.lock().unwrap().config = [1, 2, 3, 4, 5, 6, 7, 8];
        let mut b1 = [0u8; 1];
        t.read(CONFIG + 1, &mut b1);
        assert_eq!(b1, [2]);
        let mut b2 = [0u8; 2];
        t.read(CONFIG + 2, &mut b2);
        assert_eq!(b2, [3, 4]);
        let mut b8 = [0u8; 8];
        t.read(CONFIG, &mut b8);
        assert_eq!(b8, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(r(&mut t, CONFIG + 0x10), 0, "past the device's config");

        t.write(CONFIG, &[9]);
        assert_eq!(dev.lock().unwrap().config[0], 1, "no writes before DRIVER");
        w(&mut t, STATUS, ACKNOWLEDGE);
        w(&mut t, STATUS, ACKNOWLEDGE | DRIVER);
        t.write(CONFIG + 6, &[9, 9]);
        assert_eq!(dev.lock().unwrap().config, [1, 2, 3, 4, 5, 6, 9, 9]);
    }

    #[test]
    fn registers_are_32_bit_only() {
        let (_, mut t) = setup();
        let mut b2 = [0xffu8; 2];
        t.read(MAGIC_VALUE, &mut b2);
        assert_eq!(b2, [0, 0]);
        assert_eq!(r(&mut t, MAGIC_VALUE + 2), 0, "misaligned");
        t.write(STATUS, &[ACKNOWLEDGE as u8]);
        assert_eq!(r(&mut t, STATUS), 0);
        w(&mut t, 0xf0, 1);
        assert_eq!(r(&mut t, 0xf0), 0);
    }
}
