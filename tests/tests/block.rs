//! virtio-blk: microvm.nix's store disk (read-only, on PCI and on MMIO) and
//! a writable volume (microvm.nix's startup-shutdown check), on images
//! built by resources/guest-assets.sh ($STORE_IMG: erofs, as microvm.nix
//! builds its store, with data.bin, whose bytes are also in $STORE_DATA;
//! an empty ext4 $VOL_IMG).

// Guest tests boot real kernels (a nested test host where the CPU has no
// vmx/svm): built only with `--features guest` (resources/test.sh does).
#![cfg(feature = "guest")]

use skiff_tests::{until_then_sigterm, Batch, Scenario, ScenarioResult, QMP_FN};

const SECS: u32 = 90;

/// microvm.nix's argv with `devices` and the guest's `action`.
fn command(pcie: bool, devices: &str, action: &str) -> String {
    skiff_tests::skiff_command(pcie, devices, &format!("skiff.test={action}"))
}

/// The store disk as microvm.nix attaches it, then the expected checksum.
fn store_script(pcie: bool) -> String {
    let device = if pcie {
        "-device virtio-blk-pci,drive=store,disable-legacy=on"
    } else {
        "-device virtio-blk-device,drive=store"
    };
    let drive = "-drive id=store,format=raw,read-only=on,file=$STORE_IMG,if=none,aio=io_uring";
    format!(
        "{}; echo \"SKIFF-RC=$?\"; echo \"EXPECTED-SHA=$(sha256sum $STORE_DATA | cut -d' ' -f1)\"; \
         echo \"EXPECTED-SECTORS=$(($(stat -c %s $STORE_IMG) / 512))\"",
        command(pcie, &format!("{drive} {device}"), "blk")
    )
}

/// A guest zeroing 1 GiB without unmap (WRITE_ZEROES; tmpfs cannot zero
/// a range, so skiff writes the zeros) is reset by QMP once the zeroing
/// is under way: the reset stops it at its next step instead of waiting
/// for the whole gigabyte, the guest boots again, and skiff quits; the
/// image then holds less than the gigabyte (issue 29, item 2).
fn zeroing_reset_script() -> String {
    let drive = "-drive id=vda,format=raw,file=z.img,if=none,discard=unmap,read-only=off";
    let cmd = command(
        true,
        &format!("-qmp unix:q.sock,server,nowait {drive} -device virtio-blk-pci,drive=vda"),
        "zeroout",
    )
    .replace(" -no-reboot", "");
    format!(
        "{QMP_FN}truncate -s 1G z.img\n{cmd} > out.txt 2>&1 &\npid=$!\n\
         wait_for SKIFF-ZEROING out.txt 120\n\
         i=0; while [ $i -lt 1200 ] && [ \"$(du -k z.img | cut -f1)\" -lt 4096 ]; do sleep 0.05; i=$((i + 1)); done\n\
         echo \"KB-AT-RESET=$(du -k z.img | cut -f1)\"\n\
         qmp '{{\"execute\":\"system_reset\"}}' >> qmp.txt\n\
         i=0; while [ $i -lt 1200 ] && [ \"$(count_lines SKIFF-INIT-OK out.txt)\" -lt 2 ]; do sleep 0.1; i=$((i + 1)); done\n\
         echo \"BOOTS=$(count_lines SKIFF-INIT-OK out.txt)\"\n\
         qmp '{{\"execute\":\"quit\"}}' >> qmp.txt\n\
         wait $pid\necho \"SKIFF-RC=$?\"\necho \"KB-AT-END=$(du -k z.img | cut -f1)\"\n\
         cat qmp.txt\ncat out.txt\n"
    )
}

/// microvm.nix's startup-shutdown check: a 32 MiB ext4 volume on tmpfs
/// with discard=unmap,cache=none; the guest writes `uname -a`, syncs and
/// reboots; skiff exits; the text is then read back from the image.
fn volume_script() -> String {
    let drive = "-drive id=vda,format=raw,file=vol.img,if=none,aio=io_uring,discard=unmap,cache=none,read-only=off";
    let cmd = command(true, &format!("{drive} -device virtio-blk-pci,drive=vda,serial=vol"), "vol");
    format!(
        "cp $VOL_IMG vol.img; echo \"DU-BEFORE=$(du -k vol.img | cut -f1)\"; {cmd}; \
         echo \"SKIFF-RC=$?\"; echo \"DU-AFTER=$(du -k vol.img | cut -f1)\"; \
         echo \"IMAGE-UNAME=$(strings vol.img | grep '^Linux ' | head -n 1)\""
    )
}

/// A writable image in use: a second VM on it fails with QEMU's lock
/// message, also once the first one's guest has rebooted (the image, and
/// its lock, belong to the process, not to one run of the guest).
fn lock_script() -> String {
    let drive = "-drive id=vda,format=raw,file=lock.img,if=none,aio=io_uring";
    let first = command(true, &format!("{drive} -device virtio-blk-pci,drive=vda"), "reboot")
        .replace(" -no-reboot", "");
    let second = command(true, &format!("{drive} -device virtio-blk-pci,drive=vda"), "poweroff");
    let between = format!(
        "{second} > second.txt 2>&1; echo \"SECOND-RC=$?\"; \
         echo \"SECOND-ERR=$(grep -a 'lock' second.txt | head -n 1)\""
    );
    format!(
        "cp $VOL_IMG lock.img\n{}",
        until_then_sigterm(&first, "SKIFF-INIT-OK", 2, 150, &between)
    )
}

/// Nothing lost: the guest writes 64 MiB and syncs; skiff is SIGKILLed
/// the moment the guest says so; the image holds exactly those bytes.
fn safety_script() -> String {
    let drive = "-drive id=vda,format=raw,file=safe.img,if=none,aio=io_uring";
    let cmd = command(true, &format!("{drive} -device virtio-blk-pci,drive=vda"), "safe");
    format!(
        "dd if=/dev/zero of=safe.img bs=1M count=0 seek=80 2>/dev/null\n\
         {}\
         echo \"IMAGE-SHA=$(head -c 67108864 safe.img | sha256sum | cut -d' ' -f1)\"\n\
         cat out.txt\n",
        killed_after_the_guests_fsync(&cmd)
    )
}

/// Starts `cmd` (the guest action `safe`: 64 MiB written and fsynced),
/// and SIGKILLs skiff once the guest says it is done.
fn killed_after_the_guests_fsync(cmd: &str) -> String {
    format!(
        ": > out.txt\n{cmd} > out.txt 2>&1 &\npid=$!\nwait_for SKIFF-SAFE-DONE out.txt {SECS}\n\
         kill -KILL $pid\nwait $pid\necho \"KILL-RC=$?\"\n"
    )
}

/// qemu-vm.nix's root disk: a qcow2 overlay (`qemu-img create -f qcow2 -b`)
/// on a raw backing file, given with no format= (probed as qcow2). The
/// guest writes 64 MiB and fsyncs; skiff is SIGKILLed; QEMU's own tool
/// then finds the image consistent, the guest's bytes in it, and the
/// backing file as it was.
fn qcow2_safety_script() -> String {
    let drive = "-drive cache=writeback,file=top.qcow2,id=drive1,if=none,index=1,werror=report";
    let cmd =
        command(true, &format!("{drive} -device virtio-blk-pci,drive=drive1,serial=root"), "safe");
    format!(
        "dd if=/dev/urandom of=base.raw bs=1M count=8 2>/dev/null\n\
         dd if=/dev/zero of=base.raw bs=1M count=0 seek=80 2>/dev/null\n\
         echo \"BASE-BEFORE=$(sha256sum base.raw | cut -d' ' -f1)\"\n\
         qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2\n\
         {}\
         qemu-img check top.qcow2 > check.txt 2>&1; echo \"CHECK-RC=$?\"; cat check.txt\n\
         qemu-img convert -O raw top.qcow2 flat.raw; echo \"CONVERT-RC=$?\"\n\
         echo \"IMAGE-SHA=$(head -c 67108864 flat.raw | sha256sum | cut -d' ' -f1)\"\n\
         echo \"BASE-AFTER=$(sha256sum base.raw | cut -d' ' -f1)\"\n\
         cat out.txt\n",
        killed_after_the_guests_fsync(&cmd)
    )
}

/// One queue: the guest's writeback sends many requests at once; skiff
/// says (SKIFF_LOG=info) how many were in flight at most. With
/// aio=io_uring as microvm.nix asks, and with QEMU's default (a thread
/// pool) in the form NixOS test VMs use.
fn in_flight_script(io_uring: bool) -> String {
    let disk = if io_uring {
        "-drive id=vda,format=raw,file=vol.img,if=none,aio=io_uring \
         -device virtio-blk-pci,drive=vda,num-queues=1"
    } else {
        "-drive index=1,id=drive1,if=none,file=vol.img,cache=writeback,werror=report \
         -device virtio-blk-pci,bootindex=1,drive=drive1,serial=root,num-queues=1"
    };
    let cmd = command(true, disk, "flood");
    format!("cp $VOL_IMG vol.img; SKIFF_LOG=info {cmd}; echo \"SKIFF-RC=$?\"")
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::new("store-pci", SECS, store_script(true)),
        Scenario::new("store-mmio", SECS, store_script(false)),
        Scenario::new("volume", SECS, volume_script()),
        Scenario::script("lock", 200, &lock_script()),
        Scenario::script("data-safety", SECS + 30, &safety_script()),
        Scenario::script("qcow2-safety", SECS + 60, &qcow2_safety_script()),
        Scenario::new("in-flight", SECS, in_flight_script(true)),
        Scenario::new("in-flight-threads", SECS, in_flight_script(false)),
        Scenario::script("zeroing-reset", 200, &zeroing_reset_script()),
    ]
}

static BATCH: Batch = Batch::new();

fn result(name: &str) -> &'static ScenarioResult {
    BATCH.result(scenarios, name)
}

/// The store disk on either transport: the guest mounts it, reads data.bin
/// with the checksum it has on the host, lists 1,000 files, and cannot
/// write to the device.
#[test]
fn store_disk_mounts_and_reads_on_both_transports() {
    for name in ["store-pci", "store-mmio"] {
        let r = result(name);
        let expected = r.value("EXPECTED-SHA").unwrap_or_default();
        assert_eq!(expected.len(), 64, "{name}\n{}", r.describe());
        assert_eq!(r.value("SKIFF-BLK-SHA"), Some(expected), "{name}\n{}", r.describe());
        assert_eq!(r.value("SKIFF-BLK-FILES"), Some("1000"), "{name}\n{}", r.describe());
        assert_eq!(r.value("SKIFF-BLK-FSTYPE"), Some("erofs"), "{name}\n{}", r.describe());
        // The image's size in 512-byte sectors, read-only, no serial.
        let sectors = r.value("EXPECTED-SECTORS").unwrap_or_default();
        assert!(sectors.parse::<u64>().is_ok_and(|n| n > 2048), "{name}\n{}", r.describe());
        let want = format!("{sectors},1,");
        assert_eq!(r.value("SKIFF-BLK-vda"), Some(want.as_str()), "{name}\n{}", r.describe());
        assert_eq!(r.value("SKIFF-BLK-WRITE"), Some("failed"), "{name}\n{}", r.describe());
        assert_eq!(r.value("SKIFF-RC"), Some("0"), "{name}\n{}", r.describe());
    }
}

#[test]
fn volume_survives_the_guest_and_the_host_reads_it_back() {
    let r = result("volume");
    assert!(r.has_line("SKIFF-VOL-DONE"), "{}", r.describe());
    assert!(!r.contains("SKIFF-VOL-MOUNT-FAILED"), "{}", r.describe());
    let uname = r.line_value("SKIFF-UNAME").unwrap_or_default();
    assert!(uname.starts_with("Linux "), "{}", r.describe());
    assert_eq!(r.line_value("IMAGE-UNAME"), Some(uname), "{}", r.describe());
    // cache=none on the test host's tmpfs: the page cache, one warning
    // naming the file, instead of QEMU's failure.
    assert!(r.contains("vol.img: the filesystem does not support O_DIRECT"), "{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}

/// `serial=` reaches /sys/block/vdX/serial; fstrim in the guest punches
/// holes in the image (discard=unmap), so it takes less space after.
#[test]
fn serial_and_fstrim() {
    let r = result("volume");
    assert_eq!(r.value("SKIFF-BLK-SERIAL"), Some("vol"), "{}", r.describe());
    let fstrim = r.line_value("SKIFF-FSTRIM").unwrap_or_default();
    assert!(fstrim.contains("trimmed"), "{}", r.describe());
    let du = |k: &str| r.value(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    assert!(du("DU-BEFORE") > 0, "{}", r.describe());
    assert!(
        du("DU-AFTER") < du("DU-BEFORE"),
        "the image's allocated KiB should shrink: {} -> {}\n{}",
        du("DU-BEFORE"),
        du("DU-AFTER"),
        r.describe()
    );
}

#[test]
fn a_second_writer_is_refused_also_after_a_guest_reboot() {
    let r = result("lock");
    assert!(r.lines().filter(|l| l.contains("SKIFF-INIT-OK")).count() >= 2, "{}", r.describe());
    assert_eq!(r.value("SECOND-RC"), Some("1"), "{}", r.describe());
    let err = r.line_value("SECOND-ERR").unwrap_or_default();
    assert!(err.contains("Failed to get \"write\" lock"), "{}", r.describe());
    assert!(err.contains("lock.img"), "{}", r.describe());
    assert_eq!(r.value("SIGTERM-RC"), Some("0"), "{}", r.describe());
}

#[test]
fn synced_data_survives_sigkill() {
    let r = result("data-safety");
    let sha = r.value("SKIFF-SAFE-SHA").unwrap_or_default();
    assert_eq!(sha.len(), 64, "{}", r.describe());
    assert_eq!(r.value("IMAGE-SHA"), Some(sha), "{}", r.describe());
    assert_eq!(r.value("KILL-RC"), Some("137"), "killed, not exited\n{}", r.describe());
}

/// Several requests in the kernel's hands (or the pool's) at once on one
/// queue: eight through io_uring, as the issue asks. The pool's peak
/// depends on scheduling (the test host has one CPU: a thread that
/// finishes before the worker pops the next request lowers it; 7 to 13
/// seen), so there it must show concurrency, not a number.
#[test]
fn eight_requests_in_flight_on_one_queue_with_io_uring_and_threads() {
    in_flight("in-flight", 8);
    in_flight("in-flight-threads", 4);
    let r = result("in-flight");
    assert!(!r.contains("io_uring unavailable"), "the io_uring itself\n{}", r.describe());
}

fn in_flight(name: &str, least: u32) {
    let r = result(name);
    assert!(r.has_line("SKIFF-FLOOD-DONE"), "{}", r.describe());
    let most = r
        .lines()
        .find_map(|l| l.split("queue 0: at most ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no in-flight report\n{}", r.describe()));
    assert!(most >= least, "at most {most} in flight\n{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}

/// A reset while the guest zeroes a gigabyte on tmpfs: the zeroing stops
/// at its next step, the guest boots again, skiff quits with status 0,
/// and the image holds far less than the gigabyte.
#[test]
fn a_reset_does_not_wait_for_a_gigabyte_of_zeroing() {
    let r = result("zeroing-reset");
    let kb = |k: &str| -> u64 {
        r.value(k)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{k}\n{}", r.describe()))
    };
    assert!(kb("KB-AT-RESET") >= 4096, "the zeroing had started\n{}", r.describe());
    assert_eq!(r.value("BOOTS"), Some("2"), "the reset completed\n{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
    assert!(kb("KB-AT-END") < 1 << 20, "the whole gigabyte was written\n{}", r.describe());
    assert!(!r.contains("SKIFF-ZEROOUT-DONE"), "no zeroing finished\n{}", r.describe());
}

#[test]
fn a_qcow2_overlay_survives_sigkill_after_the_guests_fsync() {
    let r = result("qcow2-safety");
    let written = r.value("SKIFF-SAFE-SHA");
    assert!(written.is_some(), "the guest never finished writing\n{}", r.describe());
    assert_eq!(r.value("CHECK-RC"), Some("0"), "qemu-img check\n{}", r.describe());
    assert_eq!(r.value("CONVERT-RC"), Some("0"), "{}", r.describe());
    assert_eq!(r.value("IMAGE-SHA"), written, "the guest's bytes\n{}", r.describe());
    assert_eq!(r.value("BASE-AFTER"), r.value("BASE-BEFORE"), "backing file\n{}", r.describe());
    assert!(!r.output.contains("probing guessed raw"), "probed as qcow2\n{}", r.describe());
}
