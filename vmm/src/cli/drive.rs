//! `-drive`: a host image for a `-device virtio-blk-*,drive=ID`, with
//! QEMU's keys and meanings (blockdev.c, block/file-posix.c).

use super::opts::QemuOpts;
use super::CliError;
use crate::config::{Aio, DetectZeroes, DriveConfig};

/// `-drive [id=]..,file=PATH,if=none[,...]`.
pub(super) fn parse_drive(label: &str, arg: &str) -> Result<DriveConfig, CliError> {
    let mut opts = QemuOpts::parse(label, arg, None);
    let id = opts.take_id()?.ok_or_else(|| opts.missing("id"))?;
    opts.relabel(format!("{label} id={id}"));
    match opts.take("if").as_deref() {
        None | Some("none") => {}
        Some(other) => {
            return Err(opts.error(format!(
                "if={other} is not supported (use if=none with -device virtio-blk-pci,drive={id})"
            )))
        }
    }
    let file = opts.take_path("file")?.ok_or_else(|| opts.missing("file"))?;
    // QEMU resolves a relative path against the working directory.
    let file = std::env::current_dir().map(|d| d.join(&file)).unwrap_or(file);
    let (format_given, qcow2) = match opts.take("format").as_deref() {
        None => (false, false),
        Some("raw") => (true, false),
        Some("qcow2") => (true, true),
        Some(other) => {
            return Err(
                opts.error(format!("format={other} is not supported (only raw and qcow2 images)"))
            )
        }
    };
    let read_only = opts.take_bool("read-only")?.unwrap_or(false);
    // native (Linux AIO) is served by io_uring, the kernel's newer
    // asynchronous interface; QEMU's condition on it stays.
    let aio = opts.take("aio");
    // QEMU's cache modes: (O_DIRECT, O_DSYNC, flushes ignored).
    let (mut direct, dsync, ignore_flush) = match opts.take("cache").as_deref() {
        None | Some("writeback") => (false, false, false),
        Some("none") => (true, false, false),
        Some("writethrough") => (false, true, false),
        Some("directsync") => (true, true, false),
        Some("unsafe") => (false, false, true),
        Some(other) => {
            return Err(opts.invalid_value(
                "cache",
                other.to_owned(),
                "none, writeback, writethrough, directsync or unsafe",
            ))
        }
    };
    if let Some(d) = opts.take_bool("cache.direct")? {
        direct = d;
    }
    if let Some(no_flush) = opts.take_bool("cache.no-flush")? {
        if no_flush != ignore_flush {
            return Err(opts.error("cache.no-flush= must agree with cache="));
        }
    }
    let discard = match opts.take("discard").as_deref() {
        None | Some("ignore") | Some("off") => false,
        Some("unmap") | Some("on") => true,
        Some(other) => {
            return Err(opts.invalid_value("discard", other.to_owned(), "unmap or ignore"))
        }
    };
    let detect_zeroes = match opts.take("detect-zeroes").as_deref() {
        None | Some("off") => DetectZeroes::Off,
        Some("on") => DetectZeroes::On,
        Some("unmap") => DetectZeroes::Unmap,
        Some(other) => {
            return Err(opts.invalid_value("detect-zeroes", other.to_owned(), "off, on or unmap"))
        }
    };
    // Which -drive this is when there are several: no effect with if=none.
    let aio = match aio.as_deref() {
        None | Some("threads") => Aio::Threads,
        Some("io_uring") => Aio::IoUring,
        Some("native") if direct => Aio::IoUring,
        Some("native") => return Err(opts.error(
            "aio=native was specified, but it requires cache.direct=on, which was not specified.",
        )),
        Some(other) => {
            return Err(opts.invalid_value("aio", other.to_owned(), "io_uring, threads or native"))
        }
    };
    opts.take_uint("index")?;
    for key in ["werror", "rerror"] {
        match opts.take(key).as_deref() {
            None | Some("report") => {}
            Some(v @ ("stop" | "enospc")) => {
                return Err(opts.error(format!(
                    "{key}={v} is not supported: skiff cannot pause the VM (no QMP stop/cont); \
                     use {key}=report"
                )))
            }
            Some(other) => {
                return Err(opts.invalid_value(key, other.to_owned(), "report"));
            }
        }
    }
    let locking = match opts.take("file.locking").as_deref() {
        None | Some("on") | Some("auto") => true,
        Some("off") => false,
        Some(other) => {
            return Err(opts.invalid_value("file.locking", other.to_owned(), "on, off or auto"))
        }
    };
    opts.finish()?;
    Ok(DriveConfig {
        id,
        file,
        read_only,
        direct,
        dsync,
        ignore_flush,
        discard,
        detect_zeroes,
        locking,
        format_given,
        qcow2,
        aio,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(arg: &str) -> Result<DriveConfig, String> {
        parse_drive("-drive", arg).map_err(|e| e.to_string())
    }

    #[test]
    fn microvm_nix_forms() {
        let store =
            drive("id=store,format=raw,read-only=on,file=/nix/store.img,if=none,aio=io_uring")
                .unwrap();
        assert_eq!(store.id, "store");
        assert!(store.read_only && store.format_given && !store.direct && store.locking);
        assert_eq!(store.aio, Aio::IoUring);
        assert_eq!(drive("id=d,file=/x").unwrap().aio, Aio::Threads, "QEMU's default");
        assert_eq!(drive("id=d,file=/x,cache=none,aio=native").unwrap().aio, Aio::IoUring);
        let vol = drive("id=vda,format=raw,file=vol.img,if=none,aio=io_uring,discard=unmap,cache=none,read-only=off")
            .unwrap();
        assert!(vol.discard && vol.direct && !vol.read_only);
        assert_eq!(
            vol.file,
            std::env::current_dir().unwrap().join("vol.img"),
            "relative to the cwd"
        );
        let nixos =
            drive("index=1,id=drive1,if=none,file=/x.img,cache=writeback,werror=report").unwrap();
        assert!(!nixos.format_given && !nixos.direct);
        let ds =
            drive("id=d,file=/x,cache=directsync,detect-zeroes=unmap,file.locking=off").unwrap();
        assert!(ds.direct && ds.dsync && !ds.locking);
        assert_eq!(ds.detect_zeroes, DetectZeroes::Unmap);
        assert!(drive("id=d,file=/x,cache=unsafe").unwrap().ignore_flush);
        assert!(!drive("id=d,file=/x,cache=none,cache.direct=off").unwrap().direct);
    }

    #[test]
    fn errors_name_the_problem() {
        let err = |a: &str| drive(a).unwrap_err();
        assert_eq!(err("file=/x"), "-drive: missing property 'id'");
        assert_eq!(err("id=d"), "-drive id=d: missing property 'file'");
        assert!(drive("id=d,file=/x,format=qcow2").unwrap().qcow2);
        assert!(err("id=d,file=/x,format=vmdk").contains("format=vmdk is not supported"));
        assert!(err("id=d,file=/x,if=virtio").contains("if=virtio is not supported"));
        assert!(err("id=d,file=/x,werror=stop").contains("werror=stop is not supported"));
        assert!(err("id=d,file=/x,rerror=stop").contains("rerror=stop"));
        assert!(err("id=d,file=/x,cache=fast").contains("'cache'"));
        assert!(err("id=d,file=/x,aio=posix").contains("'aio'"));
        assert!(err("id=d,file=/x,aio=native").contains("requires cache.direct=on"));
        assert_eq!(err("id=d,file=/x,bogus=1"), "-drive id=d: unknown property 'bogus'");
    }
}
