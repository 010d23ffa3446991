// The SVG-EAR and ear-plus ops of include/sapattn/ops.hpp (docs/ear.md): the argument checks every
// backend shares, then dispatch on the stream's device.
#include "sapattn/ops.hpp"

#include <cmath>
#include <utility>

#include "ops/checks.hpp"
#include "ops/dispatch.hpp"

namespace sapattn {

using namespace checks;    // the argument checks of src/ops/
using namespace dispatch;  // backend(), cpu_threads(), SAPATTN_ON_CUDA

size_t ear_workspace_bytes(int64_t batch_heads, int64_t tokens, int64_t q_clusters, int64_t k_clusters, int64_t dim,
                           Device device) {
  SAPATTN_CHECK(batch_heads >= 0 && tokens >= 0 && q_clusters >= 0 && k_clusters >= 0 && dim >= 0, InvalidArgumentError,
                "ear_workspace_bytes: negative size");
  if (device.type == DeviceType::CPU) return 0;  // the CPU backend needs no scratch
  return SAPATTN_ON_CUDA(ear_workspace_bytes(batch_heads, tokens, q_clusters, k_clusters, dim));
}

size_t compensation_workspace_bytes(int64_t batch_heads, int64_t tokens, int64_t q_clusters, int64_t pseudo_keys,
                                    int64_t dim, Device device) {
  SAPATTN_CHECK(batch_heads >= 0 && tokens >= 0 && q_clusters >= 0 && pseudo_keys >= 0 && dim >= 0,
                InvalidArgumentError, "compensation_workspace_bytes: negative size");
  if (device.type == DeviceType::CPU) return 0;  // the CPU backend needs no scratch
  return SAPATTN_ON_CUDA(compensation_workspace_bytes(batch_heads, tokens, q_clusters, pseudo_keys, dim));
}

size_t ear_plus_workspace_bytes(int64_t batch_heads, int64_t tokens, int64_t q_clusters, int64_t k_clusters,
                                Device device) {
  SAPATTN_CHECK(batch_heads >= 0 && tokens >= 0 && q_clusters >= 0 && k_clusters >= 0, InvalidArgumentError,
                "ear_plus_workspace_bytes: negative size");
  if (device.type == DeviceType::CPU) return 0;  // the CPU backend needs no scratch
  return SAPATTN_ON_CUDA(ear_plus_workspace_bytes(batch_heads, tokens, q_clusters, k_clusters));
}

void cluster_means(const TensorView& points, const TensorView& labels, TensorView means, const Stream& stream,
                   Workspace workspace) {
  check_points_centroids(points, means);
  check_labels(labels, points);
  if (backend(stream, points, labels, means) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(cluster_means(points, labels, means, stream, workspace));
  cpu::cluster_means(points, labels, means, cpu_threads(stream));
}

void centroid_probs(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& k_sizes,
                    float scale, TensorView probs, const Stream& stream) {
  check_centroid_scores(q_centroids, k_centroids, k_sizes, scale);
  check_pair_matrix(probs, q_centroids.shape[0], q_centroids.shape[1], q_centroids.shape[2], k_centroids.shape[2],
                    "probs");
  if (backend(stream, q_centroids, k_centroids, k_sizes, probs) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(centroid_probs(q_centroids, k_centroids, k_sizes, scale, probs, stream));
  cpu::centroid_probs(q_centroids, k_centroids, k_sizes, scale, probs, cpu_threads(stream));
}

namespace {

// The arguments ear_probe and ear_plus_probe share.
void check_probe(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& v_centroids,
                 const TensorView& k, const TensorView& v, const TensorView& k_labels, const TensorView& q_sizes,
                 const TensorView& k_sizes, float scale, float gamma, const TensorView& scores) {
  check_centroid_scores(q_centroids, k_centroids, k_sizes, scale);
  SAPATTN_CHECK(std::isfinite(gamma) && gamma >= 0.0f, InvalidArgumentError, "gamma must be finite and >= 0, got ",
                gamma);
  check_points_centroids(k, k_centroids);
  check_points_centroids(v, v_centroids);
  expect_extent(v_centroids, 2, k_centroids.shape[2], "v_centroids", "clusters of k_centroids");
  for (int d = 0; d < 4; ++d) expect_extent(v, d, k.shape[d], "v", "the extent of k");
  check_labels(k_labels, k);
  check_sizes(q_sizes, q_centroids);
  const int64_t B = q_centroids.shape[0], H = q_centroids.shape[1];
  check_pair_matrix(scores, B, H, q_centroids.shape[2], k_centroids.shape[2], "scores");
}

}  // namespace

void ear_probe(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& v_centroids,
               const TensorView& k, const TensorView& v, const TensorView& k_labels, const TensorView& q_sizes,
               const TensorView& k_sizes, float scale, float gamma, TensorView scores, const Stream& stream,
               Workspace workspace) {
  check_probe(q_centroids, k_centroids, v_centroids, k, v, k_labels, q_sizes, k_sizes, scale, gamma, scores);
  if (backend(stream, q_centroids, k_centroids, v_centroids, k, v, k_labels, q_sizes, k_sizes, scores) ==
      DeviceType::CUDA)
    return SAPATTN_ON_CUDA(ear_probe(q_centroids, k_centroids, v_centroids, k, v, k_labels, q_sizes, k_sizes, scale,
                                     gamma, scores, stream, workspace));
  cpu::ear_probe(q_centroids, k_centroids, v_centroids, k, v, k_labels, q_sizes, k_sizes, scale, gamma, scores,
                 cpu_threads(stream));
}

namespace {

// The arguments select_error_aware and select_error_aware_per_head share.
void check_routing(const TensorView& probs, const TensorView& budget_mask, const TensorView& scores,
                   const TensorView& q_sizes, const TensorView& k_sizes, int guaranteed, const TensorView& mask) {
  SAPATTN_CHECK(guaranteed >= 0, InvalidArgumentError, "guaranteed must be >= 0, got ", guaranteed);
  expect_rank(probs, 4, "probs");
  const int64_t B = probs.shape[0], H = probs.shape[1], R = probs.shape[2], C = probs.shape[3];
  check_pair_matrix(probs, B, H, R, C, "probs");
  check_pair_matrix(scores, B, H, R, C, "scores");
  check_mask(budget_mask, B, H, R, C);
  check_mask(mask, B, H, R, C);
  check_cluster_sizes(q_sizes, k_sizes, B, H, R, C);
}

}  // namespace

void select_error_aware(const TensorView& probs, const TensorView& budget_mask, const TensorView& scores,
                        const TensorView& q_sizes, const TensorView& k_sizes, int guaranteed, TensorView mask,
                        const Stream& stream) {
  check_routing(probs, budget_mask, scores, q_sizes, k_sizes, guaranteed, mask);
  if (backend(stream, probs, budget_mask, scores, q_sizes, k_sizes, mask) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(select_error_aware(probs, budget_mask, scores, q_sizes, k_sizes, guaranteed, mask, stream));
  cpu::select_error_aware(probs, budget_mask, scores, q_sizes, k_sizes, guaranteed, mask, cpu_threads(stream));
}

namespace {

// The arguments centroid_compensation and corrected_centroid_compensation share.
// sub_centroids: k_centroids may hold several pseudo-keys per mask column (a whole multiple).
void check_compensation(const TensorView& q, const TensorView& q_labels, const TensorView& mask,
                        const TensorView& k_centroids, const TensorView& v_centroids, const TensorView& k_sizes,
                        float scale, const TensorView& out, const TensorView& lse, bool sub_centroids = false) {
  check_scale(scale);
  for (const auto& [t, name] : {std::pair{&q, "q"}, {&out, "out"}}) {
    expect_rank(*t, 4, name);
    expect_floating(*t, name);
  }
  for (int d = 0; d < 4; ++d) expect_extent(out, d, q.shape[d], "out", "the extent of q");
  expect_rank(lse, 3, "lse");
  expect_dtype(lse, DType::F32, "lse");
  for (int d = 0; d < 3; ++d) expect_extent(lse, d, q.shape[d], "lse", "the extent of q");
  expect_rank(q_labels, 3, "q_labels");
  expect_dtype(q_labels, DType::I32, "q_labels");
  SAPATTN_CHECK(q_labels.stride[2] == 1, ShapeError, "q_labels must have unit stride along N, got ",
                q_labels.describe());
  expect_extent(q_labels, 0, q.shape[0], "q_labels", "batch of q");
  expect_extent(q_labels, 1, q.shape[1], "q_labels", "heads of q");
  SAPATTN_CHECK(q_labels.shape[2] <= q.shape[2], ShapeError, "q_labels covers ", q_labels.shape[2],
                " tokens, more than the ", q.shape[2], " rows of q");
  for (const auto& [t, name] : {std::pair{&k_centroids, "k_centroids"}, {&v_centroids, "v_centroids"}}) {
    expect_rank(*t, 4, name);
    expect_dtype(*t, DType::F32, name);
    expect_contiguous(*t, name);
    expect_extent(*t, 0, q.shape[0], name, "batch of q");
    expect_extent(*t, 1, q.shape[1], name, "heads of q");
    expect_extent(*t, 3, q.shape[3], name, "head dim of q");
  }
  expect_extent(v_centroids, 2, k_centroids.shape[2], "v_centroids", "clusters of k_centroids");
  check_sizes(k_sizes, k_centroids);
  expect_rank(mask, 4, "mask");
  const int64_t Ck = k_centroids.shape[2];
  if (sub_centroids)
    SAPATTN_CHECK(mask.shape[3] >= 1 && Ck % mask.shape[3] == 0, ShapeError, "k_centroids holds ", Ck,
                  " pseudo-keys, not a whole multiple of the mask's ", mask.shape[3], " key clusters");
  check_mask(mask, q.shape[0], q.shape[1], mask.shape[2], sub_centroids ? mask.shape[3] : Ck);
}

}  // namespace

void centroid_compensation(const TensorView& q, const TensorView& q_labels, const TensorView& mask,
                           const TensorView& k_centroids, const TensorView& v_centroids, const TensorView& k_sizes,
                           float scale, TensorView out, TensorView lse, const Stream& stream, Workspace workspace) {
  check_compensation(q, q_labels, mask, k_centroids, v_centroids, k_sizes, scale, out, lse);
  if (backend(stream, q, q_labels, mask, k_centroids, v_centroids, k_sizes, out, lse) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(centroid_compensation(q, q_labels, mask, k_centroids, v_centroids, k_sizes, scale, out, lse,
                                                 stream, workspace));
  cpu::centroid_compensation(q, q_labels, mask, k_centroids, v_centroids, k_sizes, scale, out, lse,
                             cpu_threads(stream));
}

namespace {

// The probe's optional outputs for Cq x Ck cluster pairs of head dim D: spread [B,H,Cq,Ck] f32,
// pair_values [B,H,Cq*Ck,D] f32 contiguous; either may be empty.
void check_probe_corrections(const TensorView& spread, const TensorView& pair_values, int64_t B, int64_t H, int64_t Cq,
                             int64_t Ck, int64_t D) {
  if (!spread.empty()) check_pair_matrix(spread, B, H, Cq, Ck, "spread");
  if (pair_values.empty()) return;
  expect_rank(pair_values, 4, "pair_values");
  expect_dtype(pair_values, DType::F32, "pair_values");
  expect_contiguous(pair_values, "pair_values");
  expect_extent(pair_values, 0, B, "pair_values", "batch");
  expect_extent(pair_values, 1, H, "pair_values", "heads");
  expect_extent(pair_values, 2, Cq * Ck, "pair_values", "query clusters x key clusters ([B,H,Cq*Ck,D])");
  expect_extent(pair_values, 3, D, "pair_values", "head dim");
}

}  // namespace

void ear_plus_probe(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& v_centroids,
                    const TensorView& k, const TensorView& v, const TensorView& k_labels, const TensorView& q_sizes,
                    const TensorView& k_sizes, float scale, float gamma, TensorView scores, TensorView spread,
                    TensorView pair_values, const Stream& stream, Workspace workspace) {
  check_probe(q_centroids, k_centroids, v_centroids, k, v, k_labels, q_sizes, k_sizes, scale, gamma, scores);
  check_probe_corrections(spread, pair_values, q_centroids.shape[0], q_centroids.shape[1], q_centroids.shape[2],
                          k_centroids.shape[2], k.shape[3]);
  for (const TensorView* t : {&spread, &pair_values})
    if (!t->empty()) expect_device(*t, stream);
  if (backend(stream, q_centroids, k_centroids, v_centroids, k, v, k_labels, q_sizes, k_sizes, scores) ==
      DeviceType::CUDA)
    return SAPATTN_ON_CUDA(ear_plus_probe(q_centroids, k_centroids, v_centroids, k, v, k_labels, q_sizes, k_sizes,
                                          scale, gamma, scores, spread, pair_values, stream, workspace));
  cpu::ear_plus_probe(q_centroids, k_centroids, v_centroids, k, v, k_labels, q_sizes, k_sizes, scale, gamma, scores,
                      spread, pair_values, cpu_threads(stream));
}

void select_error_aware_per_head(const TensorView& probs, const TensorView& budget_mask, const TensorView& scores,
                                 const TensorView& q_sizes, const TensorView& k_sizes, int guaranteed, TensorView mask,
                                 const Stream& stream, Workspace workspace) {
  check_routing(probs, budget_mask, scores, q_sizes, k_sizes, guaranteed, mask);
  if (backend(stream, probs, budget_mask, scores, q_sizes, k_sizes, mask) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(
        select_error_aware_per_head(probs, budget_mask, scores, q_sizes, k_sizes, guaranteed, mask, stream, workspace));
  cpu::select_error_aware_per_head(probs, budget_mask, scores, q_sizes, k_sizes, guaranteed, mask, cpu_threads(stream));
}

void split_clusters(const TensorView& points, const TensorView& labels, const TensorView& centroids,
                    TensorView sub_labels, TensorView sub_sizes, const Stream& stream, Workspace workspace) {
  const int64_t C = check_points_centroids(points, centroids);
  check_labels(labels, points);
  check_labels(sub_labels, points);
  expect_rank(sub_sizes, 3, "sub_sizes");
  expect_dtype(sub_sizes, DType::I32, "sub_sizes");
  expect_contiguous(sub_sizes, "sub_sizes");
  expect_extent(sub_sizes, 0, points.shape[0], "sub_sizes", "batch of points");
  expect_extent(sub_sizes, 1, points.shape[1], "sub_sizes", "heads of points");
  expect_extent(sub_sizes, 2, 2 * C, "sub_sizes", "twice the clusters of centroids");
  if (backend(stream, points, labels, centroids, sub_labels, sub_sizes) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(split_clusters(points, labels, centroids, sub_labels, sub_sizes, stream, workspace));
  cpu::split_clusters(points, labels, centroids, sub_labels, sub_sizes, cpu_threads(stream));
}

void corrected_centroid_compensation(const TensorView& q, const TensorView& q_labels, const TensorView& mask,
                                     const TensorView& k_centroids, const TensorView& v_centroids,
                                     const TensorView& k_sizes, const TensorView& spread, const TensorView& pair_values,
                                     float scale, TensorView out, TensorView lse, const Stream& stream,
                                     Workspace workspace) {
  check_compensation(q, q_labels, mask, k_centroids, v_centroids, k_sizes, scale, out, lse, true);
  check_probe_corrections(spread, pair_values, q.shape[0], q.shape[1], mask.shape[2], k_centroids.shape[2], q.shape[3]);
  for (const TensorView* t : {&spread, &pair_values})
    if (!t->empty()) expect_device(*t, stream);
  if (backend(stream, q, q_labels, mask, k_centroids, v_centroids, k_sizes, out, lse) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(corrected_centroid_compensation(q, q_labels, mask, k_centroids, v_centroids, k_sizes, spread,
                                                           pair_values, scale, out, lse, stream, workspace));
  cpu::corrected_centroid_compensation(q, q_labels, mask, k_centroids, v_centroids, k_sizes, spread, pair_values, scale,
                                       out, lse, cpu_threads(stream));
}

}  // namespace sapattn
