#!/usr/bin/env python3
"""CPU benchmark: the C++ op (``miras.memory_update``) against the eager chunked PyTorch reference
(``miras.reference.memory_update_chunked``), for every variant:

    bias {dot, l2, lp, huber(yaad), huber(coord), huber(norm), robust}
  x retention {l2, kl, elastic_net, lq}  x  momentum {off, on}          = 56 variants

Shape B=2, T=1024, H=4, D=64, chunk 64, float32 (``--quick``: T=256, fewer repeats; the same 56
variants). Forward (under ``torch.no_grad``) and forward+backward (``torch.autograd.grad`` of the
output against a fixed random cotangent, w.r.t. q, k, v, lr, alpha and momentum). Median of repeats
after a warm-up; host wall clock; both sides run with the same ``torch.get_num_threads()``.

The error columns compare ours with the reference *in the same run, both float32* (so they mix the
two implementations' float32 rounding; the float64 comparison lives in the tests):
  err_o     ||o_ours - o_ref|| / ||o_ref||
  maxerr_o  max|o_ours - o_ref| / max|o_ref|
  err_grad  the largest ||g_ours - g_ref|| / ||g_ref|| over the differentiable inputs

On a machine shared with other jobs, pass ``--threads 1``: with every core busy, 2-thread parallel
regions wait on descheduled threads and the timings swing by 10x (the header warns when the load
average exceeds 1.5x the core count).

MLP memory (``--mlp``, SPEC §6, M(x) = x + LN(GELU(x W1) W2)): the same table for memory="mlp" with
bias {l2, lp, huber(yaad)} x retention {l2, kl, lq} x momentum {off, on} (18 variants) at B=2, T=512, H=4,
Dk=Dv=32 (``--D``), expansion 4 (Dh = 128), chunk 64; initial weights as miras.nn initialises them,
a LayerNorm affine; fwd+bwd differentiates W1, W2, ln_weight and ln_bias too.

Usage:
  python bench/bench_cpu.py --quick                   # the README's main job (~1-3 min on 2 cores)
  python bench/bench_cpu.py --mlp --threads 2         # the MLP memory's table
  python bench/bench_cpu.py --json bench/out/cpu.json  # full run at the issue's shape
  python bench/bench_cpu.py --quick --only 'l2/l2'     # a subset (substring match on the name)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import (add_mlp_memory, diff_names, environment, fmt, grad_leaves, make_inputs,  # noqa: E402
                    max_rel_err, rel_err, short_err, time_cpu, timed, variant_grid, write_json)

MLP_BIASES = ("l2", "lp", "huber-yaad")
MLP_RETENTIONS = ("l2", "kl", "lq")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="T=256; per measurement up to 10 reps of ours / 3 of the reference within a 1 s budget,\n"
                         "the first (error-checking) call counted as a rep. All 56 variants. Measured: 66 s\n"
                         "with --threads 1 on a 2-core machine busy with other jobs (440-550 s there with 2\n"
                         "threads: OpenMP regions stall when the cores are oversubscribed)")
    ap.add_argument("--mlp", action="store_true",
                    help="the MLP memory (memory='mlp'): bias l2/lp/huber-yaad x retention l2/kl/lq x momentum")
    ap.add_argument("--expansion", type=int, default=4, help="MLP memory: Dh = expansion * D (default 4)")
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--T", type=int, default=None, help="default 1024 (256 with --quick; 512 with --mlp)")
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=None, help="head dim, default 64 (32 with --mlp)")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--reps", type=int, default=None,
                    help="max timed repeats of ours (default 20; 10 with --quick)")
    ap.add_argument("--reps-ref", type=int, default=None,
                    help="max timed repeats of the eager reference (default 7; 3 with --quick)")
    ap.add_argument("--min-reps", type=int, default=None, help="at least this many (default 3; 1 with --quick)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="extra untimed calls; the first call of each measurement (which computes the error\n"
                         "columns) is always a warm-up (full mode) or the first rep (--quick)")
    ap.add_argument("--budget", type=float, default=None,
                    help="no new rep once a measurement has spent this many seconds (after --min-reps);\n"
                         "default 5 (1 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--only", action="append", default=None, help="substring filter on variant names (repeatable)")
    ap.add_argument("--no-bwd", action="store_true", help="forward only")
    ap.add_argument("--json", default=None, help="write the results as JSON to this path")
    ap.add_argument("--md", default=None, help="write the table as markdown to this path")
    ap.add_argument("--from-json", default=None, help="only render --md (or print) from an earlier --json file")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def run_variant(var, inp, args, miras, reference):
    """One row. The first call of each (impl, pass) computes the outputs/gradients that the error
    columns compare; it is the warm-up in full mode, and in --quick mode it also counts as the first
    timed rep (one call of the eager reference costs up to seconds on 2 cores)."""
    kw = dict(var["kwargs"], chunk_size=args.chunk)
    row = dict(name=var["name"], bias=var["bias"], retention=var["retention"], momentum=var["momentum"])
    names = diff_names(inp)

    def tm(first_s, reps=None):
        return dict(warmup=args.warmup, reps=reps or args.reps, min_reps=args.min_reps, budget_s=args.budget,
                    prior=[first_s] if args.quick else None)

    def mem(t):  # the MLP memory's state and LayerNorm affine (nothing for the linear memory)
        if "W1" not in t:
            return {}
        return dict(memory="mlp", initial_state=miras.MemoryState(X=(t["W1"], t["W2"])), ln_weight=t["ln_weight"],
                    ln_bias=t["ln_bias"])

    def ours(t):
        return miras.memory_update(t["q"], t["k"], t["v"], t["lr"], t["alpha"], t["momentum"], **kw, **mem(t))[0]

    def ref(t):
        return reference.memory_update_chunked(t["q"], t["k"], t["v"], t["lr"], t["alpha"], t["momentum"], **kw,
                                               **mem(t))[0]

    # ---- forward (no_grad) ----
    with torch.no_grad():
        try:
            o_ours, t_ours = timed(lambda: ours(inp))
            row["finite_o"] = bool(torch.isfinite(o_ours).all())
        except Exception as e:  # noqa: BLE001
            row["error"] = short_err(e)
            return row
        try:
            o_ref, t_ref = timed(lambda: ref(inp))
            row["err_o"] = rel_err(o_ours, o_ref)
            row["maxerr_o"] = max_rel_err(o_ours, o_ref)
        except Exception as e:  # noqa: BLE001
            o_ref = None
            row["ref_error"] = short_err(e)
        row["ours_fwd"] = time_cpu(lambda: ours(inp), **tm(t_ours))
        if o_ref is not None:
            row["ref_fwd"] = time_cpu(lambda: ref(inp), **tm(t_ref, args.reps_ref))
            row["speedup_fwd"] = row["ref_fwd"]["median_ms"] / row["ours_fwd"]["median_ms"]
            row["speedup_fwd_min"] = row["ref_fwd"]["min_ms"] / row["ours_fwd"]["min_ms"]
    if args.no_bwd:
        return row

    # ---- forward + backward ----
    g_in = grad_leaves(inp)
    leaves = [g_in[n] for n in names]
    do = inp["do"]

    def fb(fn):
        return lambda: torch.autograd.grad(fn(g_in), leaves, do)

    try:
        g_ours, t_ours = timed(fb(ours))
    except Exception as e:  # noqa: BLE001
        row["error_bwd"] = short_err(e)
        return row
    g_ref = None
    if o_ref is not None:
        try:
            g_ref, t_ref = timed(fb(ref))
            by = {n: rel_err(a, b) for n, a, b in zip(names, g_ours, g_ref)}
            row["err_grad"] = max(by.values())
            row["err_grad_by_input"] = by
        except Exception as e:  # noqa: BLE001
            g_ref = None
            row["ref_error_bwd"] = short_err(e)
    row["ours_fb"] = time_cpu(fb(ours), **tm(t_ours))
    if g_ref is not None:
        row["ref_fb"] = time_cpu(fb(ref), **tm(t_ref, args.reps_ref))
        row["speedup_fb"] = row["ref_fb"]["median_ms"] / row["ours_fb"]["median_ms"]
        row["speedup_fb_min"] = row["ref_fb"]["min_ms"] / row["ours_fb"]["min_ms"]
    return row


HEADER = (f"{'variant':<34} {'ours fwd':>9} {'ref fwd':>9} {'x':>6} {'ours f+b':>9} {'ref f+b':>9} {'x':>6} "
          f"{'err_o':>8} {'maxerr_o':>8} {'err_grad':>8}")


def format_row(r) -> str:
    if "error" in r:
        return f"{r['name']:<34} {r['error']}"
    med = lambda k: r[k]["median_ms"] if k in r else None  # noqa: E731
    s = (f"{r['name']:<34} {fmt(med('ours_fwd'), '9.2f'):>9} {fmt(med('ref_fwd'), '9.2f'):>9} "
         f"{fmt(r.get('speedup_fwd'), '6.2f'):>6} {fmt(med('ours_fb'), '9.2f'):>9} {fmt(med('ref_fb'), '9.2f'):>9} "
         f"{fmt(r.get('speedup_fb'), '6.2f'):>6} {fmt(r.get('err_o'), '8.1e'):>8} {fmt(r.get('maxerr_o'), '8.1e'):>8} "
         f"{fmt(r.get('err_grad'), '8.1e'):>8}")
    for k in ("ref_error", "error_bwd", "ref_error_bwd"):
        if k in r:
            s += f"  [{k}: {r[k]}]"
    if r.get("finite_o") is False:
        s += "  [non-finite output]"
    return s


def _xmin(r, k):
    """Speedup from the fastest rep of each side (less sensitive to other jobs on a shared machine)."""
    a, b = r.get(f"ref_{k}"), r.get(f"ours_{k}")
    return a["min_ms"] / b["min_ms"] if a and b else None


def _min_xmin(rows):
    return min((x for r in rows for x in (_xmin(r, "fwd"), _xmin(r, "fb")) if x), default=None)


def markdown(res) -> str:
    c, env, s = res["config"], res["env"], res["summary"]
    load = env.get("loadavg")
    mlp = f"MLP memory (expansion {c['expansion']}), " if c.get("memory") == "mlp" else ""
    L = [f"{mlp}B={c['B']} T={c['T']} H={c['H']} D={c['D']}, chunk {c['chunk']}, float32, "
         f"{env.get('threads')} threads, "
         f"{env.get('processor')}; {'--quick' if c.get('quick') else 'full mode'}; median of up to {c['reps']} reps "
         f"(reference up to {c.get('reps_ref')}) within {c['budget_s']} s per measurement; load average at the start "
         f"{'/'.join(f'{x:.1f}' for x in load) if load else '?'}; {env.get('time_utc')} UTC; run took "
         f"{res.get('elapsed_s', 0):.0f} s.", "",
         "| variant | ours fwd ms | ref fwd ms | x fwd | ours f+b ms | ref f+b ms | x f+b | x fwd (min) | x f+b (min) "
         "| err_o | maxerr_o | err_grad |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            L.append(f"| {r['name']} | {r['error']} | | | | | | | | | | |")
            continue
        med = lambda k: r[k]["median_ms"] if k in r else None  # noqa: E731
        note = " ".join(f"{k}: {r[k]}" for k in ("ref_error", "error_bwd", "ref_error_bwd") if k in r)
        L.append("| " + " | ".join([r["name"] + (f" ({note})" if note else ""), fmt(med("ours_fwd"), ".2f"),
                                    fmt(med("ref_fwd"), ".2f"), fmt(r.get("speedup_fwd"), ".1f"),
                                    fmt(med("ours_fb"), ".2f"), fmt(med("ref_fb"), ".2f"),
                                    fmt(r.get("speedup_fb"), ".1f"), fmt(_xmin(r, "fwd"), ".1f"),
                                    fmt(_xmin(r, "fb"), ".1f"), fmt(r.get("err_o"), ".1e"),
                                    fmt(r.get("maxerr_o"), ".1e"), fmt(r.get("err_grad"), ".1e")]) + " |")

    def sp(x):
        return "n/a" if not x else f"{x[0]:.2f}x ({x[1]}, {x[2].replace('speedup_', '')})"

    L += ["", f"Min speedup overall: {sp(s['min_speedup'])}; on the l2-retention family: "
          f"{sp(s['min_speedup_l2_family'])}. Faster on every variant: "
          f"{'PASS' if s['pass_faster_everywhere'] else 'FAIL'}"
          + ("" if c.get("memory") == "mlp" else
             f"; >= 3x on the l2 family: {'PASS' if s['pass_l2_family_3x'] else 'FAIL'}")
          + f". Max err_o {fmt(s['max_err_o'], '.1e')}, max err_grad "
          f"{fmt(s['max_err_grad'], '.1e')}. From the fastest reps: min speedup {fmt(_min_xmin(res['rows']), '.2f')}x "
          f"overall, {fmt(_min_xmin([r for r in res['rows'] if r['retention'] == 'l2']), '.2f')}x on the l2 family."]
    return "\n".join(L) + "\n"


def summarize(rows):
    def speeds(rs):
        out = []
        for r in rs:
            for k in ("speedup_fwd", "speedup_fb"):
                if k in r:
                    out.append((r[k], r["name"], k))
        return out

    all_s = speeds(rows)
    l2_s = speeds([r for r in rows if r["retention"] == "l2"])
    failed = [r["name"] for r in rows if "error" in r or "error_bwd" in r]
    missing_ref = [r["name"] for r in rows if "error" not in r and ("speedup_fwd" not in r or
                                                                    ("speedup_fb" not in r and "error_bwd" not in r))]
    errs = [r["err_o"] for r in rows if "err_o" in r]
    gerrs = [r["err_grad"] for r in rows if "err_grad" in r]
    s = dict(
        variants=len(rows),
        failed=failed,
        incomplete=missing_ref,
        min_speedup=min(all_s) if all_s else None,
        min_speedup_fwd=min((x for x in all_s if x[2] == "speedup_fwd"), default=None),
        min_speedup_fb=min((x for x in all_s if x[2] == "speedup_fb"), default=None),
        min_speedup_l2_family=min(l2_s) if l2_s else None,
        max_err_o=max(errs) if errs else None,
        max_err_grad=max(gerrs) if gerrs else None,
    )
    s["pass_faster_everywhere"] = bool(all_s) and not failed and not missing_ref and s["min_speedup"][0] > 1.0
    s["pass_l2_family_3x"] = bool(l2_s) and s["min_speedup_l2_family"][0] >= 3.0 and not any(
        r["retention"] == "l2" for r in rows if r["name"] in failed)
    return s


def main(argv=None):
    args = parse_args(argv)
    if args.T is None:
        args.T = 256 if args.quick else (512 if args.mlp else 1024)
    if args.D is None:
        args.D = 32 if args.mlp else 64
    if args.reps is None:
        args.reps = 10 if args.quick else 20
    if args.reps_ref is None:
        args.reps_ref = 3 if args.quick else 7
    if args.min_reps is None:
        args.min_reps = 1 if args.quick else 3
    if args.budget is None:
        args.budget = 1.0 if args.quick else 5.0
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if args.from_json:
        import json

        with open(args.from_json) as f:
            res = json.load(f)
        text = markdown(res)
        if args.md:
            with open(args.md, "w") as f:
                f.write(text)
        else:
            print(text)
        return 0
    try:
        import miras
        from miras import reference
    except Exception as e:  # noqa: BLE001
        print(f"cannot import miras ({type(e).__name__}: {e}); build it first: pip install --no-build-isolation -e .")
        return 2

    B, T, H, D = args.B, args.T, args.H, args.D
    if args.mlp:
        variants = variant_grid(D, biases=MLP_BIASES, retentions=MLP_RETENTIONS)
        for v in variants:
            v["name"] = f"mlp-e{args.expansion}/{v['name']}"
    else:
        variants = variant_grid(D)
    if args.only:
        variants = [v for v in variants if any(s in v["name"] for s in args.only)]
    env = environment()
    what = f"MLP memory (Dh = {args.expansion * D}), " if args.mlp else ""
    print(f"miras CPU benchmark: {what}B={B} T={T} H={H} D={D} chunk={args.chunk} float32, {len(variants)} variants, "
          f"threads={env['threads']}, median of {args.min_reps}..{args.reps} reps (ref ..{args.reps_ref}) "
          f"within {args.budget:g} s "
          f"({'quick mode: the first call is a rep' if args.quick else 'full mode: after a warm-up call'})")
    load = env.get("loadavg")
    print(f"  torch {env['torch']}, {env['processor']}, {os.cpu_count()} cpus, load average "
          f"{'/'.join(f'{x:.1f}' for x in load) if load else '?'}")
    if load and load[0] > 1.5 * (os.cpu_count() or 1):
        print("  WARNING: the machine is loaded by other processes; timings are noisy"
              + ("" if torch.get_num_threads() == 1 else " (--threads 1 steadies them)"))
    print("  times in ms; x = ref/ours; errors: ours vs the eager reference, both float32, same inputs")
    print(HEADER)
    rows = []
    inputs = {}
    # Process-level warm-up (first-call costs: allocator, lazy init, OpenMP pool), so that the first
    # row's single-call reference timing in --quick mode is not inflated by them.
    if variants:
        try:
            warm = make_inputs(B, T, H, D, D, dtype=torch.float32, device="cpu", momentum=True,
                               seed=args.seed + 1)
            mkw = {}
            if args.mlp:
                warm = add_mlp_memory(warm, H, D, args.expansion, "l2", seed=args.seed + 1)
            gw = grad_leaves(warm)
            if args.mlp:
                mkw = dict(memory="mlp", initial_state=miras.MemoryState(X=(gw["W1"], gw["W2"])),
                           ln_weight=gw["ln_weight"], ln_bias=gw["ln_bias"])
            for fn in (miras.memory_update, reference.memory_update_chunked):
                for mom in (None, gw["momentum"]):
                    lw = [gw[n] for n in diff_names(gw) if n != "momentum" or mom is not None]
                    o = fn(gw["q"], gw["k"], gw["v"], gw["lr"], gw["alpha"], mom, chunk_size=args.chunk, **mkw)[0]
                    torch.autograd.grad(o, lw, warm["do"][:, :o.shape[1]])
        except Exception as e:  # noqa: BLE001
            print(f"  (warm-up failed: {short_err(e)})")
    for var in variants:
        key = (var["momentum"], var["retention"] if args.mlp else None)  # MLP raw states depend on the retention
        if key not in inputs:
            inputs[key] = make_inputs(B, T, H, D, D, dtype=torch.float32, device="cpu", momentum=var["momentum"],
                                      seed=args.seed)
            if args.mlp:
                inputs[key] = add_mlp_memory(inputs[key], H, D, args.expansion, var["retention"],
                                             q_norm=var["kwargs"].get("q_norm", 4.0), seed=args.seed)
        try:
            row = run_variant(var, inputs[key], args, miras, reference)
        except Exception as e:  # noqa: BLE001  (one broken variant must not stop the table)
            row = dict(name=var["name"], bias=var["bias"], retention=var["retention"], momentum=var["momentum"],
                       error=short_err(e))
        rows.append(row)
        print(format_row(row), flush=True)

    s = summarize(rows)
    elapsed = time.perf_counter() - t_start
    print()

    def sp(x):
        return "n/a" if x is None else f"{x[0]:.2f}x ({x[1]} {x[2].replace('speedup_', '')})"

    print(f"summary: min speedup overall {sp(s['min_speedup'])}; min speedup on the l2-retention family "
          f"{sp(s['min_speedup_l2_family'])}")
    print(f"         min fwd {sp(s['min_speedup_fwd'])}; min fwd+bwd {sp(s['min_speedup_fb'])}; "
          f"max err_o {fmt(s['max_err_o'], '.1e')}; max err_grad {fmt(s['max_err_grad'], '.1e')}")
    print(f"         from the fastest reps instead of medians: min speedup {fmt(_min_xmin(rows), '.2f')}x overall, "
          f"{fmt(_min_xmin([r for r in rows if r['retention'] == 'l2']), '.2f')}x on the l2 family")
    print(f"         requirement 'faster on every variant': {'PASS' if s['pass_faster_everywhere'] else 'FAIL'}"
          + ("" if args.mlp else
             f"; '>= 3x on the l2 retention family': {'PASS' if s['pass_l2_family_3x'] else 'FAIL'}")
          + (f"; failed variants: {len(s['failed'])}" if s['failed'] else "")
          + (f"; incomplete: {len(s['incomplete'])}" if s['incomplete'] else ""))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    env["loadavg_end"] = list(load) if load else None
    print(f"         {len(rows)} variants in {elapsed:.0f} s; load average at the end "
          f"{'/'.join(f'{x:.1f}' for x in load) if load else '?'}")
    res = None
    if args.json or args.md:
        res = dict(config=dict(B=B, T=T, H=H, D=D, chunk=args.chunk, dtype="float32", warmup=args.warmup,
                               memory="mlp" if args.mlp else "linear",
                               expansion=args.expansion if args.mlp else None,
                               reps=args.reps, reps_ref=args.reps_ref, min_reps=args.min_reps, budget_s=args.budget,
                               quick=args.quick, seed=args.seed, timer="host wall clock, median"),
                   env=env, rows=rows, summary=s, elapsed_s=elapsed)
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}")
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(res))
        print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
