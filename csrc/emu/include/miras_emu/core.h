// miras_emu/core.h — the device side of the kernel emulator (csrc/emu, docs/emulator.md).
//
// Force-included (-include miras_emu/core.h) into every csrc/cuda and csrc/capi *.cu file when it
// is compiled for the host by the emulator build. It defines the CUDA keywords, the built-in
// variables (threadIdx, ...), vector types, barriers, warp shuffles and votes as calls into the
// emulator runtime (runtime.cpp), which runs every CUDA thread of a block as a fiber.
//
// What it refuses: static __shared__ / __constant__ variables, inline PTX (`asm` is passed to the
// host assembler, which rejects PTX), wmma shapes and types other than the ones in wmma.h, and
// any intrinsic not declared here all fail to build; partial-warp masks, divergent warp
// collectives and barrier deadlocks fail at run time with the kernel, block and thread named.
#pragma once
#ifndef MIRAS_EMU
#define MIRAS_EMU 1
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

// ---- keywords ----------------------------------------------------------------------------------
#define __global__ __attribute__((noinline, used))
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __align__(n) alignas(n)
#define __launch_bounds__(...)
#define __grid_constant__
// Static shared and constant memory are not modelled: use MIRAS_DYNAMIC_SMEM (csrc/cuda/device.cuh).
#define __shared__ MIRAS_EMU_static_shared_memory_is_not_modelled_use_MIRAS_DYNAMIC_SMEM
#define __constant__ MIRAS_EMU_constant_memory_is_not_modelled
#define __managed__ MIRAS_EMU_managed_memory_is_not_modelled

// ---- vector types (alignment as in CUDA: a misaligned float4 access is an error on hardware,
// and UBSan's alignment check reports it in the emulator's checked build) -----------------------
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

namespace miras {
namespace emu {

// The per-CUDA-thread context the built-in variables read (one per fiber; see runtime.cpp).
struct ThreadCtx {
  uint3 tid;     // threadIdx
  uint3 bid;     // blockIdx
  dim3 bdim;     // blockDim
  dim3 gdim;     // gridDim
  int linear;    // linear thread index in the block
  int lane;      // linear % 32
  void* fiber;   // runtime.cpp's Fiber
};

#if defined(__GNUC__)
#define MIRAS_EMU_TLS __attribute__((tls_model("initial-exec")))
#else
#define MIRAS_EMU_TLS
#endif
extern thread_local ThreadCtx* t_ctx MIRAS_EMU_TLS;

// A device built-in used outside a kernel (host code): reported and aborted.
[[noreturn]] void outside_kernel(const char* what);
inline ThreadCtx& ctx(const char* what) {
  ThreadCtx* c = t_ctx;
  if (!c) outside_kernel(what);
  return *c;
}

// Ends the current launch with an error that names the kernel, block and thread (the launch
// returns cudaErrorLaunchFailure; the message is in cudaGetErrorString and on stderr).
[[noreturn]] void fault(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Barriers. `file`/`line` name the call site in deadlock and divergence reports.
void block_barrier(const char* file, int line);
void warp_barrier(unsigned mask, const char* kind, const char* file, int line);
void cluster_barrier(const char* file, int line);
int block_barrier_count(int pred, int op, const char* file, int line);  // op 0 count, 1 and, 2 or

// Warp exchange: every lane of `mask` deposits `bytes` of `in`, then receives those of lane
// `src` (src < 0: keeps its own value). One warp barrier per call.
void warp_exchange(unsigned mask, const void* in, void* out, int bytes, int src, const char* kind, const char* file,
                   int line);
unsigned warp_ballot(unsigned mask, int pred, const char* file, int line);
unsigned live_lanes();  // __activemask: the lanes of this warp that have not exited

// cp.async modelled as a deferred copy: the source is read at issue, the destination (which must
// lie in this block's shared memory, 16-byte aligned) reads as NaN bytes until this thread waits.
void cp_async(void* dst_shared, const void* src_global, int bytes, const char* file, int line);
void cp_async_wait_all();

// Dynamic shared memory of the current block (MIRAS_DYNAMIC_SMEM), its size, and the generic ->
// shared-window conversion.
unsigned char* dynamic_smem(size_t align, const char* file, int line);
size_t dynamic_smem_bytes();
size_t shared_offset(const void* p, const char* what);

// Cluster queries for cooperative_groups (an ordinary launch is a cluster of one block).
unsigned cluster_rank();
unsigned cluster_size();
void* cluster_map_shared(const void* p, unsigned rank, const char* file, int line);

// Mutation switch of the mutation test (tests/test_emu.py): MIRAS_MUTANT(k) is true when the
// emulator runs with mutation k selected (MIRAS_EMU_MUTATION=k); 0 in real CUDA builds.
int mutation();

}  // namespace emu
}  // namespace miras

// The built-in variables are global objects (not macros: `cfg.gridDim` must stay a member access)
// whose components read the calling fiber's context; they convert to unsigned like CUDA's.
namespace miras {
namespace emu {
template <int W, int C>
struct BuiltinComp {
  static unsigned get() {
    const ThreadCtx& c = ctx(W == 0 ? "threadIdx" : W == 1 ? "blockIdx" : W == 2 ? "blockDim" : "gridDim");
    if (W == 0) return C == 0 ? c.tid.x : C == 1 ? c.tid.y : c.tid.z;
    if (W == 1) return C == 0 ? c.bid.x : C == 1 ? c.bid.y : c.bid.z;
    if (W == 2) return C == 0 ? c.bdim.x : C == 1 ? c.bdim.y : c.bdim.z;
    return C == 0 ? c.gdim.x : C == 1 ? c.gdim.y : c.gdim.z;
  }
  operator unsigned() const { return get(); }
};
template <int W>
struct Builtin {
  BuiltinComp<W, 0> x;
  BuiltinComp<W, 1> y;
  BuiltinComp<W, 2> z;
  operator uint3() const { return uint3{x.get(), y.get(), z.get()}; }
  operator dim3() const { return dim3(x.get(), y.get(), z.get()); }
};
}  // namespace emu
}  // namespace miras

inline constexpr ::miras::emu::Builtin<0> threadIdx{};
inline constexpr ::miras::emu::Builtin<1> blockIdx{};
inline constexpr ::miras::emu::Builtin<2> blockDim{};
inline constexpr ::miras::emu::Builtin<3> gridDim{};
inline constexpr int warpSize = 32;

// ---- barriers, shuffles, votes ---------------------------------------------------------------
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::miras::emu::block_barrier(file, line);
}
inline int __syncthreads_count(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::miras::emu::block_barrier_count(p, 0, file, line);
}
inline int __syncthreads_and(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::miras::emu::block_barrier_count(p, 1, file, line);
}
inline int __syncthreads_or(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::miras::emu::block_barrier_count(p, 2, file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::miras::emu::warp_barrier(mask, "__syncwarp", file, line);
}
inline unsigned __activemask() { return ::miras::emu::live_lanes(); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
[[noreturn]] inline void __trap() { ::miras::emu::fault("__trap() called"); }

namespace miras {
namespace emu {
inline int lane_id() { return ctx("lane").lane; }
inline int seg_base(int lane, int width) { return lane & ~(width - 1); }
inline void check_width(int width) {
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fault("shuffle width %d is not a power of two <= 32", width);
}
template <typename T>
inline T shfl(unsigned mask, T var, int src, const char* kind, const char* file, int line) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  T out;
  warp_exchange(mask, &var, &out, static_cast<int>(sizeof(T)), src, kind, file, line);
  return out;
}
}  // namespace emu
}  // namespace miras

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  ::miras::emu::check_width(width);
  const int lane = ::miras::emu::lane_id();
  const int src = ::miras::emu::seg_base(lane, width) + (src_lane & (width - 1));
  return ::miras::emu::shfl(mask, var, src, "__shfl_sync", file, line);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  ::miras::emu::check_width(width);
  const int lane = ::miras::emu::lane_id();
  int src = lane ^ lane_mask;
  // CUDA: a lane may read from earlier groups of `width` lanes, not from later ones (own value).
  if (src > 31 || ::miras::emu::seg_base(src, width) > ::miras::emu::seg_base(lane, width)) src = -1;
  return ::miras::emu::shfl(mask, var, src, "__shfl_xor_sync", file, line);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  ::miras::emu::check_width(width);
  const int lane = ::miras::emu::lane_id();
  int src = lane - static_cast<int>(delta);
  if (src < ::miras::emu::seg_base(lane, width)) src = -1;
  return ::miras::emu::shfl(mask, var, src, "__shfl_up_sync", file, line);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
  ::miras::emu::check_width(width);
  const int lane = ::miras::emu::lane_id();
  int src = lane + static_cast<int>(delta);
  if (src >= ::miras::emu::seg_base(lane, width) + width) src = -1;
  return ::miras::emu::shfl(mask, var, src, "__shfl_down_sync", file, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return ::miras::emu::warp_ballot(mask, pred, file, line);
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::miras::emu::warp_ballot(mask, pred, file, line) != 0;
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return (::miras::emu::warp_ballot(mask, pred, file, line) & mask) == (mask & ::miras::emu::live_lanes());
}

inline size_t __cvta_generic_to_shared(const void* p) { return ::miras::emu::shared_offset(p, "__cvta_generic_to_shared"); }

// ---- math built-ins that CUDA provides and the host lacks ----------------------------------------
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
