//! `-device isa-debug-exit[,iobase=PORT][,iosize=N]`: a guest write of V
//! to the port ends skiff with status (V << 1) | 1.

use std::sync::Arc;

use devices::legacy::DebugExit;

use super::{Built, Bus, Device, Driver, Facts, HostSide, Kind, Nothing, OpenContext, OpenError};
use super::{RunContext, Sandbox, Unresolved};
use crate::cli::{CliError, QemuOpts};
use crate::diag::trace::Milestone;

/// QEMU's isa-debug-exit defaults.
const DEBUG_EXIT_IOBASE: u64 = 0x501;
const DEBUG_EXIT_IOSIZE: u64 = 0x02;

pub struct DebugExitKind;
pub static KIND: DebugExitKind = DebugExitKind;

impl Kind for DebugExitKind {
    fn name(&self) -> &'static str {
        "isa-debug-exit"
    }
    fn drivers(&self) -> &'static [Driver] {
        &[Driver { name: "isa-debug-exit", bus: Bus::Fixed }]
    }
    fn help(&self) -> &'static str {
        "\
-device isa-debug-exit[,iobase=PORT][,iosize=N][,id=ID]
                         writing V to PORT ends skiff with status (V << 1) | 1
                         (default iobase=0x501, iosize=2)
"
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox::default()
    }
    fn parse(&self, opts: &mut QemuOpts, _: Bus) -> Result<Box<dyn Unresolved>, CliError> {
        let iobase = opts.take_uint("iobase")?.unwrap_or(DEBUG_EXIT_IOBASE);
        let iosize = opts.take_uint("iosize")?.unwrap_or(DEBUG_EXIT_IOSIZE);
        if iosize == 0 {
            return Err(opts.error("iosize must be at least 1"));
        }
        let ports = || {
            opts.error(format!("ports {iobase:#x}+{iosize:#x} do not fit in the 64 KiB I/O space"))
        };
        let end = iobase.checked_add(iosize).ok_or_else(ports)?;
        if end > 0x1_0000 {
            return Err(ports());
        }
        Ok(Box::new(ExitPort {
            iobase: u16::try_from(iobase).map_err(|_| ports())?,
            iosize: u16::try_from(iosize).map_err(|_| ports())?,
        }))
    }
}

/// The ports it answers at.
#[derive(Debug, PartialEq, Eq)]
pub struct ExitPort {
    pub iobase: u16,
    pub iosize: u16,
}

impl Device for ExitPort {
    fn open(&self, _: &OpenContext<'_>) -> Result<Box<dyn HostSide>, OpenError> {
        let (iobase, iosize) = (self.iobase, self.iosize);
        Ok(Box::new(Nothing(move |run: &mut RunContext<'_>| {
            let dev = Arc::new(std::sync::Mutex::new(DebugExit::new(run.control.clone())));
            run.pio.insert(dev, u64::from(iobase), u64::from(iosize))?;
            Ok(Built::Placed)
        })))
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox::default()
    }
    fn facts(&self) -> Facts {
        Facts { milestone_port: Some((self.iobase, Milestone::DebugExit)), ..Facts::default() }
    }
}

#[cfg(test)]
mod tests {
    use crate::cli::tests_support::device;

    use super::*;

    fn debug_exit(iobase: u16, iosize: u16) -> ExitPort {
        ExitPort { iobase, iosize }
    }

    #[test]
    fn ports() {
        let port = |arg: &str| device::<ExitPort>(arg).map(|(d, _)| d);
        assert_eq!(port("isa-debug-exit"), Ok(debug_exit(0x501, 2)));
        assert_eq!(port("isa-debug-exit,iobase=0xf4,iosize=0x04"), Ok(debug_exit(0xf4, 4)));
        assert_eq!(port("isa-debug-exit,iobase=244,iosize=1,id=exit"), Ok(debug_exit(0xf4, 1)));
        assert_eq!(port("isa-debug-exit,iobase=0xfffe"), Ok(debug_exit(0xfffe, 2)));
        let err = |arg: &str| port(arg).unwrap_err();
        assert_eq!(err("isa-debug-exit,foo"), "-device isa-debug-exit: unknown property 'foo'");
        assert!(err("isa-debug-exit,iobase=zz")
            .starts_with("-device isa-debug-exit: invalid value 'zz' for 'iobase'"));
        assert!(err("isa-debug-exit,iosize=-1").contains("'iosize'"));
        assert_eq!(
            err("isa-debug-exit,iosize=0"),
            "-device isa-debug-exit: iosize must be at least 1"
        );
        assert!(err("isa-debug-exit,iobase=0xffff").contains("do not fit"));
        assert!(err("isa-debug-exit,iobase=0x10000").contains("do not fit"));
        assert!(err("isa-debug-exit,iobase=0,iosize=0x10000").contains("do not fit"));
        assert!(err("isa-debug-exit,iobase=0xffffffffffffffff").contains("do not fit"));
    }
}
