// What the GPU attention suites (test_cuda_attention_*.cpp, test_cuda_graph.cpp) share: attention
// problems on the host and their device copies, random block layouts, the references and the checks of
// the error model below, and the fixture that runs every case under each kernel.
//
// Every suite runs each case under the kernels: "auto" (chosen by architecture: sm90a-wgmma on an
// H100), "cpasync" and "tma" (the Hopper kernel with its two load paths) and "sm80" (the mma.sync
// kernel, forced through set_attention_kernel_override), and checks that attention_kernel names the
// kernel that ran. Outputs are poisoned with NaN before every call, so an element the op does not
// write fails.
//
// Error model. The kernels read 16-bit q, k, v and write a 16-bit out; scores, softmax and accumulation
// are fp32, and P is rounded to the input dtype for P V (FlashAttention's design). Element (b,h,i,d) of
// out may differ from the float64 reference r by
//   tol = tol_cpu + (1 + u) 2 [(u + ds_i) (A + |r|) + n f (vmax + |r|)],   tol_cpu = (1 + u) F + u |r| + z
// with
//   u     the unit roundoff of the dtype (2^-8 bf16, 2^-11 f16): P and the stored out are rounded to it;
//   F     2 max|naive fp32 - float64| + 4 eps32 max|r|: FA3's rule, twice the error of a naive fp32
//         attention of the same inputs (ref::attention_f32), for the fp32 sums and the division;
//   A     sum_j w_j |v_jd|, the attention of |v|. Rounding every p_j (relative error <= u) moves each
//         weight w_j by at most 2u relative, whether the row sum adds p or its rounding (the sm80 kernel
//         adds the rounded values), so out moves by sum_j dw_j (v_jd - r) <= 2u (A + |r|);
//   ds_i  (D + 4) 2^-23 scale |q_i| max_j |k_j| + 2^-21: a bound on the error of row i's scores (D fp32
//         additions in any order, rounding or truncating as tensor cores do: 1 ulp = 2^-23 each, plus
//         the scale and the exp2 argument; 2^-21 for ex2.approx's ~2^-22 relative error). It moves each
//         weight by at most 2 ds_i relative, like the rounding of p;
//   n f   f16 rounds a p below 2^-14 with an absolute error up to f = 2^-25 (subnormals), over n = Sk
//         keys, against a row sum >= 1 (the row maximum has p = 1 exactly); bf16 has fp32's range (f = 0);
//   z     half the f16 subnormal spacing, 2^-25, for the stored out (0 for bf16).
// The CPU op (no P rounding) is held to tol_cpu, the CPU suite's own bound, so GPU and CPU may differ by
// tol + tol_cpu. lse (fp32) may differ from the reference by LF + ds_i + u + n f + 2^-20 (1 + |r|), and
// from the CPU's by LF more: LF = 2 max|naive fp32 lse - float64| + 4 eps32 max|r|; u + n f bound the
// relative error of a row sum of rounded p; 2^-20 covers lg2.approx (~2^-22) and the roundings of
// max + log(sum) with a 4x margin. That makes ~4e-3 for bf16 and ~5e-4 for f16: FA-style 1e-3 rules
// hold only for kernels that sum the fp32 p. Rows that attend to no key: out exactly 0, lse exactly -inf.
#pragma once

#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <ostream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda_support.hpp"
#include "sapattn/ops.hpp"

namespace sapattn::cuda_test {

inline constexpr double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------------------------
// Problems: inputs on the host and their device copies
// ---------------------------------------------------------------------------------------------

// The inputs of one attention call, as views (host or device). A layout without a mask is dense attention.
struct Inputs {
  TensorView q, k, v;
  BlockLayout layout;
  RowPermutation perm;
  float scale = 0.0f;

  bool dense() const { return layout.mask.empty(); }
  void attend(TensorView out, TensorView lse, const Stream& stream, Workspace workspace = {}) const;
};

// The tensors of a problem, on the host (HostTensor) or the device (DeviceTensor). A tensor without
// storage is absent.
template <typename T>
struct Problem {
  T q, k, v;                     // [B,H,Sq,D], [B,H,Sk,D], [B,H,Sk,D]: token order where a permutation is given
  T q_offsets, k_offsets, mask;  // the block layout (absent: dense attention)
  T q_perm, k_perm;              // fused row permutations [B,H,Sq], [B,H,Sk]
  float scale = 0.0f;

  Inputs inputs() const {
    return {q.view, k.view, v.view, {q_offsets.view, k_offsets.view, mask.view}, {q_perm.view, k_perm.view}, scale};
  }
};
using HostProblem = Problem<HostTensor>;
using DeviceProblem = Problem<DeviceTensor>;

DeviceProblem to_device(const HostProblem& h);

// A device workspace of the size block_sparse_attention asks for (none for dense attention).
Buffer workspace_for(const Inputs& in);

// The outputs of one call: out [B,H,Sq,D] and lse [B,H,Sq] (absent when not requested).
struct Outputs {
  HostTensor out, lse;
};

// Contiguous outputs for the queries of q, poisoned: every element NaN.
Outputs poisoned_outputs(DType dtype, const TensorView& q, bool with_lse);

// Runs the op on the GPU into device copies of `outputs` and returns what it wrote.
Outputs run_gpu(const Inputs& in, const Outputs& outputs, const TestStream& cs, const Buffer& workspace);

// A [B,H,S,D] view with element strides `stride`, starting `offset` elements into fresh storage of
// `elements` elements, all NaN: what the view does not cover stays NaN.
HostTensor strided_view(DType dtype, const std::array<int64_t, 4>& shape, const std::array<int64_t, 4>& stride,
                        int64_t elements, int64_t offset);

// x's rows in cluster order (x itself without a permutation), by the CPU gather: an exact copy.
HostTensor cluster_order(const HostTensor& x, const HostTensor& perm);

// Outputs in cluster order scattered to token order by the CPU scatter (an exact copy).
Outputs token_order(const Outputs& o, const HostTensor& q_perm);

// ---------------------------------------------------------------------------------------------
// Random problems
// ---------------------------------------------------------------------------------------------

enum class Sizes {
  Random,  // ref::random_cluster_sizes: random cut points, an empty, a 1-token and (>= 200 tokens) a >128 cluster
  Unit,    // every cluster one token (the token count equals the cluster count)
  Gappy,   // every other cluster empty, the first and the last included
  Spread,  // video-like: log-normal sizes, a few clusters 3-5x the mean, many small ones
};

enum class Mask {
  Random,  // each block kept with probability `keep`; the smallest non-empty query cluster keeps nothing, the
           // next smallest exactly one non-empty key cluster
  AllKept,
  OneKeyClusterPerRow,
  NoneKept,
};

struct SparseCase {
  std::string name;
  int64_t B = 1, H = 2, Sq = 0, Sk = 0, D = 64, Cq = 8, Ck = 20;
  DType dtype = DType::BF16;
  Sizes sizes = Sizes::Random;
  Mask mask = Mask::Random;
  double keep = 0.35;
  double q_std = 1.0;  // q ~ N(0, q_std^2), k and v ~ N(0, 1): the scores have standard deviation q_std
  bool with_lse = true;
  bool q_perm = false;  // q, out and lse in token order, through a random permutation
  bool k_perm = false;  // k and v in token order
};

inline void PrintTo(const SparseCase& c, std::ostream* os) { *os << c.name; }

struct DenseCase {
  std::string name;
  int64_t B = 1, H = 2, Sq = 0, Sk = 0, D = 64;
  DType dtype = DType::BF16;
  bool with_lse = true;
};

inline void PrintTo(const DenseCase& c, std::ostream* os) { *os << c.name; }

// A case in both 16-bit dtypes: in `first` at head dim first_D and in the other dtype at the other head
// dim (64 <-> 128), so that two runs cover both dtypes and both head dims. Named
// <prefix>_<dtype>_D<head dim><suffix>, in that order.
template <typename Case>
std::vector<Case> in_both_dtypes(const std::string& prefix, DType first, int64_t first_D, Case c,
                                 const std::string& suffix = "") {
  const DType second = first == DType::BF16 ? DType::F16 : DType::BF16;
  const int64_t second_D = first_D == 64 ? 128 : 64;
  std::vector<Case> both;
  for (const auto& [dtype, D] : {std::pair{first, first_D}, {second, second_D}}) {
    c.dtype = dtype;
    c.D = D;
    c.name = prefix + "_" + std::string(dtype_name(dtype)) + "_D" + std::to_string(D) + suffix;
    both.push_back(c);
  }
  return both;
}

// Contiguous q ~ N(0, q_std^2) [B,H,Sq,D], k, v ~ N(0, 1) [B,H,Sk,D]; scale 1/sqrt(D).
HostProblem random_qkv(int64_t B, int64_t H, int64_t Sq, int64_t Sk, int64_t D, DType dtype, double q_std,
                       ref::Rng& rng);

// The case's problem; `draw` picks another draw of the same shapes.
HostProblem make_sparse_problem(const SparseCase& c, uint64_t draw = 0);

// ---------------------------------------------------------------------------------------------
// References and the checks of the error model
// ---------------------------------------------------------------------------------------------

// What a run is compared with (the terms of the error model at the top).
struct Expected {
  std::vector<double> out, lse;     // float64 reference in token order
  std::vector<double> abs_out;      // A: the attention of |v|
  std::vector<double> score_error;  // ds_i per query row, token order
  double out_fp32 = 0.0;            // F
  double lse_fp32 = 0.0;            // LF
  double p_floor = 0.0;             // n f
  double v_max = 0.0;
  Outputs cpu;  // the CPU op on the same inputs, with the GPU's output dtype
};

Expected expect(const HostProblem& p, bool with_lse);

// Checks a run's outputs against the float64 reference and the CPU op under the error model.
::testing::AssertionResult matches(const Outputs& got, const Expected& e);

// Whether two runs wrote bit-identical values (in any layouts), naming the first difference.
::testing::AssertionResult identical(const Outputs& a, const Outputs& b);

// A case's problem and references, kept for the next test: the runs of a case under the kernels
// are consecutive (the case is the outer parameter), and the references of the larger cases take
// seconds. One entry: a test prepares one case.
struct Prepared {
  std::string name;
  HostProblem problem;
  Expected expected;
};

const Prepared& prepare(const std::string& name, const std::function<HostProblem()>& make, bool with_lse);
const Prepared& prepare_sparse(const SparseCase& c);

// A sparse case on the GPU: its problem and references (prepare_sparse), the problem's device copy and
// workspace, and the op's first run into poisoned outputs.
struct SparseRun {
  explicit SparseRun(const SparseCase& c);

  const Prepared& prepared;
  TestStream cs;
  DeviceProblem device;
  Buffer workspace;
  Outputs poisoned;
  Outputs first;
};

// ---------------------------------------------------------------------------------------------
// The kernel choice
// ---------------------------------------------------------------------------------------------

bool is_sm90();

// A suite over (case, kernel): "auto" lets the architecture choose (on an H100 the Hopper kernel, with
// TMA loads in the dense mode), "cpasync" and "tma" are the Hopper kernel with its cp.async loads
// everywhere or with TMA loads wherever rows are not read through a permutation (SAPATTN_SM90_LOAD),
// "sm80" forces the mma.sync kernel.
template <typename Case>
class UnderKernel : public ::testing::TestWithParam<std::tuple<Case, const char*>> {
 protected:
  void SetUp() override {
    cuda::set_attention_kernel_override(forced() ? "sm80" : "");
    const char* kernel = std::get<1>(this->GetParam());
    if (std::strcmp(kernel, "cpasync") == 0 || std::strcmp(kernel, "tma") == 0) setenv("SAPATTN_SM90_LOAD", kernel, 1);
  }
  void TearDown() override {
    cuda::set_attention_kernel_override("");
    unsetenv("SAPATTN_SM90_LOAD");
  }
  const Case& test_case() const { return std::get<0>(this->GetParam()); }
  bool forced() const { return std::strcmp(std::get<1>(this->GetParam()), "sm80") == 0; }

  // Whether attention_kernel names the kernel this choice must run: sm90a-wgmma on an sm_90 GPU unless
  // forced, sm80-mma otherwise.
  ::testing::AssertionResult runs_expected_kernel(DType dtype, int64_t head_dim) const {
    const char* want = !forced() && is_sm90() ? "sm90a-wgmma" : "sm80-mma";
    const AttentionKernel k = attention_kernel(Device::cuda(0), dtype, head_dim);
    if (k.supported && std::strcmp(k.name, want) == 0) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "attention_kernel says '" << k.name << "' (" << k.reason << "), expected "
                                         << want;
  }
};

inline const auto kKernels = ::testing::Values("auto", "cpasync", "tma", "sm80");

template <typename Case>
std::string case_and_kernel(const ::testing::TestParamInfo<std::tuple<Case, const char*>>& info) {
  return std::get<0>(info.param).name + "_" + std::get<1>(info.param);
}

}  // namespace sapattn::cuda_test
