"""The op's scalar options, checked once for every front end (torch ``ops.py``, JAX ``jax.py``).

Torch-free and JAX-free: names, codes (the values of ``csrc/core/params.h``), range checks with
messages that name the argument. The math is SPEC.md.
"""
from __future__ import annotations

import math
from numbers import Real

BIASES = ("dot", "l2", "lp", "huber", "robust")
HUBER_MODES = ("yaad", "coord", "norm")
RETENTIONS = ("l2", "kl", "elastic_net", "lq")
BIAS_CODE = {"dot": 0, "l2": 1, "lp": 2, "robust": 6}
HUBER_CODE = {"yaad": 3, "coord": 4, "norm": 5}
RET_CODE = {"l2": 0, "kl": 1, "elastic_net": 2, "lq": 3}


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


def param_names(bias, retention):
    """Which per-token parameter each choice reads: (bias parameter and its lower bound, open?) and
    (retention parameter ...), or None. delta > 0 (huber), robust_delta >= 0, gamma >= 0."""
    bias_param = {"huber": ("delta", 0.0, True), "robust": ("robust_delta", 0.0, False)}.get(bias)
    ret_param = ("gamma", 0.0, False) if retention == "elastic_net" else None
    return bias_param, ret_param


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
