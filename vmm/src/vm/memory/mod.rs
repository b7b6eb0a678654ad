//! Guest RAM, laid out as QEMU's microvm does, backed as the command line
//! asks (`config::RamBacking`: anonymous private memory by default, a
//! memfd that a vhost-user backend can map with `-object
//! memory-backend-memfd`); `map` owns the run's guest-physical map (KVM's
//! memory slots, host ranges mapped in and out while the guest runs).
//! Nothing is touched up front: the host commits pages as the guest first
//! uses them.
//!
//! Each region starts at a 2 MiB-aligned host address (the page size with
//! hugetlb). KVM can map a transparent huge page with one 2 MiB stage-2
//! entry only where the host address and the guest address agree modulo
//! 2 MiB, and guest RAM starts at guest address 0; QEMU aligns its RAM the
//! same way. vm-memory maps at whatever address mmap picks, so skiff maps
//! the RAM itself and hands vm-memory the aligned pointers (with the
//! memfd and offset of each region, for vhost-user's memory table);
//! [`GuestRam`] unmaps it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use boot::layout::ram_ranges;
use boot::GuestMemoryMmap;
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
};

use crate::config::{RamBacking, RamConfig};

/// A transparent huge page on x86-64.
const HUGE_PAGE: usize = 2 << 20;
const PROT: i32 = libc::PROT_READ | libc::PROT_WRITE;
/// QEMU's name for the memfd, which /proc/PID/maps shows.
const MEMFD_NAME: &std::ffi::CStr = c"memory-backend-memfd";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot allocate {size} MiB of guest RAM")]
    Allocate {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the memfd for guest RAM (memory-backend-memfd)")]
    Memfd(#[source] std::io::Error),
    #[error("cannot map a guest RAM region")]
    Region(#[source] vm_memory::mmap::MmapRegionError),
    #[error("cannot set up guest RAM")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
    #[error("cannot set up guest RAM: {0}")]
    Range(String),
    #[error("KVM_SET_USER_MEMORY_REGION")]
    Register(#[source] kvm_ioctls::Error),
    #[error("all {0} KVM memory slots are in use")]
    NoSlot(u32),
    #[error("cannot map {len:#x} bytes of a host file at guest {guest:#x}")]
    MapHost {
        guest: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("no mapping in KVM slot {0}")]
    NoMapping(u32),
    #[error("guest range {addr:#x}+{len:#x} is not guest RAM")]
    NotRam { addr: u64, len: u64 },
    #[error("cannot give back guest RAM at {addr:#x}+{len:#x}")]
    Discard {
        addr: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
}

mod map;
pub use map::{GuestMap, HostRange};

/// Owns the guest RAM mappings (and the memfd behind them); dropping it
/// unmaps them, unless something still holds a region (a reference leaked
/// past the VM's end), in which case they stay mapped: a leak, never a
/// dangling mapping.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    maps: Vec<(Arc<MmapRegion<()>>, usize, usize)>,
    /// The host page size behind it: what a discard gives back whole.
    page: u64,
}

impl GuestRam {
    /// The guest's memory, for the VM, devices and loaders to share.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// What gives the guest's pages back to the host (the balloon's).
    pub fn discarder(&self) -> Arc<dyn devices::virtio::balloon::RamDiscard> {
        Arc::new(Discarder { mem: self.mem.clone(), page: self.page })
    }
}

/// Gives guest RAM back to the host, as a balloon does: the guest reads
/// zeros there next. Anonymous RAM drops its pages (MADV_DONTNEED;
/// MADV_REMOVE for shared anonymous memory, whose pages would otherwise
/// stay in the shared object); a memfd (or hugetlb) punches a hole, so
/// the pages also leave the file that a vhost-user backend maps. Only
/// whole host pages go (a huge page while any of it is in use stays).
struct Discarder {
    mem: GuestMemoryMmap,
    page: u64,
}

impl devices::virtio::balloon::RamDiscard for Discarder {
    fn discard(&self, addr: u64, len: u64) -> std::io::Result<u64> {
        discard(&self.mem, self.page, addr, len).map_err(std::io::Error::other)
    }
}

/// Discards the whole `page`-sized pages inside `[addr, addr + len)`, all
/// in one RAM region; how many bytes that was.
fn discard(mem: &GuestMemoryMmap, page: u64, addr: u64, len: u64) -> Result<u64, Error> {
    let not_ram = || Error::NotRam { addr, len };
    let end = addr.checked_add(len).ok_or_else(not_ram)?;
    let region = mem
        .iter()
        .find(|r| {
            let start = r.start_addr().raw_value();
            addr >= start && end <= start + r.len()
        })
        .ok_or_else(not_ram)?;
    let (addr, end) = (addr.next_multiple_of(page), end - end % page);
    if addr >= end {
        return Ok(0);
    }
    let len = end - addr;
    let offset = addr - region.start_addr().raw_value();
    let failed = |source| Error::Discard { addr, len, source };
    let shared = region.flags() & libc::MAP_SHARED != 0;
    if let Some(f) = region.file_offset() {
        use vmm_sys_util::fallocate::{fallocate, FallocateMode};
        let at = f.start() + offset;
        fallocate(f.file(), FallocateMode::PunchHole, true, at, len)
            .map_err(|e| failed(std::io::Error::from_raw_os_error(e.errno())))?;
    }
    // A shared file mapping shows the hole; private pages (copies of the
    // file's or anonymous ones) are dropped; shared anonymous memory is a
    // file of its own that only MADV_REMOVE empties.
    let advice = match (region.file_offset().is_some(), shared) {
        (true, true) => return Ok(len),
        (false, true) => libc::MADV_REMOVE,
        (_, false) => libc::MADV_DONTNEED,
    };
    let host = region.as_ptr() as usize + offset as usize;
    // SAFETY: [host, host + len) lies inside this region's mapping
    // (checked above); dropping its pages only makes the guest read zeros
    // (or the file's hole) there next.
    if unsafe { libc::madvise(host as *mut libc::c_void, len as usize, advice) } != 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    Ok(len)
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        self.mem = GuestMemoryMmap::default();
        for (region, addr, len) in self.maps.drain(..) {
            if Arc::strong_count(&region) != 1 {
                devices::error_limited!(
                    "guest RAM at {addr:#x} still referenced at teardown: left mapped"
                );
                continue;
            }
            drop(region);
            // SAFETY: [addr, addr + len) is a mapping this struct made and
            // nothing references any more (the count above).
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
        }
    }
}

/// Reserves `len` bytes of address space whose start is a multiple of
/// `align`: map `align` more than needed, then unmap the unaligned head
/// and the tail. The caller maps the RAM over it (MAP_FIXED).
fn reserve_aligned(len: usize, align: usize) -> std::io::Result<usize> {
    let total = len + align;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a fresh anonymous mapping at an address the kernel picks.
    let raw = unsafe { libc::mmap(std::ptr::null_mut(), total, libc::PROT_NONE, flags, -1, 0) };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let raw = raw as usize;
    let start = raw.next_multiple_of(align);
    let (head, tail) = (start - raw, raw + total - (start + len));
    // SAFETY: both ranges lie inside the mapping just made and outside
    // [start, start + len), which nothing has seen yet.
    unsafe {
        if head > 0 {
            libc::munmap(raw as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
    }
    Ok(start)
}

/// Maps `len` bytes of RAM at `addr` (inside a reservation of ours): the
/// memfd at `offset`, or anonymous memory.
fn map_at(addr: usize, len: usize, flags: i32, fd: Option<(i32, u64)>) -> std::io::Result<()> {
    let (fd, offset) = fd.unwrap_or((-1, 0));
    let offset = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
    let flags = flags | libc::MAP_FIXED;
    // SAFETY: MAP_FIXED over [addr, addr + len), a reservation this module
    // made and nothing else uses; fd is ours or -1 (anonymous).
    let got = unsafe { libc::mmap(addr as *mut libc::c_void, len, PROT, flags, fd, offset) };
    if got == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        // SAFETY: the reservation is ours and unused.
        unsafe { libc::munmap(addr as *mut libc::c_void, len) };
        return Err(e);
    }
    Ok(())
}

fn advise(addr: usize, len: usize, advice: i32, what: &str) {
    // SAFETY: [addr, addr + len) is guest RAM this module mapped; the
    // advice only tells the kernel how to back it.
    if unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) } != 0 {
        // KSM or THP may be compiled out, or not apply to shared memory;
        // QEMU carries on too.
        log::debug!("madvise({what}): {}", std::io::Error::last_os_error());
    }
}

/// A memfd of `size` bytes as QEMU's memory-backend-memfd makes it.
fn memfd(size: u64, hugetlb: Option<u64>, seal: bool) -> std::io::Result<File> {
    let mut flags = libc::MFD_CLOEXEC;
    if seal {
        flags |= libc::MFD_ALLOW_SEALING;
    }
    if let Some(page) = hugetlb {
        flags |= libc::MFD_HUGETLB;
        if page != 0 {
            flags |= page.trailing_zeros() << libc::MFD_HUGE_SHIFT;
        }
    }
    // SAFETY: a NUL-terminated name and flags; returns a new descriptor.
    let fd = unsafe { libc::memfd_create(MEMFD_NAME.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    if seal {
        // A backend that maps the memfd can rely on its size.
        let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor `file` owns.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(file)
}

/// The host's default huge page size (`Hugepagesize` in /proc/meminfo).
fn default_huge_page() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix("Hugepagesize:"))
            .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<usize>().ok())
            .map_or(HUGE_PAGE, |kib| kib << 10)
    })
}

/// Guest RAM of `size` bytes, backed as `ram` says; `mem_merge` is the
/// machine's default for KSM.
pub fn create(size: u64, cfg: &RamConfig, mem_merge: bool) -> Result<GuestRam, Error> {
    let alloc_err = |source| Error::Allocate { size: size >> 20, source };
    let (file, share, align, hugetlb) = match cfg.backing {
        RamBacking::Anonymous => (None, false, HUGE_PAGE, None),
        RamBacking::AnonymousShared => (None, true, HUGE_PAGE, None),
        RamBacking::Memfd { share, hugetlb, seal } => {
            let file = memfd(size, hugetlb, seal).map_err(Error::Memfd)?;
            let page = match hugetlb {
                Some(0) => default_huge_page(),
                Some(p) => p as usize,
                None => HUGE_PAGE,
            };
            let huge = hugetlb.map(|_| page as u64);
            (Some(Arc::new(file)), share, page.max(HUGE_PAGE), huge)
        }
    };
    let mut flags = match (&file, share) {
        (Some(_), true) => libc::MAP_SHARED,
        (Some(_), false) => libc::MAP_PRIVATE,
        (None, true) => libc::MAP_SHARED | libc::MAP_ANONYMOUS,
        (None, false) => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
    };
    // Huge pages are reserved when mapped (as QEMU's reserve=on), so a
    // pool too small fails here and not as a SIGBUS mid-boot; other RAM is
    // committed as the guest touches it.
    if hugetlb.is_none() {
        flags |= libc::MAP_NORESERVE;
    }
    let page = hugetlb.unwrap_or(4096);
    let mut ram = GuestRam { mem: GuestMemoryMmap::default(), maps: Vec::new(), page };
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (base, len) in ram_ranges(size) {
        let len = usize::try_from(len).map_err(|_| Error::Range(format!("{len:#x} bytes")))?;
        let addr = reserve_aligned(len, align).map_err(alloc_err)?;
        let fd = file.as_ref().map(|f| (f.as_raw_fd(), offset));
        map_at(addr, len, flags, fd).map_err(alloc_err)?;
        let mut builder = MmapRegionBuilder::new(len).with_mmap_prot(PROT).with_mmap_flags(flags);
        if let Some(f) = &file {
            builder = builder.with_file_offset(FileOffset::from_arc(f.clone(), offset));
        }
        // SAFETY: [addr, addr + len) is the mapping just made; `ram` keeps
        // it until nothing refers to the region any more.
        let region = match unsafe { builder.with_raw_mmap_pointer(addr as *mut u8) }.build() {
            Ok(r) => Arc::new(r),
            Err(e) => {
                // SAFETY: nothing has seen the mapping yet.
                unsafe { libc::munmap(addr as *mut libc::c_void, len) };
                return Err(Error::Region(e));
            }
        };
        ram.maps.push((region.clone(), addr, len));
        // Far fewer faults (each a nested exit in a test host) when the
        // guest first touches its RAM.
        advise(addr, len, libc::MADV_HUGEPAGE, "MADV_HUGEPAGE");
        if cfg.merge.unwrap_or(mem_merge) {
            advise(addr, len, libc::MADV_MERGEABLE, "MADV_MERGEABLE");
        }
        if !cfg.dump {
            advise(addr, len, libc::MADV_DONTDUMP, "MADV_DONTDUMP");
        }
        let guest = GuestRegionMmap::with_arc(region, GuestAddress(base))
            .ok_or_else(|| Error::Range(format!("region at {base:#x} wraps around")))?;
        regions.push(guest);
        offset += len as u64;
    }
    ram.mem = GuestMemoryMmap::from_regions(regions).map_err(Error::Layout)?;
    Ok(ram)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn regions_start_on_huge_page_boundaries() {
        // 4 GiB: RAM below the 32-bit hole and above 4 GiB.
        let ram = create(4 << 30, &RamConfig::default(), true).unwrap();
        let mem = ram.memory();
        assert_eq!(mem.num_regions(), 2);
        for r in mem.iter() {
            assert_eq!(r.as_ptr() as usize % HUGE_PAGE, 0, "region at {:#x}", r.start_addr().0);
            let last = r.start_addr().unchecked_add(r.len() - 8);
            mem.write_obj(0x1234_5678_u64, last).unwrap();
            assert_eq!(mem.read_obj::<u64>(last).unwrap(), 0x1234_5678);
        }
    }

    #[test]
    fn ram_still_referenced_is_left_mapped() {
        let ram = create(64 << 20, &RamConfig::default(), false).unwrap();
        let kept = ram.memory().clone();
        drop(ram);
        // Still mapped: a leak, not a use after unmap.
        kept.write_obj(7u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(kept.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 7);
    }

    /// Discarded RAM reads zeros, on anonymous RAM and on a memfd, whose
    /// blocks leave the file; a range that is not RAM is refused; only the
    /// whole host pages of a range go.
    #[test]
    fn discarded_ram_reads_zeros_and_leaves_the_memfd() {
        let memfd = RamBacking::Memfd { share: true, hugetlb: None, seal: true };
        for backing in [RamBacking::Anonymous, RamBacking::AnonymousShared, memfd] {
            let ram = create(
                64 << 20,
                &RamConfig { backing: backing.clone(), ..Default::default() },
                false,
            )
            .unwrap();
            let mem = ram.memory();
            let at = GuestAddress(0x20_0000);
            mem.write_slice(&[0xa5; 3 << 12], at).unwrap();
            let blocks = || {
                let r = mem.iter().next().unwrap();
                r.file_offset().map(|f| {
                    use std::os::unix::fs::MetadataExt;
                    f.file().metadata().unwrap().blocks()
                })
            };
            let before = blocks();
            let d = ram.discarder();
            assert_eq!(d.discard(0x20_1000, 0x1000).unwrap(), 0x1000);
            // Before the guest reads: reading a hole of a shared memfd
            // allocates a (zeroed) page again.
            if let (Some(before), Some(after)) = (before, blocks()) {
                assert_eq!(after, before - 8, "one 4 KiB page (8 sectors) left the memfd");
            }
            let mut got = [0u8; 3];
            for (i, b) in got.iter_mut().enumerate() {
                *b = mem.read_obj(GuestAddress(0x20_0000 + i as u64 * 0x1000)).unwrap();
            }
            assert_eq!(got, [0xa5, 0, 0xa5], "{backing:?}");
            // Within one page, nothing; across two, neither whole.
            assert_eq!(d.discard(0x20_0800, 0x1000).unwrap(), 0);
            assert_eq!(d.discard(0x20_0000, 0x800).unwrap(), 0);
            assert_eq!(mem.read_obj::<u8>(at).unwrap(), 0xa5);
            assert!(d.discard(64 << 20, 0x1000).is_err(), "past RAM");
            assert!(d.discard(u64::MAX - 0xfff, 0x1000).is_err(), "wraps");
            assert_eq!(d.discard(0, 0).unwrap(), 0, "empty");
        }
    }

    /// With huge pages only whole ones go: 4 KiB pages of a 2 MiB page
    /// stay until the whole page is given.
    #[test]
    fn huge_pages_are_discarded_whole() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let huge = 2 << 20;
        assert_eq!(discard(&mem, huge, 0x20_0000, 0x1000).unwrap(), 0);
        assert_eq!(discard(&mem, huge, 0x1f_f000, huge + 0x2000).unwrap(), huge);
        assert_eq!(discard(&mem, huge, 0, 8 << 20).unwrap(), 8 << 20);
    }

    /// memory-backend-memfd: both RAM ranges of a 4 GiB guest in one memfd
    /// (shown as such in /proc/self/maps), at consecutive offsets, sealed
    /// against resizing; writes through the guest mapping reach the file.
    #[test]
    fn memfd_ram_is_one_sealed_file_with_offsets() {
        let backing = RamBacking::Memfd { share: true, hugetlb: None, seal: true };
        let ram = create(4 << 30, &RamConfig { backing, ..Default::default() }, false).unwrap();
        let mem = ram.memory();
        let offsets: Vec<u64> =
            mem.iter().map(|r| r.file_offset().expect("a memfd").start()).collect();
        assert_eq!(offsets, [0, boot::layout::MAX_BELOW_4G]);
        let regions: Vec<_> = mem.iter().collect();
        let file = regions[1].file_offset().unwrap().file();
        assert_eq!(file.metadata().unwrap().len(), 4 << 30);
        assert!(file.set_len(1 << 30).is_err(), "sealed against shrinking");
        mem.write_obj(0xabcd_u16, GuestAddress(boot::layout::FIRST_ADDR_PAST_4G + 8)).unwrap();
        let mut b = [0u8; 2];
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut b, boot::layout::MAX_BELOW_4G + 8).unwrap();
        assert_eq!(u16::from_le_bytes(b), 0xabcd);
        for r in mem.iter() {
            assert_eq!(r.as_ptr() as usize % HUGE_PAGE, 0);
        }
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(maps.contains("/memfd:memory-backend-memfd (deleted)"), "{maps}");
    }
}
