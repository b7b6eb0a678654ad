//! libFuzzer target: virtio-net control-queue commands.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::fuzzing::virtio_net_control(&mut devices::fuzzing::Rng::from_bytes(data));
});
