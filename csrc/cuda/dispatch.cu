// miras/cuda/dispatch.cu — picks the kernel family for a call, names it in an NVTX range, and
// checks launches. Torch-free: shared by the torch glue and the C ABI.
//
// Families (kernels.h): the tensor-core dual form for retention l2 (chunk_l2_*) and the exact
// float32 per-token scan for everything else (scan_*). MIRAS_CUDA_PATH=scan|chunk|auto (default
// auto) forces one family, for tests and benchmarks. A family that has not passed on hardware
// (verification.h) is skipped unless MIRAS_CUDA_UNVERIFIED=1.
#include <nvtx3/nvToolsExt.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "../core/backends.h"
#include "../core/names.h"
#include "kernels.h"
#include "verification.h"

namespace miras {
namespace cuda {

void check_launch(const char* kernel_name) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("miras: CUDA launch of ") + kernel_name + " failed: " +
                             cudaGetErrorString(err));
}

namespace {

enum class Family { kChunkL2, kScan };

const char* path_override() {
  const char* s = std::getenv("MIRAS_CUDA_PATH");
  return (s && *s) ? s : "auto";
}

// The family for p; nullptr-free: on refusal returns false with every reason in *why.
bool choose(const ChunkFwdParams& p, Family* out, std::string* why) {
  const char* mode = path_override();
  const char* chunk_why = chunk_l2_unsupported(p);
  const char* scan_why = scan_unsupported(p);
  const char* chunk_off = nullptr;
  const char* scan_off = nullptr;
  const bool chunk_on = family_enabled("chunk_l2", &chunk_off);
  const bool scan_on = family_enabled("scan", &scan_off);
  if (std::strcmp(mode, "scan") == 0) {
    if (scan_why) return *why = std::string("MIRAS_CUDA_PATH=scan: ") + scan_why, false;
    if (!scan_on) return *why = std::string("MIRAS_CUDA_PATH=scan: the scan kernel family is disabled: ") + scan_off, false;
    return *out = Family::kScan, true;
  }
  if (std::strcmp(mode, "chunk") == 0) {
    if (chunk_why) return *why = std::string("MIRAS_CUDA_PATH=chunk: ") + chunk_why, false;
    if (!chunk_on)
      return *why = std::string("MIRAS_CUDA_PATH=chunk: the chunk_l2 kernel family is disabled: ") + chunk_off, false;
    return *out = Family::kChunkL2, true;
  }
  if (!chunk_why && chunk_on) return *out = Family::kChunkL2, true;
  if (!scan_why && scan_on) return *out = Family::kScan, true;
  if (!chunk_why) return *why = std::string("the chunk_l2 kernel family that runs this configuration is disabled: ") +
                                chunk_off, false;
  if (!scan_why)
    return *why = std::string("the scan kernel family that runs this configuration is disabled: ") + scan_off, false;
  return *why = std::string("no CUDA kernel for this configuration: ") + scan_why, false;
}

// Returns the family for p, or throws std::invalid_argument with every reason it is refused.
Family pick(const ChunkFwdParams& p) {
  Family f = Family::kScan;
  std::string why;
  if (!choose(p, &f, &why)) throw std::invalid_argument(why);
  return f;
}

// An NVTX range named after the op and its variant (core/names.h), e.g.
// "miras.chunk_fwd[chunk_l2 bias=lp ret=l2 mom C=64 dk=128 dv=128 bf16]".
struct NvtxRange {
  NvtxRange(const char* op, const ChunkFwdParams& p, Family f) {
    char buf[256];
    format_variant(buf, sizeof(buf), op, f == Family::kChunkL2 ? "chunk_l2" : "scan", p);
    nvtxRangePushA(buf);
  }
  ~NvtxRange() { nvtxRangePop(); }
};

}  // namespace
}  // namespace cuda

const char* cuda_unsupported(const ChunkFwdParams& p) {
  if (p.dtype == kFloat64) return "float64 inputs run on the CPU only; use float32, float16 or bfloat16 on CUDA";
  static thread_local std::string msg;
  cuda::Family f;
  if (cuda::choose(p, &f, &msg)) return nullptr;
  return msg.c_str();
}

size_t chunk_fwd_cuda_workspace(const ChunkFwdParams& p) {
  return cuda::pick(p) == cuda::Family::kChunkL2 ? cuda::chunk_l2_fwd_workspace(p) : cuda::scan_fwd_workspace(p);
}

size_t chunk_bwd_cuda_workspace(const ChunkBwdParams& p) {
  return cuda::pick(p.fwd) == cuda::Family::kChunkL2 ? cuda::chunk_l2_bwd_workspace(p)
                                                     : cuda::scan_bwd_workspace(p);
}

void chunk_fwd_cuda(const ChunkFwdParams& p, void* workspace, void* stream) {
  const cuda::Family f = cuda::pick(p);
  cuda::NvtxRange range("chunk_fwd", p, f);
  auto s = static_cast<cudaStream_t>(stream);
  if (f == cuda::Family::kChunkL2)
    cuda::chunk_l2_fwd(p, workspace, s);
  else
    cuda::scan_fwd(p, workspace, s);
}

void chunk_bwd_cuda(const ChunkBwdParams& p, void* workspace, void* stream) {
  const cuda::Family f = cuda::pick(p.fwd);
  cuda::NvtxRange range("chunk_bwd", p.fwd, f);
  auto s = static_cast<cudaStream_t>(stream);
  if (f == cuda::Family::kChunkL2)
    cuda::chunk_l2_bwd(p, workspace, s);
  else
    cuda::scan_bwd(p, workspace, s);
}

}  // namespace miras
