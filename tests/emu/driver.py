"""The op through the emulated CUDA backend (C ABI, MIRAS_DEVICE_CUDA), shaped like the torch API.

``update(emu, args, kw, C, cot)`` takes ``conftest.make_inputs`` output (q/k/v in the kernel's
input dtype; gates, parameters and states float32) and returns ``(o, XT, PT, AT, offset, grads)``
with ``grads`` keyed like ``conftest.leaves`` (q, k, v, lr, alpha, momentum, delta, robust_delta,
gamma, X0, P0). Every output buffer starts as NaN, so an element the kernels never write fails
the comparison.
"""
from __future__ import annotations

from typing import Optional

import torch

from cabi import Arena, BwdInputs, BwdOutputs, ChunkInputs, FwdOutputs, StepArgs, make_config, poisoned

F32 = torch.float32
# Where the "device" buffers live: host memory for the emulator; "cuda" for a real CUDA libmiras
# (tests/test_cuda_capi.py).
DEVICE = "cpu"


def _c(t, dtype=None):
    if t is None:
        return None
    t = t.detach()
    if dtype is not None:
        t = t.to(dtype)
    return t.to(DEVICE).contiguous()


def _p(shape, dtype):
    return poisoned(shape, dtype, DEVICE)


def _params(kw):
    """(bias_param tensor or None, ret_param tensor or None, scalar config kwargs)."""
    bias, ret = kw.get("bias", "l2"), kw.get("retention", "l2")
    bp = rp = None
    if bias == "huber" and isinstance(kw.get("delta"), torch.Tensor):
        bp = kw["delta"]
    if bias == "robust" and isinstance(kw.get("robust_delta"), torch.Tensor):
        bp = kw["robust_delta"]
    if ret == "elastic_net" and isinstance(kw.get("gamma"), torch.Tensor):
        rp = kw["gamma"]
    scal = {k: kw[k] for k in ("p", "eps", "delta", "robust_delta", "gamma", "kl_scale", "q_norm", "eps_q", "scale")
            if k in kw}
    return bp, rp, scal


def config_for(emu, kw, Dk, C):
    _, _, scal = _params(kw)
    return make_config(emu, bias=kw.get("bias", "l2"), huber_mode=kw.get("huber_mode", "yaad"),
                       retention=kw.get("retention", "l2"), Dk=Dk, chunk_size=C, **scal)


def update(emu, args, kw, C, cot=None, cu_seqlens: Optional[torch.Tensor] = None, want_grads=True, offsets=True):
    q, k, v, lr, alpha, mom = args
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    io = q.dtype
    varlen = cu_seqlens is not None
    N = cu_seqlens.numel() - 1 if varlen else B
    bp, rp, _ = _params(kw)
    cfg = config_for(emu, kw, Dk, C)
    slots = emu.lib.miras_num_chunk_slots(N, T, C, int(varlen))
    X0, P0 = kw.get("_X0"), kw.get("_P0")
    a = Arena()
    t = {n: _c(x) for n, x in (("q", q), ("k", k), ("v", v))}
    g = {n: _c(x, F32) for n, x in (("lr", lr), ("alpha", alpha), ("momentum", mom), ("bp", bp), ("rp", rp),
                                    ("X0", X0), ("P0", P0))}
    cu = _c(cu_seqlens, torch.int64) if varlen else None
    inp = ChunkInputs(a.t(t["q"]), a.t(t["k"]), a.t(t["v"]), a.t(g["lr"]), a.t(g["alpha"]), a.t(g["momentum"]),
                      a.t(g["bp"]), a.t(g["rp"]), a.t(cu), a.t(g["X0"]), a.t(g["P0"]))
    st = (N, H, Dk, Dv)
    o = _p((B, T, H, Dv), io)
    XT, AT = _p(st, F32), _p(st, F32)
    PT = _p(st, F32) if mom is not None else None
    off = _p((N,), torch.int64) if offsets else None
    cX = _p((slots, H, Dk, Dv), F32)
    cP = _p((slots, H, Dk, Dv), F32) if mom is not None else None
    out = FwdOutputs(a.t(o), a.t(XT), a.t(PT), a.t(AT), a.t(off), a.t(cX), a.t(cP))
    emu.chunk_fwd(cfg, inp, out)
    grads = {}
    if want_grads:
        assert cot is not None
        dO = _c(cot["o"], io)
        dXT = _c(cot.get("X"), F32)
        dPT = _c(cot.get("P"), F32) if mom is not None else None
        bin_ = BwdInputs(a.t(cX), a.t(cP), a.t(dO), a.t(dXT), a.t(dPT))
        G = {"q": _p(tuple(q.shape), F32), "k": _p(tuple(k.shape), F32), "v": _p(tuple(v.shape), F32),
             "lr": _p(tuple(lr.shape), F32), "alpha": _p(tuple(alpha.shape), F32),
             "momentum": _p(tuple(lr.shape), F32) if mom is not None else None,
             "bp": _p(tuple(lr.shape), F32) if bp is not None else None,
             "rp": _p(tuple(lr.shape), F32) if rp is not None else None,
             "X0": _p(st, F32), "P0": _p(st, F32) if mom is not None else None}
        go = BwdOutputs(a.t(G["q"]), a.t(G["k"]), a.t(G["v"]), a.t(G["lr"]), a.t(G["alpha"]), a.t(G["momentum"]),
                        a.t(G["bp"]), a.t(G["rp"]), a.t(G["X0"]), a.t(G["P0"]))
        emu.chunk_bwd(cfg, inp, bin_, go)
        names = {"bp": "delta" if kw.get("bias") == "huber" else "robust_delta", "rp": "gamma"}
        for key, val in G.items():
            if val is not None:
                grads[names.get(key, key)] = val
    return o, XT, PT, AT, off, grads


def step(emu, tok, kw, C, state):
    """One miras_step call on CUDA. tok: (q, k, v, lr, alpha, mom) [B, H, ...]; state: dict X, P,
    anchor, offset (float32 / int64 host tensors). Returns (o, new state dict)."""
    q, k, v, lr, alpha, mom = tok
    B, H, Dk = q.shape
    Dv = v.shape[-1]
    bp, rp, _ = _params(kw)
    cfg = config_for(emu, kw, Dk, C)
    a = Arena()
    st = (B, H, Dk, Dv)
    o = _p((B, H, Dv), q.dtype)
    Xo = _p(st, F32)
    Po = _p(st, F32) if mom is not None else None
    Ao = _p(st, F32)
    offo = _p((B,), torch.int64)
    args = StepArgs(a.t(_c(q)), a.t(_c(k)), a.t(_c(v)), a.t(_c(lr, F32)), a.t(_c(alpha, F32)), a.t(_c(mom, F32)),
                    a.t(_c(bp, F32)), a.t(_c(rp, F32)), a.t(_c(state["X"])), a.t(_c(state.get("P"))), a.t(_c(state["anchor"])),
                    a.t(_c(state["offset"])), a.t(o), a.t(Xo), a.t(Po), a.t(Ao), a.t(offo))
    emu.step(cfg, args)
    return o, {"X": Xo, "P": Po, "anchor": Ao, "offset": offo}
