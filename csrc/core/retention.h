// miras/core/retention.h — retention gates: the per-token step, the read map phi and their VJPs
// (SPEC §4, KERNELS.md §2), written once for host and device.
//
// Raw state X (Dk x Dv, row-major, one head). A token's step is
//   Z_t = alpha_t X_{t-1} + U_t,   X_t = step(Z_t)   (soft threshold for elastic net, else Z_t)
// and the memory is read through W = phi(X):
//   l2, elastic_net: W = X
//   kl:  W[i,j] = c * exp(X[i,j] - m_j) / s_j  (softmax over the key axis i, per value column j;
//        m_j = max_i X[i,j], s_j = sum_i exp(X[i,j] - m_j))
//   lq:  W = X * inv,  inv = 1 / max(n, eps_q)^(q-2),  n = (sum |X|^q)^(1/q) over the matrix.
// The reductions (column max/sum for kl, the q-norm for lq, <W,dW> per column for the kl VJP,
// <dW,X> for the lq VJP) are left to the backend; these are the element formulas.
#pragma once
#include "bias.h"

namespace miras {

// ---- step --------------------------------------------------------------------------------------
template <typename A>
MIRAS_HD A soft_threshold(A z, A gamma) {
  return z > gamma ? z - gamma : (z < -gamma ? z + gamma : A(0));
}

// X_t element from Z_t = alpha X_{t-1} + U_t.
template <typename A>
MIRAS_HD A retention_step(int kind, A z, A gamma) {
  return kind == kRetElasticNet ? soft_threshold(z, gamma) : z;
}

// dZ from dX (and this element's contribution to d gamma, added to *dgamma).
template <typename A>
MIRAS_HD A retention_step_vjp(int kind, A z, A gamma, A dx, A* dgamma) {
  if (kind != kRetElasticNet) return dx;
  if (z > gamma) { *dgamma -= dx; return dx; }
  if (z < -gamma) { *dgamma += dx; return dx; }
  return A(0);
}

// ---- read maps -------------------------------------------------------------------------------
// KL: element of W given the column's max m and sum s.
template <typename A>
MIRAS_HD A kl_read(A x, A m, A s, A c) { return c * m_exp(x - m) / s; }
// KL VJP element: dZ = W (dW - <W,dW>_col / c).
template <typename A>
MIRAS_HD A kl_read_vjp(A w, A dw, A wdw_col, A c) { return w * (dw - wdw_col / c); }

// lq: |x|^q summed gives n^q; the scale applied to X.
template <typename A>
MIRAS_HD A lq_abs_pow(A x, A q) { return m_pow(m_abs(x), q); }
template <typename A>
MIRAS_HD A lq_norm_from_sum(A sum_abs_q, A q) { return m_pow(sum_abs_q, A(1) / q); }
template <typename A>
MIRAS_HD A lq_inv_scale(A n, A q, A eps_q) { return A(1) / m_pow(n > eps_q ? n : eps_q, q - A(2)); }
// lq VJP element: dA = dW*inv - (q-2) <dW,X> sign(x)|x|^(q-1) / n^(2q-2)   (n > eps_q)
//                 dA = dW*inv                                                (n <= eps_q)
// evaluated as dW*inv - coef * sign(x)(|x|/n)^(q-1) with coef = (q-2) <dW,X> inv / n
// (lq_vjp_coef): n^(2q-2) itself overflows float32 already at n ~ 2.6e6 for q = 4 (the term then
// vanished silently); |x|/n <= 1 and inv = n^-(q-2) keep every factor in range.
template <typename A>
MIRAS_HD A lq_vjp_coef(A dwx, A n, A inv, A q) { return (q - A(2)) * (dwx * inv / n); }
template <typename A>
MIRAS_HD A lq_read_vjp(A x, A dw, A inv, A n, A dwx, A q, A eps_q) {
  A g = dw * inv;
  if (n > eps_q) {
    A sx = x > A(0) ? A(1) : (x < A(0) ? A(-1) : A(0));
    g -= lq_vjp_coef(dwx, n, inv, q) * sx * m_pow(m_abs(x) / n, q - A(1));
  }
  return g;
}

}  // namespace miras
