//! BAR assignment as firmware does it, so the guest finds every BAR and
//! bridge window already programmed and keeps them.
//!
//! Every function is sized the way firmware sizes it, through its config
//! space (write all ones, read the mask back), so any `PciDevice` works.
//! Then each bus is packed biggest alignment first; a bridge's window is one
//! item on its parent bus, 1 MiB granular and aligned, holding its bus's
//! packing. Memory BARs go to the 32-bit window, except 64-bit prefetchable
//! ones, which go to the 64-bit window (behind a bridge: its prefetchable
//! window) when there is one. A 64-bit non-prefetchable BAR must stay below
//! 4 GiB behind a bridge (the non-prefetchable window is 32-bit), so it does
//! everywhere. I/O BARs stay unassigned: microvm's host bridge has no I/O
//! window.

use crate::address::PciAddress;
use crate::config::{
    BarKind, BAR0, COMMAND, COMMAND_MEMORY, HEADER_TYPE, MEMORY_BASE, PREF_BASE_UPPER32,
    PREF_LIMIT_UPPER32, PREF_MEMORY_BASE,
};
use crate::root::{bridge_buses, lock, BusNode, PciRoot, RootError, SharedDevice};

/// Bridge memory windows are 1 MiB granular.
const WINDOW_GRANULE: u64 = 1 << 20;

/// A range of guest physical addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub base: u64,
    pub size: u64,
}

/// Where BARs may go: the host bridge's windows (its `_CRS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarWindows {
    pub mmio32: Window,
    pub mmio64: Option<Window>,
}

/// One assigned BAR: the VMM maps `addr..addr + len` to the function's
/// `bar_read`/`bar_write` with BAR index `bar`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRange {
    pub address: PciAddress,
    pub bar: usize,
    pub kind: BarKind,
    pub addr: u64,
    pub len: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resource {
    Mem32,
    Pref64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Span {
    size: u64,
    align: u64,
}

struct ProbedBar {
    index: usize,
    kind: BarKind,
    size: u64,
    resource: Option<Resource>,
}

struct DevicePlan {
    address: PciAddress,
    dev: SharedDevice,
    bars: Vec<ProbedBar>,
    bridge: Option<BridgePlan>,
}

struct BridgePlan {
    bus: BusPlan,
    mem: Span,
    pref: Span,
}

struct BusPlan {
    devices: Vec<DevicePlan>,
}

#[derive(Clone, Copy)]
enum Item {
    Bar { device: usize, bar: usize },
    Window { device: usize },
}

impl PciRoot {
    /// Lays out every BAR and bridge window, programs them through config
    /// space, turns on memory decoding where something was placed, and
    /// returns the assigned BARs in address order.
    pub fn assign_bars(&mut self, windows: &BarWindows) -> Result<Vec<BarRange>, RootError> {
        let has64 = windows.mmio64.is_some();
        let plan = plan_bus(&self.bus0, 0, has64);
        let mut out = Vec::new();
        let targets = [
            (Resource::Mem32, Some(windows.mmio32), "32-bit"),
            (Resource::Pref64, windows.mmio64, "64-bit"),
        ];
        for (resource, window, name) in targets {
            let (items, span) = pack(&plan, resource);
            let Some(w) = window.filter(|_| span.size > 0) else { continue };
            let base = w.base.checked_next_multiple_of(span.align.max(1));
            let fits = base
                .and_then(|b| b.checked_add(span.size))
                .is_some_and(|end| end <= w.base.saturating_add(w.size));
            let (Some(base), true) = (base, fits) else {
                return Err(RootError::WindowFull {
                    window: name,
                    need: span.size,
                    align: span.align,
                    base: w.base,
                    size: w.size,
                });
            };
            place(&plan, resource, &items, base, &mut out);
        }
        enable_memory(&plan, &out);
        out.sort_by_key(|r| (r.addr, r.address, r.bar));
        Ok(out)
    }
}

/// Rounds up to a power-of-two `align`; saturates, so an absurd size fails
/// the window check instead of wrapping.
fn align_up(value: u64, align: u64) -> u64 {
    value.checked_next_multiple_of(align).unwrap_or(u64::MAX)
}

fn resource_of(kind: BarKind, has64: bool) -> Option<Resource> {
    match kind {
        BarKind::Io => None,
        BarKind::Memory64 { prefetchable: true } if has64 => Some(Resource::Pref64),
        _ => Some(Resource::Mem32),
    }
}

fn plan_bus(bus: &BusNode, number: u8, has64: bool) -> BusPlan {
    let mut devices = Vec::new();
    for (&devfn, node) in &bus.devices {
        let address = PciAddress { bus: number, devfn };
        let bars = probe(&node.dev, address, has64);
        let bridge = node.child.as_ref().map(|child| {
            let (secondary, _) = bridge_buses(&node.dev);
            let bus = plan_bus(child, secondary, has64);
            let window = |resource| {
                let span = pack(&bus, resource).1;
                Span {
                    size: align_up(span.size, WINDOW_GRANULE),
                    align: span.align.max(WINDOW_GRANULE),
                }
            };
            let (mem, pref) = (window(Resource::Mem32), window(Resource::Pref64));
            BridgePlan { bus, mem, pref }
        });
        devices.push(DevicePlan { address, dev: node.dev.clone(), bars, bridge });
    }
    BusPlan { devices }
}

/// Sizes each BAR as firmware does, restoring what was there.
fn probe(dev: &SharedDevice, address: PciAddress, has64: bool) -> Vec<ProbedBar> {
    let mut dev = lock(dev);
    let bridge = (dev.config_read(HEADER_TYPE / 4) >> 16) & 0x7f == 1;
    let count = if bridge { 2 } else { 6 };
    let mut size_mask = |reg: usize| {
        let offset = (BAR0 + 4 * reg) as u64;
        let saved = dev.config_read(BAR0 / 4 + reg);
        dev.config_write(offset, &[0xff; 4]);
        let mask = dev.config_read(BAR0 / 4 + reg);
        dev.config_write(offset, &saved.to_le_bytes());
        mask
    };
    let mut bars = Vec::new();
    let mut index = 0;
    while index < count {
        let low = size_mask(index);
        let kind = BarKind::from_register(low);
        let mut mask = u64::from(low & kind.address_mask());
        if kind.is_64bit() && index + 1 < count {
            mask |= u64::from(size_mask(index + 1)) << 32;
        } else {
            mask |= 0xffff_ffff_0000_0000;
        }
        if mask != 0xffff_ffff_0000_0000 && mask != 0 {
            let size = 1u64 << mask.trailing_zeros();
            let resource = resource_of(kind, has64);
            if resource.is_none() {
                devices::warn_limited!(
                    "pci: {address} BAR {index}: I/O BARs get no address (no I/O window)"
                );
            }
            bars.push(ProbedBar { index, kind, size, resource });
        }
        index += if kind.is_64bit() { 2 } else { 1 };
    }
    bars
}

/// Orders a bus's items of one resource, biggest alignment first, and gives
/// each an offset from a base aligned to the returned span's alignment.
fn pack(bus: &BusPlan, resource: Resource) -> (Vec<(Item, u64)>, Span) {
    let mut items: Vec<(Item, Span)> = Vec::new();
    for (device, d) in bus.devices.iter().enumerate() {
        for (bar, b) in d.bars.iter().enumerate().filter(|(_, b)| b.resource == Some(resource)) {
            items.push((Item::Bar { device, bar }, Span { size: b.size, align: b.size }));
        }
        if let Some(bridge) = &d.bridge {
            let span = if resource == Resource::Mem32 { bridge.mem } else { bridge.pref };
            if span.size > 0 {
                items.push((Item::Window { device }, span));
            }
        }
    }
    items.sort_by_key(|(_, span)| std::cmp::Reverse(span.align));
    let align = items.first().map_or(1, |(_, s)| s.align);
    let mut cursor = 0u64;
    let mut placed = Vec::with_capacity(items.len());
    for (item, span) in items {
        let offset = align_up(cursor, span.align);
        cursor = offset.saturating_add(span.size);
        placed.push((item, offset));
    }
    (placed, Span { size: cursor, align })
}

fn place(
    bus: &BusPlan,
    resource: Resource,
    items: &[(Item, u64)],
    base: u64,
    out: &mut Vec<BarRange>,
) {
    for &(item, offset) in items {
        let addr = base + offset;
        match item {
            Item::Bar { device, bar } => {
                let d = &bus.devices[device];
                let b = &d.bars[bar];
                let mut dev = lock(&d.dev);
                let reg = (BAR0 + 4 * b.index) as u64;
                dev.config_write(reg, &(addr as u32).to_le_bytes());
                if b.kind.is_64bit() {
                    dev.config_write(reg + 4, &((addr >> 32) as u32).to_le_bytes());
                }
                out.push(BarRange {
                    address: d.address,
                    bar: b.index,
                    kind: b.kind,
                    addr,
                    len: b.size,
                });
            }
            Item::Window { device } => {
                let d = &bus.devices[device];
                let Some(bridge) = &d.bridge else { continue };
                let span = if resource == Resource::Mem32 { bridge.mem } else { bridge.pref };
                set_window(&d.dev, resource, addr, addr + span.size - 1);
                let (child_items, _) = pack(&bridge.bus, resource);
                place(&bridge.bus, resource, &child_items, addr, out);
            }
        }
    }
}

/// Programs a bridge window as (base, last byte).
fn set_window(dev: &SharedDevice, resource: Resource, base: u64, last: u64) {
    let granules = ((base >> 16) as u32 & 0xfff0) | ((last >> 16) as u32 & 0xfff0) << 16;
    let mut dev = lock(dev);
    match resource {
        Resource::Mem32 => {
            dev.config_write(MEMORY_BASE as u64, &granules.to_le_bytes());
        }
        Resource::Pref64 => {
            dev.config_write(PREF_MEMORY_BASE as u64, &granules.to_le_bytes());
            dev.config_write(PREF_BASE_UPPER32 as u64, &((base >> 32) as u32).to_le_bytes());
            dev.config_write(PREF_LIMIT_UPPER32 as u64, &((last >> 32) as u32).to_le_bytes());
        }
    }
}

/// Closes the bridge windows that hold nothing, and turns on memory
/// decoding in every function that got a BAR or a window, as firmware does.
fn enable_memory(bus: &BusPlan, assigned: &[BarRange]) {
    for d in &bus.devices {
        let mut decodes = assigned.iter().any(|r| r.address == d.address);
        if let Some(bridge) = &d.bridge {
            for (resource, span) in [(Resource::Mem32, bridge.mem), (Resource::Pref64, bridge.pref)]
            {
                if span.size == 0 {
                    set_window(&d.dev, resource, WINDOW_GRANULE, 0);
                }
                decodes |= span.size > 0;
            }
            enable_memory(&bridge.bus, assigned);
        }
        if decodes {
            let mut dev = lock(&d.dev);
            let command = dev.config_read(COMMAND / 4) as u16 | COMMAND_MEMORY;
            dev.config_write(COMMAND as u64, &command.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PciConfig, HEADER_TYPE};
    use crate::root::tests::{addr, root_port, Endpoint};

    const MEM: BarKind = BarKind::Memory32 { prefetchable: false };
    const MEM64: BarKind = BarKind::Memory64 { prefetchable: false };
    const PREF64: BarKind = BarKind::Memory64 { prefetchable: true };

    fn windows() -> BarWindows {
        BarWindows {
            mmio32: Window { base: 0xc000_0000, size: 0x2000_0000 },
            mmio64: Some(Window { base: 0x3000_0000_0000, size: 0x1000_0000_0000 }),
        }
    }

    /// A virtio-pci-like function: MSI-X BAR 1, 64-bit prefetchable BAR 4.
    fn virtio() -> SharedDevice {
        Endpoint::shared(&[(1, MEM, 0x1000), (4, PREF64, 0x4000)])
    }

    fn config_of(root: &PciRoot, a: PciAddress) -> impl Fn(usize) -> u32 + '_ {
        let dev = root.device(a).unwrap();
        move |reg| lock(&dev).config_read(reg)
    }

    #[test]
    fn bars_are_naturally_aligned_and_programmed() {
        let mut root = PciRoot::new(16);
        root.insert(addr(0, 1, 0), Endpoint::shared(&[(0, MEM, 0x100), (2, MEM64, 0x10_0000)]))
            .unwrap();
        root.insert(addr(0, 2, 0), virtio()).unwrap();
        let got = root.assign_bars(&windows()).unwrap();
        for r in &got {
            assert_eq!(r.addr % r.len, 0, "{r:?} aligned");
        }
        let at = |a, bar| got.iter().find(|r| r.address == a && r.bar == bar).unwrap().addr;
        // Biggest first in the 32-bit window; 64-bit prefetchable goes high.
        assert_eq!(at(addr(0, 1, 0), 2), 0xc000_0000);
        assert_eq!(at(addr(0, 2, 0), 1), 0xc010_0000);
        assert_eq!(at(addr(0, 1, 0), 0), 0xc010_1000);
        assert_eq!(at(addr(0, 2, 0), 4), 0x3000_0000_0000);
        // No overlaps.
        for (i, a) in got.iter().enumerate() {
            for b in &got[i + 1..] {
                assert!(a.addr + a.len <= b.addr || b.addr + b.len <= a.addr, "{a:?} {b:?}");
            }
        }
        // The registers say the same, and memory decoding is on.
        let cfg = config_of(&root, addr(0, 2, 0));
        assert_eq!(cfg(BAR0 / 4 + 1), 0xc010_0000);
        assert_eq!(cfg(BAR0 / 4 + 4), 0x0000_000c);
        assert_eq!(cfg(BAR0 / 4 + 5), 0x3000);
        assert_ne!(cfg(COMMAND / 4) as u16 & COMMAND_MEMORY, 0);
    }

    #[test]
    fn root_port_windows_cover_their_children() {
        let mut root = PciRoot::new(16);
        root.insert(addr(0, 1, 0), root_port(1)).unwrap();
        root.insert(addr(0, 2, 0), root_port(2)).unwrap();
        root.insert(addr(0, 3, 0), Endpoint::shared(&[(0, MEM, 0x1000)])).unwrap();
        root.insert(addr(1, 0, 0), virtio()).unwrap();
        root.insert(addr(2, 0, 0), Endpoint::shared(&[(0, MEM, 0x20_0000)])).unwrap();
        let got = root.assign_bars(&windows()).unwrap();

        let port = |a| {
            let dev = root.device(a).unwrap();
            let mut cfg =
                PciConfig::new(&crate::config::ConfigParams { bridge: true, ..Default::default() });
            // Read the window registers back through the trait, into a model to decode them.
            for reg in [MEMORY_BASE, PREF_MEMORY_BASE, PREF_BASE_UPPER32, PREF_LIMIT_UPPER32] {
                cfg.set_u32(reg, lock(&dev).config_read(reg / 4));
            }
            let command = lock(&dev).config_read(COMMAND / 4) as u16;
            (cfg.bridge_memory_window(), cfg.bridge_prefetch_window(), command)
        };
        let (mem1, pref1, cmd1) = port(addr(0, 1, 0));
        let (mem2, pref2, _) = port(addr(0, 2, 0));
        for r in &got {
            let inside = |w: Option<(u64, u64)>| {
                w.is_some_and(|(b, l)| b <= r.addr && r.addr + r.len - 1 <= l)
            };
            match r.address.bus {
                1 => assert!(inside(mem1) || inside(pref1), "{r:?} in {mem1:x?} {pref1:x?}"),
                2 => assert!(inside(mem2), "{r:?}"),
                _ => assert!(!inside(mem1) && !inside(mem2) && !inside(pref1), "{r:?}"),
            }
        }
        // 1 MiB granular windows, prefetchable one high; port 2 has no prefetchable children.
        let (base, last) = mem1.unwrap();
        assert_eq!((base % WINDOW_GRANULE, (last + 1) % WINDOW_GRANULE), (0, 0));
        assert!(pref1.unwrap().0 >= 0x3000_0000_0000);
        assert_eq!(pref2, None);
        assert_eq!(mem2.map(|(b, l)| l + 1 - b), Some(0x20_0000));
        assert_ne!(cmd1 & COMMAND_MEMORY, 0);
    }

    #[test]
    fn empty_root_port_has_closed_windows() {
        let mut root = PciRoot::new(16);
        root.insert(addr(0, 1, 0), root_port(1)).unwrap();
        assert_eq!(root.assign_bars(&windows()).unwrap(), vec![]);
        let dev = root.device(addr(0, 1, 0)).unwrap();
        let mem = lock(&dev).config_read(MEMORY_BASE / 4);
        assert!(mem & 0xfff0 > (mem >> 16) & 0xfff0, "closed: {mem:#x}");
        assert_eq!(lock(&dev).config_read(COMMAND / 4) as u16 & COMMAND_MEMORY, 0);
    }

    #[test]
    fn without_a_64bit_window_everything_goes_low() {
        let mut root = PciRoot::new(16);
        root.insert(addr(0, 1, 0), root_port(1)).unwrap();
        root.insert(addr(1, 0, 0), virtio()).unwrap();
        let w = BarWindows { mmio64: None, ..windows() };
        let got = root.assign_bars(&w).unwrap();
        assert!(got.iter().all(|r| r.addr >= 0xc000_0000 && r.addr + r.len <= 0xe000_0000));
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn io_bars_stay_unassigned() {
        let mut root = PciRoot::new(16);
        root.insert(addr(0, 1, 0), Endpoint::shared(&[(0, BarKind::Io, 0x20), (1, MEM, 0x1000)]))
            .unwrap();
        let got = root.assign_bars(&windows()).unwrap();
        assert_eq!(got.iter().map(|r| r.bar).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn window_overflow_is_an_error() {
        let mut root = PciRoot::new(16);
        root.insert(addr(0, 1, 0), Endpoint::shared(&[(0, MEM, 0x2000_0000)])).unwrap();
        root.insert(addr(0, 2, 0), Endpoint::shared(&[(0, MEM, 0x1000)])).unwrap();
        let err = root.assign_bars(&windows()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "PCI: the BARs need 0x20001000 bytes (0x20000000-aligned) but the 32-bit window is 0x20000000 bytes at 0xc0000000"
        );
    }

    #[test]
    fn probing_leaves_registers_as_they_were() {
        let dev = Endpoint::shared(&[(0, MEM, 0x1000)]);
        lock(&dev).config_write(BAR0 as u64, &0xd000_0000u32.to_le_bytes());
        let bars = probe(&dev, addr(0, 1, 0), true);
        assert_eq!(bars.len(), 1);
        assert_eq!((bars[0].index, bars[0].size), (0, 0x1000));
        assert_eq!(lock(&dev).config_read(BAR0 / 4), 0xd000_0000);
        assert_eq!(lock(&dev).config_read(HEADER_TYPE / 4) >> 16 & 0x7f, 0);
    }
}
