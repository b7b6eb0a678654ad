//! libFuzzer target: a hostile qcow2 image, opened and used.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::fuzzing::qcow2_image(&mut devices::fuzzing::Rng::from_bytes(data));
});
