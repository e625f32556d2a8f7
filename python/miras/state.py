"""The memory's state between calls (SPEC.md §7)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

StateTensor = Union[Tensor, Tuple[Tensor, Tensor]]


@dataclass
class MemoryState:
    """Per sequence and head: the raw state(s), momentum, anchor and offset.

    - ``X``: the raw state. Linear memory: ``[N, H, Dk, Dv]`` (the weights for retention l2 and
      elastic_net, the logits for kl, the accumulator for lq). MLP memory: ``(W1, W2)``.
    - ``P``: the momentum state(s), same shapes, or ``None`` (no momentum).
    - ``anchor``: the raw state at the last chunk boundary, where the next token's gradient is
      taken. Defaults to ``X``.
    - ``offset``: ``[N]`` int64, tokens since that boundary. Defaults to zeros. The chunked op
      (``memory_update``) accepts only ``offset == 0``; ``memory_step`` moves it.
    - ``R``: the read memory of ``map_schedule="chunk"`` (SPEC §5b), same shapes as ``X``: what
      tokens read, started at φ(X) at each chunk boundary and moved linearly inside the chunk.
      Present only in states of that schedule with retention kl, lq or elastic_net (for l2 it is X);
      where ``offset == 0`` it equals φ(X), and ``None`` there means φ(X).
    """

    X: StateTensor
    P: Optional[StateTensor] = None
    anchor: Optional[StateTensor] = None
    offset: Optional[Tensor] = None
    R: Optional[StateTensor] = None

    def __post_init__(self):
        if self.anchor is None:
            self.anchor = self.X
        if self.offset is None:
            first = self.X[0] if isinstance(self.X, (tuple, list)) else self.X
            if not isinstance(first, Tensor):
                raise TypeError(f"MemoryState.X must be a tensor (or a (W1, W2) pair), got {type(first).__name__}")
            self.offset = torch.zeros(first.shape[0], dtype=torch.int64, device=first.device)

    @property
    def num_sequences(self) -> int:
        first = self.X[0] if isinstance(self.X, (tuple, list)) else self.X
        return first.shape[0]

    def detach(self) -> "MemoryState":
        """A copy cut from the autograd graph (truncated backpropagation through time)."""

        def d(x):
            if x is None:
                return None
            if isinstance(x, (tuple, list)):
                return tuple(t.detach() for t in x)
            return x.detach()

        return MemoryState(d(self.X), d(self.P), d(self.anchor), self.offset.clone(), d(self.R))
