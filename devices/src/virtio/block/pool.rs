//! `aio=threads` (QEMU's default), and `aio=io_uring` where the host has no
//! io_uring: a queue's requests carried out by a few threads of its own,
//! many at a time. Each thread serves a whole request (`request::serve`:
//! every type, O_DIRECT alignment included) and hands back its used
//! length; the queue's worker returns it to the guest.
//!
//! Threads start as requests need them, up to `MAX_THREADS`, and end when
//! the pool is dropped. Like io_uring's, the requests in flight point into
//! guest memory: `drain` waits for them before the worker lets it go.

use std::io;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::disk::Disk;
use super::request::{self, Policy};
use crate::virtio::chain::Chain;
use crate::virtio::GuestMemoryMmap;

/// The most threads one queue's pool runs (QEMU's pool allows 64 for all
/// of an AioContext; a queue rarely keeps more than a few busy).
pub const MAX_THREADS: usize = 16;

/// What the threads hand back: (head, used length), and how many.
#[derive(Default)]
struct Done {
    list: Mutex<Vec<(u16, u32)>>,
    ready: Condvar,
}

pub struct Pool {
    jobs: Option<Sender<Chain>>,
    queue: Arc<Mutex<Receiver<Chain>>>,
    done: Arc<Done>,
    /// Signalled when a request is done (watch it edge-triggered: nothing
    /// reads it back).
    signal: Arc<EventFd>,
    threads: Vec<JoinHandle<()>>,
    mem: GuestMemoryMmap,
    disk: Arc<Disk>,
    policy: Arc<Policy>,
    depth: usize,
    in_flight: usize,
    /// The most requests in flight at once, since the pool started.
    pub max_in_flight: usize,
}

impl Pool {
    /// A pool for up to `depth` requests at once on `disk`.
    pub fn new(
        mem: GuestMemoryMmap,
        disk: Arc<Disk>,
        policy: Arc<Policy>,
        depth: u16,
    ) -> io::Result<Pool> {
        let (jobs, queue) = channel();
        Ok(Pool {
            jobs: Some(jobs),
            queue: Arc::new(Mutex::new(queue)),
            done: Arc::default(),
            signal: Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?),
            threads: Vec::new(),
            mem,
            disk,
            policy,
            depth: usize::from(depth.max(1)),
            in_flight: 0,
            max_in_flight: 0,
        })
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.signal
    }

    pub fn has_room(&self) -> bool {
        self.in_flight < self.depth
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Hands `chain` to a thread. Gives it back when there is no room, or
    /// no thread at all could be started.
    pub fn push(&mut self, chain: Chain) -> Result<(), Chain> {
        if !self.has_room() {
            return Err(chain);
        }
        if self.in_flight >= self.threads.len() && self.threads.len() < MAX_THREADS {
            if let Err(e) = self.spawn() {
                log::debug!("virtio-blk: cannot start an I/O thread: {e}");
                if self.threads.is_empty() {
                    return Err(chain);
                }
            }
        }
        let Some(jobs) = &self.jobs else { return Err(chain) };
        jobs.send(chain).map_err(|e| e.0)?;
        self.in_flight += 1;
        self.max_in_flight = self.max_in_flight.max(self.in_flight);
        Ok(())
    }

    fn spawn(&mut self) -> io::Result<()> {
        let queue = self.queue.clone();
        let done = self.done.clone();
        let signal = self.signal.clone();
        let (mem, disk, policy) = (self.mem.clone(), self.disk.clone(), self.policy.clone());
        let name = format!("virtio-blk-io{}", self.threads.len());
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            crate::threads::started(crate::threads::ThreadKind::Io);
            loop {
                // One thread at a time waits for the next request.
                let next = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
                let Ok(chain) = next else { return };
                let used = request::serve(&mem, &chain, &disk, &policy);
                done.list.lock().unwrap_or_else(PoisonError::into_inner).push((chain.head, used));
                done.ready.notify_one();
                if let Err(e) = signal.write(1) {
                    crate::error_limited!("virtio-blk: cannot signal a completion: {e}");
                }
            }
        })?;
        self.threads.push(thread);
        Ok(())
    }

    /// The requests that are done, as (head, used length).
    pub fn reap(&mut self) -> Vec<(u16, u32)> {
        let done =
            std::mem::take(&mut *self.done.list.lock().unwrap_or_else(PoisonError::into_inner));
        self.in_flight -= done.len().min(self.in_flight);
        done
    }

    /// Waits for every request in flight and returns them as `reap` does.
    pub fn drain(&mut self) -> Vec<(u16, u32)> {
        let mut list = self.done.list.lock().unwrap_or_else(PoisonError::into_inner);
        while list.len() < self.in_flight {
            list = self.done.ready.wait(list).unwrap_or_else(PoisonError::into_inner);
        }
        drop(list);
        self.reap()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // The threads end when the channel closes, after the request each
        // is in.
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
