//! The one place where "the machine must stop" is decided: devices, vCPUs
//! and signals report here, the event loop wakes on the eventfd and reads
//! the outcome. The first outcome wins; later ones (a second vCPU seeing the
//! same triple fault) are ignored.

use std::sync::Mutex;

use devices::{VmControl, VmEvent};
use vmm_sys_util::eventfd::EventFd;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Guest(VmEvent),
    /// A vCPU could not continue (KVM internal error, ...): message with registers.
    Fatal(String),
    /// QMP `quit`.
    Quit,
    /// QMP `system_reset`.
    HostReset,
}

pub struct Control {
    evt: EventFd,
    outcome: Mutex<Option<Outcome>>,
}

impl Control {
    pub fn new() -> std::io::Result<Self> {
        Ok(Control {
            evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            outcome: Mutex::new(None),
        })
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    pub fn fail(&self, msg: String) {
        self.set(Outcome::Fatal(msg));
    }

    pub fn quit(&self) {
        self.set(Outcome::Quit);
    }

    pub fn host_reset(&self) {
        self.set(Outcome::HostReset);
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, outcome: Outcome) {
        let mut slot = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(outcome);
            // An eventfd write fails only on counter overflow.
            let _ = self.evt.write(1);
        }
    }
}

impl crate::ctl::MachineControl for Control {
    fn quit(&self) {
        Control::quit(self);
    }
    fn reset(&self) {
        self.host_reset();
    }
    fn running(&self) -> bool {
        self.outcome().is_none()
    }
}

impl VmControl for Control {
    fn request(&self, event: VmEvent) {
        self.set(Outcome::Guest(event));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_outcome_wins_and_wakes() {
        let c = Control::new().unwrap();
        assert_eq!(c.outcome(), None);
        c.request(VmEvent::Exit(3));
        c.request(VmEvent::Reset);
        c.fail("x".into());
        assert_eq!(c.outcome(), Some(Outcome::Guest(VmEvent::Exit(3))));
        assert_eq!(c.eventfd().read().unwrap(), 1);
    }
}
