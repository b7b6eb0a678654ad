//! `-device virtio-serial-pci|virtio-serial-device|virtio-serial[,max_ports=N]`
//! (a virtio-serial bus) and its ports, `-device virtconsole|virtserialport
//! [,chardev=ID][,name=NAME][,nr=N][,bus=BUS]`, as QEMU has them: a port
//! joins a bus that came before it on the command line (`bus=` names it:
//! `ID.0` for a bus with `id=ID`, else `virtio-serial-bus.0`; without
//! `bus=`, the first bus with room); a console takes port 0 if it is
//! free, any other port the lowest free number from 1; names are unique.
//! A port's host end is its chardev: a Unix socket (client or server) or
//! null.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::virtio::console::{Console, PortConfig, SharedHost, DEFAULT_MAX_PORTS, MAX_PORTS};

use super::{Built, Bus, Device, Driver, HostSide, Kind, OpenContext, OpenError, Refs};
use super::{Nothing, RunContext, Sandbox, Unresolved};
use crate::cli::{CliError, QemuOpts};
use crate::config::{ChardevBackend, ChardevConfig};
use crate::host::socket_end::SocketEnd;

pub struct SerialKind;
pub static KIND: SerialKind = SerialKind;

impl Kind for SerialKind {
    fn name(&self) -> &'static str {
        // Its workers announce themselves by it (the sandbox's key).
        devices::virtio::console::FAMILY
    }
    fn drivers(&self) -> &'static [Driver] {
        &[
            Driver { name: "virtio-serial-pci", bus: Bus::VirtioPci },
            // QEMU's alias on x86 (what the NixOS test driver adds).
            Driver { name: "virtio-serial", bus: Bus::VirtioPci },
            Driver { name: "virtio-serial-device", bus: Bus::VirtioMmio },
        ]
    }
    fn help(&self) -> &'static str {
        "\
-device virtio-serial-device|virtio-serial-pci|virtio-serial[,max_ports=N]
        [,addr=..][,bus=ID][,id=ID]
                         a virtio-serial bus (multiport; max_ports 1 to 31,
                         default 31); virtio-serial is virtio-serial-pci
"
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox { backend_socket: true, accept: true, ..Sandbox::default() }
    }
    fn parse(&self, opts: &mut QemuOpts, _: Bus) -> Result<Box<dyn Unresolved>, CliError> {
        let max_ports = match opts.take_uint("max_ports")? {
            None => DEFAULT_MAX_PORTS,
            Some(n @ 1..) if n <= u64::from(MAX_PORTS) => n as u32,
            Some(n) => {
                return Err(opts.invalid_value("max_ports", n.to_string(), "1 to 31"));
            }
        };
        Ok(Box::new(PendingBus { max_ports }))
    }
}

#[derive(Debug)]
struct PendingBus {
    max_ports: u32,
}

/// A bus as the ports being resolved see it.
pub struct BusSlot {
    /// QEMU's name for it (`bus=`).
    name: String,
    max_ports: u32,
    ports: Arc<Mutex<Vec<Port>>>,
}

impl Unresolved for PendingBus {
    fn resolve(self: Box<Self>, _: &str, refs: &mut Refs) -> Result<Box<dyn Device>, CliError> {
        // QEMU's bus names: the device's id plus ".0", else the bus type's.
        let name = match refs.device_id() {
            Some(id) => format!("{id}.0"),
            None => "virtio-serial-bus.0".to_owned(),
        };
        let ports = Arc::new(Mutex::new(Vec::new()));
        refs.serial_buses.push(BusSlot { name, max_ports: self.max_ports, ports: ports.clone() });
        Ok(Box::new(SerialBus { max_ports: self.max_ports, ports }))
    }
}

/// One port, as its `-device` resolved it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub nr: u32,
    pub console: bool,
    pub name: Option<String>,
    pub end: End,
}

/// A port's host end, from its chardev.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// No chardev: the port exists, nothing is connected to it.
    None,
    Null,
    Client {
        path: PathBuf,
        reconnect_ms: Option<u64>,
    },
    Server {
        path: PathBuf,
        wait: bool,
    },
}

/// A virtio-serial bus and the ports that joined it.
#[derive(Debug)]
pub struct SerialBus {
    pub max_ports: u32,
    ports: Arc<Mutex<Vec<Port>>>,
}

impl SerialBus {
    pub fn ports(&self) -> Vec<Port> {
        self.ports.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl PartialEq for SerialBus {
    fn eq(&self, o: &Self) -> bool {
        self.max_ports == o.max_ports && self.ports() == o.ports()
    }
}

impl Device for SerialBus {
    /// Opens every port's host end: a client connects now (QEMU fails at
    /// start when it cannot), a server binds (and with `wait=on` waits).
    fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn HostSide>, OpenError> {
        let mut ports = Vec::new();
        for p in self.ports() {
            let what = || format!("-device {}: port {}", ctx.driver, p.nr);
            let end = match &p.end {
                End::None => None,
                End::Null => Some(SocketEnd::null()),
                End::Client { path, reconnect_ms } => {
                    let every = reconnect_ms.map(Duration::from_millis);
                    let end = SocketEnd::client(path, every).map_err(|e| {
                        OpenError::new(
                            format!("{}: cannot connect to '{}'", what(), path.display()),
                            e,
                        )
                    })?;
                    Some(end)
                }
                End::Server { path, wait } => {
                    let end = SocketEnd::server(path, *wait).map_err(|e| {
                        OpenError::new(
                            format!("{}: cannot listen on '{}'", what(), path.display()),
                            e,
                        )
                    })?;
                    Some(end)
                }
            };
            let host: SharedHost = match end {
                Some(end) => Arc::new(Mutex::new(end)),
                None => Arc::new(Mutex::new(Unconnected)),
            };
            ports.push(PortConfig { nr: p.nr, console: p.console, name: p.name.clone(), host });
        }
        Ok(Box::new(Opened { max_ports: self.max_ports, ports }))
    }
    fn sandbox(&self) -> Sandbox {
        let ports = self.ports();
        Sandbox {
            backend_socket: ports
                .iter()
                .any(|p| matches!(p.end, End::Client { reconnect_ms: Some(_), .. })),
            accept: ports.iter().any(|p| matches!(p.end, End::Server { .. })),
            ..Sandbox::default()
        }
    }
}

/// A port without a chardev: never connected.
struct Unconnected;

impl devices::virtio::console::PortHost for Unconnected {
    fn watch(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    fn poll(&mut self) {}
    fn connected(&self) -> bool {
        false
    }
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::WouldBlock.into())
    }
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::NotConnected.into())
    }
    fn disconnect(&mut self) {}
    fn reap(&mut self) {}
    fn generation(&self) -> u64 {
        0
    }
}

struct Opened {
    max_ports: u32,
    ports: Vec<PortConfig>,
}

impl HostSide for Opened {
    fn build(&self, _: &mut RunContext<'_>) -> crate::vm::Result<Built> {
        let console = Console::new(self.max_ports, self.ports.clone());
        Ok(Built::Virtio(Arc::new(Mutex::new(console))))
    }
}

/// `virtconsole` or `virtserialport`.
pub struct PortKind {
    console: bool,
}
pub static CONSOLE_KIND: PortKind = PortKind { console: true };
pub static PORT_KIND: PortKind = PortKind { console: false };

impl Kind for PortKind {
    fn name(&self) -> &'static str {
        self.drivers()[0].name
    }
    fn drivers(&self) -> &'static [Driver] {
        if self.console {
            &[Driver { name: "virtconsole", bus: Bus::Fixed }]
        } else {
            &[Driver { name: "virtserialport", bus: Bus::Fixed }]
        }
    }
    fn help(&self) -> &'static str {
        if self.console {
            "\
-device virtconsole[,chardev=ID][,name=NAME][,nr=N][,bus=BUS]
                         a console port on a virtio-serial bus given before
                         it (/dev/hvcN in the guest); its chardev is a Unix
                         socket (client, or server=on) or null
"
        } else {
            "\
-device virtserialport[,chardev=ID][,name=NAME][,nr=N][,bus=BUS]
                         a named port (/dev/virtio-ports/NAME), as virtconsole
"
        }
    }
    fn sandbox(&self) -> Sandbox {
        // The bus's worker serves it.
        Sandbox::default()
    }
    fn parse(&self, opts: &mut QemuOpts, _: Bus) -> Result<Box<dyn Unresolved>, CliError> {
        let console = self.console;
        let chardev = opts.take("chardev");
        let name = opts.take("name");
        if name.as_deref() == Some("") {
            return Err(opts.invalid_value("name", String::new(), "a port name"));
        }
        let nr = opts.take_uint("nr")?;
        if nr.is_some_and(|n| n >= u64::from(MAX_PORTS)) {
            return Err(opts.error(format!(
                "Out-of-range port id specified, max. allowed: {}",
                MAX_PORTS - 1
            )));
        }
        let bus = opts.take("bus");
        Ok(Box::new(PendingPort { console, chardev, name, nr: nr.map(|n| n as u32), bus }))
    }
}

#[derive(Debug)]
struct PendingPort {
    console: bool,
    chardev: Option<String>,
    name: Option<String>,
    nr: Option<u32>,
    bus: Option<String>,
}

impl Unresolved for PendingPort {
    fn resolve(
        self: Box<Self>,
        option: &str,
        refs: &mut Refs,
    ) -> Result<Box<dyn Device>, CliError> {
        let err = |reason: String| CliError::Invalid { option: option.to_owned(), reason };
        let end = match &self.chardev {
            None => End::None,
            Some(id) => {
                let c: Arc<ChardevConfig> = refs.take(option, id)?;
                match &c.backend {
                    ChardevBackend::Null => End::Null,
                    ChardevBackend::Socket { path, server: false, reconnect_ms, .. } => {
                        End::Client { path: path.clone(), reconnect_ms: *reconnect_ms }
                    }
                    ChardevBackend::Socket { path, server: true, wait, .. } => {
                        End::Server { path: path.clone(), wait: *wait }
                    }
                    ChardevBackend::Stdio { .. } | ChardevBackend::File { .. } => {
                        return Err(err(format!(
                            "chardev '{id}': a virtio-serial port's chardev must be a socket or null"
                        )))
                    }
                }
            }
        };
        let bus = match &self.bus {
            Some(name) => refs
                .serial_buses
                .iter()
                .find(|b| &b.name == name)
                .ok_or_else(|| err(format!("Bus '{name}' not found")))?,
            None => refs
                .serial_buses
                .iter()
                .find(|b| lock(&b.ports).len() < b.max_ports as usize)
                .ok_or_else(|| {
                    err("No 'virtio-serial-bus' bus found for device (add -device virtio-serial before it)"
                        .to_owned())
                })?,
        };
        let mut ports = lock(&bus.ports);
        let taken = |nr: u32| ports.iter().any(|p| p.nr == nr);
        let nr = match self.nr {
            Some(nr) if nr >= bus.max_ports => {
                return Err(err(format!(
                    "Out-of-range port id specified, max. allowed: {}",
                    bus.max_ports - 1
                )))
            }
            Some(nr) if taken(nr) => {
                return Err(err(format!("A port already exists at id {nr}")));
            }
            Some(nr) => nr,
            // QEMU keeps port 0 for a console.
            None if self.console && !taken(0) => 0,
            None => (1..bus.max_ports)
                .find(|&n| !taken(n))
                .ok_or_else(|| err("Maximum port limit for this device reached".to_owned()))?,
        };
        if let Some(name) = &self.name {
            if ports.iter().any(|p| p.name.as_ref() == Some(name)) {
                return Err(err(format!("A port already exists by name {name}")));
            }
        }
        let port = Port { nr, console: self.console, name: self.name, end };
        ports.push(port.clone());
        Ok(Box::new(PortDevice(port)))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A port: its bus serves it; the port itself builds nothing.
#[derive(Debug, PartialEq, Eq)]
pub struct PortDevice(pub Port);

impl Device for PortDevice {
    fn open(&self, _: &OpenContext<'_>) -> Result<Box<dyn HostSide>, OpenError> {
        Ok(Box::new(Nothing(|_: &mut RunContext<'_>| Ok(Built::Placed))))
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox::default()
    }
}

#[cfg(test)]
mod tests {
    use crate::cli::tests_support::config;

    use super::*;

    fn parse_error(args: &[&str]) -> String {
        config(args).unwrap_err()
    }

    fn ports(args: &[&str]) -> Vec<Port> {
        let c = config(args).unwrap();
        let bus = c.devices.iter().find_map(|d| d.device.downcast_ref::<SerialBus>()).unwrap();
        bus.ports()
    }

    /// The NixOS test driver's lines: the port connects to the driver's
    /// socket as a client, and is the console at port 0.
    #[test]
    fn the_test_drivers_console() {
        let p = ports(&[
            "-chardev",
            "socket,id=shell,path=/run/shell",
            "-device",
            "virtio-serial",
            "-device",
            "virtconsole,chardev=shell",
        ]);
        let end = End::Client { path: "/run/shell".into(), reconnect_ms: None };
        assert_eq!(p, [Port { nr: 0, console: true, name: None, end }]);
    }

    #[test]
    fn ports_are_numbered_as_qemu_numbers_them() {
        let p = ports(&[
            "-device",
            "virtio-serial-pci,id=vs,max_ports=4",
            "-device",
            "virtserialport,name=org.qemu.guest_agent.0",
            "-device",
            "virtconsole",
            "-device",
            "virtconsole,bus=vs.0",
            "-device",
            "virtserialport,nr=3,name=b",
        ]);
        let nrs: Vec<(u32, bool)> = p.iter().map(|p| (p.nr, p.console)).collect();
        assert_eq!(nrs, [(1, false), (0, true), (2, true), (3, false)]);
    }

    #[test]
    fn errors_are_qemus() {
        let e = |args: &[&str]| parse_error(args);
        assert!(e(&["-device", "virtconsole"]).contains("No 'virtio-serial-bus' bus found"));
        assert!(e(&["-device", "virtio-serial", "-device", "virtconsole,bus=x.0"])
            .contains("Bus 'x.0' not found"));
        let two = ["-device", "virtio-serial", "-device", "virtserialport,name=a"];
        assert!(e(&[&two[..], &["-device", "virtserialport,name=a"]].concat())
            .contains("A port already exists by name a"));
        assert!(e(&[&two[..], &["-device", "virtserialport,nr=1"]].concat())
            .contains("A port already exists at id 1"));
        assert!(e(&["-device", "virtio-serial,max_ports=2", "-device", "virtserialport,nr=2"])
            .contains("Out-of-range port id specified, max. allowed: 1"));
        assert!(
            e(&[
                "-device",
                "virtio-serial,max_ports=2",
                "-device",
                "virtserialport",
                "-device",
                "virtserialport"
            ])
            .contains("Maximum port limit for this device reached"),
            "full"
        );
        assert!(e(&["-device", "virtio-serial,max_ports=0"]).contains("max_ports"));
        assert!(e(&[
            "-chardev",
            "stdio,id=s",
            "-device",
            "virtio-serial",
            "-device",
            "virtconsole,chardev=s"
        ])
        .contains("must be a socket or null"));
        assert!(e(&["-device", "virtio-serial", "-device", "virtconsole,chardev=nope"])
            .contains("Property 'chardev' can't find value 'nope'"));
        assert!(e(&["-device", "virtio-serial,vectors2=1"]).contains("vectors2"));
    }
}
