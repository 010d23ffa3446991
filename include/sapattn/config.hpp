// SVG2 configuration. Defaults are the official Wan 2.1 T2V 720p script's (docs/torch.md lists them per model).
#pragma once

#include <cstdint>

namespace sapattn {

// How the key clusters to compute exactly are chosen per query cluster.
enum class Routing : uint8_t {
  TopP,        // SVG2: the top-p prefix of the size-weighted centroid softmax
  ErrorAware,  // SVG-EAR: the best error-per-area blocks of the probe, within SVG2's top-p area
};

// How a layer's first sparse call starts its k-means (docs/cuda.md, "The greedy seeding as built").
enum class KMeansSeeding : uint8_t {
  Sample,    // kmeans_init: C points of a seeded random sample (SVG2's official start)
  GreedyPP,  // kmeans_seed_greedy: greedy k-means++ on a seeded sample of kmeans_sample_factor * C points
};

// The precision of the sparse attention's two GEMMs (docs/fp8.md).
enum class AttentionDType : uint8_t {
  Native,  // Q K^T and P V in the inputs' dtype (bf16/f16 on CUDA; fp32 arithmetic on the CPU)
  E4M3,    // Q, K, V and P quantised to FP8 E4M3 with fp32 scales (block_sparse_attention_e4m3 with
           // the default Fp8Options); fp32 accumulation and softmax
};

// The seed of the keys' initial k-means sample for a config's seed: another stream than the queries'
// (the seed itself), so that the two samples are independent.
constexpr uint64_t key_sample_seed(uint64_t seed) { return seed ^ 0x5bd1e9955bd1e995ull; }

struct Config {
  int q_clusters = 300;        // Cq: k-means clusters over the video-token queries
  int k_clusters = 1000;       // Ck: k-means clusters over the video-token keys
  float top_p = 0.9f;          // per query-cluster row, keep key clusters until this mass; >= 1 keeps all
  float density = 0.0f;        // > 0: replaces top_p by, per (b,h), the smallest top-p whose selection
                               // computes this share of the video query-key pairs (a speed budget)
  float min_kc_ratio = 0.10f;  // always keep the top floor(min_kc_ratio * Ck) key clusters
  int kmeans_iters_init = 14;  // Lloyd iterations at a layer's first sparse call, after kmeans_seeding
  int kmeans_iters_step = 2;   // Lloyd iterations at later calls (warm start from cached centroids)
  uint64_t seed = 0;           // seeds the initial centroid sample; results are deterministic per seed
  int64_t text_tokens = 0;     // trailing text tokens (HunyuanVideo joint attention); 0 = video only
  int64_t prompt_length = 0;   // real prompt tokens at the start of the text; the rest is padding
  float scale = 0.0f;          // softmax scale; 0 means 1/sqrt(D)
  bool check_finite = true;    // svg2_attention checks Q, K, V for NaN/Inf: one read of each, and a
                               // stream sync on CUDA; turn off on a hot path or under graph capture
  int key_shard_index = 0;     // attend over share key_shard_index of key_shard_count of the kept
  int key_shard_count = 1;     // blocks (shard_key_clusters): keys split across devices
  Routing routing = Routing::TopP;
  bool compensate = false;       // skipped video key clusters still count through their key and value
                                 // centroids (centroid_compensation); not with key_shard_count > 1
  float ear_gamma = 1.0f;        // ErrorAware: probe error divided by area^gamma
  float ear_keep_ratio = 0.05f;  // ErrorAware: the top max(1, floor(ratio * k_clusters)) clusters of
                                 // SVG2's ranking are always computed (0 keeps none)
  // ear-plus (docs/ear.md): improvements over SVG-EAR, each off by default (all off = the published
  // method). They need routing = ErrorAware; the first two also need compensate.
  bool ear_spread = false;       // compensation logits gain log(mean over j's keys of exp(scale qbar_a .
                                 // (k_t - kbar_j))): the keys' spread seen from the query centroid
  bool ear_pair_values = false;  // compensation values per (query cluster, key cluster): j's values
                                 // weighted by their attention from qbar_a, instead of their plain mean
  bool ear_head_budget = false;  // one area budget per head instead of one per row: all pairs of a head
                                 // ranked by the probe's row-normalised error per area
  bool ear_split = false;        // compensation through two sub-centroids per key cluster (split_clusters)
                                 // instead of one; with ear_spread/ear_pair_values, theirs too
  // Query padding (docs/attention.md, "Query padding at 64-row blocks"): after the selection, move a few
  // video queries between query clusters (round_query_clusters with its default RoundQueryOptions:
  // slack 16, cap 0.1, prefilter 4, 8 rounds) so that fewer 64-row blocks carry padding rows.
  // Centroids and mask stay; q_cluster_sizes, the permutation and the compensation see the rounded
  // clusters. Both backends (the CUDA op gives the CPU's labels bit for bit). Off by default.
  bool round_q_clusters = false;
  // FP8: the sparse attention in FP8 E4M3 (block_sparse_attention_e4m3, docs/fp8.md); the
  // clustering and selection are unchanged. The CPU backend emulates the future kernel's arithmetic;
  // there is no CUDA kernel yet (UnsupportedError on a CUDA stream). Off (Native) by default.
  AttentionDType attention_dtype = AttentionDType::Native;

  // The first sparse call's seeding, before its kmeans_iters_init iterations. The defaults (with 14
  // iterations) are the CPU study's choice (docs/cuda.md): greedy k-means++ on 2C sampled points, then 14
  // iterations, reach a lower k-means objective than SVG2's official start (C sampled points, then
  // 50) for 3.5x less work: on an H100 at Wan 14B, ~88 ms against 206 ms per layer (docs/cuda.md).
  // They give other first-call clusters than that start (Sample with 50 iterations restores it);
  // later calls do not change.
  KMeansSeeding kmeans_seeding = KMeansSeeding::GreedyPP;
  int kmeans_sample_factor = 2;  // GreedyPP seeds from the first factor * C points of the sample; 1 to 64
  // Candidate assignment (kmeans_assign_candidates, docs/cuda.md): > 0 measures each point against
  // its previous label's kmeans_candidates nearest centroids only, in the iterations of a call after
  // its first two (a layer's first call: after the seeding's first two full ones) or after its first
  // (later calls, warm-started). 0 (the default until timed on the GPU) measures every centroid;
  // >= the cluster count is the same as 0.
  int kmeans_candidates = 0;

  // Throws InvalidArgumentError naming the first bad field and its valid range.
  void validate() const;
  // Also checks the fields that depend on the sequence: S >= 1, text_tokens < S, and at most one
  // cluster per video token (q_clusters, k_clusters <= S - text_tokens; an error, never a clamp).
  void validate_for(int64_t seq_len, int64_t head_dim) const;
  float scale_for(int64_t head_dim) const;
  // Number of always-kept key clusters: floor(min_kc_ratio * k_clusters).
  int min_kept_clusters() const;
  // ErrorAware's always-computed clusters per row: max(1, floor(ear_keep_ratio * k_clusters)), or 0
  // when ear_keep_ratio is 0.
  int ear_guaranteed_clusters() const;
  // Whether any ear-plus improvement is on (the probe then runs ear_plus_probe).
  bool ear_plus() const { return ear_spread || ear_pair_values || ear_head_budget || ear_split; }
};

}  // namespace sapattn
