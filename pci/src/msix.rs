//! The MSI-X table and pending-bit array of one function (PCI 3.0, 6.8.2).
//!
//! Interrupts come from *sources*: eventfds that something signals when it
//! wants an interrupt (a virtio queue's call eventfd, later a VFIO vector's
//! eventfd). Each source is bound to a vector by the device model
//! (virtio's queue_msix_vector); each vector has its own GSI. While MSI-X is
//! on and the vector unmasked, every source bound to it is a KVM irqfd on
//! the vector's GSI, so a signal reaches the guest without skiff; the
//! guest's message (address, data) is the GSI's MSI route, rewritten only
//! when the guest unmasks a vector or changes an unmasked one.
//!
//! Masking a vector (or the function, or turning MSI-X off) detaches its
//! sources from KVM: their signals accumulate in the eventfds, which is
//! what the PBA shows. Unmasking attaches them again and re-signals a
//! source that was signalled meanwhile, so KVM delivers exactly one
//! interrupt for everything held back.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::capability::MsixControl;

/// Bytes per table entry: address low, address high, data, vector control.
pub const ENTRY_SIZE: u64 = 16;
const VECTOR_MASKED: u32 = 1;
/// A source bound to no vector (virtio's VIRTIO_MSI_NO_VECTOR).
pub const NO_VECTOR: u16 = 0xffff;

/// An MSI message as the guest programmed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr: u64,
    pub data: u32,
}

/// What the VMM does for MSI-X in KVM: the GSI's MSI route
/// (KVM_SET_GSI_ROUTING) and the irqfds from sources to GSIs (KVM_IRQFD).
pub trait MsiRouter: Send + Sync {
    fn route(&self, gsi: u32, msg: MsiMessage) -> std::io::Result<()>;
    /// Signals of `evt` now raise `gsi`. KVM delivers a signal that is
    /// already pending when this is called.
    fn attach(&self, evt: &EventFd, gsi: u32) -> std::io::Result<()>;
    fn detach(&self, evt: &EventFd, gsi: u32) -> std::io::Result<()>;
}

/// One interrupt source and where it is attached.
struct Source {
    evt: EventFd,
    vector: u16,
    /// The GSI its irqfd is registered on, if any.
    attached: Option<u32>,
}

pub struct Msix {
    /// Per vector: address low, address high, data, vector control.
    table: Vec<[u32; 4]>,
    /// The message last given to the router for each vector.
    routed: Vec<Option<MsiMessage>>,
    control: MsixControl,
    gsis: Vec<u32>,
    sources: Vec<Source>,
    router: Arc<dyn MsiRouter>,
}

/// Whether an eventfd has a count, without consuming it.
fn signalled(evt: &EventFd) -> bool {
    let mut pfd = libc::pollfd { fd: evt.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for a descriptor `evt` keeps open; timeout 0.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

impl Msix {
    /// A table with one entry per GSI, every entry masked (the reset state).
    pub fn new(gsis: Vec<u32>, router: Arc<dyn MsiRouter>) -> Self {
        let n = gsis.len();
        Msix {
            table: vec![[0, 0, 0, VECTOR_MASKED]; n],
            routed: vec![None; n],
            control: MsixControl::default(),
            gsis,
            sources: Vec::new(),
            router,
        }
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub fn function_masked(&self) -> bool {
        self.control.function_masked
    }

    pub fn enabled(&self) -> bool {
        self.control.enabled
    }

    /// Adds an interrupt source, bound to no vector; returns its index.
    pub fn add_source(&mut self, evt: EventFd) -> usize {
        self.sources.push(Source { evt, vector: NO_VECTOR, attached: None });
        self.sources.len() - 1
    }

    /// The vector `source` is bound to (NO_VECTOR if none or no such source).
    pub fn source_vector(&self, source: usize) -> u16 {
        self.sources.get(source).map_or(NO_VECTOR, |s| s.vector)
    }

    /// Binds `source` to `vector`; a vector past the table binds it to none.
    /// Returns the vector it is now bound to.
    pub fn set_source_vector(&mut self, source: usize, vector: u16) -> u16 {
        let vector = if usize::from(vector) < self.table.len() { vector } else { NO_VECTOR };
        let Some(s) = self.sources.get_mut(source) else { return NO_VECTOR };
        s.vector = vector;
        self.reconcile(source);
        vector
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
        self.reconcile_all();
    }

    /// Function reset: every vector masked, MSI-X off, every source unbound
    /// and its pending signals dropped. Routes stay; they are rewritten
    /// before use.
    pub fn reset(&mut self) {
        self.table.iter_mut().for_each(|e| *e = [0, 0, 0, VECTOR_MASKED]);
        self.control = MsixControl::default();
        for s in &mut self.sources {
            s.vector = NO_VECTOR;
        }
        self.reconcile_all();
        for s in &self.sources {
            let _ = s.evt.read();
        }
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
            for source in 0..self.sources.len() {
                if usize::from(self.sources[source].vector) == v {
                    self.reconcile(source);
                }
            }
        }
    }

    /// The PBA is read-only to the guest: a vector is pending while it
    /// cannot be delivered (masked, or MSI-X off) and one of its sources
    /// was signalled.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let first = (offset + i as u64) * 8;
            *byte = (0..8u64)
                .filter(|bit| usize::try_from(first + bit).is_ok_and(|v| self.pending(v)))
                .fold(0u8, |b, bit| b | 1 << bit);
        }
    }

    fn pending(&self, v: usize) -> bool {
        v < self.table.len()
            && (self.masked(v) || !self.control.enabled)
            && self.sources.iter().any(|s| usize::from(s.vector) == v && signalled(&s.evt))
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
        match self.router.route(self.gsis[v], msg) {
            Ok(()) => self.routed[v] = Some(msg),
            Err(e) => devices::error_limited!("msix: cannot route vector {v}: {e}"),
        }
    }

    fn reconcile_all(&mut self) {
        for source in 0..self.sources.len() {
            self.reconcile(source);
        }
    }

    /// Attaches `source` to its vector's GSI exactly when KVM may deliver
    /// it (MSI-X on, vector and function unmasked), detaches it otherwise.
    fn reconcile(&mut self, source: usize) {
        let v = usize::from(self.sources[source].vector);
        let wanted =
            (v < self.table.len() && self.control.enabled && !self.masked(v)).then(|| self.gsis[v]);
        let s = &mut self.sources[source];
        if s.attached == wanted {
            return;
        }
        if let Some(gsi) = s.attached.take() {
            if let Err(e) = self.router.detach(&s.evt, gsi) {
                devices::error_limited!("msix: cannot detach a source from GSI {gsi}: {e}");
            }
        }
        let Some(gsi) = wanted else { return };
        // What was signalled while detached is delivered once: consumed
        // here, then signalled again with KVM listening.
        let held = s.evt.read().is_ok();
        match self.router.attach(&s.evt, gsi) {
            Ok(()) => s.attached = Some(gsi),
            Err(e) => devices::error_limited!("msix: cannot attach a source to GSI {gsi}: {e}"),
        }
        if held {
            if let Err(e) = s.evt.write(1) {
                devices::error_limited!("msix: cannot re-signal vector {v}: {e}");
            }
        }
    }
}

#[cfg(any(test, feature = "fuzzing"))]
#[cfg_attr(not(test), allow(dead_code, unused_imports))]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;

    /// KVM as far as MSI-X sees it: routes, irqfds, and the interrupts an
    /// attached irqfd delivers (`fire`: each attached eventfd with a count
    /// is consumed and raises its GSI once, as KVM's irqfd wakeup does).
    #[derive(Default)]
    pub(crate) struct Routes {
        pub(crate) routes: Mutex<Vec<(u32, MsiMessage)>>,
        /// (descriptor passed to attach, a duplicate to read, GSI).
        attached: Mutex<Vec<(i32, EventFd, u32)>>,
        pub(crate) delivered: Mutex<Vec<u32>>,
    }

    impl Routes {
        pub(crate) fn fire(&self) {
            for (_, evt, gsi) in self.attached.lock().unwrap().iter() {
                if evt.read().is_ok() {
                    self.delivered.lock().unwrap().push(*gsi);
                }
            }
        }

        pub(crate) fn take_delivered(&self) -> Vec<u32> {
            self.fire();
            std::mem::take(&mut self.delivered.lock().unwrap())
        }

        fn attached(&self) -> Vec<(i32, u32)> {
            self.attached.lock().unwrap().iter().map(|(fd, _, g)| (*fd, *g)).collect()
        }
    }

    impl MsiRouter for Routes {
        fn route(&self, gsi: u32, msg: MsiMessage) -> std::io::Result<()> {
            self.routes.lock().unwrap().push((gsi, msg));
            Ok(())
        }
        fn attach(&self, evt: &EventFd, gsi: u32) -> std::io::Result<()> {
            let mut a = self.attached.lock().unwrap();
            assert!(!a.iter().any(|(fd, ..)| *fd == evt.as_raw_fd()), "attached twice");
            a.push((evt.as_raw_fd(), evt.try_clone()?, gsi));
            Ok(())
        }
        fn detach(&self, evt: &EventFd, gsi: u32) -> std::io::Result<()> {
            let mut a = self.attached.lock().unwrap();
            let at = a.iter().position(|(fd, _, g)| *g == gsi && *fd == evt.as_raw_fd());
            a.remove(at.expect("detach of an attached source"));
            Ok(())
        }
    }

    pub(crate) fn gsis(n: u32) -> Vec<u32> {
        (0..n).map(|i| 24 + i).collect()
    }

    fn program(m: &mut Msix, v: u64, addr: u64, data: u32) {
        m.table_write(v * 16, &addr.to_le_bytes());
        m.table_write(v * 16 + 8, &data.to_le_bytes());
        m.table_write(v * 16 + 12, &0u32.to_le_bytes());
    }

    fn mask(m: &mut Msix, v: u64, masked: bool) {
        m.table_write(v * 16 + 12, &u32::from(masked).to_le_bytes());
    }

    const ON: MsixControl = MsixControl { enabled: true, function_masked: false };

    fn source(m: &mut Msix, vector: u16) -> EventFd {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let s = m.add_source(evt.try_clone().unwrap());
        assert_eq!(m.set_source_vector(s, vector), vector);
        evt
    }

    fn pba(m: &Msix) -> u8 {
        let mut b = [0u8];
        m.pba_read(0, &mut b);
        b[0]
    }

    #[test]
    fn table_reads_back_and_resets_masked() {
        let routes = Arc::new(Routes::default());
        let mut m = Msix::new(gsis(2), routes.clone());
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
            routes.routes.lock().unwrap().as_slice(),
            [(25, MsiMessage { addr: 0xfee0_1000, data: 0x4041 })]
        );
        m.reset();
        m.table_read(28, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);
    }

    #[test]
    fn routes_follow_unmasked_vectors_only() {
        let routes = Arc::new(Routes::default());
        let mut m = Msix::new(gsis(2), routes.clone());
        // Writes to a masked entry route nothing.
        m.table_write(0, &0xfee0_0000u32.to_le_bytes());
        m.table_write(8, &0x30u32.to_le_bytes());
        assert!(routes.routes.lock().unwrap().is_empty());
        m.table_write(12, &0u32.to_le_bytes());
        // A changed message on an unmasked vector is routed again; an
        // unchanged rewrite is not.
        m.table_write(8, &0x31u32.to_le_bytes());
        m.table_write(12, &0u32.to_le_bytes());
        let got = routes.routes.lock().unwrap().clone();
        assert_eq!(
            got,
            [
                (24, MsiMessage { addr: 0xfee0_0000, data: 0x30 }),
                (24, MsiMessage { addr: 0xfee0_0000, data: 0x31 })
            ]
        );
    }

    /// A vector masked while its source fires: nothing reaches the guest,
    /// the PBA shows it, and unmasking delivers exactly one interrupt for
    /// both signals.
    #[test]
    fn a_masked_vector_delivers_once_on_unmask_and_never_while_masked() {
        let routes = Arc::new(Routes::default());
        let mut m = Msix::new(gsis(2), routes.clone());
        let call = source(&mut m, 1);
        program(&mut m, 1, 0xfee0_0000, 0x31);
        m.set_control(ON);
        call.write(1).unwrap();
        assert_eq!(routes.take_delivered(), [25], "unmasked: straight to KVM");

        mask(&mut m, 1, true);
        assert!(routes.attached().is_empty(), "detached while masked");
        call.write(1).unwrap();
        call.write(1).unwrap();
        assert_eq!(routes.take_delivered(), [] as [u32; 0]);
        assert_eq!(pba(&m), 0b10);

        mask(&mut m, 1, false);
        assert_eq!(routes.take_delivered(), [25], "exactly one");
        assert_eq!(pba(&m), 0);
        assert_eq!(routes.take_delivered(), [] as [u32; 0]);
        call.write(1).unwrap();
        assert_eq!(routes.take_delivered(), [25]);
    }

    #[test]
    fn function_mask_and_msix_off_hold_every_vector() {
        let routes = Arc::new(Routes::default());
        let mut m = Msix::new(gsis(2), routes.clone());
        let a = source(&mut m, 0);
        let b = source(&mut m, 0);
        program(&mut m, 0, 0xfee0_0000, 0x30);
        // MSI-X off: held.
        a.write(1).unwrap();
        assert_eq!(routes.take_delivered(), [] as [u32; 0]);
        assert_eq!(pba(&m), 1);
        m.set_control(ON);
        assert_eq!(routes.take_delivered(), [24], "delivered on enable");
        assert_eq!(pba(&m), 0);
        // Two sources on one vector: each signal is an interrupt.
        a.write(1).unwrap();
        b.write(1).unwrap();
        assert_eq!(routes.take_delivered(), [24, 24]);
        m.set_control(MsixControl { enabled: true, function_masked: true });
        b.write(1).unwrap();
        assert_eq!(routes.take_delivered(), [] as [u32; 0]);
        assert_eq!(pba(&m), 1);
        m.set_control(ON);
        assert_eq!(routes.take_delivered(), [24]);
        // Rebinding a source moves its irqfd; past the table means none.
        assert_eq!(m.set_source_vector(1, 7), NO_VECTOR);
        assert_eq!(routes.attached().len(), 1);
        m.reset();
        assert!(routes.attached().is_empty());
        assert_eq!(m.source_vector(0), NO_VECTOR);
        assert_eq!(m.table_size(), 32);
        assert_eq!(m.pba_size(), 8);
    }
}
