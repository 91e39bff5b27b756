"""Live restart: images into real processes, built by ptrace syscall injection into stubs.

``job.restart_image`` is the entry point (``backend/restore_cli.py`` is the `restart` tool);
the modules, one per concern: stub.py (traced stubs and injection), tree.py (pids, parents,
sessions, the seed), transport.py (handing files to stubs), memory.py (address spaces),
files.py (fds, cwd, root), task.py (signals, credentials, limits, registers).
"""
