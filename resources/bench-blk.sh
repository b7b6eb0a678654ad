#!/usr/bin/env bash
# virtio-blk benchmark: fio in the guest, Skiff against QEMU's microvm with
# the same argv (microvm.nix's volume: virtio-blk-pci, aio=io_uring, on a
# 256 MiB raw image in the test host's RAM), in ONE test-host run, VMMs
# alternating; plus fio in the test host itself on the same image file as
# the ceiling.
#
#   resources/bench-blk.sh [-n ROUNDS] [-t SECONDS] [--skiff PATH]
#
#   -n ROUNDS    guest runs per VMM (default 2)
#   -t SECONDS   length of each fio job (default 5)
#
# Jobs: sequential 1 MiB read and write, random 4 KiB read and write, each
# at queue depth 1 and 32 (libaio, O_DIRECT in the guest). Prints a
# Markdown table of medians (KiB/s and IOPS), skiff/QEMU ratios and the
# host's figures; ratios only are meaningful in the nested test host. The
# image lives in the test host's tmpfs, which has no O_DIRECT: both VMMs
# use the page cache (cache=writeback), the host ceiling too. Needs fio on
# this machine (installed if missing: apt-get install fio); its binary and
# libraries travel into the test host and the guest's initrd. Raw log:
# target/skiff-tests/bench-blk.log.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
rounds=2
secs=5
skiff=${SKIFF_BIN:-$REPO/target/release/skiff}
usage() {
	sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
	exit 2
}
while [ $# -gt 0 ]; do
	case "$1" in
	-n) rounds=${2:?-n needs a number}; shift 2 ;;
	-t) secs=${2:?-t needs seconds}; shift 2 ;;
	--skiff) skiff=${2:?--skiff needs a path}; shift 2 ;;
	-h | --help) usage ;;
	*) echo "bench-blk: unknown argument: $1" >&2; usage ;;
	esac
done
die() {
	echo "bench-blk: error: $*" >&2
	exit 1
}
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || die "-n wants a positive number"
[[ "$secs" =~ ^[1-9][0-9]*$ ]] || die "-t wants a positive number of seconds"
[ -x "$skiff" ] || die "no skiff binary at $skiff: cargo build --release -p vmm (or --skiff PATH)"
if ! command -v fio >/dev/null; then
	echo "bench-blk: installing fio" >&2
	if [ "$(id -u)" -eq 0 ]; then apt-get install -y -q fio >/dev/null; else sudo apt-get install -y -q fio >/dev/null; fi
fi
FIO=$(command -v fio)

eval "$("$REPO/resources/guest-assets.sh" --quiet --env)"
work="$SKIFF_CACHE/bench"
mkdir -p "$work"

# fio and its libraries as a cpio archive rooted at /.
make_root() { # DIR: fio and what it links to, at their own paths
	mkdir -p "$1/usr/bin" "$1/lib64"
	cp -L "$FIO" "$1/usr/bin/fio"
	ldd "$FIO" | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}' | while read -r lib; do
		mkdir -p "$1$(dirname "$lib")"
		cp -L "$lib" "$1$lib"
	done
}
cpio_of() { (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet); }

key="$(sha256sum "$FIO" "$SKIFF_L2_INITRD" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
if [ ! -e "$work/l1-fio-$key.cpio.zst" ]; then
	echo "bench-blk: packing fio for the guest and the test host" >&2
	rm -rf "$work"/root-* "$work"/*.cpio* "$work"/initrd-fio.img
	make_root "$work/root-l2"
	# The guest's initrd with fio appended (the kernel unpacks both).
	{ cat "$SKIFF_L2_INITRD"; cpio_of "$work/root-l2" | gzip -1; } >"$work/initrd-fio.img"
	make_root "$work/root-l1"
	# The same eight jobs for the host ceiling, on a file.
	cat >"$work/root-l1/usr/bin/fio-jobs" <<'EOS'
#!/bin/sh
# fio-jobs FILE SECONDS PREFIX: the benchmark's eight jobs on FILE.
f=$1
rt=$2
pre=$3
for job in "read 1m 1" "read 1m 32" "write 1m 1" "write 1m 32" \
	"randread 4k 1" "randread 4k 32" "randwrite 4k 1" "randwrite 4k 32"; do
	set -- $job
	out=$(fio --name=j --filename="$f" --ioengine=libaio --rw="$1" --bs="$2" --iodepth="$3" \
		--runtime="$rt" --time_based --size=192M --output-format=terse --terse-version=3 \
		2>/dev/null | tail -n 1)
	echo "$pre $1-$2-qd$3 $(echo "$out" | awk -F';' '{ if ($7 > 0) print $7, $8; else print $48, $49 }')"
done
EOS
	chmod +x "$work/root-l1/usr/bin/fio-jobs"
	mkdir -p "$work/root-l1/assets"
	cp "$work/initrd-fio.img" "$work/root-l1/assets/"
	cpio_of "$work/root-l1" | zstd -q -T0 -3 >"$work/l1-fio-$key.cpio.zst.tmp"
	pad=$(((4 - $(stat -c %s "$work/l1-fio-$key.cpio.zst.tmp") % 4) % 4))
	head -c "$pad" /dev/zero >>"$work/l1-fio-$key.cpio.zst.tmp"
	mv "$work/l1-fio-$key.cpio.zst.tmp" "$work/l1-fio-$key.cpio.zst"
	rm -rf "$work"/root-*
fi

out_dir="$REPO/target/skiff-tests"
mkdir -p "$out_dir"
scen="$out_dir/bench-blk.tsv"
log="$out_dir/bench-blk.log"

# microvm.nix's argv with a writable volume, 1 GiB for the bigger initrd.
argv() {
	echo "-name t -M microvm,accel=kvm:tcg,acpi=on,mem-merge=on,pcie=on,pic=off,pit=off,rtc=on,usb=off" \
		"-m 1G -smp 2 -nodefaults -no-user-config -no-reboot -kernel \$BZIMAGE -initrd /assets/initrd-fio.img" \
		"-chardev stdio,id=stdio,signal=off -serial chardev:stdio -enable-kvm -cpu host,+x2apic,-sgx" \
		"-device i8042 -drive id=vda,format=raw,file=/tmp/bench.img,if=none,aio=io_uring" \
		"-device virtio-blk-pci,drive=vda,disable-legacy=on" \
		"-append \"console=ttyS0 reboot=t panic=-1 quiet skiff.test=fio skiff.fio=$secs\" -nographic"
}
image='[ -e /tmp/bench.img ] || dd if=/dev/zero of=/tmp/bench.img bs=1M count=256 2>/dev/null'
{
	echo "# generated by resources/bench-blk.sh"
	printf '%s\t%s\t%s\n' "host-1" $((secs * 8 + 120)) "$image; fio-jobs /tmp/bench.img $secs HOST-FIO"
	for ((i = 1; i <= rounds; i++)); do
		if ((i % 2)); then order=(skiff qemu); else order=(qemu skiff); fi
		for v in "${order[@]}"; do
			vmm='$SKIFF'
			[ "$v" = qemu ] && vmm='$QEMU'
			printf '%s\t%s\t%s\n' "bench-$v-$i" $((secs * 8 + 240)) "$image; $vmm $(argv)"
		done
	done
} >"$scen"

export SKIFF_BIN=$skiff
export SKIFF_L1_EXTRA="$work/l1-fio-$key.cpio.zst"
export SKIFF_L1_SMP=${SKIFF_L1_SMP:-2}
echo "bench-blk: skiff and qemu x $rounds round(s), 8 fio jobs of ${secs}s each" >&2
"$REPO/tests/testhost/run-scenarios.sh" "$scen" "$log" || die "the benchmark run failed; log: $log"

# Records: who job kib iops
tr -d '\r' <"$log" | awk '
	/=== BEGIN / { who = $3; sub(/^bench-/, "", who); sub(/-[0-9]+$/, "", who); next }
	/SKIFF-FIO |HOST-FIO / {
		sub(/.*-FIO /, ""); if (NF >= 3) print who, $1, $2, $3, (NF >= 4 ? $4 : "-")
	}' >"$out_dir/bench-blk.records"

median() { # WHO JOB FIELD
	awk -v w="$1" -v j="$2" -v f="$3" '$1 == w && $2 == j { print $(f) }' "$out_dir/bench-blk.records" |
		sort -n | awk '{ a[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b }'; }
echo
echo "### virtio-blk, fio in the guest ($rounds round(s), ${secs}s per job; medians; ratio skiff/QEMU, > 1 means Skiff is faster)"
echo
echo "| job | skiff KiB/s | QEMU KiB/s | ratio | skiff IOPS | QEMU IOPS | ratio | skiff IRQ/IO | QEMU IRQ/IO | host KiB/s | host IOPS |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for job in read-1m-qd1 read-1m-qd32 write-1m-qd1 write-1m-qd32 randread-4k-qd1 randread-4k-qd32 randwrite-4k-qd1 randwrite-4k-qd32; do
	sk=$(median skiff "$job" 3)
	qk=$(median qemu "$job" 3)
	si=$(median skiff "$job" 4)
	qi=$(median qemu "$job" 4)
	echo "| $job | $sk | $qk | $(ratio "$sk" "$qk") | $si | $qi | $(ratio "$si" "$qi") | $(median skiff "$job" 5) | $(median qemu "$job" 5) | $(median host "$job" 3) | $(median host "$job" 4) |"
done
echo
echo "Measured inside the nested test host unless it ran directly: compare ratios, not absolute figures. Log: $log"
