//! PCI addresses: the `addr=` property's `slot[.function]` syntax and the
//! bus/device/function triple it ends up as.
//!
//! QEMU parses `addr=` in `set_pci_devfn` (hw/core/qdev-properties-system.c):
//! from the command line the value is always a string, scanned with
//! `sscanf(str, "%x.%x%n")`, falling back to `sscanf(str, "%x%n")` (function
//! 0), and rejected unless the whole string was consumed, `slot <= 31` and
//! `function <= 7`. So both numbers are hexadecimal whether or not they carry
//! `0x` (`addr=10` is slot 16), and each may be preceded by blanks and a sign
//! as `%x` allows (`-0` is 0). Two places where glibc's `%x` is looser than
//! this parser, on purpose: a bare `0x` with no digit, and numbers wider than
//! 32 bits that glibc silently truncates, are both rejected here.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid PCI address '{text}' (expected slot[.function] in hex, slot 0-1f, function 0-7)")]
pub struct AddrError {
    pub text: String,
}

impl AddrError {
    /// QEMU's wording for a bad `addr=` on `-device <driver>`.
    pub fn qemu_message(&self, driver: &str) -> String {
        format!("Property '{driver}.addr' doesn't take value '{}'", self.text)
    }
}

/// A device and function number on one bus (`PCI_DEVFN`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevFn {
    pub slot: u8,
    pub func: u8,
}

impl DevFn {
    pub const SLOTS: u8 = 32;
    pub const FUNCS: u8 = 8;

    pub fn new(slot: u8, func: u8) -> Option<Self> {
        (slot < Self::SLOTS && func < Self::FUNCS).then_some(Self { slot, func })
    }

    pub fn from_u8(devfn: u8) -> Self {
        Self { slot: devfn >> 3, func: devfn & 7 }
    }

    pub fn to_u8(self) -> u8 {
        self.slot << 3 | self.func
    }

    /// Parses QEMU's `addr=` value (see the module comment).
    pub fn parse(text: &str) -> Result<Self, AddrError> {
        let bad = || AddrError { text: text.to_string() };
        let (slot, rest) = scan_hex(text).ok_or_else(bad)?;
        let (func, rest) = match rest.strip_prefix('.') {
            Some(after_dot) => scan_hex(after_dot).ok_or_else(bad)?,
            None => (0, rest),
        };
        if !rest.is_empty() || slot > 31 || func > 7 {
            return Err(bad());
        }
        Ok(Self { slot: slot as u8, func: func as u8 })
    }
}

impl FromStr for DevFn {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<Self, AddrError> {
        Self::parse(s)
    }
}

/// As QEMU prints it (`print_pci_devfn`): `02.0`.
impl fmt::Display for DevFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}.{:x}", self.slot, self.func)
    }
}

/// A function's address in the one PCI segment: `bus:slot.func`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub bus: u8,
    pub devfn: DevFn,
}

impl PciAddress {
    pub fn new(bus: u8, slot: u8, func: u8) -> Option<Self> {
        Some(Self { bus, devfn: DevFn::new(slot, func)? })
    }

    /// Offset of config register byte `reg` in an ECAM window.
    pub fn ecam_offset(self, reg: u16) -> u64 {
        u64::from(self.bus) << 20
            | u64::from(self.devfn.slot) << 15
            | u64::from(self.devfn.func) << 12
            | u64::from(reg & 0xfff)
    }

    /// Splits an ECAM offset into the function's address and the register byte.
    pub fn from_ecam_offset(offset: u64) -> (Self, u16) {
        let bus = (offset >> 20) as u8;
        let devfn = DevFn::from_u8((offset >> 12) as u8);
        (Self { bus, devfn }, (offset & 0xfff) as u16)
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{}", self.bus, self.devfn)
    }
}

/// One `%x` conversion: optional C whitespace, optional sign, optional `0x`,
/// at least one hex digit. Returns the value and the unconsumed rest, or
/// None when nothing matched or the value does not fit 32 bits.
fn scan_hex(s: &str) -> Option<(u32, &str)> {
    let s = s.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let (negative, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let s = match s.get(..2) {
        Some("0x" | "0X") if s[2..].starts_with(|c: char| c.is_ascii_hexdigit()) => &s[2..],
        _ => s,
    };
    let digits = s.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(s.len());
    if digits == 0 {
        return None;
    }
    let value = u32::from_str_radix(&s[..digits], 16).ok()?;
    // `%x` stores a negated value as unsigned: only -0 stays in range.
    let value = if negative { value.wrapping_neg() } else { value };
    Some((value, &s[digits..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<(u8, u8), AddrError> {
        DevFn::parse(s).map(|d| (d.slot, d.func))
    }

    #[test]
    fn every_qemu_syntax() {
        assert_eq!(p("2"), Ok((2, 0)));
        assert_eq!(p("2.0"), Ok((2, 0)));
        assert_eq!(p("0x2"), Ok((2, 0)));
        assert_eq!(p("02.0"), Ok((2, 0)));
        assert_eq!(p("0x2.0x1"), Ok((2, 1)));
        assert_eq!(p("1f.7"), Ok((31, 7)));
        assert_eq!(p("1F.7"), Ok((31, 7)));
        assert_eq!(p("0X1f"), Ok((31, 0)));
        assert_eq!(p("0"), Ok((0, 0)));
    }

    #[test]
    fn slot_is_always_hex() {
        assert_eq!(p("10"), Ok((16, 0)));
        assert_eq!(p("a"), Ok((10, 0)));
        assert_eq!(p("0010.3"), Ok((16, 3)));
    }

    #[test]
    fn scanf_leniencies_that_qemu_accepts() {
        // `%x` skips leading blanks (also after the dot) and takes a sign.
        assert_eq!(p(" 3"), Ok((3, 0)));
        assert_eq!(p("3. 1"), Ok((3, 1)));
        assert_eq!(p("+3"), Ok((3, 0)));
        assert_eq!(p("-0"), Ok((0, 0)));
    }

    #[test]
    fn rejects_out_of_range_and_junk() {
        for bad in [
            "",
            "20",
            "1f.8",
            "0x20",
            "-1",
            "2.",
            ".1",
            "2.0.0",
            "2 ",
            "2,0",
            "g",
            "0x",
            "0x.1",
            "2.0x",
            "1:2.0",
            "100000002",
            "2.-1",
        ] {
            assert_eq!(p(bad), Err(AddrError { text: bad.to_string() }), "{bad:?}");
        }
    }

    #[test]
    fn errors_name_the_text() {
        let e = DevFn::parse("zz").unwrap_err();
        assert!(e.to_string().contains("'zz'"));
        assert_eq!(
            e.qemu_message("virtio-rng-pci"),
            "Property 'virtio-rng-pci.addr' doesn't take value 'zz'"
        );
    }

    #[test]
    fn display_and_devfn_round_trip() {
        let d = DevFn::parse("1f.7").unwrap();
        assert_eq!(d.to_string(), "1f.7");
        assert_eq!(d.to_u8(), 0xff);
        assert_eq!(DevFn::from_u8(0x11), DevFn { slot: 2, func: 1 });
        assert_eq!(DevFn::new(32, 0), None);
        assert_eq!(DevFn::new(0, 8), None);
        let a = PciAddress::new(1, 2, 3).unwrap();
        assert_eq!(a.to_string(), "01:02.3");
    }

    #[test]
    fn ecam_offsets() {
        let a = PciAddress::new(0x12, 0x1f, 7).unwrap();
        let off = a.ecam_offset(0x104);
        assert_eq!(off, 0x12 << 20 | 0x1f << 15 | 7 << 12 | 0x104);
        assert_eq!(PciAddress::from_ecam_offset(off), (a, 0x104));
    }
}
