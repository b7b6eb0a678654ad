//! virtio-net on hand-built chains, with a datagram socket pair standing
//! in for the tap (one datagram, one frame, as a tap reads and writes).
//! Built for the fuzz targets too (feature `fuzzing`).
#![cfg_attr(not(test), allow(dead_code, unused_imports))]

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;

use virtio_bindings::virtio_net::*;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::virtio::test_utils::*;
use crate::virtio::{GuestMemoryMmap, VirtioInterruptType};

const MEM: usize = 0x40_0000;
/// Where the transmit queue's rings go (the receive queue's are at 0).
const TX_RINGS: u64 = 0x8_0000;

/// The device side as a `Tap`, and the host side to talk to it.
fn tap_pair() -> (Arc<Tap>, UnixDatagram) {
    let (dev, host) = UnixDatagram::pair().unwrap();
    dev.set_nonblocking(true).unwrap();
    host.set_nonblocking(true).unwrap();
    // SAFETY: the descriptor was just created and is handed over whole.
    let fd = unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(dev)) };
    (Arc::new(Tap::socket(fd, "test")), host)
}

fn active(tq: &TestQueue, index: usize) -> ActiveQueue {
    ActiveQueue {
        index,
        queue: tq.queue(),
        kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    }
}

fn pair(
    mem: &GuestMemoryMmap,
    rx: &TestQueue,
    tx: &TestQueue,
    mergeable: bool,
) -> (QueuePair, UnixDatagram, Arc<RecordingInterrupt>) {
    let irq = Arc::new(RecordingInterrupt::default());
    let (tap, host) = tap_pair();
    let rx = Ring::new(mem.clone(), active(rx, 0), irq.clone()).unwrap();
    let tx = Ring::new(mem.clone(), active(tx, 1), irq.clone()).unwrap();
    let link = Arc::new(Link::default());
    (QueuePair::new(rx, tx, tap, link, mergeable, "test".to_owned()), host, irq)
}

/// A frame as the tap hands it: a header (no offloads) and `len` bytes.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; tap::VNET_HDR_LEN];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

#[test]
fn transmits_a_chain_as_one_frame() {
    let mem = guest_mem(MEM);
    let rxq = TestQueue::new(&mem, 16);
    let mut txq = TestQueue::new_at(&mem, 16, TX_RINGS);
    let (mut qp, host, irq) = pair(&mem, &rxq, &txq, true);
    let f = frame(100, 1);
    mem.write_slice(&f[..12], GuestAddress(DATA)).unwrap();
    mem.write_slice(&f[12..], GuestAddress(DATA + 0x1000)).unwrap();
    let head = txq.add_chain(&[(DATA, 12, 0), (DATA + 0x1000, 100, 0)]);
    qp.transmit();
    let mut got = vec![0u8; 4096];
    let n = host.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &f[..], "header and payload, in one frame");
    assert_eq!(txq.used(), vec![(u32::from(head), 0)]);
    assert_eq!(irq.take(), vec![VirtioInterruptType::Queue(1)]);
}

/// Linux's transmit layout with VIRTIO_RING_F_INDIRECT_DESC: one ring
/// entry pointing at a table of the frame's pieces.
#[test]
fn transmits_a_frame_from_an_indirect_table() {
    let mem = guest_mem(MEM);
    let rxq = TestQueue::new(&mem, 16);
    let txq = TestQueue::new_at(&mem, 16, TX_RINGS);
    let (mut qp, host, _) = pair(&mem, &rxq, &txq, true);
    let f = frame(300, 9);
    // Three readable pieces: header, 100 bytes, 200 bytes.
    let pieces = [(DATA, 12u32), (DATA + 0x1000, 100), (DATA + 0x2000, 200)];
    let mut at = 0;
    for (i, &(addr, len)) in pieces.iter().enumerate() {
        mem.write_slice(&f[at..at + len as usize], GuestAddress(addr)).unwrap();
        at += len as usize;
        let flags = if i + 1 < pieces.len() { NEXT } else { 0 };
        let d = virtio_queue::desc::split::Descriptor::new(addr, len, flags, i as u16 + 1);
        mem.write_obj(d, GuestAddress(TABLE + i as u64 * 16)).unwrap();
    }
    txq.store_desc(0, TABLE, 48, INDIRECT, 0);
    txq.make_available(0);
    qp.transmit();
    let mut got = vec![0u8; 4096];
    let n = host.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &f[..]);
    assert_eq!(txq.used(), vec![(0, 0)]);
}

#[test]
fn a_transmit_chain_shorter_than_a_header_is_dropped() {
    let mem = guest_mem(MEM);
    let rxq = TestQueue::new(&mem, 16);
    let mut txq = TestQueue::new_at(&mem, 16, TX_RINGS);
    let (mut qp, host, _) = pair(&mem, &rxq, &txq, true);
    let short = txq.add_chain(&[(DATA, 8, 0)]);
    let outside = txq.add_chain(&[(MEM as u64 - 4, 64, 0)]);
    qp.transmit();
    assert!(host.recv(&mut [0u8; 64]).is_err(), "nothing reached the tap");
    assert_eq!(txq.used(), vec![(u32::from(short), 0), (u32::from(outside), 0)]);
}

use vm_memory::{Bytes, GuestAddress};

#[test]
fn a_frame_spans_mergeable_buffers_published_together() {
    let mem = guest_mem(MEM);
    let mut rxq = TestQueue::new(&mem, 16);
    let txq = TestQueue::new_at(&mem, 16, TX_RINGS);
    let (mut qp, host, irq) = pair(&mem, &rxq, &txq, true);
    let bufs: Vec<u16> =
        (0..3).map(|i| rxq.add_chain(&[(DATA + i * 0x1000, 1500, WRITE)])).collect();
    let f = frame(2500, 3);
    host.send(&f).unwrap();
    qp.receive();
    // 2512 bytes: 1500 in the first buffer, 1012 in the second.
    assert_eq!(rxq.used(), vec![(u32::from(bufs[0]), 1500), (u32::from(bufs[1]), 1012)]);
    let mut got = read(&mem, DATA, 1500);
    got.extend(read(&mem, DATA + 0x1000, 1012));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
    assert_eq!(&got[12..], &f[12..]);
    assert_eq!(&got[..10], &f[..10]);
    assert_eq!(irq.take(), vec![VirtioInterruptType::Queue(0)]);
}

#[test]
fn a_frame_waits_for_buffers_then_arrives() {
    let mem = guest_mem(MEM);
    let mut rxq = TestQueue::new(&mem, 16);
    let txq = TestQueue::new_at(&mem, 16, TX_RINGS);
    let (mut qp, host, irq) = pair(&mem, &rxq, &txq, true);
    // One buffer, too small for the frame: it is given back, unused.
    rxq.add_chain(&[(DATA, 1000, WRITE)]);
    let f = frame(1400, 5);
    host.send(&f).unwrap();
    qp.receive();
    assert!(rxq.used().is_empty());
    assert!(irq.take().is_empty());
    // The driver adds another and kicks: both carry the frame.
    rxq.add_chain(&[(DATA + 0x1000, 1000, WRITE)]);
    qp.receive();
    assert_eq!(rxq.used(), vec![(0, 1000), (1, 412)]);
    let mut got = read(&mem, DATA, 1000);
    got.extend(read(&mem, DATA + 0x1000, 412));
    assert_eq!(&got[12..], &f[12..]);
}

#[test]
fn without_mergeable_buffers_each_frame_takes_one_chain() {
    let mem = guest_mem(MEM);
    let mut rxq = TestQueue::new(&mem, 16);
    let txq = TestQueue::new_at(&mem, 16, TX_RINGS);
    let (mut qp, host, _) = pair(&mem, &rxq, &txq, false);
    rxq.add_chain(&[(DATA, 12, WRITE), (DATA + 0x100, 2000, WRITE)]);
    rxq.add_chain(&[(DATA + 0x1000, 2012, WRITE)]);
    host.send(&frame(60, 1)).unwrap();
    host.send(&frame(70, 2)).unwrap();
    qp.receive();
    assert_eq!(rxq.used(), vec![(0, 72), (2, 82)]);
    assert_eq!(u16::from_le_bytes(read(&mem, DATA + 10, 2).try_into().unwrap()), 1);
    assert_eq!(read(&mem, DATA + 0x100, 60), frame(60, 1)[12..]);
}

#[test]
fn runt_frames_are_dropped() {
    let mem = guest_mem(MEM);
    let mut rxq = TestQueue::new(&mem, 16);
    let txq = TestQueue::new_at(&mem, 16, TX_RINGS);
    let (mut qp, host, _) = pair(&mem, &rxq, &txq, true);
    rxq.add_chain(&[(DATA, 1500, WRITE)]);
    host.send(&[0u8; 20]).unwrap();
    host.send(&frame(60, 4)).unwrap();
    qp.receive();
    assert_eq!(rxq.used(), vec![(0, 72)], "only the whole frame arrives");
}

/// A driver whose receive chains have no room at all: the worker takes at
/// most a ring's worth for one frame, then gives up on the device.
#[test]
fn receive_chains_without_room_end_in_a_reset_not_a_spin() {
    let mem = guest_mem(MEM);
    let rxq = TestQueue::new(&mem, 16);
    let txq = TestQueue::new_at(&mem, 16, TX_RINGS);
    let (mut qp, host, irq) = pair(&mem, &rxq, &txq, true);
    // One read-only descriptor, offered sixteen times over.
    rxq.store_desc(0, DATA, 64, 0, 0);
    for _ in 0..16 {
        rxq.make_available(0);
    }
    host.send(&frame(60, 1)).unwrap();
    qp.receive();
    assert_eq!(irq.take(), vec![VirtioInterruptType::Config], "NEEDS_RESET");
}

#[test]
fn a_receive_buffer_outside_memory_needs_a_reset() {
    let mem = guest_mem(MEM);
    let mut rxq = TestQueue::new(&mem, 16);
    let txq = TestQueue::new_at(&mem, 16, TX_RINGS);
    let (mut qp, host, irq) = pair(&mem, &rxq, &txq, true);
    rxq.add_chain(&[(MEM as u64 - 100, 1500, WRITE)]);
    host.send(&frame(60, 1)).unwrap();
    qp.receive();
    assert_eq!(irq.take(), vec![VirtioInterruptType::Config], "NEEDS_RESET");
    assert!(rxq.used().is_empty());
    // Later frames are not received until the reset.
    rxq.add_chain(&[(DATA, 1500, WRITE)]);
    host.send(&frame(60, 2)).unwrap();
    qp.receive();
    assert!(rxq.used().is_empty());
}

#[test]
fn the_control_queue_sets_pairs_and_mac() {
    let (taps, _hosts): (Vec<_>, Vec<_>) = (0..2).map(|_| tap_pair()).unzip();
    let mac = Arc::new(Mutex::new([0u8; 6]));
    let state = CtrlState { taps, mac: mac.clone(), mq: true };
    let mq = VIRTIO_NET_CTRL_MQ as u8;
    let set = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8;
    assert!(state.command(mq, set, &2u16.to_le_bytes()));
    assert!(state.command(mq, set, &1u16.to_le_bytes()));
    assert!(!state.command(mq, set, &0u16.to_le_bytes()), "zero pairs");
    assert!(!state.command(mq, set, &3u16.to_le_bytes()), "more pairs than offered");
    assert!(!state.command(mq, set, &[1]), "short");
    let mac_class = VIRTIO_NET_CTRL_MAC as u8;
    assert!(state.command(mac_class, VIRTIO_NET_CTRL_MAC_ADDR_SET as u8, &[2, 0, 0, 0, 0, 9]));
    assert_eq!(*mac.lock().unwrap(), [2, 0, 0, 0, 0, 9]);
    assert!(!state.command(mac_class, VIRTIO_NET_CTRL_MAC_ADDR_SET as u8, &[2, 0]));
    assert!(state.command(VIRTIO_NET_CTRL_RX as u8, VIRTIO_NET_CTRL_RX_PROMISC as u8, &[1]));
    assert!(!state.command(VIRTIO_NET_CTRL_VLAN as u8, 0, &[0, 1]), "not offered");
}

#[test]
fn a_control_command_gets_its_ack_byte() {
    let mem = guest_mem(MEM);
    let mut tq = TestQueue::new(&mem, 16);
    let (tap, _host) = tap_pair();
    let mac = Arc::new(Mutex::new([0u8; 6]));
    let mut state = CtrlState { taps: vec![tap], mac, mq: true };
    mem.write_slice(&[VIRTIO_NET_CTRL_MQ as u8, 0, 1, 0], GuestAddress(DATA)).unwrap();
    fill(&mem, DATA + 0x100, 1, 0xff);
    tq.add_chain(&[(DATA, 2, 0), (DATA + 2, 2, 0), (DATA + 0x100, 1, WRITE)]);
    // A header with no ack buffer at all is returned untouched.
    tq.add_chain(&[(DATA, 2, 0)]);
    let irq = Arc::new(RecordingInterrupt::default());
    let mut ring = Ring::new(mem.clone(), active(&tq, 2), irq).unwrap();
    ring.serve(crate::virtio::worker::Budget { requests: 8 }, &mut state);
    assert_eq!(read(&mem, DATA + 0x100, 1), [VIRTIO_NET_OK as u8]);
    assert_eq!(tq.used(), vec![(0, 1), (3, 0)]);
}

#[test]
fn describes_itself() {
    let (taps, _hosts): (Vec<_>, Vec<_>) = (0..2).map(|_| tap_pair()).unzip();
    let backend = Arc::new(NetBackend { taps, vhost: None, user: None, link: Default::default() });
    let params = NetParams { mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56], queue_size: 256 };
    let net = Net::new(backend, &params);
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.queue_max_sizes(), &[256; 5], "two pairs and the control queue");
    let f = net.features();
    for b in [VIRTIO_NET_F_MQ, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MAC] {
        assert_ne!(f & bit(b), 0, "feature {b}");
    }
    let mut config = [0u8; 10];
    net.read_config(0, &mut config);
    assert_eq!(config, [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 2, 0]);
}

/// User networking's socket: a wakeup's frames go in one sendmmsg (and in
/// two when they pass the batch's limit), each its own datagram, in order.
#[test]
fn a_wakeups_frames_reach_the_socket_in_order() {
    let mem = guest_mem(MEM);
    let rxq = TestQueue::new(&mem, 16);
    let mut txq = TestQueue::new_at(&mem, 16, TX_RINGS);
    let (mut qp, host, _irq) = pair(&mem, &rxq, &txq, true);
    // Room for them all, as user networking's pair has (the default would
    // drop the last, as a full wire does).
    let size: libc::c_int = 1 << 20;
    // SAFETY: setsockopt reads an int from a valid pointer.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(qp.tap.file()),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    // Five 60 KiB frames: 300 KiB, past the 256 KiB batch.
    let frames: Vec<Vec<u8>> = (0..5).map(|i| frame(60 * 1024, i as u8)).collect();
    for (i, f) in frames.iter().enumerate() {
        let at = DATA + i as u64 * 0x1_0000;
        mem.write_slice(f, GuestAddress(at)).unwrap();
        txq.add_chain(&[(at, f.len() as u32, 0)]);
    }
    qp.transmit();
    let mut got = vec![0u8; 70 * 1024];
    for (i, f) in frames.iter().enumerate() {
        let n = host.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &f[..], "frame {i}");
    }
    assert!(host.recv(&mut got).is_err(), "nothing more");
    assert_eq!(txq.used().len(), 5);
}

/// A guest's transmit descriptor for the fuzz bodies: anywhere near the
/// data area or anywhere at all, any length, any flags.
fn fuzz_desc(rng: &mut skiff_tests::fuzz::Rng) -> (u64, u32, u16) {
    let addr = match rng.below(4) {
        0 => DATA + rng.below(0x4000),
        1 => rng.interesting(),
        _ => DATA,
    };
    let len = match rng.below(3) {
        0 => *rng.pick(&[0u32, 1, 11, 12, 13, 1514, 65550, u32::MAX]),
        1 => rng.below(0x4000) as u32,
        _ => 12 + rng.below(1500) as u32,
    };
    let flags = match rng.below(6) {
        0 => INDIRECT,
        1 => rng.next_u64() as u16,
        2 => WRITE,
        _ => 0,
    };
    (addr, len, flags)
}

/// Fuzz target: what a hostile guest can put on the transmit queue:
/// virtio-net headers of any content (offload flags, GSO types, sizes at
/// the edges), frames split into any descriptor shape, write-only and
/// indirect descriptors, and scribbles over the rings. The queue pair
/// transmits: nothing panics, and what reaches the tap is what the guest
/// wrote, one frame per chain at most.
#[cfg(test)]
#[test]
fn fuzz_virtio_net_transmit() {
    skiff_tests::fuzz::run("virtio-net-transmit", 5_000, fuzz_transmit);
}

/// One input of `fuzz_virtio_net_transmit` (also a libFuzzer target).
pub(crate) fn fuzz_transmit(rng: &mut skiff_tests::fuzz::Rng) {
    const SIZE: u16 = 16;
    let mem = guest_mem(MEM);
    let rxq = TestQueue::new(&mem, SIZE);
    let mut txq = TestQueue::new_at(&mem, SIZE, TX_RINGS);
    let (mut qp, host, _irq) = pair(&mem, &rxq, &txq, rng.one_in(2));
    // A header (the first 12 bytes at DATA), then any bytes.
    let mut hdr = rng.bytes(12);
    hdr.resize(12, 0);
    mem.write_slice(&hdr, GuestAddress(DATA)).unwrap();
    mem.write_slice(&rng.bytes(256), GuestAddress(DATA + 12)).unwrap();
    let mut chains = 0;
    for _ in 0..rng.below(6) {
        let n = 1 + rng.index(4);
        let descs: Vec<_> = (0..n).map(|_| fuzz_desc(rng)).collect();
        if usize::from(txq.descriptors_used()) + n >= usize::from(SIZE) {
            break;
        }
        txq.add_chain(&descs);
        chains += 1;
    }
    if rng.one_in(4) {
        let at = txq.desc_table_addr() + rng.below(u64::from(SIZE) * 16);
        mem.write_slice(&rng.bytes(32), GuestAddress(at)).unwrap();
    }
    if rng.one_in(8) {
        txq.set_avail_idx(rng.next_u64() as u16);
    }
    qp.transmit();
    let mut frames = 0;
    let mut buf = vec![0u8; 1 << 17];
    while host.recv(&mut buf).is_ok() {
        frames += 1;
    }
    assert!(frames <= chains.max(usize::from(SIZE)), "{frames} frames from {chains} chains");
}

/// Fuzz target: control-queue commands of any class, command and payload,
/// through the ring in any descriptor shape (header split or not, ack
/// buffer missing, read-only or too short): each command gets an ack or
/// is returned untouched, the MAC changes only on a well-formed
/// MAC_ADDR_SET, and nothing panics.
#[cfg(test)]
#[test]
fn fuzz_virtio_net_control() {
    skiff_tests::fuzz::run("virtio-net-control", 10_000, fuzz_control);
}

/// One input of `fuzz_virtio_net_control` (also a libFuzzer target).
pub(crate) fn fuzz_control(rng: &mut skiff_tests::fuzz::Rng) {
    const SIZE: u16 = 16;
    let mem = guest_mem(MEM);
    let mut tq = TestQueue::new(&mem, SIZE);
    let pairs = 1 + rng.index(2);
    let (taps, _hosts): (Vec<_>, Vec<_>) = (0..pairs).map(|_| tap_pair()).unzip();
    let mac = Arc::new(Mutex::new([2, 0, 0, 0, 0, 1]));
    let mut state = CtrlState { taps, mac: mac.clone(), mq: rng.one_in(2) };
    let classes = [
        VIRTIO_NET_CTRL_RX as u8,
        VIRTIO_NET_CTRL_MAC as u8,
        VIRTIO_NET_CTRL_VLAN as u8,
        VIRTIO_NET_CTRL_ANNOUNCE as u8,
        VIRTIO_NET_CTRL_MQ as u8,
        5, // GUEST_OFFLOADS
    ];
    let mut chains = 0;
    for _ in 0..rng.below(6) {
        let class = if rng.one_in(4) { rng.next_u64() as u8 } else { *rng.pick(&classes) };
        let cmd = rng.below(6) as u8;
        let payload = rng.bytes(16);
        // Straight to the handler as well as through the ring.
        let _ = state.command(class, cmd, &payload);
        let mut msg = vec![class, cmd];
        msg.extend_from_slice(&payload);
        mem.write_slice(&msg, GuestAddress(DATA)).unwrap();
        fill(&mem, DATA + 0x100, 1, 0xff);
        let descs: Vec<(u64, u32, u16)> = match rng.below(4) {
            0 => vec![(DATA, msg.len() as u32, 0), (DATA + 0x100, 1, WRITE)],
            1 => vec![(DATA, 2, 0), (DATA + 2, payload.len() as u32, 0), (DATA + 0x100, 1, WRITE)],
            2 => vec![(DATA, msg.len() as u32, 0)],
            _ => (0..1 + rng.index(3)).map(|_| fuzz_desc(rng)).collect(),
        };
        if usize::from(tq.descriptors_used()) + descs.len() >= usize::from(SIZE) {
            break;
        }
        tq.add_chain(&descs);
        chains += 1;
    }
    let irq = Arc::new(RecordingInterrupt::default());
    let mut ring = Ring::new(mem.clone(), active(&tq, 2), irq).unwrap();
    ring.serve(crate::virtio::worker::Budget { requests: 8 }, &mut state);
    // The control queue writes an ack byte, nothing more, once per chain.
    let used = tq.used();
    assert!(used.len() <= chains, "{} used entries for {chains} chains", used.len());
    assert!(used.iter().all(|&(_, len)| len <= 1), "{used:?}");
}

/// `set_link`: the status the driver reads follows the cable, and the
/// driver is interrupted once per change while a driver runs.
#[test]
fn the_link_status_follows_set_link() {
    let link = Link::default();
    assert!(link.up());
    link.set(false);
    assert!(!link.up(), "no driver: nothing to interrupt, the state still changes");
    let irq = Arc::new(RecordingInterrupt::default());
    link.attach(Some(irq.clone()));
    link.set(false);
    assert!(irq.take().is_empty(), "no change, no interrupt");
    link.set(true);
    link.set(false);
    assert_eq!(irq.take(), [VirtioInterruptType::Config, VirtioInterruptType::Config]);
    link.attach(None);
    link.set(true);
    assert!(irq.take().is_empty());
}
