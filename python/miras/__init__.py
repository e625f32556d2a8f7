"""miras — fused kernels for the Miras family of sequence layers (Moneta, Yaad, Memora, Titans).

Functional ops (SPEC.md): :func:`memory_update` (chunked, training and prefill),
:func:`memory_step` (one token, decoding), presets :func:`moneta`, :func:`yaad`, :func:`memora`,
:func:`titans`; the state type :class:`MemoryState`; the float64-capable PyTorch reference in
:mod:`miras.reference`; the same ops on NumPy/CuPy/JAX arrays (DLPack) in :mod:`miras.interop`.
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C
from ._info import check_sources as _check_sources

_check_sources(_C)  # a stale extension (built from other sources) refuses to load
from . import interop  # noqa: F401  (miras.interop: the op on NumPy/CuPy/JAX arrays via DLPack)
from .config import Config
from .ops import BIASES, RETENTIONS, memora, memory_step, memory_update, moneta, titans, yaad
from .state import MemoryState

__version__ = "0.1.0"


def has_cuda_kernels() -> bool:
    """True when this build contains the CUDA kernels (a GPU is still needed to run them)."""
    return bool(_C.has_cuda())


__all__ = ["memory_update", "memory_step", "moneta", "yaad", "memora", "titans", "Config", "MemoryState", "BIASES",
           "RETENTIONS", "has_cuda_kernels", "__version__"]
