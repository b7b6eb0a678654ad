//! `-device vfio-pci,host=DDDD:BB:DD.F|sysfsdev=PATH[,rombar=N][,romfile=]
//! [,x-no-mmap=on]`: a host PCI function bound to vfio-pci, passed to the
//! guest (`pci::vfio` is the model, `host::vfio` the host side).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pci::vfio::{Gsis, HostLayout, VfioPciDevice};

use super::{Built, Bus, Device, Driver, HostSide, Kind, OpenContext, OpenError, RunContext};
use super::{Sandbox, Unresolved};
use crate::cli::{CliError, QemuOpts};
use crate::host::vfio::HostVfio;
use crate::vm::Error;

pub struct VfioKind;
pub static KIND: VfioKind = VfioKind;

/// QEMU's IGD and VGA switches: Intel IGD legacy mode is not there yet.
const IGD: &[&str] = &["x-igd-opregion", "x-igd-lpc", "x-igd-gms", "x-vga"];

impl Kind for VfioKind {
    fn name(&self) -> &'static str {
        "vfio-pci"
    }
    fn drivers(&self) -> &'static [Driver] {
        &[Driver { name: "vfio-pci", bus: Bus::Pci }]
    }
    fn help(&self) -> &'static str {
        "\
-device vfio-pci,host=[DDDD:]BB:DD.F|sysfsdev=PATH[,rombar=N][,romfile=][,x-no-mmap=on]
        [,addr=..][,bus=ID][,multifunction=on][,id=ID]
                         a host PCI function bound to vfio-pci, passed to the
                         guest (needs an IOMMU); guest RAM is DMA-mapped for
                         it; MSI, MSI-X and INTx through KVM; no option ROM
                         is exposed
"
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox { vfio: true, disk: true, ..Sandbox::default() }
    }
    fn parse(&self, opts: &mut QemuOpts, _: Bus) -> Result<Box<dyn Unresolved>, CliError> {
        if let Some(key) = IGD.iter().find(|k| opts.contains(k)) {
            return Err(opts.error(format!("{key} is not supported yet (Intel IGD legacy mode)")));
        }
        let sysfs = match (opts.take("host"), opts.take_path("sysfsdev")?) {
            (Some(host), None) => {
                let full =
                    if host.matches(':').count() == 1 { format!("0000:{host}") } else { host };
                if !host_wellformed(&full) {
                    return Err(opts.invalid_value("host", full, "DDDD:BB:DD.F or BB:DD.F"));
                }
                PathBuf::from("/sys/bus/pci/devices").join(full)
            }
            (None, Some(path)) => path,
            (Some(_), Some(_)) => return Err(opts.error("host= and sysfsdev= exclude each other")),
            (None, None) => return Err(opts.missing("host")),
        };
        // QEMU: an empty romfile= or rombar=0 means no ROM BAR.
        let rombar = opts.take_uint("rombar")?.unwrap_or(1);
        let romfile = opts.take("romfile");
        if romfile.as_deref().is_some_and(|f| !f.is_empty()) {
            return Err(opts.error("romfile=FILE is not supported (no firmware runs an option ROM; use romfile= or rombar=0)"));
        }
        let no_mmap = opts.take_bool("x-no-mmap")?.unwrap_or(false);
        Ok(Box::new(Passthrough { sysfs, rom: rombar != 0 && romfile.is_none(), no_mmap }))
    }
}

/// `DDDD:BB:DD.F`, hexadecimal.
fn host_wellformed(s: &str) -> bool {
    let hex = |p: &str, n: usize| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit());
    let mut parts = s.split(':');
    let (Some(d), Some(b), Some(df), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let Some((dev, func)) = df.split_once('.') else { return false };
    hex(d, 4) && hex(b, 2) && hex(dev, 2) && matches!(func.as_bytes(), [b'0'..=b'7'])
}

/// A host function and how the guest sees it.
#[derive(Debug, PartialEq, Eq)]
pub struct Passthrough {
    pub sysfs: PathBuf,
    /// The host's option ROM shown as a ROM BAR.
    pub rom: bool,
    /// `x-no-mmap=on`: every BAR access trapped.
    pub no_mmap: bool,
}

impl Device for Passthrough {
    /// Opens the function (and the process's container) once: a reboot
    /// keeps it.
    fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn HostSide>, OpenError> {
        let what = || match self.sysfs.strip_prefix("/sys/bus/pci/devices") {
            Ok(host) => format!("-device {},host={}", ctx.driver, host.display()),
            Err(_) => format!("-device {},sysfsdev={}", ctx.driver, self.sysfs.display()),
        };
        let dev = HostVfio::open(&self.sysfs).map_err(|e| OpenError::new(what(), e))?;
        let layout = HostLayout::probe(&dev, self.rom).map_err(|e| OpenError::new(what(), e))?;
        Ok(Box::new(Opened { dev: Arc::new(dev), layout, no_mmap: self.no_mmap }))
    }
    fn sandbox(&self) -> Sandbox {
        KIND.sandbox()
    }
    fn facts(&self) -> super::Facts {
        super::Facts { pins_guest_ram: true, ..Default::default() }
    }
}

struct Opened {
    dev: Arc<HostVfio>,
    layout: HostLayout,
    no_mmap: bool,
}

impl HostSide for Opened {
    fn attach(&self, mem: &boot::GuestMemoryMmap) -> crate::vm::Result<()> {
        self.dev
            .map_guest_memory(mem)
            .map_err(|e| Error::Internal(format!("vfio-pci: DMA-mapping guest RAM: {e}")))
    }

    /// Nothing: the mappings outlive the run, as the RAM does.
    fn detach(&self, _: &boot::GuestMemoryMmap) {}

    fn build(&self, run: &mut RunContext<'_>) -> crate::vm::Result<Built> {
        // The state the last run left (or the host's) goes.
        pci::vfio::VfioAccess::reset(&*self.dev);
        if let Some(group) = self.dev.group_fd() {
            (run.vfio_group)(group)?;
        }
        let allocate =
            |n: u32| (0..n).map(|_| (run.msi.allocate)()).collect::<crate::vm::Result<_>>();
        let gsis = Gsis {
            msix: allocate(self.layout.msix.map_or(0, |(_, m)| m.vectors.into()))?,
            msi: allocate(self.layout.msi.map_or(0, |m| m.vectors))?,
        };
        let (layout, router) = (&self.layout, run.msi.router.clone());
        let dev = VfioPciDevice::new(
            self.dev.clone(),
            layout,
            run.multifunction,
            self.no_mmap,
            gsis,
            router,
        )
        .map_err(|e| Error::Internal(format!("vfio-pci: {e}")))?;
        Ok(Built::Pci(Arc::new(Mutex::new(dev))))
    }
}

#[cfg(test)]
mod tests {
    use crate::cli::tests_support::device;

    use super::*;

    #[test]
    fn host_and_its_errors() {
        let (p, _) =
            device::<Passthrough>("vfio-pci,host=0000:01:00.0,multifunction=on,addr=2.0").unwrap();
        assert_eq!(p.sysfs, PathBuf::from("/sys/bus/pci/devices/0000:01:00.0"));
        assert!(p.rom && !p.no_mmap);
        let (p, _) = device::<Passthrough>("vfio-pci,host=01:00.1,romfile=,x-no-mmap=on").unwrap();
        assert_eq!(p.sysfs, PathBuf::from("/sys/bus/pci/devices/0000:01:00.1"));
        assert!(!p.rom && p.no_mmap);
        let (p, _) =
            device::<Passthrough>("vfio-pci,sysfsdev=/sys/bus/pci/devices/0000:00:02.0,rombar=0")
                .unwrap();
        assert!(!p.rom);
        let err = |arg: &str| device::<Passthrough>(arg).unwrap_err();
        assert_eq!(err("vfio-pci"), "-device vfio-pci: missing property 'host'");
        assert!(err("vfio-pci,host=1:0.0").contains("invalid value"));
        assert!(err("vfio-pci,host=0000:01:00.8").contains("invalid value"));
        assert!(err("vfio-pci,host=01:00.0,sysfsdev=/x").contains("exclude each other"));
        assert!(err("vfio-pci,host=01:00.0,romfile=/vbios.rom").contains("romfile=FILE"));
        assert!(err("vfio-pci,host=01:00.0,x-igd-opregion=on")
            .contains("x-igd-opregion is not supported yet"));
        assert!(err("vfio-pci,host=01:00.0,x-vga=on").contains("x-vga"));
        assert_eq!(
            err("vfio-pci,host=01:00.0,frob=1"),
            "-device vfio-pci: unknown property 'frob'"
        );
    }
}
