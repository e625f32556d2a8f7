// miras/jax/ffi_common.h — the XLA FFI binding of chunk_fwd / chunk_bwd, shared by the CPU
// handlers (ffi_cpu.cpp) and the CUDA handlers (ffi_cuda.cpp). Header-only XLA FFI API
// (jax.ffi.include_dir()); no torch, no Python.
//
// Calling convention (python/miras/jax.py builds these calls):
//   chunk_fwd  inputs  q k v lr alpha momentum bias_param ret_param X0 P0 A0 cu_seqlens   (12)
//              outputs o XT PT AT chunk_X chunk_P                                        (6)
//   chunk_bwd  inputs  dO dXT dPT, the 12 forward inputs, chunk_X chunk_P                (17)
//              outputs dq dk dv dlr dalpha dmomentum dbias_param dret_param dX0 dP0 dA0  (11)
//   attributes icfg (int64 array) and fcfg (float64 array) — the configuration arrays of
//              torch.ops.miras.chunk_fwd (csrc/core/params.h's field lists) — and for chunk_fwd
//              save_states (bool).
// An absent optional input or output is a 1-D array of size 0 (every real one has rank 3 or 4,
// and a real cu_seqlens has at least 2 entries). Shapes, dtypes and layouts are params.h's; the
// values of the gates are not checked here (the Python layer does that).
#pragma once
#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "../core/params.h"
#include "../core/problem.h"
#include "xla/ffi/api/ffi.h"

namespace miras {
namespace jax_ffi {

namespace ffi = xla::ffi;
using Buf = ffi::AnyBuffer;

enum FwdIn { kQ, kK, kV, kLr, kAlpha, kMom, kBiasP, kRetP, kX0, kP0, kA0, kCu, kNumFwdIn };
enum FwdOut { kO, kXT, kPT, kAT, kChunkX, kChunkP, kNumFwdOut };
// chunk_bwd inputs: dO dXT dPT, then the forward inputs at kBwdFwd + FwdIn, then the saved states.
enum BwdIn { kDO, kDXT, kDPT };
constexpr size_t kBwdFwd = 3, kBwdChunkX = kBwdFwd + kNumFwdIn, kBwdChunkP = kBwdChunkX + 1, kNumBwdIn = kBwdChunkP + 1;
enum BwdOut { kDQ, kDK, kDV, kDLr, kDAlpha, kDMom, kDBiasP, kDRetP, kDX0, kDP0, kDA0, kNumBwdOut };

enum class Platform { kCpu, kCuda };

inline ffi::Error bad(const std::string& msg) { return ffi::Error::InvalidArgument("miras (jax ffi): " + msg); }

inline bool absent(const Buf& b) { return b.dimensions().size() == 1 && b.element_count() == 0; }
inline const void* opt_ptr(const Buf& b) { return absent(b) ? nullptr : b.untyped_data(); }

inline std::string dims_str(const Buf& b) {
  std::string s = "[";
  auto d = b.dimensions();
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

inline bool has_dims(const Buf& b, std::initializer_list<int64_t> want) {
  auto d = b.dimensions();
  if (d.size() != want.size()) return false;
  size_t i = 0;
  for (int64_t w : want)
    if (d[i++] != w) return false;
  return true;
}

inline const char* dtype_name(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::S32: return "int32";
    case ffi::DataType::S64: return "int64";
    default: return "an unsupported dtype";
  }
}

inline int32_t dtype_code(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F64: return kFloat64;
    case ffi::DataType::F16: return kFloat16;
    case ffi::DataType::BF16: return kBFloat16;
    default: return kFloat32;
  }
}

// Runs a backend call, turning its exceptions into FFI errors (InvalidArgument for bad input).
template <typename F>
ffi::Error guarded(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return ffi::Error::InvalidArgument(e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(e.what());
  }
  return ffi::Error::Success();
}

// The variadic arguments / results as a vector (their number checked).
inline ffi::Error collect(const ffi::RemainingArgs& args, size_t n, const char* op, std::vector<Buf>& out) {
  if (args.size() != n)
    return bad(std::string(op) + " takes " + std::to_string(n) + " arrays, got " + std::to_string(args.size()));
  for (size_t i = 0; i < n; ++i) {
    auto b = args.get<Buf>(i);
    if (b.has_error()) return b.error();
    out.push_back(*b);
  }
  return ffi::Error::Success();
}

inline ffi::Error collect(const ffi::RemainingRets& rets, size_t n, const char* op, std::vector<Buf>& out) {
  if (rets.size() != n)
    return bad(std::string(op) + " returns " + std::to_string(n) + " arrays, got " + std::to_string(rets.size()));
  for (size_t i = 0; i < n; ++i) {
    auto r = rets.get<Buf>(i);
    if (r.has_error()) return r.error();
    out.push_back(**r);
  }
  return ffi::Error::Success();
}

template <typename T>
ffi::Error attr(const ffi::Dictionary& attrs, const char* name, T& value) {
  auto v = attrs.get<T>(name);
  if (v.has_error())
    return bad(std::string("attribute '") + name + "' is missing or has the wrong type (" +
               v.error().message() + ")");
  value = *v;
  return ffi::Error::Success();
}

#define MIRAS_FFI_TRY(expr)                 \
  do {                                      \
    ffi::Error miras_err_ = (expr);         \
    if (miras_err_.failure()) return miras_err_; \
  } while (0)

// The configuration (decode_config of csrc/core/problem.h, shared with the torch glue).
inline ffi::Error read_config(const ffi::Dictionary& a, MemoryConfig& cfg) {
  ffi::Span<const int64_t> ints;
  ffi::Span<const double> floats;
  MIRAS_FFI_TRY(attr(a, "icfg", ints));
  MIRAS_FFI_TRY(attr(a, "fcfg", floats));
  return guarded([&] { cfg = decode_config(ints.begin(), ints.size(), floats.begin(), floats.size()); });
}

// Dtypes per platform (params.h): CPU — every floating array in q's dtype, float32 or float64;
// CUDA — q, k, v, o (and dO) in q's dtype (float32, float16, bfloat16), everything else float32.
struct Types {
  ffi::DataType io, state;
};

inline ffi::Error types_for(const Buf& q, Platform pl, Types& ty) {
  const ffi::DataType t = q.element_type();
  if (pl == Platform::kCpu) {
    if (t != ffi::DataType::F32 && t != ffi::DataType::F64)
      return bad(std::string("q must be float32 or float64 on the CPU, got ") + dtype_name(t));
    ty = {t, t};
  } else {
    if (t != ffi::DataType::F32 && t != ffi::DataType::F16 && t != ffi::DataType::BF16)
      return bad(std::string("q must be float32, float16 or bfloat16 on CUDA, got ") + dtype_name(t));
    ty = {t, ffi::DataType::F32};
  }
  return ffi::Error::Success();
}

inline ffi::Error expect(const Buf& b, const char* name, ffi::DataType t, std::initializer_list<int64_t> dims,
                         bool optional) {
  if (optional && absent(b)) return ffi::Error::Success();
  if (!has_dims(b, dims)) {
    std::string want = "[";
    size_t i = 0;
    for (int64_t d : dims) want += (i++ ? ", " : "") + std::to_string(d);
    return bad(std::string(name) + " must have shape " + want + "]" + (optional ? " (or [0] when absent)" : "") +
               ", got " + dims_str(b));
  }
  if (b.element_type() != t)
    return bad(std::string(name) + " must be " + dtype_name(t) + ", got " + dtype_name(b.element_type()));
  return ffi::Error::Success();
}

// Checks the 12 forward inputs (at in[base + FwdIn]) and derives the problem sizes.
inline ffi::Error check_fwd_inputs(const std::vector<Buf>& in, size_t base, Platform pl, int64_t chunk_size,
                                   Problem& pr, Types& ty) {
  const Buf& q = in[base + kQ];
  const Buf& v = in[base + kV];
  const Buf& cu = in[base + kCu];
  if (q.dimensions().size() != 4) return bad("q must be [B, T, H, Dk], got " + dims_str(q));
  if (v.dimensions().size() != 4) return bad("v must be [B, T, H, Dv], got " + dims_str(v));
  MIRAS_FFI_TRY(types_for(q, pl, ty));
  auto qd = q.dimensions();
  int64_t segments = -1;
  if (!absent(cu)) {
    if (cu.element_type() != ffi::DataType::S64 && cu.element_type() != ffi::DataType::S32)
      return bad(std::string("cu_seqlens must be int32 or int64, got ") + dtype_name(cu.element_type()));
    if (cu.dimensions().size() != 1 || cu.element_count() < 2)
      return bad("cu_seqlens must be 1-D [N+1] with N >= 1, got " + dims_str(cu));
    if (qd[0] != 1) return bad("with cu_seqlens the batch size must be 1, got " + std::to_string(qd[0]));
    segments = static_cast<int64_t>(cu.element_count()) - 1;
  }
  MIRAS_FFI_TRY(guarded(
      [&] { pr = make_problem(qd[0], qd[1], qd[2], qd[3], v.dimensions()[3], segments, chunk_size); }));
  if (pr.H < 1 || pr.Dk < 1 || pr.Dv < 1) return bad("H, Dk and Dv must be >= 1, got q " + dims_str(q) + ", v " + dims_str(v));
  MIRAS_FFI_TRY(expect(in[base + kK], "k", ty.io, {pr.B, pr.T, pr.H, pr.Dk}, false));
  MIRAS_FFI_TRY(expect(v, "v", ty.io, {pr.B, pr.T, pr.H, pr.Dv}, false));
  MIRAS_FFI_TRY(expect(in[base + kLr], "lr", ty.state, {pr.B, pr.T, pr.H}, false));
  MIRAS_FFI_TRY(expect(in[base + kAlpha], "alpha", ty.state, {pr.B, pr.T, pr.H}, false));
  MIRAS_FFI_TRY(expect(in[base + kMom], "momentum", ty.state, {pr.B, pr.T, pr.H}, true));
  MIRAS_FFI_TRY(expect(in[base + kBiasP], "bias_param", ty.state, {pr.B, pr.T, pr.H}, true));
  MIRAS_FFI_TRY(expect(in[base + kRetP], "ret_param", ty.state, {pr.B, pr.T, pr.H}, true));
  MIRAS_FFI_TRY(expect(in[base + kX0], "X0", ty.state, {pr.N, pr.H, pr.Dk, pr.Dv}, true));
  MIRAS_FFI_TRY(expect(in[base + kP0], "P0", ty.state, {pr.N, pr.H, pr.Dk, pr.Dv}, true));
  MIRAS_FFI_TRY(expect(in[base + kA0], "A0", ty.state, {pr.N, pr.H, pr.Dk, pr.Dv}, true));
  if (pr.B * pr.T == 0)
    return bad("no tokens (B * T == 0); miras.jax passes the state through without calling the op");
  return ffi::Error::Success();
}

// Checks that an output has the expected shape (or is absent when `present` is false).
inline ffi::Error expect_out(const Buf& b, const char* name, ffi::DataType t, std::initializer_list<int64_t> dims,
                             bool present) {
  if (!present) {
    if (!absent(b)) return bad(std::string(name) + " must be a [0] placeholder here, got " + dims_str(b));
    return ffi::Error::Success();
  }
  return expect(b, name, t, dims, false);
}

// Size, config and input pointers of the forward params (cu_seqlens is the platform's job).
inline void fill_fwd(ChunkFwdParams& p, const std::vector<Buf>& in, size_t base, const Problem& pr, const Types& ty,
                     const MemoryConfig& cfg) {
  set_problem(p, pr, dtype_code(ty.io), cfg);
  p.q = in[base + kQ].untyped_data();
  p.k = in[base + kK].untyped_data();
  p.v = in[base + kV].untyped_data();
  p.lr = in[base + kLr].untyped_data();
  p.alpha = in[base + kAlpha].untyped_data();
  p.momentum = opt_ptr(in[base + kMom]);
  p.bias_param = opt_ptr(in[base + kBiasP]);
  p.ret_param = opt_ptr(in[base + kRetP]);
  p.X0 = opt_ptr(in[base + kX0]);
  p.P0 = p.momentum ? opt_ptr(in[base + kP0]) : nullptr;
  p.A0 = opt_ptr(in[base + kA0]);
}

// Forward: checks inputs and outputs, fills everything but cu_seqlens. `save` is save_states.
inline ffi::Error prepare_fwd(const std::vector<Buf>& in, const std::vector<Buf>& out, const ffi::Dictionary& attrs,
                              Platform pl, ChunkFwdParams& p, Problem& pr, bool& save) {
  MemoryConfig cfg;
  Types ty;
  MIRAS_FFI_TRY(read_config(attrs, cfg));
  MIRAS_FFI_TRY(attr(attrs, "save_states", save));
  MIRAS_FFI_TRY(check_fwd_inputs(in, 0, pl, cfg.chunk_size, pr, ty));
  const bool mom = !absent(in[kMom]);
  MIRAS_FFI_TRY(expect_out(out[kO], "o", ty.io, {pr.B, pr.T, pr.H, pr.Dv}, true));
  MIRAS_FFI_TRY(expect_out(out[kXT], "XT", ty.state, {pr.N, pr.H, pr.Dk, pr.Dv}, true));
  MIRAS_FFI_TRY(expect_out(out[kPT], "PT", ty.state, {pr.N, pr.H, pr.Dk, pr.Dv}, mom));
  MIRAS_FFI_TRY(expect_out(out[kAT], "AT", ty.state, {pr.N, pr.H, pr.Dk, pr.Dv}, true));
  MIRAS_FFI_TRY(expect_out(out[kChunkX], "chunk_X", ty.state, {pr.slots, pr.H, pr.Dk, pr.Dv}, save));
  MIRAS_FFI_TRY(expect_out(out[kChunkP], "chunk_P", ty.state, {pr.slots, pr.H, pr.Dk, pr.Dv}, save && mom));
  fill_fwd(p, in, 0, pr, ty, cfg);
  p.o = out[kO].untyped_data();
  p.XT = out[kXT].untyped_data();
  p.PT = mom ? out[kPT].untyped_data() : nullptr;
  p.AT = out[kAT].untyped_data();
  p.chunk_X = save ? out[kChunkX].untyped_data() : nullptr;
  p.chunk_P = (save && mom) ? out[kChunkP].untyped_data() : nullptr;
  return ffi::Error::Success();
}

// Backward: checks inputs and outputs, fills everything but cu_seqlens.
inline ffi::Error prepare_bwd(const std::vector<Buf>& in, const std::vector<Buf>& out, const ffi::Dictionary& attrs,
                              Platform pl, ChunkBwdParams& b, Problem& pr) {
  MemoryConfig cfg;
  Types ty;
  MIRAS_FFI_TRY(read_config(attrs, cfg));
  MIRAS_FFI_TRY(check_fwd_inputs(in, kBwdFwd, pl, cfg.chunk_size, pr, ty));
  const bool mom = !absent(in[kBwdFwd + kMom]);
  const auto st = {pr.N, pr.H, pr.Dk, pr.Dv};
  const auto gate = {pr.B, pr.T, pr.H};
  MIRAS_FFI_TRY(expect(in[kDO], "dO", ty.io, {pr.B, pr.T, pr.H, pr.Dv}, false));
  MIRAS_FFI_TRY(expect(in[kDXT], "dXT", ty.state, st, true));
  MIRAS_FFI_TRY(expect(in[kDPT], "dPT", ty.state, st, true));
  MIRAS_FFI_TRY(expect(in[kBwdChunkX], "chunk_X (the forward's saved states)", ty.state,
                       {pr.slots, pr.H, pr.Dk, pr.Dv}, false));
  MIRAS_FFI_TRY(expect_out(in[kBwdChunkP], "chunk_P", ty.state, {pr.slots, pr.H, pr.Dk, pr.Dv}, mom));
  // Gradients: the state dtype (the compute dtype on the CPU, float32 on CUDA).
  const Problem& P = pr;
  MIRAS_FFI_TRY(expect_out(out[kDQ], "dq", ty.state, {P.B, P.T, P.H, P.Dk}, true));
  MIRAS_FFI_TRY(expect_out(out[kDK], "dk", ty.state, {P.B, P.T, P.H, P.Dk}, true));
  MIRAS_FFI_TRY(expect_out(out[kDV], "dv", ty.state, {P.B, P.T, P.H, P.Dv}, true));
  MIRAS_FFI_TRY(expect_out(out[kDLr], "dlr", ty.state, gate, true));
  MIRAS_FFI_TRY(expect_out(out[kDAlpha], "dalpha", ty.state, gate, true));
  MIRAS_FFI_TRY(expect_out(out[kDMom], "dmomentum", ty.state, gate, mom));
  MIRAS_FFI_TRY(expect_out(out[kDBiasP], "dbias_param", ty.state, gate, !absent(in[kBwdFwd + kBiasP])));
  MIRAS_FFI_TRY(expect_out(out[kDRetP], "dret_param", ty.state, gate, !absent(in[kBwdFwd + kRetP])));
  MIRAS_FFI_TRY(expect_out(out[kDX0], "dX0", ty.state, st, true));
  MIRAS_FFI_TRY(expect_out(out[kDP0], "dP0", ty.state, st, mom));
  MIRAS_FFI_TRY(expect_out(out[kDA0], "dA0", ty.state, st, !absent(in[kBwdFwd + kA0])));
  fill_fwd(b.fwd, in, kBwdFwd, pr, ty, cfg);
  b.fwd.chunk_X = in[kBwdChunkX].untyped_data();
  b.fwd.chunk_P = mom ? in[kBwdChunkP].untyped_data() : nullptr;
  b.dO = in[kDO].untyped_data();
  b.dXT = opt_ptr(in[kDXT]);
  b.dPT = mom ? opt_ptr(in[kDPT]) : nullptr;
  b.dq = out[kDQ].untyped_data();
  b.dk = out[kDK].untyped_data();
  b.dv = out[kDV].untyped_data();
  b.dlr = out[kDLr].untyped_data();
  b.dalpha = out[kDAlpha].untyped_data();
  b.dmomentum = mom ? out[kDMom].untyped_data() : nullptr;
  b.dbias_param = b.fwd.bias_param ? out[kDBiasP].untyped_data() : nullptr;
  b.dret_param = b.fwd.ret_param ? out[kDRetP].untyped_data() : nullptr;
  b.dX0 = out[kDX0].untyped_data();
  b.dP0 = mom ? out[kDP0].untyped_data() : nullptr;
  b.dA0 = b.fwd.A0 ? out[kDA0].untyped_data() : nullptr;
  return ffi::Error::Success();
}

}  // namespace jax_ffi
}  // namespace miras
