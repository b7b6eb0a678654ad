#!/usr/bin/env bash
# Fetches and builds everything the integration tests boot, into a cache
# outside the repository: ${SKIFF_CACHE:-$HOME/.cache/skiff}.
# Idempotent: each product is rebuilt only when what it is made of changed.
#
#   resources/guest-assets.sh [--l1|--no-l1] [--env] [--quiet]
#
#   --l1 / --no-l1  build the test-host (L1) parts or not. Default: only
#                   when this machine needs a test host, i.e. its CPU flags
#                   show no vmx/svm (override with SKIFF_TEST_HOST=l1|direct).
#   --env           print the products as shell assignments (for eval).
#   --quiet         no progress messages.
#
# Products (under $SKIFF_CACHE):
#   l2/bzImage      the guest kernel: Debian linux-image-cloud-amd64, or the
#                   file named by SKIFF_TEST_KERNEL (e.g. a NixOS bzImage).
#   l2/bzImage-generic  Debian linux-image-amd64 (has MP-table support),
#                   for the acpi=off tests.
#   l2/vmlinux      the same kernel uncompressed (ELF with the PVH note), or
#                   SKIFF_TEST_VMLINUX when given.
#   l2/initrd.img   busybox-static + virtio modules + resources/guest/init.
#                   Modules come from the Debian cloud kernel (or from
#                   SKIFF_TEST_MODULES, a lib/modules/VERSION directory
#                   named after that kernel's release, when SKIFF_TEST_KERNEL
#                   is set) and from the generic one.
#   l2/virtio_mmio.ko, l2/generic/virtio_mmio.ko   Debian's virtio_mmio
#                   rebuilt (from linux-source, against each kernel's
#                   headers) with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, for
#                   acpi=off guests.
#   l2/store.img, l2/store-data.bin, l2/vol.img  disk images for the
#                   virtio-blk tests (a store with a known file, a volume).
#   tools/stamp, tools/outb, tools/vsock, tools/xattr, tools/zeroout   static helpers from resources/tools.
#   tools/tiny-pvh.elf  a PVH guest that halts forever (host-side tests on any /dev/kvm).
#   py/                 a venv with QEMU's QMP client library (qemu.qmp).
#   l1/vmlinux      test-host kernel (Debian linux-image-amd64), booted PVH.
#   l1/l1-base.cpio.zst   test-host root: busybox, KVM, vhost-vsock (and VFIO) modules,
#                   stamp, the L2 bzImage and initrd under /assets.
#   l1/l1-qemu.cpio.zst   qemu-system-x86_64 with its libraries and the
#                   firmware files microvm opens (appended when needed).
#   l1/l1-vmlinux.cpio.zst  /assets/vmlinux (appended when needed).
#
# Needs: apt-get (Debian package lists updated), dpkg, cpio, gzip, zstd,
# lz4, xz, gcc, readelf, ldd. resources/install-deps.sh installs them.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${SKIFF_CACHE:-$HOME/.cache/skiff}

want_l1=auto
print_env=0
quiet=0
for arg in "$@"; do
	case "$arg" in
	--l1) want_l1=1 ;;
	--no-l1) want_l1=0 ;;
	--env) print_env=1 ;;
	--quiet) quiet=1 ;;
	-h | --help)
		sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "guest-assets.sh: unknown argument: $arg" >&2
		exit 2
		;;
	esac
done

log() { [ "$quiet" = 1 ] || echo "guest-assets: $*" >&2; }
die() {
	echo "guest-assets: error: $*" >&2
	exit 1
}

if [ "$want_l1" = auto ]; then
	case "${SKIFF_TEST_HOST:-auto}" in
	l1) want_l1=1 ;;
	direct) want_l1=0 ;;
	auto)
		if grep -qwE 'vmx|svm' /proc/cpuinfo; then want_l1=0; else want_l1=1; fi
		;;
	*) die "SKIFF_TEST_HOST must be auto, l1 or direct (is '${SKIFF_TEST_HOST}')" ;;
	esac
fi

for tool in apt-get apt-cache dpkg cpio gzip zstd lz4 xz gcc readelf ldd sha256sum flock; do
	command -v "$tool" >/dev/null || die "'$tool' is missing: run resources/install-deps.sh"
done

mkdir -p "$CACHE"/{debs,pkg,l1,l2,tools,tmp}
exec 9>"$CACHE/.lock"
flock 9

# ---------------------------------------------------------------- helpers

# key_of ARGS...: a digest of strings and (for existing paths) file contents
# (small files) or name+size+mtime (large files, directories).
key_of() {
	local a
	for a in "$@"; do
		if [ -f "$a" ] && [ "$(stat -c %s "$a")" -lt 1048576 ]; then
			printf 'file %s ' "$a"
			sha256sum <"$a"
		elif [ -e "$a" ]; then
			stat -L -c 'path %n %s %Y' "$a"
		else
			printf 'str %s\n' "$a"
		fi
	done | sha256sum | cut -c1-32
}
up_to_date() { [ -e "$1" ] && [ -f "$1.key" ] && [ "$(cat "$1.key")" = "$2" ]; }
mark() { printf '%s\n' "$2" >"$1.key"; }

# fetch_pkg NAME VERSION: download (once) and unpack (once); prints the
# unpack dir. VERSION empty: offline, use what an earlier run fetched.
fetch_pkg() {
	local name=$1 ver=$2 deb dir
	if [ -z "$ver" ]; then
		dir=$(find "$CACHE/pkg" -maxdepth 1 -name "${name}_*" -type d | sort | tail -n1)
		{ [ -n "$dir" ] && [ -f "$dir/.done" ]; } ||
			die "cannot resolve Debian package $name: run resources/install-deps.sh (it runs apt-get update)"
		echo "$dir"
		return
	fi
	local safe=${ver//:/%3a}
	dir="$CACHE/pkg/${name}_${safe}"
	if [ -f "$dir/.done" ]; then
		echo "$dir"
		return
	fi
	deb=$(find "$CACHE/debs" -maxdepth 1 -name "${name}_${safe}_*.deb" -print -quit)
	if [ -z "$deb" ]; then
		log "downloading $name $ver"
		local out
		if ! out=$(cd "$CACHE/debs" && apt-get download -o APT::Sandbox::User="$(id -un)" "$name=$ver" 2>&1); then
			echo "$out" >&2
			die "apt-get download $name=$ver failed"
		fi
		deb=$(find "$CACHE/debs" -maxdepth 1 -name "${name}_${safe}_*.deb" -print -quit)
		[ -n "$deb" ] || die "apt-get download $name gave no ${name}_${safe}_*.deb"
	fi
	rm -rf "$dir"
	mkdir -p "$dir"
	dpkg -x "$deb" "$dir"
	touch "$dir/.done"
	# Old versions of this package are no longer needed.
	find "$CACHE/pkg" -maxdepth 1 -name "${name}_*" -type d ! -path "$dir" -exec rm -rf {} +
	find "$CACHE/debs" -maxdepth 1 -name "${name}_*.deb" ! -path "$deb" -delete
	echo "$dir"
}

# extract_vmlinux BZIMAGE OUT: the uncompressed ELF kernel inside a bzImage.
extract_vmlinux() {
	local img=$1 out=$2 tmp="$2.tmp" fmt magic cmd off
	for fmt in lz4 xz zstd gzip; do
		case $fmt in
		lz4) magic='\x02\x21\x4c\x18' cmd='lz4 -dc' ;;
		xz) magic='\xfd7zXZ\x00' cmd='xz -dc' ;;
		zstd) magic='\x28\xb5\x2f\xfd' cmd='zstd -dc' ;;
		gzip) magic='\x1f\x8b\x08' cmd='gzip -dc' ;;
		esac
		while IFS=: read -r off _; do
			tail -c +$((off + 1)) "$img" | $cmd >"$tmp" 2>/dev/null || true
			if [ -s "$tmp" ] && readelf -h "$tmp" >/dev/null 2>&1; then
				mv "$tmp" "$out"
				return 0
			fi
		done < <(LC_ALL=C grep -obUaP -m8 "$magic" "$img")
	done
	rm -f "$tmp"
	return 1
}

# find_module DIR NAME: the NAME.ko[.xz|.zst|.gz] under DIR (- and _ alike).
find_module() {
	local alt=${2//-/_} alt2=${2//_/-}
	find "$1" \( -name "$2.ko*" -o -name "$alt.ko*" -o -name "$alt2.ko*" \) -print -quit 2>/dev/null
}

# copy_module SRC DESTDIR: copy, decompressing so busybox insmod loads it;
# prints the installed file name.
copy_module() {
	local src=$1 name
	name=$(basename "$src")
	name=${name%.xz}
	name=${name%.zst}
	name=${name%.gz}
	case "$src" in
	*.ko.xz) xz -dc "$src" >"$2/$name" ;;
	*.ko.zst) zstd -q -dc "$src" >"$2/$name" ;;
	*.ko.gz) gzip -dc "$src" >"$2/$name" ;;
	*) cp "$src" "$2/$name" ;;
	esac
	echo "$name"
}

# install_busybox BUSYBOX ROOT: busybox at /bin/busybox + applet links.
install_busybox() {
	local bb=$1 root=$2 applet
	mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin"
	cp "$bb" "$root/bin/busybox"
	for applet in $("$bb" --list-full); do
		[ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
	done
}

# make_cpio ROOT: newc archive of ROOT on stdout, files owned by root.
make_cpio() {
	(cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet)
}

# ------------------------------------------------------------ packages
start=$(date +%s)
# Real package names and versions. apt-cache takes ~0.6 s a call here, so
# the answer is kept until the package lists change.
lists_key=$(stat -c '%n %Y' /var/lib/apt/lists /var/lib/apt/lists/*Packages* 2>/dev/null | sha256sum | cut -c1-32)
resolved="$CACHE/resolved"
if [ ! -f "$resolved" ] || [ "$(head -n1 "$resolved")" != "$lists_key" ]; then
	deps=$(apt-cache depends linux-image-cloud-amd64 linux-image-amd64 2>/dev/null || true)
	cloud_pkg=$(awk '/^linux-image-cloud-amd64$/{f=1; next} f && /Depends:/{print $2; exit}' <<<"$deps")
	generic_pkg=$(awk '/^linux-image-amd64$/{f=1; next} f && /Depends:/{print $2; exit}' <<<"$deps")
	if [ -n "$cloud_pkg" ] && [ -n "$generic_pkg" ]; then
		{
			echo "$lists_key"
			apt-cache show --no-all-versions "$cloud_pkg" "$generic_pkg" busybox-static 2>/dev/null |
				awk '/^Package: /{p=$2} /^Version: /{print p, $2}'
		} >"$resolved.tmp"
		mv "$resolved.tmp" "$resolved"
	else
		rm -f "$resolved"
	fi
fi
if [ -f "$resolved" ]; then
	cloud_pkg=$(awk 'NR > 1 && $1 ~ /^linux-image-.*-cloud-amd64$/ {print $1}' "$resolved")
	generic_pkg=$(awk 'NR > 1 && $1 ~ /^linux-image-.*-amd64$/ && $1 !~ /cloud/ {print $1}' "$resolved")
else
	# Offline: fall back to the newest unpacked ones.
	cloud_pkg=$(find "$CACHE/pkg" -maxdepth 1 -name 'linux-image-*-cloud-amd64_*' -printf '%f\n' | sort | tail -n1 | cut -d_ -f1)
	generic_pkg=$(find "$CACHE/pkg" -maxdepth 1 -name 'linux-image-*-amd64_*' ! -name '*cloud*' -printf '%f\n' | sort | tail -n1 | cut -d_ -f1)
	{ [ -n "$cloud_pkg" ] && [ -n "$generic_pkg" ]; } ||
		die "cannot resolve linux-image-cloud-amd64 / linux-image-amd64: run resources/install-deps.sh (it runs apt-get update)"
fi
# version_of PKG: its resolved version, empty when offline.
version_of() {
	[ -f "$resolved" ] || return 0
	awk -v p="$1" 'NR > 1 && $1 == p {print $2}' "$resolved"
}
busybox_dir=$(fetch_pkg busybox-static "$(version_of busybox-static)")
BUSYBOX="$busybox_dir/bin/busybox"
[ -x "$BUSYBOX" ] || die "no bin/busybox in busybox-static"

# --------------------------------------------------------------- tools
for t in stamp outb vsock xattr zeroout; do
	src="$REPO/resources/tools/$t.c"
	k=$(key_of "$src" "$(gcc -dumpfullversion)")
	if ! up_to_date "$CACHE/tools/$t" "$k"; then
		log "building tools/$t"
		if [ "$t" = outb ]; then
			gcc -Os -Wall -ffreestanding -fno-builtin -static -nostdlib -fno-pie -no-pie \
				-fno-stack-protector -Wl,--build-id=none -s -o "$CACHE/tools/$t" "$src"
		else
			gcc -O2 -Wall -static -s -o "$CACHE/tools/$t" "$src" ||
				die "building stamp needs a static libc: apt-get install libc6-dev"
		fi
		mark "$CACHE/tools/$t" "$k"
	fi
done
# The tiny PVH guest (a halting loop) for host-side tests on any /dev/kvm.
src="$REPO/resources/tools/tiny-pvh.S"
k=$(key_of "$src" "$(as --version | head -n 1)")
if ! up_to_date "$CACHE/tools/tiny-pvh.elf" "$k"; then
	log "building tools/tiny-pvh.elf"
	as --64 -o "$CACHE/tools/tiny-pvh.o" "$src"
	ld -m elf_x86_64 -N -Ttext=0x100000 -e _start --build-id=none --no-warn-rwx-segments \
		-o "$CACHE/tools/tiny-pvh.elf" "$CACHE/tools/tiny-pvh.o"
	rm -f "$CACHE/tools/tiny-pvh.o"
	mark "$CACHE/tools/tiny-pvh.elf" "$k"
fi
# QEMU's own QMP client library (qemu.qmp), in a venv of its own: the QMP
# tests talk to skiff as QEMU tooling does.
QMP_PY=qemu.qmp==0.0.6
if ! up_to_date "$CACHE/py" "$QMP_PY"; then
	log "installing $QMP_PY into $CACHE/py"
	rm -rf "$CACHE/py"
	python3 -m venv "$CACHE/py" || die "python3 -m venv failed: apt-get install python3-venv"
	"$CACHE/py/bin/pip" install --quiet "$QMP_PY" || die "pip install $QMP_PY failed"
	mark "$CACHE/py" "$QMP_PY"
fi
STAMP="$CACHE/tools/stamp"
OUTB="$CACHE/tools/outb"
VSOCK_TOOL="$CACHE/tools/vsock"

# --------------------------------------------------------- L2 kernel
L2_MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_mmio virtio-rng virtio_blk failover net_failover virtio_net fuse virtiofs libcrc32c erofs button evdev vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport netfs fscache 9pnet 9pnet_virtio 9p"
# Carried but loaded only by the init actions that need them (every boot
# would otherwise pay for their probing).
L2_ON_DEMAND="qemu_fw_cfg virtio_balloon virtio_console virtio_input"
if [ -n "${SKIFF_TEST_KERNEL:-}" ]; then
	[ -f "$SKIFF_TEST_KERNEL" ] || die "SKIFF_TEST_KERNEL=$SKIFF_TEST_KERNEL: no such file"
	kernel_src=$SKIFF_TEST_KERNEL
	moddir=${SKIFF_TEST_MODULES:-}
	[ -z "$moddir" ] || [ -d "$moddir" ] || die "SKIFF_TEST_MODULES=$moddir: no such directory"
	[ -n "$moddir" ] || log "SKIFF_TEST_KERNEL without SKIFF_TEST_MODULES: the initrd gets no modules"
else
	cloud_dir=$(fetch_pkg "$cloud_pkg" "$(version_of "$cloud_pkg")")
	kernel_src=$(find "$cloud_dir/boot" -name 'vmlinuz-*' -print -quit)
	moddir=$(find "$cloud_dir/lib/modules" -mindepth 1 -maxdepth 1 -type d -print -quit)
fi
[ -f "$kernel_src" ] || die "no guest kernel found"

k=$(key_of "$kernel_src")
if ! up_to_date "$CACHE/l2/bzImage" "$k"; then
	log "guest kernel: $kernel_src"
	cp "$kernel_src" "$CACHE/l2/bzImage.tmp"
	mv "$CACHE/l2/bzImage.tmp" "$CACHE/l2/bzImage"
	mark "$CACHE/l2/bzImage" "$k"
fi
k=$(key_of "$CACHE/l2/bzImage.key" "${SKIFF_TEST_VMLINUX:-}")
if ! up_to_date "$CACHE/l2/vmlinux" "$k"; then
	if [ -n "${SKIFF_TEST_VMLINUX:-}" ]; then
		cp "$SKIFF_TEST_VMLINUX" "$CACHE/l2/vmlinux"
	else
		log "extracting l2/vmlinux"
		extract_vmlinux "$CACHE/l2/bzImage" "$CACHE/l2/vmlinux" ||
			die "could not extract an ELF vmlinux from $kernel_src (set SKIFF_TEST_VMLINUX)"
	fi
	mark "$CACHE/l2/vmlinux" "$k"
fi

# ------------------------------------------ L2 kernel with MP tables
# Debian's generic kernel (CONFIG_X86_MPPARSE=y, unlike the cloud one):
# the acpi=off tests boot it, since without ACPI the MP table is the only
# way a guest learns of its IOAPIC and other CPUs.
generic_dir=$(fetch_pkg "$generic_pkg" "$(version_of "$generic_pkg")")
generic_kernel=$(find "$generic_dir/boot" -name 'vmlinuz-*' -print -quit)
[ -f "$generic_kernel" ] || die "no vmlinuz in $generic_pkg"
generic_moddir=$(find "$generic_dir/lib/modules" -mindepth 1 -maxdepth 1 -type d -print -quit)
[ -d "$generic_moddir" ] || die "no lib/modules in $generic_pkg"
if ! cmp -s "$generic_kernel" "$CACHE/l2/bzImage-generic" 2>/dev/null; then
	cp "$generic_kernel" "$CACHE/l2/bzImage-generic"
fi

# ------------------------------- virtio_mmio with command-line devices
# Debian builds virtio_mmio without CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, so
# its guests cannot take a virtio-mmio device from `virtio_mmio.device=`
# (how a VMM describes one without ACPI; NixOS kernels have the option).
# The same driver source (linux-source, same version), built against each
# Debian kernel's headers with the option on, replaces Debian's module in
# the test initrd; it still finds devices through ACPI as before. The one
# source file is kept, so the 140 MB source package is fetched only once.
major=$(echo "${generic_pkg#linux-image-}" | cut -d. -f1-2)

# mmio_src VER: virtio_mmio.c of linux-source-MAJOR VER, kept once fetched;
# VER empty (offline): the newest one kept.
mmio_src() {
	local ver=$1 f src_dir
	mkdir -p "$CACHE/l2/src"
	if [ -z "$ver" ]; then
		f=$(find "$CACHE/l2/src" -name 'virtio_mmio-*.c' | sort | tail -n1)
		[ -n "$f" ] || die "cannot resolve linux-source-$major: run resources/install-deps.sh (it runs apt-get update)"
		echo "$f"
		return
	fi
	f="$CACHE/l2/src/virtio_mmio-${ver//:/%3a}.c"
	if [ ! -f "$f" ]; then
		src_dir=$(fetch_pkg "linux-source-$major" "$ver")
		tar -xJOf "$src_dir/usr/src/linux-source-$major.tar.xz" --wildcards '*/drivers/virtio/virtio_mmio.c' \
			>"$f.tmp" || die "no drivers/virtio/virtio_mmio.c in linux-source-$major"
		mv "$f.tmp" "$f"
		rm -rf "$src_dir"
		rm -f "$CACHE/debs/linux-source-${major}_"*.deb
	fi
	echo "$f"
}

# build_mmio_ko KVER OUT: virtio_mmio.ko for Debian's kernel KVER
# (6.1.0-56-cloud-amd64, 6.1.0-56-amd64) with command-line devices, from
# the source and headers of that kernel's own package version.
build_mmio_ko() {
	local kver=$1 out=$2 ver src k build hdr p
	ver=$(version_of "linux-image-$kver")
	src=$(mmio_src "$ver")
	k=$(key_of "$src" "$(gcc -dumpfullversion)" "$kver" "$ver" "mmio-cmdline-v2")
	up_to_date "$out" "$k" && return
	log "building virtio_mmio.ko for $kver with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"
	build="$CACHE/tmp/mmio-build"
	rm -rf "$build"
	mkdir -p "$build/root" "$build/mod"
	# The headers packages form one tree (relative symlinks between them).
	for p in "linux-headers-$kver" "linux-headers-$(echo "$kver" | sed -E 's/-(cloud-)?amd64$//')-common" \
		"linux-kbuild-$major"; do
		cp -a "$(fetch_pkg "$p" "$ver")/." "$build/root/"
	done
	hdr="$build/root/usr/src/linux-headers-$kver"
	sed -i "s|include /usr/src/|include $build/root/usr/src/|" "$hdr/Makefile"
	cp "$src" "$build/mod/virtio_mmio.c"
	printf 'obj-m := virtio_mmio.o\nccflags-y := -DCONFIG_VIRTIO_MMIO_CMDLINE_DEVICES\n' >"$build/mod/Kbuild"
	make -s -C "$hdr" M="$build/mod" modules >"$build/make.log" 2>&1 ||
		{ cat "$build/make.log" >&2; die "building virtio_mmio.ko for $kver failed"; }
	cp "$build/mod/virtio_mmio.ko" "$out"
	mark "$out" "$k"
	rm -rf "$build"
}

MMIO_KO=
if [ -z "${SKIFF_TEST_KERNEL:-}" ]; then
	MMIO_KO="$CACHE/l2/virtio_mmio.ko"
	build_mmio_ko "${cloud_pkg#linux-image-}" "$MMIO_KO"
fi
# Its own directory: the file name is the module name init passes
# `virtio_mmio.*` parameters to.
mkdir -p "$CACHE/l2/generic"
MMIO_KO_GENERIC="$CACHE/l2/generic/virtio_mmio.ko"
build_mmio_ko "${generic_pkg#linux-image-}" "$MMIO_KO_GENERIC"

# --------------------------------------------------------- L2 initrd
# Modules for both guest kernels, each under /lib/modules/VERSION with its
# load order: init picks the running kernel's (uname -r).
k=$(key_of "$REPO/resources/guest/init" "$BUSYBOX" "$OUTB.key" "$VSOCK_TOOL.key" "$CACHE/tools/zeroout.key" "${moddir:-nomodules}" "$generic_moddir" \
	"$L2_MODULES" "$L2_ON_DEMAND" "${MMIO_KO:+$MMIO_KO.key}" "$MMIO_KO_GENERIC.key" "v2")
if ! up_to_date "$CACHE/l2/initrd.img" "$k"; then
	log "building l2/initrd.img"
	root="$CACHE/tmp/l2root"
	rm -rf "$root"
	mkdir -p "$root"/{proc,sys,dev,tmp,run,lib/modules}
	install_busybox "$BUSYBOX" "$root"
	cp "$OUTB" "$root/bin/outb"
	cp "$VSOCK_TOOL" "$root/bin/vsock"
	cp "$CACHE/tools/zeroout" "$root/bin/zeroout"
	install -m 0755 "$REPO/resources/guest/init" "$root/init"
	# add_modules MODDIR MMIO_KO: MODDIR's share of L2_MODULES, virtio_mmio
	# replaced by MMIO_KO when given.
	add_modules() {
		local dest m f
		dest="$root/lib/modules/$(basename "$1")"
		mkdir -p "$dest"
		: >"$dest/skiff-order"
		for m in $L2_MODULES; do
			f=$(find_module "$1" "$m")
			[ "$m" != virtio_mmio ] || [ -z "$2" ] || f=$2
			if [ -n "$f" ]; then
				copy_module "$f" "$dest" >>"$dest/skiff-order"
			else
				log "note: module $m not in $1 (built in or absent)"
			fi
		done
		for m in $L2_ON_DEMAND; do
			f=$(find_module "$1" "$m")
			[ -z "$f" ] || copy_module "$f" "$dest" >/dev/null
		done
	}
	[ -z "$moddir" ] || add_modules "$moddir" "$MMIO_KO"
	add_modules "$generic_moddir" "$MMIO_KO_GENERIC"
	make_cpio "$root" | gzip -6 >"$CACHE/l2/initrd.img.tmp"
	mv "$CACHE/l2/initrd.img.tmp" "$CACHE/l2/initrd.img"
	rm -rf "$root"
	mark "$CACHE/l2/initrd.img" "$k"
fi

# ------------------------------------------------------------ disk images
# For the virtio-blk tests: a small "store" holding data.bin (1 MiB of
# random bytes, also kept beside it as store-data.bin for the checksum) and
# a directory of 1,000 files, compressed erofs owned by root as microvm.nix
# builds its store disk by default; and an empty 32 MiB ext4 volume, as
# microvm.nix's startup-shutdown check uses.
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 missing: run resources/install-deps.sh (e2fsprogs)"
command -v mkfs.erofs >/dev/null || die "mkfs.erofs missing: run resources/install-deps.sh (erofs-utils)"
k=$(key_of "v2-disks")
if ! up_to_date "$CACHE/l2/store.img" "$k"; then
	log "building l2/store.img and l2/vol.img"
	d="$CACHE/tmp/storeroot"
	rm -rf "$d" "$CACHE/l2/store.img" "$CACHE/l2/vol.img"
	mkdir -p "$d/many"
	head -c 1048576 /dev/urandom >"$d/data.bin"
	for i in $(seq 1 1000); do echo "$i" >"$d/many/f$i"; done
	mkfs.erofs --quiet -zlz4hc --all-root "$CACHE/l2/store.img" "$d" >/dev/null
	cp "$d/data.bin" "$CACHE/l2/store-data.bin"
	mkfs.ext4 -q -F -L vol "$CACHE/l2/vol.img" 32M >/dev/null
	rm -rf "$d"
	mark "$CACHE/l2/store.img" "$k"
fi

# ------------------------------------------------------------ L1 host
if [ "$want_l1" = 1 ]; then
	# The test host runs the same generic kernel and its modules.
	l1_kernel=$generic_kernel
	l1_moddir=$generic_moddir

	k=$(key_of "$l1_kernel")
	if ! up_to_date "$CACHE/l1/vmlinux" "$k"; then
		# Booting the ELF through PVH skips the XZ decompression, which
		# takes ~3 s under TCG.
		log "extracting l1/vmlinux"
		extract_vmlinux "$l1_kernel" "$CACHE/l1/vmlinux" || die "could not extract vmlinux from $l1_kernel"
		mark "$CACHE/l1/vmlinux" "$k"
	fi

	# zstd_cpio ROOT OUT: compressed archive, padded to 4 bytes so that
	# archives can be concatenated (the kernel wants each one aligned).
	zstd_cpio() {
		make_cpio "$1" | zstd -q -T0 -6 >"$2.tmp"
		local pad=$(((4 - $(stat -c %s "$2.tmp") % 4) % 4))
		head -c "$pad" /dev/zero >>"$2.tmp"
		mv "$2.tmp" "$2"
	}

	# install_with_libs BIN DEST ROOT: a dynamically linked program and the
	# libraries ldd names, at their own paths under ROOT.
	install_with_libs() {
		mkdir -p "$(dirname "$2")" "$3/lib64"
		cp -L "$1" "$2"
		ldd "$1" | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}' | while read -r lib; do
			mkdir -p "$3$(dirname "$lib")"
			cp -L "$lib" "$3$lib"
		done
		[ -e "$3/lib64/ld-linux-x86-64.so.2" ] || cp -L /lib64/ld-linux-x86-64.so.2 "$3/lib64/"
	}

	# The test-host root comes in three archives that run-scenarios.sh
	# concatenates: the base (always), QEMU (when a scenario uses $QEMU),
	# the L2 vmlinux (when one uses $VMLINUX). Unpacking costs ~11 ms/MB
	# under TCG, so a test host gets only what its scenarios need.
	k=$(key_of "$REPO/tests/testhost/l1-init" "$BUSYBOX" "$l1_kernel" \
		"$CACHE/l2/bzImage.key" "$CACHE/l2/initrd.img.key" "$STAMP.key" "$CACHE/tools/xattr.key" "$generic_kernel" \
		"$CACHE/l2/store.img.key" "v14-qemu-img")
	if ! up_to_date "$CACHE/l1/l1-base.cpio.zst" "$k"; then
		log "building l1/l1-base.cpio.zst"
		root="$CACHE/tmp/l1root"
		rm -rf "$root"
		mkdir -p "$root"/{proc,sys,dev,tmp,run,var/tmp,etc,assets,lib/modules/l1,lib64,opt}
		install_busybox "$BUSYBOX" "$root"
		install -m 0755 "$REPO/tests/testhost/l1-init" "$root/init"
		cp "$STAMP" "$root/bin/stamp"
		cp "$CACHE/tools/xattr" "$root/bin/xattr"
		# socat: the QMP tests talk to skiff exactly as microvm.nix does.
		SOCAT_BIN=$(command -v socat) || die "socat missing: run resources/install-deps.sh"
		install_with_libs "$SOCAT_BIN" "$root/usr/bin/socat" "$root"
		# vde_switch (vde2) for -netdev vde, and libvdeplug's vde plugin,
		# which the library loads from beside itself: skiff's copy of it
		# lands in /lib (ldd's path; the test host's /lib is no link to
		# /usr/lib), vde_switch's may be in either.
		VDE_SWITCH_BIN=$(command -v vde_switch) || die "vde_switch missing: run resources/install-deps.sh (vde2)"
		install_with_libs "$VDE_SWITCH_BIN" "$root/usr/bin/vde_switch" "$root"
		plugin=/usr/lib/x86_64-linux-gnu/vdeplug/libvdeplug_vde.so
		[ -e "$plugin" ] || die "$plugin missing: run resources/install-deps.sh (libvdeplug2)"
		for dir in /usr/lib/x86_64-linux-gnu/vdeplug /lib/x86_64-linux-gnu/vdeplug; do
			install_with_libs "$plugin" "$root$dir/libvdeplug_vde.so" "$root"
		done
		# qemu-img (qemu-utils): the qcow2 tests make images and check what
		# skiff left in them with QEMU's own tool.
		QEMU_IMG_BIN=$(command -v qemu-img) || die "qemu-img missing: run resources/install-deps.sh (qemu-utils)"
		install_with_libs "$QEMU_IMG_BIN" "$root/usr/bin/qemu-img" "$root"
		# nobody: what -run-with user=nobody becomes.
		printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
		printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
		: >"$root/lib/modules/l1/order"
		: >"$root/lib/modules/l1/order-vfio"
		for m in irqbypass ccp kvm kvm-amd; do
			f=$(find_module "$l1_moddir" "$m")
			[ -n "$f" ] || die "module $m not found in $generic_pkg"
			copy_module "$f" "$root/lib/modules/l1" >>"$root/lib/modules/l1/order"
		done
		# vhost-vsock for -device vhost-vsock-*: /dev/vhost-vsock, and the
		# host's side of AF_VSOCK (CID 2) for the tests' socat.
		for m in vhost_iotlb vhost vsock vmw_vsock_virtio_transport_common vhost_vsock; do
			f=$(find_module "$l1_moddir" "$m")
			[ -n "$f" ] || { log "note: $m not in $generic_pkg"; continue; }
			copy_module "$f" "$root/lib/modules/l1" >>"$root/lib/modules/l1/order"
		done
		# Networking for -netdev tap: tun and vhost-net; macvtap on a dummy
		# link, as microvm.nix's runner uses it.
		for m in tun tap macvlan macvtap vhost_net dummy llc stp bridge; do
			f=$(find_module "$l1_moddir" "$m")
			[ -n "$f" ] || { log "note: $m not in $generic_pkg"; continue; }
			copy_module "$f" "$root/lib/modules/l1" >>"$root/lib/modules/l1/order"
		done
		# A loop-mounted ext4 (the test host's tmpfs, kernel 6.1, takes no
		# user xattrs): a 9p share with security_model=mapped-xattr.
		for m in loop crc16 mbcache jbd2 crc32c_generic ext4; do
			f=$(find_module "$l1_moddir" "$m")
			[ -n "$f" ] || { log "note: $m not in $generic_pkg"; continue; }
			copy_module "$f" "$root/lib/modules/l1" >>"$root/lib/modules/l1/order"
		done
		# iproute2's ip (busybox's cannot make a macvtap in bridge mode),
		# as /usr/sbin/ip: the scenarios name it by path.
		IP_BIN=$(command -v ip) || die "ip missing: run resources/install-deps.sh (iproute2)"
		install_with_libs "$IP_BIN" "$root/usr/sbin/ip" "$root"
		# QEMU's bridge helper, for -netdev bridge (qemu-system-common).
		if [ -x /usr/lib/qemu/qemu-bridge-helper ]; then
			install_with_libs /usr/lib/qemu/qemu-bridge-helper "$root/usr/lib/qemu/qemu-bridge-helper" "$root"
		else
			log "note: no /usr/lib/qemu/qemu-bridge-helper (qemu-system-common): -netdev bridge tests will fail"
		fi
		for m in vfio vfio_virqfd vfio_iommu_type1 vfio-pci-core vfio-pci; do
			f=$(find_module "$l1_moddir" "$m")
			[ -n "$f" ] || { log "note: $m not in $generic_pkg"; continue; }
			copy_module "$f" "$root/lib/modules/l1" >>"$root/lib/modules/l1/order-vfio"
		done
		# The NVMe driver, for the VFIO benchmark's ceiling: fio in the
		# test host on the controller it then passes through.
		: >"$root/lib/modules/l1/order-nvme"
		for m in crct10dif_common crct10dif_generic crc-t10dif crc64 crc64_rocksoft_generic \
			crc64-rocksoft t10-pi nvme-core nvme; do
			f=$(find_module "$l1_moddir" "$m")
			[ -n "$f" ] || continue
			copy_module "$f" "$root/lib/modules/l1" >>"$root/lib/modules/l1/order-nvme"
		done
		cp "$CACHE/l2/bzImage" "$CACHE/l2/bzImage-generic" "$CACHE/l2/initrd.img" "$root/assets/"
		cp "$CACHE/l2/store.img" "$CACHE/l2/store-data.bin" "$CACHE/l2/vol.img" "$root/assets/"
		zstd_cpio "$root" "$CACHE/l1/l1-base.cpio.zst"
		rm -rf "$root"
		mark "$CACHE/l1/l1-base.cpio.zst" "$k"
	fi

	QEMU_BIN=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 missing: run resources/install-deps.sh"
	k=$(key_of "$QEMU_BIN" "v2")
	if ! up_to_date "$CACHE/l1/l1-qemu.cpio.zst" "$k"; then
		log "building l1/l1-qemu.cpio.zst"
		root="$CACHE/tmp/l1qemu"
		rm -rf "$root"
		mkdir -p "$root/usr/bin" "$root/lib64" "$root/usr/share/qemu" "$root/usr/share/seabios"
		# QEMU, its libraries and the firmware files microvm opens
		# (bios-microvm.bin, linuxboot_dma.bin; keymaps for -device i8042).
		install_with_libs "$QEMU_BIN" "$root/usr/bin/qemu-system-x86_64" "$root"
		for f in linuxboot.bin linuxboot_dma.bin pvh.bin multiboot.bin multiboot_dma.bin kvmvapic.bin qboot.rom bios-microvm.bin; do
			if [ -e "/usr/share/qemu/$f" ]; then cp -L "/usr/share/qemu/$f" "$root/usr/share/qemu/"; fi
		done
		if [ -d /usr/share/qemu/keymaps ]; then cp -rL /usr/share/qemu/keymaps "$root/usr/share/qemu/"; fi
		for f in bios-microvm.bin bios-256k.bin bios.bin; do
			if [ -e "/usr/share/seabios/$f" ]; then cp -L "/usr/share/seabios/$f" "$root/usr/share/seabios/"; fi
		done
		if [ ! -e "$root/usr/share/seabios/bios-microvm.bin" ] && [ ! -e "$root/usr/share/qemu/bios-microvm.bin" ]; then
			log "warning: bios-microvm.bin not found (package seabios): QEMU microvm will not start in the test host"
		fi
		zstd_cpio "$root" "$CACHE/l1/l1-qemu.cpio.zst"
		rm -rf "$root"
		mark "$CACHE/l1/l1-qemu.cpio.zst" "$k"
	fi

	k=$(key_of "$CACHE/l2/vmlinux.key" "v2")
	if ! up_to_date "$CACHE/l1/l1-vmlinux.cpio.zst" "$k"; then
		log "building l1/l1-vmlinux.cpio.zst"
		root="$CACHE/tmp/l1vmlinux"
		rm -rf "$root"
		mkdir -p "$root/assets"
		cp "$CACHE/l2/vmlinux" "$root/assets/vmlinux"
		zstd_cpio "$root" "$CACHE/l1/l1-vmlinux.cpio.zst"
		rm -rf "$root"
		mark "$CACHE/l1/l1-vmlinux.cpio.zst" "$k"
	fi
fi

took=$(($(date +%s) - start))
log "assets ready in $CACHE (${took}s)"
if [ "$print_env" = 1 ]; then
	cat <<EOF
SKIFF_CACHE='$CACHE'
SKIFF_L2_BZIMAGE='$CACHE/l2/bzImage'
SKIFF_L2_BZIMAGE_GENERIC='$CACHE/l2/bzImage-generic'
SKIFF_L2_VMLINUX='$CACHE/l2/vmlinux'
SKIFF_L2_INITRD='$CACHE/l2/initrd.img'
SKIFF_L2_STORE='$CACHE/l2/store.img'
SKIFF_L2_STORE_DATA='$CACHE/l2/store-data.bin'
SKIFF_L2_VOL='$CACHE/l2/vol.img'
SKIFF_STAMP='$STAMP'
SKIFF_OUTB='$OUTB'
SKIFF_TINY_PVH='$CACHE/tools/tiny-pvh.elf'
SKIFF_QMP_PYTHON='$CACHE/py/bin/python3'
EOF
	if [ "$want_l1" = 1 ]; then
		cat <<EOF
SKIFF_L1_KERNEL='$CACHE/l1/vmlinux'
SKIFF_L1_BASE='$CACHE/l1/l1-base.cpio.zst'
SKIFF_L1_QEMU='$CACHE/l1/l1-qemu.cpio.zst'
SKIFF_L1_VMLINUX='$CACHE/l1/l1-vmlinux.cpio.zst'
EOF
	fi
fi
