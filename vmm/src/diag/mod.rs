//! Diagnostics that never change what the guest sees: the boot trace
//! (`SKIFF_BOOT_TRACE`) and the state dumps of a stalled VM
//! (`SKIFF_STALL_DUMP`).

pub mod stall;
pub mod trace;
