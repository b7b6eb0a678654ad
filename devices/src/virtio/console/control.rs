//! The multiport control queues: 8-byte messages (`struct
//! virtio_console_control`: port id, event, value) from the driver on
//! queue 3, and to it on queue 2 (a port's name follows its header).

use std::collections::VecDeque;

use event_manager::{EventOps, Events};
use virtio_queue::DescriptorChain;

use super::{Ring, CONTROL_QUEUE_SIZE, MAX_PORTS, REQUESTS_PER_WAKEUP};
use crate::virtio::chain::{Chain, ChainReader};
use crate::virtio::worker::{Budget, Outcome, Request};
use crate::virtio::GuestMemoryMmap;

// The events (virtio 1.2, 5.3.6.2).
const DEVICE_READY: u16 = 0;
const DEVICE_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const CONSOLE_PORT: u16 = 4;
const PORT_OPEN: u16 = 6;
const PORT_NAME: u16 = 7;

/// Messages to the driver that may wait for its buffers. Each port causes
/// a handful (add, console, name, open); a host end that connects and
/// disconnects over and over adds one each time, so the oldest go first.
const MAX_PENDING: usize = 4 * (MAX_PORTS as usize + 1) + 64;

/// The longest port name sent (QEMU's names are strings of any length;
/// Linux reads what fits its buffer, a page).
const MAX_NAME: usize = 256;

/// What the driver says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Message {
    DeviceReady { ok: bool },
    PortReady { id: u32, ok: bool },
    PortOpen { id: u32, open: bool },
}

pub(super) fn header(id: u32, event: u16, value: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(8);
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m
}

pub(super) fn device_add(id: u32) -> Vec<u8> {
    header(id, DEVICE_ADD, 1)
}

pub(super) fn console_port(id: u32) -> Vec<u8> {
    header(id, CONSOLE_PORT, 1)
}

pub(super) fn port_open(id: u32, open: bool) -> Vec<u8> {
    header(id, PORT_OPEN, u16::from(open))
}

/// PORT_NAME: the header and the name, NUL-terminated (Linux copies up to
/// the buffer's length and terminates it itself).
pub(super) fn port_name(id: u32, name: &str) -> Vec<u8> {
    let mut m = header(id, PORT_NAME, 1);
    let bytes = name.as_bytes();
    m.extend_from_slice(&bytes[..bytes.len().min(MAX_NAME)]);
    m.push(0);
    m
}

/// Parses one message from the driver; None for one skiff ignores (an
/// event the driver does not send, or too short).
pub(super) fn parse(bytes: &[u8]) -> Option<Message> {
    let b: &[u8; 8] = bytes.get(..8)?.try_into().ok()?;
    let id = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let event = u16::from_le_bytes([b[4], b[5]]);
    let value = u16::from_le_bytes([b[6], b[7]]) != 0;
    match event {
        DEVICE_READY => Some(Message::DeviceReady { ok: value }),
        PORT_READY => Some(Message::PortReady { id, ok: value }),
        PORT_OPEN => Some(Message::PortOpen { id, open: value }),
        _ => None,
    }
}

pub(super) struct Control {
    /// To the driver (queue 2).
    rx: Ring,
    /// From the driver (queue 3).
    tx: Ring,
    pending: VecDeque<Vec<u8>>,
}

impl Control {
    pub(super) fn new(rx: Ring, tx: Ring) -> Self {
        Control { rx, tx, pending: VecDeque::new() }
    }

    pub(super) fn init(&self, ops: &mut EventOps) {
        self.rx.init(ops, super::FAMILY);
        self.tx.init(ops, super::FAMILY);
    }

    /// Consumes a kick or re-arm of either queue.
    pub(super) fn take_event(&self, events: &Events) -> bool {
        self.rx.take_event(events) || self.tx.take_event(events)
    }

    /// The driver's messages (a wakeup's worth).
    pub(super) fn receive(&mut self) -> Vec<Message> {
        let mut got = Receive(Vec::new());
        self.tx.serve(Budget { requests: REQUESTS_PER_WAKEUP }, &mut got);
        got.0
    }

    pub(super) fn queue(&mut self, message: Vec<u8>) {
        if self.pending.len() == MAX_PENDING {
            crate::warn_limited!("virtio-serial: the driver takes no control messages");
            self.pending.pop_front();
        }
        self.pending.push_back(message);
    }

    /// Sends what waits, as far as the driver's buffers go.
    pub(super) fn send_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut send = Send(&mut self.pending);
        self.rx.serve(Budget { requests: REQUESTS_PER_WAKEUP }, &mut send);
    }
}

struct Receive(Vec<Message>);

impl Request for Receive {
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Outcome {
        use std::io::Read;
        let mut bytes = [0u8; 8];
        let read = Chain::read(mem, chain, usize::from(CONTROL_QUEUE_SIZE))
            .map_err(std::io::Error::other)
            .and_then(|c| ChainReader::new(mem, &c).read_exact(&mut bytes));
        match read {
            Ok(()) => self.0.extend(parse(&bytes)),
            Err(e) => log::debug!("virtio-serial: control message: {e}"),
        }
        Outcome::Used(0)
    }
}

struct Send<'a>(&'a mut VecDeque<Vec<u8>>);

impl Request for Send<'_> {
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Outcome {
        let Some(message) = self.0.front() else { return Outcome::HoldBack };
        let n = match Chain::read(mem, chain, usize::from(CONTROL_QUEUE_SIZE)) {
            Ok(c) => c.write_from(mem, message),
            Err(e) => {
                log::debug!("virtio-serial: control buffer: {e}");
                // The message waits for a good buffer.
                return Outcome::Used(0);
            }
        };
        self.0.pop_front();
        Outcome::Used(n as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_both_ways() {
        assert_eq!(device_add(3), [3, 0, 0, 0, 1, 0, 1, 0]);
        assert_eq!(port_open(1, false), [1, 0, 0, 0, 6, 0, 0, 0]);
        assert_eq!(port_name(2, "org.qemu.guest_agent.0")[8..], *b"org.qemu.guest_agent.0\0");
        assert_eq!(port_name(2, &"x".repeat(1000)).len(), 8 + MAX_NAME + 1);
        assert_eq!(parse(&[0, 0, 0, 0, 0, 0, 1, 0]), Some(Message::DeviceReady { ok: true }));
        assert_eq!(parse(&[5, 0, 0, 0, 3, 0, 1, 0]), Some(Message::PortReady { id: 5, ok: true }));
        assert_eq!(
            parse(&[5, 0, 0, 0, 6, 0, 0, 0]),
            Some(Message::PortOpen { id: 5, open: false })
        );
        assert_eq!(parse(&[5, 0, 0, 0, 1, 0, 1, 0]), None, "DEVICE_ADD is the device's to send");
        assert_eq!(parse(&[5, 0, 0]), None);
    }
}
