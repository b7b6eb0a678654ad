//! libFuzzer target: virtio-net transmit chains and frames.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::fuzzing::virtio_net_transmit(&mut devices::fuzzing::Rng::from_bytes(data));
});
