//! One run of the machine: build it from the configuration, boot, run the
//! event loop until something stops it, tear it down. A guest reset is a
//! new run (the caller loops), so nothing carries over but the console.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use boot::layout::*;
use boot::GuestMemoryMmap;
use devices::{Bus, VmEvent};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{DeviceConfig, VmConfig};
use crate::console::ConsoleTarget;
use crate::control::{Control, Outcome};
use crate::qmp::{QmpHandler, QmpServer, VmHandles};
use crate::rtc_timer::RtcTimer;
use crate::serial_input::SerialInput;
use crate::vcpu::{self, VcpuContext, VcpuHandle};

mod board;
mod irq;
mod pcie;
use board::{add_devices, watched_ports, Buses, Devices};
use irq::GsiRouter;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm: {0}")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("{what}: {source}")]
    KvmIoctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] crate::memory::Error),
    #[error(transparent)]
    Console(#[from] crate::console::Error),
    #[error("device layout: {0}")]
    Bus(#[from] devices::BusError),
    #[error("-kernel {path}: {source}")]
    Kernel {
        path: String,
        #[source]
        source: boot::linux::Error,
    },
    #[error("-kernel: cannot open '{path}': {source}")]
    OpenKernel {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("-initrd: cannot open '{path}': {source}")]
    OpenInitrd {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("-initrd {path}: {source}")]
    Initrd {
        path: String,
        #[source]
        source: boot::linux::Error,
    },
    #[error("no kernel given: use -kernel (skiff has no firmware to boot from disk)")]
    NoKernel,
    #[error("ACPI tables: {0}")]
    Acpi(#[source] boot::acpi::AcpiError),
    #[error("MP table: {0}")]
    Mptable(#[source] boot::mptable::MptableError),
    #[error("vCPU setup: {0}")]
    Cpu(#[from] boot::cpu::Error),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("event loop: {0:?}")]
    EventManager(event_manager::Error),
    #[error(
        "-device virtio-*-device: at most 8 virtio-mmio devices (4 with pcie=on, 6 with acpi=off)"
    )]
    TooManyVirtioMmio,
    #[error("{0}")]
    PciLayout(String),
    #[error(transparent)]
    PciRoot(pci::RootError),
    #[error("virtio-pci: {0}")]
    VirtioPci(#[source] pci::VirtioPciError),
    #[error("virtio-rng: {0}")]
    VirtioRng(#[source] devices::virtio::RngError),
    #[error("virtio-mmio: {0}")]
    VirtioMmio(#[source] devices::virtio::MmioError),
}

type Result<T> = std::result::Result<T, Error>;

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::KvmIoctl { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
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

/// Platform decisions derived from the configuration once.
struct Platform {
    acpi: bool,
    pcie: bool,
    pic: bool,
    pit: bool,
    rtc: bool,
    i8042: bool,
}

impl Platform {
    fn new(cfg: &VmConfig) -> Self {
        let m = &cfg.machine;
        Platform {
            acpi: m.acpi.resolve(true),
            pcie: m.pcie.resolve(false),
            pic: m.pic.resolve(true),
            pit: m.pit.resolve(true),
            // QEMU microvm leaves the RTC out under KVM unless asked; the
            // FADT then says so, and the guest does not probe for it.
            rtc: m.rtc.resolve(false),
            i8042: cfg.devices.iter().any(|d| matches!(d, DeviceConfig::I8042)),
        }
    }
}

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
pub fn run(
    cfg: &VmConfig,
    files: &mut BootFiles,
    console: &ConsoleTarget,
    first_run: bool,
    signal_evt: &EventFd,
    qmp: &[Arc<Mutex<QmpServer>>],
) -> Result<RunEnd> {
    let platform = Platform::new(cfg);
    let kvm = Kvm::new().map_err(Error::Kvm)?;
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
    // Intel needs a 3-page TSS area below 4 GiB before the irqchip exists.
    vm.set_tss_address(0xfffb_d000).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let router = Arc::new(GsiRouter::new(vm.clone(), platform.pit).map_err(io_err("GSI routing"))?);
    if platform.pit {
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    }

    let ram = crate::memory::create(cfg.mem_size, cfg.machine.mem_merge)?;
    let mem = ram.memory().clone();
    crate::memory::register(&vm, &mem)?;

    let control = Arc::new(Control::new().map_err(io_err("eventfd"))?);
    let supported = kvm
        .get_supported_cpuid(boot::cpu::MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let bus = Buses { pio: &pio, mmio: &mmio };
    let mut devices = add_devices(cfg, &platform, &vm, &mem, &control, console, first_run, bus)?;
    let pcie = if platform.pcie {
        let phys_bits = boot::cpu::phys_bits(&supported);
        let pcie = pcie::add_pcie(cfg, &vm, &mem, &mmio, &router, phys_bits)?;
        devices.virtio.extend(pcie.subscribers);
        Some(pcie.layout)
    } else {
        None
    };

    let entry = load_guest(cfg, &platform, &mem, files, &devices, pcie)?;
    let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    let vcpus = create_vcpus(cfg, &supported, tsc_deadline, &vm, &mem, &entry)?;

    let stop = Arc::new(AtomicBool::new(false));
    let mut handles: Vec<VcpuHandle> = Vec::with_capacity(vcpus.len());
    for (i, vcpu) in vcpus.into_iter().enumerate() {
        let ctx = VcpuContext {
            watched_ports: watched_ports(cfg, &devices),
            pio: pio.clone(),
            mmio: mmio.clone(),
            control: control.clone(),
            stop: stop.clone(),
        };
        handles.push(vcpu::spawn(i as u32, vcpu, ctx).map_err(io_err("spawning a vCPU thread"))?);
    }

    crate::trace::milestone(crate::trace::Milestone::VmReady);
    let mut console = devices.console.take();
    let end = event_loop(&control, signal_evt, devices, qmp);

    stop.store(true, Ordering::Release);
    for h in handles {
        h.stop();
    }
    if crate::signals::last_signal().is_some() && crate::vcpu::stall_dump() {
        dump_interrupt_controllers(&vm, platform.pit);
    }
    // The guest's last words reach the reader before skiff reports anything.
    if let Some(c) = console.as_mut() {
        c.finish();
    }
    let guest: Vec<(u64, u64)> = mem.iter().map(|r| (r.as_ptr() as u64, r.len())).collect();
    crate::trace::record_memory(&guest);
    // The VM (and its memslots) must go before the mappings behind them;
    // the buses (BAR mappers) and the router hold the last other references.
    drop((pio, mmio, router));
    // Anything still holding the VM now would outlive guest memory: a
    // reference cycle, i.e. a VM leaked on every guest reboot.
    if let Err(vm) = Arc::try_unwrap(vm) {
        log::error!("VM teardown: {} references to the VM remain", Arc::strong_count(&vm) - 1);
    }
    drop(mem);
    drop(ram);
    end
}

/// With the vCPUs' dumps (`SKIFF_STALL_DUMP=1`): the 8259s, the IOAPIC's
/// timer pin and the PIT, where a guest waiting for a timer interrupt that
/// never came shows which link of PIT → 8259/IOAPIC → LAPIC broke.
fn dump_interrupt_controllers(vm: &VmFd, pit: bool) {
    use kvm_bindings::{
        kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    };
    let mut msg = String::from("interrupt controllers at stop:");
    for (id, name) in [(KVM_IRQCHIP_PIC_MASTER, "pic0"), (KVM_IRQCHIP_PIC_SLAVE, "pic1")] {
        let mut chip = kvm_irqchip { chip_id: id, ..Default::default() };
        if vm.get_irqchip(&mut chip).is_ok() {
            // SAFETY: every member of the union is plain integers, valid for
            // any bits; KVM filled the one chip_id names.
            let p = unsafe { chip.chip.pic };
            msg += &format!(
                " {name}: irr={:02x} imr={:02x} isr={:02x} base={:02x} init={} aeoi={} elcr={:02x};",
                p.irr, p.imr, p.isr, p.irq_base, p.init_state, p.auto_eoi, p.elcr
            );
        }
    }
    let mut chip = kvm_irqchip { chip_id: KVM_IRQCHIP_IOAPIC, ..Default::default() };
    if vm.get_irqchip(&mut chip).is_ok() {
        // SAFETY: as above, for the IOAPIC member.
        let io = unsafe { chip.chip.ioapic };
        // SAFETY: a redirection entry's union members are all plain bits.
        let pin2 = unsafe { io.redirtbl[2].bits };
        msg += &format!(" ioapic: irr={:06x} pin2={pin2:016x};", io.irr);
    }
    if pit {
        if let Ok(p) = vm.get_pit2() {
            let c = &p.channels[0];
            msg += &format!(
                " pit0: mode={} count={} gate={} flags={:x}",
                c.mode, c.count, c.gate, p.flags
            );
        }
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skiff: {msg}");
}

/// Loads kernel and initrd, writes firmware tables and boot parameters.
fn load_guest(
    cfg: &VmConfig,
    platform: &Platform,
    mem: &GuestMemoryMmap,
    files: &mut BootFiles,
    devices: &Devices,
    pcie: Option<pcie::PcieLayout>,
) -> Result<boot::linux::KernelEntry> {
    let serial = devices.serial.is_some();
    let kernel = boot::linux::load_kernel(mem, &mut files.kernel)
        .map_err(|source| Error::Kernel { path: files.kernel_path.clone(), source })?;

    // The tables refuse an ID past 254; -smp already did.
    let apic_ids = cfg.smp.topology().apic_ids();
    let rsdp = if platform.acpi {
        let acpi = boot::acpi::AcpiConfig {
            apic_ids,
            serial,
            i8042: platform.i8042,
            rtc: platform.rtc,
            pic: platform.pic,
            pit: platform.pit,
            virtio_mmio: devices.virtio_mmio.clone(),
            pcie: pcie.map(|p| boot::acpi::PcieConfig {
                ecam_base: pci::ECAM_BASE,
                ecam_size: pci::ECAM_SIZE,
                last_bus: p.last_bus,
                mmio32: (p.windows.mmio32.base, p.windows.mmio32.size),
                mmio64: p.windows.mmio64.map(|w| (w.base, w.size)),
            }),
            ..Default::default()
        };
        Some(boot::acpi::create_acpi_tables(mem, &acpi).map_err(Error::Acpi)?)
    } else {
        boot::mptable::setup_mptable(mem, &apic_ids, platform.pic).map_err(Error::Mptable)?;
        None
    };

    let initrd_path = files.initrd.as_ref().map(|(_, p)| p.clone()).unwrap_or_default();
    // QEMU's auto-kernel-cmdline: without ACPI the guest learns of its
    // virtio-mmio devices from the command line.
    let mut cmdline = cfg.append.clone();
    if !platform.acpi && cfg.machine.auto_kernel_cmdline {
        for (base, size, irq) in &devices.virtio_mmio {
            cmdline.push_str(&format!(" virtio_mmio.device={size}@{base:#x}:{irq}"));
        }
    }
    // ECAM is reserved as firmware reserves MMCONFIG, so the guest trusts
    // the MCFG entry; BAR windows are not RAM and need no entry.
    let mut reserved = vec![(GED_MMIO_BASE, VIRTIO_MMIO_BASE + 0x10_0000 - GED_MMIO_BASE)];
    if pcie.is_some() {
        reserved.insert(0, (pci::ECAM_BASE, pci::ECAM_SIZE));
    }
    let setup = boot::linux::BootSetup {
        cmdline: &cmdline,
        initrd: files.initrd.as_mut().map(|(f, _)| f),
        rsdp,
        reserved: &reserved,
    };
    boot::linux::configure(mem, &kernel, setup).map_err(|source| match source {
        e @ (boot::linux::Error::ReadInitrd(_) | boot::linux::Error::InitrdTooLarge { .. }) => {
            Error::Initrd { path: initrd_path, source: e }
        }
        e => Error::Kernel { path: files.kernel_path.clone(), source: e },
    })
}

fn create_vcpus(
    cfg: &VmConfig,
    supported: &kvm_bindings::CpuId,
    tsc_deadline: bool,
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
            let cpuid = cpu::build_cpuid(supported, i, topo, &cfg.cpu.features, tsc_deadline)?;
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

/// Wakes the loop when the machine must stop: a device/vCPU outcome or a
/// termination signal. It only drains the eventfds; the loop reads why.
struct StopWatcher {
    control: EventFd,
    signal: EventFd,
}

impl MutEventSubscriber for StopWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [&self.control, &self.signal] {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                log::error!("event loop: cannot watch a stop eventfd: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        // Leave the counters set: `event_loop` checks the outcome itself,
        // and a level-triggered fd that stays readable costs nothing here
        // because the loop ends on the same wakeup.
        let _ = events;
    }
}

fn event_loop(
    control: &Arc<Control>,
    signal_evt: &EventFd,
    devices: Devices,
    qmp: &[Arc<Mutex<QmpServer>>],
) -> Result<RunEnd> {
    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(Error::EventManager)?;
    let watcher = StopWatcher {
        control: control.eventfd().try_clone().map_err(io_err("eventfd"))?,
        signal: signal_evt.try_clone().map_err(io_err("eventfd"))?,
    };
    em.add_subscriber(Arc::new(Mutex::new(watcher)));
    for server in qmp {
        let vm = VmHandles {
            control: control.clone(),
            ged: devices.ged.clone(),
            i8042: devices.i8042.clone(),
        };
        em.add_subscriber(Arc::new(Mutex::new(QmpHandler::new(server.clone(), vm))));
    }
    for dev in devices.virtio {
        em.add_subscriber(dev);
    }
    if let Some((rtc, rearm)) = devices.rtc {
        let timer = RtcTimer::new(rtc, rearm).map_err(io_err("timerfd"))?;
        em.add_subscriber(Arc::new(Mutex::new(timer)));
    }
    if let Some((serial, ready, true)) = devices.serial {
        let input = SerialInput::new(serial, ready).map_err(io_err("duplicating stdin"))?;
        em.add_subscriber(Arc::new(Mutex::new(input)));
    }
    loop {
        if let Some(sig) = crate::signals::last_signal() {
            return Ok(RunEnd::Signal(sig));
        }
        match control.outcome() {
            Some(Outcome::Guest(ev)) => return Ok(RunEnd::Guest(ev)),
            Some(Outcome::Fatal(msg)) => return Ok(RunEnd::Fatal(msg)),
            Some(Outcome::Quit) => return Ok(RunEnd::Quit),
            Some(Outcome::HostReset) => return Ok(RunEnd::HostReset),
            None => {}
        }
        em.run().map_err(Error::EventManager)?;
    }
}
