//! libFuzzer target: a QMP client's byte stream (vmm::qmp).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm::fuzzing::qmp_protocol(&mut vmm::fuzzing::Rng::from_bytes(data));
});
