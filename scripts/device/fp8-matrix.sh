# scripts/device.sh fp8-matrix [BIN_DIR] [SHAPE]
#
# The e4m3 kernel's measured builds compared in one call, tests first, then Nsight Compute.
#
# Runs test_cuda_ops --gtest_filter='*Fp8*:*E4m3*:CudaSoftmaxExp2*' (when BIN_DIR has one; its
# Fp8AttentionMeasuredBuilds case runs every build against the CPU reference), then
# sapattn_bench_attention on SHAPE (default wan14b_720p, --kernels tma) with the variants unfused
# (bf16), fp8_khead_sumf and fp8_khead_e2e and each build of BUILDS (TILE:EXPS[:mma], bench
# --fp8-builds: SAPATTN_FP8_KEY_TILE, SAPATTN_FP8_FMA_EXPS, SAPATTN_FP8_ROW_SUM=mma) on the same
# layouts, then `ncu --set full` on two launches at NCU_DENSITY: the default build and NCU_BUILD.
# Prints one line per timing last. BIN_DIR (default build-device) holds prebuilt binaries, flat or
# under tests/cuda/ and bench/.
#
# Environment: BUILDS (default 128:0, then 128:2, 128:3, 128:4, 160:0 and 128:0 (the default
# kernel of p_sum_e4m3), 128:2, 128:3, 160:0, 160:2, 160:3 with :mma, then 128:0 again, to see
# drift), DENSITIES
# (0.05,0.15,0.3), ITERS (5), TEST_TIMEOUT (120 s), BENCH_TIMEOUT (400 s), NCU_DENSITY (0.15),
# NCU_BUILD (128:2:mma; none: no ncu).
#
# Writes to $OUT or ./device-logs: gpu.txt, tests.log, fp8.jsonl, fp8.err, ncu-details.txt,
# ncu-pages.tgz (ncu's raw page and its source page with SASS, as CSV), ncu.err.

# shellcheck shell=bash disable=SC2154  # out, build_dir: set by common.sh

device_main() {
  local bin=${1:-$build_dir} shape=${2:-wan14b_720p} exe tests rc
  exe=$(find_binary sapattn_bench_attention "$bin" bench) || {
    echo "no sapattn_bench_attention in $bin" >&2
    return 1
  }
  describe_gpu
  if tests=$(find_binary test_cuda_ops "$bin" tests/cuda); then
    timeout "${TEST_TIMEOUT:-120}" "$tests" --gtest_filter='*Fp8*:*E4m3*:CudaSoftmaxExp2*' >"$out/tests.log" 2>&1
    echo "tests (*Fp8*:*E4m3*:CudaSoftmaxExp2*): exit $?"
    grep -hE '^\[  (PASSED|FAILED) |^\[  FAILED  \]' "$out/tests.log" | head -20
  fi
  local builds=${BUILDS:-128:0,128:2,128:3,128:4,160:0,128:0:mma,128:2:mma,128:3:mma,160:0:mma,160:2:mma,160:3:mma,128:0}
  timeout "${BENCH_TIMEOUT:-400}" "$exe" --shape "$shape" --densities "${DENSITIES:-0.05,0.15,0.3}" \
    --iters "${ITERS:-5}" --kernels tma --variants unfused,fp8_khead_sumf,fp8_khead_e2e --fp8-builds "$builds" \
    --out /tmp/sapattn-fp8-layouts >"$out/fp8.jsonl" 2>"$out/fp8.err"
  echo "bench: exit $?"
  if [ "${NCU_BUILD:-128:2:mma}" != none ] && command -v ncu >/dev/null; then
    # The report stays in /tmp (too large to come back); its pages come back in one tarball (a call
    # returns at most 8 files), the source page summed by bench/ncu_source.py.
    local pages=/tmp/sapattn-fp8-ncu-pages
    rm -rf "$pages" && mkdir -p "$pages"
    ncu --target-processes all -k regex:attention_fp8_kernel --launch-count 2 --set full -f -o /tmp/sapattn-fp8 \
      "$exe" --shape "$shape" --densities "${NCU_DENSITY:-0.15}" --iters 1 --warmup 0 --kernels tma \
      --variants fp8_khead_sumf --fp8-builds "${NCU_BUILD:-128:2:mma}" --out /tmp/sapattn-fp8-ncu-layouts \
      >/dev/null 2>"$out/ncu.err"
    rc=$?
    ncu -i /tmp/sapattn-fp8.ncu-rep --page details >"$out/ncu-details.txt" 2>&1
    ncu -i /tmp/sapattn-fp8.ncu-rep --page raw --csv >"$pages/raw.csv" 2>&1
    ncu -i /tmp/sapattn-fp8.ncu-rep --page source --csv --print-source sass >"$pages/source.csv" 2>&1
    tar -czf "$out/ncu-pages.tgz" -C "$pages" .
    grep -E "attention_fp8_kernel|Duration|Compute \(SM\) Throughput|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Registers Per|Tensor|MUFU|XU|FMA" \
      "$out/ncu-details.txt" | head -80
    python3 bench/ncu_source.py "$pages/source.csv" --top 20
    echo "ncu exit $rc"
  fi
  python3 - "$out/fp8.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if "median_ms" in r and r.get("variant") != "plan":
        print(r.get("variant"), r.get("density"), r["median_ms"], r.get("tflops"))
    elif "error" in r:
        print(r.get("variant"), r.get("density_target"), "error:", r["error"])
PY
}
