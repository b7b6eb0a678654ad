//! The frontend against a scripted backend on the other end of a socket:
//! the order of QEMU's requests, the descriptors that go with them, and a
//! backend that lies, stalls or dies. Built for the fuzz targets too
//! (feature `fuzzing`), where only `fuzz_*` is used.
#![cfg_attr(not(test), allow(dead_code, unused_imports))]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::{Bytes, FileOffset, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use skiff_tests::fuzz::Rng;

use super::fs::{FsParams, VhostUserFs};
use super::{Connection, Error};
use crate::virtio::test_utils::{
    fill, read, wait_until, RecordingInterrupt, TestQueue, DATA, WRITE,
};
use crate::virtio::{
    ActivationContext, ActiveQueue, GuestMemoryMmap, VirtioDevice, VirtioInterruptType,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;
const RESET_DEVICE: u32 = 34;

const PROTOCOL_FEATURES: u64 = 1 << 30;
/// MQ | REPLY_ACK | CONFIG | RESET_DEVICE, and one skiff does not ask for.
const OFFERED_PROTOCOL: u64 = 0x1 | 0x8 | 0x200 | 0x2000 | 0x20;
const INDIRECT_DESC: u64 = 1 << 28;

/// How the scripted backend answers.
#[derive(Clone, Copy)]
enum Behaviour {
    Honest,
    /// Answers GET_FEATURES without VIRTIO_F_VERSION_1.
    Legacy,
    /// Serves this many queues (GET_QUEUE_NUM).
    Queues(u64),
    /// Answers GET_FEATURES with another request's reply.
    WrongReply,
    /// Answers GET_FEATURES with a header announcing 4 GiB of payload.
    Oversized,
    /// Answers GET_FEATURES with a header and no body.
    Short,
    /// Never answers GET_FEATURES.
    Silent,
    /// Honest answers, mangled by the fuzzer's choices (`serve_fuzzed`).
    Fuzz,
    /// Acknowledges SET_MEM_TABLE with a failure (REPLY_ACK).
    RefuseMemTable,
    /// Offers no VIRTIO_RING_F_EVENT_IDX.
    NoEventIdx,
}

/// One request as the backend saw it: its code, flags, body and how many
/// descriptors came with it.
#[derive(Debug, Clone)]
struct Seen {
    request: u32,
    flags: u32,
    body: Vec<u8>,
    fds: usize,
}

struct Backend {
    path: PathBuf,
    _dir: Option<TempDir>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// The backend's end of the connection, for `kill`.
    stream: Arc<Mutex<Option<UnixStream>>>,
    thread: Option<JoinHandle<()>>,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Backend {
    fn start(behaviour: Behaviour) -> Backend {
        let dir = std::env::temp_dir().join(format!(
            "skiff-vhost-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut b = Backend::listen(dir.join("backend.sock"), behaviour);
        b._dir = Some(TempDir(dir));
        b
    }

    /// A new backend on `path` (a restarted virtiofsd).
    fn listen(path: PathBuf, behaviour: Behaviour) -> Backend {
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let stream = Arc::new(Mutex::new(None));
        let end = stream.clone();
        let thread = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            *end.lock().unwrap() = s.try_clone().ok();
            serve(s, behaviour, &log);
        });
        Backend { path, _dir: None, seen, stream, thread: Some(thread) }
    }

    /// The backend dies: its end of the socket closes.
    fn kill(&self) {
        if let Some(s) = self.stream.lock().unwrap().take() {
            s.shutdown(std::net::Shutdown::Both).unwrap();
        }
    }

    /// The requests seen so far, once there are at least `n` (a request
    /// without a reply may still be on its way).
    fn requests_at_least(&self, n: usize) -> Vec<u32> {
        wait_until(5, || self.requests().len() >= n);
        self.requests()
    }

    fn requests(&self) -> Vec<u32> {
        self.seen.lock().unwrap().iter().map(|s| s.request).collect()
    }

    fn seen(&self, request: u32) -> Vec<Seen> {
        self.seen.lock().unwrap().iter().filter(|s| s.request == request).cloned().collect()
    }

    /// Waits for the backend to hang up (it does when the frontend does).
    fn join(mut self) -> Self {
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self
    }
}

fn reply(stream: &mut UnixStream, request: u32, body: &[u8]) {
    let mut msg = Vec::new();
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    let _ = stream.write_all(&msg);
}

/// An honest reply, mangled: fields or bytes changed, cut short or
/// replaced by noise (then the connection closes: a frontend waiting for
/// the rest would only meet its watchdog, which `a_silent_backend_times_out`
/// covers, slowly), or the connection closed instead of a reply.
fn mangle(rng: &mut Rng, stream: &mut UnixStream, request: u32, body: &[u8]) -> bool {
    let mut msg = request.to_le_bytes().to_vec();
    msg.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    match rng.below(8) {
        0..=2 => {}
        3 => {
            for _ in 0..=rng.below(4) {
                let i = rng.index(msg.len());
                msg[i] = rng.next_u64() as u8;
            }
        }
        4 => {
            let field = rng.index(3) * 4;
            let v = rng.interesting() as u32;
            msg[field..field + 4].copy_from_slice(&v.to_le_bytes());
        }
        5 | 6 => {
            if rng.one_in(2) {
                msg.truncate(rng.index(msg.len()));
            } else {
                msg = rng.bytes(64);
            }
            let _ = stream.write_all(&msg);
            return false;
        }
        _ => return false,
    }
    let _ = stream.write_all(&msg);
    true
}

/// Reads requests until the frontend hangs up, answering as `behaviour`
/// says and acknowledging whatever asks for it (REPLY_ACK).
fn serve(stream: UnixStream, behaviour: Behaviour, log: &Mutex<Vec<Seen>>) {
    serve_with(stream, behaviour, None, log)
}

/// `serve`, its answers mangled as `rng` chooses.
fn serve_fuzzed(stream: UnixStream, rng: Rng, log: &Mutex<Vec<Seen>>) {
    serve_with(stream, Behaviour::Fuzz, Some(rng), log)
}

fn serve_with(
    mut stream: UnixStream,
    behaviour: Behaviour,
    mut fuzz: Option<Rng>,
    log: &Mutex<Vec<Seen>>,
) {
    let mut reply = |stream: &mut UnixStream, request: u32, body: &[u8]| match &mut fuzz {
        Some(rng) => mangle(rng, stream, request, body),
        None => {
            reply(stream, request, body);
            true
        }
    };
    loop {
        let mut hdr = [0u8; 12];
        let Ok((n, file)) = stream.recv_with_fd(&mut hdr) else { return };
        if n == 0 {
            return;
        }
        if n < 12 && stream.read_exact(&mut hdr[n..]).is_err() {
            return;
        }
        let word = |i: usize| u32::from_le_bytes(hdr[i * 4..i * 4 + 4].try_into().unwrap());
        let (request, flags, size) = (word(0), word(1), word(2));
        let mut body = vec![0u8; size as usize];
        if stream.read_exact(&mut body).is_err() {
            return;
        }
        let fds = usize::from(file.is_some());
        log.lock().unwrap().push(Seen { request, flags, body: body.clone(), fds });
        // The honest answer, if the request has one.
        let answer: Option<Vec<u8>> = match (request, behaviour) {
            (GET_FEATURES, Behaviour::Legacy) => Some(PROTOCOL_FEATURES.to_le_bytes().to_vec()),
            (GET_FEATURES, Behaviour::WrongReply) => {
                reply(&mut stream, SET_OWNER, &[0; 8]);
                None
            }
            (GET_FEATURES, Behaviour::Oversized) => {
                let mut msg = request.to_le_bytes().to_vec();
                msg.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
                msg.extend_from_slice(&u32::MAX.to_le_bytes());
                msg.extend_from_slice(&[0xff; 8]);
                stream.write_all(&msg).unwrap();
                None
            }
            (GET_FEATURES, Behaviour::Short) => {
                // A header that announces a body, then nothing.
                let mut msg = request.to_le_bytes().to_vec();
                msg.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
                msg.extend_from_slice(&8u32.to_le_bytes());
                stream.write_all(&msg).unwrap();
                std::thread::sleep(Duration::from_secs(2));
                None
            }
            (GET_FEATURES, Behaviour::Silent) => {
                std::thread::sleep(Duration::from_secs(2));
                None
            }
            (GET_FEATURES, Behaviour::NoEventIdx) => Some(
                (VIRTIO_F_VERSION_1 | INDIRECT_DESC | PROTOCOL_FEATURES).to_le_bytes().to_vec(),
            ),
            (SET_MEM_TABLE, Behaviour::RefuseMemTable) if flags & 0x8 != 0 => {
                Some(1u64.to_le_bytes().to_vec())
            }
            (GET_FEATURES, _) => {
                let f = VIRTIO_F_VERSION_1
                    | VIRTIO_RING_F_EVENT_IDX
                    | INDIRECT_DESC
                    | PROTOCOL_FEATURES
                    | 1 << 33; // offered by the backend, not passed on
                Some(f.to_le_bytes().to_vec())
            }
            (GET_PROTOCOL_FEATURES, _) => Some(OFFERED_PROTOCOL.to_le_bytes().to_vec()),
            (GET_QUEUE_NUM, Behaviour::Queues(n)) => Some(n.to_le_bytes().to_vec()),
            (GET_QUEUE_NUM, _) => Some(4u64.to_le_bytes().to_vec()),
            (GET_VRING_BASE, _) => {
                let mut state = body.get(..4).unwrap_or(&[0; 4]).to_vec();
                state.extend_from_slice(&7u32.to_le_bytes());
                Some(state)
            }
            _ if flags & 0x8 != 0 => Some(0u64.to_le_bytes().to_vec()),
            _ => None,
        };
        if let Some(answer) = answer {
            if !reply(&mut stream, request, &answer) {
                return;
            }
        }
    }
}

/// Guest RAM in a memfd, as `-object memory-backend-memfd` makes it.
fn shared_mem(size: usize) -> GuestMemoryMmap {
    // SAFETY: a valid NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"skiff-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64).unwrap();
    let ranges = [(GuestAddress(0), size, Some(FileOffset::new(file, 0)))];
    GuestMemoryMmap::from_ranges_with_files(ranges.iter().cloned()).unwrap()
}

/// `n` queues as a transport hands them over, with the guest's side of
/// each (`TestQueue`) and a duplicate of its kick eventfd.
fn active_queues(
    mem: &GuestMemoryMmap,
    n: usize,
) -> (Vec<TestQueue<'_>>, Vec<ActiveQueue>, Vec<EventFd>) {
    let mut tqs = Vec::new();
    let mut queues = Vec::new();
    let mut kicks = Vec::new();
    for index in 0..n {
        let tq = TestQueue::new_at(mem, 16, 0x1_0000 * (index as u64 + 1));
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        kicks.push(kick.try_clone().unwrap());
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        queues.push(ActiveQueue { index, queue: tq.queue(), kick, call });
        tqs.push(tq);
    }
    (tqs, queues, kicks)
}

/// QEMU's order, from connection to a stopped device, with the memfd
/// and the eventfds passed along; and only the features the transport
/// can carry reach the guest.
#[test]
fn requests_go_in_qemus_order_with_their_descriptors() {
    let backend = Backend::start(Behaviour::Honest);
    let mut c = Connection::connect(&backend.path, 2).unwrap();
    assert_eq!(
        backend.requests_at_least(5),
        [GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER]
    );
    let acked =
        u64::from_le_bytes(backend.seen(SET_PROTOCOL_FEATURES)[0].body[..8].try_into().unwrap());
    assert_eq!(acked, OFFERED_PROTOCOL & !0x20, "only what skiff asks for");
    assert_eq!(
        c.device_features(),
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | INDIRECT_DESC | 1 << 33
    );

    let mem = shared_mem(0x40_0000);
    let (tqs, queues, _) = active_queues(&mem, 2);
    c.start(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, &mem, queues.iter().map(Into::into))
        .unwrap();
    let per_queue = [
        SET_VRING_NUM,
        SET_VRING_BASE,
        SET_VRING_ADDR,
        SET_VRING_KICK,
        SET_VRING_CALL,
        SET_VRING_ENABLE,
    ];
    let mut want = vec![SET_FEATURES, SET_MEM_TABLE];
    want.extend(per_queue);
    want.extend(per_queue);
    assert_eq!(backend.requests_at_least(19)[5..], want[..]);
    let features = u64::from_le_bytes(backend.seen(SET_FEATURES)[0].body[..8].try_into().unwrap());
    assert_eq!(features, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | PROTOCOL_FEATURES);
    let table = &backend.seen(SET_MEM_TABLE)[0];
    assert_eq!(table.fds, 1, "the memfd");
    // REPLY_ACK: every request after the negotiation asks for an answer.
    let asked: Vec<bool> =
        backend.seen.lock().unwrap()[5..19].iter().map(|s| s.flags & 0x8 != 0).collect();
    assert_eq!(asked, [true; 14]);
    // One region: guest address 0, the whole size, skiff's mapping, offset 0.
    let region =
        |i: usize| u64::from_le_bytes(table.body[8 + i * 8..16 + i * 8].try_into().unwrap());
    assert_eq!((region(0), region(1), region(3)), (0, 0x40_0000, 0));
    let base = region(2);
    assert!(backend.seen(SET_VRING_KICK).iter().all(|s| s.fds == 1));
    assert!(backend.seen(SET_VRING_CALL).iter().all(|s| s.fds == 1));
    // Ring addresses are skiff's: the memory table's base plus the guest address.
    let addr = &backend.seen(SET_VRING_ADDR)[1].body;
    let field = |i: usize| u64::from_le_bytes(addr[8 + i * 8..16 + i * 8].try_into().unwrap());
    assert_eq!(field(0), base + tqs[1].desc_table_addr());
    assert_eq!(field(1), base + tqs[1].used_addr());
    assert_eq!(field(2), base + tqs[1].avail_addr());

    c.stop();
    let tail = backend.requests_at_least(24)[19..].to_vec();
    assert_eq!(
        tail,
        [SET_VRING_ENABLE, GET_VRING_BASE, SET_VRING_ENABLE, GET_VRING_BASE, RESET_DEVICE]
    );
    // A second stop has nothing to stop.
    c.stop();
    assert_eq!(backend.requests().len(), 24);
    drop(c);
    backend.join();
}

#[test]
fn guest_ram_without_a_file_is_refused() {
    let backend = Backend::start(Behaviour::Honest);
    let mut c = Connection::connect(&backend.path, 1).unwrap();
    let mem = crate::virtio::test_utils::guest_mem(0x40_0000);
    let (_tqs, queues, _) = active_queues(&mem, 1);
    let err = c.start(VIRTIO_F_VERSION_1, &mem, queues.iter().map(Into::into)).unwrap_err();
    assert!(matches!(err, Error::RamNotShared), "{err}");
}

#[test]
fn a_backend_that_misbehaves_is_an_error_not_a_panic_or_a_hang() {
    for (behaviour, what) in [
        (Behaviour::Legacy, "VIRTIO_F_VERSION_1"),
        (Behaviour::Queues(1), "serves 1 queues, the device needs 2"),
        (Behaviour::WrongReply, "GET_FEATURES failed"),
        (Behaviour::Oversized, "GET_FEATURES failed"),
        (Behaviour::Short, "GET_FEATURES failed"),
    ] {
        let backend = Backend::start(behaviour);
        let t = std::time::Instant::now();
        let err = Connection::connect_with_timeout(&backend.path, 2, Duration::from_millis(300))
            .err()
            .expect(what)
            .to_string();
        assert!(t.elapsed() < Duration::from_secs(2), "{what}: {:?}", t.elapsed());
        assert!(err.contains(what), "{err}");
        assert!(err.contains("backend.sock"), "names the socket: {err}");
    }
}

#[test]
fn a_silent_backend_times_out() {
    let backend = Backend::start(Behaviour::Silent);
    let t = std::time::Instant::now();
    let err = Connection::connect_with_timeout(&backend.path, 1, Duration::from_millis(200))
        .err()
        .unwrap();
    assert!(err.to_string().contains("GET_FEATURES failed"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[test]
fn a_missing_socket_names_its_path() {
    let err = Connection::connect(std::path::Path::new("/nonexistent/v.sock"), 1).err().unwrap();
    assert_eq!(
        err.to_string(),
        "cannot connect to '/nonexistent/v.sock': No such file or directory (os error 2)"
    );
}

/// The device: config space with the tag and queue count, and a backend
/// that dies under it asks the driver for a reset, once, then lets the
/// device reset without talking to the dead socket.
#[test]
fn fs_device_config_and_backend_death() {
    let backend = Backend::start(Behaviour::Honest);
    let connection = Arc::new(Mutex::new(Connection::connect(&backend.path, 3).unwrap()));
    let params = FsParams { tag: "ro-store".into(), num_request_queues: 2, queue_size: 128 };
    let mut fs = VhostUserFs::new(connection.clone(), &params);
    assert_eq!(fs.device_type(), 26);
    assert_eq!(fs.queue_max_sizes(), [128, 128, 128]);
    assert_eq!(fs.features(), VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | INDIRECT_DESC);
    assert!(fs.calls_from_outside());
    let mut config = [0xffu8; 40];
    fs.read_config(0, &mut config);
    assert_eq!(&config[..8], b"ro-store");
    assert!(config[8..36].iter().all(|&b| b == 0));
    assert_eq!(config[36..], 2u32.to_le_bytes());

    let mem = shared_mem(0x40_0000);
    let (mut tqs, queues, kicks) = active_queues(&mem, 3);
    let interrupt = Arc::new(RecordingInterrupt::default());
    fs.ack_features(VIRTIO_F_VERSION_1);
    fs.activate(ActivationContext { mem: mem.clone(), queues, interrupt: interrupt.clone() })
        .unwrap();
    // Requests the backend took and never finished: a FUSE_GETATTR (3)
    // with unique 0x1234 on a request queue, and a FORGET on hiprio.
    let fuse_in = |opcode: u32, unique: u64| {
        let mut h = [0u8; 40];
        h[..4].copy_from_slice(&40u32.to_le_bytes());
        h[4..8].copy_from_slice(&opcode.to_le_bytes());
        h[8..16].copy_from_slice(&unique.to_le_bytes());
        h
    };
    mem.write_slice(&fuse_in(3, 0x1234), GuestAddress(DATA)).unwrap();
    mem.write_slice(&fuse_in(2, 0x99), GuestAddress(DATA + 0x1000)).unwrap();
    fill(&mem, DATA + 0x2000, 128, 0xee);
    let getattr = tqs[1].add_chain(&[(DATA, 40, 0), (DATA + 0x2000, 128, WRITE)]);
    let forget = tqs[0].add_chain(&[(DATA + 0x1000, 40, 0)]);
    backend.kill();
    wait_until(10, || !tqs[1].used().is_empty() && !tqs[0].used().is_empty());
    assert!(connection.lock().unwrap().is_down());
    // The GETATTR fails with ENOTCONN; the FORGET is returned as it is.
    assert_eq!(tqs[1].used(), [(u32::from(getattr), 16)]);
    let out = read(&mem, DATA + 0x2000, 17);
    assert_eq!(out[..4], 16u32.to_le_bytes());
    assert_eq!(out[4..8], (-libc::ENOTCONN).to_le_bytes());
    assert_eq!(out[8..16], 0x1234u64.to_le_bytes());
    assert_eq!(out[16], 0xee, "nothing written past the header");
    assert_eq!(tqs[0].used(), [(u32::from(forget), 0)]);
    let raised = interrupt.take();
    assert_eq!(raised.iter().filter(|t| **t == VirtioInterruptType::Config).count(), 1);
    assert!(raised.contains(&VirtioInterruptType::Queue(1)), "{raised:?}");
    // A later request, kicked, is refused too.
    let later = tqs[2].add_chain(&[(DATA, 40, 0), (DATA + 0x3000, 128, WRITE)]);
    kicks[2].write(1).unwrap();
    wait_until(10, || !tqs[2].used().is_empty());
    assert_eq!(tqs[2].used(), [(u32::from(later), 16)]);
    let before = backend.requests().len();
    assert!(fs.reset());
    assert_eq!(backend.requests().len(), before, "nothing sent to a dead backend");
}

/// `reconnect=`: once the backend is gone, skiff tries the socket again;
/// a new backend gets the memory table and every queue from where skiff
/// left it (the requests it refused meanwhile included), and the device
/// is the backend's again.
#[test]
fn reconnect_hands_the_queues_to_a_new_backend() {
    let backend = Backend::start(Behaviour::Honest);
    let mut c = Connection::connect(&backend.path, 2).unwrap();
    c.set_reconnect(Some(Duration::from_millis(20)));
    let connection = Arc::new(Mutex::new(c));
    let params = FsParams { tag: "t".into(), num_request_queues: 1, queue_size: 16 };
    let mut fs = VhostUserFs::new(connection.clone(), &params);
    let mem = shared_mem(0x40_0000);
    let (mut tqs, queues, kicks) = active_queues(&mem, 2);
    let interrupt = Arc::new(RecordingInterrupt::default());
    fs.ack_features(VIRTIO_F_VERSION_1);
    fs.activate(ActivationContext { mem: mem.clone(), queues, interrupt }).unwrap();
    backend.kill();
    // A request while nobody serves: refused.
    let head = tqs[1].add_chain(&[(DATA, 40, 0), (DATA + 0x2000, 128, WRITE)]);
    kicks[1].write(1).unwrap();
    wait_until(10, || !tqs[1].used().is_empty());
    assert_eq!(tqs[1].used(), [(u32::from(head), 16)]);

    let second = Backend::listen(backend.path.clone(), Behaviour::Honest);
    let seen = second.requests_at_least(19);
    assert!(!connection.lock().unwrap().is_down());
    assert_eq!(
        seen[..5],
        [GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER]
    );
    assert_eq!(seen[5..7], [SET_FEATURES, SET_MEM_TABLE]);
    // Queue 1 resumes after the refused request; queue 0 where it was.
    let bases: Vec<[u8; 8]> =
        second.seen(SET_VRING_BASE).iter().map(|s| s.body[..8].try_into().unwrap()).collect();
    let base = |index: u32, num: u32| {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&index.to_le_bytes());
        b[4..].copy_from_slice(&num.to_le_bytes());
        b
    };
    assert_eq!(bases, [base(0, 0), base(1, 1)]);
    // The device's reset reaches the new backend.
    assert!(fs.reset());
    assert!(second.requests_at_least(24).ends_with(&[GET_VRING_BASE, RESET_DEVICE]));
}

/// A backend whose replies are mangled at random (resources/fuzz.sh runs a
/// million): every sequence ends in an error or success, never a panic or
/// a hang (the harness's watchdog).
#[cfg(test)]
#[test]
fn fuzz_vhost_user_replies() {
    skiff_tests::fuzz::run("vhost-user-replies", 1000, fuzz_replies);
}

/// One input of `fuzz_vhost_user_replies` (also a libFuzzer target: `fuzz/`).
pub(crate) fn fuzz_replies(rng: &mut skiff_tests::fuzz::Rng) {
    static MEM: std::sync::OnceLock<GuestMemoryMmap> = std::sync::OnceLock::new();
    let mem = MEM.get_or_init(|| shared_mem(0x40_0000));
    let (ours, theirs) = UnixStream::pair().unwrap();
    // The backend's choices: the rest of the input, on its own thread.
    let backend_rng = rng.split();
    let log = Arc::new(Mutex::new(Vec::new()));
    let backend = std::thread::spawn(move || serve_fuzzed(theirs, backend_rng, &log));
    let name = std::path::Path::new("fuzz.sock");
    if let Ok(mut c) = Connection::from_stream(ours, name, 2, Duration::from_secs(5)) {
        let (_tqs, queues, _) = active_queues(mem, 2);
        if c.start(VIRTIO_F_VERSION_1, mem, queues.iter().map(Into::into)).is_ok() {
            c.stop();
        }
    }
    backend.join().unwrap();
}

/// With REPLY_ACK a backend can refuse a request, and the start fails there
/// instead of leaving the guest waiting on rings nobody serves.
#[test]
fn a_refused_memory_table_fails_the_start() {
    let backend = Backend::start(Behaviour::RefuseMemTable);
    let mut c = Connection::connect(&backend.path, 1).unwrap();
    let mem = shared_mem(0x40_0000);
    let (_tqs, queues, _) = active_queues(&mem, 1);
    let err = c.start(VIRTIO_F_VERSION_1, &mem, queues.iter().map(Into::into)).unwrap_err();
    assert!(err.to_string().contains("SET_MEM_TABLE failed"), "{err}");
    assert!(!backend.requests().contains(&SET_VRING_NUM), "no ring after the refusal");
}

/// A backend met after a reconnect that lacks a feature the driver chose
/// is refused, not handed rings it would read differently.
#[test]
fn a_new_backend_without_the_drivers_features_is_refused() {
    let first = Backend::start(Behaviour::Honest);
    let mut c = Connection::connect(&first.path, 1).unwrap();
    first.kill();
    let _second = Backend::listen(first.path.clone(), Behaviour::NoEventIdx);
    c.reconnect().unwrap();
    let mem = shared_mem(0x40_0000);
    let (_tqs, queues, _) = active_queues(&mem, 1);
    let acked = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;
    let err = c.start(acked, &mem, queues.iter().map(Into::into)).unwrap_err();
    assert!(
        matches!(err, Error::FeaturesGone { missing, .. } if missing == VIRTIO_RING_F_EVENT_IDX),
        "{err}"
    );
}
