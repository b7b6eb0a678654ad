//! vhost-user-fs with a real virtiofsd (resources/install-deps.sh builds it
//! from crates.io): microvm.nix's virtiofs shares on PCI and MMIO, two at
//! once, RAM that skiff shares by itself, the seed's device order, a guest
//! reboot, virtiofsd dying under a running guest, and the errors.
//!
//! Each share is a fresh directory on the test host holding data.bin
//! (1 MiB of random bytes) and many/ (1,000 files); one virtiofsd per share
//! and run, as microvm.nix's virtiofsd service does.

// Guest tests boot real kernels (a nested test host where the CPU has no
// vmx/svm): built only with `--features guest` (resources/test.sh does).
#![cfg(feature = "guest")]

// `command`: microvm.nix's argv with `devices` and the guest's action.
use skiff_tests::{
    skiff_command as command, until_then_sigterm, Batch, Scenario, ScenarioResult, SHARE_FN,
    VIRTIOFSD_FN,
};

const SECS: u32 = 120;

/// microvm.nix's memory and one share's chardev and device.
const MEMFD: &str = "-numa node,memdev=mem -object memory-backend-memfd,id=mem,size=512M,share=on";

fn fs_device(driver: &str, id: &str, tag: &str) -> String {
    format!("-chardev socket,id={id},path={id}.sock -device {driver},chardev={id},tag={tag}")
}

/// Two shares, each with its virtiofsd: ro-store read, data written to.
fn two_shares(pcie: bool, memory: &str) -> String {
    let driver = if pcie { "vhost-user-fs-pci" } else { "vhost-user-fs-device" };
    let devices = format!(
        "{memory} {} {}",
        fs_device(driver, "fs0", "ro-store"),
        fs_device(driver, "fs1", "data")
    );
    let cmd = command(pcie, devices.trim(), "skiff.test=fs skiff.fs=ro-store:ro,data:rw");
    format!(
        "{SHARE_FN}{VIRTIOFSD_FN}share store; share data; virtiofsd fs0 store; virtiofsd fs1 data\n\
         {cmd}\necho \"SKIFF-RC=$?\"\n\
         expected STORE store/data.bin; expected DATA data/data.bin\n\
         echo \"HOST-SEES=$(sha256sum data/from-guest.bin 2>/dev/null | cut -d' ' -f1)\"\n\
         wait\n"
    )
}

/// QEMU's seed order: an auto-placed virtio-rng before the share, and an
/// explicit addr=2.0 after it, which still gets 00:02.0.
fn seed_order() -> String {
    let devices = "-device virtio-rng-pci -device i8042 \
         -object memory-backend-memfd,id=mem,size=512M,share=on \
         -chardev socket,id=fs0,path=fs0.sock -device vhost-user-fs-pci,chardev=fs0,tag=ro-store \
         -device virtio-rng-pci,addr=2.0,multifunction=on";
    // microvm.nix's argv has its own -device i8042 already.
    let cmd = command(true, devices, "skiff.test=fs skiff.fs=ro-store:ro").replacen(
        "-device i8042 ",
        "",
        1,
    );
    format!(
        "{SHARE_FN}{VIRTIOFSD_FN}share store; virtiofsd fs0 store\n{cmd}\necho \"SKIFF-RC=$?\"\n\
         expected STORE store/data.bin\nwait\n"
    )
}

/// Without -no-reboot the guest reboots: the connection stays, the new run
/// resets the device and sends the new memory table, the share works again.
fn reboot() -> String {
    let cmd = command(
        true,
        &fs_device("vhost-user-fs-pci", "fs0", "ro-store"),
        "skiff.test=fs skiff.fs=ro-store:ro",
    )
    .replace(" -no-reboot", "");
    format!(
        "{SHARE_FN}{VIRTIOFSD_FN}share store; virtiofsd fs0 store\nexpected STORE store/data.bin\n{}",
        until_then_sigterm(&cmd, "SKIFF-FS-ro-store-SHA", 2, 100, "")
    )
}

/// virtiofsd is killed under a running guest: skiff names the socket once,
/// the device shows NEEDS_RESET, the guest goes on, and skiff does not spin
/// meanwhile (its CPU ticks over two idle seconds are printed).
fn death() -> String {
    let cmd = command(
        true,
        &fs_device("vhost-user-fs-pci", "fs0", "ro-store"),
        "skiff.test=fs-death skiff.fs=ro-store:ro",
    );
    format!(
        "{SHARE_FN}{VIRTIOFSD_FN}share store; virtiofsd fs0 store\n\
         : > out.txt\n{cmd} > out.txt 2>&1 &\npid=$!\n\
         wait_for SKIFF-FS-MOUNTED out.txt 90\n\
         kill -KILL $(pidof virtiofsd)\n\
         wait_for SKIFF-FS-AFTER out.txt 30\n\
         ticks() {{ awk '{{ print $14 + $15 }}' /proc/$pid/task/*/stat | awk '{{ s += $1 }} END {{ print s }}'; }}\n\
         t0=$(ticks); sleep 2; t1=$(ticks)\n\
         echo \"IDLE-TICKS=$((t1 - t0))\"\n\
         k=0; while kill -0 $pid 2>/dev/null && [ $k -lt 300 ]; do sleep 0.1; k=$((k + 1)); done\n\
         kill -0 $pid 2>/dev/null && {{ echo STILL-RUNNING; kill -TERM $pid; }}\n\
         wait $pid\necho \"SKIFF-RC=$?\"\ncat out.txt\n"
    )
}

/// `reconnect=1`: virtiofsd is killed, the guest's requests fail, a new
/// virtiofsd comes up on the same socket, skiff reconnects and a new mount
/// in the guest reads the share again.
fn reconnect() -> String {
    let cmd = command(
        true,
        "-chardev socket,id=fs0,path=fs0.sock,reconnect=1 \
         -device vhost-user-fs-pci,chardev=fs0,tag=ro-store",
        "skiff.test=fs-reconnect skiff.fs=ro-store:ro",
    );
    format!(
        "{SHARE_FN}{VIRTIOFSD_FN}share store; virtiofsd fs0 store; expected STORE store/data.bin\n\
         : > out.txt\n{cmd} > out.txt 2>&1 &\npid=$!\n\
         wait_for SKIFF-FS-MOUNTED out.txt 90\n\
         kill -KILL $(pidof virtiofsd)\n\
         wait_for SKIFF-FS-AFTER out.txt 30\n\
         virtiofsd fs0 store\n\
         k=0; while kill -0 $pid 2>/dev/null && [ $k -lt 400 ]; do sleep 0.1; k=$((k + 1)); done\n\
         kill -0 $pid 2>/dev/null && {{ echo STILL-RUNNING; kill -TERM $pid; }}\n\
         wait $pid\necho \"SKIFF-RC=$?\"\ncat out.txt\necho '--- virtiofsd'\ncat fs0.log\n"
    )
}

/// Command-line and connection errors: each exits 1 with a message naming
/// the culprit, before any guest runs.
fn errors() -> String {
    let base = command(true, "", "skiff.test=poweroff");
    let case = |name: &str, extra: &str| {
        format!(
            "{} > {name}.txt 2>&1; echo \"{name}-RC=$?\"; echo \"{name}-ERR=$(head -n 1 {name}.txt)\"\n",
            base.replace(" -append", &format!(" {extra} -append"))
        )
    };
    let share_off = "-numa node,memdev=mem -object memory-backend-memfd,id=mem,size=512M,share=off \
                     -chardev socket,id=fs0,path=fs0.sock -device vhost-user-fs-pci,chardev=fs0,tag=t";
    let ram = "-numa node,memdev=mem -object memory-backend-ram,id=mem,size=512M \
               -chardev socket,id=fs0,path=fs0.sock -device vhost-user-fs-pci,chardev=fs0,tag=t";
    [
        case("SHARE-OFF", share_off),
        case("RAM", ram),
        case("NO-SOCKET", "-chardev socket,id=fs0,path=/nonexistent/fs.sock -device vhost-user-fs-pci,chardev=fs0,tag=t"),
        case("UNKNOWN-KEY", "-chardev socket,id=fs0,path=fs0.sock -device vhost-user-fs-pci,chardev=fs0,tag=t,cache-size=2G"),
        case("NO-CHARDEV", "-device vhost-user-fs-pci,chardev=nope,tag=t"),
    ]
    .concat()
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::script("fs-errors", 60, &errors()),
        Scenario::script("fs-two-shares-pci", SECS, &two_shares(true, MEMFD)),
        Scenario::script("fs-mmio-auto-shared", SECS, &two_shares(false, "")),
        Scenario::script("fs-seed-order", SECS, &seed_order()),
        Scenario::script("fs-reboot", SECS + 20, &reboot()),
        Scenario::script("fs-death", SECS, &death()),
        Scenario::script("fs-reconnect", SECS, &reconnect()),
    ]
}

static BATCH: Batch = Batch::new();

fn result(name: &str) -> &'static ScenarioResult {
    BATCH.result(scenarios, name)
}

/// Both shares mounted: the host's file read with its checksum, 1,000
/// entries listed, and the guest's file seen by the host, byte for byte.
fn shares_work(name: &str) {
    let r = result(name);
    let expected = r.value("EXPECTED-STORE").unwrap_or_default();
    assert_eq!(expected.len(), 64, "{name}\n{}", r.describe());
    assert_eq!(r.value("SKIFF-FS-ro-store-SHA"), Some(expected), "{name}\n{}", r.describe());
    assert_eq!(r.value("SKIFF-FS-ro-store-FILES"), Some("1000"), "{name}\n{}", r.describe());
    let data = r.value("EXPECTED-DATA").unwrap_or_default();
    assert_eq!(r.value("SKIFF-FS-data-SHA"), Some(data), "{name}\n{}", r.describe());
    let wrote = r.value("SKIFF-FS-data-WROTE").unwrap_or_default();
    assert_eq!(wrote.len(), 64, "{name}\n{}", r.describe());
    assert_eq!(r.value("HOST-SEES"), Some(wrote), "{name}\n{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{name}\n{}", r.describe());
}

/// microvm.nix's shape: memfd RAM bound with -numa, two shares on PCI.
#[test]
fn two_shares_on_pci_with_microvm_nix_memory() {
    shares_work("fs-two-shares-pci");
}

/// vhost-user-fs-device with pcie=off, and no -object/-numa at all: skiff
/// backs RAM with a shared memfd by itself.
#[test]
fn shares_on_mmio_without_a_memory_backend() {
    shares_work("fs-mmio-auto-shared");
}

#[test]
fn seed_order_keeps_the_explicit_slot_and_mounts() {
    let r = result("fs-seed-order");
    let expected = r.value("EXPECTED-STORE").unwrap_or_default();
    assert_eq!(expected.len(), 64, "{}", r.describe());
    assert_eq!(r.value("SKIFF-FS-ro-store-SHA"), Some(expected), "{}", r.describe());
    // 00:02.0 is the explicit virtio-rng (1af4:1044, multifunction).
    let pci = r.line_value("SKIFF-FS-PCI").unwrap_or_default();
    assert!(pci.contains("0000:00:02.0,1af4:1044"), "{}", r.describe());
    assert!(pci.contains(",1af4:105a"), "the virtio-fs function\n{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}

#[test]
fn the_share_works_again_after_a_guest_reboot() {
    let r = result("fs-reboot");
    let expected = r.value("EXPECTED-STORE").unwrap_or_default();
    let reads: Vec<&str> = r
        .lines()
        .filter_map(|l| l.split("SKIFF-FS-ro-store-SHA=").nth(1))
        .map(|v| v.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(reads.len(), 2, "two runs read the share\n{}", r.describe());
    assert!(reads.iter().all(|v| *v == expected), "{}", r.describe());
    assert_eq!(r.value("SIGTERM-RC"), Some("0"), "{}", r.describe());
}

#[test]
fn backend_death_is_reported_once_and_the_guest_goes_on() {
    let r = result("fs-death");
    assert!(r.has_line("SKIFF-FS-MOUNTED"), "{}", r.describe());
    let status = r.value("SKIFF-FS-STATUS").unwrap_or_default();
    let status = u32::from_str_radix(status.trim_start_matches("0x"), 16).unwrap_or(0);
    assert_eq!(status & 0x40, 0x40, "NEEDS_RESET\n{}", r.describe());
    assert_eq!(r.value("SKIFF-FS-ALIVE"), Some("alive"), "{}", r.describe());
    // The share's requests fail instead of hanging.
    let after = r.line_value("SKIFF-FS-AFTER").unwrap_or_default();
    assert!(after.contains("not connected"), "ENOTCONN\n{}", r.describe());
    let reports = r.lines().filter(|l| l.contains("went away")).count();
    assert_eq!(reports, 1, "one line\n{}", r.describe());
    assert!(r.contains("fs0.sock"), "the socket is named\n{}", r.describe());
    // USER_HZ ticks of the whole process over 2 s while the backend is
    // gone: a busy loop would show ~200.
    let idle = r.value("IDLE-TICKS").and_then(|v| v.parse::<u32>().ok());
    assert!(idle.is_some_and(|t| t < 20), "{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}

#[test]
fn bad_memory_missing_socket_and_unknown_keys_exit_1_naming_them() {
    let r = result("fs-errors");
    for (case, needle) in [
        ("SHARE-OFF", "share=on"),
        ("RAM", "share=on"),
        ("NO-SOCKET", "/nonexistent/fs.sock"),
        ("UNKNOWN-KEY", "'cache-size'"),
        ("NO-CHARDEV", "'nope'"),
    ] {
        assert_eq!(r.value(&format!("{case}-RC")), Some("1"), "{case}\n{}", r.describe());
        let err = r.line_value(&format!("{case}-ERR")).unwrap_or_default();
        assert!(err.contains(needle), "{case}: {err}\n{}", r.describe());
    }
}

#[test]
fn reconnect_brings_the_share_back_to_a_new_mount() {
    let r = result("fs-reconnect");
    let after = r.line_value("SKIFF-FS-AFTER").unwrap_or_default();
    assert!(after.contains("not connected"), "ENOTCONN while down\n{}", r.describe());
    assert!(r.contains("reconnected to 'fs0.sock'"), "{}", r.describe());
    let expected = r.value("EXPECTED-STORE").unwrap_or_default();
    assert_eq!(expected.len(), 64, "{}", r.describe());
    assert_eq!(r.value("SKIFF-FS-BACK"), Some(expected), "{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}
