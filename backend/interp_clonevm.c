/*
 * The mini-interpreter of a CLONE_VM child of the live interpreter (backend/interp_clonevm.py
 * compiles it with gcc into a shared library, loads it with ctypes and feeds it).
 *
 * The child is a second process in the parent's address space: it shares the Python
 * interpreter's heap, glibc's thread-local block (errno, locale, malloc arenas) and its
 * tcache. So nothing here calls libc or anything outside this file: every system call is an
 * inline `syscall`, numbers formatted by hand, no static data written (the library's own data
 * is the parent's too). The library is built -nostdlib -Wl,--no-undefined -Wl,-z,now with
 * every function but ckv_clone hidden: no PLT, no lazy binding through ld.so.
 *
 * The op codes, argument tags and comparison codes are -D macros from the Python side (one
 * definition); the syscall numbers and open flags come in the context (from backend/kabi/
 * and Python's os), never written here. struct ckv_ctx must match CkvCtx in
 * interp_clonevm.py: all 64-bit words, in this order.
 *
 * An op is 4 words (code, out register or -1, argument count, extra: the syscall number or
 * the comparison code) then 3 words per argument (tag, value, aux): a register (value: its
 * number), an immediate (aux 1: written as a signed number, as the program gave it), a
 * string (value: offset in the string blob, aux: byte length) or a ready-made JSON fragment
 * (the same, already escaped by Python's json).
 */
#if !defined(OP_SET) || !defined(A_REG) || !defined(CMP_EQ) || !defined(NR_REGS)
#error "built by backend/interp_clonevm.py, which defines the op codes"
#endif

typedef unsigned long u64;
typedef long s64;

struct ckv_ctx {
	u64 pc, nops, op_index, words, strs;
	u64 report_path, release_path, scratch, scratch_len, stack_top;
	u64 clone_flags, report_flags, release_flags;
	u64 nr_clone, nr_exit, nr_exit_group, nr_openat, nr_write, nr_close, nr_getpid;
	u64 nr_process_vm_readv, nr_process_vm_writev;
	u64 exit_error;
	u64 regs[NR_REGS];
};

static inline s64 sys6(s64 n, u64 a, u64 b, u64 c, u64 d, u64 e, u64 f)
{
	register u64 r10 __asm__("r10") = d;
	register u64 r8 __asm__("r8") = e;
	register u64 r9 __asm__("r9") = f;
	s64 ret;
	__asm__ volatile("syscall" : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}

#define sys3(n, a, b, c) sys6(n, a, b, c, 0, 0, 0)

/* clone(flags, stack) whose child calls fn(arg) on that stack, then exit(its result).
 * rdi flags, rsi stack top, rdx fn, rcx arg, r8 clone's number, r9 exit's number.
 * The child's words sit on its new stack: nothing of the parent's stack frame is used. */
s64 ckv_raw_clone(u64 flags, u64 stack_top, void (*fn)(struct ckv_ctx *), struct ckv_ctx *arg,
		  u64 nr_clone, u64 nr_exit);
__asm__(
	".text\n"
	".hidden ckv_raw_clone\n"
	".type ckv_raw_clone,@function\n"
	"ckv_raw_clone:\n"
	"	and $-16, %rsi\n"
	"	sub $32, %rsi\n"
	"	mov %rdx, 0(%rsi)\n"
	"	mov %rcx, 8(%rsi)\n"
	"	mov %r9, 16(%rsi)\n"
	"	mov %r8, %rax\n"
	"	xor %edx, %edx\n"
	"	xor %r10d, %r10d\n"
	"	xor %r8d, %r8d\n"
	"	syscall\n"
	"	test %rax, %rax\n"
	"	jnz 1f\n"
	"	xor %ebp, %ebp\n"		/* the child: outermost frame */
	"	pop %rax\n"
	"	pop %rdi\n"
	"	call *%rax\n"
	"	mov %eax, %edi\n"
	"	mov (%rsp), %rax\n"
	"	syscall\n"
	"	hlt\n"
	"1:	ret\n"
	".size ckv_raw_clone, .-ckv_raw_clone\n");

/* -- formatting into the child's scratch area --------------------------------------------- */
struct buf {
	char *p, *end;
};

static void put1(struct buf *b, char ch)
{
	if (b->p < b->end)
		*b->p++ = ch;
}

static void put(struct buf *b, const char *s, u64 n)
{
	while (n--)
		put1(b, *s++);
}

static void puts0(struct buf *b, const char *s)
{
	while (*s)
		put1(b, *s++);
}

static void put_u64(struct buf *b, u64 v)
{
	char t[24];
	int i = 0;

	do {
		t[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (i)
		put1(b, t[--i]);
}

static void put_s64(struct buf *b, s64 v)
{
	if (v < 0) {
		put1(b, '-');
		put_u64(b, -(u64)v);
	} else {
		put_u64(b, (u64)v);
	}
}

/* bytes as a JSON string of their latin-1 characters, escaped as Python's json.dumps does */
static void put_json_bytes(struct buf *b, const unsigned char *s, u64 n)
{
	static const char hex[] = "0123456789abcdef";

	put1(b, '"');
	for (u64 i = 0; i < n; i++) {
		unsigned char ch = s[i];

		if (ch == '"' || ch == '\\') {
			put1(b, '\\');
			put1(b, (char)ch);
		} else if (ch == '\n') {
			puts0(b, "\\n");
		} else if (ch == '\r') {
			puts0(b, "\\r");
		} else if (ch == '\t') {
			puts0(b, "\\t");
		} else if (ch == '\b') {
			puts0(b, "\\b");
		} else if (ch == '\f') {
			puts0(b, "\\f");
		} else if (ch < 0x20 || ch > 0x7e) {
			puts0(b, "\\u00");
			put1(b, hex[ch >> 4]);
			put1(b, hex[ch & 15]);
		} else {
			put1(b, (char)ch);
		}
	}
	put1(b, '"');
}

/* -- the program ---------------------------------------------------------------------------- */
static const s64 *op_at(struct ckv_ctx *c, u64 pc)
{
	return (const s64 *)c->words + ((const u64 *)c->op_index)[pc];
}

static const s64 *arg_at(const s64 *op, int i)
{
	return op + 4 + 3 * i;
}

static u64 value(struct ckv_ctx *c, const s64 *a)
{
	return a[0] == A_REG ? c->regs[a[1]] : (u64)a[1];
}

static const char *str_of(struct ckv_ctx *c, const s64 *a)
{
	return (const char *)c->strs + a[1];
}

static void put_value(struct buf *b, struct ckv_ctx *c, const s64 *a)
{
	if (a[0] == A_STR || a[0] == A_JSON)
		put(b, str_of(c, a), (u64)a[2]);
	else if (a[0] == A_IMM && a[2])
		put_s64(b, a[1]);
	else
		put_u64(b, value(c, a));
}

/* -- reports: one JSON line appended to CONTROL_DIR/report (open, write, close) ------------- */
static struct buf report_start(struct ckv_ctx *c, const char *kind)
{
	struct buf b = {(char *)c->scratch + c->scratch_len / 2, (char *)c->scratch + c->scratch_len};

	puts0(&b, "{\"kind\": \"");
	puts0(&b, kind);
	puts0(&b, "\", \"pid\": ");
	put_u64(&b, (u64)sys3(c->nr_getpid, 0, 0, 0));
	return b;
}

static void report_end(struct ckv_ctx *c, struct buf *b)
{
	char *start = (char *)c->scratch + c->scratch_len / 2;
	s64 fd;

	puts0(b, "}\n");
	/* the path is absolute: openat ignores its directory descriptor then */
	fd = sys6(c->nr_openat, 0, c->report_path, c->report_flags, 0, 0, 0);
	if (fd < 0)
		return;
	sys3(c->nr_write, (u64)fd, (u64)start, (u64)(b->p - start));
	sys3(c->nr_close, (u64)fd, 0, 0);
}

static void report_error(struct ckv_ctx *c, u64 pc, const char *what)
{
	struct buf b = report_start(c, "error");

	puts0(&b, ", \"message\": \"op ");
	put_u64(&b, pc);
	puts0(&b, ": ");
	puts0(&b, what);
	put1(&b, '"');
	report_end(c, &b);
}

struct iovec_k {
	u64 base, len;
};

/* process_vm_readv/writev on itself: a bad address is -EFAULT, never a fault */
static s64 mem_rw(struct ckv_ctx *c, u64 nr, u64 local, u64 addr, u64 n)
{
	struct iovec_k l = {local, n}, r = {addr, n};
	s64 pid = sys3(c->nr_getpid, 0, 0, 0);

	return sys6(nr, (u64)pid, (u64)&l, 1, (u64)&r, 1, 0);
}

static int compare(s64 how, u64 a, u64 b)
{
	switch (how) {
	case CMP_EQ: return a == b;
	case CMP_NE: return a != b;
	case CMP_LT: return a < b;
	case CMP_LE: return a <= b;
	case CMP_GT: return a > b;
	case CMP_GE: return a >= b;
	}
	return 0;
}

static void op_check(struct ckv_ctx *c, const s64 *op)
{
	const s64 *a = arg_at(op, 0), *b = arg_at(op, 1), *label = arg_at(op, 2), *cmp = arg_at(op, 3);
	struct buf out;

	if (compare(op[3], value(c, a), value(c, b)))
		return;
	out = report_start(c, "FAIL");
	puts0(&out, ", \"label\": ");
	put_value(&out, c, label);
	puts0(&out, ", \"got\": ");
	put_value(&out, c, a);
	puts0(&out, ", \"want\": \"");
	put_value(&out, c, cmp);
	put1(&out, ' ');
	put_value(&out, c, b);
	puts0(&out, "\"");
	report_end(c, &out);
}

static void op_check_mem(struct ckv_ctx *c, const s64 *op)
{
	const s64 *addr = arg_at(op, 0), *text = arg_at(op, 1), *want = arg_at(op, 2), *label = arg_at(op, 3);
	const unsigned char *got = (const unsigned char *)c->scratch, *w = (const unsigned char *)str_of(c, text);
	u64 n = (u64)text[2];
	s64 res;
	struct buf out;

	if (n == 0)
		return;
	res = mem_rw(c, c->nr_process_vm_readv, c->scratch, value(c, addr), n);
	if (res == (s64)n) {
		u64 i = 0;

		while (i < n && got[i] == w[i])
			i++;
		if (i == n)
			return;
	}
	out = report_start(c, "FAIL");
	puts0(&out, ", \"label\": ");
	put_value(&out, c, label);
	puts0(&out, ", \"got\": ");
	if (res == (s64)n) {
		put_json_bytes(&out, got, n);
	} else {
		puts0(&out, "\"fault: errno ");
		put_u64(&out, res < 0 ? (u64)-res : 14);	/* a short read is EFAULT, as mem_read */
		put1(&out, '"');
	}
	puts0(&out, ", \"want\": ");
	put_value(&out, c, want);
	report_end(c, &out);
}

static void op_emit(struct ckv_ctx *c, const s64 *op)
{
	struct buf out = report_start(c, "emit");

	puts0(&out, ", \"values\": [");
	for (int i = 0; i < op[2]; i++) {
		if (i)
			puts0(&out, ", ");
		put_value(&out, c, arg_at(op, i));
	}
	put1(&out, ']');
	report_end(c, &out);
}

static void op_point(struct ckv_ctx *c)
{
	struct buf out = report_start(c, "point");
	s64 fd;

	report_end(c, &out);
	/* blocks until the backend opens the FIFO for writing */
	fd = sys6(c->nr_openat, 0, c->release_path, c->release_flags, 0, 0, 0);
	if (fd >= 0)
		sys3(c->nr_close, (u64)fd, 0, 0);
}

static void child_main(struct ckv_ctx *c)
{
	u64 pc = c->pc;

	for (;;) {
		const s64 *op;
		u64 v[6] = {0, 0, 0, 0, 0, 0};
		s64 res;

		if (pc >= c->nops)
			sys3(c->nr_exit_group, 0, 0, 0);
		op = op_at(c, pc);
		switch (op[0]) {
		case OP_SET:
			c->regs[arg_at(op, 0)[1]] = value(c, arg_at(op, 1));
			break;
		case OP_ADD:
			c->regs[arg_at(op, 0)[1]] += value(c, arg_at(op, 1));
			break;
		case OP_JNZ:
			if (c->regs[arg_at(op, 0)[1]]) {
				pc = (u64)arg_at(op, 1)[1];
				continue;
			}
			break;
		case OP_STORE:
			mem_rw(c, c->nr_process_vm_writev, c->strs + (u64)arg_at(op, 1)[1],
			       value(c, arg_at(op, 0)), (u64)arg_at(op, 1)[2]);
			break;
		case OP_CHECK:
			op_check(c, op);
			break;
		case OP_CHECK_MEM:
			op_check_mem(c, op);
			break;
		case OP_POINT:
			op_point(c);
			break;
		case OP_EMIT:
			op_emit(c, op);
			break;
		case OP_EXIT_GROUP:
			sys3(c->nr_exit_group, value(c, arg_at(op, 0)) & 0xff, 0, 0);
			break;
		case OP_EXIT:
			sys3(c->nr_exit, value(c, arg_at(op, 0)) & 0xff, 0, 0);
			break;
		case OP_SYSCALL:
			for (int i = 0; i < op[2] && i < 6; i++)
				v[i] = value(c, arg_at(op, i));
			res = sys6(op[3], v[0], v[1], v[2], v[3], v[4], v[5]);
			if (op[1] >= 0)
				c->regs[op[1]] = (u64)res;
			break;
		default:
			report_error(c, pc, "the CLONE_VM child reached an op it was not given");
			sys3(c->nr_exit_group, c->exit_error, 0, 0);
		}
		pc++;
	}
}

/* Called by the parent (through ctypes): the child's pid, or -errno. */
__attribute__((visibility("default"))) s64 ckv_clone(struct ckv_ctx *c)
{
	return ckv_raw_clone(c->clone_flags, c->stack_top, child_main, c, c->nr_clone, c->nr_exit);
}
