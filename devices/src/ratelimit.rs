//! Log lines a guest can trigger at will, at most one a second per call
//! site, each carrying the count of those it held back (as Firecracker's
//! rate-limited logger does). What only a guest's own mistakes trigger
//! logs at debug instead; this is for what an operator must still hear
//! about, without a guest turning it into a flood (a writer that stalls on
//! a full stderr would stall the vCPU too).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// The shortest time between two lines of one call site.
pub const INTERVAL_MS: u64 = 1000;

/// One call site's state.
pub struct LogLimit {
    /// When the last line went out (ms since the first use; 0 = never).
    last: AtomicU64,
    held: AtomicU64,
}

impl LogLimit {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        LogLimit { last: AtomicU64::new(0), held: AtomicU64::new(0) }
    }

    /// Some(lines held back since the last one) when a line may go out
    /// now; None when it is held back (and counted).
    pub fn admit(&self) -> Option<u64> {
        static START: OnceLock<Instant> = OnceLock::new();
        // +1: 0 stands for "never".
        let now = START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= INTERVAL_MS)
            && self.last.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// `log::log!` at `level`, limited as `LogLimit` says.
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::LogLimit = $crate::ratelimit::LogLimit::new();
        if log::log_enabled!($level) {
            if let Some(held) = LIMIT.admit() {
                if held > 0 {
                    log::log!($level, "{} ({held} more like it held back)", format_args!($($arg)+));
                } else {
                    log::log!($level, $($arg)+);
                }
            }
        }
    }};
}

/// A warning a guest can repeat at will: at most one a second per site.
/// Plain `log::warn!` and `log::error!` are banned outside startup code
/// (`clippy.toml`).
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => { $crate::log_limited!(log::Level::Warn, $($arg)+) };
}

/// An error a guest can repeat at will: at most one a second per site.
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)+) => { $crate::log_limited!(log::Level::Error, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_and_the_count_of_the_rest() {
        let l = LogLimit::new();
        assert_eq!(l.admit(), Some(0), "the first goes out");
        for _ in 0..100_000 {
            assert_eq!(l.admit(), None);
        }
        std::thread::sleep(std::time::Duration::from_millis(INTERVAL_MS + 50));
        assert_eq!(l.admit(), Some(100_000), "then one, with the count");
        assert_eq!(l.admit(), None);
    }
}
