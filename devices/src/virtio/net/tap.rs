//! A tap queue: one file descriptor of a TAP interface, carrying whole
//! Ethernet frames behind a 12-byte virtio-net header (IFF_VNET_HDR), so
//! checksum and segmentation offloads pass between the guest and the
//! host's stack untouched.
//!
//! A `Tap` is opened once, before the sandbox and before the first run
//! (`-netdev tap,ifname=` opens it, `fd=`/`fds=` adopts an inherited
//! descriptor, as microvm.nix's runner passes a macvtap's /dev/tapN), and
//! lives as long as the process: a guest reboot keeps the interface.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};

const TUNTAP: u32 = b'T' as u32;
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, libc::c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, libc::c_uint);
ioctl_ior_nr!(TUNGETIFF, TUNTAP, 210, libc::c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, libc::c_int);
ioctl_iow_nr!(TUNSETQUEUE, TUNTAP, 217, libc::c_int);

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_ATTACH_QUEUE: i16 = 0x0200;
const IFF_DETACH_QUEUE: i16 = 0x0400;

/// TUNSETOFFLOAD bits: what the tap may hand the guest.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// virtio-net's header as virtio 1.x has it (with `num_buffers`), on
/// every frame either way.
pub const VNET_HDR_LEN: usize = 12;

/// `struct ifreq` as TUNSETIFF/TUNGETIFF/TUNSETQUEUE read it: the name
/// and the flags; the rest of the union is padding here.
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("interface name '{0}' is empty or longer than 15 bytes")]
    Name(String),
    #[error("cannot open /dev/net/tun (is the tun module loaded?)")]
    OpenTun(#[source] io::Error),
    #[error("cannot attach to tap '{name}' (queue {queue})")]
    Attach {
        name: String,
        queue: usize,
        #[source]
        source: io::Error,
    },
    #[error("fd {0} is not a tap device")]
    NotTap(i32, #[source] io::Error),
    #[error("fd {0} is a tun (layer 3) device, not a tap")]
    NotEthernet(i32),
    #[error("fd {0} is a tap without a virtio-net header (vnet_hdr); skiff needs one")]
    NoVnetHdr(i32),
    #[error("fd {0} is not an open descriptor")]
    BadFd(i32, #[source] io::Error),
    #[error("{0} failed")]
    Ioctl(&'static str, #[source] io::Error),
}

/// One queue of a tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    /// For messages: the interface name, or `fd=N`.
    name: String,
    /// The descriptor is a datagram socket standing in for a tap (user
    /// networking's end, a VDE switch's, or a unit test's): no offloads,
    /// no queues to attach.
    socket: bool,
    /// Its datagrams are bare Ethernet frames (a VDE switch's), not
    /// frames behind the virtio-net header: the header is added on the
    /// way in and taken off on the way out.
    bare: bool,
}

impl Tap {
    /// Opens queue `queue` of tap `name` (creating the interface if it does
    /// not exist and skiff may), with a virtio-net header; `multi_queue`
    /// when the interface has several queues.
    pub fn open(name: &str, queue: usize, multi_queue: bool) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(TapError::Name(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq::default();
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req.flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if multi_queue {
            req.flags |= IFF_MULTI_QUEUE;
        }
        // SAFETY: TUNSETIFF reads an ifreq, which `req` is, and `file` is
        // the tun control device.
        let ret = unsafe { ioctl_with_ref(&file, TUNSETIFF(), &req) };
        if ret < 0 {
            let source = io::Error::last_os_error();
            return Err(TapError::Attach { name: name.to_owned(), queue, source });
        }
        let tap = Tap::new(file, name.to_owned());
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    /// Adopts `fd`, inherited from the parent (`fd=`, `fds=`): it must be
    /// a tap (tun or macvtap) with a virtio-net header.
    pub fn from_fd(fd: i32) -> Result<Tap, TapError> {
        // SAFETY: F_GETFD only reads the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::BadFd(fd, io::Error::last_os_error()));
        }
        // SAFETY: the descriptor is open (above) and the command line hands
        // it to skiff, which owns it from here on.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut req = IfReq::default();
        // SAFETY: TUNGETIFF writes an ifreq, which `req` is.
        let ret = unsafe { ioctl_with_mut_ref(&file, TUNGETIFF(), &mut req) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            // The caller still owns the number on the command line.
            std::mem::forget(file);
            return Err(TapError::NotTap(fd, e));
        }
        if req.flags & IFF_TAP == 0 {
            std::mem::forget(file);
            return Err(TapError::NotEthernet(fd));
        }
        if req.flags & IFF_VNET_HDR == 0 {
            std::mem::forget(file);
            return Err(TapError::NoVnetHdr(fd));
        }
        // Inherited descriptors may be blocking; the workers poll them.
        // SAFETY: plain flag updates on a descriptor skiff now owns.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        let tap = Tap::new(file, format!("fd={fd}"));
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    fn new(file: File, name: String) -> Tap {
        Tap { file, name, socket: false, bare: false }
    }

    /// One end of a datagram socket pair carrying frames as a tap would
    /// (behind the virtio-net header), without offloads: user networking.
    pub fn socket(fd: OwnedFd, name: &str) -> Tap {
        Tap { file: File::from(fd), name: name.to_owned(), socket: true, bare: false }
    }

    /// A datagram socket carrying bare Ethernet frames, one per datagram
    /// (a VDE switch's data socket).
    pub fn bare_socket(fd: OwnedFd, name: &str) -> Tap {
        Tap { file: File::from(fd), name: name.to_owned(), socket: true, bare: true }
    }

    /// Whether the host side takes and gives checksum and segmentation
    /// offloads (a real tap does, a socket stand-in does not).
    pub fn offloads(&self) -> bool {
        !self.socket
    }

    fn is_plain(&self) -> bool {
        self.socket
    }

    /// Whether this is user networking's socket stand-in, which takes a
    /// batch of frames in one call (`send_frames`).
    pub fn is_socket(&self) -> bool {
        self.socket
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    fn set_vnet_hdr_len(&self) -> Result<(), TapError> {
        let len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        let ret = unsafe { ioctl_with_ref(&self.file, TUNSETVNETHDRSZ(), &len) };
        if ret < 0 {
            return Err(TapError::Ioctl("TUNSETVNETHDRSZ", io::Error::last_os_error()));
        }
        Ok(())
    }

    /// What the tap may hand the guest (`TUN_F_*`): the offloads the
    /// driver accepted.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        if self.is_plain() {
            return Ok(());
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_val(
                &self.file,
                TUNSETOFFLOAD(),
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(TapError::Ioctl("TUNSETOFFLOAD", io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Attaches or detaches this queue (multi-queue taps): the host steers
    /// no frames to a detached queue, so queues the driver does not use
    /// hold none back.
    pub fn set_queue_enabled(&self, enabled: bool) -> Result<(), TapError> {
        if self.is_plain() {
            return Ok(());
        }
        let flags = if enabled { IFF_ATTACH_QUEUE } else { IFF_DETACH_QUEUE };
        let req = IfReq { flags, ..IfReq::default() };
        // SAFETY: TUNSETQUEUE reads an ifreq, which `req` is.
        let ret = unsafe { ioctl_with_ref(&self.file, TUNSETQUEUE(), &req) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            // A tap with one queue (or a macvtap) cannot detach: it has
            // nothing to steer.
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(());
            }
            return Err(TapError::Ioctl("TUNSETQUEUE", e));
        }
        Ok(())
    }

    /// Reads one frame (header included); WouldBlock when there is none.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // A bare frame goes behind an empty header (no offloads: flags,
        // GSO type and num_buffers 0; the device sets num_buffers).
        let skip = if self.bare { VNET_HDR_LEN.min(buf.len()) } else { 0 };
        let (hdr, body) = buf.split_at_mut(skip);
        // SAFETY: `body` is valid for writes of its length.
        let n = unsafe { libc::read(self.file.as_raw_fd(), body.as_mut_ptr().cast(), body.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        hdr.fill(0);
        Ok(skip + n as usize)
    }

    /// Writes one frame gathered from `iov`.
    ///
    /// # Safety
    /// Every iovec must point to memory valid for reads of its length.
    pub unsafe fn write_frame(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let bare;
        let iov = if self.bare {
            bare = without_header(iov);
            &bare[..]
        } else {
            iov
        };
        // SAFETY: the caller vouches for the buffers (a bare frame's are
        // parts of them); the count is the slice's.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Tap {
    /// Sends `frames` (datagrams, on the socket stand-in) with as few calls
    /// as it takes (sendmmsg); returns how many went. A full socket drops
    /// the rest, as a wire would.
    pub fn send_frames(&self, frames: &[&[u8]]) -> io::Result<usize> {
        if self.bare {
            let bare: Vec<&[u8]> =
                frames.iter().map(|f| f.get(VNET_HDR_LEN..).unwrap_or_default()).collect();
            return send_datagrams(self.file.as_raw_fd(), &bare);
        }
        send_datagrams(self.file.as_raw_fd(), frames)
    }
}

/// `iov` less its first `VNET_HDR_LEN` bytes (the virtio-net header a bare
/// frame goes without).
fn without_header(iov: &[libc::iovec]) -> Vec<libc::iovec> {
    let mut skip = VNET_HDR_LEN;
    let mut out = Vec::with_capacity(iov.len());
    for v in iov {
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        out.push(libc::iovec {
            // Inside the same buffer: `skip` is less than its length.
            iov_base: v.iov_base.cast::<u8>().wrapping_add(skip).cast(),
            iov_len: v.iov_len - skip,
        });
        skip = 0;
    }
    out
}

/// Sends `frames` as datagrams on socket `fd` with as few calls as it
/// takes (sendmmsg); returns how many went. A full socket drops the rest,
/// as a wire would.
pub(super) fn send_datagrams(fd: i32, frames: &[&[u8]]) -> io::Result<usize> {
    let mut iov: Vec<libc::iovec> = frames
        .iter()
        .map(|f| libc::iovec { iov_base: f.as_ptr().cast_mut().cast(), iov_len: f.len() })
        .collect();
    // SAFETY: an all-zero mmsghdr is a valid empty one.
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; frames.len()];
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut sent = 0;
    while sent < msgs.len() {
        let rest = &mut msgs[sent..];
        // SAFETY: every header points at one iovec of `iov`, which points
        // into `frames`; all outlive the call.
        let n = unsafe { libc::sendmmsg(fd, rest.as_mut_ptr(), rest.len() as u32, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock && sent > 0 {
                break;
            }
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return if sent > 0 { Ok(sent) } else { Err(e) };
        }
        sent += n as usize;
    }
    Ok(sent)
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::*;

    /// A VDE switch's socket carries bare frames: the header goes on the
    /// way in and comes off on the way out, whichever way the frame is
    /// split across buffers.
    #[test]
    fn a_bare_socket_adds_and_strips_the_header() {
        let (ours, peer) = UnixDatagram::pair().unwrap();
        let tap = Tap::bare_socket(OwnedFd::from(ours), "vde");
        peer.send(b"frame-in").unwrap();
        let mut buf = [0xffu8; 64];
        let n = tap.read_frame(&mut buf).unwrap();
        assert_eq!(n, VNET_HDR_LEN + 8);
        assert_eq!(&buf[..VNET_HDR_LEN], &[0; VNET_HDR_LEN]);
        assert_eq!(&buf[VNET_HDR_LEN..n], b"frame-in");
        // Header split over two buffers, then the frame.
        let (a, b, c) = ([1u8; 5], [2u8; 7], *b"frame-out");
        let iov = [&a[..], &b[..], &c[..]]
            .map(|p| libc::iovec { iov_base: p.as_ptr().cast_mut().cast(), iov_len: p.len() });
        // SAFETY: the iovecs point at the live arrays above.
        unsafe { tap.write_frame(&iov) }.unwrap();
        let mut got = [0u8; 64];
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], b"frame-out");
        let framed = [&[0u8; VNET_HDR_LEN][..], b"batched"].concat();
        assert_eq!(tap.send_frames(&[&framed]).unwrap(), 1);
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], b"batched");
    }
}
