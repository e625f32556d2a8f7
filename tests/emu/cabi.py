"""ctypes binding of the C ABI (csrc/capi/miras.h) for the kernel emulator's tests.

``Emu(path)`` loads ``libmiras_emu.so`` (the C ABI with the CUDA kernels compiled for the host,
csrc/emu) and runs ``miras_chunk_fwd`` / ``miras_chunk_bwd`` / ``miras_step`` with
``MIRAS_DEVICE_CUDA``: the same entry points (``chunk_*_cuda`` in core/backends.h, the launchers
in csrc/cuda, the C ABI's own kernels) a GPU build runs. "Device" memory is host memory: torch
CPU tensors, and workspaces from the emulator's ``cudaMalloc`` (filled with NaN bytes).
``Emu(path, emulator=False)`` drives a real CUDA build of ``libmiras`` the same way (torch CUDA
tensors, workspaces from torch's allocator, the current stream): tests/test_cuda_capi.py.
"""
from __future__ import annotations

import ctypes as C
import math
from typing import Dict, Optional

import torch

from miras._options import BIAS_CODE, HUBER_CODE, RET_CODE  # the registry's codes (csrc/core/registry.h)

F32, F64, F16, BF16, I64 = 0, 1, 2, 3, 4
DTYPE_CODE = {torch.float32: F32, torch.float64: F64, torch.float16: F16, torch.bfloat16: BF16, torch.int64: I64}
DEVICE_CUDA = 1


class Tensor(C.Structure):
    _fields_ = [("data", C.c_void_p), ("dtype", C.c_int32), ("ndim", C.c_int32), ("shape", C.c_int64 * 4),
                ("strides", C.c_void_p)]


class Config(C.Structure):
    _fields_ = [("bias", C.c_int32), ("retention", C.c_int32), ("p", C.c_double), ("eps", C.c_double),
                ("delta", C.c_double), ("robust_delta", C.c_double), ("gamma", C.c_double),
                ("kl_scale", C.c_double), ("q_norm", C.c_double), ("eps_q", C.c_double), ("scale", C.c_double),
                ("chunk_size", C.c_int64), ("map_schedule", C.c_int64)]


class Exec(C.Structure):
    _fields_ = [("device", C.c_int32), ("stream", C.c_void_p), ("workspace", C.c_void_p),
                ("workspace_bytes", C.c_size_t)]


P = C.POINTER(Tensor)


class ChunkInputs(C.Structure):
    _fields_ = [(n, P) for n in ("q", "k", "v", "lr", "alpha", "momentum", "bias_param", "ret_param", "cu_seqlens",
                                 "X0", "P0")]


class FwdOutputs(C.Structure):
    _fields_ = [(n, P) for n in ("o", "XT", "PT", "AT", "final_offset", "chunk_X", "chunk_P")]


class BwdInputs(C.Structure):
    _fields_ = [(n, P) for n in ("chunk_X", "chunk_P", "dO", "dXT", "dPT")]


class BwdOutputs(C.Structure):
    _fields_ = [(n, P) for n in ("dq", "dk", "dv", "dlr", "dalpha", "dmomentum", "dbias_param", "dret_param", "dX0",
                                 "dP0")]


class StepArgs(C.Structure):
    _fields_ = [(n, P) for n in ("q", "k", "v", "lr", "alpha", "momentum", "bias_param", "ret_param", "X", "P",
                                 "anchor", "offset", "o", "X_out", "P_out", "anchor_out", "offset_out")]


class MirasError(RuntimeError):
    def __init__(self, status, message):
        super().__init__(f"status {status}: {message}")
        self.status, self.message = status, message


class Emu:
    def __init__(self, path: str, emulator: bool = True):
        self.lib = L = C.CDLL(path)
        self.emulator = emulator
        L.miras_last_error.restype = C.c_char_p
        L.miras_num_chunk_slots.restype = C.c_int64
        L.miras_num_chunk_slots.argtypes = [C.c_int64, C.c_int64, C.c_int64, C.c_int32]
        self.has_asan = False
        if not emulator:
            return
        assert L.miras_emu_is_emulator() == 1
        L.miras_emu_last_fault.restype = C.c_char_p
        L.miras_emu_malloc.restype = C.c_void_p
        L.miras_emu_malloc.argtypes = [C.c_size_t]
        L.miras_emu_free.argtypes = [C.c_void_p]
        L.miras_emu_configure.argtypes = [C.c_char_p, C.c_longlong]
        L.miras_emu_kernel_stats.restype = C.c_size_t
        L.miras_emu_kernel_stats.argtypes = [C.c_char_p, C.c_size_t]
        L.miras_emu_nvtx_log.restype = C.c_size_t
        L.miras_emu_nvtx_log.argtypes = [C.c_char_p, C.c_size_t]
        L.miras_emu_f32_to_f16.restype = C.c_ushort
        L.miras_emu_f32_to_f16.argtypes = [C.c_float]
        L.miras_emu_f32_to_bf16.restype = C.c_ushort
        L.miras_emu_f32_to_bf16.argtypes = [C.c_float]
        self.has_asan = bool(L.miras_emu_has_asan())

    # ---- control -------------------------------------------------------------------------------
    def configure(self, key: str, value: int):
        if self.lib.miras_emu_configure(key.encode(), int(value)) != 0:
            raise KeyError(key)

    def reset_stats(self):
        self.lib.miras_emu_reset_stats()

    def _text(self, fn) -> str:
        n = fn(None, 0)
        buf = C.create_string_buffer(n)
        fn(buf, n)
        return buf.value.decode()

    def kernel_stats(self) -> Dict[str, tuple]:
        out = {}
        for line in self._text(self.lib.miras_emu_kernel_stats).splitlines():
            name, *nums = line.split()
            out[name] = tuple(int(x) for x in nums)
        return out

    def nvtx_log(self):
        return self._text(self.lib.miras_emu_nvtx_log).splitlines()

    def last_error(self) -> str:
        return self.lib.miras_last_error().decode()

    # ---- calls ---------------------------------------------------------------------------------
    def _check(self, status):
        if status != 0:
            raise MirasError(status, self.last_error())

    def _exec(self, query, *args):
        n = C.c_size_t(0)
        self._check(query(*args, DEVICE_CUDA, C.byref(n)))
        if self.emulator:
            ws = self.lib.miras_emu_malloc(max(n.value, 1)) if n.value else None
            return Exec(DEVICE_CUDA, None, ws, n.value), ws
        buf = torch.empty(max(n.value, 1), dtype=torch.uint8, device="cuda")
        return Exec(DEVICE_CUDA, torch.cuda.current_stream().cuda_stream, buf.data_ptr(), n.value), buf

    def _free(self, ws):
        if not self.emulator:
            torch.cuda.synchronize()  # the workspace (a torch tensor) lives until the stream is done
        elif ws:
            self.lib.miras_emu_free(ws)

    def chunk_fwd(self, cfg, inp, out):
        ex, ws = self._exec(self.lib.miras_chunk_fwd_workspace_size, C.byref(cfg), C.byref(inp), C.byref(out))
        try:
            self._check(self.lib.miras_chunk_fwd(C.byref(cfg), C.byref(inp), C.byref(out), C.byref(ex)))
        finally:
            self._free(ws)

    def chunk_bwd(self, cfg, inp, bin_, g):
        ex, ws = self._exec(self.lib.miras_chunk_bwd_workspace_size, C.byref(cfg), C.byref(inp), C.byref(bin_),
                            C.byref(g))
        try:
            self._check(self.lib.miras_chunk_bwd(C.byref(cfg), C.byref(inp), C.byref(bin_), C.byref(g), C.byref(ex)))
        finally:
            self._free(ws)

    def step(self, cfg, args):
        ex, ws = self._exec(self.lib.miras_step_workspace_size, C.byref(cfg), C.byref(args))
        try:
            self._check(self.lib.miras_step(C.byref(cfg), C.byref(args), C.byref(ex)))
        finally:
            self._free(ws)


class Arena:
    """Keeps tensors (and their descriptors) alive for one call and makes descriptors."""

    def __init__(self):
        self.keep = []

    def t(self, x: Optional[torch.Tensor]):
        if x is None:
            return None
        assert x.is_contiguous(), "C ABI tensors are dense (row-major) here"
        assert x.dim() <= 4
        d = Tensor()
        d.data = x.data_ptr() if x.numel() else None
        d.dtype = DTYPE_CODE[x.dtype]
        d.ndim = x.dim()
        for i, s in enumerate(x.shape):
            d.shape[i] = s
        d.strides = None
        self.keep += [x, d]
        return C.pointer(d)


def poisoned(shape, dtype, device="cpu"):
    """An output buffer filled with NaN (int64: a sentinel): every element must be written."""
    if dtype == torch.int64:
        return torch.full(shape, -7777, dtype=dtype, device=device)
    return torch.full(shape, math.nan, dtype=dtype, device=device)


def make_config(emu: Emu, *, bias, huber_mode, retention, Dk, chunk_size, p=3.0, eps=1e-6, delta=1.0, robust_delta=0.0,
                gamma=0.0, kl_scale=1.0, q_norm=4.0, eps_q=1e-6, scale=None):
    cfg = Config()
    emu._check(emu.lib.miras_config_init(C.byref(cfg), C.c_int64(Dk)))
    cfg.bias = HUBER_CODE[huber_mode] if bias == "huber" else BIAS_CODE[bias]
    cfg.retention = RET_CODE[retention]
    cfg.p, cfg.eps, cfg.kl_scale, cfg.q_norm, cfg.eps_q = p, eps, kl_scale, q_norm, eps_q
    if not isinstance(delta, torch.Tensor):
        cfg.delta = float(delta)
    if not isinstance(robust_delta, torch.Tensor):
        cfg.robust_delta = float(robust_delta)
    if not isinstance(gamma, torch.Tensor):
        cfg.gamma = float(gamma)
    if scale is not None:
        cfg.scale = float(scale)
    cfg.chunk_size = int(chunk_size)
    return cfg
