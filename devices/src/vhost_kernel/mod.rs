//! Devices whose data plane runs in the host kernel (vhost): skiff keeps
//! the transport and the config space, and hands the kernel guest RAM (as
//! skiff's own mappings), the queues, the kick ioeventfds and the call
//! eventfds; the kernel's vhost worker serves the queues.

pub mod vsock;
