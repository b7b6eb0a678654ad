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

/// Which machine: QEMU microvm as asked for by name, or skiff's default
/// machine when no `-M` names a type (QEMU's default is `pc`, with PCI).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MachineKind {
    /// No type given: microvm's board with what a QEMU `pc` guest expects
    /// of a direct kernel boot — the PCIe root (`pcie` auto → on), the
    /// i8042 and the CMOS RTC (`rtc` auto → on).
    #[default]
    Default,
    /// `-M microvm`: QEMU microvm's defaults.
    Microvm,
}

/// `-M microvm,...`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    pub kind: MachineKind,
    /// `acpi=` (auto → on, as QEMU microvm).
    pub acpi: OnOffAuto,
    /// `pcie=` (auto → off on microvm, on on the default machine).
    pub pcie: OnOffAuto,
    /// `pic=` (auto → on, as QEMU microvm).
    pub pic: OnOffAuto,
    /// `pit=` (auto → on).
    pub pit: OnOffAuto,
    /// `rtc=` (auto → off under KVM on microvm, as QEMU microvm; FADT then
    /// says so; on on the default machine).
    pub rtc: OnOffAuto,
    /// `usb=` (and `-usb`): taken, but there is no USB controller; startup
    /// says so when it is on.
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

impl MachineConfig {
    /// Whether the machine has the PCIe root complex.
    pub fn has_pcie(&self) -> bool {
        self.pcie.resolve(self.kind == MachineKind::Default)
    }

    /// Whether the machine has the CMOS RTC: QEMU microvm leaves it out
    /// under KVM unless asked (the FADT then says so, and the guest does
    /// not probe for it); a `pc` guest expects one.
    pub fn has_rtc(&self) -> bool {
        self.rtc.resolve(self.kind == MachineKind::Default)
    }
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            kind: MachineKind::Default,
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
    /// `socket,path=PATH[,server=on][,wait=off][,reconnect=S|reconnect-ms=MS]`
    /// (Unix sockets only; a client retries every `reconnect_ms` after it
    /// lost its server, None or 0 meaning never).
    Socket { path: PathBuf, server: bool, wait: bool, reconnect_ms: Option<u64> },
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

/// Where a PCI function asks to go: `bus=`, `addr=`, `multifunction=`.
/// The bus allocator in `pci` places it (explicit `addr=` first, whatever
/// the command-line order).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PciSlotConfig {
    /// `bus=`: `pcie.0` or a root port's id.
    pub bus: Option<String>,
    pub addr: Option<pci::DevFn>,
    pub multifunction: bool,
}

/// A `-device`: its driver, `id=`, where it asks to go, and its kind's
/// own properties (`kinds`), references to other options resolved.
pub struct DeviceConfig {
    /// Its kind's registry entry.
    pub kind: &'static dyn crate::kinds::Kind,
    /// The `-device` name, as QEMU names the device in errors.
    pub driver: &'static str,
    pub id: Option<String>,
    pub bus: crate::kinds::Bus,
    /// `addr=`, `bus=`, `multifunction=` (default off the root complex).
    pub pci: PciSlotConfig,
    pub device: Box<dyn crate::kinds::Device>,
}

impl PartialEq for DeviceConfig {
    fn eq(&self, o: &Self) -> bool {
        self.kind.name() == o.kind.name()
            && (self.driver, &self.id, self.bus, &self.pci) == (o.driver, &o.id, o.bus, &o.pci)
            && *self.device == *o.device
    }
}

impl Eq for DeviceConfig {}

impl std::fmt::Debug for DeviceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceConfig")
            .field("driver", &self.driver)
            .field("id", &self.id)
            .field("bus", &self.bus)
            .field("pci", &self.pci)
            .field("device", &self.device)
            .finish()
    }
}

/// `-fsdev local`: a host directory a virtio-9p device shares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsdevConfig {
    pub id: String,
    pub path: PathBuf,
    pub security: devices::virtio::p9::SecurityModel,
    pub readonly: bool,
}

/// `-netdev`: a NIC's host side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetdevConfig {
    /// `-netdev tap`: an existing (or new) tap, or descriptors of one.
    Tap { id: String, source: TapSource, vhost: bool },
    /// `-netdev user`: libslirp's network behind the NIC.
    User { id: String, config: UserConfig },
    /// `-netdev bridge`: a tap on bridge `br` from QEMU's setuid helper.
    Bridge { id: String, br: String, helper: String },
    /// `-netdev vde`: a port of a VDE switch (the NixOS test driver's
    /// vlans).
    Vde { id: String, sock: String, port: u32, group: Option<String>, mode: u32 },
}

pub use devices::virtio::net::user::{HostFwd, UserConfig};

impl NetdevConfig {
    pub fn id(&self) -> &str {
        match self {
            NetdevConfig::Tap { id, .. }
            | NetdevConfig::User { id, .. }
            | NetdevConfig::Bridge { id, .. }
            | NetdevConfig::Vde { id, .. } => id,
        }
    }
}

/// Where a tap's queues come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TapSource {
    /// `ifname=NAME[,queues=N]`: skiff opens (or creates) it.
    Ifname { name: String, queues: u16 },
    /// `fd=N` / `fds=N:M:...`: inherited from the parent, one per queue.
    Fds(Vec<i32>),
}

impl TapSource {
    pub fn queues(&self) -> usize {
        match self {
            TapSource::Ifname { queues, .. } => usize::from(*queues),
            TapSource::Fds(fds) => fds.len(),
        }
    }
}

pub use devices::virtio::block::{Aio, DetectZeroes};

/// `-drive if=none,id=ID,file=PATH,...`: a raw image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveConfig {
    pub id: String,
    /// Absolute (a relative `file=` is taken from the working directory).
    pub file: PathBuf,
    pub read_only: bool,
    /// `cache=none|directsync` or `cache.direct=on`: O_DIRECT.
    pub direct: bool,
    /// `cache=writethrough|directsync`: O_DSYNC.
    pub dsync: bool,
    /// `cache=unsafe`: flushes do nothing.
    pub ignore_flush: bool,
    /// `discard=unmap`.
    pub discard: bool,
    pub detect_zeroes: DetectZeroes,
    /// `file.locking=` (default on).
    pub locking: bool,
    /// `format=` was given (else the image is probed as QEMU probes it).
    pub format_given: bool,
    /// `format=qcow2`.
    pub qcow2: bool,
    /// `aio=`: a thread pool or an io_uring per queue.
    pub aio: Aio,
}

/// Guest RAM's host backing: `-object memory-backend-*` bound with
/// `-numa node,memdev=`, or anonymous memory without them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RamBacking {
    /// Anonymous private memory (no `-object`, or `memory-backend-ram` with
    /// `share=off`).
    #[default]
    Anonymous,
    /// `memory-backend-ram,share=on`: anonymous shared memory.
    AnonymousShared,
    /// `memory-backend-memfd`: a memfd (`/memfd:memory-backend-memfd` in
    /// /proc/PID/maps) that a vhost-user backend can map.
    Memfd {
        share: bool,
        /// `hugetlb=on`: the page size (`hugetlbsize=`, 0 for the host's
        /// default).
        hugetlb: Option<u64>,
        /// `seal=on` (default): F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL.
        seal: bool,
    },
}

/// Guest RAM's host memory and what the host may do with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamConfig {
    pub backing: RamBacking,
    /// `merge=`: MADV_MERGEABLE (None: the machine's `mem-merge`).
    pub merge: Option<bool>,
    /// `dump=off`: MADV_DONTDUMP, guest RAM left out of skiff's core dumps.
    pub dump: bool,
}

impl Default for RamConfig {
    fn default() -> Self {
        RamConfig { backing: RamBacking::Anonymous, merge: None, dump: true }
    }
}

/// One `-object memory-backend-*`, as parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryBackendConfig {
    pub id: String,
    pub size: u64,
    pub ram: RamConfig,
}

/// `-fw_cfg [name=]NAME,file=PATH|string=STR`: a file the guest reads
/// through fw_cfg (systemd's credentials: `opt/io.systemd.credentials/*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FwCfgFile {
    pub name: String,
    pub content: FwCfgContent,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FwCfgContent {
    /// Read once, when skiff starts.
    File(std::path::PathBuf),
    /// The string's bytes, without a NUL.
    Text(String),
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

/// `-sandbox on`'s switches: true where a class is `allow`ed. Skiff's
/// filter is an allowlist, so a class is out unless its switch lets it in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SandboxConfig {
    pub obsolete: bool,
    pub elevate_privileges: bool,
    pub spawn: bool,
    pub resource_control: bool,
}

/// Who skiff becomes once everything privileged is open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunWith {
    pub user: Option<RunAs>,
    pub chroot: Option<std::path::PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunAs {
    /// Looked up in the user database (before any chroot).
    Name(String),
    Ids {
        uid: u32,
        gid: u32,
    },
}

#[derive(Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub name: Option<String>,
    pub machine: MachineConfig,
    /// Guest RAM in bytes (`-m`, default 128 MiB as QEMU).
    pub mem_size: u64,
    /// How guest RAM is backed (resolved from `-object`/`-numa`).
    pub ram: RamConfig,
    pub smp: SmpConfig,
    pub cpu: CpuConfig,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// `-append`: bytes for the kernel, UTF-8 or not.
    pub append: std::ffi::OsString,
    pub no_reboot: bool,
    /// `-nodefaults`: no default serial on stdio.
    pub nodefaults: bool,
    /// `-nographic` (no display; with defaults on, serial goes to stdio).
    pub nographic: bool,
    pub chardevs: Vec<ChardevConfig>,
    /// `-serial` in order: the first is COM1 (0x3f8). Empty means "default".
    pub serials: Vec<SerialConfig>,
    pub devices: Vec<DeviceConfig>,
    /// Chardevs a serial port or a device took (the others are opened as
    /// QEMU opens them, used or not).
    pub taken_chardevs: Vec<String>,
    /// `-drive`s, for the devices that name them.
    pub drives: Vec<DriveConfig>,
    /// `-netdev`s, for the NICs that name them.
    pub netdevs: Vec<NetdevConfig>,
    /// `-fsdev`s (and `-virtfs`'s), for the 9p devices that name them.
    pub fsdevs: Vec<FsdevConfig>,
    pub smbios: Option<SmbiosType1>,
    /// `-smbios type=11,value=...`: the OEM strings, in order.
    pub smbios_oem: Vec<String>,
    /// `-fw_cfg`s, in command-line order.
    pub fw_cfg: Vec<FwCfgFile>,
    /// `-sandbox on`, with the classes its switches allow.
    pub sandbox: Option<SandboxConfig>,
    /// `-run-with user=,chroot=`.
    pub run_with: RunWith,
    /// `-qmp` monitors.
    pub qmp: Vec<QmpConfig>,
    /// `-monitor` human monitors (HMP).
    pub monitors: Vec<MonitorConfig>,
}

/// `-monitor unix:PATH[,server=on[,wait=off]][,reconnect=S]`: QEMU's human
/// monitor on a Unix socket, skiff connecting (the NixOS test driver
/// listens) or listening.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MonitorConfig {
    pub path: PathBuf,
    pub server: bool,
    pub wait: bool,
    pub reconnect_ms: Option<u64>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            name: None,
            machine: MachineConfig::default(),
            mem_size: 128 << 20,
            ram: RamConfig::default(),
            smp: SmpConfig::default(),
            cpu: CpuConfig::default(),
            kernel: None,
            initrd: None,
            append: std::ffi::OsString::new(),
            no_reboot: false,
            nodefaults: false,
            nographic: false,
            chardevs: Vec::new(),
            serials: Vec::new(),
            devices: Vec::new(),
            taken_chardevs: Vec::new(),
            drives: Vec::new(),
            netdevs: Vec::new(),
            fsdevs: Vec::new(),
            smbios: None,
            smbios_oem: Vec::new(),
            fw_cfg: Vec::new(),
            sandbox: None,
            run_with: RunWith::default(),
            qmp: Vec::new(),
            monitors: Vec::new(),
        }
    }
}
