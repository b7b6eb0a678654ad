//! SMBIOS tables where a BIOS would leave them: a 3.0 (64-bit) entry point
//! at the start of the 0xF0000 segment, which Linux scans for when it has no
//! EFI, then the BIOS (type 0), system (type 1), OEM strings (type 11, when
//! given) and end-of-table (type 127) structures. The guest's `/sys/class/dmi/id` comes from here, and systemd
//! derives a VM's machine id from the type 1 UUID.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use crate::layout::SMBIOS_START;

#[derive(Debug, Error)]
pub enum SmbiosError {
    #[error("SMBIOS string for {field} contains a NUL byte")]
    NulInString { field: &'static str },
    #[error("SMBIOS type 11 holds at most 255 OEM strings, not {0}")]
    TooManyOemStrings(usize),
    #[error("SMBIOS tables do not fit below 1 MiB (they would end at {end:#x})")]
    TooLarge { end: u64 },
    #[error("writing the SMBIOS tables to guest memory: {0}")]
    GuestMemory(#[source] GuestMemoryError),
}

/// The type 1 (system information) fields; `None` leaves a default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SystemInfo<'a> {
    pub manufacturer: Option<&'a str>,
    pub product: Option<&'a str>,
    pub version: Option<&'a str>,
    pub serial: Option<&'a str>,
    pub sku: Option<&'a str>,
    pub family: Option<&'a str>,
    /// In RFC 4122 byte order (as the text form reads).
    pub uuid: [u8; 16],
    /// Type 11's OEM strings (none: no type 11 structure).
    pub oem_strings: &'a [String],
}

// The ACPI tables end where these begin.
const _: () = assert!(crate::acpi::ACPI_END <= SMBIOS_START);

const ENTRY_POINT_LEN: usize = 0x18;
/// The structure table follows the entry point, paragraph-aligned.
const TABLE_OFFSET: u64 = 0x20;
const VENDOR: &str = "Skiff";
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// One structure: its formatted part, then its strings (numbered from 1 in
/// the order added; an absent or empty one is string 0, "none").
struct Structure {
    bytes: Vec<u8>,
    strings: Vec<u8>,
    count: u8,
}

impl Structure {
    fn new(ty: u8, len: u8, handle: u16) -> Self {
        let mut bytes = vec![ty, len];
        bytes.extend_from_slice(&handle.to_le_bytes());
        Structure { bytes, strings: Vec::new(), count: 0 }
    }

    fn string(&mut self, field: &'static str, s: Option<&str>) -> Result<(), SmbiosError> {
        let s = s.unwrap_or("");
        if s.contains('\0') {
            return Err(SmbiosError::NulInString { field });
        }
        if s.is_empty() {
            self.bytes.push(0);
        } else {
            self.count += 1;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            self.bytes.push(self.count);
        }
        Ok(())
    }

    /// A string the formatted part does not number itself (type 11's):
    /// empty ones included, as a space, since 0 would end the set.
    fn add_string(&mut self, field: &'static str, s: &str) -> Result<(), SmbiosError> {
        if s.contains('\0') {
            return Err(SmbiosError::NulInString { field });
        }
        self.strings.extend_from_slice(if s.is_empty() { b" " } else { s.as_bytes() });
        self.strings.push(0);
        Ok(())
    }

    fn finish(mut self, out: &mut Vec<u8>) {
        debug_assert_eq!(usize::from(self.bytes[1]), self.bytes.len());
        out.append(&mut self.bytes);
        if self.strings.is_empty() {
            out.extend_from_slice(&[0, 0]);
        } else {
            out.append(&mut self.strings);
            out.push(0);
        }
    }
}

/// The structure table: types 0, 1, 11 (when there are OEM strings) and 127.
fn structures(sys: &SystemInfo) -> Result<Vec<u8>, SmbiosError> {
    let mut out = Vec::new();

    // Type 0, BIOS information (the 2.4+ layout, 0x18 bytes).
    let mut bios = Structure::new(0, 0x18, 0);
    bios.string("bios vendor", Some(VENDOR))?;
    bios.string("bios version", Some(VERSION))?;
    bios.bytes.extend_from_slice(&0xe800u16.to_le_bytes()); // starting segment
    bios.string("bios date", None)?;
    bios.bytes.push(0); // ROM size
                        // Characteristics: bit 3, "not supported" (there is no BIOS to speak of).
    bios.bytes.extend_from_slice(&(1u64 << 3).to_le_bytes());
    // Extension byte 2, bit 4: this is a virtual machine.
    bios.bytes.extend_from_slice(&[0, 1 << 4]);
    bios.bytes.extend_from_slice(&[0, 0, 0xff, 0xff]); // release, EC release
    bios.finish(&mut out);

    // Type 1, system information (the 2.4+ layout, 0x1b bytes).
    let mut system = Structure::new(1, 0x1b, 0x100);
    system.string("manufacturer", sys.manufacturer.or(Some(VENDOR)))?;
    system.string("product", sys.product.or(Some("microvm")))?;
    system.string("version", sys.version.or(Some(VERSION)))?;
    system.string("serial", sys.serial)?;
    // SMBIOS 2.6+ stores the first three UUID fields little-endian.
    let u = &sys.uuid;
    system.bytes.extend_from_slice(&[u[3], u[2], u[1], u[0], u[5], u[4], u[7], u[6]]);
    system.bytes.extend_from_slice(&u[8..]);
    system.bytes.push(6); // wake-up type: power switch
    system.string("sku", sys.sku)?;
    system.string("family", sys.family)?;
    system.finish(&mut out);

    // Type 11, OEM strings: a count, then the strings (255 at most).
    if !sys.oem_strings.is_empty() {
        let count = u8::try_from(sys.oem_strings.len())
            .map_err(|_| SmbiosError::TooManyOemStrings(sys.oem_strings.len()))?;
        let mut oem = Structure::new(11, 5, 0x1100);
        oem.bytes.push(count);
        for s in sys.oem_strings {
            oem.add_string("OEM string", s)?;
        }
        oem.finish(&mut out);
    }

    Structure::new(127, 4, 0x7f00).finish(&mut out);
    Ok(out)
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

/// Writes the entry point and the tables at [`SMBIOS_START`].
pub fn setup_smbios<M: GuestMemory>(mem: &M, sys: &SystemInfo) -> Result<(), SmbiosError> {
    let table = structures(sys)?;
    let table_addr = SMBIOS_START + TABLE_OFFSET;
    let end = table_addr + table.len() as u64;
    // The reset vector's 16 bytes end the segment.
    if end > crate::reset_vector::RESET_VECTOR {
        return Err(SmbiosError::TooLarge { end });
    }
    let mut ep = Vec::with_capacity(ENTRY_POINT_LEN);
    ep.extend_from_slice(b"_SM3_");
    ep.push(0); // checksum, below
    ep.push(ENTRY_POINT_LEN as u8);
    ep.extend_from_slice(&[3, 0, 0]); // SMBIOS 3.0.0
    ep.push(1); // entry point revision
    ep.push(0);
    ep.extend_from_slice(&(table.len() as u32).to_le_bytes()); // maximum size
    ep.extend_from_slice(&table_addr.to_le_bytes());
    ep[5] = checksum(&ep);
    mem.write_slice(&ep, GuestAddress(SMBIOS_START)).map_err(SmbiosError::GuestMemory)?;
    mem.write_slice(&table, GuestAddress(table_addr)).map_err(SmbiosError::GuestMemory)
}

/// Parses the text form `01234567-89ab-cdef-0123-456789abcdef`.
pub fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = text.bytes().filter(|&b| b != b'-').collect();
    if text.len() != 36 || hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    /// The strings of the structure at `at` in `table`, and where the next
    /// structure starts: what Linux's `dmi_table` walk does.
    fn strings_of(table: &[u8], at: usize) -> (Vec<String>, usize) {
        let len = usize::from(table[at + 1]);
        let mut i = at + len;
        let mut strings = Vec::new();
        while table[i] != 0 {
            let end = i + table[i..].iter().position(|&b| b == 0).unwrap();
            strings.push(String::from_utf8(table[i..end].to_vec()).unwrap());
            i = end + 1;
        }
        let next = if strings.is_empty() { i + 2 } else { i + 1 };
        (strings, next)
    }

    #[test]
    fn the_entry_point_is_where_linux_scans_and_checks() {
        let mem = memory();
        setup_smbios(&mem, &SystemInfo::default()).unwrap();
        let mut ep = [0u8; ENTRY_POINT_LEN];
        mem.read_slice(&mut ep, GuestAddress(0xf_0000)).unwrap();
        assert_eq!(&ep[..5], b"_SM3_");
        assert_eq!(ep.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
        assert_eq!(usize::from(ep[6]), ENTRY_POINT_LEN);
        assert_eq!(ep[7], 3, "major version");
        let addr = u64::from_le_bytes(ep[16..24].try_into().unwrap());
        assert_eq!(addr % 16, 0);
        assert!(addr >= 0xf_0000 + ENTRY_POINT_LEN as u64);
        let len = u32::from_le_bytes(ep[12..16].try_into().unwrap()) as usize;
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
        // Three structures, the last one type 127, ending exactly at `len`.
        let (_, next) = strings_of(&table, 0);
        assert_eq!(table[next], 1);
        let (_, last) = strings_of(&table, next);
        assert_eq!(table[last], 127);
        assert_eq!(strings_of(&table, last).1, len);
    }

    #[test]
    fn the_system_table_carries_the_given_fields() {
        let uuid = parse_uuid("a67472e5-570e-5c8a-b18c-ae3c77701050").unwrap();
        let sys = SystemInfo {
            product: Some("nixos"),
            serial: Some("S-1"),
            family: Some("fam"),
            uuid,
            ..Default::default()
        };
        let table = structures(&sys).unwrap();
        let (_, at) = strings_of(&table, 0);
        let t1 = &table[at..];
        assert_eq!(&t1[..4], &[1, 0x1b, 0, 1]);
        let (strings, _) = strings_of(&table, at);
        assert_eq!(strings, ["Skiff", "nixos", VERSION, "S-1", "fam"]);
        // manufacturer, product, version, serial: strings 1..4; sku none.
        assert_eq!(&t1[4..8], &[1, 2, 3, 4]);
        assert_eq!(
            &t1[8..24],
            &[
                0xe5, 0x72, 0x74, 0xa6, 0x0e, 0x57, 0x8a, 0x5c, 0xb1, 0x8c, 0xae, 0x3c, 0x77, 0x70,
                0x10, 0x50
            ]
        );
        assert_eq!(&t1[25..27], &[0, 5], "no sku, family is string 5");
    }

    #[test]
    fn bad_strings_and_uuids_are_refused() {
        let sys = SystemInfo { product: Some("a\0b"), ..Default::default() };
        assert!(matches!(structures(&sys), Err(SmbiosError::NulInString { field: "product" })));
        assert_eq!(parse_uuid("a67472e5570e5c8ab18cae3c77701050"), None);
        assert_eq!(parse_uuid("g67472e5-570e-5c8a-b18c-ae3c77701050"), None);
        assert_eq!(parse_uuid("a67472e5-570e-5c8a-b18c-ae3c7770105"), None);
    }

    /// Type 11 after type 1: its count, then the strings in order (an
    /// empty one kept as a space, so the set does not end early); none
    /// without OEM strings; more than 255 refused.
    #[test]
    fn oem_strings_are_a_type_11_structure() {
        let oem = ["io.systemd.credential:a=1".to_owned(), String::new(), "x".to_owned()];
        let table = structures(&SystemInfo { oem_strings: &oem, ..Default::default() }).unwrap();
        let (_, t1) = strings_of(&table, 0);
        let (_, t11) = strings_of(&table, t1);
        assert_eq!(&table[t11..t11 + 5], &[11, 5, 0x00, 0x11, 3]);
        let (strings, end) = strings_of(&table, t11);
        assert_eq!(strings, ["io.systemd.credential:a=1", " ", "x"]);
        assert_eq!(table[end], 127);
        let plain = structures(&SystemInfo::default()).unwrap();
        let (_, t1) = strings_of(&plain, 0);
        assert_eq!(plain[strings_of(&plain, t1).1], 127, "no type 11");
        let many: Vec<String> = (0..256).map(|i| i.to_string()).collect();
        let sys = SystemInfo { oem_strings: &many, ..Default::default() };
        assert!(matches!(structures(&sys), Err(SmbiosError::TooManyOemStrings(256))));
    }
}
