//! `-device virtio-9p-pci|virtio-9p-device,fsdev=ID,mount_tag=TAG`: a
//! 9P2000.L share of a `-fsdev local` directory, served by skiff on a
//! worker thread (crosvm's p9 server, vendored and patched).

use std::sync::{Arc, Mutex};

use devices::virtio::p9::{P9Backend, ShareParams, P9};

use super::{Built, Bus, Device, Driver, HostSide, Kind, OpenContext, OpenError, Refs};
use super::{RunContext, Sandbox, Unresolved};
use crate::cli::{CliError, QemuOpts};
use crate::config::FsdevConfig;

pub struct P9Kind;
pub static KIND: P9Kind = P9Kind;

impl Kind for P9Kind {
    fn name(&self) -> &'static str {
        // Its workers announce themselves by it (the sandbox's key).
        devices::virtio::p9::FAMILY
    }
    fn drivers(&self) -> &'static [Driver] {
        &[
            Driver { name: "virtio-9p-pci", bus: Bus::VirtioPci },
            Driver { name: "virtio-9p-device", bus: Bus::VirtioMmio },
        ]
    }
    fn help(&self) -> &'static str {
        "\
-device virtio-9p-device|virtio-9p-pci,fsdev=ID,mount_tag=TAG[,addr=..][,bus=ID][,id=ID]
                         a 9P2000.L share of -fsdev ID, served by skiff on
                         a worker thread; the guest cannot reach outside
                         the directory (no '..', '/' in names, symlinks
                         are never followed by skiff)
-fsdev local,id=ID,path=DIR,security_model=MODEL[,readonly=on|off]
                         the directory a virtio-9p shares; readonly=on
                         refuses every change with EROFS; MODEL:
                         passthrough applies the guest's chown, none ignores
                         a chown the host refuses, mapped-xattr keeps the
                         guest's owners and modes in user.virtfs.* xattrs
                         (mapped-file is not supported)
-virtfs local,path=DIR,mount_tag=TAG,security_model=..[,readonly=on][,id=ID]
                         both at once: the -fsdev (id= or the tag) and its
                         virtio-9p (PCIe with pcie=on, else virtio-mmio)
"
    }
    fn sandbox(&self) -> Sandbox {
        // Lookups and changes under the share's descriptors, and reads and
        // writes of the files it opened.
        Sandbox { share_files: true, disk: true, ..Sandbox::default() }
    }
    fn parse(&self, opts: &mut QemuOpts, _: Bus) -> Result<Box<dyn Unresolved>, CliError> {
        let fsdev = opts.take("fsdev").ok_or_else(|| opts.missing("fsdev"))?;
        let mount_tag = opts.take("mount_tag").ok_or_else(|| opts.missing("mount_tag"))?;
        crate::cli::check_tag(opts, &mount_tag)?;
        Ok(Box::new(Pending { fsdev, mount_tag }))
    }
}

#[derive(Debug)]
struct Pending {
    fsdev: String,
    mount_tag: String,
}

impl Unresolved for Pending {
    /// Each device has its own `-fsdev` (and server: fids are per
    /// connection).
    fn resolve(
        self: Box<Self>,
        option: &str,
        refs: &mut Refs,
    ) -> Result<Box<dyn Device>, CliError> {
        let fsdev = refs.take(option, &self.fsdev)?;
        Ok(Box::new(NineP { fsdev, mount_tag: self.mount_tag }))
    }
}

/// A 9p share of its `-fsdev`.
#[derive(Debug, PartialEq, Eq)]
pub struct NineP {
    pub fsdev: Arc<FsdevConfig>,
    pub mount_tag: String,
}

impl Device for NineP {
    /// The share's directory is opened here, before the sandbox.
    fn open(&self, _: &OpenContext<'_>) -> Result<Box<dyn HostSide>, OpenError> {
        let fsdev = &self.fsdev;
        let params = ShareParams {
            tag: self.mount_tag.clone(),
            readonly: fsdev.readonly,
            security: fsdev.security,
        };
        let server = P9Backend::open(&fsdev.path, &params)
            .map_err(|e| OpenError::new(format!("-fsdev id={}", fsdev.id), e))?;
        Ok(Box::new(Opened { server: Arc::new(server), params }))
    }
    fn sandbox(&self) -> Sandbox {
        KIND.sandbox()
    }
}

struct Opened {
    server: Arc<P9Backend>,
    params: ShareParams,
}

impl HostSide for Opened {
    fn build(&self, _: &mut RunContext<'_>) -> crate::vm::Result<Built> {
        Ok(Built::Virtio(Arc::new(Mutex::new(P9::new(self.server.clone(), self.params.clone())))))
    }
}
