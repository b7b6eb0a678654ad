//! `aio=io_uring`: a queue's reads, writes and flushes handed to the kernel
//! through an io_uring, many at a time, straight between the image and
//! guest memory (no copy). Completions signal an eventfd the queue's
//! worker watches.
//!
//! In-flight operations point into guest memory, so they must all have
//! completed before that memory can go: `drain` waits for them, and the
//! queue's worker calls it when it is stopped (`Handler::quiesce`). Should
//! the kernel stop answering, `drain` keeps the memory mapped for good (and
//! the ring open) rather than let it go under a running operation.
//!
//! As QEMU's io_uring backend: a short read is resubmitted for the rest
//! (and what lies past the end of the file reads as zeros), a short write
//! is an error, and a flush the drive ignores (`cache=unsafe`, read-only)
//! never reaches the disk.

use std::io;
use std::os::fd::AsRawFd;

use io_uring::register::Restriction;
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
    /// Bytes a short read already brought in (resubmitted for the rest).
    done: usize,
    /// The image's descriptor.
    fd: std::os::fd::RawFd,
}

/// The only operations a ring runs (`Uring::new` registers them).
const ALLOWED_OPS: [u8; 4] =
    [opcode::Readv::CODE, opcode::Writev::CODE, opcode::Fsync::CODE, opcode::Nop::CODE];

/// How many times `drain` retries a failing wait before it gives up on
/// the ring (and keeps guest memory mapped for good).
const DRAIN_RETRIES: u32 = 100;

// SAFETY: the iovecs point into guest memory, which the worker thread that
// owns this engine keeps mapped (it holds the memory) until `drain`.
unsafe impl Send for InFlight {}

pub struct Uring {
    /// None once `drain` gave up on it: left open, never used again.
    ring: Option<IoUring>,
    done: EventFd,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// The most requests in flight at once, since the engine started.
    pub max_in_flight: usize,
    /// Flushes that went to the disk (fdatasync), since it started.
    pub syncs: usize,
}

impl Uring {
    /// A ring for up to `depth` requests at once.
    pub fn new(depth: u16) -> io::Result<Uring> {
        // Made disabled, so that what it may do is fixed before it runs:
        // the operations this engine submits and nothing else. A ring
        // bypasses seccomp (its operations are not system calls), so an
        // OPENAT or a SOCKET through it, should anything ever queue one,
        // fails with EACCES instead of reaching the host.
        let ring = IoUring::builder().setup_r_disabled().build(u32::from(depth.max(1)))?;
        let done = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        // Every completion is signalled. (register_eventfd_async would skip
        // the inline ones the worker reaps at once anyway, but on Linux 6.1
        // it signals only completions from io-wq threads: one finished by
        // task_work, as a buffered read retried after a page-cache miss is,
        // would never wake the worker. With it, the block batch's reboot
        // scenario stalled in 4 runs of 5.)
        ring.submitter().register_eventfd(done.as_raw_fd())?;
        let mut allowed: Vec<Restriction> =
            ALLOWED_OPS.iter().map(|&op| Restriction::sqe_op(op)).collect();
        // No SQE flags (fixed files, links, ...), no register operations.
        allowed.push(Restriction::sqe_flags_allowed(0));
        ring.submitter().register_restrictions(&mut allowed)?;
        ring.submitter().register_enable_rings()?;
        let depth = usize::from(depth.max(1));
        Ok(Uring {
            ring: Some(ring),
            done,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            max_in_flight: 0,
            syncs: 0,
        })
    }

    /// Queues an arbitrary operation, for the test that the ring refuses
    /// what it was not made for.
    #[cfg(test)]
    pub(super) fn push_raw(&mut self, entry: &io_uring::squeue::Entry) -> io::Result<i32> {
        if !self.queue_entry(entry) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let ring = self.ring.as_mut().expect("a ring");
        ring.submit_and_wait(1)?;
        let res = ring.completion().next().map(|c| c.result());
        res.ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
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
        if self.ring.is_none() {
            return Err(req);
        }
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
            // cache=unsafe (or a read-only drive): nothing to make durable.
            Plan::Flush if !disk.flushes() => opcode::Nop::new().build(),
            Plan::Flush => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
        }
        .user_data(slot as u64);
        if !self.queue_entry(&entry) {
            return Err(req);
        }
        self.free.pop();
        if matches!(req.plan, Plan::Flush) && disk.flushes() {
            self.syncs += 1;
        }
        self.slots[slot] = Some(InFlight { head, req, iov, want, done: 0, fd: disk.raw_fd() });
        self.max_in_flight = self.max_in_flight.max(self.in_flight());
        Ok(())
    }

    /// Puts an entry on the submission queue; false when it is full (or
    /// the ring was given up).
    fn queue_entry(&mut self, entry: &io_uring::squeue::Entry) -> bool {
        let Some(ring) = self.ring.as_mut() else { return false };
        // SAFETY: the entry's iovecs (and the guest memory they point to)
        // stay alive until its completion is reaped: the iovec vector lives
        // in the entry's slot (its heap buffer does not move), and the
        // memory stays mapped until `drain` (or for good, if it gives up).
        unsafe { ring.submission().push(entry) }.is_ok()
    }

    /// Completions wait in the ring.
    pub fn ready(&mut self) -> bool {
        self.ring.as_mut().is_some_and(|r| !r.completion().is_empty())
    }

    /// Hands what `push` queued to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        // The crate enters the kernel even with nothing to submit; most
        // wakeups (completions, a kick with nothing new) have nothing. The
        // completion queue cannot overflow (it has twice the room of
        // everything in flight), so nothing else needs the call.
        let Some(ring) = self.ring.as_mut() else { return Ok(()) };
        if ring.submission().is_empty() {
            return Ok(());
        }
        ring.submit().map(|_| ())
    }

    /// The requests that completed: their status bytes written, as (head,
    /// used length). A short read goes back to the kernel for the rest.
    pub fn reap(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let mut done = Vec::new();
        let Some(ring) = self.ring.as_mut() else { return done };
        let cqes: Vec<(u64, i32)> =
            ring.completion().map(|c| (c.user_data(), c.result())).collect();
        let mut resubmitted = false;
        for (slot, res) in cqes {
            let Some(mut f) = self.slots.get_mut(slot as usize).and_then(Option::take) else {
                continue;
            };
            let n = usize::try_from(res).ok();
            let ok = match (&f.req.plan, n) {
                (Plan::Flush, _) => res == 0,
                (_, None) => false,
                (Plan::Read { offset, .. }, Some(n)) if n > 0 && f.done + n < f.want => {
                    // Short: the rest from where it stopped.
                    f.done += n;
                    let at = *offset + f.done as u64;
                    match self.resubmit(slot as usize, f, at) {
                        Ok(()) => {
                            resubmitted = true;
                            continue;
                        }
                        Err(back) => {
                            f = back;
                            false
                        }
                    }
                }
                (Plan::Read { buffers, .. }, Some(n)) => {
                    // Nothing more (the end of the file): zeros, as QEMU.
                    f.done += n;
                    f.done >= f.want || zero_from(mem, buffers, f.done)
                }
                // A short write: QEMU's -ENOSPC.
                (Plan::Write { .. }, Some(n)) => f.done + n == f.want,
            };
            if !ok {
                log::debug!("virtio-blk: request {} failed: {res}", f.head);
            }
            self.free.push(slot as usize);
            drop(f.iov);
            done.push((f.head, request::complete(mem, &f.req, ok)));
        }
        if resubmitted {
            if let Err(e) = self.submit() {
                crate::error_limited!("virtio-blk: io_uring submit: {e}");
            }
        }
        done
    }

    /// Queues the rest of a short read (from byte `f.done`, at `offset` in
    /// the image) in its slot again; gives it back when it cannot go.
    fn resubmit(&mut self, slot: usize, mut f: InFlight, offset: u64) -> Result<(), InFlight> {
        let mut skip = f.done;
        let mut iov = Vec::with_capacity(f.iov.len());
        for v in &f.iov {
            if skip >= v.iov_len {
                skip -= v.iov_len;
                continue;
            }
            // SAFETY: `skip < iov_len`: still inside the buffer.
            let base = unsafe { v.iov_base.cast::<u8>().add(skip) };
            iov.push(libc::iovec { iov_base: base.cast(), iov_len: v.iov_len - skip });
            skip = 0;
        }
        let Ok(n) = u32::try_from(iov.len()) else { return Err(f) };
        if !matches!(f.req.plan, Plan::Read { .. }) {
            return Err(f);
        }
        let entry = opcode::Readv::new(types::Fd(f.fd), iov.as_ptr(), n)
            .offset(offset)
            .build()
            .user_data(slot as u64);
        // The new vector keeps what the kernel reads alive in the slot.
        f.iov = iov;
        if !self.queue_entry(&entry) {
            return Err(f);
        }
        self.slots[slot] = Some(f);
        Ok(())
    }

    /// Waits for every request in flight (before guest memory may go) and
    /// returns them as `reap` does. If the kernel keeps failing the wait,
    /// the ring is given up: left open and never used again, and guest
    /// memory kept mapped for good (a leak, never memory unmapped under an
    /// operation).
    pub fn drain(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let mut done = Vec::new();
        let mut failures = 0;
        while self.in_flight() > 0 {
            let Some(ring) = self.ring.as_mut() else { break };
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The completion queue is full: reaping makes room.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    failures += 1;
                    if failures == DRAIN_RETRIES {
                        crate::error_limited!(
                            "virtio-blk: io_uring keeps failing ({e}) with {} requests in \
                             flight: guest memory stays mapped until skiff exits",
                            self.in_flight()
                        );
                        std::mem::forget(mem.clone());
                        std::mem::forget(self.ring.take());
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            done.extend(self.reap(mem));
        }
        done
    }
}

/// Zeros what lies past byte `from` of a read's buffers; false if guest
/// memory refused it.
fn zero_from(
    mem: &GuestMemoryMmap,
    buffers: &[(vm_memory::GuestAddress, usize)],
    from: usize,
) -> bool {
    use vm_memory::{Address, Bytes};
    let mut skip = from;
    for &(addr, len) in buffers {
        if skip >= len {
            skip -= len;
            continue;
        }
        let zeros = vec![0u8; len - skip];
        if mem.write_slice(&zeros, addr.unchecked_add(skip as u64)).is_err() {
            return false;
        }
        skip = 0;
    }
    true
}
