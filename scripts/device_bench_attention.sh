#!/usr/bin/env bash
# On a machine with a CUDA GPU: the attention benchmark of issue 4. Per shape, sapattn_bench_attention
# generates the full-size workload, clusters it (50 Lloyd iterations), finds the top-p of each target
# density, times sapattn's attention (unfused, fused, sm80, planner) and saves the layouts; then, in
# the same run, bench/attention_peers.py times torch SDPA (cuDNN, flash), FlexAttention and
# flashinfer's VariableBlockSparseAttentionWrapper on exactly those layouts. Prints the markdown table
# last. Logs go to $OUT (the device tool's folder) or ./device-logs: gpu.txt, attention.jsonl,
# attention.err, peers.jsonl, peers.err, table.md.
#
#   scripts/device_bench_attention.sh [BIN_DIR] [SHAPE...]     SHAPE: wan13b, wan14b, hunyuan (default: all)
#
# BIN_DIR holds a prebuilt sapattn_bench_attention (flat, or under bench/); without one this builds it
# here (needs .deps/cutlass). One shape fits one 600 s device call (wan14b: about 1-2 min of
# sapattn, 2-4 min of peers); give each shape its own call when the kernels are slow.
#
# flashinfer travels as wheels in .whl/flashinfer/ (flashinfer-python 0.6.5 and apache-tvm-ffi 0.1.9,
# pip download --no-deps) plus its batch-prefill kernel modules built ahead of time on the dev machine
# (.whl/flashinfer/aot/<module>/<module>.so, sm_90a, nvcc 13.0), so that nothing is JIT-compiled here.
# Without them the peers report flashinfer as unavailable and the rest runs.
#
# Environment: DENSITIES (0.05,0.1,0.15,0.2,0.3,0.4), ITERS (10), KERNELS (auto,sm80), ORDER (chain: key
# clusters renumbered by order_clusters; none: as k-means left them), VARIANTS (sparse calls to time, default
# unfused,fused_qk,fused_q,unfused_e2e), PEER_IMPLS
# (sdpa_cudnn,sdpa_flash,flex,flashinfer_fa2,flashinfer_fa3), BENCH_TIMEOUT / PEERS_TIMEOUT (seconds
# per shape, 240 / 300), LAYOUTS (where layouts go, /tmp/sapattn-layouts; they can be large).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-device-logs}
mkdir -p "$out"
bin=${1:-build-device}
[ $# -gt 0 ] && shift
shapes=("$@")
[ ${#shapes[@]} -eq 0 ] && shapes=(wan13b wan14b hunyuan)
densities=${DENSITIES:-0.05,0.1,0.15,0.2,0.3,0.4}
iters=${ITERS:-10}
kernels=${KERNELS:-auto,sm80}
impls=${PEER_IMPLS:-sdpa_cudnn,sdpa_flash,flex,flashinfer_fa2,flashinfer_fa3}
layouts=${LAYOUTS:-/tmp/sapattn-layouts}

exe=""
for c in "$bin/sapattn_bench_attention" "$bin/bench/sapattn_bench_attention"; do
  [ -x "$c" ] && exe=$c && break
done
if [ -z "$exe" ]; then
  echo "no sapattn_bench_attention in $bin: building it here"
  if ! cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DSAPATTN_CUDA=ON -DSAPATTN_BUILD_TESTS=OFF \
    -DSAPATTN_BUILD_CLI=OFF -DCMAKE_CUDA_ARCHITECTURES=90 >"$out/configure.log" 2>&1 ||
    ! cmake --build build-gpu --target sapattn_bench_attention >"$out/build.log" 2>&1; then
    tail -30 "$out"/configure.log "$out"/build.log 2>/dev/null
    exit 1
  fi
  exe=build-gpu/bench/sapattn_bench_attention
fi

# flashinfer: its wheels into a private folder (never over the image's torch), and its prebuilt
# kernel modules where flashinfer looks first (flashinfer/data/aot/<module>/<module>.so).
fi_site=/tmp/sapattn-flashinfer
export PYTHONPATH=$fi_site${PYTHONPATH:+:$PYTHONPATH}
export FLASHINFER_WORKSPACE_BASE=/tmp/sapattn-flashinfer-ws  # JIT cache, if a module must be built here
export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}
export TVM_FFI_CACHE_DIR=/tmp/sapattn-tvm-ffi
if ls .whl/flashinfer/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$fi_site" \
    .whl/flashinfer/*.whl >"$out/peers.err" 2>&1 || echo "flashinfer wheels did not install (see peers.err)"
  if [ -d .whl/flashinfer/aot ] && [ -d "$fi_site/flashinfer" ]; then
    mkdir -p "$fi_site/flashinfer/data/aot"
    cp -r .whl/flashinfer/aot/. "$fi_site/flashinfer/data/aot/"
  fi
else
  echo "no .whl/flashinfer wheels: flashinfer will be reported unavailable" | tee "$out/peers.err"
fi
# The modules link libcudart.so.13 dynamically: the toolkit's, or the one that came with torch.
torch_cudart=$(python3 -c 'import glob, os, nvidia
print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__
                       for p in glob.glob(d + "/**/libcudart.so.13*", recursive=True)})))' 2>/dev/null)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${torch_cudart:+:$torch_cudart}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__,
  torch.version.cuda)' | tee -a "$out/gpu.txt"
python3 -c 'import flashinfer; print("flashinfer", flashinfer.__version__)' >>"$out/gpu.txt" 2>&1 ||
  echo "flashinfer does not import (see gpu.txt)"

rc_bench=0
rc_peers=0
sanity=--sanity
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
    --kernels "$kernels" --order "${ORDER:-chain}" ${VARIANTS:+--variants "$VARIANTS"} >>"$out/attention.jsonl" 2>>"$out/attention.err"
  rc=$?
  [ $rc -ne 0 ] && rc_bench=$rc
  echo "$full: sapattn_bench_attention exit $rc after $(($(date +%s) - start)) s"
  [ -f "$layouts/$full/manifest.jsonl" ] || continue
  start=$(date +%s)
  # shellcheck disable=SC2086
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
