"""``miras.memory_step`` (SPEC §7): prefill + token-by-token decoding == the chunked op.

- prefill ``memory_update(output_final_state=True)`` over T0 tokens (T0 not a multiple of C, so
  the state is in the middle of a chunk: offset > 0, anchor ≠ X), then ``memory_step`` per token
  reproduces ``memory_update`` over the whole sequence: outputs and the final state;
- ``exact=True`` equals ``chunk_size=1``;
- gradients flow through ``memory_step`` (gradcheck, float64), and through prefill + steps.

Tolerances: float64 1e-10 (same recurrence, different summation order; see test_cpu_op.py),
float32 1e-5 (float32 rounding over ~30 steps).
"""
from __future__ import annotations

import pytest
import torch

from conftest import BIAS_IDS, BIAS_MODES, assert_close, make_inputs, op_kwargs, state_of

miras = pytest.importorskip("miras")
from miras import reference as R  # noqa: E402
from miras.state import MemoryState  # noqa: E402


def _tok(kw, t):
    """Per-token slice [B, H] of the tensor parameters of ``kw``."""
    return {k: (v[:, t] if isinstance(v, torch.Tensor) and v.dim() == 3 else v) for k, v in op_kwargs(kw).items()}


def _head(kw, T0):
    return {k: (v[:, :T0] if isinstance(v, torch.Tensor) and v.dim() == 3 else v) for k, v in op_kwargs(kw).items()}


def _decode(step_fn, args, kw, state, t0, t1, C, **extra):
    outs = []
    for t in range(t0, t1):
        tok = [None if a is None else a[:, t] for a in args]
        o, state = step_fn(*tok, state=state, chunk_size=C, **_tok(kw, t), **extra)
        outs.append(o)
    return torch.stack(outs, 1), state


STEP_CASES = [(("l2", "yaad"), "l2", True), (("huber", "yaad"), "l2", False), (("lp", "yaad"), "lq", True),
              (("robust", "yaad"), "kl", True), (("huber", "coord"), "elastic_net", False),
              (("dot", "yaad"), "elastic_net", True), (("huber", "norm"), "kl", False), (("l2", "yaad"), "lq", False)]
STEP_IDS = ["l2-l2-mom", "yaad-l2", "lp-lq-mom", "robust-kl-mom", "coord-en", "dot-en-mom", "norm-kl", "l2-lq"]


@pytest.mark.parametrize("C,T0", [(4, 6), (5, 13), (8, 3)], ids=["C4-T06", "C5-T13", "C8-T03"])
@pytest.mark.parametrize("cfg", STEP_CASES, ids=STEP_IDS)
def test_prefill_then_steps_equals_full(cfg, C, T0, seed):
    (bias, hm), retention, momentum = cfg
    T = T0 + 11  # crosses at least one chunk boundary while decoding
    args, kw = make_inputs(B=2, T=T, H=2, Dk=5, Dv=4, momentum=momentum, seed=seed, bias=bias, huber_mode=hm,
                           retention=retention, initial_state=True)
    st0 = state_of(kw)
    o_full, s_full = miras.memory_update(*args, **op_kwargs(kw), chunk_size=C, initial_state=st0,
                                         output_final_state=True)
    o_pre, s_pre = miras.memory_update(*[None if a is None else a[:, :T0] for a in args], **_head(kw, T0),
                                       chunk_size=C, initial_state=st0, output_final_state=True)
    assert torch.equal(s_pre.offset.long(), torch.full((2,), T0 % C, dtype=torch.long))
    if T0 % C:
        assert not torch.equal(s_pre.anchor, s_pre.X)  # mid-chunk: the anchor lags behind X
    o_dec, s_dec = _decode(miras.memory_step, args, kw, s_pre, T0, T, C)
    assert o_dec.shape == (2, T - T0, 2, 4)
    assert_close(torch.cat([o_pre, o_dec], 1), o_full, 1e-10, "o")
    assert_close(s_dec.X, s_full.X, 1e-10, "X")
    if momentum:
        assert_close(s_dec.P, s_full.P, 1e-10, "P")
    else:
        assert s_dec.P is None
    assert_close(s_dec.anchor, s_full.anchor, 1e-10, "anchor")
    assert torch.equal(s_dec.offset.long(), s_full.offset.long())
    # The reference's step agrees too (from the same prefill state).
    o_rd, s_rd = _decode(R.memory_step, args, kw, s_pre, T0, T, C)
    assert_close(o_dec, o_rd, 1e-10, "o vs reference step")
    assert_close(s_dec.X, s_rd.X, 1e-10, "X vs reference step")


def test_prefill_then_steps_float32(seed):
    C, T0, T = 4, 7, 20
    args, kw = make_inputs(B=2, T=T, H=2, Dk=8, Dv=8, dtype=torch.float32, momentum=True, seed=seed, bias="huber",
                           huber_mode="yaad", retention="kl")
    o_full, s_full = miras.memory_update(*args, **op_kwargs(kw), chunk_size=C, output_final_state=True)
    o_pre, s_pre = miras.memory_update(*[a[:, :T0] for a in args], **_head(kw, T0), chunk_size=C,
                                       output_final_state=True)
    o_dec, s_dec = _decode(miras.memory_step, args, kw, s_pre, T0, T, C)
    assert o_dec.dtype == torch.float32 and s_dec.X.dtype == torch.float32
    assert_close(torch.cat([o_pre, o_dec], 1), o_full, 1e-5, "o")
    assert_close(s_dec.X, s_full.X, 1e-5, "X")
    assert_close(s_dec.P, s_full.P, 1e-5, "P")


def test_steps_from_scratch_equal_full(seed):
    """Decoding from the zero state with steps only (no prefill) == memory_update."""
    C, T = 3, 10
    args, kw = make_inputs(B=2, T=T, H=1, Dk=4, Dv=3, momentum=True, seed=seed, bias="robust", retention="l2")
    o_full, s_full = miras.memory_update(*args, **op_kwargs(kw), chunk_size=C, output_final_state=True)
    zero = MemoryState(X=torch.zeros(2, 1, 4, 3, dtype=torch.float64),
                       P=torch.zeros(2, 1, 4, 3, dtype=torch.float64))
    o_dec, s_dec = _decode(miras.memory_step, args, kw, zero, 0, T, C)
    assert_close(o_dec, o_full, 1e-10, "o")
    assert_close(s_dec.X, s_full.X, 1e-10, "X")
    assert torch.equal(s_dec.offset.long(), s_full.offset.long())


@pytest.mark.parametrize("cfg", STEP_CASES[:5], ids=STEP_IDS[:5])
def test_exact_step_equals_chunk_size_one(cfg, seed):
    (bias, hm), retention, momentum = cfg
    T = 9
    args, kw = make_inputs(B=2, T=T, H=2, Dk=4, Dv=5, momentum=momentum, seed=seed, bias=bias, huber_mode=hm,
                           retention=retention, initial_state=True)
    st0 = state_of(kw)
    o_full, s_full = miras.memory_update(*args, **op_kwargs(kw), chunk_size=1, initial_state=st0,
                                         output_final_state=True)
    # chunk_size is ignored with exact=True: a large C would freeze the anchor otherwise.
    o_dec, s_dec = _decode(miras.memory_step, args, kw, st0, 0, T, 64, exact=True)
    assert_close(o_dec, o_full, 1e-10, "o")
    assert_close(s_dec.X, s_full.X, 1e-10, "X")
    assert_close(s_dec.anchor, s_dec.X, 0.0, "anchor == X with exact=True")
    assert int(s_dec.offset.abs().max()) == 0
    # ...and it differs from the non-exact step with a large chunk (the test can tell them apart).
    o_lag, _ = _decode(miras.memory_step, args, kw, st0, 0, T, 64)
    assert (o_lag - o_full).abs().max() > 1e-6


@pytest.mark.parametrize("cfg", [(("l2", "yaad"), "l2", True), (("huber", "yaad"), "kl", False),
                                 (("robust", "yaad"), "elastic_net", True), (("lp", "yaad"), "lq", True)],
                         ids=["l2-l2-mom", "yaad-kl", "robust-en-mom", "lp-lq-mom"])
def test_step_gradcheck(cfg, seed):
    """gradcheck of one memory_step w.r.t. the token, the gates, tensor params and the state
    (X, P and a separate anchor, offset > 0)."""
    (bias, hm), retention, momentum = cfg
    B, H, Dk, Dv = 1, 2, 3, 2
    args, kw = make_inputs(B=B, T=1, H=H, Dk=Dk, Dv=Dv, momentum=momentum, seed=seed, bias=bias, huber_mode=hm,
                           retention=retention, initial_state=True)
    g = torch.Generator().manual_seed(seed + 1)
    A = (0.3 * torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64))
    tok = [None if a is None else a[:, 0].clone().requires_grad_(True) for a in args]
    X = kw["_X0"].clone().requires_grad_(True)
    P = kw["_P0"].clone().requires_grad_(True) if momentum else None
    A.requires_grad_(True)
    pk = _tok(kw, 0)
    tensor_names = [n for n, v in pk.items() if isinstance(v, torch.Tensor)]
    for n in tensor_names:
        pk[n] = pk[n].clone().requires_grad_(True)
    names = ["q", "k", "v", "lr", "alpha"] + (["momentum"] if momentum else [])
    inputs = [t for t in tok if t is not None] + [X, A] + ([P] if momentum else []) + [pk[n] for n in tensor_names]

    def f(*xs):
        it = iter(xs)
        t = {n: next(it) for n in names}
        Xi, Ai = next(it), next(it)
        Pi = next(it) if momentum else None
        kwi = dict(pk)
        for n in tensor_names:
            kwi[n] = next(it)
        st = MemoryState(X=Xi, P=Pi, anchor=Ai, offset=torch.ones(B, dtype=torch.int64))
        o, s = miras.memory_step(t["q"], t["k"], t["v"], t["lr"], t["alpha"], t.get("momentum"), state=st,
                                 chunk_size=3, **kwi)
        return (o, s.X) + ((s.P,) if momentum else ())

    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-5)
    # The gradient w.r.t. the anchor is non-zero (the step's inner gradient is taken there).
    out = f(*inputs)
    ga, = torch.autograd.grad(out[0].sum(), [A])
    assert ga.abs().max() > 0


@pytest.mark.parametrize("momentum", [False, True], ids=["nomom", "mom"])
def test_gradients_through_prefill_and_steps(momentum, seed):
    """Backprop through prefill (ending mid-chunk) + steps == backprop through the whole op.

    Needs the prefill state's anchor (the raw state at the last chunk boundary) to carry its
    gradient: the decoded tokens' inner gradients are taken there."""
    C, T0, T = 4, 6, 11
    args, kw = make_inputs(B=1, T=T, H=2, Dk=4, Dv=3, momentum=momentum, seed=seed, bias="l2", retention="l2",
                           requires_grad=True)
    g = torch.Generator().manual_seed(seed)
    cot = torch.randn(1, T, 2, 3, generator=g, dtype=torch.float64)
    leaves_ = [a for a in args if a is not None]
    o_full, _ = miras.memory_update(*args, **op_kwargs(kw), chunk_size=C)
    g_full = torch.autograd.grad((o_full * cot).sum(), leaves_)
    o_pre, s_pre = miras.memory_update(*[None if a is None else a[:, :T0] for a in args], **_head(kw, T0),
                                       chunk_size=C, output_final_state=True)
    o_dec, _ = _decode(miras.memory_step, args, kw, s_pre, T0, T, C)
    o_chain = torch.cat([o_pre, o_dec], 1)
    assert_close(o_chain, o_full, 1e-10, "o")
    g_chain = torch.autograd.grad((o_chain * cot).sum(), leaves_)
    for name, a, b in zip(["q", "k", "v", "lr", "alpha", "momentum"], g_chain, g_full):
        assert_close(a, b, 1e-10, f"grad {name}")
