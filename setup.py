"""Build of the miras extension (miras._C).

One source list: every .cpp under csrc/torch and csrc/cpu, and — when CUDA is built — every .cu
under csrc/cuda. Adding a kernel file is adding the file.

Environment:
  MIRAS_BUILD_CUDA=0|1   force the CUDA part off/on (default: on when torch has CUDA and nvcc is found)
  TORCH_CUDA_ARCH_LIST   GPU targets (default "9.0a": Hopper with wgmma/TMA)
  MAX_JOBS               parallel compile jobs (ninja)
  MIRAS_CUTLASS_DIR      CUTLASS include dir (default: from the nvidia-cutlass wheel)
  MIRAS_BUILD_JAX=0|1    the JAX binding (miras/_jax_ffi*.so: XLA FFI handlers over the same CPU
                         backend, torch-free); default: built when jax is importable at build time
                         (its header-only XLA FFI API comes from jax.ffi.include_dir())
  MIRAS_BUILD_JAX_CUDA=1 also compile the CUDA kernels and handlers into it (off by default: it
                         compiles csrc/cuda a second time; needs the CUDA build)
"""
import glob
import importlib.util
import os

from setuptools import Extension, find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_fingerprint():
    spec = importlib.util.spec_from_file_location("_miras_fingerprint", os.path.join(ROOT, "python", "miras",
                                                                                      "_fingerprint.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build_info_flags():
    """-D flags with the build's identity: the sources hash (checked by ``import miras``), the CUDA
    kernel families' fingerprints (csrc/cuda/verification.h) and the CUDA targets. Integers and
    pp-number tokens only, so that no compiler command line needs quoting."""
    fp = _load_fingerprint()
    flags = [f"-DMIRAS_SOURCE_HASH=0x{fp.source_hash(ROOT)}ull"]
    for name, value in fp.family_fingerprints(ROOT).items():
        if name != "shared":
            flags.append(f"-DMIRAS_FP_{name.upper()}=0x{value}ull")
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a").replace(";", " ").split()
    flags.append("-DMIRAS_CUDA_ARCHS=" + "_".join(a.replace("+PTX", "p") for a in archs))
    return flags


def _sources(pattern):
    return [os.path.relpath(f, ROOT) for f in sorted(glob.glob(os.path.join(ROOT, pattern)))]


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


_ON, _OFF = ("1", "true", "on"), ("0", "false", "off")
# C++20 for the extension's host code: torch's headers (2.13+) require it. The torch-free parts
# (csrc/core, csrc/cpu, csrc/cuda, csrc/capi) are written in C++17 and CMake / nvcc build them so,
# so that the C ABI and the kernels build with older toolchains; CI compiles them both ways.
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-sign-compare"]
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-DMIRAS_WITH_CUDA",
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]


def _jax_extension(build_cuda, cuda_home, cutlass):
    """miras._jax_ffi: the XLA FFI handlers (csrc/jax) and the CPU backend, torch-free (a plain
    shared library; python/miras/jax.py loads it with ctypes)."""
    flag = os.environ.get("MIRAS_BUILD_JAX", "auto").lower()
    if flag in _OFF:
        return []
    try:
        import jax.ffi

        xla_include = jax.ffi.include_dir()
    except ImportError:
        if flag in _ON:
            raise RuntimeError("MIRAS_BUILD_JAX=1 but jax is not importable here: pip install jax, and build "
                               "with --no-build-isolation so that the build sees it")
        return []
    with_cuda = os.environ.get("MIRAS_BUILD_JAX_CUDA", "0").lower() in _ON
    if with_cuda and not build_cuda:
        raise RuntimeError("MIRAS_BUILD_JAX_CUDA=1 needs the CUDA build (nvcc, CUDA_HOME; MIRAS_BUILD_CUDA not 0)")
    sources = _sources("csrc/cpu/*.cpp") + ["csrc/jax/ffi_cpu.cpp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx = CXX_FLAGS + _build_info_flags() + ["-isystem", xla_include, "-fvisibility=hidden",
                                             "-fvisibility-inlines-hidden"]
    kw = dict(extra_link_args=["-fopenmp"])
    if with_cuda:
        sources += ["csrc/jax/ffi_cuda.cpp"] + _sources("csrc/cuda/*.cu")
        include_dirs += [os.path.join(cuda_home, "include")] + ([cutlass] if cutlass else [])
        cxx += ["-DMIRAS_WITH_CUDA"]
        # The CUDA runtime linked statically: the library must not depend on a libcudart of a
        # particular version (jax brings its own).
        kw.update(library_dirs=[os.path.join(cuda_home, "lib64")], libraries=["cudart_static", "dl", "rt", "pthread"])
    return [Extension("miras._jax_ffi", sources, include_dirs=include_dirs, language="c++",
                      extra_compile_args={"cxx": cxx, "nvcc": NVCC_FLAGS + _build_info_flags() +
                                          ["-Xcompiler", "-fvisibility=hidden"]},
                      **kw)]


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    flag = os.environ.get("MIRAS_BUILD_CUDA", "auto").lower()
    have_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in _ON and not have_cuda:
        raise RuntimeError("MIRAS_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found (set CUDA_HOME)")
    build_cuda = have_cuda and flag not in _OFF

    cxx = CXX_FLAGS + _build_info_flags()
    sources = _sources("csrc/cpu/*.cpp") + [s for s in _sources("csrc/torch/*.cpp") if not s.endswith("_cuda.cpp")]
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    cutlass = _cutlass_include() if build_cuda else None
    jax_ext = _jax_extension(build_cuda, CUDA_HOME, cutlass)
    if not build_cuda:
        return [
            CppExtension("miras._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                         extra_link_args=["-fopenmp"])
        ] + jax_ext
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    sources += _sources("csrc/torch/*_cuda.cpp") + _sources("csrc/cuda/*.cu")
    if cutlass:
        include_dirs.append(cutlass)
    define_macros.append(("MIRAS_WITH_CUDA", None))
    return [
        CUDAExtension("miras._C", sources, include_dirs=include_dirs, define_macros=define_macros,
                      extra_compile_args={"cxx": cxx + ["-DMIRAS_WITH_CUDA"], "nvcc": NVCC_FLAGS + _build_info_flags()},
                      extra_link_args=["-fopenmp"])
    ] + jax_ext


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension.with_options(use_ninja=True)):
        def build_extension(self, ext):
            # Both extensions compile csrc/cpu (with different flags): separate object folders
            # (and ninja files), so that neither rebuild overwrites the other's objects.
            if ext.name != "miras._jax_ffi":
                return super().build_extension(ext)
            temp = self.build_temp
            self.build_temp = os.path.join(temp, "jax")
            try:
                return super().build_extension(ext)
            finally:
                self.build_temp = temp

    return {"build_ext": Build}


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
)
