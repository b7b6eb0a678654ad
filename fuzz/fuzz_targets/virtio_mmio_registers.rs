//! libFuzzer target: virtio-mmio registers as a hostile driver writes them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::fuzzing::virtio_mmio_registers(&mut devices::fuzzing::Rng::from_bytes(data));
});
