// miras/cuda/chunk_l2_common.cuh — shared pieces of the chunked dual-form kernels (retention l2,
// linear memory; KERNELS.md §1): dtype helpers, tile loaders, a block-wide wmma GEMM on shared
// memory, per-warp register-resident state tiles, the in-chunk gate matrices and the
// slot -> (sequence, chunk) map. See CHUNK_L2_NOTES.md for the kernels that use them.
//
// Conventions used everywhere in this family:
//   - one (sequence n, head h) pair; token i of chunk c of sequence n sits at global row
//     (bos + c*C + i) * H + h of q/k/v/o/gates (bos = seq_begin(n)); rows i >= len (partial last
//     chunk) are loaded as zeros, with alpha = 1, beta = 0, lr = 0, and never written back;
//   - gates are handled as products, not as differences of log-cumsums: Lg[t][s] =
//     prod_{m=s+1..t} alpha_m, Lb[s][i] = prod_{m=i+1..s} beta_m, gam[t] = prod_{m<=t} alpha_m,
//     Eb[t] = prod_{m<=t} beta_m. Every factor is in [0, 1], so nothing overflows and beta = 0
//     (log beta = -inf) is exact; the gate gradients use the leave-one-out form (no division by
//     a gate), see phase C of miras_chunk_l2_bwd_chunk. Without momentum beta == 0, which gives
//     Lb = I, Eb = 0, F = Lg, f = 0 exactly (KERNELS.md's no-momentum case).
//   - MMA operands are float16/bfloat16 in shared memory, accumulation float32; recurrent states
//     and their gradient carry stay float32 (in wmma accumulator fragments).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../core/bias.h"
#include "../core/params.h"
#include "device.cuh"
#include "kernels.h"

namespace miras {
namespace cuda {
namespace cl2 {

constexpr int kThreads = 256;  // every kernel of the family: 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kBV = 64;        // value-tile width of the sequential (state) kernels

// ---- dtype helpers -----------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ T to_t(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 to_t<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half to_t<__half>(float x) { return __float2half(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

// ---- shared-memory carving ---------------------------------------------------------------------
// Offsets are computed by the same code on host (launch size) and device (pointers).
struct Carve {
  size_t off = 0;
  MIRAS_HD size_t take(size_t bytes) {
    size_t o = off;
    off += (bytes + 127) & ~size_t(127);  // 128-byte aligned regions (wmma needs 32)
    return o;
  }
};

// ---- async copies (cp.async on sm_80+; the emulator's deferred copy under MIRAS_EMU) ---------------
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
#if defined(MIRAS_EMU)
  ::miras::emu::cp_async(dst, src, 16, __FILE__, __LINE__);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(src) : "memory");
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}
// Waits for this thread's outstanding cp.async copies; a __syncthreads() must follow before other
// threads read the data.
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(MIRAS_EMU)
  ::miras::emu::cp_async_wait_all();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Loads are issued in batches of kLB per thread (all loads of a batch before any store), so that
// kLB global loads are in flight at once instead of one (the compiler cannot reorder a global
// load above a shared store through possibly-aliasing generic pointers).
constexpr int kLB = 4;

// ---- global <-> shared tile moves (all threads of the block; bounds-checked) -------------------
// dst[r*ldd + c] = src[r*rstride + c] for r < nvalid, 0 for nvalid <= r < nrows; c < ncols.
// Aligned case: cp.async, 16 bytes per copy; with wait = false the caller must call
// cp_async_wait_all() before the __syncthreads() that publishes the tile.
template <typename T>
__device__ __forceinline__ void load_tile_t(T* dst, int ldd, const T* src, int64_t rstride, int nrows,
                                            int nvalid, int ncols, bool wait = true) {
  const bool vec = ((reinterpret_cast<uintptr_t>(src) & 15) == 0) && (rstride % 8 == 0) && (ncols % 8 == 0) &&
                   (ldd % 8 == 0);
  if (vec) {
    const int c8 = ncols / 8;
    for (int idx = threadIdx.x; idx < nrows * c8; idx += blockDim.x) {
      const int r = idx / c8, c = (idx % c8) * 8;
      if (r < nvalid)
        cp_async16(dst + r * ldd + c, src + (int64_t)r * rstride + c);
      else
        *reinterpret_cast<uint4*>(dst + r * ldd + c) = make_uint4(0u, 0u, 0u, 0u);
    }
    if (wait) cp_async_wait_all();
  } else {
    const int total = nrows * ncols;
    for (int i0 = threadIdx.x; i0 < total; i0 += kLB * blockDim.x) {
      T v[kLB];
#pragma unroll
      for (int u = 0; u < kLB; ++u) {
        const int idx = i0 + u * blockDim.x;
        const int r = idx / ncols, c = idx % ncols;
        v[u] = (idx < total && r < nvalid) ? src[(int64_t)r * rstride + c] : to_t<T>(0.f);
      }
#pragma unroll
      for (int u = 0; u < kLB; ++u) {
        const int idx = i0 + u * blockDim.x;
        if (idx < total) dst[(idx / ncols) * ldd + idx % ncols] = v[u];
      }
    }
  }
}

// fp32 global rows -> T shared (rows < nrows, all valid). B float4 loads per thread in flight
// (B = 8 covers a 64 x 128 fp32 tile in one round trip with 256 threads).
template <typename T, int B = kLB>
__device__ __forceinline__ void load_tile_f2t(T* dst, int ldd, const float* src, int64_t rstride, int nrows,
                                              int ncols) {
  const bool vec = ((reinterpret_cast<uintptr_t>(src) & 15) == 0) && (rstride % 4 == 0) && (ncols % 4 == 0);
  if (vec) {
    const int c4 = ncols / 4, total = nrows * c4;
    for (int i0 = threadIdx.x; i0 < total; i0 += B * blockDim.x) {
      float4 v[B];
#pragma unroll
      for (int u = 0; u < B; ++u) {
        const int idx = i0 + u * blockDim.x;
        if (idx < total) v[u] = *reinterpret_cast<const float4*>(src + (int64_t)(idx / c4) * rstride + (idx % c4) * 4);
      }
#pragma unroll
      for (int u = 0; u < B; ++u) {
        const int idx = i0 + u * blockDim.x;
        if (idx < total) {
          T* d = dst + (idx / c4) * ldd + (idx % c4) * 4;
          d[0] = to_t<T>(v[u].x);
          d[1] = to_t<T>(v[u].y);
          d[2] = to_t<T>(v[u].z);
          d[3] = to_t<T>(v[u].w);
        }
      }
    }
  } else {
    const int total = nrows * ncols;
    for (int i0 = threadIdx.x; i0 < total; i0 += B * blockDim.x) {
      float v[B];
#pragma unroll
      for (int u = 0; u < B; ++u) {
        const int idx = i0 + u * blockDim.x;
        v[u] = idx < total ? src[(int64_t)(idx / ncols) * rstride + idx % ncols] : 0.f;
      }
#pragma unroll
      for (int u = 0; u < B; ++u) {
        const int idx = i0 + u * blockDim.x;
        if (idx < total) dst[(idx / ncols) * ldd + idx % ncols] = to_t<T>(v[u]);
      }
    }
  }
}

// fp32 global rows -> T shared rounding remainder x - T(x) (the lo half of a hi/lo split).
template <typename T>
__device__ __forceinline__ void load_tile_f2t_lo(T* dst, int ldd, const float* src, int64_t rstride, int nrows,
                                                 int ncols) {
  const int total = nrows * ncols;
  for (int i0 = threadIdx.x; i0 < total; i0 += kLB * blockDim.x) {
    float v[kLB];
#pragma unroll
    for (int u = 0; u < kLB; ++u) {
      const int idx = i0 + u * blockDim.x;
      v[u] = idx < total ? src[(int64_t)(idx / ncols) * rstride + idx % ncols] : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kLB; ++u) {
      const int idx = i0 + u * blockDim.x;
      if (idx < total) dst[(idx / ncols) * ldd + idx % ncols] = to_t<T>(v[u] - to_f(to_t<T>(v[u])));
    }
  }
}

// Biases whose psi VJP is ill-conditioned in e (bias_needs_split, core/bias.h: huber yaad, whose
// delta eps / (e^2 + eps)^{3/2} is ~1/sqrt(eps) near e = 0) get E = K W0 - V and the state update
// with a hi/lo split of the fp32 operand (two MMAs), so that E and the state carry ~16 bits
// instead of bf16's 8.

// T global rows -> fp32 shared, multiplied by `mul` (rows >= nvalid are 0).
template <typename T>
__device__ __forceinline__ void load_tile_t2f(float* dst, int ldd, const T* src, int64_t rstride, int nrows,
                                              int nvalid, int ncols, float mul) {
  constexpr int B = 2 * kLB;
  const int total = nrows * ncols;
  for (int i0 = threadIdx.x; i0 < total; i0 += B * blockDim.x) {
    float v[B];
#pragma unroll
    for (int u = 0; u < B; ++u) {
      const int idx = i0 + u * blockDim.x;
      const int r = idx / ncols, c = idx % ncols;
      v[u] = (idx < total && r < nvalid) ? mul * to_f(src[(int64_t)r * rstride + c]) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < B; ++u) {
      const int idx = i0 + u * blockDim.x;
      if (idx < total) dst[(idx / ncols) * ldd + idx % ncols] = v[u];
    }
  }
}

// ---- block GEMM on shared memory (wmma 16x16x16, fp32 accumulate) ------------------------------
// C[M x N] (fp32, row-major, ldc) (+)= A[M x K] * B[K x N]. A_ROW: A(m,k) = A[m*lda + k], else
// A(m,k) = A[k*lda + m] (a transposed row-major matrix). Same for B: B(k,n) = B[k*ldb + n] when
// B_ROW, else B[n*ldb + k]. M, N, K multiples of 16. Each 16x16 output tile belongs to one warp
// (no races); callers put __syncthreads() between dependent GEMMs / element-wise phases.
template <typename T, bool A_ROW, bool B_ROW>
__device__ __forceinline__ void block_gemm(int M, int N, int K, const T* A, int lda, const T* B, int ldb,
                                           float* Cm, int ldc, bool accumulate) {
  using namespace nvcuda;
  using LA = typename std::conditional<A_ROW, wmma::row_major, wmma::col_major>::type;
  using LB = typename std::conditional<B_ROW, wmma::row_major, wmma::col_major>::type;
  const int warp = threadIdx.x >> 5;
  const int tn_n = N >> 4, ntiles = (M >> 4) * tn_n;
  for (int tile = warp; tile < ntiles; tile += kWarps) {
    const int tm = tile / tn_n, tn = tile % tn_n;
    float* cptr = Cm + tm * 16 * ldc + tn * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if (accumulate)
      wmma::load_matrix_sync(acc, cptr, ldc, wmma::mem_row_major);
    else
      wmma::fill_fragment(acc, 0.f);
    for (int k = 0; k < K; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> b;
      const T* ap = A_ROW ? A + tm * 16 * lda + k : A + k * lda + tm * 16;
      const T* bp = B_ROW ? B + k * ldb + tn * 16 : B + tn * 16 * ldb + k;
      wmma::load_matrix_sync(a, ap, lda);
      wmma::load_matrix_sync(b, bp, ldb);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(cptr, acc, ldc, wmma::mem_row_major);
  }
}

// ---- register-resident state tiles [DK x kBV] ---------------------------------------------------
// Warp w owns 16x16 tiles w, w + 8, ..., (TPW of them); tile -> (tm, tn) = (tile / 4, tile % 4).
template <int DK>
struct StateTiles {
  static constexpr int kTiles = (DK / 16) * (kBV / 16);
  static constexpr int TPW = kTiles / kWarps;
  static_assert(kTiles % kWarps == 0, "tiles must divide over warps");
  using Frag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  Frag f[TPW];
  __device__ __forceinline__ static int tm(int r) { return ((threadIdx.x >> 5) + r * kWarps) / (kBV / 16); }
  __device__ __forceinline__ static int tn(int r) { return ((threadIdx.x >> 5) + r * kWarps) % (kBV / 16); }

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int r = 0; r < TPW; ++r) nvcuda::wmma::fill_fragment(f[r], 0.f);
  }
  // Load from global fp32 [DK x ld] (column offset already applied), staged through the warp's
  // 16x16 fp32 scratch (scalar, bounds-free accesses; no alignment assumption).
  __device__ __forceinline__ void load_global(const float* g, int64_t ld, float* scratch) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < TPW; ++r) {
      for (int e = lane; e < 256; e += 32)
        scratch[e] = g[(int64_t)(tm(r) * 16 + e / 16) * ld + tn(r) * 16 + (e % 16)];
      __syncwarp();
      nvcuda::wmma::load_matrix_sync(f[r], scratch, 16, nvcuda::wmma::mem_row_major);
      __syncwarp();
    }
  }
  // Store to global fp32 (if g) and/or to a T shared copy [DK x kBV], row stride lds (if s), via the scratch;
  // s_lo (optional) gets the rounding remainder x - T(x) (a hi/lo split for exact-ish GEMMs).
  template <typename T>
  __device__ __forceinline__ void store(float* g, int64_t ld, T* s, float* scratch, T* s_lo = nullptr,
                                        int lds = kBV) const {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < TPW; ++r) {
      nvcuda::wmma::store_matrix_sync(scratch, f[r], 16, nvcuda::wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int row = tm(r) * 16 + e / 16, col = tn(r) * 16 + (e % 16);
        const float x = scratch[e];
        if (g) g[(int64_t)row * ld + col] = x;
        if (s) s[row * lds + col] = to_t<T>(x);
        if (s_lo) s_lo[row * lds + col] = to_t<T>(x - to_f(to_t<T>(x)));
      }
      __syncwarp();
    }
  }
  // f[r] += A^T * B over K rows: A is T shared [K x DK] row-major (so A^T(m,k) = A[k*lda + m]),
  // B is T shared [K x kBV] row-major with row stride ldb.
  template <typename T>
  __device__ __forceinline__ void add_at_b(int K, const T* A, int lda, const T* B, int ldb = kBV) {
    using namespace nvcuda;
#pragma unroll
    for (int r = 0; r < TPW; ++r) {
      for (int k = 0; k < K; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, A + k * lda + tm(r) * 16, lda);
        wmma::load_matrix_sync(b, B + k * ldb + tn(r) * 16, ldb);
        wmma::mma_sync(f[r], a, b, f[r]);
      }
    }
  }
};

// ---- in-chunk gate matrices ----------------------------------------------------------------------
// al[t], be[t] for t < C (padding: al = 1, be = 0). Fills (C x C, row-major, zero above the
// diagonal) Lg[t][s] = prod_{m=s+1..t} al_m, Lb[s][i] = prod_{m=i+1..s} be_m and
// F = Lg Lb, and the vectors gam[t] = prod_{m<=t} al_m, Eb[t] = prod_{m<=t} be_m, fv = Lg Eb.
// F and fv come from the momentum recurrence F[t][i] = al_t F[t-1][i] + Lb[t][i] (F[i][i] = 1),
// fv[t] = al_t fv[t-1] + Eb[t]: O(C) per column, one thread per column. Lg, Lb, F may be nullptr
// (not stored).
// Ends with __syncthreads().
__device__ __forceinline__ void gate_mats(int C, const float* al, const float* be, float* Lg, float* Lb, float* F,
                                          float* gam, float* Eb, float* fv) {
  const int tid = threadIdx.x;
  for (int j = tid; j < C; j += blockDim.x) {
    float vg = 1.f, vb = 1.f, vf = 1.f;
    for (int t = 0; t < C; ++t) {
      if (t < j) {
        if (Lg) Lg[t * C + j] = 0.f;
        if (Lb) Lb[t * C + j] = 0.f;
        if (F) F[t * C + j] = 0.f;
      } else {
        if (t > j) {
          const float a = al[t];
          vg *= a;
          vb *= be[t];
          vf = a * vf + vb;
        }
        if (Lg) Lg[t * C + j] = vg;
        if (Lb) Lb[t * C + j] = vb;
        if (F) F[t * C + j] = vf;
      }
    }
  }
  if (tid == blockDim.x - 1) {
    float g = 1.f, e = 1.f, f = 0.f;
    for (int t = 0; t < C; ++t) {
      const float a = al[t];
      g *= a;
      e *= be[t];
      f = a * f + e;
      gam[t] = g;
      Eb[t] = e;
      fv[t] = f;
    }
  }
  __syncthreads();
}

// Only what the state update needs: the last valid row of F and Lb (Fl[j] = F[last][j],
// Lbl[j] = Lb[last][j], 0 for j > last) and the scalars gl = gam[last], el = Eb[last],
// fl = fv[last] (written to out3[0..2]). No C x C matrix is stored. Thread j < C walks its column
// (<= C dependent FMAs, the same recurrence as gate_mats); thread C the vectors. Ends with
// __syncthreads().
__device__ __forceinline__ void gate_last_row(int C, int last, const float* al, const float* be, float* Fl,
                                              float* Lbl, float* out3) {
  const int j = threadIdx.x;
  if (j < C) {
    float vb = 1.f, vf = 1.f;
    if (j > last) vb = vf = 0.f;
#pragma unroll 8
    for (int t = j + 1; t <= last; ++t) {
      vb *= be[t];
      vf = al[t] * vf + vb;
    }
    Fl[j] = vf;
    Lbl[j] = vb;
  } else if (j == C) {
    float g = 1.f, e = 1.f, f = 0.f;
#pragma unroll 8
    for (int t = 0; t <= last; ++t) {
      const float a = al[t];
      g *= a;
      e *= be[t];
      f = a * f + e;
    }
    out3[0] = g;
    out3[1] = e;
    out3[2] = f;
  }
  __syncthreads();
}

// Loads one chunk's gates into shared vectors (threads < C). Padding rows get alpha 1, beta 0,
// lr 0, bias parameter 1.
__device__ __forceinline__ void load_gates(const ChunkFwdParams& p, int64_t row0, int64_t H, int C, int len,
                                           float* al, float* be, float* lr, float* bp) {
  const float* ga = static_cast<const float*>(p.alpha);
  const float* gb = static_cast<const float*>(p.momentum);
  const float* gl = static_cast<const float*>(p.lr);
  const float* gp = static_cast<const float*>(p.bias_param);
  for (int i = threadIdx.x; i < C; i += blockDim.x) {
    if (i < len) {
      const int64_t row = row0 + (int64_t)i * H;
      al[i] = ga[row];
      be[i] = gb ? gb[row] : 0.f;
      if (lr) lr[i] = gl[row];
      if (bp) bp[i] = gp ? gp[row] : static_cast<float>(p.cfg.bias_param);
    } else {
      al[i] = 1.f;
      be[i] = 0.f;
      if (lr) lr[i] = 0.f;
      if (bp) bp[i] = 1.f;
    }
  }
}

// ---- slot -> (sequence, chunk) ------------------------------------------------------------------
// Returns false when `slot` is past the last chunk (grids are sized by an upper bound).
__device__ __forceinline__ bool slot_to_chunk(const ChunkFwdParams& p, int64_t slot, int64_t* n_out, int64_t* c_out) {
  const int64_t C = p.cfg.chunk_size;
  if (!p.cu_seqlens) {
    const int64_t nc = num_chunks(p.T, C);
    if (nc == 0) return false;
    const int64_t n = slot / nc;
    if (n >= p.N) return false;
    *n_out = n;
    *c_out = slot % nc;
    return true;
  }
  int64_t base = 0;
  for (int64_t n = 0; n < p.N; ++n) {
    const int64_t k = num_chunks(p.cu_seqlens[n + 1] - p.cu_seqlens[n], C);
    if (slot < base + k) {
      *n_out = n;
      *c_out = slot - base;
      return true;
    }
    base += k;
  }
  return false;
}

// Host: number of saved-state slots (the params' value when given, else the bound of params.h).
inline int64_t slots_of(const ChunkFwdParams& p) {
  const int64_t s = num_chunk_slots(p.N, p.T, p.cfg.chunk_size, p.cu_seqlens != nullptr);
  return p.num_chunk_slots > s ? p.num_chunk_slots : s;
}

// Host: opts a kernel into `bytes` of dynamic shared memory after checking the device's limit
// (cudaDevAttrMaxSharedMemoryPerBlockOptin); throws a clear error instead of a failed launch.
template <typename K>
inline void set_smem(K kern, size_t bytes, const char* name) {
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    throw std::runtime_error(std::string("miras: ") + name + ": cannot query the device's shared-memory limit");
  if (bytes > static_cast<size_t>(optin))
    throw std::runtime_error(std::string("miras: ") + name + " needs " + std::to_string(bytes) +
                             " bytes of shared memory per block, the device allows " + std::to_string(optin) +
                             " (use a smaller chunk_size or the scan path)");
  if (cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)) !=
      cudaSuccess)
    throw std::runtime_error(std::string("miras: ") + name + ": cudaFuncSetAttribute(MaxDynamicSharedMemorySize, " +
                             std::to_string(bytes) + ") failed: " + cudaGetErrorString(cudaGetLastError()));
}

inline size_t align256(size_t x) { return (x + 255) & ~size_t(255); }

// Host: launches a sequential (state) kernel on `blocks` CTAs of kThreads, in clusters of
// `cluster` CTAs along x when cluster > 1 (else an ordinary launch); throws a clear error naming
// the kernel when the launch fails.
template <typename... P, typename... A>
inline void launch_state_kernel(void (*kern)(P...), const char* name, unsigned blocks, unsigned cluster, size_t smem,
                                cudaStream_t stream, A&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = cluster > 1 ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, kern, static_cast<A&&>(args)...);
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("miras: CUDA launch of ") + name + " failed: " + cudaGetErrorString(err));
  check_launch(name);
}

// ---- warp reductions -----------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename A>
__device__ __forceinline__ BiasArgs<A> bias_args(const ChunkFwdParams& p, A param) {
  BiasArgs<A> b;
  b.kind = p.cfg.bias;
  b.p = static_cast<A>(p.cfg.p);
  b.eps = static_cast<A>(p.cfg.eps);
  b.param = param;
  return b;
}

}  // namespace cl2
}  // namespace cuda
}  // namespace miras
