// miras/capi/capi_cuda.cu — see capi_cuda.h.
#include <stdexcept>
#include <string>

#include "../cuda/device.cuh"
#include "capi_cuda.h"

namespace miras {
namespace capi_cuda {

// (A named namespace, not an anonymous one: the emulator names kernels by their symbols.)
namespace kernels {

__global__ void miras_capi_final_offsets(const int64_t* cu, int64_t N, int64_t T, int64_t C, int64_t* out) {
  const int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  const int64_t len = cu ? cu[n + 1] - cu[n] : T;
  out[n] = len % C;
}

__global__ void miras_capi_step_finish(const int64_t* off_in, int64_t* off_out, const float* XT, const float* A0,
                                       float* anchor_out, int64_t per_seq, int64_t C) {
  const int64_t n = blockIdx.x;
  const int64_t next = off_in[n] + 1;
  const bool moved = next >= C;
  __syncthreads();  // every thread has read off_in[n] before thread 0 may overwrite it
  if (threadIdx.x == 0) off_out[n] = moved ? 0 : next;
  const float* src = (moved ? XT : A0) + n * per_seq;
  float* dst = anchor_out + n * per_seq;
  if (dst == src) return;
  for (int64_t i = threadIdx.x; i < per_seq; i += blockDim.x) dst[i] = src[i];
}

}  // namespace kernels

namespace {

void check(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("miras: CUDA launch of ") + what + " failed: " + cudaGetErrorString(e));
}

}  // namespace

void final_offsets(const int64_t* cu, int64_t N, int64_t T, int64_t C, int64_t* out, cudaStream_t stream) {
  if (N <= 0) return;
  const int threads = 128;
  const unsigned blocks = static_cast<unsigned>((N + threads - 1) / threads);
  MIRAS_LAUNCH(kernels::miras_capi_final_offsets, blocks, threads, 0, stream)(cu, N, T, C, out);
  check("miras_capi_final_offsets");
}

void step_finish(const int64_t* off_in, int64_t* off_out, const float* XT, const float* A0, float* anchor_out,
                 int64_t N, int64_t per_seq, int64_t C, cudaStream_t stream) {
  if (N <= 0) return;
  if (N > 0x7fffffff) throw std::invalid_argument("miras_step: more than 2^31 - 1 sequences");
  MIRAS_LAUNCH(kernels::miras_capi_step_finish, static_cast<unsigned>(N), 256, 0, stream)(off_in, off_out, XT, A0,
                                                                                         anchor_out, per_seq, C);
  check("miras_capi_step_finish");
}

}  // namespace capi_cuda
}  // namespace miras
