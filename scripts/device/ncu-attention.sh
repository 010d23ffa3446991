# scripts/device.sh ncu-attention BIN_DIR [SHAPE] [DENSITY]
#
# An Nsight Compute profile of the attention kernel at one shape and one density.
#
# `ncu --set full` on the attention kernel gives the evidence docs/attention.md quotes (tensor-pipe
# utilisation, stall reasons, L2 hit rate, DRAM bytes, shared-memory bank conflicts, registers), and
# prints the lines that decide where the time goes. SHAPE defaults to wan14b_720p, DENSITY to 0.15.
# BIN_DIR holds a prebuilt sapattn_bench_attention (flat or under bench/); nothing is built here.
# The benchmark runs with one timed launch per variant, so the profiled launches are, in order:
# dense per kernel in KERNELS, then per kernel the unfused, fused_qk, fused_q and unfused_e2e calls
# of the density.
#
# Environment: KERNELS (tma,cpasync), LAUNCHES (how many attention launches to profile, 7: the dense
# ones and the first two kernels' unfused calls with two kernels).
#
# Writes to $OUT or ./device-logs: gpu.txt, attention.ncu-rep, details.txt, raw.csv, bench.jsonl,
# ncu.err.

# shellcheck shell=bash disable=SC2154  # out, build_dir, wheel_root: set by common.sh

device_main() {
  [ $# -ge 1 ] || { echo "usage: scripts/device.sh ncu-attention BIN_DIR [SHAPE] [DENSITY]" >&2; return 2; }
  local bin=$1 shape=${2:-wan14b_720p} density=${3:-0.15} rc
  local exe
  exe=$(find_binary sapattn_bench_attention "$bin" bench) || {
    echo "no sapattn_bench_attention in $bin" >&2
    return 1
  }
  command -v ncu >/dev/null || { echo "ncu (Nsight Compute) is not on PATH" >&2; return 1; }
  describe_gpu
  local rep="$out/attention"
  ncu --target-processes all -k regex:attention_kernel --launch-count "${LAUNCHES:-7}" --set full -f -o "$rep" \
    "$exe" --shape "$shape" --densities "$density" --iters 1 --warmup 0 --kernels "${KERNELS:-tma,cpasync}" \
    --out /tmp/sapattn-ncu-layouts >"$out/bench.jsonl" 2>"$out/ncu.err"
  rc=$?
  ncu -i "$rep.ncu-rep" --page details >"$out/details.txt" 2>&1
  ncu -i "$rep.ncu-rep" --page raw --csv >"$out/raw.csv" 2>&1
  grep -E "attention_kernel|Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Hit Rate|DRAM Throughput|Registers Per|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Bank Conflicts|Tensor" \
    "$out/details.txt" | head -200
  echo "ncu exit $rc"
  [ "$rc" -eq 0 ]
}
