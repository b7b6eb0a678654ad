//! Device models. A device answers reads and writes at an offset on a bus
//! (`bus::BusDevice`) and reaches the outside world only through what it is
//! handed: an interrupt (`vm_superio::Trigger`), an output stream, or a
//! `VmControl` for the few devices that can stop or reset the machine.

pub mod aml;
pub mod bus;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod legacy;
pub mod ratelimit;
pub mod threads;
pub mod vhost_kernel;
pub mod vhost_user;
pub mod virtio;

/// A request from a device to the VMM about the machine as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest asked for a reset (i8042 pulse, ACPI reset register).
    Reset,
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// isa-debug-exit: the process exits with this status.
    Exit(i32),
}

/// How a device tells the VMM that the machine must stop or reset.
///
/// Devices hold this instead of any VMM handle, so they stay testable alone.
pub trait VmControl: Send + Sync {
    fn request(&self, event: VmEvent);
}

pub use bus::{Bus, BusDevice, BusError};
