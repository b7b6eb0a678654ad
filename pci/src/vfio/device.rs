//! A host function as the guest sees it. What the model emulates, and why
//! (QEMU's `hw/vfio/pci.c` and the kernel's `vfio_pci_config.c` split the
//! same way):
//!
//! | config space | the guest sees | why |
//! |---|---|---|
//! | BARs 0x10–0x27 | skiff's shadow, sizes from VFIO's regions | the guest's addresses are guest-physical; the host's stay the host's |
//! | ROM BAR 0x30 | 0: no ROM | no firmware runs an option ROM on a direct boot |
//! | header type 0x0e bit 7 | `multifunction=` | the slot is skiff's, not the host's |
//! | MSI-X Message Control | skiff's emulation (table size from the host) | vectors are KVM routes and irqfds; the host's enable follows `SET_IRQS` |
//! | the MSI capability's registers | skiff's emulation (`crate::msi`; what the host offers: vectors, 64-bit, masking) | the same, one GSI per vector |
//! | everything else | the host, as the kernel virtualizes it (command, status, interrupt line/pin, capabilities, 0x100–0xFFF) | the kernel already filters what a guest may change |
//!
//! BAR accesses that reach skiff (everything not mapped into the guest)
//! go to the host region, except the MSI-X table and PBA: emulated.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::access::{VfioAccess, INTX_IRQ, MSIX_IRQ, MSI_IRQ};
use super::layout::HostLayout;
use crate::capability::{MsixCap, MsixControl};
use crate::config::{BarReprogram, ConfigError, ConfigParams, PciConfig, BAR0};
use crate::device::{DirectArea, PciDevice};
use crate::msi::{Msi, MsiChange};
use crate::msix::{MsiRouter, Msix};

const HEADER_DWORD: usize = 0x0c / 4;
const ROM_DWORD: usize = 0x30 / 4;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;

/// MSI-X as the guest drives it, over the host's vectors.
struct MsixState {
    /// Where the capability sits in config space.
    offset: usize,
    cap: MsixCap,
    table: Msix,
    /// One eventfd per vector, the host's (`SET_IRQS`) and the table's
    /// source for that vector alike.
    evts: Vec<EventFd>,
}

/// MSI as the guest drives it, over the host's vectors.
struct MsiState {
    msi: Msi,
    /// One eventfd per vector the function offers, as for MSI-X.
    evts: Vec<EventFd>,
}

/// Which interrupt the host function signals, through which eventfds: one
/// at a time (the kernel refuses a second type while one is on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HostIrq {
    Off,
    Intx,
    /// MSI with this many vectors.
    Msi(u32),
    Msix,
}

/// The GSIs the VMM set aside for the function: one per MSI-X vector and
/// one per MSI vector it offers.
#[derive(Debug, Default)]
pub struct Gsis {
    pub msix: Vec<u32>,
    pub msi: Vec<u32>,
}

pub struct VfioPciDevice<A: VfioAccess> {
    dev: Arc<A>,
    layout: HostLayout,
    /// `x-no-mmap=on`: every BAR access trapped.
    no_mmap: bool,
    shadow: PciConfig,
    multifunction: bool,
    msix: Option<MsixState>,
    msi: Option<MsiState>,
    /// INTx's trigger and resample eventfds, when the host function has
    /// the line (the guest uses it until it turns MSI or MSI-X on).
    intx: Option<(EventFd, EventFd)>,
    /// What the host was last told.
    host_irq: HostIrq,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("BAR {index}")]
    Bar {
        index: usize,
        #[source]
        source: ConfigError,
    },
    #[error("MSI-X: {0} vectors but {1} GSIs")]
    MsixGsis(u16, usize),
    #[error("MSI: {0} vectors but {1} GSIs")]
    MsiGsis(u32, usize),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot route the host's INTx")]
    Intx(#[source] std::io::Error),
}

impl<A: VfioAccess> VfioPciDevice<A> {
    /// The model of `dev`, laid out as `layout` says; its vectors routed
    /// through `router` on `gsis`; `no_mmap`: QEMU's `x-no-mmap`, nothing
    /// mapped into the guest.
    pub fn new(
        dev: Arc<A>,
        layout: &HostLayout,
        multifunction: bool,
        no_mmap: bool,
        gsis: Gsis,
        router: Arc<dyn MsiRouter>,
    ) -> Result<Self, DeviceError> {
        let mut shadow = PciConfig::new(&ConfigParams { multifunction, ..layout.identity });
        for (index, bar) in layout.bars.iter().enumerate() {
            if let Some(bar) = bar {
                shadow
                    .add_bar(index, bar.kind, bar.size)
                    .map_err(|source| DeviceError::Bar { index, source })?;
            }
        }
        let eventfds = |n: usize| -> Result<Vec<EventFd>, DeviceError> {
            (0..n)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
                .collect::<Result<_, _>>()
                .map_err(DeviceError::EventFd)
        };
        let clones = |evts: &[EventFd]| -> Result<Vec<EventFd>, DeviceError> {
            evts.iter()
                .map(EventFd::try_clone)
                .collect::<Result<_, _>>()
                .map_err(DeviceError::EventFd)
        };
        let msix = match layout.msix {
            Some((offset, cap)) => {
                if gsis.msix.len() != usize::from(cap.vectors) {
                    return Err(DeviceError::MsixGsis(cap.vectors, gsis.msix.len()));
                }
                let mut table = Msix::new(gsis.msix, router.clone());
                let evts = eventfds(usize::from(cap.vectors))?;
                for (v, evt) in clones(&evts)?.into_iter().enumerate() {
                    let source = table.add_source(evt);
                    table.set_source_vector(source, v as u16);
                }
                Some(MsixState { offset, cap, table, evts })
            }
            None => None,
        };
        let msi = match layout.msi {
            Some(shape) => {
                if gsis.msi.len() != shape.vectors as usize {
                    return Err(DeviceError::MsiGsis(shape.vectors, gsis.msi.len()));
                }
                let evts = eventfds(shape.vectors as usize)?;
                let msi = Msi::new(shape, gsis.msi, router, clones(&evts)?);
                Some(MsiState { msi, evts })
            }
            None => None,
        };
        let has_intx = layout.identity.interrupt_pin != 0
            && dev.irq_info(INTX_IRQ).is_some_and(|i| i.count > 0);
        let intx = if has_intx {
            let mut two = eventfds(2)?;
            let resample = two.pop();
            two.pop().zip(resample)
        } else {
            None
        };
        let mut d = VfioPciDevice {
            dev,
            layout: layout.clone(),
            no_mmap,
            shadow,
            multifunction,
            msix,
            msi,
            intx,
            host_irq: HostIrq::Off,
        };
        // INTx from the start: a guest driver may never turn MSI on.
        d.switch_host_irq().map_err(DeviceError::Intx)?;
        Ok(d)
    }

    /// The interrupt the guest has on now: MSI-X over MSI over INTx.
    fn wanted_irq(&self) -> HostIrq {
        if self.msix.as_ref().is_some_and(|m| m.table.enabled()) {
            return HostIrq::Msix;
        }
        match self.msi.as_ref().map_or(0, |m| m.msi.vectors_enabled()) {
            0 if self.intx.is_some() => HostIrq::Intx,
            0 => HostIrq::Off,
            n => HostIrq::Msi(n),
        }
    }

    /// Tells the host which interrupt to signal, and on which eventfds,
    /// when that changed: the old one off first (the kernel takes one type
    /// at a time), then the new one on. INTx is unmasked by the resample
    /// eventfd in the kernel: no exit per interrupt.
    fn switch_host_irq(&mut self) -> std::io::Result<()> {
        let want = self.wanted_irq();
        if want == self.host_irq {
            return Ok(());
        }
        match self.host_irq {
            HostIrq::Off => {}
            HostIrq::Intx => self.dev.disable_irq(INTX_IRQ)?,
            HostIrq::Msi(_) => self.dev.disable_irq(MSI_IRQ)?,
            HostIrq::Msix => self.dev.disable_irq(MSIX_IRQ)?,
        }
        self.host_irq = HostIrq::Off;
        match want {
            HostIrq::Off => {}
            HostIrq::Intx => {
                if let Some((trigger, resample)) = &self.intx {
                    self.dev.enable_irq(INTX_IRQ, &[trigger])?;
                    self.dev.set_intx_resample(resample)?;
                }
            }
            HostIrq::Msi(n) => {
                let evts = self.msi.as_ref().map(|m| &m.evts[..n as usize]).unwrap_or_default();
                self.dev.enable_irq(MSI_IRQ, &evts.iter().collect::<Vec<_>>())?;
            }
            HostIrq::Msix => {
                let evts = self.msix.as_ref().map(|m| &m.evts[..]).unwrap_or_default();
                self.dev.enable_irq(MSIX_IRQ, &evts.iter().collect::<Vec<_>>())?;
            }
        }
        self.host_irq = want;
        Ok(())
    }

    fn follow_guest_irq(&mut self) {
        if let Err(e) = self.switch_host_irq() {
            devices::warn_limited!(
                "vfio: switching the host's interrupts to {:?}: {e}",
                self.wanted_irq()
            );
        }
    }

    /// The host's dword, all ones when it cannot be read (as a missing
    /// function reads).
    fn host_dword(&self, reg: usize) -> u32 {
        self.dev.config_u32(reg as u64 * 4).unwrap_or(u32::MAX)
    }

    /// MSI-X Message Control as the guest wrote it: the host's vectors
    /// follow (all of them with MSI-X on, none with it off), and the
    /// table's irqfds follow the guest's masks.
    fn msix_control(&mut self, control: u16) {
        let Some(m) = self.msix.as_mut() else { return };
        let enabled = control & MSIX_ENABLE != 0;
        let function_masked = control & MSIX_FUNCTION_MASK != 0;
        m.table.set_control(MsixControl { enabled, function_masked });
        self.follow_guest_irq();
    }

    fn msix_ranges(&self, bar: usize) -> Option<(&MsixState, u64, u64)> {
        let m = self.msix.as_ref()?;
        let table = (usize::from(m.cap.table_bar) == bar).then_some(u64::from(m.cap.table_offset));
        let pba = (usize::from(m.cap.pba_bar) == bar).then_some(u64::from(m.cap.pba_offset));
        Some((m, table.unwrap_or(u64::MAX), pba.unwrap_or(u64::MAX)))
    }
}

impl<A: VfioAccess> PciDevice for VfioPciDevice<A> {
    fn config_read(&mut self, reg: usize) -> u32 {
        if (BAR0 / 4..BAR0 / 4 + 6).contains(&reg) {
            return self.shadow.read_reg(reg);
        }
        if reg == ROM_DWORD {
            return 0;
        }
        let mut value = self.host_dword(reg);
        if let Some(m) = self.msi.as_ref().filter(|m| (0..4).any(|i| m.msi.covers(reg * 4 + i))) {
            value = m.msi.read_reg(reg, value);
        }
        if reg == HEADER_DWORD {
            let bit = u32::from(self.multifunction) << 23;
            value = (value & !(1 << 23)) | bit;
        }
        if let Some(m) = &self.msix {
            if reg == m.offset / 4 {
                // Message Control (the upper half): the host's table size,
                // the guest's enable and mask.
                let size = (value >> 16) & 0x7ff;
                let (on, masked) = (m.table.enabled(), m.table.function_masked());
                let control = size | u32::from(on) << 15 | u32::from(masked) << 14;
                value = (value & 0xffff) | control << 16;
            }
        }
        value
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) -> Option<BarReprogram> {
        let reg = usize::try_from(offset).ok()? / 4;
        if (BAR0 / 4..BAR0 / 4 + 6).contains(&reg) {
            return self.shadow.write(offset, data);
        }
        if reg == ROM_DWORD {
            return None;
        }
        let at = offset as usize;
        if let Some(m) =
            self.msi.as_mut().filter(|m| (at..at + data.len()).any(|o| m.msi.covers(o)))
        {
            // The host's MSI registers stay the host's: vectors are
            // switched with SET_IRQS.
            if let Some(MsiChange::Vectors(_)) = m.msi.write(at, data) {
                self.follow_guest_irq();
            }
            return None;
        }
        if let Some(m) = &self.msix {
            let control_at = m.offset as u64 + 2;
            let end = offset + data.len() as u64;
            if offset < control_at + 2 && control_at < end {
                // The byte(s) of Message Control this write covers (the
                // capability's ID and next bytes are read-only).
                let current = self.config_read(m.offset / 4) >> 16;
                let mut bytes = (current as u16).to_le_bytes();
                for (i, b) in data.iter().enumerate() {
                    let at = offset + i as u64;
                    if at == control_at || at == control_at + 1 {
                        bytes[(at - control_at) as usize] = *b;
                    }
                }
                self.msix_control(u16::from_le_bytes(bytes));
                return None;
            }
        }
        if let Err(e) = self.dev.config_write(offset, data) {
            devices::warn_limited!("vfio: config write at {offset:#x}: {e}");
        }
        None
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if let Some((m, table, pba)) = self.msix_ranges(bar) {
            if (table..table.saturating_add(m.table.table_size())).contains(&offset) {
                return m.table.table_read(offset - table, data);
            }
            if (pba..pba.saturating_add(m.table.pba_size())).contains(&offset) {
                return m.table.pba_read(offset - pba, data);
            }
        }
        if self.dev.region_read(bar as u32, offset, data).is_err() {
            data.fill(0xff);
        }
    }

    fn intx(&self) -> Option<(&EventFd, &EventFd)> {
        self.intx.as_ref().map(|(t, r)| (t, r))
    }

    fn direct_areas(&self, bar: usize) -> Vec<DirectArea<'_>> {
        let (Some(fd), Some(host)) =
            (self.dev.mmap_fd(), self.layout.bars.get(bar).and_then(Option::as_ref))
        else {
            return Vec::new();
        };
        let page = 4096;
        let areas = self.layout.mappable_areas(bar, self.no_mmap, page);
        areas
            .into_iter()
            .map(|(offset, len)| DirectArea {
                offset,
                len,
                fd,
                fd_offset: host.region.fd_offset + offset,
            })
            .collect()
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if let Some((m, table, pba)) = self.msix_ranges(bar) {
            let (table_len, pba_len) = (m.table.table_size(), m.table.pba_size());
            if (table..table.saturating_add(table_len)).contains(&offset) {
                if let Some(m) = self.msix.as_mut() {
                    m.table.table_write(offset - table, data);
                }
                return;
            }
            if (pba..pba.saturating_add(pba_len)).contains(&offset) {
                return; // read-only
            }
        }
        if let Err(e) = self.dev.region_write(bar as u32, offset, data) {
            devices::warn_limited!("vfio: BAR {bar} write at {offset:#x}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::access::fake::{Call, Fake};
    use super::super::layout::tests::nvme;
    use super::*;
    use crate::msix::tests::{gsis, Routes};

    fn device() -> (Arc<Fake>, VfioPciDevice<Fake>, Arc<Routes>) {
        let fake = Arc::new(nvme());
        let layout = HostLayout::probe(&*fake, true).unwrap();
        let routes = Arc::new(Routes::default());
        let d = VfioPciDevice::new(
            fake.clone(),
            &layout,
            true,
            false,
            Gsis { msix: gsis(65), msi: Vec::new() },
            routes.clone(),
        )
        .unwrap();
        (fake, d, routes)
    }

    /// The header: the host's identity and capabilities, skiff's BARs, no
    /// ROM, `multifunction=` in the header type.
    #[test]
    fn config_space_virtualization() {
        let (fake, mut d, _) = device();
        assert_eq!(d.config_read(0), 0x0010_1b36);
        assert_eq!(d.config_read(2), 0x0108_0202);
        assert_eq!(d.config_read(HEADER_DWORD) >> 16 & 0xff, 0x80, "multifunction=on");
        // BAR 0 sizes as a 16 KiB 64-bit BAR and moves in the shadow only.
        d.config_write(0x10, &u32::MAX.to_le_bytes());
        assert_eq!(d.config_read(4), 0xffff_c004);
        let moved = d.config_write(0x10, &0xc000_0000u32.to_le_bytes());
        assert_eq!(d.config_read(4), 0xc000_0004);
        assert!(moved.is_some_and(|m| m.new == 0xc000_0000 && m.len == 0x4000), "{moved:?}");
        assert!(!fake
            .calls()
            .iter()
            .any(|c| matches!(c, Call::RegionWrite { offset: 0x10..=0x17, .. })));
        // No ROM, whatever the host has; a ROM write goes nowhere.
        d.config_write(0x30, &u32::MAX.to_le_bytes());
        assert_eq!(d.config_read(ROM_DWORD), 0);
        // The command register is the host's (the kernel filters it).
        d.config_write(0x04, &0x0006u16.to_le_bytes());
        assert!(fake.calls().contains(&Call::RegionWrite {
            index: 7,
            offset: 4,
            data: vec![6, 0]
        }));
        assert_eq!(d.config_read(1) & 0xffff, 0x0006);
        // The PCIe capability and the extended space read through.
        assert_eq!(d.config_read(0x60 / 4) & 0xff, 0x10);
        assert_eq!(d.config_read(0x100 / 4) & 0xffff, 0x0001);
    }

    /// MSI-X: enabling it in Message Control hands the host every vector's
    /// eventfd; the table is emulated (a programmed, unmasked vector gets a
    /// route and its irqfd); disabling turns the host's off.
    #[test]
    fn msix_table_writes_reach_set_irqs_and_routes() {
        let (fake, mut d, routes) = device();
        let control = 0x50 + 2;
        assert_eq!(d.config_read(0x50 / 4) >> 16, 64, "65 vectors, off");
        // Vector 3: address, data, unmasked.
        d.bar_write(0, 0x2000 + 3 * 16, &0xfee0_0000u64.to_le_bytes());
        d.bar_write(0, 0x2000 + 3 * 16 + 8, &0x41u32.to_le_bytes());
        d.bar_write(0, 0x2000 + 3 * 16 + 12, &0u32.to_le_bytes());
        let mut back = [0u8; 4];
        d.bar_read(0, 0x2000 + 3 * 16 + 8, &mut back);
        assert_eq!(u32::from_le_bytes(back), 0x41);
        assert!(
            fake.calls().iter().all(|c| !matches!(c, Call::RegionWrite { index: 0, .. })),
            "the table never reaches the host"
        );
        d.config_write(control, &MSIX_ENABLE.to_le_bytes());
        assert!(fake.calls().contains(&Call::EnableIrq { index: MSIX_IRQ, vectors: 65 }));
        assert_eq!(d.config_read(0x50 / 4) >> 16, 64 | 0x8000);
        assert!(routes.routes.lock().unwrap().iter().any(|&(g, m)| g == 24 + 3 && m.data == 0x41));
        // The host signals vector 3: KVM raises its GSI.
        d.msix.as_ref().unwrap().evts[3].write(1).unwrap();
        routes.fire();
        assert_eq!(*routes.delivered.lock().unwrap(), [27]);
        // Off again.
        d.config_write(control + 1, &[0]);
        assert!(fake.calls().contains(&Call::DisableIrq(MSIX_IRQ)));
        // Other BAR accesses go to the host.
        d.bar_write(0, 0x14, &1u32.to_le_bytes());
        assert!(fake.calls().contains(&Call::RegionWrite {
            index: 0,
            offset: 0x14,
            data: vec![1, 0, 0, 0]
        }));
    }

    /// BAR 0's pages below the MSI-X table are handed to the VMM to map
    /// (at the region's place in the device's descriptor); with
    /// x-no-mmap, or a device without a descriptor to map, nothing is.
    #[test]
    fn direct_areas_leave_the_msix_pages_out() {
        let fake = Arc::new(super::super::access::fake::nvme_mappable());
        let layout = HostLayout::probe(&*fake, true).unwrap();
        let routes: Arc<Routes> = Arc::new(Routes::default());
        let d = VfioPciDevice::new(
            fake.clone(),
            &layout,
            false,
            false,
            Gsis { msix: gsis(65), msi: Vec::new() },
            routes.clone(),
        )
        .unwrap();
        let areas: Vec<_> =
            d.direct_areas(0).iter().map(|a| (a.offset, a.len, a.fd_offset)).collect();
        assert_eq!(areas, [(0, 0x2000, 0x10000)]);
        assert!(d.direct_areas(1).is_empty());
        let d = VfioPciDevice::new(
            fake,
            &layout,
            false,
            true,
            Gsis { msix: gsis(65), msi: Vec::new() },
            routes,
        )
        .unwrap();
        assert!(d.direct_areas(0).is_empty(), "x-no-mmap");
        let (_, plain, _) = device();
        assert!(plain.direct_areas(0).is_empty(), "no descriptor to map");
    }

    /// INTx is routed to its eventfds from the start (the guest's driver
    /// may never turn MSI-X on: `pci=nomsi`); MSI-X on takes INTx off at
    /// the host first, MSI-X off gives it back.
    #[test]
    fn intx_until_msix_and_back() {
        use super::super::access::IrqInfo;
        let mut fake = nvme();
        fake.irqs.insert(INTX_IRQ, IrqInfo { count: 1, maskable: true });
        let fake = Arc::new(fake);
        let layout = HostLayout::probe(&*fake, true).unwrap();
        let routes = Arc::new(Routes::default());
        let mut d = VfioPciDevice::new(
            fake.clone(),
            &layout,
            false,
            false,
            Gsis { msix: gsis(65), msi: Vec::new() },
            routes,
        )
        .unwrap();
        assert!(d.intx().is_some());
        let irqs = |f: &Fake| -> Vec<Call> {
            f.calls().into_iter().filter(|c| !matches!(c, Call::RegionWrite { .. })).collect()
        };
        assert_eq!(
            irqs(&fake),
            [Call::EnableIrq { index: INTX_IRQ, vectors: 1 }, Call::IntxResample]
        );
        d.config_write(0x52, &MSIX_ENABLE.to_le_bytes());
        d.config_write(0x52, &0u16.to_le_bytes());
        assert_eq!(
            irqs(&fake)[2..],
            [
                Call::DisableIrq(INTX_IRQ),
                Call::EnableIrq { index: MSIX_IRQ, vectors: 65 },
                Call::DisableIrq(MSIX_IRQ),
                Call::EnableIrq { index: INTX_IRQ, vectors: 1 },
                Call::IntxResample,
            ]
        );
        // Without the host's INTx (or a pin), none.
        let (_, plain, _) = device();
        assert!(plain.intx().is_none());
    }

    /// A function with MSI (4 vectors, 64-bit, per-vector masking) between
    /// PM and MSI-X: the guest reads and writes skiff's registers, never
    /// the host's; enabling switches the host from INTx to MSI with the
    /// vectors the guest enabled; a masked vector's signal waits; turning
    /// it off gives INTx back.
    #[test]
    fn msi_enable_and_mask_reach_set_irqs() {
        let fake = Arc::new(super::super::access::fake::nvme_with_msi());
        let layout = HostLayout::probe(&*fake, true).unwrap();
        let routes = Arc::new(Routes::default());
        let gsis = Gsis { msix: gsis(65), msi: (100..104).collect() };
        let mut d =
            VfioPciDevice::new(fake.clone(), &layout, false, false, gsis, routes.clone()).unwrap();
        assert_eq!(d.config_read(0x70 / 4), 0x0184_5005, "MSI, next MSI-X, 4 vectors, 64-bit, PVM");
        d.config_write(0x74, &0xfee0_0000u32.to_le_bytes());
        d.config_write(0x7c, &0x30u16.to_le_bytes());
        d.config_write(0x80, &0b10u32.to_le_bytes()); // vector 1 masked
        d.config_write(0x72, &(1u16 << 4 | 1).to_le_bytes()); // two vectors, on
        assert!(
            !fake
                .calls()
                .iter()
                .any(|c| matches!(c, Call::RegionWrite { offset: 0x70..=0x87, .. })),
            "the host's MSI registers are never written"
        );
        let irqs: Vec<Call> =
            fake.calls().into_iter().filter(|c| !matches!(c, Call::RegionWrite { .. })).collect();
        assert_eq!(
            irqs,
            [
                Call::EnableIrq { index: INTX_IRQ, vectors: 1 },
                Call::IntxResample,
                Call::DisableIrq(INTX_IRQ),
                Call::EnableIrq { index: MSI_IRQ, vectors: 2 },
            ]
        );
        assert!(routes.routes.lock().unwrap().iter().any(|&(g, m)| g == 100 && m.data == 0x30));
        let evts = &d.msi.as_ref().unwrap().evts;
        evts[0].write(1).unwrap();
        evts[1].write(1).unwrap();
        assert_eq!(routes.take_delivered(), [100], "vector 1 masked");
        assert_eq!(d.config_read(0x84 / 4), 0b10, "and pending");
        d.config_write(0x80, &0u32.to_le_bytes());
        assert_eq!(routes.take_delivered(), [101], "delivered on unmask");
        d.config_write(0x72, &0u16.to_le_bytes());
        let n = fake.calls().len();
        assert_eq!(
            fake.calls()[n - 3..],
            [
                Call::DisableIrq(MSI_IRQ),
                Call::EnableIrq { index: INTX_IRQ, vectors: 1 },
                Call::IntxResample,
            ]
        );
    }
}
