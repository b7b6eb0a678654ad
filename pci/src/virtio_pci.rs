//! The modern virtio-pci transport (virtio 1.x, 4.1), laid out as QEMU lays
//! out a `disable-legacy=on` device, so a guest (and `lspci`) sees the same:
//!
//! - BAR 1, 32-bit, 4 KiB: the MSI-X table at 0, the PBA at 0x800;
//! - BAR 4, 64-bit prefetchable, 16 KiB: common config at 0, ISR at 0x1000,
//!   device config at 0x2000, notifications at 0x3000 (queue N at N × 4).
//!
//! Vendor capabilities point the driver at each region, plus the PCI config
//! access capability, through which a driver can reach any BAR offset with
//! config cycles alone. Notifications become KVM ioeventfds (`ioeventfds`),
//! so a queue kick never exits to skiff. Interrupts: each queue's call
//! eventfd (and the config change's) is an MSI-X source bound to the vector
//! the driver picks, an irqfd while that vector is unmasked, so a signal
//! never exits to skiff either (`crate::msix`); while the driver has MSI-X
//! off, INTA with the ISR register, level-triggered through an irqfd with a
//! resample eventfd (see `VirtioPciInterrupt::resample`), and a call
//! eventfd signalled by a backend outside skiff reaches it through
//! `call_relay`.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use devices::virtio::transport::{raise_needs_reset, QueueField, TransportError, TransportState};
use devices::virtio::{
    CallRelay, GuestMemoryMmap, RelayTarget, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
};
use vmm_sys_util::eventfd::EventFd;

use crate::capability::{MsixCap, PcieCap};
use crate::config::{
    BarKind, BarReprogram, ConfigError, ConfigParams, PciConfig, COMMAND, COMMAND_INTX_DISABLE,
    HEADER_TYPE, HEADER_TYPE_MULTIFUNCTION,
};
use crate::device::PciDevice;
use crate::msix::{MsiRouter, Msix, NO_VECTOR};

pub const VENDOR_VIRTIO: u16 = 0x1af4;
/// Modern device IDs are 0x1040 + the virtio device type.
const DEVICE_ID_BASE: u16 = 0x1040;
/// QEMU's subsystem ID for its virtio devices (PCI_SUBDEVICE_ID_QEMU).
const SUBSYSTEM_QEMU: u16 = 0x1100;

pub const MSIX_BAR: usize = 1;
const MSIX_BAR_SIZE: u64 = 0x1000;
const MSIX_TABLE: u64 = 0;
const MSIX_PBA: u64 = 0x800;

pub const MODERN_BAR: usize = 4;
const MODERN_BAR_SIZE: u64 = 0x4000;
const COMMON_CFG: u64 = 0x0;
const ISR_CFG: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
pub const NOTIFY_CFG: u64 = 0x3000;
const REGION_SIZE: u64 = 0x1000;
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;

const CAP_ID_VENDOR: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;

// Common configuration registers (virtio 1.2, 4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC_LO: u64 = 0x20;
const QUEUE_DESC_HI: u64 = 0x24;
const QUEUE_DRIVER_LO: u64 = 0x28;
const QUEUE_DRIVER_HI: u64 = 0x2c;
const QUEUE_DEVICE_LO: u64 = 0x30;
const QUEUE_DEVICE_HI: u64 = 0x34;

const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("config space: {0}")]
    Config(#[from] ConfigError),
    #[error("the device needs {need} MSI-X vectors, {got} were given")]
    Vectors { need: usize, got: usize },
}

/// The transport's interrupt, shared by the device (which raises it from
/// its worker thread) and the transport (which the guest programs from
/// vCPUs). Raising it takes no lock.
pub struct VirtioPciInterrupt {
    /// The table; its sources are the queues' call eventfds in order, then
    /// the config change's.
    msix: Mutex<Msix>,
    /// Message Control's enable bit, for the lock-free path.
    msix_enabled: AtomicBool,
    /// The same call eventfds, to signal without the lock.
    calls: Vec<EventFd>,
    isr: AtomicU8,
    /// INTA, bound by the VMM with irqfd + resample to the slot's GSI.
    intx_evt: EventFd,
    /// COMMAND.INTX_DISABLE clear.
    intx_enabled: AtomicBool,
    /// The transport's NEEDS_RESET flag.
    needs_reset: Arc<AtomicBool>,
}

impl VirtioPciInterrupt {
    fn msix(&self) -> MutexGuard<'_, Msix> {
        self.msix.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The MSI-X source of a queue or of config changes.
    fn source(&self, t: VirtioInterruptType) -> usize {
        match t {
            VirtioInterruptType::Queue(q) => usize::from(q),
            VirtioInterruptType::Config => self.calls.len() - 1,
        }
    }

    pub fn intx_evt(&self) -> &EventFd {
        &self.intx_evt
    }

    /// Called when KVM's resample eventfd fires, i.e. the guest EOId the
    /// level interrupt and KVM lowered the line: raise it again if the ISR
    /// still has a reason (set after the driver read it), as a level line
    /// would stay up.
    pub fn resample(&self) {
        if self.isr.load(Ordering::SeqCst) != 0
            && self.intx_enabled.load(Ordering::SeqCst)
            && !self.msix_enabled.load(Ordering::SeqCst)
        {
            self.assert_intx();
        }
    }

    fn assert_intx(&self) {
        if let Err(e) = self.intx_evt.write(1) {
            devices::error_limited!("virtio-pci: cannot raise INTx: {e}");
        }
    }

    /// INTx: the reason in the ISR, then the line.
    fn raise_intx(&self, t: VirtioInterruptType) {
        let bit = match t {
            VirtioInterruptType::Config => ISR_CONFIG,
            VirtioInterruptType::Queue(_) => ISR_QUEUE,
        };
        self.isr.fetch_or(bit, Ordering::SeqCst);
        if self.intx_enabled.load(Ordering::SeqCst) {
            self.assert_intx();
        }
    }

    /// Message Control as the guest wrote it. Signals held in the call
    /// eventfds while MSI-X goes off become INTx, as they would have.
    fn set_msix_control(&self, control: crate::capability::MsixControl) {
        let mut msix = self.msix();
        // Enabling: signals from now on go to the call eventfds, which
        // set_control attaches (delivering what they hold). Disabling: the
        // flag first, so new signals take the INTx path, then what the
        // eventfds held becomes INTx below.
        self.msix_enabled.store(control.enabled, Ordering::SeqCst);
        msix.set_control(control);
        if control.enabled {
            return;
        }
        let n = self.calls.len() - 1;
        for (i, call) in self.calls.iter().enumerate() {
            if call.read().is_ok() {
                let t = if i == n {
                    VirtioInterruptType::Config
                } else {
                    VirtioInterruptType::Queue(i as u16)
                };
                self.raise_intx(t);
            }
        }
    }
}

impl VirtioInterrupt for VirtioPciInterrupt {
    fn trigger(&self, t: VirtioInterruptType) -> std::io::Result<()> {
        // A config change shows in the ISR whatever the interrupt mode
        // (virtio 1.2, 4.1.4.5.1); a queue's only with INTx.
        if t == VirtioInterruptType::Config {
            self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        }
        if self.msix_enabled.load(Ordering::SeqCst) {
            // KVM delivers it (irqfd), or the PBA holds it while masked.
            return match self.calls.get(self.source(t)) {
                Some(call) => call.write(1),
                None => Ok(()),
            };
        }
        self.raise_intx(t);
        Ok(())
    }

    fn needs_reset(&self) {
        raise_needs_reset(&self.needs_reset, self, "virtio-pci");
    }
}

impl RelayTarget for VirtioPciInterrupt {
    /// Under MSI-X the call eventfd is KVM's (or waits in the PBA); with
    /// INTx it is skiff's to turn into the ISR and the line.
    fn relay(&self, source: VirtioInterruptType, call: &EventFd) {
        if !self.msix_enabled.load(Ordering::SeqCst) && call.read().is_ok() {
            self.raise_intx(source);
        }
    }
}

/// Where the function sits, which decides its PCIe device/port type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    RootBus,
    BehindRootPort,
}

pub struct VirtioPciDevice {
    config: PciConfig,
    state: TransportState,
    interrupt: Arc<VirtioPciInterrupt>,
    msix_cap: usize,
    /// Offset of the PCI config access capability.
    pci_cfg_cap: usize,
}

/// Vectors a device needs: one per queue and one for config changes.
pub fn vectors_needed(device: &dyn VirtioDevice) -> usize {
    device.queue_max_sizes().len() + 1
}

/// The PCI class QEMU gives each device type.
fn class_code(device_type: u32) -> u32 {
    match device_type {
        1 => 0x02_00_00,  // network controller
        2 => 0x01_00_00,  // SCSI storage (QEMU's choice for virtio-blk)
        26 => 0x01_80_00, // other storage: virtio-fs
        _ => 0xff_00_00,  // unclassified: rng and the rest
    }
}

impl VirtioPciDevice {
    /// `gsis` must hold `vectors_needed(device)` GSIs, one per MSI-X
    /// vector, for `router` to route and attach.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        gsis: Vec<u32>,
        router: Arc<dyn MsiRouter>,
        placement: Placement,
    ) -> Result<Self, VirtioPciError> {
        let state = TransportState::new("virtio-pci", mem, device)?;
        let device_type = state.device().device_type();
        let need = state.num_queues() + 1;
        if gsis.len() != need {
            return Err(VirtioPciError::Vectors { need, got: gsis.len() });
        }
        let mut config = PciConfig::new(&ConfigParams {
            vendor_id: VENDOR_VIRTIO,
            device_id: DEVICE_ID_BASE + device_type as u16,
            revision: 1,
            class_code: class_code(device_type),
            subsystem_vendor_id: VENDOR_VIRTIO,
            subsystem_id: SUBSYSTEM_QEMU,
            interrupt_pin: 1,
            ..Default::default()
        });
        config.add_bar(MSIX_BAR, BarKind::Memory32 { prefetchable: false }, MSIX_BAR_SIZE)?;
        config.add_bar(MODERN_BAR, BarKind::Memory64 { prefetchable: true }, MODERN_BAR_SIZE)?;

        let region = |cfg_type: u8, offset: u64, extra: &[u8]| {
            let mut body = vec![0u8; 14];
            body[0] = (16 + extra.len()) as u8; // cap_len, ID and next included
            body[1] = cfg_type;
            body[2] = MODERN_BAR as u8;
            body[6..10].copy_from_slice(&(offset as u32).to_le_bytes());
            body[10..14].copy_from_slice(&(REGION_SIZE as u32).to_le_bytes());
            body.extend_from_slice(extra);
            body
        };
        config.add_capability(CAP_ID_VENDOR, &region(CAP_COMMON, COMMON_CFG, &[]))?;
        config.add_capability(CAP_ID_VENDOR, &region(CAP_ISR, ISR_CFG, &[]))?;
        config.add_capability(CAP_ID_VENDOR, &region(CAP_DEVICE, DEVICE_CFG, &[]))?;
        let multiplier = NOTIFY_OFF_MULTIPLIER.to_le_bytes();
        config.add_capability(CAP_ID_VENDOR, &region(CAP_NOTIFY, NOTIFY_CFG, &multiplier))?;
        // The access window: bar, offset, length and data are the driver's.
        let mut body = vec![0u8; 18];
        body[0] = 20;
        body[1] = CAP_PCI_CFG;
        let mut writable = vec![0u8; 18];
        writable[2] = 0xff;
        writable[6..18].fill(0xff);
        let pci_cfg_cap = config.add_capability_masked(CAP_ID_VENDOR, &body, &writable)?;

        let msix_cap = MsixCap {
            vectors: need as u16,
            table_bar: MSIX_BAR as u8,
            table_offset: MSIX_TABLE as u32,
            pba_bar: MSIX_BAR as u8,
            pba_offset: MSIX_PBA as u32,
        }
        .add_to(&mut config)?;
        let pcie = match placement {
            Placement::RootBus => PcieCap::IntegratedEndpoint,
            Placement::BehindRootPort => PcieCap::Endpoint,
        };
        pcie.add_to(&mut config)?;

        let mut msix = Msix::new(gsis, router);
        let mut calls = Vec::with_capacity(need);
        for call in state.queue_calls.iter().chain([&state.config_call]) {
            msix.add_source(call.try_clone().map_err(TransportError::EventFd)?);
            calls.push(call.try_clone().map_err(TransportError::EventFd)?);
        }
        let interrupt = Arc::new(VirtioPciInterrupt {
            msix: Mutex::new(msix),
            msix_enabled: AtomicBool::new(false),
            calls,
            isr: AtomicU8::new(0),
            intx_evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(TransportError::EventFd)?,
            intx_enabled: AtomicBool::new(true),
            needs_reset: state.needs_reset.clone(),
        });
        Ok(VirtioPciDevice { config, state, interrupt, msix_cap, pci_cfg_cap })
    }

    /// Function 0 of a slot whose other functions are in use
    /// (`multifunction=on`).
    pub fn set_multifunction(&mut self) {
        let header = self.config.read_u8(HEADER_TYPE);
        self.config.set_u8(HEADER_TYPE, header | HEADER_TYPE_MULTIFUNCTION);
    }

    pub fn interrupt(&self) -> Arc<VirtioPciInterrupt> {
        self.interrupt.clone()
    }

    /// Turns call eventfds signalled by a backend outside skiff into INTx
    /// while MSI-X is off, on the event loop.
    pub fn call_relay(&self) -> std::io::Result<CallRelay> {
        Ok(CallRelay::new(self.state.calls()?, self.interrupt.clone()))
    }

    /// Never holds the MSI-X lock while calling into the device, so that no
    /// lock order between the two exists.
    fn read_common(&self, offset: u64) -> u64 {
        let s = &self.state;
        let q = s.selected_queue();
        let lo = |a: u64| a & 0xffff_ffff;
        let hi = |a: u64| a >> 32;
        match offset {
            DEVICE_FEATURE_SELECT => s.device_features_sel.into(),
            DEVICE_FEATURE => s.device_features_word().into(),
            DRIVER_FEATURE_SELECT => s.driver_features_sel.into(),
            DRIVER_FEATURE => match s.driver_features_sel {
                0 => lo(s.driver_features),
                1 => hi(s.driver_features),
                _ => 0,
            },
            CONFIG_MSIX_VECTOR => self.interrupt.msix().source_vector(s.num_queues()).into(),
            NUM_QUEUES => s.num_queues() as u64,
            DEVICE_STATUS => s.status().into(),
            // Config space never changes under the driver.
            CONFIG_GENERATION => 0,
            QUEUE_SELECT => s.queue_sel.into(),
            // Size 0: no such queue.
            QUEUE_SIZE => q.map_or(0, |q| q.size.into()),
            QUEUE_MSIX_VECTOR => match s.queue_sel as usize {
                q if q < s.num_queues() => self.interrupt.msix().source_vector(q).into(),
                _ => NO_VECTOR.into(),
            },
            QUEUE_ENABLE => q.map_or(0, |q| q.ready.into()),
            QUEUE_NOTIFY_OFF => s.queue_sel.into(),
            QUEUE_DESC_LO => q.map_or(0, |q| lo(q.desc_table)),
            QUEUE_DESC_HI => q.map_or(0, |q| hi(q.desc_table)),
            QUEUE_DRIVER_LO => q.map_or(0, |q| lo(q.avail_ring)),
            QUEUE_DRIVER_HI => q.map_or(0, |q| hi(q.avail_ring)),
            QUEUE_DEVICE_LO => q.map_or(0, |q| lo(q.used_ring)),
            QUEUE_DEVICE_HI => q.map_or(0, |q| hi(q.used_ring)),
            _ => 0,
        }
    }

    fn write_common(&mut self, offset: u64, value: u32) {
        let field = match offset {
            QUEUE_SIZE => Some(QueueField::Size),
            QUEUE_ENABLE => Some(QueueField::Ready),
            QUEUE_DESC_LO => Some(QueueField::DescLow),
            QUEUE_DESC_HI => Some(QueueField::DescHigh),
            QUEUE_DRIVER_LO => Some(QueueField::DriverLow),
            QUEUE_DRIVER_HI => Some(QueueField::DriverHigh),
            QUEUE_DEVICE_LO => Some(QueueField::DeviceLow),
            QUEUE_DEVICE_HI => Some(QueueField::DeviceHigh),
            _ => None,
        };
        if let Some(field) = field {
            // The driver writes 1 to enable a queue and may not disable one.
            if field == QueueField::Ready && value != 1 {
                return;
            }
            return self.state.write_queue(field, value);
        }
        let s = &mut self.state;
        match offset {
            DEVICE_FEATURE_SELECT => s.device_features_sel = value,
            DRIVER_FEATURE_SELECT => s.driver_features_sel = value,
            DRIVER_FEATURE => s.write_driver_features_word(value),
            QUEUE_SELECT => s.queue_sel = value & 0xffff,
            CONFIG_MSIX_VECTOR => {
                self.interrupt.msix().set_source_vector(s.num_queues(), vector(value));
            }
            QUEUE_MSIX_VECTOR => {
                let sel = s.queue_sel as usize;
                if sel < s.num_queues() {
                    self.interrupt.msix().set_source_vector(sel, vector(value));
                }
            }
            DEVICE_STATUS => {
                let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
                if s.set_status(value, &interrupt) {
                    self.interrupt.isr.store(0, Ordering::SeqCst);
                    let mut msix = self.interrupt.msix();
                    for source in 0..=s.num_queues() {
                        msix.set_source_vector(source, NO_VECTOR);
                    }
                }
            }
            _ => log::debug!("virtio-pci: write {value:#x} to common config {offset:#x} ignored"),
        }
    }

    fn modern_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < COMMON_CFG + REGION_SIZE => {
                let value = self.read_common(o).to_le_bytes();
                data.copy_from_slice(&value[..data.len()]);
            }
            ISR_CFG => {
                // Reading acknowledges (and would lower INTx: KVM lowers it
                // at the guest's EOI, through the resample eventfd).
                data[0] = self.interrupt.isr.swap(0, Ordering::SeqCst);
            }
            o if (DEVICE_CFG..DEVICE_CFG + REGION_SIZE).contains(&o) => {
                self.state.device().read_config(o - DEVICE_CFG, data);
            }
            _ => {}
        }
    }

    fn modern_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_CFG + REGION_SIZE => {
                let mut bytes = [0u8; 4];
                let n = data.len().min(4);
                bytes[..n].copy_from_slice(&data[..n]);
                self.write_common(o, u32::from_le_bytes(bytes));
            }
            o if (DEVICE_CFG..DEVICE_CFG + REGION_SIZE).contains(&o)
                && self.state.config_writable() =>
            {
                self.state.device().write_config(o - DEVICE_CFG, data);
            }
            // A kick that KVM's ioeventfd did not catch (e.g. before the
            // VMM moved it with the BAR).
            o if (NOTIFY_CFG..NOTIFY_CFG + REGION_SIZE).contains(&o) => {
                self.state.notify(((o - NOTIFY_CFG) / u64::from(NOTIFY_OFF_MULTIPLIER)) as u32);
            }
            _ => {}
        }
    }

    /// The PCI config access capability's window: (bar, offset, length).
    fn pci_cfg_window(&self) -> (usize, u64, usize) {
        let at = self.pci_cfg_cap;
        let bar = usize::from(self.config.read_u8(at + 4));
        let offset = u64::from(self.config.read_u32(at + 8));
        let len = self.config.read_u32(at + 12) as usize;
        (bar, offset, len)
    }

    fn pci_cfg_data_reg(&self) -> usize {
        (self.pci_cfg_cap + 16) / 4
    }
}

/// A vector register write; the table refuses one past its end.
fn vector(value: u32) -> u16 {
    u16::try_from(value).unwrap_or(NO_VECTOR)
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, reg: usize) -> u32 {
        if reg == self.pci_cfg_data_reg() {
            let (bar, offset, len) = self.pci_cfg_window();
            if matches!(len, 1 | 2 | 4) {
                let mut data = [0u8; 4];
                self.bar_read(bar, offset, &mut data[..len]);
                return u32::from_le_bytes(data);
            }
        }
        self.config.read_reg(reg)
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) -> Option<BarReprogram> {
        let reg = (offset / 4) as usize;
        if reg == self.pci_cfg_data_reg() {
            let (bar, window_offset, len) = self.pci_cfg_window();
            if matches!(len, 1 | 2 | 4) && len <= data.len() {
                self.bar_write(bar, window_offset, &data[..len]);
            }
            return None;
        }
        let moved = self.config.write(offset, data);
        if reg == self.msix_cap / 4 {
            let control = MsixCap::control(&self.config, self.msix_cap);
            self.interrupt.set_msix_control(control);
        }
        if reg == COMMAND / 4 {
            let enabled = self.config.command() & COMMAND_INTX_DISABLE == 0;
            self.interrupt.intx_enabled.store(enabled, Ordering::SeqCst);
            self.interrupt.resample();
        }
        moved
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match bar {
            MSIX_BAR if offset < MSIX_PBA => {
                self.interrupt.msix().table_read(offset - MSIX_TABLE, data)
            }
            MSIX_BAR => self.interrupt.msix().pba_read(offset - MSIX_PBA, data),
            MODERN_BAR => self.modern_read(offset, data),
            _ => data.fill(0xff),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match bar {
            MSIX_BAR if offset < MSIX_PBA => {
                self.interrupt.msix().table_write(offset - MSIX_TABLE, data)
            }
            MODERN_BAR => self.modern_write(offset, data),
            _ => {}
        }
    }

    fn ioeventfds(&self) -> Vec<(usize, u64, &EventFd)> {
        self.state
            .queue_evts
            .iter()
            .enumerate()
            .map(|(i, evt)| {
                (MODERN_BAR, NOTIFY_CFG + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER), evt)
            })
            .collect()
    }
}

#[cfg(any(test, feature = "fuzzing"))]
#[cfg_attr(not(test), allow(dead_code, unused_imports))]
pub(crate) mod tests {
    use std::sync::atomic::AtomicUsize;

    use devices::virtio::{ActivateError, ActivationContext, VIRTIO_F_VERSION_1};
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::capability::CAP_ID_MSIX;
    use crate::msix::tests::{gsis, Routes};
    use crate::msix::MsiMessage;

    /// (queue index, size) of each queue handed over, and the interrupt.
    type Activation = (Vec<(usize, u16)>, Arc<dyn VirtioInterrupt>);

    /// A device with two queues that keeps its interrupt, so tests can raise it.
    #[derive(Default)]
    struct Fake {
        active: Option<Activation>,
        resets: AtomicUsize,
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            4
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 64]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1 << 3
        }
        fn ack_features(&mut self, _: u64) {}
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            devices::virtio::read_config_from(&[0xaa, 0xbb, 0xcc, 0xdd], offset, data);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
            let qs = ctx.queues.iter().map(|a| (a.index, a.queue.size())).collect();
            self.active = Some((qs, ctx.interrupt));
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resets.fetch_add(1, Ordering::SeqCst);
            self.active = None;
            true
        }
    }

    /// Fuzz target: configuration space as a hostile guest reaches it
    /// through ECAM (any bus, slot, function, register, width, value) on a
    /// tree of the host bridge, a root port, a virtio-pci function and an
    /// endpoint with 32- and 64-bit BARs behind the port; mixed with the
    /// virtio function's BAR registers (common config, notify, MSI-X table
    /// and PBA). Renumbered buses, moved and sized BARs, odd capability
    /// writes: nothing panics.
    #[cfg(test)]
    #[test]
    fn fuzz_pci_config_space() {
        skiff_tests::fuzz::run("pci-config-space", 20_000, fuzz_config_space);
    }

    /// One input of `fuzz_pci_config_space` (also a libFuzzer target: `fuzz/`).
    pub(crate) fn fuzz_config_space(rng: &mut skiff_tests::fuzz::Rng) {
        use crate::address::PciAddress;
        use crate::config::BarKind;
        use crate::root::tests::{addr, root_port, Endpoint};
        use crate::root::PciRoot;
        use devices::BusDevice;
        let interesting_regs: [u16; 19] = [
            0, 4, 6, 0x0c, 0x10, 0x14, 0x18, 0x1c, 0x20, 0x24, 0x30, 0x34, 0x3c, 0x40, 0x50, 0x52,
            0x70, 0x72, 0x100,
        ];
        let (_, dev, _) = setup();
        let virtio = Arc::new(Mutex::new(dev));
        let mut root = PciRoot::new(16);
        root.set_config_handler(Box::new(|_, _, _| {}));
        root.insert(addr(0, 1, 0), root_port(1)).unwrap();
        root.insert(addr(0, 2, 0), virtio.clone()).unwrap();
        let bars = [
            (0, BarKind::Memory32 { prefetchable: false }, 0x1000),
            (1, BarKind::Io, 0x20),
            (2, BarKind::Memory64 { prefetchable: true }, 0x4000),
        ];
        root.insert(addr(1, 0, 0), Endpoint::shared(&bars)).unwrap();
        let vfio = Arc::new(Mutex::new(passed_through_nvme()));
        root.insert(addr(0, 3, 0), vfio.clone()).unwrap();
        for _ in 0..rng.below(60) {
            let len = *rng.pick(&[1usize, 2, 4, 4, 4, 3, 8]);
            if rng.one_in(4) {
                // The virtio or VFIO function's own registers.
                let bar = *rng.pick(&[MSIX_BAR, MODERN_BAR, 0, 5]);
                let offset = rng.below(0x4100);
                let d: Arc<Mutex<dyn PciDevice>> =
                    if rng.one_in(2) { virtio.clone() } else { vfio.clone() };
                let mut d = d.lock().unwrap();
                if rng.one_in(2) {
                    let mut data = [0u8; 8];
                    d.bar_read(bar, offset, &mut data[..len]);
                } else {
                    d.bar_write(bar, offset, &rng.interesting().to_le_bytes()[..len]);
                }
                continue;
            }
            let bus = rng.below(4) as u8;
            let a = PciAddress::new(bus, rng.below(4) as u8, rng.below(2) as u8).unwrap();
            let reg = if rng.one_in(2) {
                *rng.pick(&interesting_regs) + rng.below(4) as u16 * u16::from(rng.one_in(3))
            } else {
                rng.below(0x1000) as u16
            };
            let at = if rng.one_in(20) { rng.interesting() } else { a.ecam_offset(reg) };
            if rng.one_in(2) {
                let mut data = [0u8; 8];
                root.read(at, &mut data[..len]);
            } else {
                root.write(at, &rng.interesting().to_le_bytes()[..len]);
            }
        }
    }

    /// QEMU's NVMe through VFIO's model on the recording fake, with INTx
    /// and an MSI capability (4 vectors, 64-bit, masking) at 0x70 beside
    /// its MSI-X.
    fn passed_through_nvme() -> crate::vfio::VfioPciDevice<crate::vfio::access::fake::Fake> {
        use crate::vfio::access::fake::nvme_with_msi;
        use crate::vfio::{Gsis, HostLayout, VfioPciDevice};
        let fake = Arc::new(nvme_with_msi());
        let layout = HostLayout::probe(&*fake, true).unwrap();
        let gsis = Gsis { msix: gsis(65), msi: gsis(4) };
        VfioPciDevice::new(fake, &layout, true, false, gsis, Arc::new(Routes::default())).unwrap()
    }

    fn setup() -> (Arc<Mutex<Fake>>, VirtioPciDevice, Arc<Routes>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let fake = Arc::new(Mutex::new(Fake::default()));
        let routes = Arc::new(Routes::default());
        let dev =
            VirtioPciDevice::new(mem, fake.clone(), gsis(3), routes.clone(), Placement::RootBus)
                .unwrap();
        (fake, dev, routes)
    }

    fn rd(d: &mut VirtioPciDevice, bar: usize, offset: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        d.bar_read(bar, offset, &mut data[..len]);
        u64::from_le_bytes(data)
    }

    fn wr(d: &mut VirtioPciDevice, bar: usize, offset: u64, len: usize, v: u64) {
        d.bar_write(bar, offset, &v.to_le_bytes()[..len]);
    }

    fn common_w(d: &mut VirtioPciDevice, offset: u64, len: usize, v: u64) {
        wr(d, MODERN_BAR, COMMON_CFG + offset, len, v)
    }

    fn common_r(d: &mut VirtioPciDevice, offset: u64, len: usize) -> u64 {
        rd(d, MODERN_BAR, COMMON_CFG + offset, len)
    }

    /// The vendor capabilities as Linux's virtio_pci_find_capability reads
    /// them: (cfg_type, bar, offset, length, the dword after).
    fn vendor_caps(d: &mut VirtioPciDevice) -> Vec<(u8, u8, u32, u32, u32)> {
        let mut out = Vec::new();
        let mut at = (d.config_read(0x34 / 4) & 0xfc) as usize;
        while at != 0 {
            let head = d.config_read(at / 4);
            if head as u8 == CAP_ID_VENDOR {
                let w1 = d.config_read(at / 4 + 1);
                out.push((
                    (head >> 24) as u8,
                    w1 as u8,
                    d.config_read(at / 4 + 2),
                    d.config_read(at / 4 + 3),
                    d.config_read(at / 4 + 4),
                ));
            }
            at = ((head >> 8) & 0xfc) as usize;
        }
        out
    }

    /// Linux's virtio_pci_modern probe + virtio_dev_probe, up to DRIVER_OK,
    /// with MSI-X vectors 0 (config) and 1, 2 (queues).
    fn bring_up(d: &mut VirtioPciDevice) {
        common_w(d, DEVICE_STATUS, 1, 1);
        common_w(d, DEVICE_STATUS, 1, 3);
        common_w(d, DEVICE_FEATURE_SELECT, 4, 1);
        assert_eq!(common_r(d, DEVICE_FEATURE, 4), 1, "VERSION_1 in the high word");
        common_w(d, DRIVER_FEATURE_SELECT, 4, 0);
        common_w(d, DRIVER_FEATURE, 4, 0);
        common_w(d, DRIVER_FEATURE_SELECT, 4, 1);
        common_w(d, DRIVER_FEATURE, 4, 1);
        common_w(d, DEVICE_STATUS, 1, 0xb);
        assert_eq!(common_r(d, DEVICE_STATUS, 1), 0xb);
        common_w(d, CONFIG_MSIX_VECTOR, 2, 0);
        assert_eq!(common_r(d, CONFIG_MSIX_VECTOR, 2), 0);
        for q in 0..2u64 {
            common_w(d, QUEUE_SELECT, 2, q);
            assert_eq!(common_r(d, QUEUE_NOTIFY_OFF, 2), q);
            common_w(d, QUEUE_SIZE, 2, 16);
            common_w(d, QUEUE_DESC_LO, 4, 0x1000 * (q + 1));
            common_w(d, QUEUE_DESC_HI, 4, 0);
            common_w(d, QUEUE_DRIVER_LO, 4, 0x10000 + 0x1000 * q);
            common_w(d, QUEUE_DEVICE_LO, 4, 0x20000 + 0x1000 * q);
            common_w(d, QUEUE_MSIX_VECTOR, 2, q + 1);
            assert_eq!(common_r(d, QUEUE_MSIX_VECTOR, 2), q + 1);
            common_w(d, QUEUE_ENABLE, 2, 1);
        }
        common_w(d, DEVICE_STATUS, 1, 0xf);
        assert_eq!(common_r(d, DEVICE_STATUS, 1), 0xf);
    }

    fn msix_enable(d: &mut VirtioPciDevice) {
        let at = d.msix_cap as u64;
        d.config_write(at + 2, &0x8000u16.to_le_bytes());
        for v in 0..3u64 {
            wr(d, MSIX_BAR, v * 16, 8, 0xfee0_0000);
            wr(d, MSIX_BAR, v * 16 + 8, 4, 0x40 + v);
            wr(d, MSIX_BAR, v * 16 + 12, 4, 0);
        }
    }

    #[test]
    fn identity_bars_and_capabilities_match_qemu() {
        let (_, mut d, _) = setup();
        assert_eq!(d.config_read(0), 0x1044_1af4, "modern virtio-rng");
        assert_eq!(d.config_read(2) >> 8, 0xff_0000);
        assert_eq!(d.config_read(2) & 0xff, 1, "revision 1");
        assert_eq!(d.config_read(0x2c / 4), 0x1100_1af4);
        assert_eq!((d.config_read(0x3c / 4) >> 8) & 0xff, 1, "INTA");
        // BAR 1: 32-bit memory; BAR 4: 64-bit prefetchable.
        assert_eq!(d.config_read(0x14 / 4), 0);
        assert_eq!(d.config_read(0x20 / 4), 0xc);
        d.config_write(0x20, &[0xff; 4]);
        d.config_write(0x24, &[0xff; 4]);
        assert_eq!(d.config_read(0x20 / 4), !(MODERN_BAR_SIZE as u32 - 1) | 0xc);
        assert_eq!(
            vendor_caps(&mut d),
            [
                (CAP_COMMON, 4, 0, 0x1000, vendor_caps(&mut d)[0].4),
                (CAP_ISR, 4, 0x1000, 0x1000, vendor_caps(&mut d)[1].4),
                (CAP_DEVICE, 4, 0x2000, 0x1000, vendor_caps(&mut d)[2].4),
                (CAP_NOTIFY, 4, 0x3000, 0x1000, NOTIFY_OFF_MULTIPLIER),
                (CAP_PCI_CFG, 0, 0, 0, 0),
            ]
        );
        let msix = d.config.find_capability(CAP_ID_MSIX).unwrap();
        assert_eq!(d.config.read_u16(msix + 2), 2, "3 vectors");
        assert_eq!(d.config.read_u32(msix + 4), 1, "table in BAR 1 at 0");
        assert_eq!(d.config.read_u32(msix + 8), 0x801, "PBA in BAR 1 at 0x800");
        assert_eq!(common_r(&mut d, NUM_QUEUES, 2), 2);
        let fds: Vec<_> = d.ioeventfds().iter().map(|(b, o, _)| (*b, *o)).collect();
        assert_eq!(fds, [(4, 0x3000), (4, 0x3004)]);
    }

    #[test]
    fn driver_init_activates_with_msix_vectors() {
        let (fake, mut d, routes) = setup();
        bring_up(&mut d);
        let (queues, interrupt) = fake.lock().unwrap().active.take().unwrap();
        assert_eq!(queues, [(0, 16), (1, 16)]);
        msix_enable(&mut d);
        assert_eq!(
            routes.routes.lock().unwrap()[1],
            (25, MsiMessage { addr: 0xfee0_0000, data: 0x41 })
        );
        let v = d.interrupt();
        interrupt.trigger(VirtioInterruptType::Queue(1)).unwrap();
        assert_eq!(routes.take_delivered(), [26], "queue 1 → vector 2");
        interrupt.trigger(VirtioInterruptType::Config).unwrap();
        assert_eq!(routes.take_delivered(), [24]);
        assert!(v.intx_evt().read().is_err(), "no INTx with MSI-X on");
        // The config change still shows in the ISR; queue interrupts do not.
        assert_eq!(rd(&mut d, MODERN_BAR, ISR_CFG, 1), 2);
        // Out-of-range vectors are refused with NO_VECTOR.
        common_w(&mut d, QUEUE_SELECT, 2, 0);
        common_w(&mut d, QUEUE_MSIX_VECTOR, 2, 3);
        assert_eq!(common_r(&mut d, QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
        // Kicks that reach the transport signal the queue's eventfd.
        wr(&mut d, MODERN_BAR, NOTIFY_CFG + 4, 2, 1);
        assert!(d.ioeventfds()[1].2.read().is_ok());
        // Reset: status 0, vectors unassigned, device reset.
        common_w(&mut d, DEVICE_STATUS, 1, 0);
        assert_eq!(common_r(&mut d, DEVICE_STATUS, 1), 0);
        assert_eq!(common_r(&mut d, CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
        assert_eq!(fake.lock().unwrap().resets.load(Ordering::SeqCst), 1);
    }

    /// A backend outside skiff signals the call eventfds itself: under
    /// MSI-X KVM delivers them (the relay leaves them alone); with INTx the
    /// relay on the event loop sets the ISR and raises the line; a signal
    /// held by a masked vector becomes INTx when the driver turns MSI-X off.
    #[test]
    fn call_eventfds_reach_the_guest_in_either_mode() {
        use event_manager::{EventManager, SubscriberOps};

        let (_, mut d, routes) = setup();
        bring_up(&mut d);
        let mut em = EventManager::<CallRelay>::new().unwrap();
        em.add_subscriber(d.call_relay().unwrap());
        let v = d.interrupt();
        let call = d.state.queue_calls[0].try_clone().unwrap();

        call.write(1).unwrap();
        assert_eq!(em.run_with_timeout(0).unwrap(), 1);
        assert!(v.intx_evt().read().is_ok(), "INTx");
        assert_eq!(rd(&mut d, MODERN_BAR, ISR_CFG, 1), 1);

        msix_enable(&mut d);
        call.write(1).unwrap();
        em.run_with_timeout(0).unwrap();
        assert!(v.intx_evt().read().is_err());
        assert_eq!(routes.take_delivered(), [25], "queue 0 → vector 1, by KVM");

        wr(&mut d, MSIX_BAR, 16 + 12, 4, 1);
        call.write(1).unwrap();
        em.run_with_timeout(0).unwrap();
        assert_eq!(routes.take_delivered(), [] as [u32; 0], "masked");
        assert_eq!(rd(&mut d, MSIX_BAR, MSIX_PBA, 1), 0b10);
        d.config_write(d.msix_cap as u64 + 2, &0u16.to_le_bytes());
        assert!(v.intx_evt().read().is_ok(), "held, then INTx");
        assert_eq!(rd(&mut d, MODERN_BAR, ISR_CFG, 1), 1);
        assert_eq!(routes.take_delivered(), [] as [u32; 0]);
    }

    #[test]
    fn intx_and_isr_without_msix() {
        let (fake, mut d, _) = setup();
        bring_up(&mut d);
        let (_, interrupt) = fake.lock().unwrap().active.take().unwrap();
        let v = d.interrupt();
        interrupt.trigger(VirtioInterruptType::Queue(0)).unwrap();
        assert!(v.intx_evt().read().is_ok());
        // The line stays "up" while the ISR has a reason: KVM's resample
        // after the EOI raises it again until the driver reads the ISR.
        v.resample();
        assert!(v.intx_evt().read().is_ok());
        assert_eq!(rd(&mut d, MODERN_BAR, ISR_CFG, 1), 1);
        assert_eq!(rd(&mut d, MODERN_BAR, ISR_CFG, 1), 0, "read clears");
        v.resample();
        assert!(v.intx_evt().read().is_err());
        // INTx disabled in COMMAND: the ISR latches, the line stays down
        // until the driver enables INTx again.
        d.config_write(COMMAND as u64, &(COMMAND_INTX_DISABLE | 2).to_le_bytes());
        interrupt.trigger(VirtioInterruptType::Config).unwrap();
        assert!(v.intx_evt().read().is_err());
        d.config_write(COMMAND as u64, &2u16.to_le_bytes());
        assert!(v.intx_evt().read().is_ok());
        assert_eq!(rd(&mut d, MODERN_BAR, ISR_CFG, 1), 2);
    }

    #[test]
    fn config_space_and_pci_cfg_window() {
        let (_, mut d, _) = setup();
        assert_eq!(rd(&mut d, MODERN_BAR, DEVICE_CFG + 1, 2), 0xccbb);
        // The config access capability reaches common config: num_queues.
        let at = d.pci_cfg_cap as u64;
        d.config_write(at + 4, &[MODERN_BAR as u8]);
        d.config_write(at + 8, &(NUM_QUEUES as u32).to_le_bytes());
        d.config_write(at + 12, &2u32.to_le_bytes());
        assert_eq!(d.config_read((at as usize + 16) / 4) & 0xffff, 2);
        // And writes through it: device status ACKNOWLEDGE.
        d.config_write(at + 8, &(DEVICE_STATUS as u32).to_le_bytes());
        d.config_write(at + 12, &1u32.to_le_bytes());
        d.config_write(at + 16, &[1, 0, 0, 0]);
        assert_eq!(common_r(&mut d, DEVICE_STATUS, 1), 1);
        // Queue registers before FEATURES_OK are ignored.
        common_w(&mut d, QUEUE_SIZE, 2, 8);
        assert_eq!(common_r(&mut d, QUEUE_SIZE, 2), 256);
        // A missing queue reads size 0.
        common_w(&mut d, QUEUE_SELECT, 2, 5);
        assert_eq!(common_r(&mut d, QUEUE_SIZE, 2), 0);
        // Odd BARs and offsets read as ones / zero and never panic.
        assert_eq!(rd(&mut d, 0, 0, 4), 0xffff_ffff);
        assert_eq!(rd(&mut d, MODERN_BAR, 0x3ffc, 4), 0);
        wr(&mut d, MODERN_BAR, NOTIFY_CFG + 0x400, 2, 0);
        wr(&mut d, MSIX_BAR, 0x900, 4, 0);
    }

    #[test]
    fn refuses_a_driver_without_version_1() {
        let (_, mut d, _) = setup();
        common_w(&mut d, DEVICE_STATUS, 1, 3);
        common_w(&mut d, DRIVER_FEATURE, 4, 1 << 3);
        common_w(&mut d, DEVICE_STATUS, 1, 0xb);
        assert_eq!(common_r(&mut d, DEVICE_STATUS, 1), 3, "FEATURES_OK refused");
    }

    /// A guest may write anything anywhere: 200k random config-space (ECAM)
    /// and BAR accesses of every width, from a fixed seed, against a root
    /// complex with a root port and two virtio-pci functions. Nothing may
    /// panic, and the read-only identity of every function must survive.
    #[test]
    fn random_guest_accesses_never_panic() {
        use devices::BusDevice;

        use crate::bridge::{RootPort, RootPortParams};
        use crate::root::{PciRoot, SharedDevice};
        use crate::{BarWindows, PciAddress, Window};

        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            // xorshift64*: deterministic, so a failure reproduces.
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let mut root = PciRoot::new(16);
        let port =
            RootPortParams { chassis: 1, slot: 1, port: 0, multifunction: false, secondary_bus: 1 };
        root.insert(PciAddress::new(0, 1, 0).unwrap(), Arc::new(Mutex::new(RootPort::new(port))))
            .unwrap();
        let mut functions: Vec<SharedDevice> = Vec::new();
        for (bus, slot, placement) in
            [(1, 0, Placement::BehindRootPort), (0, 2, Placement::RootBus)]
        {
            let dev = VirtioPciDevice::new(
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
                Arc::new(Mutex::new(Fake::default())),
                gsis(3),
                Arc::new(Routes::default()),
                placement,
            )
            .unwrap();
            let shared: SharedDevice = Arc::new(Mutex::new(dev));
            root.insert(PciAddress::new(bus, slot, 0).unwrap(), shared.clone()).unwrap();
            functions.push(shared);
        }
        let windows = BarWindows {
            mmio32: Window { base: 0xc000_0000, size: 0x2000_0000 },
            mmio64: Some(Window { base: 0x80_0000_0000, size: 0x80_0000_0000 }),
        };
        root.assign_bars(&windows).unwrap();

        for _ in 0..200_000 {
            let r = next();
            let len = [1usize, 2, 4, 8, 3][(r % 5) as usize];
            let mut data = (next()).to_le_bytes();
            match (r >> 8) % 4 {
                0 => {
                    let offset = (r >> 16) % (4 << 20);
                    root.write(offset, &data[..len]);
                }
                1 => {
                    let offset = (r >> 16) % (4 << 20);
                    root.read(offset, &mut data[..len]);
                }
                2 => {
                    let f = &functions[((r >> 16) % 2) as usize];
                    let offset = (r >> 20) % 0x5000;
                    f.lock().unwrap().bar_write(((r >> 40) % 7) as usize, offset, &data[..len]);
                }
                _ => {
                    let f = &functions[((r >> 16) % 2) as usize];
                    let offset = (r >> 20) % 0x5000;
                    f.lock().unwrap().bar_read(((r >> 40) % 7) as usize, offset, &mut data[..len]);
                }
            }
        }
        for f in &functions {
            let mut f = f.lock().unwrap();
            assert_eq!(f.config_read(0), 0x1044_1af4, "IDs are read-only");
            assert_eq!(f.config_read(0x2c / 4), 0x1100_1af4);
        }
    }
}
