// The CUDA ops that reorder tokens and clusters against the CPU backend on the same inputs, compared
// byte for byte (outputs poisoned alike on both sides, so bytes outside a strided view count too):
// cluster_permutation (permutation and offsets; skewed sizes, C > N, one cluster, one token, a Wan
// 720p head), gather_rows and scatter_rows (dtype pairs, layouts, LSE rows of D = 1) and
// order_clusters (the CPU's chain in the CPU's arithmetic at svg2's size, and at the shapes and
// values that pick and stress each chain kernel).
#include <gtest/gtest.h>

#include <algorithm>
#include <limits>
#include <ostream>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "core/cuda_check.hpp"
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

// The same at the shapes that pick each chain kernel (cuda::order_chain_kernel) and at its edges: the
// cluster kernel (sm_90+) at C not a multiple of a warp or of the CTAs, D = 64, D padded to 64 or 128,
// one cluster, every cluster empty, the largest C (8 CTAs), tiny CTAs (the "cluster:N" knob), many heads;
// centroids with exact and near ties, NaN, infinities, zero rows and rows whose squared norm overflows
// (similarities of +0 and -0, which tie); the block kernel above the cluster kernel's shapes and
// forced at the svg2 size; the matrix kernels (the knob "matrix", any GPU) at the same edges, at their
// largest C (8 candidates a thread; named Large: the sanitizers skip its 67 M similarities) and outside
// their shapes (the default choice). The default: the matrix kernels at the svg2 size, the cluster
// kernel above 2048 clusters. (The cluster kernel's cases take the knob "cluster".)
enum class OrderFill { Normal, Duplicates, NonFinite };

struct OrderCase {
  const char* name;
  int64_t B, H, C, D;
  OrderFill fill;
  double empty_share;
  const char* kernel;  // set_order_chain_override's name; "" for the default choice
  const char* runs;    // the kernel that must run (OrderChainKernel::name()); "cluster" on sm_90+ only
};

void PrintTo(const OrderCase& k, std::ostream* os) { *os << k.name; }

class ClusterOrderCases : public ::testing::TestWithParam<OrderCase> {
 protected:
  void SetUp() override { cuda::set_order_chain_override(GetParam().kernel); }
  void TearDown() override { cuda::set_order_chain_override(""); }
};

TEST_P(ClusterOrderCases, IdenticalToCpu) {
  const OrderCase& k = GetParam();
  const int64_t B = k.B, H = k.H, C = k.C, D = k.D, N = 3 * C + 17;
  int device = 0, major = 0;
  SAPATTN_CUDA_CHECK(cudaGetDevice(&device));
  SAPATTN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  const cuda::OrderChainKernel chosen = cuda::order_chain_kernel(device, C, D);
  ASSERT_TRUE(chosen.supported);
  const std::string runs = major < 9 && std::string(k.runs) == "cluster" ? "block" : k.runs;
  EXPECT_EQ(chosen.name(), runs) << "the case no longer covers the kernel it is meant for";
  ref::Rng rng(testing_support::case_seed());
  HostTensor cent = poisoned(DType::F32, {B, H, C, D}), sizes = poisoned(DType::I32, {B, H, C}),
             labels = poisoned(DType::I32, {B, H, N});
  auto* x = static_cast<float*>(cent.view.data);
  std::vector<float> base(static_cast<size_t>(8 * D));
  for (float& v : base) v = static_cast<float>(rng.normal());
  for (int64_t r = 0; r < B * H * C; ++r) {
    float* row = x + r * D;
    for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(rng.normal());
    const double u = rng.uniform();
    if (k.fill == OrderFill::Duplicates && u < 0.67) {  // exact copies of 8 rows, and scaled copies
      const float scale = u < 0.33 ? 1.0f : static_cast<float>(rng.integer(2, 5));
      const float* b = base.data() + rng.integer(0, 7) * D;
      for (int64_t d = 0; d < D; ++d) row[d] = scale * b[d];
    } else if (k.fill == OrderFill::NonFinite) {
      if (u < 0.1) {
        row[rng.integer(0, D - 1)] = std::numeric_limits<float>::quiet_NaN();
      } else if (u < 0.2) {
        row[rng.integer(0, D - 1)] = (u < 0.15 ? 1 : -1) * std::numeric_limits<float>::infinity();
      } else if (u < 0.35) {
        for (int64_t d = 0; d < D; ++d) row[d] *= 1e30f;
      } else if (u < 0.45) {
        for (int64_t d = 0; d < D; ++d) row[d] = 0.0f;
      }
    }
  }
  auto* size = static_cast<int32_t*>(sizes.view.data);
  for (int64_t i = 0; i < B * H * C; ++i)
    size[i] = rng.uniform() < k.empty_share ? 0 : static_cast<int32_t>(rng.integer(1, 40));
  auto* label = static_cast<int32_t*>(labels.view.data);
  for (int64_t i = 0; i < B * H * N; ++i) label[i] = static_cast<int32_t>(rng.integer(0, C - 1));
  NonBlockingStream cs;
  DeviceTensor dc = to_device(cent), ds = to_device(sizes), dl = to_device(labels);
  const Buffer ws = device_workspace(order_clusters_workspace_bytes(B * H, C, D, Device::cuda(0)));
  order_clusters(dc.view, ds.view, dl.view, cs.stream(), as_workspace(ws));
  order_clusters(cent.view, sizes.view, labels.view, kCpu);
  cs.sync();
  EXPECT_EQ(to_host(dc, cent).bytes(), cent.bytes());
  EXPECT_EQ(to_host(ds, sizes).bytes(), sizes.bytes());
  EXPECT_EQ(to_host(dl, labels).bytes(), labels.bytes());
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ClusterOrderCases,
    ::testing::Values(OrderCase{"wan_d128", 1, 3, 1000, 128, OrderFill::Normal, 0.2, "cluster", "cluster"},
                      OrderCase{"wan_d128_cta256", 1, 3, 1000, 128, OrderFill::Normal, 0.2, "cluster:256", "cluster"},
                      OrderCase{"wan_d128_block", 1, 3, 1000, 128, OrderFill::Normal, 0.2, "block", "block"},
                      OrderCase{"d64", 2, 1, 1000, 64, OrderFill::Normal, 0.1, "cluster", "cluster"},
                      OrderCase{"d100_c333", 2, 2, 333, 100, OrderFill::Normal, 0.3, "cluster", "cluster"},
                      OrderCase{"d20_c37", 1, 2, 37, 20, OrderFill::Normal, 0.2, "cluster", "cluster"},
                      OrderCase{"c2816_8ctas", 1, 1, 2816, 128, OrderFill::Normal, 0.1, "cluster", "cluster"},
                      OrderCase{"c100_ctas_of_32", 1, 2, 100, 128, OrderFill::Normal, 0.2, "cluster:32", "cluster"},
                      OrderCase{"one_cluster", 2, 3, 1, 64, OrderFill::Normal, 0.5, "cluster", "cluster"},
                      OrderCase{"all_empty", 1, 2, 50, 128, OrderFill::Normal, 1.0, "cluster", "cluster"},
                      OrderCase{"many_heads", 4, 150, 64, 64, OrderFill::Normal, 0.2, "cluster", "cluster"},
                      OrderCase{"ties", 1, 2, 200, 96, OrderFill::Duplicates, 0.1, "cluster", "cluster"},
                      OrderCase{"non_finite", 1, 2, 300, 128, OrderFill::NonFinite, 0.1, "cluster", "cluster"},
                      OrderCase{"non_finite_block", 1, 2, 300, 128, OrderFill::NonFinite, 0.1, "block", "block"},
                      OrderCase{"c2817_block", 1, 1, 2817, 128, OrderFill::Normal, 0.1, "cluster", "block"},
                      OrderCase{"d200_block", 1, 2, 300, 200, OrderFill::Normal, 0.1, "", "block"},
                      OrderCase{"wan_d128_default", 1, 3, 1000, 128, OrderFill::Normal, 0.2, "", "matrix"},
                      OrderCase{"c2049_default", 1, 1, 2049, 128, OrderFill::Normal, 0.1, "", "cluster"},
                      OrderCase{"wan_d128_matrix", 1, 3, 1000, 128, OrderFill::Normal, 0.2, "matrix", "matrix"},
                      OrderCase{"d64_matrix", 2, 1, 1000, 64, OrderFill::Normal, 0.1, "matrix", "matrix"},
                      OrderCase{"d100_c333_matrix", 2, 2, 333, 100, OrderFill::Normal, 0.3, "matrix", "matrix"},
                      OrderCase{"d20_c37_matrix", 1, 2, 37, 20, OrderFill::Normal, 0.2, "matrix", "matrix"},
                      OrderCase{"one_cluster_matrix", 2, 3, 1, 64, OrderFill::Normal, 0.5, "matrix", "matrix"},
                      OrderCase{"all_empty_matrix", 1, 2, 50, 128, OrderFill::Normal, 1.0, "matrix", "matrix"},
                      OrderCase{"many_heads_matrix", 4, 150, 64, 64, OrderFill::Normal, 0.2, "matrix", "matrix"},
                      OrderCase{"ties_matrix", 1, 2, 200, 96, OrderFill::Duplicates, 0.1, "matrix", "matrix"},
                      OrderCase{"non_finite_matrix", 1, 2, 300, 128, OrderFill::NonFinite, 0.1, "matrix", "matrix"},
                      OrderCase{"Large_c8192_matrix", 1, 1, 8192, 64, OrderFill::Normal, 0.9, "matrix", "matrix"},
                      OrderCase{"d200_matrix_default", 1, 2, 300, 200, OrderFill::Normal, 0.1, "matrix", "block"},
                      OrderCase{"c2816_matrix", 1, 1, 2816, 128, OrderFill::NonFinite, 0.1, "matrix", "matrix"}),
    [](const auto& p) { return std::string(p.param.name); });

TEST(ClusterOrder, KernelOverrideNames) {
  EXPECT_THROW(cuda::set_order_chain_override("cluster:48"), InvalidArgumentError);
  EXPECT_THROW(cuda::set_order_chain_override("cluster:"), InvalidArgumentError);
  EXPECT_THROW(cuda::set_order_chain_override("warp"), InvalidArgumentError);
  EXPECT_THROW(cuda::set_order_chain_override("matrix:1"), InvalidArgumentError);
  cuda::set_order_chain_override("block");
  EXPECT_FALSE(cuda::order_chain_kernel(0, 1000, 128).cluster);
  EXPECT_FALSE(cuda::order_chain_kernel(0, 1000, 128).matrix);
  // The matrix kernels up to C = 8192 and D = 128 under their knob, up to C = 2048 by default, and
  // their 4 C^2 bytes of keys per head only where they run.
  const size_t plain = order_clusters_workspace_bytes(3, 1000, 128, Device::cuda(0));
  cuda::set_order_chain_override("cluster");
  EXPECT_FALSE(cuda::order_chain_kernel(0, 1000, 128).matrix);
  EXPECT_EQ(order_clusters_workspace_bytes(3, 1000, 128, Device::cuda(0)), plain);
  cuda::set_order_chain_override("matrix");
  EXPECT_TRUE(cuda::order_chain_kernel(0, 8192, 128).matrix);
  EXPECT_FALSE(cuda::order_chain_kernel(0, 8193, 64).matrix);
  EXPECT_FALSE(cuda::order_chain_kernel(0, 1000, 129).matrix);
  const size_t with_keys = order_clusters_workspace_bytes(3, 1000, 128, Device::cuda(0));
  EXPECT_GE(with_keys, plain + 3 * 1000 * 1000 * 4);
  const size_t outside = order_clusters_workspace_bytes(3, 1000, 129, Device::cuda(0));
  cuda::set_order_chain_override("");
  EXPECT_EQ(order_clusters_workspace_bytes(3, 1000, 129, Device::cuda(0)), outside);
  EXPECT_EQ(order_clusters_workspace_bytes(3, 1000, 128, Device::cuda(0)), with_keys);
  EXPECT_TRUE(cuda::order_chain_kernel(0, 1000, 128).matrix);
  EXPECT_TRUE(cuda::order_chain_kernel(0, 2048, 128).matrix);
  EXPECT_FALSE(cuda::order_chain_kernel(0, 2049, 128).matrix);
}

}  // namespace
}  // namespace sapattn::cuda_test
