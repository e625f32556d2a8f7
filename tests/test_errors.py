"""Bad inputs raise a clear error (ValueError, naming the argument) and never crash the process.

Every case first checks that the *valid* call succeeds (so a raise comes from the one bad
argument), then makes one thing wrong. After all the bad calls, a valid call still works.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import make_inputs, op_cfg, op_kwargs

miras = pytest.importorskip("miras")
from miras.state import MemoryState  # noqa: E402

B, T, H, Dk, Dv = 2, 6, 2, 4, 3
NAMES = ["q", "k", "v", "lr", "alpha", "momentum"]


@pytest.fixture
def good(seed):
    args, kw = make_inputs(B=B, T=T, H=H, Dk=Dk, Dv=Dv, dtype=torch.float32, momentum=True, seed=seed)
    return dict(zip(NAMES, args))


def call(a, **kw):
    return miras.memory_update(a["q"], a["k"], a["v"], a["lr"], a["alpha"], a["momentum"], **kw)


def with_(a, **changes):
    b = dict(a)
    b.update(changes)
    return b


def test_valid_call_works(good):
    o, s = call(good, chunk_size=4, output_final_state=True)
    assert o.shape == (B, T, H, Dv) and torch.isfinite(o).all()


# ---- shapes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,shape", [
    ("q", (B, T, H)), ("q", (B, T, H, Dk, 1)), ("k", (B, T, H, Dk + 1)), ("k", (B, T + 1, H, Dk)),
    ("v", (B, T, H + 1, Dv)), ("v", (B, T, Dv)), ("lr", (B, T)), ("lr", (B, T, H, 1)), ("alpha", (B, T, H + 1)),
    ("momentum", (B, T - 1, H)),
])
def test_bad_shape(good, name, shape):
    bad = torch.rand(shape) * 0.5 + 0.25
    with pytest.raises(ValueError, match=name):
        call(with_(good, **{name: bad}))


@pytest.mark.parametrize("name", ["delta", "robust_delta", "gamma"])
def test_bad_param_shape(good, name):
    kw = {"delta": dict(bias="huber"), "robust_delta": dict(bias="robust"),
          "gamma": dict(retention="elastic_net")}[name]
    call(good, **kw, **{name: torch.full((B, T, H), 0.5)})  # the right shape works
    with pytest.raises(ValueError, match=name):
        call(good, **kw, **{name: torch.full((B, T, H + 1), 0.5)})


def test_not_a_tensor(good):
    with pytest.raises((ValueError, TypeError), match="q"):
        call(with_(good, q=[[1.0]]))
    with pytest.raises((ValueError, TypeError), match="lr"):
        call(with_(good, lr=0.1))


# ---- dtypes and devices --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["k", "v"])
def test_mismatched_qkv_dtype(good, name):
    with pytest.raises(ValueError, match="dtype"):
        call(with_(good, **{name: good[name].double()}))


@pytest.mark.parametrize("name", ["q", "lr", "alpha"])
def test_integer_dtype(good, name):
    with pytest.raises(ValueError, match=name):
        call(with_(good, **{name: (good[name] * 10).long()}))


@pytest.mark.parametrize("name", ["k", "lr", "momentum"])
def test_mismatched_device(good, name):
    other = torch.device("cuda") if torch.cuda.is_available() else torch.device("meta")
    with pytest.raises(ValueError, match=name):
        call(with_(good, **{name: good[name].to(other)}))


# ---- gate ranges (SPEC §2) -----------------------------------------------------------------------
@pytest.mark.parametrize("name,value", [
    ("lr", -0.1), ("lr", math.nan), ("lr", math.inf), ("alpha", 0.0), ("alpha", 1.0001), ("alpha", -0.5),
    ("alpha", math.nan), ("momentum", 1.0), ("momentum", -0.01), ("momentum", math.nan),
])
def test_gate_out_of_range(good, name, value):
    bad = good[name].clone()
    bad[1, 3, 0] = value  # a single bad entry is enough
    with pytest.raises(ValueError, match=name):
        call(with_(good, **{name: bad}))


def test_gate_edges_are_valid(good):
    """The closed ends of SPEC §2's ranges are accepted: lr = 0, alpha = 1, momentum = 0."""
    a = with_(good, lr=torch.zeros_like(good["lr"]), alpha=torch.ones_like(good["alpha"]),
              momentum=torch.zeros_like(good["momentum"]))
    o, _ = call(a)
    assert torch.isfinite(o).all()


def test_check_inputs_false_skips_value_checks(good):
    bad = good["alpha"].clone()
    bad[0, 0, 0] = 1.5
    o, _ = call(with_(good, alpha=bad), check_inputs=False)  # no raise, no crash
    assert o.shape == (B, T, H, Dv)


@pytest.mark.parametrize("name,kw,value", [
    ("delta", dict(bias="huber"), 0.0), ("delta", dict(bias="huber"), -1.0), ("delta", dict(bias="huber"), math.nan),
    ("robust_delta", dict(bias="robust"), -0.1), ("gamma", dict(retention="elastic_net"), -1e-3),
])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
def test_param_out_of_range(good, name, kw, value, as_tensor):
    if as_tensor:
        t = torch.full((B, T, H), 0.5)
        t[0, 2, 1] = value
        value = t
    with pytest.raises(ValueError, match=name):
        call(good, **kw, **{name: value})


@pytest.mark.parametrize("name,value", [("p", 0.5), ("eps", 0.0), ("kl_scale", -1.0), ("q_norm", 1.5),
                                        ("eps_q", 0.0), ("scale", math.nan)])
def test_bad_scalar_config(good, name, value):
    kw = dict(bias="lp", retention={"kl_scale": "kl", "q_norm": "lq", "eps_q": "lq"}.get(name, "l2"))
    call(good, **kw)
    with pytest.raises(ValueError, match=name):
        call(good, **kw, **{name: value})


# ---- configuration -------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,name", [(dict(bias="l3"), "bias"), (dict(retention="l1"), "retention"),
                                     (dict(bias="huber", huber_mode="soft"), "huber_mode"),
                                     (dict(memory="transformer"), "memory")])
def test_unknown_choice(good, kw, name):
    with pytest.raises(ValueError, match=name):
        call(good, **kw)


@pytest.mark.parametrize("C", [0, -3, 2.5, True])
def test_bad_chunk_size(good, C):
    with pytest.raises(ValueError, match="chunk_size"):
        call(good, chunk_size=C)


# ---- cu_seqlens ----------------------------------------------------------------------------------
@pytest.fixture
def packed(seed):
    args, _ = make_inputs(B=1, T=10, H=H, Dk=Dk, Dv=Dv, dtype=torch.float32, momentum=False, seed=seed)
    return dict(zip(NAMES, args))


def test_cu_seqlens_valid(packed):
    o, s = call(packed, cu_seqlens=torch.tensor([0, 3, 10], dtype=torch.int32), output_final_state=True)
    assert s.X.shape[0] == 2


@pytest.mark.parametrize("cu", [
    torch.tensor([0.0, 3.0, 10.0]),                    # float
    torch.tensor([1, 3, 10]),                          # not starting at 0
    torch.tensor([0, 6, 3, 10]),                       # decreasing
    torch.tensor([0, 3, 9]),                           # wrong end
    torch.tensor([0, 3, 11]),                          # past the end
    torch.tensor([0]),                                 # no segment
    torch.tensor([[0, 3, 10]]),                        # 2-D
], ids=["float", "start", "decreasing", "end-short", "end-long", "empty", "2d"])
def test_bad_cu_seqlens(packed, cu):
    with pytest.raises(ValueError, match="cu_seqlens"):
        call(packed, cu_seqlens=cu)


def test_cu_seqlens_with_batch(good):
    with pytest.raises(ValueError, match="cu_seqlens|batch"):
        call(good, cu_seqlens=torch.tensor([0, 3, T]))


def test_cu_seqlens_state_count(packed):
    X = torch.zeros(1, H, Dk, Dv)  # one state for two segments
    with pytest.raises(ValueError, match="initial_state"):
        call(packed, cu_seqlens=torch.tensor([0, 3, 10]), initial_state=MemoryState(X=X))


# ---- states --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(B, H, Dk, Dv + 1), (B + 1, H, Dk, Dv), (B, H, Dk), (B, H, Dv, Dk)])
def test_state_wrong_shape(good, shape):
    with pytest.raises(ValueError, match="initial_state"):
        call(good, initial_state=MemoryState(X=torch.zeros(shape)))


def test_state_P_wrong_shape(good):
    X = torch.zeros(B, H, Dk, Dv)
    with pytest.raises(ValueError, match="initial_state.P"):
        call(good, initial_state=MemoryState(X=X, P=torch.zeros(B, H, Dk, Dv + 1)))


def test_state_nonzero_offset(good):
    X = 0.1 * torch.ones(B, H, Dk, Dv)
    st = MemoryState(X=X, anchor=X, offset=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="offset"):
        call(good, initial_state=st)


def test_state_P_without_momentum(good):
    X = torch.zeros(B, H, Dk, Dv)
    with pytest.raises(ValueError, match="momentum"):
        call(with_(good, momentum=None), initial_state=MemoryState(X=X, P=torch.zeros_like(X)))


def test_state_not_a_memory_state(good):
    with pytest.raises(ValueError, match="initial_state"):
        call(good, initial_state=torch.zeros(B, H, Dk, Dv))


def test_state_anchor_differs_at_boundary(good):
    X = torch.zeros(B, H, Dk, Dv)
    with pytest.raises(ValueError, match="anchor"):
        call(good, initial_state=MemoryState(X=X, anchor=X + 1.0))


# ---- memory_step ---------------------------------------------------------------------------------
def _step_inputs(good):
    return [good[n][:, 0] for n in NAMES]


def test_step_valid(good):
    st = MemoryState(X=torch.zeros(B, H, Dk, Dv), P=torch.zeros(B, H, Dk, Dv))
    o, s = miras.memory_step(*_step_inputs(good), state=st, chunk_size=4)
    assert o.shape == (B, H, Dv) and int(s.offset[0]) == 1


def test_step_bad_inputs(good):
    st = MemoryState(X=torch.zeros(B, H, Dk, Dv), P=torch.zeros(B, H, Dk, Dv))
    q, k, v, lr, alpha, mom = _step_inputs(good)
    with pytest.raises(ValueError, match="q"):
        miras.memory_step(good["q"], k, v, lr, alpha, mom, state=st)  # [B, T, H, Dk]: not one token
    with pytest.raises(ValueError, match="alpha"):
        miras.memory_step(q, k, v, lr, alpha * 0, mom, state=st)
    with pytest.raises(ValueError, match="state"):
        miras.memory_step(q, k, v, lr, alpha, mom, state=None)
    with pytest.raises(ValueError, match="offset"):
        miras.memory_step(q, k, v, lr, alpha, mom, state=MemoryState(X=st.X, P=st.P, offset=torch.tensor([0, 4])),
                          chunk_size=4)
    with pytest.raises(ValueError, match="state.X"):
        miras.memory_step(q, k, v, lr, alpha, mom, state=MemoryState(X=torch.zeros(B, H, Dk + 1, Dv)))
    with pytest.raises(ValueError, match="momentum"):
        miras.memory_step(q, k, v, lr, alpha, None, state=st)
    with pytest.raises(ValueError, match="chunk_size"):
        miras.memory_step(q, k, v, lr, alpha, mom, state=st, chunk_size=0)


# ---- the raw op: checks for direct callers of torch.ops.miras.* ----------------------------------
def _raw(a, **over):
    args = dict(q=a["q"], k=a["k"], v=a["v"], lr=a["lr"], alpha=a["alpha"], momentum=a["momentum"])
    args.update(over)
    return torch.ops.miras.chunk_fwd(args["q"], args["k"], args["v"], args["lr"], args["alpha"], args["momentum"],
                                     None, None, None, None, None, None,
                                     *op_cfg(bias=over.get("bias", 1), retention=over.get("ret", 0), scale=0.5,
                                             chunk_size=over.get("C", 4)), False)


def test_raw_op_checks(good):
    _raw(good)
    with pytest.raises(RuntimeError, match="k"):
        _raw(good, k=good["k"][:, :, :, :2])
    with pytest.raises(RuntimeError, match="lr"):
        _raw(good, lr=good["lr"][:, :2])
    with pytest.raises(RuntimeError, match="chunk_size"):
        _raw(good, C=0)
    with pytest.raises(RuntimeError, match="bias"):
        _raw(good, bias=42)
    with pytest.raises(RuntimeError, match="retention"):
        _raw(good, ret=-1)


def test_process_survives(good):
    """After all the bad calls above (same process), the op still works and is correct."""
    o1, _ = call(good, chunk_size=3)
    o2, _ = call(good, chunk_size=3)
    assert torch.equal(o1, o2) and torch.isfinite(o1).all()
