// The stages of an SVG2 layer call after clustering, shared by svg2_attention and the evaluation
// methods (positional blocks, oracle) so that every method attends through the same code path.
#pragma once

#include "sapattn/config.hpp"
#include "sapattn/ops.hpp"
#include "sapattn/svg2.hpp"

namespace sapattn::pipeline {

// Scratch tensors of one layer call, carved from a Workspace. Cq/Ck count the text clusters
// when the config has text tokens (two more on each side).
struct Buffers {
  int64_t video_tokens = 0;
  int q_video_clusters = 0, k_video_clusters = 0;    // Cq, Ck of the config
  int q_clusters = 0, k_clusters = 0;                // with the text clusters
  TensorView q_labels, k_labels;                     // [B,H,S] i32
  TensorView q_perm, k_perm;                         // [B,H,S] i32
  TensorView q_offsets, k_offsets;                   // [B,H,Cq+1], [B,H,Ck+1] i32
  TensorView q_sizes, k_sizes;                       // [B,H,Cq], [B,H,Ck] i32 (video clusters)
  TensorView mask;                                   // [B,H,Cq,Ck] u8 (with text clusters)
  TensorView k_sorted, v_sorted;                     // [B,H,S,D] K and V rows in cluster order, or empty
                                                     // (sorted_kv: the Hopper kernel loads them by TMA)
  TensorView v_centroids;                            // [B,H,Ck,D] f32 value means: ErrorAware or compensate
  TensorView probs, scores;                          // [B,H,Cq,Ck] f32 SVG2's weights (ErrorAware or density),
                                                     // probe scores (ErrorAware)
  TensorView budget_mask;                            // [B,H,Cq,Ck] u8 SVG2's selection: ErrorAware
  TensorView lse;                                    // [B,H,S] f32 when compensating without a caller's lse
  // ear-plus. With ear_split the compensation runs over Ck' = 2 Ck sub-clusters of the key clusters,
  // else Ck' = Ck.
  TensorView spread;                                 // [B,H,Cq,Ck'] f32 compensation logit term (ear_spread)
  TensorView pair_values;                            // [B,H,Cq*Ck',D] f32 compensation values (ear_pair_values)
  TensorView sub_labels;                             // [B,H,S] i32 sub-cluster of each video key (ear_split)
  TensorView sub_sizes;                              // [B,H,2Ck] i32
  TensorView sub_k_centroids, sub_v_centroids;       // [B,H,2Ck,D] f32 means of the sub-clusters' keys, values
  TensorView sub_scores;                             // [B,H,Cq,2Ck] f32 the sub-cluster probe's (unused) scores
  Workspace op_scratch;                              // scratch the k-means, permutation and attention ops ask for

  // Video parts of the label tensors and the video x video block of the mask.
  TensorView q_video_labels() const { return q_labels.slice(2, 0, video_tokens); }
  TensorView k_video_labels() const { return k_labels.slice(2, 0, video_tokens); }
  TensorView video_mask() const { return mask.slice(2, 0, q_video_clusters).slice(3, 0, k_video_clusters); }
};

// Whether the attention reads K and V from copies in cluster order (one gather each) rather than
// through k_perm: where the kernel that runs is the Hopper one, whose TMA loads need key rows in
// cluster order (docs/attention.md, "svg2 on the TMA path").
bool sorted_kv(Device device, DType dtype, int64_t head_dim);

// Bytes the buffers need; with a non-null workspace, also carves them out of it.
size_t carve(const AttentionShape& shape, const Config& config, DType dtype, Device device, const Workspace* workspace,
             Buffers* buffers);

// Checks q, k, v and the outputs against one another and the config; returns the shape.
AttentionShape check_inputs(const TensorView& q, const TensorView& k, const TensorView& v, const Config& config,
                            const Svg2Outputs& outputs, const Stream& stream);

// SVG2's clustering: k-means of the video queries and keys (with `initialize`, the config's seeding,
// kmeans_init's sample or kmeans_seed_greedy, and kmeans_iters_init iterations, else a warm start
// with kmeans_iters_step). Sizes go to q_sizes / k_sizes. A fresh clustering of the keys is
// renumbered along order_clusters' chain, so that the key clusters a query cluster keeps are mostly
// neighbours (long runs of rows for the attention's loads); warm-started calls keep the numbering.
void cluster(const TensorView& q, const TensorView& k, const Config& config, const CentroidViews& centroids,
             bool initialize, Buffers& buffers, const TensorView& q_sizes, const TensorView& k_sizes,
             const Stream& stream);

// What the selection needs besides the centroids and does not depend on top-p or density: SVG2's
// weights (ErrorAware or a density budget), the value means per key cluster (ErrorAware or
// compensate) and the probe scores (ErrorAware).
void probe(const TensorView& k, const TensorView& v, const Config& config, const CentroidViews& centroids,
           const TensorView& q_sizes, const TensorView& k_sizes, Buffers& buffers, const Stream& stream);

// The video x video mask from the branch's centroids (after probe): SVG2's top-p rule (at
// config.top_p, or at the top-p meeting config.density), or EAR's error-aware routing within the
// area that rule computes.
void select(const Config& config, const CentroidViews& centroids, const TensorView& q_sizes, const TensorView& k_sizes,
            Buffers& buffers, const Stream& stream);

// Checks caller-owned centroids against q's shape and the config.
void check_centroids(const CentroidViews& centroids, const AttentionShape& shape, const Config& config,
                     const Stream& stream);

// Given video labels and sizes, the video x video mask and centroids already selected: labels the
// text tokens, applies the text rule, permutes, attends (in e4m3 when config.attention_dtype says so,
// block_sparse_attention_e4m3 with the default Fp8Options), adds the skipped video key clusters through
// their centroids when config.compensate, and writes the outputs in token order.
void attend_clusters(const TensorView& q, const TensorView& k, const TensorView& v, const Config& config,
                     const CentroidViews& centroids, const TensorView& k_sizes, Buffers& buffers,
                     const Svg2Outputs& outputs, const Stream& stream);

}  // namespace sapattn::pipeline
