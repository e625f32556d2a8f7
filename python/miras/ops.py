"""Functional API: ``memory_update``, ``memory_step`` and the paper's presets.

Validates arguments once (messages name the argument and the fix), builds the op's small
config, and calls the registered op ``torch.ops.miras.chunk_fwd`` (C++ on the CPU, CUDA kernels on
the GPU; autograd and fake kernels in ``_library.py``). The math is SPEC.md.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _library  # noqa: F401  (registers fake kernels and autograd)
from ._options import BIASES, RETENTIONS, range_text, scalar_param
from ._options import fail as _fail
from .config import Config
from .state import MemoryState

__all__ = ["memory_update", "memory_step", "moneta", "yaad", "memora", "titans", "BIASES", "RETENTIONS", "Config"]

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_F32_TINY = torch.finfo(torch.float32).tiny  # smallest normal float32

Param = Union[float, Tensor]


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_values(cond: Tensor, msg: str):
    """A data-dependent check: raises ValueError eagerly; an async assert inside torch.compile."""
    if _compiling():
        torch._assert_async(cond.all(), f"miras: {msg}")
    elif not bool(cond.all()):
        _fail(msg)


def _check_tensor(t, name: str, shape, ref: Tensor):
    if not isinstance(t, Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        _fail(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        _fail(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != ref.device:
        _fail(f"{name} is on {t.device} but q is on {ref.device}; move all inputs to one device")


def _check_gate(t: Tensor, name: str, lo: float, hi: float, lo_open: bool, hi_open: bool, what: str):
    x = t.detach()
    ok = torch.isfinite(x)
    ok = ok & ((x > lo) if lo_open else (x >= lo))
    if hi is not None:
        ok = ok & ((x < hi) if hi_open else (x <= hi))
    if _compiling():
        torch._assert_async(ok.all(), f"miras: {name} must lie in {what}")
        return
    if not bool(ok.all()):
        bad = x[~ok]
        _fail(f"{name} must lie in {what} (SPEC §2); {bad.numel()} value(s) outside, e.g. {bad.flatten()[0].item():.6g}")


def _param(value, name: str, shape, ref: Tensor, lo: float, lo_open: bool, check: bool):
    """A bias/retention parameter: float, or a per-token tensor [B, T, H]. Returns (scalar, tensor)."""
    if isinstance(value, Tensor):
        _check_tensor(value, name, shape, ref)
        if check:
            _check_gate(value, name, lo, None, lo_open, False, range_text(lo, lo_open))
        return 1.0, value
    return scalar_param(value, name, lo, lo_open), None


def _state_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _state_tensor(t, name: str, shape, q: Tensor, dims: str = "[N, H, Dk, Dv]") -> Tensor:
    if not isinstance(t, Tensor):
        _fail(f"{name} must be a tensor of shape {list(shape)}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        _fail(f"{name} must have shape {dims} = {list(shape)}, got {list(t.shape)}")
    if t.device != q.device:
        _fail(f"{name} is on {t.device} but q is on {q.device}")
    if t.dtype not in _FLOATS:
        _fail(f"{name} must be floating point, got {t.dtype}")
    return t


def _cu_seqlens(cu, B: int, T: int, q: Tensor, check: bool) -> Tensor:
    if not isinstance(cu, Tensor):
        _fail(f"cu_seqlens must be a 1-D int32/int64 tensor, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        _fail(f"cu_seqlens must be int32 or int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        _fail(f"cu_seqlens must be 1-D [N+1] with N >= 1, got shape {list(cu.shape)}")
    if B != 1:
        _fail(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got B={B}")
    if cu.device != q.device and cu.device.type != "cpu":
        _fail(f"cu_seqlens is on {cu.device} but q is on {q.device}; pass it on q's device or the CPU")
    cu = cu.to(device=q.device, dtype=torch.int64)
    if check:
        _check_values(cu[:1] == 0, "cu_seqlens must start at 0")
        _check_values(cu[1:] >= cu[:-1], "cu_seqlens must be non-decreasing")
        _check_values(cu[-1:] == T, f"cu_seqlens must end at T={T} (the packed length)")
    return cu


def _prepare(q, k, v, lr, alpha, momentum, *, cfg: Config, params, cu_seqlens, check_inputs, chunk_size=None):
    """Checks the inputs of one call; returns the sizes, the per-token parameter tensors and the
    configuration arrays (``icfg``, ``fcfg``) of the op (``chunk_size`` overrides cfg's: the step op)."""
    if not isinstance(q, Tensor) or q.dim() != 4:
        _fail(f"q must be a 4-D tensor [B, T, H, Dk], got {getattr(q, 'shape', type(q).__name__)}")
    B, T, H, Dk = q.shape
    if not isinstance(v, Tensor) or v.dim() != 4:
        _fail(f"v must be a 4-D tensor [B, T, H, Dv], got {getattr(v, 'shape', type(v).__name__)}")
    Dv = v.shape[-1]
    _check_tensor(q, "q", (B, T, H, Dk), q)
    _check_tensor(k, "k", (B, T, H, Dk), q)
    _check_tensor(v, "v", (B, T, H, Dv), q)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        _fail(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if Dk < 1 or Dv < 1 or H < 1:
        _fail(f"head count and head dims must be >= 1, got H={H}, Dk={Dk}, Dv={Dv}")
    gshape = (B, T, H)
    _check_tensor(lr, "lr", gshape, q)
    _check_tensor(alpha, "alpha", gshape, q)
    if momentum is not None:
        _check_tensor(momentum, "momentum", gshape, q)
    if check_inputs:
        _check_gate(lr, "lr", 0.0, None, False, False, "[0, inf)")
        _check_gate(alpha, "alpha", 0.0, 1.0, True, False, "(0, 1]")
        if momentum is not None:
            _check_gate(momentum, "momentum", 0.0, 1.0, False, True, "[0, 1)")
    q_norm, eps_q = cfg.q_norm, cfg.eps_q
    if cfg.retention == "lq" and q.dtype != torch.float64 and float(eps_q) ** (float(q_norm) - 2.0) < _F32_TINY:
        # below a zero-ish state the lq map reads W = X / eps_q^(q-2): that scale must be a float32
        _fail(f"q_norm={q_norm} with eps_q={eps_q} is out of float32 range: eps_q**(q_norm - 2) = "
              f"{float(eps_q) ** (float(q_norm) - 2.0):.3g} underflows (a zero state would read as NaN); "
              f"raise eps_q, lower q_norm to <= {2.0 + math.log(_F32_TINY) / math.log(float(eps_q)):.2f}, "
              f"or use float64 inputs (README: numerical safe ranges)")
    def param(spec, unused):
        if spec is None:
            return unused, None
        name, lo, lo_open = spec
        return _param(params[name], name, gshape, q, lo, lo_open, check_inputs)

    bias_spec, ret_spec = cfg.param_specs()
    bias_scalar, bias_tensor = param(bias_spec, 1.0)
    ret_scalar, ret_tensor = param(ret_spec, 0.0)
    cu = _cu_seqlens(cu_seqlens, B, T, q, check_inputs) if cu_seqlens is not None else None
    N = cu.numel() - 1 if cu is not None else B
    icfg, fcfg = cfg.arrays(Dk, bias_scalar, ret_scalar, chunk_size)
    return dict(B=B, T=T, H=H, Dk=Dk, Dv=Dv, N=N, cu=cu, bias_tensor=bias_tensor, ret_tensor=ret_tensor, icfg=icfg,
                fcfg=fcfg, scale=cfg.resolved_scale(Dk))


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in ts)


_WARNED = set()
_FALLBACK_WHY = {
    "mlp": "memory='mlp' has no fused CUDA kernel yet (issue 5); on CUDA tensors it runs through the PyTorch "
           "reference implementation (correct, not fast). CPU tensors use the C++ op.",
    "chunk_maps": "map_schedule='chunk' with retention kl, lq or elastic_net runs through the PyTorch reference "
                  "(miras.reference: correct and differentiable, a Python loop over chunks, not fast) except for "
                  "kl / lq with the linear memory on CPU tensors (the C++ op); the fused CUDA, MLP-memory and "
                  "step paths are not written yet.",
    "lq_mirror": "lq_map='mirror' runs through the PyTorch reference (miras.reference: correct and differentiable, "
                 "not fast); no C++/CUDA path computes it yet.",
}


def _reference_fallback(why, fn_name, *args, **kwargs):
    """What no backend computes yet, through the PyTorch reference (warns once per reason):
    ``why="mlp"``, memory='mlp' on a non-CPU device; ``why="chunk_maps"``, map_schedule='chunk' where no
    C++ path computes it (SPEC §5b); ``why="lq_mirror"``, lq_map='mirror'."""
    if why not in _WARNED:
        warnings.warn("miras: " + _FALLBACK_WHY[why], stacklevel=3)
        _WARNED.add(why)
    from . import reference

    return getattr(reference, fn_name)(*args, **kwargs)


def _pair(x, name: str, what: str):
    """One field of an MLP memory state: a (W1-like, W2-like) pair of tensors."""
    if not isinstance(x, (tuple, list)) or len(x) != 2 or not all(isinstance(t, Tensor) for t in x):
        got = f"a {len(x)}-element {type(x).__name__}" if isinstance(x, (tuple, list)) else type(x).__name__
        _fail(f"{name} must be a pair of tensors {what} for memory='mlp', got {got}")
    return tuple(x)


def _mlp_state(st, where: str, N: int, H: int, Dk: int, Dv: int, expansion, momentum, q: Tensor):
    """Checked ``(X, P, anchor, offset)`` of an MLP memory state: X, anchor (and P) are (W1, W2) pairs,
    ``W1 [N, H, Dk, Dh]``, ``W2 [N, H, Dh, Dv]``; Dh is W1's (``expansion * Dk`` when expansion is given)."""
    if not isinstance(st, MemoryState):
        _fail(f"{where} must be a miras.MemoryState, got {type(st).__name__}")
    X = _pair(st.X, f"{where}.X", "(W1 [N, H, Dk, Dh], W2 [N, H, Dh, Dv])")
    W1 = X[0]
    if W1.dim() != 4 or W1.shape[-1] < 1:
        _fail(f"{where}.X[0] (W1) must be [N, H, Dk, Dh] with Dh >= 1, got {list(W1.shape)}")
    Dh = W1.shape[-1]
    if expansion is not None:
        if isinstance(expansion, bool) or not isinstance(expansion, int) or expansion < 1:
            _fail(f"expansion must be an int >= 1 or None (inferred from W1), got {expansion!r}")
        if Dh != expansion * Dk:
            _fail(f"{where}.X[0] (W1) must be [N, H, Dk, expansion*Dk] = {[N, H, Dk, expansion * Dk]} for "
                  f"expansion={expansion}, got {list(W1.shape)}")
    s1, s2 = (N, H, Dk, Dh), (N, H, Dh, Dv)
    d1, d2 = "[N, H, Dk, Dh]", "[N, H, Dh, Dv]"

    def checked(pair, name, m):
        return (_state_tensor(pair[0], f"{name}[0] ({m}1)", s1, q, d1),
                _state_tensor(pair[1], f"{name}[1] ({m}2)", s2, q, d2))

    X = checked(X, f"{where}.X", "W")
    P = None
    if st.P is not None:
        if momentum is None:
            _fail(f"{where}.P (momentum states) is set but momentum is None; pass momentum gates or drop P")
        P = checked(_pair(st.P, f"{where}.P", "(P1, P2) shaped like X"), f"{where}.P", "P")
    if st.anchor is st.X:
        A = X
    else:
        A = checked(_pair(st.anchor, f"{where}.anchor", "(A1, A2) shaped like X"), f"{where}.anchor", "A")
    off = st.offset
    if not isinstance(off, Tensor) or tuple(off.shape) != (N,):
        _fail(f"{where}.offset must be an int tensor of shape [{N}]")
    return X, P, A, off


def _ln_param(t, name: str, H: int, Dv: int, q: Tensor):
    """The MLP memory's LayerNorm affine (an outer-loop parameter): None or a [H, Dv] tensor."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        _fail(f"{name} must be a [H, Dv] tensor or None, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        _fail(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if tuple(t.shape) != (H, Dv):
        _fail(f"{name} must have shape [H, Dv] = {[H, Dv]}, got {list(t.shape)}")
    if t.device != q.device:
        _fail(f"{name} is on {t.device} but q is on {q.device}; move all inputs to one device")
    return t


def _mlp_checks(pr, ln_weight, ln_bias, q):
    if pr["Dv"] != pr["Dk"]:
        _fail(f"memory='mlp' needs Dv == Dk (M(x) = x + LN(GELU(x W1) W2) adds x), got Dk={pr['Dk']}, "
              f"Dv={pr['Dv']}")
    return _ln_param(ln_weight, "ln_weight", pr["H"], pr["Dv"], q), _ln_param(ln_bias, "ln_bias", pr["H"], pr["Dv"], q)


def _final_anchor(pr, C: int, XT, AT, X0, device):
    """offset and anchor of the chunked op's final state; XT, AT, X0 are tuples of matrices (X0 may be None).

    At a boundary (offset 0) the anchor is X_T itself, and carries its gradient; a sequence shorter than
    one chunk keeps the initial state as its anchor; otherwise it is the op's (constant) AT."""
    N, T = pr["N"], pr["T"]
    if pr["cu"] is not None:
        lengths = pr["cu"][1:] - pr["cu"][:-1]
        offset = lengths % C
        at_boundary = (offset == 0).view(N, 1, 1, 1)
        anchor = tuple(torch.where(at_boundary, x, a) for x, a in zip(XT, AT))
        if X0 is not None:
            short = (lengths < C).view(N, 1, 1, 1)
            anchor = tuple(torch.where(short, x0.to(a.dtype), a) for x0, a in zip(X0, anchor))
        return offset, anchor
    offset = torch.full((N,), T % C, dtype=torch.int64, device=device)
    if T % C == 0:
        return offset, tuple(XT)
    if T < C and X0 is not None:
        return offset, tuple(x0.to(x.dtype) for x0, x in zip(X0, XT))
    return offset, tuple(AT)


def memory_update(q, k, v, lr, alpha, momentum=None, *, initial_state: Optional[MemoryState] = None,
                  output_final_state=False, cu_seqlens=None, ln_weight=None, ln_bias=None, expansion=None,
                  check_inputs=True, config: Optional[Config] = None, **options) -> Tuple[Tensor, Optional[MemoryState]]:
    """Chunked Miras memory over a sequence (SPEC §5).

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; lr, alpha, momentum: [B, T, H].
    Returns ``(o [B, T, H, Dv], final_state or None)``.

    The configuration: ``config=miras.Config(...)`` and/or its fields as keywords (which override
    it): ``memory`` ("linear" | "mlp"), ``bias`` (dot, l2, lp, huber, robust), ``huber_mode``
    (yaad, coord, norm), ``retention`` (l2, kl, elastic_net, lq), ``p``, ``eps``, ``kl_scale``,
    ``q_norm``, ``eps_q``, ``chunk_size`` (64), ``scale`` (None: Dk**-0.5). Per-token parameters, a
    float or a [B, T, H] tensor: ``delta`` (huber, 1.0), ``robust_delta`` (robust, 0.0),
    ``gamma`` (elastic_net, 0.0). Unknown keywords are an error.

    ``memory="mlp"`` (SPEC §6, ``M(x) = x + LN(GELU(x W1) W2)``): needs ``Dv == Dk`` and
    ``initial_state=MemoryState(X=(W1 [N, H, Dk, Dh], W2 [N, H, Dh, Dv]))`` (P and anchor pairs too);
    ``expansion`` (optional) checks ``Dh == expansion * Dk``; ``ln_weight, ln_bias [H, Dv]`` are the
    LayerNorm's affine (differentiable); ``scale`` defaults to 1. CPU tensors run the C++ op
    (``torch.ops.miras.mlp_chunk_fwd``); CUDA tensors the PyTorch reference (warns once).
    """
    cfg, params = Config.split(config, **options)
    why = _reference_only(cfg, q, step=False)
    if why:
        if check_inputs and cfg.memory == "linear":  # the op's own input checks (with a config C++ knows)
            _prepare(q, k, v, lr, alpha, momentum, cfg=cfg.replace(lq_map="eq24"), params=params,
                     cu_seqlens=cu_seqlens, check_inputs=True)
        return _reference_fallback(why, "memory_update_chunked", q, k, v, lr, alpha, momentum,
                                     initial_state=initial_state, output_final_state=output_final_state,
                                     cu_seqlens=cu_seqlens, ln_weight=ln_weight, ln_bias=ln_bias,
                                     expansion=expansion, **cfg.reference_kwargs(), **params)
    if cfg.memory == "mlp":
        return _mlp_update(q, k, v, lr, alpha, momentum, cfg=cfg, params=params, initial_state=initial_state,
                           output_final_state=output_final_state, cu_seqlens=cu_seqlens, ln_weight=ln_weight,
                           ln_bias=ln_bias, expansion=expansion, check_inputs=check_inputs)
    _linear_only(ln_weight, ln_bias, expansion)
    pr = _prepare(q, k, v, lr, alpha, momentum, cfg=cfg, params=params, cu_seqlens=cu_seqlens,
                  check_inputs=check_inputs)
    N, H, Dk, Dv, T = pr["N"], pr["H"], pr["Dk"], pr["Dv"], pr["T"]
    sshape = (N, H, Dk, Dv)
    X0 = P0 = None
    if initial_state is not None:
        if not isinstance(initial_state, MemoryState):
            _fail(f"initial_state must be a miras.MemoryState, got {type(initial_state).__name__}")
        X0 = _state_tensor(initial_state.X, "initial_state.X", sshape, q)
        if initial_state.P is not None:
            if momentum is None:
                _fail("initial_state.P (a momentum state) is set but momentum is None; pass momentum gates or "
                      "drop P")
            P0 = _state_tensor(initial_state.P, "initial_state.P", sshape, q)
        off = initial_state.offset
        if not isinstance(off, Tensor) or tuple(off.shape) != (N,):
            _fail(f"initial_state.offset must be an int tensor of shape [{N}]")
        if check_inputs:
            _check_values(off.to(q.device) == 0,
                          "memory_update needs initial_state.offset == 0 (a state at a chunk boundary); "
                          "continue a partial chunk with memory_step, or pass the state from a chunk boundary")
            anchor = initial_state.anchor
            if anchor is not initial_state.X and not _compiling():
                _state_tensor(anchor, "initial_state.anchor", sshape, q)
                if not torch.equal(anchor, initial_state.X):
                    _fail("initial_state.anchor differs from initial_state.X at offset 0; at a chunk boundary the "
                          "anchor is the state itself")
    grad = _needs_grad(q, k, v, lr, alpha, momentum, pr["bias_tensor"], pr["ret_tensor"], X0, P0)
    C = cfg.chunk_size
    if output_final_state and grad and not _compiling():
        # The final anchor of a sequence that ends inside a chunk is the state at its last chunk
        # boundary. For its gradient to be exact, run the op up to that boundary and from there
        # on (two calls, no extra work), so the anchor is an output at a chunk boundary.
        split = _split_at_boundaries(q, k, v, lr, alpha, momentum, initial_state, pr, C, cfg, params, {})
        if split is not None:
            return split
    out = torch.ops.miras.chunk_fwd(
        q, k, v, lr, alpha, momentum, pr["bias_tensor"], pr["ret_tensor"], X0, P0, None, pr["cu"], pr["icfg"],
        pr["fcfg"], grad)
    o, XT, PT, AT = out[0], out[1], out[2], out[3]
    if not output_final_state:
        return o, None
    offset, (anchor,) = _final_anchor(pr, C, (XT,), (AT,), None if X0 is None else (X0,), q.device)
    R = _chunk_read_memory(cfg, pr, alpha, XT, anchor, offset) if cfg.chunk_maps else None
    return o, MemoryState(X=XT, P=PT if momentum is not None else None, anchor=anchor, offset=offset, R=R)


def _reference_only(cfg: Config, q, step: bool):
    """Why this configuration runs through miras.reference ("lq_mirror", "chunk_maps"), or None."""
    if cfg.lq_mirror:
        return "lq_mirror"
    if cfg.chunk_maps and (step or not _chunk_maps_in_cpp(cfg, q)):
        return "chunk_maps"
    return None


def _chunk_maps_in_cpp(cfg: Config, q) -> bool:
    """map_schedule='chunk' cases the C++ op computes: linear memory, kl or lq, CPU tensors."""
    return cfg.memory == "linear" and cfg.retention in ("kl", "lq") and isinstance(q, Tensor) and q.device.type == "cpu"


def _chunk_read_memory(cfg: Config, pr, alpha, XT, anchor, offset):
    """The final read memory R of map_schedule='chunk' (SPEC §5b) from the op's outputs: φ(X_T) at a
    chunk boundary; inside the last chunk, whose raw state left its start A as X_T = R + γ (A − φ(A))
    (γ = Π α over that chunk's tokens), R = X_T − γ (A − φ(A)). Differentiable through X_T, A, α."""
    from .reference import _Cfg, _phi

    rc = _Cfg("linear", cfg.bias, cfg.retention, cfg.p, cfg.eps, cfg.huber_mode, cfg.kl_scale, cfg.q_norm, cfg.eps_q,
              None, None, cfg.map_schedule, cfg.lq_map)
    N, T, cu = pr["N"], pr["T"], pr["cu"]
    a = alpha.to(XT.dtype)
    if cu is None:  # one offset for every sequence: only the map that is needed
        tail = T % cfg.chunk_size
        if tail == 0:
            return _phi(XT, rc)
        gamma = a[:, T - tail:].prod(1)                                                  # [N, H]
        return XT - gamma[..., None, None] * (anchor - _phi(anchor, rc))
    starts = (cu[1:] - offset).tolist()
    gamma = torch.stack([a[0, s:e].prod(0) for s, e in zip(starts, cu[1:].tolist())])
    at_boundary = (offset == 0).view(N, 1, 1, 1)
    inside = XT - gamma[..., None, None] * (anchor - _phi(anchor, rc))
    return torch.where(at_boundary, _phi(XT, rc), inside)


def _linear_only(ln_weight, ln_bias, expansion):
    for name, val in (("ln_weight", ln_weight), ("ln_bias", ln_bias), ("expansion", expansion)):
        if val is not None:
            _fail(f"{name} applies to memory='mlp' only; pass None for the linear memory")


def _mlp_update(q, k, v, lr, alpha, momentum, *, cfg, params, initial_state, output_final_state, cu_seqlens, ln_weight,
                ln_bias, expansion, check_inputs):
    """memory_update(memory="mlp"): the same validation as the linear memory, then the C++ op on CPU tensors."""
    pr = _prepare(q, k, v, lr, alpha, momentum, cfg=cfg, params=params, cu_seqlens=cu_seqlens,
                  check_inputs=check_inputs)
    N, H, Dk, Dv = pr["N"], pr["H"], pr["Dk"], pr["Dv"]
    lnw, lnb = _mlp_checks(pr, ln_weight, ln_bias, q)
    if initial_state is None:
        _fail("memory='mlp' needs initial_state=MemoryState(X=(W1, W2)) with W1 [N, H, Dk, Dh] and "
              "W2 [N, H, Dh, Dv]: an MLP memory has no useful zero state (its gradients vanish), SPEC §7")
    X0, P0, A0, off = _mlp_state(initial_state, "initial_state", N, H, Dk, Dv, expansion, momentum, q)
    if check_inputs:
        _check_values(off.to(q.device) == 0,
                      "memory_update needs initial_state.offset == 0 (a state at a chunk boundary); "
                      "continue a partial chunk with memory_step, or pass the state from a chunk boundary")
        if A0 is not X0 and not _compiling():
            if not all(torch.equal(a, x) for a, x in zip(A0, X0)):
                _fail("initial_state.anchor differs from initial_state.X at offset 0; at a chunk boundary the "
                      "anchor is the state itself")
    if q.device.type != "cpu":
        return _reference_fallback("mlp", "memory_update_chunked", q, k, v, lr, alpha, momentum,
                             **cfg.replace(scale=pr["scale"]).reference_kwargs(), **params,
                             initial_state=initial_state, output_final_state=output_final_state,
                             cu_seqlens=cu_seqlens, ln_weight=lnw, ln_bias=lnb, expansion=None)
    P1, P2 = (None, None) if (momentum is None or P0 is None) else P0
    grad = _needs_grad(q, k, v, lr, alpha, momentum, pr["bias_tensor"], pr["ret_tensor"], lnw, lnb, *X0, P1, P2)
    C = cfg.chunk_size
    if output_final_state and grad and not _compiling():
        # as for the linear memory: an exact gradient for an anchor inside the last chunk
        split = _split_at_boundaries(q, k, v, lr, alpha, momentum, initial_state, pr, C, cfg, params,
                                     dict(ln_weight=lnw, ln_bias=lnb))
        if split is not None:
            return split
    out = torch.ops.miras.mlp_chunk_fwd(
        q, k, v, lr, alpha, momentum, pr["bias_tensor"], pr["ret_tensor"], lnw, lnb, X0[0], X0[1], P1, P2, None,
        None, pr["cu"], pr["icfg"], pr["fcfg"], grad)
    o = out[0]
    if not output_final_state:
        return o, None
    XT, AT = (out[1], out[2]), (out[5], out[6])
    offset, anchor = _final_anchor(pr, C, XT, AT, X0, q.device)
    return o, MemoryState(X=XT, P=(out[3], out[4]) if momentum is not None else None, anchor=anchor,
                          offset=offset)


def _split_at_boundaries(q, k, v, lr, alpha, momentum, initial_state, pr, C, cfg, params, extra_kw):
    """memory_update as two calls, [start, last boundary) and [last boundary, end), per sequence.

    Returns None when no sequence needs it (each ends on a boundary or inside its first chunk).
    """
    T, cu = pr["T"], pr["cu"]
    kw = dict(extra_kw, config=cfg.replace(scale=pr["scale"]), check_inputs=False)
    if cu is None:
        t0 = (T // C) * C
        if t0 == 0 or t0 == T:
            return None

        def part(x, a, b):
            return x[:, a:b] if isinstance(x, Tensor) else x

        def run(a, b, state):
            extra = {n: part(val, a, b) for n, val in params.items()}
            return memory_update(part(q, a, b), part(k, a, b), part(v, a, b), part(lr, a, b), part(alpha, a, b),
                                 part(momentum, a, b), initial_state=state, output_final_state=True,
                                 **{**kw, **extra})

        o1, s1 = run(0, t0, initial_state)
        o2, s2 = run(t0, T, s1)
        return torch.cat([o1, o2], dim=1), MemoryState(X=s2.X, P=s2.P, anchor=s1.X, offset=s2.offset, R=s2.R)
    lengths = cu[1:] - cu[:-1]
    if bool(((lengths % C == 0) | (lengths < C)).all()):
        return None
    pre = (lengths // C) * C
    # Call 1 runs over the packed tokens as they are (no copies, so nothing input-sized is saved
    # twice for backward): each sequence's whole chunks [start, start + pre) are one segment and
    # its remainder (< C tokens) a second, throwaway segment; call 2 reruns the remainders
    # (gathered: < C tokens per sequence) from the states at the last boundaries.
    cu1 = torch.cat([cu[:1], torch.stack([cu[:-1] + pre, cu[1:]], 1).flatten()])

    def each(f, x):  # a state is a tensor or a tuple of them (one per matrix of the memory)
        if x is None:
            return None
        return tuple(f(t) for t in x) if isinstance(x, (tuple, list)) else f(x)

    state1 = None
    if initial_state is not None:
        def pad(x):  # the real state at even positions, zeros for the throwaway segments
            return torch.stack([x, torch.zeros_like(x)], 1).flatten(0, 1)

        state1 = MemoryState(X=each(pad, initial_state.X), P=each(pad, initial_state.P))
    o1, s1 = memory_update(q, k, v, lr, alpha, momentum, initial_state=state1, output_final_state=True,
                           cu_seqlens=cu1, **{**kw, **params})
    X1 = each(lambda t: t[0::2], s1.X)
    P1 = each(lambda t: t[0::2], s1.P)
    seg = torch.searchsorted(cu[1:], torch.arange(T, device=cu.device), right=True)
    pos = torch.arange(T, device=cu.device) - cu[seg]
    idx_suf = (pos >= pre[seg]).nonzero().flatten()
    cu_suf = torch.cat([cu.new_zeros(1), (lengths - pre).cumsum(0)])

    def take(x):
        return x.index_select(1, idx_suf) if isinstance(x, Tensor) else x

    o2, s2 = memory_update(take(q), take(k), take(v), take(lr), take(alpha), take(momentum),
                           initial_state=MemoryState(X=X1, P=P1), output_final_state=True, cu_seqlens=cu_suf,
                           **{**kw, **{n: take(val) for n, val in params.items()}})
    return o1.index_copy(1, idx_suf, o2), MemoryState(X=s2.X, P=s2.P, anchor=X1, offset=s2.offset, R=s2.R)


def memory_step(q, k, v, lr, alpha, momentum=None, *, state: MemoryState, exact=False, ln_weight=None,
                ln_bias=None, expansion=None, check_inputs=True, config: Optional[Config] = None,
                **options) -> Tuple[Tensor, MemoryState]:
    """One token per sequence (decoding), SPEC §7. q, k: [B, H, Dk]; v: [B, H, Dv]; gates and
    per-token parameters [B, H]. Options as for ``memory_update``.

    Takes the gradient at ``state.anchor``, updates the state, reads after the write, and moves the
    anchor to the new state when ``offset`` reaches ``chunk_size`` (1 with ``exact=True``).
    ``memory="mlp"``: the state's X, P and anchor are (W1, W2) pairs (see ``memory_update``); CPU
    tensors run the C++ op, CUDA tensors the PyTorch reference.
    """
    cfg, params = Config.split(config, **options)
    memory, chunk_size = cfg.memory, cfg.chunk_size
    if memory == "linear":
        _linear_only(ln_weight, ln_bias, expansion)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            _fail(f"memory_step: {name} must be [B, H, D] (one token per sequence), got "
                  f"{list(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if not isinstance(state, MemoryState):
        _fail(f"memory_step: state must be a miras.MemoryState, got {type(state).__name__}")
    C = 1 if exact else chunk_size

    def tok(t):
        return t.unsqueeze(1) if isinstance(t, Tensor) else t

    why = _reference_only(cfg, q, step=True)
    if why:
        if check_inputs and memory == "linear":
            _prepare(tok(q), tok(k), tok(v), tok(lr), tok(alpha), tok(momentum), cfg=cfg.replace(lq_map="eq24"),
                     params={n: tok(x) for n, x in params.items()}, cu_seqlens=None, check_inputs=True, chunk_size=1)
        return _reference_fallback(why, "memory_step", q, k, v, lr, alpha, momentum, state=state, exact=exact,
                                     ln_weight=ln_weight, ln_bias=ln_bias, expansion=expansion,
                                     **cfg.reference_kwargs(), **params)

    # The op runs one token as a chunk of one (chunk_size 1), the anchor being the state's.
    pr = _prepare(tok(q), tok(k), tok(v), tok(lr), tok(alpha), tok(momentum), cfg=cfg,
                  params={n: tok(x) for n, x in params.items()}, cu_seqlens=None, check_inputs=check_inputs,
                  chunk_size=1)
    N, H, Dk, Dv = pr["N"], pr["H"], pr["Dk"], pr["Dv"]
    if memory == "mlp":
        return _mlp_step(q, k, v, lr, alpha, momentum, tok, pr, C, state=state, expansion=expansion,
                         ln_weight=ln_weight, ln_bias=ln_bias, check_inputs=check_inputs,
                         ref_kw=dict(exact=exact, **cfg.replace(scale=pr["scale"]).reference_kwargs(), **params))
    sshape = (N, H, Dk, Dv)
    X0 = _state_tensor(state.X, "state.X", sshape, q)
    A0 = _state_tensor(state.anchor, "state.anchor", sshape, q)
    P0 = None
    if momentum is not None:
        P0 = _state_tensor(state.P, "state.P", sshape, q) if state.P is not None else None
    elif state.P is not None:
        _fail("state.P (a momentum state) is set but momentum is None")
    off = state.offset
    if not isinstance(off, Tensor) or tuple(off.shape) != (N,):
        _fail(f"state.offset must be an int tensor of shape [{N}]")
    off = off.to(device=q.device, dtype=torch.int64)
    if check_inputs:
        _check_values((off >= 0) & (off < C), f"state.offset must lie in [0, chunk_size={C})")
    out = torch.ops.miras.chunk_fwd(
        tok(q), tok(k), tok(v), tok(lr), tok(alpha), tok(momentum), pr["bias_tensor"], pr["ret_tensor"], X0, P0,
        A0, None, pr["icfg"], pr["fcfg"], _needs_grad(q, k, v, lr, alpha, momentum, pr["bias_tensor"],
                                                      pr["ret_tensor"], X0, P0, A0))
    o, XT, PT = out[0][:, 0], out[1], out[2]
    new_off = off + 1
    moved = new_off >= C
    anchor = torch.where(moved.view(N, 1, 1, 1), XT, A0.to(XT.dtype))
    new_off = torch.where(moved, torch.zeros_like(new_off), new_off)
    return o, MemoryState(X=XT, P=PT if momentum is not None else None, anchor=anchor, offset=new_off)


def _mlp_step(q, k, v, lr, alpha, momentum, tok, pr, C, *, state, expansion, ln_weight, ln_bias, check_inputs,
              ref_kw):
    """memory_step(memory="mlp"): the MLP op on one token with the state's separate anchor."""
    N, H, Dk, Dv = pr["N"], pr["H"], pr["Dk"], pr["Dv"]
    lnw, lnb = _mlp_checks(pr, ln_weight, ln_bias, q)
    X0, P0, A0, off = _mlp_state(state, "state", N, H, Dk, Dv, expansion, momentum, q)
    off = off.to(device=q.device, dtype=torch.int64)
    if check_inputs:
        _check_values((off >= 0) & (off < C), f"state.offset must lie in [0, chunk_size={C})")
    if q.device.type != "cpu":
        return _reference_fallback("mlp", "memory_step", q, k, v, lr, alpha, momentum, state=state, ln_weight=lnw, ln_bias=lnb,
                             expansion=None, **ref_kw)
    P1, P2 = (None, None) if (momentum is None or P0 is None) else P0
    grad = _needs_grad(q, k, v, lr, alpha, momentum, pr["bias_tensor"], pr["ret_tensor"], lnw, lnb, *X0, P1, P2,
                       *A0)
    out = torch.ops.miras.mlp_chunk_fwd(
        tok(q), tok(k), tok(v), tok(lr), tok(alpha), tok(momentum), pr["bias_tensor"], pr["ret_tensor"], lnw, lnb,
        X0[0], X0[1], P1, P2, A0[0], A0[1], None, pr["icfg"], pr["fcfg"], grad)
    o, XT = out[0][:, 0], (out[1], out[2])
    new_off = off + 1
    moved = new_off >= C
    anchor = tuple(torch.where(moved.view(N, 1, 1, 1), x, a.to(x.dtype)) for x, a in zip(XT, A0))
    new_off = torch.where(moved, torch.zeros_like(new_off), new_off)
    return o, MemoryState(X=XT, P=(out[3], out[4]) if momentum is not None else None, anchor=anchor,
                          offset=new_off)


# ---- presets (the paper's models as points of the design space) ---------------------------------
def moneta(q, k, v, lr, alpha, momentum=None, *, p=3.0, q_norm=4.0, **kw):
    """Moneta: lp attentional bias (p=3) and lq retention (q=4) (paper §5.1). memory defaults to 'linear'
    here; the paper's layer uses memory='mlp'."""
    return memory_update(q, k, v, lr, alpha, momentum, bias="lp", retention="lq", p=p, q_norm=q_norm, **kw)


def yaad(q, k, v, lr, alpha, momentum=None, *, delta=1.0, huber_mode="yaad", **kw):
    """Yaad: Huber attentional bias (Eq. 16) with l2 retention (decay) (paper §5.1)."""
    return memory_update(q, k, v, lr, alpha, momentum, bias="huber", retention="l2", delta=delta,
                         huber_mode=huber_mode, **kw)


def memora(q, k, v, lr, alpha, momentum=None, *, kl_scale=1.0, **kw):
    """Memora: l2 attentional bias with KL (softmax) retention (paper §5.1)."""
    return memory_update(q, k, v, lr, alpha, momentum, bias="l2", retention="kl", kl_scale=kl_scale, **kw)


def titans(q, k, v, lr, alpha, momentum, **kw):
    """Titans-style linear memory: l2 bias, l2 retention (alpha = 1 - forget gate) and momentum."""
    if momentum is None:
        _fail("titans needs momentum gates [B, T, H] (use memory_update for plain gradient descent)")
    return memory_update(q, k, v, lr, alpha, momentum, bias="l2", retention="l2", **kw)
