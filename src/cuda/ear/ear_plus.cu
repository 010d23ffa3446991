// ear-plus on the GPU, the probe (ear_plus_probe; docs/ear.md, "ear-plus") and the scratch of every
// ear-plus op (ear_plus_workspace_bytes; the routing per head is in ear_select.cu, the split in
// ear_split.cu). The probe is EAR's pass over the key tokens with the attention mass kept (on tensor
// cores, ear_probe_tc.cu, unless probe_on_tensor_cores says otherwise; on CUDA cores ear_estimate.cu,
// probe_kernel<T, true>): per (a, j) it leaves log E_aj and log M_aj in fp64 and writes the spread.
// Then one warp per query-centroid row takes log Z_a = logsumexp_j log M_aj and writes the
// row-normalised scores. With pair values asked for (always on CUDA cores), a second pass over the
// same tiles recomputes the logits and sums exp(s_t - log M_aj) v_t per pair: the final max is known
// by then, so no running rescale is needed. Every launch is on the caller's stream, scratch comes from
// the caller's workspace, and every sum runs in a fixed order (deterministic).
//
// Numerics against the CPU backend (the tests' tolerances, docs/ear.md "The CUDA backend"): on tensor
// cores, ear_probe_tc.cu's bound. On CUDA cores (below): the logits are bit-identical (the CPU's 8-lane
// fp32 dot); E, M and Z are fp64 sums in another order; each output is rounded to fp32 once.
//   scores:      ear_probe's bound on log E, plus 2 |d log Z| (Z sums positive terms: relative error
//                ~ (N + Ck) 2^-52) and an fp32 rounding;
//   spread:      log M in another order (positive terms, ~ n 2^-52 relative) plus the fp64 rounding
//                of log(M/|K|) + m - c and an fp32 rounding;
//   pair_values: sum_t exp(s_t - log M) v_t against the CPU's rescaled sum over M: ~ n 2^-52 of
//                sum_t w_t |v_t| plus an fp32 rounding; an empty cluster's value centroid exactly.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/ear/ear.cuh"
#include "cuda/ear/ear_internal.hpp"
#include "cuda/ear/ear_probe.cuh"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda {

using ear::carve_head_routing;
using ear::carve_split;
using ear::checked_size;
using ear::kProbeCentroids;
using ear::kProbeClusters;
using ear::kProbeEps;
using ear::kProbeSlots;
using ear::kProbeTile;
using ear::kProbeWarps;
using ear::kThreads;
using ear::PlusProbeScratch;
using ear::probe_stride;
using ear::ProbeParams;
using ear::stage_query_centroids;
using ear::stage_sorted_rows;
using ear::strided;
using ear::tile_logits;
using ear::with_value_check;

namespace {

// ear_plus_probe's floor on the row-normalised error |Q_a| E / Z^2 (the CPU's kNormalisedErrorEps).
constexpr double kNormalisedErrorEps = 1e-30;
constexpr int kScoreRows = kThreads / 32;  // query-centroid rows per block of plus_scores_kernel

// ---------------------------------------------------------------------------------------------
// The scores: one warp per row a. log Z_a = top + log sum_j exp(log M_aj - top) over the clusters
// with mass (lanes stride j; the warp's butterfly sum has a fixed order and leaves every lane the
// same value), then per j the CPU's
//   max(log E_aj - 2 log Z_a + log |Q_a|, log 1e-30) - gamma log max(|Q_a| |K_j|, 1e-8),
// with the CPU's std::max (a NaN stays NaN, as on the CPU).
// ---------------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) plus_scores_kernel(ProbeParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int64_t a = static_cast<int64_t>(blockIdx.x) * kScoreRows + warp;
  if (a >= p.Cq) return;
  const double* log_error = p.log_error + (bh * p.Cq + a) * p.Ck;
  const double* log_mass = p.log_mass + (bh * p.Cq + a) * p.Ck;
  double top = -INFINITY;
  for (int64_t j = lane; j < p.Ck; j += 32) top = fmax(top, log_mass[j]);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) top = fmax(top, __shfl_xor_sync(0xffffffffu, top, o));
  double z = 0.0;
  for (int64_t j = lane; j < p.Ck; j += 32)
    if (log_mass[j] > -INFINITY) z += exp(log_mass[j] - top);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) z += __shfl_xor_sync(0xffffffffu, z, o);
  const double log_z = top + log(z);  // -inf when no cluster has mass, as on the CPU
  const double q_size = static_cast<double>(checked_size(p.q_sizes[bh * p.Cq + a], p.flag));
  const double log_q = log(q_size), floor = log(kNormalisedErrorEps);
  for (int64_t j = lane; j < p.Ck; j += 32) {
    const double k_size = static_cast<double>(checked_size(p.k_sizes[bh * p.Ck + j], p.flag));
    const double x = log_error[j] - 2.0 * log_z + log_q;
    const double error = x < floor ? floor : x;
    const double log_area = log(fmax(q_size * k_size, kProbeEps));
    p.scores.at(b, h, a, j) = static_cast<float>(error - static_cast<double>(p.gamma) * log_area);
  }
}

// ---------------------------------------------------------------------------------------------
// The pair values: the pass's tiling (ear_probe.cuh) with lane = query centroid, the logits of the
// warp's tokens turned into weights w = exp(s - log M_aj) in shared memory; the values of the tile
// are then staged over the keys, and thread (lane a, warp w) sums w_t v_t[d] over the tile's tokens in
// order for d = w, w + 8, ... (kChunks of them, fp64).
// ---------------------------------------------------------------------------------------------

// Stages the values (of the runtime dtype p.v_dtype: k and v may differ) like the keys.
__device__ __forceinline__ void stage_sorted_values(const ProbeParams& p, int64_t b, int64_t h, const int32_t* order,
                                                    int32_t first, int n, float* rows) {
  const int64_t offset = b * p.v_stride[0] + h * p.v_stride[1];
  switch (p.v_dtype) {
    case DType::F32:
      stage_sorted_rows(static_cast<const float*>(p.v) + offset, p.v_stride, order, first, n, p.D, rows);
      break;
    case DType::F16:
      stage_sorted_rows(static_cast<const __half*>(p.v) + offset, p.v_stride, order, first, n, p.D, rows);
      break;
    default:
      stage_sorted_rows(static_cast<const __nv_bfloat16*>(p.v) + offset, p.v_stride, order, first, n, p.D, rows);
      break;
  }
}

int pair_values_smem_bytes(int64_t D) {
  return static_cast<int>((kProbeCentroids + kProbeTile) * probe_stride(D) * sizeof(float) +
                          kProbeTile * kProbeCentroids * sizeof(double));
}

template <typename TK, int kChunks>
__global__ void __launch_bounds__(kThreads) pair_values_kernel(ProbeParams p, float* pair_values) {
  extern __shared__ __align__(16) float values_smem[];
  const int64_t D = p.D, Dp = probe_stride(D);
  float* q_tile = values_smem;                                       // [32][Dp]
  float* rows = q_tile + kProbeCentroids * Dp;                       // [64][Dp]: keys, then values
  auto* weight = reinterpret_cast<double*>(rows + kProbeTile * Dp);  // [64 tokens][32 lanes]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.z, b = bh / p.H, h = bh % p.H;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kProbeCentroids, a = a0 + lane;
  const TK* kbase = static_cast<const TK*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
  const int32_t* order = p.order + bh * p.N;
  stage_query_centroids(p, bh, a0, q_tile);
  const float* qa = q_tile + lane * Dp;

  const int64_t j_end = min_of<int64_t>(p.Ck, (static_cast<int64_t>(blockIdx.y) + 1) * kProbeClusters);
  for (int64_t j = static_cast<int64_t>(blockIdx.y) * kProbeClusters; j < j_end; ++j) {
    const double log_mass = a < p.Cq ? p.log_mass[(bh * p.Cq + a) * p.Ck + j] : -INFINITY;
    double acc[kChunks];
#pragma unroll
    for (int k = 0; k < kChunks; ++k) acc[k] = 0.0;
    const int32_t begin = p.offsets[bh * (p.Ck + 1) + j], end = p.offsets[bh * (p.Ck + 1) + j + 1];
    for (int32_t tile = begin; tile < end; tile += kProbeTile) {
      const int n = static_cast<int>(min_of<int64_t>(kProbeTile, end - tile));
      __syncthreads();  // the previous tile's values and weights are consumed
      stage_sorted_rows(kbase, p.k_stride, order, tile, n, D, rows);
      __syncthreads();
      float logit[kProbeSlots];
      const int slots = tile_logits(qa, rows, n, warp, D, p.scale, logit);
#pragma unroll
      for (int s = 0; s < kProbeSlots; ++s)
        if (s < slots)
          weight[(warp + s * kProbeWarps) * kProbeCentroids + lane] =
              log_mass > -INFINITY ? exp(static_cast<double>(logit[s]) - log_mass) : 0.0;
      __syncthreads();  // the keys are consumed, the weights written
      stage_sorted_values(p, b, h, order, tile, n, rows);
      __syncthreads();
      for (int i = 0; i < n; ++i) {
        const double w = weight[i * kProbeCentroids + lane];
#pragma unroll
        for (int k = 0; k < kChunks; ++k) {
          const int64_t d = warp + k * kProbeWarps;
          if (d < D) acc[k] += w * static_cast<double>(rows[i * Dp + d]);
        }
      }
    }
    // The block's 32 output rows through the rows buffer (free once every thread has summed the
    // last tile), so that each pair's D values are stored together.
    __syncthreads();
    if (a < p.Cq) {
      const bool empty = log_mass == -INFINITY || checked_size(p.k_sizes[bh * p.Ck + j], p.flag) == 0;
      const float* centroid = p.v_centroids + (bh * p.Ck + j) * D;
#pragma unroll
      for (int k = 0; k < kChunks; ++k) {
        const int64_t d = warp + k * kProbeWarps;
        if (d < D) rows[lane * Dp + d] = empty ? centroid[d] : static_cast<float>(acc[k]);
      }
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < kProbeCentroids * D; e += kThreads) {
      const int64_t r = e / D, d = e % D;
      if (a0 + r < p.Cq) pair_values[((bh * p.Cq + a0 + r) * p.Ck + j) * D + d] = rows[r * Dp + d];
    }
  }
}

void launch_pair_values(const ProbeParams& p, int64_t BH, float* pair_values, cudaStream_t stream) {
  const int smem = pair_values_smem_bytes(p.D);
  const dim3 grid(static_cast<unsigned>(ceil_div(p.Cq, kProbeCentroids)),
                  static_cast<unsigned>(ceil_div(p.Ck, kProbeClusters)), static_cast<unsigned>(BH));
  dispatch_float(p.k_dtype, [&](auto tag) {
    using TK = typename decltype(tag)::type;
    const auto launch = [&](auto kernel) {
      set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
      kernel<<<grid, kThreads, smem, stream>>>(p, pair_values);
      SAPATTN_CUDA_CHECK_LAUNCH();
    };
    // Chunks of kProbeWarps dims per thread: the smallest count that covers D (<= kMaxProbeDim).
    if (p.D <= 8 * kProbeWarps)
      launch(pair_values_kernel<TK, 8>);
    else if (p.D <= 16 * kProbeWarps)
      launch(pair_values_kernel<TK, 16>);
    else
      launch(pair_values_kernel<TK, 32>);
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Scratch
// ---------------------------------------------------------------------------------------------

namespace ear {

PlusProbeScratch carve_plus_probe(Carver& carver, int64_t batch_heads, int64_t tokens, int64_t q_clusters,
                                  int64_t k_clusters) {
  PlusProbeScratch s;
  s.probe = carve_probe(carver, batch_heads, tokens, k_clusters);
  s.log_error = carver.take<double>(batch_heads * q_clusters * k_clusters);
  s.log_mass = carver.take<double>(batch_heads * q_clusters * k_clusters);
  return s;
}

}  // namespace ear

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

size_t ear_plus_workspace_bytes(int64_t batch_heads, int64_t tokens, int64_t q_clusters, int64_t k_clusters) {
  Carver probe("ear_plus_probe"), routing("select_error_aware_per_head"), split("split_clusters");
  const int64_t Ck = std::max<int64_t>(k_clusters, 1);
  ear::carve_plus_probe(probe, batch_heads, tokens, q_clusters, Ck);
  carve_head_routing(routing, batch_heads, q_clusters, k_clusters);
  carve_split(split, batch_heads, tokens, Ck);
  return std::max({probe.used(), routing.used(), split.used()});
}

void ear_plus_probe(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& v_centroids,
                    const TensorView& k, const TensorView& v, const TensorView& k_labels, const TensorView& q_sizes,
                    const TensorView& k_sizes, float scale, float gamma, TensorView scores, TensorView spread,
                    TensorView pair_values, const Stream& stream, Workspace workspace) {
  const DeviceGuard guard(stream.device);
  const int64_t BH = k.shape[0] * k.shape[1], N = k.shape[2], D = k.shape[3];
  const int64_t Cq = q_centroids.shape[2], Ck = k_centroids.shape[2];
  Carver carver("ear_plus_probe", workspace);
  const PlusProbeScratch s = ear::carve_plus_probe(carver, BH, N, Cq, Ck);
  carver.check();
  if (BH * Cq * Ck == 0) return;
  ear::check_probe_limits(BH, Ck, D, "ear_plus_probe");
  ProbeParams p =
      ear::probe_params(q_centroids, k_centroids, v_centroids, k, v, k_labels, q_sizes, k_sizes, scale, gamma, s.probe);
  p.scores = strided<float>(scores);
  p.log_error = s.log_error;
  p.log_mass = s.log_mass;
  if (!spread.empty()) p.spread = strided<float>(spread);
  const cudaStream_t st = stream_of(stream);
  const bool tensor_cores = ear::probe_on_tensor_cores(p, stream, !pair_values.empty());
  with_value_check(stream, "ear_plus_probe", [&] {
    ear::launch_probe_pass(p, s.probe, k_labels, /*plus=*/true, tensor_cores, st);
    plus_scores_kernel<<<dim3(static_cast<unsigned>(ceil_div(Cq, kScoreRows)), static_cast<unsigned>(BH)), kThreads, 0,
                         st>>>(p);
    SAPATTN_CUDA_CHECK_LAUNCH();
    if (!pair_values.empty()) launch_pair_values(p, BH, static_cast<float*>(pair_values.data), st);
  });
}

}  // namespace sapattn::cuda
