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
