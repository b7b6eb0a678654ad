//! The PCIe root complex: the tree of functions under the host bridge, and
//! the ECAM window through which the guest reaches their config space.
//!
//! Functions sit in a tree (bus 0, and a bus behind each bridge) rather than
//! in a map by bus number, because the guest owns the bridges' bus number
//! registers: an access to bus N goes to whichever bridge currently claims N
//! between its secondary and subordinate numbers, as on real hardware.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::BusDevice;
use log::debug;

use crate::address::{DevFn, PciAddress};
use crate::bridge::HostBridge;
use crate::config::{
    BarReprogram, COMMAND, COMMAND_MEMORY, HEADER_TYPE, INTERRUPT_PIN, PRIMARY_BUS,
};
use crate::device::PciDevice;

/// A function shared by the root (config) and the MMIO bus (its BARs).
pub type SharedDevice = Arc<Mutex<dyn PciDevice>>;

/// What a guest's config write changed that the VMM must follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigChange {
    /// A BAR moved.
    BarMoved(BarReprogram),
    /// The command register was written: whether the function decodes its
    /// memory BARs now (reported on every write; the VMM keeps the state).
    MemoryDecode(bool),
}

/// Called, on the vCPU thread that wrote config space, before the write
/// returns: the guest may touch the new address on its very next
/// instruction.
pub type ConfigHandler = Box<dyn FnMut(PciAddress, &SharedDevice, ConfigChange) + Send>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RootError {
    #[error("PCI: no bridge leads to bus {bus} for {address}", bus = .0.bus, address = .0)]
    NoSuchBus(PciAddress),
    #[error("PCI: {0} is already in use")]
    Occupied(PciAddress),
    #[error(
        "PCI: the BARs need {need:#x} bytes ({align:#x}-aligned) but the {window} window is {size:#x} bytes at {base:#x}"
    )]
    WindowFull { window: &'static str, need: u64, align: u64, base: u64, size: u64 },
}

pub(crate) struct Node {
    pub(crate) dev: SharedDevice,
    /// The bus behind a bridge.
    pub(crate) child: Option<BusNode>,
}

#[derive(Default)]
pub(crate) struct BusNode {
    pub(crate) devices: BTreeMap<DevFn, Node>,
}

/// A device that panicked while holding its lock is used as it was; see
/// `devices::bus`.
pub fn lock(dev: &SharedDevice) -> MutexGuard<'_, dyn PciDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

/// (secondary, subordinate) as the bridge's registers say now.
pub(crate) fn bridge_buses(dev: &SharedDevice) -> (u8, u8) {
    let r = lock(dev).config_read(PRIMARY_BUS / 4);
    ((r >> 8) as u8, (r >> 16) as u8)
}

impl BusNode {
    /// Where bus `target` hangs, starting from this bus numbered `number`.
    /// A bridge claims only numbers above its own bus, so a guest's bad
    /// numbering cannot loop.
    fn bus(&self, number: u8, target: u8) -> Option<&BusNode> {
        if number == target {
            return Some(self);
        }
        for node in self.devices.values() {
            let Some(child) = &node.child else { continue };
            let (secondary, subordinate) = bridge_buses(&node.dev);
            if secondary > number && (secondary..=subordinate).contains(&target) {
                return child.bus(secondary, target);
            }
        }
        None
    }

    fn bus_mut(&mut self, number: u8, target: u8) -> Option<&mut BusNode> {
        if number == target {
            return Some(self);
        }
        for node in self.devices.values_mut() {
            let Some(child) = &mut node.child else { continue };
            let (secondary, subordinate) = bridge_buses(&node.dev);
            if secondary > number && (secondary..=subordinate).contains(&target) {
                return child.bus_mut(secondary, target);
            }
        }
        None
    }

    /// Every function under this bus: (address, slots from bus 0 down, node).
    fn walk<'a>(
        &'a self,
        number: u8,
        path: &mut Vec<u8>,
        out: &mut Vec<(PciAddress, Vec<u8>, &'a Node)>,
    ) {
        for (&devfn, node) in &self.devices {
            path.push(devfn.slot);
            out.push((PciAddress { bus: number, devfn }, path.clone(), node));
            if let Some(child) = &node.child {
                let (secondary, _) = bridge_buses(&node.dev);
                if secondary > number {
                    child.walk(secondary, path, out);
                }
            }
            path.pop();
        }
    }
}

pub struct PciRoot {
    pub(crate) bus0: BusNode,
    on_config: Option<ConfigHandler>,
    /// The GSI of bus 0's INTA; INTB..INTD follow.
    intx_gsi_base: u32,
}

impl PciRoot {
    /// A root complex with only the host bridge, at 00:00.0, whose INTA..INTD
    /// are GSIs `intx_gsi_base`..`intx_gsi_base + 3`.
    pub fn new(intx_gsi_base: u32) -> Self {
        let mut bus0 = BusNode::default();
        let host: SharedDevice = Arc::new(Mutex::new(HostBridge::new()));
        bus0.devices.insert(DevFn::default(), Node { dev: host, child: None });
        Self { bus0, on_config: None, intx_gsi_base }
    }

    /// Who moves BAR mappings when the guest reprograms a BAR or turns
    /// memory decode on or off.
    pub fn set_config_handler(&mut self, handler: ConfigHandler) {
        self.on_config = Some(handler);
    }

    /// Adds a function at `address`. A bus other than 0 must already have
    /// its bridge (insert in bus number order, as the allocator numbers).
    pub fn insert(&mut self, address: PciAddress, dev: SharedDevice) -> Result<(), RootError> {
        let is_bridge = (lock(&dev).config_read(HEADER_TYPE / 4) >> 16) & 0x7f == 1;
        let bus = self.bus0.bus_mut(0, address.bus).ok_or(RootError::NoSuchBus(address))?;
        if bus.devices.contains_key(&address.devfn) {
            return Err(RootError::Occupied(address));
        }
        let child = is_bridge.then(BusNode::default);
        bus.devices.insert(address.devfn, Node { dev, child });
        Ok(())
    }

    /// The function at `address` under the current bus numbering.
    pub fn device(&self, address: PciAddress) -> Option<SharedDevice> {
        let bus = self.bus0.bus(0, address.bus)?;
        bus.devices.get(&address.devfn).map(|n| n.dev.clone())
    }

    /// Every function (host bridge included), depth first.
    pub fn devices(&self) -> Vec<(PciAddress, SharedDevice)> {
        let mut out = Vec::new();
        self.bus0.walk(0, &mut Vec::new(), &mut out);
        out.into_iter().map(|(a, _, n)| (a, n.dev.clone())).collect()
    }

    /// The GSI that the function's INTx pin reaches: swizzled through each
    /// bridge on the way up (PCI-to-PCI bridge spec, as Linux and QEMU do),
    /// then routed by bus 0's `_PRT` (`crate::intx_gsi`). None without a pin.
    pub fn intx_gsi(&self, address: PciAddress) -> Option<u32> {
        let mut all = Vec::new();
        self.bus0.walk(0, &mut Vec::new(), &mut all);
        let (_, path, node) = all.into_iter().find(|(a, _, _)| *a == address)?;
        let pin = (lock(&node.dev).config_read(INTERRUPT_PIN / 4) >> 8) as u8;
        if !(1..=4).contains(&pin) {
            return None;
        }
        let (&root_slot, below) = path.split_first()?;
        let pin = below.iter().fold(pin - 1, |pin, &slot| (pin + slot) % 4);
        Some(crate::intx_gsi(self.intx_gsi_base, root_slot, pin))
    }

    fn find(&self, address: PciAddress) -> Option<&SharedDevice> {
        let bus = self.bus0.bus(0, address.bus)?;
        bus.devices.get(&address.devfn).map(|n| &n.dev)
    }
}

/// The ECAM window: offset = bus << 20 | device << 15 | function << 12 | register.
impl BusDevice for PciRoot {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some((address, reg)) = decode(offset, data.len()) else {
            data.fill(0xff);
            return;
        };
        // A function nobody answers for reads as all ones (master abort).
        let value =
            self.find(address).map_or(!0, |dev| lock(dev).config_read(usize::from(reg / 4)));
        let bytes = (value >> ((reg % 4) * 8)).to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some((address, reg)) = decode(offset, data.len()) else { return };
        let Some(dev) = self.find(address).cloned() else { return };
        let moved = lock(&dev).config_write(u64::from(reg), data);
        let mut changes = Vec::with_capacity(2);
        changes.extend(moved.map(ConfigChange::BarMoved));
        let end = usize::from(reg) + data.len();
        if usize::from(reg) < COMMAND + 2 && COMMAND < end {
            // Read back: the device decides which bits stick.
            let command = lock(&dev).config_read(COMMAND / 4) as u16;
            changes.push(ConfigChange::MemoryDecode(command & COMMAND_MEMORY != 0));
        }
        for change in changes {
            match &mut self.on_config {
                Some(handler) => handler(address, &dev, change),
                None => debug!("pci: {address}: {change:?} with nobody to tell"),
            }
        }
    }
}

/// ECAM takes 1, 2 and 4-byte accesses aligned to their size.
fn decode(offset: u64, len: usize) -> Option<(PciAddress, u16)> {
    if !matches!(len, 1 | 2 | 4) || offset & (len as u64 - 1) != 0 || offset >= 1 << 28 {
        debug!("pci: ignoring {len}-byte ECAM access at {offset:#x}");
        return None;
    }
    Some(PciAddress::from_ecam_offset(offset))
}

#[cfg(any(test, feature = "fuzzing"))]
#[cfg_attr(not(test), allow(dead_code, unused_imports))]
pub(crate) mod tests {
    use super::*;
    use crate::bridge::{RootPort, RootPortParams};
    use crate::config::{BarKind, ConfigParams, PciConfig};

    /// An endpoint with the given BARs, recording BAR accesses.
    pub(crate) struct Endpoint {
        pub(crate) config: PciConfig,
    }

    impl Endpoint {
        pub(crate) fn new(bars: &[(usize, BarKind, u64)]) -> Self {
            let mut config = PciConfig::new(&ConfigParams {
                vendor_id: 0x1af4,
                device_id: 0x1041,
                class_code: 0x02_00_00,
                interrupt_pin: 1,
                ..Default::default()
            });
            for &(i, kind, size) in bars {
                config.add_bar(i, kind, size).unwrap();
            }
            Self { config }
        }

        pub(crate) fn shared(bars: &[(usize, BarKind, u64)]) -> SharedDevice {
            Arc::new(Mutex::new(Self::new(bars)))
        }
    }

    impl PciDevice for Endpoint {
        fn config_read(&mut self, reg: usize) -> u32 {
            self.config.read_reg(reg)
        }
        fn config_write(&mut self, offset: u64, data: &[u8]) -> Option<BarReprogram> {
            self.config.write(offset, data)
        }
    }

    pub(crate) fn root_port(secondary_bus: u8) -> SharedDevice {
        let params =
            RootPortParams { chassis: 1, slot: 1, port: 0, multifunction: false, secondary_bus };
        Arc::new(Mutex::new(RootPort::new(params)))
    }

    pub(crate) fn addr(bus: u8, slot: u8, func: u8) -> PciAddress {
        PciAddress::new(bus, slot, func).unwrap()
    }

    fn read(root: &mut PciRoot, a: PciAddress, reg: u16, len: usize) -> u32 {
        let mut data = [0u8; 4];
        root.read(a.ecam_offset(reg), &mut data[..len]);
        u32::from_le_bytes(data)
    }

    fn write(root: &mut PciRoot, a: PciAddress, reg: u16, data: &[u8]) {
        root.write(a.ecam_offset(reg), data);
    }

    #[test]
    fn host_bridge_and_absent_functions() {
        let mut root = PciRoot::new(16);
        assert_eq!(read(&mut root, addr(0, 0, 0), 0, 4), 0x0008_1b36);
        assert_eq!(read(&mut root, addr(0, 1, 0), 0, 4), 0xffff_ffff);
        assert_eq!(read(&mut root, addr(0, 0, 1), 0, 2), 0xffff);
        assert_eq!(read(&mut root, addr(7, 0, 0), 0, 1), 0xff);
        // Writes to nothing are dropped.
        write(&mut root, addr(0, 1, 0), 4, &[0xff]);
    }

    #[test]
    fn access_sizes_and_alignment() {
        let mut root = PciRoot::new(16);
        let a = addr(0, 3, 0);
        root.insert(a, Endpoint::shared(&[])).unwrap();
        assert_eq!(read(&mut root, a, 0, 4), 0x1041_1af4);
        assert_eq!(read(&mut root, a, 2, 2), 0x1041);
        assert_eq!(read(&mut root, a, 3, 1), 0x10);
        assert_eq!(read(&mut root, a, 0x0b, 1), 0x02);
        // Misaligned or odd-sized: all ones, and writes ignored.
        assert_eq!(read(&mut root, a, 1, 2), 0xffff);
        let mut wide = [0u8; 8];
        root.read(a.ecam_offset(0), &mut wide);
        assert_eq!(wide, [0xff; 8]);
        write(&mut root, a, 0x3c, &[9]);
        write(&mut root, a, 0x3d, &[9, 9]);
        assert_eq!(read(&mut root, a, 0x3c, 2), 0x0109);
        // Extended config space is there, and empty.
        assert_eq!(read(&mut root, a, 0x100, 4), 0);
    }

    #[test]
    fn bus_numbers_follow_the_bridge_registers() {
        let mut root = PciRoot::new(16);
        root.insert(addr(0, 1, 0), root_port(1)).unwrap();
        root.insert(addr(1, 0, 0), Endpoint::shared(&[])).unwrap();
        assert_eq!(read(&mut root, addr(1, 0, 0), 0, 4), 0x1041_1af4);
        // A root port's bus has only device 0.
        assert_eq!(read(&mut root, addr(1, 1, 0), 0, 4), !0);
        // The guest renumbers the bridge: the device moves with it.
        write(&mut root, addr(0, 1, 0), 0x18, &[0, 5, 5, 0]);
        assert_eq!(read(&mut root, addr(1, 0, 0), 0, 4), !0);
        assert_eq!(read(&mut root, addr(5, 0, 0), 0, 4), 0x1041_1af4);
        assert!(root.device(addr(5, 0, 0)).is_some());
        // Secondary 0 (reset value) forwards nothing and cannot loop.
        write(&mut root, addr(0, 1, 0), 0x18, &[0, 0, 0, 0]);
        assert_eq!(read(&mut root, addr(0, 0, 0), 0, 4), 0x0008_1b36);
        assert_eq!(read(&mut root, addr(5, 0, 0), 0, 4), !0);
    }

    #[test]
    fn insert_errors() {
        let mut root = PciRoot::new(16);
        assert_eq!(
            root.insert(addr(0, 0, 0), Endpoint::shared(&[])),
            Err(RootError::Occupied(addr(0, 0, 0)))
        );
        assert_eq!(
            root.insert(addr(2, 0, 0), Endpoint::shared(&[])),
            Err(RootError::NoSuchBus(addr(2, 0, 0)))
        );
        assert_eq!(
            root.insert(addr(2, 0, 0), Endpoint::shared(&[])).unwrap_err().to_string(),
            "PCI: no bridge leads to bus 2 for 02:00.0"
        );
    }

    #[test]
    fn bar_moves_reach_the_handler() {
        let mut root = PciRoot::new(16);
        let a = addr(0, 2, 0);
        root.insert(a, Endpoint::shared(&[(0, BarKind::Memory32 { prefetchable: false }, 0x1000)]))
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        root.set_config_handler(Box::new(move |addr, _, change| tx.send((addr, change)).unwrap()));
        write(&mut root, a, 0x10, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(read(&mut root, a, 0x10, 4), 0xffff_f000);
        write(&mut root, a, 0x10, &0xc000_0000u32.to_le_bytes());
        let (at, ConfigChange::BarMoved(moved)) = rx.try_recv().unwrap() else { panic!() };
        assert_eq!((at, moved.old, moved.new, moved.len), (a, 0, 0xc000_0000, 0x1000));
        assert!(rx.try_recv().is_err(), "sizing is not a move");
        // Any write that covers the command register reports memory decode
        // as the device now reads it; a write beside it reports nothing.
        write(&mut root, a, 0x04, &0x0002u16.to_le_bytes());
        write(&mut root, a, 0x05, &[0]);
        write(&mut root, a, 0x04, &0u32.to_le_bytes());
        write(&mut root, a, 0x06, &0u16.to_le_bytes());
        let changes: Vec<_> = rx.try_iter().collect();
        assert_eq!(
            changes,
            [
                (a, ConfigChange::MemoryDecode(true)),
                (a, ConfigChange::MemoryDecode(true)),
                (a, ConfigChange::MemoryDecode(false)),
            ]
        );
    }

    #[test]
    fn intx_swizzle_through_root_ports() {
        let mut root = PciRoot::new(16);
        root.insert(addr(0, 1, 0), root_port(1)).unwrap();
        root.insert(addr(0, 6, 0), Endpoint::shared(&[])).unwrap();
        root.insert(addr(1, 0, 0), Endpoint::shared(&[])).unwrap();
        // INTA on slot 6: (6 + 0) % 4 = 2.
        assert_eq!(root.intx_gsi(addr(0, 6, 0)), Some(18));
        // Behind the port in slot 1: device 0 keeps INTA, the port's slot swizzles.
        assert_eq!(root.intx_gsi(addr(1, 0, 0)), Some(17));
        assert_eq!(root.intx_gsi(addr(0, 1, 0)), Some(17));
        // The host bridge has no pin; absent functions have no GSI.
        assert_eq!(root.intx_gsi(addr(0, 0, 0)), None);
        assert_eq!(root.intx_gsi(addr(0, 9, 0)), None);
    }

    #[test]
    fn lists_devices_depth_first() {
        let mut root = PciRoot::new(16);
        root.insert(addr(0, 2, 0), root_port(1)).unwrap();
        root.insert(addr(0, 3, 0), Endpoint::shared(&[])).unwrap();
        root.insert(addr(1, 0, 0), Endpoint::shared(&[])).unwrap();
        let got: Vec<_> = root.devices().into_iter().map(|(a, _)| a.to_string()).collect();
        assert_eq!(got, ["00:00.0", "00:02.0", "01:00.0", "00:03.0"]);
    }
}
