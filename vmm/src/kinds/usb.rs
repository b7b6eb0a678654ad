//! `-device usb-tablet[,bus=usb-bus.0]` (qemu-vm.nix adds it with `-usb` on
//! x86): skiff has no USB controller and no display, so a pointer has
//! nothing to point at. The device is accepted and left out, and skiff
//! says so on stderr when it starts, never silently.

use super::{Built, Bus, Device, Driver, HostSide, Kind, Nothing, OpenContext, OpenError};
use super::{RunContext, Sandbox, Unresolved};
use crate::cli::{CliError, QemuOpts};

pub struct UsbKind;
pub static KIND: UsbKind = UsbKind;

impl Kind for UsbKind {
    fn name(&self) -> &'static str {
        "usb-tablet"
    }
    fn drivers(&self) -> &'static [Driver] {
        &[Driver { name: "usb-tablet", bus: Bus::Fixed }]
    }
    fn help(&self) -> &'static str {
        "\
-device usb-tablet[,bus=usb-bus.0][,id=ID]
                         accepted and left out, with a line on stderr: skiff
                         has no USB controller (-usb, usb=on likewise) and no
                         display for a pointer to point at
"
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox::default()
    }
    fn parse(&self, opts: &mut QemuOpts, _: Bus) -> Result<Box<dyn Unresolved>, CliError> {
        if let Some(bus) = opts.take("bus") {
            if !bus.starts_with("usb-bus.") {
                return Err(opts.error(format!("Bus '{bus}' not found")));
            }
        }
        Ok(Box::new(Tablet))
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Tablet;

impl Device for Tablet {
    fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn HostSide>, OpenError> {
        #[expect(clippy::disallowed_macros, reason = "startup: once per usb-tablet")]
        {
            log::warn!(
                "-device {}: left out (skiff has no USB controller and no display)",
                ctx.driver
            );
        }
        Ok(Box::new(Nothing(|_: &mut RunContext<'_>| Ok(Built::Placed))))
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox::default()
    }
}
