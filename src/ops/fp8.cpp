// quantize_e4m3 (include/sapattn/ops.hpp): the argument checks every backend shares, then dispatch
// on the stream's device (cuda/fp8/fp8_quantize.cu on CUDA, bit-identical to the CPU's). The FP8
// attention itself (block_sparse_attention_e4m3) is in src/ops/attention.cpp.
#include "ops/checks.hpp"
#include "ops/dispatch.hpp"
#include "sapattn/ops.hpp"

namespace sapattn {

using namespace checks;    // the argument checks of src/ops/
using namespace dispatch;  // backend(), cpu_threads(), SAPATTN_ON_CUDA

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
  if (!perm.empty()) expect_contiguous_tensor(perm, DType::I32, {B, H, S}, "perm", "B, H, S of x");
  const bool by_cluster = granularity == Fp8Scale::Cluster;
  SAPATTN_CHECK(!by_cluster || !offsets.empty(), ShapeError, "Fp8Scale::Cluster needs the clusters' offsets");
  if (by_cluster) {
    expect_contiguous_tensor(offsets, DType::I32, {B, H, -1}, "offsets", "B, H of x");
    SAPATTN_CHECK(offsets.shape[2] >= 2, ShapeError, "offsets must hold at least one cluster (C+1 >= 2 entries), got ",
                  offsets.describe());
  }
  if (!shift.empty()) expect_contiguous_tensor(shift, DType::F32, {B, H, D}, "shift", "B, H, D of x");
  expect_contiguous_tensor(codes, DType::U8, {B, H, S, D}, "codes", "the shape of x");
  const bool per_channel = granularity == Fp8Scale::Channel;
  expect_contiguous_tensor(
      scales, DType::F32, {B, H, per_channel ? D : S}, "scales",
      per_channel ? "B, H, D of x: one scale per column with Fp8Scale::Channel" : "B, H, S of x: one scale per row");
  const DeviceType where = by_cluster ? backend(stream, x, offsets, codes, scales) : backend(stream, x, codes, scales);
  if (!perm.empty()) expect_device(perm, stream);
  if (!shift.empty()) expect_device(shift, stream);
  if (where == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(quantize_e4m3(x, perm, offsets, shift, granularity, tile_rows, codes, scales, stream));
  cpu::quantize_e4m3(x, perm, offsets, shift, granularity, tile_rows, codes, scales, cpu_threads(stream));
}

}  // namespace sapattn
