//! PCI passthrough through VFIO (`-device vfio-pci`): the host function
//! behind a small seam (`access::VfioAccess`: regions, interrupts, reset),
//! what it looks like (`layout`: identity, BARs, ROM, capabilities, the
//! parts of each BAR that can be mapped into the guest), and the function
//! as the guest sees it (`device`: config space virtualized, BAR accesses
//! forwarded, MSI and MSI-X emulated over the host's vectors, INTx through
//! eventfds). The host side on vfio-ioctls is the VMM's (`vmm::host::vfio`),
//! and so is mapping the BARs' mappable parts into the guest.

pub mod access;
pub mod device;
pub mod layout;

pub use access::{IrqInfo, RegionInfo, VfioAccess};
pub use device::{DeviceError, Gsis, VfioPciDevice};
pub use layout::{HostBar, HostLayout, LayoutError};
