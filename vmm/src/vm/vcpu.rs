//! vCPU threads: run KVM_RUN and hand each exit to the port or MMIO bus.
//! A vCPU knows no device; it only knows the two buses and how to tell the
//! VMM that the machine must stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use devices::{Bus, VmControl, VmEvent};
use kvm_bindings::{
    kvm_run, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
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
                devices::warn_limited!("a vCPU thread did not stop; leaving it behind");
                return;
            }
            let _ = self.0.kill(crate::host::signals::vcpu_kick_signal());
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let _ = self.0.join();
    }
}

pub(in crate::vm) fn run(index: u32, mut vcpu: VcpuFd, ctx: VcpuContext) {
    crate::host::sandbox::confine(crate::host::sandbox::ThreadKind::Vcpu);
    let tracing = trace::enabled();
    let mut exits = VcpuExits::default();
    let mut last_exit = (ExitKind::Other, 0u64);
    let mut count = 0u64;
    trace::milestone(Milestone::FirstVcpuEntry);
    let kvm_run: *const kvm_run = vcpu.get_kvm_run();
    while !ctx.stop.load(Ordering::Acquire) {
        let exit = vcpu.run();
        count += 1;
        let t0 = tracing.then(std::time::Instant::now);
        let (kind, addr, claimed) = match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                // One exit for a whole `rep insb`: each element is its own
                // read of the port, as on hardware.
                let mut claimed = true;
                for element in data.chunks_mut(io_element_size(kvm_run)) {
                    if !ctx.pio.read(u64::from(port), element) {
                        element.fill(UNASSIGNED_READ);
                        claimed = false;
                    }
                }
                (ExitKind::PioIn, u64::from(port), claimed)
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if tracing {
                    if let Some((_, m)) = ctx.watched_ports.iter().find(|(p, _)| *p == port) {
                        trace::milestone(*m);
                    }
                }
                let mut claimed = true;
                for element in data.chunks(io_element_size(kvm_run)) {
                    claimed &= ctx.pio.write(u64::from(port), element);
                }
                (ExitKind::PioOut, u64::from(port), claimed)
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
                        devices::warn_limited!(
                            "vcpu{index}: unknown system event {other}; ignored"
                        );
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

/// The element size of the port-I/O exit KVM just returned. String I/O
/// (`rep outsb`, `rep insw`) exits once with every element in the data, so
/// the data's length alone does not tell an `inw` from two `insb`.
fn io_element_size(run: *const kvm_run) -> usize {
    // SAFETY: `run` is the vCPU's kvm_run page, mapped as long as its VcpuFd
    // (the caller's) lives; after KVM_EXIT_IO the kernel has filled `io`,
    // which the exit's data slice (at `io.data_offset`) does not overlap.
    let size = unsafe { std::ptr::addr_of!((*run).__bindgen_anon_1.io.size).read_volatile() };
    usize::from(size).max(1)
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Runs vCPU 0 of `vm` in real mode from `rip` (code segment 0) until
    /// a device on `pio` sets `stop`.
    pub(crate) fn run_real_mode(
        vm: &kvm_ioctls::VmFd,
        rip: u64,
        pio: Arc<Bus>,
        stop: Arc<AtomicBool>,
    ) {
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let regs = kvm_bindings::kvm_regs { rip, rflags: 2, ..Default::default() };
        vcpu.set_regs(&regs).unwrap();
        let ctx = VcpuContext {
            watched_ports: Vec::new(),
            pio,
            mmio: Arc::new(Bus::new()),
            control: Arc::new(Control::new().unwrap()),
            stop,
        };
        run(0, vcpu, ctx);
    }

    use devices::BusDevice;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    /// Port 0x80 records each write; 0x81 reads 1, 2, 3... (one value per
    /// access); 0x82 stops.
    struct Ports {
        writes: Vec<Vec<u8>>,
        next: u8,
        stop: Arc<AtomicBool>,
    }

    impl BusDevice for Ports {
        // One value per access, whatever its width: a batched read of
        // three bytes would store 1, 1, 1.
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            self.next += 1;
            data.fill(self.next);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            match offset {
                0 => self.writes.push(data.to_vec()),
                _ => self.stop.store(true, Ordering::Release),
            }
        }
    }

    /// A real-mode guest on /dev/kvm (it needs no more than PVM emulates):
    /// `rep outsb` of four bytes, `rep insb` of three, `rep outsb` of
    /// those three. The device sees seven one-byte accesses, not one wide
    /// one per instruction.
    #[test]
    fn string_port_io_reaches_the_device_one_element_at_a_time() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap();
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 0x10000,
            userspace_addr: host as u64,
        };
        // SAFETY: the region is `mem`'s mapping, which outlives the VM.
        unsafe { vm.set_user_memory_region(region).unwrap() };
        #[rustfmt::skip]
        let code: &[u8] = &[
            0xbe, 0x00, 0x11, // mov si, 0x1100
            0xb9, 0x04, 0x00, // mov cx, 4
            0xba, 0x80, 0x00, // mov dx, 0x80
            0xf3, 0x6e,       // rep outsb
            0xbf, 0x00, 0x12, // mov di, 0x1200
            0xb9, 0x03, 0x00, // mov cx, 3
            0xba, 0x81, 0x00, // mov dx, 0x81
            0xf3, 0x6c,       // rep insb
            0xbe, 0x00, 0x12, // mov si, 0x1200
            0xb9, 0x03, 0x00, // mov cx, 3
            0xba, 0x80, 0x00, // mov dx, 0x80
            0xf3, 0x6e,       // rep outsb
            0xba, 0x82, 0x00, // mov dx, 0x82
            0xee,             // out dx, al
            0xf4,             // hlt
        ];
        mem.write_slice(code, GuestAddress(0x1000)).unwrap();
        mem.write_slice(b"abcd", GuestAddress(0x1100)).unwrap();

        let stop = Arc::new(AtomicBool::new(false));
        let ports = Arc::new(Mutex::new(Ports { writes: Vec::new(), next: 0, stop: stop.clone() }));
        let pio = Arc::new(Bus::new());
        pio.insert(ports.clone(), 0x80, 3).unwrap();
        run_real_mode(&vm, 0x1000, pio, stop);

        let writes = ports.lock().unwrap().writes.clone();
        let expected: Vec<Vec<u8>> =
            [b'a', b'b', b'c', b'd', 1, 2, 3].iter().map(|&b| vec![b]).collect();
        assert_eq!(writes, expected);
        let mut stored = [0u8; 3];
        mem.read_slice(&mut stored, GuestAddress(0x1200)).unwrap();
        assert_eq!(stored, [1, 2, 3]);
    }
}
