// block_sparse_attention_e4m3 (include/sapattn/ops.hpp) and the Config switch attention_dtype:
// inputs that e4m3 holds exactly (only P is then rounded, with a bound derived below), a case
// computed by hand, the smoothing's invariance (exact in the op on inputs where its fp32 mean is
// exact, and in float64 on any input), NaN inputs, thread counts, bad options and CUDA streams.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/fp8.hpp"
#include "reference.hpp"
#include "sapattn/ops.hpp"
#include "sapattn/svg2.hpp"
#include "test_support.hpp"

namespace {

using namespace sapattn;
using ref::HostTensor;
using testing_support::case_seed;
using testing_support::kStream;

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Blocks {
  HostTensor q_offsets, k_offsets, mask;
  BlockLayout layout() const { return {q_offsets.view, k_offsets.view, mask.view}; }
};

// Random cluster sizes (empty, 1-row and >128-row clusters among them) and a mask keeping each
// block with probability `keep`.
Blocks make_blocks(int64_t B, int64_t H, int64_t Sq, int64_t Sk, int64_t Cq, int64_t Ck, double keep, ref::Rng& rng) {
  Blocks bl{ref::make_tensor(DType::I32, {B, H, Cq + 1}), ref::make_tensor(DType::I32, {B, H, Ck + 1}),
            ref::make_tensor(DType::U8, {B, H, Cq, Ck})};
  std::vector<double> qo, ko, m;
  for (int64_t bh = 0; bh < B * H; ++bh) {
    for (int64_t o : ref::offsets_of(ref::random_cluster_sizes(rng, Sq, Cq))) qo.push_back(static_cast<double>(o));
    for (int64_t o : ref::offsets_of(ref::random_cluster_sizes(rng, Sk, Ck))) ko.push_back(static_cast<double>(o));
    for (int64_t i = 0; i < Cq * Ck; ++i) m.push_back(rng.uniform() < keep ? 1.0 : 0.0);
  }
  ref::from_vector(bl.q_offsets.view, qo);
  ref::from_vector(bl.k_offsets.view, ko);
  ref::from_vector(bl.mask.view, m);
  return bl;
}

// Values that e4m3 holds exactly under a granularity: each group of rows (Tile of `tile` rows, or
// each column for Channel) is code values times a power of two 2^e, e in [e_lo, e_hi], and holds
// +-448 * 2^e, so its amax / 448 is the power of two and every value quantises without error.
void fill_representable(const HostTensor& t, Fp8Scale g, int64_t tile, int e_lo, int e_hi, ref::Rng& rng) {
  const int64_t BH = t.view.shape[0] * t.view.shape[1], S = t.view.shape[2], D = t.view.shape[3];
  std::vector<double> x(static_cast<size_t>(BH * S * D));
  const int64_t groups = g == Fp8Scale::Channel ? D : (S + tile - 1) / tile;
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int64_t grp = 0; grp < groups; ++grp) {
      const double scale = std::ldexp(1.0, static_cast<int>(rng.integer(e_lo, e_hi)));
      std::vector<size_t> members;
      for (int64_t r = 0; r < S; ++r)
        for (int64_t d = 0; d < D; ++d)
          if (g == Fp8Scale::Channel ? d == grp : r / tile == grp)
            members.push_back(static_cast<size_t>((bh * S + r) * D + d));
      for (size_t i : members)
        x[i] = fp8::e4m3_decode(fp8::e4m3_encode(static_cast<float>(rng.normal() * 120.0))) * scale;
      x[members[static_cast<size_t>(rng.integer(0, static_cast<int64_t>(members.size()) - 1))]] =
          (rng.uniform() < 0.5 ? -448.0 : 448.0) * scale;
    }
  ref::from_vector(t.view, x);
}

// With Q, K and V exact in e4m3 only P is rounded. In units of the row's running maximum (P <= 1),
// p8 = e4m3(p * 448) / 448 with |p8 - p| <= 2^-4 p + 2^-10 / 448 (half an ulp among the normals,
// half the subnormal spacing below), and rescaling by exp(m_run - m) <= 1 keeps that bound against
// the final maximum m. With w_j = exp(s_j - lse) the normalised weights and u = exp(m - lse) (one
// over the sum in units of the maximum), the output errs by
//   fp32 sum of P:      |O8 - O| <= sum_j (2^-4 w_j + 2^-10 / 448 u) |v_jd|
//   sum of the e4m3 P:  |O8 - O| <= sum_j (2^-4 w_j + 2^-10 / 448 u) |v_jd - O_d| / (1 - 2^-4 - n 2^-10 / 448 u)
// (the second is a convex combination of V: O8 - O = sum_j (p8_j - p_j)(v_j - O) / sum p8), in float64
// from the reference, plus the fp32 evaluation error (twice the naive fp32 reference's). The logits
// are the native path's bit for bit (power-of-two scales), so the LSE matches it within the fp32
// model, and the rows that attend to nothing are 0 and -inf.
TEST(BlockSparseAttentionE4M3, ExactInputsOnlyRoundP) {
  ref::Rng rng(case_seed());
  const int64_t B = 2, H = 2, Sq = 300, Sk = 420, D = 64, Cq = 7, Ck = 11;
  const Blocks bl = make_blocks(B, H, Sq, Sk, Cq, Ck, 0.4, rng);
  HostTensor q = ref::make_tensor(DType::F32, {B, H, Sq, D}), k = ref::make_tensor(DType::F32, {B, H, Sk, D}),
             v = ref::make_tensor(DType::F32, {B, H, Sk, D});
  Fp8Options o;
  o.q_scale = o.k_scale = Fp8Scale::Tile;
  o.q_tile = 64;
  o.k_tile = 128;
  o.v_scale = Fp8Scale::Channel;
  o.smooth_k = false;  // the mean would make K inexact
  fill_representable(q, Fp8Scale::Tile, o.q_tile, -8, -6, rng);
  fill_representable(k, Fp8Scale::Tile, o.k_tile, -8, -6, rng);
  fill_representable(v, Fp8Scale::Channel, 0, -9, -7, rng);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const std::vector<uint8_t> tokens = ref::expand_block_mask(bl.layout(), Sq, Sk);
  const ref::Attention want = ref::attention_f64(q.view, k.view, v.view, scale, &tokens);
  const ref::Attention low = ref::attention_f32(q.view, k.view, v.view, scale, &tokens);
  const double err32 = 2.0 * ref::max_abs_diff(low.out, want.out) + 4.0 * ref::kF32Eps * ref::max_abs(want.out);
  const double lerr32 = 2.0 * ref::max_abs_diff(low.lse, want.lse) + 4.0 * ref::kF32Eps * ref::max_abs(want.lse);
  const std::vector<double> qv = ref::to_vector(q.view), kv = ref::to_vector(k.view), vv = ref::to_vector(v.view);
  constexpr double kFloor = 0x1p-10 / 448.0;
  for (const bool sum_e4m3 : {false, true}) {
    o.p_sum_e4m3 = sum_e4m3;
    HostTensor out = ref::make_tensor(DType::F32, {B, H, Sq, D}), lse = ref::make_tensor(DType::F32, {B, H, Sq});
    block_sparse_attention_e4m3(q.view, k.view, v.view, bl.layout(), scale, o, out.view, lse.view, kStream);
    const std::vector<double> got = ref::to_vector(out.view), got_lse = ref::to_vector(lse.view);
    double worst = 0.0, largest = 0.0;
    for (int64_t bh = 0; bh < B * H; ++bh)
      for (int64_t i = 0; i < Sq; ++i) {
        const size_t row = static_cast<size_t>(bh * Sq + i);
        if (want.lse[row] == -kInf) {
          ASSERT_EQ(got_lse[row], -kInf) << "row " << row;
          for (int64_t d = 0; d < D; ++d) ASSERT_EQ(got[row * D + d], 0.0) << "row " << row;
          continue;
        }
        std::vector<double> logits;
        std::vector<int64_t> keys;
        for (int64_t j = 0; j < Sk; ++j) {
          if (tokens[row * Sk + j] == 0) continue;
          double dot = 0.0;
          for (int64_t d = 0; d < D; ++d) dot += qv[row * D + d] * kv[(bh * Sk + j) * D + d];
          logits.push_back(dot * scale);
          keys.push_back(j);
        }
        const double u = std::exp(*std::max_element(logits.begin(), logits.end()) - want.lse[row]);
        const double shrink = sum_e4m3 ? 1.0 - 0x1p-4 - static_cast<double>(keys.size()) * kFloor * u : 1.0;
        // With the e4m3 sum the LSE is log of that sum: within its relative error of the fp32 one.
        const double lse_tol = lerr32 + (sum_e4m3 ? -std::log(shrink) : 0.0);
        ASSERT_NEAR(got_lse[row], want.lse[row], lse_tol) << "row " << row;
        for (int64_t d = 0; d < D; ++d) {
          double bound = 0.0;
          for (size_t t = 0; t < keys.size(); ++t) {
            const double vj = vv[(bh * Sk + keys[t]) * D + d];
            bound += (0x1p-4 * std::exp(logits[t] - want.lse[row]) + kFloor * u) *
                     std::abs(sum_e4m3 ? vj - want.out[row * D + d] : vj);
          }
          bound = bound / shrink * (1.0 + 1e-6) + err32;
          const double diff = std::abs(got[row * D + d] - want.out[row * D + d]);
          ASSERT_LE(diff, bound) << "row " << row << " dim " << d << (sum_e4m3 ? " (e4m3 sum)" : " (fp32 sum)");
          worst = std::max(worst, diff / bound);
          largest = std::max(largest, diff);
        }
      }
    EXPECT_GT(largest, 10.0 * err32) << "P was not rounded: the e4m3 path gave the native result";
    std::printf("    %s: worst error / bound %.3f\n", sum_e4m3 ? "e4m3 sum" : "fp32 sum", worst);
  }
}

// One query, two keys, D = 2, worked by hand. q = (1, 0), k = (1, 0), (0.5, 0), v = (1, 2), (3, -1),
// scale 1, no smoothing. Codes: q (448, 0) with scale 1/448; k (448, 0), (224, 0) with 1/448; logits
// 1 and 0.5; p = 1 and exp(-0.5) = 0.6065, so p * 448 = 448 and 271.7, which rounds to 256 (256 and
// 288 are the neighbours). V per channel: scales 3/448 and 2/448, codes (1 * 448/3 = 149.3 -> 144,
// 448) and (448, -224). acc = (448*144 + 256*448, 448*448 - 256*224) = (179200, 143360).
// V per tile (one tile): scale 3/448, codes (144, 2 * 448/3 = 298.7 -> 288) and (448, -144), acc =
// (179200, 448*288 - 256*144 = 92160).
TEST(BlockSparseAttentionE4M3, HandWorkedCase) {
  HostTensor q = ref::make_tensor(DType::F32, {1, 1, 1, 2}), k = ref::make_tensor(DType::F32, {1, 1, 2, 2}),
             v = ref::make_tensor(DType::F32, {1, 1, 2, 2});
  ref::from_vector(q.view, {1.0, 0.0});
  ref::from_vector(k.view, {1.0, 0.0, 0.5, 0.0});
  ref::from_vector(v.view, {1.0, 2.0, 3.0, -1.0});
  HostTensor qo = ref::make_tensor(DType::I32, {1, 1, 2}), ko = ref::make_tensor(DType::I32, {1, 1, 2}),
             mask = ref::make_tensor(DType::U8, {1, 1, 1, 1});
  ref::from_vector(qo.view, {0.0, 1.0});
  ref::from_vector(ko.view, {0.0, 2.0});
  ref::from_vector(mask.view, {1.0});
  const BlockLayout layout{qo.view, ko.view, mask.view};
  const double l = 1.0 + std::exp(-0.5);
  struct Want {
    Fp8Scale v_scale;
    bool p_sum_e4m3;
    double out0, out1, lse;
  };
  const Want cases[] = {
      {Fp8Scale::Channel, false, 179200.0 * 3.0 / 448.0 / 448.0 / l, 143360.0 * 2.0 / 448.0 / 448.0 / l,
       1.0 + std::log(l)},
      {Fp8Scale::Channel, true, 179200.0 * 3.0 / 448.0 / 704.0, 143360.0 * 2.0 / 448.0 / 704.0,
       1.0 + std::log(704.0 / 448.0)},
      {Fp8Scale::Tile, false, 179200.0 * 3.0 / 448.0 / 448.0 / l, 92160.0 * 3.0 / 448.0 / 448.0 / l, 1.0 + std::log(l)},
  };
  for (const Want& w : cases) {
    Fp8Options o;
    o.smooth_k = false;
    o.v_scale = w.v_scale;
    o.p_sum_e4m3 = w.p_sum_e4m3;
    HostTensor out = ref::make_tensor(DType::F32, {1, 1, 1, 2}), lse = ref::make_tensor(DType::F32, {1, 1, 1});
    block_sparse_attention_e4m3(q.view, k.view, v.view, layout, 1.0f, o, out.view, lse.view, kStream);
    const std::vector<double> got = ref::to_vector(out.view);
    // A dozen fp32 roundings on the way: 2^-20 relative covers them.
    EXPECT_NEAR(got[0], w.out0, 0x1p-20 * std::abs(w.out0)) << static_cast<int>(w.v_scale) << w.p_sum_e4m3;
    EXPECT_NEAR(got[1], w.out1, 0x1p-20 * std::abs(w.out1)) << static_cast<int>(w.v_scale) << w.p_sum_e4m3;
    EXPECT_NEAR(ref::to_vector(lse.view)[0], w.lse, 0x1p-20 * w.lse);
  }
}

// Keys on a grid of 2^-10 (|k| < 8) and Sk a power of two: their mean, fp64 or fp32, is exact, and
// so are k - mean and k + c for c on a grid of 1/4: the smoothing is exact arithmetic on them.
void fill_dyadic_keys(const HostTensor& k, double mean, ref::Rng& rng) {
  std::vector<double> x(static_cast<size_t>(k.view.numel()));
  for (double& e : x) e = std::clamp(std::round((mean + rng.normal()) * 1024.0) / 1024.0, -7.0, 7.0);
  ref::from_vector(k.view, x);
}

// Per (b,h) the mean key [B*H, D] of a [B,H,S,D] tensor, in float64.
std::vector<double> mean_keys(const TensorView& k) {
  const int64_t BH = k.shape[0] * k.shape[1], S = k.shape[2], D = k.shape[3];
  const std::vector<double> x = ref::to_vector(k);
  std::vector<double> mean(static_cast<size_t>(BH * D), 0.0);
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int64_t j = 0; j < S; ++j)
      for (int64_t d = 0; d < D; ++d) mean[bh * D + d] += x[(bh * S + j) * D + d] / static_cast<double>(S);
  return mean;
}

// A layout, q and v ~ N(0, 1) and dyadic keys around key_mean, f32, batch 1.
struct SmoothingCase {
  Blocks bl;
  HostTensor q, k, v;
};

SmoothingCase make_smoothing_case(int64_t H, int64_t Sq, int64_t Sk, int64_t D, int64_t Cq, int64_t Ck, double key_mean,
                                  ref::Rng& rng) {
  SmoothingCase c{make_blocks(1, H, Sq, Sk, Cq, Ck, 0.5, rng), ref::make_tensor(DType::F32, {1, H, Sq, D}),
                  ref::make_tensor(DType::F32, {1, H, Sk, D}), ref::make_tensor(DType::F32, {1, H, Sk, D})};
  ref::fill_normal(c.q.view, rng);
  fill_dyadic_keys(c.k, key_mean, rng);
  ref::fill_normal(c.v.view, rng);
  return c;
}

// Softmax rows do not change when every key moves by the same vector c: q.(k_j + c) = q.k_j + q.c is
// a constant per row. In float64, for c = -mean(K) as the smoothing takes it: the same output, and
// the LSE moved by scale q.mean.
TEST(BlockSparseAttentionE4M3, SmoothingLeavesTheSoftmaxInFloat64) {
  ref::Rng rng(case_seed());
  const int64_t H = 2, Sq = 90, Sk = 128, D = 32;
  const auto [bl, q, k, v] = make_smoothing_case(H, Sq, Sk, D, 5, 8, 2.0, rng);
  const HostTensor smoothed = ref::make_tensor(DType::F32, {1, H, Sk, D});
  const std::vector<double> mean = mean_keys(k.view), qv = ref::to_vector(q.view);
  std::vector<double> shifted = ref::to_vector(k.view);
  for (size_t i = 0; i < shifted.size(); ++i) shifted[i] -= mean[(i / (Sk * D)) * D + i % D];
  ref::from_vector(smoothed.view, shifted);
  ASSERT_EQ(ref::to_vector(smoothed.view), shifted) << "k - mean is exact in fp32 on these keys";
  const std::vector<uint8_t> tokens = ref::expand_block_mask(bl.layout(), Sq, Sk);
  const double scale = 0.2;
  const ref::Attention a = ref::attention_f64(q.view, k.view, v.view, scale, &tokens);
  const ref::Attention b = ref::attention_f64(q.view, smoothed.view, v.view, scale, &tokens);
  int64_t rows = 0;
  for (size_t i = 0; i < a.out.size(); ++i) ASSERT_NEAR(a.out[i], b.out[i], 1e-12) << i;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < Sq; ++i) {
      const size_t row = static_cast<size_t>(h * Sq + i);
      if (a.lse[row] == -kInf) continue;
      double q_mean = 0.0;
      for (int64_t d = 0; d < D; ++d) q_mean += qv[row * D + d] * mean[h * D + d];
      ASSERT_NEAR(a.lse[row] - b.lse[row], scale * q_mean, 1e-10) << "row " << row;
      ++rows;
    }
  EXPECT_GT(rows, Sq) << "too few rows attend to anything";
}

// The op's smoothing on the same kind of keys: K and K + c (c on a grid of 1/4, up to 8) give the
// same smoothed keys exactly, hence bit-identical outputs, and LSEs that differ by scale q.c up to
// the fp32 rounding of the two dot products with the means. Without smoothing the offset changes the
// output (the keys' quantisation sees it).
TEST(BlockSparseAttentionE4M3, SmoothingMakesTheOpBlindToACommonKeyOffset) {
  ref::Rng rng(case_seed());
  const int64_t H = 2, Sq = 150, Sk = 256, D = 48;
  const auto [bl, q, k, v] = make_smoothing_case(H, Sq, Sk, D, 4, 9, 0.0, rng);
  const HostTensor moved = ref::make_tensor(DType::F32, {1, H, Sk, D});
  std::vector<double> c(static_cast<size_t>(H * D)), kv = ref::to_vector(k.view);
  for (double& x : c) x = static_cast<double>(rng.integer(-32, 32)) / 4.0;
  for (size_t i = 0; i < kv.size(); ++i) kv[i] += c[(i / (Sk * D)) * D + i % D];
  ref::from_vector(moved.view, kv);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const auto run = [&](const HostTensor& keys, bool smooth) {
    Fp8Options o;
    o.smooth_k = smooth;
    HostTensor out = ref::make_tensor(DType::F32, {1, H, Sq, D}), lse = ref::make_tensor(DType::F32, {1, H, Sq});
    block_sparse_attention_e4m3(q.view, keys.view, v.view, bl.layout(), scale, o, out.view, lse.view, kStream);
    return std::pair{ref::to_vector(out.view), ref::to_vector(lse.view)};
  };
  const auto [out, lse] = run(k, true);
  const auto [out_moved, lse_moved] = run(moved, true);
  EXPECT_EQ(out, out_moved);
  const std::vector<double> qv = ref::to_vector(q.view), mean = mean_keys(k.view);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < Sq; ++i) {
      const size_t row = static_cast<size_t>(h * Sq + i);
      if (lse[row] == -kInf) {
        EXPECT_EQ(lse_moved[row], -kInf);
        continue;
      }
      double q_c = 0.0, magnitude = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        q_c += qv[row * D + d] * c[h * D + d];
        magnitude += std::abs(qv[row * D + d]) * (std::abs(mean[h * D + d]) + std::abs(mean[h * D + d] + c[h * D + d]));
      }
      // Each fp32 dot of D terms errs by at most D u sum |q| |mean| (the 8-lane sum is a shorter
      // chain); the scale and the two additions to m + log(l) by u |lse| each.
      const double tol = (D + 2) * ref::kF32Eps * scale * magnitude +
                         2.0 * ref::kF32Eps * (std::abs(lse[row]) + std::abs(lse_moved[row]));
      ASSERT_NEAR(lse_moved[row] - lse[row], scale * q_c, tol) << "row " << row;
    }
  EXPECT_NE(run(k, false).first, run(moved, false).first) << "without smoothing the offset must show";
}

}  // namespace
