"""JAX front end: ``memory_update`` and ``memory_step`` (linear memory) through the XLA FFI.

The op is the same C++ backend as the torch extension (csrc/cpu, through the handlers in
csrc/jax), registered with ``jax.ffi.register_ffi_target`` and called with ``jax.ffi.ffi_call``;
it works under ``jax.jit`` and is differentiable through a ``jax.custom_vjp`` whose backward is
the backend's backward op. This module and its library are torch-free (``import miras`` itself
still imports torch).

    import jax, jax.numpy as jnp
    from miras import jax as mj

    o, state = mj.memory_update(q, k, v, lr, alpha, bias="lp", retention="l2", chunk_size=64,
                                output_final_state=True)
    o_t, state = mj.memory_step(q[:, 0], k[:, 0], v[:, 0], lr[:, 0], alpha[:, 0], state=state,
                                bias="lp", chunk_size=64)

Arguments, shapes and semantics are those of :func:`miras.memory_update` (SPEC.md). Differences:
``memory="linear"`` only; states are :class:`MemoryState` (a NamedTuple of jax arrays, a pytree);
value checks (gate ranges, ``cu_seqlens``, ``offset``) run on concrete arrays only — under
``jax.jit`` they are skipped, and the backend still rejects a malformed ``cu_seqlens`` at run time.
float64 needs ``jax.config.update("jax_enable_x64", True)``; float16/bfloat16 are computed in
float32 on the CPU.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ._options import fail, range_text, scalar_param
from .config import PARAM_DEFAULTS, Config

__all__ = ["memory_update", "memory_step", "MemoryState", "has_cuda_handlers"]

_FWD, _BWD = "miras_chunk_fwd", "miras_chunk_bwd"
_FLOATS = (jnp.float32, jnp.float64, jnp.float16, jnp.bfloat16)


# ---- the library ----------------------------------------------------------------------------
def _load_library():
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, "_jax_ffi" + suffix)
        if os.path.exists(path):
            break
    else:
        raise ImportError(
            "miras.jax: the XLA FFI library miras/_jax_ffi*.so is not built (jax was not importable when miras "
            "was built). Install jax, then rebuild miras so that the build sees it, e.g. "
            "`pip install --no-build-isolation -e .` (MIRAS_BUILD_JAX=1 makes a missing jax a build error).")
    lib = ctypes.CDLL(path)
    jax.ffi.register_ffi_target(_FWD, jax.ffi.pycapsule(lib.MirasChunkFwdCpu), platform="cpu")
    jax.ffi.register_ffi_target(_BWD, jax.ffi.pycapsule(lib.MirasChunkBwdCpu), platform="cpu")
    if lib.MirasJaxHasCuda():
        jax.ffi.register_ffi_target(_FWD, jax.ffi.pycapsule(lib.MirasChunkFwdCuda), platform="CUDA")
        jax.ffi.register_ffi_target(_BWD, jax.ffi.pycapsule(lib.MirasChunkBwdCuda), platform="CUDA")
    return lib


_LIB = _load_library()


def has_cuda_handlers() -> bool:
    """True when the library holds the CUDA handlers too (built with MIRAS_BUILD_JAX_CUDA=1)."""
    return bool(_LIB.MirasJaxHasCuda())


class MemoryState(NamedTuple):
    """The memory's state between calls (SPEC §7), as jax arrays (a pytree).

    ``X`` [N, H, Dk, Dv] the raw state; ``P`` the momentum state or None; ``anchor`` the raw state
    at the last chunk boundary (None means ``X``); ``offset`` [N] int, tokens since that boundary
    (None means zeros).
    """

    X: jax.Array
    P: Optional[jax.Array] = None
    anchor: Optional[jax.Array] = None
    offset: Optional[jax.Array] = None


# ---- the op: ffi calls and their VJP ----------------------------------------------------------
_CHUNK = None  # index of chunk_size in the int array (from the extension, on first use)


class _OpConfig(NamedTuple):
    """The op's configuration arrays (hashable: a static argument of the custom_vjp), in the order
    of miras._C.config_fields() — the same as torch.ops.miras.chunk_fwd's icfg / fcfg."""

    icfg: tuple
    fcfg: tuple

    @staticmethod
    def _chunk_index():
        global _CHUNK
        if _CHUNK is None:
            from . import _C

            _CHUNK = _C.config_fields()["ints"].index("chunk_size")
        return _CHUNK

    @property
    def chunk_size(self) -> int:
        return self.icfg[self._chunk_index()]

    def with_chunk(self, c: int) -> "_OpConfig":
        i = list(self.icfg)
        i[self._chunk_index()] = c
        return _OpConfig(tuple(i), self.fcfg)

    def attrs(self):
        return dict(icfg=np.asarray(self.icfg, np.int64), fcfg=np.asarray(self.fcfg, np.float64))


def _none(dtype):
    """An absent optional input or output of the ffi calls: a 1-D array of size 0."""
    return jnp.zeros((0,), dtype)


def _sizes(q, v, cu):
    B, T, H, Dk = q.shape
    N = cu.shape[0] - 1 if cu is not None else B
    return B, T, H, Dk, v.shape[-1], N


def _fwd_call(cfg: _OpConfig, save: bool, q, k, v, lr, alpha, mom, bp, rp, X0, P0, A0, cu):
    B, T, H, Dk, Dv, N = _sizes(q, v, cu)
    sd = lr.dtype
    C = cfg.chunk_size
    slots = T // C + N if cu is not None else N * (-(-T // C))
    state = jax.ShapeDtypeStruct((N, H, Dk, Dv), sd)
    saved = jax.ShapeDtypeStruct((slots, H, Dk, Dv), sd)
    none = jax.ShapeDtypeStruct((0,), sd)
    out = (jax.ShapeDtypeStruct((B, T, H, Dv), q.dtype), state, state if mom is not None else none, state,
           saved if save else none, saved if (save and mom is not None) else none)
    opt = [x if x is not None else _none(sd) for x in (mom, bp, rp, X0, P0, A0)]
    call = jax.ffi.ffi_call(_FWD, out, vmap_method="sequential")
    return call(q, k, v, lr, alpha, *opt, cu if cu is not None else _none(jnp.int32), save_states=np.bool_(save),
                **cfg.attrs())


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunk(cfg, q, k, v, lr, alpha, mom, bp, rp, X0, P0, A0, cu):
    """(o, XT, PT) of the chunked op; PT is a [0] placeholder without momentum."""
    o, XT, PT, _, _, _ = _fwd_call(cfg, False, q, k, v, lr, alpha, mom, bp, rp, X0, P0, A0, cu)
    return o, XT, PT


def _chunk_fwd(cfg, *args):
    o, XT, PT, _, cX, cP = _fwd_call(cfg, True, *args)
    return (o, XT, PT), (args, cX, cP)


def _chunk_bwd(cfg, res, cts):
    args, cX, cP = res
    q, k, v, lr, alpha, mom, bp, rp, X0, P0, A0, cu = args
    dO, dXT, dPT = cts
    B, T, H, Dk, Dv, N = _sizes(q, v, cu)
    gd = lr.dtype  # gradients come in the state dtype; cast to each input's below

    def like(x, present=True):
        return jax.ShapeDtypeStruct(x.shape, gd) if present and x is not None else jax.ShapeDtypeStruct((0,), gd)

    st = jax.ShapeDtypeStruct((N, H, Dk, Dv), gd)
    out = (like(q), like(k), like(v), like(lr), like(alpha), like(mom), like(bp), like(rp), st,
           st if mom is not None else like(None), like(A0))
    opt = [x if x is not None else _none(gd) for x in (mom, bp, rp, X0, P0, A0)]
    call = jax.ffi.ffi_call(_BWD, out, vmap_method="sequential")
    g = call(dO.astype(q.dtype), dXT, dPT if mom is not None else _none(gd), q, k, v, lr, alpha, *opt,
             cu if cu is not None else _none(jnp.int32), cX, cP, **cfg.attrs())
    dq, dk, dv, dlr, dalpha, dmom, dbp, drp, dX0, dP0, dA0 = g

    def cast(grad, x):
        return None if x is None else grad.astype(x.dtype)

    return (cast(dq, q), cast(dk, k), cast(dv, v), cast(dlr, lr), cast(dalpha, alpha), cast(dmom, mom),
            cast(dbp, bp), cast(drp, rp), cast(dX0, X0), cast(dP0, P0 if mom is not None else None), cast(dA0, A0),
            None)


_chunk.defvjp(_chunk_fwd, _chunk_bwd)


def _run(cfg, q, k, v, lr, alpha, mom, bp, rp, X0, P0, A0, cu):
    """The op on prepared arrays: (o, XT, PT or None). No tokens: the state passes through."""
    B, T, H, Dk, Dv, N = _sizes(q, v, cu)
    if B * T == 0:
        zeros = jnp.zeros((N, H, Dk, Dv), lr.dtype)
        return (jnp.zeros((B, T, H, Dv), q.dtype), X0 if X0 is not None else zeros,
                (P0 if P0 is not None else zeros) if mom is not None else None)
    o, XT, PT = _chunk(cfg, q, k, v, lr, alpha, mom, bp, rp, X0, P0, A0, cu)
    return o, XT, PT if mom is not None else None


# ---- argument checks --------------------------------------------------------------------------
def _concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _array(x, name: str, shape=None, floating=True):
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        fail(f"{name} must be a jax array, got {type(x).__name__}")
    x = jnp.asarray(x)
    if floating and x.dtype not in _FLOATS:
        fail(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        fail(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    return x


def _check_range(x, name: str, lo: float, lo_open: bool, hi=None, hi_open=False):
    if not _concrete(x):
        return
    a = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(a) & ((a > lo) if lo_open else (a >= lo))
    if hi is not None:
        ok &= (a < hi) if hi_open else (a <= hi)
    if not ok.all():
        what = range_text(lo, lo_open) if hi is None else f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        bad = a[~ok]
        fail(f"{name} must lie in {what} (SPEC §2); {bad.size} value(s) outside, e.g. {bad.flat[0]:.6g}")


def _types(q):
    """(io dtype, state dtype) of the backend for q: the CPU computes in float32 (float64 for
    float64 inputs); CUDA reads q, k, v in their dtype (float32/float16/bfloat16) with float32 states."""
    platform = jax.default_backend()
    if _concrete(q) and hasattr(q, "devices"):
        platform = next(iter(q.devices())).platform
    if platform == "cpu":
        ct = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
        return ct, ct
    if platform == "gpu" and has_cuda_handlers():
        if q.dtype == jnp.float64:
            fail("float64 inputs run on the CPU only; use float32, float16 or bfloat16 on CUDA")
        return q.dtype, jnp.float32
    fail(f"miras.jax runs on the CPU{' and CUDA' if has_cuda_handlers() else ''}; the arrays are on {platform!r}"
         + ("" if has_cuda_handlers() else " (CUDA handlers: build with MIRAS_BUILD_JAX_CUDA=1)"))


def _options(config, options):
    """Config and per-token parameters from the keywords; the options must be Python values."""
    for name, val in options.items():
        if name not in PARAM_DEFAULTS and isinstance(val, jax.core.Tracer):
            fail(f"{name} must be a Python number (a static option of the op), got a traced value; under jax.jit "
                 f"close over it or mark it static")
    cfg, params = Config.split(config, **options)
    if cfg.memory != "linear":
        fail(f"miras.jax supports memory='linear' only, got {cfg.memory!r} (the MLP memory runs in the torch front "
             f"end, miras.memory_update)")
    if cfg.lq_mirror:
        raise NotImplementedError("miras.jax: lq_map='mirror' is not implemented in the JAX front end (the torch "
                                  "front end, miras.memory_update, computes it through miras.reference)")
    if cfg.chunk_maps:
        raise NotImplementedError(
            f"miras.jax: map_schedule='chunk' with retention {cfg.retention!r} (SPEC §5b) is not implemented in the "
            f"JAX front end yet (only with retention 'l2', where it equals 'token'); the torch front end "
            f"(miras.memory_update) computes it")
    return cfg, params


def _prepare(q, k, v, lr, alpha, momentum, *, cfg: Config, params, cu_seqlens, check_inputs, chunk_size=None):
    """Checks the arguments; returns the op's arrays in the backend's dtypes and its config."""
    q = _array(q, "q")
    v = _array(v, "v")
    if q.ndim != 4:
        fail(f"q must be a 4-D array [B, T, H, Dk], got shape {list(q.shape)}")
    if v.ndim != 4:
        fail(f"v must be a 4-D array [B, T, H, Dv], got shape {list(v.shape)}")
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    k = _array(k, "k", (B, T, H, Dk))
    v = _array(v, "v", (B, T, H, Dv))
    if k.dtype != q.dtype or v.dtype != q.dtype:
        fail(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if Dk < 1 or Dv < 1 or H < 1:
        fail(f"head count and head dims must be >= 1, got H={H}, Dk={Dk}, Dv={Dv}")
    gshape = (B, T, H)
    lr = _array(lr, "lr", gshape)
    alpha = _array(alpha, "alpha", gshape)
    if momentum is not None:
        momentum = _array(momentum, "momentum", gshape)
    if check_inputs:
        _check_range(lr, "lr", 0.0, False)
        _check_range(alpha, "alpha", 0.0, True, 1.0, False)
        if momentum is not None:
            _check_range(momentum, "momentum", 0.0, False, 1.0, True)
    def param(spec, unused):
        if spec is None:
            return unused, None
        name, lo, lo_open = spec
        value = params[name]
        if hasattr(value, "shape"):
            value = _array(value, name, gshape)
            if check_inputs:
                _check_range(value, name, lo, lo_open)
            return 1.0, value
        return scalar_param(value, name, lo, lo_open), None

    bias_spec, ret_spec = cfg.param_specs()
    bias_scalar, bias_tensor = param(bias_spec, 1.0)
    ret_scalar, ret_tensor = param(ret_spec, 0.0)
    icfg, fcfg = cfg.arrays(Dk, bias_scalar, ret_scalar, chunk_size)
    op_cfg = _OpConfig(tuple(icfg), tuple(fcfg))
    cu = None
    if cu_seqlens is not None:
        cu = _array(cu_seqlens, "cu_seqlens", floating=False)
        if cu.dtype not in (jnp.int32, jnp.int64):
            fail(f"cu_seqlens must be int32 or int64, got {cu.dtype}")
        if cu.ndim != 1 or cu.shape[0] < 2:
            fail(f"cu_seqlens must be 1-D [N+1] with N >= 1, got shape {list(cu.shape)}")
        if B != 1:
            fail(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got B={B}")
        if check_inputs and _concrete(cu):
            c = np.asarray(cu)
            if c[0] != 0:
                fail("cu_seqlens must start at 0")
            if (np.diff(c) < 0).any():
                fail("cu_seqlens must be non-decreasing")
            if c[-1] != T:
                fail(f"cu_seqlens must end at T={T} (the packed length)")
    io, sd = _types(q)

    def st(x):
        return None if x is None else x.astype(sd)

    arrays = dict(q=q.astype(io), k=k.astype(io), v=v.astype(io), lr=lr.astype(sd), alpha=alpha.astype(sd),
                  mom=st(momentum), bp=st(bias_tensor), rp=st(ret_tensor), cu=cu)
    N = cu.shape[0] - 1 if cu is not None else B
    return arrays, op_cfg, dict(B=B, T=T, H=H, Dk=Dk, Dv=Dv, N=N, q_dtype=q.dtype, sd=sd)


def _state_array(x, name: str, shape, sd):
    x = _array(x, name)
    if tuple(x.shape) != tuple(shape):
        fail(f"{name} must have shape [N, H, Dk, Dv] = {list(shape)}, got {list(x.shape)}")
    return x.astype(sd)


def _offset(off, name: str, N: int):
    if off is None:
        return jnp.zeros((N,), jnp.int32)
    off = _array(off, name, floating=False)
    if off.dtype not in (jnp.int32, jnp.int64) or tuple(off.shape) != (N,):
        fail(f"{name} must be an int array of shape [{N}], got {off.dtype} {list(off.shape)}")
    return off


# ---- public API -------------------------------------------------------------------------------
def memory_update(q, k, v, lr, alpha, momentum=None, *, initial_state: Optional[MemoryState] = None,
                  output_final_state=False, cu_seqlens=None, check_inputs=True, config: Optional[Config] = None,
                  **options):
    """Chunked Miras memory over a sequence (SPEC §5), as :func:`miras.memory_update` (the same
    ``config`` / keyword options and per-token parameters).

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; lr, alpha, momentum: [B, T, H]; cu_seqlens [N+1]
    (int32/int64, B == 1). Returns ``(o [B, T, H, Dv], final MemoryState or None)``. Every array
    input, the initial state included, is differentiable (jax.grad / jax.vjp).
    """
    config, params = _options(config, options)
    arrays, cfg, sz = _prepare(q, k, v, lr, alpha, momentum, cfg=config, params=params, cu_seqlens=cu_seqlens,
                               check_inputs=check_inputs)
    N, H, Dk, Dv, T, sd = sz["N"], sz["H"], sz["Dk"], sz["Dv"], sz["T"], sz["sd"]
    sshape = (N, H, Dk, Dv)
    X0 = P0 = None
    if initial_state is not None:
        if not isinstance(initial_state, MemoryState):
            fail(f"initial_state must be a miras.jax.MemoryState, got {type(initial_state).__name__}")
        X0 = _state_array(initial_state.X, "initial_state.X", sshape, sd)
        if initial_state.P is not None:
            if momentum is None:
                fail("initial_state.P (a momentum state) is set but momentum is None; pass momentum gates or drop P")
            P0 = _state_array(initial_state.P, "initial_state.P", sshape, sd)
        off = _offset(initial_state.offset, "initial_state.offset", N)
        if check_inputs and _concrete(off) and (np.asarray(off) != 0).any():
            fail("memory_update needs initial_state.offset == 0 (a state at a chunk boundary); continue a partial "
                 "chunk with memory_step, or pass the state from a chunk boundary")
        anchor = initial_state.anchor
        if check_inputs and anchor is not None and anchor is not initial_state.X:
            anchor = _state_array(anchor, "initial_state.anchor", sshape, sd)
            if _concrete(anchor, X0) and not np.array_equal(np.asarray(anchor), np.asarray(X0)):
                fail("initial_state.anchor differs from initial_state.X at offset 0; at a chunk boundary the anchor "
                     "is the state itself")
    a = arrays
    mom, cu = a["mom"], a["cu"]

    def run(x0, p0, cu_, sel=None):
        """The op on the tokens `sel` selects along T (all of them when None)."""
        pick = (lambda x: x) if sel is None else sel
        ins = [None if a[n] is None else pick(a[n]) for n in ("q", "k", "v", "lr", "alpha", "mom", "bp", "rp")]
        return _run(cfg, *ins, x0, p0, None, cu_)

    qdt = sz["q_dtype"]
    if not output_final_state:
        o, _, _ = run(X0, P0, cu)
        return o.astype(qdt), None
    C = cfg.chunk_size
    zeros = jnp.zeros(sshape, sd)
    X0z = X0 if X0 is not None else zeros
    if cu is None:
        # The final anchor of a sequence that ends inside a chunk is the state at its last chunk
        # boundary: run the op up to that boundary and from there on (two calls, no extra work),
        # so that the anchor is an output of the op and carries its gradient.
        t0 = (T // C) * C
        if t0 in (0, T):
            o, XT, PT = run(X0, P0, None)
            anchor = XT if t0 == T else X0z
        else:
            o1, X1, P1 = run(X0, P0, None, lambda x: x[:, :t0])
            o2, XT, PT = run(X1, P1, None, lambda x: x[:, t0:])
            o, anchor = jnp.concatenate([o1, o2], axis=1), X1
        offset = jnp.full((N,), T % C, jnp.int32)
        return o.astype(qdt), MemoryState(X=XT, P=PT, anchor=anchor, offset=offset)
    return _varlen_final(run, cu, C, T, N, X0z, P0, mom, zeros, qdt)


def _varlen_final(run, cu, C, T, N, X0z, P0, mom, zeros, qdt):
    """memory_update(output_final_state=True) with cu_seqlens: the anchor of a sequence that ends
    inside a chunk is the state at its last boundary. Two calls: (A) every sequence split in two
    segments, [start, boundary) from the initial state and [boundary, end) from zeros (its outputs
    are replaced), which yields the boundary states; (B) the tails (< chunk_size tokens each),
    gathered into min(T, N * (chunk_size - 1)) slots, from the boundary states. Extra work: the
    tails once more. Skipped when cu_seqlens is concrete and no sequence needs it."""
    lengths = cu[1:] - cu[:-1]
    offset = (lengths % C).astype(jnp.int32)
    P0z = (P0 if P0 is not None else zeros) if mom is not None else None
    if C == 1 or (_concrete(cu) and not (((np.asarray(lengths) % C) != 0) & (np.asarray(lengths) >= C)).any()):
        o, XT, PT = run(X0z, P0z, cu)
        # At a boundary the anchor is X_T itself; a sequence shorter than a chunk keeps its initial state.
        anchor = jnp.where((offset == 0)[:, None, None, None], XT, X0z)
        return o.astype(qdt), MemoryState(X=XT, P=PT, anchor=anchor, offset=offset)
    pre = lengths - offset
    cu_a = jnp.concatenate([jnp.stack([cu[:-1], cu[:-1] + pre], axis=1).reshape(-1), cu[-1:]])

    def interleave(x):  # sequence n's state at 2n, a zero state for its tail at 2n + 1
        return jnp.stack([x, jnp.zeros_like(x)], axis=1).reshape((2 * N,) + x.shape[1:])

    o_a, X_a, P_a = run(interleave(X0z), interleave(P0z) if mom is not None else None, cu_a)
    Xb = X_a[0::2]
    Pb = P_a[0::2] if mom is not None else None
    S = min(T, N * (C - 1))
    t = jnp.arange(T, dtype=cu.dtype)
    seg = jnp.searchsorted(cu[1:], t, side="right")
    is_tail = (t - cu[seg]) >= pre[seg]
    idx = jnp.nonzero(is_tail, size=S, fill_value=T)[0]  # padding slots point past the end
    cu_b = jnp.concatenate([jnp.zeros((1,), cu.dtype), jnp.cumsum(offset).astype(cu.dtype),
                            jnp.full((1,), S, cu.dtype)])
    one = jnp.zeros((1,) + zeros.shape[1:], zeros.dtype)
    # Padding reads a real token (clipped index) in an extra last segment whose outputs are dropped.
    o_b, X_b, P_b = run(jnp.concatenate([Xb, one]), jnp.concatenate([Pb, one]) if mom is not None else None, cu_b,
                        lambda x: jnp.take(x, idx, axis=1, mode="clip"))
    o = o_a.at[:, idx].set(o_b, mode="drop")
    return o.astype(qdt), MemoryState(X=X_b[:N], P=P_b[:N] if mom is not None else None, anchor=Xb, offset=offset)


def memory_step(q, k, v, lr, alpha, momentum=None, *, state: MemoryState, exact=False, check_inputs=True,
                config: Optional[Config] = None, **options):
    """One token per sequence (decoding, SPEC §7), as :func:`miras.memory_step`.

    q, k: [B, H, Dk]; v: [B, H, Dv]; gates [B, H]. Takes the gradient at ``state.anchor``, updates
    the state, reads after the write, and moves the anchor to the new state when ``offset``
    reaches ``chunk_size`` (1 with ``exact=True``). Returns ``(o [B, H, Dv], new MemoryState)``.
    """
    config, params = _options(config, options)
    chunk_size = config.chunk_size
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not hasattr(t, "shape") or len(t.shape) != 3:
            fail(f"memory_step: {name} must be [B, H, D] (one token per sequence), got "
                 f"{list(t.shape) if hasattr(t, 'shape') else type(t).__name__}")
    if not isinstance(state, MemoryState):
        fail(f"memory_step: state must be a miras.jax.MemoryState, got {type(state).__name__}")
    C = 1 if exact else chunk_size

    def tok(t):
        return t[:, None] if hasattr(t, "shape") else t

    arrays, cfg, sz = _prepare(tok(q), tok(k), tok(v), tok(lr), tok(alpha), tok(momentum), cfg=config,
                               params={n: tok(x) for n, x in params.items()}, cu_seqlens=None,
                               check_inputs=check_inputs)
    N, sd = sz["N"], sz["sd"]
    sshape = (N, sz["H"], sz["Dk"], sz["Dv"])
    X0 = _state_array(state.X, "state.X", sshape, sd)
    A0 = _state_array(state.anchor, "state.anchor", sshape, sd) if state.anchor is not None else X0
    P0 = None
    if momentum is not None:
        P0 = _state_array(state.P, "state.P", sshape, sd) if state.P is not None else None
    elif state.P is not None:
        fail("state.P (a momentum state) is set but momentum is None")
    off = _offset(state.offset, "state.offset", N)
    if check_inputs and _concrete(off):
        o_np = np.asarray(off)
        if ((o_np < 0) | (o_np >= C)).any():
            fail(f"state.offset must lie in [0, chunk_size={C})")
    a = arrays
    # One token is one chunk of the op, anchored at A0 (chunk_size 1 for the op itself).
    o, XT, PT = _run(cfg.with_chunk(1), a["q"], a["k"], a["v"], a["lr"], a["alpha"], a["mom"], a["bp"],
                     a["rp"], X0, P0, A0, None)
    new_off = off + 1
    moved = new_off >= C
    anchor = jnp.where(moved[:, None, None, None], XT, A0)
    new_off = jnp.where(moved, jnp.zeros_like(new_off), new_off)
    return o[:, 0].astype(sz["q_dtype"]), MemoryState(X=XT, P=PT, anchor=anchor, offset=new_off)
