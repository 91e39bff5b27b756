"""Every scenario module; importing this package registers them all."""
from . import (api, creds, files, incremental, memory, memory_fork, pipes,  # noqa: F401
               signals, tree, unix)
