"""Determinism and resources (issue 7).

- CPU: the same inputs give bitwise-identical outputs, final states and gradients across runs and
  across thread counts 1, 2, 3. The CPU backend parallelises with OpenMP over (sequence, head)
  tasks, each task computed by one thread in a fixed order (no cross-thread reductions), and takes
  its team size from OpenMP's nthreads ICV, which ``torch.set_num_threads`` sets (torch and the
  extension share one libgomp: checked below). Covered: every retention (the l2 dual-form
  backward included), momentum, varlen, tensor parameters, initial states.
- CUDA (skipped without a GPU): forward and backward are bitwise reproducible (the kernels use no
  atomics: ``grep -r atomic csrc/cuda`` finds none, and every reduction has a fixed order, see
  csrc/cuda/SCAN_NOTES.md), so ``torch.use_deterministic_algorithms(True)`` needs no special path;
  the test runs both under it.
- 1,000 forward+backward calls in a loop do not grow the process's resident memory (nor CUDA
  memory, skipped here).
- Memory saved for backward is the inputs plus O(T/C · Dk · Dv) per head (chunk-start states, and
  momentum), measured with ``torch.autograd.graph.saved_tensors_hooks``.
- Concurrent calls from several Python threads give the single-threaded results, bitwise.
"""
from __future__ import annotations

import ctypes
import gc
import threading

import pytest
import torch

from conftest import BIAS_MODES, make_inputs, op_kwargs, state_of

miras = pytest.importorskip("miras")


def _run(args, kw, C, grad=True, cu=None):
    args = [a.detach().clone().requires_grad_(grad) if a is not None else None for a in args]
    kw = {n: (t.detach().clone().requires_grad_(grad) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    o, s = miras.memory_update(*args, **op_kwargs(kw), chunk_size=C, initial_state=state_of(kw),
                               output_final_state=True, cu_seqlens=cu)
    out = [o.detach(), s.X.detach()] + ([s.P.detach()] if s.P is not None else [])
    if grad:
        g = torch.Generator().manual_seed(1)
        def cot(t):  # (generated on the CPU, then moved: the same numbers on every device)
            return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)

        loss = (o * cot(o)).sum() + (s.X * cot(s.X)).sum()
        leaves = [t for t in args + list(kw.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
        out += list(torch.autograd.grad(loss, leaves))
    return out


def _bitwise(a, b):
    return len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
                                    for x, y in zip(a, b))


CASES = [  # (bias index, retention, momentum, varlen, dtype)
    (1, "l2", False, False, torch.float32), (2, "l2", True, False, torch.float32),
    (6, "l2", True, True, torch.float32), (3, "l2", False, False, torch.float64),
    (0, "kl", True, False, torch.float32), (4, "elastic_net", True, True, torch.float32),
    (5, "lq", False, False, torch.float32), (2, "lq", True, False, torch.float64),
]


def test_torch_and_extension_share_one_openmp():
    """torch.set_num_threads must reach the extension's parallel regions."""
    maps = open("/proc/self/maps").read()
    gomps = {line.split()[-1] for line in maps.splitlines() if "libgomp" in line}
    assert len(gomps) == 1, f"several OpenMP runtimes loaded: {gomps}"
    lib = ctypes.CDLL(gomps.pop())
    old = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            assert lib.omp_get_max_threads() == n
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("bi,ret,mom,varlen,dtype", CASES,
                         ids=[f"{BIAS_MODES[b][0]}-{r}-{'mom' if m else 'nomom'}-{'varlen' if v else 'dense'}-"
                              f"{str(d)[6:]}" for b, r, m, v, d in CASES])
def test_cpu_bitwise_across_runs_and_thread_counts(bi, ret, mom, varlen, dtype):
    bias, hm = BIAS_MODES[bi]
    B, T, N = (1, 150, 3) if varlen else (3, 150, None)
    args, kw = make_inputs(B=B, T=T, H=3, Dk=16, Dv=12, dtype=dtype, momentum=mom, seed=7, bias=bias,
                           huber_mode=hm, retention=ret, initial_state=True, N=N)
    cu = torch.tensor([0, 40, 41, T]) if varlen else None
    old = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2, 3, 1):
            torch.set_num_threads(n)
            results.setdefault(n, []).append(_run(args, kw, 16, cu=cu))
    finally:
        torch.set_num_threads(old)
    ref = results[1][0]
    assert _bitwise(ref, results[1][1]), "two runs with 1 thread differ"
    for n in (2, 3):
        assert _bitwise(ref, results[n][0]), f"{n} threads differ from 1 thread"


def test_cpu_bitwise_across_omp_num_threads_processes(tmp_path):
    """The same check across processes started with OMP_NUM_THREADS=1 and 3 (the environment path
    rather than torch.set_num_threads), l2 dual-form backward and lq."""
    import os
    import subprocess
    import sys

    # The inputs are made here, once, and loaded by both processes: make_inputs normalizes k with a
    # torch reduction, which need not be bitwise the same under OMP_NUM_THREADS=1 and 3.
    inputs = tmp_path / "inputs.pt"
    torch.save({ret: make_inputs(B=2, T=200, H=4, Dk=32, Dv=32, dtype=torch.float32, momentum=True, seed=3,
                                 retention=ret)[0] for ret in ("l2", "lq")}, inputs)
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch, miras\n"
        "out = []\n"
        "for ret, args in torch.load(sys.argv[2]).items():\n"
        "    args = [a.requires_grad_(True) for a in args]\n"
        "    o, s = miras.memory_update(*args, retention=ret, chunk_size=32, output_final_state=True)\n"
        "    g = torch.autograd.grad((o * o).sum() + s.X.sum(), args)\n"
        "    out += [o, s.X] + list(g)\n"
        "torch.save([t.detach() for t in out], sys.argv[1])\n")
    outs = []
    for n in ("1", "3"):
        path = tmp_path / f"out{n}.pt"
        env = dict(os.environ, OMP_NUM_THREADS=n)
        env["PYTHONPATH"] = os.pathsep.join(p for p in [os.path.dirname(miras.__path__[0]), env.get("PYTHONPATH")]
                                            if p)
        subprocess.run([sys.executable, str(script), str(path), str(inputs)], check=True, env=env, timeout=600)
        outs.append(torch.load(path))
    assert _bitwise(outs[0], outs[1])


# ---------------------------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------------------------
def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_no_memory_growth_over_1000_calls():
    """1,000 forward+backward calls (alternating variants: l2 dual form, lq scan, momentum, varlen,
    final state with the split at the last boundary). Leaking any tensor the op allocates per call
    (inputs converted, outputs, saved chunk states, gradients: >= 32 KB each here) would add
    >= 12 MiB over the measured 400 calls; the allowance is 4 MiB."""
    variants = []
    for i, (ret, mom, varlen) in enumerate([("l2", True, False), ("lq", False, False), ("kl", True, True),
                                            ("elastic_net", False, True)]):
        B, N = (1, 3) if varlen else (1, None)
        args, kw = make_inputs(B=B, T=512, H=1, Dk=16, Dv=16, dtype=torch.float32, momentum=mom, seed=i,
                               retention=ret, initial_state=True, N=N, bias=BIAS_MODES[i + 2][0],
                               huber_mode=BIAS_MODES[i + 2][1])
        variants.append((args, kw, torch.tensor([0, 150, 151, 512]) if varlen else None))

    def call(i):
        args, kw, cu = variants[i % len(variants)]
        _run(args, kw, 16 if i % 3 else 64, cu=cu)

    # one thread: 1,000 short OpenMP regions on an oversubscribed machine spin for a long time
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _measure_growth(call)
    finally:
        torch.set_num_threads(old)


def _measure_growth(call):
    for i in range(200):
        call(i)
    gc.collect()
    mid = _rss_bytes()
    for i in range(200, 600):
        call(i)
    gc.collect()
    before = _rss_bytes()
    for i in range(600, 1000):
        call(i)
    gc.collect()
    after = _rss_bytes()
    assert after - before <= 4 * 2 ** 20, f"RSS grew by {(after - before) / 2 ** 20:.1f} MiB over 400 calls " \
                                          f"(after {(before - mid) / 2 ** 20:.1f} MiB over the 400 before)"


def _saved_bytes(fn):
    """Bytes of the distinct storages saved for backward while ``fn`` runs, and the storages."""
    seen = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
            shapes.append((st.data_ptr(), tuple(t.shape)))
        return t

    shapes = []

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), shapes, out


@pytest.mark.parametrize("mom,varlen,final", [(False, False, False), (True, False, True), (True, True, True),
                                              (False, True, False)])
@pytest.mark.parametrize("C", [16, 128])
def test_saved_for_backward_within_budget(mom, varlen, final, C):
    """Saved tensors ≤ inputs + (2·T/C + 16·N)·H·Dk·Dv·4 bytes (T the packed token count; chunk-start
    X and, with momentum, P; a few states per sequence), i.e. O(T/C · Dk · Dv) per head,
    never O(T · Dk · Dv). Regression: with cu_seqlens the split gathered copies of every input
    (and saved them and the first part's output for backward: ~2x the inputs)."""
    B, T, H, Dk, Dv = (1, 1000, 2, 32, 24) if varlen else (2, 1000, 2, 32, 24)
    N = 3 if varlen else B
    args, kw = make_inputs(B=B, T=T, H=H, Dk=Dk, Dv=Dv, dtype=torch.float32, momentum=mom, seed=5,
                           bias="huber", retention="elastic_net", initial_state=True, N=N if varlen else None,
                           requires_grad=True)
    cu = torch.tensor([0, 333, 334, T]) if varlen else None
    inputs = [t for t in args + list(kw.values()) if isinstance(t, torch.Tensor)]
    in_bytes = sum(t.untyped_storage().nbytes() for t in inputs) + (cu.nbytes if cu is not None else 0)

    def fn():
        return miras.memory_update(*args, **op_kwargs(kw), chunk_size=C, initial_state=state_of(kw),
                                   output_final_state=final, cu_seqlens=cu)

    saved, shapes, (o, s) = _saved_bytes(fn)
    state = H * Dk * Dv * 4
    tokens = B * T  # (packed tokens: T with cu_seqlens, B·T without)
    # chunk-start X and P: 2·(T/C + slots per sequence); per sequence a few more states (initial,
    # final, and with output_final_state the split at the last chunk boundary: a first call over
    # 2N segments and a second one from the boundary states): 16·N covers them all
    budget = in_bytes + (2 * (tokens // C) + 16 * N) * state + 64 * 1024
    print(f"\nsaved {saved / 2 ** 20:.2f} MiB, inputs {in_bytes / 2 ** 20:.2f} MiB, budget {budget / 2 ** 20:.2f} MiB")
    assert saved <= budget, f"saved {saved} bytes > budget {budget} (inputs {in_bytes})"
    # and the budget is not loose: O(T) per-token states would be T/C times the chunk states
    assert saved - in_bytes < tokens * state / 4
    # no token-sized copy beyond the inputs (the split may gather at most the < C remainder tokens
    # of each sequence)
    in_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    copies = [sh for ptr, sh in shapes if ptr not in in_ptrs and len(sh) >= 3 and sh[0] == B and sh[2] == H
              and sh[1] > N * C]
    assert not copies, f"token-sized tensors other than the inputs saved for backward: {copies}"
    loss = o.sum() + (s.X.sum() if s is not None else 0)
    loss.backward()  # the saved tensors are enough for backward


def test_concurrent_python_threads_match_serial():
    """Several Python threads calling forward+backward at once (different configurations) get
    the serial results, bitwise."""
    jobs = []
    for i, (ret, mom) in enumerate([("l2", True), ("lq", False), ("kl", True), ("elastic_net", True),
                                    ("l2", False), ("lq", True)]):
        args, kw = make_inputs(B=2, T=120, H=2, Dk=16, Dv=16, dtype=torch.float32, momentum=mom, seed=20 + i,
                               retention=ret, initial_state=True, bias=BIAS_MODES[i][0], huber_mode=BIAS_MODES[i][1])
        jobs.append((args, kw))
    serial = [_run(a, k, 16) for a, k in jobs]
    errors, results = [], {}

    def worker(j):
        try:
            for rep in range(5):
                out = _run(*jobs[j], 16)
                if not _bitwise(out, serial[j]):
                    errors.append(f"job {j} repetition {rep} differs")
            results[j] = True
        except Exception as exc:  # noqa: BLE001
            errors.append(f"job {j}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(j,)) for j in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert len(results) == len(jobs)


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("ret,dtype", [("l2", torch.bfloat16), ("l2", torch.float32), ("kl", torch.bfloat16),
                                       ("lq", torch.float32)])
def test_cuda_bitwise_deterministic(ret, dtype):
    """Forward and backward bitwise identical across runs, also under
    torch.use_deterministic_algorithms(True) (no atomics: nothing needs a special path)."""
    args, kw = make_inputs(B=2, T=300, H=4, Dk=64, Dv=64, dtype=torch.float32, momentum=True, seed=1,
                           retention=ret, device="cuda", gate_dtype=torch.float32)
    args = [a.to(dtype) if i < 3 else a for i, a in enumerate(args)]
    runs = [_run(args, kw, 64) for _ in range(2)]
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs.append(_run(args, kw, 64))
    finally:
        torch.use_deterministic_algorithms(old)
    assert _bitwise(runs[0], runs[1]) and _bitwise(runs[0], runs[2])


@pytest.mark.cuda
def test_cuda_no_memory_growth():
    args, kw = make_inputs(B=2, T=256, H=4, Dk=64, Dv=64, dtype=torch.bfloat16, momentum=True, seed=2,
                           device="cuda", gate_dtype=torch.float32)
    for _ in range(20):
        _run(args, kw, 64)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(1000):
        _run(args, kw, 64)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before <= 1 << 20
