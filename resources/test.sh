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
#
# The guest test files run in two lanes at once (SKIFF_TEST_LANES=1 for
# one): each batch is one test host, a single-threaded TCG process when it
# is nested, so two of them keep both cores of a 2-core machine busy and
# the guest tests take about half as long. Each lane's output is shown
# when both are done.
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
guest_tests=(cargo test --release --locked -p skiff-tests --features guest --no-fail-fast)
"${guest_tests[@]}" --no-run --test '*'
if [ "${SKIFF_TEST_LANES:-2}" = 1 ]; then
	"${guest_tests[@]}" --test '*' "$@" || status=$?
else
	# The longest batches (block, net) in one lane with the short ones, the
	# rest in the other; a new test file joins the second.
	lane1=(block net ninep boot_time qemu_reference vfio)
	lane2=()
	for f in tests/tests/*.rs; do
		t=$(basename "$f" .rs)
		[[ " ${lane1[*]} " == *" $t "* ]] || lane2+=("$t")
	done
	lanes=target/skiff-tests/lanes
	mkdir -p "$lanes"
	pids=()
	for i in 1 2; do
		declare -n lane="lane$i"
		args=()
		for t in "${lane[@]}"; do args+=(--test "$t"); done
		step "lane $i: ${lane[*]}"
		"${guest_tests[@]}" "${args[@]}" "$@" >"$lanes/$i.out" 2>&1 &
		pids+=($!)
		unset -n lane
	done
	for i in 1 2; do
		wait "${pids[$((i - 1))]}" || status=$?
		step "lane $i's output:"
		cat "$lanes/$i.out"
	done
fi
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
