#!/usr/bin/env python3
"""Summarise ``cuobjdump -sass`` output: instruction counts per kernel and per kernel family.

  cuobjdump -sass miras/_C*.so > sass.txt && python3 bench/sass_summary.py sass.txt
  python3 bench/sass_summary.py --so python/miras/_C*.so      # runs cuobjdump itself

A family is the demangled kernel name without template arguments and parameters. Columns are
static instruction counts (in the code, not executed): HGMMA (Hopper warpgroup MMA), HMMA (the
older warp MMA), FFMA (scalar fp32 FMA), MUFU (special functions), LDL/STL (local memory: spills or
run-time-indexed arrays), LDGSTS (cp.async), UTMA* (tensor-memory-accelerator copies), BAR (barriers),
and the total. A matrix kernel showing only FFMA/HMMA is on a slower path than wgmma.
"""
from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys

KEYS = ["HGMMA", "HMMA", "FFMA", "MUFU", "LDL", "STL", "LDGSTS", "UTMA", "BAR", "total"]
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_ARCH = re.compile(r"(?:\barch\s*=\s*|code for\s+)(sm_\w+)")
_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9]*)(?:\.[A-Z0-9_.]+)?")


def classify(op: str):
    if op == "HGMMA":
        return "HGMMA"
    if op == "HMMA":
        return "HMMA"
    if op in ("FFMA", "FFMA2"):
        return "FFMA"
    if op == "MUFU":
        return "MUFU"
    if op == "LDL":
        return "LDL"
    if op == "STL":
        return "STL"
    if op == "LDGSTS":
        return "LDGSTS"
    if op.startswith("UTMA") or op.startswith("UBLKCP"):
        return "UTMA"
    if op in ("BAR", "SYNCS"):
        return "BAR"
    return None


def parse(text: str):
    """-> list of (arch, mangled name, Counter)."""
    funcs = []
    arch = "?"
    cur = None
    for line in text.splitlines():
        m = _ARCH.search(line)
        if m:
            arch = m.group(1)
            continue
        m = _FUNC.match(line)
        if m:
            cur = (arch, m.group(1), collections.Counter())
            funcs.append(cur)
            continue
        if cur is None:
            continue
        m = _INSN.search(line)
        if m:
            op = m.group(1)
            cur[2]["total"] += 1
            k = classify(op)
            if k:
                cur[2][k] += 1
    return funcs


def demangle(names):
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    try:
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=60).stdout
        dem = out.splitlines()
        if len(dem) == len(names):
            return dict(zip(names, dem))
    except Exception:  # noqa: BLE001
        pass
    return {n: n for n in names}


def family(dem: str) -> str:
    s = dem
    if s.startswith("void "):
        s = s[5:]
    depth, out = 0, []
    for ch in s:
        if ch == "<":
            depth += 1
            continue
        if ch == ">":
            depth -= 1
            continue
        if ch == "(" and depth == 0:
            break
        if depth == 0:
            out.append(ch)
    return "".join(out).strip() or dem


def report(text: str, top: int = 60) -> str:
    funcs = parse(text)
    if not funcs:
        return "sass_summary: no kernels found in the cuobjdump output\n"
    dem = demangle(sorted({f[1] for f in funcs}))
    fams = collections.OrderedDict()
    for arch, name, c in funcs:
        key = (arch, family(dem[name]))
        agg = fams.setdefault(key, [0, collections.Counter()])
        agg[0] += 1
        agg[1].update(c)
    L = [f"{len(funcs)} kernels in {len(fams)} families (static instruction counts)", ""]
    hdr = f"{'arch':<8} {'family':<48} {'#k':>4} " + " ".join(f"{k:>7}" for k in KEYS)
    L += ["== per family ==", hdr]
    for (arch, fam), (n, c) in fams.items():
        L.append(f"{arch:<8} {fam[:48]:<48} {n:>4} " + " ".join(f"{c.get(k, 0):>7}" for k in KEYS))
    tot = collections.Counter()
    for _, _, c in funcs:
        tot.update(c)
    L.append(f"{'all':<8} {'':<48} {len(funcs):>4} " + " ".join(f"{tot.get(k, 0):>7}" for k in KEYS))
    L += ["", f"== per kernel (largest {top} by instruction count) ==",
          f"{'arch':<8} " + " ".join(f"{k:>7}" for k in KEYS) + "  kernel"]
    for arch, name, c in sorted(funcs, key=lambda f: -f[2]["total"])[:top]:
        d = dem[name]
        L.append(f"{arch:<8} " + " ".join(f"{c.get(k, 0):>7}" for k in KEYS) + "  " + (d if len(d) <= 160 else d[:157] + "..."))
    spills = [dem[n] for _, n, c in funcs if c.get("LDL") or c.get("STL")]
    L += ["", f"kernels with local-memory traffic (LDL/STL): {len(spills)}"]
    L += ["  " + (s if len(s) <= 160 else s[:157] + "...") for s in spills[:20]]
    return "\n".join(L) + "\n"


_PTX_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PTX_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTX_REGS = re.compile(r"Used (\d+) registers")
_PTX_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_report(text: str) -> str:
    """Registers / shared memory / stack / spills per entry function from `-Xptxas -v` output."""
    rows, cur = [], None
    for line in text.splitlines():
        m = _PTX_ENTRY.search(line)
        if m:
            cur = dict(name=m.group(1), arch=m.group(2), regs=None, smem=0, stack=0, st=0, ld=0)
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _PTX_STACK.search(line)
        if m:
            cur["stack"], cur["st"], cur["ld"] = map(int, m.groups())
        m = _PTX_REGS.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            m2 = _PTX_SMEM.search(line)
            cur["smem"] = int(m2.group(1)) if m2 else 0
    if not rows:
        return "ptxas: no resource report found (build without -Xptxas -v?)\n"
    dem = demangle(sorted({r["name"] for r in rows}))
    L = [f"== ptxas resource usage ({len(rows)} entry functions; spills: "
         f"{sum(1 for r in rows if r['st'] or r['ld'])}) ==",
         f"{'arch':<8} {'regs':>5} {'smem B':>7} {'stack':>6} {'spillST':>7} {'spillLD':>7}  kernel"]
    for r in sorted(rows, key=lambda r: (-(r["st"] + r["ld"]), -(r["regs"] or 0))):
        d = dem[r["name"]]
        L.append(f"{r['arch']:<8} {fmt_int(r['regs']):>5} {r['smem']:>7} {r['stack']:>6} {r['st']:>7} {r['ld']:>7}  "
                 + (d if len(d) <= 150 else d[:147] + "..."))
    return "\n".join(L) + "\n"


def fmt_int(x):
    return "?" if x is None else str(x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sass", nargs="?", help="cuobjdump -sass output (default: stdin)")
    ap.add_argument("--so", nargs="*", help="binaries to run cuobjdump -sass on instead")
    ap.add_argument("--top", type=int, default=60)
    ap.add_argument("--ptxas", help="a build log with `-Xptxas -v` output: adds a register/spill table")
    a = ap.parse_args(argv)
    if a.so:
        tool = shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump"
        text = ""
        for so in a.so:
            r = subprocess.run([tool, "-sass", so], capture_output=True, text=True)
            text += r.stdout
            if r.returncode:
                sys.stderr.write(r.stderr)
    elif a.sass:
        with open(a.sass, errors="replace") as f:
            text = f.read()
    else:
        text = sys.stdin.read()
    sys.stdout.write(report(text, a.top))
    if a.ptxas:
        with open(a.ptxas, errors="replace") as f:
            sys.stdout.write("\n" + ptxas_report(f.read()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
