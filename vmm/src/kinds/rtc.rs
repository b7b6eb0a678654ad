//! The CMOS RTC at ports 0x70/0x71, ISA IRQ 8 (`-M microvm,rtc=on`): the
//! machine adds it (`plan::machine_devices`), as QEMU microvm does.

use std::sync::{Arc, Mutex};

use boot::layout::{RTC_IRQ, RTC_PORT};
use devices::legacy::{Rtc, RtcTimer};
use vmm_sys_util::eventfd::EventFd;

use super::{Built, Bus, Device, Driver, HostSide, MachineOnly, Nothing, OpenContext};
use super::{OpenError, RunContext, Sandbox};
use crate::vm::io_err;

pub static KIND: MachineOnly = MachineOnly {
    drivers: &[Driver { name: "mc146818rtc", bus: Bus::Fixed }],
    device: || Box::new(Cmos),
};

#[derive(Debug, PartialEq, Eq)]
pub struct Cmos;

impl Device for Cmos {
    fn open(&self, _: &OpenContext<'_>) -> Result<Box<dyn HostSide>, OpenError> {
        Ok(Box::new(Nothing(build)))
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox::default()
    }
    fn aml(&self) -> Vec<u8> {
        devices::legacy::rtc::aml(RTC_PORT, RTC_IRQ)
    }
}

/// The clock, and its timer on the event loop (the update and alarm
/// interrupts).
fn build(run: &mut RunContext<'_>) -> crate::vm::Result<Built> {
    let rearm = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(io_err("eventfd"))?;
    let rearm2 = rearm.try_clone().map_err(io_err("eventfd"))?;
    let dev = Arc::new(Mutex::new(Rtc::new((run.irq)(RTC_IRQ)?, Some(rearm2))));
    run.pio.insert(dev.clone(), u64::from(RTC_PORT), 2)?;
    let timer = RtcTimer::new(dev, rearm).map_err(io_err("timerfd"))?;
    run.subscribers.push(Arc::new(Mutex::new(timer)));
    Ok(Built::Placed)
}
