// miras/cpu/selftest.cpp — stand-alone check of the CPU backend without torch (not part of the
// extension build: setup.py skips files named selftest*). For every bias x retention x momentum
// and a few chunk sizes it compares chunk_bwd_cpu against central finite differences of
//   L = <dO, o> + <dXT, XT> + <dPT, PT>
// in float64, on random coordinates of every input. Build and run:
//   g++ -O2 -fopenmp -std=c++17 -Icsrc/core csrc/cpu/*.cpp -o /tmp/miras_selftest && /tmp/miras_selftest
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "backends.h"

using namespace miras;
using Vec = std::vector<double>;

namespace {

struct Problem {
  int64_t N = 2, T = 9, H = 2, Dk = 3, Dv = 4;
  Vec q, k, v, lr, al, mo, bp, rp, X0, P0;
  Vec dO, dXT, dPT;
  MemoryConfig cfg;
  bool mom = false;

  ChunkFwdParams fwd_params() const {
    ChunkFwdParams p;
    p.N = N; p.T = T; p.H = H; p.Dk = Dk; p.Dv = Dv;
    p.dtype = kFloat64;
    p.cfg = cfg;
    p.q = q.data(); p.k = k.data(); p.v = v.data(); p.lr = lr.data(); p.alpha = al.data();
    p.momentum = mom ? mo.data() : nullptr;
    p.bias_param = bp.data(); p.ret_param = rp.data();
    p.X0 = X0.data(); p.P0 = mom ? P0.data() : nullptr;
    return p;
  }
  double loss() const {
    ChunkFwdParams p = fwd_params();
    const size_t S = size_t(N * H * Dk * Dv);
    Vec o(size_t(N * T * H * Dv)), XT(S), PT(S), AT(S);
    p.o = o.data(); p.XT = XT.data(); p.PT = PT.data(); p.AT = AT.data();
    chunk_fwd_cpu(p);
    double L = 0;
    for (size_t i = 0; i < o.size(); ++i) L += dO[i] * o[i];
    for (size_t i = 0; i < S; ++i) L += dXT[i] * XT[i] + (mom ? dPT[i] * PT[i] : 0.0);
    return L;
  }
};

}  // namespace

int main() {
  std::mt19937 gen(1234);
  std::normal_distribution<double> nd;
  std::uniform_real_distribution<double> ud;
  auto R = [&](size_t n, double s) { Vec x(n); for (auto& e : x) e = s * nd(gen); return x; };
  auto U = [&](size_t n, double a, double b) { Vec x(n); for (auto& e : x) e = a + (b - a) * ud(gen); return x; };
  int fails = 0, cases = 0;
  double worst = 0;
  for (int bias = kBiasDot; bias <= kBiasRobust; ++bias)
    for (int ret = kRetL2; ret <= kRetLq; ++ret)
      for (int mom = 0; mom < 2; ++mom)
        for (int64_t C : {1, 4, 64}) {
          Problem pr;
          pr.mom = mom;
          pr.cfg.bias = bias; pr.cfg.retention = ret; pr.cfg.chunk_size = C;
          pr.cfg.scale = 1.0 / std::sqrt(double(pr.Dk));
          const int64_t tok = pr.N * pr.T * pr.H;
          const size_t S = size_t(pr.N * pr.H * pr.Dk * pr.Dv);
          pr.q = R(size_t(tok * pr.Dk), 1); pr.k = R(size_t(tok * pr.Dk), 0.5); pr.v = R(size_t(tok * pr.Dv), 1);
          pr.lr = U(size_t(tok), 0.05, 0.3); pr.al = U(size_t(tok), 0.8, 1.0); pr.mo = U(size_t(tok), 0.0, 0.8);
          pr.bp = U(size_t(tok), 0.3, 1.8); pr.rp = U(size_t(tok), 0.0, 0.02);
          pr.X0 = R(S, 0.3); pr.P0 = R(S, 0.1);
          pr.dO = R(size_t(tok * pr.Dv), 1); pr.dXT = R(S, 1); pr.dPT = R(S, 1);
          // analytic gradients (no saved chunk states: exercises the recompute fallback)
          ChunkBwdParams b;
          b.fwd = pr.fwd_params();
          b.dO = pr.dO.data(); b.dXT = pr.dXT.data(); b.dPT = mom ? pr.dPT.data() : nullptr;
          const size_t ntok = size_t(tok);
          Vec dq(pr.q.size()), dk(pr.k.size()), dv(pr.v.size()), dlr(ntok), dal(ntok), dmo(ntok),
              dbp(ntok), drp(ntok), dX0(S), dP0(S);
          b.dq = dq.data(); b.dk = dk.data(); b.dv = dv.data(); b.dlr = dlr.data(); b.dalpha = dal.data();
          b.dmomentum = mom ? dmo.data() : nullptr; b.dbias_param = dbp.data(); b.dret_param = drp.data();
          b.dX0 = dX0.data(); b.dP0 = mom ? dP0.data() : nullptr;
          chunk_bwd_cpu(b);
          struct In { Vec* x; Vec* g; const char* name; };
          std::vector<In> ins = {{&pr.q, &dq, "q"}, {&pr.k, &dk, "k"}, {&pr.v, &dv, "v"},
                                 {&pr.lr, &dlr, "lr"}, {&pr.al, &dal, "alpha"}, {&pr.bp, &dbp, "bias_param"},
                                 {&pr.rp, &drp, "ret_param"}, {&pr.X0, &dX0, "X0"}};
          if (mom) { ins.push_back({&pr.mo, &dmo, "momentum"}); ins.push_back({&pr.P0, &dP0, "P0"}); }
          double err = 0;
          const char* where = "";
          for (auto& in : ins) {
            std::uniform_int_distribution<size_t> pick(0, in.x->size() - 1);
            for (int r = 0; r < 6; ++r) {
              const size_t i = pick(gen);
              const double x0 = (*in.x)[i], h = 1e-6;
              (*in.x)[i] = x0 + h; const double lp = pr.loss();
              (*in.x)[i] = x0 - h; const double lm = pr.loss();
              (*in.x)[i] = x0;
              const double fd = (lp - lm) / (2 * h), an = (*in.g)[i];
              const double e = std::fabs(fd - an) / (1.0 + std::fabs(fd));
              if (e > err) { err = e; where = in.name; }
            }
          }
          ++cases;
          worst = std::max(worst, err);
          if (err > 1e-5) {
            ++fails;
            std::printf("FAIL bias=%d retention=%d momentum=%d C=%lld: |fd - grad| = %.2e at d%s\n", bias,
                        ret, mom, (long long)C, err, where);
          }
        }
  std::printf("%d cases, %d failures, worst finite-difference error %.2e\n", cases, fails, worst);
  return fails ? 1 : 0;
}
