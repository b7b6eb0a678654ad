//! Virtio devices: one description (`VirtioConfig`: the family and its
//! properties) and the host backend it was given make the device model,
//! whatever the transport; `attach_mmio` and `pci_function` put that model
//! behind virtio-mmio or virtio-pci. A new family adds its device folder in
//! `devices/src/virtio/`, a `VirtioKind` variant with its `cli::device`
//! parser, its backend in `backends`, and one arm in `create`.

use std::sync::{Arc, Mutex};

use boot::GuestMemoryMmap;
use devices::vhost_kernel::vsock::VhostVsock;
use devices::vhost_user::fs::VhostUserFs;
use devices::virtio::block::Block;
use devices::virtio::net::Net;
use devices::virtio::{
    CallRelay, MmioTransport, Rng, VirtioDevice, MMIO_WINDOW_SIZE, NOTIFY_REG_OFFSET,
};
use devices::Bus;
use kvm_ioctls::{IoEventAddress, VmFd};
use pci::virtio_pci::Placement;
use pci::{MsiRouter, VirtioPciDevice};

use crate::backends::DeviceBackend;
use crate::config::{VirtioConfig, VirtioKind};
use crate::vm::{io_err, kvm_err, Error, Result};

/// The device model a description stands for, on its host backend.
pub(super) fn create(
    desc: &VirtioConfig,
    backend: Option<&DeviceBackend>,
) -> Result<Arc<Mutex<dyn VirtioDevice>>> {
    match (&desc.kind, backend) {
        (VirtioKind::Rng { .. }, Some(DeviceBackend::Rng(b))) => {
            Ok(Arc::new(Mutex::new(Rng::new(b.clone()))))
        }
        (VirtioKind::Block(_), Some(DeviceBackend::Block(disk, params))) => {
            Ok(Arc::new(Mutex::new(Block::new(disk.clone(), params.clone()))))
        }
        (VirtioKind::Fs(_), Some(DeviceBackend::Fs(connection, params))) => {
            Ok(Arc::new(Mutex::new(VhostUserFs::new(connection.clone(), params))))
        }
        (VirtioKind::Vsock { .. }, Some(DeviceBackend::Vsock(backend))) => {
            Ok(Arc::new(Mutex::new(VhostVsock::new(backend.clone()))))
        }
        (VirtioKind::Net(_), Some(DeviceBackend::Net(backend, params))) => {
            Ok(Arc::new(Mutex::new(Net::new(backend.clone(), params))))
        }
        (VirtioKind::P9(_), Some(DeviceBackend::P9(backend, params))) => {
            Ok(Arc::new(Mutex::new(devices::virtio::p9::P9::new(backend.clone(), params.clone()))))
        }
        _ => Err(super::missing_backend(desc.driver())),
    }
}

/// The device behind a virtio-mmio window at `base`: queue notifications go
/// to eventfds inside KVM (ioeventfd, no exit to skiff), the interrupt is an
/// irqfd on `gsi`. Returns the relay of its call eventfds, for the event
/// loop, when a backend outside skiff signals them.
pub(super) fn attach_mmio(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &Bus,
    device: Arc<Mutex<dyn VirtioDevice>>,
    base: u64,
    gsi: u32,
) -> Result<Option<CallRelay>> {
    let outside = calls_from_outside(&device);
    let transport = MmioTransport::new(mem.clone(), device).map_err(Error::VirtioMmio)?;
    for (queue, evt) in transport.queue_evts().iter().enumerate() {
        let addr = IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET);
        vm.register_ioevent(evt, &addr, queue as u32).map_err(kvm_err("KVM_IOEVENTFD"))?;
    }
    vm.register_irqfd(transport.interrupt_evt(), gsi).map_err(kvm_err("KVM_IRQFD"))?;
    let relay = outside.then(|| transport.call_relay()).transpose().map_err(io_err("eventfd"))?;
    mmio.insert(Arc::new(Mutex::new(transport)), base, MMIO_WINDOW_SIZE)?;
    Ok(relay)
}

/// Whether the device's backend signals its call eventfds itself.
pub(super) fn calls_from_outside(device: &Mutex<dyn VirtioDevice>) -> bool {
    device.lock().unwrap_or_else(|e| e.into_inner()).calls_from_outside()
}

/// The device as a virtio-pci function, its MSI-X vectors on `gsis`
/// (`pci::virtio_pci::vectors_needed` of them).
pub(super) fn pci_function(
    mem: &GuestMemoryMmap,
    device: Arc<Mutex<dyn VirtioDevice>>,
    gsis: Vec<u32>,
    router: Arc<dyn MsiRouter>,
    placement: Placement,
    multifunction: bool,
) -> Result<VirtioPciDevice> {
    let mut f = VirtioPciDevice::new(mem.clone(), device, gsis, router, placement)
        .map_err(Error::VirtioPci)?;
    if multifunction {
        f.set_multifunction();
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use devices::BusDevice;
    use pci::{MsiMessage, PciDevice};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::backends::Backends;
    use crate::config::{DeviceConfig, VirtioTransport, VmConfig};

    struct NoKvm;

    impl MsiRouter for NoKvm {
        fn route(&self, _: u32, _: MsiMessage) -> std::io::Result<()> {
            Ok(())
        }
        fn attach(&self, _: &EventFd, _: u32) -> std::io::Result<()> {
            Ok(())
        }
        fn detach(&self, _: &EventFd, _: u32) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// One virtio-rng description builds the device for both transports:
    /// virtio-mmio sees device type 4, virtio-pci the modern ID 0x1044.
    #[test]
    fn one_description_builds_virtio_rng_for_both_transports() {
        let kind = VirtioKind::Rng { max_bytes: Some(1024), period_ms: None };
        let desc = |transport| VirtioConfig { id: None, transport, kind: kind.clone() };
        let cfg = VmConfig {
            devices: vec![
                DeviceConfig::Virtio(desc(VirtioTransport::Mmio)),
                DeviceConfig::Virtio(desc(VirtioTransport::Pci(Default::default()))),
            ],
            ..Default::default()
        };
        let backends = Backends::open(&cfg).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();

        let DeviceConfig::Virtio(mmio_desc) = &cfg.devices[0] else { unreachable!() };
        let dev = create(mmio_desc, backends.device(0)).unwrap();
        let mut mmio = MmioTransport::new(mem.clone(), dev).unwrap();
        let mut word = [0u8; 4];
        mmio.read(0x08, &mut word);
        assert_eq!(u32::from_le_bytes(word), 4, "virtio-mmio DeviceID: entropy");

        let DeviceConfig::Virtio(pci_desc) = &cfg.devices[1] else { unreachable!() };
        let dev = create(pci_desc, backends.device(1)).unwrap();
        let n = pci::virtio_pci::vectors_needed(&*dev.lock().unwrap());
        let gsis = (24..24 + n as u32).collect();
        let mut f =
            pci_function(&mem, dev, gsis, Arc::new(NoKvm), Placement::RootBus, false).unwrap();
        assert_eq!(f.config_read(0), 0x1044_1af4, "virtio-pci: 1af4:1044, entropy");
        assert_eq!(mmio_desc.driver(), "virtio-rng-device");
        assert_eq!(pci_desc.driver(), "virtio-rng-pci");

        // A description without its backend is refused, not guessed at.
        assert!(create(pci_desc, None).is_err());
    }
}
