//! The run's guest-physical map: KVM's memory slots (numbers given out
//! once and taken back, the lowest free first, so a device that maps and
//! unmaps a BAR as the guest toggles decode never runs out), guest RAM,
//! and host ranges (a file's pages: a passed-through device's BAR, a
//! memfd) mapped into the guest and out again while it runs.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use boot::GuestMemoryMmap;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use super::Error;

/// A host file's range to map at a guest address.
pub struct HostRange<'a> {
    pub fd: BorrowedFd<'a>,
    /// Where in the file (page aligned).
    pub offset: u64,
    /// Bytes (a multiple of the page size).
    pub len: u64,
    /// Guest-physical address (page aligned).
    pub guest: u64,
    /// The guest may not write (KVM_MEM_READONLY; writes exit as MMIO).
    pub read_only: bool,
}

/// A host mapping this map made, and where the guest sees it.
struct Mapping {
    host: usize,
    len: usize,
    guest: u64,
    read_only: bool,
}

/// Owner of one run's guest-physical map.
pub struct GuestMap {
    vm: Arc<VmFd>,
    /// Slots below `next` that are free again.
    free: BTreeSet<u32>,
    next: u32,
    /// KVM's limit (KVM_CAP_NR_MEMSLOTS).
    max: u32,
    mapped: HashMap<u32, Mapping>,
}

impl GuestMap {
    /// `max`: how many slots KVM has for the VM.
    pub fn new(vm: Arc<VmFd>, max: u32) -> Self {
        GuestMap { vm, free: BTreeSet::new(), next: 0, max, mapped: HashMap::new() }
    }

    fn take_slot(&mut self) -> Result<u32, Error> {
        if let Some(slot) = self.free.pop_first() {
            return Ok(slot);
        }
        if self.next >= self.max {
            return Err(Error::NoSlot(self.max));
        }
        self.next += 1;
        Ok(self.next - 1)
    }

    fn set_slot(
        &self,
        slot: u32,
        guest: u64,
        len: u64,
        host: u64,
        read_only: bool,
    ) -> Result<(), Error> {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: guest,
            memory_size: len,
            userspace_addr: host,
            flags: if read_only { KVM_MEM_READONLY } else { 0 },
        };
        // SAFETY: `host` is a live mapping of at least `len` bytes that
        // outlives the slot: guest RAM (kept by the run's `GuestRam` until
        // the VM is gone) or a mapping of this map's, unmapped only after
        // its slot is deleted. A zero `len` deletes the slot.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(Error::Register)
    }

    /// Registers every RAM region with KVM, each in a slot of its own.
    pub fn add_ram(&mut self, mem: &GuestMemoryMmap) -> Result<(), Error> {
        for region in mem.iter() {
            let slot = self.take_slot()?;
            let guest = region.start_addr().raw_value();
            self.set_slot(slot, guest, region.len(), region.as_ptr() as u64, false)?;
        }
        Ok(())
    }

    /// Maps `range` of a host file into the guest in a new slot, which it
    /// returns.
    pub fn map(&mut self, range: HostRange<'_>) -> Result<u32, Error> {
        let failed = |source| Error::MapHost { guest: range.guest, len: range.len, source };
        let len = usize::try_from(range.len).map_err(|e| failed(std::io::Error::other(e)))?;
        let offset =
            libc::off_t::try_from(range.offset).map_err(|e| failed(std::io::Error::other(e)))?;
        let prot =
            if range.read_only { libc::PROT_READ } else { libc::PROT_READ | libc::PROT_WRITE };
        // SAFETY: a new shared mapping of the caller's descriptor at an
        // address the kernel picks; nothing else refers to it yet.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                range.fd.as_raw_fd(),
                offset,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(failed(std::io::Error::last_os_error()));
        }
        let mapping =
            Mapping { host: host as usize, len, guest: range.guest, read_only: range.read_only };
        let slot = match self.take_slot() {
            Ok(slot) => slot,
            Err(e) => {
                unmap_host(&mapping);
                return Err(e);
            }
        };
        if let Err(e) = self.set_slot(slot, range.guest, range.len, host as u64, range.read_only) {
            unmap_host(&mapping);
            self.free.insert(slot);
            return Err(e);
        }
        self.mapped.insert(slot, mapping);
        Ok(slot)
    }

    /// Takes a mapping out of the guest (its slot deleted first, so the
    /// guest never reaches an unmapped page) and frees its slot.
    pub fn unmap(&mut self, slot: u32) -> Result<(), Error> {
        let m = self.mapped.get(&slot).ok_or(Error::NoMapping(slot))?;
        self.set_slot(slot, m.guest, 0, m.host as u64, m.read_only)?;
        if let Some(m) = self.mapped.remove(&slot) {
            unmap_host(&m);
        }
        self.free.insert(slot);
        Ok(())
    }
}

impl Drop for GuestMap {
    fn drop(&mut self) {
        let slots: Vec<u32> = self.mapped.keys().copied().collect();
        for slot in slots {
            if let Err(e) = self.unmap(slot) {
                // The VM may still reach it: leave it mapped (a leak, never
                // a page the guest could fault on after munmap).
                devices::error_limited!("guest map: cannot remove KVM slot {slot}: {e}");
                self.mapped.remove(&slot);
            }
        }
    }
}

fn unmap_host(m: &Mapping) {
    // SAFETY: a mapping this map made, which no slot refers to any more.
    unsafe { libc::munmap(m.host as *mut libc::c_void, m.len) };
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    use devices::{Bus, BusDevice};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::vm::vcpu::tests::run_real_mode;

    /// Records port writes; a write to the second port stops the vCPU.
    struct Port {
        bytes: Vec<u8>,
        stop: Arc<AtomicBool>,
    }

    impl BusDevice for Port {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            match offset {
                0 => self.bytes.extend_from_slice(data),
                _ => self.stop.store(true, std::sync::atomic::Ordering::Release),
            }
        }
    }

    /// Runs a real-mode guest that copies four bytes from guest address
    /// 0x20000 (`rep outsb` from a segment of 0x2000) to port 0x80, then
    /// writes port 0x81; returns what the port saw.
    fn guest_reads_the_window(vm: &Arc<VmFd>, mem: &GuestMemoryMmap) -> Vec<u8> {
        #[rustfmt::skip]
        let code: &[u8] = &[
            0xb8, 0x00, 0x20, // mov ax, 0x2000
            0x8e, 0xd8,       // mov ds, ax
            0x31, 0xf6,       // xor si, si
            0xb9, 0x04, 0x00, // mov cx, 4
            0xba, 0x80, 0x00, // mov dx, 0x80
            0xf3, 0x6e,       // rep outsb
            0xba, 0x81, 0x00, // mov dx, 0x81
            0xee,             // out dx, al
            0xf4,             // hlt
        ];
        mem.write_slice(code, GuestAddress(0x1000)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let port = Arc::new(Mutex::new(Port { bytes: Vec::new(), stop: stop.clone() }));
        let pio = Arc::new(Bus::new());
        pio.insert(port.clone(), 0x80, 2).unwrap();
        run_real_mode(vm, 0x1000, pio, stop);
        let bytes = port.lock().unwrap().bytes.clone();
        bytes
    }

    /// A memfd page mapped into a VM on /dev/kvm as a slot of its own: the
    /// guest reads its bytes; once unmapped, the slot number is the next
    /// one given out.
    #[test]
    fn a_host_page_mapped_as_a_slot_reaches_the_guest_and_its_slot_is_reused() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = Arc::new(kvm.create_vm().unwrap());
        let mut map = GuestMap::new(vm.clone(), kvm.get_nr_memslots() as u32);
        // RAM below the window: code at 0x1000.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        map.add_ram(&mem).unwrap();

        let mut page = tempfile_memfd();
        page.write_all(b"skif").unwrap();
        page.set_len(4096).unwrap();
        let range = |fd| HostRange { fd, offset: 0, len: 4096, guest: 0x20000, read_only: true };
        let slot = map.map(range(page.as_fd())).unwrap();
        assert_eq!(slot, 1, "slot 0 is RAM");
        assert_eq!(guest_reads_the_window(&vm, &mem), b"skif");

        map.unmap(slot).unwrap();
        assert!(matches!(map.unmap(slot), Err(Error::NoMapping(1))));
        let again = map.map(range(page.as_fd())).unwrap();
        assert_eq!(again, slot, "the freed slot is given out again");
        let other = map.map(HostRange { guest: 0x30000, ..range(page.as_fd()) }).unwrap();
        assert_eq!(other, 2);
    }

    /// Slots run out at KVM's limit, and one given back is found again.
    #[test]
    fn slots_are_bounded_and_reused_lowest_first() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = Arc::new(kvm.create_vm().unwrap());
        let mut map = GuestMap::new(vm, 3);
        let mut taken: Vec<u32> = (0..3).map(|_| map.take_slot().unwrap()).collect();
        assert_eq!(taken, [0, 1, 2]);
        assert!(matches!(map.take_slot(), Err(Error::NoSlot(3))));
        map.free.insert(1);
        map.free.insert(0);
        taken.push(map.take_slot().unwrap());
        assert_eq!(taken[3], 0);
    }

    fn tempfile_memfd() -> std::fs::File {
        // SAFETY: a NUL-terminated name; returns a new descriptor.
        let fd = unsafe { libc::memfd_create(c"skiff-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nothing else owns.
        unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
    }
}
