#!/usr/bin/env bash
# One entry point for a fresh machine with only Python and this repository.
#   ./run.sh demo    set up and run the main job: `python -m miras demo` (recall tasks, table, plot)
#   ./run.sh test    set up (venv, torch, build) and run the whole test suite   (CI runs this)
#   ./run.sh bench   set up and run the quick CPU benchmark table
#   ./run.sh setup   only set up
# Extra arguments after `demo`, `test` and `bench` go to the demo, pytest and the benchmark.
# Environment: MIRAS_VENV (default .venv), MIRAS_TORCH (default torch==2.14.1), MIRAS_JAX (default
# jax==0.10.2, CPU; "none" skips it, and the JAX tests skip),
# MIRAS_BUILD_CUDA (auto), TORCH_CUDA_ARCH_LIST (9.0a), MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${MIRAS_VENV:-.venv}
TORCH_SPEC=${MIRAS_TORCH:-torch==2.14.1}
JAX_SPEC=${MIRAS_JAX:-jax==0.10.2}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  local py="$VENV/bin/python"
  if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install -q --upgrade pip
    "$py" -m pip install -q "$TORCH_SPEC"
  fi
  "$py" -m pip install -q setuptools wheel ninja pytest numpy hypothesis "nvidia-cutlass==4.2.0.0"
  # cmake builds the C ABI (libmiras) for tests/test_capi.py; from pip where the machine has none.
  command -v cmake >/dev/null 2>&1 || "$py" -m pip install -q "cmake>=3.22"
  # JAX (CPU) before the build: setup.py builds miras/_jax_ffi*.so when it can import jax.
  if [ "$JAX_SPEC" != "none" ]; then "$py" -m pip install -q "$JAX_SPEC"; fi
  # nvcc: prefer the real toolkit over wrappers on PATH.
  if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
  if [ -n "${CUDA_HOME:-}" ]; then export PATH="$CUDA_HOME/bin:$PATH"; fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  # Compiler cache for the C++ host compiles (and nvcc's host passes): torch's builder rejects a
  # "ccache g++" compiler string, so use ccache's masquerade directory instead. MIRAS_NO_CCACHE=1 skips it.
  if [ -z "${MIRAS_NO_CCACHE:-}" ] && [ -d /usr/lib/ccache ] && command -v ccache >/dev/null; then
    export PATH="/usr/lib/ccache:$PATH" CCACHE_BASEDIR="$PWD" CC=${CC:-gcc} CXX=${CXX:-g++}
  fi
  # A failed build fails this command (and import miras refuses an extension built from other
  # sources, so a stale _C*.so from an earlier build cannot pass the tests either).
  local log
  log=$(mktemp)
  if ! "$py" -m pip install -q --no-build-isolation -e . > "$log" 2>&1; then
    grep -v -E "^(WARNING: Location|  Running)" "$log" | tail -n 60 >&2
    echo "run.sh: the build of miras failed (full log: $log)" >&2
    exit 1
  fi
  rm -f "$log"
  "$py" -c "import miras; print('miras', miras.__version__, 'cuda kernels built:', miras.has_cuda_kernels())"
}

case "${1:-test}" in
  setup) setup ;;
  demo)
    setup
    shift || true
    "$VENV/bin/python" -m pip install -q matplotlib || echo "matplotlib not installed: the demo skips its plot"
    "$VENV/bin/python" -m miras demo "$@"
    ;;
  test)
    setup
    shift || true
    "$VENV/bin/python" -m pytest -q -x "$@" tests
    ;;
  bench)
    setup
    shift || true
    "$VENV/bin/python" bench/bench_cpu.py --quick "$@"
    ;;
  *) echo "usage: $0 [demo|test|bench|setup] [args...]" >&2; exit 2 ;;
esac
