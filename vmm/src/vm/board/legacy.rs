//! COM1 on the console (the machine's other own devices, the CMOS RTC and
//! the ACPI GED, are kinds of the registry: `kinds::{rtc,ged}`), its
//! interrupt an irqfd on its ISA IRQ.

use std::sync::{Arc, Mutex};

use boot::layout::{COM1_IRQ, COM1_PORT};
use devices::legacy::{Serial, SerialInput};
use vmm_sys_util::eventfd::EventFd;

use super::{irq_line, Board, BoardContext};
use crate::vm::{io_err, Result};

pub(super) fn add(ctx: &BoardContext<'_>, board: &mut Board) -> Result<()> {
    let pio = ctx.pio;
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

    Ok(())
}
