//! virtio-rng, the entropy device (type 4): one queue of device-writable
//! buffers that the device fills from the host's getrandom(2).
//!
//! The device runs on the VMM's event loop: the VMM registers the same
//! `Arc<Mutex<Rng>>` it hands to the transport as an event-manager subscriber
//! (`event_handler.rs`). Activation and reset happen on a vCPU thread, which
//! cannot touch the epoll set, so they only record the new state and kick
//! `ctl_evt`; the loop then watches or forgets the queue's eventfd.

mod event_handler;
mod rate_limit;

use std::io;
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestMemory, GuestMemoryError, Permissions};
use vmm_sys_util::eventfd::EventFd;

pub use rate_limit::{RateLimit, DEFAULT_PERIOD_MS};

use super::{
    read_config_from, ActivateError, ActivationContext, GuestMemoryMmap, VirtioDevice,
    VirtioInterrupt, VirtioInterruptType, VIRTIO_F_VERSION_1,
};
use rate_limit::Limiter;

const QUEUE_SIZES: &[u16] = &[256];

/// Most bytes served per request. A chain's descriptors may overlap or
/// repeat, so its total length says nothing about real guest memory; the
/// cap bounds the work one guest request can cause.
const MAX_CHAIN_BYTES: u32 = 64 * 1024;

/// Randomness is produced through this much stack at a time.
const CHUNK: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
    #[error("cannot create the rate-limit timer")]
    TimerFd(#[source] io::Error),
}

/// Why a request is completed with 0 bytes.
#[derive(Debug, thiserror::Error)]
enum ChainError {
    #[error("no device-writable bytes")]
    NoWritableBytes,
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("chain loops, is longer than the queue or points past it")]
    Unterminated,
    #[error("host randomness unavailable")]
    Random(#[source] io::Error),
    #[error("guest memory write failed")]
    Memory(#[source] GuestMemoryError),
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
}

pub struct Rng {
    acked_features: u64,
    /// Kicked on activate and reset: the event loop re-syncs its watch list.
    ctl_evt: EventFd,
    active: Option<Active>,
    /// The queue eventfd of the last activation, not yet watched.
    pending_evt: Option<EventFd>,
    /// The queue eventfd in the epoll set, kept open until it is removed
    /// (a closed fd whose file lives on in the transport would stay in it).
    watched_evt: Option<EventFd>,
    limiter: Option<Limiter>,
}

impl Rng {
    pub fn new(rate_limit: Option<RateLimit>) -> Result<Self, RngError> {
        let limiter = rate_limit.map(Limiter::new).transpose().map_err(RngError::TimerFd)?;
        Ok(Rng {
            acked_features: 0,
            ctl_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(RngError::EventFd)?,
            active: None,
            pending_evt: None,
            watched_evt: None,
            limiter,
        })
    }

    /// Serves available requests until the ring is empty or the rate limit
    /// holds the rest back, then interrupts the guest if it wants to know.
    fn process_queue(&mut self) {
        let Some(Active { mem, queue, interrupt }) = self.active.as_mut() else { return };
        let mut used_any = false;
        loop {
            let budget = match &mut self.limiter {
                Some(l) if l.available() == 0 => {
                    // Leave the rest on the ring; the timer resumes us.
                    l.consume(0);
                    break;
                }
                Some(l) => l.available().min(u64::from(MAX_CHAIN_BYTES)) as u32,
                None => MAX_CHAIN_BYTES,
            };
            let Some(chain) = queue.pop_descriptor_chain(&*mem) else { break };
            let head = chain.head_index();
            let len = fill_chain(mem, chain, budget).unwrap_or_else(|e| {
                log::debug!("virtio-rng: request {head} completed empty: {e}");
                0
            });
            if let Some(l) = &mut self.limiter {
                l.consume(u64::from(len));
            }
            // A bad head index cannot be returned; the guest loses that entry.
            match queue.add_used(&*mem, head, len) {
                Ok(()) => used_any = true,
                Err(e) => log::debug!("virtio-rng: cannot return request {head}: {e}"),
            }
        }
        if used_any && queue.needs_notification(&*mem).unwrap_or(true) {
            if let Err(e) = interrupt.trigger(VirtioInterruptType::Queue(0)) {
                log::error!("virtio-rng: cannot interrupt the guest: {e}");
            }
        }
    }
}

/// Fills the chain's device-writable buffers with up to `budget` random
/// bytes and returns how many it wrote. Device-readable and empty buffers
/// are skipped. The whole chain is checked first, so a bad chain gets
/// nothing rather than a partial fill.
fn fill_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    budget: u32,
) -> Result<u32, ChainError> {
    let wanted = |d: &Descriptor| d.is_write_only() && d.len() > 0;
    // The iterator stops silently on a loop, an index past the table or an
    // unreadable descriptor; a last descriptor still claiming NEXT tells.
    let mut writable = 0u64;
    let mut unterminated = false;
    for d in chain.clone() {
        unterminated = d.has_next();
        if !wanted(&d) {
            continue;
        }
        if !mem.check_range(d.addr(), d.len() as usize, Permissions::Write) {
            return Err(ChainError::OutsideMemory { addr: d.addr().0, len: d.len() });
        }
        writable += u64::from(d.len());
    }
    if unterminated {
        return Err(ChainError::Unterminated);
    }
    if writable == 0 {
        return Err(ChainError::NoWritableBytes);
    }

    let mut written = 0u32;
    let mut buf = [0u8; CHUNK];
    for d in chain.filter(wanted) {
        let mut done = 0u32;
        while done < d.len() && written < budget {
            let n = (d.len() - done).min(budget - written).min(CHUNK as u32);
            let part = &mut buf[..n as usize];
            getrandom(part).map_err(ChainError::Random)?;
            let addr = d
                .addr()
                .checked_add(u64::from(done))
                .ok_or(ChainError::OutsideMemory { addr: d.addr().0, len: d.len() })?;
            mem.write_slice(part, addr).map_err(ChainError::Memory)?;
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

    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let Some((_, queue, evt)) = ctx.queues.into_iter().find(|(i, ..)| *i == 0) else {
            return Err(ActivateError::MissingQueue(0));
        };
        self.ctl_evt.write(1).map_err(ActivateError::EventFd)?;
        self.active = Some(Active { mem: ctx.mem, queue, interrupt: ctx.interrupt });
        self.pending_evt = Some(evt);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // The rate-limit bucket is kept: a reset must not buy more entropy.
        self.active = None;
        self.pending_evt = None;
        self.acked_features = 0;
        if let Err(e) = self.ctl_evt.write(1) {
            log::error!("virtio-rng: cannot signal the reset to the event loop: {e}");
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};

    use super::*;
    use crate::virtio::test_utils::*;

    const MEM: usize = 0x40_0000;

    fn activate(rng: &mut Rng, mem: &GuestMemoryMmap, tq: &TestQueue) -> Arc<RecordingInterrupt> {
        let irq = Arc::new(RecordingInterrupt::default());
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ctx = ActivationContext {
            mem: mem.clone(),
            queues: vec![(0, tq.queue(), evt)],
            interrupt: irq.clone(),
        };
        rng.activate(ctx).unwrap();
        irq
    }

    fn active_rng(
        mem: &GuestMemoryMmap,
        tq: &TestQueue,
        limit: Option<RateLimit>,
    ) -> (Rng, Arc<RecordingInterrupt>) {
        let mut rng = Rng::new(limit).unwrap();
        let irq = activate(&mut rng, mem, tq);
        (rng, irq)
    }

    #[test]
    fn describes_itself() {
        let mut rng = Rng::new(None).unwrap();
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
        rng.process_queue();
        assert_eq!(tq.used(), vec![(h0.into(), 48), (h1.into(), 8)]);
        // 48 zero bytes from a CSPRNG: probability 2^-384.
        assert_ne!(read(&mem, DATA, 48), vec![0; 48]);
        assert_eq!(irq.take(), vec![VirtioInterruptType::Queue(0)]);
        // Nothing new: no used entries, no interrupt.
        rng.process_queue();
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
        rng.process_queue();
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
        rng.process_queue();
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
        rng.process_queue();
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
        rng.process_queue();
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
        rng.process_queue();
        // 10 bytes, then the 6 left in the bucket; the third request waits.
        assert_eq!(tq.used(), vec![(h[0], 10), (h[1], 6)]);
        assert!(rng.limiter.as_ref().unwrap().is_armed());
        rng.process_queue();
        assert_eq!(tq.used().len(), 2);
        assert_eq!(irq.take().len(), 1);
        // What the event loop does when the timer fires.
        assert!(rng.limiter.as_mut().unwrap().on_timer());
        rng.process_queue();
        assert_eq!(tq.used(), vec![(h[0], 10), (h[1], 6), (h[2], 10)]);
        assert_eq!(irq.take().len(), 1);
    }

    #[test]
    fn activation_needs_queue_zero_once() {
        let mem = guest_mem(MEM);
        let tq = TestQueue::new(&mem, 16);
        let mut rng = Rng::new(None).unwrap();
        let irq = Arc::new(RecordingInterrupt::default());
        let ctx = ActivationContext { mem: mem.clone(), queues: vec![], interrupt: irq };
        assert!(matches!(rng.activate(ctx), Err(ActivateError::MissingQueue(0))));
        activate(&mut rng, &mem, &tq);
        let irq = Arc::new(RecordingInterrupt::default());
        let evt = EventFd::new(0).unwrap();
        let ctx = ActivationContext {
            mem: mem.clone(),
            queues: vec![(0, tq.queue(), evt)],
            interrupt: irq,
        };
        assert!(matches!(rng.activate(ctx), Err(ActivateError::AlreadyActive)));
    }

    #[test]
    fn event_loop_watches_the_queue_while_active() {
        let mem = guest_mem(MEM);
        let mut tq = TestQueue::new(&mem, 16);
        let rng = Arc::new(Mutex::new(Rng::new(None).unwrap()));
        let mut em = EventManager::<Arc<Mutex<Rng>>>::new().unwrap();
        em.add_subscriber(rng.clone());
        assert_eq!(em.run_with_timeout(0).unwrap(), 0);

        // Buffers made available before activation are served once the
        // loop picks the activation up.
        tq.add_chain(&[(DATA, 8, WRITE)]);
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = Arc::new(RecordingInterrupt::default());
        let ctx = ActivationContext {
            mem: mem.clone(),
            queues: vec![(0, tq.queue(), kick.try_clone().unwrap())],
            interrupt: irq.clone(),
        };
        rng.lock().unwrap().activate(ctx).unwrap();
        assert_eq!(em.run_with_timeout(0).unwrap(), 1);
        assert_eq!(tq.used().len(), 1);

        tq.add_chain(&[(DATA, 8, WRITE)]);
        kick.write(1).unwrap();
        assert_eq!(em.run_with_timeout(0).unwrap(), 1);
        assert_eq!(tq.used().len(), 2);
        assert_eq!(irq.take().len(), 2);

        // After a reset the kick is no longer watched.
        assert!(rng.lock().unwrap().reset());
        assert_eq!(em.run_with_timeout(0).unwrap(), 1);
        kick.write(1).unwrap();
        assert_eq!(em.run_with_timeout(0).unwrap(), 0);
    }
}
