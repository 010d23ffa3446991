// The layer call with SVG-EAR (docs/ear.md): svg2_attention with error-aware routing and
// compensation, alone and with every ear-plus idea: top-p 1 is dense attention, text rows are never
// compensated, and bad configs and inputs are typed errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "sapattn/svg2.hpp"
#include "test_support.hpp"

namespace sapattn {
namespace {

using testing_support::kStream;

Config ear_config() {
  Config c;
  c.q_clusters = 6;
  c.k_clusters = 14;
  c.kmeans_iters_init = 8;
  c.routing = Routing::ErrorAware;
  c.compensate = true;
  return c;
}

// ear_config with every ear-plus idea on.
Config ear_plus_config() {
  Config c = ear_config();
  c.ear_spread = c.ear_pair_values = c.ear_head_budget = c.ear_split = true;
  return c;
}

struct LayerRun {
  Tensor out, lse, density;
};

LayerRun run_layer(const Tensor& q, const Tensor& k, const Tensor& v, const Config& config) {
  const auto& s = q.shape();
  LayerRun r{Tensor(DType::F32, s), Tensor(DType::F32, {s[0], s[1], s[2]}), Tensor(DType::F32, {s[0], s[1]})};
  BranchState state;
  svg2_attention(q.view(), k.view(), v.view(), config, state, {r.out.view(), r.lse.view(), r.density.view()}, kStream);
  return r;
}

Tensor blobs(int64_t S, uint32_t seed) {
  return testing_support::clustered_tensor(DType::BF16, 1, 2, S, 32, 5, seed, 1.5f, 0.5f);
}

TEST(EarLayer, TopPOneIsDenseAttention) {
  const Tensor q = blobs(120, 1), k = blobs(120, 2), v = blobs(120, 3);
  for (Config c : {ear_config(), ear_plus_config()}) {
    c.top_p = 1.0f;
    const LayerRun r = run_layer(q, k, v, c);
    const ref::Attention dense = ref::attention_f64(q.view(), k.view(), v.view(), c.scale_for(32), nullptr);
    const std::vector<double> out = ref::to_vector(r.out.view());
    for (size_t i = 0; i < out.size(); ++i)
      ASSERT_NEAR(out[i], dense.out[i], 1e-4) << i << " ear-plus " << c.ear_plus();
    for (int64_t i = 0; i < 2; ++i) EXPECT_FLOAT_EQ(r.density.data_as<float>()[i], 1.0f);
  }
}

// HunyuanVideo's text rows attend by the joint-text rule and are never compensated: with the same
// clusters and mask, compensation changes the video rows only.
TEST(EarLayer, TextRowsAreNotCompensated) {
  const int64_t S = 140, text = 20;
  const Tensor q = blobs(S, 4), k = blobs(S, 5), v = blobs(S, 6);
  for (Config c : {ear_config(), ear_plus_config()}) {
    c.text_tokens = text;
    c.prompt_length = 12;
    c.top_p = 0.6f;
    const LayerRun with = run_layer(q, k, v, c);
    c.compensate = c.ear_spread = c.ear_pair_values = c.ear_split = false;
    const LayerRun without = run_layer(q, k, v, c);
    const float* a = with.out.data_as<float>();
    const float* b = without.out.data_as<float>();
    double video_change = 0;
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t i = 0; i < S; ++i)
        for (int64_t d = 0; d < 32; ++d) {
          const int64_t e = (h * S + i) * 32 + d;
          if (i >= S - text)
            ASSERT_EQ(a[e], b[e]) << "text row " << i;
          else
            video_change = std::max(video_change, static_cast<double>(std::fabs(a[e] - b[e])));
        }
    EXPECT_GT(video_change, 1e-3) << "compensation changed no video row";
    EXPECT_EQ(with.density.data_as<float>()[0], without.density.data_as<float>()[0]);
  }
}

TEST(EarLayer, BadInputIsATypedError) {
  const Tensor q = blobs(64, 7), k = blobs(64, 8);
  Tensor v = blobs(64, 9);
  store_from_f32(v.data(), v.dtype(), 100, std::numeric_limits<float>::quiet_NaN());
  EXPECT_THROW(run_layer(q, k, v, ear_config()), NonFiniteError);
  Config c = ear_config();
  c.key_shard_count = 2;
  EXPECT_THROW(c.validate(), InvalidArgumentError);  // compensation needs every key cluster
  c = ear_config();
  c.ear_gamma = -1.0f;
  EXPECT_THROW(c.validate(), InvalidArgumentError);
  c = ear_config();
  c.ear_keep_ratio = 1.5f;
  EXPECT_THROW(c.validate(), InvalidArgumentError);
  c = ear_config();
  c.routing = static_cast<Routing>(7);
  EXPECT_THROW(c.validate(), InvalidArgumentError);
  // The ear-plus ideas refine error-aware routing; the compensation ones need the compensation.
  c = ear_plus_config();
  c.routing = Routing::TopP;
  EXPECT_THROW(c.validate(), InvalidArgumentError);
  for (bool Config::*idea : {&Config::ear_spread, &Config::ear_pair_values, &Config::ear_split}) {
    c = ear_config();
    c.compensate = false;
    c.*idea = true;
    EXPECT_THROW(c.validate(), InvalidArgumentError);
  }
  c = ear_config();
  c.compensate = false;
  c.ear_head_budget = true;
  EXPECT_NO_THROW(c.validate());
  EXPECT_EQ(ear_config().ear_guaranteed_clusters(), 1);  // max(1, floor(0.05 * 14))
  c.ear_keep_ratio = 0.0f;
  EXPECT_EQ(c.ear_guaranteed_clusters(), 0);
}

}  // namespace
}  // namespace sapattn
