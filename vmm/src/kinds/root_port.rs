//! `-device pcie-root-port[,chassis=N][,slot=N][,port=N]`: a root port on
//! the root complex; devices with `bus=ID` sit behind it.

use std::sync::{Arc, Mutex};

use pci::{RootPort, RootPortParams};

use super::{Built, Bus, Device, Driver, Facts, HostSide, Kind, Nothing, OpenContext, OpenError};
use super::{RunContext, Sandbox, Unresolved};
use crate::cli::{CliError, QemuOpts};
use crate::plan::Location;
use crate::vm::Error;

pub struct RootPortKind;
pub static KIND: RootPortKind = RootPortKind;

impl Kind for RootPortKind {
    fn name(&self) -> &'static str {
        "pcie-root-port"
    }
    fn drivers(&self) -> &'static [Driver] {
        &[Driver { name: "pcie-root-port", bus: Bus::Pci }]
    }
    fn help(&self) -> &'static str {
        "\
-device pcie-root-port,id=ID[,chassis=N][,slot=N][,port=N][,addr=..][,bus=pcie.0]
                         a root port; devices with bus=ID sit behind it
                         Every explicit addr= is reserved before any device
                         is placed automatically, whatever the order.
"
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox::default()
    }
    fn parse(&self, opts: &mut QemuOpts, _: Bus) -> Result<Box<dyn Unresolved>, CliError> {
        let chassis = opts.take_uint("chassis")?.unwrap_or(0);
        let slot = opts.take_uint("slot")?.unwrap_or(0);
        let port = opts.take_uint("port")?.unwrap_or(0);
        Ok(Box::new(Port {
            chassis: u8::try_from(chassis).map_err(|_| opts.error("chassis must be 0..255"))?,
            slot: u16::try_from(slot).map_err(|_| opts.error("slot must be 0..65535"))?,
            port: u8::try_from(port).map_err(|_| opts.error("port must be 0..255"))?,
        }))
    }
}

/// `chassis=`, `slot=`, `port=`.
#[derive(Debug, PartialEq, Eq)]
pub struct Port {
    pub chassis: u8,
    pub slot: u16,
    pub port: u8,
}

impl Device for Port {
    fn open(&self, _: &OpenContext<'_>) -> Result<Box<dyn HostSide>, OpenError> {
        let (chassis, slot, port) = (self.chassis, self.slot, self.port);
        Ok(Box::new(Nothing(move |run: &mut RunContext<'_>| {
            let Location::Pci(place) = run.location else {
                return Err(Error::Internal("a root port off the root complex".into()));
            };
            let secondary_bus = place
                .secondary_bus
                .ok_or_else(|| Error::Internal(format!("{} has no bus number", place.address)))?;
            let params = RootPortParams {
                chassis,
                slot,
                port,
                multifunction: run.multifunction,
                secondary_bus,
            };
            Ok(Built::Pci(Arc::new(Mutex::new(RootPort::new(params)))))
        })))
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox::default()
    }
    fn facts(&self) -> Facts {
        Facts { root_port: true, ..Facts::default() }
    }
}
