//! `skiff`: a KVM virtual machine monitor for QEMU's `microvm` machine, with
//! QEMU's command line. The binary (`main.rs`) calls [`main`]; the library
//! exists so that `fuzz/` can reach the command-line and QMP parsers
//! (feature `fuzzing`).
//!
//! Exit status, as scripts (and microvm.nix) rely on it: 0 when the guest
//! powers off, resets with `-no-reboot`, or a termination signal arrives;
//! `(V << 1) | 1` when the guest writes V to isa-debug-exit; 1 for a bad
//! command line or a VM that cannot continue (with the reason on stderr).

mod backends;
mod cli;
mod config;
mod ctl;
mod diag;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod hmp;
mod host;
mod kinds;
mod plan;
mod qmp;
mod vm;

use std::io::Write;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use config::VmConfig;
use devices::VmEvent;
use host::console;
use vm::RunEnd;

/// Why skiff stops with status 1. Each level names what failed; the cause
/// below it is printed after it (`error_chain`), down to the OS error.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(transparent)]
    Cpu(#[from] boot::cpu::Error),
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error(transparent)]
    Backend(#[from] kinds::OpenError),
    #[error(transparent)]
    Vm(#[from] vm::Error),
    #[error("serial console")]
    Console(#[from] console::Error),
    #[error(transparent)]
    Chardev(#[from] host::chardevs::Error),
    #[error(transparent)]
    Privileges(#[from] host::privileges::Error),
    #[error(transparent)]
    Sandbox(#[from] host::sandbox::Error),
    #[error("installing signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("-qmp")]
    Qmp(#[source] std::io::Error),
    /// A `-monitor` socket could not be connected or bound.
    #[error("{0}")]
    Monitor(String),
    /// A vCPU could not continue; the message carries its registers.
    #[error("{0}")]
    Fatal(String),
}

/// `error: cause: its cause ...`, every level of the chain on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let msg = cause.to_string();
        // `transparent` levels repeat their source's message.
        if !text.ends_with(&msg) {
            text.push_str(": ");
            text.push_str(&msg);
        }
        source = cause.source();
    }
    text
}

/// The whole program: parse the command line, run the VM, say how it ended.
pub fn main() -> ExitCode {
    diag::trace::init();
    host::logger::init();
    // args_os: std::env::args panics on an argument that is not UTF-8.
    let args = std::env::args_os().skip(1);
    let config = match cli::parse(args) {
        Ok(cli::Action::Run(cfg)) => cfg,
        Ok(cli::Action::Help) => {
            print!("{}", cli::help_text());
            return ExitCode::SUCCESS;
        }
        Ok(cli::Action::Version) => {
            println!("{}", cli::version_text());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "skiff: {e}");
            return ExitCode::from(1);
        }
    };
    // Whatever happens from here, the terminal is given back as it was.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        console::restore_terminal();
        default_hook(info);
    }));
    let code = match run(&config) {
        Ok(code) => code,
        Err(e) => {
            console::restore_terminal();
            let _ = writeln!(std::io::stderr(), "skiff: {}", error_chain(&e));
            1
        }
    };
    console::restore_terminal();
    let _ = write!(std::io::stderr(), "{}", diag::trace::report());
    // Exit codes from isa-debug-exit can exceed a u8 in theory; the OS keeps
    // the low 8 bits, as with QEMU's exit().
    ExitCode::from(code as u8)
}

/// A guest's physical address width when /dev/kvm cannot say (the plan is
/// still checked, so a bad command line is reported first).
const FALLBACK_PHYS_BITS: u8 = 40;

fn run(cfg: &VmConfig) -> Result<i32, Error> {
    host::limits::raise_descriptor_limit();
    boot::cpu::check_features(&cfg.cpu.features)?;
    let console = console::console_target(cfg)?;
    let kvm = vm::Host::open();
    let phys_bits = kvm.as_ref().map_or(FALLBACK_PHYS_BITS, vm::Host::phys_bits);
    let serial = console != console::ConsoleTarget::None;
    let mut plan = plan::MachinePlan::new(cfg, serial, phys_bits)?;
    let mut files = vm::BootFiles::open(cfg)?;
    let kvm = kvm?;
    let backends = backends::Backends::open(cfg)?;
    plan.carve_device_data(cfg, &backends)?;
    let signal_evt = host::signals::install().map_err(Error::Signals)?;
    // Held open for the process's life, as QEMU holds every chardev.
    let _chardevs = match host::chardevs::open_unused(cfg) {
        Ok(c) => c,
        Err(e @ host::chardevs::Error::Interrupted { .. }) => {
            log::info!("{e}");
            return Ok(0);
        }
        Err(e) => return Err(e.into()),
    };
    if cfg.machine.usb == config::OnOffAuto::On {
        #[expect(clippy::disallowed_macros, reason = "startup: once")]
        {
            log::warn!("-usb/usb=on: skiff has no USB controller; USB devices are left out");
        }
    }
    let mut servers = Vec::new();
    for q in &cfg.qmp {
        let server = match qmp::QmpServer::bind(q) {
            Ok(s) => s,
            // SIGTERM/SIGINT/SIGHUP while waiting for a client (wait=on)
            // ends skiff as it ends a running VM: status 0.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                log::info!("qmp: {e}");
                return Ok(0);
            }
            Err(e) => return Err(Error::Qmp(e)),
        };
        servers.push(Arc::new(Mutex::new(server)));
    }
    // Human monitors, in command-line order: connected (or bound) before
    // the guest runs, as QEMU opens its chardevs.
    let mut human = Vec::new();
    for m in &cfg.monitors {
        match hmp::Monitor::open(m) {
            Ok(monitor) => human.push(Arc::new(Mutex::new(monitor))),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                log::info!("-monitor: {e}");
                return Ok(0);
            }
            Err(e) => {
                return Err(Error::Monitor(format!("-monitor unix:{}: {e}", m.path.display())))
            }
        }
    }
    // Opened once: a guest reboot writes on where the last run stopped.
    let serial = console.open()?;
    // Made once, as a machine's RAM is: a reset keeps it (QEMU does not
    // clear it either), so what a VFIO container pinned stays pinned once.
    let ram = vm::memory::create(cfg.mem_size, &cfg.ram, cfg.machine.mem_merge)
        .map_err(vm::Error::from)?;
    // Everything privileged is open: become who -run-with says, then
    // confine what is left.
    host::privileges::apply(&cfg.run_with)?;
    if let Some(policy) = cfg.sandbox {
        let families = cfg.devices.iter().map(|d| (d.kind.name(), d.device.sandbox())).collect();
        host::sandbox::install(policy, families)?;
    }
    if let console::ConsoleTarget::Stdio { signal } = console {
        console::enter_raw_mode(signal);
    }
    // Devices' events reach every QMP client through one relay, whose
    // throttle outlives a guest reboot.
    let notices = Arc::new(ctl::Notices::new().map_err(Error::Qmp)?);
    let relay: Option<vm::Subscriber> = match servers.is_empty() {
        true => None,
        false => Some(Arc::new(Mutex::new(
            qmp::EventRelay::new(servers.clone(), notices.clone()).map_err(Error::Qmp)?,
        ))),
    };
    let monitors = |controls: &ctl::Controls| -> Vec<vm::Subscriber> {
        let handler = |s: &Arc<Mutex<qmp::QmpServer>>| -> vm::Subscriber {
            Arc::new(Mutex::new(qmp::QmpHandler::new(s.clone(), controls.clone())))
        };
        let hmp = |m: &Arc<Mutex<hmp::Monitor>>| -> vm::Subscriber {
            Arc::new(Mutex::new(hmp::HmpHandler::new(m.clone(), controls.clone())))
        };
        servers.iter().map(handler).chain(relay.clone()).chain(human.iter().map(hmp)).collect()
    };
    let machine = vm::Machine {
        cfg,
        plan: &plan,
        ram: &ram,
        backends: &backends,
        host: &kvm,
        console: serial.as_ref(),
        signal_evt,
        monitors: &monitors,
        notices: &notices,
    };
    // Dropping the servers (here or on an early return) removes the sockets.
    run_until_end(&machine, &servers, &mut files)
}

fn emit(servers: &[Arc<Mutex<qmp::QmpServer>>], name: &str, guest: bool, reason: &str) {
    let data = serde_json::json!({ "guest": guest, "reason": reason });
    qmp::emit_all(servers, name, Some(data));
}

fn run_until_end(
    m: &vm::Machine<'_>,
    servers: &[Arc<Mutex<qmp::QmpServer>>],
    files: &mut vm::BootFiles,
) -> Result<i32, Error> {
    let cfg = m.cfg;
    loop {
        let end = match vm::run(m, files) {
            Ok(end) => end,
            // A termination signal while a run is being built (a reboot's
            // KVM_CREATE_VM answers EINTR) ends skiff as it would end a
            // running guest: status 0, not a setup error.
            Err(e) => match host::signals::last_signal() {
                Some(sig) => RunEnd::Signal(sig),
                None => return Err(e.into()),
            },
        };
        // With -no-reboot every reset request becomes a shutdown, as in QEMU.
        let (guest, reason, reset) = match &end {
            RunEnd::Guest(VmEvent::Reset) => (true, "guest-reset", true),
            RunEnd::HostReset => (false, "host-qmp-system-reset", true),
            _ => (false, "", false),
        };
        if reset && !cfg.no_reboot {
            emit(servers, "RESET", guest, reason);
            log::info!("{reason}: restarting the VM");
            continue;
        }
        return match end {
            RunEnd::Guest(VmEvent::PowerOff) => {
                emit(servers, "SHUTDOWN", true, "guest-shutdown");
                Ok(0)
            }
            RunEnd::Guest(VmEvent::Reset) | RunEnd::HostReset => {
                emit(servers, "SHUTDOWN", guest, reason);
                Ok(0)
            }
            RunEnd::Guest(VmEvent::Exit(code)) => Ok(code),
            RunEnd::Quit => {
                emit(servers, "SHUTDOWN", false, "host-qmp-quit");
                Ok(0)
            }
            RunEnd::Signal(sig) => {
                emit(servers, "SHUTDOWN", false, "host-signal");
                host::console::restore_terminal();
                let _ = writeln!(std::io::stderr(), "skiff: terminating on signal {sig}");
                Ok(0)
            }
            RunEnd::Fatal(msg) => Err(Error::Fatal(msg)),
        };
    }
}
