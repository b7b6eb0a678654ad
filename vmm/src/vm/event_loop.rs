//! The VMM thread's event loop for one run: QMP, termination signals and
//! the board's host-side work, until a device, a vCPU, QMP or a signal
//! decides the run is over.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use super::board::Board;
use super::control::{Control, Outcome};
use super::{io_err, Error, Result, RunEnd};
use crate::qmp::{QmpHandler, QmpServer, VmHandles};

/// Wakes the loop when the machine must stop: a device/vCPU outcome or a
/// termination signal. It only drains the eventfds; the loop reads why.
struct StopWatcher {
    control: EventFd,
    signal: EventFd,
}

impl MutEventSubscriber for StopWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [&self.control, &self.signal] {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                log::error!("event loop: cannot watch a stop eventfd: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        // Leave the counters set: `event_loop` checks the outcome itself,
        // and a level-triggered fd that stays readable costs nothing here
        // because the loop ends on the same wakeup.
        let _ = events;
    }
}

/// Runs the loop until the machine must stop. It serves QMP, signals and
/// the board's subscribers (serial input, the RTC's timer, call relays,
/// INTx resamplers); no device's data plane runs here.
pub(super) fn run(
    control: &Arc<Control>,
    signal_evt: &EventFd,
    board: Board,
    qmp: &[Arc<Mutex<QmpServer>>],
) -> Result<RunEnd> {
    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(Error::EventManager)?;
    let watcher = StopWatcher {
        control: control.eventfd().try_clone().map_err(io_err("eventfd"))?,
        signal: signal_evt.try_clone().map_err(io_err("eventfd"))?,
    };
    em.add_subscriber(Arc::new(Mutex::new(watcher)));
    for server in qmp {
        let vm = VmHandles {
            control: control.clone(),
            ged: board.ged.clone(),
            i8042: board.i8042.clone(),
        };
        em.add_subscriber(Arc::new(Mutex::new(QmpHandler::new(server.clone(), vm))));
    }
    for sub in board.subscribers {
        em.add_subscriber(sub);
    }
    loop {
        if let Some(sig) = crate::host::signals::last_signal() {
            return Ok(RunEnd::Signal(sig));
        }
        match control.outcome() {
            Some(Outcome::Guest(ev)) => return Ok(RunEnd::Guest(ev)),
            Some(Outcome::Fatal(msg)) => return Ok(RunEnd::Fatal(msg)),
            Some(Outcome::Quit) => return Ok(RunEnd::Quit),
            Some(Outcome::HostReset) => return Ok(RunEnd::HostReset),
            None => {}
        }
        em.run().map_err(Error::EventManager)?;
    }
}
