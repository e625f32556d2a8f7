// miras_emu/runtime.h — the CUDA runtime API subset the launchers, the C ABI and the tests use,
// implemented on host memory by csrc/emu/runtime.cpp. Kernels run synchronously at launch (every
// stream is the same serial queue), after the launch-time checks of a real device:
//   - block: each dimension within (1024, 1024, 64), at most 1024 threads;
//   - grid: x < 2^31, y and z <= 65535, none zero;
//   - dynamic shared memory: above 48 KB only after cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
//     for that kernel, never above the opt-in limit (227 KB = 232448 bytes, sm_90;
//     MIRAS_EMU_SMEM_OPTIN overrides it for tests);
//   - clusters: at most 8 blocks (16 with NonPortableClusterSizeAllowed), grid divisible by them;
//   - kernel parameters: at most 32764 bytes.
// A failed check is a launch error (cudaGetLastError), as on hardware; a fault while a kernel runs
// (deadlock, divergent warp collective, bad DSMEM rank, misaligned wmma/cp.async address,
// ASan/UBSan report in the checked build) is cudaErrorLaunchFailure with the kernel, block and
// thread in cudaGetErrorString(). Unlike hardware, faults are not sticky.
#pragma once
#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>

#include "core.h"

typedef enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInitializationError = 3,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevicePointer = 17,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorAssert = 710,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
  cudaErrorUnknown = 999
} cudaError_t;

struct CUstream_st;
typedef CUstream_st* cudaStream_t;
struct CUevent_st;
typedef CUevent_st* cudaEvent_t;

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxBlockDimY = 3,
  cudaDevAttrMaxBlockDimZ = 4,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMaxRegistersPerBlock = 12,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrClusterLaunch = 120
};

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
  cudaFuncAttributeClusterDimMustBeSet = 10,
  cudaFuncAttributeRequiredClusterWidth = 11,
  cudaFuncAttributeRequiredClusterHeight = 12,
  cudaFuncAttributeRequiredClusterDepth = 13,
  cudaFuncAttributeNonPortableClusterSizeAllowed = 14,
  cudaFuncAttributeClusterSchedulingPolicyPreference = 15
};

enum cudaLaunchAttributeID {
  cudaLaunchAttributeIgnore = 0,
  cudaLaunchAttributeCooperative = 2,
  cudaLaunchAttributeClusterDimension = 4
};
union cudaLaunchAttributeValue {
  char pad[64];
  struct {
    unsigned x, y, z;
  } clusterDim;
  int cooperative;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  char pad[8 - sizeof(cudaLaunchAttributeID)];
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};

const char* cudaGetErrorString(cudaError_t e);
const char* cudaGetErrorName(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaGetDevice(int* dev);
cudaError_t cudaSetDevice(int dev);
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaMalloc(void** p, size_t bytes);
cudaError_t cudaFree(void* p);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s = nullptr);
cudaError_t cudaMemset(void* dst, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t s = nullptr);

namespace miras {
namespace emu {

// One launch: the kernel's address (for its name and attributes), its configuration, the
// parameter bytes, and `body`, which runs the kernel for the calling fiber's thread.
struct LaunchSpec {
  const void* fn;
  const char* expr;  // the launch expression's text (MIRAS_LAUNCH) or nullptr
  dim3 grid, block, cluster;
  size_t smem;
  size_t param_bytes;
  void (*body)(void* state);
  void* state;
};
cudaError_t launch(const LaunchSpec& spec);
cudaError_t func_set_attribute(const void* fn, cudaFuncAttribute attr, int value);

template <typename... P>
struct ParamBytes {
  static constexpr size_t value = (size_t(0) + ... + sizeof(P));
};

template <typename... P, typename... A>
inline cudaError_t launch_with(const char* expr, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                               dim3 cluster, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  struct State {
    void (*k)(P...);
    std::tuple<std::decay_t<P>...> args;
  } st{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  LaunchSpec s;
  s.fn = reinterpret_cast<const void*>(kernel);
  s.expr = expr;
  s.grid = grid;
  s.block = block;
  s.cluster = cluster;
  s.smem = smem;
  s.param_bytes = ParamBytes<P...>::value;
  s.body = [](void* v) {
    State* x = static_cast<State*>(v);
    std::apply(x->k, x->args);  // each CUDA thread gets its own copy of the parameters
  };
  s.state = &st;
  return launch(s);
}

// kernel<<<grid, block, smem, stream>>>(args) in emulation: MIRAS_LAUNCH(kernel, grid, block,
// smem, stream)(args) builds one of these (csrc/cuda/device.cuh).
template <typename K>
struct Launcher {
  const char* expr;
  K kernel;
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... args) const {
    (void)launch_with(expr, kernel, grid, block, smem, dim3(1, 1, 1), std::forward<A>(args)...);
  }
};
template <typename K>
inline Launcher<K> make_launcher(const char* expr, K kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t) {
  return Launcher<K>{expr, kernel, grid, block, smem};
}

}  // namespace emu
}  // namespace miras

template <typename... P, typename... A>
inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(P...), A&&... args) {
  dim3 cluster(1, 1, 1);
  for (unsigned i = 0; i < cfg->numAttrs; ++i)
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension)
      cluster = dim3(cfg->attrs[i].val.clusterDim.x, cfg->attrs[i].val.clusterDim.y, cfg->attrs[i].val.clusterDim.z);
  return ::miras::emu::launch_with(nullptr, kernel, cfg->gridDim, cfg->blockDim, cfg->dynamicSmemBytes, cluster,
                                   std::forward<A>(args)...);
}

template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::miras::emu::func_set_attribute(reinterpret_cast<const void*>(entry), attr, value);
}
