//! The ACPI Generic Event Device of QEMU's microvm, at the same address and
//! with the same registers, so the same DSDT/FADT semantics hold:
//!
//! - offset 0x000 (4 bytes): event selector. Reading returns the pending
//!   events and clears them; the DSDT's `_EVT` method dispatches on the bits.
//! - offset 0x200: sleep control. `(SLP_TYP << 2) | SLP_EN` with SLP_TYP 5
//!   (the `_S5_` value in the DSDT) powers the machine off.
//! - offset 0x201: sleep status (reads 0: we never sleep).
//! - offset 0x202: reset register; 0x42 resets the machine.
//!
//! The FADT points its hardware-reduced sleep and reset registers here.

use std::sync::Arc;

use vm_superio::Trigger;

use acpi_tables::{aml, Aml};

use super::le_value;
use crate::aml::name;
use crate::{BusDevice, VmControl, VmEvent};

/// Bit in the event selector for the ACPI power button (QEMU's
/// ACPI_GED_PWR_DOWN_EVT).
pub const GED_EVT_POWER_BUTTON: u32 = 1 << 1;

// Register offsets and values; the ACPI tables (boot/src/acpi.rs) point
// the FADT and DSDT at these, so they are the one definition of the layout.
pub const EVT_SEL: u64 = 0x0;
pub const EVT_SEL_LEN: u32 = 4;
pub const SLEEP_CTL: u64 = 0x200;
pub const SLEEP_STS: u64 = 0x201;
pub const RESET: u64 = 0x202;

pub const RESET_VALUE: u8 = 0x42;
pub const SLP_EN: u8 = 1 << 5;
/// The SLP_TYP the DSDT's `_S5_` names: (SLP_TYP_S5 << 2) | SLP_EN powers off.
pub const SLP_TYP_S5: u8 = 5;

pub struct Ged<T: Trigger> {
    irq: T,
    control: Arc<dyn VmControl>,
    pending: u32,
}

impl<T: Trigger> Ged<T> {
    pub fn new(irq: T, control: Arc<dyn VmControl>) -> Self {
        Ged { irq, control, pending: 0 }
    }

    /// Latches `events` and raises the GED interrupt.
    pub fn notify(&mut self, events: u32) -> Result<(), T::E> {
        self.pending |= events;
        self.irq.trigger()
    }
}

impl<T: Trigger + Send> BusDevice for Ged<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == EVT_SEL {
            let bytes = std::mem::take(&mut self.pending).to_le_bytes();
            let n = data.len().min(4);
            data[..n].copy_from_slice(&bytes[..n]);
        }
        // SLEEP_STS and everything else: 0 (no wake status, no other registers).
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let value = le_value(data) as u8;
        match offset {
            SLEEP_CTL if value & SLP_EN != 0 => {
                let typ = (value >> 2) & 0x7;
                if typ == SLP_TYP_S5 {
                    self.control.request(VmEvent::PowerOff);
                } else {
                    // Guest-triggerable: debug, so a guest cannot flood the log.
                    log::debug!("ACPI sleep type {typ} is not supported; ignored");
                }
            }
            RESET if value == RESET_VALUE => self.control.request(VmEvent::Reset),
            SLEEP_CTL | SLEEP_STS | RESET => {}
            _ => log::debug!("GED: write to unknown offset {offset:#x}"),
        }
    }
}

/// The GED, as QEMU's `build_ged_aml` with only the power-down event.
///
/// `_CRS` holds only the interrupt: Linux's GED driver (drivers/acpi/evged.c)
/// fails to probe on any other resource type. The selector register is
/// reached through the `EREG` operation region instead.
/// The GED and the power button it notifies, in the DSDT: the event
/// selector at `base` + `EVT_SEL`, the interrupt on `irq`.
pub fn aml(base: u64, irq: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let evt_sel = base + EVT_SEL;
    let selector = aml::Local(0);
    let pwr_down = GED_EVT_POWER_BUTTON;
    let selected = aml::And::new(&aml::ZERO, &selector, &pwr_down);
    aml::Device::new(
        "GED_".into(),
        vec![
            &name("_HID", &"ACPI0013"),
            &name("_UID", &"GED"),
            &name(
                "_CRS",
                &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                    true, true, false, false, irq,
                )]),
            ),
            &aml::OpRegion::new(
                "EREG".into(),
                aml::OpRegionSpace::SystemMemory,
                &evt_sel,
                &EVT_SEL_LEN,
            ),
            &aml::Field::new(
                "EREG".into(),
                aml::FieldAccessType::DWord,
                aml::FieldLockRule::NoLock,
                aml::FieldUpdateRule::WriteAsZeroes,
                vec![aml::FieldEntry::Named(*b"ESEL", 32)],
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![
                    // Reading ESEL clears it, so read it once.
                    &aml::Store::new(&selector, &aml::Path::new("ESEL")),
                    &aml::If::new(
                        &aml::Equal::new(&selected, &pwr_down),
                        vec![&aml::Notify::new(&aml::Path::new("PWRB"), &0x80u8)],
                    ),
                ],
            ),
        ],
    )
    .to_aml_bytes(&mut out);
    aml::Device::new("PWRB".into(), vec![&name("_HID", &"PNP0C0C"), &name("_UID", &0u8)])
        .to_aml_bytes(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::test_utils::{CountingTrigger, RecordingControl};

    fn ged() -> (Ged<CountingTrigger>, Arc<RecordingControl>) {
        let control = Arc::new(RecordingControl::default());
        (Ged::new(CountingTrigger::default(), control.clone()), control)
    }

    #[test]
    fn s5_powers_off_and_other_sleep_types_do_not() {
        let (mut g, control) = ged();
        g.write(SLEEP_CTL, &[(SLP_TYP_S5 << 2) | SLP_EN]);
        g.write(SLEEP_CTL, &[(3 << 2) | SLP_EN]);
        g.write(SLEEP_CTL, &[SLP_TYP_S5 << 2]); // SLP_EN clear: nothing
        assert_eq!(*control.0.lock().unwrap(), vec![VmEvent::PowerOff]);
    }

    #[test]
    fn reset_register_needs_the_reset_value() {
        let (mut g, control) = ged();
        g.write(RESET, &[0x41]);
        g.write(RESET, &[RESET_VALUE]);
        assert_eq!(*control.0.lock().unwrap(), vec![VmEvent::Reset]);
    }

    #[test]
    fn selector_latches_events_and_clears_on_read() {
        let (mut g, _) = ged();
        g.notify(GED_EVT_POWER_BUTTON).unwrap();
        assert_eq!(g.irq.0.get(), 1);
        let mut data = [0u8; 4];
        g.read(EVT_SEL, &mut data);
        assert_eq!(u32::from_le_bytes(data), GED_EVT_POWER_BUTTON);
        g.read(EVT_SEL, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0);
        let mut sts = [0xffu8];
        g.read(SLEEP_STS, &mut sts);
        assert_eq!(sts, [0]);
    }
}
