//! Legacy PC devices: the ones a microvm guest finds at fixed ports and
//! addresses rather than by enumeration.

mod debug_exit;
pub mod fw_cfg;
pub mod ged;
pub mod i8042;
pub mod rtc;
pub mod serial;

pub use debug_exit::DebugExit;
pub use fw_cfg::{FwCfg, FwCfgItems};
pub use ged::{Ged, GED_EVT_POWER_BUTTON};
pub use i8042::I8042;
pub use rtc::{Rtc, RtcTimer};
pub use serial::{Serial, SerialInput};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// An edge-triggered interrupt line backed by an eventfd that the VMM wires
/// to a GSI with KVM's irqfd, so raising it never leaves the kernel.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(evt: EventFd) -> Self {
        EventFdTrigger(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Reads a little-endian value of `data.len()` bytes (1..=8).
fn le_value(data: &[u8]) -> u64 {
    data.iter().rev().fold(0, |acc, &b| (acc << 8) | u64::from(b))
}

#[cfg(test)]
pub(crate) mod test_utils {
    use crate::{VmControl, VmEvent};
    use std::cell::Cell;
    use std::sync::Mutex;
    use vm_superio::Trigger;

    /// Counts how often an interrupt was raised.
    #[derive(Default)]
    pub struct CountingTrigger(pub Cell<u32>);

    impl Trigger for CountingTrigger {
        type E = ();
        fn trigger(&self) -> Result<(), ()> {
            self.0.set(self.0.get() + 1);
            Ok(())
        }
    }

    /// Records what the device asked of the VMM.
    #[derive(Default)]
    pub struct RecordingControl(pub Mutex<Vec<VmEvent>>);

    impl VmControl for RecordingControl {
        fn request(&self, event: VmEvent) {
            self.0.lock().unwrap().push(event);
        }
    }
}
