//! `-device virtio-rng-pci|virtio-rng-device[,max-bytes=N][,period=MS]`:
//! entropy from the host's getrandom, with QEMU's rate limit.

use std::sync::{Arc, Mutex};

use devices::virtio::{RateLimit, Rng, RngBackend};

use super::{Built, Bus, Device, Driver, HostSide, Kind, OpenContext, OpenError, RunContext};
use super::{Sandbox, Unresolved};
use crate::cli::{CliError, QemuOpts};

pub struct RngKind;
pub static KIND: RngKind = RngKind;

impl Kind for RngKind {
    fn name(&self) -> &'static str {
        // Its workers announce themselves by it (the sandbox's key).
        devices::virtio::rng::FAMILY
    }
    fn drivers(&self) -> &'static [Driver] {
        &[
            Driver { name: "virtio-rng-pci", bus: Bus::VirtioPci },
            Driver { name: "virtio-rng-device", bus: Bus::VirtioMmio },
        ]
    }
    fn help(&self) -> &'static str {
        "\
-device virtio-rng-device[,max-bytes=N,period=MS][,id=ID]
                         entropy on virtio-mmio (0xfeb00000 + 512 * n)
-device virtio-rng-pci[,addr=SLOT[.FN]][,bus=ID][,multifunction=on|off]
                      [,max-bytes=N,period=MS][,disable-legacy=on][,id=ID]
                         entropy on PCIe (not on -M microvm,pcie=off); MSI-X
"
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox::default()
    }
    fn parse(&self, opts: &mut QemuOpts, _: Bus) -> Result<Box<dyn Unresolved>, CliError> {
        let max_bytes = opts.take_uint("max-bytes")?;
        if max_bytes.is_some_and(|m| m > i64::MAX as u64) {
            // QEMU's virtio_rng_device_realize.
            return Err(
                opts.error("'max-bytes' parameter must be non-negative, and less than 2^63")
            );
        }
        let period_ms = opts.take_uint("period")?;
        if period_ms == Some(0) {
            return Err(opts.error("period must be at least 1 ms"));
        }
        // QEMU takes the entropy source from an rng object; only the default
        // (the host's getrandom) exists here.
        if opts.contains("rng") {
            return Err(
                opts.error("rng= is not supported (entropy comes from the host's getrandom)")
            );
        }
        Ok(Box::new(Entropy { max_bytes, period_ms }))
    }
}

/// QEMU's rate limit of `max_bytes` per `period_ms` milliseconds when
/// `max_bytes` is given.
#[derive(Debug, PartialEq, Eq)]
pub struct Entropy {
    pub max_bytes: Option<u64>,
    pub period_ms: Option<u64>,
}

impl Device for Entropy {
    fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn HostSide>, OpenError> {
        // One limiter for the process: a reboot must not refill it.
        let limit = self.max_bytes.and_then(|m| RateLimit::new(m, self.period_ms));
        let backend = RngBackend::new(limit)
            .map_err(|e| OpenError::new(format!("-device {}", ctx.driver), e))?;
        Ok(Box::new(Arc::new(backend)))
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox::default()
    }
}

impl HostSide for Arc<RngBackend> {
    fn build(&self, _: &mut RunContext<'_>) -> crate::vm::Result<Built> {
        Ok(Built::Virtio(Arc::new(Mutex::new(Rng::new(self.clone())))))
    }
}
