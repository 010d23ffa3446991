// Permutation ops (cluster_permutation, gather_rows, scatter_rows, label_text_tokens) against the
// reference counting sort and their contracts in sapattn/ops.hpp. Every result here is exact.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "reference.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace {

using namespace sapattn;
using namespace sapattn::testing_support;

// Labels [B,H,N] whose per-(b,h) cluster sizes are random (with empty, 1-token and, for N >= 200,
// >128-token clusters).
HostTensor random_labels(int64_t B, int64_t H, int64_t N, int64_t C, ref::Rng& rng) {
  HostTensor labels = ref::make_tensor(DType::I32, {B, H, N});
  std::vector<double> all;
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const std::vector<int32_t> l = ref::random_labels_with_sizes(rng, ref::random_cluster_sizes(rng, N, C));
    all.insert(all.end(), l.begin(), l.end());
  }
  ref::from_vector(labels.view, all);
  return labels;
}

struct PermCase {
  int64_t B, H, N, C;
};

class ClusterPermutation : public ::testing::TestWithParam<PermCase> {};

TEST_P(ClusterPermutation, IsAStableCountingSort) {
  const auto [B, H, N, C] = GetParam();
  ref::Rng rng(case_seed());
  const HostTensor labels = random_labels(B, H, N, C, rng);
  const std::vector<uint8_t> label_bytes = labels.bytes();
  HostTensor perm = ref::make_tensor(DType::I32, {B, H, N});
  HostTensor offsets = ref::make_tensor(DType::I32, {B, H, C + 1});
  ref::poison(perm);
  ref::poison(offsets);
  cluster_permutation(labels.view, static_cast<int>(C), perm.view, offsets.view, kStream);
  EXPECT_EQ(labels.bytes(), label_bytes) << "cluster_permutation wrote its labels";
  ASSERT_EQ(ref::count_poisoned(perm.view), 0);
  ASSERT_EQ(ref::count_poisoned(offsets.view), 0);
  const std::vector<int32_t> p = ref::to_i32(perm.view), off = ref::to_i32(offsets.view), l = ref::to_i32(labels.view);
  // The properties, stated directly.
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int32_t* pb = &p[static_cast<size_t>(bh * N)];
    const int32_t* lb = &l[static_cast<size_t>(bh * N)];
    const int32_t* ob = &off[static_cast<size_t>(bh * (C + 1))];
    std::vector<int32_t> sorted(pb, pb + N);
    std::sort(sorted.begin(), sorted.end());
    for (int64_t i = 0; i < N; ++i)
      ASSERT_EQ(sorted[static_cast<size_t>(i)], i) << "perm is not a permutation, (b,h) " << bh;
    EXPECT_EQ(ob[0], 0);
    EXPECT_EQ(ob[C], N);
    for (int64_t c = 0; c < C; ++c) {
      EXPECT_EQ(ob[c + 1] - ob[c], std::count(lb, lb + N, static_cast<int32_t>(c))) << "cluster " << c;
      for (int32_t j = ob[c]; j < ob[c + 1]; ++j) {
        EXPECT_EQ(lb[pb[j]], c) << "position " << j << " lies in cluster " << c << "'s segment";
        if (j > ob[c]) {
          EXPECT_LT(pb[j - 1], pb[j]) << "cluster " << c << " not in original order (stable)";
        }
      }
    }
  }
  // And equal to the reference.
  const ref::Permutation want = ref::cluster_permutation(labels.view, C);
  EXPECT_EQ(p, want.perm);
  EXPECT_EQ(off, want.offsets);
}

TEST_P(ClusterPermutation, ThreadCountIndependent) {
  const auto [B, H, N, C] = GetParam();
  ref::Rng rng(case_seed());
  const HostTensor labels = random_labels(B, H, N, C, rng);
  std::vector<std::vector<uint8_t>> perms, offs;
  for (int threads : {1, 2, 3}) {
    HostTensor perm = ref::make_tensor(DType::I32, {B, H, N});
    HostTensor offsets = ref::make_tensor(DType::I32, {B, H, C + 1});
    ref::poison(perm);
    ref::poison(offsets);
    cluster_permutation(labels.view, static_cast<int>(C), perm.view, offsets.view, Stream::cpu(threads));
    perms.push_back(perm.bytes());
    offs.push_back(offsets.bytes());
  }
  EXPECT_EQ(perms[0], perms[1]);
  EXPECT_EQ(perms[0], perms[2]);
  EXPECT_EQ(offs[0], offs[1]);
  EXPECT_EQ(offs[0], offs[2]);
}

INSTANTIATE_TEST_SUITE_P(Cases, ClusterPermutation,
                         ::testing::Values(PermCase{2, 3, 500, 17}, PermCase{1, 3, 2000, 300},
                                           PermCase{2, 2, 50, 80},  // C > N: many empty clusters
                                           PermCase{1, 2, 300, 1},  // C = 1
                                           PermCase{1, 1, 1, 1},    // N = 1, C = 1
                                           PermCase{2, 1, 1, 5},    // N = 1 in one of 5 clusters
                                           PermCase{1, 40, 33, 4}),
                         [](const auto& p) {
                           return "B" + std::to_string(p.param.B) + "H" + std::to_string(p.param.H) + "N" +
                                  std::to_string(p.param.N) + "C" + std::to_string(p.param.C);
                         });

TEST(ClusterPermutation, AllTokensInOneClusterOfMany) {
  // Every label = 3 of 6: perm is the identity, offsets [0,0,0,0,N,N,N].
  const int64_t N = 37;
  HostTensor labels = ref::make_tensor(DType::I32, {1, 2, N});
  ref::from_vector(labels.view, std::vector<double>(static_cast<size_t>(2 * N), 3.0));
  HostTensor perm = ref::make_tensor(DType::I32, {1, 2, N});
  HostTensor offsets = ref::make_tensor(DType::I32, {1, 2, 7});
  ref::poison(perm);
  ref::poison(offsets);
  cluster_permutation(labels.view, 6, perm.view, offsets.view, kStream);
  std::vector<int32_t> identity;
  for (int h = 0; h < 2; ++h)
    for (int32_t i = 0; i < N; ++i) identity.push_back(i);
  EXPECT_EQ(ref::to_i32(perm.view), identity);
  const int32_t n = static_cast<int32_t>(N);
  EXPECT_EQ(ref::to_i32(offsets.view), (std::vector<int32_t>{0, 0, 0, 0, n, n, n, 0, 0, 0, 0, n, n, n}));
}

// ---------------------------------------------------------------------------------------------

struct RowsCase {
  DType x_dtype, out_dtype;
  Layout x_layout, out_layout;
  int64_t B, H, N, D;
};

class GatherScatter : public ::testing::TestWithParam<RowsCase> {};

std::string describe(const RowsCase& rc) {
  return std::string(dtype_name(rc.x_dtype)) + "->" + std::string(dtype_name(rc.out_dtype)) + " " +
         ref::layout_name(rc.x_layout) + "->" + ref::layout_name(rc.out_layout);
}

// The permutation [B,H,N] of random labels over C clusters (the reference's counting sort, which the
// op cluster_permutation matches exactly).
HostTensor random_permutation(const RowsCase& rc, int64_t C, ref::Rng& rng) {
  const HostTensor labels = random_labels(rc.B, rc.H, rc.N, C, rng);
  HostTensor perm = ref::make_tensor(DType::I32, {rc.B, rc.H, rc.N});
  const ref::Permutation p = ref::cluster_permutation(labels.view, C);
  ref::from_vector(perm.view, std::vector<double>(p.perm.begin(), p.perm.end()));
  return perm;
}

// Rows [B,H,N,D]: random in the case's input dtype and layout (random_rows); poisoned, to be
// written, in the input's dtype and layout (poisoned_rows, for the inverse that restores the
// input) or in the output's (poisoned_out).
HostTensor random_rows(const RowsCase& rc, ref::Rng& rng) {
  HostTensor x = ref::make_tensor(rc.x_dtype, {rc.B, rc.H, rc.N, rc.D}, rc.x_layout);
  ref::fill_normal(x.view, rng);
  return x;
}

HostTensor poisoned_rows(const RowsCase& rc) {
  HostTensor t = ref::make_tensor(rc.x_dtype, {rc.B, rc.H, rc.N, rc.D}, rc.x_layout);
  ref::poison(t);
  return t;
}

HostTensor poisoned_out(const RowsCase& rc) {
  HostTensor t = ref::make_tensor(rc.out_dtype, {rc.B, rc.H, rc.N, rc.D}, rc.out_layout);
  ref::poison(t);
  return t;
}

// gathered[j] == source[perm[j]] for every row j of every (b,h), element for element.
void expect_gather_of(const std::vector<double>& gathered, const std::vector<double>& source, const HostTensor& perm,
                      const RowsCase& rc) {
  const std::vector<int32_t> p = ref::to_i32(perm.view);
  for (int64_t bh = 0; bh < rc.B * rc.H; ++bh)
    for (int64_t j = 0; j < rc.N; ++j) {
      const int64_t src = p[static_cast<size_t>(bh * rc.N + j)];
      for (int64_t d = 0; d < rc.D; ++d)
        ASSERT_EQ(gathered[static_cast<size_t>((bh * rc.N + j) * rc.D + d)],
                  source[static_cast<size_t>((bh * rc.N + src) * rc.D + d)])
            << "(b,h) " << bh << " row " << j << " (source row " << src << ")";
    }
}

TEST_P(GatherScatter, GatherThenScatterIsExact) {
  const RowsCase rc = GetParam();
  SCOPED_TRACE(describe(rc));
  ref::Rng rng(case_seed());
  const HostTensor perm = random_permutation(rc, 13, rng);
  const HostTensor x = random_rows(rc, rng);
  const std::vector<uint8_t> x_bytes = x.bytes();
  HostTensor gathered = poisoned_out(rc);
  const std::vector<uint8_t> gathered_before = gathered.bytes();
  gather_rows(x.view, perm.view, gathered.view, kStream);
  EXPECT_EQ(x.bytes(), x_bytes) << "gather_rows wrote its input";
  ASSERT_EQ(ref::count_poisoned(gathered.view), 0);
  EXPECT_TRUE(gathered.outside_view_unchanged(gathered_before));
  // out[j] = x[perm[j]], exactly (the dtype pairs here convert exactly).
  const std::vector<double> xv = ref::to_vector(x.view);
  ASSERT_NO_FATAL_FAILURE(expect_gather_of(ref::to_vector(gathered.view), xv, perm, rc));
  // Scattering back (out in x's dtype and layout) restores x exactly: scatter inverts gather.
  HostTensor back = poisoned_rows(rc);
  const std::vector<uint8_t> back_before = back.bytes();
  scatter_rows(gathered.view, perm.view, back.view, kStream);
  ASSERT_EQ(ref::count_poisoned(back.view), 0);
  EXPECT_TRUE(back.outside_view_unchanged(back_before));
  EXPECT_EQ(ref::to_vector(back.view), xv);
}

TEST_P(GatherScatter, ScatterThenGatherIsExact) {
  const RowsCase rc = GetParam();
  SCOPED_TRACE(describe(rc));
  ref::Rng rng(case_seed());
  const HostTensor perm = random_permutation(rc, 5, rng);
  const HostTensor y = random_rows(rc, rng);
  HostTensor scattered = poisoned_out(rc);
  scatter_rows(y.view, perm.view, scattered.view, kStream);
  ASSERT_EQ(ref::count_poisoned(scattered.view), 0);
  // out[perm[j]] = y[j]: y is the gather of out.
  const std::vector<double> yv = ref::to_vector(y.view);
  ASSERT_NO_FATAL_FAILURE(expect_gather_of(yv, ref::to_vector(scattered.view), perm, rc));
  HostTensor back = poisoned_rows(rc);
  gather_rows(scattered.view, perm.view, back.view, kStream);
  EXPECT_EQ(ref::to_vector(back.view), yv);
}

TEST_P(GatherScatter, ThreadCountIndependent) {
  const RowsCase rc = GetParam();
  ref::Rng rng(case_seed());
  const HostTensor perm = random_permutation(rc, 7, rng);
  const HostTensor x = random_rows(rc, rng);
  std::vector<std::vector<uint8_t>> g, s;
  for (int threads : {1, 2, 3}) {
    HostTensor out = poisoned_out(rc);
    gather_rows(x.view, perm.view, out.view, Stream::cpu(threads));
    g.push_back(out.bytes());
    ref::poison(out);
    scatter_rows(x.view, perm.view, out.view, Stream::cpu(threads));
    s.push_back(out.bytes());
  }
  EXPECT_EQ(g[0], g[1]);
  EXPECT_EQ(g[0], g[2]);
  EXPECT_EQ(s[0], s[1]);
  EXPECT_EQ(s[0], s[2]);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, GatherScatter,
    ::testing::Values(RowsCase{DType::F32, DType::F32, Layout::Contiguous, Layout::Contiguous, 2, 3, 333, 64},
                      RowsCase{DType::F16, DType::F16, Layout::Transposed, Layout::Contiguous, 1, 5, 77, 128},
                      RowsCase{DType::BF16, DType::BF16, Layout::Contiguous, Layout::Transposed, 2, 2, 200, 64},
                      RowsCase{DType::F32, DType::F32, Layout::TransposedPadded, Layout::Padded, 2, 3, 65, 24},
                      RowsCase{DType::BF16, DType::BF16, Layout::Padded, Layout::TransposedPadded, 1, 2, 129, 128},
                      RowsCase{DType::F16, DType::F16, Layout::Transposed, Layout::Transposed, 1, 1, 1, 64},
                      // Floating dtypes may differ ("any floating dtypes"): 16-bit to f32 is exact.
                      RowsCase{DType::F16, DType::F32, Layout::Transposed, Layout::Contiguous, 1, 3, 100, 64},
                      RowsCase{DType::BF16, DType::F32, Layout::Contiguous, Layout::TransposedPadded, 2, 1, 90, 24}),
    [](const auto& p) {
      const RowsCase& c = p.param;
      return case_name(dtype_name(c.x_dtype), ref::layout_name(c.x_layout), "to", dtype_name(c.out_dtype),
                       ref::layout_name(c.out_layout), "B" + std::to_string(c.B) + "H" + std::to_string(c.H),
                       "N" + std::to_string(c.N), "D" + std::to_string(c.D));
    });

// ---------------------------------------------------------------------------------------------

TEST(LabelTextTokens, LabelsPromptAndPaddingLeavesVideo) {
  ref::Rng rng(case_seed());
  const int64_t B = 2, H = 3, S = 50;
  for (auto [video, prompt] : {std::pair<int64_t, int64_t>{40, 6}, {40, 0}, {40, 10}, {0, 50}, {50, 0}, {1, 49}}) {
    SCOPED_TRACE("video " + std::to_string(video) + " prompt " + std::to_string(prompt));
    const int prompt_label = static_cast<int>(rng.integer(1, 20));
    HostTensor labels = ref::make_tensor(DType::I32, {B, H, S});
    std::vector<double> init(static_cast<size_t>(B * H * S));
    for (double& v : init) v = static_cast<double>(rng.integer(0, prompt_label - 1));
    ref::from_vector(labels.view, init);
    label_text_tokens(labels.view, video, prompt, prompt_label, kStream);
    const std::vector<int32_t> got = ref::to_i32(labels.view);
    for (int64_t bh = 0; bh < B * H; ++bh) {
      for (int64_t i = 0; i < S; ++i) {
        const size_t o = static_cast<size_t>(bh * S + i);
        const int32_t want = i < video            ? static_cast<int32_t>(init[o])
                             : i < video + prompt ? prompt_label
                                                  : prompt_label + 1;
        ASSERT_EQ(got[o], want) << "(b,h) " << bh << " token " << i;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Errors

TEST(PermuteErrors, ClusterPermutation) {
  ref::Rng rng(case_seed());
  const int64_t B = 1, H = 2, N = 30, C = 4;
  HostTensor labels = random_labels(B, H, N, C, rng);
  HostTensor perm = ref::make_tensor(DType::I32, {B, H, N});
  HostTensor offsets = ref::make_tensor(DType::I32, {B, H, C + 1});
  ref::poison(perm);
  ref::poison(offsets);
  const std::vector<const HostTensor*> outs = {&perm, &offsets};
  const auto run = [&](const TensorView& l, int c, const TensorView& p, const TensorView& o) {
    cluster_permutation(l, c, p, o, kStream);
  };
  for (int bad : {static_cast<int>(C), -1}) {
    HostTensor bad_labels = random_labels(B, H, N, C, rng);
    ref::set(bad_labels.view, {0, 1, 17}, bad);
    EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, outs,
                           run(bad_labels.view, static_cast<int>(C), perm.view, offsets.view));
  }
  HostTensor offsets1 = ref::make_tensor(DType::I32, {B, H, 1});
  HostTensor zeros = ref::make_tensor(DType::I32, {B, H, N});
  ref::from_vector(zeros.view, std::vector<double>(static_cast<size_t>(B * H * N), 0.0));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, outs, run(zeros.view, 0, perm.view, offsets1.view));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, outs, run(zeros.view, -3, perm.view, offsets.view));
  HostTensor perm_short = ref::make_tensor(DType::I32, {B, H, N - 1});
  HostTensor perm_h = ref::make_tensor(DType::I32, {B, H + 1, N});
  HostTensor offsets_c = ref::make_tensor(DType::I32, {B, H, C});  // C, not C + 1
  HostTensor perm_f32 = ref::make_tensor(DType::F32, {B, H, N});
  HostTensor offsets_u8 = ref::make_tensor(DType::U8, {B, H, C + 1});
  HostTensor labels_f32 = ref::make_tensor(DType::F32, {B, H, N});
  HostTensor perm_strided = ref::make_tensor(DType::I32, {B, H, N}, Layout::Transposed);
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, run(labels.view, static_cast<int>(C), perm_short.view, offsets.view));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, run(labels.view, static_cast<int>(C), perm_h.view, offsets.view));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, run(labels.view, static_cast<int>(C), perm.view, offsets_c.view));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, run(labels.view, static_cast<int>(C), perm_strided.view, offsets.view));
  EXPECT_ERROR_UNTOUCHED(DTypeError, outs, run(labels.view, static_cast<int>(C), perm_f32.view, offsets.view));
  EXPECT_ERROR_UNTOUCHED(DTypeError, outs, run(labels.view, static_cast<int>(C), perm.view, offsets_u8.view));
  EXPECT_ERROR_UNTOUCHED(DTypeError, outs, run(labels_f32.view, static_cast<int>(C), perm.view, offsets.view));
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, outs,
                         run(ref::on_cuda(labels.view), static_cast<int>(C), perm.view, offsets.view));
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, outs,
                         cluster_permutation(labels.view, static_cast<int>(C), perm.view, offsets.view,
                                             Stream{Device::cuda(0), nullptr, 0}));
}

TEST(PermuteErrors, GatherAndScatter) {
  ref::Rng rng(case_seed());
  const int64_t B = 1, H = 2, N = 30, D = 24;
  // Padded: a missing range check on perm reads/writes inside the storage, never out of bounds.
  HostTensor x = ref::make_tensor(DType::F32, {B, H, N, D}, Layout::Padded);
  ref::fill_normal(x.view, rng);
  HostTensor out = ref::make_tensor(DType::F32, {B, H, N, D}, Layout::Padded);
  ref::poison(out);
  HostTensor perm = ref::make_tensor(DType::I32, {B, H, N});
  {
    std::vector<double> p;
    for (int64_t bh = 0; bh < B * H; ++bh)
      for (int64_t i = 0; i < N; ++i) p.push_back(static_cast<double>(N - 1 - i));
    ref::from_vector(perm.view, p);
  }
  const std::vector<const HostTensor*> outs = {&out};
  HostTensor perm_f32 = ref::make_tensor(DType::F32, {B, H, N});
  HostTensor perm_short = ref::make_tensor(DType::I32, {B, H, N - 1});
  HostTensor out_d = ref::make_tensor(DType::F32, {B, H, N, D + 1});
  HostTensor out_n = ref::make_tensor(DType::F32, {B, H, N + 1, D});
  HostTensor x_i32 = ref::make_tensor(DType::I32, {B, H, N, D});
  HostTensor out_u8 = ref::make_tensor(DType::U8, {B, H, N, D});
  ref::poison(out_d);
  ref::poison(out_n);
  ref::poison(out_u8);
  for (auto op : {&gather_rows, &scatter_rows}) {
    EXPECT_ERROR_UNTOUCHED(DTypeError, outs, op(x.view, perm_f32.view, out.view, kStream));
    EXPECT_ERROR_UNTOUCHED(ShapeError, outs, op(x.view, perm_short.view, out.view, kStream));
    EXPECT_ERROR_UNTOUCHED(ShapeError, {&out_d}, op(x.view, perm.view, out_d.view, kStream));
    EXPECT_ERROR_UNTOUCHED(ShapeError, {&out_n}, op(x.view, perm.view, out_n.view, kStream));
    EXPECT_ERROR_UNTOUCHED(DTypeError, outs, op(x_i32.view, perm.view, out.view, kStream));
    EXPECT_ERROR_UNTOUCHED(DTypeError, {&out_u8}, op(x.view, perm.view, out_u8.view, kStream));
    EXPECT_ERROR_UNTOUCHED(UnsupportedError, outs, op(x.view, ref::on_cuda(perm.view), out.view, kStream));
    // A perm entry outside [0, N) is a value out of range.
    for (int bad : {static_cast<int>(N), -1}) {
      HostTensor bad_perm = ref::make_tensor(DType::I32, {B, H, N});
      std::memcpy(bad_perm.view.data, perm.view.data, perm.storage.bytes());
      ref::set(bad_perm.view, {0, 1, 5}, bad);
      EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, outs, op(x.view, bad_perm.view, out.view, kStream));
    }
  }
}

TEST(PermuteErrors, LabelTextTokens) {
  HostTensor labels = ref::make_tensor(DType::I32, {1, 2, 20});
  ref::from_vector(labels.view, std::vector<double>(40, 2.0));
  const std::vector<const HostTensor*> outs = {&labels};
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, outs, label_text_tokens(labels.view, 15, 6, 3, kStream));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, outs, label_text_tokens(labels.view, -1, 6, 3, kStream));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, outs, label_text_tokens(labels.view, 10, -1, 3, kStream));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, outs, label_text_tokens(labels.view, 10, 5, -1, kStream));
  HostTensor labels_f32 = ref::make_tensor(DType::F32, {1, 2, 20});
  HostTensor labels_rank4 = ref::make_tensor(DType::I32, {1, 2, 20, 1});
  HostTensor labels_strided = ref::make_tensor(DType::I32, {1, 2, 20}, Layout::Transposed);
  ref::poison(labels_f32);
  ref::poison(labels_rank4);
  ref::poison(labels_strided);
  EXPECT_ERROR_UNTOUCHED(DTypeError, {&labels_f32}, label_text_tokens(labels_f32.view, 10, 5, 3, kStream));
  EXPECT_ERROR_UNTOUCHED(ShapeError, {&labels_rank4}, label_text_tokens(labels_rank4.view, 10, 5, 3, kStream));
  EXPECT_ERROR_UNTOUCHED(ShapeError, {&labels_strided}, label_text_tokens(labels_strided.view, 10, 5, 3, kStream));
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, outs, label_text_tokens(ref::on_cuda(labels.view), 10, 5, 3, kStream));
}

}  // namespace
