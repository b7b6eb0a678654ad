//! libFuzzer target: the command line (vmm::cli).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm::fuzzing::command_line(&mut vmm::fuzzing::Rng::from_bytes(data));
});
