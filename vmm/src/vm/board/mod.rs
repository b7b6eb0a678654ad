//! The devices of one VM run, built from the plan: put on the port and
//! MMIO buses, wired to KVM (irqfd, ioeventfd), their host side taken from
//! the process's backends. `legacy` has the ISA and ACPI platform devices,
//! `virtio` turns one virtio description into a device on either
//! transport, `pcie` builds the root complex. The event loop and QMP reach
//! the few devices they need through `Board`.

mod legacy;
pub(super) mod pcie;
mod virtio;

use std::sync::{Arc, Mutex};

use boot::layout::COM1_PORT;
use boot::GuestMemoryMmap;
use devices::legacy::{EventFdTrigger, Ged, I8042};
use devices::Bus;
use event_manager::MutEventSubscriber;
use kvm_ioctls::VmFd;

use super::control::Control;
use super::irq::GsiRouter;
use super::{Error, Result};
use crate::backends::Backends;
use crate::config::{DeviceConfig, VmConfig};
use crate::host::console::SerialBackend;
use crate::plan::{Location, MachinePlan};

/// An event-loop subscriber of the run (relays, resamplers, timers).
pub(super) type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

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
}

#[derive(Default)]
pub(super) struct Board {
    /// COM1 exists.
    pub serial: bool,
    /// Writes the UART's output; finished when the run ends.
    pub console: Option<crate::host::console_writer::ConsoleWriter>,
    pub ged: Option<Arc<Mutex<Ged<EventFdTrigger>>>>,
    pub i8042: Option<Arc<Mutex<I8042<EventFdTrigger>>>>,
    /// Work for the event loop: serial input, the RTC's timer, call
    /// relays, INTx resamplers. Device data planes run on their own
    /// workers.
    pub subscribers: Vec<Subscriber>,
}

/// Builds every device of the run.
pub(super) fn build(ctx: &BoardContext<'_>) -> Result<Board> {
    let mut board = Board::default();
    legacy::add(ctx, &mut board)?;
    for (i, (d, at)) in ctx.cfg.devices.iter().zip(&ctx.plan.locations).enumerate() {
        if let (DeviceConfig::Virtio(v), Location::VirtioMmio { base, gsi, .. }) = (d, *at) {
            let device = virtio::create(v, ctx.backends.device(i))?;
            let relay = virtio::attach_mmio(ctx.vm, ctx.mem, ctx.mmio, device, base, gsi)?;
            if let Some(relay) = relay {
                board.subscribers.push(Arc::new(Mutex::new(relay)));
            }
        }
    }
    if let Some(pcie) = &ctx.plan.pcie {
        pcie::add_pcie(ctx, pcie, &mut board)?;
    }
    Ok(board)
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
    for d in &cfg.devices {
        if let DeviceConfig::IsaDebugExit { iobase, .. } = d {
            ports.push((*iobase, Milestone::DebugExit));
        }
    }
    ports
}

fn missing_backend(driver: String) -> Error {
    Error::Internal(format!("{driver} has no host backend"))
}
