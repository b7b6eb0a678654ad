//! `-M`/`-machine`, `-accel`, `-m`, `-smp` and `-cpu`.

use super::opts::{parse_bool, parse_size, QemuOpts};
use super::CliError;
use crate::config::{CpuConfig, MachineConfig, MachineKind, SmpConfig};

/// Most vCPUs a microvm may have: APIC IDs 0..=254 (255 is the broadcast ID
/// with xAPIC).
pub(super) const MAX_CPUS: u64 = 254;

/// Smallest guest RAM worth booting; catches `-m 1` meant as bytes.
const MIN_MEM_SIZE: u64 = 1 << 20;

/// QEMU rounds `-m` up to 8 KiB.
const MEM_ALIGN: u64 = 8 << 10;

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *slot = value;
    }
}

/// `-M [type=]microvm[,key=value...]`. Several `-M` merge, later keys winning,
/// as in QEMU. With no type at all (`-machine accel=kvm:tcg`, qemu-vm.nix's
/// form) the machine is skiff's default machine (`MachineKind::Default`).
pub(super) fn parse_machine(
    label: &str,
    arg: &str,
    machine: &mut MachineConfig,
) -> Result<(), CliError> {
    let mut opts = QemuOpts::parse(label, arg, Some("type"));
    if let Some(ty) = opts.take("type") {
        if ty != "microvm" {
            return Err(opts.error(format!(
                "unknown machine '{ty}' (only 'microvm'; with no machine type skiff \
                 gives its default machine, a microvm with PCIe, i8042 and RTC)"
            )));
        }
        machine.kind = MachineKind::Microvm;
    }
    if machine.kind == MachineKind::Microvm {
        opts.relabel(format!("{label} microvm"));
    }

    if let Some(accel) = opts.take("accel") {
        // QEMU tries a ':'-separated list in order; KVM is the only one skiff
        // has, so any list naming it works.
        if !accel.split(':').any(|a| a == "kvm") {
            return Err(opts.error(format!("accel '{accel}' is not supported (skiff needs KVM)")));
        }
    }
    set(&mut machine.acpi, opts.take_on_off_auto("acpi")?);
    set(&mut machine.pcie, opts.take_on_off_auto("pcie")?);
    set(&mut machine.pic, opts.take_on_off_auto("pic")?);
    set(&mut machine.pit, opts.take_on_off_auto("pit")?);
    set(&mut machine.rtc, opts.take_on_off_auto("rtc")?);
    set(&mut machine.usb, opts.take_on_off_auto("usb")?);
    set(&mut machine.mem_merge, opts.take_bool("mem-merge")?);
    set(&mut machine.isa_serial, opts.take_bool("isa-serial")?);
    set(&mut machine.option_roms, opts.take_bool("x-option-roms")?);
    set(&mut machine.auto_kernel_cmdline, opts.take_bool("auto-kernel-cmdline")?);
    opts.finish()
}

/// `-accel kvm`: the only accelerator skiff has.
pub(super) fn parse_accel(label: &str, arg: &str) -> Result<(), CliError> {
    let mut opts = QemuOpts::parse(label, arg, Some("accel"));
    let accel = opts.take("accel").ok_or_else(|| opts.missing("accel"))?;
    if accel != "kvm" {
        return Err(opts.error(format!("accelerator '{accel}' is not supported (skiff needs KVM)")));
    }
    opts.relabel(format!("{label} kvm"));
    opts.finish()
}

/// `-m [size=]SIZE`: returns the new guest RAM size in bytes, if given.
pub(super) fn parse_memory(label: &str, arg: &str) -> Result<Option<u64>, CliError> {
    let mut opts = QemuOpts::parse(label, arg, Some("size"));
    for key in ["maxmem", "slots"] {
        if opts.contains(key) {
            return Err(opts.error(format!(
                "{key} is not supported (the microvm machine has no memory hotplug)"
            )));
        }
    }
    let size = opts.take("size");
    opts.finish()?;
    let Some(size) = size else {
        return Ok(None);
    };
    let invalid = || CliError::InvalidSize { option: label.to_owned(), value: size.clone() };
    let mut bytes = parse_size(&size).ok_or_else(invalid)?;
    // QEMU's "legacy suffix-less format": a size ending in a digit is in MiB.
    if size.ends_with(|c: char| c.is_ascii_digit()) {
        bytes = bytes.checked_mul(1 << 20).ok_or_else(invalid)?;
    }
    if bytes < MIN_MEM_SIZE {
        return Err(CliError::Invalid {
            option: label.to_owned(),
            reason: format!("size '{size}' is too small (at least 1M)"),
        });
    }
    bytes.checked_next_multiple_of(MEM_ALIGN).map(Some).ok_or_else(invalid)
}

/// The `-smp` values as given; several `-smp` merge, later keys winning.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct SmpArgs {
    cpus: Option<u64>,
    sockets: Option<u64>,
    cores: Option<u64>,
    threads: Option<u64>,
    maxcpus: Option<u64>,
}

/// `-smp [cpus=]N[,sockets=S][,cores=C][,threads=T][,maxcpus=M]`.
pub(super) fn parse_smp(label: &str, arg: &str, smp: &mut SmpArgs) -> Result<(), CliError> {
    let mut opts = QemuOpts::parse(label, arg, Some("cpus"));
    let count = |opts: &mut QemuOpts, key: &str| -> Result<Option<u64>, CliError> {
        match opts.take_uint(key)? {
            // QEMU deprecates 0 ("compute it"); just leave the key out.
            Some(0) => Err(opts.error(format!("'{key}' must be greater than zero"))),
            Some(n) if n > u64::from(u32::MAX) => Err(opts.error(format!("'{key}' is too large"))),
            n => Ok(n),
        }
    };
    let cpus = count(&mut opts, "cpus")?;
    let sockets = count(&mut opts, "sockets")?;
    let cores = count(&mut opts, "cores")?;
    let threads = count(&mut opts, "threads")?;
    let maxcpus = count(&mut opts, "maxcpus")?;
    // Levels QEMU knows but skiff does not model: fine as long as they are 1.
    for key in ["dies", "modules", "clusters", "books", "drawers"] {
        if let Some(n) = count(&mut opts, key)? {
            if n != 1 {
                return Err(opts.error(format!("{key}={n} is not supported (only {key}=1)")));
            }
        }
    }
    opts.finish()?;
    smp.cpus = cpus.or(smp.cpus);
    smp.sockets = sockets.or(smp.sockets);
    smp.cores = cores.or(smp.cores);
    smp.threads = threads.or(smp.threads);
    smp.maxcpus = maxcpus.or(smp.maxcpus);
    Ok(())
}

/// Derives the missing `-smp` values as QEMU >= 6.2 does (`machine_parse_smp_config`:
/// cores are preferred over sockets), then checks the topology.
pub(super) fn resolve_smp(label: &str, smp: SmpArgs) -> Result<SmpConfig, CliError> {
    let err = |reason: String| CliError::Invalid { option: label.to_owned(), reason };
    // 0 stands for "not given" below, as in QEMU; given values are >= 1.
    let (mut sockets, mut cores, mut threads) =
        (smp.sockets.unwrap_or(0), smp.cores.unwrap_or(0), smp.threads.unwrap_or(0));
    let cpus = smp.cpus.unwrap_or(0);
    let mut maxcpus = smp.maxcpus.unwrap_or(0);
    let or_one = |n: u64| n.max(1);
    if cpus == 0 && maxcpus == 0 {
        (sockets, cores, threads) = (or_one(sockets), or_one(cores), or_one(threads));
    } else {
        if maxcpus == 0 {
            maxcpus = cpus;
        }
        if cores == 0 {
            (sockets, threads) = (or_one(sockets), or_one(threads));
            cores = maxcpus / (sockets * threads);
        } else if sockets == 0 {
            threads = or_one(threads);
            sockets = maxcpus / (cores * threads);
        }
        if threads == 0 {
            threads = maxcpus / (sockets * cores);
        }
    }
    let Some(total) = sockets.checked_mul(cores).and_then(|n| n.checked_mul(threads)) else {
        return Err(err(format!(
            "sockets ({sockets}) * cores ({cores}) * threads ({threads}) exceeds the \
             {MAX_CPUS} CPUs the microvm machine supports"
        )));
    };
    if maxcpus == 0 {
        maxcpus = total;
    }
    let cpus = if cpus == 0 { maxcpus } else { cpus };
    if total != maxcpus {
        return Err(err(format!(
            "invalid CPU topology: sockets ({sockets}) * cores ({cores}) * threads ({threads}) \
             != maxcpus ({maxcpus})"
        )));
    }
    if maxcpus < cpus {
        return Err(err(format!("invalid CPU topology: maxcpus ({maxcpus}) < cpus ({cpus})")));
    }
    if maxcpus > cpus {
        return Err(err(format!(
            "CPU hotplug is not supported (maxcpus ({maxcpus}) must equal cpus ({cpus}))"
        )));
    }
    if cpus > MAX_CPUS {
        return Err(err(format!(
            "{cpus} CPUs requested, the microvm machine supports at most {MAX_CPUS}"
        )));
    }
    // All four are now in 1..=MAX_CPUS.
    let narrow = |n: u64| u32::try_from(n).map_err(|_| err(format!("{n} is too large")));
    let smp = SmpConfig {
        cpus: narrow(cpus)?,
        sockets: narrow(sockets)?,
        cores: narrow(cores)?,
        threads: narrow(threads)?,
    };
    // Thread and core fields of the APIC ID are rounded up to powers of two,
    // so a topology can run out of 8-bit xAPIC IDs before it runs out of CPUs.
    let highest = smp.topology().apic_id(smp.cpus - 1);
    if u64::from(highest) > MAX_CPUS {
        return Err(err(format!(
            "the topology's highest APIC ID is {highest}; the microvm machine's xAPIC IDs \
             end at {MAX_CPUS}"
        )));
    }
    Ok(smp)
}

/// `-cpu host[,+feat][,-feat][,feat=on|off][,feat]`; `max` means `host` under KVM.
///
/// Like QEMU's `x86_cpu_parse_featurestr`, this is not QemuOpts: commas
/// cannot be escaped and empty elements are skipped.
pub(super) fn parse_cpu(label: &str, arg: &str) -> Result<CpuConfig, CliError> {
    let (model, features) = arg.split_once(',').unwrap_or((arg, ""));
    let err = |reason: String| CliError::Invalid { option: label.to_owned(), reason };
    if model != "host" && model != "max" {
        return Err(err(format!("CPU model '{model}' is not supported (only 'host' and 'max')")));
    }
    let label = format!("{label} {model}");
    let err = |reason: String| CliError::Invalid { option: label.clone(), reason };
    let mut cpu = CpuConfig::default();
    for item in features.split(',').filter(|s| !s.is_empty()) {
        let (name, enabled) = if let Some(name) = item.strip_prefix('+') {
            (name, true)
        } else if let Some(name) = item.strip_prefix('-') {
            (name, false)
        } else if let Some((name, value)) = item.split_once('=') {
            let enabled = parse_bool(value).ok_or_else(|| CliError::InvalidValue {
                option: label.clone(),
                key: name.to_owned(),
                value: value.to_owned(),
                expected: "on or off; CPU properties other than feature flags are not supported",
            })?;
            (name, enabled)
        } else {
            (item, true)
        };
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if name.is_empty() || !name.chars().all(valid) {
            return Err(err(format!("invalid feature name '{name}'")));
        }
        // QEMU's feat2prop: `sse4_2` and `sse4-2` are the same property.
        cpu.features.push((name.replace('_', "-"), enabled));
    }
    Ok(cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smp(arg: &str) -> Result<SmpConfig, String> {
        let mut args = SmpArgs::default();
        parse_smp("-smp", arg, &mut args).map_err(|e| e.to_string())?;
        resolve_smp("-smp", args).map_err(|e| e.to_string())
    }

    fn topo(cpus: u32, sockets: u32, cores: u32, threads: u32) -> Result<SmpConfig, String> {
        Ok(SmpConfig { cpus, sockets, cores, threads })
    }

    #[test]
    fn smp_derivation_matches_qemu() {
        assert_eq!(smp("1"), topo(1, 1, 1, 1));
        // QEMU >= 6.2 prefers cores over sockets.
        assert_eq!(smp("4"), topo(4, 1, 4, 1));
        assert_eq!(smp("cpus=4"), topo(4, 1, 4, 1));
        assert_eq!(smp("4,sockets=2"), topo(4, 2, 2, 1));
        assert_eq!(smp("4,cores=2"), topo(4, 2, 2, 1));
        assert_eq!(smp("4,threads=2"), topo(4, 1, 2, 2));
        assert_eq!(smp("4,sockets=2,cores=2"), topo(4, 2, 2, 1));
        assert_eq!(smp("8,sockets=2,cores=2"), topo(8, 2, 2, 2));
        assert_eq!(smp("sockets=2,cores=2,threads=2"), topo(8, 2, 2, 2));
        assert_eq!(smp("sockets=2"), topo(2, 2, 1, 1));
        assert_eq!(smp("maxcpus=4"), topo(4, 1, 4, 1));
        assert_eq!(smp("4,maxcpus=4"), topo(4, 1, 4, 1));
        assert_eq!(smp("2,dies=1,modules=1,clusters=1"), topo(2, 1, 2, 1));
        assert_eq!(smp("254"), topo(254, 1, 254, 1));
        assert_eq!(smp("0x10"), topo(16, 1, 16, 1));
    }

    #[test]
    fn smp_errors() {
        let err = smp("2,maxcpus=4").unwrap_err();
        assert!(err.starts_with("-smp: CPU hotplug is not supported"), "{err}");
        let err = smp("4,sockets=3").unwrap_err();
        assert!(err.contains("invalid CPU topology") && err.contains("maxcpus (4)"), "{err}");
        let err = smp("2,sockets=4").unwrap_err();
        assert!(err.contains("cores (0)"), "{err}");
        let err = smp("4,maxcpus=2").unwrap_err();
        assert!(err.contains("invalid CPU topology"), "{err}");
        let err = smp("0").unwrap_err();
        assert_eq!(err, "-smp: 'cpus' must be greater than zero");
        let err = smp("2,threads=0").unwrap_err();
        assert!(err.contains("'threads'"), "{err}");
        let err = smp("255").unwrap_err();
        assert!(err.contains("at most 254"), "{err}");
        // 240 CPUs, but 3 threads and 40 cores take 2 + 6 bits of the ID.
        let err = smp("240,sockets=2,cores=40,threads=3").unwrap_err();
        assert!(err.contains("highest APIC ID is 414") && err.contains("end at 254"), "{err}");
        let err = smp("4294967296").unwrap_err();
        assert!(err.contains("'cpus' is too large"), "{err}");
        let err = smp("2,dies=2").unwrap_err();
        assert_eq!(err, "-smp: dies=2 is not supported (only dies=1)");
        let err = smp("2,foo=1").unwrap_err();
        assert_eq!(err, "-smp: unknown property 'foo'");
        let err = smp("two").unwrap_err();
        assert!(err.contains("'two'") && err.contains("'cpus'"), "{err}");
        let err = smp("sockets=4294967295,cores=4294967295,threads=4294967295").unwrap_err();
        assert!(err.contains("exceeds the 254 CPUs"), "{err}");
    }

    #[test]
    fn smp_merges_like_qemu() {
        let mut args = SmpArgs::default();
        parse_smp("-smp", "4", &mut args).unwrap();
        parse_smp("-smp", "sockets=2", &mut args).unwrap();
        assert_eq!(
            resolve_smp("-smp", args),
            Ok(SmpConfig { cpus: 4, sockets: 2, cores: 2, threads: 1 })
        );
    }

    #[test]
    fn cpu_features() {
        let cpu = parse_cpu("-cpu", "host,+x2apic,-sgx,pdpe1gw=off,sse4_2,avx=on,,").unwrap();
        let expected =
            [("x2apic", true), ("sgx", false), ("pdpe1gw", false), ("sse4-2", true), ("avx", true)];
        let expected: Vec<_> = expected.iter().map(|(n, e)| (n.to_string(), *e)).collect();
        assert_eq!(cpu.features, expected);
        assert_eq!(parse_cpu("-cpu", "max").unwrap(), CpuConfig::default());
        assert_eq!(parse_cpu("-cpu", "host").unwrap(), CpuConfig::default());
    }

    #[test]
    fn cpu_errors() {
        let err = |arg: &str| parse_cpu("-cpu", arg).unwrap_err().to_string();
        assert_eq!(
            err("qemu64"),
            "-cpu: CPU model 'qemu64' is not supported (only 'host' and 'max')"
        );
        assert!(err("").contains("CPU model ''"));
        assert!(err("host,level=0xd").contains("-cpu host: invalid value '0xd' for 'level'"));
        assert_eq!(err("host,+"), "-cpu host: invalid feature name ''");
        assert_eq!(err("host,=on"), "-cpu host: invalid feature name ''");
        assert_eq!(err("host,+a b"), "-cpu host: invalid feature name 'a b'");
    }
}
