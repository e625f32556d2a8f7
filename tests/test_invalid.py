"""Invalid inputs never crash the process: every one raises a Python exception naming the argument
(issue 7). The cases (tests/invalid_cases.py) cover wrong ranks / shapes / dtypes / devices (the
meta device stands in for a second device), non-tensors, NaN / inf / out-of-range gates and
parameters, unknown choices, corrupt cu_seqlens, mismatched or mid-chunk states, empty head dims,
``memory_step`` states, and the raw registered ops ``torch.ops.miras.chunk_fwd`` / ``chunk_bwd``
called directly with bad shapes, strides, dtypes, devices and saved tensors (no Python checks in
front of the C++ glue there).

They run in a worker subprocess that evaluates many cases and reports each one, so an abort or a
segfault fails this test and names the case instead of killing the suite; after a crash the
worker restarts at the next case.

Profiles: CI 600 cases (seed 0); ``MIRAS_FUZZ=full`` 5000 cases from a random seed (printed;
``MIRAS_FUZZ_SEED`` fixes it):

    MIRAS_FUZZ=full PYTHONPATH=python python -m pytest -q tests/test_invalid.py -s
"""
from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys

import pytest

miras = pytest.importorskip("miras")

HERE = os.path.dirname(os.path.abspath(__file__))
FULL = os.environ.get("MIRAS_FUZZ", "") == "full"


def run_worker(seed: int, count: int, timeout: float = 1200.0):
    """Evaluate cases 0..count-1 in worker processes; returns (results by index, crashes)."""
    results, crashes = {}, []
    start = 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([p for p in [env.get("PYTHONPATH"), os.path.dirname(miras.__path__[0])]
                                         if p])
    while start < count:
        proc = subprocess.run([sys.executable, os.path.join(HERE, "invalid_cases.py"), str(seed), str(count),
                               str(start)], capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)
        last_started = None
        for line in proc.stdout.splitlines():
            if line.startswith("START "):
                last_started = int(line.split()[1])
            elif line.startswith("{"):
                d = json.loads(line)
                results[d["i"]] = d
        if proc.returncode == 0 and (last_started is None or last_started in results):
            break
        # the worker died (signal, abort) or exited early: the case it had started is a crash
        bad = last_started if last_started is not None else start
        if bad in results:  # died between cases (should not happen): report the next one
            bad += 1
        crashes.append({"i": bad, "returncode": proc.returncode, "stderr": proc.stderr[-2000:]})
        start = bad + 1
    return results, crashes


def test_invalid_inputs_raise_and_never_crash():
    if FULL:
        seed = int(os.environ.get("MIRAS_FUZZ_SEED", random.randrange(2 ** 31)))
        count = 5000
    else:
        seed, count = 0, 600
    print(f"\ninvalid-input fuzz: seed {seed}, {count} cases")
    results, crashes = run_worker(seed, count)
    assert not crashes, f"worker crashed on cases {crashes} (seed {seed})"
    missing = [i for i in range(count) if i not in results]
    assert not missing, f"no result for cases {missing[:20]}"
    status = collections.Counter(d["status"] for d in results.values())
    kinds = collections.Counter(d["kind"] for d in results.values())
    print(f"status counts: {dict(status)}\nby mutation: {dict(kinds)}")
    bad = [d for d in results.values() if d["status"] not in ("raised", "ok_equal")]
    assert not bad, f"{len(bad)} case(s) failed (seed {seed}): {bad[:10]}"
    assert status["raised"] >= 0.95 * count  # (the rest: valid strided / huge-chunk raw calls that must succeed)


def test_worker_reports_a_crash_and_goes_on(tmp_path, monkeypatch):
    """The harness itself: a case that kills the worker is reported as a crash, and later cases
    still run (guards against a harness that could never see a crash)."""
    import invalid_cases

    src = open(invalid_cases.__file__).read()
    line = "        res = evaluate(kind, cseed)"
    assert line in src
    crashing = src.replace(line, "        if i == 3:\n            import os; os.abort()\n" + line)
    fake = tmp_path / "invalid_cases.py"
    fake.write_text(crashing)
    monkeypatch.setattr(sys.modules[__name__], "HERE", str(tmp_path))
    results, crashes = run_worker(0, 6)
    assert [c["i"] for c in crashes] == [3]
    assert sorted(results) == [0, 1, 2, 4, 5]


def test_huge_chunk_size_is_one_chunk():
    """chunk_size up to 2^63 - 1 computes what any chunk longer than the sequence does (regression:
    (T + C - 1) / C overflowed in the glue and the op returned garbage)."""
    import torch

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 9, 2, 4, generator=g), torch.randn(2, 9, 2, 4, generator=g)
    v = torch.randn(2, 9, 2, 3, generator=g)
    lr, alpha = torch.full((2, 9, 2), 0.1), torch.full((2, 9, 2), 0.95)
    ref, sref = miras.memory_update(q, k, v, lr, alpha, chunk_size=10, output_final_state=True)
    for C in (2 ** 31 + 1, 2 ** 62, 2 ** 63 - 1):
        o, s = miras.memory_update(q, k, v, lr, alpha, chunk_size=C, output_final_state=True)
        assert torch.equal(o, ref) and torch.equal(s.X, sref.X) and torch.equal(s.offset, sref.offset)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["k", "v", "lr", "alpha", "momentum"])
def test_cuda_mixed_devices_raise(name):
    import torch

    B, T, H, D = 1, 8, 2, 16
    t = dict(q=torch.randn(B, T, H, D), k=torch.randn(B, T, H, D), v=torch.randn(B, T, H, D),
             lr=torch.full((B, T, H), 0.1), alpha=torch.full((B, T, H), 0.9), momentum=torch.full((B, T, H), 0.5))
    t = {n: (x.cuda() if n != name else x) for n, x in t.items()}
    with pytest.raises(ValueError, match=name):
        miras.memory_update(t["q"], t["k"], t["v"], t["lr"], t["alpha"], t["momentum"])
    raw = [t["q"], t["k"], t["v"], t["lr"], t["alpha"], t["momentum"]] + [None] * 6 + \
        [1, 0, 3.0, 1e-6, 1.0, 0.0, 1.0, 4.0, 1e-6, 0.25, 4, True]
    with pytest.raises(Exception, match=name):
        torch.ops.miras.chunk_fwd(*raw)


@pytest.mark.cuda
def test_cuda_unsupported_head_dim_raises():
    import torch

    q = torch.randn(1, 4, 1, 300, device="cuda")
    v = torch.randn(1, 4, 1, 8, device="cuda")
    gates = torch.full((1, 4, 1), 0.5, device="cuda")
    with pytest.raises(Exception, match="Dk|head"):
        miras.memory_update(q, q, v, gates, gates, retention="kl")
