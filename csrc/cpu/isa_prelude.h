// miras/cpu/isa_prelude.h — what the per-ISA translation units (chunk_cpu_avx2.cpp,
// chunk_cpu_avx512.cpp, mlp_cpu_avx2.cpp) include BEFORE their `#pragma GCC target`: the standard
// and core headers, so that only the kernels' own namespace is compiled for the wider ISA (a header
// first included under the pragma would carry AVX code into functions shared with portable TUs).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "../core/backends.h"
#include "../core/mlp.h"
#include "../core/retention.h"
