//! Everything between "guest RAM exists" and "vCPU 0 may run": the memory
//! map, kernel and initrd loading, boot parameters, firmware tables (ACPI or
//! MP), and the initial vCPU state. Nothing here touches a device.

pub mod acpi;
pub mod cpu;
pub mod layout;
pub mod linux;
pub mod mptable;
pub mod reset_vector;
pub mod smbios;

pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
