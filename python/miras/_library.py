"""torch.library glue: fake (meta) kernels for torch.compile / export, and autograd for chunk_fwd.

The schemas live in C++ (csrc/torch/ops.cpp); importing ``miras._C`` registers them.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the schemas and the CPU/CUDA kernels)

_N_TENSOR_INPUTS = 12  # q k v lr alpha momentum bias_param ret_param X0 P0 A0 cu_seqlens
_N_SCALARS = 3  # icfg fcfg save_states (the configuration arrays: miras._C.config_fields())
_CHUNK = _C.config_fields()["ints"].index("chunk_size")


def _state_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _num_slots(N, T, C, varlen):
    return T // C + N if varlen else N * ((T + C - 1) // C)


def _same_device(q, **tensors):
    """The C++ glue's device check, for the fake kernels (which also serve meta tensors: a call mixing
    meta and real tensors dispatches here, not to the glue)."""
    for name, t in tensors.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"miras: {name} must be on q's device {q.device}, got {t.device}")


@torch.library.register_fake("miras::chunk_fwd")
def _chunk_fwd_fake(q, k, v, lr, alpha, momentum, bias_param, ret_param, X0, P0, A0, cu_seqlens, icfg, fcfg,
                    save_states):
    _same_device(q, k=k, v=v, lr=lr, alpha=alpha, momentum=momentum, bias_param=bias_param, ret_param=ret_param,
                 X0=X0, P0=P0, A0=A0, cu_seqlens=cu_seqlens)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    N = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else B
    sd = _state_dtype(q)
    st = q.new_empty((N, H, Dk, Dv), dtype=sd)
    none = q.new_empty((0,), dtype=sd)
    slots = _num_slots(N, T, icfg[_CHUNK], cu_seqlens is not None)
    o = q.new_empty((B, T, H, Dv))
    XT, AT = st, q.new_empty((N, H, Dk, Dv), dtype=sd)
    PT = q.new_empty((N, H, Dk, Dv), dtype=sd) if momentum is not None else none
    cX = q.new_empty((slots, H, Dk, Dv), dtype=sd) if save_states else q.new_empty((0,), dtype=sd)
    cP = (q.new_empty((slots, H, Dk, Dv), dtype=sd) if (save_states and momentum is not None)
          else q.new_empty((0,), dtype=sd))
    return o, XT, PT, AT, cX, cP


@torch.library.register_fake("miras::chunk_bwd")
def _chunk_bwd_fake(dO, dXT, dPT, q, k, v, lr, alpha, momentum, bias_param, ret_param, X0, P0, A0, cu_seqlens,
                    chunk_X, chunk_P, icfg, fcfg):
    _same_device(q, dO=dO, dXT=dXT, dPT=dPT, k=k, v=v, lr=lr, alpha=alpha, momentum=momentum, bias_param=bias_param,
                 ret_param=ret_param, X0=X0, P0=P0, A0=A0, cu_seqlens=cu_seqlens, chunk_X=chunk_X, chunk_P=chunk_P)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    N = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else B
    sd = _state_dtype(q)

    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    def state(ref):
        return q.new_empty((N, H, Dk, Dv), dtype=ref.dtype if ref is not None else sd)

    def none():  # a fresh tensor per absent output: outputs never alias
        return q.new_empty((0,), dtype=sd)

    return [
        like(q), like(k), like(v), like(lr), like(alpha),
        like(momentum) if momentum is not None else none(),
        like(bias_param) if bias_param is not None else none(),
        like(ret_param) if ret_param is not None else none(),
        state(X0),
        state(P0) if momentum is not None else none(),
        state(A0) if A0 is not None else none(),
    ]


def _setup_context(ctx, inputs, output):
    tensors = inputs[:_N_TENSOR_INPUTS]
    scalars = inputs[_N_TENSOR_INPUTS:]
    o, XT, PT, AT, cX, cP = output
    ctx.save_for_backward(*tensors, cX, cP)
    ctx.scalars = scalars
    ctx.o_shape = o.shape
    ctx.mark_non_differentiable(AT, cX, cP)


def _backward(ctx, dO, dXT, dPT, dAT, dcX, dcP):
    (q, k, v, lr, alpha, momentum, bias_param, ret_param, X0, P0, A0, cu, cX, cP) = ctx.saved_tensors
    icfg, fcfg, save_states = ctx.scalars
    if not save_states:
        raise RuntimeError("miras: backward through chunk_fwd called with save_states=False; call the op with "
                           "save_states=True when gradients are needed (memory_update does this for you)")
    if dO is None:
        dO = q.new_zeros(ctx.o_shape)
    if momentum is None:
        dPT = None
    grads = torch.ops.miras.chunk_bwd(dO, dXT, dPT, q, k, v, lr, alpha, momentum, bias_param, ret_param, X0, P0, A0,
                                      cu, cX, cP, icfg, fcfg)
    dq, dk, dv, dlr, dalpha, dmom, dbp, drp, dX0, dP0, dA0 = grads
    return (dq, dk, dv, dlr, dalpha,
            dmom if momentum is not None else None,
            dbp if bias_param is not None else None,
            drp if ret_param is not None else None,
            dX0 if X0 is not None else None,
            dP0 if (P0 is not None and momentum is not None) else None,
            dA0 if A0 is not None else None,
            None) + (None,) * _N_SCALARS


torch.library.register_autograd("miras::chunk_fwd", _backward, setup_context=_setup_context)


# ---- MLP memory: miras::mlp_chunk_fwd / miras::mlp_chunk_bwd (CPU) -------------------------------
# tensor inputs: q k v lr alpha momentum bias_param ret_param ln_weight ln_bias W1 W2 P1 P2 A1 A2 cu_seqlens
_MLP_N_TENSOR_INPUTS = 17


@torch.library.register_fake("miras::mlp_chunk_fwd")
def _mlp_chunk_fwd_fake(q, k, v, lr, alpha, momentum, bias_param, ret_param, ln_weight, ln_bias, W1, W2, P1, P2, A1,
                        A2, cu_seqlens, icfg, fcfg, save_states):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    Dh = W1.shape[-1]
    N = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else B
    sd = _state_dtype(q)

    def mat(r, c):
        return q.new_empty((N, H, r, c), dtype=sd)

    def none():
        return q.new_empty((0,), dtype=sd)

    slots = _num_slots(N, T, icfg[_CHUNK], cu_seqlens is not None)
    Sz = Dk * Dh + Dh * Dv
    mom = momentum is not None
    cX = q.new_empty((slots, H, Sz), dtype=sd) if save_states else none()
    cP = q.new_empty((slots, H, Sz), dtype=sd) if (save_states and mom) else none()
    return (q.new_empty((B, T, H, Dv)), mat(Dk, Dh), mat(Dh, Dv), mat(Dk, Dh) if mom else none(),
            mat(Dh, Dv) if mom else none(), mat(Dk, Dh), mat(Dh, Dv), cX, cP)


@torch.library.register_fake("miras::mlp_chunk_bwd")
def _mlp_chunk_bwd_fake(dO, dW1T, dW2T, dP1T, dP2T, q, k, v, lr, alpha, momentum, bias_param, ret_param, ln_weight,
                        ln_bias, W1, W2, P1, P2, A1, A2, cu_seqlens, chunk_X, chunk_P, icfg, fcfg):
    sd = _state_dtype(q)
    mom = momentum is not None

    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    def like_or_state(t, ref):  # the gradient of an optional input: its dtype, or the state dtype
        return ref.new_empty(ref.shape, dtype=t.dtype if t is not None else sd)

    def none():  # a fresh tensor per absent output: outputs never alias
        return q.new_empty((0,), dtype=sd)

    return [
        like(q), like(k), like(v), like(lr), like(alpha),
        like(momentum) if mom else none(),
        like(bias_param) if bias_param is not None else none(),
        like(ret_param) if ret_param is not None else none(),
        like(ln_weight) if ln_weight is not None else none(),
        like(ln_bias) if ln_bias is not None else none(),
        like(W1), like(W2),
        like_or_state(P1, W1) if mom else none(),
        like_or_state(P2, W2) if mom else none(),
        like(A1) if A1 is not None else none(),
        like(A2) if A2 is not None else none(),
    ]


def _mlp_setup_context(ctx, inputs, output):
    tensors = inputs[:_MLP_N_TENSOR_INPUTS]
    scalars = inputs[_MLP_N_TENSOR_INPUTS:]
    o, W1T, W2T, P1T, P2T, A1T, A2T, cX, cP = output
    ctx.save_for_backward(*tensors, cX, cP)
    ctx.scalars = scalars
    ctx.o_shape = o.shape
    ctx.mark_non_differentiable(A1T, A2T, cX, cP)


def _mlp_backward(ctx, dO, dW1T, dW2T, dP1T, dP2T, dA1T, dA2T, dcX, dcP):
    (q, k, v, lr, alpha, momentum, bias_param, ret_param, ln_weight, ln_bias, W1, W2, P1, P2, A1, A2, cu, cX,
     cP) = ctx.saved_tensors
    icfg, fcfg, save_states = ctx.scalars
    if not save_states:
        raise RuntimeError("miras: backward through mlp_chunk_fwd called with save_states=False; call the op with "
                           "save_states=True when gradients are needed (memory_update does this for you)")
    if dO is None:
        dO = q.new_zeros(ctx.o_shape)
    if momentum is None:
        dP1T = dP2T = None
    g = torch.ops.miras.mlp_chunk_bwd(dO, dW1T, dW2T, dP1T, dP2T, q, k, v, lr, alpha, momentum, bias_param,
                                      ret_param, ln_weight, ln_bias, W1, W2, P1, P2, A1, A2, cu, cX, cP, icfg, fcfg)
    present = (q, k, v, lr, alpha, momentum, bias_param, ret_param, ln_weight, ln_bias, W1, W2,
               P1 if momentum is not None else None, P2 if momentum is not None else None, A1, A2)
    return tuple(gi if t is not None else None for gi, t in zip(g, present)) + (None,) + (None,) * _N_SCALARS


torch.library.register_autograd("miras::mlp_chunk_fwd", _mlp_backward, setup_context=_mlp_setup_context)
