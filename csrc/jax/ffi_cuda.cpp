// miras/jax/ffi_cuda.cpp — XLA FFI handlers for CUDA: chunk_fwd and chunk_bwd on the CUDA kernels
// (csrc/cuda, the same code as the torch extension), on XLA's stream, with the workspace from
// XLA's scratch allocator. Built into miras/_jax_ffi*.so only with MIRAS_BUILD_JAX_CUDA=1 (it
// compiles csrc/cuda a second time). Dtypes (params.h): q, k, v, o in float32/float16/bfloat16,
// gates, states and gradients float32 — python/miras/jax.py casts accordingly.
#include <cuda_runtime.h>

#include <algorithm>

#include "../core/backends.h"
#include "ffi_common.h"

namespace miras {
namespace jax_ffi {
namespace {

ffi::Error check_cuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("miras (jax ffi): ") + what + ": " + cudaGetErrorString(e));
}

// cu_seqlens as int64 on the device. int64 is used in place; int32 (jax without x64) is converted
// through the host: a copy of N + 1 integers and two stream synchronisations per call.
ffi::Error device_cu(const Buf& cu, cudaStream_t stream, ffi::ScratchAllocator& scratch, const int64_t*& out) {
  out = nullptr;
  if (absent(cu)) return ffi::Error::Success();
  if (cu.element_type() == ffi::DataType::S64) {
    out = static_cast<const int64_t*>(cu.untyped_data());
    return ffi::Error::Success();
  }
  const size_t n = cu.element_count();
  std::vector<int32_t> h32(n);
  MIRAS_FFI_TRY(check_cuda(
      cudaMemcpyAsync(h32.data(), cu.untyped_data(), n * sizeof(int32_t), cudaMemcpyDeviceToHost, stream),
      "copying cu_seqlens to the host"));
  MIRAS_FFI_TRY(check_cuda(cudaStreamSynchronize(stream), "copying cu_seqlens to the host"));
  std::vector<int64_t> h64(h32.begin(), h32.end());
  auto mem = scratch.Allocate(n * sizeof(int64_t), 256);
  if (!mem.has_value()) return ffi::Error::Internal("miras (jax ffi): could not allocate cu_seqlens (int64)");
  MIRAS_FFI_TRY(check_cuda(cudaMemcpyAsync(*mem, h64.data(), n * sizeof(int64_t), cudaMemcpyHostToDevice, stream),
                           "copying cu_seqlens to the device"));
  MIRAS_FFI_TRY(check_cuda(cudaStreamSynchronize(stream), "copying cu_seqlens to the device"));  // h64 lives here
  out = static_cast<const int64_t*>(*mem);
  return ffi::Error::Success();
}

ffi::Error workspace(ffi::ScratchAllocator& scratch, size_t bytes, void*& ws) {
  auto mem = scratch.Allocate(std::max<size_t>(bytes, 1), 256);
  if (!mem.has_value())
    return ffi::Error::Internal("miras (jax ffi): could not allocate " + std::to_string(bytes) + " bytes of workspace");
  ws = *mem;
  return ffi::Error::Success();
}

ffi::Error supported(const ChunkFwdParams& p) {
  const char* why = cuda_unsupported(p);
  return why ? bad(why) : ffi::Error::Success();
}

ffi::Error chunk_fwd_cuda_ffi(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::RemainingArgs args,
                              ffi::RemainingRets rets, ffi::Dictionary attrs) {
  std::vector<Buf> in, out;
  MIRAS_FFI_TRY(collect(args, kNumFwdIn, "miras_chunk_fwd", in));
  MIRAS_FFI_TRY(collect(rets, kNumFwdOut, "miras_chunk_fwd", out));
  ChunkFwdParams p;
  Problem pr;
  bool save = false;
  MIRAS_FFI_TRY(prepare_fwd(in, out, attrs, Platform::kCuda, p, pr, save));
  MIRAS_FFI_TRY(device_cu(in[kCu], stream, scratch, p.cu_seqlens));
  MIRAS_FFI_TRY(supported(p));
  // With cu_seqlens the slot count is an upper bound: zero the slots (deterministic unused ones).
  const size_t slot_bytes = static_cast<size_t>(pr.slots * pr.H * pr.Dk * pr.Dv) * sizeof(float);
  if (pr.varlen && p.chunk_X) MIRAS_FFI_TRY(check_cuda(cudaMemsetAsync(p.chunk_X, 0, slot_bytes, stream), "memset"));
  if (pr.varlen && p.chunk_P) MIRAS_FFI_TRY(check_cuda(cudaMemsetAsync(p.chunk_P, 0, slot_bytes, stream), "memset"));
  size_t bytes = 0;
  MIRAS_FFI_TRY(guarded([&] { bytes = chunk_fwd_cuda_workspace(p); }));
  void* ws = nullptr;
  MIRAS_FFI_TRY(workspace(scratch, bytes, ws));
  return guarded([&] { chunk_fwd_cuda(p, ws, stream); });
}

ffi::Error chunk_bwd_cuda_ffi(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::RemainingArgs args,
                              ffi::RemainingRets rets, ffi::Dictionary attrs) {
  std::vector<Buf> in, out;
  MIRAS_FFI_TRY(collect(args, kNumBwdIn, "miras_chunk_bwd", in));
  MIRAS_FFI_TRY(collect(rets, kNumBwdOut, "miras_chunk_bwd", out));
  ChunkBwdParams b;
  Problem pr;
  MIRAS_FFI_TRY(prepare_bwd(in, out, attrs, Platform::kCuda, b, pr));
  MIRAS_FFI_TRY(device_cu(in[kBwdFwd + kCu], stream, scratch, b.fwd.cu_seqlens));
  MIRAS_FFI_TRY(supported(b.fwd));
  size_t bytes = 0;
  MIRAS_FFI_TRY(guarded([&] { bytes = chunk_bwd_cuda_workspace(b); }));
  void* ws = nullptr;
  MIRAS_FFI_TRY(workspace(scratch, bytes, ws));
  return guarded([&] { chunk_bwd_cuda(b, ws, stream); });
}

}  // namespace
}  // namespace jax_ffi
}  // namespace miras

#define MIRAS_FFI_EXPORT extern "C" __attribute__((visibility("default")))
MIRAS_FFI_EXPORT XLA_FFI_Error* MirasChunkFwdCuda(XLA_FFI_CallFrame* call_frame);
MIRAS_FFI_EXPORT XLA_FFI_Error* MirasChunkBwdCuda(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(MirasChunkFwdCuda, miras::jax_ffi::chunk_fwd_cuda_ffi,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<xla::ffi::ScratchAllocator>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attrs<xla::ffi::Dictionary>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MirasChunkBwdCuda, miras::jax_ffi::chunk_bwd_cuda_ffi,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<xla::ffi::ScratchAllocator>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attrs<xla::ffi::Dictionary>());
