//! The device registry: every kind of `-device` skiff has, one line each
//! in [`KINDS`], and everything the VMM knows about a kind in its own file
//! here: its `-device` names and the bus each puts it on, its property
//! parser, the `-drive`/`-netdev`/`-fsdev`/`-chardev` it names, the host
//! side it opens once per process, how a run builds it, what its threads
//! may call under `-sandbox on`, and its `-help` lines.
//!
//! The command line, the plan, the backends, the board, `-help` and the
//! sandbox go through the registry and the [`Device`] trait, never through
//! a list of kinds of their own: a new kind is a file here, its device
//! model in `devices/` (or `pci/`), and one line in `KINDS`.
//!
//! A kind's life: [`Kind::parse`] turns `-device DRIVER,...` into an
//! [`Unresolved`] device; once the whole command line is read its
//! references are resolved ([`Refs`]: exists, right type, used once) into
//! a [`Device`]; before the first run [`Device::open`] opens its host side
//! ([`HostSide`], kept across guest reboots); every run
//! [`HostSide::build`]s the device model from it.

use std::any::Any;
use std::fmt;
use std::sync::{Arc, Mutex};

use devices::virtio::VirtioDevice;

use crate::cli::{CliError, QemuOpts};
use crate::config::VmConfig;

pub mod balloon;
pub mod block;
pub mod debug_exit;
pub mod fs;
pub mod fw_cfg;
pub mod ged;
pub mod i8042;
pub mod input;
pub mod net;
pub mod p9;
mod refs;
pub mod rng;
pub mod root_port;
pub mod rtc;
pub mod serial;
pub mod usb;
pub mod vfio;
pub mod vsock;

pub use refs::Refs;

/// Every kind, in `-help` order.
pub static KINDS: &[&dyn Kind] = &[
    &i8042::KIND,
    &debug_exit::KIND,
    &rng::KIND,
    &block::KIND,
    &fs::KIND,
    &vsock::KIND,
    &net::KIND,
    &p9::KIND,
    &balloon::KIND,
    &serial::KIND,
    &serial::CONSOLE_KIND,
    &serial::PORT_KIND,
    &input::KIND,
    &usb::KIND,
    &root_port::KIND,
    &vfio::KIND,
    &rtc::KIND,
    &ged::KIND,
    &fw_cfg::KIND,
];

/// The kind and bus of `-device DRIVER`, if skiff has it.
pub fn driver(name: &str) -> Option<(&'static dyn Kind, &'static Driver)> {
    KINDS.iter().find_map(|k| Some((*k, k.drivers().iter().find(|d| d.name == name)?)))
}

/// Where a kind's device sits: what placement it needs from the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bus {
    /// At fixed ports or addresses of its own (`boot::layout`; no
    /// placement).
    Fixed,
    /// A virtio device behind a virtio-mmio window (a slot and a GSI).
    VirtioMmio,
    /// A virtio device as a virtio-pci function (an address on the root
    /// complex, MSI-X vectors).
    VirtioPci,
    /// Another PCI function (an address on the root complex).
    Pci,
}

impl Bus {
    /// Whether it is a PCI function, placed by the bus allocator.
    pub fn is_pci(self) -> bool {
        matches!(self, Bus::VirtioPci | Bus::Pci)
    }
}

/// One `-device` name of a kind.
#[derive(Debug)]
pub struct Driver {
    pub name: &'static str,
    pub bus: Bus,
}

/// What the threads of a kind's device may call beyond what every device
/// worker may (`host::sandbox`), so that each worker gets its own device's
/// calls and nothing else.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sandbox {
    /// Its worker serves files under descriptors opened during setup
    /// (a 9p share): lookups, reads and changes relative to them.
    pub share_files: bool,
    /// Its worker talks to a backend over a Unix socket (vhost-user, user
    /// networking's thread): sendmsg/recvmsg, and `connect` to reconnect.
    pub backend_socket: bool,
    /// A thread of its host side opens internet sockets for the guest
    /// (user networking).
    pub inet: bool,
    /// Its worker issues tap requests (offloads, queue attach).
    pub tap: bool,
    /// Its worker reads and writes files it holds (a disk image, a
    /// share's files): pread/pwrite, fsync, fallocate, lseek.
    pub disk: bool,
    /// Its worker runs an io_uring (`aio=io_uring`).
    pub uring: bool,
    /// vhost ioctls (the kernel's vhost-vsock and vhost-net).
    pub vhost: bool,
    /// VFIO ioctls (a passed-through device's interrupts, from a vCPU's
    /// config write).
    pub vfio: bool,
    /// Its worker gives guest RAM back to the host: fallocate (a memfd's
    /// hole; madvise every thread may call).
    pub ram_discard: bool,
    /// Its worker accepts connections on a listening socket it holds (a
    /// `server=on` chardev).
    pub accept: bool,
}

impl Sandbox {
    /// Everything either asks for.
    pub fn union(self, o: Sandbox) -> Sandbox {
        Sandbox {
            share_files: self.share_files || o.share_files,
            backend_socket: self.backend_socket || o.backend_socket,
            inet: self.inet || o.inet,
            tap: self.tap || o.tap,
            disk: self.disk || o.disk,
            uring: self.uring || o.uring,
            vhost: self.vhost || o.vhost,
            vfio: self.vfio || o.vfio,
            ram_discard: self.ram_discard || o.ram_discard,
            accept: self.accept || o.accept,
        }
    }
}

/// One kind of device: a static entry of the registry.
pub trait Kind: Sync {
    /// What `-help` and errors call the kind (`virtio-rng`, `i8042`).
    fn name(&self) -> &'static str;
    /// Its `-device` names, each with its bus.
    fn drivers(&self) -> &'static [Driver];
    /// Its lines in `-help` (with those of the backend options it names).
    fn help(&self) -> &'static str;
    /// What its threads may call under `-sandbox on` (the most any of its
    /// devices needs; [`Device::sandbox`] says what one device needs).
    fn sandbox(&self) -> Sandbox;
    /// How many a machine may have.
    fn max(&self) -> Option<usize> {
        None
    }
    /// Only the machine adds it (`plan::machine_devices`), never `-device`.
    fn machine_only(&self) -> bool {
        false
    }
    /// Parses the kind's own properties (the bus's `addr=`, `bus=`, ...
    /// are already taken), `on` being the driver's bus.
    fn parse(&self, opts: &mut QemuOpts, on: Bus) -> Result<Box<dyn Unresolved>, CliError>;
}

/// A device only the machine adds (`plan::machine_devices`): one driver at
/// its own ports, at most one, no properties, no `-help` lines of its own,
/// nothing to confine beyond the main threads' rules.
pub struct MachineOnly {
    pub drivers: &'static [Driver],
    /// Its one configuration.
    pub device: fn() -> Box<dyn Unresolved>,
}

impl Kind for MachineOnly {
    fn name(&self) -> &'static str {
        self.drivers[0].name
    }
    fn drivers(&self) -> &'static [Driver] {
        self.drivers
    }
    fn help(&self) -> &'static str {
        ""
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox::default()
    }
    fn max(&self) -> Option<usize> {
        Some(1)
    }
    fn machine_only(&self) -> bool {
        true
    }
    fn parse(&self, _: &mut QemuOpts, _: Bus) -> Result<Box<dyn Unresolved>, CliError> {
        Ok((self.device)())
    }
}

/// A parsed `-device` whose references to other options (`drive=`, ...)
/// are names still: those options may come later on the command line.
pub trait Unresolved: fmt::Debug + Send {
    /// Resolves every reference once (`option` names the device in
    /// errors, as `-device virtio-blk-pci`).
    fn resolve(self: Box<Self>, option: &str, refs: &mut Refs)
        -> Result<Box<dyn Device>, CliError>;
}

/// A device that names no other option is resolved as it is.
impl<D: Device + 'static> Unresolved for D {
    fn resolve(self: Box<Self>, _: &str, _: &mut Refs) -> Result<Box<dyn Device>, CliError> {
        Ok(self)
    }
}

/// Where a device's host side is opened: the configuration and the
/// device's own placement.
pub struct OpenContext<'a> {
    pub cfg: &'a VmConfig,
    /// `-device DRIVER` as given, for errors.
    pub driver: &'a str,
    pub bus: Bus,
}

/// A configured device: its properties, references resolved.
pub trait Device: fmt::Debug + Send + Sync + DynEq {
    /// Opens its host side, once, before the first run (and before the
    /// sandbox): images, taps, sockets, /dev nodes.
    fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn HostSide>, OpenError>;
    /// What this device's threads may call (at most its kind's).
    fn sandbox(&self) -> Sandbox;
    /// Facts the machine needs about it, where it has any.
    fn facts(&self) -> Facts {
        Facts::default()
    }
    /// What it says about itself in the DSDT when it sits at ports of its
    /// own (virtio and PCI devices are described by their transport).
    fn aml(&self) -> Vec<u8> {
        Vec::new()
    }
}

/// What a device tells the machine beyond its placement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// An i8042 controller: the FADT says so (IAPC_BOOT_ARCH 8042).
    pub i8042: bool,
    /// A port whose first guest write the boot trace records.
    pub milestone_port: Option<(u16, crate::diag::trace::Milestone)>,
    /// A backend outside skiff maps guest RAM (vhost-user): RAM must be a
    /// shared memfd.
    pub maps_guest_ram: bool,
    /// A PCIe root port: the allocator gives it a bus behind it.
    pub root_port: bool,
    /// It DMAs into guest RAM through pinned mappings (VFIO): RAM cannot
    /// be given back while it runs (QEMU inhibits ballooning then).
    pub pins_guest_ram: bool,
}

/// Why a device's host side could not be opened: what (`-drive id=d0`,
/// `-device vhost-vsock-pci,guest-cid=3`) and the cause.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct OpenError {
    pub what: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl OpenError {
    pub fn new(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        OpenError { what: what.into(), source: Box::new(source) }
    }
}

/// A device's host side, kept for the process's life: a reboot builds the
/// next run's device on the same image, tap or connection.
pub trait HostSide: Send + Sync {
    /// Gives it the run's guest memory (the kernel's vhost translates ring
    /// addresses through it; VFIO DMA-maps it).
    fn attach(&self, _mem: &boot::GuestMemoryMmap) -> crate::vm::Result<()> {
        Ok(())
    }
    /// Takes the run's guest memory back before it is unmapped.
    fn detach(&self, _mem: &boot::GuestMemoryMmap) {}
    /// Guest RAM to set aside for what the device writes before the guest
    /// runs (asked once the host side is open: sizes come from the host).
    fn guest_data(&self) -> Vec<crate::plan::DataRequest> {
        Vec::new()
    }
    /// Builds this run's device model.
    fn build(&self, run: &mut RunContext<'_>) -> crate::vm::Result<Built>;
}

/// A host side with nothing to open: the device is built from its
/// properties alone.
pub struct Nothing<F>(pub F);

impl<F> HostSide for Nothing<F>
where
    F: Fn(&mut RunContext<'_>) -> crate::vm::Result<Built> + Send + Sync,
{
    fn build(&self, run: &mut RunContext<'_>) -> crate::vm::Result<Built> {
        (self.0)(run)
    }
}

/// What building a device made, for the board to place.
pub enum Built {
    /// It put itself on its own ports (a platform device).
    Placed,
    /// A virtio device: the board puts it behind its transport.
    Virtio(Arc<Mutex<dyn VirtioDevice>>),
    /// A PCI function: the board puts it on the root complex.
    Pci(pci::SharedDevice),
}

/// What a run gives a device's build.
pub struct RunContext<'a> {
    /// The port I/O bus, for devices at ports of their own.
    pub pio: &'a devices::Bus,
    /// The MMIO bus, for devices at addresses of their own.
    pub mmio: &'a devices::Bus,
    /// Work for the run's event loop (a device's timer).
    pub subscribers: &'a mut Vec<crate::vm::Subscriber>,
    /// An interrupt line: an irqfd on ISA IRQ/GSI `gsi`.
    pub irq: &'a dyn Fn(u32) -> crate::vm::Result<devices::legacy::EventFdTrigger>,
    /// Where devices ask for a reset, power-off or exit.
    pub control: &'a Arc<dyn devices::VmControl>,
    /// Where the plan put it.
    pub location: crate::plan::Location,
    /// The control faces devices offer to QMP.
    pub faces: &'a mut crate::ctl::Faces,
    /// The guest RAM the plan set aside for it (`HostSide::guest_data`).
    #[expect(dead_code, reason = "the IGD's OpRegion (issue 26) is its first user")]
    pub data: DataWriter<'a>,
    /// `multifunction=on` (a PCI function).
    pub multifunction: bool,
    /// MSI(-X) vectors: GSIs and their routes in KVM.
    pub msi: MsiContext<'a>,
    /// Guest RAM, for a device that reads or writes it itself (fw_cfg's
    /// DMA).
    pub mem: &'a boot::GuestMemoryMmap,
    /// Tells KVM of a VFIO group the run's devices DMA through (its VFIO
    /// device, made on first use; a group told twice is told once).
    pub vfio_group: &'a dyn Fn(std::os::fd::BorrowedFd<'_>) -> crate::vm::Result<()>,
    /// Gives guest RAM back to the host (a balloon's pages).
    pub discard: &'a Arc<dyn devices::virtio::balloon::RamDiscard>,
    /// Where a device tells the monitors things (QMP events).
    pub notices: &'a Arc<crate::ctl::Notices>,
}

/// Where a PCI function's MSI(-X) vectors go.
pub struct MsiContext<'a> {
    /// A new GSI for a vector.
    pub allocate: &'a dyn Fn() -> crate::vm::Result<u32>,
    pub router: Arc<dyn pci::MsiRouter>,
}

/// Writes a device's data into the guest RAM the plan set aside for it,
/// and nowhere else.
pub struct DataWriter<'a> {
    pub mem: &'a boot::GuestMemoryMmap,
    pub ranges: &'a [crate::plan::DataRange],
}

impl DataWriter<'_> {
    /// Writes `bytes` at `offset` into range `index`.
    #[cfg_attr(not(test), expect(dead_code, reason = "the IGD's OpRegion (issue 26)"))]
    pub fn write(&self, index: usize, offset: u64, bytes: &[u8]) -> crate::vm::Result<()> {
        use vm_memory::{Bytes, GuestAddress};
        let outside = || crate::vm::Error::Internal(format!("device data range {index} overrun"));
        let r = self.ranges.get(index).ok_or_else(outside)?;
        let end = offset.checked_add(bytes.len() as u64).ok_or_else(outside)?;
        if end > r.len {
            return Err(outside());
        }
        self.mem
            .write_slice(bytes, GuestAddress(r.addr + offset))
            .map_err(|e| crate::vm::Error::Internal(format!("{}: {e}", r.what)))
    }
}

/// Comparing boxed devices (the parser's tests compare whole
/// configurations): equal when of one type and equal as that type.
pub trait DynEq: Any {
    fn dyn_eq(&self, other: &dyn Any) -> bool;
    fn as_any(&self) -> &dyn Any;
    #[cfg(any(test, feature = "fuzzing"))]
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

impl<T: Any + PartialEq> DynEq for T {
    fn dyn_eq(&self, other: &dyn Any) -> bool {
        other.downcast_ref::<T>() == Some(self)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    #[cfg(any(test, feature = "fuzzing"))]
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

impl PartialEq for dyn Device {
    fn eq(&self, other: &dyn Device) -> bool {
        self.dyn_eq(other.as_any())
    }
}

#[cfg(any(test, feature = "fuzzing"))]
impl dyn Device {
    /// The device as its kind's type, for that kind's tests.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn downcast_ref<T: Device + 'static>(&self) -> Option<&T> {
        self.as_any().downcast_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind has drivers, a help line naming each of them and a
    /// sandbox entry; no driver name is claimed twice.
    #[test]
    fn every_kind_is_complete() {
        let mut names: Vec<&str> = Vec::new();
        for k in KINDS {
            assert!(!k.drivers().is_empty(), "{}: no -device name", k.name());
            for d in k.drivers() {
                assert!(!names.contains(&d.name), "{} claimed twice", d.name);
                names.push(d.name);
                if k.machine_only() {
                    continue;
                }
                let shown = k.help().contains(d.name)
                    || d.name.strip_suffix("-pci").is_some_and(|f| k.help().contains(f))
                    || d.name.strip_suffix("-device").is_some_and(|f| k.help().contains(f));
                assert!(shown, "{}: -help does not show {}", k.name(), d.name);
            }
            if k.machine_only() {
                assert!(k.help().is_empty(), "{}: -device cannot add it", k.name());
            } else {
                assert!(k.help().starts_with("-device "), "{}: help line", k.name());
            }
            // A kind's devices never need more than the kind declares.
            let _ = k.sandbox();
        }
        assert!(driver("virtio-rng-pci").is_some_and(|(_, d)| d.bus == Bus::VirtioPci));
        assert!(driver("virtio-rng").is_none());
    }

    /// A device writes into its own ranges and nowhere else.
    #[test]
    fn device_data_stays_in_its_ranges() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = boot::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let ranges = [crate::plan::DataRange { addr: 0x4000, len: 0x100, what: "OpRegion" }];
        let w = DataWriter { mem: &mem, ranges: &ranges };
        w.write(0, 0, b"IntelGraphicsMem").unwrap();
        w.write(0, 0xf0, &[1; 16]).unwrap();
        assert!(w.write(0, 0xf1, &[1; 16]).is_err(), "one byte past the range");
        assert!(w.write(1, 0, &[1]).is_err(), "no such range");
        assert!(w.write(0, u64::MAX, &[1]).is_err());
        let mut got = [0u8; 16];
        mem.read_slice(&mut got, GuestAddress(0x4000)).unwrap();
        assert_eq!(&got, b"IntelGraphicsMem");
    }
}
