//! virtio-balloon on hand-built queues, with a discard that records what
//! it was given. Built for the fuzz target too (feature `fuzzing`), where
//! only `fuzz_queues` is used.
#![cfg_attr(not(test), allow(dead_code, unused_imports))]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::virtio::test_utils::*;
use crate::virtio::ActiveQueue;

const MEM: usize = 0x40_0000;
/// Where each queue's rings start (inflate, deflate, stats, reporting).
const RINGS: [u64; 4] = [0, 0x4000, 0x8000, 0xc000];

/// Records every range handed back, and gives back only whole 4 KiB
/// pages inside guest RAM (as the memory code does).
#[derive(Default)]
struct Recorder {
    ranges: Mutex<Vec<(u64, u64)>>,
}

impl RamDiscard for Recorder {
    fn discard(&self, addr: u64, len: u64) -> std::io::Result<u64> {
        if addr.checked_add(len).is_none_or(|end| end > MEM as u64) {
            return Err(std::io::Error::other("not RAM"));
        }
        self.ranges.lock().unwrap().push((addr, len));
        Ok(len)
    }
}

impl Recorder {
    fn take(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.ranges.lock().unwrap())
    }
}

/// Counts `actual` changes.
#[derive(Default)]
struct Changes(Mutex<Vec<u32>>);

impl BalloonEvents for Changes {
    fn actual_changed(&self, pages: u32) {
        self.0.lock().unwrap().push(pages);
    }
}

fn handle() -> (BalloonHandle, Arc<Changes>) {
    let changes = Arc::new(Changes::default());
    (BalloonHandle::new(changes.clone(), 0), changes)
}

fn active(
    mem: &GuestMemoryMmap,
    tqs: &[&TestQueue],
    shared: &BalloonHandle,
    discard: Option<Arc<Recorder>>,
) -> (BalloonQueues, Arc<RecordingInterrupt>) {
    let irq = Arc::new(RecordingInterrupt::default());
    let ring = |i: usize| {
        let q = ActiveQueue {
            index: i,
            queue: tqs[i].queue(),
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        };
        Ring::new(mem.clone(), q, irq.clone()).unwrap()
    };
    let stats = (tqs.len() > 2).then(|| StatsQueue {
        ring: ring(2),
        held: None,
        timer: TimerFd::new().unwrap(),
    });
    let queues = BalloonQueues {
        inflate: ring(0),
        deflate: ring(1),
        stats,
        reporting: (tqs.len() > 3).then(|| ring(3)),
        discard: discard.map(|d| d as Arc<dyn RamDiscard>),
        shared: shared.0.clone(),
    };
    (queues, irq)
}

/// Activates `b` on `tqs`, queue i kicked through `kicks[i]` (or the one
/// kick for all); the interrupt it raises.
fn start(
    b: &mut Balloon,
    mem: &GuestMemoryMmap,
    tqs: &[TestQueue],
    kicks: &[EventFd],
) -> Arc<RecordingInterrupt> {
    let irq = Arc::new(RecordingInterrupt::default());
    let queues = tqs
        .iter()
        .enumerate()
        .map(|(i, tq)| ActiveQueue {
            index: i,
            queue: tq.queue(),
            kick: kicks[i.min(kicks.len() - 1)].try_clone().unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        })
        .collect();
    b.activate(ActivationContext { mem: mem.clone(), queues, interrupt: irq.clone() }).unwrap();
    irq
}

fn kick() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

fn pfns(mem: &GuestMemoryMmap, at: u64, pfns: &[u32]) -> u32 {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    bytes.len() as u32
}

fn config(b: &Balloon) -> (u32, u32) {
    let mut c = [0u8; 8];
    b.read_config(0, &mut c);
    (u32::from_le_bytes(c[..4].try_into().unwrap()), u32::from_le_bytes(c[4..].try_into().unwrap()))
}

#[test]
fn describes_itself_as_qemu_does() {
    let (h, _) = handle();
    let plain = Balloon::new(h.clone(), BalloonConfig::default(), None);
    assert_eq!(plain.device_type(), 5);
    assert_eq!(plain.features(), VIRTIO_F_VERSION_1 | F_STATS_VQ);
    assert_eq!(plain.queue_max_sizes(), &[128, 128, 128]);
    let all = BalloonConfig { deflate_on_oom: true, free_page_reporting: true };
    let b = Balloon::new(h, all, None);
    assert_eq!(b.features(), VIRTIO_F_VERSION_1 | F_STATS_VQ | F_DEFLATE_ON_OOM | F_REPORTING);
    assert_eq!(b.queue_max_sizes(), &[128, 128, 128, 32]);
    // The config space is 8 bytes: nothing past `actual`.
    let mut past = [0xffu8; 4];
    b.read_config(8, &mut past);
    assert_eq!(past, [0; 4]);
}

/// The host's target shows in `num_pages`; the driver's writes reach
/// `actual` only, and each change of it is told once.
#[test]
fn the_driver_writes_actual_and_only_actual() {
    let (h, changes) = handle();
    let mut b = Balloon::new(h.clone(), BalloonConfig::default(), None);
    h.set_target(0x1234);
    assert_eq!(config(&b), (0x1234, 0));
    b.write_config(0, &[0xff; 4]);
    assert_eq!(config(&b), (0x1234, 0), "num_pages is the host's");
    b.write_config(4, &100u32.to_le_bytes());
    b.write_config(4, &100u32.to_le_bytes());
    // One byte at a time, as a driver may: 0x64 → 0x264.
    b.write_config(5, &[2]);
    // A write straddling num_pages and actual changes only actual's byte.
    b.write_config(2, &[9, 9, 7]);
    assert_eq!(config(&b), (0x1234, 0x207));
    assert_eq!(h.actual(), 0x207);
    assert_eq!(*changes.0.lock().unwrap(), [100, 0x264, 0x207]);
    // Past the config space: nothing.
    b.write_config(8, &[1; 4]);
    b.write_config(u64::MAX, &[1; 4]);
    assert_eq!(config(&b), (0x1234, 0x207));
}

/// A target set before the driver runs is read at probe; once it runs,
/// a new target comes with a config interrupt. A reset keeps the target
/// (QEMU's behaviour for a driver that comes back); `clear` (a reboot)
/// empties it.
#[test]
fn a_new_target_interrupts_a_running_driver() {
    let mem = guest_mem(MEM);
    let tqs: Vec<TestQueue> = RINGS[..3].iter().map(|&b| TestQueue::new_at(&mem, 16, b)).collect();
    let (h, _) = handle();
    let mut b = Balloon::new(h.clone(), BalloonConfig::default(), None);
    h.set_target(10);
    b.ack_features(VIRTIO_F_VERSION_1 | F_STATS_VQ);
    let irq = start(&mut b, &mem, &tqs, &[kick()]);
    assert!(irq.take().is_empty());
    h.set_target(20);
    assert_eq!(irq.take(), [VirtioInterruptType::Config]);
    b.write_config(4, &20u32.to_le_bytes());
    assert!(b.reset());
    h.set_target(30);
    assert!(irq.take().is_empty(), "no driver, no interrupt");
    assert_eq!(config(&b), (30, 0));
    h.clear();
    assert_eq!(config(&b), (0, 0));
}

/// The driver numbers only the queues it negotiated: without the stats
/// queue, reporting is queue 2.
#[test]
fn queues_are_numbered_as_negotiated() {
    let mem = guest_mem(MEM);
    let tqs: Vec<TestQueue> = RINGS[..3].iter().map(|&b| TestQueue::new_at(&mem, 16, b)).collect();
    let (h, _) = handle();
    let cfg = BalloonConfig { deflate_on_oom: false, free_page_reporting: true };
    let rec = Arc::new(Recorder::default());
    let mut b = Balloon::new(h, cfg, Some(rec.clone()));
    b.ack_features(VIRTIO_F_VERSION_1 | F_REPORTING);
    let kicks = [kick(), kick(), kick()];
    start(&mut b, &mem, &tqs, &kicks);
    // A report on queue 2 is served as a report: its block is given back.
    let mut report = TestQueue::new_at(&mem, 16, RINGS[2]);
    report.add_chain(&[(0x20_0000, 0x20_0000, WRITE)]);
    kicks[2].write(1).unwrap();
    wait_until(10, || tqs[2].used().len() == 1);
    assert_eq!(tqs[2].used(), [(0, 0)]);
    assert_eq!(rec.take(), [(0x20_0000, 0x20_0000)]);
    assert!(b.reset());
}

/// Inflated pages go back in runs of contiguous pages, each page once,
/// whatever order the driver listed them in; numbers outside guest RAM
/// are skipped; deflated pages are only returned.
#[test]
fn inflated_pages_are_given_back_in_runs() {
    let mem = guest_mem(MEM);
    let mut tqs: Vec<TestQueue> =
        RINGS[..2].iter().map(|&b| TestQueue::new_at(&mem, 16, b)).collect();
    let len = pfns(&mem, DATA, &[0x103, 0x100, 0x102, 0x101, 0x100, 0x200, 0xffff_ffff]);
    let h0 = tqs[0].add_chain(&[(DATA, len, 0)]);
    // Split across two descriptors, mid-number.
    let len = pfns(&mem, DATA + 0x100, &[0x300, 0x301]);
    let h1 = tqs[0].add_chain(&[(DATA + 0x100, 3, 0), (DATA + 0x103, len - 3, 0)]);
    let len = pfns(&mem, DATA + 0x200, &[0x100, 0x101]);
    let h2 = tqs[1].add_chain(&[(DATA + 0x200, len, 0)]);
    let (h, _) = handle();
    let rec = Arc::new(Recorder::default());
    let (mut q, irq) = active(&mem, &[&tqs[0], &tqs[1]], &h, Some(rec.clone()));
    q.serve_inflate();
    q.serve_deflate();
    assert_eq!(tqs[0].used(), [(h0.into(), 0), (h1.into(), 0)]);
    assert_eq!(tqs[1].used(), [(h2.into(), 0)]);
    assert_eq!(rec.take(), [(0x10_0000, 0x4000), (0x20_0000, 0x1000), (0x30_0000, 0x2000)]);
    assert_eq!(irq.take(), [VirtioInterruptType::Queue(0), VirtioInterruptType::Queue(1)]);
    // A bad chain (outside memory) is returned untouched.
    let bad = tqs[0].add_chain(&[(MEM as u64 - 2, 8, 0)]);
    q.serve_inflate();
    assert_eq!(tqs[0].used().last(), Some(&(bad.into(), 0)));
    assert!(rec.take().is_empty());
}

/// With RAM pinned (no discard), inflation is accounted and nothing is
/// given back.
#[test]
fn pinned_ram_is_never_discarded() {
    let mem = guest_mem(MEM);
    let mut tqs: Vec<TestQueue> =
        RINGS[..4].iter().map(|&b| TestQueue::new_at(&mem, 16, b)).collect();
    let len = pfns(&mem, DATA, &[0x100]);
    tqs[0].add_chain(&[(DATA, len, 0)]);
    tqs[3].add_chain(&[(0x20_0000, 0x20_0000, WRITE)]);
    let (h, _) = handle();
    let refs: Vec<&TestQueue> = tqs.iter().collect();
    let (mut q, _) = active(&mem, &refs, &h, None);
    q.serve_inflate();
    q.serve_reporting();
    assert_eq!(tqs[0].used().len(), 1);
    assert_eq!(tqs[3].used().len(), 1);
}

/// One request is read up to `MAX_PFNS` numbers, however long it is.
#[test]
fn a_huge_inflate_request_is_read_only_so_far() {
    let mem = guest_mem(MEM);
    let mut tq = TestQueue::new_at(&mem, 16, 0);
    let tq1 = TestQueue::new_at(&mem, 16, RINGS[1]);
    // 2 * MAX_PFNS numbers, every other page: each its own run.
    let list: Vec<u32> = (0..2 * MAX_PFNS as u32).map(|i| 0x1000 + 2 * i).collect();
    let len = pfns(&mem, DATA, &list);
    tq.add_chain(&[(DATA, len, 0)]);
    let (h, _) = handle();
    // Everything accepted, to count.
    struct Count(AtomicU32);
    impl RamDiscard for Count {
        fn discard(&self, _: u64, len: u64) -> std::io::Result<u64> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(len)
        }
    }
    let count = Arc::new(Count(AtomicU32::new(0)));
    let (mut q, _) = active(&mem, &[&tq, &tq1], &h, None);
    q.discard = Some(count.clone());
    q.serve_inflate();
    assert_eq!(count.0.load(Ordering::Relaxed), MAX_PFNS as u32);
    assert_eq!(tq.used().len(), 1);
}

/// Reported blocks are given back; readable buffers and blocks that are
/// not page aligned are not.
#[test]
fn reported_free_blocks_are_given_back() {
    let mem = guest_mem(MEM);
    let mut tqs: Vec<TestQueue> =
        RINGS[..4].iter().map(|&b| TestQueue::new_at(&mem, 16, b)).collect();
    let h0 = tqs[3].add_chain(&[
        (0x20_0000, 0x10_0000, WRITE),
        (0x30_0000, 0x1000, 0),
        (0x30_0800, 0x1000, WRITE),
        (0x31_0000, 0x2000, WRITE),
    ]);
    let (h, _) = handle();
    let rec = Arc::new(Recorder::default());
    let refs: Vec<&TestQueue> = tqs.iter().collect();
    let (mut q, irq) = active(&mem, &refs, &h, Some(rec.clone()));
    q.serve_reporting();
    assert_eq!(tqs[3].used(), [(h0.into(), 0)]);
    assert_eq!(rec.take(), [(0x20_0000, 0x10_0000), (0x31_0000, 0x2000)]);
    assert_eq!(irq.take(), [VirtioInterruptType::Queue(3)]);
}

/// The driver's stats buffer is read and held; the host's request for
/// fresh numbers returns it; a second buffer while one is held sends the
/// older back (QEMU).
#[test]
fn stats_are_read_and_the_buffer_held_until_asked_for() {
    let mem = guest_mem(MEM);
    let mut tqs: Vec<TestQueue> =
        RINGS[..3].iter().map(|&b| TestQueue::new_at(&mem, 16, b)).collect();
    let mut stats = Vec::new();
    for (tag, val) in [(4u16, 1000u64), (5, 5000), (99, 1), (9, 7)] {
        stats.extend_from_slice(&tag.to_le_bytes());
        stats.extend_from_slice(&val.to_le_bytes());
    }
    // A trailing partial entry is ignored.
    stats.extend_from_slice(&[5, 0, 1]);
    mem.write_slice(&stats, GuestAddress(DATA)).unwrap();
    let h0 = tqs[2].add_chain(&[(DATA, stats.len() as u32, 0)]);
    let (h, _) = handle();
    let refs: Vec<&TestQueue> = tqs.iter().collect();
    let (mut q, irq) = active(&mem, &refs, &h, None);
    q.serve_stats();
    assert!(tqs[2].used().is_empty(), "held");
    assert!(irq.take().is_empty());
    let got = h.stats();
    assert!(got.updated.is_some());
    let mut want = [None; 10];
    want[4] = Some(1000);
    want[5] = Some(5000);
    want[9] = Some(7);
    assert_eq!(got.values, want);
    let h1 = tqs[2].add_chain(&[(DATA, 10, 0)]);
    q.serve_stats();
    assert_eq!(tqs[2].used(), [(h0.into(), 0)], "the older one back");
    q.request_stats();
    assert_eq!(tqs[2].used(), [(h0.into(), 0), (h1.into(), 0)]);
    assert_eq!(irq.take(), [VirtioInterruptType::Queue(2); 2]);
    q.request_stats();
    assert_eq!(tqs[2].used().len(), 2, "nothing held, nothing returned");
}

#[test]
fn page_runs() {
    assert_eq!(runs(vec![]), []);
    assert_eq!(
        runs(vec![5, 3, 4, 4, 9, u32::MAX, u32::MAX - 1]),
        [(3, 3), (9, 1), (u32::MAX - 1, 2)]
    );
    assert_eq!(read_pfns(&[1, 0, 0, 0, 2, 0][..]), [1]);
}

/// The worker serves kicks until the device is reset.
#[test]
fn the_worker_serves_inflation() {
    let mem = guest_mem(MEM);
    let mut tqs: Vec<TestQueue> =
        RINGS[..3].iter().map(|&b| TestQueue::new_at(&mem, 16, b)).collect();
    let (h, _) = handle();
    let rec = Arc::new(Recorder::default());
    let mut b = Balloon::new(h, BalloonConfig::default(), Some(rec.clone()));
    b.ack_features(VIRTIO_F_VERSION_1 | F_STATS_VQ);
    let kick = kick();
    start(&mut b, &mem, &tqs, std::slice::from_ref(&kick));
    let len = pfns(&mem, DATA, &[0x200, 0x201]);
    tqs[0].add_chain(&[(DATA, len, 0)]);
    kick.write(1).unwrap();
    wait_until(10, || tqs[0].used().len() == 1);
    assert_eq!(rec.take(), [(0x20_0000, 0x2000)]);
    assert!(b.reset());
    tqs[0].add_chain(&[(DATA, len, 0)]);
    kick.write(1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(tqs[0].used().len(), 1, "not served after a reset");
}

/// Fuzz target: a hostile driver's config writes and inflate, deflate,
/// stats and reporting chains (bad addresses, lengths, flags, loops,
/// broken indexes). Nothing panics, and everything given back is whole
/// 4 KiB pages inside guest RAM.
#[cfg(test)]
#[test]
fn fuzz_balloon_queues() {
    skiff_tests::fuzz::run("virtio-balloon-queues", 5_000, fuzz_queues);
}

/// One input of `fuzz_balloon_queues` (also a libFuzzer target: `fuzz/`).
pub(crate) fn fuzz_queues(rng: &mut skiff_tests::fuzz::Rng) {
    use skiff_tests::fuzz::Rng;
    const SIZE: u16 = 16;
    let mem = guest_mem(MEM);
    let addr = |rng: &mut Rng| -> u64 {
        match rng.below(5) {
            0 => DATA + rng.below(0x1000),
            1 => MEM as u64 - rng.below(0x2000),
            2 => rng.interesting(),
            _ => rng.below(MEM as u64) & !0xfff,
        }
    };
    let len = |rng: &mut Rng| -> u32 {
        match rng.below(4) {
            0 => *rng.pick(&[0, 1, 3, 4, 5, 0x1000, 0x20_0000, 0x4000]),
            1 => rng.interesting() as u32,
            _ => rng.below(0x8000) as u32,
        }
    };
    // Page numbers and stats entries, or any bytes.
    let mut data = rng.bytes(256);
    if rng.one_in(2) {
        data = (0..64).flat_map(|_| (rng.below(0x500) as u32).to_le_bytes()).collect();
    }
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let mut tqs: Vec<TestQueue> = RINGS.iter().map(|&b| TestQueue::new_at(&mem, SIZE, b)).collect();
    for tq in tqs.iter_mut() {
        for _ in 0..rng.below(4) {
            let count = 1 + rng.index(3);
            let descs: Vec<(u64, u32, u16)> = (0..count)
                .map(|_| {
                    let flags = match rng.below(6) {
                        0 => INDIRECT,
                        1 => rng.next_u64() as u16,
                        2 | 3 => WRITE,
                        _ => 0,
                    };
                    (addr(rng), len(rng), flags)
                })
                .collect();
            if usize::from(tq.descriptors_used()) + descs.len() >= usize::from(SIZE) / 2 {
                break;
            }
            tq.add_chain(&descs);
        }
        if rng.one_in(6) {
            tq.set_avail_idx(rng.next_u64() as u16);
        }
        if rng.one_in(6) {
            let d = rng.below(u64::from(SIZE)) as u16;
            tq.store_desc(d, addr(rng), len(rng), rng.next_u64() as u16, rng.next_u64() as u16);
        }
    }
    let (h, _) = handle();
    let rec = Arc::new(Recorder::default());
    let refs: Vec<&TestQueue> = tqs.iter().collect();
    let (mut q, _) = active(&mem, &refs, &h, Some(rec.clone()));
    let mut b = Balloon::new(h.clone(), BalloonConfig::default(), None);
    for _ in 0..rng.below(8) {
        match rng.below(6) {
            0 => q.serve_inflate(),
            1 => q.serve_deflate(),
            2 => q.serve_stats(),
            3 => q.serve_reporting(),
            4 => q.request_stats(),
            _ => {
                let bytes = rng.bytes(8);
                b.write_config(rng.below(12), &bytes);
                let mut out = vec![0; rng.index(9)];
                b.read_config(rng.interesting(), &mut out);
            }
        }
    }
    for (addr, len) in rec.take() {
        assert!(addr % PAGE == 0 && len % PAGE == 0 && len > 0, "{addr:#x}+{len:#x}");
        assert!(addr + len <= MEM as u64, "{addr:#x}+{len:#x}");
    }
}
