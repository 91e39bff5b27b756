"""Signals of the live interpreter (backend/interp.py): real dispositions, real delivery.

A handler in a scenario program is an address of the model's program; in the model
(ckptsim/model/signals.py) a handler runs atomically at delivery, its only effect a
``("signal", tgid, sig, value, stack)`` line of output: it has no ops of its own. The
interpreter installs, for every such sigaction, a REAL disposition with the program's flags
(SA_RESTART, SA_RESETHAND, SA_NODEFER, SA_ONSTACK, SA_SIGINFO...) and sa_mask, plus
SA_RESTORER with glibc's own restorer (x86-64 cannot return from a handler without one). So
the kernel does everything the model's delivery does: it picks the signal, blocks sa_mask
(and the signal unless SA_NODEFER) while the handler runs, resets an SA_RESETHAND handler to
SIG_DFL, switches to the alternate stack for SA_ONSTACK, restarts an interrupted syscall with
SA_RESTART (and makes it fail with EINTR without it: the model restarts always), and
/proc/PID/status SigCgt, the checkpoint and the restart see a real handler.

The handler code is ``HANDLER_CODE``: a few x86-64 instructions (no C library, no Python,
async-signal-safe) that append one record to this process's ring and return (to glibc's
restorer, then rt_sigreturn). Every thread drains the ring after each op and reports each
record as ``{"kind": "signal", "pid", "tid", "sig", "value", "stack", "code", "from"}``
(``value``: si_value when the disposition has SA_SIGINFO, else None: the kernel copies no
siginfo then). ``stack`` is "altstack" when the handler's own stack pointer was inside the
alternate stack the kernel reported in its ucontext (uc_stack), else "stack": the handler
code itself really runs on the altstack; the report is written later on the normal stack.

Ring layout (RING_BYTES, one per process, anonymous memory, shared by threads, copied by
fork): u64 ``count`` (records ever started, lock xadd) then RING_SLOTS records of 64 bytes:
  +0 seq (slot number + 1 once complete)  +8 sig | si_code << 32  +16 si_pid | si_uid << 32
  +24 si_value   +32 handler's rsp   +40 tid   +48 uc_stack.ss_sp   +56 uc_stack.ss_size
(siginfo_t: si_code at 8, si_pid at 16, si_uid at 20, si_value at 24; ucontext: uc_stack at
16 with ss_sp at 16 and ss_size at 32, as in the x86-64 uapi headers.)

Source of HANDLER_CODE (``as`` then ``objcopy -O binary -j .text``; tests/backend/
test_interp_signals.py reassembles it when ``as`` is installed):
"""
from __future__ import annotations

import ctypes
import platform
import threading

from . import kabi
from .interp_libc import U64, KSigaction, StackT, Unsupported, libc_call, mem_read

HANDLER_SOURCE = """\
	.text
handler:
	mov ring(%rip), %r8
	mov $1, %ecx
	lock xadd %rcx, (%r8)
	mov %rcx, %r9
	and $63, %ecx
	shl $6, %rcx
	lea 64(%r8,%rcx), %r10
	mov 8(%rsi), %eax
	shl $32, %rax
	mov %edi, %edi
	or %rdi, %rax
	mov %rax, 8(%r10)
	mov 16(%rsi), %rax
	mov %rax, 16(%r10)
	mov 24(%rsi), %rax
	mov %rax, 24(%r10)
	mov %rsp, 32(%r10)
	mov 16(%rdx), %rax
	mov %rax, 48(%r10)
	mov 32(%rdx), %rax
	mov %rax, 56(%r10)
	mov $186, %eax
	syscall
	mov %rax, 40(%r10)
	lea 1(%r9), %rax
	mov %rax, (%r10)
	ret
	.balign 8
ring:
	.quad 0
"""
HANDLER_CODE = bytes.fromhex(
    "4c8b0561000000b901000000f0490fc1084989c983e13f48c1e1064d8d5408408b460848c1e02089ff"
    "4809f849894208488b461049894210488b46184989421849896220488b421049894230488b42204989"
    "4238b8ba0000000f0549894228498d4101498902c390")
RING_POINTER_OFFSET = 0x68          # the ``ring`` quad after the code
RING_SLOTS = 64
RECORD_BYTES = 64
RING_BYTES = 64 + RING_SLOTS * RECORD_BYTES
PAGE = 4096

SA_SIGINFO = 0x00000004
SA_RESTORER = 0x04000000
SI_QUEUE = -1
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE_ANON = 0x02 | 0x20


class HandlerRing:
    """This process's handler code and record ring (made at the first handler sigaction)."""

    def __init__(self):
        if platform.machine() != "x86_64":
            raise Unsupported(f"unsupported op sigaction: a handler address needs the interpreter's "
                              f"x86-64 handler code; this machine is {platform.machine()}")
        size = (RING_BYTES + PAGE - 1) // PAGE * PAGE
        ring = libc_call("mmap64", 0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE_ANON, -1, 0)
        code = libc_call("mmap64", 0, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE_ANON, -1, 0)
        if ring < 0 or code < 0:
            raise OSError(-min(ring, code), "mmap of the handler ring")
        ctypes.memmove(code, HANDLER_CODE, len(HANDLER_CODE))
        ctypes.c_uint64.from_address(code + RING_POINTER_OFFSET).value = ring
        res = libc_call("mprotect", code, PAGE, PROT_READ | PROT_EXEC)
        if res < 0:
            raise OSError(-res, "mprotect of the handler code")
        self.ring = ring
        self.handler = code
        self.seen = 0                       # records reported so far (a fork copies it)

    def count(self) -> int:
        return ctypes.c_uint64.from_address(self.ring).value

    def take(self) -> list[dict]:
        """The records completed since the last call, in order; a record still being written
        (by a handler on another thread) stops the walk until the next call."""
        out = []
        total = self.count()
        if total - self.seen > RING_SLOTS:
            lost = total - self.seen - RING_SLOTS
            self.seen = total - RING_SLOTS
            out.append({"lost": lost})
        while self.seen < total:
            slot = self.ring + 64 + (self.seen % RING_SLOTS) * RECORD_BYTES
            raw = mem_read(slot, RECORD_BYTES)
            words = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, RECORD_BYTES, 8)]
            if words[0] != self.seen + 1:
                break                       # still being written (by another thread's handler)
            code = words[1] >> 32
            out.append({"sig": words[1] & 0xFFFFFFFF, "code": code - (1 << 32) if code >> 31 else code,
                        "from": words[2] & 0xFFFFFFFF, "value": words[3], "rsp": words[4],
                        "tid": words[5], "ss_sp": words[6], "ss_size": words[7]})
            self.seen += 1
        return out


class ProcessSignals:
    """Per-process signal bookkeeping of the interpreter (threads share it, fork copies it)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ring: HandlerRing | None = None
        self.siginfo: dict[int, bool] = {}  # sig -> its handler was installed with SA_SIGINFO
        self.restorer = 0

    def learn_restorer(self) -> None:
        """glibc's restorer, as the kernel holds it for a disposition glibc installed (the
        interpreter's reset of SIGINT went through glibc's sigaction)."""
        old = KSigaction()
        libc_call("syscall", kabi.SYS_rt_sigaction, 2, None, ctypes.byref(old), 8)
        if old.flags & SA_RESTORER:
            self.restorer = old.restorer


PROCESS = ProcessSignals()


class SignalOps:
    """The signal ops of Interp (a mixin: needs ``report``)."""

    def drain_signals(self) -> None:
        """Report every handler run recorded since the last drain (any thread may do it)."""
        ring = PROCESS.ring
        if ring is None or ring.count() == ring.seen:
            return
        with PROCESS.lock:
            records = ring.take()
        for r in records:
            if "lost" in r:
                self.report("error", message=f"{r['lost']} handler records lost (ring of {RING_SLOTS})")
                continue
            on_alt = r["ss_size"] and r["ss_sp"] <= r["rsp"] < r["ss_sp"] + r["ss_size"]
            siginfo = PROCESS.siginfo.get(r["sig"], False)
            self.report("signal", tid=r["tid"], sig=r["sig"], stack="altstack" if on_alt else "stack",
                        value=r["value"] if siginfo else None,
                        code=r["code"] if siginfo else None, **{"from": r["from"] if siginfo else None})

    def op_sigaction(self, out, sig, handler=None, flags=0, mask=0, restorer=0):
        new = None
        if handler is not None:
            handler &= U64
            if handler in (0, 1):
                new = KSigaction(handler, flags & 0xFFFFFFFF & ~SA_RESTORER, 0, mask & U64)
            else:
                if restorer:
                    raise Unsupported(f"unsupported op sigaction: restorer {restorer:#x} is an address "
                                      f"in the model's program; the interpreter uses glibc's")
                if not PROCESS.restorer:
                    raise Unsupported("unsupported op sigaction: glibc's signal restorer is unknown "
                                      "(SIGINT's disposition had no SA_RESTORER)")
                with PROCESS.lock:
                    if PROCESS.ring is None:
                        PROCESS.ring = HandlerRing()
                new = KSigaction(PROCESS.ring.handler, (flags & 0xFFFFFFFF) | SA_RESTORER,
                                 PROCESS.restorer, mask & U64)
        old = KSigaction()
        res = libc_call("syscall", kabi.SYS_rt_sigaction, sig, ctypes.byref(new) if new else None,
                        ctypes.byref(old), 8)
        if res >= 0 and new is not None:
            PROCESS.siginfo[sig] = bool(new.flags & SA_SIGINFO)
        return res if res < 0 else None

    def op_sigprocmask(self, out, how, mask=None):
        new = ctypes.c_uint64(mask & U64) if mask is not None else None
        old = ctypes.c_uint64()
        res = libc_call("syscall", kabi.SYS_rt_sigprocmask, how,
                        ctypes.byref(new) if new is not None else None, ctypes.byref(old), 8)
        return res if res < 0 else old.value

    def op_sigpending(self, out):
        got = ctypes.c_uint64()
        res = libc_call("syscall", kabi.SYS_rt_sigpending, ctypes.byref(got), 8)
        return res if res < 0 else got.value

    def op_sigaltstack(self, out, ss=None):
        new = StackT(ss[0], ss[2], ss[1]) if ss is not None else None
        old = StackT()
        res = libc_call("sigaltstack", ctypes.byref(new) if new else None, ctypes.byref(old))
        return res if res < 0 else None

    def op_kill(self, out, pid, sig):
        return libc_call("kill", pid, sig)

    def op_tgkill(self, out, tgid, tid, sig):
        return libc_call("tgkill", tgid, tid, sig)

    def op_sigqueue(self, out, pid, sig, value):
        return libc_call("sigqueue", pid, sig, ctypes.c_void_p(value & U64))

    def op_setrlimit(self, out, resource, cur, maximum):
        lim = (ctypes.c_uint64 * 2)(cur & U64, maximum & U64)
        return libc_call("setrlimit", resource, lim)
