//! libFuzzer target: fw_cfg's ports and DMA descriptors.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::fuzzing::fw_cfg(&mut devices::fuzzing::Rng::from_bytes(data));
});
