//! The PCIe root complex of `-M microvm,pcie=on`, put together as firmware
//! would leave it: functions at the addresses the allocator chose (every
//! explicit `addr=` first), bus numbers, BARs and bridge windows assigned,
//! then ECAM and every BAR on the MMIO bus. Queue kicks are KVM ioeventfds
//! and interrupts irqfds (MSI-X vectors on their own GSIs, INTx on the
//! `_PRT`'s GSIs with a resample eventfd); when the guest moves a BAR, the
//! MMIO range and the ioeventfds move with it before the write returns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use boot::layout::{PCIE_ECAM_BASE, PCIE_ECAM_SIZE, PCIE_INTX_GSI_BASE};
use devices::{Bus, BusDevice};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use pci::root::lock;
use pci::virtio_pci::{vectors_needed, Placement as Location};
use pci::{
    BarReprogram, ConfigChange, MsiRouter, PciAddress, PciRoot, SharedDevice, VirtioPciInterrupt,
};
use vmm_sys_util::eventfd::EventFd;

use super::{virtio, Board, BoardContext};
use crate::config::DeviceConfig;
use crate::kinds::Built;
use crate::plan::PciePlan;
use crate::vm::memory::{GuestMap, HostRange};
use crate::vm::{io_err, kvm_err, Error, Result};

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

/// Raises a virtio-pci function's INTx again after the guest's EOI while
/// its ISR still has a reason (KVM signals `resample` at the EOI).
struct IntxResampler {
    resample: EventFd,
    interrupt: Arc<VirtioPciInterrupt>,
}

impl MutEventSubscriber for IntxResampler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.resample, EventSet::IN)) {
            devices::error_limited!("pci: cannot watch an INTx resample eventfd: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.resample.read();
        self.interrupt.resample();
    }
}

/// What a BAR's mapping asks of KVM: its doorbells as ioeventfds (any
/// write length, no datamatch), its direct areas as memory slots of the
/// run's guest map; or a recorder in tests.
trait Doorbells: Send {
    fn register(&self, evt: &EventFd, addr: u64) -> Result<()>;
    fn unregister(&self, evt: &EventFd, addr: u64) -> Result<()>;
    /// Maps a host range at guest address `range.guest`; returns its slot.
    fn map_direct(&self, range: HostRange<'_>) -> Result<u32>;
    fn unmap_direct(&self, slot: u32);
}

/// The run's VM and its guest-physical map.
struct Kvm {
    vm: Arc<VmFd>,
    map: Arc<Mutex<GuestMap>>,
}

impl Doorbells for Kvm {
    fn register(&self, evt: &EventFd, addr: u64) -> Result<()> {
        self.vm
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(kvm_err("KVM_IOEVENTFD"))
    }

    fn unregister(&self, evt: &EventFd, addr: u64) -> Result<()> {
        self.vm
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(kvm_err("KVM_IOEVENTFD"))
    }

    fn map_direct(&self, range: HostRange<'_>) -> Result<u32> {
        Ok(self.map.lock().unwrap_or_else(|e| e.into_inner()).map(range)?)
    }

    fn unmap_direct(&self, slot: u32) {
        if let Err(e) = self.map.lock().unwrap_or_else(|e| e.into_inner()).unmap(slot) {
            devices::error_limited!("pci: cannot remove KVM slot {slot}: {e}");
        }
    }
}

/// One BAR as the guest last programmed it.
struct BarState {
    dev: SharedDevice,
    bar: usize,
    addr: u64,
    len: u64,
    /// On the MMIO bus (with its doorbells) at `addr`. False at 0 or while
    /// the range overlaps another BAR's.
    mapped: bool,
    /// The KVM slots of its direct areas, while mapped and its function
    /// decodes memory.
    slots: Vec<u32>,
}

/// Maps BARs onto the MMIO bus and their doorbells into KVM, and moves both
/// when the guest reprograms a BAR.
///
/// The root complex that owns this mapper sits on the MMIO bus, so the
/// mapper holds the bus weakly: a strong reference would be a cycle that
/// keeps the bus, every device and the VM alive past the run.
struct BarMapper<D: Doorbells> {
    doorbells: D,
    mmio: Weak<Bus>,
    bars: HashMap<(usize, usize), BarState>,
    /// Per function: memory decode on (its command register), as the guest
    /// last wrote it. While off, its direct areas are not guest memory: a
    /// host device with decode off has nothing behind its mapping (VFIO
    /// zaps it, and an access through KVM would fail the vCPU), so every
    /// access is trapped and answered by the device model.
    decoding: HashMap<usize, bool>,
}

impl<D: Doorbells> BarMapper<D> {
    fn new(doorbells: D, mmio: &Arc<Bus>) -> Self {
        let (bars, decoding) = (HashMap::new(), HashMap::new());
        BarMapper { doorbells, mmio: Arc::downgrade(mmio), bars, decoding }
    }

    fn key(dev: &SharedDevice, bar: usize) -> (usize, usize) {
        (Arc::as_ptr(dev) as *const () as usize, bar)
    }

    /// Records where a BAR now is, not yet mapped; returns its key.
    fn record(&mut self, dev: &SharedDevice, bar: usize, addr: u64, len: u64) -> (usize, usize) {
        let key = Self::key(dev, bar);
        let st = BarState { dev: dev.clone(), bar, addr, len, mapped: false, slots: Vec::new() };
        self.bars.insert(key, st);
        key
    }

    /// Records a BAR at `addr` and maps it there.
    fn add(&mut self, dev: &SharedDevice, bar: usize, addr: u64, len: u64) -> Result<()> {
        let key = self.record(dev, bar, addr, len);
        self.map(key)
    }

    fn map(&mut self, key: (usize, usize)) -> Result<()> {
        let (Some(st), Some(mmio)) = (self.bars.get_mut(&key), self.mmio.upgrade()) else {
            return Ok(());
        };
        let access = Arc::new(Mutex::new(BarAccess { dev: st.dev.clone(), bar: st.bar }));
        mmio.insert(access, st.addr, st.len)?;
        st.mapped = true;
        let mut dev = lock(&st.dev);
        for (b, offset, evt) in dev.ioeventfds() {
            if b == st.bar {
                self.doorbells.register(evt, st.addr + offset)?;
            }
        }
        let decoding = *self.decoding.entry(key.0).or_insert_with(|| {
            let command = dev.config_read(pci::config::COMMAND / 4) as u16;
            command & pci::config::COMMAND_MEMORY != 0
        });
        drop(dev);
        if decoding {
            self.map_slots(key)?;
        }
        Ok(())
    }

    /// Guest memory slots take the direct areas' accesses before the bus
    /// would see them.
    fn map_slots(&mut self, key: (usize, usize)) -> Result<()> {
        let Some(st) = self.bars.get_mut(&key) else { return Ok(()) };
        let dev = lock(&st.dev);
        for a in dev.direct_areas(st.bar) {
            let guest = st.addr + a.offset;
            let range =
                HostRange { fd: a.fd, offset: a.fd_offset, len: a.len, guest, read_only: false };
            st.slots.push(self.doorbells.map_direct(range)?);
        }
        Ok(())
    }

    fn unmap_slots(&mut self, key: (usize, usize)) {
        let Some(st) = self.bars.get_mut(&key) else { return };
        for slot in st.slots.drain(..) {
            self.doorbells.unmap_direct(slot);
        }
    }

    fn unmap(&mut self, key: (usize, usize)) {
        self.unmap_slots(key);
        let Some(st) = self.bars.get_mut(&key).filter(|st| st.mapped) else { return };
        st.mapped = false;
        if let Some(mmio) = self.mmio.upgrade() {
            mmio.remove(st.addr);
        }
        for (b, offset, evt) in lock(&st.dev).ioeventfds() {
            if b == st.bar {
                if let Err(e) = self.doorbells.unregister(evt, st.addr + offset) {
                    devices::error_limited!(
                        "pci: cannot remove an ioeventfd at {:#x}: {e}",
                        st.addr + offset
                    );
                }
            }
        }
    }

    /// The guest wrote a function's command register: its mapped BARs'
    /// direct areas go while memory decode is off and come back with it.
    fn memory_decode(&mut self, address: PciAddress, dev: &SharedDevice, on: bool) {
        let id = Self::key(dev, 0).0;
        if self.decoding.insert(id, on) == Some(on) {
            return;
        }
        let mut mapped: Vec<_> =
            self.bars.iter().filter(|(k, st)| k.0 == id && st.mapped).map(|(&k, _)| k).collect();
        mapped.sort_unstable();
        for key in mapped {
            if !on {
                self.unmap_slots(key);
            } else if let Err(e) = self.map_slots(key) {
                // Its accesses stay trapped: slower, still correct.
                devices::error_limited!("pci: {address} BAR {} not mapped directly: {e}", key.1);
                self.unmap_slots(key);
            }
        }
    }

    /// The guest moved a BAR. A BAR at 0, or over another BAR's range,
    /// decodes nothing until it moves again or the other one moves away:
    /// Linux reprograms BARs one register at a time, so an overlap can be
    /// a step on the way to a valid layout.
    fn moved(&mut self, address: PciAddress, dev: &SharedDevice, m: BarReprogram) {
        let moved = Self::key(dev, m.index);
        self.unmap(moved);
        self.record(dev, m.index, m.new, m.len);
        // The moved BAR, and any other that waited for its old range.
        let waiting: Vec<_> = self
            .bars
            .iter()
            .filter(|(_, st)| !st.mapped && st.addr != 0)
            .map(|(&k, _)| k)
            .collect();
        for k in waiting {
            if let Err(e) = self.map(k) {
                let st = &self.bars[&k];
                let whose =
                    if k == moved { address.to_string() } else { "another function".into() };
                log::debug!("pci: {whose} BAR {} at {:#x} not mapped: {e}", st.bar, st.addr);
            }
        }
    }
}

/// A function the plan put on the root complex, as its kind built it.
pub(super) struct Function<'a> {
    pub config: &'a DeviceConfig,
    pub place: pci::Placement,
    pub built: Built,
}

/// Builds the root complex the plan placed: root ports, then the functions
/// behind them, BARs assigned as firmware would, everything on the MMIO
/// bus, and the event-loop work (call relays, INTx resamplers) on `board`.
pub(super) fn add_pcie(
    ctx: &BoardContext<'_>,
    plan: &PciePlan,
    mut functions: Vec<Function<'_>>,
    board: &mut Board,
) -> Result<()> {
    // A function behind a root port needs its port in the tree first.
    functions.sort_by_key(|f| f.place.address.bus);

    let mut root = PciRoot::new(PCIE_INTX_GSI_BASE);
    let mut intx = Vec::new();
    // Functions whose INTx eventfds are their own (a passed-through one).
    let mut own_intx = Vec::new();
    for Function { config, place, built } in functions {
        let dev: SharedDevice = match built {
            Built::Pci(dev) => {
                own_intx.push((place.address, dev.clone()));
                dev
            }
            Built::Virtio(device) => {
                let outside = virtio::calls_from_outside(&device);
                let n = vectors_needed(&*device.lock().unwrap_or_else(|e| e.into_inner()));
                let gsis = (0..n)
                    .map(|_| ctx.router.allocate_msi_gsi().map_err(io_err("MSI-X GSI")))
                    .collect::<Result<_>>()?;
                let location = if place.address.bus == 0 {
                    Location::RootBus
                } else {
                    Location::BehindRootPort
                };
                let router: Arc<dyn MsiRouter> = ctx.router.clone();
                let multifunction = config.pci.multifunction;
                let f =
                    virtio::pci_function(ctx.mem, device, gsis, router, location, multifunction)?;
                intx.push((place.address, f.interrupt()));
                if outside {
                    let relay = f.call_relay().map_err(io_err("eventfd"))?;
                    board.subscribers.push(Arc::new(Mutex::new(relay)));
                }
                Arc::new(Mutex::new(f))
            }
            Built::Placed => {
                return Err(Error::Internal(format!("{} is not a PCI function", config.driver)))
            }
        };
        root.insert(place.address, dev).map_err(Error::PciRoot)?;
    }

    for (address, dev) in own_intx {
        let (Some(gsi), d) = (root.intx_gsi(address), lock(&dev)) else { continue };
        if let Some((trigger, resample)) = d.intx() {
            ctx.vm
                .register_irqfd_with_resample(trigger, resample, gsi)
                .map_err(kvm_err("KVM_IRQFD"))?;
        }
    }
    for (address, interrupt) in intx {
        let Some(gsi) = root.intx_gsi(address) else { continue };
        let resample =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(io_err("eventfd"))?;
        ctx.vm
            .register_irqfd_with_resample(interrupt.intx_evt(), &resample, gsi)
            .map_err(kvm_err("KVM_IRQFD"))?;
        board.subscribers.push(Arc::new(Mutex::new(IntxResampler { resample, interrupt })));
    }

    let bars = root.assign_bars(&plan.windows).map_err(Error::PciRoot)?;
    let kvm = Kvm { vm: ctx.vm.clone(), map: ctx.guest_map.clone() };
    let mut mapper = BarMapper::new(kvm, ctx.mmio);
    for b in &bars {
        let dev = root.device(b.address).ok_or_else(|| {
            Error::Internal(format!("{} vanished during BAR assignment", b.address))
        })?;
        mapper.add(&dev, b.bar, b.addr, b.len)?;
    }
    root.set_config_handler(Box::new(move |address, dev, change| match change {
        ConfigChange::BarMoved(m) => mapper.moved(address, dev, m),
        ConfigChange::MemoryDecode(on) => mapper.memory_decode(address, dev, on),
    }));
    ctx.mmio.insert(Arc::new(Mutex::new(root)), PCIE_ECAM_BASE, PCIE_ECAM_SIZE)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use pci::config::BarKind;

    use super::*;

    /// Records doorbells as (eventfd number, address), and direct areas
    /// as (guest address, length, file offset), cleared when unmapped.
    #[derive(Clone, Default)]
    #[allow(clippy::type_complexity)]
    struct Recorder(Arc<Mutex<Vec<(i32, u64)>>>, Arc<Mutex<Vec<(u64, u64, u64)>>>);

    impl Doorbells for Recorder {
        fn register(&self, evt: &EventFd, addr: u64) -> Result<()> {
            self.0.lock().unwrap().push((evt.as_raw_fd(), addr));
            Ok(())
        }
        fn unregister(&self, evt: &EventFd, addr: u64) -> Result<()> {
            let mut v = self.0.lock().unwrap();
            let at = v.iter().position(|&e| e == (evt.as_raw_fd(), addr)).expect("registered");
            v.remove(at);
            Ok(())
        }
        fn map_direct(&self, range: HostRange<'_>) -> Result<u32> {
            let mut d = self.1.lock().unwrap();
            d.push((range.guest, range.len, range.offset));
            Ok(d.len() as u32 + 100)
        }
        fn unmap_direct(&self, slot: u32) {
            let mut d = self.1.lock().unwrap();
            let i = usize::try_from(slot - 100 - 1).unwrap();
            d[i] = (0, 0, 0);
        }
    }

    /// A function with one 4 KiB BAR 0 and a doorbell at offset 0x10.
    struct Bell {
        evt: EventFd,
        writes: Vec<(u64, u8)>,
    }

    impl pci::PciDevice for Bell {
        fn config_read(&mut self, _: usize) -> u32 {
            0
        }
        fn config_write(&mut self, _: u64, _: &[u8]) -> Option<BarReprogram> {
            None
        }
        fn bar_write(&mut self, _: usize, offset: u64, data: &[u8]) {
            self.writes.push((offset, data[0]));
        }
        fn ioeventfds(&self) -> Vec<(usize, u64, &EventFd)> {
            vec![(0, 0x10, &self.evt)]
        }
    }

    fn bell() -> (Arc<Mutex<Bell>>, SharedDevice) {
        let b = Arc::new(Mutex::new(Bell {
            evt: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            writes: Vec::new(),
        }));
        let shared: SharedDevice = b.clone();
        (b, shared)
    }

    fn moved(old: u64, new: u64) -> BarReprogram {
        BarReprogram {
            index: 0,
            kind: BarKind::Memory32 { prefetchable: false },
            old,
            new,
            len: 0x1000,
        }
    }

    #[test]
    fn a_bar_move_moves_its_range_and_doorbells() {
        let doorbells = Recorder::default();
        let mmio = Arc::new(Bus::new());
        let mut m = BarMapper::new(doorbells.clone(), &mmio);
        let (a, a_dev) = bell();
        let (b, b_dev) = bell();
        let addr = PciAddress::new(0, 1, 0).unwrap();
        m.add(&a_dev, 0, 0xc000_0000, 0x1000).unwrap();
        m.add(&b_dev, 0, 0xc000_1000, 0x1000).unwrap();
        let a_fd = a.lock().unwrap().evt.as_raw_fd();
        let b_fd = b.lock().unwrap().evt.as_raw_fd();

        m.moved(addr, &a_dev, moved(0xc000_0000, 0xc010_0000));
        assert!(!mmio.write(0xc000_0004, &[1]), "old range gone");
        assert!(mmio.write(0xc010_0004, &[2]));
        assert_eq!(a.lock().unwrap().writes, [(4, 2)]);
        let mut bells = doorbells.0.lock().unwrap().clone();
        bells.sort();
        let mut want = vec![(a_fd, 0xc010_0010), (b_fd, 0xc000_1010)];
        want.sort();
        assert_eq!(bells, want);

        // Onto B's range: A decodes nothing; moving A away again must not
        // take B's mapping with it.
        m.moved(addr, &a_dev, moved(0xc010_0000, 0xc000_1000));
        m.moved(addr, &a_dev, moved(0xc000_1000, 0));
        assert!(mmio.write(0xc000_1008, &[3]));
        assert_eq!(b.lock().unwrap().writes, [(8, 3)]);
        assert_eq!(*doorbells.0.lock().unwrap(), [(b_fd, 0xc000_1010)]);

        // A swap, one BAR at a time: A lands on B's range first and is
        // mapped as soon as B leaves it.
        m.moved(addr, &a_dev, moved(0, 0xc000_1000));
        assert!(mmio.write(0xc000_1008, &[4]));
        assert_eq!(b.lock().unwrap().writes, [(8, 3), (8, 4)], "B still decodes");
        m.moved(addr, &b_dev, moved(0xc000_1000, 0xc000_0000));
        assert!(mmio.write(0xc000_1008, &[5]));
        assert_eq!(a.lock().unwrap().writes, [(4, 2), (8, 5)], "A decodes once B left");
        let mut bells = doorbells.0.lock().unwrap().clone();
        bells.sort();
        let mut want = vec![(a_fd, 0xc000_1010), (b_fd, 0xc000_0010)];
        want.sort();
        assert_eq!(bells, want);
    }

    /// A function whose BAR 0 (16 KiB) has a direct area at 0x1000..0x3000
    /// backed by a file at offset 0x40000; memory decode on.
    struct Window(std::fs::File);

    impl pci::PciDevice for Window {
        fn config_read(&mut self, reg: usize) -> u32 {
            if reg == 1 {
                pci::config::COMMAND_MEMORY.into()
            } else {
                0
            }
        }
        fn config_write(&mut self, _: u64, _: &[u8]) -> Option<BarReprogram> {
            None
        }
        fn direct_areas(&self, bar: usize) -> Vec<pci::DirectArea<'_>> {
            use std::os::fd::AsFd;
            if bar != 0 {
                return Vec::new();
            }
            vec![pci::DirectArea {
                offset: 0x1000,
                len: 0x2000,
                fd: self.0.as_fd(),
                fd_offset: 0x40000,
            }]
        }
    }

    /// A BAR's direct areas become guest memory slots where the BAR is,
    /// follow it when it moves, and go when it stops decoding (at 0).
    #[test]
    fn direct_areas_follow_their_bar() {
        let kvm = Recorder::default();
        let mmio = Arc::new(Bus::new());
        let mut m = BarMapper::new(kvm.clone(), &mmio);
        let dev: SharedDevice =
            Arc::new(Mutex::new(Window(std::fs::File::open("/dev/zero").unwrap())));
        let addr = PciAddress::new(0, 1, 0).unwrap();
        let moved = |old, new| BarReprogram {
            index: 0,
            kind: BarKind::Memory64 { prefetchable: false },
            old,
            new,
            len: 0x4000,
        };
        m.add(&dev, 0, 0xc000_0000, 0x4000).unwrap();
        assert_eq!(*kvm.1.lock().unwrap(), [(0xc000_1000, 0x2000, 0x40000)]);
        m.moved(addr, &dev, moved(0xc000_0000, 0xd000_0000));
        assert_eq!(
            *kvm.1.lock().unwrap(),
            [(0, 0, 0), (0xd000_1000, 0x2000, 0x40000)],
            "the old slot removed, a new one at the new address"
        );
        m.moved(addr, &dev, moved(0xd000_0000, 0));
        assert!(kvm.1.lock().unwrap().iter().all(|&e| e == (0, 0, 0)), "nothing mapped at 0");
    }

    /// A passed-through NVMe (VFIO's model on the recording fake) behind
    /// the root complex, driven through ECAM as a guest would: its BAR 0's
    /// mappable pages (below the MSI-X table) are a guest memory slot only
    /// while memory decode is on, and follow the BAR when it moves, with
    /// decode on or off.
    #[test]
    fn vfio_slots_follow_memory_decode_and_bar_moves() {
        use super::super::virtio::tests::NoKvm;
        use pci::vfio::{access::fake::nvme_mappable, HostLayout, VfioPciDevice};

        let fake = Arc::new(nvme_mappable());
        let layout = HostLayout::probe(&*fake, true).unwrap();
        let gsis = pci::vfio::Gsis { msix: (24..89).collect(), msi: Vec::new() };
        let dev = VfioPciDevice::new(fake, &layout, false, false, gsis, Arc::new(NoKvm)).unwrap();
        let dev: SharedDevice = Arc::new(Mutex::new(dev));
        let address = PciAddress::new(0, 2, 0).unwrap();
        let mut root = PciRoot::new(16);
        root.insert(address, dev.clone()).unwrap();

        let kvm = Recorder::default();
        let live = |kvm: &Recorder| -> Vec<(u64, u64, u64)> {
            kvm.1.lock().unwrap().iter().copied().filter(|&e| e != (0, 0, 0)).collect()
        };
        let mmio = Arc::new(Bus::new());
        let mut mapper = BarMapper::new(kvm.clone(), &mmio);
        mapper.add(&dev, 0, 0xc000_0000, 0x4000).unwrap();
        assert_eq!(live(&kvm), [], "the host function starts with decode off");
        root.set_config_handler(Box::new(move |address, dev, change| match change {
            ConfigChange::BarMoved(m) => mapper.moved(address, dev, m),
            ConfigChange::MemoryDecode(on) => mapper.memory_decode(address, dev, on),
        }));
        let ecam = |reg: u64| 2 << 15 | reg;
        let command = |root: &mut PciRoot, v: u16| root.write(ecam(0x04), &v.to_le_bytes());
        root.write(ecam(0x10), &0xc000_0004u32.to_le_bytes());

        command(&mut root, 0x0006);
        assert_eq!(live(&kvm), [(0xc000_0000, 0x2000, 0x10000)], "decode on");
        command(&mut root, 0x0004);
        assert_eq!(live(&kvm), [], "decode off: trapped");
        // Still on the bus: a trapped read reaches the model.
        let mut data = [0u8; 4];
        assert!(mmio.read(0xc000_0000, &mut data));

        // Moved while off: nothing mapped until decode comes back, there.
        root.write(ecam(0x10), &0xd000_0004u32.to_le_bytes());
        assert_eq!(live(&kvm), []);
        command(&mut root, 0x0006);
        assert_eq!(live(&kvm), [(0xd000_0000, 0x2000, 0x10000)]);
        // Moved while on (Linux sizes with decode off; a guest may not).
        root.write(ecam(0x14), &1u32.to_le_bytes());
        assert_eq!(live(&kvm), [(0x1_d000_0000, 0x2000, 0x10000)]);
        // A second enable is not a second slot.
        command(&mut root, 0x0006);
        assert_eq!(live(&kvm).len(), 1);
    }
}
