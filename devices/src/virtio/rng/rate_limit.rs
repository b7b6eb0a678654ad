//! QEMU's virtio-rng rate limit: at most `max-bytes` per `period` ms. A
//! bucket of `max_bytes` tokens is refilled in full one period after the
//! first byte of the window was served, as QEMU's `check_rate_limit` timer
//! does. The timer is a timerfd the device's event subscriber watches.

use std::io;
use std::time::Duration;

use vmm_sys_util::timerfd::TimerFd;

/// QEMU's default `period` (ms) when only `max-bytes` is given.
pub const DEFAULT_PERIOD_MS: u64 = 1 << 16;

/// `-device virtio-rng-*,max-bytes=N,period=MS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub max_bytes: u64,
    pub period: Duration,
}

impl RateLimit {
    /// `period_ms` None means QEMU's default. A zero period is refused, as
    /// QEMU does.
    pub fn new(max_bytes: u64, period_ms: Option<u64>) -> Option<Self> {
        let ms = period_ms.unwrap_or(DEFAULT_PERIOD_MS);
        (ms > 0).then(|| RateLimit { max_bytes, period: Duration::from_millis(ms) })
    }
}

pub(super) struct Limiter {
    cfg: RateLimit,
    remaining: u64,
    timer: TimerFd,
    /// Set before the timer is armed and cleared only once its expiration
    /// was read, so the (blocking) timerfd is read only when it has fired.
    armed: bool,
}

impl Limiter {
    pub(super) fn new(cfg: RateLimit) -> io::Result<Self> {
        let timer = TimerFd::new()?;
        // Non-blocking: a stale wakeup (the worker of an earlier run, or a
        // spurious one) must never block a worker on the read.
        let fd = std::os::fd::AsRawFd::as_raw_fd(&timer);
        // SAFETY: F_GETFL/F_SETFL on a descriptor `timer` owns.
        let rc = unsafe {
            libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK)
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Limiter { cfg, remaining: cfg.max_bytes, timer, armed: false })
    }

    pub(super) fn timer(&self) -> &TimerFd {
        &self.timer
    }

    /// Bytes that may be served now.
    pub(super) fn available(&self) -> u64 {
        self.remaining
    }

    /// Spends `bytes` (at most `available()`) and starts the window's timer
    /// if it is not running. Called with 0 when the queue is held back, so
    /// an empty bucket always has a refill coming.
    pub(super) fn consume(&mut self, bytes: u64) {
        self.remaining = self.remaining.saturating_sub(bytes);
        if !self.armed {
            match self.timer.reset(self.cfg.period, None) {
                Ok(()) => self.armed = true,
                Err(e) => crate::error_limited!("virtio-rng: cannot arm the rate-limit timer: {e}"),
            }
        }
    }

    /// The timer fired: refill the bucket. Returns false on a spurious wakeup.
    pub(super) fn on_timer(&mut self) -> bool {
        if !self.armed {
            return false;
        }
        match self.timer.wait() {
            Ok(_) => {}
            // Not expired after all (a stale wakeup): keep waiting.
            Err(e) if e.errno() == libc::EAGAIN => return false,
            Err(e) => crate::error_limited!("virtio-rng: cannot read the rate-limit timer: {e}"),
        }
        self.armed = false;
        self.remaining = self.cfg.max_bytes;
        true
    }

    #[cfg(test)]
    pub(super) fn is_armed(&self) -> bool {
        self.armed
    }

    /// What the worker does when the timer fires, once it has (tests).
    #[cfg(test)]
    pub(super) fn wait_and_refill(&mut self) -> bool {
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.timer),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the timer this struct owns.
        unsafe { libc::poll(&mut pfd, 1, 10_000) };
        self.on_timer()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_defaults() {
        let r = RateLimit::new(1024, None).unwrap();
        assert_eq!(r.period, Duration::from_millis(65536));
        assert_eq!(RateLimit::new(1024, Some(0)), None);
    }

    #[test]
    fn bucket_refills_when_the_timer_fires() {
        let mut l = Limiter::new(RateLimit::new(100, Some(1)).unwrap()).unwrap();
        assert!(!l.on_timer(), "nothing armed yet");
        l.consume(60);
        assert!(l.is_armed());
        l.consume(60);
        assert_eq!(l.available(), 0);
        assert!(l.wait_and_refill());
        assert!(!l.is_armed());
        assert_eq!(l.available(), 100);
    }
}
