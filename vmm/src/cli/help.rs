//! `-help`.

const HEAD: &str = "\
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
             [,usb=on|off|auto][,mem-merge=on|off][,isa-serial=on|off]
             [,x-option-roms=on|off][,auto-kernel-cmdline=on|off]
                         select the machine: only 'microvm'; accel is a
                         ':'-separated list that must include kvm. With no
                         type (no -M, or only -machine accel=...) skiff gives
                         its default machine, what a QEMU 'pc' guest expects
                         of a direct kernel boot: microvm's board with the
                         PCIe root (pcie=on), the CMOS RTC (rtc=on) and an
                         i8042, serial COM1 unless -nodefaults
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
-smbios type=11,value=STR|path=FILE[,...]
                         OEM strings (SMBIOS type 11), in order (a FILE's
                         text is one string, read at start); systemd
                         reads io.systemd.credential:NAME=VALUE from them
-fw_cfg [name=]NAME,file=PATH|string=STR
                         a file the guest reads through fw_cfg (ports 0x510,
                         DMA at 0x514; NAME up to 55 bytes, opt/... by
                         convention; systemd reads opt/io.systemd.credentials/*).
                         Files are read once, at start. The guest finds
                         fw_cfg through the DSDT's QEMU0002 node; with
                         acpi=off, as in QEMU, only a kernel built with
                         CONFIG_FW_CFG_SYSFS_CMDLINE told where it is:
                         qemu_fw_cfg.ioport=0xc@0x510:0:1:4
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
";

/// After the devices (each kind's lines come from the registry).
const TAIL: &str = "
\
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
-usb                     same as -machine usb=on: taken, but skiff has no USB
                         controller (it says so at start)

Monitor:
-qmp unix:PATH,server[,nowait]   QMP control socket (also server=on,wait=off)
-qmp tcp:HOST:PORT,server[,nowait]
                         commands: qmp_capabilities, query-status,
                         query-version, query-commands, system_powerdown,
                         system_reset, quit, input-send-event, balloon,
                         query-balloon, set_link; events SHUTDOWN, RESET,
                         POWERDOWN, BALLOON_CHANGE
-monitor unix:PATH[,server=on[,wait=off]][,reconnect=S]
                         QEMU's human monitor (HMP): skiff connects to PATH
                         (the NixOS test driver listens there), or listens
                         with server=on; banner, echo and '(qemu) ' prompt
                         as QEMU's. Commands: help, info status, info
                         version, quit, system_reset, system_powerdown,
                         sendkey KEYS [HOLD_MS], set_link NAME on|off,
                         hostfwd_add/hostfwd_remove [NETDEV] RULE (user
                         networking), screendump (no display: QEMU's error)
-monitor none            no human monitor

Every other QEMU option (for example -blockdev, -fw_cfg), every other
-netdev type (socket, stream, ...), every other -object type, and every other
-device (for example virtio-gpu, virtio-mouse) is not supported yet: skiff
stops with an error naming it rather than ignore it.
";

/// The `-help` text: every supported option, and every device kind's
/// lines from the registry.
pub fn help_text() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        let mut text = HEAD.to_owned();
        crate::kinds::KINDS.iter().for_each(|k| text.push_str(k.help()));
        text.push_str(TAIL);
        text
    })
}
