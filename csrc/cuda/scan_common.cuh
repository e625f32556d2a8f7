// miras/cuda/scan_common.cuh — shared pieces of the per-token scan family (scan_fwd.cu,
// scan_bwd.cu): the thread layout, the block reductions, the per-token forward step (used by the
// forward and by the backward's recomputation) and the host-side layout/placement planning.
//
// Thread layout ("owner layout"). A block handles one (sequence, head) and a tile of `width`
// value columns (the forward tiles Dv for separable configurations; the backward always takes the
// whole Dv). The block has NT threads, viewed as RG row groups of BVp column slots
// (BVp = width padded to a power of two <= 32, or to a multiple of 32 above 32):
//     g = tid / BVp,  j = tid % BVp,  column valid (cv) iff g < RG && j < width.
// Thread (g, j) OWNS the matrix elements (i, j) with i = g + RG * r, r < R = ceil(Dk / RG).
// Every Dk x width matrix (state X, momentum P, anchor map W_A, gradients) is stored in this owner
// layout: element (r, tid) at M[r * NT + tid]. Only the owning thread ever reads or writes an
// element, so the element-wise math needs no synchronisation; threads talk only through the
// reductions below (column sums over the key axis, block sums, row sums over the value axis),
// each of which is bracketed by __syncthreads. A matrix may live in shared or in global memory
// (the host decides per matrix what fits); the code is the same either way.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "../core/bias.h"
#include "../core/params.h"
#include "../core/retention.h"
#include "device.cuh"
#include "kernels.h"

namespace miras {
namespace cuda {
namespace scan {

constexpr int kMaxThreads = 512;  // block size cap (__launch_bounds__), so <= 128 registers/thread
constexpr int kRowBatch = 4;      // rows reduced per round of row_reduce
constexpr int kMaxMats = 6;       // resident matrices per kernel (placement table size)
constexpr int kTileCols = 32;     // forward Dv tile width for separable configurations

// ---- host/device plan -------------------------------------------------------------------------
struct Layout {
  int NT;       // threads per block
  int BVp;      // padded column slots
  int BV;       // tile width (columns per block; the last tile may be narrower)
  int ntiles;   // Dv tiles
  int RG;       // row groups = NT / BVp
  int R;        // rows per thread = ceil(Dk / RG)
  long long MS; // floats per owner-layout matrix = R * NT
};

struct Place {
  int nmat;
  int in_smem[kMaxMats];
  long long off[kMaxMats];     // floats: into dynamic smem if in_smem, else into the block's ws
  long long ws_block_floats;   // global workspace floats per block (multiple of 64)
  long long ws_extra_off;      // floats: start of the kernel's extra per-block workspace
  int small_floats;            // floats of the small smem buffers (before any matrix)
  size_t smem_bytes;           // dynamic shared memory per block
};

inline int next_pow2(int x) {
  int v = 1;
  while (v < x) v <<= 1;
  return v;
}

// whole = keep all Dv columns in one block (norm-based biases, lq retention, and the backward).
inline Layout make_layout(int Dk, int Dv, bool whole) {
  Layout l;
  if (whole || Dv <= kTileCols) {
    l.ntiles = 1;
    l.BV = Dv;
  } else {
    l.ntiles = (Dv + kTileCols - 1) / kTileCols;
    l.BV = (Dv + l.ntiles - 1) / l.ntiles;
  }
  l.BVp = l.BV <= 32 ? next_pow2(l.BV) : ((l.BV + 31) / 32) * 32;
  // aim at ~8 rows per thread, within [max(32, BVp), kMaxThreads]
  const int rg_want = (Dk + 7) / 8;
  long long nt = (long long)l.BVp * rg_want;
  nt = ((nt + 31) / 32) * 32;
  if (nt > kMaxThreads) nt = kMaxThreads;
  if (nt < 32) nt = 32;
  if (nt < l.BVp) nt = l.BVp;  // BVp <= 256 < kMaxThreads
  l.NT = (int)nt;
  l.RG = l.NT / l.BVp;
  l.R = (Dk + l.RG - 1) / l.RG;
  l.MS = (long long)l.R * l.NT;
  return l;
}

inline int small_smem_floats(const Layout& l, int Dk) {
  // red[NT] | wred[32] | qs[Dk] | ks[Dk] | vec[Dk] | rs[kRowBatch * NT]
  long long f = (long long)l.NT + 32 + 3LL * Dk + (long long)kRowBatch * l.NT;
  return (int)((f + 3) / 4 * 4);
}

inline int smem_optin_limit() {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
      v <= 0) {
    (void)cudaGetLastError();
    v = 48 * 1024;
  }
  return v;
}

// Place `nmat` resident matrices (in priority order) in shared memory while they fit, the rest in
// the per-block global workspace; then `extra_floats` more per-block workspace for the kernel.
inline Place make_place(const Layout& l, int Dk, int nmat, long long extra_floats) {
  Place p;
  p.nmat = nmat;
  p.small_floats = small_smem_floats(l, Dk);
  const long long budget = (long long)(smem_optin_limit() / 4) - 256;  // floats, small margin
  long long used = p.small_floats, ws = 0;
  for (int m = 0; m < kMaxMats; ++m) {
    p.in_smem[m] = 0;
    p.off[m] = 0;
  }
  for (int m = 0; m < nmat; ++m) {
    if (used + l.MS <= budget) {
      p.in_smem[m] = 1;
      p.off[m] = used;
      used += l.MS;
    } else {
      p.off[m] = ws;
      ws += l.MS;
    }
  }
  p.ws_extra_off = ws;
  ws += extra_floats;
  p.ws_block_floats = (ws + 63) / 64 * 64;
  p.smem_bytes = (size_t)used * 4;
  return p;
}

inline size_t round256(size_t b) { return (b + 255) / 256 * 256; }

// ---- device helpers ---------------------------------------------------------------------------
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

struct Ctx {
  int tid, NT, BVp, RG, R, Dk, width, g, j;
  bool cv;     // this thread's column is a real column of the tile
  float* red;  // [NT]   column-reduction scratch
  float* wred; // [32]   block-reduction scratch
  float* qs;   // [Dk]   this token's scaled query
  float* ks;   // [Dk]   this token's key
  float* vec;  // [Dk]   row-vector scratch (backward: first part of dk)
  float* rs;   // [kRowBatch * NT] row-reduction scratch
  float* ws;   // this block's global workspace (may be null when none is needed)
  // element r of this thread: row i; false when the element does not exist
  __device__ __forceinline__ bool elem(int r, int& i) const {
    i = g + RG * r;
    return cv && i < Dk;
  }
  __device__ __forceinline__ int idx(int r) const { return r * NT + tid; }
};

__device__ __forceinline__ Ctx make_ctx(const Layout& l, const Place& pl, int Dk, int width,
                                        float* smem, float* ws_block) {
  Ctx c;
  c.tid = threadIdx.x;
  c.NT = l.NT;
  c.BVp = l.BVp;
  c.RG = l.RG;
  c.R = l.R;
  c.Dk = Dk;
  c.width = width;
  c.g = c.tid / c.BVp;
  c.j = c.tid % c.BVp;
  c.cv = c.g < c.RG && c.j < width;
  c.red = smem;
  c.wred = c.red + l.NT;
  c.qs = c.wred + 32;
  c.ks = c.qs + Dk;
  c.vec = c.ks + Dk;
  c.rs = c.vec + Dk;
  c.ws = ws_block;
  return c;
}

__device__ __forceinline__ float* mat_ptr(const Place& pl, int m, float* smem, float* ws_block) {
  return pl.in_smem[m] ? smem + pl.off[m] : ws_block + pl.off[m];
}

// Sum over the key axis (rows) of each column: every thread of column j gets column j's total.
__device__ __forceinline__ float col_sum(const Ctx& c, float v) {
  c.red[c.tid] = c.cv ? v : 0.f;
  __syncthreads();
  float s = 0.f;
  if (c.cv)
    for (int gg = 0; gg < c.RG; ++gg) s += c.red[gg * c.BVp + c.j];
  __syncthreads();
  return s;
}

__device__ __forceinline__ float col_max(const Ctx& c, float v) {
  c.red[c.tid] = c.cv ? v : -INFINITY;
  __syncthreads();
  float s = -INFINITY;
  if (c.cv)
    for (int gg = 0; gg < c.RG; ++gg) s = fmaxf(s, c.red[gg * c.BVp + c.j]);
  __syncthreads();
  return s;
}

// Sum over the whole block (callers pass 0 from threads that must not contribute). Deterministic.
__device__ __forceinline__ float block_sum(const Ctx& c, float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if ((c.tid & 31) == 0) c.wred[c.tid >> 5] = v;
  __syncthreads();
  float s = 0.f;
  const int nw = c.NT >> 5;
  for (int w = 0; w < nw; ++w) s += c.wred[w];
  __syncthreads();
  return s;
}

// Row sums over the value axis. f(r, i) gives this thread's element value (called exactly once for
// each existing element; it may have side effects on the thread's own elements); sink(i, total)
// is called exactly once per row i < Dk, by one thread. Rows go kRowBatch at a time: a segmented
// warp shuffle over the column slots, then a sum over the warps of a row group.
template <class F, class S>
__device__ __forceinline__ void row_reduce(const Ctx& c, F&& f, S&& sink) {
  const int wseg = c.BVp < 32 ? c.BVp : 32;
  const int wpg = (c.BVp + 31) / 32;  // warps per row group (1 when BVp <= 32)
  const int stride = c.RG * wpg;
  for (int rb = 0; rb < c.R; rb += kRowBatch) {
    float val[kRowBatch];
#pragma unroll
    for (int rr = 0; rr < kRowBatch; ++rr) {
      const int r = rb + rr;
      int i;
      val[rr] = (r < c.R && c.elem(r, i)) ? f(r, i) : 0.f;
    }
#pragma unroll
    for (int rr = 0; rr < kRowBatch; ++rr)
      for (int off = wseg >> 1; off > 0; off >>= 1)
        val[rr] += __shfl_xor_sync(0xffffffffu, val[rr], off);
    if (c.g < c.RG && (c.j & 31) == 0) {
#pragma unroll
      for (int rr = 0; rr < kRowBatch; ++rr) c.rs[rr * stride + c.g * wpg + (c.j >> 5)] = val[rr];
    }
    __syncthreads();
    if (c.tid < kRowBatch * c.RG) {
      const int rr = c.tid / c.RG, gg = c.tid % c.RG;
      const int r = rb + rr, i = gg + c.RG * r;
      if (r < c.R && i < c.Dk) {
        float s = 0.f;
        for (int w = 0; w < wpg; ++w) s += c.rs[rr * stride + gg * wpg + w];
        sink(i, s);
      }
    }
    __syncthreads();
  }
}

// ---- owner-layout matrix I/O (no synchronisation needed: owner-local) --------------------------
// G points at one head's [Dk, Dv] float32 matrix (nullable: zeros); j0 = the tile's first column.
__device__ __forceinline__ void load_mat(const Ctx& c, float* M, const float* G, long long Dv, int j0) {
  for (int r = 0; r < c.R; ++r) {
    int i;
    if (c.elem(r, i)) M[c.idx(r)] = G ? G[(long long)i * Dv + j0 + c.j] : 0.f;
  }
}
__device__ __forceinline__ void store_mat(const Ctx& c, const float* M, float* G, long long Dv, int j0) {
  for (int r = 0; r < c.R; ++r) {
    int i;
    if (c.elem(r, i)) G[(long long)i * Dv + j0 + c.j] = M[c.idx(r)];
  }
}
__device__ __forceinline__ void copy_mat(const Ctx& c, float* D, const float* S) {
  for (int r = 0; r < c.R; ++r) {
    int i;
    if (c.elem(r, i)) D[c.idx(r)] = S[c.idx(r)];
  }
}
__device__ __forceinline__ void fill_mat(const Ctx& c, float* D, float v) {
  for (int r = 0; r < c.R; ++r) {
    int i;
    if (c.elem(r, i)) D[c.idx(r)] = v;
  }
}

// ---- per-token pieces -------------------------------------------------------------------------
struct Consts {
  float scale, kc, q, epsq, p, eps, bias_scalar, ret_scalar;
  int bias;
  bool mom;
};

__host__ inline Consts make_consts(const ChunkFwdParams& p) {
  Consts k;
  k.scale = (float)p.cfg.scale;
  k.kc = (float)p.cfg.kl_scale;
  k.q = (float)p.cfg.q_norm;
  k.epsq = (float)p.cfg.eps_q;
  k.p = (float)p.cfg.p;
  k.eps = (float)p.cfg.eps;
  k.bias_scalar = (float)p.cfg.bias_param;
  k.ret_scalar = (float)p.cfg.ret_param;
  k.bias = p.cfg.bias;
  k.mom = p.momentum != nullptr;
  return k;
}

struct Gates {
  float lr, alpha, beta, gamma;
  BiasArgs<float> b;
};

__device__ __forceinline__ Gates load_gates(const ChunkFwdParams& p, const Consts& k, long long gi) {
  Gates g;
  g.lr = static_cast<const float*>(p.lr)[gi];
  g.alpha = p.alpha ? static_cast<const float*>(p.alpha)[gi] : 1.f;
  g.beta = k.mom ? static_cast<const float*>(p.momentum)[gi] : 0.f;
  g.gamma = p.ret_param ? static_cast<const float*>(p.ret_param)[gi] : k.ret_scalar;
  g.b.kind = k.bias;
  g.b.p = k.p;
  g.b.eps = k.eps;
  g.b.param = p.bias_param ? static_cast<const float*>(p.bias_param)[gi] : k.bias_scalar;
  return g;
}

// Stage this token's scaled query and key into shared memory (bracketed by barriers).
template <typename Tin>
__device__ __forceinline__ void stage_qk(const Ctx& c, const ChunkFwdParams& p, const Consts& k,
                                         long long gi) {
  __syncthreads();  // everybody is done with the previous token's vectors
  const Tin* q = static_cast<const Tin*>(p.q) + gi * p.Dk;
  const Tin* kk = static_cast<const Tin*>(p.k) + gi * p.Dk;
  for (int i = c.tid; i < c.Dk; i += c.NT) {
    c.qs[i] = k.scale * to_f(q[i]);
    c.ks[i] = to_f(kk[i]);
  }
  __syncthreads();
}

struct ColTok {
  float e, psi, psit, sumsq;
};

// e_j = k W_A - v_j at the anchor, the row statistic, psi_j and psi~_j = lr psi_j.
__device__ __forceinline__ ColTok residual_psi(const Ctx& c, const float* WA, float vj, const Gates& gt) {
  float part = 0.f;
  for (int r = 0; r < c.R; ++r) {
    int i;
    if (c.elem(r, i)) part += c.ks[i] * WA[c.idx(r)];
  }
  ColTok t;
  t.e = col_sum(c, part) - vj;
  t.sumsq = 0.f;
  // Norm-based biases only run with the whole Dv row in the block (the host guarantees it).
  if (bias_needs_row_norm(gt.b.kind)) t.sumsq = block_sum(c, (c.g == 0 && c.cv) ? t.e * t.e : 0.f);
  t.psi = c.cv ? bias_psi(gt.b, t.e, vj, t.sumsq) : 0.f;
  t.psit = gt.lr * t.psi;
  return t;
}

// Z element from X_{t-1}, P_{t-1} and u = -k_i psi~_j (writes P_t when momentum). The backward
// recomputes Z through this same function, so its masks see the same numbers.
__device__ __forceinline__ float step_z(const Gates& gt, bool mom, float xp, float pp, float u, float* pn) {
  if (mom) {
    const float pnew = fmaf(gt.beta, pp, u);
    *pn = pnew;
    return fmaf(gt.alpha, xp, pnew);
  }
  *pn = 0.f;
  return fmaf(gt.alpha, xp, u);
}

// X_t (and P_t) from X_{t-1} (and P_{t-1}); Xn may alias Xp, Pn may alias Pp (owner-local).
template <int RET>
__device__ __forceinline__ void apply_update(const Ctx& c, const Gates& gt, bool mom, float psit,
                                             const float* Xp, const float* Pp, float* Xn, float* Pn) {
  for (int r = 0; r < c.R; ++r) {
    int i;
    if (!c.elem(r, i)) continue;
    const int x = c.idx(r);
    const float u = -(c.ks[i] * psit);
    float pn;
    const float z = step_z(gt, mom, Xp[x], mom ? Pp[x] : 0.f, u, &pn);
    if (mom) Pn[x] = pn;
    Xn[x] = retention_step<float>(RET, z, gt.gamma);
  }
}

// Read statistics of W = phi(X) for one state: kl column max/sum, lq norm and scale.
struct ReadStats {
  float m, s;    // kl (per column)
  float n, inv;  // lq (per block)
};

template <int RET>
__device__ __forceinline__ ReadStats read_stats(const Ctx& c, const Consts& k, const float* X) {
  ReadStats st;
  st.m = 0.f;
  st.s = 1.f;
  st.n = 0.f;
  st.inv = 1.f;
  if (RET == kRetKL) {
    float mx = -INFINITY;
    for (int r = 0; r < c.R; ++r) {
      int i;
      if (c.elem(r, i)) mx = fmaxf(mx, X[c.idx(r)]);
    }
    st.m = col_max(c, mx);
    float s = 0.f;
    for (int r = 0; r < c.R; ++r) {
      int i;
      if (c.elem(r, i)) s += m_exp(X[c.idx(r)] - st.m);
    }
    st.s = col_sum(c, s);
    if (!c.cv) st.s = 1.f;  // unused column: keep the arithmetic finite
  } else if (RET == kRetLq) {
    float s = 0.f;
    for (int r = 0; r < c.R; ++r) {
      int i;
      if (c.elem(r, i)) s += lq_abs_pow(X[c.idx(r)], k.q);
    }
    const float tot = block_sum(c, s);
    st.n = lq_norm_from_sum(tot, k.q);
    st.inv = lq_inv_scale(st.n, k.q, k.epsq);
  }
  return st;
}

// phi(X) element given the statistics.
template <int RET>
__device__ __forceinline__ float phi_elem(const Consts& k, const ReadStats& st, float x) {
  if (RET == kRetKL) return kl_read(x, st.m, st.s, k.kc);
  if (RET == kRetLq) return x * st.inv;
  return x;
}

// In place: M (holding the raw anchor) becomes W_A = phi(anchor). Returns the statistics.
template <int RET>
__device__ __forceinline__ ReadStats anchor_map(const Ctx& c, const Consts& k, float* M) {
  ReadStats st = read_stats<RET>(c, k, M);
  if (RET == kRetKL || RET == kRetLq) {
    for (int r = 0; r < c.R; ++r) {
      int i;
      if (c.elem(r, i)) M[c.idx(r)] = phi_elem<RET>(k, st, M[c.idx(r)]);
    }
  }
  return st;
}

}  // namespace scan
}  // namespace cuda
}  // namespace miras
