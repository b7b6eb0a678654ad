//! The human monitor (HMP) as the NixOS test driver uses it, on this
//! machine's /dev/kvm with the tiny PVH guest (a halting loop that even a
//! software KVM runs: no test host needed). The driver's shape: it
//! listens on `monitor` and `shell`, skiff connects to both (`-monitor
//! unix:PATH`, `-chardev socket,path=` under a virtconsole), and the driver
//! reads the monitor up to the `(qemu) ` prompt before anything else; each
//! command's answer ends with the next prompt. On the default machine
//! (no -M: PCIe, i8042), as qemu-vm.nix runs it.

// Guest tests boot real kernels (a nested test host where the CPU has no
// vmx/svm): built only with `--features guest` (resources/test.sh does).
#![cfg(feature = "guest")]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use skiff_tests::{check_skiff, ensure_assets};

fn cache() -> PathBuf {
    std::env::var_os("SKIFF_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/skiff"))
}

/// Accepts within 30 s, or fails with what skiff said.
fn accept(l: &UnixListener, vm: &mut Child, what: &str) -> UnixStream {
    l.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{what}: {e}"),
        }
        if let Some(status) = vm.try_wait().unwrap() {
            let mut err = String::new();
            vm.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("skiff ended ({status}) before connecting to {what}: {err}");
        }
        assert!(Instant::now() < deadline, "skiff never connected to {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The driver's `wait_for_monitor_prompt`: reads until `(qemu) `.
fn until_prompt(m: &mut UnixStream) -> String {
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.ends_with(b"(qemu) ") {
        let n = m.read(&mut buf).expect("the monitor answers within 20 s");
        assert!(n > 0, "the monitor closed; so far: {:?}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(answer).unwrap()
}

fn command(m: &mut UnixStream, line: &str) -> String {
    m.write_all(format!("{line}\n").as_bytes()).unwrap();
    until_prompt(m)
}

#[test]
fn the_test_drivers_monitor_and_shell_sockets() {
    ensure_assets().unwrap();
    let skiff = check_skiff().unwrap();
    let dir = std::env::temp_dir().join(format!("skiff-hmp-client-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let monitor_path = dir.join("monitor");
    let shell_path = dir.join("shell");
    let monitor = UnixListener::bind(&monitor_path).unwrap();
    let shell = UnixListener::bind(&shell_path).unwrap();
    let tiny = cache().join("tools/tiny-pvh.elf");
    let mut vm = Command::new(&skiff)
        .args(["-machine", "accel=kvm:tcg", "-m", "64M", "-nodefaults", "-nographic"])
        .arg("-kernel")
        .arg(&tiny)
        .arg("-monitor")
        .arg(format!("unix:{}", monitor_path.display()))
        .arg("-chardev")
        .arg(format!("socket,id=shell,path={}", shell_path.display()))
        .args(["-device", "virtio-serial", "-device", "virtconsole,chardev=shell"])
        .args(["-device", "virtio-rng-pci"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut m = accept(&monitor, &mut vm, "the monitor");
    let _shell = accept(&shell, &mut vm, "the shell");
    let banner = until_prompt(&mut m);
    assert_eq!(banner, "QEMU 10.0.0 monitor - type 'help' for more information\r\n(qemu) ");
    assert_eq!(command(&mut m, "info status"), "info status\r\nVM status: running\r\n(qemu) ");
    // ctrl-alt-delete reaches the default machine's i8042: no error.
    assert_eq!(command(&mut m, "sendkey ctrl-alt-delete"), "sendkey ctrl-alt-delete\r\n(qemu) ");
    assert_eq!(command(&mut m, "sendkey 0x0C 10"), "sendkey 0x0C 10\r\n(qemu) ");
    assert_eq!(
        command(&mut m, "sendkey nosuchkey"),
        "sendkey nosuchkey\r\ninvalid parameter: nosuchkey\r\n(qemu) "
    );
    assert!(command(&mut m, "screendump /tmp/s.ppm").contains("There is no QemuConsole"));
    assert_eq!(command(&mut m, "frob"), "frob\r\nunknown command: 'frob'\r\n(qemu) ");
    assert_eq!(command(&mut m, ""), "\r\n(qemu) ");
    // A reset starts a new run; the monitor's connection stays.
    assert_eq!(command(&mut m, "system_reset"), "system_reset\r\n(qemu) ");
    assert_eq!(command(&mut m, "info status"), "info status\r\nVM status: running\r\n(qemu) ");
    // `crash()`: quit ends skiff, status 0.
    m.write_all(b"quit\n").unwrap();
    let status = skiff_tests::exit_within(&mut vm, 20);
    let out = vm.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "quit ends skiff with 0; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
