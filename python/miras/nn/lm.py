"""A small Llama-style language model with a Miras token mixer.

``embedding → [x + mixer(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] × num_layers → RMSNorm → head``.
The head is tied to the embedding by default (``tie_embeddings``). ``generate`` prefills the prompt
with the chunked op and then decodes one token at a time from the cache (``memory_step``), which
reproduces the full forward exactly (see :mod:`miras.nn.layers`).
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import MirasCache, RMSNorm, make_mixer

__all__ = ["SwiGLU", "MirasBlock", "MirasLM"]


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MirasBlock(nn.Module):
    """Pre-norm block: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: Optional[int], mixer: str,
                 intermediate_size: int, norm_eps: float = 1e-6, layer_idx: Optional[int] = None, **mixer_kw):
        super().__init__()
        self.mixer_norm = RMSNorm(hidden_size, norm_eps)
        self.mixer = make_mixer(mixer, hidden_size, num_heads, head_dim, layer_idx=layer_idx, **mixer_kw)
        self.mlp_norm = RMSNorm(hidden_size, norm_eps)
        self.mlp = SwiGLU(hidden_size, intermediate_size)

    def forward(self, x: Tensor, cache: Optional[MirasCache] = None, use_cache: bool = False,
                cu_seqlens: Optional[Tensor] = None):
        h, cache = self.mixer(self.mixer_norm(x), cache=cache, use_cache=use_cache, cu_seqlens=cu_seqlens)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return x, cache


class MirasLM(nn.Module):
    """Causal LM: token embedding, ``num_layers`` pre-RMSNorm blocks (Miras mixer + SwiGLU MLP), final
    norm, output head (tied to the embedding unless ``tie_embeddings=False``).

    Args:
        vocab_size, hidden_size, num_layers, num_heads: sizes.
        head_dim: per-head memory dim (default ``hidden_size // num_heads``).
        mixer: ``"moneta"``, ``"yaad"``, ``"memora"``, ``"titans"``, ``"linear_attention"`` or ``"miras"``.
        intermediate_size: SwiGLU width (default ``≈ 8/3 · hidden_size``, rounded up to a multiple of 8).
        **mixer_kw: passed to the mixer (``chunk_size``, ``expansion``, ``memory``, ``lr_max``, ...).

    ``forward(input_ids, cache=None, use_cache=False, cu_seqlens=None)`` returns the logits
    ``[B, T, V]``, or ``(logits, cache)`` when ``use_cache`` or a cache is given (the cache is a list
    with one :class:`MirasCache` per layer).
    """

    def __init__(self, vocab_size: int, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 2,
                 head_dim: Optional[int] = None, mixer: str = "moneta", intermediate_size: Optional[int] = None,
                 tie_embeddings: bool = True, norm_eps: float = 1e-6, init_std: float = 0.02, **mixer_kw):
        super().__init__()
        if intermediate_size is None:
            intermediate_size = ((8 * hidden_size // 3) + 7) // 8 * 8
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.mixer_name = mixer
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList([
            MirasBlock(hidden_size, num_heads, head_dim, mixer, intermediate_size, norm_eps, layer_idx=i, **mixer_kw)
            for i in range(num_layers)])
        self.norm = RMSNorm(hidden_size, norm_eps)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self._init_weights(init_std, num_layers)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def _init_weights(self, std: float, num_layers: int):
        nn.init.normal_(self.embed.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.layers:
            m = block.mixer
            # q/k/v keep the mixer's own fan-in init (the memory's inner loss sees their scale)
            for lin in (m.g_proj, m.gate_down):
                nn.init.normal_(lin.weight, std=std)
            # residual-branch outputs scaled down with depth (GPT-2 style)
            nn.init.normal_(m.o_proj.weight, std=std / (2 * num_layers) ** 0.5)
            nn.init.normal_(block.mlp.gate_proj.weight, std=std)
            nn.init.normal_(block.mlp.up_proj.weight, std=std)
            nn.init.normal_(block.mlp.down_proj.weight, std=std / (2 * num_layers) ** 0.5)

    def forward(self, input_ids: Tensor, cache: Optional[List[MirasCache]] = None, use_cache: bool = False,
                cu_seqlens: Optional[Tensor] = None) -> Union[Tensor, tuple]:
        x = self.embed(input_ids)
        want_cache = use_cache or cache is not None
        new_cache = []
        for i, block in enumerate(self.layers):
            x, c = block(x, cache=None if cache is None else cache[i], use_cache=want_cache, cu_seqlens=cu_seqlens)
            new_cache.append(c)
        logits = self.lm_head(self.norm(x))
        return (logits, new_cache) if want_cache else logits

    def loss(self, input_ids: Tensor, labels: Optional[Tensor] = None, ignore_index: int = -100) -> Tensor:
        """Next-token cross entropy. ``labels`` (default: ``input_ids``) are aligned with the inputs and
        shifted here; positions labelled ``ignore_index`` do not count."""
        logits = self(input_ids)
        labels = input_ids if labels is None else labels
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                               ignore_index=ignore_index)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Continue ``input_ids [B, T]`` by ``max_new_tokens`` tokens; ``temperature=0`` is greedy.

        The prompt is prefilled in one chunked forward, then every new token is one cached step.
        Returns ``[B, T + max_new_tokens]``.
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        out = input_ids
        if max_new_tokens <= 0:
            return out
        logits, cache = self(input_ids, use_cache=True)
        for i in range(max_new_tokens):
            last = logits[:, -1].float()
            if temperature <= 0:
                nxt = last.argmax(-1, keepdim=True)
            else:
                last = last / temperature
                if top_k is not None:
                    kth = torch.topk(last, min(top_k, last.shape[-1])).values[:, -1:]
                    last = last.masked_fill(last < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(last, -1), 1, generator=generator)
            out = torch.cat([out, nxt], dim=1)
            if i + 1 < max_new_tokens:
                logits, cache = self(nxt, cache=cache)
        return out
