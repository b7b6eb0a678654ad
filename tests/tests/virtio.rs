//! Virtio devices on the virtio-mmio transport: the guest's virtio_mmio
//! driver finds them through ACPI (acpi=on) or through the kernel command
//! line skiff appends (acpi=off, QEMU's auto-kernel-cmdline), and reads
//! from virtio-rng.

use skiff_tests::{microvm_nix_command, Batch, Scenario, ScenarioResult};

const SECS: u32 = 90;

fn scenarios() -> Vec<Scenario> {
    let rng = "-device virtio-rng-device";
    vec![
        Scenario::new(
            "rng-mmio-acpi",
            SECS,
            microvm_nix_command("$SKIFF", true, rng, "skiff.test=rng"),
        ),
        // Without ACPI: Debian's generic kernel, which finds its IOAPIC in
        // the MP table (the cloud kernel cannot, and then runs on the 8259
        // alone), with the PIT as its timer (see tests/boot.rs).
        Scenario::new(
            "rng-mmio-noacpi",
            SECS,
            microvm_nix_command("$SKIFF", false, rng, "skiff.test=rng")
                .replace("pit=off", "pit=on")
                .replace("-kernel $BZIMAGE", "-kernel $BZIMAGE_GENERIC"),
        ),
        // Two explicit devices on one address: QEMU's message naming both,
        // exit 1, before any guest starts (whatever the argv order).
        Scenario::new(
            "pci-addr-conflict",
            15,
            "$SKIFF -M microvm,pcie=on -m 512M -kernel $BZIMAGE -nographic \
             -device virtio-rng-pci,id=fs0,addr=2.0 -device virtio-rng-pci,id=late,addr=2",
        ),
    ]
}

static BATCH: Batch = Batch::new();

fn result(name: &str) -> &'static ScenarioResult {
    BATCH.result(scenarios, name)
}

fn assert_rng_works(r: &ScenarioResult) {
    assert_eq!(
        r.value("SKIFF-RNG-CURRENT").map(|v| v.starts_with("virtio_rng")),
        Some(true),
        "hw_random should use virtio_rng\n{}",
        r.describe()
    );
    assert_eq!(r.value("SKIFF-RNG-BYTES"), Some("65536"), "{}", r.describe());
    assert_eq!(r.rc, Some(0), "{}", r.describe());
}

#[test]
fn virtio_rng_mmio_with_acpi() {
    assert_rng_works(result("rng-mmio-acpi"));
}

/// Without ACPI skiff describes the device on the kernel command line, as
/// QEMU's auto-kernel-cmdline does. Debian's kernels are built without
/// CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, so their virtio_mmio driver ignores
/// it ("unknown parameter 'device'"): with this guest only the hint itself
/// can be checked; a kernel with that option binds the device from it.
#[test]
fn virtio_rng_mmio_without_acpi_is_on_the_cmdline() {
    let r = result("rng-mmio-noacpi");
    assert!(r.has_line("SKIFF-INIT-OK"), "{}", r.describe());
    let cmdline = r.lines().find(|l| l.contains("Command line:")).unwrap_or_default();
    assert!(
        cmdline.contains("virtio_mmio.device=512@0xfeb00000:5"),
        "cmdline hint\n{}",
        r.describe()
    );
    assert_eq!(r.rc, Some(0), "{}", r.describe());
}

#[test]
fn pci_address_conflict_is_a_clear_error() {
    let r = result("pci-addr-conflict");
    assert_eq!(r.rc, Some(1), "{}", r.describe());
    assert!(
        r.contains(
            "PCI: slot 2 function 0 not available for virtio-rng-pci,id=late, reserved by virtio-rng-pci,id=fs0"
        ),
        "{}",
        r.describe()
    );
}
