//! The root complex in the DSDT, as QEMU's `acpi_dsdt_add_gpex` describes
//! it (hw/pci-host/gpex-acpi.c): link devices for INTx, `PCI0` with ECAM,
//! its windows and routing, and a motherboard resource reserving ECAM.

use acpi_tables::{aml, Aml};
use devices::aml::name;

/// What `PCI0` describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootComplexAml {
    pub ecam_base: u64,
    /// 1 MiB per bus.
    pub ecam_size: u64,
    /// The highest bus number in use (0 without root ports). `_CRS` stops
    /// there, and so does the MCFG entry: Linux scans every bus up to the
    /// MCFG's end for peer host bridges (`pcibios_fixup_peer_bridges`),
    /// 32 config reads (VM exits) per bus, while skiff has no hot-plug
    /// that could ever add one.
    pub last_bus: u8,
    /// The 32-bit MMIO window as (base, size).
    pub mmio32: (u64, u64),
    /// The 64-bit MMIO window as (base, size), when there is one.
    pub mmio64: Option<(u64, u64)>,
    /// The GSI of INTA (INTB..INTD follow).
    pub intx_gsi_base: u32,
}

/// The root complex, as QEMU's `acpi_dsdt_add_gpex` describes it: link
/// devices GSI0..GSI3 for INTA..INTD (level, active high), then `PCI0` with
/// ECAM (`_CBA`), its bus and memory windows (`_CRS`, no I/O: microvm maps
/// no PCI I/O space), the routing table (`_PRT`: slot `s`, pin `p` uses link
/// `(s + p) % 4`) and a motherboard resource reserving ECAM.
pub fn aml(pcie: &RootComplexAml) -> Vec<u8> {
    let mut out = Vec::new();
    for link in 0..4u32 {
        let line = aml::Interrupt::new(true, false, false, false, pcie.intx_gsi_base + link);
        let irq = aml::ResourceTemplate::new(vec![&line]);
        let dev_name = format!("GSI{link}");
        aml::Device::new(
            dev_name.as_str().into(),
            vec![
                &name("_HID", &aml::EISAName::new("PNP0C0F")),
                &name("_UID", &link),
                &name("_PRS", &irq),
                &name("_CRS", &irq),
                // The routing is fixed; accept the OS's (only) choice.
                &aml::Method::new("_SRS".into(), 1, false, vec![]),
            ],
        )
        .to_aml_bytes(&mut out);
    }

    let links: Vec<aml::Path> = (0..4).map(|l| aml::Path::new(&format!("GSI{l}"))).collect();
    let mut entries = Vec::with_capacity(128);
    for slot in 0..32u32 {
        for pin in 0..4u32 {
            entries.push((slot << 16 | 0xffff, pin, (slot + pin) as usize % 4));
        }
    }
    let packages: Vec<aml::Package> = entries
        .iter()
        .map(|(addr, pin, link)| aml::Package::new(vec![addr, pin, &links[*link], &0u8]))
        .collect();
    let prt = aml::Package::new(packages.iter().map(|p| p as &dyn Aml).collect());

    let (m32_base, m32_size) = pcie.mmio32;
    let bus_range = aml::AddressSpace::new_bus_number(0u16, u16::from(pcie.last_bus));
    let mmio32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        m32_base as u32,
        (m32_base + m32_size - 1) as u32,
        None,
    );
    let mmio64 = pcie.mmio64.map(|(base, size)| {
        aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::Cacheable,
            true,
            base,
            base + size - 1,
            None,
        )
    });
    let mut crs: Vec<&dyn Aml> = vec![&bus_range, &mmio32];
    if let Some(m) = &mmio64 {
        crs.push(m);
    }
    let crs = aml::ResourceTemplate::new(crs);
    let ecam_range = aml::Memory32Fixed::new(false, pcie.ecam_base as u32, pcie.ecam_size as u32);
    let ecam = aml::ResourceTemplate::new(vec![&ecam_range]);
    let (res0_hid, res0_crs) = (name("_HID", &aml::EISAName::new("PNP0C02")), name("_CRS", &ecam));
    let res0 = aml::Device::new("RES0".into(), vec![&res0_hid, &res0_crs]);
    aml::Device::new(
        "PCI0".into(),
        vec![
            &name("_HID", &aml::EISAName::new("PNP0A08")),
            &name("_CID", &aml::EISAName::new("PNP0A03")),
            &name("_SEG", &0u8),
            &name("_BBN", &0u8),
            &name("_UID", &0u8),
            &name("_CCA", &1u8),
            &name("_CBA", &pcie.ecam_base),
            &name("_CRS", &crs),
            &name("_PRT", &prt),
            &res0,
        ],
    )
    .to_aml_bytes(&mut out);
    out
}
