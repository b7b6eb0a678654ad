//! The guest physical memory map, as QEMU's microvm lays it out, plus where
//! Skiff puts its boot structures in low memory.

/// Real-mode IVT and BIOS data area: never handed to the kernel as free.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// GDT and IDT for the 64-bit entry.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH start info (and its memory map) for the PVH entry.
pub const PVH_INFO_START: u64 = 0x6000;
/// Stack for the boot CPU until the kernel sets up its own.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the 64-bit entry (PML4, PDPT, PD).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;

/// Start of the EBDA; the MP table lives here. [EBDA_START, HIGH_MEMORY_START)
/// is reserved in the e820 map (EBDA, VGA hole, BIOS area with the ACPI tables).
pub const EBDA_START: u64 = 0x9_fc00;
/// The ACPI tables (RSDP first) are written here: inside the BIOS area, so a
/// guest that scans for the RSDP also finds it.
pub const ACPI_START: u64 = 0xe_0000;
/// SMBIOS entry point and tables: the start of the 0xF0000 segment, where
/// Linux looks for them when there is no EFI. The ACPI tables end here.
pub const SMBIOS_START: u64 = 0xf_0000;
/// Where the protected-mode kernel is loaded (bzImage `code32_start`).
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// RAM above this goes above 4 GiB (QEMU microvm's `MICROVM_MAX_BELOW_4G`).
pub const MAX_BELOW_4G: u64 = 0xc000_0000;
pub const FIRST_ADDR_PAST_4G: u64 = 1 << 32;

/// The 32-bit PCIe MMIO window and ECAM (QEMU microvm's).
pub const PCIE_MMIO_BASE: u64 = 0xc000_0000;
pub const PCIE_MMIO_SIZE: u64 = 0x2000_0000;
pub const PCIE_ECAM_BASE: u64 = 0xe000_0000;
pub const PCIE_ECAM_SIZE: u64 = 0x1000_0000;

/// INTA..INTD of the root complex: GSIs 16..19, the IOAPIC's upper pins
/// (QEMU microvm's `pcie_irq_base` with its second IOAPIC, the default).
pub const PCIE_INTX_GSI_BASE: u32 = 16;

/// QEMU microvm's 64-bit MMIO window: the top quarter of the guest physical
/// address space (`microvm_devices_init`), as (base, size); none if that
/// space is tiny.
pub fn pcie_mmio64_window(phys_bits: u8) -> Option<(u64, u64)> {
    let phys_size = 1u64.checked_shl(u32::from(phys_bits))?;
    (phys_size > 0x100_0000).then(|| (phys_size - phys_size / 4, phys_size / 4))
}

/// ACPI Generic Event Device: event selector at +0, sleep/reset at +0x200.
pub const GED_MMIO_BASE: u64 = 0xfea0_0000;
pub const GED_MMIO_SIZE: u64 = 0x1000;
pub const GED_IRQ: u32 = 9;
/// virtio-mmio slots: 512 bytes each from here (QEMU microvm's).
pub const VIRTIO_MMIO_BASE: u64 = 0xfeb0_0000;
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x200;
/// At most this many virtio-mmio devices (the GSIs below allow no more).
pub const VIRTIO_MMIO_MAX: usize = 8;
/// With ACPI, virtio-mmio lines are the IOAPIC's upper pins from here (QEMU
/// uses a second IOAPIC from GSI 24; KVM's in-kernel one has 24 pins); with
/// PCIe the first four are the root complex's INTx, so they start 4 later.
pub const VIRTIO_MMIO_GSI_BASE: u32 = 16;
/// ISA IRQs free for virtio-mmio without ACPI: a kernel without MP-table
/// support reaches only the 8259's lines (QEMU microvm starts at 5 too).
pub const VIRTIO_MMIO_ISA_IRQS: [u32; 6] = [5, 6, 7, 10, 11, 12];
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// KVM's in-kernel IOAPIC has 24 pins; GSIs from here are MSI routes.
pub const IOAPIC_PINS: u32 = 24;
pub const APIC_START: u64 = 0xfee0_0000;

/// KVM's 3-page TSS area (Intel, before the irqchip exists): below the
/// IOAPIC, in the hole no RAM or device uses (QEMU's address too).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// Legacy devices: ports and ISA IRQs.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60;
pub const I8042_IRQ: u32 = 1;
pub const RTC_PORT: u16 = 0x70;
pub const RTC_IRQ: u32 = 8;

/// The guest RAM ranges for `mem_size` bytes: below 3 GiB first, the rest
/// above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MAX_BELOW_4G {
        vec![(0, mem_size)]
    } else {
        vec![(0, MAX_BELOW_4G), (FIRST_ADDR_PAST_4G, mem_size - MAX_BELOW_4G)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmio64_window_is_the_top_quarter() {
        assert_eq!(pcie_mmio64_window(40), Some((0xc0_0000_0000, 0x40_0000_0000)));
        assert_eq!(pcie_mmio64_window(24), None);
        assert_eq!(pcie_mmio64_window(64), None);
    }

    #[test]
    fn ram_splits_at_3g() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_ranges(MAX_BELOW_4G), vec![(0, MAX_BELOW_4G)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MAX_BELOW_4G), (FIRST_ADDR_PAST_4G, (4 << 30) - MAX_BELOW_4G)]
        );
    }
}
