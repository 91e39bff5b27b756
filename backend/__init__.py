"""The live Linux backend (issue 4): checkpointing real processes. In progress.

Modules: kabi (the raw x86_64 kernel ABI: syscall numbers, ptrace requests, ioctls, structs),
ptrace (seize/stop/detach threads, registers, signal state, syscall injection)."""
