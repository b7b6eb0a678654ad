//! Tests of `parse` over whole command lines. The tokenizer and each option's
//! value parsing are tested beside their code. Built for the fuzz targets
//! too (feature `fuzzing`), where only `fuzz_*` is used.
#![cfg_attr(not(test), allow(dead_code, unused_imports))]

use super::tests_support::expected;
use super::*;
use crate::config::{
    ChardevConfig, CpuConfig, MachineConfig, MachineKind, OnOffAuto, RamBacking, RamConfig, RunAs,
    RunWith, SandboxConfig, SmbiosType1, SmpConfig,
};
use crate::kinds::{block::Blk, debug_exit::ExitPort, i8042::Ps2, net::Nic, p9::NineP};
use crate::kinds::{ged::Events, rng::Entropy, rtc::Cmos, Bus};

/// What an empty command line gives: the default machine and its own
/// devices (the RTC, with ACPI its GED, fw_cfg, and the i8042 after them).
fn defaults() -> VmConfig {
    VmConfig { devices: vec![rtc(), ged(), fw_cfg(), ps2()], ..VmConfig::default() }
}

fn rtc() -> DeviceConfig {
    expected("mc146818rtc", None, Cmos)
}

/// The default machine's PS/2 controller.
fn ps2() -> DeviceConfig {
    expected("i8042", None, Ps2)
}

/// The ACPI GED the machine adds with ACPI (after the argv's devices).
fn ged() -> DeviceConfig {
    expected("acpi-ged", None, Events)
}

fn fw_cfg() -> DeviceConfig {
    expected("fw_cfg_io", None, crate::kinds::fw_cfg::FirmwareConfig)
}

fn args(line: &[&str]) -> Vec<String> {
    line.iter().map(|s| s.to_string()).collect()
}

/// Parses `line`, expecting a VM to run.
fn run(line: &[&str]) -> VmConfig {
    match parse(args(line)) {
        Ok(Action::Run(config)) => *config,
        other => panic!("{line:?}: expected a config, got {other:?}"),
    }
}

/// Parses `line`, expecting an error; returns its message.
fn error(line: &[&str]) -> String {
    match parse(args(line)) {
        Err(err) => err.to_string(),
        Ok(action) => panic!("{line:?}: expected an error, got {action:?}"),
    }
}

/// Asserts that `line` fails with exactly `expected`.
#[track_caller]
fn fails(line: &[&str], expected: &str) {
    assert_eq!(error(line), expected, "{line:?}");
}

/// Asserts that `line` fails with a message containing each of `parts`.
#[track_caller]
fn fails_with(line: &[&str], parts: &[&str]) {
    let err = error(line);
    for part in parts {
        assert!(err.contains(part), "{line:?}: '{err}' does not contain '{part}'");
    }
}

#[test]
fn microvm_nix_command_line() {
    #[rustfmt::skip]
    let config = run(&[
        "-name", "t",
        "-M", "microvm,accel=kvm:tcg,acpi=on,mem-merge=on,pcie=off,pic=off,pit=off,rtc=on,usb=off",
        "-m", "512M",
        "-smp", "2",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-kernel", "VMLINUZ",
        "-initrd", "INITRD",
        "-chardev", "stdio,id=stdio,signal=off",
        "-serial", "chardev:stdio",
        "-enable-kvm",
        "-cpu", "host,+x2apic,-sgx",
        "-device", "i8042",
        "-append", "earlyprintk=ttyS0 console=ttyS0 reboot=t panic=-1",
        "-nographic",
    ]);
    let expected = VmConfig {
        name: Some("t".into()),
        machine: MachineConfig {
            kind: MachineKind::Microvm,
            acpi: OnOffAuto::On,
            pcie: OnOffAuto::Off,
            pic: OnOffAuto::Off,
            pit: OnOffAuto::Off,
            rtc: OnOffAuto::On,
            usb: OnOffAuto::Off,
            mem_merge: true,
            ..MachineConfig::default()
        },
        mem_size: 512 << 20,
        ram: RamConfig::default(),
        smp: SmpConfig { cpus: 2, sockets: 1, cores: 2, threads: 1 },
        cpu: CpuConfig { features: vec![("x2apic".into(), true), ("sgx".into(), false)] },
        kernel: Some("VMLINUZ".into()),
        initrd: Some("INITRD".into()),
        append: "earlyprintk=ttyS0 console=ttyS0 reboot=t panic=-1".into(),
        no_reboot: true,
        nodefaults: true,
        nographic: true,
        chardevs: vec![ChardevConfig {
            id: "stdio".into(),
            backend: ChardevBackend::Stdio { signal: false },
        }],
        serials: vec![SerialConfig::Chardev("stdio".into())],
        // rtc=on: the machine adds the CMOS RTC, and with ACPI its GED.
        devices: vec![
            expected("i8042", None, Ps2),
            expected("mc146818rtc", None, Cmos),
            ged(),
            fw_cfg(),
        ],
        taken_chardevs: vec!["stdio".into()],
        drives: Vec::new(),
        netdevs: Vec::new(),
        fsdevs: Vec::new(),
        smbios: None,
        smbios_oem: Vec::new(),
        fw_cfg: Vec::new(),
        sandbox: None,
        run_with: RunWith::default(),
        qmp: Vec::new(),
        monitors: Vec::new(),
    };
    assert_eq!(config, expected);
}

/// What microvm.nix emits by default today: everything up to its
/// `-device virtio-rng-device` is understood, and that is refused by name.
#[test]
fn microvm_nix_default_command_line_stops_at_virtio_rng() {
    #[rustfmt::skip]
    let line = [
        "-name", "vm",
        "-M", "microvm,accel=kvm:tcg,acpi=on,mem-merge=on,pcie=off,pic=off,pit=off,rtc=on,usb=off",
        "-m", "1024M",
        "-smp", "1",
        "-nodefaults", "-no-user-config", "-no-reboot",
        "-kernel", "/nix/store/k/bzImage",
        "-initrd", "/nix/store/i/initrd",
        "-chardev", "stdio,id=stdio,signal=off",
        "-smbios", "type=1,uuid=a67472e5-570e-5c8a-b18c-ae3c77701050",
        "-serial", "chardev:stdio",
        "-enable-kvm",
        "-cpu", "host,+x2apic,-sgx",
        "-device", "i8042",
        "-append", " reboot=t panic=-1 ",
        "-nographic",
        "-sandbox", "on",
        "-run-with", "user=microvm",
        "-qmp", "unix:vm.sock,server,nowait",
    ];
    let config = run(&line);
    assert_eq!(config.qmp.len(), 1);
    let (without_qmp, _) = line.split_at(line.len() - 2);
    assert_eq!(config.sandbox, Some(SandboxConfig::default()));
    assert_eq!(config.run_with.user, Some(RunAs::Name("microvm".into())));
    assert_eq!(config.append, " reboot=t panic=-1 ");
    assert_eq!(
        config.smbios.and_then(|t| t.uuid).as_deref(),
        Some("a67472e5-570e-5c8a-b18c-ae3c77701050")
    );
    let mmio = run(&[&["-device", "virtio-rng-device"], without_qmp].concat());
    assert!(mmio.devices.contains(&rng_mmio(None, None)));
}

#[test]
fn empty_command_line_is_all_defaults() {
    assert_eq!(run(&[]), defaults());
}

#[test]
fn help_and_version() {
    for arg in ["-h", "-help", "--help", "--h"] {
        assert_eq!(parse(args(&[arg])), Ok(Action::Help), "{arg}");
    }
    for arg in ["-version", "--version"] {
        assert_eq!(parse(args(&[arg])), Ok(Action::Version), "{arg}");
    }
    for line in [["-M", "help"], ["-machine", "?"], ["-device", "help"], ["-cpu", "help"]] {
        assert_eq!(parse(args(&line)), Ok(Action::Help), "{line:?}");
    }
    // Options after -h are not looked at; errors before it are reported.
    assert_eq!(parse(args(&["-m", "1G", "-h", "-bogus"])), Ok(Action::Help));
    fails(&["-bogus", "-h"], "-bogus: unknown option");

    assert!(version_text().starts_with("skiff 0.1.0"));
    let help = help_text();
    for option in [
        "-M",
        "-machine",
        "-accel",
        "-enable-kvm",
        "-m ",
        "-smp",
        "-cpu",
        "-kernel",
        "-initrd",
        "-append",
        "-name",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-nographic",
        "-display none",
        "-chardev stdio",
        "-chardev file",
        "-chardev null",
        "-chardev socket",
        "-serial",
        "-device i8042",
        "-device isa-debug-exit",
        "-smbios",
        "-sandbox",
        "-run-with",
        "-version",
        "-qmp",
        "-monitor",
        "not supported",
    ] {
        assert!(help.contains(option), "help lacks {option}");
    }
}

#[test]
fn one_or_two_dashes() {
    let config = run(&["--m", "256M", "--machine", "microvm,acpi=off", "--nodefaults"]);
    assert_eq!(config.mem_size, 256 << 20);
    assert_eq!(config.machine.acpi, OnOffAuto::Off);
    assert!(config.nodefaults);
    fails(&["---m", "1G"], "---m: unknown option");
    fails(&["--", "x"], "--: unknown option");
}

#[test]
fn unknown_and_unsupported_options() {
    fails(&["-foo"], "-foo: unknown option");
    fails(&["--foo"], "--foo: unknown option");
    fails(&["-M=microvm"], "-M=microvm: unknown option");
    for option in ["-blockdev", "-nic", "-mem-path", "--pidfile"] {
        let name = option.trim_start_matches('-');
        fails(
            &[option, "x"],
            &format!("-{name}: not supported yet (see -help for the supported options)"),
        );
    }
}

#[test]
fn positional_arguments() {
    fails(&["disk.img"], "disk.img: unexpected argument (disk images are not supported)");
    fails(&["-nographic", "-"], "-: unexpected argument (disk images are not supported)");
    fails_with(&[""], &["unexpected argument"]);
}

#[test]
fn missing_arguments() {
    for (name, _) in OPTIONS.iter().filter(|(_, opt)| matches!(opt, Opt::Arg(_))) {
        let option = format!("-{name}");
        fails(&[&option], &format!("{option}: missing argument"));
    }
    fails(&["-kernel"], "-kernel: missing argument");
    // As in QEMU, the argument is the next element, whatever it looks like.
    assert_eq!(run(&["-kernel", "k", "-append", "-nographic"]).append, "-nographic");
}

#[test]
fn machine() {
    let config = run(&["-machine", "type=microvm,isa-serial=off,x-option-roms=no,auto-kernel-cmdline=false,mem-merge=off,usb=auto,accel=tcg:kvm"]);
    assert_eq!(
        config.machine,
        MachineConfig {
            kind: MachineKind::Microvm,
            isa_serial: false,
            option_roms: false,
            auto_kernel_cmdline: false,
            mem_merge: false,
            ..MachineConfig::default()
        }
    );
    // Several -M merge, later keys winning.
    let config = run(&["-M", "microvm,acpi=off,pic=off", "-M", "acpi=on", "-M", "microvm,"]);
    assert_eq!(config.machine.acpi, OnOffAuto::On);
    assert_eq!(config.machine.pic, OnOffAuto::Off);
    let microvm = MachineConfig { kind: MachineKind::Microvm, ..MachineConfig::default() };
    assert_eq!(run(&["-M", "microvm,accel=kvm"]).machine, microvm);
    // qemu-vm.nix's -machine names no type: the default machine, which a
    // later -M microvm turns into microvm.
    let default = run(&["-machine", "accel=kvm:tcg"]);
    assert_eq!(default.machine, MachineConfig::default());
    assert!(default.machine.has_pcie() && default.machine.has_rtc());
    assert!(default.devices.contains(&ps2()), "the default machine's i8042");
    assert_eq!(run(&["-machine", "accel=kvm:tcg", "-M", "microvm"]).machine, microvm);
    let c = run(&["-M", "microvm"]);
    assert!(!c.machine.has_pcie() && !c.machine.has_rtc());
    assert!(!c.devices.iter().any(|d| d.driver == "i8042"), "microvm has no i8042 unasked");
    // One i8042 only: the command line's takes the place of the machine's.
    let c = run(&["-device", "i8042,id=kbd"]);
    assert_eq!(c.devices.iter().filter(|d| d.driver == "i8042").count(), 1);
}

#[test]
fn machine_errors() {
    let unknown = "(only 'microvm'; with no machine type skiff gives its default machine, \
                   a microvm with PCIe, i8042 and RTC)";
    fails(&["-M", "pc"], &format!("-M: unknown machine 'pc' {unknown}"));
    fails(&["-machine", "type=q35"], &format!("-machine: unknown machine 'q35' {unknown}"));
    fails(&["-M", "microvm,foo=1"], "-M microvm: unknown property 'foo'");
    fails(
        &["-M", "microvm,accel=tcg"],
        "-M microvm: accel 'tcg' is not supported (skiff needs KVM)",
    );
    fails(&["-M", "microvm,accel="], "-M microvm: accel '' is not supported (skiff needs KVM)");
    // usb=on (and -usb) are taken; there is no controller, and startup
    // says so.
    assert_eq!(run(&["-M", "microvm,usb=on"]).machine.usb, OnOffAuto::On);
    assert_eq!(run(&["-usb"]).machine.usb, OnOffAuto::On);
    fails(
        &["-M", "microvm,acpi=yes"],
        "-M microvm: invalid value 'yes' for 'acpi' (expected on, off or auto)",
    );
    fails(
        &["-M", "microvm,mem-merge=auto"],
        "-M microvm: invalid value 'auto' for 'mem-merge' (expected on or off)",
    );
    fails(&["-M", "microvm,ioapic2=off"], "-M microvm: unknown property 'ioapic2'");
}

#[test]
fn accel() {
    assert_eq!(run(&["-accel", "kvm", "-enable-kvm", "-accel", "accel=kvm"]), defaults());
    fails(&["-accel", "tcg"], "-accel: accelerator 'tcg' is not supported (skiff needs KVM)");
    fails(
        &["-accel", "kvm:tcg"],
        "-accel: accelerator 'kvm:tcg' is not supported (skiff needs KVM)",
    );
    fails(&["-accel", "kvm,kernel-irqchip=split"], "-accel kvm: unknown property 'kernel-irqchip'");
    fails(&["-accel", "thread=single"], "-accel: missing property 'accel'");
}

#[test]
fn memory() {
    let mem = |arg: &str| run(&["-m", arg]).mem_size;
    assert_eq!(mem("512M"), 512 << 20);
    assert_eq!(mem("512"), 512 << 20);
    assert_eq!(mem("size=512M"), 512 << 20);
    assert_eq!(mem("size=512"), 512 << 20);
    assert_eq!(mem("1G"), 1 << 30);
    assert_eq!(mem("1g"), 1 << 30);
    assert_eq!(mem("1.5G"), 3 << 29);
    assert_eq!(mem("2097152K"), 2 << 30);
    assert_eq!(mem("1048576B"), 1 << 20);
    assert_eq!(mem("1T"), 1 << 40);
    // Rounded up to 8 KiB, as QEMU.
    assert_eq!(mem("1025K"), 1032 << 10);
    // QEMU: a size ending in a digit is in MiB, even in hex.
    assert_eq!(mem("0x100"), 256 << 20);
    // Later -m win; an -m without size leaves it.
    assert_eq!(run(&["-m", "1G", "-m", "2G"]).mem_size, 2 << 30);
    assert_eq!(run(&["-m", "1G", "-m", ""]).mem_size, 1 << 30);
}

#[test]
fn memory_errors() {
    fails(&["-m", "12X"], "-m: invalid size '12X'");
    fails(&["-m", "size=12X"], "-m: invalid size '12X'");
    fails(&["-m", "size="], "-m: invalid size ''");
    fails(&["-m", "-1"], "-m: invalid size '-1'");
    fails(&["-m", "1MiB"], "-m: invalid size '1MiB'");
    fails(&["-m", "0.5"], "-m: invalid size '0.5'");
    fails(&["-m", "18446744073709551615"], "-m: invalid size '18446744073709551615'");
    fails(&["-m", "16E"], "-m: invalid size '16E'");
    fails(&["-m", "0"], "-m: size '0' is too small (at least 1M)");
    fails(&["-m", "512K"], "-m: size '512K' is too small (at least 1M)");
    fails(
        &["-m", "1G,maxmem=2G"],
        "-m: maxmem is not supported (the microvm machine has no memory hotplug)",
    );
    fails(
        &["-m", "1G,slots=2"],
        "-m: slots is not supported (the microvm machine has no memory hotplug)",
    );
    fails(&["-m", "1G,foo=2"], "-m: unknown property 'foo'");
}

#[test]
fn smp() {
    assert_eq!(run(&["-smp", "4"]).smp, SmpConfig { cpus: 4, sockets: 1, cores: 4, threads: 1 });
    assert_eq!(
        run(&["-smp", "cpus=4,sockets=2,cores=1,threads=2,dies=1,maxcpus=4"]).smp,
        SmpConfig { cpus: 4, sockets: 2, cores: 1, threads: 2 }
    );
    assert_eq!(
        run(&["-smp", "8", "-smp", "threads=2"]).smp,
        SmpConfig { cpus: 8, sockets: 1, cores: 4, threads: 2 }
    );
    fails_with(&["-smp", "2,maxcpus=4"], &["-smp: ", "CPU hotplug is not supported"]);
    fails_with(&["-smp", "4,sockets=3"], &["-smp: invalid CPU topology"]);
    fails(&["-smp", "2,dies=2"], "-smp: dies=2 is not supported (only dies=1)");
    fails(&["-smp", "2,bogus=2"], "-smp: unknown property 'bogus'");
    fails_with(&["-smp", "255"], &["-smp: ", "at most 254"]);
    // The topology is checked once all -smp are merged.
    fails_with(&["-smp", "3", "-smp", "sockets=2"], &["-smp: invalid CPU topology"]);
}

#[test]
fn cpu() {
    assert_eq!(run(&["-cpu", "host"]).cpu, CpuConfig::default());
    assert_eq!(run(&["-cpu", "max,-x2apic"]).cpu.features, vec![("x2apic".to_string(), false)]);
    // The last -cpu wins.
    assert_eq!(run(&["-cpu", "host,+sgx", "-cpu", "host"]).cpu, CpuConfig::default());
    fails(
        &["-cpu", "Skylake-Server"],
        "-cpu: CPU model 'Skylake-Server' is not supported (only 'host' and 'max')",
    );
    fails_with(
        &["-cpu", "host,vendor=GenuineIntel"],
        &["-cpu host: invalid value 'GenuineIntel' for 'vendor'"],
    );
}

#[test]
fn boot_options() {
    let config = run(&["-kernel", "/k", "-initrd", "/i", "-append", "console=ttyS0,115200 quiet"]);
    assert_eq!(config.kernel, Some("/k".into()));
    assert_eq!(config.initrd, Some("/i".into()));
    assert_eq!(config.append, "console=ttyS0,115200 quiet");
    assert_eq!(run(&["-kernel", "/a", "-kernel", "/b"]).kernel, Some("/b".into()));
    // An empty -append is no -append.
    assert_eq!(run(&["-append", ""]).append, "");
    fails(&["-kernel", ""], "-kernel: empty path");
    fails(&["-kernel", "k", "-initrd", ""], "-initrd: empty path");
    fails(&["-initrd", "/i"], "-initrd: only allowed with -kernel");
    fails(&["-append", "quiet"], "-append: only allowed with -kernel");
}

#[test]
fn name() {
    assert_eq!(run(&["-name", "vm1"]).name, Some("vm1".into()));
    assert_eq!(run(&["-name", "guest=vm1,debug-threads=on,process=p"]).name, Some("vm1".into()));
    assert_eq!(run(&["-name", "my,,vm"]).name, Some("my,vm".into()));
    assert_eq!(run(&["-name", "a", "-name", "debug-threads=off"]).name, Some("a".into()));
    fails(&["-name", "vm,foo=1"], "-name: unknown property 'foo'");
    fails(
        &["-name", "vm,debug-threads=2"],
        "-name: invalid value '2' for 'debug-threads' (expected on or off)",
    );
}

#[test]
fn flags() {
    let config =
        run(&["-nodefaults", "-no-user-config", "-no-reboot", "-nographic", "-enable-kvm"]);
    assert!(config.nodefaults && config.no_reboot && config.nographic);
    assert_eq!(run(&["-display", "none"]), defaults());
    assert_eq!(run(&["-display", "type=none"]), defaults());
    fails(
        &["-display", "gtk"],
        "-display: display 'gtk' is not supported (skiff has no display; use 'none')",
    );
    fails(&["-display", "none,gl=on"], "-display none: unknown property 'gl'");
}

#[test]
fn chardevs_and_serials() {
    // -serial may name a -chardev defined after it.
    let config = run(&[
        "-serial",
        "chardev:c1",
        "-serial",
        "none",
        "-serial",
        "file:/tmp/s",
        "-serial",
        "null",
        "-chardev",
        "socket,id=c1,path=/run/c1,server,nowait",
    ]);
    assert_eq!(
        config.serials,
        vec![
            SerialConfig::Chardev("c1".into()),
            SerialConfig::None,
            SerialConfig::File("/tmp/s".into()),
            SerialConfig::Null,
        ]
    );
    assert_eq!(
        config.chardevs,
        vec![ChardevConfig {
            id: "c1".into(),
            backend: ChardevBackend::Socket {
                path: "/run/c1".into(),
                server: true,
                wait: false,
                reconnect_ms: None
            },
        }]
    );
    assert_eq!(run(&["-serial", "stdio"]).serials, vec![SerialConfig::Stdio]);
}

#[test]
fn chardev_and_serial_errors() {
    fails(
        &["-serial", "chardev:nope"],
        "-serial: chardev 'nope' is not defined (no -chardev with id=nope)",
    );
    fails(&["-chardev", "null,id=a", "-chardev", "stdio,id=a"], "-chardev: duplicate id 'a'");
    fails(
        &["-chardev", "null,id=a", "-serial", "chardev:a", "-serial", "chardev:a"],
        "-serial: chardev 'a' is already used by another serial port",
    );
    let five = ["-serial", "null"].repeat(5);
    fails(&five, "-serial: at most 4 serial ports are supported");
    fails(
        &["-chardev", "stdio,id=a", "-serial", "stdio"],
        "-serial stdio: stdio cannot be used by more than one character device",
    );
    fails(
        &["-chardev", "stdio,id=a", "-chardev", "stdio,id=b"],
        "-chardev stdio: stdio cannot be used by more than one character device",
    );
    fails_with(&["-serial", "pty"], &["-serial: 'pty' is not supported"]);
    fails_with(&["-serial", "tcp::4444,server"], &["-serial: 'tcp::4444,server' is not supported"]);
    fails(&["-chardev", "stdio,id=s,foo=1"], "-chardev stdio: unknown property 'foo'");
    fails(&["-chardev", "stdio"], "-chardev stdio: missing property 'id'");
}

#[test]
fn devices() {
    let config =
        run(&["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-device", "i8042,id=kbd"]);
    assert_eq!(
        config.devices,
        vec![
            expected("isa-debug-exit", None, ExitPort { iobase: 0xf4, iosize: 4 }),
            expected("i8042", Some("kbd"), Ps2),
            rtc(),
            ged(),
            fw_cfg(),
        ]
    );
    fails(&["-device", "e1000"], "-device: unknown device 'e1000'");
    fails(&["-device", "isa-debug-exit,foo=1"], "-device isa-debug-exit: unknown property 'foo'");
    fails(&["-device", "i8042,foo=1"], "-device i8042: unknown property 'foo'");
    fails(&["-device", "i8042", "-device", "i8042"], "-device: only one i8042 is supported");
    for own in ["acpi-ged", "mc146818rtc"] {
        fails(
            &["-device", own],
            &format!("-device: '{own}' is the machine's own; -device cannot add one"),
        );
    }
    fails(
        &["-device", "i8042,id=x", "-device", "isa-debug-exit,id=x"],
        "-device: duplicate id 'x'",
    );
    let two = ["-device", "virtio-balloon-device", "-device", "virtio-balloon-device"];
    assert!(error(&two).contains("virtio-balloon"), "one balloon per machine: {}", error(&two));
    for driver in ["vhost-user-blk-pci", "virtio-gpu-pci"] {
        fails(
            &["-device", &format!("{driver},id=x")],
            &format!("-device: '{driver}' is not supported yet"),
        );
    }
}

#[test]
fn smbios() {
    let config = run(&[
        "-smbios",
        "type=1,manufacturer=M,uuid=12345678-1234-1234-1234-123456789abc",
        "-smbios",
        "type=1,serial=S",
    ]);
    let expected = SmbiosType1 {
        manufacturer: Some("M".into()),
        uuid: Some("12345678-1234-1234-1234-123456789abc".into()),
        serial: Some("S".into()),
        ..SmbiosType1::default()
    };
    assert_eq!(config.smbios, Some(expected));
    fails(&["-smbios", "type=2"], "-smbios: type=2 is not supported (only type=1 and type=11)");
    fails_with(
        &["-smbios", "type=1,uuid=nope"],
        &["-smbios type=1: invalid value 'nope' for 'uuid'"],
    );
}

#[test]
fn sandbox() {
    assert_eq!(run(&["-sandbox", "on"]).sandbox, Some(SandboxConfig::default()));
    // `allow` lets a class in; deny and children are skiff's filter anyway.
    assert_eq!(
        run(&[
            "-sandbox",
            "on,obsolete=allow,elevateprivileges=children,spawn=deny,resourcecontrol=allow"
        ])
        .sandbox,
        Some(SandboxConfig { obsolete: true, resource_control: true, ..Default::default() })
    );
    assert_eq!(run(&["-sandbox", "off"]).sandbox, None);
    assert_eq!(run(&["-sandbox", "on", "-sandbox", "enable=off"]).sandbox, None);
    fails(
        &["-sandbox", "maybe"],
        "-sandbox: invalid value 'maybe' for 'enable' (expected on or off)",
    );
    fails(
        &["-sandbox", "on,spawn=children"],
        "-sandbox: invalid value 'children' for 'spawn' (expected allow or deny)",
    );
    fails(&["-sandbox", "on,foo=deny"], "-sandbox: unknown property 'foo'");
}

#[test]
fn run_with() {
    let r = run(&["-run-with", "user=nobody,chroot=/var/empty"]).run_with;
    assert_eq!(r.user, Some(RunAs::Name("nobody".into())));
    assert_eq!(r.chroot.as_deref(), Some(std::path::Path::new("/var/empty")));
    let r = run(&["-run-with", "user=65534:65534"]).run_with;
    assert_eq!(r.user, Some(RunAs::Ids { uid: 65534, gid: 65534 }));
    fails(
        &["-run-with", "user=1:x"],
        "-run-with: invalid value '1:x' for 'user' (expected a user name or UID:GID)",
    );
    fails(&["-run-with", "async-teardown=on"], "-run-with: async-teardown is not supported");
    fails(&["-run-with", "group=x"], "-run-with: unknown property 'group'");
}

/// Pieces of option values that trip parsers.
const PIECES: &[&str] = &[
    "",
    ",",
    ",,",
    "=",
    "==",
    "-",
    "--",
    "+",
    "no",
    "on",
    "off",
    "auto",
    "help",
    "?",
    "id",
    "id=x",
    "microvm",
    "type=",
    "0",
    "0x",
    "0xffffffffffffffff",
    "18446744073709551616",
    "4294967296",
    "1.",
    ".5",
    "1.5G",
    "16E",
    "9E",
    "K",
    "é",
    "ß=ü",
    "\u{0}",
    "\u{feff}",
    " ",
    "path=",
    "size",
    "maxcpus=0",
    "sockets=4294967295",
    "cores=4294967295",
    "threads=4294967295",
    "chardev:",
    "file:",
    "stdio",
    "socket",
    "server",
    "nowait",
    "uuid=",
    "type=1",
    "iobase=0xffff",
];

/// Every option, and a few that are not.
fn fuzz_options() -> Vec<String> {
    OPTIONS
        .iter()
        .map(|(name, _)| format!("-{name}"))
        .chain(["-qmp", "--", "-", "-bogus", ""].map(String::from))
        .collect()
}

/// Fuzz target: command lines of random options with values built from
/// pieces that trip parsers (separators, escapes, huge numbers, odd
/// Unicode, bytes that are not UTF-8). Each parses or fails with an error,
/// never a panic.
#[cfg(test)]
#[test]
fn fuzz_command_line() {
    skiff_tests::fuzz::run("command-line", 20_000, fuzz_command_line_one);
    // And every option with each piece alone.
    for option in &fuzz_options() {
        for piece in PIECES {
            let _ = parse([option.clone(), piece.to_string()]);
            let _ = parse([option.clone()]);
        }
    }
}

/// One input of `fuzz_command_line` (also a libFuzzer target: `fuzz/`).
pub(crate) fn fuzz_command_line_one(rng: &mut skiff_tests::fuzz::Rng) {
    let options = fuzz_options();
    let mut line: Vec<std::ffi::OsString> = Vec::new();
    for _ in 0..rng.below(5) {
        line.push(rng.pick(&options).into());
        let mut value: Vec<u8> = Vec::new();
        for _ in 0..rng.below(5) {
            if rng.one_in(10) {
                value.extend(rng.bytes(6));
            } else {
                value.extend_from_slice(rng.pick(PIECES).as_bytes());
            }
        }
        line.push(std::os::unix::ffi::OsStringExt::from_vec(value));
    }
    let _ = parse(line);
}

#[test]
fn qmp_forms_microvm_nix_and_qemu_accept() {
    use crate::config::{QmpAddress, QmpConfig};
    let cfg = |args: &[&str]| match parse(args.iter().map(|s| s.to_string())) {
        Ok(Action::Run(c)) => c,
        other => panic!("{args:?}: {other:?}"),
    };
    let c = cfg(&["-qmp", "unix:t.sock,server,nowait", "-monitor", "none"]);
    assert_eq!(c.qmp, vec![QmpConfig { address: QmpAddress::Unix("t.sock".into()), wait: false }]);
    let c = cfg(&["-qmp", "unix:/run/a,,b.sock,server=on,wait=off"]);
    assert_eq!(c.qmp[0].address, QmpAddress::Unix("/run/a,b.sock".into()));
    let c = cfg(&["-qmp", "tcp:127.0.0.1:4444,server,nowait"]);
    assert_eq!(
        c.qmp[0],
        QmpConfig {
            address: QmpAddress::Tcp { host: "127.0.0.1".into(), port: 4444 },
            wait: false
        }
    );
    let c = cfg(&["-qmp", "unix:x,server"]);
    assert!(c.qmp[0].wait, "a QEMU server waits for its client by default");
}

#[test]
fn qmp_and_monitor_errors_name_the_problem() {
    let err = |args: &[&str]| parse(args.iter().map(|s| s.to_string())).unwrap_err().to_string();
    assert!(err(&["-qmp", "unix:x.sock"]).contains("server"));
    assert!(err(&["-qmp", "stdio"]).contains("'stdio' is not supported"));
    assert!(err(&["-qmp", "tcp:localhost,server"]).contains("HOST:PORT"));
    assert!(err(&["-qmp", "unix:x,server,frob=1"]).contains("frob"));
    assert!(err(&["-monitor", "stdio"]).starts_with("-monitor"));
    assert!(err(&["-qmp"]).contains("missing argument"));
}

#[test]
fn virtio_rng_device_properties() {
    let c = run(&["-device", "virtio-rng-device,id=rng0,max-bytes=1024,period=1000"]);
    assert_eq!(
        c.devices,
        vec![
            expected(
                "virtio-rng-device",
                Some("rng0"),
                Entropy { max_bytes: Some(1024), period_ms: Some(1000) }
            ),
            rtc(),
            ged(),
            fw_cfg(),
            ps2()
        ]
    );
    fails(
        &["-device", "virtio-rng-device,period=0"],
        "-device virtio-rng-device: period must be at least 1 ms",
    );
    fails(
        &["-device", "virtio-rng-pci,max-bytes=9223372036854775808"],
        "-device virtio-rng-pci: 'max-bytes' parameter must be non-negative, and less than 2^63",
    );
    assert!(parse(["-device".to_string(), "virtio-rng-device,rng=r0".to_string()])
        .unwrap_err()
        .to_string()
        .contains("rng="));
}

/// `virtio-rng-device` as parsed: the rng on virtio-mmio.
fn rng_mmio(max_bytes: Option<u64>, period_ms: Option<u64>) -> DeviceConfig {
    expected("virtio-rng-device", None, Entropy { max_bytes, period_ms })
}

/// microvm.nix's shares need shared RAM: `-numa node,memdev=mem` and the
/// memfd backend, in either order.
#[test]
fn memory_backends_bound_by_numa() {
    let memfd = "memory-backend-memfd,id=mem,size=512M,share=on";
    for line in [
        ["-m", "512M", "-numa", "node,memdev=mem", "-object", memfd],
        ["-m", "512M", "-object", memfd, "-numa", "node,memdev=mem"],
    ] {
        let c = run(&line);
        assert_eq!(c.ram.backing, RamBacking::Memfd { share: true, hugetlb: None, seal: true });
    }
    let c =
        run(&["-m", "1G", "-object", "memory-backend-ram,id=r,size=1G", "-numa", "node,memdev=r"]);
    assert_eq!(c.ram.backing, RamBacking::Anonymous);
    let c = run(&[
        "-m",
        "1G",
        "-object",
        "memory-backend-memfd,id=r,size=1G,share=off,hugetlb=on,hugetlbsize=2M,merge=off",
        "-numa",
        "node,memdev=r",
    ]);
    assert_eq!(
        c.ram.backing,
        RamBacking::Memfd { share: false, hugetlb: Some(2 << 20), seal: true }
    );
    assert_eq!((c.ram.merge, c.ram.dump), (Some(false), true));
    let dump = "memory-backend-ram,id=r,size=1G,dump=off";
    assert!(!run(&["-m", "1G", "-object", dump, "-numa", "node,memdev=r"]).ram.dump);
    // A backend nothing uses leaves RAM as it was (QEMU: no message either).
    assert_eq!(run(&["-object", memfd]).ram, RamConfig::default());
}

#[test]
fn memory_backend_errors_name_the_problem() {
    // QEMU's own words for a size that is not -m's.
    fails(
        &["-m", "512M", "-numa", "node,memdev=m", "-object", "memory-backend-memfd,id=m,size=256M"],
        "-numa: total memory for NUMA nodes (0x10000000) should equal RAM size (0x20000000)",
    );
    let e = error(&["-numa", "node,memdev=nope"]);
    assert!(e.contains("'nope' not found"), "{e}");
    let e = error(&["-numa", "node,memdev=a", "-numa", "node,memdev=b"]);
    assert!(e.contains("more than one NUMA node"), "{e}");
    let e = error(&["-object", "memory-backend-memfd,id=m,size=1G,bogus=1"]);
    assert!(e.contains("'bogus'"), "{e}");
    let e = error(&["-object", "memory-backend-ram,id=m,size=1G,policy=bind"]);
    assert!(e.contains("'policy' is not supported"), "{e}");
    let e = error(&["-object", "memory-backend-memfd,id=m,size=1G,hugetlbsize=3M"]);
    assert!(e.contains("power of 2"), "{e}");
    let e = error(&["-object", "memory-backend-memfd,id=m,size=0"]);
    assert!(e.contains("doesn't take value '0'"), "{e}");
    let e = error(&[
        "-object",
        "memory-backend-memfd,id=m",
        "-object",
        "memory-backend-ram,id=m,size=1G",
    ]);
    assert!(e.contains("missing property 'size'"), "{e}");
    let e = error(&["-object", "iothread,id=io0"]);
    assert!(e.contains("'iothread' is not supported"), "{e}");
    let e = error(&["-numa", "node,mem=512M"]);
    assert!(e.contains("-numa node,mem is not supported"), "{e}");
}

/// microvm.nix's store disk and volume, and the NixOS test VM's form.
#[test]
fn drives_and_virtio_blk() {
    let c = run(&[
        "-drive", "id=store,format=raw,read-only=on,file=/s.img,if=none,aio=io_uring",
        "-device", "virtio-blk-pci,drive=store,disable-legacy=on",
        "-drive", "id=vda,format=raw,file=/v.img,if=none,aio=io_uring,discard=unmap,cache=none,read-only=off",
        "-device", "virtio-blk-device,drive=vda,serial=vol,num-queues=2,queue-size=128,logical_block_size=4096",
        "-drive", "index=1,id=drive1,if=none,file=/r.img,cache=writeback,werror=report",
        "-device", "virtio-blk-pci,bootindex=1,drive=drive1,serial=root",
    ]);
    assert_eq!(c.drives.len(), 3);
    let blk = |i: usize| {
        let d = &c.devices[i];
        (d.device.downcast_ref::<Blk>().expect("a virtio-blk"), d.bus == Bus::VirtioPci)
    };
    let (store, pci) = blk(0);
    assert!(pci);
    let s = &store.shape;
    assert_eq!((store.drive.id.as_str(), s.num_queues, s.queue_size), ("store", None, 256));
    assert!(store.drive.read_only, "the device has the drive itself");
    let (vol, pci) = blk(1);
    assert!(!pci);
    let v = &vol.shape;
    assert_eq!((v.serial.as_deref(), v.num_queues, v.queue_size), (Some("vol"), Some(2), 128));
    assert_eq!((v.logical_block_size, v.physical_block_size), (4096, 4096));
    assert_eq!(blk(2).0.shape.serial.as_deref(), Some("root"));
}

#[test]
fn drive_errors_name_the_problem() {
    fails_with(&["-device", "virtio-blk-pci,drive=nope"], &["drive", "nope"]);
    fails_with(
        &[
            "-drive",
            "id=d,file=/x,format=raw",
            "-device",
            "virtio-blk-pci,drive=d",
            "-device",
            "virtio-blk-device,drive=d",
        ],
        &["Drive 'd' is already in use"],
    );
    fails_with(&["-device", "virtio-blk-pci"], &["missing property 'drive'"]);
    fails_with(&["-device", "virtio-blk-pci,drive=d,queue-size=100"], &["queue-size=100"]);
    fails_with(
        &["-device", "virtio-blk-pci,drive=d,physical_block_size=256"],
        &["physical_block_size"],
    );
    fails_with(&["-device", "virtio-blk-pci,drive=d,frob=1"], &["unknown property 'frob'"]);
    fails_with(
        &["-drive", "id=d,file=/x", "-drive", "id=d,file=/y"],
        &["-drive", "duplicate id 'd'"],
    );
}

/// The OS hands over bytes: paths and the kernel's command line keep them
/// (QEMU passes them through); where text is needed, the error names the
/// option. Never a panic (std::env::args would abort on such an argument).
#[test]
fn arguments_that_are_not_utf8() {
    use std::ffi::OsString;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let os = |b: &[u8]| OsString::from_vec(b.to_vec());
    let line = |v: Vec<OsString>| parse(v);
    match line(vec![os(b"-kernel"), os(b"/boot/k\xe9"), os(b"-append"), os(b"x=\xe9")]) {
        Ok(Action::Run(cfg)) => {
            assert_eq!(cfg.kernel.unwrap().as_os_str().as_bytes(), b"/boot/k\xe9");
            assert_eq!(cfg.append.as_bytes(), b"x=\xe9");
        }
        other => panic!("expected a config, got {other:?}"),
    }
    let err = |v: Vec<OsString>| line(v).unwrap_err().to_string();
    assert_eq!(
        err(vec![os(b"-drive"), os(b"id=d,file=/d\xe9.img")]),
        "-drive: the argument 'id=d,file=/d\u{fffd}.img' is not valid UTF-8"
    );
    assert_eq!(err(vec![os(b"-m\xe9")]), "-m\u{fffd}: unknown option");
    assert!(err(vec![os(b"disk\xe9.img")]).contains("unexpected argument"));
}

/// microvm.nix's 9p shares and qemu-vm.nix's -virtfs: the device names
/// its fsdev whatever the order; -virtfs places its device as -net nic
/// does; an fsdev serves one device.
#[test]
fn nine_p_shares_and_their_fsdevs() {
    use crate::config::FsdevConfig;
    let shares = |c: &VmConfig| -> Vec<((String, String), bool)> {
        c.devices
            .iter()
            .filter_map(|d| {
                let p = d.device.downcast_ref::<NineP>()?;
                Some(((p.fsdev.id.clone(), p.mount_tag.clone()), d.bus == Bus::VirtioPci))
            })
            .collect()
    };
    let c = run(&[
        "-M",
        "microvm,pcie=on",
        "-device",
        "virtio-9p-pci,fsdev=fs0,mount_tag=ro-store",
        "-fsdev",
        "local,id=fs0,path=/nix/store,security_model=none,readonly=true",
        "-virtfs",
        "local,path=/tmp,security_model=none,mount_tag=shared",
    ]);
    let p = shares(&c);
    assert_eq!(p[0].0, ("fs0".into(), "ro-store".into()));
    assert_eq!(p[1], (("shared".into(), "shared".into()), true));
    assert_eq!(
        c.fsdevs[0],
        FsdevConfig {
            id: "fs0".into(),
            path: "/nix/store".into(),
            security: devices::virtio::p9::SecurityModel::None,
            readonly: true
        }
    );
    let c = run(&["-M", "microvm", "-virtfs", "local,path=/tmp,security_model=none,mount_tag=s"]);
    assert!(!shares(&c)[0].1, "virtio-mmio without pcie=on");
    let c = run(&["-virtfs", "local,path=/tmp,security_model=none,mount_tag=s"]);
    assert!(shares(&c)[0].1, "PCI on the default machine");
    fails(
        &["-device", "virtio-9p-pci,fsdev=x,mount_tag=t"],
        "-device virtio-9p-pci: fsdev with id x needs to be defined",
    );
    fails_with(
        &[
            "-fsdev",
            "local,id=a,path=/tmp,security_model=none",
            "-device",
            "virtio-9p-device,fsdev=a,mount_tag=t",
            "-device",
            "virtio-9p-device,fsdev=a,mount_tag=u",
        ],
        &["fsdev 'a' is already used"],
    );
    fails_with(
        &[
            "-fsdev",
            "local,id=a,path=/tmp,security_model=none",
            "-virtfs",
            "local,path=/x,security_model=none,mount_tag=a",
        ],
        &["-virtfs", "duplicate fsdev id: a"],
    );
    fails_with(&["-device", "virtio-9p-pci,fsdev=a"], &["-device virtio-9p-pci", "mount_tag"]);
    fails_with(
        &["-device", "virtio-9p-device,fsdev=a,mount_tag=t,cache=loose"],
        &["unknown property 'cache'"],
    );
}

/// microvm.nix's interface forms: the NIC names its netdev, whatever the
/// order; MACs default as QEMU's; a netdev serves one NIC.
#[test]
fn nics_and_their_netdevs() {
    use crate::config::{NetdevConfig, TapSource};
    let c = run(&[
        "-device",
        "virtio-net-pci,netdev=a,mac=02:00:00:00:00:01,romfile=,mq=on,vectors=6",
        "-netdev",
        "tap,id=a,ifname=vm-a,script=no,downscript=no,vhost=on,queues=2",
        "-netdev",
        "tap,id=b,fd=3",
        "-device",
        "virtio-net-device,netdev=b",
    ]);
    let nets: Vec<&Nic> = c.devices.iter().filter_map(|d| d.device.downcast_ref()).collect();
    assert_eq!(nets[0].mac, [2, 0, 0, 0, 0, 1]);
    assert!(nets[0].mq);
    assert_eq!(nets[1].mac, [0x52, 0x54, 0, 0x12, 0x34, 0x57], "the second NIC's default");
    assert_eq!(*nets[1].netdev, c.netdevs[1], "the NIC has its netdev itself");
    assert_eq!(
        c.netdevs[0],
        NetdevConfig::Tap {
            id: "a".into(),
            source: TapSource::Ifname { name: "vm-a".into(), queues: 2 },
            vhost: true
        }
    );
    fails(
        &["-device", "virtio-net-pci,netdev=x"],
        "-device virtio-net-pci: Property 'netdev' can't find value 'x'",
    );
    fails(
        &[
            "-netdev",
            "tap,id=a,fd=3",
            "-device",
            "virtio-net-pci,netdev=a",
            "-device",
            "virtio-net-pci,netdev=a",
        ],
        "-device virtio-net-pci: Property 'netdev' can't take value 'a', it's in use",
    );
    fails_with(
        &["-netdev", "tap,id=a,fd=3", "-netdev", "tap,id=b,fds=4:3"],
        &["-netdev tap,id=b", "fd 3 is already used"],
    );
    fails(&["-netdev", "tap,id=a,fd=3", "-netdev", "tap,id=a,fd=4"], "-netdev: duplicate id 'a'");
    fails_with(&["-device", "virtio-net-pci"], &["netdev= is required"]);
    fails(
        &["-device", "virtio-net-device,netdev=a,vectors=3"],
        "-device virtio-net-device: unknown property 'vectors'",
    );
}

/// `-net nic` (NixOS test VMs): a virtio-net on PCIe with pcie=on, on
/// virtio-mmio otherwise, decided once the whole line is read.
#[test]
fn legacy_net_nic_follows_the_machine() {
    let nic = |c: &VmConfig| {
        c.devices.iter().find(|d| d.device.downcast_ref::<Nic>().is_some()).unwrap().bus
    };
    let c = run(&[
        "-net",
        "nic,netdev=n,model=virtio",
        "-netdev",
        "tap,id=n,fd=3",
        "-M",
        "microvm,pcie=on",
    ]);
    assert_eq!(nic(&c), Bus::VirtioPci);
    let c = run(&["-M", "microvm", "-netdev", "tap,id=n,fd=3", "-net", "nic,netdev=n"]);
    assert_eq!(nic(&c), Bus::VirtioMmio);
    // The default machine has PCI (qemu-vm.nix's -net nic).
    let c = run(&["-netdev", "tap,id=n,fd=3", "-net", "nic,netdev=n"]);
    assert_eq!(nic(&c), Bus::VirtioPci);
}

/// qemu-vm.nix's two NICs: `-net nic` (user networking) is the machine's
/// and comes first, as in QEMU, so the vlan NIC given by `-device` is
/// `virtio-net-pci.1`, the name the NixOS test driver's block() uses.
#[test]
fn nic_names_as_qemu_assigns_them() {
    let c = run(&[
        "-device",
        "virtio-net-pci,netdev=vlan1,mac=52:54:00:12:01:01",
        "-netdev",
        "vde,id=vlan1,sock=/run/vde1.ctl",
        "-net",
        "nic,netdev=user.0,model=virtio",
        "-netdev",
        "user,id=user.0",
        "-device",
        "virtio-net-pci,id=lan,netdev=t0",
        "-netdev",
        "tap,id=t0,fd=3",
    ]);
    let nics: Vec<&Nic> = c.devices.iter().filter_map(|d| d.device.downcast_ref::<Nic>()).collect();
    let names: Vec<Vec<String>> = nics.iter().map(|n| n.names.clone()).collect();
    assert_eq!(
        names,
        [
            vec!["virtio-net-pci.0".to_owned(), "user.0".to_owned()],
            vec!["virtio-net-pci.1".to_owned(), "vlan1".to_owned()],
            vec!["lan".to_owned(), "t0".to_owned()],
        ]
    );
    assert_eq!(nics[0].mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56], "QEMU's first default MAC");
}

/// One configuration of microvm.nix's own x86_64 QEMU check matrix
/// (`checks/default.nix` at 71beea0: the variants 9pstore, virtiofs,
/// overlay, systemd, hardened and credentials, crossed with the tests
/// startup-shutdown and shutdown-command), as `lib/runners/qemu.nix`
/// writes its argv. Store paths are placeholders; systemd and hardened
/// change only paths and `-append`.
fn microvm_nix_check(variant: u32, startup_shutdown: bool) -> Vec<String> {
    let on = |bit: u32| variant & (1 << bit) != 0;
    let (ninep, virtiofs, overlay, systemd, hardened, credentials) =
        (on(0), on(1), on(2), on(3), on(4), on(5));
    let shares = ninep || virtiofs;
    let dt = if shares { "pci" } else { "device" };
    let mut argv: Vec<String> = vec![
        "-name".into(),
        "microvm-test".into(),
        "-M".into(),
        format!(
            "microvm,accel=kvm:tcg,acpi=on,mem-merge=on,pcie={},pic=off,pit=off,rtc=on,usb=off",
            if shares { "on" } else { "off" }
        ),
    ];
    let words = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
    argv.extend(words(
        "-m 512M -smp 1 -nodefaults -no-user-config -no-reboot -kernel /nix/store/k/bzImage \
         -initrd /nix/store/i/initrd -chardev stdio,id=stdio,signal=off",
    ));
    argv.extend(["-device".into(), format!("virtio-rng-{dt}")]);
    argv.extend(words("-smbios type=1,uuid=f4b5b984-60d2-4755-aaa7-834eb621fb68"));
    if credentials {
        argv.extend(words(
            "-fw_cfg name=opt/io.systemd.credentials/SECRET_BOOTSTRAP_KEY,\
             file=/etc/microvm-bootstrap.secret",
        ));
    }
    argv.extend(words("-serial chardev:stdio -enable-kvm -cpu host,+x2apic,-sgx -device i8042"));
    let params = if systemd { " root=fstab" } else { "" };
    argv.extend([
        "-append".into(),
        format!(
            "earlyprintk=ttyS0 console=ttyS0 reboot=t panic=-1 8250.nr_uarts=1 loglevel=4{params} \
             init=/nix/store/t/init regInfo=/nix/store/r/registration"
        ),
    ]);
    let mut letter = b'a';
    if !shares {
        let store = if hardened { "squashfs" } else { "erofs" };
        argv.extend([
            "-drive".into(),
            format!(
                "id=store,format=raw,read-only=on,file=/nix/store/s-microvm-store-disk.{store},\
                 if=none,aio=io_uring"
            ),
            "-device".into(),
            format!("virtio-blk-{dt},drive=store"),
        ]);
        letter += 1;
    }
    argv.extend(words("-nographic -sandbox on -qmp"));
    argv.push(if startup_shutdown {
        "unix:microvm-test.sock,server,nowait".into()
    } else {
        "unix:./microvm.sock,server,nowait".into()
    });
    let mut volumes = Vec::new();
    if overlay {
        volumes.push("nix-store-overlay.img");
    }
    if startup_shutdown {
        volumes.push("output.img");
    }
    for image in volumes {
        let id = format!("vd{}", letter as char);
        letter += 1;
        argv.extend([
            "-drive".into(),
            format!(
                "id={id},format=raw,file={image},if=none,aio=io_uring,discard=unmap,read-only=off"
            ),
            "-device".into(),
            format!("virtio-blk-{dt},drive={id}"),
        ]);
    }
    if shares {
        argv.extend(words(
            "-numa node,memdev=mem -object memory-backend-memfd,id=mem,size=512M,share=on",
        ));
        let mut fs = 0;
        if virtiofs {
            argv.extend([
                "-chardev".into(),
                format!("socket,id=fs{fs},path=microvm-test-virtiofs-test.sock"),
                "-device".into(),
                format!("vhost-user-fs-{dt},chardev=fs{fs},tag=test"),
            ]);
            fs += 1;
        }
        if ninep {
            argv.extend([
                "-fsdev".into(),
                format!("local,id=fs{fs},path=/nix/store,security_model=none,readonly=false"),
                "-device".into(),
                format!("virtio-9p-{dt},fsdev=fs{fs},mount_tag=ro-store"),
            ]);
        }
    }
    argv
}

/// Every configuration of microvm.nix's x86_64 QEMU check matrix (64
/// variants x 2 tests) gets through skiff's parser and its plan: the
/// credentials variant's `-fw_cfg` included.
#[test]
fn microvm_nix_check_matrix_parses_and_plans() {
    let mut planned = 0;
    for variant in 0..64 {
        for startup_shutdown in [true, false] {
            let argv = microvm_nix_check(variant, startup_shutdown);
            let cfg = match parse(argv.clone()) {
                Ok(Action::Run(cfg)) => cfg,
                other => panic!("{argv:?}: {other:?}"),
            };
            if let Err(e) = crate::plan::MachinePlan::new(&cfg, true, 40) {
                panic!("{argv:?}: {e}");
            }
            let credentials = variant & (1 << 5) != 0;
            assert_eq!(cfg.fw_cfg.len(), usize::from(credentials), "{argv:?}");
            planned += 1;
        }
    }
    assert_eq!(planned, 128);
}

#[test]
fn smbios_oem_strings_in_order() {
    let c = run(&["-smbios", "type=11,value=a,value=b", "-smbios", "type=11,value=c"]);
    assert_eq!(c.smbios_oem, ["a", "b", "c"]);
}

/// qemu-vm.nix's start script with the NixOS test driver's additions
/// (../shared/NIXOS-TESTS.md), word for word: it parses into the default
/// machine with every device it names.
#[test]
fn nixos_test_vm_command_line() {
    let line = "-machine accel=kvm:tcg -cpu max -name machine -m 1024 -smp 1 \
        -device virtio-rng-pci -net nic,netdev=user.0,model=virtio -netdev user,id=user.0, \
        -virtfs local,path=/nix/store,security_model=none,mount_tag=nix-store \
        -virtfs local,path=/tmp/xchg,security_model=none,mount_tag=xchg \
        -virtfs local,path=/tmp/shared,security_model=none,mount_tag=shared \
        -drive cache=writeback,file=/tmp/machine.qcow2,id=drive1,if=none,index=1,werror=report \
        -device virtio-blk-pci,bootindex=1,drive=drive1,serial=root \
        -device virtio-net-pci,netdev=vlan1,mac=52:54:00:12:01:01 \
        -netdev vde,id=vlan1,sock=/tmp/vde1.ctl \
        -device virtio-keyboard -usb -device usb-tablet,bus=usb-bus.0 \
        -kernel /run/kernel -initrd /run/initrd \
        -qmp unix:/tmp/state/qmp,server=on,wait=off -monitor unix:/tmp/state/monitor \
        -chardev socket,id=shell,path=/tmp/state/shell -device virtio-serial \
        -device virtconsole,chardev=shell -device virtio-rng-pci -serial stdio -no-reboot -nographic";
    let mut args: Vec<&str> = line.split_whitespace().collect();
    args.extend(["-append", "console=ttyS0 panic=1 boot.panic_on_fail"]);
    let c = run(&args);
    assert_eq!(c.machine.kind, MachineKind::Default);
    assert!(c.machine.has_pcie());
    let drivers: Vec<&str> = c.devices.iter().map(|d| d.driver).collect();
    for d in [
        "virtio-rng-pci",
        "virtio-blk-pci",
        "virtio-net-pci",
        "virtio-keyboard",
        "usb-tablet",
        "virtio-serial",
        "virtconsole",
        "virtio-9p-pci",
        "i8042",
        "mc146818rtc",
    ] {
        assert!(drivers.contains(&d), "{d} missing: {drivers:?}");
    }
    assert_eq!(c.monitors.len(), 1);
    assert!(!c.monitors[0].server, "the driver listens; skiff connects");
    assert_eq!(c.machine.usb, OnOffAuto::On);
}
