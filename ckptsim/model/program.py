"""Programs: what modelled tasks run.

A program is a JSON list of operations stored in an executable file of the model's file
system, so it is saved with the file system and found again after restart from ``mm.exe_file``.
Each operation is ``[out, name, arg...]``: ``out`` is a register number (0-63) that receives
the result, or null. An argument ``"$rN"`` is the value of register N; other arguments are
taken literally (ints, strings). A failing syscall stores ``-errno`` in ``out``, as the raw
syscall would. All of a program's state lives in its registers and memory, so a checkpoint
holds all of it.

Pseudo-operations (not syscalls):
- ``["emit", value...]``: append a line to the kernel's observable output;
- ``["emit_mem", addr, n]``: output n bytes of memory;
- ``["store", addr, "text"]``: write UTF-8 text to memory; ``["set", reg, value]``, ``["add",
  reg, value]``; ``["jnz", reg, pc]`` jumps to operation ``pc`` when the register is non-zero;
- ``["stack_vma", reg2]``: the start of the VMA holding the main stack (mm.start_stack) in
  ``out``, its end in ``reg2`` (what a real program reads as ``[stack]`` in /proc/self/maps);
- buffer syscalls take memory addresses, as the real ones do: ``["read", fd, addr, n]``,
  ``["write", fd, addr, n]``, ``["recv", fd, addr, n]``, ``["send", fd, addr, n]``,
  ``["pread", fd, addr, n, off]``, ``["pwrite", fd, addr, n, off]``,
  ``["sendto", fd, addr, n, sockaddr]``, ``["sendmsg", fd, addr, n, fds, flags, sockaddr]``
  (``fds``: a list of fd numbers or ``"$rN"`` registers, passed with SCM_RIGHTS);
- ``["wait4", pid, options]`` returns the reaped pid and puts the wait status in r15;
- ``["fork"]`` returns the child's pid to the parent and 0 to the child; ``["pipe", reg2]``
  stores the read end in ``out`` and the write end in register ``reg2`` (likewise
  ``socketpair``);
- ``["check", a, cmp, b, label]`` (cmp one of == != < <= > >=, on unsigned 64-bit values) and
  ``["check_mem", addr, text, label]``: a scenario's own verification; a failed check adds
  ``("FAIL", pid, label, got, want)`` to the output and the program goes on (a check_mem
  whose memory cannot be read fails, with got ``"fault: errno N"``);
- ``["ckpt_point"]``: the task waits here until ``kernel.points_released`` is set (the
  conformance runner checkpoints the tree while its tasks wait at their points);
  ``["ckpt_point", step]`` (step >= 1; no step is step 1) waits until then or until
  ``kernel.released_steps`` >= step (incremental scenarios checkpoint at each step);
- ``["checkpoint", pid, path, flags]`` writes an image of the tree at ``pid`` (0 = the caller)
  into the model file ``path`` and returns the crid (0 when returning from a restart).
Anything else is a Kernel syscall method called as ``kernel.name(task, *args)``.
"""
from __future__ import annotations

import errno
import json

from ..errors import ModelError
from .sched import Blocked
from .task import NR_REGS

MAX_PROGRAM_BYTES = 1 << 20


def encode_program(ops: list) -> bytes:
    return json.dumps(ops, separators=(",", ":")).encode()


def decode_program(data: bytes) -> list:
    if len(data) > MAX_PROGRAM_BYTES:
        raise ValueError("program too large")
    try:
        ops = json.loads(bytes(data).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not a program: {e}") from None
    if not isinstance(ops, list) or not all(isinstance(op, list) and len(op) >= 2 for op in ops):
        raise ValueError("a program is a list of [out, name, args...] operations")
    for op in ops:
        if op[0] is not None and not (isinstance(op[0], int) and 0 <= op[0] < NR_REGS):
            raise ValueError(f"bad output register in {op}")
        if not isinstance(op[1], str) or op[1].startswith("_"):
            raise ValueError(f"bad operation name in {op}")
    return ops


_COMPARE = {"==": int.__eq__, "!=": int.__ne__, "<": int.__lt__, "<=": int.__le__,
            ">": int.__gt__, ">=": int.__ge__}
_BUFFER_READS = {"read": "read", "recv": "recv"}
_BUFFER_WRITES = {"write": "write", "send": "send"}
U64 = (1 << 64) - 1
# Operations the interpreter refuses: internal kernel entry points that are not syscalls.
_NOT_SYSCALLS = {"run", "step", "load_program", "send_signal", "deliver_signals", "do_group_exit",
                 "spawn", "find_task", "live_tasks", "new_pid", "checkpoint_image", "restart_image"}


class Interpreter:
    """Runs one operation of a task's program (mixin of Kernel)."""

    def load_program(self, exe_file) -> list:
        return decode_program(exe_file.inode.read_at(0, exe_file.inode.size))

    def _arg(self, t, value):
        if isinstance(value, str) and value.startswith("$r"):
            return t.cpu.regs[int(value[2:])]
        return value

    def run_op(self, t) -> None:
        """Execute the operation at t's pc; Blocked propagates (the pc does not move)."""
        program = t.program
        if t.cpu.pc >= len(program):
            self.exit_group(t, 0)
            return
        out, name, *raw = program[t.cpu.pc]
        args = [self._arg(t, a) for a in raw]
        try:
            result = self._dispatch(t, out, name, args)
        except ModelError as e:
            result = -e.errno
        if t.state in ("zombie", "dead"):
            return
        if name == "jnz" and result is not None:
            t.cpu.pc = result
            return
        if out is not None and result is not None:
            t.cpu.regs[out] = result & U64 if isinstance(result, int) else result
        t.cpu.pc += 1

    def _dispatch(self, t, out, name, args):
        if name == "emit":
            self.output.append(("emit", self.observed_pid(t), *args))
            return None
        if name == "emit_mem":
            self.output.append(("emit", self.observed_pid(t), self.mem_read(t, args[0], args[1])))
            return None
        if name == "check":
            a, cmp, b, label = args
            if not _COMPARE[cmp](a & U64, b & U64):
                self.output.append(("FAIL", self.observed_pid(t), label, a, f"{cmp} {b}"))
            return None
        if name == "check_mem":
            addr, text, label = args
            want = text.encode()
            try:
                got = self.mem_read(t, addr, len(want))
            except ModelError as e:  # a fault fails the check (it must not pass silently)
                got = f"fault: errno {e.errno}"
            if got != want:
                self.output.append(("FAIL", self.observed_pid(t), label, got, want))
            return None
        if name == "ckpt_point":
            step = args[0] if args else 1
            if not self.points_released and self.released_steps < step:
                raise Blocked("ckpt_point")
            return None
        if name == "store":
            self.mem_write(t, args[0], args[1].encode())
            return None
        if name == "set":
            t.cpu.regs[args[0]] = args[1] & U64
            return None
        if name == "add":
            t.cpu.regs[args[0]] = (t.cpu.regs[args[0]] + args[1]) & U64
            return None
        if name == "jnz":
            return args[1] if t.cpu.regs[args[0]] else None
        if name == "stack_vma":     # not a syscall: what a program reads in /proc/self/maps
            vma = t.mm.find_vma(t.mm.start_stack)
            if vma is None:
                raise ModelError(errno.EFAULT, "no VMA holds the start of the stack")
            t.cpu.regs[args[0]] = vma.end
            return vma.start
        if name in _BUFFER_READS:
            fd, addr, n = args
            data = getattr(self, _BUFFER_READS[name])(t, fd, n)
            self.mem_write(t, addr, data)
            return len(data)
        if name in _BUFFER_WRITES:
            fd, addr, n = args
            return getattr(self, _BUFFER_WRITES[name])(t, fd, self.mem_read(t, addr, n))
        if name in ("sendto", "sendmsg"):
            fd, addr, n, *rest = args
            if name == "sendmsg" and rest:
                rest[0] = [self._arg(t, f) for f in rest[0]]
            return getattr(self, name)(t, fd, self.mem_read(t, addr, n), *rest)
        if name == "pread":
            fd, addr, n, off = args
            data = self.pread(t, fd, n, off)
            self.mem_write(t, addr, data)
            return len(data)
        if name == "pwrite":
            fd, addr, n, off = args
            return self.pwrite(t, fd, self.mem_read(t, addr, n), off)
        if name == "fork":
            child = self.clone(t, *args)
            if out is not None:
                child.cpu.regs[out] = 0
            child.cpu.pc += 1
            return child.pid.nr_in(t.ns)
        if name in ("pipe", "pipe2", "socketpair"):
            *rest, reg2 = args
            a, b = getattr(self, name)(t, *rest)
            t.cpu.regs[reg2] = b
            return a
        if name == "wait4":
            nr, status = self.wait4(t, *args)
            t.cpu.regs[15] = status  # the wait status goes to r15, the pid to ``out``
            return nr
        if name == "checkpoint":
            return self.checkpoint_to_file(t, out, *args)
        if name in _NOT_SYSCALLS or name.startswith("_"):
            raise ValueError(f"{name} is not a syscall")
        method = getattr(self, name, None)
        if method is None:
            raise ValueError(f"unknown operation {name}")
        result = method(t, *args)
        return result if isinstance(result, int) else None
