#include "sapattn/config.hpp"

#include <algorithm>
#include <cmath>

#include "sapattn/error.hpp"

namespace sapattn {

void Config::validate() const {
  SAPATTN_CHECK(q_clusters >= 1, InvalidArgumentError, "q_clusters must be >= 1, got ", q_clusters);
  SAPATTN_CHECK(k_clusters >= 1, InvalidArgumentError, "k_clusters must be >= 1, got ", k_clusters);
  SAPATTN_CHECK(std::isfinite(top_p) && top_p > 0.0f && top_p <= 1.0f, InvalidArgumentError,
                "top_p must be in (0, 1], got ", top_p);
  SAPATTN_CHECK(std::isfinite(density) && density >= 0.0f && density <= 1.0f, InvalidArgumentError,
                "density must be in [0, 1] (0 = use top_p), got ", density);
  SAPATTN_CHECK(std::isfinite(min_kc_ratio) && min_kc_ratio >= 0.0f && min_kc_ratio <= 1.0f, InvalidArgumentError,
                "min_kc_ratio must be in [0, 1], got ", min_kc_ratio);
  SAPATTN_CHECK(kmeans_iters_init >= 0, InvalidArgumentError, "kmeans_iters_init must be >= 0, got ",
                kmeans_iters_init);
  SAPATTN_CHECK(kmeans_seeding == KMeansSeeding::Sample || kmeans_seeding == KMeansSeeding::GreedyPP,
                InvalidArgumentError, "kmeans_seeding must be Sample or GreedyPP, got ",
                static_cast<int>(kmeans_seeding));
  // The seeding's CUDA workspace and CPU time grow with factor * C; the study measured 2 to 8, and
  // beyond 64 the sample is every video token of the official scripts' shapes anyway.
  SAPATTN_CHECK(kmeans_sample_factor >= 1 && kmeans_sample_factor <= 64, InvalidArgumentError,
                "kmeans_sample_factor must be in [1, 64], got ", kmeans_sample_factor);
  SAPATTN_CHECK(kmeans_iters_step >= 0, InvalidArgumentError, "kmeans_iters_step must be >= 0, got ",
                kmeans_iters_step);
  SAPATTN_CHECK(kmeans_candidates >= 0, InvalidArgumentError, "kmeans_candidates must be >= 0, got ",
                kmeans_candidates);
  SAPATTN_CHECK(text_tokens >= 0, InvalidArgumentError, "text_tokens must be >= 0, got ", text_tokens);
  SAPATTN_CHECK(prompt_length >= 0 && prompt_length <= text_tokens, InvalidArgumentError,
                "prompt_length must be in [0, text_tokens=", text_tokens, "], got ", prompt_length);
  SAPATTN_CHECK(key_shard_count >= 1 && key_shard_index >= 0 && key_shard_index < key_shard_count, InvalidArgumentError,
                "key_shard_index must be in [0, key_shard_count) with key_shard_count >= 1, got ", key_shard_index,
                " of ", key_shard_count);
  SAPATTN_CHECK(std::isfinite(scale) && scale >= 0.0f, InvalidArgumentError,
                "scale must be finite and >= 0 (0 = 1/sqrt(D)), got ", scale);
  SAPATTN_CHECK(routing == Routing::TopP || routing == Routing::ErrorAware, InvalidArgumentError,
                "routing must be TopP or ErrorAware, got ", static_cast<int>(routing));
  SAPATTN_CHECK(attention_dtype == AttentionDType::Native || attention_dtype == AttentionDType::E4M3,
                InvalidArgumentError, "attention_dtype must be Native or E4M3, got ",
                static_cast<int>(attention_dtype));
  SAPATTN_CHECK(!compensate || key_shard_count == 1, InvalidArgumentError,
                "compensate needs the whole key set in one call (key_shard_count = 1, got ", key_shard_count, ")");
  SAPATTN_CHECK(std::isfinite(ear_gamma) && ear_gamma >= 0.0f, InvalidArgumentError,
                "ear_gamma must be finite and >= 0, got ", ear_gamma);
  SAPATTN_CHECK(std::isfinite(ear_keep_ratio) && ear_keep_ratio >= 0.0f && ear_keep_ratio <= 1.0f, InvalidArgumentError,
                "ear_keep_ratio must be in [0, 1], got ", ear_keep_ratio);
  SAPATTN_CHECK(!ear_plus() || routing == Routing::ErrorAware, InvalidArgumentError,
                "ear_spread, ear_pair_values, ear_head_budget and ear_split refine error-aware routing: they need "
                "routing ErrorAware ('error_aware' in Python, where SVG2Config.with_method('ear-plus') sets them all)");
  SAPATTN_CHECK(!(ear_spread || ear_pair_values || ear_split) || compensate, InvalidArgumentError,
                "ear_spread, ear_pair_values and ear_split change the compensation: they need compensate = true");
}

void Config::validate_for(int64_t seq_len, int64_t head_dim) const {
  validate();
  SAPATTN_CHECK(seq_len >= 1 && head_dim >= 1, ShapeError, "the sequence is empty (S = ", seq_len, ", D = ", head_dim,
                "): attention needs at least one token of head dim >= 1");
  SAPATTN_CHECK(text_tokens < seq_len, InvalidArgumentError, "text_tokens (", text_tokens,
                ") must leave at least one video token in a sequence of ", seq_len);
  // More clusters than video tokens leave clusters empty by construction and cost time for nothing
  // (10,000 query clusters on 512 tokens: 5.8 s, and a worse answer than 3 clusters).
  const int64_t video = seq_len - text_tokens;
  SAPATTN_CHECK(q_clusters <= video, InvalidArgumentError, "q_clusters (", q_clusters, ") exceeds the ", video,
                " video tokens: a cluster needs at least one token (SVG2's default is one query cluster per 252 video "
                "tokens, at most 300)");
  SAPATTN_CHECK(k_clusters <= video, InvalidArgumentError, "k_clusters (", k_clusters, ") exceeds the ", video,
                " video tokens: a cluster needs at least one token (SVG2's default is one key cluster per 75.6 video "
                "tokens, at most 1000)");
}

float Config::scale_for(int64_t head_dim) const {
  return scale > 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(head_dim));
}

int Config::min_kept_clusters() const {
  return static_cast<int>(std::floor(static_cast<double>(min_kc_ratio) * k_clusters));
}

int Config::ear_guaranteed_clusters() const {
  if (ear_keep_ratio <= 0.0f) return 0;
  return std::max(1, static_cast<int>(std::floor(static_cast<double>(ear_keep_ratio) * k_clusters)));
}

}  // namespace sapattn
