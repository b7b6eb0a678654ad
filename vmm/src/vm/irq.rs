//! KVM's GSI routing table, owned in one place: the fixed routes of the
//! interrupt controllers plus one MSI route per MSI-X vector, which the
//! guest reprograms at run time. KVM_SET_GSI_ROUTING replaces the whole
//! table, so every change rewrites it from this copy.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use pci::{MsiMessage, MsiRouter};
use vmm_sys_util::eventfd::EventFd;

/// MSI GSIs start after the in-kernel IOAPIC's pins.
const FIRST_MSI_GSI: u32 = boot::layout::IOAPIC_PINS;
/// KVM_MAX_IRQ_ROUTES.
const MAX_ROUTES: usize = 4096;

pub(crate) struct GsiRouter {
    vm: Arc<VmFd>,
    fixed: Vec<kvm_irq_routing_entry>,
    state: Mutex<MsiRoutes>,
}

#[derive(Default)]
struct MsiRoutes {
    next_gsi: u32,
    msi: BTreeMap<u32, kvm_irq_routing_entry>,
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl GsiRouter {
    /// KVM's default routes (GSIs 0-15 to both 8259s and the IOAPIC, 16-23
    /// to the IOAPIC), except that with a PIT, GSI 0 goes to IOAPIC pin 2,
    /// as a PC wires it and as the MADT's IRQ0→GSI2 override (and the MP
    /// table) tell the guest; GSI 2 then has no route.
    pub(crate) fn new(vm: Arc<VmFd>, pit: bool) -> std::io::Result<Self> {
        let mut fixed = Vec::new();
        let pin2_taken = |gsi: u32| pit && gsi == 2;
        for gsi in (0..16u32).filter(|&g| !pin2_taken(g)) {
            let (chip, pin) = if gsi < 8 {
                (KVM_IRQCHIP_PIC_MASTER, gsi)
            } else {
                (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
            };
            fixed.push(irqchip(gsi, chip, pin));
        }
        for gsi in (0..FIRST_MSI_GSI).filter(|&g| !pin2_taken(g)) {
            let pin = if pit && gsi == 0 { 2 } else { gsi };
            fixed.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, pin));
        }
        let router = GsiRouter {
            vm,
            fixed,
            state: Mutex::new(MsiRoutes { next_gsi: FIRST_MSI_GSI, ..Default::default() }),
        };
        router.commit(&router.lock())?;
        Ok(router)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MsiRoutes> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh GSI for one MSI-X vector; it gets a route once the guest
    /// programs and unmasks the vector.
    pub(crate) fn allocate_msi_gsi(&self) -> std::io::Result<u32> {
        let mut s = self.lock();
        if self.fixed.len() + (s.next_gsi - FIRST_MSI_GSI) as usize >= MAX_ROUTES {
            return Err(std::io::Error::other("out of KVM GSI routes for MSI-X vectors"));
        }
        let gsi = s.next_gsi;
        s.next_gsi += 1;
        Ok(gsi)
    }

    fn commit(&self, s: &MsiRoutes) -> std::io::Result<()> {
        let entries: Vec<_> = self.fixed.iter().chain(s.msi.values()).copied().collect();
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| std::io::Error::other(format!("GSI routing table: {e:?}")))?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|e| std::io::Error::other(format!("KVM_SET_GSI_ROUTING: {e}")))
    }
}

impl MsiRouter for GsiRouter {
    fn route(&self, gsi: u32, msg: MsiMessage) -> std::io::Result<()> {
        let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
        e.u.msi.address_lo = msg.addr as u32;
        e.u.msi.address_hi = (msg.addr >> 32) as u32;
        e.u.msi.data = msg.data;
        let mut s = self.lock();
        s.msi.insert(gsi, e);
        self.commit(&s)
    }

    fn attach(&self, evt: &EventFd, gsi: u32) -> std::io::Result<()> {
        self.vm.register_irqfd(evt, gsi).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn detach(&self, evt: &EventFd, gsi: u32) -> std::io::Result<()> {
        self.vm.unregister_irqfd(evt, gsi).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}
