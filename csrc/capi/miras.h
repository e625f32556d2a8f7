/* miras.h — the framework-free C ABI of miras (library: libmiras).
 *
 * Linear memory (SPEC.md §1-§7, memory="linear"): the chunked forward, its backward, and the
 * single-token step used for decoding. No torch, no Python; the same kernels as the PyTorch
 * extension (csrc/core/backends.h). Build: `cmake -S . -B build && cmake --build build` (add
 * -DMIRAS_WITH_CUDA=ON for the CUDA kernels); link `-lmiras`, include `miras.h`.
 *
 * Conventions
 * - Tensors are passed as `miras_tensor` descriptors (data pointer, dtype, shape, strides).
 *   Every tensor must be dense row-major (C-contiguous): `strides == NULL`, or strides equal to
 *   the row-major ones (size-1 dimensions may have any stride); otherwise MIRAS_ERROR_SHAPE.
 *   Nothing is copied or converted: a tensor of the wrong dtype is MIRAS_ERROR_DTYPE.
 * - An optional tensor is a NULL descriptor pointer. A tensor with elements needs a non-NULL
 *   data pointer (else MIRAS_ERROR_NULL_POINTER).
 * - Every tensor lives on the call's device (`miras_exec.device`): host memory for
 *   MIRAS_DEVICE_CPU, memory of the current CUDA device for MIRAS_DEVICE_CUDA (cu_seqlens and
 *   offsets included). The library does not check where pointers point.
 * - dtypes. CPU: every floating tensor has q's dtype, float32 or float64. CUDA: q, k, v, o and dO
 *   are float32, float16 or bfloat16 (all the same); gates, parameters, states, saved chunk
 *   states and every gradient are float32. cu_seqlens and offsets are int64.
 * - Outputs must not overlap inputs (exceptions: the step's anchor_out may be its anchor and
 *   offset_out its offset, for in-place decoding).
 * - Errors: every function returns a miras_status; on failure miras_last_error() (thread-local)
 *   says what is wrong and how to fix it. No function aborts or lets an exception escape. Gate
 *   values (SPEC §2 ranges: lr >= 0, 0 < alpha <= 1, 0 <= momentum < 1) are not checked.
 * - CUDA: work is enqueued on `stream` (a cudaStream_t; NULL = the default stream) and runs
 *   asynchronously; the caller owns the workspace (size from the *_workspace_size queries,
 *   256-byte aligned device memory) and must keep every buffer alive until the stream is done.
 *   CPU calls are synchronous (OpenMP over sequences x heads) and need no workspace.
 */
#ifndef MIRAS_H_
#define MIRAS_H_

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define MIRAS_API __attribute__((visibility("default")))
#else
#define MIRAS_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define MIRAS_ABI_VERSION 2

/* ---- status ------------------------------------------------------------------------------- */
typedef enum miras_status {
  MIRAS_OK = 0,
  MIRAS_ERROR_INVALID_ARGUMENT = 1,  /* a value out of range (config, cu_seqlens, offset, ...) */
  MIRAS_ERROR_NULL_POINTER = 2,      /* a required tensor, data pointer or struct is NULL */
  MIRAS_ERROR_DTYPE = 3,             /* a dtype the backend does not take for this tensor */
  MIRAS_ERROR_SHAPE = 4,             /* a shape that does not match, or a non-contiguous layout */
  MIRAS_ERROR_DEVICE = 5,            /* an unknown device code */
  MIRAS_ERROR_NOT_BUILT = 6,         /* MIRAS_DEVICE_CUDA with a library built without CUDA */
  MIRAS_ERROR_UNSUPPORTED = 7,       /* no kernel for this configuration on this device */
  MIRAS_ERROR_WORKSPACE = 8,         /* the workspace is smaller than the query's size */
  MIRAS_ERROR_RUNTIME = 9,           /* a failed CUDA call or kernel launch */
  MIRAS_ERROR_INTERNAL = 10          /* anything else (e.g. out of host memory) */
} miras_status;

/* ---- enums (values equal the torch op's codes) ---------------------------------------------- */
typedef enum miras_dtype {
  MIRAS_FLOAT32 = 0,
  MIRAS_FLOAT64 = 1,
  MIRAS_FLOAT16 = 2,
  MIRAS_BFLOAT16 = 3,
  MIRAS_INT64 = 4 /* cu_seqlens and offsets only */
} miras_dtype;

typedef enum miras_device { MIRAS_DEVICE_CPU = 0, MIRAS_DEVICE_CUDA = 1 } miras_device;

typedef enum miras_bias {
  MIRAS_BIAS_DOT = 0,
  MIRAS_BIAS_L2 = 1,
  MIRAS_BIAS_LP = 2,
  MIRAS_BIAS_HUBER_YAAD = 3,
  MIRAS_BIAS_HUBER_COORD = 4,
  MIRAS_BIAS_HUBER_NORM = 5,
  MIRAS_BIAS_ROBUST = 6
} miras_bias;

typedef enum miras_retention {
  MIRAS_RETENTION_L2 = 0,
  MIRAS_RETENTION_KL = 1,
  MIRAS_RETENTION_ELASTIC_NET = 2,
  MIRAS_RETENTION_LQ = 3
} miras_retention;

/* ---- plain data ----------------------------------------------------------------------------- */
typedef struct miras_tensor {
  void* data;             /* may be NULL only when the tensor has no elements */
  int32_t dtype;          /* miras_dtype */
  int32_t ndim;           /* number of entries of shape (<= 4) */
  int64_t shape[4];
  const int64_t* strides; /* ndim entries, in elements; NULL = row-major contiguous */
} miras_tensor;

/* Scalar configuration (SPEC §3-§5). Fill with miras_config_init, then change fields. */
typedef struct miras_config {
  int32_t bias;        /* miras_bias (default MIRAS_BIAS_L2) */
  int32_t retention;   /* miras_retention (default MIRAS_RETENTION_L2) */
  double p;            /* lp exponent, >= 1 (3.0) */
  double eps;          /* smoothing of |x| ~ sqrt(x^2 + eps), > 0 (1e-6) */
  double delta;        /* huber delta, > 0 (1.0); used when no bias_param tensor is given */
  double robust_delta; /* robust Delta, >= 0 (0.0); used when no bias_param tensor is given */
  double gamma;        /* elastic-net gamma (>= 0, 0.0), used when no ret_param tensor is given */
  double kl_scale;     /* c of the KL read map, > 0 (1.0) */
  double q_norm;       /* q of the lq normaliser, >= 2 (4.0) */
  double eps_q;        /* floor of the lq norm, > 0 (1e-6) */
  double scale;        /* query scale (Dk^-1/2 from miras_config_init) */
  int64_t chunk_size;  /* C >= 1 (64); for miras_step the step's C (1 = exact online GD) */
  int64_t map_schedule; /* 0: the maps per token (SPEC §5, default); 1: at chunk starts (SPEC §5b) —
                           so far only with retention l2, where both are the same computation */
} miras_config;

/* The fields of miras_config with the name and meaning of the backends' configuration
 * (csrc/core/params.h MemoryConfig): the library copies these one to one (the others — bias,
 * retention and the per-token parameters' scalars — are mapped explicitly). */
#define MIRAS_CONFIG_SHARED_FIELDS(X) X(p) X(eps) X(kl_scale) X(q_norm) X(eps_q) X(scale) X(chunk_size) X(map_schedule)

/* Where and how a call runs. */
typedef struct miras_exec {
  int32_t device;          /* miras_device */
  void* stream;            /* cudaStream_t (CUDA only; NULL = default stream) */
  void* workspace;         /* CUDA only: device memory of >= the queried size (may be NULL if 0) */
  size_t workspace_bytes;
} miras_exec;

/* Inputs of the chunked op. q, k [B, T, H, Dk]; v [B, T, H, Dv]; lr, alpha, momentum,
 * bias_param, ret_param [B, T, H]; cu_seqlens int64 [N+1] (then B == 1 and sequence n is tokens
 * cu_seqlens[n] .. cu_seqlens[n+1]-1; else N = B); X0, P0 [N, H, Dk, Dv] (the state at a chunk
 * boundary, offset 0). Optional (NULL): momentum (plain gradient descent), bias_param (huber
 * delta / robust Delta per token; else config.delta / config.robust_delta), ret_param
 * (elastic-net gamma per token; else config.gamma), cu_seqlens, X0 (zeros; for KL: uniform
 * memory), P0 (zeros; only with momentum). cu_seqlens values are checked on the CPU only. */
typedef struct miras_chunk_inputs {
  const miras_tensor *q, *k, *v;
  const miras_tensor *lr, *alpha, *momentum;
  const miras_tensor *bias_param, *ret_param;
  const miras_tensor *cu_seqlens;
  const miras_tensor *X0, *P0;
} miras_chunk_inputs;

/* Outputs of the forward. o [B, T, H, Dv] (required). Optional (NULL = not wanted): XT, PT
 * (momentum only), AT [N, H, Dk, Dv] — the final raw state, momentum, and anchor (the raw state at
 * the last chunk boundary); final_offset int64 [N] (tokens since that boundary, len % C);
 * chunk_X, chunk_P (momentum only) [miras_num_chunk_slots(...), H, Dk, Dv] — the chunk-start
 * states the backward needs. (XT, PT, AT, final_offset) is the state that miras_step continues. */
typedef struct miras_fwd_outputs {
  miras_tensor* o;
  miras_tensor *XT, *PT, *AT;
  miras_tensor* final_offset;
  miras_tensor *chunk_X, *chunk_P;
} miras_fwd_outputs;

/* Inputs of the backward besides the forward's: the forward's chunk_X (and chunk_P with
 * momentum), dO [B, T, H, Dv] (required), dXT, dPT [N, H, Dk, Dv] (optional: zero). */
typedef struct miras_bwd_inputs {
  const miras_tensor *chunk_X, *chunk_P;
  const miras_tensor* dO;
  const miras_tensor *dXT, *dPT;
} miras_bwd_inputs;

/* Gradients (shapes of the matching inputs). Required: dq, dk, dv, dlr, dalpha, dX0 (also when
 * X0 was NULL: the gradient with respect to the zero initial state); dmomentum and dP0 with
 * momentum; dbias_param / dret_param exactly when bias_param / ret_param were given. */
typedef struct miras_bwd_outputs {
  miras_tensor *dq, *dk, *dv;
  miras_tensor *dlr, *dalpha, *dmomentum;
  miras_tensor *dbias_param, *dret_param;
  miras_tensor *dX0, *dP0;
} miras_bwd_outputs;

/* One token per sequence (decoding, SPEC §7). q, k [B, H, Dk]; v [B, H, Dv]; gates and
 * parameters [B, H]; the state X, P, anchor [B, H, Dk, Dv] and offset int64 [B]. The step takes
 * the gradient at `anchor`, updates X (and P), reads after the write (o [B, H, Dv]), and sets
 * offset_out = offset + 1, or 0 with anchor_out = X_out when that reaches config.chunk_size
 * (else anchor_out = anchor). Required: q, k, v, lr, alpha, X, anchor, offset, o, X_out,
 * anchor_out, offset_out, and P_out with momentum. P is optional (zeros) and only with momentum.
 * offset must lie in [0, chunk_size) (checked on the CPU; the caller's duty on CUDA). */
typedef struct miras_step_args {
  const miras_tensor *q, *k, *v;
  const miras_tensor *lr, *alpha, *momentum;
  const miras_tensor *bias_param, *ret_param;
  const miras_tensor *X, *P, *anchor, *offset;
  miras_tensor* o;
  miras_tensor *X_out, *P_out, *anchor_out, *offset_out;
} miras_step_args;

/* ---- functions ------------------------------------------------------------------------------ */
MIRAS_API int32_t miras_abi_version(void);                /* MIRAS_ABI_VERSION */
MIRAS_API int32_t miras_has_cuda(void);                   /* 1 when built with the CUDA kernels */
MIRAS_API const char* miras_status_string(int32_t status);
/* The message of the calling thread's last failed call ("" after a successful call). The
 * pointer stays valid until the thread's next miras call. */
MIRAS_API const char* miras_last_error(void);

/* Defaults of every field (those of miras.memory_update); scale = head_dim_k^-1/2 (1.0 when
 * head_dim_k <= 0). */
MIRAS_API miras_status miras_config_init(miras_config* config, int64_t head_dim_k);

/* Rows of chunk_X / chunk_P: N * ceil(T / C) without cu_seqlens; T / C + N with them (an upper
 * bound that depends on shapes alone). Returns -1 for invalid arguments. */
MIRAS_API int64_t miras_num_chunk_slots(int64_t num_seqs, int64_t T, int64_t chunk_size, int32_t varlen);

MIRAS_API miras_status miras_chunk_fwd_workspace_size(const miras_config* config, const miras_chunk_inputs* in,
                                                      const miras_fwd_outputs* out, int32_t device, size_t* bytes);
MIRAS_API miras_status miras_chunk_fwd(const miras_config* config, const miras_chunk_inputs* in,
                                       const miras_fwd_outputs* out, const miras_exec* exec);

MIRAS_API miras_status miras_chunk_bwd_workspace_size(const miras_config* config, const miras_chunk_inputs* in,
                                                      const miras_bwd_inputs* bin, const miras_bwd_outputs* grads,
                                                      int32_t device, size_t* bytes);
MIRAS_API miras_status miras_chunk_bwd(const miras_config* config, const miras_chunk_inputs* in,
                                       const miras_bwd_inputs* bin, const miras_bwd_outputs* grads,
                                       const miras_exec* exec);

MIRAS_API miras_status miras_step_workspace_size(const miras_config* config, const miras_step_args* args,
                                                 int32_t device, size_t* bytes);
MIRAS_API miras_status miras_step(const miras_config* config, const miras_step_args* args, const miras_exec* exec);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* MIRAS_H_ */
