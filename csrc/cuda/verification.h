// miras/cuda/verification.h — which CUDA kernel families have passed on real hardware.
//
// Rule (docs/emulator.md): every kernel is verified in the emulator on every CI run; a family is
// dispatched by default only when its sources (the fingerprint of its files in
// csrc/cuda/families.txt, computed by the build: MIRAS_FP_<FAMILY>) are the ones that last passed
// `bench/device_check.sh` on a GPU. A new or changed family runs only with MIRAS_CUDA_UNVERIFIED=1
// until a hardware run passes; then that session records the run here (fingerprint from
// `python -m miras info`, device, commit, date, what passed).
//
// Header-only and CUDA-free: the dispatcher, the C ABI's kernels and `python -m miras info`
// (through the torch glue) read the same table.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>

// Fingerprints are the first 16 hex digits of a sha256 (python/miras/_fingerprint.py), passed by
// the build as 64-bit integers (no quoting through compiler command lines); 0 = not computed.
#ifndef MIRAS_FP_CHUNK_L2
#define MIRAS_FP_CHUNK_L2 0ull
#endif
#ifndef MIRAS_FP_SCAN
#define MIRAS_FP_SCAN 0ull
#endif
#ifndef MIRAS_FP_CAPI
#define MIRAS_FP_CAPI 0ull
#endif

namespace miras {
namespace cuda {

struct HardwareRun {
  const char* family;
  uint64_t build_fingerprint;     // these sources (computed by the build)
  uint64_t verified_fingerprint;  // the sources of the last passing hardware run; 0: none yet
  const char* device;
  const char* commit;
  const char* date;
  const char* evidence;
};

// chunk_l2 and scan: run 3 of bench/RESULTS.md §2 (commit ea605d0). Their files changed after it
// only by edits that leave their PTX identical (tools/ptx_compare.py, nvcc 13.0, sm_90a):
//   - the emulator hooks of csrc/cuda/device.cuh (MIRAS_DYNAMIC_SMEM, MIRAS_LAUNCH, MIRAS_MUTANT):
//     ea605d0's kernel files and ef6355b's give identical PTX (2026-12-07);
//   - the registry (registry.h: bias_known in the support checks, bias_needs_split moved to
//     core/bias.h) and the launch helper launch_state_kernel (host code): ef6355b's sources and
//     these give identical PTX for every family (`tools/ptx_compare.py --rev ef6355b`, 2026-12-07).
// The shared math of csrc/core is not part of the fingerprints (families.txt `shared`): its changes
// since ea605d0 — the Huber-tie, smooth-sign and lq-overflow fixes of 2026-11-26 and the robust VJP
// as three ratios of 8c1cd3a (r^3 overflowed float32) — are verified on the CPU and in the emulator
// only; they change the device code of the kernels that include them (not re-run on hardware).
// capi (the C ABI's two bookkeeping kernels): never ran on hardware.
inline const HardwareRun kHardwareRuns[] = {
    {"chunk_l2", MIRAS_FP_CHUNK_L2, 0x89da0129282d82d8ull, "NVIDIA H200", "ea605d0", "2026-11-26",
     "tests/test_cuda.py: 111 passed, 22 skipped (run 3)"},
    {"scan", MIRAS_FP_SCAN, 0x7ad7e16e8587a228ull, "NVIDIA H200", "ea605d0", "2026-11-26",
     "tests/test_cuda.py: 111 passed, 22 skipped (run 3)"},
    {"capi", MIRAS_FP_CAPI, 0, "", "", "", "never ran on hardware"},
};

inline bool hardware_verified(const HardwareRun& r) {
  return r.verified_fingerprint != 0 && r.verified_fingerprint == r.build_fingerprint;
}

// MIRAS_CUDA_UNVERIFIED=1: also dispatch families that have not passed on hardware (emulator-verified).
inline bool unverified_allowed() {
  const char* s = std::getenv("MIRAS_CUDA_UNVERIFIED");
  return s && s[0] == '1' && s[1] == '\0';
}

inline const HardwareRun* hardware_run(const char* family) {
  for (const HardwareRun& r : kHardwareRuns)
    if (std::strcmp(r.family, family) == 0) return &r;
  return nullptr;
}

// True when `family` may run now; otherwise `why` says what to do.
inline bool family_enabled(const char* family, const char** why) {
  const HardwareRun* r = hardware_run(family);
  if (r && hardware_verified(*r)) return true;
  if (unverified_allowed()) return true;
  if (why)
    *why = r && r->verified_fingerprint != 0
               ? "its sources changed since its last hardware run (emulator-verified only): set "
                 "MIRAS_CUDA_UNVERIFIED=1 to use it, or record a passing bench/device_check.sh run in "
                 "csrc/cuda/verification.h"
               : "it has not passed a hardware run yet (emulator-verified only): set MIRAS_CUDA_UNVERIFIED=1 "
                 "to use it";
  return false;
}

}  // namespace cuda
}  // namespace miras
