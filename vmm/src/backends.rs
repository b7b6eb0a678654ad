//! Host resources that belong to the process, not to one run of the guest.
//!
//! A guest reboot (without `-no-reboot`) is a new run: a new VM, new guest
//! RAM, new device models. What the host side holds must survive that: an
//! image's lock, an fd inherited from the parent (`fd=`), a vhost-user
//! connection (virtiofsd exits when its client disconnects), a VFIO
//! container, a rate limit that a reboot must not refill. So every
//! device's host side is opened here, once, before the first run (each
//! kind says how: `kinds`); each run's devices are built on them, `attach`
//! them to the run's guest memory (a vhost memory table, VFIO DMA maps) and
//! `detach` them before that memory is unmapped.

use crate::config::VmConfig;
use crate::kinds::{HostSide, OpenContext, OpenError};

/// The host side of every device, by `VmConfig::devices` index.
pub struct Backends {
    devices: Vec<Box<dyn HostSide>>,
}

impl Backends {
    /// Opens every device's host side, so a bad one fails before any guest
    /// runs.
    pub fn open(cfg: &VmConfig) -> Result<Self, OpenError> {
        let devices = cfg
            .devices
            .iter()
            .map(|d| d.device.open(&OpenContext { cfg, driver: d.driver, bus: d.bus }))
            .collect::<Result<_, _>>()?;
        Ok(Backends { devices })
    }

    /// Device `index`'s host side.
    pub fn device(&self, index: usize) -> Option<&dyn HostSide> {
        self.devices.get(index).map(|b| &**b)
    }

    pub fn attach(&self, mem: &boot::GuestMemoryMmap) -> crate::vm::Result<()> {
        self.devices.iter().try_for_each(|b| b.attach(mem))
    }

    pub fn detach(&self, mem: &boot::GuestMemoryMmap) {
        self.devices.iter().for_each(|b| b.detach(mem));
    }
}
