"""map_schedule="chunk" (SPEC §5b, the paper's parallel form): the read map at chunk starts, the read
memory linear inside a chunk.

Two formulations of the float64 reference are compared — the per-token loop (R moved token by token,
the raw state by its own recurrence) and the chunked form (the l2 dual form from R0 = φ(X0), the raw
state in closed form for kl / lq, by its thresholded scan for elastic_net) — values, final states and
gradients; then the ops (which run the reference for the map retentions until fused paths land, and
the C++ op for l2, where both schedules are one computation), prefill + steps, and the errors.
"""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from conftest import BIAS_MODES, BIAS_IDS, assert_close, assert_compiled_matches, make_inputs, op_cfg, op_kwargs, state_of

import miras
import miras.nn
from miras import reference as R
from miras.state import MemoryState

MAP_RETS = ["kl", "lq", "elastic_net"]
pytestmark = [pytest.mark.filterwarnings("ignore:miras. map_schedule='chunk'"),
              pytest.mark.filterwarnings("ignore:miras. lq_map='mirror'")]


def _mlp_state(B, H, Dk, seed, dtype=torch.float64, momentum=False):
    g = torch.Generator().manual_seed(seed + 17)
    W1 = 0.5 * torch.randn(B, H, Dk, 4 * Dk, generator=g, dtype=torch.float64)
    W2 = 0.3 * torch.randn(B, H, 4 * Dk, Dk, generator=g, dtype=torch.float64) / 2
    return MemoryState(X=(W1.to(dtype), W2.to(dtype)))


def _inputs(seed, retention, bias="l2", huber_mode="yaad", memory="linear", momentum=True, B=2, T=13, H=2, Dk=4,
            Dv=3, dtype=torch.float64, requires_grad=False, N=None):
    if memory == "mlp":
        Dv = Dk
    args, kw = make_inputs(B=B, T=T, H=H, Dk=Dk, Dv=Dv, dtype=dtype, momentum=momentum, seed=seed, bias=bias,
                           retention=retention, huber_mode=huber_mode, initial_state=memory == "linear",
                           requires_grad=requires_grad, N=N)
    st = state_of(kw) if memory == "linear" else _mlp_state(N or B, H, Dk, seed, dtype)
    if requires_grad and st is not None:
        for x in (st.X if isinstance(st.X, tuple) else (st.X,)):
            x.requires_grad_(True)
    return args, op_kwargs(kw), st


def _cfg(mem, ret, kw):
    return R._Cfg(mem, kw.get("bias", "l2"), ret, kw.get("p", 3.0), kw.get("eps", 1e-6), kw.get("huber_mode", "yaad"),
                  kw.get("kl_scale", 1.0), 4.0, 1e-6, None, None, "chunk")


def _flat(x):
    if x is None:
        return ()
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _states_close(s1, s2, tol, what):
    for name in ("X", "P", "anchor", "R"):
        a, b = _flat(getattr(s1, name)), _flat(getattr(s2, name))
        assert len(a) == len(b), f"{what}: {name} present in one state only"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, tol, f"{what} state.{name}[{i}]")
    assert torch.equal(s1.offset, s2.offset), what


# ---- the two reference formulations agree ----------------------------------------------------------
CASES = [(ret, bm, mem, mom, C) for ret in MAP_RETS for bm in (BIAS_MODES[1], BIAS_MODES[2], BIAS_MODES[4])
         for mem in ("linear", "mlp") for mom in (False, True) for C in (1, 3, 16)]
CASES += [(ret, bm, "linear", True, 4) for ret in MAP_RETS for bm in BIAS_MODES]


@pytest.mark.parametrize("ret,bm,mem,mom,C", CASES,
                         ids=[f"{r}-{b[0]}{'-' + b[1] if b[0] == 'huber' else ''}-{m}-{'mom' if mo else 'gd'}-C{c}"
                              for r, b, m, mo, c in CASES])
def test_reference_loop_equals_chunked(seed, ret, bm, mem, mom, C):
    bias, hm = bm
    args, kw, st = _inputs(seed, ret, bias, hm, mem, mom, T=13)
    common = dict(kw, memory=mem, chunk_size=C, map_schedule="chunk", initial_state=st, output_final_state=True)
    o1, s1 = R.memory_update_loop(*args, **common)
    o2, s2 = R.memory_update_chunked(*args, **common)
    assert_close(o2, o1, 1e-10, "o")
    _states_close(s2, s1, 1e-10, "final")
    assert s1.R is not None
    if 13 % C == 0:  # at a chunk boundary the read memory is the map of the raw state
        for r, w in zip(_flat(s1.R), R._phis(_flat(s1.X), _cfg(mem, ret, kw))):
            assert_close(r, w, 1e-14, "R at a boundary")


def test_state_R_is_the_map_at_a_boundary(seed):
    args, kw, st = _inputs(seed, "kl", "l2", T=12)
    _, s = R.memory_update_chunked(*args, **kw, chunk_size=4, map_schedule="chunk", initial_state=st,
                                   output_final_state=True)
    assert torch.equal(s.R, R._phi(s.X, _cfg("linear", "kl", kw)))
    _, s = R.memory_update_chunked(*[t[:, :10] for t in args], **{n: (t[:, :10] if isinstance(t, torch.Tensor) else t)
                                                                   for n, t in kw.items()},
                                   chunk_size=4, map_schedule="chunk", initial_state=st, output_final_state=True)
    assert (s.R - R._phi(s.X, _cfg("linear", "kl", kw))).abs().max() > 1e-6  # mid-chunk: R is not φ(X)


@pytest.mark.parametrize("ret", MAP_RETS)
@pytest.mark.parametrize("mem", ["linear", "mlp"])
def test_reference_gradients_loop_equals_chunked(seed, ret, mem):
    """Autograd through both formulations (every input, the initial state included) agrees."""
    args, kw, st = _inputs(seed, ret, "lp" if mem == "linear" else "l2", memory=mem, T=11, requires_grad=True)
    common = dict(kw, memory=mem, chunk_size=4, map_schedule="chunk", initial_state=st, output_final_state=True)
    leaves = [t for t in args if t is not None] + list(_flat(st.X)) + [v for v in kw.values()
                                                                     if isinstance(v, torch.Tensor)]
    g = torch.Generator().manual_seed(seed)
    grads = []
    for fn in (R.memory_update_loop, R.memory_update_chunked):
        o, s = fn(*args, **common)
        if not grads:
            wo = torch.randn(o.shape, generator=g, dtype=o.dtype)
            ws = [torch.randn(x.shape, generator=g, dtype=x.dtype) for x in _flat(s.X) + _flat(s.R)]
        loss = (o * wo).sum() + sum((x * w).sum() for x, w in zip(_flat(s.X) + _flat(s.R), ws))
        grads.append(torch.autograd.grad(loss, leaves, allow_unused=True))
    for i, (a, b) in enumerate(zip(*grads)):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(b, a, 1e-9, f"grad of leaf {i}")


@pytest.mark.parametrize("ret", MAP_RETS)
def test_reference_gradcheck(seed, ret):
    args, kw, st = _inputs(seed, ret, "l2", T=5, B=1, H=1, Dk=3, Dv=2, requires_grad=True)
    q, k, v, lr, alpha, mom = args

    def f(q, k, v, lr, alpha, mom, X0):
        o, s = R.memory_update_chunked(q, k, v, lr, alpha, mom, **kw, chunk_size=2, map_schedule="chunk",
                                       initial_state=MemoryState(X=X0), output_final_state=True)
        return o, s.X, s.R

    assert torch.autograd.gradcheck(f, (q, k, v, lr, alpha, mom, st.X), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("mem", ["linear", "mlp"])
def test_l2_schedules_identical(seed, mem):
    args, kw, st = _inputs(seed, "l2", "lp", memory=mem)
    for fn in (R.memory_update_loop, R.memory_update_chunked):
        o1, s1 = fn(*args, **kw, memory=mem, chunk_size=4, initial_state=st, output_final_state=True)
        o2, s2 = fn(*args, **kw, memory=mem, chunk_size=4, initial_state=st, output_final_state=True,
                    map_schedule="chunk")
        assert torch.equal(o1, o2) and s2.R is None
    # the C++ op: one computation, bitwise
    args32 = [None if t is None else t.float() for t in args]
    st32 = None if st is None else MemoryState(X=tuple(x.float() for x in _flat(st.X)) if mem == "mlp"
                                               else st.X.float())
    kw32 = {n: (t.float() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    o1, s1 = miras.memory_update(*args32, **kw32, memory=mem, chunk_size=4, initial_state=st32,
                                 output_final_state=True)
    o2, s2 = miras.memory_update(*args32, **kw32, memory=mem, chunk_size=4, initial_state=st32,
                                 output_final_state=True, map_schedule="chunk")
    assert torch.equal(o1, o2)
    assert all(torch.equal(a, b) for a, b in zip(_flat(s1.X), _flat(s2.X)))


@pytest.mark.parametrize("ret", MAP_RETS)
def test_chunk_size_one_is_not_online_descent(seed, ret):
    """SPEC §5b: with C = 1 token t reads α_t φ(X_{t−1}) + U_t, not φ(X_t) (SPEC §5's exact step)."""
    args, kw, st = _inputs(seed, ret, "l2", momentum=False, T=6)
    q, k, v, lr, alpha, _ = args
    o_tok, _ = R.memory_update_loop(*args, **kw, chunk_size=1, initial_state=st)
    o_chk, _ = R.memory_update_loop(*args, **kw, chunk_size=1, initial_state=st, map_schedule="chunk")
    assert (o_tok - o_chk).abs().max() > 1e-4 * o_tok.abs().max()
    # the formula, written out for the linear memory: o_t = q~_t (α_t φ(X_{t−1}) + U_t)
    cfg = _cfg("linear", ret, kw)
    X = st.X
    gamma = kw.get("gamma", 0.0)
    scale = q.shape[-1] ** -0.5
    for t in range(q.shape[1]):
        W = R._phi(X, cfg)
        e = torch.einsum("bhk,bhkv->bhv", k[:, t], W) - v[:, t]
        U = -lr[:, t, :, None, None] * k[:, t, :, :, None] * e[:, :, None, :]
        read = alpha[:, t, :, None, None] * W + U
        assert_close(o_chk[:, t], torch.einsum("bhk,bhkv->bhv", scale * q[:, t], read), 1e-12, f"token {t}")
        X = alpha[:, t, :, None, None] * X + U
        if ret == "elastic_net":
            g = gamma[:, t, :, None, None]
            X = torch.where(X > g, X - g, torch.where(X < -g, X + g, torch.zeros_like(X)))


# ---- varlen, empty segments ----------------------------------------------------------------------
@pytest.mark.parametrize("ret", MAP_RETS)
def test_varlen_equals_per_sequence(seed, ret):
    cu = torch.tensor([0, 5, 5, 14, 17])
    args, kw, st = _inputs(seed, ret, "lp", B=1, T=17, N=4)
    common = dict(kw, chunk_size=4, map_schedule="chunk", output_final_state=True)
    o, s = miras.memory_update(*args, **common, initial_state=st, cu_seqlens=cu)
    o_ref, s_ref = R.memory_update_loop(*args, **common, initial_state=st, cu_seqlens=cu)
    assert_close(o, o_ref, 1e-10, "o")
    _states_close(s, s_ref, 1e-10, "final")
    for n in range(4):
        a, b = int(cu[n]), int(cu[n + 1])
        sl = lambda t: None if t is None else t[:, a:b]  # noqa: E731
        kwn = {x: (sl(t) if isinstance(t, torch.Tensor) else t) for x, t in kw.items()}
        st_n = MemoryState(X=st.X[n:n + 1], P=None if st.P is None else st.P[n:n + 1])
        o_n, s_n = R.memory_update_loop(*[sl(t) for t in args], **kwn, chunk_size=4, map_schedule="chunk",
                                        initial_state=st_n, output_final_state=True)
        assert_close(o[:, a:b], o_n, 1e-10, f"segment {n}") if b > a else None
        assert_close(s.R[n:n + 1], s_n.R, 1e-10, f"segment {n} R")
        assert int(s.offset[n]) == (b - a) % 4


# ---- prefill + steps == the full call -------------------------------------------------------------
@pytest.mark.parametrize("ret,mem,schedule", list(itertools.product(MAP_RETS + ["l2"], ["linear", "mlp"],
                                                                    ["token", "chunk"])))
def test_prefill_then_steps_equals_full(seed, ret, mem, schedule):
    args, kw, st = _inputs(seed, ret, "l2", memory=mem, T=15)
    C, t0 = 4, 6
    common = dict(kw, memory=mem, chunk_size=C, map_schedule=schedule)
    o_full, s_full = miras.memory_update(*args, **common, initial_state=st, output_final_state=True)
    pre = [None if t is None else t[:, :t0] for t in args]
    kwp = {n: (t[:, :t0] if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    o_pre, s = miras.memory_update(*pre, **dict(common, **kwp), initial_state=st, output_final_state=True)
    if schedule == "chunk" and ret != "l2":
        assert s.R is not None
    outs = [o_pre]
    for t in range(t0, 15):
        kwt = {n: (x[:, t] if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
        o, s = miras.memory_step(*[None if x is None else x[:, t] for x in args], state=s, **dict(common, **kwt))
        outs.append(o[:, None])
    assert_close(torch.cat(outs, 1), o_full, 1e-10, "o")
    _states_close(s, s_full, 1e-10, "final")


# ---- the ops --------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [20, 24])
@pytest.mark.parametrize("ret", MAP_RETS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_op_matches_reference_with_gradients(seed, ret, dtype, T):
    """kl / lq: the C++ op (dual form from φ(X) per chunk, R from its outputs); elastic_net: the reference."""
    args, kw, st = _inputs(seed, ret, "huber", dtype=dtype, requires_grad=True, T=T)
    common = dict(kw, chunk_size=8, map_schedule="chunk", output_final_state=True)
    o, s = miras.memory_update(*args, **common, initial_state=st)
    assert o.dtype == dtype and s.R.dtype == dtype
    up = lambda t: None if t is None else t.detach().double().requires_grad_(t.requires_grad)  # noqa: E731
    a64 = [up(t) for t in args]
    kw64 = {n: (up(t) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    X64, P64 = up(st.X), up(st.P)
    o_ref, s_ref = R.memory_update_loop(*a64, **dict(common, **kw64), initial_state=MemoryState(X=X64, P=P64))
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert_close(o, o_ref, tol, "o")
    assert_close(s.R, s_ref.R, tol, "R")
    g = torch.Generator().manual_seed(seed)
    wo, wx, wr = (torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (o, s.X, s.R))
    ((o * wo.to(dtype)).sum() + (s.X * wx.to(dtype)).sum() + (s.R * wr.to(dtype)).sum()).backward()
    ((o_ref * wo).sum() + (s_ref.X * wx).sum() + (s_ref.R * wr).sum()).backward()
    names = ["q", "k", "v", "lr", "alpha", "momentum"]
    for name, a, b in list(zip(names, args, a64)) + [("X0", st.X, X64), ("P0", st.P, P64)] + [
            (n, kw[n], kw64[n]) for n in kw if isinstance(kw[n], torch.Tensor)]:
        if a is not None:
            assert_close(a.grad, b.grad, 10 * tol, f"d {name}")


def test_invalid_schedule_names_the_argument():
    args, kw, _ = _inputs(0, "kl", "l2")
    with pytest.raises(ValueError, match="map_schedule"):
        miras.memory_update(*args, **kw, map_schedule="chunks")
    with pytest.raises(ValueError, match="map_schedule"):
        miras.Config(map_schedule="paper")
    with pytest.raises(ValueError, match="map_schedule"):
        R.memory_update_chunked(*args, **kw, map_schedule="chunks")


def test_state_in_mid_chunk_needs_R():
    args, kw, st = _inputs(1, "lq", "l2")
    one = [None if t is None else t[:, 0] for t in args]
    kwt = {n: (x[:, 0] if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
    mid = MemoryState(X=st.X, P=st.P, offset=torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="R"):
        miras.memory_step(*one, state=mid, **kwt, chunk_size=4, map_schedule="chunk")


def test_backends_refuse_what_they_do_not_compute():
    """The C++ op computes map_schedule='chunk' for l2 (= token), kl and lq (linear memory, from a chunk
    boundary); elastic_net, a separate anchor (the step op) and the MLP memory are errors there, never a
    silent token-schedule result (the torch front end routes them to the reference)."""
    args, kw, st = _inputs(2, "kl", "l2", momentum=False, dtype=torch.float32)
    q, k, v, lr, alpha, _ = args
    code = miras.config.config_codes
    icfg, fcfg = op_cfg(retention=code("l2", "yaad", "elastic_net", 3.0, 1e-6, 1.0, 4.0, 1e-6, 4)[1],
                        map_schedule=1, chunk_size=4)
    with pytest.raises((ValueError, RuntimeError), match="map_schedule='chunk' with retention elastic_net"):
        torch.ops.miras.chunk_fwd(q, k, v, lr, alpha, None, None, None, None, None, None, None, icfg, fcfg, False)
    icfg, fcfg = op_cfg(retention=code("l2", "yaad", "kl", 3.0, 1e-6, 1.0, 4.0, 1e-6, 4)[1], map_schedule=1,
                        chunk_size=4)
    X = st.X.float()
    with pytest.raises((ValueError, RuntimeError), match="chunk boundary only"):
        torch.ops.miras.chunk_fwd(q, k, v, lr, alpha, None, None, None, X, None, X.clone(), None, icfg, fcfg, False)
    icfg[miras._C.config_fields()["ints"].index("map_schedule")] = 2
    with pytest.raises((ValueError, RuntimeError), match="map_schedule: unknown code 2"):
        torch.ops.miras.chunk_fwd(q, k, v, lr, alpha, None, None, None, None, None, None, None, icfg, fcfg, False)


def test_layers_take_the_schedule(seed):
    torch.manual_seed(seed)
    for cls in (miras.nn.Moneta, miras.nn.Memora):
        layer = cls(32, 2, head_dim=8, chunk_size=4, map_schedule="chunk").double()
        x = torch.randn(2, 10, 32, dtype=torch.float64)
        y, cache = layer(x, use_cache=True)
        y.square().sum().backward()
        assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)
        # prefill 7 tokens then 3 steps == the full call
        y7, c7 = layer(x[:, :7], use_cache=True)
        ys = [y7]
        for t in range(7, 10):
            yt, c7 = layer(x[:, t:t + 1], cache=c7, use_cache=True)
            ys.append(yt)
        assert_close(torch.cat(ys, 1), y, 1e-10, cls.__name__)
        y_tok, _ = cls(32, 2, head_dim=8, chunk_size=4).double()(x)
        assert y_tok.shape == y.shape


def test_which_cases_run_the_reference():
    """kl / lq with the linear memory on the CPU run the C++ op (no warning, and the raw op is called);
    elastic_net, the MLP memory and the step op run the reference and warn once."""
    import miras.ops as ops

    for ret in ("kl", "lq"):
        args, kw, st = _inputs(3, ret, "l2")
        ops._WARNED.discard("chunk_maps")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                miras.memory_update(*args, **kw, chunk_size=4, map_schedule="chunk", initial_state=st)
            assert any("miras::chunk_fwd" in e.name for e in prof.events()), ret
    args, kw, st = _inputs(3, "elastic_net", "l2")
    ops._WARNED.discard("chunk_maps")
    with pytest.warns(UserWarning, match="map_schedule='chunk' with retention kl, lq or elastic_net"):
        miras.memory_update(*args, **kw, chunk_size=4, map_schedule="chunk", initial_state=st)
    assert "chunk_maps" in ops._WARNED


# ---- the op's registration: opcheck, torch.compile -------------------------------------------------
@pytest.mark.parametrize("ret", ["kl", "lq"])
def test_opcheck_chunk_schedule(seed, ret):
    args, kw, st = _inputs(seed, ret, "lp", T=9, requires_grad=True)
    q, k, v, lr, alpha, mom = args
    code = miras.config.config_codes("lp", "yaad", ret, 3.0, 1e-6, 1.5, 4.0, 1e-6, 4)
    icfg, fcfg = op_cfg(bias=code[0], retention=code[1], chunk_size=4, map_schedule=1, kl_scale=1.5, scale=0.5)
    fwd = (q, k, v, lr, alpha, mom, None, None, st.X, st.P, None, None, icfg, fcfg, True)
    torch.library.opcheck(torch.ops.miras.chunk_fwd.default, fwd)
    o, XT, PT, AT, cX, cP = torch.ops.miras.chunk_fwd(*[t.detach() if isinstance(t, torch.Tensor) else t for t in fwd])
    g = torch.Generator().manual_seed(seed)
    dO, dXT, dPT = (torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (o, XT, PT))
    bwd = (dO, dXT, dPT, *[t.detach() if isinstance(t, torch.Tensor) else t for t in fwd[:12]], cX, cP, icfg, fcfg)
    torch.library.opcheck(torch.ops.miras.chunk_bwd.default, bwd)


class _ChunkScheduleLayer(torch.nn.Module):
    def __init__(self, retention):
        super().__init__()
        self.qkv = torch.nn.Linear(12, 2 * (4 + 4 + 3))
        self.gates = torch.nn.Linear(12, 2 * 2)
        self.retention = retention

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 2, 11).split([4, 4, 3], dim=-1)
        k = torch.nn.functional.normalize(k, dim=-1)
        g = self.gates(x).view(B, T, 2, 2)
        o, s = miras.memory_update(q.contiguous(), k.contiguous(), v.contiguous(), 0.5 * torch.sigmoid(g[..., 0]),
                                   0.5 + 0.5 * torch.sigmoid(g[..., 1]), bias="l2", retention=self.retention,
                                   chunk_size=4, map_schedule="chunk", output_final_state=True)
        return o.sum(-1) + s.R.sum((-1, -2))[:, None, :]


@pytest.mark.parametrize("ret", ["kl", "lq"])
def test_torch_compile_fullgraph_chunk_schedule(seed, ret):
    torch.manual_seed(seed)
    m = _ChunkScheduleLayer(ret).double()
    # T = 12, a multiple of the chunk: R = φ(X_T). (Inside a chunk R also depends on the final anchor,
    # which under torch.compile is a constant for autograd, as the README says.)
    assert_compiled_matches(m, torch.randn(2, 12, 12, dtype=torch.float64))


# ---- lq_map="mirror": the mirror map of an lq regulariser (an option beside Eq. 24) ----------------
def test_lq_mirror_map_formula_and_degree(seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    cfg = R._Cfg("linear", "l2", "lq", 3.0, 1e-6, "yaad", 1.0, 4.0, 1e-6, None, None, "token", "mirror")
    n = A.abs().pow(4).sum((-2, -1), keepdim=True).pow(0.25)
    assert_close(R._phi(A, cfg), torch.sign(A) * A.abs().pow(3) / n.pow(2), 1e-14, "formula")
    assert_close(R._phi(2.5 * A, cfg), 2.5 * R._phi(A, cfg), 1e-14, "degree 1")
    eq24 = R._Cfg("linear", "l2", "lq", 3.0, 1e-6, "yaad", 1.0, 4.0, 1e-6, None, None, "token", "eq24")
    assert_close(R._phi(2.5 * A, eq24), R._phi(A, eq24) / 2.5, 1e-14, "Eq. 24 has degree 3 - q = -1")
    # it is the gradient of ‖A‖_q² / 2
    Ag = A.clone().requires_grad_(True)
    (Ag.abs().pow(4).sum((-2, -1)).pow(0.5) / 2).sum().backward()
    assert_close(R._phi(A, cfg), Ag.grad, 1e-13, "gradient of ‖A‖_q²/2")


@pytest.mark.parametrize("schedule", ["token", "chunk"])
@pytest.mark.parametrize("mem", ["linear", "mlp"])
def test_lq_mirror_loop_equals_chunked_and_op(seed, schedule, mem):
    args, kw, st = _inputs(seed, "lq", "lp", memory=mem, T=13, requires_grad=True)
    common = dict(kw, memory=mem, chunk_size=4, map_schedule=schedule, lq_map="mirror", initial_state=st,
                  output_final_state=True)
    o1, s1 = R.memory_update_loop(*args, **common)
    o2, s2 = R.memory_update_chunked(*args, **common)
    assert_close(o2, o1, 1e-10, "o")
    _states_close(s2, s1, 1e-10, "final")
    o3, s3 = miras.memory_update(*args, **common)      # the op runs the reference for it
    assert_close(o3, o2, 1e-12, "op")  # the op runs the chunked reference
    o_eq, _ = R.memory_update_loop(*args, **dict(common, lq_map="eq24"))
    assert (o_eq - o1).abs().max() > 1e-6 * o1.abs().max()
    g1 = torch.autograd.grad(o1.square().sum(), args[0])[0]
    g2 = torch.autograd.grad(o2.square().sum(), args[0])[0]
    assert_close(g2, g1, 1e-9, "dq")


def test_lq_mirror_gradcheck(seed):
    args, kw, st = _inputs(seed, "lq", "l2", T=5, B=1, H=1, Dk=3, Dv=2, requires_grad=True)

    def f(q, k, v, lr, alpha, mom, X0):
        o, s = R.memory_update_chunked(q, k, v, lr, alpha, mom, **kw, chunk_size=2, lq_map="mirror",
                                       initial_state=MemoryState(X=X0), output_final_state=True)
        return o, s.X

    assert torch.autograd.gradcheck(f, (*args, st.X), atol=1e-7, rtol=1e-5)


def test_lq_mirror_never_reaches_a_backend_as_eq24():
    with pytest.raises(ValueError, match="lq_map"):
        miras.Config(retention="lq", lq_map="eq25")
    with pytest.raises(ValueError, match="lq_map='mirror' is computed by miras.reference only"):
        miras.Config(retention="lq", lq_map="mirror").arrays(8, 1.0, 0.0)
    miras.Config(retention="l2", lq_map="mirror").arrays(8, 1.0, 0.0)  # no lq map: nothing to refuse


def test_lq_mirror_layer_initial_state_reads_its_weights(seed):
    torch.manual_seed(seed)
    layer = miras.nn.Moneta(32, 2, head_dim=8, lq_map="mirror", map_schedule="chunk").double()
    cfg = R._Cfg("mlp", "lp", "lq", 3.0, 1e-6, "yaad", 1.0, 4.0, 1e-6, None, None, "chunk", "mirror")
    W = torch.randn(2, 8, 32, dtype=torch.float64)
    assert_close(R._phi(layer._raw_from_weights(W), cfg), W, 1e-12, "φ(raw(W)) == W")
    y, _ = layer(torch.randn(2, 9, 32, dtype=torch.float64))
    assert torch.isfinite(y).all()
