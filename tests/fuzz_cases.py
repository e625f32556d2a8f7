"""Random valid cases for the property-based tests (tests/test_fuzz.py) and the scale tests.

A *case* is a small dict of plain Python values (drawn by hypothesis, so that it shrinks well)
plus a seed; :func:`build` turns it into tensors (float64 on the CPU from the seed, then cast), so
one case gives the same numbers in every dtype up to rounding.

Gate styles cover the edges of SPEC §2: lr = 0 (everywhere or mixed in), alpha = 1, alpha = 1e-3,
momentum = 0 and 0.99, and mixtures of edges and interior values inside one tensor.

The inner gradient descent must stay stable, or every comparison measures the blow-up rather than
the kernel. With a gradient frozen at the anchor for a whole chunk, C tokens with unit keys act
like one step of size lr · λ_max(Σ_chunk k kᵀ) ≈ lr · min(C, (√(C/Dk) + 1)²), momentum β
multiplies the step by up to 1/(1 − β), and non-quadratic biases have their own curvature (ℓp:
(p − 1)|e|^{p−2}). ``lr_high`` scales lr down by these factors (documented, not hidden: the
gates' *edges* are still drawn exactly; only lr's magnitude adapts). Large learning rates and
residuals are the subject of tests/test_numerics.py.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as Fn
from miras.state import MemoryState

BIAS_MODES = [("dot", "yaad"), ("l2", "yaad"), ("lp", "yaad"), ("huber", "yaad"), ("huber", "coord"),
              ("huber", "norm"), ("robust", "yaad")]
RETENTIONS = ["l2", "kl", "elastic_net", "lq"]
LOW = (torch.float16, torch.bfloat16)


def beta_max(style: Optional[str]) -> float:
    return {None: 0.0, "zero": 0.0, "rand": 0.9, "high": 0.99, "mixed": 0.99}[style]


def lr_high(case) -> float:
    """The largest lr drawn for this case (see the module docstring)."""
    Ceff = max(1, min(case["C"], case["T"]))
    Dk = case["Dk"]
    lam = min(Ceff, (math.sqrt(Ceff / Dk) + 1.0) ** 2)
    mom = 1.0 / math.sqrt(1.0 - beta_max(case["mom_style"]))
    bias, hm, p = case["bias"], case["huber_mode"], case["p"]
    f = 1.0
    if bias == "dot":
        f = 0.5
    elif bias == "lp":
        f = 0.3 if p < 2 else 1.0 / ((p - 1.0) * 3.0 ** (p - 2.0))
    elif bias == "huber" and hm == "yaad":
        f = 0.3
    elif bias == "robust":
        f = 0.7
    if case["retention"] == "lq" and case["q_norm"] > 2:
        f *= 0.5
    return 0.6 * f / (lam * mom)


def _gate(style, shape, g, kind):
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    if kind == "alpha":
        if style == "one":
            return torch.ones(shape, dtype=torch.float64)
        if style == "tiny":
            return torch.full(shape, 1e-3, dtype=torch.float64)
        if style == "rand":
            return u(0.7, 1.0)
        pick = torch.randint(0, 4, shape, generator=g)
        choices = torch.stack([torch.ones(shape, dtype=torch.float64), torch.full(shape, 1e-3, dtype=torch.float64),
                               u(1e-3, 1.0), u(0.9, 1.0)])
        return choices.gather(0, pick[None])[0]
    if kind == "momentum":
        if style == "zero":
            return torch.zeros(shape, dtype=torch.float64)
        if style == "high":
            return torch.full(shape, 0.99, dtype=torch.float64)
        if style == "rand":
            return u(0.0, 0.9)
        pick = torch.randint(0, 3, shape, generator=g)
        choices = torch.stack([torch.zeros(shape, dtype=torch.float64), torch.full(shape, 0.99, dtype=torch.float64),
                               u(0.0, 0.99)])
        return choices.gather(0, pick[None])[0]
    raise AssertionError(kind)


def build(case, requires_grad=True):
    """Tensors of one ``memory_update`` case.

    Returns ``(leaves, make)``: ``leaves`` maps names to leaf tensors (the ones gradients are taken
    for, in the case's dtypes and *storage layouts*), ``make(leaves)`` maps leaves (or float64
    copies of them) to ``(args, kwargs)`` of ``memory_update`` / the reference, applying the
    case's layout (transposed / strided / expanded views) differentiably.
    """
    g = torch.Generator().manual_seed(int(case["seed"]))
    f64 = torch.float64
    B, T, H, Dk, Dv = case["B"], case["T"], case["H"], case["Dk"], case["Dv"]
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    u = lambda lo, hi, *s: lo + (hi - lo) * torch.rand(*s, generator=g, dtype=f64)  # noqa: E731
    q = r(B, T, H, Dk)
    k = Fn.normalize(r(B, T, H, Dk), dim=-1)
    v = r(B, T, H, Dv)
    hi = lr_high(case)
    gs = (B, T, H)
    if case["lr_style"] == "zero":
        lr = torch.zeros(gs, dtype=f64)
    elif case["lr_style"] == "rand":
        lr = u(0.3 * hi, hi, *gs)
    else:  # mixed: exact zeros among interior values
        lr = torch.where(torch.rand(gs, generator=g, dtype=f64) < 0.3, 0.0, u(0.1 * hi, hi, *gs))
    alpha = _gate(case["alpha_style"], gs, g, "alpha")
    mom = _gate(case["mom_style"], gs, g, "momentum") if case["mom_style"] is not None else None
    dt, gdt = case["dtype"], case["gate_dtype"]
    if case["layout"] == "expanded" and gdt in LOW:
        # the expand's backward sums the per-token gradients over T in the leaf's dtype: in
        # float16 that is torch's rounding, not the op's, so broadcast gates stay float32 here
        gdt = torch.float32
    sdt = torch.float64 if dt == torch.float64 else torch.float32
    kw = dict(bias=case["bias"], retention=case["retention"], chunk_size=case["C"])
    params = {}
    bias, hm = case["bias"], case["huber_mode"]
    if bias == "huber":
        kw["huber_mode"] = hm
        ref = v.abs().mean(-1) if hm == "coord" else v.norm(dim=-1)
        if case["param_tensor"]:
            params["delta"] = u(0.3, 1.2, *gs) * ref
        else:
            kw["delta"] = float(0.6 * ref.median())
    if bias == "robust":
        if case["param_tensor"]:
            params["robust_delta"] = u(0.0, 1.0, *gs)
        else:
            kw["robust_delta"] = case["robust_scalar"]
    if bias == "lp":
        kw["p"] = case["p"]
    if bias in ("lp", "robust") or (bias == "huber" and hm == "yaad"):
        kw["eps"] = case["eps"]
    if case["retention"] == "elastic_net":
        gscale = hi / math.sqrt(Dk)
        if case["gamma_style"] == "tensor":
            params["gamma"] = u(0.02, 0.2, *gs) * gscale
        else:
            kw["gamma"] = 0.0 if case["gamma_style"] == "zero" else 0.1 * gscale
    if case["retention"] == "kl":
        kw["kl_scale"] = case["kl_scale"]
    if case["retention"] == "lq":
        kw["q_norm"] = case["q_norm"]
    if case["scale"] is not None:
        kw["scale"] = case["scale"]
    st = {}
    if case["init"] in ("X", "XP"):
        st["X0"] = 0.3 * r(case["N"], H, Dk, Dv)
        if case["init"] == "XP" and mom is not None:
            st["P0"] = 0.1 * r(case["N"], H, Dk, Dv) * hi

    layout = case["layout"]
    leaves = {}

    def leaf(name, x, dtype):
        # the stored (leaf) layout of an input: the op sees a view of it (see ``view``)
        if layout == "transposed" and x.dim() >= 3 and name not in ("X0", "P0"):
            x = x.transpose(1, 2).contiguous()                    # [B, H, T, ...]
        elif layout == "strided" and name not in ("X0", "P0"):
            x = torch.stack([x, torch.zeros_like(x)], -1).flatten(-2)  # every other element
        elif layout == "expanded" and x.dim() == 3 and name in ("lr", "alpha", "momentum"):
            x = x[:, :1].contiguous()                             # [B, 1, H], broadcast over T
        elif layout == "transposed" and name in ("X0", "P0"):
            x = x.transpose(-1, -2).contiguous()                  # [N, H, Dv, Dk]
        leaves[name] = x.to(dtype).requires_grad_(requires_grad)

    for name, x in (("q", q), ("k", k), ("v", v)):
        leaf(name, x, dt)
    for name, x in (("lr", lr), ("alpha", alpha), ("momentum", mom)):
        if x is not None:
            leaf(name, x, gdt)
    for name, x in params.items():
        leaf(name, x, gdt)
    for name, x in st.items():
        leaf(name, x, sdt)

    def view(name, x):
        if name in ("X0", "P0"):
            return x.transpose(-1, -2) if layout == "transposed" else x
        if layout == "transposed" and x.dim() >= 3:
            return x.transpose(1, 2)
        if layout == "strided":
            return x[..., ::2]
        if layout == "expanded" and name in ("lr", "alpha", "momentum"):
            return x.expand(B, T, H)
        return x

    def make(lv):
        vw = {n: view(n, t) for n, t in lv.items()}
        args = [vw["q"], vw["k"], vw["v"], vw["lr"], vw["alpha"], vw.get("momentum")]
        kws = dict(kw)
        for name in params:
            kws[name] = vw[name]
        if "X0" in vw:
            kws["initial_state"] = MemoryState(X=vw["X0"], P=vw.get("P0"))
        if case["segs"] is not None:
            kws["cu_seqlens"] = torch.tensor([0] + list(_cumsum(case["segs"])), dtype=case["cu_dtype"])
        return args, kws

    return leaves, make


def _cumsum(xs):
    s = 0
    for x in xs:
        s += x
        yield s
