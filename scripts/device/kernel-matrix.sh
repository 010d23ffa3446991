# scripts/device.sh kernel-matrix [BIN_DIR] [SHAPE]
#
# The Hopper kernel's measurement switches compared in one call, tests first.
#
# Runs test_cuda_ops (when BIN_DIR has one) under the defaults, its attention, graph and svg2
# suites under the other side of every switch (SAPATTN_SM90_SCHED=static SAPATTN_SM90_SPLIT=0
# SAPATTN_PLAN_ORDER=locality SAPATTN_KV_PHASES=3), and the same suites with CTA pairs
# (SAPATTN_SM90_PAIR=1); then sapattn_bench_attention on SHAPE (default wan14b_720p, --kernels tma)
# once per configuration sched:order:split:phases:pair:variants of CONFIGS (the pair configurations
# only where the pair tests passed);
# then bench/attention_peers.py (PEER_IMPLS, default sdpa_cudnn,flex) on the last configuration's
# layouts, so the peers run on the same layouts in the same call. Prints one line per timing last.
# BIN_DIR (default build-device) holds prebuilt binaries, flat or under tests/cuda/ and bench/.
#
# Environment: CONFIGS (space-separated; default: dynamic:cost:1:1:0:unfused,fused_qk,sorted_kv
# static:cost:1:1:1:unfused,sorted_kv static:cost:0:1:0:unfused dynamic:cost:1:3:0:unfused
# static:locality:1:1:1:unfused dynamic:locality:1:3:0:unfused static:cost:1:3:1:unfused
# dynamic:cost:1:2:0:unfused), DENSITIES (1.0,0.05,0.15,0.3; dense is left out where phases > 1),
# ITERS (10), TEST_TIMEOUT (150 s; the two suite runs after the first get half), BENCH_UNTIL
# (seconds after which no further configuration starts, 400), PEERS_TIMEOUT (120 s).
#
# Writes to $OUT or ./device-logs: gpu.txt, tests.log, tests-alt.log, tests-pair.log, matrix.jsonl
# (each line the benchmark's, under "cfg"), matrix.err, peers.jsonl, peers.err.

# shellcheck shell=bash disable=SC2154  # out, build_dir: set by common.sh

device_main() {
  local bin=${1:-$build_dir} shape=${2:-wan14b_720p} exe tests start pairs_ok=0 suites='*Attention*:Graph*:Svg*'
  local half=$((${TEST_TIMEOUT:-150} / 2))
  exe=$(find_binary sapattn_bench_attention "$bin" bench) || {
    echo "no sapattn_bench_attention in $bin" >&2
    return 1
  }
  describe_gpu
  start=$(date +%s)
  if tests=$(find_binary test_cuda_ops "$bin" tests/cuda); then
    timeout "${TEST_TIMEOUT:-150}" "$tests" >"$out/tests.log" 2>&1
    echo "tests (defaults): exit $?"
    SAPATTN_SM90_SCHED=static SAPATTN_SM90_SPLIT=0 SAPATTN_PLAN_ORDER=locality SAPATTN_KV_PHASES=3 \
      timeout "$half" "$tests" --gtest_filter="$suites" >"$out/tests-alt.log" 2>&1
    echo "tests (static, no split, locality, 3 phases): exit $?"
    SAPATTN_SM90_PAIR=1 timeout "$half" "$tests" --gtest_filter="$suites" >"$out/tests-pair.log" 2>&1 && pairs_ok=1
    echo "tests (CTA pairs): passed=$pairs_ok"
    grep -hE '^\[  (PASSED|FAILED) ' "$out/tests.log" "$out/tests-alt.log" "$out/tests-pair.log"
  fi
  local configs=${CONFIGS:-"dynamic:cost:1:1:0:unfused,fused_qk,sorted_kv static:cost:1:1:1:unfused,sorted_kv
    static:cost:0:1:0:unfused dynamic:cost:1:3:0:unfused static:locality:1:1:1:unfused
    dynamic:locality:1:3:0:unfused static:cost:1:3:1:unfused dynamic:cost:1:2:0:unfused"}
  local cfg sched order split phases pair variants densities layouts=/tmp/sapattn-matrix-layouts
  for cfg in $configs; do
    [ $(($(date +%s) - start)) -gt "${BENCH_UNTIL:-400}" ] && break
    IFS=: read -r sched order split phases pair variants <<<"$cfg"
    if [ "$pair" = 1 ] && [ -n "${tests:-}" ] && [ "$pairs_ok" = 0 ]; then
      echo "config $cfg skipped: the pair tests did not pass" >>"$out/matrix.err"
      continue
    fi
    densities=${DENSITIES:-1.0,0.05,0.15,0.3}
    [ "$phases" != 1 ] && densities=$(tr ',' '\n' <<<"$densities" | grep -v '^1\(\.0*\)\?$' | paste -sd,)
    rm -rf "$layouts"
    echo "config $cfg at $(($(date +%s) - start)) s" >>"$out/matrix.err"
    SAPATTN_SM90_SCHED=$sched SAPATTN_PLAN_ORDER=$order SAPATTN_SM90_SPLIT=$split SAPATTN_KV_PHASES=$phases \
      SAPATTN_SM90_PAIR=$pair timeout 90 "$exe" --shape "$shape" --densities "$densities" --out "$layouts" \
      --iters "${ITERS:-10}" --kernels tma --variants "$variants" 2>>"$out/matrix.err" |
      sed "s/^/{\"cfg\": \"$sched:$order:$split:$phases:$pair\", \"x\": /; s/\$/}/" >>"$out/matrix.jsonl"
  done
  PYTHONUNBUFFERED=1 timeout "${PEERS_TIMEOUT:-120}" python3 bench/attention_peers.py --layouts "$layouts" \
    --shape "$shape" --impls "${PEER_IMPLS:-sdpa_cudnn,flex}" --iters "${ITERS:-10}" >"$out/peers.jsonl" 2>"$out/peers.err"
  echo "peers: exit $?"
  python3 - "$out/matrix.jsonl" "$out/peers.jsonl" <<'PY'
import json, sys
for path in sys.argv[1:]:
    for line in open(path):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        x, cfg = r.get("x", r), r.get("cfg", "peer")
        if "median_ms" in x and x.get("variant") != "plan":
            print(cfg, x.get("impl"), x.get("variant"), x.get("density"), x["median_ms"], x.get("tflops"))
PY
}
