"""``ckptsim demo``: the whole story on a built-in counter.

On real processes when the live backend can run here (root, ptrace and the kernel features
it needs; ``demo_live.py``): a running counter is checkpointed, killed, restarted from its
image and checked to carry on where it was. Otherwise (saying why), or with ``--model``, in
the model: run the modelled counter to its checkpoint point, checkpoint its container, kill
it, restart it from the image, let it finish, and compare what it printed with an
uninterrupted run.
"""
from __future__ import annotations

import io
import os
import tempfile

from ..cr.api import checkpoint, restart_tasks
from ..image.storage import write_image_file
from ..model.tasks_ops import SIGKILL
from .scenarios import CGROUP, prepare


def _finish(kernel, root) -> None:
    kernel.thaw(kernel.init, CGROUP)
    kernel.run()


def run_demo(seed: int = 0, out=print, model: bool = False) -> int:
    """The live demo if it can run here (else say why), the model's with ``model``."""
    if not model:
        from .demo_live import run_live_demo, unavailable_reason
        reason = unavailable_reason()
        if reason is None:
            return run_live_demo(out)
        out(f"the live demo cannot run here: {reason}; running the model demo instead")
    return run_model_demo(seed, out)


def run_model_demo(seed: int = 0, out=print) -> int:
    # The reference: the same program, never interrupted.
    ref_kernel, ref_root = prepare("counter", seed)
    cut = len(ref_kernel.output)
    _finish(ref_kernel, ref_root)
    expected = ref_kernel.output[cut:]

    kernel, root = prepare("counter", seed)
    out(f"counter ran to its checkpoint point: last lines {kernel.output[-3:]}")
    buf = io.BytesIO()
    crid = checkpoint(kernel, kernel.init, root.pid.nr_in(kernel.init.ns), buf, 0)
    image = buf.getvalue()
    path = os.path.join(tempfile.gettempdir(), f"ckptsim-demo-{os.getpid()}.img")
    write_image_file(path, image)
    out(f"checkpoint {crid}: {len(image)} bytes written to {path} (mode 0600)")
    kernel.do_group_exit(root, SIGKILL)
    kernel.wait4(kernel.init, root.tid)
    out(f"killed the container init (global pid {root.tid}); live tasks: {[t.tid for t in kernel.live_tasks()]}")
    with open(path, "rb") as f:
        tasks = restart_tasks(kernel, kernel.init, 0, f.read(), 0)
    new_root = tasks[0]
    kernel.cgroup_attach(kernel.init, CGROUP, new_root.pid.nr_in(kernel.init.ns))
    out(f"restarted {len(tasks)} task(s): global pid {new_root.tid}, pid {new_root.pid.nr_in(new_root.ns)} in its namespace")
    cut = len(kernel.output)
    _finish(kernel, new_root)
    got = kernel.output[cut:]
    out(f"after restart it printed {len(got)} lines, ending {got[-3:]}")
    from .ckptinfo import main as ckptinfo_main
    out("--- ckptinfo " + path)
    ckptinfo_main([path])
    os.unlink(path)
    if got != expected:
        out(f"FAILED: an uninterrupted run printed {len(expected)} lines, ending {expected[-3:]}")
        return 1
    out("OK: the restarted counter carried on exactly as an uninterrupted run")
    return 0
