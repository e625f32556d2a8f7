// miras/cpu/chunk_cpu_avx2.cpp — the same loops as chunk_cpu.cpp compiled for AVX2+FMA through
// `#pragma GCC target` (no -march flag needed, the build stays portable); chunk_cpu.cpp calls
// them only when the CPU reports avx2 and fma. Everything shared (std, core headers) is included
// before the pragma so that only this file's own namespace (cpu::avx2) carries AVX2 code.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(MIRAS_CPU_NO_AVX2)
#include "isa_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define MIRAS_CPU_ISA avx2_impl
#define MIRAS_CPU_VBYTES 32
#include "chunk_kernels.h"

namespace miras {
namespace cpu {
namespace avx2 {
void run_fwd(const ChunkFwdParams& p) { avx2_impl::run_fwd(p); }
void run_bwd(const ChunkBwdParams& p) { avx2_impl::run_bwd(p); }
}  // namespace avx2
}  // namespace cpu
}  // namespace miras
#pragma GCC pop_options
#endif
