// block_sparse_attention_e4m3 on CUDA (include/sapattn/ops.hpp, docs/fp8.md): the operands
// quantised in cluster order into the workspace, then the Hopper e4m3 kernel
// (attention/attention_sm90_fp8.cu) over the plan of the bf16 kernel.
//
// Per call: the operands quantised in cluster order, then the plan and the kernel. With Fp8Options'
// default granularities the quantisation is fp8_operands.cu's two passes over the inputs (K's mean
// and V's channel maxima, then every code through the permutations: the permutation pass the bf16
// path runs anyway). Other granularities take the generic passes here: the head's mean key (fp64
// sums, as the CPU's mean_row) and the LSE term scale * q_i . mean of every query row when K is
// smoothed; quantize_e4m3 of Q (through q_perm) and of K - mean (through k_perm), whose codes and
// scales are the CPU's bit for bit; V per channel with its codes transposed (the e4m3 P V GEMM reads
// V^T).
#include <algorithm>
#include <cstdint>
#include <string>

#include "core/carver.hpp"
#include "cuda/attention/attention.hpp"
#include "cuda/backend.hpp"
#include "cuda/fp8/fp8.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda {

namespace {

constexpr int kThreads = 128;
constexpr int kSumRows = 256;  // key rows per block of the mean's sums
constexpr int kHeadDim = 128;  // the e4m3 kernel's

// A tensor's strides, by value in a kernel's parameters.
struct Strides {
  int64_t s[4];
  explicit Strides(const TensorView& t) {
    for (int i = 0; i < 4; ++i) s[i] = t.stride[i];
  }
};

// The workspace of one call, in the order it is carved.
struct Fp8Scratch {
  Workspace plan;
  uint8_t *q_codes, *k_codes, *vt_codes;
  float *q_scale, *k_scale, *k_scale_rows, *v_scale, *v_inverse, *k_mean, *lse_shift;
  double* k_sum;
  uint32_t* k_extrema;
  float* k_head;
  int64_t v_keys;
};

Fp8Scratch carve(Carver& c, int64_t bh, int64_t cq, int64_t ck, int64_t sq, int64_t sk) {
  Fp8Scratch s{};
  const size_t plan_bytes = attn::plan_workspace_bytes(bh, cq, ck, sq);
  s.plan = {c.take_bytes(plan_bytes), plan_bytes};
  s.v_keys = std::max<int64_t>((sk + 15) / 16 * 16, 16);  // a multiple of 16 bytes: a tensor map's row stride
  s.q_codes = c.take<uint8_t>(bh * sq * kHeadDim);
  s.k_codes = c.take<uint8_t>((bh * sk + 16) * kHeadDim);  // 16 rows past the end: a slot may read them
  s.vt_codes = c.take<uint8_t>(bh * kHeadDim * s.v_keys);
  s.q_scale = c.take<float>(bh * sq);
  s.k_scale = c.take<float>(bh * sk);
  s.k_scale_rows = c.take<float>(bh * s.v_keys);  // rows of v_keys: a tensor map's row stride
  s.v_scale = c.take<float>(bh * kHeadDim);
  s.v_inverse = c.take<float>(bh * kHeadDim);
  s.k_mean = c.take<float>(bh * kHeadDim);
  s.lse_shift = c.take<float>(bh * sq);
  s.k_sum = c.take<double>(bh * kHeadDim);
  s.k_extrema = c.take<uint32_t>(3 * bh * kHeadDim);
  s.k_head = c.take<float>(2 * bh);
  return s;
}

// sum[bh, d] += the fp64 sum of column d over a block of kSumRows key rows (any order: a mean).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    key_sum_kernel(const T* k, int64_t H, int64_t S, int64_t D, const Strides st, double* sum) {
  const int64_t* stride = st.s;
  const int64_t bh = blockIdx.y, b = bh / H, h = bh % H;
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * kSumRows, hi = min_of<int64_t>(lo + kSumRows, S);
  const T* head = k + b * stride[0] + h * stride[1];
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    double acc = 0.0;
    for (int64_t r = lo; r < hi; ++r) acc += static_cast<double>(to_f32(head[r * stride[2] + d * stride[3]]));
    atomicAdd(&sum[bh * D + d], acc);
  }
}

__global__ void __launch_bounds__(kThreads) key_mean_kernel(const double* sum, int64_t n, int64_t S, float* mean) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < n) mean[i] = static_cast<float>(sum[i] / static_cast<double>(S));
}

// shift[bh, j] = scale * q_j . mean[bh] for cluster-ordered row j (q_perm[j] of q), the CPU's dot:
// eight fp32 partial sums over d mod 8, products and sums rounded one at a time, then added pairwise.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lse_shift_kernel(const T* q, int64_t H, int64_t S, int64_t D, const Strides st, const int32_t* q_perm,
                     const float* mean, float scale, float* shift) {
  const int64_t* stride = st.s;
  const int64_t bh = blockIdx.y, b = bh / H, h = bh % H;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= S) return;
  const int64_t row = q_perm != nullptr ? q_perm[bh * S + j] : j;
  if (row < 0 || row >= S) return;  // reported by the quantisation of Q, which reads the same entry
  const T* qi = q + b * stride[0] + h * stride[1] + row * stride[2];
  const float* m = mean + bh * D;
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
#pragma unroll
    for (int i = 0; i < 8; ++i) part[i] = __fadd_rn(part[i], __fmul_rn(to_f32(qi[(d + i) * stride[3]]), m[d + i]));
  for (; d < D; ++d) part[0] = __fadd_rn(part[0], __fmul_rn(to_f32(qi[d * stride[3]]), m[d]));
  const float dot = __fadd_rn(__fadd_rn(__fadd_rn(part[0], part[1]), __fadd_rn(part[2], part[3])),
                              __fadd_rn(__fadd_rn(part[4], part[5]), __fadd_rn(part[6], part[7])));
  shift[bh * S + j] = __fmul_rn(scale, dot);
}

}  // namespace

size_t block_sparse_attention_e4m3_workspace_bytes(int64_t batch_heads, int64_t q_clusters, int64_t k_clusters,
                                                   int64_t q_tokens, int64_t k_tokens) {
  Carver c("block_sparse_attention_e4m3");
  carve(c, batch_heads, q_clusters, k_clusters, q_tokens, k_tokens);
  return c.used();
}

namespace {

// What the e4m3 kernel takes (UnsupportedError otherwise), checked before anything runs (and before
// the device is selected: a machine without a GPU gets the same error).
void check_e4m3_kernel(const TensorView& q, const TensorView& k, const TensorView& v, const Fp8Options& options,
                       const Stream& stream) {
  const int device = stream.device.index;
  const AttentionKernel kernel = attention_kernel(device, q.dtype, q.shape[3]);
  SAPATTN_CHECK(kernel.supported && std::string(kernel.name) == "sm90a-wgmma", UnsupportedError,
                "block_sparse_attention_e4m3 on cuda:", device,
                " needs the Hopper (sm_90a) kernel, an H100 or H200 with f16 or bf16 inputs; ",
                kernel.supported ? "this GPU runs the sm80 kernel" : kernel.reason);
  SAPATTN_CHECK(q.shape[3] == kHeadDim, UnsupportedError, "block_sparse_attention_e4m3 on CUDA takes head dim ",
                kHeadDim, ", got ", q.describe());
  SAPATTN_CHECK(options.v_scale == Fp8Scale::Channel, UnsupportedError,
                "block_sparse_attention_e4m3 on CUDA quantises V per channel only (Fp8Options::v_scale = Channel, "
                "the default); per tile or cluster runs on the CPU");
  for (const auto& [t, name] : {std::pair{&k, "k"}, {&v, "v"}})
    SAPATTN_CHECK(t->dtype == q.dtype, DTypeError, "block_sparse_attention_e4m3 on CUDA takes q, k, v and out of one ",
                  "dtype; ", name, " is ", dtype_name(t->dtype), ", q is ", dtype_name(q.dtype));
}

// What the kernel writes: out in q's dtype, unit stride along D, rows of whole pairs.
void check_e4m3_output(const TensorView& out, DType dtype) {
  SAPATTN_CHECK(out.dtype == dtype, DTypeError, "block_sparse_attention_e4m3 on CUDA takes q, k, v and out of one ",
                "dtype; out is ", dtype_name(out.dtype), ", q is ", dtype_name(dtype));
  SAPATTN_CHECK(out.stride[3] == 1 && (out.stride[2] * static_cast<int64_t>(dtype_size(out.dtype))) % 4 == 0,
                UnsupportedError,
                "block_sparse_attention_e4m3 on CUDA writes out with unit stride along D and rows of whole pairs, got ",
                out.describe());
}

}  // namespace

E4m3Operands quantize_e4m3_operands(const TensorView& q, const TensorView& k, const TensorView& v,
                                    const BlockLayout& layout, float scale, const Fp8Options& options,
                                    const Stream& stream, Workspace workspace, const RowPermutation& perm) {
  check_e4m3_kernel(q, k, v, options, stream);
  const DeviceGuard guard(stream.device);
  const int64_t B = q.shape[0], H = q.shape[1], BH = B * H, Sq = q.shape[2], Sk = k.shape[2];
  const int64_t Cq = layout.q_offsets.shape[2] - 1, Ck = layout.k_offsets.shape[2] - 1;
  SAPATTN_CHECK((BH * Sk + 16) < (int64_t{1} << 31) && BH * Sq < (int64_t{1} << 31) && BH <= 65535, UnsupportedError,
                "block_sparse_attention_e4m3 on CUDA takes fewer than 2^31 rows over all heads and at most 65535 "
                "heads, got q ",
                q.describe(), ", k ", k.describe());
  Carver carver("block_sparse_attention_e4m3", workspace);
  const Fp8Scratch s = carve(carver, BH, Cq, Ck, Sq, Sk);
  carver.check();
  E4m3Operands o{};
  o.dtype = q.dtype;
  o.B = B;
  o.H = H;
  o.Sq = Sq;
  o.Sk = Sk;
  o.scale = scale;
  o.plan = s.plan;
  o.q_perm = perm.q_perm;
  o.q_codes = s.q_codes;
  o.k_codes = s.k_codes;
  o.vt_codes = s.vt_codes;
  o.q_scale = s.q_scale;
  o.k_scale = s.k_scale_rows;
  o.v_scale = s.v_scale;
  o.v_keys = s.v_keys;
  o.p_scale = options.p_scale;
  o.p_sum_e4m3 = options.p_sum_e4m3;
  o.one_key_scale = options.k_scale == Fp8Scale::Tile && options.k_tile >= Sk;
  const bool smooth = options.smooth_k && Sk > 0;
  o.lse_shift = smooth ? s.lse_shift : nullptr;
  if (BH == 0 || Sq == 0) return o;
  const cudaStream_t cs = stream_of(stream);

  if (fused_operand_passes(options, kHeadDim, Sk)) {
    Fp8OperandBuffers out;
    out.q_codes = s.q_codes;
    out.k_codes = s.k_codes;
    out.vt_codes = s.vt_codes;
    out.q_scale = s.q_scale;
    out.k_scale_rows = s.k_scale_rows;
    out.v_scale = s.v_scale;
    out.v_inverse = s.v_inverse;
    out.k_mean = s.k_mean;
    out.lse_shift = s.lse_shift;
    out.k_sum = s.k_sum;
    out.k_extrema = s.k_extrema;
    out.k_head = s.k_head;
    out.v_keys = s.v_keys;
    const bool checked = (!perm.q_perm.empty() || !perm.k_perm.empty()) && begin_value_check(stream);
    // One scale per head through the head pass only when asked for (a key tile other than 128 that
    // covers the head); a 128-row tile over a short head takes the tile pass, the same codes.
    const bool head_k = o.one_key_scale && options.k_tile != 128;
    quantize_operands_fused(q, k, v, perm, scale, smooth, head_k, out, stream);
    if (checked) end_value_check(stream, "block_sparse_attention_e4m3 (quantisation)");
    return o;
  }
  const TensorView mean = TensorView::contiguous(s.k_mean, DType::F32, {B, H, kHeadDim}, stream.device);
  if (smooth) {
    SAPATTN_CUDA_CHECK(cudaMemsetAsync(s.k_sum, 0, static_cast<size_t>(BH * kHeadDim) * sizeof(double), cs));
    dispatch_float(q.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      key_sum_kernel<T>
          <<<dim3(static_cast<unsigned>(ceil_div(Sk, kSumRows)), static_cast<unsigned>(BH)), kThreads, 0, cs>>>(
              static_cast<const T*>(k.data), H, Sk, kHeadDim, Strides(k), s.k_sum);
      SAPATTN_CUDA_CHECK_LAUNCH();
      const int64_t n = BH * kHeadDim;
      key_mean_kernel<<<static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0, cs>>>(s.k_sum, n, Sk, s.k_mean);
      SAPATTN_CUDA_CHECK_LAUNCH();
      const int32_t* q_perm = perm.q_perm.empty() ? nullptr : static_cast<const int32_t*>(perm.q_perm.data);
      lse_shift_kernel<T>
          <<<dim3(static_cast<unsigned>(ceil_div(Sq, kThreads)), static_cast<unsigned>(BH)), kThreads, 0, cs>>>(
              static_cast<const T*>(q.data), H, Sq, kHeadDim, Strides(q), q_perm, s.k_mean, scale, s.lse_shift);
      SAPATTN_CUDA_CHECK_LAUNCH();
    });
  }
  const TensorView none;
  quantize_e4m3(q, perm.q_perm, layout.q_offsets, none, options.q_scale, options.q_tile,
                TensorView::contiguous(s.q_codes, DType::U8, {B, H, Sq, kHeadDim}, stream.device),
                TensorView::contiguous(s.q_scale, DType::F32, {B, H, Sq}, stream.device), stream);
  quantize_e4m3(k, perm.k_perm, layout.k_offsets, smooth ? mean : none, options.k_scale, options.k_tile,
                TensorView::contiguous(s.k_codes, DType::U8, {B, H, Sk, kHeadDim}, stream.device),
                TensorView::contiguous(s.k_scale, DType::F32, {B, H, Sk}, stream.device), stream);
  quantize_e4m3_channel_transposed(v, perm.k_perm, s.vt_codes, s.v_keys, s.v_scale, stream);
  if (Sk > 0)
    SAPATTN_CUDA_CHECK(cudaMemcpy2DAsync(s.k_scale_rows, static_cast<size_t>(s.v_keys) * sizeof(float), s.k_scale,
                                         static_cast<size_t>(Sk) * sizeof(float),
                                         static_cast<size_t>(Sk) * sizeof(float), static_cast<size_t>(BH),
                                         cudaMemcpyDeviceToDevice, cs));
  return o;
}

void attend_e4m3(const E4m3Operands& o, const BlockLayout& layout, TensorView out, TensorView lse,
                 const Stream& stream) {
  const DeviceGuard guard(stream.device);
  check_e4m3_output(out, o.dtype);
  if (o.B * o.H == 0 || o.Sq == 0) return;
  const cudaStream_t cs = stream_of(stream);
  attn::Params p{};
  p.q = o.q_codes;
  p.k = o.k_codes;
  p.v = o.vt_codes;
  p.out = out.data;
  p.lse = lse.empty() ? nullptr : static_cast<float*>(lse.data);
  for (int d = 0; d < 3; ++d) {
    p.o_stride[d] = out.stride[d];
    p.lse_stride[d] = lse.empty() ? 0 : lse.stride[d];
  }
  p.batch = static_cast<int32_t>(o.B);
  p.heads = static_cast<int32_t>(o.H);
  p.seq_q = static_cast<int32_t>(o.Sq);
  p.seq_k = static_cast<int32_t>(o.Sk);
  p.head_dim = kHeadDim;
  p.q_perm = o.q_perm.empty() ? nullptr : static_cast<const int32_t*>(o.q_perm.data);
  p.scale = o.scale;
  p.num_sms = device_arch(stream.device.index).sms;
  p.flag = value_error_flag();
  attn::Fp8Params f;
  f.q_scale = o.q_scale;
  f.k_scale = o.k_scale;
  f.v_scale = o.v_scale;
  f.lse_shift = o.lse_shift;
  f.v_keys = static_cast<int32_t>(o.v_keys);
  f.p_scale = o.p_scale;
  f.p_sum_e4m3 = o.p_sum_e4m3;
  f.one_key_scale = o.one_key_scale;
  const bool checked = begin_value_check(stream);
  p.plan = attn::build_plan(layout, o.Sq, o.Sk, o.plan, cs);  // one key phase, kTileQ items
  attn::run_sm90_fp8(p, f, o.dtype == DType::BF16, cs);
  if (checked) end_value_check(stream, "block_sparse_attention_e4m3");
}

void block_sparse_attention_e4m3(const TensorView& q, const TensorView& k, const TensorView& v,
                                 const BlockLayout& layout, float scale, const Fp8Options& options, TensorView out,
                                 TensorView lse, const Stream& stream, Workspace workspace,
                                 const RowPermutation& perm) {
  // Both checks before the quantisation passes run, so that a bad call does no work.
  check_e4m3_kernel(q, k, v, options, stream);
  check_e4m3_output(out, q.dtype);
  const E4m3Operands o = quantize_e4m3_operands(q, k, v, layout, scale, options, stream, workspace, perm);
  attend_e4m3(o, layout, out, lse, stream);
}

}  // namespace sapattn::cuda
