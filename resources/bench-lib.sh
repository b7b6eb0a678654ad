# Shared by the benchmark scripts (bench-blk.sh, bench-vfio.sh, bench-net.sh,
# bench-9p.sh); sourced
# after the script sets NAME (its short name, for messages) and SCRIPT (its
# path, whose header comment is its usage).
#
#   bench_args "$@"          -n ROUNDS, -t SECONDS, --skiff PATH into
#                            $rounds, $secs, $skiff (defaults 2, 5, the
#                            release build)
#   need_tool CMD PACKAGE    installs PACKAGE when CMD is missing
#   copy_with_libs BIN DEST ROOT   BIN at ROOT/DEST, its ldd libraries at
#                            their own paths under ROOT
#   cpio_of DIR              DIR as a newc archive on stdout
#   zstd_archive DIR OUT     DIR as a zstd'ed archive OUT, padded to 4 bytes
#                            (the test host's initramfs pieces concatenate)
#   column_of FILE COLUMN VALUE...
#                            COLUMN of the records of FILE whose first
#                            columns equal VALUE..., one a line
#   median FILE COLUMN VALUE... the median of COLUMN over the records of
#                            FILE whose first columns equal VALUE...
#   count FILE VALUE...      how many records of FILE have first columns
#                            VALUE... (the samples behind a median)
#   ratio A B                A/B to two places, or - when either is missing
#   vmm_rounds LIMIT BEFORE  $rounds rounds of bench-skiff-N/bench-qemu-N
#                            scenario lines (order reversed every other
#                            round), each BEFORE then the VMM with the
#                            caller's `argv`
#   fio_records LOG OUT      the fio lines of LOG as records
#                            "who job kib iops [irq/io]" in OUT
#   fio_archive              fio (installed if missing) for the test host
#                            and the guest: sets $fio_l1 (a test-host
#                            archive: fio, fio-jobs, nvme-to-vfio,
#                            /assets/initrd-fio.img, the guest's initrd
#                            with fio appended)
#   run_batch SCENARIOS LOG  runs the scenarios in a test host; when it
#                            froze (run-scenarios exit 5), the scenarios
#                            that had not ended run again in a new one, at
#                            most SKIFF_BENCH_RETRIES times (default 2).
#                            LOG keeps the scenarios that ended (LOG.hostN
#                            each test host's whole console); a table
#                            shows "-" for what never did

REPO=$(cd "$(dirname "$SCRIPT")/.." && pwd)

die() {
	echo "$NAME: error: $*" >&2
	exit 1
}

usage() {
	sed -n '2,/^set -euo/p' "$SCRIPT" | sed '$d; s/^# \{0,1\}//' >&2
	exit 2
}

bench_args() {
	rounds=2
	secs=5
	skiff=${SKIFF_BIN:-$REPO/target/release/skiff}
	while [ $# -gt 0 ]; do
		case "$1" in
		-n) rounds=${2:?-n needs a number}; shift 2 ;;
		-t) secs=${2:?-t needs seconds}; shift 2 ;;
		--skiff) skiff=${2:?--skiff needs a path}; shift 2 ;;
		-h | --help) usage ;;
		*) echo "$NAME: unknown argument: $1" >&2; usage ;;
		esac
	done
	[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || die "-n wants a positive number"
	[[ "$secs" =~ ^[1-9][0-9]*$ ]] || die "-t wants a positive number of seconds"
	[ -x "$skiff" ] || die "no skiff binary at $skiff: cargo build --release -p vmm (or --skiff PATH)"
}

need_tool() {
	command -v "$1" >/dev/null && return
	echo "$NAME: installing $2" >&2
	if [ "$(id -u)" -eq 0 ]; then apt-get install -y -q "$2" >/dev/null; else sudo apt-get install -y -q "$2" >/dev/null; fi
}

copy_with_libs() {
	mkdir -p "$3$(dirname "$2")" "$3/lib64"
	cp -L "$1" "$3$2"
	ldd "$1" | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}' | while read -r lib; do
		mkdir -p "$3$(dirname "$lib")"
		cp -L "$lib" "$3$lib"
	done
}

cpio_of() { (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet); }

zstd_archive() {
	cpio_of "$1" | zstd -q -T0 -3 >"$2.tmp"
	local pad=$(((4 - $(stat -c %s "$2.tmp") % 4) % 4))
	head -c "$pad" /dev/zero >>"$2.tmp"
	mv "$2.tmp" "$2"
}

# COLUMN of FILE's records whose first columns are VALUE..., one a line.
column_of() {
	local file=$1 col=$2
	shift 2
	awk -v col="$col" -v want="$*" '
		BEGIN { n = split(want, w, " ") }
		{ for (i = 1; i <= n; i++) if ($i != w[i]) next; print $(col) }' "$file"
}

median() {
	column_of "$@" |
		sort -n | awk -v OFMT='%.10g' '{ a[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

count() {
	local file=$1
	shift
	column_of "$file" 1 "$@" | awk 'END { print NR }'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b }'; }

run_batch() {
	local scen=$1 log=$2 todo="$1.todo" part rc tries=0
	local retries=${SKIFF_BENCH_RETRIES:-2}
	cp "$scen" "$todo"
	rm -f "$log".host*
	: >"$log"
	while :; do
		rc=0
		part="$log.host$((tries + 1))"
		"$REPO/tests/testhost/run-scenarios.sh" "$todo" "$part" || rc=$?
		# Only scenarios that ended count: a frozen one's first rows would
		# add a sample to its round.
		tr -d '\r' <"$part" | awk '
			/^=== BEGIN / { buf = $0 "\n"; inside = 1; next }
			inside { buf = buf $0 "\n" }
			/^=== END / && inside { printf "%s", buf; inside = 0 }' >>"$log"
		case $rc in
		0) break ;;
		5) ;;
		*) die "the benchmark run failed; log: $part" ;;
		esac
		awk -F'\t' 'FILENAME == ARGV[1] { if ($0 ~ /^=== END /) { split($0, w, " "); done[w[3]] = 1 }; next }
			NF >= 3 && !($1 in done)' "$log" "$scen" >"$todo"
		left=$(wc -l <"$todo")
		((left > 0)) || break
		if ((tries >= retries)); then
			echo "$NAME: warning: the test host froze $((tries + 1)) time(s); $left scenario(s) never ran (see $part): the table holds what finished" >&2
			break
		fi
		tries=$((tries + 1))
		echo "$NAME: the test host froze (its emulated SVM); running the $left scenario(s) left in a new one" >&2
	done
	rm -f "$todo"
}

vmm_rounds() {
	local i v vmm order
	for ((i = 1; i <= rounds; i++)); do
		if ((i % 2)); then order=(skiff qemu); else order=(qemu skiff); fi
		for v in "${order[@]}"; do
			vmm='$SKIFF'
			[ "$v" = qemu ] && vmm='$QEMU'
			printf '%s\t%s\t%s\n' "bench-$v-$i" "$1" "$2$vmm $(argv)"
		done
	done
}

fio_records() {
	tr -d '\r' <"$1" | awk '
		/=== BEGIN / { who = $3; sub(/^bench-/, "", who); sub(/-[0-9]+$/, "", who); next }
		/SKIFF-FIO |HOST-FIO / {
			sub(/.*-FIO /, ""); if (NF >= 3) print who, $1, $2, $3, (NF >= 4 ? $4 : "-")
		}' >"$2"
}

fio_archive() {
	need_tool fio fio
	local fio work key
	fio=$(command -v fio)
	eval "$("$REPO/resources/guest-assets.sh" --quiet --env)"
	work="$SKIFF_CACHE/bench"
	mkdir -p "$work"
	key="$(sha256sum "$fio" "$SKIFF_L2_INITRD" "$REPO/resources/bench-lib.sh" | sha256sum | cut -c1-16)"
	fio_l1="$work/l1-fio-$key.cpio.zst"
	[ -e "$fio_l1" ] && return
	echo "$NAME: packing fio for the guest and the test host" >&2
	rm -rf "$work"/root-* "$work"/*.cpio* "$work"/initrd-fio.img
	copy_with_libs "$fio" /usr/bin/fio "$work/root-l2"
	# The guest's initrd with fio appended (the kernel unpacks both).
	{ cat "$SKIFF_L2_INITRD"; cpio_of "$work/root-l2" | gzip -1; } >"$work/initrd-fio.img"
	copy_with_libs "$fio" /usr/bin/fio "$work/root-l1"
	# The guest's eight jobs, for the host's ceiling.
	cat >"$work/root-l1/usr/bin/fio-jobs" <<'EOS'
#!/bin/sh
# fio-jobs FILE SECONDS PREFIX [direct]: the benchmark's eight jobs on FILE
# (O_DIRECT with "direct": a block device; the test host's tmpfs has none).
f=$1
rt=$2
pre=$3
direct=0
[ "${4:-}" = direct ] && direct=1
for job in "read 1m 1" "read 1m 32" "write 1m 1" "write 1m 32" \
	"randread 4k 1" "randread 4k 32" "randwrite 4k 1" "randwrite 4k 32"; do
	set -- $job
	out=$(fio --name=j --filename="$f" --direct=$direct --ioengine=libaio --rw="$1" --bs="$2" \
		--iodepth="$3" --runtime="$rt" --time_based --size=192M --output-format=terse \
		--terse-version=3 2>/dev/null | tail -n 1)
	echo "$pre $1-$2-qd$3 $(echo "$out" | awk -F';' '{ if ($7 > 0) print $7, $8; else print $48, $49 }')"
done
EOS
	# The test host's NVMe controller: with its own driver (the ceiling),
	# or bound to vfio-pci (printing its address) for a VMM to pass.
	cat >"$work/root-l1/usr/bin/nvme-to-vfio" <<'EOS'
#!/bin/sh
# nvme-to-vfio host|vfio: the NVMe controller bound to nvme (waits for
# /dev/nvme0n1) or to vfio-pci (prints DDDD:BB:DD.F).
for d in /sys/bus/pci/devices/*; do
	[ "$(cat "$d/class")" = 0x010802 ] && h=${d##*/}
done
[ -n "${h:-}" ] || { echo "nvme-to-vfio: no NVMe controller" >&2; exit 1; }
d=/sys/bus/pci/devices/$h
if [ "$1" = host ]; then
	while read -r m; do insmod "$L1_MODULES/$m" 2>/dev/null; done <"$L1_MODULES/order-nvme"
	i=0
	while [ ! -b /dev/nvme0n1 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
	[ -b /dev/nvme0n1 ] || { echo "nvme-to-vfio: no /dev/nvme0n1" >&2; exit 1; }
	exit 0
fi
while read -r m; do insmod "$L1_MODULES/$m" 2>/dev/null; done <"$L1_MODULES/order-vfio"
echo vfio-pci >"$d/driver_override"
[ -e "$d/driver" ] && echo "$h" >"$d/driver/unbind"
echo "$h" >/sys/bus/pci/drivers_probe
# The rest of its IOMMU group (the serial port beside it) lets go.
for o in "$d"/iommu_group/devices/*; do
	o=${o##*/}
	[ "$o" != "$h" ] && [ -e "/sys/bus/pci/devices/$o/driver" ] && echo "$o" >"/sys/bus/pci/devices/$o/driver/unbind"
done
[ -e "/dev/vfio/$(basename "$(readlink "$d/iommu_group")")" ] || { echo "nvme-to-vfio: not bound" >&2; exit 1; }
echo "$h"
EOS
	chmod +x "$work/root-l1/usr/bin/fio-jobs" "$work/root-l1/usr/bin/nvme-to-vfio"
	mkdir -p "$work/root-l1/assets"
	cp "$work/initrd-fio.img" "$work/root-l1/assets/"
	zstd_archive "$work/root-l1" "$fio_l1"
	rm -rf "$work"/root-*
}
