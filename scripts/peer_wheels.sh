#!/usr/bin/env bash
# Downloads, on a machine that reaches PyPI, the wheels a benchmark peer needs on the GPU machine
# (Python 3.12, x86_64 Linux, as that image has) into .whl/SET/, for scripts/device.sh to install.
#
#   scripts/peer_wheels.sh fa4     FlashAttention-4's CuTe-DSL forward: flash-attn-4, nvidia-cutlass-dsl
#                                  with its CUDA 13 libraries, apache-tvm-ffi, torch-c-dlpack-ext,
#                                  quack-kernels (about 100 MB)
#
# A device call carries at most 64 MiB, so the set is stored as one tar cut into parts of PART_MB
# (default 56), .whl/SET/parts/SET.tar.NN, with SHA256SUMS (the whole tar's) and COUNT beside them.
# Carry one part per call, with SHA256SUMS and COUNT, in calls that follow each other while the
# machine stays warm: install_wheels (scripts/device/common.sh) stashes each carried part in
# build-wheels/SET/ there, and once every part has arrived joins them, checks the sum and installs
# the wheels (docs/testing.md, "Wheel sets in parts").
set -euo pipefail
cd "$(dirname "$0")/.."
set_name=${1:-}
case $set_name in
  fa4)
    wheels=("flash-attn-4==4.0.0b40" nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
      nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 "apache-tvm-ffi==0.1.15.post2"
      torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5)
    ;;
  *)
    echo "usage: scripts/peer_wheels.sh fa4" >&2
    exit 2
    ;;
esac
dest=.whl/$set_name
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
for w in "${wheels[@]}"; do
  python3 -m pip download -q --pre --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$stage" "$w"
done
rm -rf "$dest"
mkdir -p "$dest/parts"
(cd "$stage" && tar -cf "$set_name.tar" ./*.whl)
(cd "$stage" && sha256sum "$set_name.tar") >"$dest/parts/SHA256SUMS"
split -d -b "${PART_MB:-56}m" "$stage/$set_name.tar" "$dest/parts/$set_name.tar."
find "$dest/parts" -name "$set_name.tar.*" | wc -l >"$dest/parts/COUNT"
ls -l "$dest/parts"
echo "carry one part per call with .whl/$set_name/parts/SHA256SUMS and COUNT, calls back to back (docs/testing.md)"
