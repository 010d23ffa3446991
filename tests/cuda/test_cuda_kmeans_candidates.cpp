// kmeans_assign_candidates on CUDA against the CPU op on the same inputs: the candidate lists and
// the labels use the CPU's fp32 arithmetic, so the labels must be identical byte for byte, on the
// k-means case table (B > 1, strided and padded layouts, C > N, C = 1, noise with near-ties, every
// dtype, head dims 32-128), for one candidate, a few, all but one and all of them; with the output
// aliasing the previous labels; at a Wan-shaped size ("Large": the sanitizer runs skip it); and on
// bad input (labels out of range with value checks on, too small a workspace).
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "cuda_support.hpp"
#include "kmeans_support.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace sapattn::cuda_test {
namespace {

// Previous labels [B,H,N] drawn at random in [0, C).
HostTensor random_labels(const KmCase& k, ref::Rng& rng) {
  HostTensor l = poisoned(DType::I32, {k.B, k.H, k.N});
  ref::for_each_index(l.view,
                      [&](const auto& idx) { ref::set(l.view, idx, static_cast<double>(rng.integer(0, k.C - 1))); });
  return l;
}

// The CPU's and the GPU's labels for m candidates; with `alias`, the GPU writes over its prev labels.
void expect_same_labels(const KmCase& k, const HostTensor& x, const HostTensor& c, const HostTensor& prev, int m,
                        bool alias = false) {
  SCOPED_TRACE("candidates " + std::to_string(m) + (alias ? " (output aliases prev_labels)" : ""));
  HostTensor cpu_l = poisoned(DType::I32, {k.B, k.H, k.N});
  kmeans_assign_candidates(x.view, c.view, prev.view, cpu_l.view, m, kCpu);
  NonBlockingStream cs;
  const DeviceTensor dx = to_device(x), dc = to_device(c);
  DeviceTensor dprev = to_device(prev);
  DeviceTensor dl = to_device(poisoned(DType::I32, {k.B, k.H, k.N}));
  const Buffer ws = device_workspace(kmeans_assign_candidates_workspace_bytes(k.B * k.H, k.N, k.C, m, Device::cuda(0)));
  DeviceTensor& out = alias ? dprev : dl;
  kmeans_assign_candidates(dx.view, dc.view, dprev.view, out.view, m, cs.stream(), as_workspace(ws));
  cs.sync();
  EXPECT_EQ(to_host(out, cpu_l).bytes(), cpu_l.bytes());
}

class KmeansCandidatesCase : public ::testing::TestWithParam<KmCase> {
 protected:
  const KmCase k = GetParam();
  ref::Rng rng{testing_support::case_seed()};
  const HostTensor x = points_of(k, rng);
};

TEST_P(KmeansCandidatesCase, IdenticalToCpu) {
  const HostTensor c = initial_centroids(k, x, rng);
  const HostTensor prev = random_labels(k, rng);
  std::vector<int> ms = {1, 4, static_cast<int>(std::max<int64_t>(1, k.C - 1)), static_cast<int>(k.C)};
  for (int m : ms) expect_same_labels(k, x, c, prev, m);
  expect_same_labels(k, x, c, prev, std::max(1, static_cast<int>(k.C / 2)), /*alias=*/true);
}

TEST_P(KmeansCandidatesCase, FromTheCpusOwnLabels) {
  // Labels of a Lloyd iteration as the previous ones (the use the op is for): most points keep theirs.
  const HostTensor c = initial_centroids(k, x, rng);
  const HostTensor prev = cpu_labels(k, x, c);
  expect_same_labels(k, x, c, prev, static_cast<int>(std::min<int64_t>(8, k.C)));
}

INSTANTIATE_TEST_SUITE_P(Cases, KmeansCandidatesCase, ::testing::ValuesIn(kmeans_cases()),
                         [](const auto& p) { return describe(p.param); });

TEST(KmeansCandidatesLarge, WanShapedHeadsMatchCpu) {
  // Two heads of Wan 2.1 480p: [1,2,32760,128] bf16, 1000 key clusters, 32 candidates.
  const KmCase k{1, 2, 32760, 128, 1000, DType::BF16, ref::Layout::Transposed, 700};
  ref::Rng rng(testing_support::case_seed());
  const HostTensor x = points_of(k, rng);
  const HostTensor c = initial_centroids(k, x, rng);
  expect_same_labels(k, x, c, cpu_labels(k, x, c), 32);
}

TEST(KmeansCandidatesErrors, BadLabelsAndWorkspace) {
  const ValueChecksOn on;
  NonBlockingStream cs;
  const KmCase k{1, 2, 100, 64, 5, DType::BF16, ref::Layout::Contiguous, 3};
  ref::Rng rng(testing_support::case_seed());
  const HostTensor x = points_of(k, rng);
  const DeviceTensor dx = to_device(x), dc = to_device(initial_centroids(k, x, rng));
  HostTensor prev = random_labels(k, rng);
  ref::set(prev.view, {0, 1, 37}, 9);  // out of range
  const DeviceTensor dprev = to_device(prev);
  DeviceTensor dl = to_device(poisoned(DType::I32, {k.B, k.H, k.N}));
  const size_t bytes = kmeans_assign_candidates_workspace_bytes(2, k.N, k.C, 2, Device::cuda(0));
  ASSERT_GT(bytes, 0u);
  const Buffer ws = device_workspace(bytes);
  EXPECT_THROW(kmeans_assign_candidates(dx.view, dc.view, dprev.view, dl.view, 2, cs.stream(), as_workspace(ws)),
               InvalidArgumentError);
  ref::set(prev.view, {0, 1, 37}, 2);
  const DeviceTensor good = to_device(prev);
  EXPECT_NO_THROW(kmeans_assign_candidates(dx.view, dc.view, good.view, dl.view, 2, cs.stream(), as_workspace(ws)));
  EXPECT_THROW(kmeans_assign_candidates(dx.view, dc.view, good.view, dl.view, 2, cs.stream(), {}), WorkspaceError);
  // Every centroid a candidate needs no workspace (the exact kmeans_assign).
  EXPECT_EQ(kmeans_assign_candidates_workspace_bytes(2, k.N, k.C, static_cast<int>(k.C), Device::cuda(0)), 0u);
  EXPECT_NO_THROW(kmeans_assign_candidates(dx.view, dc.view, good.view, dl.view, static_cast<int>(k.C), cs.stream()));
}

}  // namespace
}  // namespace sapattn::cuda_test
