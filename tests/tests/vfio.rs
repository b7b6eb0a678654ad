//! VFIO passthrough (issue 25), in a test host with an emulated Intel
//! IOMMU and an NVMe controller on an image (`Batch::with_nvme`): the
//! controller bound to vfio-pci there, passed to the guest by
//! `-device vfio-pci,host=...,addr=2.0` after two auto-placed virtio
//! devices (the seed's shape), under `-sandbox on`; the guest's nvme driver
//! reads the image's pattern through it with MSI-X and writes back to the
//! image outside. A host that is not set up is refused with what to do.

// Guest tests boot real kernels (a nested test host where the CPU has no
// vmx/svm): built only with `--features guest` (resources/test.sh does).
#![cfg(feature = "guest")]

use skiff_tests::NVME_PATTERN;
use skiff_tests::{nvme_image, skiff_command, Batch, Scenario, ScenarioResult};
use skiff_tests::{SHARE_FN, VFIO_FN, VIRTIOFSD_FN};

const SECS: u32 = 180;

fn scenarios() -> Vec<Scenario> {
    let passthrough = skiff_command(
        true,
        "-device virtio-rng-pci -device virtio-rng-pci,id=rng1 \
         -device vfio-pci,host=$VFIO_HOST,multifunction=on,addr=2.0",
        "skiff.test=nvme",
    );
    let errors = format!(
        "{VFIO_FN}\
         $SKIFF -M microvm,pcie=on -m 256M -kernel $BZIMAGE -nographic \
         -device vfio-pci,host=0000:7f:00.0 > missing.txt 2>&1; echo \"MISSING-RC=$?\"\n\
         echo \"MISSING-ERR=$(grep -a vfio missing.txt | head -n 1)\"\n\
         $SKIFF -M microvm,pcie=on -m 256M -kernel $BZIMAGE -nographic \
         -device vfio-pci,host=zz:00.0 > bad.txt 2>&1; echo \"BAD-RC=$?\"\n\
         echo \"BAD-ERR=$(grep -a vfio bad.txt | head -n 1)\"\n\
         vfio_bind >/dev/null\n\
         $SKIFF -M microvm,pcie=on -m 256M -kernel $BZIMAGE -nographic \
         -device vfio-pci,host=$VFIO_HOST -device vfio-pci,host=0000:7f:00.0 > second.txt 2>&1; \
         echo \"SECOND-RC=$?\"\n\
         echo \"SECOND-ERR=$(grep -a vfio second.txt | head -n 1)\"\n\
         echo \"DRIVER-AFTER=$(basename \"$(readlink /sys/bus/pci/devices/$VFIO_HOST/driver)\")\"\n\
         g=$(basename \"$(readlink /sys/bus/pci/devices/$VFIO_HOST/iommu_group)\")\n\
         if (exec 3<>/dev/vfio/$g) 2>/dev/null; then echo GROUP-FREE=yes; else echo GROUP-FREE=no; fi\n\
         for o in $VFIO_OTHERS; do echo $o > /sys/bus/pci/drivers/serial/bind; done\n\
         $SKIFF -M microvm,pcie=on -m 256M -kernel $BZIMAGE -nographic \
         -device vfio-pci,host=$VFIO_HOST > viable.txt 2>&1; echo \"VIABLE-RC=$?\"\n\
         echo \"VIABLE-ERR=$(grep -a vfio viable.txt | head -n 1)\"\n\
         vfio_bind >/dev/null\n\
         kvm_mode=$(stat -c %a /dev/kvm); chmod 666 /dev/kvm\n\
         su -s /bin/sh nobody -c \"$SKIFF -M microvm,pcie=on -m 256M -kernel $BZIMAGE -nographic \
         -device vfio-pci,host=$VFIO_HOST\" > perm.txt 2>&1; echo \"PERM-RC=$?\"\n\
         chmod $kvm_mode /dev/kvm\n\
         echo \"PERM-ERR=$(grep -a vfio perm.txt | head -n 1)\"\n\
         echo \"$VFIO_HOST\" > /sys/bus/pci/devices/$VFIO_HOST/driver/unbind\n\
         $SKIFF -M microvm,pcie=on -m 256M -kernel $BZIMAGE -nographic \
         -device vfio-pci,host=$VFIO_HOST > unbound.txt 2>&1; echo \"UNBOUND-RC=$?\"\n\
         echo \"UNBOUND-ERR=$(grep -a vfio unbound.txt | head -n 1)\"\n\
         echo \"$VFIO_HOST\" > /sys/bus/pci/drivers_probe\n"
    );
    let behind_port = skiff_command(
        true,
        "-device pcie-root-port,id=rp0,chassis=1,slot=1 -device vfio-pci,host=$VFIO_HOST,bus=rp0",
        "skiff.test=nvme",
    );
    // The seed's shape (microvm.nix's shares and its vfio line), in both
    // orders: the passed-through device first, as microvm.nix emits it,
    // and last, as in the seed.
    let share = "-numa node,memdev=mem -object memory-backend-memfd,id=mem,size=512M,share=on \
                 -chardev socket,id=fs0,path=fs0.sock -device vhost-user-fs-pci,chardev=fs0,tag=ro-store";
    let vfio = "-device vfio-pci,host=$VFIO_HOST,multifunction=on,addr=2.0";
    let seed = |first: &str, second: &str, label: &str| {
        let cmd = skiff_command(
            true,
            &format!("-device virtio-rng-pci {first} {second}"),
            "skiff.test=nvme skiff.fs=ro-store",
        );
        format!(
            "virtiofsd fs0 store\n{cmd} > {label}.txt 2>&1; echo \"{label}-RC=$?\"\n\
             grep -a -E '^SKIFF-(NVME-HEAD|FS-|PCI)' {label}.txt | sed 's/^/{label}: /'\n\
             wait\n"
        )
    };
    let seed_shape = format!(
        "{SHARE_FN}{VIRTIOFSD_FN}{VFIO_FN}vfio_bind\nshare store\n{}{}",
        seed(vfio, share, "VFIO-FIRST"),
        seed(share, vfio, "VFIO-LAST")
    );
    // A guest reboot (no -no-reboot): the next run resets the device and
    // the guest's driver takes it again; what the container pinned
    // (skiff's VmLck: VFIO accounts its pins there) is read after each boot.
    let cmd = skiff_command(true, "-device vfio-pci,host=$VFIO_HOST", "skiff.test=nvme")
        .replace(" -no-reboot", "");
    let reboot = format!(
        ": > out.txt\n\
         {cmd} > out.txt 2>&1 &\n\
         pid=$!\n\
         for n in 1 2; do\n\
           i=0; while [ \"$(count_lines SKIFF-NVME-DONE out.txt)\" -lt $n ] && [ $i -lt 1500 ]; do sleep 0.1; i=$((i+1)); done\n\
           echo \"VMLCK-$n=$(awk '/^VmLck:/ {{print $2}}' /proc/$pid/status)\"\n\
         done\n\
         kill -TERM $pid\n\
         wait $pid\n\
         echo \"SIGTERM-RC=$?\"\n\
         cat out.txt\n"
    );
    vec![
        Scenario::script("vfio-seed-shape", SECS, &seed_shape),
        Scenario::script("vfio-reboot", SECS, &format!("{VFIO_FN}vfio_bind\n{reboot}")),
        Scenario::script(
            "vfio-nvme",
            SECS,
            &format!("{VFIO_FN}vfio_bind\n{passthrough}\necho \"SKIFF-RC=$?\"\n"),
        ),
        Scenario::script(
            "vfio-intx",
            SECS,
            &format!(
                "{VFIO_FN}vfio_bind\n{}\necho \"SKIFF-RC=$?\"\n",
                skiff_command(
                    true,
                    "-device vfio-pci,host=$VFIO_HOST",
                    "skiff.test=nvme pci=nomsi"
                )
            ),
        ),
        Scenario::script(
            "vfio-root-port",
            SECS,
            &format!("{VFIO_FN}vfio_bind\n{behind_port}\necho \"SKIFF-RC=$?\"\n"),
        ),
        Scenario::script("vfio-errors", 60, &errors),
    ]
}

static BATCH: Batch = Batch::with_nvme();

fn result(name: &str) -> &'static ScenarioResult {
    BATCH.result(scenarios, name)
}

/// The NVMe at the address the argv asked for, whatever came before it,
/// driven by the guest's nvme driver with MSI-X; the pattern read, the
/// guest's write in the image outside.
#[test]
fn an_nvme_passed_through_at_00_02_0_reads_and_writes_its_image() {
    let r = result("vfio-nvme");
    assert!(r.value("VFIO-HOST").is_some(), "no NVMe in the test host\n{}", r.describe());
    let pci = r.line_value("SKIFF-PCI").unwrap_or_default();
    assert!(pci.contains("0000:00:02.0,1b36:0010,80,nvme"), "{pci}\n{}", r.describe());
    assert!(
        pci.contains("0000:00:01.0,1af4:1044") && pci.contains("0000:00:03.0,1af4:1044"),
        "{pci}"
    );
    assert_eq!(r.value("SKIFF-NVME-HEAD"), Some(NVME_PATTERN), "{}", r.describe());
    assert_eq!(r.value("SKIFF-NVME-WRITE"), Some("ok"), "{}", r.describe());
    assert_eq!(r.value("SKIFF-NVME-MSIX"), Some("1"), "MSI-X on\n{}", r.describe());
    let irqs: u32 = r.value("SKIFF-NVME-IRQS").and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(irqs >= 1, "the nvme driver's vectors\n{}", r.describe());
    assert!(r.has_line("SKIFF-NVME-DONE"), "{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
    assert!(!r.contains("forbidden system call"), "{}", r.describe());
    // KVM's VFIO device got the group (its creation failing ends the run).
    assert!(!r.contains("KVM will not be told"), "{}", r.describe());
    let image = std::fs::read(nvme_image()).unwrap();
    assert_eq!(
        &image[1 << 20..(1 << 20) + 16],
        b"GUEST-WROTE-THIS",
        "the guest's write reached the image"
    );
}

/// Behind a root port (`bus=rp0`): the NVMe on the port's bus, driven by
/// the guest's nvme driver with MSI-X, the image's pattern read.
#[test]
fn an_nvme_passed_through_behind_a_root_port() {
    let r = result("vfio-root-port");
    let pci = r.line_value("SKIFF-PCI").unwrap_or_default();
    assert!(pci.contains("0000:01:00.0,1b36:0010,00,nvme"), "{pci}\n{}", r.describe());
    assert_eq!(r.value("SKIFF-NVME-HEAD"), Some(NVME_PATTERN), "{}", r.describe());
    assert_eq!(r.value("SKIFF-NVME-MSIX"), Some("1"), "MSI-X on\n{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}

/// A device that does not exist, a malformed `host=`, a group that is not
/// viable (the serial port beside the NVMe back on its driver), a group
/// node skiff may not open (run as nobody), and a device bound to no
/// driver: exit 1 with what to do. A refusal after a good device was
/// opened (a second one missing) leaves it bound to vfio-pci and its group
/// free for the next user (the group's node opens again).
#[test]
fn a_host_not_set_up_is_refused_with_what_to_do() {
    let r = result("vfio-errors");
    assert_eq!(r.value("BAD-RC"), Some("1"), "{}", r.describe());
    let bad = r.line_value("BAD-ERR").unwrap_or_default();
    assert!(bad.contains("invalid value") && bad.contains("zz:00.0"), "{bad}");
    assert_eq!(r.value("SECOND-RC"), Some("1"), "{}", r.describe());
    let second = r.line_value("SECOND-ERR").unwrap_or_default();
    assert!(second.contains("0000:7f:00.0"), "{second}");
    assert_eq!(r.value("DRIVER-AFTER"), Some("vfio-pci"), "{}", r.describe());
    assert_eq!(r.value("GROUP-FREE"), Some("yes"), "{}", r.describe());
    assert_eq!(r.value("VIABLE-RC"), Some("1"), "{}", r.describe());
    let viable = r.line_value("VIABLE-ERR").unwrap_or_default();
    assert!(
        viable.contains("is not viable") && viable.contains(":05.1 (serial)"),
        "the members and their drivers: {viable}\n{}",
        r.describe()
    );
    assert_eq!(r.value("PERM-RC"), Some("1"), "{}", r.describe());
    let perm = r.line_value("PERM-ERR").unwrap_or_default();
    assert!(
        perm.contains("cannot open /dev/vfio/") && perm.contains("ermission denied"),
        "{perm}\n{}",
        r.describe()
    );
    assert_eq!(r.value("MISSING-RC"), Some("1"), "{}", r.describe());
    let missing = r.line_value("MISSING-ERR").unwrap_or_default();
    assert!(
        missing.contains("no host PCI device") && missing.contains("0000:7f:00.0"),
        "{missing}"
    );
    assert_eq!(r.value("UNBOUND-RC"), Some("1"), "{}", r.describe());
    let unbound = r.line_value("UNBOUND-ERR").unwrap_or_default();
    assert!(unbound.contains("has no driver") && unbound.contains("driver_override"), "{unbound}");
}

/// With the guest's MSI off (`pci=nomsi`) the nvme driver runs on INTx:
/// the host's line through a level-triggered irqfd whose resample
/// unmasks it in the host's kernel.
#[test]
fn an_nvme_passed_through_works_on_intx() {
    let r = result("vfio-intx");
    assert_eq!(r.value("SKIFF-NVME-HEAD"), Some(NVME_PATTERN), "{}", r.describe());
    assert_eq!(r.value("SKIFF-NVME-WRITE"), Some("ok"), "{}", r.describe());
    assert_eq!(r.value("SKIFF-NVME-MSIX"), Some("0"), "MSI-X off\n{}", r.describe());
    let irqs: u32 = r.value("SKIFF-NVME-IRQS").and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(irqs >= 1, "the nvme driver's line\n{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}

/// The seed's shape in both orders: virtio-rng, i8042, memfd RAM shared
/// with virtiofsd, a virtiofs share and the NVMe at addr=2.0, the vfio line
/// first (as microvm.nix emits it) and last (as in the seed): the NVMe at
/// 00:02.0 reads its pattern, the share is mounted.
#[test]
fn the_seeds_shape_in_both_orders() {
    let r = result("vfio-seed-shape");
    for order in ["VFIO-FIRST", "VFIO-LAST"] {
        assert_eq!(r.value(&format!("{order}-RC")), Some("0"), "{order}\n{}", r.describe());
        let line = |key: &str| {
            r.lines()
                .find_map(|l| l.strip_prefix(&format!("{order}: {key}=")))
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(line("SKIFF-NVME-HEAD"), NVME_PATTERN, "{order}\n{}", r.describe());
        assert_eq!(line("SKIFF-FS-ro-store-FILES"), "1000", "{order}\n{}", r.describe());
        let pci = line("SKIFF-PCI");
        assert!(pci.contains("0000:00:02.0,1b36:0010,80,nvme"), "{order}: {pci}\n{}", r.describe());
    }
}

/// A guest reboot: the next run resets the function and builds it anew;
/// the guest's driver takes it again and reads the pattern; the guest's
/// 512 MiB were pinned once and stay pinned once (not unpinned and pinned
/// again, and never twice); SIGTERM ends skiff with 0.
#[test]
fn the_device_works_again_after_a_guest_reboot() {
    let r = result("vfio-reboot");
    let heads =
        r.lines().filter(|l| l.ends_with(&format!("SKIFF-NVME-HEAD={NVME_PATTERN}"))).count();
    assert_eq!(heads, 2, "both boots read the pattern\n{}", r.describe());
    let kib = |n| r.value(n).and_then(|v| v.parse::<u64>().ok());
    let (first, second) = (kib("VMLCK-1"), kib("VMLCK-2"));
    let ram = 512 << 10;
    assert!(first.is_some_and(|k| (ram..2 * ram).contains(&k)), "{first:?}\n{}", r.describe());
    assert_eq!(first, second, "pinned once across the reboot\n{}", r.describe());
    assert_eq!(r.value("SIGTERM-RC"), Some("0"), "{}", r.describe());
}
