// miras/cuda/chunk_l2_fwd.cu — forward of the chunked dual form (retention l2, linear memory,
// every bias, optional momentum; KERNELS.md §1), plus the family's support check.
//
// Two kernels (CHUNK_L2_NOTES.md):
//   miras_chunk_l2_fwd_state  grid (H*N*NV), sequential over chunks, one 64-wide value tile per
//                             CTA (NV = Dv/64 CTAs per head form a cluster when a norm-based bias
//                             needs whole-row sums); state W (and P) float32 in wmma accumulator
//                             fragments. Per chunk: save W, P (chunk_X/chunk_P), E = K W - V,
//                             Psi~ = lr * psi(E) (to the workspace), W <- g W + f P - K^T diag(F_C) Psi~,
//                             P <- e^{d_C} P - K^T diag(Lb_C) Psi~.
//   miras_chunk_l2_fwd_output grid (slots, H), one chunk per CTA:
//                             O = diag(g) Q~ W0 + diag(f) Q~ P0 - (F o Q~K^T) Psi~.
#include <cooperative_groups.h>

#include <stdexcept>
#include <string>

#include "chunk_l2_common.cuh"
#include "kernels.h"

namespace miras {
namespace cuda {
namespace cl2 {

namespace cg = cooperative_groups;

// ---- state kernel -------------------------------------------------------------------------------
// MMA operand rows are padded (T: +8 elements, fp32: +4) against shared-memory bank conflicts.
template <int DK>
struct FwdStateSmem {
  static constexpr int LK = DK + 8, LB = kBV + 8, LE = kBV + 4;
  size_t Wb, Wl, K, Vr, kstride, vstride, E, PF, PB, PFl, PBl, Fl, Lbl, al, be, lr, bp, g3, part, scratch, total;
  MIRAS_HD FwdStateSmem(int C) {
    Carve c;
    Wb = c.take(sizeof(uint16_t) * DK * LB);
    Wl = c.take(sizeof(uint16_t) * DK * LB);
    // K and the raw V tile are double-buffered: chunk c+1 is fetched (cp.async) while c computes.
    kstride = (sizeof(uint16_t) * C * LK + 127) & ~size_t(127);
    vstride = (sizeof(uint16_t) * C * kBV + 127) & ~size_t(127);
    K = c.take(2 * kstride);
    Vr = c.take(2 * vstride);
    E = c.take(sizeof(float) * C * LE);
    PF = c.take(sizeof(uint16_t) * C * LB);
    PB = c.take(sizeof(uint16_t) * C * LB);
    PFl = c.take(sizeof(uint16_t) * C * LB);
    PBl = c.take(sizeof(uint16_t) * C * LB);
    Fl = c.take(sizeof(float) * C);
    Lbl = c.take(sizeof(float) * C);
    al = c.take(sizeof(float) * C);
    be = c.take(sizeof(float) * C);
    lr = c.take(sizeof(float) * C);
    bp = c.take(sizeof(float) * C);
    g3 = c.take(sizeof(float) * 4);
    part = c.take(sizeof(float) * C);
    scratch = c.take(sizeof(float) * 256 * kWarps);
    total = c.off;
  }
};

template <typename T, int DK, int DV>
__global__ void __launch_bounds__(kThreads, 1)
    miras_chunk_l2_fwd_state(const ChunkFwdParams p, float* __restrict__ chunkX, float* __restrict__ chunkP,
                             T* __restrict__ psi_ws, const int use_cluster) {
  constexpr int NV = DV / kBV;
  MIRAS_DYNAMIC_SMEM(unsigned char, smem, 128);
  const int C = static_cast<int>(p.cfg.chunk_size);
  const FwdStateSmem<DK> L(C);
  constexpr int LK = FwdStateSmem<DK>::LK, LB = FwdStateSmem<DK>::LB, LE = FwdStateSmem<DK>::LE;
  T* sWb = reinterpret_cast<T*>(smem + L.Wb);
  T* sWl = reinterpret_cast<T*>(smem + L.Wl);
  T* sPFl = reinterpret_cast<T*>(smem + L.PFl);
  T* sPBl = reinterpret_cast<T*>(smem + L.PBl);
  float* sE = reinterpret_cast<float*>(smem + L.E);
  T* sPF = reinterpret_cast<T*>(smem + L.PF);
  T* sPB = reinterpret_cast<T*>(smem + L.PB);
  float* sFl = reinterpret_cast<float*>(smem + L.Fl);
  float* sLbl = reinterpret_cast<float*>(smem + L.Lbl);
  float* sal = reinterpret_cast<float*>(smem + L.al);
  float* sbe = reinterpret_cast<float*>(smem + L.be);
  float* slr = reinterpret_cast<float*>(smem + L.lr);
  float* sbp = reinterpret_cast<float*>(smem + L.bp);
  float* sg3 = reinterpret_cast<float*>(smem + L.g3);
  float* spart = reinterpret_cast<float*>(smem + L.part);
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
  const bool use_v = bias_psi_uses_v(kind);
  const bool split = bias_needs_split(kind);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t state_off = (n * H + h) * DK * DV + v0;  // [N,H,Dk,Dv] tile origin

  const T* gk = static_cast<const T*>(p.k);
  const T* gv = static_cast<const T*>(p.v);

  // Fetch of chunk cc: K and V tiles by cp.async into buffer b (no wait), gates into registers
  // (thread i < C holds token i's alpha, beta, lr, bias parameter).
  float g4[4];
  auto fetch = [&](int64_t cc, int b) {
    const int64_t tt0 = cc * C;
    const int ln = static_cast<int>(Lseq - tt0 < C ? Lseq - tt0 : C);
    const int64_t r0 = (bos + tt0) * H + h;
    load_tile_t<T>(reinterpret_cast<T*>(smem + L.K + b * L.kstride), LK, gk + r0 * DK, H * DK, C, ln, DK, false);
    load_tile_t<T>(reinterpret_cast<T*>(smem + L.Vr + b * L.vstride), kBV, gv + r0 * DV + v0, H * DV, C, ln, kBV,
                   false);
    const int i = threadIdx.x;
    if (i < C) {
      if (i < ln) {
        const int64_t row = r0 + (int64_t)i * H;
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
  if (nc > 0) fetch(0, 0);

  StateTiles<DK> W, P;
  if (p.X0)
    W.load_global(static_cast<const float*>(p.X0) + state_off, DV, scratch);
  else
    W.zero();
  if (has_mom && p.P0)
    P.load_global(static_cast<const float*>(p.P0) + state_off, DV, scratch);
  else
    P.zero();

  for (int64_t c = 0; c < nc; ++c) {
    const int64_t t0 = c * C;
    const int len = static_cast<int>(Lseq - t0 < C ? Lseq - t0 : C);
    const int last = len - 1;
    const int64_t row0 = (bos + t0) * H + h;  // token row of the chunk's first token
    const int64_t slot_off = ((base + c) * H + h) * DK * DV + v0;
    const int buf = static_cast<int>(c & 1);
    const T* sK = reinterpret_cast<const T*>(smem + L.K + buf * L.kstride);
    const T* sV = reinterpret_cast<const T*>(smem + L.Vr + buf * L.vstride);

    // 1. save the chunk-start state, its T copy, load K, -V, gates.
    W.store(chunkX + slot_off, DV, sWb, scratch, split ? sWl : nullptr, LB);
    if (has_mom) P.template store<T>(chunkP + slot_off, DV, nullptr, scratch);
    if (c == nc - 1 && (Lseq % C) != 0 && p.AT)
      W.template store<T>(static_cast<float*>(p.AT) + state_off, DV, nullptr, scratch);
    if (threadIdx.x < C) {  // gates fetched earlier (registers) -> shared
      sal[threadIdx.x] = g4[0];
      sbe[threadIdx.x] = g4[1];
      slr[threadIdx.x] = g4[2];
      sbp[threadIdx.x] = g4[3];
    }
    cp_async_wait_all();  // this chunk's K, V (fetched during the previous chunk)
    __syncthreads();
    for (int idx = threadIdx.x; idx < C * kBV; idx += blockDim.x) sE[(idx / kBV) * LE + idx % kBV] = -to_f(sV[idx]);
    // prefetch chunk c+1 into the other buffer (last read in chunk c-1, before its final barrier)
    if (c + 1 < nc) fetch(c + 1, buf ^ 1);

    // 2. last rows of F, Lb and g_C, e^{d_C}, f_C (no C x C matrices); E = K W0 - V.
    gate_last_row(C, last, sal, sbe, sFl, sLbl, sg3);
    block_gemm<T, true, true>(C, kBV, DK, sK, LK, sWb, LB, sE, LE, true);
    if (split) block_gemm<T, true, true>(C, kBV, DK, sK, LK, sWl, LB, sE, LE, true);
    __syncthreads();

    // 3. psi per row (a warp per row; norm-based biases reduce |e|^2 over the whole Dv row,
    //    across the cluster when NV > 1).
    if (norm) {
      for (int r = warp; r < C; r += kWarps) {
        float s = 0.f;
        for (int j = lane; j < kBV; j += 32) s += sE[r * LE + j] * sE[r * LE + j];
        s = warp_sum(s);
        if (lane == 0) spart[r] = s;
      }
      if (use_cluster) cg::this_cluster().sync(); else __syncthreads();
    }
    {
      const float* peer = nullptr;
      if (norm && use_cluster) {
        cg::cluster_group cluster = cg::this_cluster();
        peer = cluster.map_shared_rank(spart, static_cast<int>(cluster.block_rank() ^ 1u));
      }
      for (int r = warp; r < C; r += kWarps) {
        float sumsq = 0.f;
        if (norm) sumsq = spart[r] + (peer ? peer[r] : 0.f);
        const BiasArgs<float> ba = bias_args<float>(p, sbp[r]);
        const float fl = sFl[r], bl = sLbl[r], eta = slr[r];
        for (int j = lane; j < kBV; j += 32) {
          float ps = 0.f;
          if (r < len) {
            const float e = sE[r * LE + j];
            const float vv = use_v ? to_f(sV[r * kBV + j]) : 0.f;
            ps = eta * bias_psi(ba, e, vv, sumsq);
            psi_ws[(row0 + (int64_t)r * H) * DV + v0 + j] = to_t<T>(ps);
          }
          const float xf = -fl * ps, xb = -bl * ps;
          sPF[r * LB + j] = to_t<T>(xf);
          sPB[r * LB + j] = to_t<T>(xb);
          if (split) {
            sPFl[r * LB + j] = to_t<T>(xf - to_f(to_t<T>(xf)));
            sPBl[r * LB + j] = to_t<T>(xb - to_f(to_t<T>(xb)));
          }
        }
      }
    }
    if (norm && use_cluster) cg::this_cluster().sync();  // peers done reading spart
    __syncthreads();

    // 4. state update: W <- g_C W + f_C P - K^T diag(F_C) Psi~;  P <- e^{d_C} P - K^T diag(Lb_C) Psi~.
    {
      const float gl = sg3[0], el = sg3[1], fl = sg3[2];
#pragma unroll
      for (int r = 0; r < StateTiles<DK>::TPW; ++r) {
        for (int e = 0; e < W.f[r].num_elements; ++e) {
          if (has_mom) {
            W.f[r].x[e] = gl * W.f[r].x[e] + fl * P.f[r].x[e];
            P.f[r].x[e] = el * P.f[r].x[e];
          } else {
            W.f[r].x[e] = gl * W.f[r].x[e];
          }
        }
      }
      W.add_at_b(C, sK, LK, sPF, LB);
      if (has_mom) P.add_at_b(C, sK, LK, sPB, LB);
      if (split) {
        W.add_at_b(C, sK, LK, sPFl, LB);
        if (has_mom) P.add_at_b(C, sK, LK, sPBl, LB);
      }
    }
    __syncthreads();
  }

  // final state and anchor
  if (p.XT) W.template store<T>(static_cast<float*>(p.XT) + state_off, DV, nullptr, scratch);
  if (has_mom && p.PT) P.template store<T>(static_cast<float*>(p.PT) + state_off, DV, nullptr, scratch);
  if (p.AT && (Lseq % C) == 0) W.template store<T>(static_cast<float*>(p.AT) + state_off, DV, nullptr, scratch);
}

// ---- output kernel --------------------------------------------------------------------------------
// One CTA per (chunk, head, 64-wide value tile): the Dv tile keeps the state operand at DK x 64 and
// O at C x 64, so that two CTAs fit an SM (S = Q K^T and the gates are recomputed per tile; cheap).
// Regions are reused across phases: Q becomes Qg = diag(g) Q~ in place, A overlays K (dead after
// S), O overlays {F, S} (dead after A).
// Rows are padded (T: +8 elements, fp32: +4) so that the wmma fragment loads of consecutive rows
// fall in different shared-memory banks (a 128-byte row stride maps every row to the same banks).
template <int DK>
struct FwdOutSmem {
  static constexpr int LQ = DK + 8, LV = kBV + 8, LO = kBV + 4;
  static MIRAS_HD int LA(int C) { return C + 8; }
  static MIRAS_HD int LS(int C) { return C + 4; }
  size_t Q, K, A, Psi, Qf, St, G, F, S, O, al, be, gam, Eb, fv, total;
  MIRAS_HD FwdOutSmem(int C, bool mom) {
    Carve c;
    const size_t cc4 = (sizeof(float) * C * C + 127) & ~size_t(127);
    const size_t cs4 = (sizeof(float) * C * LS(C) + 127) & ~size_t(127);
    Q = c.take(sizeof(uint16_t) * C * LQ);
    K = c.take(sizeof(uint16_t) * C * LQ);  // C <= DK: A (C x LA) fits
    A = K;
    Psi = c.take(sizeof(uint16_t) * C * LV);
    Qf = mom ? c.take(sizeof(uint16_t) * C * LQ) : 0;
    St = c.take(sizeof(uint16_t) * DK * LV);
    const size_t go = sizeof(float) * C * LO;
    G = c.take(cc4 + cs4 > go ? cc4 + cs4 : go);
    F = G;
    S = G + cc4;
    O = G;
    al = c.take(sizeof(float) * C);
    be = c.take(sizeof(float) * C);
    gam = c.take(sizeof(float) * C);
    Eb = c.take(sizeof(float) * C);
    fv = c.take(sizeof(float) * C);
    total = c.off;
  }
};

template <typename T, int DK, int DV>
__global__ void __launch_bounds__(kThreads, 2)
    miras_chunk_l2_fwd_output(const ChunkFwdParams p, const float* __restrict__ chunkX,
                              const float* __restrict__ chunkP, const T* __restrict__ psi_ws) {
  constexpr int NV = DV / kBV;
  MIRAS_DYNAMIC_SMEM(unsigned char, smem, 128);
  const int C = static_cast<int>(p.cfg.chunk_size);
  const bool has_mom = p.momentum != nullptr;
  const FwdOutSmem<DK> L(C, has_mom);
  int64_t n, c;
  if (!slot_to_chunk(p, blockIdx.x / NV, &n, &c)) return;
  const int v0 = static_cast<int>(blockIdx.x % NV) * kBV;
  const int64_t H = p.H, h = blockIdx.y;
  const int64_t bos = seq_begin(p.cu_seqlens, n, p.T);
  const int64_t Lseq = seq_len(p.cu_seqlens, n, p.T);
  const int64_t t0 = c * C;
  const int len = static_cast<int>(Lseq - t0 < C ? Lseq - t0 : C);
  const int64_t row0 = (bos + t0) * H + h;
  const int64_t slot = chunk_base(p.cu_seqlens, n, p.T, C) + c;
  const int64_t slot_off = (slot * H + h) * DK * DV + v0;
  const float scale = static_cast<float>(p.cfg.scale);

  T* sQ = reinterpret_cast<T*>(smem + L.Q);
  T* sK = reinterpret_cast<T*>(smem + L.K);
  T* sA = reinterpret_cast<T*>(smem + L.A);
  T* sPsi = reinterpret_cast<T*>(smem + L.Psi);
  T* sQf = reinterpret_cast<T*>(smem + L.Qf);
  T* sSt = reinterpret_cast<T*>(smem + L.St);
  float* sF = reinterpret_cast<float*>(smem + L.F);
  float* sS = reinterpret_cast<float*>(smem + L.S);
  float* sO = reinterpret_cast<float*>(smem + L.O);
  float* sal = reinterpret_cast<float*>(smem + L.al);
  float* sbe = reinterpret_cast<float*>(smem + L.be);
  float* sgam = reinterpret_cast<float*>(smem + L.gam);
  float* sEb = reinterpret_cast<float*>(smem + L.Eb);
  float* sfv = reinterpret_cast<float*>(smem + L.fv);

  constexpr int LQ = FwdOutSmem<DK>::LQ, LV = FwdOutSmem<DK>::LV, LO = FwdOutSmem<DK>::LO;
  const int LA = FwdOutSmem<DK>::LA(C), LS = FwdOutSmem<DK>::LS(C);

  // 1. loads (cp.async for the T tiles, batched fp32 loads for the state tile)
  load_tile_t<T>(sQ, LQ, static_cast<const T*>(p.q) + row0 * DK, H * DK, C, len, DK, false);
  load_tile_t<T>(sK, LQ, static_cast<const T*>(p.k) + row0 * DK, H * DK, C, len, DK, false);
  load_tile_t<T>(sPsi, LV, psi_ws + row0 * DV + v0, H * DV, C, len, kBV, false);
  load_gates(p, row0, H, C, len, sal, sbe, nullptr, nullptr);
  load_tile_f2t<T, 8>(sSt, LV, chunkX + slot_off, DV, DK, kBV);
  cp_async_wait_all();
  __syncthreads();

  // 2. gates (F, gam, f only); S = Q K^T
  gate_mats(C, sal, sbe, nullptr, nullptr, sF, sgam, sEb, sfv);
  block_gemm<T, true, false>(C, C, DK, sQ, LQ, sK, LQ, sS, LS, false);
  __syncthreads();

  // 3. A = -(F o Q~K^T) (F is zero above the diagonal; A overlays K);
  //    Qg = diag(g) Q~ in place of Q, Qf = diag(f) Q~.
  for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) {
    const int t = idx / C, i = idx % C;
    // (mutation 1 of the emulator's mutation test: a wrong sign)
    sA[t * LA + i] = to_t<T>((MIRAS_MUTANT(1) ? scale : -scale) * sF[idx] * sS[t * LS + i]);
  }
  for (int idx = threadIdx.x; idx < C * DK; idx += blockDim.x) {
    const int t = idx / DK, a = t * LQ + idx % DK;
    const float qv = scale * to_f(sQ[a]);
    if (has_mom) sQf[a] = to_t<T>(sfv[t] * qv);
    sQ[a] = to_t<T>(sgam[t] * qv);
  }
  __syncthreads();

  // 4. O = A Psi~ + Qg W0 (+ Qf P0). sO overlays F, S (dead now).
  block_gemm<T, true, true>(C, kBV, C, sA, LA, sPsi, LV, sO, LO, false);
  block_gemm<T, true, true>(C, kBV, DK, sQ, LQ, sSt, LV, sO, LO, true);
  __syncthreads();
  if (has_mom) {
    load_tile_f2t<T, 8>(sSt, LV, chunkP + slot_off, DV, DK, kBV);
    __syncthreads();
    block_gemm<T, true, true>(C, kBV, DK, sQf, LQ, sSt, LV, sO, LO, true);
    __syncthreads();
  }

  // 5. write o (this value tile)
  T* go = static_cast<T*>(p.o);
  for (int idx = threadIdx.x; idx < len * kBV; idx += blockDim.x) {
    const int t = idx / kBV, j = idx % kBV;
    go[(row0 + (int64_t)t * H) * DV + v0 + j] = to_t<T>(sO[t * LO + j]);
  }
}

// ---- host side ------------------------------------------------------------------------------------
struct FwdWs {
  size_t psi = 0, cx = 0, cp = 0, total = 0;
};
inline FwdWs fwd_ws_layout(const ChunkFwdParams& p) {
  FwdWs w;
  const int64_t total_tokens = p.cu_seqlens ? p.T : p.N * p.T;
  const int64_t slots = slots_of(p);
  size_t off = 0;
  w.psi = off;
  off += align256(sizeof(uint16_t) * (size_t)total_tokens * p.H * p.Dv);
  if (!p.chunk_X) {
    w.cx = off;
    off += align256(sizeof(float) * (size_t)slots * p.H * p.Dk * p.Dv);
  }
  if (p.momentum && !p.chunk_P) {
    w.cp = off;
    off += align256(sizeof(float) * (size_t)slots * p.H * p.Dk * p.Dv);
  }
  w.total = off;
  return w;
}

template <typename T, int DK, int DV>
void launch_fwd(const ChunkFwdParams& p, void* workspace, cudaStream_t stream) {
  constexpr int NV = DV / kBV;
  const int C = static_cast<int>(p.cfg.chunk_size);
  const FwdWs w = fwd_ws_layout(p);
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  T* psi = reinterpret_cast<T*>(ws + w.psi);
  float* cx = p.chunk_X ? static_cast<float*>(p.chunk_X) : reinterpret_cast<float*>(ws + w.cx);
  float* cp = nullptr;
  if (p.momentum) cp = p.chunk_P ? static_cast<float*>(p.chunk_P) : reinterpret_cast<float*>(ws + w.cp);

  if (p.N * p.H > 0) {
    const size_t smem = FwdStateSmem<DK>(C).total;
    auto kern = miras_chunk_l2_fwd_state<T, DK, DV>;
    set_smem(kern, smem, "miras_chunk_l2_fwd_state");
    const int use_cluster = (NV > 1 && bias_needs_row_norm(p.cfg.bias)) ? 1 : 0;
    launch_state_kernel(kern, "miras_chunk_l2_fwd_state", static_cast<unsigned>(p.N * p.H * NV),
                        use_cluster ? NV : 1, smem, stream, p, cx, cp, psi, use_cluster);
  }
  const int64_t slots = slots_of(p);
  if (slots > 0 && p.H > 0) {
    const size_t smem = FwdOutSmem<DK>(C, p.momentum != nullptr).total;
    auto kern = miras_chunk_l2_fwd_output<T, DK, DV>;
    set_smem(kern, smem, "miras_chunk_l2_fwd_output");
    if (slots * NV > 0x7fffffffLL) throw std::invalid_argument("miras: too many chunks for one launch");
    MIRAS_LAUNCH(kern, dim3(static_cast<unsigned>(slots * NV), static_cast<unsigned>(p.H)), kThreads, smem, stream)(p, cx, cp, psi);
    check_launch("miras_chunk_l2_fwd_output");
  }
}

template <typename T>
void launch_fwd_t(const ChunkFwdParams& p, void* ws, cudaStream_t s) {
  if (p.Dk == 64 && p.Dv == 64) return launch_fwd<T, 64, 64>(p, ws, s);
  if (p.Dk == 64 && p.Dv == 128) return launch_fwd<T, 64, 128>(p, ws, s);
  if (p.Dk == 128 && p.Dv == 64) return launch_fwd<T, 128, 64>(p, ws, s);
  return launch_fwd<T, 128, 128>(p, ws, s);
}

}  // namespace cl2

// ---- family interface (kernels.h) ----------------------------------------------------------------
static bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

const char* chunk_l2_unsupported(const ChunkFwdParams& p) {
  if (p.cfg.retention != kRetL2) return "the chunked tensor-core path supports retention 'l2' only";
  if (p.dtype != kFloat16 && p.dtype != kBFloat16)
    return "the chunked tensor-core path needs float16 or bfloat16 q/k/v";
  if (!((p.Dk == 64 || p.Dk == 128) && (p.Dv == 64 || p.Dv == 128)))
    return "the chunked tensor-core path needs head dims Dk, Dv in {64, 128}";
  const int64_t C = p.cfg.chunk_size;
  if (!(C == 16 || C == 32 || C == 64)) return "the chunked tensor-core path needs chunk_size 16, 32 or 64";
  if (!bias_known(p.cfg.bias)) return "unknown bias kind";
  if (p.A0) return "the chunked tensor-core path does not take a separate first-chunk anchor (A0)";
  if (!p.q || !p.k || !p.v || !p.lr || !p.alpha) return "q, k, v, lr and alpha are required";
  if (p.N < 0 || p.T < 0 || p.H <= 0) return "bad sizes";
  if (!p.cu_seqlens && p.N * num_chunks(p.T, C) > 0x7fffffffLL) return "too many chunks for one launch";
  if (p.cu_seqlens && (p.T / C + p.N) > 0x7fffffffLL) return "too many chunks for one launch";
  if (p.N * p.H * 2 > 0x7fffffffLL) return "too many sequences x heads for one launch";
  if (p.H > 65535) return "the chunked tensor-core path supports at most 65535 heads";
  // float32 saved states are read with 16-byte vector loads when aligned, scalar otherwise;
  // nothing else needs alignment. Keep the check cheap and permissive.
  (void)aligned16;
  return nullptr;
}

size_t chunk_l2_fwd_workspace(const ChunkFwdParams& p) { return cl2::fwd_ws_layout(p).total; }

void chunk_l2_fwd(const ChunkFwdParams& p, void* workspace, cudaStream_t stream) {
  if (const char* why = chunk_l2_unsupported(p)) throw std::invalid_argument(std::string("miras: ") + why);
  if (p.dtype == kBFloat16)
    cl2::launch_fwd_t<__nv_bfloat16>(p, workspace, stream);
  else
    cl2::launch_fwd_t<__half>(p, workspace, stream);
}

}  // namespace cuda
}  // namespace miras
