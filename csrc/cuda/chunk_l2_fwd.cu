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
template <int DK>
struct FwdStateSmem {
  size_t Wb, Wl, K, E, PF, PB, PFl, PBl, Lg, Lb, F, al, be, lr, bp, gam, Eb, fv, part, scratch, total;
  MIRAS_HD FwdStateSmem(int C) {
    Carve c;
    Wb = c.take(sizeof(uint16_t) * DK * kBV);
    Wl = c.take(sizeof(uint16_t) * DK * kBV);
    K = c.take(sizeof(uint16_t) * C * DK);
    E = c.take(sizeof(float) * C * kBV);
    PF = c.take(sizeof(uint16_t) * C * kBV);
    PB = c.take(sizeof(uint16_t) * C * kBV);
    PFl = c.take(sizeof(uint16_t) * C * kBV);
    PBl = c.take(sizeof(uint16_t) * C * kBV);
    Lg = c.take(sizeof(float) * C * C);
    Lb = c.take(sizeof(float) * C * C);
    F = c.take(sizeof(float) * C * C);
    al = c.take(sizeof(float) * C);
    be = c.take(sizeof(float) * C);
    lr = c.take(sizeof(float) * C);
    bp = c.take(sizeof(float) * C);
    gam = c.take(sizeof(float) * C);
    Eb = c.take(sizeof(float) * C);
    fv = c.take(sizeof(float) * C);
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
  extern __shared__ __align__(128) unsigned char smem[];
  const int C = static_cast<int>(p.cfg.chunk_size);
  const FwdStateSmem<DK> L(C);
  T* sWb = reinterpret_cast<T*>(smem + L.Wb);
  T* sWl = reinterpret_cast<T*>(smem + L.Wl);
  T* sPFl = reinterpret_cast<T*>(smem + L.PFl);
  T* sPBl = reinterpret_cast<T*>(smem + L.PBl);
  T* sK = reinterpret_cast<T*>(smem + L.K);
  float* sE = reinterpret_cast<float*>(smem + L.E);
  T* sPF = reinterpret_cast<T*>(smem + L.PF);
  T* sPB = reinterpret_cast<T*>(smem + L.PB);
  float* sLg = reinterpret_cast<float*>(smem + L.Lg);
  float* sLb = reinterpret_cast<float*>(smem + L.Lb);
  float* sF = reinterpret_cast<float*>(smem + L.F);
  float* sal = reinterpret_cast<float*>(smem + L.al);
  float* sbe = reinterpret_cast<float*>(smem + L.be);
  float* slr = reinterpret_cast<float*>(smem + L.lr);
  float* sbp = reinterpret_cast<float*>(smem + L.bp);
  float* sgam = reinterpret_cast<float*>(smem + L.gam);
  float* sEb = reinterpret_cast<float*>(smem + L.Eb);
  float* sfv = reinterpret_cast<float*>(smem + L.fv);
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

    // 1. save the chunk-start state, its T copy, load K, -V, gates.
    W.store(chunkX + slot_off, DV, sWb, scratch, split ? sWl : nullptr);
    if (has_mom) P.template store<T>(chunkP + slot_off, DV, nullptr, scratch);
    if (c == nc - 1 && (Lseq % C) != 0 && p.AT)
      W.template store<T>(static_cast<float*>(p.AT) + state_off, DV, nullptr, scratch);
    load_tile_t<T>(sK, DK, gk + row0 * DK, H * DK, C, len, DK);
    load_tile_t2f<T>(sE, kBV, gv + row0 * DV + v0, H * DV, C, len, kBV, -1.f);
    load_gates(p, row0, H, C, len, sal, sbe, slr, sbp);
    __syncthreads();

    // 2. gate matrices (F, gam, f, Eb); E = K W0 - V.
    gate_mats(C, sal, sbe, sLg, sLb, sF, sgam, sEb, sfv);
    block_gemm<T, true, true>(C, kBV, DK, sK, DK, sWb, kBV, sE, kBV, true);
    if (split) block_gemm<T, true, true>(C, kBV, DK, sK, DK, sWl, kBV, sE, kBV, true);
    __syncthreads();

    // 3. psi per row (a warp per row; norm-based biases reduce |e|^2 over the whole Dv row,
    //    across the cluster when NV > 1).
    if (norm) {
      for (int r = warp; r < C; r += kWarps) {
        float s = 0.f;
        for (int j = lane; j < kBV; j += 32) s += sE[r * kBV + j] * sE[r * kBV + j];
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
        const float fl = sF[last * C + r], bl = sLb[last * C + r], eta = slr[r];
        for (int j = lane; j < kBV; j += 32) {
          float ps = 0.f;
          if (r < len) {
            const float e = sE[r * kBV + j];
            const float vv = use_v ? to_f(gv[(row0 + (int64_t)r * H) * DV + v0 + j]) : 0.f;
            ps = eta * bias_psi(ba, e, vv, sumsq);
            psi_ws[(row0 + (int64_t)r * H) * DV + v0 + j] = to_t<T>(ps);
          }
          const float xf = -fl * ps, xb = -bl * ps;
          sPF[r * kBV + j] = to_t<T>(xf);
          sPB[r * kBV + j] = to_t<T>(xb);
          if (split) {
            sPFl[r * kBV + j] = to_t<T>(xf - to_f(to_t<T>(xf)));
            sPBl[r * kBV + j] = to_t<T>(xb - to_f(to_t<T>(xb)));
          }
        }
      }
    }
    if (norm && use_cluster) cg::this_cluster().sync();  // peers done reading spart
    __syncthreads();

    // 4. state update: W <- g_C W + f_C P - K^T diag(F_C) Psi~;  P <- e^{d_C} P - K^T diag(Lb_C) Psi~.
    {
      const float gl = sgam[last], fl = sfv[last], el = sEb[last];
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
      W.add_at_b(C, sK, DK, sPF);
      if (has_mom) P.add_at_b(C, sK, DK, sPB);
      if (split) {
        W.add_at_b(C, sK, DK, sPFl);
        if (has_mom) P.add_at_b(C, sK, DK, sPBl);
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
template <int DK, int DV>
struct FwdOutSmem {
  size_t Q, K, Psi, S, A, Qg, Qf, St, G, Lg, Lb, F, O, al, be, gam, Eb, fv, total;
  MIRAS_HD FwdOutSmem(int C, bool mom) {
    Carve c;
    Q = c.take(sizeof(uint16_t) * C * DK);
    K = c.take(sizeof(uint16_t) * C * DK);
    Psi = c.take(sizeof(uint16_t) * C * DV);
    S = c.take(sizeof(float) * C * C);
    A = c.take(sizeof(uint16_t) * C * C);
    Qg = c.take(sizeof(uint16_t) * C * DK);
    Qf = mom ? c.take(sizeof(uint16_t) * C * DK) : 0;
    St = c.take(sizeof(uint16_t) * DK * DV);
    // G: {Lg, Lb, F} while building the gates, then O (fp32 C x DV).
    const size_t g3 = 3 * ((sizeof(float) * C * C + 127) & ~size_t(127));
    const size_t go = sizeof(float) * C * DV;
    G = c.take(g3 > go ? g3 : go);
    Lg = G;
    Lb = G + ((sizeof(float) * C * C + 127) & ~size_t(127));
    F = Lb + ((sizeof(float) * C * C + 127) & ~size_t(127));
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
__global__ void __launch_bounds__(kThreads, 1)
    miras_chunk_l2_fwd_output(const ChunkFwdParams p, const float* __restrict__ chunkX,
                              const float* __restrict__ chunkP, const T* __restrict__ psi_ws) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int C = static_cast<int>(p.cfg.chunk_size);
  const bool has_mom = p.momentum != nullptr;
  const FwdOutSmem<DK, DV> L(C, has_mom);
  int64_t n, c;
  if (!slot_to_chunk(p, blockIdx.x, &n, &c)) return;
  const int64_t H = p.H, h = blockIdx.y;
  const int64_t bos = seq_begin(p.cu_seqlens, n, p.T);
  const int64_t Lseq = seq_len(p.cu_seqlens, n, p.T);
  const int64_t t0 = c * C;
  const int len = static_cast<int>(Lseq - t0 < C ? Lseq - t0 : C);
  const int64_t row0 = (bos + t0) * H + h;
  const int64_t slot = chunk_base(p.cu_seqlens, n, p.T, C) + c;
  const int64_t slot_off = (slot * H + h) * DK * DV;
  const float scale = static_cast<float>(p.cfg.scale);

  T* sQ = reinterpret_cast<T*>(smem + L.Q);
  T* sK = reinterpret_cast<T*>(smem + L.K);
  T* sPsi = reinterpret_cast<T*>(smem + L.Psi);
  float* sS = reinterpret_cast<float*>(smem + L.S);
  T* sA = reinterpret_cast<T*>(smem + L.A);
  T* sQg = reinterpret_cast<T*>(smem + L.Qg);
  T* sQf = reinterpret_cast<T*>(smem + L.Qf);
  T* sSt = reinterpret_cast<T*>(smem + L.St);
  float* sLg = reinterpret_cast<float*>(smem + L.Lg);
  float* sLb = reinterpret_cast<float*>(smem + L.Lb);
  float* sF = reinterpret_cast<float*>(smem + L.F);
  float* sO = reinterpret_cast<float*>(smem + L.O);
  float* sal = reinterpret_cast<float*>(smem + L.al);
  float* sbe = reinterpret_cast<float*>(smem + L.be);
  float* sgam = reinterpret_cast<float*>(smem + L.gam);
  float* sEb = reinterpret_cast<float*>(smem + L.Eb);
  float* sfv = reinterpret_cast<float*>(smem + L.fv);

  // 1. loads
  load_tile_t<T>(sQ, DK, static_cast<const T*>(p.q) + row0 * DK, H * DK, C, len, DK);
  load_tile_t<T>(sK, DK, static_cast<const T*>(p.k) + row0 * DK, H * DK, C, len, DK);
  load_tile_t<T>(sPsi, DV, psi_ws + row0 * DV, H * DV, C, len, DV);
  load_tile_f2t<T>(sSt, DV, chunkX + slot_off, DV, DK, DV);
  load_gates(p, row0, H, C, len, sal, sbe, nullptr, nullptr);
  __syncthreads();

  // 2. gates; S = Q K^T
  gate_mats(C, sal, sbe, sLg, sLb, sF, sgam, sEb, sfv);
  block_gemm<T, true, false>(C, C, DK, sQ, DK, sK, DK, sS, C, false);
  __syncthreads();

  // 3. A = -(F o Q~K^T) (F is zero above the diagonal); Qg = diag(g) Q~, Qf = diag(f) Q~.
  for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) sA[idx] = to_t<T>(-scale * sF[idx] * sS[idx]);
  for (int idx = threadIdx.x; idx < C * DK; idx += blockDim.x) {
    const int t = idx / DK;
    const float qv = scale * to_f(sQ[idx]);
    sQg[idx] = to_t<T>(sgam[t] * qv);
    if (has_mom) sQf[idx] = to_t<T>(sfv[t] * qv);
  }
  __syncthreads();

  // 4. O = A Psi~ + Qg W0 (+ Qf P0). sO overlays the gate matrices (dead now).
  block_gemm<T, true, true>(C, DV, C, sA, C, sPsi, DV, sO, DV, false);
  block_gemm<T, true, true>(C, DV, DK, sQg, DK, sSt, DV, sO, DV, true);
  __syncthreads();
  if (has_mom) {
    load_tile_f2t<T>(sSt, DV, chunkP + slot_off, DV, DK, DV);
    __syncthreads();
    block_gemm<T, true, true>(C, DV, DK, sQf, DK, sSt, DV, sO, DV, true);
    __syncthreads();
  }

  // 5. write o
  T* go = static_cast<T*>(p.o);
  for (int idx = threadIdx.x; idx < len * DV; idx += blockDim.x) {
    const int t = idx / DV, j = idx % DV;
    go[(row0 + (int64_t)t * H) * DV + j] = to_t<T>(sO[idx]);
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
    if (cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess)
      check_launch("miras_chunk_l2_fwd_state (smem attribute)");
    const int use_cluster = (NV > 1 && bias_needs_row_norm(p.cfg.bias)) ? 1 : 0;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(p.N * p.H * NV));
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = NV;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = use_cluster ? 1 : 0;
    cudaError_t err = cudaLaunchKernelEx(&cfg, kern, p, cx, cp, psi, use_cluster);
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("miras: CUDA launch of miras_chunk_l2_fwd_state failed: ") +
                               cudaGetErrorString(err));
    check_launch("miras_chunk_l2_fwd_state");
  }
  const int64_t slots = slots_of(p);
  if (slots > 0 && p.H > 0) {
    const size_t smem = FwdOutSmem<DK, DV>(C, p.momentum != nullptr).total;
    auto kern = miras_chunk_l2_fwd_output<T, DK, DV>;
    if (cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess)
      check_launch("miras_chunk_l2_fwd_output (smem attribute)");
    kern<<<dim3(static_cast<unsigned>(slots), static_cast<unsigned>(p.H)), kThreads, smem, stream>>>(p, cx, cp, psi);
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
  if (p.cfg.bias < kBiasDot || p.cfg.bias > kBiasRobust) return "unknown bias kind";
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
