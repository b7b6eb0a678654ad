//! `-netdev bridge`: QEMU's way to put a VM on a bridge without privileges.
//! A setuid helper (qemu-bridge-helper) checks /etc/qemu/bridge.conf,
//! creates a tap, adds it to the bridge and hands the tap's descriptor back
//! over a socket (SCM_RIGHTS); the VM then uses it as `-netdev tap,fd=`.
//! Run once, before the sandbox (it forks and execs).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// QEMU's default helper (Debian's qemu-system-common installs it there).
pub const DEFAULT_HELPER: &str = "/usr/lib/qemu/qemu-bridge-helper";

#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("cannot create the socket to the bridge helper")]
    Socket(#[source] io::Error),
    #[error("cannot run the bridge helper {0}")]
    Spawn(String, #[source] io::Error),
    #[error("bridge helper failed ({0}); is the bridge allowed in /etc/qemu/bridge.conf?")]
    Failed(String),
    #[error("the bridge helper sent no tap descriptor")]
    NoFd(#[source] io::Error),
}

/// Runs `helper` for bridge `br` and returns the tap descriptor it made.
/// `helper` with spaces is a shell command line, as QEMU takes it.
pub fn tap_for_bridge(helper: &str, br: &str) -> Result<OwnedFd, HelperError> {
    let (ours, theirs) = UnixStream::pair().map_err(HelperError::Socket)?;
    // The helper's end must survive exec.
    // SAFETY: F_SETFD on a descriptor this function owns.
    if unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_SETFD, 0) } < 0 {
        return Err(HelperError::Socket(io::Error::last_os_error()));
    }
    let fd_arg = format!("--fd={}", theirs.as_raw_fd());
    let br_arg = format!("--br={br}");
    let mut cmd = if helper.contains(' ') {
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!("{helper} --use-vnet {fd_arg} {br_arg}"));
        c
    } else {
        let mut c = Command::new(helper);
        c.args(["--use-vnet", &fd_arg, &br_arg]);
        c
    };
    // The helper is setuid: it gets its socket and stdio, nothing else
    // skiff holds (inherited fd= taps not adopted yet, images), as QEMU
    // closes every other descriptor in the child.
    let keep = theirs.as_raw_fd() as libc::c_uint;
    // Marked close-on-exec rather than closed, so std's own pipe that
    // reports a failed exec keeps working until the exec.
    const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
    // SAFETY: close_range is async-signal-safe and touches only the
    // child's descriptor table.
    unsafe {
        cmd.pre_exec(move || {
            libc::syscall(libc::SYS_close_range, 3u32, keep - 1, CLOSE_RANGE_CLOEXEC);
            libc::syscall(libc::SYS_close_range, keep + 1, u32::MAX, CLOSE_RANGE_CLOEXEC);
            Ok(())
        })
    };
    let mut child = cmd.spawn().map_err(|e| HelperError::Spawn(helper.to_owned(), e))?;
    drop(theirs);
    let received = receive_fd(&ours);
    let status = child.wait().map_err(|e| HelperError::Spawn(helper.to_owned(), e))?;
    if !status.success() {
        return Err(HelperError::Failed(status.to_string()));
    }
    received.map_err(HelperError::NoFd)
}

/// One descriptor sent with SCM_RIGHTS (and a byte of data).
fn receive_fd(sock: &UnixStream) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // Room for one descriptor's control message.
    let mut control = [0u64; 4];
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive
    // the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` describes buffers valid for the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "more descriptors than one"));
    }
    // SAFETY: CMSG_FIRSTHDR reads the header recvmsg filled in.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    if cmsg.is_null() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "no control message"));
    }
    // SAFETY: a non-null cmsg points into `control`, as recvmsg wrote it.
    let (level, kind) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
    if level != libc::SOL_SOCKET || kind != libc::SCM_RIGHTS {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "no SCM_RIGHTS message"));
    }
    // SAFETY: a valid cmsg header, as above; CMSG_LEN is arithmetic.
    let count = unsafe { ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4 };
    // SAFETY: the message's data holds `count` descriptors the kernel just
    // installed in this process for us: the first is the tap, any others
    // are closed.
    let fds: Vec<OwnedFd> = (0..count)
        .map(|i| unsafe {
            let at = (libc::CMSG_DATA(cmsg) as *const i32).add(i);
            OwnedFd::from_raw_fd(std::ptr::read_unaligned(at))
        })
        .collect();
    fds.into_iter()
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "an empty SCM_RIGHTS message"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in helper: a shell that sends its own stdin (a file) back
    /// over the socket is beyond sh, so the check is the failure paths and
    /// the argv; the real helper runs in the guest tests.
    #[test]
    fn a_failing_helper_is_reported() {
        let err = tap_for_bridge("/bin/false", "br0").unwrap_err();
        assert!(err.to_string().contains("bridge helper failed"), "{err}");
        let err = tap_for_bridge("/nonexistent/helper", "br0").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/helper"), "{err}");
        // The helper sees QEMU's arguments.
        let err = tap_for_bridge("sh -c 'echo \"$0 $@\" >&2; exit 3'", "br7").unwrap_err();
        assert!(err.to_string().contains("exit status: 3"), "{err}");
    }
}
