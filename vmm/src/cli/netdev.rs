//! `-netdev` and the legacy `-net nic`: a NIC's host side, with QEMU's
//! keys and meanings (net/tap.c, net/net.c).

use super::opts::QemuOpts;
use super::CliError;
use std::net::Ipv4Addr;

use crate::config::{HostFwd, NetdevConfig, TapSource, UserConfig};

/// QEMU's limit on a tap's queues (MAX_TAP_QUEUES).
const MAX_TAP_QUEUES: u64 = 1024;

/// `-netdev TYPE,id=ID,...`.
pub(super) fn parse_netdev(label: &str, arg: &str) -> Result<NetdevConfig, CliError> {
    let mut opts = QemuOpts::parse(label, arg, Some("type"));
    let ty = opts.take("type").ok_or_else(|| opts.missing("type"))?;
    opts.relabel(format!("{label} {ty}"));
    let id = opts.take_id()?.ok_or_else(|| opts.missing("id"))?;
    opts.relabel(format!("{label} {ty},id={id}"));
    let netdev = match ty.as_str() {
        "tap" => tap(&mut opts, id)?,
        "user" => NetdevConfig::User { id, config: user(&mut opts)? },
        "bridge" => {
            // QEMU's defaults: br0, and the helper its package installs.
            let br = opts.take("br").unwrap_or_else(|| "br0".to_owned());
            let helper = opts
                .take("helper")
                .unwrap_or_else(|| crate::host::bridge_helper::DEFAULT_HELPER.to_owned());
            NetdevConfig::Bridge { id, br, helper }
        }
        "vde" => vde(&mut opts, id)?,
        other => return Err(opts.error(format!("netdev type '{other}' is not supported"))),
    };
    opts.finish()?;
    Ok(netdev)
}

/// `-netdev vde,id=ID[,sock=PATH][,port=N][,group=G][,mode=OCTAL]`, QEMU's
/// defaults: libvdeplug's default switch, any port, mode 0700.
fn vde(opts: &mut QemuOpts, id: String) -> Result<NetdevConfig, CliError> {
    let sock = opts.take("sock").unwrap_or_default();
    let port = match opts.take_uint("port")? {
        Some(p) if p > u64::from(i32::MAX as u32) => {
            return Err(opts.invalid_value("port", p.to_string(), "a port number"))
        }
        p => p.unwrap_or(0) as u32,
    };
    let group = opts.take("group");
    // QEMU reads mode= as a number (octal with a leading 0, as 0700).
    let mode = match opts.take("mode") {
        None => 0o700,
        Some(m) => {
            let parsed = match m.strip_prefix('0').filter(|r| !r.is_empty()) {
                Some(oct) => u32::from_str_radix(oct, 8).ok(),
                None => m.parse::<u32>().ok(),
            };
            parsed
                .filter(|&v| v <= 0o7777)
                .ok_or_else(|| opts.invalid_value("mode", m.clone(), "a file mode such as 0700"))?
        }
    };
    Ok(NetdevConfig::Vde { id, sock, port, group, mode })
}

/// `-netdev tap,id=ID,ifname=NAME[,script=no][,downscript=no][,vhost=on]
/// [,queues=N][,vnet_hdr=on]` or `,fd=N` / `,fds=N:M:...`.
fn tap(opts: &mut QemuOpts, id: String) -> Result<NetdevConfig, CliError> {
    // skiff runs no scripts: the interface is set up by whoever made it
    // (microvm.nix's runner, systemd-networkd), and `no` is what every
    // such caller passes.
    for key in ["script", "downscript"] {
        match opts.take(key).as_deref() {
            None | Some("no") | Some("") => {}
            Some(_) => {
                return Err(opts.error(format!(
                    "{key}= is not supported (skiff runs no scripts; set the tap up beforehand \
                     and pass {key}=no)"
                )))
            }
        }
    }
    if opts.take_bool("vnet_hdr")? == Some(false) {
        return Err(opts.error("vnet_hdr=off is not supported (skiff needs the virtio-net header)"));
    }
    let vhost = opts.take_bool("vhost")?.unwrap_or(false);
    // Forces vhost for guests without MSI-X in QEMU; skiff's vhost needs no
    // such guest help.
    opts.take_bool("vhostforce")?;
    for key in ["vhostfd", "vhostfds", "helper", "sndbuf"] {
        if opts.contains(key) {
            return Err(opts.error(format!("{key}= is not supported")));
        }
    }
    let ifname = opts.take("ifname");
    let fd = opts.take("fd");
    let fds = opts.take("fds");
    let queues = opts.take_uint("queues")?;
    if let Some(q) = queues {
        if q == 0 || q > MAX_TAP_QUEUES {
            return Err(opts.invalid_value("queues", q.to_string(), "1 to 1024"));
        }
    }
    let source = match (ifname, fd, fds) {
        (Some(name), None, None) => {
            if name.is_empty() || name.len() > 15 {
                return Err(opts.invalid_value("ifname", name, "a name of 1 to 15 bytes"));
            }
            TapSource::Ifname { name, queues: queues.unwrap_or(1) as u16 }
        }
        (None, Some(fd), None) => {
            if queues.is_some_and(|q| q > 1) {
                return Err(opts.error("fd= carries one queue; use fds= for several"));
            }
            TapSource::Fds(vec![parse_fd(opts, "fd", &fd)?])
        }
        (None, None, Some(list)) => {
            let fds =
                list.split(':').map(|f| parse_fd(opts, "fds", f)).collect::<Result<Vec<_>, _>>()?;
            if queues.is_some_and(|q| q as usize != fds.len()) {
                return Err(opts.error("queues= does not match the number of fds="));
            }
            if (1..fds.len()).any(|i| fds[..i].contains(&fds[i])) {
                return Err(opts.invalid_value("fds", list, "distinct descriptors"));
            }
            TapSource::Fds(fds)
        }
        (None, None, None) => {
            return Err(opts.error("ifname=, fd= or fds= is required (skiff does not name taps)"))
        }
        _ => return Err(opts.error("ifname=, fd= and fds= exclude each other")),
    };
    Ok(NetdevConfig::Tap { id, source, vhost })
}

/// `-netdev user,id=ID[,net=ADDR[/MASK]][,host=][,dhcpstart=][,dns=]
/// [,hostfwd=RULE]...[,restrict=on][,ipv4=on][,ipv6=on|off][,hostname=]`,
/// with QEMU's defaults (net/slirp.c): 10.0.2.0/24, the host at .2, DNS
/// at .3, DHCP from .15; addresses not given follow `net=`.
fn user(opts: &mut QemuOpts) -> Result<UserConfig, CliError> {
    let mut c = UserConfig::default();
    if let Some(net) = opts.take("net") {
        let (addr, mask) = parse_net_mask(&net).ok_or_else(|| {
            opts.invalid_value("net", net.clone(), "ADDR[/MASK] such as 10.0.2.0/24")
        })?;
        let base = u32::from(addr) & u32::from(mask);
        c.net = Ipv4Addr::from(base);
        c.mask = mask;
        c.host = Ipv4Addr::from(base | 2);
        c.dns = Ipv4Addr::from(base | 3);
        c.dhcp_start = Ipv4Addr::from(base | 15);
    }
    let in_net = |a: Ipv4Addr| u32::from(a) & u32::from(c.mask) == u32::from(c.net);
    for (key, slot) in
        [("host", &mut c.host), ("dns", &mut c.dns), ("dhcpstart", &mut c.dhcp_start)]
    {
        if let Some(v) = opts.take(key) {
            let addr: Ipv4Addr =
                v.parse().map_err(|_| opts.invalid_value(key, v.clone(), "an IPv4 address"))?;
            *slot = addr;
        }
    }
    for (key, addr) in [("host", c.host), ("dns", c.dns), ("dhcpstart", c.dhcp_start)] {
        if !in_net(addr) {
            return Err(opts.error(format!("{key}={addr} is not in net={}", c.net)));
        }
    }
    c.restrict = match opts.take("restrict").as_deref() {
        None => false,
        Some("on" | "yes" | "y" | "true") => true,
        Some("off" | "no" | "n" | "false") => false,
        Some(other) => return Err(opts.invalid_value("restrict", other.to_owned(), "on or off")),
    };
    if opts.take_bool("ipv4")? == Some(false) {
        return Err(opts.error("ipv4=off is not supported"));
    }
    c.ipv6 = opts.take_bool("ipv6")?.unwrap_or(true);
    c.hostname = opts.take("hostname");
    for key in ["guestfwd", "smb", "tftp", "bootfile", "dnssearch", "domainname", "ipv6-net"] {
        if opts.contains(key) {
            return Err(opts.error(format!("{key}= is not supported yet")));
        }
    }
    for rule in opts.take_all("hostfwd") {
        let fwd = parse_hostfwd(&rule).ok_or_else(|| {
            opts.invalid_value("hostfwd", rule.clone(), "tcp|udp:[HADDR]:HPORT-[GADDR]:GPORT")
        })?;
        if fwd.guest_addr.is_some_and(|a| !in_net(a)) {
            return Err(
                opts.error(format!("hostfwd={rule}: the guest address is not in net={}", c.net))
            );
        }
        c.hostfwd.push(fwd);
    }
    Ok(c)
}

/// `ADDR[/BITS|/MASK]`.
fn parse_net_mask(s: &str) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let (addr, mask) = match s.split_once('/') {
        None => (s, None),
        Some((a, m)) => (a, Some(m)),
    };
    let addr: Ipv4Addr = addr.parse().ok()?;
    let mask = match mask {
        // QEMU's classful default (net/slirp.c): /8, 172.16/12, 192.168/16,
        // else /24.
        None => {
            let a = u32::from(addr);
            let bits = if a & 0x8000_0000 == 0 {
                8
            } else if a & 0xfff0_0000 == 0xac10_0000 {
                12
            } else if a & 0xffff_0000 == 0xc0a8_0000 {
                16
            } else {
                24
            };
            Ipv4Addr::from(u32::MAX << (32 - bits))
        }
        Some(m) => match m.parse::<u8>() {
            Ok(bits) if (1..=30).contains(&bits) => Ipv4Addr::from(u32::MAX << (32 - bits)),
            Ok(_) => return None,
            Err(_) => {
                let m: Ipv4Addr = m.parse().ok()?;
                let v = u32::from(m);
                // A mask is ones then zeros.
                if v == 0 || v.leading_ones() + v.trailing_zeros() != 32 {
                    return None;
                }
                m
            }
        },
    };
    Some((addr, mask))
}

/// QEMU's `hostfwd=[tcp|udp]:[HADDR]:HPORT-[GADDR]:GPORT` (also the
/// monitor's `hostfwd_add` rule).
pub(crate) fn parse_hostfwd(rule: &str) -> Option<HostFwd> {
    parse_hostfwd_inner(rule)
}

/// The monitor's `hostfwd_remove [tcp|udp]:[HADDR]:HPORT`: (udp, address,
/// port).
pub(crate) fn parse_hostfwd_host(rule: &str) -> Option<(bool, Ipv4Addr, u16)> {
    let (proto, rest) = rule.split_once(':')?;
    let udp = match proto {
        "" | "tcp" => false,
        "udp" => true,
        _ => return None,
    };
    let (haddr, hport) = rest.rsplit_once(':')?;
    let addr = if haddr.is_empty() { Ipv4Addr::UNSPECIFIED } else { haddr.parse().ok()? };
    Some((udp, addr, hport.parse().ok()?))
}

fn parse_hostfwd_inner(rule: &str) -> Option<HostFwd> {
    let (proto, rest) = rule.split_once(':')?;
    let udp = match proto {
        "" | "tcp" => false,
        "udp" => true,
        _ => return None,
    };
    let (host, guest) = rest.split_once('-')?;
    let (haddr, hport) = host.rsplit_once(':')?;
    let (gaddr, gport) = guest.rsplit_once(':')?;
    let addr = |a: &str| -> Option<Option<Ipv4Addr>> {
        if a.is_empty() {
            Some(None)
        } else {
            a.parse().ok().map(Some)
        }
    };
    Some(HostFwd {
        udp,
        host_addr: addr(haddr)?.unwrap_or(Ipv4Addr::UNSPECIFIED),
        host_port: hport.parse().ok()?,
        guest_addr: addr(gaddr)?,
        guest_port: gport.parse().ok().filter(|&p| p != 0)?,
        text: rule.to_owned(),
    })
}

/// A descriptor number inherited from the parent; not stdin, stdout or
/// stderr, which skiff uses itself.
fn parse_fd(opts: &QemuOpts, key: &str, value: &str) -> Result<i32, CliError> {
    match value.parse::<i32>() {
        Ok(fd) if fd > 2 => Ok(fd),
        _ => Err(opts.invalid_value(key, value.to_owned(), "a descriptor number above 2")),
    }
}

/// `-net nic,netdev=ID,model=virtio[,macaddr=MAC][,id=..]`: QEMU's legacy
/// NIC, a virtio-net on the machine's bus. Other `-net` types are refused.
pub(super) fn parse_net(label: &str, arg: &str) -> Result<NicConfig, CliError> {
    let mut opts = QemuOpts::parse(label, arg, Some("type"));
    let ty = opts.take("type").ok_or_else(|| opts.missing("type"))?;
    opts.relabel(format!("{label} {ty}"));
    if ty != "nic" {
        return Err(opts.error(format!(
            "-net {ty} is not supported (use -netdev {ty},id=ID with -net nic,netdev=ID)"
        )));
    }
    let netdev = opts.take("netdev").ok_or_else(|| opts.missing("netdev"))?;
    match opts.take("model").as_deref() {
        None | Some("virtio") | Some("virtio-net-pci") | Some("virtio-net-device") => {}
        Some(other) => {
            return Err(opts.invalid_value("model", other.to_owned(), "virtio"));
        }
    }
    let mac = opts.take("macaddr").map(|m| parse_mac(&opts, "macaddr", m)).transpose()?;
    // `name=` names the client in QEMU's monitor; nothing to show here.
    opts.take("name");
    opts.take_id()?;
    opts.finish()?;
    Ok(NicConfig { netdev, mac })
}

/// A `-net nic`, placed once the machine's bus is known.
#[derive(Debug)]
pub(super) struct NicConfig {
    pub netdev: String,
    pub mac: Option<[u8; 6]>,
}

/// `52:54:00:12:34:56` (or with `-`, as QEMU also takes); a multicast
/// address is refused, as QEMU does.
pub(crate) fn parse_mac(opts: &QemuOpts, key: &str, value: String) -> Result<[u8; 6], CliError> {
    let bytes: Vec<Option<u8>> = value
        .split([':', '-'])
        .map(|b| (b.len() == 2).then(|| u8::from_str_radix(b, 16).ok()).flatten())
        .collect();
    match <[Option<u8>; 6]>::try_from(bytes) {
        Ok(b) if b.iter().all(Option::is_some) => {
            let mac = b.map(|x| x.unwrap_or(0));
            if mac[0] & 1 != 0 {
                return Err(opts.error(format!("{key}={value} is a multicast address")));
            }
            Ok(mac)
        }
        _ => Err(opts.invalid_value(key, value, "a MAC address such as 52:54:00:12:34:56")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn netdev(arg: &str) -> Result<NetdevConfig, String> {
        parse_netdev("-netdev", arg).map_err(|e| e.to_string())
    }

    /// qemu-vm.nix's vlan NIC, and QEMU's other vde keys.
    #[test]
    fn vde_forms() {
        let vde = |sock: &str, port, group: Option<&str>, mode| NetdevConfig::Vde {
            id: "vlan1".into(),
            sock: sock.into(),
            port,
            group: group.map(str::to_owned),
            mode,
        };
        assert_eq!(
            netdev("vde,id=vlan1,sock=/tmp/vde1.ctl"),
            Ok(vde("/tmp/vde1.ctl", 0, None, 0o700))
        );
        assert_eq!(
            netdev("vde,id=vlan1,sock=s,port=3,group=kvm,mode=0770"),
            Ok(vde("s", 3, Some("kvm"), 0o770))
        );
        assert_eq!(netdev("vde,id=vlan1"), Ok(vde("", 0, None, 0o700)), "libvdeplug's default");
        assert!(netdev("vde,id=v,mode=0999").unwrap_err().contains("mode"));
        assert!(netdev("vde,id=v,port=-1").unwrap_err().contains("port"));
        assert!(netdev("vde,id=v,frob=1").unwrap_err().contains("frob"));
    }

    #[test]
    fn microvm_nix_tap_forms() {
        let n =
            netdev("tap,id=vm-a,ifname=vm-a,script=no,downscript=no,vhost=on,queues=4").unwrap();
        assert_eq!(
            n,
            NetdevConfig::Tap {
                id: "vm-a".into(),
                source: TapSource::Ifname { name: "vm-a".into(), queues: 4 },
                vhost: true
            }
        );
        let n = netdev("tap,id=n1,fd=3").unwrap();
        assert_eq!(
            n,
            NetdevConfig::Tap { id: "n1".into(), source: TapSource::Fds(vec![3]), vhost: false }
        );
        let n = netdev("tap,id=n1,fds=3:4:5,vhost=on").unwrap();
        assert_eq!(
            n,
            NetdevConfig::Tap {
                id: "n1".into(),
                source: TapSource::Fds(vec![3, 4, 5]),
                vhost: true
            }
        );
    }

    #[test]
    fn tap_errors_name_their_key() {
        let err = |a| netdev(a).unwrap_err();
        assert!(err("tap,id=n,ifname=t,script=/etc/qemu-ifup").contains("script="));
        assert!(err("tap,id=n,ifname=t,vnet_hdr=off").contains("vnet_hdr=off"));
        assert!(err("tap,id=n,ifname=t,vhostfd=5").contains("vhostfd="));
        assert!(err("tap,id=n").contains("ifname=, fd= or fds="));
        assert!(err("tap,id=n,ifname=t,fd=3").contains("exclude"));
        assert!(err("tap,id=n,fd=1").contains("above 2"));
        assert!(err("tap,id=n,fds=3:3").contains("distinct"));
        assert!(err("tap,id=n,fds=3:4,queues=3").contains("queues="));
        assert!(err("tap,id=n,ifname=t,queues=0").contains("queues"));
        assert!(err("tap,id=n,ifname=abcdefghijklmnop").contains("ifname"));
        assert!(err("tap,id=n,ifname=t,bogus=1").contains("'bogus'"));
        assert!(err("tap,ifname=t").contains("'id'"));
        assert_eq!(
            netdev("bridge,id=n,br=br1").unwrap(),
            NetdevConfig::Bridge {
                id: "n".into(),
                br: "br1".into(),
                helper: "/usr/lib/qemu/qemu-bridge-helper".into()
            }
        );
        assert!(err("bridge,id=n,vhost=on").contains("'vhost'"));
        assert!(err("socket,id=n").contains("'socket'"));
    }

    /// microvm.nix's user form, with its trailing comma, and QEMU's
    /// defaults following net=.
    #[test]
    fn user_networking() {
        let NetdevConfig::User { id, config } =
            netdev("user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=udp::5353-10.0.2.9:53,")
                .unwrap()
        else {
            panic!("not user")
        };
        assert_eq!(id, "n0");
        assert_eq!(config.dhcp_start, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(config.hostfwd.len(), 2);
        let f = &config.hostfwd[0];
        assert_eq!(
            (f.udp, f.host_addr, f.host_port, f.guest_addr, f.guest_port),
            (false, Ipv4Addr::LOCALHOST, 2222, None, 22)
        );
        let f = &config.hostfwd[1];
        assert_eq!(
            (f.udp, f.host_addr, f.guest_addr),
            (true, Ipv4Addr::UNSPECIFIED, Some(Ipv4Addr::new(10, 0, 2, 9)))
        );
        let NetdevConfig::User { config, .. } =
            netdev("user,id=u,net=192.168.7.0/24,restrict=yes").unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (config.host, config.dns, config.dhcp_start, config.restrict),
            (
                Ipv4Addr::new(192, 168, 7, 2),
                Ipv4Addr::new(192, 168, 7, 3),
                Ipv4Addr::new(192, 168, 7, 15),
                true
            )
        );
        let err = |a| netdev(a).unwrap_err();
        assert!(err("user,id=n,hostfwd=tcp:2222-:22").contains("hostfwd"));
        assert!(err("user,id=n,hostfwd=sctp::1-:2").contains("hostfwd"));
        assert!(err("user,id=n,net=10.0.2.0/33").contains("net"));
        assert!(err("user,id=n,host=10.0.3.2").contains("not in net="));
        assert!(err("user,id=n,smb=/srv").contains("smb= is not supported yet"));
        assert!(err("user,id=n,guestfwd=tcp:10.0.2.100:80-cmd:nc").contains("guestfwd="));
        let NetdevConfig::User { config, .. } = netdev("user,id=u,net=10.0.0.0").unwrap() else {
            panic!()
        };
        assert_eq!(
            (config.mask, config.dhcp_start),
            (Ipv4Addr::new(255, 0, 0, 0), Ipv4Addr::new(10, 0, 0, 15)),
            "QEMU's classful default"
        );
        assert!(err("user,id=n,ipv4=off").contains("ipv4=off"));
    }

    #[test]
    fn legacy_nic() {
        let n = parse_net("-net", "nic,netdev=user.0,model=virtio").unwrap();
        assert_eq!(n.netdev, "user.0");
        assert_eq!(n.mac, None);
        let n = parse_net("-net", "nic,netdev=n,macaddr=52-54-00-00-00-01").unwrap();
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0, 0, 1]));
        let err = |a| parse_net("-net", a).unwrap_err().to_string();
        assert!(err("nic,netdev=n,model=e1000").contains("model"));
        assert!(err("user").contains("-net user is not supported"));
        assert!(err("nic,netdev=n,macaddr=01:00:00:00:00:01").contains("multicast"));
        assert!(err("nic,netdev=n,macaddr=52:54:00").contains("MAC address"));
    }
}
