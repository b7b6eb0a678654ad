//! QEMU's fw_cfg at ports 0x510–0x51b (`fw_cfg_io`, DMA on): the machine
//! adds it (`plan::machine_devices`), as QEMU microvm always has one, with
//! the items QEMU gives it there that mean something without firmware and
//! the `-fw_cfg` files, read once when skiff starts.

use std::sync::{Arc, Mutex};

use devices::legacy::fw_cfg::{self, FwCfg, FwCfgItems, FW_CFG_PORT, FW_CFG_PORT_LEN};

use super::{Built, Bus, Device, Driver, HostSide, MachineOnly, OpenContext, OpenError};
use super::{RunContext, Sandbox};
use crate::config::{FwCfgContent, VmConfig};

/// QEMU's keys (`include/standard-headers/linux/qemu_fw_cfg.h`).
const KEY_UUID: u16 = 0x02;
const KEY_RAM_SIZE: u16 = 0x03;
const KEY_NOGRAPHIC: u16 = 0x04;
const KEY_NB_CPUS: u16 = 0x05;
const KEY_BOOT_MENU: u16 = 0x0e;
const KEY_MAX_CPUS: u16 = 0x0f;
/// `FW_CFG_ARCH_LOCAL + 2`: the PIT's IRQ 0 is routed to the IOAPIC's pin 2.
const KEY_IRQ0_OVERRIDE: u16 = 0x8002;

pub static KIND: MachineOnly = MachineOnly {
    drivers: &[Driver { name: "fw_cfg_io", bus: Bus::Fixed }],
    device: || Box::new(FirmwareConfig),
};

#[derive(Debug, PartialEq, Eq)]
pub struct FirmwareConfig;

impl Device for FirmwareConfig {
    fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn HostSide>, OpenError> {
        Ok(Box::new(Items(Arc::new(items(ctx.cfg)?))))
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox::default()
    }
    fn aml(&self) -> Vec<u8> {
        fw_cfg::aml()
    }
}

/// What the guest reads: QEMU microvm's standard items and the files.
fn items(cfg: &VmConfig) -> Result<FwCfgItems, OpenError> {
    let mut items = FwCfgItems::new();
    let cpus = u16::try_from(cfg.smp.cpus).unwrap_or(u16::MAX);
    // The machine's UUID, in the text form's byte order as QEMU's; the
    // same one SMBIOS gives (QEMU's is all zeros unless -smbios or -uuid
    // sets it; skiff's machine always has one).
    items.add_item(KEY_UUID, crate::vm::machine_uuid(cfg).to_vec());
    items.add_item(KEY_NB_CPUS, cpus.to_le_bytes().to_vec());
    items.add_item(KEY_MAX_CPUS, cpus.to_le_bytes().to_vec());
    items.add_item(KEY_RAM_SIZE, cfg.mem_size.to_le_bytes().to_vec());
    items.add_item(KEY_NOGRAPHIC, u16::from(cfg.nographic).to_le_bytes().to_vec());
    items.add_item(KEY_BOOT_MENU, 0u16.to_le_bytes().to_vec());
    items.add_item(KEY_IRQ0_OVERRIDE, 1u32.to_le_bytes().to_vec());
    for f in &cfg.fw_cfg {
        let what = || format!("-fw_cfg name={}", f.name);
        let data = match &f.content {
            FwCfgContent::Text(s) => s.as_bytes().to_vec(),
            FwCfgContent::File(path) => std::fs::read(path).map_err(|e| {
                let e =
                    std::io::Error::new(e.kind(), format!("can't load {}: {e}", path.display()));
                OpenError::new(what(), e)
            })?,
        };
        items.add_file(&f.name, data).map_err(|e| OpenError::new(what(), e))?;
    }
    Ok(items)
}

struct Items(Arc<FwCfgItems>);

impl HostSide for Items {
    fn build(&self, run: &mut RunContext<'_>) -> crate::vm::Result<Built> {
        let dev = Arc::new(Mutex::new(FwCfg::new(self.0.clone(), run.mem.clone())));
        run.pio.insert(dev, u64::from(FW_CFG_PORT), u64::from(FW_CFG_PORT_LEN))?;
        Ok(Built::Placed)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use crate::cli::{parse, Action};

    use super::*;

    fn config(args: &[&str]) -> Result<VmConfig, String> {
        let mut argv = vec!["-kernel", "/k"];
        argv.extend_from_slice(args);
        match parse(argv) {
            Ok(Action::Run(cfg)) => Ok(*cfg),
            Ok(_) => Err("not a run".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// `-fw_cfg` as QEMU takes it, and its refusals.
    #[test]
    fn the_command_line() {
        let cfg = config(&[
            "-fw_cfg",
            "name=opt/io.systemd.credentials/a,file=/run/cred",
            "-fw_cfg",
            "opt/b,string=hello",
        ])
        .unwrap();
        assert_eq!(cfg.fw_cfg.len(), 2);
        assert_eq!(cfg.fw_cfg[0].content, FwCfgContent::File("/run/cred".into()));
        assert_eq!(cfg.fw_cfg[1].name, "opt/b", "the implied name=");
        assert_eq!(cfg.fw_cfg[1].content, FwCfgContent::Text("hello".into()));
        let err = |args: &[&str]| config(args).unwrap_err();
        assert!(err(&["-fw_cfg", "name=opt/a"]).contains("exactly one of file, string"));
        assert!(err(&["-fw_cfg", "name=opt/a,file=/x,string=y"]).contains("exactly one"));
        assert!(err(&["-fw_cfg", "file=/x"]).contains("'name'"));
        assert!(err(&["-fw_cfg", &format!("name=opt/{},string=x", "n".repeat(52))])
            .contains("name too long (max. 55 char)"));
        assert!(err(&["-fw_cfg", "name=opt/a,string=x", "-fw_cfg", "name=opt/a,file=/y"])
            .contains("duplicate fw_cfg file name: opt/a"));
        assert!(err(&["-fw_cfg", "name=opt/a,gen_id=x"]).contains("gen_id"));
        assert!(err(&["-fw_cfg", "name=opt/a,string=x,foo=1"]).contains("'foo'"));
        assert!(err(&["-device", "fw_cfg_io"]).contains("fw_cfg_io"));
    }

    /// Files are read when skiff starts (a later change is not seen), the
    /// bytes kept exactly; a missing file names itself.
    #[test]
    fn files_are_read_once_at_start() {
        let path = std::env::temp_dir().join(format!("skiff-fw-cfg-{}", std::process::id()));
        let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        std::fs::File::create(&path).unwrap().write_all(&bytes).unwrap();
        let arg = format!("name=opt/io.systemd.credentials/c,file={}", path.display());
        let uuid = "type=1,uuid=a67472e5-570e-5c8a-b18c-ae3c77701050";
        let cfg =
            config(&["-fw_cfg", &arg, "-fw_cfg", "opt/s,string=abc", "-smbios", uuid]).unwrap();
        let items = items(&cfg).unwrap();
        std::fs::write(&path, b"changed").unwrap();
        let mut want = FwCfgItems::new();
        // The text form's byte order, as QEMU's qemu_uuid.
        let uuid = [
            0xa6, 0x74, 0x72, 0xe5, 0x57, 0x0e, 0x5c, 0x8a, 0xb1, 0x8c, 0xae, 0x3c, 0x77, 0x70,
            0x10, 0x50,
        ];
        want.add_item(KEY_UUID, uuid.to_vec());
        want.add_item(KEY_NB_CPUS, 1u16.to_le_bytes().to_vec());
        want.add_item(KEY_MAX_CPUS, 1u16.to_le_bytes().to_vec());
        want.add_item(KEY_RAM_SIZE, cfg.mem_size.to_le_bytes().to_vec());
        want.add_item(KEY_NOGRAPHIC, 0u16.to_le_bytes().to_vec());
        want.add_item(KEY_BOOT_MENU, 0u16.to_le_bytes().to_vec());
        want.add_item(KEY_IRQ0_OVERRIDE, 1u32.to_le_bytes().to_vec());
        want.add_file("opt/io.systemd.credentials/c", bytes).unwrap();
        want.add_file("opt/s", b"abc".to_vec()).unwrap();
        assert!(items == want);
        std::fs::remove_file(&path).unwrap();
        let e = items_error(&cfg);
        assert!(
            e.contains("-fw_cfg name=opt/io.systemd.credentials/c") && e.contains("can't load")
        );
    }

    fn items_error(cfg: &VmConfig) -> String {
        match items(cfg) {
            Ok(_) => String::new(),
            Err(e) => format!(
                "{e}: {}",
                std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default()
            ),
        }
    }
}
