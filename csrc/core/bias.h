// miras/core/bias.h — attentional biases: psi(e) and its vector-Jacobian product (SPEC §3,
// KERNELS.md §3), written once for host and device.
//
// A bias acts on one token's residual row e = M(k) - v in R^{Dv}. Element-wise biases need only
// e_i; the norm-based ones (huber yaad/norm, robust) also need the row statistic
// sumsq = sum_i e_i^2, and their VJP needs edpsi = sum_i e_i * dpsi_i. Backends compute those
// row reductions however suits them (a loop on the CPU, a warp/block reduction on the GPU) and
// call the element functions below.
//
// The biases are listed in registry.h (codes, names, parameters, traits); each has its case in
// bias_psi, bias_vjp_e and bias_vjp_param below, and the trait queries are checked against the
// registry at compile time. (The switches are written out, not generated: these are the forms the
// CUDA kernels were verified with on hardware, and a generated dispatch compiles to different
// PTX — tools/ptx_compare.py.) docs/extending.md adds a bias step by step.
#pragma once
#include <cmath>

#include "params.h"

namespace miras {

// Precision-preserving math on host and device (float stays float, double stays double).
MIRAS_HD float m_sqrt(float x) { return sqrtf(x); }
MIRAS_HD double m_sqrt(double x) { return sqrt(x); }
MIRAS_HD float m_pow(float x, float y) { return powf(x, y); }
MIRAS_HD double m_pow(double x, double y) { return pow(x, y); }
MIRAS_HD float m_exp(float x) { return expf(x); }
MIRAS_HD double m_exp(double x) { return exp(x); }
MIRAS_HD float m_log(float x) { return logf(x); }
MIRAS_HD double m_log(double x) { return log(x); }
MIRAS_HD float m_abs(float x) { return fabsf(x); }
MIRAS_HD double m_abs(double x) { return fabs(x); }

// x / sqrt(x^2 + eps), the smoothed sign, without overflow: for |x| > 1 it is evaluated as
// t / sqrt(t^2 + eps/x^2) with t = x/|x| (x^2 overflows float32 at |x| ~ 1.8e19, and with it
// Yaad's delta * x / sqrt(x^2 + eps) turned into inf/inf = NaN while the value is +-delta).
template <typename A>
MIRAS_HD A smooth_sign(A x, A eps) {
  const A a = m_abs(x);
  const A d = a > A(1) ? a : A(1);
  const A t = x / d;
  return t / m_sqrt(t * t + (eps / d) / d);
}

// Trait queries (registry.h's trait columns; checked below).
MIRAS_HD constexpr bool bias_needs_row_norm(int kind) {
  return kind == kBiasHuberYaad || kind == kBiasHuberNorm || kind == kBiasRobust;
}
// The VJP of the norm-based biases needs edpsi = sum_i e_i dpsi_i over the row.
MIRAS_HD constexpr bool bias_needs_edpsi(int kind) {
  return kind == kBiasHuberNorm || kind == kBiasRobust;
}
MIRAS_HD constexpr bool bias_has_param(int kind) {
  return kind == kBiasHuberYaad || kind == kBiasHuberCoord || kind == kBiasHuberNorm ||
         kind == kBiasRobust;
}
MIRAS_HD constexpr bool bias_psi_uses_v(int kind) { return kind == kBiasDot; }
// Biases whose psi VJP is ill-conditioned in e (huber yaad: delta eps / (e^2 + eps)^{3/2} is
// ~1/sqrt(eps) near e = 0): the tensor-core kernels split their operands into hi/lo halves.
MIRAS_HD constexpr bool bias_needs_split(int kind) { return kind == kBiasHuberYaad; }

#define MIRAS_BIAS_TRAITS_CHECK_(N, code, name, P, param, lo, open, ROW, ED, V, SPLIT)                \
  static_assert(bias_needs_row_norm(kBias##N) == (ROW == 1), "registry.h vs bias_needs_row_norm: " name); \
  static_assert(bias_needs_edpsi(kBias##N) == (ED == 1), "registry.h vs bias_needs_edpsi: " name);        \
  static_assert(bias_psi_uses_v(kBias##N) == (V == 1), "registry.h vs bias_psi_uses_v: " name);           \
  static_assert(bias_needs_split(kBias##N) == (SPLIT == 1), "registry.h vs bias_needs_split: " name);     \
  static_assert(bias_has_param(kBias##N) == (P == 1) && (P == 1) == (sizeof(param) > 1),                 \
                "registry.h vs bias_has_param: " name);
MIRAS_BIASES(MIRAS_BIAS_TRAITS_CHECK_)
#undef MIRAS_BIAS_TRAITS_CHECK_

template <typename A>
struct BiasArgs {
  int kind;
  A p, eps;   // lp exponent and smoothing
  A param;    // this token's delta (huber) or Delta (robust)
};

// psi_i for one element. e = residual, v = target (dot bias only), sumsq = sum e^2 of the row.
template <typename A>
MIRAS_HD A bias_psi(const BiasArgs<A>& b, A e, A v, A sumsq) {
  switch (b.kind) {
    case kBiasDot:
      return -v;
    case kBiasL2:
      return e;
    case kBiasLp: {  // p = 3 (Moneta's default) through sqrt: same value, several times cheaper
      const A s = e * e + b.eps;
      return e * (b.p == A(3) ? m_sqrt(s) : m_pow(s, (b.p - A(2)) / A(2)));
    }
    case kBiasHuberYaad:
      return m_sqrt(sumsq) <= b.param ? e : b.param * smooth_sign(e, b.eps);
    case kBiasHuberCoord:
      return e < -b.param ? -b.param : (e > b.param ? b.param : e);
    case kBiasHuberNorm: {
      A n = m_sqrt(sumsq);
      return n <= b.param ? e : e * (b.param / n);
    }
    case kBiasRobust:
      return e * (A(1) + b.param / m_sqrt(sumsq + b.eps));
    default:
      return e;
  }
}

// d loss / d e_i given dpsi (the incoming gradient on psi). For the dot bias psi = -v does not
// depend on e: the caller adds dv_i -= dpsi_i instead (see bias_psi_uses_v).
template <typename A>
MIRAS_HD A bias_vjp_e(const BiasArgs<A>& b, A e, A dpsi, A sumsq, A edpsi) {
  switch (b.kind) {
    case kBiasDot:
      return A(0);
    case kBiasL2:
      return dpsi;
    case kBiasLp: {
      A s = e * e + b.eps;
      const A f = b.p == A(3) ? A(1) / m_sqrt(s) : m_pow(s, (b.p - A(4)) / A(2));
      return f * ((b.p - A(1)) * e * e + b.eps) * dpsi;
    }
    case kBiasHuberYaad: {
      if (m_sqrt(sumsq) <= b.param) return dpsi;
      A s = e * e + b.eps;
      return b.param * b.eps / (s * m_sqrt(s)) * dpsi;
    }
    case kBiasHuberCoord:  // |e| <= delta is the clamp's identity branch, as in bias_psi
      return (e <= b.param && e >= -b.param) ? dpsi : A(0);
    case kBiasHuberNorm: {
      A n = m_sqrt(sumsq);
      if (n <= b.param) return dpsi;
      return (b.param / n) * (dpsi - e * edpsi / (n * n));
    }
    case kBiasRobust: {  // Delta e edpsi / r^3 as three ratios: r^3 overflows float32 from r ~ 7e12
      A r = m_sqrt(sumsq + b.eps);
      return (A(1) + b.param / r) * dpsi - (b.param / r) * (e / r) * (edpsi / r);
    }
    default:
      return dpsi;
  }
}

// This element's contribution to d loss / d param (summed over the row by the caller).
template <typename A>
MIRAS_HD A bias_vjp_param(const BiasArgs<A>& b, A e, A dpsi, A sumsq) {
  switch (b.kind) {
    case kBiasHuberYaad:
      return m_sqrt(sumsq) <= b.param ? A(0) : dpsi * smooth_sign(e, b.eps);
    case kBiasHuberCoord:
      return e > b.param ? dpsi : (e < -b.param ? -dpsi : A(0));
    case kBiasHuberNorm: {
      A n = m_sqrt(sumsq);
      return n <= b.param ? A(0) : e * dpsi / n;
    }
    case kBiasRobust:
      return e * dpsi / m_sqrt(sumsq + b.eps);
    default:
      return A(0);
  }
}


}  // namespace miras
