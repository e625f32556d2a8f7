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

// The op's scalar attributes (the schema order of torch.ops.miras.chunk_fwd) as a MemoryConfig.
// Unknown bias/retention codes are rejected here; value ranges are the backends' checks.
inline MemoryConfig make_config(int64_t bias, int64_t retention, double p, double eps, double bias_scalar,
                                double ret_scalar, double kl_scale, double q_norm, double eps_q, double scale,
                                int64_t chunk_size) {
  if (bias < kBiasDot || bias > kBiasRobust)
    throw std::invalid_argument("miras: unknown bias code " + std::to_string(bias));
  if (retention < kRetL2 || retention > kRetLq)
    throw std::invalid_argument("miras: unknown retention code " + std::to_string(retention));
  if (chunk_size < 1)
    throw std::invalid_argument("miras: chunk_size must be >= 1, got " + std::to_string(chunk_size));
  MemoryConfig c;
  c.bias = static_cast<int32_t>(bias);
  c.retention = static_cast<int32_t>(retention);
  c.p = p;
  c.eps = eps;
  c.bias_param = bias_scalar;
  c.ret_param = ret_scalar;
  c.kl_scale = kl_scale;
  c.q_norm = q_norm;
  c.eps_q = eps_q;
  c.scale = scale;
  c.chunk_size = chunk_size;
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
  if (c.bias < kBiasDot || c.bias > kBiasRobust) return "bias: unknown kind " + std::to_string(c.bias);
  if (c.retention < kRetL2 || c.retention > kRetLq)
    return "retention: unknown kind " + std::to_string(c.retention);
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
