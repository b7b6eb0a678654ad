#!/bin/sh
# Runs a batch of scenarios where /dev/kvm is usable: inside the test host
# (L1, under busybox sh) or directly on a hardware-KVM machine.
#
#   scenarios-inner.sh SCENARIOS_FILE
#
# SCENARIOS_FILE: lines NAME<TAB>TIMEOUT<TAB>SHELL COMMAND; blank lines and
# lines starting with # are ignored. TIMEOUT is seconds, optionally
# followed by ":pipe" to give the command a stdin that stays open (an idle
# pipe) instead of /dev/null, or ":console" for the console itself, in raw
# mode (interactive use: resources/demo.sh --shell).
#
# Environment (set by the caller): SKIFF QEMU BZIMAGE BZIMAGE_GENERIC VMLINUX INITRD STAMP,
# WORK_ROOT (each scenario gets a fresh $WORK under it), optionally
# FIRECRACKER CLOUD_HYPERVISOR VIRTIOFSD, CONSOLE_DEV (the terminal of ":console"
# scenarios, default /dev/tty).
#
# Output, per scenario, on stdout:
#   === BEGIN NAME
#   ...the command's stdout and stderr...
#   === END NAME rc=N ms=T
# rc is the command's exit status, 124 on time-out (the whole process group
# is killed then). ms is the wall time in milliseconds.
set -u
file=$1
: "${WORK_ROOT:=/tmp/skiff-work}"
tab=$(printf '\t')
export SKIFF QEMU BZIMAGE BZIMAGE_GENERIC VMLINUX INITRD STAMP
# A scenario cut short by its time limit (SIGTERM) makes skiff print where
# each vCPU was: the clue to a guest that stopped making progress.
export SKIFF_STALL_DUMP=1

while IFS="$tab" read -r name timeout cmd; do
	case "$name" in
	"" | "#"*) continue ;;
	esac
	mode=null
	case "$timeout" in
	*:pipe)
		mode=pipe
		timeout=${timeout%:pipe}
		;;
	*:console)
		mode=console
		timeout=${timeout%:console}
		;;
	esac
	WORK="$WORK_ROOT/$name"
	rm -rf "$WORK"
	mkdir -p "$WORK"
	export WORK
	echo "=== BEGIN $name"
	res="$WORK/.stamp-result"
	if [ "$mode" = pipe ]; then
		mkfifo "$WORK/.stdin"
		sleep 2147483647 >"$WORK/.stdin" &
		holder=$!
		(cd "$WORK" && "$STAMP" -t "$timeout" -r "$res" -- sh -c "$cmd") <"$WORK/.stdin"
		rc=$?
		kill "$holder" 2>/dev/null
		wait "$holder" 2>/dev/null
	elif [ "$mode" = console ]; then
		dev=${CONSOLE_DEV:-/dev/tty}
		saved=$(stty -F "$dev" -g 2>/dev/null) || saved=
		stty -F "$dev" raw -echo 2>/dev/null
		(cd "$WORK" && "$STAMP" -t "$timeout" -r "$res" -- sh -c "$cmd") <"$dev"
		rc=$?
		[ -z "$saved" ] || stty -F "$dev" "$saved" 2>/dev/null
	else
		(cd "$WORK" && "$STAMP" -t "$timeout" -r "$res" -- sh -c "$cmd") </dev/null
		rc=$?
	fi
	ms=
	if [ -f "$res" ]; then
		# rc=N exit_ms=N marker_ms=N maxrss_kb=N
		read -r _ ms _ <"$res"
		ms=${ms#exit_ms=}
	fi
	echo
	echo "=== END $name rc=$rc ms=${ms:-?}"
done <"$file"
