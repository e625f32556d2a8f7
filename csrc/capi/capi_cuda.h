// miras/capi/capi_cuda.h — the C ABI's own small CUDA kernels (capi_cuda.cu): state bookkeeping
// around the backend calls that the torch front end does with tensor ops (python/miras/ops.py).
// Built only with MIRAS_WITH_CUDA.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace miras {
namespace capi_cuda {

// out[n] = (length of sequence n) % C; lengths from cu (device, [N+1]) or T when cu is null.
void final_offsets(const int64_t* cu, int64_t N, int64_t T, int64_t C, int64_t* out, cudaStream_t stream);

// After a step (memory_step's tail): per sequence n, next = off_in[n] + 1; where next >= C the
// anchor becomes the new state (anchor_out[n] = XT[n]) and the offset 0, else anchor_out[n] =
// A0[n] and the offset next. `per_seq` floats per sequence. anchor_out may be A0 and off_out
// off_in (one block per sequence reads its offset before it writes it).
void step_finish(const int64_t* off_in, int64_t* off_out, const float* XT, const float* A0, float* anchor_out,
                 int64_t N, int64_t per_seq, int64_t C, cudaStream_t stream);

}  // namespace capi_cuda
}  // namespace miras
