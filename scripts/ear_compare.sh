#!/usr/bin/env bash
# SVG2 (sap), SVG2 with centroid compensation (sap --compensate), SVG-EAR (ear) and ear-plus on the
# generator's workloads at equal density (or equal top-p), against dense attention (docs/ear.md;
# the tables of docs/results.md come from this script). Writes one JSON line per (method, budget)
# per workload under OUT_DIR and prints the summary tables.
#
#   scripts/ear_compare.sh OUT_DIR [PRESET...]     (default: tiny tiny-text wan-1.3b-480p)
#
# Environment: SEEDS (workload seeds, "0 1 2"), BUDGET (sapattn eval's budget option,
# "--density 0.1,0.2,0.3"; "--top-p 0.9" compares at SVG2's own density), METHODS (the first
# eval's method list, "sap,ear,ear-plus"), SAP_C (1: also sap --compensate, the default; 0: not),
# IDEAS (1: also each ear-plus idea alone and in the combinations docs/results.md lists, on top of
# ear; 0 by default), THREADS (2), SAPATTN (the CLI, build/sapattn).
set -euo pipefail
out=${1:?usage: scripts/ear_compare.sh OUT_DIR [PRESET...]}
shift
presets=${*:-tiny tiny-text wan-1.3b-480p}
seeds=${SEEDS:-0 1 2}
read -r -a budget <<<"${BUDGET:---density 0.1,0.2,0.3}"
methods=${METHODS:-sap,ear,ear-plus}
sap_c=${SAP_C:-1}
ideas=${IDEAS:-0}
threads=${THREADS:-2}
sapattn=${SAPATTN:-build/sapattn}
mkdir -p "$out"

for preset in $presets; do
  text=()
  if [ "$preset" = tiny-text ]; then text=(--text-tokens 64 --prompt-length 40); fi
  if [ "$preset" = hunyuan-720p ]; then text=(--text-tokens 256 --prompt-length 64); fi
  for seed in $seeds; do
    dir="$out/$preset-s$seed"
    [ -s "$dir.jsonl" ] && continue  # done in an earlier run
    "$sapattn" gen --preset "$preset" --seed "$seed" --out "$dir" --threads "$threads" >/dev/null
    run=("$sapattn" eval --in "$dir/workload.safetensors" "${budget[@]}" --json --threads "$threads" "${text[@]}")
    "${run[@]}" --method "$methods" >"$dir.part"
    if [ "$sap_c" = 1 ]; then "${run[@]}" --method sap --compensate | grep -v '"method": "dense"' >>"$dir.part"; fi
    if [ "$ideas" = 1 ]; then
      for idea in --ear-spread --ear-pair-values --ear-head-budget --ear-split "--ear-spread --ear-pair-values" \
        "--ear-spread --ear-split" "--ear-spread --ear-head-budget" "--ear-spread --ear-head-budget --ear-split" \
        "--ear-spread --ear-pair-values --ear-head-budget --ear-split"; do
        # shellcheck disable=SC2086  # one word per flag
        "${run[@]}" --method ear $idea | grep -v '"method": "dense"' >>"$dir.part"
      done
    fi
    mv "$dir.part" "$dir.jsonl"
    rm -r "$dir"  # the tensors: up to 2.3 GB a workload
  done
done

python3 - "$out" <<'EOF'
import collections, glob, json, os, sys

runs = collections.defaultdict(dict)  # (preset, method, budget) -> {seed: result}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*-s*.jsonl"))):
    preset, seed = os.path.basename(path)[:-len(".jsonl")].rsplit("-s", 1)
    for line in open(path):
        r = json.loads(line)
        if r["method"] == "dense":
            continue
        c = r["config"]
        budget = f"density {c['density']:g}" if c["density"] else f"top-p {c['top_p']:.3g}"
        runs[(preset, r["method"], budget)][int(seed)] = r


def ratio(rs, base):  # mean over the seeds both ran of the per-seed rel L2 ratio
    seeds = sorted(set(rs) & set(base))
    if not seeds:
        return "-"
    return f"{sum(rs[s]['rel_l2'] / base[s]['rel_l2'] for s in seeds) / len(seeds):.3f}"


for preset in sorted({k[0] for k in runs}):
    print(f"\n{preset}")
    print("| budget | method | density | mean rel L2 | worst head rel L2 | / sap's | / ear's | seeds |")
    print("|---|---|---|---|---|---|---|---|")
    for (p, method, budget) in sorted(k for k in runs if k[0] == preset):
        rs = runs[(p, method, budget)]
        mean = lambda f: sum(f(r) for r in rs.values()) / len(rs)
        worst = max(h["rel_l2"] for r in rs.values() for h in r["per_head"])
        print(f"| {budget} | {method} | {mean(lambda r: r['density']):.4f} | {mean(lambda r: r['rel_l2']):.4f} | "
              f"{worst:.4f} | {ratio(rs, runs.get((p, 'sap', budget), {}))} | "
              f"{ratio(rs, runs.get((p, 'ear', budget), {}))} | {','.join(map(str, sorted(rs)))} |")
EOF
