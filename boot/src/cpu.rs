//! Initial vCPU state: CPUID (KVM's supported set, topology, `-cpu` flags),
//! MSRs, FPU, LAPIC LINT pins, and registers/segments/page tables for the
//! kernel's 64-bit entry.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;
use crate::linux::KernelEntry;
use crate::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("-cpu: unknown CPU feature '{0}'")]
    UnknownFeature(String),
    #[error("KVM_SET_CPUID2: {0}")]
    SetCpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS: {0}")]
    SetMsrs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS set {0} of {1} MSRs")]
    PartialMsrs(usize, usize),
    #[error("KVM_SET_FPU: {0}")]
    SetFpu(#[source] kvm_ioctls::Error),
    #[error("KVM_{{GET,SET}}_LAPIC: {0}")]
    Lapic(#[source] kvm_ioctls::Error),
    #[error("KVM_{{GET,SET}}_SREGS: {0}")]
    Sregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_REGS: {0}")]
    SetRegs(#[source] kvm_ioctls::Error),
    #[error("cannot build the CPUID table: {0}")]
    Cpuid(String),
    #[error("cannot write boot page tables or GDT: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Where a CPUID feature bit lives.
#[derive(Clone, Copy)]
enum Reg {
    Ecx,
    Edx,
    Ebx,
}

/// QEMU feature names for `-cpu host,+name,-name` → (leaf, subleaf, register, bit).
const FEATURES: &[(&str, u32, u32, Reg, u32)] = &[
    ("sse3", 1, 0, Reg::Ecx, 0),
    ("pclmulqdq", 1, 0, Reg::Ecx, 1),
    ("vmx", 1, 0, Reg::Ecx, 5),
    ("ssse3", 1, 0, Reg::Ecx, 9),
    ("fma", 1, 0, Reg::Ecx, 12),
    ("cx16", 1, 0, Reg::Ecx, 13),
    ("pcid", 1, 0, Reg::Ecx, 17),
    ("sse4.1", 1, 0, Reg::Ecx, 19),
    ("sse4.2", 1, 0, Reg::Ecx, 20),
    ("x2apic", 1, 0, Reg::Ecx, 21),
    ("movbe", 1, 0, Reg::Ecx, 22),
    ("popcnt", 1, 0, Reg::Ecx, 23),
    ("tsc-deadline", 1, 0, Reg::Ecx, 24),
    ("aes", 1, 0, Reg::Ecx, 25),
    ("xsave", 1, 0, Reg::Ecx, 26),
    ("avx", 1, 0, Reg::Ecx, 28),
    ("f16c", 1, 0, Reg::Ecx, 29),
    ("rdrand", 1, 0, Reg::Ecx, 30),
    ("hypervisor", 1, 0, Reg::Ecx, 31),
    ("mtrr", 1, 0, Reg::Edx, 12),
    ("pse36", 1, 0, Reg::Edx, 17),
    ("ss", 1, 0, Reg::Edx, 27),
    ("ht", 1, 0, Reg::Edx, 28),
    ("fsgsbase", 7, 0, Reg::Ebx, 0),
    ("sgx", 7, 0, Reg::Ebx, 2),
    ("bmi1", 7, 0, Reg::Ebx, 3),
    ("hle", 7, 0, Reg::Ebx, 4),
    ("avx2", 7, 0, Reg::Ebx, 5),
    ("smep", 7, 0, Reg::Ebx, 7),
    ("bmi2", 7, 0, Reg::Ebx, 8),
    ("erms", 7, 0, Reg::Ebx, 9),
    ("invpcid", 7, 0, Reg::Ebx, 10),
    ("rtm", 7, 0, Reg::Ebx, 11),
    ("mpx", 7, 0, Reg::Ebx, 14),
    ("avx512f", 7, 0, Reg::Ebx, 16),
    ("rdseed", 7, 0, Reg::Ebx, 18),
    ("adx", 7, 0, Reg::Ebx, 19),
    ("smap", 7, 0, Reg::Ebx, 20),
    ("clflushopt", 7, 0, Reg::Ebx, 23),
    ("sha-ni", 7, 0, Reg::Ebx, 29),
    ("umip", 7, 0, Reg::Ecx, 2),
    ("pku", 7, 0, Reg::Ecx, 3),
    ("la57", 7, 0, Reg::Ecx, 16),
    ("rdpid", 7, 0, Reg::Ecx, 22),
    ("sgxlc", 7, 0, Reg::Ecx, 30),
    ("md-clear", 7, 0, Reg::Edx, 10),
    ("spec-ctrl", 7, 0, Reg::Edx, 26),
    ("arch-capabilities", 7, 0, Reg::Edx, 29),
    ("ssbd", 7, 0, Reg::Edx, 31),
    ("svm", 0x8000_0001, 0, Reg::Ecx, 2),
    ("topoext", 0x8000_0001, 0, Reg::Ecx, 22),
    ("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26),
    ("rdtscp", 0x8000_0001, 0, Reg::Edx, 27),
    ("lm", 0x8000_0001, 0, Reg::Edx, 29),
];

/// Checks `-cpu` flag names without a VM, so a typo fails before anything starts.
pub fn check_features(features: &[(String, bool)]) -> Result<()> {
    for (name, _) in features {
        if lookup(name).is_none() {
            return Err(Error::UnknownFeature(name.clone()));
        }
    }
    Ok(())
}

fn lookup(name: &str) -> Option<&'static (&'static str, u32, u32, Reg, u32)> {
    // QEMU accepts '_' and '.' for '-' in feature names (sse4_2 = sse4.2).
    let norm = |s: &str| s.replace(['_', '.'], "-");
    let name = norm(name);
    FEATURES.iter().find(|f| norm(f.0) == name)
}

/// CPU topology as `-smp` describes it.
#[derive(Clone, Copy, Debug)]
pub struct Topology {
    pub cpus: u32,
    pub cores: u32,
    pub threads: u32,
}

impl Topology {
    /// The initial APIC ID of vCPU `index` (KVM's vCPU id): thread, core and
    /// package fields, each as wide as its count rounded up to a power of
    /// two, which is what CPUID 0xB/0x1F and 0x8000_0008 tell the guest to
    /// decode. A count that is not a power of two leaves holes in the IDs,
    /// as on QEMU and real hardware (2 sockets of 3 cores: 0,1,2,4,5,6).
    pub fn apic_id(&self, index: u32) -> u32 {
        let (package, core, thread) = self.position(index);
        let (thread_bits, core_bits) = (bits_for(self.threads), bits_for(self.cores));
        (package << (thread_bits + core_bits)) | (core << thread_bits) | thread
    }

    /// (package, core in package, thread in core) of vCPU `index`.
    fn position(&self, index: u32) -> (u32, u32, u32) {
        let (threads, cores) = (self.threads.max(1), self.cores.max(1));
        (index / (threads * cores), (index / threads) % cores, index % threads)
    }

    /// The APIC IDs of all vCPUs, in vCPU order (the boot CPU's is 0).
    pub fn apic_ids(&self) -> Vec<u32> {
        (0..self.cpus).map(|i| self.apic_id(i)).collect()
    }
}

fn bits_for(n: u32) -> u32 {
    n.max(1).next_power_of_two().trailing_zeros()
}

/// The CPUID table for vCPU `index`: KVM's supported set with our topology,
/// the `-cpu` flags applied (a `+flag` the host lacks is dropped with a
/// warning, as QEMU does), and the hypervisor bit set.
pub fn build_cpuid(
    supported: &CpuId,
    index: u32,
    topo: Topology,
    features: &[(String, bool)],
    tsc_deadline: bool,
) -> Result<CpuId> {
    let mut entries = supported.as_slice().to_vec();
    // KVM emulates the TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER) but
    // KVM_GET_SUPPORTED_CPUID does not say so; QEMU and Firecracker set the
    // bit. Without it Linux calibrates and verifies the LAPIC timer against
    // another clock, which a loaded host can fail, leaving the guest with no
    // timer at all. Set before the -cpu flags, so -tsc-deadline still wins.
    if tsc_deadline {
        if let Some(e) = entries.iter_mut().find(|e| e.function == 1 && e.index == 0) {
            e.ecx |= 1 << 24;
        }
    }
    let per_pkg = topo.cores * topo.threads;
    let thread_bits = bits_for(topo.threads);
    let core_bits = bits_for(topo.cores);
    let apic_id = topo.apic_id(index);

    for (name, on) in features {
        let &(_, leaf, subleaf, reg, bit) =
            lookup(name).ok_or_else(|| Error::UnknownFeature(name.clone()))?;
        let Some(e) = entries.iter_mut().find(|e| e.function == leaf && e.index == subleaf) else {
            if *on {
                devices::warn_limited!("-cpu: host does not support requested feature '{name}'");
            }
            continue;
        };
        let r = match reg {
            Reg::Ecx => &mut e.ecx,
            Reg::Edx => &mut e.edx,
            Reg::Ebx => &mut e.ebx,
        };
        if !*on {
            *r &= !(1 << bit);
        } else if *r & (1 << bit) == 0
            && !matches!(name.as_str(), "hypervisor" | "ht" | "tsc-deadline")
        {
            // KVM_GET_SUPPORTED_CPUID is what the host can give; asking for
            // more would fault in the guest.
            devices::warn_limited!("-cpu: host does not support requested feature '{name}'");
        }
    }

    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX[23:16] counts addressable IDs per package (the span
                // of the APIC ID's low fields), not CPUs.
                let ids = (1u32 << (thread_bits + core_bits)).min(255);
                e.ebx = (apic_id << 24) | (ids << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= 1 << 31; // hypervisor
                if per_pkg > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical CPU per package
                }
            }
            4 => {
                // Deterministic cache parameters (Intel), in addressable IDs
                // as leaf 1: cores per package - 1 in 31:26, logical CPUs
                // sharing this cache - 1 in 25:14 (the package for L3).
                let level = (e.eax >> 5) & 0x7;
                let sharing_bits = if level >= 3 { thread_bits + core_bits } else { thread_bits };
                e.eax &= 0x3fff;
                if e.eax & 0x1f != 0 {
                    let cores_field = ((1u32 << core_bits) - 1).min(0x3f);
                    let sharing_field = ((1u32 << sharing_bits) - 1).min(0xfff);
                    e.eax |= (cores_field << 26) | (sharing_field << 14);
                }
            }
            0xb | 0x1f => {
                // Extended topology: level 0 SMT, level 1 core.
                let (shift, count, kind) = match e.index {
                    0 => (thread_bits, topo.threads, 1),
                    1 => (thread_bits + core_bits, per_pkg, 2),
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = count;
                e.ecx = e.index | (kind << 8);
                e.edx = apic_id;
            }
            0x8000_0008 => {
                // AMD: logical CPUs per package - 1, and the APIC ID width.
                e.ecx = (e.ecx & !0xf0ff) | ((thread_bits + core_bits) << 12) | (per_pkg - 1);
            }
            0x8000_001e => {
                // AMD extended APIC ID, core (compute unit) and node: KVM
                // reports zeros, and Linux (6.9+) takes a TOPOEXT CPU's APIC
                // ID from here. One node per package, as QEMU without NUMA.
                let (package, core, _) = topo.position(index);
                e.eax = apic_id;
                e.ebx = ((topo.threads.max(1) - 1) << 8) | (core & 0xff);
                e.ecx = package & 0xff;
                e.edx = 0;
            }
            _ => {}
        }
    }
    CpuId::from_entries(&entries).map_err(|e| Error::Cpuid(format!("{e:?}")))
}

/// The physical address width the guest can use, from CPUID 0x80000008:
/// EAX[7:0] (36, the architectural minimum, when the leaf is missing),
/// capped by EAX[23:16], where KVM reports a smaller width that its
/// two-dimensional paging can map (0 when there is no such limit).
pub fn phys_bits(cpuid: &CpuId) -> u8 {
    let Some(e) = cpuid.as_slice().iter().find(|e| e.function == 0x8000_0008) else {
        return 36;
    };
    let (phys, guest) = ((e.eax & 0xff) as u8, ((e.eax >> 16) & 0xff) as u8);
    if guest != 0 {
        phys.min(guest)
    } else {
        phys
    }
}

pub fn set_cpuid(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<()> {
    vcpu.set_cpuid2(cpuid).map_err(Error::SetCpuid)
}

/// Max entries for KVM_GET_SUPPORTED_CPUID.
pub const MAX_CPUID_ENTRIES: usize = KVM_MAX_CPUID_ENTRIES;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;

pub fn setup_msrs(vcpu: &VcpuFd) -> Result<()> {
    let entries = [kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: MSR_IA32_MISC_ENABLE_FAST_STRING,
        ..Default::default()
    }];
    let msrs = Msrs::from_entries(&entries).map_err(|e| Error::Cpuid(format!("{e:?}")))?;
    let n = vcpu.set_msrs(&msrs).map_err(Error::SetMsrs)?;
    if n != entries.len() {
        return Err(Error::PartialMsrs(n, entries.len()));
    }
    Ok(())
}

pub fn setup_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(Error::SetFpu)
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_LVT_MASKED: u32 = 1 << 16;

/// LINT1 delivers NMIs; on the boot CPU LINT0 also takes the 8259's ExtINT,
/// as a BIOS (and QEMU's `apic_reset_common`) leaves them. Only there: KVM
/// sends its one wake-up for a rising 8259 output to the first vCPU whose
/// LINT0 accepts ExtINT, and with every AP accepting, an AP the guest never
/// started would get it whenever the boot CPU's LINT0 is masked.
pub fn setup_lapic(vcpu: &VcpuFd, boot_cpu: bool) -> Result<()> {
    let mut lapic = vcpu.get_lapic().map_err(Error::Lapic)?;
    let lints: &[(usize, u32)] = if boot_cpu {
        &[(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)]
    } else {
        &[(APIC_LVT1, APIC_MODE_NMI)]
    };
    for &(reg, mode) in lints {
        // Unmasked, as firmware leaves them: a guest that never programs
        // LINT0 (8259 "virtual wire" without an IOAPIC) still gets ExtINT.
        let value = (lapic_reg(&lapic, reg) & !(0x700 | APIC_LVT_MASKED)) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(Error::Lapic)
}

/// The 32-bit LAPIC register at byte `offset` of a KVM_GET_LAPIC page.
pub fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

// GDT entries: (flags, base, limit) packed the x86 way.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0x0000_f0ff) << 40)
}

fn segment(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

const GDT_64: [u64; 4] = [
    gdt_entry(0, 0, 0),            // null
    gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
    gdt_entry(0xc093, 0, 0xfffff), // data
    gdt_entry(0x808b, 0, 0xfffff), // TSS
];

/// PVH enters in 32-bit protected mode with flat 4 GiB segments.
const GDT_32: [u64; 4] = [
    gdt_entry(0, 0, 0),            // null
    gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code
    gdt_entry(0xc093, 0, 0xfffff), // data
    gdt_entry(0x008b, 0, 0x67),    // TSS
];

const X86_CR0_PE: u64 = 1;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Identity-maps the first 1 GiB with 2 MiB pages: enough for the kernel's
/// 64-bit entry, which builds its own page tables straight away.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))?;
    let pde: Vec<u8> = (0..512u64).flat_map(|i| ((i << 21) | 0x83).to_le_bytes()).collect();
    mem.write_slice(&pde, GuestAddress(PDE_START))?;
    Ok(())
}

/// Segments, GDT, IDT and paging for the entry the kernel asks for: long
/// mode with an identity map (64-bit boot protocol), or flat 32-bit
/// protected mode without paging (PVH).
pub fn setup_sregs(mem: &GuestMemoryMmap, vcpu: &VcpuFd, entry: &KernelEntry) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(Error::Sregs)?;
    let gdt_table = match entry {
        KernelEntry::Linux64 { .. } => &GDT_64,
        KernelEntry::Pvh { .. } => &GDT_32,
    };
    let gdt: Vec<u8> = gdt_table.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&gdt, GuestAddress(BOOT_GDT_START))?;
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let code = segment(gdt_table[1], 1);
    let data = segment(gdt_table[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt_table[3], 3);

    match entry {
        KernelEntry::Linux64 { .. } => {
            write_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        KernelEntry::Pvh { .. } => {
            sregs.cr0 = (sregs.cr0 & !X86_CR0_PG) | X86_CR0_PE;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(Error::Sregs)
}

pub fn setup_regs(vcpu: &VcpuFd, entry: &KernelEntry) -> Result<()> {
    let regs = match *entry {
        KernelEntry::Linux64 { entry, zero_page } => kvm_regs {
            rflags: 0x2,
            rip: entry.0,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: zero_page.0,
            ..Default::default()
        },
        KernelEntry::Pvh { entry, start_info } => {
            kvm_regs { rflags: 0x2, rip: entry.0, rbx: start_info.0, ..Default::default() }
        }
    };
    vcpu.set_regs(&regs).map_err(Error::SetRegs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn gdt_segments_decode() {
        let cs = segment(GDT_64[1], 1);
        assert_eq!((cs.selector, cs.l, cs.db, cs.present, cs.type_), (8, 1, 0, 1, 0xb));
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(GDT_64[2], 2);
        assert_eq!((ds.selector, ds.l, ds.db, ds.type_), (16, 0, 1, 3));
        let null = segment(GDT_64[0], 0);
        assert_eq!(null.unusable, 1);
        let cs32 = segment(GDT_32[1], 1);
        assert_eq!((cs32.l, cs32.db, cs32.limit), (0, 1, 0xffff_ffff));
    }

    fn supported() -> CpuId {
        let e = |function, index, ecx, ebx| kvm_cpuid_entry2 {
            function,
            index,
            ecx,
            ebx,
            ..Default::default()
        };
        CpuId::from_entries(&[
            e(1, 0, 1 << 21, 0),
            e(7, 0, 0, 1 << 2),
            e(0xb, 0, 0, 0),
            e(0xb, 1, 0, 0),
            e(0x8000_0008, 0, 0, 0),
            e(0x8000_001e, 0, 0, 0),
            // Leaf 4: L1 data (type 1, level 1) and unified L3 (type 3, level 3).
            kvm_cpuid_entry2 { function: 4, index: 0, eax: 1 | (1 << 5), ..Default::default() },
            kvm_cpuid_entry2 { function: 4, index: 3, eax: 3 | (3 << 5), ..Default::default() },
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice().iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn phys_bits_honours_the_tdp_limit() {
        let leaf = |function, eax| {
            let e = kvm_cpuid_entry2 { function, eax, ..Default::default() };
            CpuId::from_entries(&[e]).unwrap()
        };
        assert_eq!(phys_bits(&leaf(0x8000_0008, 0x30)), 48);
        assert_eq!(phys_bits(&leaf(0x8000_0008, 0x30_0034)), 48, "52-bit host, 48-bit guest");
        assert_eq!(phys_bits(&leaf(1, 0)), 36);
    }

    #[test]
    fn cpuid_flags_and_topology() {
        let topo = Topology { cpus: 4, cores: 2, threads: 2 };
        let feats = vec![("x2apic".to_string(), true), ("sgx".to_string(), false)];
        let c = build_cpuid(&supported(), 3, topo, &feats, true).unwrap();
        assert_ne!(find(&c, 1, 0).ecx & (1 << 24), 0, "TSC deadline");
        let l1 = find(&c, 1, 0);
        assert_ne!(l1.ecx & (1 << 21), 0);
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor bit");
        assert_eq!(l1.ebx >> 24, 3, "APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(find(&c, 7, 0).ebx & (1 << 2), 0, "-sgx cleared");
        let smt = find(&c, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.edx), (1, 2, 3));
        let core = find(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8), (2, 4, 2));
        assert_eq!(find(&c, 0x8000_0008, 0).ecx & 0xff, 3);
    }

    #[test]
    fn apic_ids_follow_the_cpuid_fields() {
        let ids = |cpus, cores, threads| Topology { cpus, cores, threads }.apic_ids();
        assert_eq!(ids(4, 4, 1), [0, 1, 2, 3]);
        assert_eq!(ids(3, 3, 1), [0, 1, 2], "one package: no holes");
        assert_eq!(ids(6, 3, 1), [0, 1, 2, 4, 5, 6], "2 sockets x 3 cores");
        assert_eq!(ids(6, 3, 2), [0, 1, 2, 3, 4, 5], "3 cores x 2 threads");
        assert_eq!(ids(12, 3, 2), [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
        assert_eq!(ids(6, 1, 3), [0, 1, 2, 4, 5, 6], "3 threads per core");
        // What CPUID says of vCPU 4 of 2 sockets x 3 cores: APIC ID 5, and
        // the core level's shift puts it in package 1.
        let topo = Topology { cpus: 6, cores: 3, threads: 1 };
        let c = build_cpuid(&supported(), 4, topo, &[], false).unwrap();
        assert_eq!(find(&c, 1, 0).ebx >> 24, 5);
        let core = find(&c, 0xb, 1);
        assert_eq!((core.edx, core.edx >> core.eax), (5, 1));
        // Leaf 1 and leaf 4 count addressable IDs (4 per package), not CPUs.
        assert_eq!((find(&c, 1, 0).ebx >> 16) & 0xff, 4);
        let l3 = find(&c, 4, 3).eax;
        assert_eq!((l3 >> 26, (l3 >> 14) & 0xfff), (3, 3));
        let l1 = find(&c, 4, 0).eax;
        assert_eq!((l1 >> 26, (l1 >> 14) & 0xfff), (3, 0));
        let amd = find(&c, 0x8000_001e, 0);
        assert_eq!((amd.eax, amd.ebx, amd.ecx), (5, 1, 1), "APIC ID, core 1, package 1");
    }

    #[test]
    fn unknown_feature_is_an_error() {
        let topo = Topology { cpus: 1, cores: 1, threads: 1 };
        let feats = vec![("frobnicate".to_string(), true)];
        assert!(matches!(
            build_cpuid(&supported(), 0, topo, &feats, false),
            Err(Error::UnknownFeature(n)) if n == "frobnicate"
        ));
        assert!(check_features(&[("sse4_2".into(), true)]).is_ok());
        assert!(check_features(&[("nope".into(), false)]).is_err());
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
    }
}
