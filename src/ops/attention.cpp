// The attention ops of include/sapattn/ops.hpp (block_sparse_attention, its e4m3 form,
// dense_attention, block_density, attention_kernel, the attention workspace size) and check_finite:
// the argument checks every backend shares, then dispatch on the stream's device.
#include "sapattn/ops.hpp"

#include <utility>

#include "ops/checks.hpp"
#include "ops/dispatch.hpp"

namespace sapattn {

using namespace checks;    // the argument checks of src/ops/
using namespace dispatch;  // backend(), cpu_threads(), SAPATTN_ON_CUDA

namespace {

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

void check_fp8_options(const Fp8Options& o) {
  for (const auto& [granularity, name] : {std::pair{o.q_scale, "q_scale"}, {o.k_scale, "k_scale"}})
    SAPATTN_CHECK(granularity == Fp8Scale::Tile || granularity == Fp8Scale::Cluster, InvalidArgumentError,
                  "Fp8Options::", name,
                  " must be Tile or Cluster (a scale per column does not factor out of Q K^T), "
                  "got ",
                  static_cast<int>(granularity));
  SAPATTN_CHECK(o.v_scale == Fp8Scale::Tile || o.v_scale == Fp8Scale::Cluster || o.v_scale == Fp8Scale::Channel,
                InvalidArgumentError, "Fp8Options::v_scale must be Tile, Cluster or Channel, got ",
                static_cast<int>(o.v_scale));
  for (const auto& [tile, name] : {std::pair{o.q_tile, "q_tile"}, {o.k_tile, "k_tile"}, {o.v_tile, "v_tile"}})
    SAPATTN_CHECK(tile >= 1, InvalidArgumentError, "Fp8Options::", name, " must be >= 1 row, got ", tile);
  SAPATTN_CHECK(o.p_scale >= 1.0f && o.p_scale <= 448.0f, InvalidArgumentError,
                "Fp8Options::p_scale must be in [1, 448] (P = 1 times it must be a normal e4m3 number that does not "
                "saturate), got ",
                o.p_scale);
  SAPATTN_CHECK(!o.p_sum_e4m3 || o.v_scale == Fp8Scale::Channel, InvalidArgumentError,
                "Fp8Options::p_sum_e4m3 needs v_scale Channel (with V's scale folded into P the quantised P no "
                "longer sums the softmax weights): set p_sum_e4m3 = false ('sumf') for V per tile or cluster");
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

void block_sparse_attention_e4m3(const TensorView& q, const TensorView& k, const TensorView& v,
                                 const BlockLayout& layout, float scale, const Fp8Options& options, TensorView out,
                                 TensorView lse, const Stream& stream, Workspace workspace,
                                 const RowPermutation& perm) {
  check_attention(q, k, v, scale, out, lse);
  check_layout(layout, q, k);
  check_fp8_options(options);
  const DeviceType where = backend(stream, q, k, v, out, layout.q_offsets, layout.k_offsets, layout.mask);
  if (!lse.empty()) expect_device(lse, stream);
  const int64_t B = q.shape[0], H = q.shape[1];
  if (!perm.q_perm.empty()) check_row_permutation(perm.q_perm, B, H, q.shape[2], "q_perm", stream);
  if (!perm.k_perm.empty()) check_row_permutation(perm.k_perm, B, H, k.shape[2], "k_perm", stream);
  if (where == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(
        block_sparse_attention_e4m3(q, k, v, layout, scale, options, out, lse, stream, workspace, perm));
  cpu::block_sparse_attention_e4m3(q, k, v, layout, scale, options, out, lse, perm, cpu_threads(stream));
}

size_t block_sparse_attention_e4m3_workspace_bytes(int64_t batch_heads, int64_t q_clusters, int64_t k_clusters,
                                                   int64_t q_tokens, int64_t k_tokens, Device device) {
  SAPATTN_CHECK(batch_heads >= 0 && q_clusters >= 1 && k_clusters >= 1 && q_tokens >= 0 && k_tokens >= 0,
                InvalidArgumentError, "block_sparse_attention_e4m3_workspace_bytes: bad sizes (batch_heads ",
                batch_heads, ", clusters ", q_clusters, " x ", k_clusters, ", tokens ", q_tokens, " x ", k_tokens, ")");
  if (device.type == DeviceType::CPU) return 0;
  return SAPATTN_ON_CUDA(
      block_sparse_attention_e4m3_workspace_bytes(batch_heads, q_clusters, k_clusters, q_tokens, k_tokens));
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

void check_finite(const TensorView& x, const char* name, const Stream& stream) {
  expect_rank(x, 4, name);
  expect_floating(x, name);
  if (backend(stream, x) == DeviceType::CUDA) return SAPATTN_ON_CUDA(check_finite(x, name, stream));
  cpu::check_finite(x, name, cpu_threads(stream));
}

}  // namespace sapattn
