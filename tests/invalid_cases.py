"""Invalid inputs for ``memory_update`` / ``memory_step`` and the raw ops (tests/test_invalid.py).

Run as a worker process: ``python invalid_cases.py SEED COUNT START`` evaluates cases START..COUNT-1
of the deterministic list ``generate(SEED, COUNT)`` and prints one JSON line per case:
``{"i": ..., "kind": ..., "status": ..., "type": ..., "msg": ...}`` after a ``START i`` line, so
that the parent can tell which case killed the process if one ever does (abort, segfault).

Each case is a random small *valid* configuration (shapes, bias, retention, momentum, varlen,
initial state) and one thing made wrong. The worker first checks that the valid call succeeds
(so that the raise comes from the one change), then makes the bad call. Status:
- ``raised``: an exception whose message names the argument (``want`` regex) — the pass;
- ``wrong_type`` (API calls must raise ValueError), ``unnamed`` (message does not name it),
  ``no_raise``, ``base_failed``: failures reported by the test;
- ``ok_equal`` / ``not_equal``: the raw-op "valid but non-contiguous" cases, which must succeed and
  equal the contiguous call.
"""
from __future__ import annotations

import json
import math
import random
import re
import sys
import traceback

import torch

import miras
from miras.state import MemoryState

_ORDER = miras._C.config_fields()
_CFG_DEFAULTS = dict(bias=1, retention=0, chunk_size=64, p=3.0, eps=1e-6, bias_param=1.0, ret_param=0.0, kl_scale=1.0,
                     q_norm=4.0, eps_q=1e-6, scale=1.0, map_schedule=0)


def op_cfg(**fields):
    """[icfg, fcfg] of the raw ops (csrc/core/params.h's field order, from the extension)."""
    vals = dict(_CFG_DEFAULTS, **fields)
    return [[int(vals[n]) for n in _ORDER["ints"]], [float(vals[n]) for n in _ORDER["floats"]]]


def cfg_set(arrays, **fields):
    """A copy of [icfg, fcfg] with some fields set to raw (also invalid) values."""
    icfg, fcfg = list(arrays[0]), list(arrays[1])
    for n, v in fields.items():
        if n in _ORDER["ints"]:
            icfg[_ORDER["ints"].index(n)] = v
        else:
            fcfg[_ORDER["floats"].index(n)] = v
    return [icfg, fcfg]

BIASES = [("dot", "yaad"), ("l2", "yaad"), ("lp", "yaad"), ("huber", "yaad"), ("huber", "coord"), ("huber", "norm"),
          ("robust", "yaad")]
RETENTIONS = ["l2", "kl", "elastic_net", "lq"]
BIAS_CODE = {"dot": 0, "l2": 1, "lp": 2, "robust": 6, ("huber", "yaad"): 3, ("huber", "coord"): 4,
             ("huber", "norm"): 5}
RET_CODE = {"l2": 0, "kl": 1, "elastic_net": 2, "lq": 3}
META = torch.device("meta")


# ---------------------------------------------------------------------------------------------
# A valid base configuration
# ---------------------------------------------------------------------------------------------
class Base:
    def __init__(self, rng: random.Random, force=None):
        f = force or {}
        self.B = f.get("B", rng.choice([1, 1, 2, 3]))
        self.T = f.get("T", rng.choice([1, 2, 5, 8]))
        self.H = rng.choice([1, 2])
        self.Dk = rng.choice([1, 2, 3, 4])
        self.Dv = rng.choice([1, 2, 3, 5])
        self.C = rng.choice([1, 2, 3, 16])
        self.bias, self.hm = f.get("bias", rng.choice(BIASES))
        self.retention = f.get("retention", rng.choice(RETENTIONS))
        self.mom = f.get("mom", rng.random() < 0.5)
        self.varlen = f.get("varlen", self.B == 1 and rng.random() < 0.3)
        self.init = f.get("init", rng.random() < 0.4)
        self.tensor_params = rng.random() < 0.5
        self.dtype = rng.choice([torch.float32, torch.float64])
        g = torch.Generator().manual_seed(rng.randrange(2 ** 31))
        B, T, H, Dk, Dv = self.B, self.T, self.H, self.Dk, self.Dv
        self.t = dict(
            q=torch.randn(B, T, H, Dk, generator=g, dtype=self.dtype),
            k=torch.nn.functional.normalize(torch.randn(B, T, H, Dk, generator=g, dtype=self.dtype), dim=-1),
            v=torch.randn(B, T, H, Dv, generator=g, dtype=self.dtype),
            lr=0.05 + 0.1 * torch.rand(B, T, H, generator=g, dtype=self.dtype),
            alpha=0.8 + 0.2 * torch.rand(B, T, H, generator=g, dtype=self.dtype),
            momentum=(0.5 * torch.rand(B, T, H, generator=g, dtype=self.dtype)) if self.mom else None,
        )
        self.kw = dict(bias=self.bias, retention=self.retention, chunk_size=self.C)
        if self.bias == "huber":
            self.kw["huber_mode"] = self.hm
            self.kw["delta"] = (0.5 + torch.rand(B, T, H, generator=g, dtype=self.dtype)) if self.tensor_params else 1.0
        if self.bias == "robust":
            self.kw["robust_delta"] = torch.rand(B, T, H, generator=g, dtype=self.dtype) if self.tensor_params else 0.5
        if self.retention == "elastic_net":
            self.kw["gamma"] = 1e-3 * torch.rand(B, T, H, generator=g, dtype=self.dtype) if self.tensor_params else 1e-3
        self.segs = None
        if self.varlen:
            cut = sorted(rng.randint(0, T) for _ in range(rng.randint(0, 3)))
            self.cu = torch.tensor([0] + cut + [T], dtype=rng.choice([torch.int32, torch.int64]))
            self.kw["cu_seqlens"] = self.cu
        self.N = (self.cu.numel() - 1) if self.varlen else B
        sdt = self.dtype
        if self.init:
            X = 0.1 * torch.randn(self.N, H, Dk, Dv, generator=g, dtype=sdt)
            P = 0.1 * torch.randn(self.N, H, Dk, Dv, generator=g, dtype=sdt) if self.mom else None
            self.kw["initial_state"] = MemoryState(X=X, P=P)

    def args(self):
        t = self.t
        return [t["q"], t["k"], t["v"], t["lr"], t["alpha"], t["momentum"]]

    def call(self, args=None, kw=None):
        a = self.args() if args is None else args
        return miras.memory_update(*a, **(self.kw if kw is None else kw))

    def state_shape(self):
        return (self.N, self.H, self.Dk, self.Dv)


def _replace(base, name, value):
    a = base.args()
    i = ["q", "k", "v", "lr", "alpha", "momentum"].index(name)
    a[i] = value
    return a


# ---------------------------------------------------------------------------------------------
# Mutations of the functional API (each returns (call, want_regex) or None when not applicable)
# ---------------------------------------------------------------------------------------------
def _word(*names):
    return r"\b(" + "|".join(re.escape(n) for n in names) + r")\b"


def m_rank(base, rng):
    name = rng.choice(["q", "k", "v", "lr", "alpha"] + (["momentum"] if base.mom else []))
    t = base.t[name]
    bad = t.unsqueeze(-1) if rng.random() < 0.5 else t[..., 0]
    return (lambda: base.call(_replace(base, name, bad))), _word(name)


def m_shape(base, rng):
    name = rng.choice(["k", "v", "lr", "alpha"] + (["momentum"] if base.mom else []))
    t = base.t[name]
    dims = list(t.shape)
    if name == "v":
        d = rng.choice([0, 1, 2])          # v's last dim is free (Dv)
    else:
        d = rng.randrange(len(dims))
    dims[d] += rng.choice([1, -1]) if dims[d] > 1 else 1
    bad = torch.rand(dims, dtype=t.dtype) * 0.5 + 0.25
    return (lambda: base.call(_replace(base, name, bad))), _word(name)


def m_dtype(base, rng):
    name = rng.choice(["q", "k", "v", "lr", "alpha"] + (["momentum"] if base.mom else []))
    dt = rng.choice([torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64])
    bad = base.t[name].to(dt)
    return (lambda: base.call(_replace(base, name, bad))), _word(name)


def m_qkv_dtype_mismatch(base, rng):
    name = rng.choice(["k", "v"])
    other = torch.float64 if base.dtype == torch.float32 else torch.float32
    bad = base.t[name].to(other)
    return (lambda: base.call(_replace(base, name, bad))), r"dtype"


def m_device(base, rng):
    name = rng.choice(["k", "v", "lr", "alpha"] + (["momentum"] if base.mom else []))
    bad = base.t[name].to(META)
    return (lambda: base.call(_replace(base, name, bad))), _word(name)


def m_not_tensor(base, rng):
    name = rng.choice(["q", "k", "v", "lr", "alpha"] + (["momentum"] if base.mom else []))
    bad = rng.choice([None, 0.1, [[0.1]], "x"]) if name != "momentum" else rng.choice([0.1, "x", [0.1]])
    if name != "q" and bad is None:
        bad = 0.1
    return (lambda: base.call(_replace(base, name, bad))), _word(name)


GATE_BAD = {
    "lr": [-1e-3, -1.0, -math.inf, math.nan, math.inf],
    "alpha": [0.0, -0.5, 1.0 + 1e-6, 2.0, math.nan, math.inf, -math.inf],
    "momentum": [1.0, 1.5, -1e-6, math.nan, math.inf, -math.inf],
}


def m_gate_value(base, rng):
    name = rng.choice(["lr", "alpha"] + (["momentum"] if base.mom else []))
    t = base.t[name].clone()
    idx = tuple(rng.randrange(s) for s in t.shape)
    t[idx] = rng.choice(GATE_BAD[name])
    return (lambda: base.call(_replace(base, name, t))), _word(name)


SCALAR_BAD = {
    "p": [0.999, 0.5, 0.0, -1.0, math.nan, math.inf, "3", True, None],
    "eps": [0.0, -1e-6, math.nan, math.inf, "x"],
    "kl_scale": [0.0, -1.0, math.nan, math.inf],
    "q_norm": [1.999, 1.0, 0.0, -2.0, math.nan, math.inf],
    "eps_q": [0.0, -1.0, math.nan],
    "scale": [math.nan, math.inf, -math.inf, "x", True],
    "chunk_size": [0, -1, 1.5, True, "4", None, 2.0],
    "map_schedule": ["chunks", "paper", "Token", 1, None, ""],
}


def m_scalar(base, rng):
    name = rng.choice(list(SCALAR_BAD))
    kw = dict(base.kw)
    kw[name] = rng.choice(SCALAR_BAD[name])
    return (lambda: base.call(kw=kw)), _word(name)


def m_choice(base, rng):
    name = rng.choice(["bias", "retention", "huber_mode", "memory"])
    kw = dict(base.kw)
    if name == "huber_mode":
        kw["bias"] = "huber"
        kw.setdefault("delta", 1.0)
    kw[name] = rng.choice(["L2", "foo", "", None, 3])
    return (lambda: base.call(kw=kw)), _word(name)


PARAM_LO = {"delta": [0.0, -1.0, math.nan, math.inf, -math.inf],
            "robust_delta": [-1e-3, -1.0, math.nan, math.inf],
            "gamma": [-1e-3, -1.0, math.nan, math.inf]}


def _param_base(rng, name):
    force = {"delta": dict(bias=("huber", rng.choice(["yaad", "coord", "norm"]))),
             "robust_delta": dict(bias=("robust", "yaad")), "gamma": dict(retention="elastic_net")}[name]
    return Base(rng, force)


def m_param_value(base, rng):
    name = rng.choice(list(PARAM_LO))
    base = _param_base(rng, name)
    kw = dict(base.kw)
    bad = rng.choice(PARAM_LO[name])
    if rng.random() < 0.5:
        t = torch.full((base.B, base.T, base.H), 0.5, dtype=base.dtype)
        t[tuple(rng.randrange(s) for s in t.shape)] = bad
        bad = t
    kw[name] = bad
    return (lambda: base.call(kw=kw)), _word(name), base


def m_param_shape(base, rng):
    name = rng.choice(list(PARAM_LO))
    base = _param_base(rng, name)
    kw = dict(base.kw)
    shape = rng.choice([(base.B, base.T, base.H + 1), (base.B, base.T), (), (base.B, base.T + 1, base.H),
                        (base.B, base.T, base.H, 1)])
    kind = rng.choice(["shape", "dtype", "device", "type"])
    if kind == "shape":
        kw[name] = torch.full(shape, 0.5, dtype=base.dtype)
    elif kind == "dtype":
        kw[name] = torch.ones((base.B, base.T, base.H), dtype=rng.choice([torch.int64, torch.bool]))
    elif kind == "device":
        kw[name] = torch.full((base.B, base.T, base.H), 0.5, device=META)
    else:
        kw[name] = rng.choice(["0.5", [0.5], None, True])
    return (lambda: base.call(kw=kw)), _word(name), base


def m_cu_seqlens(base, rng):
    base = Base(rng, dict(B=1, varlen=True, init=False, T=rng.choice([2, 5, 8])))
    kw = dict(base.kw)
    T = base.T
    kind = rng.choice(["decreasing", "end_low", "end_high", "start", "float", "int16", "bool", "2d", "short",
                       "batch", "device", "negative", "list"])
    if kind == "decreasing":
        bad = torch.tensor([0, T, 0, T])
    elif kind == "end_low":
        bad = torch.tensor([0, T - 1])
    elif kind == "end_high":
        bad = torch.tensor([0, 1, T + 1])
    elif kind == "start":
        bad = torch.tensor([1, T])
    elif kind == "float":
        bad = torch.tensor([0.0, float(T)])
    elif kind == "int16":
        bad = torch.tensor([0, T], dtype=torch.int16)
    elif kind == "bool":
        bad = torch.tensor([False, True])
    elif kind == "2d":
        bad = torch.tensor([[0, T]])
    elif kind == "short":
        bad = torch.tensor([0])
    elif kind == "negative":
        bad = torch.tensor([0, -1, T])
    elif kind == "device":
        bad = torch.tensor([0, T], device=META)
    elif kind == "list":
        bad = [0, T]
    else:  # batch > 1 with cu_seqlens
        b2 = Base(rng, dict(B=2, varlen=False, init=False))
        kw2 = dict(b2.kw, cu_seqlens=torch.tensor([0, b2.T]))
        return (lambda: b2.call(kw=kw2)), r"cu_seqlens|batch", b2
    kw["cu_seqlens"] = bad
    return (lambda: base.call(kw=kw)), _word("cu_seqlens"), base


def m_state(base, rng):
    base = Base(rng, dict(init=True))
    kw = dict(base.kw)
    st = kw["initial_state"]
    N, H, Dk, Dv = base.state_shape()
    kind = rng.choice(["X_shape", "X_rank", "X_dtype", "X_device", "P_shape", "P_without_momentum", "offset",
                       "offset_shape", "anchor", "anchor_shape", "not_state", "X_not_tensor"])
    want = _word("initial_state")
    if kind == "X_shape":
        dims = [N, H, Dk, Dv]
        dims[rng.randrange(4)] += 1
        new = MemoryState(X=torch.zeros(dims, dtype=base.dtype), P=st.P)
    elif kind == "X_rank":
        new = MemoryState(X=torch.zeros(N, H, Dk, dtype=base.dtype), P=st.P)
    elif kind == "X_dtype":
        new = MemoryState(X=st.X.to(rng.choice([torch.int32, torch.bool])), P=st.P)
    elif kind == "X_device":
        new = MemoryState(X=st.X.to(META), P=st.P, anchor=st.X.to(META),
                          offset=torch.zeros(N, dtype=torch.int64))
    elif kind == "P_shape":
        if not base.mom:
            return None
        new = MemoryState(X=st.X, P=torch.zeros(N, H, Dk + 1, Dv, dtype=base.dtype))
    elif kind == "P_without_momentum":
        a = base.args()
        a[5] = None
        new = MemoryState(X=st.X, P=torch.zeros_like(st.X))
        kw["initial_state"] = new
        return (lambda: base.call(a, kw)), r"momentum|initial_state\.P", base
    elif kind == "offset":
        new = MemoryState(X=st.X, P=st.P, offset=torch.full((N,), rng.randint(1, 5), dtype=torch.int64))
        want = _word("offset")
    elif kind == "offset_shape":
        new = MemoryState(X=st.X, P=st.P, offset=torch.zeros(N + 1, dtype=torch.int64))
        want = _word("offset")
    elif kind == "anchor":
        new = MemoryState(X=st.X, P=st.P, anchor=st.X + 1.0)
        want = _word("anchor")
    elif kind == "anchor_shape":
        new = MemoryState(X=st.X, P=st.P, anchor=torch.zeros(N, H, Dk, Dv + 1, dtype=base.dtype))
        want = _word("anchor")
    elif kind == "not_state":
        new = rng.choice([st.X, (st.X, st.P), {"X": st.X}])
    else:
        new = MemoryState.__new__(MemoryState)
        new.X, new.P, new.anchor, new.offset = [[0.0]], None, [[0.0]], torch.zeros(N, dtype=torch.int64)
    kw["initial_state"] = new
    return (lambda: base.call(kw=kw)), want, base


def m_head_dims(base, rng):
    B, T = base.B, base.T
    H, Dk, Dv = rng.choice([(0, 2, 2), (1, 0, 2), (1, 2, 0), (2, 0, 0)])
    a = [torch.zeros(B, T, H, Dk), torch.zeros(B, T, H, Dk), torch.zeros(B, T, H, Dv),
         torch.full((B, T, H), 0.1), torch.full((B, T, H), 0.9), None]
    return (lambda: miras.memory_update(*a)), r"head|H\b|Dk|Dv"


def m_step(base, rng):
    base = Base(rng, dict(init=True, varlen=False))
    st = base.kw["initial_state"]
    C = base.C
    a = [x[:, 0] if x is not None else None for x in base.args()]
    kw = {k: (v[:, 0] if isinstance(v, torch.Tensor) else v) for k, v in base.kw.items() if k != "initial_state"}
    kw["state"] = st
    kind = rng.choice(["rank", "offset_high", "offset_neg", "P_without_momentum", "anchor_shape", "not_state",
                       "gate_shape", "gate_value", "X_shape"])
    want = None
    if kind == "rank":
        a[0] = base.t["q"]
        want = _word("q")
    elif kind == "offset_high":
        kw["state"] = MemoryState(X=st.X, P=st.P, offset=torch.full((base.B,), C, dtype=torch.int64))
        want = _word("offset")
    elif kind == "offset_neg":
        kw["state"] = MemoryState(X=st.X, P=st.P, offset=torch.full((base.B,), -1, dtype=torch.int64))
        want = _word("offset")
    elif kind == "P_without_momentum":
        a[5] = None
        kw["state"] = MemoryState(X=st.X, P=torch.zeros_like(st.X))
        want = r"momentum|state\.P"
    elif kind == "anchor_shape":
        kw["state"] = MemoryState(X=st.X, P=st.P, anchor=torch.zeros(base.B, base.H, base.Dk + 1, base.Dv,
                                                                     dtype=base.dtype))
        want = _word("anchor")
    elif kind == "not_state":
        kw["state"] = rng.choice([None, st.X])
        want = _word("state")
    elif kind == "gate_shape":
        a[3] = torch.full((base.B, base.H + 1), 0.1, dtype=base.dtype)
        want = _word("lr")
    elif kind == "gate_value":
        a[4] = a[4].clone()
        a[4][0, 0] = rng.choice(GATE_BAD["alpha"])
        want = _word("alpha")
    else:
        kw["state"] = MemoryState(X=torch.zeros(base.B + 1, base.H, base.Dk, base.Dv, dtype=base.dtype), P=None)
        want = _word("state")

    def good():
        good_kw = dict(kw, state=st)
        good_a = [x[:, 0] if x is not None else None for x in base.args()]
        return miras.memory_step(*good_a, **good_kw)

    return (lambda: miras.memory_step(*a, **kw)), want, base, good


API_MUTATIONS = [m_rank, m_shape, m_dtype, m_qkv_dtype_mismatch, m_device, m_not_tensor, m_gate_value, m_scalar,
                 m_choice, m_param_value, m_param_shape, m_cu_seqlens, m_state, m_head_dims, m_step]


# ---------------------------------------------------------------------------------------------
# The raw registered ops (no Python checks in front of the C++ glue)
# ---------------------------------------------------------------------------------------------
def raw_fwd_args(base, save=True):
    t = base.t
    code = BIAS_CODE[(base.bias, base.hm)] if base.bias == "huber" else BIAS_CODE[base.bias]
    bp = base.kw.get("delta") if base.bias == "huber" else base.kw.get("robust_delta") if base.bias == "robust" else None
    rp = base.kw.get("gamma") if base.retention == "elastic_net" else None
    st = base.kw.get("initial_state")
    cu = base.kw.get("cu_seqlens")
    return [t["q"], t["k"], t["v"], t["lr"], t["alpha"], t["momentum"],
            bp if isinstance(bp, torch.Tensor) else None, rp if isinstance(rp, torch.Tensor) else None,
            st.X if st is not None else None, st.P if st is not None else None, None,
            cu.to(torch.int64) if cu is not None else None,
            *op_cfg(bias=code, retention=RET_CODE[base.retention], ret_param=1e-3, scale=base.Dk ** -0.5,
                    chunk_size=base.C), save]


FWD_NAMES = ["q", "k", "v", "lr", "alpha", "momentum", "bias_param", "ret_param", "X0", "P0", "A0", "cu_seqlens"]


def m_raw_fwd(base, rng):
    base = Base(rng)
    args = raw_fwd_args(base)
    B, T, H, Dk, Dv, N = base.B, base.T, base.H, base.Dk, base.Dv, base.N
    kind = rng.choice(["q_rank", "k_shape", "v_shape", "gate_shape", "param_shape", "state_shape", "cu_bad",
                       "cu_float", "chunk", "schedule_code", "bias_code", "ret_code", "int_dtype", "device", "strided",
                       "huge_chunk", "lp_p", "lq_q", "empty_dims"])
    i = None
    want = None
    if kind == "q_rank":
        i, bad, want = 0, base.t["q"][..., 0], r"\bq\b"
    elif kind == "k_shape":
        i, bad, want = 1, torch.zeros(B, T, H, Dk + 1, dtype=base.dtype), r"\bk\b"
    elif kind == "v_shape":
        i, bad, want = 2, torch.zeros(B, T + 1, H, Dv, dtype=base.dtype), r"\bv\b"
    elif kind == "gate_shape":
        i = rng.choice([3, 4, 5])
        bad = torch.full((B, T, H + 1), 0.5, dtype=base.dtype)
        want = _word(FWD_NAMES[i])
    elif kind == "param_shape":
        i = rng.choice([6, 7])
        bad = torch.full(rng.choice([(B, T, H + 1), (B, T), (1,), (B * T * H + 7,)]), 0.5, dtype=base.dtype)
        want = _word(FWD_NAMES[i])
    elif kind == "state_shape":
        i = rng.choice([8, 9, 10])
        dims = [N, H, Dk, Dv]
        dims[rng.randrange(4)] += rng.choice([1, 5])
        bad = torch.zeros(dims, dtype=base.dtype)
        want = r"initial_state"
    elif kind in ("cu_bad", "cu_float"):
        base = Base(rng, dict(B=1, varlen=True, init=False))
        args = raw_fwd_args(base)
        T = base.T
        i = 11
        bad = (rng.choice([torch.tensor([0, T, 0, T]), torch.tensor([0, T + 3]), torch.tensor([2, T]),
                           torch.tensor([0]), torch.tensor([[0, T]]), torch.tensor([0, T + 1000000])])
               if kind == "cu_bad" else torch.tensor([0.0, float(T)]))
        want = r"cu_seqlens"
    elif kind == "chunk":
        args[12:14] = cfg_set(args[12:14], chunk_size=rng.choice([0, -1, -(2 ** 62)]))
        want = r"chunk_size"
    elif kind == "schedule_code":  # an unknown code, or 'chunk' with a retention the backends do not run it for
        if rng.random() < 0.5:
            args[12:14] = cfg_set(args[12:14], map_schedule=rng.choice([-1, 2, 7]))
        else:
            args[12:14] = cfg_set(args[12:14], map_schedule=1, retention=2)  # elastic_net: reference only
        want = r"map_schedule"
    elif kind == "bias_code":
        args[12:14] = cfg_set(args[12:14], bias=rng.choice([-1, 7, 100]))
        want = r"bias"
    elif kind == "ret_code":
        args[12:14] = cfg_set(args[12:14], retention=rng.choice([-1, 4, 100]))
        want = r"retention"
    elif kind == "int_dtype":
        i = rng.choice([0, 1, 2, 3, 4])
        bad = args[i].to(rng.choice([torch.int32, torch.int64, torch.bool]))
        want = _word(FWD_NAMES[i])
    elif kind == "device":
        i = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 11])
        if args[i] is None:
            args[i] = (torch.zeros(B, T, H, dtype=base.dtype) + 0.5 if i in (5, 6, 7) else
                       torch.zeros(N, H, Dk, Dv, dtype=base.dtype) if i == 8 else torch.tensor([0, T]))
            if i == 11 and B != 1:
                return None
        bad = args[i].to(META)
        want = _word(FWD_NAMES[i], "initial_state")
    elif kind == "strided":
        # valid: non-contiguous inputs are made contiguous by the glue; must equal the plain call
        def run():
            ref = torch.ops.miras.chunk_fwd(*args)
            a2 = list(args)
            for j in range(6):
                if a2[j] is not None:
                    a2[j] = torch.stack([a2[j], torch.full_like(a2[j], math.nan)], -1)[..., 0]
            out = torch.ops.miras.chunk_fwd(*a2)
            return all(torch.equal(x, y) for x, y in zip(ref, out))
        return run, "STRIDED", base
    elif kind == "huge_chunk":
        # valid: a chunk larger than the sequence (up to 2^63 - 1) computes what C = T + 1 does
        def run():
            a1, a2 = list(args), list(args)
            a1[12:14] = cfg_set(a1[12:14], chunk_size=T + 1)
            a2[12:14] = cfg_set(a2[12:14], chunk_size=rng.choice([2 ** 31 + 5, 2 ** 62, 2 ** 63 - 1]))
            return all(torch.equal(x, y) for x, y in zip(torch.ops.miras.chunk_fwd(*a1),
                                                           torch.ops.miras.chunk_fwd(*a2)))
        return run, "STRIDED", base
    elif kind == "lp_p":
        args[12:14] = cfg_set(args[12:14], bias=2, p=rng.choice([0.5, 0.0, -1.0]))
        want = r"\bp\b"
    elif kind == "lq_q":
        args[12:14] = cfg_set(args[12:14], retention=3, q_norm=rng.choice([1.5, 0.0, -3.0]))
        want = r"\bq\b"
    else:  # empty head dims
        Dk0 = rng.choice([0, Dk])
        Dv0 = 0 if Dk0 else rng.choice([0, Dv])
        args[0] = torch.zeros(B, T, H, Dk0, dtype=base.dtype)
        args[1] = torch.zeros(B, T, H, Dk0, dtype=base.dtype)
        args[2] = torch.zeros(B, T, H, Dv0, dtype=base.dtype)
        args[8] = args[9] = None
        if T * B == 0:
            return None
        want = r"Dk|Dv"
    good_args = raw_fwd_args(base)
    if i is not None:
        args[i] = bad
    return (lambda: torch.ops.miras.chunk_fwd(*args)), want, base, (lambda: torch.ops.miras.chunk_fwd(*good_args))


def m_raw_bwd(base, rng):
    base = Base(rng)
    fa = raw_fwd_args(base)
    o, XT, PT, AT, cX, cP = torch.ops.miras.chunk_fwd(*fa)
    B, T, H, Dk, Dv, N = base.B, base.T, base.H, base.Dk, base.Dv, base.N
    dO = torch.randn_like(o)
    dXT = torch.randn_like(XT)
    dPT = torch.randn_like(PT) if base.mom else None
    args = [dO, dXT, dPT] + fa[:12] + [cX, cP] + fa[12:14]
    good_args = list(args)
    kind = rng.choice(["dO", "dXT", "dPT", "chunk_X", "chunk_P", "no_saved", "X0", "param", "device"])
    if kind == "dO":
        args[0] = torch.zeros(B, T, H, Dv + 1, dtype=o.dtype) if rng.random() < 0.5 else dO[..., 0]
        want = r"\bdO\b"
    elif kind == "dXT":
        args[1] = torch.zeros(N, H, Dk + 1, Dv, dtype=XT.dtype)
        want = r"dXT"
    elif kind == "dPT":
        if not base.mom:
            return None
        args[2] = torch.zeros(N + 1, H, Dk, Dv, dtype=XT.dtype)
        want = r"dPT"
    elif kind == "chunk_X":
        dims = list(cX.shape)
        dims[rng.randrange(1, 4)] -= 1 if rng.random() < 0.5 and min(dims[1:]) > 1 else -2
        args[15] = torch.zeros(dims, dtype=cX.dtype)
        want = r"chunk_X"
    elif kind == "chunk_P":
        if not base.mom:
            return None
        args[16] = torch.zeros(cP.shape[0], H, Dk, Dv + 3, dtype=cX.dtype)
        want = r"chunk_P"
    elif kind == "no_saved":
        args[15] = torch.zeros(0, dtype=cX.dtype)
        want = r"chunk_X|save_states"
    elif kind == "X0":
        args[11] = torch.zeros(N, H, Dk, Dv + 2, dtype=XT.dtype)
        want = r"initial_state"
    elif kind == "param":
        j = rng.choice([9, 10])
        args[j] = torch.full((B, T + 2, H), 0.5, dtype=base.dtype)
        want = r"bias_param|ret_param"
    else:
        j = rng.choice([0, 1, 15])
        args[j] = args[j].to(META)
        want = r"dO|dXT|chunk_X|device"
    return (lambda: torch.ops.miras.chunk_bwd(*args)), want, base, (lambda: torch.ops.miras.chunk_bwd(*good_args))


RAW_MUTATIONS = [m_raw_fwd, m_raw_bwd]


# ---------------------------------------------------------------------------------------------
# Generation and evaluation
# ---------------------------------------------------------------------------------------------
def generate(seed: int, count: int):
    """(kind, case seed) pairs: 3 API cases for every raw-op case."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        if i % 4 == 3:
            m = RAW_MUTATIONS[rng.randrange(len(RAW_MUTATIONS))]
        else:
            m = API_MUTATIONS[rng.randrange(len(API_MUTATIONS))]
        out.append((m.__name__, rng.randrange(2 ** 31)))
    return out


MUTATIONS = {m.__name__: m for m in API_MUTATIONS + RAW_MUTATIONS}


def evaluate(kind: str, cseed: int):
    rng = random.Random(cseed)
    for _ in range(20):  # a few tries to find a configuration the mutation applies to
        base = Base(rng)
        made = MUTATIONS[kind](base, rng)
        if made is not None:
            break
    else:
        return {"status": "skipped"}
    bad, want = made[0], made[1]
    base = made[2] if len(made) > 2 else base
    good = made[3] if len(made) > 3 else base.call
    raw = kind.startswith("m_raw")
    if want == "STRIDED":
        try:
            return {"status": "ok_equal" if bad() else "not_equal"}
        except Exception as exc:  # noqa: BLE001
            return {"status": "base_failed", "type": type(exc).__name__, "msg": str(exc)[:300]}
    try:
        good()
    except Exception as exc:  # noqa: BLE001
        return {"status": "base_failed", "type": type(exc).__name__, "msg": str(exc)[:300],
                "tb": traceback.format_exc()[-600:]}
    try:
        bad()
    except Exception as exc:  # noqa: BLE001
        msg = str(exc)
        if not raw and not isinstance(exc, ValueError):
            return {"status": "wrong_type", "type": type(exc).__name__, "msg": msg[:300], "want": want}
        if not re.search(want, msg):
            return {"status": "unnamed", "type": type(exc).__name__, "msg": msg[:300], "want": want}
        return {"status": "raised", "type": type(exc).__name__}
    return {"status": "no_raise", "want": want}


def main(argv):
    seed, count, start = int(argv[1]), int(argv[2]), int(argv[3])
    torch.set_num_threads(1)
    cases = generate(seed, count)
    for i in range(start, count):
        kind, cseed = cases[i]
        print(f"START {i}", flush=True)
        res = evaluate(kind, cseed)
        print(json.dumps({"i": i, "kind": kind, "seed": cseed, **res}), flush=True)


if __name__ == "__main__":
    main(sys.argv)
