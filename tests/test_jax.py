"""``miras.jax``: the JAX front end through the XLA FFI (skipped when jax is not installed).

The JAX op runs the same C++ CPU backend as the torch op, so on the same inputs it must give the
same outputs, final states and gradients as ``miras.memory_update`` (itself tested against the
float64 reference in test_cpu_op.py / test_autograd.py):
- several biases/retentions, momentum, tensor-valued parameters, initial state, float32 and
  float64 (x64 enabled by a fixture), eager and under ``jax.jit``;
- gradients through ``jax.custom_vjp`` (``jax.vjp`` with random cotangents on o and on every part
  of the final state, the anchor included) equal torch autograd's;
- varlen with traced ``cu_seqlens`` (the final anchor's gradient included);
- ``memory_step``: prefill + steps == the full op; steps equal torch's ``memory_step`` (grads too);
- clear errors naming the argument.
Tolerances: float64 1e-10, float32 1e-5 (outputs) / 1e-4 (gradients) — relative, as elsewhere.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_close, make_inputs, op_kwargs, state_of

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import miras  # noqa: E402
from miras import jax as mj  # noqa: E402

TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4)}


@pytest.fixture(autouse=True)
def x64():
    """float64 arrays (and int64 cu_seqlens) need jax_enable_x64; restored after each test."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


def J(t):
    """torch tensor (or None / float) -> jax array."""
    if isinstance(t, torch.Tensor):
        return jnp.asarray(t.detach().numpy())
    return t


def T_(a):
    return torch.from_numpy(np.asarray(a).copy())


PARAM_NAMES = ("delta", "robust_delta", "gamma")


def _split(args, kw):
    """(arrays: the differentiable inputs by name, static: the other keyword arguments)."""
    names = ["q", "k", "v", "lr", "alpha", "momentum"]
    arrays = {n: a for n, a in zip(names, args) if a is not None}
    static = {}
    for n, val in op_kwargs(kw).items():
        (arrays if isinstance(val, torch.Tensor) else static)[n] = val
    for n in ("_X0", "_P0"):
        if kw.get(n) is not None:
            arrays[n] = kw[n]
    return arrays, static


def _torch_run(arrays, static, cot, **call):
    """torch op: outputs and the gradients of <cot, outputs> for every input array."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in arrays.items()}
    pos = [leaves.get(n) for n in ("q", "k", "v", "lr", "alpha", "momentum")]
    kw = {n: t for n, t in leaves.items() if n in PARAM_NAMES}
    st = miras.MemoryState(X=leaves["_X0"], P=leaves.get("_P0")) if "_X0" in leaves else None
    o, s = miras.memory_update(*pos, **static, **kw, initial_state=st, **call)
    outs = {"o": o}
    if s is not None:
        outs.update(X=s.X, anchor=s.anchor, offset=s.offset)
        if s.P is not None:
            outs["P"] = s.P
    loss = sum((outs[n] * T_(c)).sum() for n, c in cot.items())
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {n: t.detach() for n, t in outs.items()}, dict(zip(leaves, grads))


def _jax_fn(static, names, **call):
    def f(*xs):
        d = dict(zip(names, xs))
        pos = [d.get(n) for n in ("q", "k", "v", "lr", "alpha", "momentum")]
        kw = {n: d[n] for n in PARAM_NAMES if n in d}
        st = mj.MemoryState(X=d["_X0"], P=d.get("_P0")) if "_X0" in d else None
        o, s = mj.memory_update(*pos, **static, **kw, initial_state=st, **call)
        outs = {"o": o}
        if s is not None:
            outs.update(X=s.X, anchor=s.anchor)
            if s.P is not None:
                outs["P"] = s.P
        return outs
    return f


def _compare(args, kw, dtype, *, jit=False, cot_state=True, **call):
    """Runs both front ends on the same inputs and compares outputs and gradients."""
    arrays, static = _split(args, kw)
    names = list(arrays)
    f = _jax_fn(static, names, **call)
    if jit:
        f = jax.jit(f)
    xs = [J(arrays[n]) for n in names]
    outs_j, vjp = jax.vjp(f, *xs)
    rng = np.random.default_rng(len(names) * 7 + arrays["q"].shape[1])
    cot = {n: rng.standard_normal(np.shape(o)).astype(np.asarray(o).dtype) for n, o in outs_j.items()
           if n == "o" or cot_state}
    cot_full = {n: cot.get(n, np.zeros(np.shape(o), np.asarray(o).dtype)) for n, o in outs_j.items()}
    grads_j = dict(zip(names, vjp({n: jnp.asarray(c) for n, c in cot_full.items()})))
    outs_t, grads_t = _torch_run(arrays, static, cot, **call)
    tol_o, tol_g = TOL[dtype]
    for n, o in outs_j.items():
        assert np.asarray(o).dtype == np.dtype(str(outs_t[n].dtype).replace("torch.", "")), n
        assert_close(T_(o), outs_t[n], tol_o, f"output {n}")
    for n in names:
        assert grads_j[n].shape == arrays[n].shape and grads_j[n].dtype == xs[names.index(n)].dtype
        assert_close(T_(grads_j[n]), grads_t[n], tol_g, f"d{n}")
    return outs_j


CASES = [  # (bias, huber_mode, retention, momentum, chunk_size, T)
    ("l2", "yaad", "l2", True, 4, 13),
    ("lp", "yaad", "lq", False, 5, 12),
    ("huber", "yaad", "kl", True, 4, 9),
    ("huber", "coord", "elastic_net", False, 3, 10),
    ("robust", "yaad", "l2", True, 8, 8),
    ("dot", "yaad", "elastic_net", True, 16, 11),
    ("huber", "norm", "lq", True, 4, 16),
]
CASE_IDS = ["l2-l2-mom", "lp-lq", "yaad-kl-mom", "coord-en", "robust-l2-mom-T=C", "dot-en-mom-T<C", "norm-lq-mom"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_torch(case, dtype, seed):
    bias, hm, retention, momentum, C, T = case
    args, kw = make_inputs(B=2, T=T, H=2, Dk=5, Dv=4, dtype=dtype, momentum=momentum, seed=seed, bias=bias,
                           huber_mode=hm, retention=retention, initial_state=True)
    _compare(args, kw, dtype, chunk_size=C, output_final_state=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_jit_scalar_params_no_state(dtype, seed):
    """Under jax.jit; float parameters; no initial state; o only."""
    args, kw = make_inputs(B=2, T=11, H=3, Dk=4, Dv=6, dtype=dtype, momentum=True, seed=seed, bias="huber",
                           retention="elastic_net", tensor_params=False)
    _compare(args, kw, dtype, jit=True, chunk_size=4)
    # eager == jit, bit for bit (the same backend call)
    a = [J(x) for x in args]
    f = lambda *xs: mj.memory_update(*xs, **op_kwargs(kw), chunk_size=4)[0]  # noqa: E731
    np.testing.assert_array_equal(np.asarray(f(*a)), np.asarray(jax.jit(f)(*a)))


@pytest.mark.parametrize("lengths", [(5, 0, 9, 4), (8, 3, 12)], ids=["with-empty", "mixed"])
@pytest.mark.parametrize("momentum", [True, False], ids=["mom", "nomom"])
def test_varlen_traced_cu_seqlens(lengths, momentum, seed):
    """cu_seqlens traced under jit: the two-call path that keeps the final anchor's gradient."""
    C = 4
    N, Ttot = len(lengths), sum(lengths)
    args, kw = make_inputs(B=1, T=Ttot, H=2, Dk=4, Dv=3, momentum=momentum, seed=seed, bias="lp", retention="l2",
                           initial_state=True, N=N)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
    arrays, static = _split(args, kw)
    names = list(arrays)

    def f(cu_, *xs):
        return _jax_fn(static, names, chunk_size=C, output_final_state=True, cu_seqlens=cu_)(*xs)

    xs = [J(arrays[n]) for n in names]
    outs_j, vjp = jax.vjp(lambda *xs_: jax.jit(f)(J(cu), *xs_), *xs)
    rng = np.random.default_rng(seed)
    cot = {n: rng.standard_normal(np.shape(o)) for n, o in outs_j.items()}
    grads_j = dict(zip(names, vjp({n: jnp.asarray(c) for n, c in cot.items()})))
    outs_t, grads_t = _torch_run(arrays, static, cot, chunk_size=C, output_final_state=True, cu_seqlens=cu)
    for n, o in outs_j.items():
        assert_close(T_(o), outs_t[n], 1e-10, f"output {n}")
    for n in names:
        assert_close(T_(grads_j[n]), grads_t[n], 1e-10, f"d{n}")
    # concrete cu_seqlens (eager) takes the same values; int32 cu_seqlens too
    o32, s32 = mj.memory_update(*[J(a) for a in args], **op_kwargs(kw), chunk_size=C, output_final_state=True,
                                cu_seqlens=jnp.asarray(cu.numpy(), jnp.int32),
                                initial_state=mj.MemoryState(J(kw["_X0"]), J(kw.get("_P0"))))
    assert_close(T_(o32), outs_t["o"], 1e-10, "o (int32 cu_seqlens)")
    assert_close(T_(s32.anchor), outs_t["anchor"], 1e-10, "anchor (int32 cu_seqlens)")
    np.testing.assert_array_equal(np.asarray(s32.offset), np.asarray(lengths) % C)


def test_varlen_concrete_single_call(seed):
    """Concrete cu_seqlens where no sequence ends inside a later chunk: one call, same values."""
    lengths, C = (8, 3, 4), 4
    args, kw = make_inputs(B=1, T=sum(lengths), H=2, Dk=4, Dv=3, momentum=True, seed=seed, initial_state=True,
                           N=len(lengths))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]))
    _compare(args, kw, torch.float64, chunk_size=C, output_final_state=True, cu_seqlens=cu)


def test_float32_without_x64(seed):
    """The default JAX config (no x64): float32 arrays, int32 cu_seqlens."""
    jax.config.update("jax_enable_x64", False)
    args, kw = make_inputs(B=1, T=10, H=2, Dk=4, Dv=3, dtype=torch.float32, seed=seed, N=2)
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    o_t, _ = miras.memory_update(*args, **op_kwargs(kw), chunk_size=4, cu_seqlens=cu)
    o_j, s_j = mj.memory_update(*[J(a) for a in args], **op_kwargs(kw), chunk_size=4, cu_seqlens=J(cu),
                                output_final_state=True)
    assert o_j.dtype == jnp.float32 and s_j.X.dtype == jnp.float32
    assert_close(T_(o_j), o_t, 1e-6, "o")
    g = jax.grad(lambda q: mj.memory_update(q, *[J(a) for a in args[1:]], **op_kwargs(kw), chunk_size=4,
                                            cu_seqlens=J(cu))[0].sum())(J(args[0]))
    assert g.dtype == jnp.float32 and bool(jnp.isfinite(g).all())


def test_bfloat16_computed_in_float32(seed):
    args, kw = make_inputs(B=2, T=9, H=2, Dk=4, Dv=4, dtype=torch.float32, seed=seed)
    bf = [a.to(torch.bfloat16) for a in args[:3]] + args[3:]
    o_t, _ = miras.memory_update(*bf, **op_kwargs(kw), chunk_size=4)
    o_j, _ = mj.memory_update(*[jnp.asarray(a.float().numpy()).astype(jnp.bfloat16) for a in bf[:3]],
                              *[J(a) for a in bf[3:]], **op_kwargs(kw), chunk_size=4)
    assert o_j.dtype == jnp.bfloat16
    assert_close(T_(o_j.astype(jnp.float32)), o_t.float(), 1e-2, "o (bf16)")
    g = jax.grad(lambda q: mj.memory_update(q, *[jnp.asarray(a.float().numpy()).astype(jnp.bfloat16) for a in bf[1:3]],
                                            *[J(a) for a in bf[3:]], **op_kwargs(kw), chunk_size=4)[0]
                 .astype(jnp.float32).sum())(jnp.asarray(bf[0].float().numpy()).astype(jnp.bfloat16))
    assert g.dtype == jnp.bfloat16


def test_no_tokens_passes_state_through(seed):
    args, kw = make_inputs(B=2, T=0, H=2, Dk=3, Dv=2, seed=seed, initial_state=True)
    X0, P0 = J(kw["_X0"]), J(kw["_P0"])
    o, s = mj.memory_update(*[J(a) for a in args], **op_kwargs(kw), initial_state=mj.MemoryState(X0, P0),
                            output_final_state=True)
    assert o.shape == (2, 0, 2, 2)
    np.testing.assert_array_equal(np.asarray(s.X), np.asarray(X0))
    np.testing.assert_array_equal(np.asarray(s.P), np.asarray(P0))


def test_vmap_over_a_batch_of_calls(seed):
    """vmap_method='sequential': a vmapped call equals the calls one by one."""
    args, kw = make_inputs(B=1, T=7, H=2, Dk=3, Dv=3, momentum=False, seed=seed)
    a = [J(x) for x in args[:5]]
    stacked = [jnp.stack([x, 0.5 * x]) if i < 3 else jnp.stack([x, x]) for i, x in enumerate(a)]
    f = lambda *xs: mj.memory_update(*xs, chunk_size=4)[0]  # noqa: E731
    out = jax.vmap(f)(*stacked)
    for i in range(2):
        np.testing.assert_allclose(np.asarray(out[i]), np.asarray(f(*[x[i] for x in stacked])), rtol=1e-12)


# ---- memory_step ------------------------------------------------------------------------------
STEP_CASES = [("l2", "l2", True), ("huber", "kl", False), ("lp", "lq", True), ("robust", "elastic_net", True)]


@pytest.mark.parametrize("case", STEP_CASES, ids=["l2-l2-mom", "yaad-kl", "lp-lq-mom", "robust-en-mom"])
def test_prefill_then_steps_equals_full(case, seed):
    bias, retention, momentum = case
    C, T0, T = 4, 6, 13
    args, kw = make_inputs(B=2, T=T, H=2, Dk=4, Dv=3, momentum=momentum, seed=seed, bias=bias, retention=retention,
                           initial_state=True)
    a = [J(x) for x in args]
    okw = {n: J(v) for n, v in op_kwargs(kw).items()}
    st0 = mj.MemoryState(J(kw["_X0"]), J(kw.get("_P0")))

    def head(x, t0, t1):
        return x[:, t0:t1] if hasattr(x, "shape") and x.ndim >= 3 else x

    o_full, s_full = mj.memory_update(*a, **okw, chunk_size=C, initial_state=st0, output_final_state=True)
    o_pre, s = mj.memory_update(*[head(x, 0, T0) if x is not None else None for x in a],
                                **{n: head(v, 0, T0) for n, v in okw.items()}, chunk_size=C, initial_state=st0,
                                output_final_state=True)
    scalars = {n: v for n, v in okw.items() if not hasattr(v, "shape")}
    step = jax.jit(lambda *xs, state, **k: mj.memory_step(*xs, state=state, chunk_size=C, **k, **scalars))
    outs = [o_pre]
    for t in range(T0, T):
        tok = [x[:, t] if x is not None else None for x in a]
        o_t, s = step(*tok, state=s, **{n: v[:, t] for n, v in okw.items() if hasattr(v, "shape")})
        outs.append(o_t[:, None])
    assert_close(T_(jnp.concatenate(outs, 1)), T_(o_full), 1e-10, "o")
    for n in ("X", "P", "anchor"):
        if getattr(s_full, n) is not None:
            assert_close(T_(getattr(s, n)), T_(getattr(s_full, n)), 1e-10, f"state.{n}")
    np.testing.assert_array_equal(np.asarray(s.offset), np.asarray(s_full.offset))


def test_step_matches_torch_with_grads(seed):
    """One memory_step from a mid-chunk state (anchor != X), gradients through the state too."""
    C = 4
    args, kw = make_inputs(B=2, T=1, H=2, Dk=4, Dv=3, momentum=True, seed=seed, bias="huber", retention="l2",
                           initial_state=True)
    g = torch.Generator().manual_seed(seed)
    A0 = kw["_X0"] + 0.1 * torch.randn(kw["_X0"].shape, generator=g, dtype=torch.float64)
    off = torch.tensor([1, 3])
    tok = [a[:, 0] for a in args]
    delta = kw["delta"][:, 0]
    leaves = [t.clone().requires_grad_(True) for t in tok + [delta, kw["_X0"], kw["_P0"], A0]]
    o_t, s_t = miras.memory_step(*leaves[:6], delta=leaves[6], bias="huber", chunk_size=C,
                                 state=miras.MemoryState(leaves[7], leaves[8], leaves[9], off))

    def f(*xs):
        o, s = mj.memory_step(*xs[:6], delta=xs[6], bias="huber", chunk_size=C,
                              state=mj.MemoryState(xs[7], xs[8], xs[9], jnp.asarray(off.numpy())))
        return o, s.X, s.P, s.anchor

    outs_j, vjp = jax.vjp(f, *[J(t) for t in leaves])
    for a, b in zip(outs_j, (o_t, s_t.X, s_t.P, s_t.anchor)):
        assert_close(T_(a), b.detach(), 1e-12, "step output")
    np.testing.assert_array_equal(np.asarray(f(*[J(t) for t in leaves])[3]), s_t.anchor.detach().numpy())
    cots = [np.random.default_rng(seed).standard_normal(np.shape(o)) for o in outs_j]
    gj = vjp(tuple(jnp.asarray(c) for c in cots))
    loss = sum((o * T_(c)).sum() for o, c in zip((o_t, s_t.X, s_t.P, s_t.anchor), cots))
    gt = torch.autograd.grad(loss, leaves)
    for i, (a, b) in enumerate(zip(gj, gt)):
        assert_close(T_(a), b, 1e-10, f"grad {i}")


# ---- errors -----------------------------------------------------------------------------------
def _good():
    args, kw = make_inputs(B=2, T=6, H=2, Dk=3, Dv=2, momentum=True, seed=1)
    return [J(a) for a in args], op_kwargs(kw)


@pytest.mark.parametrize("mutate,match", [
    (lambda a, k: a.__setitem__(1, a[1][..., :2]), "k must have shape"),
    (lambda a, k: a.__setitem__(0, a[0][0]), "q must be a 4-D array"),
    (lambda a, k: a.__setitem__(3, -a[3]), r"lr must lie in \[0.0, inf\)"),
    (lambda a, k: a.__setitem__(4, a[4] + 1.0), r"alpha must lie in \(0.0, 1.0\]"),
    (lambda a, k: a.__setitem__(5, a[5][:, :3]), "momentum must have shape"),
    (lambda a, k: a.__setitem__(2, a[2].astype(jnp.float32)), "q, k, v must share a dtype"),
    (lambda a, k: a.__setitem__(0, [[1.0]]), "q must be a jax array"),
    (lambda a, k: k.update(bias="nope"), "bias must be one of"),
    (lambda a, k: k.update(retention="l1"), "retention must be one of"),
    (lambda a, k: k.update(chunk_size=0), "chunk_size must be an int >= 1"),
    (lambda a, k: k.update(bias="huber", delta=-1.0), r"delta must lie in \(0.0, inf\)"),
    (lambda a, k: k.update(retention="elastic_net", gamma=jnp.ones((2, 6, 3))), "gamma must have shape"),
    (lambda a, k: k.update(memory="mlp"), "memory='linear' only"),
    (lambda a, k: k.update(cu_seqlens=jnp.asarray([0, 3, 6])), "batch size must be 1"),
    (lambda a, k: k.update(initial_state=mj.MemoryState(jnp.zeros((2, 2, 3, 3)))), r"initial_state.X must have shape"),
    (lambda a, k: k.update(initial_state=mj.MemoryState(jnp.zeros((2, 2, 3, 2)), offset=jnp.asarray([0, 1]))),
     "offset == 0"),
])
def test_errors_name_the_argument(mutate, match):
    a, kw = _good()
    mutate(a, kw)
    with pytest.raises(ValueError, match=match):
        mj.memory_update(*a, **kw)


def test_varlen_errors():
    a, kw = _good()
    a = [x[:1] for x in a]
    for cu, match in (([1, 6], "start at 0"), ([0, 4, 3, 6], "non-decreasing"), ([0, 5], "end at T=6"),
                      ([[0, 6]], "1-D"), (np.array([0.0, 6.0]), "int32 or int64")):
        with pytest.raises(ValueError, match=match):
            mj.memory_update(*a, **kw, cu_seqlens=jnp.asarray(cu))
    # under jit the values are not known to Python: the backend rejects them at run time
    f = jax.jit(lambda cu: mj.memory_update(*a, **kw, cu_seqlens=cu)[0])
    with pytest.raises(Exception, match="cu_seqlens must end at T"):
        jax.block_until_ready(f(jnp.asarray([0, 5])))


def test_step_errors():
    a, kw = _good()
    st = mj.MemoryState(jnp.zeros((2, 2, 3, 2)))
    tok = [x[:, 0] for x in a]
    with pytest.raises(ValueError, match="memory_step: q must be"):
        mj.memory_step(*a, state=st, **kw)
    with pytest.raises(ValueError, match="state must be a miras.jax.MemoryState"):
        mj.memory_step(*tok, state=(st.X,), **kw)
    with pytest.raises(ValueError, match=r"state.offset must lie in \[0, chunk_size=4\)"):
        mj.memory_step(*tok, state=st._replace(offset=jnp.asarray([0, 4])), chunk_size=4, **kw)
    with pytest.raises(ValueError, match="state.P .* but momentum is None"):
        mj.memory_step(*tok[:5], state=st._replace(P=st.X), **kw)


def test_huge_chunk_size_equals_one_chunk(seed):
    """chunk_size far beyond T (even 2**63 - 1) is one chunk over the whole sequence, as in torch."""
    args, kw = make_inputs(B=2, T=9, H=2, Dk=4, Dv=3, dtype=torch.float64, momentum=True, seed=seed, bias="lp",
                           retention="l2")
    a = [J(x) for x in args]
    o_ref = np.asarray(mj.memory_update(*a, **op_kwargs(kw), chunk_size=16)[0])
    for C in (2**40, 2**63 - 1):
        o = np.asarray(mj.memory_update(*a, **op_kwargs(kw), chunk_size=C)[0])
        np.testing.assert_allclose(o, o_ref, rtol=1e-12, atol=1e-12)
    o_t = miras.memory_update(*args, **op_kwargs(kw), chunk_size=2**63 - 1)[0]
    np.testing.assert_allclose(o_ref, o_t.numpy(), rtol=1e-10, atol=1e-12)
