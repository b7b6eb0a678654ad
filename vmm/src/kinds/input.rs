//! `-device virtio-keyboard-pci|virtio-keyboard-device|virtio-keyboard`: a
//! virtio-input keyboard, fed by the monitors (`sendkey`,
//! `input-send-event`) through the keyboard face; it takes the keys while
//! its guest driver runs, the i8042 otherwise (as QEMU's input routing).

use std::sync::{Arc, Mutex};

use devices::virtio::input::{Keyboard, KeyboardHandle};

use super::{Built, Bus, Device, Driver, HostSide, Kind, OpenContext, OpenError, RunContext};
use super::{Sandbox, Unresolved};
use crate::cli::{CliError, QemuOpts};
use crate::ctl::{keys, Answer, Class, Command, CtlError, DeviceControl};

pub struct InputKind;
pub static KIND: InputKind = InputKind;

impl Kind for InputKind {
    fn name(&self) -> &'static str {
        devices::virtio::input::FAMILY
    }
    fn drivers(&self) -> &'static [Driver] {
        &[
            Driver { name: "virtio-keyboard-pci", bus: Bus::VirtioPci },
            // QEMU's alias on x86 (qemu-vm.nix's form).
            Driver { name: "virtio-keyboard", bus: Bus::VirtioPci },
            Driver { name: "virtio-keyboard-device", bus: Bus::VirtioMmio },
        ]
    }
    fn help(&self) -> &'static str {
        "\
-device virtio-keyboard-device|virtio-keyboard-pci|virtio-keyboard[,addr=..][,id=ID]
                         a virtio-input keyboard for sendkey/input-send-event
                         (it takes keys while its driver runs, the i8042
                         otherwise); virtio-keyboard is virtio-keyboard-pci
"
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox::default()
    }
    fn parse(&self, _: &mut QemuOpts, _: Bus) -> Result<Box<dyn Unresolved>, CliError> {
        Ok(Box::new(VirtioKeyboard))
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct VirtioKeyboard;

impl Device for VirtioKeyboard {
    fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn HostSide>, OpenError> {
        let handle = KeyboardHandle::new()
            .map_err(|e| OpenError::new(format!("-device {}", ctx.driver), e))?;
        Ok(Box::new(Opened(handle)))
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox::default()
    }
}

/// The keyboard's key queue, kept across reboots (the face of each run's
/// device feeds it).
struct Opened(KeyboardHandle);

impl HostSide for Opened {
    fn build(&self, run: &mut RunContext<'_>) -> crate::vm::Result<Built> {
        let kbd = Keyboard::new(self.0.clone(), keys::linux_codes());
        run.faces.offer(Arc::new(Face(self.0.clone())));
        Ok(Built::Virtio(Arc::new(Mutex::new(kbd))))
    }
}

struct Face(KeyboardHandle);

impl DeviceControl for Face {
    fn classes(&self) -> &'static [Class] {
        &[Class::Keyboard]
    }
    fn ready(&self) -> bool {
        self.0.active()
    }
    fn command(&self, cmd: &Command) -> Result<Answer, CtlError> {
        let Command::Keys(events) = cmd else {
            return Err(CtlError::Failed("a keyboard takes only key events".into()));
        };
        for ev in events {
            if let Some(code) = keys::linux_code(&ev.qcode) {
                self.0.key(code, ev.down);
            }
        }
        Ok(Answer::Done)
    }
}
