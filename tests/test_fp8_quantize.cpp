// quantize_e4m3 against its contract (include/sapattn/ops.hpp): the groups each granularity makes,
// the scales (amax / 448 as one fp32 division), the round-trip error bound, the permutation and the
// shift, zero and non-finite groups, and the argument errors.
//
// Error model of the round trip: y * inverse rounds to fp32 (relative 2^-24), then to e4m3: half an
// ulp, at most 2^-4 of the value among the normals and 2^-10 (half the subnormal spacing 2^-9) in
// code units below 2^-6; decode * scale rounds once more. So |decode(code) * scale - y| <=
// 2^-4 |y| + 2^-10 scale, plus 2^-21 (|y| + 2^-10 scale) for the four fp32 roundings (inverse,
// product, scale, dequantisation) and their products.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "core/fp8.hpp"
#include "reference.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace {

using namespace sapattn;
using ref::HostTensor;
using testing_support::case_seed;
using testing_support::kStream;

struct Inputs {
  int64_t B, H, S, D;
  HostTensor x, perm, offsets, shift;
};

// Random x (N(0.3, 1.2^2), so the shift has something to remove), a random permutation, random
// cluster offsets (with empty and 1-row clusters) and a random shift per head.
Inputs make_inputs(int64_t B, int64_t H, int64_t S, int64_t D, int64_t C, DType dtype, ref::Layout layout,
                   ref::Rng& rng) {
  Inputs in{B,
            H,
            S,
            D,
            ref::make_tensor(dtype, {B, H, S, D}, layout),
            ref::make_tensor(DType::I32, {B, H, S}),
            ref::make_tensor(DType::I32, {B, H, C + 1}),
            ref::make_tensor(DType::F32, {B, H, D})};
  ref::fill_normal(in.x.view, rng, 0.3, 1.2);
  ref::fill_normal(in.shift.view, rng, 0.3, 0.2);
  std::vector<double> perm, offsets;
  for (int64_t bh = 0; bh < B * H; ++bh) {
    std::vector<int64_t> p(static_cast<size_t>(S));
    std::iota(p.begin(), p.end(), 0);
    for (int64_t i = S - 1; i > 0; --i) std::swap(p[i], p[rng.integer(0, i)]);
    perm.insert(perm.end(), p.begin(), p.end());
    for (int64_t o : ref::offsets_of(ref::random_cluster_sizes(rng, S, C))) offsets.push_back(static_cast<double>(o));
  }
  ref::from_vector(in.perm.view, perm);
  ref::from_vector(in.offsets.view, offsets);
  return in;
}

// The groups of rows of (b,h) that a granularity makes, as boundaries.
std::vector<int64_t> groups_of(Fp8Scale g, int tile, const std::vector<int32_t>& offsets, int64_t bh, int64_t C,
                               int64_t S) {
  std::vector<int64_t> bounds;
  if (g == Fp8Scale::Cluster) {
    for (int64_t c = 0; c <= C; ++c) bounds.push_back(offsets[static_cast<size_t>(bh * (C + 1) + c)]);
  } else {
    for (int64_t r = 0; r < S; r += tile) bounds.push_back(r);
    bounds.push_back(S);
  }
  return bounds;
}

struct Case {
  Fp8Scale granularity;
  int tile;
  bool permuted, shifted;
};

// The contract, value by value: y = x[perm[r]] - shift, the group's scale, the codes' bound.
void check_quantisation(const Inputs& in, const Case& c, const HostTensor& codes, const HostTensor& scales) {
  const int64_t B = in.B, H = in.H, S = in.S, D = in.D, C = in.offsets.view.shape[2] - 1;
  const std::vector<double> x = ref::to_vector(in.x.view), shift = ref::to_vector(in.shift.view);
  const std::vector<int32_t> perm = ref::to_i32(in.perm.view), offsets = ref::to_i32(in.offsets.view);
  const std::vector<double> code = ref::to_vector(codes.view), scale = ref::to_vector(scales.view);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    // y in fp32, as the op computes it.
    std::vector<float> y(static_cast<size_t>(S * D));
    for (int64_t r = 0; r < S; ++r) {
      const int64_t src = c.permuted ? perm[static_cast<size_t>(bh * S + r)] : r;
      for (int64_t d = 0; d < D; ++d) {
        const auto xv = static_cast<float>(x[static_cast<size_t>((bh * S + src) * D + d)]);
        y[static_cast<size_t>(r * D + d)] =
            c.shifted ? xv - static_cast<float>(shift[static_cast<size_t>(bh * D + d)]) : xv;
      }
    }
    // The scale of each value, from the test's own groups.
    std::vector<float> want_scale(static_cast<size_t>(S * D));
    if (c.granularity == Fp8Scale::Channel) {
      for (int64_t d = 0; d < D; ++d) {
        float amax = 0.0f;
        for (int64_t r = 0; r < S; ++r) amax = std::max(amax, std::abs(y[static_cast<size_t>(r * D + d)]));
        ASSERT_EQ(scale[static_cast<size_t>(bh * D + d)], amax / 448.0f) << "channel " << d;
        for (int64_t r = 0; r < S; ++r) want_scale[static_cast<size_t>(r * D + d)] = amax / 448.0f;
      }
    } else {
      const std::vector<int64_t> bounds = groups_of(c.granularity, c.tile, offsets, bh, C, S);
      for (size_t g = 0; g + 1 < bounds.size(); ++g) {
        float amax = 0.0f;
        for (int64_t i = bounds[g] * D; i < bounds[g + 1] * D; ++i) amax = std::max(amax, std::abs(y[i]));
        for (int64_t r = bounds[g]; r < bounds[g + 1]; ++r) {
          ASSERT_EQ(scale[static_cast<size_t>(bh * S + r)], amax / 448.0f) << "row " << r << " of group " << g;
          for (int64_t d = 0; d < D; ++d) want_scale[static_cast<size_t>(r * D + d)] = amax / 448.0f;
        }
      }
    }
    for (int64_t i = 0; i < S * D; ++i) {
      const auto code_i = static_cast<uint8_t>(code[static_cast<size_t>(bh * S * D + i)]);
      const double s = want_scale[i], yi = y[i];
      const double back = static_cast<double>(fp8::e4m3_decode(code_i)) * s;
      const double bound = (0x1p-4 + 0x1p-21) * std::abs(yi) + (0x1p-10 + 0x1p-21) * s;
      ASSERT_LE(std::abs(back - yi), bound)
          << "bh " << bh << " element " << i << ": y " << yi << ", code 0x" << std::hex << int{code_i};
      if (back != 0.0) {
        ASSERT_EQ(std::signbit(back), std::signbit(yi)) << "sign of element " << i;
      }
    }
  }
}

class QuantizeE4M3 : public ::testing::TestWithParam<Case> {};

TEST_P(QuantizeE4M3, FollowsTheContract) {
  const Case c = GetParam();
  for (const auto& [dtype, layout] :
       {std::pair{DType::F32, ref::Layout::Contiguous}, {DType::BF16, ref::Layout::TransposedPadded}}) {
    ref::Rng rng(case_seed(static_cast<uint64_t>(dtype)));
    const int64_t B = 2, H = 3, S = 301, D = 40, C = 9;
    const Inputs in = make_inputs(B, H, S, D, C, dtype, layout, rng);
    HostTensor codes = ref::make_tensor(DType::U8, {B, H, S, D});
    HostTensor scales = ref::make_tensor(DType::F32, {B, H, c.granularity == Fp8Scale::Channel ? D : S});
    quantize_e4m3(in.x.view, c.permuted ? in.perm.view : TensorView{},
                  c.granularity == Fp8Scale::Cluster ? in.offsets.view : TensorView{},
                  c.shifted ? in.shift.view : TensorView{}, c.granularity, c.tile, codes.view, scales.view, kStream);
    SCOPED_TRACE(dtype_name(dtype));
    check_quantisation(in, c, codes, scales);
    // One thread gives the same bytes.
    HostTensor again = ref::make_tensor(DType::U8, {B, H, S, D});
    HostTensor again_scales = ref::make_tensor(DType::F32, {B, H, scales.view.shape[2]});
    quantize_e4m3(in.x.view, c.permuted ? in.perm.view : TensorView{},
                  c.granularity == Fp8Scale::Cluster ? in.offsets.view : TensorView{},
                  c.shifted ? in.shift.view : TensorView{}, c.granularity, c.tile, again.view, again_scales.view,
                  Stream::cpu(1));
    EXPECT_EQ(again.bytes(), codes.bytes());
    EXPECT_EQ(again_scales.bytes(), scales.bytes());
  }
}

INSTANTIATE_TEST_SUITE_P(
    Granularities, QuantizeE4M3,
    ::testing::Values(Case{Fp8Scale::Tile, 64, true, true}, Case{Fp8Scale::Tile, 7, false, false},
                      Case{Fp8Scale::Tile, 1000, true, false}, Case{Fp8Scale::Cluster, 0, true, true},
                      Case{Fp8Scale::Cluster, 0, false, false}, Case{Fp8Scale::Channel, 0, true, false},
                      Case{Fp8Scale::Channel, 0, false, true}),
    [](const ::testing::TestParamInfo<Case>& param) {
      const Case& c = param.param;
      const char* g = c.granularity == Fp8Scale::Tile      ? "tile"
                      : c.granularity == Fp8Scale::Cluster ? "cluster"
                                                           : "channel";
      return testing_support::case_name(g, c.tile, c.permuted ? "perm" : "noperm", c.shifted ? "shift" : "noshift");
    });

// A group of zeros gets scale 0 and codes 0; a group holding a NaN or an infinity gets a NaN scale
// and NaN codes, and the groups around it are untouched by it.
TEST(QuantizeE4M3Values, ZeroAndNonFiniteGroups) {
  const int64_t S = 12, D = 3;
  HostTensor x = ref::make_tensor(DType::F32, {1, 1, S, D});
  ref::Rng rng(case_seed());
  ref::fill_normal(x.view, rng);
  std::vector<double> values = ref::to_vector(x.view);
  for (int64_t i = 0; i < 4 * D; ++i) values[i] = 0.0;           // tile 0: zeros
  values[4 * D + 1] = std::numeric_limits<double>::quiet_NaN();  // tile 1: a NaN
  values[8 * D + 2] = std::numeric_limits<double>::infinity();   // tile 2: an infinity
  ref::from_vector(x.view, values);
  HostTensor codes = ref::make_tensor(DType::U8, {1, 1, S, D}), scales = ref::make_tensor(DType::F32, {1, 1, S});
  quantize_e4m3(x.view, {}, {}, {}, Fp8Scale::Tile, 4, codes.view, scales.view, kStream);
  const std::vector<double> code = ref::to_vector(codes.view), scale = ref::to_vector(scales.view);
  for (int64_t r = 0; r < 4; ++r) {
    EXPECT_EQ(scale[r], 0.0);
    for (int64_t d = 0; d < D; ++d) EXPECT_EQ(code[r * D + d], 0.0);
  }
  for (int64_t r = 4; r < 12; ++r) {
    EXPECT_TRUE(std::isnan(scale[r])) << r;
    for (int64_t d = 0; d < D; ++d) EXPECT_EQ(code[r * D + d], 0x7f) << r;
  }
  // Per column: only the columns holding the NaN and the infinity are NaN.
  HostTensor channel_scales = ref::make_tensor(DType::F32, {1, 1, D});
  quantize_e4m3(x.view, {}, {}, {}, Fp8Scale::Channel, 0, codes.view, channel_scales.view, kStream);
  const std::vector<double> cs = ref::to_vector(channel_scales.view);
  EXPECT_FALSE(std::isnan(cs[0]));
  EXPECT_TRUE(std::isnan(cs[1]));
  EXPECT_TRUE(std::isnan(cs[2]));
}

TEST(QuantizeE4M3Errors, BadArgumentsLeaveOutputsUntouched) {
  ref::Rng rng(case_seed());
  const int64_t B = 1, H = 2, S = 50, D = 8, C = 4;
  const Inputs in = make_inputs(B, H, S, D, C, DType::F32, ref::Layout::Contiguous, rng);
  HostTensor codes = ref::make_tensor(DType::U8, {B, H, S, D}), scales = ref::make_tensor(DType::F32, {B, H, S});
  ref::poison(codes);
  ref::poison(scales);
  const std::vector<const HostTensor*> outputs{&codes, &scales};
  const auto run = [&](const TensorView& x, const TensorView& perm, const TensorView& offsets, Fp8Scale g, int tile,
                       const TensorView& c, const TensorView& s,
                       const Stream& stream) { quantize_e4m3(x, perm, offsets, in.shift.view, g, tile, c, s, stream); };
  const TensorView x = in.x.view, perm = in.perm.view, off = in.offsets.view;
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, outputs,
                         run(x, perm, off, static_cast<Fp8Scale>(7), 64, codes.view, scales.view, kStream));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, outputs,
                         run(x, perm, off, Fp8Scale::Tile, 0, codes.view, scales.view, kStream));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outputs,
                         run(x, perm, TensorView{}, Fp8Scale::Cluster, 0, codes.view, scales.view, kStream));
  // Channel takes [B,H,D] scales.
  EXPECT_ERROR_UNTOUCHED(ShapeError, outputs,
                         run(x, perm, off, Fp8Scale::Channel, 0, codes.view, scales.view, kStream));
  HostTensor f32_codes = ref::make_tensor(DType::F32, {B, H, S, D});
  EXPECT_ERROR_UNTOUCHED(DTypeError, outputs,
                         run(x, perm, off, Fp8Scale::Tile, 64, f32_codes.view, scales.view, kStream));
  // Values only the backend reads: a repeated permutation entry, offsets that do not end at S.
  HostTensor bad_perm = ref::make_tensor(DType::I32, {B, H, S});
  std::vector<int32_t> p = ref::to_i32(in.perm.view);
  p[3] = p[4];
  ref::from_vector(bad_perm.view, std::vector<double>(p.begin(), p.end()));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, outputs,
                         run(x, bad_perm.view, off, Fp8Scale::Tile, 64, codes.view, scales.view, kStream));
  HostTensor bad_off = ref::make_tensor(DType::I32, {B, H, C + 1});
  std::vector<int32_t> o = ref::to_i32(in.offsets.view);
  o.back() = static_cast<int32_t>(S - 1);
  ref::from_vector(bad_off.view, std::vector<double>(o.begin(), o.end()));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, outputs,
                         run(x, perm, bad_off.view, Fp8Scale::Cluster, 0, codes.view, scales.view, kStream));
  // Tensors on CUDA with a CPU stream, in every build (a CUDA stream: tests/cuda/test_cuda_fp8.cpp,
  // and test_cpu_only where the build has no CUDA backend).
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, outputs,
                         run(ref::on_cuda(x), {}, {}, Fp8Scale::Tile, 64, ref::on_cuda(codes.view),
                             ref::on_cuda(scales.view), kStream));
}

}  // namespace
