"""Miras token mixers (paper §5.3–5.4): one layer, the paper's models as presets.

:class:`MirasLayer` turns hidden states ``x [B, T, D]`` into ``y [B, T, D]``:

1. ``q, k, v`` linear projections (fan-in initialisation ``std = D^-1/2``: the MLP memory's inner
   loss is not scale-free, so its values must start near the scale of its read-out), each followed
   by a causal depthwise convolution (kernel ``conv_size``, default 4) and SiLU; ``q`` and ``k`` are
   ℓ2-normalised per head.
2. Per-token, per-head gates from one low-rank projection of ``x`` (``D → gate_rank → n·H``):
   ``lr = lr_max · sigmoid(·)`` (the inner step size η_t), ``alpha = sigmoid(·)`` (retention,
   initialised near ``alpha_init`` ≈ 1), ``momentum = momentum_max · sigmoid(·)`` when
   ``momentum=True``, and for ``bias="huber"`` a positive Huber threshold
   ``delta = softplus(·) + 1e-4``. Gates are computed in float32 (float64 for float64 inputs):
   the op converts them itself, and this keeps ``momentum < 1`` and ``alpha > 0`` exact.
3. The memory: :func:`miras.memory_update` (chunked; training and prefill) or
   :func:`miras.memory_step` (one token; decoding) with the layer's bias / retention / memory.
4. An RMSNorm per head (one weight ``[Dv]`` shared by the heads), a SiLU output gate (a linear
   projection of ``x``), and the output projection.

Memory state at the start of every sequence:

- ``memory="mlp"``: learnable per-head initial weights ``W1 [H, Dk, Dh]``, ``W2 [H, Dh, Dv]``
  (``Dh = expansion · Dk``), broadcast over the batch into a :class:`miras.MemoryState` (SPEC §7:
  an MLP memory has no useful zero state). They are stored as *raw* states of the chosen
  retention (weights for ``l2``/``elastic_net``, logits for ``kl``, the accumulator for ``lq``)
  and initialised so that the read weights ``φ(X)`` have a fan-in scale (``W1`` entries ~ 1, as
  the keys are unit vectors; ``W2`` ~ ``Dh^-1/2``) where the map allows it: exactly for ``l2``,
  ``elastic_net`` and ``lq`` (for ``q = 4`` the accumulator is then small, ``A = W/‖W‖_q²``, and
  ``φ`` amplifies steps on ``W1``'s accumulator ~``‖W1‖_q²``-fold); for ``kl`` the read weights are
  ``c·softmax`` columns (entries ~ ``c/Dk`` and ``c/Dh``, all positive) from unit-spread logits. Not
  "tiny" for ``l2``: the memory's LayerNorm divides
  its inner gradient by the spread of ``u = GELU(k W1) W2``, so near-zero weights would make the
  first inner steps explode. The LayerNorm affine ``ln_weight, ln_bias [H, Dv]`` is learnable.
- ``memory="linear"``: zeros (for ``kl`` retention: a uniform memory), i.e. ``initial_state=None``,
  like linear attention / DeltaNet. A learnable linear init would only add a constant
  ``q·S0`` read that the output projection can already learn.

Incremental decoding. ``layer(x, cache=None, use_cache=True)`` returns ``(y, cache)`` with a
:class:`MirasCache` (the last ``conv_size − 1`` projected inputs of the convolution and the
:class:`miras.MemoryState`). Feeding the continuation with that cache — one token at a time or
several — gives the same outputs as one forward over the whole sequence: tokens are stepped with
``memory_step`` (same ``chunk_size``) until the state is back at a chunk boundary, and the rest
goes through the chunked op, whose chunks are then aligned with the full forward's (SPEC §7).

Varlen: ``cu_seqlens`` (``[N+1]``, with ``B = 1``) packs ``N`` independent sequences; the
convolution restarts at each segment's first token, the memory starts each segment from the
initial state, and ``use_cache=True`` returns ``N`` per-sequence states (which can then be decoded
as a batch of ``N``). Continuing *from* a cache with ``cu_seqlens`` is not supported.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from ..ops import memory_step, memory_update
from ..state import MemoryState

# Whether the functional op takes the MLP memory's expansion (SPEC §6 default 4) as an argument.
_OP_TAKES_EXPANSION = all("expansion" in inspect.signature(f).parameters for f in (memory_update, memory_step))

__all__ = ["MirasLayer", "MirasCache", "ShortConvolution", "RMSNorm", "Moneta", "Yaad", "Memora", "TitansLinear",
           "LinearAttention", "MIXERS", "make_mixer"]


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm over the last axis, computed in float32 (or float64), cast back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)


def _segment_positions(cu: Tensor, T: int) -> Tuple[Tensor, Tensor]:
    """For packed sequences: (segment index [T], position inside the segment [T])."""
    idx = torch.arange(T, device=cu.device)
    seg = torch.searchsorted(cu[1:].contiguous(), idx, right=True)
    pos = idx - cu[seg]
    return seg, pos


class ShortConvolution(nn.Module):
    """Causal depthwise 1-D convolution over time (no bias), ``x [B, T, C] → [B, T, C]``.

    ``state [N, K−1, C]`` holds the previous ``K − 1`` inputs (zeros at a sequence start). With
    ``cu_seqlens`` (``B = 1``) each segment starts from zeros: nothing leaks across segments.
    Returns ``(y, new_state)``; ``new_state`` is ``None`` unless ``output_state``.
    """

    def __init__(self, channels: int, kernel_size: int = 4):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"conv kernel_size must be >= 1, got {kernel_size}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        nn.init.uniform_(self.weight, -1.0 / math.sqrt(kernel_size), 1.0 / math.sqrt(kernel_size))
        with torch.no_grad():  # start close to the identity (current token), like a residual path
            self.weight[:, -1] += 1.0

    def forward(self, x: Tensor, state: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                output_state: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        B, T, C = x.shape
        K = self.kernel_size
        w = self.weight.to(x.dtype)
        if cu_seqlens is None:
            if state is None:
                state = x.new_zeros(B, K - 1, C)
            xp = torch.cat([state.to(x.dtype), x], dim=1)               # [B, T+K-1, C]
            y = F.conv1d(xp.transpose(1, 2), w[:, None, :], groups=C).transpose(1, 2)
            new = xp[:, xp.shape[1] - (K - 1):] if output_state else None
            return y, new
        if state is not None:
            raise NotImplementedError("ShortConvolution: a conv state with cu_seqlens is not supported")
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1, got {B}")
        cu = cu_seqlens.to(device=x.device, dtype=torch.int64)
        seg, pos = _segment_positions(cu, T)
        xp = F.pad(x, (0, 0, K - 1, 0))                                  # [1, T+K-1, C]
        y = torch.zeros_like(x)
        for j in range(K):                                               # lag j: x[t-j] if inside the segment
            shifted = xp[:, K - 1 - j:K - 1 - j + T]
            keep = (pos >= j).to(x.dtype)[None, :, None]
            y = y + shifted * keep * w[:, K - 1 - j]
        new = None
        if output_state:
            N = cu.numel() - 1
            # last K-1 inputs of each segment; positions before the segment's start are zeros
            ends = cu[1:]
            starts = cu[:-1]
            lag = torch.arange(K - 1, 0, -1, device=x.device)            # K-1 .. 1
            src = ends[:, None] - lag[None, :]                            # [N, K-1]
            valid = src >= starts[:, None]
            gathered = x[0][src.clamp(min=0, max=max(T - 1, 0))] if T > 0 else x.new_zeros(N, K - 1, C)
            new = gathered * valid[..., None].to(x.dtype)
        return y, new


@dataclass
class MirasCache:
    """Per-layer decoding cache: the convolution inputs (``conv [N, K−1, C]``) and the memory."""

    conv: Optional[Tensor]
    memory: MemoryState

    @property
    def offset(self) -> Tensor:
        return self.memory.offset

    def detach(self) -> "MirasCache":
        return MirasCache(None if self.conv is None else self.conv.detach(), self.memory.detach())


def _inv_sigmoid(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y)) if y < 20 else y


# ---------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------
class MirasLayer(nn.Module):
    """A Miras memory layer (paper §5.3): projections, short convs, gates, memory, gated output.

    Args:
        hidden_size: model width ``D``.
        num_heads: memory heads ``H``.
        head_dim: ``Dk = Dv`` per head (default ``D // H``).
        memory: ``"mlp"`` (paper §5.3, ``x + LN(GELU(x W1) W2)``) or ``"linear"``.
        bias: attentional bias (``"dot"``, ``"l2"``, ``"lp"``, ``"huber"``, ``"robust"``).
        retention: ``"l2"``, ``"kl"``, ``"elastic_net"``, ``"lq"``.
        momentum: learn a momentum gate (Titans-style) instead of plain gradient descent.
        chunk_size: chunk length of the parallel form (also used by decoding, so that both agree).
        expansion: MLP memory hidden width ``Dh = expansion · Dk``.
        conv_size: kernel of the causal depthwise convolutions (``1`` = none in effect).
        gate_rank: rank of the gate projection.
        lr_max, lr_init: ``lr = lr_max · sigmoid(·)``; the gate bias starts at ``lr_init``.
        alpha_init: initial retention gate (``alpha`` = fraction of the memory kept per token).
        momentum_max, momentum_init: ``momentum = momentum_max · sigmoid(·) < 1``.
        delta_init: initial Huber threshold (``bias="huber"``); default ``2·sqrt(Dv)``, above the
            typical initial residual norm, so Yaad starts in its ℓ2 branch and learns where to clip (a δ below
            it puts every token in the ℓ1 branch, whose ψ = δ·sign(e) hides the value in the residual).
        norm_v: RMS-normalise the values per head (off by default; an option for MLP memories, whose
            read-out has the LayerNorm's unit scale).
        **op_kwargs: passed to :func:`miras.memory_update` / :func:`miras.memory_step`
            (``p``, ``eps``, ``huber_mode``, ``robust_delta``, ``gamma``, ``kl_scale``, ``q_norm``,
            ``eps_q``, ``scale``, ``check_inputs``).

    ``forward(x, cache=None, use_cache=False, cu_seqlens=None)`` returns ``(y, cache_or_None)``.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: Optional[int] = None, memory: str = "mlp",
                 bias: str = "l2", retention: str = "l2", momentum: bool = False, chunk_size: int = 64,
                 expansion: int = 4, conv_size: int = 4, gate_rank: int = 16, lr_max: float = 1.0,
                 lr_init: float = 0.1, alpha_init: float = 0.99, momentum_max: float = 0.99,
                 momentum_init: float = 0.5, delta_init: Optional[float] = None, norm_v: bool = False,
                 layer_idx: Optional[int] = None, **op_kwargs):
        super().__init__()
        if memory not in ("mlp", "linear"):
            raise ValueError(f"memory must be 'mlp' or 'linear', got {memory!r}")
        if memory == "mlp" and int(expansion) != 4 and not _OP_TAKES_EXPANSION:
            raise ValueError(f"expansion={expansion}: this build's memory_update supports only the SPEC default "
                             "expansion=4 for MLP memory")
        if "delta" in op_kwargs:
            raise ValueError("MirasLayer learns the Huber threshold per token; set delta_init instead of delta")
        head_dim = head_dim or hidden_size // num_heads
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim}")
        if not 0 < lr_init < lr_max:
            raise ValueError(f"need 0 < lr_init < lr_max, got lr_init={lr_init}, lr_max={lr_max}")
        if not 0 <= momentum_max < 1:
            raise ValueError(f"momentum_max must lie in [0, 1), got {momentum_max}")
        self.hidden_size = hidden_size
        self.num_heads = H = num_heads
        self.head_dim = Dk = head_dim
        self.memory = memory
        self.bias = bias
        self.retention = retention
        self.use_momentum = bool(momentum)
        self.chunk_size = int(chunk_size)
        self.expansion = int(expansion)
        self.conv_size = int(conv_size)
        self.lr_max = float(lr_max)
        self.momentum_max = float(momentum_max)
        self.layer_idx = layer_idx
        self.norm_v = bool(norm_v)
        self.op_kwargs = dict(op_kwargs)
        # the op's options, checked now (names and ranges; messages name the argument), not at the first forward
        Config.split(memory=memory, bias=bias, retention=retention, chunk_size=self.chunk_size,
                     **{n: v for n, v in op_kwargs.items() if n not in ("check_inputs", "delta")})
        Dv = Dk
        self.key_dim, self.value_dim = H * Dk, H * Dv

        self.q_proj = nn.Linear(hidden_size, H * Dk, bias=False)
        self.k_proj = nn.Linear(hidden_size, H * Dk, bias=False)
        self.v_proj = nn.Linear(hidden_size, H * Dv, bias=False)
        # one depthwise conv over [q | k | v] channels: the same as three, one call
        self.conv = ShortConvolution(2 * H * Dk + H * Dv, conv_size)
        for lin in (self.q_proj, self.k_proj, self.v_proj):      # fan-in scale: features of O(1)
            nn.init.normal_(lin.weight, std=hidden_size ** -0.5)

        # gates: lr, alpha, [momentum], [delta] — each [B, T, H]
        self.gate_names = ["lr", "alpha"] + (["momentum"] if self.use_momentum else []) + (
            ["delta"] if bias == "huber" else [])
        n = len(self.gate_names)
        self.gate_down = nn.Linear(hidden_size, gate_rank, bias=False)
        self.gate_up = nn.Linear(gate_rank, n * H, bias=True)
        if delta_init is None:
            delta_init = 2.0 * math.sqrt(Dv)
        init = {"lr": _inv_sigmoid(lr_init / lr_max), "alpha": _inv_sigmoid(alpha_init),
                "momentum": _inv_sigmoid(momentum_init / momentum_max) if momentum_max > 0 else 0.0,
                "delta": _inv_softplus(delta_init)}
        with torch.no_grad():
            nn.init.normal_(self.gate_up.weight, std=0.02)
            b = torch.tensor([init[g] for g in self.gate_names]).repeat_interleave(H)
            self.gate_up.bias.copy_(b)

        if memory == "mlp":
            Dh = self.expansion * Dk
            W1 = torch.randn(H, Dk, Dh)                      # unit keys → z = k W1 ~ N(0, 1)
            W2 = torch.randn(H, Dh, Dv) / math.sqrt(Dh)
            self.mem_W1 = nn.Parameter(self._raw_from_weights(W1))
            self.mem_W2 = nn.Parameter(self._raw_from_weights(W2))
            self.ln_weight = nn.Parameter(torch.ones(H, Dv))
            self.ln_bias = nn.Parameter(torch.zeros(H, Dv))
        else:
            self.register_parameter("mem_W1", None)
            self.register_parameter("mem_W2", None)
            self.register_parameter("ln_weight", None)
            self.register_parameter("ln_bias", None)

        self.o_norm = RMSNorm(Dv)
        self.g_proj = nn.Linear(hidden_size, H * Dv, bias=False)
        self.o_proj = nn.Linear(H * Dv, hidden_size, bias=False)

    # ---- initial memory ----------------------------------------------------------------------
    def _raw_from_weights(self, W: Tensor) -> Tensor:
        """Raw state X with φ(X) ≈ W per head for this layer's retention (SPEC §4)."""
        r = self.retention
        if r == "kl":
            # W = c·softmax(Z) over the key axis cannot be an arbitrary matrix; take logits with
            # the spread of W's entries, which gives diverse, non-uniform columns.
            return W / W.std()
        if r == "lq":
            q = float(self.op_kwargs.get("q_norm", 4.0))
            if self.op_kwargs.get("lq_map", "eq24") == "mirror" and q != 2.0:
                # φ(A) = sign(A)|A|^{q−1} / ‖A‖_q^{q−2} has degree 1: A0 = sign(W)|W|^{1/(q−1)} gives
                # φ(A0) = W / ‖A0‖_q^{q−2}, so A = ‖A0‖_q^{q−2} A0 gives φ(A) = W
                A0 = torch.sign(W) * W.abs().pow(1.0 / (q - 1.0))
                return A0 * A0.abs().pow(q).sum((-2, -1), keepdim=True).pow((q - 2.0) / q)
            if q == 2.0 or q == 3.0:      # φ(cW) = W for q = 2; for q = 3 φ is scale-free
                return W.clone()
            # φ(cA) = c^{3−q} φ(A) and φ(W) = W / ‖W‖_q^{q−2}: choose c with φ(cW) = W per head
            nq = W.abs().pow(q).sum((-2, -1), keepdim=True).pow(1.0 / q)
            return W * nq.pow((q - 2.0) / (3.0 - q))
        return W.clone()

    def initial_state(self, batch_size: int, dtype: torch.dtype = torch.float32,
                      device=None) -> MemoryState:
        """The memory at a sequence start for ``batch_size`` sequences (linear: zeros)."""
        H, Dk = self.num_heads, self.head_dim
        sdt = torch.float64 if dtype == torch.float64 else torch.float32
        if device is None:
            device = self.q_proj.weight.device
        if self.memory == "mlp":
            X = (self.mem_W1.to(sdt)[None].expand(batch_size, -1, -1, -1),
                 self.mem_W2.to(sdt)[None].expand(batch_size, -1, -1, -1))
            P = tuple(torch.zeros_like(x) for x in X) if self.use_momentum else None
        else:
            X = torch.zeros(batch_size, H, Dk, Dk, dtype=sdt, device=device)
            P = torch.zeros_like(X) if self.use_momentum else None
        return MemoryState(X=X, P=P)

    # ---- pieces of the forward ---------------------------------------------------------------
    def _gates(self, x: Tensor):
        B, T, _ = x.shape
        H = self.num_heads
        gdt = torch.promote_types(x.dtype, torch.float32)
        raw = self.gate_up(self.gate_down(x)).to(gdt).view(B, T, len(self.gate_names), H)
        out = {}
        for i, name in enumerate(self.gate_names):
            g = raw[:, :, i]
            if name == "lr":
                out[name] = self.lr_max * torch.sigmoid(g)
            elif name == "alpha":
                out[name] = torch.sigmoid(g).clamp(min=1e-4)
            elif name == "momentum":
                out[name] = self.momentum_max * torch.sigmoid(g)
            else:
                out[name] = F.softplus(g) + 1e-4
        return out

    def _op_kw(self):
        kw = dict(memory=self.memory, bias=self.bias, retention=self.retention, ln_weight=self.ln_weight,
                  ln_bias=self.ln_bias)
        if self.memory == "mlp" and _OP_TAKES_EXPANSION:
            kw["expansion"] = self.expansion
        kw.update(self.op_kwargs)
        return kw

    def _step_tokens(self, q, k, v, gates, mem: MemoryState, kw) -> Tuple[Tensor, MemoryState]:
        """Token-by-token memory_step over q/k/v [B, L, H, D] from ``mem``."""
        outs = []
        for t in range(q.shape[1]):
            g = {n: x[:, t] for n, x in gates.items()}
            extra = {"delta": g["delta"]} if "delta" in g else {}
            o, mem = memory_step(q[:, t], k[:, t], v[:, t], g["lr"], g["alpha"], g.get("momentum"), state=mem,
                                 chunk_size=self.chunk_size, **extra, **kw)
            outs.append(o)
        return torch.stack(outs, dim=1), mem

    def _memory(self, q, k, v, gates, cache_mem: Optional[MemoryState], use_cache: bool, cu_seqlens):
        B, T = q.shape[:2]
        kw = self._op_kw()
        N = cu_seqlens.numel() - 1 if cu_seqlens is not None else B

        def chunked(q, k, v, gates, state, out_state):
            extra = {"delta": gates["delta"]} if "delta" in gates else {}
            return memory_update(q, k, v, gates["lr"], gates["alpha"], gates.get("momentum"),
                                 chunk_size=self.chunk_size, initial_state=state, output_final_state=out_state,
                                 cu_seqlens=cu_seqlens, **extra, **kw)

        if cache_mem is None:
            # MLP memory: the learnable initial weights; linear memory: zeros (the op's default)
            state = self.initial_state(N, q.dtype, q.device) if self.memory == "mlp" else None
            if T == 0:
                if state is None and use_cache:
                    state = self.initial_state(N, q.dtype, q.device)
                return q.new_zeros(B, 0, self.num_heads, self.head_dim), state
            return chunked(q, k, v, gates, state, use_cache)

        if cu_seqlens is not None:
            raise NotImplementedError("MirasLayer: continuing from a cache with cu_seqlens is not supported; "
                                      "decode the packed sequences as a batch")
        mem = cache_mem
        off = mem.offset
        C = self.chunk_size
        uniform = bool((off == off[0]).all())
        n_step = T if not uniform else min(T, (C - int(off[0])) % C)
        if T - n_step < 2:  # a lone trailing token is as cheap stepped
            n_step = T
        outs = []
        if n_step > 0:
            o, mem = self._step_tokens(q[:, :n_step], k[:, :n_step], v[:, :n_step],
                                       {n: x[:, :n_step] for n, x in gates.items()}, mem, kw)
            outs.append(o)
        if n_step < T:  # the state is at a chunk boundary: the rest is chunk-aligned with a full forward
            mem = MemoryState(X=mem.X, P=mem.P if self.use_momentum else None)
            o, mem = chunked(q[:, n_step:], k[:, n_step:], v[:, n_step:],
                             {n: x[:, n_step:] for n, x in gates.items()}, mem, True)
            outs.append(o)
        return torch.cat(outs, dim=1), mem

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: Tensor, cache: Optional[MirasCache] = None, use_cache: bool = False,
                cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Optional[MirasCache]]:
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [B, T, {self.hidden_size}], got {list(x.shape)}")
        if cache is not None and cu_seqlens is not None:
            raise NotImplementedError("MirasLayer: continuing from a cache with cu_seqlens is not supported")
        B, T, _ = x.shape
        H, Dk = self.num_heads, self.head_dim
        use_cache = use_cache or cache is not None
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        qkv, conv_state = self.conv(qkv, None if cache is None else cache.conv, cu_seqlens=cu_seqlens,
                                    output_state=use_cache)
        qkv = F.silu(qkv)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = F.normalize(q.view(B, T, H, Dk), dim=-1, eps=1e-6)
        k = F.normalize(k.view(B, T, H, Dk), dim=-1, eps=1e-6)
        v = v.reshape(B, T, H, Dk)
        if self.norm_v:  # values at the scale of the MLP memory's LayerNorm output (RMS 1 per head)
            v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
        gates = self._gates(x)
        o, mem = self._memory(q, k, v, gates, None if cache is None else cache.memory, use_cache, cu_seqlens)
        o = self.o_norm(o.to(x.dtype))
        o = o * F.silu(self.g_proj(x)).view(B, T, H, Dk)
        y = self.o_proj(o.reshape(B, T, H * Dk))
        new_cache = MirasCache(conv_state, mem) if use_cache else None
        return y, new_cache

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"memory={self.memory!r}, bias={self.bias!r}, retention={self.retention!r}, "
                f"momentum={self.use_momentum}, chunk_size={self.chunk_size}"
                + (f", expansion={self.expansion}" if self.memory == "mlp" else "")
                + (f", {self.op_kwargs}" if self.op_kwargs else ""))


# ---------------------------------------------------------------------------------------------
# presets: the paper's models as points of the design space
# ---------------------------------------------------------------------------------------------
class Moneta(MirasLayer):
    """Moneta (paper §5.1): ℓp attentional bias (p = 3), ℓq retention (q = 4), MLP memory.

    Defaults follow the paper's printed equations (Eq. 24's map, ``map_schedule="token"``). Options
    measured in ``bench/RESULTS.md`` §3: ``lq_map="mirror"`` (the degree-1 mirror map; much better
    recall at L=32/64 on the demo's mqar; runs through the PyTorch reference for now) and
    ``map_schedule="chunk"`` (the paper's parallel form; no better there)."""

    def __init__(self, hidden_size, num_heads, head_dim=None, *, p: float = 3.0, q_norm: float = 4.0, **kw):
        kw.setdefault("memory", "mlp")
        super().__init__(hidden_size, num_heads, head_dim, bias="lp", retention="lq", p=p, q_norm=q_norm, **kw)


class Yaad(MirasLayer):
    """Yaad (paper §5.1): Huber attentional bias (Eq. 16, learned per-token δ), ℓ2 retention, MLP memory."""

    def __init__(self, hidden_size, num_heads, head_dim=None, *, huber_mode: str = "yaad", **kw):
        kw.setdefault("memory", "mlp")
        super().__init__(hidden_size, num_heads, head_dim, bias="huber", retention="l2", huber_mode=huber_mode,
                         **kw)


class Memora(MirasLayer):
    """Memora (paper §5.1): ℓ2 attentional bias, KL (softmax) retention, MLP memory."""

    def __init__(self, hidden_size, num_heads, head_dim=None, *, kl_scale: float = 1.0, **kw):
        kw.setdefault("memory", "mlp")
        super().__init__(hidden_size, num_heads, head_dim, bias="l2", retention="kl", kl_scale=kl_scale, **kw)


class TitansLinear(MirasLayer):
    """Titans-style linear memory: ℓ2 bias (delta rule), ℓ2 retention (α = 1 − forget), momentum."""

    def __init__(self, hidden_size, num_heads, head_dim=None, **kw):
        kw.setdefault("memory", "linear")
        kw.setdefault("momentum", True)
        super().__init__(hidden_size, num_heads, head_dim, bias="l2", retention="l2", **kw)


class LinearAttention(MirasLayer):
    """Baseline: (gated) linear attention = dot-product (Hebbian) bias, ℓ2 retention, linear memory."""

    def __init__(self, hidden_size, num_heads, head_dim=None, **kw):
        kw.setdefault("memory", "linear")
        super().__init__(hidden_size, num_heads, head_dim, bias="dot", retention="l2", **kw)


MIXERS = {
    "moneta": Moneta,
    "yaad": Yaad,
    "memora": Memora,
    "titans": TitansLinear,
    "linear_attention": LinearAttention,
    "miras": MirasLayer,
}


def make_mixer(name: str, hidden_size: int, num_heads: int, head_dim: Optional[int] = None, **kw) -> MirasLayer:
    """A token mixer by name: ``moneta``, ``yaad``, ``memora``, ``titans``, ``linear_attention`` or ``miras``
    (the generic layer: pass ``memory``, ``bias``, ``retention``, ``momentum`` yourself)."""
    key = name.lower().replace("-", "_")
    if key not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; choose one of {sorted(MIXERS)}")
    return MIXERS[key](hidden_size, num_heads, head_dim, **kw)
