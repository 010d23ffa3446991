// The k-means ops of include/sapattn/ops.hpp (kmeans_init, kmeans_seed_greedy, kmeans_assign,
// kmeans_assign_candidates, kmeans_update, kmeans, order_clusters and their workspace sizes): the
// argument checks every backend shares, then dispatch on the stream's device.
#include "sapattn/ops.hpp"

#include "core/kmeans_seeding.hpp"
#include "ops/checks.hpp"
#include "ops/dispatch.hpp"

namespace sapattn {

using namespace checks;    // the argument checks of src/ops/
using namespace dispatch;  // backend(), cpu_threads(), SAPATTN_ON_CUDA

size_t kmeans_workspace_bytes(int64_t batch_heads, int64_t points, int64_t clusters, int64_t dim, Device device) {
  SAPATTN_CHECK(batch_heads >= 0 && points >= 0 && clusters >= 0 && dim >= 0, InvalidArgumentError,
                "kmeans_workspace_bytes: negative size");
  switch (device.type) {
    case DeviceType::CPU:
      return 0;  // the CPU backend needs no scratch
    case DeviceType::CUDA:
#if SAPATTN_HAS_CUDA
      return cuda::kmeans_workspace_bytes(batch_heads, points, clusters, dim);
#else
      no_cuda_backend();
#endif
  }
  return 0;
}

namespace {

// sample_ids [B,H] i32 contiguous on the stream's device, or empty (kmeans_init, kmeans_seed_greedy).
void check_sample_ids(const TensorView& sample_ids, const TensorView& points, const Stream& stream) {
  if (sample_ids.empty()) return;
  expect_rank(sample_ids, 2, "sample_ids");
  expect_dtype(sample_ids, DType::I32, "sample_ids");
  expect_contiguous(sample_ids, "sample_ids");
  expect_extent(sample_ids, 0, points.shape[0], "sample_ids", "batch");
  expect_extent(sample_ids, 1, points.shape[1], "sample_ids", "heads");
  expect_device(sample_ids, stream);
}

// The CPU reads the ids on the host: a negative one throws (on CUDA it is the caller's contract).
const int32_t* host_sample_ids(const TensorView& sample_ids) {
  if (sample_ids.empty()) return nullptr;
  const int32_t* ids = static_cast<const int32_t*>(sample_ids.data);
  for (int64_t i = 0; i < sample_ids.numel(); ++i)
    SAPATTN_CHECK(ids[i] >= 0, InvalidArgumentError, "sample_ids[", i, "] = ", ids[i], " is negative");
  return ids;
}

void check_sample_factor(int sample_factor) {
  SAPATTN_CHECK(sample_factor >= 1, InvalidArgumentError, "kmeans_seed_greedy: sample_factor must be >= 1, got ",
                sample_factor);
}

}  // namespace

void kmeans_init(const TensorView& points, TensorView centroids, uint64_t seed, const Stream& stream,
                 Workspace workspace, const TensorView& sample_ids) {
  check_points_centroids(points, centroids);
  check_sample_ids(sample_ids, points, stream);
  if (backend(stream, points, centroids) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(kmeans_init(points, centroids, seed, stream, workspace, sample_ids));
  cpu::kmeans_init(points, centroids, seed, host_sample_ids(sample_ids), cpu_threads(stream));
}

int kmeans_greedy_trials(int64_t clusters) {
  SAPATTN_CHECK(clusters >= 1, InvalidArgumentError, "kmeans_greedy_trials: need at least one cluster, got ", clusters);
  return seeding::greedy_trials(clusters);
}

size_t kmeans_seed_greedy_workspace_bytes(int64_t batch_heads, int64_t points, int64_t clusters, int sample_factor,
                                          Device device) {
  SAPATTN_CHECK(batch_heads >= 0 && points >= 0 && clusters >= 0, InvalidArgumentError,
                "kmeans_seed_greedy_workspace_bytes: negative size");
  check_sample_factor(sample_factor);
  if (device.type == DeviceType::CPU) return 0;  // the CPU backend needs no scratch
  return SAPATTN_ON_CUDA(kmeans_seed_greedy_workspace_bytes(batch_heads, points, clusters, sample_factor));
}

void kmeans_seed_greedy(const TensorView& points, TensorView centroids, uint64_t seed, int sample_factor,
                        const Stream& stream, Workspace workspace, const TensorView& sample_ids) {
  check_points_centroids(points, centroids);
  check_sample_ids(sample_ids, points, stream);
  check_sample_factor(sample_factor);
  if (backend(stream, points, centroids) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(kmeans_seed_greedy(points, centroids, seed, sample_factor, stream, workspace, sample_ids));
  cpu::kmeans_seed_greedy(points, centroids, seed, sample_factor, host_sample_ids(sample_ids), cpu_threads(stream));
}

void kmeans_assign(const TensorView& points, const TensorView& centroids, TensorView labels, const Stream& stream,
                   Workspace workspace) {
  check_points_centroids(points, centroids);
  check_labels(labels, points);
  if (backend(stream, points, centroids, labels) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(kmeans_assign(points, centroids, labels, stream, workspace));
  cpu::kmeans_assign(points, centroids, labels, cpu_threads(stream));
}

size_t kmeans_assign_candidates_workspace_bytes(int64_t batch_heads, int64_t points, int64_t clusters, int candidates,
                                                Device device) {
  SAPATTN_CHECK(batch_heads >= 0 && points >= 0 && clusters >= 0, InvalidArgumentError,
                "kmeans_assign_candidates_workspace_bytes: negative size");
  SAPATTN_CHECK(candidates >= 1, InvalidArgumentError, "kmeans_assign_candidates: candidates must be >= 1, got ",
                candidates);
  if (device.type == DeviceType::CPU) return 0;  // the CPU backend needs no scratch
  return SAPATTN_ON_CUDA(kmeans_assign_candidates_workspace_bytes(batch_heads, points, clusters, candidates));
}

void kmeans_assign_candidates(const TensorView& points, const TensorView& centroids, const TensorView& prev_labels,
                              TensorView labels, int candidates, const Stream& stream, Workspace workspace) {
  check_points_centroids(points, centroids);
  check_labels(prev_labels, points, "prev_labels");
  check_labels(labels, points);
  SAPATTN_CHECK(candidates >= 1, InvalidArgumentError, "kmeans_assign_candidates: candidates must be >= 1, got ",
                candidates);
  if (backend(stream, points, centroids, prev_labels, labels) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(kmeans_assign_candidates(points, centroids, prev_labels, labels, candidates, stream, workspace));
  cpu::kmeans_assign_candidates(points, centroids, prev_labels, labels, candidates, cpu_threads(stream));
}

size_t order_clusters_workspace_bytes(int64_t batch_heads, int64_t clusters, int64_t dim, Device device) {
  SAPATTN_CHECK(batch_heads >= 0 && clusters >= 0 && dim >= 0, InvalidArgumentError,
                "order_clusters_workspace_bytes: negative size");
  if (device.type == DeviceType::CPU) return 0;
  return SAPATTN_ON_CUDA(order_clusters_workspace_bytes(batch_heads, clusters, dim));
}

void order_clusters(TensorView centroids, TensorView sizes, TensorView labels, const Stream& stream,
                    Workspace workspace) {
  expect_rank(centroids, 4, "centroids");
  expect_dtype(centroids, DType::F32, "centroids");
  expect_contiguous(centroids, "centroids");
  check_sizes(sizes, centroids);
  expect_rank(labels, 3, "labels");
  expect_dtype(labels, DType::I32, "labels");
  SAPATTN_CHECK(labels.stride[2] == 1, ShapeError, "labels must have unit stride along N, got ", labels.describe());
  expect_extent(labels, 0, centroids.shape[0], "labels", "batch of centroids");
  expect_extent(labels, 1, centroids.shape[1], "labels", "heads of centroids");
  if (backend(stream, centroids, sizes, labels) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(order_clusters(centroids, sizes, labels, stream, workspace));
  cpu::order_clusters(centroids, sizes, labels, cpu_threads(stream));
}

void kmeans_update(const TensorView& points, const TensorView& labels, TensorView centroids, TensorView sizes,
                   const Stream& stream, Workspace workspace) {
  check_points_centroids(points, centroids);
  check_labels(labels, points);
  check_sizes(sizes, centroids);
  if (backend(stream, points, labels, centroids, sizes) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(kmeans_update(points, labels, centroids, sizes, /*move_centroids=*/true, stream, workspace));
  cpu::kmeans_update(points, labels, centroids, sizes, /*move_centroids=*/true, cpu_threads(stream));
}

void kmeans(const TensorView& points, TensorView centroids, TensorView labels, TensorView sizes, int iters,
            const Stream& stream, Workspace workspace) {
  SAPATTN_CHECK(iters >= 0, InvalidArgumentError, "k-means iterations must be >= 0, got ", iters);
  check_points_centroids(points, centroids);
  check_labels(labels, points);
  check_sizes(sizes, centroids);
  if (backend(stream, points, centroids, labels, sizes) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(kmeans(points, centroids, labels, sizes, iters, stream, workspace));
  const int threads = cpu_threads(stream);
  if (iters == 0) {
    cpu::kmeans_assign(points, centroids, labels, threads);
    cpu::kmeans_update(points, labels, centroids, sizes, /*move_centroids=*/false, threads);
    return;
  }
  for (int it = 0; it < iters; ++it) {
    cpu::kmeans_assign(points, centroids, labels, threads);
    cpu::kmeans_update(points, labels, centroids, sizes, /*move_centroids=*/true, threads);
  }
}

}  // namespace sapattn
