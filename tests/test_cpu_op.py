"""The C++ CPU op (``miras.memory_update`` on CPU tensors) against the float64 PyTorch reference.

Ground truth: ``reference.memory_update_loop`` (SPEC §5 literally, token by token) in float64 on
the same (upcast) inputs; outputs are also compared with ``reference.memory_update_chunked``.
Checked: outputs, the final state (X, P, anchor, offset) and the gradient of every differentiable
input (q, k, v, lr, alpha, momentum, tensor delta / robust_delta / gamma, initial X and P) for a
random cotangent on o plus random cotangents on the final X and P.

Tolerances (relative, ‖a−b‖/‖b‖ over the whole tensor):
- float64: 1e-10. Both sides are float64 and run the same recurrence; only the summation order
  differs, so errors are ~1e-15 × (condition of ~40 recurrent steps). 1e-10 leaves room for that
  growth and still catches any wrong term (those show up at ≥ 1e-4).
- float32 inputs (computed in float32) vs the float64 reference: 1e-5 for outputs and states
  (float32 eps 6e-8 × accumulation over T=37 steps with D ≤ 8), 1e-4 for gradients (backward
  through ~40 steps of retention maps compounds rounding; the lq normaliser and the KL softmax
  have Jacobians with entries ≫ 1 that amplify it further). Huber "yaad": 1e-3 — its ψ jumps at
  ‖e‖ = δ and is sign-like outside, so the gradient itself is ill-conditioned: perturbing the
  float64 inputs by 1e-7 moves the float64 reference's gradients by up to ~3e-4 (measured).
  Elastic net also gets 1e-3: float32 rounding can flip a threshold decision (|z| vs γ) of one
  of the ~10^5..10^6 entries compared per run; each flip moves a gradient by ~1e-4 (measured
  once in ~50 CUDA-sized cases, where f64 perturbations showed the conditioning is otherwise 3e-7).
- float16/bfloat16 inputs (computed in float32, o rounded back to the input dtype): 2e-2 (bf16
  has 8 bits of mantissa: one rounding of o is already ~4e-3).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import (BIAS_IDS, BIAS_MODES, RETENTIONS, assert_close, cotangents, grads, leaves, loss_of,
                      make_inputs, op_kwargs, state_of, upcast)

miras = pytest.importorskip("miras")
from miras import reference as R  # noqa: E402
from miras.state import MemoryState  # noqa: E402

F64_TOL = 1e-10
F32_TOL = 1e-5
F32_GRAD_TOL = 1e-4
F32_GRAD_TOL_YAAD = 1e-3
LOW_TOL = 2e-2

SHAPE = dict(B=2, T=37, H=2, Dk=6, Dv=5)  # T = 37 is not a multiple of any tested C > 1


def _run(fn, args, kw, C, cot_seed, **extra):
    st = state_of(kw)
    o, s = fn(*args, **op_kwargs(kw), chunk_size=C, initial_state=st, output_final_state=True, **extra)
    cot = cotangents(o, s, cot_seed)
    named = leaves(args, kw)
    g = grads(loss_of(o, s, cot), named)
    return o, s, g


def _compare(o, s, g, o_ref, s_ref, g_ref, tol, grad_tol, *, T, C):
    # The inputs must keep the inner gradient descent stable, or the comparison means nothing.
    assert torch.isfinite(o_ref).all() and float(o_ref.detach().abs().max()) < 1e3, "reference diverged: fix the inputs"
    assert_close(o, o_ref, tol, "o")
    assert_close(s.X, s_ref.X, tol, "final X")
    if s_ref.P is None:
        assert s.P is None
    else:
        assert_close(s.P, s_ref.P, tol, "final P")
    assert_close(s.anchor, s_ref.anchor, tol, "final anchor")
    assert torch.equal(s.offset.cpu().long(), s_ref.offset.cpu().long()), (s.offset, s_ref.offset)
    for name, gr in g_ref.items():
        assert g[name] is not None, f"no gradient for {name}"
        assert g[name].shape == gr.shape, name
        if gr.norm() == 0:  # structurally zero (e.g. Huber "norm" outside its ball with Dv = 1):
            # the op may leave round-off there (it computes the same zero as a difference)
            assert float(g[name].abs().max()) <= 1e-12, f"grad {name} should be zero"
        else:
            assert_close(g[name], gr, grad_tol, f"grad {name}")


# ---------------------------------------------------------------------------------------------
# The full matrix in float64: bias × retention × momentum × chunk size, with gradients.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 3, 16, 64])
@pytest.mark.parametrize("momentum", [False, True], ids=["nomom", "mom"])
@pytest.mark.parametrize("retention", RETENTIONS)
@pytest.mark.parametrize("bias_mode", BIAS_MODES, ids=BIAS_IDS)
def test_cpu_f64_matrix(bias_mode, retention, momentum, chunk_size, seed):
    bias, hm = bias_mode
    # An initial state (random X0 and P0, differentiated) except for C = 16, which covers the
    # default zero state (uniform memory for KL).
    init = chunk_size != 16
    args, kw = make_inputs(**SHAPE, dtype=torch.float64, momentum=momentum, seed=seed, bias=bias,
                           huber_mode=hm, retention=retention, initial_state=init, requires_grad=True)
    o, s, g = _run(miras.memory_update, args, kw, chunk_size, seed)
    assert o.dtype == torch.float64 and s.X.dtype == torch.float64
    o_ref, s_ref, g_ref = _run(R.memory_update_loop, args, kw, chunk_size, seed)
    _compare(o, s, g, o_ref, s_ref, g_ref, F64_TOL, F64_TOL, T=SHAPE["T"], C=chunk_size)
    # The chunked reference computes the same numbers (forward).
    with torch.no_grad():
        o_ch, s_ch = R.memory_update_chunked(*args, **op_kwargs(kw), chunk_size=chunk_size,
                                             initial_state=state_of(kw), output_final_state=True)
    assert_close(o, o_ch, F64_TOL, "o vs chunked reference")
    assert_close(s.X, s_ch.X, F64_TOL, "X vs chunked reference")


# ---------------------------------------------------------------------------------------------
# float32 (a subset): every bias × retention with momentum, two chunk sizes; no-momentum on C=3.
# ---------------------------------------------------------------------------------------------
F32_CASES = ([(b, r, True, C) for b, r, C in itertools.product(range(len(BIAS_MODES)), RETENTIONS, [3, 16])]
             + [(b, r, False, 3) for b, r in itertools.product(range(len(BIAS_MODES)), RETENTIONS)])


@pytest.mark.parametrize("bi,retention,momentum,chunk_size", F32_CASES,
                         ids=[f"{BIAS_IDS[b]}-{r}-{'mom' if m else 'nomom'}-C{C}" for b, r, m, C in F32_CASES])
def test_cpu_f32_vs_f64_reference(bi, retention, momentum, chunk_size, seed):
    bias, hm = BIAS_MODES[bi]
    args, kw = make_inputs(**SHAPE, dtype=torch.float32, momentum=momentum, seed=seed, bias=bias, huber_mode=hm,
                           retention=retention, initial_state=True, requires_grad=True)
    o, s, g = _run(miras.memory_update, args, kw, chunk_size, seed)
    assert o.dtype == torch.float32 and s.X.dtype == torch.float32
    args64, kw64 = upcast(args), upcast(kw)
    o_ref, s_ref, g_ref = _run(R.memory_update_loop, args64, kw64, chunk_size, seed)
    gtol = F32_GRAD_TOL_YAAD if (bias, hm) == ("huber", "yaad") or retention == "elastic_net" else F32_GRAD_TOL
    _compare(o, s, g, o_ref, s_ref, g_ref, F32_TOL, gtol, T=SHAPE["T"], C=chunk_size)


# ---------------------------------------------------------------------------------------------
# Scalar (float) parameters and the defaults
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias_mode,retention", [(("huber", "yaad"), "elastic_net"), (("huber", "coord"), "l2"),
                                                 (("huber", "norm"), "kl"), (("robust", "yaad"), "lq"),
                                                 (("lp", "yaad"), "elastic_net")],
                         ids=["yaad-en", "coord-l2", "norm-kl", "robust-lq", "lp-en"])
def test_cpu_scalar_params(bias_mode, retention, seed):
    bias, hm = bias_mode
    args, kw = make_inputs(**SHAPE, momentum=True, seed=seed, bias=bias, huber_mode=hm, retention=retention,
                           tensor_params=False, requires_grad=True)
    extra = dict(p=2.5, q_norm=3.0, eps_q=1e-5, scale=0.7)
    o, s, g = _run(miras.memory_update, args, kw, 5, seed, **extra)
    o_ref, s_ref, g_ref = _run(R.memory_update_loop, args, kw, 5, seed, **extra)
    _compare(o, s, g, o_ref, s_ref, g_ref, F64_TOL, F64_TOL, T=SHAPE["T"], C=5)


def test_cpu_defaults_and_no_grad_path(seed):
    """Default arguments (l2/l2, C=64, scale Dk^-1/2), and the inference path (no saved states)
    gives the same numbers as the training path."""
    args, _ = make_inputs(B=2, T=70, H=2, Dk=8, Dv=4, momentum=False, seed=seed, requires_grad=True)
    o, _ = miras.memory_update(*args)
    o_ref, _ = R.memory_update_loop(*args)
    assert_close(o, o_ref, F64_TOL, "o (defaults)")
    with torch.no_grad():
        o_ng, s_ng = miras.memory_update(*args, output_final_state=True)
    assert not o_ng.requires_grad
    torch.testing.assert_close(o_ng, o.detach(), rtol=1e-13, atol=1e-13)
    _, s_ref = R.memory_update_loop(*args, output_final_state=True)
    assert_close(s_ng.X, s_ref.X, F64_TOL, "X (no grad)")
    assert_close(s_ng.anchor, s_ref.anchor, F64_TOL, "anchor (no grad)")


def test_cpu_state_continuation(seed):
    """Two calls chained through the final state (at a chunk boundary) == one call."""
    C = 4
    args, kw = make_inputs(B=2, T=24, H=2, Dk=5, Dv=3, momentum=True, seed=seed, bias="robust",
                           retention="kl")
    kw = op_kwargs(kw)
    o, s = miras.memory_update(*args, **kw, chunk_size=C, output_final_state=True)
    cut = 12
    first = [a[:, :cut] for a in args]
    second = [a[:, cut:] for a in args]
    kw1 = {k: (v[:, :cut] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    kw2 = {k: (v[:, cut:] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    o1, s1 = miras.memory_update(*first, **kw1, chunk_size=C, output_final_state=True)
    assert int(s1.offset.max()) == 0
    o2, s2 = miras.memory_update(*second, **kw2, chunk_size=C, initial_state=s1, output_final_state=True)
    assert_close(torch.cat([o1, o2], 1), o, F64_TOL, "o")
    assert_close(s2.X, s.X, F64_TOL, "X")
    assert_close(s2.P, s.P, F64_TOL, "P")


# ---------------------------------------------------------------------------------------------
# Varlen: cu_seqlens vs each segment run separately with the reference
# ---------------------------------------------------------------------------------------------
VARLEN_CONFIGS = [(("l2", "yaad"), "l2", True, 3), (("huber", "yaad"), "kl", False, 4),
                  (("robust", "yaad"), "elastic_net", True, 16), (("lp", "yaad"), "lq", True, 3),
                  (("huber", "norm"), "l2", False, 1), (("dot", "yaad"), "kl", True, 5)]
VARLEN_IDS = ["l2-l2-mom-C3", "yaad-kl-C4", "robust-en-mom-C16", "lp-lq-mom-C3", "norm-l2-C1", "dot-kl-mom-C5"]


def _segments_reference(args, kw, cu, C, dtype=torch.float64):
    """Run the reference loop on each segment alone; cat the outputs, stack the states."""
    bounds = cu.tolist()
    X0, P0 = kw.get("_X0"), kw.get("_P0")
    outs, Xs, Ps, As, offs = [], [], [], [], []
    for n in range(len(bounds) - 1):
        s0, s1 = bounds[n], bounds[n + 1]
        seg = [None if a is None else a[:, s0:s1] for a in args]
        skw = {k: (v[:, s0:s1] if isinstance(v, torch.Tensor) and v.dim() == 3 else v)
               for k, v in op_kwargs(kw).items()}
        st = None if X0 is None else MemoryState(X=X0[n:n + 1], P=None if P0 is None else P0[n:n + 1])
        if s1 == s0:  # an empty segment keeps its state (checked separately below)
            outs.append(seg[2].new_zeros(1, 0, seg[2].shape[2], seg[2].shape[3]))
            H, Dk, Dv = args[0].shape[2], args[0].shape[3], args[2].shape[3]
            X = st.X if st is not None else args[0].new_zeros(1, H, Dk, Dv)
            Xs.append(X), As.append(X), offs.append(torch.zeros(1, dtype=torch.int64))
            if args[5] is not None:
                Ps.append(st.P if st is not None and st.P is not None else torch.zeros_like(X))
            continue
        o, s = R.memory_update_loop(*seg, **skw, chunk_size=C, initial_state=st, output_final_state=True)
        outs.append(o), Xs.append(s.X), As.append(s.anchor), offs.append(s.offset)
        if s.P is not None:
            Ps.append(s.P)
    return (torch.cat(outs, 1),
            MemoryState(X=torch.cat(Xs), P=torch.cat(Ps) if Ps else None, anchor=torch.cat(As),
                        offset=torch.cat(offs)))


@pytest.mark.parametrize("cu_list", [[0, 5, 6, 20, 37], [0, 11, 11, 37], [0, 0, 1, 37]],
                         ids=["uneven-len1", "empty-middle", "empty-first-len1"])
@pytest.mark.parametrize("cfg", VARLEN_CONFIGS, ids=VARLEN_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cpu_varlen(cfg, cu_list, dtype, seed):
    (bias, hm), retention, momentum, C = cfg
    N = len(cu_list) - 1
    T = cu_list[-1]
    for cu_dtype in (torch.int32,) if dtype == torch.float32 else (torch.int64,):
        cu = torch.tensor(cu_list, dtype=cu_dtype)
        args, kw = make_inputs(B=1, T=T, H=2, Dk=5, Dv=4, dtype=dtype, momentum=momentum, seed=seed, bias=bias,
                               huber_mode=hm, retention=retention, initial_state=True, N=N, requires_grad=True)
        o, s, g = _run(miras.memory_update, args, kw, C, seed, cu_seqlens=cu)
        assert s.X.shape[0] == N and s.offset.shape == (N,)
        args64, kw64 = upcast(args), upcast(kw)

        st = state_of(kw64)
        o_ref, s_ref = _segments_reference(args64, kw64, cu, C)
        cot = cotangents(o_ref, s_ref, seed)
        named = leaves(args64, kw64)
        g_ref = grads(loss_of(o_ref, s_ref, cot), named)
        tol, gtol = (F64_TOL, F64_TOL) if dtype == torch.float64 else (F32_TOL, F32_GRAD_TOL)
        _compare(o, s, g, o_ref, s_ref, g_ref, tol, gtol, T=T, C=C)
        # Empty segments keep their initial state exactly, at a chunk boundary.
        for n in range(N):
            if cu_list[n + 1] == cu_list[n]:
                torch.testing.assert_close(s.X[n], st.X[n].to(s.X.dtype), rtol=0, atol=0)
                assert int(s.offset[n]) == 0
        # The varlen reference itself agrees with the per-segment runs.
        with torch.no_grad():
            o_rv, _ = R.memory_update_loop(*args64, **op_kwargs(kw64), chunk_size=C, initial_state=st,
                                           cu_seqlens=cu.long())
        assert_close(o_rv, o_ref, 1e-12, "varlen reference vs segments")


def test_cpu_varlen_without_initial_state_equals_batched(seed):
    """Equal-length segments packed with cu_seqlens == the batched call on [N, T/N, ...]."""
    N, L = 3, 13
    args, kw = make_inputs(B=N, T=L, H=2, Dk=4, Dv=6, momentum=True, seed=seed, bias="huber", huber_mode="coord",
                           retention="elastic_net")
    kw = op_kwargs(kw)
    o_b, s_b = miras.memory_update(*args, **kw, chunk_size=4, output_final_state=True)
    pack = lambda t: t.reshape(1, N * L, *t.shape[2:])  # noqa: E731
    cu = torch.arange(0, N * L + 1, L, dtype=torch.int64)
    kwp = {k: (pack(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    o_p, s_p = miras.memory_update(*[pack(a) for a in args], **kwp, chunk_size=4, cu_seqlens=cu,
                                   output_final_state=True)
    assert_close(o_p, pack(o_b), F64_TOL, "o")
    assert_close(s_p.X, s_b.X, F64_TOL, "X")
    assert_close(s_p.P, s_b.P, F64_TOL, "P")
    assert_close(s_p.anchor, s_b.anchor, F64_TOL, "anchor")
    assert torch.equal(s_p.offset.long(), s_b.offset.long())


# ---------------------------------------------------------------------------------------------
# float16 / bfloat16 CPU inputs (computed in float32)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("cfg", [(("l2", "yaad"), "l2", True), (("huber", "yaad"), "kl", False),
                                 (("lp", "yaad"), "lq", True), (("robust", "yaad"), "elastic_net", True)],
                         ids=["l2-l2-mom", "yaad-kl", "lp-lq-mom", "robust-en-mom"])
def test_cpu_low_precision(cfg, dtype, seed):
    (bias, hm), retention, momentum = cfg
    args, kw = make_inputs(B=2, T=29, H=2, Dk=8, Dv=8, dtype=dtype, momentum=momentum, seed=seed, bias=bias,
                           huber_mode=hm, retention=retention, initial_state=True, requires_grad=True)
    o, s, g = _run(miras.memory_update, args, kw, 8, seed)
    assert o.dtype == dtype
    assert s.X.dtype == torch.float32  # states are float32 (SPEC §1)
    for name, t in leaves(args, kw):
        assert g[name].dtype == t.dtype, f"grad {name} has dtype {g[name].dtype}, input {t.dtype}"
    args64, kw64 = upcast(args), upcast(kw)
    o_ref, s_ref, g_ref = _run(R.memory_update_loop, args64, kw64, 8, seed)
    _compare(o, s, g, o_ref, s_ref, g_ref, LOW_TOL, LOW_TOL, T=29, C=8)


def test_cpu_output_depends_on_every_input(seed):
    """Sanity of the comparisons above: perturbing any input changes the op's output."""
    args, kw = make_inputs(B=1, T=9, H=1, Dk=4, Dv=3, momentum=True, seed=seed, bias="robust",
                           retention="elastic_net")
    base, _ = miras.memory_update(*args, **op_kwargs(kw), chunk_size=2)
    for i, name in enumerate(["q", "k", "v", "lr", "alpha", "momentum"]):
        pert = list(args)
        pert[i] = args[i] * 0.9 if name != "alpha" else args[i] * 0.99
        o, _ = miras.memory_update(*pert, **op_kwargs(kw), chunk_size=2)
        assert (o - base).abs().max() > 1e-8, f"output does not depend on {name}"


# ---------------------------------------------------------------------------------------------
# Edge cases and semantics that need no reference
# ---------------------------------------------------------------------------------------------
def test_cpu_zero_momentum_equals_no_momentum(seed):
    """β ≡ 0 is plain gradient descent (SPEC §4: P_t = −η G_t = U_t)."""
    args, kw = make_inputs(B=2, T=19, H=2, Dk=5, Dv=4, momentum=True, seed=seed, bias="huber", huber_mode="norm",
                           retention="lq", requires_grad=True)
    q, k, v, lr, alpha, _ = args
    zero = torch.zeros_like(lr, requires_grad=True)
    o0, s0 = miras.memory_update(q, k, v, lr, alpha, zero, **op_kwargs(kw), chunk_size=4, output_final_state=True)
    o1, s1 = miras.memory_update(q, k, v, lr, alpha, None, **op_kwargs(kw), chunk_size=4, output_final_state=True)
    assert_close(o0, o1, F64_TOL, "o")
    assert_close(s0.X, s1.X, F64_TOL, "X")
    # the gradient w.r.t. momentum at β = 0 is finite and matches the reference
    g, = torch.autograd.grad(o0.sum(), [zero])
    o_r, _ = R.memory_update_loop(q, k, v, lr, alpha, zero, **op_kwargs(kw), chunk_size=4)
    g_r, = torch.autograd.grad(o_r.sum(), [zero])
    assert_close(g, g_r, F64_TOL, "grad momentum at 0")


def test_cpu_lr_zero_alpha_one_keeps_state(seed):
    """lr = 0 and alpha = 1: the memory never changes and every output reads the initial state
    (for the map-based retentions too: W = φ(X0))."""
    for retention in RETENTIONS:
        args, kw = make_inputs(B=1, T=7, H=2, Dk=4, Dv=3, momentum=False, seed=seed, retention=retention,
                               initial_state=True)  # (a momentum state would keep moving X)
        q, k, v, lr, alpha, mom = args
        st = state_of(kw)
        kwo = op_kwargs(kw)
        if retention == "elastic_net":
            kwo["gamma"] = 0.0  # the threshold would still shrink X0
        o, s = miras.memory_update(q, k, v, torch.zeros_like(lr), torch.ones_like(alpha), mom, **kwo,
                                   chunk_size=3, initial_state=st, output_final_state=True)
        torch.testing.assert_close(s.X, st.X, rtol=0, atol=1e-15)
        # o_t = scale · q_t φ(X0), computed through the reference's read map at the first token
        o_ref, _ = R.memory_update_loop(q, k, v, torch.zeros_like(lr), torch.ones_like(alpha), mom, **kwo,
                                        chunk_size=3, initial_state=st)
        assert_close(o, o_ref, F64_TOL, f"o ({retention})")
        assert (o[:, 0] - o[:, 1]).abs().max() > 1e-6  # different queries read different values


def test_cpu_non_contiguous_inputs(seed):
    args, kw = make_inputs(B=2, T=15, H=3, Dk=4, Dv=5, momentum=True, seed=seed, bias="robust", retention="kl")
    o, _ = miras.memory_update(*args, **op_kwargs(kw), chunk_size=4)

    def nc(t):  # same values, non-contiguous layout ([.., T, H, ..] stored as [.., H, T, ..])
        if t is None:
            return None
        y = t.transpose(1, 2).contiguous().transpose(1, 2)
        assert not y.is_contiguous()
        return y

    kwn = {k_: (nc(v_) if isinstance(v_, torch.Tensor) else v_) for k_, v_ in op_kwargs(kw).items()}
    o_nc, _ = miras.memory_update(*[nc(a) for a in args], **kwn, chunk_size=4)
    torch.testing.assert_close(o_nc, o, rtol=0, atol=0)


def test_cpu_empty_sequence(seed):
    """T = 0: no output tokens, the state (X, P, anchor) passes through unchanged (no crash)."""
    args, kw = make_inputs(B=2, T=0, H=2, Dk=4, Dv=3, momentum=True, seed=seed, initial_state=True)
    st = state_of(kw)
    o, s = miras.memory_update(*args, chunk_size=4, initial_state=st, output_final_state=True)
    assert o.shape == (2, 0, 2, 3)
    torch.testing.assert_close(s.X, st.X, rtol=0, atol=0)
    torch.testing.assert_close(s.anchor, st.X, rtol=0, atol=0)
    torch.testing.assert_close(s.P, st.P, rtol=0, atol=0)


def test_cpu_presets(seed):
    """moneta / yaad / memora / titans are memory_update at the paper's points of the design space."""
    args, kw = make_inputs(B=1, T=20, H=2, Dk=6, Dv=4, momentum=True, seed=seed, bias="lp")
    q, k, v, lr, alpha, mom = args
    pairs = [
        (miras.moneta(q, k, v, lr, alpha, chunk_size=8),
         miras.memory_update(q, k, v, lr, alpha, bias="lp", retention="lq", p=3.0, q_norm=4.0, chunk_size=8)),
        (miras.yaad(q, k, v, lr, alpha, delta=0.7, chunk_size=8),
         miras.memory_update(q, k, v, lr, alpha, bias="huber", huber_mode="yaad", delta=0.7, chunk_size=8)),
        (miras.memora(q, k, v, lr, alpha, chunk_size=8),
         miras.memory_update(q, k, v, lr, alpha, bias="l2", retention="kl", chunk_size=8)),
        (miras.titans(q, k, v, lr, alpha, mom, chunk_size=8),
         miras.memory_update(q, k, v, lr, alpha, mom, bias="l2", retention="l2", chunk_size=8)),
    ]
    outs = []
    for (o_p, _), (o_u, _) in pairs:
        torch.testing.assert_close(o_p, o_u, rtol=0, atol=0)
        outs.append(o_p)
    for i in range(len(outs)):  # the four presets are different layers
        for j in range(i):
            assert (outs[i] - outs[j]).abs().max() > 1e-6
    with pytest.raises(ValueError, match="momentum"):
        miras.titans(q, k, v, lr, alpha, None)


def test_cpu_scale(seed):
    """scale multiplies the queries before the read (SPEC §1): o is linear in q for l2 retention."""
    args, _ = make_inputs(B=1, T=10, H=1, Dk=4, Dv=3, momentum=False, seed=seed)
    o1, _ = miras.memory_update(*args, scale=1.0, chunk_size=4)
    o2, _ = miras.memory_update(*args, scale=2.5, chunk_size=4)
    od, _ = miras.memory_update(*args, chunk_size=4)  # default Dk^-1/2 = 0.5
    assert_close(o2, 2.5 * o1, 1e-13, "scale 2.5")
    assert_close(od, 0.5 * o1, 1e-13, "default scale")


# ---------------------------------------------------------------------------------------------
# Random shapes and configurations (hypothesis): odd sizes, T < C, Dk = 1, Dv = 1, ...
# ---------------------------------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(B=st.integers(1, 3), T=st.integers(1, 23), H=st.integers(1, 3), Dk=st.integers(1, 9), Dv=st.integers(1, 9),
       C=st.integers(1, 30), bi=st.integers(0, len(BIAS_MODES) - 1), retention=st.sampled_from(RETENTIONS),
       momentum=st.booleans(), init=st.booleans(), tensor_params=st.booleans(), seed=st.integers(0, 2**30))
def test_cpu_random_configs(B, T, H, Dk, Dv, C, bi, retention, momentum, init, tensor_params, seed):
    bias, hm = BIAS_MODES[bi]
    args, kw = make_inputs(B=B, T=T, H=H, Dk=Dk, Dv=Dv, momentum=momentum, seed=seed, bias=bias, huber_mode=hm,
                           retention=retention, tensor_params=tensor_params, initial_state=init,
                           requires_grad=True)
    o, s, g = _run(miras.memory_update, args, kw, C, seed)
    o_ref, s_ref, g_ref = _run(R.memory_update_loop, args, kw, C, seed)
    # Gradients: 1e-8. Tiny shapes (Dv = 1) can leave a gradient made of one ill-conditioned term:
    # Yaad's ∂ψ/∂e = ε/(e² + ε)^{3/2} outside the ball, ~1e-7 for |e| ~ 2, which any formula
    # with a cancellation (1 − e²/(e² + ε)) gets to ~1e-16·e²/ε ≈ 1e-9 relative.
    _compare(o, s, g, o_ref, s_ref, g_ref, F64_TOL, 1e-8, T=T, C=C)
