//! `-fsdev local` and `-virtfs local`: a host directory for a virtio-9p
//! device, with QEMU's keys and meanings (fsdev/qemu-fsdev-opts.c,
//! fsdev/file-op-9p.h).

use devices::virtio::p9::{SecurityModel, TAG_MAX};

use super::opts::QemuOpts;
use super::CliError;
use crate::config::FsdevConfig;

/// `-fsdev local,id=ID,path=DIR,security_model=MODEL[,readonly=on]`.
pub(super) fn parse_fsdev(label: &str, arg: &str) -> Result<FsdevConfig, CliError> {
    let mut opts = QemuOpts::parse(label, arg, Some("driver"));
    let id = opts.take_id()?.ok_or_else(|| opts.missing("id"))?;
    opts.relabel(format!("{label} id={id}"));
    let fsdev = local(&mut opts, id)?;
    opts.finish()?;
    Ok(fsdev)
}

/// `-virtfs local,path=DIR,mount_tag=TAG,security_model=MODEL[,id=ID]
/// [,readonly=on]`: an `-fsdev` (id= or else the tag) and its device.
pub(super) fn parse_virtfs(label: &str, arg: &str) -> Result<(FsdevConfig, String), CliError> {
    let mut opts = QemuOpts::parse(label, arg, Some("driver"));
    let tag = opts.take("mount_tag").ok_or_else(|| opts.missing("mount_tag"))?;
    check_tag(&opts, &tag)?;
    let id = match opts.take_id()? {
        Some(id) => id,
        None => tag.clone(),
    };
    opts.relabel(format!("{label} mount_tag={tag}"));
    let fsdev = local(&mut opts, id)?;
    opts.finish()?;
    Ok((fsdev, tag))
}

/// A mount tag as QEMU's virtio-9p takes it: not empty, at most 31 bytes.
pub(crate) fn check_tag(opts: &QemuOpts, tag: &str) -> Result<(), CliError> {
    if tag.is_empty() {
        return Err(opts.error("mount_tag must not be empty"));
    }
    if tag.len() > TAG_MAX {
        return Err(opts.error(format!(
            "mount tag '{tag}' ({} bytes) is longer than maximum ({TAG_MAX} bytes)",
            tag.len()
        )));
    }
    Ok(())
}

/// The `local` driver's keys, shared by both options.
fn local(opts: &mut QemuOpts, id: String) -> Result<FsdevConfig, CliError> {
    match opts.take("driver").as_deref() {
        Some("local") => {}
        Some(other) => {
            return Err(opts.error(format!("fsdev driver '{other}' is not supported (use local)")))
        }
        None => return Err(opts.missing("driver")),
    }
    let path = opts.take_path("path")?.ok_or_else(|| opts.missing("path"))?;
    // QEMU opens a relative path against the working directory.
    let path = std::env::current_dir().map(|d| d.join(&path)).unwrap_or(path);
    let security = match opts.take("security_model").as_deref() {
        Some("none") => SecurityModel::None,
        Some("passthrough") => SecurityModel::Passthrough,
        Some("mapped-xattr" | "mapped") => SecurityModel::MappedXattr,
        Some("mapped-file") => {
            return Err(opts.error(
                "security_model=mapped-file is not supported (use mapped-xattr, none or \
                 passthrough)",
            ))
        }
        Some(other) => {
            return Err(opts.invalid_value(
                "security_model",
                other.to_owned(),
                "passthrough, mapped-xattr, mapped-file or none",
            ))
        }
        None => {
            return Err(opts.error(
                "security_model= is required (passthrough, mapped-xattr, mapped-file or none)",
            ))
        }
    };
    let readonly = opts.take_bool("readonly")?.unwrap_or(false);
    // QEMU: "fmode and dmode are only valid for mapped security modes".
    for key in ["fmode", "dmode"] {
        if opts.contains(key) && security != SecurityModel::MappedXattr {
            return Err(opts.error(format!("{key}= is only valid for mapped security models")));
        }
        if opts.contains(key) {
            return Err(opts.error(format!(
                "{key}= is not supported (mapped-xattr creates files 0600 and directories \
                 0700 on the host)"
            )));
        }
    }
    // Written data reaches the host file at once either way.
    match opts.take("writeout").as_deref() {
        None | Some("immediate") => {}
        Some(other) => {
            return Err(opts.invalid_value("writeout", other.to_owned(), "immediate"));
        }
    }
    Ok(FsdevConfig { id, path, security, readonly })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fsdev(arg: &str) -> Result<FsdevConfig, String> {
        parse_fsdev("-fsdev", arg).map_err(|e| e.to_string())
    }

    #[test]
    fn microvm_nix_and_qemu_vm_forms() {
        let f = fsdev("local,id=fs0,path=/nix/store,security_model=none,readonly=true").unwrap();
        assert_eq!(f.id, "fs0");
        assert_eq!(f.path, std::path::Path::new("/nix/store"));
        assert!(f.readonly);
        assert_eq!(f.security, SecurityModel::None);
        let f = fsdev("local,id=fs1,path=/x,security_model=passthrough,readonly=false").unwrap();
        assert!(!f.readonly);
        assert_eq!(f.security, SecurityModel::Passthrough);
        let (f, tag) =
            parse_virtfs("-virtfs", "local,path=/nix/store,security_model=none,mount_tag=store")
                .unwrap();
        assert_eq!((f.id.as_str(), tag.as_str()), ("store", "store"));
        let (f, _) = parse_virtfs(
            "-virtfs",
            "local,path=/x,security_model=none,mount_tag=t,id=v,readonly=on",
        )
        .unwrap();
        assert_eq!(f.id, "v");
        assert!(f.readonly);
        let rel = fsdev("local,id=r,path=share,security_model=none").unwrap();
        assert!(rel.path.is_absolute() && rel.path.ends_with("share"));
        let m = fsdev("local,id=m,path=/x,security_model=mapped-xattr").unwrap();
        assert_eq!(m.security, SecurityModel::MappedXattr);
        let m = fsdev("local,id=m,path=/x,security_model=mapped").unwrap();
        assert_eq!(m.security, SecurityModel::MappedXattr, "QEMU's alias");
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let cases = [
            ("local,path=/x,security_model=none", "id"),
            ("local,id=a,security_model=none", "path"),
            ("local,id=a,path=/x", "security_model= is required"),
            ("local,id=a,path=/x,security_model=bogus", "bogus"),
            ("local,id=a,path=/x,security_model=mapped-xattr,fmode=0644", "not supported"),
            ("local,id=a,path=/x,security_model=mapped-file", "mapped-file"),
            ("proxy,id=a,path=/x,security_model=none", "'proxy'"),
            ("local,id=a,path=/x,security_model=none,fmode=0644", "fmode"),
            ("local,id=a,path=/x,security_model=none,readonly=maybe", "readonly"),
            ("local,id=a,path=/x,security_model=none,cache=loose", "cache"),
        ];
        for (arg, needle) in cases {
            let e = fsdev(arg).unwrap_err();
            assert!(e.contains(needle), "{arg}: {e}");
            assert!(e.contains("-fsdev"), "{arg}: {e}");
        }
        let long = "t".repeat(32);
        let e =
            parse_virtfs("-virtfs", &format!("local,path=/x,security_model=none,mount_tag={long}"))
                .unwrap_err()
                .to_string();
        assert!(e.contains("longer than maximum (31 bytes)"), "{e}");
        let e =
            parse_virtfs("-virtfs", "local,path=/x,security_model=none").unwrap_err().to_string();
        assert!(e.contains("mount_tag"), "{e}");
    }
}
