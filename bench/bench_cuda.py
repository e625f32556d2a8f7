#!/usr/bin/env python3
"""GPU benchmark (run it on the GPU machine: bench/device_check.sh calls it).

The issue's comparison, in one run, bfloat16 inputs (gates float32), chunk 64:

  shapes (B, T, H, D): (8, 2048, 16, 128), (2, 8192, 16, 128), (8, 2048, 32, 64)
  ours     miras.memory_update: every bias with retention l2, momentum off; momentum on for l2, lp
  eager    miras.reference.memory_update_chunked on the GPU (bf16 in, float32 compute), first shape
           only, few repeats (it launches hundreds of small kernels per call)
  fla      flash-linear-attention 0.5.2 (if importable): chunk_simple_gla, chunk_gated_delta_rule,
           chunk_ttt_linear

Forward (under no_grad) and forward+backward (torch.autograd.grad of the output against a fixed
random cotangent), CUDA-event timing, median of repeats after warm-up (the warm-up absorbs Triton
compilation and autotuning). Tokens/s = B*T / time. Then the roofline floor of the first shape
from a measured copy bandwidth and a measured bf16 matmul rate, and the issue's targets at
(8, 2048, 16, 128): fwd <= 0.30 ms, fwd+bwd <= 2.0 ms (l2 and lp, no momentum), >= 30x faster than
eager fwd+bwd on every bias, momentum costing <= 30% more.

fla note: fla 0.5.2 refuses the gated backward on Hopper with Triton in [3.4, 3.7.1) (its issue
#640: wrong results). For *timing only* this script sets
``fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True`` (printed when done); fla's gradients in such
a run are not to be trusted, only its times.

Every row is computed in its own try block: a failing variant prints 'error: ...' and the run goes
on. A soft time budget (--budget-s) skips the optional parts (eager, fla) once exceeded; ours
always runs.

  python3 bench/bench_cuda.py --out OUTDIR         # writes OUTDIR/bench_cuda.json and .md
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import (environment, fmt, make_inputs, rel_err, short_err, time_cpu, time_cuda,  # noqa: E402
                    write_json)

SHAPES = [(8, 2048, 16, 128), (2, 8192, 16, 128), (8, 2048, 32, 64)]
CHUNK = 64
TARGET_FWD_MS = 0.30
TARGET_FB_MS = 2.0
TARGET_EAGER_X = 30.0
TARGET_MOM = 1.30
T0 = time.perf_counter()
DEVICE = "cuda"  # --device cpu: a smoke test of this script's logic on a machine without a GPU


def timer(fn, **kw):
    return time_cuda(fn, **kw) if DEVICE == "cuda" else time_cpu(fn, **kw)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def empty_cache():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def elapsed():
    return time.perf_counter() - T0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="miras GPU benchmark")
    ap.add_argument("--out", default=None, help="folder for bench_cuda.json and bench_cuda.md")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--eager-reps", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=170.0,
                    help="soft limit: after this many seconds the optional parts (eager, fla) are skipped")
    ap.add_argument("--shapes", default=None, help="e.g. '8,2048,16,128;2,8192,16,128' (default: the issue's)")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--eager-all-shapes", action="store_true", help="time the eager reference at every shape")
    ap.add_argument("--no-roofline", action="store_true")
    ap.add_argument("--no-extra", action="store_true",
                    help="skip the extra first-shape rows (scan family forced on l2; kl, elastic_net, lq)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--quick", action="store_true", help="first shape only, 5 reps (a smoke test)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: check this script's logic without a GPU (use tiny --shapes; times meaningless)")
    return ap.parse_args(argv)


# ---- variants ---------------------------------------------------------------------------------
def ours_variants(dv):
    r = math.sqrt(dv)
    b = [
        ("dot", dict(bias="dot")),
        ("l2", dict(bias="l2")),
        ("lp", dict(bias="lp", p=3.0)),
        ("huber-yaad", dict(bias="huber", huber_mode="yaad", delta=0.75 * r)),
        ("huber-coord", dict(bias="huber", huber_mode="coord", delta=1.0)),
        ("huber-norm", dict(bias="huber", huber_mode="norm", delta=0.75 * r)),
        ("robust", dict(bias="robust", robust_delta=1.0)),
    ]
    out = [(f"{n}/l2/nomom", kw, False) for n, kw in b]
    out += [(f"{n}/l2/mom", kw, True) for n, kw in b if n in ("l2", "lp")]
    return out


# ---- helpers ----------------------------------------------------------------------------------
def leaves_of(inp, names):
    return {n: inp[n].detach().clone().requires_grad_(True) for n in names if inp[n] is not None}


def run_timed(name, kind, shape, fwd_fn, fb_fn, args, reps=None, warmup=None, budget_s=20.0):
    """One table row: fwd and fwd+bwd, each in its own try."""
    B, T, H, D = shape
    row = dict(name=name, kind=kind, shape=list(shape))
    reps = reps or args.reps
    warmup = args.warmup if warmup is None else warmup
    try:
        with torch.no_grad():
            row["fwd"] = timer(fwd_fn, warmup=warmup, reps=reps, budget_s=budget_s)
        row["fwd_tok_s"] = B * T / (row["fwd"]["median_ms"] * 1e-3)
    except Exception as e:  # noqa: BLE001
        row["fwd_error"] = short_err(e)
        _recover()
    if fb_fn is not None:
        try:
            row["fb"] = timer(fb_fn, warmup=warmup, reps=reps, budget_s=budget_s)
            row["fb_tok_s"] = B * T / (row["fb"]["median_ms"] * 1e-3)
        except Exception as e:  # noqa: BLE001
            row["fb_error"] = short_err(e)
            _recover()
    return row


def _recover():
    try:
        sync()
    except Exception:  # noqa: BLE001
        pass
    empty_cache()


# ---- ours / eager -----------------------------------------------------------------------------
def extra_variants(dv):
    """Beyond the issue's list (first shape, when the budget allows): the exact float32 scan family
    forced on the l2 retention (MIRAS_CUDA_PATH=scan, to see what the tensor-core path buys), and the
    map-based retentions, which only the scan family runs."""
    b = {n: kw for n, kw, _ in ours_variants(dv)}
    out = [(n.replace("/nomom", "/nomom [scan]"), b[n], False, "scan") for n in ("l2/l2/nomom", "lp/l2/nomom")]
    out += [("l2/kl/nomom", dict(bias="l2", retention="kl"), False, None),
            ("l2/elastic_net/nomom", dict(bias="l2", retention="elastic_net", gamma=1e-3), False, None),
            ("l2/lq/nomom", dict(bias="l2", retention="lq", q_norm=4.0), False, None)]
    return out


class cuda_path:
    """Sets MIRAS_CUDA_PATH (read by the dispatcher on every call) for a block; None leaves it alone."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.old = os.environ.get("MIRAS_CUDA_PATH")
        if self.path:
            os.environ["MIRAS_CUDA_PATH"] = self.path

    def __exit__(self, *exc):
        if self.path:
            if self.old is None:
                os.environ.pop("MIRAS_CUDA_PATH", None)
            else:
                os.environ["MIRAS_CUDA_PATH"] = self.old
        return False


def ours_rows(shape, inp, args, miras, reference, do_eager, budget_ok, results, variants=None):
    B, T, H, D = shape
    names_all = ("q", "k", "v", "lr", "alpha", "momentum")
    if variants is None:
        variants = [(n, kw, mom, None) for n, kw, mom in ours_variants(D)]
    for vname, kw, mom, path in variants:
        if path is not None and not budget_ok():
            results.append(dict(name=vname, kind="ours", shape=list(shape), skipped="time budget"))
            print(format_row(results[-1]), flush=True)
            continue
        kw = dict(kw, chunk_size=CHUNK)
        names = [n for n in names_all if n != "momentum" or mom]
        lv = leaves_of(inp, names)
        leaves = [lv[n] for n in names]
        do = inp["do"]

        def call(fn, t, check=False):
            extra = {} if fn is reference.memory_update_chunked else dict(check_inputs=check)
            return fn(t["q"], t["k"], t["v"], t["lr"], t["alpha"], t.get("momentum") if mom else None,
                      **kw, **extra)[0]

        def mk(fn):
            return (lambda: call(fn, inp)), (lambda: torch.autograd.grad(call(fn, lv), leaves, do))

        # One validated call (check_inputs=True) first: bad gates would raise here, not be timed.
        row = None
        with cuda_path(path):
            try:
                with torch.no_grad():
                    o = call(miras.memory_update, inp, check=True)
                sync()
                finite = bool(torch.isfinite(o).all())
            except Exception as e:  # noqa: BLE001
                row = dict(name=vname, kind="ours", shape=list(shape), error=short_err(e))
                _recover()
            if row is None:
                f, fb = mk(miras.memory_update)
                row = run_timed(vname, "ours", shape, f, fb, args)
                row["finite"] = finite
        if path:
            row["cuda_path"] = path
        results.append(row)
        print(format_row(row), flush=True)

        if do_eager and "error" not in row:
            if not budget_ok():
                er = dict(name=vname, kind="eager", shape=list(shape), skipped="time budget")
            else:
                f, fb = mk(reference.memory_update_chunked)
                er = run_timed(vname, "eager", shape, f, fb, args, reps=args.eager_reps, warmup=1, budget_s=3.0)
                # ours vs eager (float32 compute) on the same inputs: output and gradients
                try:
                    with torch.no_grad():
                        o_ref = call(reference.memory_update_chunked, inp)
                    er["err_o_ours_vs_eager"] = rel_err(o, o_ref)
                    g1 = torch.autograd.grad(call(miras.memory_update, lv), leaves, do)
                    g2 = torch.autograd.grad(call(reference.memory_update_chunked, lv), leaves, do)
                    er["err_grad_ours_vs_eager"] = {n: rel_err(a, b) for n, a, b in zip(names, g1, g2)}
                    del g1, g2, o_ref
                except Exception as e:  # noqa: BLE001
                    er["err_error"] = short_err(e)
                    _recover()
                if "fb" in er and "fb" in row:
                    row["x_eager_fb"] = er["fb"]["median_ms"] / row["fb"]["median_ms"]
                if "fwd" in er and "fwd" in row:
                    row["x_eager_fwd"] = er["fwd"]["median_ms"] / row["fwd"]["median_ms"]
                row["err_o_vs_eager"] = er.get("err_o_ours_vs_eager")
                ge = er.get("err_grad_ours_vs_eager")
                row["err_grad_vs_eager"] = max(ge.values()) if ge else None
            results.append(er)
            print(format_row(er), flush=True)
            _recover()
        del lv, leaves


# ---- fla --------------------------------------------------------------------------------------
def load_fla():
    """Returns (dict name -> fn, note)."""
    notes = []
    try:
        import fla  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return {}, f"fla n/a ({type(e).__name__}: {e})"
    ver = getattr(sys.modules["fla"], "__version__", "?")
    notes.append(f"fla {ver}")
    try:
        import fla.ops.common.chunk_o as co

        if hasattr(co, "TRITON_ABOVE_3_7_1"):
            if not co.TRITON_ABOVE_3_7_1:
                co.TRITON_ABOVE_3_7_1 = True
                notes.append("set fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1=True (timing only; fla's gated bwd "
                             "grads untrusted on this Triton)")
        else:
            notes.append("fla.ops.common.chunk_o has no TRITON_ABOVE_3_7_1 (not patched)")
    except Exception as e:  # noqa: BLE001
        notes.append(f"could not patch chunk_o ({type(e).__name__}: {e})")
    fns = {}
    for name, mod, attr in (("fla simple_gla", "fla.ops.simple_gla", "chunk_simple_gla"),
                            ("fla gated_delta", "fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
                            ("fla ttt_linear", "fla.ops.ttt", "chunk_ttt_linear")):
        try:
            m = __import__(mod, fromlist=[attr])
            fns[name] = getattr(m, attr)
        except Exception as e:  # noqa: BLE001
            notes.append(f"{name} n/a ({type(e).__name__}: {e})")
    return fns, "; ".join(notes)


def fla_rows(shape, inp, args, fns, results):
    B, T, H, D = shape
    do = inp["do"]
    dt = inp["q"].dtype
    g = torch.log(inp["alpha"].float())                  # log decay [B, T, H], float32
    beta = inp["lr"].to(dt)                              # delta-rule step size
    eta = inp["lr"].to(dt).unsqueeze(-1)                 # ttt: [B, T, H, 1]
    w_ln = torch.ones(H, D, dtype=dt, device=inp["q"].device)
    b_ln = torch.zeros(H, D, dtype=dt, device=inp["q"].device)
    base = dict(q=inp["q"], k=inp["k"], v=inp["v"], g=g, beta=beta, eta=eta)
    for name, fn in fns.items():
        chunks = [CHUNK]
        if name == "fla simple_gla":
            names = ["q", "k", "v", "g"]

            def call(t, C, fn=fn):
                return fn(t["q"], t["k"], t["v"], g=t["g"], chunk_size=C)[0]
        elif name == "fla gated_delta":
            names = ["q", "k", "v", "g", "beta"]

            def call(t, C, fn=fn):
                return fn(t["q"], t["k"], t["v"], t["g"], t["beta"], chunk_size=C)[0]
        else:  # ttt_linear: LayerNorm weight/bias [H, D] (not trained here), eta [B, T, H, 1]; its default chunk is 16
            names = ["q", "k", "v", "eta"]
            chunks = [CHUNK, 16]

            def call(t, C, fn=fn):
                return fn(t["q"], t["k"], t["v"], w_ln, b_ln, t["eta"], chunk_size=C)[0]
        lv = {n: base[n].detach().clone().requires_grad_(True) for n in names}
        lt = dict(base, **lv)
        leaves = [lv[n] for n in names]
        for C in chunks:
            label = name if C == CHUNK else f"{name} C={C}"
            row = run_timed(label, "fla", shape, lambda: call(base, C),
                            lambda: torch.autograd.grad(call(lt, C), leaves, do), args, warmup=2, budget_s=10.0)
            row["chunk"] = C
            results.append(row)
            print(format_row(row), flush=True)
            _recover()
            if "fwd_error" not in row and "fb_error" not in row:
                break
        del lv, lt, leaves


# ---- roofline ---------------------------------------------------------------------------------
def roofline(shape, args):
    out = {}
    try:
        n = 1 << 29  # 1 GiB of bf16
        if DEVICE != "cuda":
            n = 1 << 22
        x = torch.randn(n, device=DEVICE, dtype=torch.bfloat16)
        y = torch.empty_like(x)
        t = timer(lambda: y.copy_(x), warmup=3, reps=10)
        out["copy_GBps"] = 2 * n * 2 / (t["median_ms"] * 1e-3) / 1e9
        del x, y
    except Exception as e:  # noqa: BLE001
        out["copy_error"] = short_err(e)
    try:
        m = 8192 if DEVICE == "cuda" else 256
        a = torch.randn(m, m, device=DEVICE, dtype=torch.bfloat16)
        b = torch.randn(m, m, device=DEVICE, dtype=torch.bfloat16)
        t = timer(lambda: torch.matmul(a, b), warmup=3, reps=10)
        out["matmul_TFLOPs"] = 2 * m ** 3 / (t["median_ms"] * 1e-3) / 1e12
        del a, b
    except Exception as e:  # noqa: BLE001
        out["matmul_error"] = short_err(e)
    empty_cache()
    B, T, H, D = shape
    C = CHUNK
    Dk = Dv = D
    e = 2  # bf16 bytes
    tok = B * T * H
    io_fwd = 4 * tok * D * e                      # q, k, v read, o written
    gates = 2 * tok * 4                           # lr, alpha (float32)
    states_chunks = B * (T // C) * H * Dk * Dv * 4  # chunk-start states saved for backward (float32)
    final_state = B * H * Dk * Dv * 4
    flops_tok = 6 * Dk * Dv + 2 * C * (Dk + Dv)   # K S0, Q S0, S update (3 x 2 Dk Dv) + QK^T, A Psi (2 C (Dk+Dv))
    flops_fwd = tok * flops_tok
    io_bwd = 7 * tok * D * e + 2 * gates          # q, k, v, do read; dq, dk, dv written; gates and their grads
    out.update(dict(
        bytes_fwd=io_fwd + gates + final_state,
        bytes_fwd_train=io_fwd + gates + states_chunks,
        bytes_fb=io_fwd + gates + states_chunks + io_bwd + states_chunks,
        flops_fwd=flops_fwd,
        flops_fb=3 * flops_fwd,
        model=("bytes: each input read once, each output written once (bf16 q,k,v,o; float32 gates; fwd_train "
               "adds the float32 chunk-start states written for backward, fwd+bwd reads them back). FLOPs: the "
               "chunked dual form of retention l2 per chunk = 6 C Dk Dv + 2 C^2 (Dk + Dv); fwd+bwd = 3x fwd "
               "(no recompute counted)"),
    ))
    if "copy_GBps" in out and "matmul_TFLOPs" in out:
        bw = out["copy_GBps"] * 1e9
        fr = out["matmul_TFLOPs"] * 1e12
        for k, bk, fk in (("fwd", "bytes_fwd", "flops_fwd"), ("fwd_train", "bytes_fwd_train", "flops_fwd"),
                          ("fb", "bytes_fb", "flops_fb")):
            tb, tf = out[bk] / bw * 1e3, out[fk] / fr * 1e3
            out[f"floor_{k}_ms"] = max(tb, tf)
            out[f"floor_{k}_bytes_ms"] = tb
            out[f"floor_{k}_flops_ms"] = tf
    return out


# ---- reporting --------------------------------------------------------------------------------
def _ms(row, k):
    return row[k]["median_ms"] if k in row else None


def format_row(r) -> str:
    shp = "x".join(str(s) for s in r["shape"])
    head = f"{shp:<16} {r['kind']:<5} {r['name']:<20}"
    if "error" in r:
        return f"{head} {r['error']}"
    if "skipped" in r:
        return f"{head} skipped ({r['skipped']})"
    s = (f"{head} {fmt(_ms(r, 'fwd'), '8.3f'):>8} {fmt(_mtok(r, 'fwd_tok_s'), '9.4g'):>9}"
         f" {fmt(_ms(r, 'fb'), '8.3f'):>8} {fmt(_mtok(r, 'fb_tok_s'), '9.4g'):>9}")
    if "x_eager_fb" in r or "x_eager_fwd" in r:
        s += f"  x eager fwd {fmt(r.get('x_eager_fwd'), '.1f')} f+b {fmt(r.get('x_eager_fb'), '.1f')}"
    if r.get("err_o_vs_eager") is not None:
        s += f"  err o {r['err_o_vs_eager']:.1e} grad {fmt(r.get('err_grad_vs_eager'), '.1e')}"
    for k in ("fwd_error", "fb_error", "err_error"):
        if k in r:
            s += f"  [{k}: {r[k]}]"
    if r.get("finite") is False:
        s += "  [non-finite output]"
    return s


HEADER = (f"{'shape BxTxHxD':<16} {'kind':<5} {'variant':<20} {'fwd ms':>8} {'fwd Mtok/s':>9} {'f+b ms':>8} "
          f"{'f+b Mtok/s':>9}")


def targets(results, shape):
    rows = {(r["kind"], r["name"]): r for r in results if tuple(r["shape"]) == tuple(shape)}
    checks = []

    def add(what, val, limit, ok):
        checks.append(dict(check=what, value=val, limit=limit, ok=ok))

    for b in ("l2", "lp"):
        r = rows.get(("ours", f"{b}/l2/nomom"), {})
        f, fb = _ms(r, "fwd"), _ms(r, "fb")
        add(f"{b}/l2/nomom fwd ms", f, f"<= {TARGET_FWD_MS}", f is not None and f <= TARGET_FWD_MS)
        add(f"{b}/l2/nomom fwd+bwd ms", fb, f"<= {TARGET_FB_MS}", fb is not None and fb <= TARGET_FB_MS)
        m = rows.get(("ours", f"{b}/l2/mom"), {})
        for k, lab in (("fwd", "fwd"), ("fb", "fwd+bwd")):
            a, c = _ms(r, k), _ms(m, k)
            ratio = c / a if (a and c) else None
            add(f"{b} momentum/no-momentum {lab}", ratio, f"<= {TARGET_MOM}", ratio is not None and ratio <= TARGET_MOM)
    for (kind, name), r in rows.items():
        if kind == "ours" and name.endswith("/l2/nomom"):
            x = r.get("x_eager_fb")
            add(f"{name} x eager fwd+bwd", x, f">= {TARGET_EAGER_X}", x is not None and x >= TARGET_EAGER_X)
    return checks


def _first(*xs):
    for x in xs:
        if x is not None:
            return x
    return None


def _mtok(r, k):
    v = r.get(k)
    return None if v is None else v / 1e6


def markdown(res) -> str:
    L = ["# miras GPU benchmark" + ("" if res.get("complete") else " (INCOMPLETE: the run stopped early)"), ""]
    env = res["env"]
    L.append(f"- device: {env.get('gpu')} ({env.get('sms')} SMs), torch {env.get('torch')}, CUDA {env.get('cuda')}, "
             f"triton {env.get('triton')}; {res['fla_note']}")
    L.append(f"- {res['config']['dtype']} q/k/v, float32 gates, chunk {CHUNK}; {res['config']['timer']}, median of "
             f"{res['config']['reps']} reps after {res['config']['warmup']} warm-ups (eager: "
             f"{res['config']['eager_reps']} reps); run took {res['elapsed_s']:.0f} s")
    L.append("")
    L.append("| shape B,T,H,D | impl | variant | fwd ms | fwd Mtok/s | fwd+bwd ms | fwd+bwd Mtok/s | x eager fwd | "
             "x eager f+b | rel err o vs eager | rel err grad vs eager | note |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        note = r.get("error") or (f"skipped: {r['skipped']}" if "skipped" in r else "")
        for k in ("fwd_error", "fb_error", "err_error"):
            if k in r:
                note += f" {k}: {r[k]}"
        if r.get("finite") is False:
            note += " non-finite output"
        ge = r.get("err_grad_ours_vs_eager")
        err_o = _first(r.get("err_o_vs_eager"), r.get("err_o_ours_vs_eager"))
        err_g = _first(r.get("err_grad_vs_eager"), max(ge.values()) if ge else None)
        L.append("| " + " | ".join([
            ",".join(map(str, r["shape"])), r["kind"], r["name"], fmt(_ms(r, "fwd"), ".3f"),
            fmt(_mtok(r, "fwd_tok_s"), ".4g"), fmt(_ms(r, "fb"), ".3f"), fmt(_mtok(r, "fb_tok_s"), ".4g"),
            fmt(r.get("x_eager_fwd"), ".1f"), fmt(r.get("x_eager_fb"), ".1f"), fmt(err_o, ".1e"), fmt(err_g, ".1e"),
            note.strip().replace("|", "/")]) + " |")
    rf = res.get("roofline")
    if rf:
        L += ["", f"## Roofline floor at {tuple(res['shapes'][0])}", ""]
        L.append(f"- measured copy bandwidth {fmt(rf.get('copy_GBps'), '.0f')} GB/s (read+write), bf16 matmul "
                 f"8192^3 {fmt(rf.get('matmul_TFLOPs'), '.0f')} TFLOP/s")
        L.append(f"- model: {rf.get('model')}")
        for k, lab in (("fwd", "fwd (inference)"), ("fwd_train", "fwd (saving chunk states)"), ("fb", "fwd+bwd")):
            if f"floor_{k}_ms" in rf:
                fl = rf["flops_fb" if k == "fb" else "flops_fwd"]
                L.append(f"- {lab}: bytes {rf['bytes_' + k] / 1e6:.0f} MB -> {rf[f'floor_{k}_bytes_ms']:.3f} ms; "
                         f"FLOPs {fl / 1e9:.1f} G -> {rf[f'floor_{k}_flops_ms']:.3f} ms; "
                         f"floor {rf[f'floor_{k}_ms']:.3f} ms")
    L += ["", f"## Targets at {tuple(res['shapes'][0])}", "", "| check | value | target | ok |", "|---|---|---|---|"]
    for c in res["targets"]:
        L.append(f"| {c['check']} | {fmt(c['value'], '.3f')} | {c['limit']} | {'yes' if c['ok'] else 'NO'} |")
    return "\n".join(L) + "\n"


def save(res, args, shapes, final=False):
    """Write the JSON and markdown (also after each part, so a run killed by a timeout keeps what it
    measured)."""
    res["targets"] = targets(res["rows"], shapes[0])
    res["elapsed_s"] = elapsed()
    res["complete"] = final
    if not args.out:
        return
    try:
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "bench_cuda.json"), res)
        with open(os.path.join(args.out, "bench_cuda.md"), "w") as f:
            f.write(markdown(res))
    except Exception as e:  # noqa: BLE001
        print(f"could not write results: {short_err(e)}")


def main(argv=None):
    args = parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_cuda: no CUDA device; nothing to do")
        return 2
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    if args.quick:
        shapes, args.reps = shapes[:1], 5
    dtype = getattr(torch, args.dtype)
    env = environment()
    print(f"bench_cuda: {env.get('gpu')}, torch {env['torch']}, triton {env.get('triton')}", flush=True)
    try:
        import miras
        from miras import reference
        have = miras.has_cuda_kernels()
        print(f"miras {miras.__version__}, CUDA kernels built: {have}")
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        miras = reference = None
        print(f"cannot import miras: {e}")

    fns, fla_note = ({}, "fla skipped (--no-fla)") if args.no_fla else load_fla()
    print(fla_note, flush=True)
    results = []
    res = dict(env=env, shapes=[list(s) for s in shapes], fla_note=fla_note, rows=results,
               config=dict(dtype=args.dtype, chunk=CHUNK, warmup=args.warmup, reps=args.reps,
                           eager_reps=args.eager_reps, budget_s=args.budget_s,
                           timer="CUDA-event timing" if DEVICE == "cuda" else "host timing (--device cpu smoke test)"))

    def budget_ok():
        return elapsed() < args.budget_s

    if not args.no_roofline:
        try:
            res["roofline"] = roofline(shapes[0], args)
            rf = res["roofline"]
            print(f"roofline @ {shapes[0]}: copy {fmt(rf.get('copy_GBps'), '.0f')} GB/s, bf16 matmul "
                  f"{fmt(rf.get('matmul_TFLOPs'), '.0f')} TFLOP/s; floor fwd {fmt(rf.get('floor_fwd_ms'), '.3f')} ms, "
                  f"fwd(save states) {fmt(rf.get('floor_fwd_train_ms'), '.3f')} ms, fwd+bwd "
                  f"{fmt(rf.get('floor_fb_ms'), '.3f')} ms", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"roofline: {short_err(e)}")

    print(HEADER, flush=True)
    inputs = {}
    # 1) ours at every shape (with eager at the first shape), 2) fla, first shape first.
    for i, shape in enumerate(shapes):
        B, T, H, D = shape
        try:
            inp = make_inputs(B, T, H, D, D, dtype=dtype, device=DEVICE, momentum=True, seed=i,
                              gate_dtype=torch.float32)
        except Exception as e:  # noqa: BLE001
            results.append(dict(name="inputs", kind="-", shape=list(shape), error=short_err(e)))
            print(format_row(results[-1]))
            continue
        inputs[shape] = inp
        if miras is None:
            results.append(dict(name="all", kind="ours", shape=list(shape), error="error: miras not importable"))
            print(format_row(results[-1]))
        else:
            do_eager = not args.no_eager and (i == 0 or args.eager_all_shapes)
            ours_rows(shape, inp, args, miras, reference, do_eager, budget_ok, results)
            if i == 0 and not args.no_extra:
                ours_rows(shape, inp, args, miras, reference, False, budget_ok, results,
                          variants=extra_variants(D))
        save(res, args, shapes)
        if i > 0:
            del inputs[shape]  # keep GPU memory low; first shape's inputs are reused by fla below
            empty_cache()
    if fns:
        for i, shape in enumerate(shapes):
            if not budget_ok():
                results.append(dict(name="fla (all)", kind="fla", shape=list(shape), skipped="time budget"))
                print(format_row(results[-1]), flush=True)
                continue
            B, T, H, D = shape
            inp = inputs.get(shape)
            if inp is None:
                try:
                    inp = make_inputs(B, T, H, D, D, dtype=dtype, device=DEVICE, momentum=False, seed=i,
                                      gate_dtype=torch.float32)
                except Exception as e:  # noqa: BLE001
                    results.append(dict(name="fla inputs", kind="fla", shape=list(shape), error=short_err(e)))
                    continue
            try:
                fla_rows(shape, inp, args, fns, results)
            except Exception as e:  # noqa: BLE001
                results.append(dict(name="fla", kind="fla", shape=list(shape), error=short_err(e)))
                print(format_row(results[-1]), flush=True)
            save(res, args, shapes)
            inputs.pop(shape, None)
            del inp
            empty_cache()
    elif not args.no_fla:
        print("fla: n/a")

    save(res, args, shapes, final=True)
    print()
    print(f"targets at {shapes[0]}:")
    for c in res["targets"]:
        print(f"  {'ok ' if c['ok'] else 'NO '} {c['check']:<40} {fmt(c['value'], '.3f'):>8}  (target {c['limit']})")
    n_ok = sum(c["ok"] for c in res["targets"])
    print(f"targets met: {n_ok}/{len(res['targets'])}; bench_cuda took {res['elapsed_s']:.0f} s")
    if args.out:
        print(f"wrote {args.out}/bench_cuda.json and bench_cuda.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
