//! virtio-rng, the entropy device (type 4): one queue of device-writable
//! buffers that the device fills from the host's getrandom(2).
//!
//! At DRIVER_OK the queue moves to a worker thread (`RngQueue`), which
//! serves at most `REQUESTS_PER_WAKEUP` requests per wakeup, each of at most
//! `MAX_CHAIN_BYTES` bytes and of at most queue-size descriptors (counting
//! an indirect table's), then comes back round to its epoll set. The host
//! side (`RngBackend`: QEMU's `max-bytes`/`period` rate limit) belongs to the
//! process, so neither a device reset nor a guest reboot refills it.

mod rate_limit;

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryError};

pub use rate_limit::{RateLimit, DEFAULT_PERIOD_MS};

use super::chain::{Chain, ChainError};
use super::worker::{Budget, Handler, Outcome, Request, Ring, Served, Worker};
use super::{
    read_config_from, ActivateError, ActivationContext, GuestMemoryMmap, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use rate_limit::Limiter;

/// The family its workers are known by (`-device FAMILY-pci|FAMILY-device`).
pub const FAMILY: &str = "virtio-rng";

const QUEUE_SIZES: &[u16] = &[256];

/// Most bytes served per request. A chain's descriptors may overlap or
/// repeat, so its total length says nothing about real guest memory; the
/// cap bounds the work one guest request can cause.
const MAX_CHAIN_BYTES: u32 = 64 * 1024;

/// Requests served per wakeup of the worker: with `MAX_CHAIN_BYTES` and the
/// chain length bound, at most 2 MiB of randomness and 8,192 descriptor
/// reads before the worker looks at its epoll set (and `stop`) again.
pub const REQUESTS_PER_WAKEUP: usize = 32;

/// Randomness is produced through this much stack at a time.
const CHUNK: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("cannot create the rate-limit timer")]
    TimerFd(#[source] io::Error),
}

/// Why a request is completed with 0 bytes.
#[derive(Debug, thiserror::Error)]
enum FillError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("no device-writable bytes")]
    NoWritableBytes,
    #[error("host randomness unavailable")]
    Random(#[source] io::Error),
    #[error("guest memory write failed")]
    Memory(#[source] GuestMemoryError),
}

/// The host side of a virtio-rng: its rate limit, for the life of the
/// process.
pub struct RngBackend {
    limiter: Option<Mutex<Limiter>>,
}

impl RngBackend {
    pub fn new(rate_limit: Option<RateLimit>) -> Result<Self, RngError> {
        let limiter = rate_limit.map(Limiter::new).transpose().map_err(RngError::TimerFd)?;
        Ok(RngBackend { limiter: limiter.map(Mutex::new) })
    }

    fn limiter(&self) -> Option<MutexGuard<'_, Limiter>> {
        self.limiter.as_ref().map(|l| l.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

pub struct Rng {
    backend: Arc<RngBackend>,
    acked_features: u64,
    worker: Option<Worker<RngQueue>>,
}

impl Rng {
    pub fn new(backend: Arc<RngBackend>) -> Self {
        Rng { backend, acked_features: 0, worker: None }
    }
}

/// The running queue, on the worker thread.
struct RngQueue {
    ring: Ring,
    backend: Arc<RngBackend>,
}

/// The rate-limit timer, in the worker's epoll set.
const TIMER: u32 = 0;

impl RngQueue {
    /// One wakeup's work: at most `REQUESTS_PER_WAKEUP` requests.
    fn serve(&mut self) -> Served {
        let mut limiter = self.backend.limiter();
        let max_descriptors = self.ring.queue.size();
        let mut fill = Fill { limiter: limiter.as_deref_mut(), max_descriptors };
        self.ring.serve(Budget { requests: REQUESTS_PER_WAKEUP }, &mut fill)
    }
}

impl MutEventSubscriber for RngQueue {
    fn init(&mut self, ops: &mut EventOps) {
        self.ring.init(ops, "virtio-rng");
        if let Some(l) = self.backend.limiter() {
            if let Err(e) = ops.add(Events::with_data(l.timer(), TIMER, EventSet::IN)) {
                crate::error_limited!("virtio-rng: cannot watch the rate-limit timer: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if !self.ring.take_event(&events) {
            // The timer: serve only if it refilled the bucket.
            if !self.backend.limiter().is_some_and(|mut l| l.on_timer()) {
                return;
            }
        }
        self.serve();
    }
}

impl Handler for RngQueue {}

/// Serves one request: fills its device-writable buffers within the rate
/// limit, or holds it back while the bucket is empty.
struct Fill<'a> {
    limiter: Option<&'a mut Limiter>,
    max_descriptors: u16,
}

impl Request for Fill<'_> {
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Outcome {
        let budget = match self.limiter.as_deref_mut() {
            Some(l) if l.available() == 0 => {
                // Leave the rest on the ring; the timer resumes us.
                l.consume(0);
                return Outcome::HoldBack;
            }
            Some(l) => l.available().min(u64::from(MAX_CHAIN_BYTES)) as u32,
            None => MAX_CHAIN_BYTES,
        };
        let head = chain.head_index();
        let len = Chain::read(mem, chain, usize::from(self.max_descriptors))
            .map_err(FillError::from)
            .and_then(|c| fill_chain(mem, &c, budget))
            .unwrap_or_else(|e| {
                log::debug!("virtio-rng: request {head} completed empty: {e}");
                0
            });
        if let Some(l) = self.limiter.as_deref_mut() {
            l.consume(u64::from(len));
        }
        Outcome::Used(len)
    }
}

/// Fills the chain's device-writable buffers with up to `budget` random
/// bytes and returns how many it wrote. Device-readable and empty buffers
/// are skipped; `Chain::read` checked every buffer, so a bad chain gets
/// nothing rather than a partial fill.
fn fill_chain(mem: &GuestMemoryMmap, chain: &Chain, budget: u32) -> Result<u32, FillError> {
    if chain.writable().all(|d| d.len() == 0) {
        return Err(FillError::NoWritableBytes);
    }
    let mut written = 0u32;
    let mut buf = [0u8; CHUNK];
    for d in chain.writable() {
        let mut done = 0u32;
        while done < d.len() && written < budget {
            let n = (d.len() - done).min(budget - written).min(CHUNK as u32);
            let part = &mut buf[..n as usize];
            getrandom(part).map_err(FillError::Random)?;
            let addr = d.addr().checked_add(u64::from(done)).ok_or(FillError::Chain(
                ChainError::OutsideMemory { addr: d.addr().0, len: d.len() },
            ))?;
            mem.write_slice(part, addr).map_err(FillError::Memory)?;
            done += n;
            written += n;
        }
    }
    Ok(written)
}

/// Fills `buf` from the kernel's CSPRNG, retrying on signals and short reads.
fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the kernel writes at most `rest.len()` bytes to `rest`, a
        // live buffer we borrow mutably for the duration of the call.
        let ret = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match ret {
            n if n > 0 => filled += n as usize,
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // virtio-rng has no config space.
        read_config_from(&[], offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-rng: config write at {offset:#x} ignored");
    }

    fn activate(&mut self, mut ctx: ActivationContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let q = ctx.take_queue(0)?;
        let ring = Ring::new(ctx.mem, q, ctx.interrupt).map_err(ActivateError::EventFd)?;
        let handler = RngQueue { ring, backend: self.backend.clone() };
        self.worker = Some(Worker::spawn(FAMILY, FAMILY, handler).map_err(ActivateError::Worker)?);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // The rate-limit bucket is the backend's: a reset must not buy more
        // entropy.
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        self.acked_features = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::virtio::test_utils::*;
    use crate::virtio::{ActiveQueue, VirtioInterruptType};

    const MEM: usize = 0x40_0000;

    fn backend(limit: Option<RateLimit>) -> Arc<RngBackend> {
        Arc::new(RngBackend::new(limit).unwrap())
    }

    fn context(
        mem: &GuestMemoryMmap,
        tq: &TestQueue,
        kick: &EventFd,
    ) -> (ActivationContext, Arc<RecordingInterrupt>) {
        let irq = Arc::new(RecordingInterrupt::default());
        let queue = ActiveQueue {
            index: 0,
            queue: tq.queue(),
            kick: kick.try_clone().unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        };
        (ActivationContext { mem: mem.clone(), queues: vec![queue], interrupt: irq.clone() }, irq)
    }

    /// The worker's queue, run by hand on the test's thread.
    fn active_rng(
        mem: &GuestMemoryMmap,
        tq: &TestQueue,
        limit: Option<RateLimit>,
    ) -> (RngQueue, Arc<RecordingInterrupt>) {
        let (ctx, irq) = context(mem, tq, &EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let ActivationContext { mem, mut queues, interrupt } = ctx;
        let ring = Ring::new(mem, queues.remove(0), interrupt).unwrap();
        (RngQueue { ring, backend: backend(limit) }, irq)
    }

    /// Waits (up to 10 s) until the used ring has `n` entries.
    fn wait_used(tq: &TestQueue, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while tq.used().len() < n {
            assert!(Instant::now() < deadline, "the worker served {:?}", tq.used());
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn describes_itself() {
        let mut rng = Rng::new(backend(None));
        assert_eq!(rng.device_type(), 4);
        assert_eq!(rng.queue_max_sizes(), &[256]);
        assert_eq!(rng.features(), VIRTIO_F_VERSION_1);
        let mut data = [0xffu8; 4];
        rng.read_config(0, &mut data);
        assert_eq!(data, [0; 4]);
        rng.write_config(0, &[1]);
        assert!(rng.reset());
    }

    #[test]
    fn fills_writable_buffers_and_reports_lengths() {
        let mem = guest_mem(MEM);
        let mut tq = TestQueue::new(&mem, 16);
        let h0 = tq.add_chain(&[(DATA, 16, WRITE), (DATA + 16, 32, WRITE)]);
        let h1 = tq.add_chain(&[(DATA + 0x1000, 8, WRITE)]);
        let (mut rng, irq) = active_rng(&mem, &tq, None);
        rng.serve();
        assert_eq!(tq.used(), vec![(h0.into(), 48), (h1.into(), 8)]);
        // 48 zero bytes from a CSPRNG: probability 2^-384.
        assert_ne!(read(&mem, DATA, 48), vec![0; 48]);
        assert_eq!(irq.take(), vec![VirtioInterruptType::Queue(0)]);
        // Nothing new: no used entries, no interrupt.
        rng.serve();
        assert_eq!(tq.used().len(), 2);
        assert!(irq.take().is_empty());
    }

    #[test]
    fn skips_device_readable_buffers() {
        let mem = guest_mem(MEM);
        let mut tq = TestQueue::new(&mem, 16);
        fill(&mem, DATA, 16, 0xaa);
        let h = tq.add_chain(&[(DATA, 16, 0), (DATA + 16, 16, WRITE)]);
        let (mut rng, _) = active_rng(&mem, &tq, None);
        rng.serve();
        assert_eq!(tq.used(), vec![(h.into(), 16)]);
        assert_eq!(read(&mem, DATA, 16), vec![0xaa; 16]);
    }

    #[test]
    fn completes_bad_chains_empty() {
        let mem = guest_mem(MEM);
        let mut tq = TestQueue::new(&mem, 16);
        fill(&mem, DATA, 64, 0xaa);
        let end = MEM as u64;
        let bad = [
            tq.add_chain(&[(DATA, 16, 0)]),
            tq.add_chain(&[(DATA, 0, WRITE)]),
            tq.add_chain(&[(end - 8, 16, WRITE)]),
            // A good buffer first: the chain is checked before anything is written.
            tq.add_chain(&[(DATA, 16, WRITE), (u64::MAX - 4, 16, WRITE)]),
        ];
        let good = tq.add_chain(&[(DATA + 0x1000, 4, WRITE)]);
        let (mut rng, irq) = active_rng(&mem, &tq, None);
        rng.serve();
        let mut expected: Vec<(u32, u32)> = bad.iter().map(|&h| (h.into(), 0)).collect();
        expected.push((good.into(), 4));
        assert_eq!(tq.used(), expected);
        assert_eq!(read(&mem, DATA, 64), vec![0xaa; 64]);
        assert_eq!(irq.take(), vec![VirtioInterruptType::Queue(0)]);
    }

    #[test]
    fn completes_unterminated_chains_empty() {
        let mem = guest_mem(MEM);
        let tq = TestQueue::new(&mem, 16);
        fill(&mem, DATA, 32, 0xaa);
        // 0 -> 1 -> 0 -> ...: longer than the queue.
        tq.store_desc(0, DATA, 16, WRITE | NEXT, 1);
        tq.store_desc(1, DATA + 16, 16, WRITE | NEXT, 0);
        tq.make_available(0);
        // Points past the descriptor table.
        tq.store_desc(2, DATA, 16, WRITE | NEXT, 200);
        tq.make_available(2);
        // A head that is not a descriptor at all cannot even be returned.
        tq.make_available(300);
        tq.store_desc(3, DATA + 0x1000, 4, WRITE, 0);
        tq.make_available(3);
        let (mut rng, _) = active_rng(&mem, &tq, None);
        rng.serve();
        assert_eq!(tq.used(), vec![(0, 0), (2, 0), (3, 4)]);
        assert_eq!(read(&mem, DATA, 32), vec![0xaa; 32]);
    }

    #[test]
    fn caps_each_request() {
        let mem = guest_mem(MEM);
        let mut tq = TestQueue::new(&mem, 16);
        let cap = MAX_CHAIN_BYTES as usize;
        fill(&mem, DATA, 2 * cap, 0);
        let h = tq.add_chain(&[(DATA, 2 * MAX_CHAIN_BYTES, WRITE)]);
        let (mut rng, _) = active_rng(&mem, &tq, None);
        rng.serve();
        assert_eq!(tq.used(), vec![(h.into(), MAX_CHAIN_BYTES)]);
        assert_eq!(read(&mem, DATA + cap as u64, cap), vec![0; cap]);
    }

    #[test]
    fn rate_limit_holds_back_and_resumes() {
        let mem = guest_mem(MEM);
        let mut tq = TestQueue::new(&mem, 16);
        let h: Vec<u32> =
            (0..3).map(|i| tq.add_chain(&[(DATA + i * 0x100, 10, WRITE)]).into()).collect();
        let (mut rng, irq) = active_rng(&mem, &tq, RateLimit::new(16, Some(1)));
        rng.serve();
        // 10 bytes, then the 6 left in the bucket; the third request waits.
        assert_eq!(tq.used(), vec![(h[0], 10), (h[1], 6)]);
        assert!(rng.backend.limiter().unwrap().is_armed());
        rng.serve();
        assert_eq!(tq.used().len(), 2);
        assert_eq!(irq.take().len(), 1);
        // What the event loop does when the timer fires.
        assert!(rng.backend.limiter().unwrap().wait_and_refill());
        rng.serve();
        assert_eq!(tq.used(), vec![(h[0], 10), (h[1], 6), (h[2], 10)]);
        assert_eq!(irq.take().len(), 1);
    }

    #[test]
    fn activation_needs_queue_zero_once() {
        let mem = guest_mem(MEM);
        let tq = TestQueue::new(&mem, 16);
        let mut rng = Rng::new(backend(None));
        let irq = Arc::new(RecordingInterrupt::default());
        let ctx = ActivationContext { mem: mem.clone(), queues: vec![], interrupt: irq };
        assert!(matches!(rng.activate(ctx), Err(ActivateError::MissingQueue(0))));
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        rng.activate(context(&mem, &tq, &kick).0).unwrap();
        let ctx = context(&mem, &tq, &kick).0;
        assert!(matches!(rng.activate(ctx), Err(ActivateError::AlreadyActive)));
    }

    #[test]
    fn the_worker_serves_the_queue_while_active() {
        let mem = guest_mem(MEM);
        let mut tq = TestQueue::new(&mem, 16);
        let mut rng = Rng::new(backend(None));

        // Buffers made available before activation are served once the
        // worker starts.
        tq.add_chain(&[(DATA, 8, WRITE)]);
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (ctx, irq) = context(&mem, &tq, &kick);
        rng.activate(ctx).unwrap();
        wait_used(&tq, 1);

        tq.add_chain(&[(DATA, 8, WRITE)]);
        kick.write(1).unwrap();
        wait_used(&tq, 2);
        assert_eq!(irq.take().len(), 2);

        // After a reset the worker is gone: a kick is not served.
        assert!(rng.reset());
        tq.add_chain(&[(DATA, 8, WRITE)]);
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(tq.used().len(), 2);
    }

    /// One request per descriptor in the ring, each an indirect table of
    /// 65,535 descriptors; the ring is kept full. Each wakeup serves at
    /// most `REQUESTS_PER_WAKEUP` requests, reads at most the queue size
    /// in descriptors per request, and asks to be woken again.
    #[test]
    fn a_flood_of_huge_indirect_tables_is_served_in_bounded_steps() {
        let mem = guest_mem(0x40_0000);
        let size = 256u16;
        let tq = TestQueue::new(&mem, size);
        tq.store_indirect(0, TABLE, u16::MAX, DATA, 16);
        tq.make_available(0);
        for i in 1..size / 2 - 1 {
            tq.store_desc(i, TABLE, u32::from(u16::MAX) * 16, INDIRECT, 0);
            tq.make_available(i);
        }
        let (mut rng, irq) = active_rng(&mem, &tq, None);
        let total = usize::from(size / 2 - 1);
        let mut left = total;
        while left > 0 {
            let served = rng.serve();
            assert_eq!(served.requests, REQUESTS_PER_WAKEUP.min(left));
            left -= served.requests;
            // With more left the worker wakes itself for the next step.
            assert_eq!(served.more, left > 0);
            assert_eq!(rng.ring.rearm.eventfd().read().is_ok(), left > 0);
            assert_eq!(irq.take(), vec![VirtioInterruptType::Queue(0)]);
        }
        // Every one refused (longer than the queue) and returned empty.
        assert_eq!(tq.used().len(), total);
        assert!(tq.used().iter().all(|&(_, len)| len == 0), "{:?}", tq.used());
    }

    /// An available index more than a queue ahead of the device: no entry
    /// can be trusted. The device asks for a reset (NEEDS_RESET and a config
    /// interrupt) once and then serves nothing, instead of spinning.
    #[test]
    fn a_broken_ring_needs_a_reset_instead_of_spinning() {
        let mem = guest_mem(MEM);
        let mut tq = TestQueue::new(&mem, 16);
        tq.add_chain(&[(DATA, 8, WRITE)]);
        let (mut rng, irq) = active_rng(&mem, &tq, None);
        tq.set_avail_idx(17);
        let served = rng.serve();
        assert!(served.broken && served.requests == 0 && !served.more);
        assert_eq!(irq.take(), vec![VirtioInterruptType::Config]);
        tq.set_avail_idx(1);
        assert_eq!(rng.serve(), Served::default(), "nothing until a reset");
        assert!(tq.used().is_empty());
        assert!(irq.take().is_empty());
    }
}
