"""Fingerprints of the sources (stdlib only: setup.py loads this file before miras is built).

- ``source_hash(root)``: every C++/CUDA source of the extension (csrc/{core,cpu,cuda,torch,capi,jax},
  not the notes) — embedded by setup.py into ``miras._C``; ``import miras`` refuses an extension
  built from other sources than the checkout it sits in (a stale binary).
- ``family_fingerprints(root)``: one per CUDA kernel family of csrc/cuda/families.txt — compared by
  the dispatcher with the hardware-verified ones of csrc/cuda/verification.h. CMakeLists.txt
  computes the same values (sha256 of "path\\n<sha256 of the file>\\n" per file, first 16 hex digits).
"""
from __future__ import annotations

import hashlib
import os

SOURCE_DIRS = ("csrc/core", "csrc/cpu", "csrc/cuda", "csrc/torch", "csrc/capi", "csrc/jax")
SOURCE_EXTS = (".h", ".hpp", ".cpp", ".cc", ".cu", ".cuh", ".txt")


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _combine(root: str, rels) -> str:
    h = hashlib.sha256()
    for rel in rels:
        h.update(f"{rel}\n{_file_digest(os.path.join(root, rel))}\n".encode())
    return h.hexdigest()[:16]


def source_files(root: str):
    out = []
    for d in SOURCE_DIRS:
        full = os.path.join(root, d)
        if not os.path.isdir(full):
            continue
        for name in sorted(os.listdir(full)):
            if name.endswith(SOURCE_EXTS) and os.path.isfile(os.path.join(full, name)):
                out.append(f"{d}/{name}")
    return out


def source_hash(root: str) -> str:
    return _combine(root, source_files(root))


def families(root: str):
    """{family: [paths]} from csrc/cuda/families.txt (the `shared` line included)."""
    out = {}
    with open(os.path.join(root, "csrc", "cuda", "families.txt")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                name, *paths = line.split()
                out[name] = paths
    return out


def family_fingerprints(root: str):
    return {name: _combine(root, paths) for name, paths in families(root).items()}
