# scripts/device.sh ab-attention [PACK] [SHAPE] [ROUNDS]
#
# Two builds of the attention kernel timed alternately on the same layouts: a baseline against a change.
#
# PACK (default build-pack/bins.tar.gz) is scripts/device_pack.sh's tarball made with BASELINE set to
# the baseline build's sapattn_bench_attention, so that it holds bench/sapattn_bench_attention (the
# change) and bench/sapattn_bench_attention_base; it is unpacked into build-dev/. With test_cuda_ops
# in the pack, its attention suites (and TESTS, a gtest filter added to them) run first under the
# change, unless AB_TESTS=0. Then, ROUNDS times (default 2), the baseline and the change each time SHAPE (default
# wan14b_720p) at DENSITIES (0.05,0.15,0.3) with --kernels tma --variants unfused, the baseline
# first; the layouts come from the same seed, so both time the same calls. A variable named in
# CHANGE_ENV (for example "SAPATTN_SM90_SPLIT=0") is set for the change's runs only. Prints one
# line per timing, then the medians of each side per density and their ratio.
#
# Writes to $OUT or ./device-logs: gpu.txt, tests.log, ab.jsonl, ab.err.

# shellcheck shell=bash disable=SC2154  # out: set by common.sh

device_main() {
  local pack=${1:-build-pack/bins.tar.gz} shape=${2:-wan14b_720p} rounds=${3:-2} round side exe
  [ -f "$pack" ] || {
    echo "no $pack: make it with BASELINE=... scripts/device_pack.sh and carry it" >&2
    return 2
  }
  mkdir -p build-dev && tar -xzf "$pack" -C build-dev || return 1
  local base=build-dev/bench/sapattn_bench_attention_base change=build-dev/bench/sapattn_bench_attention
  if [ ! -x "$base" ] || [ ! -x "$change" ]; then
    echo "$pack lacks bench/sapattn_bench_attention or its _base (BASELINE= when packing)" >&2
    return 2
  fi
  local change_env=()
  read -ra change_env <<<"${CHANGE_ENV:-}"
  describe_gpu
  if [ "${AB_TESTS:-1}" != 0 ] && [ -x build-dev/tests/cuda/test_cuda_ops ]; then
    env "${change_env[@]}" timeout "${TEST_TIMEOUT:-120}" build-dev/tests/cuda/test_cuda_ops \
      --gtest_filter="*Attention*:*Plan*:Graph*${TESTS:+:$TESTS}:-*Large*" >"$out/tests.log" 2>&1
    echo "tests (the change): exit $?"
    grep -E '^\[  (PASSED|FAILED) ' "$out/tests.log"
  fi
  for round in $(seq "$rounds"); do
    for side in base change; do
      exe=$base
      local extra=()
      if [ "$side" = change ]; then
        exe=$change
        extra=("${change_env[@]}")
      fi
      rm -rf /tmp/sapattn-ab-layouts
      env "${extra[@]}" timeout "${BENCH_TIMEOUT:-90}" "$exe" --shape "$shape" --densities "${DENSITIES:-0.05,0.15,0.3}" \
        --out /tmp/sapattn-ab-layouts --iters "${ITERS:-10}" --kernels tma --variants unfused 2>>"$out/ab.err" |
        sed "s/^/{\"side\": \"$side\", \"round\": $round, \"x\": /; s/\$/}/" >>"$out/ab.jsonl"
      echo "$side, round $round: exit ${PIPESTATUS[0]}"
    done
  done
  python3 - "$out/ab.jsonl" <<'PY'
import json, statistics, sys
times = {}
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    x = r["x"]
    if "median_ms" in x and x.get("variant") == "unfused":
        print(r["side"], r["round"], x["density"], x["median_ms"], x.get("tflops"))
        times.setdefault(round(x["density"], 4), {}).setdefault(r["side"], []).append(x["median_ms"])
print("| density | base ms | change ms | change / base |\n|---|---|---|---|")
for d, sides in sorted(times.items()):
    b, c = statistics.median(sides.get("base", [float("nan")])), statistics.median(sides.get("change", [float("nan")]))
    print(f"| {d} | {b:.3f} | {c:.3f} | {c / b:.3f} |")
PY
}
