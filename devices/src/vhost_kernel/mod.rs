//! Devices whose data plane runs in the host kernel (vhost): skiff keeps
//! the transport and the config space, and hands the kernel guest RAM (as
//! skiff's own mappings), the queues, the kick ioeventfds and the call
//! eventfds; the kernel's vhost worker serves the queues.

pub mod net;
pub mod vsock;

use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::virtio::{ActiveQueue, GuestMemoryMmap};

/// A vhost request that failed, by its name.
pub type Failed = (&'static str, vhost::Error);

/// Guest RAM as the kernel translates ring and buffer addresses: skiff's
/// own mappings.
pub fn memory_table(mem: &GuestMemoryMmap) -> Vec<VhostUserMemoryRegionInfo> {
    mem.iter()
        .map(|r| VhostUserMemoryRegionInfo {
            guest_phys_addr: r.start_addr().raw_value(),
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
            mmap_offset: 0,
            mmap_handle: -1,
        })
        .collect()
}

/// Hands the kernel's vring `index` the driver's queue `q`: its size,
/// addresses, where to start, and its call and kick eventfds.
pub fn set_vring(v: &impl VhostBackend, index: usize, q: &ActiveQueue) -> Result<(), Failed> {
    let queue = &q.queue;
    let config = VringConfigData {
        queue_max_size: queue.max_size(),
        queue_size: queue.size(),
        flags: 0,
        desc_table_addr: queue.desc_table(),
        used_ring_addr: queue.used_ring(),
        avail_ring_addr: queue.avail_ring(),
        log_addr: None,
    };
    v.set_vring_num(index, queue.size()).map_err(|e| ("VHOST_SET_VRING_NUM", e))?;
    v.set_vring_addr(index, &config).map_err(|e| ("VHOST_SET_VRING_ADDR", e))?;
    v.set_vring_base(index, queue.next_avail()).map_err(|e| ("VHOST_SET_VRING_BASE", e))?;
    v.set_vring_call(index, &q.call).map_err(|e| ("VHOST_SET_VRING_CALL", e))?;
    v.set_vring_kick(index, &q.kick).map_err(|e| ("VHOST_SET_VRING_KICK", e))
}
