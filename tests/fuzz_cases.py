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

:func:`branch_decisions` records (and can force) the float64 reference's branch decisions — Huber
clamps and the elastic-net threshold — for the tie fallback of tests/test_fuzz.py and the
gradient checks of tests/test_numerics.py.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Optional

import torch
import torch.nn.functional as Fn
from miras import reference as R
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
    kw = dict(bias=case["bias"], retention=case["retention"], chunk_size=case["C"],
              map_schedule=case.get("map_schedule", "token"), lq_map=case.get("lq_map", "eq24"))
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


# ---------------------------------------------------------------------------------------------
# Branch decisions of the float64 reference: record, find near-ties, force the other branch
# ---------------------------------------------------------------------------------------------
# A decision compares a value with a threshold: Huber "coord" |e_i| vs δ (per element), "yaad" /
# "norm" ‖e‖ vs δ (per residual row), the elastic-net threshold |z| vs γ (per state element, per
# token). A float32 computation of the value carries an absolute error of the order of its rounding
# of the quantities it is formed from, so a decision is a *near-tie* (float32 may take the other
# branch) when |value − threshold| <= NEAR_FLIP · scale, with scale the largest magnitude involved
# (Huber: max(δ, |e|, |v|) over the row; elastic net: max(γ, max |z|) over the (sequence, head)'s
# state matrix), or when the difference is below float32's smallest subnormal (an elastic-net
# value that underflows to 0 in float32 sits exactly on γ = 0: a state decaying below ~1e-45
# loses the soft threshold's unit slope there, value and gradient). NEAR_FLIP = 1e-4 is 5x the
# float32 tolerance of the states (2e-5): a decision further away than that cannot flip unless the
# state itself is already out of tolerance, which the comparison catches on its own.
NEAR_FLIP = 1e-4
SUBNORMAL32 = 2.0 ** -149


class Decisions:
    """What :func:`branch_decisions` recorded: per call of ``reference.psi`` (Huber biases) or
    ``reference._soft`` (elastic net), in call order, the decision tensor ``outside`` (value beyond
    the threshold) and the mask of near-ties; ``min`` the smallest relative margin |value − thr| /
    thr of any decision (the old, threshold-relative measure, kept for the notes)."""

    def __init__(self):
        self.calls = []   # (kind, outside, near, underflow) per call
        self.min = math.inf

    def near_ties(self):
        """[(call, flat index, level)] of every near-tie, in call (= time) order; level 0: within
        NEAR_FLIP of the threshold, 1: the value rounds to 0 in float32 (|x| <= 2^-150) at γ = 0,
        2: within one float32 subnormal of it."""
        out = []
        for i, (_, _, near, under) in enumerate(self.calls):
            for j in near.flatten().nonzero().flatten().tolist():
                out.append((i, j, int(under.flatten()[j])))
        return out


def _huber_decision(e, v, d, mode):
    if mode == "coord":
        val, thr = e.abs(), d + torch.zeros_like(e)
        scale = torch.maximum(torch.maximum(e.abs(), v.abs()).amax(-1, keepdim=True), thr)
    else:
        val = (e * e).sum(-1, keepdim=True).sqrt()
        thr = d + torch.zeros_like(val)
        scale = torch.maximum(torch.maximum(val, v.norm(dim=-1, keepdim=True)), thr)
    return val, thr, scale


@contextlib.contextmanager
def branch_decisions(flips=None, near=NEAR_FLIP):
    """Wrap ``reference.psi`` and ``reference._soft`` while the block runs: record every branch
    decision (:class:`Decisions`) and, with ``flips`` = {call index: (mask, forced outside)},
    take the given branch at the masked elements instead (value *and* gradient: the masks are
    ``torch.where`` conditions, as in the reference). Without flips the math is unchanged."""
    rec = Decisions()
    psi0, soft0 = R.psi, R._soft
    flips = flips or {}

    def note(kind, val, thr, scale, outside):
        i = len(rec.calls)
        m = (val - thr).abs()
        if m.numel():
            rel = m / thr.clamp_min(1e-300)
            rec.min = min(rec.min, float(rel.min()))
        under = torch.where(m <= SUBNORMAL32 / 2, 1, 2) * ((m <= SUBNORMAL32) & (val != 0))
        nearm = (m <= near * scale) | (under > 0)
        outside = outside.contiguous()
        rec.calls.append((kind, outside, nearm.contiguous(), under.contiguous()))
        f = flips.get(i)
        if f is None:
            return None
        mask, forced = f
        return torch.where(mask, forced, outside)

    def psi(e, v, bias, **kw):
        if bias != "huber":
            return psi0(e, v, bias, **kw)
        mode = kw.get("huber_mode", "yaad")
        d = R._per_row(kw.get("delta", 1.0), e)
        d = d if isinstance(d, torch.Tensor) else torch.tensor(d, dtype=e.dtype)
        val, thr, scale = _huber_decision(e.detach(), v.detach(), d.detach(), mode)
        out = note("huber_" + mode, val, thr, scale, val > thr)
        if out is None:
            return psi0(e, v, bias, **kw)
        if mode == "coord":       # clamp(e, −δ, δ) with the given branch
            return torch.where(out, torch.where(e > 0, d + torch.zeros_like(e), -d + torch.zeros_like(e)), e)
        n2 = (e * e).sum(-1, keepdim=True)
        if mode == "yaad":
            return torch.where(out, d * e / torch.sqrt(e * e + kw.get("eps", 1e-6)), e)
        n = torch.sqrt(torch.where(out, n2, torch.ones_like(n2)))
        return torch.where(out, d * e / n, e)

    def soft(z, g):
        gt = g if isinstance(g, torch.Tensor) else torch.tensor(float(g), dtype=z.dtype)
        zd, gd = z.detach(), gt.detach() + torch.zeros_like(z)
        scale = torch.maximum(zd.abs().amax((-2, -1), keepdim=True), gd)
        # (an exactly zero value at γ = 0 is a structural zero — no input reaches it — not a tie)
        val = torch.where((zd == 0) & (gd == 0), torch.full_like(zd, math.inf), zd.abs())
        out = note("soft", val, gd, scale, zd.abs() > gd)
        if out is None:
            return soft0(z, g)
        return torch.where(out, torch.where(z > 0, z - g, z + g), torch.zeros_like(z))

    R.psi, R._soft = psi, soft
    try:
        yield rec
    finally:
        R.psi, R._soft = psi0, soft0


def flip_sets(ties, max_enum=4, max_sets=24):
    """Candidate sets of near-ties that float32 may have decided the other way, most likely first.
    Underflow ties (values float32 rounds to 0, then also those within one subnormal) flip
    together; with up to ``max_enum`` other ties every subset of them is tried, beyond that the
    empty set, each tie alone and all of them."""
    under1 = [t for t in ties if t[2] == 1]
    under2 = [t for t in ties if t[2] == 2]
    rest = [t for t in ties if not t[2]]
    if len(rest) <= max_enum:
        subs = [list(c) for r in range(len(rest) + 1) for c in itertools.combinations(rest, r)]
    else:
        subs = [[]] + [[t] for t in rest] + [rest]
    bases = [under1] + ([under1 + under2] if under2 else []) + [[]] if under1 or under2 else [[]]
    out = []
    for base in bases:
        out += [base + s for s in subs if base + s]
    return out[:max_sets]


def force(rec: Decisions, flipset):
    """The ``flips`` argument of :func:`branch_decisions` that takes the other branch at every
    decision of ``flipset`` (as recorded in ``rec``)."""
    flips = {}
    for i, j, _ in flipset:
        outside = rec.calls[i][1]
        mask, forced = flips.get(i, (torch.zeros(outside.shape, dtype=torch.bool), outside.clone()))
        mask.view(-1)[j] = True
        forced.view(-1)[j] = not bool(outside.view(-1)[j])
        flips[i] = (mask, forced)
    return flips
