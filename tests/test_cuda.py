"""The CUDA op against the float64 reference (run on the CPU with the upcast inputs).

Both kernel families are exercised through ``MIRAS_CUDA_PATH`` (read by the dispatcher on every
call): ``chunk`` (tensor-core dual form: retention l2, float16/bfloat16, Dk, Dv ∈ {64, 128},
C ∈ {16, 32, 64}) and ``scan`` (exact float32 per-token scan: everything). Where a family
refuses a configuration outside that envelope it raises ValueError naming MIRAS_CUDA_PATH and
the test is skipped; a refusal *inside* the documented envelope fails.

Tolerances (relative over the whole tensor):
- float32 inputs: 1e-4 — the kernels accumulate in float32 (eps 6e-8) over up to 256 tokens and
  D = 128 reductions; 1e-4 is ~100× that growth, while a wrong term is ≥ 1e-3.
  Gradients with the Huber "yaad" bias: 1e-3 (its ψ jumps at ‖e‖ = δ and is sign-like outside:
  1e-7 noise on float64 inputs moves the float64 gradients by up to ~3e-4, measured), and with
  elastic net (float32 rounding can flip a threshold decision |z| vs γ among the ~10^6 entries
  compared per run; one flip moved a gradient by 1.5e-4 in a dry run of this file on the CPU op).
- float16 / bfloat16 inputs: 2e-2 for outputs and states — one bf16 rounding is ~4e-3 and the
  tensor-core path rounds its GEMM operands to the input dtype. Gradients are returned in the
  input's dtype (one more bf16 rounding) and go through twice as many low-precision GEMMs: 3e-2.
Ground truth is ``reference.memory_update_chunked`` (float64, CPU), which test_reference.py
checks against the per-token loop: the loop is too slow for these sizes.
"""
from __future__ import annotations

import pytest
import torch

from conftest import (BIAS_IDS, BIAS_MODES, assert_close, cotangents, cuda_available, grads, leaves, loss_of,
                      make_inputs, op_kwargs, state_of, upcast)

miras = pytest.importorskip("miras")
from miras import reference as R  # noqa: E402
from miras.state import MemoryState  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU or no CUDA kernels in this build")]

F32_TOL = 1e-4
LOW_TOL = 2e-2
LOW_GRAD_TOL = 3e-2
DEV = "cuda"

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def tol_for(dtype, kw=None):
    yaad = kw is not None and kw.get("bias") == "huber" and kw.get("huber_mode", "yaad") == "yaad"
    en = kw is not None and kw.get("retention") == "elastic_net"
    if dtype == torch.float32:
        return F32_TOL, (1e-3 if yaad or en else F32_TOL)
    return LOW_TOL, LOW_GRAD_TOL


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


def run_cuda(args, kw, C, cot_seed, **extra):
    """The op on the inputs' device (CUDA, or the CPU for the CPU-vs-CUDA test), with gradients."""
    st = state_of(kw)
    o, s = miras.memory_update(*args, **op_kwargs(kw), chunk_size=C, initial_state=st, output_final_state=True,
                               **extra)
    cot = cotangents(o, s, cot_seed)
    named = leaves(args, kw)
    g = grads(loss_of(o, s, cot), named)
    if o.is_cuda:
        torch.cuda.synchronize()
    return o, s, g


def run_reference(args, kw, C, cot_seed, fn=None, **extra):
    fn = fn or R.memory_update_chunked
    args64, kw64 = upcast(args), upcast(kw)
    extra = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in extra.items()}
    st = state_of(kw64)
    o, s = fn(*args64, **op_kwargs(kw64), chunk_size=C, initial_state=st, output_final_state=True, **extra)
    cot = cotangents(o, s, cot_seed)
    g = grads(loss_of(o, s, cot), leaves(args64, kw64))
    return o, s, g


def compare(res, ref, tol, gtol):
    (o, s, g), (o_r, s_r, g_r) = res, ref
    assert o.is_cuda and s.X.is_cuda
    assert torch.isfinite(o_r).all() and float(o_r.detach().abs().max()) < 1e3, "reference diverged: fix the inputs"
    assert_close(o, o_r, tol, "o")
    assert_close(s.X, s_r.X, tol, "final X")
    if s_r.P is not None:
        assert_close(s.P, s_r.P, tol, "final P")
    assert_close(s.anchor, s_r.anchor, tol, "final anchor")
    assert torch.equal(s.offset.cpu().long(), s_r.offset.cpu().long())
    for name, gr in g_r.items():
        assert g[name] is not None, f"no gradient for {name}"
        assert g[name].is_cuda
        assert_close(g[name], gr, gtol, f"grad {name}")


def cuda_inputs(dtype, seed, *, B=2, T=100, H=2, Dk=64, Dv=64, **kw):
    """q, k, v in ``dtype``; gates, tensor params and states in float32 (the usual mixed setup)."""
    return make_inputs(B=B, T=T, H=H, Dk=Dk, Dv=Dv, dtype=dtype, device=DEV, seed=seed, requires_grad=True,
                       gate_dtype=torch.float32, state_dtype=torch.float32, **kw)


# ---------------------------------------------------------------------------------------------
# Retention l2: every bias × momentum on both families (dtype, dims and C rotate over the cases)
# ---------------------------------------------------------------------------------------------
ROT = [(torch.bfloat16, 64, 64, 16), (torch.float16, 128, 128, 32), (torch.bfloat16, 128, 128, 64),
       (torch.float32, 32, 48, 16), (torch.float16, 64, 64, 64), (torch.float32, 64, 64, 32),
       (torch.bfloat16, 64, 128, 32)]


@pytest.mark.parametrize("momentum", [False, True], ids=["nomom", "mom"])
@pytest.mark.parametrize("bi", range(len(BIAS_MODES)), ids=BIAS_IDS)
def test_cuda_l2_every_bias(path, bi, momentum, seed):
    bias, hm = BIAS_MODES[bi]
    dtype, Dk, Dv, C = ROT[(bi + 3 * momentum) % len(ROT)]
    args, kw = cuda_inputs(dtype, seed, T=100, Dk=Dk, Dv=Dv, momentum=momentum, bias=bias, huber_mode=hm,
                           retention="l2", initial_state=True)
    res = call_or_skip(path, path == "scan" or chunk_supports(dtype, Dk, Dv, C, "l2"), run_cuda, args, kw, C, seed)
    compare(res, run_reference(args, kw, C, seed), *tol_for(dtype, kw))


@pytest.mark.parametrize("C", [16, 32, 64])
@pytest.mark.parametrize("dims", [(64, 64), (128, 128), (32, 48)], ids=["d64", "d128", "d32x48"])
@pytest.mark.parametrize("dt", list(DTYPES), ids=list(DTYPES))
def test_cuda_dtype_dims_chunk_grid(path, dt, dims, C, seed):
    """dtype × head dims × chunk size, retention l2, Huber (Yaad) bias with momentum; T = 150 is
    not a multiple of any C; no initial state (zeros)."""
    dtype = DTYPES[dt]
    Dk, Dv = dims
    args, kw = cuda_inputs(dtype, seed, B=1, T=150, H=2, Dk=Dk, Dv=Dv, momentum=True, bias="huber",
                           retention="l2")
    res = call_or_skip(path, path == "scan" or chunk_supports(dtype, Dk, Dv, C, "l2"), run_cuda, args, kw, C, seed)
    compare(res, run_reference(args, kw, C, seed), *tol_for(dtype, kw))


# ---------------------------------------------------------------------------------------------
# Map-based retentions on the scan family (float32)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [False, True], ids=["nomom", "mom"])
@pytest.mark.parametrize("bias_mode", [("l2", "yaad"), ("lp", "yaad"), ("huber", "norm"), ("robust", "yaad")],
                         ids=["l2", "lp", "huber-norm", "robust"])
@pytest.mark.parametrize("retention", ["kl", "elastic_net", "lq"])
def test_cuda_scan_map_retentions(monkeypatch, retention, bias_mode, momentum, seed):
    monkeypatch.setenv("MIRAS_CUDA_PATH", "scan")
    bias, hm = bias_mode
    Dk, Dv = (32, 48) if momentum else (64, 64)
    args, kw = cuda_inputs(torch.float32, seed, T=70, Dk=Dk, Dv=Dv, momentum=momentum, bias=bias, huber_mode=hm,
                           retention=retention, initial_state=True)
    compare(run_cuda(args, kw, 16, seed), run_reference(args, kw, 16, seed), *tol_for(torch.float32, kw))


@pytest.mark.parametrize("retention", ["kl", "elastic_net", "lq"])
def test_cuda_chunk_family_refuses_map_retentions(monkeypatch, retention, seed):
    monkeypatch.setenv("MIRAS_CUDA_PATH", "chunk")
    args, kw = cuda_inputs(torch.bfloat16, seed, T=32, momentum=False, retention=retention)
    with pytest.raises(ValueError, match="MIRAS_CUDA_PATH"):
        miras.memory_update(*args, **op_kwargs(kw), chunk_size=16)


def test_cuda_auto_path_runs_everything(monkeypatch, seed):
    """Without MIRAS_CUDA_PATH every configuration runs (one family or the other)."""
    monkeypatch.delenv("MIRAS_CUDA_PATH", raising=False)
    for retention, dtype, dims in [("l2", torch.bfloat16, (64, 64)), ("kl", torch.bfloat16, (64, 64)),
                                   ("lq", torch.float32, (32, 48)), ("l2", torch.float16, (32, 48))]:
        args, kw = cuda_inputs(dtype, seed, T=40, Dk=dims[0], Dv=dims[1], momentum=True, retention=retention)
        res = run_cuda(args, kw, 16, seed)
        compare(res, run_reference(args, kw, 16, seed), *tol_for(dtype, kw))


def test_cuda_float64_refused(seed):
    args, kw = make_inputs(B=1, T=8, H=1, Dk=8, Dv=8, dtype=torch.float64, device=DEV, seed=seed)
    with pytest.raises(ValueError, match="float64"):
        miras.memory_update(*args, chunk_size=4)


# ---------------------------------------------------------------------------------------------
# Varlen, state continuation, determinism, CPU agreement, memory_step
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cu_list", [[0, 37, 38, 100, 161], [0, 50, 50, 99]],
                         ids=["uneven-len1", "empty"])
@pytest.mark.parametrize("dt", ["bf16", "f32"])
def test_cuda_varlen(path, dt, cu_list, seed):
    dtype = DTYPES[dt]
    N, T = len(cu_list) - 1, cu_list[-1]
    C = 32
    cu = torch.tensor(cu_list, dtype=torch.int32, device=DEV)
    args, kw = cuda_inputs(dtype, seed, B=1, T=T, H=2, Dk=64, Dv=64, momentum=True, bias="robust",
                           retention="l2", initial_state=True, N=N)
    res = call_or_skip(path, path == "scan" or chunk_supports(dtype, 64, 64, C, "l2"), run_cuda, args, kw, C, seed,
                       cu_seqlens=cu)
    ref = run_reference(args, kw, C, seed, cu_seqlens=cu.long())
    compare(res, ref, *tol_for(dtype, kw))
    for n in range(N):
        if cu_list[n] == cu_list[n + 1]:  # an empty segment keeps its state
            torch.testing.assert_close(res[1].X[n], kw["_X0"][n].detach(), rtol=0, atol=0)


def test_cuda_state_continuation(path, seed):
    """initial_state from a previous call (at a chunk boundary) == one call over both parts."""
    dtype, C, cut, T = torch.bfloat16, 32, 64, 150
    args, kw = cuda_inputs(dtype, seed, T=T, momentum=True, bias="l2", retention="l2")
    sup = path == "scan" or chunk_supports(dtype, 64, 64, C, "l2")
    kwo = op_kwargs(kw)
    with torch.no_grad():
        o, s = call_or_skip(path, sup, miras.memory_update, *args, **kwo, chunk_size=C, output_final_state=True)
        o1, s1 = miras.memory_update(*[a[:, :cut] for a in args], **kwo, chunk_size=C, output_final_state=True)
        o2, s2 = miras.memory_update(*[a[:, cut:] for a in args], **kwo, chunk_size=C, initial_state=s1,
                                     output_final_state=True)
    # The split rounds the state to float32 at the cut (as does the single call): tight tolerance.
    assert_close(torch.cat([o1, o2], 1), o, 1e-2 if dtype != torch.float32 else 1e-5, "o")
    assert_close(s2.X, s.X, 1e-4, "X")
    assert_close(s2.P, s.P, 1e-4, "P")
    # and the continued state agrees with the reference from the same CUDA state
    args2 = [a[:, cut:] for a in args]
    kw2 = dict(kwo, _X0=s1.X.float(), _P0=s1.P.float())
    ref = run_reference(args2, kw2, C, seed)
    assert_close(o2, ref[0], LOW_TOL, "o (continued) vs reference")


def test_cuda_deterministic_and_finite(path, seed):
    """Forward twice (with dirty memory in between): bitwise identical, finite; backward finite."""
    dtype, C = torch.bfloat16, 64
    args, kw = cuda_inputs(dtype, seed, B=2, T=200, H=2, Dk=128, Dv=128, momentum=True, bias="huber",
                           retention="l2", initial_state=True)
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
    dtype = DTYPES[dt]
    C = 16
    args, kw = cuda_inputs(dtype, seed, T=90, momentum=True, bias="lp", retention="l2", initial_state=True)
    sup = path == "scan" or chunk_supports(dtype, 64, 64, C, "l2")
    o, s, g = call_or_skip(path, sup, run_cuda, args, kw, C, seed)
    cpu_args = [None if a is None else a.detach().cpu().requires_grad_(True) for a in args]
    cpu_kw = {k: (v.detach().cpu().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
              for k, v in kw.items()}
    o_c, s_c, g_c = run_cuda(cpu_args, cpu_kw, C, seed)  # the C++ CPU op, same dtypes
    assert not o_c.is_cuda and o_c.dtype == dtype
    # Compares two low-precision implementations: each is within tol of float64, so 2·tol.
    tol, gtol = tol_for(dtype, kw)
    assert_close(o, o_c, 2 * tol, "o CUDA vs CPU")
    assert_close(s.X, s_c.X, 2 * tol, "X CUDA vs CPU")
    for name in g_c:
        assert_close(g[name], g_c[name], 2 * gtol, f"grad {name} CUDA vs CPU")


@pytest.mark.parametrize("dt,retention", [("f32", "kl"), ("bf16", "l2"), ("f32", "l2")])
def test_cuda_memory_step(dt, retention, seed, monkeypatch):
    """Prefill on CUDA (ending mid-chunk) + memory_step per token == memory_update over all tokens."""
    monkeypatch.delenv("MIRAS_CUDA_PATH", raising=False)
    dtype = DTYPES[dt]
    C, T0, T = 16, 21, 40
    args, kw = cuda_inputs(dtype, seed, B=2, T=T, H=2, Dk=64, Dv=64, momentum=True, bias="huber",
                           retention=retention)
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
    tol = 1e-4 if dtype == torch.float32 else LOW_TOL
    assert_close(o_chain, o_full, tol, "o")
    assert_close(st.X, s_full.X, tol, "X")
    assert torch.equal(st.offset.cpu(), s_full.offset.cpu())
    # and the decoded outputs / final state against the float64 reference over the whole sequence
    o_ref, s_ref = R.memory_update_chunked(*upcast(args), **upcast(kwo), chunk_size=C, output_final_state=True)
    assert_close(o_chain, o_ref, tol, "o vs reference")
    assert_close(st.X, s_ref.X, tol, "X vs reference")
    assert_close(st.anchor, s_ref.anchor, tol, "anchor vs reference")


def test_cuda_memory_step_gradients(seed, monkeypatch):
    monkeypatch.delenv("MIRAS_CUDA_PATH", raising=False)
    B, H, Dk, Dv = 2, 2, 32, 48
    args, kw = cuda_inputs(torch.float32, seed, B=B, T=1, H=H, Dk=Dk, Dv=Dv, momentum=True, bias="l2",
                           retention="l2", initial_state=True)
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
    args, kw = cuda_inputs(dtype, seed, B=2, T=512, H=4, Dk=128, Dv=128, momentum=True, bias="huber",
                           retention="l2", initial_state=True)
    sup = path == "scan" or chunk_supports(dtype, 128, 128, C, "l2")
    res = call_or_skip(path, sup, run_cuda, args, kw, C, seed)
    compare(res, run_reference(args, kw, C, seed), LOW_TOL, LOW_GRAD_TOL)
