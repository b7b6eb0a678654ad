//! QMP, the QEMU Machine Protocol: the control socket microvm.nix (and
//! other QEMU tooling) uses to power a VM down, reset it, or send keys.

pub(crate) mod protocol;
mod server;

pub use server::{QmpHandler, QmpServer};
