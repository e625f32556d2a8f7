// miras/cpu/mlp_cpu_avx2.cpp — the MLP memory's loops (mlp_kernels.h) compiled for AVX2+FMA through
// `#pragma GCC target`, like chunk_cpu_avx2.cpp; mlp_cpu.cpp calls them when the CPU has avx2/fma.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(MIRAS_CPU_NO_AVX2)
#include "isa_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define MIRAS_CPU_ISA avx2_impl
#define MIRAS_CPU_VBYTES 32
#include "chunk_kernels.h"

namespace miras {
namespace cpu {
namespace avx2_impl {
#include "mlp_kernels.h"
}  // namespace avx2_impl
namespace avx2 {
void run_mlp_fwd(const MlpFwdParams& p) { avx2_impl::run_mlp_fwd(p); }
void run_mlp_bwd(const MlpBwdParams& p) { avx2_impl::run_mlp_bwd(p); }
}  // namespace avx2
}  // namespace cpu
}  // namespace miras
#pragma GCC pop_options
#endif
