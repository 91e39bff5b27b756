"""Before a live restart lets anything run: do the image's executables and vdso still fit here?
(backend/restore/job.py checks while the pages are written; a refusal kills and reaps every
stub made so far, as any failed step does.)

A restored process's saved memory holds return addresses and pointers into the code of its
mapped executable files and into the vdso. The files are mapped again from their paths, and
the vdso is this kernel's, so the restart is refused when:
  - a file the image recorded (kinds/memory.py FILE_ID: the executable and every file mapped
    with PROT_EXEC) now has another build id, or another SHA-256 for a file that had no build
    id, or is gone (ESTALE, naming the file and both identities);
  - this kernel's vdso (the restorer's own, read from /proc/self/maps and parsed with
    pyelftools; every process this kernel starts gets the same) differs from the image's in a
    way saved code would notice: another size of [vvar], [vvar_vclock] or [vdso], or an
    exported symbol the image recorded that is missing here or at another offset (ENOEXEC).
A vdso with the same symbols at the same offsets but other bytes (another build id) is
accepted with a log line. Images without these records (the model's) are not checked.

File identities are cached by file (backend/elf_ids.py), so a restart of many processes that
map the same libc reads its notes once; within one restart each (path, identity) is checked
once whatever the number of processes.

pyelftools parses a file in ~3 ms, a third of a small restart: elf_ids keeps identities and
the vdso's layout between runs (backend/runcache.py), so a restart on the machine that took
the checkpoint, or after an earlier restart, only opens and stats each file.
"""
from __future__ import annotations

import errno

from backend import elf_ids
from ckptsim.kinds.memory import ID_BUILD_ID, FileIdentity, VdsoLayout
from .stub import StubError


def verify(tasks, log=None) -> None:
    """Refuse (StubError) the restart of ``tasks`` (the model tasks restored from the image)
    if a recorded executable file or the vdso layout no longer matches; ``log(line)``."""
    say = log or (lambda line: None)
    mms = list({id(t.mm): t.mm for t in tasks if t.state != "zombie" and t.mm is not None}
               .values())
    checked: set[tuple[str, FileIdentity]] = set()
    for mm in mms:
        for file, recorded in getattr(mm, "file_ids", {}).items():
            if file.inode is not None and file.inode.nlink == 0:
                continue                  # an unlinked file: recreated from the image
            if (file.path, recorded) not in checked:
                _check_file(file.path, recorded)
                checked.add((file.path, recorded))
    if checked:
        say(f"elfcheck: {len(checked)} executable files match the image")
    layouts = list(dict.fromkeys(mm.vdso_layout for mm in mms
                                 if getattr(mm, "vdso_layout", None) is not None))
    if layouts:
        here = elf_ids.own_vdso_layout()
        if here is None:
            raise StubError(errno.ENOEXEC, "vdso: this kernel maps no [vdso], the image's "
                                           "processes had one and their saved code calls into it")
        for recorded in layouts:
            check_vdso(recorded, here, say)


def _check_file(path: str, recorded: FileIdentity) -> None:
    what = "build id" if recorded.kind == ID_BUILD_ID else "SHA-256"
    try:
        now = elf_ids.identity_of(path, recorded.kind, f"executable mapping {path}")
    except OSError as e:
        raise StubError(errno.ESTALE, f"{path}: the image maps it executable "
                                      f"({recorded.describe()}) but it cannot be read here: "
                                      f"{e.strerror}") from None
    if now is None:
        raise StubError(errno.ESTALE, f"{path} has no build id now, the image recorded "
                                      f"{recorded.describe()}: the file changed since the "
                                      "checkpoint")
    if now.value != recorded.value:
        raise StubError(errno.ESTALE, f"{path}: its {what} is {now.value.hex()} now, the image "
                                      f"recorded {recorded.value.hex()} (size {recorded.size}, "
                                      f"now {now.size}): the file changed since the checkpoint")


def check_vdso(recorded: VdsoLayout, here: VdsoLayout, log) -> None:
    """Refuse (ENOEXEC) a vdso layout ``here`` that the image's ``recorded`` one cannot use."""
    for name, size in recorded.sizes.items():
        if here.sizes[name] != size:
            raise StubError(errno.ENOEXEC, f"vdso: this kernel's {name} is {here.sizes[name]:#x} "
                                           f"bytes, the image's {size:#x}: its vdso layout "
                                           "differs and saved code calls into it")
    offsets = here.offsets
    for name, offset, _ in recorded.symbols:
        if name not in offsets:
            raise StubError(errno.ENOEXEC, f"vdso: symbol {name} (offset {offset:#x} in the "
                                           "image) is missing from this kernel's vdso")
        if offsets[name] != offset:
            raise StubError(errno.ENOEXEC, f"vdso: symbol {name} is at offset "
                                           f"{offsets[name]:#x} here, at {offset:#x} in the "
                                           "image: saved code would call the wrong place")
    if here.build_id != recorded.build_id:
        log(f"elfcheck: this kernel's vdso (build id {here.build_id.hex() or 'none'}) differs "
            f"from the image's ({recorded.build_id.hex() or 'none'}) but exports the same "
            f"{len(recorded.symbols)} symbols at the same offsets: restarting")
