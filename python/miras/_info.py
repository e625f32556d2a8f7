"""``python -m miras info``: what this build is and what it will run (like ``python -m xformers.info``),
and the import-time check that the compiled extension matches the sources beside it."""
from __future__ import annotations

import os
import platform
import sys

from . import _fingerprint

_PKG = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_PKG))  # python/miras -> the checkout (editable installs)


def _checkout_root():
    """The source checkout this package was built from, or None (an installed wheel has no csrc)."""
    if os.path.isfile(os.path.join(_REPO, "csrc", "cuda", "families.txt")) and \
            os.path.isfile(os.path.join(_REPO, "setup.py")):
        return _REPO
    return None


def check_sources(C):
    """Refuses an extension built from other sources than the checkout it sits in (a stale
    ``_C*.so`` left behind by a failed build would otherwise pass the tests)."""
    root = _checkout_root()
    if root is None or os.environ.get("MIRAS_SKIP_SOURCE_CHECK") == "1":
        return
    built = C.build_info().get("source_hash", "")
    now = _fingerprint.source_hash(root)
    if built != now:
        raise ImportError(
            f"miras: the compiled extension {getattr(C, '__file__', '_C')} was built from other sources "
            f"(sources hash {built or 'unknown'}, the checkout at {root} has {now}): rebuild it with "
            f"`pip install --no-build-isolation -e {root}` (or ./run.sh setup). MIRAS_SKIP_SOURCE_CHECK=1 skips "
            "this check.")


def info() -> str:
    import torch

    from . import _C, __version__

    b = _C.build_info()
    isa = dict(kv.split("=", 1) for kv in b["cpu_isa"].split(";"))
    lines = [f"miras {__version__}  ({_PKG})",
             f"python {platform.python_version()}, torch {torch.__version__}, "
             f"torch CUDA {torch.version.cuda or 'none'}, GPU available: {torch.cuda.is_available()}"]
    root = _checkout_root()
    if root:
        now = _fingerprint.source_hash(root)
        state = "matches the checkout" if now == b["source_hash"] else f"STALE: the checkout has {now}"
    else:
        state = "installed package (no sources to compare)"
    lines.append(f"build: sources hash {b['source_hash'] or 'unknown'} ({state})")
    lines.append(f"CPU backend: instruction sets compiled: {isa.get('compiled')}; this CPU: {isa.get('supported')}; "
                 f"in use: {isa.get('active')}" + (f" (MIRAS_CPU_ISA={isa['MIRAS_CPU_ISA']})" if isa.get("MIRAS_CPU_ISA") else ""))
    if b["cuda"]:
        archs = b["cuda_archs"].replace("_", ", ") or "unknown"
        lines.append(f"CUDA kernels: built for sm targets {archs}")
    else:
        lines.append("CUDA kernels: not built (CPU-only extension)")
    unverified = os.environ.get("MIRAS_CUDA_UNVERIFIED") == "1"
    lines.append("kernel families (csrc/cuda/verification.h; MIRAS_CUDA_UNVERIFIED="
                 f"{'1: every family runs' if unverified else 'unset: hardware-verified families only'}):")
    for f in b["families"]:
        if f["hardware_verified"]:
            status = (f"hardware-verified on {f['device']} at {f['commit']} ({f['date']}): {f['evidence']}")
        elif f["verified_fingerprint"]:
            status = (f"changed since its hardware run on {f['device']} at {f['commit']} "
                      f"(verified sources {f['verified_fingerprint']}): emulator-verified only")
        else:
            status = "never ran on hardware: emulator-verified only"
        run = "runs by default" if f["hardware_verified"] else ("runs (opted in)" if f["enabled"] else
                                                                "opt-in: MIRAS_CUDA_UNVERIFIED=1")
        lines.append(f"  {f['family']:<9} sources {f['fingerprint'] or 'unknown'}  {status}; {run}")
    jax_lib = [n for n in os.listdir(_PKG) if n.startswith("_jax_ffi")]
    lines.append(f"JAX FFI library: {'built (' + jax_lib[0] + ')' if jax_lib else 'not built'}")
    lines.append("C ABI (libmiras, miras.h): built by CMake (see README, C ABI)")
    lines.append(f"platform: {platform.platform()}, {os.cpu_count()} CPUs, {sys.executable}")
    return "\n".join(lines)
