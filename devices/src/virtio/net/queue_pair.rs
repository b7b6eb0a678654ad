//! One receive/transmit queue pair on its tap queue, served by a worker.
//!
//! Transmit: each chain's readable buffers are gathered (`writev`) into
//! one frame on the tap, straight from guest memory. Receive: a frame is
//! read from the tap into a buffer of the worker's, then copied into as
//! many of the driver's chains as it needs (one, unless
//! VIRTIO_NET_F_MRG_RXBUF was negotiated), and those chains are published
//! on the used ring together: the driver must never see the first buffer
//! of a frame before the rest (Linux drops a frame whose buffers are
//! missing).

use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::tap::{Tap, VNET_HDR_LEN};
use crate::virtio::chain::Chain;
use crate::virtio::worker::{notice, Budget, Handler, Outcome, Request, Ring};
use crate::virtio::{GuestMemoryMmap, VirtioInterruptType};

/// The largest frame a tap hands over: a 64 KiB GSO frame, its Ethernet
/// header and a VLAN tag, behind the virtio-net header.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65535 + 14 + 4;

/// An Ethernet header: destination, source, type.
const ETH_HLEN: usize = 14;

/// Frames moved per wakeup in each direction, so one busy queue pair
/// cannot keep its worker from `stop`.
const FRAMES_PER_WAKEUP: usize = 64;

/// Event data of the tap descriptor in the worker's epoll set.
const TAP: u32 = 1;

/// How many times one frame's delivery looks again at a ring whose avail
/// index moved but gave no buffer, before the worker comes back later.
const MAX_RECHECKS: usize = 4;

pub struct QueuePair {
    pub(super) rx: Ring,
    pub(super) tx: Ring,
    pub(super) tap: Arc<Tap>,
    /// The cable (`set_link`): while out, frames are dropped both ways.
    link: Arc<super::Link>,
    pub(super) mergeable: bool,
    /// Received from the tap; `pending` bytes of it wait for buffers.
    frame: Vec<u8>,
    pending: Option<usize>,
    /// The used index the driver was last interrupted for (receive side,
    /// whose used entries skiff publishes itself).
    rx_signalled: Wrapping<u16>,
    /// The driver broke the receive ring: nothing is received until a reset.
    rx_broken: bool,
    /// Frames of one wakeup for user networking's socket, sent together.
    tx_batch: Batch,
    name: String,
}

/// Transmitted frames copied out of guest memory, to go in one sendmmsg:
/// a call per frame is what the socket stand-in's transmit path spent
/// most of its time on under nesting.
#[derive(Default)]
struct Batch {
    data: Vec<u8>,
    ends: Vec<usize>,
}

impl Batch {
    /// Past this much, the batch is sent before the next frame joins it.
    const LIMIT: usize = 256 * 1024;

    fn flush(&mut self, tap: &Tap, name: &str) {
        if self.ends.is_empty() {
            return;
        }
        let mut frames = Vec::with_capacity(self.ends.len());
        let mut start = 0;
        for &end in &self.ends {
            frames.push(&self.data[start..end]);
            start = end;
        }
        // A full socket drops frames, as a wire would.
        if let Err(e) = tap.send_frames(&frames) {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                crate::error_limited!("{name}: sending frames: {e}");
            }
        }
        self.data.clear();
        self.ends.clear();
    }
}

impl QueuePair {
    pub fn new(
        rx: Ring,
        tx: Ring,
        tap: Arc<Tap>,
        link: Arc<super::Link>,
        mergeable: bool,
        name: String,
    ) -> Self {
        let rx_signalled = Wrapping(rx.queue.next_used());
        QueuePair {
            rx,
            tx,
            tap,
            link,
            mergeable,
            frame: vec![0; MAX_FRAME],
            pending: None,
            rx_signalled,
            rx_broken: false,
            tx_batch: Batch::default(),
            name,
        }
    }

    /// Moves frames from the tap to the driver until the tap is empty, the
    /// driver has no buffers left (its next rx kick brings us back) or the
    /// wakeup's budget is spent.
    pub(super) fn receive(&mut self) {
        if self.rx_broken {
            return;
        }
        let mut published = false;
        let mut spent = true;
        for _ in 0..FRAMES_PER_WAKEUP {
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.frame) {
                    // Not even a header and an Ethernet header: nothing a
                    // driver could take; dropped.
                    Ok(len) if len < VNET_HDR_LEN + ETH_HLEN => continue,
                    // The cable is out: what arrives is lost, as on a wire.
                    Ok(_) if !self.link.up() => continue,
                    Ok(len) => len,
                    Err(e) => {
                        if e.kind() != std::io::ErrorKind::WouldBlock {
                            crate::error_limited!("{}: reading the tap: {e}", self.name);
                        }
                        spent = false;
                        break;
                    }
                },
            };
            match self.deliver(len) {
                Delivery::Done => published = true,
                Delivery::NoBuffers => {
                    self.pending = Some(len);
                    spent = false;
                    break;
                }
                Delivery::Broken => {
                    self.rx_broken = true;
                    spent = false;
                    break;
                }
            }
        }
        // Budget spent with the tap perhaps not empty: come back (the tap
        // is edge-triggered and would not wake the worker again).
        if spent {
            self.rx.rearm.arm();
        }
        if published {
            self.notify_rx();
        }
    }

    /// Copies the frame of `len` bytes into the driver's receive buffers.
    fn deliver(&mut self, len: usize) -> Delivery {
        let mem = &self.rx.mem;
        let queue = &mut self.rx.queue;
        let max = usize::from(queue.size());
        let mut used: Vec<(u16, u32)> = Vec::new();
        let mut first: Option<Chain> = None;
        let mut written = 0;
        let frame = &mut self.frame[..len];
        // Times the driver's avail index said "more" and the ring then had
        // none: a driver that flips the index would keep this loop going.
        let mut rechecks = 0;
        loop {
            // A frame never needs more chains than the ring holds; a driver
            // whose buffers cannot hold one (empty chains, tiny ones) would
            // otherwise keep the worker taking chains for ever.
            if used.len() == max {
                crate::error_limited!(
                    "{}: the receive ring cannot hold a {}-byte frame; the device needs a reset",
                    self.name,
                    len
                );
                self.rx.interrupt.needs_reset();
                return Delivery::Broken;
            }
            let chain = match queue.iter(mem) {
                Ok(mut avail) => avail.next(),
                Err(e) => {
                    crate::error_limited!(
                        "{}: receive queue: {e}; the device needs a reset",
                        self.name
                    );
                    self.rx.interrupt.needs_reset();
                    return Delivery::Broken;
                }
            };
            let Some(chain) = chain else {
                // Not enough buffers: ask the driver to kick when it adds
                // one (avail_event: past those taken), go on if it just
                // did, else give back the ones taken for later.
                if let Ok(true) = queue.enable_notification(mem) {
                    rechecks += 1;
                    if rechecks <= MAX_RECHECKS {
                        continue;
                    }
                    // Come back later rather than spin with the driver.
                    self.rx.rearm.arm();
                }
                for _ in 0..used.len() {
                    queue.go_to_previous_position();
                }
                return Delivery::NoBuffers;
            };
            let head = chain.head_index();
            let chain = match Chain::read(mem, chain, max) {
                Ok(c) => c,
                Err(e) => {
                    // As QEMU's virtio_error: a driver that hands out
                    // buffers it does not own gets nothing more until it
                    // resets the device.
                    crate::error_limited!(
                        "{}: receive buffer {head}: {e}; the device needs a reset",
                        self.name
                    );
                    self.rx.interrupt.needs_reset();
                    return Delivery::Broken;
                }
            };
            let n = chain.write_from(mem, &frame[written..]);
            written += n;
            used.push((head, n as u32));
            if first.is_none() {
                first = Some(chain);
            }
            if written == frame.len() || !self.mergeable {
                break;
            }
        }
        if written < frame.len() {
            crate::error_limited!(
                "{}: a {}-byte frame did not fit the driver's receive buffer; truncated",
                self.name,
                frame.len() - VNET_HDR_LEN
            );
        }
        // num_buffers, in the header at the start of the first buffer.
        if let Some(c) = &first {
            write_at(mem, c, 10, &(used.len() as u16).to_le_bytes());
        }
        let _ = queue.disable_notification(mem);
        self.publish(&used);
        Delivery::Done
    }

    /// Puts `entries` on the receive used ring, then moves its index once.
    fn publish(&mut self, entries: &[(u16, u32)]) {
        let mem = &self.rx.mem;
        let queue = &mut self.rx.queue;
        let size = queue.size();
        let ring = GuestAddress(queue.used_ring());
        let mut next = Wrapping(queue.next_used());
        for &(head, len) in entries {
            let slot = 4 + u64::from(next.0 % size) * 8;
            // struct virtq_used_elem: id, len (le32 each).
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..].copy_from_slice(&len.to_le_bytes());
            if ring.checked_add(slot).and_then(|a| mem.write_slice(&elem, a).ok()).is_none() {
                crate::error_limited!("{}: the used ring is outside guest memory", self.name);
                return;
            }
            next += Wrapping(1);
        }
        queue.set_next_used(next.0);
        if let Some(idx) = ring.checked_add(2) {
            let _ = mem.store(next.0.to_le(), idx, Ordering::Release);
        }
    }

    /// Interrupts the driver for what `publish` put on the receive ring,
    /// as VIRTIO_RING_F_EVENT_IDX says (vring_need_event).
    fn notify_rx(&mut self) {
        let queue = &self.rx.queue;
        let new = Wrapping(queue.next_used());
        let old = std::mem::replace(&mut self.rx_signalled, new);
        fence(Ordering::SeqCst);
        if queue.event_idx_enabled() {
            let at = u64::from(queue.size()) * 2 + 4;
            let used_event = GuestAddress(queue.avail_ring())
                .checked_add(at)
                .and_then(|a| self.rx.mem.load::<u16>(a, Ordering::Relaxed).ok())
                .map(u16::from_le);
            if let Some(event) = used_event {
                if new - Wrapping(event) - Wrapping(1) >= new - old {
                    return;
                }
            }
        }
        if let Err(e) = self.rx.interrupt.trigger(VirtioInterruptType::Queue(self.rx.index)) {
            crate::error_limited!("{}: cannot interrupt the guest: {e}", self.name);
        }
    }

    pub(super) fn transmit(&mut self) {
        let max = usize::from(self.tx.queue.size());
        let batch = self.tap.is_socket().then_some(&mut self.tx_batch);
        let mut sender = Sender {
            tap: &self.tap,
            name: &self.name,
            max,
            iov: Vec::new(),
            batch,
            link_up: self.link.up(),
        };
        self.tx.serve(Budget { requests: FRAMES_PER_WAKEUP }, &mut sender);
        if let Some(b) = sender.batch {
            b.flush(&self.tap, &self.name);
        }
    }
}

enum Delivery {
    Done,
    NoBuffers,
    Broken,
}

/// Writes `bytes` at `offset` into the chain's writable buffers.
fn write_at(mem: &GuestMemoryMmap, chain: &Chain, mut offset: usize, bytes: &[u8]) {
    let mut bytes = bytes;
    for d in chain.writable() {
        let len = d.len() as usize;
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = (len - offset).min(bytes.len());
        let _ = mem.write_slice(&bytes[..n], d.addr().unchecked_add(offset as u64));
        bytes = &bytes[n..];
        offset = 0;
        if bytes.is_empty() {
            return;
        }
    }
}

/// Serves transmit chains: one frame each, gathered onto the tap.
struct Sender<'a> {
    tap: &'a Tap,
    name: &'a str,
    max: usize,
    /// The gather list, reused for every frame of a wakeup.
    iov: Vec<libc::iovec>,
    /// User networking: frames are copied here and sent together.
    batch: Option<&'a mut Batch>,
    /// The cable is in: otherwise frames are taken and dropped.
    link_up: bool,
}

impl Request for Sender<'_> {
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Outcome {
        if !self.link_up {
            return Outcome::Used(0);
        }
        let max = self.max;
        let head = chain.head_index();
        let chain = match Chain::read(mem, chain, max) {
            Ok(c) => c,
            Err(e) => {
                crate::error_limited!("{}: transmit chain {head}: {e}", self.name);
                return Outcome::Used(0);
            }
        };
        self.iov.clear();
        let mut total = 0usize;
        for d in chain.descriptors.iter().filter(|d| !d.is_write_only()) {
            let Ok(slice) = mem.get_slice(d.addr(), d.len() as usize) else {
                return Outcome::Used(0);
            };
            total += slice.len();
            self.iov.push(libc::iovec {
                iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
                iov_len: slice.len(),
            });
        }
        if !(VNET_HDR_LEN..=MAX_FRAME).contains(&total) {
            crate::error_limited!("{}: dropped a {total}-byte transmit frame", self.name);
            return Outcome::Used(0);
        }
        if let Some(batch) = self.batch.as_deref_mut() {
            if batch.data.len() + total > Batch::LIMIT {
                batch.flush(self.tap, self.name);
            }
            let start = batch.data.len();
            batch.data.resize(start + total, 0);
            let mut at = start;
            for d in chain.descriptors.iter().filter(|d| !d.is_write_only()) {
                let n = d.len() as usize;
                if mem.read_slice(&mut batch.data[at..at + n], d.addr()).is_err() {
                    batch.data.truncate(start);
                    return Outcome::Used(0);
                }
                at += n;
            }
            batch.ends.push(at);
            return Outcome::Used(0);
        }
        // SAFETY: the iovecs point into guest memory, checked by
        // `Chain::read` and mapped for as long as this worker runs.
        match unsafe { self.tap.write_frame(&self.iov) } {
            Ok(_) => {}
            // A full host queue drops the frame, as a wire would.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => crate::error_limited!("{}: writing the tap: {e}", self.name),
        }
        Outcome::Used(0)
    }
}

impl MutEventSubscriber for QueuePair {
    fn init(&mut self, ops: &mut EventOps) {
        self.rx.init(ops, &self.name);
        self.tx.init(ops, &self.name);
        let tap = Events::with_data_raw(self.tap.as_raw_fd(), TAP, notice());
        if let Err(e) = ops.add(tap) {
            crate::error_limited!("{}: cannot watch the tap: {e:?}", self.name);
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() == TAP || self.rx.take_event(&events) {
            self.receive();
        } else if self.tx.take_event(&events) {
            self.transmit();
        }
    }
}

impl Handler for QueuePair {}
