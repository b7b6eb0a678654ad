//! The two functions the root complex brings itself: the host bridge at
//! 00:00.0 and `pcie-root-port`, with QEMU's IDs so guests bind the same.

use crate::capability::PcieCap;
use crate::config::{BarReprogram, ConfigParams, PciConfig};
use crate::device::PciDevice;

/// Red Hat, Inc.: QEMU's own PCI vendor ID.
pub const VENDOR_REDHAT: u16 = 0x1b36;
/// `gpex-root`: QEMU's PCIe host bridge (PCI_DEVICE_ID_REDHAT_PCIE_HOST).
pub const DEVICE_PCIE_HOST: u16 = 0x0008;
/// `pcie-root-port` (PCI_DEVICE_ID_REDHAT_PCIE_RP).
pub const DEVICE_PCIE_ROOT_PORT: u16 = 0x000c;

const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;
const CLASS_PCI_BRIDGE: u32 = 0x06_04_00;

/// 00:00.0: identifies the root complex and does nothing else.
pub struct HostBridge {
    config: PciConfig,
}

impl HostBridge {
    pub fn new() -> Self {
        let config = PciConfig::new(&ConfigParams {
            vendor_id: VENDOR_REDHAT,
            device_id: DEVICE_PCIE_HOST,
            class_code: CLASS_HOST_BRIDGE,
            ..Default::default()
        });
        Self { config }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) -> Option<BarReprogram> {
        self.config.write(offset, data)
    }
}

/// `-device pcie-root-port,chassis=N,slot=N[,port=N]`, as the bus allocator
/// placed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootPortParams {
    /// QEMU checks (chassis, slot) pairs for uniqueness; neither has a
    /// register of its own on a PCIe port except the slot number.
    pub chassis: u8,
    pub slot: u16,
    /// The link's port number (QEMU's `port=`).
    pub port: u8,
    pub multifunction: bool,
    /// The bus behind the port, as the allocator numbered it.
    pub secondary_bus: u8,
}

/// A PCIe root port: a type 1 header whose bus numbers and memory windows
/// the firmware-like BAR assignment (or the guest) programs. No hot-plug and
/// no I/O window.
pub struct RootPort {
    config: PciConfig,
    params: RootPortParams,
}

impl RootPort {
    pub fn new(params: RootPortParams) -> Self {
        let mut config = PciConfig::new(&ConfigParams {
            vendor_id: VENDOR_REDHAT,
            device_id: DEVICE_PCIE_ROOT_PORT,
            class_code: CLASS_PCI_BRIDGE,
            bridge: true,
            multifunction: params.multifunction,
            // As QEMU's root port, for PME and AER via INTx.
            interrupt_pin: 1,
            ..Default::default()
        });
        config.set_bridge_buses(0, params.secondary_bus, params.secondary_bus);
        PcieCap::RootPort { slot: params.slot, port: params.port }
            .add_to(&mut config)
            .expect("a fresh header has room for the PCIe capability");
        Self { config, params }
    }

    pub fn params(&self) -> RootPortParams {
        self.params
    }

    pub fn config(&self) -> &PciConfig {
        &self.config
    }
}

impl PciDevice for RootPort {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) -> Option<BarReprogram> {
        self.config.write(offset, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capability::CAP_ID_PCIE;
    use crate::config::{HEADER_TYPE, INTERRUPT_PIN};

    #[test]
    fn host_bridge_identity() {
        let mut h = HostBridge::new();
        assert_eq!(h.config_read(0), 0x0008_1b36);
        assert_eq!(h.config_read(2) >> 8, 0x06_00_00);
        assert_eq!(h.config_read(3) >> 16 & 0xff, 0);
        // No BARs.
        assert_eq!(h.config_write(0x10, &[0xff; 4]), None);
        assert_eq!(h.config_read(4), 0);
    }

    #[test]
    fn root_port_identity_and_buses() {
        let params = RootPortParams {
            chassis: 1,
            slot: 3,
            port: 0x10,
            multifunction: true,
            secondary_bus: 2,
        };
        let mut rp = RootPort::new(params);
        assert_eq!(rp.config_read(0), 0x000c_1b36);
        assert_eq!(rp.config_read(2) >> 8, 0x06_04_00);
        assert_eq!(rp.config().read_u8(HEADER_TYPE), 0x81);
        assert_eq!(rp.config().read_u8(INTERRUPT_PIN), 1);
        assert_eq!(rp.config().bridge_buses(), (0, 2, 2));
        let cap = rp.config().find_capability(CAP_ID_PCIE).unwrap();
        assert_eq!(rp.config().read_u32(cap + 0x14) >> 19, 3);
        // The guest may renumber the bus behind it.
        rp.config_write(0x19, &[5]);
        rp.config_write(0x1a, &[5]);
        assert_eq!(rp.config().bridge_buses(), (0, 5, 5));
        assert_eq!(rp.params(), params);
    }
}
