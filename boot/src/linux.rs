//! Linux direct boot: the kernel image, initrd, command line and zero page.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::*;
use crate::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the kernel image: {0}")]
    ReadKernel(#[source] std::io::Error),
    #[error("not a bzImage or ELF kernel: {0}")]
    LoadKernel(#[source] linux_loader::loader::Error),
    #[error("the ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build it with CONFIG_PVH=y or boot its bzImage")]
    NoPvhNote,
    #[error("the kernel has no 64-bit entry point (XLF_KERNEL_64); it cannot be booted directly")]
    No64BitEntry,
    #[error("the kernel's boot protocol {0:#x} is too old (2.06 or later is needed)")]
    OldBootProtocol(u16),
    #[error("cannot read the initrd: {0}")]
    ReadInitrd(#[source] std::io::Error),
    #[error(
        "the initrd ({size} bytes) does not fit in guest RAM below {limit:#x} above the kernel"
    )]
    InitrdTooLarge { size: u64, limit: u64 },
    #[error("the kernel command line is {len} bytes; this kernel takes at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("too many e820 entries")]
    TooManyE820Entries,
    #[error("cannot write the boot parameters to guest memory: {0}")]
    WriteBootParams(#[source] linux_loader::configurator::Error),
    #[error("cannot write to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

pub type Result<T> = std::result::Result<T, Error>;

/// How the boot vCPU must enter the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelEntry {
    /// 64-bit boot protocol: long mode, `rsi` = zero page.
    Linux64 { entry: GuestAddress, zero_page: GuestAddress },
    /// PVH: 32-bit protected mode without paging, `ebx` = hvm_start_info.
    Pvh { entry: GuestAddress, start_info: GuestAddress },
}

/// A loaded kernel: where it sits and how it wants to be entered.
pub struct LoadedKernel {
    kind: KernelKind,
    /// End of the area the kernel may use (bzImage: while decompressing).
    end: u64,
    /// Highest address the kernel can reach an initrd at.
    initrd_addr_max: u64,
}

enum KernelKind {
    BzImage { entry: GuestAddress, header: linux_loader::loader::bootparam::setup_header },
    Pvh { entry: GuestAddress },
}

impl LoadedKernel {
    pub fn is_pvh(&self) -> bool {
        matches!(self.kind, KernelKind::Pvh { .. })
    }
}

/// Loads a bzImage at 1 MiB (its `code32_start`), or an ELF vmlinux with a
/// PVH note at its physical addresses (as QEMU's microvm accepts both).
pub fn load_kernel(mem: &GuestMemoryMmap, file: &mut File) -> Result<LoadedKernel> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0)).map_err(Error::ReadKernel)?;
    let is_elf = std::io::Read::read_exact(file, &mut magic).is_ok() && magic == *b"\x7fELF";
    if is_elf {
        return load_pvh(mem, file);
    }
    let res = BzImage::load(mem, None, file, Some(GuestAddress(HIGH_MEMORY_START)))
        .map_err(Error::LoadKernel)?;
    // `load` only returns Ok for a bzImage, which always has a setup header.
    let header = res.setup_header.ok_or(Error::LoadKernel(
        linux_loader::loader::Error::Bzimage(linux_loader::loader::bzimage::Error::InvalidBzImage),
    ))?;
    if header.version < 0x0206 {
        return Err(Error::OldBootProtocol(header.version));
    }
    if header.xloadflags & 1 == 0 {
        return Err(Error::No64BitEntry);
    }
    let load = res.kernel_load.raw_value();
    // The kernel decompresses in place within init_size of its load address.
    let end = load.max(header.pref_address) + u64::from(header.init_size);
    Ok(LoadedKernel {
        // The 64-bit entry sits 0x200 past the 32-bit one (boot protocol).
        kind: KernelKind::BzImage { entry: GuestAddress(load + 0x200), header },
        end: end.max(res.kernel_end),
        initrd_addr_max: u64::from(header.initrd_addr_max),
    })
}

fn load_pvh(mem: &GuestMemoryMmap, file: &mut File) -> Result<LoadedKernel> {
    use linux_loader::loader::elf::{Elf, PvhBootCapability};
    file.seek(SeekFrom::Start(0)).map_err(Error::ReadKernel)?;
    let res = Elf::load(mem, None, file, Some(GuestAddress(HIGH_MEMORY_START)))
        .map_err(Error::LoadKernel)?;
    match res.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(LoadedKernel {
            kind: KernelKind::Pvh { entry },
            end: res.kernel_end,
            // The PVH entry runs without paging: 32-bit physical addresses.
            initrd_addr_max: u32::MAX.into(),
        }),
        _ => Err(Error::NoPvhNote),
    }
}

/// What the rest of the machine asks of the boot parameters.
pub struct BootSetup<'a> {
    /// Bytes, as the kernel takes them (not necessarily UTF-8).
    pub cmdline: &'a [u8],
    pub initrd: Option<&'a mut File>,
    /// Address of the ACPI RSDP, if there are ACPI tables.
    pub rsdp: Option<GuestAddress>,
    /// MMIO ranges (base, size) to mark reserved in the e820 map.
    pub reserved: &'a [(u64, u64)],
}

/// Loads the initrd and command line, writes the zero page (bzImage) or
/// the PVH start info, and returns the entry state for the boot vCPU.
pub fn configure(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    setup: BootSetup<'_>,
) -> Result<KernelEntry> {
    let initrd = match setup.initrd {
        Some(file) => Some(load_initrd(mem, kernel, file, setup.reserved)?),
        None => None,
    };
    let e820 = e820_entries(mem, setup.reserved);
    match &kernel.kind {
        KernelKind::BzImage { entry, header } => {
            let mut params = boot_params { hdr: *header, ..Default::default() };
            params.hdr.type_of_loader = 0xff; // "undefined" loader
            params.hdr.loadflags |= linux_loader::loader::bootparam::CAN_USE_HEAP;
            params.hdr.heap_end_ptr = 0xfe00;
            params.hdr.vid_mode = 0xffff; // "normal"
            let max = params.hdr.cmdline_size as usize;
            write_cmdline(mem, setup.cmdline, max)?;
            params.hdr.cmd_line_ptr = CMDLINE_START as u32;
            if let Some((addr, size)) = initrd {
                params.hdr.ramdisk_image = addr as u32;
                params.hdr.ramdisk_size = size as u32;
            }
            if let Some(rsdp) = setup.rsdp {
                params.acpi_rsdp_addr = rsdp.raw_value();
            }
            if e820.len() > params.e820_table.len() {
                return Err(Error::TooManyE820Entries);
            }
            for (slot, &(addr, size, type_)) in params.e820_table.iter_mut().zip(&e820) {
                *slot = boot_e820_entry { addr, size, r#type: type_ };
            }
            params.e820_entries = e820.len() as u8;
            let zero_page = GuestAddress(ZERO_PAGE_START);
            LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
                &BootParams::new::<boot_params>(&params, zero_page),
                mem,
            )
            .map_err(Error::WriteBootParams)?;
            Ok(KernelEntry::Linux64 { entry: *entry, zero_page })
        }
        KernelKind::Pvh { entry } => {
            write_cmdline(mem, setup.cmdline, CMDLINE_MAX_SIZE - 1)?;
            let start_info = write_pvh_start_info(mem, initrd, setup.rsdp, &e820)?;
            Ok(KernelEntry::Pvh { entry: *entry, start_info })
        }
    }
}

/// hvm_start_info at PVH_INFO_START, then the module list (the initrd) and
/// the memory map, laid out as the PVH ABI (Xen's start_info.h) defines.
fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<(u64, u64)>,
    rsdp: Option<GuestAddress>,
    e820: &[(u64, u64, u32)],
) -> Result<GuestAddress> {
    const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
    let start = PVH_INFO_START;
    let modlist = start + 0x40;
    let memmap = start + 0x80;
    if memmap + 24 * e820.len() as u64 > ZERO_PAGE_START {
        return Err(Error::TooManyE820Entries);
    }
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&XEN_HVM_START_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&u32::from(initrd.is_some()).to_le_bytes()); // nr_modules
    info.extend_from_slice(&modlist.to_le_bytes());
    info.extend_from_slice(&CMDLINE_START.to_le_bytes());
    info.extend_from_slice(&rsdp.map_or(0, |a| a.raw_value()).to_le_bytes());
    info.extend_from_slice(&memmap.to_le_bytes());
    info.extend_from_slice(&(e820.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes()); // reserved
    mem.write_slice(&info, GuestAddress(start))?;
    if let Some((addr, size)) = initrd {
        let entry: Vec<u8> = [addr, size, 0, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
        mem.write_slice(&entry, GuestAddress(modlist))?;
    }
    for (i, &(addr, size, type_)) in e820.iter().enumerate() {
        let mut entry = Vec::with_capacity(24);
        entry.extend_from_slice(&addr.to_le_bytes());
        entry.extend_from_slice(&size.to_le_bytes());
        entry.extend_from_slice(&type_.to_le_bytes());
        entry.extend_from_slice(&0u32.to_le_bytes());
        mem.write_slice(&entry, GuestAddress(memmap + 24 * i as u64))?;
    }
    Ok(GuestAddress(start))
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &[u8], max: usize) -> Result<()> {
    if cmdline.contains(&0) {
        return Err(Error::CmdlineNul);
    }
    // The kernel's cmdline_size excludes the terminating NUL.
    let max = max.min(CMDLINE_MAX_SIZE - 1);
    if cmdline.len() > max {
        return Err(Error::CmdlineTooLong { len: cmdline.len(), max });
    }
    let mut bytes = cmdline.to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))?;
    Ok(())
}

/// Puts the initrd as high as the kernel allows in low RAM (as bootloaders
/// do), page aligned, above what the kernel needs to decompress and below
/// every reserved range in low RAM (device data set aside at its top).
fn load_initrd(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    file: &mut File,
    reserved: &[(u64, u64)],
) -> Result<(u64, u64)> {
    let size = file.seek(SeekFrom::End(0)).map_err(Error::ReadInitrd)?;
    file.seek(SeekFrom::Start(0)).map_err(Error::ReadInitrd)?;
    let low_end = mem.iter().next().map(|r| r.len()).unwrap_or(0);
    let below_reserved = reserved
        .iter()
        .map(|&(base, _)| base)
        .filter(|&base| base >= kernel.end && base < low_end)
        .min()
        .unwrap_or(low_end);
    let limit = below_reserved.min(kernel.initrd_addr_max + 1);
    let too_large = Error::InitrdTooLarge { size, limit };
    let addr = limit.checked_sub(size).ok_or(too_large)? & !0xfff;
    if addr < kernel.end {
        return Err(Error::InitrdTooLarge { size, limit });
    }
    // File is ReadVolatile: the bytes go straight into guest memory.
    mem.read_exact_volatile_from(GuestAddress(addr), file, size as usize).map_err(|e| match e {
        vm_memory::GuestMemoryError::IOError(io) => Error::ReadInitrd(io),
        other => Error::GuestMemory(other),
    })?;
    Ok((addr, size))
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// The e820 map: guest RAM with the EBDA/BIOS area and every `reserved`
/// range carved out of it (a reservation over RAM, such as a passed-through
/// GPU's stolen memory, must not also be listed as usable RAM), and the
/// reservations themselves.
fn e820_entries(mem: &GuestMemoryMmap, reserved: &[(u64, u64)]) -> Vec<(u64, u64, u32)> {
    let bios = (EBDA_START, HIGH_MEMORY_START - EBDA_START);
    let holes: Vec<(u64, u64)> = std::iter::once(bios).chain(reserved.iter().copied()).collect();
    let mut entries = Vec::new();
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let mut pieces = vec![(start, start + region.len())];
        for &(base, len) in &holes {
            let end = base.saturating_add(len);
            pieces = pieces
                .into_iter()
                .flat_map(|(s, e)| {
                    if end <= s || base >= e {
                        return vec![(s, e)];
                    }
                    [(s, base.max(s)), (end.min(e), e)].into_iter().filter(|(a, b)| a < b).collect()
                })
                .collect();
        }
        entries.extend(pieces.into_iter().map(|(s, e)| (s, e - s, E820_RAM)));
    }
    entries.extend(holes.iter().map(|&(b, l)| (b, l, E820_RESERVED)));
    entries.sort_by_key(|e| e.0);
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: u64) -> GuestMemoryMmap {
        let ranges: Vec<_> =
            ram_ranges(size).into_iter().map(|(b, l)| (GuestAddress(b), l as usize)).collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    #[test]
    fn e820_covers_ram_and_reserved_ranges() {
        let m = mem(4 << 30);
        let got = e820_entries(&m, &[(PCIE_ECAM_BASE, PCIE_ECAM_SIZE)]);
        assert_eq!(
            got,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIGH_MEMORY_START - EBDA_START, E820_RESERVED),
                (HIGH_MEMORY_START, MAX_BELOW_4G - HIGH_MEMORY_START, E820_RAM),
                (PCIE_ECAM_BASE, PCIE_ECAM_SIZE, E820_RESERVED),
                (FIRST_ADDR_PAST_4G, (4 << 30) - MAX_BELOW_4G, E820_RAM),
            ]
        );
    }

    /// A reservation over RAM splits the RAM entry around it.
    #[test]
    fn reservations_are_carved_out_of_ram() {
        let m = mem(512 << 20);
        let stolen = (0x1000_0000, 0x400_0000);
        let got = e820_entries(&m, &[stolen]);
        assert_eq!(
            got,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIGH_MEMORY_START - EBDA_START, E820_RESERVED),
                (HIGH_MEMORY_START, 0x1000_0000 - HIGH_MEMORY_START, E820_RAM),
                (0x1000_0000, 0x400_0000, E820_RESERVED),
                (0x1400_0000, (512 << 20) - 0x1400_0000, E820_RAM),
            ]
        );
        // At the very end of RAM: nothing usable is left behind it.
        let got = e820_entries(&m, &[((512 << 20) - 0x1000, 0x1000)]);
        assert_eq!(got.last(), Some(&((512 << 20) - 0x1000, 0x1000, E820_RESERVED)));
        assert_eq!(got[2], (HIGH_MEMORY_START, (512 << 20) - 0x1000 - HIGH_MEMORY_START, E820_RAM));
    }

    #[test]
    fn cmdline_is_bounded_and_nul_free() {
        let m = mem(16 << 20);
        write_cmdline(&m, b"console=ttyS0", 16).unwrap();
        let mut buf = [0u8; 14];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
        assert!(matches!(
            write_cmdline(&m, b"console=ttyS0 quiet", 16),
            Err(Error::CmdlineTooLong { len: 19, max: 16 })
        ));
        assert!(matches!(write_cmdline(&m, b"a\0b", 16), Err(Error::CmdlineNul)));
        // Not UTF-8: the kernel takes bytes.
        write_cmdline(&m, b"x=\xe9", 16).unwrap();
    }

    fn fake_kernel() -> LoadedKernel {
        LoadedKernel {
            kind: KernelKind::Pvh { entry: GuestAddress(0x100_0000) },
            end: 0x200_0000,
            initrd_addr_max: 0x7fff_ffff,
        }
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let m = mem(64 << 20);
        let path = std::env::temp_dir().join(format!("skiff-initrd-{}", std::process::id()));
        std::fs::write(&path, vec![0xabu8; 5000]).unwrap();
        let mut f = File::open(&path).unwrap();
        let (addr, size) = load_initrd(&m, &fake_kernel(), &mut f, &[]).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20 && addr + size > (64 << 20) - 8192);
        let b: u8 = m.read_obj(GuestAddress(addr + 4999)).unwrap();
        assert_eq!(b, 0xab);

        // Below device data reserved at the top of RAM; MMIO above RAM
        // (ECAM) does not matter.
        let reserved = [((64 << 20) - 0x3000, 0x3000), (0xe000_0000, 0x1000_0000)];
        let (addr, _) = load_initrd(&m, &fake_kernel(), &mut f, &reserved).unwrap();
        assert!(addr + size <= (64 << 20) - 0x3000, "{addr:#x}");

        // Too large to fit above the kernel.
        std::fs::write(&path, vec![0u8; 63 << 20]).unwrap();
        let mut f = File::open(&path).unwrap();
        assert!(matches!(
            load_initrd(&m, &fake_kernel(), &mut f, &[]),
            Err(Error::InitrdTooLarge { .. })
        ));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn rejects_a_non_kernel() {
        let m = mem(16 << 20);
        let path = std::env::temp_dir().join(format!("skiff-notkernel-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let mut f = File::open(&path).unwrap();
        assert!(matches!(load_kernel(&m, &mut f), Err(Error::LoadKernel(_))));
        std::fs::remove_file(&path).unwrap();
    }
}
