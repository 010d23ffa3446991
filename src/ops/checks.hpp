// Argument checks shared by the op entry points (src/ops/, src/svg2/). Each throws the
// typed error the contract names, with the tensor's name and what was expected.
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <tuple>
#include <utility>

#include "sapattn/error.hpp"
#include "sapattn/tensor.hpp"

namespace sapattn::checks {

inline void expect_rank(const TensorView& t, int rank, const char* name) {
  SAPATTN_CHECK(t.data != nullptr || t.numel() == 0, ShapeError, name, ": null data pointer");
  SAPATTN_CHECK(t.rank == rank, ShapeError, name, " must have rank ", rank, ", got ", t.describe());
  for (int d = 0; d < t.rank; ++d)
    SAPATTN_CHECK(t.shape[d] >= 0, ShapeError, name, " has a negative extent: ", t.describe());
}

inline void expect_dtype(const TensorView& t, DType dtype, const char* name) {
  SAPATTN_CHECK(t.dtype == dtype, DTypeError, name, " must be ", dtype_name(dtype), ", got ", t.describe());
}

inline void expect_floating(const TensorView& t, const char* name) {
  SAPATTN_CHECK(is_floating(t.dtype), DTypeError, name, " must be f32, f16 or bf16, got ", t.describe());
}

inline void expect_contiguous(const TensorView& t, const char* name) {
  SAPATTN_CHECK(t.is_contiguous(), ShapeError, name, " must be contiguous, got strides of ", t.describe());
}

// With `of`, the extent is named "<what> of <of>" (the tensor it must match).
inline void expect_extent(const TensorView& t, int dim, int64_t extent, const char* name, const char* what,
                          const char* of = nullptr) {
  SAPATTN_CHECK(t.shape[dim] == extent, ShapeError, name, " dim ", t.caller_dim(dim), " must be ", extent, " (", what,
                of != nullptr ? " of " : "", of != nullptr ? of : "", "), got ", t.describe());
}

// t of `rank` and `dtype`, contiguous, with each of `dims` (a dim and its name) as in ref:
// "sizes dim 1 must be 2 (heads of centroids), got ...".
inline void expect_contiguous_along(const TensorView& t, int rank, DType dtype, const char* name, const TensorView& ref,
                                    const char* ref_name, std::initializer_list<std::pair<int, const char*>> dims) {
  expect_rank(t, rank, name);
  expect_dtype(t, dtype, name);
  expect_contiguous(t, name);
  for (const auto& [dim, what] : dims) expect_extent(t, dim, ref.shape[dim], name, what, ref_name);
}

// Attention tensors [B,H,S,D]: t's logical dim `dim` must equal ref's. The message names the dim as
// the caller's layout does: "k dim 1 (S of [B,S,H,D]) must be 256 as in q, got [1,100,2,64] f32 cpu".
inline void expect_extent_of(const TensorView& t, int dim, const char* name, const TensorView& ref,
                             const char* ref_name) {
  SAPATTN_CHECK(t.shape[dim] == ref.shape[dim], ShapeError, name, " dim ", t.caller_dim(dim), " (", "BHSD"[dim], " of ",
                t.dim_names(), ") must be ", ref.shape[dim], " as in ", ref_name, ", got ", t.describe());
}

// t is contiguous, of `dtype`, with the extents `shape` (its rank); an extent of -1 takes any size.
// `what` says where the extents come from ("B, H, S of x").
inline void expect_contiguous_tensor(const TensorView& t, DType dtype, std::initializer_list<int64_t> shape,
                                     const char* name, const char* what) {
  expect_rank(t, static_cast<int>(shape.size()), name);
  expect_dtype(t, dtype, name);
  expect_contiguous(t, name);
  int d = 0;
  for (const int64_t extent : shape) {
    if (extent >= 0) expect_extent(t, d, extent, name, what);
    ++d;
  }
}

// An attention input with a zero extent has nothing to attend: say so before any other check
// reads its extents (a sequence of 0 tokens would otherwise surface as a text-token error).
inline void expect_nonempty(const TensorView& t, const char* name) {
  SAPATTN_CHECK(t.numel() > 0, ShapeError, name, " is empty (", t.describe(), " as ", t.dim_names(),
                "): attention needs B, S, H and D >= 1");
}

inline void expect_device(const TensorView& t, const Stream& s) {
  SAPATTN_CHECK(t.device == s.device, UnsupportedError, "tensor ", t.describe(), " is not on the stream's device ",
                to_string(s.device));
}

// ---------------------------------------------------------------------------------------------
// Arguments that ops of several families of ops.hpp share (k-means, selection, attention, SVG-EAR).
// ---------------------------------------------------------------------------------------------

// Checks points [B,H,N,D] floating, centroids [B,H,C,D] f32 contiguous; returns C. The names are
// the caller's arguments' (round_query_clusters: "q", "q_centroids").
inline int64_t check_points_centroids(const TensorView& points, const TensorView& centroids,
                                      const char* points_name = "points", const char* centroids_name = "centroids") {
  expect_rank(points, 4, points_name);
  expect_floating(points, points_name);
  SAPATTN_CHECK(points.shape[2] >= 1, ShapeError, points_name, ": need at least one point per (b,h), got N = 0");
  expect_contiguous_along(centroids, 4, DType::F32, centroids_name, points, points_name,
                          {{0, "batch"}, {1, "heads"}, {3, "head dim"}});
  SAPATTN_CHECK(centroids.shape[2] >= 1, ShapeError, centroids_name, ": need at least one cluster, got C = 0");
  return centroids.shape[2];
}

inline void check_labels(const TensorView& labels, const TensorView& points, const char* name = "labels") {
  expect_rank(labels, 3, name);
  expect_dtype(labels, DType::I32, name);
  SAPATTN_CHECK(labels.stride[2] == 1, ShapeError, name, " must have unit stride along N, got ", labels.describe());
  expect_extent(labels, 0, points.shape[0], name, "batch of points");
  expect_extent(labels, 1, points.shape[1], name, "heads of points");
  expect_extent(labels, 2, points.shape[2], name, "points per (b,h)");
}

// sizes [B,H,C] i32 contiguous, one count per cluster of centroids [B,H,C,D]; names as above.
inline void check_sizes(const TensorView& sizes, const TensorView& centroids, const char* sizes_name = "sizes",
                        const char* centroids_name = "centroids") {
  expect_contiguous_along(sizes, 3, DType::I32, sizes_name, centroids, centroids_name,
                          {{0, "batch"}, {1, "heads"}, {2, "clusters"}});
}

inline void check_mask(const TensorView& mask, int64_t B, int64_t H, int64_t rows, int64_t cols) {
  expect_rank(mask, 4, "mask");
  expect_dtype(mask, DType::U8, "mask");
  expect_extent(mask, 0, B, "mask", "batch");
  expect_extent(mask, 1, H, "mask", "heads");
  expect_extent(mask, 2, rows, "mask", "rows (query clusters)");
  expect_extent(mask, 3, cols, "mask", "columns (key clusters)");
}

inline void check_scale(float scale) {
  SAPATTN_CHECK(std::isfinite(scale) && scale > 0.0f, InvalidArgumentError, "scale must be finite and > 0, got ",
                scale);
}

// q_centroids [B,H,Cq,D] and k_centroids [B,H,Ck,D] f32 contiguous, k_sizes [B,H,Ck]: the inputs
// of the centroid score matrix S = q_centroids . k_centroids^T * scale.
inline void check_centroid_scores(const TensorView& q_centroids, const TensorView& k_centroids,
                                  const TensorView& k_sizes, float scale) {
  check_scale(scale);
  for (const auto& [t, name] : {std::pair{&q_centroids, "q_centroids"}, {&k_centroids, "k_centroids"}}) {
    expect_rank(*t, 4, name);
    expect_dtype(*t, DType::F32, name);
    expect_contiguous(*t, name);
  }
  expect_extent(k_centroids, 0, q_centroids.shape[0], "k_centroids", "batch of q_centroids");
  expect_extent(k_centroids, 1, q_centroids.shape[1], "k_centroids", "heads of q_centroids");
  expect_extent(k_centroids, 3, q_centroids.shape[3], "k_centroids", "head dim of q_centroids");
  check_sizes(k_sizes, k_centroids);
}

// A [B,H,R,C] f32 matrix over cluster pairs (probabilities, probe scores).
inline void check_pair_matrix(const TensorView& t, int64_t B, int64_t H, int64_t rows, int64_t cols, const char* name) {
  expect_rank(t, 4, name);
  expect_dtype(t, DType::F32, name);
  expect_extent(t, 0, B, name, "batch");
  expect_extent(t, 1, H, name, "heads");
  expect_extent(t, 2, rows, name, "rows (query clusters)");
  expect_extent(t, 3, cols, name, "columns (key clusters)");
}

// Cluster sizes [B,H,C] i32 contiguous; `what` names where C comes from in the message.
inline void check_size_tensor(const TensorView& t, int64_t B, int64_t H, int64_t C, const char* name,
                              const char* what = "clusters") {
  expect_rank(t, 3, name);
  expect_dtype(t, DType::I32, name);
  expect_contiguous(t, name);
  expect_extent(t, 0, B, name, "batch");
  expect_extent(t, 1, H, name, "heads");
  expect_extent(t, 2, C, name, what);
}

// q_sizes [B,H,R] and k_sizes [B,H,C] i32 contiguous: the clusters of a [B,H,R,C] pair matrix.
inline void check_cluster_sizes(const TensorView& q_sizes, const TensorView& k_sizes, int64_t B, int64_t H, int64_t R,
                                int64_t C) {
  check_size_tensor(q_sizes, B, H, R, "q_sizes");
  check_size_tensor(k_sizes, B, H, C, "k_sizes");
}

}  // namespace sapattn::checks
