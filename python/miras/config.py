"""One configuration object for every front end (torch ops, ``miras.jax``, ``miras.interop``,
``miras.nn``): the memory, the attentional bias and retention with their scalar options, and the
chunking — validated once, when it is made.

    cfg = miras.Config(bias="lp", retention="lq", q_norm=4.0, chunk_size=64)
    o, st = miras.memory_update(q, k, v, lr, alpha, config=cfg, delta=...)   # or the options as keywords

Per-token parameters (``delta`` for the Huber biases, ``robust_delta`` for robust, ``gamma`` for elastic
net: csrc/core/registry.h) are not part of the config: they are floats or [B, T, H] tensors, passed
as keywords (one mapping, ``params``). The ops hand the configuration to the C++ backends as two
arrays (int64, float64) in the order of ``miras._C.config_fields()`` (csrc/core/params.h), so a new
scalar option is a field here and in ``MemoryConfig`` — no front end lists the options.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from . import _C
from ._options import config_codes, fail, param_names, resolve_scale

# Per-token parameters and their default values (the registry names the parameter of each choice).
PARAM_DEFAULTS = {"delta": 1.0, "robust_delta": 0.0, "gamma": 0.0}
MEMORIES = ("linear", "mlp")
# When the retention's read map is applied (SPEC §5 / §5b), with the codes of csrc/core/params.h.
MAP_SCHEDULES = {"token": 0, "chunk": 1}
# The lq read map: "eq24" (the paper's Eq. 24, W = A / ‖A‖_q^(q−2), degree 3 − q) or "mirror" (the mirror
# map of an ℓq regulariser, W = sign(A)|A|^(q−1) / ‖A‖_q^(q−2), degree 1). "mirror" runs in miras.reference.
LQ_MAPS = ("eq24", "mirror")
_FIELDS = _C.config_fields()


@dataclass(frozen=True)
class Config:
    """The scalar configuration of a Miras memory (SPEC §3-§6). Frozen and hashable; ``replace``
    makes a changed copy. ``scale=None`` means Dk**-0.5 for the linear memory, 1 for the MLP one.
    ``map_schedule``: ``"token"`` applies the retention's read map after every token (SPEC §5, exact
    online descent at ``chunk_size=1``); ``"chunk"`` applies it at chunk starts and moves the read
    memory linearly inside a chunk (SPEC §5b, the paper's parallel form). Equal for retention l2."""

    memory: str = "linear"
    bias: str = "l2"
    huber_mode: str = "yaad"
    retention: str = "l2"
    p: float = 3.0
    eps: float = 1e-6
    kl_scale: float = 1.0
    q_norm: float = 4.0
    eps_q: float = 1e-6
    chunk_size: int = 64
    scale: Optional[float] = None
    map_schedule: str = "token"
    lq_map: str = "eq24"

    def __post_init__(self):
        if self.memory not in MEMORIES:
            fail(f"memory must be one of {MEMORIES}, got {self.memory!r}")
        # names, ranges, chunk_size (messages name the argument)
        config_codes(self.bias, self.huber_mode, self.retention, self.p, self.eps, self.kl_scale, self.q_norm,
                     self.eps_q, self.chunk_size)
        if self.scale is not None:
            resolve_scale(self.scale, 1)
        if self.map_schedule not in MAP_SCHEDULES:
            fail(f"map_schedule must be one of {tuple(MAP_SCHEDULES)}, got {self.map_schedule!r}")
        if self.lq_map not in LQ_MAPS:
            fail(f"lq_map must be one of {LQ_MAPS}, got {self.lq_map!r}")

    # ---- construction from keyword options -----------------------------------------------------
    @classmethod
    def split(cls, config: Optional["Config"] = None, **options) -> Tuple["Config", Dict[str, Any]]:
        """(config, params) from keyword options: the fields of Config (overriding ``config``'s) and
        the per-token parameters (``delta``, ``robust_delta``, ``gamma``). Unknown names are an error."""
        if config is not None and not isinstance(config, Config):
            fail(f"config must be a miras.Config, got {type(config).__name__}")
        changes, params = {}, dict(PARAM_DEFAULTS)
        for name, value in options.items():
            if name in _FIELD_NAMES:
                changes[name] = value
            elif name in PARAM_DEFAULTS:
                params[name] = value
            else:
                fail(f"unknown option {name!r}: the options are {sorted(_FIELD_NAMES)} and the per-token "
                     f"parameters {sorted(PARAM_DEFAULTS)}")
        if config is None:
            return cls(**changes), params
        return (config.replace(**changes) if changes else config), params

    def as_dict(self) -> Dict[str, Any]:
        return {n: getattr(self, n) for n in _FIELD_NAMES}

    def replace(self, **changes) -> "Config":
        return Config(**{**self.as_dict(), **changes})

    # ---- what the backends read ------------------------------------------------------------------
    def codes(self) -> Tuple[int, int]:
        """(bias code, retention code) of csrc/core/registry.h."""
        return config_codes(self.bias, self.huber_mode, self.retention, self.p, self.eps, self.kl_scale,
                            self.q_norm, self.eps_q, self.chunk_size)

    def param_specs(self):
        """(name, lower bound, bound excluded) of the bias's and the retention's per-token parameter, or None."""
        return param_names(self.bias, self.retention, self.huber_mode)

    def resolved_scale(self, Dk: int) -> float:
        if self.scale is None and self.memory == "mlp":
            return 1.0  # SPEC §1: the MLP memory's default query scale
        return resolve_scale(self.scale, Dk)

    def arrays(self, Dk: int, bias_scalar: float, ret_scalar: float, chunk_size: Optional[int] = None):
        """The ops' configuration arrays (icfg, fcfg) in the order of miras._C.config_fields()."""
        if self.lq_mirror:  # not a backend field: no C++ path may run it as Eq. 24
            raise ValueError("miras: lq_map='mirror' is computed by miras.reference only (the torch ops route it "
                             "there); the C++/CUDA backends, JAX and the C ABI compute lq_map='eq24'")
        bias_code, ret_code = self.codes()
        values = self.as_dict()
        values.update(bias=bias_code, retention=ret_code, bias_param=float(bias_scalar), ret_param=float(ret_scalar),
                      scale=self.resolved_scale(Dk), map_schedule=MAP_SCHEDULES[self.map_schedule])
        if chunk_size is not None:
            values["chunk_size"] = chunk_size
        try:
            ints = [int(values[n]) for n in _FIELDS["ints"]]
            floats = [float(values[n]) for n in _FIELDS["floats"]]
        except KeyError as e:  # a field of MemoryConfig (C++) that this class does not know
            raise RuntimeError(f"miras: Config has no value for the backend's configuration field {e}") from None
        return ints, floats

    @property
    def chunk_maps(self) -> bool:
        """SPEC §5b with a map retention (kl, lq, elastic_net): the read memory differs from φ(X)."""
        return self.map_schedule == "chunk" and self.retention != "l2"

    @property
    def lq_mirror(self) -> bool:
        """retention lq with the mirror map (an option beside Eq. 24; miras.reference only so far)."""
        return self.retention == "lq" and self.lq_map == "mirror"

    def reference_kwargs(self) -> Dict[str, Any]:
        """The options as keywords of miras.reference's functions."""
        return self.as_dict()


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Config))
