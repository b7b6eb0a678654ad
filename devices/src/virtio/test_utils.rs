//! Test helpers: a small guest memory, a virtqueue laid out in it from the
//! driver's side, and an interrupt that records what it was asked to raise.
// Built for the fuzz targets too (feature `fuzzing`), which use part of it.
#![cfg_attr(not(test), allow(dead_code))]

use std::sync::Mutex;

use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use super::{GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType};

pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
pub const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

pub const INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;

/// Where tests put data buffers: above any queue layout at address 0.
pub const DATA: u64 = 0x10_0000;
/// Where tests put indirect descriptor tables (up to 1 MiB: 65,536 entries).
pub const TABLE: u64 = 0x20_0000;

/// Guest RAM at 0..size.
pub fn guest_mem(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

pub fn fill(mem: &GuestMemoryMmap, addr: u64, len: usize, byte: u8) {
    mem.write_slice(&vec![byte; len], GuestAddress(addr)).unwrap();
}

pub fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// A split virtqueue at guest address 0, driven as the guest driver would.
///
/// MockSplitQueue places the used ring `size` bytes (not `2 * size`) after
/// the avail ring, so the two overlap past avail entry `size / 2`: tests
/// make fewer than `size / 2` chains available.
pub struct TestQueue<'a> {
    mem: &'a GuestMemoryMmap,
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    size: u16,
    next_desc: u16,
}

impl<'a> TestQueue<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
        TestQueue { mem, mock: MockSplitQueue::new(mem, size), size, next_desc: 0 }
    }

    /// A queue whose rings start at `base` instead of 0.
    pub fn new_at(mem: &'a GuestMemoryMmap, size: u16, base: u64) -> Self {
        let mock = MockSplitQueue::create(mem, vm_memory::GuestAddress(base), size);
        TestQueue { mem, mock, size, next_desc: 0 }
    }

    /// Adds a chain of `(addr, len, flags)` descriptors, linked in order
    /// (NEXT is set on all but the last), and makes it available.
    pub fn add_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let flags = if i + 1 == descs.len() { flags & !NEXT } else { flags | NEXT };
                Descriptor::new(addr, len, flags, head + i as u16 + 1).into()
            })
            .collect();
        self.mock.add_desc_chains(&raw, head).unwrap();
        self.next_desc += descs.len() as u16;
        head
    }

    /// Writes one descriptor as is, for chains a correct driver never builds.
    pub fn store_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.mock
            .desc_table()
            .store(index, Descriptor::new(addr, len, flags, next).into())
            .unwrap();
    }

    /// Makes descriptor `index` point at an indirect table at `table` of
    /// `entries` device-writable descriptors of `len` bytes each, all at
    /// `data` and chained in order.
    pub fn store_indirect(&self, index: u16, table: u64, entries: u16, data: u64, len: u32) {
        let mem = self.mem;
        for i in 0..entries {
            let last = i + 1 == entries;
            let flags = if last { WRITE } else { WRITE | NEXT };
            let d = Descriptor::new(data, len, flags, i.wrapping_add(1));
            mem.write_obj(d, GuestAddress(table + u64::from(i) * 16)).unwrap();
        }
        self.store_desc(index, table, u32::from(entries) * 16, INDIRECT, 0);
    }

    /// Puts `head` on the available ring, whatever it points to.
    pub fn make_available(&self, head: u16) {
        let avail = self.mock.avail();
        let idx = avail.idx().load();
        avail.ring().ref_at(usize::from(idx % self.size)).unwrap().store(head);
        avail.idx().store(idx.wrapping_add(1));
    }

    /// Sets the available ring's index as a (possibly broken) driver would.
    pub fn set_avail_idx(&self, idx: u16) {
        self.mock.avail().idx().store(idx);
    }

    /// A ready device-side queue matching this layout.
    pub fn queue(&self) -> Queue {
        self.mock.create_queue::<Queue>().unwrap()
    }

    /// The used ring as (descriptor head, bytes written) pairs.
    pub fn used(&self) -> Vec<(u32, u32)> {
        let used = self.mock.used();
        (0..used.idx().load())
            .map(|i| {
                let e = used.ring().ref_at(usize::from(i % self.size)).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    /// Descriptors `add_chain` has handed out so far.
    pub fn descriptors_used(&self) -> u16 {
        self.next_desc
    }

    pub fn desc_table_addr(&self) -> u64 {
        self.mock.desc_table_addr().0
    }

    pub fn avail_addr(&self) -> u64 {
        self.mock.avail_addr().0
    }

    pub fn used_addr(&self) -> u64 {
        self.mock.used_addr().0
    }
}

/// Waits (at most `secs` seconds) until `done` holds, for a device's
/// worker thread to get somewhere; the caller asserts on what it did.
pub fn wait_until(secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !done() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Records every interrupt a device raises.
#[derive(Default)]
pub struct RecordingInterrupt(pub Mutex<Vec<VirtioInterruptType>>);

impl RecordingInterrupt {
    pub fn take(&self) -> Vec<VirtioInterruptType> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

impl VirtioInterrupt for RecordingInterrupt {
    fn trigger(&self, t: VirtioInterruptType) -> std::io::Result<()> {
        self.0.lock().unwrap().push(t);
        Ok(())
    }

    /// Recorded as the config interrupt that goes with it.
    fn needs_reset(&self) {
        self.0.lock().unwrap().push(VirtioInterruptType::Config);
    }
}

/// What this test binary logged at the default level (warn and above):
/// installs a capturing logger on first use.
pub fn logged_lines() -> Vec<String> {
    struct Capture;
    static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());
    impl log::Log for Capture {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= log::Level::Warn
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                LINES.lock().unwrap_or_else(|e| e.into_inner()).push(r.args().to_string());
            }
        }
        fn flush(&self) {}
    }
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        if log::set_logger(&Capture).is_ok() {
            log::set_max_level(log::LevelFilter::Warn);
        }
    });
    LINES.lock().unwrap_or_else(|e| e.into_inner()).clone()
}
