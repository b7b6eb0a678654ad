//! The ISA and ACPI platform devices: COM1, the i8042, isa-debug-exit, the
//! CMOS RTC and the ACPI GED, at their fixed ports and addresses
//! (`boot::layout`), each interrupt an irqfd on its ISA IRQ.

use std::sync::{Arc, Mutex};

use boot::layout::*;
use devices::legacy::{DebugExit, EventFdTrigger, Ged, Rtc, RtcTimer, Serial, SerialInput, I8042};
use devices::BusDevice;
use vmm_sys_util::eventfd::EventFd;

use super::{Board, BoardContext};
use crate::config::DeviceConfig;
use crate::vm::{io_err, kvm_err, Result};

pub(super) fn add(ctx: &BoardContext<'_>, board: &mut Board) -> Result<()> {
    let (pio, mmio) = (ctx.pio, ctx.mmio);
    let irq = |gsi: u32| -> Result<EventFdTrigger> {
        let evt =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(io_err("eventfd"))?;
        ctx.vm.register_irqfd(&evt, gsi).map_err(kvm_err("KVM_IRQFD"))?;
        Ok(EventFdTrigger::new(evt))
    };

    if let Some(backend) =
        ctx.console.map(crate::host::console::SerialBackend::try_clone).transpose()?
    {
        let ready =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(io_err("eventfd"))?;
        let ready2 = ready.try_clone().map_err(io_err("eventfd"))?;
        let out: Box<dyn std::io::Write + Send> = match backend.output {
            Some(file) => {
                let (sink, writer) =
                    crate::host::console_writer::spawn(file).map_err(io_err("console thread"))?;
                board.console = Some(writer);
                Box::new(sink)
            }
            None => Box::new(std::io::sink()),
        };
        let dev = Arc::new(Mutex::new(Serial::new(irq(COM1_IRQ)?, out, ready2)));
        pio.insert(dev.clone(), u64::from(COM1_PORT), 8)?;
        board.serial = true;
        if backend.stdin_input {
            let input = SerialInput::new(dev, ready).map_err(io_err("duplicating stdin"))?;
            board.subscribers.push(Arc::new(Mutex::new(input)));
        }
    }

    for d in &ctx.cfg.devices {
        match d {
            DeviceConfig::I8042 => {
                let dev = Arc::new(Mutex::new(I8042::new(irq(I8042_IRQ)?, ctx.control.clone())));
                let bus_dev: Arc<Mutex<dyn BusDevice>> = dev.clone();
                pio.insert(bus_dev.clone(), u64::from(I8042_PORT), 1)?;
                pio.insert_at_offset(bus_dev, u64::from(I8042_PORT) + 4, 1, 4)?;
                board.i8042 = Some(dev);
            }
            DeviceConfig::IsaDebugExit { iobase, iosize } => {
                let dev = Arc::new(Mutex::new(DebugExit::new(ctx.control.clone())));
                pio.insert(dev, u64::from(*iobase), u64::from(*iosize))?;
            }
            DeviceConfig::RootPort(_) | DeviceConfig::Virtio(_) => {}
        }
    }

    if ctx.plan.platform.rtc {
        let rearm =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(io_err("eventfd"))?;
        let rearm2 = rearm.try_clone().map_err(io_err("eventfd"))?;
        let dev = Arc::new(Mutex::new(Rtc::new(irq(RTC_IRQ)?, Some(rearm2))));
        pio.insert(dev.clone(), u64::from(RTC_PORT), 2)?;
        let timer = RtcTimer::new(dev, rearm).map_err(io_err("timerfd"))?;
        board.subscribers.push(Arc::new(Mutex::new(timer)));
    }

    if ctx.plan.platform.acpi {
        let dev = Arc::new(Mutex::new(Ged::new(irq(GED_IRQ)?, ctx.control.clone())));
        mmio.insert(dev.clone(), GED_MMIO_BASE, GED_MMIO_SIZE)?;
        board.ged = Some(dev);
    }
    Ok(())
}
