//! Event-loop subscriber that feeds standard input to the guest's UART.
//!
//! Bytes are offered only as fast as the guest drains its receive FIFO:
//! while input is pending, stdin is left unwatched, and the UART's
//! "FIFO empty" eventfd brings it back. A paste never overflows the FIFO.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};

use super::Serial;
use crate::legacy::EventFdTrigger;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

pub struct SerialInput {
    serial: Arc<Mutex<Serial<EventFdTrigger>>>,
    input_ready: EventFd,
    stdin: File,
    pending: Vec<u8>,
    watching_stdin: bool,
    stdin_closed: bool,
}

impl SerialInput {
    pub fn new(
        serial: Arc<Mutex<Serial<EventFdTrigger>>>,
        input_ready: EventFd,
    ) -> std::io::Result<Self> {
        let stdin = File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
        Ok(SerialInput {
            serial,
            input_ready,
            stdin,
            pending: Vec::new(),
            watching_stdin: false,
            stdin_closed: false,
        })
    }

    /// Offers pending bytes to the UART; returns true when all were taken.
    fn flush(&mut self) -> bool {
        if !self.pending.is_empty() {
            let n = self.serial.lock().unwrap_or_else(|e| e.into_inner()).enqueue(&self.pending);
            self.pending.drain(..n);
        }
        self.pending.is_empty()
    }

    fn watch_stdin(&mut self, ops: &mut EventOps, on: bool) {
        if on == self.watching_stdin {
            return;
        }
        let ev = Events::new(&self.stdin, EventSet::IN);
        let res = if on { ops.add(ev) } else { ops.remove(ev) };
        match res {
            Ok(()) => self.watching_stdin = on,
            // /dev/null and regular files cannot be polled: no input then.
            Err(e) => log::debug!("serial input: stdin not pollable: {e:?}"),
        }
    }

    fn read_stdin(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; 256];
        match self.stdin.read(&mut buf) {
            Ok(0) | Err(_) => {
                // EOF or a broken stdin: the guest keeps running without input.
                self.watch_stdin(ops, false);
                self.stdin_closed = true;
            }
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                if !self.flush() {
                    self.watch_stdin(ops, false);
                }
            }
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.input_ready, EventSet::IN)) {
            crate::warn_limited!("serial input: cannot watch the UART: {e:?}");
        }
        self.watch_stdin(ops, true);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.input_ready.as_raw_fd() {
            let _ = self.input_ready.read();
            if self.flush() && !self.stdin_closed {
                self.watch_stdin(ops, true);
            }
        } else if events.fd() == self.stdin.as_raw_fd() {
            if events.event_set().contains(EventSet::IN) {
                self.read_stdin(ops);
            } else {
                self.watch_stdin(ops, false);
                self.stdin_closed = true;
            }
        }
    }
}
