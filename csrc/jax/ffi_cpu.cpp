// miras/jax/ffi_cpu.cpp — XLA FFI handlers for the CPU: chunk_fwd and chunk_bwd on the C++ CPU
// backend (csrc/cpu, the same code as the torch extension). Built into miras/_jax_ffi*.so, loaded
// by python/miras/jax.py with ctypes and registered with jax.ffi.register_ffi_target.
// Exported symbols: MirasChunkFwdCpu, MirasChunkBwdCpu (and the CUDA ones from ffi_cuda.cpp).
#include <cstring>

#include "../core/backends.h"
#include "ffi_common.h"

namespace miras {
namespace jax_ffi {
namespace {

// cu_seqlens as int64 on the host (jax without x64 has int32 arrays only).
const int64_t* host_cu(const Buf& cu, std::vector<int64_t>& storage) {
  if (absent(cu)) return nullptr;
  if (cu.element_type() == ffi::DataType::S64) return static_cast<const int64_t*>(cu.untyped_data());
  const int32_t* c = static_cast<const int32_t*>(cu.untyped_data());
  storage.assign(c, c + cu.element_count());
  return storage.data();
}

size_t state_bytes(const ChunkFwdParams& p, int64_t rows) {
  return static_cast<size_t>(rows * p.H * p.Dk * p.Dv) * (p.dtype == kFloat64 ? 8 : 4);
}

ffi::Error chunk_fwd_cpu_ffi(ffi::RemainingArgs args, ffi::RemainingRets rets, ffi::Dictionary attrs) {
  std::vector<Buf> in, out;
  MIRAS_FFI_TRY(collect(args, kNumFwdIn, "miras_chunk_fwd", in));
  MIRAS_FFI_TRY(collect(rets, kNumFwdOut, "miras_chunk_fwd", out));
  ChunkFwdParams p;
  Problem pr;
  bool save = false;
  MIRAS_FFI_TRY(prepare_fwd(in, out, attrs, Platform::kCpu, p, pr, save));
  std::vector<int64_t> cu;
  p.cu_seqlens = host_cu(in[kCu], cu);
  // With cu_seqlens the slot count is an upper bound: zero the slots so unused ones are
  // deterministic (as the torch op does).
  if (pr.varlen && p.chunk_X) std::memset(p.chunk_X, 0, state_bytes(p, pr.slots));
  if (pr.varlen && p.chunk_P) std::memset(p.chunk_P, 0, state_bytes(p, pr.slots));
  return guarded([&] { chunk_fwd_cpu(p); });
}

ffi::Error chunk_bwd_cpu_ffi(ffi::RemainingArgs args, ffi::RemainingRets rets, ffi::Dictionary attrs) {
  std::vector<Buf> in, out;
  MIRAS_FFI_TRY(collect(args, kNumBwdIn, "miras_chunk_bwd", in));
  MIRAS_FFI_TRY(collect(rets, kNumBwdOut, "miras_chunk_bwd", out));
  ChunkBwdParams b;
  Problem pr;
  MIRAS_FFI_TRY(prepare_bwd(in, out, attrs, Platform::kCpu, b, pr));
  std::vector<int64_t> cu;
  b.fwd.cu_seqlens = host_cu(in[kBwdFwd + kCu], cu);
  return guarded([&] { chunk_bwd_cpu(b); });
}

}  // namespace
}  // namespace jax_ffi
}  // namespace miras

// The library is built with -fvisibility=hidden: only these symbols are exported.
#define MIRAS_FFI_EXPORT extern "C" __attribute__((visibility("default")))
MIRAS_FFI_EXPORT XLA_FFI_Error* MirasChunkFwdCpu(XLA_FFI_CallFrame* call_frame);
MIRAS_FFI_EXPORT XLA_FFI_Error* MirasChunkBwdCpu(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(MirasChunkFwdCpu, miras::jax_ffi::chunk_fwd_cpu_ffi,
                              xla::ffi::Ffi::Bind().RemainingArgs().RemainingRets().Attrs<xla::ffi::Dictionary>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MirasChunkBwdCpu, miras::jax_ffi::chunk_bwd_cpu_ffi,
                              xla::ffi::Ffi::Bind().RemainingArgs().RemainingRets().Attrs<xla::ffi::Dictionary>());

// 1 when this library holds the CUDA handlers too (ffi_cuda.cpp, built with MIRAS_WITH_CUDA).
MIRAS_FFI_EXPORT int MirasJaxHasCuda() {
#ifdef MIRAS_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}
