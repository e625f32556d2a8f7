// miras/cuda/scan_fwd.cu — forward of the per-token scan family (SPEC §5, KERNELS.md §2): every
// attentional bias (runtime switch), every retention (template), momentum, float32 state, inputs
// in float32/float16/bfloat16. One block per (sequence, head, Dv tile); the tile is the whole Dv
// row when the bias needs the row norm (huber yaad/norm, robust) or the retention is lq (one norm
// over the whole matrix). See scan_common.cuh for the thread layout and SCAN_NOTES.md.
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>

#include "scan_common.cuh"

namespace miras {
namespace cuda {
namespace scan {

// Resident matrices of the forward (placement priority order).
enum { kFwdWA = 0, kFwdX = 1, kFwdP = 2 };

inline bool fwd_whole(const ChunkFwdParams& p) {
  return bias_needs_row_norm(p.cfg.bias) || p.cfg.retention == kRetLq;
}

struct FwdPlan {
  Layout lay;
  Place pl;
  long long blocks;
};

inline FwdPlan fwd_plan(const ChunkFwdParams& p) {
  FwdPlan f;
  f.lay = make_layout((int)p.Dk, (int)p.Dv, fwd_whole(p));
  const bool mom = p.momentum != nullptr;
  f.pl = make_place(f.lay, (int)p.Dk, mom ? 3 : 2, 0);
  f.blocks = p.N * p.H * f.lay.ntiles;
  return f;
}

template <int RET, typename Tin>
__device__ __forceinline__ void scan_fwd_body(const ChunkFwdParams& p, const Layout& lay,
                                              const Place& pl, const Consts& k, float* ws) {
  MIRAS_DYNAMIC_SMEM(float4, smem4, 16);
  float* smem = reinterpret_cast<float*>(smem4);
  const int Dk = (int)p.Dk;
  const long long Dv = p.Dv, H = p.H;
  const long long bid = blockIdx.x;
  const int tile = (int)(bid % lay.ntiles);
  const long long nh = bid / lay.ntiles;
  const long long h = nh % H, n = nh / H;
  const int j0 = tile * lay.BV;
  const int width = (int)((Dv - j0) < lay.BV ? (Dv - j0) : lay.BV);
  float* wsb = ws ? ws + bid * pl.ws_block_floats : nullptr;
  const Ctx c = make_ctx(lay, pl, Dk, width, smem, wsb);
  float* WA = mat_ptr(pl, kFwdWA, smem, wsb);
  float* X = mat_ptr(pl, kFwdX, smem, wsb);
  float* P = k.mom ? mat_ptr(pl, kFwdP, smem, wsb) : nullptr;

  const long long L = seq_len(p.cu_seqlens, n, p.T);
  const long long tok0 = seq_begin(p.cu_seqlens, n, p.T);
  const long long C = p.cfg.chunk_size;
  const long long nc = num_chunks(L, C);
  const long long base = chunk_base(p.cu_seqlens, n, p.T, C);
  const long long DkDv = (long long)Dk * Dv;
  const long long st = nh * DkDv;  // this head's state offset in [N, H, Dk, Dv]
  const float* X0 = p.X0 ? static_cast<const float*>(p.X0) + st : nullptr;
  const float* P0 = p.P0 ? static_cast<const float*>(p.P0) + st : nullptr;
  const float* A0 = p.A0 ? static_cast<const float*>(p.A0) + st : nullptr;
  const Tin* v = static_cast<const Tin*>(p.v);
  Tin* o = static_cast<Tin*>(p.o);

  load_mat(c, X, X0, Dv, j0);
  if (k.mom) load_mat(c, P, P0, Dv, j0);

  if (L == 0 && p.AT) {
    // no tokens: the anchor is A0 if given, else the initial state
    if (A0) {
      load_mat(c, WA, A0, Dv, j0);
      store_mat(c, WA, static_cast<float*>(p.AT) + st, Dv, j0);
    } else {
      store_mat(c, X, static_cast<float*>(p.AT) + st, Dv, j0);
    }
  }

  for (long long ci = 0; ci < nc; ++ci) {
    const long long slot = base + ci;
    if (p.chunk_X) store_mat(c, X, static_cast<float*>(p.chunk_X) + (slot * H + h) * DkDv, Dv, j0);
    if (k.mom && p.chunk_P)
      store_mat(c, P, static_cast<float*>(p.chunk_P) + (slot * H + h) * DkDv, Dv, j0);
    // raw anchor -> WA
    if (ci == 0 && A0)
      load_mat(c, WA, A0, Dv, j0);
    else
      copy_mat(c, WA, X);
    if (ci == nc - 1 && (L % C) != 0 && p.AT) store_mat(c, WA, static_cast<float*>(p.AT) + st, Dv, j0);
    anchor_map<RET>(c, k, WA);

    const long long t_end = (L - ci * C) < C ? L : ci * C + C;  // no overflow for huge C
    for (long long t = ci * C; t < t_end; ++t) {
      const long long gi = (tok0 + t) * H + h;  // row of [total, H]
      stage_qk<Tin>(c, p, k, gi);
      const Gates gt = load_gates(p, k, gi);
      const float vj = c.cv ? to_f(v[gi * Dv + j0 + c.j]) : 0.f;
      const ColTok ct = residual_psi(c, WA, vj, gt);
      apply_update<RET>(c, gt, k.mom, ct.psit, X, P, X, P);
      // o_j = q~ phi(X_t)
      const ReadStats rs = read_stats<RET>(c, k, X);
      float part = 0.f;
      for (int r = 0; r < c.R; ++r) {
        int i;
        if (c.elem(r, i)) part += c.qs[i] * phi_elem<RET>(k, rs, X[c.idx(r)]);
      }
      const float oj = col_sum(c, part);
      if (c.g == 0 && c.cv) o[gi * Dv + j0 + c.j] = from_f<Tin>(oj);
    }
  }

  if (L > 0 && (L % C) == 0 && p.AT) store_mat(c, X, static_cast<float*>(p.AT) + st, Dv, j0);
  if (p.XT) store_mat(c, X, static_cast<float*>(p.XT) + st, Dv, j0);
  if (k.mom && p.PT) store_mat(c, P, static_cast<float*>(p.PT) + st, Dv, j0);
}

// Named kernels (profiles read on their own): miras_scan_fwd_<retention>_<dtype>.
#define MIRAS_SCAN_FWD_KERNEL(NAME, RET, TIN)                                                     \
  __global__ void __launch_bounds__(kMaxThreads)                                                  \
      NAME(const ChunkFwdParams p, const Layout lay, const Place pl, const Consts k, float* ws) {  \
    scan_fwd_body<RET, TIN>(p, lay, pl, k, ws);                                                   \
  }

MIRAS_SCAN_FWD_KERNEL(miras_scan_fwd_l2_f32, kRetL2, float)
MIRAS_SCAN_FWD_KERNEL(miras_scan_fwd_l2_f16, kRetL2, __half)
MIRAS_SCAN_FWD_KERNEL(miras_scan_fwd_l2_bf16, kRetL2, __nv_bfloat16)
MIRAS_SCAN_FWD_KERNEL(miras_scan_fwd_kl_f32, kRetKL, float)
MIRAS_SCAN_FWD_KERNEL(miras_scan_fwd_kl_f16, kRetKL, __half)
MIRAS_SCAN_FWD_KERNEL(miras_scan_fwd_kl_bf16, kRetKL, __nv_bfloat16)
MIRAS_SCAN_FWD_KERNEL(miras_scan_fwd_elastic_net_f32, kRetElasticNet, float)
MIRAS_SCAN_FWD_KERNEL(miras_scan_fwd_elastic_net_f16, kRetElasticNet, __half)
MIRAS_SCAN_FWD_KERNEL(miras_scan_fwd_elastic_net_bf16, kRetElasticNet, __nv_bfloat16)
MIRAS_SCAN_FWD_KERNEL(miras_scan_fwd_lq_f32, kRetLq, float)
MIRAS_SCAN_FWD_KERNEL(miras_scan_fwd_lq_f16, kRetLq, __half)
MIRAS_SCAN_FWD_KERNEL(miras_scan_fwd_lq_bf16, kRetLq, __nv_bfloat16)

typedef void (*FwdKernel)(const ChunkFwdParams, const Layout, const Place, const Consts, float*);

struct NamedFwd {
  FwdKernel fn;
  const char* name;
};

inline NamedFwd pick_fwd(int ret, int dtype) {
#define MIRAS_PICK(R, RN)                                                          \
  if (ret == R) {                                                                  \
    if (dtype == kFloat32) return {miras_scan_fwd_##RN##_f32, "miras_scan_fwd_" #RN "_f32"};   \
    if (dtype == kFloat16) return {miras_scan_fwd_##RN##_f16, "miras_scan_fwd_" #RN "_f16"};   \
    if (dtype == kBFloat16) return {miras_scan_fwd_##RN##_bf16, "miras_scan_fwd_" #RN "_bf16"}; \
  }
  MIRAS_PICK(kRetL2, l2)
  MIRAS_PICK(kRetKL, kl)
  MIRAS_PICK(kRetElasticNet, elastic_net)
  MIRAS_PICK(kRetLq, lq)
#undef MIRAS_PICK
  return {nullptr, "miras_scan_fwd"};
}

}  // namespace scan

// ---- public entry points ----------------------------------------------------------------------
const char* scan_unsupported(const ChunkFwdParams& p) {
  static thread_local char msg[256];
  if (p.dtype != kFloat32 && p.dtype != kFloat16 && p.dtype != kBFloat16)
    return "the CUDA scan path takes float32, float16 or bfloat16 inputs (float64 runs on the CPU)";
  if (p.Dk < 1 || p.Dk > 256 || p.Dv < 1 || p.Dv > 256) {
    std::snprintf(msg, sizeof(msg),
                  "the CUDA scan path supports head dims 1..256 (got Dk=%lld, Dv=%lld); use the CPU path",
                  (long long)p.Dk, (long long)p.Dv);
    return msg;
  }
  if (p.cfg.chunk_size < 1) return "chunk_size must be >= 1";
  if (!bias_known(p.cfg.bias)) return "unknown attentional bias kind";
  if (!retention_known(p.cfg.retention)) return "unknown retention kind";
  if (p.lr == nullptr) return "the CUDA scan path needs the lr gate tensor";
  if (p.N < 0 || p.T < 0 || p.H < 0) return "negative sizes";
  if (p.N * p.H * ((p.Dv + scan::kTileCols - 1) / scan::kTileCols) > 2147483647LL)
    return "too many (sequence, head) pairs for one CUDA grid (N*H*ceil(Dv/32) must be < 2^31)";
  return nullptr;
}

size_t scan_fwd_workspace(const ChunkFwdParams& p) {
  if (scan_unsupported(p)) return 0;
  const scan::FwdPlan f = scan::fwd_plan(p);
  return scan::round256((size_t)f.blocks * (size_t)f.pl.ws_block_floats * sizeof(float));
}

void scan_fwd(const ChunkFwdParams& p, void* workspace, cudaStream_t stream) {
  if (const char* why = scan_unsupported(p)) throw std::invalid_argument(std::string("scan_fwd: ") + why);
  const scan::FwdPlan f = scan::fwd_plan(p);
  if (f.blocks == 0) return;
  if (f.pl.ws_block_floats > 0 && workspace == nullptr)
    throw std::invalid_argument("scan_fwd: workspace is null but scan_fwd_workspace() > 0");
  const scan::NamedFwd kf = scan::pick_fwd(p.cfg.retention, p.dtype);
  if (f.pl.smem_bytes > 48 * 1024) {
    if (cudaFuncSetAttribute(kf.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)f.pl.smem_bytes) !=
        cudaSuccess)
      check_launch(kf.name);
  }
  const scan::Consts k = scan::make_consts(p);
  MIRAS_LAUNCH(kf.fn, (unsigned)f.blocks, f.lay.NT, f.pl.smem_bytes, stream)(p, f.lay, f.pl, k,
                                                                          static_cast<float*>(workspace));
  check_launch(kf.name);
}


}  // namespace cuda
}  // namespace miras
