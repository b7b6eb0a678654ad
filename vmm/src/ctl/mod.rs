//! Typed control of a running machine: what QMP (and, later, the human
//! monitor) may ask of the machine and of its devices, without either side
//! knowing the other. A device that can be driven from outside offers a
//! *face* when a run builds it ([`Faces::offer`]); a monitor sends a
//! [`Command`] to the device that takes it, by id or by what it takes.
//! The machine itself (quit, reset, status) is a [`MachineControl`].

use std::sync::Arc;

pub mod keys;

/// A key press or release, by QEMU's key name (`qcode`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyEvent {
    pub qcode: String,
    pub down: bool,
}

/// What a monitor asks of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Press the ACPI power button (`system_powerdown`).
    PowerButton,
    /// Key events, in order (`input-send-event`).
    Keys(Vec<KeyEvent>),
    /// Asks the guest to keep this many bytes of RAM (`balloon`).
    BalloonTarget(u64),
    /// How much RAM the guest keeps now (`query-balloon`).
    QueryBalloon,
    /// Plugs a NIC's cable in or pulls it (`set_link`).
    SetLink { up: bool },
    /// A host port forwarded to the guest from now on (`hostfwd_add`).
    HostFwdAdd(crate::config::HostFwd),
    /// A forwarded host port let go (`hostfwd_remove`).
    HostFwdRemove { udp: bool, addr: std::net::Ipv4Addr, port: u16 },
}

impl Command {
    /// What a face must take to receive it.
    pub fn class(&self) -> Class {
        match self {
            Command::PowerButton => Class::PowerButton,
            Command::Keys(_) => Class::Keyboard,
            Command::BalloonTarget(_) | Command::QueryBalloon => Class::Balloon,
            Command::SetLink { .. } => Class::Link,
            Command::HostFwdAdd(_) | Command::HostFwdRemove { .. } => Class::UserNet,
        }
    }
}

/// The classes of commands a face may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    PowerButton,
    Keyboard,
    Balloon,
    /// A NIC's link, addressed by name.
    Link,
    /// User networking's forwarded ports.
    UserNet,
}

impl Class {
    /// How QEMU words the lack of such a device.
    fn missing(self) -> &'static str {
        match self {
            Class::PowerButton => "no ACPI power button (the machine has acpi=off)",
            Class::Keyboard => "no keyboard (add -device i8042 or virtio-keyboard-pci)",
            // QEMU's words (qmp_balloon's DeviceNotActive).
            Class::Balloon => "No balloon device has been activated",
            Class::Link => "no such network device",
            Class::UserNet => "no user networking (-netdev user)",
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    NoDevice(&'static str),
    /// No device answers to the name a command gave.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Failed(String),
}

/// What a device says back to a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Done,
    /// The guest's RAM less what its balloon holds, in bytes.
    Balloon {
        actual: u64,
    },
    /// Done, with a line for a human (the monitor's).
    Message(String),
}

/// A device's control face.
pub trait DeviceControl: Send + Sync {
    /// The classes of commands it takes.
    fn classes(&self) -> &'static [Class];
    /// Carries out a command of one of its classes.
    fn command(&self, cmd: &Command) -> Result<Answer, CtlError>;
    /// Whether it takes commands now: a device whose guest driver is not
    /// running yields to the next of its class (QEMU sends keys to the
    /// virtio keyboard once its driver runs, else to the PS/2 one).
    fn ready(&self) -> bool {
        true
    }
}

struct Face {
    ctl: Arc<dyn DeviceControl>,
    /// What a command may call it by (`set_link NAME`).
    names: Vec<String>,
}

/// The faces of one run's devices.
#[derive(Clone, Default)]
pub struct Faces(Arc<Vec<Face>>);

impl Faces {
    /// Adds a device's face (while the run is being built).
    pub fn offer(&mut self, ctl: Arc<dyn DeviceControl>) {
        self.offer_named(Vec::new(), ctl);
    }

    /// Adds a face a command may address by any of `names`.
    pub fn offer_named(&mut self, names: Vec<String>, ctl: Arc<dyn DeviceControl>) {
        if let Some(faces) = Arc::get_mut(&mut self.0) {
            faces.push(Face { ctl, names });
        } else {
            // Faces are shared only once the run is built.
            devices::error_limited!("control: a face offered after the run was built is ignored");
        }
    }

    /// Sends `cmd` to the first ready device that takes its class, else
    /// the first that takes it (QEMU sends keys to the first keyboard
    /// whose driver runs, the power button to the machine's).
    pub fn send(&self, cmd: &Command) -> Result<Answer, CtlError> {
        let class = cmd.class();
        let takes = |f: &&Face| f.ctl.classes().contains(&class);
        let face = self.0.iter().filter(takes).find(|f| f.ctl.ready());
        match face.or_else(|| self.0.iter().find(takes)) {
            Some(face) => face.ctl.command(cmd),
            None => Err(CtlError::NoDevice(class.missing())),
        }
    }
}

impl Faces {
    /// Sends `cmd` to the device called `name` (QEMU's `set_link` finds a
    /// NIC by its id, its automatic name, or its netdev's id).
    pub fn send_to(&self, name: &str, cmd: &Command) -> Result<Answer, CtlError> {
        let class = cmd.class();
        let face = self
            .0
            .iter()
            .find(|f| f.ctl.classes().contains(&class) && f.names.iter().any(|n| n == name));
        match face {
            Some(f) => f.ctl.command(cmd),
            // QEMU's words (qmp_set_link).
            None => Err(CtlError::NotFound(format!("Device '{name}' not found"))),
        }
    }
}

/// What a device tells the monitors of its own accord (QMP events).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// The balloon moved: the guest keeps `actual` bytes (`BALLOON_CHANGE`).
    BalloonChange { actual: u64 },
}

impl Notice {
    /// A newer notice of the same kind makes this one stale.
    fn supersedes(&self, older: &Notice) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(older)
    }
}

/// Notices on their way from devices (any thread) to the monitors (the
/// event loop, woken through `eventfd`). A notice replaces a queued one of
/// its kind, so a guest that moves its balloon a million times queues one.
pub struct Notices {
    queue: std::sync::Mutex<Vec<Notice>>,
    wake: vmm_sys_util::eventfd::EventFd,
}

impl Notices {
    pub fn new() -> std::io::Result<Self> {
        let wake = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        Ok(Notices { queue: std::sync::Mutex::new(Vec::new()), wake })
    }

    pub fn post(&self, n: Notice) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.retain(|old| !n.supersedes(old));
        q.push(n);
        drop(q);
        if let Err(e) = self.wake.write(1) {
            devices::error_limited!("control: cannot wake the monitors: {e}");
        }
    }

    /// Everything posted since the last call, oldest first.
    pub fn take(&self) -> Vec<Notice> {
        let _ = self.wake.read();
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn eventfd(&self) -> &vmm_sys_util::eventfd::EventFd {
        &self.wake
    }
}

/// The machine's own controls.
pub trait MachineControl: Send + Sync {
    /// Ends the process (`quit`).
    fn quit(&self);
    /// Resets the machine as the reset button would (`system_reset`).
    fn reset(&self);
    /// Whether the guest runs (nothing has decided the run's end yet).
    fn running(&self) -> bool;
}

/// What a monitor gets for one run: the machine, its devices' faces, and
/// the `id=`s of its devices (what a command's `device` may name).
#[derive(Clone)]
pub struct Controls {
    pub machine: Arc<dyn MachineControl>,
    pub faces: Faces,
    pub device_ids: Arc<[String]>,
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    struct Recorder {
        classes: &'static [Class],
        got: Mutex<Vec<Command>>,
    }

    impl DeviceControl for Recorder {
        fn classes(&self) -> &'static [Class] {
            self.classes
        }
        fn command(&self, cmd: &Command) -> Result<Answer, CtlError> {
            self.got.lock().unwrap().push(cmd.clone());
            Ok(Answer::Done)
        }
    }

    fn recorder(classes: &'static [Class]) -> Arc<Recorder> {
        Arc::new(Recorder { classes, got: Mutex::new(Vec::new()) })
    }

    #[test]
    fn commands_reach_the_first_device_that_takes_their_class() {
        let ged = recorder(&[Class::PowerButton]);
        let kbd = recorder(&[Class::Keyboard]);
        let kbd2 = recorder(&[Class::Keyboard]);
        let mut faces = Faces::default();
        faces.offer(ged.clone());
        faces.offer(kbd.clone());
        faces.offer(kbd2.clone());
        let keys = Command::Keys(vec![KeyEvent { qcode: "a".into(), down: true }]);
        faces.send(&Command::PowerButton).unwrap();
        faces.send(&keys).unwrap();
        assert_eq!(*ged.got.lock().unwrap(), [Command::PowerButton]);
        assert_eq!(kbd.got.lock().unwrap()[..], [keys.clone()][..], "the first keyboard");
        assert!(kbd2.got.lock().unwrap().is_empty());
        let none = Faces::default();
        assert!(matches!(none.send(&keys), Err(CtlError::NoDevice(_))));
    }

    /// A notice replaces a queued one of its kind; the eventfd says there
    /// is something to take.
    #[test]
    fn notices_coalesce_by_kind() {
        let n = Notices::new().unwrap();
        assert!(n.take().is_empty());
        n.post(Notice::BalloonChange { actual: 3 });
        n.post(Notice::BalloonChange { actual: 2 });
        assert_eq!(n.eventfd().read().unwrap(), 2);
        n.post(Notice::BalloonChange { actual: 1 });
        assert_eq!(n.take(), [Notice::BalloonChange { actual: 1 }]);
        assert!(n.eventfd().read().is_err(), "taken: nothing to wake for");
    }
}
