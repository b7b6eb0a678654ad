//! What a host function looks like through VFIO, read once when it is
//! opened: its identity, its BARs (kind from the host's BAR register, size
//! from VFIO's region), its ROM, and its capabilities (where MSI, MSI-X and
//! PCI Express sit, and the extended ones). The guest-visible config space
//! and the BAR mappings are built from this. The walks are bounded: a
//! device's capability list is input skiff does not trust.

use std::io;

use super::access::{RegionInfo, VfioAccess, REGION_MMAP, ROM_REGION};
use crate::capability::{MsixCap, CAP_ID_MSIX, CAP_ID_PCIE};
use crate::config::{BarKind, ConfigParams};
use crate::msi::MsiShape;

pub const CAP_ID_MSI: u8 = 0x05;

/// At most this many capabilities in a list (48 fit in 192 bytes; the
/// extended space has room for about a thousand, but no device has that
/// many): a loop in a device's list ends the walk.
const MAX_CAPS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("cannot read the device's config space")]
    Config(#[source] io::Error),
    #[error("header type {0:#04x}: only endpoints (type 0) can be passed through")]
    NotEndpoint(u8),
    #[error("BAR {index}: size {size:#x} is not a power of two")]
    BarSize { index: usize, size: u64 },
    #[error("the MSI-X capability points outside its BARs (table in BAR {table_bar}, PBA in BAR {pba_bar})")]
    MsixOutside { table_bar: u8, pba_bar: u8 },
    #[error("the MSI capability at {0:#x} runs past the end of config space")]
    MsiOutside(usize),
}

/// One BAR of the host function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostBar {
    pub kind: BarKind,
    pub size: u64,
    pub region: RegionInfo,
}

/// A capability in the list: its ID and offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    pub id: u16,
    pub offset: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostLayout {
    /// The host's header, as the guest's shadow header is written from
    /// it; an endpoint, and multifunction is the guest slot's to decide.
    pub identity: ConfigParams,
    /// By BAR index; the high half of a 64-bit BAR is None.
    pub bars: [Option<HostBar>; 6],
    /// The option ROM's size, when the guest is to see it.
    pub rom: Option<u64>,
    pub caps: Vec<Cap>,
    pub extended: Vec<Cap>,
    pub msi: Option<MsiShape>,
    /// The MSI-X capability's offset, and what it says.
    pub msix: Option<(usize, MsixCap)>,
    pub pcie: Option<usize>,
}

impl HostLayout {
    /// Reads the function's layout. `rom`: whether the guest is to see
    /// the ROM at all (QEMU: not with `rombar=0` or `romfile=` empty).
    pub fn probe(dev: &dyn VfioAccess, rom: bool) -> Result<Self, LayoutError> {
        let u8_at = |o| dev.config_u8(o).map_err(LayoutError::Config);
        let u16_at = |o| dev.config_u16(o).map_err(LayoutError::Config);
        let u32_at = |o| dev.config_u32(o).map_err(LayoutError::Config);
        let header = u8_at(0x0e)?;
        if header & 0x7f != 0 {
            return Err(LayoutError::NotEndpoint(header));
        }
        let class_revision = u32_at(0x08)?;
        let mut bars: [Option<HostBar>; 6] = Default::default();
        let mut index = 0;
        while index < 6 {
            let low = u32_at(0x10 + 4 * index as u64)?;
            let kind = BarKind::from_register(low);
            let region = dev.region_info(index as u32).filter(|r| r.size > 0);
            if let Some(region) = region {
                if !region.size.is_power_of_two() {
                    return Err(LayoutError::BarSize { index, size: region.size });
                }
                bars[index] = Some(HostBar { kind, size: region.size, region });
            }
            index += if kind.is_64bit() { 2 } else { 1 };
        }
        let rom = if rom {
            dev.region_info(ROM_REGION).map(|r| r.size).filter(|&s| s > 0 && s.is_power_of_two())
        } else {
            None
        };
        let identity = ConfigParams {
            vendor_id: u16_at(0x00)?,
            device_id: u16_at(0x02)?,
            revision: class_revision as u8,
            class_code: class_revision >> 8,
            subsystem_vendor_id: u16_at(0x2c)?,
            subsystem_id: u16_at(0x2e)?,
            interrupt_pin: u8_at(0x3d)?,
            ..ConfigParams::default()
        };
        let mut layout = HostLayout {
            identity,
            bars,
            rom,
            caps: Vec::new(),
            extended: Vec::new(),
            msi: None,
            msix: None,
            pcie: None,
        };
        layout.walk_capabilities(dev)?;
        Ok(layout)
    }

    fn walk_capabilities(&mut self, dev: &dyn VfioAccess) -> Result<(), LayoutError> {
        let u8_at = |o| dev.config_u8(o).map_err(LayoutError::Config);
        let u16_at = |o| dev.config_u16(o).map_err(LayoutError::Config);
        let u32_at = |o| dev.config_u32(o).map_err(LayoutError::Config);
        let status = u16_at(0x06)?;
        let mut next = if status & (1 << 4) != 0 { u8_at(0x34)? & !3 } else { 0 };
        while next >= 0x40 && self.caps.len() < MAX_CAPS {
            let offset = usize::from(next);
            if self.caps.iter().any(|c| c.offset == offset) {
                break;
            }
            let id = u8_at(offset as u64)?;
            self.caps.push(Cap { id: u16::from(id), offset });
            let control = u16_at(offset as u64 + 2)?;
            match id {
                CAP_ID_MSI => {
                    let msi = MsiShape {
                        offset,
                        vectors: 1 << ((control >> 1) & 7).min(5),
                        is_64bit: control & (1 << 7) != 0,
                        per_vector_mask: control & (1 << 8) != 0,
                    };
                    if offset + msi.size() > 0x100 {
                        return Err(LayoutError::MsiOutside(offset));
                    }
                    self.msi = Some(msi);
                }
                CAP_ID_MSIX => {
                    let table = u32_at(offset as u64 + 4)?;
                    let pba = u32_at(offset as u64 + 8)?;
                    let cap = MsixCap {
                        vectors: (control & 0x7ff) + 1,
                        table_bar: (table & 7) as u8,
                        table_offset: table & !7,
                        pba_bar: (pba & 7) as u8,
                        pba_offset: pba & !7,
                    };
                    let inside =
                        |bar: u8| self.bars.get(usize::from(bar)).is_some_and(Option::is_some);
                    if !inside(cap.table_bar) || !inside(cap.pba_bar) {
                        return Err(LayoutError::MsixOutside {
                            table_bar: cap.table_bar,
                            pba_bar: cap.pba_bar,
                        });
                    }
                    self.msix = Some((offset, cap));
                }
                CAP_ID_PCIE => self.pcie = Some(offset),
                _ => {}
            }
            next = u8_at(offset as u64 + 1)? & !3;
        }
        // Extended capabilities only exist on a PCI Express function.
        if self.pcie.is_none() {
            return Ok(());
        }
        let mut at = 0x100usize;
        while (0x100..0x1000).contains(&at) && self.extended.len() < MAX_CAPS {
            if self.extended.iter().any(|c| c.offset == at) {
                break;
            }
            let header = u32_at(at as u64)?;
            if header == 0 || header == u32::MAX {
                break;
            }
            self.extended.push(Cap { id: header as u16, offset: at });
            at = (header >> 20) as usize & !3;
        }
        Ok(())
    }

    /// The parts of BAR `index` to map into the guest (offset, length; page
    /// multiples), or nothing: the region must allow mmap (and `no_mmap`
    /// not be asked, QEMU's `x-no-mmap`), and the pages holding the MSI-X
    /// table and PBA always stay out, trapped and emulated.
    pub fn mappable_areas(&self, index: usize, no_mmap: bool, page: u64) -> Vec<(u64, u64)> {
        let Some(bar) = self.bars.get(index).and_then(Option::as_ref) else { return Vec::new() };
        if no_mmap || bar.region.flags & REGION_MMAP == 0 || bar.kind == BarKind::Io {
            return Vec::new();
        }
        let mut holes = Vec::new();
        if let Some((_, m)) = self.msix {
            let table_len = u64::from(m.vectors) * 16;
            let pba_len = u64::from(m.vectors).div_ceil(64) * 8;
            for (bar_index, offset, len) in
                [(m.table_bar, m.table_offset, table_len), (m.pba_bar, m.pba_offset, pba_len)]
            {
                if usize::from(bar_index) == index {
                    let start = u64::from(offset) / page * page;
                    let end = (u64::from(offset) + len).div_ceil(page) * page;
                    holes.push((start, end));
                }
            }
        }
        let base = bar.region.sparse.clone().unwrap_or_else(|| vec![(0, bar.size)]);
        let mut areas = Vec::new();
        for (offset, len) in base {
            // Page granular: KVM maps whole pages.
            let mut pieces = vec![(offset.div_ceil(page) * page, (offset + len) / page * page)];
            for &(hs, he) in &holes {
                pieces = pieces
                    .into_iter()
                    .flat_map(|(s, e)| {
                        if he <= s || hs >= e {
                            return vec![(s, e)];
                        }
                        [(s, hs.max(s)), (he.min(e), e)]
                            .into_iter()
                            .filter(|(a, b)| a < b)
                            .collect()
                    })
                    .collect();
            }
            areas.extend(pieces.into_iter().filter(|(s, e)| s < e).map(|(s, e)| (s, e - s)));
        }
        areas
    }
}

#[cfg(test)]
pub(crate) mod tests {
    pub(crate) use super::super::access::fake::nvme;
    use super::*;

    #[test]
    fn an_nvme_controllers_layout() {
        let l = HostLayout::probe(&nvme(), true).unwrap();
        let id = &l.identity;
        assert_eq!(
            (id.vendor_id, id.device_id, id.revision, id.class_code),
            (0x1b36, 0x10, 2, 0x010802)
        );
        assert_eq!(
            (id.subsystem_vendor_id, id.subsystem_id, id.interrupt_pin),
            (0x1af4, 0x1100, 1)
        );
        assert!(!id.bridge && !id.multifunction);
        let bar0 = l.bars[0].as_ref().unwrap();
        assert_eq!((bar0.kind, bar0.size), (BarKind::Memory64 { prefetchable: false }, 0x4000));
        assert!(l.bars[1..].iter().all(Option::is_none), "BAR 1 is BAR 0's high half");
        assert_eq!(l.rom, Some(0x8000));
        let ids: Vec<u16> = l.caps.iter().map(|c| c.id).collect();
        assert_eq!(ids, [0x01, 0x11, 0x10]);
        let msix = MsixCap {
            vectors: 65,
            table_bar: 0,
            table_offset: 0x2000,
            pba_bar: 0,
            pba_offset: 0x3000,
        };
        assert_eq!(l.msix, Some((0x50, msix)));
        assert_eq!(l.pcie, Some(0x60));
        let ext: Vec<(u16, usize)> = l.extended.iter().map(|c| (c.id, c.offset)).collect();
        assert_eq!(ext, [(1, 0x100), (0xb, 0x140)]);
        assert_eq!(HostLayout::probe(&nvme(), false).unwrap().rom, None, "rombar=0 or romfile=");
    }

    /// The MSI-X table's and PBA's pages are never mapped: only what is
    /// below them; nothing at all with x-no-mmap or without MMAP; a sparse
    /// region keeps to its areas.
    #[test]
    fn the_msix_pages_stay_trapped() {
        let l = HostLayout::probe(&nvme(), true).unwrap();
        assert_eq!(l.mappable_areas(0, false, 0x1000), [(0, 0x2000)]);
        assert!(l.mappable_areas(0, true, 0x1000).is_empty(), "x-no-mmap");
        assert!(l.mappable_areas(1, false, 0x1000).is_empty(), "no BAR 1");
        let mut f = nvme();
        let bar = f.regions.get_mut(&0).unwrap();
        bar.sparse = Some(vec![(0, 0x800), (0x1000, 0x3000)]);
        let l = HostLayout::probe(&f, true).unwrap();
        assert_eq!(
            l.mappable_areas(0, false, 0x1000),
            [(0x1000, 0x1000)],
            "sub-page areas stay trapped"
        );
        f.regions.get_mut(&0).unwrap().flags &= !REGION_MMAP;
        let l = HostLayout::probe(&f, true).unwrap();
        assert!(l.mappable_areas(0, false, 0x1000).is_empty());
    }

    /// A hostile or broken device: a capability list that loops, a bridge,
    /// a BAR of an odd size, MSI-X pointing at a BAR that is not there.
    #[test]
    fn bad_layouts_are_refused_or_bounded() {
        let f = nvme();
        f.config.lock().unwrap()[0x61] = 0x40; // PCIe -> PM: a loop
        let l = HostLayout::probe(&f, true).unwrap();
        assert_eq!(l.caps.len(), 3);
        let f = nvme();
        f.config.lock().unwrap()[0x0e] = 1;
        assert!(matches!(HostLayout::probe(&f, true), Err(LayoutError::NotEndpoint(1))));
        let mut f = nvme();
        f.regions.get_mut(&0).unwrap().size = 0x3000;
        assert!(matches!(HostLayout::probe(&f, true), Err(LayoutError::BarSize { index: 0, .. })));
        let f = nvme();
        f.config.lock().unwrap()[0x54] = 0x03; // table in BAR 3
        let e = HostLayout::probe(&f, true).unwrap_err().to_string();
        assert!(e.contains("table in BAR 3"), "{e}");
    }
}
