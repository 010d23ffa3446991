// Attention ops (dense_attention, block_sparse_attention, block_density) against the float64 naive
// reference, with the block mask expanded to tokens for the sparse op.
//
// Error model (FA3's): the op accumulates in fp32, so it is compared with the float64 reference
// with a tolerance of twice the error that a naive fp32 implementation of the same attention makes
// on the same inputs (ref::attention_f32 vs ref::attention_f64, the max over the tensor), plus two
// fp32 ulps of the largest value for the final roundings the two evaluate differently. A 16-bit
// output adds its own rounding: half an ulp, u_out * |x| (2^-11 for f16, 2^-8 for bf16) plus the
// f16 subnormal spacing. SAPATTN_TEST_VERBOSE=1 prints each case's worst error / tolerance.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "reference.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace {

using namespace sapattn;
using namespace sapattn::testing_support;
using ref::max_abs;
using ref::max_abs_diff;

constexpr double kInf = std::numeric_limits<double>::infinity();

// Unit roundoff of a stored output dtype (0 for f32: the fp32 reference already rounds to fp32).
double output_roundoff(DType t) {
  switch (t) {
    case DType::F16:
      return 0x1p-11;
    case DType::BF16:
      return 0x1p-8;
    default:
      return 0.0;
  }
}
// Absolute rounding floor of a stored output dtype: half the f16 subnormal spacing 2^-24.
double output_floor(DType t) { return t == DType::F16 ? 0x1p-25 : 0.0; }

// Compares the op's out (and lse, when given) with the float64 reference under the error model.
::testing::AssertionResult matches_reference(const TensorView& out, const TensorView& lse, const ref::Attention& want,
                                             const ref::Attention& low) {
  const std::vector<double> got = ref::to_vector(out);
  const double err32 = max_abs_diff(low.out, want.out);
  const double tol_base = 2.0 * err32 + 2.0 * 2.0 * ref::kF32Eps * max_abs(want.out);
  const double u_out = output_roundoff(out.dtype), floor_out = output_floor(out.dtype);
  const int64_t D = out.shape[3];
  double worst = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double w = want.out[i];
    if (std::isnan(got[i])) return ::testing::AssertionFailure() << "out[" << i << "] is NaN";
    // The fp32 result x = w + delta (|delta| <= tol_base) rounds to the output with error <= u_out |x|.
    const double tol = tol_base * (1.0 + u_out) + u_out * std::abs(w) + floor_out;
    const double diff = std::abs(got[i] - w);
    worst = std::max(worst, diff / tol);
    if (!(diff <= tol)) {
      return ::testing::AssertionFailure()
             << "out row " << i / static_cast<size_t>(D) << " dim " << i % static_cast<size_t>(D) << ": " << got[i]
             << " vs reference " << w << " (|diff| " << diff << " > tol " << tol << "; naive fp32 error " << err32
             << ")";
    }
  }
  double worst_lse = 0.0;
  if (!lse.empty()) {
    const std::vector<double> l = ref::to_vector(lse);
    const double lerr32 = max_abs_diff(low.lse, want.lse);
    const double ltol = 2.0 * lerr32 + 2.0 * 2.0 * ref::kF32Eps * max_abs(want.lse);
    for (size_t i = 0; i < l.size(); ++i) {
      if (want.lse[i] == -kInf) {
        if (l[i] != -kInf)
          return ::testing::AssertionFailure() << "lse[" << i << "] = " << l[i] << " for a row with no key, not -inf";
        continue;
      }
      const double diff = std::abs(l[i] - want.lse[i]);
      worst_lse = std::max(worst_lse, diff / ltol);
      if (!(diff <= ltol)) {
        return ::testing::AssertionFailure()
               << "lse[" << i << "] = " << l[i] << " vs reference " << want.lse[i] << " (|diff| " << diff << " > tol "
               << ltol << "; naive fp32 error " << lerr32 << ")";
      }
    }
  }
  // Rows that attend to no key: out exactly 0.
  for (size_t r = 0; r < want.lse.size(); ++r) {
    if (want.lse[r] != -kInf) continue;
    for (int64_t d = 0; d < D; ++d) {
      if (got[r * static_cast<size_t>(D) + static_cast<size_t>(d)] != 0.0) {
        return ::testing::AssertionFailure() << "out row " << r << " attends to no key but is not 0";
      }
    }
  }
  if (std::getenv("SAPATTN_TEST_VERBOSE"))
    std::printf("    worst error / tolerance: out %.3f, lse %.3f\n", worst, worst_lse);
  return ::testing::AssertionSuccess();
}

struct Qkv {
  HostTensor q, k, v, out, lse;
  float scale;
};

// q ~ N(0, q_std^2), k, v ~ N(0, 1), scale 1/sqrt(D): the scores have standard deviation q_std.
Qkv make_qkv(int64_t B, int64_t H, int64_t Sq, int64_t Sk, int64_t D, DType in, DType out_dtype, Layout qkv_layout,
             Layout out_layout, bool with_lse, double q_std, ref::Rng& rng) {
  Qkv t;
  t.q = ref::make_tensor(in, {B, H, Sq, D}, qkv_layout);
  t.k = ref::make_tensor(in, {B, H, Sk, D}, qkv_layout);
  t.v = ref::make_tensor(in, {B, H, Sk, D}, qkv_layout);
  ref::fill_normal(t.q.view, rng, 0.0, q_std);
  ref::fill_normal(t.k.view, rng);
  ref::fill_normal(t.v.view, rng);
  t.out = ref::make_tensor(out_dtype, {B, H, Sq, D}, out_layout);
  ref::poison(t.out);
  if (with_lse) {
    t.lse = ref::make_tensor(DType::F32, {B, H, Sq}, out_layout);
    ref::poison(t.lse);
  }
  t.scale = 1.0f / std::sqrt(static_cast<float>(D));
  return t;
}

// ---------------------------------------------------------------------------------------------
// Dense attention

struct DenseCase {
  int64_t B, H, Sq, Sk, D;
  DType in, out;
  Layout qkv_layout, out_layout;
  bool with_lse;
  double q_std;
};

class DenseAttention : public ::testing::TestWithParam<DenseCase> {};

TEST_P(DenseAttention, MatchesFloat64Reference) {
  const DenseCase c = GetParam();
  ref::Rng rng(case_seed());
  Qkv t = make_qkv(c.B, c.H, c.Sq, c.Sk, c.D, c.in, c.out, c.qkv_layout, c.out_layout, c.with_lse, c.q_std, rng);
  const std::vector<uint8_t> out_before = t.out.bytes(), lse_before = t.lse.bytes();
  const std::vector<uint8_t> q_bytes = t.q.bytes(), k_bytes = t.k.bytes(), v_bytes = t.v.bytes();
  dense_attention(t.q.view, t.k.view, t.v.view, t.scale, t.out.view, t.lse.view, kStream);
  EXPECT_EQ(t.q.bytes(), q_bytes);
  EXPECT_EQ(t.k.bytes(), k_bytes);
  EXPECT_EQ(t.v.bytes(), v_bytes);
  ASSERT_EQ(ref::count_poisoned(t.out.view), 0) << "out not fully written";
  EXPECT_TRUE(t.out.outside_view_unchanged(out_before));
  if (c.with_lse) {
    ASSERT_EQ(ref::count_poisoned(t.lse.view), 0) << "lse not fully written";
    EXPECT_TRUE(t.lse.outside_view_unchanged(lse_before));
  }
  const ref::Attention want = ref::attention_f64(t.q.view, t.k.view, t.v.view, t.scale, nullptr);
  const ref::Attention low = ref::attention_f32(t.q.view, t.k.view, t.v.view, t.scale, nullptr);
  EXPECT_TRUE(matches_reference(t.out.view, t.lse.view, want, low));
}

TEST_P(DenseAttention, ThreadCountIndependent) {
  const DenseCase c = GetParam();
  ref::Rng rng(case_seed());
  Qkv t = make_qkv(c.B, c.H, c.Sq, c.Sk, c.D, c.in, c.out, c.qkv_layout, c.out_layout, c.with_lse, c.q_std, rng);
  dense_attention(t.q.view, t.k.view, t.v.view, t.scale, t.out.view, t.lse.view, Stream::cpu(1));
  const std::vector<uint8_t> out1 = t.out.bytes(), lse1 = t.lse.bytes();
  for (int threads : {2, 3}) {
    ref::poison(t.out);
    if (c.with_lse) ref::poison(t.lse);
    dense_attention(t.q.view, t.k.view, t.v.view, t.scale, t.out.view, t.lse.view, Stream::cpu(threads));
    EXPECT_EQ(t.out.bytes(), out1) << threads << " threads";
    EXPECT_EQ(t.lse.bytes(), lse1) << threads << " threads";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, DenseAttention,
    ::testing::Values(
        DenseCase{2, 3, 333, 333, 64, DType::F32, DType::F32, Layout::Contiguous, Layout::Contiguous, true, 1.0},
        DenseCase{1, 4, 77, 200, 128, DType::F16, DType::F16, Layout::Transposed, Layout::Transposed, true, 1.5},
        DenseCase{2, 2, 129, 129, 64, DType::BF16, DType::BF16, Layout::TransposedPadded, Layout::Padded, false, 1.0},
        DenseCase{1, 2, 65, 64, 128, DType::BF16, DType::F32, Layout::Transposed, Layout::Contiguous, true, 2.0},
        // Scores with standard deviation 30: exp without the row max would overflow fp32.
        DenseCase{1, 2, 100, 150, 64, DType::F32, DType::F32, Layout::Contiguous, Layout::Transposed, true, 30.0},
        DenseCase{1, 1, 1, 1, 64, DType::F32, DType::F16, Layout::Contiguous, Layout::Contiguous, true, 1.0},
        DenseCase{2, 3, 50, 70, 24, DType::F16, DType::F32, Layout::Padded, Layout::TransposedPadded, true, 1.0},
        // D = 27: not a multiple of any vector width.
        DenseCase{1, 2, 70, 90, 27, DType::F32, DType::BF16, Layout::Transposed, Layout::Contiguous, true, 1.0}),
    [](const auto& p) {
      const DenseCase& c = p.param;
      return case_name(dtype_name(c.in), dtype_name(c.out), ref::layout_name(c.qkv_layout),
                       "B" + std::to_string(c.B) + "H" + std::to_string(c.H), "Sq" + std::to_string(c.Sq),
                       "Sk" + std::to_string(c.Sk), "D" + std::to_string(c.D));
    });

// ---------------------------------------------------------------------------------------------
// Block-sparse attention

enum class MaskKind { Random, AllKept, OneKeyClusterPerRow, NoneKept };

struct Blocks {
  HostTensor q_offsets, k_offsets, mask;
  BlockLayout layout() const { return {q_offsets.view, k_offsets.view, mask.view}; }
};

// Random cluster sizes per (b,h) (ref::random_cluster_sizes: empty, 1-token and >128-token
// clusters) or, with unit_clusters, every cluster one token; then the mask of the given kind. A
// Random mask keeps each block with probability 0.35, keeps nothing for one non-empty query
// cluster, and exactly one non-empty key cluster for another.
Blocks make_blocks(int64_t B, int64_t H, int64_t Sq, int64_t Sk, int64_t Cq, int64_t Ck, MaskKind kind,
                   bool unit_clusters, ref::Rng& rng) {
  Blocks bl;
  bl.q_offsets = ref::make_tensor(DType::I32, {B, H, Cq + 1});
  bl.k_offsets = ref::make_tensor(DType::I32, {B, H, Ck + 1});
  bl.mask = ref::make_tensor(DType::U8, {B, H, Cq, Ck});
  std::vector<double> qo, ko, m;
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const std::vector<int64_t> qs =
        unit_clusters ? std::vector<int64_t>(static_cast<size_t>(Cq), 1) : ref::random_cluster_sizes(rng, Sq, Cq);
    const std::vector<int64_t> ks =
        unit_clusters ? std::vector<int64_t>(static_cast<size_t>(Ck), 1) : ref::random_cluster_sizes(rng, Sk, Ck);
    for (int64_t o : ref::offsets_of(qs)) qo.push_back(static_cast<double>(o));
    for (int64_t o : ref::offsets_of(ks)) ko.push_back(static_cast<double>(o));
    std::vector<int64_t> nonempty_q, nonempty_k;
    for (int64_t a = 0; a < Cq; ++a)
      if (qs[static_cast<size_t>(a)] > 0) nonempty_q.push_back(a);
    for (int64_t b = 0; b < Ck; ++b)
      if (ks[static_cast<size_t>(b)] > 0) nonempty_k.push_back(b);
    std::vector<double> mb(static_cast<size_t>(Cq * Ck), 0.0);
    for (int64_t a = 0; a < Cq; ++a) {
      for (int64_t b = 0; b < Ck; ++b) {
        double keep = 0.0;
        switch (kind) {
          case MaskKind::Random:
            keep = rng.uniform() < 0.35 ? 1.0 : 0.0;
            break;
          case MaskKind::AllKept:
            keep = 1.0;
            break;
          default:
            break;
        }
        mb[static_cast<size_t>(a * Ck + b)] = keep;
      }
      if (kind == MaskKind::OneKeyClusterPerRow && !nonempty_k.empty()) {
        mb[static_cast<size_t>(
            a * Ck + nonempty_k[static_cast<size_t>(rng.integer(0, static_cast<int64_t>(nonempty_k.size()) - 1))])] =
            1.0;
      }
    }
    if (kind == MaskKind::Random && nonempty_q.size() >= 2 && !nonempty_k.empty()) {
      const int64_t none = nonempty_q[0], one = nonempty_q[1];
      for (int64_t b = 0; b < Ck; ++b) {
        mb[static_cast<size_t>(none * Ck + b)] = 0.0;
        mb[static_cast<size_t>(one * Ck + b)] = 0.0;
      }
      mb[static_cast<size_t>(
          one * Ck + nonempty_k[static_cast<size_t>(rng.integer(0, static_cast<int64_t>(nonempty_k.size()) - 1))])] =
          1.0;
    }
    m.insert(m.end(), mb.begin(), mb.end());
  }
  ref::from_vector(bl.q_offsets.view, qo);
  ref::from_vector(bl.k_offsets.view, ko);
  ref::from_vector(bl.mask.view, m);
  return bl;
}

struct SparseCase {
  const char* name;
  int64_t B, H, Sq, Sk, D, Cq, Ck;
  DType in, out;
  Layout qkv_layout, out_layout;
  bool with_lse;
  MaskKind mask;
  bool unit_clusters;
  double q_std;
};

class BlockSparseAttention : public ::testing::TestWithParam<SparseCase> {};

TEST_P(BlockSparseAttention, MatchesDenseWithTheExpandedMask) {
  const SparseCase c = GetParam();
  ref::Rng rng(case_seed());
  Qkv t = make_qkv(c.B, c.H, c.Sq, c.Sk, c.D, c.in, c.out, c.qkv_layout, c.out_layout, c.with_lse, c.q_std, rng);
  const Blocks bl = make_blocks(c.B, c.H, c.Sq, c.Sk, c.Cq, c.Ck, c.mask, c.unit_clusters, rng);
  const std::vector<uint8_t> out_before = t.out.bytes(), lse_before = t.lse.bytes();
  const std::vector<uint8_t> mask_bytes = bl.mask.bytes(), q_bytes = t.q.bytes();
  block_sparse_attention(t.q.view, t.k.view, t.v.view, bl.layout(), t.scale, t.out.view, t.lse.view, kStream);
  EXPECT_EQ(bl.mask.bytes(), mask_bytes);
  EXPECT_EQ(t.q.bytes(), q_bytes);
  ASSERT_EQ(ref::count_poisoned(t.out.view), 0) << "out not fully written";
  EXPECT_TRUE(t.out.outside_view_unchanged(out_before));
  if (c.with_lse) {
    ASSERT_EQ(ref::count_poisoned(t.lse.view), 0) << "lse not fully written";
    EXPECT_TRUE(t.lse.outside_view_unchanged(lse_before));
  }
  const std::vector<uint8_t> tokens = ref::expand_block_mask(bl.layout(), c.Sq, c.Sk);
  const ref::Attention want = ref::attention_f64(t.q.view, t.k.view, t.v.view, t.scale, &tokens);
  const ref::Attention low = ref::attention_f32(t.q.view, t.k.view, t.v.view, t.scale, &tokens);
  EXPECT_TRUE(matches_reference(t.out.view, t.lse.view, want, low));
  // The layout exercises what its kind promises.
  const int64_t empty_rows = std::count(want.lse.begin(), want.lse.end(), -kInf);
  if (c.mask == MaskKind::Random) {
    EXPECT_GT(empty_rows, 0) << "no query row without keys in a random layout";
  } else if (c.mask == MaskKind::AllKept) {
    EXPECT_EQ(empty_rows, 0);
  } else if (c.mask == MaskKind::NoneKept) {
    EXPECT_EQ(empty_rows, c.B * c.H * c.Sq);
  }

  if (c.mask == MaskKind::AllKept) {
    // Every block kept: the same attention as dense_attention.
    Qkv d = t;
    d.out = ref::make_tensor(c.out, {c.B, c.H, c.Sq, c.D}, c.out_layout);
    d.lse = c.with_lse ? ref::make_tensor(DType::F32, {c.B, c.H, c.Sq}, c.out_layout) : HostTensor{};
    dense_attention(t.q.view, t.k.view, t.v.view, t.scale, d.out.view, d.lse.view, kStream);
    EXPECT_TRUE(matches_reference(d.out.view, d.lse.view, want, low));
    const std::vector<double> so = ref::to_vector(t.out.view), dout = ref::to_vector(d.out.view);
    // Both within tolerance of the reference: at most twice the tolerance apart.
    const double tol = 2.0 * (2.0 * max_abs_diff(low.out, want.out) + 4.0 * ref::kF32Eps * max_abs(want.out)) +
                       2.0 * output_roundoff(c.out) * max_abs(want.out) + 2.0 * output_floor(c.out);
    EXPECT_LE(max_abs_diff(so, dout), tol);
  }
}

TEST_P(BlockSparseAttention, ThreadCountIndependent) {
  const SparseCase c = GetParam();
  ref::Rng rng(case_seed());
  Qkv t = make_qkv(c.B, c.H, c.Sq, c.Sk, c.D, c.in, c.out, c.qkv_layout, c.out_layout, c.with_lse, c.q_std, rng);
  const Blocks bl = make_blocks(c.B, c.H, c.Sq, c.Sk, c.Cq, c.Ck, c.mask, c.unit_clusters, rng);
  block_sparse_attention(t.q.view, t.k.view, t.v.view, bl.layout(), t.scale, t.out.view, t.lse.view, Stream::cpu(1));
  const std::vector<uint8_t> out1 = t.out.bytes(), lse1 = t.lse.bytes();
  for (int threads : {2, 3}) {
    ref::poison(t.out);
    if (c.with_lse) ref::poison(t.lse);
    block_sparse_attention(t.q.view, t.k.view, t.v.view, bl.layout(), t.scale, t.out.view, t.lse.view,
                           Stream::cpu(threads));
    EXPECT_EQ(t.out.bytes(), out1) << threads << " threads";
    EXPECT_EQ(t.lse.bytes(), lse1) << threads << " threads";
  }
}

TEST_P(BlockSparseAttention, DensityMatchesTheDefinition) {
  const SparseCase c = GetParam();
  ref::Rng rng(case_seed());
  const Blocks bl = make_blocks(c.B, c.H, c.Sq, c.Sk, c.Cq, c.Ck, c.mask, c.unit_clusters, rng);
  HostTensor density = ref::make_tensor(DType::F32, {c.B, c.H}, Layout::TransposedPadded);
  ref::poison(density);
  const std::vector<uint8_t> before = density.bytes();
  block_density(bl.layout(), density.view, kStream);
  ASSERT_EQ(ref::count_poisoned(density.view), 0);
  EXPECT_TRUE(density.outside_view_unchanged(before));
  const std::vector<double> got = ref::to_vector(density.view);
  const std::vector<double> want = ref::block_density(bl.layout(), c.Sq, c.Sk);
  for (size_t i = 0; i < got.size(); ++i) {
    // Integer pair counts are exact in fp32 below 2^24 (and in any wider type); the one division
    // and the final rounding to fp32 cost at most one ulp each.
    EXPECT_NEAR(got[i], want[i], 2.0 * ref::kF32Eps * want[i]) << "(b,h) " << i;
    if (c.mask == MaskKind::AllKept) {
      EXPECT_EQ(got[i], 1.0);
    } else if (c.mask == MaskKind::NoneKept) {
      EXPECT_EQ(got[i], 0.0);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, BlockSparseAttention,
    ::testing::Values(SparseCase{"f32_B2H5_S333", 2, 5, 333, 333, 64, 8, 12, DType::F32, DType::F32, Layout::Contiguous,
                                 Layout::Contiguous, true, MaskKind::Random, false, 1.0},
                      SparseCase{"bf16_bshd_Sq77_Sk333_D128", 1, 2, 77, 333, 128, 5, 10, DType::BF16, DType::BF16,
                                 Layout::Transposed, Layout::Transposed, true, MaskKind::Random, false, 1.5},
                      SparseCase{"f16_S300_no_lse", 2, 3, 300, 300, 64, 6, 7, DType::F16, DType::F16,
                                 Layout::TransposedPadded, Layout::TransposedPadded, false, MaskKind::Random, false,
                                 1.0},
                      SparseCase{"f32_H40_S33", 1, 40, 33, 33, 64, 4, 5, DType::F32, DType::F32, Layout::Transposed,
                                 Layout::Transposed, true, MaskKind::Random, false, 1.0},
                      SparseCase{"all_kept_D128", 1, 2, 200, 260, 128, 5, 6, DType::F32, DType::F32, Layout::Contiguous,
                                 Layout::Padded, true, MaskKind::AllKept, false, 1.0},
                      SparseCase{"all_kept_bf16", 2, 1, 77, 77, 64, 3, 4, DType::BF16, DType::BF16, Layout::Transposed,
                                 Layout::Transposed, true, MaskKind::AllKept, false, 1.0},
                      SparseCase{"one_key_cluster_bf16_to_f32", 2, 2, 150, 260, 64, 6, 9, DType::BF16, DType::F32,
                                 Layout::Contiguous, Layout::Transposed, true, MaskKind::OneKeyClusterPerRow, false,
                                 1.0},
                      SparseCase{"none_kept", 1, 3, 40, 50, 64, 3, 3, DType::F16, DType::F16, Layout::Contiguous,
                                 Layout::Padded, true, MaskKind::NoneKept, false, 1.0},
                      SparseCase{"one_token_clusters", 1, 2, 40, 45, 64, 40, 45, DType::F32, DType::F32,
                                 Layout::Transposed, Layout::Contiguous, true, MaskKind::Random, true, 1.0},
                      SparseCase{"single_cluster", 2, 2, 129, 130, 128, 1, 1, DType::F16, DType::F32, Layout::Padded,
                                 Layout::Contiguous, true, MaskKind::AllKept, false, 1.0},
                      SparseCase{"odd_head_dim_27", 2, 2, 140, 210, 27, 5, 7, DType::F16, DType::F32,
                                 Layout::Transposed, Layout::Transposed, true, MaskKind::Random, false, 1.0},
                      SparseCase{"large_scores", 1, 2, 100, 190, 64, 4, 6, DType::F32, DType::F32, Layout::Contiguous,
                                 Layout::Contiguous, true, MaskKind::Random, false, 30.0}),
    [](const auto& p) { return std::string(p.param.name); });

// ---------------------------------------------------------------------------------------------
// Fused row permutations: reading Q, K, V through permutations and writing O / LSE through the
// query permutation is the same computation as gather -> attend -> scatter, bit for bit.

// One random permutation of [0, S) per (b,h), as a [B,H,S] i32 tensor.
HostTensor random_permutation(int64_t B, int64_t H, int64_t S, ref::Rng& rng) {
  HostTensor p = ref::make_tensor(DType::I32, {B, H, S});
  std::vector<double> all;
  for (int64_t bh = 0; bh < B * H; ++bh) {
    std::vector<double> row(static_cast<size_t>(S));
    for (int64_t i = 0; i < S; ++i) row[static_cast<size_t>(i)] = static_cast<double>(i);
    for (int64_t i = S - 1; i > 0; --i) std::swap(row[static_cast<size_t>(i)], row[rng.integer(0, i)]);
    all.insert(all.end(), row.begin(), row.end());
  }
  ref::from_vector(p.view, all);
  return p;
}

TEST(FusedPermutation, EqualsGatherAttendScatter) {
  for (const DType dtype : {DType::F32, DType::BF16}) {
    ref::Rng rng(case_seed());
    const int64_t B = 2, H = 2, Sq = 150, Sk = 170, D = 64;
    Qkv t = make_qkv(B, H, Sq, Sk, D, dtype, dtype, Layout::Contiguous, Layout::Contiguous, true, 1.0, rng);
    const Blocks bl = make_blocks(B, H, Sq, Sk, 5, 7, MaskKind::Random, false, rng);
    const HostTensor q_perm = random_permutation(B, H, Sq, rng), k_perm = random_permutation(B, H, Sk, rng);

    block_sparse_attention(t.q.view, t.k.view, t.v.view, bl.layout(), t.scale, t.out.view, t.lse.view, kStream, {},
                           RowPermutation{q_perm.view, k_perm.view});

    HostTensor qp = ref::make_tensor(dtype, {B, H, Sq, D}), kp = ref::make_tensor(dtype, {B, H, Sk, D}),
               vp = ref::make_tensor(dtype, {B, H, Sk, D});
    gather_rows(t.q.view, q_perm.view, qp.view, kStream);
    gather_rows(t.k.view, k_perm.view, kp.view, kStream);
    gather_rows(t.v.view, k_perm.view, vp.view, kStream);
    HostTensor op = ref::make_tensor(dtype, {B, H, Sq, D}), lp = ref::make_tensor(DType::F32, {B, H, Sq});
    block_sparse_attention(qp.view, kp.view, vp.view, bl.layout(), t.scale, op.view, lp.view, kStream);
    HostTensor out = ref::make_tensor(dtype, {B, H, Sq, D}), lse = ref::make_tensor(DType::F32, {B, H, Sq});
    auto as_rows = [](TensorView v) {  // [B,H,S] as [B,H,S,1], so the row scatter moves it
      v.rank = 4;
      v.shape[3] = 1;
      v.stride[3] = 1;
      return v;
    };
    scatter_rows(op.view, q_perm.view, out.view, kStream);
    scatter_rows(as_rows(lp.view), q_perm.view, as_rows(lse.view), kStream);
    EXPECT_EQ(ref::to_vector(t.out.view), ref::to_vector(out.view)) << dtype_name(dtype);
    EXPECT_EQ(ref::to_vector(t.lse.view), ref::to_vector(lse.view)) << dtype_name(dtype);
  }
}

TEST(AttentionKernelChoice, CpuRunsEveryFloatDtype) {
  for (const DType dtype : {DType::F32, DType::F16, DType::BF16}) {
    const AttentionKernel k = attention_kernel(Device::cpu(), dtype, 96);
    EXPECT_TRUE(k.supported);
    EXPECT_STREQ(k.name, "cpu");
  }
  const AttentionKernel bad = attention_kernel(Device::cpu(), DType::I32, 64);
  EXPECT_FALSE(bad.supported);
  EXPECT_NE(std::string(bad.reason), "");
  EXPECT_EQ(block_sparse_attention_workspace_bytes(40, 300, 1000, 75600, Device::cpu()), 0u);
  EXPECT_THROW(block_sparse_attention_workspace_bytes(1, 0, 4, 10, Device::cpu()), InvalidArgumentError);
  EXPECT_EQ(block_sparse_attention_e4m3_workspace_bytes(40, 300, 1000, 75600, 75600, Device::cpu()), 0u);
  EXPECT_THROW(block_sparse_attention_e4m3_workspace_bytes(1, 4, 4, 10, -1, Device::cpu()), InvalidArgumentError);
}

TEST(AttentionNumerics, NanQueryRowIsNanAsInDenseAttention) {
  // One NaN in query 5: its O row and LSE are NaN, every other row is finite. Before, the epilogue
  // took the NaN row sum for an empty row and wrote LSE = -inf.
  ref::Rng rng(case_seed());
  Qkv t = make_qkv(1, 1, 12, 20, 32, DType::F32, DType::F32, Layout::Contiguous, Layout::Contiguous, true, 1.0, rng);
  ref::set(t.q.view, {0, 0, 5, 7}, std::nan(""));
  dense_attention(t.q.view, t.k.view, t.v.view, t.scale, t.out.view, t.lse.view, kStream);
  for (int64_t s = 0; s < 12; ++s) {
    EXPECT_EQ(std::isnan(ref::get(t.lse.view, {0, 0, s})), s == 5) << "row " << s;
    for (int64_t d = 0; d < 32; ++d) EXPECT_EQ(std::isnan(ref::get(t.out.view, {0, 0, s, d})), s == 5) << s;
  }
}

TEST(AttentionErrors, MessagesSpeakTheCallersLayout) {
  // [B,S,H,D] views: the dim numbers and shapes of a message are the caller's.
  std::vector<float> q(2 * 8 * 3 * 64, 1.0f), k(2 * 8 * 3 * 32, 1.0f), out(q.size());
  const auto bshd = [](std::vector<float>& m, int64_t S, int64_t D) {
    return TensorView::bshd(m.data(), DType::F32, 2, 3, S, D);
  };
  expect_error_message<ShapeError>(
      [&] { dense_attention(bshd(q, 8, 64), bshd(k, 8, 32), bshd(k, 8, 32), 0.125f, bshd(out, 8, 64), {}, kStream); },
      "k dim 3 (D of [B,S,H,D]) must be 64 as in q, got [2,8,3,32] f32 cpu");
  std::vector<float> none;
  expect_error_message<ShapeError>(
      [&] {
        dense_attention(bshd(q, 8, 64), bshd(none, 0, 64), bshd(none, 0, 64), 0.125f, bshd(out, 8, 64), {}, kStream);
      },
      "k is empty ([2,0,3,64] f32 cpu as [B,S,H,D]): attention needs B, S, H and D >= 1");
}

// ---------------------------------------------------------------------------------------------
// Errors: the documented type, and out / lse untouched.

struct ErrorSetup {
  static constexpr int64_t B = 1, H = 2, S = 40, D = 64, Cq = 3, Ck = 4;
  Qkv t;
  Blocks bl;
  ErrorSetup() {
    ref::Rng rng(case_seed());
    t = make_qkv(B, H, S, S, D, DType::F32, DType::F32, Layout::Contiguous, Layout::Contiguous, true, 1.0, rng);
    bl = make_blocks(B, H, S, S, Cq, Ck, MaskKind::Random, false, rng);
  }
};

TEST(AttentionErrors, BadOffsetsAreInvalidArguments) {
  ErrorSetup s;
  auto& t = s.t;
  const std::vector<const HostTensor*> outs = {&t.out, &t.lse};
  const int S = static_cast<int>(ErrorSetup::S);
  // Each bad offsets row goes into (b,h) = (0,1) of q_offsets or k_offsets (C = 3 or 4 clusters).
  const std::vector<std::vector<double>> bad_q = {
      {1, 10, 20, S}, {0, 20, 10, S}, {0, 10, 20, S - 1}, {0, 10, 20, S + 1}, {-1, 10, 20, S}};
  const std::vector<std::vector<double>> bad_k = {{2, 10, 20, 30, S}, {0, 10, 30, 20, S}, {0, 10, 20, 30, 39}};
  for (const auto& row : bad_q) {
    Blocks bl = s.bl;
    bl.q_offsets = ref::make_tensor(DType::I32, {1, 2, 4});
    std::vector<double> v = ref::to_vector(s.bl.q_offsets.view);
    std::copy(row.begin(), row.end(), v.begin() + 4);
    ref::from_vector(bl.q_offsets.view, v);
    EXPECT_ERROR_UNTOUCHED(
        InvalidArgumentError, outs,
        block_sparse_attention(t.q.view, t.k.view, t.v.view, bl.layout(), t.scale, t.out.view, t.lse.view, kStream));
  }
  for (const auto& row : bad_k) {
    Blocks bl = s.bl;
    bl.k_offsets = ref::make_tensor(DType::I32, {1, 2, 5});
    std::vector<double> v = ref::to_vector(s.bl.k_offsets.view);
    std::copy(row.begin(), row.end(), v.begin() + 5);
    ref::from_vector(bl.k_offsets.view, v);
    EXPECT_ERROR_UNTOUCHED(
        InvalidArgumentError, outs,
        block_sparse_attention(t.q.view, t.k.view, t.v.view, bl.layout(), t.scale, t.out.view, t.lse.view, kStream));
  }
}

TEST(AttentionErrors, DensityRejectsOffsetsOutOfRange) {
  // block_density has no Sq/Sk to check the last offset against, but offsets that do not start at
  // 0 or that decrease are values out of range ("offsets" in ops.hpp's errors paragraph).
  ErrorSetup s;
  const int S = static_cast<int>(ErrorSetup::S);
  for (const std::vector<double>& row :
       {std::vector<double>{2, 10, 20, 30, S}, std::vector<double>{0, 10, 30, 20, S}}) {
    Blocks bl = s.bl;
    bl.k_offsets = ref::make_tensor(DType::I32, {1, 2, 5});
    std::vector<double> v = ref::to_vector(s.bl.k_offsets.view);
    std::copy(row.begin(), row.end(), v.begin() + 5);
    ref::from_vector(bl.k_offsets.view, v);
    HostTensor density = ref::make_tensor(DType::F32, {1, 2});
    ref::poison(density);
    EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, {&density}, block_density(bl.layout(), density.view, kStream));
  }
}

TEST(AttentionErrors, ShapeErrors) {
  ErrorSetup s;
  auto& t = s.t;
  const std::vector<const HostTensor*> outs = {&t.out, &t.lse};
  constexpr int64_t B = ErrorSetup::B, H = ErrorSetup::H, S = ErrorSetup::S, D = ErrorSetup::D;
  HostTensor k_d = ref::make_tensor(DType::F32, {B, H, S, D + 8});
  HostTensor v_s = ref::make_tensor(DType::F32, {B, H, S + 1, D});
  HostTensor v_d = ref::make_tensor(DType::F32, {B, H, S, D / 2});
  HostTensor k_h = ref::make_tensor(DType::F32, {B, H + 1, S, D});
  HostTensor out_s = ref::make_tensor(DType::F32, {B, H, S + 1, D});
  HostTensor lse_s = ref::make_tensor(DType::F32, {B, H, S - 1});
  HostTensor lse_4 = ref::make_tensor(DType::F32, {B, H, S, 1});
  HostTensor q_rank3 = ref::make_tensor(DType::F32, {H, S, D});
  ref::Rng fill_rng(case_seed(1));
  for (HostTensor* x : {&k_d, &v_s, &v_d, &k_h}) ref::fill_normal(x->view, fill_rng);
  ref::poison(out_s);
  ref::poison(lse_s);
  ref::poison(lse_4);
  const BlockLayout L = s.bl.layout();
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs,
                         dense_attention(t.q.view, k_d.view, t.v.view, t.scale, t.out.view, t.lse.view, kStream));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs,
                         dense_attention(t.q.view, t.k.view, v_s.view, t.scale, t.out.view, t.lse.view, kStream));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs,
                         dense_attention(t.q.view, t.k.view, v_d.view, t.scale, t.out.view, t.lse.view, kStream));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs,
                         dense_attention(t.q.view, k_h.view, t.v.view, t.scale, t.out.view, t.lse.view, kStream));
  EXPECT_ERROR_UNTOUCHED(ShapeError, {&out_s},
                         dense_attention(t.q.view, t.k.view, t.v.view, t.scale, out_s.view, t.lse.view, kStream));
  EXPECT_ERROR_UNTOUCHED(ShapeError, {&lse_s},
                         dense_attention(t.q.view, t.k.view, t.v.view, t.scale, t.out.view, lse_s.view, kStream));
  EXPECT_ERROR_UNTOUCHED(ShapeError, {&lse_4},
                         dense_attention(t.q.view, t.k.view, t.v.view, t.scale, t.out.view, lse_4.view, kStream));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs,
                         dense_attention(q_rank3.view, t.k.view, t.v.view, t.scale, t.out.view, t.lse.view, kStream));
  EXPECT_ERROR_UNTOUCHED(
      ShapeError, outs,
      block_sparse_attention(t.q.view, k_d.view, t.v.view, L, t.scale, t.out.view, t.lse.view, kStream));
  EXPECT_ERROR_UNTOUCHED(
      ShapeError, outs,
      block_sparse_attention(t.q.view, t.k.view, v_s.view, L, t.scale, t.out.view, t.lse.view, kStream));
  EXPECT_ERROR_UNTOUCHED(
      ShapeError, {&out_s},
      block_sparse_attention(t.q.view, t.k.view, t.v.view, L, t.scale, out_s.view, t.lse.view, kStream));
  // Mask extents that do not match the offsets' cluster counts.
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{ErrorSetup::Cq, ErrorSetup::Ck + 1},
                            {ErrorSetup::Cq + 1, ErrorSetup::Ck},
                            {ErrorSetup::Ck, ErrorSetup::Cq}}) {
    Blocks bl = s.bl;
    bl.mask = ref::make_tensor(DType::U8, {B, H, rows, cols});
    ref::from_vector(bl.mask.view, std::vector<double>(static_cast<size_t>(B * H * rows * cols), 1.0));
    EXPECT_ERROR_UNTOUCHED(
        ShapeError, outs,
        block_sparse_attention(t.q.view, t.k.view, t.v.view, bl.layout(), t.scale, t.out.view, t.lse.view, kStream));
    HostTensor density = ref::make_tensor(DType::F32, {B, H});
    ref::poison(density);
    EXPECT_ERROR_UNTOUCHED(ShapeError, {&density}, block_density(bl.layout(), density.view, kStream));
  }
  // Offsets of another batch/head extent.
  {
    Blocks bl = s.bl;
    bl.q_offsets = ref::make_tensor(DType::I32, {B, H + 1, ErrorSetup::Cq + 1});
    EXPECT_ERROR_UNTOUCHED(
        ShapeError, outs,
        block_sparse_attention(t.q.view, t.k.view, t.v.view, bl.layout(), t.scale, t.out.view, t.lse.view, kStream));
  }
  HostTensor density_t = ref::make_tensor(DType::F32, {H, B});
  HostTensor density_3 = ref::make_tensor(DType::F32, {B, H, 1});
  ref::poison(density_t);
  ref::poison(density_3);
  EXPECT_ERROR_UNTOUCHED(ShapeError, {&density_t}, block_density(L, density_t.view, kStream));
  EXPECT_ERROR_UNTOUCHED(ShapeError, {&density_3}, block_density(L, density_3.view, kStream));
}

TEST(AttentionErrors, DTypeErrors) {
  ErrorSetup s;
  auto& t = s.t;
  const std::vector<const HostTensor*> outs = {&t.out, &t.lse};
  constexpr int64_t B = ErrorSetup::B, H = ErrorSetup::H, S = ErrorSetup::S, D = ErrorSetup::D;
  HostTensor q_i32 = ref::make_tensor(DType::I32, {B, H, S, D});
  HostTensor v_u8 = ref::make_tensor(DType::U8, {B, H, S, D});
  HostTensor out_i32 = ref::make_tensor(DType::I32, {B, H, S, D});
  HostTensor lse_f16 = ref::make_tensor(DType::F16, {B, H, S});
  ref::poison(out_i32);
  ref::poison(lse_f16);
  const BlockLayout L = s.bl.layout();
  EXPECT_ERROR_UNTOUCHED(DTypeError, outs,
                         dense_attention(q_i32.view, t.k.view, t.v.view, t.scale, t.out.view, t.lse.view, kStream));
  EXPECT_ERROR_UNTOUCHED(DTypeError, outs,
                         dense_attention(t.q.view, t.k.view, v_u8.view, t.scale, t.out.view, t.lse.view, kStream));
  EXPECT_ERROR_UNTOUCHED(DTypeError, {&out_i32},
                         dense_attention(t.q.view, t.k.view, t.v.view, t.scale, out_i32.view, t.lse.view, kStream));
  EXPECT_ERROR_UNTOUCHED(DTypeError, {&lse_f16},
                         dense_attention(t.q.view, t.k.view, t.v.view, t.scale, t.out.view, lse_f16.view, kStream));
  EXPECT_ERROR_UNTOUCHED(
      DTypeError, outs,
      block_sparse_attention(q_i32.view, t.k.view, t.v.view, L, t.scale, t.out.view, t.lse.view, kStream));
  EXPECT_ERROR_UNTOUCHED(
      DTypeError, {&out_i32},
      block_sparse_attention(t.q.view, t.k.view, t.v.view, L, t.scale, out_i32.view, t.lse.view, kStream));
  {
    Blocks bl = s.bl;
    bl.mask = ref::make_tensor(DType::I32, {B, H, ErrorSetup::Cq, ErrorSetup::Ck});
    ref::from_vector(bl.mask.view,
                     std::vector<double>(static_cast<size_t>(B * H * ErrorSetup::Cq * ErrorSetup::Ck), 1.0));
    EXPECT_ERROR_UNTOUCHED(
        DTypeError, outs,
        block_sparse_attention(t.q.view, t.k.view, t.v.view, bl.layout(), t.scale, t.out.view, t.lse.view, kStream));
  }
  {
    Blocks bl = s.bl;
    bl.k_offsets = ref::make_tensor(DType::F32, {B, H, ErrorSetup::Ck + 1});
    ref::from_vector(bl.k_offsets.view, ref::to_vector(s.bl.k_offsets.view));
    EXPECT_ERROR_UNTOUCHED(
        DTypeError, outs,
        block_sparse_attention(t.q.view, t.k.view, t.v.view, bl.layout(), t.scale, t.out.view, t.lse.view, kStream));
    HostTensor density = ref::make_tensor(DType::F32, {B, H});
    ref::poison(density);
    EXPECT_ERROR_UNTOUCHED(DTypeError, {&density}, block_density(bl.layout(), density.view, kStream));
  }
  HostTensor density_f16 = ref::make_tensor(DType::F16, {B, H});
  ref::poison(density_f16);
  EXPECT_ERROR_UNTOUCHED(DTypeError, {&density_f16}, block_density(L, density_f16.view, kStream));
}

TEST(AttentionErrors, CudaTensorsAreUnsupported) {
  ErrorSetup s;
  auto& t = s.t;
  const std::vector<const HostTensor*> outs = {&t.out, &t.lse};
  const Stream cuda{Device::cuda(0), nullptr, 0};
  BlockLayout L = s.bl.layout();
  EXPECT_ERROR_UNTOUCHED(
      UnsupportedError, outs,
      dense_attention(ref::on_cuda(t.q.view), t.k.view, t.v.view, t.scale, t.out.view, t.lse.view, kStream));
  EXPECT_ERROR_UNTOUCHED(
      UnsupportedError, outs,
      dense_attention(t.q.view, t.k.view, t.v.view, t.scale, t.out.view, ref::on_cuda(t.lse.view), kStream));
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, outs,
                         dense_attention(t.q.view, t.k.view, t.v.view, t.scale, t.out.view, t.lse.view, cuda));
  EXPECT_ERROR_UNTOUCHED(
      UnsupportedError, outs,
      block_sparse_attention(t.q.view, t.k.view, ref::on_cuda(t.v.view), L, t.scale, t.out.view, t.lse.view, kStream));
  BlockLayout Lc = L;
  Lc.mask = ref::on_cuda(L.mask);
  EXPECT_ERROR_UNTOUCHED(
      UnsupportedError, outs,
      block_sparse_attention(t.q.view, t.k.view, t.v.view, Lc, t.scale, t.out.view, t.lse.view, kStream));
  HostTensor density = ref::make_tensor(DType::F32, {1, 2});
  ref::poison(density);
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, {&density}, block_density(Lc, density.view, kStream));
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, {&density}, block_density(L, density.view, cuda));
}

TEST(AttentionErrors, BadPermutations) {
  ErrorSetup s;
  auto& t = s.t;
  const std::vector<const HostTensor*> outs = {&t.out, &t.lse};
  const BlockLayout L = s.bl.layout();
  constexpr int64_t B = ErrorSetup::B, H = ErrorSetup::H, S = ErrorSetup::S;
  ref::Rng rng(case_seed());
  HostTensor perm = random_permutation(B, H, S, rng);
  auto call = [&](const RowPermutation& p) {
    block_sparse_attention(t.q.view, t.k.view, t.v.view, L, t.scale, t.out.view, t.lse.view, kStream, {}, p);
  };
  std::vector<double> values = ref::to_vector(perm.view);
  values[7] = values[3];  // a repeat: some row would never be read or written
  ref::from_vector(perm.view, values);
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, outs, call({perm.view, {}}));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, outs, call({{}, perm.view}));
  values[7] = static_cast<double>(S);  // out of range
  ref::from_vector(perm.view, values);
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, outs, call({perm.view, {}}));
  HostTensor short_perm = ref::make_tensor(DType::I32, {B, H, S - 1});
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, call({short_perm.view, {}}));
  HostTensor bytes = ref::make_tensor(DType::U8, {B, H, S});
  EXPECT_ERROR_UNTOUCHED(DTypeError, outs, call({{}, bytes.view}));
}

}  // namespace
