"""The build's identity: ``python -m miras info``, the stale-extension check of ``import miras``, and
the hardware-verification table of the CUDA kernel families (csrc/cuda/verification.h)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

miras = pytest.importorskip("miras")
from miras import _fingerprint, _info  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Families that may be (and are documented in README "Which kernels run by default" as) not
# hardware-verified. A family leaving the verified set makes this test fail until it is listed here
# and the README says so — or until a hardware run is recorded.
KNOWN_UNVERIFIED = {"capi"}


def test_info_command_runs():
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    r = subprocess.run([sys.executable, "-m", "miras", "info"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for family in ("chunk_l2", "scan", "capi"):
        assert family in out
    assert "CPU backend: instruction sets compiled:" in out
    assert "sources hash" in out and "matches the checkout" in out


def test_build_fingerprints_are_the_sources():
    """The extension was built from these kernel sources (setup.py computes the same fingerprints)."""
    b = miras._C.build_info()
    now = _fingerprint.family_fingerprints(ROOT)
    for f in b["families"]:
        assert f["fingerprint"] == now[f["family"]], (f["family"], f["fingerprint"], now[f["family"]])
    assert b["source_hash"] == _fingerprint.source_hash(ROOT)


def test_verified_families_are_documented():
    fams = {f["family"]: f for f in miras._C.build_info()["families"]}
    assert set(fams) >= {"chunk_l2", "scan", "capi"}
    for name, f in fams.items():
        if name in KNOWN_UNVERIFIED:
            continue
        assert f["hardware_verified"], (
            f"kernel family {name} changed since its hardware run ({f['device']} at {f['commit']}; verified "
            f"sources {f['verified_fingerprint']}, now {f['fingerprint']}): it no longer runs by default. Record a "
            "passing bench/device_check.sh run in csrc/cuda/verification.h, or list it in KNOWN_UNVERIFIED here "
            "and say so in the README (Which kernels run by default).")


def test_unverified_opt_in_is_read_from_the_environment():
    code = ("import miras; print([f['enabled'] for f in miras._C.build_info()['families'] if f['family'] == 'capi'][0])")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    env.pop("MIRAS_CUDA_UNVERIFIED", None)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    env["MIRAS_CUDA_UNVERIFIED"] = "1"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert off.stdout.strip() == "False" and on.stdout.strip() == "True", (off.stdout, off.stderr, on.stdout)


class _FakeC:
    def __init__(self, h):
        self.h = h
        self.__file__ = "/somewhere/_C.so"

    def build_info(self):
        return {"source_hash": self.h}


def test_stale_extension_refused(monkeypatch):
    monkeypatch.delenv("MIRAS_SKIP_SOURCE_CHECK", raising=False)
    _info.check_sources(_FakeC(_fingerprint.source_hash(ROOT)))  # current: accepted
    with pytest.raises(ImportError, match="built from other sources"):
        _info.check_sources(_FakeC("0123456789abcdef"))
    monkeypatch.setenv("MIRAS_SKIP_SOURCE_CHECK", "1")
    _info.check_sources(_FakeC("0123456789abcdef"))  # the documented escape hatch


def test_source_hash_sees_every_source_file(tmp_path):
    """A change in any C++/CUDA source changes the hash; the notes do not."""
    for d in _fingerprint.SOURCE_DIRS:
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "csrc/cuda/a.cu").write_text("x")
    (tmp_path / "csrc/cpu/b.h").write_text("y")
    (tmp_path / "csrc/cuda/NOTES.md").write_text("z")
    h0 = _fingerprint.source_hash(str(tmp_path))
    (tmp_path / "csrc/cuda/NOTES.md").write_text("zz")
    assert _fingerprint.source_hash(str(tmp_path)) == h0
    (tmp_path / "csrc/cpu/b.h").write_text("y2")
    assert _fingerprint.source_hash(str(tmp_path)) != h0
