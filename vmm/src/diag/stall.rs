//! `SKIFF_STALL_DUMP=1`: where a guest that stopped making progress sits.
//! On a signal that ends the VM (or a triple fault), each vCPU prints its
//! registers, run state and LAPIC, and the VM its interrupt controllers, so
//! a halted guest shows which interrupt never arrived and a looping one
//! where it loops.

use kvm_ioctls::{VcpuFd, VmFd};

use crate::diag::trace::ExitKind;

/// `SKIFF_STALL_DUMP=1`: print a vCPU's state when a signal ends the VM or
/// when it triple-faults (the reset a guest did not ask for).
pub fn enabled() -> bool {
    std::env::var_os("SKIFF_STALL_DUMP").is_some()
}

/// Where a vCPU was when a host signal ended the VM or it triple-faulted
/// (`SKIFF_STALL_DUMP=1`): the test harness sets it, so a guest that stopped
/// making progress shows whether it sat halted (waiting for an interrupt
/// that never came: look at the LAPIC timer) or ran (a loop: look at RIP).
pub fn dump_vcpu(vcpu: &VcpuFd, index: u32, exits: u64, (kind, addr): (ExitKind, u64), at: &str) {
    let mut msg = format!("vcpu{index} at {at}: {exits} exits, last {kind:?} {addr:#x}");
    if let Ok(r) = vcpu.get_regs() {
        msg += &format!(", RIP={:016x} RSP={:016x} RFL={:08x}", r.rip, r.rsp, r.rflags);
    }
    if let Ok(s) = vcpu.get_sregs() {
        msg += &format!(
            ", CS={:04x} CR0={:08x} CR3={:x} EFER={:x}",
            s.cs.selector, s.cr0, s.cr3, s.efer
        );
    }
    if let Ok(m) = vcpu.get_mp_state() {
        // 0 runnable, 3 halted (KVM_MP_STATE_*).
        msg += &format!(", mp_state={}", m.mp_state);
    }
    if let Ok(l) = vcpu.get_lapic() {
        let reg = |off: usize| boot::cpu::lapic_reg(&l, off);
        // Timer LVT, initial and current count; which of the eight 32-bit
        // words of ISR (in service) and IRR (pending) have a vector set.
        let vectors =
            |base: usize| (0..8).fold(0u64, |acc, i| acc | u64::from(reg(base + i * 16) != 0) << i);
        // SVR and LINT0 say whether the 8259's ExtINT can reach this vCPU
        // (virtual-wire mode, the only way without an IOAPIC).
        msg += &format!(
            ", SVR={:08x} LINT0={:08x} LVTT={:08x} TMICT={:08x} TMCCT={:08x} ISR-words={:02x} IRR-words={:02x}",
            reg(0xf0),
            reg(0x350),
            reg(0x320),
            reg(0x380),
            reg(0x390),
            vectors(0x100),
            vectors(0x200)
        );
    }
    if let Ok(e) = vcpu.get_vcpu_events() {
        msg += &format!(", irq-injected/nmi-pending={}/{}", e.interrupt.injected, e.nmi.pending);
    }
    use std::io::Write;
    // As elsewhere: a failed stderr write must not abort skiff.
    let _ = writeln!(std::io::stderr(), "skiff: {msg}");
}

/// With the vCPUs' dumps (`SKIFF_STALL_DUMP=1`): the 8259s, the IOAPIC's
/// timer pin and the PIT, where a guest waiting for a timer interrupt that
/// never came shows which link of PIT → 8259/IOAPIC → LAPIC broke.
pub fn dump_interrupt_controllers(vm: &VmFd, pit: bool) {
    use kvm_bindings::{
        kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    };
    let mut msg = String::from("interrupt controllers at stop:");
    for (id, name) in [(KVM_IRQCHIP_PIC_MASTER, "pic0"), (KVM_IRQCHIP_PIC_SLAVE, "pic1")] {
        let mut chip = kvm_irqchip { chip_id: id, ..Default::default() };
        if vm.get_irqchip(&mut chip).is_ok() {
            // SAFETY: every member of the union is plain integers, valid for
            // any bits; KVM filled the one chip_id names.
            let p = unsafe { chip.chip.pic };
            msg += &format!(
                " {name}: irr={:02x} imr={:02x} isr={:02x} base={:02x} init={} aeoi={} elcr={:02x};",
                p.irr, p.imr, p.isr, p.irq_base, p.init_state, p.auto_eoi, p.elcr
            );
        }
    }
    let mut chip = kvm_irqchip { chip_id: KVM_IRQCHIP_IOAPIC, ..Default::default() };
    if vm.get_irqchip(&mut chip).is_ok() {
        // SAFETY: as above, for the IOAPIC member.
        let io = unsafe { chip.chip.ioapic };
        // SAFETY: a redirection entry's union members are all plain bits.
        let pin2 = unsafe { io.redirtbl[2].bits };
        msg += &format!(" ioapic: irr={:06x} pin2={pin2:016x};", io.irr);
    }
    if pit {
        if let Ok(p) = vm.get_pit2() {
            let c = &p.channels[0];
            msg += &format!(
                " pit0: mode={} count={} gate={} flags={:x}",
                c.mode, c.count, c.gate, p.flags
            );
        }
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skiff: {msg}");
}
