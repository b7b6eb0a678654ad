//! `-chardev` and `-serial`.

use super::opts::QemuOpts;
use super::CliError;
use crate::config::{
    ChardevBackend, ChardevConfig, MonitorConfig, QmpAddress, QmpConfig, SerialConfig,
};

/// `-chardev BACKEND,id=ID,...` for the backends skiff has.
pub(super) fn parse_chardev(label: &str, arg: &str) -> Result<ChardevConfig, CliError> {
    let mut opts = QemuOpts::parse(label, arg, Some("backend"));
    let backend = opts.take("backend").ok_or_else(|| opts.missing("backend"))?;
    if !matches!(backend.as_str(), "stdio" | "file" | "null" | "socket") {
        return Err(opts.error(format!(
            "backend '{backend}' is not supported (only stdio, file, null and socket)"
        )));
    }
    opts.relabel(format!("{label} {backend}"));
    let id = opts.take_id()?.ok_or_else(|| opts.missing("id"))?;
    let backend = match backend.as_str() {
        "stdio" => ChardevBackend::Stdio { signal: opts.take_bool("signal")?.unwrap_or(true) },
        "file" => {
            let path = opts.take_path("path")?.ok_or_else(|| opts.missing("path"))?;
            ChardevBackend::File { path, append: opts.take_bool("append")?.unwrap_or(false) }
        }
        "socket" => {
            if opts.contains("host") || opts.contains("port") {
                return Err(opts.error("TCP sockets are not supported (use a Unix socket: path=)"));
            }
            let path = opts.take_path("path")?.ok_or_else(|| opts.missing("path"))?;
            let server = opts.take_bool("server")?.unwrap_or(false);
            let wait = opts.take_bool("wait")?;
            // As QEMU >= 6.0: a client never waits for a connection.
            if !server && wait.is_some() {
                return Err(opts.error("'wait' is only valid with server=on"));
            }
            // QEMU's reconnect=SECONDS, and reconnect-ms= which replaces it.
            let reconnect_ms =
                match (opts.take_uint("reconnect")?, opts.take_uint("reconnect-ms")?) {
                    (Some(_), Some(_)) => {
                        return Err(
                            opts.error("'reconnect' and 'reconnect-ms' are mutually exclusive")
                        )
                    }
                    (Some(s), None) => Some(s.saturating_mul(1000)),
                    (None, ms) => ms,
                }
                .filter(|&ms| ms > 0);
            if server && reconnect_ms.is_some() {
                return Err(opts.error("'reconnect' is only valid for a client (server=off)"));
            }
            ChardevBackend::Socket { path, server, wait: wait.unwrap_or(true), reconnect_ms }
        }
        _ => ChardevBackend::Null,
    };
    opts.finish()?;
    Ok(ChardevConfig { id, backend })
}

/// `-qmp unix:PATH,server[=on][,nowait|wait=off]` or
/// `-qmp tcp:HOST:PORT,server,...` (QEMU's legacy chardev syntax). Only the
/// server side: skiff does not connect out to a monitor client.
pub(super) fn parse_qmp(label: &str, arg: &str) -> Result<QmpConfig, CliError> {
    let mut opts = QemuOpts::parse(label, arg, Some("address"));
    let address = opts.take("address").ok_or_else(|| opts.missing("address"))?;
    let address = if let Some(path) = address.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(opts.error("'unix:' needs a socket path"));
        }
        QmpAddress::Unix(path.into())
    } else if let Some(hp) = address.strip_prefix("tcp:") {
        let (host, port) = hp
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| opts.error(format!("'tcp:{hp}' is not HOST:PORT")))?;
        let host = if host.is_empty() { "0.0.0.0" } else { host };
        QmpAddress::Tcp { host: host.to_owned(), port }
    } else {
        return Err(opts.error(format!(
            "'{address}' is not supported (use unix:PATH,server,nowait or tcp:HOST:PORT,server,nowait)"
        )));
    };
    if opts.take_bool("server")? != Some(true) {
        return Err(opts.error("only server mode is supported (add ',server,nowait')"));
    }
    let wait = opts.take_bool("wait")?.unwrap_or(true);
    opts.finish()?;
    Ok(QmpConfig { address, wait })
}

/// `-monitor unix:PATH[,server=on][,wait=off][,reconnect=S]` (QEMU's
/// legacy chardev syntax for the human monitor): a client by default, as
/// the NixOS test driver has it.
pub(super) fn parse_monitor(label: &str, arg: &str) -> Result<MonitorConfig, CliError> {
    let mut opts = QemuOpts::parse(label, arg, Some("address"));
    let address = opts.take("address").ok_or_else(|| opts.missing("address"))?;
    let Some(path) = address.strip_prefix("unix:").filter(|p| !p.is_empty()) else {
        return Err(opts.error(format!(
            "'{address}' is not supported (use unix:PATH[,server=on,wait=off] or none)"
        )));
    };
    let server = opts.take_bool("server")?.unwrap_or(false);
    let wait = opts.take_bool("wait")?;
    if !server && wait.is_some() {
        return Err(opts.error("'wait' is only valid with server=on"));
    }
    let reconnect_ms =
        opts.take_uint("reconnect")?.map(|s| s.saturating_mul(1000)).filter(|&ms| ms > 0);
    if server && reconnect_ms.is_some() {
        return Err(opts.error("'reconnect' is only valid for a client (server=off)"));
    }
    opts.finish()?;
    Ok(MonitorConfig { path: path.into(), server, wait: wait.unwrap_or(true), reconnect_ms })
}

/// `-serial stdio|null|none|file:PATH|chardev:ID` (QEMU's legacy chardev
/// syntax, restricted to what skiff has).
pub(super) fn parse_serial(label: &str, arg: &str) -> Result<SerialConfig, CliError> {
    let err = |reason: String| CliError::Invalid { option: label.to_owned(), reason };
    let serial = match arg {
        "stdio" => SerialConfig::Stdio,
        "null" => SerialConfig::Null,
        "none" => SerialConfig::None,
        _ => {
            if let Some(path) = arg.strip_prefix("file:") {
                if path.is_empty() {
                    return Err(err("'file:' needs a path".to_owned()));
                }
                SerialConfig::File(path.into())
            } else if let Some(id) = arg.strip_prefix("chardev:") {
                // Whether it exists is checked once all -chardev are known.
                SerialConfig::Chardev(id.to_owned())
            } else {
                return Err(err(format!(
                    "'{arg}' is not supported (use stdio, null, none, file:PATH or chardev:ID)"
                )));
            }
        }
    };
    Ok(serial)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chardev(arg: &str) -> Result<ChardevConfig, String> {
        parse_chardev("-chardev", arg).map_err(|e| e.to_string())
    }

    fn ok(id: &str, backend: ChardevBackend) -> Result<ChardevConfig, String> {
        Ok(ChardevConfig { id: id.to_owned(), backend })
    }

    /// A Unix socket chardev on `path`.
    fn socket(path: &str, server: bool, wait: bool, reconnect_ms: Option<u64>) -> ChardevBackend {
        ChardevBackend::Socket { path: path.into(), server, wait, reconnect_ms }
    }

    #[test]
    fn chardev_backends() {
        assert_eq!(chardev("stdio,id=s"), ok("s", ChardevBackend::Stdio { signal: true }));
        assert_eq!(
            chardev("stdio,id=s,signal=off"),
            ok("s", ChardevBackend::Stdio { signal: false })
        );
        assert_eq!(chardev("backend=null,id=n"), ok("n", ChardevBackend::Null));
        assert_eq!(
            chardev("file,id=f,path=/tmp/a,,b"),
            ok("f", ChardevBackend::File { path: "/tmp/a,b".into(), append: false })
        );
        assert_eq!(
            chardev("file,id=f,path=log,append=on"),
            ok("f", ChardevBackend::File { path: "log".into(), append: true })
        );
        assert_eq!(
            chardev("socket,id=c,path=/run/x.sock"),
            ok("c", socket("/run/x.sock", false, true, None))
        );
        assert_eq!(
            chardev("socket,id=c,path=p,server=on,wait=off"),
            ok("c", socket("p", true, false, None))
        );
        assert_eq!(
            chardev("socket,id=c,path=p,reconnect=2"),
            ok("c", socket("p", false, true, Some(2000)))
        );
        assert_eq!(
            chardev("socket,id=c,path=p,reconnect-ms=250"),
            ok("c", socket("p", false, true, Some(250)))
        );
        assert_eq!(
            chardev("socket,id=c,path=p,reconnect=0"),
            ok("c", socket("p", false, true, None))
        );
        // QEMU's legacy flag forms.
        assert_eq!(
            chardev("socket,id=c,path=p,server,nowait"),
            ok("c", socket("p", true, false, None))
        );
        assert_eq!(chardev("socket,id=c,path=p,server"), ok("c", socket("p", true, true, None)));
    }

    #[test]
    fn chardev_errors() {
        let err = |arg: &str| chardev(arg).unwrap_err();
        assert_eq!(err("stdio"), "-chardev stdio: missing property 'id'");
        assert_eq!(err("id=x"), "-chardev: missing property 'backend'");
        assert_eq!(
            err("pty,id=x"),
            "-chardev: backend 'pty' is not supported (only stdio, file, null and socket)"
        );
        assert!(err("stdio,id=0x").starts_with("-chardev stdio: invalid value '0x' for 'id'"));
        assert_eq!(err("stdio,id=x,mux=on"), "-chardev stdio: unknown property 'mux'");
        assert_eq!(err("null,id=x,path=p"), "-chardev null: unknown property 'path'");
        assert!(err("stdio,id=x,signal=maybe").contains("'signal'"));
        assert_eq!(err("file,id=x"), "-chardev file: missing property 'path'");
        assert!(err("file,id=x,path=").contains("invalid value '' for 'path'"));
        assert_eq!(err("socket,id=x"), "-chardev socket: missing property 'path'");
        assert!(
            err("socket,id=x,host=localhost,port=4444").contains("TCP sockets are not supported")
        );
        assert!(err("socket,id=x,port=4444").contains("TCP sockets are not supported"));
        assert_eq!(
            err("socket,id=x,path=p,wait=off"),
            "-chardev socket: 'wait' is only valid with server=on"
        );
        assert_eq!(err("socket,id=x,path=p,nodelay"), "-chardev socket: unknown property 'delay'");
        assert_eq!(
            err("socket,id=x,path=p,server=on,wait=off,reconnect=1"),
            "-chardev socket: 'reconnect' is only valid for a client (server=off)"
        );
        assert!(err("socket,id=x,path=p,reconnect=1,reconnect-ms=5").contains("mutually exclusive"));
        assert!(err("socket,id=x,path=p,reconnect=soon").contains("'reconnect'"));
    }

    #[test]
    fn monitors() {
        let m = |arg| parse_monitor("-monitor", arg).map_err(|e| e.to_string());
        let cfg = |path: &str, server, wait, reconnect_ms| {
            Ok(MonitorConfig { path: path.into(), server, wait, reconnect_ms })
        };
        // The NixOS test driver's form: skiff connects.
        assert_eq!(m("unix:/state/monitor"), cfg("/state/monitor", false, true, None));
        assert_eq!(m("unix:m,server=on,wait=off"), cfg("m", true, false, None));
        assert_eq!(m("unix:m,server,nowait"), cfg("m", true, false, None));
        assert_eq!(m("unix:m,reconnect=1"), cfg("m", false, true, Some(1000)));
        assert!(m("stdio").unwrap_err().contains("'stdio' is not supported"));
        assert!(m("unix:").unwrap_err().contains("is not supported"));
        assert!(m("unix:m,wait=off").unwrap_err().contains("only valid with server=on"));
        assert!(m("unix:m,frob=1").unwrap_err().contains("frob"));
    }

    #[test]
    fn serials() {
        let serial = |arg| parse_serial("-serial", arg);
        assert_eq!(serial("stdio").unwrap(), SerialConfig::Stdio);
        assert_eq!(serial("null").unwrap(), SerialConfig::Null);
        assert_eq!(serial("none").unwrap(), SerialConfig::None);
        assert_eq!(serial("file:/tmp/log").unwrap(), SerialConfig::File("/tmp/log".into()));
        assert_eq!(serial("chardev:s0").unwrap(), SerialConfig::Chardev("s0".into()));
        for bad in ["pty", "vc", "tcp:localhost:4444", "mon:stdio", "/dev/ttyS0", "", "STDIO"] {
            let err = serial(bad).unwrap_err().to_string();
            assert!(err.starts_with(&format!("-serial: '{bad}' is not supported")), "{err}");
        }
        assert_eq!(serial("file:").unwrap_err().to_string(), "-serial: 'file:' needs a path");
    }
}
