//! `-run-with user=,chroot=`: once every privileged resource is open
//! (/dev/kvm, images, sockets, the console), skiff changes root and user,
//! as QEMU does: chroot, then setgid, the supplementary groups, setuid,
//! and a check that root cannot be had back.

use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;

use crate::config::{RunAs, RunWith};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("-run-with user={0}: no such user")]
    NoSuchUser(String),
    #[error("-run-with user={user}: {call} failed: {source}")]
    Call {
        user: String,
        call: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("-run-with user={0}: root privileges could be regained after setuid")]
    StillRoot(String),
    #[error("-run-with chroot={dir}: {source}")]
    Chroot {
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

/// The user to become: name (for initgroups), uid, gid.
struct Target {
    shown: String,
    name: Option<CString>,
    uid: libc::uid_t,
    gid: libc::gid_t,
}

fn lookup(user: &RunAs) -> Result<Target, Error> {
    match user {
        RunAs::Ids { uid, gid } => {
            Ok(Target { shown: format!("{uid}:{gid}"), name: None, uid: *uid, gid: *gid })
        }
        RunAs::Name(name) => {
            let missing = || Error::NoSuchUser(name.clone());
            let c = CString::new(name.as_str()).map_err(|_| missing())?;
            // SAFETY: passwd is plain data that getpwnam_r fills.
            let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
            let mut buf = vec![0 as libc::c_char; 16 << 10];
            let mut found: *mut libc::passwd = std::ptr::null_mut();
            // SAFETY: every pointer is valid for the call; the strings it
            // stores point into `buf`, which outlives their use here.
            let rc = unsafe {
                libc::getpwnam_r(c.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found)
            };
            if rc != 0 || found.is_null() {
                return Err(missing());
            }
            // SAFETY: pw_name points into `buf`, NUL-terminated.
            let pw_name = unsafe { CStr::from_ptr(pwd.pw_name) }.to_owned();
            Ok(Target {
                shown: name.clone(),
                name: Some(pw_name),
                uid: pwd.pw_uid,
                gid: pwd.pw_gid,
            })
        }
    }
}

fn check(user: &str, call: &'static str, rc: libc::c_int) -> Result<(), Error> {
    if rc < 0 {
        return Err(Error::Call {
            user: user.to_owned(),
            call,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Does what `-run-with` asks; nothing when it asks nothing.
pub fn apply(run_with: &RunWith) -> Result<(), Error> {
    // The user is looked up first: a chroot usually has no user database.
    let target = run_with.user.as_ref().map(lookup).transpose()?;
    if let Some(dir) = &run_with.chroot {
        let err = |source| Error::Chroot { dir: dir.display().to_string(), source };
        let c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| err(std::io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::chroot(c.as_ptr()) } < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        std::env::set_current_dir("/").map_err(err)?;
    }
    let Some(t) = target else { return Ok(()) };
    let user = t.shown.as_str();
    // SAFETY: plain system calls on integers and a NUL-terminated name.
    unsafe {
        check(user, "setgid", libc::setgid(t.gid))?;
        match &t.name {
            Some(name) => check(user, "initgroups", libc::initgroups(name.as_ptr(), t.gid))?,
            None => check(user, "setgroups", libc::setgroups(1, &t.gid))?,
        }
        check(user, "setuid", libc::setuid(t.uid))?;
        if t.uid != 0 && libc::setuid(0) == 0 {
            return Err(Error::StillRoot(t.shown));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_looked_up_or_named_in_the_error() {
        let root = lookup(&RunAs::Name("root".into())).unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        let e = lookup(&RunAs::Name("no-such-user-skiff".into())).err().unwrap();
        assert_eq!(e.to_string(), "-run-with user=no-such-user-skiff: no such user");
        let ids = lookup(&RunAs::Ids { uid: 65534, gid: 65534 }).unwrap();
        assert_eq!((ids.uid, ids.gid, ids.name), (65534, 65534, None));
    }

    #[test]
    fn nothing_asked_nothing_done() {
        apply(&RunWith::default()).unwrap();
    }
}
