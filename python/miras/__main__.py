"""``python -m miras <command>``: ``demo`` (train small Miras models on synthetic recall tasks)."""
from __future__ import annotations

import sys

USAGE = """usage: python -m miras <command> [options]

commands:
  demo    train small Moneta / Yaad / Memora / Titans-style / linear-attention LMs on synthetic
          recall tasks (MQAR, needle in a haystack); prints a table, writes results.json and a plot
          (python -m miras demo --help for its options)
  info    the build: versions, CPU instruction sets, CUDA targets, the CUDA kernel families and
          whether each has passed on hardware (MIRAS_CUDA_UNVERIFIED=1 opts into the others)
"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        from ._info import info

        print(info())
        return 0
    if cmd == "demo":
        from .demo import main as demo_main

        demo_main(rest)
        return 0
    print(f"unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
