//! The PCIe root complex of `-M microvm,pcie=on`, put together as firmware
//! would leave it: functions at the addresses the allocator chose (every
//! explicit `addr=` first), bus numbers, BARs and bridge windows assigned,
//! then ECAM and every BAR on the MMIO bus. Queue kicks are KVM ioeventfds
//! and interrupts irqfds (MSI-X vectors on their own GSIs, INTx on the
//! `_PRT`'s GSIs with a resample eventfd); when the guest moves a BAR, the
//! MMIO range and the ioeventfds move with it before the write returns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use boot::GuestMemoryMmap;
use devices::virtio::{RateLimit, Rng};
use devices::{Bus, BusDevice};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use pci::virtio_pci::{vectors_needed, Placement as Location};
use pci::{
    BarReprogram, BarWindows, MsiRouter, MsixVector, PciAddress, PciRoot, RootPort, RootPortParams,
    SharedDevice, VirtioPciDevice, VirtioPciInterrupt,
};
use vmm_sys_util::eventfd::EventFd;

use super::irq::GsiRouter;
use super::{io_err, kvm_err, Error, Result};
use crate::config::{PciKind, VmConfig};

/// What the rest of the VM needs from the root complex.
pub(super) struct Pcie {
    /// For the DSDT's `PCI0._CRS`.
    pub windows: BarWindows,
    /// Devices and INTx resamplers, served by the event loop.
    pub subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
}

/// One BAR of one function, as the MMIO bus sees it.
struct BarAccess {
    dev: SharedDevice,
    bar: usize,
}

impl BusDevice for BarAccess {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.dev).bar_read(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.dev).bar_write(self.bar, offset, data);
    }
}

fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn pci::PciDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

/// Raises a virtio-pci function's INTx again after the guest's EOI while
/// its ISR still has a reason (KVM signals `resample` at the EOI).
struct IntxResampler {
    resample: EventFd,
    interrupt: Arc<VirtioPciInterrupt>,
}

impl MutEventSubscriber for IntxResampler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.resample, EventSet::IN)) {
            log::error!("pci: cannot watch an INTx resample eventfd: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.resample.read();
        self.interrupt.resample();
    }
}

/// Maps BARs onto the MMIO bus and their doorbells into KVM, and moves both
/// when the guest reprograms a BAR.
struct BarMapper {
    vm: Arc<VmFd>,
    mmio: Arc<Bus>,
    /// Where each (function, BAR) is mapped now, so a move removes only
    /// what this mapper put there.
    mapped: HashMap<(usize, usize), u64>,
}

impl BarMapper {
    fn key(dev: &SharedDevice, bar: usize) -> (usize, usize) {
        (Arc::as_ptr(dev) as *const () as usize, bar)
    }

    fn map(&mut self, dev: &SharedDevice, bar: usize, addr: u64, len: u64) -> Result<()> {
        let access = Arc::new(Mutex::new(BarAccess { dev: dev.clone(), bar }));
        self.mmio.insert(access, addr, len)?;
        self.mapped.insert(Self::key(dev, bar), addr);
        for (b, offset, evt) in lock(dev).ioeventfds() {
            if b == bar {
                let at = IoEventAddress::Mmio(addr + offset);
                self.vm
                    .register_ioevent(evt, &at, NoDatamatch)
                    .map_err(kvm_err("KVM_IOEVENTFD"))?;
            }
        }
        Ok(())
    }

    fn unmap(&mut self, dev: &SharedDevice, bar: usize) {
        let Some(addr) = self.mapped.remove(&Self::key(dev, bar)) else { return };
        self.mmio.remove(addr);
        for (b, offset, evt) in lock(dev).ioeventfds() {
            if b == bar {
                let at = IoEventAddress::Mmio(addr + offset);
                if let Err(e) = self.vm.unregister_ioevent(evt, &at, NoDatamatch) {
                    log::error!("pci: cannot remove an ioeventfd at {:#x}: {e}", addr + offset);
                }
            }
        }
    }

    /// The guest moved a BAR. A BAR moved to 0 or onto another range stays
    /// unmapped (it decodes nothing), as on hardware with a bad layout.
    fn moved(&mut self, address: PciAddress, dev: &SharedDevice, m: BarReprogram) {
        self.unmap(dev, m.index);
        if m.new == 0 {
            return;
        }
        if let Err(e) = self.map(dev, m.index, m.new, m.len) {
            log::warn!("pci: {address} BAR {} at {:#x} not mapped: {e}", m.index, m.new);
        }
    }
}

pub(super) fn add_pcie(
    cfg: &VmConfig,
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    mmio: &Arc<Bus>,
    router: &Arc<GsiRouter>,
    phys_bits: u8,
) -> Result<Pcie> {
    let placements = crate::pci_layout::place(cfg).map_err(Error::PciLayout)?;
    let mut pci: Vec<_> = crate::pci_layout::pci_devices(cfg).zip(placements).collect();
    // A function behind a root port needs its port in the tree first.
    pci.sort_by_key(|(_, p)| p.address.bus);

    let mut root = PciRoot::new();
    let mut subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>> = Vec::new();
    let mut intx = Vec::new();
    for (dev_cfg, place) in &pci {
        let dev: SharedDevice = match &dev_cfg.kind {
            PciKind::RootPort { chassis, slot, port } => {
                let secondary_bus = place.secondary_bus.ok_or_else(|| {
                    Error::PciLayout(format!("{} has no bus number", dev_cfg.driver))
                })?;
                Arc::new(Mutex::new(RootPort::new(RootPortParams {
                    chassis: *chassis,
                    slot: *slot,
                    port: *port,
                    multifunction: dev_cfg.multifunction,
                    secondary_bus,
                })))
            }
            PciKind::VirtioRng { max_bytes, period_ms } => {
                let limit = max_bytes.and_then(|m| RateLimit::new(m, *period_ms));
                let rng = Arc::new(Mutex::new(Rng::new(limit).map_err(Error::VirtioRng)?));
                let n = vectors_needed(&*rng.lock().unwrap_or_else(|e| e.into_inner()));
                let vectors = msix_vectors(vm, router, n)?;
                let location = if place.address.bus == 0 {
                    Location::RootBus
                } else {
                    Location::BehindRootPort
                };
                let router: Arc<dyn MsiRouter> = router.clone();
                let mut transport =
                    VirtioPciDevice::new(mem.clone(), rng.clone(), vectors, router, location)
                        .map_err(Error::VirtioPci)?;
                if dev_cfg.multifunction {
                    transport.set_multifunction();
                }
                intx.push((place.address, transport.interrupt()));
                subscribers.push(rng);
                Arc::new(Mutex::new(transport))
            }
        };
        root.insert(place.address, dev).map_err(Error::PciRoot)?;
    }

    for (address, interrupt) in intx {
        let Some(gsi) = root.intx_gsi(address) else { continue };
        let resample = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        vm.register_irqfd_with_resample(interrupt.intx_evt(), &resample, gsi)
            .map_err(kvm_err("KVM_IRQFD"))?;
        subscribers.push(Arc::new(Mutex::new(IntxResampler { resample, interrupt })));
    }

    let windows = BarWindows { mmio32: pci::MMIO32_WINDOW, mmio64: pci::mmio64_window(phys_bits) };
    let bars = root.assign_bars(&windows).map_err(Error::PciRoot)?;
    let mut mapper = BarMapper { vm: vm.clone(), mmio: mmio.clone(), mapped: HashMap::new() };
    for b in &bars {
        let dev = root.device(b.address).ok_or_else(|| {
            Error::PciLayout(format!("{} vanished during BAR assignment", b.address))
        })?;
        mapper.map(&dev, b.bar, b.addr, b.len)?;
    }
    root.set_bar_move_handler(Box::new(move |address, dev, m| mapper.moved(address, dev, m)));
    mmio.insert(Arc::new(Mutex::new(root)), pci::ECAM_BASE, pci::ECAM_SIZE)?;
    Ok(Pcie { windows, subscribers })
}

/// `n` MSI-X vectors, each a GSI of its own with an irqfd on it.
fn msix_vectors(vm: &VmFd, router: &GsiRouter, n: usize) -> Result<Vec<MsixVector>> {
    (0..n)
        .map(|_| {
            let gsi = router.allocate_msi_gsi().map_err(io_err("MSI-X GSI"))?;
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
            vm.register_irqfd(&evt, gsi).map_err(kvm_err("KVM_IRQFD"))?;
            Ok(MsixVector { gsi, evt })
        })
        .collect()
}
