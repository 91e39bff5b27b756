"""backend.features: the kernel feature probes and `ckptsim check`."""
from __future__ import annotations

import errno
import gzip
import os
import time

import pytest

from backend import features, kabi, proc
from backend.features import Feature, MissingFeatures
from ckptsim.tools import cli

NAMES = ["ptrace", "process_vm_readv", "pagemap", "pagemap_scan", "uffd_wp_async", "bpf", "btf",
         "tracefs", "bpf_tracker", "unix_embryo", "kcmp", "pidfd_getfd", "clone3_set_tid", "freezer_v1", "freezer_v2"]


def _config() -> dict[str, str]:
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return dict(line.strip().split("=", 1) for line in f if line.startswith("CONFIG_"))
    except OSError:
        return {}


def _leftovers() -> tuple:
    """What a probe could leave behind: children, fds, probe cgroups."""
    cg = []
    for root in ("/sys/fs/cgroup/freezer", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if os.path.isdir(root):
            cg += [n for n in os.listdir(root) if n.startswith(f"ckptsim-probe-{os.getpid()}")]
    return proc.children(os.getpid()), sorted(os.listdir("/proc/self/fd")), cg


def test_probe_reports_every_feature_quickly_and_leaves_nothing():
    before = _leftovers()
    t = time.monotonic()
    found = features.probe()
    elapsed = time.monotonic() - t
    assert elapsed < 1.0, f"probe() took {elapsed:.2f} s"
    assert [f.name for f in found] == NAMES
    assert {f.name for f in found if f.must_have} == {"ptrace", "process_vm_readv", "pagemap"}
    for f in found:
        assert isinstance(f, Feature) and isinstance(f.present, bool)
        assert f.detail and "\n" not in f.detail and f.disables
    assert _leftovers() == before


def test_probe_agrees_with_the_kernel_config():
    cfg = _config()
    if not cfg:
        pytest.skip("/proc/config.gz is not readable")
    found = {f.name: f for f in features.probe()}
    expect = {
        "process_vm_readv": "CONFIG_CROSS_MEMORY_ATTACH",
        "pagemap": "CONFIG_PROC_PAGE_MONITOR",
        "kcmp": "CONFIG_KCMP",
        "bpf": "CONFIG_BPF_SYSCALL",
        "btf": "CONFIG_DEBUG_INFO_BTF",
        "uffd_wp_async": "CONFIG_USERFAULTFD CONFIG_PTE_MARKER_UFFD_WP",
    }
    for name, syms in expect.items():
        want = all(cfg.get(sym) == "y" for sym in syms.split())
        assert found[name].present == want, (name, found[name].detail)
    if cfg.get("CONFIG_PROC_PAGE_MONITOR") != "y":
        assert not found["pagemap_scan"].present
    if cfg.get("CONFIG_CGROUP_FREEZER") != "y":
        assert not found["freezer_v1"].present


def test_tracefs_follows_the_mount_table():
    with open("/proc/self/mounts") as f:
        mounted = any(ln.split()[1:3] == ["/sys/kernel/tracing", "tracefs"] for ln in f)
    found = {f.name: f for f in features.probe()}
    assert found["tracefs"].present == mounted


def test_ptrace_probe_detaches_its_child():
    child = features._Child()
    try:
        present, detail = features._probe_ptrace(child)
        assert present, detail
        st = proc.read_status(child.pid)
        assert st.tracer_pid == 0 and st.state != "t"
    finally:
        child.close()
    with pytest.raises(ProcessLookupError):
        proc.read_stat(child.pid)


def test_process_vm_readv_probe_detects_wrong_data():
    child = features._Child()
    try:
        child.MARK = b"X" * len(child.MARK)     # expect other bytes than the child holds
        present, detail = features._probe_process_vm_readv(child)
        assert not present and "differ" in detail
    finally:
        child.close()


def _failing_syscall(monkeypatch, nr: int, err: int, ioctl_req: int | None = None):
    real = kabi.syscall

    def fake(n, *args, what=None):
        if n == nr and (ioctl_req is None or args[1] == ioctl_req):
            raise OSError(err, os.strerror(err))
        return real(n, *args, what=what)
    monkeypatch.setattr(kabi, "syscall", fake)


@pytest.mark.parametrize("nr,name", [
    (kabi.SYS_ptrace, "ptrace"), (kabi.SYS_process_vm_readv, "process_vm_readv"),
    (kabi.SYS_kcmp, "kcmp"), (kabi.SYS_pidfd_getfd, "pidfd_getfd"), (kabi.SYS_bpf, "bpf"),
    (kabi.SYS_userfaultfd, "uffd_wp_async"), (kabi.SYS_clone3, "clone3_set_tid"),
])
def test_a_failing_syscall_is_a_missing_feature_with_its_errno(monkeypatch, nr, name):
    baseline = {f.name: f.present for f in features.probe()}
    before = _leftovers()
    _failing_syscall(monkeypatch, nr, errno.ENOSYS)
    found = {f.name: f for f in features.probe()}
    assert not found[name].present and "ENOSYS" in found[name].detail
    others = {n: f.present for n, f in found.items() if n != name}
    assert others == {n: p for n, p in baseline.items() if n != name}
    assert _leftovers() == before


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOTTY])
def test_pagemap_scan_einval_or_enotty_means_missing(monkeypatch, err):
    _failing_syscall(monkeypatch, kabi.SYS_ioctl, err, ioctl_req=kabi.PAGEMAP_SCAN)
    found = {f.name: f for f in features.probe()}
    assert not found["pagemap_scan"].present and "no PAGEMAP_SCAN" in found["pagemap_scan"].detail
    assert found["pagemap"].present == (_config().get("CONFIG_PROC_PAGE_MONITOR", "y") == "y")


def test_no_fork_makes_the_child_probes_missing_without_raising(monkeypatch):
    def nofork():
        raise OSError(errno.EAGAIN, "no more processes")
    monkeypatch.setattr(os, "fork", nofork)
    found = {f.name: f for f in features.probe()}
    for name in ("ptrace", "process_vm_readv", "kcmp", "pidfd_getfd"):
        assert not found[name].present and "EAGAIN" in found[name].detail
    with pytest.raises(MissingFeatures, match="ptrace.*process_vm_readv"):
        features.require_must_haves(list(found.values()))


def test_require_must_haves():
    ok = [Feature(n, True, "ok", n in features.MUST_HAVE, "x") for n in NAMES]
    features.require_must_haves(ok)
    # a missing optional feature is fine
    optional = [Feature(f.name, f.name != "bpf", f.detail, f.must_have, f.disables) for f in ok]
    features.require_must_haves(optional)
    bad = [Feature(f.name, f.name != "pagemap", "EACCES: Permission denied"
                   if f.name == "pagemap" else "ok", f.must_have, f.disables) for f in ok]
    with pytest.raises(MissingFeatures) as ei:
        features.require_must_haves(bad)
    msg = str(ei.value)
    assert "pagemap (EACCES: Permission denied)" in msg and "ptrace" not in msg
    assert "\n" not in msg and [f.name for f in ei.value.missing] == ["pagemap"]


def test_ckptsim_check_prints_the_table(capsys):
    found = features.probe()
    rc = cli.main(["check"])
    out = capsys.readouterr().out
    must_ok = all(f.present for f in found if f.must_have)
    assert rc == (0 if must_ok else 1)
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["feature", "status"]
    for f in found:
        row = next(ln for ln in lines if ln.split()[0] == f.name)
        assert ("present" if f.present else "issing") in row
        assert f.disables in row


def test_ckptsim_check_exits_1_when_a_must_have_is_missing(monkeypatch, capsys):
    fake = [Feature(n, n != "ptrace", "EPERM: Operation not permitted" if n == "ptrace" else "ok",
                    n in features.MUST_HAVE, features.DISABLES[n]) for n in NAMES]
    monkeypatch.setattr(features, "probe", lambda: fake)
    assert cli.main(["check"]) == 1
    cap = capsys.readouterr()
    row = next(ln for ln in cap.out.splitlines() if ln.startswith("ptrace"))
    assert "MISSING" in row and "EPERM" in row and features.DISABLES["ptrace"] in row
    assert "missing ptrace" in cap.err and "Traceback" not in cap.err
    # an optional feature missing: still 0
    fake2 = [Feature(f.name, f.name != "tracefs", f.detail, f.must_have, f.disables)
             for f in _all_present()]
    monkeypatch.setattr(features, "probe", lambda: fake2)
    assert cli.main(["check"]) == 0


def _all_present():
    return [Feature(n, True, "ok", n in features.MUST_HAVE, features.DISABLES[n]) for n in NAMES]


def test_bpf_tracker_follows_the_trackers_own_check():
    from backend import bpf_tracker
    present, detail = bpf_tracker.available()
    found = {f.name: f for f in features.probe()}["bpf_tracker"]
    assert found.present == present and detail in found.detail
    assert "full" in found.disables            # what is lost: incremental dumps


def test_bpf_tracker_missing_names_the_reason(monkeypatch, capsys):
    from backend import bpf_tracker

    def no_bcc():
        raise bpf_tracker.TrackerUnavailable("bcc is not installed (apt-get install python3-bpfcc)")
    monkeypatch.setattr(bpf_tracker, "_import_bcc", no_bcc)
    found = {f.name: f for f in features.probe()}["bpf_tracker"]
    assert not found.present and not found.must_have
    if os.geteuid() == 0:
        assert "python3-bpfcc" in found.detail
    cli.main(["check"])                        # its exit status is tested above
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("bpf_tracker"))
    assert "missing" in row and "fall back to full" in row
