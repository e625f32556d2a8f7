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

// The kernel families of the linear memory, in dispatch priority order (the first that supports a
// call and is enabled runs it). A new family is a row here (kernels.h declares its entry points,
// csrc/cuda/families.txt lists its files, verification.h its hardware runs).
struct Family {
  const char* name;  // families.txt / verification.h / NVTX ranges
  const char* path;  // its MIRAS_CUDA_PATH value
  const char* (*unsupported)(const ChunkFwdParams&);
  size_t (*fwd_workspace)(const ChunkFwdParams&);
  size_t (*bwd_workspace)(const ChunkBwdParams&);
  void (*fwd)(const ChunkFwdParams&, void*, cudaStream_t);
  void (*bwd)(const ChunkBwdParams&, void*, cudaStream_t);
};

const Family kFamilies[] = {
    {"chunk_l2", "chunk", chunk_l2_unsupported, chunk_l2_fwd_workspace, chunk_l2_bwd_workspace, chunk_l2_fwd,
     chunk_l2_bwd},
    {"scan", "scan", scan_unsupported, scan_fwd_workspace, scan_bwd_workspace, scan_fwd, scan_bwd},
};

const char* path_override() {
  const char* s = std::getenv("MIRAS_CUDA_PATH");
  return (s && *s) ? s : "auto";
}

// The family for p, or nullptr with every reason it is refused in *why.
const Family* choose(const ChunkFwdParams& p, std::string* why) {
  if (p.cfg.map_schedule == kMapChunk && p.cfg.retention != kRetL2) {  // SPEC §5b: CPU and reference only
    *why = std::string("map_schedule='chunk' with retention ") + retention_name(p.cfg.retention) +
           " has no CUDA kernel yet (the torch front end runs it through miras.reference on CUDA tensors)";
    return nullptr;
  }
  const std::string mode = path_override();
  std::string reasons;
  for (const Family& f : kFamilies) {
    if (mode != "auto" && mode != f.path) continue;
    const char* no = f.unsupported(p);
    const char* off = nullptr;
    const bool on = family_enabled(f.name, &off);
    if (!no && on) return &f;
    if (mode != "auto") {
      *why = "MIRAS_CUDA_PATH=" + mode + ": " +
             (no ? std::string(no) : std::string("the ") + f.name + " kernel family is disabled: " + off);
      return nullptr;
    }
    if (!no && reasons.empty()) reasons = std::string("the ") + f.name + " kernel family that runs this "
                                          "configuration is disabled: " + off;
    if (no && f.path == std::string("scan") && reasons.empty()) reasons = std::string("no CUDA kernel for this "
                                                                                      "configuration: ") + no;
  }
  if (mode != "auto" && reasons.empty()) {
    *why = "MIRAS_CUDA_PATH=" + mode + ": unknown family (use chunk, scan or auto)";
    return nullptr;
  }
  *why = reasons;
  return nullptr;
}

// Returns the family for p, or throws std::invalid_argument with every reason it is refused.
const Family& pick(const ChunkFwdParams& p) {
  std::string why;
  const Family* f = choose(p, &why);
  if (!f) throw std::invalid_argument(why);
  return *f;
}

// An NVTX range named after the op and its variant (core/names.h), e.g.
// "miras.chunk_fwd[chunk_l2 bias=lp ret=l2 mom C=64 dk=128 dv=128 bf16]".
struct NvtxRange {
  NvtxRange(const char* op, const ChunkFwdParams& p, const Family& f) {
    char buf[256];
    format_variant(buf, sizeof(buf), op, f.name, p);
    nvtxRangePushA(buf);
  }
  ~NvtxRange() { nvtxRangePop(); }
};

}  // namespace
}  // namespace cuda

const char* cuda_unsupported(const ChunkFwdParams& p) {
  if (p.dtype == kFloat64) return "float64 inputs run on the CPU only; use float32, float16 or bfloat16 on CUDA";
  static thread_local std::string msg;
  return cuda::choose(p, &msg) ? nullptr : msg.c_str();
}

size_t chunk_fwd_cuda_workspace(const ChunkFwdParams& p) { return cuda::pick(p).fwd_workspace(p); }

size_t chunk_bwd_cuda_workspace(const ChunkBwdParams& p) { return cuda::pick(p.fwd).bwd_workspace(p); }

void chunk_fwd_cuda(const ChunkFwdParams& p, void* workspace, void* stream) {
  const cuda::Family& f = cuda::pick(p);
  cuda::NvtxRange range("chunk_fwd", p, f);
  f.fwd(p, workspace, static_cast<cudaStream_t>(stream));
}

void chunk_bwd_cuda(const ChunkBwdParams& p, void* workspace, void* stream) {
  const cuda::Family& f = cuda::pick(p.fwd);
  cuda::NvtxRange range("chunk_bwd", p.fwd, f);
  f.bwd(p, workspace, static_cast<cudaStream_t>(stream));
}

}  // namespace miras
