// miras/torch/common.h — shared glue between the CPU and CUDA torch implementations.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <stdexcept>
#include <string>

#include "../core/backends.h"
#include "../core/names.h"
#include "../core/params.h"
#include "../core/problem.h"

namespace miras {
namespace torch_glue {

// Problem (sizes), decode_config, config_error and set_problem are csrc/core/problem.h, shared with
// the C ABI and the JAX FFI.
void check_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lr,
                  const at::Tensor& alpha, const c10::optional<at::Tensor>& momentum,
                  const c10::optional<at::Tensor>& cu_seqlens, int64_t chunk_size);
void check_float(const at::Tensor& t, const char* name, const at::Tensor& q);
void check_gate_like(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& q);
Problem make_problem(const at::Tensor& q, const at::Tensor& v, const c10::optional<at::Tensor>& cu_seqlens,
                     int64_t chunk_size);
void check_state(const c10::optional<at::Tensor>& s, const char* name, const Problem& pr, const at::Tensor& q);
// The schema's configuration arrays (int[] icfg, float[] fcfg: core/params.h's field lists).
MemoryConfig config_of(c10::IntArrayRef icfg, c10::ArrayRef<double> fcfg);
const void* opt_ptr(const c10::optional<at::Tensor>& t);
c10::optional<at::Tensor> opt_to(const c10::optional<at::Tensor>& t, at::ScalarType dt);

// Dtypes of a call: CPU — everything in float32 (float64 when q is float64); CUDA — q, k, v, o in
// q's dtype, gates and states float32.
struct Types {
  at::ScalarType io, state;
};
Types types_for(const at::Tensor& q);
int32_t dtype_code(at::ScalarType t);

// The forward's inputs converted to the backend's dtypes, and the params filled from them.
struct Inputs {
  at::Tensor q, k, v, lr, alpha;
  c10::optional<at::Tensor> momentum, bias_param, ret_param, X0, P0, A0, cu;
};
Inputs prepare(const Types& ty, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& lr, const at::Tensor& alpha, const c10::optional<at::Tensor>& momentum,
               const c10::optional<at::Tensor>& bias_param, const c10::optional<at::Tensor>& ret_param,
               const c10::optional<at::Tensor>& X0, const c10::optional<at::Tensor>& P0,
               const c10::optional<at::Tensor>& A0, const c10::optional<at::Tensor>& cu_seqlens);
void fill(ChunkFwdParams& prm, const Problem& pr, const Types& ty, const Inputs& in, const MemoryConfig& cfg);

#ifdef MIRAS_WITH_CUDA
// csrc/torch/ops_cuda.cpp: device guard, current stream, workspace from the caching allocator.
void cuda_fwd(const ChunkFwdParams& p, const at::Tensor& q);
void cuda_bwd(const ChunkBwdParams& p, const at::Tensor& q);
#endif

// Runs a backend call, turning its exceptions into torch errors (ValueError for bad input).
template <typename F>
void run_guarded(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, e.what());
  }
}

// A torch.profiler range around a CPU backend call, named like the CUDA backend's NVTX ranges
// (core/names.h), e.g. "miras.chunk_bwd[cpu_l2_dual avx512 bias=lp ret=l2 mom C=64 dk=64 dv=64 f32]"
// or "miras.mlp_chunk_fwd[cpu_mlp_scan avx2 bias=l2 ret=kl C=16 dk=16 dv=16 f32]".
// Costs one thread-local check when no profiler is running: the name is built only when one is.
struct CpuRange {
  template <typename Family>
  CpuRange(const char* op, const ChunkFwdParams& fwd, Family family) : guard(at::RecordScope::USER_SCOPE) {
    if (!guard.isActive()) return;
    char buf[256];
    format_variant(buf, sizeof(buf), op, family(), fwd);
    guard.before(std::string_view(buf), c10::ArrayRef<const c10::IValue>{});
  }
  at::RecordFunction guard;
};

}  // namespace torch_glue
}  // namespace miras
