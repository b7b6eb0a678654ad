//! `-sandbox on`: seccomp-BPF allowlists, installed once every privileged
//! resource is open and before the first run builds its VM.
//!
//! Two layers, as seccomp stacks filters (the strictest answer wins):
//! - the process filter, on every thread (TSYNC) and inherited by each new
//!   one: what skiff does at all, including what a guest reboot needs (a new
//!   VM, RAM, device threads); so the first run already proves the reboot's
//!   system calls are allowed;
//! - a filter per kind of thread, installed by the thread itself when it
//!   starts: a vCPU, a block I/O thread, the console writer each get only
//!   what they call (and what the threads they start call: a new thread
//!   inherits its creator's filters); a device's worker gets the calls its
//!   own device's kind declares (`kinds::Sandbox`), not every device's.
//!
//! A call outside the lists raises SIGSYS; the handler names the call and
//! the thread and ends skiff with status 159 (128 + SIGSYS, what a shell
//! reports for a process seccomp killed, as QEMU's sandbox does).
//!
//! QEMU's switches keep their meaning: its `-sandbox on` blocks a few
//! classes of calls, skiff's allows only its own, so a class is outside the
//! filter unless its switch says `allow`: `obsolete=allow` (old calls),
//! `elevateprivileges=allow` (set*id), `spawn=allow` (fork, exec),
//! `resourcecontrol=allow` (priorities, affinity). `elevateprivileges=children`
//! is skiff's default anyway: no_new_privs is set for seccomp.

mod names;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use crate::config::SandboxConfig;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("-sandbox on: building the {0} filter: {1}")]
    Build(&'static str, #[source] seccompiler::BackendError),
    #[error("-sandbox on: installing the filter: {0}")]
    Install(#[source] seccompiler::Error),
    #[error("-sandbox on: installing the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
}

/// Who calls: each kind has its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// Setup, the event loop, QMP, and every guest (re)start.
    Main,
    Vcpu,
    /// The serial console's writer.
    Console,
    /// A queue worker of a device of the family named (`virtio-blk`).
    Worker(&'static str),
    /// A block device's I/O thread (`aio=threads`).
    Io,
    /// User networking's stack: the guest's connections as host sockets.
    Network,
    /// A vhost-user connection's watchdog: waits, and shuts the socket.
    Watchdog,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Console => "console",
            ThreadKind::Worker(_) => "worker",
            ThreadKind::Io => "io",
            ThreadKind::Network => "network",
            ThreadKind::Watchdog => "watchdog",
        }
    }
}

/// Set once the process filter is on: threads started later confine
/// themselves with it in mind.
static ACTIVE: OnceLock<Active> = OnceLock::new();

/// What the process's devices need beyond the base lists: each device's
/// kind says (`kinds::Sandbox`). `inet`: user networking's thread (started
/// before the filters, and confining itself then) opens internet sockets
/// for the guest. `share_files`: a 9p share's worker opens, reads and
/// changes files relative to the share's descriptors, opened during setup;
/// opening relative to a descriptor is then let through (an absolute path
/// still resolves from `/`: seccomp cannot read the path, so this is
/// QEMU's openness for those calls, not a jail).
pub use crate::kinds::Sandbox as Needs;

struct Active {
    policy: SandboxConfig,
    needs: Needs,
    /// What each device family's workers need (a family's devices may
    /// differ: a user-networking NIC and a tap NIC; its workers get both).
    families: Vec<(&'static str, Needs)>,
    /// `SKIFF_TEST_SECCOMP_TRIP=KIND`: that kind of thread makes one
    /// forbidden call once confined (for the test that the filter bites).
    trip: Option<String>,
}

/// Installs the SIGSYS handler and the process filter, and has device
/// threads confine themselves from now on. `families`: what each device
/// family's workers need.
pub fn install(policy: SandboxConfig, families: Vec<(&'static str, Needs)>) -> Result<(), Error> {
    let needs = families.iter().fold(Needs::default(), |n, (_, f)| n.union(*f));
    install_sigsys_handler()?;
    for prog in answers(&policy, needs)? {
        seccompiler::apply_filter_all_threads(&prog).map_err(Error::Install)?;
    }
    let main = filter(ThreadKind::Main, &policy, needs)?;
    seccompiler::apply_filter_all_threads(&main).map_err(Error::Install)?;
    let trip = std::env::var("SKIFF_TEST_SECCOMP_TRIP").ok();
    let _ = ACTIVE.set(Active { policy, needs, families, trip });
    devices::threads::on_start(|kind| {
        confine(match kind {
            devices::threads::ThreadKind::Worker(family) => ThreadKind::Worker(family),
            devices::threads::ThreadKind::Io => ThreadKind::Io,
            devices::threads::ThreadKind::Network => ThreadKind::Network,
            devices::threads::ThreadKind::Watchdog => ThreadKind::Watchdog,
        })
    });
    trip_if_asked(ThreadKind::Main);
    Ok(())
}

/// Narrows the calling thread to its kind's list (a no-op without
/// `-sandbox on`). A thread that cannot be confined ends skiff: running it
/// unconfined would be a silent hole.
pub fn confine(kind: ThreadKind) {
    let Some(active) = ACTIVE.get() else { return };
    let needs = match kind {
        // A family no device declared gets no device's calls.
        ThreadKind::Worker(family) => active
            .families
            .iter()
            .filter(|(f, _)| *f == family)
            .fold(Needs::default(), |n, (_, f)| n.union(*f)),
        _ => active.needs,
    };
    let applied = filter(kind, &active.policy, needs)
        .and_then(|prog| seccompiler::apply_filter(&prog).map_err(Error::Install));
    if let Err(e) = applied {
        #[expect(clippy::disallowed_macros, reason = "skiff exits right after")]
        {
            log::error!("{} thread: {e}", kind.name());
        }
        std::process::exit(1);
    }
    trip_if_asked(kind);
}

/// `SKIFF_TEST_SECCOMP_TRIP=THREAD[/unlinkat]`: THREAD (`vcpu`, `worker`,
/// `worker:virtio-blk`, ...) makes one call its list lacks: ptrace (in no
/// list), or unlinkat (a 9p share's worker's: another worker must not).
fn trip_if_asked(kind: ThreadKind) {
    let Some(spec) = ACTIVE.get().and_then(|a| a.trip.as_deref()) else { return };
    let (thread, call) = spec.split_once('/').unwrap_or((spec, "ptrace"));
    let named = match kind {
        ThreadKind::Worker(family) => {
            thread == "worker" || thread.strip_prefix("worker:") == Some(family)
        }
        _ => thread == kind.name(),
    };
    if !named {
        return;
    }
    // With these arguments either call would do nothing if it ever got
    // through: an invalid request, a descriptor that is not open.
    // SAFETY: system calls with plain integer arguments and a
    // NUL-terminated path.
    unsafe {
        match call {
            "unlinkat" => libc::syscall(libc::SYS_unlinkat, -1, c"".as_ptr(), 0),
            _ => libc::syscall(libc::SYS_ptrace, -1, 0, 0, 0),
        }
    };
}

/// Calls answered with an error instead of SIGSYS, for every thread (a
/// filter of its own: seccomp's strictest answer wins, and the lists let
/// these through):
/// - opening a file: EACCES. Nothing of skiff's opens one after setup, but
///   glibc's malloc, shrinking a thread's heap, reads
///   /proc/sys/vm/overcommit_memory once and copes with a refusal. With a
///   9p share, openat relative to a descriptor goes through (`Needs`);
/// - clone3: ENOSYS. glibc then falls back to clone, whose flags the lists
///   check (a thread, never a process); clone3's live in memory, out of a
///   filter's reach.
fn answers(policy: &SandboxConfig, needs: Needs) -> Result<Vec<BpfProgram>, Error> {
    let build = |e| Error::Build("answers", e);
    let openat = if needs.share_files {
        let cwd = libc::AT_FDCWD as u32 as u64;
        vec![SeccompRule::new(vec![cond(0, Op::Eq, cwd).map_err(build)?]).map_err(build)?]
    } else {
        vec![]
    };
    let mut eacces = BTreeMap::from([(libc::SYS_open, vec![]), (libc::SYS_openat, openat)]);
    eacces.insert(libc::SYS_openat2, vec![]);
    let open: BpfProgram = SeccompFilter::new(
        eacces,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        TargetArch::x86_64,
    )
    .and_then(TryInto::try_into)
    .map_err(build)?;
    if policy.spawn {
        return Ok(vec![open]);
    }
    let clone3: BpfProgram = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .and_then(TryInto::try_into)
    .map_err(build)?;
    Ok(vec![open, clone3])
}

/// What every thread may do: memory, locks, time, signals, its own exit,
/// logging to stderr, closing what it owns (and opening, which the answers
/// filter refuses).
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_getrandom,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
];

/// Event loops and the descriptors a device's start creates.
const EVENTS: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_fcntl,
    libc::SYS_dup,
];

/// Serving a disk (the image is opened during setup).
const DISK_IO: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_lseek,
];

/// Giving guest RAM back (a balloon): a hole punched in a memfd.
const RAM_DISCARD: &[i64] = &[libc::SYS_fallocate];

/// `aio=io_uring`'s rings: only threads of a machine whose disk has one.
const URING: &[i64] =
    &[libc::SYS_io_uring_setup, libc::SYS_io_uring_register, libc::SYS_io_uring_enter];

/// Talking to a vhost-user backend (requests with file descriptors, the
/// watchdog's shutdown): a vCPU starts and resets the device, the main
/// thread stops it at the end of a run, a device worker reconnects
/// (`reconnect=`), which also takes `socket` (AF_UNIX only, below). And a
/// virtio-net worker's batch of frames to user networking's thread.
const BACKEND_SOCKETS: &[i64] = &[
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_connect,
    libc::SYS_sendmmsg,
];

/// A server chardev's worker takes its next client.
const ACCEPT: &[i64] = &[libc::SYS_accept4, libc::SYS_accept];

/// A vhost-user watchdog ends a connection whose backend stopped
/// answering.
const WATCHDOG: &[i64] = &[libc::SYS_shutdown];

/// A 9p share's requests, on its worker (a vCPU starts it, and the main
/// thread's filter is the process's): lookups, reads and changes, all
/// relative to descriptors of the share.
const SHARE_FILES: &[i64] = &[
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_getdents64,
    libc::SYS_mkdirat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_readlinkat,
    libc::SYS_fchmodat,
    libc::SYS_fchmod,
    libc::SYS_fchownat,
    libc::SYS_fchown,
    libc::SYS_utimensat,
    libc::SYS_ftruncate,
    libc::SYS_flock,
    // security_model=mapped-xattr's user.virtfs.* (on a descriptor opened
    // through the server's /proc handle).
    libc::SYS_fgetxattr,
    libc::SYS_fsetxattr,
];

/// User networking's sockets: the guest's TCP and UDP connections and
/// pings, and `hostfwd=` listeners.
const INET_SOCKETS: &[i64] = &[
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    // The device's frames, several per call, and the guest's back.
    libc::SYS_recvmmsg,
    libc::SYS_sendmmsg,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_shutdown,
    libc::SYS_fcntl,
];

/// The main thread's own: QMP clients, guest RAM for a new run, removing
/// its sockets at exit, reading the kernel again for a reboot.
const MAIN_ONLY: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_unlink,
    libc::SYS_dup3,
];

/// Giving a passed-through device's group back when skiff ends: vfio-ioctls
/// finds the group from the device's sysfs link again.
const VFIO_TEARDOWN: &[i64] = &[libc::SYS_readlink, libc::SYS_readlinkat];

/// QEMU's "obsolete" class that x86-64 has.
const OBSOLETE: &[i64] = &[
    libc::SYS__sysctl,
    174, // create_module (libc has no name for the removed ones)
    177, // get_kernel_syms
    178, // query_module
    libc::SYS_sysfs,
    libc::SYS_uselib,
    libc::SYS_ustat,
];

const ELEVATE: &[i64] = &[
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setpgid,
    libc::SYS_setsid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
];

const SPAWN: &[i64] =
    &[libc::SYS_fork, libc::SYS_vfork, libc::SYS_execve, libc::SYS_execveat, libc::SYS_wait4];

const RESOURCES: &[i64] = &[
    libc::SYS_getpriority,
    libc::SYS_setpriority,
    libc::SYS_sched_setparam,
    libc::SYS_sched_getparam,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min,
];

/// ioctl type byte of KVM's requests (`KVMIO`).
const KVMIO: u64 = 0xae;
/// ioctl type byte of vhost's requests (`VHOST_VIRTIO`): vhost-vsock is
/// started by a vCPU (DRIVER_OK) and stopped by a vCPU or the main thread.
const VHOST_VIRTIO: u64 = 0xaf;
/// ioctl type byte of VFIO's requests (`VFIO_TYPE`, ';'): a passed-through
/// device's interrupts follow a vCPU's config writes; main resets it and
/// maps guest RAM for a new run.
const VFIO_TYPE: u64 = 0x3b;

/// A tap's requests after setup: the offloads the driver accepted (a vCPU
/// at DRIVER_OK) and attaching or detaching queues (the control queue's
/// worker, for the queue pairs the driver uses).
const TAP_IOCTLS: &[u64] = &[
    0x4004_54d0, // TUNSETOFFLOAD
    0x4004_54d9, // TUNSETQUEUE
];

/// The terminal requests the main thread makes on stdin/stdout (raw mode
/// and back) and the descriptor flags std sets by ioctl.
const TTY_IOCTLS: &[u64] = &[
    libc::TCGETS,
    libc::TCSETS,
    libc::TCSETSW,
    libc::TCSETSF,
    libc::TIOCGWINSZ,
    libc::FIONBIO,
    libc::FIOCLEX,
    libc::FIONCLEX,
];

fn cond(arg: u8, op: Op, value: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, Len::Dword, op, value)
}

/// The kind's BPF program; `needs`: what the devices whose calls this
/// thread makes need (a worker: its own device's; a vCPU, which starts and
/// resets every device, and main: all of them).
fn filter(kind: ThreadKind, policy: &SandboxConfig, needs: Needs) -> Result<BpfProgram, Error> {
    let build = |e| Error::Build(kind.name(), e);
    let mut calls: Vec<i64> = COMMON.to_vec();
    let (threads, events, main, kvm, tty) = match kind {
        ThreadKind::Main => (true, true, true, true, true),
        // A thread's filters bound the threads it starts, and a vCPU starts
        // device workers (the guest's DRIVER_OK): it carries their calls.
        ThreadKind::Vcpu => (true, true, false, true, false),
        // A block worker starts its I/O threads, the control queue's
        // worker a queue pair's.
        ThreadKind::Worker(_) => (true, true, false, false, false),
        ThreadKind::Io | ThreadKind::Console | ThreadKind::Network | ThreadKind::Watchdog => {
            (false, false, false, false, false)
        }
    };
    let devices = matches!(kind, ThreadKind::Main | ThreadKind::Vcpu | ThreadKind::Worker(_));
    // Main reads the kernel again for a reboot.
    let disk = (devices && needs.disk) || matches!(kind, ThreadKind::Io | ThreadKind::Main);
    let uring = devices && needs.uring;
    // Main also serves its own sockets.
    let backends = (devices && needs.backend_socket) || kind == ThreadKind::Main;
    // The process filter (main's) carries every thread's calls.
    let inet = needs.inet && matches!(kind, ThreadKind::Main | ThreadKind::Network);
    let shares = devices && needs.share_files;
    let taps = devices && needs.tap;
    for (on, set) in [
        (events, EVENTS),
        (disk, DISK_IO),
        (devices && needs.ram_discard, RAM_DISCARD),
        (devices && needs.accept, ACCEPT),
        (uring, URING),
        (main, MAIN_ONLY),
        (main && needs.vfio, VFIO_TEARDOWN),
        (backends, BACKEND_SOCKETS),
        (kind == ThreadKind::Watchdog, WATCHDOG),
        (inet, INET_SOCKETS),
        (shares, SHARE_FILES),
    ] {
        if on {
            calls.extend_from_slice(set);
        }
    }
    for (on, set) in [
        (policy.obsolete, OBSOLETE),
        (policy.elevate_privileges, ELEVATE),
        (policy.spawn, SPAWN),
        (policy.resource_control, RESOURCES),
    ] {
        if on {
            calls.extend_from_slice(set);
        }
    }
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        calls.into_iter().map(|nr| (nr, Vec::new())).collect();
    // Creating threads (device workers start on the guest's DRIVER_OK).
    if threads || policy.spawn {
        // A thread shares everything with its process: CLONE_THREAD.
        let clone = if policy.spawn {
            vec![]
        } else {
            let thread = u64::from(libc::CLONE_THREAD as u32);
            vec![SeccompRule::new(vec![cond(0, Op::MaskedEq(thread), thread).map_err(build)?])
                .map_err(build)?]
        };
        rules.insert(libc::SYS_clone, clone);
        // Let through here; the answers filter says ENOSYS unless spawn.
        rules.insert(libc::SYS_clone3, vec![]);
    }
    let mut ioctls = Vec::new();
    if kvm || tty {
        // vhost's requests come from a vCPU (a device's start) and main
        // (its stop), only where a device is on the host kernel's vhost.
        let types =
            [(kvm, KVMIO), (kvm && needs.vhost, VHOST_VIRTIO), (kvm && needs.vfio, VFIO_TYPE)];
        for ty in types.into_iter().filter(|(on, _)| *on).map(|(_, ty)| ty) {
            let rule = cond(1, Op::MaskedEq(0xff00), ty << 8).map_err(build)?;
            ioctls.push(SeccompRule::new(vec![rule]).map_err(build)?);
        }
        let own: &[u64] = if tty { TTY_IOCTLS } else { &[libc::FIONBIO, libc::FIOCLEX] };
        for &req in own {
            ioctls
                .push(SeccompRule::new(vec![cond(1, Op::Eq, req).map_err(build)?]).map_err(build)?);
        }
    }
    if inet {
        // How much a UDP socket holds (libslirp sizes its reads by it).
        let rule = cond(1, Op::Eq, libc::FIONREAD).map_err(build)?;
        ioctls.push(SeccompRule::new(vec![rule]).map_err(build)?);
    }
    if taps {
        for &req in TAP_IOCTLS {
            ioctls
                .push(SeccompRule::new(vec![cond(1, Op::Eq, req).map_err(build)?]).map_err(build)?);
        }
    }
    if !ioctls.is_empty() {
        rules.insert(libc::SYS_ioctl, ioctls);
    }
    let mut families = Vec::new();
    if backends {
        families.push(libc::AF_UNIX);
    }
    if inet {
        families.extend([libc::AF_INET, libc::AF_INET6]);
    }
    if !families.is_empty() {
        let mut sockets = Vec::new();
        for family in families {
            let rule = cond(0, Op::Eq, family as u64).map_err(build)?;
            sockets.push(SeccompRule::new(vec![rule]).map_err(build)?);
        }
        rules.insert(libc::SYS_socket, sockets);
    }
    // Signals to skiff's own threads only (glibc's raise and pthread_kill):
    // not to another process of the same user. A process skiff may start
    // (`spawn=allow`) has a pid of its own, and keeps the plain rule.
    if !policy.spawn {
        let own = cond(0, Op::Eq, u64::from(std::process::id())).map_err(build)?;
        rules.insert(libc::SYS_tgkill, vec![SeccompRule::new(vec![own]).map_err(build)?]);
    }
    // prctl: thread names (std names its threads) and no_new_privs, which
    // a thread sets before it adds its own filter (seccomp(2), below).
    let mut names = Vec::new();
    for op in [libc::PR_SET_NAME, libc::PR_GET_NAME, libc::PR_SET_NO_NEW_PRIVS] {
        names.push(
            SeccompRule::new(vec![cond(0, Op::Eq, op as u64).map_err(build)?]).map_err(build)?,
        );
    }
    rules.insert(libc::SYS_prctl, names);
    // Adding a filter only ever narrows what the thread may do.
    let mode = u64::from(libc::SECCOMP_SET_MODE_FILTER);
    rules.insert(
        libc::SYS_seccomp,
        vec![SeccompRule::new(vec![cond(0, Op::Eq, mode).map_err(build)?]).map_err(build)?],
    );
    SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
        .and_then(TryInto::try_into)
        .map_err(build)
}

/// A fixed buffer the SIGSYS handler formats into: no allocation there.
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

fn syscall_name(nr: i64) -> Option<&'static str> {
    names::NAMES.iter().find(|(n, _)| *n == nr).map(|(_, name)| *name)
}

/// The message, e.g. `skiff: -sandbox on: thread vcpu0 made a forbidden
/// system call: ptrace (101)`.
fn report(thread: &[u8], nr: i64) -> Line {
    let mut line = Line { buf: [0; 192], len: 0 };
    line.push(b"skiff: -sandbox on: thread ");
    line.push(thread);
    line.push(b" made a forbidden system call: ");
    line.push(syscall_name(nr).unwrap_or("unknown").as_bytes());
    line.push(b" (");
    line.push_number(nr as u64);
    line.push(b")\n");
    line
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo; for SIGSYS the x86-64
    // layout has the call number as an int at byte 24 (`si_syscall`,
    // after si_signo/si_errno/si_code and the 8-byte `si_call_addr`).
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read() };
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let line = report(&name[..end], i64::from(nr));
    // SAFETY: write and exit_group are async-signal-safe and in every list.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
        libc::syscall(libc::SYS_exit_group, 128 + libc::SIGSYS);
    }
}

fn install_sigsys_handler() -> Result<(), Error> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
        .map_err(|e| Error::Handler(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_call_and_the_thread() {
        let line = report(b"vcpu0", libc::SYS_ptrace);
        assert_eq!(
            std::str::from_utf8(&line.buf[..line.len]).unwrap(),
            "skiff: -sandbox on: thread vcpu0 made a forbidden system call: ptrace (101)\n"
        );
        let line = report(b"x", 9999);
        assert!(std::str::from_utf8(&line.buf[..line.len]).unwrap().ends_with("unknown (9999)\n"));
    }

    #[test]
    fn the_names_table_is_the_kernels() {
        assert_eq!(syscall_name(libc::SYS_read), Some("read"));
        assert_eq!(syscall_name(libc::SYS_io_uring_setup), Some("io_uring_setup"));
        assert_eq!(syscall_name(libc::SYS_execve), Some("execve"));
    }

    #[test]
    fn every_kind_builds_with_and_without_the_switches() {
        let all = SandboxConfig {
            obsolete: true,
            elevate_privileges: true,
            spawn: true,
            resource_control: true,
        };
        for kind in [
            ThreadKind::Main,
            ThreadKind::Vcpu,
            ThreadKind::Console,
            ThreadKind::Worker("virtio-blk"),
            ThreadKind::Io,
            ThreadKind::Network,
            ThreadKind::Watchdog,
        ] {
            filter(
                kind,
                &SandboxConfig::default(),
                Needs { inet: true, share_files: true, ..Needs::default() },
            )
            .unwrap();
            filter(kind, &all, Needs::default()).unwrap();
        }
    }

    /// Runs `body` in a child process (the test binary stays unconfined)
    /// under `progs`, with SIGSYS's default action; returns its wait status.
    fn in_confined_child(progs: &[&BpfProgram], body: fn() -> i32) -> i32 {
        // SAFETY: the child only makes system calls and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: in the child; plain system calls.
            unsafe {
                libc::signal(libc::SIGSYS, libc::SIG_DFL);
                for p in progs {
                    if seccompiler::apply_filter(p).is_err() {
                        libc::_exit(100);
                    }
                }
                libc::_exit(body());
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    }

    /// tgkill reaches skiff's own threads only: signal 0 to this process's
    /// main thread goes through; to another process (init) the call is
    /// forbidden. (The filter is this process's; the child is outside it,
    /// as another process would be.)
    #[test]
    fn signals_reach_only_skiffs_own_threads() {
        // The child's body takes no captures; getppid is not on the lists.
        static PARENT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
        PARENT.store(i64::from(std::process::id()), std::sync::atomic::Ordering::SeqCst);
        for kind in [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Worker("virtio-rng")] {
            let f = filter(kind, &SandboxConfig::default(), Needs::default()).unwrap();
            // The child is not `parent`: its tgkill to `parent`'s own
            // thread group is what a skiff thread's would be.
            let own = in_confined_child(&[&f], || {
                // The process whose filter this is; its main thread's id
                // is its pid.
                let pid = PARENT.load(std::sync::atomic::Ordering::SeqCst);
                // SAFETY: signal 0 checks only.
                let r = unsafe { libc::syscall(libc::SYS_tgkill, pid, pid, 0) };
                i32::from(r != 0)
            });
            assert!(libc::WIFEXITED(own) && libc::WEXITSTATUS(own) == 0, "{kind:?}: {own:#x}");
            let other = in_confined_child(&[&f], || {
                // SAFETY: signal 0 to init: a check, never a signal.
                unsafe { libc::syscall(libc::SYS_tgkill, 1, 1, 0) };
                0
            });
            assert!(libc::WIFSIGNALED(other) && libc::WTERMSIG(other) == libc::SIGSYS, "{kind:?}");
        }
    }

    /// vhost-user's watchdog (once unconfined: issue 29, item 8) may shut
    /// the connection it watches, and neither make nor connect a socket.
    #[test]
    fn a_watchdog_may_shut_its_socket_and_nothing_more() {
        static FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        FD.store(std::os::fd::AsRawFd::as_raw_fd(&a), std::sync::atomic::Ordering::SeqCst);
        let f = filter(ThreadKind::Watchdog, &SandboxConfig::default(), Needs::default()).unwrap();
        let shut = in_confined_child(&[&f], || {
            let fd = FD.load(std::sync::atomic::Ordering::SeqCst);
            // SAFETY: shutdown of a socket this process owns.
            i32::from(unsafe { libc::shutdown(fd, libc::SHUT_RDWR) } != 0)
        });
        assert!(libc::WIFEXITED(shut) && libc::WEXITSTATUS(shut) == 0, "{shut:#x}");
        let socket = in_confined_child(&[&f], || {
            // SAFETY: a plain system call; the filter stops it.
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            0
        });
        assert!(libc::WIFSIGNALED(socket) && libc::WTERMSIG(socket) == libc::SIGSYS);
    }

    /// Opening a file is refused with EACCES (glibc copes), not fatal.
    #[test]
    fn opening_a_file_is_refused_not_fatal() {
        let progs = answers(&SandboxConfig::default(), Needs::default()).unwrap();
        let io = filter(ThreadKind::Io, &SandboxConfig::default(), Needs::default()).unwrap();
        let status = in_confined_child(&[&progs[0], &progs[1], &io], || {
            // SAFETY: a NUL-terminated path; errno read right after.
            let fd = unsafe { libc::open(c"/proc/sys/vm/overcommit_memory".as_ptr(), 0) };
            // SAFETY: errno of this thread.
            let eacces = fd < 0 && unsafe { *libc::__errno_location() } == libc::EACCES;
            if eacces {
                0
            } else {
                3
            }
        });
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "status {status:#x}");
    }

    /// With a 9p share, a worker opens and lists files relative to the
    /// share's descriptor; opening by a path from the working directory is
    /// still refused.
    #[test]
    fn a_share_worker_opens_relative_to_its_share_only() {
        static DIR: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);
        // SAFETY: a NUL-terminated path; the descriptor stays open for the
        // child, which inherits it.
        let dir = unsafe { libc::open(c"/proc/self".as_ptr(), libc::O_PATH | libc::O_DIRECTORY) };
        assert!(dir >= 0);
        DIR.store(dir, std::sync::atomic::Ordering::SeqCst);
        let needs = Needs { share_files: true, ..Needs::default() };
        let progs = answers(&SandboxConfig::default(), needs).unwrap();
        let worker =
            filter(ThreadKind::Worker("virtio-9p"), &SandboxConfig::default(), needs).unwrap();
        let status = in_confined_child(&[&progs[0], &progs[1], &worker], || {
            let dir = DIR.load(std::sync::atomic::Ordering::SeqCst);
            // SAFETY: NUL-terminated paths, a buffer of the length given;
            // errno read right after the call.
            unsafe {
                let fd = libc::openat(dir, c"status".as_ptr(), libc::O_RDONLY);
                if fd < 0 {
                    return 3;
                }
                let mut st: libc::stat = std::mem::zeroed();
                if libc::fstatat(dir, c"status".as_ptr(), &mut st, 0) != 0 {
                    return 4;
                }
                let fd = libc::openat(dir, c".".as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
                let mut buf = [0u8; 512];
                if fd < 0 || libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), 512) <= 0 {
                    return 5;
                }
                let cwd = libc::openat(libc::AT_FDCWD, c"/etc/hostname".as_ptr(), 0);
                if cwd >= 0 || *libc::__errno_location() != libc::EACCES {
                    return 6;
                }
            }
            0
        });
        // SAFETY: our own descriptor.
        unsafe { libc::close(dir) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "status {status:#x}");
    }

    /// The filters really bite: under the vCPU list an allowed call goes
    /// through, a forbidden one ends the process by SIGSYS.
    #[test]
    fn a_forbidden_call_is_stopped_and_an_allowed_one_is_not() {
        let needs = Needs { backend_socket: true, ..Needs::default() };
        let prog = filter(ThreadKind::Vcpu, &SandboxConfig::default(), needs).unwrap();
        let status = in_confined_child(&[&prog], || {
            // SAFETY: plain system calls.
            unsafe {
                if libc::getpid() <= 0 {
                    return 3;
                }
                // A vhost-user reconnect's socket is allowed; others not.
                if libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) < 0 {
                    return 5;
                }
                libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0);
            }
            4
        });
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "status {status:#x}"
        );
    }

    /// Each worker gets its own device's calls: a 9p share's worker may
    /// unlink (relative to its share), a block device's may not, nor set up
    /// an io_uring unless it serves a disk; a worker of a family no device
    /// declared gets no device's calls.
    #[test]
    fn each_worker_gets_its_own_devices_calls() {
        let policy = SandboxConfig::default();
        let worker = |family, needs| filter(ThreadKind::Worker(family), &policy, needs).unwrap();
        let kinds = |name: &str| {
            crate::kinds::KINDS.iter().find(|k| k.name() == name).expect(name).sandbox()
        };
        let unlink = || {
            // SAFETY: an invalid descriptor and an empty NUL-terminated
            // path: the call fails (ENOENT) wherever it is allowed.
            let r = unsafe { libc::syscall(libc::SYS_unlinkat, -1, c"".as_ptr(), 0) };
            i32::from(r >= 0)
        };
        let ninep = worker("virtio-9p", kinds("virtio-9p"));
        let status = in_confined_child(&[&ninep], unlink);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "status {status:#x}");

        let blk = worker("virtio-blk", kinds("virtio-blk"));
        let status = in_confined_child(&[&blk], unlink);
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS, "{status:#x}");

        let uring = || {
            let mut params = [0u8; 120];
            // SAFETY: a ring of one entry; params is large enough
            // (struct io_uring_params is 120 bytes).
            let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1, params.as_mut_ptr()) };
            i32::from(
                fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS),
            )
        };
        let rng = worker("virtio-rng", kinds("virtio-rng"));
        let status = in_confined_child(&[&rng], uring);
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS, "{status:#x}");
        let status = in_confined_child(&[&blk], uring);
        assert!(libc::WIFEXITED(status), "a disk's worker may set up a ring: {status:#x}");
        let ninep = worker("virtio-9p", kinds("virtio-9p"));
        let status = in_confined_child(&[&ninep], uring);
        assert!(libc::WIFSIGNALED(status), "a share's worker has no ring: {status:#x}");
        let pread = || {
            let mut b = [0u8; 1];
            // SAFETY: a one-byte buffer; an invalid descriptor.
            let r = unsafe { libc::pread(-1, b.as_mut_ptr().cast(), 1, 0) };
            i32::from(r >= 0)
        };
        let status = in_confined_child(&[&ninep], pread);
        assert!(libc::WIFEXITED(status), "a share's worker reads its files: {status:#x}");

        let unknown = worker("virtio-frob", Needs::default());
        let status = in_confined_child(&[&unknown], unlink);
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS, "{status:#x}");
    }
}
