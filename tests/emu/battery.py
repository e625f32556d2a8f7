"""Runs the emulator battery (tests/emu/cases.py) and writes one JSON result per case.

    python tests/emu/battery.py --lib build/libmiras_emu.so --profile ci --out results.json
        [--only NAME,...] [--invariance] [--faults]

Run by tests/test_emu.py in a subprocess (with the AddressSanitizer runtime preloaded when the
library is the checked build), so that a crash or a sanitizer report cannot take pytest down.

Comparison rule: tests/lowprec.py (flash-attention's rule against the float32 reference on the same
rounded inputs, shared with tests/test_cuda.py). Outputs start as NaN: an element no kernel
writes fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import torch  # noqa: E402

import cabi  # noqa: E402
import driver  # noqa: E402
from cases import Case, cases  # noqa: E402
from conftest import grads, leaves, loss_of, make_inputs, op_kwargs, state_of, upcast  # noqa: E402
from lowprec import fa_compare, k_for, separate_thresholds  # noqa: E402

from miras import reference as R  # noqa: E402

DT = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def seed_of(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def gen(case: Case):
    """(args64, kw64): unrounded float64 inputs; (args, kw): what the kernels get."""
    N = len(case.cu_seqlens) - 1 if case.cu_seqlens else None
    B = 1 if case.cu_seqlens else case.B
    args64, kw64 = make_inputs(B=B, T=case.T, H=case.H, Dk=case.Dk, Dv=case.Dv, dtype=torch.float64, seed=seed_of(case.name),
                               momentum=case.momentum, bias=case.bias, huber_mode=case.huber_mode,
                               retention=case.retention, tensor_params=case.tensor_params,
                               initial_state=case.initial_state, requires_grad=True, N=N)
    if case.bias == "huber" and case.huber_mode == "yaad":
        kw64["eps"] = 1e-2  # as make_inputs does for low precision (the yaad VJP's conditioning)
    io = DT[case.dtype]
    if case.bias == "huber" and case.retention == "l2" and case.tensor_params:
        separate_thresholds(args64, kw64, case.C, case.cu_seqlens, case.huber_mode)

    def rnd(t, dt):
        return None if t is None else t.detach().to(dt).requires_grad_(True)

    args = [rnd(t, io if i < 3 else torch.float32) for i, t in enumerate(args64)]
    kw = {k: (rnd(v, torch.float32) if isinstance(v, torch.Tensor) else v) for k, v in kw64.items()}
    return args64, kw64, args, kw


def reference(args, kw, C, cot, dtype, cu=None):
    a, k = upcast(args, dtype), upcast(kw, dtype)
    extra = {"cu_seqlens": cu} if cu is not None else {}
    o, s = R.memory_update_chunked(*a, **op_kwargs(k), chunk_size=C, initial_state=state_of(k), output_final_state=True,
                                   **extra)
    g = grads(loss_of(o, s, {n: v.to(dtype) for n, v in cot.items()}), leaves(a, k))
    return o, s, g


def compare(case, named, low):
    return fa_compare(named, low, k_for(case.bias, case.huber_mode))


def run_update(emu, case: Case):
    args64, kw64, args, kw = gen(case)
    C = case.C
    cu = torch.tensor(case.cu_seqlens, dtype=torch.int64) if case.cu_seqlens else None
    # cotangents, rounded as the kernels receive them (dO in the input dtype; dXT, dPT float32)
    o_shape = (args64[0].shape[0], case.T, case.H, case.Dv)
    N = len(case.cu_seqlens) - 1 if case.cu_seqlens else case.B
    g = torch.Generator().manual_seed(seed_of(case.name) + 7919)
    cot = {"o": torch.randn(o_shape, generator=g, dtype=torch.float64).to(DT[case.dtype]).double(),
           "X": torch.randn((N, case.H, case.Dk, case.Dv), generator=g, dtype=torch.float64).float().double()}
    if case.momentum:
        cot["P"] = torch.randn((N, case.H, case.Dk, case.Dv), generator=g, dtype=torch.float64).float().double()
    o_t, s_t, g_t = reference(args64, kw64, C, cot, torch.float64, cu)
    o_p, s_p, g_p = reference(args, kw, C, cot, torch.float32, cu)
    o, XT, PT, AT, off, gr = driver.update(emu, args, kw, C, cot, cu_seqlens=cu, offsets=case.kind != "gating")
    named = [("o", o, o_t, o_p), ("XT", XT, s_t.X, s_p.X), ("AT", AT, s_t.anchor, s_p.anchor)]
    if case.momentum:
        named.append(("PT", PT, s_t.P, s_p.P))
    for n in g_t:
        if n not in gr:
            return False, {n: {"why": "no gradient returned"}}, {}
        named.append(("d" + n, gr[n], g_t[n], g_p[n]))
    ok, errs = compare(case, named, case.dtype != "f32")
    if off is not None and not torch.equal(off.cpu(), s_t.offset.cpu().long()):
        ok = False
        errs["offset"] = {"why": f"offsets {off.tolist()} != {s_t.offset.tolist()}"}
    outs = {"o": o, "XT": XT, "AT": AT, **{"d" + n: v for n, v in gr.items()}}
    return ok, errs, outs


def run_step(emu, case: Case):
    """Prefill T0 tokens with the chunk op, then one miras_step per token; == the full reference."""
    args64, kw64, args, kw = gen(case)
    C, T = case.C, case.T
    T0 = T // 2 + 1
    a64, k64 = upcast(args64), upcast(kw64)
    o_t, s_t = R.memory_update_chunked(*a64, **op_kwargs(k64), chunk_size=C, initial_state=state_of(k64),
                                       output_final_state=True)
    a32, k32 = upcast(args, torch.float32), upcast(kw, torch.float32)
    o_p, s_p = R.memory_update_chunked(*a32, **op_kwargs(k32), chunk_size=C, initial_state=state_of(k32),
                                       output_final_state=True)

    def sl(t, a, b):
        return None if t is None else t[:, a:b]

    pre_args = [sl(t, 0, T0) for t in args]
    pre_kw = {k: (sl(v, 0, T0) if isinstance(v, torch.Tensor) and not k.startswith("_") else v) for k, v in kw.items()}
    o_pre, XT, PT, AT, off, _ = driver.update(emu, pre_args, pre_kw, C, want_grads=False)
    state = {"X": XT, "P": PT, "anchor": AT, "offset": off}
    outs = [o_pre]
    for t in range(T0, T):
        tok = [None if x is None else x[:, t] for x in args]
        tkw = {k: (v[:, t] if isinstance(v, torch.Tensor) and not k.startswith("_") else v) for k, v in kw.items()}
        o_t1, state = driver.step(emu, tok, tkw, C, state)
        outs.append(o_t1.unsqueeze(1))
    o = torch.cat(outs, 1)
    named = [("o", o, o_t, o_p), ("X", state["X"], s_t.X, s_p.X), ("anchor", state["anchor"], s_t.anchor, s_p.anchor)]
    if case.momentum:
        named.append(("P", state["P"], s_t.P, s_p.P))
    ok, errs = compare(case, named, case.dtype != "f32")
    if not torch.equal(state["offset"].cpu(), s_t.offset.cpu().long()):
        ok = False
        errs["offset"] = {"why": f"offsets {state['offset'].tolist()} != {s_t.offset.tolist()}"}
    return ok, errs, {"o": o}


def run_refuse(emu, case: Case):
    _, _, args, kw = gen(case)
    try:
        driver.update(emu, args, kw, case.C, want_grads=False)
    except cabi.MirasError as e:
        ok = "MIRAS_CUDA_PATH=chunk" in e.message and "tensor-core" in e.message
        return ok, {"message": {"why": e.message}}, {}
    return False, {"message": {"why": "no error raised"}}, {}


def run_gating(emu, case: Case):
    saved = os.environ.pop("MIRAS_CUDA_UNVERIFIED", None)
    try:
        if case.name == "gating-step-needs-optin":
            try:
                run_step(emu, case)
            except cabi.MirasError as e:
                ok = "MIRAS_CUDA_UNVERIFIED=1" in e.message and "C ABI's CUDA kernels" in e.message
                return ok, {"message": {"why": e.message}}, {}
            return False, {"message": {"why": "the unverified capi kernels ran without MIRAS_CUDA_UNVERIFIED"}}, {}
        return run_update(emu, case)
    finally:
        if saved is not None:
            os.environ["MIRAS_CUDA_UNVERIFIED"] = saved


def run_case(emu, case: Case):
    os.environ["MIRAS_CUDA_PATH"] = case.path
    emu.reset_stats()
    t0 = time.time()
    try:
        fn = {"update": run_update, "step": run_step, "refuse": run_refuse, "gating": run_gating}[case.kind]
        ok, errs, outs = fn(emu, case)
        msg = ""
    except Exception as exc:  # a launch failure, an emulator fault, a Python error
        ok, errs, outs, msg = False, {}, {}, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
    stats = emu.kernel_stats()
    nvtx = emu.nvtx_log()
    missing = [k for k in case.expect_kernels if k not in stats]
    if missing:
        ok = False
        msg += f" expected kernels not launched: {missing}"
    return {"ok": bool(ok), "errs": errs, "msg": msg, "kernels": sorted(stats), "nvtx": sorted(set(nvtx)),
            "secs": time.time() - t0}, outs


# Invariance: the same case under other schedules and the scrambled wmma layout gives bitwise the
# same outputs and gradients (no shared-memory race, no fragment-layout assumption).
def invariance_cases(allc):
    """A cluster (Dv = 128, norm bias) and a plain chunk case, and scan cases with the KL / lq maps."""
    picks = [lambda c: c.path == "chunk" and c.Dv == 128 and c.bias in ("huber", "robust") and c.huber_mode != "coord",
             lambda c: c.path == "chunk" and c.Dv == 64 and c.dtype == "f16",
             lambda c: c.path == "scan" and c.retention == "kl" and c.momentum,
             lambda c: c.path == "scan" and c.retention == "lq" and c.Dv > 32]
    out = []
    for pick in picks:
        out += [n for n, c in allc.items() if c.kind == "update" and pick(c)][:1]
    return out


MODES = [("reverse", {"schedule": 1}), ("shuffle", {"schedule": 2, "seed": 12345}), ("scrambled", {"wmma_layout": 1})]


def invariance(emu, allc, results, ref_outs):
    out = {}
    for name in invariance_cases(allc):
        case = allc.get(name)
        base = ref_outs.get(name)
        if case is None:
            out[f"invariance-{name}"] = {"ok": False, "msg": "case not in the battery"}
            continue
        for mode, settings in MODES:
            key = f"invariance-{name}-{mode}"
            if not base:
                out[key] = {"ok": False, "msg": "the base run failed"}
                continue
            for k, v in settings.items():
                emu.configure(k, v)
            try:
                res, outs = run_case(emu, case)
            finally:
                emu.configure("schedule", 0)
                emu.configure("wmma_layout", 0)
            diff = [n for n in base if n in outs and not torch.equal(base[n], outs[n])]
            out[key] = {"ok": res["ok"] and not diff and bool(outs),
                        "msg": (f"not bitwise equal: {diff}" if diff else "") + res["msg"]}
    return out


# ---- the emulator's own checks (fault kernels: tests/emu/fault_kernels.cu; conversions) -------------
FAULTS = {  # id: (what, expected cudaError_t, text the fault message must contain; None: see test_emu.py)
    1: ("shared-memory write past the end", 719, "heap-buffer-overflow"),
    2: ("global read past a buffer", 719, "heap-buffer-overflow"),
    3: ("deadlock", 719, "deadlock"),
    4: ("cp.async without wait", 0, None),
    5: ("shared-memory race", 0, None),
    6: ("divergent warp collectives", 719, "divergent warp collectives"),
    7: ("DSMEM rank out of range", 719, "map_shared_rank: rank"),
    8: ("DSMEM read after the peer exited", 719, "use-after-poison"),
    9: ("misaligned float4 load", 0, None),
    10: ("misaligned wmma pointer", 719, "not 32-byte aligned"),
    20: ("block of 2048 threads", 9, "exceeds 1024 threads"),
    21: ("grid.y of 70000", 9, "exceeds the grid limits"),
    22: ("64 KB dynamic shared memory without opting in", 1, "without cudaFuncSetAttribute"),
    23: ("240 KB dynamic shared memory", 1, "above the device's opt-in limit"),
    24: ("cluster of 16", 9, "cluster of 16 blocks"),
    25: ("100 KB after opting in (valid)", 0, None),
}


def faults(emu):
    import ctypes as C
    L = emu.lib
    L.miras_emu_fault_case.argtypes = [C.c_int, C.c_void_p]
    out = {}
    buf = (C.c_float * 4096)()
    for schedule in (0, 1):
        emu.configure("schedule", schedule)
        for cid in FAULTS:
            if schedule and cid != 5:
                continue
            for i in range(4096):
                buf[i] = 7.0
            err = L.miras_emu_fault_case(cid, buf)
            out[f"{cid}-{schedule}"] = {"err": err, "msg": L.miras_emu_last_fault().decode(),
                                        "out": [buf[i] for i in range(64)]}
    emu.configure("schedule", 0)
    return out


def conversions(emu):
    """float32 -> float16 / bfloat16 (round to nearest even) and back, bit for bit against torch."""
    import struct
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g) * 10 ** torch.randint(-9, 6, (20000,), generator=g).float(),
                   torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e-8, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26,
                                 2.0 ** -14, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, float("inf"), -float("inf"),
                                 3.0e38, 1.17e-38, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8])])
    bad = []
    for dt, fn in ((torch.float16, emu.lib.miras_emu_f32_to_f16), (torch.bfloat16, emu.lib.miras_emu_f32_to_bf16)):
        want = x.to(dt).view(torch.int16).to(torch.int32) & 0xFFFF
        for v, w in zip(x.tolist(), want.tolist()):
            got = fn(v)
            if got != w:
                bad.append(f"{dt}: {v!r} -> 0x{got:04x}, torch 0x{w:04x}")
    L = emu.lib
    import ctypes as C
    L.miras_emu_f16_to_f32.restype = C.c_float
    L.miras_emu_f16_to_f32.argtypes = [C.c_ushort]
    for h in range(0, 65536, 7):
        want = torch.tensor([h], dtype=torch.int32).to(torch.int16).view(torch.float16).float().item()
        got = L.miras_emu_f16_to_f32(h)
        same = (got == want) or (got != got and want != want)
        if not same or struct.pack("f", got) != struct.pack("f", want) and want == want:
            bad.append(f"f16 0x{h:04x} -> {got!r}, torch {want!r}")
    return {"checked": int(x.numel()) * 2 + 65536 // 7, "bad": bad[:20], "nbad": len(bad)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--profile", default="ci")
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="")
    ap.add_argument("--invariance", action="store_true")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--selftest", action="store_true", help="the fault kernels and conversions only")
    a = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("MIRAS_CUDA_UNVERIFIED", "1")  # every kernel, verified on hardware or not
    emu = cabi.Emu(a.lib)
    emu.configure("quiet", 1)
    if a.selftest:
        with open(a.out, "w") as f:
            json.dump({"faults": faults(emu), "conversions": conversions(emu), "asan": emu.has_asan, "done": True}, f)
        return
    allc = {c.name: c for c in cases(a.profile)}
    names = [n for n in a.only.split(",") if n] or list(allc)
    results, outs_keep, all_kernels = {}, {}, set()
    inv = invariance_cases(allc)
    t0 = time.time()
    for i, n in enumerate(names):
        res, outs = run_case(emu, allc[n])
        results[n] = res
        all_kernels.update(res["kernels"])
        if a.invariance and n in inv:
            outs_keep[n] = outs
        if a.progress:
            print(f"[{i + 1}/{len(names)} {time.time() - t0:6.1f}s] {'ok  ' if res['ok'] else 'FAIL'} {n}", flush=True)
        with open(a.out, "w") as f:  # rewritten after every case: a crash keeps what ran
            json.dump({"cases": results, "kernels": sorted(all_kernels), "asan": emu.has_asan, "done": False}, f)
    if a.invariance:
        results.update(invariance(emu, allc, results, outs_keep))
    with open(a.out, "w") as f:
        json.dump({"cases": results, "kernels": sorted(all_kernels), "asan": emu.has_asan, "done": True,
                   "nvtx": emu.nvtx_log()[-20:], "secs": time.time() - t0}, f)


if __name__ == "__main__":
    main()
