//! Host-guest channels (issue 15): vhost-vsock as microvm.nix attaches it
//! (`-device vhost-vsock-pci,guest-cid=N`), on PCI and on virtio-mmio,
//! with socat on the test host and resources/tools/vsock.c in the guest;
//! a CID held by a running skiff, also across a guest reboot, and free
//! again once it exits.

// Guest tests boot real kernels (a nested test host where the CPU has no
// vmx/svm): built only with `--features guest` (resources/test.sh does).
#![cfg(feature = "guest")]

// `command`: microvm.nix's argv with `devices` and the guest's action.
use skiff_tests::{skiff_command as command, until_then_sigterm, Batch, Scenario, ScenarioResult};

const SECS: u32 = 120;

fn vsock_device(pcie: bool, cid: u32) -> String {
    let driver = if pcie { "vhost-vsock-pci" } else { "vhost-vsock-device" };
    format!("-device {driver},guest-cid={cid}")
}

/// Both directions: the host connects to the guest's listener (CID, port
/// 1234), the guest to the host's (CID 2, port 5678); meanwhile a second
/// skiff asking for the same CID is refused.
fn exchange(pcie: bool, cid: u32) -> String {
    let cmd = command(pcie, &vsock_device(pcie, cid), "skiff.test=vsock");
    let second = command(pcie, &vsock_device(pcie, cid), "skiff.test=poweroff");
    format!(
        "socat VSOCK-LISTEN:5678 SYSTEM:'read l; echo $l > host-got.txt; echo host-pong' &\n\
         listener=$!\n\
         : > out.txt\n{cmd} > out.txt 2>&1 &\npid=$!\n\
         wait_for SKIFF-VSOCK-LISTENING out.txt 90\n\
         echo \"HOST-REPLY=$(echo from-host | socat -t 5 - VSOCK-CONNECT:{cid}:1234)\"\n\
         {second} > second.txt 2>&1; echo \"SECOND-RC=$?\"\n\
         echo \"SECOND-ERR=$(grep -a 'guest-cid' second.txt | head -n 1)\"\n\
         wait $pid\necho \"SKIFF-RC=$?\"\n\
         kill $listener 2>/dev/null\n\
         echo \"HOST-GOT=$(cat host-got.txt 2>/dev/null)\"\ncat out.txt\n"
    )
}

/// Without -no-reboot: each run's guest reads the same CID, and the CID
/// stays taken across the reboot; once skiff has exited, it is free again.
fn reboot() -> String {
    let cmd =
        command(true, &vsock_device(true, 5), "skiff.test=vsock-cid").replace(" -no-reboot", "");
    let second = command(true, &vsock_device(true, 5), "skiff.test=poweroff");
    let between = format!(
        "{second} > second.txt 2>&1; echo \"SECOND-RC=$?\"; \
         echo \"SECOND-ERR=$(grep -a 'guest-cid' second.txt | head -n 1)\""
    );
    format!(
        "{}{second} > again.txt 2>&1; echo \"AGAIN-RC=$?\"\n",
        until_then_sigterm(&cmd, "SKIFF-VSOCK-CID", 2, 100, &between)
    )
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::script("vsock-pci", SECS, &exchange(true, 3)),
        Scenario::script("vsock-mmio", SECS, &exchange(false, 4)),
        Scenario::script("vsock-reboot", SECS + 20, &reboot()),
    ]
}

static BATCH: Batch = Batch::new();

fn result(name: &str) -> &'static ScenarioResult {
    BATCH.result(scenarios, name)
}

fn exchanged(name: &str, cid: &str) {
    let r = result(name);
    assert_eq!(r.value("SKIFF-VSOCK-GOT"), Some("from-host"), "{name}\n{}", r.describe());
    assert_eq!(r.value("HOST-REPLY"), Some("pong"), "{name}\n{}", r.describe());
    assert_eq!(r.value("HOST-GOT"), Some("from-guest"), "{name}\n{}", r.describe());
    assert_eq!(r.value("SKIFF-VSOCK-REPLY"), Some("host-pong"), "{name}\n{}", r.describe());
    assert_eq!(r.value("SKIFF-VSOCK-CID"), Some(cid), "{name}\n{}", r.describe());
    assert_eq!(r.value("SECOND-RC"), Some("1"), "{name}\n{}", r.describe());
    let err = r.line_value("SECOND-ERR").unwrap_or_default();
    assert!(
        err.contains(&format!("guest CID {cid} is already in use")),
        "{name}\n{}",
        r.describe()
    );
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{name}\n{}", r.describe());
}

#[test]
fn vsock_both_ways_on_pci() {
    exchanged("vsock-pci", "3");
}

#[test]
fn vsock_both_ways_on_mmio() {
    exchanged("vsock-mmio", "4");
}

#[test]
fn the_cid_stays_across_a_guest_reboot() {
    let r = result("vsock-reboot");
    let cids: Vec<&str> = r
        .lines()
        .filter_map(|l| l.split("SKIFF-VSOCK-CID=").nth(1))
        .map(|v| v.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(cids, ["5", "5"], "{}", r.describe());
    assert_eq!(r.value("SECOND-RC"), Some("1"), "{}", r.describe());
    let err = r.line_value("SECOND-ERR").unwrap_or_default();
    assert!(err.contains("guest CID 5 is already in use"), "{}", r.describe());
    assert_eq!(r.value("SIGTERM-RC"), Some("0"), "{}", r.describe());
    assert_eq!(
        r.value("AGAIN-RC"),
        Some("0"),
        "the CID is free once skiff is gone\n{}",
        r.describe()
    );
}
