// round_query_clusters (include/sapattn/ops.hpp): the argument checks, then the CPU backend. It has
// no CUDA version yet: a CUDA stream (or tensor) gets UnsupportedError, in a CUDA build too, as the
// ear-plus ops of src/ops/ear.cpp do.
#include <cmath>

#include "ops/checks.hpp"
#include "ops/dispatch.hpp"
#include "sapattn/ops.hpp"

namespace sapattn {

using namespace checks;    // the argument checks of src/ops/
using namespace dispatch;  // backend(), cpu_threads()

void round_query_clusters(const TensorView& q, const TensorView& q_centroids, const TensorView& k_centroids,
                          const TensorView& k_sizes, const TensorView& mask, float scale,
                          const RoundQueryOptions& options, TensorView labels, TensorView sizes,
                          const Stream& stream) {
  SAPATTN_CHECK(options.slack >= 0 && options.slack < 64, InvalidArgumentError, "slack must be in [0, 63], got ",
                options.slack);
  SAPATTN_CHECK(!std::isnan(options.max_cost), InvalidArgumentError, "max_cost must not be NaN");
  SAPATTN_CHECK(options.prefilter >= 0, InvalidArgumentError, "prefilter must be >= 0, got ", options.prefilter);
  SAPATTN_CHECK(options.rounds >= 1, InvalidArgumentError, "rounds must be >= 1, got ", options.rounds);
  SAPATTN_CHECK(options.candidates >= 1, InvalidArgumentError, "candidates must be >= 1, got ", options.candidates);
  check_centroid_scores(q_centroids, k_centroids, k_sizes, scale);
  expect_rank(q, 4, "q");
  expect_floating(q, "q");
  expect_extent(q, 0, q_centroids.shape[0], "q", "batch of q_centroids");
  expect_extent(q, 1, q_centroids.shape[1], "q", "heads of q_centroids");
  expect_extent(q, 3, q_centroids.shape[3], "q", "head dim of q_centroids");
  SAPATTN_CHECK(q_centroids.shape[2] >= 1, ShapeError, "q_centroids: need at least one cluster, got Cq = 0");
  check_labels(labels, q);
  check_mask(mask, q_centroids.shape[0], q_centroids.shape[1], q_centroids.shape[2], k_centroids.shape[2]);
  expect_rank(sizes, 3, "sizes");
  expect_dtype(sizes, DType::I32, "sizes");
  expect_contiguous(sizes, "sizes");
  expect_extent(sizes, 0, q_centroids.shape[0], "sizes", "batch of q_centroids");
  expect_extent(sizes, 1, q_centroids.shape[1], "sizes", "heads of q_centroids");
  expect_extent(sizes, 2, q_centroids.shape[2], "sizes", "clusters of q_centroids");
  SAPATTN_CHECK(backend(stream, q, q_centroids, k_centroids, k_sizes, mask, labels, sizes) == DeviceType::CPU,
                UnsupportedError, "round_query_clusters: not yet on CUDA; run it on a CPU stream");
  cpu::round_query_clusters(q, q_centroids, k_centroids, k_sizes, mask, scale, options.slack, options.max_cost,
                            options.prefilter, options.rounds, options.candidates, labels, sizes,
                            cpu_threads(stream));
}

}  // namespace sapattn
