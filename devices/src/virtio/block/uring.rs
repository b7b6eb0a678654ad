//! `aio=io_uring`: a queue's reads, writes and flushes handed to the kernel
//! through an io_uring, many at a time, straight between the image and
//! guest memory (no copy). Completions signal an eventfd the queue's
//! worker watches.
//!
//! In-flight operations point into guest memory, so they must all have
//! completed before that memory can go: `drain` waits for them, and the
//! queue's worker calls it when it is stopped (`Handler::quiesce`).

use std::io;
use std::os::fd::AsRawFd;

use io_uring::{opcode, types, IoUring};
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EventFd;

use super::disk::Disk;
use super::request::{self, Async, Plan};
use crate::virtio::GuestMemoryMmap;

/// One request in the kernel's hands.
struct InFlight {
    head: u16,
    req: Async,
    /// The iovecs the kernel reads; they must live until completion.
    iov: Vec<libc::iovec>,
    /// The byte count a read or write must report.
    want: usize,
}

// SAFETY: the iovecs point into guest memory, which the worker thread that
// owns this engine keeps mapped (it holds the memory) until `drain`.
unsafe impl Send for InFlight {}

pub struct Uring {
    ring: IoUring,
    done: EventFd,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// The most requests in flight at once, since the engine started.
    pub max_in_flight: usize,
}

impl Uring {
    /// A ring for up to `depth` requests at once.
    pub fn new(depth: u16) -> io::Result<Uring> {
        let ring = IoUring::new(u32::from(depth.max(1)))?;
        let done = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        // Every completion is signalled. (register_eventfd_async would skip
        // the inline ones the worker reaps at once anyway, but on Linux 6.1
        // it signals only completions from io-wq threads: one finished by
        // task_work, as a buffered read retried after a page-cache miss is,
        // would never wake the worker. With it, the block batch's reboot
        // scenario stalled in 4 runs of 5.)
        ring.submitter().register_eventfd(done.as_raw_fd())?;
        let depth = usize::from(depth.max(1));
        Ok(Uring {
            ring,
            done,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            max_in_flight: 0,
        })
    }

    /// Signalled when requests complete (watch it edge-triggered: nothing
    /// reads it back).
    pub fn eventfd(&self) -> &EventFd {
        &self.done
    }

    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queues `req` for the kernel (submitted with `submit`). Gives it back
    /// when the engine cannot carry it: no room, a buffer not in one
    /// region, or (O_DIRECT) a buffer or offset not aligned.
    pub fn push(
        &mut self,
        mem: &GuestMemoryMmap,
        disk: &Disk,
        head: u16,
        req: Async,
    ) -> Result<(), Async> {
        let Some(&slot) = self.free.last() else { return Err(req) };
        let align = disk.direct_align();
        let aligned = |v: usize| align.is_none_or(|a| v.is_multiple_of(a));
        let (offset, buffers) = match &req.plan {
            Plan::Read { offset, buffers } | Plan::Write { offset, buffers } => {
                (*offset, buffers.as_slice())
            }
            Plan::Flush => (0, [].as_slice()),
        };
        if !aligned(offset as usize) {
            return Err(req);
        }
        let mut iov = Vec::with_capacity(buffers.len());
        for &(addr, len) in buffers {
            let Ok(slice) = mem.get_slice(addr, len) else { return Err(req) };
            let base = slice.ptr_guard_mut().as_ptr();
            if !aligned(base as usize) || !aligned(len) {
                return Err(req);
            }
            iov.push(libc::iovec { iov_base: base.cast(), iov_len: len });
        }
        let want = iov.iter().map(|v| v.iov_len).sum();
        let fd = types::Fd(disk.raw_fd());
        let Ok(n) = u32::try_from(iov.len()) else { return Err(req) };
        let entry = match &req.plan {
            Plan::Read { .. } => opcode::Readv::new(fd, iov.as_ptr(), n).offset(offset).build(),
            Plan::Write { .. } => opcode::Writev::new(fd, iov.as_ptr(), n).offset(offset).build(),
            Plan::Flush => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
        }
        .user_data(slot as u64);
        // SAFETY: the entry's iovecs (and the guest memory they point to)
        // stay alive until its completion is reaped: the iovec vector moves
        // into the slot below (its heap buffer does not move), and the
        // memory stays mapped until `drain`.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            return Err(req);
        }
        self.free.pop();
        self.slots[slot] = Some(InFlight { head, req, iov, want });
        self.max_in_flight = self.max_in_flight.max(self.in_flight());
        Ok(())
    }

    /// Completions wait in the ring.
    pub fn ready(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Hands what `push` queued to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        // The crate enters the kernel even with nothing to submit; most
        // wakeups (completions, a kick with nothing new) have nothing. The
        // completion queue cannot overflow (it has twice the room of
        // everything in flight), so nothing else needs the call.
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        self.ring.submit().map(|_| ())
    }

    /// The requests that completed: their status bytes written, as (head,
    /// used length).
    pub fn reap(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let mut done = Vec::new();
        let cqes: Vec<(u64, i32)> =
            self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (slot, res) in cqes {
            let Some(f) = self.slots.get_mut(slot as usize).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot as usize);
            let ok = match f.req.plan {
                Plan::Flush => res == 0,
                _ => usize::try_from(res).is_ok_and(|n| n == f.want),
            };
            if !ok {
                log::debug!("virtio-blk: request {} failed: {res}", f.head);
            }
            drop(f.iov);
            done.push((f.head, request::complete(mem, &f.req, ok)));
        }
        done
    }

    /// Waits for every request in flight (before guest memory may go) and
    /// returns them as `reap` does.
    pub fn drain(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let mut done = Vec::new();
        while self.in_flight() > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.kind() != io::ErrorKind::Interrupted {
                    crate::error_limited!("virtio-blk: waiting for io_uring: {e}");
                    break;
                }
            }
            done.extend(self.reap(mem));
        }
        done
    }
}
