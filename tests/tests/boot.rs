//! Foundation: Skiff boots Linux with microvm.nix's argv, the guest's ways
//! of stopping end the process with QEMU's exit codes, and bad command lines
//! fail with a clear message.
//!
//! All scenarios run in ONE batch (one test-host boot): the first test to
//! ask runs it, the others wait for it, each then asserts on its scenario.

// Guest tests boot real kernels (a nested test host where the CPU has no
// vmx/svm): built only with `--features guest` (resources/test.sh does).
#![cfg(feature = "guest")]

use skiff_tests::{microvm_nix_command, until_then_sigterm, Batch, Scenario, ScenarioResult};

/// Time limit of a guest boot (QEMU needs 8–9 s in the test host).
const BOOT_SECS: u32 = 60;
/// Time limit of a command-line error (no guest).
const CLI_SECS: u32 = 15;

fn scenarios() -> Vec<Scenario> {
    let boot = |name: &str, acpi: bool, extra: &str, action: &str| {
        Scenario::new(
            name,
            BOOT_SECS,
            microvm_nix_command("$SKIFF", acpi, extra, &format!("skiff.test={action}")),
        )
    };
    vec![
        // With a byte that is not UTF-8 on the kernel's command line (a
        // Latin-1 é): the kernel takes bytes, and so does skiff.
        boot("boot-acpi-on", true, "", "poweroff skiff.latin1=$(printf '\\351')"),
        // microvm.nix's -smbios (its machine id), with more fields.
        boot("reboot", true, SMBIOS, "reboot"),
        boot("panic", true, "", "panic"),
        boot("debug-exit", true, "-device isa-debug-exit,iobase=0xf4,iosize=0x04", "exit=5"),
        // acpi=off with microvm.nix's argv otherwise. The guest is Debian's
        // generic kernel: the cloud one is built without MP-table support,
        // so without ACPI it would find neither its IOAPIC nor its second
        // CPU. Without ACPI nothing can tell Linux that there is no PIT, so
        // it insists on one for its timer (with pit=off it hangs, under QEMU
        // too): the acpi=off machine keeps its PIT. And without ACPI Linux
        // cannot power off (poweroff -f halts, as under QEMU): the reboot
        // path ends the process.
        Scenario::new(
            "boot-acpi-off",
            BOOT_SECS,
            microvm_nix_command("$SKIFF", false, "", "skiff.test=reboot")
                .replace("-kernel $BZIMAGE", "-kernel $BZIMAGE_GENERIC")
                .replace("pit=off", "pit=on"),
        ),
        Scenario::script("reset-restarts", BOOT_SECS * 2, &restart_script()),
        // Two sockets of three cores: the APIC IDs have a hole (3 is not
        // used), as CPUID's topology fields say.
        Scenario::new(
            "smp-topology",
            BOOT_SECS,
            microvm_nix_command("$SKIFF", true, "", "skiff.test=poweroff")
                .replace("-smp 2", "-smp 6,sockets=2,cores=3"),
        ),
        // The same through the MP table (acpi=off, as boot-acpi-off).
        Scenario::new(
            "smp-topology-noacpi",
            BOOT_SECS,
            microvm_nix_command("$SKIFF", false, "", "skiff.test=reboot")
                .replace("-kernel $BZIMAGE", "-kernel $BZIMAGE_GENERIC")
                .replace("pit=off", "pit=on")
                .replace("-smp 2", "-smp 6,sockets=2,cores=3"),
        ),
        // fw_cfg (issue 30): a 16 KiB binary credential and a string one;
        // on virtio-mmio across a guest reboot, on PCI, and with acpi=off
        // (told where fw_cfg is, as a QEMU guest must be).
        Scenario::script("fw-cfg-mmio", BOOT_SECS * 2, &fw_cfg_script(false, true)),
        Scenario::script("fw-cfg-pci", BOOT_SECS, &fw_cfg_script(true, true)),
        Scenario::script("fw-cfg-acpi-off", BOOT_SECS, &fw_cfg_script(false, false)),
        Scenario::new(
            "bad-fw-cfg",
            CLI_SECS,
            "$SKIFF -M microvm -m 512M -kernel $BZIMAGE -nographic \
             -fw_cfg name=opt/x,file=/nonexistent/cred",
        ),
        // A FIFO (open(2) would block on it) and a directory as drives; a
        // vmdk image without format= (probed: not raw, not qcow2); a
        // broken qcow2 header (probed as qcow2, refused by its checks).
        Scenario::script(
            "bad-drive-kinds",
            CLI_SECS,
            "mkfifo fifo; mkdir dir\n\
             printf 'KDMV' > vmdk; truncate -s 1M vmdk\n\
             printf 'QFI\\373\\000\\000\\000\\003' > qcow2; truncate -s 1M qcow2\n\
             for f in fifo dir vmdk qcow2; do\n\
             $SKIFF -M microvm -m 512M -kernel $BZIMAGE -nographic \
             -drive file=$f,if=none,id=d0,read-only=on -device virtio-blk-device,drive=d0\n\
             echo \"RC-$f=$?\"\n\
             done\n",
        ),
        Scenario::new("bad-unknown-option", CLI_SECS, "$SKIFF -frobnicate"),
        Scenario::new(
            "bad-unknown-key",
            CLI_SECS,
            "$SKIFF -M microvm,foo=bar -m 512M -kernel $BZIMAGE -nographic",
        ),
        Scenario::new("bad-size", CLI_SECS, "$SKIFF -M microvm -m 12X -kernel $BZIMAGE -nographic"),
        Scenario::new(
            "missing-kernel",
            CLI_SECS,
            "$SKIFF -M microvm -m 512M -kernel /nonexistent -nographic",
        ),
        Scenario::new(
            "bad-chardev-file",
            CLI_SECS,
            "$SKIFF -M microvm -m 512M -kernel $BZIMAGE -nographic \
             -chardev file,id=log,path=/nonexistent/dir/log",
        ),
        Scenario::new(
            "accel-tcg",
            CLI_SECS,
            "$SKIFF -M microvm,accel=tcg -m 512M -kernel $BZIMAGE -nographic",
        ),
    ]
}

/// Without -no-reboot a guest reboot restarts the VM: init runs twice.
/// Then SIGTERM ends skiff with status 0. With the root complex and a
/// virtio-pci device, so the teardown of a run with PCI is covered too.
const SMBIOS: &str = "-smbios type=1,uuid=a67472e5-570e-5c8a-b18c-ae3c77701050 \
                      -smbios type=1,manufacturer=Example,product=nixos-test,serial=S-42";

fn restart_script() -> String {
    let cmd = microvm_nix_command("$SKIFF", true, "-device virtio-rng-pci", "skiff.test=reboot")
        .replace(" -no-reboot", "")
        .replace("pcie=off", "pcie=on");
    let count = "echo \"INIT-COUNT=$(count_lines SKIFF-INIT-OK out.txt)\"";
    until_then_sigterm(&cmd, "SKIFF-INIT-OK", 2, 90, count)
}

/// A guest reading fw_cfg's files: `cred1` (16 KiB of random bytes: Linux
/// 6.1 reads a sysfs file's offset byte by byte, so bigger ones cost
/// quadratically many exits on any VMM) and a string. On virtio-mmio the
/// guest reboots once (the files must be the same the second time).
fn fw_cfg_script(pcie: bool, acpi: bool) -> String {
    let files = "-fw_cfg name=opt/io.systemd.credentials/cred1,file=cred1 \
                 -fw_cfg opt/io.systemd.credentials/greeting,string=hello-skiff";
    let mut cmd = microvm_nix_command("$SKIFF", acpi, files, "skiff.test=fw_cfg");
    if pcie {
        // And systemd's other way in: SMBIOS OEM strings.
        cmd = cmd.replace("pcie=off", "pcie=on").replacen(
            "-fw_cfg",
            "-smbios type=11,value=io.systemd.credential:oem=from-smbios,path=oem.txt,value=second \
             -fw_cfg",
            1,
        );
    }
    if !acpi {
        cmd = cmd
            .replace("-kernel $BZIMAGE", "-kernel $BZIMAGE_GENERIC")
            .replace("pit=off", "pit=on")
            .replace("skiff.test=fw_cfg", "skiff.test=fw_cfg qemu_fw_cfg.ioport=0xc@0x510:0:1:4");
        // Debian's kernels lack CONFIG_FW_CFG_SYSFS_CMDLINE: the guest
        // cannot be told, and without ACPI it finds no fw_cfg, under QEMU
        // as under skiff.
    }
    let prep = "head -c 16384 /dev/urandom > cred1\n\
                printf io.systemd.credential:file=from-a-file > oem.txt\n\
                echo \"EXPECTED-CRED1=$(sha256sum cred1 | cut -d' ' -f1)\"\n\
                echo \"EXPECTED-GREETING=$(printf hello-skiff | sha256sum | cut -d' ' -f1)\"\n";
    if !acpi {
        // QEMU's guest the same way, for comparison.
        let qemu = cmd.replace("$SKIFF", "$QEMU");
        format!(
            "{prep}{cmd}\necho \"SKIFF-RC=$?\"\necho QEMU-RUN\n{qemu} 2>&1 | sed 's/^/QEMU: /'\n"
        )
    } else if pcie {
        format!("{prep}{cmd}\necho \"SKIFF-RC=$?\"\n")
    } else {
        // After the first boot has read the files, the file outside
        // changes: the guest's copy must not.
        let change = "i=0; while [ \"$(count_lines SKIFF-FWCFG-DONE out.txt)\" -lt 1 ] && \
                      [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n\
                      head -c 100 /dev/urandom > cred1\n";
        let cmd = cmd.replace(" -no-reboot", "");
        let run = until_then_sigterm(&cmd, "SKIFF-FWCFG-DONE", 2, 100, "");
        format!("{prep}{}", run.replacen("pid=$!\n", &format!("pid=$!\n{change}"), 1))
    }
}

static BATCH: Batch = Batch::new();

fn result(name: &str) -> &'static ScenarioResult {
    BATCH.result(scenarios, name)
}

fn assert_booted(r: &ScenarioResult) {
    assert!(r.has_line("SKIFF-INIT-OK"), "the guest's init did not run\n{}", r.describe());
}

fn assert_rc(r: &ScenarioResult, rc: i32) {
    assert_eq!(r.rc, Some(rc), "expected exit status {rc}\n{}", r.describe());
}

#[test]
fn boot_acpi_on() {
    let r = result("boot-acpi-on");
    assert_booted(r);
    assert_eq!(r.value("SKIFF-NPROC"), Some("2"), "2 vCPUs expected\n{}", r.describe());
    assert!(r.contains("skiff.latin1=\u{fffd}"), "the kernel got the byte\n{}", r.describe());
    assert_rc(r, 0);
}

#[test]
fn reboot_ends_the_process() {
    let r = result("reboot");
    assert_booted(r);
    assert_rc(r, 0);
}

/// The `-smbios type=1` fields reach the guest's /sys/class/dmi/id.
#[test]
fn smbios_fields_reach_the_guest() {
    let r = result("reboot");
    assert_eq!(
        r.value("SKIFF-DMI"),
        Some("Example|nixos-test|a67472e5-570e-5c8a-b18c-ae3c77701050|Skiff"),
        "vendor|product|uuid|bios vendor\n{}",
        r.describe()
    );
}

/// Without -smbios the guest still has DMI (with ACPI and with the MP
/// table): defaults and a generated version-4 UUID.
#[test]
fn smbios_defaults_without_the_option() {
    for name in ["boot-acpi-on", "boot-acpi-off"] {
        let r = result(name);
        let dmi = r.value("SKIFF-DMI").unwrap_or_default();
        let fields: Vec<&str> = dmi.split('|').collect();
        assert!(
            matches!(fields[..], ["Skiff", "microvm", uuid, "Skiff"]
                if uuid.len() == 36 && uuid.as_bytes()[14] == b'4'),
            "{name}: SKIFF-DMI={dmi}\n{}",
            r.describe()
        );
    }
}

#[test]
fn panic_ends_the_process() {
    let r = result("panic");
    assert_booted(r);
    // The banner can be cut by init's last line still draining on the UART
    // ("Kernel pa-0a9b-...nic"); the crash's stack frame comes later.
    assert!(
        r.contains("Kernel panic") || r.contains("sysrq_handle_crash"),
        "no kernel panic message\n{}",
        r.describe()
    );
    assert_rc(r, 0);
}

#[test]
fn debug_exit_sets_the_status() {
    let r = result("debug-exit");
    assert_booted(r);
    // isa-debug-exit: the process exits with (value << 1) | 1.
    assert_rc(r, 11);
}

/// acpi=off: the guest finds its CPUs and IOAPIC in skiff's MP table.
#[test]
fn boot_acpi_off() {
    let r = result("boot-acpi-off");
    assert_booted(r);
    assert_eq!(r.value("SKIFF-NPROC"), Some("2"), "2 vCPUs from the MP table\n{}", r.describe());
    assert_rc(r, 0);
}

#[test]
fn reset_without_no_reboot_restarts_then_sigterm_exits_0() {
    let r = result("reset-restarts");
    assert_eq!(r.value("INIT-COUNT"), Some("2"), "the guest should boot twice\n{}", r.describe());
    assert_eq!(r.value("SIGTERM-RC"), Some("0"), "SIGTERM should exit 0\n{}", r.describe());
    assert!(r.contains("terminating on signal 15"), "{}", r.describe());
    // Each run's VM is gone before the next starts (no reference left).
    assert!(!r.contains("VM teardown"), "{}", r.describe());
    assert_rc(r, 0);
}

/// The guest decodes each vCPU's APIC ID into the package and core that
/// `-smp` asked for, and brings all of them up, from the MADT and from the
/// MP table.
#[test]
fn smp_topology_gives_each_cpu_its_apic_id() {
    for name in ["smp-topology", "smp-topology-noacpi"] {
        let r = result(name);
        assert_booted(r);
        assert_eq!(r.value("SKIFF-NPROC"), Some("6"), "{}", r.describe());
        assert_eq!(
            r.value("SKIFF-CPUS"),
            Some("0/0/0,1/0/1,2/0/2,4/1/0,5/1/1,6/1/2,"),
            "APICID/package/core of each CPU\n{}",
            r.describe()
        );
        assert_rc(r, 0);
    }
}

fn assert_cli_error(name: &str, mention: &str) {
    let r = result(name);
    assert_rc(r, 1);
    assert!(r.contains(mention), "the error should mention '{mention}'\n{}", r.describe());
}

#[test]
fn bad_unknown_option() {
    assert_cli_error("bad-unknown-option", "-frobnicate");
}

#[test]
fn bad_unknown_key() {
    assert_cli_error("bad-unknown-key", "foo");
}

#[test]
fn bad_size() {
    assert_cli_error("bad-size", "-m");
}

#[test]
fn missing_kernel() {
    assert_cli_error("missing-kernel", "/nonexistent");
}

/// The error says why, down to the OS: skiff prints each cause in turn.
#[test]
fn missing_kernel_names_the_os_error() {
    assert_cli_error("missing-kernel", "No such file or directory (os error 2)");
}

/// A -chardev nothing uses is still opened, as QEMU opens it.
#[test]
fn an_unused_chardev_file_that_cannot_be_created_is_an_error() {
    assert_cli_error(
        "bad-chardev-file",
        "-chardev file,id=log: cannot open '/nonexistent/dir/log': No such file or directory",
    );
}

#[test]
fn accel_tcg() {
    assert_cli_error("accel-tcg", "tcg");
}

/// fw_cfg's files reach the guest byte for byte (`qemu_fw_cfg`'s sysfs
/// `raw`): on virtio-mmio and on PCI, through the DSDT's QEMU0002 node;
/// across a guest reboot unchanged, though the file outside changed after
/// skiff read it. With acpi=off the guest finds no fw_cfg, as under QEMU
/// (run beside it): Debian's kernel cannot be told where it is.
#[test]
fn fw_cfg_files_reach_the_guest() {
    for (name, boots) in [("fw-cfg-mmio", 2), ("fw-cfg-pci", 1)] {
        let r = result(name);
        let cred1 = r.value("EXPECTED-CRED1").unwrap_or_default().to_owned();
        let greeting = r.value("EXPECTED-GREETING").unwrap_or_default().to_owned();
        assert_eq!(cred1.len(), 64, "{name}: {}", r.describe());
        let lines: Vec<&str> = r.lines().filter(|l| l.starts_with("SKIFF-FWCFG=")).collect();
        let want = [
            format!("SKIFF-FWCFG=opt/io.systemd.credentials/cred1:16384:{cred1}"),
            format!("SKIFF-FWCFG=opt/io.systemd.credentials/greeting:11:{greeting}"),
        ];
        assert_eq!(lines.len(), 2 * boots, "{name}: {lines:?}\n{}", r.describe());
        for pair in lines.chunks(2) {
            assert_eq!(pair, want, "{name}\n{}", r.describe());
        }
        assert!(!r.has_line("SKIFF-FWCFG-ABSENT"), "{name}");
    }
    let r = result("fw-cfg-acpi-off");
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
    let skiff_absent =
        r.lines().any(|l| l.ends_with("SKIFF-FWCFG-ABSENT") && !l.starts_with("QEMU:"));
    assert!(skiff_absent, "skiff, acpi=off\n{}", r.describe());
    assert!(r.has_line("QEMU: SKIFF-FWCFG-ABSENT"), "QEMU, acpi=off\n{}", r.describe());
    assert!(!r.lines().any(|l| l.contains("SKIFF-FWCFG=")), "{}", r.describe());
}

/// A FIFO or a directory given as a drive: exit 1 at once, naming it and
/// what it is (a FIFO once hung skiff in open(2); a directory was taken
/// for an 8 EiB disk). A vmdk image without format= is probed, not shown
/// to the guest as raw; a qcow2 header that does not hold together is
/// refused by name.
#[test]
fn a_fifo_a_directory_a_vmdk_or_a_broken_qcow2_is_not_a_drive() {
    let r = result("bad-drive-kinds");
    assert_eq!((r.value("RC-fifo"), r.value("RC-dir")), (Some("1"), Some("1")), "{}", r.describe());
    assert_eq!(r.value("RC-vmdk"), Some("1"), "{}", r.describe());
    assert!(
        r.contains("/vmdk' is a vmdk image; skiff reads raw and qcow2 images only"),
        "{}",
        r.describe()
    );
    assert_eq!(r.value("RC-qcow2"), Some("1"), "{}", r.describe());
    assert!(
        r.contains("Could not open the qcow2 image") && r.contains("cluster_bits 0 out of range"),
        "{}",
        r.describe()
    );
    assert!(r.contains("/fifo' is a FIFO, not a disk image"), "{}", r.describe());
    assert!(r.contains("/dir' is a directory, not a disk image"), "{}", r.describe());
}

/// A `-fw_cfg` file that cannot be read: exit 1 naming the item and the
/// file.
#[test]
fn a_fw_cfg_file_that_cannot_be_read_is_named() {
    let r = result("bad-fw-cfg");
    assert_eq!(r.rc, Some(1), "{}", r.describe());
    assert!(
        r.contains("-fw_cfg name=opt/x") && r.contains("can't load /nonexistent/cred"),
        "{}",
        r.describe()
    );
}

/// `-smbios type=11`: the guest reads the OEM strings in order
/// (`/sys/firmware/dmi/entries/11-0/raw`).
#[test]
fn smbios_oem_strings_reach_the_guest() {
    let r = result("fw-cfg-pci");
    let oem: Vec<&str> = r.lines().filter_map(|l| l.strip_prefix("SKIFF-OEM=")).collect();
    let want = ["io.systemd.credential:oem=from-smbios", "io.systemd.credential:file=from-a-file"];
    assert_eq!(oem, [want[0], want[1], "second"], "{}", r.describe());
    let r = result("fw-cfg-mmio");
    assert!(!r.lines().any(|l| l.starts_with("SKIFF-OEM=")), "none without -smbios type=11");
}
