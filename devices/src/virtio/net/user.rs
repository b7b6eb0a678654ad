//! User networking (`-netdev user`): libslirp's TCP/IP stack on a thread of
//! its own, as QEMU's slirp backend. No privileges, no host interface: the
//! guest's connections become the host's sockets; DHCP, DNS forwarding and
//! `hostfwd=` come from libslirp.
//!
//! The thread and the device meet on a datagram socket pair: the device's
//! end looks like a tap without offloads to the virtio-net queue pair (one
//! datagram, one frame behind a 12-byte virtio-net header), so the device
//! code is the same for both. The thread belongs to the process: created
//! (and its host ports bound) before the first run, so a busy port fails
//! the start, and it keeps its connections across guest reboots.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CString};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::thread::JoinHandle;
use std::time::Instant;

use libslirp_sys as sys;
use vmm_sys_util::eventfd::EventFd;

use super::tap::VNET_HDR_LEN;

/// One `hostfwd=`: a host port handed to a guest port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFwd {
    pub udp: bool,
    pub host_addr: Ipv4Addr,
    pub host_port: u16,
    /// None: the DHCP server's first address (QEMU's default guest).
    pub guest_addr: Option<Ipv4Addr>,
    pub guest_port: u16,
    /// As written on the command line, for messages.
    pub text: String,
}

/// `-netdev user`'s network, with QEMU's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserConfig {
    pub net: Ipv4Addr,
    pub mask: Ipv4Addr,
    pub host: Ipv4Addr,
    pub dhcp_start: Ipv4Addr,
    pub dns: Ipv4Addr,
    /// `restrict=on`: the guest reaches nothing but the host forwards.
    pub restrict: bool,
    /// `ipv6=` (on by default, as QEMU: fec0::/64, the host at fec0::2).
    pub ipv6: bool,
    pub hostname: Option<String>,
    pub hostfwd: Vec<HostFwd>,
}

impl Default for UserConfig {
    fn default() -> Self {
        UserConfig {
            net: Ipv4Addr::new(10, 0, 2, 0),
            mask: Ipv4Addr::new(255, 255, 255, 0),
            host: Ipv4Addr::new(10, 0, 2, 2),
            dhcp_start: Ipv4Addr::new(10, 0, 2, 15),
            dns: Ipv4Addr::new(10, 0, 2, 3),
            restrict: false,
            ipv6: true,
            hostname: None,
            hostfwd: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("cannot create the socket pair to the network thread")]
    Socket(#[source] io::Error),
    #[error("libslirp could not start")]
    Slirp,
    #[error("Could not set up host forwarding rule '{0}'")]
    HostFwd(String),
    #[error("cannot start the network thread")]
    Thread(#[source] io::Error),
}

/// The running network thread; dropping it stops the thread.
pub struct UserNet {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    /// Forwarding changes for the network thread (the monitors'
    /// `hostfwd_add`/`hostfwd_remove`): libslirp is the thread's alone.
    changes: std::sync::Arc<Changes>,
}

/// A forwarding change and where its outcome goes.
enum Change {
    Add(HostFwd, std::sync::mpsc::Sender<bool>),
    Remove { udp: bool, host_addr: Ipv4Addr, host_port: u16, done: std::sync::mpsc::Sender<bool> },
}

/// Changes waiting for the network thread, and its wakeup.
struct Changes {
    queue: std::sync::Mutex<Vec<Change>>,
    wake: EventFd,
    /// Where a rule without a guest address goes (the DHCP server's first).
    default_guest: Ipv4Addr,
}

/// How long a monitor waits for the network thread to carry a change out.
const CHANGE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl UserNet {
    /// Adds a forwarding rule while the network runs; false when libslirp
    /// refused it (a busy port) or the thread did not answer.
    pub fn add_hostfwd(&self, f: &HostFwd) -> bool {
        let (done, answer) = std::sync::mpsc::channel();
        self.change(Change::Add(f.clone(), done));
        answer.recv_timeout(CHANGE_WAIT).unwrap_or(false)
    }

    /// Removes the rule on `host_addr:host_port`; false when there was none.
    pub fn remove_hostfwd(&self, udp: bool, host_addr: Ipv4Addr, host_port: u16) -> bool {
        let (done, answer) = std::sync::mpsc::channel();
        self.change(Change::Remove { udp, host_addr, host_port, done });
        answer.recv_timeout(CHANGE_WAIT).unwrap_or(false)
    }

    fn change(&self, c: Change) {
        self.changes.queue.lock().unwrap_or_else(|e| e.into_inner()).push(c);
        if let Err(e) = self.changes.wake.write(1) {
            crate::error_limited!("netdev user: cannot wake the network thread: {e}");
        }
    }
}

/// Carries the waiting forwarding changes out (on the network thread).
fn apply_changes(slirp: *mut sys::Slirp, changes: &Changes) {
    let _ = changes.wake.read();
    let queue = std::mem::take(&mut *changes.queue.lock().unwrap_or_else(|e| e.into_inner()));
    for c in queue {
        match c {
            Change::Add(f, done) => {
                let guest = f.guest_addr.unwrap_or(changes.default_guest);
                // SAFETY: a live instance, on its own thread; plain values.
                let ret = unsafe {
                    sys::slirp_add_hostfwd(
                        slirp,
                        c_int::from(f.udp),
                        f.host_addr.into(),
                        c_int::from(f.host_port),
                        guest.into(),
                        c_int::from(f.guest_port),
                    )
                };
                let _ = done.send(ret >= 0);
            }
            Change::Remove { udp, host_addr, host_port, done } => {
                // SAFETY: as above.
                let ret = unsafe {
                    sys::slirp_remove_hostfwd(
                        slirp,
                        c_int::from(udp),
                        host_addr.into(),
                        c_int::from(host_port),
                    )
                };
                let _ = done.send(ret >= 0);
            }
        }
    }
}

/// A timer libslirp asked for: a callback and when it is due (ms).
struct Timer {
    cb: sys::SlirpTimerCb,
    cb_opaque: *mut c_void,
    expire_ms: Option<i64>,
}

/// What libslirp's callbacks reach through their opaque pointer; lives on
/// the network thread. Only ever reached through shared references (the
/// callbacks re-enter while the loop holds one), so the timer list sits in
/// a RefCell, borrowed for a moment at a time.
struct Stack {
    /// The network thread's end of the pair.
    wire: UnixDatagram,
    /// Frames for the guest, sent together at the end of a round of the
    /// thread's loop (`flush`): one wakeup of the device for them all.
    outbox: RefCell<Vec<Vec<u8>>>,
    timers: RefCell<Vec<*mut Timer>>,
    epoch: Instant,
}

impl Stack {
    /// Frames held at most before they go anyway.
    const OUTBOX: usize = 64;

    fn now_ns(&self) -> i64 {
        self.epoch.elapsed().as_nanos() as i64
    }

    /// Sends the held frames in one sendmmsg. A full socket drops the
    /// rest, as a busy wire would; TCP resends.
    fn flush(&self) {
        let mut outbox = self.outbox.borrow_mut();
        if outbox.is_empty() {
            return;
        }
        let frames: Vec<&[u8]> = outbox.iter().map(Vec::as_slice).collect();
        let _ = super::tap::send_datagrams(self.wire.as_raw_fd(), &frames);
        outbox.clear();
    }
}

/// The libslirp instance, moved to the network thread once set up.
struct Instance(*mut sys::Slirp);
// SAFETY: libslirp is single-threaded; the instance is used by one thread
// at a time: set up on the caller's, then only on the network thread.
unsafe impl Send for Instance {}

/// The stack, leaked from its Box for libslirp's opaque pointer and freed
/// (`Box::from_raw`) after `slirp_cleanup`.
struct StackPtr(*mut Stack);
// SAFETY: as `Instance`: the stack (and the timers libslirp gave it) moves
// to the network thread with the instance and is used there only.
unsafe impl Send for StackPtr {}

/// libslirp's frames to the guest: behind a zeroed virtio-net header.
unsafe extern "C" fn send_packet(buf: *const c_void, len: usize, opaque: *mut c_void) -> isize {
    // SAFETY: `opaque` is the thread's `Stack` (slirp_new), alive as long
    // as the instance; `buf` holds `len` bytes for this call.
    let (stack, frame) =
        unsafe { (&*(opaque as *const Stack), std::slice::from_raw_parts(buf as *const u8, len)) };
    let mut datagram = Vec::with_capacity(VNET_HDR_LEN + len);
    datagram.resize(VNET_HDR_LEN, 0);
    datagram.extend_from_slice(frame);
    let full = {
        let mut outbox = stack.outbox.borrow_mut();
        outbox.push(datagram);
        outbox.len() >= Stack::OUTBOX
    };
    if full {
        stack.flush();
    }
    len as isize
}

unsafe extern "C" fn guest_error(msg: *const c_char, _opaque: *mut c_void) {
    // SAFETY: libslirp passes a NUL-terminated message.
    let msg = unsafe { std::ffi::CStr::from_ptr(msg) }.to_string_lossy();
    crate::error_limited!("-netdev user: {msg}");
}

unsafe extern "C" fn clock_get_ns(opaque: *mut c_void) -> i64 {
    // SAFETY: `opaque` is the thread's `Stack`.
    unsafe { &*(opaque as *const Stack) }.now_ns()
}

unsafe extern "C" fn timer_new(
    cb: sys::SlirpTimerCb,
    cb_opaque: *mut c_void,
    opaque: *mut c_void,
) -> *mut c_void {
    // SAFETY: `opaque` is the thread's `Stack`, alive as long as the instance.
    let stack = unsafe { &*(opaque as *const Stack) };
    let timer = Box::into_raw(Box::new(Timer { cb, cb_opaque, expire_ms: None }));
    stack.timers.borrow_mut().push(timer);
    timer.cast()
}

unsafe extern "C" fn timer_free(timer: *mut c_void, opaque: *mut c_void) {
    // SAFETY: `opaque` is the thread's `Stack`; `timer` came from
    // `timer_new` and is freed once, here.
    let stack = unsafe { &*(opaque as *const Stack) };
    let timer = timer as *mut Timer;
    stack.timers.borrow_mut().retain(|&t| t != timer);
    // SAFETY: see above.
    drop(unsafe { Box::from_raw(timer) });
}

unsafe extern "C" fn timer_mod(timer: *mut c_void, expire_ms: i64, _opaque: *mut c_void) {
    // SAFETY: `timer` came from `timer_new` and is not freed yet.
    unsafe { (*(timer as *mut Timer)).expire_ms = Some(expire_ms) };
}

unsafe extern "C" fn no_fd(_fd: c_int, _opaque: *mut c_void) {}
unsafe extern "C" fn no_notify(_opaque: *mut c_void) {}

static CALLBACKS: sys::SlirpCb = sys::SlirpCb {
    send_packet: Some(send_packet),
    guest_error: Some(guest_error),
    clock_get_ns: Some(clock_get_ns),
    timer_new: Some(timer_new),
    timer_free: Some(timer_free),
    timer_mod: Some(timer_mod),
    register_poll_fd: Some(no_fd),
    unregister_poll_fd: Some(no_fd),
    notify: Some(no_notify),
};

/// libslirp's descriptors for one poll(2), built by `slirp_pollfds_fill`.
unsafe extern "C" fn add_poll(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int {
    // SAFETY: `opaque` is the loop's pollfd vector for this round.
    let fds = unsafe { &mut *(opaque as *mut Vec<libc::pollfd>) };
    let mut ev = 0;
    for (slirp, poll) in [
        (sys::SLIRP_POLL_IN, libc::POLLIN),
        (sys::SLIRP_POLL_OUT, libc::POLLOUT),
        (sys::SLIRP_POLL_PRI, libc::POLLPRI),
    ] {
        if events & slirp != 0 {
            ev |= poll;
        }
    }
    fds.push(libc::pollfd { fd, events: ev, revents: 0 });
    (fds.len() - 1) as c_int
}

unsafe extern "C" fn get_revents(idx: c_int, opaque: *mut c_void) -> c_int {
    // SAFETY: `opaque` is the loop's pollfd vector, `idx` an index
    // `add_poll` returned this round.
    let fds = unsafe { &*(opaque as *const Vec<libc::pollfd>) };
    let Some(p) = usize::try_from(idx).ok().and_then(|i| fds.get(i)) else { return 0 };
    let mut r = 0;
    for (poll, slirp) in [
        (libc::POLLIN, sys::SLIRP_POLL_IN),
        (libc::POLLOUT, sys::SLIRP_POLL_OUT),
        (libc::POLLPRI, sys::SLIRP_POLL_PRI),
        (libc::POLLERR, sys::SLIRP_POLL_ERR),
        (libc::POLLHUP, sys::SLIRP_POLL_HUP),
    ] {
        if p.revents & poll != 0 {
            r |= slirp;
        }
    }
    r
}

impl UserNet {
    /// Starts user networking for `config`; returns the thread and the
    /// device's end of the wire.
    pub fn start(config: &UserConfig) -> Result<(UserNet, OwnedFd), UserError> {
        let (device, wire) = UnixDatagram::pair().map_err(UserError::Socket)?;
        for s in [&device, &wire] {
            s.set_nonblocking(true).map_err(UserError::Socket)?;
            set_buffers(s);
        }
        let stack = Box::into_raw(Box::new(Stack {
            wire,
            outbox: RefCell::new(Vec::new()),
            timers: RefCell::new(Vec::new()),
            epoch: Instant::now(),
        }));
        let stack = StackPtr(stack);
        let hostname = config.hostname.as_deref().map(CString::new).transpose().ok().flatten();
        let cfg = sys::SlirpConfig {
            // Version 4 reads two callbacks past the end of libslirp-sys's
            // SlirpCb (init_completed, timer_new_opaque): stay at 3.
            version: 3,
            restricted: c_int::from(config.restrict),
            in_enabled: true,
            vnetwork: config.net.into(),
            vnetmask: config.mask.into(),
            vhost: config.host.into(),
            in6_enabled: config.ipv6,
            vprefix_addr6: std::net::Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0).into(),
            vprefix_len: 64,
            vhost6: std::net::Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 2).into(),
            vhostname: hostname.as_ref().map_or(std::ptr::null(), |h| h.as_ptr()),
            tftp_server_name: std::ptr::null(),
            tftp_path: std::ptr::null(),
            bootfile: std::ptr::null(),
            vdhcp_start: config.dhcp_start.into(),
            vnameserver: config.dns.into(),
            vnameserver6: std::net::Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 3).into(),
            vdnssearch: std::ptr::null_mut(),
            vdomainname: std::ptr::null(),
            if_mtu: 0,
            if_mru: 0,
            disable_host_loopback: false,
            enable_emu: false,
            outbound_addr: std::ptr::null(),
            outbound_addr6: std::ptr::null(),
            disable_dns: false,
            disable_dhcp: false,
        };
        let opaque = stack.0.cast::<c_void>();
        // SAFETY: the config and callbacks are valid for the call (libslirp
        // copies the strings); `opaque` points to the boxed stack, which
        // lives until after slirp_cleanup.
        let slirp = unsafe { sys::slirp_new(&cfg, &CALLBACKS, opaque) };
        if slirp.is_null() {
            // SAFETY: libslirp holds no pointer to the stack.
            drop(unsafe { Box::from_raw(stack.0) });
            return Err(UserError::Slirp);
        }
        let instance = Instance(slirp);
        // Every way out before the thread owns them frees both.
        let give_up = |e: UserError| {
            // SAFETY: nothing uses the instance or the stack after this;
            // slirp_cleanup closes the forwarded ports and frees its timers
            // through the still-live stack.
            unsafe {
                sys::slirp_cleanup(instance.0);
                drop(Box::from_raw(stack.0));
            }
            e
        };
        for f in &config.hostfwd {
            let guest = f.guest_addr.unwrap_or(config.dhcp_start);
            // SAFETY: a live instance; the addresses are plain values.
            let ret = unsafe {
                sys::slirp_add_hostfwd(
                    instance.0,
                    c_int::from(f.udp),
                    f.host_addr.into(),
                    c_int::from(f.host_port),
                    guest.into(),
                    c_int::from(f.guest_port),
                )
            };
            if ret < 0 {
                return Err(give_up(UserError::HostFwd(f.text.clone())));
            }
        }
        let events = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .and_then(|stop| Ok((stop.try_clone()?, stop)));
        let (stop, stop_thread) = match events {
            Ok(pair) => pair,
            Err(e) => return Err(give_up(UserError::Thread(e))),
        };
        let wake = match EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) {
            Ok(w) => w,
            Err(e) => return Err(give_up(UserError::Thread(e))),
        };
        let changes = std::sync::Arc::new(Changes {
            queue: std::sync::Mutex::new(Vec::new()),
            wake,
            default_guest: config.dhcp_start,
        });
        let thread_changes = changes.clone();
        // If the spawn fails, the closure (and with it the instance and the
        // stack) is dropped unrun: both leak rather than be freed twice.
        let thread = std::thread::Builder::new()
            .name("netdev-user".to_owned())
            .spawn(move || {
                let (instance, stack) = (instance, stack);
                run(&instance, &stack, &stop_thread, &thread_changes);
            })
            .map_err(UserError::Thread)?;
        Ok((UserNet { stop, thread: Some(thread), changes }, OwnedFd::from(device)))
    }
}

/// Room for a few hundred frames each way, so a burst is not dropped.
fn set_buffers(s: &UnixDatagram) {
    let size: c_int = 1 << 20;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt reads an int from a valid pointer.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const c_int).cast(),
                std::mem::size_of::<c_int>() as u32,
            )
        };
    }
}

/// The network thread: frames from the device into libslirp, libslirp's
/// sockets and timers, until `stop`.
fn run(instance: &Instance, stack_ptr: &StackPtr, stop: &EventFd, changes: &Changes) {
    let slirp = instance.0;
    // SAFETY: the stack lives until the Box::from_raw below; shared
    // references only (libslirp's callbacks make their own).
    let stack = unsafe { &*stack_ptr.0 };
    let mut frames = Frames::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    // The thread starts before the VMM confines its threads: it confines
    // itself as soon as it may (within a round of this loop).
    let mut confined = false;
    loop {
        if !confined {
            confined = crate::threads::started(crate::threads::ThreadKind::Network);
        }
        fds.clear();
        fds.push(libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        fds.push(libc::pollfd { fd: stack.wire.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        fds.push(libc::pollfd { fd: changes.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        // The next timer bounds the wait.
        let now_ms = stack.now_ns() / 1_000_000;
        let mut timeout: u32 = stack
            .timers
            .borrow()
            .iter()
            // SAFETY: the timers are live until timer_free removes them.
            .filter_map(|&t| unsafe { (*t).expire_ms })
            .map(|e| (e - now_ms).clamp(0, 1000) as u32)
            .min()
            .unwrap_or(1000);
        // SAFETY: a live instance; the callback fills `fds`, passed as its
        // opaque pointer for this call only.
        unsafe {
            sys::slirp_pollfds_fill(
                slirp,
                &mut timeout,
                Some(add_poll),
                (&mut fds as *mut Vec<libc::pollfd>).cast(),
            )
        };
        // SAFETY: `fds` is a valid array of its length.
        let ret =
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout as c_int) };
        if fds[0].revents != 0 {
            break;
        }
        // The VMM may have confined its threads while this one waited:
        // narrow before touching anything the guest sent (a frame) or what
        // its connections received.
        if !confined {
            confined = crate::threads::started(crate::threads::ThreadKind::Network);
        }
        if fds[2].revents & libc::POLLIN != 0 {
            apply_changes(slirp, changes);
        }
        if fds[1].revents & libc::POLLIN != 0 {
            while let Some(n) = frames.receive(&stack.wire) {
                for payload in frames.payloads(n) {
                    // SAFETY: a live instance; the frame is valid for the call.
                    unsafe { sys::slirp_input(slirp, payload.as_ptr(), payload.len() as c_int) };
                }
            }
        }
        // SAFETY: as for fill; `fds` holds the revents of this round.
        unsafe {
            sys::slirp_pollfds_poll(
                slirp,
                c_int::from(ret < 0),
                Some(get_revents),
                (&mut fds as *mut Vec<libc::pollfd>).cast(),
            )
        };
        run_timers(stack);
        stack.flush();
    }
    // SAFETY: the instance is not used after this; the timers it frees go
    // through `timer_free` with the still-live stack, which is freed last.
    unsafe {
        sys::slirp_cleanup(slirp);
        drop(Box::from_raw(stack_ptr.0));
    }
}

/// Buffers for the device's frames, taken several per call (recvmmsg):
/// the device sends a wakeup's frames together.
struct Frames {
    bufs: Vec<Vec<u8>>,
    lens: Vec<usize>,
}

impl Frames {
    const COUNT: usize = 32;
    /// A frame the device sends: at most a 64 KiB one behind the header.
    const SIZE: usize = 65536 + VNET_HDR_LEN;

    fn new() -> Self {
        Frames { bufs: vec![vec![0; Self::SIZE]; Self::COUNT], lens: vec![0; Self::COUNT] }
    }

    /// Takes what is waiting (up to COUNT frames); None when nothing is.
    fn receive(&mut self, wire: &UnixDatagram) -> Option<usize> {
        let mut iov: Vec<libc::iovec> = self
            .bufs
            .iter_mut()
            .map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() })
            .collect();
        // SAFETY: an all-zero mmsghdr is a valid empty one.
        let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; Self::COUNT];
        for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: each header points at one iovec of `iov`, each into a
        // buffer of `bufs`; all outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                wire.as_raw_fd(),
                msgs.as_mut_ptr(),
                Self::COUNT as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            return None;
        }
        for (len, m) in self.lens.iter_mut().zip(&msgs[..n as usize]) {
            // A frame cut short (MSG_TRUNC) is dropped.
            *len = if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 { 0 } else { m.msg_len as usize };
        }
        Some(n as usize)
    }

    /// The first `n` frames' Ethernet frames, behind their headers.
    fn payloads(&self, n: usize) -> impl Iterator<Item = &[u8]> {
        self.bufs
            .iter()
            .zip(&self.lens)
            .take(n)
            .filter(|(_, &len)| len > VNET_HDR_LEN)
            .map(|(b, &len)| &b[VNET_HDR_LEN..len])
    }
}

/// Fires the timers that are due (each once per `timer_mod`).
fn run_timers(stack: &Stack) {
    let now_ms = stack.now_ns() / 1_000_000;
    let due: Vec<*mut Timer> = stack
        .timers
        .borrow()
        .iter()
        .copied()
        // SAFETY: live timers, as above.
        .filter(|&t| unsafe { (*t).expire_ms }.is_some_and(|e| e <= now_ms))
        .collect();
    for t in due {
        // A callback may free other timers: fire only those still live.
        if !stack.timers.borrow().contains(&t) {
            continue;
        }
        // SAFETY: `t` is live (checked above); its callback and opaque are
        // libslirp's own.
        unsafe {
            (*t).expire_ms = None;
            if let Some(cb) = (*t).cb {
                cb((*t).cb_opaque);
            }
        }
    }
}

impl Drop for UserNet {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    fn fwd(port: u16) -> HostFwd {
        HostFwd {
            udp: false,
            host_addr: Ipv4Addr::LOCALHOST,
            host_port: port,
            guest_addr: None,
            guest_port: 22,
            text: format!("tcp:127.0.0.1:{port}-:22"),
        }
    }

    #[test]
    fn a_busy_host_port_is_named() {
        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let config = UserConfig { hostfwd: vec![fwd(port)], ..UserConfig::default() };
        let err = UserNet::start(&config).err().expect("the port is taken");
        assert_eq!(
            err.to_string(),
            format!("Could not set up host forwarding rule 'tcp:127.0.0.1:{port}-:22'")
        );
    }

    /// Frames come several per call, in order; one cut short is dropped.
    #[test]
    fn frames_are_taken_in_batches() {
        let (dev, net) = UnixDatagram::pair().unwrap();
        set_buffers(&dev);
        set_buffers(&net);
        let mut frames = Frames::new();
        assert!(frames.receive(&net).is_none(), "nothing waiting");
        for i in 0..40u8 {
            let mut f = vec![0u8; VNET_HDR_LEN];
            f.extend([i; 60]);
            dev.send(&f).unwrap();
        }
        let mut seen = Vec::new();
        while let Some(n) = frames.receive(&net) {
            assert!(n <= Frames::COUNT);
            seen.extend(frames.payloads(n).map(|p| (p[0], p.len())));
        }
        assert_eq!(seen, (0..40u8).map(|i| (i, 60)).collect::<Vec<_>>());
        dev.send(&vec![1u8; Frames::SIZE + 1]).unwrap();
        let n = frames.receive(&net).unwrap();
        assert_eq!(frames.payloads(n).count(), 0, "a truncated frame is dropped");
    }

    /// libslirp's frames for the guest wait for the round's flush (or a
    /// full outbox), then go in order behind a zeroed header.
    #[test]
    fn frames_for_the_guest_go_together() {
        let (dev, net) = UnixDatagram::pair().unwrap();
        dev.set_nonblocking(true).unwrap();
        let stack = Stack {
            wire: net,
            outbox: RefCell::new(Vec::new()),
            timers: RefCell::new(Vec::new()),
            epoch: Instant::now(),
        };
        let opaque = &stack as *const Stack as *mut c_void;
        for i in 0..3u8 {
            let frame = [i; 60];
            // SAFETY: `opaque` is a live Stack; the frame is valid for the call.
            let n = unsafe { send_packet(frame.as_ptr().cast(), frame.len(), opaque) };
            assert_eq!(n, 60);
        }
        let mut buf = [0u8; 256];
        assert!(dev.recv(&mut buf).is_err(), "held until the flush");
        stack.flush();
        for i in 0..3u8 {
            let n = dev.recv(&mut buf).unwrap();
            assert_eq!(n, VNET_HDR_LEN + 60);
            assert_eq!(&buf[..VNET_HDR_LEN], &[0; VNET_HDR_LEN]);
            assert_eq!(buf[VNET_HDR_LEN], i, "in order");
        }
        for _ in 0..Stack::OUTBOX {
            let frame = [7u8; 60];
            // SAFETY: as above.
            unsafe { send_packet(frame.as_ptr().cast(), frame.len(), opaque) };
        }
        assert!(dev.recv(&mut buf).is_ok(), "a full outbox goes at once");
        assert!(stack.outbox.borrow().is_empty());
    }

    /// The forwarded port listens while the thread runs, and is let go
    /// when it stops.
    #[test]
    fn a_forwarded_port_listens_until_the_thread_stops() {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let config = UserConfig { hostfwd: vec![fwd(port)], ..UserConfig::default() };
        let (net, _device) = UserNet::start(&config).unwrap();
        assert!(TcpListener::bind(("127.0.0.1", port)).is_err(), "libslirp holds the port");
        drop(net);
        assert!(TcpListener::bind(("127.0.0.1", port)).is_ok(), "released");
    }

    /// `hostfwd_add`/`hostfwd_remove` while the network runs: the port is
    /// taken and let go on the thread; a busy port and a rule that is not
    /// there say so.
    #[test]
    fn forwarding_changes_while_running() {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let (net, _device) = UserNet::start(&UserConfig::default()).unwrap();
        assert!(net.add_hostfwd(&fwd(port)));
        assert!(TcpListener::bind(("127.0.0.1", port)).is_err(), "libslirp holds the port");
        assert!(!net.add_hostfwd(&fwd(port)), "the port is taken");
        assert!(net.remove_hostfwd(false, Ipv4Addr::LOCALHOST, port));
        assert!(TcpListener::bind(("127.0.0.1", port)).is_ok(), "released");
        assert!(!net.remove_hostfwd(false, Ipv4Addr::LOCALHOST, port), "no such rule");
    }
}
