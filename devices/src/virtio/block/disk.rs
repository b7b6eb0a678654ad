//! A raw disk image on the host: opened once per process (its lock lives as
//! long as skiff does, across guest reboots), read and written at byte
//! offsets by the block device's workers.
//!
//! - Locking is QEMU's (block/file-posix.c), on the same bytes, so skiff
//!   and QEMU see each other's locks: a shared OFD lock on byte 100 + bit
//!   for each permission held, and on byte 200 + bit for each permission
//!   not shared with others. A read-write drive holds "write" and does not
//!   share it; a read-only one does not share it either, so a second writer
//!   fails with QEMU's `Failed to get "write" lock`.
//! - `cache=none` opens with O_DIRECT. All I/O then goes through an aligned
//!   bounce buffer, padded to the alignment the file needs (read-modify-
//!   write at the edges). Where the filesystem refuses O_DIRECT (tmpfs),
//!   the image is opened buffered and FLUSH does fdatasync, with one
//!   warning naming the file; QEMU fails there.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// QEMU's lock byte bases and permission bits (include/block/block-common.h).
const LOCK_PERM_BASE: i64 = 100;
const LOCK_SHARED_BASE: i64 = 200;
const PERM_CONSISTENT_READ: u8 = 0x01;
const PERM_WRITE: u8 = 0x02;
const PERM_WRITE_UNCHANGED: u8 = 0x04;
const PERM_RESIZE: u8 = 0x08;
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// The largest alignment O_DIRECT may need (a 4Kn disk).
const MAX_ALIGN: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("Could not open '{path}'")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Failed to get \"{perm}\" lock: is another process using the image [{path}]?")]
    Locked { perm: &'static str, path: PathBuf },
    #[error("Failed to get shared \"{perm}\" lock: is another process using the image [{path}]?")]
    SharedLocked { perm: &'static str, path: PathBuf },
    #[error("Failed to lock byte {byte} of '{path}'")]
    Lock {
        byte: i64,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("'{path}' is {what}, not a disk image (a regular file or a block device)")]
    NotAFile { path: PathBuf, what: &'static str },
    #[error("Could not open the qcow2 image '{path}'")]
    Image {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// QEMU's image formats by their magic (its block drivers' probes), where
/// `head` is the start of a file.
pub fn image_format(head: &[u8]) -> Option<&'static str> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    let be32 =
        |off: usize| head.get(off..off + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    if at(0, b"QFI\xfb") {
        return Some(if be32(4) == Some(1) { "qcow" } else { "qcow2" });
    }
    const MAGICS: &[(usize, &[u8], &str)] = &[
        (0, b"QED\0", "qed"),
        (0, b"KDMV", "vmdk"),
        (0, b"COWD", "vmdk"),
        (0, b"# Disk DescriptorFile", "vmdk"),
        (0, b"vhdxfile", "vhdx"),
        (0, b"conectix", "vpc"),
        (0, b"WithoutFreeSpace", "parallels"),
        (0, b"WithouFreSpacExt", "parallels"),
        (0, b"LUKS\xba\xbe", "luks"),
        (0, b"#!/bin/sh\n#V2.0 Format", "cloop"),
        (64, b"\x7f\x10\xda\xbe", "vdi"),
    ];
    MAGICS.iter().find(|(off, magic, _)| at(*off, magic)).map(|&(_, _, name)| name)
}

/// What a file that is not a disk image is, for the error.
fn not_an_image(t: std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    match () {
        _ if t.is_file() || t.is_block_device() => None,
        _ if t.is_dir() => Some("a directory"),
        _ if t.is_fifo() => Some("a FIFO"),
        _ if t.is_socket() => Some("a socket"),
        _ if t.is_char_device() => Some("a character device"),
        _ => Some("not a regular file"),
    }
}

/// How to open an image (`-drive` as parsed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskOptions {
    pub path: PathBuf,
    pub read_only: bool,
    /// `cache=none`/`directsync` or `cache.direct=on`: O_DIRECT.
    pub direct: bool,
    /// `cache=writethrough`/`directsync`: every write durable (O_DSYNC).
    pub dsync: bool,
    /// `cache=unsafe`: the guest's flushes do nothing.
    pub ignore_flush: bool,
    /// `file.locking=off` skips the locks.
    pub locking: bool,
}

pub struct Disk {
    file: File,
    path: PathBuf,
    read_only: bool,
    ignore_flush: bool,
    /// O_DIRECT is on, with this alignment for offsets, lengths and memory.
    direct_align: Option<usize>,
    size: u64,
    /// Set while the device stops: long work (zeroing by writing) gives up
    /// between steps, so a reset waits for one step, not for gigabytes.
    abandon: std::sync::atomic::AtomicBool,
    /// A qcow2 image on `file`: every access goes through its metadata.
    qcow2: Option<super::qcow2::Qcow2Image>,
}

/// Zeros are written this much at a time where the filesystem cannot zero
/// a range (tmpfs); between steps a stopping device is noticed.
const ZERO_STEP: usize = 1 << 20;

/// Sets or tests one byte's OFD lock; returns whether another holder
/// conflicts (for a test) or the error (for a set).
fn ofd_lock(file: &File, byte: i64, cmd: i32, kind: i16) -> io::Result<bool> {
    // SAFETY: flock is plain data; zeroed is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: fcntl on a descriptor `file` owns, with a valid flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cmd == libc::F_OFD_GETLK && fl.l_type != libc::F_UNLCK as i16)
}

/// QEMU's `raw_check_lock_bytes` then `raw_apply_lock_bytes`.
fn lock(file: &File, path: &Path, perm: u8, shared: u8) -> Result<(), DiskError> {
    let test = |byte: i64| ofd_lock(file, byte, libc::F_OFD_GETLK, libc::F_WRLCK as i16);
    let lock_err = |byte, source| DiskError::Lock { byte, path: path.to_owned(), source };
    for (i, name) in PERM_NAMES.iter().enumerate() {
        let bit = 1u8 << i;
        if perm & bit != 0 && test(LOCK_SHARED_BASE + i as i64).map_err(|e| lock_err(0, e))? {
            return Err(DiskError::Locked { perm: name, path: path.to_owned() });
        }
        if shared & bit == 0 && test(LOCK_PERM_BASE + i as i64).map_err(|e| lock_err(0, e))? {
            return Err(DiskError::SharedLocked { perm: name, path: path.to_owned() });
        }
    }
    for i in 0..PERM_NAMES.len() {
        let bit = 1u8 << i;
        let mut bytes = Vec::new();
        if perm & bit != 0 {
            bytes.push(LOCK_PERM_BASE + i as i64);
        }
        if shared & bit == 0 {
            bytes.push(LOCK_SHARED_BASE + i as i64);
        }
        for byte in bytes {
            ofd_lock(file, byte, libc::F_OFD_SETLK, libc::F_RDLCK as i16)
                .map_err(|e| lock_err(byte, e))?;
        }
    }
    Ok(())
}

/// An aligned heap buffer for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    len: usize,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize, align: usize) -> io::Result<Self> {
        let layout =
            std::alloc::Layout::from_size_align(len.max(align), align).map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        Ok(Aligned { ptr, len, layout })
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `layout.size() >= len` bytes we own.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// Opens the image: O_NONBLOCK, so that a FIFO put there since the type
/// was checked cannot hang skiff in open(2), then checked again and made
/// blocking (io_uring would fail reads of an O_NONBLOCK file with EAGAIN).
fn open(opts: &DiskOptions, direct: bool) -> Result<File, DiskError> {
    let file = open_nonblocking(opts, direct)
        .map_err(|source| DiskError::Open { path: opts.path.clone(), source })?;
    let open_err = |source| DiskError::Open { path: opts.path.clone(), source };
    let meta = file.metadata().map_err(open_err)?;
    if let Some(what) = not_an_image(meta.file_type()) {
        return Err(DiskError::NotAFile { path: opts.path.clone(), what });
    }
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor `file` owns; it reads flags only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above; it clears O_NONBLOCK only.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(open_err(io::Error::last_os_error()));
    }
    Ok(file)
}

fn open_nonblocking(opts: &DiskOptions, direct: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(!opts.read_only);
    let mut flags = libc::O_NONBLOCK;
    if direct {
        flags |= libc::O_DIRECT;
    }
    if opts.dsync && !opts.read_only {
        flags |= libc::O_DSYNC;
    }
    o.custom_flags(flags);
    o.open(&opts.path)
}

/// The smallest alignment at which an O_DIRECT read works, or None when the
/// filesystem refuses O_DIRECT altogether (EINVAL at open or on read).
fn probe_direct(file: &File) -> Option<usize> {
    let mut buf = Aligned::new(MAX_ALIGN, MAX_ALIGN).ok()?;
    [512, 1024, 2048, 4096].into_iter().find(|&align| {
        // Only EINVAL says "misaligned"; an empty file reads 0 bytes.
        !matches!(file.read_at(&mut buf.as_mut()[..align], 0),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL))
    })
}

impl Disk {
    /// Opens and locks the image.
    pub fn open(opts: &DiskOptions) -> Result<Disk, DiskError> {
        let open_err = |source| DiskError::Open { path: opts.path.clone(), source };
        // Its type first, without opening it: open(2) of a FIFO blocks.
        let meta = std::fs::metadata(&opts.path).map_err(open_err)?;
        if let Some(what) = not_an_image(meta.file_type()) {
            return Err(DiskError::NotAFile { path: opts.path.clone(), what });
        }
        let (file, direct_align) = if opts.direct {
            match open(opts, true) {
                Ok(f) => match probe_direct(&f) {
                    Some(align) => (f, Some(align)),
                    None => (open(opts, false)?, None),
                },
                Err(DiskError::Open { source: e, .. })
                    if e.raw_os_error() == Some(libc::EINVAL) =>
                {
                    (open(opts, false)?, None)
                }
                Err(e) => return Err(e),
            }
        } else {
            (open(opts, false)?, None)
        };
        if opts.direct && direct_align.is_none() {
            crate::warn_limited!(
                "{}: the filesystem does not support O_DIRECT (cache=none): using the page \
                 cache, with fdatasync on every guest flush",
                opts.path.display()
            );
        }
        let meta = file.metadata().map_err(open_err)?;
        let size = if meta.file_type().is_file() {
            meta.len()
        } else {
            use std::io::Seek;
            let mut f = &file;
            f.seek(io::SeekFrom::End(0)).map_err(open_err)?
        };
        if opts.locking {
            let perm = if opts.read_only {
                PERM_CONSISTENT_READ
            } else {
                PERM_CONSISTENT_READ | PERM_WRITE
            };
            // What a QEMU virtio-blk shares by default (share-rw=off).
            let shared = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED | PERM_RESIZE;
            lock(&file, &opts.path, perm, shared)?;
        }
        Ok(Disk {
            file,
            path: opts.path.clone(),
            read_only: opts.read_only,
            ignore_flush: opts.ignore_flush,
            direct_align,
            size,
            abandon: std::sync::atomic::AtomicBool::new(false),
            qcow2: None,
        })
    }

    /// Reads the image as qcow2 from now on (`format=qcow2`, or probed):
    /// its size is the guest's, its backing chain opened read-only.
    pub fn open_qcow2(&mut self) -> Result<(), DiskError> {
        let image_err = |source| DiskError::Image { path: self.path.clone(), source };
        if self.direct_align.is_some() {
            return Err(image_err(io::Error::new(
                io::ErrorKind::Unsupported,
                "cache=none/directsync (O_DIRECT) with a qcow2 image is not supported yet",
            )));
        }
        let image = super::qcow2::Qcow2Image::open(&self.file, &self.path, !self.read_only)
            .map_err(image_err)?;
        self.size = image.size();
        self.qcow2 = Some(image);
        Ok(())
    }

    /// Whether the guest's sectors are the file's bytes (a raw image), so
    /// an engine may read and write the descriptor directly.
    pub fn is_raw(&self) -> bool {
        self.qcow2.is_none()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image's descriptor, for an asynchronous engine (io_uring).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    /// The alignment O_DIRECT needs, when it is on.
    pub fn direct_align(&self) -> Option<usize> {
        self.direct_align
    }

    /// Reads `buf.len()` bytes at `offset` (zeros past the end of the
    /// file never happen: callers check the range).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let Some(q) = &self.qcow2 {
            return q.read_at(buf, offset);
        }
        match self.direct_align {
            None => self.file.read_exact_at(buf, offset),
            Some(align) => {
                let (start, len) = padded(offset, buf.len(), align);
                let mut bounce = Aligned::new(len, align)?;
                self.file.read_exact_at(bounce.as_mut(), start)?;
                let at = (offset - start) as usize;
                buf.copy_from_slice(&bounce.as_mut()[at..at + buf.len()]);
                Ok(())
            }
        }
    }

    /// Writes `buf` at `offset`. With O_DIRECT, a write that does not
    /// cover whole aligned blocks reads the blocks at its edges first.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        if let Some(q) = &self.qcow2 {
            return q.write_at(buf, offset);
        }
        match self.direct_align {
            None => self.file.write_all_at(buf, offset),
            Some(align) => {
                let (start, len) = padded(offset, buf.len(), align);
                let mut bounce = Aligned::new(len, align)?;
                // The edge blocks keep what the write does not cover.
                if start != offset {
                    self.read_block(&mut bounce.as_mut()[..align], start)?;
                }
                if start + len as u64 != offset + buf.len() as u64 {
                    self.read_block(
                        &mut bounce.as_mut()[len - align..],
                        start + (len - align) as u64,
                    )?;
                }
                let at = (offset - start) as usize;
                bounce.as_mut()[at..at + buf.len()].copy_from_slice(buf);
                self.file.write_all_at(bounce.as_mut(), start)
            }
        }
    }

    /// One aligned block; what lies past the end of the file reads as zeros.
    fn read_block(&self, block: &mut [u8], at: u64) -> io::Result<()> {
        let n = self.file.read_at(block, at)?;
        block[n..].fill(0);
        Ok(())
    }

    /// The image format the first bytes say, where they name one QEMU
    /// knows (None: raw, as QEMU's probing would guess). skiff reads raw
    /// images only: a `-drive` without `format=` on one of these would
    /// hand the guest the container's bytes (and its writes would corrupt
    /// the image), so the caller refuses it.
    pub fn probe_format(&self) -> io::Result<Option<&'static str>> {
        let mut head = [0u8; 512];
        let mut n = 0;
        while n < head.len() {
            match self.file.read_at(&mut head[n..], n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(image_format(&head[..n]))
    }

    /// Makes written data durable (the guest's FLUSH).
    pub fn flush(&self) -> io::Result<()> {
        if !self.flushes() {
            return Ok(());
        }
        if let Some(q) = &self.qcow2 {
            return q.flush();
        }
        self.file.sync_data()
    }

    /// Whether a guest FLUSH reaches the disk (not with `cache=unsafe`,
    /// nor on a read-only drive).
    pub fn flushes(&self) -> bool {
        !(self.ignore_flush || self.read_only)
    }

    /// Deallocates `[offset, offset + len)`; it then reads as zeros.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if let Some(q) = &self.qcow2 {
            if self.read_only {
                return Err(io::Error::from_raw_os_error(libc::EROFS));
            }
            return q.discard(offset, len);
        }
        self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }

    /// Makes `[offset, offset + len)` read as zeros, keeping it allocated.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if let Some(q) = &self.qcow2 {
            if self.read_only {
                return Err(io::Error::from_raw_os_error(libc::EROFS));
            }
            return q.write_zeroes(offset, len);
        }
        match self.fallocate(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
            // Not every filesystem zeroes ranges: write them.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zeroes_by_writing(offset, len)
            }
            other => other,
        }
    }

    /// Writes zeros in `ZERO_STEP`s, giving up (Interrupted) once the
    /// device is stopping (`abandon_long_work`).
    fn write_zeroes_by_writing(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunk = vec![0u8; ZERO_STEP];
        let mut done = 0u64;
        while done < len {
            if self.abandon.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "zeroing abandoned: the device is stopping",
                ));
            }
            let n = (len - done).min(ZERO_STEP as u64) as usize;
            self.write_at(&chunk[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// While on, long work in progress gives up at its next step: the
    /// device is stopping and waits for its workers.
    pub fn abandon_long_work(&self, on: bool) {
        self.abandon.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
        let len = libc::off_t::try_from(len).map_err(io::Error::other)?;
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// `[offset, offset + len)` widened to whole `align` blocks: (start, len).
fn padded(offset: u64, len: usize, align: usize) -> (u64, usize) {
    let a = align as u64;
    let start = offset / a * a;
    let end = (offset + len as u64).next_multiple_of(a);
    (start, (end - start) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("skiff-disk-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn opts(path: &Path, read_only: bool, direct: bool) -> DiskOptions {
        DiskOptions {
            path: path.to_owned(),
            read_only,
            direct,
            dsync: false,
            ignore_flush: false,
            locking: true,
        }
    }

    /// A FIFO, a directory or a character device is refused at once, by
    /// name and kind, whether read-only or not; open(2) never blocks on the
    /// FIFO. (Issue: `-drive file=FIFO,read-only=on` hung skiff forever,
    /// a directory was an 8 EiB disk.)
    #[test]
    fn non_images_are_refused_without_blocking() {
        let dir = tmpdir("kinds");
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        let cases = [
            (fifo, "a FIFO"),
            (dir.clone(), "a directory"),
            (PathBuf::from("/dev/null"), "a character device"),
        ];
        for (path, what) in cases {
            for read_only in [true, false] {
                for direct in [false, true] {
                    let (tx, rx) = std::sync::mpsc::channel();
                    let o = opts(&path, read_only, direct);
                    std::thread::spawn(move || {
                        tx.send(Disk::open(&o).err().map(|e| e.to_string()))
                    });
                    let got = rx.recv_timeout(std::time::Duration::from_secs(10));
                    let err = got.expect("open blocked").expect("refused");
                    assert_eq!(
                        err,
                        format!(
                            "'{}' is {what}, not a disk image (a regular file or a block device)",
                            path.display()
                        )
                    );
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// QEMU's formats are told by their magic; anything else (an empty
    /// file, a filesystem, zeros) is raw.
    #[test]
    fn image_formats_are_told_by_their_magic() {
        let mut qcow2 = vec![0u8; 512];
        qcow2[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
        let mut vdi = vec![0u8; 512];
        vdi[64..68].copy_from_slice(&0xbeda107fu32.to_le_bytes());
        let cases: [(&[u8], Option<&str>); 7] = [
            (&qcow2, Some("qcow2")),
            (b"QFI\xfb\0\0\0\x01", Some("qcow")),
            (b"KDMV\x01\0\0\0", Some("vmdk")),
            (&vdi, Some("vdi")),
            (b"", None),
            (&[0u8; 512], None),
            (b"QFI", None),
        ];
        for (head, want) in cases {
            assert_eq!(image_format(head), want, "{:?}", &head[..head.len().min(8)]);
        }
        let dir = tmpdir("probe");
        let p = image(&dir, "q.img", 1 << 20);
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().write_at(&qcow2, 0).unwrap();
        assert_eq!(
            Disk::open(&opts(&p, true, false)).unwrap().probe_format().unwrap(),
            Some("qcow2")
        );
        let raw = image(&dir, "r.img", 1 << 20);
        assert_eq!(Disk::open(&opts(&raw, true, false)).unwrap().probe_format().unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Images are opened blocking: io_uring would fail an O_NONBLOCK
    /// file's reads with EAGAIN.
    #[test]
    fn images_are_left_blocking() {
        let dir = tmpdir("nonblock");
        let p = image(&dir, "a.img", 1 << 20);
        for direct in [false, true] {
            let disk = Disk::open(&opts(&p, false, direct)).unwrap();
            // SAFETY: F_GETFL on a descriptor the disk owns.
            let flags = unsafe { libc::fcntl(disk.raw_fd(), libc::F_GETFL) };
            assert_eq!(flags & libc::O_NONBLOCK, 0);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Zeroing by writing stops at its next step once the device is
    /// stopping, so a reset does not wait for gigabytes of writes (issue
    /// 29, item 2); the request fails, the data past the step stays.
    #[test]
    fn zeroing_by_writing_gives_up_when_the_device_stops() {
        let dir = tmpdir("abandon");
        let p = image(&dir, "a.img", 4 << 20);
        std::fs::write(&p, vec![0xaa; 4 << 20]).unwrap();
        let disk = Disk::open(&opts(&p, false, false)).unwrap();
        disk.abandon_long_work(true);
        let e = disk.write_zeroes_by_writing(0, 4 << 20).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
        let mut b = [0u8; 1];
        disk.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0xaa], "nothing written once stopping");
        disk.abandon_long_work(false);
        disk.write_zeroes_by_writing(ZERO_STEP as u64 / 2, 2 * ZERO_STEP as u64).unwrap();
        let mut back = vec![0u8; 4 << 20];
        disk.read_at(&mut back, 0).unwrap();
        let (a, z) = (ZERO_STEP / 2, ZERO_STEP / 2 + 2 * ZERO_STEP);
        assert!(back[..a].iter().all(|&x| x == 0xaa) && back[z..].iter().all(|&x| x == 0xaa));
        assert!(back[a..z].iter().all(|&x| x == 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_second_writer_gets_qemus_lock_error() {
        let dir = tmpdir("lock");
        let p = image(&dir, "a.img", 1 << 20);
        let reader = Disk::open(&opts(&p, true, false)).unwrap();
        // Readers share.
        let reader2 = Disk::open(&opts(&p, true, false)).unwrap();
        let e = Disk::open(&opts(&p, false, false)).err().unwrap().to_string();
        assert!(e.starts_with("Failed to get \"write\" lock"), "{e}");
        assert!(e.contains(&p.display().to_string()), "{e}");
        drop((reader, reader2));
        let writer = Disk::open(&opts(&p, false, false)).unwrap();
        let e = Disk::open(&opts(&p, false, false)).err().unwrap().to_string();
        assert!(e.contains("\"write\" lock"), "{e}");
        // A reader does not share "write", which the writer holds.
        let e = Disk::open(&opts(&p, true, false)).err().unwrap().to_string();
        assert!(e.starts_with("Failed to get shared \"write\" lock"), "{e}");
        // file.locking=off: no lock taken nor checked.
        Disk::open(&DiskOptions { locking: false, ..opts(&p, false, false) }).unwrap();
        drop(writer);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn buffered_io_reads_back_and_read_only_refuses_writes() {
        let dir = tmpdir("rw");
        let p = image(&dir, "b.img", 1 << 20);
        let d = Disk::open(&opts(&p, false, false)).unwrap();
        assert_eq!(d.size(), 1 << 20);
        d.write_at(b"hello", 4093).unwrap();
        let mut b = [0u8; 5];
        d.read_at(&mut b, 4093).unwrap();
        assert_eq!(&b, b"hello");
        d.flush().unwrap();
        drop(d);
        let r = Disk::open(&opts(&p, true, false)).unwrap();
        assert_eq!(r.write_at(b"x", 0).unwrap_err().raw_os_error(), Some(libc::EROFS));
        assert_eq!(r.punch_hole(0, 4096).unwrap_err().raw_os_error(), Some(libc::EROFS));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// cache=none: O_DIRECT where the filesystem has it, with unaligned
    /// writes padded by reading their edge blocks; the page cache with a
    /// warning where it does not (tmpfs).
    #[test]
    fn direct_io_pads_unaligned_requests_or_falls_back() {
        for dir in [tmpdir("direct"), PathBuf::from("/dev/shm").join("skiff-disk-shm")] {
            std::fs::create_dir_all(&dir).unwrap();
            let p = image(&dir, "c.img", 1 << 20);
            let d = Disk::open(&opts(&p, false, true)).unwrap();
            let pattern: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
            d.write_at(&pattern, 1000).unwrap();
            d.write_at(b"edge", (1 << 20) - 4).unwrap();
            let mut back = vec![0u8; 10_000];
            d.read_at(&mut back, 1000).unwrap();
            assert_eq!(back, pattern, "in {}", dir.display());
            let mut before = [0xffu8; 1000];
            d.read_at(&mut before, 0).unwrap();
            assert_eq!(before, [0u8; 1000], "bytes before the write stay zero");
            let mut e = [0u8; 4];
            d.read_at(&mut e, (1 << 20) - 4).unwrap();
            assert_eq!(&e, b"edge");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn discard_and_write_zeroes_read_back_as_zeros() {
        let dir = tmpdir("discard");
        let p = image(&dir, "d.img", 1 << 20);
        let d = Disk::open(&opts(&p, false, false)).unwrap();
        d.write_at(&[0xaa; 65536], 0).unwrap();
        d.punch_hole(4096, 8192).unwrap();
        d.write_zeroes(32768, 4096).unwrap();
        let mut b = vec![0u8; 65536];
        d.read_at(&mut b, 0).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0xaa));
        assert!(b[4096..12288].iter().all(|&x| x == 0));
        assert!(b[12288..32768].iter().all(|&x| x == 0xaa));
        assert!(b[32768..36864].iter().all(|&x| x == 0));
        assert_eq!(d.size(), 1 << 20, "the size is kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn padding_widens_to_whole_blocks() {
        assert_eq!(padded(0, 512, 512), (0, 512));
        assert_eq!(padded(1000, 10, 512), (512, 512));
        assert_eq!(padded(1000, 100, 512), (512, 1024));
        assert_eq!(padded(4096, 4096, 4096), (4096, 4096));
        assert_eq!(padded(4095, 2, 4096), (0, 8192));
    }
}
