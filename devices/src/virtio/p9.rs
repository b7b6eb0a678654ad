//! virtio-9p (type 9): a host directory shared with the guest over
//! 9P2000.L (`-fsdev local` / `-virtfs`), served by skiff itself with the
//! vendored p9 server (third_party/p9), on the device's worker thread.
//!
//! A request is one chain: the T-message in its device-readable buffers,
//! room for the R-message in its device-writable ones. Linux's client puts
//! the header of a large Tread's reply (11 bytes) in one buffer and the
//! data in the reader's own pages after it, and a large Twrite's data after
//! its header, so the message is gathered from and scattered to the
//! buffers in order. The server (its fids) belongs to the process: a guest
//! that reboots starts again with Tversion, which drops the old fids.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, QueueT};

use super::chain::{Chain, ChainReader, ChainWriter};
use super::worker::{Budget, Handler, Outcome, Request, Ring, Worker};
use super::{
    read_config_from, ActivateError, ActivationContext, GuestMemoryMmap, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// The family its workers are known by (`-device FAMILY-pci|FAMILY-device`).
pub const FAMILY: &str = "virtio-9p";

/// QEMU's virtio-9p queue size (MAX_REQ).
const QUEUE_SIZES: &[u16] = &[128];

/// The device's config space carries the mount tag.
const VIRTIO_9P_MOUNT_TAG: u64 = 1 << 0;

const VIRTIO_RING_F_INDIRECT_DESC: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

/// The longest mount tag: QEMU's (MAX_TAG_LEN 32, less its NUL).
pub const TAG_MAX: usize = 31;

/// The largest message: what Linux's virtio transport can carry (it caps
/// msize at 125 pages) and a header. Each Tversion negotiates down from it.
const MSIZE: u32 = 512 * 1024 + 24;

/// Requests served per wakeup, so one busy guest cannot keep the worker
/// from `stop`.
const REQUESTS_PER_WAKEUP: usize = 32;

/// How a share's files carry ownership and modes (QEMU's
/// `security_model=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecurityModel {
    /// The host's owners and modes; chown as the guest asks (needs the
    /// privilege to).
    Passthrough,
    /// As passthrough, except that ownership changes which fail are
    /// ignored (an unprivileged skiff).
    None,
    /// The guest's owners and modes in `user.virtfs.*` xattrs; the host
    /// files keep skiff's owner and a private mode.
    MappedXattr,
}

/// A share as `-fsdev` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareParams {
    pub tag: String,
    pub readonly: bool,
    pub security: SecurityModel,
}

#[derive(Debug, thiserror::Error)]
pub enum P9Error {
    #[error("cannot open the shared directory {path}: {source}")]
    Open { path: String, source: io::Error },
}

/// The host side of a share: the server, with the share's root and /proc
/// open, for the life of the process.
pub struct P9Backend {
    server: Mutex<p9::Server>,
}

impl P9Backend {
    pub fn open(root: &Path, params: &ShareParams) -> Result<Self, P9Error> {
        let cfg = p9::Config {
            root: root.into(),
            msize: MSIZE,
            readonly: params.readonly,
            ignore_chown_errors: params.security == SecurityModel::None,
            mapped_xattr: params.security == SecurityModel::MappedXattr,
            ..p9::Config::default()
        };
        let server = p9::Server::with_config(cfg)
            .map_err(|source| P9Error::Open { path: root.display().to_string(), source })?;
        Ok(P9Backend { server: Mutex::new(server) })
    }
}

pub struct P9 {
    backend: Arc<P9Backend>,
    params: ShareParams,
    worker: Option<Worker<P9Queue>>,
}

impl P9 {
    pub fn new(backend: Arc<P9Backend>, params: ShareParams) -> Self {
        P9 { backend, params, worker: None }
    }
}

/// The running queue, on the worker thread.
struct P9Queue {
    ring: Ring,
    backend: Arc<P9Backend>,
}

impl MutEventSubscriber for P9Queue {
    fn init(&mut self, ops: &mut EventOps) {
        self.ring.init(ops, "virtio-9p");
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if self.ring.take_event(&events) {
            let max = usize::from(self.ring.queue.size());
            let mut server = self.backend.server.lock().unwrap_or_else(|e| e.into_inner());
            let mut serve = Serve { server: &mut server, max };
            self.ring.serve(Budget { requests: REQUESTS_PER_WAKEUP }, &mut serve);
        }
    }
}

impl Handler for P9Queue {}

struct Serve<'a> {
    server: &'a mut p9::Server,
    max: usize,
}

impl Request for Serve<'_> {
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Outcome {
        let head = chain.head_index();
        let chain = match Chain::read(mem, chain, self.max) {
            Ok(c) => c,
            Err(e) => {
                crate::error_limited!("virtio-9p: request {head}: {e}");
                return Outcome::Used(0);
            }
        };
        // The message is decoded from, and its reply encoded into, guest
        // memory in place: under nesting every copy of a 64 KiB read shows.
        let mut reply = ChainWriter::new(mem, &chain);
        let result = self.server.handle_message(&mut ChainReader::new(mem, &chain), &mut reply);
        match result {
            Ok(()) => {}
            // The reply began: the client sees it cut short and fails it.
            Err(e) if reply.written > 0 => crate::error_limited!(
                "virtio-9p: request {head}: the reply did not fit its buffers \
                 ({} bytes written): {e}",
                reply.written
            ),
            // A frame whose header cannot be read has no tag to answer:
            // the request comes back empty and the client fails it (EIO).
            Err(e) => log::debug!("virtio-9p: request {head} dropped: {e}"),
        }
        Outcome::Used(reply.written as u32)
    }
}

impl VirtioDevice for P9 {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_9P
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_9P_MOUNT_TAG
    }

    fn ack_features(&mut self, _features: u64) {}

    /// `struct virtio_9p_config`: tag_len (le16), then the tag.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let tag = self.params.tag.as_bytes();
        let mut config = Vec::with_capacity(2 + tag.len());
        config.extend_from_slice(&(tag.len() as u16).to_le_bytes());
        config.extend_from_slice(tag);
        read_config_from(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-9p: config write at {offset:#x} ignored");
    }

    fn activate(&mut self, mut ctx: ActivationContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let q = ctx.take_queue(0)?;
        let ring = Ring::new(ctx.mem, q, ctx.interrupt).map_err(ActivateError::EventFd)?;
        let handler = P9Queue { ring, backend: self.backend.clone() };
        self.worker = Some(Worker::spawn(FAMILY, FAMILY, handler).map_err(ActivateError::Worker)?);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        true
    }
}

#[cfg(any(test, feature = "fuzzing"))]
#[cfg_attr(not(test), allow(dead_code, unused_imports))]
pub(crate) mod tests {
    use std::fs;
    use std::path::PathBuf;

    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::virtio::test_utils::*;
    use crate::virtio::ActiveQueue;

    const MEM: usize = 0x40_0000;
    const REQ: u64 = 0x30_0000;
    const REPLY: u64 = 0x31_0000;

    struct Share(PathBuf);

    impl Share {
        fn new(name: &str) -> Share {
            let dir = std::env::temp_dir().join(format!("skiff-9p-{}-{name}", std::process::id()));
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("hello.txt"), b"hello from the host").unwrap();
            Share(dir)
        }
    }

    impl Drop for Share {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn params(readonly: bool) -> ShareParams {
        ShareParams { tag: "ro-store".into(), readonly, security: SecurityModel::None }
    }

    /// 9P strings: le16 length, bytes.
    fn s(out: &mut Vec<u8>, v: &str) {
        out.extend_from_slice(&(v.len() as u16).to_le_bytes());
        out.extend_from_slice(v.as_bytes());
    }

    /// A frame: size, type, tag, body.
    fn frame(ty: u8, tag: u16, body: &[u8]) -> Vec<u8> {
        let mut f = ((7 + body.len()) as u32).to_le_bytes().to_vec();
        f.push(ty);
        f.extend_from_slice(&tag.to_le_bytes());
        f.extend_from_slice(body);
        f
    }

    fn version() -> Vec<u8> {
        let mut b = (1u32 << 20).to_le_bytes().to_vec();
        s(&mut b, "9P2000.L");
        frame(100, 0xffff, &b)
    }

    fn attach(fid: u32) -> Vec<u8> {
        let mut b = fid.to_le_bytes().to_vec();
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        s(&mut b, "root");
        s(&mut b, "");
        b.extend_from_slice(&0u32.to_le_bytes());
        frame(104, 1, &b)
    }

    fn walk(fid: u32, newfid: u32, names: &[&str]) -> Vec<u8> {
        let mut b = fid.to_le_bytes().to_vec();
        b.extend_from_slice(&newfid.to_le_bytes());
        b.extend_from_slice(&(names.len() as u16).to_le_bytes());
        for n in names {
            s(&mut b, n);
        }
        frame(110, 2, &b)
    }

    fn lopen(fid: u32, flags: u32) -> Vec<u8> {
        let mut b = fid.to_le_bytes().to_vec();
        b.extend_from_slice(&flags.to_le_bytes());
        frame(12, 3, &b)
    }

    fn tread(fid: u32, count: u32) -> Vec<u8> {
        let mut b = fid.to_le_bytes().to_vec();
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&count.to_le_bytes());
        frame(116, 4, &b)
    }

    /// Runs the device's request handling on the test thread.
    struct Rig<'a> {
        mem: &'a GuestMemoryMmap,
        tq: TestQueue<'a>,
        queue: P9Queue,
    }

    impl<'a> Rig<'a> {
        fn new(mem: &'a GuestMemoryMmap, share: &Share, readonly: bool) -> Rig<'a> {
            let tq = TestQueue::new(mem, 128);
            let backend = Arc::new(P9Backend::open(&share.0, &params(readonly)).unwrap());
            let q = ActiveQueue {
                index: 0,
                queue: tq.queue(),
                kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            };
            let irq = Arc::new(RecordingInterrupt::default());
            let ring = Ring::new(mem.clone(), q, irq).unwrap();
            let queue = P9Queue { ring, backend };
            Rig { mem, tq, queue }
        }

        /// Sends `msg` in the given readable pieces, with the reply buffers
        /// `reply` (lengths) after each other at REPLY; returns the reply.
        fn send(&mut self, msg: &[u8], pieces: &[usize], reply: &[u32]) -> Vec<u8> {
            let mut descs = Vec::new();
            let mut at = 0;
            for &n in pieces {
                self.mem.write_slice(&msg[at..at + n], GuestAddress(REQ + at as u64)).unwrap();
                descs.push((REQ + at as u64, n as u32, 0));
                at += n;
            }
            let mut addr = REPLY;
            for &n in reply {
                descs.push((addr, n, WRITE));
                addr += u64::from(n);
            }
            self.tq.add_chain(&descs);
            let before = self.tq.used().len();
            let max = usize::from(self.queue.ring.queue.size());
            let mut server = self.queue.backend.server.lock().unwrap();
            let mut serve = Serve { server: &mut server, max };
            self.queue.ring.serve(Budget { requests: 8 }, &mut serve);
            let used = self.tq.used();
            assert_eq!(used.len(), before + 1, "one request, one used entry");
            read(self.mem, REPLY, used[before].1 as usize)
        }

        fn call(&mut self, msg: &[u8]) -> Vec<u8> {
            self.send(msg, &[msg.len()], &[8192])
        }
    }

    use vm_memory::{Bytes, GuestAddress};

    /// Rlerror's errno, or None for another reply.
    fn lerror(reply: &[u8]) -> Option<u32> {
        (reply.get(4) == Some(&7)).then(|| u32::from_le_bytes(reply[7..11].try_into().unwrap()))
    }

    #[test]
    fn describes_itself_with_the_mount_tag() {
        let share = Share::new("describe");
        let dev =
            P9::new(Arc::new(P9Backend::open(&share.0, &params(false)).unwrap()), params(false));
        assert_eq!(dev.device_type(), 9);
        assert_eq!(dev.queue_max_sizes(), &[128]);
        assert_ne!(dev.features() & VIRTIO_9P_MOUNT_TAG, 0);
        let mut config = [0u8; 10];
        dev.read_config(0, &mut config);
        assert_eq!(&config, b"\x08\0ro-store");
        let missing = P9Backend::open(Path::new("/nonexistent/skiff"), &params(false));
        assert!(missing.is_err_and(|e| e.to_string().contains("/nonexistent/skiff")));
    }

    #[test]
    fn reads_a_file_with_the_reply_split_as_linux_splits_it() {
        let mem = guest_mem(MEM);
        let share = Share::new("read");
        let mut rig = Rig::new(&mem, &share, false);
        let v = rig.call(&version());
        assert_eq!(v[4], 101, "Rversion");
        assert_eq!(u32::from_le_bytes(v[7..11].try_into().unwrap()), MSIZE, "negotiated down");
        assert_eq!(rig.call(&attach(1))[4], 105);
        // The walk's frame in three pieces, as a zero-copy write sends it.
        let w = walk(1, 2, &["hello.txt"]);
        assert_eq!(rig.send(&w, &[7, 4, w.len() - 11], &[8192])[4], 111);
        assert_eq!(rig.call(&lopen(2, 0))[4], 13);
        // Rread's 11-byte header in one buffer, the data in the next.
        let r = rig.send(&tread(2, 4096), &[23], &[11, 4096]);
        assert_eq!(r[4], 117);
        assert_eq!(&r[11..], b"hello from the host");
    }

    #[test]
    fn bad_requests_fail_alone() {
        let mem = guest_mem(MEM);
        let share = Share::new("bad");
        let mut rig = Rig::new(&mem, &share, true);
        rig.call(&version());
        rig.call(&attach(1));
        // Unknown type: an Rlerror for its tag.
        assert_eq!(lerror(&rig.call(&frame(250, 5, &[]))), Some(libc::EINVAL as u32));
        // A header cut short: nothing to answer, an empty used entry.
        assert!(rig.send(&[9, 0, 0], &[3], &[64]).is_empty());
        // A reply with no room: nothing written, and the device goes on.
        assert!(rig.send(&walk(1, 2, &["hello.txt"]), &[22], &[]).is_empty());
        // Read-only: opening for writing is refused.
        rig.call(&walk(1, 3, &["hello.txt"]));
        assert_eq!(lerror(&rig.call(&lopen(3, 1))), Some(libc::EROFS as u32));
        // An escape by name.
        assert_eq!(lerror(&rig.call(&walk(1, 4, &[".."]))), Some(libc::ENOENT as u32));
        // A chain outside guest memory: an empty used entry.
        rig.tq.add_chain(&[(MEM as u64 - 4, 64, 0), (REPLY, 64, WRITE)]);
        let before = rig.tq.used().len();
        let mut server = rig.queue.backend.server.lock().unwrap();
        let mut serve = Serve { server: &mut server, max: 16 };
        rig.queue.ring.serve(Budget { requests: 8 }, &mut serve);
        drop(server);
        assert_eq!(rig.tq.used()[before].1, 0);
        assert_eq!(rig.call(&lopen(3, 0))[4], 13, "still serving");
    }

    /// Fuzz target: 9P2000.L messages as a hostile guest sends them to the
    /// patched server: after a proper version and attach (usually), a few
    /// messages of every T-type (and odd ones) with fields from fids in
    /// use, names that try to escape (`..`, `/`, long, empty), sizes at the
    /// edges and random bytes, split over descriptors as Linux splits them
    /// or not, with reply buffers of any size. Each request gets its one
    /// used entry; nothing panics; nothing outside the share changes.
    #[cfg(test)]
    #[test]
    fn fuzz_9p_messages() {
        skiff_tests::fuzz::run("9p-messages", 3_000, fuzz_messages);
    }

    /// One input of `fuzz_9p_messages` (also a libFuzzer target).
    pub(crate) fn fuzz_messages(rng: &mut skiff_tests::fuzz::Rng) {
        static SHARE: std::sync::OnceLock<Share> = std::sync::OnceLock::new();
        static MEMORY: std::sync::OnceLock<GuestMemoryMmap> = std::sync::OnceLock::new();
        let share = SHARE.get_or_init(|| Share::new("fuzz"));
        let mem = MEMORY.get_or_init(|| guest_mem(MEM));
        // Every 9P2000.L T-message type, and a few that are not.
        const TYPES: &[u8] = &[
            6, 8, 12, 14, 16, 18, 20, 22, 24, 26, 30, 32, 34, 40, 50, 52, 54, 70, 72, 74, 76, 100,
            102, 104, 108, 110, 112, 116, 118, 120, 124, 125, 0, 255,
        ];
        const NAMES: &[&str] =
            &["hello.txt", "new", "..", ".", "/", "a/b", "", "x\0y", "../../etc/passwd"];
        let mut rig = Rig::new(mem, share, rng.one_in(4));
        if !rng.one_in(8) {
            rig.call(&version());
            rig.call(&attach(1));
        }
        for tag in 0..rng.below(8) as u16 {
            let ty = *rng.pick(TYPES);
            let mut body = Vec::new();
            for _ in 0..rng.below(6) {
                match rng.below(5) {
                    0 => body.extend_from_slice(&(rng.below(6) as u32).to_le_bytes()),
                    1 => s(&mut body, NAMES[rng.index(NAMES.len())]),
                    2 => body.extend_from_slice(&rng.interesting().to_le_bytes()[..4]),
                    3 => body.extend_from_slice(&(rng.below(3) as u16).to_le_bytes()),
                    _ => body.extend(rng.bytes(16)),
                }
            }
            let mut msg = frame(ty, tag, &body);
            if rng.one_in(8) {
                // A size field that lies.
                let size = rng.interesting() as u32;
                msg[..4].copy_from_slice(&size.to_le_bytes());
            }
            let pieces = if msg.len() > 7 && rng.one_in(3) {
                let cut = 1 + rng.index(msg.len() - 1);
                vec![cut, msg.len() - cut]
            } else {
                vec![msg.len()]
            };
            let reply: Vec<u32> = match rng.below(4) {
                0 => vec![rng.below(64) as u32],
                1 => vec![7, 4096],
                _ => vec![8192],
            };
            rig.send(&msg, &pieces, &reply);
        }
        let outside = share.0.parent().map(|p| p.join("etc"));
        assert!(outside.is_none_or(|o| !o.exists()), "nothing made beside the share");
    }
}
