//! The seam between the PCI root and a PCI function.

use std::os::fd::BorrowedFd;

use vmm_sys_util::eventfd::EventFd;

use crate::config::BarReprogram;

/// A part of a BAR the guest reaches directly: a host file's range mapped
/// as guest memory (a passed-through device's registers), so its accesses
/// never exit to the VMM.
pub struct DirectArea<'a> {
    /// Where in the BAR.
    pub offset: u64,
    pub len: u64,
    pub fd: BorrowedFd<'a>,
    /// Where in the file.
    pub fd_offset: u64,
}

/// A PCI function as the root complex sees it: its configuration space and
/// its BARs, addressed by BAR index so the device never knows where the
/// guest put them. Address allocation is the root's business, not the
/// device's.
pub trait PciDevice: Send {
    /// The config dword at index `reg` (byte offset / 4), 0..1024.
    fn config_read(&mut self, reg: usize) -> u32;

    /// A guest write of `data` (1, 2 or 4 bytes) at byte `offset` in config
    /// space. Returns the BAR it moved, so the VMM can move what backs it.
    fn config_write(&mut self, offset: u64, data: &[u8]) -> Option<BarReprogram>;

    /// An access at `offset` inside BAR `bar` (the low index of a 64-bit BAR).
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let _ = (bar, offset);
        data.fill(0xff);
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let _ = (bar, offset, data);
    }

    /// Doorbells the VMM should catch in KVM instead (ioeventfd, any write
    /// length, no datamatch): (BAR, offset in the BAR, eventfd signalled).
    /// The VMM moves them when the BAR moves.
    fn ioeventfds(&self) -> Vec<(usize, u64, &EventFd)> {
        Vec::new()
    }

    /// Its INTx line as eventfds the VMM registers on the line's GSI as a
    /// level-triggered irqfd: (trigger, resample). The device unmasks the
    /// line itself when resample fires (a passed-through function's host
    /// does, in the kernel).
    fn intx(&self) -> Option<(&EventFd, &EventFd)> {
        None
    }

    /// The parts of BAR `bar` the VMM maps into the guest directly while
    /// the BAR sits at an address; the rest still comes to `bar_read` and
    /// `bar_write`.
    fn direct_areas(&self, bar: usize) -> Vec<DirectArea<'_>> {
        let _ = bar;
        Vec::new()
    }
}
