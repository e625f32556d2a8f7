"""Distributed training with PyTorch's own engines, and sequence parallelism by state passing.

Two gloo processes on the CPU (``tests/_dist_worker.py``, launched torchrun-style on a free port,
with a deadline so that a hang fails instead of blocking CI) run a tiny float64
:class:`miras.nn.MirasLM` (Titans-style linear memory with momentum) under DDP and under FSDP2,
and a sequence split across the two ranks with the memory state (and its gradient) passed by
send/recv. Everything is compared with one process on the full batch / the unsplit sequence.

Tolerances: float64 throughout; the distributed runs differ from one process only in the order of
the reductions (the gradient all-reduce / reduce-scatter over 2 ranks; matmuls over half batches),
so the results agree to ~1e-15 relative; 1e-10 leaves room for nothing else.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import miras
import _dist_worker as W
from conftest import assert_close, rel_err

WORLD = 2
DEADLINE_S = 120  # the workers take a few seconds; a hang fails the test after this
TOL = 1e-10


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path):
    """Run the WORLD workers; return their results. Fails (never hangs) on an error or a timeout."""
    port = _free_port()
    procs, logs = [], []
    for rank in range(WORLD):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
        log = open(out / f"rank{rank}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(Path(W.__file__)), str(out)], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))

    def report(why):
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        text = ""
        for rank, log in enumerate(logs):
            log.seek(0)
            text += f"\n--- rank {rank} (exit {procs[rank].returncode}) ---\n" + log.read()[-4000:]
        pytest.fail(f"distributed workers {why}:{text}")

    deadline = time.monotonic() + DEADLINE_S
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            report("failed")
        if time.monotonic() > deadline:
            report(f"did not finish within {DEADLINE_S} s (hang?)")
        time.sleep(0.05)
    if any(p.returncode != 0 for p in procs):
        report("failed")
    for log in logs:
        log.close()
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def single_process():
    """The same model, data and optimizer on one process with the full batch."""
    torch.set_num_threads(1)
    model = W.build_lm()
    return W.train(model, list(model.named_parameters()), W.lm_batches())


def _compare_training(ranks, ref, what):
    n = len(ref["grads"])
    for s in range(n):
        # each rank's loss is the mean over its half: their mean is the full batch's loss
        loss = sum(r["losses"][s] for r in ranks) / len(ranks)
        assert_close(loss, ref["losses"][s], TOL, f"{what} loss, step {s}")
        for r, res in enumerate(ranks):
            assert res["grads"][s].keys() == ref["grads"][s].keys()
            for name, g in ref["grads"][s].items():
                assert float(g.norm()) > 0, f"{name} has no gradient: the comparison would be empty"
                assert_close(res["grads"][s][name], g, TOL, f"{what} rank {r} step {s} grad {name}")
    for r, res in enumerate(ranks):
        for name, p in ref["params"].items():
            assert_close(res["params"][name], p, TOL, f"{what} rank {r} parameter {name} after {n} steps")
    # the steps moved the parameters (so the comparison above covers the optimizer's updates)
    init = dict(W.build_lm().named_parameters())
    assert all(rel_err(ref["params"][n], init[n]) > 1e-6 for n in ref["params"])


def test_ddp_matches_single_process(dist_results, single_process):
    _compare_training([r["ddp"] for r in dist_results], single_process, "DDP")


def test_fsdp2_matches_single_process(dist_results, single_process):
    res = [r["fsdp"] for r in dist_results]
    assert all(r["sharded_params"] == len(single_process["params"]) for r in res), "fully_shard did not shard"
    _compare_training(res, single_process, "FSDP2")


# ---- sequence parallelism by state passing ---------------------------------------------------
def _unsplit(case):
    """Outputs and gradients of one memory_update call over the whole sequence."""
    args, kw, cot = case
    seg_args, seg_kw = W.segment(args, kw, 0, W.SP["T"])
    o, st = miras.memory_update(*seg_args, **seg_kw, chunk_size=W.SP["C"], output_final_state=True)
    W.segment_loss(o, cot, 0, W.SP["T"], st).backward()
    return o.detach(), st, {n: t.grad for n, t in W.leaves(seg_args, seg_kw).items()}


def _split_in_process(case, splits):
    """The same computation in segments [0, s1), [s1, s2), ...: each starts from the previous
    segment's final state (the autograd graph carries the state's gradient back)."""
    args, kw, cot = case
    bounds = [0, *splits, W.SP["T"]]
    state, outs, loss, segs = None, [], 0.0, []
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg_args, seg_kw = W.segment(args, kw, a, b)
        o, state = W.continue_from(seg_args, seg_kw, state, W.SP["C"])
        loss = loss + W.segment_loss(o, cot, a, b, state if b == W.SP["T"] else None)
        outs.append(o)
        segs.append(W.leaves(seg_args, seg_kw))
    loss.backward()
    grads = {n: torch.cat([s[n].grad for s in segs], dim=1) for n in segs[0]}
    return torch.cat(outs, dim=1).detach(), state, grads


def _compare_split(o, grads, ref, what, state=None):
    o_ref, st_ref, g_ref = ref
    assert_close(o, o_ref, TOL, f"{what}: o")
    assert grads.keys() == g_ref.keys()
    for n, g in g_ref.items():
        assert float(g.norm()) > 0
        assert_close(grads[n], g, TOL, f"{what}: d{n}")
    if state is not None:
        assert_close(state.X, st_ref.X, TOL, f"{what}: final X")
        assert_close(state.anchor, st_ref.anchor, TOL, f"{what}: final anchor")
        assert torch.equal(state.offset, st_ref.offset)


@pytest.mark.parametrize("cfg", [dict(bias="lp", retention="l2", momentum=True),
                                 dict(bias="huber", retention="kl", momentum=False),
                                 dict(bias="l2", retention="lq", momentum=True)],
                         ids=["lp-l2-mom", "huber-kl", "l2-lq-mom"])
@pytest.mark.parametrize("splits", [(16,), (21,), (8, 21, 35)], ids=["boundary", "mid-chunk", "four-segments"])
def test_state_passing_equals_unsplit(cfg, splits):
    """Segments chained by their states give the unsplit call's outputs, final state and
    gradients: on a chunk boundary by plain memory_update calls, inside a chunk by stepping to the
    next boundary first (continue_from)."""
    case = W.sp_case(**cfg)
    o, state, grads = _split_in_process(case, splits)
    _compare_split(o, grads, _unsplit(case), f"split at {splits}", state)


def test_mid_chunk_state_rules():
    """Off a chunk boundary: memory_update refuses the state (SPEC §7); dropping the anchor and
    offset runs, but restarts the chunk grid at the split — a different computation."""
    args, kw, cot = W.sp_case()
    C = W.SP["C"]
    a1, k1 = W.segment(args, kw, 0, 21)
    _, st = miras.memory_update(*a1, **k1, chunk_size=C, output_final_state=True)
    assert int(st.offset[0]) == 21 % C and not torch.equal(st.anchor, st.X)
    a2, k2 = W.segment(args, kw, 21, W.SP["T"])
    with pytest.raises(ValueError, match="offset == 0"):
        miras.memory_update(*a2, **k2, chunk_size=C, initial_state=st)
    o_regrid, _ = miras.memory_update(*a2, **k2, chunk_size=C, initial_state=miras.MemoryState(X=st.X, P=st.P))
    o_exact, _ = W.continue_from(a2, k2, st, C)
    assert rel_err(o_regrid, o_exact) > 1e-3


def test_sequence_parallel_two_ranks(dist_results):
    """Rank 0 runs the first part of every sequence, sends its final state to rank 1 (gloo
    send/recv), rank 1 runs the rest and sends the state's gradient back: outputs and input
    gradients equal the unsplit call's."""
    ref = _unsplit(W.sp_case(**W.SP_CFG))
    B, H, Dk, Dv = W.SP["B"], W.SP["H"], W.SP["Dk"], W.SP["Dv"]
    for split in W.SP_SPLITS:
        parts = [r["sp"][split] for r in dist_results]
        assert [p["range"] for p in parts] == [(0, split), (split, W.SP["T"])]
        o = torch.cat([p["o"] for p in parts], dim=1)
        grads = {n: torch.cat([p["grads"][n] for p in parts], dim=1) for n in parts[0]["grads"]}
        _compare_split(o, grads, ref, f"2 ranks, split at {split}")
        # bytes per hop: X and P (float64 here), plus the anchor when the split is inside a chunk
        n_states = 2 + (split % W.SP["C"] != 0)
        assert parts[0]["bytes_sent"] == n_states * B * H * Dk * Dv * 8


@pytest.mark.parametrize("split", [16, 21], ids=["boundary", "mid-chunk"])
def test_layer_state_passing_equals_unsplit(split):
    """A whole layer (projections, short convolution, memory) split by passing its cache (the
    convolution's last inputs and the memory state): outputs and the gradients of the input and
    of every parameter equal the unsplit forward's."""
    torch.manual_seed(3)
    m = miras.nn.TitansLinear(16, 2, chunk_size=8).double()
    x = torch.randn(2, W.SP["T"], 16, dtype=torch.float64)
    cot = torch.randn(2, W.SP["T"], 16, dtype=torch.float64)

    def run(parts):
        xl = x.clone().requires_grad_()
        ys, cache = [], None
        for a, b in zip(parts[:-1], parts[1:]):
            y, cache = m(xl[:, a:b], cache=cache, use_cache=True)
            ys.append(y)
        y = torch.cat(ys, dim=1)
        m.zero_grad(set_to_none=True)
        (y * cot).sum().backward()
        return y.detach(), xl.grad, {n: p.grad.clone() for n, p in m.named_parameters()}

    y_ref, gx_ref, gp_ref = run([0, W.SP["T"]])
    y, gx, gp = run([0, split, W.SP["T"]])
    assert_close(y, y_ref, TOL, "y")
    assert_close(gx, gx_ref, TOL, "dx")
    for n, g in gp_ref.items():
        assert float(g.norm()) > 0
        assert_close(gp[n], g, TOL, f"d{n}")
