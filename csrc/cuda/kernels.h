// miras/cuda/kernels.h — the CUDA kernel families behind chunk_{fwd,bwd}_cuda (dispatch.cu picks
// one per call). Each family exposes: a support check (nullptr = supported, else why not), a
// workspace size in bytes, and launchers. Params and layouts: csrc/core/params.h (CUDA dtypes:
// q/k/v/o in params.dtype, everything else float32; gradients float32).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

#include "../core/params.h"

namespace miras {
namespace cuda {

// Family 1 — chunked dual form on tensor cores (retention l2, every bias, momentum):
// csrc/cuda/chunk_l2_*.cu. float16/bfloat16 inputs, Dk, Dv in {64, 128}, chunk 16/32/64.
const char* chunk_l2_unsupported(const ChunkFwdParams& p);
size_t chunk_l2_fwd_workspace(const ChunkFwdParams& p);
size_t chunk_l2_bwd_workspace(const ChunkBwdParams& p);
void chunk_l2_fwd(const ChunkFwdParams& p, void* workspace, cudaStream_t stream);
void chunk_l2_bwd(const ChunkBwdParams& p, void* workspace, cudaStream_t stream);

// Family 2 — per-token scan in float32 (every retention, bias, momentum, dtype; Dk, Dv <= 256):
// csrc/cuda/scan_*.cu. The exact, general path: float32 inputs, odd sizes, map-based retentions.
const char* scan_unsupported(const ChunkFwdParams& p);
size_t scan_fwd_workspace(const ChunkFwdParams& p);
size_t scan_bwd_workspace(const ChunkBwdParams& p);
void scan_fwd(const ChunkFwdParams& p, void* workspace, cudaStream_t stream);
void scan_bwd(const ChunkBwdParams& p, void* workspace, cudaStream_t stream);

// Throws std::runtime_error naming the kernel when a launch failed.
void check_launch(const char* kernel_name);

}  // namespace cuda
}  // namespace miras
