//! One function's configuration space: 4 KiB (PCIe), a type 0 (endpoint) or
//! type 1 (bridge) header, capabilities, and BARs.
//!
//! Every dword has a mask of the bits the guest may change; everything else
//! is read-only, so a guest write can never corrupt IDs, BAR flags or the
//! capability chain. BAR sizing needs nothing special: the address bits below
//! the BAR's size are read-only zero, so writing all ones reads back the size
//! mask, as the spec intends.

mod bar;

use bar::BarSlot;
pub use bar::{BarInfo, BarKind, BarReprogram};

pub const CONFIG_SPACE_SIZE: usize = 4096;
const NUM_REGS: usize = CONFIG_SPACE_SIZE / 4;

// Header registers (byte offsets).
pub const VENDOR_ID: usize = 0x00;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const CLASS_REVISION: usize = 0x08;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;
// Type 1 only.
pub const PRIMARY_BUS: usize = 0x18;
pub const MEMORY_BASE: usize = 0x20;
pub const PREF_MEMORY_BASE: usize = 0x24;
pub const PREF_BASE_UPPER32: usize = 0x28;
pub const PREF_LIMIT_UPPER32: usize = 0x2c;
pub const BRIDGE_CONTROL: usize = 0x3e;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_PARITY: u16 = 1 << 6;
pub const COMMAND_SERR: u16 = 1 << 8;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
pub const STATUS_CAP_LIST: u16 = 1 << 4;
pub const HEADER_TYPE_MULTIFUNCTION: u8 = 0x80;

/// Capabilities live in the legacy 256 bytes, after the header.
const FIRST_CAPABILITY: usize = 0x40;
const LEGACY_CONFIG_END: usize = 0x100;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("BAR {0} does not exist in this header")]
    NoSuchBar(usize),
    #[error("BAR {0} is already registered")]
    BarInUse(usize),
    #[error("BAR {index} size {size:#x} is not a power of two of at least {min} bytes")]
    BarSize { index: usize, size: u64, min: u64 },
    #[error("no room for a {len}-byte capability {id:#04x} in config space")]
    NoCapabilitySpace { id: u8, len: usize },
    #[error("invalid MSI-X capability: {0}")]
    Msix(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderType {
    Endpoint,
    Bridge,
}

impl HeaderType {
    pub(super) fn bar_count(self) -> usize {
        match self {
            HeaderType::Endpoint => 6,
            HeaderType::Bridge => 2,
        }
    }
}

/// The identity of a function, written once into its header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigParams {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// Base class, subclass, programming interface: 0xBBSSPP.
    pub class_code: u32,
    /// Type 0 only.
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    pub bridge: bool,
    pub multifunction: bool,
    /// 0 for none, 1..=4 for INTA..INTD.
    pub interrupt_pin: u8,
}

pub struct PciConfig {
    regs: Vec<u32>,
    writable: Vec<u32>,
    header: HeaderType,
    bars: [BarSlot; 6],
    last_capability: Option<usize>,
    next_capability: usize,
}

impl PciConfig {
    pub fn new(p: &ConfigParams) -> Self {
        let header = if p.bridge { HeaderType::Bridge } else { HeaderType::Endpoint };
        let mut c = Self {
            regs: vec![0; NUM_REGS],
            writable: vec![0; NUM_REGS],
            header,
            bars: [BarSlot::Empty; 6],
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        };
        c.regs[0] = u32::from(p.device_id) << 16 | u32::from(p.vendor_id);
        c.regs[2] = (p.class_code & 0xff_ffff) << 8 | u32::from(p.revision);
        let mut header_type = if p.bridge { 1u8 } else { 0 };
        if p.multifunction {
            header_type |= HEADER_TYPE_MULTIFUNCTION;
        }
        c.set_u8(HEADER_TYPE, header_type);
        c.set_u8(INTERRUPT_PIN, p.interrupt_pin);

        let command = COMMAND_IO
            | COMMAND_MEMORY
            | COMMAND_BUS_MASTER
            | COMMAND_PARITY
            | COMMAND_SERR
            | COMMAND_INTX_DISABLE;
        c.writable[COMMAND / 4] = u32::from(command);
        // Cache line size: PCIe ignores it, but it is read-write.
        c.writable[0x0c / 4] = 0xff;
        c.writable[INTERRUPT_LINE / 4] = 0xff;
        match header {
            HeaderType::Endpoint => {
                c.regs[SUBSYSTEM_VENDOR_ID / 4] =
                    u32::from(p.subsystem_id) << 16 | u32::from(p.subsystem_vendor_id);
            }
            HeaderType::Bridge => {
                // Primary, secondary, subordinate bus numbers.
                c.writable[PRIMARY_BUS / 4] = 0x00ff_ffff;
                // Memory windows are 1 MiB granular; the prefetchable one is
                // 64-bit (low nibble 1, read-only). The I/O base and limit stay
                // read-only zero: no I/O window (microvm has no PCI I/O space).
                c.writable[MEMORY_BASE / 4] = 0xfff0_fff0;
                c.writable[PREF_MEMORY_BASE / 4] = 0xfff0_fff0;
                c.writable[PREF_BASE_UPPER32 / 4] = !0;
                c.writable[PREF_LIMIT_UPPER32 / 4] = !0;
                // Bridge control: parity, SERR, ISA, VGA, VGA16, bus reset.
                c.writable[INTERRUPT_LINE / 4] |= 0x005f << 16;
                // Both windows start closed (base above limit).
                c.regs[MEMORY_BASE / 4] = 0x0000_fff0;
                c.regs[PREF_MEMORY_BASE / 4] = 0x0001_fff1;
            }
        }
        c
    }

    pub fn header_type(&self) -> HeaderType {
        self.header
    }

    /// The dword at `reg` (index, not byte offset); all ones past the end.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(!0)
    }

    pub fn read_u8(&self, offset: usize) -> u8 {
        (self.read_reg(offset / 4) >> ((offset % 4) * 8)) as u8
    }

    pub fn read_u16(&self, offset: usize) -> u16 {
        (self.read_reg(offset / 4) >> ((offset % 4) * 8)) as u16
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        self.read_reg(offset / 4)
    }

    /// Device-side stores: bypass the writable mask (status bits, link state).
    pub fn set_u8(&mut self, offset: usize, value: u8) {
        self.store(offset, &[value], !0);
    }

    pub fn set_u16(&mut self, offset: usize, value: u16) {
        self.store(offset, &value.to_le_bytes(), !0);
    }

    pub fn set_u32(&mut self, offset: usize, value: u32) {
        self.store(offset, &value.to_le_bytes(), !0);
    }

    /// A guest write of 1, 2 or 4 bytes at an offset aligned to its size.
    /// Returns the BAR move it completes, if any.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<BarReprogram> {
        let len = data.len();
        let Ok(offset) = usize::try_from(offset) else { return None };
        if !matches!(len, 1 | 2 | 4) || offset & (len - 1) != 0 || offset + len > CONFIG_SPACE_SIZE
        {
            log::debug!("pci: ignoring {len}-byte config write at {offset:#x}");
            return None;
        }
        let reg = offset / 4;
        let mask = self.writable[reg];
        self.store(offset, data, mask);
        // Sizing writes all ones; only a real address is a move.
        let probe = data.iter().all(|&b| b == 0xff);
        self.bar_written(reg, probe)
    }

    /// Merges `data` at `offset` into its dword, changing only `mask` bits.
    fn store(&mut self, offset: usize, data: &[u8], mask: u32) {
        let reg = offset / 4;
        let shift = (offset % 4) * 8;
        let mut value = 0u32;
        let mut lanes = 0u32;
        for (i, &b) in data.iter().enumerate() {
            value |= u32::from(b) << (8 * i);
            lanes |= 0xff << (8 * i);
        }
        let mask = mask & (lanes << shift);
        self.regs[reg] = (self.regs[reg] & !mask) | ((value << shift) & mask);
    }

    /// Appends a read-only capability; `body` follows the ID and next bytes.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<usize, ConfigError> {
        self.add_capability_masked(id, body, &[])
    }

    /// Like `add_capability`, with `writable[i]` the guest-writable bits of
    /// `body[i]` (missing bytes are read-only). Returns the capability's offset.
    pub fn add_capability_masked(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigError> {
        let len = 2 + body.len();
        let offset = self.next_capability.next_multiple_of(4);
        if offset + len > LEGACY_CONFIG_END {
            return Err(ConfigError::NoCapabilitySpace { id, len });
        }
        self.set_u8(offset, id);
        self.set_u8(offset + 1, 0);
        for (i, &b) in body.iter().enumerate() {
            self.set_u8(offset + 2 + i, b);
        }
        for (i, &m) in writable.iter().take(body.len()).enumerate() {
            let at = offset + 2 + i;
            let shift = (at % 4) * 8;
            self.writable[at / 4] =
                (self.writable[at / 4] & !(0xff << shift)) | u32::from(m) << shift;
        }
        match self.last_capability {
            Some(last) => self.set_u8(last + 1, offset as u8),
            None => {
                self.set_u8(CAPABILITIES_POINTER, offset as u8);
                let status = self.read_u16(STATUS) | STATUS_CAP_LIST;
                self.set_u16(STATUS, status);
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = offset + len;
        Ok(offset)
    }

    /// Walks the capability list for `id`, as a guest would.
    pub fn find_capability(&self, id: u8) -> Option<usize> {
        if self.read_u16(STATUS) & STATUS_CAP_LIST == 0 {
            return None;
        }
        let mut at = usize::from(self.read_u8(CAPABILITIES_POINTER) & !3);
        // Bounded: a chain can hold at most 48 capabilities.
        for _ in 0..48 {
            if at < FIRST_CAPABILITY {
                return None;
            }
            if self.read_u8(at) == id {
                return Some(at);
            }
            at = usize::from(self.read_u8(at + 1) & !3);
        }
        None
    }

    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }

    /// (primary, secondary, subordinate) of a bridge.
    pub fn bridge_buses(&self) -> (u8, u8, u8) {
        let r = self.read_u32(PRIMARY_BUS);
        (r as u8, (r >> 8) as u8, (r >> 16) as u8)
    }

    pub fn set_bridge_buses(&mut self, primary: u8, secondary: u8, subordinate: u8) {
        let latency = self.read_u32(PRIMARY_BUS) & 0xff00_0000;
        let buses = u32::from(subordinate) << 16 | u32::from(secondary) << 8 | u32::from(primary);
        self.set_u32(PRIMARY_BUS, latency | buses);
    }

    /// A bridge's non-prefetchable window as (base, last byte), if open.
    pub fn bridge_memory_window(&self) -> Option<(u64, u64)> {
        let r = self.read_u32(MEMORY_BASE);
        let base = u64::from(r & 0xfff0) << 16;
        let limit = u64::from((r >> 16) & 0xfff0) << 16 | 0xf_ffff;
        (self.header == HeaderType::Bridge && base <= limit).then_some((base, limit))
    }

    /// A bridge's prefetchable (64-bit) window as (base, last byte), if open.
    pub fn bridge_prefetch_window(&self) -> Option<(u64, u64)> {
        let r = self.read_u32(PREF_MEMORY_BASE);
        let base = u64::from(self.read_u32(PREF_BASE_UPPER32)) << 32 | u64::from(r & 0xfff0) << 16;
        let limit = u64::from(self.read_u32(PREF_LIMIT_UPPER32)) << 32
            | u64::from((r >> 16) & 0xfff0) << 16
            | 0xf_ffff;
        (self.header == HeaderType::Bridge && base <= limit).then_some((base, limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn endpoint() -> PciConfig {
        PciConfig::new(&ConfigParams {
            vendor_id: 0x1af4,
            device_id: 0x1044,
            revision: 1,
            class_code: 0x00_ff_00,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
            interrupt_pin: 1,
            ..Default::default()
        })
    }

    pub(super) fn bridge() -> PciConfig {
        PciConfig::new(&ConfigParams { class_code: 0x06_04_00, bridge: true, ..Default::default() })
    }

    pub(super) fn w32(c: &mut PciConfig, offset: usize, v: u32) -> Option<BarReprogram> {
        c.write(offset as u64, &v.to_le_bytes())
    }

    #[test]
    fn header_identity_is_read_only() {
        let mut c = endpoint();
        assert_eq!(c.read_reg(0), 0x1044_1af4);
        assert_eq!(c.read_reg(2), 0x00ff_0001);
        assert_eq!(c.read_u8(HEADER_TYPE), 0);
        assert_eq!(c.read_u8(INTERRUPT_PIN), 1);
        assert_eq!(c.read_u32(SUBSYSTEM_VENDOR_ID), 0x1100_1af4);
        w32(&mut c, 0, 0);
        w32(&mut c, 8, 0);
        c.write(INTERRUPT_PIN as u64, &[4]);
        assert_eq!(c.read_reg(0), 0x1044_1af4);
        assert_eq!(c.read_reg(2), 0x00ff_0001);
        assert_eq!(c.read_u8(INTERRUPT_PIN), 1);
        // Past the end reads all ones.
        assert_eq!(c.read_reg(NUM_REGS), !0);
    }

    #[test]
    fn command_and_interrupt_line_are_writable() {
        let mut c = endpoint();
        c.write(COMMAND as u64, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), 0x0547);
        // Status stays put even in the same dword.
        assert_eq!(c.read_u16(STATUS), 0);
        c.write(INTERRUPT_LINE as u64, &[17]);
        assert_eq!(c.read_u8(INTERRUPT_LINE), 17);
    }

    #[test]
    fn misaligned_and_odd_writes_are_ignored() {
        let mut c = endpoint();
        assert_eq!(c.write(COMMAND as u64 + 1, &[0xff, 0xff]), None);
        assert_eq!(c.write(COMMAND as u64, &[0xff, 0xff, 0xff]), None);
        assert_eq!(c.write(4096, &[0xff]), None);
        assert_eq!(c.command(), 0);
    }

    #[test]
    fn multifunction_bit() {
        let c = PciConfig::new(&ConfigParams { multifunction: true, ..Default::default() });
        assert_eq!(c.read_u8(HEADER_TYPE), 0x80);
        assert_eq!(bridge().read_u8(HEADER_TYPE), 0x01);
    }

    #[test]
    fn capability_chain() {
        let mut c = endpoint();
        assert_eq!(c.find_capability(0x11), None);
        let a = c.add_capability(0x09, &[1, 2, 3]).unwrap();
        let b = c.add_capability_masked(0x11, &[0, 0, 0, 0], &[0, 0xc0]).unwrap();
        assert_eq!((a, b), (0x40, 0x48));
        assert_ne!(c.read_u16(STATUS) & STATUS_CAP_LIST, 0);
        // Walk it from the pointer like a guest.
        let mut chain = vec![];
        let mut at = c.read_u8(CAPABILITIES_POINTER) as usize;
        while at != 0 {
            chain.push((at, c.read_u8(at)));
            at = c.read_u8(at + 1) as usize;
        }
        assert_eq!(chain, vec![(0x40, 0x09), (0x48, 0x11)]);
        assert_eq!(c.find_capability(0x11), Some(0x48));
        assert_eq!(c.read_u8(0x42), 1);
        // Only the masked bits of the body are writable; IDs and links are not.
        w32(&mut c, 0x48, !0);
        assert_eq!(c.read_u32(0x48), 0xc000_0011);
        w32(&mut c, 0x40, 0);
        assert_eq!(c.read_u32(0x40), 0x0201_4809);
    }

    #[test]
    fn capability_space_runs_out() {
        let mut c = endpoint();
        c.add_capability(0x09, &[0; 0xb0]).unwrap();
        assert_eq!(
            c.add_capability(0x09, &[0; 0x10]),
            Err(ConfigError::NoCapabilitySpace { id: 0x09, len: 0x12 })
        );
    }

    #[test]
    fn bridge_registers() {
        let mut b = bridge();
        assert_eq!(b.header_type(), HeaderType::Bridge);
        assert_eq!(b.bridge_memory_window(), None);
        assert_eq!(b.bridge_prefetch_window(), None);
        b.set_bridge_buses(0, 1, 1);
        assert_eq!(b.bridge_buses(), (0, 1, 1));
        // The guest can renumber; the latency byte stays read-only.
        w32(&mut b, PRIMARY_BUS, 0xff05_0400);
        assert_eq!(b.bridge_buses(), (0, 4, 5));
        assert_eq!(b.read_u32(PRIMARY_BUS) >> 24, 0);

        w32(&mut b, MEMORY_BASE, 0xc01f_c000 | 0x000f_000f);
        assert_eq!(b.bridge_memory_window(), Some((0xc000_0000, 0xc01f_ffff)));
        w32(&mut b, PREF_MEMORY_BASE, 0x0010_0000);
        w32(&mut b, PREF_BASE_UPPER32, 0x30);
        w32(&mut b, PREF_LIMIT_UPPER32, 0x30);
        assert_eq!(b.read_u32(PREF_MEMORY_BASE), 0x0011_0001);
        assert_eq!(b.bridge_prefetch_window(), Some((0x30_0000_0000, 0x30_001f_ffff)));
        // No I/O window: base and limit are read-only zero.
        w32(&mut b, 0x1c, !0);
        assert_eq!(b.read_u32(0x1c), 0);
        // Bridge control's bus reset bit is writable.
        b.write(BRIDGE_CONTROL as u64, &0x40u16.to_le_bytes());
        assert_eq!(b.read_u16(BRIDGE_CONTROL), 0x40);
        // An endpoint has no windows.
        assert_eq!(endpoint().bridge_memory_window(), None);
    }
}
