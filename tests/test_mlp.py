"""The MLP memory (``memory="mlp"``, SPEC §6) on the CPU: the C++ op against the float64 reference.

Ground truth: ``reference.memory_update_loop`` (SPEC §5 token by token) in float64 on the same
(upcast) inputs. Checked: outputs, the final state (W1, W2, P1, P2, anchors, offset) and the
gradient of every differentiable input (q, k, v, lr, alpha, momentum, tensor delta /
robust_delta / gamma, ln_weight, ln_bias, initial W1, W2, P1, P2) for random cotangents on o and
on the final W1, W2 (and P1, P2).

- the whole bias × retention × momentum matrix in float64; chunk sizes 1, 3, 16 and > T rotate
  over it (each size meets 14 variants), expansion 2..4, with and without the LayerNorm affine;
- float32 (computed in float32) and bfloat16 inputs (computed in float32, o in bfloat16);
- varlen with empty and length-1 segments; two calls == one call (state continuation);
- prefill with the chunked op then ``memory_step`` per token == the chunked op over everything;
  the step op against the reference's step from a mid-chunk state (gradients too, anchors included);
- gradcheck (float64), ``torch.library.opcheck`` of both ops, ``torch.compile(fullgraph=True)``;
- bad input: clear ``ValueError``s naming the argument.

Tolerances (relative, ‖a−b‖/‖b‖): float64 1e-10 as in test_cpu_op.py (same recurrence, other
summation order). Huber "yaad" gradients in float64: 1e-8 — ψ = δ e/√(e²+ε) outside the ball has
∂ψ/∂e up to δ/√ε (1000δ at ε = 1e-6), and behind the MLP's LayerNorm that shows: perturbing v by
1e-12 moved the float64 reference's own gradients by 9e-9 (measured, T=13, Dk=4, kl retention).
float32: 1e-5 outputs/states, 1e-4 gradients; 1e-3 for huber yaad and elastic net (the reasons of
test_cpu_op.py: an ill-conditioned ψ, and thresholds that float32 rounding can flip) — or, where the
float32 reference itself (the same inputs, PyTorch's float32 arithmetic) is further off the float64
one, FLOOR_FACTOR = 5 times its error. The MLP memory is less well conditioned than the linear one
(its LayerNorm divides by σ(u)): the float32 reference is off by up to 8e-5 (states) and 1.1e-3
(gradients) on these inputs, and ours by 0.3-5x as much (measured over the F32_CASES seeds).
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import BIAS_IDS, BIAS_MODES, RETENTIONS, assert_close, assert_compiled_matches, make_inputs, op_cfg, op_kwargs, rel_err

miras = pytest.importorskip("miras")
from miras import reference as R  # noqa: E402
from miras.state import MemoryState  # noqa: E402

F64 = torch.float64
F64_TOL = 1e-10
F64_GRAD_TOL_YAAD = 1e-8
F32_TOL = 1e-5
F32_GRAD_TOL = 1e-4
F32_GRAD_TOL_LOOSE = 1e-3
FLOOR_FACTOR = 5
CHUNKS = [1, 3, 16, 64]  # 64 > T


def mlp_inputs(seed, *, B=2, T=13, H=2, Dk=8, expansion=2, dtype=F64, momentum=True, bias="l2", huber_mode="yaad",
               retention="l2", ln="wb", N=None, requires_grad=True, init_momentum=True):
    """Random inputs of one ``memory_update(memory="mlp")`` call: ``(args, kw, extra)``.

    ``args = [q, k, v, lr, alpha, momentum]``; ``kw`` the bias/retention keywords (tensor
    parameters); ``extra`` holds ``W`` (W1, W2), ``P`` (P1, P2) or None, ``ln_weight``, ``ln_bias``
    (``ln`` picks which: "wb", "w", "b" or ""), ``expansion``. All generated in float64, then cast.
    """
    args, kw = make_inputs(B=B, T=T, H=H, Dk=Dk, Dv=Dk, dtype=dtype, momentum=momentum, seed=seed, bias=bias,
                           huber_mode=huber_mode, retention=retention, requires_grad=requires_grad)
    g = torch.Generator().manual_seed(int(seed) + 104729)
    n = B if N is None else N
    Dh = expansion * Dk

    def r(*s, scale=1.0):
        t = (scale * torch.randn(*s, generator=g, dtype=F64)).to(dtype)
        return t.requires_grad_(requires_grad)

    extra = dict(expansion=expansion)
    # weights at fan-in scale; KL logits at unit scale (as miras.nn does): near-uniform softmax columns
    # would make u = a W2 almost constant across its entries, and its LayerNorm ill-conditioned
    s1, s2 = (1.0, 1.0) if retention == "kl" else (1 / math.sqrt(Dk), 1 / math.sqrt(Dh))
    extra["W"] = (r(n, H, Dk, Dh, scale=s1), r(n, H, Dh, Dk, scale=s2))
    extra["P"] = (r(n, H, Dk, Dh, scale=0.05), r(n, H, Dh, Dk, scale=0.05)) if (momentum and init_momentum) else None
    w = (1.0 + 0.3 * torch.randn(H, Dk, generator=g, dtype=F64)).to(dtype).requires_grad_(requires_grad)
    b = r(H, Dk, scale=0.2)
    extra["ln_weight"] = w if "w" in ln else None
    extra["ln_bias"] = b if "b" in ln else None
    return args, kw, extra


def leaves(args, kw, extra):
    """Every differentiable input: (name, tensor) pairs."""
    out = [(n, t) for n, t in zip(["q", "k", "v", "lr", "alpha", "momentum"], args) if isinstance(t, torch.Tensor)]
    out += [(n, kw[n]) for n in ("delta", "robust_delta", "gamma") if isinstance(kw.get(n), torch.Tensor)]
    out += [("W1", extra["W"][0]), ("W2", extra["W"][1])]
    if extra["P"] is not None:
        out += [("P1", extra["P"][0]), ("P2", extra["P"][1])]
    out += [(n, extra[n]) for n in ("ln_weight", "ln_bias") if extra[n] is not None]
    return out


def call(fn, args, kw, extra, C, *, state=None, **over):
    st = state if state is not None else MemoryState(X=extra["W"], P=extra["P"])
    return fn(*args, **op_kwargs(kw), memory="mlp", chunk_size=C, initial_state=st, output_final_state=True,
              ln_weight=extra["ln_weight"], ln_bias=extra["ln_bias"], expansion=extra["expansion"], **over)


def state_loss(o, s, seed):
    """⟨o, dO⟩ + Σ⟨final matrices, random cotangents⟩ (cotangents generated in float64 from seed)."""
    g = torch.Generator().manual_seed(int(seed) + 7919)
    mats = [o] + list(s.X) + (list(s.P) if s.P is not None else [])
    return sum((m.to(F64) * torch.randn(tuple(m.shape), generator=g, dtype=F64)).sum() for m in mats)


def run(fn, args, kw, extra, C, seed, **over):
    o, s = call(fn, args, kw, extra, C, **over)
    named = [(n, t) for n, t in leaves(args, kw, extra) if t.requires_grad]
    gs = torch.autograd.grad(state_loss(o, s, seed), [t for _, t in named], allow_unused=True)
    return o, s, {n: g for (n, _), g in zip(named, gs)}


def upcast(x):
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        y = x.detach().to(F64)
        return y.requires_grad_(x.requires_grad) if x.is_floating_point() else y
    if isinstance(x, (list, tuple)):
        return type(x)(upcast(t) for t in x)
    if isinstance(x, dict):
        return {k: upcast(v) for k, v in x.items()}
    return x


def compare(ours, ref, tol, grad_tol, floor=None):
    """ours vs ref (output, final state, gradients). With ``floor`` (the same reference run in ours'
    precision) each quantity may also be off by FLOOR_FACTOR times the reference's own rounding error."""
    (o, s, g), (o_r, s_r, g_r) = ours, ref
    assert torch.isfinite(o_r).all() and float(o_r.detach().abs().max()) < 1e3, "reference diverged: fix the inputs"

    def check(a, b, t, what, pick):
        if floor is not None:
            t = max(t, FLOOR_FACTOR * rel_err(pick(floor), b))
        assert_close(a, b, t, what)

    check(o, o_r, tol, "o", lambda f: f[0])
    for name in ("X", "anchor") + (("P",) if s_r.P is not None else ()):
        a, b = getattr(s, name), getattr(s_r, name)
        assert isinstance(a, tuple) and len(a) == 2
        for m in range(2):
            check(a[m], b[m], tol, f"final {name}[{m}]", lambda f, name=name, m=m: getattr(f[1], name)[m])
    if s_r.P is None:
        assert s.P is None
    assert torch.equal(s.offset.long(), s_r.offset.long()), (s.offset, s_r.offset)
    assert set(g) == set(g_r)
    for name, gr in g_r.items():
        assert g[name] is not None and g[name].shape == gr.shape, name
        assert float(gr.norm()) > 0, f"reference gradient of {name} is zero: the test would not see a bug"
        check(g[name], gr, grad_tol, f"grad {name}", lambda f, name=name: f[2][name])


# ---------------------------------------------------------------------------------------------
# float64: every bias × retention × momentum; chunk size, T, expansion and LN affine rotate
# ---------------------------------------------------------------------------------------------
MATRIX = [(bi, r, m) for bi in range(len(BIAS_MODES)) for r in RETENTIONS for m in (False, True)]


@pytest.mark.parametrize("bi,retention,momentum", MATRIX,
                         ids=[f"{BIAS_IDS[b]}-{r}-{'mom' if m else 'nomom'}" for b, r, m in MATRIX])
def test_mlp_f64_matrix(bi, retention, momentum, seed):
    i = MATRIX.index((bi, retention, momentum))
    C = CHUNKS[(i // 2) % 4]            # each chunk size meets every bias and both momentum settings
    T = 13 + (i % 5)                    # 13..17: never a multiple of C = 3 or 16 for every case
    expansion = 2 + i % 3
    ln = ["wb", "wb", "w", "b", ""][i % 5]
    bias, hm = BIAS_MODES[bi]
    args, kw, extra = mlp_inputs(seed, T=T, expansion=expansion, momentum=momentum, bias=bias, huber_mode=hm,
                                 retention=retention, ln=ln, init_momentum=i % 4 != 1)
    ours = run(miras.memory_update, args, kw, extra, C, seed)
    assert ours[0].dtype == F64 and ours[1].X[0].dtype == F64
    ref = run(R.memory_update_loop, args, kw, extra, C, seed)
    grad_tol = F64_GRAD_TOL_YAAD if (bias, hm) == ("huber", "yaad") else F64_TOL
    compare(ours, ref, F64_TOL, grad_tol)


# ---------------------------------------------------------------------------------------------
# float32 and bfloat16
# ---------------------------------------------------------------------------------------------
F32_CASES = [(bi, r, bi % 2 == 0, [3, 16][(bi + j) % 2]) for bi in range(len(BIAS_MODES))
             for j, r in enumerate(RETENTIONS)]


@pytest.mark.parametrize("bi,retention,momentum,C", F32_CASES,
                         ids=[f"{BIAS_IDS[b]}-{r}-{'mom' if m else 'nomom'}-C{C}" for b, r, m, C in F32_CASES])
def test_mlp_f32_vs_f64_reference(bi, retention, momentum, C, seed):
    bias, hm = BIAS_MODES[bi]
    args, kw, extra = mlp_inputs(seed, T=17, expansion=2, dtype=torch.float32, momentum=momentum, bias=bias,
                                 huber_mode=hm, retention=retention)
    ours = run(miras.memory_update, args, kw, extra, C, seed)
    assert ours[0].dtype == torch.float32 and ours[1].X[0].dtype == torch.float32
    for name, g in ours[2].items():
        assert g.dtype == torch.float32, name
    a64, kw64, ex64 = upcast(args), upcast(kw), upcast(extra)
    ref = run(R.memory_update_loop, a64, kw64, ex64, C, seed)
    ref32 = run(R.memory_update_loop, args, kw, extra, C, seed)  # the reference's own float32 rounding
    loose = (bias, hm) == ("huber", "yaad") or retention == "elastic_net"
    compare(ours, ref, F32_TOL, F32_GRAD_TOL_LOOSE if loose else F32_GRAD_TOL, floor=ref32)


def test_mlp_bfloat16_inputs(seed):
    """bf16 q, k, v (float32 gates, states and LN affine): computed in float32, o in bf16."""
    args, kw, extra = mlp_inputs(seed, T=15, dtype=F64, bias="huber", huber_mode="norm", retention="kl",
                                 requires_grad=False)
    args = [a.to(torch.bfloat16) if i < 3 else a.float() for i, a in enumerate(args)]
    kw = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ex32 = dict(extra, W=tuple(w.float() for w in extra["W"]), P=tuple(p.float() for p in extra["P"]),
                ln_weight=extra["ln_weight"].float(), ln_bias=extra["ln_bias"].float())
    o, s = call(miras.memory_update, args, kw, ex32, 4)
    assert o.dtype == torch.bfloat16 and s.X[0].dtype == torch.float32
    o_r, s_r = call(R.memory_update_loop, upcast(args), upcast(kw), upcast(ex32), 4)
    assert_close(o, o_r, 2e-2, "o (bf16)")
    assert_close(s.X[1], s_r.X[1], 1e-4, "W2 (float32 from bf16 inputs)")


# ---------------------------------------------------------------------------------------------
# varlen, continuation, chunk size 1, empty input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C", [3, 4])
@pytest.mark.parametrize("cfg", [("huber", "coord", "lq", True), ("robust", "yaad", "elastic_net", False),
                                 ("l2", "yaad", "l2", True)], ids=["coord-lq-mom", "robust-en", "l2-l2-mom"])
def test_mlp_varlen(cfg, C, seed):
    """Packed segments with an empty and a length-1 one: each an independent sequence."""
    bias, hm, retention, momentum = cfg
    cu = torch.tensor([0, 5, 5, 6, 17], dtype=torch.int32)
    args, kw, extra = mlp_inputs(seed, B=1, T=17, N=4, momentum=momentum, bias=bias, huber_mode=hm,
                                 retention=retention)
    ours = run(miras.memory_update, args, kw, extra, C, seed, cu_seqlens=cu)
    ref = run(R.memory_update_loop, args, kw, extra, C, seed, cu_seqlens=cu)
    compare(ours, ref, F64_TOL, F64_TOL)
    assert ours[1].offset.tolist() == [5 % C, 0, 1, 11 % C]
    # the empty segment's state passes through unchanged
    assert torch.equal(ours[1].X[0][1], extra["W"][0][1]) and torch.equal(ours[1].X[1][1], extra["W"][1][1])


@pytest.mark.parametrize("retention,momentum", [("kl", True), ("l2", False)])
def test_mlp_state_continuation(retention, momentum, seed):
    """Two calls split at a chunk boundary == one call: outputs, final state and every gradient."""
    C, T, T1 = 4, 19, 8
    args, kw, extra = mlp_inputs(seed, T=T, momentum=momentum, bias="robust", retention=retention)
    o, s, g = run(miras.memory_update, args, kw, extra, C, seed)

    def head(x, a, b):  # tokens [a, b) of an input or a per-token parameter
        return x[:, a:b] if isinstance(x, torch.Tensor) else x

    def two_calls():
        a1 = [head(a, 0, T1) for a in args]
        k1 = {n: head(v, 0, T1) for n, v in kw.items()}
        o1, s1 = call(miras.memory_update, a1, k1, extra, C)
        assert torch.equal(s1.offset, torch.zeros(2, dtype=torch.int64))
        a2 = [head(a, T1, T) for a in args]
        k2 = {n: head(v, T1, T) for n, v in kw.items()}
        o2, s2 = call(miras.memory_update, a2, k2, extra, C, state=s1)
        return torch.cat([o1, o2], 1), s2

    o2, s2 = two_calls()
    named = [(n, t) for n, t in leaves(args, kw, extra)]
    g2 = torch.autograd.grad(state_loss(o2, s2, seed), [t for _, t in named])
    assert_close(o2, o, F64_TOL, "o")
    for a, b in zip(s2.X + s2.anchor, s.X + s.anchor):
        assert_close(a, b, F64_TOL, "final state")
    for (name, _), ga in zip(named, g2):
        assert_close(ga, g[name], F64_TOL, f"grad {name}")


def test_mlp_chunk1_equals_loop_and_exact_step(seed):
    """chunk_size=1 is exact online gradient descent: == reference.memory_update_loop, and == token-by-token
    memory_step(exact=True) from the initial state."""
    args, kw, extra = mlp_inputs(seed, T=9, bias="lp", retention="lq", requires_grad=False)
    o, s = call(miras.memory_update, args, kw, extra, 1)
    o_r, s_r = call(R.memory_update_loop, args, kw, extra, 1)
    assert_close(o, o_r, F64_TOL, "o")
    st = MemoryState(X=extra["W"], P=extra["P"])
    outs = []
    for t in range(9):
        tok = [a[:, t] for a in args]
        o_t, st = miras.memory_step(*tok, **{k: (v[:, t] if isinstance(v, torch.Tensor) else v)
                                             for k, v in op_kwargs(kw).items()},
                                    state=st, exact=True, memory="mlp", ln_weight=extra["ln_weight"],
                                    ln_bias=extra["ln_bias"])
        outs.append(o_t)
    assert_close(torch.stack(outs, 1), o, F64_TOL, "o (exact steps)")
    assert_close(st.X[0], s.X[0], F64_TOL, "W1 (exact steps)")


def test_mlp_no_tokens(seed):
    args, kw, extra = mlp_inputs(seed, T=0, requires_grad=True)
    o, s = call(miras.memory_update, args, kw, extra, 4)
    assert o.shape == (2, 0, 2, 8)
    assert torch.equal(s.X[0], extra["W"][0].detach()) and torch.equal(s.X[1], extra["W"][1].detach())
    g, = torch.autograd.grad(s.X[1].sum(), [extra["W"][1]])
    assert torch.equal(g, torch.ones_like(g))


# ---------------------------------------------------------------------------------------------
# memory_step
# ---------------------------------------------------------------------------------------------
def _tok(kw, t):
    return {k: (v[:, t] if isinstance(v, torch.Tensor) and v.dim() == 3 else v) for k, v in op_kwargs(kw).items()}


def _decode(step_fn, args, kw, extra, state, t0, t1, C):
    outs = []
    for t in range(t0, t1):
        o, state = step_fn(*[None if a is None else a[:, t] for a in args], state=state, chunk_size=C, memory="mlp",
                           ln_weight=extra["ln_weight"], ln_bias=extra["ln_bias"], **_tok(kw, t))
        outs.append(o)
    return torch.stack(outs, 1), state


@pytest.mark.parametrize("cfg", [("huber", "yaad", "l2", True, 4, 6), ("l2", "yaad", "kl", False, 5, 3),
                                 ("robust", "yaad", "elastic_net", True, 3, 7)],
                         ids=["yaad-l2-mom-C4", "l2-kl-C5", "robust-en-mom-C3"])
def test_mlp_prefill_then_steps_equals_full(cfg, seed):
    bias, hm, retention, momentum, C, T0 = cfg
    T = T0 + 9
    args, kw, extra = mlp_inputs(seed, T=T, momentum=momentum, bias=bias, huber_mode=hm, retention=retention)
    o_full, s_full = call(miras.memory_update, args, kw, extra, C)
    head = [None if a is None else a[:, :T0] for a in args]
    kw0 = {k: (v[:, :T0] if isinstance(v, torch.Tensor) and v.dim() == 3 else v) for k, v in kw.items()}
    o_pre, s_pre = call(miras.memory_update, head, kw0, extra, C)
    assert s_pre.offset.tolist() == [T0 % C] * 2
    o_dec, s_dec = _decode(miras.memory_step, args, kw, extra, s_pre, T0, T, C)
    assert_close(torch.cat([o_pre, o_dec], 1), o_full, F64_TOL, "o")
    for name in ("X", "anchor") + (("P",) if momentum else ()):
        for a, b in zip(getattr(s_dec, name), getattr(s_full, name)):
            assert_close(a, b, F64_TOL, f"final {name}")
    assert torch.equal(s_dec.offset, s_full.offset)
    # gradients through prefill + steps == through the full chunked op
    named = leaves(args, kw, extra)
    ts = [t for _, t in named]
    g_full = torch.autograd.grad(state_loss(o_full, s_full, seed), ts)
    g_dec = torch.autograd.grad(state_loss(torch.cat([o_pre, o_dec], 1), s_dec, seed), ts)
    for (name, _), a, b in zip(named, g_dec, g_full):
        assert_close(a, b, F64_TOL if (bias, hm) != ("huber", "yaad") else F64_GRAD_TOL_YAAD, f"grad {name}")


def test_mlp_step_vs_reference_step(seed):
    """One step from a mid-chunk state (anchor ≠ X): outputs, new state and the gradients of every input,
    the anchors included, against reference.memory_step."""
    args, kw, extra = mlp_inputs(seed, B=3, T=1, momentum=True, bias="huber", huber_mode="norm", retention="lq")
    g = torch.Generator().manual_seed(seed)
    anchor = tuple((w.detach() + 0.1 * torch.randn(w.shape, generator=g, dtype=F64)).requires_grad_(True)
                   for w in extra["W"])
    st = MemoryState(X=extra["W"], P=extra["P"], anchor=anchor, offset=torch.tensor([1, 3, 2]))
    res = []
    for fn in (miras.memory_step, R.memory_step):
        o, s = fn(*[a[:, 0] for a in args], state=st, chunk_size=4, memory="mlp", ln_weight=extra["ln_weight"],
                  ln_bias=extra["ln_bias"], **_tok(kw, 0))
        named = leaves(args, kw, extra) + [("A1", anchor[0]), ("A2", anchor[1])]
        loss = state_loss(o, s, seed) + sum((a * (i + 1)).sum() for i, a in enumerate(s.anchor))
        res.append((o, s, torch.autograd.grad(loss, [t for _, t in named]), [n for n, _ in named]))
    (o, s, gs, names), (o_r, s_r, gs_r, _) = res
    assert_close(o, o_r, F64_TOL, "o")
    assert s.offset.tolist() == [2, 0, 3] == s_r.offset.tolist()
    for a, b in zip(s.X + s.P + s.anchor, s_r.X + s_r.P + s_r.anchor):
        assert_close(a, b, F64_TOL, "state")
    for name, a, b in zip(names, gs, gs_r):
        assert float(b.norm()) > 0, name
        assert_close(a, b, F64_TOL, f"grad {name}")


# ---------------------------------------------------------------------------------------------
# autograd integration
# ---------------------------------------------------------------------------------------------
GC = dict(eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("cfg", [("robust", "yaad", "lq", True, 2, False), ("huber", "coord", "kl", False, 3, True)],
                         ids=["robust-lq-mom-C2", "coord-kl-C3-varlen"])
def test_mlp_gradcheck(cfg, seed):
    bias, hm, retention, momentum, C, varlen = cfg
    cu = torch.tensor([0, 2, 5], dtype=torch.int64) if varlen else None
    args, kw, extra = mlp_inputs(seed, B=1 if varlen else 2, T=5 if varlen else 4, H=1, Dk=2, expansion=2,
                                 momentum=momentum, bias=bias, huber_mode=hm, retention=retention, N=2)
    named = leaves(args, kw, extra)
    names = [n for n, _ in named]
    inputs = tuple(t.detach().clone().requires_grad_(True) for _, t in named)

    def f(*xs):
        d = dict(zip(names, xs))
        a = [d.get(n) for n in ("q", "k", "v", "lr", "alpha", "momentum")]
        k2 = dict(op_kwargs(kw), **{n: d[n] for n in ("delta", "robust_delta", "gamma") if n in d})
        st = MemoryState(X=(d["W1"], d["W2"]), P=(d["P1"], d["P2"]) if "P1" in d else None)
        o, s = miras.memory_update(*a, **k2, memory="mlp", chunk_size=C, initial_state=st, output_final_state=True,
                                   ln_weight=d["ln_weight"], ln_bias=d["ln_bias"], cu_seqlens=cu,
                                   check_inputs=False)
        return (o,) + s.X + (s.P if momentum else ())

    assert torch.autograd.gradcheck(f, inputs, **GC)


def _fwd_args(seed, momentum=True, anchor=False, cu=False, C=3):
    """Positional args of torch.ops.miras.mlp_chunk_fwd."""
    B, T, N = (1, 8, 3) if cu else (2, 7, 2)
    args, kw, extra = mlp_inputs(seed, B=B, T=T, H=2, Dk=3, expansion=2, momentum=momentum, bias="huber",
                                 retention="elastic_net", N=N)
    q, k, v, lr, alpha, mom = args
    W1, W2 = extra["W"]
    P1, P2 = extra["P"] if momentum else (None, None)
    A1 = A2 = None
    if anchor:
        A1 = (W1.detach() + 0.05).requires_grad_(True)
        A2 = (W2.detach() - 0.05).requires_grad_(True)
    cu_t = torch.tensor([0, 3, 3, 8], dtype=torch.int64) if cu else None
    return [q, k, v, lr, alpha, mom, kw["delta"], kw["gamma"], extra["ln_weight"], extra["ln_bias"], W1, W2, P1, P2,
            A1, A2, cu_t, *op_cfg(bias=3, retention=2, bias_param=1.0, ret_param=0.0, scale=0.7, chunk_size=C), True]


@pytest.mark.parametrize("variant", ["mom", "nomom-anchor-varlen"])
def test_mlp_opcheck_fwd(variant, seed):
    a = _fwd_args(seed, momentum=variant == "mom", anchor=variant != "mom", cu=variant != "mom")
    torch.library.opcheck(torch.ops.miras.mlp_chunk_fwd.default, tuple(a))


def test_mlp_opcheck_bwd(seed):
    a = [t.detach() if isinstance(t, torch.Tensor) else t for t in _fwd_args(seed)]
    o, W1T, W2T, P1T, P2T, A1T, A2T, cX, cP = torch.ops.miras.mlp_chunk_fwd(*a)
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (o, W1T, W2T, P1T, P2T)]
    bwd = cot + a[:17] + [cX, cP] + a[17:19]
    torch.library.opcheck(torch.ops.miras.mlp_chunk_bwd.default, tuple(bwd))
    # outputs never alias (custom-op rule), absent-input placeholders included
    a2 = list(a)
    a2[5] = a2[6] = a2[7] = a2[8] = a2[9] = a2[12] = a2[13] = None
    outs = torch.ops.miras.mlp_chunk_fwd(*a2)
    grads = torch.ops.miras.mlp_chunk_bwd(torch.ones_like(outs[0]), None, None, None, None, *a2[:17], outs[7],
                                          outs[8], *a2[17:19])
    for ts in (outs, grads):
        st = [t.untyped_storage()._cdata for t in ts]
        assert len(set(st)) == len(st)


@pytest.mark.parametrize("varlen", [False, True], ids=["batched", "varlen"])
def test_mlp_fwd_outputs_deterministic(varlen, seed):
    a = [t.detach() if isinstance(t, torch.Tensor) else t for t in _fwd_args(seed, cu=varlen)]
    r1 = torch.ops.miras.mlp_chunk_fwd(*a)
    junk = [torch.full_like(t, float("nan")) for t in r1]
    del junk
    r2 = torch.ops.miras.mlp_chunk_fwd(*a)
    for x, y in zip(r1, r2):
        assert torch.isfinite(y).all() and torch.equal(x, y)


class TinyMLPMemory(torch.nn.Module):
    def __init__(self, d_model=12, H=2, Dk=4, expansion=2):
        super().__init__()
        self.H, self.Dk = H, Dk
        self.qkv = torch.nn.Linear(d_model, 3 * H * Dk)
        self.gates = torch.nn.Linear(d_model, 3 * H)
        self.W1 = torch.nn.Parameter(torch.randn(H, Dk, expansion * Dk) / Dk ** 0.5)
        self.W2 = torch.nn.Parameter(torch.randn(H, expansion * Dk, Dk) / (expansion * Dk) ** 0.5)
        self.ln_weight = torch.nn.Parameter(torch.ones(H, Dk))
        self.ln_bias = torch.nn.Parameter(torch.zeros(H, Dk))
        self.out = torch.nn.Linear(H * Dk, d_model)

    def forward(self, x):
        B, T, _ = x.shape
        H, Dk = self.H, self.Dk
        q, k, v = self.qkv(x).view(B, T, H, 3 * Dk).split([Dk, Dk, Dk], dim=-1)
        k = torch.nn.functional.normalize(k, dim=-1)
        g = self.gates(x).view(B, T, H, 3)
        lr = 0.5 * torch.sigmoid(g[..., 0])
        alpha = 0.5 + 0.5 * torch.sigmoid(g[..., 1])
        mom = 0.9 * torch.sigmoid(g[..., 2])
        st = MemoryState(X=(self.W1.expand(B, -1, -1, -1), self.W2.expand(B, -1, -1, -1)))
        o, _ = miras.memory_update(q.contiguous(), k.contiguous(), v.contiguous(), lr, alpha, mom, memory="mlp",
                                   bias="lp", retention="kl", chunk_size=4, initial_state=st,
                                   ln_weight=self.ln_weight, ln_bias=self.ln_bias)
        return self.out(o.reshape(B, T, H * Dk))


def test_mlp_torch_compile_fullgraph(seed):
    torch.manual_seed(seed)
    assert_compiled_matches(TinyMLPMemory().double(), torch.randn(2, 10, 12, dtype=F64))


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_mlp_bad_inputs(seed):
    args, kw, extra = mlp_inputs(seed, T=5, requires_grad=False)
    W1, W2 = extra["W"]
    P = extra["P"]

    def upd(a=args, **over):
        d = dict(memory="mlp", initial_state=MemoryState(X=(W1, W2), P=P), chunk_size=4)
        d.update(over)
        return miras.memory_update(*a, **d)

    with pytest.raises(ValueError, match="needs initial_state"):
        upd(initial_state=None)
    with pytest.raises(ValueError, match="Dv == Dk"):
        upd(a=[args[0], args[1], args[2][..., :5]] + args[3:], initial_state=MemoryState(X=(W1, W2[..., :5])))
    with pytest.raises(ValueError, match=r"initial_state.X must be a pair"):
        upd(initial_state=MemoryState(X=W1))
    with pytest.raises(ValueError, match=r"initial_state.X\[1\] \(W2\) must have shape \[N, H, Dh, Dv\]"):
        upd(initial_state=MemoryState(X=(W1, W2[:, :, :-1])))
    with pytest.raises(ValueError, match=r"initial_state.X\[0\] \(W1\) must have shape"):
        upd(initial_state=MemoryState(X=(W1[:1], W2)))
    with pytest.raises(ValueError, match="expansion=3"):
        upd(expansion=3)
    with pytest.raises(ValueError, match="expansion must be an int"):
        upd(expansion=0)
    with pytest.raises(ValueError, match=r"initial_state.P\[1\] \(P2\) must have shape"):
        upd(initial_state=MemoryState(X=(W1, W2), P=(P[0], P[1][:, :1])))
    with pytest.raises(ValueError, match="momentum is None"):
        upd(a=args[:5] + [None])
    with pytest.raises(ValueError, match=r"ln_weight must have shape \[H, Dv\]"):
        upd(ln_weight=torch.ones(2, 7, dtype=F64))
    with pytest.raises(ValueError, match="ln_bias must be a"):
        upd(ln_bias=[0.0] * 8)
    with pytest.raises(ValueError, match="offset == 0"):
        upd(initial_state=MemoryState(X=(W1, W2), P=P, offset=torch.ones(2, dtype=torch.int64)))
    with pytest.raises(ValueError, match="anchor differs"):
        upd(initial_state=MemoryState(X=(W1, W2), P=P, anchor=(W1 + 1, W2)))
    with pytest.raises(ValueError, match="alpha must lie in"):
        upd(a=args[:4] + [args[4] * 0] + args[5:])
    with pytest.raises(ValueError, match="applies to memory='mlp' only"):
        miras.memory_update(*args, ln_weight=extra["ln_weight"])
    with pytest.raises(ValueError, match="applies to memory='mlp' only"):
        miras.memory_step(*[a[:, 0] for a in args], state=MemoryState(X=torch.zeros(2, 2, 8, 8, dtype=F64),
                                                                       P=torch.zeros(2, 2, 8, 8, dtype=F64)),
                          expansion=2)
    tok = [a[:, 0] for a in args]
    with pytest.raises(ValueError, match=r"state.anchor must be a pair"):
        miras.memory_step(*tok, memory="mlp", state=MemoryState(X=(W1, W2), P=P, anchor=W1))
    with pytest.raises(ValueError, match=r"state.offset must lie in"):
        miras.memory_step(*tok, memory="mlp", chunk_size=2,
                          state=MemoryState(X=(W1, W2), P=P, offset=torch.full((2,), 2, dtype=torch.int64)))
    # the op itself (direct callers) checks shapes too
    a = [t.detach() if isinstance(t, torch.Tensor) else t for t in _fwd_args(seed)]
    a[11] = a[11][:, :, :-1]
    with pytest.raises(ValueError, match="W2 must be"):
        torch.ops.miras.mlp_chunk_fwd(*a)


@pytest.mark.cuda
def test_mlp_cuda_uses_the_reference(seed):
    """On CUDA tensors memory='mlp' runs the PyTorch reference (warning once) after the same validation."""
    import miras.ops as ops

    args, kw, extra = mlp_inputs(seed, T=9, bias="robust", retention="kl", requires_grad=False)
    o_cpu, s_cpu = call(miras.memory_update, args, kw, extra, 4)
    dev = lambda x: x.cuda() if isinstance(x, torch.Tensor) else x  # noqa: E731
    ex = dict(extra, W=tuple(map(dev, extra["W"])), P=tuple(map(dev, extra["P"])),
              ln_weight=dev(extra["ln_weight"]), ln_bias=dev(extra["ln_bias"]))
    ops._WARNED.discard("mlp")
    with pytest.warns(UserWarning, match="no fused CUDA kernel"):
        o, s = call(miras.memory_update, [dev(a) for a in args], {k: dev(v) for k, v in kw.items()}, ex, 4)
    assert_close(o, o_cpu, F64_TOL, "o (CUDA reference vs CPU op)")
    assert_close(s.X[1], s_cpu.X[1], F64_TOL, "W2")


_CHECKPOINT_SCRIPT = r"""
import torch, miras
from miras import reference as R
from conftest import assert_close, make_inputs, op_kwargs, state_of
import test_mlp as M
C, T = 40, 70   # with MIRAS_CPU_SEG_KB=1 the backward keeps a checkpoint every 16 tokens: 3 segments per chunk
for retention, momentum in (("kl", True), ("elastic_net", False), ("l2", True)):
    # the linear memory (retention l2: the scan backward, MIRAS_CPU_L2_BWD=scan)
    args, kw = make_inputs(B=2, T=T, H=1, Dk=4, Dv=3, momentum=momentum, seed=5, bias="robust",
                           retention=retention, initial_state=True, requires_grad=True)
    res = []
    for fn in (miras.memory_update, R.memory_update_loop):
        o, s = fn(*args, **op_kwargs(kw), chunk_size=C, initial_state=state_of(kw), output_final_state=True)
        ts = [t for t in args + [kw["_X0"]] if t is not None]
        res.append(torch.autograd.grad((o * o).sum() + s.X.sum(), ts))
    for a, b in zip(*res):
        assert_close(a, b, 1e-10, f"linear {retention}: checkpointed backward")
    # the MLP memory
    args, kw, extra = M.mlp_inputs(7, T=T, H=1, Dk=4, momentum=momentum, bias="lp", retention=retention)
    ours = M.run(miras.memory_update, args, kw, extra, C, 11)
    ref = M.run(R.memory_update_loop, args, kw, extra, C, 11)
    M.compare(ours, ref, 1e-10, 1e-10)
print("ok")
"""


def test_backward_with_checkpoints():
    """MIRAS_CPU_SEG_KB=1 forces the backward's segment recompute (a checkpoint every 16 tokens inside a
    chunk of 40) that realistic sizes take and the small shapes above do not: linear and MLP memory,
    gradients against the reference (a fresh process: the budget is read once)."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, MIRAS_CPU_SEG_KB="1", MIRAS_CPU_L2_BWD="scan",
               PYTHONPATH=os.pathsep.join([here] + sys.path))
    r = subprocess.run([sys.executable, "-c", _CHECKPOINT_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-3000:] + r.stderr[-3000:]
