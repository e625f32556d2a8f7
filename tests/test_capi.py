"""The C ABI (csrc/capi/miras.h, libmiras): build it with CMake, run the C program
tests/capi/miras_capi_test.c on inputs and float64-reference results written here.

- Builds libmiras and the program (CPU only) once per session in a temporary directory
  (``cmake -DMIRAS_BUILD_TESTS=ON``; ccache when it is on PATH). The CPU backend is compiled with
  -O1 there (``MIRAS_CORE_OPT``; 3x quicker to build; the same sources run at -O3 in every torch
  test); ``MIRAS_CAPI_TEST_OPT=-O3`` builds it as shipped.
- Chunk cases: forward (o, final state, anchor, offset) and backward (every gradient) against
  ``miras.reference.memory_update_chunked`` + autograd, float64 (tol 1e-10) and float32 (1e-5
  forward, 1e-4 backward); batched and varlen; tensor and scalar parameters; with and without
  momentum and initial state; an empty sequence; no tokens at all (T = 0).
- Step cases: prefill with ``miras_chunk_fwd`` (final state + offset), then ``miras_step`` per
  token (state buffers swapped, anchor and offset updated in place) == the reference chunked op
  over the whole sequence (SPEC §7), batched and varlen.
- Error statuses (in the C program): bad dtype, shape, layout, NULL pointers, unknown device,
  CUDA not built, bad config, bad offsets, aliasing; messages checked.
- The program fails when a result is wrong (a perturbed reference value).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import make_inputs, op_kwargs

miras = pytest.importorskip("miras")
from miras import reference as R  # noqa: E402
from miras.state import MemoryState  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32, F64, I64 = 0, 1, 4  # miras_dtype codes
BIAS_CODE = {("dot", None): 0, ("l2", None): 1, ("lp", None): 2, ("huber", "yaad"): 3, ("huber", "coord"): 4,
             ("huber", "norm"): 5, ("robust", None): 6}
RET_CODE = {"l2": 0, "kl": 1, "elastic_net": 2, "lq": 3}
TOL = {F64: (1e-10, 1e-10), F32: (1e-5, 1e-4)}


def _cmake():
    exe = shutil.which("cmake") or os.path.join(os.path.dirname(sys.executable), "cmake")
    if not os.path.exists(exe):
        pytest.fail("cmake (>= 3.22) is needed to build libmiras: install it (apt install cmake / pip install cmake)")
    return exe


@pytest.fixture(scope="session")
def capi_program(tmp_path_factory):
    """Builds libmiras + miras_capi_test (Release, CPU only); returns the program's path."""
    build = tmp_path_factory.mktemp("capi_build")
    cmd = [_cmake(), "-S", ROOT, "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DMIRAS_BUILD_TESTS=ON",
           "-DMIRAS_WITH_CUDA=OFF", f"-DMIRAS_CORE_OPT={os.environ.get('MIRAS_CAPI_TEST_OPT', '-O1')}"]
    if shutil.which("ccache"):
        cmd += ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache", "-DCMAKE_C_COMPILER_LAUNCHER=ccache"]
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    for c in (cmd, [_cmake(), "--build", str(build), "--target", "miras_capi_test", "-j", jobs]):
        r = subprocess.run(c, capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"{' '.join(c)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    exe = build / "tests" / "capi" / "miras_capi_test"
    assert exe.exists(), f"the build did not produce {exe}"
    return exe


# ---- data file --------------------------------------------------------------------------------
def _fmt(x: torch.Tensor) -> str:
    return " ".join(repr(float(v)) for v in x.detach().reshape(-1).tolist())


class Case:
    def __init__(self, name, kind):
        self.name, self.kind, self.params, self.arrays = name, kind, {}, {}

    def array(self, name, t, dtype=F64):
        self.arrays[name] = (dtype, t.detach().to(torch.float64 if dtype != I64 else torch.int64).cpu())

    def write(self, f):
        f.write(f"case {self.name} {self.kind}\n")
        for k, v in self.params.items():
            f.write(f"param {k} {float(v)!r}\n")
        for name, (dt, t) in self.arrays.items():
            shape = " ".join(str(s) for s in t.shape)
            f.write(f"array {name} {dt} {t.dim()} {shape} {_fmt(t)}\n")
        f.write("end\n")

    def n_value_checks(self):
        return sum(1 for n in self.arrays if n.startswith("ref_"))


def _config(case, kw, Dk, C, scale, dtype):
    bias, hm = kw["bias"], kw.get("huber_mode")
    case.params.update(
        dtype=dtype, Dk=Dk, chunk_size=C, scale=scale, bias=BIAS_CODE[(bias, hm if bias == "huber" else None)],
        retention=RET_CODE[kw["retention"]], p=kw.get("p", 3.0), eps=kw.get("eps", 1e-6),
        delta=kw["delta"] if isinstance(kw.get("delta"), float) else 1.0,
        robust_delta=kw["robust_delta"] if isinstance(kw.get("robust_delta"), float) else 0.0,
        gamma=kw["gamma"] if isinstance(kw.get("gamma"), float) else 0.0, kl_scale=kw.get("kl_scale", 1.0),
        q_norm=kw.get("q_norm", 4.0), eps_q=kw.get("eps_q", 1e-6))
    case.params["tol_fwd"], case.params["tol_bwd"] = TOL[dtype]


def _param_tensors(kw):
    """(bias_param, ret_param) tensors of kw, or None."""
    bp = kw.get("delta") if kw["bias"] == "huber" else kw.get("robust_delta") if kw["bias"] == "robust" else None
    rp = kw.get("gamma") if kw["retention"] == "elastic_net" else None
    return (bp if isinstance(bp, torch.Tensor) else None), (rp if isinstance(rp, torch.Tensor) else None)


def _rounded(args, kw, dtype):
    """float32 cases: the inputs rounded to float32 (then exact in the file and in the C program)."""
    if dtype == F64:
        return args, kw

    def r(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.to(torch.float32).to(torch.float64)
        return t

    return [r(a) for a in args], {k: r(v) for k, v in kw.items()}


def chunk_case(name, *, B, T, H, Dk, Dv, C, seed, bias="l2", huber_mode="yaad", retention="l2", momentum=True,
               tensor_params=True, initial_state=True, cu=None, dtype=F64, scale=None):
    N = len(cu) - 1 if cu is not None else B
    args, kw = make_inputs(B=B, T=T, H=H, Dk=Dk, Dv=Dv, momentum=momentum, seed=seed, bias=bias,
                           huber_mode=huber_mode, retention=retention, tensor_params=tensor_params,
                           initial_state=True, N=N)
    if bias != "huber":
        kw.pop("huber_mode", None)
    args, kw = _rounded(args, kw, dtype)
    scale = Dk ** -0.5 if scale is None else scale
    case = Case(name, "chunk")
    _config(case, {**kw, "huber_mode": huber_mode}, Dk, C, scale, dtype)
    case.params.update(H=H, Dk=Dk, Dv=Dv, N=N)
    q, k, v, lr, alpha, mom = args
    bp, rp = _param_tensors(kw)
    X0 = kw["_X0"] if initial_state else torch.zeros(N, H, Dk, Dv, dtype=torch.float64)
    P0 = (kw["_P0"] if initial_state else torch.zeros(N, H, Dk, Dv, dtype=torch.float64)) if momentum else None
    leaves = {"q": q, "k": k, "v": v, "lr": lr, "alpha": alpha, "momentum": mom, "bias_param": bp,
              "ret_param": rp, "X0": X0, "P0": P0}
    for n, t in leaves.items():
        if t is not None:
            if n not in ("X0", "P0") or initial_state:
                case.array(n, t)
            t.requires_grad_(True)
    cu_t = torch.tensor(cu, dtype=torch.int64) if cu is not None else None
    if cu_t is not None:
        case.array("cu_seqlens", cu_t, I64)
    o, st = R.memory_update_chunked(q, k, v, lr, alpha, mom, **op_kwargs(kw), chunk_size=C, scale=scale,
                                    initial_state=MemoryState(X=X0, P=P0), output_final_state=True,
                                    cu_seqlens=cu_t)
    g = torch.Generator().manual_seed(seed + 1)
    dO = torch.randn(o.shape, generator=g, dtype=torch.float64)
    dXT = torch.randn(st.X.shape, generator=g, dtype=torch.float64)
    dPT = torch.randn(st.X.shape, generator=g, dtype=torch.float64) if momentum else None
    dO, dXT, dPT = [x if x is None else _rounded([x], {}, dtype)[0][0] for x in (dO, dXT, dPT)]
    loss = (o * dO).sum() + (st.X * dXT).sum() + ((st.P * dPT).sum() if momentum else 0)
    names = [n for n, t in leaves.items() if t is not None]
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)  # (unused: T = 0)
    grads = [torch.zeros_like(leaves[n]) if gr is None else gr for n, gr in zip(names, grads)]
    case.array("dO", dO)
    case.array("dXT", dXT)
    if momentum:
        case.array("dPT", dPT)
    case.array("ref_o", o)
    case.array("ref_XT", st.X)
    if momentum:
        case.array("ref_PT", st.P)
    case.array("ref_AT", st.anchor)
    case.array("ref_final_offset", st.offset, I64)
    for n, gr in zip(names, grads):
        case.array("ref_d" + n, gr)
    return case


def step_case(name, *, lengths, S, H, Dk, Dv, C, seed, varlen, bias="l2", huber_mode="yaad", retention="l2",
              momentum=True, dtype=F64):
    """Prefill sequence n with lengths[n] tokens, then S steps; the reference is the chunked op over
    each whole sequence (lengths[n] + S tokens)."""
    N = len(lengths)
    full = [L + S for L in lengths]
    if varlen:
        T = sum(full)
        args, kw = make_inputs(B=1, T=T, H=H, Dk=Dk, Dv=Dv, momentum=momentum, seed=seed, bias=bias,
                               huber_mode=huber_mode, retention=retention, initial_state=True, N=N)
    else:
        assert len(set(lengths)) == 1
        args, kw = make_inputs(B=N, T=full[0], H=H, Dk=Dk, Dv=Dv, momentum=momentum, seed=seed, bias=bias,
                               huber_mode=huber_mode, retention=retention, initial_state=True)
    if bias != "huber":
        kw.pop("huber_mode", None)
    args, kw = _rounded(args, kw, dtype)
    scale = Dk ** -0.5
    case = Case(name, "step")
    _config(case, {**kw, "huber_mode": huber_mode}, Dk, C, scale, dtype)
    case.params.update(H=H, Dk=Dk, Dv=Dv, N=N)
    bp, rp = _param_tensors(kw)
    named = dict(zip(["q", "k", "v", "lr", "alpha", "momentum"], args), bias_param=bp, ret_param=rp)
    if varlen:
        starts = [sum(full[:n]) for n in range(N)]
        pre_idx = torch.tensor([s + i for s, L in zip(starts, lengths) for i in range(L)], dtype=torch.long)
        cu_pre = torch.tensor([0] + [sum(lengths[: n + 1]) for n in range(N)], dtype=torch.int64)
        cu_full = torch.tensor([0] + [sum(full[: n + 1]) for n in range(N)], dtype=torch.int64)
        step_idx = [[starts[n] + lengths[n] + s for n in range(N)] for s in range(S)]
        for n, t in named.items():  # packed [1, T, ...]: prefill tokens, and [S, N, ...] steps
            if t is not None:
                case.array(n, t.index_select(1, pre_idx))
                case.array("step_" + n, torch.stack([t[0, idx] for idx in step_idx]))
        case.array("cu_seqlens", cu_pre, I64)
    else:
        L = lengths[0]
        cu_full = None
        for n, t in named.items():
            if t is not None:
                case.array(n, t[:, :L])
                case.array("step_" + n, t[:, L:].transpose(0, 1))
    case.array("X0", kw["_X0"])
    if momentum:
        case.array("P0", kw["_P0"])
    o, st = R.memory_update_chunked(*args, **op_kwargs(kw), chunk_size=C, scale=scale,
                                    initial_state=MemoryState(X=kw["_X0"], P=kw.get("_P0")),
                                    output_final_state=True, cu_seqlens=cu_full)
    if varlen:
        ref_o = torch.stack([o[0, idx] for idx in step_idx])
    else:
        ref_o = o[:, lengths[0]:].transpose(0, 1)
    case.array("ref_step_o", ref_o)
    case.array("ref_X", st.X)
    if momentum:
        case.array("ref_P", st.P)
    case.array("ref_anchor", st.anchor)
    case.array("ref_offset", st.offset, I64)
    return case


def _cases():
    return [
        chunk_case("f64_l2_l2_mom", B=2, T=37, H=2, Dk=8, Dv=6, C=8, seed=11),
        chunk_case("f64_yaad_elasticnet_varlen", B=1, T=40, H=2, Dk=4, Dv=5, C=5, seed=12, bias="huber",
                   retention="elastic_net", momentum=False, initial_state=False, cu=[0, 13, 13, 40]),
        chunk_case("f64_robust_kl_scalar", B=2, T=11, H=1, Dk=6, Dv=4, C=3, seed=13, bias="robust",
                   retention="kl", momentum=False, tensor_params=False, scale=0.7),
        chunk_case("f64_coord_l2_mom_varlen", B=1, T=30, H=2, Dk=5, Dv=3, C=4, seed=14, bias="huber",
                   huber_mode="coord", cu=[0, 7, 19, 30]),
        chunk_case("f32_lp_lq_mom", B=1, T=20, H=3, Dk=5, Dv=7, C=4, seed=15, bias="lp", retention="lq",
                   dtype=F32),
        chunk_case("f32_dot_l2", B=2, T=9, H=2, Dk=4, Dv=4, C=16, seed=16, bias="dot", momentum=False, dtype=F32),
        chunk_case("f64_no_tokens", B=2, T=0, H=2, Dk=3, Dv=2, C=4, seed=20),  # the state passes through
        step_case("f64_step_norm_l2_mom_varlen", lengths=[5, 8, 2], S=6, H=2, Dk=4, Dv=3, C=4, seed=17,
                  varlen=True, bias="huber", huber_mode="norm"),
        step_case("f64_step_l2_en", lengths=[6, 6], S=7, H=2, Dk=5, Dv=4, C=4, seed=18, varlen=False,
                  retention="elastic_net", momentum=False),
        step_case("f32_step_l2_kl_mom", lengths=[3, 3], S=5, H=1, Dk=6, Dv=5, C=3, seed=19, varlen=False,
                  retention="kl", dtype=F32),
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cases = _cases()
    path = tmp_path_factory.mktemp("capi_data") / "cases.txt"
    with open(path, "w") as f:
        for c in cases:
            c.write(f)
    return path, cases


def _run(exe, path):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([str(exe), str(path)], capture_output=True, text=True, env=env, timeout=300)


def test_capi_matches_reference(capi_program, data):
    path, cases = data
    r = _run(capi_program, path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"miras_capi_test failed (exit {r.returncode}):\n{out[-6000:]}"
    m = re.search(r"SUMMARY cases=(\d+) checks=(\d+) failures=(\d+)", out)
    assert m, out[-3000:]
    assert int(m.group(1)) == len(cases) and int(m.group(3)) == 0
    # every reference array was compared, once
    for c in cases:
        for name in c.arrays:
            if name.startswith("ref_"):
                assert re.search(rf"^PASS {c.name}/{name[4:]} rel_err", out, re.M), f"{c.name}/{name} not checked"
    # the error checks ran (one line each)
    errors = re.findall(r"^PASS error/(\w+):", out, re.M)
    for name in ("q_float16_on_cpu", "k_dtype_mismatch", "k_shape", "v_strides", "q_null", "lr_data_null",
                 "unknown_device", "cuda_not_built", "chunk_size_0", "bias_42", "cu_seqlens_end", "step_offset",
                 "step_inplace_X", "bwd_chunk_X_null", "chunk_schedule_en", "map_schedule_3"):
        assert name in errors, f"error check {name} missing:\n{out[-3000:]}"
    assert len(errors) >= 26


@pytest.mark.parametrize("target", [("f64_l2_l2_mom", "ref_dq"), ("f64_step_l2_en", "ref_anchor"),
                                    ("f32_lp_lq_mom", "ref_o")])
def test_capi_program_fails_on_wrong_results(capi_program, data, tmp_path, target):
    """The check can fail: one reference value perturbed (relative 1e-3 of the array's norm) → exit 1."""
    _, cases = data
    name, arr = target
    bad = tmp_path / "bad.txt"
    with open(bad, "w") as f:
        for c in cases:
            if c.name == name:
                dt, t = c.arrays[arr]
                t = t.contiguous().clone()
                t.view(-1)[t.numel() // 2] += 1e-3 * float(t.norm())
                wrong = Case(c.name, c.kind)
                wrong.params, wrong.arrays = c.params, {**c.arrays, arr: (dt, t)}
                c = wrong
            c.write(f)
    r = _run(capi_program, bad)
    assert r.returncode == 1, r.stdout[-3000:]
    assert re.search(rf"^FAIL {name}/{arr[4:]} ", r.stdout, re.M), r.stdout[-3000:]
    assert "failures=1" in r.stdout
