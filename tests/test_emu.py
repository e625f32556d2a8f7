"""Every CUDA kernel of csrc/cuda (and the C ABI's) run on the CPU by the kernel emulator.

The emulator (csrc/emu, docs/emulator.md) compiles the real kernel sources for the host, runs
each CUDA thread as a fiber (barriers, warp shuffles, wmma with the hardware fragment layout,
clusters with distributed shared memory, cp.async as a deferred copy) and checks launches as a
device does. Its library, ``libmiras_emu.so``, is the C ABI with the CUDA device paths; this file
drives it through ``miras_chunk_fwd`` / ``miras_chunk_bwd`` / ``miras_step`` with
``MIRAS_DEVICE_CUDA`` — the dispatcher, the launchers, workspaces and argument packing included.

- Build: CMake ``-DMIRAS_EMU=ON`` into ``.emu-build/`` (or ``MIRAS_EMU_BUILD_DIR``), once per session;
  the checked build (AddressSanitizer + UBSan alignment checks, ``MIRAS_EMU_CHECKED=1``, the
  default) runs in a subprocess with the sanitizer runtimes preloaded (tests/emu/battery.py), so a
  crash or a sanitizer report cannot take pytest down. ``MIRAS_EMU_CHECKED=0``: plain build, 4x faster.
- Battery (tests/emu/cases.py): ``ci`` profile by default (every bias x momentum x dtype per family,
  head dims and chunk sizes rotating, varlen with empty and partial segments, states, step path,
  dispatch), ``MIRAS_EMU_FULL=1`` for the cross product. Tolerances: tests/emu/battery.py.
- Coverage: every ``__global__`` function defined in csrc/cuda and csrc/capi must have been launched
  (``emulated N/M __global__ kernels``).
- Mutation test: three compile-time switches (MIRAS_MUTANT in the kernels: a wrong sign, a skipped
  barrier, an off-by-one tile loop) must each make the battery fail.
- Fault kernels (tests/emu/fault_kernels.cu): out-of-bounds shared and global accesses, DSMEM after a
  peer exited (checked build), deadlock, divergent warp collectives, bad DSMEM rank, a missing
  cp.async wait, a race, misaligned float4 / wmma addresses, launch limits.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU_DIR = os.path.join(ROOT, "tests", "emu")
sys.path.insert(0, EMU_DIR)

import cases as battery_cases  # noqa: E402

PROFILE = "full" if os.environ.get("MIRAS_EMU_FULL", "0") == "1" else "ci"
CHECKED = os.environ.get("MIRAS_EMU_CHECKED", "1") != "0"
CASES = battery_cases.cases(PROFILE)
MUTATIONS = {1: "wrong sign in fwd_output's A = -(F o QK^T)", 2: "skipped barrier in bwd_state (dPsi~ GEMM)",
             3: "off-by-one Dk tile loop in bwd_chunk"}


def _cmake():
    exe = shutil.which("cmake") or os.path.join(os.path.dirname(sys.executable), "cmake")
    if not os.path.exists(exe):
        pytest.fail("cmake (>= 3.22) is needed to build the kernel emulator: pip install cmake")
    return exe


def _sanitizer_env():
    env = dict(os.environ)
    if CHECKED:
        libs = []
        for name in ("libasan.so", "libubsan.so"):
            p = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
            if not os.path.isabs(p):
                pytest.fail(f"the checked emulator build needs {name} (gcc's sanitizer runtimes); "
                            "or run with MIRAS_EMU_CHECKED=0")
            libs.append(p)
        env["LD_PRELOAD"] = ":".join(libs)
        env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=0:allocator_may_return_null=1"
        env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=0"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("MIRAS_CUDA_PATH", None)
    env.pop("MIRAS_EMU_MUTATION", None)
    return env


@pytest.fixture(scope="session")
def emu_lib():
    """Builds libmiras_emu.so (incremental in .emu-build/<flavour>)."""
    flavour = "checked" if CHECKED else "plain"
    build = os.environ.get("MIRAS_EMU_BUILD_DIR") or os.path.join(ROOT, ".emu-build", flavour)
    cmd = [_cmake(), "-S", ROOT, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DMIRAS_EMU=ON",
           f"-DMIRAS_EMU_CHECKED={'ON' if CHECKED else 'OFF'}", "-DMIRAS_CORE_OPT=-O1"]
    if shutil.which("ccache"):
        cmd += ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache", "-DCMAKE_C_COMPILER_LAUNCHER=ccache"]
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    for c in (cmd, [_cmake(), "--build", build, "--target", "miras_emu", "-j", jobs]):
        r = subprocess.run(c, capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"{' '.join(c)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    lib = os.path.join(build, "libmiras_emu.so")
    assert os.path.exists(lib), f"the build did not produce {lib}"
    return lib


def _run_battery(lib, out, *extra, env=None, timeout=3000):
    cmd = [sys.executable, os.path.join(EMU_DIR, "battery.py"), "--lib", lib, "--profile", PROFILE, "--out", out,
           *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env or _sanitizer_env(), timeout=timeout)
    res = None
    if os.path.exists(out):
        with open(out) as f:
            res = json.load(f)
    return r, res


@pytest.fixture(scope="session")
def battery(emu_lib, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("emu") / "battery.json")
    r, res = _run_battery(emu_lib, out, "--invariance")
    if res is None or not res.get("done"):
        pytest.fail(f"the emulator battery did not finish (exit {r.returncode}):\n{r.stdout[-3000:]}\n"
                    f"{r.stderr[-6000:]}")
    res["stderr"] = r.stderr
    return res


@pytest.fixture(scope="session")
def selftest(emu_lib, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("emu") / "selftest.json")
    r, res = _run_battery(emu_lib, out, "--selftest")
    if res is None or not res.get("done"):
        pytest.fail(f"the emulator self-test did not finish (exit {r.returncode}):\n{r.stderr[-6000:]}")
    res["stderr"] = r.stderr
    return res


def _explain(res):
    from lowprec import explain

    return (res.get("msg", "") + "\n" + explain(res.get("errs", {}))).strip()


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_emu_case(battery, name):
    res = battery["cases"].get(name)
    assert res is not None, f"{name} did not run (the battery stopped early?)"
    assert res["ok"], _explain(res)


def _invariance_names():
    import battery as B  # noqa: E402  (imports torch and miras: fine at collection)

    allc = {c.name: c for c in CASES}
    return [f"invariance-{n}-{m}" for n in B.invariance_cases(allc) for m, _ in B.MODES]


@pytest.mark.parametrize("name", _invariance_names())
def test_emu_bitwise_invariance(battery, name):
    """Another schedule (reverse, seeded shuffle) or the scrambled wmma layout: bitwise the same
    results (no shared-memory race, no dependence on the fragment layout)."""
    res = battery["cases"].get(name)
    assert res is not None, f"{name} did not run"
    assert res["ok"], res["msg"]


def test_emu_no_sanitizer_reports(battery):
    err = battery["stderr"]
    bad = [ln for ln in err.splitlines() if "ERROR: AddressSanitizer" in ln or "runtime error:" in ln]
    assert not bad, "sanitizer reports in the battery:\n" + "\n".join(bad[:20]) + "\n" + err[-4000:]
    if CHECKED:
        assert battery["asan"], "the checked build is not instrumented"


_GLOBAL = re.compile(r"__global__[\s\\]+void[\s\\]+(?:__launch_bounds__\([^)]*\)[\s\\]+)?(\w+)\s*\(")
_MACRO_KERNEL = re.compile(r"^MIRAS_SCAN_(?:FWD|BWD)_KERNEL\((\w+),", re.M)


def defined_kernels():
    """Every __global__ function of csrc/cuda and csrc/capi (a template once; the scan family's
    macro-generated kernels one per expansion)."""
    names = set()
    for sub in ("cuda", "capi"):
        d = os.path.join(ROOT, "csrc", sub)
        for fn in sorted(os.listdir(d)):
            if not fn.endswith((".cu", ".cuh")):
                continue
            src = open(os.path.join(d, fn)).read()
            names.update(n for n in _GLOBAL.findall(src) if n != "NAME")
            names.update(_MACRO_KERNEL.findall(src))
    return names


def test_emu_kernel_coverage(battery, capsys):
    defined = defined_kernels()
    assert len(defined) >= 30, f"kernel scan found only {sorted(defined)}"
    ran = set(battery["kernels"]) & defined
    with capsys.disabled():
        print(f"\nemulated {len(ran)}/{len(defined)} __global__ kernels")
    missing = sorted(defined - ran)
    assert not missing, f"kernels without emulator coverage (add a case to tests/emu/cases.py): {missing}"


def test_emu_nvtx_ranges_name_the_variant(battery):
    ranges = {r for res in battery["cases"].values() for r in res.get("nvtx", [])}
    assert any(r.startswith("miras.chunk_fwd[chunk_l2 bias=") for r in ranges), sorted(ranges)[:5]
    assert any(r.startswith("miras.chunk_bwd[scan bias=") for r in ranges), sorted(ranges)[:5]


@pytest.mark.parametrize("mutation", sorted(MUTATIONS), ids=[f"m{k}" for k in sorted(MUTATIONS)])
def test_emu_mutation_is_caught(emu_lib, tmp_path, mutation):
    """The battery must fail on a broken kernel: MIRAS_EMU_MUTATION=k switches one on."""
    names = [c.name for c in CASES if c.path == "chunk" and c.kind == "update"][:4]
    env = _sanitizer_env()
    env["MIRAS_EMU_MUTATION"] = str(mutation)
    r, res = _run_battery(emu_lib, str(tmp_path / "m.json"), "--only", ",".join(names), env=env)
    assert res is not None and res.get("done"), r.stderr[-3000:]
    failed = [n for n, c in res["cases"].items() if not c["ok"]]
    assert failed, f"mutation {mutation} ({MUTATIONS[mutation]}) passed every case: the battery cannot fail"


def test_emu_fault_kernels(selftest):
    from battery import FAULTS

    f = selftest["faults"]
    for cid, (what, err, text) in FAULTS.items():
        r = f[f"{cid}-0"]
        if cid in (1, 2, 8) and not CHECKED:
            continue  # memory errors need the checked (ASan) build
        assert r["err"] == err, f"fault {cid} ({what}): cudaError {r['err']}, expected {err}: {r['msg']}"
        if text:
            assert text in r["msg"], f"fault {cid} ({what}): message {r['msg']!r} lacks {text!r}"
        if err == 719:
            assert "kernel fault_" in r["msg"], f"fault {cid}: the message does not name the kernel: {r['msg']}"
    # a missing cp.async wait: the destination still holds NaN bytes when it is read
    assert any(x != x for x in f["4-0"]["out"][:32]), "cp.async without wait read the data"
    # a race: results depend on the schedule
    assert f["5-0"]["out"] != f["5-1"]["out"], "a shared-memory race gave the same result under two schedules"
    # the valid launch ran
    assert f["25-0"]["out"][:4] == [3.0] * 4
    if CHECKED:  # misaligned float4: UBSan's report names the source line
        err = selftest["stderr"]
        assert "misaligned address" in err and "float4" in err and "fault_kernels.cu" in err, err[-3000:]
        for cid in (1, 2, 8):
            assert "the report above is from kernel fault_" in err


def test_emu_half_conversions_bit_exact(selftest):
    c = selftest["conversions"]
    assert c["nbad"] == 0, c["bad"]
