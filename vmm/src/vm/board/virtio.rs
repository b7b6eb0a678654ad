//! Virtio transports: a kind (`kinds`) builds the device model from its
//! host side, whatever the transport; `attach_mmio` and `pci_function` put
//! that model behind virtio-mmio or virtio-pci.

use std::sync::{Arc, Mutex};

use boot::GuestMemoryMmap;
use devices::virtio::{
    CallRelay, MmioTransport, VirtioDevice, MMIO_WINDOW_SIZE, NOTIFY_REG_OFFSET,
};
use devices::Bus;
use kvm_ioctls::{IoEventAddress, VmFd};
use pci::virtio_pci::Placement;
use pci::{MsiRouter, VirtioPciDevice};

use crate::vm::{io_err, kvm_err, Error, Result};

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
pub(super) mod tests {
    use devices::BusDevice;
    use pci::{MsiMessage, PciDevice};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::backends::Backends;
    use crate::kinds::{Built, RunContext};

    /// MSI routes nobody delivers.
    pub(in crate::vm::board) struct NoKvm;

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

    /// One virtio-rng kind builds the device for both transports:
    /// virtio-mmio sees device type 4, virtio-pci the modern ID 0x1044.
    #[test]
    fn one_description_builds_virtio_rng_for_both_transports() {
        let cfg = crate::cli::tests_support::config(&[
            "-M",
            "microvm,pcie=on",
            "-device",
            "virtio-rng-device,max-bytes=1024",
            "-device",
            "virtio-rng-pci,max-bytes=1024",
        ])
        .unwrap();
        let backends = Backends::open(&cfg).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let pio = Bus::new();
        let irq = |_| Err(Error::Internal("no interrupts here".into()));
        let control: Arc<dyn devices::VmControl> =
            Arc::new(crate::vm::control::Control::new().unwrap());
        let mut faces = crate::ctl::Faces::default();
        let notices = Arc::new(crate::ctl::Notices::new().unwrap());
        struct NoDiscard;
        impl devices::virtio::balloon::RamDiscard for NoDiscard {
            fn discard(&self, _: u64, _: u64) -> std::io::Result<u64> {
                Ok(0)
            }
        }
        let discard: Arc<dyn devices::virtio::balloon::RamDiscard> = Arc::new(NoDiscard);
        let mut build = |i: usize| {
            let mut subscribers = Vec::new();
            let mut run = RunContext {
                pio: &pio,
                mmio: &pio,
                subscribers: &mut subscribers,
                irq: &irq,
                control: &control,
                location: crate::plan::Location::Fixed,
                faces: &mut faces,
                data: crate::kinds::DataWriter { mem: &mem, ranges: &[] },
                multifunction: false,
                msi: crate::kinds::MsiContext { allocate: &|| Ok(24), router: Arc::new(NoKvm) },
                vfio_group: &|_| Err(Error::Internal("no VFIO here".into())),
                mem: &mem,
                discard: &discard,
                notices: &notices,
            };
            match backends.device(i).unwrap().build(&mut run).unwrap() {
                Built::Virtio(d) => d,
                _ => panic!("virtio-rng is a virtio device"),
            }
        };

        let mut mmio = MmioTransport::new(mem.clone(), build(0)).unwrap();
        let mut word = [0u8; 4];
        mmio.read(0x08, &mut word);
        assert_eq!(u32::from_le_bytes(word), 4, "virtio-mmio DeviceID: entropy");

        let dev = build(1);
        let n = pci::virtio_pci::vectors_needed(&*dev.lock().unwrap());
        let gsis = (24..24 + n as u32).collect();
        let mut f =
            pci_function(&mem, dev, gsis, Arc::new(NoKvm), Placement::RootBus, false).unwrap();
        assert_eq!(f.config_read(0), 0x1044_1af4, "virtio-pci: 1af4:1044, entropy");
        assert_eq!(cfg.devices[0].driver, "virtio-rng-device");
        assert_eq!(cfg.devices[1].driver, "virtio-rng-pci");
    }
}
