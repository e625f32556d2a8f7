// tests/emu/fault_kernels.cu — deliberately broken kernels that prove the emulator catches what it
// claims to (tests/test_emu.py::test_fault_*). Built into libmiras_emu only (CMake MIRAS_EMU), never
// into a CUDA build. Each case launches one kernel and returns the launch's cudaError_t;
// miras_emu_fault_case(id) is called from Python through ctypes.
#include <cuda_runtime.h>
#include <cooperative_groups.h>
#include <mma.h>

#include <cstdint>
#include <cstring>

#include "../../csrc/cuda/device.cuh"

namespace cg = cooperative_groups;

namespace miras_emu_faults {

// 1. shared-memory write one past the end of the dynamic allocation (ASan: heap-buffer-overflow)
__global__ void fault_smem_oob(float* out) {
  MIRAS_DYNAMIC_SMEM(float, s, 16);
  s[threadIdx.x] = 1.f;  // launched with blockDim.x - 1 floats of shared memory
  __syncthreads();
  out[threadIdx.x] = s[0];
}

// 2. global read one element past a buffer (ASan: heap-buffer-overflow)
__global__ void fault_global_oob(const float* in, float* out, int n) {
  out[threadIdx.x] = in[threadIdx.x + (threadIdx.x == 0 ? n : 0)];
}

// 3. deadlock: lane 0 of warp 0 waits at __syncwarp, everybody else at __syncthreads
__global__ void fault_deadlock(float* out) {
  if (threadIdx.x == 0) __syncwarp();
  else __syncthreads();
  out[threadIdx.x] = 1.f;
}

// 4. cp.async without the wait: the data is not there yet (reads NaN)
__global__ void fault_cp_async_no_wait(const float* in, float* out) {
  MIRAS_DYNAMIC_SMEM(float, s, 16);
  if (threadIdx.x < 8) ::miras::emu::cp_async(s + 4 * threadIdx.x, in + 4 * threadIdx.x, 16, __FILE__, __LINE__);
  __syncthreads();  // BUG: cp.async.wait_all missing before the barrier
  out[threadIdx.x] = s[threadIdx.x];
}

// 5. race: reads a neighbour's shared value without a barrier (results depend on the schedule)
__global__ void fault_race(float* out) {
  MIRAS_DYNAMIC_SMEM(float, s, 16);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  // BUG: __syncthreads() missing here
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// 6. divergent warp collectives: lane 0 shuffles while the others __syncwarp
__global__ void fault_divergent(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if ((threadIdx.x & 31) == 0) v = __shfl_xor_sync(0xffffffffu, v, 1);
  else __syncwarp();
  out[threadIdx.x] = v;
}

// 7. distributed shared memory of a rank the cluster does not have
__global__ void fault_dsmem_rank(float* out) {
  MIRAS_DYNAMIC_SMEM(float, s, 16);
  s[threadIdx.x] = 1.f;
  cg::cluster_group cl = cg::this_cluster();
  cl.sync();
  const float* peer = cl.map_shared_rank(s, cl.block_rank() + 2);  // cluster of 2: rank 2 does not exist
  out[threadIdx.x] = peer[threadIdx.x];
}

// 8. a peer's shared memory read after the peer exited (no cluster.sync before exit)
__global__ void fault_dsmem_after_exit(float* out) {
  MIRAS_DYNAMIC_SMEM(float, s, 16);
  s[threadIdx.x] = 2.f;
  cg::cluster_group cl = cg::this_cluster();
  cl.sync();
  if (cl.block_rank() == 1) return;  // BUG: exits while rank 0 still reads its shared memory
  __syncthreads();
  const float* peer = cl.map_shared_rank(s, 1);
  out[threadIdx.x] = peer[threadIdx.x];
}

// 9. misaligned float4 load (UBSan alignment check in the checked build; a fault on hardware)
__global__ void fault_misaligned(const float* in, float* out) {
  const float4 v = *reinterpret_cast<const float4*>(in + 1);
  out[threadIdx.x] = v.x;
}

// 10. wmma load from a pointer that is not 32-byte aligned
__global__ void fault_wmma_align(const __half* in, float* out) {
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
  nvcuda::wmma::load_matrix_sync(a, in + 8, 16);
  out[threadIdx.x] = static_cast<float>(a.x[0]);
}

// 11. a correct kernel, for the launch-limit cases
__global__ void fault_ok(float* out) {
  if (out) out[threadIdx.x] = 3.f;
}

}  // namespace miras_emu_faults

using namespace miras_emu_faults;

// A 1-D cluster launch of `blocks` blocks of 32 threads in clusters of `cluster`.
template <typename... P, typename... A>
static cudaError_t cluster_launch(unsigned blocks, unsigned cluster, size_t smem, void (*k)(P...), A... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(32);
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, k, args...);
}

extern "C" __attribute__((visibility("default"))) int miras_emu_fault_case(int id, float* out) {
  static float in[64 + 16];
  for (int i = 0; i < 80; ++i) in[i] = static_cast<float>(i);
  alignas(64) static __half hin[16 * 16 + 16];
  (void)cudaGetLastError();
  cudaError_t e = cudaSuccess;
  switch (id) {
    case 1: MIRAS_LAUNCH(fault_smem_oob, 1, 32, 31 * sizeof(float), nullptr)(out); break;
    case 2: {
      float* g = nullptr;
      cudaMalloc(reinterpret_cast<void**>(&g), 32 * sizeof(float));
      cudaMemcpy(g, in, 32 * sizeof(float), cudaMemcpyHostToDevice);
      MIRAS_LAUNCH(fault_global_oob, 1, 32, 0, nullptr)(g, out, 32);
      e = cudaGetLastError();
      cudaFree(g);
      return e;
    }
    case 3: MIRAS_LAUNCH(fault_deadlock, 1, 64, 0, nullptr)(out); break;
    case 4: MIRAS_LAUNCH(fault_cp_async_no_wait, 1, 32, 32 * sizeof(float), nullptr)(in, out); break;
    case 5: MIRAS_LAUNCH(fault_race, 1, 64, 64 * sizeof(float), nullptr)(out); break;
    case 6: MIRAS_LAUNCH(fault_divergent, 1, 32, 0, nullptr)(out); break;
    case 7: return cluster_launch(2, 2, 32 * sizeof(float), fault_dsmem_rank, out);
    case 8: return cluster_launch(2, 2, 32 * sizeof(float), fault_dsmem_after_exit, out);
    case 9: MIRAS_LAUNCH(fault_misaligned, 1, 32, 0, nullptr)(in, out); break;
    case 10: MIRAS_LAUNCH(fault_wmma_align, 1, 32, 0, nullptr)(hin, out); break;
    // launch limits (refused before anything runs, as on a device)
    case 20: MIRAS_LAUNCH(fault_ok, 1, 2048, 0, nullptr)(out); break;             // > 1024 threads
    case 21: MIRAS_LAUNCH(fault_ok, dim3(1, 70000), 32, 0, nullptr)(out); break;  // grid.y > 65535
    case 22: MIRAS_LAUNCH(fault_misaligned, 1, 32, 64 * 1024, nullptr)(in, out); break;  // > 48 KB, no attribute
    case 23: {                                                                    // > the opt-in limit
      if (cudaFuncSetAttribute(fault_ok, cudaFuncAttributeMaxDynamicSharedMemorySize, 240 * 1024) != cudaSuccess)
        return cudaGetLastError();
      MIRAS_LAUNCH(fault_ok, 1, 32, 240 * 1024, nullptr)(out);
      break;
    }
    case 24: return cluster_launch(16, 16, 0, fault_ok, out);                    // cluster of 16 (portable limit 8)
    case 25: {                                                                    // 100 KB after opting in: fine
      cudaFuncSetAttribute(fault_ok, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024);
      MIRAS_LAUNCH(fault_ok, 2, 32, 100 * 1024, nullptr)(out);
      break;
    }
    default: return -1;
  }
  return cudaGetLastError();
}
