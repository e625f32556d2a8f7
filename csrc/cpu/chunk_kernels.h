// miras/cpu/chunk_kernels.h — the CPU backend's loops, forward and backward (SPEC §5,
// KERNELS.md §2-3). Torch-free C++17; float32 or float64 throughout.
//
// Work: one task = one (sequence n, head h), OpenMP `for schedule(dynamic)` over tasks; tasks are
// independent and deterministic (no atomics, no reduction whose order depends on the thread
// count). Per chunk: W_A = phi(anchor), the anchor residuals E = K W_A - V as one register-blocked
// GEMM, psi~ = lr psi(E) per row (bias switch hoisted to the row: the element formulas of
// csrc/core/bias.h are instantiated with a compile-time kind so the switch folds away), then the
// exact per-token scan in place (Dk x Dv stays in L1). For the identity read maps (l2,
// elastic_net) the update and the read are one pass, columns in blocks of two SIMD vectors with o
// and psi~ in registers; kl keeps a column max and uses a vectorised float exp; lq accumulates
// sum |x|^q and q~X in the same pass.
// Backward of retention l2: the dual form of chunk_l2_dual.h (small GEMMs per chunk; the env var
// MIRAS_CPU_L2_BWD=scan forces the per-token scan below, for testing).
// Backward (the other retentions; l2 with MIRAS_CPU_L2_BWD=scan): chunks in reverse carrying
// dX, dP. Each chunk's token states are recomputed from the saved chunk start (whole chunk when
// (C+1) states fit in MIRAS_CPU_SEG_KB, default 1536 KiB, per thread; otherwise a checkpoint
// every 16 tokens and the segments recomputed one by one — never by inverting the step), then walked backwards (token_bwd); the residual's gradients
// (dK += dE W_A^T, dW_A = K^T dE) are two GEMMs per chunk, followed by the anchor's read-map VJP.
//
// Included once per instruction set (chunk_cpu.cpp: portable; chunk_cpu_avx2.cpp: AVX2+FMA,
// chosen at run time), each time in its own namespace MIRAS_CPU_ISA so that no symbol is shared.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "../core/backends.h"
#include "../core/retention.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef MIRAS_RESTRICT
#define MIRAS_RESTRICT __restrict__
#endif
#ifndef MIRAS_CPU_ISA
#error "define MIRAS_CPU_ISA (the namespace of this instantiation) before including chunk_kernels.h"
#endif
// Vectorised row reductions (order fixed at compile time, so results do not depend on threads).
#ifndef MIRAS_SIMD_REDUCE
#define MIRAS_PRAGMA(x) _Pragma(#x)
#ifdef _OPENMP
#define MIRAS_SIMD_REDUCE(...) MIRAS_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#else
#define MIRAS_SIMD_REDUCE(...)
#endif
#endif
#ifndef MIRAS_CPU_VBYTES
#define MIRAS_CPU_VBYTES 16
#endif

namespace miras {
namespace cpu {
namespace MIRAS_CPU_ISA {

// ---- configuration in the compute type ----------------------------------------------------------
template <typename T>
struct Cfg {
  int bias = kBiasL2, ret = kRetL2;
  T p, eps, bias_param, ret_param, c, qn, eps_q, scale;
  int qmode = 0;  // lq: 2 -> q == 2, 4 -> q == 4, 0 -> general pow
  int64_t C = 1;
  // map_schedule="chunk" with kl / lq (SPEC §5b): the l2 dual form from phi(X) per chunk
  bool chunk_map = false;
};

template <typename T>
Cfg<T> make_cfg(const MemoryConfig& m) {
  Cfg<T> c;
  c.bias = m.bias;
  c.ret = m.retention;
  c.p = T(m.p);
  c.eps = T(m.eps);
  c.bias_param = T(m.bias_param);
  c.ret_param = T(m.ret_param);
  c.c = T(m.kl_scale);
  c.qn = T(m.q_norm);
  c.eps_q = T(m.eps_q);
  c.scale = T(m.scale);
  c.qmode = m.q_norm == 2.0 ? 2 : (m.q_norm == 4.0 ? 4 : 0);
  c.C = m.chunk_size;
  c.chunk_map = m.map_schedule == kMapChunk && (m.retention == kRetKL || m.retention == kRetLq);
  return c;
}

// ---- per-call context ----------------------------------------------------------------------------
template <typename T>
struct Ctx {
  Cfg<T> cf;
  int64_t N, Tlen, H, Dk, Dv;
  const int64_t* cu;
  const T *q, *k, *v, *lr, *alpha, *mom, *bp, *rp;
  const T *X0, *P0, *A0;
  int64_t lmax;  // longest sequence (bounds the chunk buffers when chunk_size > length)

  int64_t begin(int64_t n) const { return seq_begin(cu, n, Tlen); }
  int64_t len(int64_t n) const { return seq_len(cu, n, Tlen); }
  int64_t state_off(int64_t n, int64_t h) const { return (n * H + h) * Dk * Dv; }
};

template <typename T>
Ctx<T> make_ctx(const ChunkFwdParams& p) {
  Ctx<T> x;
  x.cf = make_cfg<T>(p.cfg);
  x.N = p.N;
  x.Tlen = p.T;
  x.H = p.H;
  x.Dk = p.Dk;
  x.Dv = p.Dv;
  x.cu = p.cu_seqlens;
  x.q = static_cast<const T*>(p.q);
  x.k = static_cast<const T*>(p.k);
  x.v = static_cast<const T*>(p.v);
  x.lr = static_cast<const T*>(p.lr);
  x.alpha = static_cast<const T*>(p.alpha);
  x.mom = static_cast<const T*>(p.momentum);
  x.bp = static_cast<const T*>(p.bias_param);
  x.rp = static_cast<const T*>(p.ret_param);
  x.X0 = static_cast<const T*>(p.X0);
  x.P0 = static_cast<const T*>(p.P0);
  x.A0 = static_cast<const T*>(p.A0);
  x.lmax = 0;
  for (int64_t n = 0; n < p.N; ++n) x.lmax = std::max(x.lmax, x.len(n));
  return x;
}

// ---- per-thread workspace --------------------------------------------------------------------------
template <typename T>
struct Work {
  int64_t Cb = 0, Dk = 0, Dv = 0;
  // chunk inputs
  std::vector<T> Kc, Qc, Vc, lr, al, be, ga, bpv;
  // chunk residuals and error signals
  std::vector<T> E, Psi, Pst, sumsq;
  // states
  std::vector<T> X, P, Ar, WA, o, aux, tmp, tmp2;
  std::vector<T> R;  // map_schedule="chunk": the read memory
  T anc_n = 0, anc_inv = 1;

  void init(int64_t Cb_, int64_t Dk_, int64_t Dv_) {
    Cb = Cb_;
    Dk = Dk_;
    Dv = Dv_;
    const size_t DkDv = size_t(Dk) * size_t(Dv);
    Kc.assign(size_t(Cb) * Dk, T(0));
    Qc.assign(size_t(Cb) * Dk, T(0));
    Vc.assign(size_t(Cb) * Dv, T(0));
    lr.assign(Cb, T(0));
    al.assign(Cb, T(0));
    be.assign(Cb, T(0));
    ga.assign(Cb, T(0));
    bpv.assign(Cb, T(0));
    E.assign(size_t(Cb) * Dv, T(0));
    Psi.assign(size_t(Cb) * Dv, T(0));
    Pst.assign(size_t(Cb) * Dv, T(0));
    sumsq.assign(Cb, T(0));
    X.assign(DkDv, T(0));
    P.assign(DkDv, T(0));
    Ar.assign(DkDv, T(0));
    WA.assign(DkDv, T(0));
    R.assign(DkDv, T(0));
    o.assign(Dv, T(0));
    aux.assign(aux_width(Dv), T(0));
    tmp.assign(2 * std::max(Dv, Dk) + 2, T(0));
    tmp2.assign(2 * std::max(Dv, Dk) + 2, T(0));
  }
  // per-token auxiliary values of the read map (kl: column max, column sum, output; lq: q~X, n,
  // inv) that the backward reuses.
  static int64_t aux_width(int64_t Dv) { return 3 * Dv + 2; }
};

// ---- small dense kernels ------------------------------------------------------------------------
// MIRAS_CPU_VBYTES-byte SIMD vectors through GCC/Clang vector extensions (SSE2 / NEON with the portable flags,
// wider code where the compiler is allowed more). aligned(sizeof(T)) + may_alias make a plain
// dereference an unaligned load.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(MIRAS_CPU_VBYTES), aligned(sizeof(T)), may_alias));
  static constexpr int W = int(MIRAS_CPU_VBYTES / sizeof(T));
};

// Cm[M x N] (+)= op(A) * B[K x N], row-major with leading dimensions; op(A) = A [M x K]
// (TA = false) or A^T with A stored K x M (TA = true). Every output element is summed over kk in
// increasing order (the same in the blocked and the tail paths). Register micro-kernel: 4 rows x
// 2 vectors of accumulators; the broadcasts read a row of A, or a column when TA.
template <typename T, bool TA>
void gemm_ab(int64_t M, int64_t N, int64_t K, const T* MIRAS_RESTRICT A, int64_t lda,
             const T* MIRAS_RESTRICT B, int64_t ldb, T* MIRAS_RESTRICT Cm, int64_t ldc,
             bool accumulate) {
  typedef typename Vec<T>::type V;
  constexpr int W = Vec<T>::W;
  constexpr int MB = 4;
  constexpr int NB = 2 * W;
  // op(A)[m, kk]
  auto at = [&](int64_t m, int64_t kk) -> T { return TA ? A[kk * lda + m] : A[m * lda + kk]; };
  int64_t m0 = 0;
  for (; m0 + MB <= M; m0 += MB) {
    int64_t n0 = 0;
    for (; n0 + NB <= N; n0 += NB) {
      V c00, c01, c10, c11, c20, c21, c30, c31;
      T* c0 = Cm + (m0 + 0) * ldc + n0;
      T* c1 = Cm + (m0 + 1) * ldc + n0;
      T* c2 = Cm + (m0 + 2) * ldc + n0;
      T* c3 = Cm + (m0 + 3) * ldc + n0;
      if (accumulate) {
        c00 = *(const V*)c0; c01 = *(const V*)(c0 + W);
        c10 = *(const V*)c1; c11 = *(const V*)(c1 + W);
        c20 = *(const V*)c2; c21 = *(const V*)(c2 + W);
        c30 = *(const V*)c3; c31 = *(const V*)(c3 + W);
      } else {
        c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = V{};
      }
      const T* b = B + n0;
      for (int64_t kk = 0; kk < K; ++kk, b += ldb) {
        const V b0 = *(const V*)b, b1 = *(const V*)(b + W);
        V x;
        x = V{} + at(m0 + 0, kk); c00 += x * b0; c01 += x * b1;
        x = V{} + at(m0 + 1, kk); c10 += x * b0; c11 += x * b1;
        x = V{} + at(m0 + 2, kk); c20 += x * b0; c21 += x * b1;
        x = V{} + at(m0 + 3, kk); c30 += x * b0; c31 += x * b1;
      }
      *(V*)c0 = c00; *(V*)(c0 + W) = c01;
      *(V*)c1 = c10; *(V*)(c1 + W) = c11;
      *(V*)c2 = c20; *(V*)(c2 + W) = c21;
      *(V*)c3 = c30; *(V*)(c3 + W) = c31;
    }
    for (int64_t j = n0; j < N; ++j)
      for (int r = 0; r < MB; ++r) {
        T s = accumulate ? Cm[(m0 + r) * ldc + j] : T(0);
        for (int64_t kk = 0; kk < K; ++kk) s += at(m0 + r, kk) * B[kk * ldb + j];
        Cm[(m0 + r) * ldc + j] = s;
      }
  }
  for (; m0 < M; ++m0) {
    T* MIRAS_RESTRICT crow = Cm + m0 * ldc;
    if (!accumulate)
      for (int64_t j = 0; j < N; ++j) crow[j] = T(0);
    for (int64_t kk = 0; kk < K; ++kk) {
      const T a = at(m0, kk);
      const T* MIRAS_RESTRICT b = B + kk * ldb;
      for (int64_t j = 0; j < N; ++j) crow[j] += a * b[j];
    }
  }
}

// Cm (+)= A B (A: M x K) and Cm (+)= A^T B (A stored K x M).
template <typename T>
void gemm_nn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* Cm,
             int64_t ldc, bool accumulate) {
  gemm_ab<T, false>(M, N, K, A, lda, B, ldb, Cm, ldc, accumulate);
}
template <typename T>
void gemm_tn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* Cm,
             int64_t ldc, bool accumulate) {
  gemm_ab<T, true>(M, N, K, A, lda, B, ldb, Cm, ldc, accumulate);
}

// out[c x r] = in[r x c]^T
template <typename T>
void transpose(int64_t r, int64_t c, const T* MIRAS_RESTRICT in, T* MIRAS_RESTRICT out) {
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < c; ++j) out[j * r + i] = in[i * c + j];
}

// exp of the per-token KL softmax. float: Cephes-style range reduction and degree-6 polynomial
// (about 2 ulp), written without calls or branches so that the loops around it vectorise (libm's
// expf is an opaque call); arguments are clamped to [-87.3, 88.3], and below -87.3 the result is 0
// (the softmax arguments are x - max <= 0: a weight below e^-87.3 ~ 1.2e-38 is flushed to 0, not
// held at that floor, whose gradient terms would grow with the logits).
// double (the gradcheck precision): libm's exp.
inline float kl_exp(float x) {
  const bool tiny = x < -87.3f;
  x = tiny ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  const float fx = x * 1.44269504088896341f;
  const int32_t ni = int32_t(fx + (fx < 0.f ? -0.5f : 0.5f));
  const float nf = float(ni);
  float r = x - nf * 0.693359375f;
  r = r + nf * 2.12194440e-4f;
  const float r2 = r * r;
  float y = 1.9875691500E-4f;
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * r2 + r + 1.0f;
  const int32_t bits = (ni + 127) << 23;
  float p2;
  std::memcpy(&p2, &bits, sizeof(p2));
  return tiny ? 0.f : y * p2;
}
inline double kl_exp(double x) { return m_exp(x); }

// The same float exp on a SIMD vector (GCC vector extensions: selects, no branches).
template <typename V>
inline V kl_exp_v(V x) {
  typedef int32_t VI __attribute__((vector_size(sizeof(V))));
  const VI tiny = x < -87.3f;
  x = x < -87.3f ? V{} - 87.3f : x;
  x = x > 88.3f ? V{} + 88.3f : x;
  const V fx = x * 1.44269504088896341f;
  const V h = fx < 0.f ? V{} - 0.5f : V{} + 0.5f;
  const VI ni = __builtin_convertvector(fx + h, VI);
  const V nf = __builtin_convertvector(ni, V);
  V r = x - nf * 0.693359375f;
  r = r + nf * 2.12194440e-4f;
  const V r2 = r * r;
  V y = V{} + 1.9875691500E-4f;
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * r2 + r + 1.0f;
  const VI bits = (ni + 127) << 23;
  const V out = y * (V)bits;
  return tiny ? V{} : out;
}

// out[j] = exp(x[j] - m[j]) for j < n (vectorised for float).
template <typename T>
inline void kl_exp_row(const T* MIRAS_RESTRICT x, const T* MIRAS_RESTRICT m, T* MIRAS_RESTRICT out,
                       int64_t n) {
  int64_t j = 0;
  if constexpr (sizeof(T) == 4) {
    typedef typename Vec<T>::type V;
    constexpr int W = Vec<T>::W;
    for (; j + W <= n; j += W) *(V*)(out + j) = kl_exp_v(*(const V*)(x + j) - *(const V*)(m + j));
  }
  for (; j < n; ++j) out[j] = kl_exp(x[j] - m[j]);
}

// sign(x) |x|^(q-1) for the lq VJP (qmode as in Cfg).
template <typename T>
inline T lq_sgnpow(T x, T q, int qmode) {
  if (qmode == 4) return x * x * x;
  if (qmode == 2) return x;
  const T a = m_pow(m_abs(x), q - T(1));
  return x > T(0) ? a : (x < T(0) ? -a : T(0));
}

// sum |x|^q over n entries, accumulated per lane of a Dv-wide vector (deterministic order).
template <typename T>
inline void lq_acc_row(const T* MIRAS_RESTRICT x, T* MIRAS_RESTRICT acc, int64_t Dv, T q,
                       int qmode) {
  if (qmode == 4) {
    for (int64_t j = 0; j < Dv; ++j) {
      const T x2 = x[j] * x[j];
      acc[j] += x2 * x2;
    }
  } else if (qmode == 2) {
    for (int64_t j = 0; j < Dv; ++j) acc[j] += x[j] * x[j];
  } else {
    for (int64_t j = 0; j < Dv; ++j) acc[j] += m_pow(m_abs(x[j]), q);
  }
}

// The lq norm n = (sum |x|^q)^(1/q) from the plain sum; where that sum overflowed (entries beyond
// ~(max / (Dk Dv))^(1/q): ~4e8 for q = 4, Dk = Dv = 128 in float32) or fell into the subnormal
// range, it is recomputed scaled by max |x| (rare path, same value otherwise).
template <typename T>
inline T lq_norm(T sum, const T* MIRAS_RESTRICT x, int64_t n, T q) {
  const T lo = std::numeric_limits<T>::min() / std::numeric_limits<T>::epsilon();
  if (sum >= lo && sum <= std::numeric_limits<T>::max()) return lq_norm_from_sum(sum, q);
  T m = T(0);
  for (int64_t e = 0; e < n; ++e) m = std::max(m, m_abs(x[e]));
  if (!(m > T(0)) || !(m <= std::numeric_limits<T>::max())) return lq_norm_from_sum(sum, q);  // 0, inf, nan
  T s = T(0);  // (divide: 1/m overflows for a subnormal m)
  for (int64_t e = 0; e < n; ++e) s += m_pow(m_abs(x[e]) / m, q);
  return m * lq_norm_from_sum(s, q);
}

// ---- read map at the anchor (whole matrix) --------------------------------------------------------
// W = phi(Xa). For lq also returns the norm and the scale; tmp needs 2*Dv.
template <typename T, int RET>
void phi_full(const Cfg<T>& cf, int64_t Dk, int64_t Dv, const T* MIRAS_RESTRICT Xa,
              T* MIRAS_RESTRICT W, T* MIRAS_RESTRICT tmp, T* n_out, T* inv_out) {
  const int64_t DkDv = Dk * Dv;
  if constexpr (RET == kRetKL) {
    T* m = tmp;
    T* s = tmp + Dv;
    for (int64_t j = 0; j < Dv; ++j) {
      m[j] = -std::numeric_limits<T>::infinity();
      s[j] = T(0);
    }
    for (int64_t i = 0; i < Dk; ++i)
      for (int64_t j = 0; j < Dv; ++j) m[j] = std::max(m[j], Xa[i * Dv + j]);
    for (int64_t i = 0; i < Dk; ++i)
      for (int64_t j = 0; j < Dv; ++j) {
        const T ex = m_exp(Xa[i * Dv + j] - m[j]);
        W[i * Dv + j] = ex;
        s[j] += ex;
      }
    for (int64_t j = 0; j < Dv; ++j) s[j] = cf.c / s[j];
    for (int64_t i = 0; i < Dk; ++i)
      for (int64_t j = 0; j < Dv; ++j) W[i * Dv + j] *= s[j];
  } else if constexpr (RET == kRetLq) {
    T* acc = tmp;
    for (int64_t j = 0; j < Dv; ++j) acc[j] = T(0);
    for (int64_t i = 0; i < Dk; ++i) lq_acc_row(Xa + i * Dv, acc, Dv, cf.qn, cf.qmode);
    T sum = T(0);
    for (int64_t j = 0; j < Dv; ++j) sum += acc[j];
    const T n = lq_norm(sum, Xa, DkDv, cf.qn);
    const T inv = lq_inv_scale(n, cf.qn, cf.eps_q);
    for (int64_t e = 0; e < DkDv; ++e) W[e] = Xa[e] * inv;
    *n_out = n;
    *inv_out = inv;
  } else {
    std::memcpy(W, Xa, sizeof(T) * size_t(DkDv));
  }
}

// dXa += phi-VJP(Xa; dW). W = phi(Xa) (kl), n/inv its lq norm and scale. tmp needs Dv.
template <typename T, int RET>
void phi_vjp_full(const Cfg<T>& cf, int64_t Dk, int64_t Dv, const T* MIRAS_RESTRICT Xa,
                  const T* MIRAS_RESTRICT W, const T* MIRAS_RESTRICT dW, T n, T inv,
                  T* MIRAS_RESTRICT dXa, T* MIRAS_RESTRICT tmp) {
  const int64_t DkDv = Dk * Dv;
  if constexpr (RET == kRetKL) {
    T* wdw = tmp;
    for (int64_t j = 0; j < Dv; ++j) wdw[j] = T(0);
    for (int64_t i = 0; i < Dk; ++i)
      for (int64_t j = 0; j < Dv; ++j) wdw[j] += W[i * Dv + j] * dW[i * Dv + j];
    for (int64_t j = 0; j < Dv; ++j) wdw[j] /= cf.c;
    for (int64_t i = 0; i < Dk; ++i)
      for (int64_t j = 0; j < Dv; ++j)
        dXa[i * Dv + j] += W[i * Dv + j] * (dW[i * Dv + j] - wdw[j]);
  } else if constexpr (RET == kRetLq) {
    if (n > cf.eps_q) {
      T* acc = tmp;
      for (int64_t j = 0; j < Dv; ++j) acc[j] = T(0);
      for (int64_t i = 0; i < Dk; ++i)
        for (int64_t j = 0; j < Dv; ++j) acc[j] += dW[i * Dv + j] * Xa[i * Dv + j];
      T dwx = T(0);
      for (int64_t j = 0; j < Dv; ++j) dwx += acc[j];
      const T coef = lq_vjp_coef(dwx, n, inv, cf.qn), rn = T(1) / n;
      for (int64_t e = 0; e < DkDv; ++e)
        dXa[e] += dW[e] * inv - coef * lq_sgnpow(Xa[e] * rn, cf.qn, cf.qmode);
    } else {
      for (int64_t e = 0; e < DkDv; ++e) dXa[e] += dW[e] * inv;
    }
  } else {
    for (int64_t e = 0; e < DkDv; ++e) dXa[e] += dW[e];
  }
}

// ---- bias rows --------------------------------------------------------------------------------------
template <typename T, int K>
inline void psi_row_k(const BiasArgs<T>& b0, const T* MIRAS_RESTRICT e, const T* MIRAS_RESTRICT v,
                      T sumsq, T* MIRAS_RESTRICT psi, int64_t Dv) {
  const BiasArgs<T> b{K, b0.p, b0.eps, b0.param};
  for (int64_t j = 0; j < Dv; ++j) psi[j] = bias_psi(b, e[j], v[j], sumsq);
}

template <typename T>
inline void psi_row(const BiasArgs<T>& b, const T* e, const T* v, T sumsq, T* psi, int64_t Dv) {
  switch (b.kind) {
#define MIRAS_CASE_(N, ...) \
  case kBias##N:            \
    return psi_row_k<T, kBias##N>(b, e, v, sumsq, psi, Dv);
    MIRAS_BIASES(MIRAS_CASE_)
#undef MIRAS_CASE_
    default: break;
  }
}

// de = bias-VJP(e; dpsi), returns the row's parameter gradient.
template <typename T, int K>
inline T bias_vjp_row_k(const BiasArgs<T>& b0, const T* MIRAS_RESTRICT e,
                        const T* MIRAS_RESTRICT dpsi, T sumsq, T* MIRAS_RESTRICT de, int64_t Dv) {
  const BiasArgs<T> b{K, b0.p, b0.eps, b0.param};
  T edpsi = T(0);
  if (bias_needs_edpsi(K))
    for (int64_t j = 0; j < Dv; ++j) edpsi += e[j] * dpsi[j];
  for (int64_t j = 0; j < Dv; ++j) de[j] = bias_vjp_e(b, e[j], dpsi[j], sumsq, edpsi);
  T dparam = T(0);
  if (bias_has_param(K))
    for (int64_t j = 0; j < Dv; ++j) dparam += bias_vjp_param(b, e[j], dpsi[j], sumsq);
  return dparam;
}

template <typename T>
inline T bias_vjp_row(const BiasArgs<T>& b, const T* e, const T* dpsi, T sumsq, T* de,
                      int64_t Dv) {
  switch (b.kind) {
#define MIRAS_CASE_(N, ...) \
  case kBias##N:            \
    return bias_vjp_row_k<T, kBias##N>(b, e, dpsi, sumsq, de, Dv);
    MIRAS_BIASES(MIRAS_CASE_)
#undef MIRAS_CASE_
    default: return T(0);
  }
}

// ---- chunk preparation ------------------------------------------------------------------------------
// Copies the chunk's rows [t0, t0+Lc) of sequence (begin, h) into the workspace (queries scaled).
template <typename T, bool MOM>
void load_chunk(const Ctx<T>& cx, Work<T>& w, int64_t begin, int64_t h, int64_t t0, int64_t Lc) {
  const int64_t H = cx.H, Dk = cx.Dk, Dv = cx.Dv;
  const T scale = cx.cf.scale;
  for (int64_t t = 0; t < Lc; ++t) {
    const int64_t row = (begin + t0 + t) * H + h;
    const T* qs = cx.q + row * Dk;
    const T* ks = cx.k + row * Dk;
    const T* vs = cx.v + row * Dv;
    T* qd = w.Qc.data() + t * Dk;
    T* kd = w.Kc.data() + t * Dk;
    T* vd = w.Vc.data() + t * Dv;
    for (int64_t i = 0; i < Dk; ++i) {
      qd[i] = scale * qs[i];
      kd[i] = ks[i];
    }
    for (int64_t j = 0; j < Dv; ++j) vd[j] = vs[j];
    w.lr[t] = cx.lr[row];
    w.al[t] = cx.alpha[row];
    w.be[t] = MOM ? cx.mom[row] : T(0);
    w.ga[t] = cx.rp ? cx.rp[row] : cx.cf.ret_param;
    w.bpv[t] = cx.bp ? cx.bp[row] : cx.cf.bias_param;
  }
}

// E = K W_A - V, sumsq, Psi = psi(E), Pst = lr * Psi for the chunk's Lc tokens.
template <typename T>
void prep_chunk(const Ctx<T>& cx, Work<T>& w, int64_t Lc) {
  const int64_t Dk = cx.Dk, Dv = cx.Dv;
  const Cfg<T>& cf = cx.cf;
  const bool dot = bias_psi_uses_v(cf.bias);
  if (!dot) {
    gemm_nn<T>(Lc, Dv, Dk, w.Kc.data(), Dk, w.WA.data(), Dv, w.E.data(), Dv, false);
    for (int64_t t = 0; t < Lc; ++t) {
      T* e = w.E.data() + t * Dv;
      const T* v = w.Vc.data() + t * Dv;
      T s = T(0);
      for (int64_t j = 0; j < Dv; ++j) {
        e[j] -= v[j];
        s += e[j] * e[j];
      }
      w.sumsq[t] = s;
    }
  }
  for (int64_t t = 0; t < Lc; ++t) {
    const BiasArgs<T> b{cf.bias, cf.p, cf.eps, w.bpv[t]};
    T* psi = w.Psi.data() + t * Dv;
    T* pst = w.Pst.data() + t * Dv;
    psi_row(b, w.E.data() + t * Dv, w.Vc.data() + t * Dv, w.sumsq[t], psi, Dv);
    const T lr = w.lr[t];
    for (int64_t j = 0; j < Dv; ++j) pst[j] = lr * psi[j];
  }
}

// ---- one token forward ---------------------------------------------------------------------------
// Xout = step(a Xin + U), U = P (momentum: Pout = b Pin - k^T pst) or -k^T pst; o = q~ phi(Xout).
// Xin may equal Xout and Pin may equal Pout (in place). aux receives the read map's per-token
// values (kl: m, s, o; lq: q~X, n, inv). tmp needs 2 Dv.
template <typename T, int RET, bool MOM>
inline void token_fwd(const Cfg<T>& cf, int64_t Dk, int64_t Dv, const T* Xin, T* Xout,
                      const T* Pin, T* Pout, const T* MIRAS_RESTRICT kt,
                      const T* MIRAS_RESTRICT pst, const T* MIRAS_RESTRICT qt, T a, T b, T g,
                      T* MIRAS_RESTRICT o, T* MIRAS_RESTRICT aux, T* MIRAS_RESTRICT tmp) {
  constexpr bool EL = RET == kRetElasticNet;
  if constexpr (RET == kRetL2 || RET == kRetElasticNet) {
    // Identity read map: the update and the read share one pass over X. Columns go in blocks of
    // two SIMD vectors with o and psi~ held in registers across the rows.
    typedef typename Vec<T>::type V;
    constexpr int W = Vec<T>::W;
    int64_t j0 = 0;
    for (; j0 + 2 * W <= Dv; j0 += 2 * W) {
      V o0 = V{}, o1 = V{};
      const V s0 = *(const V*)(pst + j0), s1 = *(const V*)(pst + j0 + W);
      for (int64_t i = 0; i < Dk; ++i) {
        const T* xi = Xin + i * Dv + j0;
        T* xo = Xout + i * Dv + j0;
        const V kv = V{} - kt[i], qv = V{} + qt[i];
        V u0 = kv * s0, u1 = kv * s1;
        if constexpr (MOM) {
          const T* pi = Pin + i * Dv + j0;
          T* po = Pout + i * Dv + j0;
          u0 += b * *(const V*)pi;
          u1 += b * *(const V*)(pi + W);
          *(V*)po = u0;
          *(V*)(po + W) = u1;
        }
        V z0 = a * *(const V*)xi + u0, z1 = a * *(const V*)(xi + W) + u1;
        if constexpr (EL) {
          // soft threshold as z - clamp(z, -g, g) (min/max, no blends of three cases)
          V c0 = z0 < -g ? V{} - g : z0, c1 = z1 < -g ? V{} - g : z1;
          c0 = c0 > g ? V{} + g : c0;
          c1 = c1 > g ? V{} + g : c1;
          z0 -= c0;
          z1 -= c1;
        }
        *(V*)xo = z0;
        *(V*)(xo + W) = z1;
        o0 += qv * z0;
        o1 += qv * z1;
      }
      *(V*)(o + j0) = o0;
      *(V*)(o + j0 + W) = o1;
    }
    for (int64_t j = j0; j < Dv; ++j) {
      T oj = T(0);
      for (int64_t i = 0; i < Dk; ++i) {
        T u = -kt[i] * pst[j];
        if constexpr (MOM) {
          u += b * Pin[i * Dv + j];
          Pout[i * Dv + j] = u;
        }
        T z = a * Xin[i * Dv + j] + u;
        if (EL) z = soft_threshold(z, g);
        Xout[i * Dv + j] = z;
        oj += qt[i] * z;
      }
      o[j] = oj;
    }
  } else {
    // kl: m = running column max; lq: tmp = per-lane sum |x|^q, aux = q~ X.
    T* m = aux;
    T* s = aux + Dv;
    T* ov = aux + 2 * Dv;
    for (int64_t j = 0; j < Dv; ++j) {
      if (RET == kRetKL) m[j] = -std::numeric_limits<T>::infinity();
      else { tmp[j] = T(0); aux[j] = T(0); }
    }
    for (int64_t i = 0; i < Dk; ++i) {
      const T* xi = Xin + i * Dv;
      T* xo = Xout + i * Dv;
      const T ki = -kt[i];
      if constexpr (MOM) {
        const T* pi = Pin + i * Dv;
        T* po = Pout + i * Dv;
        for (int64_t j = 0; j < Dv; ++j) {
          const T pj = b * pi[j] + ki * pst[j];
          po[j] = pj;
          xo[j] = a * xi[j] + pj;
        }
      } else {
        for (int64_t j = 0; j < Dv; ++j) xo[j] = a * xi[j] + ki * pst[j];
      }
      if constexpr (RET == kRetKL) {
        for (int64_t j = 0; j < Dv; ++j) m[j] = std::max(m[j], xo[j]);
      } else {
        const T qi = qt[i];
        for (int64_t j = 0; j < Dv; ++j) aux[j] += qi * xo[j];
        lq_acc_row(xo, tmp, Dv, cf.qn, cf.qmode);
      }
    }
    if constexpr (RET == kRetKL) {
      for (int64_t j = 0; j < Dv; ++j) {
        s[j] = T(0);
        tmp[j] = T(0);
      }
      T* ex = tmp + Dv;  // tmp holds 2 Dv
      for (int64_t i = 0; i < Dk; ++i) {
        const T* xo = Xout + i * Dv;
        const T qi = qt[i];
        kl_exp_row(xo, m, ex, Dv);
        for (int64_t j = 0; j < Dv; ++j) {
          s[j] += ex[j];
          tmp[j] += qi * ex[j];
        }
      }
      for (int64_t j = 0; j < Dv; ++j) {
        o[j] = cf.c * tmp[j] / s[j];
        ov[j] = o[j];
      }
    } else {
      T sum = T(0);
      for (int64_t j = 0; j < Dv; ++j) sum += tmp[j];
      const T n = lq_norm(sum, Xout, Dk * Dv, cf.qn);
      const T inv = lq_inv_scale(n, cf.qn, cf.eps_q);
      for (int64_t j = 0; j < Dv; ++j) o[j] = inv * aux[j];
      aux[Dv] = n;
      aux[Dv + 1] = inv;
    }
  }
  (void)g;
  (void)b;
}

// Calls f.template operator()<T, RET, MOM>() for the runtime (dtype handled by the caller),
// retention and momentum flags.
template <typename T, typename F>
void dispatch_ret(int ret, bool mom, F&& f) {
  switch (ret) {
    case kRetL2: mom ? f.template run<T, kRetL2, true>() : f.template run<T, kRetL2, false>(); break;
    case kRetKL: mom ? f.template run<T, kRetKL, true>() : f.template run<T, kRetKL, false>(); break;
    case kRetElasticNet:
      mom ? f.template run<T, kRetElasticNet, true>() : f.template run<T, kRetElasticNet, false>();
      break;
    case kRetLq: mom ? f.template run<T, kRetLq, true>() : f.template run<T, kRetLq, false>(); break;
    default: break;
  }
}

// Forward scan of one (sequence, head). Saves the chunk-start states to saveX/saveP (chunk c at
// offset c * save_stride) when non-null; writes o / XT / PT / AT when the pointers are non-null
// (o rows at their token positions; final states at state_off(n, h)).
template <typename T, int RET, bool MOM>
void fwd_seq(const Ctx<T>& cx, Work<T>& w, int64_t n, int64_t h, T* saveX, T* saveP,
             int64_t save_stride, T* o_out, T* XT, T* PT, T* AT) {
  const int64_t Dk = cx.Dk, Dv = cx.Dv, DkDv = Dk * Dv, C = cx.cf.C;
  const int64_t begin = cx.begin(n), L = cx.len(n), off = cx.state_off(n, h);
  T* X = w.X.data();
  T* P = w.P.data();
  if (cx.X0) std::memcpy(X, cx.X0 + off, sizeof(T) * DkDv);
  else std::fill(X, X + DkDv, T(0));
  if (MOM) {
    if (cx.P0) std::memcpy(P, cx.P0 + off, sizeof(T) * DkDv);
    else std::fill(P, P + DkDv, T(0));
  }
  const int64_t nch = num_chunks(L, C);
  for (int64_t c = 0; c < nch; ++c) {
    const int64_t t0 = c * C, Lc = std::min(C, L - t0);
    if (saveX) std::memcpy(saveX + c * save_stride, X, sizeof(T) * DkDv);
    if (MOM && saveP) std::memcpy(saveP + c * save_stride, P, sizeof(T) * DkDv);
    const T* anchor = (c == 0 && cx.A0) ? cx.A0 + off : X;
    std::memcpy(w.Ar.data(), anchor, sizeof(T) * DkDv);
    phi_full<T, RET>(cx.cf, Dk, Dv, w.Ar.data(), w.WA.data(), w.tmp.data(), &w.anc_n, &w.anc_inv);
    load_chunk<T, MOM>(cx, w, begin, h, t0, Lc);
    prep_chunk<T>(cx, w, Lc);
    if constexpr (RET == kRetKL || RET == kRetLq) {
      if (cx.cf.chunk_map) {
        // SPEC §5b: the tokens read R_t = gam_t R0 + D_t with R0 = phi(Xs) = WA, where D (from 0)
        // follows the l2 recurrence D_t = alpha_t D_{t-1} + U_t; the raw state (same gates, same
        // updates) leaves the chunk as X_end = gam_L Xs + D_end. Carrying D rather than R keeps X
        // exact where it is small next to R (no R_end - gam_L R0 cancellation). Xs is Ar here.
        T* D = w.R.data();
        std::fill(D, D + DkDv, T(0));
        const T* R0 = w.WA.data();
        T g = T(1);
        for (int64_t t = 0; t < Lc; ++t) {
          T* orow = o_out ? o_out + ((begin + t0 + t) * cx.H + h) * Dv : w.o.data();
          const T* qt = w.Qc.data() + t * Dk;
          token_fwd<T, kRetL2, MOM>(cx.cf, Dk, Dv, D, D, P, P, w.Kc.data() + t * Dk, w.Pst.data() + t * Dv, qt,
                                    w.al[t], w.be[t], w.ga[t], orow, w.aux.data(), w.tmp.data());
          g *= w.al[t];
          for (int64_t i = 0; i < Dk; ++i) {  // o_t += gam_t q~_t R0
            const T qi = g * qt[i];
            const T* r = R0 + i * Dv;
            for (int64_t j = 0; j < Dv; ++j) orow[j] += qi * r[j];
          }
        }
        const T* Xs = w.Ar.data();
        for (int64_t e = 0; e < DkDv; ++e) X[e] = g * Xs[e] + D[e];
        continue;
      }
    }
    for (int64_t t = 0; t < Lc; ++t) {
      T* orow = o_out ? o_out + ((begin + t0 + t) * cx.H + h) * Dv : w.o.data();
      token_fwd<T, RET, MOM>(cx.cf, Dk, Dv, X, X, P, P, w.Kc.data() + t * Dk,
                             w.Pst.data() + t * Dv, w.Qc.data() + t * Dk, w.al[t], w.be[t],
                             w.ga[t], orow, w.aux.data(), w.tmp.data());
    }
  }
  if (XT) std::memcpy(XT + off, X, sizeof(T) * DkDv);
  if (MOM && PT) std::memcpy(PT + off, P, sizeof(T) * DkDv);
  if (AT) {
    const T* a;
    if (L == 0) a = cx.A0 ? cx.A0 + off : X;
    else a = (L % C != 0) ? w.Ar.data() : X;
    std::memcpy(AT + off, a, sizeof(T) * DkDv);
  }
}


// ---- one token backward ----------------------------------------------------------------------
// In: dX = dL/dX_t, dP = dL/dP_t (momentum) from later tokens; Xt/Xp = X_t, X_{t-1}; Pt/Pp the
// momentum states; aux the read map's per-token values from token_fwd; dot = dL/do_t.
// Out: dX = dL/dX_{t-1}, dP = dL/dP_{t-1}; dq (Dk, scaled back to q), dks = the scan's part of
// dk_t (sum_j dG~_ij psi~_j), dpst = dL/dpsi~_t; *dal, *dbe, *dga gate gradients.
template <typename T, int RET, bool MOM>
inline void token_bwd(const Cfg<T>& cf, int64_t Dk, int64_t Dv, const T* MIRAS_RESTRICT Xt,
                      const T* MIRAS_RESTRICT Xp, const T* MIRAS_RESTRICT Pt,
                      const T* MIRAS_RESTRICT Pp, T* MIRAS_RESTRICT dX, T* MIRAS_RESTRICT dP,
                      const T* MIRAS_RESTRICT kt, const T* MIRAS_RESTRICT qt,
                      const T* MIRAS_RESTRICT pst, const T* MIRAS_RESTRICT dot, T a, T b, T g,
                      const T* MIRAS_RESTRICT aux, T* MIRAS_RESTRICT dq, T* MIRAS_RESTRICT dks,
                      T* MIRAS_RESTRICT dpst, T* dal, T* dbe, T* dga, T* MIRAS_RESTRICT tmp,
                      T* MIRAS_RESTRICT tmp2) {
  constexpr bool EL = RET == kRetElasticNet;
  const T scale = cf.scale;
  for (int64_t j = 0; j < Dv; ++j) dpst[j] = T(0);
  T dalpha = T(0), dbeta = T(0), dgam = T(0);
  T inv = T(1), coef = T(0), rn = T(0);
  if constexpr (RET == kRetLq) {
    const T* qx = aux;
    const T n = aux[Dv];
    inv = aux[Dv + 1];
    if (n > cf.eps_q) {
      T dwx = T(0);  // <dW, X_t> with dW = q~^T do
      for (int64_t j = 0; j < Dv; ++j) dwx += dot[j] * qx[j];
      coef = lq_vjp_coef(dwx, n, inv, cf.qn);  // times sign(x)(|x|/n)^(q-1)
      rn = T(1) / n;
    }
  }
  if constexpr (RET == kRetKL) {
    // tmp2[j] = o_j / c = sum_i q~_i softmax_ij: the column term of the softmax VJP
    // dZ_ij = W_ij do_j (q~_i - o_j / c). Written as a difference of q~ values (not as
    // q~_i do_j - do_j o_j / c, which an FMA contracts into exact - rounded): where the softmax
    // saturates, q~_i - o_j / c is exactly 0 as the exact VJP is, instead of a residue ~u|q~ do|
    // that d alpha = <X, dZ> multiplies by the (large) logits.
    const T* ov = aux + 2 * Dv;
    for (int64_t j = 0; j < Dv; ++j) tmp2[j] = ov[j] / cf.c;
  }
  int64_t i_start = 0;
  if constexpr ((RET == kRetL2 || RET == kRetElasticNet) && !MOM) {
    // identity read map, no momentum: two rows per pass share the loads of do, psi~ and dpsi~.
    // X_t is rebuilt from X_{t-1} (one stream fewer): X_t = step(a X_{t-1} - k psi~).
    for (; i_start + 2 <= Dk; i_start += 2) {
      const int64_t i = i_start;
      const T* xp0 = Xp + i * Dv;
      const T* xp1 = xp0 + Dv;
      T* dx0 = dX + i * Dv;
      T* dx1 = dx0 + Dv;
      const T q0 = qt[i], q1 = qt[i + 1], k0 = kt[i], k1 = kt[i + 1];
      T dq0 = T(0), dq1 = T(0), dk0 = T(0), dk1 = T(0);
MIRAS_SIMD_REDUCE(dq0, dq1, dk0, dk1, dalpha, dgam)
      for (int64_t j = 0; j < Dv; ++j) {
        const T dj = dot[j], pj = pst[j];
        const T z0 = a * xp0[j] - k0 * pj, z1 = a * xp1[j] - k1 * pj;
        T g0 = dx0[j] + q0 * dj, g1 = dx1[j] + q1 * dj;
        if (EL) {
          const T up0 = z0 > g ? T(1) : T(0), dn0 = z0 < -g ? T(1) : T(0);
          const T up1 = z1 > g ? T(1) : T(0), dn1 = z1 < -g ? T(1) : T(0);
          dq0 += dj * (up0 * (z0 - g) + dn0 * (z0 + g));
          dq1 += dj * (up1 * (z1 - g) + dn1 * (z1 + g));
          g0 *= up0 + dn0;
          g1 *= up1 + dn1;
          dgam += (dn0 - up0) * g0 + (dn1 - up1) * g1;
        } else {
          dq0 += dj * z0;
          dq1 += dj * z1;
        }
        dalpha += xp0[j] * g0 + xp1[j] * g1;
        dk0 -= g0 * pj;
        dk1 -= g1 * pj;
        dpst[j] -= k0 * g0 + k1 * g1;
        dx0[j] = a * g0;
        dx1[j] = a * g1;
      }
      dq[i] = scale * dq0;
      dq[i + 1] = scale * dq1;
      dks[i] = dk0;
      dks[i + 1] = dk1;
    }
  }
  for (int64_t i = i_start; i < Dk; ++i) {
    const T* x = Xt + i * Dv;
    const T* xp = Xp + i * Dv;
    T* dx = dX + i * Dv;
    const T qi = qt[i], ki = kt[i];
    // g = dL/dX_t[i,:] including this token's read: tmp
    T dqi = T(0);
    if constexpr (RET == kRetKL) {
      const T* m = aux;
      const T* s = aux + Dv;
      kl_exp_row(x, m, tmp, Dv);
      for (int64_t j = 0; j < Dv; ++j) tmp[j] = cf.c * tmp[j] / s[j];  // W_t row
MIRAS_SIMD_REDUCE(dqi)
      for (int64_t j = 0; j < Dv; ++j) {
        const T wv = tmp[j];
        dqi += dot[j] * wv;
        tmp[j] = dx[j] + wv * dot[j] * (qi - tmp2[j]);
      }
      dq[i] = scale * dqi;
    } else if constexpr (RET == kRetLq) {
      if (coef != T(0)) {
        if (cf.qmode == 4) {
MIRAS_SIMD_REDUCE(dqi)
          for (int64_t j = 0; j < Dv; ++j) {
            dqi += dot[j] * x[j];
            const T y = x[j] * rn;
            tmp[j] = dx[j] + qi * inv * dot[j] - coef * (y * y * y);
          }
        } else {
          for (int64_t j = 0; j < Dv; ++j) {
            dqi += dot[j] * x[j];
            tmp[j] = dx[j] + qi * inv * dot[j] - coef * lq_sgnpow(x[j] * rn, cf.qn, cf.qmode);
          }
        }
      } else {
MIRAS_SIMD_REDUCE(dqi)
        for (int64_t j = 0; j < Dv; ++j) {
          dqi += dot[j] * x[j];
          tmp[j] = dx[j] + qi * inv * dot[j];
        }
      }
      dq[i] = scale * inv * dqi;
    } else if constexpr (!MOM) {
      // identity read map, no momentum: one fused pass over the row
      T dki = T(0);
MIRAS_SIMD_REDUCE(dqi, dalpha, dgam, dki)
      for (int64_t j = 0; j < Dv; ++j) {
        dqi += dot[j] * x[j];
        T gz = dx[j] + qi * dot[j];
        if (EL) {
          const T z = a * xp[j] - ki * pst[j];
          const T up = z > g ? T(1) : T(0), dn = z < -g ? T(1) : T(0);  // branch-free mask
          gz *= up + dn;
          dgam += (dn - up) * gz;
        }
        dalpha += xp[j] * gz;
        dki -= gz * pst[j];
        dpst[j] -= ki * gz;
        dx[j] = a * gz;
      }
      dq[i] = scale * dqi;
      dks[i] = dki;
      continue;
    } else {
MIRAS_SIMD_REDUCE(dqi)
      for (int64_t j = 0; j < Dv; ++j) {
        dqi += dot[j] * x[j];
        tmp[j] = dx[j] + qi * dot[j];
      }
      dq[i] = scale * dqi;
    }
    // step VJP, gates, G~ = k^T psi~
    T dki = T(0);
    if constexpr (MOM) {
      const T* pt = Pt + i * Dv;
      const T* pp = Pp + i * Dv;
      T* dp = dP + i * Dv;
MIRAS_SIMD_REDUCE(dalpha, dbeta, dgam, dki)
      for (int64_t j = 0; j < Dv; ++j) {
        T gz = tmp[j];
        if (EL) {
          const T z = a * xp[j] + pt[j];
          const T up = z > g ? T(1) : T(0), dn = z < -g ? T(1) : T(0);  // branch-free mask
          gz *= up + dn;
          dgam += (dn - up) * gz;
        }
        dalpha += xp[j] * gz;
        const T dpn = dp[j] + gz;
        dbeta += pp[j] * dpn;
        dki -= dpn * pst[j];
        dpst[j] -= ki * dpn;
        dp[j] = b * dpn;
        dx[j] = a * gz;
      }
    } else {
MIRAS_SIMD_REDUCE(dalpha, dgam, dki)
      for (int64_t j = 0; j < Dv; ++j) {
        T gz = tmp[j];
        if (EL) {
          const T z = a * xp[j] - ki * pst[j];
          const T up = z > g ? T(1) : T(0), dn = z < -g ? T(1) : T(0);  // branch-free mask
          gz *= up + dn;
          dgam += (dn - up) * gz;
        }
        dalpha += xp[j] * gz;
        dki -= gz * pst[j];
        dpst[j] -= ki * gz;
        dx[j] = a * gz;
      }
    }
    dks[i] = dki;
  }
  *dal = dalpha;
  *dbe = dbeta;
  *dga = dgam;
  (void)b;
  (void)g;
  (void)Pt;
  (void)Pp;
  (void)dP;
}

// ---- the backward's recompute of a chunk ------------------------------------------------------------
// Walks a chunk's Lc tokens backwards in segments of S tokens, recomputing their states from the
// chunk start (Xst, Pst: Sz entries each) and never inverting a step: when there is more than one
// segment, a first pass stores the states at the segment starts (ck / ckP, advancing Xcur / Pcur);
// then each segment, last first, is recomputed into Xs / Ps (S + 1 states: slot s is the state
// before the segment's token s) and handed to walk(ts, len). advance(t, s, Xin, Xout, Pin, Pout)
// runs token t's forward step (s = its slot in the segment, or -1 in the checkpoint pass, where
// only the states are wanted).
template <typename T, bool MOM, typename Advance, typename Walk>
void recompute_segments(int64_t Lc, int64_t S, int64_t Sz, const T* Xst, const T* Pst, T* Xcur, T* Pcur,
                        T* ck, T* ckP, T* Xs, T* Ps, Advance&& advance, Walk&& walk) {
  const int64_t nseg = (Lc + S - 1) / S;
  const size_t bytes = sizeof(T) * size_t(Sz);
  if (nseg > 1) {  // checkpoints at segment starts (segment 0 starts at Xst)
    std::memcpy(Xcur, Xst, bytes);
    if (MOM) std::memcpy(Pcur, Pst, bytes);
    for (int64_t t = 0; t < (nseg - 1) * S; ++t) {
      advance(t, int64_t(-1), Xcur, Xcur, MOM ? Pcur : nullptr, MOM ? Pcur : nullptr);
      if ((t + 1) % S == 0) {
        const int64_t sg = (t + 1) / S;
        std::memcpy(ck + sg * Sz, Xcur, bytes);
        if (MOM) std::memcpy(ckP + sg * Sz, Pcur, bytes);
      }
    }
  }
  for (int64_t sg = nseg - 1; sg >= 0; --sg) {
    const int64_t ts = sg * S, len = std::min(S, Lc - ts);
    std::memcpy(Xs, sg == 0 ? Xst : ck + sg * Sz, bytes);
    if (MOM) std::memcpy(Ps, sg == 0 ? Pst : ckP + sg * Sz, bytes);
    for (int64_t s = 0; s < len; ++s)
      advance(ts + s, s, Xs + s * Sz, Xs + (s + 1) * Sz, MOM ? Ps + s * Sz : nullptr,
              MOM ? Ps + (s + 1) * Sz : nullptr);
    walk(ts, len);
  }
}

template <typename T>
struct BwdOut {
  const T* dO;
  const T *dXT, *dPT;
  T *dq, *dk, *dv, *dlr, *dalpha, *dmom, *dbp, *drp, *dX0, *dP0, *dA0;
};

// Dual-form backward of retention l2 (bwd_seq_l2_dual, L2DualWork).
#include "chunk_l2_dual.h"

// Extra per-thread buffers of the backward.
template <typename T>
struct BWork {
  int64_t S = 1, nseg_max = 1;
  std::vector<T> dX, dP, dWA, WAt, Kt, dE, dKc, dVc, dpst, dpsi, Xcur, Pcur, ck, ckP, Xs, Ps,
      auxs, starts, startsP, ddum;
  L2DualWork<T> dual;
  // dual: only the dual-form workspace (and the recomputed chunk starts) is allocated.
  void init(int64_t Cb, int64_t Dk, int64_t Dv, int64_t S_, bool mom, int64_t nstart,
            bool dual_form = false) {
    const size_t DkDv = size_t(Dk) * size_t(Dv);
    if (dual_form) {
      dual.init(Cb, Dk, Dv, mom);
      if (nstart > 0) {
        starts.assign(size_t(nstart) * DkDv, T(0));
        if (mom) startsP.assign(size_t(nstart) * DkDv, T(0));
      }
      return;
    }
    S = S_;
    nseg_max = (Cb + S - 1) / S;
    dX.assign(DkDv, T(0));
    dWA.assign(DkDv, T(0));
    WAt.assign(DkDv, T(0));
    Kt.assign(size_t(Cb) * Dk, T(0));
    dE.assign(size_t(Cb) * Dv, T(0));
    dKc.assign(size_t(Cb) * Dk, T(0));
    dVc.assign(size_t(Cb) * Dv, T(0));
    dpst.assign(Dv, T(0));
    dpsi.assign(Dv, T(0));
    Xcur.assign(DkDv, T(0));
    ck.assign(size_t(nseg_max) * DkDv, T(0));
    Xs.assign(size_t(S + 1) * DkDv, T(0));
    auxs.assign(size_t(S) * Work<T>::aux_width(Dv), T(0));
    ddum.assign(Dk, T(0));
    if (mom) {
      dP.assign(DkDv, T(0));
      Pcur.assign(DkDv, T(0));
      ckP.assign(size_t(nseg_max) * DkDv, T(0));
      Ps.assign(size_t(S + 1) * DkDv, T(0));
    }
    if (nstart > 0) {
      starts.assign(size_t(nstart) * DkDv, T(0));
      if (mom) startsP.assign(size_t(nstart) * DkDv, T(0));
    }
  }
};

template <typename T, int RET, bool MOM>
void bwd_seq(const Ctx<T>& cx, Work<T>& w, BWork<T>& bw, const BwdOut<T>& out, int64_t n,
             int64_t h, const T* startX, const T* startP, int64_t start_stride) {
  if constexpr (RET == kRetL2) {
    if (!bw.dual.dW.empty()) {  // the dual form (BWork initialised for it)
      bwd_seq_l2_dual<T, MOM>(cx, w, bw.dual, out, n, h, startX, startP, start_stride);
      return;
    }
  }
  if constexpr (RET == kRetKL || RET == kRetLq) {
    if (cx.cf.chunk_map) {  // map_schedule="chunk": the l2 dual form from phi(Xs) per chunk
      bwd_seq_l2_dual<T, MOM, RET>(cx, w, bw.dual, out, n, h, startX, startP, start_stride);
      return;
    }
  }
  const Cfg<T>& cf = cx.cf;
  const int64_t H = cx.H, Dk = cx.Dk, Dv = cx.Dv, DkDv = Dk * Dv, C = cf.C;
  const int64_t begin = cx.begin(n), L = cx.len(n), off = cx.state_off(n, h);
  const int64_t AW = Work<T>::aux_width(Dv);
  const bool dot_bias = bias_psi_uses_v(cf.bias);
  T* dX = bw.dX.data();
  T* dP = MOM ? bw.dP.data() : nullptr;
  if (out.dXT) std::memcpy(dX, out.dXT + off, sizeof(T) * DkDv);
  else std::fill(dX, dX + DkDv, T(0));
  if (MOM) {
    if (out.dPT) std::memcpy(dP, out.dPT + off, sizeof(T) * DkDv);
    else std::fill(dP, dP + DkDv, T(0));
  }
  std::vector<T> zeros;  // only when X0 / P0 are null and there is a chunk 0
  const int64_t nch = num_chunks(L, C);
  bool a0_written = false;
  for (int64_t c = nch - 1; c >= 0; --c) {
    const int64_t t0 = c * C, Lc = std::min(C, L - t0);
    // chunk start state
    const T* Xst;
    const T* Pst0 = nullptr;
    if (c == 0) {
      if (!cx.X0 || (MOM && !cx.P0)) {
        if (zeros.empty()) zeros.assign(DkDv, T(0));
      }
      Xst = cx.X0 ? cx.X0 + off : zeros.data();
      if (MOM) Pst0 = cx.P0 ? cx.P0 + off : zeros.data();
    } else {
      Xst = startX + c * start_stride;
      if (MOM) Pst0 = startP + c * start_stride;
    }
    const bool a0 = (c == 0 && cx.A0);
    const T* anchor = a0 ? cx.A0 + off : Xst;
    phi_full<T, RET>(cf, Dk, Dv, anchor, w.WA.data(), w.tmp.data(), &w.anc_n, &w.anc_inv);
    load_chunk<T, MOM>(cx, w, begin, h, t0, Lc);
    prep_chunk<T>(cx, w, Lc);
    for (int64_t e = 0; e < Lc * Dv; ++e) bw.dVc[e] = T(0);

    T* Xs = bw.Xs.data();
    T* Ps = MOM ? bw.Ps.data() : nullptr;
    auto advance = [&](int64_t t, int64_t s, const T* Xi, T* Xo, const T* Pi, T* Po) {
      token_fwd<T, RET, MOM>(cf, Dk, Dv, Xi, Xo, Pi, Po, w.Kc.data() + t * Dk, w.Pst.data() + t * Dv,
                             w.Qc.data() + t * Dk, w.al[t], w.be[t], w.ga[t], w.o.data(),
                             s < 0 ? w.aux.data() : bw.auxs.data() + s * AW, w.tmp.data());
    };
    auto walk = [&](int64_t ts, int64_t len) {
      for (int64_t s = len - 1; s >= 0; --s) {
        const int64_t t = ts + s;
        const int64_t row = (begin + t0 + t) * H + h;
        T dal, dbe, dga;
        token_bwd<T, RET, MOM>(
            cf, Dk, Dv, Xs + (s + 1) * DkDv, Xs + s * DkDv, MOM ? Ps + (s + 1) * DkDv : nullptr,
            MOM ? Ps + s * DkDv : nullptr, dX, dP, w.Kc.data() + t * Dk, w.Qc.data() + t * Dk,
            w.Pst.data() + t * Dv, out.dO + row * Dv, w.al[t], w.be[t], w.ga[t],
            bw.auxs.data() + s * AW, out.dq + row * Dk, bw.dKc.data() + t * Dk, bw.dpst.data(),
            &dal, &dbe, &dga, w.tmp.data(), w.tmp2.data());
        // psi~ = lr psi -> dlr, dpsi; then the bias VJP
        const T* psi = w.Psi.data() + t * Dv;
        const T lr = w.lr[t];
        T dlr = T(0);
        for (int64_t j = 0; j < Dv; ++j) {
          dlr += bw.dpst[j] * psi[j];
          bw.dpsi[j] = lr * bw.dpst[j];
        }
        T dparam = T(0);
        if (dot_bias) {
          T* dv = bw.dVc.data() + t * Dv;
          for (int64_t j = 0; j < Dv; ++j) dv[j] -= bw.dpsi[j];
        } else {
          const BiasArgs<T> ba{cf.bias, cf.p, cf.eps, w.bpv[t]};
          dparam = bias_vjp_row(ba, w.E.data() + t * Dv, bw.dpsi.data(), w.sumsq[t],
                                bw.dE.data() + t * Dv, Dv);
        }
        out.dlr[row] = dlr;
        out.dalpha[row] = dal;
        if (MOM && out.dmom) out.dmom[row] = dbe;
        if (out.drp) out.drp[row] = dga;
        if (out.dbp) out.dbp[row] = bias_has_param(cf.bias) ? dparam : T(0);
      }
    };
    recompute_segments<T, MOM>(Lc, bw.S, DkDv, Xst, Pst0, bw.Xcur.data(), MOM ? bw.Pcur.data() : nullptr,
                               bw.ck.data(), MOM ? bw.ckP.data() : nullptr, Xs, Ps, advance, walk);
    // e = k W_A - v: dk += dE W_A^T, dv -= dE, dW_A = K^T dE, then the anchor's read-map VJP
    if (!dot_bias) {
      for (int64_t e = 0; e < Lc * Dv; ++e) bw.dVc[e] -= bw.dE[e];
      transpose(Dk, Dv, w.WA.data(), bw.WAt.data());
      gemm_nn<T>(Lc, Dk, Dv, bw.dE.data(), Dv, bw.WAt.data(), Dk, bw.dKc.data(), Dk, true);
      transpose(Lc, Dk, w.Kc.data(), bw.Kt.data());
      gemm_nn<T>(Dk, Dv, Lc, bw.Kt.data(), Lc, bw.dE.data(), Dv, bw.dWA.data(), Dv, false);
      T* target = dX;
      if (a0) {
        target = out.dA0 ? out.dA0 + off : nullptr;
        if (target) std::fill(target, target + DkDv, T(0));
        a0_written = true;
      }
      if (target)
        phi_vjp_full<T, RET>(cf, Dk, Dv, anchor, w.WA.data(), bw.dWA.data(), w.anc_n, w.anc_inv,
                             target, w.tmp.data());
    }
    for (int64_t t = 0; t < Lc; ++t) {
      const int64_t row = (begin + t0 + t) * H + h;
      std::memcpy(out.dk + row * Dk, bw.dKc.data() + t * Dk, sizeof(T) * Dk);
      std::memcpy(out.dv + row * Dv, bw.dVc.data() + t * Dv, sizeof(T) * Dv);
    }
  }
  if (out.dX0) std::memcpy(out.dX0 + off, dX, sizeof(T) * DkDv);
  if (MOM && out.dP0) std::memcpy(out.dP0 + off, dP, sizeof(T) * DkDv);
  if (cx.A0 && out.dA0 && !a0_written) std::fill(out.dA0 + off, out.dA0 + off + DkDv, T(0));
}

// Threads only for calls with enough work: a decoding step or a tiny call is faster on the calling
// thread than a parallel region's fork/join (and, on a busy machine, than waiting for a second core).
inline bool worth_threads(const ChunkFwdParams& f, int64_t ntask, int64_t Sz) {
  const int64_t tokens = f.cu_seqlens ? f.T : f.N * f.T;
  return ntask > 1 && tokens * f.H * Sz >= (int64_t(1) << 16);
}

// Offset of sequence n, head h's first saved chunk-start state in chunk_X / chunk_P (layout
// [slot, H, Sz], params.h), for states of Sz elements (linear: Dk*Dv; MLP: both matrices).
inline int64_t saved_offset(const ChunkFwdParams& f, int64_t n, int64_t h, int64_t C, int64_t Sz) {
  return (chunk_base(f.cu_seqlens, n, f.T, C) * f.H + h) * Sz;
}

struct FwdRunner {
  const ChunkFwdParams& p;
  template <typename T, int RET, bool MOM>
  void run() {
    const Ctx<T> cx = make_ctx<T>(p);
    const int64_t H = p.H, DkDv = p.Dk * p.Dv;
    const int64_t Cb = std::max<int64_t>(1, std::min(cx.cf.C, cx.lmax));
    T* chunk_X = static_cast<T*>(p.chunk_X);
    T* chunk_P = MOM ? static_cast<T*>(p.chunk_P) : nullptr;
    T* o = static_cast<T*>(p.o);
    T* XT = static_cast<T*>(p.XT);
    T* PT = static_cast<T*>(p.PT);
    T* AT = static_cast<T*>(p.AT);
    const int64_t ntask = p.N * H;
    const bool par = worth_threads(p, ntask, p.Dk * p.Dv);
#ifdef _OPENMP
#pragma omp parallel if (par)
#endif
    {
      Work<T> w;
      w.init(Cb, p.Dk, p.Dv);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
      for (int64_t task = 0; task < ntask; ++task) {
        const int64_t n = task / H, h = task % H;
        T* sx = nullptr;
        T* sp = nullptr;
        if (chunk_X || chunk_P) {
          const int64_t off = saved_offset(p, n, h, cx.cf.C, DkDv);
          if (chunk_X) sx = chunk_X + off;
          if (chunk_P) sp = chunk_P + off;
        }
        fwd_seq<T, RET, MOM>(cx, w, n, h, sx, sp, H * DkDv, o, XT, PT, AT);
      }
    }
  }
};

inline int64_t seg_budget() {
  static const int64_t b = [] {
    const char* e = std::getenv("MIRAS_CPU_SEG_KB");
    return (e ? std::atoll(e) : 1536) << 10;
  }();
  return b;
}

struct BwdRunner {
  const ChunkBwdParams& p;
  template <typename T, int RET, bool MOM>
  void run() {
    const ChunkFwdParams& f = p.fwd;
    const Ctx<T> cx = make_ctx<T>(f);
    const int64_t H = f.H, Dk = f.Dk, Dv = f.Dv, DkDv = Dk * Dv, C = cx.cf.C;
    const int64_t Cb = std::max<int64_t>(1, std::min(C, cx.lmax));
    // segment length: keep the whole chunk's states when they are small, else checkpoints
    const int64_t state_bytes = int64_t(sizeof(T)) * DkDv * (MOM ? 2 : 1);
    int64_t S = 16;
    if ((Cb + 1) * state_bytes <= seg_budget()) S = Cb;
    S = std::max<int64_t>(1, std::min(S, Cb));
    const T* chunk_X = static_cast<const T*>(f.chunk_X);
    const T* chunk_P = static_cast<const T*>(f.chunk_P);
    const bool have_saved = chunk_X && (!MOM || chunk_P);
    const int64_t nstart = have_saved ? 0 : num_chunks(cx.lmax, C);
    BwdOut<T> out;
    out.dO = static_cast<const T*>(p.dO);
    out.dXT = static_cast<const T*>(p.dXT);
    out.dPT = static_cast<const T*>(p.dPT);
    out.dq = static_cast<T*>(p.dq);
    out.dk = static_cast<T*>(p.dk);
    out.dv = static_cast<T*>(p.dv);
    out.dlr = static_cast<T*>(p.dlr);
    out.dalpha = static_cast<T*>(p.dalpha);
    out.dmom = static_cast<T*>(p.dmomentum);
    out.dbp = static_cast<T*>(p.dbias_param);
    out.drp = static_cast<T*>(p.dret_param);
    out.dX0 = static_cast<T*>(p.dX0);
    out.dP0 = static_cast<T*>(p.dP0);
    out.dA0 = static_cast<T*>(p.dA0);
    const int64_t ntask = f.N * H;
    const bool par = worth_threads(f, ntask, Dk * Dv);
#ifdef _OPENMP
#pragma omp parallel if (par)
#endif
    {
      Work<T> w;
      w.init(Cb, Dk, Dv);
      BWork<T> bw;
      bw.init(Cb, Dk, Dv, S, MOM, nstart, RET == kRetL2 ? l2_bwd_dual() : cx.cf.chunk_map);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
      for (int64_t task = 0; task < ntask; ++task) {
        const int64_t n = task / H, h = task % H;
        const T* sx;
        const T* sp = nullptr;
        int64_t stride;
        if (have_saved) {
          const int64_t off = saved_offset(f, n, h, C, DkDv);
          sx = chunk_X + off;
          if (MOM) sp = chunk_P + off;
          stride = H * DkDv;
        } else {
          // no saved chunk starts: recompute them with a forward pass of this sequence
          fwd_seq<T, RET, MOM>(cx, w, n, h, bw.starts.data(), MOM ? bw.startsP.data() : nullptr,
                               DkDv, nullptr, nullptr, nullptr, nullptr);
          sx = bw.starts.data();
          sp = MOM ? bw.startsP.data() : nullptr;
          stride = DkDv;
        }
        bwd_seq<T, RET, MOM>(cx, w, bw, out, n, h, sx, sp, stride);
      }
    }
  }
};


// Entry points of this instruction set (validation is done by the caller).
inline void run_fwd(const ChunkFwdParams& p) {
  FwdRunner r{p};
  const bool mom = p.momentum != nullptr;
  if (p.dtype == kFloat32) dispatch_ret<float>(p.cfg.retention, mom, r);
  else dispatch_ret<double>(p.cfg.retention, mom, r);
}
inline void run_bwd(const ChunkBwdParams& p) {
  BwdRunner r{p};
  const bool mom = p.fwd.momentum != nullptr;
  if (p.fwd.dtype == kFloat32) dispatch_ret<float>(p.fwd.cfg.retention, mom, r);
  else dispatch_ret<double>(p.fwd.cfg.retention, mom, r);
}

}  // namespace MIRAS_CPU_ISA
}  // namespace cpu
}  // namespace miras
