//! The MSI capability (PCI 3.0, 6.8.1) of one function, emulated on the
//! MSI-X engine (`crate::msix::Msix`): MSI with N vectors enabled is an
//! MSI-X table of N entries the guest never sees, entry `i` holding the
//! capability's address and its data with the low bits replaced by `i`
//! (multiple message), masked by bit `i` of the mask register. So MSI gets
//! MSI-X's guarantees for free: a vector's source is an irqfd on its own
//! GSI while unmasked, held back in its eventfd (and shown as pending)
//! while masked, and delivered once on unmask.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::capability::MsixControl;
use crate::msix::{MsiRouter, Msix, ENTRY_SIZE};

const ENABLE: u16 = 1 << 0;
const ADDR_64: u16 = 1 << 7;
const PER_VECTOR_MASK: u16 = 1 << 8;
/// Message Control bits the guest writes: enable, Multiple Message Enable.
const WRITABLE_CONTROL: u16 = ENABLE | 0x7 << 4;

/// The capability as the function has it: where, and what it offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiShape {
    /// Offset in config space.
    pub offset: usize,
    /// Vectors the function can use (a power of two, 1..=32).
    pub vectors: u32,
    pub is_64bit: bool,
    pub per_vector_mask: bool,
}

impl MsiShape {
    /// The capability's bytes in config space (PCI 3.0 figures 6-9..6-12).
    pub fn size(&self) -> usize {
        match (self.is_64bit, self.per_vector_mask) {
            (false, false) => 10,
            (true, false) => 14,
            (false, true) => 20,
            (true, true) => 24,
        }
    }

    fn data_at(&self) -> usize {
        if self.is_64bit {
            12
        } else {
            8
        }
    }

    fn mask_at(&self) -> Option<usize> {
        self.per_vector_mask.then(|| self.data_at() + 4)
    }

    /// log2(vectors): the Multiple Message Capable field.
    fn mmc(&self) -> u16 {
        self.vectors.max(1).trailing_zeros().min(5) as u16
    }
}

/// What a config write changed that the host must follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsiChange {
    /// MSI is on with this many vectors (0: off).
    Vectors(u32),
}

pub struct Msi {
    shape: MsiShape,
    /// The guest's Message Control bits (enable, MME).
    control: u16,
    addr: u64,
    data: u16,
    mask: u32,
    /// One entry per vector the function can use.
    table: Msix,
}

impl Msi {
    /// `gsis`: one per vector the shape offers; `sources[i]` is signalled
    /// for vector `i`.
    pub fn new(
        shape: MsiShape,
        gsis: Vec<u32>,
        router: Arc<dyn MsiRouter>,
        sources: Vec<EventFd>,
    ) -> Self {
        let mut table = Msix::new(gsis, router);
        for (v, evt) in sources.into_iter().enumerate() {
            let source = table.add_source(evt);
            table.set_source_vector(source, v as u16);
        }
        Msi { shape, control: 0, addr: 0, data: 0, mask: 0, table }
    }

    pub fn shape(&self) -> &MsiShape {
        &self.shape
    }

    /// Whether config byte `offset` is one of the capability's registers
    /// (its ID and next pointer are not: they are the list's).
    pub fn covers(&self, offset: usize) -> bool {
        (self.shape.offset + 2..self.shape.offset + self.shape.size()).contains(&offset)
    }

    /// Vectors on: Multiple Message Enable, capped at what the function
    /// can use (a guest asking more gets what there is, as hardware).
    pub fn vectors_enabled(&self) -> u32 {
        if self.control & ENABLE == 0 {
            return 0;
        }
        let mme = u32::from((self.control >> 4) & 7).min(u32::from(self.shape.mmc()));
        1 << mme
    }

    fn control(&self) -> u16 {
        let offered = self.shape.mmc() << 1
            | if self.shape.is_64bit { ADDR_64 } else { 0 }
            | if self.shape.per_vector_mask { PER_VECTOR_MASK } else { 0 };
        offered | self.control
    }

    /// The capability's byte at `at` (relative to its start, 2..len).
    fn byte(&self, at: usize) -> u8 {
        let pending_at = self.shape.mask_at().map(|m| m + 4);
        let field = |value: u64, start: usize| (value >> (8 * (at - start))) as u8;
        match at {
            2..=3 => field(self.control().into(), 2),
            4..=7 => field(self.addr & 0xffff_ffff, 4),
            8..=11 if self.shape.is_64bit => field(self.addr >> 32, 8),
            a if (self.shape.data_at()..self.shape.data_at() + 2).contains(&a) => {
                field(self.data.into(), self.shape.data_at())
            }
            a if self.shape.mask_at().is_some_and(|m| (m..m + 4).contains(&a)) => {
                field(self.mask.into(), self.shape.mask_at().unwrap_or_default())
            }
            a if pending_at.is_some_and(|p| (p..p + 4).contains(&a)) => {
                let p = pending_at.unwrap_or_default();
                field(self.pending().into(), p)
            }
            _ => 0,
        }
    }

    /// Config dword `reg` with the capability's registers emulated over
    /// `host` (which supplies the ID and next pointer, and anything past
    /// the capability).
    pub fn read_reg(&self, reg: usize, host: u32) -> u32 {
        let mut bytes = host.to_le_bytes();
        for (i, b) in bytes.iter_mut().enumerate() {
            let offset = reg * 4 + i;
            if self.covers(offset) {
                *b = self.byte(offset - self.shape.offset);
            }
        }
        u32::from_le_bytes(bytes)
    }

    /// A guest write at config `offset`; the bytes outside the
    /// capability's registers are not its business.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Option<MsiChange> {
        let before = self.vectors_enabled();
        for (i, &b) in data.iter().enumerate() {
            if !self.covers(offset + i) {
                continue;
            }
            let at = offset + i - self.shape.offset;
            let set = |value: u64, start: usize| -> u64 {
                let shift = 8 * (at - start);
                (value & !(0xff << shift)) | u64::from(b) << shift
            };
            match at {
                2..=3 => {
                    let c = set(self.control.into(), 2) as u16;
                    self.control = c & WRITABLE_CONTROL;
                }
                // Message addresses are dword aligned.
                4..=7 => {
                    let lo = set(self.addr & 0xffff_ffff, 4) & !3;
                    self.addr = (self.addr & !0xffff_ffff) | lo;
                }
                8..=11 if self.shape.is_64bit => {
                    let hi = set(self.addr >> 32, 8);
                    self.addr = (self.addr & 0xffff_ffff) | hi << 32;
                }
                a if (self.shape.data_at()..self.shape.data_at() + 2).contains(&a) => {
                    self.data = set(self.data.into(), self.shape.data_at()) as u16;
                }
                a if self.shape.mask_at().is_some_and(|m| (m..m + 4).contains(&a)) => {
                    let m = self.shape.mask_at().unwrap_or_default();
                    self.mask = set(self.mask.into(), m) as u32;
                }
                _ => {} // pending bits and reserved bytes: read-only
            }
        }
        self.sync();
        let after = self.vectors_enabled();
        (after != before).then_some(MsiChange::Vectors(after))
    }

    /// The table follows the registers: the enabled vectors' messages and
    /// masks, the others masked; the table on while MSI is. Only entries
    /// that change are written, so a mask write touches one irqfd.
    fn sync(&mut self) {
        let n = self.vectors_enabled();
        // Multiple message: the vector number in the data's low bits.
        let low = n.max(1) - 1;
        for v in 0..self.table.len() {
            let masked = v as u32 >= n || self.mask & (1 << v) != 0;
            let data = (u32::from(self.data) & !low) | (v as u32 & low);
            let mut message = [0u8; 12];
            message[..8].copy_from_slice(&self.addr.to_le_bytes());
            message[8..].copy_from_slice(&data.to_le_bytes());
            let offset = v as u64 * ENTRY_SIZE;
            let mut current = [0u8; 16];
            self.table.table_read(offset, &mut current);
            let control = u32::from(masked).to_le_bytes();
            if current[..12] != message {
                // Masked while the message changes, so the vector never
                // runs with half of it.
                self.table.table_write(offset + 12, &1u32.to_le_bytes());
                self.table.table_write(offset, &message[..8]);
                self.table.table_write(offset + 8, &message[8..]);
                self.table.table_write(offset + 12, &control);
            } else if current[12..] != control {
                self.table.table_write(offset + 12, &control);
            }
        }
        self.table.set_control(MsixControl { enabled: n > 0, function_masked: false });
    }

    /// Vectors held back while masked (the Pending Bits register).
    fn pending(&self) -> u32 {
        let mut pba = [0u8; 8];
        self.table.pba_read(0, &mut pba);
        u64::from_le_bytes(pba) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msix::tests::{gsis, Routes};

    fn msi(shape: MsiShape) -> (Msi, Vec<EventFd>, Arc<Routes>) {
        let routes = Arc::new(Routes::default());
        let evts: Vec<EventFd> =
            (0..shape.vectors).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect();
        let sources = evts.iter().map(|e| e.try_clone().unwrap()).collect();
        let m = Msi::new(shape, gsis(shape.vectors), routes.clone(), sources);
        (m, evts, routes)
    }

    const FOUR_64_MASKED: MsiShape =
        MsiShape { offset: 0x50, vectors: 4, is_64bit: true, per_vector_mask: true };

    /// What the guest reads: the function's capabilities in Message
    /// Control, its own registers back, the host's ID and next pointer.
    #[test]
    fn registers_read_back() {
        let (mut m, _, _) = msi(FOUR_64_MASKED);
        assert_eq!(m.read_reg(0x50 / 4, 0xffff_6005), 0x0184_6005, "MMC 4, 64-bit, PVM");
        m.write(0x54, &0xfee0_1003u32.to_le_bytes());
        m.write(0x58, &1u32.to_le_bytes());
        m.write(0x5c, &0xabcdu16.to_le_bytes());
        m.write(0x60, &0xau32.to_le_bytes());
        assert_eq!(m.read_reg(0x54 / 4, 0), 0xfee0_1000, "dword aligned");
        assert_eq!(m.read_reg(0x58 / 4, 0), 1);
        assert_eq!(m.read_reg(0x5c / 4, 0xffff_ffff), 0x0000_abcd, "data, reserved half 0");
        assert_eq!(m.read_reg(0x60 / 4, 0), 0xa);
        // Past the capability: the host's.
        assert_eq!(m.read_reg(0x68 / 4, 0x1234_5678), 0x1234_5678);
        // Read-only bits stay: MMC, 64-bit, PVM; MME is the guest's.
        m.write(0x52, &0xffffu16.to_le_bytes());
        assert_eq!(m.read_reg(0x50 / 4, 0x6005) >> 16, 0x0184 | 0x71);
        // A 32-bit capability without masking has its data at 8.
        let (mut m, _, _) =
            msi(MsiShape { offset: 0x40, vectors: 1, is_64bit: false, per_vector_mask: false });
        m.write(0x48, &0x41u16.to_le_bytes());
        assert_eq!(m.read_reg(0x48 / 4, 0xffff_0000), 0xffff_0041, "beyond 10 bytes: host");
        assert!(!m.covers(0x4a) && m.covers(0x49));
    }

    /// Enabling routes each enabled vector with its number in the data;
    /// a masked vector is held back and pending, delivered once on unmask;
    /// the host hears only of the vector count changing.
    #[test]
    fn enable_and_mask() {
        let (mut m, evts, routes) = msi(FOUR_64_MASKED);
        m.write(0x54, &0xfee0_0000u32.to_le_bytes());
        m.write(0x5c, &0x40u16.to_le_bytes());
        m.write(0x60, &0b0010u32.to_le_bytes());
        // MME = 2 (four vectors), enable.
        assert_eq!(m.write(0x52, &(2 << 4 | 1u16).to_le_bytes()), Some(MsiChange::Vectors(4)));
        let routed: Vec<(u32, u32)> =
            routes.routes.lock().unwrap().iter().map(|&(g, msg)| (g, msg.data)).collect();
        for (gsi, data) in [(24, 0x40), (26, 0x42), (27, 0x43)] {
            assert!(routed.contains(&(gsi, data)), "{routed:x?}");
        }
        assert!(!routed.iter().any(|&(g, _)| g == 25), "vector 1 masked: no route yet");
        evts[0].write(1).unwrap();
        evts[1].write(1).unwrap();
        routes.fire();
        assert_eq!(routes.take_delivered(), [24]);
        assert_eq!(m.read_reg(0x64 / 4, 0), 0b0010, "vector 1 pending");
        // Unmask: held back once, delivered once.
        assert_eq!(m.write(0x60, &0u32.to_le_bytes()), None);
        routes.fire();
        assert_eq!(routes.take_delivered(), [25]);
        assert_eq!(m.read_reg(0x64 / 4, 0), 0);
        // Fewer vectors: the host is told; vector 2 is no longer live.
        assert_eq!(m.write(0x52, &(1 << 4 | 1u16).to_le_bytes()), Some(MsiChange::Vectors(2)));
        evts[2].write(1).unwrap();
        routes.fire();
        assert_eq!(routes.take_delivered(), Vec::<u32>::new());
        assert_eq!(m.write(0x52, &0u16.to_le_bytes()), Some(MsiChange::Vectors(0)));
        // A guest asking more than the function offers gets what there is.
        assert_eq!(m.write(0x52, &(5 << 4 | 1u16).to_le_bytes()), Some(MsiChange::Vectors(4)));
    }
}
