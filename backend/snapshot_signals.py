"""Reading every signal action of a stopped process (part of backend/snapshot.py).

All 64 actions are read, SIG_DFL ones too: /proc's SigCgt/SigIgn do not show a SIG_DFL
action's flags, mask and restorer (sigaction(SIG_DFL) with flags; SA_RESETHAND after it
fired), and the image keeps them.

The fast way runs a loop of 64 rt_sigaction calls as machine code inside the task (one
ptrace stop, ~0.5 ms) from a page mapped for it and unmapped after; injected one by one the
calls cost two stops each (~4-5 ms). It is not taken, and the calls are injected, when the
task cannot run code for us (backend.ptrace_inject.run_code's CodeRefused) or a page cannot
be mapped in it (RLIMIT_AS, a policy against executable anonymous memory).
"""
from __future__ import annotations

import errno
import signal
import struct

from ckptsim.model.signals import SigAction, SigHand

from . import kabi, ptrace
from .ptrace_inject import CodeRefused, inject_syscalls, read_memory, run_code, write_memory

PAGE = 4096
ACTIONS = kabi.KERNEL_SIGACTION_SIZE * 64        # then 64 results of 8 bytes
# rdi: 64 slots of struct kernel_sigaction, rsi: 64 results. Assembled from (GNU as, Intel):
#       mov r12, rdi ; mov r13, rsi ; mov ebx, 1
#   1:  mov eax, 13 ; mov edi, ebx ; xor esi, esi ; mov rdx, r12 ; mov r10d, 8
#       syscall                          # rt_sigaction(sig, NULL, slot, 8)
#       mov [r13], rax ; add r12, 32 ; add r13, 8
#       inc ebx ; cmp ebx, 65 ; jne 1b
#       int3
READ_ALL_CODE = bytes.fromhex(
    "4989fc4989f5bb01000000b80d00000089df31f64c89e241ba080000000f05"
    "498945004983c4204983c508ffc383fb4175d9cc")


def read_handlers(tid: int) -> SigHand:
    """Every signal's action, read inside the stopped thread ``tid``."""
    try:
        raw = _read_by_code(tid)
    except CodeRefused:
        raw = None
    if raw is None:
        raw = _read_by_injection(tid)
    return SigHand([SigAction(handler, flags, mask, restorer)
                    for handler, flags, restorer, mask in struct.iter_unpack("<QQQQ", raw)])


def _read_by_code(tid: int) -> bytes | None:
    """The 64 kernel_sigaction structs through READ_ALL_CODE; None when no page could be
    mapped for it."""
    code, data = inject_syscalls(tid, [
        (kabi.SYS_mmap, 0, PAGE, kabi.PROT_READ | kabi.PROT_EXEC,
         kabi.MAP_PRIVATE | kabi.MAP_ANONYMOUS, -1, 0),
        (kabi.SYS_mmap, 0, PAGE, kabi.PROT_READ | kabi.PROT_WRITE,
         kabi.MAP_PRIVATE | kabi.MAP_ANONYMOUS, -1, 0)], check=False)
    mapped = [a for a in (code, data) if not -kabi.MAX_ERRNO <= a < 0]
    undo = [(kabi.SYS_munmap, a, PAGE) for a in mapped]
    try:
        if len(mapped) < 2:
            return None
        write_memory(tid, code, READ_ALL_CODE)      # /proc/TID/mem writes the r-x page
        run_code(tid, code, (data, data + ACTIONS))
        out = read_memory(tid, data, ACTIONS + 64 * 8)
        raw, results = out[:ACTIONS], struct.unpack("<64q", out[ACTIONS:])
        trap = struct.unpack_from("<Q", raw, (signal.SIGTRAP - 1) * kabi.KERNEL_SIGACTION_SIZE)[0]
        if trap == kabi.SIG_IGN and not results[signal.SIGTRAP - 1]:
            # the int3's forced SIGTRAP made it SIG_DFL: put back what the loop read (first,
            # so that it is undone whatever happens next)
            undo.insert(0, (kabi.SYS_rt_sigaction, signal.SIGTRAP,
                            data + (signal.SIGTRAP - 1) * kabi.KERNEL_SIGACTION_SIZE, 0, 8))
        failed = [(sig, r) for sig, r in enumerate(results, 1) if r]
        if failed:
            sig, r = failed[0]
            raise ptrace.PtraceError(-r, f"tid {tid}: rt_sigaction({sig}) read failed: "
                                         f"{errno.errorcode.get(-r, r)}")
        return raw
    finally:
        if undo:
            inject_syscalls(tid, undo)


def _read_by_injection(tid: int) -> bytes:
    """64 injected rt_sigaction calls, each writing its own slot of one scratch area on the
    stack (one slot at a time when there are not 2 KiB of stack below rsp: a small altstack)."""
    size = kabi.KERNEL_SIGACTION_SIZE
    try:
        with ptrace.stack_scratch(tid, size * 64) as addr:
            inject_syscalls(tid, [(kabi.SYS_rt_sigaction, sig, 0, addr + (sig - 1) * size, 8)
                                  for sig in range(1, 65)])
            return read_memory(tid, addr, size * 64)
    except ptrace.PtraceError as e:
        if e.errno != errno.EFAULT:
            raise
    raw = b""
    with ptrace.stack_scratch(tid, size) as addr:
        for sig in range(1, 65):
            inject_syscalls(tid, [(kabi.SYS_rt_sigaction, sig, 0, addr, 8)])
            raw += read_memory(tid, addr, size)
    return raw
