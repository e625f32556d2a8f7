// miras/core/backends.h — entry points of the compute backends. Torch-free and CUDA-free, so the
// torch layer and the C ABI share them. Errors are thrown as std::invalid_argument (bad input:
// the message names the argument and the fix) or std::runtime_error (a failed launch).
#pragma once
#include <cstddef>

#include "params.h"

namespace miras {

// CPU (csrc/cpu): dtype float32 or float64 for every pointer. OpenMP over sequences x heads.
void chunk_fwd_cpu(const ChunkFwdParams& p);
void chunk_bwd_cpu(const ChunkBwdParams& p);
// The CPU implementation such a call runs, e.g. "cpu_scan avx2" or "cpu_l2_dual avx512" (the
// family as core/names.h formats it; profiler ranges of the torch glue use it).
const char* chunk_fwd_cpu_variant(const ChunkFwdParams& p);
const char* chunk_bwd_cpu_variant(const ChunkBwdParams& p);
// The CPU backend's instruction sets: "compiled=portable,avx2,avx512;supported=...;active=...;
// MIRAS_CPU_ISA=..." (active: avx512 = the retention-l2 backward on AVX-512, AVX2 elsewhere;
// MIRAS_CPU_ISA=portable|avx2 caps it, read once per process).
const char* cpu_isa_summary();
// MLP memory (csrc/cpu/mlp_cpu.cpp): the same scheme for M(x) = x + LN(GELU(x W1) W2).
void mlp_fwd_cpu(const MlpFwdParams& p);
void mlp_bwd_cpu(const MlpBwdParams& p);
// The CPU implementation the MLP calls run: "cpu_mlp_scan avx2" or "cpu_mlp_scan portable".
const char* mlp_cpu_variant();

// CUDA (csrc/cuda): `stream` is a cudaStream_t. The caller allocates `workspace` of at least the
// queried size (bytes, 256-byte aligned) on the same device; it may be clobbered.
// cuda_unsupported() returns nullptr when the configuration runs on CUDA, else a message that
// says why and what to change (checked before anything is launched).
const char* cuda_unsupported(const ChunkFwdParams& p);
size_t chunk_fwd_cuda_workspace(const ChunkFwdParams& p);
size_t chunk_bwd_cuda_workspace(const ChunkBwdParams& p);
void chunk_fwd_cuda(const ChunkFwdParams& p, void* workspace, void* stream);
void chunk_bwd_cuda(const ChunkBwdParams& p, void* workspace, void* stream);

}  // namespace miras
