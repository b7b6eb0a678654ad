//! vhost-vsock: virtio-vsock (device type 19) served by the host kernel's
//! vhost_vsock.
//!
//! The host side (`VsockBackend`) belongs to the process: /dev/vhost-vsock
//! is opened once, before the sandbox, and holds the guest's CID for as long
//! as skiff runs, so a guest reboot keeps it and nobody else can take it in
//! between. Each run gives it that run's RAM (`attach`). The device hands
//! the kernel the rx and tx queues; the event queue (transport resets, which
//! skiff never sends) stays with the driver's buffers in it.

use std::sync::Arc;

use vhost::vhost_kern::vsock::Vsock;
use vhost::vsock::VhostVsock as _;
use vhost::VhostBackend;
use vm_memory::GuestMemoryAtomic;

use crate::virtio::{
    ActivateError, ActivationContext, ActiveQueue, GuestMemoryMmap, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// virtio-vsock's device ID.
pub const DEVICE_TYPE: u32 = 19;
/// rx, tx, event; QEMU's size for each.
const QUEUE_SIZES: &[u16] = &[128, 128, 128];
/// The queues the kernel serves: rx and tx.
const KERNEL_QUEUES: usize = 2;

/// What the transport can carry, as QEMU's vhost-vsock passes it on:
/// split rings, indirect descriptors, notification suppression and
/// SOCK_SEQPACKET.
const PASSED_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_EVENT_IDX
    | 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC
    | 1 << VIRTIO_VSOCK_F_SEQPACKET;
const VIRTIO_VSOCK_F_SEQPACKET: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("cannot open /dev/vhost-vsock (is the vhost_vsock module loaded?)")]
    Open(#[source] vhost::Error),
    #[error("guest CID {0} is already in use")]
    CidInUse(u32),
    #[error("/dev/vhost-vsock: {0} failed")]
    Request(&'static str, #[source] vhost::Error),
}

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// The kernel's vhost-vsock instance and the guest CID it holds.
pub struct VsockBackend {
    vsock: Vsock<Memory>,
    mem: Memory,
    cid: u32,
    features: u64,
}

impl VsockBackend {
    /// Opens /dev/vhost-vsock and claims `cid` for the life of the process.
    pub fn open(cid: u32) -> Result<Self, VsockError> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let vsock = Vsock::new(mem.clone()).map_err(VsockError::Open)?;
        vsock.set_owner().map_err(|e| VsockError::Request("VHOST_SET_OWNER", e))?;
        vsock.set_guest_cid(u64::from(cid)).map_err(|e| match e {
            vhost::Error::IoctlError(ref io) if io.raw_os_error() == Some(libc::EADDRINUSE) => {
                VsockError::CidInUse(cid)
            }
            e => VsockError::Request("VHOST_VSOCK_SET_GUEST_CID", e),
        })?;
        let features =
            vsock.get_features().map_err(|e| VsockError::Request("VHOST_GET_FEATURES", e))?;
        Ok(VsockBackend { vsock, mem, cid, features })
    }

    /// The run's guest RAM, which the kernel translates ring addresses by.
    pub fn attach(&self, mem: &GuestMemoryMmap) {
        if let Ok(guard) = self.mem.lock() {
            guard.replace(mem.clone());
        }
    }

    /// Lets go of the run's RAM before it is unmapped. The device stops
    /// the kernel when it goes; stopping again here (idempotent) keeps the
    /// kernel off that RAM even if something still held the device.
    pub fn detach(&self) {
        let _ = self.vsock.stop();
        for index in 0..KERNEL_QUEUES {
            let _ = self.vsock.get_vring_base(index);
        }
        if let Ok(guard) = self.mem.lock() {
            guard.replace(GuestMemoryMmap::new());
        }
    }
}

pub struct VhostVsock {
    backend: Arc<VsockBackend>,
    acked_features: u64,
    /// While started: the queues (the kernel holds duplicates of the rx
    /// and tx eventfds; the event queue is only kept).
    active: Option<Vec<ActiveQueue>>,
}

impl VhostVsock {
    pub fn new(backend: Arc<VsockBackend>) -> Self {
        VhostVsock { backend, acked_features: 0, active: None }
    }

    fn start(&self, mem: &GuestMemoryMmap, queues: &[ActiveQueue]) -> Result<(), VsockError> {
        let v = &self.backend.vsock;
        let failed = |what| move |e| VsockError::Request(what, e);
        v.set_features(self.acked_features).map_err(failed("VHOST_SET_FEATURES"))?;
        v.set_mem_table(&super::memory_table(mem)).map_err(failed("VHOST_SET_MEM_TABLE"))?;
        for q in queues.iter().filter(|q| q.index < KERNEL_QUEUES) {
            super::set_vring(v, q.index, q).map_err(|(what, e)| VsockError::Request(what, e))?;
        }
        v.start().map_err(failed("VHOST_VSOCK_SET_RUNNING"))
    }

    fn stop(&mut self) {
        let Some(queues) = self.active.take() else { return };
        let v = &self.backend.vsock;
        let mut result = v.stop().map_err(|e| VsockError::Request("VHOST_VSOCK_SET_RUNNING", e));
        for q in queues.iter().filter(|q| q.index < KERNEL_QUEUES) {
            result = result.and(
                v.get_vring_base(q.index)
                    .map(drop)
                    .map_err(|e| VsockError::Request("VHOST_GET_VRING_BASE", e)),
            );
        }
        if let Err(e) = result {
            crate::error_limited!("vhost-vsock: stopping: {e}");
        }
    }
}

impl VirtioDevice for VhostVsock {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        self.backend.features & PASSED_FEATURES
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    /// `guest_cid`, a little-endian u64.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_from(&u64::from(self.backend.cid).to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn calls_from_outside(&self) -> bool {
        true
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        for index in 0..KERNEL_QUEUES {
            if !ctx.queues.iter().any(|q| q.index == index) {
                return Err(ActivateError::MissingQueue(index));
            }
        }
        if let Err(e) = self.start(&ctx.mem, &ctx.queues) {
            // Whatever was started goes back to idle.
            self.active = Some(ctx.queues);
            self.stop();
            return Err(ActivateError::Backend(Box::new(e)));
        }
        self.active = Some(ctx.queues);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop();
        self.acked_features = 0;
        true
    }
}

impl Drop for VhostVsock {
    /// The run is over: the kernel stops using its queues before its RAM goes.
    fn drop(&mut self) {
        self.stop();
    }
}
/// One input of `fuzz_vsock_config` (also a libFuzzer target): the
/// guest reads the config space (its CID) at any offset and width, as the
/// device answers it; what lies inside reads as the CID's bytes, the rest
/// as zeros.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn fuzz_config(rng: &mut skiff_tests::fuzz::Rng) {
    let cid = rng.interesting();
    let config = cid.to_le_bytes();
    let offset = if rng.one_in(2) { rng.below(16) } else { rng.interesting() };
    let mut data = vec![0xa5u8; rng.index(16)];
    crate::virtio::read_config_from(&config, offset, &mut data);
    for (i, b) in data.iter().enumerate() {
        let at = offset.checked_add(i as u64).and_then(|a| usize::try_from(a).ok());
        let want = at.and_then(|a| config.get(a)).copied().unwrap_or(0);
        assert_eq!(*b, want, "byte {i} of a read at {offset:#x}");
    }
}

#[cfg(test)]
#[test]
fn fuzz_vsock_config() {
    skiff_tests::fuzz::run("vsock-config", 20_000, fuzz_config);
}
