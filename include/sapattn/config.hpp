// SVG2 configuration. Defaults are the official Wan 2.1 T2V 720p script's (../shared/ANCHORS.md).
#pragma once

#include <cstdint>

namespace sapattn {

struct Config {
  int q_clusters = 300;        // Cq: k-means clusters over the video-token queries
  int k_clusters = 1000;       // Ck: k-means clusters over the video-token keys
  float top_p = 0.9f;          // per query-cluster row, keep key clusters until this mass; >= 1 keeps all
  float min_kc_ratio = 0.10f;  // always keep the top floor(min_kc_ratio * Ck) key clusters
  int kmeans_iters_init = 50;  // Lloyd iterations at a layer's first sparse call (sampled init)
  int kmeans_iters_step = 2;   // Lloyd iterations at later calls (warm start from cached centroids)
  uint64_t seed = 0;           // seeds the initial centroid sample; results are deterministic per seed
  int64_t text_tokens = 0;     // trailing text tokens (HunyuanVideo joint attention); 0 = video only
  int64_t prompt_length = 0;   // real prompt tokens at the start of the text; the rest is padding
  float scale = 0.0f;          // softmax scale; 0 means 1/sqrt(D)
  bool check_finite = true;    // svg2_attention checks Q, K, V for NaN/Inf: one read of each, and a
                               // stream sync on CUDA; turn off on a hot path or under graph capture
  int key_shard_index = 0;     // attend over share key_shard_index of key_shard_count of the kept
  int key_shard_count = 1;     // blocks (shard_key_clusters): keys split across devices

  // Throws InvalidArgumentError naming the first bad field and its valid range.
  void validate() const;
  // Also checks the fields that depend on the sequence: text_tokens < S.
  void validate_for(int64_t seq_len, int64_t head_dim) const;
  float scale_for(int64_t head_dim) const;
  // Number of always-kept key clusters: floor(min_kc_ratio * k_clusters).
  int min_kept_clusters() const;
};

}  // namespace sapattn
