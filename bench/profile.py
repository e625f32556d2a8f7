"""Per-kernel time table of one training step of the memory op (torch.profiler).

    python bench/profile.py [--shape 8,2048,16,128] [--bias lp] [--momentum] [--trace out.json]

Prints the CUDA kernels (or CPU ops without a GPU) sorted by total time, and writes a Chrome trace
with --trace. For Nsight Systems: `nsys profile -t cuda,nvtx -o miras python bench/profile.py`
(every op launch sits in an NVTX range named after the op and its variant).
"""
import argparse

import torch

import miras


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8,2048,16,128")
    ap.add_argument("--bias", default="lp")
    ap.add_argument("--retention", default="l2")
    ap.add_argument("--momentum", action="store_true")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--trace", default=None)
    a = ap.parse_args()
    B, T, H, D = (int(x) for x in a.shape.split(","))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = getattr(torch, a.dtype) if dev == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device=dev, generator=g).to(dt).requires_grad_() for _ in range(3))
    lr = (0.05 + 0.45 * torch.rand(B, T, H, device=dev, generator=g)).requires_grad_()
    alpha = (0.7 + 0.3 * torch.rand(B, T, H, device=dev, generator=g)).requires_grad_()
    mom = (0.9 * torch.rand(B, T, H, device=dev, generator=g)).requires_grad_() if a.momentum else None

    def step():
        o, _ = miras.memory_update(q, k, v, lr, alpha, mom, bias=a.bias, retention=a.retention, chunk_size=a.chunk)
        o.float().square().mean().backward()

    step()  # warm-up
    if dev == "cuda":
        torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(a.steps):
            step()
        if dev == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    print(f"miras profile: shape {B},{T},{H},{D} {dt} bias={a.bias} retention={a.retention} "
          f"momentum={a.momentum} chunk={a.chunk}, {a.steps} steps on {dev}")
    print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))
    if a.trace:
        prof.export_chrome_trace(a.trace)
        print("trace:", a.trace)


if __name__ == "__main__":
    main()
