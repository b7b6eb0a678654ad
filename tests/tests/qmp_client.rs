//! QEMU's own QMP client library (`qemu.qmp`, as QEMU tooling uses it)
//! against skiff, on this machine's /dev/kvm with the tiny PVH guest (a
//! halting loop that even a software KVM runs: no test host needed). The
//! commands microvm.nix and the NixOS test driver send go through skiff's
//! typed device control: query-status, query-commands, input-send-event
//! (to the i8042's keyboard face; a named display is refused as QEMU
//! refuses it), system_powerdown (the GED's power-button face),
//! system_reset (a new run: RESET), quit (SHUTDOWN, exit 0).

// Guest tests boot real kernels (a nested test host where the CPU has no
// vmx/svm): built only with `--features guest` (resources/test.sh does).
#![cfg(feature = "guest")]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use skiff_tests::{check_skiff, ensure_assets, repo_root};

fn cache() -> PathBuf {
    std::env::var_os("SKIFF_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/skiff"))
}

#[test]
fn qemu_qmp_client_drives_skiff() {
    ensure_assets().unwrap();
    let skiff = check_skiff().unwrap();
    let dir = std::env::temp_dir().join(format!("skiff-qmp-client-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("qmp.sock");
    let tiny = cache().join("tools/tiny-pvh.elf");
    let mut vm = Command::new(&skiff)
        .args(["-M", "microvm", "-m", "64M", "-smp", "1", "-nodefaults", "-nographic"])
        .args(["-device", "i8042,id=kbd", "-kernel"])
        .arg(&tiny)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !sock.exists() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let client = Command::new(cache().join("py/bin/python3"))
        .arg(repo_root().join("tests/qmp_client.py"))
        .arg(&sock)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&client.stdout).into_owned();
    let err = String::from_utf8_lossy(&client.stderr).into_owned();
    // quit ends skiff; a client that failed leaves it running: end it.
    let status = skiff_tests::exit_within(&mut vm, 10);
    let vm_out = vm.wait_with_output().unwrap();
    let describe = format!(
        "client stdout:\n{out}\nclient stderr:\n{err}\nskiff stderr:\n{}",
        String::from_utf8_lossy(&vm_out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    let has = |line: &str| out.lines().any(|l| l == line);
    assert!(client.status.success(), "{describe}");
    assert!(has("GREETING 10"), "{describe}");
    assert!(has("STATUS running True"), "{describe}");
    let commands = out.lines().find_map(|l| l.strip_prefix("COMMANDS ")).unwrap_or_default();
    for c in ["input-send-event", "query-status", "quit", "system_powerdown", "system_reset"] {
        assert!(commands.split(',').any(|x| x == c), "{c} missing: {commands}\n{describe}");
    }
    assert!(has("KEYS sent"), "{describe}");
    assert!(has("KEYS-TO-MISSING DeviceNotFound"), "{describe}");
    assert!(has("UNKNOWN CommandNotFound"), "{describe}");
    assert!(has("EVENT POWERDOWN"), "{describe}");
    assert!(has("EVENT RESET host-qmp-system-reset"), "{describe}");
    assert!(has("STATUS-AFTER-RESET running"), "{describe}");
    assert!(has("EVENT SHUTDOWN host-qmp-quit"), "{describe}");
    assert!(has("DONE"), "{describe}");
    assert_eq!(status.and_then(|s| s.code()), Some(0), "quit ends skiff with 0\n{describe}");
}
