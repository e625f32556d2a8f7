// miras/core/params.h — the plain parameter structs every backend consumes.
//
// No torch, no CUDA headers: the torch layer (csrc/torch), the C ABI (csrc/capi) and tests fill
// these once on the host; the CPU loops (csrc/cpu) and the CUDA launchers (csrc/cuda) read them.
// Semantics are SPEC.md; names follow the paper (lr, alpha, momentum, anchor, chunk_size).
#pragma once
#include <cstdint>

#include "registry.h"

namespace miras {

// ---- configuration enums (values are part of the op schema: keep them stable) ---------------
// Generated from the lists of registry.h: kBias<Name> / kRet<Name>, and their counts.
enum BiasKind : int32_t {
#define MIRAS_ENUM_(N, code, ...) kBias##N = code,
  MIRAS_BIASES(MIRAS_ENUM_)
#undef MIRAS_ENUM_
};

enum RetentionKind : int32_t {
#define MIRAS_ENUM_(N, code, ...) kRet##N = code,
  MIRAS_RETENTIONS(MIRAS_ENUM_)
#undef MIRAS_ENUM_
};

#define MIRAS_COUNT_(...) +1
constexpr int32_t kNumBiases = 0 MIRAS_BIASES(MIRAS_COUNT_);
constexpr int32_t kNumRetentions = 0 MIRAS_RETENTIONS(MIRAS_COUNT_);
#undef MIRAS_COUNT_
#define MIRAS_CODE_CHECK_(N, code, ...) static_assert(code >= 0 && code < kNumBiases, "bias codes are 0..n-1");
MIRAS_BIASES(MIRAS_CODE_CHECK_)
#undef MIRAS_CODE_CHECK_

inline constexpr bool bias_known(int32_t b) { return b >= 0 && b < kNumBiases; }
inline constexpr bool retention_known(int32_t r) { return r >= 0 && r < kNumRetentions; }

// When the retention's read map is applied (SPEC §5 / §5b). For retention l2 both are one computation.
enum MapSchedule : int32_t { kMapToken = 0, kMapChunk = 1 };

enum DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Scalar configuration of one op call. Tensor-valued parameters live in the params structs.
struct MemoryConfig {
  int32_t bias = kBiasL2;
  int32_t retention = kRetL2;
  double p = 3.0;            // lp exponent (p >= 1)
  double eps = 1e-6;         // smoothing of |x| ~ sqrt(x^2 + eps) (lp, huber yaad, robust)
  double bias_param = 1.0;   // huber delta (> 0) or robust Delta (>= 0), when no tensor is given
  double ret_param = 0.0;    // elastic-net gamma (>= 0), when no tensor is given
  double kl_scale = 1.0;     // c of the KL read map
  double q_norm = 4.0;       // q of the lq normaliser (q >= 2)
  double eps_q = 1e-6;       // floor of the lq norm
  double scale = 1.0;        // query scale (q~ = scale * q)
  int64_t chunk_size = 64;   // C >= 1
  int64_t map_schedule = kMapToken;  // SPEC §5 (token) or §5b (chunk)
};

// The fields of a MemoryConfig as the op schema carries them: two arrays, int64 and float64, in
// this order (problem.h: decode_config; Python: miras._C.config_fields()). A new scalar option is a
// field above and a line here; no front end enumerates them.
#define MIRAS_CONFIG_INTS(X) X(bias) X(retention) X(chunk_size) X(map_schedule)
#define MIRAS_CONFIG_FLOATS(X) X(p) X(eps) X(bias_param) X(ret_param) X(kl_scale) X(q_norm) X(eps_q) X(scale)

// ---- chunked forward ------------------------------------------------------------------------
// Layout (all contiguous, row-major):
//   q, k      [total, H, Dk]     v, o [total, H, Dv]
//   gates     lr, alpha, momentum, bias_param, ret_param: [total, H]
//   states    X0, P0, A0, XT, PT, AT: [N, H, Dk, Dv]
//   saved     chunk_X, chunk_P: [num_chunk_slots, H, Dk, Dv], the raw state (and momentum) at
//             the start of every chunk; slot of chunk c of sequence n = chunk_base(n) + c.
// total = N * T without cu_seqlens; with cu_seqlens (int64, [N+1]) total = T and sequence n is
// tokens [cu_seqlens[n], cu_seqlens[n+1]).
// dtypes: CPU — every pointer has dtype `dtype` (float32 or float64).
//         CUDA — q, k, v, o have dtype `dtype` (float32, float16, bfloat16); everything else,
//         gates and states included, is float32.
// Null pointers: momentum == nullptr means plain gradient descent (P0/PT/chunk_P unused);
// bias_param/ret_param == nullptr means the scalar in cfg; X0 == nullptr means zeros;
// P0 == nullptr means zeros; A0 == nullptr means the first chunk's anchor is X0 (the chunked op);
// a separate A0 (the step op) anchors the first chunk's gradient there instead.
struct ChunkFwdParams {
  int64_t N = 0, T = 0, H = 0, Dk = 0, Dv = 0;
  const int64_t* cu_seqlens = nullptr;
  int32_t dtype = kFloat32;
  MemoryConfig cfg;

  const void *q = nullptr, *k = nullptr, *v = nullptr;
  const void *lr = nullptr, *alpha = nullptr, *momentum = nullptr;
  const void *bias_param = nullptr, *ret_param = nullptr;
  const void *X0 = nullptr, *P0 = nullptr, *A0 = nullptr;

  void* o = nullptr;
  void *XT = nullptr, *PT = nullptr, *AT = nullptr;  // final raw state, momentum, anchor
  void *chunk_X = nullptr, *chunk_P = nullptr;       // saved for backward (may be null in
                                                     // inference: then nothing is saved)
  int64_t num_chunk_slots = 0;
};

// ---- chunked backward -----------------------------------------------------------------------
// Reads the forward's inputs and its saved chunk_X / chunk_P (fwd.o, XT, PT, AT are unused).
// Gradients: dq, dk, dv like q, k, v; dlr, dalpha, dmomentum, dbias_param, dret_param like the
// gates; dX0, dP0, dA0 like the states. dtypes: CPU — `fwd.dtype`; CUDA — float32 always.
// dO may not be null; dXT, dPT may be null (zero). dmomentum is written when momentum is given;
// dbias_param / dret_param are written only when non-null (tensor-valued parameter). dX0 is
// always written (the gradient with respect to the initial raw state, zeros when X0 was null);
// dP0 when momentum is given; dA0 when A0 was given (otherwise the anchor's gradient is part of
// dX0).
struct ChunkBwdParams {
  ChunkFwdParams fwd;
  const void* dO = nullptr;
  const void *dXT = nullptr, *dPT = nullptr;

  void *dq = nullptr, *dk = nullptr, *dv = nullptr;
  void *dlr = nullptr, *dalpha = nullptr, *dmomentum = nullptr;
  void *dbias_param = nullptr, *dret_param = nullptr;
  void *dX0 = nullptr, *dP0 = nullptr, *dA0 = nullptr;
};

// ---- MLP memory (SPEC §6): M(x) = x + LN(GELU(x W1) W2) ---------------------------------------
// Everything the linear op takes, plus the second matrix and the LayerNorm affine. `chunk` keeps
// the linear op's meaning for the inputs, gates, parameters, o and cu_seqlens; its Dv is the
// memory's width (== Dk), and its state fields are the FIRST matrix W1 [N, H, Dk, Dh]:
// X0/P0/A0 (initial raw state, momentum, anchor) and XT/PT/AT (final ones). X2/P2/A2 and
// XT2/PT2/AT2 are the same for W2 [N, H, Dh, Dv]. X0 and X2 are required (an MLP memory has no
// useful zero state); P0/P2 null = zeros; A0/A2 null = the chunked op (anchor = the state), both
// given = the step op (both or neither). ln_weight / ln_bias: [H, Dv] or null (1 / 0).
// Saved chunk-start states: chunk.chunk_X / chunk.chunk_P are [num_chunk_slots, H, Dk*Dh + Dh*Dv],
// each slot W1's raw state followed by W2's (momentum likewise). dtype: as ChunkFwdParams (CPU).
struct MlpFwdParams {
  ChunkFwdParams chunk;
  int64_t Dh = 0;
  const void *ln_weight = nullptr, *ln_bias = nullptr;
  const void *X2 = nullptr, *P2 = nullptr, *A2 = nullptr;
  void *XT2 = nullptr, *PT2 = nullptr, *AT2 = nullptr;
};

// Backward: reads the forward's inputs and its saved chunk states, which it requires
// (fwd.chunk.chunk_X, and chunk_P with momentum; fwd.chunk.o and the final states are unused). Gradients as ChunkBwdParams, W1's under the linear op's names (dX0 always
// written; dP0 with momentum; dA0 when A0 was given; dXT/dPT may be null = zero), W2's under
// dX2/dP2/dA2 and dXT2/dPT2; dln_weight / dln_bias [H, Dv] written when non-null.
struct MlpBwdParams {
  MlpFwdParams fwd;
  const void* dO = nullptr;
  const void *dXT = nullptr, *dPT = nullptr, *dXT2 = nullptr, *dPT2 = nullptr;

  void *dq = nullptr, *dk = nullptr, *dv = nullptr;
  void *dlr = nullptr, *dalpha = nullptr, *dmomentum = nullptr;
  void *dbias_param = nullptr, *dret_param = nullptr;
  void *dX0 = nullptr, *dP0 = nullptr, *dA0 = nullptr;
  void *dX2 = nullptr, *dP2 = nullptr, *dA2 = nullptr;
  void *dln_weight = nullptr, *dln_bias = nullptr;
};

// ---- chunk bookkeeping (host and device) -----------------------------------------------------
#if defined(__CUDACC__)
#define MIRAS_HD __host__ __device__ __forceinline__
#else
#define MIRAS_HD inline
#endif

MIRAS_HD int64_t num_chunks(int64_t len, int64_t C) { return (len + C - 1) / C; }

// The chunk size a front end hands to the backends for sequences of at most T tokens. A chunk
// longer than the sequence is one chunk that never completes, so every C > T computes the same;
// absurd sizes are capped (num_chunks' len + C - 1 overflowed for C near 2^63, and the CUDA
// kernels keep C in 32 bits), every C <= 2^30 is kept as given.
MIRAS_HD int64_t effective_chunk(int64_t chunk_size, int64_t T) {
  if (chunk_size <= T) return chunk_size;
  const int64_t cap = int64_t(1) << 30;
  const int64_t c = chunk_size < cap ? chunk_size : cap;
  return c > T + 1 ? c : T + 1;
}

// Slots needed for saved chunk states: exact without cu_seqlens; an upper bound (T/C + N) with
// them, so that shapes depend on input shapes alone (no device sync, torch.compile-friendly).
MIRAS_HD int64_t num_chunk_slots(int64_t N, int64_t T, int64_t C, bool varlen) {
  return varlen ? T / C + N : N * num_chunks(T, C);
}

MIRAS_HD int64_t seq_begin(const int64_t* cu, int64_t n, int64_t T) { return cu ? cu[n] : n * T; }
MIRAS_HD int64_t seq_len(const int64_t* cu, int64_t n, int64_t T) {
  return cu ? cu[n + 1] - cu[n] : T;
}
// First saved-state slot of sequence n (O(n) with cu_seqlens; cheap next to a sequence's work).
MIRAS_HD int64_t chunk_base(const int64_t* cu, int64_t n, int64_t T, int64_t C) {
  if (!cu) return n * num_chunks(T, C);
  int64_t base = 0;
  for (int64_t m = 0; m < n; ++m) base += num_chunks(cu[m + 1] - cu[m], C);
  return base;
}

}  // namespace miras
