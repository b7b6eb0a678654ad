//! `-device i8042`: the PS/2 controller at ports 0x60/0x64, ISA IRQ 1. Its
//! reset line reboots the guest; QMP's key events reach the guest through
//! it (the keyboard face).

use std::sync::{Arc, Mutex};

use boot::layout::{I8042_IRQ, I8042_PORT};
use devices::legacy::{EventFdTrigger, I8042};
use devices::BusDevice;

use super::{Built, Bus, Device, Driver, Facts, HostSide, Kind, Nothing, OpenContext, OpenError};
use super::{RunContext, Sandbox, Unresolved};
use crate::cli::{CliError, QemuOpts};
use crate::ctl::{keys, Answer, Class, Command, CtlError, DeviceControl};

pub struct I8042Kind;
pub static KIND: I8042Kind = I8042Kind;

impl Kind for I8042Kind {
    fn name(&self) -> &'static str {
        "i8042"
    }
    fn drivers(&self) -> &'static [Driver] {
        &[Driver { name: "i8042", bus: Bus::Fixed }]
    }
    fn help(&self) -> &'static str {
        "-device i8042[,id=ID]    PS/2 controller (i8042 reset reboots the guest)\n"
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox::default()
    }
    fn max(&self) -> Option<usize> {
        Some(1)
    }
    fn parse(&self, _: &mut QemuOpts, _: Bus) -> Result<Box<dyn Unresolved>, CliError> {
        // QEMU's i8042 properties (kbd-throttle, ...) are not modelled.
        Ok(Box::new(Ps2))
    }
}

/// The controller; it has no properties.
#[derive(Debug, PartialEq, Eq)]
pub struct Ps2;

impl Device for Ps2 {
    fn open(&self, _: &OpenContext<'_>) -> Result<Box<dyn HostSide>, OpenError> {
        Ok(Box::new(Nothing(build)))
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox::default()
    }
    fn facts(&self) -> Facts {
        Facts { i8042: true, ..Facts::default() }
    }
    fn aml(&self) -> Vec<u8> {
        devices::legacy::i8042::aml(I8042_PORT, I8042_IRQ)
    }
}

fn build(run: &mut RunContext<'_>) -> crate::vm::Result<Built> {
    let dev = Arc::new(Mutex::new(I8042::new((run.irq)(I8042_IRQ)?, run.control.clone())));
    let bus_dev: Arc<Mutex<dyn BusDevice>> = dev.clone();
    run.pio.insert(bus_dev.clone(), u64::from(I8042_PORT), 1)?;
    run.pio.insert_at_offset(bus_dev, u64::from(I8042_PORT) + 4, 1, 4)?;
    run.faces.offer(Arc::new(Keyboard(dev)));
    Ok(Built::Placed)
}

/// Key events as the scan codes a PS/2 keyboard sends, in the set the
/// guest asked for.
struct Keyboard(Arc<Mutex<I8042<EventFdTrigger>>>);

impl DeviceControl for Keyboard {
    fn classes(&self) -> &'static [Class] {
        &[Class::Keyboard]
    }

    fn command(&self, cmd: &Command) -> Result<Answer, CtlError> {
        let Command::Keys(events) = cmd else {
            return Err(CtlError::Failed("the i8042 takes only key events".into()));
        };
        let mut kbd = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for ev in events {
            let translated = kbd.translating();
            if let Some(bytes) = keys::scancode(&ev.qcode, ev.down, translated) {
                kbd.push_keyboard_bytes(&bytes);
            }
        }
        Ok(Answer::Done)
    }
}
