// The SVG2 layer call: cluster, select, permute, attend, unpermute. Only ops of ops.hpp are used,
// so the same sequence runs on any backend, every launch on the caller's stream.
#include "sapattn/svg2.hpp"

#include <algorithm>
#include <cstring>
#include <string>
#include <tuple>

#include "core/carver.hpp"
#include "ops/checks.hpp"
#include "svg2/pipeline.hpp"

namespace sapattn {

namespace pipeline {

bool sorted_kv(Device device, DType dtype, int64_t head_dim) {
  if (device.type != DeviceType::CUDA) return false;
  const AttentionKernel kernel = attention_kernel(device, dtype, head_dim);
  return kernel.supported && std::strcmp(kernel.name, "sm90a-wgmma") == 0;
}

size_t carve(const AttentionShape& shape, const Config& config, DType dtype, Device device, const Workspace* workspace,
             Buffers* buffers) {
  const int64_t B = shape.batch, H = shape.heads, S = shape.seq, D = shape.head_dim;
  const int text_clusters = config.text_tokens > 0 ? 2 : 0;
  Buffers b;
  b.video_tokens = S - config.text_tokens;
  b.q_video_clusters = config.q_clusters;
  b.k_video_clusters = config.k_clusters;
  b.q_clusters = config.q_clusters + text_clusters;
  b.k_clusters = config.k_clusters + text_clusters;
  Carver c("svg2_attention", workspace != nullptr ? *workspace : Workspace{});
  b.q_labels = c.take_view(DType::I32, {B, H, S}, device);
  b.k_labels = c.take_view(DType::I32, {B, H, S}, device);
  b.q_perm = c.take_view(DType::I32, {B, H, S}, device);
  b.k_perm = c.take_view(DType::I32, {B, H, S}, device);
  b.q_offsets = c.take_view(DType::I32, {B, H, b.q_clusters + 1}, device);
  b.k_offsets = c.take_view(DType::I32, {B, H, b.k_clusters + 1}, device);
  b.q_sizes = c.take_view(DType::I32, {B, H, config.q_clusters}, device);
  b.k_sizes = c.take_view(DType::I32, {B, H, config.k_clusters}, device);
  b.mask = c.take_view(DType::U8, {B, H, b.q_clusters, b.k_clusters}, device);
  // (The e4m3 attention quantises K and V into its own workspace in cluster order: no sorted copies.)
  if (config.attention_dtype != AttentionDType::E4M3 && sorted_kv(device, dtype, D)) {
    b.k_sorted = c.take_view(dtype, {B, H, S, D}, device);
    b.v_sorted = c.take_view(dtype, {B, H, S, D}, device);
  }
  const bool error_aware = config.routing == Routing::ErrorAware;
  const int64_t Cq = config.q_clusters, Ck = config.k_clusters;
  if (error_aware || config.compensate) b.v_centroids = c.take_view(DType::F32, {B, H, Ck, D}, device);
  if (error_aware || config.density > 0.0f) b.probs = c.take_view(DType::F32, {B, H, Cq, Ck}, device);
  if (error_aware) {
    b.scores = c.take_view(DType::F32, {B, H, Cq, Ck}, device);
    b.budget_mask = c.take_view(DType::U8, {B, H, Cq, Ck}, device);
  }
  if (config.compensate) b.lse = c.take_view(DType::F32, {B, H, S}, device);
  const int64_t Ck_comp = config.ear_split ? 2 * Ck : Ck;  // pseudo-keys of the compensation
  if (config.ear_spread) b.spread = c.take_view(DType::F32, {B, H, Cq, Ck_comp}, device);
  if (config.ear_pair_values) b.pair_values = c.take_view(DType::F32, {B, H, Cq * Ck_comp, D}, device);
  if (config.ear_split) {
    b.sub_labels = c.take_view(DType::I32, {B, H, S}, device);
    b.sub_sizes = c.take_view(DType::I32, {B, H, 2 * Ck}, device);
    b.sub_k_centroids = c.take_view(DType::F32, {B, H, 2 * Ck, D}, device);
    b.sub_v_centroids = c.take_view(DType::F32, {B, H, 2 * Ck, D}, device);
    if (config.ear_spread || config.ear_pair_values) b.sub_scores = c.take_view(DType::F32, {B, H, Cq, 2 * Ck}, device);
  }
  const bool greedy = config.kmeans_seeding == KMeansSeeding::GreedyPP;
  const auto seeding_bytes = [&](int clusters) {
    return greedy ? kmeans_seed_greedy_workspace_bytes(B * H, b.video_tokens, clusters, config.kmeans_sample_factor,
                                                       device)
                  : size_t{0};
  };
  const auto candidate_bytes = [&](int clusters) {
    return config.kmeans_candidates > 0 ? kmeans_assign_candidates_workspace_bytes(
                                              B * H, b.video_tokens, clusters, config.kmeans_candidates, device)
                                        : size_t{0};
  };
  const size_t scratch = std::max(
      {kmeans_workspace_bytes(B * H, b.video_tokens, config.q_clusters, D, device),
       kmeans_workspace_bytes(B * H, b.video_tokens, config.k_clusters, D, device),
       candidate_bytes(config.q_clusters), candidate_bytes(config.k_clusters),
       order_clusters_workspace_bytes(B * H, config.k_clusters, D, device), seeding_bytes(config.q_clusters),
       seeding_bytes(config.k_clusters),
       cluster_permutation_workspace_bytes(B * H, S, std::max(b.q_clusters, b.k_clusters), device),
       block_sparse_attention_workspace_bytes(B * H, b.q_clusters, b.k_clusters, S, device),
       config.attention_dtype == AttentionDType::E4M3
           ? block_sparse_attention_e4m3_workspace_bytes(B * H, b.q_clusters, b.k_clusters, S, S, device)
           : size_t{0},
       error_aware || config.compensate || config.density > 0.0f
           ? ear_workspace_bytes(B * H, b.video_tokens, Cq, Ck, D, device)
           : size_t{0},
       config.compensate ? compensation_workspace_bytes(B * H, b.video_tokens, Cq, Ck_comp, D, device) : size_t{0},
       // The halves' means (cluster_means over 2 Ck sub-labels).
       config.ear_split ? ear_workspace_bytes(B * H, b.video_tokens, 0, Ck_comp, D, device) : size_t{0},
       // ear_plus_probe (over the halves too, with the split: Ck_comp), the routing per head
       // and split_clusters; with the split, the routing's share counts 2 Ck columns, more
       // than it ranks.
       config.ear_plus() ? ear_plus_workspace_bytes(B * H, b.video_tokens, Cq, Ck_comp, device) : size_t{0},
       config.round_q_clusters
           ? round_query_clusters_workspace_bytes(B * H, b.video_tokens, Cq, Ck, RoundQueryOptions{}, device)
           : size_t{0}});
  b.op_scratch = Workspace{c.take_bytes(scratch), scratch};
  if (buffers != nullptr) *buffers = b;
  return c.used();
}

AttentionShape check_inputs(const TensorView& q, const TensorView& k, const TensorView& v, const Config& config,
                            const Svg2Outputs& outputs, const Stream& stream) {
  using namespace checks;
  for (const auto& [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&outputs.out, "out"}}) {
    expect_rank(*t, 4, name);
    expect_floating(*t, name);
    expect_device(*t, stream);
  }
  for (const auto& [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) expect_nonempty(*t, name);
  const AttentionShape shape = AttentionShape::of(q);
  for (const auto& [t, name] : {std::pair{&k, "k"}, {&v, "v"}, {&outputs.out, "out"}})
    for (int d = 0; d < 4; ++d) expect_extent_of(*t, d, name, q, "q");
  SAPATTN_CHECK(k.dtype == q.dtype && v.dtype == q.dtype, DTypeError, "q, k and v must share a dtype, got ",
                q.describe(), ", ", k.describe(), ", ", v.describe());
  config.validate_for(shape.seq, shape.head_dim);
  // Refused before the call touches any state: the e4m3 kernel's limits (block_sparse_attention_e4m3).
  if (stream.device.type == DeviceType::CUDA && config.attention_dtype == AttentionDType::E4M3) {
    const AttentionKernel kernel = attention_kernel(stream.device, q.dtype, shape.head_dim);
    SAPATTN_CHECK(kernel.supported && std::string(kernel.name) == "sm90a-wgmma" && shape.head_dim == 128,
                  UnsupportedError,
                  "attention_dtype E4M3 (the FP8 attention) on CUDA needs the Hopper kernel (an H100 or H200) and "
                  "head dim 128; this call has head dim ",
                  shape.head_dim, " on a GPU whose attention kernel is '", kernel.name,
                  "' (the CPU backend emulates it at any shape; docs/fp8.md)");
  }
  const int64_t B = shape.batch, H = shape.heads;
  if (!outputs.lse.empty()) {
    expect_rank(outputs.lse, 3, "lse");
    expect_dtype(outputs.lse, DType::F32, "lse");
    for (int d = 0; d < 3; ++d) expect_extent(outputs.lse, d, q.shape[d], "lse", "B, H, S of q: lse is [B,H,S]");
    expect_device(outputs.lse, stream);
  }
  if (!outputs.density.empty()) {
    expect_rank(outputs.density, 2, "density");
    expect_dtype(outputs.density, DType::F32, "density");
    expect_extent(outputs.density, 0, B, "density", "batch");
    expect_extent(outputs.density, 1, H, "density", "heads");
    expect_device(outputs.density, stream);
  }
  for (const auto& [t, name, C] : {std::tuple{&outputs.q_cluster_sizes, "q_cluster_sizes", config.q_clusters},
                                   {&outputs.k_cluster_sizes, "k_cluster_sizes", config.k_clusters}}) {
    if (t->empty()) continue;
    check_size_tensor(*t, B, H, C, name, "the config's cluster count");
    expect_device(*t, stream);
  }
  return shape;
}

void attend_clusters(const TensorView& q, const TensorView& k, const TensorView& v, const Config& config,
                     const CentroidViews& centroids, const TensorView& k_sizes, Buffers& buf,
                     const Svg2Outputs& outputs, const Stream& stream) {
  const float scale = config.scale_for(q.shape[3]);
  if (config.text_tokens > 0) {
    label_text_tokens(buf.q_labels, buf.video_tokens, config.prompt_length, buf.q_video_clusters, stream);
    label_text_tokens(buf.k_labels, buf.video_tokens, config.prompt_length, buf.k_video_clusters, stream);
    apply_text_rule(buf.mask, stream);
  }
  if (config.key_shard_count > 1) shard_key_clusters(buf.mask, config.key_shard_index, config.key_shard_count, stream);
  cluster_permutation(buf.q_labels, buf.q_clusters, buf.q_perm, buf.q_offsets, stream, buf.op_scratch);
  cluster_permutation(buf.k_labels, buf.k_clusters, buf.k_perm, buf.k_offsets, stream, buf.op_scratch);
  // The attention reads Q (and K and V, unless sorted copies are made for the Hopper kernel's TMA
  // loads) through the permutations and writes O and LSE in token order: no permuted copy of Q or O
  // exists.
  const BlockLayout layout{buf.q_offsets, buf.k_offsets, buf.mask};
  const TensorView lse = config.compensate && outputs.lse.empty() ? buf.lse : outputs.lse;
  if (config.attention_dtype == AttentionDType::E4M3) {
    block_sparse_attention_e4m3(q, k, v, layout, scale, Fp8Options{}, outputs.out, lse, stream, buf.op_scratch,
                                RowPermutation{buf.q_perm, buf.k_perm});
  } else if (buf.k_sorted.empty()) {
    block_sparse_attention(q, k, v, layout, scale, outputs.out, lse, stream, buf.op_scratch,
                           RowPermutation{buf.q_perm, buf.k_perm});
  } else {
    gather_rows(k, buf.k_perm, buf.k_sorted, stream);
    gather_rows(v, buf.k_perm, buf.v_sorted, stream);
    block_sparse_attention(q, buf.k_sorted, buf.v_sorted, layout, scale, outputs.out, lse, stream, buf.op_scratch,
                           RowPermutation{buf.q_perm, TensorView{}});
  }
  // The compensation reuses the ops' scratch: the attention, its last user, ran before it on the stream.
  if (config.compensate && config.ear_split)
    corrected_centroid_compensation(q, buf.q_video_labels(), buf.video_mask(), buf.sub_k_centroids, buf.sub_v_centroids,
                                    buf.sub_sizes, buf.spread, buf.pair_values, scale, outputs.out, lse, stream,
                                    buf.op_scratch);
  else if (config.compensate && (config.ear_spread || config.ear_pair_values))
    corrected_centroid_compensation(q, buf.q_video_labels(), buf.video_mask(), centroids.k, buf.v_centroids, k_sizes,
                                    buf.spread, buf.pair_values, scale, outputs.out, lse, stream, buf.op_scratch);
  else if (config.compensate)
    centroid_compensation(q, buf.q_video_labels(), buf.video_mask(), centroids.k, buf.v_centroids, k_sizes, scale,
                          outputs.out, lse, stream, buf.op_scratch);
  if (!outputs.density.empty()) block_density(layout, outputs.density, stream);
}

void cluster(const TensorView& q, const TensorView& k, const Config& config, const CentroidViews& centroids,
             bool initialize, Buffers& buf, const TensorView& q_sizes, const TensorView& k_sizes,
             const Stream& stream) {
  const TensorView qv = q.slice(2, 0, buf.video_tokens), kv = k.slice(2, 0, buf.video_tokens);
  int iters = config.kmeans_iters_step;
  if (initialize) {
    // Different streams of the seed for Q and K, so their samples are independent.
    const uint64_t q_seed = config.seed, k_seed = key_sample_seed(config.seed);
    if (config.kmeans_seeding == KMeansSeeding::GreedyPP) {
      const int factor = config.kmeans_sample_factor;
      kmeans_seed_greedy(qv, centroids.q, q_seed, factor, stream, buf.op_scratch, centroids.sample_ids);
      kmeans_seed_greedy(kv, centroids.k, k_seed, factor, stream, buf.op_scratch, centroids.sample_ids);
    } else {
      kmeans_init(qv, centroids.q, q_seed, stream, buf.op_scratch, centroids.sample_ids);
      kmeans_init(kv, centroids.k, k_seed, stream, buf.op_scratch, centroids.sample_ids);
    }
    iters = config.kmeans_iters_init;
  }
  // With candidates, the iterations after the first two of a first call (one of a warm call) assign
  // each point among its previous label's nearest centroids (docs/cuda.md, "Candidate assignment").
  const int m = config.kmeans_candidates;
  const int full = m > 0 ? std::min(iters, initialize ? 2 : 1) : iters;
  const auto lloyd = [&](const TensorView& x, const TensorView& c, const TensorView& labels, const TensorView& sizes) {
    kmeans(x, c, labels, sizes, full, stream, buf.op_scratch);
    for (int it = full; it < iters; ++it) {
      kmeans_assign_candidates(x, c, labels, labels, m, stream, buf.op_scratch);
      kmeans_update(x, labels, c, sizes, stream, buf.op_scratch);
    }
  };
  lloyd(qv, centroids.q, buf.q_video_labels(), q_sizes);
  lloyd(kv, centroids.k, buf.k_video_labels(), k_sizes);
  if (initialize) order_clusters(centroids.k, k_sizes, buf.k_video_labels(), stream, buf.op_scratch);
}

void probe(const TensorView& k, const TensorView& v, const Config& config, const CentroidViews& centroids,
           const TensorView& q_sizes, const TensorView& k_sizes, Buffers& buf, const Stream& stream) {
  const bool error_aware = config.routing == Routing::ErrorAware;
  const float scale = config.scale_for(k.shape[3]);
  if (!buf.probs.empty()) centroid_probs(centroids.q, centroids.k, k_sizes, scale, buf.probs, stream);
  if (!error_aware && !config.compensate) return;
  const TensorView kv = k.slice(2, 0, buf.video_tokens), vv = v.slice(2, 0, buf.video_tokens);
  cluster_means(vv, buf.k_video_labels(), buf.v_centroids, stream, buf.op_scratch);
  if (error_aware && config.ear_split) {
    // Routing scores from the key clusters; the compensation's corrections from their halves.
    ear_plus_probe(centroids.q, centroids.k, buf.v_centroids, kv, vv, buf.k_video_labels(), q_sizes, k_sizes, scale,
                   config.ear_gamma, buf.scores, {}, {}, stream, buf.op_scratch);
    const TensorView sub_labels = buf.sub_labels.slice(2, 0, buf.video_tokens);
    split_clusters(kv, buf.k_video_labels(), centroids.k, sub_labels, buf.sub_sizes, stream, buf.op_scratch);
    cluster_means(kv, sub_labels, buf.sub_k_centroids, stream, buf.op_scratch);
    cluster_means(vv, sub_labels, buf.sub_v_centroids, stream, buf.op_scratch);
    if (!buf.sub_scores.empty())
      ear_plus_probe(centroids.q, buf.sub_k_centroids, buf.sub_v_centroids, kv, vv, sub_labels, q_sizes, buf.sub_sizes,
                     scale, config.ear_gamma, buf.sub_scores, buf.spread, buf.pair_values, stream, buf.op_scratch);
  } else if (error_aware && config.ear_plus())
    ear_plus_probe(centroids.q, centroids.k, buf.v_centroids, kv, vv, buf.k_video_labels(), q_sizes, k_sizes, scale,
                   config.ear_gamma, buf.scores, buf.spread, buf.pair_values, stream, buf.op_scratch);
  else if (error_aware)
    ear_probe(centroids.q, centroids.k, buf.v_centroids, kv, vv, buf.k_video_labels(), q_sizes, k_sizes, scale,
              config.ear_gamma, buf.scores, stream, buf.op_scratch);
}

void select(const Config& config, const CentroidViews& centroids, const TensorView& q_sizes, const TensorView& k_sizes,
            Buffers& buf, const Stream& stream) {
  const bool error_aware = config.routing == Routing::ErrorAware;
  if (!error_aware && config.density == 0.0f) {
    select_blocks(centroids.q, centroids.k, k_sizes, config.scale_for(centroids.q.shape[3]), config.top_p,
                  config.min_kept_clusters(), buf.video_mask(), stream);
    return;
  }
  // SVG2's rule on its weights (select_top_p on them is select_blocks' exact kernel), at top_p or at
  // the top-p that meets the density; for EAR it is the budget.
  const TensorView svg2_mask = error_aware ? buf.budget_mask : buf.video_mask();
  if (config.density > 0.0f) {
    select_top_p_at_density(buf.probs, q_sizes, k_sizes, config.density, config.min_kept_clusters(), svg2_mask, stream,
                            buf.op_scratch);
  } else {
    select_top_p(buf.probs, config.top_p, config.min_kept_clusters(), svg2_mask, stream);
  }
  if (error_aware && config.ear_head_budget)
    select_error_aware_per_head(buf.probs, buf.budget_mask, buf.scores, q_sizes, k_sizes,
                                config.ear_guaranteed_clusters(), buf.video_mask(), stream, buf.op_scratch);
  else if (error_aware)
    select_error_aware(buf.probs, buf.budget_mask, buf.scores, q_sizes, k_sizes, config.ear_guaranteed_clusters(),
                       buf.video_mask(), stream);
}

void check_centroids(const CentroidViews& centroids, const AttentionShape& shape, const Config& config,
                     const Stream& stream) {
  using namespace checks;
  for (const auto& [t, name, C] :
       {std::tuple{&centroids.q, "q_centroids", config.q_clusters}, {&centroids.k, "k_centroids", config.k_clusters}}) {
    expect_rank(*t, 4, name);
    expect_dtype(*t, DType::F32, name);
    expect_contiguous(*t, name);
    expect_extent(*t, 0, shape.batch, name, "batch");
    expect_extent(*t, 1, shape.heads, name, "heads");
    expect_extent(*t, 2, C, name, "the config's cluster count");
    expect_extent(*t, 3, shape.head_dim, name, "head dim");
    expect_device(*t, stream);
  }
}

}  // namespace pipeline

size_t svg2_workspace_bytes(const AttentionShape& shape, const Config& config, DType dtype, Device device) {
  config.validate_for(shape.seq, shape.head_dim);
  return pipeline::carve(shape, config, dtype, device, nullptr, nullptr);
}

size_t svg2_workspace_bytes(const TensorView& q, const TensorView& k, const TensorView& v, const Config& config,
                            const Svg2Outputs& outputs, const Stream& stream) {
  const AttentionShape shape = pipeline::check_inputs(q, k, v, config, outputs, stream);
  return pipeline::carve(shape, config, q.dtype, stream.device, nullptr, nullptr);
}

void svg2_attention(const TensorView& q, const TensorView& k, const TensorView& v, const Config& config,
                    const CentroidViews& centroids, bool initialize, const Svg2Outputs& outputs, Workspace workspace,
                    const Stream& stream) {
  const AttentionShape shape = pipeline::check_inputs(q, k, v, config, outputs, stream);
  pipeline::check_centroids(centroids, shape, config, stream);
  const size_t need = pipeline::carve(shape, config, q.dtype, stream.device, nullptr, nullptr);
  SAPATTN_CHECK(workspace.bytes >= need, WorkspaceError, "svg2_attention needs ", need,
                " bytes of workspace (svg2_workspace_bytes), got ", workspace.bytes);
  if (config.check_finite) {
    check_finite(q, "q", stream);
    check_finite(k, "k", stream);
    check_finite(v, "v", stream);
  }
  pipeline::Buffers buf;
  pipeline::carve(shape, config, q.dtype, stream.device, &workspace, &buf);
  // Cluster sizes go straight to the caller's outputs when asked for.
  const TensorView q_sizes = outputs.q_cluster_sizes.empty() ? buf.q_sizes : outputs.q_cluster_sizes;
  const TensorView k_sizes = outputs.k_cluster_sizes.empty() ? buf.k_sizes : outputs.k_cluster_sizes;
  pipeline::cluster(q, k, config, centroids, initialize, buf, q_sizes, k_sizes, stream);
  pipeline::probe(k, v, config, centroids, q_sizes, k_sizes, buf, stream);
  pipeline::select(config, centroids, q_sizes, k_sizes, buf, stream);
  if (config.round_q_clusters)  // rewrites the video query labels and q_sizes; centroids and mask stay
    round_query_clusters(q.slice(2, 0, buf.video_tokens), centroids.q, centroids.k, k_sizes, buf.video_mask(),
                         config.scale_for(q.shape[3]), RoundQueryOptions{}, buf.q_video_labels(), q_sizes, stream,
                         buf.op_scratch);
  pipeline::attend_clusters(q, k, v, config, centroids, k_sizes, buf, outputs, stream);
}

void svg2_attention(const TensorView& q, const TensorView& k, const TensorView& v, const Config& config,
                    BranchState& state, const Svg2Outputs& outputs, Workspace workspace, const Stream& stream) {
  const AttentionShape shape = pipeline::check_inputs(q, k, v, config, outputs, stream);
  if (state.initialized()) {
    const std::vector<int64_t> q_shape{shape.batch, shape.heads, config.q_clusters, shape.head_dim};
    const std::vector<int64_t> k_shape{shape.batch, shape.heads, config.k_clusters, shape.head_dim};
    SAPATTN_CHECK(state.q_centroids.shape() == q_shape && state.k_centroids.shape() == k_shape &&
                      state.q_centroids.device() == stream.device,
                  InvalidArgumentError, "this branch state caches centroids for another shape or device (",
                  state.q_centroids.view().describe(), " / ", state.k_centroids.view().describe(),
                  "); call LayerState::reset() when the batch, heads, head dim or cluster counts change");
  }
  // A fresh branch gets its centroids only once the call is known to be valid.
  BranchState fresh;
  BranchState& target = state.initialized() ? state : fresh;
  if (!state.initialized()) {
    fresh.q_centroids =
        Tensor(DType::F32, {shape.batch, shape.heads, config.q_clusters, shape.head_dim}, stream.device);
    fresh.k_centroids =
        Tensor(DType::F32, {shape.batch, shape.heads, config.k_clusters, shape.head_dim}, stream.device);
  }
  svg2_attention(q, k, v, config, target.views(), !state.initialized(), outputs, workspace, stream);
  if (!state.initialized()) {
    state.q_centroids = std::move(fresh.q_centroids);
    state.k_centroids = std::move(fresh.k_centroids);
  }
  ++state.calls;
}

void svg2_attention(const TensorView& q, const TensorView& k, const TensorView& v, const Config& config,
                    BranchState& state, const Svg2Outputs& outputs, const Stream& stream) {
  const Buffer scratch = Buffer::allocate(svg2_workspace_bytes(q, k, v, config, outputs, stream), stream.device);
  svg2_attention(q, k, v, config, state, outputs, Workspace{scratch.data(), scratch.bytes()}, stream);
}

}  // namespace sapattn
