//! Builders for the capabilities Skiff's functions carry: PCI Express (so the
//! guest sees a PCIe hierarchy) and MSI-X (for the virtio-pci transport).

use crate::config::{ConfigError, PciConfig};

pub const CAP_ID_PCIE: u8 = 0x10;
pub const CAP_ID_MSIX: u8 = 0x11;

/// The PCI Express capability's register block (v2, without the ID/next
/// bytes counted in `add_capability`).
const PCIE_CAP_LEN: usize = 0x3c;

/// Which function the PCI Express capability describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PcieCap {
    /// An endpoint behind a root port (device/port type 0).
    Endpoint,
    /// An endpoint on the root bus: QEMU's `pcie_endpoint_cap_init` picks
    /// this type (9) for devices on pcie.0, and it has no link.
    IntegratedEndpoint,
    /// A root port (type 4) with a slot: `slot` is the physical slot number
    /// (QEMU's `slot=`), `port` the link's port number (QEMU's `port=`).
    RootPort { slot: u16, port: u8 },
}

impl PcieCap {
    fn port_type(self) -> u16 {
        match self {
            PcieCap::Endpoint => 0,
            PcieCap::IntegratedEndpoint => 9,
            PcieCap::RootPort { .. } => 4,
        }
    }

    /// Appends the capability to `config`; returns its offset.
    pub fn add_to(self, config: &mut PciConfig) -> Result<usize, ConfigError> {
        let mut cap = [0u8; PCIE_CAP_LEN];
        let mut rw = [0u8; PCIE_CAP_LEN];
        fn put16(buf: &mut [u8], at: usize, v: u16) {
            buf[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
        fn put32(buf: &mut [u8], at: usize, v: u32) {
            buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        let is_root_port = matches!(self, PcieCap::RootPort { .. });
        let has_link = self != PcieCap::IntegratedEndpoint;

        // Capabilities: version 2, port type, slot implemented.
        put16(&mut cap, 0x02, 2 | self.port_type() << 4 | u16::from(is_root_port) << 8);
        // Device capabilities: 128-byte max payload, role-based error reporting.
        put32(&mut cap, 0x04, 1 << 15);
        // Device control: the spec's reset value (512-byte read requests,
        // relaxed ordering, no snoop); error reporting, payload and request
        // sizes are the guest's to set.
        put16(&mut cap, 0x08, 0x2810);
        put16(&mut rw, 0x08, 0x79ff);
        if has_link {
            // A 2.5 GT/s x1 link, up and trained; root ports also report
            // that their data link layer is active.
            let port = match self {
                PcieCap::RootPort { port, .. } => u32::from(port),
                _ => 0,
            };
            put32(&mut cap, 0x0c, 1 | 1 << 4 | u32::from(is_root_port) << 20 | port << 24);
            put16(&mut rw, 0x10, 0x01c3);
            put16(&mut cap, 0x12, 1 | 1 << 4 | 1 << 12 | u16::from(is_root_port) << 13);
            put32(&mut cap, 0x2c, 1 << 1);
            put16(&mut cap, 0x30, 1);
        }
        if let PcieCap::RootPort { slot, .. } = self {
            // Physical slot number, and no hot-plug: Skiff does not hot-plug.
            put32(&mut cap, 0x14, u32::from(slot & 0x1fff) << 19);
            // Presence detect is hardwired to 1 on a slot without hot-plug.
            put16(&mut cap, 0x1a, 1 << 6);
            // Root control: system error and PME interrupt enables.
            put16(&mut rw, 0x1c, 0x000f);
        }
        config.add_capability_masked(CAP_ID_PCIE, &cap[2..], &rw[2..])
    }
}

/// The MSI-X capability: where the table and pending-bit array live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCap {
    /// Number of vectors, 1..=2048.
    pub vectors: u16,
    pub table_bar: u8,
    /// Offset in `table_bar`, 8-byte aligned.
    pub table_offset: u32,
    pub pba_bar: u8,
    pub pba_offset: u32,
}

/// The guest-controlled bits of MSI-X Message Control.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsixControl {
    pub enabled: bool,
    pub function_masked: bool,
}

const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;

impl MsixCap {
    /// Appends the capability to `config`; returns its offset.
    pub fn add_to(&self, config: &mut PciConfig) -> Result<usize, ConfigError> {
        if !(1..=2048).contains(&self.vectors) {
            return Err(ConfigError::Msix("vector count must be 1..=2048"));
        }
        if self.table_bar > 5 || self.pba_bar > 5 {
            return Err(ConfigError::Msix("BAR index must be 0..=5"));
        }
        if (self.table_offset | self.pba_offset) & 7 != 0 {
            return Err(ConfigError::Msix("table and PBA offsets must be 8-byte aligned"));
        }
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(self.vectors - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(self.table_offset | u32::from(self.table_bar)).to_le_bytes());
        body[6..10].copy_from_slice(&(self.pba_offset | u32::from(self.pba_bar)).to_le_bytes());
        let writable = (MSIX_ENABLE | MSIX_FUNCTION_MASK).to_le_bytes();
        config.add_capability_masked(CAP_ID_MSIX, &body, &writable)
    }

    /// Reads Message Control of the MSI-X capability at `offset`, so the
    /// transport can follow the guest enabling or masking the function.
    pub fn control(config: &PciConfig, offset: usize) -> MsixControl {
        let control = config.read_u16(offset + 2);
        MsixControl {
            enabled: control & MSIX_ENABLE != 0,
            function_masked: control & MSIX_FUNCTION_MASK != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigParams, STATUS, STATUS_CAP_LIST};

    fn config(bridge: bool) -> PciConfig {
        PciConfig::new(&ConfigParams { bridge, ..Default::default() })
    }

    #[test]
    fn msix_layout_and_control() {
        let mut c = config(false);
        let cap = MsixCap {
            vectors: 3,
            table_bar: 1,
            table_offset: 0x2000,
            pba_bar: 1,
            pba_offset: 0x3000,
        };
        let at = cap.add_to(&mut c).unwrap();
        assert_eq!(c.find_capability(CAP_ID_MSIX), Some(at));
        assert_eq!(c.read_u16(at + 2), 2);
        assert_eq!(c.read_u32(at + 4), 0x2001);
        assert_eq!(c.read_u32(at + 8), 0x3001);
        assert_eq!(MsixCap::control(&c, at), MsixControl::default());
        // Table size is read-only; enable and mask are the guest's.
        c.write(at as u64 + 2, &0xffffu16.to_le_bytes());
        assert_eq!(c.read_u16(at + 2), 0xc002);
        assert_eq!(MsixCap::control(&c, at), MsixControl { enabled: true, function_masked: true });
        c.write(at as u64 + 4, &0u32.to_le_bytes());
        assert_eq!(c.read_u32(at + 4), 0x2001);
    }

    #[test]
    fn msix_rejects_bad_layouts() {
        let mut c = config(false);
        let ok =
            MsixCap { vectors: 1, table_bar: 0, table_offset: 0, pba_bar: 0, pba_offset: 0x800 };
        assert!(MsixCap { vectors: 0, ..ok }.add_to(&mut c).is_err());
        assert!(MsixCap { vectors: 2049, ..ok }.add_to(&mut c).is_err());
        assert!(MsixCap { table_bar: 6, ..ok }.add_to(&mut c).is_err());
        assert!(MsixCap { pba_offset: 4, ..ok }.add_to(&mut c).is_err());
        assert_eq!(c.read_u16(STATUS) & STATUS_CAP_LIST, 0);
    }

    #[test]
    fn root_port_capability() {
        let mut c = config(true);
        let at = PcieCap::RootPort { slot: 5, port: 0x10 }.add_to(&mut c).unwrap();
        assert_eq!(c.find_capability(CAP_ID_PCIE), Some(at));
        // v2, root port, slot implemented.
        assert_eq!(c.read_u16(at + 2), 0x0142);
        assert_eq!(c.read_u32(at + 0x0c) >> 24, 0x10);
        assert_ne!(c.read_u16(at + 0x12) & (1 << 13), 0, "link active");
        assert_eq!(c.read_u32(at + 0x14) >> 19, 5);
        assert_ne!(c.read_u16(at + 0x1a) & (1 << 6), 0, "presence");
        // Capabilities and slot number are read-only.
        c.write(at as u64 + 0x14, &0u32.to_le_bytes());
        c.write(at as u64 + 2, &0u16.to_le_bytes());
        assert_eq!(c.read_u32(at + 0x14) >> 19, 5);
        assert_eq!(c.read_u16(at + 2), 0x0142);
        // Device control takes the payload size the guest picks.
        c.write(at as u64 + 8, &0x2830u16.to_le_bytes());
        assert_eq!(c.read_u16(at + 8), 0x2830);
    }

    #[test]
    fn endpoint_types() {
        let mut c = config(false);
        let at = PcieCap::IntegratedEndpoint.add_to(&mut c).unwrap();
        assert_eq!(c.read_u16(at + 2), 0x0092);
        assert_eq!(c.read_u32(at + 0x0c), 0, "no link");
        let mut c = config(false);
        let at = PcieCap::Endpoint.add_to(&mut c).unwrap();
        assert_eq!(c.read_u16(at + 2), 0x0002);
        assert_eq!(c.read_u32(at + 0x0c) & 0x3ff, 0x11, "2.5 GT/s x1");
        assert_eq!(c.read_u32(at + 0x14), 0, "no slot");
    }
}
