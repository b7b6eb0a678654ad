//! qcow2 images through imago (by QEMU's block maintainer): the image's
//! metadata (L1/L2 tables, refcounts, its backing chain) is imago's; the
//! device reaches it through `Disk`'s positional reads and writes, on the
//! queue workers and the block thread pool, as it reaches a raw image.
//!
//! What skiff adds around imago: the image is opened (and locked, as QEMU
//! locks it) by `Disk`, and imago gets that descriptor; encrypted images
//! are refused here (imago would read their ciphertext as data); a guest
//! FLUSH writes imago's metadata caches back *and* syncs the file (imago's
//! `flush` alone does not sync); discards exclude every other request
//! while they free clusters, as imago's contract for them asks.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::RwLock;

use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate, StorageOpenOptions};

/// The header's magic ("QFI\xfb").
const MAGIC: [u8; 4] = *b"QFI\xfb";

/// A qcow2 image and its backing chain.
pub struct Qcow2Image {
    access: FormatAccess<imago::file::File>,
    /// Held shared by reads and writes, exclusively by a discard (imago
    /// frees clusters at once: no request may use them meanwhile).
    discarding: RwLock<()>,
}

impl Qcow2Image {
    /// Opens the qcow2 image on `file` (opened, and locked, by the caller
    /// at `path`; a relative backing file is found next to `path`).
    pub fn open(file: &File, path: &Path, writable: bool) -> io::Result<Qcow2Image> {
        check_header(file)?;
        let storage = imago::file::File::from_open_file(
            file.try_clone()?,
            StorageOpenOptions::new().filename(path).write(writable),
        )?;
        let image = Qcow2::<imago::file::File>::builder(storage)
            .write(writable)
            .open(PermissiveImplicitOpenGate::default())?;
        Ok(Qcow2Image { access: FormatAccess::new(image), discarding: RwLock::new(()) })
    }

    /// The guest-visible size.
    pub fn size(&self) -> u64 {
        self.access.size()
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let _shared = self.discarding.read().unwrap_or_else(|e| e.into_inner());
        self.access.read(buf, offset)
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let _shared = self.discarding.read().unwrap_or_else(|e| e.into_inner());
        self.access.write(buf, offset)
    }

    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let _shared = self.discarding.read().unwrap_or_else(|e| e.into_inner());
        self.access.write_zeroes(offset, len)
    }

    /// Frees the clusters of `[offset, offset + len)`; it reads as zeros.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let _alone = self.discarding.write().unwrap_or_else(|e| e.into_inner());
        // SAFETY: imago's contract: no other request runs on this image
        // while the clusters are freed; every other access holds the
        // lock shared, and we hold it exclusively.
        unsafe { self.access.discard_to_zero_unsafe(offset, len) }
    }

    /// Metadata caches written back, then the file made durable.
    pub fn flush(&self) -> io::Result<()> {
        let _shared = self.discarding.read().unwrap_or_else(|e| e.into_inner());
        self.access.flush()?;
        self.access.sync()
    }
}

impl Drop for Qcow2Image {
    /// Metadata caches go back to the file at exit (a clean image for the
    /// next opener, as QEMU closes it).
    fn drop(&mut self) {
        if let Err(e) = self.access.flush() {
            crate::error_limited!("qcow2: writing metadata back at close: {e}");
        }
    }
}

/// What imago does not check before it trusts an image: an encrypted one
/// (its clusters would be read as plain data), and metadata tables that
/// lie outside the file or off cluster boundaries (imago opens such an
/// image, and its allocator then recurses without end on the first write:
/// found by this module's fuzz target, a stack overflow). QEMU's
/// `qcow2_open` refuses these too.
fn check_header(file: &File) -> io::Result<()> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let file_len = file.metadata()?.len();
    let mut h = [0u8; 104];
    file.read_exact_at(&mut h, 0).map_err(|e| bad(format!("qcow2 header unreadable: {e}")))?;
    let be32 = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let be64 = |at: usize| u64::from(be32(at)) << 32 | u64::from(be32(at + 4));
    if h[0..4] != MAGIC {
        return Err(bad("not a qcow2 image".into()));
    }
    let crypt = be32(32);
    if crypt != 0 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("encrypted qcow2 images are not supported (crypt_method {crypt})"),
        ));
    }
    let cluster_bits = be32(20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(bad(format!("qcow2 cluster_bits {cluster_bits} out of range")));
    }
    let cluster = 1u64 << cluster_bits;
    // A table: cluster-aligned, and wholly inside the file.
    let table = |name: &str, offset: u64, len: u64| -> io::Result<()> {
        let end = offset.checked_add(len).filter(|&e| e <= file_len);
        if !offset.is_multiple_of(cluster) || offset == 0 || end.is_none() {
            return Err(bad(format!(
                "qcow2 {name} at {offset:#x} (+{len:#x}) is not inside the {file_len}-byte file"
            )));
        }
        Ok(())
    };
    let rt_offset = be64(48);
    let rt_len = u64::from(be32(56)) * cluster;
    table("refcount table", rt_offset, rt_len)?;
    let l1_len = u64::from(be32(36)) * 8;
    if l1_len > 0 {
        table("L1 table", be64(40), l1_len)?;
    }
    // Every refcount block the table names, and every L2 table the L1
    // table names, likewise (the tables are inside the file: bounded).
    let mut rt = vec![0u8; rt_len as usize];
    file.read_exact_at(&mut rt, rt_offset)?;
    for (i, e) in rt.chunks_exact(8).enumerate() {
        let entry = u64::from_be_bytes(e.try_into().expect("8 bytes"));
        if entry != 0 {
            table(&format!("refcount block {i}"), entry, cluster)?;
        }
    }
    let mut l1 = vec![0u8; l1_len as usize];
    if l1_len > 0 {
        file.read_exact_at(&mut l1, be64(40))?;
    }
    for (i, e) in l1.chunks_exact(8).enumerate() {
        // Bits 9-55: the L2 table's offset (bit 63: COPIED).
        let l2 = u64::from_be_bytes(e.try_into().expect("8 bytes")) & 0x00ff_ffff_ffff_fe00;
        if l2 != 0 {
            table(&format!("L2 table {i}"), l2, cluster)?;
        }
    }
    // Snapshots' table, where there are snapshots (QEMU's
    // validate_table_offset; each entry is at least 40 bytes).
    let snapshots = u64::from(be32(60));
    if snapshots > 0 {
        table("snapshot table", be64(64), snapshots * 40)?;
    }
    // Every metadata cluster must be counted as used: imago allocates
    // clusters whose refcount is 0, and would write over the header or a
    // table (QEMU's overlap checks stop that; imago has none).
    let refcount_bits = 1u64.checked_shl(be32(96)).filter(|&b| (1..=64).contains(&b));
    let refcount_bits = refcount_bits
        .ok_or_else(|| bad(format!("qcow2 refcount_order {} out of range", be32(96))))?;
    let per_block = cluster * 8 / refcount_bits;
    let used = |offset: u64| -> io::Result<bool> {
        let index = offset / cluster;
        let Some(e) =
            rt.get((index / per_block) as usize * 8..(index / per_block) as usize * 8 + 8)
        else {
            return Ok(false);
        };
        let block = u64::from_be_bytes(e.try_into().expect("8 bytes"));
        if block == 0 {
            return Ok(false);
        }
        let bit = (index % per_block) * refcount_bits;
        let mut bytes = [0u8; 8];
        let width = refcount_bits.div_ceil(8) as usize;
        file.read_exact_at(&mut bytes[..width], block + bit / 8)?;
        Ok(bytes[..width].iter().any(|&b| {
            // Sub-byte refcounts: only this entry's bits.
            if refcount_bits < 8 {
                let shift = 8 - refcount_bits - bit % 8;
                (b >> shift) & ((1 << refcount_bits) - 1) != 0
            } else {
                b != 0
            }
        }))
    };
    let mut metadata = vec![0u64];
    metadata.extend((0..rt_len / cluster).map(|i| rt_offset + i * cluster));
    metadata.extend((0..l1_len.div_ceil(cluster)).map(|i| be64(40) + i * cluster));
    metadata.extend(rt.chunks_exact(8).map(|e| u64::from_be_bytes(e.try_into().expect("8"))));
    metadata.extend(
        l1.chunks_exact(8)
            .map(|e| u64::from_be_bytes(e.try_into().expect("8")) & 0x00ff_ffff_ffff_fe00),
    );
    for (n, offset) in metadata.into_iter().enumerate() {
        if (n == 0 || offset != 0) && !used(offset)? {
            return Err(bad(format!(
                "qcow2 metadata cluster at {offset:#x} has refcount 0 (qemu-img check -r all repairs it)"
            )));
        }
    }
    Ok(())
}

/// A valid qcow2 v3 image of 64 KiB with 512-byte clusters: header,
/// refcount table, refcount block, L1 table (one cluster each). The fuzz
/// target's starting point.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn template() -> Vec<u8> {
    let mut img = vec![0u8; 2048];
    let be32 =
        |img: &mut Vec<u8>, at: usize, v: u32| img[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let be64 =
        |img: &mut Vec<u8>, at: usize, v: u64| img[at..at + 8].copy_from_slice(&v.to_be_bytes());
    img[0..4].copy_from_slice(&MAGIC);
    be32(&mut img, 4, 3); // version
    be32(&mut img, 20, 9); // cluster_bits: 512-byte clusters
    be64(&mut img, 24, 64 << 10); // size
    be32(&mut img, 36, 2); // l1_size: 2 entries of 32 KiB each
    be64(&mut img, 40, 1536); // l1_table_offset
    be64(&mut img, 48, 512); // refcount_table_offset
    be32(&mut img, 56, 1); // refcount_table_clusters
    be32(&mut img, 96, 4); // refcount_order: 16 bits
    be32(&mut img, 100, 104); // header_length
    be64(&mut img, 512, 1024); // refcount table[0]: the block at 1024
    for cluster in 0..4 {
        img[1024 + 2 * cluster + 1] = 1; // refcount 1 (16-bit, big-endian)
    }
    img
}

/// Fuzz target body: a hostile image (a valid one, mangled: header
/// fields, tables, truncated or extended) opened and used for a few
/// reads, writes, zeroings, discards and flushes. Nothing panics; errors
/// are errors.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn fuzz_image(rng: &mut skiff_tests::fuzz::Rng) {
    use std::io::Write;
    thread_local! {
        static PATH: std::path::PathBuf = std::env::temp_dir().join(format!(
            "skiff-fuzz-qcow2-{}-{:?}.img",
            std::process::id(),
            std::thread::current().id()
        ));
    }
    let mut img = template();
    for _ in 0..rng.below(8) {
        match rng.below(5) {
            0 if !img.is_empty() => {
                let at = rng.index(img.len());
                img[at] = rng.next_u64() as u8;
            }
            0 => {}
            1 => {
                // A header or table field, big-endian, to an edge value.
                let at = *rng.pick(&[
                    4, 8, 16, 20, 24, 32, 36, 40, 48, 56, 60, 64, 72, 80, 88, 96, 100, 512, 1024,
                    1536, 1544,
                ]);
                let v = rng.interesting().to_be_bytes();
                let n = (*rng.pick(&[4usize, 8])).min(img.len().saturating_sub(at));
                if n > 0 {
                    img[at..at + n].copy_from_slice(&v[8 - n..]);
                }
            }
            2 => img.truncate(rng.index(img.len() + 1)),
            3 => img.extend(rng.bytes(4096)),
            _ => {
                // An L1 entry to somewhere (an L2 table of garbage, past
                // the end, misaligned).
                if img.len() >= 1552 {
                    let v = (rng.interesting() & 0x00ff_ffff_ffff_fe00) | (1 << 63);
                    let at = 1536 + 8 * rng.index(2);
                    img[at..at + 8].copy_from_slice(&v.to_be_bytes());
                }
            }
        }
    }
    PATH.with(|path| {
        let mut f = std::fs::File::create(path).expect("a temporary file");
        f.write_all(&img).expect("written");
        if std::env::var_os("SKIFF_FUZZ_QCOW2_KEEP").is_some() {
            let _ = std::fs::write("/tmp/fuzz-input.qcow2", &img);
        }
        let f = std::fs::OpenOptions::new().read(true).write(true).open(path).expect("opened");
        let Ok(image) = Qcow2Image::open(&f, path, true) else { return };
        let size = image.size();
        let mut buf = vec![0u8; 4096];
        for _ in 0..rng.below(8) {
            let len = rng.below(4097) as usize;
            let offset = if size > 0 { rng.below(size) } else { rng.interesting() };
            let _ = match rng.below(5) {
                0 => image.read_at(&mut buf[..len], offset),
                1 => image.write_at(&buf[..len], offset),
                2 => image.write_zeroes(offset, len as u64),
                3 => image.discard(offset, len as u64),
                _ => image.flush(),
            };
        }
        // (A data or L2 pointer past the end of the file is used as it
        // is, as QEMU uses it: the file grows there, sparse.)
        drop(image);
    });
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::super::{Disk, DiskOptions};

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("skiff-qcow2-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn qemu_img(args: &[&str]) -> std::process::Output {
        let out = Command::new("qemu-img").args(args).output().expect("qemu-img (qemu-utils)");
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn open(path: &std::path::Path, read_only: bool) -> Disk {
        let opts = DiskOptions {
            path: path.to_owned(),
            read_only,
            direct: false,
            dsync: false,
            ignore_flush: false,
            locking: true,
        };
        let mut d = Disk::open(&opts).unwrap();
        d.open_qcow2().unwrap();
        d
    }

    /// qemu-vm.nix's root disk: `qemu-img create -f qcow2 -b BASE`. Reads
    /// come through from the (raw) backing file, writes land in the
    /// overlay, the backing file stays as it was, and QEMU's own tools
    /// find the image clean and the guest's bytes in it.
    #[test]
    fn an_overlay_on_a_raw_backing_file() {
        let d = dir("overlay");
        let base = d.join("base.raw");
        let pattern: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&base, &pattern).unwrap();
        let top = d.join("top.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            top.to_str().unwrap(),
        ]);
        let disk = open(&top, false);
        assert_eq!(disk.size(), 4 << 20);
        assert!(!disk.is_raw());
        let mut buf = vec![0u8; 8192];
        disk.read_at(&mut buf, 1 << 20).unwrap();
        assert_eq!(buf, pattern[1 << 20..(1 << 20) + 8192], "through from the backing file");
        disk.write_at(&[0xab; 4096], 1 << 20).unwrap();
        disk.write_zeroes(2 << 20, 65536).unwrap();
        disk.flush().unwrap();
        disk.read_at(&mut buf[..4096], 1 << 20).unwrap();
        assert_eq!(buf[..4096], [0xab; 4096]);
        drop(disk);
        qemu_img(&["check", "-q", top.to_str().unwrap()]);
        let flat = d.join("flat.raw");
        qemu_img(&["convert", "-O", "raw", top.to_str().unwrap(), flat.to_str().unwrap()]);
        let got = std::fs::read(&flat).unwrap();
        assert_eq!(got[1 << 20..(1 << 20) + 4096], [0xab; 4096]);
        assert!(got[2 << 20..(2 << 20) + 65536].iter().all(|&b| b == 0), "zeroed");
        assert_eq!(got[3 << 20..], pattern[3 << 20..], "untouched range from the backing file");
        assert_eq!(std::fs::read(&base).unwrap(), pattern, "the backing file is unchanged");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A second opener is refused while skiff holds the image, as QEMU
    /// refuses it (the locks are QEMU's).
    #[test]
    fn the_image_is_locked_as_qemu_locks_it() {
        let d = dir("lock");
        let top = d.join("a.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", top.to_str().unwrap(), "1M"]);
        let disk = open(&top, false);
        let out = Command::new("qemu-img").args(["info", top.to_str().unwrap()]).output().unwrap();
        assert!(!out.status.success(), "qemu-img must not get the write lock");
        assert!(String::from_utf8_lossy(&out.stderr).contains("lock"));
        drop(disk);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Bad images are errors, never a panic: a truncated header, an
    /// encrypted image, a dirty one.
    #[test]
    fn bad_images_are_refused_by_name() {
        let d = dir("bad");
        let good = d.join("good.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", good.to_str().unwrap(), "1M"]);
        let header = std::fs::read(&good).unwrap();
        let opts = |p: &std::path::Path| DiskOptions {
            path: p.to_owned(),
            read_only: false,
            direct: false,
            dsync: false,
            ignore_flush: false,
            locking: true,
        };
        let try_open = |name: &str, bytes: &[u8]| {
            let p = d.join(name);
            std::fs::write(&p, bytes).unwrap();
            let mut disk = Disk::open(&opts(&p)).unwrap();
            disk.open_qcow2().map(drop).map_err(|e| {
                let mut s = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(x) = src {
                    s.push_str(&format!(": {x}"));
                    src = x.source();
                }
                s
            })
        };
        let e = try_open("short.qcow2", &header[..50]).unwrap_err();
        assert!(e.contains("qcow2"), "{e}");
        let mut enc = header.clone();
        enc[35] = 2; // crypt_method LUKS
        let e = try_open("enc.qcow2", &enc).unwrap_err();
        assert!(e.contains("encrypted"), "{e}");
        let mut dirty = header.clone();
        dirty[79] |= 1; // incompatible_features: dirty
        assert!(try_open("dirty.qcow2", &dirty).is_err());
        // The L1 table past the end of the file (imago would open it, and
        // its allocator recurse without end on the first write).
        let mut far = super::template();
        far[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes());
        let e = try_open("l1-far.qcow2", &far).unwrap_err();
        assert!(e.contains("L1 table") && e.contains("not inside"), "{e}");
        // A metadata cluster the refcounts say is free.
        let mut free = super::template();
        free[1024 + 7] = 0; // the L1 table's cluster (3): refcount 0
        let e = try_open("free.qcow2", &free).unwrap_err();
        assert!(e.contains("refcount 0"), "{e}");
        // A refcount block past the end of the file.
        let mut rb = super::template();
        rb[512..520].copy_from_slice(&(1u64 << 30).to_be_bytes());
        let e = try_open("rb-far.qcow2", &rb).unwrap_err();
        assert!(e.contains("refcount block 0"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// The fuzz target's starting point is an image QEMU agrees with.
    #[test]
    fn the_fuzz_template_is_a_clean_image() {
        let d = dir("template");
        let p = d.join("t.qcow2");
        std::fs::write(&p, super::template()).unwrap();
        qemu_img(&["check", "-q", p.to_str().unwrap()]);
        let disk = open(&p, false);
        assert_eq!(disk.size(), 64 << 10);
        disk.write_at(&[7; 1000], 40_000).unwrap();
        disk.flush().unwrap();
        drop(disk);
        qemu_img(&["check", "-q", p.to_str().unwrap()]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn fuzz_qcow2_image() {
        skiff_tests::fuzz::run("qcow2-image", 3_000, super::fuzz_image);
    }
}
