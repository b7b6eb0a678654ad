//! libFuzzer target: a hostile guest's virtio-blk queue.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::fuzzing::virtio_blk_queue(&mut devices::fuzzing::Rng::from_bytes(data));
});
