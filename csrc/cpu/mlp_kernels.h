// miras/cpu/mlp_kernels.h — the CPU loops of the MLP memory M(x) = x + LN(GELU(x W1) W2)
// (SPEC §6, KERNELS.md §2 and §5), forward and backward. Included after chunk_kernels.h inside
// its namespace MIRAS_CPU_ISA (mlp_cpu.cpp: portable, mlp_cpu_avx2.cpp: AVX2+FMA); not a
// standalone header.
//
// The MLP memory is two matrices, each with its own raw state, momentum, anchor and read map, and
// the same gates. The linear memory's per-token kernels serve both: the anchor stage turns every
// token into two lr-scaled rank-one gradients, left_mᵀ right_m (W1: kᵀ(η δz), W2: aᵀ(η δu)), so
// token_fwd / token_bwd of chunk_kernels.h run once per matrix with (rows, cols) = (Dk, Dh) and
// (Dh, Dv), the "query" of W1 being q̃ and that of W2 being GELU(q̃ φ(W1_t)).
//
// Work: one task = one (sequence, head), OpenMP dynamic schedule, deterministic (the LayerNorm
// affine's gradient, shared by the sequences of a head, is summed per task and reduced in a fixed
// order afterwards).
// Forward per chunk (anchor A = the chunk-start raw states, or the step op's separate anchor):
//   WA_m = φ(A_m); Zk = K WA1, Ak = GELU(Zk), Uk = Ak WA2 (GEMMs); per row x̂, ψ(k + LN(Uk) − v),
//   ΔU = LN_bwd(Uk, ψ); Hk = ΔU WA2ᵀ (GEMM), ΔZ = Hk ⊙ GELU'(Zk); R1 = η ΔZ, R2 = η ΔU;
//   then per token: W1 step + read zq = q̃ φ(W1_t), aq = GELU(zq), W2 step + read uq = aq φ(W2_t),
//   o = q̃ + LN(uq). Only chunk-start states are saved (O(T/C · (Dk·Dh + Dh·Dv)) per head).
// Backward per chunk, in reverse, carrying dL/dX (and dL/dP) of both matrices: recompute the
// chunk's token states from its saved start (the whole chunk when it fits MIRAS_CPU_SEG_KB, else
// checkpoints every 16 tokens), walk the tokens backwards (LN and GELU of the read, token_bwd of
// W2 then W1), then reverse mode through the anchor stage for the whole chunk (GEMMs, the LN_bwd
// VJP and GELU'' of core/mlp.h, the bias VJP of core/bias.h) and the anchors' read-map VJPs.

// ---- context -------------------------------------------------------------------------------------
template <typename T>
struct MCtx {
  int64_t Dh = 0, S1 = 0, S2 = 0, Sz = 0;  // S1 = Dk*Dh (W1), S2 = Dh*Dv (W2), Sz = S1 + S2
  const T *lnw = nullptr, *lnb = nullptr;  // [H, Dv]
  const T *X2 = nullptr, *P2 = nullptr, *A2 = nullptr;
  int64_t off1(const Ctx<T>& cx, int64_t n, int64_t h) const { return (n * cx.H + h) * S1; }
  int64_t off2(const Ctx<T>& cx, int64_t n, int64_t h) const { return (n * cx.H + h) * S2; }
};

template <typename T>
MCtx<T> make_mctx(const MlpFwdParams& p) {
  MCtx<T> m;
  m.Dh = p.Dh;
  m.S1 = p.chunk.Dk * p.Dh;
  m.S2 = p.Dh * p.chunk.Dv;
  m.Sz = m.S1 + m.S2;
  m.lnw = static_cast<const T*>(p.ln_weight);
  m.lnb = static_cast<const T*>(p.ln_bias);
  m.X2 = static_cast<const T*>(p.X2);
  m.P2 = static_cast<const T*>(p.P2);
  m.A2 = static_cast<const T*>(p.A2);
  return m;
}

// ---- GELU rows ------------------------------------------------------------------------------------
// float: erf through the rational approximation of XLA / Eigen (generic_fast_erf_float; |x| clamped to
// 4; max error 4.2e-7 absolute and relative, measured against double erf on a 1e-4 grid of [-6, 6];
// libm's erff is 7e-8) and φ's exp through kl_exp_v — written without calls or branches so that the
// row loops vectorise (libm's erff/expf are opaque calls; they took 30% of the forward's time).
// double (the gradcheck precision): core/mlp.h's libm formulas.
template <typename V>
inline V erf_v(V x) {
  x = x < -4.f ? V{} - 4.f : x;
  x = x > 4.f ? V{} + 4.f : x;
  const V x2 = x * x;
  V p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = x2 * p + -2.10102402082508e-06f;
  p = x2 * p + -5.69250639462346e-05f;
  p = x2 * p + -7.34990630326855e-04f;
  p = x2 * p + -2.95459980854025e-03f;
  p = x2 * p + -1.60960333262415e-02f;
  V q = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
  q = x2 * q + -1.68282697438203e-03f;
  q = x2 * q + -7.37332916720468e-03f;
  q = x2 * q + -1.42647390514189e-02f;
  return x * p / q;
}

// a = GELU(z); with gp: gp = GELU'(z); with pdf: pdf = φ(z) (each may be null but a).
template <typename T>
inline void gelu_row(const T* MIRAS_RESTRICT z, T* MIRAS_RESTRICT a, T* MIRAS_RESTRICT gp,
                     T* MIRAS_RESTRICT pdf, int64_t n) {
  int64_t i = 0;
  if constexpr (sizeof(T) == 4) {
    typedef float V1 __attribute__((vector_size(4), may_alias));  // one lane: the tail, same formulas
    typedef typename Vec<T>::type V;
    constexpr int W = Vec<T>::W;
    auto body = [&](auto x, auto* pa, auto* pg, auto* pp) {
      typedef decltype(x) VV;
      const VV c = 0.5f * (1.0f + erf_v(x * 0.70710678118654752440f));
      *pa = x * c;
      if (pg || pp) {
        const VV d = 0.39894228040143267794f * kl_exp_v(-0.5f * x * x);
        if (pg) *pg = c + x * d;
        if (pp) *pp = d;
      }
    };
    for (; i + W <= n; i += W)
      body(*(const V*)(z + i), (V*)(a + i), gp ? (V*)(gp + i) : nullptr, pdf ? (V*)(pdf + i) : nullptr);
    for (; i < n; ++i)
      body(*(const V1*)(z + i), (V1*)(a + i), gp ? (V1*)(gp + i) : nullptr, pdf ? (V1*)(pdf + i) : nullptr);
  } else {
    for (; i < n; ++i) {
      T g, d, f;
      gelu_and_grad(z[i], &g, &d, &f);
      a[i] = g;
      if (gp) gp[i] = d;
      if (pdf) pdf[i] = f;
    }
  }
}

// ---- per-thread workspace --------------------------------------------------------------------------
template <typename T>
struct MWork {
  int64_t Cb = 0, Dk = 0, Dh = 0, Dv = 0, Sz = 0;
  // current states (W1 then W2, packed), the raw anchor copy, the anchor's read weights
  std::vector<T> X, P, Ar, WA, WA1t, WA2t;
  T anc_n[2] = {0, 0}, anc_inv[2] = {1, 1};
  // anchor stage of the chunk (rows = tokens)
  std::vector<T> Zk, Ak, Gp, Pk, Hk, DZ, R1, Xh, rstd, DU, R2;
  // one token
  std::vector<T> zq, aq, uq, aux1, aux2, tmp, tmp2, row;

  void init(int64_t Cb_, int64_t Dk_, int64_t Dh_, int64_t Dv_) {
    Cb = Cb_;
    Dk = Dk_;
    Dh = Dh_;
    Dv = Dv_;
    Sz = Dk * Dh + Dh * Dv;
    const int64_t wmax = std::max(Dk, std::max(Dh, Dv));
    X.assign(Sz, T(0));
    P.assign(Sz, T(0));
    Ar.assign(Sz, T(0));
    WA.assign(Sz, T(0));
    WA1t.assign(Sz, T(0));
    WA2t.assign(Sz, T(0));
    for (auto* v : {&Zk, &Ak, &Gp, &Pk, &Hk, &DZ, &R1}) v->assign(size_t(Cb) * Dh, T(0));
    for (auto* v : {&Xh, &DU, &R2}) v->assign(size_t(Cb) * Dv, T(0));
    rstd.assign(Cb, T(0));
    zq.assign(Dh, T(0));
    aq.assign(Dh, T(0));
    uq.assign(Dv, T(0));
    aux1.assign(Work<T>::aux_width(Dh), T(0));
    aux2.assign(Work<T>::aux_width(Dv), T(0));
    tmp.assign(2 * wmax + 2, T(0));
    tmp2.assign(2 * wmax + 2, T(0));
    row.assign(wmax, T(0));
  }
};

// WA = φ(anchor) for both matrices (and the transposes the GEMMs need).
template <typename T, int RET>
void mlp_phi_anchor(const Ctx<T>& cx, MWork<T>& mw, const T* a1, const T* a2, bool need_t1) {
  const int64_t Dk = cx.Dk, Dh = mw.Dh, Dv = cx.Dv, S1 = Dk * Dh;
  phi_full<T, RET>(cx.cf, Dk, Dh, a1, mw.WA.data(), mw.tmp.data(), &mw.anc_n[0], &mw.anc_inv[0]);
  phi_full<T, RET>(cx.cf, Dh, Dv, a2, mw.WA.data() + S1, mw.tmp.data(), &mw.anc_n[1], &mw.anc_inv[1]);
  transpose(Dh, Dv, mw.WA.data() + S1, mw.WA2t.data());
  if (need_t1) transpose(Dk, Dh, mw.WA.data(), mw.WA1t.data());
}

// The anchor stage of a chunk of Lc tokens already loaded into w (chunk_kernels.h load_chunk):
// Zk, Ak = GELU(Zk), Gp = GELU'(Zk), Pk = φ(Zk), x̂ / rstd of Uk, E = k + LN(Uk) − v (w.E, w.sumsq),
// ψ (w.Psi), ΔU, Hk, ΔZ and the lr-scaled right factors R1 = η ΔZ, R2 = η ΔU.
template <typename T>
void mlp_prep_chunk(const Ctx<T>& cx, const MCtx<T>& mc, Work<T>& w, MWork<T>& mw, int64_t h,
                    int64_t Lc) {
  const int64_t Dk = cx.Dk, Dh = mc.Dh, Dv = cx.Dv;
  const Cfg<T>& cf = cx.cf;
  const T* lw = mc.lnw ? mc.lnw + h * Dv : nullptr;
  const T* lb = mc.lnb ? mc.lnb + h * Dv : nullptr;
  const T* WA1 = mw.WA.data();
  const T* WA2 = mw.WA.data() + mc.S1;
  gemm_nn<T>(Lc, Dh, Dk, w.Kc.data(), Dk, WA1, Dh, mw.Zk.data(), Dh, false);
  gelu_row<T>(mw.Zk.data(), mw.Ak.data(), mw.Gp.data(), mw.Pk.data(), Lc * Dh);
  gemm_nn<T>(Lc, Dv, Dh, mw.Ak.data(), Dh, WA2, Dv, mw.Xh.data(), Dv, false);  // Uk, then x̂ in place
  T* y = mw.row.data();
  for (int64_t t = 0; t < Lc; ++t) {
    T* xh = mw.Xh.data() + t * Dv;
    mw.rstd[t] = ln_forward_row<T>(xh, lw, lb, Dv, xh, y);
    const T* k = w.Kc.data() + t * Dk;
    const T* v = w.Vc.data() + t * Dv;
    T* e = w.E.data() + t * Dv;
    T s = T(0);
    for (int64_t j = 0; j < Dv; ++j) {
      e[j] = k[j] + y[j] - v[j];
      s += e[j] * e[j];
    }
    w.sumsq[t] = s;
    const BiasArgs<T> b{cf.bias, cf.p, cf.eps, w.bpv[t]};
    T* psi = w.Psi.data() + t * Dv;
    psi_row(b, e, v, s, psi, Dv);
    ln_bwd_row<T>(xh, psi, lw, mw.rstd[t], Dv, mw.DU.data() + t * Dv);
  }
  gemm_nn<T>(Lc, Dh, Dv, mw.DU.data(), Dv, mw.WA2t.data(), Dh, mw.Hk.data(), Dh, false);
  for (int64_t t = 0; t < Lc; ++t) {
    const T lr = w.lr[t];
    const T* gp = mw.Gp.data() + t * Dh;
    const T* hk = mw.Hk.data() + t * Dh;
    T* dz = mw.DZ.data() + t * Dh;
    T* r1 = mw.R1.data() + t * Dh;
    for (int64_t i = 0; i < Dh; ++i) {
      dz[i] = hk[i] * gp[i];
      r1[i] = lr * dz[i];
    }
    const T* du = mw.DU.data() + t * Dv;
    T* r2 = mw.R2.data() + t * Dv;
    for (int64_t j = 0; j < Dv; ++j) r2[j] = lr * du[j];
  }
}

// One token forward: states Xin -> Xout (packed; may alias), W1's read zq, aq = GELU(zq) (and
// gq = GELU'(zq) when non-null), W2's read uq, o = q̃ + LN(uq) when o is non-null. aux1/aux2 receive
// the read maps' per-token values. states_only: only the states are wanted (the reads do not feed
// them), so the GELU between the layers is skipped and zq, uq, aux are scratch.
template <typename T, int RET, bool MOM>
inline void mlp_token_fwd(const Ctx<T>& cx, const MCtx<T>& mc, MWork<T>& mw, int64_t h, int64_t t,
                          const Work<T>& w, const T* Xin, T* Xout, const T* Pin, T* Pout, T* zq, T* aq, T* gq,
                          T* uq, T* aux1, T* aux2, T* o, bool states_only = false) {
  const int64_t Dk = cx.Dk, Dh = mc.Dh, Dv = cx.Dv, S1 = mc.S1;
  const Cfg<T>& cf = cx.cf;
  const T a = w.al[t], b = w.be[t], g = w.ga[t];
  const T* qt = w.Qc.data() + t * Dk;
  token_fwd<T, RET, MOM>(cf, Dk, Dh, Xin, Xout, Pin, Pout, w.Kc.data() + t * Dk, mw.R1.data() + t * Dh,
                         qt, a, b, g, zq, aux1, mw.tmp.data());
  if (states_only) aq = zq;
  else gelu_row<T>(zq, aq, gq, nullptr, Dh);
  token_fwd<T, RET, MOM>(cf, Dh, Dv, Xin + S1, Xout + S1, MOM ? Pin + S1 : nullptr,
                         MOM ? Pout + S1 : nullptr, mw.Ak.data() + t * Dh, mw.R2.data() + t * Dv, aq, a,
                         b, g, uq, aux2, mw.tmp.data());
  if (o) {
    const T* lw = mc.lnw ? mc.lnw + h * Dv : nullptr;
    const T* lb = mc.lnb ? mc.lnb + h * Dv : nullptr;
    ln_forward_row<T>(uq, lw, lb, Dv, nullptr, o);
    for (int64_t j = 0; j < Dv; ++j) o[j] += qt[j];
  }
}

// Forward scan of one (sequence, head); saves chunk-start states (packed) to saveX/saveP at
// offset c * save_stride when non-null; writes the o rows and, when non-null, the final states.
template <typename T, int RET, bool MOM>
void mlp_fwd_seq(const Ctx<T>& cx, const MCtx<T>& mc, Work<T>& w, MWork<T>& mw, int64_t n, int64_t h,
                 T* saveX, T* saveP, int64_t save_stride, T* o_out, T* XT1, T* XT2, T* PT1, T* PT2,
                 T* AT1, T* AT2) {
  const int64_t Dv = cx.Dv, C = cx.cf.C, S1 = mc.S1, S2 = mc.S2, Sz = mc.Sz;
  const int64_t begin = cx.begin(n), L = cx.len(n);
  const int64_t o1 = mc.off1(cx, n, h), o2 = mc.off2(cx, n, h);
  T* X = mw.X.data();
  T* P = mw.P.data();
  std::memcpy(X, cx.X0 + o1, sizeof(T) * S1);
  std::memcpy(X + S1, mc.X2 + o2, sizeof(T) * S2);
  if (MOM) {
    if (cx.P0) std::memcpy(P, cx.P0 + o1, sizeof(T) * S1);
    else std::fill(P, P + S1, T(0));
    if (mc.P2) std::memcpy(P + S1, mc.P2 + o2, sizeof(T) * S2);
    else std::fill(P + S1, P + Sz, T(0));
  }
  const int64_t nch = num_chunks(L, C);
  for (int64_t c = 0; c < nch; ++c) {
    const int64_t t0 = c * C, Lc = std::min(C, L - t0);
    if (saveX) std::memcpy(saveX + c * save_stride, X, sizeof(T) * Sz);
    if (MOM && saveP) std::memcpy(saveP + c * save_stride, P, sizeof(T) * Sz);
    if (c == 0 && cx.A0) {
      std::memcpy(mw.Ar.data(), cx.A0 + o1, sizeof(T) * S1);
      std::memcpy(mw.Ar.data() + S1, mc.A2 + o2, sizeof(T) * S2);
    } else {
      std::memcpy(mw.Ar.data(), X, sizeof(T) * Sz);
    }
    mlp_phi_anchor<T, RET>(cx, mw, mw.Ar.data(), mw.Ar.data() + S1, false);
    load_chunk<T, MOM>(cx, w, begin, h, t0, Lc);
    mlp_prep_chunk<T>(cx, mc, w, mw, h, Lc);
    for (int64_t t = 0; t < Lc; ++t) {
      T* orow = o_out + ((begin + t0 + t) * cx.H + h) * Dv;
      mlp_token_fwd<T, RET, MOM>(cx, mc, mw, h, t, w, X, X, P, P, mw.zq.data(), mw.aq.data(), nullptr,
                                 mw.uq.data(), mw.aux1.data(), mw.aux2.data(), orow);
    }
  }
  if (XT1) std::memcpy(XT1 + o1, X, sizeof(T) * S1);
  if (XT2) std::memcpy(XT2 + o2, X + S1, sizeof(T) * S2);
  if (MOM && PT1) std::memcpy(PT1 + o1, P, sizeof(T) * S1);
  if (MOM && PT2) std::memcpy(PT2 + o2, P + S1, sizeof(T) * S2);
  if (AT1 || AT2) {
    // the anchor after the last token: X at a chunk boundary, else the last chunk's anchor
    const T *a1, *a2;
    if (L == 0) {
      a1 = cx.A0 ? cx.A0 + o1 : X;
      a2 = cx.A0 ? mc.A2 + o2 : X + S1;
    } else if (L % C != 0) {
      a1 = mw.Ar.data();
      a2 = mw.Ar.data() + S1;
    } else {
      a1 = X;
      a2 = X + S1;
    }
    if (AT1) std::memcpy(AT1 + o1, a1, sizeof(T) * S1);
    if (AT2) std::memcpy(AT2 + o2, a2, sizeof(T) * S2);
  }
}

// ---- backward -------------------------------------------------------------------------------------
template <typename T>
struct MBwdOut {
  const T* dO;
  const T *dXT1, *dXT2, *dPT1, *dPT2;
  T *dq, *dk, *dv, *dlr, *dalpha, *dmom, *dbp, *drp;
  T *dX1, *dX2, *dP1, *dP2, *dA1, *dA2;
  T *dlnw_part, *dlnb_part;  // [N*H, Dv] per-task partial sums (null when not requested)
};

template <typename T>
struct MBWork {
  int64_t S = 1, nseg_max = 1;
  std::vector<T> dX, dP, dWA, dKs, dAks, dR1, dR2, AQ, GQ, UQ, auxs1, auxs2, Xs, Ps, ck, ckP, Xcur, Pcur,
      DHb, DZb, DUU, DA, dKc, dVc, dpsi, de, xhq, duq, daq, dzq, dqt, dlnw, dlnb, start0, start0P;

  void init(int64_t Cb, int64_t Dk, int64_t Dh, int64_t Dv, int64_t S_, bool mom) {
    const size_t Sz = size_t(Dk * Dh + Dh * Dv);
    S = S_;
    nseg_max = (Cb + S - 1) / S;
    dX.assign(Sz, T(0));
    dWA.assign(Sz, T(0));
    for (auto* v : {&dAks, &dR1, &AQ, &GQ, &DHb, &DZb, &DA}) v->assign(size_t(Cb) * Dh, T(0));
    for (auto* v : {&dR2, &UQ, &DUU, &dVc}) v->assign(size_t(Cb) * Dv, T(0));
    for (auto* v : {&dKs, &dKc}) v->assign(size_t(Cb) * Dk, T(0));
    auxs1.assign(size_t(S) * Work<T>::aux_width(Dh), T(0));
    auxs2.assign(size_t(S) * Work<T>::aux_width(Dv), T(0));
    Xs.assign(size_t(S + 1) * Sz, T(0));
    ck.assign(size_t(nseg_max) * Sz, T(0));
    Xcur.assign(Sz, T(0));
    start0.assign(Sz, T(0));
    for (auto* v : {&dpsi, &de, &xhq, &duq, &dlnw, &dlnb}) v->assign(Dv, T(0));
    for (auto* v : {&daq, &dzq}) v->assign(Dh, T(0));
    dqt.assign(Dk, T(0));
    if (mom) {
      dP.assign(Sz, T(0));
      Ps.assign(size_t(S + 1) * Sz, T(0));
      ckP.assign(size_t(nseg_max) * Sz, T(0));
      Pcur.assign(Sz, T(0));
      start0P.assign(Sz, T(0));
    }
  }
};

// Reverse mode through the anchor stage of one chunk (mlp_prep_chunk), given the scan's gradients
// of the right factors (bw.dR1 = dL/dR1, bw.dR2 = dL/dR2) and of the left factors (bw.dKs on k,
// bw.dAks on Ak). Writes dlr, dbias_param, dk, dv of the chunk's tokens and dWA (both matrices,
// packed); accumulates the LN affine's gradient into bw.dlnw / bw.dlnb.
template <typename T>
void mlp_prep_chunk_bwd(const Ctx<T>& cx, const MCtx<T>& mc, const Work<T>& w, MWork<T>& mw,
                        MBWork<T>& bw, const MBwdOut<T>& out, int64_t begin, int64_t h, int64_t t0,
                        int64_t Lc) {
  const int64_t H = cx.H, Dk = cx.Dk, Dh = mc.Dh, Dv = cx.Dv, S1 = mc.S1;
  const Cfg<T>& cf = cx.cf;
  const bool dot_bias = bias_psi_uses_v(cf.bias);
  const T* lw = mc.lnw ? mc.lnw + h * Dv : nullptr;
  const bool want_w = out.dlnw_part != nullptr, want_b = out.dlnb_part != nullptr;
  const T* WA1t = mw.WA1t.data();
  const T* WA2 = mw.WA.data() + S1;
  T* dWA1 = bw.dWA.data();
  T* dWA2 = bw.dWA.data() + S1;
  // η: R_m = η (ΔZ, ΔU)  ->  dη, and dR_m becomes d(ΔZ), d(ΔU) in place
  for (int64_t t = 0; t < Lc; ++t) {
    const int64_t row = (begin + t0 + t) * H + h;
    const T lr = w.lr[t];
    T* d1 = bw.dR1.data() + t * Dh;
    T* d2 = bw.dR2.data() + t * Dv;
    const T* dz = mw.DZ.data() + t * Dh;
    const T* du = mw.DU.data() + t * Dv;
    T dlr = T(0);
    for (int64_t i = 0; i < Dh; ++i) {
      dlr += d1[i] * dz[i];
      d1[i] *= lr;
    }
    for (int64_t j = 0; j < Dv; ++j) {
      dlr += d2[j] * du[j];
      d2[j] *= lr;
    }
    out.dlr[row] = dlr;
  }
  // ΔZ = Hk ⊙ GELU'(Zk): dHk = dΔZ ⊙ GELU'(Zk), dZk = dΔZ ⊙ Hk ⊙ GELU''(Zk)
  for (int64_t e = 0; e < Lc * Dh; ++e) {
    const T d = bw.dR1[e];
    bw.DHb[e] = d * mw.Gp[e];
    bw.DZb[e] = d * mw.Hk[e] * gelu_grad2_from_pdf(mw.Zk[e], mw.Pk[e]);
  }
  // Hk = ΔU WA2ᵀ: dΔU += dHk WA2, dWA2 = dHkᵀ ΔU
  gemm_nn<T>(Lc, Dv, Dh, bw.DHb.data(), Dh, WA2, Dv, bw.dR2.data(), Dv, true);
  gemm_tn<T>(Dh, Dv, Lc, bw.DHb.data(), Dh, mw.DU.data(), Dv, dWA2, Dv, false);
  // per token: ΔU = LN_bwd(Uk, ψ) -> dUk, dψ; ψ(e) -> de, dparam; e = k + x̂ w + b − v
  for (int64_t t = 0; t < Lc; ++t) {
    const int64_t row = (begin + t0 + t) * H + h;
    const T* xh = mw.Xh.data() + t * Dv;
    const T* psi = w.Psi.data() + t * Dv;
    const T rs = mw.rstd[t];
    T* duu = bw.DUU.data() + t * Dv;
    for (int64_t j = 0; j < Dv; ++j) duu[j] = T(0);
    T* dpsi = bw.dpsi.data();
    ln_bwd_vjp_row<T>(xh, psi, lw, rs, bw.dR2.data() + t * Dv, Dv, duu, dpsi,
                      want_w ? bw.dlnw.data() : nullptr);
    T* dv = bw.dVc.data() + t * Dv;
    T* dk = bw.dKc.data() + t * Dk;
    const T* dks = bw.dKs.data() + t * Dk;
    if (dot_bias) {  // ψ = −v
      for (int64_t j = 0; j < Dv; ++j) dv[j] = -dpsi[j];
      for (int64_t i = 0; i < Dk; ++i) dk[i] = dks[i];
      if (out.dbp) out.dbp[row] = T(0);
      continue;
    }
    T* de = bw.de.data();
    const BiasArgs<T> ba{cf.bias, cf.p, cf.eps, w.bpv[t]};
    const T dparam = bias_vjp_row(ba, w.E.data() + t * Dv, dpsi, w.sumsq[t], de, Dv);
    if (out.dbp) out.dbp[row] = bias_has_param(cf.bias) ? dparam : T(0);
    for (int64_t j = 0; j < Dv; ++j) dv[j] = -de[j];
    for (int64_t i = 0; i < Dk; ++i) dk[i] = dks[i] + de[i];  // ŷ = k + ...  (Dv == Dk)
    if (want_w)
      for (int64_t j = 0; j < Dv; ++j) bw.dlnw[j] += de[j] * xh[j];
    if (want_b)
      for (int64_t j = 0; j < Dv; ++j) bw.dlnb[j] += de[j];
    // x̂ = LN(Uk): dUk += LN_bwd(Uk, de) (the affine weight applied inside)
    T* tmp = mw.row.data();
    ln_bwd_row<T>(xh, de, lw, rs, Dv, tmp);
    for (int64_t j = 0; j < Dv; ++j) duu[j] += tmp[j];
  }
  // Uk = Ak WA2: dAk = dUk WA2ᵀ (+ the scan's left-factor gradient), dWA2 += Akᵀ dUk
  std::memcpy(bw.DA.data(), bw.dAks.data(), sizeof(T) * size_t(Lc * Dh));
  gemm_nn<T>(Lc, Dh, Dv, bw.DUU.data(), Dv, mw.WA2t.data(), Dh, bw.DA.data(), Dh, true);
  gemm_tn<T>(Dh, Dv, Lc, mw.Ak.data(), Dh, bw.DUU.data(), Dv, dWA2, Dv, true);
  // Ak = GELU(Zk)
  for (int64_t e = 0; e < Lc * Dh; ++e) bw.DZb[e] += bw.DA[e] * mw.Gp[e];
  // Zk = K WA1: dK += dZk WA1ᵀ, dWA1 = Kᵀ dZk
  gemm_nn<T>(Lc, Dk, Dh, bw.DZb.data(), Dh, WA1t, Dk, bw.dKc.data(), Dk, true);
  gemm_tn<T>(Dk, Dh, Lc, w.Kc.data(), Dk, bw.DZb.data(), Dh, dWA1, Dh, false);
  for (int64_t t = 0; t < Lc; ++t) {
    const int64_t row = (begin + t0 + t) * H + h;
    std::memcpy(out.dk + row * Dk, bw.dKc.data() + t * Dk, sizeof(T) * Dk);
    std::memcpy(out.dv + row * Dv, bw.dVc.data() + t * Dv, sizeof(T) * Dv);
  }
}

template <typename T, int RET, bool MOM>
void mlp_bwd_seq(const Ctx<T>& cx, const MCtx<T>& mc, Work<T>& w, MWork<T>& mw, MBWork<T>& bw,
                 const MBwdOut<T>& out, int64_t n, int64_t h, const T* startX, const T* startP,
                 int64_t start_stride) {
  const Cfg<T>& cf = cx.cf;
  Cfg<T> cf1 = cf;  // token_bwd scales dq by cf.scale: the MLP scales q̃'s gradient itself
  cf1.scale = T(1);
  const int64_t H = cx.H, Dk = cx.Dk, Dh = mc.Dh, Dv = cx.Dv, C = cf.C;
  const int64_t S1 = mc.S1, S2 = mc.S2, Sz = mc.Sz;
  const int64_t begin = cx.begin(n), L = cx.len(n);
  const int64_t o1 = mc.off1(cx, n, h), o2 = mc.off2(cx, n, h);
  const int64_t AW1 = Work<T>::aux_width(Dh), AW2 = Work<T>::aux_width(Dv);
  const T* lw = mc.lnw ? mc.lnw + h * Dv : nullptr;
  const bool want_w = out.dlnw_part != nullptr, want_b = out.dlnb_part != nullptr;
  T* dX = bw.dX.data();
  T* dP = MOM ? bw.dP.data() : nullptr;
  if (out.dXT1) std::memcpy(dX, out.dXT1 + o1, sizeof(T) * S1);
  else std::fill(dX, dX + S1, T(0));
  if (out.dXT2) std::memcpy(dX + S1, out.dXT2 + o2, sizeof(T) * S2);
  else std::fill(dX + S1, dX + Sz, T(0));
  if (MOM) {
    if (out.dPT1) std::memcpy(dP, out.dPT1 + o1, sizeof(T) * S1);
    else std::fill(dP, dP + S1, T(0));
    if (out.dPT2) std::memcpy(dP + S1, out.dPT2 + o2, sizeof(T) * S2);
    else std::fill(dP + S1, dP + Sz, T(0));
  }
  std::fill(bw.dlnw.begin(), bw.dlnw.end(), T(0));
  std::fill(bw.dlnb.begin(), bw.dlnb.end(), T(0));
  const int64_t nch = num_chunks(L, C);
  bool a0_written = false;
  for (int64_t c = nch - 1; c >= 0; --c) {
    const int64_t t0 = c * C, Lc = std::min(C, L - t0);
    // the chunk's start state (packed)
    const T* Xst;
    const T* Pst0 = nullptr;
    if (c == 0) {  // the initial state, packed
      T* xs = bw.start0.data();
      std::memcpy(xs, cx.X0 + o1, sizeof(T) * S1);
      std::memcpy(xs + S1, mc.X2 + o2, sizeof(T) * S2);
      Xst = xs;
      if (MOM) {
        T* ps = bw.start0P.data();
        if (cx.P0) std::memcpy(ps, cx.P0 + o1, sizeof(T) * S1);
        else std::fill(ps, ps + S1, T(0));
        if (mc.P2) std::memcpy(ps + S1, mc.P2 + o2, sizeof(T) * S2);
        else std::fill(ps + S1, ps + Sz, T(0));
        Pst0 = ps;
      }
    } else {
      Xst = startX + c * start_stride;
      if (MOM) Pst0 = startP + c * start_stride;
    }
    const bool a0 = (c == 0 && cx.A0);
    const T* anc1 = a0 ? cx.A0 + o1 : Xst;
    const T* anc2 = a0 ? mc.A2 + o2 : Xst + S1;
    mlp_phi_anchor<T, RET>(cx, mw, anc1, anc2, true);
    load_chunk<T, MOM>(cx, w, begin, h, t0, Lc);
    mlp_prep_chunk<T>(cx, mc, w, mw, h, Lc);

    T* Xs = bw.Xs.data();
    T* Ps = MOM ? bw.Ps.data() : nullptr;
    auto advance = [&](int64_t t, int64_t s, const T* Xi, T* Xo, const T* Pi, T* Po) {
      if (s < 0)  // checkpoint pass: states only
        mlp_token_fwd<T, RET, MOM>(cx, mc, mw, h, t, w, Xi, Xo, Pi, Po, mw.zq.data(), mw.aq.data(), nullptr,
                                   mw.uq.data(), mw.aux1.data(), mw.aux2.data(), nullptr, true);
      else  // keep what the reverse walk needs: GELU(zq), GELU'(zq), uq and the read maps' values
        mlp_token_fwd<T, RET, MOM>(cx, mc, mw, h, t, w, Xi, Xo, Pi, Po, mw.zq.data(), bw.AQ.data() + t * Dh,
                                   bw.GQ.data() + t * Dh, bw.UQ.data() + t * Dv, bw.auxs1.data() + s * AW1,
                                   bw.auxs2.data() + s * AW2, nullptr);
    };
    auto walk = [&](int64_t ts, int64_t len) {
      for (int64_t s = len - 1; s >= 0; --s) {
        const int64_t t = ts + s;
        const int64_t row = (begin + t0 + t) * H + h;
        const T a = w.al[t], b = w.be[t], g = w.ga[t];
        const T* dot = out.dO + row * Dv;
        // o = q̃ + LN(uq): the LN affine, LN's input gradient
        T* xhq = bw.xhq.data();
        const T rs = ln_forward_row<T>(bw.UQ.data() + t * Dv, nullptr, nullptr, Dv, xhq, nullptr);
        if (want_w)
          for (int64_t j = 0; j < Dv; ++j) bw.dlnw[j] += dot[j] * xhq[j];
        if (want_b)
          for (int64_t j = 0; j < Dv; ++j) bw.dlnb[j] += dot[j];
        ln_bwd_row<T>(xhq, dot, lw, rs, Dv, bw.duq.data());
        // W2: uq = aq φ(W2_t), W2_t = step(α W2_{t−1} − Akᵀ R2)
        const T* aq = bw.AQ.data() + t * Dh;
        T dal2, dbe2, dga2, dal1, dbe1, dga1;
        token_bwd<T, RET, MOM>(cf1, Dh, Dv, Xs + (s + 1) * Sz + S1, Xs + s * Sz + S1,
                               MOM ? Ps + (s + 1) * Sz + S1 : nullptr, MOM ? Ps + s * Sz + S1 : nullptr,
                               dX + S1, MOM ? dP + S1 : nullptr, mw.Ak.data() + t * Dh, aq,
                               mw.R2.data() + t * Dv, bw.duq.data(), a, b, g, bw.auxs2.data() + s * AW2,
                               bw.daq.data(), bw.dAks.data() + t * Dh, bw.dR2.data() + t * Dv, &dal2,
                               &dbe2, &dga2, mw.tmp.data(), mw.tmp2.data());
        // aq = GELU(zq)
        const T* gq = bw.GQ.data() + t * Dh;
        for (int64_t i = 0; i < Dh; ++i) bw.dzq[i] = bw.daq[i] * gq[i];
        // W1: zq = q̃ φ(W1_t), W1_t = step(α W1_{t−1} − kᵀ R1)
        token_bwd<T, RET, MOM>(cf1, Dk, Dh, Xs + (s + 1) * Sz, Xs + s * Sz,
                               MOM ? Ps + (s + 1) * Sz : nullptr, MOM ? Ps + s * Sz : nullptr, dX,
                               MOM ? dP : nullptr, w.Kc.data() + t * Dk, w.Qc.data() + t * Dk,
                               mw.R1.data() + t * Dh, bw.dzq.data(), a, b, g, bw.auxs1.data() + s * AW1,
                               bw.dqt.data(), bw.dKs.data() + t * Dk, bw.dR1.data() + t * Dh, &dal1,
                               &dbe1, &dga1, mw.tmp.data(), mw.tmp2.data());
        T* dq = out.dq + row * Dk;
        for (int64_t i = 0; i < Dk; ++i) dq[i] = cf.scale * (dot[i] + bw.dqt[i]);  // Dk == Dv
        out.dalpha[row] = dal1 + dal2;
        if (MOM && out.dmom) out.dmom[row] = dbe1 + dbe2;
        if (out.drp) out.drp[row] = dga1 + dga2;
      }
    };
    recompute_segments<T, MOM>(Lc, bw.S, Sz, Xst, Pst0, bw.Xcur.data(), MOM ? bw.Pcur.data() : nullptr,
                               bw.ck.data(), MOM ? bw.ckP.data() : nullptr, Xs, Ps, advance, walk);
    mlp_prep_chunk_bwd<T>(cx, mc, w, mw, bw, out, begin, h, t0, Lc);
    // the anchors' read maps: into dX (the anchor is the chunk start) or dA (the step op)
    T* tg1 = dX;
    T* tg2 = dX + S1;
    if (a0) {
      tg1 = out.dA1 ? out.dA1 + o1 : nullptr;
      tg2 = out.dA2 ? out.dA2 + o2 : nullptr;
      if (tg1) std::fill(tg1, tg1 + S1, T(0));
      if (tg2) std::fill(tg2, tg2 + S2, T(0));
      a0_written = true;
    }
    if (tg1)
      phi_vjp_full<T, RET>(cf, Dk, Dh, anc1, mw.WA.data(), bw.dWA.data(), mw.anc_n[0], mw.anc_inv[0],
                           tg1, mw.tmp.data());
    if (tg2)
      phi_vjp_full<T, RET>(cf, Dh, Dv, anc2, mw.WA.data() + S1, bw.dWA.data() + S1, mw.anc_n[1],
                           mw.anc_inv[1], tg2, mw.tmp.data());
  }
  if (out.dX1) std::memcpy(out.dX1 + o1, dX, sizeof(T) * S1);
  if (out.dX2) std::memcpy(out.dX2 + o2, dX + S1, sizeof(T) * S2);
  if (MOM && out.dP1) std::memcpy(out.dP1 + o1, dP, sizeof(T) * S1);
  if (MOM && out.dP2) std::memcpy(out.dP2 + o2, dP + S1, sizeof(T) * S2);
  if (cx.A0 && !a0_written) {
    if (out.dA1) std::fill(out.dA1 + o1, out.dA1 + o1 + S1, T(0));
    if (out.dA2) std::fill(out.dA2 + o2, out.dA2 + o2 + S2, T(0));
  }
  const int64_t task = n * H + h;
  if (want_w) std::memcpy(out.dlnw_part + task * Dv, bw.dlnw.data(), sizeof(T) * Dv);
  if (want_b) std::memcpy(out.dlnb_part + task * Dv, bw.dlnb.data(), sizeof(T) * Dv);
}

// ---- runners -----------------------------------------------------------------------------------------
// (worth_threads: chunk_kernels.h)
struct MlpFwdRunner {
  const MlpFwdParams& p;
  template <typename T, int RET, bool MOM>
  void run() {
    const ChunkFwdParams& f = p.chunk;
    const Ctx<T> cx = make_ctx<T>(f);
    const MCtx<T> mc = make_mctx<T>(p);
    const int64_t H = f.H, Sz = mc.Sz;
    const int64_t Cb = std::max<int64_t>(1, std::min(cx.cf.C, cx.lmax));
    T* chunk_X = static_cast<T*>(f.chunk_X);
    T* chunk_P = MOM ? static_cast<T*>(f.chunk_P) : nullptr;
    T* o = static_cast<T*>(f.o);
    const int64_t ntask = f.N * H;
    const bool par = worth_threads(f, ntask, Sz);
#ifdef _OPENMP
#pragma omp parallel if (par)
#endif
    {
      Work<T> w;
      w.init(Cb, f.Dk, f.Dv);
      MWork<T> mw;
      mw.init(Cb, f.Dk, p.Dh, f.Dv);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
      for (int64_t task = 0; task < ntask; ++task) {
        const int64_t n = task / H, h = task % H;
        T* sx = nullptr;
        T* sp = nullptr;
        if (chunk_X || chunk_P) {
          const int64_t off = saved_offset(f, n, h, cx.cf.C, Sz);
          if (chunk_X) sx = chunk_X + off;
          if (chunk_P) sp = chunk_P + off;
        }
        mlp_fwd_seq<T, RET, MOM>(cx, mc, w, mw, n, h, sx, sp, H * Sz, o, static_cast<T*>(f.XT),
                                 static_cast<T*>(p.XT2), static_cast<T*>(f.PT), static_cast<T*>(p.PT2),
                                 static_cast<T*>(f.AT), static_cast<T*>(p.AT2));
      }
    }
  }
};

struct MlpBwdRunner {
  const MlpBwdParams& p;
  template <typename T, int RET, bool MOM>
  void run() {
    const ChunkFwdParams& f = p.fwd.chunk;
    const Ctx<T> cx = make_ctx<T>(f);
    const MCtx<T> mc = make_mctx<T>(p.fwd);
    const int64_t N = f.N, H = f.H, Dk = f.Dk, Dh = p.fwd.Dh, Dv = f.Dv, Sz = mc.Sz, C = cx.cf.C;
    const int64_t Cb = std::max<int64_t>(1, std::min(C, cx.lmax));
    const int64_t state_bytes = int64_t(sizeof(T)) * Sz * (MOM ? 2 : 1);
    int64_t S = 16;
    if ((Cb + 1) * state_bytes <= seg_budget()) S = Cb;
    S = std::max<int64_t>(1, std::min(S, Cb));
    const T* chunk_X = static_cast<const T*>(f.chunk_X);  // the forward's chunk starts (required)
    const T* chunk_P = static_cast<const T*>(f.chunk_P);
    std::vector<T> dlnw_part(p.dln_weight ? size_t(N * H * Dv) : 0);
    std::vector<T> dlnb_part(p.dln_bias ? size_t(N * H * Dv) : 0);
    MBwdOut<T> out;
    out.dO = static_cast<const T*>(p.dO);
    out.dXT1 = static_cast<const T*>(p.dXT);
    out.dXT2 = static_cast<const T*>(p.dXT2);
    out.dPT1 = static_cast<const T*>(p.dPT);
    out.dPT2 = static_cast<const T*>(p.dPT2);
    out.dq = static_cast<T*>(p.dq);
    out.dk = static_cast<T*>(p.dk);
    out.dv = static_cast<T*>(p.dv);
    out.dlr = static_cast<T*>(p.dlr);
    out.dalpha = static_cast<T*>(p.dalpha);
    out.dmom = static_cast<T*>(p.dmomentum);
    out.dbp = static_cast<T*>(p.dbias_param);
    out.drp = static_cast<T*>(p.dret_param);
    out.dX1 = static_cast<T*>(p.dX0);
    out.dX2 = static_cast<T*>(p.dX2);
    out.dP1 = static_cast<T*>(p.dP0);
    out.dP2 = static_cast<T*>(p.dP2);
    out.dA1 = static_cast<T*>(p.dA0);
    out.dA2 = static_cast<T*>(p.dA2);
    out.dlnw_part = p.dln_weight ? dlnw_part.data() : nullptr;
    out.dlnb_part = p.dln_bias ? dlnb_part.data() : nullptr;
    const int64_t ntask = N * H;
    const bool par = worth_threads(f, ntask, Sz);
#ifdef _OPENMP
#pragma omp parallel if (par)
#endif
    {
      Work<T> w;
      w.init(Cb, Dk, Dv);
      MWork<T> mw;
      mw.init(Cb, Dk, Dh, Dv);
      MBWork<T> bw;
      bw.init(Cb, Dk, Dh, Dv, S, MOM);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
      for (int64_t task = 0; task < ntask; ++task) {
        const int64_t n = task / H, h = task % H;
        const int64_t off = saved_offset(f, n, h, C, Sz);
        const T* sx = chunk_X + off;
        const T* sp = MOM ? chunk_P + off : nullptr;
        mlp_bwd_seq<T, RET, MOM>(cx, mc, w, mw, bw, out, n, h, sx, sp, H * Sz);
      }
    }
    // the LN affine's gradient: per-head sums over the sequences, in sequence order
    auto reduce = [&](const std::vector<T>& part, void* dst) {
      if (!dst) return;
      T* d = static_cast<T*>(dst);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t j = 0; j < Dv; ++j) {
          T s = T(0);
          for (int64_t n = 0; n < N; ++n) s += part[(n * H + h) * Dv + j];
          d[h * Dv + j] = s;
        }
    };
    reduce(dlnw_part, p.dln_weight);
    reduce(dlnb_part, p.dln_bias);
  }
};

inline void run_mlp_fwd(const MlpFwdParams& p) {
  MlpFwdRunner r{p};
  const bool mom = p.chunk.momentum != nullptr;
  if (p.chunk.dtype == kFloat32) dispatch_ret<float>(p.chunk.cfg.retention, mom, r);
  else dispatch_ret<double>(p.chunk.cfg.retention, mom, r);
}
inline void run_mlp_bwd(const MlpBwdParams& p) {
  MlpBwdRunner r{p};
  const bool mom = p.fwd.chunk.momentum != nullptr;
  if (p.fwd.chunk.dtype == kFloat32) dispatch_ret<float>(p.fwd.chunk.cfg.retention, mom, r);
  else dispatch_ret<double>(p.fwd.chunk.cfg.retention, mom, r);
}
