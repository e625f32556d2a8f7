// miras/core/problem.h — host-side setup shared by every front end (the torch glue in csrc/torch,
// the C ABI in csrc/capi, the JAX FFI handlers in csrc/jax): problem sizes from input shapes, the
// scalar configuration from op attributes and its checks, the dtype rules per device, and the size
// fields of the params structs. Torch-free and CUDA-free; make_problem / make_config throw
// std::invalid_argument, config_error returns a message naming the argument.
#pragma once
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "names.h"
#include "params.h"

namespace miras {

// Sizes of one op call. q, k [B, T, H, Dk], v [B, T, H, Dv]; N sequences (B, or the number of
// cu_seqlens segments); `slots` saved chunk states (num_chunk_slots of params.h).
struct Problem {
  int64_t B = 0, T = 0, H = 0, Dk = 0, Dv = 0, N = 0, slots = 0;
  bool varlen = false;
};

// num_segments < 0: no cu_seqlens (N = B); otherwise the number of cu_seqlens segments.
inline Problem make_problem(int64_t B, int64_t T, int64_t H, int64_t Dk, int64_t Dv, int64_t num_segments,
                            int64_t chunk_size) {
  if (chunk_size < 1)
    throw std::invalid_argument("miras: chunk_size must be >= 1, got " + std::to_string(chunk_size));
  Problem pr;
  pr.B = B;
  pr.T = T;
  pr.H = H;
  pr.Dk = Dk;
  pr.Dv = Dv;
  pr.varlen = num_segments >= 0;
  pr.N = pr.varlen ? num_segments : B;
  pr.slots = num_chunk_slots(pr.N, pr.T, effective_chunk(chunk_size, pr.T), pr.varlen);
  return pr;
}

#define MIRAS_ONE_(f) +1
constexpr size_t kConfigInts = 0 MIRAS_CONFIG_INTS(MIRAS_ONE_);
constexpr size_t kConfigFloats = 0 MIRAS_CONFIG_FLOATS(MIRAS_ONE_);
#undef MIRAS_ONE_

// map_schedule (SPEC §5 / §5b): "" when the C++ backends can compute it. With l2 both schedules are
// one computation; kl and lq run on the CPU for the linear memory from a chunk boundary (the l2 dual
// form from phi(X) per chunk, cpu/chunk_kernels.h; CUDA, the MLP memory and the step op refuse it in
// their own checks); elastic_net (a per-token thresholded raw state) runs in miras.reference only.
inline std::string schedule_error(const MemoryConfig& c) {
  if (c.map_schedule != kMapToken && c.map_schedule != kMapChunk)
    return "map_schedule: unknown code " + std::to_string(c.map_schedule) + " (0 token, 1 chunk)";
  if (c.map_schedule == kMapChunk && c.retention == kRetElasticNet)
    return std::string("map_schedule='chunk' with retention ") + retention_name(c.retention) +
           " is not implemented in the C++/CUDA backends yet (kl and lq are, on the CPU); use "
           "map_schedule='token', or the torch ops (miras.memory_update), which run it through miras.reference";
  return "";
}

// The op's configuration arrays (params.h: MIRAS_CONFIG_INTS / MIRAS_CONFIG_FLOATS) as a
// MemoryConfig. Wrong lengths and unknown bias/retention codes are rejected here; value ranges are
// config_error's (and the backends') checks.
inline MemoryConfig decode_config(const int64_t* ints, size_t n_ints, const double* floats, size_t n_floats) {
  if (n_ints != kConfigInts || n_floats != kConfigFloats)
    throw std::invalid_argument("miras: the configuration arrays have " + std::to_string(n_ints) + " ints and " +
                                std::to_string(n_floats) + " floats, expected " + std::to_string(kConfigInts) +
                                " and " + std::to_string(kConfigFloats) + " (miras._C.config_fields())");
  MemoryConfig c;
  size_t i = 0, f = 0;
#define MIRAS_GET_(field) c.field = static_cast<decltype(c.field)>(ints[i++]);
  MIRAS_CONFIG_INTS(MIRAS_GET_)
#undef MIRAS_GET_
#define MIRAS_GET_(field) c.field = floats[f++];
  MIRAS_CONFIG_FLOATS(MIRAS_GET_)
#undef MIRAS_GET_
  if (!bias_known(c.bias)) throw std::invalid_argument("miras: unknown bias code " + std::to_string(c.bias));
  if (!retention_known(c.retention))
    throw std::invalid_argument("miras: unknown retention code " + std::to_string(c.retention));
  if (c.chunk_size < 1)
    throw std::invalid_argument("miras: chunk_size must be >= 1, got " + std::to_string(c.chunk_size));
  if (const std::string e = schedule_error(c); !e.empty()) throw std::invalid_argument("miras: " + e);
  return c;
}

// SPEC §1 dtypes: q, k, v, o have the io dtype. On the CPU every other tensor (gates, states,
// saved states, gradients) has it too (float32 or float64); on CUDA they are float32.
inline int32_t state_dtype(bool cuda, int32_t io_dtype) { return cuda ? int32_t(kFloat32) : io_dtype; }

inline const char* dtype_name(int32_t d) {
  switch (d) {
    case kFloat32: return "float32";
    case kFloat64: return "float64";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

// The checks of a MemoryConfig that hold for every backend (SPEC §3-§5): "" when valid, else a
// message naming the field and its range. `bias_tensor` / `ret_tensor`: the bias / retention
// parameter is given per token (then cfg.bias_param / cfg.ret_param are unused).
inline std::string config_error(const MemoryConfig& c, bool bias_tensor, bool ret_tensor) {
  auto num = [](double x) { return std::to_string(x); };
  if (c.chunk_size < 1) return "chunk_size must be >= 1 (got " + std::to_string(c.chunk_size) + ")";
  if (!bias_known(c.bias)) return "bias: unknown kind " + std::to_string(c.bias);
  if (!retention_known(c.retention)) return "retention: unknown kind " + std::to_string(c.retention);
  if (const std::string e = schedule_error(c); !e.empty()) return e;
  if (c.retention == kRetLq) {
    if (!(c.q_norm >= 2.0)) return "q (lq retention) must be >= 2 (got " + num(c.q_norm) + ")";
    if (!(c.eps_q > 0.0)) return "eps_q (lq retention) must be > 0 (got " + num(c.eps_q) + ")";
  }
  if (c.retention == kRetKL && !(c.kl_scale > 0.0)) return "kl_scale must be > 0 (got " + num(c.kl_scale) + ")";
  if (c.bias == kBiasLp && !(c.p >= 1.0)) return "p (lp bias) must be >= 1 (got " + num(c.p) + ")";
  if (!(c.eps > 0.0)) return "eps must be > 0 (got " + num(c.eps) + ")";
  if (!std::isfinite(c.scale)) return "scale must be finite";
  const bool huber = c.bias == kBiasHuberYaad || c.bias == kBiasHuberCoord || c.bias == kBiasHuberNorm;
  if (huber && !bias_tensor && !(c.bias_param > 0.0 && std::isfinite(c.bias_param)))
    return "delta (huber bias) must be > 0 (got " + num(c.bias_param) + ")";
  if (c.bias == kBiasRobust && !bias_tensor && !(c.bias_param >= 0.0 && std::isfinite(c.bias_param)))
    return "robust_delta (robust bias) must be >= 0 (got " + num(c.bias_param) + ")";
  if (c.retention == kRetElasticNet && !ret_tensor && !(c.ret_param >= 0.0 && std::isfinite(c.ret_param)))
    return "gamma (elastic_net retention) must be >= 0 (got " + num(c.ret_param) + ")";
  return "";
}

// The size, dtype and config fields of the forward params (pointers are the binding's job).
inline void set_problem(ChunkFwdParams& prm, const Problem& pr, int32_t dtype, const MemoryConfig& cfg) {
  prm.N = pr.N;
  prm.T = pr.T;
  prm.H = pr.H;
  prm.Dk = pr.Dk;
  prm.Dv = pr.Dv;
  prm.dtype = dtype;
  prm.cfg = cfg;
  prm.cfg.chunk_size = effective_chunk(cfg.chunk_size, pr.T);  // (params.h: huge sizes capped)
  prm.num_chunk_slots = pr.slots;
}

}  // namespace miras
