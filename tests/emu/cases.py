"""The emulator's test battery: which configurations run (tests/test_emu.py, tests/emu/battery.py).

Profiles: ``ci`` (compact: every bias x momentum x dtype on each family, head dims, chunk sizes and
retentions rotating so that every value appears; varlen; states; the step path) and ``full``
(MIRAS_EMU_FULL=1: the cross product). Every case runs the forward and the backward through the
C ABI on the emulated CUDA backend and compares outputs, final states and every gradient with the
float64 reference.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import List, Optional

from conftest import BIAS_IDS, BIAS_MODES, RETENTIONS  # the suite's one table of biases and retentions

BIASES = list(BIAS_MODES)
NB = len(BIASES)
CHUNK_DIMS = [(64, 64), (128, 128), (64, 128), (128, 64)]


@dataclass
class Case:
    name: str
    path: str = "auto"          # MIRAS_CUDA_PATH: chunk | scan | auto
    dtype: str = "bf16"         # q/k/v dtype: bf16 | f16 | f32
    bias: str = "l2"
    huber_mode: str = "yaad"
    retention: str = "l2"
    momentum: bool = True
    Dk: int = 64
    Dv: int = 64
    C: int = 16
    B: int = 1
    T: int = 40
    H: int = 2
    cu_seqlens: Optional[List[int]] = None
    initial_state: bool = True
    tensor_params: bool = True
    kind: str = "update"        # update | step | refuse
    expect_kernels: List[str] = field(default_factory=list)

    def to_dict(self):
        return asdict(self)


def _bias_name(bi):
    return BIAS_IDS[bi]


def chunk_cases(full: bool) -> List[Case]:
    """The tensor-core family (retention l2, f16/bf16, Dk, Dv in {64, 128}, C in {16, 32, 64})."""
    out = []
    combos = [(d, c) for d in CHUNK_DIMS for c in (16, 32, 64)]
    if full:
        for (bi, mom, dt, (dims, C)) in itertools.product(range(NB), (False, True), ("bf16", "f16"), combos):
            Dk, Dv = dims
            out.append(Case(f"chunk-{_bias_name(bi)}-{'mom' if mom else 'nomom'}-{dt}-{Dk}x{Dv}-C{C}", "chunk", dt,
                            *BIASES[bi], "l2", mom, Dk, Dv, C, T=100))
        return out
    i = 0
    for bi in range(NB):
        for mom in (False, True):
            for dt in ("bf16", "f16"):
                (Dk, Dv), C = combos[(5 * i + bi) % len(combos)]
                i += 1
                T = 2 * C + 5 if C < 64 else 100  # partial last chunk, >= 2 chunks
                out.append(Case(f"chunk-{_bias_name(bi)}-{'mom' if mom else 'nomom'}-{dt}-{Dk}x{Dv}-C{C}", "chunk", dt,
                                *BIASES[bi], "l2", mom, Dk, Dv, C, T=T))
    # varlen with an empty and a partial segment, a length-1 one; no initial state; scalar params
    out.append(Case("chunk-varlen-huber-norm-bf16-128x128", "chunk", "bf16", "huber", "norm", "l2", True, 128, 128, 16,
                    T=53, cu_seqlens=[0, 20, 20, 21, 53]))
    out.append(Case("chunk-varlen-lp-f16-64x64-C32", "chunk", "f16", "lp", "yaad", "l2", False, 64, 64, 32, T=77,
                    cu_seqlens=[0, 0, 45, 77]))
    out.append(Case("chunk-nostate-robust-bf16-64x128-C64", "chunk", "bf16", "robust", "yaad", "l2", True, 64, 128, 64,
                    T=70, initial_state=False))
    out.append(Case("chunk-scalar-params-huber-coord-f16-128x64", "chunk", "f16", "huber", "coord", "l2", True, 128, 64,
                    32, T=40, tensor_params=False))
    out.append(Case("chunk-B2-l2-bf16-64x64-C16", "chunk", "bf16", "l2", "yaad", "l2", True, 64, 64, 16, B=2, T=37))
    return out


# Scan: dims (Dk, Dv) — odd sizes, a Dv tiled in 32-column tiles (separable configurations), a
# whole-row block, and the tensor-core sizes (which scan runs for float32 and map retentions).
SCAN_DIMS = [(13, 36), (64, 64), (32, 48), (5, 70), (128, 128), (17, 1), (40, 96)]


def scan_cases(full: bool) -> List[Case]:
    out = []
    dts = ("f32", "f16", "bf16")
    if full:
        for ri, bi, mom, dt in itertools.product(range(len(RETENTIONS)), range(NB), (False, True), dts):
            Dk, Dv = SCAN_DIMS[(ri + bi + mom) % len(SCAN_DIMS)]
            C = (10, 16, 1, 64)[(bi + ri) % 4]
            out.append(Case(f"scan-{RETENTIONS[ri]}-{_bias_name(bi)}-{'mom' if mom else 'nomom'}-{dt}-{Dk}x{Dv}-C{C}",
                            "scan", dt, *BIASES[bi], RETENTIONS[ri], mom, Dk, Dv, C, T=33))
        return out
    i = 0
    for ri in range(len(RETENTIONS)):
        for bi in range(NB):
            for mom in (False, True):
                dt = dts[i % 3]
                Dk, Dv = SCAN_DIMS[(3 * i + ri) % len(SCAN_DIMS)]
                if Dk * Dv > 64 * 64 and ri != 0:  # keep the slow whole-matrix cases few
                    Dk, Dv = SCAN_DIMS[(3 * i + ri + 1) % len(SCAN_DIMS)]
                C = (10, 16, 7, 23)[i % 4]
                i += 1
                out.append(Case(f"scan-{RETENTIONS[ri]}-{_bias_name(bi)}-{'mom' if mom else 'nomom'}-{dt}-{Dk}x{Dv}-C{C}",
                                "scan", dt, *BIASES[bi], RETENTIONS[ri], mom, Dk, Dv, C, T=29))
    out.append(Case("scan-varlen-kl-lp-f32", "scan", "f32", "lp", "yaad", "kl", True, 16, 24, 8, T=41,
                    cu_seqlens=[0, 17, 17, 18, 41]))
    out.append(Case("scan-varlen-lq-huber-norm-bf16", "scan", "bf16", "huber", "norm", "lq", False, 12, 20, 5, T=30,
                    cu_seqlens=[0, 0, 11, 30]))
    out.append(Case("scan-C1-elastic-net-f32", "scan", "f32", "l2", "yaad", "elastic_net", True, 8, 12, 1, T=12))
    out.append(Case("scan-CbeyondT-kl-f16", "scan", "f16", "robust", "yaad", "kl", False, 8, 40, 100, T=21))
    out.append(Case("scan-nostate-lq-f32", "scan", "f32", "l2", "yaad", "lq", True, 16, 16, 8, T=20,
                    initial_state=False))
    out.append(Case("scan-tensorcore-size-f32-l2-128x128", "scan", "f32", "lp", "yaad", "l2", True, 128, 128, 16, T=20))
    return out


def other_cases() -> List[Case]:
    return [
        # auto dispatch: a size the tensor-core path refuses runs on the scan family
        Case("auto-refused-size-bf16-32x48", "auto", "bf16", "l2", "yaad", "l2", True, 32, 48, 16, T=40,
             expect_kernels=["miras_scan_fwd_l2_bf16", "miras_scan_bwd_l2_bf16"]),
        Case("auto-tensorcore-bf16-64x64", "auto", "bf16", "lp", "yaad", "l2", False, 64, 64, 32, T=40,
             expect_kernels=["miras_chunk_l2_fwd_state", "miras_chunk_l2_bwd_chunk"]),
        # forcing the tensor-core family on a size it refuses is a clear error
        Case("chunk-refuses-32x48", "chunk", "bf16", "l2", "yaad", "l2", True, 32, 48, 16, T=20, kind="refuse"),
        Case("chunk-refuses-kl", "chunk", "bf16", "l2", "yaad", "kl", True, 64, 64, 16, T=20, kind="refuse"),
        # memory_step on CUDA: prefill (chunk op + final_offsets kernel) then steps (scan with A0 +
        # the C ABI's step_finish kernel) == the reference over the whole sequence
        Case("step-l2-lp-f32", "auto", "f32", "lp", "yaad", "l2", True, 16, 24, 4, B=2, T=11, kind="step",
             expect_kernels=["miras_capi_step_finish", "miras_capi_final_offsets"]),
        Case("step-kl-huber-yaad-bf16", "auto", "bf16", "huber", "yaad", "kl", False, 64, 64, 3, B=2, T=8,
             kind="step"),
        Case("step-elastic-net-f16", "auto", "f16", "robust", "yaad", "elastic_net", True, 8, 8, 5, B=3, T=9,
             kind="step"),
    ]


def gating_cases() -> List[Case]:
    """Without MIRAS_CUDA_UNVERIFIED the families that have not passed on hardware are refused with a
    message that says how to opt in; the hardware-verified ones still run (csrc/cuda/verification.h)."""
    return [Case("gating-step-needs-optin", "auto", "f32", "l2", "yaad", "l2", False, 8, 8, 4, B=2, T=5, kind="gating"),
            Case("gating-verified-family-runs", "auto", "bf16", "lp", "yaad", "l2", True, 64, 64, 16, T=20,
                 kind="gating")]


def cases(profile: str) -> List[Case]:
    full = profile == "full"
    return chunk_cases(full) + scan_cases(full) + other_cases() + gating_cases()


def by_name(profile: str):
    return {c.name: c for c in cases(profile)}
