"""The C ABI's CUDA path on a GPU: libmiras built with -DMIRAS_WITH_CUDA=ON, driven through ctypes
with torch CUDA tensors, on a subset of the emulator's battery (tests/emu/cases.py) — the forward
with final offsets (the C ABI's ``miras_capi_final_offsets`` kernel), the backward, and prefill +
``miras_step`` per token (``miras_capi_step_finish``), against the float64 reference.

Needs a GPU (cuda marker); the C ABI's kernels are emulator-verified only until this passes
(csrc/cuda/verification.h, family ``capi``), so it runs with MIRAS_CUDA_UNVERIFIED=1.
bench/device_check.sh runs it with the other CUDA tests (the CMake build takes ~1-2 min there).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import cuda_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "emu"))

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU or no CUDA kernels in this build")]

CASES = ["step-l2-lp-f32", "step-kl-huber-yaad-bf16", "chunk-varlen-huber-norm-bf16-128x128",
         "chunk-l2-mom-bf16-64x128-C32", "scan-varlen-kl-lp-f32"]


@pytest.fixture(scope="module")
def capi_cuda_lib(tmp_path_factory):
    cmake = shutil.which("cmake") or os.path.join(os.path.dirname(sys.executable), "cmake")
    build = os.environ.get("MIRAS_CAPI_CUDA_BUILD_DIR") or str(tmp_path_factory.mktemp("capi_cuda"))
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a").split(";")[0].split()[0].replace(".", "")
    jobs = str(os.cpu_count() or 4)
    for c in ([cmake, "-S", ROOT, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DMIRAS_WITH_CUDA=ON",
               f"-DCMAKE_CUDA_ARCHITECTURES={arch}", "-DMIRAS_CORE_OPT=-O1"],
              [cmake, "--build", build, "--target", "libmiras", "-j", jobs]):
        r = subprocess.run(c, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            pytest.fail(f"{' '.join(c)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    lib = os.path.join(build, "libmiras.so")
    assert os.path.exists(lib)
    return lib


@pytest.mark.parametrize("name", CASES)
def test_capi_cuda_case(capi_cuda_lib, name, monkeypatch):
    import battery
    import cabi
    import cases
    import driver

    monkeypatch.setenv("MIRAS_CUDA_UNVERIFIED", "1")
    monkeypatch.setattr(driver, "DEVICE", "cuda")
    lib = cabi.Emu(capi_cuda_lib, emulator=False)
    case = cases.by_name("ci")[name]
    monkeypatch.setenv("MIRAS_CUDA_PATH", case.path)
    fn = {"update": battery.run_update, "step": battery.run_step}[case.kind]
    ok, errs, _ = fn(lib, case)
    torch.cuda.synchronize()
    from lowprec import explain

    assert ok, explain(errs)
