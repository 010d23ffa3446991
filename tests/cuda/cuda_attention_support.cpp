// The GPU attention suites' problems, references and error-model checks (cuda_attention_support.hpp).
#include "cuda_attention_support.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <utility>

namespace sapattn::cuda_test {
namespace {

// lse [B,H,S] seen as rows [B,H,S,1], for the row ops.
TensorView as_rows(TensorView lse) {
  lse.rank = 4;
  lse.shape[3] = 1;
  lse.stride[3] = 1;
  return lse;
}

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

// The unit roundoff u of a 16-bit dtype.
double roundoff(DType t) { return t == DType::F16 ? 0x1p-11 : 0x1p-8; }

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

// "b=0 h=1 s=17": query row `row` of [B,H,S,...] outputs like `out`.
std::string row_name(size_t row, const TensorView& out) {
  const size_t S = static_cast<size_t>(out.shape[2]), H = static_cast<size_t>(out.shape[1]);
  return "b=" + std::to_string(row / S / H) + " h=" + std::to_string(row / S % H) + " s=" + std::to_string(row % S);
}

const void* element(const TensorView& v, const std::array<int64_t, kMaxRank>& idx) {
  return static_cast<const char*>(v.data) + v.offset(idx) * static_cast<int64_t>(dtype_size(v.dtype));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Problems
// ---------------------------------------------------------------------------------------------

void Inputs::attend(TensorView out, TensorView lse, const Stream& stream, Workspace workspace) const {
  if (dense()) {
    dense_attention(q, k, v, scale, out, lse, stream);
  } else {
    block_sparse_attention(q, k, v, layout, scale, out, lse, stream, workspace, perm);
  }
}

DeviceProblem to_device(const HostProblem& h) {
  return {to_device(h.q),         to_device(h.k),         to_device(h.v),
          to_device(h.q_offsets), to_device(h.k_offsets), to_device(h.mask),
          to_device(h.q_perm),    to_device(h.k_perm),    h.scale};
}

Buffer workspace_for(const Inputs& in) {
  if (in.dense()) return {};
  return Buffer::allocate(
      block_sparse_attention_workspace_bytes(in.q.shape[0] * in.q.shape[1], in.layout.q_offsets.shape[2] - 1,
                                             in.layout.k_offsets.shape[2] - 1, in.q.shape[2], Device::cuda(0)),
      Device::cuda(0));
}

Outputs poisoned_outputs(DType dtype, const TensorView& q, bool with_lse) {
  Outputs o{ref::make_tensor(dtype, shape_of(q)),
            with_lse ? ref::make_tensor(DType::F32, {q.shape[0], q.shape[1], q.shape[2]}) : HostTensor{}};
  ref::poison(o.out);
  ref::poison(o.lse);
  return o;
}

Outputs run_gpu(const Inputs& in, const Outputs& outputs, const TestStream& cs, const Buffer& workspace) {
  const DeviceTensor out = to_device(outputs.out), lse = to_device(outputs.lse);
  in.attend(out.view, lse.view, cs.stream(), as_workspace(workspace));
  cs.sync();
  return {to_host(out, outputs.out), to_host(lse, outputs.lse)};
}

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

HostTensor cluster_order(const HostTensor& x, const HostTensor& perm) {
  if (perm.storage.data() == nullptr) return x;
  HostTensor y = ref::make_tensor(x.view.dtype, shape_of(x.view));
  gather_rows(x.view, perm.view, y.view, kCpu);
  return y;
}

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

HostProblem make_sparse_problem(const SparseCase& c, uint64_t draw) {
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
  e.out_fp32 = 2.0 * ref::max_abs_diff(low.out, want.out) + 4.0 * ref::kF32Eps * ref::max_abs(want.out);
  e.lse_fp32 = 2.0 * ref::max_abs_diff(low.lse, want.lse) + 4.0 * ref::kF32Eps * ref::max_abs(want.lse);
  // A from the CPU op on |v| (exact in the same dtype); its fp32 error is immaterial to a tolerance.
  std::vector<double> abs_v = ref::to_vector(p.v.view);
  for (double& x : abs_v) x = std::abs(x);
  e.v_max = ref::max_abs(abs_v);
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
      "sparse/" + c.name, [&c] { return make_sparse_problem(c); }, c.with_lse);
}

SparseRun::SparseRun(const SparseCase& c)
    : prepared(prepare_sparse(c)),
      device(to_device(prepared.problem)),
      workspace(workspace_for(device.inputs())),
      poisoned(poisoned_outputs(c.dtype, prepared.problem.q.view, c.with_lse)),
      first(run_gpu(device.inputs(), poisoned, cs, workspace)) {}

// ---------------------------------------------------------------------------------------------
// The kernel choice
// ---------------------------------------------------------------------------------------------

bool is_sm90() {
  int major = 0, minor = 0;
  SAPATTN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
  SAPATTN_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0));
  return major == 9 && minor == 0;
}

}  // namespace sapattn::cuda_test
