//! Device threads announce themselves when they start, so the VMM can
//! confine each kind (a seccomp filter) without devices knowing how.

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// A device's queue worker (its event loop).
    Worker,
    /// A block device's I/O thread (`aio=threads`): requests only.
    Io,
}

static ON_START: OnceLock<fn(ThreadKind)> = OnceLock::new();

/// Sets what every device thread runs first; the first caller wins.
pub fn on_start(hook: fn(ThreadKind)) {
    let _ = ON_START.set(hook);
}

/// Called by each device thread before it does anything else.
pub(crate) fn started(kind: ThreadKind) {
    if let Some(hook) = ON_START.get() {
        hook(kind);
    }
}
