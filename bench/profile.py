"""Profile training steps (forward + backward) of the memory op.

    python bench/profile.py [--shape B,T,H,D] [--bias lp] [--momentum] [--steps 3] [--trace step.json]

torch.profiler mode (default): prints the per-kernel time table (CUDA kernels by device time on a
GPU, CPU ops by self time without one) and, with ``--trace PATH``, writes a Chrome trace JSON of
the profiled steps (open it in chrome://tracing or https://ui.perfetto.dev). Every step is a range
``miras.profile.step[i]``; every backend call is a range named after its variant, the same names
on both backends (csrc/core/names.h):

    miras.chunk_fwd[chunk_l2 bias=lp ret=l2 C=64 dk=128 dv=128 bf16]         CUDA: NVTX range
    miras.chunk_bwd[cpu_l2_dual avx512 bias=lp ret=l2 C=64 dk=64 dv=64 f32]    CPU: profiler range

Nsight Systems mode (``--nsys``, GPU only): no torch.profiler (it would compete with nsys for
CUPTI); the profiled steps are bracketed by cudaProfilerStart/Stop and NVTX ranges, for

    nsys profile --trace=cuda,nvtx,osrt --capture-range=cudaProfilerApi --capture-range-end=stop \\
        -o miras_step python bench/profile.py --nsys
    nsys stats --report cuda_gpu_kern_sum,nvtx_sum miras_step.nsys-rep
"""
import argparse

import torch

import miras

CUDA_SHAPE = "8,2048,16,128"
CPU_SHAPE = "2,1024,4,64"


def make_step(a, dev):
    B, T, H, D = (int(x) for x in a.shape.split(","))
    dt = getattr(torch, a.dtype) if dev == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device=dev, generator=g).to(dt).requires_grad_() for _ in range(3))
    lr = (0.05 + 0.45 * torch.rand(B, T, H, device=dev, generator=g)).requires_grad_()
    alpha = (0.7 + 0.3 * torch.rand(B, T, H, device=dev, generator=g)).requires_grad_()
    mom = (0.9 * torch.rand(B, T, H, device=dev, generator=g)).requires_grad_() if a.momentum else None

    def step():
        o, _ = miras.memory_update(q, k, v, lr, alpha, mom, bias=a.bias, retention=a.retention, chunk_size=a.chunk)
        o.float().square().mean().backward()

    desc = (f"shape {B},{T},{H},{D} {dt} bias={a.bias} retention={a.retention} momentum={a.momentum} "
            f"chunk={a.chunk}, {a.steps} step(s) on {dev}")
    return step, desc


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def run_torch_profiler(a, dev, step, desc):
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(a.steps):
            with torch.profiler.record_function(f"miras.profile.step[{i}]"):
                step()
        sync(dev)
    key = "self_device_time_total" if dev == "cuda" else "self_cpu_time_total"
    print(f"miras profile (torch.profiler): {desc}")
    print(prof.key_averages().table(sort_by=key, row_limit=a.rows, max_name_column_width=80))
    if a.trace:
        prof.export_chrome_trace(a.trace)
        print("Chrome trace:", a.trace)


def run_nsys(a, dev, step, desc):
    if dev != "cuda":
        raise SystemExit("--nsys needs a CUDA GPU (Nsight Systems traces CUDA kernels and NVTX ranges)")
    torch.cuda.profiler.start()  # nsys --capture-range=cudaProfilerApi records from here
    for i in range(a.steps):
        with torch.cuda.nvtx.range(f"miras.profile.step[{i}]"):
            step()
    sync(dev)
    torch.cuda.profiler.stop()
    print(f"miras profile (nsys capture range): {desc}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=None, help=f"B,T,H,D (default {CUDA_SHAPE} on CUDA, {CPU_SHAPE} on CPU)")
    ap.add_argument("--bias", default="lp")
    ap.add_argument("--retention", default="l2")
    ap.add_argument("--momentum", action="store_true")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", help="q/k/v dtype on CUDA (the CPU runs float32)")
    ap.add_argument("--steps", type=int, default=3, help="profiled training steps (after one warm-up step)")
    ap.add_argument("--rows", type=int, default=15, help="rows of the time table")
    ap.add_argument("--trace", default=None, metavar="PATH", help="write a Chrome trace JSON of the profiled steps")
    ap.add_argument("--nsys", action="store_true", help="no torch.profiler; cudaProfilerStart/Stop for nsys")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if a.shape is None:
        a.shape = CUDA_SHAPE if dev == "cuda" else CPU_SHAPE
    step, desc = make_step(a, dev)
    step()  # warm-up (first-call allocations, lazy initialisation)
    sync(dev)
    (run_nsys if a.nsys else run_torch_profiler)(a, dev, step, desc)


if __name__ == "__main__":
    main()
