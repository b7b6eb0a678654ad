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
    Ok(board)
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
