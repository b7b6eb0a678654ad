//! The machine's own platform devices: COM1, the CMOS RTC and the ACPI GED
//! (with the power button QMP presses), at their fixed ports and addresses
//! (`boot::layout`), each interrupt an irqfd on its ISA IRQ.

use std::sync::{Arc, Mutex};

use boot::layout::*;
use devices::legacy::GED_EVT_POWER_BUTTON;
use devices::legacy::{EventFdTrigger, Ged, Rtc, RtcTimer, Serial, SerialInput};
use vmm_sys_util::eventfd::EventFd;

use super::{irq_line, Board, BoardContext};
use crate::ctl::{Class, Command, CtlError, DeviceControl};
use crate::vm::{io_err, Result};

pub(super) fn add(ctx: &BoardContext<'_>, board: &mut Board) -> Result<()> {
    let (pio, mmio) = (ctx.pio, ctx.mmio);
    let irq = |gsi: u32| irq_line(ctx.vm, gsi);

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
        board.faces.offer(None, Arc::new(PowerButton(dev)));
    }
    Ok(())
}

/// The ACPI power button, on the GED's interrupt.
struct PowerButton(Arc<Mutex<Ged<EventFdTrigger>>>);

impl DeviceControl for PowerButton {
    fn classes(&self) -> &'static [Class] {
        &[Class::PowerButton]
    }

    fn command(&self, _: &Command) -> std::result::Result<(), CtlError> {
        let mut ged = self.0.lock().unwrap_or_else(|e| e.into_inner());
        ged.notify(GED_EVT_POWER_BUTTON)
            .map_err(|e| CtlError::Failed(format!("cannot raise the GED interrupt: {e}")))
    }
}
