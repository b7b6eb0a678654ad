#!/usr/bin/env bash
# Runs every fuzz target for many inputs: the seeded random harness in
# tests/src/fuzz.rs (no nightly toolchain or cargo-fuzz needed). Each target
# is a unit test named fuzz_*; a plain `cargo test` (CI) runs each for its
# short default, this script for as many inputs as asked.
#
#   resources/fuzz.sh [-n INPUTS] [-s SEED] [TARGET-FILTER]
#
#   -n  inputs per target (default 1000000)
#   -s  seed (default: the harness's fixed one); input i depends only on the
#       seed and i, so a reported input replays alone with
#       SKIFF_FUZZ_SEED=S SKIFF_FUZZ_ONLY=i cargo test --release -p CRATE TARGET
#
# Prints one line per target (inputs, panics, hangs, slowest input); exits
# non-zero if any target saw a panic (a hang aborts its test binary).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
inputs=1000000
seed=
while getopts n:s: opt; do
	case $opt in
	n) inputs=$OPTARG ;;
	s) seed=$OPTARG ;;
	*) sed -n '2,16p' "$0" >&2; exit 2 ;;
	esac
done
shift $((OPTIND - 1))
filter=${1:-fuzz_}

cd "$REPO"
export SKIFF_FUZZ_INPUTS=$inputs
[ -n "$seed" ] && export SKIFF_FUZZ_SEED=$seed
status=0
# The crates with targets: the command line and QMP (vmm), virtio queues
# and registers (devices), PCI configuration space (pci).
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for crate in vmm devices pci; do
	echo "fuzz.sh: [$(date +%T)] $crate: $inputs inputs per target" >&2
	rc=0
	cargo test --release -p "$crate" "$filter" -- --nocapture --test-threads=1 >"$log" 2>&1 || rc=$?
	grep -aoE 'fuzz [a-z0-9-]+: .*|fuzz [a-z0-9-]+: HANG.*|panicked at .*' "$log" || true
	if [ "$rc" != 0 ]; then
		echo "fuzz.sh: $crate: cargo test failed (status $rc); its output:" >&2
		tail -n 40 "$log" >&2
		status=1
	fi
done
exit $status
