//! A VDE switch port through libvdeplug (Debian's libvdeplug2; the
//! `vde_switch` of vde2, as the NixOS test driver starts one per vlan), as
//! QEMU's `-netdev vde` opens it: `vde_open(sock, "QEMU", {port, group,
//! mode})`. The frames then go over the connection's data socket, one bare
//! Ethernet frame per datagram, which virtio-net serves as it serves user
//! networking's socket; the connection itself (the switch's control
//! socket) stays open for the process's life.

use std::ffi::{c_char, c_int, c_void, CString};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::ptr::NonNull;

#[repr(C)]
struct VdeOpenArgs {
    port: c_int,
    group: *mut c_char,
    mode: libc::mode_t,
}

/// The `interface_version` libvdeplug.h's `vde_open` macro passes.
const LIBVDEPLUG_INTERFACE_VERSION: c_int = 1;

#[link(name = "vdeplug")]
extern "C" {
    fn vde_open_real(
        url: *mut c_char,
        descr: *mut c_char,
        interface_version: c_int,
        args: *mut VdeOpenArgs,
    ) -> *mut c_void;
    fn vde_datafd(conn: *mut c_void) -> c_int;
    fn vde_close(conn: *mut c_void) -> c_int;
}

/// An open VDE connection.
pub struct VdeConn(NonNull<c_void>);

// SAFETY: the connection is used only to be opened (here), to lend its data
// descriptor (`data_socket`, here) and to be closed (drop), each by one
// thread at a time through `&mut`/`&` of this owner; libvdeplug keeps no
// thread-local state for it.
unsafe impl Send for VdeConn {}
// SAFETY: as above: shared references only read the data descriptor.
unsafe impl Sync for VdeConn {}

impl VdeConn {
    /// Connects to the switch at `sock` (a path or a libvdeplug URL),
    /// asking for `port` (0: any), with the group and mode of the port's
    /// socket QEMU passes.
    pub fn open(sock: &str, port: u32, group: Option<&str>, mode: u32) -> io::Result<Self> {
        let nul = |_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the argument");
        let url = CString::new(sock).map_err(nul)?;
        let descr = CString::new("QEMU").map_err(nul)?;
        let group = group.map(CString::new).transpose().map_err(nul)?;
        let mut args = VdeOpenArgs {
            port: c_int::try_from(port)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "port out of range"))?,
            group: group.as_ref().map_or(std::ptr::null_mut(), |g| g.as_ptr().cast_mut()),
            mode: mode as libc::mode_t,
        };
        // SAFETY: every pointer is to a live NUL-terminated string or to
        // `args`, all outliving the call; libvdeplug copies what it keeps
        // and does not write through the strings.
        let conn = unsafe {
            vde_open_real(
                url.as_ptr().cast_mut(),
                descr.as_ptr().cast_mut(),
                LIBVDEPLUG_INTERFACE_VERSION,
                &mut args,
            )
        };
        NonNull::new(conn).map(VdeConn).ok_or_else(io::Error::last_os_error)
    }

    /// A descriptor of the connection's data socket (bare frames, one per
    /// datagram), non-blocking.
    pub fn data_socket(&self) -> io::Result<OwnedFd> {
        // SAFETY: the connection is open (it is closed only on drop).
        let fd = unsafe { vde_datafd(self.0.as_ptr()) };
        if fd < 0 {
            return Err(io::Error::other("libvdeplug gave no data socket"));
        }
        // SAFETY: `fd` is the connection's, open while `self` lives; it is
        // only borrowed here to be duplicated.
        let owned = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
        let s = std::os::unix::net::UnixDatagram::from(owned);
        s.set_nonblocking(true)?;
        Ok(OwnedFd::from(s))
    }
}

impl Drop for VdeConn {
    fn drop(&mut self) {
        // SAFETY: the connection is open and dropped once.
        unsafe { vde_close(self.0.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No switch at the path: the error says what the OS said.
    #[test]
    fn a_missing_switch_is_an_error() {
        let dir = std::env::temp_dir().join(format!("skiff-vde-{}", std::process::id()));
        let e = VdeConn::open(dir.join("no-switch").to_str().unwrap(), 0, None, 0o700)
            .err()
            .expect("no switch there");
        assert!(e.raw_os_error().is_some() || e.kind() != io::ErrorKind::Other, "{e}");
        assert!(VdeConn::open("a\0b", 0, None, 0o700).is_err());
    }
}
