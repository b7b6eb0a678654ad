//! Host-guest channels (issue 15).
//!
//! - vhost-vsock as microvm.nix attaches it (`-device
//!   vhost-vsock-pci,guest-cid=N`), on PCI and on virtio-mmio, with socat on
//!   the test host and resources/tools/vsock.c in the guest; a CID held by a
//!   running skiff, also across a guest reboot, and free again once it exits.
//! - virtio-net on a tap, as microvm.nix's tap interfaces
//!   (`-netdev tap,id=ID,ifname=ID,script=no,downscript=no[,vhost=on]
//!   [,queues=N]`) and its macvtap runner (`fd=3`, /dev/tapN opened by the
//!   caller) use it: the guest pings the test host and moves 2 MiB each way
//!   with matching checksums (large frames: TSO, mergeable buffers).
//! - `-netdev bridge,id=ID,br=BR` through QEMU's own qemu-bridge-helper.
//! - `-netdev vde` as the NixOS test driver's vlans use it: two VMs on one
//!   `vde_switch` ping each other.
//! - user networking (libslirp) as microvm.nix writes it (with its trailing
//!   comma) and as NixOS test VMs do (`-net nic,netdev=user.0,model=virtio
//!   -netdev user,id=user.0`): DHCP, a host port forwarded to the guest,
//!   the guest reaching the host through 10.0.2.2.

// Guest tests boot real kernels (a nested test host where the CPU has no
// vmx/svm): built only with `--features guest` (resources/test.sh does).
#![cfg(feature = "guest")]

// `command`: microvm.nix's argv with `devices` and the guest's action.
use skiff_tests::{skiff_command as command, until_then_sigterm, Batch, Scenario, ScenarioResult};

/// Each scenario's limit (they take 20 to 60 s under nested TCG).
const SECS: u32 = 90;

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
         wait_for SKIFF-VSOCK-LISTENING out.txt 70\n\
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
        until_then_sigterm(&cmd, "SKIFF-VSOCK-CID", 2, 90, &between)
    )
}

/// The test host's side of the bulk transfers: 2 MiB served on :5001,
/// whatever arrives on :5000 kept in got.bin.
const BULK_HOST: &str = "head -c 2097152 /dev/urandom > in.bin\n\
     echo \"HOST-IN-SHA=$(sha256sum < in.bin | cut -d' ' -f1)\"\n\
     socat -u OPEN:in.bin TCP-LISTEN:5001,reuseaddr &\n\
     socat -u TCP-LISTEN:5000,reuseaddr OPEN:got.bin,creat &\n";

/// A tap skiff opens (and creates) by name; the test host addresses its
/// side once it exists. `tap` is the -netdev's extra keys.
fn tap(pcie: bool, tap: &str, bulk: bool) -> String {
    let driver = if pcie { "virtio-net-pci" } else { "virtio-net-device" };
    let mq = if tap.contains("queues=") { ",mq=on" } else { "" };
    let devices = format!(
        "-netdev tap,id=n0,ifname=tap0,script=no,downscript=no{tap} \
         -device {driver},netdev=n0,mac=02:00:00:00:00:0f{mq}"
    );
    let bulk = if bulk { ",bulk" } else { "" };
    let cmd =
        command(pcie, &devices, &format!("skiff.test=net skiff.net=10.0.2.15/24,10.0.2.1{bulk}"));
    format!(
        "{BULK_HOST}: > out.txt\n{cmd} > out.txt 2>&1 &\npid=$!\n\
         i=0; while [ ! -e /sys/class/net/tap0 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\n\
         ip addr add 10.0.2.1/24 dev tap0 && ip link set tap0 up\n\
         wait $pid\necho \"SKIFF-RC=$?\"\n\
         echo \"HOST-GOT-SHA=$(sha256sum < got.bin 2>/dev/null | cut -d' ' -f1)\"\n\
         cat out.txt\n"
    )
}

/// Taps that cannot be used, each exit 1 before any guest runs: an fd
/// that is not open, an fd that is not a tap.
fn tap_errors() -> String {
    let with = |netdev: &str| {
        command(true, &format!("-netdev tap,id=n0,{netdev} -device virtio-net-pci,netdev=n0"), "")
    };
    format!(
        "{} > closed.txt 2>&1; echo \"CLOSED-RC=$?\"\n\
         echo \"CLOSED-ERR=$(grep -a 'netdev' closed.txt | head -n 1)\"\n\
         {} 3</dev/null > null.txt 2>&1; echo \"NULL-RC=$?\"\n\
         echo \"NULL-ERR=$(grep -a 'netdev' null.txt | head -n 1)\"\n",
        with("fd=9"),
        with("fd=3"),
    )
}

/// microvm.nix's macvtap: a macvtap (bridge mode, the guest's MAC) on a
/// dummy link, its /dev/tapN opened as fd 3 by the caller; a macvlan peer
/// on the same link answers. Without -no-reboot, the second run must reach
/// the peer through the same inherited descriptor.
fn macvtap() -> String {
    let cmd = command(
        true,
        "-netdev tap,id=n0,fd=3 -device virtio-net-pci,netdev=n0",
        "skiff.test=net skiff.net=10.0.3.15/24,10.0.3.1",
    )
    .replace(" -no-reboot", "");
    let setup = "ip=/usr/sbin/ip\n\
         $ip link add lower0 type dummy && $ip link set lower0 up\n\
         $ip link add link lower0 name mvt0 address 52:54:00:12:34:56 type macvtap mode bridge\n\
         $ip link add link lower0 name mvl0 type macvlan mode bridge\n\
         $ip addr add 10.0.3.1/24 dev mvl0 && $ip link set mvl0 up && $ip link set mvt0 up\n\
         idx=$(cat /sys/class/net/mvt0/ifindex)\n\
         i=0; while [ ! -e /dev/tap$idx ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done\n\
         exec 3<>/dev/tap$idx\n";
    format!("{setup}{}", until_then_sigterm(&cmd, "SKIFF-NET-DONE", 2, 80, ""))
}

/// `-netdev bridge`: QEMU's helper puts a tap on br0 (allowed in
/// /etc/qemu/bridge.conf) and hands it over; the guest pings the bridge's
/// address. A bridge the configuration does not allow is refused.
fn bridge() -> String {
    let device =
        |br: &str| format!("-netdev bridge,id=n0,br={br} -device virtio-net-pci,netdev=n0");
    let cmd = command(true, &device("br0"), "skiff.test=net skiff.net=10.0.4.15/24,10.0.4.1");
    let refused = command(true, &device("br9"), "");
    format!(
        "ip=/usr/sbin/ip\n\
         $ip link add br0 type bridge && $ip addr add 10.0.4.1/24 dev br0 && $ip link set br0 up\n\
         mkdir -p /etc/qemu && echo 'allow br0' > /etc/qemu/bridge.conf\n\
         {refused} > refused.txt 2>&1; echo \"REFUSED-RC=$?\"\n\
         echo \"REFUSED-ERR=$(grep -a 'netdev' refused.txt | head -n 1)\"\n\
         {cmd} > out.txt 2>&1\necho \"SKIFF-RC=$?\"\ncat out.txt\n"
    )
}

/// The NixOS test driver's vlan: `vde_switch -s SOCK --dirmode 0700 --hub`
/// and two VMs on qemu-vm.nix's argv shape (default machine,
/// `-netdev vde,id=vlan1,sock=SOCK`, `virtio-net-pci,...,mac=52:54:00:12:01:NN`)
/// that ping each other through it; each then restarts (-no-reboot: exit 0).
fn vde() -> String {
    let vm = |n: u32, peer: u32| {
        format!(
            "$SKIFF -machine accel=kvm:tcg -m 256 -kernel $BZIMAGE -initrd $INITRD \
             -append \"console=ttyS0 panic=-1 skiff.test=net skiff.net=10.0.9.{n}/24,10.0.9.{peer},linger\" \
             -device virtio-net-pci,netdev=vlan1,mac=52:54:00:12:01:0{n} -netdev vde,id=vlan1,sock=$PWD/vde1 \
             -no-reboot -nographic -sandbox on > vm{n}.txt 2>&1 &\npid{n}=$!\n"
        )
    };
    format!(
        "vde_switch -s $PWD/vde1 --dirmode 0700 --hub -d -p $PWD/vde1.pid\n\
         i=0; while [ ! -e vde1/ctl ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done\n\
         {}{}\
         wait $pid1; echo \"VM1-RC=$?\"\nwait $pid2; echo \"VM2-RC=$?\"\n\
         kill $(cat vde1.pid) 2>/dev/null\n\
         sed 's/^/vm1: /' vm1.txt | grep -a SKIFF-\nsed 's/^/vm2: /' vm2.txt | grep -a SKIFF-\n\
         grep -a -h 'skiff:' vm1.txt vm2.txt\n",
        vm(1, 2),
        vm(2, 1)
    )
}

/// `-netdev user` with a forwarded port: the host reads the guest's line
/// through 127.0.0.1:2222, the guest reads the host's through 10.0.2.2.
fn user_fwd() -> String {
    let cmd = command(
        true,
        "-netdev user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22, -device virtio-net-pci,netdev=n0",
        "skiff.test=net-user skiff.net=fwd",
    );
    format!(
        "ip link set lo up\n\
         socat TCP-LISTEN:5005,reuseaddr,fork SYSTEM:'echo host-line' &\nlistener=$!\n\
         : > out.txt\n{cmd} > out.txt 2>&1 &\npid=$!\n\
         wait_for SKIFF-NET-LISTENING out.txt 70\n\
         for i in 1 2 3 4 5; do line=$(socat -t 5 - TCP:127.0.0.1:2222 </dev/null); \
         [ -n \"$line\" ] && break; sleep 1; done\n\
         echo \"HOSTFWD-LINE=$line\"\n\
         wait $pid\necho \"SKIFF-RC=$?\"\nkill $listener 2>/dev/null\ncat out.txt\n"
    )
}

/// NixOS test VMs' NIC (seed 001): `-net nic` on the machine's bus
/// (virtio-mmio here, pcie=off), `-netdev user` with nothing else. (One
/// run: guest reboots are where the nested test host now and then wedges,
/// and macvtap-fd and vsock-reboot already reboot in this batch.)
fn user_seed() -> String {
    let cmd = command(
        false,
        "-net nic,netdev=user.0,model=virtio -netdev user,id=user.0",
        "skiff.test=net-user",
    );
    format!("{cmd}\necho \"SKIFF-RC=$?\"\n")
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::script("vsock-pci", SECS, &exchange(true, 3)),
        Scenario::script("vsock-mmio", SECS, &exchange(false, 4)),
        Scenario::script("vsock-reboot", SECS + 20, &reboot()),
        Scenario::script("tap-pci", SECS, &format!("{}{}", tap_errors(), tap(true, "", true))),
        Scenario::script("tap-vhost-mmio", SECS, &tap(false, ",vhost=on", true)),
        Scenario::script("tap-mq", SECS, &tap(true, ",queues=2", false)),
        Scenario::script("macvtap-fd", SECS, &macvtap()),
        Scenario::script("user-fwd", SECS, &user_fwd()),
        Scenario::script("bridge", SECS, &bridge()),
        Scenario::script("user-seed", SECS, &user_seed()),
        Scenario::script("vde-two-vms", 150, &vde()),
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

/// The guest's side of a tap scenario: link, address, ping, and with bulk
/// both transfers intact.
fn tap_worked(name: &str, bulk: bool) -> &'static ScenarioResult {
    let r = result(name);
    assert_eq!(r.value("SKIFF-NET-CARRIER"), Some("1"), "{name}\n{}", r.describe());
    assert_eq!(r.value("SKIFF-NET-PING"), Some("ok"), "{name}\n{}", r.describe());
    if bulk {
        let sent = r.value("HOST-IN-SHA").expect("the host's data");
        assert_eq!(sent.len(), 64, "{name}\n{}", r.describe());
        assert_eq!(r.value("SKIFF-NET-IN-SHA"), Some(sent), "host to guest\n{}", r.describe());
        let out = r.value("SKIFF-NET-OUT-SHA").expect("the guest's data");
        assert_eq!(r.value("HOST-GOT-SHA"), Some(out), "guest to host\n{}", r.describe());
    }
    assert!(r.has_line("SKIFF-NET-DONE"), "{name}\n{}", r.describe());
    r
}

#[test]
fn tap_on_pci_pings_and_moves_data_both_ways() {
    let r = tap_worked("tap-pci", true);
    assert_eq!(r.value("SKIFF-NET-MAC"), Some("02:00:00:00:00:0f"), "{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}

#[test]
fn tap_with_vhost_net_on_mmio() {
    let r = tap_worked("tap-vhost-mmio", true);
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}

#[test]
fn a_two_queue_tap_gives_the_guest_two_queue_pairs() {
    let r = tap_worked("tap-mq", false);
    assert_eq!(r.value("SKIFF-NET-QUEUES"), Some("rx-0,rx-1,tx-0,tx-1,"), "{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}

#[test]
fn unusable_taps_are_refused_by_name() {
    let r = result("tap-pci");
    assert_eq!(r.value("CLOSED-RC"), Some("1"), "{}", r.describe());
    let err = r.line_value("CLOSED-ERR").unwrap_or_default();
    assert!(
        err.contains("-netdev tap,id=n0") && err.contains("fd 9 is not an open descriptor"),
        "{err}"
    );
    assert_eq!(r.value("NULL-RC"), Some("1"), "{}", r.describe());
    let err = r.line_value("NULL-ERR").unwrap_or_default();
    assert!(err.contains("fd 3 is not a tap device"), "{err}");
}

#[test]
fn macvtap_fd_from_the_parent_works_across_a_reboot() {
    let r = result("macvtap-fd");
    let pings: Vec<&str> = r
        .lines()
        .filter_map(|l| l.split("SKIFF-NET-PING=").nth(1))
        .map(|v| v.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(pings, ["ok", "ok"], "both runs reach the macvlan peer\n{}", r.describe());
    assert_eq!(r.value("SKIFF-NET-MAC"), Some("52:54:00:12:34:56"), "QEMU's default MAC");
    assert_eq!(r.value("SIGTERM-RC"), Some("0"), "{}", r.describe());
}

#[test]
fn user_networking_gives_dhcp_and_forwards_both_ways() {
    let r = result("user-fwd");
    assert_eq!(r.value("SKIFF-DHCP-ADDR"), Some("10.0.2.15"), "{}", r.describe());
    assert_eq!(r.value("HOSTFWD-LINE"), Some("guest-line"), "hostfwd\n{}", r.describe());
    assert_eq!(r.value("SKIFF-HOST-LINE"), Some("host-line"), "via 10.0.2.2\n{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}

#[test]
fn nixos_test_vm_nic_gets_dhcp() {
    let r = result("user-seed");
    assert_eq!(r.value("SKIFF-DHCP-ADDR"), Some("10.0.2.15"), "{}", r.describe());
    assert!(r.has_line("SKIFF-NET-DONE"), "{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}

#[test]
fn bridge_helper_puts_the_nic_on_the_bridge() {
    let r = result("bridge");
    assert_eq!(r.value("SKIFF-NET-PING"), Some("ok"), "{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
    assert_eq!(r.value("REFUSED-RC"), Some("1"), "{}", r.describe());
    let err = r.line_value("REFUSED-ERR").unwrap_or_default();
    assert!(err.contains("-netdev bridge,id=n0") && err.contains("bridge helper failed"), "{err}");
}

#[test]
fn two_vms_on_one_vde_switch_ping_each_other() {
    let r = result("vde-two-vms");
    for vm in ["vm1", "vm2"] {
        let ping = format!("{vm}: SKIFF-NET-PING=ok");
        assert!(r.output.lines().any(|l| l.trim() == ping), "{vm}\n{}", r.describe());
    }
    assert_eq!(r.value("VM1-RC"), Some("0"), "{}", r.describe());
    assert_eq!(r.value("VM2-RC"), Some("0"), "{}", r.describe());
}
