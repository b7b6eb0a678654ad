//! The host side of VFIO passthrough: one container per process (every
//! passed-through device's group joins it, so guest RAM is DMA-mapped once
//! for all of them), and `HostVfio`, a host PCI function bound to vfio-pci
//! behind `pci::vfio::VfioAccess`. Opening explains what to do when the
//! host is not set up: the device missing, bound to another driver, its
//! group not viable or not accessible.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use pci::vfio::access::{CONFIG_REGION, REGION_MMAP};
use pci::vfio::{IrqInfo, RegionInfo, VfioAccess};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioError, VfioRegionInfoCap};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no host PCI device {0}")]
    NoDevice(PathBuf),
    #[error(
        "{dev} is bound to {driver}, not vfio-pci: as root, \
         echo vfio-pci > {sysfs}/driver_override; echo {dev} > {sysfs}/driver/unbind; \
         echo {dev} > /sys/bus/pci/drivers_probe"
    )]
    WrongDriver { dev: String, driver: String, sysfs: String },
    #[error(
        "{dev} has no driver: as root, echo vfio-pci > {sysfs}/driver_override; \
         echo {dev} > /sys/bus/pci/drivers_probe"
    )]
    NoDriver { dev: String, sysfs: String },
    #[error("{0} has no IOMMU group: the host needs an IOMMU (intel_iommu=on or amd_iommu=on)")]
    NoGroup(String),
    #[error(
        "IOMMU group {group} is not viable: every device in it must be bound to vfio-pci \
         (or to no driver): {members}"
    )]
    NotViable { group: String, members: String },
    #[error("cannot open /dev/vfio/{group} (IOMMU group of {dev}): {source}")]
    Group {
        group: String,
        dev: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VFIO")]
    Vfio(#[source] VfioError),
    #[error("cannot duplicate the device's descriptor")]
    Dup(#[source] std::io::Error),
}

/// The process's container and the guest RAM DMA-mapped in it, once for
/// every device whose group joined.
struct Container {
    vfio: Arc<VfioContainer>,
    /// (guest-physical, length, host address) of each RAM region mapped.
    mapped: Mutex<Vec<(u64, u64, u64)>>,
}

/// The process's container, made by the first device opened.
fn container() -> Result<Arc<Container>, OpenError> {
    static CONTAINER: OnceLock<Arc<Container>> = OnceLock::new();
    if let Some(c) = CONTAINER.get() {
        return Ok(c.clone());
    }
    let vfio = Arc::new(VfioContainer::new(None).map_err(OpenError::Vfio)?);
    let c = Arc::new(Container { vfio, mapped: Mutex::new(Vec::new()) });
    Ok(CONTAINER.get_or_init(|| c).clone())
}

/// The driver bound to the function at `sysfs`, if any.
fn driver_of(sysfs: &Path) -> Option<String> {
    let link = std::fs::read_link(sysfs.join("driver")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// A host PCI function bound to vfio-pci.
pub struct HostVfio {
    /// A duplicate of the device's descriptor, for region reads and writes
    /// that report their errors (vfio-ioctls' only log them). Declared
    /// first: it must close before the device gives its group back (an
    /// open device keeps the group busy).
    fd: File,
    dev: VfioDevice,
    container: Arc<Container>,
    /// The descriptor of its IOMMU group, which vfio-ioctls holds open for
    /// as long as the device (`group_fd`).
    group_fd: Option<RawFd>,
}

impl HostVfio {
    /// Opens the function at `sysfs` (`/sys/bus/pci/devices/DDDD:BB:DD.F`).
    pub fn open(sysfs: &Path) -> Result<Self, OpenError> {
        let Ready { sysfs, dev, group } = check(sysfs)?;
        let container = container()?;
        let ops: Arc<dyn vfio_ioctls::VfioOps> = container.vfio.clone();
        let vfio = VfioDevice::new(&sysfs, ops, false).map_err(|e| match e {
            VfioError::GroupViable => {
                OpenError::NotViable { members: members(&group), group: group.clone() }
            }
            e => OpenError::Vfio(e),
        })?;
        // SAFETY: dup of a descriptor the device owns; the File owns the
        // duplicate.
        let dup = unsafe { libc::dup(vfio.as_raw_fd()) };
        if dup < 0 {
            return Err(OpenError::Dup(std::io::Error::last_os_error()));
        }
        // SAFETY: `dup` is a fresh descriptor nothing else owns.
        let fd = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(dup) };
        let group_fd = find_group_fd(&group);
        if group_fd.is_none() {
            devices::warn_limited!(
                "vfio: IOMMU group {group} of {dev} is not among skiff's descriptors: KVM will \
                 not be told of it (DMA that bypasses the CPU caches, as an IGD's, needs it)"
            );
        }
        Ok(HostVfio { fd, dev: vfio, container, group_fd })
    }

    /// The function's IOMMU group, for KVM's VFIO device
    /// (`KVM_DEV_VFIO_FILE_ADD`: KVM then honours the guest's memory types
    /// and WBINVD where the group's DMA is not cache-coherent).
    pub fn group_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        // SAFETY: vfio-ioctls keeps the group open while one of its
        // devices is (this one, borrowed for as long as the result).
        self.group_fd.map(|fd| unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
    }

    /// DMA-maps guest RAM for every device in the container (guest-physical
    /// = IO virtual), unless it already is: the RAM outlives a guest reset,
    /// and so do its mappings (and the pins behind them). The kernel drops
    /// them when the container closes, at exit.
    pub fn map_guest_memory(&self, mem: &boot::GuestMemoryMmap) -> Result<(), VfioError> {
        let regions: Vec<(u64, u64, u64)> =
            mem.iter().map(|r| (r.start_addr().raw_value(), r.len(), r.as_ptr() as u64)).collect();
        let mut mapped = self.container.mapped.lock().unwrap_or_else(|e| e.into_inner());
        if *mapped == regions {
            return Ok(());
        }
        for &(iova, len, _) in mapped.iter() {
            self.container.vfio.vfio_dma_unmap(iova, len as usize)?;
        }
        mapped.clear();
        // SAFETY: guest RAM stays mapped for the process's life (main owns
        // it across runs, and the container's mappings go with the
        // process); skiff holds no Rust reference into it that a device's
        // DMA could race with.
        unsafe { self.container.vfio.vfio_map_guest_memory(mem)? };
        *mapped = regions;
        log::debug!("vfio: guest RAM DMA-mapped ({} regions)", mapped.len());
        Ok(())
    }

    fn io(&self, index: u32, offset: u64, len: usize) -> std::io::Result<u64> {
        let size = self.dev.get_region_size(index);
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        Ok(self.dev.get_region_offset(index) + offset)
    }
}

/// The descriptor on which vfio-ioctls opened `/dev/vfio/GROUP` (it keeps
/// its groups to itself), by the node each of skiff's descriptors names.
fn find_group_fd(group: &str) -> Option<RawFd> {
    let node = Path::new("/dev/vfio").join(group);
    std::fs::read_dir("/proc/self/fd").ok()?.flatten().find_map(|e| {
        let fd: RawFd = e.file_name().to_str()?.parse().ok()?;
        (std::fs::read_link(e.path()).ok()? == node).then_some(fd)
    })
}

/// A host function that looks ready for VFIO: bound to vfio-pci, in an
/// IOMMU group whose node skiff may open.
struct Ready {
    sysfs: PathBuf,
    /// DDDD:BB:DD.F
    dev: String,
    group: String,
}

/// What the host's sysfs and /dev/vfio say about the function at `sysfs`,
/// each way of not being set up with the steps that fix it.
fn check(sysfs: &Path) -> Result<Ready, OpenError> {
    let sysfs = sysfs.canonicalize().map_err(|_| OpenError::NoDevice(sysfs.to_owned()))?;
    let dev = sysfs.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let shown = sysfs.display().to_string();
    match driver_of(&sysfs) {
        Some(d) if d == "vfio-pci" => {}
        Some(driver) => return Err(OpenError::WrongDriver { dev, driver, sysfs: shown }),
        None => return Err(OpenError::NoDriver { dev, sysfs: shown }),
    }
    let group = std::fs::read_link(sysfs.join("iommu_group"))
        .ok()
        .and_then(|g| Some(g.file_name()?.to_string_lossy().into_owned()))
        .ok_or_else(|| OpenError::NoGroup(dev.clone()))?;
    // Opening the group node first gives the errno a user can act on
    // (busy is fine: this process may hold it for another function).
    if let Err(source) =
        std::fs::OpenOptions::new().read(true).write(true).open(format!("/dev/vfio/{group}"))
    {
        if source.raw_os_error() != Some(libc::EBUSY) {
            return Err(OpenError::Group { group, dev, source });
        }
    }
    Ok(Ready { sysfs, dev, group })
}

/// The devices of IOMMU group `group` and their drivers, for an error.
fn members(group: &str) -> String {
    members_in(Path::new(&format!("/sys/kernel/iommu_groups/{group}/devices")))
}

fn members_in(dir: &Path) -> String {
    let Ok(entries) = std::fs::read_dir(dir) else { return dir.display().to_string() };
    let mut list: Vec<String> = entries
        .flatten()
        .map(|e| {
            let driver = driver_of(&e.path()).unwrap_or_else(|| "no driver".into());
            format!("{} ({driver})", e.file_name().to_string_lossy())
        })
        .collect();
    list.sort();
    list.join(", ")
}

impl VfioAccess for HostVfio {
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let size = self.dev.get_region_size(index);
        if size == 0 && index != CONFIG_REGION {
            return None;
        }
        let mut info =
            RegionInfo { flags: self.dev.get_region_flags(index), size, ..Default::default() };
        for cap in self.dev.get_region_caps(index) {
            match cap {
                VfioRegionInfoCap::SparseMmap(s) => {
                    info.sparse = Some(s.areas.iter().map(|a| (a.offset, a.size)).collect());
                }
                VfioRegionInfoCap::MsixMappable => info.msix_mappable = true,
                _ => {}
            }
        }
        if info.flags & REGION_MMAP == 0 {
            info.sparse = None;
        }
        Some(info)
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        let at = self.io(index, offset, data.len())?;
        self.fd.read_exact_at(data, at)
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let at = self.io(index, offset, data.len())?;
        self.fd.write_all_at(data, at)
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        let irq = self.dev.get_irq_info(index)?;
        let maskable = irq.flags & vfio_bindings::bindings::vfio::VFIO_IRQ_INFO_MASKABLE != 0;
        Some(IrqInfo { count: irq.count, maskable })
    }

    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> std::io::Result<()> {
        self.dev.enable_irq(index, fds.to_vec()).map_err(std::io::Error::other)
    }

    fn disable_irq(&self, index: u32) -> std::io::Result<()> {
        self.dev.disable_irq(index).map_err(std::io::Error::other)
    }

    fn unmask_intx(&self) -> std::io::Result<()> {
        self.dev.unmask_irq(pci::vfio::access::INTX_IRQ).map_err(std::io::Error::other)
    }

    fn set_intx_resample(&self, fd: &EventFd) -> std::io::Result<()> {
        let index = pci::vfio::access::INTX_IRQ;
        self.dev.set_irq_resample_fd(index, vec![fd]).map_err(std::io::Error::other)
    }

    fn reset(&self) -> bool {
        self.dev.reset();
        true
    }

    fn mmap_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(&self.fd))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// Each way a host function is not ready is told with what to do, read
    /// from a scratch sysfs tree: missing, no driver, another driver, no
    /// IOMMU group, a group node that cannot be opened; and a group that
    /// is not viable lists its members with their drivers.
    #[test]
    fn a_host_not_set_up_says_what_to_do() {
        let root = std::env::temp_dir().join(format!("skiff-vfio-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dev = root.join("devices/0000:01:00.0");
        let other = root.join("devices/0000:01:00.1");
        for d in [&dev, &other, &root.join("drivers/nvme"), &root.join("drivers/vfio-pci")] {
            std::fs::create_dir_all(d).unwrap();
        }
        let err = |p: &Path| check(p).err().map(|e| e.to_string()).unwrap_or_default();

        assert!(err(&root.join("devices/0000:02:00.0")).starts_with("no host PCI device"));
        let e = err(&dev);
        assert!(e.contains("0000:01:00.0 has no driver") && e.contains("driver_override"), "{e}");
        symlink(root.join("drivers/nvme"), dev.join("driver")).unwrap();
        let e = err(&dev);
        assert!(e.contains("is bound to nvme, not vfio-pci") && e.contains("driver/unbind"), "{e}");
        std::fs::remove_file(dev.join("driver")).unwrap();
        symlink(root.join("drivers/vfio-pci"), dev.join("driver")).unwrap();
        assert!(err(&dev).contains("has no IOMMU group: the host needs an IOMMU"));
        symlink(root.join("groups/skiff-no-such-group"), dev.join("iommu_group")).unwrap();
        let e = err(&dev);
        assert!(e.contains("cannot open /dev/vfio/skiff-no-such-group"), "{e}");

        let members = root.join("groups/7/devices");
        std::fs::create_dir_all(&members).unwrap();
        symlink(root.join("drivers/nvme"), other.join("driver")).unwrap();
        symlink(&dev, members.join("0000:01:00.0")).unwrap();
        symlink(&other, members.join("0000:01:00.1")).unwrap();
        let e = OpenError::NotViable { group: "7".into(), members: members_in(&members) };
        assert_eq!(
            e.to_string(),
            "IOMMU group 7 is not viable: every device in it must be bound to vfio-pci (or to \
             no driver): 0000:01:00.0 (vfio-pci), 0000:01:00.1 (nvme)"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
