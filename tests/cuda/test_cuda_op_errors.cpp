// The SVG2 CUDA ops on bad input, each a typed error: out-of-range labels and permutation entries
// with the value checks on, too small or no workspace, non-finite inputs (check_finite names the
// element); and the CUDA Buffer's allocation round trip. The attention ops' errors are in
// test_cuda_attention_errors.cpp, SVG-EAR's in test_cuda_ear_errors.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "cuda_support.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace sapattn::cuda_test {
namespace {

using ref::Layout;

TEST(Errors, BadValuesAreReportedWithValueChecks) {
  const ValueChecksOn on;
  NonBlockingStream cs;
  const int64_t N = 100, C = 5;
  HostTensor labels = poisoned(DType::I32, {1, 2, N});
  ref::for_each_index(labels.view,
                      [&](const auto& idx) { ref::set(labels.view, idx, static_cast<double>(idx[2] % C)); });
  ref::set(labels.view, {0, 1, 37}, 9);  // out of range
  const DeviceTensor dl = to_device(labels);
  DeviceTensor dp = to_device(poisoned(DType::I32, {1, 2, N})), doff = to_device(poisoned(DType::I32, {1, 2, C + 1}));
  const Buffer ws = device_workspace(cluster_permutation_workspace_bytes(2, N, C, Device::cuda(0)));
  EXPECT_THROW(cluster_permutation(dl.view, C, dp.view, doff.view, cs.stream(), as_workspace(ws)),
               InvalidArgumentError);
  // Gather with an index out of range.
  HostTensor perm = poisoned(DType::I32, {1, 2, N});
  ref::for_each_index(perm.view, [&](const auto& idx) { ref::set(perm.view, idx, static_cast<double>(idx[2])); });
  ref::set(perm.view, {0, 0, 3}, -4);
  const DeviceTensor dperm = to_device(perm);
  const DeviceTensor dx = to_device(poisoned(DType::F32, {1, 2, N, 8}));
  DeviceTensor dout = to_device(poisoned(DType::F32, {1, 2, N, 8}));
  EXPECT_THROW(gather_rows(dx.view, dperm.view, dout.view, cs.stream()), InvalidArgumentError);
  EXPECT_THROW(scatter_rows(dx.view, dperm.view, dout.view, cs.stream()), InvalidArgumentError);
  // k-means update with a bad label.
  ref::Rng rng(testing_support::case_seed());
  const DeviceTensor dpts = to_device(mixture_points(DType::BF16, 1, 2, N, 64, Layout::Contiguous, 3, rng));
  DeviceTensor dc = to_device(poisoned(DType::F32, {1, 2, C, 64})), ds = to_device(poisoned(DType::I32, {1, 2, C}));
  const Buffer kws = device_workspace(kmeans_workspace_bytes(2, N, C, 64, Device::cuda(0)));
  EXPECT_THROW(kmeans_update(dpts.view, dl.view, dc.view, ds.view, cs.stream(), as_workspace(kws)),
               InvalidArgumentError);
  // order_clusters with a bad label.
  const Buffer ows = device_workspace(order_clusters_workspace_bytes(2, C, 64, Device::cuda(0)));
  EXPECT_THROW(order_clusters(dc.view, ds.view, dl.view, cs.stream(), as_workspace(ows)), InvalidArgumentError);
  // Good values pass.
  ref::set(labels.view, {0, 1, 37}, 2);
  const DeviceTensor good = to_device(labels);
  EXPECT_NO_THROW(cluster_permutation(good.view, C, dp.view, doff.view, cs.stream(), as_workspace(ws)));
}

TEST(Errors, Workspace) {
  NonBlockingStream cs;
  ref::Rng rng(testing_support::case_seed());
  const DeviceTensor dx = to_device(mixture_points(DType::BF16, 1, 1, 300, 64, Layout::Contiguous, 3, rng));
  DeviceTensor dc = to_device(poisoned(DType::F32, {1, 1, 10, 64})), dl = to_device(poisoned(DType::I32, {1, 1, 300}));
  DeviceTensor ds = to_device(poisoned(DType::I32, {1, 1, 10}));
  const size_t need = kmeans_workspace_bytes(1, 300, 10, 64, Device::cuda(0));
  EXPECT_GT(need, 0u);
  const Buffer small = device_workspace(need / 2);
  EXPECT_THROW(kmeans(dx.view, dc.view, dl.view, ds.view, 1, cs.stream(), Workspace{small.data(), need / 2}),
               WorkspaceError);
  EXPECT_THROW(kmeans(dx.view, dc.view, dl.view, ds.view, 1, cs.stream()), WorkspaceError);
  EXPECT_THROW(kmeans_init(dx.view, dc.view, 1, cs.stream()), WorkspaceError);
}

TEST(Errors, CheckFinite) {
  NonBlockingStream cs;
  HostTensor x = poisoned(DType::BF16, {1, 2, 50, 64}, Layout::Transposed);
  ref::for_each_index(x.view, [&](const auto& idx) { ref::set(x.view, idx, 1.0); });
  const DeviceTensor good = to_device(x);
  EXPECT_NO_THROW(cuda::check_finite(good.view, "q", cs.stream()));
  ref::set(x.view, {0, 1, 17, 5}, NAN);
  const DeviceTensor bad = to_device(x);
  try {
    cuda::check_finite(bad.view, "q", cs.stream());
    FAIL() << "no NonFiniteError";
  } catch (const NonFiniteError& e) {
    EXPECT_NE(std::string(e.what()).find("b=0, h=1, s=17, d=5"), std::string::npos) << e.what();
  }
}

TEST(Buffer, CudaAllocationRoundTrip) {
  const Buffer b = Buffer::allocate(1 << 20, Device::cuda(0));
  ASSERT_NE(b.data(), nullptr);
  EXPECT_EQ(b.device(), Device::cuda(0));
  std::vector<uint8_t> in(1 << 20);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<uint8_t>(i * 7);
  SAPATTN_CUDA_CHECK(cudaMemcpy(b.data(), in.data(), in.size(), cudaMemcpyHostToDevice));
  EXPECT_EQ(download(static_cast<const uint8_t*>(b.data()), static_cast<int64_t>(in.size())), in);
  EXPECT_THROW(Buffer::allocate(16, Device::cuda(63)), UnsupportedError);
}

}  // namespace
}  // namespace sapattn::cuda_test
