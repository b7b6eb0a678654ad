//! The MSI-X table and pending-bit array of one function (PCI 3.0, 6.8.2).
//!
//! Each vector has a GSI and an eventfd that the VMM bound to that GSI with
//! KVM's irqfd; signalling a vector writes its eventfd, so the interrupt
//! reaches the guest without an exit. The guest's message (address, data)
//! for a vector becomes a KVM MSI route for its GSI through `MsiRouter`,
//! updated only when the guest unmasks a vector or changes an unmasked one.
//! A masked vector's interrupt is held in the PBA and delivered on unmask.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::capability::MsixControl;

/// Bytes per table entry: address low, address high, data, vector control.
pub const ENTRY_SIZE: u64 = 16;
const VECTOR_MASKED: u32 = 1;

/// An MSI message as the guest programmed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr: u64,
    pub data: u32,
}

/// Points a GSI at an MSI message (KVM_SET_GSI_ROUTING, for the VMM).
pub trait MsiRouter: Send + Sync {
    fn route(&self, gsi: u32, msg: MsiMessage) -> std::io::Result<()>;
}

/// One vector's way into the guest.
pub struct MsixVector {
    pub gsi: u32,
    /// Bound to `gsi` with irqfd by the VMM.
    pub evt: EventFd,
}

pub struct Msix {
    /// Per vector: address low, address high, data, vector control.
    table: Vec<[u32; 4]>,
    pending: Vec<bool>,
    /// The message last given to the router for each vector.
    routed: Vec<Option<MsiMessage>>,
    control: MsixControl,
    vectors: Vec<MsixVector>,
    router: Arc<dyn MsiRouter>,
}

impl Msix {
    /// A table with one entry per vector, every entry masked (the reset state).
    pub fn new(vectors: Vec<MsixVector>, router: Arc<dyn MsiRouter>) -> Self {
        let n = vectors.len();
        Msix {
            table: vec![[0, 0, 0, VECTOR_MASKED]; n],
            pending: vec![false; n],
            routed: vec![None; n],
            control: MsixControl::default(),
            vectors,
            router,
        }
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub fn enabled(&self) -> bool {
        self.control.enabled
    }

    pub fn vectors(&self) -> &[MsixVector] {
        &self.vectors
    }

    /// Table size in bytes, and PBA size in bytes (whole qwords).
    pub fn table_size(&self) -> u64 {
        self.table.len() as u64 * ENTRY_SIZE
    }

    pub fn pba_size(&self) -> u64 {
        (self.table.len() as u64).div_ceil(64) * 8
    }

    /// Follows Message Control as the guest wrote it in config space.
    pub fn set_control(&mut self, control: MsixControl) {
        self.control = control;
        for v in 0..self.table.len() {
            self.deliver_if_pending(v);
        }
    }

    /// Reset (function reset or a new boot): every vector masked, nothing
    /// pending, MSI-X off. Routes stay; they are rewritten before use.
    pub fn reset(&mut self) {
        self.table.iter_mut().for_each(|e| *e = [0, 0, 0, VECTOR_MASKED]);
        self.pending.iter_mut().for_each(|p| *p = false);
        self.control = MsixControl::default();
    }

    /// Table reads: 4 or 8 bytes, naturally aligned (PCI 3.0 6.8.2); anything
    /// else reads as all ones.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            if let Some(dword) = self.table_dword(offset + 4 * i as u64, chunk.len()) {
                chunk.copy_from_slice(&dword.to_le_bytes());
            }
        }
    }

    fn table_dword(&self, offset: u64, len: usize) -> Option<u32> {
        if len != 4 || !offset.is_multiple_of(4) {
            return None;
        }
        let entry = self.table.get(usize::try_from(offset / ENTRY_SIZE).ok()?)?;
        Some(entry[(offset % ENTRY_SIZE / 4) as usize])
    }

    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            log::debug!("msix: {}-byte table write at {offset:#x} ignored", data.len());
            return;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let at = offset + 4 * i as u64;
            let Ok(v) = usize::try_from(at / ENTRY_SIZE) else { return };
            let Some(entry) = self.table.get_mut(v) else { return };
            let word = (at % ENTRY_SIZE / 4) as usize;
            let value = u32::from_le_bytes(chunk.try_into().unwrap_or_default());
            // Only the mask bit of vector control is writable.
            entry[word] = if word == 3 { value & VECTOR_MASKED } else { value };
            self.update_route(v);
            self.deliver_if_pending(v);
        }
    }

    /// The PBA is read-only to the guest.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let first = (offset + i as u64) * 8;
            *byte = (0..8u64)
                .filter(|bit| {
                    usize::try_from(first + bit)
                        .ok()
                        .and_then(|v| self.pending.get(v))
                        .is_some_and(|&p| p)
                })
                .fold(0u8, |b, bit| b | 1 << bit);
        }
    }

    fn masked(&self, v: usize) -> bool {
        self.control.function_masked || self.table[v][3] & VECTOR_MASKED != 0
    }

    fn message(&self, v: usize) -> MsiMessage {
        let e = &self.table[v];
        MsiMessage { addr: u64::from(e[1]) << 32 | u64::from(e[0]), data: e[2] }
    }

    /// Gives the router an unmasked vector's message when it changed, so
    /// that the next signal goes where the guest now wants it.
    fn update_route(&mut self, v: usize) {
        if self.table[v][3] & VECTOR_MASKED != 0 {
            return;
        }
        let msg = self.message(v);
        if self.routed[v] == Some(msg) {
            return;
        }
        match self.router.route(self.vectors[v].gsi, msg) {
            Ok(()) => self.routed[v] = Some(msg),
            Err(e) => log::error!("msix: cannot route vector {v}: {e}"),
        }
    }

    fn deliver_if_pending(&mut self, v: usize) {
        if self.pending[v] && self.control.enabled && !self.masked(v) {
            self.pending[v] = false;
            self.signal(v);
        }
    }

    fn signal(&self, v: usize) {
        if let Err(e) = self.vectors[v].evt.write(1) {
            log::error!("msix: cannot signal vector {v}: {e}");
        }
    }

    /// Raises `vector`: now if MSI-X is on and the vector unmasked, else
    /// held in the PBA. An out-of-range vector does nothing.
    pub fn notify(&mut self, vector: u16) {
        let v = usize::from(vector);
        if v >= self.table.len() {
            return;
        }
        if self.masked(v) || !self.control.enabled {
            self.pending[v] = true;
        } else {
            self.signal(v);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    pub(crate) struct Routes(pub(crate) Mutex<Vec<(u32, MsiMessage)>>);

    impl MsiRouter for Routes {
        fn route(&self, gsi: u32, msg: MsiMessage) -> std::io::Result<()> {
            self.0.lock().unwrap().push((gsi, msg));
            Ok(())
        }
    }

    pub(crate) fn vectors(n: u32) -> Vec<MsixVector> {
        (0..n)
            .map(|i| MsixVector { gsi: 24 + i, evt: EventFd::new(libc::EFD_NONBLOCK).unwrap() })
            .collect()
    }

    fn fired(m: &Msix, v: usize) -> bool {
        m.vectors()[v].evt.read().is_ok()
    }

    fn program(m: &mut Msix, v: u64, addr: u64, data: u32) {
        m.table_write(v * 16, &addr.to_le_bytes());
        m.table_write(v * 16 + 8, &data.to_le_bytes());
        m.table_write(v * 16 + 12, &0u32.to_le_bytes());
    }

    const ON: MsixControl = MsixControl { enabled: true, function_masked: false };

    #[test]
    fn table_reads_back_and_resets_masked() {
        let routes = Arc::new(Routes::default());
        let mut m = Msix::new(vectors(2), routes.clone());
        let mut d = [0u8; 4];
        m.table_read(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "masked at reset");
        m.table_write(16, &0xfee0_1000u32.to_le_bytes());
        m.table_write(24, &0x4041u32.to_le_bytes());
        m.table_write(28, &0xffff_fffeu32.to_le_bytes());
        m.table_read(16, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xfee0_1000);
        m.table_read(28, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0, "only the mask bit is writable");
        let mut q = [0u8; 8];
        m.table_read(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_1000);
        // Out of range and odd sizes read as ones and write nothing.
        m.table_read(32, &mut d);
        assert_eq!(d, [0xff; 4]);
        m.table_read(17, &mut d);
        assert_eq!(d, [0xff; 4]);
        m.table_write(2, &[1, 2]);
        assert_eq!(
            routes.0.lock().unwrap().as_slice(),
            [(25, MsiMessage { addr: 0xfee0_1000, data: 0x4041 })]
        );
        m.reset();
        m.table_read(28, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);
    }

    #[test]
    fn routes_follow_unmasked_vectors_only() {
        let routes = Arc::new(Routes::default());
        let mut m = Msix::new(vectors(2), routes.clone());
        // Writes to a masked entry route nothing.
        m.table_write(0, &0xfee0_0000u32.to_le_bytes());
        m.table_write(8, &0x30u32.to_le_bytes());
        assert!(routes.0.lock().unwrap().is_empty());
        m.table_write(12, &0u32.to_le_bytes());
        // A changed message on an unmasked vector is routed again; an
        // unchanged rewrite is not.
        m.table_write(8, &0x31u32.to_le_bytes());
        m.table_write(12, &0u32.to_le_bytes());
        let got = routes.0.lock().unwrap().clone();
        assert_eq!(
            got,
            [
                (24, MsiMessage { addr: 0xfee0_0000, data: 0x30 }),
                (24, MsiMessage { addr: 0xfee0_0000, data: 0x31 })
            ]
        );
    }

    #[test]
    fn masked_vectors_hold_their_interrupt_until_unmasked() {
        let mut m = Msix::new(vectors(2), Arc::new(Routes::default()));
        // MSI-X off: held.
        m.notify(0);
        assert!(!fired(&m, 0));
        let mut pba = [0u8; 8];
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 1);
        program(&mut m, 0, 0xfee0_0000, 0x30);
        assert!(!fired(&m, 0), "MSI-X still disabled");
        m.set_control(ON);
        assert!(fired(&m, 0), "delivered on enable");
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0);
        // Unmasked and enabled: straight through.
        m.notify(0);
        assert!(fired(&m, 0));
        // Function mask holds every vector.
        m.set_control(MsixControl { enabled: true, function_masked: true });
        m.notify(0);
        assert!(!fired(&m, 0));
        m.set_control(ON);
        assert!(fired(&m, 0));
        // Vector 1 is still masked; out-of-range vectors are ignored.
        m.notify(1);
        m.notify(7);
        assert!(!fired(&m, 1));
        m.pba_read(0, &mut pba[..1]);
        assert_eq!(pba[0], 2);
        program(&mut m, 1, 0xfee0_0000, 0x31);
        assert!(fired(&m, 1));
        assert_eq!(m.table_size(), 32);
        assert_eq!(m.pba_size(), 8);
    }
}
