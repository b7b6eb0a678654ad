//! `skiff`: a KVM virtual machine monitor for QEMU's `microvm` machine, with
//! QEMU's command line.
//!
//! Exit status, as scripts (and microvm.nix) rely on it: 0 when the guest
//! powers off, resets with `-no-reboot`, or a termination signal arrives;
//! `(V << 1) | 1` when the guest writes V to isa-debug-exit; 1 for a bad
//! command line or a VM that cannot continue (with the reason on stderr).

mod cli;
mod config;
mod console;
mod console_writer;
mod control;
mod logger;
mod memory;
mod pci_layout;
mod qmp;
mod rtc_timer;
mod serial_input;
mod signals;
mod trace;
mod vcpu;
mod vm;

use std::io::Write;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use config::VmConfig;
use devices::VmEvent;
use vm::RunEnd;

fn main() -> ExitCode {
    trace::init();
    logger::init();
    let args = std::env::args().skip(1);
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
        Err(msg) => {
            console::restore_terminal();
            let _ = writeln!(std::io::stderr(), "skiff: {msg}");
            1
        }
    };
    console::restore_terminal();
    let _ = write!(std::io::stderr(), "{}", trace::report());
    // Exit codes from isa-debug-exit can exceed a u8 in theory; the OS keeps
    // the low 8 bits, as with QEMU's exit().
    ExitCode::from(code as u8)
}

fn run(cfg: &VmConfig) -> Result<i32, String> {
    if cfg.sandbox {
        log::warn!("-sandbox on: no seccomp filter is installed yet; running unconfined");
    }
    boot::cpu::check_features(&cfg.cpu.features).map_err(|e| e.to_string())?;
    pci_layout::place(cfg)?;
    let mut files = vm::BootFiles::open(cfg).map_err(|e| e.to_string())?;
    let console = console::console_target(cfg).map_err(|e| e.to_string())?;
    let signal_evt = signals::install().map_err(|e| format!("installing signal handlers: {e}"))?;
    let mut servers = Vec::new();
    for q in &cfg.qmp {
        let server = qmp::QmpServer::bind(q).map_err(|e| format!("-qmp: {e}"))?;
        servers.push(Arc::new(Mutex::new(server)));
    }
    if let console::ConsoleTarget::Stdio { signal } = console {
        console::enter_raw_mode(signal);
    }
    // Dropping the servers (here or on an early return) removes the sockets.
    run_until_end(cfg, &mut files, &console, signal_evt, &servers)
}

fn emit(servers: &[Arc<Mutex<qmp::QmpServer>>], name: &str, guest: bool, reason: &str) {
    for s in servers {
        let data = serde_json::json!({ "guest": guest, "reason": reason });
        s.lock().unwrap_or_else(|e| e.into_inner()).emit(name, Some(data));
    }
}

fn run_until_end(
    cfg: &VmConfig,
    files: &mut vm::BootFiles,
    console: &console::ConsoleTarget,
    signal_evt: &vmm_sys_util::eventfd::EventFd,
    servers: &[Arc<Mutex<qmp::QmpServer>>],
) -> Result<i32, String> {
    let mut first = true;
    loop {
        let end =
            vm::run(cfg, files, console, first, signal_evt, servers).map_err(|e| e.to_string())?;
        first = false;
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
                console::restore_terminal();
                let _ = writeln!(std::io::stderr(), "skiff: terminating on signal {sig}");
                Ok(0)
            }
            RunEnd::Fatal(msg) => Err(msg),
        };
    }
}
