//! 9p shares served by skiff (issue 13), with Debian's generic kernel (the
//! cloud kernel has no 9p; its 9pnet, 9pnet_virtio and 9p modules are in
//! the guest initrd) and `-sandbox on`, as microvm.nix runs QEMU:
//!
//! - microvm.nix's read-only store share on PCI (`-fsdev local,...,
//!   security_model=none,readonly=true -device virtio-9p-pci`): the guest
//!   reads a file with a known checksum and lists 1,000 files; a write
//!   fails with EROFS. A share whose directory is missing exits 1 naming
//!   it.
//! - NixOS test VMs' `-virtfs local,path=DIR,security_model=none,
//!   mount_tag=TAG` on virtio-mmio, writable: the guest's file reaches the
//!   host; escapes through symlinks (the guest's and the host's), a path
//!   with `..` and a rename out leave the host file beside the share as it
//!   was.
//! - `security_model=mapped-xattr` (on an ext4 loop mount): the guest's
//!   chown 1000:1000 and chmod 0600 show in the guest after a remount and
//!   on the host in the user.virtfs.* xattrs, the host file staying
//!   skiff's, mode 0600.

// Guest tests boot real kernels (a nested test host where the CPU has no
// vmx/svm): built only with `--features guest` (resources/test.sh does).
#![cfg(feature = "guest")]

use skiff_tests::{skiff_command, Batch, Scenario, ScenarioResult, SHARE_FN};

const SECS: u32 = 120;

/// microvm.nix's argv with `devices`, on Debian's generic kernel.
fn command(pcie: bool, devices: &str, append: &str) -> String {
    skiff_command(pcie, devices, append).replace("-kernel $BZIMAGE", "-kernel $BZIMAGE_GENERIC")
}

fn read_only_on_pci() -> String {
    let missing = command(
        true,
        "-fsdev local,id=fs1,path=$PWD/absent,security_model=none,readonly=true \
         -device virtio-9p-pci,fsdev=fs1,mount_tag=x",
        "skiff.test=poweroff",
    );
    let cmd = command(
        true,
        "-fsdev local,id=fs0,path=$PWD/store,security_model=none,readonly=true \
         -device virtio-9p-pci,fsdev=fs0,mount_tag=ro-store",
        "skiff.test=9p skiff.fs=ro-store:ro",
    );
    format!(
        "{SHARE_FN}share store\n\
         echo \"EXPECTED=$(sha256sum store/data.bin | cut -d' ' -f1)\"\n\
         {missing} >missing.txt 2>&1; echo \"MISSING-RC=$?\"\n\
         echo \"MISSING-ERR=$(grep -a absent missing.txt | head -n 1)\"\n\
         {cmd}\necho \"SKIFF-RC=$?\"\n\
         echo \"STORE-FILES=$(ls store | tr '\\n' ' ')\"\n"
    )
}

fn writable_virtfs_on_mmio() -> String {
    let cmd = command(
        false,
        "-virtfs local,path=data,security_model=none,mount_tag=data",
        "skiff.test=9p skiff.fs=data:rw",
    );
    format!(
        "{SHARE_FN}share data\n\
         echo original >outside.txt; echo victim >data/victim.txt\n\
         ln -s ../outside.txt data/hostlink\n\
         echo \"EXPECTED=$(sha256sum data/data.bin | cut -d' ' -f1)\"\n\
         {cmd}\necho \"SKIFF-RC=$?\"\n\
         echo \"HOST-SEES=$(sha256sum data/from-guest.bin 2>/dev/null | cut -d' ' -f1)\"\n\
         echo \"OUTSIDE=$(cat outside.txt)\"\n\
         echo \"BESIDE=$(ls | tr '\\n' ' ')\"\n\
         echo \"HOST-UP=$(readlink data/up)\"\n"
    )
}

/// qemu-vm.nix's shape: no machine type (the default machine, with PCI),
/// virtio-rng-pci, `-net nic` with user networking and `-virtfs`, which
/// lands on PCI: the guest reads the share and writes to it.
fn default_machine_virtfs() -> String {
    format!(
        "{SHARE_FN}share xchg\n\
         echo \"EXPECTED=$(sha256sum xchg/data.bin | cut -d' ' -f1)\"\n\
         $SKIFF -machine accel=kvm:tcg -cpu max -m 512 -smp 1 -device virtio-rng-pci \
         -net nic,netdev=user.0,model=virtio -netdev user,id=user.0 \
         -virtfs local,path=$PWD/xchg,security_model=none,mount_tag=xchg \
         -kernel $BZIMAGE_GENERIC -initrd $INITRD -no-reboot -nographic \
         -append \"console=ttyS0 panic=-1 skiff.test=9p skiff.fs=xchg:rw\"\n\
         echo \"SKIFF-RC=$?\"\n\
         echo \"HOST-SEES=$(sha256sum xchg/from-guest.bin 2>/dev/null | cut -d' ' -f1)\"\n"
    )
}

/// A mapped-xattr share on an ext4 loop mount (the test host's tmpfs takes
/// no user xattrs), with skiff chrooted into an empty directory once set up
/// (`-run-with chroot=`: the xattrs were read through an absolute
/// /proc/self/fd path, which the chroot took away; issue 29, item 15).
fn mapped_xattr() -> String {
    let cmd = command(
        true,
        "-fsdev local,id=fs0,path=$PWD/x/data,security_model=mapped-xattr \
         -device virtio-9p-pci,fsdev=fs0,mount_tag=data -run-with chroot=$PWD/empty",
        "skiff.test=9p skiff.fs=data:own",
    );
    format!(
        "{SHARE_FN}cp \"$VOL_IMG\" vol.img && mkdir x empty && mount -o loop vol.img x || echo LOOP-FAILED\n\
         share x/data\n\
         {cmd}\necho \"SKIFF-RC=$?\"\n\
         echo \"HOST-CONTENT=$(cat x/data/owned.txt)\"\n\
         echo \"HOST-MODE=$(stat -c '%u:%a' x/data/owned.txt)\"\n\
         xattr x/data/owned.txt user.virtfs.uid user.virtfs.gid user.virtfs.mode | sed 's/^/HOST-/'\n\
         umount x\n"
    )
}

/// A 9p share, a disk and a NIC (user networking) in one guest under
/// `-sandbox on` (every worker kind at once): it uses all three; then the
/// same guest with the block worker made to call unlinkat (the 9p
/// worker's call, which no other worker may make).
fn one_guest_every_worker() -> String {
    let cmd = |vmm: &str| {
        command(
            true,
            "-fsdev local,id=fs0,path=$PWD/data,security_model=none \
             -device virtio-9p-pci,fsdev=fs0,mount_tag=data \
             -drive id=d0,format=raw,file=$PWD/disk.img,if=none,aio=io_uring \
             -device virtio-blk-pci,drive=d0 \
             -netdev user,id=n0 -device virtio-net-pci,netdev=n0",
            "skiff.test=mixed",
        )
        .replacen("$SKIFF", vmm, 1)
    };
    format!(
        "mkdir data; head -c 1048576 /dev/urandom > disk.img\n\
         echo \"DISK-SHA=$(sha256sum disk.img | cut -d' ' -f1)\"\n\
         {}\necho \"SKIFF-RC=$?\"\n\
         {} > trip.txt 2>&1\necho \"TRIP-RC=$?\"\n\
         grep -a -o 'thread [^ ]* made a forbidden system call: [a-z0-9_]*' trip.txt \
         | sed 's/^/TRIP: /'\n",
        cmd("$SKIFF"),
        cmd("SKIFF_TEST_SECCOMP_TRIP=worker:virtio-blk/unlinkat $SKIFF"),
    )
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::script("9p-ro-pci", SECS, &read_only_on_pci()),
        Scenario::script("9p-rw-mmio", SECS, &writable_virtfs_on_mmio()),
        Scenario::script("9p-default-machine", SECS, &default_machine_virtfs()),
        Scenario::script("9p-mapped-xattr", SECS, &mapped_xattr()),
        Scenario::script("sandbox-every-worker", SECS, &one_guest_every_worker()),
    ]
}

static BATCH: Batch = Batch::new();

fn result(name: &str) -> &'static ScenarioResult {
    BATCH.result(scenarios, name)
}

#[test]
fn microvm_nix_read_only_store_on_pci() {
    let r = result("9p-ro-pci");
    let expected = r.value("EXPECTED").expect("the host's checksum");
    assert_eq!(r.value("SKIFF-9P-ro-store-SHA"), Some(expected), "{}", r.describe());
    assert_eq!(r.value("SKIFF-9P-ro-store-FILES"), Some("1000"), "{}", r.describe());
    let write = r.line_value("SKIFF-9P-ro-store-WRITE").unwrap_or_default();
    assert!(write.contains("Read-only file system"), "{write}\n{}", r.describe());
    assert_eq!(r.line_value("STORE-FILES"), Some("data.bin many"), "nothing new on the host");
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}

#[test]
fn a_missing_share_directory_exits_1_naming_it() {
    let r = result("9p-ro-pci");
    assert_eq!(r.value("MISSING-RC"), Some("1"), "{}", r.describe());
    let err = r.line_value("MISSING-ERR").unwrap_or_default();
    assert!(err.contains("-fsdev id=fs1") && err.contains("/absent"), "{err}");
}

#[test]
fn nixos_test_vm_virtfs_is_writable_and_kept_inside() {
    let r = result("9p-rw-mmio");
    let expected = r.value("EXPECTED").expect("the host's checksum");
    assert_eq!(r.value("SKIFF-9P-data-SHA"), Some(expected), "{}", r.describe());
    assert_eq!(r.value("SKIFF-9P-data-FILES"), Some("1000"), "{}", r.describe());
    let wrote = r.value("SKIFF-9P-data-WROTE").expect("the guest wrote");
    assert_eq!(r.value("HOST-SEES"), Some(wrote), "{}", r.describe());
    assert!(r.has_line("SKIFF-9P-data-DONE"), "{}", r.describe());
    // The guest's symlink is a symlink on the host, holding what it said.
    assert_eq!(r.value("HOST-UP"), Some("../outside.txt"), "{}", r.describe());
    assert_eq!(r.value("OUTSIDE"), Some("original"), "{}", r.describe());
    assert_eq!(r.line_value("BESIDE"), Some("data outside.txt script.sh"), "{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}

/// The "boots" line: `-machine accel=kvm:tcg` with
/// virtio-rng-pci, `-virtfs` and `-net nic` runs a guest that uses the
/// share.
#[test]
fn the_default_machine_boots_qemu_vm_nix_devices() {
    let r = result("9p-default-machine");
    let expected = r.value("EXPECTED").expect("the host's checksum");
    assert_eq!(r.value("SKIFF-9P-xchg-SHA"), Some(expected), "{}", r.describe());
    let wrote = r.value("SKIFF-9P-xchg-WROTE").expect("the guest wrote");
    assert_eq!(r.value("HOST-SEES"), Some(wrote), "{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}

#[test]
fn mapped_xattr_keeps_the_guests_owner_and_mode() {
    let r = result("9p-mapped-xattr");
    assert!(!r.has_line("LOOP-FAILED"), "{}", r.describe());
    let expected = r.value("SKIFF-9P-data-SHA").expect("the guest read the share");
    assert_eq!(expected.len(), 64, "{}", r.describe());
    assert_eq!(r.value("SKIFF-9P-data-OWNER"), Some("1000:1000:600"), "{}", r.describe());
    assert_eq!(r.value("SKIFF-9P-data-CONTENT"), Some("owned"), "{}", r.describe());
    assert_eq!(r.value("HOST-CONTENT"), Some("owned"), "{}", r.describe());
    // The host file: skiff's owner (root here), private mode.
    assert_eq!(r.value("HOST-MODE"), Some("0:600"), "{}", r.describe());
    assert_eq!(r.value("HOST-user.virtfs.uid"), Some("1000"), "{}", r.describe());
    assert_eq!(r.value("HOST-user.virtfs.gid"), Some("1000"), "{}", r.describe());
    assert_eq!(r.value("HOST-user.virtfs.mode"), Some("100600"), "{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}

/// `-sandbox on` with a 9p share, a disk and a NIC: the guest uses all
/// three (the 9p worker may remove a file); the block worker may not make
/// the 9p worker's unlinkat: skiff ends with 159 naming the thread and
/// the call.
#[test]
fn each_device_worker_has_its_own_sandbox_filter() {
    let r = result("sandbox-every-worker");
    assert_eq!(r.value("SKIFF-MIXED-9P"), Some("ok"), "{}", r.describe());
    let disk = r.value("DISK-SHA").expect("the host's checksum");
    assert_eq!(r.value("SKIFF-MIXED-BLK"), Some(disk), "{}", r.describe());
    assert_eq!(r.value("SKIFF-MIXED-NET"), Some("10.0.2.15"), "{}", r.describe());
    assert!(r.has_line("SKIFF-MIXED-DONE"), "{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
    assert_eq!(r.value("TRIP-RC"), Some("159"), "{}", r.describe());
    let trips: Vec<&str> = r.lines().filter_map(|l| l.strip_prefix("TRIP: ")).collect();
    assert!(
        trips.iter().any(|t| t.starts_with("thread virtio-blk-q")
            && t.ends_with("made a forbidden system call: unlinkat")),
        "{trips:?}\n{}",
        r.describe()
    );
}
