// SVG-EAR's CUDA ops on bad input: too small a workspace, labels out of range and negative sizes
// (with the value checks on), shapes, dtypes and devices, and the limits of the CUDA kernels, each a
// typed error.
#include <gtest/gtest.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "cuda/backend.hpp"
#include "cuda_ear_support.hpp"
#include "cuda_support.hpp"
#include "reference.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace sapattn {
namespace {

using cuda_test::as_workspace;
using cuda_test::device_workspace;
using cuda_test::poisoned;
using cuda_test::TestStream;
using cuda_test::Twin;
using cuda_test::ValueChecksOn;
using ear_cuda_test::ErrorInputs;
using ear_cuda_test::i32_tensor;
using ear_cuda_test::normal;
using ear_cuda_test::random_labels;
using ref::HostTensor;

TEST(EarErrors, WorkspaceValuesAndLimits) {
  ref::Rng rng(testing_support::case_seed());
  TestStream cs;
  const ErrorInputs in(rng);
  const int64_t B = in.B, H = in.H, N = in.N, D = in.D, Cq = in.Cq, Ck = in.Ck;
  const float scale = in.scale;
  const Twin &qc = in.qc, &kc = in.kc, &vc = in.vc, &k = in.k, &v = in.v, &labels = in.labels;
  const Twin &qs = in.qs, &ks = in.ks, &ks_negative = in.ks_negative, &bad_labels = in.bad_labels;
  Twin scores(poisoned(DType::F32, {B, H, Cq, Ck})), probs(poisoned(DType::F32, {B, H, Cq, Ck}));
  Twin mask(poisoned(DType::U8, {B, H, Cq, Ck})), budget(poisoned(DType::U8, {B, H, Cq, Ck}));
  Twin means(poisoned(DType::F32, {B, H, Ck, D}));
  const size_t need = ear_workspace_bytes(B * H, N, Cq, Ck, D, Device::cuda(0));
  ASSERT_GT(need, 0u);
  EXPECT_EQ(ear_workspace_bytes(B * H, N, Cq, Ck, D, Device::cpu()), 0u);
  const Buffer ws = device_workspace(need), small = device_workspace(need / 2);
  const Buffer comp_ws = device_workspace(compensation_workspace_bytes(B * H, N, Cq, Ck, D, Device::cuda(0)));
  const Stream s = cs.stream();

  // Too small a workspace: WorkspaceError before anything is launched.
  EXPECT_THROW(cluster_means(v.dev, labels.dev, means.dev, s, as_workspace(small)), WorkspaceError);
  EXPECT_THROW(cluster_means(v.dev, labels.dev, means.dev, s), WorkspaceError);
  EXPECT_THROW(ear_probe(qc.dev, kc.dev, vc.dev, k.dev, v.dev, labels.dev, qs.dev, ks.dev, scale, 1.0f, scores.dev, s,
                         as_workspace(small)),
               WorkspaceError);
  EXPECT_THROW(select_top_p_at_density(probs.dev, qs.dev, ks.dev, 0.3f, 0, mask.dev, s), WorkspaceError);

  // Values (labels out of range, negative sizes) with value checks on: InvalidArgumentError.
  {
    const ValueChecksOn on;
    EXPECT_THROW(cluster_means(v.dev, bad_labels.dev, means.dev, s, as_workspace(ws)), InvalidArgumentError);
    EXPECT_THROW(centroid_probs(qc.dev, kc.dev, ks_negative.dev, scale, probs.dev, s), InvalidArgumentError);
    EXPECT_THROW(ear_probe(qc.dev, kc.dev, vc.dev, k.dev, v.dev, bad_labels.dev, qs.dev, ks.dev, scale, 1.0f,
                           scores.dev, s, as_workspace(ws)),
                 InvalidArgumentError);
    EXPECT_THROW(ear_probe(qc.dev, kc.dev, vc.dev, k.dev, v.dev, labels.dev, qs.dev, ks_negative.dev, scale, 1.0f,
                           scores.dev, s, as_workspace(ws)),
                 InvalidArgumentError);
    centroid_probs(qc.dev, kc.dev, ks.dev, scale, probs.dev, s);
    EXPECT_THROW(select_error_aware(probs.dev, budget.dev, probs.dev, qs.dev, ks_negative.dev, 1, mask.dev, s),
                 InvalidArgumentError);
    EXPECT_THROW(select_top_p_at_density(probs.dev, qs.dev, ks_negative.dev, 0.3f, 0, mask.dev, s, as_workspace(ws)),
                 InvalidArgumentError);
    Twin q(normal(DType::BF16, {B, H, N, D}, rng)), out(normal(DType::BF16, {B, H, N, D}, rng));
    Twin lse(normal(DType::F32, {B, H, N}, rng));
    HostTensor bad_q_host = random_labels(rng, B, H, N, Cq);
    bad_q_host.storage.data_as<int32_t>()[5] = -2;
    Twin bad_q_labels(std::move(bad_q_host));
    EXPECT_THROW(centroid_compensation(q.dev, bad_q_labels.dev, mask.dev, kc.dev, vc.dev, ks.dev, scale, out.dev,
                                       lse.dev, s, as_workspace(comp_ws)),
                 InvalidArgumentError);
    Twin q_labels(random_labels(rng, B, H, N, Cq));
    HostTensor zeros = poisoned(DType::U8, {B, H, Cq, Ck});
    std::fill_n(zeros.storage.data_as<uint8_t>(), zeros.storage.bytes(), 0);  // every cluster skipped
    Twin skip_all(std::move(zeros));
    EXPECT_THROW(centroid_compensation(q.dev, q_labels.dev, skip_all.dev, kc.dev, vc.dev, ks_negative.dev, scale,
                                       out.dev, lse.dev, s, as_workspace(comp_ws)),
                 InvalidArgumentError);
    EXPECT_NO_THROW(centroid_compensation(q.dev, q_labels.dev, skip_all.dev, kc.dev, vc.dev, ks.dev, scale, out.dev,
                                          lse.dev, s, as_workspace(comp_ws)));
    // Good values pass the same checks.
    EXPECT_NO_THROW(ear_probe(qc.dev, kc.dev, vc.dev, k.dev, v.dev, labels.dev, qs.dev, ks.dev, scale, 1.0f, scores.dev,
                              s, as_workspace(ws)));
    EXPECT_NO_THROW(select_top_p_at_density(probs.dev, qs.dev, ks.dev, 0.3f, 0, mask.dev, s, as_workspace(ws)));
  }

  // Shapes, dtypes and devices are checked before the backend is chosen.
  EXPECT_THROW(centroid_probs(qc.dev, kc.dev, ks.dev, scale, mask.dev, s), DTypeError);
  EXPECT_THROW(ear_probe(qc.dev, kc.dev, qc.dev, k.dev, v.dev, labels.dev, qs.dev, ks.dev, scale, 1.0f, scores.dev, s,
                         as_workspace(ws)),
               ShapeError);  // v_centroids with Cq clusters
  EXPECT_THROW(select_error_aware(probs.dev, budget.dev, scores.dev, qs.dev, ks.dev, 1, mask.host.view, s),
               UnsupportedError);  // a host tensor on a CUDA stream

  // Limits of the CUDA kernels: UnsupportedError naming them.
  {
    Twin qc_wide(normal(DType::F32, {1, 1, 2, 300}, rng)), kc_wide(normal(DType::F32, {1, 1, 2, 300}, rng));
    Twin k_wide(normal(DType::F32, {1, 1, 4, 300}, rng)), l_wide(i32_tensor({1, 1, 4}, {0, 1, 1, 0}));
    Twin s2(i32_tensor({1, 1, 2}, {2, 2})), sc(poisoned(DType::F32, {1, 1, 2, 2}));
    const Buffer w = device_workspace(ear_workspace_bytes(1, 4, 2, 2, 300, Device::cuda(0)));
    EXPECT_THROW(ear_probe(qc_wide.dev, kc_wide.dev, kc_wide.dev, k_wide.dev, k_wide.dev, l_wide.dev, s2.dev, s2.dev,
                           scale, 1.0f, sc.dev, s, as_workspace(w)),
                 UnsupportedError);
    Twin q_wide(normal(DType::F32, {1, 1, 4, 300}, rng)), o_wide(normal(DType::F32, {1, 1, 4, 300}, rng));
    Twin lse_wide(normal(DType::F32, {1, 1, 4}, rng));
    HostTensor m22 = poisoned(DType::U8, {1, 1, 2, 2});
    std::fill_n(m22.storage.data_as<uint8_t>(), 4, 0);
    Twin mask22(std::move(m22));
    EXPECT_THROW(centroid_compensation(q_wide.dev, l_wide.dev, mask22.dev, kc_wide.dev, kc_wide.dev, s2.dev, scale,
                                       o_wide.dev, lse_wide.dev, s),
                 UnsupportedError);
    const int64_t C = cuda::kMaxSelectColumns + 1;
    Twin p_long(poisoned(DType::F32, {1, 1, 1, C})), b_long(poisoned(DType::U8, {1, 1, 1, C}));
    Twin m_long(poisoned(DType::U8, {1, 1, 1, C}));
    Twin q1(i32_tensor({1, 1, 1}, {1})), k_long(i32_tensor({1, 1, C}, std::vector<int32_t>(C, 1)));
    EXPECT_THROW(select_error_aware(p_long.dev, b_long.dev, p_long.dev, q1.dev, k_long.dev, 1, m_long.dev, s),
                 UnsupportedError);
  }
  cs.sync();
}

}  // namespace
}  // namespace sapattn
