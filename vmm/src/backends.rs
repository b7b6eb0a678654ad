//! Host resources that belong to the process, not to one run of the guest.
//!
//! A guest reboot (without `-no-reboot`) is a new run: a new VM, new guest
//! RAM, new device models. What the host side holds must survive that: an
//! image's lock, an fd inherited from the parent (`fd=`), a vhost-user
//! connection (virtiofsd exits when its client disconnects), a VFIO
//! container, a rate limit that a reboot must not refill. So they are
//! opened here, once, before the first run; each run's devices are built
//! on them, `attach` them to the run's guest memory (a vhost memory table,
//! VFIO DMA maps) and `detach` them before that memory is unmapped.

use std::sync::Arc;

use devices::virtio::{RngBackend, RngError};

use crate::config::{DeviceConfig, VirtioKind, VmConfig};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("-device {driver}")]
    Rng {
        driver: String,
        #[source]
        source: RngError,
    },
}

/// One device's host side.
pub enum DeviceBackend {
    Rng(Arc<RngBackend>),
}

impl DeviceBackend {
    /// Gives the backend the run's guest memory (vhost-user's memory table,
    /// VFIO's DMA maps). Nothing to do for the backends skiff has so far.
    fn attach(&self, _mem: &boot::GuestMemoryMmap) {
        match self {
            DeviceBackend::Rng(_) => {}
        }
    }

    /// Takes the run's guest memory back before it is unmapped.
    fn detach(&self) {
        match self {
            DeviceBackend::Rng(_) => {}
        }
    }
}

/// The host side of every device, by `VmConfig::devices` index.
pub struct Backends {
    devices: Vec<Option<DeviceBackend>>,
}

impl Backends {
    /// Opens every device's host side, so a bad one fails before any guest
    /// runs.
    pub fn open(cfg: &VmConfig) -> Result<Self, BackendError> {
        let devices = cfg
            .devices
            .iter()
            .map(|d| match d {
                DeviceConfig::Virtio(v) => match v.kind {
                    VirtioKind::Rng { max_bytes, period_ms } => {
                        let limit =
                            max_bytes.and_then(|m| devices::virtio::RateLimit::new(m, period_ms));
                        let rng = RngBackend::new(limit)
                            .map_err(|source| BackendError::Rng { driver: v.driver(), source })?;
                        Ok(Some(DeviceBackend::Rng(Arc::new(rng))))
                    }
                },
                _ => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        Ok(Backends { devices })
    }

    /// Device `index`'s host side.
    pub fn device(&self, index: usize) -> Option<&DeviceBackend> {
        self.devices.get(index)?.as_ref()
    }

    pub fn attach(&self, mem: &boot::GuestMemoryMmap) {
        self.devices.iter().flatten().for_each(|b| b.attach(mem));
    }

    pub fn detach(&self) {
        self.devices.iter().flatten().for_each(DeviceBackend::detach);
    }
}
