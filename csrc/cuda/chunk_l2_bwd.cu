// miras/cuda/chunk_l2_bwd.cu — backward of the chunked dual form (retention l2, linear memory,
// every bias, optional momentum; KERNELS.md §1, §3).
//
// Two kernels (CHUNK_L2_NOTES.md):
//   miras_chunk_l2_bwd_state  grid (H*N*NV), reverse over chunks, one 64-wide value tile per CTA
//                             (NV = Dv/64 CTAs of one head form a cluster that reduces the row
//                             sums of the psi VJP, dlr and dbias_param through distributed shared
//                             memory). Carries dW (and dP) in float32 wmma fragments; per chunk it
//                             saves the carry arriving at the chunk end (dW_C, dP_C), recomputes
//                             E, computes dPsi~, the psi VJP (dE), writes dv, dlr, dbias_param and
//                             Psi~, dE (input dtype) to the workspace, then
//                             dW <- Q~^T diag(g) dO + g_C dW + K^T dE, dP <- Q~^T diag(f) dO + f_C dW + e^{d_C} dP.
//                             Ends with dX0 (and dP0).
//   miras_chunk_l2_bwd_chunk  grid (slots, H), one chunk per CTA, everything local to a chunk given
//                             W0, P0 (saved by the forward) and dW_C, dP_C: dq, dk, dalpha, dmomentum.
#include <cooperative_groups.h>

#include <stdexcept>
#include <string>

#include "chunk_l2_common.cuh"
#include "kernels.h"

namespace miras {
namespace cuda {
namespace cl2 {

namespace cg = cooperative_groups;

// ---- reverse state-gradient kernel ----------------------------------------------------------------
// MMA operand rows are padded (T: +8 elements, fp32: +4) against shared-memory bank conflicts.
template <int DK>
struct BwdStateSmem {
  static constexpr int LK = DK + 8, LB = kBV + 8, LE = kBV + 4;
  static MIRAS_HD int LS(int C) { return C + 4; }
  static MIRAS_HD int LA(int C) { return C + 8; }
  size_t Q, K, dO, Vr, RW, RWl, dPb, E, RS, dE, GdO, FdO, G, Lb, F, X, DPsi, A, al, be, lr, bp, gam, Eb, fv, Fl, Lbl,
      psumsq, pedpsi, pdlr, pdbp, scratch, total;
  MIRAS_HD BwdStateSmem(int C) {
    Carve c;
    const size_t cc4 = (sizeof(float) * C * C + 127) & ~size_t(127);
    const size_t cs4 = (sizeof(float) * C * LS(C) + 127) & ~size_t(127);
    const size_t cv2 = (sizeof(uint16_t) * C * LB + 127) & ~size_t(127);
    const size_t cv4 = (sizeof(float) * C * LE + 127) & ~size_t(127);
    Q = c.take(sizeof(uint16_t) * C * LK);
    K = c.take(sizeof(uint16_t) * C * LK);
    dO = c.take(sizeof(uint16_t) * C * LB);
    Vr = c.take(sizeof(uint16_t) * C * kBV);  // raw V tile (cp.async), -> E = -V and psi(e, v)
    RW = c.take(sizeof(uint16_t) * DK * LB);  // W0 (T) for E, then the T copy of dW_C
    RWl = c.take(sizeof(uint16_t) * DK * LB);  // lo half of W0 (split biases)
    dPb = c.take(sizeof(uint16_t) * DK * LB);
    E = c.take(sizeof(float) * C * LE);
    // RS: S = Q K^T (fp32 C x LS) until A is built, then dE and g*dO (T, C x LB each).
    RS = c.take(cs4 > 2 * cv2 ? cs4 : 2 * cv2);
    dE = RS;
    GdO = RS + cv2;
    FdO = c.take(sizeof(uint16_t) * C * LB);
    // G: Lb, F (fp32 C x C each) until A is built, then X and dPsi~ (fp32 C x LE each).
    G = c.take(2 * cc4 > 2 * cv4 ? 2 * cc4 : 2 * cv4);
    Lb = G;
    F = G + cc4;
    X = G;
    DPsi = G + cv4;
    A = c.take(sizeof(uint16_t) * C * LA(C));
    al = c.take(sizeof(float) * C);
    be = c.take(sizeof(float) * C);
    lr = c.take(sizeof(float) * C);
    bp = c.take(sizeof(float) * C);
    gam = c.take(sizeof(float) * C);
    Eb = c.take(sizeof(float) * C);
    fv = c.take(sizeof(float) * C);
    Fl = c.take(sizeof(float) * C);
    Lbl = c.take(sizeof(float) * C);
    psumsq = c.take(sizeof(float) * C);
    pedpsi = c.take(sizeof(float) * C);
    pdlr = c.take(sizeof(float) * C);
    pdbp = c.take(sizeof(float) * C);
    scratch = c.take(sizeof(float) * 256 * kWarps);
    total = c.off;
  }
};

struct BwdPtrs {
  float* dWC;   // [slots, H, Dk, Dv] carry arriving at each chunk's end
  float* dPC;   // same, momentum (nullptr without)
  void* psi;    // [total, H, Dv] Psi~ (input dtype)
  void* dE;     // [total, H, Dv] dE (input dtype)
  const float* chunkX;
  const float* chunkP;
};

template <typename T, int DK, int DV>
__global__ void __launch_bounds__(kThreads, 1)
    miras_chunk_l2_bwd_state(const ChunkBwdParams bp_, const BwdPtrs w, const int use_cluster) {
  constexpr int NV = DV / kBV;
  const ChunkFwdParams& p = bp_.fwd;
  MIRAS_DYNAMIC_SMEM(unsigned char, smem, 128);
  const int C = static_cast<int>(p.cfg.chunk_size);
  const BwdStateSmem<DK> L(C);
  constexpr int LK = BwdStateSmem<DK>::LK, LB = BwdStateSmem<DK>::LB, LE = BwdStateSmem<DK>::LE;
  const int LS = BwdStateSmem<DK>::LS(C), LA = BwdStateSmem<DK>::LA(C);
  T* sQ = reinterpret_cast<T*>(smem + L.Q);
  T* sK = reinterpret_cast<T*>(smem + L.K);
  T* sdO = reinterpret_cast<T*>(smem + L.dO);
  T* sVr = reinterpret_cast<T*>(smem + L.Vr);
  T* sRW = reinterpret_cast<T*>(smem + L.RW);
  T* sRWl = reinterpret_cast<T*>(smem + L.RWl);
  T* sdPb = reinterpret_cast<T*>(smem + L.dPb);
  float* sE = reinterpret_cast<float*>(smem + L.E);
  float* sS = reinterpret_cast<float*>(smem + L.RS);
  T* sdE = reinterpret_cast<T*>(smem + L.dE);
  T* sGdO = reinterpret_cast<T*>(smem + L.GdO);
  T* sFdO = reinterpret_cast<T*>(smem + L.FdO);
  float* sLb = reinterpret_cast<float*>(smem + L.Lb);
  float* sF = reinterpret_cast<float*>(smem + L.F);
  float* sX = reinterpret_cast<float*>(smem + L.X);
  float* sDPsi = reinterpret_cast<float*>(smem + L.DPsi);
  T* sA = reinterpret_cast<T*>(smem + L.A);
  float* sal = reinterpret_cast<float*>(smem + L.al);
  float* sbe = reinterpret_cast<float*>(smem + L.be);
  float* slr = reinterpret_cast<float*>(smem + L.lr);
  float* sbp = reinterpret_cast<float*>(smem + L.bp);
  float* sgam = reinterpret_cast<float*>(smem + L.gam);
  float* sEb = reinterpret_cast<float*>(smem + L.Eb);
  float* sfv = reinterpret_cast<float*>(smem + L.fv);
  float* sFl = reinterpret_cast<float*>(smem + L.Fl);
  float* sLbl = reinterpret_cast<float*>(smem + L.Lbl);
  float* psumsq = reinterpret_cast<float*>(smem + L.psumsq);
  float* pedpsi = reinterpret_cast<float*>(smem + L.pedpsi);
  float* pdlr = reinterpret_cast<float*>(smem + L.pdlr);
  float* pdbp = reinterpret_cast<float*>(smem + L.pdbp);
  float* scratch = reinterpret_cast<float*>(smem + L.scratch) + 256 * (threadIdx.x >> 5);

  const int rank = blockIdx.x % NV;  // value tile; == cluster rank when launched as a cluster
  const int64_t nh = blockIdx.x / NV;
  const int64_t H = p.H;
  const int64_t n = nh / H, h = nh % H;
  const int v0 = rank * kBV;
  const int64_t bos = seq_begin(p.cu_seqlens, n, p.T);
  const int64_t Lseq = seq_len(p.cu_seqlens, n, p.T);
  const int64_t nc = num_chunks(Lseq, C);
  const int64_t base = chunk_base(p.cu_seqlens, n, p.T, C);
  const bool has_mom = p.momentum != nullptr;
  const int kind = p.cfg.bias;
  const bool norm = bias_needs_row_norm(kind);
  const bool need_ed = bias_needs_edpsi(kind);
  const bool use_v = bias_psi_uses_v(kind);
  const bool split = bias_needs_split(kind);
  const float scale = static_cast<float>(p.cfg.scale);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t state_off = (n * H + h) * DK * DV + v0;

  const T* gq = static_cast<const T*>(p.q);
  const T* gk = static_cast<const T*>(p.k);
  const T* gv = static_cast<const T*>(p.v);
  const T* gdO = static_cast<const T*>(bp_.dO);
  T* psi_ws = static_cast<T*>(w.psi);
  T* dE_ws = static_cast<T*>(w.dE);
  float* gdv = static_cast<float*>(bp_.dv);
  float* gdlr = static_cast<float*>(bp_.dlr);
  float* gdbp = static_cast<float*>(bp_.dbias_param);

  // peer arrays of the other value tile (cluster of 2), nullptr when alone
  const float *peer_sumsq = nullptr, *peer_ed = nullptr, *peer_dlr = nullptr, *peer_dbp = nullptr;
  if (use_cluster) {
    cg::cluster_group cluster = cg::this_cluster();
    const int other = static_cast<int>(cluster.block_rank() ^ 1u);
    peer_sumsq = cluster.map_shared_rank(psumsq, other);
    peer_ed = cluster.map_shared_rank(pedpsi, other);
    peer_dlr = cluster.map_shared_rank(pdlr, other);
    peer_dbp = cluster.map_shared_rank(pdbp, other);
  }
  auto xsync = [&]() {
    if (use_cluster)
      cg::this_cluster().sync();
    else
      __syncthreads();
  };

  // gates of chunk cc into registers (thread i < C: alpha, beta, lr, bias parameter of token i);
  // issued one chunk ahead so that their latency is off the critical path.
  float g4[4];
  auto fetch_gates = [&](int64_t cc) {
    const int64_t tt0 = cc * C;
    const int ln = static_cast<int>(Lseq - tt0 < C ? Lseq - tt0 : C);
    const int i = threadIdx.x;
    if (i < C) {
      if (i < ln) {
        const int64_t row = (bos + tt0 + i) * H + h;
        g4[0] = static_cast<const float*>(p.alpha)[row];
        g4[1] = p.momentum ? static_cast<const float*>(p.momentum)[row] : 0.f;
        g4[2] = static_cast<const float*>(p.lr)[row];
        g4[3] = p.bias_param ? static_cast<const float*>(p.bias_param)[row] : static_cast<float>(p.cfg.bias_param);
      } else {
        g4[0] = 1.f;
        g4[1] = 0.f;
        g4[2] = 0.f;
        g4[3] = 1.f;
      }
    }
  };
  if (nc > 0) fetch_gates(nc - 1);

  StateTiles<DK> dW, dP;
  if (bp_.dXT)
    dW.load_global(static_cast<const float*>(bp_.dXT) + state_off, DV, scratch);
  else
    dW.zero();
  if (has_mom && bp_.dPT)
    dP.load_global(static_cast<const float*>(bp_.dPT) + state_off, DV, scratch);
  else
    dP.zero();

  for (int64_t c = nc - 1; c >= 0; --c) {
    const int64_t t0 = c * C;
    const int len = static_cast<int>(Lseq - t0 < C ? Lseq - t0 : C);
    const int last = len - 1;
    const int64_t row0 = (bos + t0) * H + h;
    const int64_t slot_off = ((base + c) * H + h) * DK * DV + v0;

    // 1. loads (T tiles by cp.async, issued first so that they are in flight while the carry is
    //    stored; then the fp32 W0 tile; one wait); save the carry (gradient arriving at this chunk's end).
    load_tile_t<T>(sQ, LK, gq + row0 * DK, H * DK, C, len, DK, false);
    load_tile_t<T>(sK, LK, gk + row0 * DK, H * DK, C, len, DK, false);
    load_tile_t<T>(sdO, LB, gdO + row0 * DV + v0, H * DV, C, len, kBV, false);
    load_tile_t<T>(sVr, kBV, gv + row0 * DV + v0, H * DV, C, len, kBV, false);
    dW.template store<T>(w.dWC + slot_off, DV, nullptr, scratch);
    if (has_mom) dP.template store<T>(w.dPC + slot_off, DV, nullptr, scratch);
    if (threadIdx.x < C) {  // this chunk's gates (fetched one chunk ahead) -> shared
      sal[threadIdx.x] = g4[0];
      sbe[threadIdx.x] = g4[1];
      slr[threadIdx.x] = g4[2];
      sbp[threadIdx.x] = g4[3];
    }
    if (c > 0) fetch_gates(c - 1);
    load_tile_f2t<T, 8>(sRW, LB, w.chunkX + slot_off, DV, DK, kBV);
    if (split) load_tile_f2t_lo<T>(sRWl, LB, w.chunkX + slot_off, DV, DK, kBV);
    cp_async_wait_all();
    __syncthreads();
    for (int idx = threadIdx.x; idx < C * kBV; idx += blockDim.x) sE[(idx / kBV) * LE + idx % kBV] = -to_f(sVr[idx]);

    // 2. gates (Lg is not needed here: not stored); S = Q K^T (unscaled); E = K W0 - V.
    gate_mats(C, sal, sbe, nullptr, sLb, sF, sgam, sEb, sfv);
    block_gemm<T, true, false>(C, C, DK, sQ, LK, sK, LK, sS, LS, false);
    block_gemm<T, true, true>(C, kBV, DK, sK, LK, sRW, LB, sE, LE, true);
    if (split) block_gemm<T, true, true>(C, kBV, DK, sK, LK, sRWl, LB, sE, LE, true);
    __syncthreads();

    // 3. sA = -(F o Q~K^T); last rows of F, Lb; T copies of the carry (RW now holds dW_C).
    for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) {
      const int t = idx / C, i = idx % C;
      sA[t * LA + i] = to_t<T>(-scale * sF[idx] * sS[t * LS + i]);
    }
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
      sFl[i] = sF[last * C + i];
      sLbl[i] = sLb[last * C + i];
    }
    dW.store(static_cast<float*>(nullptr), 0, sRW, scratch, static_cast<T*>(nullptr), LB);
    if (has_mom) dP.store(static_cast<float*>(nullptr), 0, sdPb, scratch, static_cast<T*>(nullptr), LB);
    __syncthreads();

    // 4. dPsi~ = -A^T dO - diag(F_C) K dW_C - diag(Lb_C) K dP_C   (G now holds X, dPsi~)
    block_gemm<T, true, true>(C, kBV, DK, sK, LK, sRW, LB, sX, LE, false);
    if (!MIRAS_MUTANT(2)) __syncthreads();  // (mutation 2 of the emulator's mutation test: a skipped barrier)
    for (int idx = threadIdx.x; idx < C * kBV; idx += blockDim.x) {
      const int e = (idx / kBV) * LE + idx % kBV;
      sDPsi[e] = -sFl[idx / kBV] * sX[e];
    }
    __syncthreads();
    if (has_mom) {
      block_gemm<T, true, true>(C, kBV, DK, sK, LK, sdPb, LB, sX, LE, false);
      __syncthreads();
      for (int idx = threadIdx.x; idx < C * kBV; idx += blockDim.x) {
        const int e = (idx / kBV) * LE + idx % kBV;
        sDPsi[e] -= sLbl[idx / kBV] * sX[e];
      }
      __syncthreads();
    }
    block_gemm<T, false, true>(C, kBV, C, sA, LA, sdO, LB, sDPsi, LE, true);
    __syncthreads();

    // 5. psi VJP per row (a warp per row; row sums across the cluster).
    if (norm) {
      for (int r = warp; r < C; r += kWarps) {
        float s = 0.f;
        for (int j = lane; j < kBV; j += 32) s += sE[r * LE + j] * sE[r * LE + j];
        s = warp_sum(s);
        if (lane == 0) psumsq[r] = s;
      }
      xsync();
      if (need_ed) {
        for (int r = warp; r < C; r += kWarps) {  // edpsi = sum_j e_j dpsi_j, dpsi = lr dPsi~
          float s = 0.f;
          for (int j = lane; j < kBV; j += 32) s += sE[r * LE + j] * (slr[r] * sDPsi[r * LE + j]);
          s = warp_sum(s);
          if (lane == 0) pedpsi[r] = s;
        }
        xsync();
      }
    }
    for (int r = warp; r < C; r += kWarps) {
      const float sumsq = norm ? psumsq[r] + (peer_sumsq ? peer_sumsq[r] : 0.f) : 0.f;
      const float edpsi = need_ed ? pedpsi[r] + (peer_ed ? peer_ed[r] : 0.f) : 0.f;
      const BiasArgs<float> ba = bias_args<float>(p, sbp[r]);
      const float eta = slr[r];
      const int64_t grow = row0 + (int64_t)r * H;  // token row (valid when r < len)
      float pl = 0.f, pb = 0.f;
      for (int j = lane; j < kBV; j += 32) {
        const int idx = r * kBV + j, ie = r * LE + j, ib = r * LB + j;
        float de = 0.f;
        if (r < len) {
          const float e = sE[ie];
          const float vv = use_v ? to_f(sVr[idx]) : 0.f;
          const float ps = bias_psi(ba, e, vv, sumsq);
          const float dps = sDPsi[ie];
          const float dpsi = eta * dps;
          de = bias_vjp_e(ba, e, dpsi, sumsq, edpsi);
          pl += dps * ps;
          pb += bias_vjp_param(ba, e, dpsi, sumsq);
          gdv[grow * DV + v0 + j] = -de - (use_v ? dpsi : 0.f);
          psi_ws[grow * DV + v0 + j] = to_t<T>(eta * ps);
          dE_ws[grow * DV + v0 + j] = to_t<T>(de);
        }
        sdE[ib] = to_t<T>(de);
        const float dov = to_f(sdO[ib]);
        sGdO[ib] = to_t<T>(scale * sgam[r] * dov);
        sFdO[ib] = to_t<T>(scale * sfv[r] * dov);
      }
      pl = warp_sum(pl);
      pb = warp_sum(pb);
      if (lane == 0) {
        pdlr[r] = pl;
        pdbp[r] = pb;
      }
    }
    xsync();
    if (rank == 0) {
      for (int r = threadIdx.x; r < len; r += blockDim.x) {
        const int64_t grow = row0 + (int64_t)r * H;
        gdlr[grow] = pdlr[r] + (peer_dlr ? peer_dlr[r] : 0.f);
        if (gdbp) gdbp[grow] = pdbp[r] + (peer_dbp ? peer_dbp[r] : 0.f);
      }
    }
    xsync();  // the peer has read our partial sums

    // 6. carry: dP <- e^{d_C} dP + f_C dW + Q~^T diag(f) dO;  dW <- g_C dW + Q~^T diag(g) dO + K^T dE.
    {
      const float gl = sgam[last], fl = sfv[last], el = sEb[last];
#pragma unroll
      for (int r = 0; r < StateTiles<DK>::TPW; ++r) {
        for (int e = 0; e < dW.f[r].num_elements; ++e) {
          if (has_mom) dP.f[r].x[e] = el * dP.f[r].x[e] + fl * dW.f[r].x[e];
          dW.f[r].x[e] = gl * dW.f[r].x[e];
        }
      }
      dW.add_at_b(C, sQ, LK, sGdO, LB);
      dW.add_at_b(C, sK, LK, sdE, LB);
      if (has_mom) dP.add_at_b(C, sQ, LK, sFdO, LB);
    }
    __syncthreads();
  }

  if (bp_.dX0) dW.template store<T>(static_cast<float*>(bp_.dX0) + state_off, DV, nullptr, scratch);
  if (has_mom && bp_.dP0) dP.template store<T>(static_cast<float*>(bp_.dP0) + state_off, DV, nullptr, scratch);
}

// ---- per-chunk gradient kernel --------------------------------------------------------------------
constexpr int kKT = 32;  // Dk tile of the dq/dk loop (32: all four state tiles of a Dk tile fit at once)

// MMA operand rows are padded (T: +8 elements, fp32: +4) against shared-memory bank conflicts.
template <int DK, int DV>
struct BwdChunkSmem {
  static constexpr int LQ = DK + 8, LV = DV + 8, LY = kKT + 4;
  static MIRAS_HD int LC(int C) { return C + 4; }  // fp32 S, DS
  static MIRAS_HD int LM(int C) { return C + 8; }  // T M
  size_t Q, K, dO, Psi, dE, Z, F, S, DS, SW, SP, SG, SD, Y1, Y2, dQt, dKt, dRg, dRb, Mg, Mb, Lg, Lb, GF, M, al, be,
      gam, Eb, fv, Fl, Lbl, Gg, Gf, r1, r2, red, total;
  MIRAS_HD BwdChunkSmem(int C) {
    Carve c;
    auto a128 = [](size_t b) { return (b + 127) & ~size_t(127); };
    const size_t cc4 = a128(sizeof(float) * C * C), cs4 = a128(sizeof(float) * C * LC(C));
    // region In (phases A-B) followed by region Z; phase C overlays both.
    const size_t in0 = c.off;
    Q = c.take(sizeof(uint16_t) * C * LQ);
    K = c.take(sizeof(uint16_t) * C * LQ);
    dO = c.take(sizeof(uint16_t) * C * LV);
    Psi = c.take(sizeof(uint16_t) * C * LV);
    dE = c.take(sizeof(uint16_t) * C * LV);
    const size_t zA = cc4 + 2 * cs4;
    // phase B: the four state tiles of one Dk tile (W0, P0, dW_C, dP_C rows k0..k0+kKT) and Y1, Y2, dQt, dKt
    const size_t st = a128(sizeof(uint16_t) * kKT * LV), ct = a128(sizeof(float) * C * LY);
    const size_t zB = 4 * st + 4 * ct;
    Z = c.take(zA > zB ? zA : zB);
    F = Z;
    S = Z + cc4;
    DS = Z + cc4 + cs4;
    SW = Z;
    SP = Z + st;
    SG = Z + 2 * st;
    SD = Z + 3 * st;
    Y1 = Z + 4 * st;
    Y2 = Y1 + ct;
    dQt = Y2 + ct;
    dKt = dQt + ct;
    const size_t crr = a128(sizeof(float) * C * (C + 1));
    const size_t needC = 4 * crr;
    if (c.off - in0 < needC) c.off = in0 + ((needC + 127) & ~size_t(127));
    dRg = in0;
    dRb = in0 + crr;
    Mg = in0 + 2 * crr;
    Mb = in0 + 3 * crr;
    Lg = c.take(sizeof(float) * C * C);
    Lb = c.take(sizeof(float) * C * C);
    GF = c.take(sizeof(float) * C * (C + 1));  // row stride C + 1: phase C walks rows and columns
    M = c.take(sizeof(uint16_t) * C * LM(C));
    al = c.take(sizeof(float) * C);
    be = c.take(sizeof(float) * C);
    gam = c.take(sizeof(float) * C);
    Eb = c.take(sizeof(float) * C);
    fv = c.take(sizeof(float) * C);
    Fl = c.take(sizeof(float) * C);
    Lbl = c.take(sizeof(float) * C);
    Gg = c.take(sizeof(float) * C);
    Gf = c.take(sizeof(float) * C);
    r1 = c.take(sizeof(float) * C);
    r2 = c.take(sizeof(float) * C);
    red = c.take(sizeof(float) * 4 * kWarps);
    total = c.off;
  }
};

// Row-wise: for each row t (a warp per row), Y[t][a] (a < kKT, row stride ly): acc[t] += mul * sum_a Y[t][a] *
// Xr[t][a], and D[t][a] += csign * coef[t] * Y[t][a] (D has row stride ly).
template <typename T>
__device__ __forceinline__ void rows_dot_axpy(int C, const float* Y, int ly, const T* Xr, int ldx, float mul,
                                              float* acc, float* D, const float* coef, float csign) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int t = warp; t < C; t += kWarps) {
    float s = 0.f;
    const float ct = csign * coef[t];
    for (int a = lane; a < kKT; a += 32) {
      const float y = Y[t * ly + a];
      s += y * to_f(Xr[t * ldx + a]);
      D[t * ly + a] += ct * y;
    }
    s = warp_sum(s);
    if (lane == 0) acc[t] += mul * s;
  }
}

template <typename T, int DK, int DV>
__global__ void __launch_bounds__(kThreads, 1)
    miras_chunk_l2_bwd_chunk(const ChunkBwdParams bp_, const BwdPtrs w) {
  const ChunkFwdParams& p = bp_.fwd;
  MIRAS_DYNAMIC_SMEM(unsigned char, smem, 128);
  const int C = static_cast<int>(p.cfg.chunk_size);
  const BwdChunkSmem<DK, DV> L(C);
  int64_t n, c;
  if (!slot_to_chunk(p, blockIdx.x, &n, &c)) return;
  const int64_t H = p.H, h = blockIdx.y;
  const int64_t bos = seq_begin(p.cu_seqlens, n, p.T);
  const int64_t Lseq = seq_len(p.cu_seqlens, n, p.T);
  const int64_t t0 = c * C;
  const int len = static_cast<int>(Lseq - t0 < C ? Lseq - t0 : C);
  const int last = len - 1;
  const int64_t row0 = (bos + t0) * H + h;
  const int64_t slot = chunk_base(p.cu_seqlens, n, p.T, C) + c;
  const int64_t slot_off = (slot * H + h) * DK * DV;
  const bool has_mom = p.momentum != nullptr;
  const float scale = static_cast<float>(p.cfg.scale);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  T* sQ = reinterpret_cast<T*>(smem + L.Q);
  T* sK = reinterpret_cast<T*>(smem + L.K);
  T* sdO = reinterpret_cast<T*>(smem + L.dO);
  T* sPsi = reinterpret_cast<T*>(smem + L.Psi);
  T* sdE = reinterpret_cast<T*>(smem + L.dE);
  constexpr int LQ = BwdChunkSmem<DK, DV>::LQ, LV = BwdChunkSmem<DK, DV>::LV, LY = BwdChunkSmem<DK, DV>::LY;
  const int LC = BwdChunkSmem<DK, DV>::LC(C), LM = BwdChunkSmem<DK, DV>::LM(C);
  float* sF = reinterpret_cast<float*>(smem + L.F);
  float* sS = reinterpret_cast<float*>(smem + L.S);
  float* sDS = reinterpret_cast<float*>(smem + L.DS);
  T* sSW = reinterpret_cast<T*>(smem + L.SW);
  T* sSP = reinterpret_cast<T*>(smem + L.SP);
  T* sSG = reinterpret_cast<T*>(smem + L.SG);
  T* sSD = reinterpret_cast<T*>(smem + L.SD);
  float* sY1 = reinterpret_cast<float*>(smem + L.Y1);
  float* sY2 = reinterpret_cast<float*>(smem + L.Y2);
  float* sdQt = reinterpret_cast<float*>(smem + L.dQt);
  float* sdKt = reinterpret_cast<float*>(smem + L.dKt);
  float* sdRg = reinterpret_cast<float*>(smem + L.dRg);
  float* sdRb = reinterpret_cast<float*>(smem + L.dRb);
  float* sMg = reinterpret_cast<float*>(smem + L.Mg);
  float* sMb = reinterpret_cast<float*>(smem + L.Mb);
  float* sLg = reinterpret_cast<float*>(smem + L.Lg);
  float* sLb = reinterpret_cast<float*>(smem + L.Lb);
  float* sGF = reinterpret_cast<float*>(smem + L.GF);
  T* sM = reinterpret_cast<T*>(smem + L.M);
  float* sal = reinterpret_cast<float*>(smem + L.al);
  float* sbe = reinterpret_cast<float*>(smem + L.be);
  float* sgam = reinterpret_cast<float*>(smem + L.gam);
  float* sEb = reinterpret_cast<float*>(smem + L.Eb);
  float* sfv = reinterpret_cast<float*>(smem + L.fv);
  float* sFl = reinterpret_cast<float*>(smem + L.Fl);
  float* sLbl = reinterpret_cast<float*>(smem + L.Lbl);
  float* sGg = reinterpret_cast<float*>(smem + L.Gg);
  float* sGf = reinterpret_cast<float*>(smem + L.Gf);
  float* sr1 = reinterpret_cast<float*>(smem + L.r1);
  float* sr2 = reinterpret_cast<float*>(smem + L.r2);
  float* sred = reinterpret_cast<float*>(smem + L.red);

  const float* W0 = w.chunkX + slot_off;
  const float* P0 = has_mom ? w.chunkP + slot_off : nullptr;
  const float* dWC = w.dWC + slot_off;
  const float* dPC = has_mom ? w.dPC + slot_off : nullptr;

  // State tiles (rows k0..k0+kKT of W0, dW_C, P0, dP_C; fp32 global) go through registers: `issue`
  // loads them (NB float4 per array per thread, all in flight together), `commit` converts them to T
  // in shared memory and accumulates the chunk scalars s1 = <W0, dW_C>, s2 = <P0, dW_C>,
  // s3 = <P0, dP_C> from the same registers (no separate pass over the states). The loads of tile k0
  // are issued before the GEMMs that precede their use, so their latency overlaps that work.
  constexpr int NB = kKT * DV / 4 / kThreads;
  static_assert(NB >= 1 && (kKT * DV / 4) % kThreads == 0, "state tile must divide into float4 per thread");
  uintptr_t al16 = reinterpret_cast<uintptr_t>(W0) | reinterpret_cast<uintptr_t>(dWC);
  if (has_mom) al16 |= reinterpret_cast<uintptr_t>(P0) | reinterpret_cast<uintptr_t>(dPC);
  const bool vec = (al16 & 15) == 0;
  float4 rw[NB], rg[NB], rp[NB], rd[NB];
  float a1 = 0.f, a2 = 0.f, a3 = 0.f;
  auto issue = [&](int k0) {
    if (!vec) return;
#pragma unroll
    for (int u = 0; u < NB; ++u) {
      const int64_t off = (int64_t)k0 * DV + (threadIdx.x + u * kThreads) * 4;
      rw[u] = *reinterpret_cast<const float4*>(W0 + off);
      rg[u] = *reinterpret_cast<const float4*>(dWC + off);
      if (has_mom) {
        rp[u] = *reinterpret_cast<const float4*>(P0 + off);
        rd[u] = *reinterpret_cast<const float4*>(dPC + off);
      }
    }
  };
  auto put4 = [](T* d, const float4& x) {
    d[0] = to_t<T>(x.x);
    d[1] = to_t<T>(x.y);
    d[2] = to_t<T>(x.z);
    d[3] = to_t<T>(x.w);
  };
  auto dot4 = [](const float4& x, const float4& y) { return x.x * y.x + x.y * y.y + x.z * y.z + x.w * y.w; };
  auto commit = [&](int k0) {
    if (vec) {
#pragma unroll
      for (int u = 0; u < NB; ++u) {
        const int idx = threadIdx.x + u * kThreads;  // float4 index inside the kKT x DV tile
        const int e = (idx / (DV / 4)) * LV + (idx % (DV / 4)) * 4;
        put4(sSW + e, rw[u]);
        put4(sSG + e, rg[u]);
        a1 += dot4(rw[u], rg[u]);
        if (has_mom) {
          put4(sSP + e, rp[u]);
          put4(sSD + e, rd[u]);
          a2 += dot4(rp[u], rg[u]);
          a3 += dot4(rp[u], rd[u]);
        }
      }
    } else {
      for (int idx = threadIdx.x; idx < kKT * DV; idx += blockDim.x) {
        const int64_t g = (int64_t)k0 * DV + idx;
        const int e = (idx / DV) * LV + idx % DV;
        const float wv = W0[g], gv = dWC[g];
        sSW[e] = to_t<T>(wv);
        sSG[e] = to_t<T>(gv);
        a1 += wv * gv;
        if (has_mom) {
          const float pv = P0[g], dv = dPC[g];
          sSP[e] = to_t<T>(pv);
          sSD[e] = to_t<T>(dv);
          a2 += pv * gv;
          a3 += pv * dv;
        }
      }
    }
  };

  // 0. loads (T tiles by cp.async, gates, the first state tile into registers).
  load_tile_t<T>(sQ, LQ, static_cast<const T*>(p.q) + row0 * DK, H * DK, C, len, DK, false);
  load_tile_t<T>(sK, LQ, static_cast<const T*>(p.k) + row0 * DK, H * DK, C, len, DK, false);
  load_tile_t<T>(sdO, LV, static_cast<const T*>(bp_.dO) + row0 * DV, H * DV, C, len, DV, false);
  load_tile_t<T>(sPsi, LV, static_cast<const T*>(w.psi) + row0 * DV, H * DV, C, len, DV, false);
  load_tile_t<T>(sdE, LV, static_cast<const T*>(w.dE) + row0 * DV, H * DV, C, len, DV, false);
  load_gates(p, row0, H, C, len, sal, sbe, nullptr, nullptr);
  issue(0);
  cp_async_wait_all();
  __syncthreads();

  // A. gates; S = Q K^T (unscaled); DS = dO Psi~^T; then
  //    dS = -DS (lower), GF = (Q~K^T) o dS, M = scale * F o dS (the (F o dS) operand, q-scale folded).
  gate_mats(C, sal, sbe, sLg, sLb, sF, sgam, sEb, sfv);
  block_gemm<T, true, false>(C, C, DK, sQ, LQ, sK, LQ, sS, LC, false);
  block_gemm<T, true, false>(C, C, DV, sdO, LV, sPsi, LV, sDS, LC, false);
  __syncthreads();
  for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) {
    const int t = idx / C, i = idx % C;
    const float dS = i <= t ? -sDS[t * LC + i] : 0.f;
    sGF[t * (C + 1) + i] = scale * sS[t * LC + i] * dS;
    sM[t * LM + i] = to_t<T>(scale * sF[idx] * dS);
  }
  for (int i = threadIdx.x; i < C; i += blockDim.x) {
    sFl[i] = sF[last * C + i];
    sLbl[i] = sLb[last * C + i];
    sGg[i] = 0.f;
    sGf[i] = 0.f;
    sr1[i] = 0.f;
    sr2[i] = 0.f;
  }
  __syncthreads();

  // B. dq, dk by Dk tiles of kKT columns (rows k0.. of the states).
  float* gdq = static_cast<float*>(bp_.dq);
  float* gdk = static_cast<float*>(bp_.dk);
  // (mutation 3 of the emulator's mutation test: an off-by-one tile loop)
  for (int k0 = 0; k0 < DK - (MIRAS_MUTANT(3) ? kKT : 0); k0 += kKT) {
    // (a) (F o dS) K and (F o dS)^T Q~ while this tile's state loads are in flight; then the state
    //     tiles -> shared (F and S/DS of region Z are dead: the tiles overlay them)
    if (k0 > 0) issue(k0);
    block_gemm<T, true, true>(C, kKT, C, sM, LM, sK + k0, LQ, sdQt, LY, false);
    block_gemm<T, false, true>(C, kKT, C, sM, LM, sQ + k0, LQ, sdKt, LY, false);
    commit(k0);
    __syncthreads();
    // (b) Y1 = dO W0^T, Y2 = Psi~ dW_C^T, dk += dE W0^T
    block_gemm<T, true, false>(C, kKT, DV, sdO, LV, sSW, LV, sY1, LY, false);
    block_gemm<T, true, false>(C, kKT, DV, sPsi, LV, sSG, LV, sY2, LY, false);
    block_gemm<T, true, false>(C, kKT, DV, sdE, LV, sSW, LV, sdKt, LY, true);
    __syncthreads();
    //     dq += scale g_t Y1, Gg += scale <Y1_t, q_t>;  dk -= F_C[i] Y2, r1 += <Y2_i, k_i>
    rows_dot_axpy<T>(C, sY1, LY, sQ + k0, LQ, scale, sGg, sdQt, sgam, scale);
    rows_dot_axpy<T>(C, sY2, LY, sK + k0, LQ, 1.f, sr1, sdKt, sFl, -1.f);
    __syncthreads();
    // (c) momentum: Y1 = dO P0^T, Y2 = Psi~ dP_C^T: dq += scale f_t Y1, Gf += scale <Y1_t, q_t>;
    //     dk -= Lb_C[i] Y2, r2 += <Y2_i, k_i>
    if (has_mom) {
      block_gemm<T, true, false>(C, kKT, DV, sdO, LV, sSP, LV, sY1, LY, false);
      block_gemm<T, true, false>(C, kKT, DV, sPsi, LV, sSD, LV, sY2, LY, false);
      __syncthreads();
      rows_dot_axpy<T>(C, sY1, LY, sQ + k0, LQ, scale, sGf, sdQt, sfv, scale);
      rows_dot_axpy<T>(C, sY2, LY, sK + k0, LQ, 1.f, sr2, sdKt, sLbl, -1.f);
      __syncthreads();
    }
    // (d) write this Dk tile of dq, dk
    for (int idx = threadIdx.x; idx < len * kKT; idx += blockDim.x) {
      const int t = idx / kKT, a = idx % kKT;
      const int64_t g = (row0 + (int64_t)t * H) * DK + k0 + a;
      gdq[g] = sdQt[t * LY + a];
      gdk[g] = sdKt[t * LY + a];
    }
    __syncthreads();
  }
  a1 = warp_sum(a1);
  a2 = warp_sum(a2);
  a3 = warp_sum(a3);
  if (lane == 0) {
    sred[warp * 4 + 0] = a1;
    sred[warp * 4 + 1] = a2;
    sred[warp * 4 + 2] = a3;
  }
  __syncthreads();

  // C. gate gradients (regions In and Z are dead: dRg, dRb, Mg, Mb overlay them).
  if (threadIdx.x == 0) {
    float s1 = 0.f, s2 = 0.f;
    for (int k = 0; k < kWarps; ++k) {
      s1 += sred[k * 4 + 0];
      s2 += sred[k * 4 + 1];
    }
    sGg[last] += s1;  // <W0, dW_C>: gamma_C in W_C
    sGf[last] += s2;  // <P0, dW_C>: f_C in W_C
  }
  for (int i = threadIdx.x; i <= last; i += blockDim.x) sGF[last * (C + 1) + i] -= sr1[i];  // F_C in W_C
  __syncthreads();
  float s3 = 0.f;
  for (int k = 0; k < kWarps; ++k) s3 += sred[k * 4 + 2];  // <P0, dP_C>: e^{d_C} in P_C
  const int C1 = C + 1;
  // dR matrices (column 0 is the virtual index -1: gam for alpha, Eb for beta), by recurrences
  // that use Lb[s][i] = be_s Lb[s-1][i] and Lg[t][s] = al_{s+1} Lg[t][s+1] (O(C) per row/column):
  // dRg[t][0] = d gam_t;  dRg[t][s+1] = dLg[t][s] = X[t][s] + Gf[t] Eb[s] (s <= t),
  //   X[t][s] = sum_{i<=s} GF[t][i] Lb[s][i] = GF[t][s] + be_s X[t][s-1];
  // dRb[s][i+1] = dLb[s][i] = Y[s][i] (- r2[i] at s = last) (i <= s),
  //   Y[s][i] = sum_{t>=s} Lg[t][s] GF[t][i] = GF[s][i] + al_{s+1} Y[s+1][i];
  // dRb[s][0] = d Eb_s = Z[s] (+ s3 at s = last),  Z[s] = Gf[s] + al_{s+1} Z[s+1].
  for (int task = threadIdx.x; task < 2 * C + 1; task += blockDim.x) {
    if (task < C) {
      const int t = task;
      sdRg[t * C1] = sGg[t];
      float x = 0.f;
#pragma unroll 4
      for (int s2 = 0; s2 < C; ++s2) {
        float g = 0.f;
        if (s2 <= t) {
          x = sGF[t * C1 + s2] + (s2 > 0 ? sbe[s2] * x : 0.f);
          g = x + sGf[t] * sEb[s2];
        }
        sdRg[t * C1 + s2 + 1] = g;
      }
    } else if (task < 2 * C) {
      const int i = task - C;
      float y = 0.f;
#pragma unroll 4
      for (int s2 = C - 1; s2 >= 0; --s2) {
        float bb = 0.f;
        if (s2 >= i) {
          y = sGF[s2 * C1 + i] + (s2 + 1 < C ? sal[s2 + 1] * y : 0.f);
          bb = y - (s2 == last ? sr2[i] : 0.f);
        }
        sdRb[s2 * C1 + i + 1] = bb;
      }
    } else {
      float z = 0.f;
#pragma unroll 4
      for (int s2 = C - 1; s2 >= 0; --s2) {
        z = sGf[s2] + (s2 + 1 < C ? sal[s2 + 1] * z : 0.f);
        sdRb[s2 * C1] = z + ((s2 == last && has_mom) ? s3 : 0.f);
      }
    }
  }
  __syncthreads();
  // M[t][r+1] = dR[t][0] R[r][-1] + sum_{s=0..r} dR[t][s+1] R[r][s]   (-1 <= r <= t-1)
  //           = dR[t][r+1] + g_r M[t][r]   (R[r][s] = g_r R[r-1][s], R[r][r] = 1, R[-1][-1] = 1)
  for (int task = threadIdx.x; task < 2 * C; task += blockDim.x) {
    const bool isb = task >= C;
    const int t = isb ? task - C : task;
    const float* dR = isb ? sdRb : sdRg;
    const float* gate = isb ? sbe : sal;
    float* Mo = isb ? sMb : sMg;
    float m = dR[t * C1];
    Mo[t * C1] = m;
#pragma unroll 4
    for (int r = 0; r < C; ++r) {
      float out = 0.f;
      if (r <= t - 1) {
        m = dR[t * C1 + r + 1] + gate[r] * m;
        out = m;
      }
      Mo[t * C1 + r + 1] = out;
    }
  }
  __syncthreads();
  // d gate_j = sum_{t>=j} R[t][j] M[t][j]   (leave-one-out products: no division by a gate)
  float* gda = static_cast<float*>(bp_.dalpha);
  float* gdb = static_cast<float*>(bp_.dmomentum);
  for (int j = threadIdx.x; j < len; j += blockDim.x) {
    float da = 0.f, db = 0.f;
#pragma unroll 4
    for (int t = j; t < C; ++t) {
      da += sLg[t * C + j] * sMg[t * C1 + j];
      db += sLb[t * C + j] * sMb[t * C1 + j];
    }
    const int64_t g = row0 + (int64_t)j * H;
    gda[g] = da;
    if (has_mom && gdb) gdb[g] = db;
  }
}

// ---- host side ------------------------------------------------------------------------------------
struct BwdWs {
  size_t dwc = 0, dpc = 0, psi = 0, de = 0, total = 0;
};
inline BwdWs bwd_ws_layout(const ChunkFwdParams& p) {
  BwdWs w;
  const int64_t total_tokens = p.cu_seqlens ? p.T : p.N * p.T;
  const size_t st = sizeof(float) * (size_t)slots_of(p) * p.H * p.Dk * p.Dv;
  const size_t tok = sizeof(uint16_t) * (size_t)total_tokens * p.H * p.Dv;
  size_t off = 0;
  w.dwc = off;
  off += align256(st);
  if (p.momentum) {
    w.dpc = off;
    off += align256(st);
  }
  w.psi = off;
  off += align256(tok);
  w.de = off;
  off += align256(tok);
  w.total = off;
  return w;
}

template <typename T, int DK, int DV>
void launch_bwd(const ChunkBwdParams& b, void* workspace, cudaStream_t stream) {
  constexpr int NV = DV / kBV;
  const ChunkFwdParams& p = b.fwd;
  const int C = static_cast<int>(p.cfg.chunk_size);
  const BwdWs wl = bwd_ws_layout(p);
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  BwdPtrs w;
  w.dWC = reinterpret_cast<float*>(ws + wl.dwc);
  w.dPC = p.momentum ? reinterpret_cast<float*>(ws + wl.dpc) : nullptr;
  w.psi = ws + wl.psi;
  w.dE = ws + wl.de;
  w.chunkX = static_cast<const float*>(p.chunk_X);
  w.chunkP = static_cast<const float*>(p.chunk_P);

  if (b.dret_param) {
    const int64_t total_tokens = p.cu_seqlens ? p.T : p.N * p.T;
    cudaMemsetAsync(b.dret_param, 0, sizeof(float) * (size_t)total_tokens * p.H, stream);
  }
  if (p.N * p.H > 0) {
    const size_t smem = BwdStateSmem<DK>(C).total;
    auto kern = miras_chunk_l2_bwd_state<T, DK, DV>;
    set_smem(kern, smem, "miras_chunk_l2_bwd_state");
    const int use_cluster = NV > 1 ? 1 : 0;
    launch_state_kernel(kern, "miras_chunk_l2_bwd_state", static_cast<unsigned>(p.N * p.H * NV),
                        use_cluster ? NV : 1, smem, stream, b, w, use_cluster);
  }
  const int64_t slots = slots_of(p);
  if (slots > 0 && p.H > 0) {
    const size_t smem = BwdChunkSmem<DK, DV>(C).total;
    auto kern = miras_chunk_l2_bwd_chunk<T, DK, DV>;
    set_smem(kern, smem, "miras_chunk_l2_bwd_chunk");
    MIRAS_LAUNCH(kern, dim3(static_cast<unsigned>(slots), static_cast<unsigned>(p.H)), kThreads, smem, stream)(b, w);
    check_launch("miras_chunk_l2_bwd_chunk");
  }
}

template <typename T>
void launch_bwd_t(const ChunkBwdParams& b, void* ws, cudaStream_t s) {
  const ChunkFwdParams& p = b.fwd;
  if (p.Dk == 64 && p.Dv == 64) return launch_bwd<T, 64, 64>(b, ws, s);
  if (p.Dk == 64 && p.Dv == 128) return launch_bwd<T, 64, 128>(b, ws, s);
  if (p.Dk == 128 && p.Dv == 64) return launch_bwd<T, 128, 64>(b, ws, s);
  return launch_bwd<T, 128, 128>(b, ws, s);
}

}  // namespace cl2

size_t chunk_l2_bwd_workspace(const ChunkBwdParams& p) { return cl2::bwd_ws_layout(p.fwd).total; }

void chunk_l2_bwd(const ChunkBwdParams& b, void* workspace, cudaStream_t stream) {
  const ChunkFwdParams& p = b.fwd;
  if (const char* why = chunk_l2_unsupported(p)) throw std::invalid_argument(std::string("miras: ") + why);
  if (!b.dO) throw std::invalid_argument("miras: chunk_l2_bwd: dO may not be null");
  if (!p.chunk_X || (p.momentum && !p.chunk_P))
    throw std::invalid_argument("miras: chunk_l2_bwd needs the forward's saved chunk_X (and chunk_P with momentum)");
  if (!b.dq || !b.dk || !b.dv || !b.dlr || !b.dalpha || (p.momentum && !b.dmomentum))
    throw std::invalid_argument("miras: chunk_l2_bwd: dq, dk, dv, dlr, dalpha (and dmomentum) are required");
  if (p.dtype == kBFloat16)
    cl2::launch_bwd_t<__nv_bfloat16>(b, workspace, stream);
  else
    cl2::launch_bwd_t<__half>(b, workspace, stream);
}

}  // namespace cuda
}  // namespace miras
