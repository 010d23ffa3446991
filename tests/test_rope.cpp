// rope_pairs (include/sapattn/ops.hpp) against its formula computed here in fp32, one operation at a
// time, on every dtype and layout, in place, on known rotations, and on bad arguments.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "reference.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace {

using namespace sapattn;
using namespace sapattn::testing_support;
using ref::Layout;

struct Rope {
  HostTensor x, cos, sin, out;
};

// x random, cos and sin of random angles per (s, pair). The op reads cos at a pair's even element and
// sin at its odd one (diffusers stores each value at both); the other elements hold other values
// here, so that reading them would show.
Rope make_rope(DType dtype, Layout layout, int64_t B, int64_t H, int64_t S, int64_t D, ref::Rng& rng) {
  Rope r{ref::make_tensor(dtype, {B, H, S, D}, layout), ref::make_tensor(DType::F32, {S, D}),
         ref::make_tensor(DType::F32, {S, D}), ref::make_tensor(dtype, {B, H, S, D}, layout)};
  std::vector<double> x(static_cast<size_t>(B * H * S * D));
  for (double& v : x) v = 3.0 * rng.normal();
  ref::from_vector(r.x.view, x);
  std::vector<double> c(static_cast<size_t>(S * D)), n(c.size());
  for (size_t p = 0; p < c.size(); p += 2) {
    const double angle = 6.3 * rng.normal();
    c[p] = static_cast<float>(std::cos(angle));
    n[p + 1] = static_cast<float>(std::sin(angle));
    c[p + 1] = 1.5 + rng.normal();
    n[p] = -1.5 + rng.normal();
  }
  ref::from_vector(r.cos.view, c);
  ref::from_vector(r.sin.view, n);
  ref::poison(r.out);
  return r;
}

// The formula in fp32, one rounding per operation, then rounded to x's dtype (through a tensor of it).
std::vector<double> expected(const Rope& r) {
  const TensorView& x = r.x.view;
  const int64_t S = x.shape[2], D = x.shape[3];
  const std::vector<double> xv = ref::to_vector(x), c = ref::to_vector(r.cos.view), n = ref::to_vector(r.sin.view);
  std::vector<double> want(xv.size());
  for (size_t row = 0; row < xv.size() / static_cast<size_t>(D); ++row) {
    const size_t s = row % static_cast<size_t>(S), base = row * static_cast<size_t>(D);
    for (size_t i = 0; i < static_cast<size_t>(D); i += 2) {
      const float even = static_cast<float>(xv[base + i]), odd = static_cast<float>(xv[base + i + 1]);
      const float ci = static_cast<float>(c[s * D + i]), si = static_cast<float>(n[s * D + i + 1]);
      const float a = even * ci, b = odd * si, e = even * si, f = odd * ci;
      want[base + i] = a - b;
      want[base + i + 1] = e + f;
    }
  }
  HostTensor rounded = ref::make_tensor(x.dtype, {x.shape[0], x.shape[1], S, D});
  ref::from_vector(rounded.view, want);
  return ref::to_vector(rounded.view);
}

class RopeCase : public ::testing::TestWithParam<std::tuple<DType, Layout>> {};

TEST_P(RopeCase, IsTheFormulaInFp32) {
  const auto [dtype, layout] = GetParam();
  ref::Rng rng(case_seed());
  Rope r = make_rope(dtype, layout, 2, 3, 17, 64, rng);
  rope_pairs(r.x.view, r.cos.view, r.sin.view, r.out.view, kStream);
  EXPECT_EQ(ref::to_vector(r.out.view), expected(r));
}

TEST_P(RopeCase, InPlace) {
  const auto [dtype, layout] = GetParam();
  ref::Rng rng(case_seed());
  Rope r = make_rope(dtype, layout, 1, 2, 9, 8, rng);
  const std::vector<double> want = expected(r);
  rope_pairs(r.x.view, r.cos.view, r.sin.view, r.x.view, kStream);
  EXPECT_EQ(ref::to_vector(r.x.view), want);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, RopeCase,
    ::testing::Combine(::testing::Values(DType::F32, DType::F16, DType::BF16),
                       ::testing::Values(Layout::Contiguous, Layout::Transposed, Layout::TransposedPadded)),
    [](const auto& p) { return case_name(dtype_name(std::get<0>(p.param)), ref::layout_name(std::get<1>(p.param))); });

TEST(Rope, KnownRotations) {
  // A quarter turn maps (e, o) to (-o, e); no turn keeps the pair.
  HostTensor x = ref::make_tensor(DType::F32, {1, 1, 2, 2}), out = ref::make_tensor(DType::F32, {1, 1, 2, 2});
  HostTensor c = ref::make_tensor(DType::F32, {2, 2}), n = ref::make_tensor(DType::F32, {2, 2});
  ref::from_vector(x.view, {3.0, 5.0, 3.0, 5.0});
  ref::from_vector(c.view, {0.0, 0.0, 1.0, 1.0});
  ref::from_vector(n.view, {1.0, 1.0, 0.0, 0.0});
  rope_pairs(x.view, c.view, n.view, out.view, kStream);
  EXPECT_EQ(ref::to_vector(out.view), (std::vector<double>{-5.0, 3.0, 3.0, 5.0}));
}

TEST(RopeErrors, BadArgumentsThrowAndWriteNothing) {
  ref::Rng rng(case_seed());
  Rope r = make_rope(DType::BF16, Layout::Contiguous, 1, 2, 5, 8, rng);
  const std::vector<const HostTensor*> outs = {&r.out};
  const Stream st = kStream;
  HostTensor odd = ref::make_tensor(DType::BF16, {1, 2, 5, 7}), odd_out = ref::make_tensor(DType::BF16, {1, 2, 5, 7});
  HostTensor out_f32 = ref::make_tensor(DType::F32, {1, 2, 5, 8});
  HostTensor out_short = ref::make_tensor(DType::BF16, {1, 2, 4, 8});
  HostTensor cos_short = ref::make_tensor(DType::F32, {4, 8});
  HostTensor cos_f16 = ref::make_tensor(DType::F16, {5, 8});
  HostTensor cos_strided = ref::make_tensor(DType::F32, {5, 8}, Layout::Padded);
  HostTensor x_i32 = ref::make_tensor(DType::I32, {1, 2, 5, 8});
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, rope_pairs(odd.view, r.cos.view, r.sin.view, odd_out.view, st));
  EXPECT_ERROR_UNTOUCHED(DTypeError, outs, rope_pairs(r.x.view, r.cos.view, r.sin.view, out_f32.view, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, rope_pairs(r.x.view, r.cos.view, r.sin.view, out_short.view, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, rope_pairs(r.x.view, cos_short.view, r.sin.view, r.out.view, st));
  EXPECT_ERROR_UNTOUCHED(DTypeError, outs, rope_pairs(r.x.view, cos_f16.view, r.sin.view, r.out.view, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, rope_pairs(r.x.view, r.cos.view, cos_strided.view, r.out.view, st));
  EXPECT_ERROR_UNTOUCHED(DTypeError, outs, rope_pairs(x_i32.view, r.cos.view, r.sin.view, r.out.view, st));
  // out over x's memory with other strides: refused (only out = x itself may alias).
  HostTensor square = ref::make_tensor(DType::BF16, {1, 5, 5, 8});
  TensorView alias = square.view;
  std::swap(alias.stride[1], alias.stride[2]);
  EXPECT_THROW(rope_pairs(square.view, r.cos.view, r.sin.view, alias, st), InvalidArgumentError);
}

}  // namespace
