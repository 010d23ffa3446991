#!/usr/bin/env bash
# scripts/device_pack.sh [BUILD_DIR] [PACK]: strips the device binaries of a CUDA build (default
# build-g: test_cuda_ops, sapattn_bench_attention, sapattn_bench_ops, libsapattn_torch.so; those it
# lacks are left out) and packs them into PACK (default build-pack/bins.tar.gz) for
# `scripts/device.sh batch` or `ab-attention` (with BASELINE set, below), which unpack them on the
# device. Run on the dev machine.
set -euo pipefail
build=${1:-build-g} pack=${2:-build-pack/bins.tar.gz}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/tests/cuda" "$stage/bench" "$(dirname "$pack")"
for f in tests/cuda/test_cuda_ops bench/sapattn_bench_attention bench/sapattn_bench_ops python/libsapattn_torch.so; do
  [ -f "$build/$f" ] || continue
  dest=$stage/$f
  [ "$f" = python/libsapattn_torch.so ] && dest=$stage/libsapattn_torch.so
  strip --strip-unneeded -o "$dest" "$build/$f"
done
# BASELINE: another build's sapattn_bench_attention, packed as bench/sapattn_bench_attention_base for
# `scripts/device.sh ab-attention`.
if [ -n "${BASELINE:-}" ]; then
  strip --strip-unneeded -o "$stage/bench/sapattn_bench_attention_base" "$BASELINE"
fi
tar -czf "$pack" -C "$stage" .
echo "$pack: $(du -h "$pack" | cut -f1)"
