//! Call eventfds that KVM cannot route by itself.
//!
//! Every queue (and the config change) has a call eventfd, owned by the
//! transport. Under MSI-X, KVM routes it to the guest (irqfd) and skiff
//! never sees it. virtio-mmio and INTx need skiff: the interrupt status
//! register must say why before the line goes up. `CallRelay` watches the
//! call eventfds on the event loop, edge-triggered, and hands each signal
//! to the transport (`RelayTarget`), which latches the reason and raises
//! the line, or leaves the count alone while KVM owns that eventfd.
//!
//! In-process devices do not come this way: `VirtioInterrupt::trigger`
//! sets the status and raises the line directly. Only a backend outside
//! skiff (vhost) writes the call eventfds of a virtio-mmio or INTx device.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::VirtioInterruptType;

/// The transport side of a relay.
pub trait RelayTarget: Send + Sync {
    /// `call`, the call eventfd of `source`, was signalled. The target
    /// reads it (consuming the count) only if skiff delivers that
    /// interrupt in the current mode.
    fn relay(&self, source: VirtioInterruptType, call: &EventFd);
}

/// Watches one transport's call eventfds on the event loop.
pub struct CallRelay {
    calls: Vec<(VirtioInterruptType, EventFd)>,
    target: Arc<dyn RelayTarget>,
}

impl CallRelay {
    /// `calls` are duplicates of the transport's call eventfds (the same
    /// eventfd objects), with the interrupt each one stands for.
    pub fn new(calls: Vec<(VirtioInterruptType, EventFd)>, target: Arc<dyn RelayTarget>) -> Self {
        CallRelay { calls, target }
    }
}

impl MutEventSubscriber for CallRelay {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, (_, call)) in self.calls.iter().enumerate() {
            // Edge-triggered: a count left for KVM (a masked MSI-X vector
            // waiting in the PBA) must not wake the loop again and again.
            let set = EventSet::IN | EventSet::EDGE_TRIGGERED;
            if let Err(e) = ops.add(Events::with_data(call, i as u32, set)) {
                crate::error_limited!("virtio: cannot watch a call eventfd: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let Some((source, call)) = self.calls.get(events.data() as usize) else { return };
        debug_assert_eq!(call.as_raw_fd(), events.fd());
        self.target.relay(*source, call);
    }
}
