// miras/torch/ops_cuda.cpp — the CUDA side of the torch glue: device guard, the current stream
// and workspace from PyTorch's caching allocator. Built only with CUDA (MIRAS_WITH_CUDA).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"

namespace miras {
namespace torch_glue {

namespace {
void check_supported(const ChunkFwdParams& p) {
  const char* why = cuda_unsupported(p);
  TORCH_CHECK_VALUE(why == nullptr, "miras: ", why ? why : "");
}
at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}
}  // namespace

void cuda_fwd(const ChunkFwdParams& p, const at::Tensor& q) {
  const c10::cuda::CUDAGuard guard(q.device());
  check_supported(p);
  at::Tensor ws = workspace(chunk_fwd_cuda_workspace(p), q);
  chunk_fwd_cuda(p, ws.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
}

void cuda_bwd(const ChunkBwdParams& p, const at::Tensor& q) {
  const c10::cuda::CUDAGuard guard(q.device());
  check_supported(p.fwd);
  at::Tensor ws = workspace(chunk_bwd_cuda_workspace(p), q);
  chunk_bwd_cuda(p, ws.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace torch_glue
}  // namespace miras
