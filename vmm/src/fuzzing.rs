//! The fuzz targets' bodies for `fuzz/` (cargo-fuzz; feature `fuzzing`):
//! the command line and the QMP protocol as hostile input.

pub use skiff_tests::fuzz::Rng;

/// A command line of random options and values (`fuzz_command_line`).
pub fn command_line(rng: &mut Rng) {
    crate::cli::tests::fuzz_command_line_one(rng);
}

/// A QMP client's byte stream (`fuzz_qmp_protocol`).
pub fn qmp_protocol(rng: &mut Rng) {
    crate::qmp::protocol::tests::fuzz_protocol(rng);
}
