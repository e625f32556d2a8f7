"""Shared helpers of the miras test suite.

- ``make_inputs``: random, well-conditioned inputs for one op call (never zeros): unit-norm keys,
  gates inside their SPEC §2 ranges, Huber δ around the residual norm (both branches taken),
  robust Δ and elastic-net γ with values that matter (γ thresholds some entries, not all).
- ``rel_err``: ‖a − b‖ / max(‖b‖, tiny), computed in float64.
- ``cuda`` marker: skipped without a GPU or without the compiled CUDA kernels.
- ``seed`` fixture: fixed per test, different across tests (derived from the node id).
"""
from __future__ import annotations

import math
import zlib
from typing import Optional

import pytest
import torch
import torch.nn.functional as Fn

try:  # the compiled extension; tests that need it fail loudly at import if it is missing
    import miras  # noqa: F401
    from miras import reference as R  # noqa: F401
    from miras.state import MemoryState  # noqa: F401
    _IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - reported by every test that needs it
    miras = None
    _IMPORT_ERROR = exc

# (bias, huber_mode) pairs: every attentional bias of SPEC §3.
BIAS_MODES = [("dot", "yaad"), ("l2", "yaad"), ("lp", "yaad"), ("huber", "yaad"), ("huber", "coord"),
              ("huber", "norm"), ("robust", "yaad")]
BIAS_IDS = ["dot", "l2", "lp", "huber-yaad", "huber-coord", "huber-norm", "robust"]
RETENTIONS = ["l2", "kl", "elastic_net", "lq"]

TINY = 1e-30


def cuda_available() -> bool:
    return (miras is not None and torch.cuda.is_available() and miras.has_cuda_kernels())


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and a build with the CUDA kernels")


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU or miras built without CUDA kernels")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed(request) -> int:
    """A seed fixed per test (stable across runs) and different across tests/parameters."""
    return zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / max(‖b‖, tiny) in float64 (a, b may live on different devices/dtypes)."""
    a = a.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    if not bool(torch.isfinite(a).all()):
        bad = (~torch.isfinite(a)).nonzero()
        raise AssertionError(f"{bad.shape[0]} non-finite value(s) in the tested tensor, first at index "
                             f"{tuple(bad[0].tolist())}: {a[tuple(bad[0].tolist())].item()}")
    return float((a - b).norm() / max(float(b.norm()), TINY))


def assert_close(a, b, tol, what=""):
    try:
        e = rel_err(a, b)
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from None
    if not e <= tol:
        raise AssertionError(f"{what}: relative error {e:.3e} > {tol:.1e}")


def assert_compiled_matches(module, x, backend="aot_eager"):
    """torch.compile(fullgraph=True) of ``module`` gives eager's forward (1e-10) and parameter
    gradients of sum(y²) (1e-9); float64 modules."""
    torch._dynamo.reset()
    y_eager = module(x)
    g_eager = torch.autograd.grad(y_eager.pow(2).sum(), list(module.parameters()))
    cm = torch.compile(module, fullgraph=True, backend=backend)
    y = cm(x)
    g = torch.autograd.grad(y.pow(2).sum(), list(module.parameters()))
    assert_close(y, y_eager, 1e-10, "compiled forward")
    for a, b in zip(g, g_eager):
        assert_close(a, b, 1e-9, "compiled backward")


def make_inputs(B=2, T=37, H=2, Dk=8, Dv=6, dtype=torch.float64, device="cpu", momentum=True, seed=0,
                bias="l2", retention="l2", tensor_params=True, huber_mode="yaad", normalize_k=True,
                initial_state=False, requires_grad=False, lr_range=(0.05, 0.5), N=None, gate_dtype=None,
                state_dtype=None):
    """Random inputs of one ``memory_update`` call.

    Returns ``(args, kw)``: ``args = [q, k, v, lr, alpha, momentum]`` (momentum may be None) and
    ``kw`` the bias/retention keyword arguments (tensor-valued params when ``tensor_params``) and,
    with ``initial_state=True``, raw tensors ``X0``/``P0`` under ``kw["_X0"]``/``kw["_P0"]``
    (wrap them with :func:`state_of`). ``gate_dtype`` / ``state_dtype`` (default ``dtype``) set the
    dtype of the gates and tensor parameters / of the initial state (e.g. float32 next to bf16 q, k, v). Everything is generated in float64 on the CPU from ``seed``
    and then cast, so one seed gives the same numbers in every dtype (up to rounding).
    ``N`` is the number of states (defaults to B; varlen tests pass the number of segments).
    """
    g = torch.Generator().manual_seed(int(seed))
    f64 = torch.float64

    def r(*s):
        return torch.randn(*s, generator=g, dtype=f64)

    def u(lo, hi, *s):
        return lo + (hi - lo) * torch.rand(*s, generator=g, dtype=f64)

    q = r(B, T, H, Dk)
    k = r(B, T, H, Dk)
    if normalize_k:  # unit keys: the inner gradient descent is stable for lr < 2
        k = Fn.normalize(k, dim=-1)
    v = r(B, T, H, Dv)
    lo, hi = lr_range
    if bias == "dot":  # −v is the signal whatever the memory: a smaller step keeps the state moderate
        lo, hi = 0.5 * lo, 0.5 * hi
    if bias == "lp":  # ψ ~ e|e| (p = 3): the step must shrink with |e| ≤ ~4, or the inner GD diverges
        lo, hi = 0.2 * lo, 0.2 * hi
    if bias == "huber" and huber_mode == "yaad":
        # Outside its ℓ2 ball Yaad's step is δ·sign-like (bang-bang): with large steps and momentum
        # the inner dynamics turn chaotic, and the outer gradient becomes ill-conditioned
        # (measured: 1e-7 input noise moved float64 gradients by 1e-3 at T=150, lr ≤ 0.5; by 2e-6
        # with lr ≤ 0.15). Smaller steps keep comparisons against float32 kernels meaningful.
        lo, hi = 0.3 * lo, 0.3 * hi
    lr = u(lo, hi, B, T, H)
    alpha = u(0.7, 1.0, B, T, H)
    mom = u(0.0, 0.9, B, T, H) if momentum else None
    kw = dict(bias=bias, retention=retention)
    if bias == "huber":
        kw["huber_mode"] = huber_mode
        # The residual starts at −v and shrinks as the memory learns: δ between 0.3 and 1.2 times
        # the size of v (norm for yaad/norm, a typical |entry| for coord) takes both branches.
        ref = v.abs().mean(-1) if huber_mode == "coord" else v.norm(dim=-1)
        if tensor_params:
            kw["delta"] = u(0.3, 1.2, B, T, H) * ref
        else:
            kw["delta"] = float(0.6 * ref.median())
        if huber_mode == "yaad" and dtype != torch.float64:
            # Outside the ℓ2 ball ψ = δ·e/√(e² + ε): ∂ψ/∂e peaks at δ/√ε (1000δ for the default
            # ε = 1e-6) for entries with |e_i| ≲ √ε, so the *gradient* is ill-conditioned and
            # float32/bf16 rounding of e (~1e-7..4e-3) is amplified: perturbing float64 inputs by
            # 1e-7 moves the float64 reference's gradients by ~1e-3 (measured, T=150, D=64). With
            # ε = 1e-2 that drops to ~4e-5: the same code path at a sane condition number
            # (float64 tests keep the default 1e-6).
            kw["eps"] = 1e-2
    if bias == "robust":
        kw["robust_delta"] = u(0.0, 1.0, B, T, H) if tensor_params else 0.5
    if retention == "elastic_net":
        kw["gamma"] = u(1e-3, 1e-2, B, T, H) if tensor_params else 4e-3
    if retention == "kl":
        kw["kl_scale"] = 1.5
    if initial_state:
        n = B if N is None else N
        # KL: logits; lq: accumulator; l2/elastic_net: weights. Moderate scale for all.
        kw["_X0"] = 0.3 * r(n, H, Dk, Dv)
        kw["_P0"] = 0.1 * r(n, H, Dk, Dv) if momentum else None

    def cast(t, dt=dtype):
        if t is None:
            return None
        t = t.to(device=device, dtype=dt)
        if requires_grad:
            t.requires_grad_(True)
        return t

    gdt = gate_dtype or dtype
    sdt = state_dtype or dtype
    args = [cast(t) for t in (q, k, v)] + [cast(t, gdt) for t in (lr, alpha, mom)]
    for name in ("delta", "robust_delta", "gamma", "_X0", "_P0"):
        if isinstance(kw.get(name), torch.Tensor):
            kw[name] = cast(kw[name], sdt if name.startswith("_") else gdt)
    return args, kw


_CFG_DEFAULTS = dict(bias=1, retention=0, chunk_size=64, p=3.0, eps=1e-6, bias_param=1.0, ret_param=0.0, kl_scale=1.0,
                     q_norm=4.0, eps_q=1e-6, scale=1.0, map_schedule=0)


def op_cfg(**fields):
    """[icfg, fcfg]: the configuration arrays of the raw ops torch.ops.miras.* (csrc/core/params.h's
    field order, read from the extension), from MemoryConfig field values (codes for bias/retention)."""
    order = miras._C.config_fields()
    vals = dict(_CFG_DEFAULTS, **fields)
    unknown = set(fields) - set(order["ints"]) - set(order["floats"])
    assert not unknown, f"no such configuration field: {unknown}"
    return [[int(vals[n]) for n in order["ints"]], [float(vals[n]) for n in order["floats"]]]


def cfg_set(arrays, **fields):
    """A copy of [icfg, fcfg] with some fields changed (raw values: also invalid ones)."""
    order = miras._C.config_fields()
    icfg, fcfg = list(arrays[0]), list(arrays[1])
    for n, v in fields.items():
        if n in order["ints"]:
            icfg[order["ints"].index(n)] = v
        else:
            fcfg[order["floats"].index(n)] = v
    return [icfg, fcfg]


def state_of(kw, memory_state_cls=None):
    """The ``MemoryState`` built from ``kw["_X0"]``/``kw["_P0"]`` (None without them)."""
    cls = memory_state_cls or MemoryState
    if kw.get("_X0") is None:
        return None
    return cls(X=kw["_X0"], P=kw.get("_P0"))


def op_kwargs(kw):
    """``kw`` without the private state entries."""
    return {k: v for k, v in kw.items() if not k.startswith("_")}


def upcast(x, dtype=torch.float64, device="cpu"):
    """A detached float64 CPU copy (leaf, requires_grad like ``x``) of a tensor / list / dict."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        y = x.detach().to(device=device, dtype=dtype)
        return y.requires_grad_(x.requires_grad) if x.is_floating_point() else y
    if isinstance(x, (list, tuple)):
        return type(x)(upcast(t, dtype, device) for t in x)
    if isinstance(x, dict):
        return {k: upcast(v, dtype, device) for k, v in x.items()}
    return x


def leaves(args, kw):
    """Every differentiable input: (name, tensor) pairs."""
    names = ["q", "k", "v", "lr", "alpha", "momentum"]
    out = [(n, t) for n, t in zip(names, args) if isinstance(t, torch.Tensor)]
    for name in ("delta", "robust_delta", "gamma", "_X0", "_P0"):
        t = kw.get(name)
        if isinstance(t, torch.Tensor):
            out.append((name.lstrip("_"), t))
    return out


def cotangents(o, state, seed, with_state=True):
    """Random cotangents for o and (when given) the final X and P, generated on the CPU in
    float64 from ``seed`` so that every implementation receives the same numbers."""
    g = torch.Generator().manual_seed(int(seed) + 7919)
    d = {"o": torch.randn(tuple(o.shape), generator=g, dtype=torch.float64)}
    if with_state and state is not None:
        d["X"] = torch.randn(tuple(state.X.shape), generator=g, dtype=torch.float64)
        if state.P is not None:
            d["P"] = torch.randn(tuple(state.P.shape), generator=g, dtype=torch.float64)
    return d


def loss_of(o, state, cot):
    """⟨o, dO⟩ + ⟨X_T, dX⟩ + ⟨P_T, dP⟩ with the cotangents moved to each tensor's device/dtype."""
    total = (o.to(torch.float64) * cot["o"].to(o.device)).sum()
    if "X" in cot:
        total = total + (state.X.to(torch.float64) * cot["X"].to(state.X.device)).sum()
    if "P" in cot:
        total = total + (state.P.to(torch.float64) * cot["P"].to(state.P.device)).sum()
    return total


def grads(loss, named):
    """{name: gradient} for the tensors of ``named`` that require grad."""
    named = [(n, t) for n, t in named if t.requires_grad]
    if not named:
        return {}
    gs = torch.autograd.grad(loss, [t for _, t in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, gs)}


def run_with_grads(fn, args, kw, cot_seed, chunk_size, with_state=True, **extra):
    """Call ``fn(*args, **kw, chunk_size=..., initial_state=..., output_final_state=True)``,
    backpropagate random cotangents; return (o, state, {name: grad})."""
    st = state_of(kw)
    o, state = fn(*args, **op_kwargs(kw), chunk_size=chunk_size, initial_state=st, output_final_state=True,
                  **extra)
    cot = cotangents(o, state, cot_seed, with_state)
    named = leaves(args, kw)
    g = grads(loss_of(o, state, cot), named) if named and any(t.requires_grad for _, t in named) else {}
    return o, state, g
