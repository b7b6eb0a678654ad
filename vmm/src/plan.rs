//! The machine, decided once from the configuration before any VM exists:
//! which platform devices there are, where every `-device` sits (its PCI
//! address, or its virtio-mmio window and GSI), what the e820 map reserves
//! and what each device writes about itself into the DSDT. A conflict (two
//! devices on one PCI address, too many virtio-mmio devices) fails here, at
//! once, before a guest starts. Every run of the guest uses the same plan.

use boot::layout::*;
use pci::{allocate, BarWindows, DeviceRequest, Window};

use crate::config::VmConfig;
use crate::kinds::Bus;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// QEMU: "No 'PCI' bus found for device".
    #[error("-device {0}: no PCI bus for the device (use -M microvm,pcie=on, or no -M type: the default machine has PCIe)")]
    NoPciBus(String),
    #[error("-device")]
    Placement(#[source] pci::AllocError),
    #[error("-device {driver}: at most {max} virtio-mmio devices{why}")]
    TooManyVirtioMmio { driver: String, max: usize, why: &'static str },
    #[error(
        "{what}: {len:#x} bytes of guest RAM below 4 GiB do not fit (RAM ends at {ram_end:#x})"
    )]
    NoRoomForData { what: String, len: u64, ram_end: u64 },
    #[error("-device {driver}: cannot describe it in ACPI")]
    Aml {
        driver: String,
        #[source]
        source: devices::virtio::mmio::AmlError,
    },
}

/// Platform decisions derived from the configuration once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Platform {
    pub acpi: bool,
    pub pcie: bool,
    pub pic: bool,
    pub pit: bool,
    pub rtc: bool,
    pub i8042: bool,
    /// COM1 exists (a `-serial` backend, or the default one).
    pub serial: bool,
}

/// Whether the machine has ACPI (and so the GED).
fn acpi(m: &crate::config::MachineConfig) -> bool {
    m.acpi.resolve(true)
}

fn rtc(m: &crate::config::MachineConfig) -> bool {
    m.has_rtc()
}

/// The devices the machine adds itself (`-device` names of machine-only
/// kinds): the CMOS RTC with `rtc=on`, the ACPI GED (power button, reset)
/// with ACPI. They go through the registry like the argv's, after them.
pub fn machine_devices(m: &crate::config::MachineConfig) -> Vec<&'static str> {
    let mut devices = Vec::new();
    if rtc(m) {
        devices.push("mc146818rtc");
    }
    if acpi(m) {
        devices.push("acpi-ged");
    }
    // QEMU microvm always has one: systemd's credentials come through it.
    devices.push("fw_cfg_io");
    devices
}

impl Platform {
    fn new(cfg: &VmConfig, serial: bool) -> Self {
        let m = &cfg.machine;
        Platform {
            acpi: acpi(m),
            pcie: m.has_pcie(),
            pic: m.pic.resolve(true),
            pit: m.pit.resolve(true),
            rtc: rtc(m),
            i8042: cfg.devices.iter().any(|d| d.device.facts().i8042),
            serial,
        }
    }
}

/// Where one `-device` goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// At its own ports or addresses (i8042, isa-debug-exit, the RTC,
    /// the GED).
    Fixed,
    /// A virtio-mmio window (`index` is its `VRnn` name).
    VirtioMmio { index: usize, base: u64, gsi: u32 },
    /// On the root complex, where the allocator put it.
    Pci(pci::Placement),
}

/// Guest RAM a device writes into before the guest runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataRange {
    pub addr: u64,
    pub len: u64,
    /// What it holds, for errors and the trace (`OpRegion`).
    pub what: &'static str,
}

/// What a device's host side asks the plan to set aside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataRequest {
    pub len: u64,
    pub align: u64,
    pub what: &'static str,
}

/// The root complex: its windows and the buses the allocator gave out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciePlan {
    pub windows: BarWindows,
    pub last_bus: u8,
}

#[derive(Debug)]
pub struct MachinePlan {
    pub platform: Platform,
    /// One per `VmConfig::devices` entry, in the same order.
    pub locations: Vec<Location>,
    pub pcie: Option<PciePlan>,
    /// Ranges the e820 map reserves (carved out of RAM where they overlap).
    pub reserved: Vec<(u64, u64)>,
    /// Guest RAM set aside for what devices write before the guest runs
    /// (an IGD's OpRegion, its stolen memory), by `VmConfig::devices`
    /// index: reserved in e820 too, so the guest and the tables agree.
    pub data: Vec<Vec<DataRange>>,
    /// Where the next carve ends: RAM below it is the guest's.
    low_ram_top: u64,
    /// The DSDT's devices, each one's own AML.
    pub dsdt: Vec<u8>,
}

impl MachinePlan {
    /// `serial`: whether COM1 exists; `phys_bits`: the guest-physical
    /// address width, which sizes the 64-bit PCI window.
    pub fn new(cfg: &VmConfig, serial: bool, phys_bits: u8) -> Result<Self, PlanError> {
        let platform = Platform::new(cfg, serial);
        let mut locations = vec![Location::Fixed; cfg.devices.len()];

        let pci: Vec<(usize, DeviceRequest)> = cfg
            .devices
            .iter()
            .enumerate()
            .filter(|(_, d)| d.bus.is_pci())
            .map(|(i, d)| {
                let request = DeviceRequest {
                    driver: d.driver.to_owned(),
                    id: d.id.clone(),
                    bus: d.pci.bus.clone(),
                    addr: d.pci.addr,
                    multifunction: d.pci.multifunction,
                    is_root_port: d.device.facts().root_port,
                };
                (i, request)
            })
            .collect();
        let mut pcie = None;
        if let Some((_, first)) = pci.first() {
            if !platform.pcie {
                return Err(PlanError::NoPciBus(first.driver.clone()));
            }
        }
        if platform.pcie {
            let requests: Vec<DeviceRequest> = pci.iter().map(|(_, r)| r.clone()).collect();
            let placements = allocate(&requests, &[]).map_err(PlanError::Placement)?;
            let last_bus = placements
                .iter()
                .map(|p| p.secondary_bus.unwrap_or(0).max(p.address.bus))
                .max()
                .unwrap_or(0);
            for ((i, _), p) in pci.iter().zip(placements) {
                locations[*i] = Location::Pci(p);
            }
            let mmio32 = Window { base: PCIE_MMIO_BASE, size: PCIE_MMIO_SIZE };
            let mmio64 = pcie_mmio64_window(phys_bits).map(|(base, size)| Window { base, size });
            pcie = Some(PciePlan { windows: BarWindows { mmio32, mmio64 }, last_bus });
        }

        // virtio-mmio slots in command-line order, each with its GSI.
        let mmio = cfg.devices.iter().enumerate().filter(|(_, d)| d.bus == Bus::VirtioMmio);
        for (index, (i, d)) in mmio.enumerate() {
            let gsi = virtio_mmio_gsi(&platform, index).ok_or_else(|| {
                let (max, why) = virtio_mmio_limit(&platform);
                PlanError::TooManyVirtioMmio { driver: d.driver.to_owned(), max, why }
            })?;
            let base = VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SLOT_SIZE;
            locations[i] = Location::VirtioMmio { index, base, gsi };
        }

        // ECAM is reserved as firmware reserves MMCONFIG, so the guest
        // trusts the MCFG entry; BAR windows are not RAM and need no entry.
        let mut reserved = Vec::new();
        if pcie.is_some() {
            reserved.push((PCIE_ECAM_BASE, PCIE_ECAM_SIZE));
        }
        reserved.push((GED_MMIO_BASE, VIRTIO_MMIO_BASE + 0x10_0000 - GED_MMIO_BASE));

        let mut plan = MachinePlan {
            platform,
            locations,
            pcie,
            reserved,
            data: (0..cfg.devices.len()).map(|_| Vec::new()).collect(),
            low_ram_top: cfg.mem_size.min(MAX_BELOW_4G),
            dsdt: Vec::new(),
        };
        if platform.acpi {
            plan.dsdt = plan.dsdt_devices(cfg)?;
        }
        Ok(plan)
    }

    /// Sets aside what each device's host side asks for (known once it is
    /// open: a region's size, a register's value), from the top of RAM
    /// below 4 GiB down, each range aligned as asked.
    pub fn carve_device_data(
        &mut self,
        cfg: &VmConfig,
        backends: &crate::backends::Backends,
    ) -> Result<(), PlanError> {
        for (i, d) in cfg.devices.iter().enumerate() {
            let asks = backends.device(i).map(|b| b.guest_data()).unwrap_or_default();
            for ask in asks {
                let what = format!("-device {}: {}", d.driver, ask.what);
                let addr = self.carve(&what, ask.len, ask.align)?;
                self.data[i].push(DataRange { addr, len: ask.len, what: ask.what });
            }
        }
        Ok(())
    }

    /// `len` bytes of RAM below 4 GiB at a multiple of `align` (a power of
    /// two), reserved in e820.
    fn carve(&mut self, what: &str, len: u64, align: u64) -> Result<u64, PlanError> {
        let no_room =
            || PlanError::NoRoomForData { what: what.to_owned(), len, ram_end: self.low_ram_top };
        let addr = self.low_ram_top.checked_sub(len).ok_or_else(no_room)? & !(align.max(4096) - 1);
        // Keep the low megabyte and the first 16 MiB (kernel) clear.
        if addr < 16 << 20 || len == 0 {
            return Err(no_room());
        }
        self.low_ram_top = addr;
        self.reserved.push((addr, len));
        Ok(addr)
    }

    /// What each device says about itself in the DSDT, in a fixed order.
    fn dsdt_devices(&self, cfg: &VmConfig) -> Result<Vec<u8>, PlanError> {
        let p = &self.platform;
        let mut aml = Vec::new();
        if p.serial {
            aml.extend(devices::legacy::serial::aml(COM1_PORT, COM1_IRQ));
        }
        for d in cfg.devices.iter().filter(|d| d.bus == Bus::Fixed) {
            aml.extend(d.device.aml());
        }
        for (d, at) in cfg.devices.iter().zip(&self.locations) {
            if let Location::VirtioMmio { index, base, gsi } = *at {
                let bytes = devices::virtio::mmio::aml(index, base, gsi)
                    .map_err(|source| PlanError::Aml { driver: d.driver.to_owned(), source })?;
                aml.extend(bytes);
            }
        }
        if let Some(pcie) = &self.pcie {
            aml.extend(pci::acpi::aml(&self.root_complex_aml(pcie)));
        }
        Ok(aml)
    }

    pub fn root_complex_aml(&self, pcie: &PciePlan) -> pci::acpi::RootComplexAml {
        let w = pcie.windows;
        pci::acpi::RootComplexAml {
            ecam_base: PCIE_ECAM_BASE,
            ecam_size: PCIE_ECAM_SIZE,
            last_bus: pcie.last_bus,
            mmio32: (w.mmio32.base, w.mmio32.size),
            mmio64: w.mmio64.map(|m| (m.base, m.size)),
            intx_gsi_base: PCIE_INTX_GSI_BASE,
        }
    }

    /// QEMU's auto-kernel-cmdline: without ACPI the guest learns of its
    /// virtio-mmio devices from the command line.
    pub fn virtio_mmio_cmdline(&self) -> String {
        let mut hints = String::new();
        for at in &self.locations {
            if let Location::VirtioMmio { base, gsi, .. } = at {
                let size = devices::virtio::MMIO_WINDOW_SIZE;
                hints.push_str(&format!(" virtio_mmio.device={size}@{base:#x}:{gsi}"));
            }
        }
        hints
    }
}

/// The GSI of virtio-mmio slot `index`: an ISA IRQ without ACPI (a kernel
/// without MP-table support reaches only the 8259's lines); with ACPI an
/// IOAPIC pin from 16, or from 20 with PCIe, whose INTx lines are 16-19.
fn virtio_mmio_gsi(p: &Platform, index: usize) -> Option<u32> {
    if !p.acpi {
        return VIRTIO_MMIO_ISA_IRQS.get(index).copied();
    }
    let (first, max) = if p.pcie {
        (VIRTIO_MMIO_GSI_BASE + 4, VIRTIO_MMIO_MAX - 4)
    } else {
        (VIRTIO_MMIO_GSI_BASE, VIRTIO_MMIO_MAX)
    };
    (index < max).then(|| first + index as u32)
}

fn virtio_mmio_limit(p: &Platform) -> (usize, &'static str) {
    match (p.acpi, p.pcie) {
        (false, _) => (VIRTIO_MMIO_ISA_IRQS.len(), " without ACPI (free ISA IRQs)"),
        (true, true) => (VIRTIO_MMIO_MAX - 4, " with pcie=on (the others are PCI INTx lines)"),
        (true, false) => (VIRTIO_MMIO_MAX, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{parse, Action};

    fn cfg(args: &[&str]) -> VmConfig {
        let mut all = vec!["-M", "microvm,pcie=on"];
        all.extend_from_slice(args);
        match parse(all.iter().map(|s| s.to_string())) {
            Ok(Action::Run(c)) => *c,
            other => panic!("{other:?}"),
        }
    }

    fn place(cfg: &VmConfig) -> Result<Vec<pci::Placement>, String> {
        let plan = MachinePlan::new(cfg, true, 40).map_err(|e| crate::error_chain(&e))?;
        Ok(plan
            .locations
            .iter()
            .filter_map(|l| match l {
                Location::Pci(p) => Some(*p),
                _ => None,
            })
            .collect())
    }

    fn slots(cfg: &VmConfig) -> Vec<String> {
        place(cfg).unwrap().iter().map(|p| p.address.to_string()).collect()
    }

    #[test]
    fn explicit_address_wins_whatever_the_order() {
        let a = cfg(&["-device", "virtio-rng-pci", "-device", "virtio-rng-pci,id=late,addr=1.0"]);
        let b = cfg(&["-device", "virtio-rng-pci,id=late,addr=1.0", "-device", "virtio-rng-pci"]);
        assert_eq!(slots(&a), vec!["00:02.0", "00:01.0"]);
        assert_eq!(slots(&b), vec!["00:01.0", "00:02.0"]);
    }

    #[test]
    fn two_devices_on_one_address_name_both() {
        let c = cfg(&[
            "-device",
            "virtio-rng-pci,id=a,addr=2.0",
            "-device",
            "virtio-rng-pci,id=b,addr=2",
        ]);
        let e = place(&c).unwrap_err();
        assert!(e.contains("slot 2 function 0 not available"), "{e}");
        assert!(e.contains("id=a") && e.contains("id=b"), "{e}");
    }

    #[test]
    fn root_port_bus_and_pcie_off() {
        let c = cfg(&[
            "-device",
            "pcie-root-port,id=rp0,chassis=1,slot=1",
            "-device",
            "virtio-rng-pci,bus=rp0",
        ]);
        assert_eq!(slots(&c), vec!["00:01.0", "01:00.0"]);
        let e = place(&cfg(&["-device", "virtio-rng-pci,bus=nope"])).unwrap_err();
        assert!(e.contains("nope"), "{e}");
        let argv = ["-M", "microvm", "-device", "virtio-rng-pci"].map(String::from);
        let off = match parse(argv) {
            Ok(Action::Run(c)) => *c,
            other => panic!("{other:?}"),
        };
        assert!(place(&off).unwrap_err().contains("pcie=on"));
    }

    /// Device data comes off the top of RAM below 4 GiB, aligned, each
    /// range reserved; what does not fit is refused by name.
    #[test]
    fn device_data_is_carved_from_the_top_of_low_ram_and_reserved() {
        let c = cfg(&["-m", "512M", "-device", "virtio-rng-pci"]);
        let mut plan = MachinePlan::new(&c, true, 40).unwrap();
        let top = 512 << 20;
        let a = plan.carve("OpRegion", 0x2000, 0x1000).unwrap();
        assert_eq!(a, top - 0x2000);
        let b = plan.carve("stolen memory", 64 << 20, 1 << 20).unwrap();
        assert_eq!(b, (top - 0x2000 - (64 << 20)) & !((1 << 20) - 1));
        assert!(plan.reserved.contains(&(a, 0x2000)) && plan.reserved.contains(&(b, 64 << 20)));
        let e = plan.carve("huge", 512 << 20, 0x1000).unwrap_err().to_string();
        assert!(e.starts_with("huge: 0x20000000 bytes of guest RAM below 4 GiB do not fit"), "{e}");
    }

    /// virtio-mmio windows and GSIs in command-line order, moved past the
    /// PCI INTx lines with pcie=on; the e820 map reserves ECAM; the DSDT
    /// has each device once.
    #[test]
    fn virtio_mmio_slots_gsis_and_acpi() {
        let c = cfg(&[
            "-device",
            "virtio-rng-device",
            "-device",
            "virtio-rng-pci",
            "-device",
            "virtio-rng-device,id=second",
        ]);
        let plan = MachinePlan::new(&c, true, 40).unwrap();
        let mmio: Vec<_> = plan
            .locations
            .iter()
            .filter_map(|l| match *l {
                Location::VirtioMmio { base, gsi, .. } => Some((base, gsi)),
                _ => None,
            })
            .collect();
        assert_eq!(mmio, [(0xfeb0_0000, 20), (0xfeb0_0200, 21)]);
        assert!(plan.reserved.contains(&(PCIE_ECAM_BASE, PCIE_ECAM_SIZE)));
        let has = |name: &[u8]| plan.dsdt.windows(name.len()).any(|w| w == name);
        assert!(has(b"VR00") && has(b"VR01") && !has(b"VR02"));
        assert!(has(b"PCI0") && has(b"COM1") && has(b"GED_") && !has(b"KBD_"));

        let five = ["-device", "virtio-rng-device"].repeat(5);
        let e = MachinePlan::new(&cfg(&five), true, 40).unwrap_err().to_string();
        assert!(e.contains("at most 4 virtio-mmio devices with pcie=on"), "{e}");
        let mut noacpi = vec!["-M", "microvm,acpi=off"];
        noacpi.extend(["-device", "virtio-rng-device"]);
        let c = match parse(noacpi.iter().map(|s| s.to_string())) {
            Ok(Action::Run(c)) => *c,
            other => panic!("{other:?}"),
        };
        let plan = MachinePlan::new(&c, true, 40).unwrap();
        assert_eq!(plan.virtio_mmio_cmdline(), " virtio_mmio.device=512@0xfeb00000:5");
        assert!(plan.dsdt.is_empty());
    }
}
