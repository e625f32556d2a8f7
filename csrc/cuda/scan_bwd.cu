// miras/cuda/scan_bwd.cu — backward of the per-token scan family (KERNELS.md §2/§3): the exact
// VJP of scan_fwd.cu. One block per (sequence, head) holding the whole Dk x Dv matrix (dq and dk
// are sums over the value axis, so every token's gradient row is written by one block: no
// atomics, deterministic). Reverse over chunks carrying dX (and dP); each chunk's per-token
// states are recomputed from the saved chunk start with two-level checkpointing:
//   pass 1: run the chunk forward once, storing the state at the start of every segment of S
//           tokens (S = ceil(sqrt(min(C, T)))) in the workspace;
//   pass 2: for each segment, last first, recompute its S states from its checkpoint into the
//           workspace, then run its tokens in reverse.
// The step is never inverted. See scan_common.cuh for the thread layout and SCAN_NOTES.md.
#include <cmath>
#include <stdexcept>
#include <string>

#include "scan_common.cuh"

namespace miras {
namespace cuda {
namespace scan {

// Resident matrices of the backward (placement priority order).
enum { kBwdWA = 0, kBwdDX = 1, kBwdDWA = 2, kBwdDP = 3 };

struct BwdPlan {
  Layout lay;
  Place pl;
  long long blocks;
  int S;             // segment length (tokens)
  int nseg_max;      // segments per chunk, at most
  long long ckX, ckP, sgX, sgP;  // offsets (floats) in the block's workspace
};

inline BwdPlan bwd_plan(const ChunkBwdParams& b) {
  const ChunkFwdParams& p = b.fwd;
  BwdPlan f;
  f.lay = make_layout((int)p.Dk, (int)p.Dv, true);
  const bool mom = p.momentum != nullptr;
  long long ceff = p.cfg.chunk_size < p.T ? p.cfg.chunk_size : p.T;
  if (ceff < 1) ceff = 1;
  long long S = (long long)std::ceil(std::sqrt((double)ceff));
  if (S < 1) S = 1;
  while (S * S < ceff) ++S;  // guard against sqrt rounding
  f.S = (int)S;
  f.nseg_max = (int)((ceff + S - 1) / S);
  const long long MS = f.lay.MS;
  const long long nmx = (long long)f.nseg_max, nsl = S;
  const long long extra = (nmx + nsl) * MS * (mom ? 2 : 1);
  f.pl = make_place(f.lay, (int)p.Dk, mom ? 4 : 3, extra);
  long long o = f.pl.ws_extra_off;
  f.ckX = o;
  o += nmx * MS;
  f.ckP = o;
  if (mom) o += nmx * MS;
  f.sgX = o;
  o += nsl * MS;
  f.sgP = o;
  f.blocks = p.N * p.H;
  return f;
}

template <int RET, typename Tin>
__device__ __forceinline__ void scan_bwd_body(const ChunkBwdParams& b, const Layout& lay, const Place& pl,
                                              const Consts& k, int S, long long ckX_off,
                                              long long ckP_off, long long sgX_off, long long sgP_off,
                                              float* ws) {
  MIRAS_DYNAMIC_SMEM(float4, smem4, 16);
  float* smem = reinterpret_cast<float*>(smem4);
  const ChunkFwdParams& p = b.fwd;
  const int Dk = (int)p.Dk;
  const long long Dv = p.Dv, H = p.H;
  const long long nh = blockIdx.x;
  const long long h = nh % H, n = nh / H;
  float* wsb = ws + nh * pl.ws_block_floats;
  const Ctx c = make_ctx(lay, pl, Dk, (int)Dv, smem, wsb);
  const long long MS = lay.MS;
  float* WA = mat_ptr(pl, kBwdWA, smem, wsb);
  float* dX = mat_ptr(pl, kBwdDX, smem, wsb);
  float* dWA = mat_ptr(pl, kBwdDWA, smem, wsb);
  float* dP = k.mom ? mat_ptr(pl, kBwdDP, smem, wsb) : nullptr;
  float* ckX = wsb + ckX_off;
  float* ckP = wsb + ckP_off;
  float* sgX = wsb + sgX_off;  // slot m (1..S) at sgX + (m-1)*MS
  float* sgP = wsb + sgP_off;

  const long long L = seq_len(p.cu_seqlens, n, p.T);
  const long long tok0 = seq_begin(p.cu_seqlens, n, p.T);
  const long long C = p.cfg.chunk_size;
  const long long nc = num_chunks(L, C);
  const long long base = chunk_base(p.cu_seqlens, n, p.T, C);
  const long long DkDv = (long long)Dk * Dv;
  const long long st = nh * DkDv;
  const bool mom = k.mom;
  const Tin* vptr = static_cast<const Tin*>(p.v);
  const Tin* dOp = static_cast<const Tin*>(b.dO);
  float* dq = static_cast<float*>(b.dq);
  float* dk = static_cast<float*>(b.dk);
  float* dv = static_cast<float*>(b.dv);
  const bool dot_bias = bias_psi_uses_v(k.bias);
  const bool has_bias_param = bias_has_param(k.bias);

  load_mat(c, dX, b.dXT ? static_cast<const float*>(b.dXT) + st : nullptr, Dv, 0);
  if (mom) load_mat(c, dP, b.dPT ? static_cast<const float*>(b.dPT) + st : nullptr, Dv, 0);

  // One token of forward recomputation: (Xs, Ps) -> (Xd, Pd) (may alias).
  auto fwd_token = [&](long long t, const float* Xs, const float* Ps, float* Xd, float* Pd) {
    const long long gi = (tok0 + t) * H + h;
    stage_qk<Tin>(c, p, k, gi);
    const Gates gt = load_gates(p, k, gi);
    const float vj = c.cv ? to_f(vptr[gi * Dv + c.j]) : 0.f;
    const ColTok ct = residual_psi(c, WA, vj, gt);
    apply_update<RET>(c, gt, mom, ct.psit, Xs, Ps, Xd, Pd);
  };

  // One token in reverse: states X_{t-1}, P_{t-1} (Xp, Pp) and X_t (Xt); updates dX, dP, dWA.
  auto rev_token = [&](long long t, const float* Xp, const float* Pp, const float* Xt) {
    const long long gi = (tok0 + t) * H + h;
    stage_qk<Tin>(c, p, k, gi);
    const Gates gt = load_gates(p, k, gi);
    const float vj = c.cv ? to_f(vptr[gi * Dv + c.j]) : 0.f;
    const float doj = c.cv ? to_f(dOp[gi * Dv + c.j]) : 0.f;
    const ColTok ct = residual_psi(c, WA, vj, gt);

    // --- read o_t = q~ phi(X_t): dq = scale * do phi(X_t)^T, dX_t += phi-VJP(q~^T do)
    const ReadStats rs = read_stats<RET>(c, k, Xt);
    row_reduce(
        c, [&](int r, int i) { return doj * phi_elem<RET>(k, rs, Xt[c.idx(r)]); },
        [&](int i, float s) {
          if (dq) dq[gi * Dk + i] = k.scale * s;
        });
    if (RET == kRetKL) {
      float part = 0.f;
      for (int r = 0; r < c.R; ++r) {
        int i;
        if (c.elem(r, i)) part += phi_elem<RET>(k, rs, Xt[c.idx(r)]) * (c.qs[i] * doj);
      }
      const float wdw = col_sum(c, part);
      for (int r = 0; r < c.R; ++r) {
        int i;
        if (c.elem(r, i)) {
          const int x = c.idx(r);
          dX[x] += kl_read_vjp(phi_elem<RET>(k, rs, Xt[x]), c.qs[i] * doj, wdw, k.kc);
        }
      }
    } else if (RET == kRetLq) {
      float part = 0.f;
      for (int r = 0; r < c.R; ++r) {
        int i;
        if (c.elem(r, i)) part += (c.qs[i] * doj) * Xt[c.idx(r)];
      }
      const float dwx = block_sum(c, part);
      for (int r = 0; r < c.R; ++r) {
        int i;
        if (c.elem(r, i)) {
          const int x = c.idx(r);
          dX[x] += lq_read_vjp(Xt[x], c.qs[i] * doj, rs.inv, rs.n, dwx, k.q, k.epsq);
        }
      }
    } else {
      for (int r = 0; r < c.R; ++r) {
        int i;
        if (c.elem(r, i)) dX[c.idx(r)] += c.qs[i] * doj;
      }
    }

    // --- step, momentum and G~ = k^T psi~: dk part 1 = dG~ psi~^T (row sums into c.vec)
    float dal = 0.f, dbe = 0.f, dgam = 0.f, dpsit_part = 0.f;
    row_reduce(
        c,
        [&](int r, int i) {
          const int x = c.idx(r);
          const float xp = Xp[x];
          const float pp = mom ? Pp[x] : 0.f;
          const float u = -(c.ks[i] * ct.psit);
          float pn;
          const float z = step_z(gt, mom, xp, pp, u, &pn);
          const float dz = retention_step_vjp<float>(RET, z, gt.gamma, dX[x], &dgam);
          dal += xp * dz;
          float dGt;
          if (mom) {
            const float dPt = dP[x] + dz;
            dbe += pp * dPt;
            dGt = -dPt;
            dP[x] = gt.beta * dPt;
          } else {
            dGt = -dz;
          }
          dX[x] = gt.alpha * dz;
          dpsit_part += c.ks[i] * dGt;
          return dGt * ct.psit;
        },
        [&](int i, float s) { c.vec[i] = s; });
    const float dpsit = col_sum(c, dpsit_part);
    const float dalpha = block_sum(c, dal);
    const float dbeta = mom ? block_sum(c, dbe) : 0.f;
    const float dgamma = (RET == kRetElasticNet && b.dret_param) ? block_sum(c, dgam) : 0.f;
    const bool lead = c.g == 0 && c.cv;  // one thread per value column
    const float dlr = block_sum(c, lead ? dpsit * ct.psi : 0.f);
    const float dpsi = gt.lr * dpsit;
    const float edpsi = bias_needs_edpsi(k.bias) ? block_sum(c, lead ? ct.e * dpsi : 0.f) : 0.f;
    const float de = c.cv ? bias_vjp_e(gt.b, ct.e, dpsi, ct.sumsq, edpsi) : 0.f;
    const float dbp = (b.dbias_param && has_bias_param)
                          ? block_sum(c, lead ? bias_vjp_param(gt.b, ct.e, dpsi, ct.sumsq) : 0.f)
                          : 0.f;
    if (lead && dv) dv[gi * Dv + c.j] = -de - (dot_bias ? dpsi : 0.f);

    // --- e = k W_A - v: dk += de W_A^T (row sums), dW_A += k^T de
    row_reduce(
        c,
        [&](int r, int i) {
          const int x = c.idx(r);
          dWA[x] += c.ks[i] * de;
          return de * WA[x];
        },
        [&](int i, float s) {
          if (dk) dk[gi * Dk + i] = c.vec[i] + s;
        });

    if (c.tid == 0) {
      if (b.dlr) static_cast<float*>(b.dlr)[gi] = dlr;
      if (b.dalpha) static_cast<float*>(b.dalpha)[gi] = dalpha;
      if (mom && b.dmomentum) static_cast<float*>(b.dmomentum)[gi] = dbeta;
      if (b.dbias_param) static_cast<float*>(b.dbias_param)[gi] = dbp;
      if (b.dret_param) static_cast<float*>(b.dret_param)[gi] = dgamma;
    }
  };

  for (long long ci = nc - 1; ci >= 0; --ci) {
    const long long cs = ci * C;
    const long long ce = (L - cs) < C ? L : cs + C;  // no overflow for huge C
    const long long len = ce - cs;
    const float* Xstart;
    const float* Pstart = nullptr;
    if (ci == 0) {
      Xstart = p.X0 ? static_cast<const float*>(p.X0) + st : nullptr;
      if (mom) Pstart = p.P0 ? static_cast<const float*>(p.P0) + st : nullptr;
    } else {
      Xstart = static_cast<const float*>(p.chunk_X) + ((base + ci) * H + h) * DkDv;
      if (mom) Pstart = static_cast<const float*>(p.chunk_P) + ((base + ci) * H + h) * DkDv;
    }
    const bool a0 = (ci == 0) && p.A0 != nullptr;
    const float* Araw = a0 ? static_cast<const float*>(p.A0) + st : Xstart;
    load_mat(c, WA, Araw, Dv, 0);
    const ReadStats ast = anchor_map<RET>(c, k, WA);
    fill_mat(c, dWA, 0.f);

    const long long nseg = (len + S - 1) / S;
    // pass 1: checkpoints at every segment start
    load_mat(c, ckX, Xstart, Dv, 0);
    if (mom) load_mat(c, ckP, Pstart, Dv, 0);
    for (long long sg = 0; sg + 1 < nseg; ++sg) {
      float* dX_ = ckX + (sg + 1) * MS;
      float* dP_ = mom ? ckP + (sg + 1) * MS : nullptr;
      for (long long m = 0; m < S; ++m) {
        const float* sX = m == 0 ? ckX + sg * MS : dX_;
        const float* sP = mom ? (m == 0 ? ckP + sg * MS : dP_) : nullptr;
        fwd_token(cs + sg * S + m, sX, sP, dX_, dP_);
      }
    }
    // pass 2: segments in reverse
    for (long long sg = nseg - 1; sg >= 0; --sg) {
      const long long s0 = cs + sg * S;
      const long long slen = (ce - s0) < S ? (ce - s0) : S;
      auto slotX = [&](long long m) -> float* { return m == 0 ? ckX + sg * MS : sgX + (m - 1) * MS; };
      auto slotP = [&](long long m) -> float* {
        return mom ? (m == 0 ? ckP + sg * MS : sgP + (m - 1) * MS) : nullptr;
      };
      for (long long m = 0; m < slen; ++m) fwd_token(s0 + m, slotX(m), slotP(m), slotX(m + 1), slotP(m + 1));
      for (long long m = slen - 1; m >= 0; --m) rev_token(s0 + m, slotX(m), slotP(m), slotX(m + 1));
    }

    // anchor: dAnchor = phi-VJP(anchor, dW_A), into dA0 (chunk 0 with A0) or dX
    float* dA0 = (a0 && b.dA0) ? static_cast<float*>(b.dA0) + st : nullptr;
    if (RET == kRetKL) {
      float part = 0.f;
      for (int r = 0; r < c.R; ++r) {
        int i;
        if (c.elem(r, i)) part += WA[c.idx(r)] * dWA[c.idx(r)];
      }
      const float wdw = col_sum(c, part);
      for (int r = 0; r < c.R; ++r) {
        int i;
        if (c.elem(r, i)) dWA[c.idx(r)] = kl_read_vjp(WA[c.idx(r)], dWA[c.idx(r)], wdw, k.kc);
      }
    } else if (RET == kRetLq) {
      float part = 0.f;
      for (int r = 0; r < c.R; ++r) {
        int i;
        if (c.elem(r, i)) part += dWA[c.idx(r)] * (Araw ? Araw[(long long)i * Dv + c.j] : 0.f);
      }
      const float dwx = block_sum(c, part);
      for (int r = 0; r < c.R; ++r) {
        int i;
        if (c.elem(r, i)) {
          const float a = Araw ? Araw[(long long)i * Dv + c.j] : 0.f;
          dWA[c.idx(r)] = lq_read_vjp(a, dWA[c.idx(r)], ast.inv, ast.n, dwx, k.q, k.epsq);
        }
      }
    }
    if (a0) {
      if (dA0) store_mat(c, dWA, dA0, Dv, 0);
    } else {
      for (int r = 0; r < c.R; ++r) {
        int i;
        if (c.elem(r, i)) dX[c.idx(r)] += dWA[c.idx(r)];
      }
    }
  }

  if (b.dX0) store_mat(c, dX, static_cast<float*>(b.dX0) + st, Dv, 0);
  if (mom && b.dP0) store_mat(c, dP, static_cast<float*>(b.dP0) + st, Dv, 0);
  if (p.A0 && b.dA0 && nc == 0) {
    fill_mat(c, dWA, 0.f);
    store_mat(c, dWA, static_cast<float*>(b.dA0) + st, Dv, 0);
  }
}

#define MIRAS_SCAN_BWD_KERNEL(NAME, RET, TIN)                                                       \
  __global__ void __launch_bounds__(kMaxThreads)                                                    \
      NAME(const ChunkBwdParams b, const Layout lay, const Place pl, const Consts k, int S,         \
           long long ckX, long long ckP, long long sgX, long long sgP, float* ws) {                \
    scan_bwd_body<RET, TIN>(b, lay, pl, k, S, ckX, ckP, sgX, sgP, ws);                              \
  }

MIRAS_SCAN_BWD_KERNEL(miras_scan_bwd_l2_f32, kRetL2, float)
MIRAS_SCAN_BWD_KERNEL(miras_scan_bwd_l2_f16, kRetL2, __half)
MIRAS_SCAN_BWD_KERNEL(miras_scan_bwd_l2_bf16, kRetL2, __nv_bfloat16)
MIRAS_SCAN_BWD_KERNEL(miras_scan_bwd_kl_f32, kRetKL, float)
MIRAS_SCAN_BWD_KERNEL(miras_scan_bwd_kl_f16, kRetKL, __half)
MIRAS_SCAN_BWD_KERNEL(miras_scan_bwd_kl_bf16, kRetKL, __nv_bfloat16)
MIRAS_SCAN_BWD_KERNEL(miras_scan_bwd_elastic_net_f32, kRetElasticNet, float)
MIRAS_SCAN_BWD_KERNEL(miras_scan_bwd_elastic_net_f16, kRetElasticNet, __half)
MIRAS_SCAN_BWD_KERNEL(miras_scan_bwd_elastic_net_bf16, kRetElasticNet, __nv_bfloat16)
MIRAS_SCAN_BWD_KERNEL(miras_scan_bwd_lq_f32, kRetLq, float)
MIRAS_SCAN_BWD_KERNEL(miras_scan_bwd_lq_f16, kRetLq, __half)
MIRAS_SCAN_BWD_KERNEL(miras_scan_bwd_lq_bf16, kRetLq, __nv_bfloat16)

typedef void (*BwdKernel)(const ChunkBwdParams, const Layout, const Place, const Consts, int, long long,
                          long long, long long, long long, float*);

struct NamedBwd {
  BwdKernel fn;
  const char* name;
};

inline NamedBwd pick_bwd(int ret, int dtype) {
#define MIRAS_PICK(R, RN)                                                                       \
  if (ret == R) {                                                                               \
    if (dtype == kFloat32) return {miras_scan_bwd_##RN##_f32, "miras_scan_bwd_" #RN "_f32"};    \
    if (dtype == kFloat16) return {miras_scan_bwd_##RN##_f16, "miras_scan_bwd_" #RN "_f16"};    \
    if (dtype == kBFloat16) return {miras_scan_bwd_##RN##_bf16, "miras_scan_bwd_" #RN "_bf16"}; \
  }
  MIRAS_PICK(kRetL2, l2)
  MIRAS_PICK(kRetKL, kl)
  MIRAS_PICK(kRetElasticNet, elastic_net)
  MIRAS_PICK(kRetLq, lq)
#undef MIRAS_PICK
  return {nullptr, "miras_scan_bwd"};
}

}  // namespace scan

size_t scan_bwd_workspace(const ChunkBwdParams& b) {
  if (scan_unsupported(b.fwd)) return 0;
  const scan::BwdPlan f = scan::bwd_plan(b);
  return scan::round256((size_t)f.blocks * (size_t)f.pl.ws_block_floats * sizeof(float));
}

void scan_bwd(const ChunkBwdParams& b, void* workspace, cudaStream_t stream) {
  const ChunkFwdParams& p = b.fwd;
  if (const char* why = scan_unsupported(p)) throw std::invalid_argument(std::string("scan_bwd: ") + why);
  if (!b.dO) throw std::invalid_argument("scan_bwd: dO may not be null");
  // Chunks after the first restart from the forward's saved chunk states.
  if (p.T > p.cfg.chunk_size) {
    if (!p.chunk_X)
      throw std::invalid_argument("scan_bwd: needs the forward's saved chunk states (chunk_X is null)");
    if (p.momentum && !p.chunk_P)
      throw std::invalid_argument("scan_bwd: needs the forward's saved momentum states (chunk_P is null)");
  }
  const scan::BwdPlan f = scan::bwd_plan(b);
  if (f.blocks == 0) return;
  if (workspace == nullptr) throw std::invalid_argument("scan_bwd: workspace is null (see scan_bwd_workspace)");
  const scan::NamedBwd kf = scan::pick_bwd(p.cfg.retention, p.dtype);
  if (f.pl.smem_bytes > 48 * 1024) {
    if (cudaFuncSetAttribute(kf.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)f.pl.smem_bytes) !=
        cudaSuccess)
      check_launch(kf.name);
  }
  const scan::Consts k = scan::make_consts(p);
  MIRAS_LAUNCH(kf.fn, (unsigned)f.blocks, f.lay.NT, f.pl.smem_bytes, stream)(b, f.lay, f.pl, k, f.S, f.ckX, f.ckP,
                                                                          f.sgX, f.sgP, static_cast<float*>(workspace));
  check_launch(kf.name);
}


}  // namespace cuda
}  // namespace miras
