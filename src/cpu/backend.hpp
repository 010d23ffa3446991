// The CPU backend: one function per op of include/sapattn/ops.hpp. src/ops/ checks every
// argument against the contract before calling here, so these functions assume valid shapes,
// dtypes and devices; they still check the values that only they read (labels, offsets).
#pragma once

#include <cstdint>

#include "sapattn/layout.hpp"

namespace sapattn::cpu {

// sample_ids: [B*H] or null (then b*H + h).
void kmeans_init(const TensorView& points, TensorView centroids, uint64_t seed, const int32_t* sample_ids, int threads);
void kmeans_seed_greedy(const TensorView& points, TensorView centroids, uint64_t seed, int sample_factor,
                        const int32_t* sample_ids, int threads);
void kmeans_assign(const TensorView& points, const TensorView& centroids, TensorView labels, int threads);
// prev_labels outside [0, C) throw InvalidArgumentError (before any label is written).
void kmeans_assign_candidates(const TensorView& points, const TensorView& centroids, const TensorView& prev_labels,
                              TensorView labels, int candidates, int threads);
// move_centroids = false only counts sizes (kmeans with zero iterations).
void kmeans_update(const TensorView& points, const TensorView& labels, TensorView centroids, TensorView sizes,
                   bool move_centroids, int threads);

void order_clusters(TensorView centroids, TensorView sizes, TensorView labels, int threads);

void select_top_p(const TensorView& probs, float top_p, int min_kept, TensorView mask, int threads);
void select_top_p_at_density(const TensorView& probs, const TensorView& q_sizes, const TensorView& k_sizes,
                             float density, int min_kept, TensorView mask, int threads);
void select_blocks(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& k_sizes, float scale,
                   float top_p, int min_kept, TensorView mask, int threads);
void apply_text_rule(TensorView mask, int threads);
void shard_key_clusters(TensorView mask, int index, int count, int threads);

void label_text_tokens(TensorView labels, int64_t video_tokens, int64_t prompt_length, int prompt_label, int threads);
void cluster_permutation(const TensorView& labels, int num_clusters, TensorView perm, TensorView offsets, int threads);
void gather_rows(const TensorView& x, const TensorView& perm, TensorView out, int threads);
void rope_pairs(const TensorView& x, const TensorView& cos, const TensorView& sin, TensorView out, int threads);
void scatter_rows(const TensorView& y, const TensorView& perm, TensorView out, int threads);

void block_sparse_attention(const TensorView& q, const TensorView& k, const TensorView& v, const BlockLayout& layout,
                            float scale, TensorView out, TensorView lse, const RowPermutation& perm, int threads);
void dense_attention(const TensorView& q, const TensorView& k, const TensorView& v, float scale, TensorView out,
                     TensorView lse, int threads);
void block_density(const BlockLayout& layout, TensorView density, int threads);

void quantize_e4m3(const TensorView& x, const TensorView& perm, const TensorView& offsets, const TensorView& shift,
                   Fp8Scale granularity, int tile_rows, TensorView codes, TensorView scales, int threads);
void block_sparse_attention_e4m3(const TensorView& q, const TensorView& k, const TensorView& v,
                                 const BlockLayout& layout, float scale, const Fp8Options& options, TensorView out,
                                 TensorView lse, const RowPermutation& perm, int threads);

void cluster_means(const TensorView& points, const TensorView& labels, TensorView means, int threads);
void centroid_probs(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& k_sizes,
                    float scale, TensorView probs, int threads);
void ear_probe(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& v_centroids,
               const TensorView& k, const TensorView& v, const TensorView& k_labels, const TensorView& q_sizes,
               const TensorView& k_sizes, float scale, float gamma, TensorView scores, int threads);
void select_error_aware(const TensorView& probs, const TensorView& budget_mask, const TensorView& scores,
                        const TensorView& q_sizes, const TensorView& k_sizes, int guaranteed, TensorView mask,
                        int threads);
void centroid_compensation(const TensorView& q, const TensorView& q_labels, const TensorView& mask,
                           const TensorView& k_centroids, const TensorView& v_centroids, const TensorView& k_sizes,
                           float scale, TensorView out, TensorView lse, int threads);
void ear_plus_probe(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& v_centroids,
                    const TensorView& k, const TensorView& v, const TensorView& k_labels, const TensorView& q_sizes,
                    const TensorView& k_sizes, float scale, float gamma, TensorView scores, TensorView spread,
                    TensorView pair_values, int threads);
void select_error_aware_per_head(const TensorView& probs, const TensorView& budget_mask, const TensorView& scores,
                                 const TensorView& q_sizes, const TensorView& k_sizes, int guaranteed, TensorView mask,
                                 int threads);
void split_clusters(const TensorView& points, const TensorView& labels, const TensorView& centroids,
                    TensorView sub_labels, TensorView sub_sizes, int threads);
void corrected_centroid_compensation(const TensorView& q, const TensorView& q_labels, const TensorView& mask,
                                     const TensorView& k_centroids, const TensorView& v_centroids,
                                     const TensorView& k_sizes, const TensorView& spread, const TensorView& pair_values,
                                     float scale, TensorView out, TensorView lse, int threads);

void round_query_clusters(const TensorView& q, const TensorView& q_centroids, const TensorView& k_centroids,
                          const TensorView& k_sizes, const TensorView& mask, float scale, int slack, float max_cost,
                          int prefilter, int rounds, int candidates, TensorView labels, TensorView sizes,
                          int threads);

void check_finite(const TensorView& x, const char* name, int threads);

}  // namespace sapattn::cpu
