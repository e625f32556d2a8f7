"""``miras.interop``: the ops on DLPack arrays (NumPy here; JAX when installed), CPU.

- results equal the torch op's (same inputs as torch tensors), float64 and float32, batched and
  varlen, with momentum, tensor parameters and an initial state; prefill + steps;
- inputs are not copied: the tensors that reach ``torch.ops.miras.chunk_fwd`` point at the NumPy
  arrays' memory;
- outputs (and the state's fields) are NumPy arrays; torch in → torch out; an unknown DLPack
  producer → torch tensors (the documented fallback);
- a clear TypeError for a non-DLPack input.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_inputs, op_kwargs, state_of

miras = pytest.importorskip("miras")
from miras import interop  # noqa: E402
from miras.state import MemoryState  # noqa: E402

NAMES = ("q", "k", "v", "lr", "alpha", "momentum")


def _np(t):
    return None if t is None else t.detach().numpy().copy()


def _ptr(a) -> int:
    return a.__array_interface__["data"][0]


def _kw_np(kw):
    return {k: (_np(v) if isinstance(v, torch.Tensor) else v) for k, v in op_kwargs(kw).items()}


@pytest.fixture
def spy(monkeypatch):
    """Records the tensors passed to torch.ops.miras.chunk_fwd (then runs the real op)."""
    calls = []
    real = torch.ops.miras.chunk_fwd

    def wrapper(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(torch.ops.miras, "chunk_fwd", wrapper)
    return calls


def _assert_same(a, t, what):
    assert isinstance(a, np.ndarray), f"{what}: expected a numpy array, got {type(a).__name__}"
    ref = t.detach().numpy()
    assert a.dtype == ref.dtype and a.shape == ref.shape, f"{what}: {a.dtype}{a.shape} vs {ref.dtype}{ref.shape}"
    assert np.array_equal(a, ref), f"{what}: max |diff| {np.abs(a - ref).max()}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias,retention", [("huber", "elastic_net"), ("l2", "kl")], ids=["yaad-en", "l2-kl"])
def test_numpy_equals_torch_op_and_no_copy(dtype, bias, retention, seed, spy):
    args, kw = make_inputs(B=2, T=23, H=2, Dk=6, Dv=5, dtype=dtype, momentum=True, seed=seed, bias=bias,
                           retention=retention, initial_state=True)
    st = state_of(kw)
    o_t, s_t = miras.memory_update(*args, **op_kwargs(kw), chunk_size=8, initial_state=st, output_final_state=True)
    spy.clear()
    a = [_np(t) for t in args]
    akw = _kw_np(kw)
    ast = interop.ArrayState(X=_np(st.X), P=_np(st.P))
    o, s = interop.memory_update(*a, **akw, chunk_size=8, initial_state=ast, output_final_state=True)
    _assert_same(o, o_t, "o")
    for f in ("X", "P", "anchor", "offset"):
        _assert_same(getattr(s, f), getattr(s_t, f), f"state.{f}")
    # zero copy: the op read the numpy arrays' memory
    assert len(spy) == 1
    call = spy[0]
    for i, name in enumerate(NAMES):
        assert call[i].data_ptr() == _ptr(a[i]), f"{name} was copied"
    bias_t = call[6] if bias == "huber" else None
    if bias_t is not None:
        assert bias_t.data_ptr() == _ptr(akw["delta"]), "delta was copied"
    if retention == "elastic_net":
        assert call[7].data_ptr() == _ptr(akw["gamma"]), "gamma was copied"
    assert call[8].data_ptr() == _ptr(ast.X) and call[9].data_ptr() == _ptr(ast.P), "the state was copied"


def test_numpy_varlen(seed, spy):
    cu = [0, 9, 9, 30]
    args, kw = make_inputs(B=1, T=30, H=2, Dk=4, Dv=3, dtype=torch.float64, momentum=False, seed=seed, bias="lp",
                           retention="lq", initial_state=True, N=3)
    cu_t = torch.tensor(cu, dtype=torch.int64)
    o_t, s_t = miras.memory_update(*args, **op_kwargs(kw), chunk_size=4, cu_seqlens=cu_t,
                                   initial_state=state_of(kw), output_final_state=True)
    spy.clear()
    cu_np = np.array(cu, dtype=np.int64)
    a = [_np(t) for t in args]
    o, s = interop.memory_update(*a, **_kw_np(kw), chunk_size=4, cu_seqlens=cu_np,
                                 initial_state=interop.ArrayState(X=_np(kw["_X0"])), output_final_state=True)
    _assert_same(o, o_t, "o")
    for f in ("X", "anchor", "offset"):
        _assert_same(getattr(s, f), getattr(s_t, f), f"state.{f}")
    assert s.P is None
    assert spy[0][11].data_ptr() == _ptr(cu_np), "cu_seqlens was copied"
    assert spy[0][0].data_ptr() == _ptr(a[0])


def test_numpy_prefill_then_steps(seed):
    args, kw = make_inputs(B=2, T=13, H=2, Dk=5, Dv=4, dtype=torch.float64, momentum=True, seed=seed,
                           initial_state=True)
    C, T0 = 4, 6
    pre = [t[:, :T0] for t in args]
    o_t, s_t = miras.memory_update(*pre, chunk_size=C, initial_state=state_of(kw), output_final_state=True)
    o, s = interop.memory_update(*[_np(t) for t in pre], chunk_size=C,
                                 initial_state=interop.ArrayState(X=_np(kw["_X0"]), P=_np(kw["_P0"])),
                                 output_final_state=True)
    _assert_same(o, o_t, "prefill o")
    for t in range(T0, 13):
        tok = [a[:, t] for a in args]
        o_t, s_t = miras.memory_step(*tok, state=s_t, chunk_size=C)
        o, s = interop.memory_step(*[_np(x) for x in tok], state=s, chunk_size=C)
        _assert_same(o, o_t, f"step {t} o")
        for f in ("X", "P", "anchor", "offset"):
            _assert_same(getattr(s, f), getattr(s_t, f), f"step {t} state.{f}")
    # a MemoryState of torch tensors is accepted as the state too (outputs follow q: numpy)
    o2, _ = interop.memory_step(*[_np(a[:, 0]) for a in args], state=MemoryState(X=s_t.X, P=s_t.P,
                                anchor=s_t.anchor, offset=s_t.offset), chunk_size=C)
    assert isinstance(o2, np.ndarray)


def test_kinds_of_outputs(seed):
    args, kw = make_inputs(B=1, T=5, H=1, Dk=3, Dv=2, dtype=torch.float32, momentum=False, seed=seed)
    o_t, _ = miras.memory_update(*args[:5], chunk_size=2)
    o, st = interop.memory_update(*args[:5], chunk_size=2)  # torch in, torch out
    assert isinstance(o, torch.Tensor) and torch.equal(o, o_t) and st is None

    class Producer:  # a DLPack producer of no known library: the outputs stay torch tensors
        def __init__(self, a):
            self.a = a

        def __dlpack__(self, **kw):
            return self.a.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    o, _ = interop.memory_update(*[Producer(_np(t)) for t in args[:5]], chunk_size=2)
    assert isinstance(o, torch.Tensor) and torch.equal(o, o_t)


def test_non_dlpack_input_is_a_clear_error(seed):
    args, _ = make_inputs(B=1, T=5, H=1, Dk=3, Dv=2, dtype=torch.float64, momentum=False, seed=seed)
    a = [_np(t) for t in args[:5]]
    with pytest.raises(TypeError, match=r"q must be an array that supports DLPack .*got list"):
        interop.memory_update(a[0].tolist(), *a[1:])
    with pytest.raises(TypeError, match=r"lr must be an array that supports DLPack"):
        interop.memory_update(*a[:3], "0.1", a[4])
    with pytest.raises(TypeError, match=r"delta must be an array"):
        interop.memory_update(*a, bias="huber", delta=[1.0])
    with pytest.raises(TypeError, match=r"initial_state must be an ArrayState"):
        interop.memory_update(*a, initial_state=(a[0],))
    with pytest.raises(TypeError, match=r"state.X must be an array"):
        interop.memory_step(*[x[:, 0] for x in a], state=interop.ArrayState(X="not an array"))
    # the op's own checks still apply (ValueError naming the argument)
    with pytest.raises(ValueError, match="alpha"):
        interop.memory_update(*a[:4], a[4] * 0 + 2.0)


def test_jax_arrays(seed):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    args, kw = make_inputs(B=2, T=11, H=2, Dk=4, Dv=3, dtype=torch.float32, momentum=True, seed=seed,
                           initial_state=True)
    o_t, s_t = miras.memory_update(*args, chunk_size=4, initial_state=state_of(kw), output_final_state=True)
    ja = [jnp.asarray(_np(t)) for t in args]
    o, s = interop.memory_update(*ja, chunk_size=4, initial_state=interop.ArrayState(
        X=jnp.asarray(_np(kw["_X0"])), P=jnp.asarray(_np(kw["_P0"]))), output_final_state=True)
    assert isinstance(o, jax.Array) and isinstance(s.X, jax.Array)
    np.testing.assert_array_equal(np.asarray(o), o_t.numpy())
    np.testing.assert_array_equal(np.asarray(s.X), s_t.X.numpy())
    assert interop.to_torch(ja[0], "q").data_ptr() == ja[0].unsafe_buffer_pointer()
