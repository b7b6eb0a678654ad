//! libFuzzer target: 9P2000.L messages to the patched p9 server.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::fuzzing::p9_messages(&mut devices::fuzzing::Rng::from_bytes(data));
});
