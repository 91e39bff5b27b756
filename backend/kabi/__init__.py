"""Raw Linux kernel ABI for x86_64: the ONE place for syscall numbers, ptrace requests, ioctl
numbers, struct layouts and constants that Python's os/signal modules lack.

Everything is plain data plus one helper, `syscall(nr, *args)`, which calls libc's syscall()
with errno checked and raises OSError (with the errno) on failure. Use it as `kabi.NAME`
(`from backend import kabi`): this package re-exports every submodule's names, so callers
never name a submodule.

- syscalls: syscall numbers, kernel-internal errno values, ctypes ints, iovec, ioctl encoding,
  the syscall() helper
- ptrace: requests, options, events, syscall info, register sets, wait flags, arch_prctl,
  Yama, rseq configuration
- signals: sigaction, sigprocmask, sigaltstack, si_code values, siginfo_t, sigset bits
- memory: mmap/mremap/madvise flags, pagemap and PAGEMAP_SCAN, userfaultfd
- tasks: clone3 and namespace flags, kcmp, prctl (PR_SET_MM), capabilities and securebits
- files: fcntl/open/splice flags, msghdr and SCM_RIGHTS, NETLINK_SOCK_DIAG for AF_UNIX
- bpf: bpf(2) commands and bpf_attr layouts, BTF

Owned by the ptrace developer. Others: add a constant to the submodule of its topic, in a
section with a comment naming your module; keep edits small. A name must be defined in one
submodule only (the star imports below would let a later one win silently).
"""

from __future__ import annotations

from .syscalls import *  # noqa: F401,F403
from .ptrace import *  # noqa: F401,F403
from .signals import *  # noqa: F401,F403
from .memory import *  # noqa: F401,F403
from .tasks import *  # noqa: F401,F403
from .files import *  # noqa: F401,F403
from .bpf import *  # noqa: F401,F403

# The underscore names `import *` skips, still reachable as kabi._NAME as before the split.
from .syscalls import _IO, _IOC, _IOC_NONE, _IOC_READ, _IOC_WRITE, _IOR, _IOW, _IOWR  # noqa: F401
from .syscalls import _U64, _arg, _libc  # noqa: F401
from .signals import (_si_chld, _si_fault, _si_fields, _si_kill, _si_poll,  # noqa: F401
                      _si_rt, _si_sys, _si_timer)
from .bpf import _struct  # noqa: F401
