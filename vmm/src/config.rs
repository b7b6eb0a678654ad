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

/// How the guest reaches a virtio device: `-device NAME-device` (virtio-mmio)
/// or `-device NAME-pci` (virtio-pci on the root complex).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VirtioTransport {
    Mmio,
    Pci(PciSlotConfig),
}

/// What a virtio device is, whatever its transport: one variant per
/// family, parsed from the family's own properties (`cli::device`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VirtioKind {
    /// `virtio-rng-*[,max-bytes=N][,period=MS]`: QEMU's rate limit of
    /// `max_bytes` per `period_ms` milliseconds when `max_bytes` is given.
    Rng { max_bytes: Option<u64>, period_ms: Option<u64> },
    /// `virtio-blk-*,drive=ID[,serial=S][,num-queues=N][,queue-size=N]...`
    Block(BlockConfig),
    /// `vhost-user-fs-*,chardev=ID,tag=TAG[,queue-size=N][,num-request-queues=N]`
    Fs(FsConfig),
    /// `vhost-vsock-*,guest-cid=N`: the host kernel's vhost-vsock.
    Vsock { guest_cid: u32 },
    /// `virtio-net-*,netdev=ID[,mac=MAC][,mq=on]`
    Net(NetConfig),
    /// `virtio-9p-*,fsdev=ID,mount_tag=TAG`: a `-fsdev local` share.
    P9(P9Config),
}

/// `-device virtio-9p-*` (its host side is the `-fsdev` named by `fsdev`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct P9Config {
    pub fsdev: String,
    pub mount_tag: String,
}

/// `-fsdev local`: a host directory a virtio-9p device shares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsdevConfig {
    pub id: String,
    pub path: PathBuf,
    pub security: devices::virtio::p9::SecurityModel,
    pub readonly: bool,
}

/// `-device virtio-net-*` (its host side is the `-netdev` named by
/// `netdev`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub netdev: String,
    /// None until the command line is complete: then QEMU's default,
    /// 52:54:00:12:34:56 plus the NIC's index.
    pub mac: Option<[u8; 6]>,
    /// `mq=on`: offer the tap's queues as queue pairs.
    pub mq: bool,
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
}

pub use devices::virtio::net::user::{HostFwd, UserConfig};

impl NetdevConfig {
    pub fn id(&self) -> &str {
        match self {
            NetdevConfig::Tap { id, .. }
            | NetdevConfig::User { id, .. }
            | NetdevConfig::Bridge { id, .. } => id,
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

/// `-device vhost-user-fs-*`: virtiofsd on the `-chardev socket` named by
/// `chardev`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsConfig {
    pub chardev: String,
    pub tag: String,
    pub queue_size: u16,
    pub num_request_queues: u16,
}

/// `-device virtio-blk-*` (its image is the `-drive` named by `drive`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    pub drive: String,
    pub serial: Option<String>,
    /// None: QEMU's default, one queue per vCPU on PCI, one on MMIO.
    pub num_queues: Option<u16>,
    pub queue_size: u16,
    pub logical_block_size: u32,
    pub physical_block_size: u32,
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
    /// `format=raw` was given (else QEMU warns that it probed).
    pub format_given: bool,
    /// `aio=`: a thread pool or an io_uring per queue.
    pub aio: Aio,
}

impl VirtioKind {
    /// The family's name: `-device` takes it with `-pci` or `-device`.
    pub fn family(&self) -> &'static str {
        match self {
            VirtioKind::Rng { .. } => "virtio-rng",
            VirtioKind::Block(_) => "virtio-blk",
            VirtioKind::Fs(_) => "vhost-user-fs",
            VirtioKind::Vsock { .. } => "vhost-vsock",
            VirtioKind::Net(_) => "virtio-net",
            VirtioKind::P9(_) => "virtio-9p",
        }
    }

    /// The `-chardev` of a vhost-user backend, if the device has one.
    pub fn vhost_user_chardev(&self) -> Option<&str> {
        match self {
            VirtioKind::Fs(f) => Some(&f.chardev),
            VirtioKind::Rng { .. }
            | VirtioKind::Block(_)
            | VirtioKind::Vsock { .. }
            | VirtioKind::Net(_)
            | VirtioKind::P9(_) => None,
        }
    }
}

/// One virtio `-device`: the same description on either transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioConfig {
    pub id: Option<String>,
    pub transport: VirtioTransport,
    pub kind: VirtioKind,
}

impl VirtioConfig {
    /// The `-device` driver name, as QEMU names the device in errors.
    pub fn driver(&self) -> String {
        let suffix = match self.transport {
            VirtioTransport::Mmio => "device",
            VirtioTransport::Pci(_) => "pci",
        };
        format!("{}-{suffix}", self.kind.family())
    }
}

/// `pcie-root-port,chassis=N,slot=N[,port=N]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootPortConfig {
    pub id: Option<String>,
    pub pci: PciSlotConfig,
    pub chassis: u8,
    pub slot: u16,
    pub port: u8,
}

/// A `-device`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceConfig {
    I8042,
    IsaDebugExit { iobase: u16, iosize: u16 },
    RootPort(RootPortConfig),
    Virtio(VirtioConfig),
}

impl DeviceConfig {
    /// Where it asks to go on the root complex, if it is a PCI function:
    /// (driver, id, slot request, whether it is a root port).
    pub fn pci_slot(&self) -> Option<(String, Option<&str>, &PciSlotConfig, bool)> {
        match self {
            DeviceConfig::RootPort(p) => {
                Some(("pcie-root-port".to_owned(), p.id.as_deref(), &p.pci, true))
            }
            DeviceConfig::Virtio(v) => match &v.transport {
                VirtioTransport::Pci(slot) => Some((v.driver(), v.id.as_deref(), slot, false)),
                VirtioTransport::Mmio => None,
            },
            _ => None,
        }
    }
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

#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// `-drive`s, for the devices that name them.
    pub drives: Vec<DriveConfig>,
    /// `-netdev`s, for the NICs that name them.
    pub netdevs: Vec<NetdevConfig>,
    /// `-fsdev`s (and `-virtfs`'s), for the 9p devices that name them.
    pub fsdevs: Vec<FsdevConfig>,
    pub smbios: Option<SmbiosType1>,
    /// `-sandbox on`, with the classes its switches allow.
    pub sandbox: Option<SandboxConfig>,
    /// `-run-with user=,chroot=`.
    pub run_with: RunWith,
    /// `-qmp` monitors.
    pub qmp: Vec<QmpConfig>,
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
            drives: Vec::new(),
            netdevs: Vec::new(),
            fsdevs: Vec::new(),
            smbios: None,
            sandbox: None,
            run_with: RunWith::default(),
            qmp: Vec::new(),
        }
    }
}
