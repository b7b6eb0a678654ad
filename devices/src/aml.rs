//! Small helpers for the ACPI (AML) each device writes about itself: the
//! DSDT builder (`boot::acpi`) only assembles what the devices describe.

use acpi_tables::{aml, Aml};

/// `Name(path, value)`.
pub fn name(path: &str, value: &dyn Aml) -> aml::Name {
    aml::Name::new(path.into(), value)
}

/// An ISA interrupt: consumer, edge, active high, exclusive (what an
/// `IRQNoFlags` descriptor means).
pub fn isa_irq(irq: u32) -> aml::Interrupt {
    aml::Interrupt::new(true, true, false, false, irq)
}

/// `Device (name) { Name (key, value) ..., Name (_CRS, ResourceTemplate
/// (resources)) }`, the shape of every ISA device in the DSDT, as bytes.
pub fn isa_device(name: &str, names: &[(&str, &dyn Aml)], resources: Vec<&dyn Aml>) -> Vec<u8> {
    let names: Vec<aml::Name> = names.iter().map(|(k, v)| self::name(k, *v)).collect();
    let crs = aml::ResourceTemplate::new(resources);
    let crs = self::name("_CRS", &crs);
    let mut children: Vec<&dyn Aml> = names.iter().map(|n| n as &dyn Aml).collect();
    children.push(&crs);
    let mut out = Vec::new();
    aml::Device::new(name.into(), children).to_aml_bytes(&mut out);
    out
}
