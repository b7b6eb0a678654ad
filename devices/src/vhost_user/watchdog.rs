//! A deadline for a backend's replies.
//!
//! The `vhost` crate's endpoint retries a read that timed out (EAGAIN) for
//! ever, so a socket timeout cannot stop a vCPU waiting on a backend that
//! stopped answering. A thread per connection, asleep unless a request
//! sequence is under way, shuts the socket down when the sequence overruns
//! its deadline: the read then fails, the request is an error and the
//! connection is down.

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    deadline: Option<Instant>,
    closing: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(super) struct Watchdog {
    shared: Arc<Shared>,
    timeout: Duration,
    thread: Option<JoinHandle<()>>,
}

/// A request sequence under way; dropping it ends the deadline.
pub(super) struct Armed(Arc<Shared>);

impl Drop for Armed {
    fn drop(&mut self) {
        self.0.lock().deadline = None;
        self.0.changed.notify_one();
    }
}

impl Watchdog {
    /// Watches `socket` (a duplicate of the connection's), setting `down`
    /// when it had to shut it.
    pub(super) fn new(
        socket: UnixStream,
        down: Arc<AtomicBool>,
        timeout: Duration,
    ) -> std::io::Result<Self> {
        let shared =
            Arc::new(Shared { state: Mutex::new(State::default()), changed: Condvar::new() });
        let watched = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-user-wd".into())
            .spawn(move || watch(&watched, &socket, &down))?;
        Ok(Watchdog { shared, timeout, thread: Some(thread) })
    }

    /// Starts the deadline for the requests made while the guard lives.
    pub(super) fn arm(&self) -> Armed {
        self.shared.lock().deadline = Some(Instant::now() + self.timeout);
        self.shared.changed.notify_one();
        Armed(self.shared.clone())
    }
}

fn watch(shared: &Shared, socket: &UnixStream, down: &AtomicBool) {
    // Started with the connection, before the VMM confines its threads: it
    // confines itself at its first wakeup after that (before it acts on a
    // deadline; `arm` wakes it for every request sequence).
    let mut confined = crate::threads::started(crate::threads::ThreadKind::Watchdog);
    let mut state = shared.lock();
    loop {
        if !confined {
            confined = crate::threads::started(crate::threads::ThreadKind::Watchdog);
        }
        if state.closing {
            return;
        }
        state = match state.deadline {
            None => shared.changed.wait(state).unwrap_or_else(|e| e.into_inner()),
            Some(d) if Instant::now() >= d => {
                crate::error_limited!(
                    "vhost-user: the backend did not answer in time; disconnecting"
                );
                down.store(true, Ordering::SeqCst);
                let _ = socket.shutdown(Shutdown::Both);
                state.deadline = None;
                state
            }
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                shared.changed.wait_timeout(state, left).unwrap_or_else(|e| e.into_inner()).0
            }
        };
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.changed.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
