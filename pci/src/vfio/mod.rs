//! PCI passthrough through VFIO (`-device vfio-pci`): the host function
//! behind a small seam (`access::VfioAccess`: regions, interrupts, reset),
//! what it looks like (`layout`: identity, BARs, ROM, capabilities, the
//! parts of each BAR that can be mapped into the guest), and the function
//! as the guest sees it (`device`: config space virtualized, BAR accesses
//! forwarded, MSI-X emulated over the host's vectors).
//!
//! Work in progress (issue 25): MSI, INTx with resample, BAR slots that
//! follow decode and moves, reset, the ROM, and the real backend on
//! vfio-ioctls come next; `-device vfio-pci` is still refused.

pub mod access;
pub mod device;
pub mod layout;

pub use access::{IrqInfo, RegionInfo, VfioAccess};
pub use device::{DeviceError, VfioPciDevice};
pub use layout::{HostBar, HostLayout, LayoutError, MsiCap};
