// miras/core/registry.h — the attentional biases and retention gates, listed once.
//
// Everything that enumerates them is generated from these lists: the enums and their count
// (params.h), the names (names.h), the range and parameter checks (problem.h), the dispatch of the
// element formulas to the policy types (bias.h, retention.h), and the Python layer's codes,
// names and per-token parameters (miras._C.registry(), read by python/miras/_options.py).
//
// Biases: X(Name, code, "python name", P, "per-token parameter", its lower bound, bound excluded,
//            ROW_NORM, EDPSI, USES_V, SPLIT)
// Retentions: X(Name, code, "python name", P, "per-token parameter", its lower bound, bound excluded)
// P = 1 when the entry reads a per-token parameter (named in the next column), else 0.
// Bias traits (0/1; bias.h checks its queries against them at compile time): ROW_NORM — psi needs the
// row statistic sumsq = sum e^2; EDPSI — its VJP needs edpsi = sum e dpsi; USES_V — psi is a
// function of v, not of e (the dot bias: the caller adds dv -= dpsi); SPLIT — the VJP is
// ill-conditioned in e, so the tensor-core kernels split low-precision GEMM operands into hi/lo.
// Codes are part of the op schema and the C ABI (csrc/capi/miras.h): append, never renumber.
// Adding a bias: a line here, its policy type in bias.h, its formula in python/miras/reference.py,
// an entry in the tests' table (docs/extending.md walks through `log_cosh`).
#pragma once

#define MIRAS_BIASES(X)                                \
  X(Dot, 0, "dot", 0, "", 0.0, false, 0, 0, 1, 0)                    \
  X(L2, 1, "l2", 0, "", 0.0, false, 0, 0, 0, 0)                      \
  X(Lp, 2, "lp", 0, "", 0.0, false, 0, 0, 0, 0)                      \
  X(HuberYaad, 3, "huber_yaad", 1, "delta", 0.0, true, 1, 0, 0, 1)   \
  X(HuberCoord, 4, "huber_coord", 1, "delta", 0.0, true, 0, 0, 0, 0) \
  X(HuberNorm, 5, "huber_norm", 1, "delta", 0.0, true, 1, 1, 0, 0)   \
  X(Robust, 6, "robust", 1, "robust_delta", 0.0, false, 1, 1, 0, 0)

#define MIRAS_RETENTIONS(X)                            \
  X(L2, 0, "l2", 0, "", 0.0, false)                       \
  X(KL, 1, "kl", 0, "", 0.0, false)                       \
  X(ElasticNet, 2, "elastic_net", 1, "gamma", 0.0, false) \
  X(Lq, 3, "lq", 0, "", 0.0, false)

// MIRAS_IF_(P)(tokens): the tokens when P is 1, nothing when 0 (for the P column above).
#define MIRAS_IF_(P) MIRAS_IF_##P
#define MIRAS_IF_1(...) __VA_ARGS__
#define MIRAS_IF_0(...)
