//! virtio-blk on hand-built chains against a real image file. Built for
//! the fuzz targets too (feature `fuzzing`), where only `fuzz_*` is used.
#![cfg_attr(not(test), allow(dead_code, unused_imports))]

use std::path::PathBuf;

use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::virtio::test_utils::*;
use crate::virtio::VirtioInterruptType;

const MEM: usize = 0x40_0000;
const HDR: u64 = DATA;
const BUF: u64 = DATA + 0x1000;
const STATUS: u64 = DATA + 0x3000;
const IMAGE: u64 = 1 << 20;

pub(crate) struct Fixture {
    dir: PathBuf,
    disk: Arc<Disk>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixture(tag: &str, read_only: bool) -> Fixture {
    let dir = std::env::temp_dir().join(format!("skiff-blk-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.img");
    // Sector n starts with the byte n.
    let mut bytes = vec![0u8; IMAGE as usize];
    for (i, s) in bytes.chunks_mut(512).enumerate() {
        s[0] = i as u8;
    }
    std::fs::write(&path, &bytes).unwrap();
    let opts = DiskOptions {
        path,
        read_only,
        direct: false,
        dsync: false,
        ignore_flush: false,
        locking: false,
    };
    Fixture { disk: Arc::new(Disk::open(&opts).unwrap()), dir }
}

fn params(discard: bool) -> BlockParams {
    BlockParams {
        num_queues: 1,
        queue_size: 16,
        logical_block_size: 512,
        physical_block_size: 4096,
        policy: Policy {
            discard,
            detect_zeroes: DetectZeroes::Off,
            serial: b"skiff-serial".to_vec(),
            probed: false,
        },
        aio: Aio::Threads,
    }
}

fn header(mem: &GuestMemoryMmap, ty: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

fn status(mem: &GuestMemoryMmap) -> u8 {
    read(mem, STATUS, 1)[0]
}

fn queue(
    mem: &GuestMemoryMmap,
    tq: &TestQueue,
    f: &Fixture,
    discard: bool,
) -> (BlockQueue, Arc<RecordingInterrupt>) {
    let irq = Arc::new(RecordingInterrupt::default());
    let active = crate::virtio::ActiveQueue {
        index: 0,
        queue: tq.queue(),
        kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    };
    let ring = Ring::new(mem.clone(), active, irq.clone()).unwrap();
    let q = BlockQueue {
        ring,
        disk: f.disk.clone(),
        policy: Arc::new(params(discard).policy),
        engine: None,
        moderation: super::moderation::Moderation::new().unwrap(),
        polling: super::moderation::Polling::new().unwrap(),
    };
    (q, irq)
}

#[test]
fn describes_itself() {
    let f = fixture("describe", false);
    let mut p = params(true);
    p.num_queues = 4;
    let b = Block::new(f.disk.clone(), p);
    assert_eq!(b.device_type(), 2);
    assert_eq!(b.queue_max_sizes(), &[16, 16, 16, 16]);
    let feat = b.features();
    for flag in
        [VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES]
    {
        assert_ne!(feat & bit(flag), 0, "feature {flag}");
    }
    assert_eq!(feat & bit(VIRTIO_BLK_F_RO), 0);
    let mut cap = [0u8; 8];
    b.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), IMAGE / 512);
    let mut word = [0u8; 2];
    b.read_config(34, &mut word);
    assert_eq!(u16::from_le_bytes(word), 4, "num_queues");
    let mut exp = [0u8; 1];
    b.read_config(24, &mut exp);
    assert_eq!(exp[0], 3, "physical block 4096 = 2^3 logical blocks");

    // Read-only: RO, and nothing that writes.
    let r = fixture("describe-ro", true);
    let b = Block::new(r.disk.clone(), params(true));
    let feat = b.features();
    assert_ne!(feat & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(feat & (bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_MQ)), 0);
}

#[test]
fn reads_writes_flushes_and_identifies() {
    let f = fixture("rw", false);
    let mem = guest_mem(MEM);
    let mut tq = TestQueue::new(&mem, 16);

    header(&mem, VIRTIO_BLK_T_IN, 3);
    let h_in = tq.add_chain(&[(HDR, 16, 0), (BUF, 1024, WRITE), (STATUS, 1, WRITE)]);
    let (mut q, irq) = queue(&mem, &tq, &f, false);
    q.serve();
    assert_eq!(tq.used(), vec![(h_in.into(), 1025)]);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
    let data = read(&mem, BUF, 1024);
    assert_eq!((data[0], data[512]), (3, 4), "sectors 3 and 4");
    assert_eq!(irq.take(), vec![VirtioInterruptType::Queue(0)]);

    // A write split over two buffers, then read back from the file.
    fill(&mem, BUF, 512, 0x5a);
    fill(&mem, BUF + 0x800, 512, 0xa5);
    header(&mem, VIRTIO_BLK_T_OUT, 10);
    tq.add_chain(&[(HDR, 16, 0), (BUF, 512, 0), (BUF + 0x800, 512, 0), (STATUS, 1, WRITE)]);
    q.serve();
    assert_eq!(tq.used().last(), Some(&(3, 1)));
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
    let mut back = [0u8; 1024];
    f.disk.read_at(&mut back, 10 * 512).unwrap();
    assert!(back[..512].iter().all(|&b| b == 0x5a) && back[512..].iter().all(|&b| b == 0xa5));

    header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    tq.add_chain(&[(HDR, 16, 0), (STATUS, 1, WRITE)]);
    q.serve();
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);

    header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    fill(&mem, BUF, 20, 0xff);
    tq.add_chain(&[(HDR, 16, 0), (BUF, 20, WRITE), (STATUS, 1, WRITE)]);
    q.serve();
    assert_eq!(tq.used().last().map(|u| u.1), Some(21));
    let mut want = b"skiff-serial".to_vec();
    want.resize(20, 0);
    assert_eq!(read(&mem, BUF, 20), want, "the serial, zero-padded to 20 bytes");
}

/// Malformed requests: each fails alone, the device goes on.
#[test]
fn malformed_requests_fail_alone() {
    let f = fixture("bad", false);
    let mem = guest_mem(MEM);
    let mut tq = TestQueue::new(&mem, 64);
    let (mut q, _) = queue(&mem, &tq, &f, false);
    let last_sector = IMAGE / 512 - 1;
    let mut expect = Vec::new();
    let mut case =
        |tq: &mut TestQueue, ty: u32, sector: u64, descs: &[(u64, u32, u16)], want: Option<u32>| {
            header(&mem, ty, sector);
            fill(&mem, STATUS, 1, 0xee);
            let head = tq.add_chain(descs);
            q.serve();
            let used = *tq.used().last().unwrap();
            assert_eq!(used.0, u32::from(head));
            let st = status(&mem);
            expect.push((ty, sector, want, st));
            match want {
                Some(s) => assert_eq!(u32::from(st), s, "type {ty} sector {sector}: status"),
                None => assert_eq!((st, used.1), (0xee, 0), "type {ty}: no status written"),
            }
        };
    let io = Some(VIRTIO_BLK_S_IOERR);
    // Past the end; straddling the end; sector arithmetic that overflows.
    case(
        &mut tq,
        VIRTIO_BLK_T_IN,
        last_sector + 1,
        &[(HDR, 16, 0), (BUF, 512, WRITE), (STATUS, 1, WRITE)],
        io,
    );
    case(
        &mut tq,
        VIRTIO_BLK_T_IN,
        last_sector,
        &[(HDR, 16, 0), (BUF, 1024, WRITE), (STATUS, 1, WRITE)],
        io,
    );
    case(
        &mut tq,
        VIRTIO_BLK_T_OUT,
        u64::MAX / 256,
        &[(HDR, 16, 0), (BUF, 512, 0), (STATUS, 1, WRITE)],
        io,
    );
    // Not a whole number of sectors.
    case(&mut tq, VIRTIO_BLK_T_IN, 0, &[(HDR, 16, 0), (BUF, 100, WRITE), (STATUS, 1, WRITE)], io);
    // A header too short.
    case(&mut tq, VIRTIO_BLK_T_IN, 0, &[(HDR, 8, 0), (BUF, 512, WRITE), (STATUS, 1, WRITE)], io);
    // Unknown type; DISCARD without discard=unmap.
    let unsupp = Some(VIRTIO_BLK_S_UNSUPP);
    case(&mut tq, 99, 0, &[(HDR, 16, 0), (STATUS, 1, WRITE)], unsupp);
    case(
        &mut tq,
        VIRTIO_BLK_T_DISCARD,
        0,
        &[(HDR, 16, 0), (BUF, 16, 0), (STATUS, 1, WRITE)],
        unsupp,
    );
    // No device-writable byte at all: nothing can be reported.
    case(&mut tq, VIRTIO_BLK_T_IN, 0, &[(HDR, 16, 0), (BUF, 512, 0)], None);
    // A buffer outside guest memory: the chain is refused before anything.
    case(
        &mut tq,
        VIRTIO_BLK_T_IN,
        0,
        &[(HDR, 16, 0), (MEM as u64 - 8, 512, WRITE), (STATUS, 1, WRITE)],
        None,
    );
    // And a good request still works afterwards.
    case(
        &mut tq,
        VIRTIO_BLK_T_IN,
        1,
        &[(HDR, 16, 0), (BUF, 512, WRITE), (STATUS, 1, WRITE)],
        Some(VIRTIO_BLK_S_OK),
    );
    assert_eq!(read(&mem, BUF, 1)[0], 1);
}

#[test]
fn read_only_drives_fail_writes() {
    let f = fixture("ro", true);
    let mem = guest_mem(MEM);
    let mut tq = TestQueue::new(&mem, 16);
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    tq.add_chain(&[(HDR, 16, 0), (BUF, 512, 0), (STATUS, 1, WRITE)]);
    let (mut q, _) = queue(&mem, &tq, &f, true);
    q.serve();
    assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
    let mut s0 = [0u8; 512];
    f.disk.read_at(&mut s0, 0).unwrap();
    assert_eq!(s0[0], 0, "unchanged");
}

#[test]
fn discard_and_write_zeroes_with_discard_unmap() {
    let f = fixture("discard", false);
    let mem = guest_mem(MEM);
    let mut tq = TestQueue::new(&mem, 16);
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&n.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&s, GuestAddress(BUF)).unwrap();
    };
    let (mut q, _) = queue(&mem, &tq, &f, true);
    header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    seg(8, 16, 0);
    tq.add_chain(&[(HDR, 16, 0), (BUF, 16, 0), (STATUS, 1, WRITE)]);
    q.serve();
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
    header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    seg(40, 8, 0);
    tq.add_chain(&[(HDR, 16, 0), (BUF, 16, 0), (STATUS, 1, WRITE)]);
    q.serve();
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
    let mut b = vec![0u8; 64 * 512];
    f.disk.read_at(&mut b, 0).unwrap();
    let first = |s: usize| b[s * 512];
    assert_eq!((first(7), first(8), first(23), first(24)), (7, 0, 0, 24));
    assert_eq!((first(39), first(40), first(47), first(48)), (39, 0, 0, 48));
    // Past the end, and reserved flags.
    header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    seg(IMAGE / 512 - 1, 2, 0);
    tq.add_chain(&[(HDR, 16, 0), (BUF, 16, 0), (STATUS, 1, WRITE)]);
    q.serve();
    assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
    header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    seg(0, 1, 0x2);
    tq.add_chain(&[(HDR, 16, 0), (BUF, 16, 0), (STATUS, 1, WRITE)]);
    q.serve();
    assert_eq!(status(&mem), VIRTIO_BLK_S_UNSUPP as u8);
}

/// A DISCARD or WRITE_ZEROES longer than the advertised maximum is an
/// I/O error (as in QEMU), whatever the disk's size, and touches nothing;
/// one of exactly the maximum is served.
#[test]
fn discard_past_the_advertised_maximum_is_refused() {
    let f = fixture("discard-max", false);
    let path = f.dir.join("big.img");
    let big = u64::from(super::MAX_DISCARD_SECTORS) * 512 + (1 << 20);
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(big).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0x5a; 512], 0).unwrap();
    let opts = DiskOptions {
        path,
        read_only: false,
        direct: false,
        dsync: false,
        ignore_flush: false,
        locking: false,
    };
    let f = Fixture { disk: Arc::new(Disk::open(&opts).unwrap()), dir: f.dir.clone() };
    let mem = guest_mem(MEM);
    let mut tq = TestQueue::new(&mem, 16);
    let (mut q, _) = queue(&mem, &tq, &f, true);
    for (ty, sectors, want) in [
        (VIRTIO_BLK_T_WRITE_ZEROES, super::MAX_DISCARD_SECTORS + 1, VIRTIO_BLK_S_IOERR),
        (VIRTIO_BLK_T_DISCARD, u32::MAX, VIRTIO_BLK_S_IOERR),
    ] {
        header(&mem, ty, 0);
        let mut s = [0u8; 16];
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        mem.write_slice(&s, GuestAddress(BUF)).unwrap();
        tq.add_chain(&[(HDR, 16, 0), (BUF, 16, 0), (STATUS, 1, WRITE)]);
        q.serve();
        assert_eq!(status(&mem), want as u8, "type {ty}, {sectors} sectors");
    }
    let mut first = [0u8; 512];
    f.disk.read_at(&mut first, 0).unwrap();
    assert_eq!(first, [0x5a; 512], "nothing zeroed");
    header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    let mut s = [0u8; 16];
    s[8..12].copy_from_slice(&super::MAX_DISCARD_SECTORS.to_le_bytes());
    mem.write_slice(&s, GuestAddress(BUF)).unwrap();
    tq.add_chain(&[(HDR, 16, 0), (BUF, 16, 0), (STATUS, 1, WRITE)]);
    q.serve();
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8, "the maximum itself");
    f.disk.read_at(&mut first, 0).unwrap();
    assert_eq!(first, [0; 512]);
}

/// A worker per queue: requests on queue 1 are served by queue 1's.
#[test]
fn each_queue_has_its_worker() {
    let f = fixture("mq", false);
    let mem = guest_mem(MEM);
    let tq = TestQueue::new(&mem, 16);
    let mut p = params(false);
    p.num_queues = 2;
    let mut b = Block::new(f.disk.clone(), p);
    let irq = Arc::new(RecordingInterrupt::default());
    let queues = (0..2)
        .map(|i| crate::virtio::ActiveQueue {
            index: i,
            queue: tq.queue(),
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        })
        .collect();
    b.activate(ActivationContext { mem: mem.clone(), queues, interrupt: irq }).unwrap();
    assert_eq!(b.workers.len(), 2);
    assert!(b.reset());
    assert!(b.workers.is_empty());
}

/// aio=io_uring: eight reads made available at once are all handed to the
/// kernel before any completes (eight in flight on one queue), complete
/// with the right data and are returned; a write and a flush go the same
/// way; quiesce leaves nothing in flight.
#[test]
fn io_uring_keeps_many_requests_in_flight() {
    let Ok(engine) = uring::Uring::new(64) else {
        panic!("io_uring is unavailable on this host");
    };
    many_in_flight("uring", |_, _| Engine::Uring(Box::new(engine)));
}

/// An image probed as raw (no format=): a write that would make sector 0
/// a qcow2 header is refused (IOERR), as QEMU's raw driver refuses it, on
/// the synchronous path and where an io_uring would take the write; other
/// writes to sector 0 and a qcow2 header elsewhere go through.
#[test]
fn a_probed_image_cannot_be_made_to_look_like_qcow2() {
    for uring in [false, true] {
        let f = fixture(if uring { "probed-uring" } else { "probed" }, false);
        let mem = guest_mem(MEM);
        let mut tq = TestQueue::new(&mem, 16);
        let (mut q, _) = queue(&mem, &tq, &f, false);
        q.policy = Arc::new(Policy { probed: true, ..(*q.policy).clone() });
        if uring {
            q.engine = Some(Engine::Uring(Box::new(uring::Uring::new(16).expect("io_uring"))));
        }
        let mut write = |sector: u64, first: &[u8]| -> u8 {
            fill(&mem, BUF, 512, 0);
            mem.write_slice(first, GuestAddress(BUF)).unwrap();
            header(&mem, VIRTIO_BLK_T_OUT, sector);
            fill(&mem, STATUS, 1, 0xff);
            tq.add_chain(&[(HDR, 16, 0), (BUF, 512, 0), (STATUS, 1, WRITE)]);
            q.serve();
            q.quiesce();
            status(&mem)
        };
        let qcow2 = b"QFI\xfb\0\0\0\x03";
        assert_eq!(write(0, qcow2), VIRTIO_BLK_S_IOERR as u8, "uring={uring}");
        assert_eq!(write(0, b"just data"), VIRTIO_BLK_S_OK as u8, "uring={uring}");
        assert_eq!(write(8, qcow2), VIRTIO_BLK_S_OK as u8, "uring={uring}");
        let mut first = [0u8; 9];
        f.disk.read_at(&mut first, 0).unwrap();
        assert_eq!(&first, b"just data", "uring={uring}");
    }
}

/// aio=io_uring, an image cut short under a running guest: a read across
/// the new end comes back short, goes back to the kernel for the rest
/// (QEMU's resubmission), and what lies past the end reads as zeros; the
/// guest gets OK, not IOERR (issue 29, item 17).
#[test]
fn a_short_io_uring_read_is_resubmitted_and_zero_filled() {
    let f = fixture("short", false);
    let mem = guest_mem(MEM);
    let mut tq = TestQueue::new(&mem, 16);
    let (mut q, _) = queue(&mem, &tq, &f, false);
    q.engine = Some(Engine::Uring(Box::new(uring::Uring::new(16).expect("io_uring"))));
    let image = std::fs::OpenOptions::new().write(true).open(f.dir.join("disk.img")).unwrap();
    image.set_len(600 * 512 + 100).unwrap();
    let mut h = [0u8; 16];
    h[8..16].copy_from_slice(&598u64.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    fill(&mem, BUF, 4096, 0xff);
    // Two buffers: the rest starts inside the second one.
    let head = tq.add_chain(&[
        (HDR, 16, 0),
        (BUF, 1024, WRITE),
        (BUF + 1024, 3072, WRITE),
        (STATUS, 1, WRITE),
    ]);
    q.serve();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tq.used().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the read never completed");
        std::thread::sleep(std::time::Duration::from_millis(1));
        q.reap();
    }
    assert_eq!(tq.used(), [(u32::from(head), 4097)]);
    assert_eq!(read(&mem, STATUS, 1)[0], VIRTIO_BLK_S_OK as u8);
    let got = read(&mem, BUF, 4096);
    assert_eq!((got[0], got[512], got[1024]), (598u16 as u8, 599u16 as u8, 600u16 as u8));
    assert!(got[1025..].iter().all(|&b| b == 0), "past the end: zeros");
}

/// aio=io_uring: a ring runs only reads, writes, syncs and no-ops. An
/// OPENAT of a host file or a SOCKET queued on it fails with EACCES: a
/// ring's operations are not system calls, so seccomp would not stop them
/// (issue 29, item 5).
#[test]
fn an_io_uring_runs_nothing_but_block_io() {
    use io_uring::opcode;
    let mut u = uring::Uring::new(4).expect("io_uring");
    let path = c"/etc/hostname";
    let open = opcode::OpenAt::new(io_uring::types::Fd(libc::AT_FDCWD), path.as_ptr())
        .flags(libc::O_RDONLY)
        .build();
    assert_eq!(u.push_raw(&open).unwrap(), -libc::EACCES, "openat");
    let socket = opcode::Socket::new(libc::AF_INET, libc::SOCK_STREAM, 0).build();
    assert_eq!(u.push_raw(&socket).unwrap(), -libc::EACCES, "socket");
    assert_eq!(u.push_raw(&opcode::Nop::new().build()).unwrap(), 0, "a no-op runs");
}

/// aio=io_uring: a FLUSH reaches the disk (fdatasync) only where the drive
/// flushes; on one that does not (`cache=unsafe`, read-only) it completes
/// OK without a sync (the io_uring path used to sync regardless: issue 29,
/// item 17).
#[test]
fn an_io_uring_flush_syncs_only_where_the_drive_flushes() {
    for (tag, ignore_flush, syncs) in [("flush-rw", false, 1), ("flush-unsafe", true, 0)] {
        let mut f = fixture(tag, false);
        let opts = DiskOptions {
            path: f.dir.join("disk.img"),
            read_only: false,
            direct: false,
            dsync: false,
            ignore_flush,
            locking: false,
        };
        f.disk = Arc::new(Disk::open(&opts).unwrap());
        let mem = guest_mem(MEM);
        let mut tq = TestQueue::new(&mem, 16);
        let (mut q, _) = queue(&mem, &tq, &f, false);
        q.engine = Some(Engine::Uring(Box::new(uring::Uring::new(16).expect("io_uring"))));
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        tq.add_chain(&[(HDR, 16, 0), (STATUS, 1, WRITE)]);
        q.serve();
        q.quiesce();
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8, "{tag}");
        let Some(Engine::Uring(u)) = &q.engine else { unreachable!() };
        assert_eq!(u.syncs, syncs, "{tag}");
    }
}

/// aio=threads (and io_uring's stand-in where the host has none): the same
/// through the queue's thread pool.
#[test]
fn a_thread_pool_keeps_many_requests_in_flight() {
    many_in_flight("pool", |mem, f| {
        let policy = Arc::new(params(false).policy);
        match engine(Aio::Threads, mem, &f.disk, &policy, 64) {
            Some(e @ Engine::Pool(_)) => e,
            _ => panic!("aio=threads builds a thread pool"),
        }
    });
}

fn many_in_flight(tag: &str, make: impl FnOnce(&GuestMemoryMmap, &Fixture) -> Engine) {
    let f = fixture(tag, false);
    let mem = guest_mem(MEM);
    let mut tq = TestQueue::new(&mem, 64);
    let (mut q, irq) = queue(&mem, &tq, &f, false);
    q.engine = Some(make(&mem, &f));
    let mut heads = Vec::new();
    for i in 0..8u64 {
        let hdr = DATA + 0x10_0000 + i * 0x100;
        let mut h = [0u8; 16];
        h[8..16].copy_from_slice(&(i * 2).to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let buf = DATA + 0x20_0000 + i * 0x1000;
        heads.push(tq.add_chain(&[(hdr, 16, 0), (buf, 512, WRITE), (hdr + 0x80, 1, WRITE)]));
    }
    q.serve();
    let e = q.engine.as_ref().unwrap();
    assert_eq!((e.in_flight(), e.max_in_flight()), (8, 8), "all eight handed on at once");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tq.used().len() < 8 {
        assert!(std::time::Instant::now() < deadline, "completions never came");
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(q.engine.as_ref().unwrap().eventfd()),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a timeout of 100 ms.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        if q.reap() > 0 {
            q.ring.notify();
        }
    }
    let mut used = tq.used();
    used.sort();
    let want: Vec<(u32, u32)> = heads.iter().map(|&h| (u32::from(h), 513)).collect();
    assert_eq!(used, want);
    for i in 0..8u64 {
        assert_eq!(
            read(&mem, DATA + 0x20_0000 + i * 0x1000, 1)[0],
            (i * 2) as u8,
            "sector {}",
            i * 2
        );
        assert_eq!(read(&mem, DATA + 0x10_0000 + i * 0x100 + 0x80, 1)[0], VIRTIO_BLK_S_OK as u8);
    }
    assert!(!irq.take().is_empty(), "the guest was told");

    // A write and a flush through the ring; quiesce waits for them.
    fill(&mem, BUF, 512, 0x77);
    header(&mem, VIRTIO_BLK_T_OUT, 20);
    tq.add_chain(&[(HDR, 16, 0), (BUF, 512, 0), (STATUS, 1, WRITE)]);
    q.serve();
    q.quiesce();
    assert_eq!(q.engine.as_ref().unwrap().in_flight(), 0);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
    let mut back = [0u8; 512];
    f.disk.read_at(&mut back, 20 * 512).unwrap();
    assert_eq!(back, [0x77; 512]);
}

/// Fuzz target: what a hostile guest can put in a queue. Each input builds
/// fresh guest memory and a queue of 16, then a few chains of random shape
/// (1 to 5 descriptors anywhere in or beside memory, any direction, loops
/// and indirect tables), random request headers (every type and odd ones,
/// sectors at the edges), DISCARD segments, and sometimes scribbles over
/// the descriptor table and the rings (which then also hold garbage the
/// device must not trust); the queue is served. Nothing panics or hangs,
/// and the image keeps its size.
#[cfg(test)]
#[test]
fn fuzz_virtio_blk_queue() {
    let f = fixture("fuzz", false);
    skiff_tests::fuzz::run("virtio-blk-queue", 10_000, |rng| fuzz_queue(rng, &f));
}

/// A disk image for `fuzz_queue`, kept for a whole fuzzing run.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_fixture() -> Fixture {
    fixture("fuzz", false)
}

/// One input of `fuzz_virtio_blk_queue`.
pub(crate) fn fuzz_queue(rng: &mut skiff_tests::fuzz::Rng, f: &Fixture) {
    use skiff_tests::fuzz::Rng;
    const SIZE: u16 = 16;
    let types = [
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
        10, // GET_LIFETIME
        VIRTIO_BLK_T_SECURE_ERASE,
    ];
    let addr = |rng: &mut Rng| -> u64 {
        match rng.below(6) {
            0 => HDR,
            1 => BUF + rng.below(0x2000),
            2 => STATUS,
            3 => MEM as u64 - rng.below(64),
            4 => rng.interesting(),
            _ => rng.below(MEM as u64),
        }
    };
    let len = |rng: &mut Rng| -> u32 {
        match rng.below(4) {
            0 => *rng.pick(&[0, 1, 8, 15, 16, 17, 511, 512, 513, 4096]),
            1 => rng.interesting() as u32,
            _ => rng.below(4096) as u32,
        }
    };
    let mem = guest_mem(MEM);
    let mut tq = TestQueue::new(&mem, SIZE);
    let (mut q, _) = queue(&mem, &tq, f, rng.one_in(2));
    for _ in 0..rng.below(5) {
        let mut h = [0u8; 16];
        let ty = if rng.one_in(8) { rng.next_u64() as u32 } else { *rng.pick(&types) };
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        let sector = match rng.below(3) {
            0 => rng.below(IMAGE / 512 + 2),
            1 => IMAGE / 512 - rng.below(3),
            _ => rng.interesting(),
        };
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        // DISCARD / WRITE_ZEROES segments, or any bytes.
        mem.write_slice(&rng.bytes(64), GuestAddress(BUF)).unwrap();
        let count = 1 + rng.index(5);
        let descs: Vec<(u64, u32, u16)> = (0..count)
            .map(|_| {
                let flags = match rng.below(8) {
                    0 => INDIRECT,
                    1 => rng.next_u64() as u16,
                    2..=4 => WRITE,
                    _ => 0,
                };
                (addr(rng), len(rng), flags)
            })
            .collect();
        if usize::from(tq.descriptors_used()) + descs.len() >= usize::from(SIZE) {
            break;
        }
        tq.add_chain(&descs);
    }
    // A broken driver: descriptors that loop or point past the table,
    // an indirect table of garbage, an avail index far ahead.
    for _ in 0..rng.below(3) {
        match rng.below(4) {
            0 => {
                let d = rng.below(u64::from(SIZE)) as u16;
                let flags = rng.next_u64() as u16;
                tq.store_desc(d, addr(rng), len(rng), flags, rng.next_u64() as u16 % (SIZE + 2));
            }
            1 => {
                let at = tq.desc_table_addr() + rng.below(u64::from(SIZE) * 16);
                mem.write_slice(&rng.bytes(32), GuestAddress(at)).unwrap();
            }
            2 => mem.write_slice(&rng.bytes(256), GuestAddress(TABLE)).unwrap(),
            _ => tq.set_avail_idx(rng.next_u64() as u16),
        }
    }
    q.serve();
    let on_disk = std::fs::metadata(f.dir.join("disk.img")).unwrap().len();
    assert_eq!(on_disk, IMAGE, "the image keeps its size");
}
