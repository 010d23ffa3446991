// order_clusters: the greedy nearest-neighbour chain it promises (checked step by step in float64),
// a known answer, that only the numbering moves (centroids, sizes and every token's cluster stay
// together), empty clusters last, strided labels, and its errors. And the CUDA cluster kernel's
// arithmetic, run here on the host, against the CPU backend bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "cuda/permute/chain_arithmetic.hpp"
#include "reference.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace {

using namespace sapattn;
using namespace sapattn::testing_support;

struct Problem {
  int64_t B, H, C, D, N;
  HostTensor centroids, sizes, labels;
};

// Random centroids; labels drawn so that sizes count them, with about a fifth of the clusters empty.
Problem make_problem(int64_t B, int64_t H, int64_t C, int64_t D, int64_t N, ref::Rng& rng) {
  Problem p{B, H, C, D, N, ref::make_tensor(DType::F32, {B, H, C, D}), ref::make_tensor(DType::I32, {B, H, C}),
            ref::make_tensor(DType::I32, {B, H, N})};
  ref::fill_normal(p.centroids.view, rng);
  auto* size = static_cast<int32_t*>(p.sizes.view.data);
  auto* label = static_cast<int32_t*>(p.labels.view.data);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    std::vector<int32_t> used;
    for (int64_t c = 0; c < C; ++c)
      if (rng.uniform() > 0.2) used.push_back(static_cast<int32_t>(c));
    std::fill(size + bh * C, size + (bh + 1) * C, 0);
    for (int64_t i = 0; i < N; ++i) {
      const int32_t c = used.empty() ? 0 : used[static_cast<size_t>(rng.integer(0, static_cast<int64_t>(used.size()) - 1))];
      label[bh * N + i] = c;
      ++size[bh * C + c];
    }
  }
  return p;
}

const float* row(const HostTensor& t, int64_t bh, int64_t c) {
  const int64_t C = t.view.shape[2], D = t.view.shape[3];
  return static_cast<const float*>(t.view.data) + (bh * C + c) * D;
}

double cosine(const float* a, const float* b, int64_t D) {
  double ab = 0, aa = 0, bb = 0;
  for (int64_t d = 0; d < D; ++d) {
    ab += static_cast<double>(a[d]) * b[d];
    aa += static_cast<double>(a[d]) * a[d];
    bb += static_cast<double>(b[d]) * b[d];
  }
  return aa > 0 && bb > 0 ? ab / std::sqrt(aa * bb) : 0.0;
}

// The old cluster now numbered p, recovered from the moved centroid rows (all distinct here).
std::vector<int64_t> recover_order(const Problem& before, const HostTensor& after, int64_t bh) {
  std::vector<int64_t> order;
  for (int64_t p = 0; p < before.C; ++p) {
    int64_t found = -1;
    for (int64_t c = 0; c < before.C && found < 0; ++c)
      if (std::memcmp(row(after, bh, p), row(before.centroids, bh, c), sizeof(float) * before.D) == 0) found = c;
    order.push_back(found);
  }
  return order;
}

HostTensor copy_of(const HostTensor& t) {
  HostTensor c = ref::make_tensor(t.view.dtype, std::vector<int64_t>(t.view.shape.begin(), t.view.shape.begin() + t.view.rank));
  std::memcpy(c.view.data, t.view.data, static_cast<size_t>(t.view.numel()) * dtype_size(t.view.dtype));
  return c;
}

TEST(ClusterOrder, IsTheNearestNeighbourChainAndOnlyRenumbers) {
  ref::Rng rng(case_seed());
  const Problem before = make_problem(2, 3, 37, 20, 500, rng);
  HostTensor cent = copy_of(before.centroids), sizes = copy_of(before.sizes), labels = copy_of(before.labels);
  order_clusters(cent.view, sizes.view, labels.view, kStream);
  const auto* old_size = static_cast<const int32_t*>(before.sizes.view.data);
  const auto* new_size = static_cast<const int32_t*>(sizes.view.data);
  const auto* old_label = static_cast<const int32_t*>(before.labels.view.data);
  const auto* new_label = static_cast<const int32_t*>(labels.view.data);
  for (int64_t bh = 0; bh < 6; ++bh) {
    const std::vector<int64_t> order = recover_order(before, cent, bh);
    std::vector<int64_t> sorted = order;
    std::sort(sorted.begin(), sorted.end());
    ASSERT_EQ(sorted, [&] { std::vector<int64_t> v(37); std::iota(v.begin(), v.end(), 0); return v; }())
        << "head " << bh << ": the centroids are not a permutation of the old ones";
    std::vector<bool> visited(37, false);
    int64_t non_empty = 0;
    for (int64_t c = 0; c < 37; ++c) non_empty += old_size[bh * 37 + c] > 0;
    for (int64_t p = 0; p < 37; ++p) {
      const int64_t c = order[static_cast<size_t>(p)];
      EXPECT_EQ(new_size[bh * 37 + p], old_size[bh * 37 + c]) << "head " << bh << " position " << p;
      if (p >= non_empty) {  // empty clusters last, in index order
        EXPECT_EQ(old_size[bh * 37 + c], 0);
        if (p > non_empty) {
          EXPECT_GT(c, order[static_cast<size_t>(p - 1)]);
        }
        continue;
      }
      ASSERT_GT(old_size[bh * 37 + c], 0) << "an empty cluster inside the chain";
      if (p == 0) {
        int64_t first = 0;
        while (old_size[bh * 37 + first] == 0) ++first;
        EXPECT_EQ(c, first) << "the chain starts at the lowest non-empty cluster";
      } else {
        // The most similar unvisited non-empty cluster to the previous one (up to float rounding).
        const int64_t prev = order[static_cast<size_t>(p - 1)];
        double best = -2;
        for (int64_t o = 0; o < 37; ++o)
          if (!visited[static_cast<size_t>(o)] && old_size[bh * 37 + o] > 0 && o != prev)
            best = std::max(best, cosine(row(before.centroids, bh, prev), row(before.centroids, bh, o), 20));
        EXPECT_GE(cosine(row(before.centroids, bh, prev), row(before.centroids, bh, c), 20), best - 1e-5)
            << "head " << bh << " step " << p;
      }
      visited[static_cast<size_t>(c)] = true;
    }
    // Every token keeps its cluster: its new label names the moved row of its old one.
    for (int64_t i = 0; i < 500; ++i) {
      const int32_t nl = new_label[bh * 500 + i];
      ASSERT_TRUE(nl >= 0 && nl < 37);
      EXPECT_EQ(order[static_cast<size_t>(nl)], old_label[bh * 500 + i]) << "head " << bh << " token " << i;
    }
  }
}

TEST(ClusterOrder, KnownAnswerOnDirectionsInAPlane) {
  // Unit directions at 0, 60, 10, 50 and 20 degrees (cosine similarity orders them by angle), and a
  // cluster 5 that is empty: the chain from cluster 0 is 0, 2 (10), 4 (20), 3 (50), 1 (60), then 5.
  const double deg[] = {0, 60, 10, 50, 20, 30};
  HostTensor cent = ref::make_tensor(DType::F32, {1, 1, 6, 2}), sizes = ref::make_tensor(DType::I32, {1, 1, 6}),
             labels = ref::make_tensor(DType::I32, {1, 1, 5});
  for (int c = 0; c < 6; ++c) {
    ref::set(cent.view, {0, 0, c, 0}, 3.0 * std::cos(deg[c] * M_PI / 180));
    ref::set(cent.view, {0, 0, c, 1}, 3.0 * std::sin(deg[c] * M_PI / 180));
    ref::set(sizes.view, {0, 0, c}, c == 5 ? 0 : 1);
  }
  for (int i = 0; i < 5; ++i) ref::set(labels.view, {0, 0, i}, i);
  order_clusters(cent.view, sizes.view, labels.view, kStream);
  EXPECT_EQ(ref::to_i32(labels.view), (std::vector<int32_t>{0, 4, 1, 3, 2}));
  EXPECT_EQ(ref::to_i32(sizes.view), (std::vector<int32_t>{1, 1, 1, 1, 1, 0}));
  EXPECT_NEAR(ref::get(cent.view, {0, 0, 2, 1}), 3.0 * std::sin(20 * M_PI / 180), 1e-6);
  EXPECT_NEAR(ref::get(cent.view, {0, 0, 5, 1}), 3.0 * std::sin(30 * M_PI / 180), 1e-6);
}

TEST(ClusterOrder, StridedLabelsAndAllEmpty) {
  ref::Rng rng(case_seed());
  // Labels as the video part of a longer [B, H, N + 7] tensor: the tail is not touched.
  const Problem p = make_problem(1, 2, 9, 8, 40, rng);
  HostTensor longer = ref::make_tensor(DType::I32, {1, 2, 47});
  auto* l = static_cast<int32_t*>(longer.view.data);
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t i = 0; i < 47; ++i) l[h * 47 + i] = i < 40 ? static_cast<const int32_t*>(p.labels.view.data)[h * 40 + i] : -7;
  HostTensor cent = copy_of(p.centroids), sizes = copy_of(p.sizes), contiguous = copy_of(p.labels);
  order_clusters(cent.view, sizes.view, contiguous.view, kStream);
  HostTensor cent2 = copy_of(p.centroids), sizes2 = copy_of(p.sizes);
  order_clusters(cent2.view, sizes2.view, longer.view.slice(2, 0, 40), kStream);
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t i = 0; i < 47; ++i)
      EXPECT_EQ(l[h * 47 + i], i < 40 ? static_cast<const int32_t*>(contiguous.view.data)[h * 40 + i] : -7);
  // No non-empty cluster: the numbering stays.
  std::memset(sizes.view.data, 0, sizeof(int32_t) * 18);
  HostTensor before = copy_of(cent);
  order_clusters(cent.view, sizes.view, ref::make_tensor(DType::I32, {1, 2, 0}).view, kStream);
  EXPECT_EQ(std::memcmp(cent.view.data, before.view.data, sizeof(float) * 144), 0);
}

TEST(ClusterOrder, Errors) {
  ref::Rng rng(case_seed());
  Problem p = make_problem(1, 2, 5, 4, 10, rng);
  // A label outside [0, C): a typed error, and nothing changed.
  HostTensor cent = copy_of(p.centroids), labels = copy_of(p.labels);
  static_cast<int32_t*>(labels.view.data)[13] = 5;
  EXPECT_THROW(order_clusters(cent.view, p.sizes.view, labels.view, kStream), InvalidArgumentError);
  EXPECT_EQ(std::memcmp(cent.view.data, p.centroids.view.data, sizeof(float) * 40), 0);
  HostTensor f16 = ref::make_tensor(DType::F16, {1, 2, 5, 4});
  EXPECT_THROW(order_clusters(f16.view, p.sizes.view, p.labels.view, kStream), DTypeError);
  HostTensor sizes_f32 = ref::make_tensor(DType::F32, {1, 2, 5});
  EXPECT_THROW(order_clusters(p.centroids.view, sizes_f32.view, p.labels.view, kStream), DTypeError);
  HostTensor short_sizes = ref::make_tensor(DType::I32, {1, 2, 4});
  EXPECT_THROW(order_clusters(p.centroids.view, short_sizes.view, p.labels.view, kStream), ShapeError);
  HostTensor other_heads = ref::make_tensor(DType::I32, {1, 3, 10});
  EXPECT_THROW(order_clusters(p.centroids.view, p.sizes.view, other_heads.view, kStream), ShapeError);
  EXPECT_THROW(order_clusters_workspace_bytes(-1, 5, 4, Device::cpu()), InvalidArgumentError);
  EXPECT_EQ(order_clusters_workspace_bytes(2, 5, 4, Device::cpu()), 0u);
}

// ---------------------------------------------------------------------------------------------
// The CUDA cluster kernel's arithmetic on the host
// ---------------------------------------------------------------------------------------------

// The chain of the CUDA cluster kernel (src/cuda/permute/cluster_order.cu), computed with its own
// functions (chain_arithmetic.hpp): one "thread" per candidate holding its row padded with zeros to
// kD, the best candidate the largest key, then the lowest index. The kernel splits the candidates over
// CTAs, warps and lanes; the best of a set under a total order does not depend on the split, so one
// loop stands for every split. Returns each cluster's new number, empty clusters last.
template <int kD>
std::vector<int32_t> cluster_kernel_ranks(const float* cent, const int32_t* size, int64_t C, int64_t D) {
  namespace chain = sapattn::cuda::chain;
  struct Row {
    float v[kD];
  };
  std::vector<Row> rows(static_cast<size_t>(C));
  std::vector<float> inv(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) {
    Row& r = rows[static_cast<size_t>(c)];
    for (int d = 0; d < kD; ++d) r.v[d] = d < D ? cent[c * D + d] : 0.0f;
    inv[static_cast<size_t>(c)] = chain::inverse_norm(chain::squared_norm<kD>(r.v));
  }
  std::vector<int32_t> rank(static_cast<size_t>(C), -1);
  std::vector<char> alive(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) alive[static_cast<size_t>(c)] = size[c] != 0;
  int32_t step = 0;
  for (int64_t cur = -1;; ++step) {
    uint32_t best_key = chain::kNoCandidate;
    int64_t best = -1;
    for (int64_t c = 0; c < C; ++c) {
      if (!alive[static_cast<size_t>(c)]) continue;
      uint32_t key = 1;  // step 0: every candidate ties, the lowest index starts the chain
      if (cur >= 0) {
        const Row& current = rows[static_cast<size_t>(cur)];
        const float dot = chain::dot<kD>(rows[static_cast<size_t>(c)].v, [&](int j, float(&q)[4]) {
          for (int e = 0; e < 4; ++e) q[e] = current.v[4 * j + e];
        });
        key = chain::order_key(chain::similarity(dot, inv[static_cast<size_t>(cur)], inv[static_cast<size_t>(c)]));
      }
      if (key > best_key) {  // ascending c: an equal key keeps the lower index
        best_key = key;
        best = c;
      }
    }
    if (best < 0) break;
    rank[static_cast<size_t>(best)] = step;
    alive[static_cast<size_t>(best)] = 0;
    cur = best;
  }
  for (int64_t c = 0; c < C; ++c)
    if (size[c] == 0) rank[static_cast<size_t>(c)] = step++;
  return rank;
}

// The reference's dot product, written again from its definition: 32 lanes, lane l summing d = l,
// l + 32, ... with fmas, then the xor butterfly over all lanes, lane 0's value.
float warp_butterfly_dot(const float* a, const float* b, int64_t D) {
  float lane[32];
  for (int l = 0; l < 32; ++l) {
    lane[l] = 0.0f;
    for (int64_t d = l; d < D; d += 32) lane[l] = std::fma(a[d], b[d], lane[l]);
  }
  for (int m = 16; m > 0; m /= 2) {
    float next[32];
    for (int l = 0; l < 32; ++l) next[l] = lane[l] + lane[l ^ m];
    std::copy(next, next + 32, lane);
  }
  return lane[0];
}

// Equal as the chain compares them: the same bits, or both zero (padding may flip a zero's sign), or
// both NaN.
bool same_for_the_chain(float x, float y) {
  if (x != x || y != y) return x != x && y != y;
  return x == 0.0f ? y == 0.0f : std::memcmp(&x, &y, sizeof x) == 0;
}

template <int kD>
float thread_dot(const float* a, const float* b, int64_t D) {
  float row[kD], other[kD];
  for (int d = 0; d < kD; ++d) {
    row[d] = d < D ? b[d] : 0.0f;
    other[d] = d < D ? a[d] : 0.0f;
  }
  return sapattn::cuda::chain::dot<kD>(row, [&](int j, float(&q)[4]) {
    for (int e = 0; e < 4; ++e) q[e] = other[4 * j + e];
  });
}

// One thread's tree gives the warp butterfly's bits, on inputs whose sums depend on the order of the
// additions (magnitudes spread over 2^-20 .. 2^20: a plain left-to-right sum differs, checked too).
TEST(ClusterKernelArithmetic, DotIsTheWarpButterflyBitForBit) {
  ref::Rng rng(case_seed());
  for (const int64_t D : {1, 20, 33, 64, 96, 100, 128}) {
    int order_sensitive = 0;
    for (int pair = 0; pair < 2000; ++pair) {
      std::vector<float> a(static_cast<size_t>(D)), b(static_cast<size_t>(D));
      for (int64_t d = 0; d < D; ++d) {
        a[static_cast<size_t>(d)] =
            static_cast<float>(std::ldexp(rng.normal(), static_cast<int>(rng.integer(-20, 20))));
        b[static_cast<size_t>(d)] = static_cast<float>(rng.normal());
      }
      const float want = warp_butterfly_dot(a.data(), b.data(), D);
      if (D <= 64) {
        ASSERT_TRUE(same_for_the_chain(thread_dot<64>(a.data(), b.data(), D), want)) << "D " << D << " pair " << pair;
      }
      ASSERT_TRUE(same_for_the_chain(thread_dot<128>(a.data(), b.data(), D), want)) << "D " << D << " pair " << pair;
      float sequential = 0.0f;
      for (int64_t d = 0; d < D; ++d)
        sequential = std::fma(a[static_cast<size_t>(d)], b[static_cast<size_t>(d)], sequential);
      order_sensitive += !same_for_the_chain(sequential, want);
    }
    if (D >= 33) {
      EXPECT_GT(order_sensitive, 100) << "D " << D << ": the inputs do not tell summation orders apart";
    }
  }
  // The norm and the similarity as the reference forms them.
  namespace chain = sapattn::cuda::chain;
  EXPECT_EQ(chain::inverse_norm(4.0f), 0.5f);
  EXPECT_EQ(chain::inverse_norm(0.0f), 0.0f);
  EXPECT_EQ(chain::inverse_norm(std::numeric_limits<float>::infinity()), 0.0f);
  EXPECT_EQ(chain::inverse_norm(std::numeric_limits<float>::quiet_NaN()), 0.0f);
  EXPECT_EQ(chain::similarity(std::numeric_limits<float>::infinity(), 0.0f, 1.0f),
            -std::numeric_limits<float>::infinity());
  // Keys order as the floats do, -0 ties +0, and every similarity beats "no candidate".
  const float sims[] = {-std::numeric_limits<float>::infinity(), -3.0f, -1e-40f, -0.0f, 0.0f, 1e-40f, 0.5f, 1.0f,
                        std::numeric_limits<float>::infinity()};
  for (float x : sims) {
    EXPECT_GT(chain::order_key(x), chain::kNoCandidate);
    for (float y : sims) EXPECT_EQ(chain::order_key(x) < chain::order_key(y), x < y) << x << " " << y;
  }
}

// The CPU backend's new numbers: labels 0 .. C-1 per head come back as their clusters' ranks.
std::vector<int32_t> cpu_ranks(const HostTensor& centroids, const HostTensor& sizes) {
  const int64_t H = centroids.view.shape[1], C = centroids.view.shape[2];
  HostTensor cent = copy_of(centroids), size = copy_of(sizes), labels = ref::make_tensor(DType::I32, {1, H, C});
  auto* l = static_cast<int32_t*>(labels.view.data);
  for (int64_t i = 0; i < H * C; ++i) l[i] = static_cast<int32_t>(i % C);
  order_clusters(cent.view, size.view, labels.view, kStream);
  return std::vector<int32_t>(l, l + H * C);
}

// Centroid sets meant to break a sloppy reimplementation: ties, NaN, infinities, zero and denormal
// rows, rows whose squared norm overflows (inverse norm 0: similarities of +0 and -0, which must tie).
enum class Fill { Normal, Duplicates, NonFinite, Tiny };

struct ArithmeticCase {
  const char* name;
  int64_t H, C, D;
  Fill fill;
  double empty_share;
};

HostTensor fill_centroids(const ArithmeticCase& k, ref::Rng& rng) {
  HostTensor t = ref::make_tensor(DType::F32, {1, k.H, k.C, k.D});
  auto* x = static_cast<float*>(t.view.data);
  const int64_t D = k.D;
  std::vector<float> base(static_cast<size_t>(8 * D));
  for (float& v : base) v = static_cast<float>(rng.normal());
  for (int64_t r = 0; r < k.H * k.C; ++r) {
    float* row = x + r * D;
    for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(rng.normal());
    const double u = rng.uniform();
    switch (k.fill) {
      case Fill::Normal:
        break;
      case Fill::Duplicates:  // a third exact copies of 8 rows, a third scaled copies (cosine ~1, rounded apart)
        if (u < 0.67) {
          const float scale = u < 0.33 ? 1.0f : static_cast<float>(rng.integer(2, 5));
          const float* b = base.data() + rng.integer(0, 7) * D;
          for (int64_t d = 0; d < D; ++d) row[d] = scale * b[d];
        }
        break;
      case Fill::NonFinite:
        if (u < 0.1) {
          row[rng.integer(0, D - 1)] = std::numeric_limits<float>::quiet_NaN();
        } else if (u < 0.2) {
          row[rng.integer(0, D - 1)] = (u < 0.15 ? 1 : -1) * std::numeric_limits<float>::infinity();
        } else if (u < 0.35) {
          for (int64_t d = 0; d < D; ++d) row[d] *= 1e30f;  // squared norm overflows: inverse norm 0
        } else if (u < 0.45) {
          for (int64_t d = 0; d < D; ++d) row[d] = 0.0f;
        }
        break;
      case Fill::Tiny:  // denormal products and sums, and zero rows
        for (int64_t d = 0; d < D; ++d) row[d] *= u < 0.5 ? 1e-20f : (u < 0.8 ? 1e-40f : 0.0f);
        break;
    }
  }
  return t;
}

void PrintTo(const ArithmeticCase& k, std::ostream* os) { *os << k.name; }

class ClusterKernelArithmetic : public ::testing::TestWithParam<ArithmeticCase> {};

TEST_P(ClusterKernelArithmetic, ChoosesTheCpuChain) {
  const ArithmeticCase& k = GetParam();
  ref::Rng rng(case_seed());
  const HostTensor cent = fill_centroids(k, rng);
  HostTensor sizes = ref::make_tensor(DType::I32, {1, k.H, k.C});
  auto* size = static_cast<int32_t*>(sizes.view.data);
  for (int64_t i = 0; i < k.H * k.C; ++i)
    size[i] = rng.uniform() < k.empty_share ? 0 : static_cast<int32_t>(rng.integer(1, 50));
  const std::vector<int32_t> cpu = cpu_ranks(cent, sizes);
  const auto* x = static_cast<const float*>(cent.view.data);
  for (int64_t h = 0; h < k.H; ++h) {
    const std::vector<int32_t> want(cpu.begin() + h * k.C, cpu.begin() + (h + 1) * k.C);
    const float* c0 = x + h * k.C * k.D;
    const int32_t* s0 = size + h * k.C;
    // The kernel pads D <= 64 to 64 and D <= 128 to 128; padding to 128 must not matter either.
    if (k.D <= 64) {
      EXPECT_EQ(cluster_kernel_ranks<64>(c0, s0, k.C, k.D), want) << k.name << " head " << h << ", kD 64";
    }
    EXPECT_EQ(cluster_kernel_ranks<128>(c0, s0, k.C, k.D), want) << k.name << " head " << h << ", kD 128";
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, ClusterKernelArithmetic,
                         ::testing::Values(ArithmeticCase{"wan_d128", 2, 1000, 128, Fill::Normal, 0.2},
                                           ArithmeticCase{"d64", 1, 1000, 64, Fill::Normal, 0.2},
                                           ArithmeticCase{"d100_padded", 1, 333, 100, Fill::Normal, 0.1},
                                           ArithmeticCase{"d20_padded", 2, 37, 20, Fill::Normal, 0.3},
                                           ArithmeticCase{"d1", 1, 50, 1, Fill::Normal, 0.1},
                                           ArithmeticCase{"one_cluster", 3, 1, 64, Fill::Normal, 0.4},
                                           ArithmeticCase{"all_empty", 1, 40, 128, Fill::Normal, 1.0},
                                           ArithmeticCase{"ties", 2, 200, 96, Fill::Duplicates, 0.1},
                                           ArithmeticCase{"non_finite", 2, 300, 128, Fill::NonFinite, 0.1},
                                           ArithmeticCase{"non_finite_d33", 1, 120, 33, Fill::NonFinite, 0.0},
                                           ArithmeticCase{"tiny", 1, 200, 64, Fill::Tiny, 0.1}),
                         [](const auto& p) { return std::string(p.param.name); });

}  // namespace
