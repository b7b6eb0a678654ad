//! virtio-blk (type 2): a raw image as the guest's disk.
//!
//! The image (`disk::Disk`) belongs to the process: opened and locked once,
//! it outlives guest reboots. Each queue runs on a worker of its own
//! (`BlockQueue`), serving at most `REQUESTS_PER_WAKEUP` requests per
//! wakeup and telling the guest of completions as `moderation` says; the
//! queues share nothing but the image, whose positional reads and writes
//! need no lock.

pub mod disk;
mod moderation;
mod pool;
pub mod qcow2;
pub mod request;
mod uring;

use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_queue::{DescriptorChain, QueueT};

pub use disk::{Disk, DiskError, DiskOptions};
pub use request::{DetectZeroes, Policy};

use super::chain::Chain;
use super::worker::{notice, Budget, Handler, Outcome, Request, Ring, Served, Worker};
use super::{
    read_config_from, ActivateError, ActivationContext, GuestMemoryMmap, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use moderation::{Moderation, Polling};
use pool::Pool;
use uring::Uring;

/// The family its workers are known by (`-device FAMILY-pci|FAMILY-device`).
pub const FAMILY: &str = "virtio-blk";

/// virtio-blk counts in 512-byte sectors, whatever the block size.
pub const SECTOR_SIZE: u64 = 512;

/// Requests served per wakeup of a queue's worker.
pub const REQUESTS_PER_WAKEUP: usize = 32;
/// Batches (reap, then serve) one wakeup may run back to back.
const ROUNDS_PER_WAKEUP: usize = 4;

/// The most sectors one DISCARD or WRITE_ZEROES may cover (QEMU's limit:
/// what fits a 32-bit byte count, in 512-byte sectors).
pub(super) const MAX_DISCARD_SECTORS: u32 = (u32::MAX >> 9) & !7;

/// The device's shape, from `-device virtio-blk-*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockParams {
    pub num_queues: u16,
    pub queue_size: u16,
    /// `logical_block_size=` (the guest's sector size).
    pub logical_block_size: u32,
    /// `physical_block_size=`.
    pub physical_block_size: u32,
    pub policy: Policy,
    pub aio: Aio,
}

/// How a queue's worker carries requests out, many at a time either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Aio {
    /// `aio=threads`: a pool of threads per queue (`pool`).
    #[default]
    Threads,
    /// `aio=io_uring` (and `native`): an io_uring per queue, the pool where
    /// the host has none.
    IoUring,
}

fn bit(b: u32) -> u64 {
    1 << b
}

pub struct Block {
    disk: Arc<Disk>,
    params: BlockParams,
    queue_sizes: Vec<u16>,
    config: Vec<u8>,
    acked_features: u64,
    workers: Vec<Worker<BlockQueue>>,
}

impl Block {
    pub fn new(disk: Arc<Disk>, params: BlockParams) -> Self {
        let queue_sizes = vec![params.queue_size; usize::from(params.num_queues.max(1))];
        let config = config_space(&disk, &params);
        Block { disk, params, queue_sizes, config, acked_features: 0, workers: Vec::new() }
    }
}

/// `struct virtio_blk_config` as far as the offered features reach.
fn config_space(disk: &Disk, p: &BlockParams) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    let put =
        |c: &mut Vec<u8>, at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
    put(&mut c, 0, &(disk.size() / SECTOR_SIZE).to_le_bytes());
    // seg_max: the ring minus the header and status descriptors.
    put(&mut c, 12, &u32::from(p.queue_size.saturating_sub(2)).to_le_bytes());
    put(&mut c, 20, &p.logical_block_size.to_le_bytes());
    let exp = (p.physical_block_size / p.logical_block_size.max(1)).max(1).trailing_zeros() as u8;
    c[24] = exp;
    let min_io = (p.physical_block_size / p.logical_block_size.max(1)).max(1) as u16;
    put(&mut c, 26, &min_io.to_le_bytes());
    put(&mut c, 34, &p.num_queues.max(1).to_le_bytes());
    if p.policy.discard {
        put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(&mut c, 40, &1u32.to_le_bytes());
        put(&mut c, 44, &(p.logical_block_size / SECTOR_SIZE as u32).max(1).to_le_bytes());
        put(&mut c, 48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(&mut c, 52, &1u32.to_le_bytes());
        c[56] = 1;
    }
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            | bit(VIRTIO_BLK_F_FLUSH);
        if self.disk.read_only() {
            f |= bit(VIRTIO_BLK_F_RO);
        }
        if self.params.num_queues > 1 {
            f |= bit(VIRTIO_BLK_F_MQ);
        }
        if self.params.policy.discard && !self.disk.read_only() {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_from(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The writeback toggle (CONFIG_WCE) is not offered.
        log::debug!("virtio-blk: config write at {offset:#x} ignored");
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        if !self.workers.is_empty() {
            return Err(ActivateError::AlreadyActive);
        }
        let policy = Arc::new(self.params.policy.clone());
        for q in ctx.queues {
            let engine = engine(self.params.aio, &ctx.mem, &self.disk, &policy, q.queue.size());
            let name = format!("virtio-blk-q{}", q.index);
            let ring = Ring::new(ctx.mem.clone(), q, ctx.interrupt.clone())
                .map_err(ActivateError::EventFd)?;
            let moderation = Moderation::new().map_err(ActivateError::EventFd)?;
            let polling = Polling::new().map_err(ActivateError::EventFd)?;
            let handler = BlockQueue {
                ring,
                disk: self.disk.clone(),
                policy: policy.clone(),
                engine,
                moderation,
                polling,
            };
            self.workers
                .push(Worker::spawn(FAMILY, &name, handler).map_err(ActivateError::Worker)?);
        }
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop_workers();
        self.acked_features = 0;
        true
    }
}

impl Block {
    /// Each worker finishes the request it is in before it stops; long
    /// zeroing gives up at its next step meanwhile, so a stop takes one
    /// step's time, not the request's.
    fn stop_workers(&mut self) {
        if self.workers.is_empty() {
            return;
        }
        self.disk.abandon_long_work(true);
        for w in self.workers.drain(..) {
            w.stop();
        }
        self.disk.abandon_long_work(false);
    }
}

/// The end of a run stops the workers the same way.
impl Drop for Block {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

/// The engine for a queue of `size`: an io_uring where asked and the host
/// gives one, else a thread pool (one warning per process when io_uring
/// was asked for: an old kernel, a seccomp filter); with neither, None:
/// requests run one at a time on the worker.
fn engine(
    aio: Aio,
    mem: &GuestMemoryMmap,
    disk: &Arc<Disk>,
    policy: &Arc<Policy>,
    size: u16,
) -> Option<Engine> {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    // A ring reads and writes the file's bytes; a qcow2 image's guest
    // sectors are not those: the pool serves it through its metadata.
    if aio == Aio::IoUring && disk.is_raw() {
        match Uring::new(size) {
            Ok(u) => return Some(Engine::Uring(Box::new(u))),
            Err(e) => {
                if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    crate::warn_limited!(
                        "aio=io_uring: io_uring unavailable ({e}); using a thread pool"
                    );
                }
            }
        }
    }
    match Pool::new(mem.clone(), disk.clone(), policy.clone(), size) {
        Ok(p) => Some(Engine::Pool(p)),
        Err(e) => {
            crate::warn_limited!("virtio-blk: no thread pool ({e}); requests run one at a time");
            None
        }
    }
}

/// What carries a queue's requests out, many at a time.
enum Engine {
    Uring(Box<Uring>),
    Pool(Pool),
}

impl Engine {
    fn eventfd(&self) -> &vmm_sys_util::eventfd::EventFd {
        match self {
            Engine::Uring(u) => u.eventfd(),
            Engine::Pool(p) => p.eventfd(),
        }
    }

    fn has_room(&self) -> bool {
        match self {
            Engine::Uring(u) => u.has_room(),
            Engine::Pool(p) => p.has_room(),
        }
    }

    fn in_flight(&self) -> usize {
        match self {
            Engine::Uring(u) => u.in_flight(),
            Engine::Pool(p) => p.in_flight(),
        }
    }

    /// Completions wait to be reaped (checked without a system call).
    fn ready(&mut self) -> bool {
        match self {
            Engine::Uring(u) => u.ready(),
            Engine::Pool(_) => false,
        }
    }

    fn max_in_flight(&self) -> usize {
        match self {
            Engine::Uring(u) => u.max_in_flight,
            Engine::Pool(p) => p.max_in_flight,
        }
    }

    /// Hands what was pushed to the kernel (the pool's threads have it
    /// already).
    fn submit(&mut self) {
        if let Engine::Uring(u) = self {
            if let Err(err) = u.submit() {
                crate::error_limited!("virtio-blk: io_uring submit failed: {err}");
            }
        }
    }

    fn reap(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        match self {
            Engine::Uring(u) => u.reap(mem),
            Engine::Pool(p) => p.reap(),
        }
    }

    fn drain(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        match self {
            Engine::Uring(u) => u.drain(mem),
            Engine::Pool(p) => p.drain(),
        }
    }
}

/// One queue, on its worker.
struct BlockQueue {
    ring: Ring,
    disk: Arc<Disk>,
    policy: Arc<Policy>,
    /// What carries requests out many at a time; with none, one at a
    /// time here.
    engine: Option<Engine>,
    /// When the guest hears of the engine's completions.
    moderation: Moderation,
    /// Whether the guest kicks or the worker looks.
    polling: Polling,
}

/// The engine's completion eventfd, in the worker's epoll set.
const DONE: u32 = 0;
/// The moderation timer.
const HOLD: u32 = 1;
/// The poll timer.
const POLL: u32 = 2;

impl BlockQueue {
    fn serve(&mut self) -> Served {
        let mut requests = Requests {
            disk: &self.disk,
            policy: &self.policy,
            max_descriptors: usize::from(self.ring.queue.size()),
            engine: self.engine.as_mut(),
        };
        let budget = Budget { requests: REQUESTS_PER_WAKEUP };
        let served = if self.polling.on() {
            self.ring.serve_polled(budget, &mut requests)
        } else {
            self.ring.serve(budget, &mut requests)
        };
        if let Some(e) = self.engine.as_mut() {
            e.submit();
        }
        served
    }

    /// Puts what the engine completed on the used ring; how many went on
    /// (the caller tells the guest: `moderation`).
    fn reap(&mut self) -> usize {
        let Some(e) = self.engine.as_mut() else { return 0 };
        let done = e.reap(&self.ring.mem);
        self.ring.complete_quietly(&done)
    }
}

struct Requests<'a> {
    disk: &'a Disk,
    policy: &'a Policy,
    max_descriptors: usize,
    engine: Option<&'a mut Engine>,
}

impl Request for Requests<'_> {
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Outcome {
        let head = chain.head_index();
        if self.engine.as_ref().is_some_and(|e| !e.has_room()) {
            // Completions make room and serve the rest.
            return Outcome::HoldBack;
        }
        let chain = match Chain::read(mem, chain, self.max_descriptors) {
            Ok(c) => c,
            Err(e) => {
                // No trustworthy status byte to write to: returned empty.
                log::debug!("virtio-blk: request {head}: {e}");
                return Outcome::Used(0);
            }
        };
        let here =
            |chain: &Chain| Outcome::Used(request::serve(mem, chain, self.disk, self.policy));
        match self.engine.as_deref_mut() {
            None => here(&chain),
            Some(Engine::Pool(pool)) => match pool.push(chain) {
                Ok(()) => Outcome::Later,
                Err(chain) => here(&chain),
            },
            Some(Engine::Uring(uring)) => {
                match request::prepare(mem, &chain, self.disk, self.policy) {
                    Err(used) => Outcome::Used(used),
                    Ok(req) => match uring.push(mem, self.disk, head, req) {
                        Ok(()) => Outcome::Later,
                        // Not for the engine (misaligned for O_DIRECT, ...): here.
                        Err(_) => here(&chain),
                    },
                }
            }
        }
    }
}

impl MutEventSubscriber for BlockQueue {
    fn init(&mut self, ops: &mut EventOps) {
        self.ring.init(ops, "virtio-blk");
        if let Some(e) = &self.engine {
            if let Err(e) = ops.add(Events::with_data(e.eventfd(), DONE, notice())) {
                crate::error_limited!("virtio-blk: cannot watch its I/O completions: {e:?}");
            }
            let timer = Events::with_data(self.moderation.timer(), HOLD, notice());
            if let Err(e) = ops.add(timer) {
                crate::error_limited!("virtio-blk: cannot watch its interrupt timer: {e:?}");
            }
        }
        // Polling starts only once its timer is watched.
        match ops.add(Events::with_data(self.polling.timer(), POLL, notice())) {
            Ok(()) => self.polling.watched(),
            Err(e) => crate::error_limited!("virtio-blk: cannot watch its poll timer: {e:?}"),
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let tick = match events.data() {
            HOLD => {
                if self.moderation.expired() {
                    self.ring.notify();
                }
                return;
            }
            // A stale edge of a timer that was not re-armed.
            POLL if !self.polling.on() => return,
            POLL => true,
            _ => false,
        };
        let mut added = 0;
        if !self.ring.take_event(&events) {
            added += self.reap();
        }
        let mut served = self.serve().requests;
        // What the kernel finished while it took the batch (reads the page
        // cache had) goes back now, not after another trip through epoll;
        // the room it frees serves what waits, and so on until a batch
        // leaves nothing finished behind, or the wakeup's rounds are spent:
        // a guest that refills the ring as fast as the page cache answers
        // must not keep the worker from its stop. What is left signalled
        // the engine's eventfd after the last wait, so the worker comes
        // straight back.
        let mut rounds = 1;
        while rounds < ROUNDS_PER_WAKEUP && self.engine.as_mut().is_some_and(Engine::ready) {
            added += self.reap();
            served += self.serve().requests;
            rounds += 1;
        }
        if tick {
            if !self.polling.ticked(served) {
                // Kicks back on; what came since the tick is served too.
                self.serve();
            }
        } else {
            self.polling.kicked(served);
        }
        // At most one interrupt for everything this wakeup completed, and
        // none yet while enough is still in flight to keep it company.
        let in_flight = self.engine.as_ref().map_or(0, Engine::in_flight);
        if self.moderation.completed(added, in_flight) {
            self.ring.notify();
        }
    }
}

impl Handler for BlockQueue {
    /// Requests in the kernel's hands point into guest memory: wait for
    /// them before the worker (and its hold on that memory) goes.
    fn quiesce(&mut self) {
        let Some(e) = self.engine.as_mut() else { return };
        let done = e.drain(&self.ring.mem);
        // One interrupt for what was held and what the drain finished.
        let held = self.moderation.flush();
        if self.ring.complete_quietly(&done) > 0 || held {
            self.ring.notify();
        }
        log::info!(
            "virtio-blk queue {}: at most {} requests were in flight at once",
            self.ring.index,
            e.max_in_flight()
        );
    }
}

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod tests;
