#!/usr/bin/env python3
"""FP8 sparse attention fidelity by quantisation option (docs/fp8.md): a CPU study.

For a generator workload (`sapattn gen`), runs `sapattn eval --method sap --fp8 SPEC,...` on chosen
heads and writes one JSON line per (spec, budget): the e4m3 attention (block_sparse_attention_e4m3,
the CPU reference of the future Hopper kernel) on the same clusters and selection as the native
sparse attention, with its relative L2 error against that native output per head
(`rel_l2_native`, the FP8 goal's measure: mean <= 0.02, worst head <= 0.05) and, for context, against
dense attention. A full-size workload is too slow on two cores for every head, so `--heads` takes a
subset: the script writes those heads to a temporary workload (the clusters of a head depend on that
head alone, so the numbers are those of the full call) and maps the head numbers back.

Spec fields (`sapattn eval --help`, docs/fp8.md): q<N>|qc, k<N>|kc, v<N>|vc|vch, smooth|nosmooth,
p<scale>, sumf|sumq.

    build/sapattn gen --preset wan-1.3b-480p --seed 1 --out /tmp/fp8/wan-1.3b-480p-s1
    python tools/studies/fp8_granularity.py --sapattn build/sapattn --workload /tmp/fp8/wan-1.3b-480p-s1 \\
        --heads 0,1,2,3 --specs ALL --out bench/results/2026-12-07-cpu-fp8-wan-1.3b-480p.jsonl
    python tools/studies/fp8_granularity.py --report bench/results/2026-12-07-cpu-fp8-*.jsonl
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

# One option changed at a time from the baseline (the first), then the combinations worth a look.
BASELINE = "q64:k128:vch:smooth:p448:sumf"
SPECS = [
    BASELINE,
    "q128:k128:vch:smooth:p448:sumf", "qc:k128:vch:smooth:p448:sumf",
    "q64:k64:vch:smooth:p448:sumf", "q64:k176:vch:smooth:p448:sumf", "q64:kc:vch:smooth:p448:sumf",
    "q64:k128:v128:smooth:p448:sumf", "q64:k128:vc:smooth:p448:sumf",
    "q64:k128:vch:nosmooth:p448:sumf",
    "q64:k128:vch:smooth:p256:sumf", "q64:k128:vch:smooth:p16:sumf", "q64:k128:vch:smooth:p1:sumf",
    "q64:k128:vch:smooth:p448:sumq",
    # The combination chosen on tiny and tiny-text (docs/fp8.md), and its per-cluster form (scales that
    # the k-means update could compute in the pass it already makes).
    "q128:k128:vch:smooth:p448:sumq", "qc:kc:vch:smooth:p448:sumq",
]


def write_heads(workload: Path, heads: list[int], out: Path) -> dict:
    """Heads `heads` of a bhsd workload as a workload of their own in `out`; returns its description."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    meta = json.loads((workload / "workload.json").read_text())
    if meta["layout"] != "bhsd":
        raise SystemExit(f"{workload}: expected a bhsd workload, got {meta['layout']}")
    with safe_open(str(workload / "workload.safetensors"), "pt") as f:
        tensors = {name: f.get_tensor(name)[:, heads].contiguous() for name in ("q", "k", "v")}
    save_file(tensors, str(out / "workload.safetensors"))
    sliced = dict(meta, shape=list(tensors["q"].shape), head_kinds=[meta["head_kinds"][h] for h in heads])
    (out / "workload.json").write_text(json.dumps(sliced, indent=2) + "\n")
    del torch
    return meta


def run(args) -> None:
    heads = [int(h) for h in args.heads.split(",")] if args.heads else None
    specs = SPECS if args.specs == "ALL" else args.specs.split(",")
    with tempfile.TemporaryDirectory(prefix="fp8-heads-") as tmp:
        workload = Path(args.workload)
        meta = json.loads((workload / "workload.json").read_text())
        if heads is not None:
            write_heads(workload, heads, Path(tmp))
            workload = Path(tmp)
        else:
            heads = list(range(meta["shape"][1]))
        command = [args.sapattn, "eval", "--in", str(workload / "workload.safetensors"), "--method", "sap", "--json",
                   "--fp8", ",".join(specs), *args.eval_args]
        if args.threads:
            command += ["--threads", str(args.threads)]
        print(" ".join(command), file=sys.stderr)
        result = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    with open(args.out, "a") as out:
        for line in result.stdout.splitlines():
            row = json.loads(line)
            row["preset"], row["workload_seed"] = meta["preset"], meta["seed"]
            for entry in row["per_head"]:
                entry["head"] = heads[entry["head"]]
                entry["kind"] = meta["head_kinds"][entry["head"]]
            out.write(json.dumps(row) + "\n")


def report(paths: list[str]) -> None:
    """Per spec, over every head of every file: rel_l2_native's mean and worst head per preset and
    overall, its paired change against the baseline spec (mean over the same heads, and the share of
    heads where it is lower), and the recall against the native output (exp of the LSE change), as a
    markdown table."""
    values = defaultdict(dict)  # spec -> (preset, seed, budget, head) -> rel_l2_native
    recall = defaultdict(list)
    presets = []
    for path in paths:
        for line in open(path):
            row = json.loads(line)
            if "fp8" not in row:
                continue
            if row["preset"] not in presets:
                presets.append(row["preset"])
            budget = (row["config"]["top_p"], row["config"]["density"])
            for h in row["per_head"]:
                values[row["fp8"]][(row["preset"], row["workload_seed"], budget, h["head"])] = h["rel_l2_native"]
            recall[row["fp8"]].append(row["recall_native"])
    base = values.get(BASELINE, {})
    print("| spec | " + " | ".join(f"{p} mean / worst" for p in presets) +
          " | all: mean / worst (heads) | change vs baseline (heads lower) | recall vs native |")
    print("|---|" + "---|" * (len(presets) + 3))
    for spec, per_head in values.items():
        cells = []
        for p in presets:
            v = [x for key, x in per_head.items() if key[0] == p]
            cells.append(f"{statistics.mean(v):.4f} / {max(v):.4f}" if v else "")
        every = list(per_head.values())
        paired = [(x, base[key]) for key, x in per_head.items() if key in base]
        change = (f"{statistics.mean(x - b for x, b in paired):+.5f} ({sum(x < b for x, b in paired)}/{len(paired)})"
                  if paired and spec != BASELINE else "")
        print(f"| `{spec}` | " + " | ".join(cells) + f" | {statistics.mean(every):.4f} / {max(every):.4f} "
              f"({len(every)}) | {change} | {statistics.mean(recall[spec]):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sapattn", default="build/sapattn", help="the sapattn command (target sapattn_cli)")
    parser.add_argument("--workload", help="a folder written by sapattn gen (bhsd)")
    parser.add_argument("--heads", help="comma-separated heads to evaluate (default: all)")
    parser.add_argument("--specs", default="ALL", help="comma-separated FP8 option specs, or ALL (the list above)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", help="JSON lines file to append to")
    parser.add_argument("--report", nargs="+", help="summarise these JSON lines files instead")
    parser.add_argument("eval_args", nargs="*", help="more sapattn eval options, after --")
    args = parser.parse_args()
    if args.report:
        report(args.report)
    elif args.workload and args.out:
        run(args)
    else:
        parser.error("give --workload and --out, or --report")


if __name__ == "__main__":
    main()
