"""The CUDA op against the float64 reference (run on the CPU).

Both kernel families are exercised through ``MIRAS_CUDA_PATH`` (read by the dispatcher on every
call): ``chunk`` (tensor-core dual form: retention l2, float16/bfloat16, Dk, Dv ∈ {64, 128},
C ∈ {16, 32, 64}) and ``scan`` (exact float32 per-token scan: everything). Where a family
refuses a configuration outside that envelope it raises ValueError naming MIRAS_CUDA_PATH and
the test is skipped; a refusal *inside* the documented envelope fails. Every family meets the
reference on every bias × momentum, in each of its input dtypes (no rotation across the grid).
``bench/device_check.sh`` runs this file with MIRAS_CUDA_UNVERIFIED=1 (families that have not
passed on hardware yet, csrc/cuda/verification.h).

Tolerances (tests/lowprec.py): flash-attention's rule — ``err(ours, truth) ≤ 3 · err(pt, truth)``
with ``truth`` the float64 reference on the unrounded inputs and ``pt`` the float32 reference on
the same rounded inputs (measured ratios 0.8–2.3 in the kernel emulator; a 1 % error fails);
float32 inputs: ``max(1e-4, 3 · err(pt, truth))``. Huber thresholds are moved away from the
residuals they branch on (``separate_thresholds``) so that rounding cannot flip a branch.
Ground truth is ``reference.memory_update_chunked`` (float64, CPU), which test_reference.py
checks against the per-token loop.
"""
from __future__ import annotations

import pytest
import torch

from conftest import (BIAS_IDS, BIAS_MODES, assert_close, cotangents, cuda_available, grads, leaves, loss_of,
                      make_inputs, op_kwargs, state_of, upcast)
from lowprec import explain, fa_compare, k_for, separate_thresholds

miras = pytest.importorskip("miras")
from miras import reference as R  # noqa: E402
from miras.state import MemoryState  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU or no CUDA kernels in this build")]

F32_TOL = 1e-4
LOW_TOL = 2e-2  # only where two low-precision results are compared with each other (not the reference)
DEV = "cuda"

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# The dtypes each family takes: the tensor-core family float16/bfloat16 only.
FAMILY_DTYPES = {"chunk": ["bf16", "f16"], "scan": ["f32", "bf16", "f16"]}


@pytest.fixture(params=["chunk", "scan"])
def path(request, monkeypatch):
    monkeypatch.setenv("MIRAS_CUDA_PATH", request.param)
    return request.param


def chunk_supports(dtype, Dk, Dv, C, retention):
    return (dtype in (torch.float16, torch.bfloat16) and Dk in (64, 128) and Dv in (64, 128) and C in (16, 32, 64)
            and retention == "l2")


def call_or_skip(path, supported, fn, *a, **kw):
    """Run fn; a refusal of the forced family is a skip outside its envelope, a failure inside."""
    try:
        return fn(*a, **kw)
    except ValueError as e:
        if "MIRAS_CUDA_PATH" in str(e) and not supported:
            pytest.skip(f"{path} family refuses this configuration: {e}")
        raise


class Case:
    """One configuration: unrounded float64 inputs (CPU) and the rounded ones the kernel gets
    (q, k, v in ``dtype`` on the GPU; gates, parameters and states float32)."""

    def __init__(self, dtype, seed, *, B=2, T=100, H=2, Dk=64, Dv=64, C=16, cu_seqlens=None, **kw):
        N = None if cu_seqlens is None else len(cu_seqlens) - 1
        self.args64, self.kw64 = make_inputs(B=B, T=T, H=H, Dk=Dk, Dv=Dv, dtype=torch.float64, seed=seed,
                                             requires_grad=True, N=N, **kw)
        if kw.get("bias") == "huber" and kw.get("huber_mode", "yaad") == "yaad" and dtype != torch.float64:
            self.kw64["eps"] = 1e-2  # make_inputs' low-precision setting (the yaad VJP's conditioning)
        if kw.get("bias") == "huber" and kw.get("retention", "l2") == "l2" and isinstance(self.kw64.get("delta"),
                                                                                          torch.Tensor):
            separate_thresholds(self.args64, self.kw64, C, cu_seqlens, kw.get("huber_mode", "yaad"))
        self.dtype, self.C, self.seed = dtype, C, seed
        self.k = k_for(kw.get("bias", "l2"), kw.get("huber_mode", "yaad"))
        self.cu = cu_seqlens

        def rnd(t, dt):
            return None if t is None else t.detach().to(device=DEV, dtype=dt).requires_grad_(True)

        self.args = [rnd(t, dtype if i < 3 else torch.float32) for i, t in enumerate(self.args64)]
        self.kw = {k: (rnd(v, torch.float32) if isinstance(v, torch.Tensor) else v) for k, v in self.kw64.items()}
        self.extra = {} if cu_seqlens is None else {"cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.int64)}

    def cot(self, o, s):
        c = cotangents(o, s, self.seed)
        c["o"] = c["o"].to(self.dtype).double()  # what the kernel's backward receives
        return c


def _run(fn, args, kw, C, cot_of, **extra):
    st = state_of(kw)
    o, s = fn(*args, **op_kwargs(kw), chunk_size=C, initial_state=st, output_final_state=True, **extra)
    cot = cot_of(o, s)
    return o, s, grads(loss_of(o, s, cot), leaves(args, kw)), cot


def run_cuda(case, **extra):
    ex = {k: v.to(DEV) for k, v in case.extra.items()}
    ex.update(extra)
    o, s, g, _ = _run(miras.memory_update, case.args, case.kw, case.C, case.cot, **ex)
    torch.cuda.synchronize()
    return o, s, g


def run_references(case, fn=None):
    """(truth, pt): float64 on the unrounded inputs, float32 on the rounded ones (CPU)."""
    fn = fn or R.memory_update_chunked
    cots = {}

    def cot_of(o, s):
        if "c" not in cots:
            cots["c"] = case.cot(o, s)
        return cots["c"]

    truth = _run(fn, upcast(case.args64), upcast(case.kw64), case.C, cot_of, **case.extra)[:3]
    pt = _run(fn, upcast(case.args, torch.float32), upcast(case.kw, torch.float32), case.C, cot_of, **case.extra)[:3]
    return truth, pt


def compare(case, res, refs):
    (o, s, g), ((o_t, s_t, g_t), (o_p, s_p, g_p)) = res, refs
    assert o.is_cuda and s.X.is_cuda
    assert torch.isfinite(o_t).all() and float(o_t.detach().abs().max()) < 1e3, "reference diverged: fix the inputs"
    named = [("o", o, o_t, o_p), ("X", s.X, s_t.X, s_p.X), ("anchor", s.anchor, s_t.anchor, s_p.anchor)]
    if s_t.P is not None:
        named.append(("P", s.P, s_t.P, s_p.P))
    for name in g_t:
        assert g.get(name) is not None, f"no gradient for {name}"
        assert g[name].is_cuda
        named.append((f"grad {name}", g[name], g_t[name], g_p[name]))
    ok, errs = fa_compare(named, case.dtype != torch.float32, case.k)
    assert ok, explain(errs)
    assert torch.equal(s.offset.cpu().long(), s_t.offset.cpu().long())


# ---------------------------------------------------------------------------------------------
# Retention l2: every bias × momentum × the family's dtypes (head dims and C rotate)
# ---------------------------------------------------------------------------------------------
ROT = [(64, 64, 16), (128, 128, 32), (128, 128, 64), (64, 128, 32), (128, 64, 16), (64, 64, 64)]


@pytest.mark.parametrize("dt", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("momentum", [False, True], ids=["nomom", "mom"])
@pytest.mark.parametrize("bi", range(len(BIAS_MODES)), ids=BIAS_IDS)
def test_cuda_l2_every_bias(path, bi, momentum, dt, seed):
    if dt not in FAMILY_DTYPES[path]:
        pytest.skip(f"the {path} family does not take {dt} inputs")
    bias, hm = BIAS_MODES[bi]
    Dk, Dv, C = ROT[(bi + 3 * momentum) % len(ROT)]
    case = Case(DTYPES[dt], seed, T=100, Dk=Dk, Dv=Dv, C=C, momentum=momentum, bias=bias, huber_mode=hm,
                retention="l2", initial_state=True)
    res = call_or_skip(path, path == "scan" or chunk_supports(case.dtype, Dk, Dv, C, "l2"), run_cuda, case)
    compare(case, res, run_references(case))


@pytest.mark.parametrize("C", [16, 32, 64])
@pytest.mark.parametrize("dims", [(64, 64), (128, 128), (32, 48)], ids=["d64", "d128", "d32x48"])
@pytest.mark.parametrize("dt", list(DTYPES), ids=list(DTYPES))
def test_cuda_dtype_dims_chunk_grid(path, dt, dims, C, seed):
    """dtype × head dims × chunk size, retention l2, Huber (Yaad) bias with momentum; T = 150 is
    not a multiple of any C; no initial state (zeros)."""
    dtype = DTYPES[dt]
    Dk, Dv = dims
    case = Case(dtype, seed, B=1, T=150, H=2, Dk=Dk, Dv=Dv, C=C, momentum=True, bias="huber", retention="l2")
    res = call_or_skip(path, path == "scan" or chunk_supports(dtype, Dk, Dv, C, "l2"), run_cuda, case)
    compare(case, res, run_references(case))


# ---------------------------------------------------------------------------------------------
# Map-based retentions on the scan family (every input dtype)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dt", ["f32", "bf16"])
@pytest.mark.parametrize("momentum", [False, True], ids=["nomom", "mom"])
@pytest.mark.parametrize("bias_mode", [("l2", "yaad"), ("lp", "yaad"), ("huber", "norm"), ("robust", "yaad")],
                         ids=["l2", "lp", "huber-norm", "robust"])
@pytest.mark.parametrize("retention", ["kl", "elastic_net", "lq"])
def test_cuda_scan_map_retentions(monkeypatch, retention, bias_mode, momentum, dt, seed):
    monkeypatch.setenv("MIRAS_CUDA_PATH", "scan")
    bias, hm = bias_mode
    Dk, Dv = (32, 48) if momentum else (64, 64)
    case = Case(DTYPES[dt], seed, T=70, Dk=Dk, Dv=Dv, C=16, momentum=momentum, bias=bias, huber_mode=hm,
                retention=retention, initial_state=True)
    compare(case, run_cuda(case), run_references(case))


@pytest.mark.parametrize("retention", ["kl", "elastic_net", "lq"])
def test_cuda_chunk_family_refuses_map_retentions(monkeypatch, retention, seed):
    monkeypatch.setenv("MIRAS_CUDA_PATH", "chunk")
    case = Case(torch.bfloat16, seed, T=32, momentum=False, retention=retention)
    with pytest.raises(ValueError, match="MIRAS_CUDA_PATH"):
        miras.memory_update(*case.args, **op_kwargs(case.kw), chunk_size=16)


def test_cuda_auto_path_runs_everything(monkeypatch, seed):
    """Without MIRAS_CUDA_PATH every configuration runs (one family or the other)."""
    monkeypatch.delenv("MIRAS_CUDA_PATH", raising=False)
    for retention, dtype, dims in [("l2", torch.bfloat16, (64, 64)), ("kl", torch.bfloat16, (64, 64)),
                                   ("lq", torch.float32, (32, 48)), ("l2", torch.float16, (32, 48))]:
        case = Case(dtype, seed, T=40, Dk=dims[0], Dv=dims[1], C=16, momentum=True, retention=retention)
        compare(case, run_cuda(case), run_references(case))


def test_cuda_float64_refused(seed):
    args, kw = make_inputs(B=1, T=8, H=1, Dk=8, Dv=8, dtype=torch.float64, device=DEV, seed=seed)
    with pytest.raises(ValueError, match="float64"):
        miras.memory_update(*args, chunk_size=4)


# ---------------------------------------------------------------------------------------------
# Varlen, state continuation, determinism, CPU agreement, memory_step
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cu_list", [[0, 37, 38, 100, 161], [0, 50, 50, 99]],
                         ids=["uneven-len1", "empty"])
@pytest.mark.parametrize("dt", ["bf16", "f16", "f32"])
def test_cuda_varlen(path, dt, cu_list, seed):
    if dt not in FAMILY_DTYPES[path]:
        pytest.skip(f"the {path} family does not take {dt} inputs")
    dtype = DTYPES[dt]
    N, T = len(cu_list) - 1, cu_list[-1]
    C = 32
    case = Case(dtype, seed, B=1, T=T, H=2, Dk=64, Dv=64, C=C, cu_seqlens=cu_list, momentum=True, bias="robust",
                retention="l2", initial_state=True)
    res = call_or_skip(path, path == "scan" or chunk_supports(dtype, 64, 64, C, "l2"), run_cuda, case)
    compare(case, res, run_references(case))
    for n in range(N):
        if cu_list[n] == cu_list[n + 1]:  # an empty segment keeps its state (our op copies it: bitwise)
            torch.testing.assert_close(res[1].X[n], case.kw["_X0"][n].detach(), rtol=0, atol=0)


def test_cuda_state_continuation(path, seed):
    """initial_state from a previous call (at a chunk boundary) == one call over both parts."""
    dtype, C, cut, T = torch.bfloat16, 32, 64, 150
    case = Case(dtype, seed, T=T, C=C, momentum=True, bias="l2", retention="l2")
    args, kw = case.args, case.kw
    sup = path == "scan" or chunk_supports(dtype, 64, 64, C, "l2")
    kwo = op_kwargs(kw)
    with torch.no_grad():
        o, s = call_or_skip(path, sup, miras.memory_update, *args, **kwo, chunk_size=C, output_final_state=True)
        o1, s1 = miras.memory_update(*[a[:, :cut] for a in args], **kwo, chunk_size=C, output_final_state=True)
        o2, s2 = miras.memory_update(*[a[:, cut:] for a in args], **kwo, chunk_size=C, initial_state=s1,
                                     output_final_state=True)
    # The split stores the state in float32 at the cut, as the single call keeps it: both runs do
    # the same arithmetic up to the order of the cut's GEMMs.
    assert_close(torch.cat([o1, o2], 1), o, 1e-5, "o")
    assert_close(s2.X, s.X, 1e-5, "X")
    assert_close(s2.P, s.P, 1e-5, "P")
    # and the continued part against the references from the same CUDA state
    c2 = Case(dtype, seed, T=T, C=C, momentum=True, bias="l2", retention="l2")
    c2.args64 = [None if a is None else a.detach()[:, cut:].cpu().double().requires_grad_(True) for a in case.args64]
    c2.args = [None if a is None else a.detach()[:, cut:].requires_grad_(True) for a in case.args]
    c2.kw64 = dict(op_kwargs(case.kw64), _X0=s1.X.detach().cpu().double(), _P0=s1.P.detach().cpu().double())
    c2.kw = dict(kwo, _X0=s1.X.detach().float(), _P0=s1.P.detach().float())
    (o_t, _, _), (o_p, _, _) = run_references(c2)
    ok, errs = fa_compare([("o (continued)", o2, o_t, o_p)], True)
    assert ok, explain(errs)


def test_cuda_deterministic_and_finite(path, seed):
    """Forward twice (with dirty memory in between): bitwise identical, finite; backward finite."""
    dtype, C = torch.bfloat16, 64
    case = Case(dtype, seed, B=2, T=200, H=2, Dk=128, Dv=128, C=C, momentum=True, bias="huber", retention="l2",
                initial_state=True)
    args, kw = case.args, case.kw
    sup = path == "scan" or chunk_supports(dtype, 128, 128, C, "l2")
    st = state_of(kw)
    o1, s1 = call_or_skip(path, sup, miras.memory_update, *args, **op_kwargs(kw), chunk_size=C, initial_state=st,
                          output_final_state=True)
    junk = [torch.full((1 << 22,), float("nan"), device=DEV) for _ in range(4)]  # poison the allocator's cache
    del junk
    o2, s2 = miras.memory_update(*args, **op_kwargs(kw), chunk_size=C, initial_state=st, output_final_state=True)
    for name, a, b in [("o", o1, o2), ("X", s1.X, s2.X), ("P", s1.P, s2.P), ("anchor", s1.anchor, s2.anchor)]:
        assert torch.isfinite(a).all(), f"{name} not finite"
        assert torch.equal(a, b), f"{name} differs between two identical calls"
    gs = torch.autograd.grad((o1.float() ** 2).sum() + s1.X.sum(), [t for _, t in leaves(args, kw)])
    for g in gs:
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("dt", ["f32", "bf16"])
def test_cuda_matches_cpu_op(path, dt, seed):
    """The CUDA op and the C++ CPU op on the same inputs (float32 on the CPU: the CPU op takes
    float32/float64), both against the same references."""
    dtype = DTYPES[dt]
    if dt not in FAMILY_DTYPES[path]:
        pytest.skip(f"the {path} family does not take {dt} inputs")
    C = 16
    case = Case(dtype, seed, T=90, C=C, momentum=True, bias="lp", retention="l2", initial_state=True)
    sup = path == "scan" or chunk_supports(dtype, 64, 64, C, "l2")
    o, s, g = call_or_skip(path, sup, run_cuda, case)
    cpu_args = [None if a is None else a.detach().cpu().float().requires_grad_(True) for a in case.args]
    cpu_kw = {k: (v.detach().cpu().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
              for k, v in case.kw.items()}
    o_c, s_c, g_c, _ = _run(miras.memory_update, cpu_args, cpu_kw, C, case.cot)  # the C++ CPU op
    assert not o_c.is_cuda
    (o_t, s_t, g_t), (o_p, s_p, g_p) = run_references(case)
    named = [("o", o, o_t, o_p), ("X", s.X, s_t.X, s_p.X)] + [(f"grad {n}", g[n], g_t[n], g_p[n]) for n in g_t]
    ok, errs = fa_compare(named, dtype != torch.float32)
    assert ok, "CUDA: " + explain(errs)
    named_c = [("o", o_c, o_t, o_p), ("X", s_c.X, s_t.X, s_p.X)] + [(f"grad {n}", g_c[n], g_t[n], g_p[n]) for n in g_t]
    ok, errs = fa_compare(named_c, False)
    assert ok, "CPU: " + explain(errs)


@pytest.mark.parametrize("dt,retention", [("f32", "kl"), ("bf16", "l2"), ("f32", "l2")])
def test_cuda_memory_step(dt, retention, seed, monkeypatch):
    """Prefill on CUDA (ending mid-chunk) + memory_step per token == memory_update over all tokens."""
    monkeypatch.delenv("MIRAS_CUDA_PATH", raising=False)
    dtype = DTYPES[dt]
    C, T0, T = 16, 21, 40
    case = Case(dtype, seed, B=2, T=T, H=2, Dk=64, Dv=64, C=C, momentum=True, bias="huber", retention=retention)
    args, kw = case.args, case.kw
    kwo = op_kwargs(kw)
    with torch.no_grad():
        o_full, s_full = miras.memory_update(*args, **kwo, chunk_size=C, output_final_state=True)
        head = {k: (v[:, :T0] if isinstance(v, torch.Tensor) else v) for k, v in kwo.items()}
        o_pre, st = miras.memory_update(*[a[:, :T0] for a in args], **head, chunk_size=C, output_final_state=True)
        outs = []
        for t in range(T0, T):
            tk = {k: (v[:, t] if isinstance(v, torch.Tensor) else v) for k, v in kwo.items()}
            o_t, st = miras.memory_step(*[a[:, t] for a in args], state=st, chunk_size=C, **tk)
            assert o_t.is_cuda and o_t.dtype == dtype
            outs.append(o_t)
    o_chain = torch.cat([o_pre, torch.stack(outs, 1)], 1)
    tol = 1e-4 if dtype == torch.float32 else LOW_TOL  # two of our own results (the step runs the scan family)
    assert_close(o_chain, o_full, tol, "o")
    assert_close(st.X, s_full.X, tol, "X")
    assert torch.equal(st.offset.cpu(), s_full.offset.cpu())
    # and the decoded outputs / final state against the references over the whole sequence
    with torch.no_grad():
        o_t, s_t = R.memory_update_chunked(*upcast(case.args64), **op_kwargs(upcast(case.kw64)), chunk_size=C,
                                           output_final_state=True)
        o_p, s_p = R.memory_update_chunked(*upcast(args, torch.float32), **upcast(kwo, torch.float32), chunk_size=C,
                                           output_final_state=True)
    ok, errs = fa_compare([("o", o_chain, o_t, o_p), ("X", st.X, s_t.X, s_p.X),
                           ("anchor", st.anchor, s_t.anchor, s_p.anchor)], dtype != torch.float32, case.k)
    assert ok, explain(errs)


def test_cuda_memory_step_gradients(seed, monkeypatch):
    monkeypatch.delenv("MIRAS_CUDA_PATH", raising=False)
    B, H, Dk, Dv = 2, 2, 32, 48
    case = Case(torch.float32, seed, B=B, T=1, H=H, Dk=Dk, Dv=Dv, C=4, momentum=True, bias="l2", retention="l2",
                initial_state=True)
    args, kw = case.args, case.kw
    A = (kw["_X0"].detach() + 0.05).requires_grad_(True)
    st = MemoryState(X=kw["_X0"], P=kw["_P0"], anchor=A, offset=torch.ones(B, dtype=torch.int64, device=DEV))
    tok = [a[:, 0] for a in args]
    o, s = miras.memory_step(*tok, state=st, chunk_size=4)
    cot = torch.randn(o.shape, device=DEV)
    ins = list(args) + [kw["_X0"], kw["_P0"], A]
    g = torch.autograd.grad((o * cot).sum() + s.X.sum(), ins)
    # reference on the CPU
    ins64 = [t.detach().cpu().double().requires_grad_(True) for t in ins]
    st64 = MemoryState(X=ins64[6], P=ins64[7], anchor=ins64[8], offset=torch.ones(B, dtype=torch.int64))
    o_r, s_r = R.memory_step(*[a[:, 0] for a in ins64[:6]], state=st64, chunk_size=4)
    g_r = torch.autograd.grad((o_r * cot.cpu().double()).sum() + s_r.X.sum(), ins64)
    assert_close(o, o_r, F32_TOL, "o")
    for name, a, b in zip(["q", "k", "v", "lr", "alpha", "momentum", "X", "P", "anchor"], g, g_r):
        assert_close(a, b, F32_TOL, f"grad {name}")


# ---------------------------------------------------------------------------------------------
# One larger case (the shape of a real layer), bf16
# ---------------------------------------------------------------------------------------------
def test_cuda_large_bf16(path, seed):
    dtype, C = torch.bfloat16, 64
    case = Case(dtype, seed, B=2, T=512, H=4, Dk=128, Dv=128, C=C, momentum=True, bias="huber", retention="l2",
                initial_state=True)
    sup = path == "scan" or chunk_supports(dtype, 128, 128, C, "l2")
    res = call_or_skip(path, sup, run_cuda, case)
    compare(case, res, run_references(case))
