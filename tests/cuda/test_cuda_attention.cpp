// The CUDA attention ops (block_sparse_attention, dense_attention) against the CPU op on the same
// inputs and against the float64 reference with the block mask expanded to tokens (tests/reference.hpp).
// Every suite runs each case under both kernels: "auto" (chosen by architecture: sm90a-wgmma on an
// H100) and "sm80" (the mma.sync kernel, forced through set_attention_kernel_override), and checks that
// attention_kernel names the kernel that ran. Outputs are poisoned with NaN before every call, so an
// element the op does not write fails.
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
//
// Tests whose name contains "Large" take realistic sizes; the sanitizer runs skip them.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <ostream>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "core/cuda_check.hpp"
#include "cuda/backend.hpp"
#include "cuda_support.hpp"
#include "reference.hpp"
#include "sapattn/ops.hpp"
#include "sapattn/svg2.hpp"
#include "test_support.hpp"

namespace {

using namespace sapattn;
using CudaStream = cuda_test::TestStream;  // blocking: the synchronous copies are ordered with it
using cuda_test::ValueChecksOn;
using ref::HostTensor;

constexpr double kInf = std::numeric_limits<double>::infinity();

// The CPU backend gives bit-identical results for any thread count: the references take them all.
const Stream kCpu = Stream::cpu(0);

std::vector<int64_t> shape_of(const TensorView& v) { return {v.shape.begin(), v.shape.begin() + v.rank}; }

// ---------------------------------------------------------------------------------------------
// Device memory and streams
// ---------------------------------------------------------------------------------------------

// A device copy of a host tensor's whole storage; the view keeps the host view's strides and offset.
struct DeviceTensor {
  Buffer buffer;
  TensorView view;
};

void upload(const HostTensor& h, const DeviceTensor& d) {
  if (h.storage.data() == nullptr) return;
  SAPATTN_CUDA_CHECK(cudaMemcpy(d.buffer.data(), h.storage.data(), h.storage.bytes(), cudaMemcpyHostToDevice));
}

DeviceTensor to_device(const HostTensor& h) {
  DeviceTensor d;
  if (h.storage.data() == nullptr) return d;  // no tensor: an omitted lse or permutation
  d.buffer = Buffer::allocate(h.storage.bytes(), Device::cuda(0));
  upload(h, d);
  d.view = h.view;
  d.view.data = static_cast<char*>(d.buffer.data()) +
                (static_cast<const char*>(h.view.data) - static_cast<const char*>(h.storage.data()));
  d.view.device = Device::cuda(0);
  return d;
}

// The device storage copied back, laid out as `like` (the host tensor the device one was made from).
HostTensor to_host(const DeviceTensor& d, const HostTensor& like) {
  HostTensor h;
  if (d.buffer.data() == nullptr) return h;
  h.storage = Tensor(like.storage.dtype(), like.storage.shape());
  SAPATTN_CUDA_CHECK(cudaMemcpy(h.storage.data(), d.buffer.data(), h.storage.bytes(), cudaMemcpyDeviceToHost));
  h.view = like.view;
  h.view.data = static_cast<char*>(h.storage.data()) +
                (static_cast<const char*>(like.view.data) - static_cast<const char*>(like.storage.data()));
  return h;
}

std::vector<uint8_t> device_bytes(const DeviceTensor& d) {
  std::vector<uint8_t> bytes(d.buffer.bytes());
  SAPATTN_CUDA_CHECK(cudaMemcpy(bytes.data(), d.buffer.data(), bytes.size(), cudaMemcpyDeviceToHost));
  return bytes;
}

Workspace as_workspace(const Buffer& b) { return {b.data(), b.bytes()}; }

// A captured CUDA graph and its executable.
class CapturedGraph {
 public:
  // Captures what `record` launches on `stream`.
  CapturedGraph(cudaStream_t stream, const std::function<void()>& record) {
    SAPATTN_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    try {
      record();
    } catch (...) {
      (void)cudaStreamEndCapture(stream, &graph_);  // leave capture mode before reporting
      if (graph_ != nullptr) (void)cudaGraphDestroy(graph_);
      throw;
    }
    SAPATTN_CUDA_CHECK(cudaStreamEndCapture(stream, &graph_));
    const cudaError_t e = cudaGraphInstantiate(&exec_, graph_, 0);
    if (e != cudaSuccess) (void)cudaGraphDestroy(graph_);
    SAPATTN_CUDA_CHECK(e);
  }
  ~CapturedGraph() {
    (void)cudaGraphExecDestroy(exec_);
    (void)cudaGraphDestroy(graph_);
  }
  CapturedGraph(const CapturedGraph&) = delete;
  CapturedGraph& operator=(const CapturedGraph&) = delete;
  void launch(cudaStream_t stream) const { SAPATTN_CUDA_CHECK(cudaGraphLaunch(exec_, stream)); }

 private:
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

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
  void attend(TensorView out, TensorView lse, const Stream& stream, Workspace workspace = {}) const {
    if (dense()) {
      dense_attention(q, k, v, scale, out, lse, stream);
    } else {
      block_sparse_attention(q, k, v, layout, scale, out, lse, stream, workspace, perm);
    }
  }
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

DeviceProblem to_device(const HostProblem& h) {
  return {to_device(h.q),         to_device(h.k),         to_device(h.v),
          to_device(h.q_offsets), to_device(h.k_offsets), to_device(h.mask),
          to_device(h.q_perm),    to_device(h.k_perm),    h.scale};
}

// A device workspace of the size block_sparse_attention asks for (none for dense attention).
Buffer workspace_for(const Inputs& in) {
  if (in.dense()) return {};
  return Buffer::allocate(
      block_sparse_attention_workspace_bytes(in.q.shape[0] * in.q.shape[1], in.layout.q_offsets.shape[2] - 1,
                                             in.layout.k_offsets.shape[2] - 1, in.q.shape[2], Device::cuda(0)),
      Device::cuda(0));
}

// The outputs of one call: out [B,H,Sq,D] and lse [B,H,Sq] (absent when not requested).
struct Outputs {
  HostTensor out, lse;
};

// Contiguous outputs for the queries of q, poisoned: every element NaN.
Outputs poisoned_outputs(DType dtype, const TensorView& q, bool with_lse) {
  Outputs o{ref::make_tensor(dtype, shape_of(q)),
            with_lse ? ref::make_tensor(DType::F32, {q.shape[0], q.shape[1], q.shape[2]}) : HostTensor{}};
  ref::poison(o.out);
  ref::poison(o.lse);
  return o;
}

// Runs the op on the GPU into device copies of `outputs` and returns what it wrote.
Outputs run_gpu(const Inputs& in, const Outputs& outputs, const CudaStream& cs, const Buffer& workspace) {
  const DeviceTensor out = to_device(outputs.out), lse = to_device(outputs.lse);
  in.attend(out.view, lse.view, cs.stream(), as_workspace(workspace));
  cs.sync();
  return {to_host(out, outputs.out), to_host(lse, outputs.lse)};
}

// A [B,H,S,D] view with element strides `stride`, starting `offset` elements into fresh storage of
// `elements` elements, all NaN: what the view does not cover stays NaN.
HostTensor strided_view(DType dtype, const std::array<int64_t, 4>& shape, const std::array<int64_t, 4>& stride,
                        int64_t elements, int64_t offset) {
  HostTensor t;
  t.storage = Tensor(dtype, {elements});
  t.view =
      TensorView::contiguous(static_cast<char*>(t.storage.data()) + offset * static_cast<int64_t>(dtype_size(dtype)),
                             dtype, {shape[0], shape[1], shape[2], shape[3]});
  t.view.stride = stride;
  ref::poison(t);
  return t;
}

// x's values in slot `slot` (0: q, 1: k, 2: v) of a packed [B,S,3,H,D] buffer, the output of a fused qkv
// projection; the other slots hold NaN.
HostTensor packed_qkv_slot(const HostTensor& x, int64_t slot) {
  const int64_t B = x.view.shape[0], H = x.view.shape[1], S = x.view.shape[2], D = x.view.shape[3];
  HostTensor t =
      strided_view(x.view.dtype, {B, H, S, D}, {S * 3 * H * D, D, 3 * H * D, 1}, B * S * 3 * H * D, slot * H * D);
  ref::from_vector(t.view, ref::to_vector(x.view));
  return t;
}

// lse [B,H,S] seen as rows [B,H,S,1], for the row ops.
TensorView as_rows(TensorView lse) {
  lse.rank = 4;
  lse.shape[3] = 1;
  lse.stride[3] = 1;
  return lse;
}

// x's rows in cluster order (x itself without a permutation), by the CPU gather: an exact copy.
HostTensor cluster_order(const HostTensor& x, const HostTensor& perm) {
  if (perm.storage.data() == nullptr) return x;
  HostTensor y = ref::make_tensor(x.view.dtype, shape_of(x.view));
  gather_rows(x.view, perm.view, y.view, kCpu);
  return y;
}

// Outputs in cluster order scattered to token order by the CPU scatter (an exact copy).
Outputs token_order(const Outputs& o, const HostTensor& q_perm) {
  if (q_perm.storage.data() == nullptr) return o;
  Outputs t = poisoned_outputs(o.out.view.dtype, o.out.view, o.lse.storage.data() != nullptr);
  scatter_rows(o.out.view, q_perm.view, t.out.view, kCpu);
  if (!o.lse.view.empty()) scatter_rows(as_rows(o.lse.view), q_perm.view, as_rows(t.lse.view), kCpu);
  return t;
}

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
  const char* name;
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

void PrintTo(const SparseCase& c, std::ostream* os) { *os << c.name; }

std::vector<int64_t> cluster_sizes(Sizes kind, ref::Rng& rng, int64_t total, int64_t clusters) {
  switch (kind) {
    case Sizes::Unit:
      return std::vector<int64_t>(static_cast<size_t>(clusters), 1);
    case Sizes::Gappy: {
      const std::vector<int64_t> filled = ref::random_cluster_sizes(rng, total, clusters / 2);
      std::vector<int64_t> sizes(static_cast<size_t>(clusters), 0);
      for (size_t i = 0; i < filled.size(); ++i) sizes[2 * i + 1] = filled[i];
      return sizes;
    }
    case Sizes::Spread: {
      // Weights exp(0.8 N(0,1)): the largest of 16-54 clusters hold 3-5x the mean. Cluster 0 stays empty,
      // cluster 1 holds one token, cluster 2 also takes the rounding remainder.
      std::vector<double> weight(static_cast<size_t>(clusters), 0.0);
      double sum = 0.0;
      for (size_t c = 2; c < weight.size(); ++c) {
        weight[c] = std::exp(0.8 * rng.normal());
        sum += weight[c];
      }
      std::vector<int64_t> sizes(weight.size(), 0);
      sizes[1] = 1;
      int64_t left = total - 1;
      for (size_t c = 2; c < weight.size(); ++c) {
        sizes[c] = static_cast<int64_t>(static_cast<double>(total - 1) * weight[c] / sum);
        left -= sizes[c];
      }
      sizes[2] += left;
      return sizes;
    }
    case Sizes::Random:
      break;
  }
  return ref::random_cluster_sizes(rng, total, clusters);
}

// The [Cq,Ck] block mask of one (b,h) with these cluster sizes, row-major.
std::vector<double> block_mask(const SparseCase& c, const std::vector<int64_t>& q_sizes,
                               const std::vector<int64_t>& k_sizes, ref::Rng& rng) {
  std::vector<size_t> nonempty_q, nonempty_k;
  for (size_t a = 0; a < q_sizes.size(); ++a)
    if (q_sizes[a] > 0) nonempty_q.push_back(a);
  for (size_t b = 0; b < k_sizes.size(); ++b)
    if (k_sizes[b] > 0) nonempty_k.push_back(b);
  auto any_nonempty_k = [&] {
    return nonempty_k[static_cast<size_t>(rng.integer(0, static_cast<int64_t>(nonempty_k.size()) - 1))];
  };
  const size_t Ck = k_sizes.size();
  std::vector<double> m(q_sizes.size() * Ck, c.mask == Mask::AllKept ? 1.0 : 0.0);
  for (size_t a = 0; a < q_sizes.size(); ++a) {
    if (c.mask == Mask::Random) {
      for (size_t b = 0; b < Ck; ++b) m[a * Ck + b] = rng.uniform() < c.keep ? 1.0 : 0.0;
    } else if (c.mask == Mask::OneKeyClusterPerRow) {
      m[a * Ck + any_nonempty_k()] = 1.0;
    }
  }
  if (c.mask == Mask::Random && nonempty_q.size() >= 2) {
    // The two smallest non-empty query clusters (the large ones stay for the random blocks).
    std::stable_sort(nonempty_q.begin(), nonempty_q.end(), [&](size_t x, size_t y) { return q_sizes[x] < q_sizes[y]; });
    const size_t none = nonempty_q[0], one = nonempty_q[1];
    std::fill_n(m.begin() + static_cast<std::ptrdiff_t>(none * Ck), Ck, 0.0);
    std::fill_n(m.begin() + static_cast<std::ptrdiff_t>(one * Ck), Ck, 0.0);
    m[one * Ck + any_nonempty_k()] = 1.0;
  }
  return m;
}

// [B,H,S] i32: an independent random permutation of [0, S) per (b,h) (Fisher-Yates).
HostTensor random_permutations(int64_t B, int64_t H, int64_t S, ref::Rng& rng) {
  HostTensor t = ref::make_tensor(DType::I32, {B, H, S});
  std::vector<double> all;
  for (int64_t bh = 0; bh < B * H; ++bh) {
    std::vector<double> p(static_cast<size_t>(S));
    std::iota(p.begin(), p.end(), 0.0);
    for (int64_t i = S - 1; i > 0; --i) std::swap(p[static_cast<size_t>(i)], p[static_cast<size_t>(rng.integer(0, i))]);
    all.insert(all.end(), p.begin(), p.end());
  }
  ref::from_vector(t.view, all);
  return t;
}

// Contiguous q ~ N(0, q_std^2) [B,H,Sq,D], k, v ~ N(0, 1) [B,H,Sk,D]; scale 1/sqrt(D).
HostProblem random_qkv(int64_t B, int64_t H, int64_t Sq, int64_t Sk, int64_t D, DType dtype, double q_std,
                       ref::Rng& rng) {
  HostProblem p;
  p.q = ref::make_tensor(dtype, {B, H, Sq, D});
  p.k = ref::make_tensor(dtype, {B, H, Sk, D});
  p.v = ref::make_tensor(dtype, {B, H, Sk, D});
  ref::fill_normal(p.q.view, rng, 0.0, q_std);
  ref::fill_normal(p.k.view, rng);
  ref::fill_normal(p.v.view, rng);
  p.scale = 1.0f / std::sqrt(static_cast<float>(D));
  return p;
}

// The case's problem; `draw` picks another draw of the same shapes.
HostProblem make_sparse_problem(const SparseCase& c, uint64_t draw = 0) {
  ref::Rng rng(ref::test_seed(c.name, draw));
  HostProblem p = random_qkv(c.B, c.H, c.Sq, c.Sk, c.D, c.dtype, c.q_std, rng);
  std::vector<double> q_offsets, k_offsets, mask;
  for (int64_t bh = 0; bh < c.B * c.H; ++bh) {
    const std::vector<int64_t> qs = cluster_sizes(c.sizes, rng, c.Sq, c.Cq);
    const std::vector<int64_t> ks = cluster_sizes(c.sizes, rng, c.Sk, c.Ck);
    for (int64_t o : ref::offsets_of(qs)) q_offsets.push_back(static_cast<double>(o));
    for (int64_t o : ref::offsets_of(ks)) k_offsets.push_back(static_cast<double>(o));
    const std::vector<double> m = block_mask(c, qs, ks, rng);
    mask.insert(mask.end(), m.begin(), m.end());
  }
  p.q_offsets = ref::make_tensor(DType::I32, {c.B, c.H, c.Cq + 1});
  p.k_offsets = ref::make_tensor(DType::I32, {c.B, c.H, c.Ck + 1});
  p.mask = ref::make_tensor(DType::U8, {c.B, c.H, c.Cq, c.Ck});
  ref::from_vector(p.q_offsets.view, q_offsets);
  ref::from_vector(p.k_offsets.view, k_offsets);
  ref::from_vector(p.mask.view, mask);
  if (c.q_perm) p.q_perm = random_permutations(c.B, c.H, c.Sq, rng);
  if (c.k_perm) p.k_perm = random_permutations(c.B, c.H, c.Sk, rng);
  return p;
}

// ---------------------------------------------------------------------------------------------
// References and the checks of the error model
// ---------------------------------------------------------------------------------------------

double max_abs(const std::vector<double>& x) {
  double m = 0.0;
  for (double e : x)
    if (std::isfinite(e)) m = std::max(m, std::abs(e));
  return m;
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0.0;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::isfinite(a[i]) && std::isfinite(b[i])) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

// The unit roundoff u of a 16-bit dtype.
double roundoff(DType t) { return t == DType::F16 ? 0x1p-11 : 0x1p-8; }

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

// Rows of x ([B,H,S,W] row-major, cluster order) moved to token order: row j of (b,h) goes to perm[b,h,j].
std::vector<double> to_token_order(const std::vector<double>& x, const HostTensor& perm, int64_t W) {
  if (perm.storage.data() == nullptr) return x;
  const std::vector<int32_t> p = ref::to_i32(perm.view);
  const size_t S = static_cast<size_t>(perm.view.shape[2]), w = static_cast<size_t>(W);
  std::vector<double> y(x.size());
  for (size_t r = 0; r < p.size(); ++r)
    std::copy_n(x.begin() + static_cast<std::ptrdiff_t>(r * w), w,
                y.begin() + static_cast<std::ptrdiff_t>((r / S * S + static_cast<size_t>(p[r])) * w));
  return y;
}

// ds_i of every query row [B,H,Sq] (rows of q as given).
std::vector<double> score_error_bounds(const TensorView& q, const TensorView& k, double scale) {
  const int64_t BH = q.shape[0] * q.shape[1], Sq = q.shape[2], Sk = k.shape[2], D = q.shape[3];
  const std::vector<double> qv = ref::to_vector(q), kv = ref::to_vector(k);
  auto norm = [D](const double* x) {
    double s = 0.0;
    for (int64_t d = 0; d < D; ++d) s += x[d] * x[d];
    return std::sqrt(s);
  };
  std::vector<double> bound(static_cast<size_t>(BH * Sq));
  for (int64_t bh = 0; bh < BH; ++bh) {
    double k_max = 0.0;
    for (int64_t j = 0; j < Sk; ++j) k_max = std::max(k_max, norm(&kv[static_cast<size_t>((bh * Sk + j) * D)]));
    for (int64_t i = 0; i < Sq; ++i) {
      bound[static_cast<size_t>(bh * Sq + i)] =
          static_cast<double>(D + 4) * 0x1p-23 * scale * norm(&qv[static_cast<size_t>((bh * Sq + i) * D)]) * k_max +
          0x1p-21;
    }
  }
  return bound;
}

Expected expect(const HostProblem& p, bool with_lse) {
  const Inputs in = p.inputs();
  const TensorView& q = p.q.view;
  const int64_t Sq = q.shape[2], Sk = p.k.view.shape[2], D = q.shape[3];
  // The naive references read the inputs in cluster order, where the mask expands to tokens.
  const HostTensor qc = cluster_order(p.q, p.q_perm), kc = cluster_order(p.k, p.k_perm),
                   vc = cluster_order(p.v, p.k_perm);
  const std::vector<uint8_t> tokens = in.dense() ? std::vector<uint8_t>{} : ref::expand_block_mask(in.layout, Sq, Sk);
  const std::vector<uint8_t>* token_mask = in.dense() ? nullptr : &tokens;
  const ref::Attention want = ref::attention_f64(qc.view, kc.view, vc.view, p.scale, token_mask);
  const ref::Attention low = ref::attention_f32(qc.view, kc.view, vc.view, p.scale, token_mask);
  Expected e;
  e.out = to_token_order(want.out, p.q_perm, D);
  e.lse = to_token_order(want.lse, p.q_perm, 1);
  e.out_fp32 = 2.0 * max_abs_diff(low.out, want.out) + 4.0 * ref::kF32Eps * max_abs(want.out);
  e.lse_fp32 = 2.0 * max_abs_diff(low.lse, want.lse) + 4.0 * ref::kF32Eps * max_abs(want.lse);
  // A from the CPU op on |v| (exact in the same dtype); its fp32 error is immaterial to a tolerance.
  std::vector<double> abs_v = ref::to_vector(p.v.view);
  for (double& x : abs_v) x = std::abs(x);
  e.v_max = max_abs(abs_v);
  const HostTensor abs_v_tensor = ref::make_tensor(p.v.view.dtype, shape_of(p.v.view));
  ref::from_vector(abs_v_tensor.view, abs_v);
  Inputs abs_in = in;
  abs_in.v = abs_v_tensor.view;
  const Outputs a = poisoned_outputs(DType::F32, q, false);
  abs_in.attend(a.out.view, TensorView{}, kCpu);
  e.abs_out = ref::to_vector(a.out.view);
  e.score_error = score_error_bounds(q, p.k.view, p.scale);
  e.p_floor = (q.dtype == DType::F16 ? 0x1p-25 : 0.0) * static_cast<double>(Sk);
  e.cpu = poisoned_outputs(q.dtype, q, with_lse);
  in.attend(e.cpu.out.view, e.cpu.lse.view, kCpu);
  return e;
}

// "b=0 h=1 s=17": query row `row` of [B,H,S,...] outputs like `out`.
std::string row_name(size_t row, const TensorView& out) {
  const size_t S = static_cast<size_t>(out.shape[2]), H = static_cast<size_t>(out.shape[1]);
  return "b=" + std::to_string(row / S / H) + " h=" + std::to_string(row / S % H) + " s=" + std::to_string(row % S);
}

// Checks a run's outputs against the float64 reference and the CPU op under the error model.
::testing::AssertionResult matches(const Outputs& got, const Expected& e) {
  const TensorView& o = got.out.view;
  const double u = roundoff(o.dtype), z = o.dtype == DType::F16 ? 0x1p-25 : 0.0;
  const std::vector<double> out = ref::to_vector(o), cpu = ref::to_vector(e.cpu.out.view);
  const size_t D = static_cast<size_t>(o.shape[3]);
  for (size_t i = 0; i < out.size(); ++i) {
    const size_t row = i / D;
    const double r = e.out[i], x = out[i];
    const double cpu_tol = (1 + u) * e.out_fp32 + u * std::abs(r) + z;
    const double tol =
        cpu_tol +
        (1 + u) * 2 * ((u + e.score_error[row]) * (e.abs_out[i] + std::abs(r)) + e.p_floor * (e.v_max + std::abs(r)));
    // A row that attends to no key must be exactly 0; NaN fails every comparison.
    if (e.lse[row] == -kInf ? x != 0.0 : !(std::abs(x - r) <= tol && std::abs(x - cpu[i]) <= tol + cpu_tol)) {
      return ::testing::AssertionFailure()
             << "out " << row_name(row, o) << " d=" << i % D << ": " << x << " vs float64 " << r << " and CPU "
             << cpu[i] << (e.lse[row] == -kInf ? " (the row attends to no key)" : "") << "; tolerance " << tol
             << ", CPU's " << cpu_tol;
    }
  }
  if (got.lse.storage.data() == nullptr) return ::testing::AssertionSuccess();
  const std::vector<double> lse = ref::to_vector(got.lse.view), cpu_lse = ref::to_vector(e.cpu.lse.view);
  for (size_t row = 0; row < lse.size(); ++row) {
    const double r = e.lse[row], x = lse[row];
    const double tol = e.lse_fp32 + e.score_error[row] + u + e.p_floor + 0x1p-20 * (1 + std::abs(r));
    if (r == -kInf ? x != -kInf : !(std::abs(x - r) <= tol && std::abs(x - cpu_lse[row]) <= tol + e.lse_fp32)) {
      return ::testing::AssertionFailure() << "lse " << row_name(row, o) << ": " << x << " vs float64 " << r
                                           << " and CPU " << cpu_lse[row] << "; tolerance " << tol;
    }
  }
  return ::testing::AssertionSuccess();
}

const void* element(const TensorView& v, const std::array<int64_t, kMaxRank>& idx) {
  return static_cast<const char*>(v.data) + v.offset(idx) * static_cast<int64_t>(dtype_size(v.dtype));
}

// Whether two runs wrote bit-identical values (in any layouts), naming the first difference.
::testing::AssertionResult identical(const Outputs& a, const Outputs& b) {
  for (const auto& [x, y, name] : {std::tuple{&a.out.view, &b.out.view, "out"}, {&a.lse.view, &b.lse.view, "lse"}}) {
    if (x->empty() != y->empty()) return ::testing::AssertionFailure() << name << " written by one run only";
    if (x->empty()) continue;
    const TensorView& xv = *x;
    const TensorView& yv = *y;
    int64_t flat = 0;  // for_each_index walks in row-major order
    std::string first;
    ref::for_each_index(xv, [&](const std::array<int64_t, kMaxRank>& idx) {
      if (first.empty() && std::memcmp(element(xv, idx), element(yv, idx), dtype_size(xv.dtype)) != 0)
        first = "at element " + std::to_string(flat) + ": " + std::to_string(ref::get(xv, idx)) + " vs " +
                std::to_string(ref::get(yv, idx));
      ++flat;
    });
    if (!first.empty()) return ::testing::AssertionFailure() << name << " differs " << first;
  }
  return ::testing::AssertionSuccess();
}

// A case's problem and references, kept for the next test: the runs of a case under the two kernels
// are consecutive (the case is the outer parameter), and the references of the larger cases take
// seconds. One entry: a test prepares one case.
struct Prepared {
  std::string name;
  HostProblem problem;
  Expected expected;
};

const Prepared& prepare(const std::string& name, const std::function<HostProblem()>& make, bool with_lse) {
  static Prepared last;
  if (last.name != name) {
    last.problem = make();
    last.expected = expect(last.problem, with_lse);
    last.name = name;
  }
  return last;
}

const Prepared& prepare_sparse(const SparseCase& c) {
  return prepare(
      std::string("sparse/") + c.name, [&c] { return make_sparse_problem(c); }, c.with_lse);
}

// ---------------------------------------------------------------------------------------------
// The kernel choice
// ---------------------------------------------------------------------------------------------

bool is_sm90() {
  int major = 0, minor = 0;
  SAPATTN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
  SAPATTN_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0));
  return major == 9 && minor == 0;
}

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

const auto kKernels = ::testing::Values("auto", "cpasync", "tma", "sm80");

template <typename Case>
std::string case_and_kernel(const ::testing::TestParamInfo<std::tuple<Case, const char*>>& info) {
  return std::string(std::get<0>(info.param).name) + "_" + std::get<1>(info.param);
}

// ---------------------------------------------------------------------------------------------
// Block-sparse attention: random layouts and edge cases
// ---------------------------------------------------------------------------------------------

const std::vector<SparseCase> kSparseCases = {
    {.name = "S1000_bf16_D128", .Sq = 1000, .Sk = 1000, .D = 128},
    {.name = "S1000_f16_D64", .Sq = 1000, .Sk = 1000, .dtype = DType::F16},
    {.name = "B2_S600_bf16_D64", .B = 2, .Sq = 600, .Sk = 600},
    {.name = "B2_S600_f16_D128", .B = 2, .Sq = 600, .Sk = 600, .D = 128, .dtype = DType::F16},
    {.name = "H40_S70_bf16_D64", .H = 40, .Sq = 70, .Sk = 70, .Cq = 4, .Ck = 6},
    {.name = "H40_S70_f16_D128", .H = 40, .Sq = 70, .Sk = 70, .D = 128, .Cq = 4, .Ck = 6, .dtype = DType::F16},
    {.name = "Sq700_Sk1300_bf16_D64", .Sq = 700, .Sk = 1300},
    {.name = "Sq700_Sk1300_f16_D128", .Sq = 700, .Sk = 1300, .D = 128, .dtype = DType::F16},
    {.name = "S333_bf16_D128_no_lse", .Sq = 333, .Sk = 333, .D = 128, .Cq = 5, .Ck = 7, .with_lse = false},
    {.name = "S333_f16_D64_no_lse", .Sq = 333, .Sk = 333, .Cq = 5, .Ck = 7, .dtype = DType::F16, .with_lse = false},
    // Scores of standard deviation 30: exp without the running maximum would overflow.
    {.name = "large_scores_bf16_D64", .Sq = 300, .Sk = 400, .Cq = 4, .Ck = 6, .keep = 0.6, .q_std = 30.0},
    {.name = "gappy_clusters_f16_D64",
     .Sq = 400,
     .Sk = 450,
     .Cq = 9,
     .Ck = 13,
     .dtype = DType::F16,
     .sizes = Sizes::Gappy},
    {.name = "gappy_clusters_bf16_D128", .Sq = 400, .Sk = 450, .D = 128, .Cq = 9, .Ck = 13, .sizes = Sizes::Gappy},
    {.name = "unit_clusters_f16_D64",
     .Sq = 40,
     .Sk = 45,
     .Cq = 40,
     .Ck = 45,
     .dtype = DType::F16,
     .sizes = Sizes::Unit},
    {.name = "unit_clusters_bf16_D128", .Sq = 40, .Sk = 45, .D = 128, .Cq = 40, .Ck = 45, .sizes = Sizes::Unit},
    // Four clusters over 1500 tokens: one holds more than a thousand, many 128-row tiles.
    {.name = "big_clusters_bf16_D64", .Sq = 1500, .Sk = 1500, .Cq = 4, .Ck = 4, .keep = 0.75},
    {.name = "big_clusters_f16_D128",
     .Sq = 1500,
     .Sk = 1500,
     .D = 128,
     .Cq = 4,
     .Ck = 4,
     .dtype = DType::F16,
     .keep = 0.75},
    {.name = "all_kept_bf16_D128", .Sq = 500, .Sk = 700, .D = 128, .Cq = 5, .Ck = 6, .mask = Mask::AllKept},
    {.name = "all_kept_f16_D64",
     .B = 2,
     .Sq = 300,
     .Sk = 200,
     .Cq = 4,
     .Ck = 5,
     .dtype = DType::F16,
     .mask = Mask::AllKept},
    {.name = "one_key_cluster_f16_D128",
     .B = 2,
     .Sq = 300,
     .Sk = 500,
     .D = 128,
     .Cq = 6,
     .Ck = 9,
     .dtype = DType::F16,
     .mask = Mask::OneKeyClusterPerRow},
    {.name = "one_key_cluster_bf16_D64",
     .B = 2,
     .Sq = 300,
     .Sk = 500,
     .Cq = 6,
     .Ck = 9,
     .mask = Mask::OneKeyClusterPerRow},
    {.name = "none_kept_bf16_D64", .Sq = 100, .Sk = 120, .Cq = 3, .Ck = 3, .mask = Mask::NoneKept},
    {.name = "none_kept_f16_D128",
     .Sq = 100,
     .Sk = 120,
     .D = 128,
     .Cq = 3,
     .Ck = 3,
     .dtype = DType::F16,
     .mask = Mask::NoneKept},
    {.name = "single_cluster_bf16_D64", .Sq = 300, .Sk = 257, .Cq = 1, .Ck = 1, .mask = Mask::AllKept},
    {.name = "single_cluster_f16_D128",
     .Sq = 300,
     .Sk = 257,
     .D = 128,
     .Cq = 1,
     .Ck = 1,
     .dtype = DType::F16,
     .mask = Mask::AllKept},
    // Wan-like layouts: 16 query and 54 key clusters of spread sizes, density ~0.2.
    {.name = "spread_sizes_f16_D64",
     .Sq = 2048,
     .Sk = 2048,
     .Cq = 16,
     .Ck = 54,
     .dtype = DType::F16,
     .sizes = Sizes::Spread,
     .keep = 0.2},
    {.name = "WanLarge_bf16_D128",
     .H = 4,
     .Sq = 4096,
     .Sk = 4096,
     .D = 128,
     .Cq = 16,
     .Ck = 54,
     .sizes = Sizes::Spread,
     .keep = 0.2},
};

class SparseAttention : public UnderKernel<SparseCase> {};

TEST_P(SparseAttention, MatchesCpuAndFloat64) {
  const SparseCase& c = test_case();
  ASSERT_TRUE(runs_expected_kernel(c.dtype, c.D));
  const Prepared& p = prepare_sparse(c);
  const CudaStream cs;
  const DeviceProblem d = to_device(p.problem);
  const Buffer ws = workspace_for(d.inputs());
  const Outputs poisoned = poisoned_outputs(c.dtype, p.problem.q.view, c.with_lse);
  const Outputs got = run_gpu(d.inputs(), poisoned, cs, ws);
  EXPECT_TRUE(matches(got, p.expected));
  EXPECT_TRUE(identical(run_gpu(d.inputs(), poisoned, cs, ws), got)) << "a second run differs";
  // The layout exercises what its kind promises.
  const auto empty_rows = std::count(p.expected.lse.begin(), p.expected.lse.end(), -kInf);
  if (c.mask == Mask::Random) {
    EXPECT_GT(empty_rows, 0) << "no query row without keys";
  } else if (c.mask == Mask::NoneKept) {
    EXPECT_EQ(empty_rows, c.B * c.H * c.Sq);
  } else {
    EXPECT_EQ(empty_rows, 0);
  }
  if (c.mask == Mask::AllKept) {
    // Every block kept: dense_attention computes the same attention.
    Inputs dense = d.inputs();
    dense.layout = {};
    EXPECT_TRUE(matches(run_gpu(dense, poisoned, cs, Buffer{}), p.expected)) << "dense_attention";
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, SparseAttention, ::testing::Combine(::testing::ValuesIn(kSparseCases), kKernels),
                         case_and_kernel<SparseCase>);

// ---------------------------------------------------------------------------------------------
// Fused permutations
// ---------------------------------------------------------------------------------------------

const std::vector<SparseCase> kPermCases = {
    {.name = "perm_q_bf16_D128", .Sq = 900, .Sk = 1100, .D = 128, .q_perm = true},
    {.name = "perm_k_f16_D64", .Sq = 900, .Sk = 1100, .dtype = DType::F16, .k_perm = true},
    {.name = "perm_qk_bf16_D64_no_lse",
     .B = 2,
     .Sq = 500,
     .Sk = 600,
     .with_lse = false,
     .q_perm = true,
     .k_perm = true},
    {.name = "perm_qk_unit_clusters_f16_D128",
     .Sq = 40,
     .Sk = 45,
     .D = 128,
     .Cq = 40,
     .Ck = 45,
     .dtype = DType::F16,
     .sizes = Sizes::Unit,
     .q_perm = true,
     .k_perm = true},
};

class FusedPermutation : public UnderKernel<SparseCase> {};

TEST_P(FusedPermutation, MatchesGatherAttendScatter) {
  const SparseCase& c = test_case();
  ASSERT_TRUE(runs_expected_kernel(c.dtype, c.D));
  const Prepared& p = prepare_sparse(c);
  const CudaStream cs;
  const DeviceProblem d = to_device(p.problem);
  const Buffer ws = workspace_for(d.inputs());
  const Outputs poisoned = poisoned_outputs(c.dtype, p.problem.q.view, c.with_lse);
  const Outputs fused = run_gpu(d.inputs(), poisoned, cs, ws);
  EXPECT_TRUE(matches(fused, p.expected));
  // Unfused: the inputs gathered into cluster order, the op without permutations, the outputs scattered
  // back. The fused kernel reads the same rows into the same tiles, so the results are bit-identical.
  // On the Hopper kernel rows read through a permutation take the cp.async loads, so the unfused call
  // takes them too: TMA loads ("tma") lay keys out in other tiles (one cluster per slot of rows), which
  // changes the order of the softmax sums (SparseAttention holds them to the reference).
  setenv("SAPATTN_SM90_LOAD", "cpasync", 1);  // TearDown unsets it
  HostProblem unfused = p.problem;
  unfused.q = cluster_order(p.problem.q, p.problem.q_perm);
  unfused.k = cluster_order(p.problem.k, p.problem.k_perm);
  unfused.v = cluster_order(p.problem.v, p.problem.k_perm);
  unfused.q_perm = unfused.k_perm = HostTensor{};
  const Outputs cluster_ordered = run_gpu(to_device(unfused).inputs(), poisoned, cs, ws);
  EXPECT_TRUE(identical(fused, token_order(cluster_ordered, p.problem.q_perm)));
}

INSTANTIATE_TEST_SUITE_P(Cases, FusedPermutation, ::testing::Combine(::testing::ValuesIn(kPermCases), kKernels),
                         case_and_kernel<SparseCase>);

// ---------------------------------------------------------------------------------------------
// Strided views
// ---------------------------------------------------------------------------------------------

const std::vector<SparseCase> kStridedCases = {
    {.name = "qkv_packed_bf16_D64", .B = 2, .H = 3, .Sq = 777, .Sk = 777, .Cq = 6, .Ck = 9},
    {.name = "qkv_packed_perm_f16_D128",
     .Sq = 500,
     .Sk = 500,
     .D = 128,
     .dtype = DType::F16,
     .q_perm = true,
     .k_perm = true},
};

class StridedViews : public UnderKernel<SparseCase> {};

TEST_P(StridedViews, MatchContiguous) {
  const SparseCase& c = test_case();
  ASSERT_TRUE(runs_expected_kernel(c.dtype, c.D));
  const Prepared& p = prepare_sparse(c);
  const int64_t B = c.B, H = c.H, S = c.Sq, D = c.D;
  HostProblem strided = p.problem;
  strided.q = packed_qkv_slot(p.problem.q, 0);
  strided.k = packed_qkv_slot(p.problem.k, 1);
  strided.v = packed_qkv_slot(p.problem.v, 2);
  // out in [B,S,H,D+8] memory (8 more elements keep the rows 16-byte aligned), lse in [B,S,H] memory.
  Outputs strided_outputs{
      strided_view(c.dtype, {B, H, S, D}, {S * H * (D + 8), D + 8, H * (D + 8), 1}, B * S * H * (D + 8), 0),
      c.with_lse ? ref::make_tensor(DType::F32, {B, H, S}, ref::Layout::Transposed) : HostTensor{}};
  ref::poison(strided_outputs.lse);
  const CudaStream cs;
  const DeviceProblem contiguous = to_device(p.problem);
  const Buffer ws = workspace_for(contiguous.inputs());
  const Outputs want = run_gpu(contiguous.inputs(), poisoned_outputs(c.dtype, p.problem.q.view, c.with_lse), cs, ws);
  EXPECT_TRUE(matches(want, p.expected));
  const Outputs got = run_gpu(to_device(strided).inputs(), strided_outputs, cs, ws);
  EXPECT_TRUE(identical(got, want));
  EXPECT_TRUE(got.out.outside_view_unchanged(strided_outputs.out.bytes())) << "written between out rows";
}

INSTANTIATE_TEST_SUITE_P(Cases, StridedViews, ::testing::Combine(::testing::ValuesIn(kStridedCases), kKernels),
                         case_and_kernel<SparseCase>);

// ---------------------------------------------------------------------------------------------
// CUDA graphs
// ---------------------------------------------------------------------------------------------

const std::vector<SparseCase> kGraphCases = {
    {.name = "graph_perm_bf16_D128", .Sq = 900, .Sk = 1100, .D = 128, .q_perm = true, .k_perm = true},
    {.name = "graph_f16_D64_no_lse", .Sq = 700, .Sk = 700, .dtype = DType::F16, .with_lse = false},
};

class AttentionGraph : public UnderKernel<SparseCase> {};

TEST_P(AttentionGraph, ReplaysMatchEagerRuns) {
  const SparseCase& c = test_case();
  ASSERT_TRUE(runs_expected_kernel(c.dtype, c.D));
  const HostProblem first = make_sparse_problem(c, 0), second = make_sparse_problem(c, 1);
  const CudaStream cs;
  const DeviceProblem d = to_device(first);
  const Buffer ws = workspace_for(d.inputs());
  const Outputs poisoned = poisoned_outputs(c.dtype, first.q.view, c.with_lse);
  const DeviceTensor out = to_device(poisoned.out), lse = to_device(poisoned.lse);
  // Poisons the outputs, runs `launch` and reads the outputs back.
  auto run = [&](const std::function<void()>& launch) {
    upload(poisoned.out, out);
    upload(poisoned.lse, lse);
    launch();
    cs.sync();
    return Outputs{to_host(out, poisoned.out), to_host(lse, poisoned.lse)};
  };
  const std::function<void()> eager = [&] { d.inputs().attend(out.view, lse.view, cs.stream(), as_workspace(ws)); };
  const Outputs first_eager = run(eager);
  // Planning included: the graph holds every launch of the op.
  const CapturedGraph graph(cs.handle(), eager);
  const std::function<void()> replay = [&] { graph.launch(cs.handle()); };
  for (int i = 0; i < 2; ++i) EXPECT_TRUE(identical(run(replay), first_eager)) << "replay " << i;
  // New values in the same buffers, the layout included: the replay plans again from them.
  for (const auto& [h, dev] : {std::pair{&second.q, &d.q},
                               {&second.k, &d.k},
                               {&second.v, &d.v},
                               {&second.q_offsets, &d.q_offsets},
                               {&second.k_offsets, &d.k_offsets},
                               {&second.mask, &d.mask},
                               {&second.q_perm, &d.q_perm},
                               {&second.k_perm, &d.k_perm}})
    upload(*h, *dev);
  const Outputs second_eager = run(eager);
  EXPECT_FALSE(identical(second_eager, first_eager)) << "the new inputs changed nothing";
  EXPECT_TRUE(matches(second_eager, expect(second, c.with_lse)));
  EXPECT_TRUE(identical(run(replay), second_eager));
}

INSTANTIATE_TEST_SUITE_P(Cases, AttentionGraph, ::testing::Combine(::testing::ValuesIn(kGraphCases), kKernels),
                         case_and_kernel<SparseCase>);

// ---------------------------------------------------------------------------------------------
// Dense attention
// ---------------------------------------------------------------------------------------------

struct DenseCase {
  const char* name;
  int64_t B = 1, H = 2, Sq = 0, Sk = 0, D = 64;
  DType dtype = DType::BF16;
  bool with_lse = true;
};

void PrintTo(const DenseCase& c, std::ostream* os) { *os << c.name; }

const std::vector<DenseCase> kDenseCases = {
    {.name = "S1000_bf16_D128", .Sq = 1000, .Sk = 1000, .D = 128},
    {.name = "S1000_f16_D64", .Sq = 1000, .Sk = 1000, .dtype = DType::F16},
    {.name = "B2_Sq300_Sk777_f16_D128_no_lse",
     .B = 2,
     .Sq = 300,
     .Sk = 777,
     .D = 128,
     .dtype = DType::F16,
     .with_lse = false},
    {.name = "H40_S65_bf16_D64", .H = 40, .Sq = 65, .Sk = 65},
};

class DenseAttentionCuda : public UnderKernel<DenseCase> {};

TEST_P(DenseAttentionCuda, MatchesCpuAndFloat64) {
  const DenseCase& c = test_case();
  ASSERT_TRUE(runs_expected_kernel(c.dtype, c.D));
  const Prepared& p = prepare(
      std::string("dense/") + c.name,
      [&c] {
        ref::Rng rng(ref::test_seed(c.name));
        return random_qkv(c.B, c.H, c.Sq, c.Sk, c.D, c.dtype, 1.0, rng);
      },
      c.with_lse);
  const CudaStream cs;
  const Outputs got =
      run_gpu(to_device(p.problem).inputs(), poisoned_outputs(c.dtype, p.problem.q.view, c.with_lse), cs, Buffer{});
  EXPECT_TRUE(matches(got, p.expected));
}

INSTANTIATE_TEST_SUITE_P(Cases, DenseAttentionCuda, ::testing::Combine(::testing::ValuesIn(kDenseCases), kKernels),
                         case_and_kernel<DenseCase>);

// One NaN in query 5 of head (0,0): its O row and LSE are NaN, as in the CPU backend and SDPA, and
// every other row is finite. The outputs start at zero (not poisoned), so a NaN was written.
class DenseNanRows : public UnderKernel<DenseCase> {};

TEST_P(DenseNanRows, NanQueryRowIsNan) {
  const DenseCase& c = test_case();
  ref::Rng rng(ref::test_seed(std::string("nan/") + c.name));
  HostProblem problem = random_qkv(c.B, c.H, c.Sq, c.Sk, c.D, c.dtype, 1.0, rng);
  ref::set(problem.q.view, {0, 0, 5, 7}, std::nan(""));
  const Outputs zeros{ref::make_tensor(c.dtype, shape_of(problem.q.view)),
                      ref::make_tensor(DType::F32, {c.B, c.H, c.Sq})};
  const CudaStream cs;
  const Outputs got = run_gpu(to_device(problem).inputs(), zeros, cs, Buffer{});
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t s = 0; s < c.Sq; ++s) {
        const bool nan_row = b == 0 && h == 0 && s == 5;
        ASSERT_EQ(std::isnan(ref::get(got.lse.view, {b, h, s})), nan_row) << "lse " << b << "," << h << "," << s;
        for (int64_t d = 0; d < c.D; ++d)
          ASSERT_EQ(std::isnan(ref::get(got.out.view, {b, h, s, d})), nan_row) << "out " << b << "," << h << "," << s;
      }
}

INSTANTIATE_TEST_SUITE_P(Cases, DenseNanRows, ::testing::Combine(::testing::ValuesIn(kDenseCases), kKernels),
                         case_and_kernel<DenseCase>);

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

const SparseCase kErrorCase{.name = "errors", .Sq = 96, .Sk = 80, .Cq = 4, .Ck = 5};

// A small valid problem on the GPU with poisoned outputs.
struct ErrorSetup {
  explicit ErrorSetup(const SparseCase& c = kErrorCase)
      : host(make_sparse_problem(c)),
        device(to_device(host)),
        workspace(workspace_for(device.inputs())),
        poisoned(poisoned_outputs(c.dtype, host.q.view, true)),
        out(to_device(poisoned.out)),
        lse(to_device(poisoned.lse)) {}
  void attend(const Inputs& in, Workspace ws) const { in.attend(out.view, lse.view, cs.stream(), ws); }

  HostProblem host;
  DeviceProblem device;
  Buffer workspace;
  Outputs poisoned;
  DeviceTensor out, lse;
  CudaStream cs;
};

// Whether `call` throws E with a message that mentions `mention`, leaving the outputs' bytes as they were
// (ops.hpp: outputs are untouched when an argument check fails).
template <typename E>
::testing::AssertionResult fails_with(const std::function<void()>& call, std::string_view mention,
                                      const std::vector<const DeviceTensor*>& outputs) {
  std::vector<std::vector<uint8_t>> before;
  for (const DeviceTensor* o : outputs) before.push_back(device_bytes(*o));
  try {
    call();
    return ::testing::AssertionFailure() << "no exception";
  } catch (const E& e) {
    if (std::string_view(e.what()).find(mention) == std::string_view::npos)
      return ::testing::AssertionFailure() << "the message does not mention '" << mention << "': " << e.what();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "another exception: " << e.what();
  }
  for (size_t i = 0; i < outputs.size(); ++i)
    if (device_bytes(*outputs[i]) != before[i]) return ::testing::AssertionFailure() << "output " << i << " written";
  return ::testing::AssertionSuccess();
}

TEST(AttentionCudaErrors, UnsupportedDTypesAndHeadDims) {
  const ErrorSetup s;
  for (const auto& [dtype, head_dim, mention] : {std::tuple{DType::F32, int64_t{64}, "bf16"},
                                                 {DType::BF16, int64_t{96}, "head dim"},
                                                 {DType::F16, int64_t{32}, "head dim"}}) {
    SCOPED_TRACE(std::string(dtype_name(dtype)) + " D=" + std::to_string(head_dim));
    const AttentionKernel k = attention_kernel(Device::cuda(0), dtype, head_dim);
    EXPECT_FALSE(k.supported);
    EXPECT_NE(std::string_view(k.reason).find(mention), std::string_view::npos) << k.reason;
    SparseCase c = kErrorCase;
    c.dtype = dtype;
    c.D = head_dim;
    const DeviceProblem d = to_device(make_sparse_problem(c));
    const Outputs poisoned = poisoned_outputs(dtype, d.q.view, true);
    const DeviceTensor out = to_device(poisoned.out), lse = to_device(poisoned.lse);
    Inputs dense = d.inputs();
    dense.layout = {};
    for (const Inputs& in : {d.inputs(), dense}) {
      EXPECT_TRUE(fails_with<UnsupportedError>(
          [&] { in.attend(out.view, lse.view, s.cs.stream(), as_workspace(s.workspace)); }, mention, {&out, &lse}))
          << (in.dense() ? "dense_attention" : "block_sparse_attention");
    }
  }
  for (DType dtype : {DType::BF16, DType::F16})
    for (int64_t head_dim : {64, 128}) EXPECT_TRUE(attention_kernel(Device::cuda(0), dtype, head_dim).supported);
}

TEST(AttentionCudaErrors, MixedDTypes) {
  const ErrorSetup s;
  HostTensor k16 = ref::make_tensor(DType::F16, shape_of(s.host.k.view));
  ref::from_vector(k16.view, ref::to_vector(s.host.k.view));
  const DeviceTensor dk16 = to_device(k16);
  Inputs mixed = s.device.inputs();
  mixed.k = dk16.view;
  EXPECT_TRUE(fails_with<DTypeError>([&] { s.attend(mixed, as_workspace(s.workspace)); }, "f16", {&s.out, &s.lse}));
  for (DType out_dtype : {DType::F32, DType::F16}) {
    const DeviceTensor out = to_device(poisoned_outputs(out_dtype, s.host.q.view, false).out);
    EXPECT_TRUE(fails_with<DTypeError>(
        [&] { s.device.inputs().attend(out.view, s.lse.view, s.cs.stream(), as_workspace(s.workspace)); },
        dtype_name(out_dtype), {&out, &s.lse}));
  }
}

enum class Misalignment { DStride2, OffsetByOneElement, RowStride8Bytes };

// x's values in a view the kernels cannot read with 16-byte row loads.
HostTensor misaligned(const HostTensor& x, Misalignment kind) {
  const int64_t B = x.view.shape[0], H = x.view.shape[1], S = x.view.shape[2], D = x.view.shape[3];
  const int64_t row = kind == Misalignment::DStride2 ? 2 * D : kind == Misalignment::RowStride8Bytes ? D + 4 : D;
  const int64_t offset = kind == Misalignment::OffsetByOneElement ? 1 : 0;
  HostTensor t =
      strided_view(x.view.dtype, {B, H, S, D}, {H * S * row, S * row, row, kind == Misalignment::DStride2 ? 2 : 1},
                   B * H * S * row + offset, offset);
  ref::from_vector(t.view, ref::to_vector(x.view));
  return t;
}

TEST(AttentionCudaErrors, MisalignedViews) {
  const ErrorSetup s;
  for (Misalignment kind : {Misalignment::DStride2, Misalignment::OffsetByOneElement, Misalignment::RowStride8Bytes}) {
    for (const std::string role : {"q", "k", "v", "out"}) {
      SCOPED_TRACE(role + " misalignment " + std::to_string(static_cast<int>(kind)));
      const HostTensor& like = role == "q"   ? s.host.q
                               : role == "k" ? s.host.k
                               : role == "v" ? s.host.v
                                             : s.poisoned.out;
      const DeviceTensor bad = to_device(misaligned(like, kind));
      Inputs in = s.device.inputs();
      TensorView out = s.out.view;
      (role == "q" ? in.q : role == "k" ? in.k : role == "v" ? in.v : out) = bad.view;
      EXPECT_TRUE(
          fails_with<UnsupportedError>([&] { in.attend(out, s.lse.view, s.cs.stream(), as_workspace(s.workspace)); },
                                       "aligned", {&s.out, &s.lse, &bad}));
    }
  }
}

TEST(AttentionCudaErrors, WorkspaceTooSmall) {
  const ErrorSetup s;
  const Inputs in = s.device.inputs();
  const size_t need = block_sparse_attention_workspace_bytes(in.q.shape[0] * in.q.shape[1], kErrorCase.Cq,
                                                             kErrorCase.Ck, in.q.shape[2], Device::cuda(0));
  ASSERT_GT(need, 0u);
  for (const Workspace ws : {Workspace{}, Workspace{s.workspace.data(), need - 1}})
    EXPECT_TRUE(fails_with<WorkspaceError>([&] { s.attend(in, ws); }, "workspace", {&s.out, &s.lse}));
  EXPECT_NO_THROW(s.attend(in, Workspace{s.workspace.data(), need}));
}

TEST(AttentionCudaErrors, BadValuesWithValueChecks) {
  const ValueChecksOn on;
  SparseCase c = kErrorCase;
  c.q_perm = c.k_perm = true;
  const ErrorSetup s(c);
  struct Bad {
    const char* what;
    HostTensor HostProblem::*tensor;
    std::array<int64_t, kMaxRank> index;
    double value;
  };
  const int64_t Sq = c.Sq, Sk = c.Sk, Ck = c.Ck;
  for (const Bad& bad :
       {Bad{"q_perm entry Sq", &HostProblem::q_perm, {0, 1, 5}, static_cast<double>(Sq)},
        Bad{"k_perm entry -1", &HostProblem::k_perm, {0, 0, 7}, -1.0},
        Bad{"q_offsets decrease", &HostProblem::q_offsets, {0, 1, 2}, -1.0},
        Bad{"k_offsets end past Sk", &HostProblem::k_offsets, {0, 0, Ck}, static_cast<double>(Sk + 5)},
        Bad{"k_offsets end before Sk", &HostProblem::k_offsets, {0, 1, Ck}, static_cast<double>(Sk - 1)}}) {
    SCOPED_TRACE(bad.what);
    HostProblem h = s.host;
    const HostTensor& good = s.host.*bad.tensor;
    h.*bad.tensor = ref::make_tensor(DType::I32, shape_of(good.view));
    ref::from_vector((h.*bad.tensor).view, ref::to_vector(good.view));
    ref::set((h.*bad.tensor).view, bad.index, bad.value);
    const DeviceProblem d = to_device(h);
    EXPECT_THROW(s.attend(d.inputs(), as_workspace(s.workspace)), InvalidArgumentError);
  }
  // The flag is cleared for the next call.
  EXPECT_NO_THROW(s.attend(s.device.inputs(), as_workspace(s.workspace)));
}

TEST(AttentionCudaErrors, UnknownKernelOverrideChangesNothing) {
  cuda::set_attention_kernel_override("sm80");
  EXPECT_THROW(cuda::set_attention_kernel_override("sm70"), InvalidArgumentError);
  EXPECT_STREQ(attention_kernel(Device::cuda(0), DType::BF16, 128).name, "sm80-mma");
  cuda::set_attention_kernel_override("");
  EXPECT_STREQ(attention_kernel(Device::cuda(0), DType::BF16, 128).name, is_sm90() ? "sm90a-wgmma" : "sm80-mma");
}

// ---------------------------------------------------------------------------------------------
// The whole SVG2 layer call on the GPU (k-means, selection, planning, the fused kernel).
//   - top_p = 1 keeps every block, so whatever the clusters, out and lse must equal dense attention
//     on the GPU: P is rounded to 16 bits before P V in both (|dO| <= 2^-7 max|v| between two such
//     evaluations) plus the bf16 output rounding (2^-8 |o|); lse within 2^-8 (1 + |lse|).
//   - at top_p = 0.9, with and without text tokens (HunyuanVideo's rule), a fresh branch and a warm
//     start: two runs are bit-identical, sizes sum to the video tokens, the density is in (0, 1)
//     and the outputs are finite. The GPU's clusters are not compared with the CPU's here: the
//     tensor-core assignment may place a point whose two nearest centroids are within bf16
//     rounding differently (3 of 3,200 keys in this test), which moves whole key sets.
namespace svg2_gpu {

struct Svg2Run {
  Tensor out, lse, density, q_sizes, k_sizes;
};

Svg2Run run_svg2(const Tensor& q, const Tensor& k, const Tensor& v, const Config& config, BranchState& state,
                 const Stream& stream) {
  const Device dev = stream.device;
  const int64_t B = q.shape()[0], H = q.shape()[1], S = q.shape()[2], D = q.shape()[3];
  Svg2Run r{Tensor(q.dtype(), {B, H, S, D}, dev), Tensor(DType::F32, {B, H, S}, dev), Tensor(DType::F32, {B, H}, dev),
            Tensor(DType::I32, {B, H, config.q_clusters}, dev), Tensor(DType::I32, {B, H, config.k_clusters}, dev)};
  const Svg2Outputs outputs{r.out.view(), r.lse.view(), r.density.view(), r.q_sizes.view(), r.k_sizes.view()};
  try {
    svg2_attention(q.view(), k.view(), v.view(), config, state, outputs, stream);
  } catch (const Error& e) {  // name the failing call's place, not just its message
    ADD_FAILURE() << e.what() << " (" << e.file() << ":" << e.line() << ")";
    throw;
  }
  return r;
}

Tensor copy_to(const Tensor& t, Device dev) {
  Tensor c(t.dtype(), t.shape(), dev);
  const auto kind = dev.type == DeviceType::CUDA ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost;
  SAPATTN_CUDA_CHECK(cudaMemcpy(c.data(), t.data(), t.bytes(), kind));
  return c;
}

std::vector<double> host_values(const Tensor& device_tensor) {
  return ref::to_vector(copy_to(device_tensor, Device::cpu()).view());
}

struct Inputs3 {
  Tensor q, k, v;
  double max_v = 0.0;
};

Inputs3 clustered_inputs(int64_t B, int64_t H, int64_t S, int64_t D) {
  const uint32_t seed = static_cast<uint32_t>(testing_support::case_seed());
  Inputs3 in{testing_support::clustered_tensor(DType::BF16, B, H, S, D, 12, seed, 1.0f, 0.3f),
             testing_support::clustered_tensor(DType::BF16, B, H, S, D, 12, seed + 1, 1.0f, 0.3f),
             testing_support::random_tensor(DType::BF16, {B, H, S, D}, seed + 2)};
  for (double x : ref::to_vector(in.v.view())) in.max_v = std::max(in.max_v, std::abs(x));
  in.q = copy_to(in.q, Device::cuda(0));
  in.k = copy_to(in.k, Device::cuda(0));
  in.v = copy_to(in.v, Device::cuda(0));
  return in;
}

class Svg2OnGpu : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override { cuda::set_attention_kernel_override(std::string(GetParam()) == "sm80" ? "sm80" : ""); }
  void TearDown() override { cuda::set_attention_kernel_override(""); }
};

TEST_P(Svg2OnGpu, TopPOneEqualsDenseAttention) {
  const int64_t B = 2, H = 2, S = 1500, D = 64;
  const Inputs3 in = clustered_inputs(B, H, S, D);
  Config config;
  config.q_clusters = 10;
  config.k_clusters = 30;
  config.top_p = 1.0f;
  CudaStream cs;
  BranchState state;
  const Svg2Run sparse = run_svg2(in.q, in.k, in.v, config, state, cs.stream());
  Tensor out(DType::BF16, {B, H, S, D}, Device::cuda(0)), lse(DType::F32, {B, H, S}, Device::cuda(0));
  dense_attention(in.q.view(), in.k.view(), in.v.view(), config.scale_for(D), out.view(), lse.view(), cs.stream());
  cs.sync();
  for (double d : host_values(sparse.density)) EXPECT_EQ(d, 1.0);
  const std::vector<double> o = host_values(sparse.out), o_ref = host_values(out);
  for (size_t i = 0; i < o.size(); ++i)
    ASSERT_LE(std::abs(o[i] - o_ref[i]), 0x1p-7 * in.max_v + 0x1p-8 * std::abs(o_ref[i])) << "out element " << i;
  const std::vector<double> l = host_values(sparse.lse), l_ref = host_values(lse);
  for (size_t i = 0; i < l.size(); ++i)
    ASSERT_LE(std::abs(l[i] - l_ref[i]), 0x1p-8 * (1.0 + std::abs(l_ref[i]))) << "lse element " << i;
}

TEST_P(Svg2OnGpu, SparseCallsAreDeterministicAndWellFormed) {
  for (const int64_t text : {int64_t{0}, int64_t{48}}) {
    const int64_t B = 2, H = 2, S = 1600 + text, D = 64;
    const Inputs3 in = clustered_inputs(B, H, S, D);
    Config config;
    config.q_clusters = 10;
    config.k_clusters = 30;
    config.text_tokens = text;
    config.prompt_length = text / 2;
    CudaStream cs;
    BranchState first, second;
    for (int call = 0; call < 2; ++call) {  // a fresh branch, then a warm start
      SCOPED_TRACE("text tokens " + std::to_string(text) + ", call " + std::to_string(call));
      const Svg2Run a = run_svg2(in.q, in.k, in.v, config, first, cs.stream());
      const Svg2Run b = run_svg2(in.q, in.k, in.v, config, second, cs.stream());
      cs.sync();
      const std::vector<double> out = host_values(a.out);
      EXPECT_EQ(out, host_values(b.out));
      EXPECT_EQ(host_values(a.lse), host_values(b.lse));
      for (double x : out) ASSERT_TRUE(std::isfinite(x));
      for (double d : host_values(a.density)) EXPECT_TRUE(d > 0.0 && d < 1.0) << d;
      const std::vector<double> qs = host_values(a.q_sizes), ks = host_values(a.k_sizes);
      EXPECT_EQ(std::accumulate(qs.begin(), qs.end(), 0.0), static_cast<double>(B * H * (S - text)));
      EXPECT_EQ(std::accumulate(ks.begin(), ks.end(), 0.0), static_cast<double>(B * H * (S - text)));
    }
    EXPECT_EQ(first.calls, 2);
  }
}

INSTANTIATE_TEST_SUITE_P(Kernels, Svg2OnGpu, ::testing::Values("auto", "sm80"),
                         [](const auto& p) { return std::string(p.param); });

// Regression: a kernel's dynamic shared-memory ceiling was set once per size, so a smaller size
// after a larger one lowered it and the next larger launch failed (select_blocks sizes its shared
// memory by the centroid dimension).
TEST(DynamicSharedMemory, LargerAfterSmallerLaunches) {
  CudaStream cs;
  for (const int64_t D : {int64_t{128}, int64_t{8}, int64_t{128}}) {
    const int64_t B = 1, H = 1, Cq = 64, Ck = 100;
    const Tensor qc = copy_to(testing_support::random_tensor(DType::F32, {B, H, Cq, D}, 1), Device::cuda(0));
    const Tensor kc = copy_to(testing_support::random_tensor(DType::F32, {B, H, Ck, D}, 2), Device::cuda(0));
    Tensor sizes_host(DType::I32, {B, H, Ck});
    for (int64_t i = 0; i < Ck; ++i) static_cast<int32_t*>(sizes_host.data())[i] = 3;
    const Tensor sizes = copy_to(sizes_host, Device::cuda(0));
    Tensor mask(DType::U8, {B, H, Cq, Ck}, Device::cuda(0));
    EXPECT_NO_THROW(select_blocks(qc.view(), kc.view(), sizes.view(), 0.1f, 0.9f, 10, mask.view(), cs.stream()))
        << "D = " << D;
    cs.sync();
  }
}

}  // namespace svg2_gpu

}  // namespace
