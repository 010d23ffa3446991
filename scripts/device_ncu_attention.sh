#!/usr/bin/env bash
# On a machine with a CUDA GPU and Nsight Compute: profiles the attention kernel at one shape and one
# density with `ncu --set full`, the evidence docs/attention.md quotes (tensor-pipe utilisation, stall
# reasons, L2 hit rate, DRAM bytes, shared-memory bank conflicts, registers). The benchmark runs with
# one timed launch per variant, so the profiled launches are, in order: dense per kernel in KERNELS,
# then per kernel the unfused, fused_qk, fused_q and unfused_e2e calls of the density.
#
#   scripts/device_ncu_attention.sh BIN_DIR [SHAPE] [DENSITY]      (wan14b_720p, 0.15 by default)
#
# Environment: KERNELS (tma,cpasync), LAUNCHES (how many attention launches to profile: 7 covers the
# dense ones and the first two kernels' unfused calls with two kernels), OUT (where reports land).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-device-logs}
mkdir -p "$out"
bin=${1:?usage: scripts/device_ncu_attention.sh BIN_DIR [SHAPE] [DENSITY]}
shape=${2:-wan14b_720p}
density=${3:-0.15}
exe=""
for c in "$bin/sapattn_bench_attention" "$bin/bench/sapattn_bench_attention"; do
  [ -x "$c" ] && exe=$c && break
done
[ -n "$exe" ] || { echo "no sapattn_bench_attention in $bin" >&2; exit 1; }
command -v ncu >/dev/null || { echo "ncu (Nsight Compute) is not on PATH" >&2; exit 1; }
rep="$out/attention"
ncu --target-processes all -k regex:attention_kernel --launch-count "${LAUNCHES:-7}" --set full -f -o "$rep" \
  "$exe" --shape "$shape" --densities "$density" --iters 1 --warmup 0 --kernels "${KERNELS:-tma,cpasync}" \
  --out /tmp/sapattn-ncu-layouts >"$out/bench.jsonl" 2>"$out/ncu.err"
rc=$?
ncu -i "$rep.ncu-rep" --page details >"$out/details.txt" 2>&1
ncu -i "$rep.ncu-rep" --page raw --csv >"$out/raw.csv" 2>&1
# The lines that decide where the time goes, per launch.
grep -E "attention_kernel|Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Hit Rate|DRAM Throughput|Registers Per|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Bank Conflicts|Tensor" \
  "$out/details.txt" | head -200
echo "ncu exit $rc"
[ $rc -eq 0 ]
