//! Interrupt moderation for a queue with requests in flight.
//!
//! A guest that keeps many requests in flight (fio at iodepth 32, a
//! filesystem's writeback) reaps what one interrupt announces and submits
//! as many again. Told of every completion at once, it reaps one or two
//! per interrupt, and each interrupt and each kick is an exit: under
//! nesting the exits, not the I/O, set the pace (2–3× QEMU's interrupts per
//! I/O was measured, and the 4 KiB rows at depth 32 lost to it). So while
//! more requests are still in flight, completions wait on the used ring
//! until they are a quarter of what is outstanding, or `HOLD` has passed;
//! with nothing left in flight the guest is told at once, so a guest that
//! waits for its only request (queue depth 1) never waits longer.
//!
//! The other half is the kicks. Woken by the first kick, the worker takes
//! the two or three requests there are and asks for a kick at the next
//! (EVENT_IDX's avail_event), so the guest kicks again at once. A queue
//! whose kicks bring `BUSY` requests or more is `Polling`: kicks stay off
//! and the worker takes what came every `POLL`, until two ticks find
//! nothing and kicks come back.

use std::io;
use std::time::Duration;

use vmm_sys_util::timerfd::TimerFd;

/// The longest a completion waits for company.
pub const HOLD: Duration = Duration::from_micros(100);

pub struct Moderation {
    /// Fires `HOLD` after the first held completion. Watched edge-triggered
    /// and never read: re-arming resets it.
    timer: TimerFd,
    armed: bool,
    /// Completions on the used ring the guest was not told of yet.
    held: usize,
}

impl Moderation {
    pub fn new() -> io::Result<Self> {
        Ok(Moderation { timer: TimerFd::new()?, armed: false, held: 0 })
    }

    pub fn timer(&self) -> &TimerFd {
        &self.timer
    }

    /// `added` completions just went on the used ring and `in_flight`
    /// requests are still out: true when the guest must be told now.
    pub fn completed(&mut self, added: usize, in_flight: usize) -> bool {
        self.held += added;
        if self.held == 0 {
            return false;
        }
        if in_flight == 0 || self.held * 4 >= self.held + in_flight {
            return self.flush();
        }
        if !self.armed {
            match self.timer.reset(HOLD, None) {
                Ok(()) => self.armed = true,
                // Without a timer nothing may wait.
                Err(e) => {
                    crate::error_limited!("virtio-blk: cannot arm the interrupt timer: {e}");
                    return self.flush();
                }
            }
        }
        false
    }

    /// The timer fired (or a stale edge of it): true if completions wait.
    pub fn expired(&mut self) -> bool {
        self.armed = false;
        std::mem::take(&mut self.held) > 0
    }

    /// Ends the wait: true if completions were held (tell the guest).
    pub fn flush(&mut self) -> bool {
        if self.armed {
            self.armed = false;
            if let Err(e) = self.timer.clear() {
                log::debug!("virtio-blk: cannot stop the interrupt timer: {e}");
            }
        }
        std::mem::take(&mut self.held) > 0
    }

    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held
    }
}

/// How often a busy queue is looked at.
pub const POLL: Duration = Duration::from_micros(200);

/// Requests one kick must bring before the queue is polled.
pub const BUSY: usize = 2;

/// Ticks that find nothing before kicks come back.
const IDLE_TICKS: u8 = 2;

pub struct Polling {
    /// Re-armed for each tick; watched edge-triggered, never read.
    timer: TimerFd,
    /// The worker watches the timer: polling may start.
    watched: bool,
    on: bool,
    idle_ticks: u8,
}

impl Polling {
    pub fn new() -> io::Result<Self> {
        Ok(Polling { timer: TimerFd::new()?, watched: false, on: false, idle_ticks: 0 })
    }

    pub fn watched(&mut self) {
        self.watched = true;
    }

    pub fn timer(&self) -> &TimerFd {
        &self.timer
    }

    /// Kicks are off and the timer runs.
    pub fn on(&self) -> bool {
        self.on
    }

    /// A kicked wakeup served `served` requests: polling starts when they
    /// were many.
    pub fn kicked(&mut self, served: usize) {
        if self.watched && !self.on && served >= BUSY {
            self.idle_ticks = 0;
            self.on = self.arm();
        }
    }

    /// A tick served `served` requests: true to go on polling (the timer
    /// is re-armed); false: the caller must serve with kicks on again.
    pub fn ticked(&mut self, served: usize) -> bool {
        self.idle_ticks = if served == 0 { self.idle_ticks + 1 } else { 0 };
        self.on = self.idle_ticks < IDLE_TICKS && self.arm();
        self.on
    }

    fn arm(&mut self) -> bool {
        match self.timer.reset(POLL, None) {
            Ok(()) => true,
            // Without a timer the guest must kick.
            Err(e) => {
                crate::error_limited!("virtio-blk: cannot arm the poll timer: {e}");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_kicks_turn_to_polling_until_two_empty_ticks() {
        let mut p = Polling::new().unwrap();
        p.kicked(BUSY);
        assert!(!p.on(), "not before the worker watches the timer");
        p.watched();
        p.kicked(BUSY - 1);
        assert!(!p.on(), "a shallow queue keeps its kicks");
        p.kicked(BUSY);
        assert!(p.on());
        assert!(p.ticked(3));
        assert!(p.ticked(0), "one empty tick");
        assert!(p.ticked(1), "work again");
        assert!(p.ticked(0));
        assert!(!p.ticked(0), "two empty ticks: kicks back");
        assert!(!p.on());
    }

    #[test]
    fn nothing_in_flight_tells_at_once() {
        let mut m = Moderation::new().unwrap();
        assert!(!m.completed(0, 0), "nothing to tell");
        assert!(m.completed(1, 0), "queue depth 1");
        assert_eq!(m.held(), 0);
    }

    #[test]
    fn a_quarter_of_the_outstanding_requests_is_told() {
        let mut m = Moderation::new().unwrap();
        // Depth 32: one done, 31 out.
        assert!(!m.completed(1, 31));
        assert!(m.armed);
        assert!(!m.completed(6, 25));
        assert!(m.completed(1, 24), "8 of 32");
        assert!(!m.armed, "the timer stops");
        // Depth 2: one of two is already a quarter.
        assert!(m.completed(1, 1));
    }

    #[test]
    fn the_timer_ends_the_wait() {
        let mut m = Moderation::new().unwrap();
        assert!(!m.completed(1, 31));
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(m.timer()),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the timer `m` owns; 10 s at most.
        let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert_eq!(n, 1, "the timer fires within HOLD");
        assert!(m.expired(), "one completion was held");
        assert!(!m.expired(), "a stale edge tells nothing");
        assert!(!m.flush());
    }
}
