// miras/core/problem.h — what every front end (the torch glue in csrc/torch, the C ABI in
// csrc/capi) derives the same way before it calls a backend: the problem size of a call (N, the
// number of saved chunk-state slots), the dtype rules per device, and the checks of the scalar
// configuration. Host-only, torch-free, CUDA-free.
#pragma once
#include <cmath>
#include <cstdint>
#include <string>

#include "params.h"

namespace miras {

// Sizes of one chunked call: q [B, T, H, Dk], v [B, T, H, Dv]; N sequences (B, or the
// cu_seqlens segments when varlen, then B == 1); `slots` saved chunk states (num_chunk_slots).
struct Problem {
  int64_t B = 0, T = 0, H = 0, Dk = 0, Dv = 0, N = 0, slots = 0;
  bool varlen = false;
};

// cu_len = the number of entries of cu_seqlens (N + 1); ignored unless varlen.
inline Problem make_problem(int64_t B, int64_t T, int64_t H, int64_t Dk, int64_t Dv, bool varlen,
                            int64_t cu_len, int64_t chunk_size) {
  Problem pr;
  pr.B = B;
  pr.T = T;
  pr.H = H;
  pr.Dk = Dk;
  pr.Dv = Dv;
  pr.varlen = varlen;
  pr.N = varlen ? cu_len - 1 : B;
  pr.slots = num_chunk_slots(pr.N, T, chunk_size, varlen);
  return pr;
}

// Copies the sizes into the params (pointers and config are the caller's).
inline void set_problem(ChunkFwdParams& p, const Problem& pr) {
  p.N = pr.N;
  p.T = pr.T;
  p.H = pr.H;
  p.Dk = pr.Dk;
  p.Dv = pr.Dv;
  p.num_chunk_slots = pr.slots;
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

}  // namespace miras
