#!/usr/bin/env bash
# Runs every fuzz target for many inputs, in one of two ways:
#
#   resources/fuzz.sh [-n INPUTS] [-s SEED] [TARGET-FILTER]
#       the seeded random harness (tests/src/fuzz.rs) on the stable
#       toolchain: each target is a unit test named fuzz_*; a plain
#       `cargo test` (CI) runs each for its short default, this for as many
#       inputs as asked (default 1000000). Input i depends only on the seed
#       and i: a reported input replays alone with
#       SKIFF_FUZZ_SEED=S SKIFF_FUZZ_ONLY=i cargo test --release -p CRATE TARGET
#
#   resources/fuzz.sh --libfuzzer [-n RUNS] [-t SECONDS] [TARGET...]
#       the same bodies as coverage-guided libFuzzer targets (fuzz/,
#       cargo-fuzz on the nightly toolchain, AddressSanitizer): each runs
#       RUNS inputs (default 1000000) or SECONDS, whichever ends first,
#       keeping its corpus in fuzz/corpus/TARGET across runs; a crash's
#       input is left in fuzz/artifacts/TARGET. Installs cargo-fuzz if
#       missing.
#
# Prints one line per target (inputs, panics or crashes, hangs, and for
# libFuzzer the edges covered); exits non-zero if any target failed.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
usage() { sed -n '2,20p' "$0" >&2; exit 2; }

libfuzzer() {
	local runs=1000000 secs=0
	while getopts n:t: opt; do
		case $opt in
		n) runs=$OPTARG ;;
		t) secs=$OPTARG ;;
		*) usage ;;
		esac
	done
	shift $((OPTIND - 1))
	cd "$REPO/fuzz"
	rustup toolchain list | grep -q '^nightly' || {
		echo "fuzz.sh: the nightly toolchain is needed (rustup toolchain install nightly)" >&2
		exit 1
	}
	command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
	local targets=("$@")
	[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
	echo "fuzz.sh: [$(date +%T)] building ${#targets[@]} libFuzzer targets (ASan)" >&2
	cargo +nightly fuzz build >&2
	local status=0 log
	log=$(mktemp)
	trap 'rm -f "$log"' EXIT
	printf '| target | executions | edges | features | crashes | seconds |\n|---|---|---|---|---|---|\n'
	for t in "${targets[@]}"; do
		mkdir -p "corpus/$t"
		local args=(-runs="$runs" -print_final_stats=1 -timeout=10)
		[ "$secs" = 0 ] || args+=(-max_total_time="$secs")
		local rc=0 start=$SECONDS
		cargo +nightly fuzz run "$t" "corpus/$t" -- "${args[@]}" >"$log" 2>&1 || rc=$?
		local execs edges features crashes
		execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
		edges=$(grep -aoE ' cov: [0-9]+' "$log" | tail -n 1 | tr -dc 0-9)
		features=$(grep -aoE ' ft: [0-9]+' "$log" | tail -n 1 | tr -dc 0-9)
		crashes=0
		if [ "$rc" != 0 ]; then
			crashes=1
			status=1
			echo "fuzz.sh: $t failed (status $rc):" >&2
			grep -aE 'ERROR|panicked|SUMMARY|artifact_prefix|Test unit written' "$log" | head -n 20 >&2
		fi
		printf '| %s | %s | %s | %s | %s | %s |\n' "$t" "${execs:--}" "${edges:--}" "${features:--}" \
			"$crashes" "$((SECONDS - start))"
	done
	exit $status
}

[ "${1:-}" = --libfuzzer ] && { shift; libfuzzer "$@"; }

inputs=1000000
seed=
while getopts n:s: opt; do
	case $opt in
	n) inputs=$OPTARG ;;
	s) seed=$OPTARG ;;
	*) usage ;;
	esac
done
shift $((OPTIND - 1))
filter=${1:-fuzz_}

cd "$REPO"
export SKIFF_FUZZ_INPUTS=$inputs
[ -n "$seed" ] && export SKIFF_FUZZ_SEED=$seed
status=0
# The crates with targets: the command line and QMP (vmm); virtio queues,
# registers, 9p, virtio-net, vsock and vhost-user replies (devices); PCI
# configuration space (pci).
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for crate in vmm devices pci; do
	echo "fuzz.sh: [$(date +%T)] $crate: $inputs inputs per target" >&2
	rc=0
	cargo test --release -p "$crate" --lib "$filter" -- --nocapture --test-threads=1 >"$log" 2>&1 || rc=$?
	grep -aoE 'fuzz [a-z0-9-]+: .*|fuzz [a-z0-9-]+: HANG.*|panicked at .*' "$log" || true
	if [ "$rc" != 0 ]; then
		echo "fuzz.sh: $crate: cargo test failed (status $rc); its output:" >&2
		tail -n 40 "$log" >&2
		status=1
	fi
done
exit $status
