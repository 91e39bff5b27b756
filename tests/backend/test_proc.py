"""backend.proc (stat, status, comm, threads, tree, limits, links; maps in test_proc_maps.py,
fds in test_proc_fds.py): the /proc parsers against processes whose state we know (ourselves and
Python children that set up state and report it back through a pipe)."""
from __future__ import annotations

import json
import mmap
import os
import resource
import signal
import subprocess
import sys
import textwrap

import pytest

from backend import proc
from backend.proc import FdKind, ProcessGone

PAGE = mmap.PAGESIZE

_PRELUDE = """\
import json, os, signal, sys, threading
def ready(**kw):
    sys.stdout.write(json.dumps(kw) + "\\n"); sys.stdout.flush()
def hold():
    sys.stdin.read()      # until the test closes our stdin (or kills us)
"""


class Child:
    """A Python child started by a test; ``info`` is the JSON it reported when ready."""

    def __init__(self, code: str, cwd: str | None = None):
        self.popen = subprocess.Popen(
            [sys.executable, "-I", "-c", _PRELUDE + textwrap.dedent(code)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=cwd)
        self.pid = self.popen.pid
        self.extra_pids: list[int] = []     # descendants the test must end too (leaves first)
        line = self.popen.stdout.readline()
        if not line:
            self.end()
            raise RuntimeError(f"child {self.pid} died before it was ready")
        self.info = json.loads(line)

    def end(self) -> None:
        for pid in self.extra_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)
        for f in (self.popen.stdin, self.popen.stdout):
            try:
                f.close()
            except OSError:
                pass


@pytest.fixture
def spawn(request):
    started: list[Child] = []

    def start(code: str, cwd: str | None = None) -> Child:
        c = Child(code, cwd)
        started.append(c)
        return c

    def fin():
        for c in reversed(started):
            c.end()
    request.addfinalizer(fin)
    return start


# --- stat / status / comm -----------------------------------------------------------------

def test_stat_of_self_matches_os():
    st = proc.read_stat(os.getpid())
    assert st.pid == os.getpid()
    assert st.ppid == os.getppid()
    assert st.pgrp == os.getpgrp()
    assert st.session == os.getsid(0)
    assert st.state in "RS"
    assert st.num_threads == len(os.listdir("/proc/self/task"))
    assert st.comm == open("/proc/self/comm").read().rstrip("\n")
    assert st.start_time > 0 and st.exit_signal == signal.SIGCHLD


@pytest.mark.parametrize("name", ["a) b (c", "x)", "((", ") 1 2 3 ("])
def test_comm_with_spaces_and_parentheses(spawn, name):
    c = spawn(f"""
        open("/proc/self/comm", "w").write({name!r})
        ready(pgrp=os.getpgrp(), sid=os.getsid(0))
        hold()
    """)
    st = proc.read_stat(c.pid)
    assert st.comm == name
    assert st.pid == c.pid and st.ppid == os.getpid()
    assert (st.pgrp, st.session) == (c.info["pgrp"], c.info["sid"])
    assert st.num_threads == 1 and st.state in "RS"   # R: not yet blocked in read
    assert proc.read_comm(c.pid) == name
    assert proc.read_status(c.pid).name == name


def test_status_name_unescapes_newline_and_backslash(spawn):
    name = "n\\l\nx"
    c = spawn(f"""
        open("/proc/self/comm", "w").write({name!r})
        ready()
        hold()
    """)
    assert proc.read_status(c.pid).name == name
    assert proc.read_comm(c.pid) == name


def test_status_of_self_matches_os():
    s = proc.read_status(os.getpid())
    assert (s.pid, s.tgid, s.ppid) == (os.getpid(), os.getpid(), os.getppid())
    assert s.uid[:3] == os.getresuid() and s.gid[:3] == os.getresgid()
    assert sorted(s.groups) == sorted(set(os.getgroups()))
    assert s.nspid[-1] == os.getpid() and s.nspgid[-1] == os.getpgrp()
    assert s.nssid[-1] == os.getsid(0)
    assert s.tracer_pid == 0
    assert s.threads == proc.read_stat(os.getpid()).num_threads
    assert s.sigq[1] == resource.getrlimit(resource.RLIMIT_SIGPENDING)[0]
    assert s.sigblk == sum(1 << (n - 1) for n in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    umask = os.umask(0o22)
    os.umask(umask)
    assert s.umask == umask


def test_status_of_a_child_with_changed_ids_and_signals(spawn):
    c = spawn("""
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, lambda *a: None)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1, signal.SIGTERM])
        os.setgroups([7, 5, 9])
        os.setresgid(11, 12, 13)
        os.setresuid(21, 22, 23)
        # queued after setresuid: SigQ counts the signals charged to the real uid (21)
        os.kill(os.getpid(), signal.SIGUSR1)                        # shared pending
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # this thread's pending
        ready()
        hold()
    """)
    s = proc.read_status(c.pid)
    assert s.uid == (21, 22, 23, 22)          # fsuid follows euid
    assert s.gid == (11, 12, 13, 12)
    assert sorted(s.groups) == [5, 7, 9]
    assert proc.sigset_to_signals(s.shdpnd) == {signal.SIGUSR1}
    assert proc.sigset_to_signals(s.sigpnd) == {signal.SIGTERM}
    assert {signal.SIGUSR1, signal.SIGTERM} <= proc.sigset_to_signals(s.sigblk)
    assert signal.SIGUSR2 in proc.sigset_to_signals(s.sigign)
    assert signal.SIGHUP in proc.sigset_to_signals(s.sigcgt)
    assert signal.SIGHUP not in proc.sigset_to_signals(s.sigign)
    assert s.sigq[0] == 2
    # a root process that switched to non-zero uids lost its permitted/effective caps
    assert s.cap_eff == 0 and s.cap_prm == 0
    assert s.cap_bnd == proc.read_status(os.getpid()).cap_bnd != 0
    assert s.ppid == os.getpid() and (s.state, s.state_name) in (("S", "sleeping"), ("R", "running"))


def test_threads_are_listed_and_readable_by_tid(spawn):
    c = spawn("""
        ev = threading.Event()
        ts = [threading.Thread(target=ev.wait, daemon=True) for _ in range(2)]
        for t in ts: t.start()
        ready(tids=[threading.get_native_id()] + [t.native_id for t in ts])
        hold()
    """)
    tids = c.info["tids"]
    assert proc.list_threads(c.pid) == sorted(tids)
    assert proc.read_stat(c.pid).num_threads == 3 == proc.read_status(c.pid).threads
    for tid in tids:
        assert proc.read_stat(tid).pid == tid
        s = proc.read_status(tid)
        assert (s.pid, s.tgid) == (tid, c.pid)


# --- fds of a child (the other fd tests are in test_proc_fds.py) ------------------------------

def test_fds_of_a_child(spawn, tmp_path):
    target = tmp_path / "f"
    target.write_bytes(b"0123456789")
    c = spawn(f"""
        fd = os.open({str(target)!r}, os.O_RDONLY)
        os.lseek(fd, 7, 0)
        ready(fd=fd)
        hold()
    """)
    fds = {f.fd: f for f in proc.read_fds(c.pid)}
    ours = os.fstat(c.popen.stdout.fileno()).st_ino
    assert fds[1].kind is FdKind.PIPE and fds[1].ino == ours
    assert fds[0].kind is FdKind.PIPE and fds[0].ino == os.fstat(c.popen.stdin.fileno()).st_ino
    f = fds[c.info["fd"]]
    assert (f.path, f.pos, f.kind) == (str(target), 7, FdKind.REGULAR)


# --- limits and links ---------------------------------------------------------------------

def test_limits_of_self_match_getrlimit():
    lims = proc.read_limits(os.getpid())
    assert len(lims) == 16
    for lim in lims:
        assert (lim.soft, lim.hard) == resource.getrlimit(lim.resource), lim.name


def test_limits_and_links_of_a_child(spawn, tmp_path):
    c = spawn("""
        ready()
        hold()
    """, cwd=str(tmp_path))
    hard = resource.prlimit(c.pid, resource.RLIMIT_NOFILE)[1]
    resource.prlimit(c.pid, resource.RLIMIT_NOFILE, (77, hard))
    lim = next(x for x in proc.read_limits(c.pid) if x.resource == resource.RLIMIT_NOFILE)
    assert (lim.soft, lim.hard, lim.units) == (77, hard, "files")
    assert proc.read_cwd(c.pid) == str(tmp_path)
    assert proc.read_root(c.pid) == "/"
    assert proc.read_exe(c.pid) == os.path.realpath(sys.executable)


# --- tree ---------------------------------------------------------------------------------

def test_children_and_subtree_including_a_thread_s_child(spawn):
    # A forks B and C; B forks D; a second thread of A forks E (listed only in
    # /proc/A/task/<that thread>/children).
    c = spawn("""
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # children are reaped automatically
        def fork_child(fn=None):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                msg = fn() if fn else b"x"
                os.write(w, msg); os.close(w)
                hold(); os._exit(0)
            os.close(w); msg = os.read(r, 64); os.close(r)
            return pid, msg
        bpid, dmsg = fork_child(lambda: str(fork_child()[0]).encode())
        cpid, _ = fork_child()
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("e", fork_child()[0]))
        t.start(); t.join()
        ready(b=bpid, c=cpid, d=int(dmsg), e=out["e"])
        hold()
    """)
    a, b, cc, d, e = c.pid, c.info["b"], c.info["c"], c.info["d"], c.info["e"]
    c.extra_pids = [d, b, cc, e]
    assert proc.children(a) == sorted([b, cc, e])
    assert proc.children(b) == [d]
    assert proc.children(d) == []
    expected = [a]
    for kid in sorted([b, cc, e]):
        expected.append(kid)
        if kid == b:
            expected.append(d)
    assert proc.subtree(a) == expected
    assert proc.subtree(d) == [d]
    assert proc.read_stat(e).ppid == a and proc.read_stat(d).ppid == b


# --- vanished and zombie processes --------------------------------------------------------

def test_vanished_process_raises_process_gone(spawn):
    c = spawn("""
        ready()
        hold()
    """)
    pid = c.pid
    c.popen.kill()
    c.popen.wait()
    readers = [proc.read_stat, proc.read_status, proc.read_maps, proc.read_smaps,
               proc.read_fds, proc.read_limits, proc.read_comm, proc.list_threads,
               proc.children, proc.subtree, proc.read_exe, proc.read_cwd]
    for reader in readers:
        with pytest.raises(ProcessGone) as ei:
            reader(pid)
        assert ei.value.pid == pid and str(pid) in str(ei.value)
        assert isinstance(ei.value, ProcessLookupError)
        assert "\n" not in str(ei.value)


def test_zombie_is_readable_and_empty(spawn):
    c = spawn("""
        ready()
        hold()
    """)
    os.kill(c.pid, signal.SIGKILL)
    # wait until it is a zombie without reaping it (WNOWAIT keeps it)
    os.waitid(os.P_PID, c.pid, os.WEXITED | os.WNOWAIT)
    st = proc.read_stat(c.pid)
    assert st.state == "Z" and st.ppid == os.getpid()
    assert proc.read_maps(c.pid) == []
    assert proc.read_fds(c.pid) == []
    assert proc.read_exe(c.pid) is None


def test_sigset_to_signals():
    assert proc.sigset_to_signals(0) == frozenset()
    assert proc.sigset_to_signals(0b101) == {1, 3}
    assert proc.sigset_to_signals(1 << 63) == {64}


def test_stat_parse_rejects_garbage():
    with pytest.raises(ValueError):
        proc.parse_stat("12 no parens here")
    s = proc.parse_stat("7 (a) b) S 1 7 7 0 -1 0" + " 0" * 45)
    assert (s.pid, s.comm, s.state, s.ppid) == (7, "a) b", "S", 1)
