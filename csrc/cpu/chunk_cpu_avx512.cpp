// miras/cpu/chunk_cpu_avx512.cpp — the retention-l2 backward (the dual form of chunk_l2_dual.h,
// or the scan fallback) compiled for AVX-512 through `#pragma GCC target` (64-byte vectors: twice
// the GEMM throughput of the AVX2 build on cores with full-width AVX-512). chunk_cpu.cpp calls it
// only when the CPU reports avx512f/vl/dq/bw, the retention is l2 and MIRAS_CPU_ISA is not
// "portable" or "avx2". Only the l2 instantiations are made here (templates are instantiated on
// use), so this file adds little to the build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(MIRAS_CPU_NO_AVX2)
#include "isa_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
#define MIRAS_CPU_ISA avx512_impl
#define MIRAS_CPU_VBYTES 64
#include "chunk_kernels.h"

namespace miras {
namespace cpu {
namespace avx512 {
void run_bwd_l2(const ChunkBwdParams& p) {
  avx512_impl::BwdRunner r{p};
  const bool mom = p.fwd.momentum != nullptr;
  if (p.fwd.dtype == kFloat32) {
    if (mom) r.run<float, kRetL2, true>();
    else r.run<float, kRetL2, false>();
  } else {
    if (mom) r.run<double, kRetL2, true>();
    else r.run<double, kRetL2, false>();
  }
}
}  // namespace avx512
}  // namespace cpu
}  // namespace miras
#pragma GCC pop_options
#endif
