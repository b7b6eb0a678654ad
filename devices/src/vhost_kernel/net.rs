//! vhost-net: the host kernel moves a virtio-net queue pair's frames
//! between the guest's rings and the tap (`-netdev tap,vhost=on`).
//!
//! One /dev/vhost-net instance per queue pair, opened before the sandbox
//! and kept for the life of the process (a guest reboot hands each the new
//! run's RAM). The virtio-net device (`virtio::net`) keeps the config
//! space and the control queue and starts these at DRIVER_OK.

use vhost::net::VhostNet as _;
use vhost::vhost_kern::net::Net;
use vhost::VhostBackend;
use vm_memory::GuestMemoryAtomic;

use super::{memory_table, set_vring, Failed};
use crate::virtio::net::tap::Tap;
use crate::virtio::{ActiveQueue, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum VhostNetError {
    #[error("cannot open /dev/vhost-net (is the vhost_net module loaded?)")]
    Open(#[source] vhost::Error),
    #[error("/dev/vhost-net: {0} failed")]
    Request(&'static str, #[source] vhost::Error),
}

impl From<Failed> for VhostNetError {
    fn from((what, e): Failed) -> Self {
        VhostNetError::Request(what, e)
    }
}

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// The kernel's vhost-net instances, one per queue pair.
pub struct VhostNetBackend {
    pairs: Vec<Net<Memory>>,
    mem: Memory,
    features: u64,
}

/// The kernel's rings of one instance: receive, transmit.
const RX: usize = 0;
const TX: usize = 1;

impl VhostNetBackend {
    pub fn open(pairs: usize) -> Result<Self, VhostNetError> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut nets = Vec::with_capacity(pairs);
        let mut features = u64::MAX;
        for _ in 0..pairs {
            let net = Net::new(mem.clone()).map_err(VhostNetError::Open)?;
            net.set_owner().map_err(|e| VhostNetError::Request("VHOST_SET_OWNER", e))?;
            features &=
                net.get_features().map_err(|e| VhostNetError::Request("VHOST_GET_FEATURES", e))?;
            nets.push(net);
        }
        Ok(VhostNetBackend { pairs: nets, mem, features })
    }

    /// The feature bits the kernel handles (ring layout, notification
    /// suppression, mergeable receive buffers, VERSION_1).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The run's guest RAM, which the kernel translates addresses by.
    pub fn attach(&self, mem: &GuestMemoryMmap) {
        if let Ok(guard) = self.mem.lock() {
            guard.replace(mem.clone());
        }
    }

    /// Lets go of the run's RAM before it is unmapped; stops every pair
    /// first (idempotent), so the kernel touches none of it afterwards.
    pub fn detach(&self) {
        for pair in 0..self.pairs.len() {
            self.stop(pair);
        }
        if let Ok(guard) = self.mem.lock() {
            guard.replace(GuestMemoryMmap::new());
        }
    }

    /// Starts pair `pair` on the driver's receive and transmit queues and
    /// its tap queue, with the driver's features as far as the kernel
    /// handles them.
    pub fn start(
        &self,
        pair: usize,
        driver_features: u64,
        mem: &GuestMemoryMmap,
        (rx, tx): (&ActiveQueue, &ActiveQueue),
        tap: &Tap,
    ) -> Result<(), VhostNetError> {
        let Some(v) = self.pairs.get(pair) else {
            return Err(VhostNetError::Request("queue pair", vhost::Error::InvalidQueue));
        };
        v.set_features(driver_features & self.features)
            .map_err(|e| VhostNetError::Request("VHOST_SET_FEATURES", e))?;
        v.set_mem_table(&memory_table(mem))
            .map_err(|e| VhostNetError::Request("VHOST_SET_MEM_TABLE", e))?;
        set_vring(v, RX, rx)?;
        set_vring(v, TX, tx)?;
        for ring in [RX, TX] {
            v.set_backend(ring, Some(tap.file()))
                .map_err(|e| VhostNetError::Request("VHOST_NET_SET_BACKEND", e))?;
        }
        Ok(())
    }

    /// Stops pair `pair`: the kernel lets go of the tap and the rings.
    pub fn stop(&self, pair: usize) {
        let Some(v) = self.pairs.get(pair) else { return };
        for ring in [RX, TX] {
            // Fails harmlessly on a pair that never started.
            let _ = v.set_backend(ring, None);
            let _ = v.get_vring_base(ring);
        }
    }
}
