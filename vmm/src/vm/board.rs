//! The devices of one VM run: created from the configuration, put on the
//! port and MMIO buses, wired to KVM (irqfd, ioeventfd). One block per
//! device kind; the event loop and QMP reach the few they need through
//! `Devices`.

use std::sync::{Arc, Mutex};

use boot::layout::*;
use boot::GuestMemoryMmap;
use devices::legacy::{DebugExit, EventFdTrigger, Ged, Rtc, Serial, I8042};
use devices::virtio::{
    MmioTransport, RateLimit, Rng, VirtioDevice, MMIO_WINDOW_SIZE, NOTIFY_REG_OFFSET,
};
use devices::{Bus, BusDevice};
use event_manager::MutEventSubscriber;
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::{io_err, kvm_err, Error, Platform, Result};
use crate::config::{DeviceConfig, VmConfig};
use crate::console::ConsoleTarget;
use crate::control::Control;

/// The UART, its "input FIFO drained" eventfd, and whether stdin feeds it.
pub(super) type SerialHandle = (Arc<Mutex<Serial<EventFdTrigger>>>, EventFd, bool);

pub(super) struct Devices {
    pub serial: Option<SerialHandle>,
    /// Writes the UART's output; finished when the run ends.
    pub console: Option<crate::console_writer::ConsoleWriter>,
    pub rtc: Option<(Arc<Mutex<Rtc<EventFdTrigger>>>, EventFd)>,
    pub ged: Option<Arc<Mutex<Ged<EventFdTrigger>>>>,
    pub i8042: Option<Arc<Mutex<I8042<EventFdTrigger>>>>,
    /// virtio-mmio transports as (base, size, GSI), for ACPI or the cmdline.
    pub virtio_mmio: Vec<(u64, u32, u32)>,
    /// Virtio devices: they process their queues on the event loop.
    pub virtio: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
}

/// Ports whose first write marks a boot milestone in the trace.
pub(super) fn watched_ports(
    cfg: &VmConfig,
    devices: &Devices,
) -> Vec<(u16, crate::trace::Milestone)> {
    use crate::trace::Milestone;
    let mut ports = vec![(0x80, Milestone::FirstPostPort)];
    if devices.serial.is_some() {
        ports.push((COM1_PORT, Milestone::FirstSerialByte));
    }
    for d in &cfg.devices {
        if let DeviceConfig::IsaDebugExit { iobase, .. } = d {
            ports.push((*iobase, Milestone::DebugExit));
        }
    }
    ports
}

pub(super) struct Buses<'a> {
    pub pio: &'a Bus,
    pub mmio: &'a Bus,
}

/// ISA IRQs free for virtio-mmio without ACPI: a kernel without MP-table
/// support reaches only the 8259's lines (QEMU microvm starts at 5 too).
const VIRTIO_MMIO_ISA_IRQS: [u32; 6] = [5, 6, 7, 10, 11, 12];
/// With ACPI, virtio-mmio lines are the IOAPIC's upper pins (QEMU uses a
/// second IOAPIC from GSI 24; KVM's in-kernel one has 24 pins).
const VIRTIO_MMIO_GSI_BASE: u32 = 16;
const VIRTIO_MMIO_MAX: usize = 8;

#[allow(clippy::too_many_arguments)]
pub(super) fn add_devices(
    cfg: &VmConfig,
    platform: &Platform,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    control: &Arc<Control>,
    console: &ConsoleTarget,
    first_run: bool,
    bus: Buses<'_>,
) -> Result<Devices> {
    let Buses { pio, mmio } = bus;
    let irq = |gsi: u32| -> Result<EventFdTrigger> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        vm.register_irqfd(&evt, gsi).map_err(kvm_err("KVM_IRQFD"))?;
        Ok(EventFdTrigger::new(evt))
    };

    let mut serial = None;
    let mut console_writer = None;
    let mut i8042 = None;
    let mut ged = None;
    let mut virtio_mmio = Vec::new();
    let mut virtio: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>> = Vec::new();
    if let Some(backend) = console.open(first_run)? {
        let ready = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        let ready2 = ready.try_clone().map_err(io_err("eventfd"))?;
        let out: Box<dyn std::io::Write + Send> = match backend.output {
            Some(file) => {
                let (sink, writer) =
                    crate::console_writer::spawn(file).map_err(io_err("console thread"))?;
                console_writer = Some(writer);
                Box::new(sink)
            }
            None => Box::new(std::io::sink()),
        };
        let dev = Arc::new(Mutex::new(Serial::new(irq(COM1_IRQ)?, out, ready2)));
        pio.insert(dev.clone(), u64::from(COM1_PORT), 8)?;
        serial = Some((dev, ready, backend.stdin_input));
    }

    for d in &cfg.devices {
        match d {
            DeviceConfig::I8042 => {
                let dev = Arc::new(Mutex::new(I8042::new(irq(I8042_IRQ)?, control.clone())));
                let bus_dev: Arc<Mutex<dyn BusDevice>> = dev.clone();
                pio.insert(bus_dev.clone(), u64::from(I8042_PORT), 1)?;
                pio.insert_at_offset(bus_dev, u64::from(I8042_PORT) + 4, 1, 4)?;
                i8042 = Some(dev);
            }
            DeviceConfig::IsaDebugExit { iobase, iosize } => {
                let dev = Arc::new(Mutex::new(DebugExit::new(control.clone())));
                pio.insert(dev, u64::from(*iobase), u64::from(*iosize))?;
            }
            // Put on the root complex by `pcie::add_pcie`.
            DeviceConfig::Pci(_) => {}
            DeviceConfig::VirtioRngMmio { max_bytes, period_ms } => {
                let slot = virtio_mmio.len();
                // With PCIe, GSIs 16-19 are the root complex's INTx lines.
                let (first, max) = if platform.pcie {
                    (VIRTIO_MMIO_GSI_BASE + 4, VIRTIO_MMIO_MAX - 4)
                } else {
                    (VIRTIO_MMIO_GSI_BASE, VIRTIO_MMIO_MAX)
                };
                let gsi = if platform.acpi {
                    (slot < max).then(|| first + slot as u32)
                } else {
                    VIRTIO_MMIO_ISA_IRQS.get(slot).copied()
                }
                .ok_or(Error::TooManyVirtioMmio)?;
                let limit = max_bytes.and_then(|m| RateLimit::new(m, *period_ms));
                let rng = Arc::new(Mutex::new(Rng::new(limit).map_err(Error::VirtioRng)?));
                let base = VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_SLOT_SIZE;
                add_virtio_mmio(vm, mem, mmio, rng.clone(), base, gsi)?;
                virtio_mmio.push((base, MMIO_WINDOW_SIZE as u32, gsi));
                virtio.push(rng);
            }
        }
    }

    let mut rtc = None;
    if platform.rtc {
        let rearm = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        let rearm2 = rearm.try_clone().map_err(io_err("eventfd"))?;
        let dev = Arc::new(Mutex::new(Rtc::new(irq(RTC_IRQ)?, Some(rearm2))));
        pio.insert(dev.clone(), u64::from(RTC_PORT), 2)?;
        rtc = Some((dev, rearm));
    }

    if platform.acpi {
        let dev = Arc::new(Mutex::new(Ged::new(irq(GED_IRQ)?, control.clone())));
        mmio.insert(dev.clone(), GED_MMIO_BASE, GED_MMIO_SIZE)?;
        ged = Some(dev);
    }
    Ok(Devices { serial, console: console_writer, rtc, ged, i8042, virtio_mmio, virtio })
}

/// A virtio device behind a virtio-mmio window: queue notifications go to
/// eventfds inside KVM (ioeventfd, no exit to skiff), the interrupt is an
/// irqfd on `gsi`.
fn add_virtio_mmio(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &Bus,
    device: Arc<Mutex<dyn VirtioDevice>>,
    base: u64,
    gsi: u32,
) -> Result<()> {
    let transport = MmioTransport::new(mem.clone(), device).map_err(Error::VirtioMmio)?;
    for (queue, evt) in transport.queue_evts().iter().enumerate() {
        let addr = IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET);
        vm.register_ioevent(evt, &addr, queue as u32).map_err(kvm_err("KVM_IOEVENTFD"))?;
    }
    vm.register_irqfd(transport.interrupt_evt(), gsi).map_err(kvm_err("KVM_IRQFD"))?;
    mmio.insert(Arc::new(Mutex::new(transport)), base, MMIO_WINDOW_SIZE)?;
    Ok(())
}
