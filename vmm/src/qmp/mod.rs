//! QMP, the QEMU Machine Protocol: the control socket microvm.nix (and
//! other QEMU tooling) uses to power a VM down, reset it, or send keys.

mod events;
pub(crate) mod protocol;
mod server;

pub use events::EventRelay;
pub(crate) use protocol::QEMU_VERSION;
pub use server::{emit_all, QmpHandler, QmpServer};
