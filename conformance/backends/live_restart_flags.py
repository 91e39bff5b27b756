"""The live backend's restarts with RESTART_GHOST and RESTART_TASKSELF.

A mixin of LiveBackend (conformance/backends/live.py): each returns what
backend.restore.job.restart_image would (a Restored whose ``child`` is this process's child,
the restored init), so kill/resume/verdict wait for it as for any restart.

- RESTART_GHOST: ``restart --ghost`` (backend.api's RESTART_GHOST) in a restarter process of
  its own restores the tree and exits; this process is a child subreaper meanwhile, so the
  orphaned restored init comes back to it as its child.
- RESTART_TASKSELF: a new child of this process, pid 1 of a new pid namespace (as the
  scenario's init was), becomes the image's one task in place
  (backend.restore.self_restart.restart_new_pidns_init).
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

from ..backend import CheckpointFailed

if TYPE_CHECKING:
    from .live import LiveRun

GHOST_TIMEOUT = 60.0


class RestartFlags:
    def _restart_ghost(self, run: LiveRun, image: bytes, frozen: bool, env: dict):
        from backend import api, kabi, proc
        from backend.restore.job import Restored
        me = os.getpid()
        before = set(proc.children(me))
        was_subreaper = api._is_subreaper()
        if not was_subreaper:
            kabi.syscall(kabi.SYS_prctl, kabi.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        try:
            # the image through a pipe (the tool reads stdin): no file that others could
            # read or swap in the shared control dir
            ghost = subprocess.run(
                [sys.executable, "-m", "backend.restore_cli", "--ghost"]
                + (["--frozen"] if frozen else []), cwd="/", env=env, input=bytes(image),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=GHOST_TIMEOUT)
            status, err = ghost.returncode, ghost.stderr
        except subprocess.TimeoutExpired:       # run() killed and reaped it
            status, err = None, b""
        finally:
            if not was_subreaper:
                kabi.syscall(kabi.SYS_prctl, kabi.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        new = [p for p in proc.children(me) if p not in before]
        why = None
        if status is None:
            why = f"the ghost restarter did not exit within {GHOST_TIMEOUT:.0f} s"
        elif status != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            why = (f"the ghost restarter exited with status {status}: "
                   f"{lines[-1] if lines else 'no message'}")
        elif len(new) != 1:
            why = f"the ghost restarter left {len(new)} processes to this one, not the init"
        elif proc.read_status(new[0]).nspid[-1] != 1:
            why = f"the ghost restarter's orphan {new[0]} is not a pid namespace's init"
        if why is not None:
            for pid in new:                     # nothing of a failed restart is left
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                os.waitpid(pid, 0)
            raise CheckpointFailed(errno.EIO, why)
        return Restored(root=new[0], pids={}, reaper=None, new_pidns=True, frozen=frozen)

    def _restart_taskself(self, image: bytes):
        from backend.restore.job import Restored
        from backend.restore.self_restart import restart_new_pidns_init
        child = restart_new_pidns_init(bytearray(image))
        return Restored(root=child, pids={}, reaper=None, new_pidns=True, frozen=False)
