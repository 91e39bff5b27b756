"""x86-64 thread state of live tasks: general registers (CPU_X86) and the XSAVE area (XSTATE).

The model's tasks carry the model CPU (kinds/tasktree.py CPU); live tasks carry these, in the
arch range like Linux-CR's CPU_FPU. The register names and order are user_regs_struct's.
``syscall_state`` says what the thread was doing when it was stopped: 0 in user space,
1 inside a syscall that restart must re-run or complete (orig_rax names it). RSEQ follows
when the thread had registered restartable sequences (glibc does at start): the restart
registers the same area again, so the kernel keeps its cpu_id fields (sched_getcpu) and
aborts interrupted critical sections as before.
"""
from __future__ import annotations

from ..image.schema import ENUMS, layout
from .registry import Kind, register

X86_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
            "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
            "gs_base", "ds", "es", "fs", "gs")
ENUMS["syscall_state"] = {0: "USER", 1: "IN_SYSCALL"}
MAX_XSTATE = 64 << 10

CPU_X86 = layout(201, "CPU_X86", [(name, "u64", "hex") for name in X86_REGS]
                 + [("syscall_state", "u32", "enum:syscall_state"), ("pad", "u32")],
                 subsystem="arch")
XSTATE = layout(202, "XSTATE", [], var="bytes", max_var=MAX_XSTATE, subsystem="arch")
RSEQ = layout(203, "RSEQ", [("rseq_abi_pointer", "u64", "hex"), ("rseq_abi_size", "u32"),
                            ("signature", "u32", "hex")], subsystem="arch")


class X86State:
    """What a live task carries instead of the model's CPU: registers and the XSAVE blob."""

    __slots__ = ("regs", "xstate", "syscall_state", "rseq")

    def __init__(self, regs: dict[str, int], xstate: bytes, syscall_state: int = 0,
                 rseq: tuple[int, int, int] | None = None):
        self.regs, self.xstate, self.syscall_state = regs, xstate, syscall_state
        self.rseq = rseq               # (pointer, size, signature) or None


def save_x86(ctx, task) -> None:
    state = getattr(task, "x86", None)
    if state is None:
        return  # a model task: its CPU record is the model's
    ctx.write(CPU_X86, syscall_state=state.syscall_state, pad=0,
              **{name: state.regs[name] for name in X86_REGS})
    ctx.write(XSTATE, var=state.xstate)
    if state.rseq is not None:
        ptr, size, sig = state.rseq
        ctx.write(RSEQ, rseq_abi_pointer=ptr, rseq_abi_size=size, signature=sig)


def load_x86(ctx, task) -> None:
    if ctx.peek() is not CPU_X86:
        return
    rec = ctx.read(CPU_X86)
    xstate = bytes(ctx.read(XSTATE).var)
    rseq = None
    if ctx.peek() is RSEQ:
        r = ctx.read(RSEQ)
        rseq = (r["rseq_abi_pointer"], r["rseq_abi_size"], r["signature"])
    task.x86 = X86State({name: rec[name] for name in X86_REGS}, xstate, rec["syscall_state"],
                        rseq)


register(Kind(name="cpu_x86", layouts=(CPU_X86, XSTATE, RSEQ), task_order=91, save_task=save_x86,
              load_task=load_x86, doc="x86-64 registers and XSAVE state of live tasks"))
