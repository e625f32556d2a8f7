"""Readable PyTorch reference of SPEC.md — the yardstick every backend is compared to.

Pure PyTorch (never imports ``miras._C``), float64-capable, differentiable by autograd with
respect to every input (no in-place updates of tensors that carry gradients; masks and
thresholds are ``torch.where``). Like flash-linear-attention's ``naive.py``.

Public functions
----------------
``psi``                    the attentional bias' error signal (SPEC §3).
``memory_update_loop``     the op, literally per token (SPEC §5): gradient at the anchor (the raw
                           state at the last chunk boundary, read through φ), exact retention step
                           and threshold, read after write. Accepts states with any ``offset``.
``memory_update_chunked``  the same op in chunked form: for retention ``l2`` the dual form of
                           KERNELS.md §1 (linear memory) / §5 (MLP memory), batched matmuls per
                           chunk over [B, H]; for the map-based retentions (kl, elastic_net, lq)
                           the anchor residuals as one batched matmul per chunk followed by a
                           per-token scan inside the chunk (KERNELS.md §2). This is the "eager
                           PyTorch" baseline of the benchmarks.
``memory_step``            one decoding token (SPEC §7).

Internal layout: heads before time, ``[N, H, T, D]`` (gates ``[N, H, T]``); a memory is a tuple
of matrices (linear: ``(S,)``; MLP: ``(W1, W2)``), each with its own raw state, momentum and
anchor. Per token, the lr-scaled inner gradient of matrix m is the outer product
``left_mᵀ right_m`` of two rows (linear: ``k_tᵀ (η_t ψ_t)``; MLP: ``k_tᵀ (η_t δz_t)`` and
``a_tᵀ (η_t δu_t)``), which is what lets one helper (``_anchor_signal``) serve the per-token
loop, the in-chunk scan and the dual form.

Decisions worth knowing (none changes the math of SPEC.md):
- The decay matrices ``Lγ[t,s] = Π_{j=s+1..t} α_j`` and ``Lβ`` are built with ``cumprod`` of a
  masked matrix instead of ``exp`` of differences of log cumsums: the same numbers, and
  ``momentum == 0`` (``log β = −inf``) is exact in value *and* gradient.
- The first chunk's gradient is taken at ``initial_state.anchor`` (which equals ``X`` for any
  state with ``offset == 0`` that the ops produce), matching the step op's literal semantics.
- Without ``momentum`` an ``initial_state.P`` is ignored and the final state has ``P=None``;
  with momentum and ``initial_state.P is None`` the momentum starts at zero.
- Python-float parameters are constants; tensor parameters (``delta``, ``robust_delta``,
  ``gamma``: ``[B, T, H]``, or 0-dim) are differentiable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .state import MemoryState

__all__ = ["psi", "memory_update_loop", "memory_update_chunked", "memory_step"]

_BIASES = ("dot", "l2", "lp", "huber", "robust")
_HUBER_MODES = ("yaad", "coord", "norm")
_RETENTIONS = ("l2", "kl", "elastic_net", "lq")
_MEMORIES = ("linear", "mlp")
_MAP_SCHEDULES = ("token", "chunk")
_LQ_MAPS = ("eq24", "mirror")
LN_EPS = 1e-5  # LayerNorm epsilon of the MLP memory (SPEC §6)


# =============================================================================================
# SPEC §3 — attentional bias: the error signal ψ = ∂ℓ/∂ŷ
# =============================================================================================
def _per_row(x, e: Tensor):
    """A float, a 0-dim tensor or a per-token tensor of shape ``e.shape[:-1]`` (callers pass
    ``[...]``; ``[..., 1]`` is accepted too), made broadcastable against ``e`` [..., Dv]."""
    if isinstance(x, Tensor):
        x = x.to(e.dtype)
        if x.dim() > 0 and x.dim() == e.dim() - 1:
            x = x.unsqueeze(-1)
        return x
    return float(x)


def psi(e: Tensor, v: Tensor, bias: str, *, p: float = 3.0, eps: float = 1e-6, delta=1.0,
        huber_mode: str = "yaad", robust_delta=0.0) -> Tensor:
    """SPEC §3: the output-side gradient ψ(e) of the attentional bias, row-wise over the last
    axis. ``e = ŷ − v`` and ``v`` are ``[..., Dv]``; ``delta``/``robust_delta`` are floats or
    tensors of shape ``[...]`` (one value per row)."""
    if bias == "dot":                     # ℓ = −⟨ŷ, v⟩
        return -v + torch.zeros_like(e)
    if bias == "l2":                      # ℓ = ½‖e‖²
        return e
    if bias == "lp":                      # ℓ = (1/p) Σ (e² + ε)^{p/2}
        return e * (e * e + eps) ** ((p - 2.0) / 2.0)
    if bias == "huber":
        d = _per_row(delta, e)
        if huber_mode == "coord":         # Σ_i H_δ(e_i)  →  clamp(e, −δ, δ)
            return torch.where(e > d, d + torch.zeros_like(e),
                               torch.where(e < -d, -d + torch.zeros_like(e), e))
        n2 = (e * e).sum(-1, keepdim=True)
        outside = n2 > d * d              # ‖e‖ > δ  (the branch test is a mask: no gradient)
        if huber_mode == "yaad":          # ℓ2 inside, δ·(smoothed ℓ1) outside
            return torch.where(outside, d * e / torch.sqrt(e * e + eps), e)
        if huber_mode == "norm":          # H_δ(‖e‖)  →  e·min(1, δ/‖e‖)
            n = torch.sqrt(torch.where(outside, n2, torch.ones_like(n2)))
            return torch.where(outside, d * e / n, e)
        raise ValueError(f"huber_mode must be one of {_HUBER_MODES}, got {huber_mode!r}")
    if bias == "robust":                  # ½‖e‖² + Δ·√(‖e‖² + ε)
        D = _per_row(robust_delta, e)
        r = torch.sqrt((e * e).sum(-1, keepdim=True) + eps)
        return e * (1.0 + D / r)
    raise ValueError(f"bias must be one of {_BIASES}, got {bias!r}")


# =============================================================================================
# SPEC §4 — retention: read map φ and the step (with the elastic-net threshold)
# =============================================================================================
@dataclass
class _Cfg:
    memory: str
    bias: str
    retention: str
    p: float
    eps: float
    huber_mode: str
    kl_scale: float
    q_norm: float
    eps_q: float
    ln_weight: Optional[Tensor]   # [H, Dv] or None
    ln_bias: Optional[Tensor]
    map_schedule: str = "token"   # SPEC §5 ("token") or §5b ("chunk")
    lq_map: str = "eq24"          # lq: Eq. 24 (A / ‖A‖^(q−2)) or the mirror map (sign(A)|A|^(q−1) / ‖A‖^(q−2))

    @property
    def chunk_maps(self) -> bool:
        """SPEC §5b with a map that differs from the l2 recurrence: tokens read the memory R."""
        return self.map_schedule == "chunk" and self.retention != "l2"


def _phi(X: Tensor, cfg: _Cfg) -> Tensor:
    """Read map W = φ(X) of one matrix [..., a, b]."""
    r = cfg.retention
    if r in ("l2", "elastic_net"):
        return X
    if r == "kl":   # softmax over the key/input axis (−2): each output channel's weights sum to c
        return cfg.kl_scale * torch.softmax(X, dim=-2)
    if r == "lq":   # W = A / max(‖A‖_q, ε_q)^{q−2}, the norm over the whole matrix
        q = cfg.q_norm
        if q == 2.0:
            return X
        s = X.abs().pow(q).sum((-2, -1), keepdim=True)
        big = s > cfg.eps_q ** q
        n = torch.where(big, torch.where(big, s, torch.ones_like(s)).pow(1.0 / q),
                        torch.full_like(s, cfg.eps_q))
        if cfg.lq_map == "mirror":   # ∇ of ‖A‖_q² / 2: the mirror map of an ℓq regulariser, degree 1
            return torch.sign(X) * X.abs().pow(q - 1.0) / n.pow(q - 2.0)
        return X / n.pow(q - 2.0)
    raise ValueError(f"retention must be one of {_RETENTIONS}, got {r!r}")


def _soft(z: Tensor, g) -> Tensor:
    """soft_γ(z) = sign(z)·max(|z| − γ, 0)."""
    return torch.where(z > g, z - g, torch.where(z < -g, z + g, torch.zeros_like(z)))


def _mat(x):
    """A per-(sequence, head) value [N, H] (or a float / 0-dim tensor) broadcast over a matrix."""
    if isinstance(x, Tensor) and x.dim() > 0:
        return x[..., None, None]
    return x


def _token_update(X, P, lefts, rights, alpha, beta, gamma, cfg: _Cfg, R=None):
    """One token's exact state recurrence (SPEC §4/§5.2) for every matrix of the memory.

    X, P: tuples of [N, H, a, b] (P None without momentum); lefts/rights: per matrix [N, H, a]
    and [N, H, b] rows whose outer product is the lr-scaled gradient η_t G_t;
    alpha, beta, gamma: [N, H] (gamma may be a float). R (SPEC §5b, or None): the read memory,
    moved by the l2 recurrence R_t = α_t R_{t−1} + U_t with the same update U_t.
    Returns (X, P, R)."""
    newX, newP, newR = [], [], []
    for m in range(len(X)):
        G = lefts[m][..., :, None] * rights[m][..., None, :]
        if P is not None:
            Pm = _mat(beta) * P[m] - G
            newP.append(Pm)
            U = Pm
        else:
            U = -G
        Xm = _mat(alpha) * X[m] + U
        if cfg.retention == "elastic_net":
            Xm = _soft(Xm, _mat(gamma))
        newX.append(Xm)
        if R is not None:
            newR.append(_mat(alpha) * R[m] + U)
    return tuple(newX), (tuple(newP) if P is not None else None), (tuple(newR) if R is not None else None)


# =============================================================================================
# SPEC §6 — memories: GELU / LayerNorm helpers, inner gradients at the anchor, reads
# =============================================================================================
_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu(z: Tensor) -> Tensor:
    return 0.5 * z * (1.0 + torch.erf(z / _SQRT2))


def _gelu_grad(z: Tensor) -> Tensor:
    """GELU'(z) = Φ(z) + z φ(z)."""
    return 0.5 * (1.0 + torch.erf(z / _SQRT2)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def _affine(w: Optional[Tensor]) -> Optional[Tensor]:
    """Per-head LN affine [H, Dv] → broadcastable over [N, H, L, Dv]."""
    return None if w is None else w[:, None, :]


def _ln(u: Tensor, w: Optional[Tensor], b: Optional[Tensor]) -> Tensor:
    """LayerNorm over the last axis (eps 1e-5, biased variance) with optional per-head affine."""
    mu = u.mean(-1, keepdim=True)
    xc = u - mu
    var = (xc * xc).mean(-1, keepdim=True)
    y = xc / torch.sqrt(var + LN_EPS)
    if w is not None:
        y = y * _affine(w)
    if b is not None:
        y = y + _affine(b)
    return y


def _ln_bwd(u: Tensor, g: Tensor, w: Optional[Tensor]) -> Tensor:
    """LayerNorm's input gradient for an output gradient g (KERNELS.md §5), written out so that
    the outer autograd differentiates through it without create_graph."""
    mu = u.mean(-1, keepdim=True)
    xc = u - mu
    sigma = torch.sqrt((xc * xc).mean(-1, keepdim=True) + LN_EPS)
    xh = xc / sigma
    gh = g if w is None else g * _affine(w)
    return (gh - gh.mean(-1, keepdim=True) - xh * (gh * xh).mean(-1, keepdim=True)) / sigma


def _anchor_signal(Wa, K: Tensor, V: Tensor, eta: Tensor, delta, rdelta, cfg: _Cfg):
    """Inner gradients at the anchor read weights ``Wa`` for a block of tokens.

    K, V: [N, H, L, D]; eta: [N, H, L]; delta/rdelta floats or [N, H, L].
    Returns a list, one (left [N,H,L,a], right [N,H,L,b]) pair per matrix, such that token t's
    lr-scaled gradient is ``left[t]ᵀ right[t]``."""
    if cfg.memory == "linear":
        E = K @ Wa[0] - V                                   # residuals at the anchor
        Ps = psi(E, V, cfg.bias, p=cfg.p, eps=cfg.eps, delta=delta, huber_mode=cfg.huber_mode,
                 robust_delta=rdelta)
        return [(K, eta[..., None] * Ps)]
    W1, W2 = Wa
    Zk = K @ W1
    Ak = _gelu(Zk)
    Uk = Ak @ W2
    Ps = psi(K + _ln(Uk, cfg.ln_weight, cfg.ln_bias) - V, V, cfg.bias, p=cfg.p, eps=cfg.eps,
             delta=delta, huber_mode=cfg.huber_mode, robust_delta=rdelta)
    dU = _ln_bwd(Uk, Ps, cfg.ln_weight)                     # δu
    dZ = (dU @ W2.transpose(-1, -2)) * _gelu_grad(Zk)       # δz
    e = eta[..., None]
    return [(K, e * dZ), (Ak, e * dU)]


def _read(W, Q: Tensor, cfg: _Cfg) -> Tensor:
    """o = M_W(q̃) for a block of (already scaled) queries Q [N, H, L, Dk]."""
    if cfg.memory == "linear":
        return Q @ W[0]
    return Q + _ln(_gelu(Q @ W[0]) @ W[1], cfg.ln_weight, cfg.ln_bias)


def _phis(X, cfg):
    return tuple(_phi(x, cfg) for x in X)


# =============================================================================================
# Argument preparation (layout [N, H, T, ...], compute dtype, initial state)
# =============================================================================================
def _compute_dtype(dt: torch.dtype) -> torch.dtype:
    return torch.promote_types(dt, torch.float32)


def _tok_param(x, cdt, name):
    """float / 0-dim tensor kept; [B, T, H] tensor → [B, H, T] in the compute dtype."""
    if isinstance(x, Tensor):
        if x.dim() == 0:
            return x.to(cdt)
        if x.dim() != 3:
            raise ValueError(f"{name} must be a float or a [B, T, H] tensor, got shape {tuple(x.shape)}")
        return x.to(cdt).transpose(1, 2)
    return float(x)


def _sl(x, s: int, e: int):
    """Slice a [N, H, T] per-token parameter along T (floats / 0-dim pass through)."""
    if isinstance(x, Tensor) and x.dim() == 3:
        return x[:, :, s:e]
    return x


def _at(x, i: int):
    """Token i of a [N, H, T] per-token parameter → [N, H] (floats / 0-dim pass through)."""
    if isinstance(x, Tensor) and x.dim() == 3:
        return x[:, :, i]
    return x


def _tuple(x):
    if x is None:
        return None
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _pack(t, memory):
    if t is None:
        return None
    return t[0] if memory == "linear" else tuple(t)


def _prepare_state(initial_state, N, H, Dk, Dv, memory, has_mom, expansion, cdt, device, cfg: _Cfg):
    """→ (X, P, anchor, R, offset): tuples of [N, H, a, b] in cdt; P None without momentum; R (the
    read memory of SPEC §5b) None unless ``cfg.chunk_maps``: the state's R where offset > 0, φ(X)
    where offset == 0."""
    X, P, A, off = _prepare_raw_state(initial_state, N, H, Dk, Dv, memory, has_mom, expansion, cdt, device)
    if not cfg.chunk_maps:
        return X, P, A, None, off
    R0 = _tuple(getattr(initial_state, "R", None))
    W = _phis(X, cfg)
    if R0 is None:
        if bool((off > 0).any()):
            raise ValueError("initial_state.R (the read memory) is required where offset > 0 with "
                             "map_schedule='chunk'; pass the state the op returned")
        return X, P, A, W, off
    if len(R0) != len(X) or any(tuple(r.shape) != tuple(x.shape) for r, x in zip(R0, X)):
        raise ValueError("initial_state.R must have the shapes of initial_state.X")
    mid = (off > 0)[:, None, None, None]
    return X, P, A, tuple(torch.where(mid, r.to(cdt), w) for r, w in zip(R0, W)), off


def _prepare_raw_state(initial_state, N, H, Dk, Dv, memory, has_mom, expansion, cdt, device):
    """→ (X, P, anchor, offset)."""
    if initial_state is None:
        if memory == "mlp":
            raise ValueError("memory='mlp' requires an initial_state (its zero state has zero "
                             "gradients); pass MemoryState(X=(W1, W2))")
        X = (torch.zeros(N, H, Dk, Dv, dtype=cdt, device=device),)
        P = tuple(torch.zeros_like(x) for x in X) if has_mom else None
        return X, P, X, torch.zeros(N, dtype=torch.int64, device=device)
    X = tuple(x.to(cdt) for x in _tuple(initial_state.X))
    if memory == "linear":
        shapes = [(N, H, Dk, Dv)]
    else:
        Dh = X[0].shape[-1] if len(X) == 2 else -1
        if expansion is not None and Dh != expansion * Dk:
            raise ValueError(f"mlp memory: W1 must be [N, H, Dk, {expansion}*Dk], got "
                             f"{tuple(X[0].shape)}")
        shapes = [(N, H, Dk, Dh), (N, H, Dh, Dv)]
    if len(X) != len(shapes) or any(tuple(x.shape) != s for x, s in zip(X, shapes)):
        raise ValueError(f"initial_state.X has shapes {[tuple(x.shape) for x in X]}, expected "
                         f"{shapes}")
    P = None
    if has_mom:
        P0 = _tuple(getattr(initial_state, "P", None))
        P = tuple(torch.zeros_like(x) for x in X) if P0 is None else tuple(p.to(cdt) for p in P0)
        if any(p.shape != x.shape for p, x in zip(P, X)):
            raise ValueError("initial_state.P must have the shapes of initial_state.X")
    A0 = _tuple(getattr(initial_state, "anchor", None))
    A = X if A0 is None else tuple(a.to(cdt) for a in A0)
    if any(a.shape != x.shape for a, x in zip(A, X)):
        raise ValueError("initial_state.anchor must have the shapes of initial_state.X")
    off = getattr(initial_state, "offset", None)
    if off is None:
        off = torch.zeros(N, dtype=torch.int64, device=device)
    else:
        off = torch.as_tensor(off, device=device).to(torch.int64).reshape(-1)
        if off.numel() == 1 and N != 1:
            off = off.expand(N)
        if off.numel() != N:
            raise ValueError(f"initial_state.offset must have {N} entries")
    return X, P, A, off


def _check(memory, bias, retention, huber_mode, chunk_size, map_schedule="token", lq_map="eq24"):
    if memory not in _MEMORIES:
        raise ValueError(f"memory must be one of {_MEMORIES}, got {memory!r}")
    if bias not in _BIASES:
        raise ValueError(f"bias must be one of {_BIASES}, got {bias!r}")
    if bias == "huber" and huber_mode not in _HUBER_MODES:
        raise ValueError(f"huber_mode must be one of {_HUBER_MODES}, got {huber_mode!r}")
    if retention not in _RETENTIONS:
        raise ValueError(f"retention must be one of {_RETENTIONS}, got {retention!r}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if map_schedule not in _MAP_SCHEDULES:
        raise ValueError(f"map_schedule must be one of {_MAP_SCHEDULES}, got {map_schedule!r}")
    if lq_map not in _LQ_MAPS:
        raise ValueError(f"lq_map must be one of {_LQ_MAPS}, got {lq_map!r}")


def _run(seq_fn, q, k, v, lr, alpha, momentum, *, memory, bias, retention, p, eps, delta,
         huber_mode, robust_delta, gamma, kl_scale, q_norm, eps_q, chunk_size, scale,
         initial_state, output_final_state, cu_seqlens, ln_weight, ln_bias, expansion,
         require_zero_offset, map_schedule="token", lq_map="eq24"):
    """Shared driver of memory_update_loop / memory_update_chunked: layout, dtype, state,
    varlen segments; ``seq_fn`` processes a batch of equal-length sequences."""
    _check(memory, bias, retention, huber_mode, chunk_size, map_schedule, lq_map)
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k [B, T, H, Dk] and v [B, T, H, Dv]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    for name, g in (("lr", lr), ("alpha", alpha), ("momentum", momentum)):
        if g is not None and tuple(g.shape) != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = {(B, T, H)}, got {tuple(g.shape)}")
    if memory == "mlp" and Dv != Dk:
        raise ValueError(f"mlp memory needs Dv == Dk, got Dk={Dk}, Dv={Dv}")
    cdt = _compute_dtype(q.dtype)
    dev = q.device
    if scale is None:
        scale = Dk ** -0.5 if memory == "linear" else 1.0
    cfg = _Cfg(memory, bias, retention, float(p), float(eps), huber_mode, float(kl_scale),
               float(q_norm), float(eps_q),
               None if ln_weight is None else ln_weight.to(cdt),
               None if ln_bias is None else ln_bias.to(cdt), map_schedule, lq_map)
    for name, w in (("ln_weight", cfg.ln_weight), ("ln_bias", cfg.ln_bias)):
        if w is not None and tuple(w.shape) != (H, Dv):
            raise ValueError(f"{name} must be [H, Dv] = {(H, Dv)}, got {tuple(w.shape)}")

    Q = q.to(cdt).transpose(1, 2) * scale                  # [B, H, T, Dk], scaled
    K = k.to(cdt).transpose(1, 2)
    V = v.to(cdt).transpose(1, 2)
    eta = lr.to(cdt).transpose(1, 2)                       # [B, H, T]
    al = alpha.to(cdt).transpose(1, 2)
    be = None if momentum is None else momentum.to(cdt).transpose(1, 2)
    dl = _tok_param(delta, cdt, "delta")
    rd = _tok_param(robust_delta, cdt, "robust_delta")
    gm = _tok_param(gamma, cdt, "gamma")
    C = int(chunk_size)

    if cu_seqlens is None:
        N = B
        bounds = None
    else:
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1, got {B}")
        bounds = [int(x) for x in cu_seqlens.tolist()]
        N = len(bounds) - 1
        if N < 1 or bounds[0] != 0 or bounds[-1] != T or any(
                b1 < b0 for b0, b1 in zip(bounds[:-1], bounds[1:])):
            raise ValueError("cu_seqlens must start at 0, be non-decreasing and end at T")
    X, P, A, R, off = _prepare_state(initial_state, N, H, Dk, Dv, memory, be is not None,
                                     expansion, cdt, dev, cfg)
    if require_zero_offset and bool((off != 0).any()):
        raise ValueError("the chunked op needs initial_state.offset == 0 (a state in the middle "
                         "of a chunk); finish the chunk with memory_step or use "
                         "memory_update_loop")

    if bounds is None:
        O, X, P, A, R, off = seq_fn(Q, K, V, eta, al, be, dl, rd, gm, X, P, A, R, off, C, cfg)
    else:
        outs, Xs, Ps, As, Rs, offs = [], [], [], [], [], []
        for n in range(N):
            s, e = bounds[n], bounds[n + 1]
            pick = lambda t: None if t is None else tuple(x[n:n + 1] for x in t)  # noqa: E731
            res = seq_fn(Q[:, :, s:e], K[:, :, s:e], V[:, :, s:e], eta[:, :, s:e],
                         al[:, :, s:e], None if be is None else be[:, :, s:e],
                         _sl(dl, s, e), _sl(rd, s, e), _sl(gm, s, e),
                         pick(X), pick(P), pick(A), pick(R), off[n:n + 1], C, cfg)
            outs.append(res[0])
            Xs.append(res[1]), Ps.append(res[2]), As.append(res[3]), Rs.append(res[4]), offs.append(res[5])
        O = torch.cat(outs, dim=2)
        cat = lambda ts: tuple(torch.cat(z, 0) for z in zip(*ts))  # noqa: E731
        X, A, off = cat(Xs), cat(As), torch.cat(offs, 0)
        P = None if be is None else cat(Ps)
        R = None if R is None else cat(Rs)
    o = O.transpose(1, 2).to(q.dtype)
    if not output_final_state:
        return o, None
    return o, MemoryState(X=_pack(X, memory), P=_pack(P, memory), anchor=_pack(A, memory),
                          offset=off, R=_pack(R, memory))


# =============================================================================================
# The per-token loop (SPEC §5, literally)
# =============================================================================================
def _step_core(X, P, A, R, off, Qt, Kt, Vt, eta_t, alpha_t, beta_t, delta_t, rdelta_t, gamma_t,
               C: int, cfg: _Cfg):
    """One token for N sequences. Qt, Kt, Vt: [N, H, 1, D]; eta_t, delta_t, rdelta_t: [N, H, 1]
    (or floats); alpha_t, beta_t, gamma_t: [N, H] (or None / floats); off: [N] int64.
    R: the read memory (SPEC §5b) or None (SPEC §5: tokens read φ(X))."""
    sig = _anchor_signal(_phis(A, cfg), Kt, Vt, eta_t, delta_t, rdelta_t, cfg)
    X, P, R = _token_update(X, P, [l[:, :, 0] for l, _ in sig], [r[:, :, 0] for _, r in sig],
                            alpha_t, beta_t, gamma_t, cfg, R)
    o = _read(_phis(X, cfg) if R is None else R, Qt, cfg)  # read after write
    off = off + 1
    reset = (off >= C)[:, None, None, None]                # chunk boundary: move the anchor
    A = tuple(torch.where(reset, x, a) for x, a in zip(X, A))
    if R is not None:                                      # ... and restart R from the map
        R = tuple(torch.where(reset, w, r) for w, r in zip(_phis(X, cfg), R))
    off = torch.where(off >= C, torch.zeros_like(off), off)
    return o, X, P, A, R, off


def _loop_seq(Q, K, V, eta, al, be, dl, rd, gm, X, P, A, R, off, C, cfg):
    outs = []
    for t in range(Q.shape[2]):
        o, X, P, A, R, off = _step_core(
            X, P, A, R, off, Q[:, :, t:t + 1], K[:, :, t:t + 1], V[:, :, t:t + 1],
            eta[:, :, t:t + 1], al[:, :, t], None if be is None else be[:, :, t],
            _sl(dl, t, t + 1), _sl(rd, t, t + 1), _at(gm, t), C, cfg)
        outs.append(o)
    if outs:
        O = torch.cat(outs, dim=2)
    else:
        O = Q.new_zeros(Q.shape[0], Q.shape[1], 0, V.shape[-1])
    return O, X, P, A, R, off


def memory_update_loop(q, k, v, lr, alpha, momentum=None, *, memory="linear", bias="l2",
                       retention="l2", p=3.0, eps=1e-6, delta=1.0, huber_mode="yaad",
                       robust_delta=0.0, gamma=0.0, kl_scale=1.0, q_norm=4.0, eps_q=1e-6,
                       chunk_size=64, scale=None, initial_state=None, output_final_state=False,
                       cu_seqlens=None, ln_weight=None, ln_bias=None, expansion=4,
                       map_schedule="token", lq_map="eq24"):
    """SPEC §5 token by token: for each token the gradient at the anchor (the raw state at the
    last chunk boundary, through φ), then momentum / retention step / threshold, then the read
    o_t = M_{φ(X_t)}(q̃_t). Supports an initial state in the middle of a chunk (``offset > 0``):
    its first ``C − offset`` tokens take their gradient at ``initial_state.anchor``.
    ``map_schedule="chunk"`` (SPEC §5b): tokens read the memory R, which starts each chunk at φ(X)
    and moves by the l2 recurrence inside it; the state's ``R`` carries it at offset > 0.

    Returns ``(o [B, T, H, Dv] in q's dtype, MemoryState or None)``."""
    return _run(_loop_seq, q, k, v, lr, alpha, momentum, memory=memory, bias=bias,
                retention=retention, p=p, eps=eps, delta=delta, huber_mode=huber_mode,
                robust_delta=robust_delta, gamma=gamma, kl_scale=kl_scale, q_norm=q_norm,
                eps_q=eps_q, chunk_size=chunk_size, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                ln_weight=ln_weight, ln_bias=ln_bias, expansion=expansion,
                require_zero_offset=False, map_schedule=map_schedule, lq_map=lq_map)


# =============================================================================================
# The chunked form
# =============================================================================================
def _decay_matrix(a: Tensor) -> Tensor:
    """a [..., L] → M [..., L, L], M[t, s] = Π_{j=s+1..t} a_j for s ≤ t (1 on the diagonal),
    0 above it. Built with a cumprod of a masked matrix (exact for a_j = 0)."""
    L = a.shape[-1]
    idx = torch.arange(L, device=a.device)
    strict = idx[:, None] > idx[None, :]
    lower = idx[:, None] >= idx[None, :]
    M = torch.where(strict, a[..., :, None].expand(*a.shape, L), torch.ones_like(a)[..., None])
    cp = torch.cumprod(M, dim=-2)                          # cp[t, s] = Π_{s<j≤t} a_j
    return torch.where(lower, cp, torch.zeros_like(cp))


def _gate_mats(alpha: Tensor, beta: Optional[Tensor]):
    """Chunk gate matrices of KERNELS.md §1 for gates [N, H, L]:
    γ [N,H,L], F [N,H,L,L], f [N,H,L] (None w/o momentum), Lβ [N,H,L,L], e^{d} [N,H,L]."""
    gam = torch.cumprod(alpha, dim=-1)
    Lg = _decay_matrix(alpha)
    if beta is None:
        return gam, Lg, None, None, None
    Lb = _decay_matrix(beta)
    dprod = torch.cumprod(beta, dim=-1)
    F = Lg @ Lb
    f = (Lg @ dprod[..., None])[..., 0]
    return gam, F, f, Lb, dprod


def _dual_chunk(Qc, sig, X0, P0, alc, bec, cfg):
    """Retention l2: the chunk's outputs and end state in closed form (KERNELS.md §1, §5)."""
    gam, F, f, Lb, dprod = _gate_mats(alc, bec)

    def layer(inp, m):
        """inp [N,H,L,a] through matrix m's in-chunk states W_t (t = 1..L): row t of inp times
        W_t = γ_t W⁰ + f_t P⁰ − Σ_{i≤t} F[t,i] left_iᵀ right_i."""
        left, right = sig[m]
        out = gam[..., None] * (inp @ X0[m]) - (F * (inp @ left.transpose(-1, -2))) @ right
        if P0 is not None:
            out = out + f[..., None] * (inp @ P0[m])
        return out

    if cfg.memory == "linear":
        O = layer(Qc, 0)
    else:
        Aq = _gelu(layer(Qc, 0))
        O = Qc + _ln(layer(Aq, 1), cfg.ln_weight, cfg.ln_bias)

    newX, newP = [], []
    for m, (left, right) in enumerate(sig):
        Xm = gam[..., -1, None, None] * X0[m] - left.transpose(-1, -2) @ (F[..., -1, :, None] * right)
        if P0 is not None:
            Xm = Xm + f[..., -1, None, None] * P0[m]
            newP.append(dprod[..., -1, None, None] * P0[m]
                        - left.transpose(-1, -2) @ (Lb[..., -1, :, None] * right))
        newX.append(Xm)
    return O, tuple(newX), (tuple(newP) if P0 is not None else None)


def _scan_chunk(Qc, sig, X, P, alc, bec, gmc, cfg):
    """Map-based retentions: per-token scan inside the chunk with the anchor gradients given."""
    outs = []
    for i in range(alc.shape[-1]):
        X, P, _ = _token_update(X, P, [l[:, :, i] for l, _ in sig], [r[:, :, i] for _, r in sig],
                                alc[:, :, i], None if bec is None else bec[:, :, i], _at(gmc, i),
                                cfg)
        if Qc is not None:
            outs.append(_read(_phis(X, cfg), Qc[:, :, i:i + 1], cfg))
    return (torch.cat(outs, dim=2) if outs else None), X, P


def _paper_chunk(Qc, sig, X0, P0, R0, alc, bec, gmc, cfg):
    """SPEC §5b, one chunk: the outputs are the l2 dual form started from the read memory R0 (= φ(X0)
    at a boundary); the raw state moves by the same updates — for kl and lq in closed form,
    X_end = γ_L X0 + D_end, D the same recurrence from 0 (= R_end + γ_L (X0 − R0), without its cancellation), for
    elastic_net by its per-token thresholded recurrence."""
    O, R, P = _dual_chunk(Qc, sig, R0, P0, alc, bec, cfg)
    if cfg.retention == "elastic_net":
        _, X, _ = _scan_chunk(None, sig, X0, P0, alc, bec, gmc, cfg)
    else:
        # X_end = gam_C X0 + D_end with D the same recurrence from 0 (computed, not R_end - gam_C R0,
        # which cancels where R is large next to X)
        _, D, _ = _dual_chunk(Qc, sig, tuple(torch.zeros_like(r) for r in R0), P0, alc, bec, cfg)
        gL = torch.prod(alc, dim=-1)[..., None, None]
        X = tuple(gL * x0 + d for x0, d in zip(X0, D))
    return O, X, P, R


def _chunked_seq(Q, K, V, eta, al, be, dl, rd, gm, X, P, A, R, off, C, cfg):
    T = Q.shape[2]
    outs = []
    for s in range(0, T, C):
        e = min(s + C, T)
        A0 = A if s == 0 else X                            # the chunk's anchor (raw)
        sig = _anchor_signal(_phis(A0, cfg), K[:, :, s:e], V[:, :, s:e], eta[:, :, s:e],
                             _sl(dl, s, e), _sl(rd, s, e), cfg)
        bec = None if be is None else be[:, :, s:e]
        if cfg.chunk_maps:
            R0 = R if s == 0 else _phis(X, cfg)            # the map, once per chunk
            o, X, P, R = _paper_chunk(Q[:, :, s:e], sig, X, P, R0, al[:, :, s:e], bec, _sl(gm, s, e), cfg)
        elif cfg.retention == "l2":
            o, X, P = _dual_chunk(Q[:, :, s:e], sig, X, P, al[:, :, s:e], bec, cfg)
        else:
            o, X, P = _scan_chunk(Q[:, :, s:e], sig, X, P, al[:, :, s:e], bec,
                                  _sl(gm, s, e), cfg)
        outs.append(o)
        A = X if e - s == C else A0
    if R is not None and T > 0 and T % C == 0:
        R = _phis(X, cfg)                                  # at a boundary R is φ(X)
    if outs:
        O = torch.cat(outs, dim=2)
    else:
        O = Q.new_zeros(Q.shape[0], Q.shape[1], 0, V.shape[-1])
    off = torch.full_like(off, T % C) if T > 0 else off
    return O, X, P, A, R, off


def memory_update_chunked(q, k, v, lr, alpha, momentum=None, *, memory="linear", bias="l2",
                          retention="l2", p=3.0, eps=1e-6, delta=1.0, huber_mode="yaad",
                          robust_delta=0.0, gamma=0.0, kl_scale=1.0, q_norm=4.0, eps_q=1e-6,
                          chunk_size=64, scale=None, initial_state=None,
                          output_final_state=False, cu_seqlens=None, ln_weight=None,
                          ln_bias=None, expansion=4, map_schedule="token", lq_map="eq24"):
    """The op in chunked form (same results as :func:`memory_update_loop`): dual form for
    retention ``l2`` (linear: KERNELS.md §1, MLP: §5), anchor GEMM + in-chunk scan for kl /
    elastic_net / lq. Vectorised over batch and heads; a Python loop over chunks (and over
    segments with ``cu_seqlens``). Requires ``initial_state.offset == 0``.
    ``map_schedule="chunk"`` (SPEC §5b, KERNELS.md §6): per chunk the l2 dual form from R0 = φ(X0),
    the raw state by the same updates (closed form for kl / lq, the thresholded scan for elastic_net)."""
    return _run(_chunked_seq, q, k, v, lr, alpha, momentum, memory=memory, bias=bias,
                retention=retention, p=p, eps=eps, delta=delta, huber_mode=huber_mode,
                robust_delta=robust_delta, gamma=gamma, kl_scale=kl_scale, q_norm=q_norm,
                eps_q=eps_q, chunk_size=chunk_size, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                ln_weight=ln_weight, ln_bias=ln_bias, expansion=expansion,
                require_zero_offset=True, map_schedule=map_schedule, lq_map=lq_map)


# =============================================================================================
# The single-token step (SPEC §7)
# =============================================================================================
def _step_param(x, cdt, name, B, H):
    if isinstance(x, Tensor):
        if x.dim() == 0:
            return x.to(cdt)
        if tuple(x.shape) != (B, H):
            raise ValueError(f"{name} must be a float or a [B, H] tensor, got {tuple(x.shape)}")
        return x.to(cdt)
    return float(x)


def memory_step(q, k, v, lr, alpha, momentum=None, *, state, chunk_size=64, exact=False,
                memory="linear", bias="l2", retention="l2", p=3.0, eps=1e-6, delta=1.0,
                huber_mode="yaad", robust_delta=0.0, gamma=0.0, kl_scale=1.0, q_norm=4.0,
                eps_q=1e-6, scale=None, ln_weight=None, ln_bias=None, expansion=None,
                map_schedule="token", lq_map="eq24"):
    """One token: q, k [B, H, Dk], v [B, H, Dv]; gates and tensor parameters [B, H].

    Gradient at ``state.anchor``, update X (and P), read after write, ``offset += 1``; where
    the offset reaches C (C = 1 with ``exact=True``) the anchor becomes the new X and the
    offset 0. ``map_schedule="chunk"`` (SPEC §5b): the token reads ``state.R`` moved by the l2
    recurrence (R restarts at φ(X) at the boundary). Returns ``(o [B, H, Dv] in q's dtype, new MemoryState)``."""
    C = 1 if exact else int(chunk_size)
    _check(memory, bias, retention, huber_mode, C, map_schedule, lq_map)
    if state is None:
        raise ValueError("memory_step needs a state (MemoryState)")
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"expected q, k [B, H, Dk] and v [B, H, Dv]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Dk = q.shape
    Dv = v.shape[-1]
    if memory == "mlp" and Dv != Dk:
        raise ValueError(f"mlp memory needs Dv == Dk, got Dk={Dk}, Dv={Dv}")
    for name, g in (("lr", lr), ("alpha", alpha), ("momentum", momentum)):
        if g is not None and tuple(g.shape) != (B, H):
            raise ValueError(f"{name} must be [B, H] = {(B, H)}, got {tuple(g.shape)}")
    cdt = _compute_dtype(q.dtype)
    if scale is None:
        scale = Dk ** -0.5 if memory == "linear" else 1.0
    cfg = _Cfg(memory, bias, retention, float(p), float(eps), huber_mode, float(kl_scale),
               float(q_norm), float(eps_q),
               None if ln_weight is None else ln_weight.to(cdt),
               None if ln_bias is None else ln_bias.to(cdt), map_schedule, lq_map)
    X, P, A, R, off = _prepare_state(state, B, H, Dk, Dv, memory, momentum is not None, expansion,
                                     cdt, q.device, cfg)
    row = lambda x: None if x is None else x[..., None]  # noqa: E731  [B,H] → [B,H,1]
    dl = _step_param(delta, cdt, "delta", B, H)
    rd = _step_param(robust_delta, cdt, "robust_delta", B, H)
    gm = _step_param(gamma, cdt, "gamma", B, H)
    per_tok = lambda x: x[..., None] if isinstance(x, Tensor) and x.dim() == 2 else x  # noqa
    o, X, P, A, R, off = _step_core(
        X, P, A, R, off, (q.to(cdt) * scale)[:, :, None], k.to(cdt)[:, :, None],
        v.to(cdt)[:, :, None], row(lr.to(cdt)), alpha.to(cdt),
        None if momentum is None else momentum.to(cdt), per_tok(dl), per_tok(rd), gm, C, cfg)
    return o[:, :, 0].to(q.dtype), MemoryState(X=_pack(X, memory), P=_pack(P, memory),
                                                anchor=_pack(A, memory), offset=off, R=_pack(R, memory))
