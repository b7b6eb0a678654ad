//! The devices of one VM run, built from the plan: put on the port and
//! MMIO buses, wired to KVM (irqfd, ioeventfd), their host side taken from
//! the process's backends. `legacy` has the ISA and ACPI platform devices,
//! `virtio` turns one virtio description into a device on either
//! transport, `pcie` builds the root complex. Each `-device` is built by
//! its kind (`kinds`) from its host side; the board places what that made
//! where the plan says. Devices that QMP drives offer a control face.

mod legacy;
pub(super) mod pcie;
mod virtio;

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex};

use boot::layout::COM1_PORT;
use boot::GuestMemoryMmap;
use devices::legacy::EventFdTrigger;
use devices::Bus;
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::control::Control;
use super::irq::GsiRouter;
use super::{io_err, kvm_err, Error, Result};
use crate::backends::Backends;
use crate::config::{DeviceConfig, VmConfig};
use crate::host::console::SerialBackend;
use crate::kinds::{Built, RunContext};
use crate::plan::{Location, MachinePlan};

use super::Subscriber;

/// What one run is built from.
pub(super) struct BoardContext<'a> {
    pub cfg: &'a VmConfig,
    pub plan: &'a MachinePlan,
    pub backends: &'a Backends,
    pub vm: &'a Arc<VmFd>,
    pub mem: &'a GuestMemoryMmap,
    pub router: &'a Arc<GsiRouter>,
    pub control: &'a Arc<Control>,
    pub console: Option<&'a SerialBackend>,
    pub pio: &'a Arc<Bus>,
    pub mmio: &'a Arc<Bus>,
    /// The run's guest-physical map (a passed-through BAR's slots).
    pub guest_map: &'a Arc<Mutex<super::memory::GuestMap>>,
    /// Gives guest RAM back to the host (a balloon's pages).
    pub discard: &'a Arc<dyn devices::virtio::balloon::RamDiscard>,
    /// Where devices tell the monitors things.
    pub notices: &'a Arc<crate::ctl::Notices>,
}

#[derive(Default)]
pub(super) struct Board {
    /// COM1 exists.
    pub serial: bool,
    /// Writes the UART's output; finished when the run ends.
    pub console: Option<crate::host::console_writer::ConsoleWriter>,
    /// What the run's devices offer QMP.
    pub faces: crate::ctl::Faces,
    /// The devices' `id=`s.
    pub device_ids: Vec<String>,
    /// Work for the event loop: serial input, the RTC's timer, call
    /// relays, INTx resamplers. Device data planes run on their own
    /// workers.
    pub subscribers: Vec<Subscriber>,
    /// KVM's VFIO device, when a passed-through function's group was
    /// added to it; it lives as long as the run's VM.
    pub kvm_vfio: Option<kvm_ioctls::DeviceFd>,
}

/// Builds every device of the run.
pub(super) fn build(ctx: &BoardContext<'_>) -> Result<Board> {
    let device_ids = ctx.cfg.devices.iter().filter_map(|d| d.id.clone()).collect();
    let mut board = Board { device_ids, ..Board::default() };
    legacy::add(ctx, &mut board)?;
    let irq = |gsi| irq_line(ctx.vm, gsi);
    let control: Arc<dyn devices::VmControl> = ctx.control.clone();
    let allocate = || ctx.router.allocate_msi_gsi().map_err(io_err("MSI GSI"));
    let router: Arc<dyn pci::MsiRouter> = ctx.router.clone();
    let kvm_vfio = KvmVfio { vm: ctx.vm, dev: Default::default() };
    let vfio_group = |fd: BorrowedFd<'_>| kvm_vfio.add_group(fd);
    let mut pci = Vec::new();
    for (i, (d, at)) in ctx.cfg.devices.iter().zip(&ctx.plan.locations).enumerate() {
        let host = ctx.backends.device(i).ok_or_else(|| missing_backend(d.driver))?;
        let mut run = RunContext {
            pio: ctx.pio,
            mmio: ctx.mmio,
            subscribers: &mut board.subscribers,
            irq: &irq,
            control: &control,
            location: *at,
            faces: &mut board.faces,
            data: crate::kinds::DataWriter { mem: ctx.mem, ranges: &ctx.plan.data[i] },
            multifunction: d.pci.multifunction,
            msi: crate::kinds::MsiContext { allocate: &allocate, router: router.clone() },
            vfio_group: &vfio_group,
            mem: ctx.mem,
            discard: ctx.discard,
            notices: ctx.notices,
        };
        match (host.build(&mut run)?, *at) {
            (Built::Placed, Location::Fixed) => {}
            (Built::Virtio(device), Location::VirtioMmio { base, gsi, .. }) => {
                let relay = virtio::attach_mmio(ctx.vm, ctx.mem, ctx.mmio, device, base, gsi)?;
                if let Some(relay) = relay {
                    board.subscribers.push(Arc::new(Mutex::new(relay)));
                }
            }
            (built @ (Built::Virtio(_) | Built::Pci(_)), Location::Pci(place)) => {
                pci.push(pcie::Function { config: d, place, built });
            }
            // The plan and the kind disagree on the bus: never silently.
            (Built::Placed | Built::Virtio(_) | Built::Pci(_), at) => {
                return Err(Error::Internal(format!(
                    "{} built for a bus other than {at:?}",
                    d.driver
                )))
            }
        }
    }
    if let Some(pcie) = &ctx.plan.pcie {
        pcie::add_pcie(ctx, pcie, pci, &mut board)?;
    }
    board.kvm_vfio = kvm_vfio.dev.into_inner().map(|(dev, _)| dev);
    Ok(board)
}

/// KVM's VFIO device for one run, made when the first group is added
/// (QEMU's `vfio_kvm_device_add_group`): KVM then knows where DMA may
/// bypass the CPU caches.
struct KvmVfio<'a> {
    vm: &'a VmFd,
    /// The device and the groups (descriptors) already added.
    dev: std::cell::RefCell<Option<(kvm_ioctls::DeviceFd, Vec<i32>)>>,
}

impl KvmVfio<'_> {
    fn add_group(&self, group: BorrowedFd<'_>) -> Result<()> {
        use kvm_bindings::{kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_VFIO};
        use kvm_bindings::{KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD};
        let mut slot = self.dev.borrow_mut();
        if slot.is_none() {
            let mut create =
                kvm_create_device { type_: kvm_device_type_KVM_DEV_TYPE_VFIO, fd: 0, flags: 0 };
            let dev = self.vm.create_device(&mut create).map_err(kvm_err("KVM_CREATE_DEVICE"))?;
            *slot = Some((dev, Vec::new()));
        }
        let Some((dev, added)) = slot.as_mut() else { return Ok(()) };
        let fd = group.as_raw_fd();
        if added.contains(&fd) {
            return Ok(());
        }
        let attr = kvm_device_attr {
            flags: 0,
            group: KVM_DEV_VFIO_FILE,
            attr: u64::from(KVM_DEV_VFIO_FILE_ADD),
            // KVM reads the group's descriptor (an i32) from here.
            addr: &fd as *const i32 as u64,
        };
        dev.set_device_attr(&attr).map_err(kvm_err("KVM_DEV_VFIO_FILE_ADD"))?;
        added.push(fd);
        Ok(())
    }
}

/// An interrupt line: an irqfd on `gsi`.
fn irq_line(vm: &VmFd, gsi: u32) -> Result<EventFdTrigger> {
    let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(io_err("eventfd"))?;
    vm.register_irqfd(&evt, gsi).map_err(kvm_err("KVM_IRQFD"))?;
    Ok(EventFdTrigger::new(evt))
}

/// Ports whose first write marks a boot milestone in the trace.
pub(super) fn watched_ports(
    cfg: &VmConfig,
    board: &Board,
) -> Vec<(u16, crate::diag::trace::Milestone)> {
    use crate::diag::trace::Milestone;
    let mut ports = vec![(0x80, Milestone::FirstPostPort)];
    if board.serial {
        ports.push((COM1_PORT, Milestone::FirstSerialByte));
    }
    ports.extend(cfg.devices.iter().filter_map(|d: &DeviceConfig| d.device.facts().milestone_port));
    ports
}

fn missing_backend(driver: &str) -> Error {
    Error::Internal(format!("{driver} has no host backend"))
}
