//! Where the PCI `-device`s go, decided from the command line before any VM
//! exists: every explicit `addr=` is reserved first, so a conflict (or a
//! bad `bus=`) fails at once with QEMU's message naming both devices.

use pci::{allocate, DeviceRequest, Placement};

use crate::config::{DeviceConfig, PciDeviceConfig, PciKind, VmConfig};

pub fn pci_devices(cfg: &VmConfig) -> impl Iterator<Item = &PciDeviceConfig> {
    cfg.devices.iter().filter_map(|d| match d {
        DeviceConfig::Pci(p) => Some(p),
        _ => None,
    })
}

/// The placement of each PCI device, in command-line order.
pub fn place(cfg: &VmConfig) -> Result<Vec<Placement>, String> {
    let requests: Vec<DeviceRequest> = pci_devices(cfg)
        .map(|p| DeviceRequest {
            driver: p.driver.clone(),
            id: p.id.clone(),
            bus: p.bus.clone(),
            addr: p.addr,
            multifunction: p.multifunction,
            is_root_port: matches!(p.kind, PciKind::RootPort { .. }),
        })
        .collect();
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    if !cfg.machine.pcie.resolve(false) {
        // QEMU: "No 'PCI' bus found for device".
        return Err(format!(
            "-device {}: no PCI bus for the device (use -M microvm,pcie=on)",
            requests[0].driver
        ));
    }
    allocate(&requests, &[]).map_err(|e| format!("-device: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{parse, Action};

    fn cfg(args: &[&str]) -> VmConfig {
        let mut all = vec!["-M", "microvm,pcie=on"];
        all.extend_from_slice(args);
        match parse(all.iter().map(|s| s.to_string())) {
            Ok(Action::Run(c)) => *c,
            other => panic!("{other:?}"),
        }
    }

    fn slots(cfg: &VmConfig) -> Vec<String> {
        place(cfg).unwrap().iter().map(|p| p.address.to_string()).collect()
    }

    #[test]
    fn explicit_address_wins_whatever_the_order() {
        let a = cfg(&["-device", "virtio-rng-pci", "-device", "virtio-rng-pci,id=late,addr=1.0"]);
        let b = cfg(&["-device", "virtio-rng-pci,id=late,addr=1.0", "-device", "virtio-rng-pci"]);
        assert_eq!(slots(&a), vec!["00:02.0", "00:01.0"]);
        assert_eq!(slots(&b), vec!["00:01.0", "00:02.0"]);
    }

    #[test]
    fn two_devices_on_one_address_name_both() {
        let c = cfg(&[
            "-device",
            "virtio-rng-pci,id=a,addr=2.0",
            "-device",
            "virtio-rng-pci,id=b,addr=2",
        ]);
        let e = place(&c).unwrap_err();
        assert!(e.contains("slot 2 function 0 not available"), "{e}");
        assert!(e.contains("id=a") && e.contains("id=b"), "{e}");
    }

    #[test]
    fn root_port_bus_and_pcie_off() {
        let c = cfg(&[
            "-device",
            "pcie-root-port,id=rp0,chassis=1,slot=1",
            "-device",
            "virtio-rng-pci,bus=rp0",
        ]);
        assert_eq!(slots(&c), vec!["00:01.0", "01:00.0"]);
        let e = place(&cfg(&["-device", "virtio-rng-pci,bus=nope"])).unwrap_err();
        assert!(e.contains("nope"), "{e}");
        let off = match parse(["-device".to_string(), "virtio-rng-pci".to_string()]) {
            Ok(Action::Run(c)) => *c,
            other => panic!("{other:?}"),
        };
        assert!(place(&off).unwrap_err().contains("pcie=on"));
    }
}
