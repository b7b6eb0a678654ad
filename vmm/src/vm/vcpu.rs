//! vCPU threads: run KVM_RUN and hand each exit to the port or MMIO bus.
//! A vCPU knows no device; it only knows the two buses and how to tell the
//! VMM that the machine must stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use devices::{Bus, VmControl, VmEvent};
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::Killable;

use crate::diag::stall;
use crate::diag::trace::{self, ExitKind, Milestone, VcpuExits};
use crate::vm::control::Control;

/// Value a read from an address no device claims returns: all ones, as an
/// ISA bus with pull-ups (and QEMU) answer. A guest probing for a device
/// there sees "nothing here" at once.
const UNASSIGNED_READ: u8 = 0xff;

pub struct VcpuContext {
    /// Port writes that mark boot milestones for the trace (first serial
    /// byte, POST code, isa-debug-exit), as the VMM laid devices out.
    pub watched_ports: Vec<(u16, Milestone)>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<Control>,
    pub stop: Arc<AtomicBool>,
}

pub struct VcpuHandle(JoinHandle<()>);

pub fn spawn(index: u32, vcpu: VcpuFd, ctx: VcpuContext) -> std::io::Result<VcpuHandle> {
    std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || run(index, vcpu, ctx))
        .map(VcpuHandle)
}

impl VcpuHandle {
    /// Interrupts KVM_RUN until the thread (which has seen `stop`) exits.
    /// Kicks repeat because a signal that lands just before KVM_RUN is lost.
    /// A thread stuck elsewhere (a console write to a stalled pipe) is left
    /// behind after a few seconds rather than hanging the VMM.
    pub fn stop(self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !self.0.is_finished() {
            if std::time::Instant::now() > deadline {
                log::warn!("a vCPU thread did not stop; leaving it behind");
                return;
            }
            let _ = self.0.kill(crate::host::signals::vcpu_kick_signal());
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let _ = self.0.join();
    }
}

fn run(index: u32, mut vcpu: VcpuFd, ctx: VcpuContext) {
    let tracing = trace::enabled();
    let mut exits = VcpuExits::default();
    let mut last_exit = (ExitKind::Other, 0u64);
    let mut count = 0u64;
    trace::milestone(Milestone::FirstVcpuEntry);
    while !ctx.stop.load(Ordering::Acquire) {
        let exit = vcpu.run();
        count += 1;
        let t0 = tracing.then(std::time::Instant::now);
        let (kind, addr, claimed) = match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                let claimed = ctx.pio.read(u64::from(port), data);
                if !claimed {
                    data.fill(UNASSIGNED_READ);
                }
                (ExitKind::PioIn, u64::from(port), claimed)
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if tracing {
                    if let Some((_, m)) = ctx.watched_ports.iter().find(|(p, _)| *p == port) {
                        trace::milestone(*m);
                    }
                }
                (ExitKind::PioOut, u64::from(port), ctx.pio.write(u64::from(port), data))
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                let claimed = ctx.mmio.read(addr, data);
                if !claimed {
                    data.fill(UNASSIGNED_READ);
                }
                (ExitKind::MmioRead, addr, claimed)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                (ExitKind::MmioWrite, addr, ctx.mmio.write(addr, data))
            }
            // Triple fault: a PC resets (Linux's reboot=t relies on it).
            Ok(VcpuExit::Shutdown) => {
                if stall::enabled() {
                    stall::dump_vcpu(&vcpu, index, count, last_exit, "triple fault");
                }
                ctx.control.request(VmEvent::Reset);
                break;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                let event = match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => VmEvent::PowerOff,
                    KVM_SYSTEM_EVENT_RESET | KVM_SYSTEM_EVENT_CRASH => VmEvent::Reset,
                    other => {
                        log::warn!("vcpu{index}: unknown system event {other}; ignored");
                        continue;
                    }
                };
                ctx.control.request(event);
                break;
            }
            // The in-kernel LAPIC handles HLT; these are benign wakeups.
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => {
                (ExitKind::Other, 0, true)
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kvm_run union
                // holds the `internal` member.
                let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                fail(&vcpu, &ctx, index, &format!("KVM internal error. Suberror: {suberror}"));
                break;
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                let msg = format!("KVM entry failed, hardware error {reason:#x} (cpu {cpu})");
                fail(&vcpu, &ctx, index, &msg);
                break;
            }
            Ok(other) => {
                let what = format!("unexpected VM exit: {other:?}");
                fail(&vcpu, &ctx, index, &what);
                break;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked: clear immediate_exit and look at `stop` again.
                vcpu.set_kvm_immediate_exit(0);
                continue;
            }
            Err(e) => {
                fail(&vcpu, &ctx, index, &format!("KVM_RUN failed: {e}"));
                break;
            }
        };
        last_exit = (kind, addr);
        if let Some(t0) = t0 {
            exits.record(kind, addr, claimed, t0.elapsed());
        }
    }
    exits.merge();
    if crate::host::signals::last_signal().is_some() && stall::enabled() {
        stall::dump_vcpu(&vcpu, index, count, last_exit, "stop");
    }
}

/// Stops the VM with the error and the vCPU's registers, as QEMU prints them.
fn fail(vcpu: &VcpuFd, ctx: &VcpuContext, index: u32, what: &str) {
    let mut msg = format!("vcpu{index}: {what}");
    if let Ok(r) = vcpu.get_regs() {
        msg += &format!(
            "\nRAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}\n\
             RSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}\n\
             R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}\n\
             R12={:016x} R13={:016x} R14={:016x} R15={:016x}\n\
             RIP={:016x} RFL={:08x}",
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            r.rbp,
            r.rsp,
            r.r8,
            r.r9,
            r.r10,
            r.r11,
            r.r12,
            r.r13,
            r.r14,
            r.r15,
            r.rip,
            r.rflags
        );
    }
    if let Ok(s) = vcpu.get_sregs() {
        msg += &format!(
            "\nCS={:04x} base={:016x} SS={:04x} CR0={:08x} CR2={:016x} CR3={:016x} CR4={:08x} EFER={:016x}",
            s.cs.selector, s.cs.base, s.ss.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
        );
    }
    ctx.control.fail(msg);
}
