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

/// What imago does not check: an encrypted image (its clusters would be
/// read as plain data).
fn check_header(file: &File) -> io::Result<()> {
    let mut h = [0u8; 36];
    file.read_exact_at(&mut h, 0).map_err(|e| {
        io::Error::new(io::ErrorKind::InvalidData, format!("qcow2 header unreadable: {e}"))
    })?;
    if h[0..4] != MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a qcow2 image"));
    }
    let crypt = u32::from_be_bytes([h[32], h[33], h[34], h[35]]);
    if crypt != 0 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("encrypted qcow2 images are not supported (crypt_method {crypt})"),
        ));
    }
    Ok(())
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
        std::fs::remove_dir_all(&d).unwrap();
    }
}
