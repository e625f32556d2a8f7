"""Autograd and torch.library integration of the op.

- ``torch.autograd.gradcheck`` (float64, finite differences) of ``miras.memory_update`` on the CPU:
  momentum, tensor-valued parameters, an initial state, varlen;
- ``torch.library.opcheck`` of ``torch.ops.miras.chunk_fwd`` / ``chunk_bwd`` (schema, fake
  kernels, autograd registration, AOT dispatch);
- ``torch.compile(fullgraph=True)`` of a small module calling ``miras.memory_update``: forward
  and backward run and match eager.
"""
from __future__ import annotations

import pytest
import torch

from conftest import assert_close, assert_compiled_matches, make_inputs, op_cfg, op_kwargs

miras = pytest.importorskip("miras")
from miras.state import MemoryState  # noqa: E402

# Finite differences in float64 with eps 1e-6: truncation error ~1e-12·|f'''|, well inside
# atol 1e-6 / rtol 1e-4 for these O(1) functions, while any wrong gradient term is ≥ 1e-3.
GC = dict(eps=1e-6, atol=1e-6, rtol=1e-4)

GRADCHECK_CASES = [
    # bias, huber_mode, retention, momentum, init, chunk_size, varlen
    ("l2", "yaad", "l2", False, False, 2, False),
    ("l2", "yaad", "l2", True, True, 3, False),
    ("huber", "yaad", "kl", True, True, 2, False),
    ("huber", "coord", "elastic_net", False, True, 4, False),
    ("huber", "norm", "lq", True, False, 2, False),
    ("robust", "yaad", "elastic_net", True, True, 3, False),
    ("lp", "yaad", "kl", False, True, 1, False),
    ("dot", "yaad", "lq", True, True, 2, False),
    ("l2", "yaad", "kl", True, True, 2, True),
    ("robust", "yaad", "l2", False, True, 3, True),
]
GC_IDS = [f"{b}{'-' + m if b == 'huber' else ''}-{r}{'-mom' if mo else ''}{'-init' if i else ''}-C{c}"
          f"{'-varlen' if vl else ''}" for b, m, r, mo, i, c, vl in GRADCHECK_CASES]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=GC_IDS)
def test_gradcheck_memory_update(case, seed):
    bias, hm, retention, momentum, init, C, varlen = case
    if varlen:
        cu = torch.tensor([0, 2, 3, 7], dtype=torch.int64)
        B, T, N = 1, 7, 3
    else:
        cu, B, T, N = None, 2, 5, 2
    H, Dk, Dv = 1, 3, 2
    args, kw = make_inputs(B=B, T=T, H=H, Dk=Dk, Dv=Dv, momentum=momentum, seed=seed, bias=bias, huber_mode=hm,
                           retention=retention, initial_state=init, N=N)
    names = ["q", "k", "v", "lr", "alpha"] + (["momentum"] if momentum else [])
    tensors = [a for a in args if a is not None]
    pnames = [n for n in ("delta", "robust_delta", "gamma") if isinstance(kw.get(n), torch.Tensor)]
    tensors += [kw[n] for n in pnames]
    snames = []
    if init:
        snames = ["X0"] + (["P0"] if momentum else [])
        tensors += [kw["_X0"]] + ([kw["_P0"]] if momentum else [])
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in tensors)
    static = {k: v for k, v in op_kwargs(kw).items() if k not in pnames}

    def f(*xs):
        it = iter(xs)
        a = [next(it) for _ in names]
        if not momentum:
            a.append(None)
        p = {n: next(it) for n in pnames}
        st = None
        if init:
            X0 = next(it)
            P0 = next(it) if momentum else None
            st = MemoryState(X=X0, P=P0)
        o, s = miras.memory_update(*a, **static, **p, chunk_size=C, initial_state=st, output_final_state=True,
                                   cu_seqlens=cu)
        return (o, s.X) + ((s.P,) if momentum else ())

    assert torch.autograd.gradcheck(f, inputs, **GC)


def test_gradcheck_catches_a_wrong_function(seed):
    """The harness above can fail: a function whose backward is wrong does not pass."""
    args, kw = make_inputs(B=1, T=4, H=1, Dk=3, Dv=2, momentum=False, seed=seed)
    q = args[0].detach().clone().requires_grad_(True)

    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 1.0

        @staticmethod
        def backward(ctx, g):
            return g * 1.01

    def f(x):
        o, _ = miras.memory_update(Wrong.apply(x), *args[1:5], chunk_size=2)
        return o

    assert not torch.autograd.gradcheck(f, (q,), raise_exception=False, **GC)


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck
# ---------------------------------------------------------------------------------------------
def _fwd_args(seed, momentum=True, init=True, cu=False, bias_code=3, ret_code=2, C=3, requires_grad=True):
    """Positional args of torch.ops.miras.chunk_fwd."""
    B, T = (1, 8) if cu else (2, 7)
    N = 3 if cu else B
    args, kw = make_inputs(B=B, T=T, H=2, Dk=4, Dv=3, momentum=momentum, seed=seed, bias="huber",
                           retention="elastic_net", initial_state=init, N=N, requires_grad=requires_grad)
    q, k, v, lr, alpha, mom = args
    cu_t = torch.tensor([0, 3, 3, 8], dtype=torch.int64) if cu else None
    X0 = kw.get("_X0")
    P0 = kw.get("_P0")
    return [q, k, v, lr, alpha, mom, kw["delta"], kw["gamma"], X0, P0, None, cu_t,
            *op_cfg(bias=bias_code, retention=ret_code, bias_param=1.0, ret_param=0.0, scale=0.5, chunk_size=C), True]


@pytest.mark.parametrize("variant", ["full", "nomom-noinit", "varlen"])
def test_opcheck_chunk_fwd(variant, seed):
    if variant == "full":
        a = _fwd_args(seed)
    elif variant == "nomom-noinit":
        a = _fwd_args(seed, momentum=False, init=False)
    else:
        a = _fwd_args(seed, cu=True)
    torch.library.opcheck(torch.ops.miras.chunk_fwd.default, tuple(a))


def test_opcheck_chunk_fwd_with_anchor(seed):
    """The step-op form: a separate anchor A0 (differentiable)."""
    a = _fwd_args(seed, C=1)
    a[10] = (a[8].detach() + 0.05).requires_grad_(True)
    torch.library.opcheck(torch.ops.miras.chunk_fwd.default, tuple(a))


@pytest.mark.parametrize("momentum", [False, True], ids=["nomom", "mom"])
def test_opcheck_chunk_bwd(momentum, seed):
    a = _fwd_args(seed, momentum=momentum, requires_grad=False)
    o, XT, PT, AT, cX, cP = torch.ops.miras.chunk_fwd(*a)
    g = torch.Generator().manual_seed(seed)
    dO = torch.randn(o.shape, generator=g, dtype=o.dtype)
    dXT = torch.randn(XT.shape, generator=g, dtype=XT.dtype)
    dPT = torch.randn(XT.shape, generator=g, dtype=XT.dtype) if momentum else None
    bwd = [dO, dXT, dPT] + a[:12] + [cX, cP] + a[12:14]
    torch.library.opcheck(torch.ops.miras.chunk_bwd.default, tuple(bwd))
    # chunk_bwd is what autograd calls: its results are the gradients autograd returns.
    grads = torch.ops.miras.chunk_bwd(*bwd)
    leaves = [t.detach().clone().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point()
              else t for t in a[:12]]
    out = torch.ops.miras.chunk_fwd(*leaves, *a[12:])
    loss = (out[0] * dO).sum() + (out[1] * dXT).sum() + ((out[2] * dPT).sum() if momentum else 0)
    idx = [i for i in range(10) if isinstance(leaves[i], torch.Tensor)]
    auto = torch.autograd.grad(loss, [leaves[i] for i in idx])
    for i, ga in zip(idx, auto):
        assert_close(grads[i], ga, 1e-12, f"chunk_bwd output {i}")


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------
class TinyMemoryLayer(torch.nn.Module):
    def __init__(self, d_model=12, H=2, Dk=4, Dv=3, retention="l2", bias="huber"):
        super().__init__()
        self.H, self.Dk, self.Dv = H, Dk, Dv
        self.qkv = torch.nn.Linear(d_model, H * (2 * Dk + Dv))
        self.gates = torch.nn.Linear(d_model, 3 * H)
        self.out = torch.nn.Linear(H * Dv, d_model)
        self.retention, self.bias = retention, bias

    def forward(self, x):
        B, T, _ = x.shape
        H, Dk, Dv = self.H, self.Dk, self.Dv
        q, k, v = self.qkv(x).view(B, T, H, 2 * Dk + Dv).split([Dk, Dk, Dv], dim=-1)
        k = torch.nn.functional.normalize(k, dim=-1)
        g = self.gates(x).view(B, T, H, 3)
        lr = 0.5 * torch.sigmoid(g[..., 0])
        alpha = 0.5 + 0.5 * torch.sigmoid(g[..., 1])
        mom = 0.9 * torch.sigmoid(g[..., 2])
        o, _ = miras.memory_update(q.contiguous(), k.contiguous(), v.contiguous(), lr, alpha, mom, bias=self.bias,
                                   retention=self.retention, delta=1.0, chunk_size=4)
        return self.out(o.reshape(B, T, H * Dv))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, seed):
    torch.manual_seed(seed)
    assert_compiled_matches(TinyMemoryLayer(retention="kl").double(), torch.randn(2, 10, 12, dtype=torch.float64),
                            backend)


@pytest.mark.parametrize("varlen", [False, True], ids=["batched", "varlen"])
def test_chunk_fwd_outputs_deterministic(varlen, seed):
    """Every output of chunk_fwd (the saved chunk states included: opcheck and torch.compile
    compare them) is a function of the inputs, not of leftover memory. With cu_seqlens the saved
    states have T/C + N slots (an upper bound): the unused ones must be written too."""
    a = _fwd_args(seed, cu=varlen, requires_grad=False)
    r1 = torch.ops.miras.chunk_fwd(*a)
    junk = [torch.full_like(t, float("nan")) for t in r1]  # dirty memory the allocator may hand back
    del junk
    r2 = torch.ops.miras.chunk_fwd(*a)
    for name, x, y in zip(["o", "XT", "PT", "AT", "chunk_X", "chunk_P"], r1, r2):
        assert torch.isfinite(y).all(), f"{name} has non-finite entries"
        assert torch.equal(x, y), f"{name} differs between two identical calls"


@pytest.mark.parametrize("which", ["X0", "delta", "gamma", "lr"])
def test_grad_when_only_one_input_requires_grad(which, seed):
    """The op saves its chunk states whenever *any* input needs a gradient (here a single one)."""
    args, kw = make_inputs(B=2, T=11, H=2, Dk=4, Dv=3, momentum=True, seed=seed, bias="huber", retention="elastic_net",
                           initial_state=True)
    if which == "lr":
        args[3].requires_grad_(True)
        t = args[3]
    else:
        key = "_X0" if which == "X0" else which
        kw[key].requires_grad_(True)
        t = kw[key]
    st = MemoryState(X=kw["_X0"], P=kw["_P0"])
    o, s = miras.memory_update(*args, **op_kwargs(kw), chunk_size=3, initial_state=st, output_final_state=True)
    g, = torch.autograd.grad((o ** 2).sum() + s.X.sum(), [t])
    from miras import reference as R
    o_r, s_r = R.memory_update_loop(*args, **op_kwargs(kw), chunk_size=3, initial_state=st, output_final_state=True)
    g_r, = torch.autograd.grad((o_r ** 2).sum() + s_r.X.sum(), [t])
    assert g_r.abs().max() > 0
    assert_close(g, g_r, 1e-10, f"grad {which}")


@pytest.mark.parametrize("momentum", [False, True], ids=["nomom", "mom"])
def test_chunk_bwd_outputs_do_not_alias(momentum, seed):
    """Custom-op outputs may not alias each other (PyTorch warns today and will raise): every
    returned tensor, the empty placeholders of absent inputs too, has its own storage."""
    a = _fwd_args(seed, momentum=momentum, init=False, requires_grad=False)
    a[6] = None  # no tensor bias param
    a[7] = None  # no tensor retention param
    o, XT, PT, AT, cX, cP = torch.ops.miras.chunk_fwd(*a)
    bwd = [torch.ones_like(o), None, None] + a[:12] + [cX, cP] + a[12:14]
    outs = torch.ops.miras.chunk_bwd(*bwd)
    storages = [t.untyped_storage()._cdata for t in outs]
    assert len(set(storages)) == len(storages), "chunk_bwd returns the same tensor/storage more than once"
    fwd = torch.ops.miras.chunk_fwd(*a)
    storages = [t.untyped_storage()._cdata for t in fwd]
    assert len(set(storages)) == len(storages), "chunk_fwd returns the same tensor/storage more than once"
