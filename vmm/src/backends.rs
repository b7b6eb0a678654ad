//! Host resources that belong to the process, not to one run of the guest.
//!
//! A guest reboot (without `-no-reboot`) is a new run: a new VM, new guest
//! RAM, new device models. What the host side holds must survive that: an
//! image's lock, an fd inherited from the parent (`fd=`), a vhost-user
//! connection (virtiofsd exits when its client disconnects), a VFIO
//! container, a rate limit that a reboot must not refill. So they are
//! opened here, once, before the first run; each run's devices are built
//! on them, `attach` them to the run's guest memory (a vhost memory table,
//! VFIO DMA maps) and `detach` them before that memory is unmapped.

use std::sync::{Arc, Mutex};

use devices::vhost_kernel::net::VhostNetBackend;
use devices::vhost_kernel::vsock::VsockBackend;
use devices::vhost_user::fs::FsParams;
use devices::vhost_user::Connection;
use devices::virtio::block::{BlockParams, Disk, DiskError, DiskOptions, Policy};
use devices::virtio::net::tap::Tap;
use devices::virtio::net::user::UserNet;
use devices::virtio::net::{NetBackend, NetError, NetParams};
use devices::virtio::p9::{P9Backend, P9Error, ShareParams};
use devices::virtio::{RngBackend, RngError};

use crate::config::{
    BlockConfig, ChardevBackend, DeviceConfig, FsConfig, NetConfig, NetdevConfig, P9Config,
    TapSource, VirtioKind, VirtioTransport, VmConfig,
};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("-device {driver}")]
    Rng {
        driver: String,
        #[source]
        source: RngError,
    },
    #[error("-device {driver},chardev={chardev}")]
    VhostUser {
        driver: String,
        chardev: String,
        #[source]
        source: devices::vhost_user::Error,
    },
    #[error("-device {driver},guest-cid={cid}")]
    Vsock {
        driver: String,
        cid: u32,
        #[source]
        source: devices::vhost_kernel::vsock::VsockError,
    },
    #[error("-netdev {kind},id={netdev}")]
    Net {
        kind: &'static str,
        netdev: String,
        #[source]
        source: NetError,
    },
    #[error("-netdev bridge,id={netdev}")]
    Bridge {
        netdev: String,
        #[source]
        source: crate::host::bridge_helper::HelperError,
    },
    #[error("-fsdev id={fsdev}")]
    P9 {
        fsdev: String,
        #[source]
        source: P9Error,
    },
    #[error("-drive id={drive}")]
    Disk {
        drive: String,
        #[source]
        source: DiskError,
    },
}

/// One device's host side.
pub enum DeviceBackend {
    Rng(Arc<RngBackend>),
    /// The image, and the device's shape.
    Block(Arc<Disk>, BlockParams),
    /// The connection to virtiofsd, and the device's shape.
    Fs(Arc<Mutex<Connection>>, FsParams),
    /// /dev/vhost-vsock, holding the guest's CID.
    Vsock(Arc<VsockBackend>),
    /// The tap's queues (and vhost-net), and the device's shape.
    Net(Arc<NetBackend>, NetParams),
    /// The share's 9p server, and the device's shape.
    P9(Arc<P9Backend>, ShareParams),
}

impl DeviceBackend {
    /// Gives the backend the run's guest memory (the kernel's vhost
    /// translates ring addresses through it; vhost-user devices send their
    /// memory table when the driver starts them).
    fn attach(&self, mem: &boot::GuestMemoryMmap) {
        match self {
            DeviceBackend::Vsock(v) => v.attach(mem),
            DeviceBackend::Net(n, _) => n.attach(mem),
            DeviceBackend::Rng(_)
            | DeviceBackend::Block(..)
            | DeviceBackend::Fs(..)
            | DeviceBackend::P9(..) => {}
        }
    }

    /// Takes the run's guest memory back before it is unmapped.
    fn detach(&self) {
        match self {
            DeviceBackend::Vsock(v) => v.detach(),
            DeviceBackend::Net(n, _) => n.detach(),
            DeviceBackend::Rng(_)
            | DeviceBackend::Block(..)
            | DeviceBackend::Fs(..)
            | DeviceBackend::P9(..) => {}
        }
    }
}

/// The host side of every device, by `VmConfig::devices` index.
pub struct Backends {
    devices: Vec<Option<DeviceBackend>>,
}

impl Backends {
    /// Opens every device's host side, so a bad one fails before any guest
    /// runs.
    pub fn open(cfg: &VmConfig) -> Result<Self, BackendError> {
        let devices = cfg
            .devices
            .iter()
            .map(|d| match d {
                DeviceConfig::Virtio(v) => match &v.kind {
                    VirtioKind::Block(b) => {
                        let pci = matches!(v.transport, VirtioTransport::Pci(_));
                        Ok(Some(block(cfg, b, pci)?))
                    }
                    VirtioKind::Fs(f) => Ok(Some(fs(cfg, f, v.driver())?)),
                    VirtioKind::Net(n) => Ok(Some(net(cfg, n)?)),
                    VirtioKind::P9(p) => Ok(Some(p9(cfg, p)?)),
                    &VirtioKind::Vsock { guest_cid } => {
                        let vsock = VsockBackend::open(guest_cid).map_err(|source| {
                            BackendError::Vsock { driver: v.driver(), cid: guest_cid, source }
                        })?;
                        Ok(Some(DeviceBackend::Vsock(Arc::new(vsock))))
                    }
                    &VirtioKind::Rng { max_bytes, period_ms } => {
                        let limit =
                            max_bytes.and_then(|m| devices::virtio::RateLimit::new(m, period_ms));
                        let rng = RngBackend::new(limit)
                            .map_err(|source| BackendError::Rng { driver: v.driver(), source })?;
                        Ok(Some(DeviceBackend::Rng(Arc::new(rng))))
                    }
                },
                _ => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        Ok(Backends { devices })
    }

    /// Device `index`'s host side.
    pub fn device(&self, index: usize) -> Option<&DeviceBackend> {
        self.devices.get(index)?.as_ref()
    }

    pub fn attach(&self, mem: &boot::GuestMemoryMmap) {
        self.devices.iter().flatten().for_each(|b| b.attach(mem));
    }

    pub fn detach(&self) {
        self.devices.iter().flatten().for_each(DeviceBackend::detach);
    }
}

/// A virtio-9p's server, on its share opened here (before the sandbox).
fn p9(cfg: &VmConfig, p: &P9Config) -> Result<DeviceBackend, BackendError> {
    let Some(fsdev) = cfg.fsdevs.iter().find(|f| f.id == p.fsdev) else {
        unreachable!("the command line checked fsdev={}", p.fsdev)
    };
    let params = ShareParams {
        tag: p.mount_tag.clone(),
        readonly: fsdev.readonly,
        security: fsdev.security,
    };
    let server = P9Backend::open(&fsdev.path, &params)
        .map_err(|source| BackendError::P9 { fsdev: fsdev.id.clone(), source })?;
    Ok(DeviceBackend::P9(Arc::new(server), params))
}

/// A virtio-blk's image (opened and locked here, once) and shape.
fn block(cfg: &VmConfig, b: &BlockConfig, pci: bool) -> Result<DeviceBackend, BackendError> {
    let Some(drive) = cfg.drives.iter().find(|d| d.id == b.drive) else {
        unreachable!("the command line checked drive={}", b.drive)
    };
    let opts = DiskOptions {
        path: drive.file.clone(),
        read_only: drive.read_only,
        direct: drive.direct,
        dsync: drive.dsync,
        ignore_flush: drive.ignore_flush,
        locking: drive.locking,
    };
    let disk = Disk::open(&opts)
        .map_err(|source| BackendError::Disk { drive: drive.id.clone(), source })?;
    // QEMU's default: a queue per vCPU on PCI (at most 256), one on MMIO.
    let num_queues =
        b.num_queues.unwrap_or(if pci { cfg.smp.cpus.clamp(1, 256) as u16 } else { 1 });
    let params = BlockParams {
        num_queues,
        queue_size: b.queue_size,
        logical_block_size: b.logical_block_size,
        physical_block_size: b.physical_block_size,
        policy: Policy {
            discard: drive.discard,
            detect_zeroes: drive.detect_zeroes,
            serial: b.serial.clone().unwrap_or_default().into_bytes(),
        },
        aio: drive.aio,
    };
    Ok(DeviceBackend::Block(Arc::new(disk), params))
}

/// A vhost-user-fs's connection to virtiofsd, made here once: virtiofsd
/// serves one client and exits when it goes, so the connection must
/// outlive guest reboots.
fn fs(cfg: &VmConfig, f: &FsConfig, driver: String) -> Result<DeviceBackend, BackendError> {
    let socket = cfg.chardevs.iter().find_map(|c| match &c.backend {
        ChardevBackend::Socket { path, server: false, reconnect_ms, .. } if c.id == f.chardev => {
            Some((path, *reconnect_ms))
        }
        _ => None,
    });
    let Some((path, reconnect_ms)) = socket else {
        unreachable!("the command line checked chardev={}", f.chardev)
    };
    let queues = 1 + usize::from(f.num_request_queues);
    let mut connection = Connection::connect(path, queues)
        .map_err(|source| BackendError::VhostUser { driver, chardev: f.chardev.clone(), source })?;
    connection.set_reconnect(reconnect_ms.map(std::time::Duration::from_millis));
    let params = FsParams {
        tag: f.tag.clone(),
        num_request_queues: f.num_request_queues,
        queue_size: f.queue_size,
    };
    Ok(DeviceBackend::Fs(Arc::new(Mutex::new(connection)), params))
}

/// A virtio-net's tap queues (opened or adopted here, once: a reboot keeps
/// the interface and inherited descriptors) and, with `vhost=on`, one
/// vhost-net instance per queue pair.
fn net(cfg: &VmConfig, n: &NetConfig) -> Result<DeviceBackend, BackendError> {
    let params =
        NetParams { mac: n.mac.unwrap_or([0x52, 0x54, 0, 0x12, 0x34, 0x56]), queue_size: 256 };
    let netdev = cfg.netdevs.iter().find(|d| d.id() == n.netdev);
    let (id, source, vhost) = match netdev {
        Some(NetdevConfig::Tap { id, source, vhost }) => (id, source, vhost),
        Some(NetdevConfig::User { id, config }) => {
            let (user, fd) = UserNet::start(config).map_err(|e| BackendError::Net {
                kind: "user",
                netdev: id.clone(),
                source: e.into(),
            })?;
            let taps = vec![Arc::new(Tap::socket(fd, &format!("netdev {id}")))];
            let backend = NetBackend { taps, vhost: None, user: Some(user) };
            return Ok(DeviceBackend::Net(Arc::new(backend), params));
        }
        Some(NetdevConfig::Bridge { id, br, helper }) => {
            let failed = |source| BackendError::Bridge { netdev: id.clone(), source };
            let fd = crate::host::bridge_helper::tap_for_bridge(helper, br).map_err(failed)?;
            let tap = Tap::from_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)).map_err(|e| {
                BackendError::Net { kind: "bridge", netdev: id.clone(), source: e.into() }
            })?;
            let backend = NetBackend { taps: vec![Arc::new(tap)], vhost: None, user: None };
            return Ok(DeviceBackend::Net(Arc::new(backend), params));
        }
        None => unreachable!("the command line checked netdev={}", n.netdev),
    };
    let failed = |source: NetError| BackendError::Net { kind: "tap", netdev: id.clone(), source };
    let queues = source.queues();
    let taps = (0..queues)
        .map(|q| match source {
            TapSource::Ifname { name, .. } => Tap::open(name, q, queues > 1),
            TapSource::Fds(fds) => Tap::from_fd(fds[q]),
        })
        .map(|t| t.map(Arc::new).map_err(|e| failed(e.into())))
        .collect::<Result<Vec<_>, _>>()?;
    // Without mq=on the driver is offered one pair (QEMU's default).
    let taps = if n.mq { taps } else { taps.into_iter().take(1).collect() };
    let vhost = vhost
        .then(|| VhostNetBackend::open(taps.len()))
        .transpose()
        .map_err(|e| failed(e.into()))?;
    Ok(DeviceBackend::Net(Arc::new(NetBackend { taps, vhost, user: None }), params))
}
