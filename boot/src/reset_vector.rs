//! What a PC's firmware has at the reset vector, reduced to what a
//! direct-booted guest needs: a way back to the machine's reset.
//!
//! Linux restarts through the BIOS (`machine_real_restart`: real mode, a far
//! jump to F000:FFF0) when its other methods did not reset the machine, and
//! on a hardware-reduced ACPI machine (microvm's FADT) with no `reboot=` it
//! goes there first: `reboot_init` picks EFI reboot, which without EFI falls
//! through to the BIOS. With no firmware the jump lands on zeros and the
//! guest hangs; QEMU's machines reach their firmware there, which boots
//! again. Skiff puts 16 bytes at the vector that triple-fault on purpose
//! (an empty interrupt table, then `int3`), which KVM reports as a
//! shutdown and skiff takes as the guest's reset, as `reboot=t` does.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Physical address of F000:FFF0.
pub const RESET_VECTOR: u64 = 0xf_fff0;

/// Real-mode code at F000:FFF0 (CS base 0xF0000): `lidt cs:[0xfff8]`
/// (a zero-limit table), `int3` (beyond the limit: #GP, double fault,
/// shutdown), `hlt` and a loop should the fault not come; the table
/// pointer (6 zero bytes) at 0xFFF8.
const STUB: [u8; 16] = [
    0x2e, 0x0f, 0x01, 0x1e, 0xf8, 0xff, // lidt cs:[0xfff8]
    0xcc, // int3
    0xf4, // hlt (not reached)
    0, 0, 0, 0, 0, 0, // limit 0, base 0
    0xeb, 0xf6, // jmp back to the int3 (not reached)
];

/// Writes the stub at [`RESET_VECTOR`].
pub fn setup_reset_vector<M: GuestMemory>(mem: &M) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_slice(&STUB, GuestAddress(RESET_VECTOR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stub_fills_the_last_16_bytes_below_1_mib() {
        assert_eq!(RESET_VECTOR + STUB.len() as u64, crate::layout::HIGH_MEMORY_START);
        // lidt's operand is the zero pointer inside the stub.
        let ptr = u16::from_le_bytes([STUB[4], STUB[5]]);
        assert_eq!(0xf_0000 + u64::from(ptr), RESET_VECTOR + 8);
        assert_eq!(&STUB[8..14], &[0; 6]);
        // The closing jump (at 0xFFFE, 2 bytes, rel8 -10) lands on int3 (0xFFF6).
        assert_eq!(0xfffe + 2 + i64::from(STUB[15] as i8), 0xfff6);
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_reset_vector(&mem).unwrap();
        let mut got = [0u8; 16];
        mem.read_slice(&mut got, GuestAddress(RESET_VECTOR)).unwrap();
        assert_eq!(got, STUB);
    }
}
