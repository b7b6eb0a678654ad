//! The fuzz target's body for `fuzz/` (cargo-fuzz; feature `fuzzing`):
//! configuration space and BARs as a hostile guest reaches them.

pub use skiff_tests::fuzz::Rng;

/// ECAM and the virtio function's BARs (`fuzz_pci_config_space`).
pub fn pci_config_space(rng: &mut Rng) {
    crate::virtio_pci::tests::fuzz_config_space(rng);
}
