"""miras from other frameworks through DLPack: NumPy, CuPy, JAX (any array with ``__dlpack__``).

:func:`memory_update` and :func:`memory_step` take arrays instead of torch tensors, import them
without copying (``torch.from_dlpack``: the op reads the caller's memory, on the CPU or on CUDA),
run the same op as :func:`miras.memory_update` / :func:`miras.memory_step`, and hand the results
back as arrays of the caller's kind, also through DLPack.

Rules
- Every array argument (q, k, v, the gates, tensor-valued parameters, ``cu_seqlens``, the state's
  fields) must support DLPack (``__dlpack__``); torch tensors are taken as they are. Anything else
  is a ``TypeError`` that names the argument. Floats stay floats (scalar parameters).
- No input is copied when it is contiguous and already has the op's dtype (SPEC §1: q's dtype on
  the CPU; float32 gates and states next to float16/bfloat16 q on CUDA); otherwise the op makes
  the one contiguous/converted copy it needs, as it does for torch tensors.
- Outputs are of q's kind: ``numpy.ndarray`` for NumPy input (``numpy.from_dlpack``), CuPy for
  CuPy (``cupy.from_dlpack``), ``jax.Array`` for JAX (``jax.dlpack.from_dlpack``), torch tensors for
  torch input; for any other DLPack producer (or when that library is not importable) the outputs
  are torch tensors. Returned arrays share memory with the op's results (no copy), and a state's
  ``anchor`` may share memory with its ``X``.
- States are :class:`ArrayState` (X, P, anchor, offset, R): the fields of :class:`miras.MemoryState`
  as arrays. Any object with those attributes (a ``MemoryState`` included) is accepted as input.
- Forward only: nothing here records gradients (use the torch API, or the C ABI's
  ``miras_chunk_bwd``, for the backward).
"""
from __future__ import annotations

import importlib
from numbers import Real
from typing import Any, NamedTuple, Optional, Tuple

import torch

from . import ops
from .state import MemoryState

__all__ = ["ArrayState", "memory_update", "memory_step", "to_torch", "from_torch"]


class ArrayState(NamedTuple):
    """The memory's state as arrays (see :class:`miras.MemoryState`): raw state ``X``
    [N, H, Dk, Dv], momentum ``P`` (or None), ``anchor`` (the raw state at the last chunk
    boundary), ``offset`` [N] int64 (tokens since that boundary) and ``R``, the read memory of
    ``map_schedule="chunk"`` (or None)."""

    X: Any
    P: Optional[Any] = None
    anchor: Optional[Any] = None
    offset: Optional[Any] = None
    R: Optional[Any] = None


def to_torch(x, name: str, pair: bool = False):
    """``x`` as a torch tensor sharing its memory (DLPack); None stays None. ``pair``: a tuple of
    arrays is converted elementwise (the MLP memory's (W1, W2) state fields)."""
    if x is None or isinstance(x, torch.Tensor):
        return x
    if pair and isinstance(x, tuple):
        return tuple(to_torch(t, f"{name}[{i}]") for i, t in enumerate(x))
    if hasattr(x, "__dlpack__"):
        try:
            return torch.from_dlpack(x)
        except Exception as exc:  # e.g. a dtype or device torch cannot import
            raise TypeError(f"miras.interop: {name} could not be imported through DLPack: {exc}") from exc
    raise TypeError(f"miras.interop: {name} must be an array that supports DLPack (__dlpack__), such as a NumPy, "
                    f"CuPy or JAX array or a torch tensor; got {type(x).__name__}. Convert it first, e.g. with "
                    f"numpy.asarray(...)")


def _param(x, name: str):
    """A bias/retention parameter: a float stays a float, an array goes through DLPack."""
    if isinstance(x, Real) and not isinstance(x, bool):
        return x
    return to_torch(x, name)


def _kind(x) -> str:
    """The library whose arrays the outputs should be: the root module of ``type(x)``."""
    if isinstance(x, torch.Tensor):
        return "torch"
    root = type(x).__module__.split(".")[0]
    return {"jaxlib": "jax"}.get(root, root)


def _importer(kind: str):
    """The DLPack importer of a library, or None (then outputs stay torch tensors)."""
    try:
        if kind == "numpy":
            return importlib.import_module("numpy").from_dlpack
        if kind == "cupy":
            return importlib.import_module("cupy").from_dlpack
        if kind == "jax":
            return importlib.import_module("jax.dlpack").from_dlpack
    except (ImportError, AttributeError):
        return None
    return None


def from_torch(t, kind: str):
    """A torch result as an array of ``kind`` ("numpy", "cupy", "jax"; otherwise unchanged)."""
    if t is None:
        return None
    if isinstance(t, tuple):
        return tuple(from_torch(x, kind) for x in t)
    imp = _importer(kind)
    return t if imp is None else imp(t.detach())


def _state_in(state, name: str) -> Optional[MemoryState]:
    if state is None:
        return None
    if not all(hasattr(state, f) for f in ("X", "P", "anchor", "offset")):
        raise TypeError(f"miras.interop: {name} must be an ArrayState (X, P, anchor, offset) or a MemoryState, got "
                        f"{type(state).__name__}")
    X = to_torch(state.X, f"{name}.X", pair=True)
    P = to_torch(state.P, f"{name}.P", pair=True)
    anchor = to_torch(state.anchor, f"{name}.anchor", pair=True)
    R = to_torch(getattr(state, "R", None), f"{name}.R", pair=True)
    return MemoryState(X=X, P=P, anchor=anchor, offset=to_torch(state.offset, f"{name}.offset"), R=R)


def _state_out(st: Optional[MemoryState], kind: str) -> Optional[ArrayState]:
    if st is None:
        return None
    return ArrayState(*(from_torch(x, kind) for x in (st.X, st.P, st.anchor, st.offset, st.R)))


_PARAMS = ("delta", "robust_delta", "gamma")
_TENSOR_KW = ("ln_weight", "ln_bias")


def _common(kw):
    out = dict(kw)
    for name in _PARAMS:
        if name in out:
            out[name] = _param(out[name], name)
    for name in _TENSOR_KW:
        if name in out:
            out[name] = to_torch(out[name], name)
    return out


def memory_update(q, k, v, lr, alpha, momentum=None, *, initial_state=None, cu_seqlens=None,
                  output_final_state: bool = False, **kw) -> Tuple[Any, Optional[ArrayState]]:
    """:func:`miras.memory_update` on DLPack arrays (q, k [B, T, H, Dk], v [B, T, H, Dv], gates
    [B, T, H], ``cu_seqlens`` [N+1]). Keyword arguments are those of :func:`miras.memory_update`
    (``delta``/``robust_delta``/``gamma`` may be floats or arrays). Returns ``(o, ArrayState or
    None)`` as arrays of q's kind (module docstring)."""
    kind = _kind(q)
    t = [to_torch(x, n) for x, n in zip((q, k, v, lr, alpha, momentum), ("q", "k", "v", "lr", "alpha", "momentum"))]
    with torch.no_grad():
        o, st = ops.memory_update(*t, initial_state=_state_in(initial_state, "initial_state"),
                                  cu_seqlens=to_torch(cu_seqlens, "cu_seqlens"),
                                  output_final_state=output_final_state, **_common(kw))
    return from_torch(o, kind), _state_out(st, kind)


def memory_step(q, k, v, lr, alpha, momentum=None, *, state, **kw) -> Tuple[Any, ArrayState]:
    """:func:`miras.memory_step` on DLPack arrays (q, k [B, H, Dk], v [B, H, Dv], gates [B, H];
    ``state`` an :class:`ArrayState` or ``MemoryState``). Returns ``(o, new ArrayState)`` as arrays
    of q's kind."""
    kind = _kind(q)
    t = [to_torch(x, n) for x, n in zip((q, k, v, lr, alpha, momentum), ("q", "k", "v", "lr", "alpha", "momentum"))]
    if state is None:
        raise TypeError("miras.interop.memory_step: state is required (an ArrayState)")
    with torch.no_grad():
        o, st = ops.memory_step(*t, state=_state_in(state, "state"), **_common(kw))
    return from_torch(o, kind), _state_out(st, kind)
