//! The i8042 PS/2 controller with an AT keyboard on its first port.
//!
//! vm-superio's `I8042Device` answers only the reset command and reads 0,
//! which makes Linux's i8042 and atkbd drivers wait out their timeouts at
//! boot (a port exit per poll) and leaves nowhere to put key events. This
//! model answers every command Linux sends during probe, so nothing waits:
//! controller self test, the command byte, the output port (bit 0 clear =
//! CPU reset, as on a PC), and the keyboard's ACK/ID/BAT replies. There is no
//! AUX (mouse) port: its tests fail at once with "clock line stuck", so the
//! driver gives up on it without a timeout.
//!
//! Ports: 0x60 is offset 0 (data), 0x64 is offset 4 (status/command).

use std::collections::VecDeque;
use std::sync::Arc;

use vm_superio::Trigger;

use acpi_tables::{aml, Aml};

use crate::aml::{isa_device, isa_irq};
use crate::{BusDevice, VmControl, VmEvent};

const DATA: u64 = 0;
const COMMAND: u64 = 4;

// Status register.
const STS_OBF: u8 = 0x01;
const STS_SYS: u8 = 0x04;
const STS_CMD: u8 = 0x08;
const STS_UNLOCKED: u8 = 0x10;

// Command byte (CTR).
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

// Controller commands (written to 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_INPUT_PORT: u8 = 0xc0;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUTBUF: u8 = 0xd2;
const CMD_WRITE_AUX_OUTBUF: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_PULSE_RESET: u8 = 0xfe;

// Keyboard commands (written to 0x60) and replies.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_GET_ID: u8 = 0xf2;
const KBD_SET_REPEAT: u8 = 0xf3;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_BAT_OK: u8 = 0xaa;
/// MF2 keyboard, translated ID.
const KBD_ID: [u8; 2] = [0xab, 0x83];

/// Reply to the AUX port test: "clock line stuck low", i.e. no AUX port.
const AUX_TEST_NO_PORT: u8 = 0x01;
/// Output port: bit 0 is the CPU reset line (active low), bit 1 the A20 gate.
const OUTPUT_PORT_DEFAULT: u8 = 0x03;

/// What a byte written to the data port means, set by the previous command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataTarget {
    Keyboard,
    Ctr,
    OutputPort,
    KbdOutbuf,
    AuxOutbuf,
    Aux,
    /// The parameter of a keyboard command that takes one (LEDs, rate, set).
    KeyboardParam(u8),
}

pub struct I8042<T: Trigger> {
    irq: T,
    control: Arc<dyn VmControl>,
    ctr: u8,
    status: u8,
    output_port: u8,
    target: DataTarget,
    /// Bytes waiting to be read from the data port, oldest first.
    outbuf: VecDeque<u8>,
    scancode_set: u8,
}

impl<T: Trigger> I8042<T> {
    /// `irq` is the keyboard line (ISA IRQ 1); resets go to `control`.
    pub fn new(irq: T, control: Arc<dyn VmControl>) -> Self {
        I8042 {
            irq,
            control,
            ctr: CTR_KBD_INT | CTR_SYS | CTR_AUX_DISABLE | CTR_XLATE,
            status: STS_SYS | STS_UNLOCKED,
            output_port: OUTPUT_PORT_DEFAULT,
            target: DataTarget::Keyboard,
            outbuf: VecDeque::new(),
            scancode_set: 2,
        }
    }

    /// Queues bytes as if the keyboard had sent them (scan codes, already in
    /// the set the guest sees) and raises IRQ 1 if the guest enabled it.
    pub fn push_keyboard_bytes(&mut self, bytes: &[u8]) {
        if self.ctr & CTR_KBD_DISABLE != 0 {
            // Keyboard clock disabled by the guest: a real keyboard would
            // buffer, we drop, as QEMU does while the port is disabled.
            return;
        }
        for &b in bytes {
            self.push(b);
        }
    }

    /// Whether the guest asked for set-2 → set-1 translation (it does by default).
    pub fn translating(&self) -> bool {
        self.ctr & CTR_XLATE != 0
    }

    fn push(&mut self, byte: u8) {
        // A real controller holds 1 byte and the keyboard buffers ~16; bound
        // the queue likewise so a flood of key events cannot grow it.
        if self.outbuf.len() >= 16 {
            return;
        }
        self.outbuf.push_back(byte);
        if self.outbuf.len() == 1 {
            self.raise_irq();
        }
    }

    fn raise_irq(&self) {
        if self.ctr & CTR_KBD_INT != 0 {
            if let Err(e) = self.irq.trigger() {
                crate::warn_limited!("i8042: failed to raise IRQ 1: {e:?}");
            }
        }
    }

    fn status(&self) -> u8 {
        let mut s = self.status;
        if !self.outbuf.is_empty() {
            s |= STS_OBF;
        }
        s
    }

    fn command(&mut self, cmd: u8) {
        self.status |= STS_CMD;
        self.target = DataTarget::Keyboard;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr),
            CMD_WRITE_CTR => self.target = DataTarget::Ctr,
            CMD_AUX_DISABLE | CMD_AUX_ENABLE | CMD_KBD_DISABLE | CMD_KBD_ENABLE => {
                let bit = if matches!(cmd, CMD_AUX_DISABLE | CMD_AUX_ENABLE) {
                    CTR_AUX_DISABLE
                } else {
                    CTR_KBD_DISABLE
                };
                if matches!(cmd, CMD_AUX_DISABLE | CMD_KBD_DISABLE) {
                    self.ctr |= bit;
                } else {
                    self.ctr &= !bit;
                }
            }
            CMD_AUX_TEST => self.push(AUX_TEST_NO_PORT),
            CMD_SELF_TEST => {
                self.status |= STS_SYS;
                self.push(0x55);
            }
            CMD_KBD_TEST => self.push(0x00),
            CMD_READ_INPUT_PORT => self.push(0x80), // keyboard not inhibited
            CMD_READ_OUTPUT_PORT => self.push(self.output_port),
            CMD_WRITE_OUTPUT_PORT => self.target = DataTarget::OutputPort,
            CMD_WRITE_KBD_OUTBUF => self.target = DataTarget::KbdOutbuf,
            CMD_WRITE_AUX_OUTBUF => self.target = DataTarget::AuxOutbuf,
            CMD_WRITE_AUX => self.target = DataTarget::Aux,
            CMD_PULSE_RESET => self.control.request(VmEvent::Reset),
            // 0xF0-0xFF pulse output lines; only 0xFE (bit 0, reset) matters.
            0xf0..=0xff => {}
            _ => log::debug!("i8042: unhandled controller command {cmd:#x}"),
        }
    }

    fn data(&mut self, value: u8) {
        self.status &= !STS_CMD;
        let target = std::mem::replace(&mut self.target, DataTarget::Keyboard);
        match target {
            DataTarget::Ctr => {
                self.ctr = value;
                // The SYS flag in the status mirrors the one in the CTR.
                self.status = (self.status & !STS_SYS) | (value & CTR_SYS);
            }
            DataTarget::OutputPort => {
                self.output_port = value;
                if value & 0x01 == 0 {
                    self.control.request(VmEvent::Reset);
                }
            }
            DataTarget::KbdOutbuf => self.push(value),
            // No AUX port: a loop-back byte comes back as keyboard data,
            // which Linux reads as "no AUX port here" without waiting.
            DataTarget::AuxOutbuf => self.push(value),
            DataTarget::Aux => {}
            DataTarget::KeyboardParam(cmd) => {
                if cmd == KBD_SCANCODE_SET && value == 0 {
                    self.push(KBD_ACK);
                    self.push(self.scancode_set);
                } else {
                    if cmd == KBD_SCANCODE_SET && (1..=3).contains(&value) {
                        self.scancode_set = value;
                    }
                    self.push(KBD_ACK);
                }
            }
            DataTarget::Keyboard => self.keyboard_command(value),
        }
    }

    fn keyboard_command(&mut self, cmd: u8) {
        match cmd {
            KBD_SET_LEDS | KBD_SET_REPEAT | KBD_SCANCODE_SET => {
                self.target = DataTarget::KeyboardParam(cmd);
                self.push(KBD_ACK);
            }
            KBD_ECHO => self.push(KBD_ECHO),
            KBD_GET_ID => {
                self.push(KBD_ACK);
                KBD_ID.iter().for_each(|&b| self.push(b));
            }
            KBD_RESET => {
                self.scancode_set = 2;
                self.push(KBD_ACK);
                self.push(KBD_BAT_OK);
            }
            // Enable, disable, set defaults, typematic modes...: acknowledge.
            _ => self.push(KBD_ACK),
        }
    }
}

impl<T: Trigger + Send> BusDevice for I8042<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = match offset {
            DATA => {
                let v = self.outbuf.pop_front().unwrap_or(0);
                // Each byte is its own interrupt, as with a real controller.
                if !self.outbuf.is_empty() {
                    self.raise_irq();
                }
                v
            }
            COMMAND => self.status(),
            _ => 0xff,
        };
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            DATA => self.data(value),
            COMMAND => self.command(value),
            _ => {}
        }
    }
}

/// The keyboard controller in the DSDT (PNP0303) at `port` and `port + 4`.
pub fn aml(port: u16, irq: u32) -> Vec<u8> {
    let hid = aml::EISAName::new("PNP0303");
    let names: [(&str, &dyn Aml); 2] = [("_HID", &hid), ("_STA", &0xFu8)];
    let (data, command) = (aml::IO::new(port, port, 1, 1), aml::IO::new(port + 4, port + 4, 1, 1));
    isa_device("KBD_", &names, vec![&data, &command, &isa_irq(irq)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::test_utils::{CountingTrigger, RecordingControl};

    fn dev() -> (I8042<CountingTrigger>, Arc<RecordingControl>) {
        let control = Arc::new(RecordingControl::default());
        (I8042::new(CountingTrigger::default(), control.clone()), control)
    }

    fn read(d: &mut I8042<CountingTrigger>, offset: u64) -> u8 {
        let mut b = [0u8];
        d.read(offset, &mut b);
        b[0]
    }

    /// Reads everything the controller has for the guest.
    fn drain(d: &mut I8042<CountingTrigger>) -> Vec<u8> {
        let mut out = vec![];
        while read(d, COMMAND) & STS_OBF != 0 {
            out.push(read(d, DATA));
        }
        out
    }

    #[test]
    fn reset_by_pulse_and_by_output_port() {
        let (mut d, control) = dev();
        d.write(COMMAND, &[CMD_PULSE_RESET]);
        d.write(COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        d.write(DATA, &[0x02]);
        d.write(COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        d.write(DATA, &[0x03]); // reset line high: no reset
        assert_eq!(*control.0.lock().unwrap(), vec![VmEvent::Reset, VmEvent::Reset]);
    }

    #[test]
    fn linux_probe_sequence_gets_answers() {
        let (mut d, control) = dev();
        assert_eq!(drain(&mut d), Vec::<u8>::new());
        d.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(drain(&mut d), vec![0x55]);
        d.write(COMMAND, &[CMD_READ_CTR]);
        let ctr = drain(&mut d);
        assert_eq!(ctr, vec![CTR_KBD_INT | CTR_SYS | CTR_AUX_DISABLE | CTR_XLATE]);
        d.write(COMMAND, &[CMD_WRITE_CTR]);
        d.write(DATA, &[0x65]);
        d.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(drain(&mut d), vec![0x65]);
        // No AUX port.
        d.write(COMMAND, &[CMD_AUX_TEST]);
        assert_eq!(drain(&mut d), vec![AUX_TEST_NO_PORT]);
        // atkbd: get ID, set scan code set, query it, LEDs.
        d.write(DATA, &[KBD_GET_ID]);
        assert_eq!(drain(&mut d), vec![KBD_ACK, 0xab, 0x83]);
        d.write(DATA, &[KBD_SCANCODE_SET]);
        d.write(DATA, &[2]);
        d.write(DATA, &[KBD_SCANCODE_SET]);
        d.write(DATA, &[0]);
        // F0 02 → ACK ACK; F0 00 → ACK ACK 02.
        assert_eq!(drain(&mut d), vec![KBD_ACK, KBD_ACK, KBD_ACK, KBD_ACK, 2]);
        d.write(DATA, &[KBD_SET_LEDS]);
        d.write(DATA, &[0x07]);
        d.write(DATA, &[KBD_RESET]);
        assert_eq!(drain(&mut d), vec![KBD_ACK, KBD_ACK, KBD_ACK, KBD_BAT_OK]);
        assert!(control.0.lock().unwrap().is_empty());
    }

    #[test]
    fn keyboard_bytes_interrupt_once_per_byte_when_enabled() {
        let (mut d, _) = dev();
        d.push_keyboard_bytes(&[0x1d, 0x38]);
        assert_eq!(d.irq.0.get(), 1);
        assert_eq!(read(&mut d, DATA), 0x1d);
        assert_eq!(d.irq.0.get(), 2);
        assert_eq!(read(&mut d, DATA), 0x38);
        assert_eq!(d.irq.0.get(), 2);

        // Interrupt disabled in the CTR: data still arrives, no IRQ.
        d.write(COMMAND, &[CMD_WRITE_CTR]);
        d.write(DATA, &[CTR_SYS]);
        d.push_keyboard_bytes(&[0x53]);
        assert_eq!(d.irq.0.get(), 2);
        assert_eq!(drain(&mut d), vec![0x53]);
    }

    #[test]
    fn disabled_keyboard_drops_and_queue_is_bounded() {
        let (mut d, _) = dev();
        d.write(COMMAND, &[CMD_KBD_DISABLE]);
        d.push_keyboard_bytes(&[1, 2, 3]);
        assert!(drain(&mut d).is_empty());
        d.write(COMMAND, &[CMD_KBD_ENABLE]);
        d.push_keyboard_bytes(&[0u8; 100]);
        assert_eq!(drain(&mut d).len(), 16);
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let (mut d, _) = dev();
        d.write(2, &[0xff]);
        d.write(DATA, &[]);
        let mut wide = [0xaau8; 4];
        d.read(COMMAND, &mut wide);
        assert_eq!(&wide[1..], &[0, 0, 0]);
        assert_eq!(read(&mut d, 3), 0xff);
    }
}
