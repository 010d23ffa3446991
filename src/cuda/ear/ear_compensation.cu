// SVG-EAR on the GPU, the centroid compensation (docs/ear.md): the key clusters that a video query
// row skipped enter its attention output and lse as pseudo-keys. This file holds the ops' entry
// points (centroid_compensation, corrected_centroid_compensation, their scratch), the kernel choice
// (set_compensation_kernel_override) and the CUDA-core kernel that centroid_compensation ran before
// the tensor-core ones (ear_compensation_tc.cu: mma.sync; ear_compensation_sm90.cu: wgmma, the
// default on sm_90). The older kernels stay behind the override ("cuda_cores", "mma_sync") so that
// all can be timed on one GPU (bench/bench_ops.cu) until they are retired.
// Every path is a fixed sequence of launches on the caller's stream and is deterministic: reductions
// run in a fixed order, and the only atomics are integer ORs into the value-check flag.
//
// Numerics of the CUDA-core kernel against the CPU backend (its test's tolerance, docs/ear.md):
// fp32 FMA logits and accumulation instead of the CPU's 8-lane logits and fp64 sums, relative
// errors ~1e-6.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cuda/ear/ear.cuh"
#include "cuda/ear/ear_internal.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda {

using ear::check_head_dim;
using ear::checked_size;
using ear::copy_strides;
using ear::kThreads;
using ear::strided;
using ear::Strided4;
using ear::with_value_check;

namespace {

// ---------------------------------------------------------------------------------------------
// The CUDA-core kernel: a block takes 64 query rows (token order) of one (b,h) and streams the
// key and value centroids through shared memory 32 at a time. Thread t owns row t/4: the logits of
// columns t%4 + 4k (k < 8) and the output dims 4(t%4) + 16k + e (e < 4, k < kChunks). The four
// threads of a row share its online-softmax state (max, total) through quad shuffles in a fixed
// order, so every thread of the quad holds the same values and the result is deterministic.
// ---------------------------------------------------------------------------------------------

constexpr int kCompRows = 64;
constexpr int kCompCols = 32;

struct CompensationParams {
  const void* q;  // [B,H,S,D]
  int64_t q_stride[4];
  const int32_t* q_labels;  // [B,H,N] unit stride
  int64_t l_stride_b, l_stride_h;
  Strided4<const uint8_t> mask;  // [B,H,Cq,Ck]
  const float* k_centroids;      // [BH, Ck, D]
  const float* v_centroids;
  const int32_t* k_sizes;  // [BH, Ck]
  void* out;               // [B,H,S,D]
  int64_t out_stride[4];
  float* lse;  // [B,H,S]
  int64_t lse_stride[3];
  int64_t H, N, Cq, Ck, D;
  float scale;
  int* flag;
};

constexpr int64_t comp_stride(int64_t D) { return (D + 15) / 16 * 16; }
// Both kernels take head dims up to 128, as the CUDA attention does (64 and 128): the CUDA-core one
// holds the output row in registers (4 kChunks floats per thread; 256 dims spilled), the tensor-core
// one pads to 64 or 128 dims.
constexpr int64_t kMaxCompensationDim = 128;

template <typename TQ, typename TO, int kChunks>
__global__ void __launch_bounds__(kThreads) compensation_kernel(CompensationParams p) {
  extern __shared__ __align__(16) float comp_smem[];
  const int64_t Dp = comp_stride(p.D);
  float* q_tile = comp_smem;                                                        // [64][Dp]
  float* k_tile = q_tile + kCompRows * Dp;                                          // [32][Dp]
  float* v_tile = k_tile + kCompCols * Dp;                                          // [32][Dp]
  float* weights = v_tile + kCompCols * Dp;                                         // [64][33]
  auto* sizes = reinterpret_cast<int32_t*>(weights + kCompRows * (kCompCols + 1));  // [32]

  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kCompRows;
  const int r = threadIdx.x / 4, quad = threadIdx.x % 4;
  const int64_t i = row0 + r, D = p.D;
  const TQ* qbase = static_cast<const TQ*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  for (int64_t t = threadIdx.x; t < kCompRows * Dp; t += kThreads) {
    const int64_t rr = t / Dp, d = t % Dp;
    q_tile[t] = (row0 + rr < p.N && d < D) ? to_f32(qbase[(row0 + rr) * p.q_stride[2] + d * p.q_stride[3]]) : 0.0f;
  }
  int64_t label = -1;
  if (i < p.N) {
    label = p.q_labels[b * p.l_stride_b + h * p.l_stride_h + i];
    if (label < 0 || label >= p.Cq) {
      if (quad == 0) atomicOr(p.flag, kBadLabel);
      label = -1;
    }
  }
  const bool active = label >= 0;
  // The exact part enters as (max = lse, total = 1, acc = out); a row that attended to nothing
  // (lse = -inf) as an empty state.
  TO* out_row = static_cast<TO*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2];
  float* lse_at = p.lse + b * p.lse_stride[0] + h * p.lse_stride[1] + i * p.lse_stride[2];
  const float lse0 = active ? *lse_at : -INFINITY;
  float m = lse0, total = lse0 == -INFINITY ? 0.0f : 1.0f;
  float acc[kChunks][4];
#pragma unroll
  for (int k = 0; k < kChunks; ++k)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t d = 4 * quad + 16 * k + e;
      acc[k][e] = (total > 0.0f && d < D) ? to_f32(out_row[d * p.out_stride[3]]) : 0.0f;
    }
  bool touched = false;

  for (int64_t j0 = 0; j0 < p.Ck; j0 += kCompCols) {
    __syncthreads();  // the previous chunk is consumed (and the q tile is written)
    for (int64_t t = threadIdx.x; t < kCompCols * Dp; t += kThreads) {
      const int64_t c = t / Dp, d = t % Dp;
      const bool in = j0 + c < p.Ck && d < D;
      k_tile[t] = in ? p.k_centroids[(bh * p.Ck + j0 + c) * D + d] : 0.0f;
      v_tile[t] = in ? p.v_centroids[(bh * p.Ck + j0 + c) * D + d] : 0.0f;
    }
    if (threadIdx.x < kCompCols)
      sizes[threadIdx.x] = j0 + threadIdx.x < p.Ck
                               ? static_cast<int32_t>(checked_size(p.k_sizes[bh * p.Ck + j0 + threadIdx.x], p.flag))
                               : 0;
    __syncthreads();
    // Logits of the skipped clusters: w = log|K_j| + scale q_i . kbar_j, -inf for the others.
    float w[kCompCols / 4];
    float chunk_max = -INFINITY;
#pragma unroll
    for (int k = 0; k < kCompCols / 4; ++k) {
      const int c = quad + 4 * k;
      w[k] = -INFINITY;
      const bool skipped = active && sizes[c] > 0 && p.mask.at(b, h, label, j0 + c) == 0;
      if (!skipped) continue;
      const float* qr = q_tile + r * Dp;
      const float* kc = k_tile + c * Dp;
      float dot = 0.0f;
      for (int64_t d = 0; d < Dp; d += 4) {
        const float4 qv = *reinterpret_cast<const float4*>(qr + d), kv = *reinterpret_cast<const float4*>(kc + d);
        dot = fmaf(qv.x, kv.x, dot);
        dot = fmaf(qv.y, kv.y, dot);
        dot = fmaf(qv.z, kv.z, dot);
        dot = fmaf(qv.w, kv.w, dot);
      }
      w[k] = logf(static_cast<float>(sizes[c])) + dot * p.scale;
      chunk_max = fmaxf(chunk_max, w[k]);
    }
    chunk_max = fmaxf(chunk_max, __shfl_xor_sync(0xffffffffu, chunk_max, 1));
    chunk_max = fmaxf(chunk_max, __shfl_xor_sync(0xffffffffu, chunk_max, 2));
    const float m_new = fmaxf(m, chunk_max);
    const float alpha = m_new == -INFINITY ? 1.0f : expf(m - m_new);
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < kCompCols / 4; ++k) {
      const float e = w[k] == -INFINITY ? 0.0f : expf(w[k] - m_new);
      weights[r * (kCompCols + 1) + quad + 4 * k] = e;
      sum += e;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    touched = touched || chunk_max != -INFINITY;
    total = total * alpha + sum;
    m = m_new;
    __syncthreads();  // the weights are visible
#pragma unroll
    for (int k = 0; k < kChunks; ++k)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[k][e] *= alpha;
    if (chunk_max != -INFINITY) {  // the quad's row skipped something in this chunk
      for (int c = 0; c < kCompCols; ++c) {
        const float e = weights[r * (kCompCols + 1) + c];
        const float* vc = v_tile + c * Dp + 4 * quad;
#pragma unroll
        for (int k = 0; k < kChunks; ++k) {
          if (16 * k >= Dp) break;
          const float4 vv = *reinterpret_cast<const float4*>(vc + 16 * k);
          acc[k][0] = fmaf(e, vv.x, acc[k][0]);
          acc[k][1] = fmaf(e, vv.y, acc[k][1]);
          acc[k][2] = fmaf(e, vv.z, acc[k][2]);
          acc[k][3] = fmaf(e, vv.w, acc[k][3]);
        }
      }
    }
  }
  if (!touched) return;  // nothing skipped: the row stays as the attention wrote it
#pragma unroll
  for (int k = 0; k < kChunks; ++k)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t d = 4 * quad + 16 * k + e;
      if (d < D) out_row[d * p.out_stride[3]] = from_f32<TO>(acc[k][e] / total);
    }
  if (quad == 0) *lse_at = m + logf(total);
}

// The CUDA-core path of centroid_compensation (the op's checks done; no scratch).
void compensation_cuda_cores(const TensorView& q, const TensorView& q_labels, const TensorView& mask,
                             const TensorView& k_centroids, const TensorView& v_centroids, const TensorView& k_sizes,
                             float scale, TensorView out, TensorView lse, const Stream& stream) {
  const int64_t B = q.shape[0], H = q.shape[1], N = q_labels.shape[2], D = q.shape[3];
  const int64_t BH = B * H, Ck = k_centroids.shape[2];
  CompensationParams p{};
  p.q = q.data;
  copy_strides(q, p.q_stride, 4);
  p.q_labels = static_cast<const int32_t*>(q_labels.data);
  p.l_stride_b = q_labels.stride[0];
  p.l_stride_h = q_labels.stride[1];
  p.mask = strided<const uint8_t>(mask);
  p.k_centroids = static_cast<const float*>(k_centroids.data);
  p.v_centroids = static_cast<const float*>(v_centroids.data);
  p.k_sizes = static_cast<const int32_t*>(k_sizes.data);
  p.out = out.data;
  copy_strides(out, p.out_stride, 4);
  p.lse = static_cast<float*>(lse.data);
  copy_strides(lse, p.lse_stride, 3);
  p.H = H;
  p.N = N;
  p.Cq = mask.shape[2];
  p.Ck = Ck;
  p.D = D;
  p.scale = scale;
  p.flag = value_error_flag();
  const int64_t Dp = comp_stride(D);
  const int smem = static_cast<int>(((kCompRows + 2 * kCompCols) * Dp + kCompRows * (kCompCols + 1)) * sizeof(float) +
                                    kCompCols * sizeof(int32_t));
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kCompRows)), static_cast<unsigned>(BH));
  with_value_check(stream, "centroid_compensation", [&] {
    dispatch_float(q.dtype, [&](auto q_tag) {
      dispatch_float(out.dtype, [&](auto out_tag) {
        using TQ = typename decltype(q_tag)::type;
        using TO = typename decltype(out_tag)::type;
        auto launch = [&](auto kernel) {
          set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
          kernel<<<grid, kThreads, smem, stream_of(stream)>>>(p);
          SAPATTN_CUDA_CHECK_LAUNCH();
        };
        if (Dp <= 64) {
          launch(compensation_kernel<TQ, TO, 4>);
        } else {
          launch(compensation_kernel<TQ, TO, 8>);
        }
      });
    });
  });
}

// Which kernel the compensation ops run (ear::CompensationKernel).
std::atomic<ear::CompensationKernel> g_kernel{ear::CompensationKernel::Auto};

// The limits both paths share; false when there is nothing to do.
bool check_compensation_shape(const TensorView& q, const TensorView& q_labels, const TensorView& k_centroids,
                              const char* op) {
  const int64_t BH = q.shape[0] * q.shape[1];
  if (BH * q_labels.shape[2] * k_centroids.shape[2] == 0) return false;
  check_head_dim(q.shape[3], kMaxCompensationDim, op);
  SAPATTN_CHECK(BH <= 65535, UnsupportedError, op, " on CUDA takes at most 65535 (b,h) pairs");
  return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

void set_compensation_kernel_override(const char* name) {
  using K = ear::CompensationKernel;
  const auto is = [&](const char* s) { return name != nullptr && std::strcmp(name, s) == 0; };
  const K kernel = name == nullptr || name[0] == '\0' ? K::Auto
                   : is("cuda_cores")                 ? K::CudaCores
                   : is("mma_sync")                   ? K::MmaSync
                   : is("wgmma")                      ? K::Wgmma
                                                      : K::Auto;
  SAPATTN_CHECK(kernel != K::Auto || name == nullptr || name[0] == '\0', InvalidArgumentError,
                "unknown compensation kernel override '", name,
                "' (expected \"cuda_cores\", \"mma_sync\", \"wgmma\" or \"\")");
  g_kernel.store(kernel);
}

size_t compensation_workspace_bytes(int64_t batch_heads, int64_t tokens, int64_t q_clusters, int64_t pseudo_keys,
                                    int64_t dim) {
  Carver carver("centroid_compensation");
  ear::carve_compensation(carver, batch_heads, tokens, q_clusters, pseudo_keys, dim);
  return carver.used();
}

void centroid_compensation(const TensorView& q, const TensorView& q_labels, const TensorView& mask,
                           const TensorView& k_centroids, const TensorView& v_centroids, const TensorView& k_sizes,
                           float scale, TensorView out, TensorView lse, const Stream& stream, Workspace workspace) {
  const DeviceGuard guard(stream.device);
  if (!check_compensation_shape(q, q_labels, k_centroids, "centroid_compensation")) return;
  const ear::CompensationKernel kernel = g_kernel.load();
  if (kernel == ear::CompensationKernel::CudaCores)
    return compensation_cuda_cores(q, q_labels, mask, k_centroids, v_centroids, k_sizes, scale, out, lse, stream);
  ear::compensation_tensor_cores("centroid_compensation", q, q_labels, mask, k_centroids, v_centroids, k_sizes, {}, {},
                                 scale, out, lse, stream, workspace, kernel);
}

void corrected_centroid_compensation(const TensorView& q, const TensorView& q_labels, const TensorView& mask,
                                     const TensorView& k_centroids, const TensorView& v_centroids,
                                     const TensorView& k_sizes, const TensorView& spread, const TensorView& pair_values,
                                     float scale, TensorView out, TensorView lse, const Stream& stream,
                                     Workspace workspace) {
  const DeviceGuard guard(stream.device);
  if (!check_compensation_shape(q, q_labels, k_centroids, "corrected_centroid_compensation")) return;
  // The CUDA-core kernel has no spread or pseudo-keys per column: "cuda_cores" leaves this op the
  // default tensor-core kernel.
  const ear::CompensationKernel kernel = g_kernel.load();
  ear::compensation_tensor_cores("corrected_centroid_compensation", q, q_labels, mask, k_centroids, v_centroids,
                                 k_sizes, spread, pair_values, scale, out, lse, stream, workspace,
                                 kernel == ear::CompensationKernel::CudaCores ? ear::CompensationKernel::Auto : kernel);
}

}  // namespace sapattn::cuda
