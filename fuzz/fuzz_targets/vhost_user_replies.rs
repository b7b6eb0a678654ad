//! libFuzzer target: a vhost-user backend's mangled replies.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::fuzzing::vhost_user_replies(&mut devices::fuzzing::Rng::from_bytes(data));
});
