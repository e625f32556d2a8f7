"""Build of the miras extension (miras._C).

One source list: every .cpp under csrc/torch and csrc/cpu, and — when CUDA is built — every .cu
under csrc/cuda. Adding a kernel file is adding the file.

Environment:
  MIRAS_BUILD_CUDA=0|1   force the CUDA part off/on (default: on when torch has CUDA and nvcc is found)
  TORCH_CUDA_ARCH_LIST   GPU targets (default "9.0a": Hopper with wgmma/TMA)
  MAX_JOBS               parallel compile jobs (ninja)
  MIRAS_CUTLASS_DIR      CUTLASS include dir (default: from the nvidia-cutlass wheel)
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    files = sorted(glob.glob(os.path.join(ROOT, pattern)))
    # Stand-alone test programs live beside the kernels but are not part of the extension.
    return [os.path.relpath(f, ROOT) for f in files if "selftest" not in os.path.basename(f)]


def _cutlass_include():
    env = os.environ.get("MIRAS_CUTLASS_DIR")
    if env:
        return env
    try:
        import cutlass_library  # from the pinned nvidia-cutlass wheel

        path = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
        return path if os.path.isdir(os.path.join(path, "cute")) else None
    except ImportError:
        return None


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    flag = os.environ.get("MIRAS_BUILD_CUDA", "auto").lower()
    have_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("1", "true", "on") and not have_cuda:
        raise RuntimeError("MIRAS_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found (set CUDA_HOME)")
    build_cuda = have_cuda and flag not in ("0", "false", "off")

    cxx = ["-O3", "-std=c++20", "-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-sign-compare"]
    sources = _sources("csrc/cpu/*.cpp") + [s for s in _sources("csrc/torch/*.cpp") if not s.endswith("_cuda.cpp")]
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    if not build_cuda:
        return [
            CppExtension("miras._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                         extra_link_args=["-fopenmp"])
        ]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    sources += _sources("csrc/torch/*_cuda.cpp") + _sources("csrc/cuda/*.cu")
    cutlass = _cutlass_include()
    if cutlass:
        include_dirs.append(cutlass)
    define_macros.append(("MIRAS_WITH_CUDA", None))
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-DMIRAS_WITH_CUDA",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    return [
        CUDAExtension("miras._C", sources, include_dirs=include_dirs, define_macros=define_macros,
                      extra_compile_args={"cxx": cxx + ["-DMIRAS_WITH_CUDA"], "nvcc": nvcc},
                      extra_link_args=["-fopenmp"])
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
)
