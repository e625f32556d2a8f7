// miras/torch/ops.cpp — TORCH_LIBRARY schemas and the CPU implementation glue.
//
// No math here: checks that a direct caller of torch.ops.miras.* would need (the Python layer in
// python/miras/ops.py checks everything first, with friendlier messages), dtype/layout
// normalisation, output allocation, and a call into csrc/cpu or csrc/cuda through the plain
// params structs of csrc/core/params.h.
#include "common.h"
#include "../cuda/verification.h"

#include <ATen/record_function.h>
#include <torch/extension.h>

#include <stdexcept>
#include <string>

#include "../core/names.h"

namespace miras {
namespace torch_glue {

void check_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lr,
                  const at::Tensor& alpha, const c10::optional<at::Tensor>& momentum,
                  const c10::optional<at::Tensor>& cu_seqlens, int64_t chunk_size) {
  TORCH_CHECK(q.dim() == 4, "miras: q must be [B, T, H, Dk], got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), "miras: k must have q's shape ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.dim() == 4 && v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2),
              "miras: v must be [B, T, H, Dv] matching q's [B, T, H], got ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "miras: q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  auto gate_shape = q.sizes().slice(0, 3);
  TORCH_CHECK(lr.sizes() == gate_shape, "miras: lr must be [B, T, H] = ", gate_shape, ", got ", lr.sizes());
  TORCH_CHECK(alpha.sizes() == gate_shape, "miras: alpha must be [B, T, H] = ", gate_shape, ", got ",
              alpha.sizes());
  if (momentum.has_value())
    TORCH_CHECK(momentum->sizes() == gate_shape, "miras: momentum must be [B, T, H] = ", gate_shape, ", got ",
                momentum->sizes());
  TORCH_CHECK(chunk_size >= 1, "miras: chunk_size must be >= 1, got ", chunk_size);
  if (cu_seqlens.has_value()) {
    TORCH_CHECK(q.size(0) == 1, "miras: with cu_seqlens the batch size must be 1, got ", q.size(0));
    TORCH_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->numel() >= 2,
                "miras: cu_seqlens must be 1-D [N+1] with N >= 1, got ", cu_seqlens->sizes());
  }
  check_float(q, "q", q);
  check_float(k, "k", q);
  check_float(v, "v", q);
  check_float(lr, "lr", q);
  check_float(alpha, "alpha", q);
  if (momentum.has_value()) check_float(*momentum, "momentum", q);
  if (cu_seqlens.has_value()) {
    TORCH_CHECK_VALUE(cu_seqlens->scalar_type() == at::kInt || cu_seqlens->scalar_type() == at::kLong,
                      "miras: cu_seqlens must be int32 or int64, got ", cu_seqlens->scalar_type());
    TORCH_CHECK_VALUE(cu_seqlens->device() == q.device(), "miras: cu_seqlens must be on q's device ", q.device(),
                      ", got ", cu_seqlens->device());
  }
}

void check_float(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), "miras: ", name, " must be a floating-point tensor, got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), "miras: ", name, " must be on q's device ", q.device(), ", got ",
                    t.device());
}

void check_gate_like(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& q) {
  if (!t.has_value()) return;
  auto gate_shape = q.sizes().slice(0, 3);
  TORCH_CHECK_VALUE(t->sizes() == gate_shape, "miras: ", name, " must be [B, T, H] = ", gate_shape, ", got ",
                    t->sizes());
  check_float(*t, name, q);
}


Problem make_problem(const at::Tensor& q, const at::Tensor& v, const c10::optional<at::Tensor>& cu_seqlens,
                     int64_t chunk_size) {
  try {
    return miras::make_problem(q.size(0), q.size(1), q.size(2), q.size(3), v.size(3),
                               cu_seqlens.has_value() ? cu_seqlens->numel() - 1 : -1, chunk_size);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
}

void check_state(const c10::optional<at::Tensor>& s, const char* name, const Problem& pr, const at::Tensor& q) {
  if (!s.has_value()) return;
  TORCH_CHECK_VALUE(at::isFloatingType(s->scalar_type()), "miras: ", name, " must be floating point, got ",
                    s->scalar_type());
  TORCH_CHECK(s->dim() == 4 && s->size(0) == pr.N && s->size(1) == pr.H && s->size(2) == pr.Dk &&
                  s->size(3) == pr.Dv,
              "miras: ", name, " must be [N, H, Dk, Dv] = [", pr.N, ", ", pr.H, ", ", pr.Dk, ", ", pr.Dv,
              "], got ", s->sizes());
  TORCH_CHECK(s->device() == q.device(), "miras: ", name, " must be on q's device ", q.device(), ", got ",
              s->device());
}

MemoryConfig config_of(c10::IntArrayRef icfg, c10::ArrayRef<double> fcfg) {
  try {  // (an unknown code stays a RuntimeError here, as before the check moved to core)
    return decode_config(icfg.data(), icfg.size(), fcfg.data(), fcfg.size());
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
}

const void* opt_ptr(const c10::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

c10::optional<at::Tensor> opt_to(const c10::optional<at::Tensor>& t, at::ScalarType dt) {
  if (!t.has_value()) return c10::nullopt;
  return t->to(dt).contiguous();
}

// ------------------------------------------------------------------------------------------------
// One implementation for CPU and CUDA: only the dtypes and the backend call differ.
//   CPU:  everything in float32 (float64 when q is float64);
//   CUDA: q, k, v, o in q's dtype (float32/float16/bfloat16), gates and states float32,
//         gradients computed in float32 and cast to each input's dtype.
// ------------------------------------------------------------------------------------------------
Types types_for(const at::Tensor& q) {
  if (q.is_cuda()) {
    TORCH_CHECK_VALUE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf ||
                          q.scalar_type() == at::kBFloat16,
                      "miras: CUDA inputs must be float32, float16 or bfloat16, got ", q.scalar_type(),
                      " (float64 runs on the CPU only)");
    return {q.scalar_type(), at::kFloat};
  }
  TORCH_CHECK_VALUE(q.device().is_cpu(), "miras: unsupported device ", q.device());
  auto ct = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {ct, ct};
}

int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: TORCH_CHECK_VALUE(false, "miras: unsupported dtype ", t);
  }
}

Inputs prepare(const Types& ty, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& lr, const at::Tensor& alpha, const c10::optional<at::Tensor>& momentum,
               const c10::optional<at::Tensor>& bias_param, const c10::optional<at::Tensor>& ret_param,
               const c10::optional<at::Tensor>& X0, const c10::optional<at::Tensor>& P0,
               const c10::optional<at::Tensor>& A0, const c10::optional<at::Tensor>& cu_seqlens) {
  Inputs in;
  in.q = q.to(ty.io).contiguous();
  in.k = k.to(ty.io).contiguous();
  in.v = v.to(ty.io).contiguous();
  in.lr = lr.to(ty.state).contiguous();
  in.alpha = alpha.to(ty.state).contiguous();
  in.momentum = opt_to(momentum, ty.state);
  in.bias_param = opt_to(bias_param, ty.state);
  in.ret_param = opt_to(ret_param, ty.state);
  in.X0 = opt_to(X0, ty.state);
  in.P0 = momentum.has_value() ? opt_to(P0, ty.state) : c10::nullopt;
  in.A0 = opt_to(A0, ty.state);
  in.cu = opt_to(cu_seqlens, at::kLong);
  return in;
}

void fill(ChunkFwdParams& prm, const Problem& pr, const Types& ty, const Inputs& in, const MemoryConfig& cfg) {
  set_problem(prm, pr, dtype_code(ty.io), cfg);
  prm.cu_seqlens = in.cu.has_value() ? in.cu->data_ptr<int64_t>() : nullptr;
  prm.q = in.q.data_ptr();
  prm.k = in.k.data_ptr();
  prm.v = in.v.data_ptr();
  prm.lr = in.lr.data_ptr();
  prm.alpha = in.alpha.data_ptr();
  prm.momentum = opt_ptr(in.momentum);
  prm.bias_param = opt_ptr(in.bias_param);
  prm.ret_param = opt_ptr(in.ret_param);
  prm.X0 = opt_ptr(in.X0);
  prm.P0 = opt_ptr(in.P0);
  prm.A0 = opt_ptr(in.A0);
}

namespace {

void run_fwd(const ChunkFwdParams& prm, const at::Tensor& q) {
  if (q.is_cuda()) {
#ifdef MIRAS_WITH_CUDA
    run_guarded([&] { cuda_fwd(prm, q); });
#else
    TORCH_CHECK(false, "miras: this build has no CUDA kernels (built without nvcc or with MIRAS_BUILD_CUDA=0); "
                       "move the tensors to the CPU or rebuild with CUDA");
#endif
  } else {
    CpuRange range("chunk_fwd", prm, [&] { return chunk_fwd_cpu_variant(prm); });
    run_guarded([&] { chunk_fwd_cpu(prm); });
  }
}

void run_bwd(const ChunkBwdParams& prm, const at::Tensor& q) {
  if (q.is_cuda()) {
#ifdef MIRAS_WITH_CUDA
    run_guarded([&] { cuda_bwd(prm, q); });
#else
    TORCH_CHECK(false, "miras: this build has no CUDA kernels");
#endif
  } else {
    CpuRange range("chunk_bwd", prm.fwd, [&] { return chunk_bwd_cpu_variant(prm); });
    run_guarded([&] { chunk_bwd_cpu(prm); });
  }
}

// The checks both ops share; caps cfg.chunk_size (effective_chunk) and returns the sizes.
Problem check_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lr,
                   const at::Tensor& alpha, const c10::optional<at::Tensor>& momentum,
                   const c10::optional<at::Tensor>& bias_param, const c10::optional<at::Tensor>& ret_param,
                   const c10::optional<at::Tensor>& X0, const c10::optional<at::Tensor>& P0,
                   const c10::optional<at::Tensor>& A0, const c10::optional<at::Tensor>& cu_seqlens,
                   MemoryConfig& cfg) {
  check_common(q, k, v, lr, alpha, momentum, cu_seqlens, cfg.chunk_size);
  check_gate_like(bias_param, "bias_param", q);
  check_gate_like(ret_param, "ret_param", q);
  cfg.chunk_size = effective_chunk(cfg.chunk_size, q.size(1));
  Problem pr = make_problem(q, v, cu_seqlens, cfg.chunk_size);
  check_state(X0, "initial_state.X", pr, q);
  check_state(P0, "initial_state.P", pr, q);
  check_state(A0, "initial_state.anchor", pr, q);
  return pr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunk_fwd_impl(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& lr_,
    const at::Tensor& alpha_, const c10::optional<at::Tensor>& momentum_,
    const c10::optional<at::Tensor>& bias_param_, const c10::optional<at::Tensor>& ret_param_,
    const c10::optional<at::Tensor>& X0_, const c10::optional<at::Tensor>& P0_,
    const c10::optional<at::Tensor>& A0_, const c10::optional<at::Tensor>& cu_seqlens_, c10::IntArrayRef icfg,
    c10::ArrayRef<double> fcfg, bool save_states) {
  MemoryConfig cfg = config_of(icfg, fcfg);
  const Problem pr = check_call(q_, k_, v_, lr_, alpha_, momentum_, bias_param_, ret_param_, X0_, P0_, A0_,
                                cu_seqlens_, cfg);
  const Types ty = types_for(q_);
  const bool mom = momentum_.has_value();
  const auto so = q_.options().dtype(ty.state);
  Inputs in = prepare(ty, q_, k_, v_, lr_, alpha_, momentum_, bias_param_, ret_param_, X0_, P0_, A0_, cu_seqlens_);

  at::Tensor o = at::empty({pr.B, pr.T, pr.H, pr.Dv}, q_.options().dtype(ty.io));
  at::Tensor XT = at::empty({pr.N, pr.H, pr.Dk, pr.Dv}, so);
  at::Tensor AT = at::empty({pr.N, pr.H, pr.Dk, pr.Dv}, so);
  at::Tensor PT = mom ? at::empty({pr.N, pr.H, pr.Dk, pr.Dv}, so) : at::empty({0}, so);
  // With cu_seqlens the slot count is an upper bound (shapes must not depend on values): zero the
  // slots so that unused ones are deterministic.
  auto slots = [&] {
    return pr.varlen ? at::zeros({pr.slots, pr.H, pr.Dk, pr.Dv}, so) : at::empty({pr.slots, pr.H, pr.Dk, pr.Dv}, so);
  };
  at::Tensor cX = save_states ? slots() : at::empty({0}, so);
  at::Tensor cP = (save_states && mom) ? slots() : at::empty({0}, so);

  ChunkFwdParams prm;
  fill(prm, pr, ty, in, cfg);
  prm.o = o.data_ptr();
  prm.XT = XT.data_ptr();
  prm.PT = mom ? PT.data_ptr() : nullptr;
  prm.AT = AT.data_ptr();
  prm.chunk_X = save_states ? cX.data_ptr() : nullptr;
  prm.chunk_P = (save_states && mom) ? cP.data_ptr() : nullptr;
  if (pr.B * pr.T == 0) {
    // No tokens: the state passes through. (Handled here because empty tensors may have null data
    // pointers, and a null momentum pointer means "no momentum" to the backends.)
    auto init = [&](const c10::optional<at::Tensor>& s, at::Tensor& out) {
      if (s.has_value()) out.copy_(*s); else out.zero_();
    };
    init(in.X0, XT);
    if (mom) init(in.P0, PT);
    if (in.A0.has_value()) AT.copy_(*in.A0); else AT.copy_(XT);
    return {o, XT, PT, AT, cX, cP};
  }
  run_fwd(prm, q_);
  return {o.to(q_.scalar_type()), XT, PT, AT, cX, cP};
}

std::vector<at::Tensor> chunk_bwd_impl(
    const at::Tensor& dO_, const c10::optional<at::Tensor>& dXT_, const c10::optional<at::Tensor>& dPT_,
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& lr_,
    const at::Tensor& alpha_, const c10::optional<at::Tensor>& momentum_,
    const c10::optional<at::Tensor>& bias_param_, const c10::optional<at::Tensor>& ret_param_,
    const c10::optional<at::Tensor>& X0_, const c10::optional<at::Tensor>& P0_,
    const c10::optional<at::Tensor>& A0_, const c10::optional<at::Tensor>& cu_seqlens_,
    const at::Tensor& chunk_X_, const at::Tensor& chunk_P_, c10::IntArrayRef icfg, c10::ArrayRef<double> fcfg) {
  MemoryConfig cfg = config_of(icfg, fcfg);
  const Problem pr = check_call(q_, k_, v_, lr_, alpha_, momentum_, bias_param_, ret_param_, X0_, P0_, A0_,
                                cu_seqlens_, cfg);
  check_state(dXT_, "dXT (the gradient of the final X)", pr, q_);
  check_state(dPT_, "dPT (the gradient of the final P)", pr, q_);
  const Types ty = types_for(q_);
  const bool mom = momentum_.has_value();
  TORCH_CHECK_VALUE(dO_.sizes() == at::IntArrayRef({pr.B, pr.T, pr.H, pr.Dv}),
                    "miras: dO (the gradient of o) must have o's shape [B, T, H, Dv], got ", dO_.sizes());
  check_float(dO_, "dO", q_);
  const std::vector<int64_t> slots_shape{pr.slots, pr.H, pr.Dk, pr.Dv};
  TORCH_CHECK_VALUE(chunk_X_.sizes() == at::IntArrayRef(slots_shape), "miras: chunk_X must be the forward's saved chunk states ",
                    slots_shape, " (call chunk_fwd with save_states=True), got ", chunk_X_.sizes());
  check_float(chunk_X_, "chunk_X", q_);
  if (mom) {
    TORCH_CHECK_VALUE(chunk_P_.sizes() == at::IntArrayRef(slots_shape), "miras: chunk_P must be the forward's saved momentum ",
                      slots_shape, " (call chunk_fwd with save_states=True), got ", chunk_P_.sizes());
    check_float(chunk_P_, "chunk_P", q_);
  }
  Inputs in = prepare(ty, q_, k_, v_, lr_, alpha_, momentum_, bias_param_, ret_param_, X0_, P0_, A0_, cu_seqlens_);
  // Gradients are computed in the state dtype (float32 on CUDA; the compute dtype on the CPU).
  const auto go = q_.options().dtype(ty.state);
  at::Tensor dO = dO_.to(ty.io).contiguous();
  auto dXT = opt_to(dXT_, ty.state), dPT = opt_to(dPT_, ty.state);
  at::Tensor cX = chunk_X_.to(ty.state).contiguous(), cP = chunk_P_.to(ty.state).contiguous();

  ChunkBwdParams b;
  fill(b.fwd, pr, ty, in, cfg);
  b.fwd.chunk_X = cX.data_ptr();
  b.fwd.chunk_P = mom ? cP.data_ptr() : nullptr;

  auto like = [&](const at::Tensor& t) { return at::empty(t.sizes(), go); };
  auto state = [&] { return at::empty({pr.N, pr.H, pr.Dk, pr.Dv}, go); };
  auto none = [&] { return at::empty({0}, go); };  // a fresh one per absent output: outputs never alias
  at::Tensor dq = like(in.q), dk = like(in.k), dv = like(in.v), dlr = like(in.lr), dalpha = like(in.lr);
  at::Tensor dmom = mom ? like(in.lr) : none();
  at::Tensor dbp = in.bias_param.has_value() ? like(in.lr) : none();
  at::Tensor drp = in.ret_param.has_value() ? like(in.lr) : none();
  at::Tensor dX0 = state();
  at::Tensor dP0 = mom ? state() : none();
  at::Tensor dA0 = in.A0.has_value() ? state() : none();
  b.dO = dO.data_ptr();
  b.dXT = opt_ptr(dXT);
  b.dPT = mom ? opt_ptr(dPT) : nullptr;
  b.dq = dq.data_ptr();
  b.dk = dk.data_ptr();
  b.dv = dv.data_ptr();
  b.dlr = dlr.data_ptr();
  b.dalpha = dalpha.data_ptr();
  b.dmomentum = mom ? dmom.data_ptr() : nullptr;
  b.dbias_param = in.bias_param.has_value() ? dbp.data_ptr() : nullptr;
  b.dret_param = in.ret_param.has_value() ? drp.data_ptr() : nullptr;
  b.dX0 = dX0.data_ptr();
  b.dP0 = mom ? dP0.data_ptr() : nullptr;
  b.dA0 = in.A0.has_value() ? dA0.data_ptr() : nullptr;
  if (pr.B * pr.T == 0) {  // no tokens: the state's gradient passes through
    if (dXT.has_value()) dX0.copy_(*dXT); else dX0.zero_();
    if (mom) { if (dPT.has_value()) dP0.copy_(*dPT); else dP0.zero_(); }
    if (in.A0.has_value()) dA0.zero_();
  } else {
    run_bwd(b, q_);
  }
  auto cast = [](const at::Tensor& g, const at::Tensor& ref) { return g.to(ref.scalar_type()); };
  return {cast(dq, q_), cast(dk, k_), cast(dv, v_), cast(dlr, lr_), cast(dalpha, alpha_),
          momentum_.has_value() ? cast(dmom, *momentum_) : dmom,
          bias_param_.has_value() ? cast(dbp, *bias_param_) : dbp,
          ret_param_.has_value() ? cast(drp, *ret_param_) : drp,
          X0_.has_value() ? cast(dX0, *X0_) : dX0,
          (mom && P0_.has_value()) ? cast(dP0, *P0_) : dP0,
          A0_.has_value() ? cast(dA0, *A0_) : dA0};
}

}  // namespace

}  // namespace torch_glue
}  // namespace miras

TORCH_LIBRARY(miras, m) {
  m.def(
      "chunk_fwd(Tensor q, Tensor k, Tensor v, Tensor lr, Tensor alpha, Tensor? momentum, Tensor? bias_param, "
      "Tensor? ret_param, Tensor? X0, Tensor? P0, Tensor? A0, Tensor? cu_seqlens, int[] icfg, float[] fcfg, "
      "bool save_states) -> (Tensor o, Tensor XT, Tensor PT, Tensor AT, Tensor chunk_X, Tensor chunk_P)");
  m.def(
      "chunk_bwd(Tensor dO, Tensor? dXT, Tensor? dPT, Tensor q, Tensor k, Tensor v, Tensor lr, Tensor alpha, "
      "Tensor? momentum, Tensor? bias_param, Tensor? ret_param, Tensor? X0, Tensor? P0, Tensor? A0, "
      "Tensor? cu_seqlens, Tensor chunk_X, Tensor chunk_P, int[] icfg, float[] fcfg) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(miras, CPU, m) {
  m.impl("chunk_fwd", &miras::torch_glue::chunk_fwd_impl);
  m.impl("chunk_bwd", &miras::torch_glue::chunk_bwd_impl);
}

#ifdef MIRAS_WITH_CUDA
TORCH_LIBRARY_IMPL(miras, CUDA, m) {
  m.impl("chunk_fwd", &miras::torch_glue::chunk_fwd_impl);
  m.impl("chunk_bwd", &miras::torch_glue::chunk_bwd_impl);
}
#endif

#ifndef MIRAS_SOURCE_HASH
#define MIRAS_SOURCE_HASH 0ull
#endif
#define MIRAS_STR2(x) #x
#define MIRAS_STR(x) MIRAS_STR2(x)

PYBIND11_MODULE(_C, m) {
  m.doc() = "miras compiled ops (registered as torch.ops.miras.*)";
  m.def("config_fields", []() {
    pybind11::dict d;
    pybind11::list ints, floats;
#define MIRAS_NAME_(field) ints.append(std::string(#field));
    MIRAS_CONFIG_INTS(MIRAS_NAME_)
#undef MIRAS_NAME_
#define MIRAS_NAME_(field) floats.append(std::string(#field));
    MIRAS_CONFIG_FLOATS(MIRAS_NAME_)
#undef MIRAS_NAME_
    d["ints"] = ints;
    d["floats"] = floats;
    return d;
  }, "The order of the ops' configuration arrays (int[] icfg, float[] fcfg; csrc/core/params.h).");
  m.def("registry", []() {
    namespace py = pybind11;
    auto entry = [](int code, const char* name, const char* param, double lo, bool lo_open) {
      py::dict d;
      d["code"] = code;
      d["name"] = std::string(name);
      d["param"] = std::string(param);
      d["lo"] = lo;
      d["lo_open"] = lo_open;
      return d;
    };
    py::list biases, retentions;
#define MIRAS_ENTRY_(N, code, name, P, param, lo, open, ...) biases.append(entry(code, name, param, lo, open));
    MIRAS_BIASES(MIRAS_ENTRY_)
#undef MIRAS_ENTRY_
#define MIRAS_ENTRY_(N, code, name, P, param, lo, open, ...) retentions.append(entry(code, name, param, lo, open));
    MIRAS_RETENTIONS(MIRAS_ENTRY_)
#undef MIRAS_ENTRY_
    py::dict d;
    d["biases"] = biases;
    d["retentions"] = retentions;
    return d;
  }, "The attentional biases and retention gates of csrc/core/registry.h: code, name, per-token parameter.");
  m.def("build_info", []() {
    namespace py = pybind11;
    auto hex = [](uint64_t v) {
      char b[20];
      std::snprintf(b, sizeof(b), "%016llx", static_cast<unsigned long long>(v));
      return std::string(v ? b : "");
    };
    py::dict d;
    d["source_hash"] = hex(MIRAS_SOURCE_HASH);
    d["cpu_isa"] = std::string(miras::cpu_isa_summary());
#ifdef MIRAS_WITH_CUDA
    d["cuda"] = true;
#ifdef MIRAS_CUDA_ARCHS
    d["cuda_archs"] = std::string(MIRAS_STR(MIRAS_CUDA_ARCHS));
#else
    d["cuda_archs"] = std::string("");
#endif
#else
    d["cuda"] = false;
    d["cuda_archs"] = std::string("");
#endif
    py::list fams;
    for (const auto& r : miras::cuda::kHardwareRuns) {
      py::dict f;
      f["family"] = std::string(r.family);
      f["fingerprint"] = hex(r.build_fingerprint);
      f["verified_fingerprint"] = hex(r.verified_fingerprint);
      f["device"] = std::string(r.device);
      f["commit"] = std::string(r.commit);
      f["date"] = std::string(r.date);
      f["evidence"] = std::string(r.evidence);
      f["hardware_verified"] = miras::cuda::hardware_verified(r);
      const char* why = nullptr;
      f["enabled"] = miras::cuda::family_enabled(r.family, &why);
      f["why"] = std::string(why ? why : "");
      fams.append(f);
    }
    d["families"] = fams;
    return d;
  }, "The build's identity: sources hash, CPU instruction sets, CUDA targets, kernel families and their "
     "hardware-verification status (python -m miras info prints it).");
  m.def("has_cuda", []() {
#ifdef MIRAS_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the CUDA kernels were compiled into this build.");
}
