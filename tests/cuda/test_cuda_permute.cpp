// The CUDA ops that reorder tokens and clusters against the CPU backend on the same inputs, compared
// byte for byte (outputs poisoned alike on both sides, so bytes outside a strided view count too):
// cluster_permutation (permutation and offsets; skewed sizes, C > N, one cluster, one token, a Wan
// 720p head), gather_rows and scatter_rows (dtype pairs, layouts, LSE rows of D = 1) and
// order_clusters (the CPU's chain in the CPU's arithmetic at svg2's size).
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cuda_support.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace sapattn::cuda_test {
namespace {

using ref::Layout;

// Labels [B,H,N] of C clusters with skewed sizes: some clusters large, many empty.
HostTensor skewed_labels(int64_t B, int64_t H, int64_t N, int64_t C, ref::Rng& rng) {
  HostTensor l = poisoned(DType::I32, {B, H, N});
  ref::for_each_index(l.view, [&](const auto& idx) {
    const double u = rng.uniform();
    ref::set(l.view, idx,
             static_cast<double>(std::min<int64_t>(C - 1, static_cast<int64_t>(u * u * static_cast<double>(C)))));
  });
  return l;
}

struct PermCase {
  int64_t B, H, N, C;
};

class PermuteCase : public ::testing::TestWithParam<PermCase> {};

TEST_P(PermuteCase, ClusterPermutationIsIdenticalToCpu) {
  const PermCase p = GetParam();
  ref::Rng rng(testing_support::case_seed());
  const HostTensor labels = skewed_labels(p.B, p.H, p.N, p.C, rng);
  HostTensor perm = poisoned(DType::I32, {p.B, p.H, p.N}), off = poisoned(DType::I32, {p.B, p.H, p.C + 1});
  cluster_permutation(labels.view, static_cast<int>(p.C), perm.view, off.view, kCpu);
  NonBlockingStream cs;
  const DeviceTensor dl = to_device(labels);
  DeviceTensor dp = to_device(poisoned(DType::I32, {p.B, p.H, p.N})),
               doff = to_device(poisoned(DType::I32, {p.B, p.H, p.C + 1}));
  const Buffer ws =
      device_workspace(cluster_permutation_workspace_bytes(p.B * p.H, p.N, static_cast<int>(p.C), Device::cuda(0)));
  cluster_permutation(dl.view, static_cast<int>(p.C), dp.view, doff.view, cs.stream(), as_workspace(ws));
  cs.sync();
  EXPECT_EQ(to_host(dp, perm).bytes(), perm.bytes());
  EXPECT_EQ(to_host(doff, off).bytes(), off.bytes());
}

INSTANTIATE_TEST_SUITE_P(Cases, PermuteCase,
                         ::testing::Values(PermCase{2, 3, 500, 17}, PermCase{1, 3, 2000, 300},
                                           PermCase{2, 2, 50, 80},  // C > N
                                           PermCase{1, 2, 300, 1}, PermCase{1, 1, 1, 1}, PermCase{1, 40, 33, 4},
                                           PermCase{1, 2, 75600, 1002}),  // a Wan 720p head with text clusters
                         [](const auto& p) {
                           return "B" + std::to_string(p.param.B) + "H" + std::to_string(p.param.H) + "N" +
                                  std::to_string(p.param.N) + "C" + std::to_string(p.param.C);
                         });

struct RowsCase {
  DType x, out;
  Layout x_layout, out_layout;
  int64_t B, H, N, D;
};

class RowsCaseTest : public ::testing::TestWithParam<RowsCase> {};

TEST_P(RowsCaseTest, GatherAndScatterAreIdenticalToCpu) {
  const RowsCase r = GetParam();
  ref::Rng rng(testing_support::case_seed());
  const HostTensor labels = skewed_labels(r.B, r.H, r.N, 13, rng);
  HostTensor perm = poisoned(DType::I32, {r.B, r.H, r.N}), off = poisoned(DType::I32, {r.B, r.H, 14});
  cluster_permutation(labels.view, 13, perm.view, off.view, kCpu);
  HostTensor x = poisoned(r.x, {r.B, r.H, r.N, r.D}, r.x_layout);
  ref::for_each_index(x.view, [&](const auto& idx) { ref::set(x.view, idx, 3.0 * rng.normal()); });
  NonBlockingStream cs;
  const DeviceTensor dx = to_device(x), dperm = to_device(perm);
  for (bool gather : {true, false}) {
    SCOPED_TRACE(gather ? "gather" : "scatter");
    HostTensor cpu_out = poisoned(r.out, {r.B, r.H, r.N, r.D}, r.out_layout);
    DeviceTensor dout = to_device(cpu_out);  // both poisoned alike: bytes outside the view must stay
    if (gather) {
      gather_rows(x.view, perm.view, cpu_out.view, kCpu);
      gather_rows(dx.view, dperm.view, dout.view, cs.stream());
    } else {
      scatter_rows(x.view, perm.view, cpu_out.view, kCpu);
      scatter_rows(dx.view, dperm.view, dout.view, cs.stream());
    }
    cs.sync();
    EXPECT_EQ(to_host(dout, cpu_out).bytes(), cpu_out.bytes());
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, RowsCaseTest,
    ::testing::Values(RowsCase{DType::BF16, DType::BF16, Layout::Contiguous, Layout::Contiguous, 1, 3, 1000, 128},
                      RowsCase{DType::BF16, DType::BF16, Layout::Transposed, Layout::Contiguous, 2, 3, 333, 128},
                      RowsCase{DType::F32, DType::BF16, Layout::Contiguous, Layout::Transposed, 1, 2, 500, 64},
                      RowsCase{DType::BF16, DType::F32, Layout::Padded, Layout::Contiguous, 1, 2, 257, 128},
                      RowsCase{DType::F16, DType::F16, Layout::Contiguous, Layout::Padded, 2, 2, 100, 64},
                      RowsCase{DType::F32, DType::F32, Layout::Contiguous, Layout::Contiguous, 1, 2, 300,
                               1},  // LSE rows
                      RowsCase{DType::F32, DType::F16, Layout::Transposed, Layout::Transposed, 1, 4, 129, 40}),
    [](const auto& p) {
      const RowsCase& r = p.param;
      return std::string(dtype_name(r.x)) + "_" + std::string(dtype_name(r.out)) + "_" + layout_tag(r.x_layout) + "_" +
             layout_tag(r.out_layout) + "_D" + std::to_string(r.D);
    });

// order_clusters computes the CPU's chain in the CPU's arithmetic: identical bytes, also at the size
// svg2 orders (1000 clusters of D = 128), with empty clusters and strided labels.
TEST(ClusterOrder, IdenticalToCpu) {
  ref::Rng rng(testing_support::case_seed());
  const int64_t B = 2, H = 2, C = 1000, D = 128, N = 6000;
  HostTensor cent = poisoned(DType::F32, {B, H, C, D}), sizes = poisoned(DType::I32, {B, H, C}),
             labels = poisoned(DType::I32, {B, H, N + 5});
  ref::for_each_index(cent.view,
                      [&](const auto& idx) { ref::set(cent.view, idx, rng.normal() + (idx[2] % 7 == 0 ? 2.0 : 0.0)); });
  ref::for_each_index(sizes.view, [&](const auto& idx) { ref::set(sizes.view, idx, 0); });
  ref::for_each_index(labels.view, [&](const auto& idx) {
    const int64_t c = idx[2] < N ? rng.integer(0, C - 1) / 3 * 3 : -1;  // clusters not divisible by 3 stay empty
    ref::set(labels.view, idx, static_cast<double>(c));
    if (c >= 0) ref::set(sizes.view, {idx[0], idx[1], c}, ref::get(sizes.view, {idx[0], idx[1], c}) + 1);
  });
  NonBlockingStream cs;
  DeviceTensor dc = to_device(cent), ds = to_device(sizes), dl = to_device(labels);
  const Buffer ws = device_workspace(order_clusters_workspace_bytes(B * H, C, D, Device::cuda(0)));
  order_clusters(dc.view, ds.view, dl.view.slice(2, 0, N), cs.stream(), as_workspace(ws));
  order_clusters(cent.view, sizes.view, labels.view.slice(2, 0, N), kCpu);
  cs.sync();
  EXPECT_EQ(to_host(dc, cent).bytes(), cent.bytes());
  EXPECT_EQ(to_host(ds, sizes).bytes(), sizes.bytes());
  EXPECT_EQ(to_host(dl, labels).bytes(), labels.bytes());
  // A small workspace throws.
  EXPECT_THROW(order_clusters(dc.view, ds.view, dl.view.slice(2, 0, N), cs.stream(), Workspace{ws.data(), 64}),
               WorkspaceError);
}

}  // namespace
}  // namespace sapattn::cuda_test
