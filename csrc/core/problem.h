// miras/core/problem.h — host-side setup shared by the framework bindings (the torch glue in
// csrc/torch, the JAX FFI handlers in csrc/jax): problem sizes from input shapes, the scalar
// configuration from op attributes, and the size fields of the params structs. Torch-free and
// CUDA-free; errors are std::invalid_argument with a message naming the argument.
#pragma once
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
  pr.slots = num_chunk_slots(pr.N, pr.T, chunk_size, pr.varlen);
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

// The size, dtype and config fields of the forward params (pointers are the binding's job).
inline void set_problem(ChunkFwdParams& prm, const Problem& pr, int32_t dtype, const MemoryConfig& cfg) {
  prm.N = pr.N;
  prm.T = pr.T;
  prm.H = pr.H;
  prm.Dk = pr.Dk;
  prm.Dv = pr.Dv;
  prm.dtype = dtype;
  prm.cfg = cfg;
  prm.num_chunk_slots = pr.slots;
}

}  // namespace miras
