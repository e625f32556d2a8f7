// miras_emu/wmma.h — nvcuda::wmma for the emulator: m16n16k16 with __half / __nv_bfloat16
// operands and float accumulators (the only shape and types the kernels use; any other fails to
// build: the fragment template is declared, not defined, for them).
//
// Fragment layout. wmma leaves the mapping of matrix elements to (lane, element) unspecified; the
// emulator gives each fragment 8 elements per lane in the layout of the PTX ISA's
// mma.m16n8k16 fragments (two n8 halves), which is what sm_80/sm_90 wmma compiles to:
//   accumulator x[0..7]: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1), then the same at column + 8;
//   matrix_a    x[0..7]: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1), (g, 2t+8), (g, 2t+9), (g+8, 2t+8), (g+8, 2t+9);
//   matrix_b    x[0..7]: (k = 2t, n = g), (2t+1, g), (2t+8, g), (2t+9, g), then n = g + 8;
// with g = lane / 4, t = lane % 4. MIRAS_EMU_WMMA_LAYOUT=scrambled replaces it by a fixed random
// permutation of the 256 positions over (lane, element): code that touches fragment elements must
// give bitwise the same results under both (only uniform element-wise operations are layout-free).
//
// Semantics checked as on hardware: pointers 32-byte aligned, ldm a multiple of 16 bytes; each op
// is a warp collective (all 32 lanes, same op). load reads this lane's elements when the lane
// arrives (so data written by other lanes needs a __syncwarp first, as on hardware), store writes
// after all lanes arrived (readers of other lanes' elements need a __syncwarp after it). mma
// multiplies exactly-representable products in float32 with one rounding per k step.
#pragma once
#include "core.h"
#include "half.h"

namespace miras {
namespace emu {

enum FragUse { kUseA = 0, kUseB = 1, kUseAcc = 2 };
// (row, col) of element e of lane `lane` in a 16 x 16 fragment of the given use.
void frag_pos(int use, int lane, int e, int* row, int* col);
void check_wmma_ptr(const void* p, unsigned ldm, int elem_bytes, const char* what);
// The warp-collective part of mma: deposits this lane's A, B, C elements (as float) into the
// warp's scratch, waits for the warp, and returns pointers to the 16 x 16 row-major A, B, C.
void wmma_exchange(const float* a8, const float* b8, const float* c8, const float** A, const float** B,
                   const float** Cm);

}  // namespace emu
}  // namespace miras

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment;  // only the specialisations below exist

template <typename T, typename Layout>
class fragment<matrix_a, 16, 16, 16, T, Layout> {
 public:
  static constexpr int num_elements = 8;
  using element_type = T;
  T x[8];
};
template <typename T, typename Layout>
class fragment<matrix_b, 16, 16, 16, T, Layout> {
 public:
  static constexpr int num_elements = 8;
  using element_type = T;
  T x[8];
};
template <>
class fragment<accumulator, 16, 16, 16, float, void> {
 public:
  static constexpr int num_elements = 8;
  using element_type = float;
  float x[8];
};

template <typename Use, typename T, typename Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const T& v) {
  for (int e = 0; e < fragment<Use, 16, 16, 16, T, Layout>::num_elements; ++e) f.x[e] = v;
}
template <typename Use, typename T, typename Layout, typename V>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const V& v) {
  fill_fragment(f, static_cast<T>(v));
}

namespace detail {
template <int USE, bool ROW, typename T, typename F>
inline void load_ab(F& f, const T* p, unsigned ldm, const char* file, int line) {
  ::miras::emu::check_wmma_ptr(p, ldm, sizeof(T), "wmma::load_matrix_sync");
  const int lane = ::miras::emu::lane_id();
  for (int e = 0; e < 8; ++e) {
    int r, c;
    ::miras::emu::frag_pos(USE, lane, e, &r, &c);
    f.x[e] = ROW ? p[static_cast<size_t>(r) * ldm + c] : p[static_cast<size_t>(c) * ldm + r];
  }
  ::miras::emu::warp_barrier(0xffffffffu, "wmma::load_matrix_sync", file, line);
}
}  // namespace detail

template <typename T>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  detail::load_ab<::miras::emu::kUseA, true>(f, p, ldm, file, line);
}
template <typename T>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  detail::load_ab<::miras::emu::kUseA, false>(f, p, ldm, file, line);
}
// B(k, n): row_major = p[k * ldm + n], col_major = p[n * ldm + k]; frag_pos gives (k, n).
template <typename T>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  detail::load_ab<::miras::emu::kUseB, true>(f, p, ldm, file, line);
}
template <typename T>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  detail::load_ab<::miras::emu::kUseB, false>(f, p, ldm, file, line);
}

namespace detail {
// Offset of this lane's accumulator element e in a 16 x 16 float matrix with leading dimension ldm.
inline size_t acc_offset(int lane, int e, unsigned ldm, layout_t layout) {
  int r, c;
  ::miras::emu::frag_pos(::miras::emu::kUseAcc, lane, e, &r, &c);
  return layout == mem_row_major ? static_cast<size_t>(r) * ldm + c : static_cast<size_t>(c) * ldm + r;
}
}  // namespace detail

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float, void>& f, const float* p, unsigned ldm,
                             layout_t layout, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::miras::emu::check_wmma_ptr(p, ldm, 4, "wmma::load_matrix_sync (accumulator)");
  const int lane = ::miras::emu::lane_id();
  for (int e = 0; e < 8; ++e) f.x[e] = p[detail::acc_offset(lane, e, ldm, layout)];
  ::miras::emu::warp_barrier(0xffffffffu, "wmma::load_matrix_sync", file, line);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float, void>& f, unsigned ldm,
                              layout_t layout, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::miras::emu::check_wmma_ptr(p, ldm, 4, "wmma::store_matrix_sync");
  ::miras::emu::warp_barrier(0xffffffffu, "wmma::store_matrix_sync", file, line);
  const int lane = ::miras::emu::lane_id();
  for (int e = 0; e < 8; ++e) p[detail::acc_offset(lane, e, ldm, layout)] = f.x[e];
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float, void>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float, void>& c) {
  float a8[8], b8[8], c8[8];
  for (int e = 0; e < 8; ++e) {
    a8[e] = static_cast<float>(a.x[e]);
    b8[e] = static_cast<float>(b.x[e]);
    c8[e] = c.x[e];
  }
  const float *A, *B, *Cm;
  ::miras::emu::wmma_exchange(a8, b8, c8, &A, &B, &Cm);
  const int lane = ::miras::emu::lane_id();
  for (int e = 0; e < 8; ++e) {
    int r, col;
    ::miras::emu::frag_pos(::miras::emu::kUseAcc, lane, e, &r, &col);
    float acc = Cm[r * 16 + col];
    for (int k = 0; k < 16; ++k) acc = std::fma(A[r * 16 + k], B[k * 16 + col], acc);
    d.x[e] = acc;
  }
}

}  // namespace wmma
}  // namespace nvcuda
