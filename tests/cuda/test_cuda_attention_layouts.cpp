// block_sparse_attention on inputs that are not contiguous and in cluster order, under every kernel:
//   - fused row permutations (q only, k only, both) give bit for bit what the CPU gather, the op
//     without permutations and the CPU scatter give, and meet the error model against the reference;
//   - strided views (q, k, v slots of a packed [B,S,3,H,D] qkv buffer, out rows padded in [B,S,H,D+8]
//     memory, lse in [B,S,H] memory) give bit for bit what contiguous views give, and nothing is
//     written between the out rows.
#include <gtest/gtest.h>

#include <cstdlib>
#include <vector>

#include "cuda_attention_support.hpp"

namespace sapattn::cuda_test {
namespace {

// ---------------------------------------------------------------------------------------------
// Fused permutations
// ---------------------------------------------------------------------------------------------

const std::vector<SparseCase> kPermCases = {
    {.name = "perm_q_bf16_D128", .Sq = 900, .Sk = 1100, .D = 128, .q_perm = true},
    {.name = "perm_k_f16_D64", .Sq = 900, .Sk = 1100, .dtype = DType::F16, .k_perm = true},
    {.name = "perm_qk_bf16_D64_no_lse",
     .B = 2,
     .Sq = 500,
     .Sk = 600,
     .with_lse = false,
     .q_perm = true,
     .k_perm = true},
    {.name = "perm_qk_unit_clusters_f16_D128",
     .Sq = 40,
     .Sk = 45,
     .D = 128,
     .Cq = 40,
     .Ck = 45,
     .dtype = DType::F16,
     .sizes = Sizes::Unit,
     .q_perm = true,
     .k_perm = true},
};

class FusedPermutation : public UnderKernel<SparseCase> {};

TEST_P(FusedPermutation, MatchesGatherAttendScatter) {
  const SparseCase& c = test_case();
  ASSERT_TRUE(runs_expected_kernel(c.dtype, c.D));
  const SparseRun fused(c);
  const HostProblem& p = fused.prepared.problem;
  EXPECT_TRUE(matches(fused.first, fused.prepared.expected));
  // Unfused: the inputs gathered into cluster order, the op without permutations, the outputs scattered
  // back. The fused kernel reads the same rows into the same tiles, so the results are bit-identical.
  // On the Hopper kernel key rows read through k_perm take the cp.async loads, so the unfused call
  // takes them too: TMA loads ("tma") lay keys out in other tiles (one cluster per slot of rows), which
  // changes the order of the softmax sums (SparseAttention holds them to the reference). With q_perm
  // alone the TMA kernel gathers the query rows and loads K and V as boxes, as the unfused call does
  // under the same switch.
  if (c.k_perm) setenv("SAPATTN_SM90_LOAD", "cpasync", 1);  // TearDown unsets it
  HostProblem unfused = p;
  unfused.q = cluster_order(p.q, p.q_perm);
  unfused.k = cluster_order(p.k, p.k_perm);
  unfused.v = cluster_order(p.v, p.k_perm);
  unfused.q_perm = unfused.k_perm = HostTensor{};
  const Outputs cluster_ordered = run_gpu(to_device(unfused).inputs(), fused.poisoned, fused.cs, fused.workspace);
  EXPECT_TRUE(identical(fused.first, token_order(cluster_ordered, p.q_perm)));
}

INSTANTIATE_TEST_SUITE_P(Cases, FusedPermutation, ::testing::Combine(::testing::ValuesIn(kPermCases), kKernels),
                         case_and_kernel<SparseCase>);

// ---------------------------------------------------------------------------------------------
// Strided views
// ---------------------------------------------------------------------------------------------

// x's values in slot `slot` (0: q, 1: k, 2: v) of a packed [B,S,3,H,D] buffer, the output of a fused qkv
// projection; the other slots hold NaN.
HostTensor packed_qkv_slot(const HostTensor& x, int64_t slot) {
  const int64_t B = x.view.shape[0], H = x.view.shape[1], S = x.view.shape[2], D = x.view.shape[3];
  HostTensor t =
      strided_view(x.view.dtype, {B, H, S, D}, {S * 3 * H * D, D, 3 * H * D, 1}, B * S * 3 * H * D, slot * H * D);
  ref::from_vector(t.view, ref::to_vector(x.view));
  return t;
}

const std::vector<SparseCase> kStridedCases = {
    {.name = "qkv_packed_bf16_D64", .B = 2, .H = 3, .Sq = 777, .Sk = 777, .Cq = 6, .Ck = 9},
    {.name = "qkv_packed_perm_f16_D128",
     .Sq = 500,
     .Sk = 500,
     .D = 128,
     .dtype = DType::F16,
     .q_perm = true,
     .k_perm = true},
};

class StridedViews : public UnderKernel<SparseCase> {};

TEST_P(StridedViews, MatchContiguous) {
  const SparseCase& c = test_case();
  ASSERT_TRUE(runs_expected_kernel(c.dtype, c.D));
  const SparseRun contiguous(c);
  EXPECT_TRUE(matches(contiguous.first, contiguous.prepared.expected));
  const HostProblem& p = contiguous.prepared.problem;
  const int64_t B = c.B, H = c.H, S = c.Sq, D = c.D;
  HostProblem strided = p;
  strided.q = packed_qkv_slot(p.q, 0);
  strided.k = packed_qkv_slot(p.k, 1);
  strided.v = packed_qkv_slot(p.v, 2);
  // out in [B,S,H,D+8] memory (8 more elements keep the rows 16-byte aligned), lse in [B,S,H] memory.
  Outputs strided_outputs{
      strided_view(c.dtype, {B, H, S, D}, {S * H * (D + 8), D + 8, H * (D + 8), 1}, B * S * H * (D + 8), 0),
      c.with_lse ? ref::make_tensor(DType::F32, {B, H, S}, ref::Layout::Transposed) : HostTensor{}};
  ref::poison(strided_outputs.lse);
  const Outputs got = run_gpu(to_device(strided).inputs(), strided_outputs, contiguous.cs, contiguous.workspace);
  EXPECT_TRUE(identical(got, contiguous.first));
  EXPECT_TRUE(got.out.outside_view_unchanged(strided_outputs.out.bytes())) << "written between out rows";
}

INSTANTIATE_TEST_SUITE_P(Cases, StridedViews, ::testing::Combine(::testing::ValuesIn(kStridedCases), kKernels),
                         case_and_kernel<SparseCase>);

}  // namespace
}  // namespace sapattn::cuda_test
