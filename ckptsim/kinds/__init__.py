"""Resource kinds: one module each, registered in ``registry``; ``load_all`` imports them all."""
from __future__ import annotations

import importlib

# Every resource kind module. Adding a kind means adding its module here.
KIND_MODULES = ("tasktree", "cpu_x86", "creds", "signals", "fs", "files", "pipes", "unix", "memory")
_loaded = False


def load_all() -> None:
    global _loaded
    if not _loaded:
        for name in KIND_MODULES:
            importlib.import_module(f"{__name__}.{name}")
        _loaded = True
