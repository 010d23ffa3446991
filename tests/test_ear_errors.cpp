// SVG-EAR's ops on bad input (docs/ear.md): each of cluster_means, ear_probe, the routing, the
// compensation and the ear-plus ops throws its typed error and leaves its outputs untouched.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "ear_support.hpp"
#include "sapattn/svg2.hpp"
#include "test_support.hpp"

namespace sapattn {
namespace {

using namespace ear_test;
using namespace testing_support;

// What a compensation call finds at its outputs: out [1,1,S,D] random, lse [1,1,S] zero, as a
// sparse attention leaves them; and a [1,1,Cq,Ck] mask that skips every pair.
struct CompensationOutputs {
  ref::HostTensor out, lse;
  Tensor mask;
  std::vector<const ref::HostTensor*> list() const { return {&out, &lse}; }
};

CompensationOutputs compensation_outputs(int64_t S, int64_t D, int64_t Cq, int64_t Ck) {
  CompensationOutputs o{ref::make_tensor(DType::F32, {1, 1, S, D}), ref::make_tensor(DType::F32, {1, 1, S}),
                        Tensor(DType::U8, {1, 1, Cq, Ck})};
  std::fill_n(o.mask.data_as<uint8_t>(), o.mask.numel(), uint8_t{0});
  ref::Rng rng(case_seed());
  ref::fill_normal(o.out.view, rng);
  std::fill_n(static_cast<float*>(o.lse.view.data), S, 0.0f);
  return o;
}

TEST(EarErrors, ClusterMeans) {
  ref::HostTensor means = ref::make_tensor(DType::F32, {1, 2, 4, 8});
  ref::poison(means);
  const Tensor points(DType::F32, {1, 2, 10, 8});
  std::fill_n(points.data_as<float>(), points.numel(), 1.0f);
  const Tensor labels = sizes_tensor({1, 2, 10}, std::vector<int32_t>(20, 1));
  const Tensor bad_labels = sizes_tensor({1, 2, 10}, {0, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0});
  const Tensor short_labels = sizes_tensor({1, 2, 9}, std::vector<int32_t>(18, 0));
  const Tensor f16_means(DType::F16, {1, 2, 4, 8});
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, means,
                         cluster_means(points.view(), bad_labels.view(), means.view, kStream));
  EXPECT_ERROR_UNTOUCHED(ShapeError, means, cluster_means(points.view(), short_labels.view(), means.view, kStream));
  EXPECT_THROW(cluster_means(points.view(), labels.view(), f16_means.view(), kStream), DTypeError);
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, means,
                         cluster_means(ref::on_cuda(points.view()), labels.view(), means.view, kStream));
}

TEST(EarErrors, ProbeAndRouting) {
  const int64_t Cq = 2, Ck = 3, N = 6, D = 4;
  const Tensor qc(DType::F32, {1, 1, Cq, D}), kc(DType::F32, {1, 1, Ck, D}), vc(DType::F32, {1, 1, Ck, D});
  const Tensor k(DType::F32, {1, 1, N, D}), v(DType::F32, {1, 1, N, D}), v_short(DType::F32, {1, 1, N - 1, D});
  for (const Tensor* t : {&qc, &kc, &vc, &k, &v}) std::fill_n(t->data_as<float>(), t->numel(), 0.5f);
  const Tensor labels = sizes_tensor({1, 1, N}, {0, 1, 2, 0, 1, 2});
  const Tensor q_sizes = sizes_tensor({1, 1, Cq}, {3, 3}), k_sizes = sizes_tensor({1, 1, Ck}, {2, 2, 2});
  const Tensor negative = sizes_tensor({1, 1, Cq}, {3, -1});
  ref::HostTensor scores = ref::make_tensor(DType::F32, {1, 1, Cq, Ck});
  ref::poison(scores);
  const auto run = [&](const Tensor& vv, const Tensor& qs, float gamma, const TensorView& out) {
    ear_probe(qc.view(), kc.view(), vc.view(), k.view(), vv.view(), labels.view(), qs.view(), k_sizes.view(), 0.5f,
              gamma, out, kStream);
  };
  EXPECT_ERROR_UNTOUCHED(ShapeError, scores, run(v_short, q_sizes, 1.0f, scores.view));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, scores, run(v, negative, 1.0f, scores.view));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, scores, run(v, q_sizes, -1.0f, scores.view));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, scores,
                         run(v, q_sizes, std::numeric_limits<float>::quiet_NaN(), scores.view));
  const Tensor wrong_scores(DType::F32, {1, 1, Ck, Cq});
  EXPECT_THROW(run(v, q_sizes, 1.0f, wrong_scores.view()), ShapeError);

  run(v, q_sizes, 1.0f, scores.view);
  ref::HostTensor mask = ref::make_tensor(DType::U8, {1, 1, Cq, Ck});
  ref::poison(mask);
  Tensor budget(DType::U8, {1, 1, Cq, Ck});
  std::fill_n(budget.data_as<uint8_t>(), budget.numel(), uint8_t{1});
  const Tensor probs(DType::F32, {1, 1, Cq, Ck});
  std::fill_n(probs.data_as<float>(), probs.numel(), 1.0f / Ck);
  const Tensor f32_budget(DType::F32, {1, 1, Cq, Ck});
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, mask,
                         select_error_aware(probs.view(), budget.view(), scores.view, q_sizes.view(), k_sizes.view(),
                                            -1, mask.view, kStream));
  EXPECT_ERROR_UNTOUCHED(DTypeError, mask,
                         select_error_aware(probs.view(), f32_budget.view(), scores.view, q_sizes.view(),
                                            k_sizes.view(), 1, mask.view, kStream));
  EXPECT_ERROR_UNTOUCHED(ShapeError, mask,
                         select_error_aware(probs.view(), budget.view(), scores.view, k_sizes.view(), q_sizes.view(), 1,
                                            mask.view, kStream));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, mask,
                         select_error_aware(probs.view(), budget.view(), scores.view, negative.view(), k_sizes.view(),
                                            1, mask.view, kStream));
}

TEST(EarErrors, Compensation) {
  const int64_t S = 5, N = 4, D = 4, Cq = 2, Ck = 3;
  const Tensor q(DType::F32, {1, 1, S, D}), kc(DType::F32, {1, 1, Ck, D}), vc(DType::F32, {1, 1, Ck, D});
  for (const Tensor* t : {&q, &kc, &vc}) std::fill_n(t->data_as<float>(), t->numel(), 0.25f);
  const Tensor labels = sizes_tensor({1, 1, N}, {0, 1, 1, 0}), bad_labels = sizes_tensor({1, 1, N}, {0, 2, 1, 0});
  const Tensor long_labels = sizes_tensor({1, 1, S + 1}, std::vector<int32_t>(S + 1, 0));
  const Tensor sizes = sizes_tensor({1, 1, Ck}, {2, 0, 3}), negative = sizes_tensor({1, 1, Ck}, {2, -2, 3});
  const CompensationOutputs o = compensation_outputs(S, D, Cq, Ck);
  const std::vector<const ref::HostTensor*> outputs = o.list();
  const auto run = [&](const Tensor& l, const Tensor& n, const TensorView& lse_view) {
    centroid_compensation(q.view(), l.view(), o.mask.view(), kc.view(), vc.view(), n.view(), 0.5f, o.out.view, lse_view,
                          kStream);
  };
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, outputs, run(bad_labels, sizes, o.lse.view));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, outputs, run(labels, negative, o.lse.view));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outputs, run(long_labels, sizes, o.lse.view));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outputs, run(labels, sizes, TensorView{}));  // lse is required
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, outputs, run(labels, sizes, ref::on_cuda(o.lse.view)));
}

TEST(EarErrors, EarPlusOps) {
  const int64_t Cq = 2, Ck = 3, N = 6, D = 4;
  const Tensor qc(DType::F32, {1, 1, Cq, D}), kc(DType::F32, {1, 1, Ck, D}), vc(DType::F32, {1, 1, Ck, D});
  const Tensor k(DType::F32, {1, 1, N, D}), v(DType::F32, {1, 1, N, D});
  for (const Tensor* t : {&qc, &kc, &vc, &k, &v}) std::fill_n(t->data_as<float>(), t->numel(), 0.5f);
  const Tensor labels = sizes_tensor({1, 1, N}, {0, 1, 2, 0, 1, 2}),
               bad_labels = sizes_tensor({1, 1, N}, {0, 1, 3, 0, 1, 2});
  const Tensor q_sizes = sizes_tensor({1, 1, Cq}, {3, 3}), k_sizes = sizes_tensor({1, 1, Ck}, {2, 2, 2});
  ref::HostTensor scores = ref::make_tensor(DType::F32, {1, 1, Cq, Ck});
  ref::HostTensor spread = ref::make_tensor(DType::F32, {1, 1, Cq, Ck});
  ref::HostTensor values = ref::make_tensor(DType::F32, {1, 1, Cq * Ck, D});
  for (ref::HostTensor* t : {&scores, &spread, &values}) ref::poison(*t);
  const std::vector<const ref::HostTensor*> probe_outputs{&scores, &spread, &values};
  const auto probe = [&](const TensorView& l, const TensorView& s, const TensorView& pv) {
    ear_plus_probe(qc.view(), kc.view(), vc.view(), k.view(), v.view(), l, q_sizes.view(), k_sizes.view(), 0.5f, 1.0f,
                   scores.view, s, pv, kStream);
  };
  const Tensor spread_t(DType::F32, {1, 1, Ck, Cq}), spread_u8(DType::U8, {1, 1, Cq, Ck});
  const Tensor values_short(DType::F32, {1, 1, Cq * Ck - 1, D});
  EXPECT_ERROR_UNTOUCHED(ShapeError, probe_outputs, probe(labels.view(), spread_t.view(), values.view));
  EXPECT_ERROR_UNTOUCHED(DTypeError, probe_outputs, probe(labels.view(), spread_u8.view(), values.view));
  EXPECT_ERROR_UNTOUCHED(ShapeError, probe_outputs, probe(labels.view(), spread.view, values_short.view()));
  const ref::HostTensor values_padded = ref::make_tensor(DType::F32, {1, 1, Cq * Ck, D}, ref::Layout::Padded);
  EXPECT_ERROR_UNTOUCHED(ShapeError, probe_outputs, probe(labels.view(), spread.view, values_padded.view));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, probe_outputs, probe(bad_labels.view(), spread.view, values.view));
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, probe_outputs, probe(labels.view(), ref::on_cuda(spread.view), values.view));

  // split_clusters: sub_sizes must have 2C entries; labels within [0, C).
  ref::HostTensor sub_labels = ref::make_tensor(DType::I32, {1, 1, N});
  ref::HostTensor sub_sizes = ref::make_tensor(DType::I32, {1, 1, 2 * Ck});
  ref::poison(sub_labels);
  ref::poison(sub_sizes);
  const std::vector<const ref::HostTensor*> split_outputs{&sub_labels, &sub_sizes};
  const Tensor sizes_c(DType::I32, {1, 1, Ck});
  EXPECT_ERROR_UNTOUCHED(ShapeError, split_outputs,
                         split_clusters(k.view(), labels.view(), kc.view(), sub_labels.view, sizes_c.view(), kStream));
  EXPECT_ERROR_UNTOUCHED(
      InvalidArgumentError, split_outputs,
      split_clusters(k.view(), bad_labels.view(), kc.view(), sub_labels.view, sub_sizes.view, kStream));

  // corrected_centroid_compensation: pseudo-keys a whole multiple of the mask's key clusters.
  const int64_t S = 5;
  const Tensor q(DType::F32, {1, 1, S, D}), kc4(DType::F32, {1, 1, 4, D}), vc4(DType::F32, {1, 1, 4, D});
  for (const Tensor* t : {&q, &kc4, &vc4}) std::fill_n(t->data_as<float>(), t->numel(), 0.25f);
  const Tensor q_labels = sizes_tensor({1, 1, S}, {0, 1, 1, 0, 0}), sizes4 = sizes_tensor({1, 1, 4}, {1, 1, 1, 1});
  const CompensationOutputs o = compensation_outputs(S, D, Cq, Ck);
  const std::vector<const ref::HostTensor*> outputs = o.list();
  EXPECT_ERROR_UNTOUCHED(
      ShapeError, outputs,
      corrected_centroid_compensation(q.view(), q_labels.view(), o.mask.view(), kc4.view(), vc4.view(), sizes4.view(),
                                      {}, {}, 0.5f, o.out.view, o.lse.view, kStream));
  EXPECT_ERROR_UNTOUCHED(
      ShapeError, outputs,
      corrected_centroid_compensation(q.view(), q_labels.view(), o.mask.view(), kc.view(), vc.view(), k_sizes.view(),
                                      spread_t.view(), {}, 0.5f, o.out.view, o.lse.view, kStream));
}

}  // namespace
}  // namespace sapattn
