#!/usr/bin/env python3
"""Is the device code of a CUDA kernel family unchanged? Compiles each family's .cu files to PTX
(nvcc, sm_90a, setup.py's flags) at a git revision and in the working tree and compares them.

    python tools/ptx_compare.py --rev ef6355b [--families chunk_l2,scan] [--jobs 2]

A family's hardware verification (csrc/cuda/verification.h) covers the sources that ran. An edit
that leaves the family's PTX identical (host code only: support checks, launchers; macro hooks
that expand to the same code; comments) does not change what runs on the GPU, so the verification
carries over: record the new source fingerprint (`python -m miras info`) with this tool's output as
evidence. Any PTX difference — including one caused by a shared header such as csrc/core/bias.h —
means new device code: the family stays opt-in (MIRAS_CUDA_UNVERIFIED=1) until a hardware run.
Exit status 0 when every compared family is identical, 1 otherwise.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC_FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-DMIRAS_WITH_CUDA", "-U__CUDA_NO_HALF_OPERATORS__",
              "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
              "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-arch=sm_90a", "-ptx"]


def _fingerprint_module():
    spec = importlib.util.spec_from_file_location("_miras_fp", os.path.join(ROOT, "python", "miras", "_fingerprint.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def families(root):
    """{family: its .cu files} of root's csrc/cuda/families.txt (the shared line left out)."""
    fams = _fingerprint_module().families(root)
    fams.pop("shared", None)
    return {name: [p for p in paths if p.endswith(".cu")] for name, paths in fams.items()}


def nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    exe = os.path.join(home, "bin", "nvcc")
    if not os.path.exists(exe):
        exe = shutil.which("nvcc")
    if not exe:
        sys.exit("nvcc not found (set CUDA_HOME)")
    return exe


def ptx(root, rel, out_dir):
    out = os.path.join(out_dir, rel.replace("/", "_") + ".ptx")
    cmd = [nvcc()] + NVCC_FLAGS + ["-I", os.path.join(root, "csrc"), os.path.join(root, rel), "-o", out]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed on {rel} in {root}:\n{r.stderr[-3000:]}")
    with open(out) as f:
        lines = [ln for ln in f if not ln.startswith("//") and not re.match(r"\s*\.file\s", ln)]
    return "".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="the revision whose sources the recorded fingerprint covers")
    ap.add_argument("--families", default="", help="comma-separated (default: every family with .cu files)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="ptx_compare_")
    old_root = os.path.join(tmp, "rev")
    os.makedirs(old_root)
    archive = subprocess.run(["git", "-C", ROOT, "archive", a.rev, "csrc"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", old_root], input=archive, check=True)
    fams = families(ROOT)
    want = [f for f in a.families.split(",") if f] or list(fams)
    old_fams = families(old_root)
    jobs = []
    for fam in want:
        for rel in sorted(set(fams.get(fam, [])) | set(old_fams.get(fam, []))):
            jobs.append((fam, rel))
    results = {}
    with cf.ThreadPoolExecutor(max_workers=max(1, a.jobs)) as ex:
        futs = {}
        for fam, rel in jobs:
            for which, root in (("rev", old_root), ("now", ROOT)):
                if os.path.exists(os.path.join(root, rel)):
                    d = os.path.join(tmp, which)
                    os.makedirs(d, exist_ok=True)
                    futs[ex.submit(ptx, root, rel, d)] = (fam, rel, which)
        for fu in cf.as_completed(futs):
            results[futs[fu]] = fu.result()
    ok = True
    for fam in want:
        same = True
        for rel in sorted(set(fams.get(fam, [])) | set(old_fams.get(fam, []))):
            a_ = results.get((fam, rel, "rev"))
            b_ = results.get((fam, rel, "now"))
            eq = a_ is not None and a_ == b_
            h = hashlib.sha256((b_ or "").encode()).hexdigest()[:16]
            print(f"{fam:9} {rel:36} {'identical' if eq else 'DIFFERS'}  (ptx sha256 {h})")
            same = same and eq
        print(f"{fam:9} => {'PTX identical to ' + a.rev + ': a hardware verification of those sources carries over' if same else 'device code changed'}")
        ok = ok and same
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
