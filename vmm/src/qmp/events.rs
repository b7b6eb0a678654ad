//! Device notices (`ctl::Notices`) as QMP events to every client, at most
//! as often as QEMU sends them: QEMU throttles `BALLOON_CHANGE` to one per
//! second (`monitor_qapi_event_conf`), sending the first at once and, of
//! those that come within the second, only the latest, when it ends.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde_json::{json, Value};
use vmm_sys_util::timerfd::TimerFd;

use super::QmpServer;
use crate::ctl::{Notice, Notices};

/// QEMU's rate for `BALLOON_CHANGE`.
const BALLOON_CHANGE_RATE: Duration = Duration::from_secs(1);

/// One event's throttle: QEMU's `monitor_qapi_event_queue` state for it.
#[derive(Debug, Default)]
struct Throttle {
    /// While the window is open: when it closes, and the latest event
    /// held back in it.
    window: Option<(Instant, Option<Value>)>,
}

impl Throttle {
    /// An event arrives: what to send now (the first of a window).
    fn offer(&mut self, data: Value, now: Instant, rate: Duration) -> Option<Value> {
        match &mut self.window {
            Some((_, held)) => {
                *held = Some(data);
                None
            }
            None => {
                self.window = Some((now + rate, None));
                Some(data)
            }
        }
    }

    /// The window closed: what was held goes out, and a new window opens
    /// behind it; with nothing held the throttle is idle again.
    fn expire(&mut self, now: Instant, rate: Duration) -> Option<Value> {
        let (end, held) = self.window.take()?;
        if now < end {
            self.window = Some((end, held));
            return None;
        }
        let held = held?;
        self.window = Some((now + rate, None));
        Some(held)
    }

    fn deadline(&self) -> Option<Instant> {
        self.window.as_ref().map(|(end, _)| *end)
    }
}

/// Sends the machine's notices to every QMP server's client. One for the
/// process (the throttle outlives a guest reboot, as QEMU's does); each
/// run's event loop takes it on.
pub struct EventRelay {
    servers: Vec<Arc<Mutex<QmpServer>>>,
    notices: Arc<Notices>,
    balloon: Throttle,
    timer: TimerFd,
}

impl EventRelay {
    pub fn new(
        servers: Vec<Arc<Mutex<QmpServer>>>,
        notices: Arc<Notices>,
    ) -> std::io::Result<Self> {
        let timer = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        Ok(EventRelay { servers, notices, balloon: Throttle::default(), timer })
    }

    fn arm(&mut self, now: Instant) {
        let wait = self.balloon.deadline().map(|d| d.saturating_duration_since(now));
        let res = match wait {
            // A zero interval would disarm the timer.
            Some(w) => self.timer.reset(w.max(Duration::from_millis(1)), None),
            None => self.timer.clear(),
        };
        if let Err(e) = res {
            devices::error_limited!("qmp: cannot arm the event throttle: {e}");
        }
    }
}

impl MutEventSubscriber for EventRelay {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.notices.eventfd().as_raw_fd(), self.timer.as_raw_fd()] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                devices::error_limited!("qmp: cannot watch for device events: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let now = Instant::now();
        if events.fd() == self.timer.as_raw_fd() {
            let _ = self.timer.wait();
            if let Some(data) = self.balloon.expire(now, BALLOON_CHANGE_RATE) {
                super::emit_all(&self.servers, "BALLOON_CHANGE", Some(data));
            }
        } else {
            for notice in self.notices.take() {
                let Notice::BalloonChange { actual } = notice;
                let data = json!({ "actual": actual });
                if let Some(data) = self.balloon.offer(data, now, BALLOON_CHANGE_RATE) {
                    super::emit_all(&self.servers, "BALLOON_CHANGE", Some(data));
                }
            }
        }
        self.arm(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU's throttle: the first at once; of what comes within the
    /// second, only the latest, when it ends; a quiet second closes it.
    #[test]
    fn throttled_as_qemu_throttles() {
        let rate = Duration::from_secs(1);
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut t = Throttle::default();
        assert_eq!(t.offer(json!(1), at(0), rate), Some(json!(1)));
        assert_eq!(t.offer(json!(2), at(100), rate), None);
        assert_eq!(t.offer(json!(3), at(200), rate), None);
        assert_eq!(t.deadline(), Some(at(1000)));
        assert_eq!(t.expire(at(999), rate), None, "early");
        assert_eq!(t.expire(at(1000), rate), Some(json!(3)));
        // A window follows the held one; nothing comes in it.
        assert_eq!(t.deadline(), Some(at(2000)));
        assert_eq!(t.expire(at(2000), rate), None);
        assert_eq!(t.deadline(), None, "idle");
        assert_eq!(t.offer(json!(4), at(2500), rate), Some(json!(4)));
    }
}
