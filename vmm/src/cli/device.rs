//! `-device` and `-smbios`.

use super::opts::QemuOpts;
use super::CliError;
use crate::config::{
    BlockConfig, DeviceConfig, FsConfig, NetConfig, P9Config, PciSlotConfig, RootPortConfig,
    SmbiosType1, VirtioConfig, VirtioKind, VirtioTransport,
};

/// QEMU's isa-debug-exit defaults.
const DEBUG_EXIT_IOBASE: u64 = 0x501;
const DEBUG_EXIT_IOSIZE: u64 = 0x02;

/// A `-device` as parsed: the device and its `id=`, if any.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Device {
    pub config: DeviceConfig,
    pub id: Option<String>,
}

/// A virtio family's own properties, parsed into its description.
type FamilyParser = fn(&mut QemuOpts) -> Result<VirtioKind, CliError>;

/// The virtio device families: `-device NAME-pci` and `-device NAME-device`
/// both resolve to the family's description plus a transport. A new family
/// adds one line here and one `VirtioKind` variant.
const VIRTIO_FAMILIES: &[(&str, FamilyParser)] = &[
    ("virtio-rng", virtio_rng),
    ("virtio-blk", virtio_blk),
    ("vhost-user-fs", vhost_user_fs),
    ("vhost-vsock", vhost_vsock),
    ("virtio-net", virtio_net),
    ("virtio-9p", virtio_9p),
];

/// `NAME-pci` or `NAME-device` of a known family.
fn virtio_family(driver: &str) -> Option<(FamilyParser, bool)> {
    VIRTIO_FAMILIES.iter().find_map(|&(family, parse)| {
        let suffix = driver.strip_prefix(family)?;
        match suffix {
            "-pci" => Some((parse, true)),
            "-device" => Some((parse, false)),
            _ => None,
        }
    })
}

/// QEMU devices microvm.nix uses that skiff does not have yet, told apart
/// from unknown names so the error says "not yet" rather than "no such thing".
fn planned(driver: &str) -> bool {
    driver.starts_with("virtio-")
        || driver.starts_with("vhost-")
        || matches!(driver, "vfio-pci" | "pci-bridge" | "pcie-pci-bridge")
}

/// `-device [driver=]DRIVER[,id=ID][,prop=value...]`.
pub(super) fn parse_device(label: &str, arg: &str) -> Result<Device, CliError> {
    let err = |reason: String| CliError::Invalid { option: label.to_owned(), reason };
    if arg.starts_with('{') {
        return Err(err("JSON syntax is not supported".to_owned()));
    }
    let mut opts = QemuOpts::parse(label, arg, Some("driver"));
    let driver = opts.take("driver").ok_or_else(|| opts.missing("driver"))?;
    opts.relabel(format!("{label} {driver}"));
    let id = opts.take_id()?;
    let config = match driver.as_str() {
        // QEMU's i8042 properties (kbd-throttle, ...) are not modelled.
        "i8042" => DeviceConfig::I8042,
        "isa-debug-exit" => isa_debug_exit(&mut opts)?,
        "pcie-root-port" => root_port(&mut opts, id.clone())?,
        d => match virtio_family(d) {
            Some((family, pci)) => virtio(&mut opts, id.clone(), (d, family, pci))?,
            None if planned(d) => return Err(err(format!("'{driver}' is not supported yet"))),
            None => return Err(err(format!("unknown device '{driver}'"))),
        },
    };
    opts.finish()?;
    Ok(Device { config, id })
}

/// A virtio device on either transport: the transport's properties, then
/// the family's.
fn virtio(
    opts: &mut QemuOpts,
    id: Option<String>,
    (driver, family, pci): (&str, FamilyParser, bool),
) -> Result<DeviceConfig, CliError> {
    let transport = if pci {
        let slot = pci_slot(opts, driver)?;
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
        VirtioTransport::Pci(slot)
    } else {
        VirtioTransport::Mmio
    };
    let kind = family(opts)?;
    Ok(DeviceConfig::Virtio(VirtioConfig { id, transport, kind }))
}

/// `isa-debug-exit[,iobase=PORT][,iosize=N]`: a guest write of V to the port
/// ends the VM with status (V << 1) | 1.
fn isa_debug_exit(opts: &mut QemuOpts) -> Result<DeviceConfig, CliError> {
    let iobase = opts.take_uint("iobase")?.unwrap_or(DEBUG_EXIT_IOBASE);
    let iosize = opts.take_uint("iosize")?.unwrap_or(DEBUG_EXIT_IOSIZE);
    if iosize == 0 {
        return Err(opts.error("iosize must be at least 1"));
    }
    let ports =
        || opts.error(format!("ports {iobase:#x}+{iosize:#x} do not fit in the 64 KiB I/O space"));
    let end = iobase.checked_add(iosize).ok_or_else(ports)?;
    if end > 0x1_0000 {
        return Err(ports());
    }
    Ok(DeviceConfig::IsaDebugExit {
        iobase: u16::try_from(iobase).map_err(|_| ports())?,
        iosize: u16::try_from(iosize).map_err(|_| ports())?,
    })
}

/// `virtio-rng-*[,max-bytes=N][,period=MS]` (QEMU's rate limit).
fn virtio_rng(opts: &mut QemuOpts) -> Result<VirtioKind, CliError> {
    let max_bytes = opts.take_uint("max-bytes")?;
    if max_bytes.is_some_and(|m| m > i64::MAX as u64) {
        // QEMU's virtio_rng_device_realize.
        return Err(opts.error("'max-bytes' parameter must be non-negative, and less than 2^63"));
    }
    let period_ms = opts.take_uint("period")?;
    if period_ms == Some(0) {
        return Err(opts.error("period must be at least 1 ms"));
    }
    // QEMU takes the entropy source from an rng object; only the default
    // (the host's getrandom) exists here.
    if opts.contains("rng") {
        return Err(opts.error("rng= is not supported (entropy comes from the host's getrandom)"));
    }
    Ok(VirtioKind::Rng { max_bytes, period_ms })
}

/// `virtio-blk-*,drive=ID[,serial=S][,num-queues=N][,queue-size=N]
/// [,logical_block_size=N][,physical_block_size=N][,bootindex=N]`.
fn virtio_blk(opts: &mut QemuOpts) -> Result<VirtioKind, CliError> {
    let drive = opts.take("drive").ok_or_else(|| opts.missing("drive"))?;
    let serial = opts.take("serial");
    let num_queues = match opts.take_uint("num-queues")? {
        None => None,
        Some(n @ 1..=256) => Some(n as u16),
        Some(n) => return Err(opts.error(format!("num-queues={n}: must be 1 to 256"))),
    };
    let queue_size = opts.take_uint("queue-size")?.unwrap_or(256);
    if !queue_size.is_power_of_two() || !(4..=1024).contains(&queue_size) {
        // QEMU: "queue-size property must be > 2 and <= 1024, and a power of 2".
        return Err(
            opts.error(format!("queue-size={queue_size}: must be a power of 2 from 4 to 1024"))
        );
    }
    let logical = opts.take_size("logical_block_size")?.unwrap_or(512);
    let physical = opts.take_size("physical_block_size")?.unwrap_or(logical);
    for (key, v) in [("logical_block_size", logical), ("physical_block_size", physical)] {
        if !v.is_power_of_two() || !(512..=32768).contains(&v) {
            return Err(opts.error(format!("{key}={v}: must be a power of 2 from 512 to 32768")));
        }
    }
    if physical < logical {
        return Err(opts.error("physical_block_size must be at least logical_block_size"));
    }
    // There is no firmware to boot from a disk: accepted, no effect.
    opts.take_uint("bootindex")?;
    Ok(VirtioKind::Block(BlockConfig {
        drive,
        serial,
        num_queues,
        queue_size: queue_size as u16,
        logical_block_size: logical as u32,
        physical_block_size: physical as u32,
    }))
}

/// `vhost-user-fs-*,chardev=ID,tag=TAG[,queue-size=N][,num-request-queues=N]`
/// with QEMU's defaults and limits (hw/virtio/vhost-user-fs.c).
fn vhost_user_fs(opts: &mut QemuOpts) -> Result<VirtioKind, CliError> {
    let chardev = opts.take("chardev").ok_or_else(|| opts.missing("chardev"))?;
    let tag = opts.take("tag").ok_or_else(|| opts.missing("tag"))?;
    if tag.is_empty() {
        return Err(opts.error("tag property must not be empty"));
    }
    if tag.len() > devices::vhost_user::fs::TAG_LEN {
        return Err(opts.error(format!(
            "tag property must be {} bytes or less (is {})",
            devices::vhost_user::fs::TAG_LEN,
            tag.len()
        )));
    }
    let num_request_queues = match opts.take_uint("num-request-queues")?.unwrap_or(1) {
        n @ 1..=1022 => n as u16,
        0 => return Err(opts.error("num-request-queues property must be larger than 0")),
        n => return Err(opts.error(format!("num-request-queues={n}: at most 1022"))),
    };
    let queue_size = opts.take_uint("queue-size")?.unwrap_or(128);
    if !queue_size.is_power_of_two() || !(2..=1024).contains(&queue_size) {
        return Err(
            opts.error(format!("queue-size={queue_size}: must be a power of 2 from 2 to 1024"))
        );
    }
    Ok(VirtioKind::Fs(FsConfig { chardev, tag, queue_size: queue_size as u16, num_request_queues }))
}

/// `vhost-vsock-*,guest-cid=N`, QEMU's limits (hw/virtio/vhost-vsock.c).
fn vhost_vsock(opts: &mut QemuOpts) -> Result<VirtioKind, CliError> {
    let cid = opts.take_uint("guest-cid")?.ok_or_else(|| opts.missing("guest-cid"))?;
    if cid <= 2 {
        return Err(opts.error("guest-cid property must be greater than 2"));
    }
    let guest_cid =
        u32::try_from(cid).map_err(|_| opts.error("guest-cid property must be a 32-bit number"))?;
    if opts.contains("vhostfd") {
        return Err(opts.error("vhostfd= is not supported (skiff opens /dev/vhost-vsock)"));
    }
    Ok(VirtioKind::Vsock { guest_cid })
}

/// `virtio-net-*,netdev=ID[,mac=MAC][,mq=on|off]`.
fn virtio_net(opts: &mut QemuOpts) -> Result<VirtioKind, CliError> {
    let netdev = opts
        .take("netdev")
        .ok_or_else(|| opts.error("netdev= is required (skiff has no NIC without a host side)"))?;
    let mac = opts.take("mac").map(|m| super::netdev::parse_mac(opts, "mac", m)).transpose()?;
    let mq = opts.take_bool("mq")?.unwrap_or(false);
    Ok(VirtioKind::Net(NetConfig { netdev, mac, mq }))
}

/// `virtio-9p-*,fsdev=ID,mount_tag=TAG`.
fn virtio_9p(opts: &mut QemuOpts) -> Result<VirtioKind, CliError> {
    let fsdev = opts.take("fsdev").ok_or_else(|| opts.missing("fsdev"))?;
    let mount_tag = opts.take("mount_tag").ok_or_else(|| opts.missing("mount_tag"))?;
    super::fsdev::check_tag(opts, &mount_tag)?;
    Ok(VirtioKind::P9(P9Config { fsdev, mount_tag }))
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

/// `pcie-root-port[,chassis=N][,slot=N][,port=N]` and its placement.
fn root_port(opts: &mut QemuOpts, id: Option<String>) -> Result<DeviceConfig, CliError> {
    let pci = pci_slot(opts, "pcie-root-port")?;
    let chassis = opts.take_uint("chassis")?.unwrap_or(0);
    let slot = opts.take_uint("slot")?.unwrap_or(0);
    let port = opts.take_uint("port")?.unwrap_or(0);
    Ok(DeviceConfig::RootPort(RootPortConfig {
        id,
        pci,
        chassis: u8::try_from(chassis).map_err(|_| opts.error("chassis must be 0..255"))?,
        slot: u16::try_from(slot).map_err(|_| opts.error("slot must be 0..65535"))?,
        port: u8::try_from(port).map_err(|_| opts.error("port must be 0..255"))?,
    }))
}

/// `-smbios type=1,field=value...`; several merge, later fields winning.
pub(super) fn parse_smbios(
    label: &str,
    arg: &str,
    smbios: &mut Option<SmbiosType1>,
) -> Result<(), CliError> {
    let mut opts = QemuOpts::parse(label, arg, None);
    if opts.contains("file") {
        return Err(opts.error("file= is not supported (only type=1)"));
    }
    let ty = opts.take_uint("type")?.ok_or_else(|| opts.missing("type"))?;
    if ty != 1 {
        return Err(opts.error(format!("type={ty} is not supported (only type=1)")));
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

    fn device(arg: &str) -> Result<Device, String> {
        parse_device("-device", arg).map_err(|e| e.to_string())
    }

    fn debug_exit(iobase: u16, iosize: u16) -> DeviceConfig {
        DeviceConfig::IsaDebugExit { iobase, iosize }
    }

    #[test]
    fn devices() {
        assert_eq!(device("i8042"), Ok(Device { config: DeviceConfig::I8042, id: None }));
        assert_eq!(
            device("driver=i8042,id=kbd"),
            Ok(Device { config: DeviceConfig::I8042, id: Some("kbd".into()) })
        );
        assert_eq!(device("isa-debug-exit").unwrap().config, debug_exit(0x501, 2));
        assert_eq!(
            device("isa-debug-exit,iobase=0xf4,iosize=0x04").unwrap().config,
            debug_exit(0xf4, 4)
        );
        assert_eq!(
            device("isa-debug-exit,iobase=244,iosize=1,id=exit").unwrap().config,
            debug_exit(0xf4, 1)
        );
        assert_eq!(device("isa-debug-exit,iobase=0xfffe").unwrap().config, debug_exit(0xfffe, 2));
    }

    /// microvm.nix's virtiofs share, on both transports, with QEMU's
    /// defaults (one request queue of 128).
    #[test]
    fn vhost_user_fs() {
        let fs = |chardev: &str, tag: &str, queue_size, num_request_queues| {
            VirtioKind::Fs(FsConfig {
                chardev: chardev.into(),
                tag: tag.into(),
                queue_size,
                num_request_queues,
            })
        };
        let d = device("vhost-user-fs-pci,chardev=fs0,tag=ro-store").unwrap();
        let DeviceConfig::Virtio(v) = d.config else { panic!("{d:?}") };
        assert_eq!(v.kind, fs("fs0", "ro-store", 128, 1));
        assert_eq!(v.driver(), "vhost-user-fs-pci");
        let d = device(
            "vhost-user-fs-device,id=f,chardev=c,tag=data,queue-size=1024,num-request-queues=2",
        )
        .unwrap();
        let DeviceConfig::Virtio(v) = d.config else { panic!("{d:?}") };
        assert_eq!((v.transport, v.kind), (VirtioTransport::Mmio, fs("c", "data", 1024, 2)));
        assert_eq!(d.id.as_deref(), Some("f"));
        let tag36 = "t".repeat(36);
        assert!(device(&format!("vhost-user-fs-pci,chardev=c,tag={tag36},addr=2.0")).is_ok());
    }

    #[test]
    fn vhost_vsock() {
        let d = device("vhost-vsock-pci,guest-cid=3,id=v").unwrap();
        let DeviceConfig::Virtio(v) = d.config else { panic!("{d:?}") };
        assert_eq!(v.kind, VirtioKind::Vsock { guest_cid: 3 });
        let d = device("vhost-vsock-device,guest-cid=4294967295").unwrap();
        let DeviceConfig::Virtio(v) = d.config else { panic!("{d:?}") };
        assert_eq!(
            (v.transport, v.kind),
            (VirtioTransport::Mmio, VirtioKind::Vsock { guest_cid: u32::MAX })
        );
        let err = |arg: &str| device(arg).unwrap_err();
        assert_eq!(err("vhost-vsock-pci"), "-device vhost-vsock-pci: missing property 'guest-cid'");
        assert!(err("vhost-vsock-pci,guest-cid=2").contains("greater than 2"));
        assert!(err("vhost-vsock-pci,guest-cid=4294967296").contains("32-bit"));
        assert!(err("vhost-vsock-pci,guest-cid=3,vhostfd=5").contains("vhostfd"));
    }

    #[test]
    fn device_errors() {
        let err = |arg: &str| device(arg).unwrap_err();
        assert_eq!(err("e1000"), "-device: unknown device 'e1000'");
        assert_eq!(err(""), "-device: missing property 'driver'");
        assert_eq!(err("id=x"), "-device: missing property 'driver'");
        assert_eq!(err("virtio-9p-pci"), "-device virtio-9p-pci: missing property 'fsdev'");
        for driver in
            ["vhost-user-blk-pci", "vfio-pci", "virtio-balloon-pci", "virtio-balloon-device"]
        {
            assert_eq!(err(driver), format!("-device: '{driver}' is not supported yet"));
        }
        assert_eq!(err("i8042,foo=1"), "-device i8042: unknown property 'foo'");
        let fs = "vhost-user-fs-pci,chardev=c";
        assert_eq!(err(fs), "-device vhost-user-fs-pci: missing property 'tag'");
        assert_eq!(
            err("vhost-user-fs-device,tag=t"),
            "-device vhost-user-fs-device: missing property 'chardev'"
        );
        assert!(err(&format!("{fs},tag=")).contains("tag property must not be empty"));
        assert!(err(&format!("{fs},tag={}", "t".repeat(37))).contains("36 bytes or less"));
        assert!(err(&format!("{fs},tag=t,num-request-queues=0")).contains("larger than 0"));
        assert!(err(&format!("{fs},tag=t,queue-size=100")).contains("power of 2"));
        assert!(err(&format!("{fs},tag=t,queue-size=2048")).contains("power of 2"));
        assert_eq!(
            err(&format!("{fs},tag=t,cache-size=2G")),
            "-device vhost-user-fs-pci: unknown property 'cache-size'"
        );
        assert_eq!(err("isa-debug-exit,foo"), "-device isa-debug-exit: unknown property 'foo'");
        assert!(err("isa-debug-exit,iobase=zz")
            .starts_with("-device isa-debug-exit: invalid value 'zz' for 'iobase'"));
        assert!(err("isa-debug-exit,iosize=-1").contains("'iosize'"));
        assert_eq!(
            err("isa-debug-exit,iosize=0"),
            "-device isa-debug-exit: iosize must be at least 1"
        );
        assert!(err("isa-debug-exit,iobase=0xffff").contains("do not fit"));
        assert!(err("isa-debug-exit,iobase=0x10000").contains("do not fit"));
        assert!(err("isa-debug-exit,iobase=0,iosize=0x10000").contains("do not fit"));
        assert!(err("isa-debug-exit,iobase=0xffffffffffffffff").contains("do not fit"));
        assert!(err("i8042,id=1").starts_with("-device i8042: invalid value '1' for 'id'"));
        assert_eq!(err("{\"driver\":\"i8042\"}"), "-device: JSON syntax is not supported");
    }

    fn smbios(args: &[&str]) -> Result<Option<SmbiosType1>, String> {
        let mut table = None;
        for arg in args {
            parse_smbios("-smbios", arg, &mut table).map_err(|e| e.to_string())?;
        }
        Ok(table)
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
        assert_eq!(err("type=0"), "-smbios: type=0 is not supported (only type=1)");
        assert_eq!(err("type=17,size=1"), "-smbios: type=17 is not supported (only type=1)");
        assert_eq!(err("manufacturer=x"), "-smbios: missing property 'type'");
        assert_eq!(err("file=/tmp/t"), "-smbios: file= is not supported (only type=1)");
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
