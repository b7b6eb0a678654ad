//! A device's data plane on a thread of its own.
//!
//! At DRIVER_OK a device moves its queues into a `Handler` and starts a
//! `Worker` with it: a thread with its own epoll set (event-manager) that
//! watches the queues' kick eventfds and whatever else the handler needs.
//! The VMM's event loop (QMP, signals, console) never waits for a device,
//! and one device's guest cannot hold a thread another device needs.
//!
//! The quiesce contract:
//! - `Worker::stop` (called by the device's `reset`, and on drop when the
//!   run ends) wakes the thread, lets it finish the batch it is in, calls
//!   `Handler::quiesce` there to finish or cancel what is still in flight,
//!   joins it and returns the handler. Only then does the device reset, and
//!   only then can guest memory go: the handler holds the memory it uses.
//! - The handler touches nothing a vCPU locks: its queues and memory are
//!   its own, and interrupts go through the transport's lock-free path
//!   (`VirtioInterrupt::trigger`). So a vCPU that stops a worker while
//!   holding the transport's lock cannot deadlock with it.
//! - Each wakeup does a bounded amount of work (`serve_queue` takes a
//!   budget); a handler with more to do re-arms itself (`Rearm`) so the
//!   thread comes back to its epoll set, and to `stop`, in between.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{ActiveQueue, GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType};

/// A device's data plane, run by a `Worker`.
pub trait Handler: MutEventSubscriber + Send + 'static {
    /// Called on the worker thread after it was told to stop: finish or
    /// cancel every request still in flight. Nothing may touch guest
    /// memory on the handler's behalf once this returns.
    fn quiesce(&mut self) {}
}

/// The handler and the stop eventfd, as the worker's epoll set sees them.
struct Running<H> {
    handler: H,
    stop: EventFd,
    stopping: bool,
}

impl<H: Handler> MutEventSubscriber for Running<H> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.stop, EventSet::IN)) {
            crate::error_limited!("worker: cannot watch its stop eventfd: {e:?}");
        }
        self.handler.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.stop.as_raw_fd() {
            let _ = self.stop.read();
            self.stopping = true;
        } else {
            self.handler.process(events, ops);
        }
    }
}

/// A running data-plane thread.
pub struct Worker<H: Handler> {
    stop: EventFd,
    thread: Option<JoinHandle<Option<H>>>,
}

impl<H: Handler> Worker<H> {
    /// Starts `handler` on a thread named `name`, a worker of the device
    /// `family` (`virtio-blk`: the VMM confines it with that device's
    /// rules). Its `init` runs here, before the thread starts, so a
    /// registration error shows at once.
    pub fn spawn(family: &'static str, name: &str, handler: H) -> io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let mut em = EventManager::<Running<H>>::new().map_err(io::Error::other)?;
        let running = Running { handler, stop: stop.try_clone()?, stopping: false };
        let id = em.add_subscriber(running);
        let thread = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
            crate::threads::started(crate::threads::ThreadKind::Worker(family));
            loop {
                if let Err(e) = em.run() {
                    crate::error_limited!("worker: event loop failed: {e:?}");
                    break;
                }
                if em.subscriber_mut(id).map_or(true, |r| r.stopping) {
                    break;
                }
            }
            let mut running = em.remove_subscriber(id).ok()?;
            running.handler.quiesce();
            Some(running.handler)
        })?;
        Ok(Worker { stop, thread: Some(thread) })
    }

    /// Stops the thread (after its current batch and `quiesce`) and
    /// returns the handler, or None if the thread died.
    pub fn stop(mut self) -> Option<H> {
        self.join()
    }

    fn join(&mut self) -> Option<H> {
        let thread = self.thread.take()?;
        if let Err(e) = self.stop.write(1) {
            crate::error_limited!("worker: cannot signal the stop: {e}");
        }
        thread.join().unwrap_or_else(|_| {
            crate::error_limited!("worker: the thread panicked");
            None
        })
    }
}

impl<H: Handler> Drop for Worker<H> {
    fn drop(&mut self) {
        self.join();
    }
}

/// An eventfd a handler signals to itself when it stopped with work left
/// (a budget spent), so the worker comes back round to its epoll set and
/// to `stop` before it goes on.
pub struct Rearm(EventFd);

impl Rearm {
    pub fn new() -> io::Result<Self> {
        Ok(Rearm(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?))
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }

    pub fn arm(&self) {
        if let Err(e) = self.0.write(1) {
            crate::error_limited!("worker: cannot re-arm: {e}");
        }
    }

    /// Consumes a wakeup.
    pub fn clear(&self) {
        let _ = self.0.read();
    }
}

/// How a worker watches an eventfd that only says "look again" (a kick, a
/// completion): edge-triggered, so each signal wakes it once and it never
/// has to read the count back, one system call less per wakeup. (The count
/// saturates; it cannot block the writer in practice: 2^64 signals.)
pub fn notice() -> EventSet {
    EventSet::IN | EventSet::EDGE_TRIGGERED
}

/// Event data of a `Ring`'s kick and re-arm in its worker's epoll set;
/// a device's own events use small numbers.
const RING_KICK: u32 = u32::MAX - 1;
const RING_REARM: u32 = u32::MAX;

/// A queue on its worker: what every device's queue handler holds and does
/// alike. The queue and the memory it lives in, the guest's kick, the
/// interrupt, the re-arm of a wakeup that ran out of budget, and the stop
/// once the driver broke the ring. The device adds what it serves
/// requests with.
pub struct Ring {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub index: u16,
    pub kick: EventFd,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub rearm: Rearm,
    /// The driver broke the ring: nothing is served until a reset.
    broken: bool,
}

impl Ring {
    pub fn new(
        mem: GuestMemoryMmap,
        q: ActiveQueue,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> io::Result<Ring> {
        Ok(Ring {
            mem,
            queue: q.queue,
            index: q.index as u16,
            kick: q.kick,
            interrupt,
            rearm: Rearm::new()?,
            broken: false,
        })
    }

    /// Watches the kick and the re-arm, and arms once: buffers made
    /// available before the driver's first kick are served on the worker
    /// (`init` runs on the activating vCPU's thread).
    pub fn init(&self, ops: &mut EventOps, device: &str) {
        let kick = Events::with_data(&self.kick, RING_KICK, notice());
        let rearm = Events::with_data(self.rearm.eventfd(), RING_REARM, EventSet::IN);
        for events in [kick, rearm] {
            if let Err(e) = ops.add(events) {
                crate::error_limited!("{device}: cannot watch an eventfd: {e:?}");
            }
        }
        self.rearm.arm();
    }

    /// Consumes the event if it is the ring's kick or re-arm (the handler
    /// then serves); false for the device's own events and for another
    /// ring's (a handler may serve several rings).
    pub fn take_event(&self, events: &Events) -> bool {
        match events.data() {
            // Edge-triggered (`notice`): nothing to read.
            RING_KICK => events.fd() == self.kick.as_raw_fd(),
            RING_REARM if events.fd() == self.rearm.eventfd().as_raw_fd() => {
                self.rearm.clear();
                true
            }
            _ => false,
        }
    }

    /// One wakeup's work (`serve_queue`); nothing once the driver broke the
    /// ring, and a re-arm when the budget ran out with work left.
    pub fn serve(&mut self, budget: Budget, device: &mut dyn Request) -> Served {
        self.serve_with(budget, device, Kicks::On)
    }

    /// As `serve`, but the guest's kicks stay off (EVENT_IDX: avail_event
    /// is not moved on; without it, NO_NOTIFY stays set): the caller polls
    /// the ring instead, and must come back (a timer) until it `serve`s
    /// with kicks on again.
    pub fn serve_polled(&mut self, budget: Budget, device: &mut dyn Request) -> Served {
        self.serve_with(budget, device, Kicks::Off)
    }

    fn serve_with(&mut self, budget: Budget, device: &mut dyn Request, kicks: Kicks) -> Served {
        if self.broken {
            return Served::default();
        }
        let served = serve_queue(
            &self.mem,
            &mut self.queue,
            self.index,
            &*self.interrupt,
            budget,
            device,
            kicks,
        );
        if served.more {
            self.rearm.arm();
        }
        self.broken = served.broken;
        served
    }

    /// Returns what an asynchronous engine completed, as (head, used
    /// length), and interrupts the guest if it wants to know.
    pub fn complete(&mut self, done: &[(u16, u32)]) {
        if self.complete_quietly(done) > 0 {
            self.notify();
        }
    }

    /// Puts completed requests on the used ring without telling the guest
    /// yet; how many went on. `notify` once for what a whole wakeup
    /// completed: under nesting an interrupt costs more than the I/O, and
    /// one per batch is what QEMU's deferred notifications send.
    pub fn complete_quietly(&mut self, done: &[(u16, u32)]) -> usize {
        done.iter()
            .filter(|&&(head, len)| add_used(&self.mem, &mut self.queue, self.index, head, len))
            .count()
    }

    /// Interrupts the guest if it wants to know (EVENT_IDX).
    pub fn notify(&mut self) {
        notify(&self.mem, &mut self.queue, self.index, &*self.interrupt);
    }
}

/// How much one wakeup may do with one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Requests (descriptor chains) taken off the available ring.
    pub requests: usize,
}

/// What `serve_queue` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    pub requests: usize,
    /// The budget ran out with requests still available: the caller must
    /// come back (`Rearm`).
    pub more: bool,
    /// The driver broke the ring (an available index more than a queue
    /// ahead): nothing more can be served until it resets the device. The
    /// device was marked NEEDS_RESET, as QEMU's `virtio_error` does.
    pub broken: bool,
}

/// What became of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done: the bytes written to the chain's device-writable buffers (the
    /// used length).
    Used(u32),
    /// Taken by an asynchronous engine; the device returns it to the used
    /// ring when it completes (`Ring::complete`).
    Later,
    /// Not taken: it stays first on the available ring for later (a rate
    /// limit, an engine with no room left).
    HoldBack,
}

/// Whether the guest is asked to kick again once the ring is empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kicks {
    On,
    /// The device polls the ring (`Ring::serve_polled`).
    Off,
}

/// What a device does with one request.
pub trait Request {
    fn serve(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>)
        -> Outcome;
}

/// Serves queue `index` within `budget`, with notification suppression
/// as VIRTIO_RING_F_EVENT_IDX asks (avail_event written when notifications
/// are re-enabled, `needs_notification` before interrupting), then
/// interrupts the guest if it wants to know.
pub fn serve_queue(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    index: u16,
    interrupt: &dyn VirtioInterrupt,
    budget: Budget,
    device: &mut dyn Request,
    kicks: Kicks,
) -> Served {
    let mut served = Served::default();
    let mut used_any = false;
    // Kicks were off before this call's first re-enable (a polled queue,
    // a held-back request): what came before it was not kicked for.
    let mut rechecked = false;
    'outer: loop {
        if let Err(e) = queue.disable_notification(mem) {
            log::debug!("virtio: queue {index}: {e}");
            break;
        }
        let before = served.requests;
        loop {
            if served.requests == budget.requests {
                served.more = true;
                break 'outer;
            }
            let chain = match queue.iter(mem) {
                Ok(mut available) => available.next(),
                Err(e) => {
                    // An index the ring cannot hold: there is no telling
                    // which entries are real; give up until a reset.
                    log::debug!("virtio: queue {index}: {e}; the device needs a reset");
                    interrupt.needs_reset();
                    served.broken = true;
                    break 'outer;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            match device.serve(mem, chain) {
                Outcome::HoldBack => {
                    // The request stays first on the ring.
                    queue.go_to_previous_position();
                    break 'outer;
                }
                Outcome::Later => served.requests += 1,
                Outcome::Used(len) => {
                    served.requests += 1;
                    used_any |= add_used(mem, queue, index, head, len);
                }
            }
        }
        if kicks == Kicks::Off {
            break;
        }
        // Re-enabling tells the driver where to kick next; buffers that came
        // in meanwhile are served before sleeping. Once kicks are on, a pass
        // that served nothing cannot be followed by one that does.
        match queue.enable_notification(mem) {
            Ok(true) if served.requests > before || !rechecked => {
                rechecked = true;
                continue;
            }
            Ok(true) => break,
            Ok(false) => break,
            Err(e) => {
                log::debug!("virtio: queue {index}: {e}");
                break;
            }
        }
    }
    if used_any {
        notify(mem, queue, index, interrupt);
    }
    served
}

/// Returns a request to the used ring. A bad head index cannot be
/// returned; the guest loses that entry.
fn add_used(mem: &GuestMemoryMmap, queue: &mut Queue, index: u16, head: u16, len: u32) -> bool {
    match queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            log::debug!("virtio: queue {index}: cannot return request {head}: {e}");
            false
        }
    }
}

/// Interrupts the guest if it wants to know (EVENT_IDX's used_event).
fn notify(mem: &GuestMemoryMmap, queue: &mut Queue, index: u16, interrupt: &dyn VirtioInterrupt) {
    if queue.needs_notification(mem).unwrap_or(true) {
        if let Err(e) = interrupt.trigger(VirtioInterruptType::Queue(index)) {
            crate::error_limited!("virtio: queue {index}: cannot interrupt the guest: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    /// Counts wakeups; stops "in flight" work only in quiesce.
    struct Counter {
        kick: EventFd,
        wakeups: Arc<AtomicUsize>,
        in_flight: usize,
    }

    impl MutEventSubscriber for Counter {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.kick, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _: Events, _: &mut EventOps) {
            let _ = self.kick.read();
            self.in_flight += 1;
            self.wakeups.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Handler for Counter {
        fn quiesce(&mut self) {
            self.in_flight = 0;
        }
    }

    #[test]
    fn stop_joins_after_quiesce_and_returns_the_handler() {
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let wakeups = Arc::new(AtomicUsize::new(0));
        let c = Counter { kick: kick.try_clone().unwrap(), wakeups: wakeups.clone(), in_flight: 0 };
        let w = Worker::spawn("test", "test-worker", c).unwrap();
        kick.write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while wakeups.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "the worker never woke");
            std::thread::yield_now();
        }
        let c = w.stop().expect("the handler comes back");
        assert_eq!(c.in_flight, 0, "quiesced before it came back");
        assert_eq!(wakeups.load(Ordering::SeqCst), 1);
        // Nothing runs any more: a kick is not served.
        kick.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(wakeups.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn dropping_a_worker_stops_it() {
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let wakeups = Arc::new(AtomicUsize::new(0));
        let c = Counter { kick: kick.try_clone().unwrap(), wakeups: wakeups.clone(), in_flight: 0 };
        drop(Worker::spawn("test", "test-worker", c).unwrap());
        kick.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(wakeups.load(Ordering::SeqCst), 0);
    }
}
