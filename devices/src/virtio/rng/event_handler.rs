//! The virtio-rng side of the VMM event loop.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::Rng;

const CTL: u32 = 0;
const QUEUE: u32 = 1;
const TIMER: u32 = 2;

impl Rng {
    /// Makes the epoll set match the device: the queue eventfd of the current
    /// activation is watched, an earlier one is not.
    fn sync_watch_list(&mut self, ops: &mut EventOps) {
        let stale = self.active.is_none() || self.pending_evt.is_some();
        if stale {
            if let Some(old) = self.watched_evt.take() {
                if let Err(e) = ops.remove(Events::new(&old, EventSet::IN)) {
                    log::error!("virtio-rng: cannot stop watching the queue: {e:?}");
                }
            }
        }
        if self.active.is_some() {
            if let Some(evt) = self.pending_evt.take() {
                match ops.add(Events::with_data(&evt, QUEUE, EventSet::IN)) {
                    Ok(()) => self.watched_evt = Some(evt),
                    Err(e) => log::error!("virtio-rng: cannot watch the queue: {e:?}"),
                }
            }
        }
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.ctl_evt, CTL, EventSet::IN)) {
            log::error!("virtio-rng: cannot watch its control event: {e:?}");
        }
        if let Some(l) = &self.limiter {
            if let Err(e) = ops.add(Events::with_data(l.timer(), TIMER, EventSet::IN)) {
                log::error!("virtio-rng: cannot watch the rate-limit timer: {e:?}");
            }
        }
        // Activated before the subscriber was added: watch the queue now.
        self.sync_watch_list(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            CTL => {
                let _ = self.ctl_evt.read();
                self.sync_watch_list(ops);
                // Buffers made available before we watched the queue.
                self.process_queue();
            }
            QUEUE => {
                // After a reset the old eventfd may still fire until the
                // control event removes it: drain it so epoll stays quiet.
                if let Some(evt) = &self.watched_evt {
                    let _ = evt.read();
                }
                self.process_queue();
            }
            TIMER => {
                if self.limiter.as_mut().is_some_and(|l| l.on_timer()) {
                    self.process_queue();
                }
            }
            other => log::warn!("virtio-rng: unexpected event {other}"),
        }
    }
}
