"""The repository's docs stand on their own: the worked example of docs/extending.md still applies
and stays small, and the links between the docs and the README resolve."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_log_cosh_example_applies_and_is_small():
    patch = os.path.join(ROOT, "docs", "examples", "log_cosh.patch")
    files = re.findall(r"^diff --git a/(\S+)", open(patch).read(), re.M)
    assert 1 <= len(files) <= 5, files
    assert "csrc/core/registry.h" in files and "csrc/core/bias.h" in files
    if shutil.which("git") is None or subprocess.run(["git", "-C", ROOT, "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "-C", ROOT, "apply", "--check", patch], capture_output=True, text=True)
    assert r.returncode == 0, f"docs/examples/log_cosh.patch no longer applies: {r.stderr}"


@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md", "docs/math.md", "docs/extending.md",
                                 "docs/emulator.md"])
def test_relative_links_resolve(doc):
    path = os.path.join(ROOT, doc)
    text = open(path).read()
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        full = os.path.normpath(os.path.join(os.path.dirname(path), target))
        assert os.path.exists(full), f"{doc} links to {target}, which does not exist"
    assert "../shared" not in text, f"{doc} points outside the repository"
