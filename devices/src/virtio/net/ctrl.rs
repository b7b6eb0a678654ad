//! The control queue (VIRTIO_NET_F_CTRL_VQ): how many queue pairs the
//! driver uses, its MAC address and receive filters.
//!
//! skiff filters nothing (the tap delivers what the host's bridge or
//! macvtap sends it, as QEMU does with a tap in promiscuous mode), so the
//! receive-mode and MAC-table commands are acknowledged. The queue-pair
//! count is honoured: the tap's unused queues are detached, so the host
//! steers no frames to a queue nobody reads.

use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX, VIRTIO_NET_ERR,
    VIRTIO_NET_OK,
};
use virtio_queue::DescriptorChain;
use vm_memory::Bytes;

use super::tap::Tap;
use crate::virtio::chain::Chain;
use crate::virtio::worker::{Budget, Handler, Outcome, Request, Ring};
use crate::virtio::GuestMemoryMmap;

/// The longest command read: a MAC table of a few hundred entries.
const MAX_COMMAND: usize = 8192;

pub struct CtrlQueue {
    pub(super) ring: Ring,
    pub(super) state: CtrlState,
}

/// What the commands act on.
pub struct CtrlState {
    /// One per queue pair.
    pub taps: Vec<Arc<Tap>>,
    /// The config space's `mac`, which MAC_ADDR_SET changes.
    pub mac: Arc<Mutex<[u8; 6]>>,
    /// VIRTIO_NET_F_MQ was negotiated.
    pub mq: bool,
}

impl CtrlState {
    /// Carries out one command (class, command, data); true for OK.
    pub fn command(&self, class: u8, cmd: u8, data: &[u8]) -> bool {
        match (u32::from(class), u32::from(cmd)) {
            (VIRTIO_NET_CTRL_RX, _) => data.len() == 1,
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) => true,
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET) => {
                let Ok(mac) = <[u8; 6]>::try_from(data) else { return false };
                *self.mac.lock().unwrap_or_else(|e| e.into_inner()) = mac;
                true
            }
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) if self.mq => {
                let Ok(n) = <[u8; 2]>::try_from(data).map(u16::from_le_bytes) else {
                    return false;
                };
                let n = usize::from(n);
                if n == 0 || n > self.taps.len() {
                    return false;
                }
                self.use_pairs(n)
            }
            _ => false,
        }
    }

    /// Attaches the taps of the first `n` pairs and detaches the rest.
    pub fn use_pairs(&self, n: usize) -> bool {
        let mut ok = true;
        for (i, tap) in self.taps.iter().enumerate() {
            if let Err(e) = tap.set_queue_enabled(i < n) {
                crate::error_limited!("virtio-net: {}: {e}", tap.name());
                ok = false;
            }
        }
        ok
    }
}

impl Request for CtrlState {
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Outcome {
        let max = MAX_COMMAND;
        let Ok(chain) = Chain::read(mem, chain, 64) else { return Outcome::Used(0) };
        // The command: every readable byte, in order.
        let mut command = Vec::new();
        for d in chain.descriptors.iter().filter(|d| !d.is_write_only()) {
            let len = (d.len() as usize).min(max.saturating_sub(command.len()));
            let at = command.len();
            command.resize(at + len, 0);
            if mem.read_slice(&mut command[at..], d.addr()).is_err() {
                return Outcome::Used(0);
            }
        }
        // The ack: the first writable byte.
        let Some(ack) = chain.writable().find(|d| d.len() >= 1) else { return Outcome::Used(0) };
        let ok = match command.as_slice() {
            [class, cmd, data @ ..] => self.command(*class, *cmd, data),
            _ => false,
        };
        let status = if ok { VIRTIO_NET_OK } else { VIRTIO_NET_ERR } as u8;
        if mem.write_obj(status, ack.addr()).is_err() {
            return Outcome::Used(0);
        }
        Outcome::Used(1)
    }
}

impl MutEventSubscriber for CtrlQueue {
    fn init(&mut self, ops: &mut EventOps) {
        self.ring.init(ops, "virtio-net-ctrl");
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if self.ring.take_event(&events) {
            self.ring.serve(Budget { requests: 16 }, &mut self.state);
        }
    }
}

impl Handler for CtrlQueue {}
