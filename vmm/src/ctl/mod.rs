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
}

impl Command {
    /// What a face must take to receive it.
    pub fn class(&self) -> Class {
        match self {
            Command::PowerButton => Class::PowerButton,
            Command::Keys(_) => Class::Keyboard,
        }
    }
}

/// The classes of commands a face may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    PowerButton,
    Keyboard,
}

impl Class {
    /// How QEMU words the lack of such a device.
    fn missing(self) -> &'static str {
        match self {
            Class::PowerButton => "no ACPI power button (the machine has acpi=off)",
            Class::Keyboard => "no keyboard (add -device i8042)",
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    NoDevice(&'static str),
    #[error("{0}")]
    Failed(String),
}

/// A device's control face.
pub trait DeviceControl: Send + Sync {
    /// The classes of commands it takes.
    fn classes(&self) -> &'static [Class];
    /// Carries out a command of one of its classes.
    fn command(&self, cmd: &Command) -> Result<(), CtlError>;
}

struct Face {
    ctl: Arc<dyn DeviceControl>,
}

/// The faces of one run's devices.
#[derive(Clone, Default)]
pub struct Faces(Arc<Vec<Face>>);

impl Faces {
    /// Adds a device's face (while the run is being built).
    pub fn offer(&mut self, ctl: Arc<dyn DeviceControl>) {
        if let Some(faces) = Arc::get_mut(&mut self.0) {
            faces.push(Face { ctl });
        } else {
            // Faces are shared only once the run is built.
            devices::error_limited!("control: a face offered after the run was built is ignored");
        }
    }

    /// Sends `cmd` to the first device that takes its class (QEMU sends
    /// keys to the first keyboard, the power button to the machine's).
    pub fn send(&self, cmd: &Command) -> Result<(), CtlError> {
        let class = cmd.class();
        match self.0.iter().find(|f| f.ctl.classes().contains(&class)) {
            Some(face) => face.ctl.command(cmd),
            None => Err(CtlError::NoDevice(class.missing())),
        }
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
        fn command(&self, cmd: &Command) -> Result<(), CtlError> {
            self.got.lock().unwrap().push(cmd.clone());
            Ok(())
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
}
