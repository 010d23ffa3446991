// The block-selection ops of include/sapattn/ops.hpp (select_top_p, select_top_p_at_density,
// select_blocks, apply_text_rule, shard_key_clusters, label_text_tokens): the argument checks every
// backend shares, then dispatch on the stream's device.
#include "sapattn/ops.hpp"

#include <cmath>

#include "ops/checks.hpp"
#include "ops/dispatch.hpp"

namespace sapattn {

using namespace checks;    // the argument checks of src/ops/
using namespace dispatch;  // backend(), cpu_threads(), SAPATTN_ON_CUDA

namespace {

void check_top_p(float top_p, int min_kept) {
  SAPATTN_CHECK(top_p > 0.0f && top_p <= 1.0f, InvalidArgumentError, "top_p must be in (0, 1], got ", top_p);
  SAPATTN_CHECK(min_kept >= 0, InvalidArgumentError, "min_kept must be >= 0, got ", min_kept);
}

}  // namespace

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

}  // namespace sapattn
