"""The CPU backend's tests under every instruction set it dispatches (issue 11 §3).

The C++ CPU backend picks its instruction set at run time (csrc/cpu/chunk_cpu.cpp ``use_avx2`` /
``use_avx512``, csrc/cpu/mlp_cpu.cpp): AVX-512 for the retention-l2 backward of the linear memory
only, AVX2+FMA for everything else, portable code without them. The normal run of the suite
covers the best set this machine has; a machine with another one (no AVX-512, no AVX2) runs other
code. So that no such machine can fail CI with what this one never ran, each cap this machine
supports *below* its best (``portable`` always; ``avx2`` when the best is ``avx512``) reruns the
CPU-op tests in a fresh process with ``MIRAS_CPU_ISA`` set (read once per process, so a
subprocess). That process first checks that the cap took effect: ``build_info()["cpu_isa"]``
reports it as active, and the profiler range of every CPU op (fwd/bwd of the linear and the MLP
memory) names it as the variant that ran; then it runs pytest in the same process.

What runs under each cap (on a 2-core machine the four modules in full take ~3 min per cap under
load, most of it in the float64 Python reference, which no cap changes; this selection takes
1.4-2 min for both caps together, portable ~60 s, avx2 ~20-40 s):

- ``portable``: everything in the CPU backend changes (forward, backward, MLP), so test_cpu_op,
  test_autograd, test_mlp, test_step and the CPU bitwise-determinism tests of test_determinism,
  except (a) the float64 matrix of test_cpu_op is thinned to the chunk size 3 (T = 37 is not a
  multiple: a partial last chunk) for every bias × retention × momentum, plus every chunk size
  (1, 3, 16, 64 > T) for retention l2, whose dual-form backward computes on C × C tiles; the other
  paths are per-token scans in which C only decides where the anchor moves, and they still meet
  C = 16 in the float32 matrix (every bias × retention × momentum, C = 3 and 16, run in full) and
  random C in the 60 hypothesis configurations (run in full);
  (b) ``opcheck`` and ``torch.compile`` tests are left out: they check the op's schema, fake
  kernels, autograd registration and tracing, none of which depends on the instruction set.
- ``avx2``: only the retention-l2 backward differs from the default (AVX-512) run, forward and
  MLP kernels being the AVX2 ones in both; so the portable selection without the MLP module, with
  the float64 and float32 matrices cut to retention l2 (the varlen, random, step, gradcheck and
  determinism tests stay: they are cheap and contain l2 cases), plus test_mlp's
  ``test_backward_with_checkpoints``, the one test of the l2 *scan* backward
  (``MIRAS_CPU_L2_BWD=scan``) with the checkpointed segment recompute.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

miras = pytest.importorskip("miras")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEVEL = {"portable": 0, "avx2": 1, "avx512": 2}
TIMEOUT_S = 1200  # per forced run (~1 min measured, see above): room for a slow or loaded machine

_DETERMINISM = ["tests/test_determinism.py::test_cpu_bitwise_across_runs_and_thread_counts",
                "tests/test_determinism.py::test_concurrent_python_threads_match_serial"]
_NOT_ISA = "not opcheck and not compile"  # registration / tracing tests: the same under every ISA
SELECTION = {
    "portable": (["tests/test_cpu_op.py", "tests/test_autograd.py", "tests/test_mlp.py", "tests/test_step.py"]
                 + _DETERMINISM,
                 f"{_NOT_ISA} and not (cpu_f64_matrix and not -l2- and not -3])"),
    "avx2": (["tests/test_cpu_op.py", "tests/test_autograd.py", "tests/test_step.py",
              "tests/test_mlp.py::test_backward_with_checkpoints"] + _DETERMINISM,
             f"{_NOT_ISA} and not (cpu_f64_matrix and not -l2-) and not (cpu_f32_vs_f64 and not -l2-)"),
}

# Runs in the child: checks the cap, then pytest in the same process (argv: cap, pytest args...).
_CHILD = r"""
import re, sys
import torch, miras
from miras import MemoryState

want = sys.argv[1]
info = dict(kv.split("=", 1) for kv in miras._C.build_info()["cpu_isa"].split(";"))
print(f"cpu_isa: {info}", flush=True)
if info.get("active") != want or info.get("MIRAS_CPU_ISA") != want:
    sys.exit(f"MIRAS_CPU_ISA={want} did not take effect: build_info reports {info}")
# The variant each op call dispatched to (profiler ranges, csrc/core/names.h): every one must run `want`.
f = torch.float64
g = torch.Generator().manual_seed(0)
q = torch.randn(1, 5, 1, 4, generator=g, dtype=f, requires_grad=True)
k = torch.nn.functional.normalize(torch.randn(1, 5, 1, 4, generator=g, dtype=f), dim=-1)
v = torch.randn(1, 5, 1, 4, generator=g, dtype=f)
lr, alpha = torch.full((1, 5, 1), 0.1, dtype=f), torch.full((1, 5, 1), 0.9, dtype=f)
W = (torch.randn(1, 1, 4, 8, generator=g, dtype=f) / 2, torch.randn(1, 1, 8, 4, generator=g, dtype=f) / 3)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for ret in ("l2", "kl"):  # l2: the dual-form backward (AVX-512 when allowed); kl: the scan
        o, _ = miras.memory_update(q, k, v, lr, alpha, retention=ret, chunk_size=2)
        o.sum().backward()
    o, _ = miras.memory_update(q, k, v, lr, alpha, memory="mlp", initial_state=MemoryState(X=W), chunk_size=2)
    o.sum().backward()
ranges = sorted({e.name for e in prof.events() if e.name.startswith("miras.")})
ran = {re.match(r"miras\.\w+\[\w+ (\w+) ", r).group(1) for r in ranges}
kinds = {r.split("[")[0] for r in ranges}
want_kinds = {"miras.chunk_fwd", "miras.chunk_bwd", "miras.mlp_chunk_fwd", "miras.mlp_chunk_bwd"}
if ran != {want} or not want_kinds <= kinds:
    sys.exit(f"MIRAS_CPU_ISA={want}: the ops ran {ran} (ranges {ranges})")
print(f"dispatch: {ranges}", flush=True)
import pytest
sys.exit(int(pytest.main(sys.argv[2:])))
"""


def _isa_info():
    return dict(kv.split("=", 1) for kv in miras._C.build_info()["cpu_isa"].split(";"))


def _best(info) -> str:
    """The set the backend picks with no cap (the same rules as use_avx2 / use_avx512)."""
    have = set(info["compiled"].split(",")) & (set(info["supported"].split(",")) - {"none"})
    if {"avx2", "avx512"} <= have:
        return "avx512"
    return "avx2" if "avx2" in have else "portable"


def _tail(text: str, n: int = 8000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


@pytest.mark.parametrize("cap", ["portable", "avx2"])
def test_cpu_tests_pass_under_isa_cap(cap):
    info = _isa_info()
    best = _best(info)
    if LEVEL[cap] >= LEVEL[best]:
        pytest.skip(f"MIRAS_CPU_ISA={cap} is not below this machine's best CPU instruction set ({best}; {info})")
    if info["active"] == cap:
        pytest.skip(f"this run already uses {cap} (MIRAS_CPU_ISA={info['MIRAS_CPU_ISA']}): the suite itself covers it")
    targets, select = SELECTION[cap]
    env = dict(os.environ, MIRAS_CPU_ISA=cap)
    cmd = [sys.executable, "-c", _CHILD, cap, "-x", "-q", "-p", "no:cacheprovider", "-k", select, *targets]
    t0 = time.monotonic()
    # own session: on a timeout the whole group goes (test_mlp's checkpoint test starts a process too)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"MIRAS_CPU_ISA={cap}: the tests did not finish in {TIMEOUT_S} s:\n{_tail(out)}")
    wall = time.monotonic() - t0
    print(f"\nMIRAS_CPU_ISA={cap}: exit {proc.returncode} in {wall:.1f} s: {out.strip().splitlines()[-1:]}")
    assert proc.returncode == 0, f"MIRAS_CPU_ISA={cap}: exit status {proc.returncode}:\n{_tail(out)}"
    assert " passed" in out and "no tests ran" not in out, _tail(out)
