/*
 * outb VALUE PORT: write one byte to an x86 I/O port (e.g. `outb 5 0xf4`
 * for QEMU's isa-debug-exit). Needed in the test guest because Debian's
 * cloud kernel has no /dev/port (CONFIG_DEVPORT is off).
 *
 * Freestanding: no libc, a few hundred bytes, built with
 *   gcc -Os -static -nostdlib -fno-pie -no-pie -fno-stack-protector
 */

#define SYS_write 1
#define SYS_exit 60
#define SYS_iopl 172

static long sys3(long n, long a, long b, long c)
{
	long r;

	__asm__ volatile("syscall"
			 : "=a"(r)
			 : "a"(n), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return r;
}

static void die(const char *msg)
{
	long len = 0;

	while (msg[len])
		len++;
	sys3(SYS_write, 2, (long)msg, len);
	sys3(SYS_exit, 1, 0, 0);
	__builtin_unreachable();
}

/* decimal, or hex with 0x */
static long parse(const char *s)
{
	long v = 0, base = 10;

	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	if (!*s)
		die("outb: empty number\n");
	for (; *s; s++) {
		long d;

		if (*s >= '0' && *s <= '9')
			d = *s - '0';
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = *s - 'a' + 10;
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = *s - 'A' + 10;
		else
			die("outb: bad number\n");
		v = v * base + d;
	}
	return v;
}

__attribute__((used)) void cmain(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);

	if (argc != 3)
		die("usage: outb VALUE PORT\n");
	long val = parse(argv[1]), port = parse(argv[2]);

	if (val > 255 || port > 0xffff)
		die("outb: value or port out of range\n");
	if (sys3(SYS_iopl, 3, 0, 0) != 0)
		die("outb: iopl failed (need root / CAP_SYS_RAWIO)\n");
	__asm__ volatile("outb %b0, %w1" : : "a"(val), "Nd"(port));
	sys3(SYS_exit, 0, 0, 0);
	__builtin_unreachable();
}

__asm__(".globl _start\n"
	"_start:\n"
	"  xor %rbp, %rbp\n"
	"  mov %rsp, %rdi\n"
	"  and $-16, %rsp\n"
	"  call cmain\n"
	"  hlt\n");
