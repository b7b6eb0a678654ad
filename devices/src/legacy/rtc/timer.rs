//! Event-loop subscriber that gives the CMOS RTC its interrupts: a timerfd
//! armed for the next moment the RTC may raise one, re-armed whenever the
//! guest changes the enables or acknowledges (the RTC's `rearm` eventfd).
//! Nothing runs while the guest has no RTC interrupt enabled.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use super::Rtc;
use crate::legacy::EventFdTrigger;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

pub struct RtcTimer {
    rtc: Arc<Mutex<Rtc<EventFdTrigger>>>,
    timer: TimerFd,
    rearm: EventFd,
}

impl RtcTimer {
    pub fn new(rtc: Arc<Mutex<Rtc<EventFdTrigger>>>, rearm: EventFd) -> std::io::Result<Self> {
        let timer = TimerFd::new()?;
        // Non-blocking: a re-arm handled earlier in the same epoll batch can
        // clear an expiry that was reported ready; a blocking read would
        // then hang the event loop.
        let fd = timer.as_raw_fd();
        // SAFETY: F_GETFL/F_SETFL on a descriptor this struct owns.
        let rc = unsafe {
            libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK)
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RtcTimer { rtc, timer, rearm })
    }

    fn update(&mut self) {
        let next = {
            let mut rtc = self.rtc.lock().unwrap_or_else(|e| e.into_inner());
            rtc.poll();
            rtc.next_event()
        };
        let res = match next {
            Some(d) => self.timer.reset(d, None),
            None => self.timer.clear(),
        };
        if let Err(e) = res {
            crate::warn_limited!("rtc: cannot arm its timer: {e}");
        }
    }
}

impl MutEventSubscriber for RtcTimer {
    fn init(&mut self, ops: &mut EventOps) {
        for ev in [Events::new(&self.timer, EventSet::IN), Events::new(&self.rearm, EventSet::IN)] {
            if let Err(e) = ops.add(ev) {
                crate::warn_limited!("rtc: cannot watch its timer: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.rearm.as_raw_fd() {
            let _ = self.rearm.read();
        } else {
            // EAGAIN when a re-arm already consumed the expiry: nothing to do.
            let _ = self.timer.wait();
        }
        self.update();
    }
}
