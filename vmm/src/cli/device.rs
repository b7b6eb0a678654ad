//! `-device`, `-smbios` and `-fw_cfg`.

use super::opts::QemuOpts;
use super::CliError;
use crate::config::{FwCfgContent, FwCfgFile, PciSlotConfig, SmbiosType1};
use crate::kinds::{self, Bus, Kind, Unresolved};

/// A `-device` as parsed, its references to other options still names.
pub(super) struct Pending {
    pub kind: &'static dyn Kind,
    pub driver: &'static str,
    pub id: Option<String>,
    pub bus: Bus,
    pub pci: PciSlotConfig,
    pub device: Box<dyn Unresolved>,
}

/// QEMU devices microvm.nix uses that skiff does not have yet, told apart
/// from unknown names so the error says "not yet" rather than "no such thing".
fn planned(driver: &str) -> bool {
    driver.starts_with("virtio-")
        || driver.starts_with("vhost-")
        || matches!(driver, "pci-bridge" | "pcie-pci-bridge")
}

/// `-device [driver=]DRIVER[,id=ID][,prop=value...]`: the registry's kind
/// for DRIVER parses what is its own.
pub(super) fn parse_device(label: &str, arg: &str) -> Result<Pending, CliError> {
    let err = |reason: String| CliError::Invalid { option: label.to_owned(), reason };
    if arg.starts_with('{') {
        return Err(err("JSON syntax is not supported".to_owned()));
    }
    let mut opts = QemuOpts::parse(label, arg, Some("driver"));
    let driver = opts.take("driver").ok_or_else(|| opts.missing("driver"))?;
    let Some((kind, known)) = kinds::driver(&driver) else {
        return Err(err(if planned(&driver) {
            format!("'{driver}' is not supported yet")
        } else {
            format!("unknown device '{driver}'")
        }));
    };
    if kind.machine_only() {
        return Err(err(format!("'{driver}' is the machine's own; -device cannot add one")));
    }
    opts.relabel(format!("{label} {driver}"));
    device(kind, known, opts)
}

/// A device the command line implies (`-net nic`, `-virtfs`): `driver`
/// with `props`, through the same parser as `-device`.
pub(super) fn implied_device(
    label: &str,
    driver: &str,
    props: Vec<(String, String)>,
) -> Result<Pending, CliError> {
    let Some((kind, known)) = kinds::driver(driver) else {
        return Err(CliError::Invalid { option: label.to_owned(), reason: format!("no {driver}") });
    };
    device(kind, known, QemuOpts::from_pairs(label, props))
}

fn device(
    kind: &'static dyn Kind,
    known: &'static kinds::Driver,
    mut opts: QemuOpts,
) -> Result<Pending, CliError> {
    let id = opts.take_id()?;
    let pci =
        if known.bus.is_pci() { pci_slot(&mut opts, known.name)? } else { Default::default() };
    if known.bus == Bus::VirtioPci {
        virtio_pci(&mut opts)?;
    }
    let device = kind.parse(&mut opts, known.bus)?;
    opts.finish()?;
    Ok(Pending { kind, driver: known.name, id, bus: known.bus, pci, device })
}

/// What every virtio-pci device accepts beside its family's properties.
fn virtio_pci(opts: &mut QemuOpts) -> Result<(), CliError> {
    // Modern-only is skiff's behaviour; QEMU's switch to say so is accepted.
    if opts.take_bool("disable-legacy")? == Some(false) {
        return Err(opts.error("legacy virtio (disable-legacy=off) is not supported"));
    }
    // No firmware runs, so no option ROM is loaded (microvm.nix passes
    // an empty romfile=); skiff gives every queue its own MSI-X vector
    // plus one for configuration changes, whatever `vectors=` asks.
    opts.take("romfile");
    if let Some(v) = opts.take_uint("vectors")? {
        if v > 2048 {
            return Err(opts.invalid_value("vectors", v.to_string(), "at most 2048"));
        }
    }
    Ok(())
}

/// The placement properties every PCI device has: `addr`, `bus`,
/// `multifunction`.
fn pci_slot(opts: &mut QemuOpts, driver: &str) -> Result<PciSlotConfig, CliError> {
    let addr = match opts.take("addr") {
        Some(text) => {
            Some(pci::DevFn::parse(&text).map_err(|e| opts.error(e.qemu_message(driver)))?)
        }
        None => None,
    };
    let bus = opts.take("bus");
    let multifunction = opts.take_bool("multifunction")?.unwrap_or(false);
    Ok(PciSlotConfig { bus, addr, multifunction })
}

/// `-smbios type=1,field=value...` (several merge, later fields winning)
/// and `-smbios type=11,value=STR|path=FILE[,...]` (OEM strings, in order;
/// systemd reads `io.systemd.credential:NAME=VALUE` from them). A `path=`
/// file's contents are one string, read here, once, as QEMU reads it when
/// it parses the option.
pub(super) fn parse_smbios(
    label: &str,
    arg: &str,
    smbios: &mut Option<SmbiosType1>,
    oem_strings: &mut Vec<String>,
) -> Result<(), CliError> {
    let mut opts = QemuOpts::parse(label, arg, None);
    if opts.contains("file") {
        return Err(opts.error("file= is not supported (only type=1 and type=11)"));
    }
    let ty = opts.take_uint("type")?.ok_or_else(|| opts.missing("type"))?;
    if ty == 11 {
        opts.relabel(format!("{label} type=11"));
        let mut values = Vec::new();
        for (key, v) in opts.take_all_of(&["value", "path"]) {
            if key == "value" {
                if v.contains('\0') {
                    return Err(opts.invalid_value("value", v, "a string without NUL bytes"));
                }
                values.push(v);
                continue;
            }
            let bytes =
                std::fs::read(&v).map_err(|e| opts.error(format!("Could not open '{v}': {e}")))?;
            // QEMU's checks (save_opt_one).
            if bytes.contains(&0) {
                return Err(opts.error(format!("NUL in OEM strings value in {v}")));
            }
            let text = String::from_utf8(bytes)
                .map_err(|_| opts.error(format!("{v}: an OEM string must be UTF-8 text")))?;
            values.push(text);
        }
        if values.is_empty() {
            return Err(opts.missing("value"));
        }
        opts.finish()?;
        oem_strings.extend(values);
        return Ok(());
    }
    if ty != 1 {
        return Err(opts.error(format!("type={ty} is not supported (only type=1 and type=11)")));
    }
    opts.relabel(format!("{label} type=1"));
    let uuid = opts.take("uuid");
    if let Some(uuid) = uuid.as_ref().filter(|u| !uuid_wellformed(u)) {
        return Err(opts.invalid_value(
            "uuid",
            uuid.clone(),
            "a UUID like 01234567-89ab-cdef-0123-456789abcdef",
        ));
    }
    let table = smbios.get_or_insert_with(SmbiosType1::default);
    table.uuid = uuid.or(table.uuid.take());
    for (key, field) in [
        ("manufacturer", &mut table.manufacturer),
        ("product", &mut table.product),
        ("version", &mut table.version),
        ("serial", &mut table.serial),
        ("sku", &mut table.sku),
        ("family", &mut table.family),
    ] {
        if let Some(value) = opts.take(key) {
            *field = Some(value);
        }
    }
    opts.finish()
}

/// `-fw_cfg [name=]NAME,file=PATH|string=STR`, as QEMU's `parse_fw_cfg`
/// takes it: the name, then exactly one of the contents; a name outside
/// `opt/` is QEMU's warning, not an error.
#[expect(clippy::disallowed_macros, reason = "startup: once per -fw_cfg")]
pub(super) fn parse_fw_cfg(label: &str, arg: &str) -> Result<FwCfgFile, CliError> {
    let mut opts = QemuOpts::parse(label, arg, Some("name"));
    if opts.contains("gen_id") {
        return Err(opts.error("gen_id= is not supported (no vmgenid device)"));
    }
    let name = opts.take("name").ok_or_else(|| opts.missing("name"))?;
    let file = opts.take("file").filter(|f| !f.is_empty());
    let string = opts.take("string").filter(|s| !s.is_empty());
    opts.finish()?;
    let content = match (file, string) {
        (Some(f), None) => FwCfgContent::File(f.into()),
        (None, Some(s)) => FwCfgContent::Text(s),
        _ => {
            return Err(CliError::Invalid {
                option: label.to_owned(),
                reason: "name, plus exactly one of file, string and gen_id, are needed".into(),
            })
        }
    };
    let max = devices::legacy::fw_cfg::FILE_NAME_LEN - 1;
    if name.len() > max {
        return Err(CliError::Invalid {
            option: label.to_owned(),
            reason: format!("name too long (max. {max} char)"),
        });
    }
    if !name.starts_with("opt/") {
        log::warn!("externally provided fw_cfg item names should be prefixed with \"opt/\"");
    }
    Ok(FwCfgFile { name, content })
}

/// QEMU's `qemu_uuid_parse` format: 8-4-4-4-12 hex digits.
fn uuid_wellformed(uuid: &str) -> bool {
    uuid.len() == 36
        && uuid.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(arg: &str) -> Result<Pending, String> {
        parse_device("-device", arg).map_err(|e| e.to_string())
    }

    fn err(arg: &str) -> String {
        match device(arg) {
            Ok(p) => panic!("-device {arg}: parsed as {}", p.driver),
            Err(e) => e,
        }
    }

    #[test]
    fn drivers_come_from_the_registry() {
        let d = device("driver=i8042,id=kbd").unwrap();
        assert_eq!((d.driver, d.id.as_deref(), d.bus), ("i8042", Some("kbd"), Bus::Fixed));
        let d = device("virtio-rng-pci,addr=3.1,multifunction=on").unwrap();
        assert_eq!((d.driver, d.bus), ("virtio-rng-pci", Bus::VirtioPci));
        assert_eq!(d.pci.addr.map(|a| a.to_string()).as_deref(), Some("03.1"));
        assert!(d.pci.multifunction);
        assert_eq!(device("virtio-rng-device").unwrap().bus, Bus::VirtioMmio);
    }

    #[test]
    fn device_errors() {
        assert_eq!(err("e1000"), "-device: unknown device 'e1000'");
        assert_eq!(err(""), "-device: missing property 'driver'");
        assert_eq!(err("id=x"), "-device: missing property 'driver'");
        assert_eq!(err("virtio-9p-pci"), "-device virtio-9p-pci: missing property 'fsdev'");
        for driver in ["vhost-user-blk-pci", "virtio-gpu-pci", "virtio-mouse-pci"] {
            assert_eq!(err(driver), format!("-device: '{driver}' is not supported yet"));
        }
        assert_eq!(err("i8042,foo=1"), "-device i8042: unknown property 'foo'");
        assert!(err("i8042,id=1").starts_with("-device i8042: invalid value '1' for 'id'"));
        assert_eq!(err("{\"driver\":\"i8042\"}"), "-device: JSON syntax is not supported");
        assert!(err("virtio-rng-pci,disable-legacy=off").contains("legacy virtio"));
        assert!(err("virtio-rng-pci,vectors=4096").contains("'vectors'"));
        assert!(err("virtio-rng-device,addr=2.0").contains("unknown property 'addr'"));
        assert!(err("virtio-balloon-pci,free-page-hint=on").contains("free-page-hint=on"));
        assert!(err("virtio-balloon-pci,page-poison=on").contains("page-poison=on"));
        assert!(err("virtio-balloon-pci,guest-stats-polling-interval=4294967296")
            .contains("timer value is too big"));
        assert!(
            err("virtio-balloon-device,free-page-reporting=maybe").contains("free-page-reporting")
        );
        assert!(err("virtio-balloon-pci,iothread=io0").contains("unknown property 'iothread'"));
    }

    /// microvm.nix's balloon line, on both transports.
    #[test]
    fn balloon_as_microvm_nix_writes_it() {
        use crate::kinds::balloon::Balloons;
        use devices::virtio::balloon::BalloonConfig;
        for (arg, bus) in [
            (
                "virtio-balloon-pci,free-page-reporting=on,id=balloon0,deflate-on-oom=on",
                Bus::VirtioPci,
            ),
            ("virtio-balloon-device,free-page-reporting=on,id=balloon0", Bus::VirtioMmio),
        ] {
            let d = device(arg).unwrap();
            assert_eq!(d.bus, bus);
            assert_eq!(d.id.as_deref(), Some("balloon0"));
        }
        let d =
            device("virtio-balloon-pci,guest-stats-polling-interval=2,deflate-on-oom=on").unwrap();
        let config = BalloonConfig { deflate_on_oom: true, free_page_reporting: false };
        assert_eq!(format!("{:?}", d.device), format!("{:?}", Balloons { config, poll_secs: 2 }));
    }

    fn smbios(args: &[&str]) -> Result<Option<SmbiosType1>, String> {
        smbios_and_oem(args).map(|(t, _)| t)
    }

    fn smbios_and_oem(args: &[&str]) -> Result<(Option<SmbiosType1>, Vec<String>), String> {
        let (mut table, mut oem) = (None, Vec::new());
        for arg in args {
            parse_smbios("-smbios", arg, &mut table, &mut oem).map_err(|e| e.to_string())?;
        }
        Ok((table, oem))
    }

    /// OEM strings (type 11), as microvm.nix's users pass systemd
    /// credentials: in order, repeatable, commas doubled.
    #[test]
    fn smbios_type11() {
        let (t1, oem) = smbios_and_oem(&[
            "type=11,value=io.systemd.credential:a=1",
            "type=1,serial=S",
            "type=11,value=io.systemd.credential:b=x,,y,value=third",
        ])
        .unwrap();
        assert_eq!(oem, ["io.systemd.credential:a=1", "io.systemd.credential:b=x,y", "third"]);
        assert_eq!(t1.and_then(|t| t.serial), Some("S".into()));
        let err = |arg: &str| smbios(&[arg]).unwrap_err();
        assert_eq!(err("type=11"), "-smbios type=11: missing property 'value'");
        assert_eq!(err("type=11,value=a,foo=1"), "-smbios type=11: unknown property 'foo'");
    }

    /// `path=`: the file's contents are one string, in command-line order
    /// with the `value=`s; a missing file or a NUL byte is an error, as in
    /// QEMU.
    #[test]
    fn smbios_type11_from_files() {
        let dir = std::env::temp_dir().join(format!("skiff-oem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cred = dir.join("cred");
        std::fs::write(&cred, "io.systemd.credential:c=from a file\n").unwrap();
        let nul = dir.join("nul");
        std::fs::write(&nul, b"a\0b").unwrap();
        let arg = format!("type=11,value=first,path={},value=last", cred.display());
        let (_, oem) = smbios_and_oem(&[&arg]).unwrap();
        assert_eq!(oem, ["first", "io.systemd.credential:c=from a file\n", "last"]);
        let err = |arg: String| smbios(&[&arg]).unwrap_err();
        let missing = dir.join("missing");
        assert!(err(format!("type=11,path={}", missing.display())).contains("Could not open"));
        assert!(err(format!("type=11,path={}", nul.display())).contains("NUL in OEM strings"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn smbios_type1() {
        let table = smbios(&[
            "type=1,manufacturer=ACME,product=P,version=1,,2,serial=S,sku=K,family=F",
            "type=1,uuid=0123ABCD-89ab-cdef-0123-456789abcdef,product=Q",
        ]);
        let expected = SmbiosType1 {
            manufacturer: Some("ACME".into()),
            product: Some("Q".into()),
            version: Some("1,2".into()),
            serial: Some("S".into()),
            uuid: Some("0123ABCD-89ab-cdef-0123-456789abcdef".into()),
            sku: Some("K".into()),
            family: Some("F".into()),
        };
        assert_eq!(table, Ok(Some(expected)));
    }

    #[test]
    fn smbios_errors() {
        let err = |arg: &str| smbios(&[arg]).unwrap_err();
        assert_eq!(err("type=0"), "-smbios: type=0 is not supported (only type=1 and type=11)");
        assert_eq!(
            err("type=17,size=1"),
            "-smbios: type=17 is not supported (only type=1 and type=11)"
        );
        assert_eq!(err("manufacturer=x"), "-smbios: missing property 'type'");
        assert_eq!(err("file=/tmp/t"), "-smbios: file= is not supported (only type=1 and type=11)");
        assert_eq!(err("type=1,foo=x"), "-smbios type=1: unknown property 'foo'");
        for uuid in [
            "",
            "0123",
            "0123abcd-89ab-cdef-0123-456789abcdeg",
            "0123abcd089ab-cdef-0123-456789abcdef",
            "0123abcd-89ab-cdef-0123-456789abcdef0",
            "0123abcd-89ab-cdef-0123-456789abcdé",
        ] {
            let e = err(&format!("type=1,uuid={uuid}"));
            assert!(
                e.starts_with(&format!("-smbios type=1: invalid value '{uuid}' for 'uuid'")),
                "{e}"
            );
        }
    }
}
