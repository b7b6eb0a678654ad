#!/usr/bin/env bash
# Quick start: installs what is needed, builds Skiff, fetches a small Linux
# guest and boots it under Skiff with microvm.nix's command line, showing
# the guest's console live. The guest prints a banner and powers off.
#
#   resources/demo.sh [--shell] [--no-build] [--no-deps]
#
#   --shell     get an interactive shell in the guest instead ('exit' ends
#               it; in the nested test host, Ctrl-A x quits)
#   --no-build  use the skiff binary as it is ($SKIFF_BIN or
#               target/release/skiff)
#   --no-deps   skip resources/install-deps.sh
#
# On a machine without hardware virtualization visible (vmx/svm), e.g. one
# whose /dev/kvm is PVM, the guest runs under Skiff inside a throwaway
# nested test host (see tests/testhost/run-scenarios.sh); that takes a few
# seconds more.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
action=demo
build=1
deps=1
for arg in "$@"; do
	case "$arg" in
	--shell) action=shell ;;
	--no-build) build=0 ;;
	--no-deps) deps=0 ;;
	-h | --help)
		sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "demo: unknown argument: $arg (try --help)" >&2
		exit 2
		;;
	esac
done
step() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }

if [ "$deps" = 1 ]; then
	step "Installing dependencies (resources/install-deps.sh)"
	"$REPO/resources/install-deps.sh"
fi
if [ "$build" = 1 ]; then
	step "Building skiff (cargo build --release -p vmm)"
	command -v cargo >/dev/null || {
		echo "demo: cargo not found: install Rust >= 1.80 (e.g. https://rustup.rs)" >&2
		exit 1
	}
	(cd "$REPO" && cargo build --release -p vmm)
fi
export SKIFF_BIN=${SKIFF_BIN:-$REPO/target/release/skiff}
[ -x "$SKIFF_BIN" ] || {
	echo "demo: no skiff binary at $SKIFF_BIN" >&2
	exit 1
}

step "Fetching and building the guest (resources/guest-assets.sh)"
"$REPO/resources/guest-assets.sh"

mode=${SKIFF_TEST_HOST:-auto}
if [ "$mode" = auto ]; then
	if grep -qwE 'vmx|svm' /proc/cpuinfo; then mode=direct; else mode=l1; fi
fi
where="directly on this machine's KVM"
[ "$mode" = l1 ] && where="inside a nested test host (no vmx/svm here)"
step "Booting the guest under skiff, $where"
# shellcheck disable=SC2016 # $SKIFF etc. are expanded by the scenario shell
argv='$SKIFF -name demo -M microvm,accel=kvm:tcg,acpi=on,mem-merge=on,pcie=off,pic=off,pit=off,rtc=on,usb=off -m 512M -smp 2 -nodefaults -no-user-config -no-reboot -kernel $BZIMAGE -initrd $INITRD -chardev stdio,id=stdio,signal=off -serial chardev:stdio -enable-kvm -cpu host,+x2apic,-sgx -device i8042 -append "console=ttyS0 reboot=t panic=-1 quiet skiff.test='$action'" -nographic'
echo "  $argv" >&2

out_dir="$REPO/target/skiff-tests"
mkdir -p "$out_dir"
scen="$out_dir/demo.tsv"
log="$out_dir/demo.log"
if [ "$action" = shell ]; then
	printf 'demo\t3600:console\t%s\n' "$argv" >"$scen"
	export SKIFF_TEST_INTERACTIVE=1
else
	printf 'demo\t120\t%s\n' "$argv" >"$scen"
fi
echo >&2
start=$(date +%s.%N)
SKIFF_TEST_VERBOSE=scenario "$REPO/tests/testhost/run-scenarios.sh" "$scen" "$log" || {
	echo "demo: the run failed; log: $log" >&2
	exit 1
}
took=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')

clean=$(tr -d '\r' <"$log")
end=$(grep -m1 '^=== END demo ' <<<"$clean" || true)
rc=$(sed -n 's/.* rc=\([0-9]*\).*/\1/p' <<<"$end")
ms=$(sed -n 's/.* ms=\([0-9]*\).*/\1/p' <<<"$end")
uptime=$(sed -n '/SKIFF-UPTIME=/{s/.*SKIFF-UPTIME=\([0-9.]*\).*/\1/p; q}' <<<"$clean")

step "What happened"
if grep -q 'SKIFF-INIT-OK' <<<"$clean"; then
	echo "  The guest kernel booted and ran its /init ${uptime:+(guest uptime ${uptime}s at init)}."
else
	echo "  The guest did not reach its /init."
fi
case "$rc" in
0) echo "  skiff exited with status 0 after ${ms:-?} ms: the guest powered off and the VM ended." ;;
124) echo "  skiff did not end within its time limit and was killed." ;;
"") echo "  skiff's exit status is unknown (the run was cut short)." ;;
*) echo "  skiff exited with status $rc after ${ms:-?} ms." ;;
esac
echo "  Whole demo run: ${took}s. Console log: $log"
[ "$rc" = 0 ] && grep -q 'SKIFF-INIT-OK' <<<"$clean"
