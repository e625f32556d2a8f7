// miras/core/names.h — readable names of a call's variant, for profiler ranges: the NVTX ranges of
// the CUDA dispatch (csrc/cuda/dispatch.cu) and the torch.profiler ranges of the CPU glue
// (csrc/torch/ops.cpp) share one format, so traces of either backend read the same way:
//
//   miras.chunk_fwd[chunk_l2 bias=lp ret=l2 mom C=64 dk=128 dv=128 bf16]      (CUDA)
//   miras.chunk_bwd[cpu_l2_dual avx512 bias=lp ret=l2 mom C=64 dk=64 dv=64 f32] (CPU)
//
// Host-only, torch-free. (dtype_short_name: "f32" etc. for ranges; problem.h's dtype_name spells
// dtypes out for error messages.)
#pragma once
#include <cstddef>
#include <cstdio>

#include "params.h"

namespace miras {

inline const char* bias_name(int32_t b) {
#define MIRAS_NAME_(N, code, name, ...) name,
  static const char* const names[] = {MIRAS_BIASES(MIRAS_NAME_)};
  return bias_known(b) ? names[b] : "?";
}

inline const char* retention_name(int32_t r) {
  static const char* const names[] = {MIRAS_RETENTIONS(MIRAS_NAME_)};
#undef MIRAS_NAME_
  return retention_known(r) ? names[r] : "?";
}

inline const char* dtype_short_name(int32_t d) {
  static const char* const names[] = {"f32", "f64", "f16", "bf16"};
  return (d >= 0 && d < 4) ? names[d] : "?";
}

// Writes "miras.<op>[<family> bias=<b> ret=<r>[ mom] C=<C> dk=<Dk> dv=<Dv> <dtype>]" into buf
// (truncated to n bytes, always terminated).
inline void format_variant(char* buf, size_t n, const char* op, const char* family, const ChunkFwdParams& p) {
  std::snprintf(buf, n, "miras.%s[%s bias=%s ret=%s%s C=%lld dk=%lld dv=%lld %s]", op, family,
                bias_name(p.cfg.bias), retention_name(p.cfg.retention), p.momentum ? " mom" : "",
                static_cast<long long>(p.cfg.chunk_size), static_cast<long long>(p.Dk),
                static_cast<long long>(p.Dv), dtype_short_name(p.dtype));
}

}  // namespace miras
