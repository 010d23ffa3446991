// quantize_e4m3 on CUDA against the CPU op on the same inputs, compared byte for byte (codes and fp32
// scales, outputs poisoned alike, so an element either side leaves unwritten counts too): every
// granularity, tiles that do not divide S, the permutation and the shift, f32/f16/bf16 in every
// layout, B > 1, values whose magnitudes span the e4m3 subnormals and the fp32 range, and groups
// holding NaN, +-inf, -0 only, zeros only or a subnormal fp32 amax (whose inverse overflows to inf).
// Then the argument errors (the CPU's typed error for each) and the device value checks. The e4m3
// attention's own tests: test_cuda_fp8_attention.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <typeinfo>
#include <vector>

#include "cuda_support.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace sapattn::cuda_test {
namespace {

using ref::Layout;

struct QuantCase {
  DType dtype;
  Layout layout;
  int64_t B, H, S, D, C;
  Fp8Scale granularity;
  int tile;
  bool permuted, shifted;
};

struct QuantInputs {
  HostTensor x, perm, offsets, shift;
};

// The largest power-of-two exponent a dtype holds with room for a normal draw (f16 stops at 65504).
int max_exponent(DType dtype) { return dtype == DType::F16 ? 12 : 100; }

// x: N(0.3, 1.2^2) times 2^e per row (e uniform in +-max_exponent, so groups' amax differ by many
// binades), and one element in eight log-uniform over 2^-40 .. 2^4 times its row's factor, so that a
// group holds values in the e4m3 subnormals and below them. A random permutation, random clusters
// (empty and 1-row ones included), a random shift per head.
QuantInputs make_inputs(const QuantCase& c, ref::Rng& rng) {
  QuantInputs in{poisoned(c.dtype, {c.B, c.H, c.S, c.D}, c.layout), poisoned(DType::I32, {c.B, c.H, c.S}),
                 poisoned(DType::I32, {c.B, c.H, c.C + 1}), poisoned(DType::F32, {c.B, c.H, c.D})};
  const int e_max = max_exponent(c.dtype);
  std::vector<double> x(static_cast<size_t>(c.B * c.H * c.S * c.D));
  for (int64_t row = 0; row < c.B * c.H * c.S; ++row) {
    const double factor = std::ldexp(1.0, static_cast<int>(rng.integer(-e_max, e_max)));
    for (int64_t d = 0; d < c.D; ++d) {
      double v = 0.3 + 1.2 * rng.normal();
      if (rng.integer(0, 7) == 0) v = (rng.uniform() < 0.5 ? -1.0 : 1.0) * std::exp2(-40.0 + 44.0 * rng.uniform());
      x[static_cast<size_t>(row * c.D + d)] = v * factor;
    }
  }
  ref::from_vector(in.x.view, x);
  ref::fill_normal(in.shift.view, rng, 0.3, 0.2);
  std::vector<double> perm, offsets;
  for (int64_t bh = 0; bh < c.B * c.H; ++bh) {
    std::vector<int64_t> p(static_cast<size_t>(c.S));
    std::iota(p.begin(), p.end(), 0);
    for (int64_t i = c.S - 1; i > 0; --i) std::swap(p[i], p[rng.integer(0, i)]);
    perm.insert(perm.end(), p.begin(), p.end());
    for (int64_t o : ref::offsets_of(ref::random_cluster_sizes(rng, c.S, c.C))) offsets.push_back(static_cast<double>(o));
  }
  ref::from_vector(in.perm.view, perm);
  ref::from_vector(in.offsets.view, offsets);
  return in;
}

std::vector<int64_t> scales_shape(const QuantCase& c) {
  return {c.B, c.H, c.granularity == Fp8Scale::Channel ? c.D : c.S};
}

// Runs the op on the CPU and on the GPU from the same host inputs and compares every output byte.
// nan_scales: how many scales the CPU rightly writes as NaN (groups holding a NaN or an infinity).
void expect_identical(const QuantCase& c, const QuantInputs& in, int64_t nan_scales = 0) {
  const TensorView perm = c.permuted ? in.perm.view : TensorView{};
  const TensorView shift = c.shifted ? in.shift.view : TensorView{};
  const TensorView offsets = c.granularity == Fp8Scale::Cluster ? in.offsets.view : TensorView{};
  HostTensor codes = poisoned(DType::U8, {c.B, c.H, c.S, c.D}), scales = poisoned(DType::F32, scales_shape(c));
  const DeviceTensor dx = to_device(in.x), dperm = to_device(in.perm), doff = to_device(in.offsets),
                     dshift = to_device(in.shift);
  DeviceTensor dcodes = to_device(codes), dscales = to_device(scales);
  quantize_e4m3(in.x.view, perm, offsets, shift, c.granularity, c.tile, codes.view, scales.view, kCpu);
  NonBlockingStream cs;
  const ValueChecksOn checks;
  quantize_e4m3(dx.view, c.permuted ? dperm.view : TensorView{},
                c.granularity == Fp8Scale::Cluster ? doff.view : TensorView{}, c.shifted ? dshift.view : TensorView{},
                c.granularity, c.tile, dcodes.view, dscales.view, cs.stream());
  cs.sync();
  const HostTensor gpu_codes = to_host(dcodes, codes), gpu_scales = to_host(dscales, scales);
  const std::vector<uint8_t> want_codes = codes.bytes(), got_codes = gpu_codes.bytes();
  ASSERT_EQ(got_codes.size(), want_codes.size());
  int64_t wrong = 0, first = -1;
  for (size_t i = 0; i < want_codes.size(); ++i)
    if (got_codes[i] != want_codes[i]) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++wrong;
    }
  EXPECT_EQ(wrong, 0) << "codes differ, first at byte " << first << ": GPU "
                      << (first >= 0 ? int{got_codes[static_cast<size_t>(first)]} : 0) << ", CPU "
                      << (first >= 0 ? int{want_codes[static_cast<size_t>(first)]} : 0);
  EXPECT_EQ(gpu_scales.bytes(), scales.bytes()) << "scales differ";
  // The comparison must see real work: every scale written (no poison, a NaN, left on the CPU side
  // beyond the groups whose scale is NaN by the rule).
  EXPECT_EQ(ref::count_poisoned(scales.view), nan_scales);
}

class QuantizeE4m3Case : public ::testing::TestWithParam<QuantCase> {};

TEST_P(QuantizeE4m3Case, IdenticalToCpu) {
  const QuantCase c = GetParam();
  ref::Rng rng(testing_support::case_seed());
  expect_identical(c, make_inputs(c, rng));
}

const char* granularity_name(Fp8Scale g) {
  return g == Fp8Scale::Tile ? "tile" : g == Fp8Scale::Cluster ? "cluster" : "channel";
}

std::vector<QuantCase> quant_cases() {
  std::vector<QuantCase> cases;
  for (const DType dtype : {DType::F32, DType::F16, DType::BF16})
    for (const Fp8Scale g : {Fp8Scale::Tile, Fp8Scale::Cluster, Fp8Scale::Channel})
      for (const bool permuted : {false, true})
        for (const bool shifted : {false, true}) {
          // S = 300 with tiles of 128 (a 44-row tail) or 7; head dims 64 and 40 (not a multiple of 32).
          const int tile = permuted ? 128 : 7;
          const Layout layout = shifted ? Layout::TransposedPadded : Layout::Contiguous;
          cases.push_back({dtype, layout, 2, 3, 300, shifted ? 40 : 64, 9, g, tile, permuted, shifted});
        }
  // Tiles larger than S, of one row; a tile of 128 over 1000 rows at head dim 128 (the default
  // Fp8Options' shape); one row; one cluster; many clusters (most empty).
  cases.push_back({DType::BF16, Layout::Contiguous, 1, 2, 100, 128, 4, Fp8Scale::Tile, 256, true, true});
  cases.push_back({DType::BF16, Layout::Padded, 1, 2, 70, 16, 4, Fp8Scale::Tile, 1, true, false});
  cases.push_back({DType::BF16, Layout::Transposed, 2, 2, 1000, 128, 30, Fp8Scale::Tile, 128, true, true});
  cases.push_back({DType::F16, Layout::Contiguous, 1, 1, 1, 8, 1, Fp8Scale::Channel, 1, true, true});
  cases.push_back({DType::F32, Layout::Contiguous, 2, 1, 513, 24, 1, Fp8Scale::Cluster, 1, false, true});
  cases.push_back({DType::F32, Layout::Contiguous, 1, 2, 64, 32, 200, Fp8Scale::Cluster, 1, true, false});
  cases.push_back({DType::BF16, Layout::Contiguous, 1, 2, 1000, 128, 30, Fp8Scale::Channel, 1, true, false});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Cases, QuantizeE4m3Case, ::testing::ValuesIn(quant_cases()), [](const auto& p) {
  const QuantCase& c = p.param;
  std::string layout = layout_tag(c.layout);
  std::replace(layout.begin(), layout.end(), '+', '_');  // "transposed+padded": test names take [A-Za-z0-9_]
  return std::string(dtype_name(c.dtype)) + "_" + layout + "_B" + std::to_string(c.B) + "H" +
         std::to_string(c.H) + "S" + std::to_string(c.S) + "D" + std::to_string(c.D) + "C" + std::to_string(c.C) +
         "_" + granularity_name(c.granularity) + (c.granularity == Fp8Scale::Tile ? std::to_string(c.tile) : "") +
         (c.permuted ? "_perm" : "") +
         (c.shifted ? "_shift" : "");
});

// Groups at the edges of the rule, one per tile of 4 rows (f32, D = 8): zeros only, -0 only, a NaN,
// +inf, -inf, a subnormal fp32 amax (448 / amax overflows to inf: codes of +-448, and 0 * inf = NaN
// for the zero in it), an amax near the fp32 maximum (a tiny inverse), amax exactly 448 and exactly
// 2^-6 (one code each), and -0 entries among normal values. Per cluster and per channel too.
TEST(QuantizeE4m3Edges, SpecialGroupsIdenticalToCpu) {
  const int64_t S = 44, D = 8;
  ref::Rng rng(testing_support::case_seed());
  QuantCase c{DType::F32, Layout::Contiguous, 1, 1, S, D, 11, Fp8Scale::Tile, 4, false, false};
  QuantInputs in = make_inputs(c, rng);
  std::vector<double> x = ref::to_vector(in.x.view);
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  const auto row = [&](int64_t r) { return x.begin() + r * D; };
  std::fill(row(0), row(4), 0.0);
  std::fill(row(4), row(8), -0.0);
  x[static_cast<size_t>(9 * D + 3)] = nan;
  x[static_cast<size_t>(13 * D + 0)] = inf;
  x[static_cast<size_t>(17 * D + 7)] = -inf;
  for (int64_t i = 20 * D; i < 24 * D; ++i) x[static_cast<size_t>(i)] = (i % 3 - 1) * std::ldexp(1.0, -130 - i % 7);
  for (int64_t i = 24 * D; i < 28 * D; ++i)
    x[static_cast<size_t>(i)] = std::ldexp((i % 2 ? 1.0 : -1.0) * (1.0 + 0.37 * static_cast<double>(i % 5)), 120);
  for (int64_t i = 28 * D; i < 32 * D; ++i) x[static_cast<size_t>(i)] = std::fmod(x[static_cast<size_t>(i)], 448.0);
  x[static_cast<size_t>(29 * D + 1)] = -448.0;
  for (int64_t i = 32 * D; i < 36 * D; ++i) x[static_cast<size_t>(i)] = std::ldexp(i % 2 ? 1.0 : -1.0, -6 - i % 5);
  for (int64_t i = 36 * D; i < 44 * D; i += 3) x[static_cast<size_t>(i)] = -0.0;
  ref::from_vector(in.x.view, x);
  // Offsets that follow the tiles, so the clusters hold the same special groups.
  std::vector<double> offsets;
  for (int64_t o = 0; o <= S; o += 4) offsets.push_back(static_cast<double>(o));
  ref::from_vector(in.offsets.view, offsets);
  for (const Fp8Scale g : {Fp8Scale::Tile, Fp8Scale::Cluster, Fp8Scale::Channel})
    for (const bool shifted : {false, true}) {
      SCOPED_TRACE(std::string(granularity_name(g)) + (shifted ? " shifted" : ""));
      c.granularity = g;
      c.shifted = shifted;
      // The groups with the NaN (row 9), +inf (row 13) and -inf (row 17) have a NaN scale: three
      // tiles or clusters of 4 rows (a scale per row), or channels 3, 0 and 7.
      expect_identical(c, in, g == Fp8Scale::Channel ? 3 : 12);
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

// `call` on the CPU throws some sapattn::Error; the same call on CUDA views must throw the same type.
void expect_same_error(const std::function<void(bool on_gpu)>& call) {
  std::string cpu_type, gpu_type;
  try {
    call(false);
  } catch (const Error& e) {
    cpu_type = typeid(e).name();
  }
  try {
    call(true);
  } catch (const Error& e) {
    gpu_type = typeid(e).name();
  }
  ASSERT_FALSE(cpu_type.empty()) << "the CPU op accepted the arguments";
  EXPECT_EQ(gpu_type, cpu_type);
}

TEST(QuantizeE4m3Errors, SameTypedErrorsAsCpu) {
  const int64_t B = 1, H = 2, S = 50, D = 8, C = 4;
  ref::Rng rng(testing_support::case_seed());
  const QuantCase c{DType::BF16, Layout::Contiguous, B, H, S, D, C, Fp8Scale::Tile, 16, true, true};
  const QuantInputs in = make_inputs(c, rng);
  HostTensor codes = poisoned(DType::U8, {B, H, S, D}), scales = poisoned(DType::F32, {B, H, S}),
             channel_scales = poisoned(DType::F32, {B, H, D}), f32_codes = poisoned(DType::F32, {B, H, S, D}),
             i32_x = poisoned(DType::I32, {B, H, S, D}), padded_codes = poisoned(DType::U8, {B, H, S, D}, Layout::Padded),
             short_perm = poisoned(DType::I32, {B, H, S - 1});
  struct Pair {
    const HostTensor& host;
    DeviceTensor dev;
    TensorView at(bool gpu) const { return gpu ? dev.view : host.view; }
  };
  const auto pair = [](const HostTensor& h) { return Pair{h, to_device(h)}; };
  const Pair x = pair(in.x), perm = pair(in.perm), off = pair(in.offsets), shift = pair(in.shift),
             cd = pair(codes), sc = pair(scales), csc = pair(channel_scales), fcd = pair(f32_codes), ix = pair(i32_x),
             pcd = pair(padded_codes), short_p = pair(short_perm);
  NonBlockingStream cs;
  const auto stream = [&](bool gpu) { return gpu ? cs.stream() : kCpu; };
  const auto run = [&](const Pair& xx, const TensorView& p, const TensorView& o, Fp8Scale g, int tile, const Pair& cc,
                       const Pair& ss) {
    return [&, xp = &xx, cp = &cc, sp = &ss, p, o, g, tile](bool gpu) {
      quantize_e4m3(xp->at(gpu), gpu && !p.empty() ? perm.dev.view : p, gpu && !o.empty() ? off.dev.view : o,
                    shift.at(gpu), g, tile, cp->at(gpu), sp->at(gpu), stream(gpu));
    };
  };
  const TensorView hp = in.perm.view, ho = in.offsets.view;
  expect_same_error(run(x, hp, ho, static_cast<Fp8Scale>(7), 16, cd, sc));  // InvalidArgumentError
  expect_same_error(run(x, hp, ho, Fp8Scale::Tile, 0, cd, sc));             // InvalidArgumentError
  expect_same_error(run(x, hp, {}, Fp8Scale::Cluster, 0, cd, sc));          // ShapeError: no offsets
  expect_same_error(run(x, hp, ho, Fp8Scale::Channel, 0, cd, sc));          // ShapeError: [B,H,S] scales
  expect_same_error(run(x, hp, ho, Fp8Scale::Tile, 16, cd, csc));           // ShapeError: [B,H,D] scales
  expect_same_error(run(x, hp, ho, Fp8Scale::Tile, 16, fcd, sc));           // DTypeError: f32 codes
  expect_same_error(run(ix, hp, ho, Fp8Scale::Tile, 16, cd, sc));           // DTypeError: i32 x
  expect_same_error(run(x, hp, ho, Fp8Scale::Tile, 16, pcd, sc));           // strided codes
  expect_same_error([&](bool gpu) {                                          // a perm of S - 1 rows
    quantize_e4m3(x.at(gpu), short_p.at(gpu), {}, {}, Fp8Scale::Tile, 16, cd.at(gpu), sc.at(gpu), stream(gpu));
  });
  // A CUDA stream with one tensor left on the host.
  EXPECT_THROW(quantize_e4m3(x.dev.view, perm.dev.view, {}, shift.host.view, Fp8Scale::Tile, 16, cd.dev.view,
                             sc.dev.view, cs.stream()),
               UnsupportedError);
}

// Values only the backend reads, with the device value checks on: a permutation entry outside
// [0, S), offsets that do not end at S, offsets that decrease; the same values pass without them.
TEST(QuantizeE4m3Errors, BadValuesAreReportedWithValueChecks) {
  const int64_t B = 2, H = 2, S = 50, D = 8, C = 4;
  ref::Rng rng(testing_support::case_seed());
  const QuantCase c{DType::F16, Layout::Contiguous, B, H, S, D, C, Fp8Scale::Cluster, 1, true, false};
  const QuantInputs in = make_inputs(c, rng);
  const DeviceTensor dx = to_device(in.x), dperm = to_device(in.perm), doff = to_device(in.offsets);
  DeviceTensor dcodes = to_device(poisoned(DType::U8, {B, H, S, D})), dscales = to_device(poisoned(DType::F32, {B, H, S}));
  NonBlockingStream cs;
  const ValueChecksOn on;
  EXPECT_NO_THROW(quantize_e4m3(dx.view, dperm.view, doff.view, {}, Fp8Scale::Cluster, 1, dcodes.view, dscales.view,
                                cs.stream()));
  const auto with = [&](const HostTensor& t, int64_t index, double value) {
    HostTensor bad = deep_copy(t);
    std::vector<double> v = ref::to_vector(bad.view);
    v[static_cast<size_t>(index)] = value;
    ref::from_vector(bad.view, v);
    return to_device(bad);
  };
  const DeviceTensor perm_out = with(in.perm, S + 7, static_cast<double>(S));  // (b,h) = (0,1), row 7
  EXPECT_THROW(quantize_e4m3(dx.view, perm_out.view, {}, {}, Fp8Scale::Tile, 16, dcodes.view, dscales.view,
                             cs.stream()),
               InvalidArgumentError);
  DeviceTensor channel_scales = to_device(poisoned(DType::F32, {B, H, D}));
  EXPECT_THROW(quantize_e4m3(dx.view, perm_out.view, {}, {}, Fp8Scale::Channel, 1, dcodes.view, channel_scales.view,
                             cs.stream()),
               InvalidArgumentError);
  const DeviceTensor short_end = with(in.offsets, 3 * (C + 1) + C, static_cast<double>(S - 1));  // (1,1)
  EXPECT_THROW(quantize_e4m3(dx.view, dperm.view, short_end.view, {}, Fp8Scale::Cluster, 1, dcodes.view,
                             dscales.view, cs.stream()),
               InvalidArgumentError);
  const DeviceTensor decreasing = with(in.offsets, 2, -1.0);  // (0,0): cluster 1 ends at -1, before it starts
  EXPECT_THROW(quantize_e4m3(dx.view, dperm.view, decreasing.view, {}, Fp8Scale::Cluster, 1, dcodes.view,
                             dscales.view, cs.stream()),
               InvalidArgumentError);
}

}  // namespace
}  // namespace sapattn::cuda_test
