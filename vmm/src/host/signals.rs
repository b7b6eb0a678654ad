//! Termination signals (SIGTERM, SIGINT, SIGHUP) become an eventfd the event
//! loop watches, so they end the VM from one place; and the signal that
//! kicks vCPU threads out of KVM_RUN.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

static SIGNAL_EVENTFD: AtomicI32 = AtomicI32::new(-1);
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_terminate(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    LAST_SIGNAL.store(num, Ordering::SeqCst);
    let fd = SIGNAL_EVENTFD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` outlives the call and
        // the fd stays open for the life of the process.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that interrupts a vCPU's KVM_RUN.
pub fn vcpu_kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the handlers; returns the eventfd that fires on a termination
/// signal. The eventfd is leaked on purpose: the handler may use it until
/// the process exits.
pub fn install() -> std::io::Result<&'static EventFd> {
    let evt: &'static EventFd =
        Box::leak(Box::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?));
    SIGNAL_EVENTFD.store(evt.as_raw_fd(), Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        register_signal_handler(sig, on_terminate).map_err(std::io::Error::from)?;
    }
    register_signal_handler(vcpu_kick_signal(), on_kick).map_err(std::io::Error::from)?;
    Ok(evt)
}

/// Polls `ready` every 20 ms until it yields a value, but gives up on a
/// termination signal (std's accept retries on EINTR and would never see
/// one): `Err(signal)`. For the listeners that wait for a client (`wait=on`).
pub fn poll_until_signal<T>(
    mut ready: impl FnMut() -> std::io::Result<Option<T>>,
) -> std::io::Result<Result<T, i32>> {
    loop {
        if let Some(v) = ready()? {
            return Ok(Ok(v));
        }
        if let Some(sig) = last_signal() {
            return Ok(Err(sig));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The last termination signal received, if any.
pub fn last_signal() -> Option<i32> {
    match LAST_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        n => Some(n),
    }
}
