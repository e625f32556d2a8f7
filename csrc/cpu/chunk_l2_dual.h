// miras/cpu/chunk_l2_dual.h — dual-form (chunked) backward of retention l2, linear memory
// (KERNELS.md §1, §3). Included by chunk_kernels.h inside its namespace MIRAS_CPU_ISA, after
// Ctx/Work/BwdOut, gemm_nn, load_chunk and prep_chunk; not a standalone header.
//
// Per (sequence, head): chunks in reverse carrying dW = dL/dX_end (and dP = dL/dP_end). Per chunk
// of Lc tokens, with Xs/Ps the saved chunk-start states and W_A the anchor (= Xs, or A0 for the
// first chunk of the step op; E = K W_A - V uses the anchor, the recurrence starts at Xs):
//   S = Q~K^T, G = dO Psi~^T (Lc x Lc, lower triangles only: gemm_tri); A = F (.) S;
//   dPsi~ = -A^T dO - diag(F_L) K dW - diag(Lb_L) K dP; psi VJP per row (dlr, dE, dbias_param);
//   dQ~ = (F(.)dA) K + diag(gam) dO Xs^T + diag(f) dO Ps^T with dA = -G (masked);
//   dK = (F(.)dA)^T Q~ + dE W_A^T - diag(F_L) Psi~ dW^T - diag(Lb_L) Psi~ dP^T;
//   dXs = Q~^T diag(gam) dO + gam_L dW (+ K^T dE when W_A = Xs, else
//   K^T dE is dA0); dPs = Q~^T diag(f) dO + f_L dW + e_L dP.
// Gate matrices are products (CHUNK_L2_NOTES.md): Lg[t][s] = prod_{s<r<=t} alpha_r, Lb likewise
// with beta, F[t][i] = alpha_t F[t-1][i] + Lb[t][i]; no momentum is beta == 0 (Lb = I, F = Lg,
// f = 0). Gate gradients are the per-token inner products dalpha_t = <X_{t-1}, dL/dX_t>,
// dbeta_t = <P_{t-1}, dL/dP_t>, expanded in the chunk's basis (Xs, Ps, k_i^T psi~_i against
// q~_t'^T do_t', dW, dP): with M[t'][i] = S[t'][i] G[t'][i] and the running sums
// YB_t = sum_{i<t} Lb[t-1][i] M[:, i], YX_t = sum_{i<t} F[t-1][i] M[:, i] (O(C) recurrences
// YB <- beta_t YB + M[:, t], YX <- alpha_t YX + YB), everything is O(C^2) per chunk and never
// divides by a gate (beta = 0 and alpha = 0 are exact).
// Cost per chunk: about 10 (no momentum) / 14 (momentum) Lc x D x D products through gemm_nn /
// gemm_tn, all operands L1/L2-resident; chunk_cpu_avx512.cpp builds this path with 64-byte
// vectors. Measured vs the per-token scan (B=2, T=1024, H=4, D=64, C=64, float32, 1 thread):
// forward+backward 7.5-14.5 ms vs 15-30 ms.

template <typename T>
struct L2DualWork {
  int64_t Cb = 0, LM = 0;
  std::vector<T> dW, dP, dWn, dPn, Kt, Psit, S, G, At, dSm, LgT, FT, Lg, Lb, F, gam, ev, fv, dOc,
      dOg, dPsi, KdW, KdP, dE, dQ, dK, tmpq, XsT, WAT, dWT, PsiS, Mt, av, bv, YB, YX, zeros, dpsi;
  std::vector<T> R0, dR0, mtmp;  // map_schedule="chunk": phi(Xs), its cotangent, the map's scratch
  void init(int64_t Cb_, int64_t Dk, int64_t Dv, bool mom) {
    Cb = Cb_;
    LM = Cb + 2;
    const size_t DkDv = size_t(Dk) * size_t(Dv), CC = size_t(Cb) * size_t(Cb);
    const size_t CK = size_t(Cb) * size_t(Dk), CV = size_t(Cb) * size_t(Dv);
    dW.assign(DkDv, T(0));
    dWn.assign(DkDv, T(0));
    if (mom) {
      dP.assign(DkDv, T(0));
      dPn.assign(DkDv, T(0));
    }
    Kt.assign(CK, T(0));
    Psit.assign(CV, T(0));
    for (auto* m : {&S, &G, &At, &dSm, &Lg, &Lb, &F, &LgT, &FT}) m->assign(CC, T(0));
    for (auto* m : {&gam, &ev, &fv}) m->assign(size_t(Cb), T(0));
    for (auto* m : {&dOc, &dOg, &dPsi, &KdW, &KdP, &dE, &PsiS}) m->assign(CV, T(0));
    for (auto* m : {&dQ, &dK, &tmpq}) m->assign(CK, T(0));
    XsT.assign(DkDv, T(0));
    WAT.assign(DkDv, T(0));
    dWT.assign(DkDv, T(0));
    Mt.assign(size_t(Cb) * size_t(LM), T(0));
    for (auto* m : {&av, &bv, &YB, &YX}) m->assign(size_t(LM), T(0));
    dpsi.assign(size_t(Dv), T(0));
    R0.assign(DkDv, T(0));
    dR0.assign(DkDv, T(0));
    mtmp.assign(2 * size_t(Dv), T(0));
  }
};

// out[c x r] = in[r x c]^T through 4x4 (float) / 2x2 (double) register blocks: 16-byte vector
// loads and stores with two shuffle levels (about 4x the scalar transpose on 64 x 64 tiles).
template <typename T>
void transpose_fast(int64_t r, int64_t c, const T* MIRAS_RESTRICT in, T* MIRAS_RESTRICT out) {
  if constexpr (sizeof(T) == 4) {
    typedef float V4 __attribute__((vector_size(16), aligned(4), may_alias));
    int64_t i0 = 0;
    for (; i0 + 4 <= r; i0 += 4) {
      int64_t j0 = 0;
      for (; j0 + 4 <= c; j0 += 4) {
        const T* p = in + i0 * c + j0;
        const V4 r0 = *(const V4*)p, r1 = *(const V4*)(p + c);
        const V4 r2 = *(const V4*)(p + 2 * c), r3 = *(const V4*)(p + 3 * c);
        const V4 t0 = __builtin_shufflevector(r0, r1, 0, 4, 1, 5);
        const V4 t1 = __builtin_shufflevector(r0, r1, 2, 6, 3, 7);
        const V4 t2 = __builtin_shufflevector(r2, r3, 0, 4, 1, 5);
        const V4 t3 = __builtin_shufflevector(r2, r3, 2, 6, 3, 7);
        *(V4*)(out + (j0 + 0) * r + i0) = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
        *(V4*)(out + (j0 + 1) * r + i0) = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
        *(V4*)(out + (j0 + 2) * r + i0) = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
        *(V4*)(out + (j0 + 3) * r + i0) = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
      }
      for (int64_t j = j0; j < c; ++j)
        for (int64_t i = i0; i < i0 + 4; ++i) out[j * r + i] = in[i * c + j];
    }
    for (int64_t i = i0; i < r; ++i)
      for (int64_t j = 0; j < c; ++j) out[j * r + i] = in[i * c + j];
  } else {
    typedef double V2 __attribute__((vector_size(16), aligned(8), may_alias));
    int64_t i0 = 0;
    for (; i0 + 2 <= r; i0 += 2) {
      int64_t j0 = 0;
      for (; j0 + 2 <= c; j0 += 2) {
        const V2 r0 = *(const V2*)(in + i0 * c + j0), r1 = *(const V2*)(in + (i0 + 1) * c + j0);
        *(V2*)(out + j0 * r + i0) = __builtin_shufflevector(r0, r1, 0, 2);
        *(V2*)(out + (j0 + 1) * r + i0) = __builtin_shufflevector(r0, r1, 1, 3);
      }
      for (int64_t j = j0; j < c; ++j)
        for (int64_t i = i0; i < i0 + 2; ++i) out[j * r + i] = in[i * c + j];
    }
    for (int64_t i = i0; i < r; ++i)
      for (int64_t j = 0; j < c; ++j) out[j * r + i] = in[i * c + j];
  }
}
// Triangular products on strips of 8 rows (the masked Lc x Lc factors are zero outside their
// triangle, so only the bounds change; the strips keep gemm_nn's summation order per element).
// lower_out: C[t][i] needed only for i <= t (columns limited to the strip's end);
// a_lower:  A[t][k] zero for k > t (K limited to the strip's end);
// a_upper:  A[t][k] zero for k < t (K starts at the strip's first row).
// a_lower_t: op(A) = A^T with A lower triangular (K starts at the strip's first row).
enum TriKind { kTriLowerOut, kTriALower, kTriAUpper, kTriALowerT };
template <typename T>
inline void gemm_tri(TriKind kind, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                     const T* B, int64_t ldb, T* Cm, int64_t ldc) {
  constexpr int64_t RB = 8;
  constexpr int64_t NB = 2 * Vec<T>::W;  // gemm_nn's vector block: keep column counts multiples
  for (int64_t m0 = 0; m0 < M; m0 += RB) {
    const int64_t mb = std::min(RB, M - m0), end = m0 + mb;
    if (kind == kTriLowerOut)
      gemm_nn<T>(mb, std::min(N, (end + NB - 1) / NB * NB), K, A + m0 * lda, lda, B, ldb,
                 Cm + m0 * ldc, ldc, false);
    else if (kind == kTriALower)
      gemm_nn<T>(mb, N, std::min(K, end), A + m0 * lda, lda, B, ldb, Cm + m0 * ldc, ldc, false);
    else if (kind == kTriAUpper)
      gemm_nn<T>(mb, N, K - m0, A + m0 * lda + m0, lda, B + m0 * ldb, ldb, Cm + m0 * ldc, ldc,
                 false);
    else
      gemm_tn<T>(mb, N, K - m0, A + m0 * lda + m0, lda, B + m0 * ldb, ldb, Cm + m0 * ldc, ldc,
                 false);
  }
}

// "scan" forces the per-token backward for retention l2 (testing); anything else: the dual form.
inline bool l2_bwd_dual() {
  static const bool d = [] {
    const char* e = std::getenv("MIRAS_CPU_L2_BWD");
    return !(e && std::string(e) == "scan");
  }();
  return d;
}

// MAPRET = kRetKL / kRetLq: map_schedule="chunk" (SPEC §5b) — each chunk is this l2 chunk started
// from the read memory R0 = phi(Xs) (also the anchor), and the raw state leaves it as
// X_end = R_end + gam_L (Xs - R0). So the chunk code runs on R0; the gate scalar of gam_L pairs with
// the raw Xs (X_end = gam_L Xs + ..., the R0 terms cancel); the carry is
// dXs = phi-VJP(Xs; dR0) + gam_L dW with dR0 = Q~^T diag(gam) dO + K^T dE (no gam_L dW term).
template <typename T, bool MOM, int MAPRET = kRetL2>
void bwd_seq_l2_dual(const Ctx<T>& cx, Work<T>& w, L2DualWork<T>& z, const BwdOut<T>& out,
                     int64_t n, int64_t h, const T* startX, const T* startP,
                     int64_t start_stride) {
  constexpr bool kMap = MAPRET != kRetL2;
  const Cfg<T>& cf = cx.cf;
  const int64_t H = cx.H, Dk = cx.Dk, Dv = cx.Dv, DkDv = Dk * Dv, C = cf.C;
  const int64_t begin = cx.begin(n), L = cx.len(n), off = cx.state_off(n, h);
  const int64_t LM = z.LM;
  const bool dot_bias = bias_psi_uses_v(cf.bias);
  const bool has_param = bias_has_param(cf.bias);
  T* dW = z.dW.data();
  T* dWn = z.dWn.data();
  T* dP = MOM ? z.dP.data() : nullptr;
  T* dPn = MOM ? z.dPn.data() : nullptr;
  if (out.dXT) std::memcpy(dW, out.dXT + off, sizeof(T) * DkDv);
  else std::fill(dW, dW + DkDv, T(0));
  if (MOM) {
    if (out.dPT) std::memcpy(dP, out.dPT + off, sizeof(T) * DkDv);
    else std::fill(dP, dP + DkDv, T(0));
  }
  const int64_t nch = num_chunks(L, C);
  bool a0_written = false;
  T* Kt = z.Kt.data();
  T* Psit = z.Psit.data();
  T* S = z.S.data();
  T* G = z.G.data();
  T* At = z.At.data();
  T* dSm = z.dSm.data();
  T* Lg = z.Lg.data();
  T* Lb = z.Lb.data();
  T* F = z.F.data();
  T* LgT = z.LgT.data();
  T* FT = z.FT.data();
  T* gam = z.gam.data();
  T* ev = z.ev.data();
  T* fv = z.fv.data();
  T* dOc = z.dOc.data();
  T* dOg = z.dOg.data();
  T* dPsi = z.dPsi.data();
  T* KdW = z.KdW.data();
  T* KdP = z.KdP.data();
  T* dE = z.dE.data();
  T* dQ = z.dQ.data();
  T* dK = z.dK.data();
  T* tmpq = z.tmpq.data();
  T* XsT = z.XsT.data();
  T* WAT = z.WAT.data();
  T* dWT = z.dWT.data();
  T* PsiS = z.PsiS.data();
  T* Mt = z.Mt.data();
  T* av = z.av.data();
  T* bv = z.bv.data();
  T* YB = z.YB.data();
  T* YX = z.YX.data();
  T* dpsi = z.dpsi.data();
  for (int64_t c = nch - 1; c >= 0; --c) {
    const int64_t t0 = c * C, Lc = std::min(C, L - t0), Lm = Lc - 1;
    const T* Xs;
    const T* Ps = nullptr;
    if (c == 0) {
      if (!cx.X0 || (MOM && !cx.P0)) {
        if (z.zeros.empty()) z.zeros.assign(DkDv, T(0));
      }
      Xs = cx.X0 ? cx.X0 + off : z.zeros.data();
      if (MOM) Ps = cx.P0 ? cx.P0 + off : z.zeros.data();
    } else {
      Xs = startX + c * start_stride;
      if (MOM) Ps = startP + c * start_stride;
    }
    const T* Xraw = Xs;  // the raw chunk-start state (== Xs for retention l2)
    T map_n = T(0), map_inv = T(0);
    if constexpr (kMap) {
      phi_full<T, MAPRET>(cf, Dk, Dv, Xraw, z.R0.data(), z.mtmp.data(), &map_n, &map_inv);
      Xs = z.R0.data();
    }
    const bool a0 = (c == 0 && cx.A0);
    const T* anchor = a0 ? cx.A0 + off : Xs;
    std::memcpy(w.WA.data(), anchor, sizeof(T) * DkDv);
    load_chunk<T, MOM>(cx, w, begin, h, t0, Lc);
    prep_chunk<T>(cx, w, Lc);
    const T* Kc = w.Kc.data();
    const T* Qc = w.Qc.data();
    const T* Pst = w.Pst.data();  // psi~ = lr psi
    const T* al = w.al.data();
    const T* be = w.be.data();
    for (int64_t t = 0; t < Lc; ++t) {
      const int64_t row = (begin + t0 + t) * H + h;
      std::memcpy(dOc + t * Dv, out.dO + row * Dv, sizeof(T) * Dv);
    }
    // ---- gate matrices (products; beta = 0 without momentum) ----
    // row recurrences: Lg[t] = alpha_t Lg[t-1], Lb[t] = beta_t Lb[t-1], F[t] = alpha_t F[t-1]
    // + Lb[t] below the diagonal; 1 on it; 0 above.
    for (int64_t t = 0; t < Lc; ++t) {
      T* lg = Lg + t * Lc;
      T* lb = Lb + t * Lc;
      T* fr = F + t * Lc;
      const T a = al[t];
      if (t > 0) {
        const T* lgp = lg - Lc;
        const T* lbp = lb - Lc;
        const T* fp = fr - Lc;
        if constexpr (MOM) {
          const T b = be[t];
          for (int64_t j = 0; j < t; ++j) {
            lg[j] = a * lgp[j];
            const T v = b * lbp[j];
            lb[j] = v;
            fr[j] = a * fp[j] + v;
          }
        } else {
          for (int64_t j = 0; j < t; ++j) {
            const T v = a * lgp[j];
            lg[j] = v;
            lb[j] = T(0);
            fr[j] = v;
          }
        }
      }
      lg[t] = lb[t] = fr[t] = T(1);
      for (int64_t j = t + 1; j < Lc; ++j) lg[j] = lb[j] = fr[j] = T(0);
    }
    {
      T g = T(1), e = T(1), f = T(0);
      for (int64_t t = 0; t < Lc; ++t) {
        g *= al[t];
        if constexpr (MOM) {
          e *= be[t];
          f = al[t] * f + e;
        } else {
          e = T(0);
        }
        gam[t] = g;
        ev[t] = e;
        fv[t] = f;
      }
    }
    const T* FL = F + Lm * Lc;
    const T* LbL = Lb + Lm * Lc;
    // ---- S = Q~ K^T, G = dO Psi~^T ----
    transpose_fast<T>(Lc, Dk, Kc, Kt);
    gemm_tri<T>(kTriLowerOut, Lc, Lc, Dk, Qc, Dk, Kt, Lc, S, Lc);
    transpose_fast<T>(Lc, Dv, Pst, Psit);
    gemm_tri<T>(kTriLowerOut, Lc, Lc, Dv, dOc, Dv, Psit, Lc, G, Lc);
    // At = -(F (.) S) (t-major, used transposed), dSm = F (.) dA = -F (.) G (lower),
    // M^T = (S (.) G)^T strictly below the diagonal
    for (int64_t t = 0; t < Lc; ++t) {
      const T* fr = F + t * Lc;
      const T* sr = S + t * Lc;
      const T* gr = G + t * Lc;
      T* ar = At + t * Lc;
      T* dr = dSm + t * Lc;
      for (int64_t i = 0; i <= t; ++i) {
        ar[i] = -fr[i] * sr[i];
        dr[i] = -fr[i] * gr[i];
      }
      for (int64_t i = t + 1; i < Lc; ++i) ar[i] = dr[i] = T(0);
      for (int64_t i = 0; i < t; ++i) Mt[i * LM + t] = sr[i] * gr[i];
      for (int64_t i = t; i < Lc; ++i) Mt[i * LM + t] = T(0);
    }
    // ---- dPsi~ = -A^T dO - diag(F_L) K dW - diag(Lb_L) K dP ----
    gemm_tri<T>(kTriALowerT, Lc, Dv, Lc, At, Lc, dOc, Dv, dPsi, Dv);
    gemm_nn<T>(Lc, Dv, Dk, Kc, Dk, dW, Dv, KdW, Dv, false);
    if constexpr (MOM) gemm_nn<T>(Lc, Dv, Dk, Kc, Dk, dP, Dv, KdP, Dv, false);
    for (int64_t t = 0; t < Lc; ++t) {
      T* dps = dPsi + t * Dv;
      const T* kw = KdW + t * Dv;
      const T* ps = Pst + t * Dv;
      const T fl = FL[t];
      T m = T(0), nn = T(0);
      if constexpr (MOM) {
        const T* kp = KdP + t * Dv;
        const T bl = LbL[t];
MIRAS_SIMD_REDUCE(m, nn)
        for (int64_t j = 0; j < Dv; ++j) {
          dps[j] -= fl * kw[j] + bl * kp[j];
          m += kw[j] * ps[j];
          nn += kp[j] * ps[j];
        }
      } else {
MIRAS_SIMD_REDUCE(m)
        for (int64_t j = 0; j < Dv; ++j) {
          dps[j] -= fl * kw[j];
          m += kw[j] * ps[j];
        }
      }
      Mt[t * LM + Lc] = m;
      Mt[t * LM + Lc + 1] = nn;
    }
    // ---- psi~ = lr psi(E): dlr, bias VJP, dv ----
    for (int64_t t = 0; t < Lc; ++t) {
      const int64_t row = (begin + t0 + t) * H + h;
      const T* psi = w.Psi.data() + t * Dv;
      const T* dps = dPsi + t * Dv;
      const T lr = w.lr[t];
      T dlr = T(0);
MIRAS_SIMD_REDUCE(dlr)
      for (int64_t j = 0; j < Dv; ++j) {
        dlr += dps[j] * psi[j];
        dpsi[j] = lr * dps[j];
      }
      T* dv = out.dv + row * Dv;
      T dparam = T(0);
      if (dot_bias) {
        for (int64_t j = 0; j < Dv; ++j) dv[j] = -dpsi[j];
      } else {
        const BiasArgs<T> ba{cf.bias, cf.p, cf.eps, w.bpv[t]};
        T* de = dE + t * Dv;
        dparam = bias_vjp_row(ba, w.E.data() + t * Dv, dpsi, w.sumsq[t], de, Dv);
        for (int64_t j = 0; j < Dv; ++j) dv[j] = -de[j];
      }
      out.dlr[row] = dlr;
      if (out.drp) out.drp[row] = T(0);
      if (out.dbp) out.dbp[row] = has_param ? dparam : T(0);
    }
    // ---- dQ~ = (F (.) dA) K + diag(gam) dO Xs^T + diag(f) dO Ps^T; a_t, b_t ----
    gemm_tri<T>(kTriALower, Lc, Dk, Lc, dSm, Lc, Kc, Dk, dQ, Dk);
    transpose_fast<T>(Dk, Dv, Xs, XsT);
    gemm_nn<T>(Lc, Dk, Dv, dOc, Dv, XsT, Dk, tmpq, Dk, false);
    for (int64_t t = 0; t < Lc; ++t) {
      T* dq = dQ + t * Dk;
      const T* tq = tmpq + t * Dk;
      const T* q = Qc + t * Dk;
      const T gt = gam[t];
      T a = T(0);
MIRAS_SIMD_REDUCE(a)
      for (int64_t i = 0; i < Dk; ++i) {
        a += tq[i] * q[i];
        dq[i] += gt * tq[i];
      }
      av[t] = a;
    }
    if constexpr (MOM) {
      transpose_fast<T>(Dk, Dv, Ps, WAT);
      gemm_nn<T>(Lc, Dk, Dv, dOc, Dv, WAT, Dk, tmpq, Dk, false);
      for (int64_t t = 0; t < Lc; ++t) {
        T* dq = dQ + t * Dk;
        const T* tq = tmpq + t * Dk;
        const T* q = Qc + t * Dk;
        const T ft = fv[t];
        T b = T(0);
MIRAS_SIMD_REDUCE(b)
        for (int64_t i = 0; i < Dk; ++i) {
          b += tq[i] * q[i];
          dq[i] += ft * tq[i];
        }
        bv[t] = b;
      }
    }
    {
      const T sc = cf.scale;
      for (int64_t t = 0; t < Lc; ++t) {
        const int64_t row = (begin + t0 + t) * H + h;
        T* dq = out.dq + row * Dk;
        const T* s = dQ + t * Dk;
        for (int64_t i = 0; i < Dk; ++i) dq[i] = sc * s[i];
      }
    }
    // ---- dK = (F (.) dA)^T Q~ + dE W_A^T - diag(F_L) Psi~ dW^T - diag(Lb_L) Psi~ dP^T ----
    gemm_tri<T>(kTriALowerT, Lc, Dk, Lc, dSm, Lc, Qc, Dk, dK, Dk);
    if (!dot_bias) {
      if (a0) transpose_fast<T>(Dk, Dv, anchor, WAT);
      gemm_nn<T>(Lc, Dk, Dv, dE, Dv, a0 ? WAT : XsT, Dk, dK, Dk, true);
    }
    for (int64_t t = 0; t < Lc; ++t) {
      const T fl = -FL[t];
      const T* ps = Pst + t * Dv;
      T* o = PsiS + t * Dv;
      for (int64_t j = 0; j < Dv; ++j) o[j] = fl * ps[j];
    }
    transpose_fast<T>(Dk, Dv, dW, dWT);
    gemm_nn<T>(Lc, Dk, Dv, PsiS, Dv, dWT, Dk, dK, Dk, true);
    if constexpr (MOM) {
      for (int64_t t = 0; t < Lc; ++t) {
        const T bl = -LbL[t];
        const T* ps = Pst + t * Dv;
        T* o = PsiS + t * Dv;
        for (int64_t j = 0; j < Dv; ++j) o[j] = bl * ps[j];
      }
      transpose_fast<T>(Dk, Dv, dP, dWT);
      gemm_nn<T>(Lc, Dk, Dv, PsiS, Dv, dWT, Dk, dK, Dk, true);
    }
    for (int64_t t = 0; t < Lc; ++t) {
      const int64_t row = (begin + t0 + t) * H + h;
      std::memcpy(out.dk + row * Dk, dK + t * Dk, sizeof(T) * Dk);
    }
    // ---- gate scalars against the carried gradients ----
    {
      T wx = T(0), wp = T(0), pp = T(0);
MIRAS_SIMD_REDUCE(wx)
      for (int64_t e = 0; e < DkDv; ++e) wx += Xraw[e] * dW[e];
      if constexpr (MOM) {
MIRAS_SIMD_REDUCE(wp, pp)
        for (int64_t e = 0; e < DkDv; ++e) {
          wp += Ps[e] * dW[e];
          pp += Ps[e] * dP[e];
        }
      }
      av[Lc] = wx;
      av[Lc + 1] = T(0);
      bv[Lc] = wp;
      bv[Lc + 1] = pp;
    }
    // ---- new carries: dXs, dPs (and dA0) ----
    for (int64_t t = 0; t < Lc; ++t) {
      const T gt = gam[t];
      const T* d = dOc + t * Dv;
      T* o = dOg + t * Dv;
      for (int64_t j = 0; j < Dv; ++j) o[j] = gt * d[j];
    }
    T* dR = kMap ? z.dR0.data() : dWn;  // d/dXs (l2) or d/dR0 (map_schedule="chunk")
    gemm_tn<T>(Dk, Dv, Lc, Qc, Dk, dOg, Dv, dR, Dv, false);
    if constexpr (!kMap) {
      const T gL = gam[Lm];
      for (int64_t e = 0; e < DkDv; ++e) dWn[e] += gL * dW[e];
    }
    if (!dot_bias) {
      if (!a0) {
        gemm_tn<T>(Dk, Dv, Lc, Kc, Dk, dE, Dv, dR, Dv, true);
      } else {
        if (out.dA0) gemm_tn<T>(Dk, Dv, Lc, Kc, Dk, dE, Dv, out.dA0 + off, Dv, false);
        a0_written = true;
      }
    }
    if constexpr (kMap) {
      const T gL = gam[Lm];
      for (int64_t e = 0; e < DkDv; ++e) dWn[e] = gL * dW[e];
      phi_vjp_full<T, MAPRET>(cf, Dk, Dv, Xraw, z.R0.data(), dR, map_n, map_inv, dWn, z.mtmp.data());
    }
    if constexpr (MOM) {
      for (int64_t t = 0; t < Lc; ++t) {
        const T ft = fv[t];
        const T* d = dOc + t * Dv;
        T* o = dOg + t * Dv;
        for (int64_t j = 0; j < Dv; ++j) o[j] = ft * d[j];
      }
      gemm_tn<T>(Dk, Dv, Lc, Qc, Dk, dOg, Dv, dPn, Dv, false);
      const T fL = fv[Lm], eL = ev[Lm];
      for (int64_t e = 0; e < DkDv; ++e) dPn[e] += fL * dW[e] + eL * dP[e];
    }
    // ---- gate gradients ----
    transpose_fast<T>(Lc, Lc, Lg, LgT);
    if constexpr (MOM) transpose_fast<T>(Lc, Lc, F, FT);
    for (int64_t x = 0; x < Lc + 2; ++x) YB[x] = YX[x] = T(0);
    T gp = T(1), fp = T(0), ep = T(1);
    for (int64_t t = 0; t < Lc; ++t) {
      const int64_t row = (begin + t0 + t) * H + h;
      T da = T(0);
      const T* lgc = LgT + t * Lc;  // column t of Lg
      if constexpr (MOM) {
MIRAS_SIMD_REDUCE(da)
        for (int64_t tp = t; tp < Lc; ++tp) da += lgc[tp] * (gp * av[tp] + fp * bv[tp] - YX[tp]);
        da += Lg[Lm * Lc + t] * (gp * av[Lc] + fp * bv[Lc] - YX[Lc]);
        T db = T(0);
        const T* fc = FT + t * Lc;
MIRAS_SIMD_REDUCE(db)
        for (int64_t tp = t; tp < Lc; ++tp) db += fc[tp] * (ep * bv[tp] - YB[tp]);
        db += FL[t] * (ep * bv[Lc] - YB[Lc]) + LbL[t] * (ep * bv[Lc + 1] - YB[Lc + 1]);
        if (out.dmom) out.dmom[row] = db;
      } else {
MIRAS_SIMD_REDUCE(da)
        for (int64_t tp = t; tp < Lc; ++tp) da += lgc[tp] * (gp * av[tp] - YX[tp]);
        da += Lg[Lm * Lc + t] * (gp * av[Lc] - YX[Lc]);
      }
      out.dalpha[row] = da;
      const T* mr = Mt + t * LM;
      const T a = al[t];
      if constexpr (MOM) {
        const T b = be[t];
        for (int64_t x = 0; x < Lc + 2; ++x) {
          YB[x] = b * YB[x] + mr[x];
          YX[x] = a * YX[x] + YB[x];
        }
      } else {
        for (int64_t x = 0; x < Lc + 2; ++x) YX[x] = a * YX[x] + mr[x];
      }
      gp = gam[t];
      fp = fv[t];
      ep = ev[t];
    }
    std::swap(dW, dWn);
    if constexpr (MOM) std::swap(dP, dPn);
  }
  if (out.dX0) std::memcpy(out.dX0 + off, dW, sizeof(T) * DkDv);
  if (MOM && out.dP0) std::memcpy(out.dP0 + off, dP, sizeof(T) * DkDv);
  if (cx.A0 && out.dA0 && !a0_written) std::fill(out.dA0 + off, out.dA0 + off + DkDv, T(0));
  (void)YB;
  (void)dP;
  (void)dPn;
}
