// miras/cpu/chunk_cpu.cpp — entry points of the CPU backend: argument validation, the portable
// instantiation of the loops (chunk_kernels.h) and the run-time choice of the AVX2+FMA
// instantiation (chunk_cpu_avx2.cpp) where the CPU has it, and for the retention-l2 backward the
// AVX-512 one (chunk_cpu_avx512.cpp). Build flags stay portable (no -march); MIRAS_CPU_ISA=avx2
// or =portable caps the instruction set.
#define MIRAS_CPU_ISA portable
#include "chunk_kernels.h"
#include "../core/problem.h"
#include "cpu_entry.h"

namespace miras {
namespace cpu {

// MIRAS_CPU_ISA: "portable", "avx2", "avx512" (the default: the best the CPU has), or unset. Any
// other value is an error (a misspelt cap would otherwise silently run the default code).
static const char* isa_cap() {
  const char* e = std::getenv("MIRAS_CPU_ISA");
  if (!e || !*e) return "";
  const std::string s(e);
  if (s != "portable" && s != "avx2" && s != "avx512")
    throw std::invalid_argument("MIRAS_CPU_ISA must be portable, avx2 or avx512 (or unset), got '" + s + "'");
  return e;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(MIRAS_CPU_NO_AVX2)
namespace avx2 {
void run_fwd(const ChunkFwdParams& p);
void run_bwd(const ChunkBwdParams& p);
}  // namespace avx2
bool use_avx2() {
  static const bool ok = [] {
    if (std::string(isa_cap()) == "portable") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
}
namespace avx512 {
void run_bwd_l2(const ChunkBwdParams& p);
}  // namespace avx512
// AVX-512 is used for the retention-l2 backward only (chunk_cpu_avx512.cpp).
static bool use_avx512() {
  static const bool ok = [] {
    const std::string s(isa_cap());
    if (s == "portable" || s == "avx2") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
}
#else
bool use_avx2() { return false; }
static bool use_avx512() { return false; }
namespace avx512 {
inline void run_bwd_l2(const ChunkBwdParams& p) { portable::run_bwd(p); }
}  // namespace avx512
namespace avx2 {
inline void run_fwd(const ChunkFwdParams& p) { portable::run_fwd(p); }
inline void run_bwd(const ChunkBwdParams& p) { portable::run_bwd(p); }
}  // namespace avx2
#endif

static void need(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

void validate_fwd(const ChunkFwdParams& p, const char* fn) {
  const std::string f = std::string(fn) + ": ";
  need(p.dtype == kFloat32 || p.dtype == kFloat64,
       f + "dtype must be float32 or float64 on CPU (got code " + std::to_string(p.dtype) + ")");
  need(p.N >= 0 && p.T >= 0, f + "N and T must be >= 0");
  need(p.H >= 1 && p.Dk >= 1 && p.Dv >= 1, f + "H, Dk and Dv must be >= 1");
  const std::string cfg_err = config_error(p.cfg, p.bias_param != nullptr, p.ret_param != nullptr);
  need(cfg_err.empty(), f + cfg_err);
  need(p.cfg.map_schedule != kMapChunk || p.cfg.retention == kRetL2 || p.A0 == nullptr,
       f + "map_schedule='chunk' with retention " + retention_name(p.cfg.retention) +
           " runs from a chunk boundary only (no separate anchor A0: the step op's chunk schedule is "
           "miras.reference's for now)");
  const int64_t total = p.cu_seqlens ? p.T : p.N * p.T;
  if (total > 0)
    need(p.q && p.k && p.v && p.lr && p.alpha, f + "q, k, v, lr and alpha may not be null");
  if (p.cu_seqlens) {
    const int64_t* cu = p.cu_seqlens;
    need(cu[0] == 0, f + "cu_seqlens must start at 0");
    for (int64_t n = 0; n < p.N; ++n)
      need(cu[n + 1] >= cu[n], f + "cu_seqlens must be non-decreasing");
    need(cu[p.N] == p.T, f + "cu_seqlens must end at T (the total number of tokens)");
  }
}

static int64_t slots_needed(const ChunkFwdParams& p) {
  if (!p.cu_seqlens) return p.N * num_chunks(p.T, p.cfg.chunk_size);
  return chunk_base(p.cu_seqlens, p.N, p.T, p.cfg.chunk_size);
}

// The one place that picks the instruction set of a call (used by the dispatch below and by the
// variant names that profiler ranges show).
enum class Isa { kPortable, kAvx2, kAvx512 };
static Isa fwd_isa() { return use_avx2() ? Isa::kAvx2 : Isa::kPortable; }
static Isa bwd_isa(const ChunkFwdParams& f) {
  return (f.cfg.retention == kRetL2 && use_avx512()) ? Isa::kAvx512 : fwd_isa();
}
static bool bwd_dual(const ChunkFwdParams& f) { return f.cfg.retention == kRetL2 && portable::l2_bwd_dual(); }

}  // namespace cpu

const char* cpu_isa_summary() {
  static const std::string s = [] {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(MIRAS_CPU_NO_AVX2)
    const char* compiled = "portable,avx2,avx512";
    __builtin_cpu_init();
    std::string sup;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) sup += "avx2";
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw"))
      sup += sup.empty() ? "avx512" : ",avx512";
#else
    const char* compiled = "portable";
    std::string sup;
#endif
    const char* active = cpu::use_avx512() ? "avx512" : (cpu::use_avx2() ? "avx2" : "portable");
    const char* env = std::getenv("MIRAS_CPU_ISA");
    return std::string("compiled=") + compiled + ";supported=" + (sup.empty() ? "none" : sup) + ";active=" + active +
           ";MIRAS_CPU_ISA=" + (env ? env : "");
  }();
  return s.c_str();
}

const char* chunk_fwd_cpu_variant(const ChunkFwdParams&) {
  return cpu::fwd_isa() == cpu::Isa::kAvx2 ? "cpu_scan avx2" : "cpu_scan portable";
}

const char* chunk_bwd_cpu_variant(const ChunkBwdParams& p) {
  static const char* const names[2][3] = {{"cpu_scan portable", "cpu_scan avx2", "cpu_scan avx512"},
                                          {"cpu_l2_dual portable", "cpu_l2_dual avx2", "cpu_l2_dual avx512"}};
  return names[cpu::bwd_dual(p.fwd) ? 1 : 0][static_cast<int>(cpu::bwd_isa(p.fwd))];
}

void chunk_fwd_cpu(const ChunkFwdParams& p) {
  cpu::validate_fwd(p, "chunk_fwd_cpu");
  if (p.chunk_X || (p.momentum && p.chunk_P)) {
    const int64_t need_slots = cpu::slots_needed(p);
    if (p.num_chunk_slots < need_slots)
      throw std::invalid_argument("chunk_fwd_cpu: num_chunk_slots (" +
                                  std::to_string(p.num_chunk_slots) + ") is smaller than the " +
                                  std::to_string(need_slots) + " chunks of the input");
  }
  if (p.N == 0) return;
  if (cpu::fwd_isa() == cpu::Isa::kAvx2) cpu::avx2::run_fwd(p);
  else cpu::portable::run_fwd(p);
}

void chunk_bwd_cpu(const ChunkBwdParams& p) {
  cpu::validate_fwd(p.fwd, "chunk_bwd_cpu");
  const ChunkFwdParams& f = p.fwd;
  const int64_t total = f.cu_seqlens ? f.T : f.N * f.T;
  if (total > 0) {  // (empty tensors may have null data pointers)
    if (!p.dO) throw std::invalid_argument("chunk_bwd_cpu: dO may not be null");
    if (!p.dq || !p.dk || !p.dv || !p.dlr || !p.dalpha)
      throw std::invalid_argument("chunk_bwd_cpu: dq, dk, dv, dlr and dalpha may not be null");
  }
  if (f.chunk_X || (f.momentum && f.chunk_P)) {
    const int64_t need_slots = cpu::slots_needed(f);
    if (f.num_chunk_slots < need_slots)
      throw std::invalid_argument("chunk_bwd_cpu: num_chunk_slots (" +
                                  std::to_string(f.num_chunk_slots) + ") is smaller than the " +
                                  std::to_string(need_slots) + " chunks of the input");
  }
  if (f.N == 0) return;
  switch (cpu::bwd_isa(f)) {
    case cpu::Isa::kAvx512: cpu::avx512::run_bwd_l2(p); break;
    case cpu::Isa::kAvx2: cpu::avx2::run_bwd(p); break;
    default: cpu::portable::run_bwd(p);
  }
}

}  // namespace miras
