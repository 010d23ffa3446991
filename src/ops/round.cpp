// round_query_clusters and its workspace size (include/sapattn/ops.hpp): the argument checks every
// backend shares, then dispatch on the stream's device.
#include <cmath>

#include "ops/checks.hpp"
#include "ops/dispatch.hpp"
#include "sapattn/ops.hpp"

namespace sapattn {

using namespace checks;    // the argument checks of src/ops/
using namespace dispatch;  // backend(), cpu_threads(), SAPATTN_ON_CUDA

namespace {

void check_options(const RoundQueryOptions& options) {
  SAPATTN_CHECK(options.slack >= 0 && options.slack < 64, InvalidArgumentError, "slack must be in [0, 63], got ",
                options.slack);
  SAPATTN_CHECK(!std::isnan(options.max_cost), InvalidArgumentError, "max_cost must not be NaN");
  SAPATTN_CHECK(options.prefilter >= 0, InvalidArgumentError, "prefilter must be >= 0, got ", options.prefilter);
  SAPATTN_CHECK(options.rounds >= 1, InvalidArgumentError, "rounds must be >= 1, got ", options.rounds);
  SAPATTN_CHECK(options.candidates >= 1, InvalidArgumentError, "candidates must be >= 1, got ", options.candidates);
}

}  // namespace

size_t round_query_clusters_workspace_bytes(int64_t batch_heads, int64_t points, int64_t q_clusters,
                                            int64_t k_clusters, const RoundQueryOptions& options, Device device) {
  SAPATTN_CHECK(batch_heads >= 0 && points >= 0 && q_clusters >= 0 && k_clusters >= 0, InvalidArgumentError,
                "round_query_clusters_workspace_bytes: negative size");
  check_options(options);
  if (device.type == DeviceType::CPU) return 0;  // the CPU backend needs no scratch
  return SAPATTN_ON_CUDA(round_query_clusters_workspace_bytes(batch_heads, points, q_clusters, k_clusters,
                                                             options.slack, options.prefilter, options.candidates));
}

void round_query_clusters(const TensorView& q, const TensorView& q_centroids, const TensorView& k_centroids,
                          const TensorView& k_sizes, const TensorView& mask, float scale,
                          const RoundQueryOptions& options, TensorView labels, TensorView sizes, const Stream& stream,
                          Workspace workspace) {
  check_options(options);
  check_centroid_scores(q_centroids, k_centroids, k_sizes, scale);
  check_points_centroids(q, q_centroids, "q", "q_centroids");
  check_labels(labels, q);
  check_mask(mask, q_centroids.shape[0], q_centroids.shape[1], q_centroids.shape[2], k_centroids.shape[2]);
  check_sizes(sizes, q_centroids, "sizes", "q_centroids");
  if (backend(stream, q, q_centroids, k_centroids, k_sizes, mask, labels, sizes) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(round_query_clusters(q, q_centroids, k_centroids, k_sizes, mask, scale, options.slack,
                                                options.max_cost, options.prefilter, options.rounds,
                                                options.candidates, labels, sizes, stream, workspace));
  cpu::round_query_clusters(q, q_centroids, k_centroids, k_sizes, mask, scale, options.slack, options.max_cost,
                            options.prefilter, options.rounds, options.candidates, labels, sizes,
                            cpu_threads(stream));
}

}  // namespace sapattn
