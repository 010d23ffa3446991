// GoogleTest helpers shared by the op suites: per-test seeds and checks that a failing call leaves
// its outputs untouched.
#pragma once

#include <gtest/gtest.h>

#include <cctype>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "reference.hpp"
#include "sapattn/tensor.hpp"

namespace sapattn::testing_support {

// The reference's tensor types, so that an op suite's `using namespace sapattn::testing_support;`
// brings them in with the helpers below.
using ref::HostTensor;
using ref::Layout;

// A seed derived from the running test's full name, so every case draws its own inputs.
inline uint64_t case_seed(uint64_t index = 0) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  return ref::test_seed(std::string(info->test_suite_name()) + "." + info->name(), index);
}

// Two threads: the CPU backend's task split is exercised on every call.
inline const Stream kStream = Stream::cpu(2);

// Runs f, expects exception E, and checks that the outputs' bytes did not change.
template <typename E, typename F>
void expect_error_untouched(F&& f, std::vector<const ref::HostTensor*> outputs) {
  std::vector<std::vector<uint8_t>> before;
  for (const ref::HostTensor* t : outputs) before.push_back(t->bytes());
  EXPECT_THROW(f(), E);
  for (size_t i = 0; i < outputs.size(); ++i) EXPECT_EQ(outputs[i]->bytes(), before[i]) << "output " << i << " written";
}

template <typename E, typename F>
void expect_error_untouched(F&& f, const ref::HostTensor& output) {
  expect_error_untouched<E>(std::forward<F>(f), std::vector<const ref::HostTensor*>{&output});
}

// Runs f, expects exception E, and checks that its message contains `needle`.
template <typename E, typename F>
void expect_error_message(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no exception; expected one saying: " << needle;
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "expected '" << needle << "' in: " << e.what();
  }
}

// A readable name for a value-parameterised case, e.g. case_name("f16", "transposed+padded", "B2H3")
// = "f16_transposed_padded_B2H3": the parts joined by '_', every character that GoogleTest does not
// take in a name made '_'. CTest registers each case under this name (tests/CMakeLists.txt).
template <typename... Parts>
std::string case_name(const Parts&... parts) {
  std::ostringstream os;
  ((os << parts << '_'), ...);
  std::string name = os.str();
  name.pop_back();
  for (char& c : name)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return name;
}

// Seeded normal(0, stddev) values of any float dtype (16-bit dtypes hold their rounding).
inline Tensor random_tensor(DType dtype, std::vector<int64_t> shape, uint32_t seed, float stddev = 1.0f) {
  Tensor t(dtype, std::move(shape));
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, stddev);
  for (int64_t i = 0; i < t.numel(); ++i) store_from_f32(t.data(), dtype, i, n(rng));
  return t;
}

// [B,H,S,D] tokens scattered around `centers` random centres (spread center_std per element) with
// noise_std of noise: structure for k-means and selection to find, as in a video DiT. The centres
// ([centers, D]) go to *centres_out where given.
inline Tensor clustered_tensor(DType dtype, int64_t B, int64_t H, int64_t S, int64_t D, int centers, uint32_t seed,
                               float center_std, float noise_std, std::vector<float>* centres_out = nullptr) {
  Tensor t(dtype, {B, H, S, D});
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<float> c(static_cast<size_t>(centers * D));
  for (auto& x : c) x = center_std * n(rng);
  for (int64_t r = 0; r < B * H * S; ++r) {
    const int64_t which = std::uniform_int_distribution<int64_t>(0, centers - 1)(rng);
    for (int64_t d = 0; d < D; ++d) store_from_f32(t.data(), dtype, r * D + d, c[which * D + d] + noise_std * n(rng));
  }
  if (centres_out != nullptr) *centres_out = std::move(c);
  return t;
}

// The sample_ids contract of kmeans_init and kmeans_seed_greedy on random points [B,H,N,D], H >= 3:
// head 2 of every batch item, run alone with the ids it has in the whole call (b*H + 2), gets the
// whole call's C centroids; without ids it runs as (b, 0) of a one-head call and gets others.
// op(points, centroids, sample_ids) runs the op under test with its other arguments fixed.
template <typename Op>
void expect_sample_ids_keep_a_head(Op&& op, int64_t B, int64_t H, int64_t N, int64_t D, int64_t C) {
  ref::Rng rng(case_seed());
  ref::HostTensor points = ref::make_tensor(DType::F32, {B, H, N, D});
  ref::fill_normal(points.view, rng);
  ref::HostTensor all = ref::make_tensor(DType::F32, {B, H, C, D});
  op(points.view, all.view, TensorView{});
  ref::HostTensor one = ref::make_tensor(DType::F32, {B, 1, C, D});
  ref::HostTensor ids = ref::make_tensor(DType::I32, {B, 1});
  for (int64_t b = 0; b < B; ++b) static_cast<int32_t*>(ids.view.data)[b] = static_cast<int32_t>(b * H + 2);
  op(points.view.slice(1, 2, 3), one.view, ids.view);
  EXPECT_EQ(ref::to_vector(one.view), ref::to_vector(all.view.slice(1, 2, 3)));
  ref::HostTensor plain = ref::make_tensor(DType::F32, {B, 1, C, D});
  op(points.view.slice(1, 2, 3), plain.view, TensorView{});
  EXPECT_NE(ref::to_vector(plain.view), ref::to_vector(one.view));
}

}  // namespace sapattn::testing_support

// The failing call's text is in the trace.
#define EXPECT_ERROR_UNTOUCHED(E, outputs, ...)                                           \
  do {                                                                                    \
    SCOPED_TRACE(#__VA_ARGS__);                                                           \
    ::sapattn::testing_support::expect_error_untouched<E>([&] { __VA_ARGS__; }, outputs); \
  } while (0)
