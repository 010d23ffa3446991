// block_sparse_attention_e4m3 on CUDA (the Hopper e4m3 kernel, docs/fp8.md) against the CPU op, its
// reference, on the same inputs. Both quantise alike (the quantisation passes are the CPU's bit for
// bit), but the kernel packs a row's keys into tiles of 16-key slots where the reference packs them
// densely in chunks of 128, so P is quantised against other running maxima and a weight may take
// the neighbouring e4m3 code: the outputs differ by about one FP8 error, not by fp32 rounding. So
// per head: out within a relative L2 of 0.03 of the reference's (the FP8 error itself measures
// 0.005-0.015 on such inputs) and no more than 0.02 farther from the float64 native attention than
// the reference is (peaky rows, whose weights sit on few keys, are 0.08 away on both); lse within 0.03;
// every element written (outputs poisoned with NaN); rows that keep no key exactly 0 and -inf, as
// the reference. Cases: bf16 and f16, the default options and one change of each, both row
// permutations, B > 1, sizes that are not tile multiples. Then the errors: head dim 64, V not per
// channel, a short workspace.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "cuda_attention_support.hpp"
#include "sapattn/ops.hpp"

namespace sapattn::cuda_test {
namespace {

struct Fp8Case {
  SparseCase base;
  Fp8Options options;
};

inline void PrintTo(const Fp8Case& c, std::ostream* os) { *os << c.base.name; }

bool hopper() { return std::string(attention_kernel(Device::cuda(0), DType::BF16, 128).name) == "sm90a-wgmma"; }

size_t workspace_bytes(const HostProblem& h) {
  const TensorView& q = h.q.view;
  return block_sparse_attention_e4m3_workspace_bytes(q.shape[0] * q.shape[1], h.q_offsets.view.shape[2] - 1,
                                                     h.k_offsets.view.shape[2] - 1, q.shape[2], h.k.view.shape[2],
                                                     Device::cuda(0));
}

Outputs run_e4m3(const Inputs& in, const Fp8Options& o, const Outputs& poisoned, const Stream& stream,
                 Workspace workspace) {
  if (stream.device.type == DeviceType::CPU) {
    Outputs out{ref::make_tensor(poisoned.out.view.dtype, shape_of(poisoned.out.view)),
                ref::make_tensor(DType::F32, shape_of(poisoned.lse.view))};
    ref::poison(out.out);
    ref::poison(out.lse);
    block_sparse_attention_e4m3(in.q, in.k, in.v, in.layout, in.scale, o, out.out.view, out.lse.view, stream, {},
                                in.perm);
    return out;
  }
  const DeviceTensor out = to_device(poisoned.out), lse = to_device(poisoned.lse);
  block_sparse_attention_e4m3(in.q, in.k, in.v, in.layout, in.scale, o, out.view, lse.view, stream, workspace, in.perm);
  SAPATTN_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream.handle)));
  return {to_host(out, poisoned.out), to_host(lse, poisoned.lse)};
}

// Per (b,h): the relative L2 distance of a's rows from b's, and the largest lse difference; every
// value of `got` written, and rows the reference leaves empty (lse -inf) exactly as it does.
void compare(const Outputs& got, const Outputs& cpu, const std::vector<double>& native, int64_t B, int64_t H, int64_t S,
             int64_t D) {
  // (The reference's own distance from float64 is the yardstick of the kernel's.)
  const std::vector<double> g = ref::to_vector(got.out.view), c = ref::to_vector(cpu.out.view);
  const std::vector<double> gl = ref::to_vector(got.lse.view), cl = ref::to_vector(cpu.lse.view);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    double diff = 0, norm = 0, diff_native = 0, cpu_native = 0, norm_native = 0, lse_diff = 0;
    for (int64_t i = 0; i < S; ++i) {
      const int64_t row = bh * S + i;
      ASSERT_FALSE(std::isnan(gl[row])) << "lse of row " << row << " not written";
      if (std::isinf(cl[row])) {
        EXPECT_EQ(gl[row], cl[row]) << "row " << row << " keeps no key";
        for (int64_t d = 0; d < D; ++d) EXPECT_EQ(g[row * D + d], 0.0) << "row " << row << " keeps no key";
        continue;
      }
      lse_diff = std::max(lse_diff, std::abs(gl[row] - cl[row]));
      for (int64_t d = 0; d < D; ++d) {
        const double x = g[row * D + d];
        ASSERT_FALSE(std::isnan(x)) << "out of row " << row << ", column " << d << " not written";
        diff += (x - c[row * D + d]) * (x - c[row * D + d]);
        norm += c[row * D + d] * c[row * D + d];
        diff_native += (x - native[row * D + d]) * (x - native[row * D + d]);
        cpu_native += (c[row * D + d] - native[row * D + d]) * (c[row * D + d] - native[row * D + d]);
        norm_native += native[row * D + d] * native[row * D + d];
      }
    }
    if (norm == 0) continue;
    const double rel = std::sqrt(diff / norm), rel_native = std::sqrt(diff_native / norm_native);
    const double cpu_rel_native = std::sqrt(cpu_native / norm_native);
    std::printf("[ fp8 ] head %lld: rel L2 vs CPU e4m3 %.5f, vs float64 %.5f (CPU e4m3 %.5f), max |lse diff| %.5f\n",
                static_cast<long long>(bh), rel, rel_native, cpu_rel_native, lse_diff);
    EXPECT_LE(rel, 0.03) << "head " << bh;
    EXPECT_LE(rel_native, cpu_rel_native + 0.02) << "head " << bh;
    EXPECT_LE(lse_diff, 0.03) << "head " << bh;
  }
}

// One problem on both sides: the host inputs and their float64 attention, poisoned outputs, the
// device copy with its workspace and stream; cpu() and gpu() run the e4m3 op on either.
struct Fp8Problem {
  explicit Fp8Problem(const SparseCase& base)
      : c(base),
        h(make_sparse_problem(base)),
        e(expect(h, /*with_lse=*/true)),
        poisoned(poisoned_outputs(base.dtype, h.q.view, true)),
        d(to_device(h)),
        ws(device_workspace(workspace_bytes(h))) {}
  Outputs cpu(const Fp8Options& o) const { return run_e4m3(h.inputs(), o, poisoned, kCpu, {}); }
  Outputs gpu(const Fp8Options& o) { return run_e4m3(d.inputs(), o, poisoned, cs.stream(), as_workspace(ws)); }
  // Within the bounds of compare() of the CPU reference's output.
  void compare_with(const Outputs& got, const Outputs& cpu) const { compare(got, cpu, e.out, c.B, c.H, c.Sq, c.D); }

  SparseCase c;
  HostProblem h;
  Expected e;
  Outputs poisoned;
  DeviceProblem d;
  Buffer ws;
  TestStream cs;
};

class Fp8AttentionCase : public ::testing::TestWithParam<Fp8Case> {};

TEST_P(Fp8AttentionCase, MatchesCpuReference) {
  const Fp8Case& c = GetParam();
  Fp8Problem p(c.base);
  const Outputs cpu = p.cpu(c.options);
  if (!hopper()) {
    EXPECT_THROW(p.gpu(c.options), UnsupportedError);
    return;
  }
  const Outputs got = p.gpu(c.options);
  // The reference's rows are in token order where q_perm is given, as the kernel's.
  p.compare_with(got, cpu);
  // A second call on the same workspace: the same bits (no state left behind).
  EXPECT_TRUE(identical(got, p.gpu(c.options)));
}

std::vector<Fp8Case> fp8_cases() {
  SparseCase base;
  base.D = 128;
  base.Sq = 700;
  base.Sk = 900;
  base.Cq = 6;
  base.Ck = 24;
  base.keep = 0.4;
  std::vector<Fp8Case> cases;
  const auto add = [&](const std::string& name, SparseCase c, Fp8Options o) {
    c.name = name;
    cases.push_back({c, o});
  };
  Fp8Options defaults;
  add("bf16_defaults", base, defaults);
  SparseCase f16 = base;
  f16.dtype = DType::F16;
  add("f16_defaults", f16, defaults);
  Fp8Options sumf = defaults;
  sumf.p_sum_e4m3 = false;
  add("bf16_sumf", base, sumf);
  Fp8Options nosmooth = defaults;
  nosmooth.smooth_k = false;
  add("bf16_nosmooth", base, nosmooth);
  Fp8Options by_cluster = defaults;
  by_cluster.q_scale = by_cluster.k_scale = Fp8Scale::Cluster;
  add("bf16_per_cluster", base, by_cluster);
  Fp8Options tiles = defaults;
  tiles.q_tile = 64;
  tiles.k_tile = 176;
  tiles.p_scale = 16.0f;
  add("bf16_q64_k176_p16", base, tiles);
  Fp8Options per_tile_k = defaults;  // K scales per 128-row tile: the kernel's per-key scales, the f16 sums
  per_tile_k.k_tile = 128;
  add("bf16_k128", base, per_tile_k);
  Fp8Options khead_sumf = defaults;  // one K scale per head with the fp32 sum of P, permuted
  khead_sumf.p_sum_e4m3 = false;
  SparseCase sumf_permuted = base;
  sumf_permuted.q_perm = sumf_permuted.k_perm = true;
  add("bf16_khead_sumf_permuted", sumf_permuted, khead_sumf);
  SparseCase permuted = base;
  permuted.q_perm = permuted.k_perm = true;
  permuted.B = 2;
  add("bf16_permuted_B2", permuted, defaults);
  SparseCase spread = base;
  spread.sizes = Sizes::Spread;
  spread.Sq = 1500;
  spread.Sk = 1333;
  spread.Cq = 9;
  spread.Ck = 40;
  add("bf16_spread", spread, defaults);
  SparseCase zero = base;  // every query group's scale 0: uniform rows, not NaN
  zero.q_std = 0.0;
  add("bf16_zero_queries", zero, defaults);
  SparseCase all = base;
  all.mask = Mask::AllKept;
  all.q_std = 3.0;
  add("bf16_all_kept_peaky", all, defaults);
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Cases, Fp8AttentionCase, ::testing::ValuesIn(fp8_cases()),
                         [](const auto& p) { return p.param.base.name; });

// P V accumulated by the e4m3 MMA into O (Hopper's e4m3 MMA adds with fewer bits than fp32) within
// the reference's bounds on rows of many key tiles, where the shorter accumulator would show. (Each
// tile's P V in a fresh fp32 accumulator, the reference's arithmetic, was a measurement mode until
// run 20 timed it 1.21-1.25x slower within the same bounds; docs/fp8.md.)
TEST(Fp8AttentionAccumulate, LongRowsMatchCpuReference) {
  SparseCase c;
  c.name = "fp8_long_rows";
  c.D = 128;
  c.Sq = 600;
  c.Sk = 4000;
  c.Cq = 4;
  c.Ck = 40;
  c.mask = Mask::AllKept;
  Fp8Problem p(c);
  if (!hopper()) {
    EXPECT_THROW(p.gpu(Fp8Options{}), UnsupportedError);
    return;
  }
  Fp8Options head_sumf;  // the defaults' K scale with the fp32 sum of P
  head_sumf.p_sum_e4m3 = false;
  Fp8Options per_tile_k;  // K scales per 128-row tile, the f16 sums of the quantised P
  per_tile_k.k_tile = 128;
  for (const Fp8Options& o : {Fp8Options{}, head_sumf, per_tile_k}) p.compare_with(p.gpu(o), p.cpu(o));
}

// The measurement switches (attention_sm90_fp8.cu), with one K scale per head:
// SAPATTN_FP8_FMA_EXPS=1..4 (that many of every 8 column groups take 2^x from the FMA pipe's cubic
// instead of MUFU) and SAPATTN_FP8_KEY_TILE=160 (keys per tile) with the fp32 sum of P, and
// SAPATTN_FP8_ROW_SUM=mma (the sum of the quantised P from the P V MMA and V^T's rows of ones) with
// p_sum_e4m3. Each build within the same bounds of the CPU reference of its options, and each a
// different kernel from the default one of those options (so 128 keys with the MMA row sums and no
// FMA exponentials, that default itself, is not listed); other options with a switch, and a
// combination not built (1 FMA exponential per 8 with the MMA row sums): UnsupportedError.
TEST(Fp8AttentionMeasuredBuilds, MatchCpuReference) {
  SparseCase c;
  c.name = "fp8_measured";
  c.D = 128;
  c.Sq = 600;
  c.Sk = 2000;
  c.Cq = 4;
  c.Ck = 30;
  c.keep = 0.6;
  Fp8Options o;
  o.k_tile = Fp8Options::kHeadTile;
  o.p_sum_e4m3 = false;
  Fp8Options quantised_sum = o;
  quantised_sum.p_sum_e4m3 = true;
  Fp8Options per_tile_k;  // K scales per 128-row tile: no build takes them
  per_tile_k.k_tile = 128;
  Fp8Problem p(c);
  const Outputs cpu = p.cpu(o), cpu_quantised_sum = p.cpu(quantised_sum);
  if (!hopper()) {
    EXPECT_THROW(p.gpu(o), UnsupportedError);
    return;
  }
  const Outputs plain = p.gpu(o), plain_quantised_sum = p.gpu(quantised_sum);
  struct Unset {
    ~Unset() {
      unsetenv("SAPATTN_FP8_FMA_EXPS");
      unsetenv("SAPATTN_FP8_KEY_TILE");
      unsetenv("SAPATTN_FP8_ROW_SUM");
    }
  };
  struct Build {
    const char *tile, *fma, *sum;
  };
  const Build builds[] = {{"128", "1", "default"}, {"128", "2", "default"}, {"128", "3", "default"},
                          {"128", "4", "default"}, {"160", "0", "default"}, {"160", "1", "default"},
                          {"128", "2", "mma"},     {"128", "3", "mma"},
                          {"128", "4", "mma"},     {"160", "0", "mma"},     {"160", "2", "mma"},
                          {"160", "3", "mma"},     {"160", "4", "mma"}};
  for (const auto& [tile, fma, sum] : builds) {
    SCOPED_TRACE(std::string("SAPATTN_FP8_KEY_TILE=") + tile + " SAPATTN_FP8_FMA_EXPS=" + fma +
                 " SAPATTN_FP8_ROW_SUM=" + sum);
    const Unset unset;
    setenv("SAPATTN_FP8_KEY_TILE", tile, 1);
    setenv("SAPATTN_FP8_FMA_EXPS", fma, 1);
    setenv("SAPATTN_FP8_ROW_SUM", sum, 1);
    const bool mma = std::string(sum) == "mma";
    const Outputs got = p.gpu(mma ? quantised_sum : o);
    p.compare_with(got, mma ? cpu_quantised_sum : cpu);
    EXPECT_FALSE(identical(got, mma ? plain_quantised_sum : plain)) << "the switches changed nothing";
    EXPECT_THROW(p.gpu(per_tile_k), UnsupportedError);
    EXPECT_THROW(p.gpu(mma ? o : quantised_sum), UnsupportedError);
  }
  const Unset unset;
  setenv("SAPATTN_FP8_FMA_EXPS", "1", 1);
  setenv("SAPATTN_FP8_ROW_SUM", "mma", 1);
  EXPECT_THROW(p.gpu(quantised_sum), UnsupportedError);
}

// The kernel's limits: UnsupportedError naming them, before anything is written.
TEST(BlockSparseAttentionE4m3Errors, UnsupportedShapesAndOptions) {
  SparseCase c;
  c.name = "fp8_errors";
  c.Sq = 200;
  c.Sk = 300;
  c.D = 64;
  const HostProblem h64 = make_sparse_problem(c);
  const DeviceProblem d64 = to_device(h64);
  const Outputs poisoned = poisoned_outputs(c.dtype, h64.q.view, true);
  TestStream cs;
  const Buffer ws = device_workspace(workspace_bytes(h64));
  EXPECT_THROW(run_e4m3(d64.inputs(), Fp8Options{}, poisoned, cs.stream(), as_workspace(ws)), UnsupportedError);

  c.D = 128;
  const HostProblem h = make_sparse_problem(c);
  const DeviceProblem d = to_device(h);
  const Outputs poisoned128 = poisoned_outputs(c.dtype, h.q.view, true);
  const Buffer ws128 = device_workspace(workspace_bytes(h));
  Fp8Options per_tile;
  per_tile.v_scale = Fp8Scale::Tile;
  per_tile.p_sum_e4m3 = false;
  EXPECT_THROW(run_e4m3(d.inputs(), per_tile, poisoned128, cs.stream(), as_workspace(ws128)), UnsupportedError);
  if (!hopper()) return;
  const Workspace short_ws{ws128.data(), workspace_bytes(h) - 256};
  EXPECT_THROW(run_e4m3(d.inputs(), Fp8Options{}, poisoned128, cs.stream(), short_ws), WorkspaceError);
  EXPECT_THROW(run_e4m3(d.inputs(), Fp8Options{}, poisoned128, cs.stream(), Workspace{}), WorkspaceError);
}

}  // namespace
}  // namespace sapattn::cuda_test
