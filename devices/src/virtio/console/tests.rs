//! virtio-serial driven as Linux's virtio_console drives it, on hand-built
//! queues, with a Unix socket pair as the host end.
#![cfg_attr(not(test), allow(dead_code, unused_imports))]

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::virtio::test_utils::*;
use crate::virtio::ActiveQueue;

const MEM: usize = 0x40_0000;
/// Where each queue's rings start: port 0 rx, tx, control rx, tx.
const RINGS: [u64; 4] = [0, 0x4000, 0x8000, 0xc000];
const SIZE: u16 = 64;
/// Control buffers, guest input buffers, guest output.
const CTRL_BUF: u64 = DATA;
const IN_BUF: u64 = DATA + 0x1_0000;
const OUT_BUF: u64 = DATA + 0x2_0000;

/// A connected (or not) Unix socket as a port's host end; an ended one
/// is kept until reaped, its generation counts the changes.
pub(crate) struct StreamHost(pub(crate) Option<UnixStream>, Option<UnixStream>, u64);

impl StreamHost {
    pub(crate) fn new(s: Option<UnixStream>) -> Self {
        StreamHost(s, None, 0)
    }
}

impl PortHost for StreamHost {
    fn watch(&self) -> Option<RawFd> {
        self.0.as_ref().map(|s| s.as_raw_fd())
    }
    fn poll(&mut self) {}
    fn connected(&self) -> bool {
        self.0.is_some()
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.as_mut().ok_or(io::ErrorKind::NotConnected)?.read(buf)
    }
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.as_mut().ok_or(io::ErrorKind::NotConnected)?.write(buf)
    }
    fn disconnect(&mut self) {
        self.1 = self.0.take();
        self.2 += 1;
    }
    fn reap(&mut self) {
        self.1 = None;
    }
    fn generation(&self) -> u64 {
        self.2
    }
}

/// A bus with a console at port 0 whose host end is one side of a socket
/// pair; the other side (the "driver") is returned.
fn console_with_peer() -> (Console, UnixStream) {
    let (ours, peer) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let host: SharedHost = Arc::new(Mutex::new(StreamHost::new(Some(ours))));
    let port = PortConfig { nr: 0, console: true, name: None, host };
    (Console::new(1, vec![port]), peer)
}

struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    queues: Vec<TestQueue<'a>>,
    kicks: Vec<EventFd>,
    ctrl_next: u64,
    ctrl_seen: usize,
}

impl<'a> Guest<'a> {
    fn start(c: &mut Console, mem: &'a GuestMemoryMmap) -> Guest<'a> {
        let queues: Vec<TestQueue> =
            RINGS.iter().map(|&b| TestQueue::new_at(mem, SIZE, b)).collect();
        let kicks: Vec<EventFd> =
            (0..4).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect();
        let active = queues
            .iter()
            .enumerate()
            .map(|(i, tq)| ActiveQueue {
                index: i,
                queue: tq.queue(),
                kick: kicks[i].try_clone().unwrap(),
                call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            })
            .collect();
        c.ack_features(VIRTIO_F_VERSION_1 | F_MULTIPORT);
        let irq = Arc::new(RecordingInterrupt::default());
        c.activate(ActivationContext { mem: mem.clone(), queues: active, interrupt: irq }).unwrap();
        let mut g = Guest { mem, queues, kicks, ctrl_next: CTRL_BUF, ctrl_seen: 0 };
        // The driver fills the control receive queue first.
        for _ in 0..8 {
            let at = g.ctrl_next;
            g.ctrl_next += 64;
            g.queues[2].add_chain(&[(at, 64, WRITE)]);
        }
        g.kick(2);
        g
    }

    fn kick(&self, q: usize) {
        self.kicks[q].write(1).unwrap();
    }

    /// Sends a control message to the device.
    fn send(&mut self, id: u32, event: u16, value: u16) {
        let at = self.ctrl_next;
        self.ctrl_next += 64;
        self.mem.write_slice(&control::header(id, event, value), GuestAddress(at)).unwrap();
        self.queues[3].add_chain(&[(at, 8, 0)]);
        self.kick(3);
    }

    /// The device's next `n` control messages, as (id, event, value, rest).
    fn receive(&mut self, n: usize) -> Vec<(u32, u16, u16, Vec<u8>)> {
        wait_until(10, || self.queues[2].used().len() >= self.ctrl_seen + n);
        let used = self.queues[2].used();
        assert!(
            used.len() >= self.ctrl_seen + n,
            "{} control messages, wanted {n} more",
            used.len()
        );
        let got = used[self.ctrl_seen..self.ctrl_seen + n]
            .iter()
            .map(|&(head, len)| {
                let b = read(self.mem, CTRL_BUF + u64::from(head) * 64, len as usize);
                let id = u32::from_le_bytes(b[0..4].try_into().unwrap());
                let ev = u16::from_le_bytes(b[4..6].try_into().unwrap());
                let v = u16::from_le_bytes(b[6..8].try_into().unwrap());
                (id, ev, v, b[8..].to_vec())
            })
            .collect();
        self.ctrl_seen += n;
        got
    }

    /// The driver's handshake for port 0 as a console, up to its opening.
    fn open_console(&mut self) {
        self.send(0, DEVICE_READY_EV, 1);
        assert_eq!(self.receive(1), [(0, 1, 1, vec![])], "DEVICE_ADD of port 0");
        self.send(0, 3, 1);
        assert_eq!(self.receive(2), [(0, 4, 1, vec![]), (0, 6, 1, vec![])], "console, open");
        self.send(0, 6, 1);
    }
}

const DEVICE_READY_EV: u16 = 0;

use vm_memory::{Bytes, GuestAddress};

#[test]
fn handshake_then_bytes_both_ways_then_hang_up() {
    let mem = guest_mem(MEM);
    let (mut c, mut peer) = console_with_peer();
    let mut g = Guest::start(&mut c, &mem);
    g.open_console();
    // Guest output reaches the host end.
    mem.write_slice(b"Spawning backdoor root shell...\n", GuestAddress(OUT_BUF)).unwrap();
    g.queues[1].add_chain(&[(OUT_BUF, 32, 0)]);
    g.kick(1);
    peer.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = [0u8; 32];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"Spawning backdoor root shell...\n");
    // Host input reaches the guest's receive buffers.
    g.queues[0].add_chain(&[(IN_BUF, 256, WRITE)]);
    g.kick(0);
    peer.write_all(b"uname -a\n").unwrap();
    wait_until(10, || !g.queues[0].used().is_empty());
    assert_eq!(g.queues[0].used(), [(0, 9)]);
    assert_eq!(read(&mem, IN_BUF, 9), b"uname -a\n");
    // The host end hangs up: the driver hears the port closed.
    drop(peer);
    g.queues[0].add_chain(&[(IN_BUF, 256, WRITE)]);
    g.kick(0);
    assert_eq!(g.receive(1), [(0, 6, 0, vec![])], "PORT_OPEN 0");
    assert!(c.reset());
}

/// A host end that reads slowly loses nothing: the device holds the
/// guest's next buffer until the socket takes what it has.
#[test]
fn output_waits_for_a_slow_host_end_and_loses_nothing() {
    let mem = guest_mem(MEM);
    let (mut c, mut peer) = console_with_peer();
    let mut g = Guest::start(&mut c, &mem);
    g.open_console();
    const CHAINS: u64 = 24;
    const LEN: u64 = 32 * 1024;
    let mut expected = Vec::new();
    for i in 0..CHAINS {
        let bytes: Vec<u8> = (0..LEN).map(|j| (i * 7 + j % 251) as u8).collect();
        mem.write_slice(&bytes, GuestAddress(OUT_BUF + i * LEN)).unwrap();
        expected.extend(bytes);
        g.queues[1].add_chain(&[(OUT_BUF + i * LEN, LEN as u32, 0)]);
    }
    g.kick(1);
    // More than a socket buffer: the device must stop and wait.
    std::thread::sleep(Duration::from_millis(200));
    let taken = g.queues[1].used().len() as u64;
    assert!(taken < CHAINS, "all {taken} chains taken while the peer read nothing");
    peer.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = vec![0u8; expected.len()];
    peer.read_exact(&mut got).unwrap();
    assert!(got == expected, "bytes lost or reordered");
    wait_until(10, || g.queues[1].used().len() as u64 == CHAINS);
    assert_eq!(g.queues[1].used().len() as u64, CHAINS);
    assert!(c.reset());
}

/// Named ports get their names; without a host end the port is not
/// opened, and what the guest writes to it is dropped, not held.
#[test]
fn named_port_and_no_host_end() {
    let mem = guest_mem(MEM);
    let host: SharedHost = Arc::new(Mutex::new(StreamHost::new(None)));
    let port = PortConfig { nr: 0, console: false, name: Some("org.test.0".into()), host };
    let mut c = Console::new(1, vec![port]);
    let mut g = Guest::start(&mut c, &mem);
    g.send(0, DEVICE_READY_EV, 1);
    assert_eq!(g.receive(1), [(0, 1, 1, vec![])]);
    g.send(0, 3, 1);
    assert_eq!(g.receive(1), [(0, 7, 1, b"org.test.0\0".to_vec())], "PORT_NAME, no PORT_OPEN");
    g.send(0, 6, 1);
    for i in 0..4 {
        g.queues[1].add_chain(&[(OUT_BUF + i * 64, 64, 0)]);
    }
    g.kick(1);
    wait_until(10, || g.queues[1].used().len() == 4);
    assert_eq!(g.queues[1].used().len(), 4, "dropped, not held");
    assert!(c.reset());
}
