//! BARs: registration, the address bits the guest may write, and telling
//! a real move (to report) from a sizing probe (to ignore).

use super::{ConfigError, PciConfig, BAR0};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Memory32 { prefetchable: bool },
    Memory64 { prefetchable: bool },
}

impl BarKind {
    /// The read-only flag bits in the BAR's low dword.
    fn flags(self) -> u32 {
        match self {
            BarKind::Io => 0x1,
            BarKind::Memory32 { prefetchable } => u32::from(prefetchable) << 3,
            BarKind::Memory64 { prefetchable } => 0x4 | u32::from(prefetchable) << 3,
        }
    }

    /// The address bits of a BAR's low dword.
    pub fn address_mask(self) -> u32 {
        if self == BarKind::Io {
            !0x3
        } else {
            !0xf
        }
    }

    /// Decodes the flag bits of a BAR's low dword.
    pub fn from_register(low: u32) -> Self {
        let prefetchable = low & 0x8 != 0;
        match (low & 1, (low >> 1) & 3) {
            (1, _) => BarKind::Io,
            (_, 2) => BarKind::Memory64 { prefetchable },
            _ => BarKind::Memory32 { prefetchable },
        }
    }

    pub fn is_64bit(self) -> bool {
        matches!(self, BarKind::Memory64 { .. })
    }
}

/// A BAR that the guest moved: the VMM must move whatever backs it (MMIO
/// bus range, ioeventfds, a VFIO mapping) from `old` to `new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarReprogram {
    pub index: usize,
    pub kind: BarKind,
    pub old: u64,
    pub new: u64,
    pub len: u64,
}

/// A BAR as currently programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    pub kind: BarKind,
    pub addr: u64,
    pub size: u64,
}

#[derive(Clone, Copy, Debug)]
pub(super) enum BarSlot {
    Empty,
    Bar {
        kind: BarKind,
        size: u64,
        mapped: u64,
    },
    /// The high dword of the 64-bit BAR one index below.
    Upper,
}

impl PciConfig {
    /// Registers BAR `index`. `size` is a power of two (≥ 16 for memory, ≥ 4
    /// for I/O); a 64-bit BAR also takes `index + 1`. Its address starts at 0.
    pub fn add_bar(&mut self, index: usize, kind: BarKind, size: u64) -> Result<(), ConfigError> {
        let count = self.header.bar_count();
        let last = if kind.is_64bit() { index + 1 } else { index };
        if last >= count {
            return Err(ConfigError::NoSuchBar(last));
        }
        if let Some(i) = (index..=last).find(|&i| !matches!(self.bars[i], BarSlot::Empty)) {
            return Err(ConfigError::BarInUse(i));
        }
        let min = if kind == BarKind::Io { 4 } else { 16 };
        let max = if kind.is_64bit() { 1 << 63 } else { 1 << 31 };
        if !size.is_power_of_two() || size < min || size > max {
            return Err(ConfigError::BarSize { index, size, min });
        }
        let reg = BAR0 / 4 + index;
        let address_bits = !(size - 1);
        self.regs[reg] = kind.flags();
        self.writable[reg] = address_bits as u32 & kind.address_mask();
        self.bars[index] = BarSlot::Bar { kind, size, mapped: 0 };
        if kind.is_64bit() {
            self.writable[reg + 1] = (address_bits >> 32) as u32;
            self.bars[index + 1] = BarSlot::Upper;
        }
        Ok(())
    }

    /// BAR `index` as currently programmed (the low index of a 64-bit BAR).
    pub fn bar(&self, index: usize) -> Option<BarInfo> {
        let BarSlot::Bar { kind, size, .. } = *self.bars.get(index)? else { return None };
        Some(BarInfo { kind, addr: self.bar_address(index, kind), size })
    }

    fn bar_address(&self, index: usize, kind: BarKind) -> u64 {
        let reg = BAR0 / 4 + index;
        let low = u64::from(self.regs[reg] & kind.address_mask());
        if kind.is_64bit() {
            low | u64::from(self.regs[reg + 1]) << 32
        } else {
            low
        }
    }

    /// After a write to dword `reg`: report the BAR it moved. A 64-bit BAR
    /// moves on a write to either dword that leaves a new address: a guest
    /// may change only the low one (its high dword already right), or write
    /// low then high (two moves, the first to a passing address, as QEMU;
    /// the mapper copes with overlaps). Not while the other dword still
    /// holds the sizing pattern: restoring after a probe is not a move.
    pub(super) fn bar_written(&mut self, reg: usize, probe: bool) -> Option<BarReprogram> {
        let index = reg.checked_sub(BAR0 / 4).filter(|&i| i < self.header.bar_count())?;
        let (index, other) = match self.bars[index] {
            BarSlot::Bar { kind, .. } if kind.is_64bit() => (index, Some(reg + 1)),
            BarSlot::Bar { .. } => (index, None),
            BarSlot::Upper => (index - 1, Some(reg - 1)),
            BarSlot::Empty => return None,
        };
        let BarSlot::Bar { kind, size, mapped } = self.bars[index] else { return None };
        let sizing = other.is_some_and(|r| {
            self.writable[r] != 0 && self.regs[r] & self.writable[r] == self.writable[r]
        });
        let new = self.bar_address(index, kind);
        if probe || sizing || new == mapped {
            return None;
        }
        self.bars[index] = BarSlot::Bar { kind, size, mapped: new };
        Some(BarReprogram { index, kind, old: mapped, new, len: size })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{bridge, endpoint, w32};
    use super::*;

    /// Sizes a BAR as Linux does: save, write ones, read, restore.
    fn size_bar(c: &mut PciConfig, index: usize) -> u64 {
        let off = BAR0 + 4 * index;
        let low = c.read_u32(off);
        assert_eq!(w32(c, off, !0), None);
        let low_mask = c.read_u32(off);
        let kind = BarKind::from_register(low_mask);
        let mut mask = u64::from(low_mask & kind.address_mask());
        if kind.is_64bit() {
            let high = c.read_u32(off + 4);
            assert_eq!(w32(c, off + 4, !0), None);
            mask |= u64::from(c.read_u32(off + 4)) << 32;
            assert_eq!(w32(c, off + 4, high), None, "restoring is not a move");
        } else {
            mask |= 0xffff_ffff_0000_0000;
        }
        assert_eq!(w32(c, off, low), None, "restoring is not a move");
        (!mask).wrapping_add(1)
    }

    #[test]
    fn bar_sizing_32_64_and_io() {
        let mut c = endpoint();
        c.add_bar(0, BarKind::Memory32 { prefetchable: false }, 0x1000).unwrap();
        c.add_bar(1, BarKind::Io, 0x20).unwrap();
        c.add_bar(2, BarKind::Memory64 { prefetchable: true }, 0x4000).unwrap();
        c.add_bar(4, BarKind::Memory64 { prefetchable: false }, 1 << 33).unwrap();
        assert_eq!(size_bar(&mut c, 0), 0x1000);
        assert_eq!(size_bar(&mut c, 1), 0x20);
        assert_eq!(size_bar(&mut c, 2), 0x4000);
        assert_eq!(size_bar(&mut c, 4), 1 << 33);
        // Flag bits read back after sizing.
        assert_eq!(c.read_u32(BAR0), 0);
        assert_eq!(c.read_u32(BAR0 + 4), 1);
        assert_eq!(c.read_u32(BAR0 + 8), 0xc);
        assert_eq!(c.read_u32(BAR0 + 16), 0x4);
        // Unregistered BARs read zero and ignore writes.
        c.add_bar(3, BarKind::Io, 4).unwrap_err();
        let mut c = endpoint();
        assert_eq!(w32(&mut c, BAR0 + 20, !0), None);
        assert_eq!(c.read_u32(BAR0 + 20), 0);
    }

    #[test]
    fn bar_moves_are_reported_once() {
        let mut c = endpoint();
        let mem = BarKind::Memory32 { prefetchable: false };
        c.add_bar(0, mem, 0x1000).unwrap();
        assert_eq!(
            w32(&mut c, BAR0, 0xc000_0000),
            Some(BarReprogram { index: 0, kind: mem, old: 0, new: 0xc000_0000, len: 0x1000 })
        );
        // Same address again, sizing, and restoring: no move.
        assert_eq!(w32(&mut c, BAR0, 0xc000_0000), None);
        assert_eq!(size_bar(&mut c, 0), 0x1000);
        // Low bits below the size are dropped.
        assert_eq!(
            w32(&mut c, BAR0, 0xc000_1234),
            Some(BarReprogram {
                index: 0,
                kind: mem,
                old: 0xc000_0000,
                new: 0xc000_1000,
                len: 0x1000
            })
        );
        assert_eq!(c.bar(0), Some(BarInfo { kind: mem, addr: 0xc000_1000, size: 0x1000 }));
    }

    #[test]
    fn bar64_moves_on_either_dword() {
        let mut c = endpoint();
        let kind = BarKind::Memory64 { prefetchable: true };
        c.add_bar(2, kind, 0x4000).unwrap();
        let moved = |old, new| Some(BarReprogram { index: 2, kind, old, new, len: 0x4000 });
        // Low then high, as Linux writes it: a passing address, then the
        // final one.
        assert_eq!(w32(&mut c, BAR0 + 8, 0x1000_0000), moved(0, 0x1000_0000));
        assert_eq!(w32(&mut c, BAR0 + 12, 0x80), moved(0x1000_0000, 0x80_1000_0000));
        // Sizing, then restoring low and high: never a move.
        assert_eq!(size_bar(&mut c, 2), 0x4000);
        assert_eq!(c.bar(2).unwrap().addr, 0x80_1000_0000);
        assert_eq!(c.bar(3), None);
        // Linux's order (low probed and restored, then high): no move.
        for off in [BAR0 + 8, BAR0 + 12] {
            let v = c.read_u32(off);
            assert_eq!(w32(&mut c, off, !0), None);
            assert_eq!(w32(&mut c, off, v), None);
        }
        // Only the low dword changes (the high one is already right): the
        // BAR moves (it kept its old mapping before).
        assert_eq!(w32(&mut c, BAR0 + 8, 0x2000_0000), moved(0x80_1000_0000, 0x80_2000_0000));
        assert_eq!(c.bar(2).unwrap().addr, 0x80_2000_0000);
    }

    #[test]
    fn bar_registration_errors() {
        let mut c = endpoint();
        let mem = BarKind::Memory32 { prefetchable: false };
        assert_eq!(c.add_bar(6, mem, 0x1000), Err(ConfigError::NoSuchBar(6)));
        assert_eq!(
            c.add_bar(5, BarKind::Memory64 { prefetchable: false }, 0x1000),
            Err(ConfigError::NoSuchBar(6))
        );
        assert_eq!(
            c.add_bar(0, mem, 0x1800),
            Err(ConfigError::BarSize { index: 0, size: 0x1800, min: 16 })
        );
        assert_eq!(
            c.add_bar(0, BarKind::Io, 2),
            Err(ConfigError::BarSize { index: 0, size: 2, min: 4 })
        );
        c.add_bar(1, BarKind::Memory64 { prefetchable: false }, 0x1000).unwrap();
        assert_eq!(c.add_bar(2, mem, 0x1000), Err(ConfigError::BarInUse(2)));
        assert_eq!(
            c.add_bar(0, BarKind::Memory64 { prefetchable: false }, 0x1000),
            Err(ConfigError::BarInUse(1))
        );
        let mut b = bridge();
        assert_eq!(b.add_bar(2, mem, 0x1000), Err(ConfigError::NoSuchBar(2)));
        b.add_bar(0, BarKind::Memory64 { prefetchable: false }, 0x1000).unwrap();
    }
}
