#!/usr/bin/env bash
# Runs Skiff's whole test suite from a clean clone on Debian: installs the
# dependencies, checks formatting and lints, runs the unit tests, builds
# skiff (release), fetches the guest assets, then the guest tests
# (`--features guest`): real Linux guests, in a nested test host when this
# machine shows no vmx/svm (see tests/testhost/run-scenarios.sh).
#
#   resources/test.sh [--no-deps] [CARGO TEST ARGS...]
#
# Extra arguments go to the guest tests' cargo test (e.g. `-- --nocapture`).
# Logs of the scenario batches: target/skiff-tests/*.log.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
deps=1
if [ "${1:-}" = --no-deps ]; then
	deps=0
	shift
fi
step() { echo "test.sh: [$(date +%T)] $*" >&2; }

if [ "$deps" = 1 ]; then
	step "installing dependencies"
	"$REPO/resources/install-deps.sh"
fi
command -v cargo >/dev/null || {
	echo "test.sh: cargo not found: install Rust >= 1.80 (e.g. https://rustup.rs)" >&2
	exit 1
}
cd "$REPO"
# The quick checks first: a formatting slip or a lint fails in a minute,
# not after the guests.
step "cargo fmt --all --check"
cargo fmt --all --check
# With the guest tests' feature, so their files are linted too.
step "cargo clippy --workspace --all-targets --features skiff-tests/guest --locked -- -D warnings"
cargo clippy --workspace --all-targets --features skiff-tests/guest --locked -- -D warnings
step "unit tests: cargo test --workspace --release --lib --bins"
cargo test --workspace --release --locked --lib --bins
step "building skiff (release)"
cargo build --release --locked -p vmm
step "guest assets"
resources/guest-assets.sh
step "guest tests: cargo test --release -p skiff-tests --features guest --test '*' $*"
stalled=target/skiff-tests/stalled.txt
timing=target/skiff-tests/timing.txt
rm -f "$stalled" "$timing"
status=0
cargo test --release --locked -p skiff-tests --features guest --test '*' --no-fail-fast "$@" || status=$?
if [ -s "$timing" ]; then
	step "where the guest batches' time went:"
	cat "$timing" >&2
fi
if [ -s "$stalled" ]; then
	# Scenarios whose guest stalled in the nested test host and ran again
	# (see rerun_stalled in tests/src/lib.rs): listed so they stay visible.
	step "scenarios that stalled once and were run again:"
	cat "$stalled" >&2
fi
exit "$status"
