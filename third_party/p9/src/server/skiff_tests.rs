// skiff: the server as a hostile guest drives it, through the wire format:
// names that leave the share, symlinks, read-only shares, malformed
// frames. Every request gets an answer (Rlerror when refused), never a
// panic, and nothing outside the share changes.

use std::fs;
use std::io::Cursor;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

const ROOT: u32 = 1;

/// `<tmp>/skiff-p9-<pid>-<n>/{share,outside.txt}`, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "skiff-p9-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir_all(dir.join("share/sub")).unwrap();
        fs::write(dir.join("outside.txt"), b"host secret").unwrap();
        fs::write(dir.join("share/inside.txt"), b"shared").unwrap();
        Scratch(dir)
    }

    fn share(&self) -> PathBuf {
        self.0.join("share")
    }

    fn outside(&self) -> Vec<u8> {
        fs::read(self.0.join("outside.txt")).unwrap()
    }

    fn server(&self, readonly: bool) -> Server {
        self.server_with(Config { readonly, ..Config::default() })
    }

    fn server_with(&self, cfg: Config) -> Server {
        let cfg = Config { root: self.share().into(), ..cfg };
        let mut s = Server::with_config(cfg).unwrap();
        let attach = Tattach {
            fid: ROOT,
            afid: u32::MAX,
            uname: name("root"),
            aname: name(""),
            n_uname: 1234,
        };
        assert!(matches!(call(&mut s, Tmessage::Attach(attach)), Rmessage::Attach(_)));
        s
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn name(s: &str) -> P9String {
    P9String::new(s.as_bytes()).unwrap()
}

/// Sends raw bytes; returns the answer's tag and message.
fn raw(server: &mut Server, bytes: &[u8]) -> io::Result<(u16, Rmessage)> {
    let mut out = Vec::new();
    server.handle_message(&mut Cursor::new(bytes), &mut out)?;
    let Rframe { tag, msg } = WireFormat::decode(&mut Cursor::new(out))?;
    Ok((tag, msg))
}

fn call(server: &mut Server, msg: Tmessage) -> Rmessage {
    let mut bytes = Vec::new();
    Tframe { tag: 7, msg: Ok(msg) }.encode(&mut bytes).unwrap();
    let (tag, msg) = raw(server, &bytes).unwrap();
    assert_eq!(tag, 7);
    msg
}

fn errno(msg: Rmessage) -> i32 {
    match msg {
        Rmessage::Lerror(e) => e.ecode as i32,
        other => panic!("expected Rlerror, got {other:?}"),
    }
}

fn walk(server: &mut Server, newfid: u32, names: &[&str]) -> Rmessage {
    let wnames = names.iter().map(|n| name(n)).collect();
    call(server, Tmessage::Walk(Twalk { fid: ROOT, newfid, wnames }))
}

#[test]
fn walks_stay_inside_the_share() {
    let dir = Scratch::new();
    let mut s = dir.server(false);
    assert_eq!(errno(walk(&mut s, 2, &[".."])), libc::ENOENT);
    assert_eq!(errno(walk(&mut s, 2, &["sub", "..", ".."])), libc::ENOENT);
    assert_eq!(errno(walk(&mut s, 2, &["../outside.txt"])), libc::ENOENT);
    assert_eq!(errno(walk(&mut s, 2, &["/etc"])), libc::ENOENT);
    assert_eq!(errno(walk(&mut s, 2, &["."])), libc::ENOENT);
    let deep = ["sub"; 17];
    assert_eq!(errno(walk(&mut s, 2, &deep)), libc::EINVAL);
    assert!(matches!(walk(&mut s, 2, &["sub"]), Rmessage::Walk(w) if w.wqids.len() == 1));
}

#[test]
fn symlinks_are_never_followed() {
    let dir = Scratch::new();
    std::os::unix::fs::symlink(dir.0.join("outside.txt"), dir.share().join("abs")).unwrap();
    std::os::unix::fs::symlink("../outside.txt", dir.share().join("rel")).unwrap();
    std::os::unix::fs::symlink("..", dir.share().join("up")).unwrap();
    let mut s = dir.server(false);
    for (fid, link) in [(2, "abs"), (3, "rel")] {
        assert!(matches!(walk(&mut s, fid, &[link]), Rmessage::Walk(_)));
        for flags in [P9_RDONLY, P9_RDWR, P9_WRONLY | P9_TRUNC] {
            let open = Tmessage::Lopen(Tlopen { fid, flags });
            assert_eq!(errno(call(&mut s, open)), libc::ELOOP, "{link}");
        }
        // The client reads the link itself, and resolves it on its side.
        let target = call(&mut s, Tmessage::Readlink(Treadlink { fid }));
        assert!(matches!(target, Rmessage::Readlink(_)));
    }
    // Through a symlink to a directory: not a directory to the server; the
    // walk stops at the link (a partial walk makes no fid).
    assert!(matches!(walk(&mut s, 4, &["up", "outside.txt"]), Rmessage::Walk(w) if w.wqids.len() == 1));
    let attr = Tmessage::GetAttr(Tgetattr { fid: 4, request_mask: P9_GETATTR_BASIC });
    assert_eq!(errno(call(&mut s, attr)), libc::EBADF);
    // The guest's own symlink, made and then opened.
    let ln = Tsymlink { fid: ROOT, name: name("mine"), symtgt: name("/etc/passwd"), gid: 0 };
    assert!(matches!(call(&mut s, Tmessage::Symlink(ln)), Rmessage::Symlink(_)));
    assert!(matches!(walk(&mut s, 5, &["mine"]), Rmessage::Walk(_)));
    let open = Tmessage::Lopen(Tlopen { fid: 5, flags: P9_RDWR });
    assert_eq!(errno(call(&mut s, open)), libc::ELOOP);
    assert_eq!(dir.outside(), b"host secret");
}

#[test]
fn names_that_leave_the_directory_are_refused() {
    let dir = Scratch::new();
    let mut s = dir.server(false);
    for bad in ["..", ".", "", "../x", "a/b", "/tmp/x"] {
        let create = Tlcreate { fid: ROOT, name: name(bad), flags: P9_RDWR, mode: 0o644, gid: 0 };
        assert_eq!(errno(call(&mut s, Tmessage::Lcreate(create))), libc::EINVAL, "{bad:?}");
        let mkdir = Tmkdir { dfid: ROOT, name: name(bad), mode: 0o755, gid: 0 };
        assert_eq!(errno(call(&mut s, Tmessage::Mkdir(mkdir))), libc::EINVAL, "{bad:?}");
        let unlink = Tunlinkat { dirfd: ROOT, name: name(bad), flags: 0 };
        assert_eq!(errno(call(&mut s, Tmessage::UnlinkAt(unlink))), libc::EINVAL, "{bad:?}");
        let ln = Tsymlink { fid: ROOT, name: name(bad), symtgt: name("x"), gid: 0 };
        assert_eq!(errno(call(&mut s, Tmessage::Symlink(ln))), libc::EINVAL, "{bad:?}");
    }
    // mv inside.txt ../moved.txt, and a hard link out: refused by name.
    let mv = Trenameat {
        olddirfid: ROOT,
        oldname: name("inside.txt"),
        newdirfid: ROOT,
        newname: name("../moved.txt"),
    };
    assert_eq!(errno(call(&mut s, Tmessage::RenameAt(mv))), libc::EINVAL);
    assert!(matches!(walk(&mut s, 2, &["inside.txt"]), Rmessage::Walk(_)));
    let link = Tlink { dfid: ROOT, fid: 2, name: name("../linked.txt") };
    assert_eq!(errno(call(&mut s, Tmessage::Link(link))), libc::EINVAL);
    assert!(!dir.0.join("moved.txt").exists() && !dir.0.join("linked.txt").exists());
    assert!(dir.share().join("inside.txt").exists());
}

#[test]
fn a_read_only_share_refuses_every_change() {
    let dir = Scratch::new();
    let mut s = dir.server(true);
    assert!(matches!(walk(&mut s, 2, &["inside.txt"]), Rmessage::Walk(_)));
    for flags in [P9_WRONLY, P9_RDWR, P9_RDONLY | P9_TRUNC, P9_RDONLY | P9_APPEND] {
        let open = Tmessage::Lopen(Tlopen { fid: 2, flags });
        assert_eq!(errno(call(&mut s, open)), libc::EROFS, "{flags:#o}");
    }
    let create = Tlcreate { fid: ROOT, name: name("new"), flags: P9_RDWR, mode: 0o644, gid: 0 };
    assert_eq!(errno(call(&mut s, Tmessage::Lcreate(create))), libc::EROFS);
    let mkdir = Tmkdir { dfid: ROOT, name: name("d"), mode: 0o755, gid: 0 };
    assert_eq!(errno(call(&mut s, Tmessage::Mkdir(mkdir))), libc::EROFS);
    let unlink = Tunlinkat { dirfd: ROOT, name: name("inside.txt"), flags: 0 };
    assert_eq!(errno(call(&mut s, Tmessage::UnlinkAt(unlink))), libc::EROFS);
    // Reading still works.
    let open = Tmessage::Lopen(Tlopen { fid: 2, flags: P9_RDONLY });
    assert!(matches!(call(&mut s, open), Rmessage::Lopen(_)));
    let read = Tmessage::Read(Tread { fid: 2, offset: 0, count: 64 });
    assert!(matches!(call(&mut s, read), Rmessage::Read(r) if &*r.data == b"shared"));
    assert_eq!(fs::read(dir.share().join("inside.txt")).unwrap(), b"shared");
    assert!(!dir.share().join("new").exists());
}

#[test]
fn malformed_frames_get_an_error_not_a_panic() {
    let dir = Scratch::new();
    let mut s = dir.server(false);
    // Unknown type 250, tag 9: Rlerror for that tag.
    let (tag, msg) = raw(&mut s, &[7, 0, 0, 0, 250, 9, 0]).unwrap();
    assert_eq!((tag, errno(msg)), (9, libc::EINVAL));
    // A Twalk whose body is cut short (claims 3 names, carries none).
    let (tag, msg) = raw(&mut s, &[17, 0, 0, 0, 110, 3, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0]).unwrap();
    assert_eq!((tag, errno(msg)), (3, libc::EINVAL));
    // A name with a NUL byte (one that is not UTF-8 is a name like any
    // other: here, one that does not exist).
    let mut walk = vec![0, 0, 0, 0, 110, 4, 0, 1, 0, 0, 0, 2, 0, 0, 0, 1, 0, 2, 0, 0x61, 0x00];
    walk[0] = walk.len() as u8;
    let (tag, msg) = raw(&mut s, &walk).unwrap();
    assert_eq!((tag, errno(msg)), (4, libc::EINVAL));
    let (n, last) = (walk.len(), walk.len() - 1);
    walk[last - 1..n].copy_from_slice(&[0xff, 0xfe]);
    let (tag, msg) = raw(&mut s, &walk).unwrap();
    assert_eq!((tag, errno(msg)), (4, libc::ENOENT));
    // A size smaller than the header, and a frame cut inside it: no
    // answer can name a tag; the caller drops the request.
    assert!(raw(&mut s, &[2, 0, 0, 0]).is_err());
    assert!(raw(&mut s, &[7, 0, 0]).is_err());
    // Fids that do not exist.
    let read = Tmessage::Read(Tread { fid: 99, offset: 0, count: 1 });
    assert_eq!(errno(call(&mut s, read)), libc::EBADF);
    let clunk = Tmessage::Clunk(Tclunk { fid: 99 });
    assert_eq!(errno(call(&mut s, clunk)), libc::EBADF);
    // The server still serves.
    assert!(matches!(walk_fid(&mut s), Rmessage::Walk(_)));
}

fn walk_fid(s: &mut Server) -> Rmessage {
    walk(s, 10, &["sub"])
}

fn host_xattr(path: &std::path::Path, name: &CStr) -> Option<Vec<u8>> {
    let path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut buf = [0u8; 16];
    // Safe because the kernel writes at most 16 bytes to `buf`.
    let n = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), 16) };
    (n >= 0).then(|| buf[..n as usize].to_vec())
}

fn attr(s: &mut Server, fid: u32) -> Rgetattr {
    match call(s, Tmessage::GetAttr(Tgetattr { fid, request_mask: P9_GETATTR_BASIC })) {
        Rmessage::GetAttr(a) => a,
        other => panic!("expected Rgetattr, got {other:?}"),
    }
}

#[test]
fn mapped_xattr_keeps_the_guests_owner_and_mode_in_xattrs() {
    let dir = Scratch::new();
    let mut s = dir.server_with(Config { mapped_xattr: true, ..Config::default() });
    // A file the guest creates 0644 as the attaching user (1234), group 50.
    assert!(matches!(walk(&mut s, 2, &[]), Rmessage::Walk(_)));
    let create = Tlcreate { fid: 2, name: name("f"), flags: P9_RDWR, mode: 0o644, gid: 50 };
    assert!(matches!(call(&mut s, Tmessage::Lcreate(create)), Rmessage::Lcreate(_)));
    let host = dir.share().join("f");
    let md = fs::metadata(&host).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o600, "the host file stays private");
    assert_eq!(host_xattr(&host, XATTR_UID), Some(1234u32.to_le_bytes().to_vec()));
    assert_eq!(host_xattr(&host, XATTR_GID), Some(50u32.to_le_bytes().to_vec()));
    assert_eq!(host_xattr(&host, XATTR_MODE), Some(0o100644u32.to_le_bytes().to_vec()));
    let a = attr(&mut s, 2);
    assert_eq!((a.uid, a.gid, a.mode), (1234, 50, 0o100644));
    // chown 1000:1000, chmod 0600: xattrs only.
    let set = |valid, mode, uid, gid| {
        Tmessage::SetAttr(Tsetattr {
            fid: 2,
            valid,
            mode,
            uid,
            gid,
            size: 0,
            atime_sec: 0,
            atime_nsec: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
        })
    };
    let chown = set(P9_SETATTR_UID | P9_SETATTR_GID, 0, 1000, 1000);
    assert!(matches!(call(&mut s, chown), Rmessage::SetAttr));
    assert!(matches!(call(&mut s, set(P9_SETATTR_MODE, 0o600, 0, 0)), Rmessage::SetAttr));
    let a = attr(&mut s, 2);
    assert_eq!((a.uid, a.gid, a.mode), (1000, 1000, 0o100600));
    assert_eq!(host_xattr(&host, XATTR_MODE), Some(0o100600u32.to_le_bytes().to_vec()));
    assert_eq!(fs::metadata(&host).unwrap().uid(), md.uid(), "the host owner stays");
    // A directory: 0700 on the host, the guest's mode in the xattr.
    let mkdir = Tmkdir { dfid: ROOT, name: name("d"), mode: 0o755, gid: 7 };
    assert!(matches!(call(&mut s, Tmessage::Mkdir(mkdir)), Rmessage::Mkdir(_)));
    let d = dir.share().join("d");
    assert_eq!(fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(host_xattr(&d, XATTR_MODE), Some(0o040755u32.to_le_bytes().to_vec()));
    // A file the host made shows the host's values.
    assert!(matches!(walk(&mut s, 3, &["inside.txt"]), Rmessage::Walk(_)));
    let host_md = fs::metadata(dir.share().join("inside.txt")).unwrap();
    assert_eq!(attr(&mut s, 3).uid, host_md.uid());
}

/// The share root's `..` in Treaddir is the root itself (its qid), not the
/// host directory above the share; below the root `..` is the real parent.
#[test]
fn readdir_at_the_root_reports_the_root_for_dotdot() {
    let dir = Scratch::new();
    let mut s = dir.server(false);
    let entries = |s: &mut Server, fid: u32| -> Vec<(String, u64)> {
        let open = Tmessage::Lopen(Tlopen { fid, flags: P9_RDONLY });
        assert!(matches!(call(s, open), Rmessage::Lopen(_)));
        let rd = Tmessage::Readdir(Treaddir { fid, offset: 0, count: 4096 });
        let Rmessage::Readdir(r) = call(s, rd) else { panic!("readdir") };
        let mut cur = Cursor::new(r.data.0);
        let mut out = Vec::new();
        while (cur.position() as usize) < cur.get_ref().len() {
            let d = Dirent::decode(&mut cur).unwrap();
            out.push((d.name.as_c_str().to_string_lossy().into_owned(), d.qid.path));
        }
        out
    };
    assert!(matches!(walk(&mut s, 2, &[]), Rmessage::Walk(_)));
    let root = entries(&mut s, 2);
    let ino = |list: &[(String, u64)], n: &str| list.iter().find(|(m, _)| m == n).map(|e| e.1);
    let share_ino = fs::metadata(dir.share()).unwrap().ino();
    assert_eq!(ino(&root, "."), Some(share_ino));
    assert_eq!(ino(&root, ".."), Some(share_ino), "not the host's {:?}", dir.0);
    assert!(matches!(walk(&mut s, 3, &["sub"]), Rmessage::Walk(_)));
    let sub = entries(&mut s, 3);
    assert_eq!(ino(&sub, ".."), Some(share_ino), "sub's parent is the share");
}

/// A host file whose name is not UTF-8 (Latin-1 "café") leaves its
/// directory listable, and the guest can walk to it by its bytes and read
/// it (a non-UTF-8 name made the whole directory EINVAL).
#[test]
fn names_that_are_not_utf8_are_listed_and_walked() {
    use std::os::unix::ffi::OsStrExt;
    let dir = Scratch::new();
    let latin1 = b"caf\xe9";
    fs::write(dir.share().join(std::ffi::OsStr::from_bytes(latin1)), b"beans").unwrap();
    let mut s = dir.server(false);
    assert!(matches!(walk(&mut s, 2, &[]), Rmessage::Walk(_)));
    let open = Tmessage::Lopen(Tlopen { fid: 2, flags: P9_RDONLY });
    assert!(matches!(call(&mut s, open), Rmessage::Lopen(_)));
    let rd = Tmessage::Readdir(Treaddir { fid: 2, offset: 0, count: 4096 });
    let Rmessage::Readdir(r) = call(&mut s, rd) else { panic!("readdir refused") };
    let mut cur = Cursor::new(r.data.0);
    let mut names = Vec::new();
    while (cur.position() as usize) < cur.get_ref().len() {
        names.push(Dirent::decode(&mut cur).unwrap().name.as_bytes().to_vec());
    }
    assert!(names.iter().any(|n| n == latin1), "{names:?}");
    let w = Tmessage::Walk(Twalk {
        fid: ROOT,
        newfid: 3,
        wnames: vec![P9String::new(&latin1[..]).unwrap()],
    });
    assert!(matches!(call(&mut s, w), Rmessage::Walk(_)));
    let open = Tmessage::Lopen(Tlopen { fid: 3, flags: P9_RDONLY });
    assert!(matches!(call(&mut s, open), Rmessage::Lopen(_)));
    let read = Tmessage::Read(Tread { fid: 3, offset: 0, count: 64 });
    let Rmessage::Read(r) = call(&mut s, read) else { panic!("read") };
    assert_eq!(r.data.0, b"beans");
}
