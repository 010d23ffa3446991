// quantize_e4m3 (include/sapattn/ops.hpp): the argument checks, then the CPU backend. It has no
// CUDA version yet: a CUDA stream gets UnsupportedError, in a CUDA build too, as the other ops of
// the FP8 attention (block_sparse_attention_e4m3, src/ops/attention.cpp).
#include "ops/checks.hpp"
#include "ops/dispatch.hpp"
#include "sapattn/ops.hpp"

namespace sapattn {

using namespace checks;    // the argument checks of src/ops/
using namespace dispatch;  // backend(), cpu_threads()

void quantize_e4m3(const TensorView& x, const TensorView& perm, const TensorView& offsets, const TensorView& shift,
                   Fp8Scale granularity, int tile_rows, TensorView codes, TensorView scales, const Stream& stream) {
  SAPATTN_CHECK(granularity == Fp8Scale::Tile || granularity == Fp8Scale::Cluster || granularity == Fp8Scale::Channel,
                InvalidArgumentError, "granularity must be Tile, Cluster or Channel, got ",
                static_cast<int>(granularity));
  SAPATTN_CHECK(granularity != Fp8Scale::Tile || tile_rows >= 1, InvalidArgumentError,
                "tile_rows must be >= 1 for Fp8Scale::Tile, got ", tile_rows);
  expect_rank(x, 4, "x");
  expect_floating(x, "x");
  const int64_t B = x.shape[0], H = x.shape[1], S = x.shape[2], D = x.shape[3];
  if (!perm.empty()) {
    expect_rank(perm, 3, "perm");
    expect_dtype(perm, DType::I32, "perm");
    expect_contiguous(perm, "perm");
    for (int d = 0; d < 3; ++d) expect_extent(perm, d, x.shape[d], "perm", "B, H, S of x: perm is [B,H,S]");
  }
  const bool by_cluster = granularity == Fp8Scale::Cluster;
  SAPATTN_CHECK(!by_cluster || !offsets.empty(), ShapeError, "Fp8Scale::Cluster needs the clusters' offsets");
  if (by_cluster) {
    expect_rank(offsets, 3, "offsets");
    expect_dtype(offsets, DType::I32, "offsets");
    expect_contiguous(offsets, "offsets");
    expect_extent(offsets, 0, B, "offsets", "batch");
    expect_extent(offsets, 1, H, "offsets", "heads");
    SAPATTN_CHECK(offsets.shape[2] >= 2, ShapeError, "offsets must hold at least one cluster (C+1 >= 2 entries), got ",
                  offsets.describe());
  }
  if (!shift.empty()) {
    expect_rank(shift, 3, "shift");
    expect_dtype(shift, DType::F32, "shift");
    expect_contiguous(shift, "shift");
    for (int d = 0; d < 2; ++d) expect_extent(shift, d, x.shape[d], "shift", "B, H of x: shift is [B,H,D]");
    expect_extent(shift, 2, D, "shift", "D of x: shift is [B,H,D]");
  }
  expect_rank(codes, 4, "codes");
  expect_dtype(codes, DType::U8, "codes");
  expect_contiguous(codes, "codes");
  for (int d = 0; d < 4; ++d) expect_extent(codes, d, x.shape[d], "codes", "the shape of x");
  expect_rank(scales, 3, "scales");
  expect_dtype(scales, DType::F32, "scales");
  expect_contiguous(scales, "scales");
  expect_extent(scales, 0, B, "scales", "batch");
  expect_extent(scales, 1, H, "scales", "heads");
  const bool per_channel = granularity == Fp8Scale::Channel;
  expect_extent(scales, 2, per_channel ? D : S, "scales",
                per_channel ? "D: one scale per column with Fp8Scale::Channel" : "S: one scale per row");
  const DeviceType where = by_cluster ? backend(stream, x, offsets, codes, scales) : backend(stream, x, codes, scales);
  if (!perm.empty()) expect_device(perm, stream);
  if (!shift.empty()) expect_device(shift, stream);
  SAPATTN_CHECK(where == DeviceType::CPU, UnsupportedError,
                "quantize_e4m3: not yet on CUDA (issue 14: the quantisation is to be fused into the permutation); run "
                "it on a CPU stream");
  cpu::quantize_e4m3(x, perm, offsets, shift, granularity, tile_rows, codes, scales, cpu_threads(stream));
}

}  // namespace sapattn
