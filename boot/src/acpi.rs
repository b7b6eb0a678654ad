//! ACPI tables for the `microvm` machine: RSDP -> XSDT -> {FADT -> DSDT, MADT}.
//!
//! The tables mirror QEMU's `hw/i386/acpi-microvm.c`: a hardware-reduced FADT
//! whose sleep and reset registers live in the Generic Event Device (GED)
//! register block, a MADT for the local APICs and the single IOAPIC, and a
//! DSDT describing the ISA devices, the GED, a power button and the
//! virtio-mmio transports. AML is produced with the `acpi_tables` crate.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::legacy::ged;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};
use zerocopy::little_endian::{U16, U32};
use zerocopy::{Immutable, IntoBytes};

use crate::layout::{self, APIC_START, IOAPIC_START};
use crate::GuestMemoryMmap;

/// Start of the ACPI area. The RSDP sits here, 16-byte aligned, so the
/// legacy BIOS-area scan (0xE0000..0xFFFFF) finds it as well as
/// `boot_params.acpi_rsdp_addr`.
pub const ACPI_START: u64 = layout::ACPI_START;
/// The tables must end below this address (where the SMBIOS tables start).
pub const ACPI_END: u64 = layout::SMBIOS_START;
/// Guest-physical address of the RSDP.
pub const RSDP_ADDR: u64 = ACPI_START;

/// IOAPIC id in the MADT; QEMU uses 0, which matches KVM's IOAPIC id register.
pub const IOAPIC_ID: u8 = 0;

// Generic Event Device registers, as QEMU microvm lays them out
// (include/hw/i386/microvm.h, include/hw/acpi/generic_event_device.h).

/// Byte register: FADT SLEEP_CONTROL_REG.
pub const GED_REG_SLEEP_CTL: u64 = layout::GED_MMIO_BASE + ged::SLEEP_CTL;
/// Byte register: FADT SLEEP_STATUS_REG.
pub const GED_REG_SLEEP_STS: u64 = layout::GED_MMIO_BASE + ged::SLEEP_STS;
/// Byte register: FADT RESET_REG.
pub const GED_REG_RESET: u64 = layout::GED_MMIO_BASE + ged::RESET;
/// Value the guest writes to [`GED_REG_RESET`] to reset the machine.
pub const GED_RESET_VALUE: u8 = ged::RESET_VALUE;
/// SLP_TYP value advertised by `\_S5_`.
pub const GED_SLP_TYP_S5: u8 = ged::SLP_TYP_S5;

/// xAPIC IDs are 8 bits and 0xFF is the broadcast ID.
pub const MAX_CPUS: u8 = 254;

/// Default OEM id for all tables.
pub const DEFAULT_OEM_ID: [u8; 6] = *b"SKIFF ";
const OEM_TABLE_ID: [u8; 8] = *b"SKIFFVM ";
const OEM_REVISION: u32 = 1;
const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"SKIFF\0\0\0";

const HEADER_LEN: u32 = 36;
const TABLE_ALIGN: usize = 16;

// FADT IAPC_BOOT_ARCH flags (ACPI 6.5, table 5.11).
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

const MADT_PCAT_COMPAT: u32 = 1;
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;

/// What the tables describe. The DSDT's devices come as AML that each
/// device wrote about itself; this module only assembles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// The vCPUs' local APIC IDs in vCPU order (the boot CPU first); the
    /// MADT lists them with processor UIDs 0, 1, ...
    pub apic_ids: Vec<u32>,
    /// PS/2 controller present (FADT IAPC_BOOT_ARCH 8042 bit).
    pub i8042: bool,
    /// CMOS RTC present (else the FADT says there is none).
    pub rtc: bool,
    /// Dual 8259 PIC present (MADT PCAT_COMPAT).
    pub pic: bool,
    /// PIT present: IRQ0 is overridden to GSI 2.
    pub pit: bool,
    /// The DSDT's `\_SB` devices, each one's own AML, in order.
    pub devices: Vec<u8>,
    /// ECAM for an MCFG table (`pcie=on`).
    pub mcfg: Option<Mcfg>,
    /// OEM id stamped into every table.
    pub oem_id: [u8; 6],
}

impl Default for AcpiConfig {
    fn default() -> Self {
        Self {
            apic_ids: vec![0],
            i8042: false,
            rtc: false,
            pic: false,
            pit: false,
            devices: Vec::new(),
            mcfg: None,
            oem_id: DEFAULT_OEM_ID,
        }
    }
}

/// The MCFG's one allocation: segment 0, buses 0..=`last_bus` at `ecam_base`.
/// QEMU microvm has no MCFG (Linux then finds ECAM through `_CBA` only,
/// late); with it the guest uses ECAM from the first config access instead
/// of probing the legacy 0xCF8 ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mcfg {
    pub ecam_base: u64,
    pub last_bus: u8,
}

/// Errors from [`create_acpi_tables`].
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("invalid vCPU count {0} (must be 1..={MAX_CPUS})")]
    InvalidCpuCount(usize),
    #[error("APIC ID {0} is not an xAPIC CPU's (0..=254; 255 is the broadcast ID)")]
    InvalidApicId(u32),
    #[error("ACPI tables end at {end:#x}, past {ACPI_END:#x}")]
    TablesTooLarge { end: u64 },
    #[error("failed to write ACPI tables to guest memory")]
    GuestMemory(#[source] GuestMemoryError),
}

/// Writes RSDP, XSDT, FADT, MADT and DSDT to guest memory starting at
/// [`ACPI_START`] and returns the RSDP address.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    let cpus = cfg.apic_ids.len();
    if cpus == 0 || cpus > usize::from(MAX_CPUS) {
        return Err(AcpiError::InvalidCpuCount(cpus));
    }
    if let Some(&id) = cfg.apic_ids.iter().find(|&&id| id >= 0xFF) {
        return Err(AcpiError::InvalidApicId(id));
    }

    // The RSDP needs the XSDT address, which is known last: reserve its slot
    // at the start of the image and fill it in at the end.
    let mut image = vec![0u8; Rsdp::len()];
    let dsdt_addr = push_table(&mut image, &dsdt(cfg));
    let fadt_addr = push_table(&mut image, &to_bytes(&fadt(cfg, dsdt_addr)));
    let madt_addr = push_table(&mut image, &madt(cfg));
    let mcfg_addr = cfg.mcfg.map(|m| {
        let mut mcfg = MCFG::new(cfg.oem_id, OEM_TABLE_ID, OEM_REVISION);
        mcfg.add_ecam(m.ecam_base, 0, 0, m.last_bus);
        push_table(&mut image, &to_bytes(&mcfg))
    });

    let mut xsdt = XSDT::new(cfg.oem_id, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if let Some(addr) = mcfg_addr {
        xsdt.add_entry(addr);
    }
    let xsdt_addr = push_table(&mut image, &to_bytes(&xsdt));

    image[..Rsdp::len()].copy_from_slice(&to_bytes(&Rsdp::new(cfg.oem_id, xsdt_addr)));

    let end = ACPI_START + image.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TablesTooLarge { end });
    }
    mem.write_slice(&image, GuestAddress(ACPI_START)).map_err(AcpiError::GuestMemory)?;
    Ok(GuestAddress(RSDP_ADDR))
}

/// Appends `table` to the image at the next aligned offset and returns the
/// guest address it will be loaded at.
fn push_table(image: &mut Vec<u8>, table: &[u8]) -> u64 {
    let offset = image.len().next_multiple_of(TABLE_ALIGN);
    image.resize(offset, 0);
    image.extend_from_slice(table);
    ACPI_START + offset as u64
}

fn sdt(signature: [u8; 4], length: u32, revision: u8, cfg: &AcpiConfig) -> Sdt {
    Sdt::new(signature, length, revision, cfg.oem_id, OEM_TABLE_ID, OEM_REVISION)
}

fn to_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// A byte-wide GED register as a SystemMemory generic address.
fn ged_register(addr: u64) -> GAS {
    GAS::new(AddressSpace::SystemMemory, 8, 0, AccessSize::ByteAccess, addr)
}

fn iapc_boot_arch(cfg: &AcpiConfig) -> u16 {
    let mut flags = IAPC_BOOT_ARCH_VGA_NOT_PRESENT;
    if cfg.i8042 {
        flags |= IAPC_BOOT_ARCH_8042;
    }
    if !cfg.rtc {
        flags |= IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT;
    }
    flags
}

/// Hardware-reduced FADT: no PM1/GPE blocks; sleep and reset go through the
/// GED register block.
fn fadt(cfg: &AcpiConfig, dsdt_addr: u64) -> FADT {
    let mut fadt = FADTBuilder::new(cfg.oem_id, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .dsdt_64(dsdt_addr);
    fadt.reset_reg = ged_register(GED_REG_RESET);
    fadt.reset_value = GED_RESET_VALUE;
    fadt.sleep_control_reg = ged_register(GED_REG_SLEEP_CTL);
    fadt.sleep_status_reg = ged_register(GED_REG_SLEEP_STS);
    fadt.iapc_boot_arch = iapc_boot_arch(cfg).into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    fadt.finalize()
}

/// MADT Interrupt Source Override (type 2); `acpi_tables` has no helper.
#[repr(C, packed)]
#[derive(IntoBytes, Immutable)]
struct InterruptSourceOverride {
    entry_type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32,
    flags: U16,
}

/// MADT Local APIC NMI (type 4); `acpi_tables` has no helper.
#[repr(C, packed)]
#[derive(IntoBytes, Immutable)]
struct LocalApicNmi {
    entry_type: u8,
    length: u8,
    processor_uid: u8,
    flags: U16,
    lint: u8,
}

/// MADT as QEMU's `acpi_build_madt` builds it. Built on a raw `Sdt` because
/// `acpi_tables::madt::MADT` cannot set the PCAT_COMPAT flag.
fn madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut madt = sdt(*b"APIC", HEADER_LEN + 8, 1, cfg);
    madt.write_u32(36, APIC_START as u32);
    madt.write_u32(40, if cfg.pic { MADT_PCAT_COMPAT } else { 0 });

    for (uid, &id) in cfg.apic_ids.iter().enumerate() {
        // At most MAX_CPUS entries with IDs below 255 (checked above).
        let local = ProcessorLocalApic::new(uid as u8, id as u8, EnabledStatus::Enabled);
        madt.append_slice(local.as_bytes());
    }
    madt.append_slice(IoApic::new(IOAPIC_ID, IOAPIC_START as u32, 0).as_bytes());
    if cfg.pit {
        // The PIT is wired to IOAPIC pin 2. Flags 0: conforms to the ISA bus
        // (edge, active high), as QEMU does.
        let iso = InterruptSourceOverride {
            entry_type: MADT_INTERRUPT_SOURCE_OVERRIDE,
            length: size_of::<InterruptSourceOverride>() as u8,
            bus: 0,
            source: 0,
            gsi: 2.into(),
            flags: 0.into(),
        };
        madt.append_slice(iso.as_bytes());
    }
    let nmi = LocalApicNmi {
        entry_type: MADT_LOCAL_APIC_NMI,
        length: size_of::<LocalApicNmi>() as u8,
        processor_uid: 0xFF, // all processors
        flags: 0.into(),
        lint: 1,
    };
    madt.append_slice(nmi.as_bytes());
    madt.as_slice().to_vec()
}

fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut body = aml::Scope::raw("\\_SB_".into(), cfg.devices.clone());
    // ACPI 5.0 System State Package: {SLP_TYP, ignored, reserved, reserved}.
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&GED_SLP_TYP_S5, &0u8, &0u8, &0u8]))
        .to_aml_bytes(&mut body);

    // Revision 2: 64-bit AML integers.
    let mut dsdt = sdt(*b"DSDT", HEADER_LEN, 2, cfg);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    use devices::virtio::mmio::MAX_AML_DEVICES;

    use crate::layout::{
        COM1_IRQ, COM1_PORT, GED_IRQ, GED_MMIO_BASE, I8042_IRQ, I8042_PORT, RTC_IRQ, RTC_PORT,
        VIRTIO_MMIO_BASE,
    };

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// The GED and power button: what every ACPI machine has.
    fn ged() -> Vec<u8> {
        devices::legacy::ged::aml(GED_MMIO_BASE, GED_IRQ)
    }

    fn minimal() -> AcpiConfig {
        AcpiConfig { devices: ged(), ..Default::default() }
    }

    fn virtio_mmio(n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                let base = VIRTIO_MMIO_BASE + i as u64 * 0x200;
                devices::virtio::mmio::aml(i, base, 20 + i as u32).unwrap()
            })
            .collect()
    }

    /// Every kind of device, with `n` virtio-mmio transports.
    fn all_devices(n: usize) -> Vec<u8> {
        let mut devices = devices::legacy::serial::aml(COM1_PORT, COM1_IRQ);
        devices.extend(devices::legacy::i8042::aml(I8042_PORT, I8042_IRQ));
        devices.extend(devices::legacy::rtc::aml(RTC_PORT, RTC_IRQ));
        devices.extend(ged());
        devices.extend(virtio_mmio(n));
        devices.extend(pci::acpi::aml(&pci::acpi::RootComplexAml {
            ecam_base: 0xe000_0000,
            ecam_size: 0x1000_0000,
            last_bus: 1,
            mmio32: (0xc000_0000, 0x2000_0000),
            mmio64: Some((0xc0_0000_0000, 0x40_0000_0000)),
            intx_gsi_base: 16,
        }));
        devices
    }

    fn full_config() -> AcpiConfig {
        AcpiConfig {
            apic_ids: vec![0, 1, 2, 4],
            i8042: true,
            rtc: true,
            pic: true,
            pit: true,
            devices: all_devices(2),
            mcfg: Some(Mcfg { ecam_base: 0xe000_0000, last_bus: 1 }),
            oem_id: DEFAULT_OEM_ID,
        }
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// Little-endian integer of `N` bytes at `off`.
    fn le<const N: usize>(b: &[u8], off: usize) -> u64 {
        b[off..off + N].iter().rev().fold(0, |acc, &x| acc << 8 | u64::from(x))
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
    }

    /// Reads a whole SDT (using its length field) and checks its checksum.
    fn table(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        let header = read(mem, addr, HEADER_LEN as usize);
        assert_eq!(&header[..4], signature);
        let t = read(mem, addr, le::<4>(&header, 4) as usize);
        assert_eq!(sum(&t), 0, "{signature:?} checksum");
        assert!(addr + t.len() as u64 <= ACPI_END);
        t
    }

    struct Tables {
        xsdt: Vec<u8>,
        fadt: Vec<u8>,
        madt: Vec<u8>,
        dsdt: Vec<u8>,
        /// Empty without PCIe.
        mcfg: Vec<u8>,
    }

    fn build(cfg: &AcpiConfig) -> Tables {
        let mem = mem();
        let rsdp_addr = create_acpi_tables(&mem, cfg).unwrap();
        assert_eq!(rsdp_addr, GuestAddress(RSDP_ADDR));
        assert_eq!(rsdp_addr.0 % 16, 0);

        let rsdp = read(&mem, rsdp_addr.0, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(le::<4>(&rsdp, 20), 36, "RSDP length");

        let xsdt = table(&mem, le::<8>(&rsdp, 24), b"XSDT");
        let entries = if cfg.mcfg.is_some() { 3 } else { 2 };
        assert_eq!(xsdt.len(), 36 + entries * 8);
        let fadt = table(&mem, le::<8>(&xsdt, 36), b"FACP");
        let madt = table(&mem, le::<8>(&xsdt, 44), b"APIC");
        let dsdt = table(&mem, le::<8>(&fadt, 140), b"DSDT");
        let mcfg = match cfg.mcfg {
            Some(p) => {
                let mcfg = table(&mem, le::<8>(&xsdt, 52), b"MCFG");
                // One allocation: ECAM base, segment 0, buses 0..=last.
                assert_eq!(mcfg.len(), 44 + 16);
                assert_eq!(le::<8>(&mcfg, 44), p.ecam_base);
                assert_eq!(&mcfg[52..56], &[0, 0, 0, p.last_bus]);
                mcfg
            }
            None => Vec::new(),
        };
        Tables { xsdt, fadt, madt, dsdt, mcfg }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn fadt_fields() {
        let t = build(&full_config());
        let f = &t.fadt;
        assert_eq!(f.len(), 276);
        assert_eq!(f[8], 6, "FADT major revision");
        assert_eq!(f[131], 5, "FADT minor revision");
        assert_eq!(le::<4>(f, 40), 0, "32-bit DSDT pointer unused");
        let flags = le::<4>(f, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");

        let gas = |off: usize| (f[off], f[off + 1], f[off + 2], f[off + 3], le::<8>(f, off + 4));
        assert_eq!(gas(116), (0, 8, 0, 1, GED_REG_RESET));
        assert_eq!(f[128], GED_RESET_VALUE);
        assert_eq!(gas(244), (0, 8, 0, 1, GED_REG_SLEEP_CTL));
        assert_eq!(gas(256), (0, 8, 0, 1, GED_REG_SLEEP_STS));
        assert_eq!(&f[268..276], b"SKIFF\0\0\0");
        assert_eq!(le::<2>(f, 109), 0b0000_0110, "8042 + no VGA");

        let minimal = build(&minimal());
        assert_eq!(le::<2>(&minimal.fadt, 109), 0b0010_0100, "no VGA + no CMOS RTC");
    }

    /// Returns (type, bytes) of every MADT interrupt controller structure.
    fn madt_entries(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            let len = madt[off + 1] as usize;
            entries.push((madt[off], madt[off..off + len].to_vec()));
            off += len;
        }
        assert_eq!(off, madt.len());
        entries
    }

    #[test]
    fn madt_entries_match_config() {
        let t = build(&full_config());
        assert_eq!(le::<4>(&t.madt, 36), APIC_START);
        assert_eq!(le::<4>(&t.madt, 40), u64::from(MADT_PCAT_COMPAT));
        let entries = madt_entries(&t.madt);
        assert_eq!(entries.len(), 4 + 1 + 1 + 1);
        // Processor UIDs count up; APIC IDs are the config's (with a hole).
        for (i, (ty, e)) in entries.iter().take(4).enumerate() {
            assert_eq!(*ty, 0);
            assert_eq!((e[2], e[3], le::<4>(e, 4)), (i as u8, [0, 1, 2, 4][i], 1));
        }
        let (ty, ioapic) = &entries[4];
        assert_eq!(
            (*ty, ioapic[2], le::<4>(ioapic, 4), le::<4>(ioapic, 8)),
            (1, IOAPIC_ID, IOAPIC_START, 0)
        );
        // IRQ0 (bus 0 source 0) -> GSI 2, flags 0.
        let (ty, iso) = &entries[5];
        assert_eq!((*ty, iso.len(), iso[3], le::<4>(iso, 4)), (2, 10, 0, 2));
        assert_eq!((iso[2], le::<2>(iso, 8)), (0, 0));
        let (ty, nmi) = &entries[6];
        assert_eq!((*ty, nmi.len(), nmi[2], le::<2>(nmi, 3), nmi[5]), (4, 6, 0xFF, 0, 1));

        let cfg = AcpiConfig { apic_ids: vec![0, 1], ..Default::default() };
        let t = build(&cfg);
        assert_eq!(le::<4>(&t.madt, 40), 0, "no PCAT_COMPAT without a PIC");
        let types: Vec<u8> = madt_entries(&t.madt).iter().map(|e| e.0).collect();
        assert_eq!(types, [0, 0, 1, 4], "no override without a PIT");
    }

    #[test]
    fn dsdt_devices_follow_config() {
        let t = build(&full_config());
        assert_eq!(t.dsdt[8], 2, "DSDT revision");
        for needle in [
            &b"COM1"[..],
            b"KBD_",
            b"RTC_",
            b"GED_",
            b"ACPI0013",
            b"EREG",
            b"ESEL",
            b"_EVT",
            b"PWRB",
            b"PNP0C0C",
            b"VR00",
            b"VR01",
            b"LNRO0005",
            b"_S5_",
        ] {
            assert!(contains(&t.dsdt, needle), "{needle:?}");
        }
        // The XSDT lists FADT, MADT and (PCIe) MCFG; the DSDT hangs off the FADT.
        assert_eq!(t.xsdt.len(), 60);

        let minimal = build(&minimal());
        for needle in [&b"COM1"[..], b"KBD_", b"RTC_", b"VR00"] {
            assert!(!contains(&minimal.dsdt, needle), "{needle:?}");
        }
        assert!(contains(&minimal.dsdt, b"GED_") && contains(&minimal.dsdt, b"_S5_"));
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let mem = mem();
        let err = |cfg: AcpiConfig| create_acpi_tables(&mem, &cfg).unwrap_err();

        for n in [0u8, 255] {
            let cfg = AcpiConfig { apic_ids: (0..u32::from(n)).collect(), ..Default::default() };
            assert!(matches!(err(cfg), AcpiError::InvalidCpuCount(c) if c == usize::from(n)));
        }
        for id in [0xFF, 0x100] {
            let cfg = AcpiConfig { apic_ids: vec![0, id], ..Default::default() };
            assert!(matches!(err(cfg), AcpiError::InvalidApicId(i) if i == id));
        }

        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0xA_0000)]).unwrap();
        let res = create_acpi_tables(&small, &AcpiConfig::default());
        assert!(matches!(res, Err(AcpiError::GuestMemory(_))));
    }

    #[test]
    fn largest_config_fits() {
        let cfg = AcpiConfig {
            apic_ids: (0..u32::from(MAX_CPUS)).collect(),
            devices: all_devices(MAX_AML_DEVICES),
            ..full_config()
        };
        let t = build(&cfg);
        assert_eq!(madt_entries(&t.madt).len(), usize::from(MAX_CPUS) + 3);
        assert!(contains(&t.dsdt, b"VR99"));
    }

    /// Disassembles every table with ACPICA's `iasl` (package acpica-tools)
    /// and recompiles the DSDT. Skipped when `iasl` is not installed.
    #[test]
    fn iasl_accepts_tables() {
        if Command::new("iasl").arg("-v").output().is_err() {
            eprintln!("iasl not found, skipping");
            return;
        }
        let t = build(&full_config());
        let dir = std::env::temp_dir().join(format!("skiff-acpi-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (file, bytes) in [
            ("dsdt", &t.dsdt),
            ("facp", &t.fadt),
            ("apic", &t.madt),
            ("xsdt", &t.xsdt),
            ("mcfg", &t.mcfg),
        ] {
            let path = dir.join(format!("{file}.dat"));
            std::fs::write(&path, bytes).unwrap();
            let out = Command::new("iasl").arg("-d").arg(&path).output().unwrap();
            assert!(
                out.status.success(),
                "iasl -d {file}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
        for needle in [
            "\"ACPI0013\"",
            "Notify (PWRB, 0x80)",
            "Name (_S5, Package",
            "\"LNRO0005\"",
            "Device (PCI0)",
            "EisaId (\"PNP0A08\")",
            "Name (_CBA, 0xE0000000)",
        ] {
            assert!(dsl.contains(needle), "{needle} missing from:\n{dsl}");
        }
        // PCIe windows and routing, compared without whitespace.
        let flat: String = dsl.lines().map(|l| l.split("//").next().unwrap_or("")).collect();
        let flat: String = flat.split_whitespace().collect();
        for needle in [
            "0x0000,0x0000,0x0001,0x0000,0x0002",
            "0x00000000,0xC0000000,0xDFFFFFFF,0x00000000,0x20000000",
            "0x000000C000000000,0x000000FFFFFFFFFF",
            // Slot 31, INTD → link (31 + 3) % 4 = 2; GSI2 is GSI 18, level.
            "Package(0x04){0x001FFFFF,0x03,GSI2,Zero}",
            "Interrupt(ResourceConsumer,Level,ActiveHigh,Exclusive,,,){0x00000012,}",
        ] {
            assert!(flat.contains(needle), "{needle} missing from:\n{dsl}");
        }
        let out = Command::new("iasl").arg(dir.join("dsdt.dsl")).output().unwrap();
        assert!(out.status.success(), "iasl recompile: {}", String::from_utf8_lossy(&out.stdout));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
