// The op contracts of include/sapattn/ops.hpp: argument checks shared by every backend, then
// dispatch on the stream's device: CPU -> cpu::, CUDA -> cuda:: (when this build has it).
#include "sapattn/ops.hpp"

#include <tuple>

#include "cpu/backend.hpp"
#include "ops/checks.hpp"
// Declarations only (plain C++): a build without CUDA names them in decltype but never calls them.
#include "cuda/backend.hpp"
// The CUDA version of an op; `call` is evaluated only in builds with the CUDA backend. Without it,
// the expression throws UnsupportedError and has the CUDA op's return type (decltype does not
// evaluate `call`), so `return SAPATTN_ON_CUDA(...)` compiles in ops returning void or a value.
#if SAPATTN_HAS_CUDA
#define SAPATTN_ON_CUDA(call) ::sapattn::cuda::call
#else
#define SAPATTN_ON_CUDA(call) ::sapattn::no_cuda_backend<decltype(::sapattn::cuda::call)>()
#endif

namespace sapattn {

template <class R = void>
[[maybe_unused]] [[noreturn]] static R no_cuda_backend() {
  SAPATTN_THROW(UnsupportedError, "this build has no CUDA backend");
}

using checks::expect_contiguous;
using checks::expect_device;
using checks::expect_dtype;
using checks::expect_extent;
using checks::expect_extent_of;
using checks::expect_floating;
using checks::expect_nonempty;
using checks::expect_rank;

namespace {

int cpu_threads(const Stream& s) { return s.cpu_threads; }

// Checks points [B,H,N,D] floating, centroids [B,H,C,D] f32 contiguous; returns C.
int64_t check_points_centroids(const TensorView& points, const TensorView& centroids) {
  expect_rank(points, 4, "points");
  expect_floating(points, "points");
  SAPATTN_CHECK(points.shape[2] >= 1, ShapeError, "points: need at least one point per (b,h), got N = 0");
  expect_rank(centroids, 4, "centroids");
  expect_dtype(centroids, DType::F32, "centroids");
  expect_contiguous(centroids, "centroids");
  expect_extent(centroids, 0, points.shape[0], "centroids", "batch of points");
  expect_extent(centroids, 1, points.shape[1], "centroids", "heads of points");
  expect_extent(centroids, 3, points.shape[3], "centroids", "head dim of points");
  SAPATTN_CHECK(centroids.shape[2] >= 1, ShapeError, "centroids: need at least one cluster, got C = 0");
  return centroids.shape[2];
}

void check_labels(const TensorView& labels, const TensorView& points) {
  expect_rank(labels, 3, "labels");
  expect_dtype(labels, DType::I32, "labels");
  SAPATTN_CHECK(labels.stride[2] == 1, ShapeError, "labels must have unit stride along N, got ", labels.describe());
  expect_extent(labels, 0, points.shape[0], "labels", "batch of points");
  expect_extent(labels, 1, points.shape[1], "labels", "heads of points");
  expect_extent(labels, 2, points.shape[2], "labels", "points per (b,h)");
}

void check_sizes(const TensorView& sizes, const TensorView& centroids) {
  expect_rank(sizes, 3, "sizes");
  expect_dtype(sizes, DType::I32, "sizes");
  expect_contiguous(sizes, "sizes");
  expect_extent(sizes, 0, centroids.shape[0], "sizes", "batch of centroids");
  expect_extent(sizes, 1, centroids.shape[1], "sizes", "heads of centroids");
  expect_extent(sizes, 2, centroids.shape[2], "sizes", "clusters of centroids");
}

void check_mask(const TensorView& mask, int64_t B, int64_t H, int64_t rows, int64_t cols) {
  expect_rank(mask, 4, "mask");
  expect_dtype(mask, DType::U8, "mask");
  expect_extent(mask, 0, B, "mask", "batch");
  expect_extent(mask, 1, H, "mask", "heads");
  expect_extent(mask, 2, rows, "mask", "rows (query clusters)");
  expect_extent(mask, 3, cols, "mask", "columns (key clusters)");
}

void check_top_p(float top_p, int min_kept) {
  SAPATTN_CHECK(top_p > 0.0f && top_p <= 1.0f, InvalidArgumentError, "top_p must be in (0, 1], got ", top_p);
  SAPATTN_CHECK(min_kept >= 0, InvalidArgumentError, "min_kept must be >= 0, got ", min_kept);
}

void check_scale(float scale) {
  SAPATTN_CHECK(std::isfinite(scale) && scale > 0.0f, InvalidArgumentError, "scale must be finite and > 0, got ",
                scale);
}

// q_centroids [B,H,Cq,D] and k_centroids [B,H,Ck,D] f32 contiguous, k_sizes [B,H,Ck]: the inputs
// of the centroid score matrix S = q_centroids . k_centroids^T * scale.
void check_centroid_scores(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& k_sizes,
                           float scale) {
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
void check_pair_matrix(const TensorView& t, int64_t B, int64_t H, int64_t rows, int64_t cols, const char* name) {
  expect_rank(t, 4, name);
  expect_dtype(t, DType::F32, name);
  expect_extent(t, 0, B, name, "batch");
  expect_extent(t, 1, H, name, "heads");
  expect_extent(t, 2, rows, name, "rows (query clusters)");
  expect_extent(t, 3, cols, name, "columns (key clusters)");
}

// q_sizes [B,H,R] and k_sizes [B,H,C] i32 contiguous: the clusters of a [B,H,R,C] pair matrix.
void check_cluster_sizes(const TensorView& q_sizes, const TensorView& k_sizes, int64_t B, int64_t H, int64_t R,
                         int64_t C) {
  for (const auto& [t, name, n] : {std::tuple{&q_sizes, "q_sizes", R}, {&k_sizes, "k_sizes", C}}) {
    expect_rank(*t, 3, name);
    expect_dtype(*t, DType::I32, name);
    expect_contiguous(*t, name);
    expect_extent(*t, 0, B, name, "batch");
    expect_extent(*t, 1, H, name, "heads");
    expect_extent(*t, 2, n, name, "clusters");
  }
}

// q [B,H,Sq,D], k and v [B,H,Sk,D], out [B,H,Sq,D], lse [B,H,Sq] or empty.
void check_attention(const TensorView& q, const TensorView& k, const TensorView& v, float scale, const TensorView& out,
                     const TensorView& lse) {
  for (const auto& [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&out, "out"}}) {
    expect_rank(*t, 4, name);
    expect_floating(*t, name);
  }
  for (const auto& [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) expect_nonempty(*t, name);
  for (int d : {0, 1, 3}) expect_extent_of(k, d, "k", q, "q");  // k may have its own S
  for (int d = 0; d < 4; ++d) expect_extent_of(v, d, "v", k, "k");
  for (int d = 0; d < 4; ++d) expect_extent_of(out, d, "out", q, "q");
  if (!lse.empty()) {
    expect_rank(lse, 3, "lse");
    expect_dtype(lse, DType::F32, "lse");
    for (int d = 0; d < 3; ++d) expect_extent(lse, d, q.shape[d], "lse", "B, H, S of q: lse is [B,H,S]");
  }
  check_scale(scale);
}

void check_layout(const BlockLayout& layout, const TensorView& q, const TensorView& k) {
  const int64_t B = q.shape[0], H = q.shape[1];
  for (const auto& [t, name] : {std::pair{&layout.q_offsets, "q_offsets"}, {&layout.k_offsets, "k_offsets"}}) {
    expect_rank(*t, 3, name);
    expect_dtype(*t, DType::I32, name);
    expect_contiguous(*t, name);
    expect_extent(*t, 0, B, name, "batch");
    expect_extent(*t, 1, H, name, "heads");
    SAPATTN_CHECK(t->shape[2] >= 2, ShapeError, name, " must hold at least one cluster (C+1 >= 2 entries), got ",
                  t->describe());
  }
  check_mask(layout.mask, B, H, layout.q_offsets.shape[2] - 1, layout.k_offsets.shape[2] - 1);
}

// The backend an op runs on: the stream's device type, after every view was checked to live there.
// A device type this build has no backend for throws UnsupportedError.
template <typename... Views>
DeviceType backend(const Stream& stream, const Views&... views) {
  (expect_device(views, stream), ...);
  switch (stream.device.type) {
    case DeviceType::CPU:
      return DeviceType::CPU;
    case DeviceType::CUDA:
#if SAPATTN_HAS_CUDA
      return DeviceType::CUDA;
#else
      break;
#endif
  }
  SAPATTN_THROW(UnsupportedError, "no backend for ", to_string(stream.device),
                " in this build (CPU only; "
                "configure with -DSAPATTN_CUDA=ON where nvcc is installed)");
}

// The ear-plus ops (ear_plus_probe, select_error_aware_per_head, split_clusters,
// corrected_centroid_compensation) run on the CPU only so far: a CUDA stream (or tensor) gets
// UnsupportedError, in a CUDA build too.
template <typename... Views>
void expect_cpu_backend(const char* op, const Stream& stream, const Views&... views) {
  SAPATTN_CHECK(backend(stream, views...) == DeviceType::CPU, UnsupportedError, op,
                " has no CUDA backend yet (docs/ear.md); run it on a CPU stream");
}

}  // namespace

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

size_t cluster_permutation_workspace_bytes(int64_t batch_heads, int64_t tokens, int num_clusters, Device device) {
  SAPATTN_CHECK(batch_heads >= 0 && tokens >= 0 && num_clusters >= 0, InvalidArgumentError,
                "cluster_permutation_workspace_bytes: negative size");
  switch (device.type) {
    case DeviceType::CPU:
      return 0;  // the CPU backend needs no scratch
    case DeviceType::CUDA:
#if SAPATTN_HAS_CUDA
      return cuda::cluster_permutation_workspace_bytes(batch_heads, tokens, num_clusters);
#else
      no_cuda_backend();
#endif
  }
  return 0;
}

void kmeans_init(const TensorView& points, TensorView centroids, uint64_t seed, const Stream& stream,
                 Workspace workspace, const TensorView& sample_ids) {
  check_points_centroids(points, centroids);
  if (!sample_ids.empty()) {
    expect_rank(sample_ids, 2, "sample_ids");
    expect_dtype(sample_ids, DType::I32, "sample_ids");
    expect_contiguous(sample_ids, "sample_ids");
    expect_extent(sample_ids, 0, points.shape[0], "sample_ids", "batch");
    expect_extent(sample_ids, 1, points.shape[1], "sample_ids", "heads");
    expect_device(sample_ids, stream);
  }
  if (backend(stream, points, centroids) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(kmeans_init(points, centroids, seed, stream, workspace, sample_ids));
  if (!sample_ids.empty()) {
    const int32_t* ids = static_cast<const int32_t*>(sample_ids.data);
    for (int64_t i = 0; i < sample_ids.numel(); ++i)
      SAPATTN_CHECK(ids[i] >= 0, InvalidArgumentError, "sample_ids[", i, "] = ", ids[i], " is negative");
  }
  cpu::kmeans_init(points, centroids, seed, static_cast<const int32_t*>(sample_ids.data), cpu_threads(stream));
}

void kmeans_assign(const TensorView& points, const TensorView& centroids, TensorView labels, const Stream& stream,
                   Workspace workspace) {
  check_points_centroids(points, centroids);
  check_labels(labels, points);
  if (backend(stream, points, centroids, labels) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(kmeans_assign(points, centroids, labels, stream, workspace));
  cpu::kmeans_assign(points, centroids, labels, cpu_threads(stream));
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

void select_top_p(const TensorView& probs, float top_p, int min_kept, TensorView mask, const Stream& stream) {
  check_top_p(top_p, min_kept);
  expect_rank(probs, 4, "probs");
  expect_dtype(probs, DType::F32, "probs");
  check_mask(mask, probs.shape[0], probs.shape[1], probs.shape[2], probs.shape[3]);
  if (backend(stream, probs, mask) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(select_top_p(probs, top_p, min_kept, mask, stream));
  cpu::select_top_p(probs, top_p, min_kept, mask, cpu_threads(stream));
}

void select_top_p_at_density(const TensorView& probs, const TensorView& q_sizes, const TensorView& k_sizes,
                             float density, int min_kept, TensorView mask, const Stream& stream, Workspace workspace) {
  SAPATTN_CHECK(std::isfinite(density) && density > 0.0f && density <= 1.0f, InvalidArgumentError,
                "density must be in (0, 1], got ", density);
  SAPATTN_CHECK(min_kept >= 0, InvalidArgumentError, "min_kept must be >= 0, got ", min_kept);
  expect_rank(probs, 4, "probs");
  const int64_t B = probs.shape[0], H = probs.shape[1], R = probs.shape[2], C = probs.shape[3];
  check_pair_matrix(probs, B, H, R, C, "probs");
  check_mask(mask, B, H, R, C);
  check_cluster_sizes(q_sizes, k_sizes, B, H, R, C);
  if (backend(stream, probs, q_sizes, k_sizes, mask) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(
        select_top_p_at_density(probs, q_sizes, k_sizes, density, min_kept, mask, stream, workspace));
  cpu::select_top_p_at_density(probs, q_sizes, k_sizes, density, min_kept, mask, cpu_threads(stream));
}

void select_blocks(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& k_sizes, float scale,
                   float top_p, int min_kept, TensorView mask, const Stream& stream) {
  check_top_p(top_p, min_kept);
  check_centroid_scores(q_centroids, k_centroids, k_sizes, scale);
  check_mask(mask, q_centroids.shape[0], q_centroids.shape[1], q_centroids.shape[2], k_centroids.shape[2]);
  if (backend(stream, q_centroids, k_centroids, k_sizes, mask) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(select_blocks(q_centroids, k_centroids, k_sizes, scale, top_p, min_kept, mask, stream));
  cpu::select_blocks(q_centroids, k_centroids, k_sizes, scale, top_p, min_kept, mask, cpu_threads(stream));
}

void apply_text_rule(TensorView mask, const Stream& stream) {
  expect_rank(mask, 4, "mask");
  expect_dtype(mask, DType::U8, "mask");
  SAPATTN_CHECK(mask.shape[2] >= 3 && mask.shape[3] >= 3, ShapeError,
                "mask for the text rule needs Cq+2 rows and Ck+2 columns with Cq, Ck >= 1, got ", mask.describe());
  if (backend(stream, mask) == DeviceType::CUDA) return SAPATTN_ON_CUDA(apply_text_rule(mask, stream));
  cpu::apply_text_rule(mask, cpu_threads(stream));
}

void shard_key_clusters(TensorView mask, int index, int count, const Stream& stream) {
  expect_rank(mask, 4, "mask");
  expect_dtype(mask, DType::U8, "mask");
  SAPATTN_CHECK(count >= 1 && index >= 0 && index < count, InvalidArgumentError,
                "a key shard needs count >= 1 and 0 <= index < count, got index ", index, " of ", count);
  if (count == 1) return;
  if (backend(stream, mask) == DeviceType::CUDA) return SAPATTN_ON_CUDA(shard_key_clusters(mask, index, count, stream));
  cpu::shard_key_clusters(mask, index, count, cpu_threads(stream));
}

void label_text_tokens(TensorView labels, int64_t video_tokens, int64_t prompt_length, int prompt_label,
                       const Stream& stream) {
  expect_rank(labels, 3, "labels");
  expect_dtype(labels, DType::I32, "labels");
  expect_contiguous(labels, "labels");
  SAPATTN_CHECK(video_tokens >= 0 && prompt_length >= 0 && video_tokens + prompt_length <= labels.shape[2],
                InvalidArgumentError, "video_tokens (", video_tokens, ") + prompt_length (", prompt_length,
                ") must fit the ", labels.shape[2], " tokens of ", labels.describe());
  SAPATTN_CHECK(prompt_label >= 0, InvalidArgumentError, "prompt_label must be >= 0, got ", prompt_label);
  if (backend(stream, labels) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(label_text_tokens(labels, video_tokens, prompt_length, prompt_label, stream));
  cpu::label_text_tokens(labels, video_tokens, prompt_length, prompt_label, cpu_threads(stream));
}

void cluster_permutation(const TensorView& labels, int num_clusters, TensorView perm, TensorView offsets,
                         const Stream& stream, Workspace workspace) {
  SAPATTN_CHECK(num_clusters >= 1, InvalidArgumentError, "num_clusters must be >= 1, got ", num_clusters);
  expect_rank(labels, 3, "labels");
  expect_dtype(labels, DType::I32, "labels");
  expect_contiguous(labels, "labels");
  expect_rank(perm, 3, "perm");
  expect_dtype(perm, DType::I32, "perm");
  expect_contiguous(perm, "perm");
  for (int d = 0; d < 3; ++d) expect_extent(perm, d, labels.shape[d], "perm", "the extent of labels");
  expect_rank(offsets, 3, "offsets");
  expect_dtype(offsets, DType::I32, "offsets");
  expect_contiguous(offsets, "offsets");
  expect_extent(offsets, 0, labels.shape[0], "offsets", "batch of labels");
  expect_extent(offsets, 1, labels.shape[1], "offsets", "heads of labels");
  expect_extent(offsets, 2, num_clusters + 1, "offsets", "num_clusters + 1");
  if (backend(stream, labels, perm, offsets) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(cluster_permutation(labels, num_clusters, perm, offsets, stream, workspace));
  cpu::cluster_permutation(labels, num_clusters, perm, offsets, cpu_threads(stream));
}

namespace {
void check_rows_op(const TensorView& x, const TensorView& perm, const TensorView& out) {
  expect_rank(x, 4, "x");
  expect_floating(x, "x");
  expect_rank(out, 4, "out");
  expect_floating(out, "out");
  for (int d = 0; d < 4; ++d) expect_extent(out, d, x.shape[d], "out", "the extent of x");
  expect_rank(perm, 3, "perm");
  expect_dtype(perm, DType::I32, "perm");
  expect_contiguous(perm, "perm");
  for (int d = 0; d < 3; ++d) expect_extent(perm, d, x.shape[d], "perm", "the extent of x");
}
}  // namespace

void gather_rows(const TensorView& x, const TensorView& perm, TensorView out, const Stream& stream) {
  check_rows_op(x, perm, out);
  if (backend(stream, x, perm, out) == DeviceType::CUDA) return SAPATTN_ON_CUDA(gather_rows(x, perm, out, stream));
  cpu::gather_rows(x, perm, out, cpu_threads(stream));
}

void scatter_rows(const TensorView& y, const TensorView& perm, TensorView out, const Stream& stream) {
  check_rows_op(y, perm, out);
  if (backend(stream, y, perm, out) == DeviceType::CUDA) return SAPATTN_ON_CUDA(scatter_rows(y, perm, out, stream));
  cpu::scatter_rows(y, perm, out, cpu_threads(stream));
}

namespace {

// A row permutation of `rows` entries per (b,h): [B,H,rows] i32, contiguous.
void check_row_permutation(const TensorView& perm, int64_t B, int64_t H, int64_t rows, const char* name,
                           const Stream& stream) {
  expect_rank(perm, 3, name);
  expect_dtype(perm, DType::I32, name);
  expect_contiguous(perm, name);
  expect_extent(perm, 0, B, name, "batch");
  expect_extent(perm, 1, H, name, "heads");
  expect_extent(perm, 2, rows, name, "tokens");
  expect_device(perm, stream);
}

}  // namespace

void block_sparse_attention(const TensorView& q, const TensorView& k, const TensorView& v, const BlockLayout& layout,
                            float scale, TensorView out, TensorView lse, const Stream& stream, Workspace workspace,
                            const RowPermutation& perm) {
  check_attention(q, k, v, scale, out, lse);
  check_layout(layout, q, k);
  const DeviceType where = backend(stream, q, k, v, out, layout.q_offsets, layout.k_offsets, layout.mask);
  if (!lse.empty()) expect_device(lse, stream);
  const int64_t B = q.shape[0], H = q.shape[1];
  if (!perm.q_perm.empty()) check_row_permutation(perm.q_perm, B, H, q.shape[2], "q_perm", stream);
  if (!perm.k_perm.empty()) check_row_permutation(perm.k_perm, B, H, k.shape[2], "k_perm", stream);
  if (where == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(block_sparse_attention(q, k, v, layout, scale, out, lse, stream, workspace, perm));
  cpu::block_sparse_attention(q, k, v, layout, scale, out, lse, perm, cpu_threads(stream));
}

size_t block_sparse_attention_workspace_bytes(int64_t batch_heads, int64_t q_clusters, int64_t k_clusters,
                                              int64_t q_tokens, Device device) {
  SAPATTN_CHECK(batch_heads >= 0 && q_clusters >= 1 && k_clusters >= 1 && q_tokens >= 0, InvalidArgumentError,
                "block_sparse_attention_workspace_bytes: bad sizes (batch_heads ", batch_heads, ", clusters ",
                q_clusters, " x ", k_clusters, ", tokens ", q_tokens, ")");
  if (device.type == DeviceType::CPU) return 0;
  return SAPATTN_ON_CUDA(block_sparse_attention_workspace_bytes(batch_heads, q_clusters, k_clusters, q_tokens));
}

AttentionKernel attention_kernel(Device device, DType dtype, int64_t head_dim) {
  if (device.type == DeviceType::CPU) {
    if (!is_floating(dtype)) return {false, "", "the CPU attention takes f32, f16 or bf16"};
    return {true, "cpu", ""};
  }
#if SAPATTN_HAS_CUDA
  return cuda::attention_kernel(device.index, dtype, head_dim);
#else
  return {false, "", "this build has no CUDA backend (configure with -DSAPATTN_CUDA=ON where nvcc is installed)"};
#endif
}

void block_density(const BlockLayout& layout, TensorView density, const Stream& stream) {
  expect_rank(layout.q_offsets, 3, "q_offsets");
  expect_rank(layout.k_offsets, 3, "k_offsets");
  const int64_t B = layout.q_offsets.shape[0], H = layout.q_offsets.shape[1];
  for (const auto& [t, name] : {std::pair{&layout.q_offsets, "q_offsets"}, {&layout.k_offsets, "k_offsets"}}) {
    expect_dtype(*t, DType::I32, name);
    expect_contiguous(*t, name);
    expect_extent(*t, 0, B, name, "batch of q_offsets");
    expect_extent(*t, 1, H, name, "heads of q_offsets");
    SAPATTN_CHECK(t->shape[2] >= 2, ShapeError, name, " must hold at least one cluster, got ", t->describe());
  }
  check_mask(layout.mask, B, H, layout.q_offsets.shape[2] - 1, layout.k_offsets.shape[2] - 1);
  expect_rank(density, 2, "density");
  expect_dtype(density, DType::F32, "density");
  expect_extent(density, 0, B, "density", "batch");
  expect_extent(density, 1, H, "density", "heads");
  if (backend(stream, layout.q_offsets, layout.k_offsets, layout.mask, density) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(block_density(layout, density, stream));
  cpu::block_density(layout, density, cpu_threads(stream));
}

void dense_attention(const TensorView& q, const TensorView& k, const TensorView& v, float scale, TensorView out,
                     TensorView lse, const Stream& stream) {
  check_attention(q, k, v, scale, out, lse);
  const DeviceType where = backend(stream, q, k, v, out);
  if (!lse.empty()) expect_device(lse, stream);
  if (where == DeviceType::CUDA) return SAPATTN_ON_CUDA(dense_attention(q, k, v, scale, out, lse, stream));
  cpu::dense_attention(q, k, v, scale, out, lse, cpu_threads(stream));
}

size_t ear_workspace_bytes(int64_t batch_heads, int64_t tokens, int64_t q_clusters, int64_t k_clusters, int64_t dim,
                           Device device) {
  SAPATTN_CHECK(batch_heads >= 0 && tokens >= 0 && q_clusters >= 0 && k_clusters >= 0 && dim >= 0, InvalidArgumentError,
                "ear_workspace_bytes: negative size");
  if (device.type == DeviceType::CPU) return 0;  // the CPU backend needs no scratch
  return SAPATTN_ON_CUDA(ear_workspace_bytes(batch_heads, tokens, q_clusters, k_clusters, dim));
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
                           float scale, TensorView out, TensorView lse, const Stream& stream) {
  check_compensation(q, q_labels, mask, k_centroids, v_centroids, k_sizes, scale, out, lse);
  if (backend(stream, q, q_labels, mask, k_centroids, v_centroids, k_sizes, out, lse) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(
        centroid_compensation(q, q_labels, mask, k_centroids, v_centroids, k_sizes, scale, out, lse, stream));
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
                    TensorView pair_values, const Stream& stream) {
  check_probe(q_centroids, k_centroids, v_centroids, k, v, k_labels, q_sizes, k_sizes, scale, gamma, scores);
  check_probe_corrections(spread, pair_values, q_centroids.shape[0], q_centroids.shape[1], q_centroids.shape[2],
                          k_centroids.shape[2], k.shape[3]);
  expect_cpu_backend("ear_plus_probe", stream, q_centroids, k_centroids, v_centroids, k, v, k_labels, q_sizes, k_sizes,
                     scores, spread, pair_values);
  cpu::ear_plus_probe(q_centroids, k_centroids, v_centroids, k, v, k_labels, q_sizes, k_sizes, scale, gamma, scores,
                      spread, pair_values, cpu_threads(stream));
}

void select_error_aware_per_head(const TensorView& probs, const TensorView& budget_mask, const TensorView& scores,
                                 const TensorView& q_sizes, const TensorView& k_sizes, int guaranteed, TensorView mask,
                                 const Stream& stream) {
  check_routing(probs, budget_mask, scores, q_sizes, k_sizes, guaranteed, mask);
  expect_cpu_backend("select_error_aware_per_head", stream, probs, budget_mask, scores, q_sizes, k_sizes, mask);
  cpu::select_error_aware_per_head(probs, budget_mask, scores, q_sizes, k_sizes, guaranteed, mask, cpu_threads(stream));
}

void split_clusters(const TensorView& points, const TensorView& labels, const TensorView& centroids,
                    TensorView sub_labels, TensorView sub_sizes, const Stream& stream) {
  const int64_t C = check_points_centroids(points, centroids);
  check_labels(labels, points);
  check_labels(sub_labels, points);
  expect_rank(sub_sizes, 3, "sub_sizes");
  expect_dtype(sub_sizes, DType::I32, "sub_sizes");
  expect_contiguous(sub_sizes, "sub_sizes");
  expect_extent(sub_sizes, 0, points.shape[0], "sub_sizes", "batch of points");
  expect_extent(sub_sizes, 1, points.shape[1], "sub_sizes", "heads of points");
  expect_extent(sub_sizes, 2, 2 * C, "sub_sizes", "twice the clusters of centroids");
  expect_cpu_backend("split_clusters", stream, points, labels, centroids, sub_labels, sub_sizes);
  cpu::split_clusters(points, labels, centroids, sub_labels, sub_sizes, cpu_threads(stream));
}

void corrected_centroid_compensation(const TensorView& q, const TensorView& q_labels, const TensorView& mask,
                                     const TensorView& k_centroids, const TensorView& v_centroids,
                                     const TensorView& k_sizes, const TensorView& spread, const TensorView& pair_values,
                                     float scale, TensorView out, TensorView lse, const Stream& stream) {
  check_compensation(q, q_labels, mask, k_centroids, v_centroids, k_sizes, scale, out, lse, true);
  check_probe_corrections(spread, pair_values, q.shape[0], q.shape[1], mask.shape[2], k_centroids.shape[2], q.shape[3]);
  expect_cpu_backend("corrected_centroid_compensation", stream, q, q_labels, mask, k_centroids, v_centroids, k_sizes,
                     spread, pair_values, out, lse);
  cpu::corrected_centroid_compensation(q, q_labels, mask, k_centroids, v_centroids, k_sizes, spread, pair_values, scale,
                                       out, lse, cpu_threads(stream));
}

void check_finite(const TensorView& x, const char* name, const Stream& stream) {
  expect_rank(x, 4, name);
  expect_floating(x, name);
  if (backend(stream, x) == DeviceType::CUDA) return SAPATTN_ON_CUDA(check_finite(x, name, stream));
  cpu::check_finite(x, name, cpu_threads(stream));
}

}  // namespace sapattn
