# scripts/device.sh bench-attention [BIN_DIR] [SHAPE...]
#
# The attention benchmark, against SDPA, FlexAttention, FlashAttention-4 and flashinfer on the same layouts.
#
# Per shape (wan13b, wan14b, hunyuan; default: all three), sapattn_bench_attention generates the
# full-size workload, clusters it (50 Lloyd iterations), finds the top-p of each target density,
# times sapattn's attention (unfused, fused, sm80, planner) and saves the layouts; then, in the same
# run, bench/attention_peers.py times torch SDPA (cuDNN, flash), FlexAttention, FlashAttention-4
# (dense and on Flex's random 128x128 blocks) and flashinfer's VariableBlockSparseAttentionWrapper on
# exactly those layouts. Prints the markdown table last.
#
# BIN_DIR (default build-device) holds a prebuilt sapattn_bench_attention, flat or under bench/;
# without one, this builds it in build-device (needs .deps/cutlass). One shape fits one 600 s device
# call (wan14b: about 1-2 min of sapattn, 2-4 min of peers); give each shape its own call when the
# kernels are slow.
#
# flashinfer travels as wheels in .whl/flashinfer/ (flashinfer-python 0.6.5 and apache-tvm-ffi 0.1.9,
# pip download --no-deps) plus its batch-prefill kernel modules built ahead of time on the dev machine
# (.whl/flashinfer/aot/<module>/<module>.so, sm_90a, nvcc 13.0), so that nothing is JIT-compiled here.
# Without them the peers report flashinfer as unavailable and the rest runs. FlashAttention-4 travels
# as the wheel set .whl/fa4 (scripts/peer_wheels.sh fa4: about 100 MB, so in parts over back-to-back
# calls of `scripts/device.sh wheels fa4`); without it, FA4 is reported unavailable.
#
# Environment: DENSITIES (0.05,0.1,0.15,0.2,0.3,0.4), ITERS (10), KERNELS (auto,sm80), ORDER (chain: key
# clusters renumbered by order_clusters; none: as k-means left them), VARIANTS (sparse calls to time,
# default unfused,fused_qk,fused_q,unfused_e2e), PEER_IMPLS
# (sdpa_cudnn,sdpa_flash,flex,fa4_dense,fa4,flashinfer_fa2,flashinfer_fa3), BENCH_TIMEOUT / PEERS_TIMEOUT (seconds
# per shape, 240 / 300), LAYOUTS (where layouts go, /tmp/sapattn-layouts; they can be large).
#
# Writes to $OUT or ./device-logs: gpu.txt (with the flashinfer version), attention.jsonl,
# attention.err, peers.jsonl, peers.err, table.md.

# shellcheck shell=bash disable=SC2154  # out, build_dir, wheel_root: set by common.sh

device_main() {
  local exe
  exe=$(binary_or_build sapattn_bench_attention "${1:-$build_dir}" bench -DSAPATTN_BUILD_TESTS=OFF \
    -DSAPATTN_BUILD_BENCH=ON) || return 1
  [ $# -gt 0 ] && shift
  local shapes=("$@")
  [ ${#shapes[@]} -eq 0 ] && shapes=(wan13b wan14b hunyuan)
  local densities=${DENSITIES:-0.05,0.1,0.15,0.2,0.3,0.4} iters=${ITERS:-10} kernels=${KERNELS:-auto,sm80}
  local impls=${PEER_IMPLS:-sdpa_cudnn,sdpa_flash,flex,fa4_dense,fa4,flashinfer_fa2,flashinfer_fa3}
  local layouts=${LAYOUTS:-/tmp/sapattn-layouts}
  use_flashinfer
  install_wheels fa4 >>"$out/peers.err" 2>&1 || echo "no FlashAttention-4 wheels (see peers.err): FA4 will be reported unavailable"
  describe_gpu flashinfer flash_attn.cute

  local rc_bench=0 rc_peers=0 sanity=--sanity s full start rc
  for s in "${shapes[@]}"; do
    case $s in
      wan13b*) full=wan13b_480p ;;
      wan14b*) full=wan14b_720p ;;
      hunyuan*) full=hunyuan_720p ;;
      *)
        echo "unknown shape $s (wan13b, wan14b, hunyuan)"
        rc_bench=2
        continue
        ;;
    esac
    rm -rf "${layouts:?}/$full"
    start=$(date +%s)
    timeout "${BENCH_TIMEOUT:-240}" "$exe" --shape "$full" --densities "$densities" --out "$layouts" --iters "$iters" \
      --kernels "$kernels" --order "${ORDER:-chain}" ${VARIANTS:+--variants "$VARIANTS"} \
      >>"$out/attention.jsonl" 2>>"$out/attention.err"
    rc=$?
    [ $rc -ne 0 ] && rc_bench=$rc
    echo "$full: sapattn_bench_attention exit $rc after $(($(date +%s) - start)) s"
    [ -f "$layouts/$full/manifest.jsonl" ] || continue
    start=$(date +%s)
    # shellcheck disable=SC2086  # $sanity: one flag or none
    PYTHONUNBUFFERED=1 timeout "${PEERS_TIMEOUT:-300}" python3 bench/attention_peers.py --layouts "$layouts" \
      --shape "$full" --impls "$impls" --iters "$iters" $sanity >>"$out/peers.jsonl" 2>>"$out/peers.err"
    rc=$?
    [ $rc -ne 0 ] && rc_peers=$rc
    echo "$full: attention_peers.py exit $rc after $(($(date +%s) - start)) s"
    sanity=""
  done
  python3 bench/attention_peers.py --table "$out/attention.jsonl" "$out/peers.jsonl" | tee "$out/table.md"
  echo "exit: bench $rc_bench, peers $rc_peers (124 = timed out)"
  [ $rc_bench -eq 0 ]
}

# flashinfer's wheels into their private folder, its prebuilt kernel modules where flashinfer looks
# first (flashinfer/data/aot/<module>/<module>.so), its caches under /tmp, and the libcudart.so.13 the
# modules link dynamically on the library path: the toolkit's, or the one that came with torch.
# peers.err starts with what the install said.
use_flashinfer() {
  export FLASHINFER_WORKSPACE_BASE=/tmp/sapattn-flashinfer-ws  # JIT cache, if a module must be built here
  export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}
  export TVM_FFI_CACHE_DIR=/tmp/sapattn-tvm-ffi
  local site=$wheel_root/flashinfer rc=0
  install_wheels flashinfer >"$out/peers.err" 2>&1 || rc=$?
  case $rc in
    0)
      if [ -d .whl/flashinfer/aot ] && [ -d "$site/flashinfer" ]; then
        mkdir -p "$site/flashinfer/data/aot"
        cp -r .whl/flashinfer/aot/. "$site/flashinfer/data/aot/"
      fi
      ;;
    1) echo "no .whl/flashinfer wheels: flashinfer will be reported unavailable" | tee "$out/peers.err" ;;
    *) echo "flashinfer wheels did not install (see peers.err)" ;;
  esac
  local torch_cudart
  torch_cudart=$(python3 -c 'import glob, os, nvidia
print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__
                       for p in glob.glob(d + "/**/libcudart.so.13*", recursive=True)})))' 2>/dev/null)
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64${torch_cudart:+:$torch_cudart}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
}
