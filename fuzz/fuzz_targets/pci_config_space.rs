//! libFuzzer target: PCI configuration space and BARs through ECAM.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pci::fuzzing::pci_config_space(&mut pci::fuzzing::Rng::from_bytes(data));
});
