//! Where each `-device` goes: bus numbers and device/function numbers, from
//! the command line alone (pure, so it is tested without a VM).
//!
//! QEMU places devices one at a time in command-line order, so an automatic
//! device can take a slot that a later `addr=` names and the command line
//! fails. Skiff reserves first: pass 1 takes every explicit `addr=` (and the
//! implicit reservations) on every bus, pass 2 puts the rest, in order, into
//! the first slot with no function in use, at function 0. The multifunction
//! rule is QEMU's (`pci_init_multifunction`), checked once all are placed.
//!
//! Buses: `pcie.0` is bus 0 and its 00.0 is the host bridge. A
//! `pcie-root-port` with `id=X` makes bus `X`, which has only slot 0 (a PCIe
//! link has one device). Root ports are numbered as firmware enumerates
//! them, depth first in slot order on bus 0, so bus numbers match what a
//! guest of QEMU sees after SeaBIOS or Linux number them.

use std::collections::HashSet;

use crate::address::{DevFn, PciAddress};

pub const ROOT_BUS: &str = "pcie.0";
const HOST_BRIDGE: &str = "host bridge";

/// One `-device` that sits on a PCI bus.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceRequest {
    pub driver: String,
    pub id: Option<String>,
    /// `bus=`: `pcie.0` or a root port's `id`; None means `pcie.0`.
    pub bus: Option<String>,
    pub addr: Option<DevFn>,
    pub multifunction: bool,
    pub is_root_port: bool,
}

impl DeviceRequest {
    /// `driver[,id=ID]`, as QEMU names a device in errors.
    pub fn label(&self) -> String {
        match &self.id {
            Some(id) => format!("{},id={id}", self.driver),
            None => self.driver.clone(),
        }
    }
}

/// An address a device claims without being placed there itself (IGD's
/// LPC bridge at 00:1f.0). Counts as single-function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub bus: String,
    pub devfn: DevFn,
    /// Named in the error when a device collides with it.
    pub who: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub address: PciAddress,
    /// For a root port: the bus number behind it.
    pub secondary_bus: Option<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("PCI: slot {slot} function {func} not available for {device}, reserved by {holder}")]
    InUse { slot: u8, func: u8, device: String, holder: String },
    #[error("PCI: no free slot for {device} on bus {bus} (all 32 slots in use)")]
    NoFreeSlot { device: String, bus: String },
    #[error("PCI: no free slot for {device} on bus {bus}: a root port's bus has only slot 0 (PCIe), in use by {holder}")]
    RootPortBusFull { device: String, bus: String, holder: String },
    #[error("PCI: slot {slot} not available for {device} on bus {bus}: a root port's bus has only slot 0 (PCIe)")]
    RootPortSlot { slot: u8, device: String, bus: String },
    #[error("PCI: single function device can't be populated in function {slot:x}.{func:x} ({device}): {slot:x}.0 is {holder}, without multifunction=on")]
    SingleFunction { slot: u8, func: u8, device: String, holder: String },
    #[error("Bus '{bus}' not found (bus= of {device})")]
    UnknownBus { bus: String, device: String },
    #[error("Device '{bus}' has no child bus (bus= of {device})")]
    NotABus { bus: String, device: String },
    #[error("pcie-root-port behind a root port is not supported ({device} on bus {bus})")]
    NestedRootPort { device: String, bus: String },
    #[error("Duplicate ID '{0}' for device")]
    DuplicateId(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holder {
    HostBridge,
    Reserved(usize),
    Device(usize),
}

struct Bus {
    name: String,
    /// The root port (request index) that makes this bus; None for pcie.0.
    port: Option<usize>,
    functions: [Option<Holder>; 256],
}

impl Bus {
    fn new(name: &str, port: Option<usize>) -> Self {
        Self { name: name.to_string(), port, functions: [None; 256] }
    }

    fn slot_free(&self, slot: u8) -> bool {
        (0..DevFn::FUNCS).all(|f| self.functions[usize::from(slot << 3 | f)].is_none())
    }
}

struct Allocator<'a> {
    devices: &'a [DeviceRequest],
    reservations: &'a [Reservation],
    buses: Vec<Bus>,
}

/// Places `devices` (command-line order) around `reservations`. Returns one
/// placement per device, in input order.
pub fn allocate(
    devices: &[DeviceRequest],
    reservations: &[Reservation],
) -> Result<Vec<Placement>, AllocError> {
    check_unique_ids(devices)?;
    let mut a = Allocator { devices, reservations, buses: vec![Bus::new(ROOT_BUS, None)] };
    for (i, d) in devices.iter().enumerate().filter(|(_, d)| d.is_root_port) {
        // A root port without an id makes a bus nobody can name; it still has one.
        a.buses.push(Bus::new(d.id.as_deref().unwrap_or(""), Some(i)));
    }
    let on_bus = devices
        .iter()
        .map(|d| a.resolve(d.bus.as_deref(), &d.label()))
        .collect::<Result<Vec<_>, _>>()?;
    for (d, &bus) in devices.iter().zip(&on_bus) {
        if d.is_root_port && bus != 0 {
            let bus = a.buses[bus].name.clone();
            return Err(AllocError::NestedRootPort { device: d.label(), bus });
        }
    }

    a.buses[0].functions[0] = Some(Holder::HostBridge);
    for (i, r) in reservations.iter().enumerate() {
        let bus = a.resolve(Some(&r.bus), &r.who)?;
        a.buses[bus].functions[usize::from(r.devfn.to_u8())].get_or_insert(Holder::Reserved(i));
    }
    let mut devfns = vec![DevFn::default(); devices.len()];
    for (i, d) in devices.iter().enumerate() {
        if let Some(devfn) = d.addr {
            a.claim(on_bus[i], i, devfn)?;
            devfns[i] = devfn;
        }
    }
    for (i, d) in devices.iter().enumerate() {
        if d.addr.is_none() {
            devfns[i] = a.first_free(on_bus[i], i)?;
        }
    }
    a.check_multifunction()?;

    let numbers = a.bus_numbers(&devfns);
    Ok(devices
        .iter()
        .enumerate()
        .map(|(i, d)| Placement {
            address: PciAddress { bus: numbers[on_bus[i]], devfn: devfns[i] },
            secondary_bus: d
                .is_root_port
                .then(|| a.buses.iter().position(|b| b.port == Some(i)).map(|b| numbers[b]))
                .flatten(),
        })
        .collect())
}

fn check_unique_ids(devices: &[DeviceRequest]) -> Result<(), AllocError> {
    let mut seen = HashSet::new();
    for id in devices.iter().filter_map(|d| d.id.as_deref()) {
        if !seen.insert(id) {
            return Err(AllocError::DuplicateId(id.to_string()));
        }
    }
    Ok(())
}

impl Allocator<'_> {
    /// The index in `buses` of the bus `name`, for `who`'s error messages.
    fn resolve(&self, name: Option<&str>, who: &str) -> Result<usize, AllocError> {
        let name = name.unwrap_or(ROOT_BUS);
        if name == ROOT_BUS {
            return Ok(0);
        }
        if let Some(i) =
            self.buses.iter().position(|b| b.port.is_some() && !b.name.is_empty() && b.name == name)
        {
            return Ok(i);
        }
        let err = if self.devices.iter().any(|d| d.id.as_deref() == Some(name)) {
            AllocError::NotABus { bus: name.to_string(), device: who.to_string() }
        } else {
            AllocError::UnknownBus { bus: name.to_string(), device: who.to_string() }
        };
        Err(err)
    }

    fn holder_label(&self, h: Holder) -> String {
        match h {
            Holder::HostBridge => HOST_BRIDGE.to_string(),
            Holder::Reserved(r) => self.reservations[r].who.clone(),
            Holder::Device(d) => self.devices[d].label(),
        }
    }

    fn multifunction(&self, h: Holder) -> bool {
        matches!(h, Holder::Device(d) if self.devices[d].multifunction)
    }

    fn claim(&mut self, bus: usize, device: usize, devfn: DevFn) -> Result<(), AllocError> {
        let label = self.devices[device].label();
        if self.buses[bus].port.is_some() && devfn.slot != 0 {
            let bus = self.buses[bus].name.clone();
            return Err(AllocError::RootPortSlot { slot: devfn.slot, device: label, bus });
        }
        let function = &mut self.buses[bus].functions[usize::from(devfn.to_u8())];
        match *function {
            None => {
                *function = Some(Holder::Device(device));
                Ok(())
            }
            Some(holder) => Err(AllocError::InUse {
                slot: devfn.slot,
                func: devfn.func,
                device: label,
                holder: self.holder_label(holder),
            }),
        }
    }

    fn first_free(&mut self, bus: usize, device: usize) -> Result<DevFn, AllocError> {
        let slots = if self.buses[bus].port.is_some() { 1 } else { DevFn::SLOTS };
        let Some(slot) = (0..slots).find(|&s| self.buses[bus].slot_free(s)) else {
            let device = self.devices[device].label();
            let b = &self.buses[bus];
            return Err(match b.functions.iter().flatten().next() {
                Some(&holder) if b.port.is_some() => AllocError::RootPortBusFull {
                    device,
                    bus: b.name.clone(),
                    holder: self.holder_label(holder),
                },
                _ => AllocError::NoFreeSlot { device, bus: b.name.clone() },
            });
        };
        let devfn = DevFn { slot, func: 0 };
        self.buses[bus].functions[usize::from(devfn.to_u8())] = Some(Holder::Device(device));
        Ok(devfn)
    }

    /// QEMU's rule: a function above 0 needs function 0, if present, to be
    /// multifunction. (Function 0 may be absent, as in QEMU.)
    fn check_multifunction(&self) -> Result<(), AllocError> {
        for bus in &self.buses {
            for slot in 0..DevFn::SLOTS {
                let base = usize::from(slot) << 3;
                let Some(f0) = bus.functions[base] else { continue };
                if self.multifunction(f0) {
                    continue;
                }
                if let Some((func, &other)) = (1..DevFn::FUNCS)
                    .find_map(|f| bus.functions[base + usize::from(f)].as_ref().map(|h| (f, h)))
                {
                    return Err(AllocError::SingleFunction {
                        slot,
                        func,
                        device: self.holder_label(other),
                        holder: self.holder_label(f0),
                    });
                }
            }
        }
        Ok(())
    }

    /// Bus number per entry of `buses`: root ports in devfn order on bus 0.
    fn bus_numbers(&self, devfns: &[DevFn]) -> Vec<u8> {
        let mut ports: Vec<usize> = (1..self.buses.len()).collect();
        ports.sort_by_key(|&b| self.buses[b].port.map(|d| devfns[d]));
        let mut numbers = vec![0u8; self.buses.len()];
        for (n, b) in ports.into_iter().enumerate() {
            // At most 256 devfns on bus 0, minus the host bridge: fits.
            numbers[b] = (n + 1) as u8;
        }
        numbers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(driver: &str) -> DeviceRequest {
        DeviceRequest { driver: driver.to_string(), ..Default::default() }
    }

    fn with_id(driver: &str, id: &str) -> DeviceRequest {
        DeviceRequest { id: Some(id.to_string()), ..dev(driver) }
    }

    fn at(mut d: DeviceRequest, addr: &str) -> DeviceRequest {
        d.addr = Some(DevFn::parse(addr).unwrap());
        d
    }

    fn on(mut d: DeviceRequest, bus: &str) -> DeviceRequest {
        d.bus = Some(bus.to_string());
        d
    }

    fn mf(mut d: DeviceRequest) -> DeviceRequest {
        d.multifunction = true;
        d
    }

    fn rp(id: &str) -> DeviceRequest {
        DeviceRequest { is_root_port: true, ..with_id("pcie-root-port", id) }
    }

    /// Placements as "bus:slot.func" strings.
    fn place(devices: &[DeviceRequest]) -> Result<Vec<String>, String> {
        allocate(devices, &[])
            .map(|p| p.iter().map(|p| p.address.to_string()).collect())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn every_address_syntax() {
        for addr in ["2", "2.0", "0x2", "02.0", "0x02.0x0"] {
            assert_eq!(
                place(&[at(dev("virtio-rng-pci"), addr)]),
                Ok(vec!["00:02.0".into()]),
                "{addr}"
            );
        }
        let devices = [
            mf(at(dev("a"), "0x2")),
            at(dev("b"), "0x2.0x1"),
            at(dev("c"), "1f.7"),
            at(dev("d"), "10"),
        ];
        assert_eq!(
            place(&devices),
            Ok(vec!["00:02.0".into(), "00:02.1".into(), "00:1f.7".into(), "00:10.0".into()])
        );
    }

    #[test]
    fn auto_devices_fill_from_slot_1_in_order() {
        let devices = [dev("a"), dev("b"), dev("c")];
        assert_eq!(place(&devices), Ok(vec!["00:01.0".into(), "00:02.0".into(), "00:03.0".into()]));
    }

    #[test]
    fn explicit_addresses_are_reserved_regardless_of_order() {
        let auto_first = [dev("virtio-rng-pci"), at(dev("virtio-rng-pci"), "1.0")];
        let explicit_first = [at(dev("virtio-rng-pci"), "1.0"), dev("virtio-rng-pci")];
        assert_eq!(place(&auto_first), Ok(vec!["00:02.0".into(), "00:01.0".into()]));
        assert_eq!(place(&explicit_first), Ok(vec!["00:01.0".into(), "00:02.0".into()]));
    }

    #[test]
    fn duplicate_addresses_name_both_devices() {
        let devices = [at(with_id("vhost-user-fs-pci", "fs0"), "2"), at(dev("vfio-pci"), "2.0")];
        assert_eq!(
            place(&devices),
            Err("PCI: slot 2 function 0 not available for vfio-pci, reserved by vhost-user-fs-pci,id=fs0".into())
        );
        let devices = [at(dev("virtio-net-pci"), "3"), at(with_id("virtio-blk-pci", "d0"), "3")];
        assert_eq!(
            place(&devices),
            Err("PCI: slot 3 function 0 not available for virtio-blk-pci,id=d0, reserved by virtio-net-pci".into())
        );
    }

    #[test]
    fn host_bridge_holds_00_0() {
        assert_eq!(
            place(&[at(dev("virtio-net-pci"), "0")]),
            Err("PCI: slot 0 function 0 not available for virtio-net-pci, reserved by host bridge"
                .into())
        );
        assert_eq!(
            place(&[at(dev("virtio-net-pci"), "0.1")]),
            Err(
                "PCI: single function device can't be populated in function 0.1 (virtio-net-pci): \
                 0.0 is host bridge, without multifunction=on"
                    .into()
            )
        );
    }

    #[test]
    fn multifunction_rules() {
        // Function 0 with multifunction=on: others may join, in any order.
        let ok = [at(dev("b"), "4.3"), mf(at(dev("a"), "4")), at(dev("c"), "4.1")];
        assert_eq!(place(&ok), Ok(vec!["00:04.3".into(), "00:04.0".into(), "00:04.1".into()]));
        // Function 0 without it: refused, whichever came first (QEMU refuses both orders).
        for devices in [
            vec![at(dev("a"), "4"), at(with_id("b", "b1"), "4.2")],
            vec![at(with_id("b", "b1"), "4.2"), at(dev("a"), "4")],
        ] {
            assert_eq!(
                place(&devices),
                Err("PCI: single function device can't be populated in function 4.2 (b,id=b1): \
                     4.0 is a, without multifunction=on"
                    .into())
            );
        }
        // No function 0 at all is allowed, as in QEMU.
        assert_eq!(place(&[at(dev("b"), "5.1")]), Ok(vec!["00:05.1".into()]));
        // Automatic placement never lands in a slot that has any function taken.
        assert_eq!(
            place(&[dev("a"), at(dev("b"), "1.1")]),
            Ok(vec!["00:02.0".into(), "00:01.1".into()])
        );
    }

    #[test]
    fn root_port_buses() {
        let devices = [
            rp("rp0"),
            rp("rp1"),
            on(with_id("virtio-net-pci", "n0"), "rp1"),
            on(at(dev("virtio-blk-pci"), "0.0"), "rp0"),
            on(dev("virtio-rng-pci"), "pcie.0"),
        ];
        let placed = allocate(&devices, &[]).unwrap();
        let got: Vec<_> = placed.iter().map(|p| (p.address.to_string(), p.secondary_bus)).collect();
        assert_eq!(
            got,
            vec![
                ("00:01.0".into(), Some(1)),
                ("00:02.0".into(), Some(2)),
                ("02:00.0".into(), None),
                ("01:00.0".into(), None),
                ("00:03.0".into(), None),
            ]
        );
    }

    #[test]
    fn root_port_may_come_after_its_devices() {
        let devices = [on(dev("virtio-net-pci"), "rp0"), rp("rp0")];
        assert_eq!(place(&devices), Ok(vec!["01:00.0".into(), "00:01.0".into()]));
    }

    #[test]
    fn bus_numbers_follow_slot_order_like_firmware() {
        let devices =
            [at(rp("rp0"), "5"), at(rp("rp1"), "3"), on(dev("a"), "rp0"), on(dev("b"), "rp1")];
        let placed = allocate(&devices, &[]).unwrap();
        assert_eq!(placed[0].secondary_bus, Some(2));
        assert_eq!(placed[1].secondary_bus, Some(1));
        assert_eq!(placed[2].address.to_string(), "02:00.0");
        assert_eq!(placed[3].address.to_string(), "01:00.0");
    }

    #[test]
    fn libvirt_style_multifunction_root_ports() {
        let devices = [
            mf(at(rp("pci.1"), "0x2")),
            at(rp("pci.2"), "0x2.0x1"),
            at(rp("pci.3"), "0x2.0x2"),
            on(dev("virtio-net-pci"), "pci.3"),
        ];
        let placed = allocate(&devices, &[]).unwrap();
        let buses: Vec<_> = placed.iter().map(|p| p.secondary_bus).collect();
        assert_eq!(buses, vec![Some(1), Some(2), Some(3), None]);
        assert_eq!(placed[3].address.to_string(), "03:00.0");
    }

    #[test]
    fn root_port_bus_has_one_slot() {
        let devices = [
            rp("rp0"),
            on(with_id("virtio-net-pci", "n0"), "rp0"),
            on(dev("virtio-blk-pci"), "rp0"),
        ];
        assert_eq!(
            place(&devices),
            Err("PCI: no free slot for virtio-blk-pci on bus rp0: a root port's bus has only slot 0 (PCIe), \
                 in use by virtio-net-pci,id=n0"
                .into())
        );
        let devices = [rp("rp0"), on(at(dev("virtio-net-pci"), "1"), "rp0")];
        assert_eq!(
            place(&devices),
            Err("PCI: slot 1 not available for virtio-net-pci on bus rp0: a root port's bus has only slot 0 (PCIe)"
                .into())
        );
        // Functions of slot 0 are fine behind a root port.
        let devices = [rp("rp0"), on(mf(at(dev("a"), "0")), "rp0"), on(at(dev("b"), "0.1"), "rp0")];
        assert_eq!(place(&devices), Ok(vec!["00:01.0".into(), "01:00.0".into(), "01:00.1".into()]));
    }

    #[test]
    fn unknown_and_non_bus_names() {
        assert_eq!(
            place(&[on(with_id("virtio-net-pci", "n0"), "rp9")]),
            Err("Bus 'rp9' not found (bus= of virtio-net-pci,id=n0)".into())
        );
        assert_eq!(
            place(&[with_id("virtio-blk-pci", "d0"), on(dev("virtio-net-pci"), "d0")]),
            Err("Device 'd0' has no child bus (bus= of virtio-net-pci)".into())
        );
        assert_eq!(
            place(&[rp("rp0"), on(rp("rp1"), "rp0")]),
            Err("pcie-root-port behind a root port is not supported (pcie-root-port,id=rp1 on bus rp0)".into())
        );
        assert_eq!(
            place(&[with_id("a", "x"), with_id("b", "x")]),
            Err("Duplicate ID 'x' for device".into())
        );
    }

    #[test]
    fn thirty_two_slots_run_out() {
        // Slot 0 is the host bridge: 31 devices fit.
        let mut devices: Vec<_> = (0..31).map(|_| dev("virtio-rng-pci")).collect();
        let placed = place(&devices).unwrap();
        assert_eq!(placed.last().unwrap(), "00:1f.0");
        devices.push(with_id("virtio-net-pci", "n0"));
        assert_eq!(
            place(&devices),
            Err("PCI: no free slot for virtio-net-pci,id=n0 on bus pcie.0 (all 32 slots in use)"
                .into())
        );
    }

    #[test]
    fn implicit_reservations() {
        let lpc = Reservation {
            bus: ROOT_BUS.into(),
            devfn: DevFn::parse("1f.0").unwrap(),
            who: "vfio-pci,id=igd (IGD LPC bridge)".into(),
        };
        let err =
            allocate(&[at(dev("virtio-net-pci"), "1f")], std::slice::from_ref(&lpc)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "PCI: slot 31 function 0 not available for virtio-net-pci, reserved by vfio-pci,id=igd (IGD LPC bridge)"
        );
        // Automatic placement skips it: 30 devices fit, not 31.
        let devices: Vec<_> = (0..31).map(|_| dev("virtio-rng-pci")).collect();
        assert!(matches!(
            allocate(&devices, std::slice::from_ref(&lpc)),
            Err(AllocError::NoFreeSlot { .. })
        ));
        assert!(allocate(&devices[..30], std::slice::from_ref(&lpc)).is_ok());
        // Reserved addresses count as single-function.
        assert!(matches!(
            allocate(&[at(dev("a"), "1f.1")], std::slice::from_ref(&lpc)),
            Err(AllocError::SingleFunction { .. })
        ));
        let bad = Reservation { bus: "nope".into(), ..lpc };
        assert_eq!(
            allocate(&[], &[bad]).unwrap_err().to_string(),
            "Bus 'nope' not found (bus= of vfio-pci,id=igd (IGD LPC bridge))"
        );
    }
}
