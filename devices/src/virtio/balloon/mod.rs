//! virtio-balloon (type 5): the guest gives RAM back to the host on
//! request (inflate to the target the host sets) and, with free page
//! reporting, of its own accord whenever larger blocks of it are free.
//!
//! The host side talks to the device through a [`BalloonHandle`]: the
//! target it sets (`num_pages` in the config space, with a config
//! interrupt), the size the driver says it reached (`actual`, which the
//! driver writes back; each change is told to a [`BalloonEvents`]), and
//! the guest's latest statistics. Pages the guest hands over (inflate
//! queue, reporting queue) go back to the host through [`RamDiscard`];
//! with no discard (guest RAM pinned for a passed-through device, as QEMU
//! inhibits ballooning under VFIO) the accounting goes on and the memory
//! stays.
//!
//! Queues, as QEMU and the Linux driver number them: inflate 0, deflate
//! 1, then stats if `VIRTIO_BALLOON_F_STATS_VQ` was negotiated, then free
//! page reporting if `VIRTIO_BALLOON_F_REPORTING` was (the driver numbers
//! only the queues it uses). All run on one worker, each request within a
//! bound: at most `MAX_PFNS` page numbers read per inflate request and
//! `REQUESTS_PER_WAKEUP` requests per queue per wakeup.

use std::io::Read;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, QueueT};
use vmm_sys_util::timerfd::TimerFd;

use super::chain::{Chain, ChainReader};
use super::worker::{Budget, Handler, Outcome, Request, Ring, Worker};
use super::{
    read_config_from, ActivateError, ActivationContext, GuestMemoryMmap, VirtioDevice,
    VirtioInterrupt, VirtioInterruptType, VIRTIO_F_VERSION_1,
};

/// The family its workers are known by.
pub const FAMILY: &str = "virtio-balloon";

/// Page frame numbers on the inflate and deflate queues count 4 KiB pages
/// whatever the guest's page size (`VIRTIO_BALLOON_PFN_SHIFT`).
pub const PAGE_SHIFT: u32 = 12;
const PAGE: u64 = 1 << PAGE_SHIFT;

/// Feature bits (virtio 1.2, 5.5.3).
pub const F_STATS_VQ: u64 = 1 << 1;
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
pub const F_REPORTING: u64 = 1 << 5;

/// QEMU's queue sizes: 128 for inflate, deflate and stats, 32 for
/// reporting.
const SIZES: [u16; 4] = [128, 128, 128, 32];

/// Page numbers read from one inflate or deflate request (Linux sends at
/// most 256); the rest of a longer request is ignored.
pub const MAX_PFNS: usize = 4096;

/// Requests served per queue per wakeup.
pub const REQUESTS_PER_WAKEUP: usize = 32;

/// `struct virtio_balloon_config` up to `actual`: QEMU's size when neither
/// free page hinting nor page poisoning is offered.
const CONFIG_SIZE: usize = 8;
const ACTUAL_OFFSET: u64 = 4;

/// Gives guest RAM back to the host (the guest reads zeros there next).
pub trait RamDiscard: Send + Sync {
    /// Discards what of `[addr, addr + len)` covers whole host pages;
    /// returns how many bytes that was.
    fn discard(&self, addr: u64, len: u64) -> std::io::Result<u64>;
}

/// Told of the driver's progress (QMP's `BALLOON_CHANGE`).
pub trait BalloonEvents: Send + Sync {
    /// The driver wrote a new `actual`: the balloon now holds `pages`.
    fn actual_changed(&self, pages: u32);
}

/// The guest's memory statistics (the stats queue), by QEMU's names.
pub const STAT_NAMES: [&str; 10] = [
    "stat-swap-in",
    "stat-swap-out",
    "stat-major-faults",
    "stat-minor-faults",
    "stat-free-memory",
    "stat-total-memory",
    "stat-available-memory",
    "stat-disk-caches",
    "stat-htlb-pgalloc",
    "stat-htlb-pgfail",
];

/// The last statistics the guest sent: one value per `STAT_NAMES` entry
/// (None where it sent none), and when.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestStats {
    pub values: [Option<u64>; 10],
    pub updated: Option<SystemTime>,
}

/// What the device and its host side share, for the process's life.
struct Shared {
    /// `num_pages`: the pages the host wants the balloon to hold.
    target: AtomicU32,
    /// `actual`: the pages the driver says it holds.
    actual: AtomicU32,
    /// The running device's interrupt, for a config change.
    interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
    stats: Mutex<GuestStats>,
    /// Seconds between stats requests (0: none after the first).
    poll_secs: AtomicU32,
    events: Arc<dyn BalloonEvents>,
}

/// The host's side of a balloon: what QMP's `balloon`, `query-balloon`
/// and `qom-get` act on.
#[derive(Clone)]
pub struct BalloonHandle(Arc<Shared>);

impl BalloonHandle {
    pub fn new(events: Arc<dyn BalloonEvents>, poll_secs: u32) -> Self {
        BalloonHandle(Arc::new(Shared {
            target: AtomicU32::new(0),
            actual: AtomicU32::new(0),
            interrupt: Mutex::new(None),
            stats: Mutex::new(GuestStats::default()),
            poll_secs: AtomicU32::new(poll_secs),
            events,
        }))
    }

    /// Asks the guest to hold `pages` in the balloon; a running driver is
    /// told at once (a config interrupt), a later one reads it at probe.
    pub fn set_target(&self, pages: u32) {
        self.0.target.store(pages, Ordering::Release);
        let irq = lock(&self.0.interrupt).clone();
        if let Some(irq) = irq {
            if let Err(e) = irq.trigger(VirtioInterruptType::Config) {
                crate::error_limited!("virtio-balloon: cannot interrupt the guest: {e}");
            }
        }
    }

    pub fn target(&self) -> u32 {
        self.0.target.load(Ordering::Acquire)
    }

    /// The pages the driver says the balloon holds.
    pub fn actual(&self) -> u32 {
        self.0.actual.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> GuestStats {
        lock(&self.0.stats).clone()
    }

    /// A new guest starts with an empty balloon and no target (a reboot).
    pub fn clear(&self) {
        self.0.target.store(0, Ordering::Release);
        self.0.actual.store(0, Ordering::Release);
        *lock(&self.0.stats) = GuestStats::default();
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the command line asks of the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonConfig {
    pub deflate_on_oom: bool,
    pub free_page_reporting: bool,
}

pub struct Balloon {
    handle: BalloonHandle,
    config: BalloonConfig,
    /// None: guest RAM cannot be given back (pinned for VFIO).
    discard: Option<Arc<dyn RamDiscard>>,
    acked: u64,
    worker: Option<Worker<BalloonQueues>>,
}

impl Balloon {
    pub fn new(
        handle: BalloonHandle,
        config: BalloonConfig,
        discard: Option<Arc<dyn RamDiscard>>,
    ) -> Self {
        Balloon { handle, config, discard, acked: 0, worker: None }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        let n = if self.config.free_page_reporting { 4 } else { 3 };
        &SIZES[..n]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | F_STATS_VQ;
        if self.config.deflate_on_oom {
            f |= F_DEFLATE_ON_OOM;
        }
        if self.config.free_page_reporting {
            f |= F_REPORTING;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SIZE];
        config[..4].copy_from_slice(&self.handle.target().to_le_bytes());
        config[4..].copy_from_slice(&self.handle.actual().to_le_bytes());
        read_config_from(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is the driver's; a write that reaches past it, or
        // covers `num_pages`, changes nothing else.
        let mut actual = self.handle.actual().to_le_bytes();
        for (i, &b) in data.iter().enumerate() {
            let at = offset.checked_add(i as u64);
            if let Some(k) = at.and_then(|a| a.checked_sub(ACTUAL_OFFSET)).filter(|&k| k < 4) {
                actual[k as usize] = b;
            }
        }
        let actual = u32::from_le_bytes(actual);
        let old = self.handle.0.actual.swap(actual, Ordering::AcqRel);
        if old != actual {
            self.handle.0.events.actual_changed(actual);
        }
    }

    fn activate(&mut self, mut ctx: ActivationContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let mem = ctx.mem.clone();
        let interrupt = ctx.interrupt.clone();
        let ring = |ctx: &mut ActivationContext, i| {
            let q = ctx.take_queue(i)?;
            Ring::new(mem.clone(), q, interrupt.clone()).map_err(ActivateError::EventFd)
        };
        let inflate = ring(&mut ctx, 0)?;
        let deflate = ring(&mut ctx, 1)?;
        // The driver numbers only the queues it negotiated.
        let mut next = 2;
        let stats = if self.acked & F_STATS_VQ != 0 {
            next += 1;
            let timer = TimerFd::new().map_err(|e| {
                ActivateError::EventFd(std::io::Error::from_raw_os_error(e.errno()))
            })?;
            Some(StatsQueue { ring: ring(&mut ctx, next - 1)?, held: None, timer })
        } else {
            None
        };
        let reporting =
            if self.acked & F_REPORTING != 0 { Some(ring(&mut ctx, next)?) } else { None };
        let handler = BalloonQueues {
            inflate,
            deflate,
            stats,
            reporting,
            discard: self.discard.clone(),
            shared: self.handle.0.clone(),
        };
        self.worker = Some(Worker::spawn(FAMILY, FAMILY, handler).map_err(ActivateError::Worker)?);
        *lock(&self.handle.0.interrupt) = Some(ctx.interrupt);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        *lock(&self.handle.0.interrupt) = None;
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        // The target stays (as in QEMU): a driver that comes back inflates
        // to it again. A reboot clears it (`BalloonHandle::clear`).
        self.handle.0.actual.store(0, Ordering::Release);
        self.acked = 0;
        true
    }
}

/// The stats queue: the driver's one buffer is held until the host wants
/// fresh numbers, then returned (the driver refills and sends it again).
struct StatsQueue {
    ring: Ring,
    held: Option<u16>,
    timer: TimerFd,
}

/// The running queues, on the worker thread.
struct BalloonQueues {
    inflate: Ring,
    deflate: Ring,
    stats: Option<StatsQueue>,
    reporting: Option<Ring>,
    discard: Option<Arc<dyn RamDiscard>>,
    shared: Arc<Shared>,
}

/// The stats timer, in the worker's epoll set.
const STATS_TIMER: u32 = 0;

impl BalloonQueues {
    fn serve_inflate(&mut self) {
        let max = usize::from(self.inflate.queue.size());
        let mut pages = Pages { max_descriptors: max, discard: self.discard.as_deref() };
        self.inflate.serve(Budget { requests: REQUESTS_PER_WAKEUP }, &mut pages);
    }

    fn serve_deflate(&mut self) {
        // Deflated pages come back by themselves: the guest's next touch
        // faults a fresh zero page in.
        let max = usize::from(self.deflate.queue.size());
        let mut pages = Pages { max_descriptors: max, discard: None };
        self.deflate.serve(Budget { requests: REQUESTS_PER_WAKEUP }, &mut pages);
    }

    fn serve_reporting(&mut self) {
        let Some(ring) = self.reporting.as_mut() else { return };
        let max = usize::from(ring.queue.size());
        let mut report = Report { max_descriptors: max, discard: self.discard.as_deref() };
        ring.serve(Budget { requests: REQUESTS_PER_WAKEUP }, &mut report);
    }

    fn serve_stats(&mut self) {
        let Some(s) = self.stats.as_mut() else { return };
        let max = usize::from(s.ring.queue.size());
        let mut take = TakeStats { max_descriptors: max, got: Vec::new() };
        s.ring.serve(Budget { requests: REQUESTS_PER_WAKEUP }, &mut take);
        let Some((head, values)) = take.got.pop() else { return };
        // A driver that sends another before getting its first back breaks
        // the protocol; QEMU returns the older one, and so do we.
        let mut back: Vec<(u16, u32)> = take.got.iter().map(|&(h, _)| (h, 0)).collect();
        back.extend(s.held.replace(head).map(|h| (h, 0)));
        if !back.is_empty() {
            s.ring.complete(&back);
        }
        *lock(&self.shared.stats) = GuestStats { values, updated: Some(SystemTime::now()) };
        let secs = self.shared.poll_secs.load(Ordering::Acquire);
        if secs > 0 {
            if let Err(e) = s.timer.reset(Duration::from_secs(u64::from(secs)), None) {
                crate::error_limited!("virtio-balloon: cannot arm the stats timer: {e}");
            }
        }
    }

    /// Time for fresh statistics: the held buffer goes back to the driver.
    fn request_stats(&mut self) {
        let Some(s) = self.stats.as_mut() else { return };
        if let Some(head) = s.held.take() {
            s.ring.complete(&[(head, 0)]);
        }
    }
}

impl MutEventSubscriber for BalloonQueues {
    fn init(&mut self, ops: &mut EventOps) {
        self.inflate.init(ops, FAMILY);
        self.deflate.init(ops, FAMILY);
        if let Some(s) = &self.stats {
            s.ring.init(ops, FAMILY);
            if let Err(e) = ops.add(Events::with_data(&s.timer, STATS_TIMER, EventSet::IN)) {
                crate::error_limited!("virtio-balloon: cannot watch the stats timer: {e:?}");
            }
        }
        if let Some(r) = &self.reporting {
            r.init(ops, FAMILY);
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if self.inflate.take_event(&events) {
            self.serve_inflate();
        } else if self.deflate.take_event(&events) {
            self.serve_deflate();
        } else if self.reporting.as_ref().is_some_and(|r| r.take_event(&events)) {
            self.serve_reporting();
        } else if self.stats.as_ref().is_some_and(|s| s.ring.take_event(&events)) {
            self.serve_stats();
        } else if let Some(s) = self.stats.as_mut().filter(|_| events.data() == STATS_TIMER) {
            // Readable: the read does not block.
            let _ = s.timer.wait();
            self.request_stats();
        }
    }
}

impl Handler for BalloonQueues {}

/// An inflate or deflate request: an array of little-endian 32-bit page
/// frame numbers in device-readable buffers. Inflated pages are given back
/// to the host in runs of contiguous pages; numbers outside guest RAM are
/// ignored, as QEMU ignores them.
struct Pages<'a> {
    max_descriptors: usize,
    discard: Option<&'a dyn RamDiscard>,
}

impl Request for Pages<'_> {
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Outcome {
        let Some(discard) = self.discard else { return Outcome::Used(0) };
        let Some(chain) = read_chain(mem, chain, self.max_descriptors, "pages") else {
            return Outcome::Used(0);
        };
        let pfns = read_pfns(ChainReader::new(mem, &chain));
        for (first, count) in runs(pfns) {
            let (addr, len) = (u64::from(first) << PAGE_SHIFT, u64::from(count) << PAGE_SHIFT);
            if let Err(e) = discard.discard(addr, len) {
                log::debug!("virtio-balloon: pages at {addr:#x}+{len:#x} stay: {e}");
            }
        }
        Outcome::Used(0)
    }
}

/// The request's chain, read once and checked; None (logged) when it
/// cannot be served, and it goes back empty.
fn read_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    max: usize,
    what: &str,
) -> Option<Chain> {
    let head = chain.head_index();
    Chain::read(mem, chain, max)
        .map_err(|e| log::debug!("virtio-balloon: {what} request {head}: {e}"))
        .ok()
}

/// Up to `MAX_PFNS` page numbers from a request's readable bytes (a
/// trailing partial number is dropped).
fn read_pfns(mut r: impl Read) -> Vec<u32> {
    let mut bytes = vec![0u8; MAX_PFNS * 4];
    let mut n = 0;
    while n < bytes.len() {
        match r.read(&mut bytes[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    bytes[..n - n % 4]
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Page numbers as runs of contiguous pages (first, count), each page
/// once.
fn runs(mut pfns: Vec<u32>) -> Vec<(u32, u32)> {
    pfns.sort_unstable();
    pfns.dedup();
    let mut out: Vec<(u32, u32)> = Vec::new();
    for p in pfns {
        match out.last_mut() {
            Some((first, count)) if u64::from(*first) + u64::from(*count) == u64::from(p) => {
                *count += 1
            }
            _ => out.push((p, 1)),
        }
    }
    out
}

/// A free page report: device-writable buffers, each a free block of
/// guest RAM (Linux reports 2 MiB blocks and larger). Each is given back;
/// the used length is 0, as QEMU's.
struct Report<'a> {
    max_descriptors: usize,
    discard: Option<&'a dyn RamDiscard>,
}

impl Request for Report<'_> {
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Outcome {
        let Some(discard) = self.discard else { return Outcome::Used(0) };
        let Some(chain) = read_chain(mem, chain, self.max_descriptors, "report") else {
            return Outcome::Used(0);
        };
        for d in chain.writable() {
            let (addr, len) = (d.addr().0, u64::from(d.len()));
            // QEMU ignores blocks that are not page aligned.
            if addr % PAGE != 0 || len % PAGE != 0 || len == 0 {
                continue;
            }
            if let Err(e) = discard.discard(addr, len) {
                log::debug!("virtio-balloon: reported block {addr:#x}+{len:#x} stays: {e}");
            }
        }
        Outcome::Used(0)
    }
}

/// Takes the stats buffers the driver sends and keeps them for the host.
struct TakeStats {
    max_descriptors: usize,
    got: Vec<(u16, [Option<u64>; 10])>,
}

impl Request for TakeStats {
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Outcome {
        let head = chain.head_index();
        // A chain that cannot be read cannot be held either.
        let Some(chain) = read_chain(mem, chain, self.max_descriptors, "stats") else {
            return Outcome::Used(0);
        };
        let values = parse_stats(ChainReader::new(mem, &chain));
        self.got.push((head, values));
        Outcome::Later
    }
}

/// `struct virtio_balloon_stat { le16 tag; le64 val; }` packed, as many
/// as the buffer holds (at most one queue's worth of tags is looked at);
/// unknown tags are skipped.
fn parse_stats(mut r: impl Read) -> [Option<u64>; 10] {
    let mut values = [None; 10];
    let mut entry = [0u8; 10];
    for _ in 0..256 {
        if r.read_exact(&mut entry).is_err() {
            break;
        }
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let mut val = [0u8; 8];
        val.copy_from_slice(&entry[2..]);
        if let Some(v) = values.get_mut(usize::from(tag)) {
            *v = Some(u64::from_le_bytes(val));
        }
    }
    values
}

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod tests;
