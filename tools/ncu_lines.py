"""Warp stall samples per source line, from tools/ncu_kernels.sh's archive.

ncu's source page gives samples per SASS instruction; the cubin's line table (nvdisasm -g)
gives each instruction's source line. Both list a kernel's instructions in address order, so
they are joined by position (checked by opcode). Prints, per kernel, the lines with the most
samples: share of samples, instructions executed, the main stall reasons.

    python tools/ncu_lines.py OUT.tgz [--kernel NAME] [--top 40] [--inner] [--nvdisasm PATH]
"""

from __future__ import annotations

import argparse
import collections
import csv
import glob
import os
import re
import shutil
import subprocess
import tarfile
import tempfile

_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def _sass_samples(path: str) -> dict[str, list[dict]]:
    """Per kernel, its instructions' rows of the source page, in address order."""
    kernels: dict[str, list[dict]] = {}
    name = header = None
    for row in csv.reader(open(path)):
        if row and row[0] == "Kernel Name":
            name, header = row[1], None
            kernels[name] = []
        elif row and row[0] == "Address":
            header = row
        elif name and header and len(row) == len(header):
            kernels[name].append(dict(zip(header, row, strict=True)))
    return kernels


def _line_table(nvdisasm: str, cubin: str, inner: bool) -> tuple[str, list[tuple[str, str]]]:
    """(kernel name, [(file:line, instruction)] in address order) of a one-kernel cubin. Each
    instruction's line is that of the kernel's own source (the outermost of its inlining chain),
    or with ``inner`` that of the innermost helper."""
    text = subprocess.run([nvdisasm, "-gi", "-c", cubin], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    name = re.search(r"\.text\.(\S+):", text)
    where, group, table = "?", [], []
    for line in text.splitlines():
        m = _LINE.search(line)
        if m:
            group.append(f"{os.path.basename(m.group(1))}:{m.group(2)}")
            continue
        m = _INSN.search(line)
        if m:
            if group:  # a chain is listed innermost first, the kernel's own line last
                where = group[0] if inner else group[-1]
                group = []
            table.append((where, m.group(2).strip()))
    return (name.group(1) if name else "?"), table


def _opcode(text: str) -> str:
    parts = text.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0].split(".")[0] if parts else "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("archive")
    ap.add_argument("--kernel", default=None)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--inner", action="store_true", help="attribute to the innermost helper")
    ap.add_argument("--nvdisasm", default=shutil.which("nvdisasm") or "nvdisasm")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    with tarfile.open(args.archive) as tar:
        tar.extractall(tmp, filter="data")
    sass = _sass_samples(glob.glob(f"{tmp}/*_sass.csv")[0])
    cubins = glob.glob(f"{tmp}/cubin/*.cubin")
    tables = dict(_line_table(args.nvdisasm, c, args.inner) for c in cubins)
    for kname, rows in sass.items():
        if args.kernel and args.kernel not in kname:
            continue
        table = tables.get(kname)
        if table is None or len(table) < len(rows):
            print(f"== {kname}: no matching cubin ({len(rows)} instructions)")
            continue
        pairs = list(zip(rows, table, strict=False))  # (the cubin may end in padding)
        mismatch = sum(_opcode(r["Source"]) != _opcode(t) for r, (_, t) in pairs)
        total = sum(int(r["Warp Stall Sampling (All Samples)"] or 0) for r in rows) or 1
        per_line: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for r, (where, _) in pairs:
            c = per_line[where]
            c["samples"] += int(r["Warp Stall Sampling (All Samples)"] or 0)
            c["executed"] += int(r["Instructions Executed"] or 0)
            c["static"] += 1
            for key, val in r.items():
                if key.startswith("stall_") and "Not Issued" not in key and val not in ("", "0"):
                    c[key[6:]] += int(val)
        print(f"== {kname}: {len(rows)} instructions ({mismatch} opcode mismatches), "
              f"{total} samples")  # fmt: skip
        ranked = sorted(per_line.items(), key=lambda kv: -kv[1]["samples"])
        for where, c in ranked[: args.top]:
            skip = ("samples", "executed", "static")
            reasons = sorted(((v, k) for k, v in c.items() if k not in skip), reverse=True)[:3]
            why = ", ".join(f"{k} {100 * v / max(c['samples'], 1):.0f}%" for v, k in reasons)
            print(f"  {where:28} {100 * c['samples'] / total:5.1f}%  n={c['static']:4}  "
                  f"exec={c['executed'] / 1e6:7.2f}M  {why}")  # fmt: skip


if __name__ == "__main__":
    main()
