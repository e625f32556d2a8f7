// miras/core/mlp.h — the MLP memory's own math (SPEC §6, KERNELS.md §5): exact-erf GELU, its
// first and second derivative, LayerNorm forward, LayerNorm's input gradient LN_bwd and the VJP
// of LN_bwd, written once for host and device.
//
// The memory is M(x) = x + LN(GELU(x W1) W2) (row vectors; W1 [Dk, Dh], W2 [Dh, Dv], Dv == Dk),
// LN over the Dv entries of a row, eps 1e-5, biased variance, optional per-head affine (w, b).
// Per token at the anchor weights: z = k W1, a = GELU(z), u = a W2, ŷ = k + LN(u),
// ψ = ψ(ŷ − v) (bias.h), δu = LN_bwd(u, ψ), δz = (δu W2ᵀ) ⊙ GELU'(z).
//
// Element formulas (any backend) and sequential row helpers (a thread that owns a whole row, as
// on the CPU). Row helpers take the row length n and contiguous rows; w == nullptr means no
// affine weight (1), b == nullptr no affine bias (0). Notation: σ = √(var(u) + eps),
// rstd = 1/σ, x̂ = (u − mean u)·rstd, ĝ = g ⊙ w.
#pragma once
#include <cmath>

#include "bias.h"

namespace miras {

MIRAS_HD float m_erf(float x) { return erff(x); }
MIRAS_HD double m_erf(double x) { return erf(x); }

constexpr double kLnEps = 1e-5;  // LayerNorm epsilon of the MLP memory (SPEC §6)

// ---- GELU (exact erf form) ----------------------------------------------------------------------
// GELU(z) = z Φ(z);  GELU'(z) = Φ(z) + z φ(z);  GELU''(z) = φ(z) (2 − z²)  (the GELU' VJP:
// dz += r ⊙ GELU''(z) for an incoming r on GELU'(z)).
template <typename A>
MIRAS_HD A gelu_cdf(A z) { return A(0.5) * (A(1) + m_erf(z * A(0.70710678118654752440))); }
template <typename A>
MIRAS_HD A gelu_pdf(A z) { return A(0.39894228040143267794) * m_exp(A(-0.5) * z * z); }
template <typename A>
MIRAS_HD A gelu(A z) { return z * gelu_cdf(z); }
template <typename A>
MIRAS_HD A gelu_grad(A z) { return gelu_cdf(z) + z * gelu_pdf(z); }
template <typename A>
MIRAS_HD A gelu_grad2_from_pdf(A z, A pdf) { return pdf * (A(2) - z * z); }
template <typename A>
MIRAS_HD A gelu_grad2(A z) { return gelu_grad2_from_pdf(z, gelu_pdf(z)); }
// GELU(z), GELU'(z) and φ(z) with one erf and one exp (GELU''(z) = φ(z)(2 − z²) follows from φ).
template <typename A>
MIRAS_HD void gelu_and_grad(A z, A* g, A* gp, A* pdf) {
  const A c = gelu_cdf(z), d = gelu_pdf(z);
  *g = z * c;
  *gp = c + z * d;
  *pdf = d;
}

// ---- LayerNorm element formulas -----------------------------------------------------------------
template <typename A>
MIRAS_HD A ln_rstd(A var) { return A(1) / m_sqrt(var + A(kLnEps)); }

// LN_bwd element: (ĝ − m1 − x̂ m2)·rstd with m1 = mean(ĝ), m2 = mean(ĝ x̂). The same formula is
// (a) LayerNorm's input gradient for an output gradient g (ĝ = g ⊙ w), and (b) the ĝ-gradient of
// LN_bwd for an incoming r (with ĝ → r, m1 → mean r, m2 → mean(r x̂)).
template <typename A>
MIRAS_HD A ln_bwd_elem(A gh, A xh, A m1, A m2, A rstd) { return (gh - m1 - xh * m2) * rstd; }

// The u-gradient of LN_bwd(u, g) for an incoming r, element-wise (KERNELS.md §5):
//   du = −[x̂·mean(r h) + m2·(r − mean r − x̂ mean(r x̂)) + mean(r x̂)·h]·rstd²,
//   h = ĝ − m1 − x̂ m2 (= σ·LN_bwd), m2 = mean(ĝ x̂); rdg = (r − mean r − x̂ mean(r x̂)).
template <typename A>
MIRAS_HD A ln_bwd_vjp_u(A xh, A h, A rdg, A m2, A mrh, A mrx, A rstd) {
  return -(xh * mrh + m2 * rdg + mrx * h) * rstd * rstd;
}

// ---- LayerNorm row helpers (one thread owns the row) --------------------------------------------
// mean and rstd of u[0..n) (two passes: mean, then the centred second moment).
template <typename A>
MIRAS_HD void ln_stats(const A* u, int64_t n, A* mu, A* rstd) {
  A s = A(0);
  for (int64_t j = 0; j < n; ++j) s += u[j];
  const A m = s / A(n);
  A v = A(0);
  for (int64_t j = 0; j < n; ++j) {
    const A d = u[j] - m;
    v += d * d;
  }
  *mu = m;
  *rstd = ln_rstd(v / A(n));
}

// xh = x̂ (may be null), y = x̂ ⊙ w + b (may be null). Returns rstd.
template <typename A>
MIRAS_HD A ln_forward_row(const A* u, const A* w, const A* b, int64_t n, A* xh, A* y) {
  A mu, rstd;
  ln_stats(u, n, &mu, &rstd);
  for (int64_t j = 0; j < n; ++j) {
    const A x = (u[j] - mu) * rstd;
    if (xh) xh[j] = x;
    if (y) y[j] = (w ? x * w[j] : x) + (b ? b[j] : A(0));
  }
  return rstd;
}

// out = LN_bwd(u, g): LayerNorm's input gradient for the output gradient g, given x̂ and rstd.
template <typename A>
MIRAS_HD void ln_bwd_row(const A* xh, const A* g, const A* w, A rstd, int64_t n, A* out) {
  A m1 = A(0), m2 = A(0);
  for (int64_t j = 0; j < n; ++j) {
    const A gh = w ? g[j] * w[j] : g[j];
    m1 += gh;
    m2 += gh * xh[j];
  }
  m1 /= A(n);
  m2 /= A(n);
  for (int64_t j = 0; j < n; ++j) out[j] = ln_bwd_elem(w ? g[j] * w[j] : g[j], xh[j], m1, m2, rstd);
}

// VJP of d = LN_bwd(u, g) for an incoming r = dL/dd: du (+=), dg (=), dw (+=, when both w and dw
// are given). x̂, rstd are u's.
template <typename A>
MIRAS_HD void ln_bwd_vjp_row(const A* xh, const A* g, const A* w, A rstd, const A* r, int64_t n, A* du,
                             A* dg, A* dw) {
  A m1 = A(0), m2 = A(0), mr = A(0), mrx = A(0);
  for (int64_t j = 0; j < n; ++j) {
    const A gh = w ? g[j] * w[j] : g[j];
    m1 += gh;
    m2 += gh * xh[j];
    mr += r[j];
    mrx += r[j] * xh[j];
  }
  const A inv_n = A(1) / A(n);
  m1 *= inv_n;
  m2 *= inv_n;
  mr *= inv_n;
  mrx *= inv_n;
  A mrh = A(0);
  for (int64_t j = 0; j < n; ++j) {
    const A gh = w ? g[j] * w[j] : g[j];
    mrh += r[j] * (gh - m1 - xh[j] * m2);
  }
  mrh *= inv_n;
  for (int64_t j = 0; j < n; ++j) {
    const A gh = w ? g[j] * w[j] : g[j];
    const A h = gh - m1 - xh[j] * m2;
    const A rdg = r[j] - mr - xh[j] * mrx;
    const A dgh = rdg * rstd;
    dg[j] = w ? dgh * w[j] : dgh;
    if (w && dw) dw[j] += dgh * g[j];
    du[j] += ln_bwd_vjp_u(xh[j], h, rdg, m2, mrh, mrx, rstd);
  }
}

}  // namespace miras
