"""The op's scalar options, checked once for every front end (torch ``ops.py``, JAX ``jax.py``).

Names, codes and per-token parameters come from the extension (``miras._C.registry()``: the lists of
csrc/core/registry.h), not from a copy. The Python names: ``bias="huber"`` with
``huber_mode="yaad" | "coord" | "norm"`` selects the registry's ``huber_<mode>``; every other bias and
retention is its registry name. Range checks with messages that name the argument; the math is SPEC.md.
"""
from __future__ import annotations

import math
from numbers import Real

from . import _C

_REG = _C.registry()
_BIAS = {b["name"]: b for b in _REG["biases"]}
_RET = {r["name"]: r for r in _REG["retentions"]}
HUBER_MODES = tuple(n[len("huber_"):] for n in _BIAS if n.startswith("huber_"))
BIASES = tuple(dict.fromkeys("huber" if n.startswith("huber_") else n for n in _BIAS))
RETENTIONS = tuple(_RET)
BIAS_CODE = {n: b["code"] for n, b in _BIAS.items() if not n.startswith("huber_")}
HUBER_CODE = {m: _BIAS["huber_" + m]["code"] for m in HUBER_MODES}
RET_CODE = {n: r["code"] for n, r in _RET.items()}


def bias_entry(bias: str, huber_mode: str):
    """The registry entry of a (bias, huber_mode) choice."""
    return _BIAS["huber_" + huber_mode] if bias == "huber" else _BIAS[bias]


def fail(msg: str):
    raise ValueError(f"miras: {msg}")


def config_codes(bias, huber_mode, retention, p, eps, kl_scale, q_norm, eps_q, chunk_size):
    """Checks the choices and scalar options; returns (bias code, retention code)."""
    if bias not in BIASES:
        fail(f"bias must be one of {BIASES}, got {bias!r}")
    if retention not in RETENTIONS:
        fail(f"retention must be one of {RETENTIONS}, got {retention!r}")
    if bias == "huber" and huber_mode not in HUBER_MODES:
        fail(f"huber_mode must be one of {HUBER_MODES}, got {huber_mode!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        fail(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    for name, val, ok, what in (
        ("p", p, lambda x: x >= 1, ">= 1"),
        ("eps", eps, lambda x: x > 0, "> 0"),
        ("kl_scale", kl_scale, lambda x: x > 0, "> 0"),
        ("q_norm", q_norm, lambda x: x >= 2, ">= 2"),
        ("eps_q", eps_q, lambda x: x > 0, "> 0"),
    ):
        if not isinstance(val, Real) or isinstance(val, bool) or not math.isfinite(float(val)) or not ok(float(val)):
            fail(f"{name} must be a finite float {what}, got {val!r}")
    code = HUBER_CODE[huber_mode] if bias == "huber" else BIAS_CODE[bias]
    return code, RET_CODE[retention]


def param_names(bias, retention, huber_mode="yaad"):
    """Which per-token parameter each choice reads (registry.h): (name, lower bound, bound excluded)
    for the bias and for the retention, or None. delta > 0 (huber), robust_delta >= 0, gamma >= 0."""
    def spec(e):
        return (e["param"], e["lo"], e["lo_open"]) if e["param"] else None

    return spec(bias_entry(bias, huber_mode if huber_mode in HUBER_MODES else HUBER_MODES[0])), spec(_RET[retention])


def range_text(lo: float, lo_open: bool) -> str:
    return f"({lo}, inf)" if lo_open else f"[{lo}, inf)"


def scalar_param(value, name: str, lo: float, lo_open: bool) -> float:
    """A bias/retention parameter given as a number: checked and returned as a float."""
    if not isinstance(value, Real) or isinstance(value, bool):
        fail(f"{name} must be a float or a [B, T, H] tensor, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or (v <= lo if lo_open else v < lo):
        fail(f"{name} must lie in {range_text(lo, lo_open)}, got {v}")
    return v


def resolve_scale(scale, Dk: int) -> float:
    """The query scale: Dk ** -0.5 by default."""
    if scale is None:
        return Dk ** -0.5
    if not isinstance(scale, Real) or isinstance(scale, bool) or not math.isfinite(float(scale)):
        fail(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)
