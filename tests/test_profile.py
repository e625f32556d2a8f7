"""Profiler visibility of the CPU backend (README "Profiling").

Every CPU backend call sits in a torch.profiler range named like the CUDA backend's NVTX ranges
(csrc/core/names.h): ``miras.chunk_fwd[cpu_scan avx2 bias=lp ret=l2 mom C=8 dk=8 dv=6 f32]``, nested
inside the dispatcher's ``miras::chunk_fwd`` op event. ``bench/profile.py`` prints the time table
and writes a Chrome trace that contains these ranges.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import miras
from conftest import make_inputs, op_kwargs

ROOT = Path(__file__).resolve().parents[1]
ISAS = ("portable", "avx2", "avx512")
_NAME = re.compile(r"^miras\.(chunk_fwd|chunk_bwd)\[(cpu_scan|cpu_l2_dual) (\w+) bias=(\w+) ret=(\w+)( mom)? "
                   r"C=(\d+) dk=(\d+) dv=(\d+) (f32|f64)\]$")


def _trace_events(prof, tmp_path):
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    return [e for e in events if e.get("ph") == "X"]


@pytest.mark.parametrize("bias,huber_mode,retention,momentum,dtype", [
    ("lp", "yaad", "l2", True, torch.float32),
    ("huber", "coord", "kl", False, torch.float64),
    ("dot", "yaad", "elastic_net", True, torch.float32),
])
def test_cpu_ranges_name_the_variant(bias, huber_mode, retention, momentum, dtype, seed, tmp_path):
    C, Dk, Dv = 8, 8, 6
    args, kw = make_inputs(B=2, T=19, H=2, Dk=Dk, Dv=Dv, dtype=dtype, momentum=momentum, seed=seed, bias=bias,
                           retention=retention, huber_mode=huber_mode, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        o, _ = miras.memory_update(*args, **op_kwargs(kw), chunk_size=C)
        o.square().sum().backward()
    events = _trace_events(prof, tmp_path)
    ops = {n: [e for e in events if e["name"] == f"miras::{n}"] for n in ("chunk_fwd", "chunk_bwd")}
    ranges = [e for e in events if e["name"].startswith("miras.chunk_")]
    assert len(ranges) == 2, [e["name"] for e in ranges]
    bias_name = f"huber_{huber_mode}" if bias == "huber" else bias
    for r in ranges:
        m = _NAME.match(r["name"])
        assert m, f"unexpected range name {r['name']!r}"
        op, family, isa, b, ret, mom, c, dk, dv, dt = m.groups()
        assert (b, ret, bool(mom), int(c), int(dk), int(dv)) == (bias_name, retention, momentum, C, Dk, Dv)
        assert dt == ("f64" if dtype == torch.float64 else "f32")
        assert isa in ISAS
        # the forward is the per-token scan; the backward of retention l2 is the dual form
        want = "cpu_l2_dual" if (op == "chunk_bwd" and retention == "l2"
                                 and os.environ.get("MIRAS_CPU_L2_BWD") != "scan") else "cpu_scan"
        assert family == want, r["name"]
        # nested inside the dispatcher's op event (same thread, inside its time span)
        outer = ops[op]
        assert len(outer) == 1
        assert outer[0]["tid"] == r["tid"]
        assert outer[0]["ts"] <= r["ts"] and r["ts"] + r["dur"] <= outer[0]["ts"] + outer[0]["dur"] + 1e-3


def test_memory_step_has_a_range(seed, tmp_path):
    args, kw = make_inputs(B=2, T=1, H=2, Dk=4, Dv=4, dtype=torch.float32, momentum=False, seed=seed)
    q, k, v, lr, alpha, _ = (a[:, 0] if a is not None else None for a in args)
    state = miras.MemoryState(X=torch.zeros(2, 2, 4, 4))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        miras.memory_step(q, k, v, lr, alpha, state=state, chunk_size=16)
    names = [e["name"] for e in _trace_events(prof, tmp_path) if e["name"].startswith("miras.chunk_")]
    # the step is the chunked op over one token with a separate anchor: chunk size 1 in the op
    assert len(names) == 1 and re.match(r"miras\.chunk_fwd\[cpu_scan \w+ bias=l2 ret=l2 C=1 dk=4 dv=4 f32\]$",
                                        names[0]), names


def test_bench_profile_script_writes_a_trace(tmp_path):
    """bench/profile.py on the CPU: the table and a Chrome trace of the training steps. With
    MIRAS_CPU_ISA=portable and MIRAS_CPU_L2_BWD=scan the range names follow the dispatch."""
    trace = tmp_path / "step.json"
    env = dict(os.environ, MIRAS_CPU_ISA="portable", MIRAS_CPU_L2_BWD="scan", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "profile.py"), "--shape", "1,48,2,16", "--chunk", "16",
                        "--momentum", "--steps", "2", "--trace", str(trace)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    fwd = "miras.chunk_fwd[cpu_scan portable bias=lp ret=l2 mom C=16 dk=16 dv=16 f32]"
    bwd = "miras.chunk_bwd[cpu_scan portable bias=lp ret=l2 mom C=16 dk=16 dv=16 f32]"
    assert fwd in r.stdout and bwd in r.stdout, r.stdout
    events = json.loads(trace.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = [e.get("name") for e in events]
    assert names.count(fwd) == 2 and names.count(bwd) == 2
    assert "miras.profile.step[0]" in names and "miras.profile.step[1]" in names


def test_mlp_memory_ranges_name_the_variant(seed, tmp_path):
    """memory='mlp' on the CPU: forward and backward ranges named like the linear ones."""
    from test_mlp import call, mlp_inputs

    args, kw, extra = mlp_inputs(seed, B=2, T=9, H=2, Dk=6, expansion=2, dtype=torch.float32, bias="lp",
                                 retention="kl")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        o, _ = call(miras.memory_update, args, kw, extra, 4)
        o.square().sum().backward()
    names = sorted(e["name"] for e in _trace_events(prof, tmp_path) if e["name"].startswith("miras.mlp_chunk_"))
    pat = r"miras\.mlp_chunk_{}\[cpu_mlp_scan (avx2|portable) bias=lp ret=kl mom C=4 dk=6 dv=6 f32\]$"
    # T = 9 is not a multiple of C = 4 and the final state is wanted with gradients: the call splits at
    # the last chunk boundary (ops.py), so two forward and two backward calls, each in its own range
    fwd = [n for n in names if re.match(pat.format("fwd"), n)]
    bwd = [n for n in names if re.match(pat.format("bwd"), n)]
    assert len(fwd) == len(bwd) == 2 and len(names) == 4, names
