//! The ACPI Generic Event Device (the machine adds it with ACPI, as QEMU
//! microvm does): its interrupt carries the power button QMP presses, its
//! registers the guest's sleep and reset requests.

use std::sync::{Arc, Mutex};

use boot::layout::{GED_IRQ, GED_MMIO_BASE, GED_MMIO_SIZE};
use devices::legacy::{EventFdTrigger, Ged, GED_EVT_POWER_BUTTON};

use super::{Built, Bus, Device, Driver, HostSide, MachineOnly, Nothing, OpenContext};
use super::{OpenError, RunContext, Sandbox};
use crate::ctl::{Answer, Class, Command, CtlError, DeviceControl};

pub static KIND: MachineOnly = MachineOnly {
    drivers: &[Driver { name: "acpi-ged", bus: Bus::Fixed }],
    device: || Box::new(Events),
};

#[derive(Debug, PartialEq, Eq)]
pub struct Events;

impl Device for Events {
    fn open(&self, _: &OpenContext<'_>) -> Result<Box<dyn HostSide>, OpenError> {
        Ok(Box::new(Nothing(build)))
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox::default()
    }
    fn aml(&self) -> Vec<u8> {
        devices::legacy::ged::aml(GED_MMIO_BASE, GED_IRQ)
    }
}

fn build(run: &mut RunContext<'_>) -> crate::vm::Result<Built> {
    let dev = Arc::new(Mutex::new(Ged::new((run.irq)(GED_IRQ)?, run.control.clone())));
    run.mmio.insert(dev.clone(), GED_MMIO_BASE, GED_MMIO_SIZE)?;
    run.faces.offer(Arc::new(PowerButton(dev)));
    Ok(Built::Placed)
}

/// The ACPI power button, on the GED's interrupt.
struct PowerButton(Arc<Mutex<Ged<EventFdTrigger>>>);

impl DeviceControl for PowerButton {
    fn classes(&self) -> &'static [Class] {
        &[Class::PowerButton]
    }

    fn command(&self, _: &Command) -> Result<Answer, CtlError> {
        let mut ged = self.0.lock().unwrap_or_else(|e| e.into_inner());
        ged.notify(GED_EVT_POWER_BUTTON)
            .map(|()| Answer::Done)
            .map_err(|e| CtlError::Failed(format!("cannot raise the GED interrupt: {e}")))
    }
}
