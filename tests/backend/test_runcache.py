"""backend/runcache.py: documents kept between runs, trusted only when they and their
directory are the caller's and writable by nobody else; and the must-have probe it spares
(backend/features.py)."""
from __future__ import annotations

import os

import pytest

from backend import features, runcache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv(runcache.CACHE_ENV, str(path))
    return path


def test_a_document_is_kept_privately(cache_dir):
    runcache.save("doc.json", {"a": [1, 2]})
    assert runcache.load("doc.json") == {"a": [1, 2]}
    assert (cache_dir.stat().st_mode & 0o777) == 0o700
    assert ((cache_dir / "doc.json").stat().st_mode & 0o777) == 0o600
    assert sorted(os.listdir(cache_dir)) == ["doc.json"]            # no temporary left
    assert runcache.load("missing.json") is None


@pytest.mark.parametrize("spoil", ["file writable by others", "directory writable by others",
                                   "malformed", "a symlink"])
def test_a_document_that_cannot_be_trusted_is_ignored(cache_dir, tmp_path, spoil):
    runcache.save("doc.json", {"a": 1})
    path = cache_dir / "doc.json"
    if spoil == "file writable by others":
        os.chmod(path, 0o666)
    elif spoil == "directory writable by others":
        os.chmod(cache_dir, 0o777)
    elif spoil == "malformed":
        path.write_text('{"a": ')
    else:
        os.replace(path, tmp_path / "elsewhere.json")
        os.symlink(tmp_path / "elsewhere.json", path)
    assert runcache.load("doc.json") is None


def test_nothing_is_kept_when_the_variable_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv(runcache.CACHE_ENV, "")
    assert runcache.cache_dir() is None
    runcache.save("doc.json", {"a": 1})                              # no error
    assert runcache.load("doc.json") is None


def test_the_must_have_probe_is_remembered_for_the_boot_and_caller(cache_dir, monkeypatch):
    calls = []
    real = features.probed
    monkeypatch.setattr(features, "_probed", {})
    monkeypatch.setattr(features, "probed", lambda names=None: calls.append(names) or real(names))
    features.require_must_haves()
    features.require_must_haves()
    assert calls == [features.MUST_HAVE]                             # the second: remembered
    doc = runcache.load(features.MUST_HAVES_FILE)
    assert doc == {"present": features._must_have_key()}
    # another boot, caller or ptrace policy probes again
    runcache.save(features.MUST_HAVES_FILE, {"present": doc["present"][:3] + ["3"]})
    features.require_must_haves()
    assert calls == [features.MUST_HAVE] * 2


def test_a_missing_must_have_is_not_remembered(cache_dir, monkeypatch):
    gone = [features.Feature(n, n != "ptrace", "x", n in features.MUST_HAVE,
                             features.DISABLES[n]) for n in features.MUST_HAVE]
    monkeypatch.setattr(features, "probed", lambda names=None: gone)
    with pytest.raises(features.MissingFeatures, match="ptrace"):
        features.require_must_haves()
    assert runcache.load(features.MUST_HAVES_FILE) is None
