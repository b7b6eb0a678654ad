//! Intel MultiProcessor Specification 1.4 tables, used when the guest boots
//! with `acpi=off`.
//!
//! The floating pointer and the configuration table are placed in the last
//! KiB of base memory (the EBDA), which Linux scans for `_MP_`. Interrupt
//! routing follows what SeaBIOS/qboot publish for QEMU microvm (which always
//! sets `etc/irq0-override`): ISA IRQ0 (PIT) arrives on IOAPIC pin 2 and
//! IRQ2 (the 8259 cascade) has no entry.

use std::mem::size_of;

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};
use zerocopy::little_endian::{U16, U32};
use zerocopy::{Immutable, IntoBytes};

use crate::layout::{APIC_START, EBDA_START, IOAPIC_START};
use crate::GuestMemoryMmap;

/// Start of the MP table: the floating pointer, immediately followed by the
/// configuration table.
pub const MPTABLE_START: u64 = EBDA_START;
/// The MP table must end below this address (end of base memory).
pub const MPTABLE_END: u64 = 0xA_0000;

const ISA_IRQS: u8 = 16;
// Every ISA IRQ but the cascade gets an I/O interrupt entry.
const IO_INTERRUPTS: usize = ISA_IRQS as usize - 1;
const FIXED_SIZE: usize = size_of::<FloatingPointer>()
    + size_of::<ConfigHeader>()
    + size_of::<Bus>()
    + size_of::<IoApic>()
    + (IO_INTERRUPTS + 2) * size_of::<Interrupt>();

/// Most vCPUs whose processor entries fit below [`MPTABLE_END`].
pub const MAX_CPUS: u8 =
    (((MPTABLE_END - MPTABLE_START) as usize - FIXED_SIZE) / size_of::<Processor>()) as u8;

const MP_SPEC_REV: u8 = 4; // version 1.4
const OEM_ID: [u8; 8] = *b"SKIFF   ";
const PRODUCT_ID: [u8; 12] = *b"MICROVM     ";

// Entry types.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;

// Interrupt types.
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTPROCESSOR: u8 = 1 << 1;
const APIC_VERSION: u8 = 0x14; // KVM's local APIC
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_USABLE: u8 = 1;
// Family 6 and FPU | APIC, as Firecracker; Linux reads the real CPUID.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 9) | 1;
// Floating pointer feature byte 2: IMCR present (PIC mode implemented).
const FEATURE2_IMCRP: u8 = 1 << 7;

#[repr(C, packed)]
#[derive(IntoBytes, Immutable)]
struct FloatingPointer {
    signature: [u8; 4],
    config_table: U32,
    length: u8, // in 16-byte units
    spec_rev: u8,
    checksum: u8,
    feature1: u8, // 0: a configuration table is present (no default config)
    feature2: u8,
    feature3_5: [u8; 3],
}

#[repr(C, packed)]
#[derive(IntoBytes, Immutable)]
struct ConfigHeader {
    signature: [u8; 4],
    length: U16,
    spec_rev: u8,
    checksum: u8,
    oem_id: [u8; 8],
    product_id: [u8; 12],
    oem_table: U32,
    oem_table_size: U16,
    entry_count: U16,
    lapic_addr: U32,
    ext_table_length: U16,
    ext_table_checksum: u8,
    reserved: u8,
}

#[repr(C, packed)]
#[derive(IntoBytes, Immutable)]
struct Processor {
    entry_type: u8,
    apic_id: u8,
    apic_version: u8,
    flags: u8,
    signature: U32,
    features: U32,
    reserved: [u8; 8],
}

#[repr(C, packed)]
#[derive(IntoBytes, Immutable)]
struct Bus {
    entry_type: u8,
    bus_id: u8,
    bus_type: [u8; 6],
}

#[repr(C, packed)]
#[derive(IntoBytes, Immutable)]
struct IoApic {
    entry_type: u8,
    id: u8,
    version: u8,
    flags: u8,
    addr: U32,
}

/// I/O (type 3) and local (type 4) interrupt assignment entries share a layout.
#[repr(C, packed)]
#[derive(IntoBytes, Immutable)]
struct Interrupt {
    entry_type: u8,
    irq_type: u8,
    flags: U16, // 0: polarity and trigger conform to the bus
    src_bus: u8,
    src_irq: u8,
    dst_apic: u8,
    dst_pin: u8,
}

/// Errors from [`setup_mptable`].
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("invalid vCPU count {0} (must be 1..={MAX_CPUS})")]
    InvalidCpuCount(usize),
    #[error("APIC ID {0} is not an xAPIC CPU's (0..=254; 255 is the broadcast ID)")]
    InvalidApicId(u32),
    #[error("failed to write the MP table to guest memory")]
    GuestMemory(#[source] GuestMemoryError),
}

/// Sum-to-zero checksum over `parts`.
fn checksum(parts: &[&[u8]]) -> u8 {
    let sum = parts.iter().flat_map(|p| p.iter()).fold(0u8, |acc, b| acc.wrapping_add(*b));
    sum.wrapping_neg()
}

/// Configuration table entries: processors, the ISA bus, the IOAPIC (id
/// above the CPUs') and the interrupt assignments.
fn entries(apic_ids: &[u8]) -> (Vec<u8>, u16) {
    // MP spec: the IOAPIC's ID must differ from every CPU's. With CPU IDs
    // up to 254 there is none left; 64-bit Linux ignores the IOAPIC's ID
    // (QEMU's MADT gives it 0), so 0 stands in then.
    let ioapic_id = match apic_ids.iter().max() {
        Some(&m) if m < 0xFE => m + 1,
        _ => 0,
    };
    let mut bytes = Vec::new();
    let mut count = 0u16;
    let mut push = |entry: &[u8]| {
        bytes.extend_from_slice(entry);
        count += 1;
    };

    for (index, &apic_id) in apic_ids.iter().enumerate() {
        let bsp = if index == 0 { CPU_BOOTPROCESSOR } else { 0 };
        push(
            Processor {
                entry_type: MP_PROCESSOR,
                apic_id,
                apic_version: APIC_VERSION,
                flags: CPU_ENABLED | bsp,
                signature: CPU_SIGNATURE.into(),
                features: CPU_FEATURES.into(),
                reserved: [0; 8],
            }
            .as_bytes(),
        );
    }
    push(Bus { entry_type: MP_BUS, bus_id: 0, bus_type: *b"ISA   " }.as_bytes());
    push(
        IoApic {
            entry_type: MP_IOAPIC,
            id: ioapic_id,
            version: IOAPIC_VERSION,
            flags: IOAPIC_USABLE,
            addr: (IOAPIC_START as u32).into(),
        }
        .as_bytes(),
    );
    for irq in (0..ISA_IRQS).filter(|&irq| irq != 2) {
        push(
            Interrupt {
                entry_type: MP_INTSRC,
                irq_type: MP_INT,
                flags: 0.into(),
                src_bus: 0,
                src_irq: irq,
                dst_apic: ioapic_id,
                dst_pin: if irq == 0 { 2 } else { irq },
            }
            .as_bytes(),
        );
    }
    // The 8259 feeds LINT0 of the BSP; NMI goes to LINT1 of every CPU.
    for (irq_type, dst_apic, dst_pin) in [(MP_EXTINT, 0, 0), (MP_NMI, 0xFF, 1)] {
        push(
            Interrupt {
                entry_type: MP_LINTSRC,
                irq_type,
                flags: 0.into(),
                src_bus: 0,
                src_irq: 0,
                dst_apic,
                dst_pin,
            }
            .as_bytes(),
        );
    }
    (bytes, count)
}

/// Writes the MP floating pointer and configuration table at
/// [`MPTABLE_START`]. `pic` advertises the IMCR (PIC mode) in the floating
/// pointer; without it the guest assumes virtual-wire mode.
/// `apic_ids` are the vCPUs' APIC IDs in vCPU order, the boot CPU first.
pub fn setup_mptable(
    mem: &GuestMemoryMmap,
    apic_ids: &[u32],
    pic: bool,
) -> Result<(), MptableError> {
    if apic_ids.is_empty() || apic_ids.len() > usize::from(MAX_CPUS) {
        return Err(MptableError::InvalidCpuCount(apic_ids.len()));
    }
    let ids = apic_ids
        .iter()
        .map(|&id| {
            u8::try_from(id).ok().filter(|&b| b != 0xFF).ok_or(MptableError::InvalidApicId(id))
        })
        .collect::<Result<Vec<u8>, _>>()?;

    let (entries, entry_count) = entries(&ids);
    let mut header = ConfigHeader {
        signature: *b"PCMP",
        length: ((size_of::<ConfigHeader>() + entries.len()) as u16).into(),
        spec_rev: MP_SPEC_REV,
        checksum: 0,
        oem_id: OEM_ID,
        product_id: PRODUCT_ID,
        oem_table: 0.into(),
        oem_table_size: 0.into(),
        entry_count: entry_count.into(),
        lapic_addr: (APIC_START as u32).into(),
        ext_table_length: 0.into(),
        ext_table_checksum: 0,
        reserved: 0,
    };
    header.checksum = checksum(&[header.as_bytes(), &entries]);

    let config_table = MPTABLE_START + size_of::<FloatingPointer>() as u64;
    let mut fp = FloatingPointer {
        signature: *b"_MP_",
        config_table: (config_table as u32).into(),
        length: 1,
        spec_rev: MP_SPEC_REV,
        checksum: 0,
        feature1: 0,
        feature2: if pic { FEATURE2_IMCRP } else { 0 },
        feature3_5: [0; 3],
    };
    fp.checksum = checksum(&[fp.as_bytes()]);

    let image = [fp.as_bytes(), header.as_bytes(), &entries].concat();
    debug_assert!(MPTABLE_START + image.len() as u64 <= MPTABLE_END);
    mem.write_slice(&image, GuestAddress(MPTABLE_START)).map_err(MptableError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
    }

    /// Checks both structures and returns the configuration table.
    fn read_table(mem: &GuestMemoryMmap) -> (Vec<u8>, Vec<u8>) {
        let fp = read(mem, MPTABLE_START, 16);
        assert_eq!(MPTABLE_START % 16, 0);
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(sum(&fp), 0, "floating pointer checksum");
        assert_eq!((fp[8], fp[9], fp[11]), (1, 4, 0), "length, spec 1.4, no default config");

        let addr = u64::from(u32_at(&fp, 4));
        assert_eq!(addr, MPTABLE_START + 16);
        let header = read(mem, addr, 44);
        assert_eq!(&header[..4], b"PCMP");
        let table = read(mem, addr, usize::from(u16_at(&header, 4)));
        assert_eq!(sum(&table), 0, "configuration table checksum");
        assert_eq!(table[6], 4);
        assert_eq!(u64::from(u32_at(&table, 36)), APIC_START);
        assert!(addr + table.len() as u64 <= MPTABLE_END);
        (fp, table)
    }

    /// Walks the entries, returning them as (type, bytes).
    fn walk(table: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut off = 44;
        while off < table.len() {
            let len = if table[off] == MP_PROCESSOR { 20 } else { 8 };
            entries.push((table[off], table[off..off + len].to_vec()));
            off += len;
        }
        assert_eq!(off, table.len());
        assert_eq!(entries.len(), usize::from(u16_at(table, 34)), "entry count");
        entries
    }

    #[test]
    fn table_layout() {
        let mem = mem();
        // APIC IDs with a hole, as 2 sockets of 3 cores give them.
        let ids = [0, 1, 2, 4];
        setup_mptable(&mem, &ids, true).unwrap();
        let (fp, table) = read_table(&mem);
        assert_eq!(fp[12], FEATURE2_IMCRP);

        let entries = walk(&table);
        assert_eq!(entries.len(), 4 + 1 + 1 + 15 + 2);
        for (i, (ty, e)) in entries[..4].iter().enumerate() {
            assert_eq!(*ty, MP_PROCESSOR);
            let bsp = if i == 0 { CPU_BOOTPROCESSOR } else { 0 };
            assert_eq!((e[1], e[3]), (ids[i] as u8, CPU_ENABLED | bsp));
        }
        assert_eq!(entries[4], (MP_BUS, [1, 0, b'I', b'S', b'A', b' ', b' ', b' '].to_vec()));
        let ioapic = &entries[5].1;
        assert_eq!(
            (ioapic[0], ioapic[1], ioapic[2], u32_at(ioapic, 4)),
            (MP_IOAPIC, 5, 0x11, IOAPIC_START as u32),
            "the IOAPIC's ID follows the highest CPU's"
        );

        let routes: Vec<(u8, u8)> = entries[6..21].iter().map(|(_, e)| (e[5], e[7])).collect();
        assert_eq!(routes[0], (0, 2), "IRQ0 on pin 2");
        assert!(routes.iter().all(|&(irq, pin)| irq == 0 || irq == pin));
        assert!(!routes.iter().any(|&(irq, _)| irq == 2));
        assert!(
            entries[6..21].iter().all(|(ty, e)| *ty == MP_INTSRC && e[6] == 5),
            "routed to the IOAPIC"
        );

        assert_eq!(entries[21].1, [MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
        assert_eq!(entries[22].1, [MP_LINTSRC, MP_NMI, 0, 0, 0, 0, 0xFF, 1]);
    }

    #[test]
    fn no_imcr_without_pic() {
        let mem = mem();
        setup_mptable(&mem, &[0], false).unwrap();
        let (fp, table) = read_table(&mem);
        assert_eq!(fp[12], 0);
        assert_eq!(walk(&table).len(), 1 + 1 + 1 + 15 + 2);
    }

    #[test]
    fn cpu_limits() {
        let mem = mem();
        let ids = |n: u8| (0..u32::from(n)).collect::<Vec<u32>>();
        setup_mptable(&mem, &ids(MAX_CPUS), false).unwrap();
        let (_, table) = read_table(&mem);
        assert_eq!(walk(&table).len(), usize::from(MAX_CPUS) + 19);
        for n in [0, MAX_CPUS + 1] {
            let res = setup_mptable(&mem, &ids(n), false);
            assert!(matches!(res, Err(MptableError::InvalidCpuCount(c)) if c == usize::from(n)));
        }
        for id in [0xFF, 0x100] {
            let res = setup_mptable(&mem, &[0, id], false);
            assert!(matches!(res, Err(MptableError::InvalidApicId(i)) if i == id));
        }
        // The highest CPU ID leaves no other for the IOAPIC: it takes 0.
        setup_mptable(&mem, &[0, 0xFE], false).unwrap();
        let (_, table) = read_table(&mem);
        assert_eq!(walk(&table)[3].1[1], 0);
    }

    #[test]
    fn memory_too_small() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x9_0000)]).unwrap();
        assert!(matches!(setup_mptable(&mem, &[0], false), Err(MptableError::GuestMemory(_))));
    }
}
