//! Guest RAM: anonymous private mappings, laid out as QEMU's microvm does,
//! registered with KVM. Nothing is touched up front: the host commits pages
//! as the guest first uses them.
//!
//! Each region starts at a 2 MiB-aligned host address. KVM can map a
//! transparent huge page with one 2 MiB stage-2 entry only where the host
//! address and the guest address agree modulo 2 MiB, and guest RAM starts at
//! guest address 0; QEMU aligns its RAM the same way. vm-memory maps at
//! whatever address mmap picks, so skiff maps the RAM itself and hands
//! vm-memory the aligned pointers; [`GuestRam`] unmaps it.

use std::sync::Arc;

use boot::layout::ram_ranges;
use boot::GuestMemoryMmap;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

/// A transparent huge page on x86-64.
const HUGE_PAGE: usize = 2 << 20;
const PROT: i32 = libc::PROT_READ | libc::PROT_WRITE;
const FLAGS: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot allocate {size} MiB of guest RAM: {source}")]
    Allocate {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up guest RAM: {0}")]
    Layout(String),
    #[error("KVM_SET_USER_MEMORY_REGION: {0}")]
    Register(#[source] kvm_ioctls::Error),
}

/// Owns the guest RAM mappings; dropping it unmaps them, unless something
/// still holds a region (a reference leaked past the VM's end), in which
/// case they stay mapped: a leak, never a dangling mapping.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    maps: Vec<(Arc<MmapRegion<()>>, usize, usize)>,
}

impl GuestRam {
    /// The guest's memory, for the VM, devices and loaders to share.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        self.mem = GuestMemoryMmap::default();
        for (region, addr, len) in self.maps.drain(..) {
            if Arc::strong_count(&region) != 1 {
                log::error!("guest RAM at {addr:#x} still referenced at teardown: left mapped");
                continue;
            }
            drop(region);
            // SAFETY: [addr, addr + len) is a mapping this struct made and
            // nothing references any more (the count above).
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
        }
    }
}

/// An anonymous mapping of `len` bytes whose start is a multiple of 2 MiB:
/// map 2 MiB more than needed, then unmap the unaligned head and the tail.
fn map_aligned(len: usize) -> std::io::Result<usize> {
    let total = len + HUGE_PAGE;
    // SAFETY: a fresh anonymous mapping at an address the kernel picks.
    let raw = unsafe { libc::mmap(std::ptr::null_mut(), total, PROT, FLAGS, -1, 0) };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let raw = raw as usize;
    let start = raw.next_multiple_of(HUGE_PAGE);
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

fn advise(addr: usize, len: usize, advice: i32, what: &str) {
    // SAFETY: [addr, addr + len) is guest RAM this module mapped; the
    // advice only tells the kernel how to back it.
    if unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) } != 0 {
        // KSM or THP may be compiled out; QEMU carries on too.
        log::debug!("madvise({what}): {}", std::io::Error::last_os_error());
    }
}

pub fn create(size: u64, merge: bool) -> Result<GuestRam, Error> {
    let alloc_err = |source| Error::Allocate { size: size >> 20, source };
    let mut ram = GuestRam { mem: GuestMemoryMmap::default(), maps: Vec::new() };
    let mut regions = Vec::new();
    for (base, len) in ram_ranges(size) {
        let len = usize::try_from(len).map_err(|_| Error::Layout(format!("{len:#x} bytes")))?;
        let addr = map_aligned(len).map_err(alloc_err)?;
        // SAFETY: [addr, addr + len) is the mapping just made; `ram` keeps
        // it until nothing refers to the region any more.
        let builder = unsafe {
            MmapRegionBuilder::new(len)
                .with_mmap_prot(PROT)
                .with_mmap_flags(FLAGS)
                .with_raw_mmap_pointer(addr as *mut u8)
        };
        let region = match builder.build() {
            Ok(r) => Arc::new(r),
            Err(e) => {
                // SAFETY: nothing has seen the mapping yet.
                unsafe { libc::munmap(addr as *mut libc::c_void, len) };
                return Err(Error::Layout(e.to_string()));
            }
        };
        ram.maps.push((region.clone(), addr, len));
        // Far fewer faults (each a nested exit in a test host) when the
        // guest first touches its RAM.
        advise(addr, len, libc::MADV_HUGEPAGE, "MADV_HUGEPAGE");
        if merge {
            advise(addr, len, libc::MADV_MERGEABLE, "MADV_MERGEABLE");
        }
        let guest = GuestRegionMmap::with_arc(region, GuestAddress(base))
            .ok_or_else(|| Error::Layout(format!("region at {base:#x} wraps around")))?;
        regions.push(guest);
    }
    ram.mem = GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Layout(e.to_string()))?;
    Ok(ram)
}

pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), Error> {
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the host range is a live mapping of the caller's
        // `GuestRam`, which it keeps for as long as the VM exists.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(Error::Register)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn regions_start_on_huge_page_boundaries() {
        // 4 GiB: RAM below the 32-bit hole and above 4 GiB.
        let ram = create(4 << 30, true).unwrap();
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
        let ram = create(64 << 20, false).unwrap();
        let kept = ram.memory().clone();
        drop(ram);
        // Still mapped: a leak, not a use after unmap.
        kept.write_obj(7u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(kept.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 7);
    }
}
