"""Sums Nsight Compute's per-instruction warp-stall samples of one kernel: the instructions that
hold the most samples, each with its leading stall reasons, the stall reasons over all samples,
and, with --regions, the samples and the instructions executed per call of each address range
(for example the parts of a main loop read off `cuobjdump -sass`).

The input is the source page as CSV with SASS, which a report gives with
    ncu -i REPORT.ncu-rep --page source --csv --print-source sass > source.csv
Addresses are offsets from the kernel's first instruction, as cuobjdump prints them. A page of
several launches is read up to its second kernel: the first launch only.

    python3 bench/ncu_source.py source.csv [--top 30] [--per EXECUTIONS]
        [--regions 47e0-4ad0:waits,4ad0-4be0:turn,...]
--per divides each region's executed instructions (e.g. by the tiles: one instruction's count).
"""

from __future__ import annotations

import argparse
import csv
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def read(path: str):
    """The rows of the source page: (offset, SASS text, samples, executed, {reason: samples})."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = next((r for r in rows if SAMPLES in r), None)
    if header is None:
        raise SystemExit(f"{path}: no '{SAMPLES}' column: not ncu's source page as CSV")
    at = {name: i for i, name in enumerate(header)}
    reasons = [n for n in header if n.startswith("stall_") and "Not Issued" not in n]
    body = []
    for r in rows[rows.index(header) + 1:]:
        if r and r[0] == "Kernel Name":
            break  # the next kernel's block: this reads the first kernel of the page only
        if len(r) == len(header) and r[0].startswith("0x"):
            body.append(r)
    if not body:
        raise SystemExit(f"{path}: no instructions")
    base = int(body[0][0], 16)
    number = lambda text: int(float(text.replace(",", ""))) if text.strip() not in ("", "-") else 0  # noqa: E731
    return [(int(r[0], 16) - base, r[1].strip(), number(r[at[SAMPLES]]), number(r[at[EXECUTED]]),
             {n[len("stall_"):]: number(r[at[n]]) for n in reasons}) for r in body]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--per", type=float, default=0.0, help="divide the regions' executed instructions by this")
    p.add_argument("--regions", default="", help="comma-separated LO-HI[:NAME] hexadecimal offset ranges")
    args = p.parse_args()
    rows = read(args.source)
    total = sum(r[2] for r in rows) or 1
    print(f"{len(rows)} instructions, {total} samples")
    for off, text, samples, executed, reasons in sorted(rows, key=lambda r: -r[2])[:args.top]:
        lead = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
        print(f"{off:6x} {100 * samples / total:5.2f}% executed {executed:11d}  {text[:56]:56s} "
              + " ".join(f"{k}={v}" for k, v in lead if v))
    overall: dict[str, int] = {}
    for r in rows:
        for k, v in r[4].items():
            overall[k] = overall.get(k, 0) + v
    stalls = sum(overall.values()) or 1
    print("stall reasons:", ", ".join(f"{k} {100 * v / stalls:.1f}%"
                                      for k, v in sorted(overall.items(), key=lambda kv: -kv[1]) if v))
    for spec in filter(None, args.regions.split(",")):
        span, _, name = spec.partition(":")
        lo, hi = (int(x, 16) for x in span.split("-"))
        inside = [r for r in rows if lo <= r[0] < hi]
        executed = sum(r[3] for r in inside)
        per = f", {executed / args.per:.1f} instructions per" if args.per else ""
        print(f"{lo:x}-{hi:x} {name}: {100 * sum(r[2] for r in inside) / total:.1f}% of samples{per}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
