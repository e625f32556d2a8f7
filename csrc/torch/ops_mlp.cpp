// miras/torch/ops_mlp.cpp — schemas and CPU glue of the MLP memory's ops (SPEC §6):
// miras::mlp_chunk_fwd / miras::mlp_chunk_bwd. Same conventions as ops.cpp (no math; checks a
// direct caller needs; python/miras/ops.py checks everything first with friendlier messages).
// CPU only: on CUDA tensors python/miras/ops.py runs the PyTorch reference instead.
#include "common.h"

#include <torch/extension.h>

namespace miras {
namespace torch_glue {
namespace {

void check_matrix(const c10::optional<at::Tensor>& s, const char* name, int64_t N, int64_t H, int64_t r,
                  int64_t c, const at::Tensor& q) {
  if (!s.has_value()) return;
  TORCH_CHECK_VALUE(s->dim() == 4 && s->size(0) == N && s->size(1) == H && s->size(2) == r && s->size(3) == c,
                    "miras: ", name, " must be [", N, ", ", H, ", ", r, ", ", c, "], got ", s->sizes());
  TORCH_CHECK_VALUE(s->device() == q.device(), "miras: ", name, " must be on q's device ", q.device(), ", got ",
                    s->device());
}

// Everything the MLP op reads, in the backend's dtypes, and the params filled from it.
struct MlpInputs {
  Problem pr;
  Types ty;
  Inputs in;
  int64_t Dh = 0;
  at::Tensor W2;
  c10::optional<at::Tensor> P2, A2, lnw, lnb;
};

MlpInputs mlp_prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lr,
                      const at::Tensor& alpha, const c10::optional<at::Tensor>& momentum,
                      const c10::optional<at::Tensor>& bias_param, const c10::optional<at::Tensor>& ret_param,
                      const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                      const at::Tensor& W1, const at::Tensor& W2, const c10::optional<at::Tensor>& P1,
                      const c10::optional<at::Tensor>& P2, const c10::optional<at::Tensor>& A1,
                      const c10::optional<at::Tensor>& A2, const c10::optional<at::Tensor>& cu_seqlens,
                      int64_t chunk_size) {
  check_common(q, k, v, lr, alpha, momentum, cu_seqlens, chunk_size);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "miras: mlp_chunk_fwd/bwd run on the CPU only (got ", q.device(),
                    "); memory_update(memory='mlp') uses the PyTorch reference on CUDA");
  MlpInputs m;
  m.pr = make_problem(q, v, cu_seqlens, chunk_size);
  const Problem& pr = m.pr;
  TORCH_CHECK_VALUE(pr.Dv == pr.Dk, "miras: the MLP memory needs Dv == Dk, got Dk=", pr.Dk, ", Dv=", pr.Dv);
  TORCH_CHECK_VALUE(W1.dim() == 4 && W1.size(3) >= 1, "miras: W1 must be [N, H, Dk, Dh], got ", W1.sizes());
  m.Dh = W1.size(3);
  check_matrix(W1, "W1", pr.N, pr.H, pr.Dk, m.Dh, q);
  check_matrix(W2, "W2", pr.N, pr.H, m.Dh, pr.Dv, q);
  check_matrix(P1, "P1", pr.N, pr.H, pr.Dk, m.Dh, q);
  check_matrix(P2, "P2", pr.N, pr.H, m.Dh, pr.Dv, q);
  check_matrix(A1, "A1", pr.N, pr.H, pr.Dk, m.Dh, q);
  check_matrix(A2, "A2", pr.N, pr.H, m.Dh, pr.Dv, q);
  TORCH_CHECK_VALUE(A1.has_value() == A2.has_value(), "miras: give both anchors A1, A2 or neither");
  for (const auto* t : {&ln_weight, &ln_bias})
    if (t->has_value())
      TORCH_CHECK_VALUE((*t)->dim() == 2 && (*t)->size(0) == pr.H && (*t)->size(1) == pr.Dv,
                        "miras: ln_weight / ln_bias must be [H, Dv] = [", pr.H, ", ", pr.Dv, "], got ",
                        (*t)->sizes());
  m.ty = types_for(q);
  m.in = prepare(m.ty, q, k, v, lr, alpha, momentum, bias_param, ret_param, W1, P1, A1, cu_seqlens);
  m.W2 = W2.to(m.ty.state).contiguous();
  m.P2 = momentum.has_value() ? opt_to(P2, m.ty.state) : c10::nullopt;
  m.A2 = opt_to(A2, m.ty.state);
  m.lnw = opt_to(ln_weight, m.ty.state);
  m.lnb = opt_to(ln_bias, m.ty.state);
  return m;
}

void mlp_fill(MlpFwdParams& prm, const MlpInputs& m, const MemoryConfig& cfg) {
  fill(prm.chunk, m.pr, m.ty, m.in, cfg);
  prm.Dh = m.Dh;
  prm.ln_weight = opt_ptr(m.lnw);
  prm.ln_bias = opt_ptr(m.lnb);
  prm.X2 = m.W2.data_ptr();
  prm.P2 = opt_ptr(m.P2);
  prm.A2 = opt_ptr(m.A2);
}

using Fwd9 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                        at::Tensor, at::Tensor>;

Fwd9 mlp_chunk_fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lr,
                        const at::Tensor& alpha, const c10::optional<at::Tensor>& momentum,
                        const c10::optional<at::Tensor>& bias_param, const c10::optional<at::Tensor>& ret_param,
                        const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                        const at::Tensor& W1, const at::Tensor& W2, const c10::optional<at::Tensor>& P1,
                        const c10::optional<at::Tensor>& P2, const c10::optional<at::Tensor>& A1,
                        const c10::optional<at::Tensor>& A2, const c10::optional<at::Tensor>& cu_seqlens,
                        c10::IntArrayRef icfg, c10::ArrayRef<double> fcfg, bool save_states) {
  const MemoryConfig cfg = config_of(icfg, fcfg);
  const int64_t chunk_size = cfg.chunk_size;
  MlpInputs m = mlp_prepare(q, k, v, lr, alpha, momentum, bias_param, ret_param, ln_weight, ln_bias, W1, W2, P1,
                            P2, A1, A2, cu_seqlens, chunk_size);
  const Problem& pr = m.pr;
  const bool mom = momentum.has_value();
  const int64_t Dh = m.Dh, Sz = pr.Dk * Dh + Dh * pr.Dv;
  const auto so = q.options().dtype(m.ty.state);
  auto mat = [&](int64_t r, int64_t c) { return at::empty({pr.N, pr.H, r, c}, so); };
  auto none = [&] { return at::empty({0}, so); };
  at::Tensor o = at::empty({pr.B, pr.T, pr.H, pr.Dv}, q.options().dtype(m.ty.io));
  at::Tensor XT1 = mat(pr.Dk, Dh), XT2 = mat(Dh, pr.Dv), AT1 = mat(pr.Dk, Dh), AT2 = mat(Dh, pr.Dv);
  at::Tensor PT1 = mom ? mat(pr.Dk, Dh) : none(), PT2 = mom ? mat(Dh, pr.Dv) : none();
  // varlen: the slot count is an upper bound; zero the slots so that unused ones are deterministic
  auto slots = [&] {
    return pr.varlen ? at::zeros({pr.slots, pr.H, Sz}, so) : at::empty({pr.slots, pr.H, Sz}, so);
  };
  at::Tensor cX = save_states ? slots() : none();
  at::Tensor cP = (save_states && mom) ? slots() : none();

  MlpFwdParams prm;
  mlp_fill(prm, m, cfg);
  prm.chunk.o = o.data_ptr();
  prm.chunk.XT = XT1.data_ptr();
  prm.chunk.AT = AT1.data_ptr();
  prm.chunk.PT = mom ? PT1.data_ptr() : nullptr;
  prm.XT2 = XT2.data_ptr();
  prm.AT2 = AT2.data_ptr();
  prm.PT2 = mom ? PT2.data_ptr() : nullptr;
  prm.chunk.chunk_X = save_states ? cX.data_ptr() : nullptr;
  prm.chunk.chunk_P = (save_states && mom) ? cP.data_ptr() : nullptr;
  if (pr.B * pr.T == 0) {  // no tokens: the state passes through
    XT1.copy_(*m.in.X0);
    XT2.copy_(m.W2);
    if (mom) {
      if (m.in.P0.has_value()) PT1.copy_(*m.in.P0); else PT1.zero_();
      if (m.P2.has_value()) PT2.copy_(*m.P2); else PT2.zero_();
    }
    AT1.copy_(m.in.A0.has_value() ? *m.in.A0 : XT1);
    AT2.copy_(m.A2.has_value() ? *m.A2 : XT2);
    return {o, XT1, XT2, PT1, PT2, AT1, AT2, cX, cP};
  }
  CpuRange range("mlp_chunk_fwd", prm.chunk, [] { return mlp_cpu_variant(); });
  run_guarded([&] { mlp_fwd_cpu(prm); });
  return {o.to(q.scalar_type()), XT1, XT2, PT1, PT2, AT1, AT2, cX, cP};
}

std::vector<at::Tensor> mlp_chunk_bwd_impl(
    const at::Tensor& dO_, const c10::optional<at::Tensor>& dW1T_, const c10::optional<at::Tensor>& dW2T_,
    const c10::optional<at::Tensor>& dP1T_, const c10::optional<at::Tensor>& dP2T_, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& lr, const at::Tensor& alpha,
    const c10::optional<at::Tensor>& momentum, const c10::optional<at::Tensor>& bias_param,
    const c10::optional<at::Tensor>& ret_param, const c10::optional<at::Tensor>& ln_weight,
    const c10::optional<at::Tensor>& ln_bias, const at::Tensor& W1, const at::Tensor& W2,
    const c10::optional<at::Tensor>& P1, const c10::optional<at::Tensor>& P2, const c10::optional<at::Tensor>& A1,
    const c10::optional<at::Tensor>& A2, const c10::optional<at::Tensor>& cu_seqlens, const at::Tensor& chunk_X,
    const at::Tensor& chunk_P, c10::IntArrayRef icfg, c10::ArrayRef<double> fcfg) {
  const MemoryConfig cfg = config_of(icfg, fcfg);
  const int64_t chunk_size = cfg.chunk_size;
  MlpInputs m = mlp_prepare(q, k, v, lr, alpha, momentum, bias_param, ret_param, ln_weight, ln_bias, W1, W2, P1,
                            P2, A1, A2, cu_seqlens, chunk_size);
  const Problem& pr = m.pr;
  const bool mom = momentum.has_value();
  const int64_t Dh = m.Dh;
  TORCH_CHECK_VALUE(dO_.sizes() == at::IntArrayRef({pr.B, pr.T, pr.H, pr.Dv}),
                    "miras: the gradient of o must have o's shape [B, T, H, Dv], got ", dO_.sizes());
  TORCH_CHECK_VALUE(chunk_X.dim() == 3 && chunk_X.size(0) == pr.slots,
                    "miras: mlp_chunk_bwd needs the forward's saved chunk states (save_states=True)");
  TORCH_CHECK_VALUE(!mom || (chunk_P.dim() == 3 && chunk_P.size(0) == pr.slots),
                    "miras: mlp_chunk_bwd needs the forward's saved momentum states (save_states=True)");
  const auto st = m.ty.state;
  const auto go = q.options().dtype(st);
  at::Tensor dO = dO_.to(m.ty.io).contiguous();
  auto dW1T = opt_to(dW1T_, st), dW2T = opt_to(dW2T_, st);
  auto dP1T = mom ? opt_to(dP1T_, st) : c10::nullopt, dP2T = mom ? opt_to(dP2T_, st) : c10::nullopt;
  check_matrix(dW1T, "dW1T", pr.N, pr.H, pr.Dk, Dh, q);
  check_matrix(dW2T, "dW2T", pr.N, pr.H, Dh, pr.Dv, q);
  check_matrix(dP1T, "dP1T", pr.N, pr.H, pr.Dk, Dh, q);
  check_matrix(dP2T, "dP2T", pr.N, pr.H, Dh, pr.Dv, q);
  at::Tensor cX = chunk_X.to(st).contiguous(), cP = chunk_P.to(st).contiguous();

  MlpBwdParams b;
  mlp_fill(b.fwd, m, cfg);
  b.fwd.chunk.chunk_X = cX.data_ptr();
  b.fwd.chunk.chunk_P = mom ? cP.data_ptr() : nullptr;

  auto like = [&](const at::Tensor& t) { return at::empty(t.sizes(), go); };
  auto mat = [&](int64_t r, int64_t c) { return at::empty({pr.N, pr.H, r, c}, go); };
  auto none = [&] { return at::empty({0}, go); };  // a fresh one per absent output: no aliasing
  const Inputs& in = m.in;
  at::Tensor dq = like(in.q), dk = like(in.k), dv = like(in.v), dlr = like(in.lr), dalpha = like(in.lr);
  at::Tensor dmom = mom ? like(in.lr) : none();
  at::Tensor dbp = in.bias_param.has_value() ? like(in.lr) : none();
  at::Tensor drp = in.ret_param.has_value() ? like(in.lr) : none();
  at::Tensor dlnw = m.lnw.has_value() ? like(*m.lnw) : none();
  at::Tensor dlnb = m.lnb.has_value() ? like(*m.lnb) : none();
  at::Tensor dW1 = mat(pr.Dk, Dh), dW2 = mat(Dh, pr.Dv);
  at::Tensor dP1 = mom ? mat(pr.Dk, Dh) : none(), dP2 = mom ? mat(Dh, pr.Dv) : none();
  const bool anc = in.A0.has_value();
  at::Tensor dA1 = anc ? mat(pr.Dk, Dh) : none(), dA2 = anc ? mat(Dh, pr.Dv) : none();
  b.dO = dO.data_ptr();
  b.dXT = opt_ptr(dW1T);
  b.dXT2 = opt_ptr(dW2T);
  b.dPT = opt_ptr(dP1T);
  b.dPT2 = opt_ptr(dP2T);
  b.dq = dq.data_ptr();
  b.dk = dk.data_ptr();
  b.dv = dv.data_ptr();
  b.dlr = dlr.data_ptr();
  b.dalpha = dalpha.data_ptr();
  b.dmomentum = mom ? dmom.data_ptr() : nullptr;
  b.dbias_param = in.bias_param.has_value() ? dbp.data_ptr() : nullptr;
  b.dret_param = in.ret_param.has_value() ? drp.data_ptr() : nullptr;
  b.dln_weight = m.lnw.has_value() ? dlnw.data_ptr() : nullptr;
  b.dln_bias = m.lnb.has_value() ? dlnb.data_ptr() : nullptr;
  b.dX0 = dW1.data_ptr();
  b.dX2 = dW2.data_ptr();
  b.dP0 = mom ? dP1.data_ptr() : nullptr;
  b.dP2 = mom ? dP2.data_ptr() : nullptr;
  b.dA0 = anc ? dA1.data_ptr() : nullptr;
  b.dA2 = anc ? dA2.data_ptr() : nullptr;
  if (pr.B * pr.T == 0) {  // no tokens: the state's gradient passes through
    auto pass = [](const c10::optional<at::Tensor>& g, at::Tensor& d) {
      if (g.has_value()) d.copy_(*g); else d.zero_();
    };
    pass(dW1T, dW1);
    pass(dW2T, dW2);
    if (mom) {
      pass(dP1T, dP1);
      pass(dP2T, dP2);
    }
    if (anc) {
      dA1.zero_();
      dA2.zero_();
    }
    if (m.lnw.has_value()) dlnw.zero_();
    if (m.lnb.has_value()) dlnb.zero_();
  } else {
    CpuRange range("mlp_chunk_bwd", b.fwd.chunk, [] { return mlp_cpu_variant(); });
    run_guarded([&] { mlp_bwd_cpu(b); });
  }
  auto cast = [](const at::Tensor& g, const c10::optional<at::Tensor>& ref) {
    return ref.has_value() ? g.to(ref->scalar_type()) : g;
  };
  return {cast(dq, q), cast(dk, k), cast(dv, v), cast(dlr, lr), cast(dalpha, alpha),
          mom ? cast(dmom, momentum) : dmom, cast(dbp, bias_param), cast(drp, ret_param),
          cast(dlnw, ln_weight), cast(dlnb, ln_bias), cast(dW1, W1), cast(dW2, W2),
          mom ? cast(dP1, P1) : dP1, mom ? cast(dP2, P2) : dP2, cast(dA1, A1), cast(dA2, A2)};
}

}  // namespace
}  // namespace torch_glue
}  // namespace miras

TORCH_LIBRARY_FRAGMENT(miras, m) {
  m.def(
      "mlp_chunk_fwd(Tensor q, Tensor k, Tensor v, Tensor lr, Tensor alpha, Tensor? momentum, "
      "Tensor? bias_param, Tensor? ret_param, Tensor? ln_weight, Tensor? ln_bias, Tensor W1, Tensor W2, "
      "Tensor? P1, Tensor? P2, Tensor? A1, Tensor? A2, Tensor? cu_seqlens, int[] icfg, float[] fcfg, "
      "bool save_states) -> (Tensor o, Tensor W1T, Tensor W2T, Tensor P1T, Tensor P2T, Tensor A1T, Tensor A2T, "
      "Tensor chunk_X, Tensor chunk_P)");
  m.def(
      "mlp_chunk_bwd(Tensor dO, Tensor? dW1T, Tensor? dW2T, Tensor? dP1T, Tensor? dP2T, Tensor q, Tensor k, "
      "Tensor v, Tensor lr, Tensor alpha, Tensor? momentum, Tensor? bias_param, Tensor? ret_param, "
      "Tensor? ln_weight, Tensor? ln_bias, Tensor W1, Tensor W2, Tensor? P1, Tensor? P2, Tensor? A1, "
      "Tensor? A2, Tensor? cu_seqlens, Tensor chunk_X, Tensor chunk_P, int[] icfg, float[] fcfg) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(miras, CPU, m) {
  m.impl("mlp_chunk_fwd", &miras::torch_glue::mlp_chunk_fwd_impl);
  m.impl("mlp_chunk_bwd", &miras::torch_glue::mlp_chunk_bwd_impl);
}
