//! Boot time: the CMOS RTC gives the guest the host's time, `rtc=off` keeps
//! the guest from probing for one (seen in the boot trace), and a PVH ELF
//! vmlinux boots as well as the bzImage.

// Guest tests boot real kernels (a nested test host where the CPU has no
// vmx/svm): built only with `--features guest` (resources/test.sh does).
#![cfg(feature = "guest")]

use skiff_tests::{microvm_nix_command, Batch, Scenario, ScenarioResult};

const SECS: u32 = 90;

fn scenarios() -> Vec<Scenario> {
    let date = format!(
        "{}; echo \"HOST-DATE=$(date -u +%s)\"",
        microvm_nix_command("$SKIFF", true, "", "skiff.test=date")
    );
    let rtc_off = format!(
        "SKIFF_BOOT_TRACE=1 {}",
        microvm_nix_command("$SKIFF", true, "", "skiff.test=poweroff").replace("rtc=on", "rtc=off")
    );
    let pvh = microvm_nix_command("$SKIFF", true, "", "skiff.test=poweroff")
        .replace("-kernel $BZIMAGE", "-kernel $VMLINUX");
    vec![
        Scenario::new("rtc-date", SECS, date),
        Scenario::new("rtc-off-trace", SECS, rtc_off),
        Scenario::new("pvh-vmlinux", SECS, pvh),
    ]
}

static BATCH: Batch = Batch::new();

fn result(name: &str) -> &'static ScenarioResult {
    BATCH.result(scenarios, name)
}

#[test]
fn rtc_on_gives_the_guest_the_host_time() {
    let r = result("rtc-date");
    assert_eq!(r.rc, Some(0), "{}", r.describe());
    assert_eq!(r.value("SKIFF-RTC"), Some("yes"), "no /sys/class/rtc/rtc0\n{}", r.describe());
    let guest: i64 = r.value("SKIFF-DATE").and_then(|v| v.parse().ok()).expect("SKIFF-DATE");
    let host: i64 = r.value("HOST-DATE").and_then(|v| v.parse().ok()).expect("HOST-DATE");
    // The guest reads its clock just before powering off; the host after.
    assert!((host - guest).abs() <= 2, "guest {guest} vs host {host}\n{}", r.describe());
}

/// Sum of the trace's exit counts for one port.
fn port_accesses(r: &ScenarioResult, port: u16) -> u64 {
    let addr = format!("{port:#010x}");
    r.lines()
        .filter(|l| l.trim_start().starts_with("pio-") && l.contains(&addr))
        .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
        .sum()
}

#[test]
fn rtc_off_is_not_probed() {
    let r = result("rtc-off-trace");
    assert_eq!(r.rc, Some(0), "{}", r.describe());
    assert!(r.contains("VM exits handled by skiff"), "no boot trace\n{}", r.describe());
    assert_eq!(r.value("SKIFF-RTC"), Some("no"), "{}", r.describe());
    let n = port_accesses(r, 0x70) + port_accesses(r, 0x71);
    assert!(n < 10, "{n} accesses to 0x70/0x71 with rtc=off\n{}", r.describe());
    // The trace must count what it claims to: serial output is there.
    assert!(port_accesses(r, 0x3f8) > 0, "trace counts nothing\n{}", r.describe());
}

#[test]
fn pvh_vmlinux_boots() {
    let r = result("pvh-vmlinux");
    assert!(r.has_line("SKIFF-INIT-OK"), "{}", r.describe());
    assert_eq!(r.value("SKIFF-NPROC"), Some("2"), "{}", r.describe());
    assert_eq!(r.rc, Some(0), "{}", r.describe());
}
