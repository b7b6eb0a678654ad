//! Device threads announce themselves when they start, so the VMM can
//! confine each kind (a seccomp filter) without devices knowing how.

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// A queue worker (its event loop) of a device of the family named
    /// (`virtio-blk`, ...).
    Worker(&'static str),
    /// A block device's I/O thread (`aio=threads`): requests only.
    Io,
    /// User networking's stack (`-netdev user`): the host's sockets.
    Network,
    /// A vhost-user connection's watchdog: a timer, and a shutdown of the
    /// socket it was handed when the backend stops answering.
    Watchdog,
}

static ON_START: OnceLock<fn(ThreadKind)> = OnceLock::new();

/// Sets what every device thread runs first; the first caller wins.
pub fn on_start(hook: fn(ThreadKind)) {
    let _ = ON_START.set(hook);
}

/// Called by each device thread before it does anything else. False when
/// no hook is set yet: a thread started before the VMM set it (user
/// networking's, which starts with the process) calls again later.
pub(crate) fn started(kind: ThreadKind) -> bool {
    match ON_START.get() {
        Some(hook) => {
            hook(kind);
            true
        }
        None => false,
    }
}
