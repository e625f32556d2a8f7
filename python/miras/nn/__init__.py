"""``miras.nn``: Miras memory layers (paper §5.3–5.4) and a small language model.

- :class:`MirasLayer` — the generic token mixer (memory / bias / retention / momentum axes).
- Presets: :class:`Moneta`, :class:`Yaad`, :class:`Memora`, :class:`TitansLinear` and the
  :class:`LinearAttention` baseline (``bias="dot"``); :func:`make_mixer` picks one by name.
- :class:`MirasLM` — a Llama-style LM with a Miras token mixer and cached generation.
"""
from .layers import (MIXERS, LinearAttention, Memora, MirasCache, MirasLayer, Moneta, RMSNorm, ShortConvolution,
                     TitansLinear, Yaad, make_mixer)
from .lm import MirasBlock, MirasLM, SwiGLU

__all__ = ["MirasLayer", "MirasCache", "Moneta", "Yaad", "Memora", "TitansLinear", "LinearAttention", "MIXERS",
           "make_mixer", "RMSNorm", "ShortConvolution", "MirasLM", "MirasBlock", "SwiGLU"]
