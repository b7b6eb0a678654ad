#!/usr/bin/env bash
# Installs what Skiff's tests, benchmark and demo need on Debian (bookworm
# or newer), as root or through sudo. Idempotent, and a quick no-op when
# everything is there already.
#
#   resources/install-deps.sh
#
# On bookworm, QEMU comes from bookworm-backports (QEMU 10: the reference
# microvm and the test host), which this adds to the APT sources if needed.
# The Rust toolchain is not installed here: it must already be on PATH
# (cargo, Rust >= 1.80; e.g. from https://rustup.rs).
set -euo pipefail

say() { echo "install-deps: $*" >&2; }
die() {
	echo "install-deps: error: $*" >&2
	exit 1
}

# acpica-tools: iasl, which the ACPI unit test disassembles the tables with.
# e2fsprogs, erofs-utils: mkfs.ext4 and mkfs.erofs build the virtio-blk
# tests' disk images.
# make, libelf1, zlib1g: guest-assets.sh rebuilds one guest kernel module
# (virtio_mmio) against Debian's kernel headers.
# libseccomp-dev, libcap-ng-dev: to build virtiofsd (below), the
# vhost-user-fs tests' backend.
# qemu-utils: qemu-img, which the qcow2 tests make and check images with.
# libvdeplug-dev: skiff links libvdeplug for -netdev vde; vde2: vde_switch,
# the switch the vde tests (and the NixOS test driver) run.
# python3, python3-venv: QEMU's QMP client library (qemu.qmp, from PyPI into
# a venv by guest-assets.sh), which the QMP tests drive skiff with.
PKGS=(qemu-system-x86 seabios busybox-static cpio socat iproute2 pkg-config libslirp-dev libglib2.0-dev lz4 zstd xz-utils gzip gcc libc6-dev
	binutils util-linux grep gawk coreutils make libelf1 zlib1g acpica-tools e2fsprogs erofs-utils
	libseccomp-dev libcap-ng-dev python3 python3-venv libvdeplug-dev vde2 qemu-utils)
# virtiofsd from crates.io, as microvm.nix users run it (Debian's is older).
VIRTIOFSD_VERSION=1.14.0

# virtiofsd: on PATH, or where cargo install puts it.
virtiofsd_path() {
	local p
	for p in "${SKIFF_VIRTIOFSD:-}" "$(command -v virtiofsd 2>/dev/null || true)" \
		"${CARGO_HOME:-$HOME/.cargo}/bin/virtiofsd"; do
		[ -n "$p" ] && [ -x "$p" ] && echo "$p" && return 0
	done
	return 1
}

install_virtiofsd() {
	if p=$(virtiofsd_path); then
		say "virtiofsd: $p"
		return 0
	fi
	command -v cargo >/dev/null || die "cargo is needed to build virtiofsd (install Rust >= 1.80)"
	say "building virtiofsd $VIRTIOFSD_VERSION (cargo install, about a minute)"
	cargo install --locked --quiet --version "$VIRTIOFSD_VERSION" virtiofsd ||
		die "cargo install virtiofsd failed"
}
MIN_QEMU_MAJOR=8

qemu_major() {
	qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p'
}

# Installed packages (status "ii"); dpkg-query is quick and needs no lock.
installed=$(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${PKGS[@]}" 2>/dev/null | awk '$2 == "ii" {print $1}' || true)
missing=()
for pkg in "${PKGS[@]}"; do
	grep -qx "$pkg" <<<"$installed" || missing+=("$pkg")
done
qv=$(qemu_major || true)
if [ "${#missing[@]}" -eq 0 ] && [ -n "$qv" ] && [ "$qv" -ge "$MIN_QEMU_MAJOR" ]; then
	command -v cargo >/dev/null || say "warning: cargo is not on PATH (install Rust >= 1.80, e.g. with rustup)"
	install_virtiofsd
	say "all dependencies present (QEMU $qv)"
	exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
	SUDO=()
elif command -v sudo >/dev/null; then
	SUDO=(sudo)
else
	die "run as root (or install sudo): missing ${missing[*]:-a recent QEMU}"
fi
command -v apt-get >/dev/null || die "this script needs Debian (apt-get)"

codename=$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release 2>/dev/null | tr -d '"')
target=()
if [ "$codename" = bookworm ]; then
	# QEMU from bookworm-backports.
	if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
		if [ -f /etc/apt/sources.list.d/debian.sources ] &&
			grep -q '^Suites: bookworm bookworm-updates$' /etc/apt/sources.list.d/debian.sources; then
			say "adding bookworm-backports to /etc/apt/sources.list.d/debian.sources"
			"${SUDO[@]}" sed -i 's/^Suites: bookworm bookworm-updates$/& bookworm-backports/' \
				/etc/apt/sources.list.d/debian.sources
		else
			mirror=$(grep -hoE '^deb +(\[[^]]*\] +)?https?://[^ ]+/debian/? +bookworm( |$)' \
				/etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
				sed -n '1{s/.*\(https\{0,1\}:\/\/[^ ]*\).*/\1/p; q}' || true)
			mirror=${mirror:-http://deb.debian.org/debian}
			say "adding bookworm-backports ($mirror) in /etc/apt/sources.list.d/bookworm-backports.list"
			echo "deb $mirror bookworm-backports main" |
				"${SUDO[@]}" tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
		fi
	fi
	target=(-t bookworm-backports)
fi

say "apt-get update"
"${SUDO[@]}" apt-get update -q >/dev/null || die "apt-get update failed"
if [ "${#target[@]}" -gt 0 ]; then
	# QEMU (and what it needs) from backports, the rest from the release.
	others=()
	for pkg in "${PKGS[@]}"; do
		case "$pkg" in qemu-system-x86 | seabios) ;; *) others+=("$pkg") ;; esac
	done
	say "installing: ${others[*]}"
	"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		"${others[@]}" >/dev/null || die "apt-get install failed"
	say "installing from bookworm-backports: qemu-system-x86 seabios"
	"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		"${target[@]}" qemu-system-x86 seabios >/dev/null || die "apt-get install ${target[*]} qemu-system-x86 failed"
else
	say "installing: ${PKGS[*]}"
	"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		"${PKGS[@]}" >/dev/null || die "apt-get install failed"
fi
qv=$(qemu_major || true)
{ [ -n "$qv" ] && [ "$qv" -ge "$MIN_QEMU_MAJOR" ]; } || die "QEMU >= $MIN_QEMU_MAJOR needed, have '${qv:-none}'"
install_virtiofsd
say "done (QEMU $qv)"
