/* The smallest guest skiff boots: a PVH ELF (the Xen note skiff's loader
 * looks for) whose entry halts with interrupts off, forever. It runs even
 * on a software /dev/kvm (PVM) that cannot run a Linux guest, so tests of
 * skiff's host side (QMP clients, signals, exit status) need no test host.
 * Built by resources/guest-assets.sh: as --64; ld -N -Ttext=0x100000. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4          /* name size: "Xen\0" */
    .long 4          /* descriptor size */
    .long 18         /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long _start

    .text
    .code32
    .globl _start
_start:
    cli
1:  hlt
    jmp 1b
