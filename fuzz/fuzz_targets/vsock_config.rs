//! libFuzzer target: vhost-vsock's config space.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::fuzzing::vsock_config(&mut devices::fuzzing::Rng::from_bytes(data));
});
