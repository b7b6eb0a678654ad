//! `-device virtio-net-pci|virtio-net-device,netdev=ID[,mac=MAC][,mq=on]`:
//! a NIC on a `-netdev` (tap, vhost-net, user networking, bridge).

use std::sync::{Arc, Mutex};

use devices::vhost_kernel::net::VhostNetBackend;
use devices::virtio::net::tap::Tap;
use devices::virtio::net::user::UserNet;
use devices::virtio::net::{Net, NetBackend, NetError, NetParams};

use super::{Built, Bus, Device, Driver, HostSide, Kind, OpenContext, OpenError, Refs};
use super::{RunContext, Sandbox, Unresolved};
use crate::cli::{CliError, QemuOpts};
use crate::config::{NetdevConfig, TapSource};

pub struct NetKind;
pub static KIND: NetKind = NetKind;

impl Kind for NetKind {
    fn name(&self) -> &'static str {
        // Its workers announce themselves by it (the sandbox's key).
        devices::virtio::net::FAMILY
    }
    fn drivers(&self) -> &'static [Driver] {
        &[
            Driver { name: "virtio-net-pci", bus: Bus::VirtioPci },
            Driver { name: "virtio-net-device", bus: Bus::VirtioMmio },
        ]
    }
    fn help(&self) -> &'static str {
        "\
-device virtio-net-device|virtio-net-pci,netdev=ID[,mac=MAC][,mq=on|off]
        [,vectors=N][,romfile=..][,addr=..][,bus=ID][,id=ID]
                         a NIC on -netdev ID (default mac 52:54:00:12:34:56,
                         then :57, ...); mq=on offers the tap's queues as
                         queue pairs, each on a worker thread of its own;
                         vectors= and romfile= have no effect (one MSI-X
                         vector per queue; no firmware loads option ROMs)
-netdev tap,id=ID,ifname=NAME[,script=no][,downscript=no][,queues=N]
        [,vhost=on|off][,vnet_hdr=on]
-netdev tap,id=ID,fd=N|fds=N:M:..[,vhost=on|off]
                         a tap (ifname= is opened, or created if skiff may)
                         or descriptors of one inherited from the parent
                         (a macvtap's /dev/tapN); it keeps across guest
                         reboots; vhost=on moves frames in the host kernel
                         (/dev/vhost-net); skiff runs no scripts
-netdev user,id=ID[,net=ADDR[/MASK]][,host=ADDR][,dhcpstart=ADDR][,dns=ADDR]
        [,hostfwd=[tcp|udp]:[HADDR]:HPORT-[GADDR]:GPORT]...[,restrict=on|off]
        [,ipv6=on|off][,hostname=NAME]
                         user networking (libslirp, on a thread of its own):
                         QEMU's 10.0.2.0/24, DHCP from .15, the host as .2;
                         a host port that cannot be bound exits 1 naming it;
                         under -sandbox on, libslirp cannot read
                         /etc/resolv.conf and forwards DNS to 127.0.0.1:53
-netdev bridge,id=ID[,br=BRIDGE][,helper=PATH]
                         a tap on BRIDGE (default br0) from QEMU's setuid
                         helper (default /usr/lib/qemu/qemu-bridge-helper),
                         which /etc/qemu/bridge.conf must allow
-netdev vde,id=ID[,sock=PATH][,port=N][,group=GROUP][,mode=OCTAL]
                         a port of a VDE switch (vde_switch -s PATH), through
                         libvdeplug, as QEMU's; bare frames, no offloads
-net nic,netdev=ID[,model=virtio][,macaddr=MAC]
                         a virtio-net on the machine's bus (PCIe on the
                         default machine and with pcie=on, else virtio-mmio)
"
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox { tap: true, vhost: true, backend_socket: true, inet: true, ..Sandbox::default() }
    }
    fn parse(&self, opts: &mut QemuOpts, _: Bus) -> Result<Box<dyn Unresolved>, CliError> {
        let netdev = opts.take("netdev").ok_or_else(|| {
            opts.error("netdev= is required (skiff has no NIC without a host side)")
        })?;
        let mac = opts.take("mac").map(|m| crate::cli::parse_mac(opts, "mac", m)).transpose()?;
        let mq = opts.take_bool("mq")?.unwrap_or(false);
        Ok(Box::new(Pending { netdev, mac, mq }))
    }
}

#[derive(Debug)]
struct Pending {
    netdev: String,
    mac: Option<[u8; 6]>,
    mq: bool,
}

impl Unresolved for Pending {
    fn resolve(
        self: Box<Self>,
        option: &str,
        refs: &mut Refs,
    ) -> Result<Box<dyn Device>, CliError> {
        let netdev: Arc<NetdevConfig> = refs.take(option, &self.netdev)?;
        // QEMU's default MACs: 52:54:00:12:34:56 for the first NIC, then
        // ...:57, in the order the NICs are created.
        let index = refs.ordinal(KIND.name()) as u8;
        let mac = self.mac.unwrap_or([0x52, 0x54, 0x00, 0x12, 0x34, 0x56u8.wrapping_add(index)]);
        // What `set_link` may call it: its id, else QEMU's automatic name
        // (the driver and its count among NICs of that driver:
        // `virtio-net-pci.1`, the NixOS test driver's vlan NIC), and its
        // netdev's id.
        let driver = KIND.drivers().iter().map(|d| d.name).find(|d| option.ends_with(d));
        let mut names = Vec::new();
        match (refs.device_id(), driver) {
            (Some(id), _) => names.push(id.to_owned()),
            (None, Some(d)) => names.push(format!("{d}.{}", refs.ordinal(d))),
            (None, None) => {}
        }
        names.push(netdev.id().to_owned());
        Ok(Box::new(Nic { netdev, mac, mq: self.mq, names }))
    }
}

/// A NIC on its netdev.
#[derive(Debug, PartialEq, Eq)]
pub struct Nic {
    pub netdev: Arc<NetdevConfig>,
    pub mac: [u8; 6],
    /// `mq=on`: offer the tap's queues as queue pairs.
    pub mq: bool,
    /// What `set_link` may call it.
    pub names: Vec<String>,
}

impl Device for Nic {
    /// Taps are opened or adopted here, once: a reboot keeps the interface
    /// and inherited descriptors; with `vhost=on` one vhost-net instance
    /// per queue pair.
    fn open(&self, _: &OpenContext<'_>) -> Result<Box<dyn HostSide>, OpenError> {
        let params = NetParams { mac: self.mac, queue_size: 256 };
        let failed = |kind: &str, id: &str, e: NetError| {
            OpenError::new(format!("-netdev {kind},id={id}"), e)
        };
        let mut vde_conn = None;
        let backend = match &*self.netdev {
            NetdevConfig::User { id, config } => {
                let (user, fd) =
                    UserNet::start(config).map_err(|e| failed("user", id, e.into()))?;
                let taps = vec![Arc::new(Tap::socket(fd, &format!("netdev {id}")))];
                NetBackend { taps, vhost: None, user: Some(user), link: Default::default() }
            }
            NetdevConfig::Vde { id, sock, port, group, mode } => {
                let vde = crate::host::vde::VdeConn::open(sock, *port, group.as_deref(), *mode)
                    .map_err(|e| {
                        OpenError::new(format!("-netdev vde,id={id}: Could not open vde"), e)
                    })?;
                let fd = vde
                    .data_socket()
                    .map_err(|e| OpenError::new(format!("-netdev vde,id={id}"), e))?;
                let taps = vec![Arc::new(Tap::bare_socket(fd, &format!("netdev {id}")))];
                vde_conn = Some(vde);
                NetBackend { taps, vhost: None, user: None, link: Default::default() }
            }
            NetdevConfig::Bridge { id, br, helper } => {
                let fd = crate::host::bridge_helper::tap_for_bridge(helper, br)
                    .map_err(|e| OpenError::new(format!("-netdev bridge,id={id}"), e))?;
                let tap = Tap::from_fd(std::os::fd::IntoRawFd::into_raw_fd(fd))
                    .map_err(|e| failed("bridge", id, e.into()))?;
                NetBackend {
                    taps: vec![Arc::new(tap)],
                    vhost: None,
                    user: None,
                    link: Default::default(),
                }
            }
            NetdevConfig::Tap { id, source, vhost } => {
                let queues = source.queues();
                let taps = (0..queues)
                    .map(|q| match source {
                        TapSource::Ifname { name, .. } => Tap::open(name, q, queues > 1),
                        TapSource::Fds(fds) => Tap::from_fd(fds[q]),
                    })
                    .map(|t| t.map(Arc::new).map_err(|e| failed("tap", id, e.into())))
                    .collect::<Result<Vec<_>, _>>()?;
                // Without mq=on the driver is offered one pair (QEMU's default).
                let taps = if self.mq { taps } else { taps.into_iter().take(1).collect() };
                let vhost = vhost
                    .then(|| VhostNetBackend::open(taps.len()))
                    .transpose()
                    .map_err(|e| failed("tap", id, e.into()))?;
                NetBackend { taps, vhost, user: None, link: Default::default() }
            }
        };
        Ok(Box::new(Opened {
            backend: Arc::new(backend),
            params,
            _vde: vde_conn,
            names: self.names.clone(),
        }))
    }
    fn sandbox(&self) -> Sandbox {
        match &*self.netdev {
            NetdevConfig::User { .. } => {
                Sandbox { backend_socket: true, inet: true, ..Sandbox::default() }
            }
            NetdevConfig::Tap { vhost, .. } => {
                Sandbox { tap: true, vhost: *vhost, ..Sandbox::default() }
            }
            NetdevConfig::Bridge { .. } => Sandbox { tap: true, ..Sandbox::default() },
            // Datagrams on the switch's socket, as user networking's.
            NetdevConfig::Vde { .. } => Sandbox { backend_socket: true, ..Sandbox::default() },
        }
    }
}

struct Opened {
    backend: Arc<NetBackend>,
    params: NetParams,
    /// A VDE connection, held open while its data socket serves.
    _vde: Option<crate::host::vde::VdeConn>,
    names: Vec<String>,
}

impl HostSide for Opened {
    fn attach(&self, mem: &boot::GuestMemoryMmap) -> crate::vm::Result<()> {
        self.backend.attach(mem);
        Ok(())
    }
    fn detach(&self, _: &boot::GuestMemoryMmap) {
        self.backend.detach();
    }
    fn build(&self, run: &mut RunContext<'_>) -> crate::vm::Result<Built> {
        run.faces.offer_named(self.names.clone(), Arc::new(Cable(self.backend.link.clone())));
        if self.backend.user.is_some() {
            // Its netdev's id names it (`hostfwd_add ID RULE`).
            let id = self.names.last().cloned().into_iter().collect();
            run.faces.offer_named(id, Arc::new(Forwards(self.backend.clone())));
        }
        Ok(Built::Virtio(Arc::new(Mutex::new(Net::new(self.backend.clone(), &self.params)))))
    }
}

/// User networking's forwarded ports, for `hostfwd_add`/`hostfwd_remove`.
struct Forwards(Arc<NetBackend>);

impl crate::ctl::DeviceControl for Forwards {
    fn classes(&self) -> &'static [crate::ctl::Class] {
        &[crate::ctl::Class::UserNet]
    }
    fn command(
        &self,
        cmd: &crate::ctl::Command,
    ) -> Result<crate::ctl::Answer, crate::ctl::CtlError> {
        use crate::ctl::{Answer, Command, CtlError};
        let Some(user) = &self.0.user else {
            return Err(CtlError::NoDevice("no user networking (-netdev user)"));
        };
        match cmd {
            // QEMU's words (hmp_hostfwd_add, hmp_hostfwd_remove).
            Command::HostFwdAdd(f) if user.add_hostfwd(f) => Ok(Answer::Done),
            Command::HostFwdAdd(f) => {
                Err(CtlError::Failed(format!("Could not set up host forwarding rule '{}'", f.text)))
            }
            Command::HostFwdRemove { udp, addr, port } => {
                let rule = format!("{}:{addr}:{port}", if *udp { "udp" } else { "tcp" });
                if user.remove_hostfwd(*udp, *addr, *port) {
                    Ok(Answer::Message(format!("host forwarding rule for {rule} removed")))
                } else {
                    Err(CtlError::Failed(format!("could not remove host forwarding rule '{rule}'")))
                }
            }
            _ => Err(CtlError::Failed("user networking takes only hostfwd commands".into())),
        }
    }
}

/// The NIC's link, for `set_link`.
struct Cable(Arc<devices::virtio::net::Link>);

impl crate::ctl::DeviceControl for Cable {
    fn classes(&self) -> &'static [crate::ctl::Class] {
        &[crate::ctl::Class::Link]
    }
    fn command(
        &self,
        cmd: &crate::ctl::Command,
    ) -> Result<crate::ctl::Answer, crate::ctl::CtlError> {
        match cmd {
            crate::ctl::Command::SetLink { up } => {
                self.0.set(*up);
                Ok(crate::ctl::Answer::Done)
            }
            _ => Err(crate::ctl::CtlError::Failed("a NIC takes only set_link".into())),
        }
    }
}
