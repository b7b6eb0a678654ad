#!/usr/bin/env bash
# Runs a batch of scenarios where a Linux guest can use KVM, and collects
# their output in one log.
#
#   tests/testhost/run-scenarios.sh SCENARIOS_FILE OUT_LOG
#
# SCENARIOS_FILE: lines NAME<TAB>TIMEOUT_SECS<TAB>SHELL COMMAND (blank lines
# and # comments ignored; TIMEOUT_SECS may end in ":pipe" for a stdin that
# stays open instead of /dev/null). Each command runs under sh with:
#   $SKIFF    the skiff binary ($SKIFF_BIN, default target/release/skiff)
#   $QEMU     qemu-system-x86_64
#   $BZIMAGE $VMLINUX $INITRD   the guest (L2) kernel and initrd
#   $BZIMAGE_GENERIC  Debian's generic kernel (MP-table support, for acpi=off)
#   $STAMP    resources/tools/stamp (timestamps, peak RSS, time limits)
#   $WORK     a fresh scratch directory (also the working directory)
#   $FIRECRACKER $CLOUD_HYPERVISOR   when SKIFF_FIRECRACKER /
#             SKIFF_CLOUD_HYPERVISOR name binaries to take along
#   $L1_MODULES  (test host only) directory of the KVM/VFIO modules
# In the test host, QEMU and $VMLINUX are there only when the scenarios file
# mentions them (QEMU; VMLINUX, FIRECRACKER, CLOUD_HYPERVISOR), or as
# SKIFF_TEST_L1_EXTRAS="qemu vmlinux" says.
#
# Where: on a machine whose CPU shows vmx/svm the scenarios run right here.
# Elsewhere (e.g. PVM, whose /dev/kvm cannot run a normal Linux guest) they
# run inside a throwaway test host (L1): Debian's kernel under
# `qemu-system-x86_64 -M q35 -accel tcg -cpu max`, whose emulated SVM gives a
# hardware-style /dev/kvm. SKIFF_TEST_HOST=l1|direct forces one.
#
# OUT_LOG receives the console: per scenario
#   === BEGIN NAME / its stdout+stderr / === END NAME rc=N ms=T
# (rc 124 on time-out). Progress goes to stderr; SKIFF_TEST_VERBOSE=1 shows
# the whole console live, SKIFF_TEST_VERBOSE=scenario the scenarios' output.
# Test host knobs: SKIFF_L1_MEM (MiB, default 3072), SKIFF_L1_CPU (default
# max), SKIFF_L1_SMP (default 1), SKIFF_L1_ACCEL (default tcg,thread=multi),
# SKIFF_L1_APPEND (more
# kernel parameters), SKIFF_L1_NVME (a raw image: the test host gets an
# emulated Intel IOMMU with interrupt remapping and an NVMe controller on
# that image, serial skiff-nvme, at 00:05.0, for VFIO passthrough, sharing
# its IOMMU group with a PCI serial port at 00:05.1; its kernel boots with
# intel_iommu=on iommu=pt; the VFIO modules are in $L1_MODULES/order-vfio),
# SKIFF_L1_HEARTBEAT_LIMIT (seconds without the test
# host's heartbeat before it counts as frozen, default 40),
# SKIFF_TEST_INTERACTIVE=1 (terminal wired to the
# console, for ":console" scenarios), SKIFF_TEST_BOOT_ALLOWANCE (seconds
# added to the scenarios' limits for the overall limit, default 180).
#
# Exit status: 0 when the batch ran to the end (whatever the scenarios
# returned), 2 usage, 3 the test host did not come up, 4 no /dev/kvm in
# it, 5 the batch did not finish (overall time limit).
set -euo pipefail

usage() {
	sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
	exit 2
}
[ $# -eq 2 ] || usage
SCEN=$1
OUT_LOG=$2
[ -f "$SCEN" ] || {
	echo "run-scenarios: no such scenarios file: $SCEN" >&2
	exit 2
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
SKIFF_BIN=${SKIFF_BIN:-$REPO/target/release/skiff}
say() { echo "run-scenarios: $*" >&2; }
die() {
	echo "run-scenarios: error: $1" >&2
	exit "${2:-1}"
}

# virtiofsd, for the scenarios that start it (resources/install-deps.sh
# builds it): SKIFF_VIRTIOFSD, else on PATH, else cargo's bin directory.
VFSD=
if grep -q 'VIRTIOFSD' "$SCEN"; then
	for p in "${SKIFF_VIRTIOFSD:-}" "$(command -v virtiofsd 2>/dev/null || true)" \
		"${CARGO_HOME:-$HOME/.cargo}/bin/virtiofsd"; do
		if [ -n "$p" ] && [ -x "$p" ]; then
			VFSD=$p
			break
		fi
	done
	[ -n "$VFSD" ] || say "warning: no virtiofsd (run resources/install-deps.sh); \$VIRTIOFSD scenarios will fail"
fi

mode=${SKIFF_TEST_HOST:-auto}
if [ "$mode" = auto ]; then
	if grep -qwE 'vmx|svm' /proc/cpuinfo; then mode=direct; else mode=l1; fi
fi
case "$mode" in
l1 | direct) ;;
*) die "SKIFF_TEST_HOST must be auto, l1 or direct (is '$mode')" 2 ;;
esac

if [ "$mode" = l1 ]; then l1flag=--l1; else l1flag=--no-l1; fi
assets=$("$REPO/resources/guest-assets.sh" "$l1flag" --env --quiet) || die "guest-assets.sh failed"
eval "$assets"

# Overall limit: every scenario's own limit plus room for booting.
total=0
max_limit=0
n=0
while IFS=$'\t' read -r name timeout _; do
	case "$name" in "" | "#"*) continue ;; esac
	t=${timeout%:pipe}
	t=${t%:console}
	[[ "$t" =~ ^[0-9]+$ ]] || die "scenario $name: bad time limit '$timeout'" 2
	total=$((total + t + 3))
	[ "$t" -gt "$max_limit" ] && max_limit=$t
	n=$((n + 1))
done <"$SCEN"
overall=$((total + ${SKIFF_TEST_BOOT_ALLOWANCE:-180}))

mkdir -p "$(dirname "$OUT_LOG")"
: >"$OUT_LOG"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/skiff-run.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# Console filter: everything to OUT_LOG; to stderr, progress lines, or
# the whole console (SKIFF_TEST_VERBOSE=1), or just the scenarios' own
# output (SKIFF_TEST_VERBOSE=scenario, for the demo).
progress() {
	case "${SKIFF_TEST_VERBOSE:-0}" in
	1) tee -a "$OUT_LOG" >&2 ;;
	scenario)
		tee -a "$OUT_LOG" | awk '/=== END /{on = 0; fflush(); next} on {print; fflush()} /=== BEGIN /{on = 1}' >&2
		;;
	*)
		tee -a "$OUT_LOG" | tr -d '\r' | grep --line-buffered -E '^(=== END |SKIFF-L1-(READY|NOKVM|WARN))' |
			sed -u 's/^/run-scenarios:   /' >&2 || true
		;;
	esac
}

start=$(date +%s.%N)
elapsed() { awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }
if [ "$mode" = direct ]; then
	say "running $n scenario(s) directly on this machine"
	{ [ -r /dev/kvm ] && [ -w /dev/kvm ]; } || die "/dev/kvm is not usable by $(id -un)" 4
	if [ -x "$SKIFF_BIN" ]; then skiff=$SKIFF_BIN; else
		skiff="$tmp/skiff-missing"
		printf '#!/bin/sh\necho "skiff binary not found at %s" >&2\nexit 127\n' "$SKIFF_BIN" >"$skiff"
		chmod +x "$skiff"
		say "warning: no skiff binary at $SKIFF_BIN; \$SKIFF scenarios will fail"
	fi
	set +e
	env SKIFF="$skiff" QEMU="$(command -v qemu-system-x86_64)" BZIMAGE="$SKIFF_L2_BZIMAGE" \
		BZIMAGE_GENERIC="$SKIFF_L2_BZIMAGE_GENERIC" \
		VMLINUX="$SKIFF_L2_VMLINUX" INITRD="$SKIFF_L2_INITRD" STAMP="$SKIFF_STAMP" \
		STORE_IMG="$SKIFF_L2_STORE" STORE_DATA="$SKIFF_L2_STORE_DATA" VOL_IMG="$SKIFF_L2_VOL" \
		FIRECRACKER="${SKIFF_FIRECRACKER:-}" CLOUD_HYPERVISOR="${SKIFF_CLOUD_HYPERVISOR:-}" \
		VIRTIOFSD="$VFSD" WORK_ROOT="$tmp/work" timeout "$overall" sh "$HERE/scenarios-inner.sh" "$SCEN" 2>&1 | progress
	rc=${PIPESTATUS[0]}
	set -e
	[ "$rc" = 124 ] && die "the batch did not finish within ${overall}s; log: $OUT_LOG" 5
	say "done in $(elapsed)s; log: $OUT_LOG"
	exit 0
fi

# ------------------------------------------------------------ test host
QEMU_HOST=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 missing: run resources/install-deps.sh"

# The per-run archive: skiff and its libraries, the scenarios, the runner.
run="$tmp/run"
mkdir -p "$run/run" "$run/opt/skiff" "$run/opt/peers"
copy_with_libs() { # BIN DEST: copy BIN to DEST in the archive, and its ldd libraries
	mkdir -p "$run$(dirname "$2")"
	cp -L "$1" "$run$2"
	ldd "$1" 2>/dev/null | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}' | while read -r lib; do
		mkdir -p "$run$(dirname "$lib")"
		cp -L "$lib" "$run$lib"
	done
}
if [ -x "$SKIFF_BIN" ]; then
	copy_with_libs "$SKIFF_BIN" /opt/skiff/skiff
else
	say "warning: no skiff binary at $SKIFF_BIN; \$SKIFF scenarios will fail"
	printf '#!/bin/sh\necho "skiff binary not found at %s" >&2\nexit 127\n' "$SKIFF_BIN" >"$run/opt/skiff/skiff"
	chmod +x "$run/opt/skiff/skiff"
fi
peers=
if [ -n "${SKIFF_FIRECRACKER:-}" ]; then
	copy_with_libs "$SKIFF_FIRECRACKER" /opt/peers/firecracker
	peers="$peers FIRECRACKER=/opt/peers/firecracker"
fi
if [ -n "${SKIFF_CLOUD_HYPERVISOR:-}" ]; then
	copy_with_libs "$SKIFF_CLOUD_HYPERVISOR" /opt/peers/cloud-hypervisor
	peers="$peers CLOUD_HYPERVISOR=/opt/peers/cloud-hypervisor"
fi
if [ -n "$VFSD" ]; then
	copy_with_libs "$VFSD" /opt/peers/virtiofsd
	peers="$peers VIRTIOFSD=/opt/peers/virtiofsd"
fi
cp "$SCEN" "$run/run/scenarios.tsv"
cp "$HERE/scenarios-inner.sh" "$run/run/scenarios-inner.sh"
# The heartbeat: a byte every 2 s, from the test host's own timers, to an
# isa-debugcon port at 0x7f0 (a plain port write: no UART interrupt that a
# busy emulated SVM could lose; not SeaBIOS's 0x402, where its log would
# go), whatever the scenarios print (see the watchdog).
cat >"$run/run/runner.sh" <<EOF
#!/bin/sh
(while :; do printf . | dd of=/dev/port bs=1 seek=2032 conv=notrunc 2>/dev/null; sleep 2; done) &
export SKIFF=/opt/skiff/skiff QEMU=/usr/bin/qemu-system-x86_64
export BZIMAGE=/assets/bzImage BZIMAGE_GENERIC=/assets/bzImage-generic VMLINUX=/assets/vmlinux INITRD=/assets/initrd.img
export STORE_IMG=/assets/store.img STORE_DATA=/assets/store-data.bin VOL_IMG=/assets/vol.img
export STAMP=/bin/stamp WORK_ROOT=/tmp/skiff-work L1_MODULES=/lib/modules/l1 CONSOLE_DEV=/dev/console $peers
exec sh /run/scenarios-inner.sh /run/scenarios.tsv
EOF
chmod +x "$run/run/runner.sh"
# The kernel unpacks concatenated archives in order: the base, QEMU and
# the L2 vmlinux when the scenarios use them, then this run's archive.
(cd "$run" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$tmp/run.cpio"
pieces=("$SKIFF_L1_BASE")
extras=${SKIFF_TEST_L1_EXTRAS:-auto}
if [ "$extras" = auto ]; then
	extras=
	grep -q 'QEMU' "$SCEN" && extras="$extras qemu"
	grep -qE 'VMLINUX|FIRECRACKER|CLOUD_HYPERVISOR' "$SCEN" && extras="$extras vmlinux"
	# An archive a benchmark brings (resources/bench-blk.sh: fio).
	[ -n "${SKIFF_L1_EXTRA:-}" ] && extras="$extras extra"
fi
for x in $extras; do
	case "$x" in
	qemu) pieces+=("$SKIFF_L1_QEMU") ;;
	vmlinux) pieces+=("$SKIFF_L1_VMLINUX") ;;
	extra) pieces+=("${SKIFF_L1_EXTRA:?SKIFF_L1_EXTRA names no archive}") ;;
	*) die "SKIFF_TEST_L1_EXTRAS: unknown piece '$x' (qemu, vmlinux)" 2 ;;
	esac
done
cat "${pieces[@]}" "$tmp/run.cpio" >"$tmp/initrd"

say "booting the test host (QEMU TCG, nested SVM) for $n scenario(s), limit ${overall}s"
set +e
# Interactive (SKIFF_TEST_INTERACTIVE=1, for ":console" scenarios): the
# terminal is the test host's console; Ctrl-A x quits QEMU.
stdin_src=/dev/null
serial=stdio
tflags=()
if [ "${SKIFF_TEST_INTERACTIVE:-0}" = 1 ]; then
	stdin_src=/dev/tty
	serial=mon:stdio
	tflags=(--foreground)
	# Someone at the console may well be silent.
	SKIFF_L1_SILENCE_MARGIN=${SKIFF_L1_SILENCE_MARGIN:-100000}
fi
# One test-host CPU by default. With two, QEMU's emulated SVM now and then
# loses an interrupt or hands a guest the host's registers: 2 of 16 guest
# boots stalled in one run and another froze the whole test host, against
# 0 of 24 with one CPU (each boot ~35% slower). SKIFF_L1_SMP=2 for the
# benchmarks' side-by-side runs, where the peers were measured that way.
# A test host that has not reached its init after SKIFF_L1_BOOT_LIMIT
# seconds (it needs ~5) is stuck before its kernel even runs (seen twice in
# CI: ~20 minutes of an idle QEMU before a batch began): kill it, which
# reports "did not come up" (exit 3), and the harness runs the batch again.
# Once up, a test host can freeze: seen a few times per CI run, QEMU's
# emulated SVM stuck in the middle of a guest's boot or reboot with the
# test host's own timers dead. Its heartbeat (runner.sh) then stops: after
# SKIFF_L1_HEARTBEAT_LIMIT seconds without one (default 40; the longest gap
# seen in a healthy run is printed at the end) it is killed: "the batch did
# not finish" (exit 5), and the harness runs the scenarios that did not end
# in a fresh test host. Before the first heartbeat, a console silent for
# longer than any scenario's own limit counts as frozen.
boot_limit=${SKIFF_L1_BOOT_LIMIT:-120}
silence_limit=$((max_limit + ${SKIFF_L1_SILENCE_MARGIN:-60}))
heartbeat_limit=${SKIFF_L1_HEARTBEAT_LIMIT:-40}
beats="$tmp/heartbeat"
: >"$beats"
(
	i=0
	while ! grep -q '^SKIFF-L1-INIT' "$OUT_LOG" 2>/dev/null; do
		if [ "$i" -ge "$boot_limit" ]; then
			say "the test host is not up after ${boot_limit}s: stopping it"
			pkill -f -- "-initrd $tmp/initrd" || true
			exit 0
		fi
		sleep 1
		i=$((i + 1))
	done
	size=-1
	quiet=0
	beat=0
	since=0
	gap=0
	while sleep 2; do
		now=$(stat -c %s "$OUT_LOG" 2>/dev/null || echo 0)
		if [ "$now" = "$size" ]; then quiet=$((quiet + 2)); else quiet=0; fi
		size=$now
		now=$(stat -c %s "$beats" 2>/dev/null || echo 0)
		if [ "$now" = "$beat" ]; then since=$((since + 2)); else
			[ "$beat" -gt 0 ] && [ "$since" -gt "$gap" ] && gap=$since && echo "$gap" >"$tmp/gap"
			since=0
		fi
		beat=$now
		why=
		if [ "$beat" -gt 0 ]; then
			[ "$since" -ge "$heartbeat_limit" ] && why="no heartbeat for ${since}s"
		elif [ "$quiet" -ge "$silence_limit" ]; then
			why="its console silent for ${quiet}s"
		fi
		if [ -n "$why" ]; then
			last=$(tr -d '\r' <"$OUT_LOG" | sed -n 's/^=== BEGIN //p' | tail -n 1)
			say "the test host froze ($why) in scenario ${last:-?}: stopping it"
			pkill -f -- "-initrd $tmp/initrd" || true
			exit 0
		fi
	done
) &
watchdog=$!
# VFIO inside the test host: without intremap=on, VFIO_SET_IOMMU fails
# with EPERM.
vfio=()
vfio_append=
if [ -n "${SKIFF_L1_NVME:-}" ]; then
	[ -f "$SKIFF_L1_NVME" ] || die "SKIFF_L1_NVME: no such image $SKIFF_L1_NVME" 2
	# A serial port (the built-in 8250_pci drives it) as the NVMe's second
	# function: no ACS between them, so one IOMMU group, which is not
	# viable while the port keeps its driver.
	vfio=(-device intel-iommu,intremap=on
		-drive "if=none,id=nvme0,file=$SKIFF_L1_NVME,format=raw,cache=unsafe"
		-device nvme,serial=skiff-nvme,drive=nvme0,addr=5.0,multifunction=on
		-device pci-serial,addr=5.1)
	vfio_append="intel_iommu=on iommu=pt"
fi
timeout "${tflags[@]}" "$overall" "$QEMU_HOST" -M q35 -accel "${SKIFF_L1_ACCEL:-tcg,thread=multi}" \
	-cpu "${SKIFF_L1_CPU:-max}" -smp "${SKIFF_L1_SMP:-1}" "${vfio[@]}" \
	-m "${SKIFF_L1_MEM:-3072}" -nodefaults -no-user-config -display none -monitor none -serial "$serial" \
	-chardev "file,id=beat,path=$beats" -device isa-debugcon,iobase=0x7f0,chardev=beat \
	-no-reboot -kernel "$SKIFF_L1_KERNEL" -initrd "$tmp/initrd" \
	-append "console=ttyS0 quiet panic=-1 mitigations=off $vfio_append ${SKIFF_L1_APPEND:-}" <"$stdin_src" 2>&1 | progress
rc=${PIPESTATUS[0]}
kill "$watchdog" 2>/dev/null
wait "$watchdog" 2>/dev/null
set -e
took=$(elapsed)

# (grep on the file itself: "tr | grep -q" can die of SIGPIPE under pipefail)
log_has() { grep -q "$1" "$OUT_LOG"; }
if ! log_has '^SKIFF-L1-INIT'; then
	tail -n 30 "$OUT_LOG" >&2
	die "the test host did not come up (QEMU exit $rc after ${took}s); log: $OUT_LOG" 3
fi
if log_has '^SKIFF-L1-NOKVM'; then
	tr -d '\r' <"$OUT_LOG" | grep -A20 '^SKIFF-L1-NOKVM' >&2
	die "/dev/kvm did not appear in the test host; log: $OUT_LOG" 4
fi
if ! log_has '^SKIFF-L1-READY'; then
	tail -n 30 "$OUT_LOG" >&2
	die "the test host did not get ready (QEMU exit $rc after ${took}s); log: $OUT_LOG" 3
fi
ready=$(sed -n '/^SKIFF-L1-READY uptime=/{s/^SKIFF-L1-READY uptime=//; s/\r//; p; q}' "$OUT_LOG")
if ! log_has '^SKIFF-L1-DONE'; then
	die "the batch did not finish (QEMU exit $rc after ${took}s, limit ${overall}s); log: $OUT_LOG" 5
fi
gap=$(cat "$tmp/gap" 2>/dev/null || echo 0)
say "done in ${took}s (test host ready at uptime ${ready}s, longest heartbeat gap ${gap}s); log: $OUT_LOG"
