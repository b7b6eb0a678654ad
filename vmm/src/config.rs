//! The typed VM configuration that the command line parses into.
//!
//! Every QEMU option and `-device` property is parsed once, in `cli`, into these
//! structs; the rest of the VMM never sees a string key.

use std::path::PathBuf;

/// QEMU's `OnOffAuto`: `auto` lets the machine decide (see `MachineConfig` for
/// what each `auto` resolves to on microvm under KVM).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnOffAuto {
    On,
    Off,
    #[default]
    Auto,
}

impl OnOffAuto {
    /// Resolves `auto` to `default`.
    pub fn resolve(self, default: bool) -> bool {
        match self {
            OnOffAuto::On => true,
            OnOffAuto::Off => false,
            OnOffAuto::Auto => default,
        }
    }
}

/// `-M microvm,...`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    /// `acpi=` (auto → on, as QEMU microvm).
    pub acpi: OnOffAuto,
    /// `pcie=` (auto → off).
    pub pcie: OnOffAuto,
    /// `pic=` (auto → on, as QEMU microvm).
    pub pic: OnOffAuto,
    /// `pit=` (auto → on).
    pub pit: OnOffAuto,
    /// `rtc=` (auto → off under KVM, as QEMU microvm; FADT then says so).
    pub rtc: OnOffAuto,
    /// `usb=` (only `off`/`auto` are supported: there is no xHCI).
    pub usb: OnOffAuto,
    /// `mem-merge=` → MADV_MERGEABLE on guest RAM.
    pub mem_merge: bool,
    /// `isa-serial=` (default on): whether the ISA UART exists at all.
    pub isa_serial: bool,
    /// `x-option-roms=` (accepted; Skiff never loads option ROMs).
    pub option_roms: bool,
    /// `auto-kernel-cmdline=` (default on): append device hints to the cmdline.
    pub auto_kernel_cmdline: bool,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            acpi: OnOffAuto::Auto,
            pcie: OnOffAuto::Auto,
            pic: OnOffAuto::Auto,
            pit: OnOffAuto::Auto,
            rtc: OnOffAuto::Auto,
            usb: OnOffAuto::Auto,
            mem_merge: true,
            isa_serial: true,
            option_roms: true,
            auto_kernel_cmdline: true,
        }
    }
}

/// `-smp`. `cpus` is always resolved (QEMU's rules: missing values are derived).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmpConfig {
    pub cpus: u32,
    pub sockets: u32,
    pub cores: u32,
    pub threads: u32,
}

impl Default for SmpConfig {
    fn default() -> Self {
        SmpConfig { cpus: 1, sockets: 1, cores: 1, threads: 1 }
    }
}

impl SmpConfig {
    /// What CPUID and the APIC IDs are built from.
    pub fn topology(&self) -> boot::cpu::Topology {
        boot::cpu::Topology { cpus: self.cpus, cores: self.cores, threads: self.threads }
    }
}

/// `-cpu host[,+feat,-feat,feat=on|off]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuConfig {
    /// Feature flags in command-line order: (QEMU feature name, enabled).
    pub features: Vec<(String, bool)>,
}

/// `-chardev BACKEND,id=ID,...`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChardevConfig {
    pub id: String,
    pub backend: ChardevBackend,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChardevBackend {
    /// `stdio[,signal=on|off]`: `signal` (default on) lets Ctrl-C end skiff.
    Stdio { signal: bool },
    /// `file,path=PATH[,append=on]`
    File { path: PathBuf, append: bool },
    /// `null`
    Null,
    /// `socket,path=PATH[,server=on][,wait=off]` (Unix sockets only).
    Socket { path: PathBuf, server: bool, wait: bool },
}

/// Where a `-serial` goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialConfig {
    Stdio,
    Null,
    File(PathBuf),
    /// `chardev:ID`, resolved against `VmConfig::chardevs` by the VMM.
    Chardev(String),
    /// `none`
    None,
}

/// Where a `-qmp` monitor listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QmpAddress {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

/// `-qmp unix:PATH,server,nowait` / `tcp:HOST:PORT,server=on,wait=off`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpConfig {
    pub address: QmpAddress,
    /// `wait=on` (QEMU's default for a server): start the VM only once a
    /// client has connected.
    pub wait: bool,
}

/// What a PCI `-device` is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PciKind {
    /// `pcie-root-port,chassis=N,slot=N[,port=N]`
    RootPort { chassis: u8, slot: u16, port: u8 },
    /// `virtio-rng-pci[,max-bytes=N][,period=MS]`
    VirtioRng { max_bytes: Option<u64>, period_ms: Option<u64> },
}

/// A `-device` on the PCIe root complex; the bus allocator in `pci` places
/// it (explicit `addr=` first, whatever the command-line order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciDeviceConfig {
    pub driver: String,
    pub id: Option<String>,
    /// `bus=`: `pcie.0` or a root port's id.
    pub bus: Option<String>,
    pub addr: Option<pci::DevFn>,
    pub multifunction: bool,
    pub kind: PciKind,
}

/// A `-device`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceConfig {
    I8042,
    IsaDebugExit {
        iobase: u16,
        iosize: u16,
    },
    /// `virtio-rng-device` (virtio-mmio): QEMU's `max-bytes` per `period`
    /// milliseconds rate limit when `max_bytes` is given.
    VirtioRngMmio {
        max_bytes: Option<u64>,
        period_ms: Option<u64>,
    },
    Pci(PciDeviceConfig),
}

/// `-smbios type=1,...`: kept for the SMBIOS table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SmbiosType1 {
    pub manufacturer: Option<String>,
    pub product: Option<String>,
    pub version: Option<String>,
    pub serial: Option<String>,
    pub uuid: Option<String>,
    pub sku: Option<String>,
    pub family: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub name: Option<String>,
    pub machine: MachineConfig,
    /// Guest RAM in bytes (`-m`, default 128 MiB as QEMU).
    pub mem_size: u64,
    pub smp: SmpConfig,
    pub cpu: CpuConfig,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: String,
    pub no_reboot: bool,
    /// `-nodefaults`: no default serial on stdio.
    pub nodefaults: bool,
    /// `-nographic` (no display; with defaults on, serial goes to stdio).
    pub nographic: bool,
    pub chardevs: Vec<ChardevConfig>,
    /// `-serial` in order: the first is COM1 (0x3f8). Empty means "default".
    pub serials: Vec<SerialConfig>,
    pub devices: Vec<DeviceConfig>,
    pub smbios: Option<SmbiosType1>,
    /// `-sandbox on`.
    pub sandbox: bool,
    /// `-qmp` monitors.
    pub qmp: Vec<QmpConfig>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            name: None,
            machine: MachineConfig::default(),
            mem_size: 128 << 20,
            smp: SmpConfig::default(),
            cpu: CpuConfig::default(),
            kernel: None,
            initrd: None,
            append: String::new(),
            no_reboot: false,
            nodefaults: false,
            nographic: false,
            chardevs: Vec::new(),
            serials: Vec::new(),
            devices: Vec::new(),
            smbios: None,
            sandbox: false,
            qmp: Vec::new(),
        }
    }
}
