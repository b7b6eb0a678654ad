//! `-help`.

const HELP: &str = "\
usage: skiff [options]

Skiff runs a KVM virtual machine like qemu-system-x86_64 -M microvm, with the
same command-line syntax and meaning, for the subset of options below.
Options take one or two leading dashes (-m, --m).

Standard options:
-h, -help                display this help and exit
-version                 display version information and exit
-name [guest=]NAME[,debug-threads=on|off][,process=NAME]
                         set the guest name
-M, -machine [type=]microvm[,accel=kvm][,acpi=on|off|auto][,pcie=on|off|auto]
             [,pic=on|off|auto][,pit=on|off|auto][,rtc=on|off|auto]
             [,usb=off|auto][,mem-merge=on|off][,isa-serial=on|off]
             [,x-option-roms=on|off][,auto-kernel-cmdline=on|off]
                         select the machine: only 'microvm'; accel is a
                         ':'-separated list that must include kvm
-accel kvm               use KVM (the only accelerator)
-enable-kvm              same as -accel kvm
-cpu host|max[,+FEATURE][,-FEATURE][,FEATURE=on|off]
                         the host CPU (max is the same), with CPUID features
                         added or removed
-smp [cpus=]N[,sockets=S][,cores=C][,threads=T][,dies=1][,maxcpus=N]
                         number of vCPUs (1 to 254) and their topology; missing
                         values are derived as QEMU does; no CPU hotplug
                         (maxcpus must equal cpus)
-m [size=]SIZE           guest RAM (default 128M); suffixes K, M, G, T; a plain
                         number is in MiB; no maxmem/slots (no memory hotplug)
-object memory-backend-ram,id=ID,size=SIZE[,share=on|off][,merge=on|off]
        [,dump=on|off]
-object memory-backend-memfd,id=ID,size=SIZE[,share=on|off][,seal=on|off]
        [,hugetlb=on|off][,hugetlbsize=SIZE][,merge=on|off][,dump=on|off]
                         guest RAM's host memory, used when a -numa node
                         names it; memfd (share=on by default) is what a
                         vhost-user backend can map
-numa node[,nodeid=0],memdev=ID
                         back guest RAM with memory backend ID, whose size
                         must equal -m; microvm has one node (either order
                         with -object)
-smbios type=1[,manufacturer=S][,product=S][,version=S][,serial=S]
              [,uuid=UUID][,sku=S][,family=S]
                         set the SMBIOS system information (type 1; the
                         guest's /sys/class/dmi/id). Without it, or without
                         uuid=, the UUID is random, fixed for the process
-sandbox on|off[,obsolete=allow|deny][,elevateprivileges=allow|deny|children]
               [,spawn=allow|deny][,resourcecontrol=allow|deny]
                         confine skiff with seccomp once set up: each thread
                         (vCPU, device worker, console) may make only the
                         system calls it needs; any other ends skiff with
                         status 159 and a message naming the call. A class
                         is let in only by its switch's 'allow'
-run-with user=NAME|UID:GID[,chroot=DIR]
                         once /dev/kvm, images and sockets are open, chroot
                         and become that user (as QEMU)

Boot options:
-kernel PATH             the Linux kernel (bzImage or ELF vmlinux)
-initrd PATH             the initial ram disk
-append CMDLINE          the kernel command line

Devices:
-device i8042[,id=ID]    PS/2 controller (i8042 reset reboots the guest)
-device isa-debug-exit[,iobase=PORT][,iosize=N][,id=ID]
                         writing V to PORT ends skiff with status (V << 1) | 1
                         (default iobase=0x501, iosize=2)
-device virtio-rng-device[,max-bytes=N,period=MS][,id=ID]
                         entropy on virtio-mmio (0xfeb00000 + 512 * n)
-device virtio-rng-pci[,addr=SLOT[.FN]][,bus=ID][,multifunction=on|off]
                      [,max-bytes=N,period=MS][,disable-legacy=on][,id=ID]
                         entropy on PCIe (needs -M microvm,pcie=on); MSI-X
-device virtio-blk-device|virtio-blk-pci,drive=ID[,serial=S][,num-queues=N]
        [,queue-size=N][,logical_block_size=N][,physical_block_size=N]
        [,bootindex=N][,addr=..][,bus=ID][,disable-legacy=on][,id=ID]
                         a disk on -drive ID (virtio-mmio or PCIe); num-queues
                         defaults to one per vCPU on PCIe; bootindex has no
                         effect (skiff has no firmware to boot a disk)
-drive id=ID,file=PATH[,if=none][,format=raw][,read-only=on|off]
       [,cache=none|writeback|writethrough|directsync|unsafe][,cache.direct=on|off]
       [,discard=unmap|ignore][,detect-zeroes=off|on|unmap][,aio=io_uring|threads|native]
       [,werror=report][,rerror=report][,file.locking=on|off][,index=N]
                         a raw image (no format= means raw, with QEMU's
                         warning); locked as QEMU locks it; cache=none on a
                         filesystem without O_DIRECT (tmpfs) falls back to the
                         page cache with a warning; each queue runs on a worker
                         thread of its own, many requests at once: through a
                         thread pool (aio=threads, the default) or an io_uring
                         (aio=io_uring or native; a pool where the host has
                         no io_uring); aio=native needs cache=none, as in QEMU
-device vhost-user-fs-device|vhost-user-fs-pci,chardev=ID,tag=TAG
        [,queue-size=N][,num-request-queues=N][,addr=..][,bus=ID][,id=ID]
                         a virtiofs share served by virtiofsd on -chardev
                         socket ID; guest RAM is shared with it (without
                         -object memory-backend-memfd,share=on, skiff makes
                         RAM a shared memfd); if virtiofsd dies, the share
                         fails with ENOTCONN and the VM goes on
-device vhost-vsock-device|vhost-vsock-pci,guest-cid=N[,addr=..][,bus=ID][,id=ID]
                         AF_VSOCK to the guest through the host kernel's
                         vhost_vsock (/dev/vhost-vsock); the CID is held
                         from start to exit, across guest reboots
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
-net nic,netdev=ID[,model=virtio][,macaddr=MAC]
                         a virtio-net on the machine's bus (PCIe with
                         pcie=on, else virtio-mmio)
-device virtio-9p-device|virtio-9p-pci,fsdev=ID,mount_tag=TAG[,addr=..][,bus=ID][,id=ID]
                         a 9P2000.L share of -fsdev ID, served by skiff on
                         a worker thread; the guest cannot reach outside
                         the directory (no '..', '/' in names, symlinks
                         are never followed by skiff)
-fsdev local,id=ID,path=DIR,security_model=MODEL[,readonly=on|off]
                         the directory a virtio-9p shares; readonly=on
                         refuses every change with EROFS; MODEL:
                         passthrough applies the guest's chown, none ignores
                         a chown the host refuses, mapped-xattr keeps the
                         guest's owners and modes in user.virtfs.* xattrs
                         (mapped-file is not supported)
-virtfs local,path=DIR,mount_tag=TAG,security_model=..[,readonly=on][,id=ID]
                         both at once: the -fsdev (id= or the tag) and its
                         virtio-9p (PCIe with pcie=on, else virtio-mmio)
-device pcie-root-port,id=ID[,chassis=N][,slot=N][,port=N][,addr=..][,bus=pcie.0]
                         a root port; devices with bus=ID sit behind it
                         Every explicit addr= is reserved before any device
                         is placed automatically, whatever the order.

Character devices:
-chardev stdio,id=ID[,signal=on|off]
-chardev file,id=ID,path=PATH[,append=on|off]
-chardev null,id=ID
-chardev socket,id=ID,path=PATH[,server=on|off][,wait=on|off]
        [,reconnect=SECONDS|reconnect-ms=MS]
                         Unix sockets only (also QEMU's server,nowait)
-serial stdio|null|none|file:PATH|chardev:ID
                         the next ISA serial port (COM1 to COM4)

Display and behaviour:
-nographic               no display (serial on stdio unless -nodefaults)
-display none            no display
-nodefaults              no default devices (no serial port on stdio)
-no-user-config          accepted (skiff reads no configuration files)
-no-reboot               exit instead of rebooting

Monitor:
-qmp unix:PATH,server[,nowait]   QMP control socket (also server=on,wait=off)
-qmp tcp:HOST:PORT,server[,nowait]
                         commands: qmp_capabilities, query-status,
                         query-version, query-commands, system_powerdown,
                         system_reset, quit, input-send-event
-monitor none            no human monitor (the only form accepted)

Every other QEMU option (for example -blockdev, -fw_cfg), every other
-netdev type (socket, stream, vde, ...), every other -object type, and every other
-device (for example vfio-pci, virtio-balloon-pci) is not supported yet: skiff
stops with an error naming it rather than ignore it.
";

/// The `-help` text: every supported option and device.
pub fn help_text() -> &'static str {
    HELP
}
