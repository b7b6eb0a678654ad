//! The fuzz targets' bodies, for `fuzz/` (cargo-fuzz, libFuzzer with
//! AddressSanitizer; feature `fuzzing`). Each is the body of one of the
//! unit tests' `fuzz_*` targets, run on a `Rng` read from libFuzzer's
//! input, so coverage guides the choices the body makes.

pub use skiff_tests::fuzz::Rng;

/// A hostile guest's virtio-blk queue (`fuzz_virtio_blk_queue`).
pub fn virtio_blk_queue(rng: &mut Rng) {
    use crate::virtio::block::tests::{fuzz_fixture, fuzz_queue, Fixture};
    static FIXTURE: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    fuzz_queue(rng, FIXTURE.get_or_init(fuzz_fixture));
}

/// A hostile driver's virtio-mmio register accesses.
pub fn virtio_mmio_registers(rng: &mut Rng) {
    crate::virtio::mmio::tests::fuzz_registers(rng);
}

/// A vhost-user backend's mangled replies.
pub fn vhost_user_replies(rng: &mut Rng) {
    crate::vhost_user::tests::fuzz_replies(rng);
}

/// 9P2000.L messages to the patched p9 server.
pub fn p9_messages(rng: &mut Rng) {
    crate::virtio::p9::tests::fuzz_messages(rng);
}

/// virtio-net transmit chains and frames.
pub fn virtio_net_transmit(rng: &mut Rng) {
    crate::virtio::net::tests::fuzz_transmit(rng);
}

/// virtio-net control-queue commands.
pub fn virtio_net_control(rng: &mut Rng) {
    crate::virtio::net::tests::fuzz_control(rng);
}

/// vhost-vsock's configuration space (the guest's CID) read at any offset
/// and width, through the config reader every device shares.
pub fn vsock_config(rng: &mut Rng) {
    crate::vhost_kernel::vsock::fuzz_config(rng);
}

/// A hostile guest's fw_cfg port accesses and DMA descriptors.
pub fn fw_cfg(rng: &mut Rng) {
    crate::legacy::fw_cfg::fuzz_ports(rng);
}

/// A hostile driver's virtio-balloon queues and config writes.
pub fn virtio_balloon_queues(rng: &mut Rng) {
    crate::virtio::balloon::tests::fuzz_queues(rng);
}

/// A hostile qcow2 image opened and used (`fuzz_qcow2_image`).
pub fn qcow2_image(rng: &mut Rng) {
    crate::virtio::block::qcow2::fuzz_image(rng);
}
