// miras/cpu/cpu_entry.h — what the CPU backend's entry files share (defined in chunk_cpu.cpp).
#pragma once
#include "../core/params.h"

namespace miras {
namespace cpu {
// Throws std::invalid_argument naming the problem (dtype, sizes, config, cu_seqlens).
void validate_fwd(const ChunkFwdParams& p, const char* fn);
// Whether the AVX2+FMA instantiations may run (the CPU has them and MIRAS_CPU_ISA allows them).
bool use_avx2();
}  // namespace cpu
}  // namespace miras
