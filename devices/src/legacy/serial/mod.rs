//! The 16550A UART (vm-superio's model) as a bus device.
//!
//! Output goes straight to the writer it is given (unbuffered: a console must
//! show a prompt that has no newline yet). Input is pushed by the VMM's event
//! loop with `enqueue`; when the guest drains the receive FIFO, the
//! `input_ready` eventfd fires so the loop can resume reading its source
//! instead of busy-polling a full FIFO.

use std::io::Write;

use vm_superio::serial::SerialEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use acpi_tables::{aml, Aml};

use crate::aml::{isa_device, isa_irq};
use crate::BusDevice;

mod input;
pub use input::SerialInput;

struct InputEvents {
    input_ready: EventFd,
}

impl SerialEvents for InputEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // An eventfd counter only fails to overflow after 2^64 writes.
        let _ = self.input_ready.write(1);
    }
}

pub struct Serial<T: Trigger> {
    uart: vm_superio::Serial<T, InputEvents, Box<dyn Write + Send>>,
}

impl<T: Trigger> Serial<T> {
    /// `input_ready` is signalled whenever the receive FIFO becomes empty.
    pub fn new(irq: T, out: Box<dyn Write + Send>, input_ready: EventFd) -> Self {
        Serial { uart: vm_superio::Serial::with_events(irq, InputEvents { input_ready }, out) }
    }

    /// Free room in the receive FIFO.
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues guest input; returns how many bytes fit (the rest must be
    /// offered again after `input_ready`).
    pub fn enqueue(&mut self, input: &[u8]) -> usize {
        if input.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(e) => {
                crate::warn_limited!("serial: failed to queue input: {e:?}");
                0
            }
        }
    }
}

impl<T: Trigger + Send> BusDevice for Serial<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(off), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), Some(&value)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.uart.write(off, value) {
                // A broken console (closed stdout) must not stop the guest.
                log::debug!("serial: write failed: {e:?}");
            }
        }
    }
}

/// COM1 in the DSDT (PNP0501) at `port` with `irq`.
pub fn aml(port: u16, irq: u32) -> Vec<u8> {
    let hid = aml::EISAName::new("PNP0501");
    let names: [(&str, &dyn Aml); 3] = [("_HID", &hid), ("_UID", &1u8), ("_STA", &0xFu8)];
    isa_device("COM1", &names, vec![&aml::IO::new(port, port, 0, 8), &isa_irq(irq)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::test_utils::CountingTrigger;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const IER: u64 = 1;
    const LSR: u64 = 5;

    #[test]
    fn output_reaches_the_writer() {
        let out = SharedBuf::default();
        let ready = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(CountingTrigger::default(), Box::new(out.clone()), ready);
        for b in b"hi\r\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(*out.0.lock().unwrap(), b"hi\r\n");
    }

    #[test]
    fn input_raises_irq_and_signals_when_drained() {
        let ready = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(
            CountingTrigger::default(),
            Box::new(std::io::sink()),
            ready.try_clone().unwrap(),
        );
        s.write(IER, &[0x01]); // receive-data-available interrupt on
        assert_eq!(s.enqueue(b"ab"), 2);
        assert_eq!(s.uart.interrupt_evt().0.get(), 1);
        let mut lsr = [0u8];
        s.read(LSR, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b, [b'a']);
        assert!(ready.read().is_err(), "not drained yet");
        s.read(0, &mut b);
        assert_eq!(b, [b'b']);
        assert_eq!(ready.read().unwrap(), 1);
    }

    #[test]
    fn full_fifo_takes_nothing() {
        let ready = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(CountingTrigger::default(), Box::new(std::io::sink()), ready);
        let big = vec![b'x'; 1000];
        let n = s.enqueue(&big);
        assert!(n > 0 && n < big.len());
        assert_eq!(s.fifo_capacity(), 0);
        assert_eq!(s.enqueue(&big), 0);
        assert_eq!(s.enqueue(&[]), 0);
    }
}
