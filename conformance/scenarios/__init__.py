"""Every scenario module; importing this package registers them all."""
from . import api, creds, files, memory, memory_fork, pipes, signals, tree, unix  # noqa: F401
