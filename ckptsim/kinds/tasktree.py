"""The task tree and per-task core records: TREE, TASK, TASK_OBJS, CPU.

The tree section lists every task (thread) in depth-first order: a thread-group leader, its
other threads, then its children's groups, children in pid order. Pids are as seen in the
checkpoint's pid namespace; TREE_NESTED adds the numbers of tasks in nested pid namespaces.
"""
from __future__ import annotations

from ..image.schema import ENUMS, layout
from ..model.task import NR_REGS, Cpu
from .registry import Kind, register

TASK_STATES = {0: "running", 1: "stopped", 2: "zombie"}
ENUMS["task_state"] = TASK_STATES
STATE_NUMBERS = {v: k for k, v in TASK_STATES.items()}

PIDS_ITEM = [("vpid", "i32"), ("vppid", "i32"), ("vtgid", "i32"), ("vpgid", "i32"),
             ("vsid", "i32"), ("depth", "i32")]
TREE = layout(101, "TREE", [("nr_tasks", "i32")], var=PIDS_ITEM, max_var=24 << 20,
              subsystem="task")
TASK = layout(102, "TASK", [
    ("state", "u32", "enum:task_state"), ("exit_signal", "i32"), ("exit_code", "u32", "hex"),
    ("pdeath_signal", "u32"), ("flags", "u64", "hex"),
], var="str", max_var=64, subsystem="task")
TASK_OBJS = layout(104, "TASK_OBJS", [
    ("files_objref", "i32", "objref:FILE_TABLE"), ("fs_objref", "i32", "objref:FS"),
    ("mm_objref", "i32", "objref:MM"), ("sighand_objref", "i32", "objref:SIGHAND"),
    ("signal_objref", "i32", "objref:SIGNAL"), ("pad", "i32"),
], subsystem="task")
CPU = layout(107, "CPU", [("pc", "u64"), ("in_syscall", "u32"), ("nr_regs", "u32")],
             var=[("value", "u64")], max_var=NR_REGS * 8, subsystem="task")
# Pids of tasks in nested pid namespaces, innermost last: for each task with depth > 0, in
# tree order, ``depth`` numbers.
TREE_NESTED = layout(118, "TREE_NESTED", [], var=[("vpid", "i32")], max_var=24 << 20,
                     subsystem="task")
# The root's pid namespace membership: whether the checkpoint root is its namespace's init.
TASK_FLAG_PIDNS_INIT = 0x1


def save_cpu(ctx, task) -> None:
    if task.cpu is None:
        return  # a live task: its CPU is kinds/cpu_x86.py's
    regs = task.cpu.regs
    ctx.write(CPU, pc=task.cpu.pc, in_syscall=int(task.cpu.in_syscall), nr_regs=len(regs),
              var=[(r,) for r in regs])


def load_cpu(ctx, task) -> None:
    if ctx.peek() is not CPU and getattr(ctx.peek(), "name", "") == "CPU_X86":
        task.cpu = None  # a live task's registers follow (kinds/cpu_x86.py)
        return
    rec = ctx.read(CPU)
    regs = [v for (v,) in rec.var]
    if rec["nr_regs"] != len(regs) or len(regs) != NR_REGS:
        raise ctx.image_error(f"CPU record holds {len(regs)} registers, expected {NR_REGS}")
    task.cpu = Cpu(rec["pc"], regs, bool(rec["in_syscall"]))


register(Kind(name="cpu", layouts=(CPU,), task_order=90, save_task=save_cpu, load_task=load_cpu,
              doc="the model's CPU: program counter and its registers"))
register(Kind(name="tasktree", layouts=(TREE, TASK, TASK_OBJS, TREE_NESTED),
              doc="the task tree, task records and their shared-object references"))
