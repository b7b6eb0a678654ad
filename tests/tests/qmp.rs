//! QMP: microvm.nix's shutdown (capabilities + system_powerdown over socat,
//! then connect-until-it-fails), the older Ctrl-Alt-Del path, quit,
//! query-status, errors that leave the VM running, and a second client.
//!
//! All scenarios run in one test-host boot, like tests/boot.rs.

// Guest tests boot real kernels (a nested test host where the CPU has no
// vmx/svm): built only with `--features guest` (resources/test.sh does).
#![cfg(feature = "guest")]

use skiff_tests::{microvm_nix_command, Batch, Scenario, ScenarioResult};

const SECS: u32 = 120;

/// Starts skiff with a QMP socket in the background, its console in out.txt.
fn start(action: &str) -> String {
    start_with("", action)
}

fn start_with(extra: &str, action: &str) -> String {
    let cmd = microvm_nix_command(
        "$SKIFF",
        true,
        &format!("-qmp unix:q.sock,server,nowait {extra}"),
        &format!("skiff.test={action}"),
    );
    format!("rm -f q.sock\n: > out.txt\n{cmd} > out.txt 2>&1 &\npid=$!\nwait_for SKIFF-WAITING out.txt 90\n")
}

/// Each of skiff's threads as `THREAD name Uid: ... Seccomp: N`.
const THREADS: &str = r#"for t in /proc/$pid/task/*; do
  echo "THREAD $(cat $t/comm) $(grep -E '^(Uid|Gid|Seccomp):' $t/status | tr -s '\t ' ' ' | tr '\n' ' ')"
done
"#;

/// After skiff exits: its status, whether the socket still accepts, and
/// whether its file is gone; then the client's transcript and the console.
const FINISH: &str = r#"
wait $pid
echo "SKIFF-RC=$?"
if socat -u /dev/null UNIX-CONNECT:q.sock 2>/dev/null; then echo CONNECT-AFTER-EXIT=ok; else echo CONNECT-AFTER-EXIT=refused; fi
if [ -e q.sock ]; then echo SOCKET-FILE=present; else echo SOCKET-FILE=gone; fi
echo "--- qmp"
cat qmp*.txt
echo "--- console"
cat out.txt
"#;

fn scenarios() -> Vec<Scenario> {
    // Exactly microvm.nix's two lines; -t keeps socat reading after its
    // stdin ends, so the transcript has the events up to skiff's exit.
    let powerdown = format!(
        "{}printf '%s\\n' '{{\"execute\":\"qmp_capabilities\"}}' '{{\"execute\":\"system_powerdown\"}}' \
         | socat -t 60 STDIO UNIX:q.sock,shut-none > qmp.txt\n{FINISH}",
        start("powerbutton")
    );
    let cad = format!(
        "{}printf '%s\\n' '{{\"execute\":\"qmp_capabilities\"}}' \
         '{{\"execute\":\"input-send-event\",\"arguments\":{{\"events\":[\
{{\"type\":\"key\",\"data\":{{\"down\":true,\"key\":{{\"type\":\"qcode\",\"data\":\"ctrl\"}}}}}},\
{{\"type\":\"key\",\"data\":{{\"down\":true,\"key\":{{\"type\":\"qcode\",\"data\":\"alt\"}}}}}},\
{{\"type\":\"key\",\"data\":{{\"down\":true,\"key\":{{\"type\":\"qcode\",\"data\":\"delete\"}}}}}}]}}}}' \
         | socat -t 60 STDIO UNIX:q.sock,shut-none > qmp.txt\n{FINISH}",
        start("cad")
    );
    // First client: negotiation, a status query, bad JSON, an unknown
    // command, a balloon with no balloon device; it leaves. Second client: a fresh greeting, then quit.
    let session = format!(
        "{}printf '%s\\n' '{{\"execute\":\"query-status\"}}' '{{\"execute\":\"qmp_capabilities\"}}' \
         '{{\"execute\":\"query-status\",\"id\":\"s1\"}}' 'this is not json' '{{\"execute\":\"frobnicate\"}}' \
         '{{\"execute\":\"balloon\",\"arguments\":{{\"value\":268435456}},\"id\":\"b1\"}}' \
         '{{\"execute\":\"query-status\",\"id\":\"s2\"}}' | socat -t 2 STDIO UNIX:q.sock > qmp1.txt\n\
         printf '%s\\n' '{{\"execute\":\"qmp_capabilities\"}}' '{{\"execute\":\"quit\"}}' \
         | socat -t 60 STDIO UNIX:q.sock > qmp2.txt\n{FINISH}",
        start("sleep")
    );
    // Three clients send and close without reading a byte (socat -u); the
    // fourth is greeted, answered, and powers the guest down.
    let unread = "printf '%s\\n' '{\"execute\":\"qmp_capabilities\"}' \
         '{\"execute\":\"query-status\"}' | socat -u STDIN UNIX-CONNECT:q.sock\n";
    let deaf = format!(
        "{}{unread}{unread}{unread}printf '%s\\n' '{{\"execute\":\"qmp_capabilities\"}}' \
         '{{\"execute\":\"query-status\",\"id\":\"after\"}}' '{{\"execute\":\"system_powerdown\"}}' \
         | socat -t 60 STDIO UNIX:q.sock,shut-none > qmp.txt\n{FINISH}",
        start("powerbutton")
    );
    // SIGTERM while wait=on holds the start for a client: status 0, as a
    // signal ends a running VM.
    let wait_term = "$SKIFF -M microvm -m 256M -kernel $BZIMAGE -nographic \
         -qmp unix:w.sock,server=on,wait=on > out.txt 2>&1 &\npid=$!\n\
         i=0; while [ ! -S w.sock ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done\n\
         [ -S w.sock ] && echo SOCKET=listening\n\
         kill -TERM $pid\nwait $pid\necho \"SKIFF-RC=$?\"\ncat out.txt\n";
    // microvm.nix's argv (with -sandbox on) plus virtio-rng, QMP and
    // -run-with user=nobody: every thread confined and no longer root, the
    // RNG served, and system_powerdown still ends it.
    let sandbox = format!(
        "{}{THREADS}printf '%s\\n' '{{\"execute\":\"qmp_capabilities\"}}' '{{\"execute\":\"system_powerdown\"}}' \
         | socat -t 60 STDIO UNIX:q.sock,shut-none > qmp.txt\n{FINISH}",
        start_with("-device virtio-rng-device -run-with user=nobody", "powerbutton")
    );
    // The test switch: a vCPU thread, then a device worker (started when
    // the guest's driver takes the RNG), makes a forbidden call.
    let trip = |kind: &str| {
        let cmd = microvm_nix_command(
            &format!("SKIFF_TEST_SECCOMP_TRIP={kind} $SKIFF"),
            true,
            "-device virtio-rng-device",
            "skiff.test=rng",
        );
        format!("{cmd} > out-{kind}.txt 2>&1\necho \"TRIP-{kind}-RC=$?\"\ngrep -a forbidden out-{kind}.txt\n")
    };
    let trips = format!("{}{}", trip("vcpu"), trip("worker"));
    vec![
        Scenario::script("nixos-driver-sockets", 240, NIXOS_DRIVER_SOCKETS),
        Scenario::script("guest-reboot-methods", 300, &reboot_methods()),
        Scenario::script("sandbox-run-with", SECS, &sandbox),
        Scenario::script("sandbox-trip", SECS, &trips),
        Scenario::script("qmp-unread-clients", SECS, &deaf),
        Scenario::script("qmp-wait-sigterm", 30, wait_term),
        Scenario::script("qmp-powerdown", SECS, &powerdown),
        Scenario::script("qmp-ctrl-alt-del", SECS, &cad),
        Scenario::script("qmp-session", SECS, &session),
    ]
}

/// The NixOS test driver's sockets around qemu-vm.nix's shape of argv (no
/// machine type: the default machine with PCI): the driver listens on
/// `monitor` and `shell` (socat here, fed through FIFOs), skiff connects
/// to both; the monitor greets and answers; the guest's backdoor shell on
/// the virtconsole announces itself and runs what the driver sends; HMP
/// `sendkey` reaches the virtio keyboard once its driver runs, `set_link`
/// pulls and plugs the vlan NIC's cable (a vde_switch port), `hostfwd_add`
/// forwards a host port to the guest's listener (`forward_port()`), and
/// `sendkey ctrl-alt-delete` (the driver's reboot()) the guest,
/// whose restart ends skiff with 0 under -no-reboot (HMP `quit` is the
/// fallback, and the test fails if it was needed).
const NIXOS_DRIVER_SOCKETS: &str = r#"rm -f monitor shell min sin
ip link set lo up
mkfifo min sin
vde_switch -s $PWD/vde1 --dirmode 0700 --hub -d -p $PWD/vde1.pid
i=0; while [ ! -e vde1/ctl ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
socat -t 30 UNIX-LISTEN:monitor STDIO <min >mon.txt 2>&1 &
socat -t 30 UNIX-LISTEN:shell STDIO <sin >shell.txt 2>&1 &
exec 3>min 4>sin
i=0; while { [ ! -S monitor ] || [ ! -S shell ]; } && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
$SKIFF -machine accel=kvm:tcg -cpu max -name t -m 384 -smp 1 -device virtio-rng-pci   -kernel $BZIMAGE -initrd $INITRD -append "console=ttyS0 panic=-1 skiff.test=backdoor"   -monitor unix:monitor -chardev socket,id=shell,path=shell -device virtio-serial   -device virtconsole,chardev=shell -device virtio-keyboard -usb -device usb-tablet,bus=usb-bus.0 \
  -net nic,netdev=user.0,model=virtio -netdev user,id=user.0 \
  -device virtio-net-pci,netdev=vlan1,mac=52:54:00:12:01:01 -netdev vde,id=vlan1,sock=$PWD/vde1 \
  -serial stdio -no-reboot -nographic -sandbox on > out.txt 2>&1 &
pid=$!
wait_for "monitor - type 'help'" mon.txt 60
echo 'info status' >&3
wait_for 'VM status: running' mon.txt 20
wait_for 'Spawning backdoor root shell' shell.txt 150
echo 'echo BACKDOOR-$((6 * 7)); uname -s' >&4
wait_for BACKDOOR-42 shell.txt 30
wait_for Linux shell.txt 10
echo 'for d in /sys/class/input/event*; do grep -q "QEMU Virtio Keyboard" $d/device/name && ev=/dev/input/${d##*/}; done; echo "VKBD=$ev"; (dd if=$ev bs=24 count=1 of=/dev/null 2>/dev/null && echo VIRTIO-KEY""-SEEN) &' >&4
wait_for 'VKBD=/dev/input' shell.txt 10
sleep 0.5
echo 'sendkey shift-a' >&3
wait_for VIRTIO-KEY-SEEN shell.txt 10
echo 'for i in /sys/class/net/eth*; do [ "$(cat $i/address)" = 52:54:00:12:01:01 ] && vl=${i##*/}; done; ip link set $vl up; sleep 1; echo "CARRIER-BEFORE""=$(cat /sys/class/net/$vl/carrier)"' >&4
wait_for CARRIER-BEFORE= shell.txt 15
echo 'set_link virtio-net-pci.1 off' >&3
echo 'set_link nosuchnic off' >&3
sleep 1
echo 'echo "CARRIER-BLOCKED""=$(cat /sys/class/net/$vl/carrier)"' >&4
wait_for CARRIER-BLOCKED= shell.txt 10
echo 'set_link vlan1 on' >&3
sleep 1
echo 'echo "CARRIER-UNBLOCKED""=$(cat /sys/class/net/$vl/carrier)"' >&4
wait_for CARRIER-UNBLOCKED= shell.txt 10
echo 'for i in /sys/class/net/eth*; do [ "$(cat $i/address)" = 52:54:00:12:34:56 ] && un=${i##*/}; done; ip link set $un up; ip addr add 10.0.2.15/24 dev $un; (echo guest-fwd-line | nc -l -p 22) & echo "USERNET""=$un"' >&4
wait_for USERNET= shell.txt 15
echo 'hostfwd_add tcp:127.0.0.1:2222-:22' >&3
sleep 1
line=
for i in 1 2 3 4 5; do line=$(socat -t 5 - TCP:127.0.0.1:2222 </dev/null 2>/dev/null); [ -n "$line" ] && break; sleep 1; done
echo "FWD-LINE=$line"
echo 'hostfwd_remove tcp:127.0.0.1:2222' >&3
sleep 1
echo 'sendkey ctrl-alt-delete' >&3
wait_for 'reboot: Restarting system' out.txt 30
i=0; while kill -0 $pid 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
if kill -0 $pid 2>/dev/null; then
  echo "RESTART-HUNG=yes"
  echo 'quit' >&3
  i=0; while kill -0 $pid 2>/dev/null && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
  if kill -0 $pid 2>/dev/null; then echo "KILLED=yes"; kill $pid; fi
fi
wait $pid
echo "SKIFF-RC=$?"
exec 3>&- 4>&-
kill $(cat vde1.pid) 2>/dev/null
echo "--- monitor"; cat mon.txt
echo "--- shell"; cat shell.txt
echo "--- console"; cat out.txt
"#;

/// A guest's own restart with -no-reboot ends skiff with 0 whichever way
/// Linux resets the machine: by default (on microvm's hardware-reduced
/// ACPI Linux picks EFI, then the BIOS's reset vector: skiff's stub
/// there), the ACPI reset register (the GED's), the i8042's reset line, a
/// triple fault; on the default machine, as the NixOS test driver's
/// reboot() has it. A run that does not end in 90 s is killed and says so.
fn reboot_methods() -> String {
    let mut s = String::new();
    for how in ["default", "a", "k", "t"] {
        let reboot = if how == "default" { String::new() } else { format!("reboot={how} ") };
        s.push_str(&format!(
            "$SKIFF -machine accel=kvm:tcg -m 256 -kernel $BZIMAGE -initrd $INITRD \
             -append \"console=ttyS0 panic=-1 {reboot}skiff.test=reboot\" -no-reboot -nographic \
             > reboot-{how}.txt 2>&1 &\npid=$!\n\
             i=0; while kill -0 $pid 2>/dev/null && [ $i -lt 900 ]; do sleep 0.1; i=$((i + 1)); done\n\
             if kill -0 $pid 2>/dev/null; then echo \"REBOOT-{how}-HUNG=yes\"; kill $pid; fi\n\
             wait $pid\necho \"REBOOT-{how}-RC=$?\"\ntail -3 reboot-{how}.txt\n"
        ));
    }
    s
}

static BATCH: Batch = Batch::new();

fn result(name: &str) -> &'static ScenarioResult {
    BATCH.result(scenarios, name)
}

fn assert_clean_exit(r: &ScenarioResult) {
    assert!(r.has_line("SKIFF-WAITING"), "the guest never got ready\n{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "skiff should exit 0\n{}", r.describe());
    assert_eq!(r.value("SOCKET-FILE"), Some("gone"), "{}", r.describe());
    assert_eq!(r.value("CONNECT-AFTER-EXIT"), Some("refused"), "{}", r.describe());
}

#[test]
fn the_nixos_test_drivers_monitor_and_backdoor_shell() {
    let r = result("nixos-driver-sockets");
    let shell = r.output.split("--- shell").nth(1).unwrap_or_default();
    let monitor = r.output.split("--- monitor").nth(1).unwrap_or_default();
    assert!(
        monitor.contains("QEMU 10.0.0 monitor - type 'help' for more information"),
        "{}",
        r.describe()
    );
    assert!(monitor.contains("VM status: running"), "{}", r.describe());
    assert!(shell.contains("Spawning backdoor root shell..."), "{}", r.describe());
    assert!(shell.lines().any(|l| l.trim() == "BACKDOOR-42"), "{}", r.describe());
    assert!(shell.lines().any(|l| l.trim() == "Linux"), "{}", r.describe());
    // block()/unblock(): set_link by QEMU's automatic name and by the
    // netdev's id, seen as the guest's carrier.
    let carrier =
        |what: &str| shell.lines().find_map(|l| l.trim().strip_prefix(what)).map(str::to_owned);
    assert_eq!(carrier("CARRIER-BEFORE=").as_deref(), Some("1"), "{}", r.describe());
    assert_eq!(carrier("CARRIER-BLOCKED=").as_deref(), Some("0"), "{}", r.describe());
    assert_eq!(carrier("CARRIER-UNBLOCKED=").as_deref(), Some("1"), "{}", r.describe());
    assert!(monitor.contains("Error: Device 'nosuchnic' not found"), "{}", r.describe());
    // forward_port(): hostfwd_add while the guest runs reaches its
    // listener through user networking; hostfwd_remove lets it go.
    assert_eq!(r.value("FWD-LINE"), Some("guest-fwd-line"), "{}", r.describe());
    assert!(
        monitor.contains("host forwarding rule for tcp:127.0.0.1:2222 removed"),
        "{}",
        r.describe()
    );
    // The driver of -device virtio-keyboard runs: sendkey goes to it.
    assert!(shell.lines().any(|l| l.trim().ends_with("VIRTIO-KEY-SEEN")), "{}", r.describe());
    assert!(r.output.contains("usb-tablet: left out"), "said on stderr\n{}", r.describe());
    assert!(!r.output.contains("TIMED-OUT-WAITING-FOR"), "{}", r.describe());
    // Ctrl-Alt-Del through the default machine's i8042: the guest
    // restarts, which -no-reboot makes skiff's exit 0.
    assert!(r.output.contains("reboot: Restarting system"), "{}", r.describe());
    assert_eq!(r.value("RESTART-HUNG"), None, "{}", r.describe());
    assert_eq!(r.value("KILLED"), None, "quit did not end skiff\n{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}

#[test]
fn a_guest_restart_ends_skiff_with_no_reboot_whatever_the_method() {
    let r = result("guest-reboot-methods");
    for how in ["default", "a", "k", "t"] {
        assert_eq!(r.value(&format!("REBOOT-{how}-HUNG")), None, "reboot={how}\n{}", r.describe());
        assert_eq!(
            r.value(&format!("REBOOT-{how}-RC")),
            Some("0"),
            "reboot={how}\n{}",
            r.describe()
        );
    }
}

#[test]
fn system_powerdown_as_microvm_nix_sends_it() {
    let r = result("qmp-powerdown");
    assert_clean_exit(r);
    assert!(r.contains("\"QMP\""), "no greeting\n{}", r.describe());
    assert!(r.contains("\"event\":\"POWERDOWN\""), "no POWERDOWN event\n{}", r.describe());
    assert!(r.contains("\"event\":\"SHUTDOWN\""), "no SHUTDOWN event\n{}", r.describe());
    assert!(r.contains("\"reason\":\"guest-shutdown\""), "{}", r.describe());
    assert!(r.has_line("SKIFF-POWER-BUTTON"), "the guest did not see the button\n{}", r.describe());
}

/// Clients that close without reading their replies leave QMP listening:
/// the next one is greeted and answered, and its system_powerdown works.
#[test]
fn clients_that_never_read_leave_qmp_answering() {
    let r = result("qmp-unread-clients");
    assert_clean_exit(r);
    assert!(r.contains("\"QMP\""), "no greeting\n{}", r.describe());
    assert!(r.contains(r#""id":"after","return":{"running":true"#), "{}", r.describe());
    assert!(r.contains("\"event\":\"POWERDOWN\""), "{}", r.describe());
    assert!(r.has_line("SKIFF-POWER-BUTTON"), "the guest did not see the button\n{}", r.describe());
}

#[test]
fn sigterm_while_waiting_for_a_client_exits_0() {
    let r = result("qmp-wait-sigterm");
    assert!(r.has_line("SOCKET=listening"), "{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}

#[test]
fn ctrl_alt_delete_through_the_i8042() {
    let r = result("qmp-ctrl-alt-del");
    assert_clean_exit(r);
    assert!(r.contains("\"event\":\"SHUTDOWN\""), "{}", r.describe());
    assert!(r.contains("\"reason\":\"guest-reset\""), "expected a guest reset\n{}", r.describe());
}

#[test]
fn quit_status_errors_and_a_second_client() {
    let r = result("qmp-session");
    assert_clean_exit(r);
    let out = &r.output;
    assert!(
        out.contains("Expecting capabilities negotiation"),
        "commands before negotiation must fail\n{}",
        r.describe()
    );
    assert!(out.contains(r#""id":"s1","return":{"running":true"#), "{}", r.describe());
    assert!(out.contains(r#""class":"GenericError""#), "bad JSON needs an error\n{}", r.describe());
    assert!(out.contains(r#""class":"CommandNotFound","desc":"The command frobnicate"#));
    assert!(
        out.contains(r#"{"error":{"class":"DeviceNotActive","desc":"No balloon device has been activated"},"id":"b1"}"#),
        "balloon without a balloon device\n{}",
        r.describe()
    );
    assert!(
        out.contains(r#""id":"s2","return":{"running":true"#),
        "VM must keep running\n{}",
        r.describe()
    );
    assert_eq!(out.matches("\"QMP\"").count(), 2, "each client gets a greeting\n{}", r.describe());
    assert!(out.contains(r#""reason":"host-qmp-quit""#), "{}", r.describe());
}

/// `-sandbox on -run-with user=nobody`: every thread has a filter
/// (Seccomp: 2) and runs as nobody; the guest reads the RNG through a
/// confined worker; QMP's system_powerdown ends the VM with status 0.
#[test]
fn sandbox_and_run_with_confine_every_thread() {
    let r = result("sandbox-run-with");
    assert!(r.has_line("SKIFF-WAITING"), "the guest never got ready\n{}", r.describe());
    assert_eq!(r.value("SKIFF-RNG-BYTES"), Some("65536"), "{}", r.describe());
    let threads: Vec<&str> = r.lines().filter(|l| l.starts_with("THREAD ")).collect();
    let names: Vec<&str> = threads.iter().filter_map(|t| t.split(' ').nth(1)).collect();
    for needed in ["skiff", "vcpu0", "vcpu1", "console"] {
        assert!(names.contains(&needed), "no {needed} thread in {names:?}\n{}", r.describe());
    }
    assert!(names.len() > 4, "a device worker too: {names:?}\n{}", r.describe());
    for t in &threads {
        assert!(t.contains("Seccomp: 2"), "unconfined: {t}\n{}", r.describe());
        assert!(t.contains("Uid: 65534 65534 65534 65534"), "not nobody: {t}\n{}", r.describe());
        assert!(t.contains("Gid: 65534 65534 65534 65534"), "not nogroup: {t}\n{}", r.describe());
    }
    assert!(r.has_line("SKIFF-POWER-BUTTON"), "the guest did not see the button\n{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "skiff should exit 0\n{}", r.describe());
    assert!(!r.contains("forbidden system call"), "{}", r.describe());
}

/// A forbidden call ends skiff with 159 and a line naming the call and
/// the thread, from a vCPU and from a device worker.
#[test]
fn a_forbidden_system_call_ends_skiff_naming_it() {
    let r = result("sandbox-trip");
    for kind in ["vcpu", "worker"] {
        assert_eq!(r.value(&format!("TRIP-{kind}-RC")), Some("159"), "{kind}\n{}", r.describe());
    }
    assert!(
        r.contains("thread vcpu0 made a forbidden system call: ptrace (101)")
            || r.contains("thread vcpu1 made a forbidden system call: ptrace (101)"),
        "{}",
        r.describe()
    );
    // Every vCPU trips, and a second one may print before the process is
    // gone: what counts is that the worker's trip is named too.
    assert!(
        r.contains("thread virtio-rng made a forbidden system call: ptrace (101)"),
        "{}",
        r.describe()
    );
}
