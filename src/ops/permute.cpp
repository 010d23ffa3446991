// The permutation ops of include/sapattn/ops.hpp (cluster_permutation, gather_rows, scatter_rows
// and the permutation's workspace size): the argument checks every backend shares, then dispatch on
// the stream's device.
#include "sapattn/ops.hpp"

#include "ops/checks.hpp"
#include "ops/dispatch.hpp"

namespace sapattn {

using namespace checks;    // the argument checks of src/ops/
using namespace dispatch;  // backend(), cpu_threads(), SAPATTN_ON_CUDA

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

}  // namespace sapattn
