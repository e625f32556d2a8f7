"""Shared pieces of the benchmarks: the variant grid, random inputs, timing and error helpers.

Used by ``bench_cpu.py`` and ``bench_cuda.py`` (both put this folder on ``sys.path``). Nothing
here imports ``miras``, so a broken build still lets the scripts print their own error rows.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

# ---- the variant grid (SPEC §3, §4) ---------------------------------------------------------
# Parameters chosen so that every branch is exercised on random data with unit-norm keys and
# v ~ N(0, 1) (so ||e||_2 starts near sqrt(Dv) and shrinks as the memory learns).


def bias_grid(dv: int):
    r = math.sqrt(dv)
    return [
        ("dot", dict(bias="dot")),
        ("l2", dict(bias="l2")),
        ("lp", dict(bias="lp", p=3.0)),
        ("huber-yaad", dict(bias="huber", huber_mode="yaad", delta=0.75 * r)),
        ("huber-coord", dict(bias="huber", huber_mode="coord", delta=1.0)),
        ("huber-norm", dict(bias="huber", huber_mode="norm", delta=0.75 * r)),
        ("robust", dict(bias="robust", robust_delta=1.0)),
    ]


RETENTION_GRID = [
    ("l2", dict(retention="l2")),
    ("kl", dict(retention="kl", kl_scale=1.0)),
    ("elastic_net", dict(retention="elastic_net", gamma=1e-3)),
    ("lq", dict(retention="lq", q_norm=4.0)),
]


def variant_grid(dv: int, biases: Optional[Sequence[str]] = None, retentions: Optional[Sequence[str]] = None,
                 momentum: Sequence[bool] = (False, True)) -> List[dict]:
    out = []
    for bname, bkw in bias_grid(dv):
        if biases is not None and bname not in biases:
            continue
        for rname, rkw in RETENTION_GRID:
            if retentions is not None and rname not in retentions:
                continue
            for mom in momentum:
                out.append(dict(name=f"{bname}/{rname}/{'mom' if mom else 'nomom'}", bias=bname, retention=rname,
                                momentum=mom, kwargs={**bkw, **rkw}))
    return out


# ---- inputs -----------------------------------------------------------------------------------
def make_inputs(B: int, T: int, H: int, Dk: int, Dv: int, *, dtype, device, momentum: bool, seed: int = 0,
                gate_dtype=None):
    """Random inputs, never zeros. k is unit-norm per head (as fla's use_qk_l2norm), so that the
    gates of the issue (lr in [0.05, 0.5], alpha in [0.7, 1], momentum in [0, 0.9]) give a stable
    inner loop. Returns a dict of leaf tensors (no grad)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    gd = gate_dtype or dtype

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    def ru(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float32)

    q = rn(B, T, H, Dk)
    k = torch.nn.functional.normalize(rn(B, T, H, Dk), dim=-1)
    v = rn(B, T, H, Dv)
    lr = ru(0.05, 0.5, B, T, H)
    alpha = ru(0.7, 1.0, B, T, H)
    mom = ru(0.0, 0.9, B, T, H) if momentum else None
    do = rn(B, T, H, Dv)
    out = dict(q=q.to(device, dtype), k=k.to(device, dtype), v=v.to(device, dtype), lr=lr.to(device, gd),
               alpha=alpha.to(device, gd), momentum=None if mom is None else mom.to(device, gd),
               do=do.to(device, dtype))
    return out


# the differentiable inputs: the op's tensors, then the MLP memory's (present only for memory="mlp")
DIFF_NAMES = ("q", "k", "v", "lr", "alpha", "momentum", "W1", "W2", "ln_weight", "ln_bias")


def grad_leaves(inp: dict) -> dict:
    """Copies of the differentiable inputs with requires_grad set."""
    out = dict(inp)
    for name in diff_names(inp):
        out[name] = inp[name].detach().clone().requires_grad_(True)
    return out


def diff_names(inp: dict) -> List[str]:
    return [n for n in DIFF_NAMES if inp.get(n) is not None]


def add_mlp_memory(inp: dict, H: int, D: int, expansion: int, retention: str, q_norm: float = 4.0,
                   seed: int = 0) -> dict:
    """The MLP memory's initial weights (raw states, as miras.nn.MirasLayer initialises them: z = k W1 ~ N(0, 1)
    for unit keys, W2 at fan-in scale) and its LayerNorm affine, added to ``inp`` (one set per head, expanded
    over the batch)."""
    g = torch.Generator(device="cpu").manual_seed(seed + 17)
    Dh = expansion * D
    dev, dt = inp["q"].device, inp["q"].dtype
    W1 = torch.randn(H, D, Dh, generator=g)
    W2 = torch.randn(H, Dh, D, generator=g) / math.sqrt(Dh)

    def raw(W):  # φ(raw) = W where the retention allows it (miras.nn.MirasLayer._raw_from_weights)
        if retention == "kl":
            return W / W.std()
        if retention == "lq" and q_norm not in (2.0, 3.0):
            nq = W.abs().pow(q_norm).sum((-2, -1), keepdim=True).pow(1.0 / q_norm)
            return W * nq.pow((q_norm - 2.0) / (3.0 - q_norm))
        return W

    B = inp["q"].shape[0]
    out = dict(inp)
    out["W1"] = raw(W1).to(dev, torch.float32)[None].expand(B, -1, -1, -1).contiguous()
    out["W2"] = raw(W2).to(dev, torch.float32)[None].expand(B, -1, -1, -1).contiguous()
    out["ln_weight"] = (1.0 + 0.1 * torch.randn(H, D, generator=g)).to(dev, dt)
    out["ln_bias"] = (0.1 * torch.randn(H, D, generator=g)).to(dev, dt)
    return out


# ---- errors -----------------------------------------------------------------------------------
def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (inf if either has non-finite entries)."""
    x = x.detach().double()
    ref = ref.detach().double()
    if not bool(torch.isfinite(x).all()) or not bool(torch.isfinite(ref).all()):
        return float("inf")
    den = ref.norm().item()
    num = (x - ref).norm().item()
    return num / den if den > 0 else num


def max_rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (the element-wise worst case, scaled by the reference's range)."""
    x = x.detach().double()
    ref = ref.detach().double()
    if not bool(torch.isfinite(x).all()) or not bool(torch.isfinite(ref).all()):
        return float("inf")
    den = ref.abs().max().item()
    num = (x - ref).abs().max().item()
    return num / den if den > 0 else num


# ---- timing -----------------------------------------------------------------------------------
def time_cpu(fn: Callable[[], object], *, warmup: int, reps: int, min_reps: int = 3,
             budget_s: float = float("inf"), prior: Optional[List[float]] = None) -> Dict[str, float]:
    """Host wall-clock timing for CPU ops: ``warmup`` untimed calls, then timed calls until ``reps``
    (at least ``min_reps``; no new call once ``budget_s`` of timed calls have passed). ``prior``: times
    (seconds) of calls already made, counted as reps (used by --quick, where one call of the eager
    reference costs seconds). Returns median / min / max in milliseconds and the rep count."""
    for _ in range(warmup):
        fn()
    ts = list(prior or [])
    spent = sum(ts)
    while len(ts) < reps and (len(ts) < min_reps or spent < budget_s):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        ts.append(dt)
        spent += dt
    return _summary(ts)


def timed(fn: Callable[[], object]):
    """(fn(), seconds)"""
    t0 = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0


def time_cuda(fn: Callable[[], object], *, warmup: int, reps: int, min_reps: int = 3,
              budget_s: float = float("inf")) -> Dict[str, float]:
    """CUDA-event timing: each rep is bracketed by events on the current stream; median of reps
    after ``warmup`` untimed calls (which also absorb compilation / autotuning)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    t_start = time.perf_counter()
    for i in range(reps):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
        if i + 1 >= min_reps and time.perf_counter() - t_start > budget_s:
            break
    return _summary(ts)


def _summary(ts: List[float]) -> Dict[str, float]:
    ms = [t * 1e3 for t in ts]
    return dict(median_ms=statistics.median(ms), min_ms=min(ms), max_ms=max(ms), reps=len(ms))


# ---- environment / output ---------------------------------------------------------------------
def environment() -> dict:
    env = dict(python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads(),
               machine=platform.machine(), processor=_cpu_model(), time_utc=time.strftime("%Y-%m-%d %H:%M:%S",
                                                                                          time.gmtime()))
    try:
        env["loadavg"] = list(os.getloadavg())
    except (OSError, AttributeError):
        env["loadavg"] = None
    env["cpus"] = os.cpu_count()
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        p = torch.cuda.get_device_properties(0)
        env["sms"] = p.multi_processor_count
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json(path: str, obj) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, torch.dtype):
        return str(o)
    return str(o)


def fmt(x, spec: str = ".3f", none: str = "-") -> str:
    if x is None:
        return none
    if isinstance(x, str):
        return x
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec)


def short_err(e: BaseException, n: int = 70) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    return "error: " + (msg if len(msg) <= n else msg[: n - 3] + "...")
