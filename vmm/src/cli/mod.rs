//! The QEMU-compatible command line.
//!
//! Skiff accepts the subset of `qemu-system-x86_64`'s options that the
//! `microvm` machine needs (what microvm.nix emits), with QEMU's syntax and
//! meaning, and parses each option once into a typed [`VmConfig`]. Anything
//! else is rejected with an error naming the option, rather than ignored: a
//! silently dropped option would boot a different VM than the user asked for.

mod chardev;
mod device;
mod drive;
mod fsdev;
mod help;
mod machine;
mod memory;
pub(crate) mod netdev;
mod opts;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod tests;

pub(crate) use fsdev::check_tag;
pub use help::help_text;
pub(crate) use netdev::parse_mac;
pub(crate) use opts::QemuOpts;

use crate::config::{
    ChardevBackend, DeviceConfig, NetdevConfig, RamBacking, RunAs, RunWith, SandboxConfig,
    SerialConfig, VmConfig,
};
use crate::kinds::Refs;
use machine::SmpArgs;

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Run(Box<VmConfig>),
    Help,
    Version,
}

/// A command-line error. Its message starts with the option at fault, as in
/// `-M microvm: unknown property 'foo'`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    #[error("{0}: unknown option")]
    UnknownOption(String),
    /// A QEMU option skiff does not implement (yet).
    #[error("{0}: not supported yet (see -help for the supported options)")]
    UnsupportedOption(String),
    #[error("{0}: missing argument")]
    MissingArgument(String),
    /// A bare argument: QEMU's `qemu-system-x86_64 disk.img` shorthand.
    #[error("{0}: unexpected argument (disk images are not supported)")]
    Positional(String),
    #[error("{option}: unknown property '{key}'")]
    UnknownProperty { option: String, key: String },
    #[error("{option}: missing property '{key}'")]
    MissingProperty { option: String, key: String },
    #[error("{option}: invalid value '{value}' for '{key}' (expected {expected})")]
    InvalidValue { option: String, key: String, value: String, expected: &'static str },
    #[error("{option}: invalid size '{value}'")]
    InvalidSize { option: String, value: String },
    #[error("{option}: {reason}")]
    Invalid { option: String, reason: String },
    /// An argument that must be text (options, QEMU's key=value lists) is
    /// not UTF-8; shown with U+FFFD where it is not.
    #[error("{option}: the argument '{lossy}' is not valid UTF-8")]
    NotText { option: String, lossy: String },
}

/// `-version`.
pub fn version_text() -> String {
    format!("skiff {} (QEMU command-line compatible: microvm machine)", env!("CARGO_PKG_VERSION"))
}

/// Options that take no argument.
#[derive(Clone, Copy, Debug)]
enum Flag {
    EnableKvm,
    NoDefaults,
    NoUserConfig,
    NoReboot,
    Usb,
    NoGraphic,
    Help,
    Version,
}

/// Options that take one argument (the next argv element, whatever it is).
#[derive(Clone, Copy, Debug)]
enum ArgOpt {
    Machine,
    Accel,
    Memory,
    Smp,
    Cpu,
    Kernel,
    Initrd,
    Append,
    Name,
    Display,
    Chardev,
    Serial,
    Device,
    Smbios,
    FwCfg,
    RunWith,
    Sandbox,
    Qmp,
    Monitor,
    Object,
    Numa,
    Drive,
    Netdev,
    Net,
    Fsdev,
    Virtfs,
}

#[derive(Clone, Copy, Debug)]
enum Opt {
    Flag(Flag),
    Arg(ArgOpt),
}

/// The supported options, by name without the leading dash.
const OPTIONS: &[(&str, Opt)] = &[
    ("M", Opt::Arg(ArgOpt::Machine)),
    ("machine", Opt::Arg(ArgOpt::Machine)),
    ("accel", Opt::Arg(ArgOpt::Accel)),
    ("enable-kvm", Opt::Flag(Flag::EnableKvm)),
    ("m", Opt::Arg(ArgOpt::Memory)),
    ("smp", Opt::Arg(ArgOpt::Smp)),
    ("cpu", Opt::Arg(ArgOpt::Cpu)),
    ("kernel", Opt::Arg(ArgOpt::Kernel)),
    ("initrd", Opt::Arg(ArgOpt::Initrd)),
    ("append", Opt::Arg(ArgOpt::Append)),
    ("name", Opt::Arg(ArgOpt::Name)),
    ("nodefaults", Opt::Flag(Flag::NoDefaults)),
    ("no-user-config", Opt::Flag(Flag::NoUserConfig)),
    ("no-reboot", Opt::Flag(Flag::NoReboot)),
    ("usb", Opt::Flag(Flag::Usb)),
    ("nographic", Opt::Flag(Flag::NoGraphic)),
    ("display", Opt::Arg(ArgOpt::Display)),
    ("chardev", Opt::Arg(ArgOpt::Chardev)),
    ("serial", Opt::Arg(ArgOpt::Serial)),
    ("device", Opt::Arg(ArgOpt::Device)),
    ("smbios", Opt::Arg(ArgOpt::Smbios)),
    ("fw_cfg", Opt::Arg(ArgOpt::FwCfg)),
    ("sandbox", Opt::Arg(ArgOpt::Sandbox)),
    ("run-with", Opt::Arg(ArgOpt::RunWith)),
    ("qmp", Opt::Arg(ArgOpt::Qmp)),
    ("monitor", Opt::Arg(ArgOpt::Monitor)),
    ("object", Opt::Arg(ArgOpt::Object)),
    ("numa", Opt::Arg(ArgOpt::Numa)),
    ("drive", Opt::Arg(ArgOpt::Drive)),
    ("netdev", Opt::Arg(ArgOpt::Netdev)),
    ("net", Opt::Arg(ArgOpt::Net)),
    ("fsdev", Opt::Arg(ArgOpt::Fsdev)),
    ("virtfs", Opt::Arg(ArgOpt::Virtfs)),
    ("h", Opt::Flag(Flag::Help)),
    ("help", Opt::Flag(Flag::Help)),
    ("version", Opt::Flag(Flag::Version)),
];

/// QEMU options that skiff does not implement yet: everything else microvm.nix
/// can emit, and other common ones. Reported as "not supported yet" rather
/// than "unknown option", which would suggest a typo.
#[rustfmt::skip]
const NOT_YET: &[&str] = &[
    "qmp-pretty", "mon", "blockdev", "hda", "hdb", "hdc", "hdd",
    "cdrom", "nic",
    "global", "bios", "boot", "rtc", "vga", "vnc", "spice", "daemonize", "pidfile", "S", "s",
    "gdb", "d", "D", "incoming", "loadvm", "snapshot", "readconfig", "writeconfig", "mem-path",
    "mem-prealloc", "overcommit", "msg", "trace", "plugin", "action", "watchdog-action", "L",
    "icount", "parallel", "debugcon", "audiodev", "usbdevice", "tpmdev", "add-fd", "set",
    "uuid", "k", "no-shutdown", "no-hpet", "chroot", "runas", "option-rom", "pflash", "compat",
    "preconfig", "async-teardown",
];

/// `-foo` and `--foo` name option `foo`; `-` alone is a positional argument,
/// as in QEMU.
fn option_name(arg: &str) -> Option<&str> {
    let name = arg.strip_prefix('-').filter(|n| !n.is_empty())?;
    Some(name.strip_prefix('-').unwrap_or(name))
}

/// `help` or `?` as an option argument: QEMU then lists the choices.
fn is_help(arg: &str) -> bool {
    arg == "help" || arg == "?"
}

/// Parses the command line (without argv\[0\]) into what to do.
///
/// `-h` and `-version` take effect where they appear, as in QEMU; errors in
/// earlier options are still reported.
///
/// Arguments are the OS's (`args_os`): paths (`-kernel`, `-initrd`) and
/// `-append` may be any bytes; everything else must be UTF-8 and is refused
/// by name where it is not.
pub fn parse<I, S>(args: I) -> Result<Action, CliError>
where
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString>,
{
    let mut args = args.into_iter().map(Into::into);
    let mut builder = Builder::default();
    while let Some(arg) = args.next() {
        let arg = match arg.into_string() {
            Ok(a) => a,
            Err(a) => {
                let lossy = a.to_string_lossy().into_owned();
                return Err(if lossy.starts_with('-') {
                    CliError::UnknownOption(lossy)
                } else {
                    CliError::Positional(lossy)
                });
            }
        };
        let Some(name) = option_name(&arg) else {
            return Err(CliError::Positional(arg));
        };
        let Some(&(_, opt)) = OPTIONS.iter().find(|(n, _)| *n == name) else {
            return Err(if NOT_YET.contains(&name) {
                CliError::UnsupportedOption(format!("-{name}"))
            } else {
                CliError::UnknownOption(arg)
            });
        };
        let label = format!("-{name}");
        let action = match opt {
            Opt::Flag(flag) => builder.flag(flag),
            Opt::Arg(opt) => {
                let value = args.next().ok_or_else(|| CliError::MissingArgument(label.clone()))?;
                builder.option(opt, &label, value)?
            }
        };
        if let Some(action) = action {
            return Ok(action);
        }
    }
    builder.finish().map(|config| Action::Run(Box::new(config)))
}

/// The configuration being built, and what later options are checked against.
#[derive(Default)]
struct Builder {
    config: VmConfig,
    /// `-smp` values; derived once all `-smp` are merged.
    smp: Option<SmpArgs>,
    device_ids: Vec<String>,
    /// `-device`s in command-line order, references unresolved until the
    /// whole command line is read.
    devices: Vec<device::Pending>,
    /// `-object memory-backend-*`, resolved against `-numa` at the end.
    memory_backends: Vec<crate::config::MemoryBackendConfig>,
    /// The one `-numa node`'s `memdev=`, if a node was given.
    numa_node: Option<Option<String>>,
    /// `-net nic`s, which become virtio-net devices on the machine's bus.
    nics: Vec<netdev::NicConfig>,
    /// `-virtfs` devices to place: (fsdev id, mount tag).
    virtfs: Vec<(String, String)>,
}

/// At most COM1..COM4, as QEMU's ISA serial ports.
const MAX_SERIALS: usize = 4;

impl Builder {
    fn flag(&mut self, flag: Flag) -> Option<Action> {
        match flag {
            // KVM is the only accelerator there is.
            Flag::EnableKvm => {}
            Flag::NoDefaults => self.config.nodefaults = true,
            // Skiff reads no configuration file.
            Flag::NoUserConfig => {}
            Flag::NoReboot => self.config.no_reboot = true,
            // QEMU's -usb is -machine usb=on (no controller here: startup
            // says so).
            Flag::Usb => self.config.machine.usb = crate::config::OnOffAuto::On,
            Flag::NoGraphic => self.config.nographic = true,
            Flag::Help => return Some(Action::Help),
            Flag::Version => return Some(Action::Version),
        }
        None
    }

    fn option(
        &mut self,
        opt: ArgOpt,
        label: &str,
        arg: std::ffi::OsString,
    ) -> Result<Option<Action>, CliError> {
        let invalid = |reason: &str| CliError::Invalid {
            option: label.to_owned(),
            reason: reason.to_owned(),
        };
        let config = &mut self.config;
        // Paths and the kernel's command line are bytes to the OS.
        match opt {
            ArgOpt::Kernel | ArgOpt::Initrd if arg.is_empty() => return Err(invalid("empty path")),
            ArgOpt::Kernel => config.kernel = Some(arg.into()),
            ArgOpt::Initrd => config.initrd = Some(arg.into()),
            ArgOpt::Append => config.append = arg,
            _ => return self.text_option(opt, label, arg),
        }
        Ok(None)
    }

    /// Options whose argument is text.
    fn text_option(
        &mut self,
        opt: ArgOpt,
        label: &str,
        arg: std::ffi::OsString,
    ) -> Result<Option<Action>, CliError> {
        let arg = arg.into_string().map_err(|a| CliError::NotText {
            option: label.to_owned(),
            lossy: a.to_string_lossy().into_owned(),
        })?;
        let invalid = |reason: &str| CliError::Invalid {
            option: label.to_owned(),
            reason: reason.to_owned(),
        };
        let config = &mut self.config;
        match opt {
            ArgOpt::Machine | ArgOpt::Cpu | ArgOpt::Device if is_help(&arg) => {
                return Ok(Some(Action::Help))
            }
            ArgOpt::Machine => machine::parse_machine(label, &arg, &mut config.machine)?,
            ArgOpt::Accel => machine::parse_accel(label, &arg)?,
            ArgOpt::Memory => {
                if let Some(size) = machine::parse_memory(label, &arg)? {
                    config.mem_size = size;
                }
            }
            ArgOpt::Smp => {
                machine::parse_smp(label, &arg, self.smp.get_or_insert_with(SmpArgs::default))?
            }
            ArgOpt::Cpu => config.cpu = machine::parse_cpu(label, &arg)?,
            // Bytes, taken by `option` (paths are checked by the VMM, which
            // opens them).
            ArgOpt::Kernel | ArgOpt::Initrd | ArgOpt::Append => {}
            ArgOpt::Name => config.name = parse_name(label, &arg)?.or(config.name.take()),
            ArgOpt::Display => parse_display(label, &arg)?,
            ArgOpt::Chardev => {
                let chardev = chardev::parse_chardev(label, &arg)?;
                if config.chardevs.iter().any(|c| c.id == chardev.id) {
                    return Err(invalid(&format!("duplicate id '{}'", chardev.id)));
                }
                config.chardevs.push(chardev);
            }
            ArgOpt::Serial => {
                if config.serials.len() == MAX_SERIALS {
                    return Err(invalid("at most 4 serial ports are supported"));
                }
                config.serials.push(chardev::parse_serial(label, &arg)?);
            }
            ArgOpt::Device => self.add_device(device::parse_device(label, &arg)?, label)?,
            ArgOpt::Smbios => {
                device::parse_smbios(label, &arg, &mut config.smbios, &mut config.smbios_oem)?
            }
            ArgOpt::FwCfg => {
                let file = device::parse_fw_cfg(label, &arg)?;
                if config.fw_cfg.iter().any(|f| f.name == file.name) {
                    return Err(invalid(&format!("duplicate fw_cfg file name: {}", file.name)));
                }
                config.fw_cfg.push(file);
            }
            ArgOpt::Drive => {
                let drive = drive::parse_drive(label, &arg)?;
                if config.drives.iter().any(|d| d.id == drive.id) {
                    return Err(invalid(&format!("duplicate id '{}'", drive.id)));
                }
                config.drives.push(drive);
            }
            ArgOpt::Netdev => {
                let netdev = netdev::parse_netdev(label, &arg)?;
                if config.netdevs.iter().any(|n| n.id() == netdev.id()) {
                    return Err(invalid(&format!("duplicate id '{}'", netdev.id())));
                }
                config.netdevs.push(netdev);
            }
            ArgOpt::Net => self.nics.push(netdev::parse_net(label, &arg)?),
            ArgOpt::Fsdev => self.add_fsdev(fsdev::parse_fsdev(label, &arg)?, label)?,
            ArgOpt::Virtfs => {
                let (fsdev, tag) = fsdev::parse_virtfs(label, &arg)?;
                self.virtfs.push((fsdev.id.clone(), tag));
                self.add_fsdev(fsdev, label)?;
            }
            ArgOpt::Object => {
                let backend = memory::parse_object(label, &arg)?;
                if self.memory_backends.iter().any(|b| b.id == backend.id) {
                    return Err(invalid(&format!("duplicate id '{}'", backend.id)));
                }
                self.memory_backends.push(backend);
            }
            ArgOpt::Numa => {
                let memdev = memory::parse_numa(label, &arg)?;
                if self.numa_node.is_some() {
                    return Err(invalid(
                        "more than one NUMA node is not supported (microvm has one memory node)",
                    ));
                }
                self.numa_node = Some(memdev);
            }
            ArgOpt::Sandbox => config.sandbox = parse_sandbox(label, &arg)?,
            ArgOpt::RunWith => parse_run_with(label, &arg, &mut config.run_with)?,
            ArgOpt::Qmp => config.qmp.push(chardev::parse_qmp(label, &arg)?),
            ArgOpt::Monitor if arg == "none" => {}
            ArgOpt::Monitor => config.monitors.push(chardev::parse_monitor(label, &arg)?),
        }
        Ok(None)
    }

    /// Checks what depends on several options, whatever their order.
    fn finish(mut self) -> Result<VmConfig, CliError> {
        if let Some(smp) = self.smp {
            self.config.smp = machine::resolve_smp("-smp", smp)?;
        }
        check_chardev_users(&self.config)?;
        self.place_nics()?;
        self.place_virtfs()?;
        for driver in crate::plan::machine_devices(&self.config.machine) {
            self.add_device(device::implied_device("-M", driver, Vec::new())?, "-M")?;
        }
        // The default machine's board has a PS/2 controller, as `pc` has,
        // unless the command line placed one itself.
        let has_i8042 = self.devices.iter().any(|d| d.kind.name() == "i8042");
        if self.config.machine.kind == crate::config::MachineKind::Default && !has_i8042 {
            self.add_device(device::implied_device("-M", "i8042", Vec::new())?, "-M")?;
        }
        self.resolve_devices()?;
        check_netdev_fds(&self.config)?;
        let node = self.numa_node.take();
        let backend = memory::resolve(&self.memory_backends, node, self.config.mem_size)?;
        if let Some(b) = backend {
            self.config.ram = b.ram.clone();
        }
        share_ram_with_vhost_user(&mut self.config, backend.map(|b| b.id.as_str()))?;
        // As QEMU: these only make sense for a direct kernel boot.
        if self.config.kernel.is_none() {
            let requires_kernel = |option: &str| CliError::Invalid {
                option: option.to_owned(),
                reason: "only allowed with -kernel".to_owned(),
            };
            if self.config.initrd.is_some() {
                return Err(requires_kernel("-initrd"));
            }
            if !self.config.append.is_empty() {
                return Err(requires_kernel("-append"));
            }
        }
        Ok(self.config)
    }

    /// Resolves every device's references to drives, netdevs, fsdevs and
    /// chardevs in one pass, in command-line order.
    fn resolve_devices(&mut self) -> Result<(), CliError> {
        let c = &mut self.config;
        let serials: Vec<&str> = c
            .serials
            .iter()
            .filter_map(|s| match s {
                SerialConfig::Chardev(id) => Some(id.as_str()),
                _ => None,
            })
            .collect();
        let mut refs = Refs::new(&c.drives, &c.netdevs, &c.fsdevs, &c.chardevs, &serials);
        for p in std::mem::take(&mut self.devices) {
            refs.resolving(p.id.as_deref());
            let device = p.device.resolve(&format!("-device {}", p.driver), &mut refs)?;
            c.devices.push(DeviceConfig {
                kind: p.kind,
                driver: p.driver,
                id: p.id,
                bus: p.bus,
                pci: p.pci,
                device,
            });
        }
        for nd in refs.unused_netdevs() {
            let id = nd.id();
            #[expect(clippy::disallowed_macros, reason = "startup: once per -netdev")]
            {
                log::warn!("netdev {id} has no peer (no -device virtio-net-*,netdev={id})");
            }
        }
        c.taken_chardevs = refs.taken_chardevs();
        Ok(())
    }
}

impl Builder {
    fn add_fsdev(
        &mut self,
        fsdev: crate::config::FsdevConfig,
        label: &str,
    ) -> Result<(), CliError> {
        if self.config.fsdevs.iter().any(|f| f.id == fsdev.id) {
            return Err(CliError::Invalid {
                option: label.to_owned(),
                reason: format!("duplicate fsdev id: {}", fsdev.id),
            });
        }
        self.config.fsdevs.push(fsdev);
        Ok(())
    }

    /// A `-device`, once its id and its kind's limit allow it.
    fn add_device(&mut self, device: device::Pending, label: &str) -> Result<(), CliError> {
        let invalid = |reason: String| CliError::Invalid { option: label.to_owned(), reason };
        if let Some(id) = &device.id {
            if self.device_ids.contains(id) {
                return Err(invalid(format!("duplicate id '{id}'")));
            }
            self.device_ids.push(id.clone());
        }
        let kind = device.kind;
        let same = self.devices.iter().filter(|d| d.kind.name() == kind.name()).count();
        if kind.max().is_some_and(|max| same >= max) {
            return Err(invalid(format!("only one {} is supported", kind.name())));
        }
        self.devices.push(device);
        Ok(())
    }

    /// `-virtfs`'s device: a virtio-9p-pci with `pcie=on`, else a
    /// virtio-9p-device, as `-net nic` places its NIC.
    fn place_virtfs(&mut self) -> Result<(), CliError> {
        for (fsdev, mount_tag) in std::mem::take(&mut self.virtfs) {
            let props = vec![("fsdev".into(), fsdev), ("mount_tag".into(), mount_tag)];
            self.place_on_the_machines_bus("-virtfs", "virtio-9p", props)?;
        }
        Ok(())
    }

    /// `-net nic`: a virtio-net-pci on the root complex with `pcie=on`,
    /// else a virtio-net-device (microvm's default NIC), after the
    /// `-device`s, as QEMU creates them.
    /// `-net nic`'s NICs come before every `-device`, as QEMU's machine
    /// creates them before the command line's devices: they get the first
    /// default MACs and names (`virtio-net-pci.0`; the NixOS test driver's
    /// `set_link virtio-net-pci.1` is the `-device` NIC after it).
    fn place_nics(&mut self) -> Result<(), CliError> {
        let argv = std::mem::take(&mut self.devices);
        for nic in std::mem::take(&mut self.nics) {
            let mut props = vec![("netdev".into(), nic.netdev)];
            if let Some(m) = nic.mac {
                let mac = m.map(|b| format!("{b:02x}")).join(":");
                props.push(("mac".into(), mac));
            }
            self.place_on_the_machines_bus("-net nic", "virtio-net", props)?;
        }
        self.devices.extend(argv);
        Ok(())
    }

    /// A device the command line implies: `FAMILY-pci` with `pcie=on`,
    /// else `FAMILY-device` on virtio-mmio; parsed as its `-device` would be.
    fn place_on_the_machines_bus(
        &mut self,
        label: &str,
        family: &str,
        props: Vec<(String, String)>,
    ) -> Result<(), CliError> {
        let suffix = if self.config.machine.has_pcie() { "pci" } else { "device" };
        let device = device::implied_device(label, &format!("{family}-{suffix}"), props)?;
        self.add_device(device, label)
    }
}

/// Inherited descriptors are not shared between netdevs.
fn check_netdev_fds(config: &VmConfig) -> Result<(), CliError> {
    let mut fds: Vec<i32> = Vec::new();
    for nd in &config.netdevs {
        if let NetdevConfig::Tap { source: crate::config::TapSource::Fds(list), .. } = nd {
            if let Some(fd) = list.iter().find(|f| fds.contains(f)) {
                return Err(CliError::Invalid {
                    option: format!("-netdev tap,id={}", nd.id()),
                    reason: format!("fd {fd} is already used by another -netdev"),
                });
            }
            fds.extend(list);
        }
    }
    Ok(())
}

/// Every `-serial chardev:ID` names a `-chardev`, no chardev feeds two serial
/// ports, and only one character device owns stdio (QEMU: "cannot use stdio
/// by multiple character devices").
fn check_chardev_users(config: &VmConfig) -> Result<(), CliError> {
    let serial_err = |reason: String| CliError::Invalid { option: "-serial".to_owned(), reason };
    let mut used: Vec<&str> = Vec::new();
    for serial in &config.serials {
        if let SerialConfig::Chardev(id) = serial {
            if !config.chardevs.iter().any(|c| c.id == *id) {
                return Err(serial_err(format!(
                    "chardev '{id}' is not defined (no -chardev with id={id})"
                )));
            }
            if used.contains(&id.as_str()) {
                return Err(serial_err(format!(
                    "chardev '{id}' is already used by another serial port"
                )));
            }
            used.push(id);
        }
    }
    let stdio_serials = config.serials.iter().filter(|s| **s == SerialConfig::Stdio).count();
    let stdio_chardevs = config
        .chardevs
        .iter()
        .filter(|c| matches!(c.backend, ChardevBackend::Stdio { .. }))
        .count();
    if stdio_serials + stdio_chardevs > 1 {
        let option = if stdio_serials > 0 { "-serial stdio" } else { "-chardev stdio" };
        return Err(CliError::Invalid {
            option: option.to_owned(),
            reason: "stdio cannot be used by more than one character device".to_owned(),
        });
    }
    Ok(())
}

/// A vhost-user backend maps guest RAM, so RAM must be a shared memfd:
/// skiff makes it one when no memory backend was given (QEMU and Cloud
/// Hypervisor fail instead), and refuses a given backend that is not.
fn share_ram_with_vhost_user(config: &mut VmConfig, backend: Option<&str>) -> Result<(), CliError> {
    let Some(driver) =
        config.devices.iter().find(|d| d.device.facts().maps_guest_ram).map(|d| d.driver)
    else {
        return Ok(());
    };
    match (backend, &config.ram.backing) {
        (_, RamBacking::Memfd { share: true, .. }) => Ok(()),
        (None, _) => {
            config.ram.backing = RamBacking::Memfd { share: true, hugetlb: None, seal: true };
            Ok(())
        }
        (Some(id), _) => Err(CliError::Invalid {
            option: format!("-device {driver}"),
            reason: format!(
                "the vhost-user backend must map guest RAM, but memory backend '{id}' is not \
                 shared: use -object memory-backend-memfd,id={id},size=...,share=on"
            ),
        }),
    }
}

/// `-name [guest=]NAME[,debug-threads=on|off][,process=NAME]`.
fn parse_name(label: &str, arg: &str) -> Result<Option<String>, CliError> {
    let mut opts = QemuOpts::parse(label, arg, Some("guest"));
    let guest = opts.take("guest");
    // Accepted: skiff names its threads anyway and keeps its process name.
    opts.take_bool("debug-threads")?;
    opts.take("process");
    opts.finish()?;
    Ok(guest)
}

/// `-display none`: skiff has no display.
fn parse_display(label: &str, arg: &str) -> Result<(), CliError> {
    let mut opts = QemuOpts::parse(label, arg, Some("type"));
    let ty = opts.take("type").ok_or_else(|| opts.missing("type"))?;
    if ty != "none" {
        return Err(opts
            .error(format!("display '{ty}' is not supported (skiff has no display; use 'none')")));
    }
    opts.relabel(format!("{label} none"));
    opts.finish()
}

/// `-sandbox on|off[,obsolete=..][,elevateprivileges=..][,spawn=..][,resourcecontrol=..]`.
fn parse_sandbox(label: &str, arg: &str) -> Result<Option<SandboxConfig>, CliError> {
    let mut opts = QemuOpts::parse(label, arg, Some("enable"));
    let enable = opts.take_bool("enable")?.unwrap_or(false);
    let mut policy = SandboxConfig::default();
    // `deny` is what skiff's allowlist does anyway; `children` (QEMU: no
    // set*id in children) too, as skiff never spawns and seccomp sets
    // no_new_privs.
    let classes: [(&str, &[&str], &'static str, &mut bool); 4] = [
        ("obsolete", &["allow", "deny"], "allow or deny", &mut policy.obsolete),
        (
            "elevateprivileges",
            &["allow", "deny", "children"],
            "allow, deny or children",
            &mut policy.elevate_privileges,
        ),
        ("spawn", &["allow", "deny"], "allow or deny", &mut policy.spawn),
        ("resourcecontrol", &["allow", "deny"], "allow or deny", &mut policy.resource_control),
    ];
    for (key, values, expected, allowed) in classes {
        if let Some(value) = opts.take(key) {
            if !values.contains(&value.as_str()) {
                return Err(opts.invalid_value(key, value, expected));
            }
            *allowed = value == "allow";
        }
    }
    opts.finish()?;
    Ok(enable.then_some(policy))
}

/// `-run-with user=NAME|UID:GID[,chroot=DIR]` (QEMU 9's form of `-runas`
/// and `-chroot`); several merge, later keys winning.
fn parse_run_with(label: &str, arg: &str, run_with: &mut RunWith) -> Result<(), CliError> {
    let mut opts = QemuOpts::parse(label, arg, None);
    if let Some(user) = opts.take("user") {
        let ids = user.split_once(':').map(|(u, g)| (u.parse::<u32>(), g.parse::<u32>()));
        run_with.user = Some(match ids {
            Some((Ok(uid), Ok(gid))) => RunAs::Ids { uid, gid },
            Some(_) => {
                return Err(opts.invalid_value("user", user, "a user name or UID:GID"));
            }
            None if user.is_empty() => {
                return Err(opts.invalid_value("user", user, "a user name or UID:GID"));
            }
            None => RunAs::Name(user),
        });
    }
    if let Some(dir) = opts.take_path("chroot")? {
        run_with.chroot = Some(dir);
    }
    if opts.contains("async-teardown") {
        return Err(opts.error("async-teardown is not supported"));
    }
    opts.finish()
}

/// Parsing helpers for the tests of the kinds and the VMM.
#[cfg(any(test, feature = "fuzzing"))]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod tests_support {
    use super::{parse, Action, VmConfig};
    use crate::config::DeviceConfig;
    use crate::kinds::Device;

    /// A whole command line's configuration, or its error's message.
    pub fn config(line: &[&str]) -> Result<VmConfig, String> {
        match parse(line.iter().map(|s| s.to_string())) {
            Ok(Action::Run(config)) => Ok(*config),
            Ok(other) => Err(format!("not a VM: {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// `-device ARG` alone (on a machine with PCIe), as its kind's type,
    /// with its `id=`.
    pub fn device<T: Device>(arg: &str) -> Result<(T, Option<String>), String> {
        let mut cfg = config(&["-M", "microvm,pcie=on", "-device", arg])?;
        let d = cfg.devices.remove(0);
        let id = d.id.clone();
        match d.device.into_any().downcast::<T>() {
            Ok(t) => Ok((*t, id)),
            Err(_) => Err(format!("-device {arg} is another kind")),
        }
    }

    /// A configured device, as a test expects it.
    pub fn expected(driver: &'static str, id: Option<&str>, device: impl Device) -> DeviceConfig {
        let (kind, d) = crate::kinds::driver(driver).expect("a registered driver");
        DeviceConfig {
            kind,
            driver,
            id: id.map(str::to_owned),
            bus: d.bus,
            pci: Default::default(),
            device: Box::new(device),
        }
    }
}
