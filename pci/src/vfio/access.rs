//! The seam between skiff's VFIO PCI device model and a host device: what
//! the model asks of "a VFIO device" (regions, interrupts, reset), so the
//! model is tested against a recording fake (`Fake`) and runs on the
//! kernel's VFIO through vfio-ioctls.
//!
//! The region and interrupt numbers are VFIO's for a PCI device
//! (`include/uapi/linux/vfio.h`: `VFIO_PCI_*_REGION_INDEX`,
//! `VFIO_PCI_*_IRQ_INDEX`, `VFIO_REGION_INFO_FLAG_*`).

use std::io;
use std::os::fd::BorrowedFd;

use vmm_sys_util::eventfd::EventFd;

/// BAR 0..=5 are regions 0..=5.
pub const ROM_REGION: u32 = 6;
pub const CONFIG_REGION: u32 = 7;
pub const VGA_REGION: u32 = 8;

pub const INTX_IRQ: u32 = 0;
pub const MSI_IRQ: u32 = 1;
pub const MSIX_IRQ: u32 = 2;

pub const REGION_READ: u32 = 1 << 0;
pub const REGION_WRITE: u32 = 1 << 1;
pub const REGION_MMAP: u32 = 1 << 2;

/// A region as the host device describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// `REGION_*` flags.
    pub flags: u32,
    pub size: u64,
    /// The parts that may be mmap'd (offset, length) when the region has a
    /// sparse-mmap capability; None: all of it, if `REGION_MMAP`.
    pub sparse: Option<Vec<(u64, u64)>>,
    /// The MSI-X table and PBA may be mmap'd with the rest (the kernel's
    /// MSIX_MAPPABLE capability): the model still traps them.
    pub msix_mappable: bool,
    /// Where the region starts in the device's descriptor (for mmap).
    pub fd_offset: u64,
}

/// An interrupt type as the host device offers it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqInfo {
    /// How many vectors (0: not offered).
    pub count: u32,
    /// Each vector can be masked on its own (VFIO_IRQ_INFO_MASKABLE).
    pub maskable: bool,
}

/// A host PCI function bound to vfio-pci.
pub trait VfioAccess: Send + Sync {
    /// Region `index`, or None when the device has no such region.
    fn region_info(&self, index: u32) -> Option<RegionInfo>;
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()>;
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()>;
    fn irq_info(&self, index: u32) -> Option<IrqInfo>;
    /// Routes vectors 0..`fds.len()` of interrupt `index` to `fds`
    /// (VFIO_DEVICE_SET_IRQS, ACTION_TRIGGER).
    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> io::Result<()>;
    /// Turns interrupt `index` off entirely.
    fn disable_irq(&self, index: u32) -> io::Result<()>;
    /// INTx: unmask after the guest's EOI, and the eventfd that does it
    /// (KVM's resample) from then on.
    fn unmask_intx(&self) -> io::Result<()>;
    fn set_intx_resample(&self, fd: &EventFd) -> io::Result<()>;
    /// Resets the function (VFIO_DEVICE_RESET); false if it cannot be.
    fn reset(&self) -> bool;
    /// The descriptor regions are mmap'd from (None: nothing is mapped,
    /// every access is trapped).
    fn mmap_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// Config space, as the kernel virtualizes it.
    fn config_read(&self, offset: u64, data: &mut [u8]) -> io::Result<()> {
        self.region_read(CONFIG_REGION, offset, data)
    }
    fn config_write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.region_write(CONFIG_REGION, offset, data)
    }
    fn config_u8(&self, offset: u64) -> io::Result<u8> {
        let mut b = [0u8; 1];
        self.config_read(offset, &mut b)?;
        Ok(b[0])
    }
    fn config_u16(&self, offset: u64) -> io::Result<u16> {
        let mut b = [0u8; 2];
        self.config_read(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    fn config_u32(&self, offset: u64) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.config_read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

/// A recording fake: a scripted config space and regions, and a log of
/// every interrupt, reset and region write the model made.
#[cfg(any(test, feature = "fuzzing", feature = "fake"))]
pub mod fake {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;

    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Call {
        EnableIrq { index: u32, vectors: usize },
        DisableIrq(u32),
        UnmaskIntx,
        IntxResample,
        Reset,
        RegionWrite { index: u32, offset: u64, data: Vec<u8> },
    }

    #[derive(Default)]
    pub struct Fake {
        pub config: Mutex<Vec<u8>>,
        pub regions: HashMap<u32, RegionInfo>,
        pub irqs: HashMap<u32, IrqInfo>,
        pub calls: Mutex<Vec<Call>>,
        pub can_reset: bool,
        /// What `mmap_fd` hands out (None: nothing is mapped).
        pub mmap_file: Option<std::fs::File>,
    }

    impl Fake {
        /// A function with `config` (up to 4 KiB, the rest zero).
        pub fn new(config: &[u8]) -> Self {
            let mut space = vec![0u8; 4096];
            space[..config.len()].copy_from_slice(config);
            let mut regions = HashMap::new();
            regions.insert(
                CONFIG_REGION,
                RegionInfo { flags: REGION_READ | REGION_WRITE, size: 4096, ..Default::default() },
            );
            Fake { config: Mutex::new(space), regions, can_reset: true, ..Default::default() }
        }

        pub fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }

        fn log(&self, call: Call) {
            self.calls.lock().unwrap().push(call);
        }
    }

    impl VfioAccess for Fake {
        fn region_info(&self, index: u32) -> Option<RegionInfo> {
            self.regions.get(&index).cloned()
        }
        fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
            if index != CONFIG_REGION {
                data.fill(0xff);
                return Ok(());
            }
            let space = self.config.lock().unwrap();
            let at = usize::try_from(offset).map_err(io::Error::other)?;
            let src = space.get(at..at + data.len()).ok_or(io::ErrorKind::InvalidInput)?;
            data.copy_from_slice(src);
            Ok(())
        }
        fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
            self.log(Call::RegionWrite { index, offset, data: data.to_vec() });
            if index == CONFIG_REGION {
                let mut space = self.config.lock().unwrap();
                let at = usize::try_from(offset).map_err(io::Error::other)?;
                let dst = space.get_mut(at..at + data.len()).ok_or(io::ErrorKind::InvalidInput)?;
                dst.copy_from_slice(data);
            }
            Ok(())
        }
        fn irq_info(&self, index: u32) -> Option<IrqInfo> {
            self.irqs.get(&index).copied()
        }
        fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
            self.log(Call::EnableIrq { index, vectors: fds.len() });
            Ok(())
        }
        fn disable_irq(&self, index: u32) -> io::Result<()> {
            self.log(Call::DisableIrq(index));
            Ok(())
        }
        fn unmask_intx(&self) -> io::Result<()> {
            self.log(Call::UnmaskIntx);
            Ok(())
        }
        fn set_intx_resample(&self, _: &EventFd) -> io::Result<()> {
            self.log(Call::IntxResample);
            Ok(())
        }
        fn reset(&self) -> bool {
            self.log(Call::Reset);
            self.can_reset
        }
        fn mmap_fd(&self) -> Option<BorrowedFd<'_>> {
            self.mmap_file.as_ref().map(std::os::fd::AsFd::as_fd)
        }
    }

    /// An NVMe controller as QEMU emulates one (1b36:0010): a 64-bit BAR 0
    /// of 16 KiB with the MSI-X table (65 vectors) at 0x2000 and the PBA
    /// at 0x3000, then PM, MSI-X and PCI Express capabilities, and two
    /// extended ones.
    pub fn nvme() -> Fake {
        let mut c = vec![0u8; 4096];
        let put16 =
            |c: &mut Vec<u8>, at: usize, v: u16| c[at..at + 2].copy_from_slice(&v.to_le_bytes());
        let put32 =
            |c: &mut Vec<u8>, at: usize, v: u32| c[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put16(&mut c, 0x00, 0x1b36);
        put16(&mut c, 0x02, 0x0010);
        put16(&mut c, 0x06, 1 << 4);
        put32(&mut c, 0x08, 0x0108_0202);
        put32(&mut c, 0x10, 0x4); // 64-bit memory
        put16(&mut c, 0x2c, 0x1af4);
        put16(&mut c, 0x2e, 0x1100);
        c[0x34] = 0x40;
        c[0x3d] = 1;
        // PM at 0x40 -> MSI-X at 0x50 -> PCIe at 0x60.
        c[0x40] = 0x01;
        c[0x41] = 0x50;
        c[0x50] = 0x11;
        c[0x51] = 0x60;
        put16(&mut c, 0x52, 64); // 65 vectors
        put32(&mut c, 0x54, 0x2000);
        put32(&mut c, 0x58, 0x3000);
        c[0x60] = 0x10;
        c[0x61] = 0x00;
        // AER at 0x100 -> vendor-specific at 0x140.
        put32(&mut c, 0x100, 0x0001 | 1 << 16 | 0x140 << 20);
        put32(&mut c, 0x140, 0x000b | 1 << 16);
        let mut f = Fake::new(&c);
        let bar = RegionInfo {
            flags: REGION_READ | REGION_WRITE | REGION_MMAP,
            size: 0x4000,
            ..Default::default()
        };
        f.regions.insert(0, bar);
        f.regions.insert(
            ROM_REGION,
            RegionInfo { flags: REGION_READ, size: 0x8000, ..Default::default() },
        );
        f
    }

    /// `nvme()` with INTx and an MSI capability (4 vectors, 64-bit,
    /// per-vector masking) at 0x70, between PM and MSI-X.
    pub fn nvme_with_msi() -> Fake {
        let mut f = nvme();
        f.irqs.insert(INTX_IRQ, IrqInfo { count: 1, maskable: true });
        {
            let mut c = f.config.lock().unwrap();
            c[0x41] = 0x70;
            c[0x70] = 0x05;
            c[0x71] = 0x50;
            c[0x72..0x74].copy_from_slice(&(2u16 << 1 | 1 << 7 | 1 << 8).to_le_bytes());
        }
        f
    }

    /// `nvme()` whose BAR 0 can be mapped: regions come from /dev/zero,
    /// BAR 0 at offset 0x10000 of it.
    pub fn nvme_mappable() -> Fake {
        let mut f = nvme();
        f.mmap_file = Some(std::fs::File::open("/dev/zero").expect("/dev/zero"));
        if let Some(bar) = f.regions.get_mut(&0) {
            bar.fd_offset = 0x10000;
        }
        f
    }
}
