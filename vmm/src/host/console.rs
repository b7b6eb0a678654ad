//! Where the guest's serial console goes: the `-serial`/`-chardev` options
//! resolved to an output stream and an optional input source, and the host
//! terminal put in raw mode for as long as the guest owns it.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Mutex;

use crate::config::{ChardevBackend, SerialConfig, VmConfig};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("-serial: chardev '{0}' is not defined")]
    UnknownChardev(String),
    #[error("-serial: microvm has a single ISA serial port; {0} -serial options were given")]
    TooManySerials(usize),
    #[error("-chardev {0}: socket backends for the serial port are not supported yet")]
    SocketSerial(String),
    #[error("-serial: cannot open '{path}': {source}")]
    OpenFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot duplicate the console's descriptor: {0}")]
    DupStdout(#[source] std::io::Error),
}

/// The serial port's host side.
pub struct SerialBackend {
    /// None: the output is discarded (`-serial null`).
    pub output: Option<File>,
    /// Read guest input from standard input.
    pub stdin_input: bool,
}

/// How the console is wired, decided once from the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleTarget {
    /// No serial port at all (QEMU microvm creates COM1 only for a backend).
    None,
    Null,
    Stdio {
        signal: bool,
    },
    File {
        path: std::path::PathBuf,
        append: bool,
    },
}

/// Resolves `-serial`/`-chardev` into the COM1 target. With no `-serial`,
/// QEMU puts COM1 on stdio unless `-nodefaults` was given.
pub fn console_target(cfg: &VmConfig) -> Result<ConsoleTarget, Error> {
    if !cfg.machine.isa_serial {
        return Ok(ConsoleTarget::None);
    }
    let serial = match cfg.serials.as_slice() {
        [] if cfg.nodefaults => return Ok(ConsoleTarget::None),
        [] => SerialConfig::Stdio,
        [one] => one.clone(),
        more => return Err(Error::TooManySerials(more.len())),
    };
    Ok(match serial {
        SerialConfig::None => ConsoleTarget::None,
        SerialConfig::Null => ConsoleTarget::Null,
        SerialConfig::Stdio => ConsoleTarget::Stdio { signal: true },
        SerialConfig::File(path) => ConsoleTarget::File { path, append: false },
        SerialConfig::Chardev(id) => {
            let dev = cfg
                .chardevs
                .iter()
                .find(|c| c.id == id)
                .ok_or_else(|| Error::UnknownChardev(id.clone()))?;
            match &dev.backend {
                ChardevBackend::Stdio { signal } => ConsoleTarget::Stdio { signal: *signal },
                ChardevBackend::File { path, append } => {
                    ConsoleTarget::File { path: path.clone(), append: *append }
                }
                ChardevBackend::Null => ConsoleTarget::Null,
                ChardevBackend::Socket { .. } => return Err(Error::SocketSerial(id)),
            }
        }
    })
}

/// Opens a file chardev's output as QEMU does: created, truncated unless
/// `append=on`.
pub fn open_output(path: &std::path::Path, append: bool) -> std::io::Result<File> {
    OpenOptions::new().create(true).write(true).append(append).truncate(!append).open(path)
}

impl SerialBackend {
    /// The same host side for another run of the guest.
    pub fn try_clone(&self) -> Result<SerialBackend, Error> {
        let output = match &self.output {
            Some(f) => Some(f.try_clone().map_err(Error::DupStdout)?),
            None => None,
        };
        Ok(SerialBackend { output, stdin_input: self.stdin_input })
    }
}

impl ConsoleTarget {
    /// Opens the host side, once for the process: each run (a guest reboot)
    /// writes through a duplicate, on from where the last one stopped.
    pub fn open(&self) -> Result<Option<SerialBackend>, Error> {
        Ok(Some(match self {
            ConsoleTarget::None => return Ok(None),
            ConsoleTarget::Null => SerialBackend { output: None, stdin_input: false },
            ConsoleTarget::Stdio { .. } => {
                // Unbuffered, so a prompt without a newline shows at once.
                let fd: OwnedFd =
                    std::io::stdout().as_fd().try_clone_to_owned().map_err(Error::DupStdout)?;
                SerialBackend { output: Some(File::from(fd)), stdin_input: true }
            }
            ConsoleTarget::File { path, append } => {
                let file = open_output(path, *append).map_err(|source| Error::OpenFile {
                    path: path.display().to_string(),
                    source,
                })?;
                SerialBackend { output: Some(file), stdin_input: false }
            }
        }))
    }
}

/// The terminal settings to restore; set while the guest owns the terminal.
static SAVED_TERMIOS: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Puts stdin's terminal in raw mode as QEMU's stdio chardev does: no echo,
/// no line editing, no CR/NL translation; Ctrl-C still raises SIGINT when
/// `signal` is true (QEMU's `signal=on`, the default), else goes to the guest.
/// A no-op when stdin is not a terminal.
pub fn enter_raw_mode(signal: bool) {
    let fd = std::io::stdin().as_raw_fd();
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(fd) } != 1 {
        return;
    }
    // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
    let mut tio: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `tio` is a valid termios to write into.
    if unsafe { libc::tcgetattr(fd, &mut tio) } != 0 {
        return;
    }
    let saved = tio;
    tio.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    tio.c_oflag |= libc::OPOST;
    tio.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::IEXTEN);
    if !signal {
        tio.c_lflag &= !libc::ISIG;
    }
    tio.c_cflag = (tio.c_cflag & !(libc::CSIZE | libc::PARENB)) | libc::CS8;
    tio.c_cc[libc::VMIN] = 1;
    tio.c_cc[libc::VTIME] = 0;
    // SAFETY: `tio` is a fully initialised termios for this fd.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &tio) } == 0 {
        *SAVED_TERMIOS.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
    }
}

/// Restores the terminal if `enter_raw_mode` changed it. Safe to call on
/// every exit path, more than once.
pub fn restore_terminal() {
    let saved = SAVED_TERMIOS.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(tio) = saved {
        // SAFETY: restores settings read earlier from the same descriptor.
        unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, &tio) };
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::config::ChardevConfig;

    fn cfg() -> VmConfig {
        VmConfig::default()
    }

    #[test]
    fn default_serial_is_stdio_unless_nodefaults() {
        assert_eq!(console_target(&cfg()).unwrap(), ConsoleTarget::Stdio { signal: true });
        let c = VmConfig { nodefaults: true, ..cfg() };
        assert_eq!(console_target(&c).unwrap(), ConsoleTarget::None);
    }

    #[test]
    fn chardev_resolution() {
        let mut c = cfg();
        c.chardevs.push(ChardevConfig {
            id: "stdio".into(),
            backend: ChardevBackend::Stdio { signal: false },
        });
        c.serials.push(SerialConfig::Chardev("stdio".into()));
        assert_eq!(console_target(&c).unwrap(), ConsoleTarget::Stdio { signal: false });
        c.serials = vec![SerialConfig::Chardev("nope".into())];
        assert!(matches!(console_target(&c), Err(Error::UnknownChardev(id)) if id == "nope"));
        c.serials = vec![SerialConfig::Null, SerialConfig::Null];
        assert!(matches!(console_target(&c), Err(Error::TooManySerials(2))));
    }

    #[test]
    fn file_is_truncated_once_and_each_run_writes_on() {
        let path = std::env::temp_dir().join(format!("skiff-console-{}", std::process::id()));
        std::fs::write(&path, "old").unwrap();
        let t = ConsoleTarget::File { path: path.clone(), append: false };
        let opened = t.open().unwrap().unwrap();
        // Two runs of the guest, each with its own duplicate.
        opened.try_clone().unwrap().output.unwrap().write_all(b"one").unwrap();
        opened.try_clone().unwrap().output.unwrap().write_all(b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "onetwo");
        std::fs::remove_file(&path).unwrap();
    }
}
