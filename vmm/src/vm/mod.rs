//! One run of the machine: build it from the plan, boot, run the event
//! loop until something stops it, tear it down. A guest reset is a new run
//! (the caller loops): a new VM and new device models, on the same plan,
//! the same host backends and the same RAM.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use boot::GuestMemoryMmap;
use devices::{Bus, VmEvent};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::backends::Backends;
use crate::config::VmConfig;
use crate::host::console::SerialBackend;
use crate::plan::MachinePlan;
use control::Control;
use vcpu::{VcpuContext, VcpuHandle};

mod board;
pub mod control;
mod event_loop;
mod irq;
pub mod memory;
pub mod vcpu;
use irq::GsiRouter;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("{what}")]
    KvmIoctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest RAM")]
    Memory(#[from] crate::vm::memory::Error),
    #[error("serial console")]
    Console(#[from] crate::host::console::Error),
    #[error("device layout")]
    Bus(#[from] devices::BusError),
    #[error("-kernel {path}")]
    Kernel {
        path: String,
        #[source]
        source: boot::linux::Error,
    },
    #[error("-kernel: cannot open '{path}'")]
    OpenKernel {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("-initrd: cannot open '{path}'")]
    OpenInitrd {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("-initrd {path}")]
    Initrd {
        path: String,
        #[source]
        source: boot::linux::Error,
    },
    #[error("no kernel given: use -kernel (skiff has no firmware to boot from disk)")]
    NoKernel,
    #[error("ACPI tables")]
    Acpi(#[source] boot::acpi::AcpiError),
    #[error("MP table")]
    Mptable(#[source] boot::mptable::MptableError),
    #[error("SMBIOS tables")]
    Smbios(#[source] boot::smbios::SmbiosError),
    #[error("vCPU setup")]
    Cpu(#[from] boot::cpu::Error),
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("event loop: {0:?}")]
    EventManager(event_manager::Error),
    #[error("{0}")]
    Internal(String),
    #[error("PCI")]
    PciRoot(#[source] pci::RootError),
    #[error("virtio-pci")]
    VirtioPci(#[source] pci::VirtioPciError),
    #[error("virtio-mmio")]
    VirtioMmio(#[source] devices::virtio::MmioError),
}

pub type Result<T> = std::result::Result<T, Error>;

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::KvmIoctl { what, source }
}

pub(crate) fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// How a run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RunEnd {
    Guest(VmEvent),
    Signal(i32),
    Fatal(String),
    /// QMP `quit`.
    Quit,
    /// QMP `system_reset`.
    HostReset,
}

/// What skiff learns from /dev/kvm once, for every run.
pub struct Host {
    kvm: Kvm,
    supported: kvm_bindings::CpuId,
    tsc_deadline: bool,
}

impl Host {
    pub fn open() -> Result<Self> {
        let kvm = Kvm::new().map_err(Error::Kvm)?;
        let supported = kvm
            .get_supported_cpuid(boot::cpu::MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
        Ok(Host { kvm, supported, tsc_deadline })
    }

    /// The guest-physical address width (sizes the 64-bit PCI window).
    pub fn phys_bits(&self) -> u8 {
        boot::cpu::phys_bits(&self.supported)
    }
}

/// Everything that stays the same from one run to the next.
pub struct Machine<'a> {
    pub cfg: &'a VmConfig,
    pub plan: &'a MachinePlan,
    /// The guest's RAM, kept across runs.
    pub ram: &'a memory::GuestRam,
    pub backends: &'a Backends,
    pub host: &'a Host,
    pub console: Option<&'a SerialBackend>,
    pub signal_evt: &'a EventFd,
    /// The monitors (QMP) that serve each run, given its controls.
    pub monitors: &'a Monitors<'a>,
    /// Where devices tell the monitors things (QMP events).
    pub notices: &'a Arc<crate::ctl::Notices>,
}

/// An event-loop subscriber of a run (monitors, relays, resamplers,
/// timers).
pub type Subscriber = Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>;

/// Makes a run's monitor subscribers from its controls.
pub type Monitors<'a> = dyn Fn(&crate::ctl::Controls) -> Vec<Subscriber> + 'a;

/// Opens the files a run needs, so a bad path fails before any VM exists.
pub struct BootFiles {
    kernel: File,
    kernel_path: String,
    initrd: Option<(File, String)>,
}

impl BootFiles {
    pub fn open(cfg: &VmConfig) -> Result<Self> {
        let kpath = cfg.kernel.as_ref().ok_or(Error::NoKernel)?;
        let kernel_path = kpath.display().to_string();
        let kernel = File::open(kpath)
            .map_err(|source| Error::OpenKernel { path: kernel_path.clone(), source })?;
        let initrd = match &cfg.initrd {
            Some(p) => {
                let path = p.display().to_string();
                let f = File::open(p)
                    .map_err(|source| Error::OpenInitrd { path: path.clone(), source })?;
                Some((f, path))
            }
            None => None,
        };
        Ok(BootFiles { kernel, kernel_path, initrd })
    }
}

/// Builds and runs the machine once.
pub fn run(m: &Machine<'_>, files: &mut BootFiles) -> Result<RunEnd> {
    let (cfg, plan) = (m.cfg, m.plan);
    // Creating a VM sleeps interruptibly (slowly under nesting): a signal
    // that is not a termination (a vCPU kick) is no reason to fail.
    let vm = loop {
        match m.host.kvm.create_vm() {
            Err(e) if e.errno() == libc::EINTR && crate::host::signals::last_signal().is_none() => {
            }
            r => break r,
        }
    };
    let vm = Arc::new(vm.map_err(kvm_err("KVM_CREATE_VM"))?);
    // Intel needs a 3-page TSS area below 4 GiB before the irqchip exists.
    let tss = boot::layout::KVM_TSS_ADDRESS as usize;
    vm.set_tss_address(tss).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = plan.platform.pit;
    let router = Arc::new(GsiRouter::new(vm.clone(), pit).map_err(io_err("GSI routing"))?);
    if pit {
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    }

    let mem = m.ram.memory().clone();
    let mut map = memory::GuestMap::new(vm.clone(), m.host.kvm.get_nr_memslots() as u32);
    map.add_ram(&mem)?;
    let map = Arc::new(Mutex::new(map));
    m.backends.attach(&mem)?;

    let control = Arc::new(Control::new().map_err(io_err("eventfd"))?);
    let discard = m.ram.discarder();
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let ctx = board::BoardContext {
        cfg,
        plan,
        backends: m.backends,
        vm: &vm,
        mem: &mem,
        router: &router,
        control: &control,
        console: m.console,
        pio: &pio,
        mmio: &mmio,
        guest_map: &map,
        discard: &discard,
        notices: m.notices,
    };
    let mut board = board::build(&ctx)?;

    let entry = load_guest(cfg, plan, &mem, files)?;
    let vcpus = create_vcpus(cfg, m.host, &vm, &mem, &entry)?;

    let stop = Arc::new(AtomicBool::new(false));
    let mut handles: Vec<VcpuHandle> = Vec::with_capacity(vcpus.len());
    for (i, vcpu) in vcpus.into_iter().enumerate() {
        let ctx = VcpuContext {
            watched_ports: board::watched_ports(cfg, &board),
            pio: pio.clone(),
            mmio: mmio.clone(),
            control: control.clone(),
            stop: stop.clone(),
        };
        handles.push(vcpu::spawn(i as u32, vcpu, ctx).map_err(io_err("spawning a vCPU thread"))?);
    }

    crate::diag::trace::milestone(crate::diag::trace::Milestone::VmReady);
    let mut console = board.console.take();
    let end = event_loop::run(&control, m.signal_evt, board, m.monitors);

    stop.store(true, Ordering::Release);
    for h in handles {
        h.stop();
    }
    if crate::host::signals::last_signal().is_some() && crate::diag::stall::enabled() {
        crate::diag::stall::dump_interrupt_controllers(&vm, pit);
    }
    // The guest's last words reach the reader before skiff reports anything.
    if let Some(c) = console.as_mut() {
        c.finish();
    }
    let guest: Vec<(u64, u64)> = mem.iter().map(|r| (r.as_ptr() as u64, r.len())).collect();
    crate::diag::trace::record_memory(&guest);
    // The buses hold the devices: dropping them stops every device's
    // worker (and waits for it), so nothing touches guest memory after
    // this. The VM (and its memslots) must go before the mappings behind
    // them; the buses (BAR mappers) and the router hold the last other
    // references.
    drop((pio, mmio, router, map));
    m.backends.detach(&mem);
    // Anything still holding the VM now would outlive guest memory: a
    // reference cycle, i.e. a VM leaked on every guest reboot.
    if let Err(vm) = Arc::try_unwrap(vm) {
        devices::error_limited!(
            "VM teardown: {} references to the VM remain",
            Arc::strong_count(&vm) - 1
        );
    }
    end
}

/// Loads kernel and initrd, writes firmware tables and boot parameters.
fn load_guest(
    cfg: &VmConfig,
    plan: &MachinePlan,
    mem: &GuestMemoryMmap,
    files: &mut BootFiles,
) -> Result<boot::linux::KernelEntry> {
    let p = &plan.platform;
    let kernel = boot::linux::load_kernel(mem, &mut files.kernel)
        .map_err(|source| Error::Kernel { path: files.kernel_path.clone(), source })?;

    // The tables refuse an ID past 254; -smp already did.
    let apic_ids = cfg.smp.topology().apic_ids();
    let rsdp = if p.acpi {
        let acpi = boot::acpi::AcpiConfig {
            apic_ids,
            i8042: p.i8042,
            rtc: p.rtc,
            pic: p.pic,
            pit: p.pit,
            devices: plan.dsdt.clone(),
            mcfg: plan.pcie.map(|pcie| boot::acpi::Mcfg {
                ecam_base: boot::layout::PCIE_ECAM_BASE,
                last_bus: pcie.last_bus,
            }),
            ..Default::default()
        };
        Some(boot::acpi::create_acpi_tables(mem, &acpi).map_err(Error::Acpi)?)
    } else {
        boot::mptable::setup_mptable(mem, &apic_ids, p.pic).map_err(Error::Mptable)?;
        None
    };
    let t1 = cfg.smbios.clone().unwrap_or_default();
    let system = boot::smbios::SystemInfo {
        manufacturer: t1.manufacturer.as_deref(),
        product: t1.product.as_deref(),
        version: t1.version.as_deref(),
        serial: t1.serial.as_deref(),
        sku: t1.sku.as_deref(),
        family: t1.family.as_deref(),
        uuid: machine_uuid(cfg),
        oem_strings: &cfg.smbios_oem,
    };
    boot::smbios::setup_smbios(mem, &system).map_err(Error::Smbios)?;
    boot::reset_vector::setup_reset_vector(mem)
        .map_err(|e| Error::Internal(format!("reset vector: {e}")))?;

    let initrd_path = files.initrd.as_ref().map(|(_, p)| p.clone()).unwrap_or_default();
    let mut cmdline = std::os::unix::ffi::OsStrExt::as_bytes(cfg.append.as_os_str()).to_vec();
    if !p.acpi && cfg.machine.auto_kernel_cmdline {
        cmdline.extend_from_slice(plan.virtio_mmio_cmdline().as_bytes());
    }
    let setup = boot::linux::BootSetup {
        cmdline: &cmdline,
        initrd: files.initrd.as_mut().map(|(f, _)| f),
        rsdp,
        reserved: &plan.reserved,
    };
    boot::linux::configure(mem, &kernel, setup).map_err(|source| match source {
        e @ (boot::linux::Error::ReadInitrd(_) | boot::linux::Error::InitrdTooLarge { .. }) => {
            Error::Initrd { path: initrd_path, source: e }
        }
        e => Error::Kernel { path: files.kernel_path.clone(), source: e },
    })
}

/// The machine's UUID (SMBIOS type 1, fw_cfg's UUID item), in the text
/// form's byte order: `-smbios type=1,uuid=`'s, else `process_uuid`.
pub(crate) fn machine_uuid(cfg: &VmConfig) -> [u8; 16] {
    let given = cfg.smbios.as_ref().and_then(|t| t.uuid.as_deref());
    given.and_then(boot::smbios::parse_uuid).unwrap_or_else(process_uuid)
}

/// The machine's UUID where `-smbios` gives none: random (version 4), and
/// the same for every run of this process, as a machine's is across reboots.
fn process_uuid() -> [u8; 16] {
    static UUID: std::sync::OnceLock<[u8; 16]> = std::sync::OnceLock::new();
    *UUID.get_or_init(|| {
        let mut u = [0u8; 16];
        // SAFETY: getrandom writes at most `u.len()` bytes into `u`.
        let n = unsafe { libc::getrandom(u.as_mut_ptr().cast(), u.len(), 0) };
        if n != u.len() as isize {
            // Entropy not ready this early in the host's boot: a UUID
            // unique enough to tell this process's machine from others.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            u = (now ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
        }
        u[6] = (u[6] & 0x0f) | 0x40;
        u[8] = (u[8] & 0x3f) | 0x80;
        u
    })
}

fn create_vcpus(
    cfg: &VmConfig,
    host: &Host,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    entry: &boot::linux::KernelEntry,
) -> Result<Vec<kvm_ioctls::VcpuFd>> {
    use boot::cpu;
    let topo = cfg.smp.topology();
    (0..cfg.smp.cpus)
        .map(|i| {
            // KVM's vCPU id is the vCPU's initial APIC ID.
            let id = u64::from(topo.apic_id(i));
            let vcpu = vm.create_vcpu(id).map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let cpuid =
                cpu::build_cpuid(&host.supported, i, topo, &cfg.cpu.features, host.tsc_deadline)?;
            cpu::set_cpuid(&vcpu, &cpuid)?;
            cpu::setup_msrs(&vcpu)?;
            cpu::setup_fpu(&vcpu)?;
            cpu::setup_lapic(&vcpu, i == 0)?;
            if i == 0 {
                cpu::setup_sregs(mem, &vcpu, entry)?;
                cpu::setup_regs(&vcpu, entry)?;
            }
            Ok(vcpu)
        })
        .collect()
}
