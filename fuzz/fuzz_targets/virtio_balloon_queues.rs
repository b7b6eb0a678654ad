//! libFuzzer target: a hostile driver's virtio-balloon queues.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::fuzzing::virtio_balloon_queues(&mut devices::fuzzing::Rng::from_bytes(data));
});
