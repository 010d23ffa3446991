// The e4m3 attention's operands (quantize_e4m3_operands, src/cuda/fp8/fp8.hpp) with the
// granularities that take the two fused passes of fp8_operands.cu: every code and scale against the
// CPU's quantize_e4m3 of the same rows, byte for byte, Q per 128-row tile through q_perm, K - mean
// through k_perm with one scale per head (the default) or per 128-row tile (scales in rows of
// v_keys), V per channel through k_perm with its codes transposed (and zeros past the last key); the
// LSE term scale * q . mean within fp32 rounding of a float64 dot. Cases: bf16 and f16, unit-stride
// rows read 16 bytes at a time and odd strides read one element at a time, [B,S,H,D] memory, B > 1,
// sizes that are not multiples of 128 or 16, with and without smoothing and permutations, and groups
// holding an infinity or a NaN (NaN scales, as the CPU's: a query, a value, a key of a one-scale
// head). The inputs' values are short-mantissa floats in a narrow range, so the mean key's float64
// sum is exact in any order: the GPU's atomics cannot change a code.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "cuda/fp8/fp8.hpp"
#include "cuda_support.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace sapattn::cuda_test {
namespace {

constexpr int64_t kD = 128;

enum class Special { None, QueryInfValueNan, KeyInf };

struct OperandCase {
  std::string name;
  DType dtype;
  ref::Layout layout;
  int64_t B, H, Sq, Sk;
  int k_tile;  // 128, or Fp8Options::kHeadTile: one scale per head
  bool permuted, smooth;
  Special special;
};

inline void PrintTo(const OperandCase& c, std::ostream* os) { *os << c.name; }

bool hopper() { return std::string(attention_kernel(Device::cuda(0), DType::BF16, 128).name) == "sm90a-wgmma"; }

// Values N(0.2, 1) times 2^e per row, e in -3..3, rounded to the dtype.
HostTensor values(const OperandCase& c, int64_t S, ref::Rng& rng) {
  HostTensor t = poisoned(c.dtype, {c.B, c.H, S, kD}, c.layout);
  std::vector<double> x(static_cast<size_t>(c.B * c.H * S * kD));
  for (int64_t row = 0; row < c.B * c.H * S; ++row) {
    const double factor = std::ldexp(1.0, static_cast<int>(rng.integer(-3, 3)));
    for (int64_t d = 0; d < kD; ++d) x[static_cast<size_t>(row * kD + d)] = (0.2 + rng.normal()) * factor;
  }
  ref::from_vector(t.view, x);
  return t;
}

HostTensor permutations(const OperandCase& c, int64_t S, ref::Rng& rng) {
  HostTensor t = poisoned(DType::I32, {c.B, c.H, S});
  std::vector<double> all;
  for (int64_t bh = 0; bh < c.B * c.H; ++bh) {
    std::vector<int64_t> p(static_cast<size_t>(S));
    std::iota(p.begin(), p.end(), 0);
    for (int64_t i = S - 1; i > 0; --i) std::swap(p[i], p[rng.integer(0, i)]);
    all.insert(all.end(), p.begin(), p.end());
  }
  ref::from_vector(t.view, all);
  return t;
}

// One cluster per head: the offsets {0, S} (the default granularities do not read them).
HostTensor one_cluster(const OperandCase& c, int64_t S) {
  HostTensor t = poisoned(DType::I32, {c.B, c.H, 2});
  std::vector<double> o;
  for (int64_t bh = 0; bh < c.B * c.H; ++bh) o.insert(o.end(), {0.0, static_cast<double>(S)});
  ref::from_vector(t.view, o);
  return t;
}

template <typename T>
std::vector<T> download_n(const T* p, int64_t n) {
  return download(p, n);
}

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Counts the positions where two byte vectors differ and reports the first.
void expect_same_bytes(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t wrong = 0, first = -1;
  for (size_t i = 0; i < got.size(); ++i)
    if (got[i] != want[i]) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++wrong;
    }
  EXPECT_EQ(wrong, 0) << what << " differ in " << wrong << " of " << got.size() << " bytes, first at " << first
                      << ": GPU " << (first >= 0 ? int{got[first]} : 0) << ", CPU " << (first >= 0 ? int{want[first]} : 0);
}

void expect_same_floats(const std::vector<float>& got, const std::vector<float>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t wrong = 0, first = -1;
  for (size_t i = 0; i < got.size(); ++i)
    if (bits(got[i]) != bits(want[i])) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++wrong;
    }
  EXPECT_EQ(wrong, 0) << what << " differ in " << wrong << " of " << got.size() << ", first at " << first << ": GPU "
                      << (first >= 0 ? got[first] : 0.0f) << ", CPU " << (first >= 0 ? want[first] : 0.0f);
}

std::vector<float> floats_of(const HostTensor& t) {
  const std::vector<double> v = ref::to_vector(t.view);
  return std::vector<float>(v.begin(), v.end());
}

class Fp8OperandsCase : public ::testing::TestWithParam<OperandCase> {};

TEST_P(Fp8OperandsCase, CodesAndScalesAreTheCpuQuantisation) {
  const OperandCase& c = GetParam();
  ref::Rng rng(0x5eed0 + c.Sq * 7 + c.Sk);
  HostTensor q = values(c, c.Sq, rng), k = values(c, c.Sk, rng), v = values(c, c.Sk, rng);
  if (c.special == Special::QueryInfValueNan) {
    ref::set(q.view, {0, 0, c.Sq / 2, 5}, std::numeric_limits<double>::infinity());
    ref::set(v.view, {c.B - 1, c.H - 1, c.Sk - 1, 77}, std::numeric_limits<double>::quiet_NaN());
  } else if (c.special == Special::KeyInf) {  // head (0, 1)'s K scale is NaN; head (0, 0)'s is not
    ref::set(k.view, {0, 1, c.Sk / 3, 100}, -std::numeric_limits<double>::infinity());
  }
  const HostTensor qp = permutations(c, c.Sq, rng), kp = permutations(c, c.Sk, rng);
  const HostTensor qo = one_cluster(c, c.Sq), ko = one_cluster(c, c.Sk);
  HostTensor mask = poisoned(DType::U8, {c.B, c.H, 1, 1});
  ref::from_vector(mask.view, std::vector<double>(static_cast<size_t>(c.B * c.H), 1.0));
  const DeviceTensor dq = to_device(q), dk = to_device(k), dv = to_device(v), dqp = to_device(qp),
                     dkp = to_device(kp), dqo = to_device(qo), dko = to_device(ko), dmask = to_device(mask);
  const BlockLayout layout{dqo.view, dko.view, dmask.view};
  const RowPermutation perm = c.permuted ? RowPermutation{dqp.view, dkp.view} : RowPermutation{};
  Fp8Options options;
  options.smooth_k = c.smooth;
  options.k_tile = c.k_tile;
  ASSERT_TRUE(cuda::fused_operand_passes(options, kD, c.Sk));
  const float scale = 0.0883883f;
  const int64_t BH = c.B * c.H;
  const Buffer ws = device_workspace(
      block_sparse_attention_e4m3_workspace_bytes(BH, 1, 1, c.Sq, c.Sk, Device::cuda(0)));
  TestStream cs;
  if (!hopper()) {
    EXPECT_THROW(cuda::quantize_e4m3_operands(dq.view, dk.view, dv.view, layout, scale, options, cs.stream(),
                                              as_workspace(ws), perm),
                 UnsupportedError);
    return;
  }
  const ValueChecksOn checks;
  const cuda::E4m3Operands o =
      cuda::quantize_e4m3_operands(dq.view, dk.view, dv.view, layout, scale, options, cs.stream(), as_workspace(ws), perm);
  cs.sync();

  // The CPU's quantisation of the same rows.
  const TensorView none;
  HostTensor mean = poisoned(DType::F32, {c.B, c.H, kD});
  std::vector<double> k_values = ref::to_vector(k.view), mean_values(static_cast<size_t>(BH * kD), 0.0);
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int64_t d = 0; d < kD; ++d) {
      double sum = 0.0;
      for (int64_t r = 0; r < c.Sk; ++r) sum += k_values[static_cast<size_t>((bh * c.Sk + r) * kD + d)];
      mean_values[static_cast<size_t>(bh * kD + d)] = static_cast<float>(sum / static_cast<double>(c.Sk));
    }
  ref::from_vector(mean.view, mean_values);
  HostTensor qc = poisoned(DType::U8, {c.B, c.H, c.Sq, kD}), qs = poisoned(DType::F32, {c.B, c.H, c.Sq});
  HostTensor kc = poisoned(DType::U8, {c.B, c.H, c.Sk, kD}), ks = poisoned(DType::F32, {c.B, c.H, c.Sk});
  HostTensor vc = poisoned(DType::U8, {c.B, c.H, c.Sk, kD}), vs = poisoned(DType::F32, {c.B, c.H, kD});
  quantize_e4m3(q.view, c.permuted ? qp.view : none, none, none, Fp8Scale::Tile, 128, qc.view, qs.view, kCpu);
  quantize_e4m3(k.view, c.permuted ? kp.view : none, none, c.smooth ? mean.view : none, Fp8Scale::Tile, c.k_tile,
                kc.view, ks.view, kCpu);
  quantize_e4m3(v.view, c.permuted ? kp.view : none, none, none, Fp8Scale::Channel, 1, vc.view, vs.view, kCpu);

  expect_same_bytes(download_n(o.q_codes, BH * c.Sq * kD), qc.bytes(), "q codes");
  expect_same_floats(download_n(o.q_scale, BH * c.Sq), floats_of(qs), "q scales");
  expect_same_bytes(download_n(o.k_codes, BH * c.Sk * kD), kc.bytes(), "k codes");
  expect_same_floats(download_n(o.v_scale, BH * kD), floats_of(vs), "v scales");
  // K's scales in rows of v_keys; V's codes in 16-key slots, [b*h, v_keys / 16, d, 16], zeros past the last key.
  ASSERT_GE(o.v_keys, c.Sk);
  const std::vector<float> k_rows = download_n(o.k_scale, BH * o.v_keys), ks_cpu = floats_of(ks);
  std::vector<float> k_rows_used;
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int64_t r = 0; r < c.Sk; ++r) k_rows_used.push_back(k_rows[static_cast<size_t>(bh * o.v_keys + r)]);
  expect_same_floats(k_rows_used, ks_cpu, "k scales");
  const std::vector<uint8_t> vt = download_n(o.vt_codes, BH * kD * o.v_keys), vc_cpu = vc.bytes();
  std::vector<uint8_t> vt_as_rows(vc_cpu.size());
  int64_t nonzero_tail = 0;
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int64_t d = 0; d < kD; ++d)
      for (int64_t r = 0; r < o.v_keys; ++r) {
        const uint8_t code = vt[static_cast<size_t>((bh * o.v_keys + r / 16 * 16) * kD + 16 * d + r % 16)];
        if (r < c.Sk) {
          vt_as_rows[static_cast<size_t>((bh * c.Sk + r) * kD + d)] = code;
        } else if (code != 0) {
          ++nonzero_tail;
        }
      }
  expect_same_bytes(vt_as_rows, vc_cpu, "v codes (transposed)");
  EXPECT_EQ(nonzero_tail, 0) << "V^T codes past the last key";
  {
    // The generic transposed pass (the other granularities' V^T) writes the same slots, into a buffer
    // of e4m3 NaN codes: its last slot's rows past the last key must become zeros too.
    const Buffer generic = device_workspace(static_cast<size_t>(BH * kD * o.v_keys));
    const Buffer generic_scales = device_workspace(static_cast<size_t>(BH * kD) * sizeof(float));
    ASSERT_EQ(cudaMemset(generic.data(), 0x7f, generic.bytes()), cudaSuccess);
    cuda::quantize_e4m3_channel_transposed(dv.view, c.permuted ? dkp.view : none,
                                           static_cast<uint8_t*>(generic.data()), o.v_keys,
                                           static_cast<float*>(generic_scales.data()), cs.stream());
    cs.sync();
    expect_same_bytes(download_n(static_cast<const uint8_t*>(generic.data()), BH * kD * o.v_keys), vt,
                      "v codes (generic transposed pass)");
  }

  // The LSE term of each cluster-ordered query row: scale * q . mean.
  ASSERT_EQ(o.lse_shift != nullptr, c.smooth);
  if (!c.smooth || c.special == Special::KeyInf) return;  // (an infinite mean key: every LSE term non-finite)
  const std::vector<float> shift = download_n(o.lse_shift, BH * c.Sq);
  const std::vector<double> qv = ref::to_vector(q.view);
  const std::vector<int32_t> qperm = ref::to_i32(qp.view);
  double worst = 0.0;
  int64_t checked = 0;
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int64_t j = 0; j < c.Sq; ++j) {
      const int64_t row = c.permuted ? qperm[static_cast<size_t>(bh * c.Sq + j)] : j;
      double dot = 0.0, size = 0.0;
      for (int64_t d = 0; d < kD; ++d) {
        const double a = qv[static_cast<size_t>((bh * c.Sq + row) * kD + d)], m = mean_values[static_cast<size_t>(bh * kD + d)];
        dot += a * m;
        size += std::abs(a * m);
      }
      if (!std::isfinite(dot)) continue;  // the row holding the infinity
      const double err = std::abs(shift[static_cast<size_t>(bh * c.Sq + j)] - scale * dot) / (scale * size + 1e-30);
      worst = std::max(worst, err);
      ++checked;
    }
  EXPECT_LE(worst, 1e-6) << "LSE term, relative to scale * sum |q_d m_d|";
  EXPECT_GE(checked, BH * c.Sq - 1);
}

std::vector<OperandCase> operand_cases() {
  using L = ref::Layout;
  constexpr int kHead = Fp8Options::kHeadTile;
  return {
      {"bf16_permuted_B2", DType::BF16, L::Contiguous, 2, 2, 300, 333, kHead, true, true, Special::None},
      {"bf16_permuted_B2_k128", DType::BF16, L::Contiguous, 2, 2, 300, 333, 128, true, true, Special::None},
      {"f16_padded_strided", DType::F16, L::Padded, 1, 3, 129, 260, kHead, true, true, Special::None},
      {"f16_padded_strided_k128", DType::F16, L::Padded, 1, 3, 129, 260, 128, true, true, Special::None},
      {"bf16_bshd_plain_nosmooth", DType::BF16, L::Transposed, 1, 2, 256, 128, kHead, false, false, Special::None},
      {"bf16_nosmooth_k128", DType::BF16, L::Contiguous, 1, 2, 256, 1100, 128, true, false, Special::None},
      {"bf16_one_tile_special", DType::BF16, L::Contiguous, 1, 2, 100, 17, kHead, true, true,
       Special::QueryInfValueNan},
      {"bf16_key_inf_head", DType::BF16, L::Contiguous, 1, 2, 200, 500, kHead, true, true, Special::KeyInf},
      {"bf16_key_inf_nosmooth", DType::BF16, L::Contiguous, 1, 2, 200, 500, kHead, false, false, Special::KeyInf},
  };
}

INSTANTIATE_TEST_SUITE_P(Cases, Fp8OperandsCase, ::testing::ValuesIn(operand_cases()),
                         [](const auto& p) { return p.param.name; });

}  // namespace
}  // namespace sapattn::cuda_test
