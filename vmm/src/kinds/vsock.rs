//! `-device vhost-vsock-pci|vhost-vsock-device,guest-cid=N`: AF_VSOCK to
//! the guest through the host kernel's vhost_vsock; the CID is held from
//! start to exit, across guest reboots.

use std::sync::{Arc, Mutex};

use devices::vhost_kernel::vsock::{VhostVsock, VsockBackend};

use super::{Built, Bus, Device, Driver, HostSide, Kind, OpenContext, OpenError, RunContext};
use super::{Sandbox, Unresolved};
use crate::cli::{CliError, QemuOpts};

pub struct VsockKind;
pub static KIND: VsockKind = VsockKind;

impl Kind for VsockKind {
    fn name(&self) -> &'static str {
        "vhost-vsock"
    }
    fn drivers(&self) -> &'static [Driver] {
        &[
            Driver { name: "vhost-vsock-pci", bus: Bus::VirtioPci },
            Driver { name: "vhost-vsock-device", bus: Bus::VirtioMmio },
        ]
    }
    fn help(&self) -> &'static str {
        "\
-device vhost-vsock-device|vhost-vsock-pci,guest-cid=N[,addr=..][,bus=ID][,id=ID]
                         AF_VSOCK to the guest through the host kernel's
                         vhost_vsock (/dev/vhost-vsock); the CID is held
                         from start to exit, across guest reboots
"
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox { vhost: true, ..Sandbox::default() }
    }
    /// QEMU's limits (hw/virtio/vhost-vsock.c).
    fn parse(&self, opts: &mut QemuOpts, _: Bus) -> Result<Box<dyn Unresolved>, CliError> {
        let cid = opts.take_uint("guest-cid")?.ok_or_else(|| opts.missing("guest-cid"))?;
        if cid <= 2 {
            return Err(opts.error("guest-cid property must be greater than 2"));
        }
        let guest_cid = u32::try_from(cid)
            .map_err(|_| opts.error("guest-cid property must be a 32-bit number"))?;
        if opts.contains("vhostfd") {
            return Err(opts.error("vhostfd= is not supported (skiff opens /dev/vhost-vsock)"));
        }
        Ok(Box::new(Vsock { guest_cid }))
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Vsock {
    pub guest_cid: u32,
}

impl Device for Vsock {
    fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn HostSide>, OpenError> {
        let cid = self.guest_cid;
        let backend = VsockBackend::open(cid)
            .map_err(|e| OpenError::new(format!("-device {},guest-cid={cid}", ctx.driver), e))?;
        Ok(Box::new(Arc::new(backend)))
    }
    fn sandbox(&self) -> Sandbox {
        KIND.sandbox()
    }
}

impl HostSide for Arc<VsockBackend> {
    fn attach(&self, mem: &boot::GuestMemoryMmap) -> crate::vm::Result<()> {
        VsockBackend::attach(self, mem);
        Ok(())
    }
    fn detach(&self, _: &boot::GuestMemoryMmap) {
        VsockBackend::detach(self);
    }
    fn build(&self, _: &mut RunContext<'_>) -> crate::vm::Result<Built> {
        Ok(Built::Virtio(Arc::new(Mutex::new(VhostVsock::new(self.clone())))))
    }
}

#[cfg(test)]
mod tests {
    use crate::cli::tests_support::device;

    use super::*;

    #[test]
    fn guest_cid() {
        let (v, id) = device::<Vsock>("vhost-vsock-pci,guest-cid=3,id=v").unwrap();
        assert_eq!((v, id.as_deref()), (Vsock { guest_cid: 3 }, Some("v")));
        let (v, _) = device::<Vsock>("vhost-vsock-device,guest-cid=4294967295").unwrap();
        assert_eq!(v, Vsock { guest_cid: u32::MAX });
        let err = |arg: &str| device::<Vsock>(arg).unwrap_err();
        assert_eq!(err("vhost-vsock-pci"), "-device vhost-vsock-pci: missing property 'guest-cid'");
        assert!(err("vhost-vsock-pci,guest-cid=2").contains("greater than 2"));
        assert!(err("vhost-vsock-pci,guest-cid=4294967296").contains("32-bit"));
        assert!(err("vhost-vsock-pci,guest-cid=3,vhostfd=5").contains("vhostfd"));
    }
}
