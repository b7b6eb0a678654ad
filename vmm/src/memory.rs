//! Guest RAM: anonymous private mappings (vm-memory), laid out as QEMU's
//! microvm does, registered with KVM. Nothing is touched up front: the host
//! commits pages as the guest first uses them.

use boot::layout::ram_ranges;
use boot::GuestMemoryMmap;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot allocate {size} MiB of guest RAM: {source}")]
    Allocate {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("KVM_SET_USER_MEMORY_REGION: {0}")]
    Register(#[source] kvm_ioctls::Error),
}

pub fn create(size: u64, merge: bool) -> Result<GuestMemoryMmap, Error> {
    let ranges: Vec<_> =
        ram_ranges(size).into_iter().map(|(b, l)| (GuestAddress(b), l as usize)).collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|source| Error::Allocate { size: size >> 20, source })?;
    for region in mem.iter() {
        // SAFETY: as below; MADV_HUGEPAGE only asks for transparent huge
        // pages: far fewer faults (each one a nested exit in a test host)
        // when the guest first touches its RAM.
        let rc = unsafe {
            libc::madvise(region.as_ptr().cast(), region.len() as usize, libc::MADV_HUGEPAGE)
        };
        if rc != 0 {
            log::debug!("madvise(MADV_HUGEPAGE): {}", std::io::Error::last_os_error());
        }
    }
    if merge {
        for region in mem.iter() {
            // SAFETY: the range is a mapping vm-memory owns for the life of
            // `mem`; MADV_MERGEABLE only changes how the kernel may share it.
            let rc = unsafe {
                libc::madvise(region.as_ptr().cast(), region.len() as usize, libc::MADV_MERGEABLE)
            };
            if rc != 0 {
                // KSM may be compiled out; QEMU carries on too.
                log::debug!("madvise(MADV_MERGEABLE): {}", std::io::Error::last_os_error());
            }
        }
    }
    Ok(mem)
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
        // SAFETY: the host range is a live mapping owned by `mem`, which the
        // caller keeps alive for as long as the VM exists.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(Error::Register)?;
    }
    Ok(())
}
