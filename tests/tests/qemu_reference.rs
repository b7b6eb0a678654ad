//! The boot scenarios run against QEMU's own microvm machine, as a
//! reference for what Skiff should do (and to check the harness without a
//! skiff binary). Ignored by default; run with
//!   cargo test --release -p skiff-tests --features guest --test qemu_reference -- --ignored --nocapture
//!
//! QEMU 10's microvm with acpi=off, pic=off, pit=off gives Linux neither an
//! MP table nor a timer interrupt: the guest stalls before /init, so that
//! scenario is reported, not asserted.

// Guest tests boot real kernels (a nested test host where the CPU has no
// vmx/svm): built only with `--features guest` (resources/test.sh does).
#![cfg(feature = "guest")]

use skiff_tests::{microvm_nix_command, run_scenarios_with, RunOptions, Scenario};

#[test]
#[ignore = "reference run of QEMU microvm (boots a test host)"]
fn qemu_microvm_reference() {
    let boot = |name: &str, acpi: bool, extra: &str, action: &str| {
        Scenario::new(
            name,
            60,
            microvm_nix_command("$QEMU", acpi, extra, &format!("skiff.test={action}")),
        )
    };
    let scenarios = vec![
        boot("boot-acpi-on", true, "", "poweroff"),
        boot("reboot", true, "", "reboot"),
        boot("panic", true, "", "panic"),
        boot("debug-exit", true, "-device isa-debug-exit,iobase=0xf4,iosize=0x04", "exit=5"),
        boot("date", true, "", "date"),
        boot("boot-acpi-off", false, "", "poweroff"),
        Scenario::new("bad-unknown-option", 15, "$QEMU -frobnicate"),
        Scenario::new("bad-unknown-key", 15, "$QEMU -M microvm,foo=bar"),
        Scenario::new("bad-size", 15, "$QEMU -M microvm -m 12X -kernel $BZIMAGE -nographic"),
        Scenario::new(
            "missing-kernel",
            15,
            "$QEMU -M microvm -m 512M -kernel /nonexistent -nographic",
        ),
    ];
    let opts = RunOptions {
        require_skiff: false,
        log_name: "qemu-reference".into(),
        ..Default::default()
    };
    let results = run_scenarios_with(&scenarios, &opts).unwrap_or_else(|e| panic!("{e}"));

    println!("| scenario | rc | wall ms | init marker | guest uptime at init |");
    println!("|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.name,
            r.rc.map_or("-".into(), |c| c.to_string()),
            r.millis.map_or("-".into(), |m| m.to_string()),
            if r.has_line("SKIFF-INIT-OK") { "yes" } else { "no" },
            r.value("SKIFF-UPTIME").unwrap_or("-"),
        );
    }
    let get = |n: &str| results.iter().find(|r| r.name == n).unwrap();
    for (name, rc) in
        [("boot-acpi-on", 0), ("reboot", 0), ("panic", 0), ("debug-exit", 11), ("date", 0)]
    {
        let r = get(name);
        assert!(r.has_line("SKIFF-INIT-OK"), "{}", r.describe());
        assert_eq!(r.rc, Some(rc), "{}", r.describe());
    }
    assert_eq!(get("boot-acpi-on").value("SKIFF-NPROC"), Some("2"));
    for (name, mention) in [
        ("bad-unknown-option", "-frobnicate"),
        ("bad-unknown-key", "foo"),
        ("bad-size", "12X"),
        ("missing-kernel", "/nonexistent"),
    ] {
        let r = get(name);
        assert_eq!(r.rc, Some(1), "{}", r.describe());
        assert!(r.contains(mention), "{}", r.describe());
    }
}
