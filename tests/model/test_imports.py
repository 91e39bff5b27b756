"""Every model module imports first, on its own, in a fresh interpreter: an import cycle
shows up only in the order nobody happened to use (vfs_ops.py before vfs.py was one)."""
from __future__ import annotations

import os
import pkgutil
import subprocess
import sys

import pytest

import ckptsim.model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULES = sorted(f"ckptsim.model.{m.name}" for m in pkgutil.iter_modules(ckptsim.model.__path__))


@pytest.mark.parametrize("module", MODULES)
def test_the_module_imports_on_its_own(module):
    r = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 0, r.stderr.strip().splitlines()[-1:]
