// miras/capi/miras_capi.cpp — the C ABI (miras.h): checks the descriptors, fills the backend
// params (csrc/core/params.h, sizes and config checks shared with the torch glue through
// csrc/core/problem.h), and calls the same backends as the torch extension (chunk_*_cpu,
// chunk_*_cuda). Every exception stops at this boundary and becomes a status + message.
#include "miras.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "../core/backends.h"
#include "../core/params.h"
#include "../core/problem.h"
#ifdef MIRAS_WITH_CUDA
#include <cuda_runtime.h>

#include "capi_cuda.h"
#include "../cuda/verification.h"
#endif

namespace {

using namespace miras;

// The C enums are the backends' codes (csrc/core/params.h).
constexpr bool same(int c_code, int core_code) { return c_code == core_code; }
static_assert(same(MIRAS_FLOAT32, kFloat32) && same(MIRAS_FLOAT64, kFloat64) && same(MIRAS_FLOAT16, kFloat16) &&
                  same(MIRAS_BFLOAT16, kBFloat16),
              "miras_dtype must match miras::DType");
static_assert(same(MIRAS_BIAS_DOT, kBiasDot) && same(MIRAS_BIAS_L2, kBiasL2) && same(MIRAS_BIAS_LP, kBiasLp) &&
                  same(MIRAS_BIAS_HUBER_YAAD, kBiasHuberYaad) && same(MIRAS_BIAS_HUBER_COORD, kBiasHuberCoord) &&
                  same(MIRAS_BIAS_HUBER_NORM, kBiasHuberNorm) && same(MIRAS_BIAS_ROBUST, kBiasRobust),
              "miras_bias must match miras::BiasKind");
static_assert(same(MIRAS_RETENTION_L2, kRetL2) && same(MIRAS_RETENTION_KL, kRetKL) &&
                  same(MIRAS_RETENTION_ELASTIC_NET, kRetElasticNet) && same(MIRAS_RETENTION_LQ, kRetLq),
              "miras_retention must match miras::RetentionKind");

// ---- errors -------------------------------------------------------------------------------
thread_local std::string g_last_error;

struct Error {
  miras_status status;
  std::string msg;
};

[[noreturn]] void fail(miras_status s, std::string msg) { throw Error{s, std::move(msg)}; }

void set_error(const char* fn, const char* msg) noexcept {
  try {
    g_last_error = std::string(fn) + ": " + msg;
  } catch (...) {
    g_last_error.clear();  // (out of memory while reporting: the status still says what failed)
  }
}

// Runs f; turns every exception into a status and the thread's last-error message.
template <typename F>
miras_status guarded(const char* fn, F&& f) noexcept {
  g_last_error.clear();
  try {
    f();
    return MIRAS_OK;
  } catch (const Error& e) {
    set_error(fn, e.msg.c_str());
    return e.status;
  } catch (const std::invalid_argument& e) {  // the backends' "bad input"
    set_error(fn, e.what());
    return MIRAS_ERROR_INVALID_ARGUMENT;
  } catch (const std::bad_alloc&) {
    set_error(fn, "out of host memory");
    return MIRAS_ERROR_INTERNAL;
  } catch (const std::runtime_error& e) {  // the backends' failed launches
    set_error(fn, e.what());
    return MIRAS_ERROR_RUNTIME;
  } catch (const std::exception& e) {
    set_error(fn, e.what());
    return MIRAS_ERROR_INTERNAL;
  } catch (...) {
    set_error(fn, "unknown exception");
    return MIRAS_ERROR_INTERNAL;
  }
}

// ---- descriptors --------------------------------------------------------------------------
std::string dims_str(const int64_t* d, int n) {
  std::string s = "[";
  for (int i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

const char* any_dtype_name(int32_t d) { return d == MIRAS_INT64 ? "int64" : dtype_name(d); }

size_t dtype_size(int32_t d) {
  switch (d) {
    case MIRAS_FLOAT64:
    case MIRAS_INT64: return 8;
    case MIRAS_FLOAT32: return 4;
    default: return 2;
  }
}

struct Want {
  std::vector<int64_t> shape;
  const char* dims;  // the shape in symbols, e.g. "[B, T, H, Dk]"
};

// Checks a descriptor against the expected dtype and shape and the layout rules; returns its
// data pointer, or nullptr when the tensor is absent (t == nullptr and !required).
void* check_tensor(const miras_tensor* t, const char* name, bool required, int32_t dtype, const Want& w,
                   const char* dtype_rule) {
  if (!t) {
    if (required) fail(MIRAS_ERROR_NULL_POINTER, std::string(name) + " is required (got a NULL tensor)");
    return nullptr;
  }
  const int n = static_cast<int>(w.shape.size());
  if (t->ndim != n || !std::equal(w.shape.begin(), w.shape.end(), t->shape)) {
    const std::string got =
        (t->ndim >= 0 && t->ndim <= 4) ? dims_str(t->shape, t->ndim) : "ndim " + std::to_string(t->ndim);
    fail(MIRAS_ERROR_SHAPE, std::string(name) + " must have shape " + w.dims + " = " +
                                dims_str(w.shape.data(), n) + ", got " + got);
  }
  if (t->dtype != dtype)
    fail(MIRAS_ERROR_DTYPE, std::string(name) + " must be " + any_dtype_name(dtype) + " (" + dtype_rule +
                                "), got " + any_dtype_name(t->dtype) + " (code " + std::to_string(t->dtype) + ")");
  int64_t numel = 1;
  for (int i = 0; i < n; ++i) numel *= w.shape[i];
  if (t->strides) {
    int64_t expect = 1;
    for (int i = n - 1; i >= 0; --i) {
      if (w.shape[i] != 1 && t->strides[i] != expect && numel > 0) {
        std::vector<int64_t> rm(n);
        int64_t e = 1;
        for (int j = n - 1; j >= 0; --j) rm[j] = e, e *= w.shape[j];
        fail(MIRAS_ERROR_SHAPE, std::string(name) + " must be contiguous (row-major strides " +
                                    dims_str(rm.data(), n) + "), got strides " + dims_str(t->strides, n) +
                                    "; pass a contiguous copy");
      }
      expect *= w.shape[i];
    }
  }
  if (numel > 0 && !t->data) fail(MIRAS_ERROR_NULL_POINTER, std::string(name) + "->data is NULL");
  return t->data;
}

void need_absent(const void* t, const char* name, const char* why) {
  if (t) fail(MIRAS_ERROR_INVALID_ARGUMENT, std::string(name) + " must be NULL " + why);
}

// ---- devices ------------------------------------------------------------------------------
bool is_cuda(int32_t device) {
  if (device == MIRAS_DEVICE_CPU) return false;
  if (device != MIRAS_DEVICE_CUDA)
    fail(MIRAS_ERROR_DEVICE, "unknown device code " + std::to_string(device) +
                                 " (use MIRAS_DEVICE_CPU = 0 or MIRAS_DEVICE_CUDA = 1)");
#ifndef MIRAS_WITH_CUDA
  fail(MIRAS_ERROR_NOT_BUILT,
       "this libmiras was built without CUDA; rebuild it with cmake -DMIRAS_WITH_CUDA=ON, or run on "
       "MIRAS_DEVICE_CPU");
#endif
  return true;
}

// Copies and zero fills on the call's device (stream-ordered on CUDA).
struct Mem {
  bool cuda = false;
  void* stream = nullptr;
  void copy(void* dst, const void* src, size_t bytes) const {
    if (!bytes || dst == src) return;
#ifdef MIRAS_WITH_CUDA
    if (cuda) return check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, s()), "cudaMemcpyAsync");
#endif
    std::memcpy(dst, src, bytes);
  }
  void zero(void* dst, size_t bytes) const {
    if (!bytes) return;
#ifdef MIRAS_WITH_CUDA
    if (cuda) return check_cuda(cudaMemsetAsync(dst, 0, bytes, s()), "cudaMemsetAsync");
#endif
    std::memset(dst, 0, bytes);
  }
#ifdef MIRAS_WITH_CUDA
  cudaStream_t s() const { return static_cast<cudaStream_t>(stream); }
  static void check_cuda(cudaError_t e, const char* what) {
    if (e != cudaSuccess) fail(MIRAS_ERROR_RUNTIME, std::string(what) + " failed: " + cudaGetErrorString(e));
  }
#endif
};

const miras_exec& need_exec(const miras_exec* ex) {
  if (!ex) fail(MIRAS_ERROR_NULL_POINTER, "exec is required (device, stream, workspace)");
  return *ex;
}

// ---- config -------------------------------------------------------------------------------
MemoryConfig to_core(const miras_config* c) {
  if (!c) fail(MIRAS_ERROR_NULL_POINTER, "config is required (fill it with miras_config_init)");
  MemoryConfig m;
  m.bias = c->bias;
  m.retention = c->retention;
  m.bias_param = c->bias == MIRAS_BIAS_ROBUST ? c->robust_delta : c->delta;
  m.ret_param = c->gamma;
#define MIRAS_COPY_(field) m.field = c->field;
  MIRAS_CONFIG_SHARED_FIELDS(MIRAS_COPY_)
#undef MIRAS_COPY_
  return m;
}

void check_config(const MemoryConfig& m, bool bias_tensor, bool ret_tensor) {
  const std::string err = config_error(m, bias_tensor, ret_tensor);
  if (!err.empty()) fail(MIRAS_ERROR_INVALID_ARGUMENT, "config." + err);
}

// ---- the forward's inputs -----------------------------------------------------------------
// q's dtype decides the io dtype; the others follow (problem.h: state_dtype).
int32_t io_dtype(const miras_tensor* q, bool cuda) {
  if (!q) fail(MIRAS_ERROR_NULL_POINTER, "q is required (got a NULL tensor)");
  const int32_t d = q->dtype;
  if (cuda) {
    if (d != MIRAS_FLOAT32 && d != MIRAS_FLOAT16 && d != MIRAS_BFLOAT16)
      fail(MIRAS_ERROR_DTYPE, std::string("q must be float32, float16 or bfloat16 on CUDA, got ") + any_dtype_name(d) +
                                  (d == MIRAS_FLOAT64 ? " (float64 runs on the CPU only)" : ""));
  } else if (d != MIRAS_FLOAT32 && d != MIRAS_FLOAT64) {
    fail(MIRAS_ERROR_DTYPE, std::string("q must be float32 or float64 on the CPU, got ") + any_dtype_name(d) +
                                " (code " + std::to_string(d) + ")" +
                                ((d == MIRAS_FLOAT16 || d == MIRAS_BFLOAT16) ? "; float16/bfloat16 run on CUDA" : ""));
  }
  return d;
}

// Everything a chunked call derives from its inputs.
struct Call {
  bool cuda = false;
  int32_t io = kFloat32, st = kFloat32;  // dtypes of q/k/v/o and of everything else
  const char* st_rule = "";
  Problem pr;
  ChunkFwdParams p;
  bool mom = false;
  size_t state_bytes() const { return size_t(pr.N * pr.H * pr.Dk * pr.Dv) * dtype_size(st); }
  Want state() const { return {{pr.N, pr.H, pr.Dk, pr.Dv}, "[N, H, Dk, Dv]"}; }
  Want slots() const { return {{pr.slots, pr.H, pr.Dk, pr.Dv}, "[num_chunk_slots, H, Dk, Dv]"}; }
  Want gate() const { return {{pr.B, pr.T, pr.H}, "[B, T, H]"}; }
  Want qk() const { return {{pr.B, pr.T, pr.H, pr.Dk}, "[B, T, H, Dk]"}; }
  Want vo() const { return {{pr.B, pr.T, pr.H, pr.Dv}, "[B, T, H, Dv]"}; }
  int64_t tokens() const { return pr.varlen ? pr.T : pr.B * pr.T; }
};

void set_rules(Call& c) {
  c.st_rule = c.cuda ? "gates, parameters and states are float32 on CUDA" : "every tensor has q's dtype on the CPU";
  c.st = state_dtype(c.cuda, c.io);
}

Call prepare_chunk(const miras_config* config, const miras_chunk_inputs* in, int32_t device) {
  Call c;
  c.cuda = is_cuda(device);
  if (!in) fail(MIRAS_ERROR_NULL_POINTER, "inputs are required (a miras_chunk_inputs)");
  c.io = io_dtype(in->q, c.cuda);
  set_rules(c);
  const miras_tensor& q = *in->q;
  if (q.ndim != 4)
    fail(MIRAS_ERROR_SHAPE, "q must be 4-D [B, T, H, Dk], got ndim " + std::to_string(q.ndim));
  if (!in->v) fail(MIRAS_ERROR_NULL_POINTER, "v is required (got a NULL tensor)");
  if (in->v->ndim != 4)
    fail(MIRAS_ERROR_SHAPE, "v must be 4-D [B, T, H, Dv], got ndim " + std::to_string(in->v->ndim));
  const int64_t B = q.shape[0], T = q.shape[1], H = q.shape[2], Dk = q.shape[3], Dv = in->v->shape[3];
  if (B < 0 || T < 0 || H < 1 || Dk < 1 || Dv < 1)
    fail(MIRAS_ERROR_SHAPE, "q must be [B, T, H, Dk] with B, T >= 0 and H, Dk >= 1, and Dv >= 1; got q " +
                                dims_str(q.shape, 4) + ", v " + dims_str(in->v->shape, 4));
  int64_t cu_len = 0;
  if (in->cu_seqlens) {
    const miras_tensor& cu = *in->cu_seqlens;
    if (cu.ndim != 1 || cu.shape[0] < 2)
      fail(MIRAS_ERROR_SHAPE, "cu_seqlens must be 1-D [N+1] with N >= 1, got " +
                                  ((cu.ndim >= 0 && cu.ndim <= 4) ? dims_str(cu.shape, cu.ndim)
                                                                  : "ndim " + std::to_string(cu.ndim)));
    if (B != 1)
      fail(MIRAS_ERROR_SHAPE,
           "with cu_seqlens the batch size B must be 1 (sequences packed along T), got " + std::to_string(B));
    cu_len = cu.shape[0];
  }
  c.p.cfg = to_core(config);
  check_config(c.p.cfg, in->bias_param != nullptr, in->ret_param != nullptr);  // (before C divides)
  c.pr = make_problem(B, T, H, Dk, Dv, in->cu_seqlens != nullptr ? cu_len - 1 : -1, c.p.cfg.chunk_size);
  set_problem(c.p, c.pr, c.io, c.p.cfg);
  c.mom = in->momentum != nullptr;
  ChunkFwdParams& p = c.p;
  p.q = check_tensor(in->q, "q", true, c.io, c.qk(), "q's dtype");
  p.k = check_tensor(in->k, "k", true, c.io, c.qk(), "q's dtype");
  p.v = check_tensor(in->v, "v", true, c.io, c.vo(), "q's dtype");
  p.lr = check_tensor(in->lr, "lr", true, c.st, c.gate(), c.st_rule);
  p.alpha = check_tensor(in->alpha, "alpha", true, c.st, c.gate(), c.st_rule);
  p.momentum = check_tensor(in->momentum, "momentum", false, c.st, c.gate(), c.st_rule);
  p.bias_param = check_tensor(in->bias_param, "bias_param", false, c.st, c.gate(), c.st_rule);
  p.ret_param = check_tensor(in->ret_param, "ret_param", false, c.st, c.gate(), c.st_rule);
  p.cu_seqlens = static_cast<const int64_t*>(
      check_tensor(in->cu_seqlens, "cu_seqlens", false, MIRAS_INT64, {{cu_len}, "[N+1]"}, "indices are int64"));
  p.X0 = check_tensor(in->X0, "X0", false, c.st, c.state(), c.st_rule);
  if (!c.mom) need_absent(in->P0, "P0", "without momentum (a momentum state needs momentum gates)");
  p.P0 = check_tensor(in->P0, "P0", false, c.st, c.state(), c.st_rule);
  return c;
}

#ifdef MIRAS_WITH_CUDA
void cuda_supported(const ChunkFwdParams& p) {
  if (const char* why = cuda_unsupported(p)) fail(MIRAS_ERROR_UNSUPPORTED, why);
}
// The C ABI's own kernels (final offsets, the step's anchor move: csrc/capi/capi_cuda.cu) follow the
// hardware-verification rule of csrc/cuda/verification.h like every other kernel family.
void capi_kernels_enabled() {
  const char* why = nullptr;
  if (!cuda::family_enabled("capi", &why))
    fail(MIRAS_ERROR_UNSUPPORTED, std::string("the C ABI's CUDA kernels (final offsets, step bookkeeping) are "
                                              "disabled: ") + why);
}
void need_workspace(const miras_exec& ex, size_t bytes) {
  if (ex.workspace_bytes < bytes || (bytes > 0 && !ex.workspace))
    fail(MIRAS_ERROR_WORKSPACE, "the workspace must hold " + std::to_string(bytes) + " bytes, got " +
                                    std::to_string(ex.workspace ? ex.workspace_bytes : 0) +
                                    " (query the size with the matching *_workspace_size function)");
}
#endif

// ---- forward ------------------------------------------------------------------------------
void bind_fwd_outputs(Call& c, const miras_fwd_outputs* out) {
  if (!out) fail(MIRAS_ERROR_NULL_POINTER, "outputs are required (a miras_fwd_outputs)");
  ChunkFwdParams& p = c.p;
  p.o = check_tensor(out->o, "o", true, c.io, c.vo(), "q's dtype");
  p.XT = check_tensor(out->XT, "XT", false, c.st, c.state(), c.st_rule);
  p.AT = check_tensor(out->AT, "AT", false, c.st, c.state(), c.st_rule);
  if (!c.mom) {
    need_absent(out->PT, "PT", "without momentum (there is no momentum state)");
    need_absent(out->chunk_P, "chunk_P", "without momentum (there is no momentum state)");
  }
  p.PT = check_tensor(out->PT, "PT", false, c.st, c.state(), c.st_rule);
  p.chunk_X = check_tensor(out->chunk_X, "chunk_X", false, c.st, c.slots(), c.st_rule);
  p.chunk_P = check_tensor(out->chunk_P, "chunk_P", false, c.st, c.slots(), c.st_rule);
  if (c.mom && (p.chunk_X != nullptr) != (p.chunk_P != nullptr))
    fail(MIRAS_ERROR_NULL_POINTER, "with momentum, chunk_X and chunk_P are saved together (the backward needs "
                                   "both): give both or neither");
  check_tensor(out->final_offset, "final_offset", false, MIRAS_INT64, {{c.pr.N}, "[N]"}, "offsets are int64");
#ifdef MIRAS_WITH_CUDA
  if (c.cuda && out->final_offset) capi_kernels_enabled();
#endif
}

// The final offset of each sequence: its length mod C.
void final_offsets(const Call& c, const miras_fwd_outputs* out, const Mem& mem) {
  if (!out->final_offset || c.pr.N == 0) return;
  auto* dst = static_cast<int64_t*>(out->final_offset->data);
  const int64_t C = c.p.cfg.chunk_size;
#ifdef MIRAS_WITH_CUDA
  if (c.cuda) return capi_cuda::final_offsets(c.p.cu_seqlens, c.pr.N, c.pr.T, C, dst, mem.s());
#endif
  (void)mem;
  for (int64_t n = 0; n < c.pr.N; ++n) dst[n] = seq_len(c.p.cu_seqlens, n, c.pr.T) % C;
}

size_t fwd_workspace(const Call& c) {
#ifdef MIRAS_WITH_CUDA
  if (c.cuda && c.tokens() > 0) {
    cuda_supported(c.p);
    return chunk_fwd_cuda_workspace(c.p);
  }
#endif
  (void)c;
  return 0;
}

void run_fwd(Call& c, const miras_fwd_outputs* out, const miras_exec& ex) {
  const Mem mem{c.cuda, ex.stream};
  ChunkFwdParams& p = c.p;
  if (c.tokens() == 0) {
    // No tokens: the state passes through (the backends are not called: empty tensors may have
    // NULL data pointers). Same rule as the torch glue.
    const size_t sb = c.state_bytes();
    if (p.XT) p.X0 ? mem.copy(p.XT, p.X0, sb) : mem.zero(p.XT, sb);
    if (p.PT) p.P0 ? mem.copy(p.PT, p.P0, sb) : mem.zero(p.PT, sb);
    if (p.AT) p.X0 ? mem.copy(p.AT, p.X0, sb) : mem.zero(p.AT, sb);
    final_offsets(c, out, mem);
    return;
  }
  if (c.pr.varlen) {
    // The slot count is an upper bound with cu_seqlens: zero the slots so unused ones are
    // deterministic (as the torch glue does).
    const size_t slot_bytes = size_t(c.pr.slots * c.pr.H * c.pr.Dk * c.pr.Dv) * dtype_size(c.st);
    if (p.chunk_X) mem.zero(p.chunk_X, slot_bytes);
    if (p.chunk_P) mem.zero(p.chunk_P, slot_bytes);
  }
  if (c.cuda) {
#ifdef MIRAS_WITH_CUDA
    const size_t ws = fwd_workspace(c);
    need_workspace(ex, ws);
    chunk_fwd_cuda(p, ex.workspace, ex.stream);
#endif
  } else {
    chunk_fwd_cpu(p);
  }
  final_offsets(c, out, mem);
}

// ---- backward -----------------------------------------------------------------------------
struct BwdCall {
  Call c;
  ChunkBwdParams b;
};

BwdCall prepare_bwd(const miras_config* config, const miras_chunk_inputs* in, const miras_bwd_inputs* bin,
                    const miras_bwd_outputs* g, int32_t device) {
  BwdCall r{prepare_chunk(config, in, device), {}};
  Call& c = r.c;
  if (!bin) fail(MIRAS_ERROR_NULL_POINTER, "backward inputs are required (a miras_bwd_inputs)");
  if (!g) fail(MIRAS_ERROR_NULL_POINTER, "gradient outputs are required (a miras_bwd_outputs)");
  ChunkFwdParams& p = c.p;
  // The saved chunk states are inputs here.
  p.chunk_X = check_tensor(bin->chunk_X, "chunk_X", true, c.st, c.slots(), c.st_rule);
  if (!c.mom) need_absent(bin->chunk_P, "chunk_P", "without momentum");
  p.chunk_P = check_tensor(bin->chunk_P, "chunk_P", c.mom, c.st, c.slots(), c.st_rule);
  ChunkBwdParams& b = r.b;
  const int32_t gd = c.st;  // gradients: q's dtype on the CPU, float32 on CUDA
  const char* grule = c.cuda ? "gradients are float32 on CUDA" : "every tensor has q's dtype on the CPU";
  b.dO = check_tensor(bin->dO, "dO", true, c.io, c.vo(), "q's dtype");
  b.dXT = check_tensor(bin->dXT, "dXT", false, c.st, c.state(), c.st_rule);
  if (!c.mom) need_absent(bin->dPT, "dPT", "without momentum");
  b.dPT = check_tensor(bin->dPT, "dPT", false, c.st, c.state(), c.st_rule);
  b.dq = check_tensor(g->dq, "dq", true, gd, c.qk(), grule);
  b.dk = check_tensor(g->dk, "dk", true, gd, c.qk(), grule);
  b.dv = check_tensor(g->dv, "dv", true, gd, c.vo(), grule);
  b.dlr = check_tensor(g->dlr, "dlr", true, gd, c.gate(), grule);
  b.dalpha = check_tensor(g->dalpha, "dalpha", true, gd, c.gate(), grule);
  if (!c.mom) {
    need_absent(g->dmomentum, "dmomentum", "without momentum");
    need_absent(g->dP0, "dP0", "without momentum");
  }
  b.dmomentum = check_tensor(g->dmomentum, "dmomentum", c.mom, gd, c.gate(), grule);
  if (!in->bias_param) need_absent(g->dbias_param, "dbias_param", "when bias_param is NULL (a scalar parameter)");
  b.dbias_param = check_tensor(g->dbias_param, "dbias_param", in->bias_param != nullptr, gd, c.gate(), grule);
  if (!in->ret_param) need_absent(g->dret_param, "dret_param", "when ret_param is NULL (a scalar parameter)");
  b.dret_param = check_tensor(g->dret_param, "dret_param", in->ret_param != nullptr, gd, c.gate(), grule);
  b.dX0 = check_tensor(g->dX0, "dX0", true, gd, c.state(), grule);
  b.dP0 = check_tensor(g->dP0, "dP0", c.mom, gd, c.state(), grule);
  b.fwd = p;
  return r;
}

size_t bwd_workspace(const BwdCall& r) {
#ifdef MIRAS_WITH_CUDA
  if (r.c.cuda && r.c.tokens() > 0) {
    cuda_supported(r.c.p);
    return chunk_bwd_cuda_workspace(r.b);
  }
#endif
  (void)r;
  return 0;
}

void run_bwd(BwdCall& r, const miras_exec& ex) {
  const Call& c = r.c;
  const ChunkBwdParams& b = r.b;
  if (c.tokens() == 0) {  // no tokens: the state's gradient passes through
    const Mem mem{c.cuda, ex.stream};
    const size_t sb = c.state_bytes();
    b.dXT ? mem.copy(b.dX0, b.dXT, sb) : mem.zero(b.dX0, sb);
    if (b.dP0) b.dPT ? mem.copy(b.dP0, b.dPT, sb) : mem.zero(b.dP0, sb);
    return;
  }
  if (c.cuda) {
#ifdef MIRAS_WITH_CUDA
    const size_t ws = bwd_workspace(r);
    need_workspace(ex, ws);
    chunk_bwd_cuda(b, ex.workspace, ex.stream);
#endif
  } else {
    chunk_bwd_cpu(b);
  }
}

// ---- step ---------------------------------------------------------------------------------
// The chunk op over one token per sequence with a separate anchor (what miras.memory_step does):
// N = B, T = 1, chunk_size 1 inside the op, A0 = the anchor; then offset + 1 and the anchor move.
struct StepCall {
  Call c;
  int64_t C = 1;  // the step's chunk size
  const int64_t* off_in = nullptr;
  int64_t* off_out = nullptr;
  void* anchor_out = nullptr;
};

StepCall prepare_step(const miras_config* config, const miras_step_args* a, int32_t device) {
  StepCall s;
  Call& c = s.c;
  c.cuda = is_cuda(device);
  if (!a) fail(MIRAS_ERROR_NULL_POINTER, "args are required (a miras_step_args)");
  c.io = io_dtype(a->q, c.cuda);
  set_rules(c);
  const miras_tensor& q = *a->q;
  if (q.ndim != 3)
    fail(MIRAS_ERROR_SHAPE, "q must be 3-D [B, H, Dk] (one token per sequence), got ndim " + std::to_string(q.ndim));
  if (!a->v) fail(MIRAS_ERROR_NULL_POINTER, "v is required (got a NULL tensor)");
  if (a->v->ndim != 3)
    fail(MIRAS_ERROR_SHAPE, "v must be 3-D [B, H, Dv], got ndim " + std::to_string(a->v->ndim));
  const int64_t B = q.shape[0], H = q.shape[1], Dk = q.shape[2], Dv = a->v->shape[2];
  if (B < 0 || H < 1 || Dk < 1 || Dv < 1)
    fail(MIRAS_ERROR_SHAPE, "q must be [B, H, Dk] with B >= 0 and H, Dk >= 1, and Dv >= 1; got q " +
                                dims_str(q.shape, 3) + ", v " + dims_str(a->v->shape, 3));
  const MemoryConfig user = to_core(config);
  check_config(user, a->bias_param != nullptr, a->ret_param != nullptr);
  s.C = user.chunk_size;
  c.p.cfg = user;
  c.p.cfg.chunk_size = 1;  // one token: the op's chunk is the token; the anchor is A0
  c.pr = make_problem(B, 1, H, Dk, Dv, -1, 1);
  set_problem(c.p, c.pr, c.io, c.p.cfg);
  c.mom = a->momentum != nullptr;
  const Want tok_k{{B, H, Dk}, "[B, H, Dk]"}, tok_v{{B, H, Dv}, "[B, H, Dv]"}, gate{{B, H}, "[B, H]"};
  const Want st{{B, H, Dk, Dv}, "[B, H, Dk, Dv]"}, off{{B}, "[B]"};
  ChunkFwdParams& p = c.p;
  p.q = check_tensor(a->q, "q", true, c.io, tok_k, "q's dtype");
  p.k = check_tensor(a->k, "k", true, c.io, tok_k, "q's dtype");
  p.v = check_tensor(a->v, "v", true, c.io, tok_v, "q's dtype");
  p.lr = check_tensor(a->lr, "lr", true, c.st, gate, c.st_rule);
  p.alpha = check_tensor(a->alpha, "alpha", true, c.st, gate, c.st_rule);
  p.momentum = check_tensor(a->momentum, "momentum", false, c.st, gate, c.st_rule);
  p.bias_param = check_tensor(a->bias_param, "bias_param", false, c.st, gate, c.st_rule);
  p.ret_param = check_tensor(a->ret_param, "ret_param", false, c.st, gate, c.st_rule);
  p.X0 = check_tensor(a->X, "X", true, c.st, st, c.st_rule);
  if (!c.mom) {
    need_absent(a->P, "P", "without momentum (a momentum state needs momentum gates)");
    need_absent(a->P_out, "P_out", "without momentum (there is no momentum state)");
  }
  p.P0 = check_tensor(a->P, "P", false, c.st, st, c.st_rule);
  p.A0 = check_tensor(a->anchor, "anchor", true, c.st, st, c.st_rule);
  s.off_in = static_cast<const int64_t*>(
      check_tensor(a->offset, "offset", true, MIRAS_INT64, off, "offsets are int64"));
  p.o = check_tensor(a->o, "o", true, c.io, tok_v, "q's dtype");
  p.XT = check_tensor(a->X_out, "X_out", true, c.st, st, c.st_rule);
  p.PT = check_tensor(a->P_out, "P_out", c.mom, c.st, st, c.st_rule);
  s.anchor_out = check_tensor(a->anchor_out, "anchor_out", true, c.st, st, c.st_rule);
  s.off_out = static_cast<int64_t*>(
      check_tensor(a->offset_out, "offset_out", true, MIRAS_INT64, off, "offsets are int64"));
  // The op writes o, X_out, P_out while it reads every input; anchor_out is written afterwards.
  if (B > 0) {
    const void* ins[] = {p.q, p.k, p.v, p.lr, p.alpha, p.momentum, p.bias_param, p.ret_param, p.X0, p.P0, p.A0};
    const char* in_names[] = {"q", "k", "v", "lr", "alpha", "momentum", "bias_param", "ret_param", "X", "P", "anchor"};
    const void* outs[] = {p.o, p.XT, p.PT};
    const char* out_names[] = {"o", "X_out", "P_out"};
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 11; ++j)
        if (outs[i] && outs[i] == ins[j])
          fail(MIRAS_ERROR_INVALID_ARGUMENT, std::string(out_names[i]) + " may not be the same buffer as " +
                                                 in_names[j] + " (use two state buffers and swap them)");
    if (s.anchor_out == p.XT || s.anchor_out == p.PT || s.anchor_out == p.o)
      fail(MIRAS_ERROR_INVALID_ARGUMENT, "anchor_out must be its own buffer (it may be anchor itself)");
  }
  if (!c.cuda) {  // host offsets: check them before anything is written
    for (int64_t n = 0; n < B; ++n)
      if (s.off_in[n] < 0 || s.off_in[n] >= s.C)
        fail(MIRAS_ERROR_INVALID_ARGUMENT, "offset[" + std::to_string(n) + "] = " + std::to_string(s.off_in[n]) +
                                               " must lie in [0, chunk_size = " + std::to_string(s.C) + ")");
  }
  return s;
}

void run_step(StepCall& s, const miras_exec& ex) {
  Call& c = s.c;
  const int64_t B = c.pr.N;
  if (B == 0) return;
  if (c.cuda) {
#ifdef MIRAS_WITH_CUDA
    capi_kernels_enabled();
    const size_t ws = fwd_workspace(c);
    need_workspace(ex, ws);
    chunk_fwd_cuda(c.p, ex.workspace, ex.stream);
    capi_cuda::step_finish(s.off_in, s.off_out, static_cast<const float*>(c.p.XT), static_cast<const float*>(c.p.A0),
                           static_cast<float*>(s.anchor_out), B, c.pr.H * c.pr.Dk * c.pr.Dv, s.C,
                           static_cast<cudaStream_t>(ex.stream));
#endif
    return;
  }
  chunk_fwd_cpu(c.p);
  const size_t per = size_t(c.pr.H * c.pr.Dk * c.pr.Dv) * dtype_size(c.st);
  const Mem mem{false, nullptr};
  for (int64_t n = 0; n < B; ++n) {
    const int64_t next = s.off_in[n] + 1;
    const bool moved = next >= s.C;
    const char* src = static_cast<const char*>(moved ? c.p.XT : c.p.A0) + n * per;
    mem.copy(static_cast<char*>(s.anchor_out) + n * per, src, per);
    s.off_out[n] = moved ? 0 : next;
  }
}

}  // namespace

// ---- the exported functions ---------------------------------------------------------------
extern "C" {

int32_t miras_abi_version(void) { return MIRAS_ABI_VERSION; }

int32_t miras_has_cuda(void) {
#ifdef MIRAS_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

const char* miras_status_string(int32_t status) {
  switch (status) {
    case MIRAS_OK: return "MIRAS_OK";
    case MIRAS_ERROR_INVALID_ARGUMENT: return "MIRAS_ERROR_INVALID_ARGUMENT";
    case MIRAS_ERROR_NULL_POINTER: return "MIRAS_ERROR_NULL_POINTER";
    case MIRAS_ERROR_DTYPE: return "MIRAS_ERROR_DTYPE";
    case MIRAS_ERROR_SHAPE: return "MIRAS_ERROR_SHAPE";
    case MIRAS_ERROR_DEVICE: return "MIRAS_ERROR_DEVICE";
    case MIRAS_ERROR_NOT_BUILT: return "MIRAS_ERROR_NOT_BUILT";
    case MIRAS_ERROR_UNSUPPORTED: return "MIRAS_ERROR_UNSUPPORTED";
    case MIRAS_ERROR_WORKSPACE: return "MIRAS_ERROR_WORKSPACE";
    case MIRAS_ERROR_RUNTIME: return "MIRAS_ERROR_RUNTIME";
    case MIRAS_ERROR_INTERNAL: return "MIRAS_ERROR_INTERNAL";
    default: return "unknown miras_status";
  }
}

const char* miras_last_error(void) { return g_last_error.c_str(); }

miras_status miras_config_init(miras_config* config, int64_t head_dim_k) {
  return guarded("miras_config_init", [&] {
    if (!config) fail(MIRAS_ERROR_NULL_POINTER, "config is NULL");
    const MemoryConfig d;  // the defaults of csrc/core/params.h (= miras.memory_update's)
    config->bias = d.bias;
    config->retention = d.retention;
    config->p = d.p;
    config->eps = d.eps;
    config->delta = 1.0;
    config->robust_delta = 0.0;
    config->gamma = 0.0;
    config->kl_scale = d.kl_scale;
    config->q_norm = d.q_norm;
    config->eps_q = d.eps_q;
    config->scale = head_dim_k > 0 ? 1.0 / std::sqrt(static_cast<double>(head_dim_k)) : 1.0;
    config->chunk_size = d.chunk_size;
    config->map_schedule = d.map_schedule;
  });
}

int64_t miras_num_chunk_slots(int64_t num_seqs, int64_t T, int64_t chunk_size, int32_t varlen) {
  if (num_seqs < 0 || T < 0 || chunk_size < 1) return -1;
  return miras::num_chunk_slots(num_seqs, T, miras::effective_chunk(chunk_size, T), varlen != 0);
}

miras_status miras_chunk_fwd_workspace_size(const miras_config* config, const miras_chunk_inputs* in,
                                            const miras_fwd_outputs* out, int32_t device, size_t* bytes) {
  return guarded("miras_chunk_fwd_workspace_size", [&] {
    if (!bytes) fail(MIRAS_ERROR_NULL_POINTER, "bytes is NULL");
    *bytes = 0;
    Call c = prepare_chunk(config, in, device);
    bind_fwd_outputs(c, out);
    *bytes = fwd_workspace(c);
  });
}

miras_status miras_chunk_fwd(const miras_config* config, const miras_chunk_inputs* in, const miras_fwd_outputs* out,
                             const miras_exec* exec) {
  return guarded("miras_chunk_fwd", [&] {
    const miras_exec& ex = need_exec(exec);
    Call c = prepare_chunk(config, in, ex.device);
    bind_fwd_outputs(c, out);
    run_fwd(c, out, ex);
  });
}

miras_status miras_chunk_bwd_workspace_size(const miras_config* config, const miras_chunk_inputs* in,
                                            const miras_bwd_inputs* bin, const miras_bwd_outputs* grads,
                                            int32_t device, size_t* bytes) {
  return guarded("miras_chunk_bwd_workspace_size", [&] {
    if (!bytes) fail(MIRAS_ERROR_NULL_POINTER, "bytes is NULL");
    *bytes = 0;
    BwdCall r = prepare_bwd(config, in, bin, grads, device);
    *bytes = bwd_workspace(r);
  });
}

miras_status miras_chunk_bwd(const miras_config* config, const miras_chunk_inputs* in, const miras_bwd_inputs* bin,
                             const miras_bwd_outputs* grads, const miras_exec* exec) {
  return guarded("miras_chunk_bwd", [&] {
    const miras_exec& ex = need_exec(exec);
    BwdCall r = prepare_bwd(config, in, bin, grads, ex.device);
    run_bwd(r, ex);
  });
}

miras_status miras_step_workspace_size(const miras_config* config, const miras_step_args* args, int32_t device,
                                       size_t* bytes) {
  return guarded("miras_step_workspace_size", [&] {
    if (!bytes) fail(MIRAS_ERROR_NULL_POINTER, "bytes is NULL");
    *bytes = 0;
    StepCall s = prepare_step(config, args, device);
    if (s.c.pr.N > 0) *bytes = fwd_workspace(s.c);
  });
}

miras_status miras_step(const miras_config* config, const miras_step_args* args, const miras_exec* exec) {
  return guarded("miras_step", [&] {
    const miras_exec& ex = need_exec(exec);
    StepCall s = prepare_step(config, args, ex.device);
    run_step(s, ex);
  });
}

}  // extern "C"
