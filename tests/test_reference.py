"""Tests of the PyTorch reference (python/miras/reference.py), CPU, float64.

- the per-token loop against a dead-simple online gradient descent written here, whose inner
  gradients come from autograd of the SPEC §3 losses (so ψ, the MLP back-propagation and the
  retention maps are checked independently);
- the chunked form against the loop over every bias × retention × momentum, chunk sizes,
  tensor-valued parameters, varlen, linear and MLP memory; their autograd gradients too;
- memory_step: prefill + token-by-token steps reproduce the full op.
"""
from __future__ import annotations

import importlib
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as Fn

ROOT = Path(__file__).resolve().parents[1]


def _load():
    """Import the reference without needing the compiled extension."""
    try:
        from miras import reference, state  # noqa: F401
        return reference, state
    except Exception:
        pass
    # Load python/miras/{state,reference}.py as a private package: no compiled code involved.
    name = "_miras_reference_under_test"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(ROOT / "python" / "miras")]
        sys.modules[name] = pkg
    return importlib.import_module(name + ".reference"), importlib.import_module(name + ".state")


R, _state = _load()
MemoryState = _state.MemoryState

DT = torch.float64
BIASES = [("dot", "yaad"), ("l2", "yaad"), ("lp", "yaad"), ("huber", "yaad"),
          ("huber", "coord"), ("huber", "norm"), ("robust", "yaad")]
RETENTIONS = ["l2", "kl", "elastic_net", "lq"]


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def make_inputs(seed, *, B=2, T=20, H=2, Dk=6, Dv=5, mom=True, memory="linear", bias="l2",
                huber_mode="yaad", tensor_params=True, init=False, expansion=2, ln=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    u = lambda lo, hi, *s: lo + (hi - lo) * torch.rand(*s, generator=g, dtype=DT)  # noqa: E731
    if memory == "mlp":
        Dv = Dk
    q = r(B, T, H, Dk)
    k = Fn.normalize(r(B, T, H, Dk), dim=-1)             # unit keys: stable inner GD
    v = r(B, T, H, Dv)
    kw = dict(lr=u(0.05, 0.5, B, T, H), alpha=u(0.8, 1.0, B, T, H),
              momentum=u(0.0, 0.9, B, T, H) if mom else None)
    extra = {}
    if bias == "huber":
        # δ around the residual norm (the residual starts near −v): both branches are taken.
        ref = v.norm(dim=-1) if huber_mode != "coord" else v.abs().mean(-1)
        extra["delta"] = u(0.4, 1.4, B, T, H) * ref if tensor_params else float(ref.median())
        extra["huber_mode"] = huber_mode
    if bias == "robust":
        extra["robust_delta"] = u(0.0, 1.0, B, T, H) if tensor_params else 0.5
    if bias == "lp":
        extra["p"] = 3.0
    extra["gamma"] = u(1e-3, 1e-2, B, T, H) if tensor_params else 3e-3
    if memory == "mlp":
        Dh = expansion * Dk
        X = (r(B, H, Dk, Dh) / math.sqrt(Dk), r(B, H, Dh, Dv) / math.sqrt(Dh))
        P = (0.1 * r(B, H, Dk, Dh), 0.1 * r(B, H, Dh, Dv)) if mom else None
        extra["initial_state"] = MemoryState(X=X, P=P)
        extra["expansion"] = expansion
        if ln:
            extra["ln_weight"] = u(0.5, 1.5, H, Dv)
            extra["ln_bias"] = 0.1 * r(H, Dv)
    elif init:
        X = 0.3 * r(B, H, Dk, Dv)
        P = 0.1 * r(B, H, Dk, Dv) if mom else None
        extra["initial_state"] = MemoryState(X=X, P=P)
    return (q, k, v), kw, extra


def call(fn, inputs, kw, extra, **over):
    d = dict(extra)
    d.update(over)
    return fn(*inputs, kw["lr"], kw["alpha"], kw["momentum"], **d)


def rel_err(a, b):
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


def as_tuple(x):
    if x is None:
        return ()
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def assert_states_close(s1, s2, tol):
    for name in ("X", "P", "anchor"):
        a, b = as_tuple(getattr(s1, name)), as_tuple(getattr(s2, name))
        assert len(a) == len(b), name
        for x, y in zip(a, b):
            assert x.shape == y.shape, name
            assert rel_err(x, y) < tol, (name, rel_err(x, y))
    assert torch.equal(s1.offset.cpu(), s2.offset.cpu()), (s1.offset, s2.offset)


# ---------------------------------------------------------------------------------------------
# an independent, dead-simple online gradient descent (SPEC §3-§6 written from the tables)
# ---------------------------------------------------------------------------------------------
def loss_fn(yhat, v, bias, huber_mode, p, eps, delta, rdelta):
    e = yhat - v
    n = e.norm()
    if bias == "dot":
        return -(yhat * v).sum()
    if bias == "l2":
        return 0.5 * (e * e).sum()
    if bias == "lp":
        return ((e * e + eps) ** (p / 2)).sum() / p
    if bias == "huber":
        if huber_mode == "yaad":
            return 0.5 * n * n if n <= delta else delta * torch.sqrt(e * e + eps).sum()
        if huber_mode == "coord":
            a = e.abs()
            return torch.where(a <= delta, 0.5 * e * e, delta * (a - delta / 2)).sum()
        return 0.5 * n * n if n <= delta else delta * (n - delta / 2)
    if bias == "robust":
        return 0.5 * (e * e).sum() + rdelta * torch.sqrt((e * e).sum() + eps)
    raise AssertionError(bias)


def naive_phi(X, retention, kl_scale, q_norm, eps_q):
    if retention == "kl":
        ex = torch.exp(X - X.max(0).values)
        return kl_scale * ex / ex.sum(0)
    if retention == "lq":
        n = torch.linalg.vector_norm(X.flatten(), ord=q_norm)
        return X / torch.clamp(n, min=eps_q) ** (q_norm - 2)
    return X


def naive(inputs, kw, extra, *, memory="linear", bias="l2", retention="l2", chunk_size=1,
          kl_scale=1.0, q_norm=4.0, eps_q=1e-6, eps=1e-6):
    q, k, v = inputs
    lr, al, mo = kw["lr"], kw["alpha"], kw["momentum"]
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    p = extra.get("p", 3.0)
    hm = extra.get("huber_mode", "yaad")
    scale = Dk ** -0.5 if memory == "linear" else 1.0

    def val(x, b, t, h, default):
        x = extra.get(x, default)
        return x[b, t, h] if torch.is_tensor(x) else x

    def mem(W, x, h):
        if memory == "linear":
            return x @ W[0]
        lw, lb = extra.get("ln_weight"), extra.get("ln_bias")
        return x + Fn.layer_norm(Fn.gelu(x @ W[0]) @ W[1], (Dv,),
                                 None if lw is None else lw[h], None if lb is None else lb[h], 1e-5)

    phi = lambda X: naive_phi(X, retention, kl_scale, q_norm, eps_q)  # noqa: E731
    o = torch.zeros(B, T, H, Dv, dtype=DT)
    init = extra.get("initial_state")
    for b in range(B):
        for h in range(H):
            if init is None:
                X = [torch.zeros(Dk, Dv, dtype=DT)]
                P = [torch.zeros(Dk, Dv, dtype=DT)]
            else:
                X = [x[b, h] for x in as_tuple(init.X)]
                P = [x[b, h] for x in as_tuple(init.P)] or [torch.zeros_like(x) for x in X]
            for t in range(T):
                if t % chunk_size == 0:
                    anchor = [x.clone() for x in X]
                Wa = [phi(x).detach().requires_grad_() for x in anchor]
                loss = loss_fn(mem(Wa, k[b, t, h], h), v[b, t, h], bias, hm, p, eps,
                               val("delta", b, t, h, 1.0), val("robust_delta", b, t, h, 0.0))
                G = torch.autograd.grad(loss, Wa, allow_unused=True)
                G = [torch.zeros_like(w) if g is None else g for w, g in zip(Wa, G)]
                for m in range(len(X)):
                    if mo is not None:
                        P[m] = mo[b, t, h] * P[m] - lr[b, t, h] * G[m]
                        U = P[m]
                    else:
                        U = -lr[b, t, h] * G[m]
                    z = al[b, t, h] * X[m] + U
                    if retention == "elastic_net":
                        z = torch.sign(z) * torch.clamp(z.abs() - val("gamma", b, t, h, 0.0), min=0)
                    X[m] = z
                o[b, t, h] = mem([phi(x) for x in X], scale * q[b, t, h], h)
    return o


NAIVE_CASES = [
    # (memory, bias, huber_mode, retention, momentum, chunk_size)
    ("linear", "l2", "yaad", "l2", False, 1),
    ("linear", "l2", "yaad", "l2", True, 3),
    ("linear", "dot", "yaad", "kl", True, 1),
    ("linear", "lp", "yaad", "lq", False, 3),
    ("linear", "huber", "yaad", "elastic_net", True, 1),
    ("linear", "huber", "coord", "kl", False, 3),
    ("linear", "huber", "norm", "lq", True, 1),
    ("linear", "robust", "yaad", "elastic_net", False, 3),
    ("mlp", "l2", "yaad", "l2", True, 1),
    ("mlp", "huber", "yaad", "kl", False, 3),
    ("mlp", "robust", "yaad", "lq", True, 2),
    ("mlp", "lp", "yaad", "elastic_net", False, 1),
]


@pytest.mark.parametrize("memory,bias,hm,retention,mom,C", NAIVE_CASES)
def test_loop_matches_naive_online_gd(memory, bias, hm, retention, mom, C):
    seed = 100 + NAIVE_CASES.index((memory, bias, hm, retention, mom, C))
    inputs, kw, extra = make_inputs(seed, B=2, T=9, H=2, Dk=4, Dv=3, mom=mom, memory=memory,
                                    bias=bias, huber_mode=hm, init=(seed % 2 == 0))
    o_ref, _ = call(R.memory_update_loop, inputs, kw, extra, memory=memory, bias=bias,
                    retention=retention, chunk_size=C)
    o_nv = naive(inputs, kw, extra, memory=memory, bias=bias, retention=retention, chunk_size=C)
    assert rel_err(o_ref, o_nv) < 1e-10


# ---------------------------------------------------------------------------------------------
# ψ against autograd of the SPEC §3 losses
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias,hm", BIASES)
def test_psi_is_loss_gradient(bias, hm):
    g = torch.Generator().manual_seed(7)
    e = torch.randn(16, 5, generator=g, dtype=DT)
    v = torch.randn(16, 5, generator=g, dtype=DT)
    n = e.norm(dim=-1)
    delta = (n.median() if hm != "coord" else e.abs().median()) * torch.ones(16, dtype=DT)
    delta = delta * (0.5 + torch.rand(16, generator=g, dtype=DT))
    rdelta = torch.rand(16, generator=g, dtype=DT)
    ps = R.psi(e, v, bias, p=3.0, eps=1e-6, delta=delta, huber_mode=hm, robust_delta=rdelta)
    for i in range(16):
        y = (e[i] + v[i]).clone().requires_grad_()
        (gr,) = torch.autograd.grad(loss_fn(y, v[i], bias, hm, 3.0, 1e-6, delta[i], rdelta[i]), y)
        assert torch.allclose(ps[i], gr, atol=1e-12), (i, ps[i], gr)


# ---------------------------------------------------------------------------------------------
# chunked == loop
# ---------------------------------------------------------------------------------------------
GRID = [(b, hm, r, m) for (b, hm) in BIASES for r in RETENTIONS for m in (False, True)]


@pytest.mark.parametrize("bias,hm,retention,mom", GRID)
def test_chunked_matches_loop_linear(bias, hm, retention, mom):
    seed = 1000 + GRID.index((bias, hm, retention, mom))
    inputs, kw, extra = make_inputs(seed, mom=mom, bias=bias, huber_mode=hm,
                                    tensor_params=(seed % 3 != 0), init=(seed % 2 == 1))
    for C in (1, 3, 16):
        o1, s1 = call(R.memory_update_loop, inputs, kw, extra, bias=bias, retention=retention,
                      chunk_size=C, output_final_state=True)
        o2, s2 = call(R.memory_update_chunked, inputs, kw, extra, bias=bias,
                      retention=retention, chunk_size=C, output_final_state=True)
        assert o1.shape == o2.shape == inputs[2].shape and o2.dtype == DT
        assert rel_err(o2, o1) < 1e-10, (C, rel_err(o2, o1))
        assert_states_close(s2, s1, 1e-10)
        assert (s1.P is None) == (not mom)
        assert torch.equal(s1.offset, torch.full((2,), 20 % C, dtype=torch.int64))


MLP_GRID = [(b, hm, r, m) for (b, hm) in [("l2", "yaad"), ("huber", "yaad"), ("robust", "yaad"),
                                           ("dot", "yaad"), ("huber", "norm"), ("lp", "yaad")]
            for r in RETENTIONS for m in (False, True)
            if b in ("l2", "huber") or m]


@pytest.mark.parametrize("bias,hm,retention,mom", MLP_GRID)
def test_chunked_matches_loop_mlp(bias, hm, retention, mom):
    seed = 2000 + MLP_GRID.index((bias, hm, retention, mom))
    inputs, kw, extra = make_inputs(seed, T=14, Dk=4, mom=mom, memory="mlp", bias=bias,
                                    huber_mode=hm, ln=(seed % 2 == 0))
    for C in ((3,) if bias != "l2" else (1, 3, 16)):
        o1, s1 = call(R.memory_update_loop, inputs, kw, extra, memory="mlp", bias=bias,
                      retention=retention, chunk_size=C, output_final_state=True)
        o2, s2 = call(R.memory_update_chunked, inputs, kw, extra, memory="mlp", bias=bias,
                      retention=retention, chunk_size=C, output_final_state=True)
        assert rel_err(o2, o1) < 1e-10, (C, rel_err(o2, o1))
        assert isinstance(s2.X, tuple) and len(s2.X) == 2
        assert_states_close(s2, s1, 1e-10)


def test_huber_and_elastic_net_branches_are_exercised():
    """The grid's inputs really cross the huber threshold both ways and zero some entries."""
    inputs, kw, extra = make_inputs(1, bias="huber", huber_mode="yaad", mom=False)
    v = inputs[2]
    frac = (v.norm(dim=-1) > extra["delta"]).double().mean().item()   # residual at X = 0 is −v
    assert 0.2 < frac < 0.8
    _, s = call(R.memory_update_chunked, inputs, kw, extra, bias="l2", retention="elastic_net",
                chunk_size=3, output_final_state=True)
    zeros = (s.X == 0).double().mean().item()
    assert 0.0 < zeros < 0.9, zeros


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("retention", ["l2", "kl"])
def test_varlen(memory, retention):
    inputs, kw, extra = make_inputs(5, B=3, T=9, mom=True, memory=memory, bias="huber",
                                    huber_mode="yaad", init=True, Dk=4)
    cu = torch.tensor([0, 9, 9, 18, 27], dtype=torch.int64)   # includes an empty segment
    # Pack: 3 sequences of 9 → one row of 27, plus an empty segment (state passes through).
    flat = lambda x: x.reshape(1, -1, *x.shape[2:])  # noqa: E731
    init = extra["initial_state"]
    st = lambda x: None if x is None else (  # noqa: E731
        tuple(torch.cat([y[:1], y[:1] * 0.5, y[1:]], 0) for y in x) if isinstance(x, tuple)
        else torch.cat([x[:1], x[:1] * 0.5, x[1:]], 0))
    vextra = dict(extra, delta=flat(extra["delta"]), gamma=flat(extra["gamma"]),
                  initial_state=MemoryState(X=st(init.X), P=st(init.P)))
    vin = tuple(flat(x) for x in inputs)
    vkw = {n: None if x is None else flat(x) for n, x in kw.items()}
    common = dict(memory=memory, retention=retention, bias="huber", chunk_size=4,
                  output_final_state=True)
    o_b, s_b = call(R.memory_update_loop, inputs, kw, extra, **common)
    o_l, s_l = call(R.memory_update_loop, vin, vkw, vextra, cu_seqlens=cu, **common)
    o_c, s_c = call(R.memory_update_chunked, vin, vkw, vextra, cu_seqlens=cu.int(), **common)
    assert rel_err(o_l, flat(o_b)) < 1e-12
    assert rel_err(o_c, o_l) < 1e-10
    assert_states_close(s_c, s_l, 1e-10)
    # segment 1 is empty: its state is the initial one; the others match the batched run
    assert s_l.offset.tolist() == [1, 0, 1, 1]
    for name in ("X", "P", "anchor"):
        for a, b, i0 in zip(as_tuple(getattr(s_l, name)), as_tuple(getattr(s_b, name)),
                            as_tuple(getattr(vextra["initial_state"], name))):
            assert rel_err(a[[0, 2, 3]], b) < 1e-12
            assert torch.equal(a[1], i0[1])


# ---------------------------------------------------------------------------------------------
# gradients: chunked vs loop (autograd, float64), and the loop against finite differences
# ---------------------------------------------------------------------------------------------
GRAD_CASES = [
    ("linear", "l2", "yaad", "l2", True),
    ("linear", "huber", "yaad", "kl", True),
    ("linear", "robust", "yaad", "elastic_net", False),
    ("linear", "lp", "yaad", "lq", True),
    ("linear", "huber", "coord", "l2", False),
    ("mlp", "l2", "yaad", "l2", True),
    ("mlp", "huber", "norm", "kl", False),
    ("mlp", "robust", "yaad", "lq", True),
]


def _leaves(inputs, kw, extra, retention):
    leaves = {"q": inputs[0], "k": inputs[1], "v": inputs[2], **{n: x for n, x in kw.items()}}
    for n in ("delta", "robust_delta", "gamma", "ln_weight", "ln_bias"):
        if n == "gamma" and retention != "elastic_net":
            continue
        if torch.is_tensor(extra.get(n)):
            leaves[n] = extra[n]
    init = extra.get("initial_state")
    if init is not None:
        for i, x in enumerate(as_tuple(init.X)):
            leaves[f"X{i}"] = x
        for i, x in enumerate(as_tuple(init.P)):
            leaves[f"P{i}"] = x
    return {n: x for n, x in leaves.items() if x is not None}


@pytest.mark.parametrize("memory,bias,hm,retention,mom", GRAD_CASES)
def test_gradients_chunked_vs_loop(memory, bias, hm, retention, mom):
    seed = 3000 + GRAD_CASES.index((memory, bias, hm, retention, mom))
    inputs, kw, extra = make_inputs(seed, B=2, T=11, H=2, Dk=4, Dv=3, mom=mom, memory=memory,
                                    bias=bias, huber_mode=hm, init=True)
    leaves = _leaves(inputs, kw, extra, retention)
    for x in leaves.values():
        x.requires_grad_(True)
    g = torch.Generator().manual_seed(seed + 1)
    grads = []
    for fn in (R.memory_update_loop, R.memory_update_chunked):
        o, s = call(fn, inputs, kw, extra, memory=memory, bias=bias, retention=retention,
                    chunk_size=3, output_final_state=True)
        g.manual_seed(seed + 1)
        loss = (o * torch.randn(o.shape, generator=g, dtype=DT)).sum()
        for name in ("X", "P", "anchor"):
            for x in as_tuple(getattr(s, name)):
                loss = loss + (x * torch.randn(x.shape, generator=g, dtype=DT)).sum()
        grads.append(torch.autograd.grad(loss, list(leaves.values())))
    for name, a, b in zip(leaves, *grads):
        assert torch.isfinite(a).all(), name
        assert rel_err(b, a) < 1e-9, (name, rel_err(b, a))
        assert a.abs().max() > 0, name


@pytest.mark.parametrize("memory,retention,bias", [("linear", "kl", "robust"),
                                                   ("linear", "lq", "l2"),
                                                   ("mlp", "l2", "l2")])
def test_gradcheck(memory, retention, bias):
    inputs, kw, extra = make_inputs(11, B=1, T=5, H=1, Dk=3, Dv=3, mom=True, memory=memory,
                                    bias=bias, init=True, expansion=2)
    leaves = _leaves(inputs, kw, extra, retention)
    names = list(leaves)

    def f(*xs):
        d = dict(zip(names, xs))
        ins = (d["q"], d["k"], d["v"])
        kw2 = {n: d.get(n) for n in ("lr", "alpha", "momentum")}
        ex = dict(extra)
        for n in ("delta", "robust_delta", "gamma", "ln_weight", "ln_bias"):
            if n in d:
                ex[n] = d[n]
        nx = len(as_tuple(extra["initial_state"].X))
        X = tuple(d[f"X{i}"] for i in range(nx))
        P = tuple(d[f"P{i}"] for i in range(nx))
        ex["initial_state"] = MemoryState(X=X if nx > 1 else X[0], P=P if nx > 1 else P[0])
        o, s = call(R.memory_update_chunked, ins, kw2, ex, memory=memory, bias=bias,
                    retention=retention, chunk_size=2, output_final_state=True)
        return (o, *as_tuple(s.X))

    xs = tuple(x.detach().clone().requires_grad_(True) for x in leaves.values())
    assert torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# state continuation and memory_step
# ---------------------------------------------------------------------------------------------
def _cut(inputs, kw, extra, s, e):
    sl = lambda x: None if x is None else x[:, s:e]  # noqa: E731
    ex = {n: (x[:, s:e] if torch.is_tensor(x) and x.dim() == 3 else x) for n, x in extra.items()}
    return tuple(sl(x) for x in inputs), {n: sl(x) for n, x in kw.items()}, ex


@pytest.mark.parametrize("memory,retention,mom", [("linear", "l2", True), ("linear", "kl", False),
                                                  ("linear", "elastic_net", True),
                                                  ("mlp", "lq", True), ("mlp", "l2", False)])
def test_loop_continues_partial_chunk(memory, retention, mom):
    inputs, kw, extra = make_inputs(21, T=17, mom=mom, memory=memory, bias="huber", Dk=4)
    common = dict(memory=memory, retention=retention, bias="huber", chunk_size=4,
                  output_final_state=True)
    o_full, s_full = call(R.memory_update_chunked, inputs, kw, extra, **common)
    i1, k1, e1 = _cut(inputs, kw, extra, 0, 7)
    i2, k2, e2 = _cut(inputs, kw, extra, 7, 17)
    o1, s1 = call(R.memory_update_loop, i1, k1, e1, **common)
    assert s1.offset.tolist() == [3, 3]
    with pytest.raises(ValueError):
        call(R.memory_update_chunked, i2, k2, dict(e2, initial_state=s1), **common)
    o2, s2 = call(R.memory_update_loop, i2, k2, dict(e2, initial_state=s1), **common)
    assert rel_err(torch.cat([o1, o2], 1), o_full) < 1e-10
    assert_states_close(s2, s_full, 1e-10)


def _steps(inputs, kw, extra, state, t0, **common):
    q, k, v = inputs
    outs = []
    for t in range(t0, q.shape[1]):
        ex = {n: (x[:, t] if torch.is_tensor(x) and x.dim() == 3 else x)
              for n, x in extra.items() if n not in ("initial_state", "expansion")}
        o, state = R.memory_step(q[:, t], k[:, t], v[:, t], kw["lr"][:, t], kw["alpha"][:, t],
                                 None if kw["momentum"] is None else kw["momentum"][:, t],
                                 state=state, **ex, **common)
        outs.append(o)
    return torch.stack(outs, 1), state


@pytest.mark.parametrize("memory,bias,hm,retention,mom", [
    ("linear", "l2", "yaad", "l2", True), ("linear", "huber", "coord", "kl", False),
    ("linear", "robust", "yaad", "elastic_net", True), ("linear", "lp", "yaad", "lq", False),
    ("mlp", "huber", "yaad", "l2", True), ("mlp", "l2", "yaad", "kl", False)])
def test_memory_step_matches_full_op(memory, bias, hm, retention, mom):
    inputs, kw, extra = make_inputs(31, T=16, mom=mom, memory=memory, bias=bias, huber_mode=hm,
                                    init=True, Dk=4)
    C, T0 = 3, 7
    cfg = dict(memory=memory, bias=bias, retention=retention)
    o_full, s_full = call(R.memory_update_chunked, inputs, kw, extra, chunk_size=C,
                          output_final_state=True, **cfg)
    i1, k1, e1 = _cut(inputs, kw, extra, 0, T0)
    o1, s1 = call(R.memory_update_loop, i1, k1, e1, chunk_size=C, output_final_state=True, **cfg)
    o2, s2 = _steps(inputs, kw, extra, s1, T0, chunk_size=C, **cfg)
    assert o2.dtype == DT and o2.shape == (2, 16 - T0, 2, inputs[2].shape[-1])
    assert rel_err(torch.cat([o1, o2], 1), o_full) < 1e-10
    assert_states_close(s2, s_full, 1e-10)
    # exact=True equals chunk_size=1
    o_ex, s_ex = call(R.memory_update_chunked, inputs, kw, extra, chunk_size=1,
                      output_final_state=True, **cfg)
    init = extra["initial_state"]
    o3, s3 = _steps(inputs, kw, extra, init, 0, chunk_size=64, exact=True, **cfg)
    assert rel_err(o3, o_ex) < 1e-10
    assert_states_close(s3, s_ex, 1e-10)


# ---------------------------------------------------------------------------------------------
# small contract checks
# ---------------------------------------------------------------------------------------------
def test_dtype_and_errors():
    inputs, kw, extra = make_inputs(41, mom=False, bias="l2", tensor_params=False)
    q, k, v = (x.float() for x in inputs)
    kwf = {n: None if x is None else x.float() for n, x in kw.items()}
    o, s = call(R.memory_update_chunked, (q, k, v), kwf, {}, chunk_size=8,
                output_final_state=True)
    assert o.dtype == torch.float32 and s.X.dtype == torch.float32
    o64, _ = call(R.memory_update_chunked, inputs, kw, {}, chunk_size=8)
    assert (o.double() - o64).abs().max() < 1e-4
    oh, _ = call(R.memory_update_loop, tuple(x.half() for x in (q, k, v)), kwf, {}, chunk_size=8)
    assert oh.dtype == torch.float16
    with pytest.raises(ValueError):
        call(R.memory_update_chunked, inputs, kw, {}, memory="mlp")      # mlp needs a state
    with pytest.raises(ValueError):
        call(R.memory_update_chunked, inputs, kw, {}, bias="nope")
    with pytest.raises(ValueError):
        call(R.memory_update_chunked, inputs, kw, {}, cu_seqlens=torch.tensor([0, 20]))  # B=2
    # zero state of KL is the uniform memory: first read is the mean of the values written
    o, _ = call(R.memory_update_loop, inputs, kw, {}, retention="kl", chunk_size=4)
    assert torch.isfinite(o).all()
