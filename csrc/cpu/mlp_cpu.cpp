// miras/cpu/mlp_cpu.cpp — entry points of the CPU backend for the MLP memory (SPEC §6):
// validation, the portable instantiation of mlp_kernels.h and the run-time choice of the AVX2+FMA
// one (mlp_cpu_avx2.cpp), as chunk_cpu.cpp does for the linear memory.
#include "../core/mlp.h"
#include "../core/names.h"
#define MIRAS_CPU_ISA portable
#include "chunk_kernels.h"
#include "cpu_entry.h"

namespace miras {
namespace cpu {
namespace MIRAS_CPU_ISA {
#include "mlp_kernels.h"
}  // namespace MIRAS_CPU_ISA

#if defined(__x86_64__) && defined(__GNUC__) && !defined(MIRAS_CPU_NO_AVX2)
namespace avx2 {
void run_mlp_fwd(const MlpFwdParams& p);
void run_mlp_bwd(const MlpBwdParams& p);
}  // namespace avx2
#else
namespace avx2 {
inline void run_mlp_fwd(const MlpFwdParams& p) { portable::run_mlp_fwd(p); }
inline void run_mlp_bwd(const MlpBwdParams& p) { portable::run_mlp_bwd(p); }
}  // namespace avx2
#endif

static void need(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

static void validate_mlp(const MlpFwdParams& p, const char* fn) {
  validate_fwd(p.chunk, fn);
  const std::string f = std::string(fn) + ": ";
  const ChunkFwdParams& c = p.chunk;
  need(c.Dv == c.Dk, f + "the MLP memory needs Dv == Dk (M(x) = x + LN(GELU(x W1) W2)), got Dk=" +
                         std::to_string(c.Dk) + ", Dv=" + std::to_string(c.Dv));
  need(p.Dh >= 1, f + "Dh (W1's columns) must be >= 1");
  need(c.cfg.map_schedule != kMapChunk || c.cfg.retention == kRetL2,
       f + "map_schedule='chunk' with retention " + retention_name(c.cfg.retention) +
           " is not implemented for the MLP memory in C++ yet (the torch front end runs it through miras.reference)");
  if (c.N > 0) need(c.X0 && p.X2, f + "the initial W1 and W2 (X0, X2) may not be null");
  need((c.A0 == nullptr) == (p.A2 == nullptr), f + "give both anchors (A0, A2) or neither");
  if (c.chunk_X || (c.momentum && c.chunk_P)) {
    const int64_t need_slots =
        c.cu_seqlens ? chunk_base(c.cu_seqlens, c.N, c.T, c.cfg.chunk_size) : c.N * num_chunks(c.T, c.cfg.chunk_size);
    need(c.num_chunk_slots >= need_slots, f + "num_chunk_slots (" + std::to_string(c.num_chunk_slots) +
                                              ") is smaller than the " + std::to_string(need_slots) +
                                              " chunks of the input");
  }
}

}  // namespace cpu

const char* mlp_cpu_variant() { return cpu::use_avx2() ? "cpu_mlp_scan avx2" : "cpu_mlp_scan portable"; }

void mlp_fwd_cpu(const MlpFwdParams& p) {
  cpu::validate_mlp(p, "mlp_fwd_cpu");
  if (p.chunk.N == 0) return;
  if (cpu::use_avx2()) cpu::avx2::run_mlp_fwd(p);
  else cpu::portable::run_mlp_fwd(p);
}

void mlp_bwd_cpu(const MlpBwdParams& p) {
  cpu::validate_mlp(p.fwd, "mlp_bwd_cpu");
  const ChunkFwdParams& f = p.fwd.chunk;
  const int64_t total = f.cu_seqlens ? f.T : f.N * f.T;
  if (total > 0) {
    if (!p.dO) throw std::invalid_argument("mlp_bwd_cpu: dO may not be null");
    if (!p.dq || !p.dk || !p.dv || !p.dlr || !p.dalpha)
      throw std::invalid_argument("mlp_bwd_cpu: dq, dk, dv, dlr and dalpha may not be null");
  }
  if (f.N == 0) return;
  if (!f.chunk_X || (f.momentum && !f.chunk_P))
    throw std::invalid_argument("mlp_bwd_cpu: needs the forward's saved chunk-start states (chunk_X, and chunk_P "
                                "with momentum): run mlp_fwd_cpu with them");
  if (cpu::use_avx2()) cpu::avx2::run_mlp_bwd(p);
  else cpu::portable::run_mlp_bwd(p);
}

}  // namespace miras
