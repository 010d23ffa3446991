// ear-plus on the GPU, the split of every key cluster in two halves (split_clusters; docs/ear.md,
// "ear-plus"). The points are sorted by cluster (the label sort of the k-means update; stable, so a
// cluster's members stay in token order) and one block splits one cluster, as the k-means update's
// mean kernel takes one cluster per block: the member farthest from the centroid, 8 power
// iterations, the sides, two 2-means steps, then the sub-labels and the halves' sizes. Every step
// sweeps the cluster's members in tiles staged in shared memory; each sorted point's side lives in
// the workspace between steps. A fixed sequence of launches on the caller's stream.
//
// Bit-identical to the CPU backend: every fp64 sum runs in the CPU's order (over d in order for a
// member's projection or distance: one thread per member; over the members in token order for a
// per-dim sum: one thread per dim, its running sum carried across tiles), with IEEE add, subtract,
// multiply, divide and square root, never contracted into an FMA; the farthest member is an exact
// argmax (the largest squared distance, ties to the first). The CPU build must not contract a*b + c
// either (the default x86-64 target has no FMA; the EAR probe's logits assume the same).
#include <cub/block/block_reduce.cuh>

#include <cstdint>

#include "cuda/ear/ear.cuh"
#include "cuda/ear/ear_internal.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda {

using ear::SplitScratch;
using ear::with_value_check;

namespace {

constexpr int kSplitThreads = 128;
constexpr int kSplitTile = 64;                           // members staged at a time (one projection thread each)
constexpr int kPowerIterations = 8, kTwoMeansSteps = 2;  // the CPU's
constexpr int64_t kMaxSplitDim = 256;                    // the staged tile's shared memory

// Row stride of the staged tile: odd, so that threads reading one dim of consecutive members hit
// distinct banks.
constexpr int64_t split_stride(int64_t D) { return D % 2 == 0 ? D + 1 : D; }

struct SplitParams {
  const void* points;  // [B,H,N,D] any strides
  int64_t p_stride[4];
  const float* centroids;  // [BH, C, D]
  const int32_t* order;    // [BH, N]: point indices sorted by cluster, token order within one
  const int32_t* offsets;  // [BH, C+1]
  uint8_t* side;           // [BH, N] in sorted order
  int32_t* sub_labels;     // [B,H,N] unit stride
  int64_t l_stride_b, l_stride_h;
  int32_t* sub_sizes;  // [BH, 2C]
  int64_t H, N, C, D;
};

int split_smem_bytes(int64_t D) {
  return static_cast<int>(4 * D * sizeof(double) + kSplitTile * sizeof(double) + kSplitTile +
                          kSplitTile * split_stride(D) * sizeof(float));
}

// The farthest member so far: the largest r2 (> 0), ties to the lower member index.
struct Farthest {
  double r2;
  int64_t m;
};

__device__ __forceinline__ Farthest farther(Farthest x, Farthest y) {
  return y.r2 > x.r2 || (y.r2 == x.r2 && y.m < x.m) ? y : x;
}

// The block's farthest member (an exact argmax: the result does not depend on the reduction's
// order), in every thread. `warp_best`: kSplitThreads / 32 slots of shared memory.
__device__ Farthest block_farthest(Farthest mine, Farthest* warp_best) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2)
    mine = farther(mine, {__shfl_xor_sync(0xffffffffu, mine.r2, o), __shfl_xor_sync(0xffffffffu, mine.m, o)});
  if (threadIdx.x % 32 == 0) warp_best[threadIdx.x / 32] = mine;
  __syncthreads();
  Farthest best = warp_best[0];
  for (int w = 1; w < kSplitThreads / 32; ++w) best = farther(best, warp_best[w]);
  return best;
}

template <typename T>
__global__ void __launch_bounds__(kSplitThreads) split_kernel(SplitParams p) {
  using ReduceCount = cub::BlockReduce<int64_t, kSplitThreads>;
  __shared__ typename ReduceCount::TempStorage count_temp;
  __shared__ Farthest warp_best[kSplitThreads / 32];
  __shared__ double norm;
  __shared__ int64_t count;
  extern __shared__ __align__(16) unsigned char split_smem[];
  // 32-bit dims, member indices and loop counters (D <= kMaxSplitDim, n < 2^31 as the offsets are
  // int32, bh < 65536): with 64-bit ones, whose divisions (the staging's e / D, bh / H) are called
  // subroutines, the sm_80 code spilled 44 bytes.
  const int D = static_cast<int>(p.D), Dt = static_cast<int>(split_stride(D));
  double* mu = reinterpret_cast<double*>(split_smem);                   // [D] the centroid
  double* u = mu + D;                                                   // [D] the axis
  double* acc0 = u + D;                                                 // [D] next u, or side 0's sum then mean
  double* acc1 = acc0 + D;                                              // [D] side 1's sum then mean
  double* value = acc1 + D;                                             // [kSplitTile] per staged member
  uint8_t* side_tile = reinterpret_cast<uint8_t*>(value + kSplitTile);  // [kSplitTile]
  float* tile = reinterpret_cast<float*>(side_tile + kSplitTile);       // [kSplitTile][Dt]

  const uint32_t bh = blockIdx.y, H = static_cast<uint32_t>(p.H), c = blockIdx.x;
  const int64_t b = bh / H, h = bh % H;
  const int32_t begin = p.offsets[bh * (p.C + 1) + c];
  const int n = p.offsets[bh * (p.C + 1) + c + 1] - begin;
  const T* base = static_cast<const T*>(p.points) + b * p.p_stride[0] + h * p.p_stride[1];
  const int32_t* member = p.order + bh * p.N + begin;  // the cluster's points, in token order
  uint8_t* side = p.side + bh * p.N + begin;
  const int tid = threadIdx.x;
  for (int d = tid; d < D; d += kSplitThreads) mu[d] = p.centroids[(bh * p.C + c) * D + d];

  // Stages members [m0, m0 + nt) (their points as fp32, with_sides: their sides) after a barrier.
  const auto stage = [&](int m0, int nt, bool with_sides) {
    __syncthreads();  // the previous tile (and mu, u, the accumulators) are settled
    for (int e = tid; e < nt * D; e += kSplitThreads) {
      const int i = e / D, d = e % D;
      tile[i * Dt + d] = to_f32(base[member[m0 + i] * p.p_stride[2] + d * p.p_stride[3]]);
    }
    if (with_sides && tid < nt) side_tile[tid] = side[m0 + tid];
    __syncthreads();
  };
  // The CPU's project(): sum_d (x_d - mu_d) w_d, in order of d.
  const auto project = [&](int i, const double* w) {
    double s = 0.0;
    for (int d = 0; d < D; ++d)
      s = __dadd_rn(s, __dmul_rn(__dsub_rn(static_cast<double>(tile[i * Dt + d]), mu[d]), w[d]));
    return s;
  };
  // The squared distance of staged member i from w, in order of d.
  const auto distance2 = [&](int i, const double* w) {
    double s = 0.0;
    for (int d = 0; d < D; ++d) {
      const double t = __dsub_rn(static_cast<double>(tile[i * Dt + d]), w[d]);
      s = __dadd_rn(s, __dmul_rn(t, t));
    }
    return s;
  };
  const auto tile_count = [&](int m0) { return min_of(kSplitTile, n - m0); };

  // 1. The member farthest from the centroid (the CPU's strict > from 0: the first of the largest).
  Farthest mine{0.0, -1};
  for (int m0 = 0; m0 < n; m0 += kSplitTile) {
    const int nt = tile_count(m0);
    stage(m0, nt, false);
    if (tid < nt) {
      const double r2 = distance2(tid, mu);
      if (r2 > mine.r2) mine = {r2, m0 + tid};
    }
  }
  const Farthest far = block_farthest(mine, warp_best);
  const bool split = far.r2 > 0.0;  // else: one point, or identical points on the centroid
  if (split) {
    const T* x = base + member[far.m] * p.p_stride[2];
    for (int d = tid; d < D; d += kSplitThreads)
      u[d] = __dsub_rn(static_cast<double>(to_f32(x[d * p.p_stride[3]])), mu[d]);

    // 2. Power iterations: next = sum_m project(m, u) (x_m - mu), in member order; u = next / |next|.
    for (int it = 0; it < kPowerIterations; ++it) {
      for (int d = tid; d < D; d += kSplitThreads) acc0[d] = 0.0;
      for (int m0 = 0; m0 < n; m0 += kSplitTile) {
        const int nt = tile_count(m0);
        stage(m0, nt, false);
        if (tid < nt) value[tid] = project(tid, u);
        __syncthreads();
        for (int d = tid; d < D; d += kSplitThreads) {
          double a = acc0[d];
          for (int i = 0; i < nt; ++i)
            a = __dadd_rn(a, __dmul_rn(value[i], __dsub_rn(static_cast<double>(tile[i * Dt + d]), mu[d])));
          acc0[d] = a;
        }
      }
      __syncthreads();
      if (tid == 0) {
        double s = 0.0;
        for (int d = 0; d < D; ++d) s = __dadd_rn(s, __dmul_rn(acc0[d], acc0[d]));
        norm = s;
      }
      __syncthreads();
      if (!(norm > 0.0)) break;  // u orthogonal to every offset: keep it (uniform across the block)
      const double root = __dsqrt_rn(norm);
      for (int d = tid; d < D; d += kSplitThreads) u[d] = __ddiv_rn(acc0[d], root);
    }
  }
  // 3. The sides: the sign of the projection on u (all 0 without a split).
  for (int m0 = 0; m0 < n; m0 += kSplitTile) {
    const int nt = tile_count(m0);
    if (split) stage(m0, nt, false);
    if (tid < nt) side[m0 + tid] = split && project(tid, u) > 0.0 ? 1 : 0;
  }
  // 4. Two 2-means steps between the halves' means (ties to side 0); none once a side is empty.
  for (int step = 0; split && step < kTwoMeansSteps; ++step) {
    __syncthreads();  // the previous step's distances have read its means
    for (int d = tid; d < D; d += kSplitThreads) acc0[d] = acc1[d] = 0.0;
    int64_t ones = 0;
    for (int m0 = 0; m0 < n; m0 += kSplitTile) {
      const int nt = tile_count(m0);
      stage(m0, nt, true);
      if (tid < nt) ones += side_tile[tid];
      for (int d = tid; d < D; d += kSplitThreads) {
        double a0 = acc0[d], a1 = acc1[d];
        for (int i = 0; i < nt; ++i) {
          const double x = static_cast<double>(tile[i * Dt + d]);
          if (side_tile[i])
            a1 = __dadd_rn(a1, x);
          else
            a0 = __dadd_rn(a0, x);
        }
        acc0[d] = a0;
        acc1[d] = a1;
      }
    }
    __syncthreads();
    const int64_t n1 = ReduceCount(count_temp).Sum(ones);
    if (tid == 0) count = n1;
    __syncthreads();
    if (count == 0 || count == n) break;  // uniform across the block
    for (int d = tid; d < D; d += kSplitThreads) {
      acc0[d] = __ddiv_rn(acc0[d], static_cast<double>(n - count));
      acc1[d] = __ddiv_rn(acc1[d], static_cast<double>(count));
    }
    for (int m0 = 0; m0 < n; m0 += kSplitTile) {
      const int nt = tile_count(m0);
      stage(m0, nt, false);
      if (tid < nt) side[m0 + tid] = distance2(tid, acc1) < distance2(tid, acc0) ? 1 : 0;
    }
  }
  // 5. Sub-labels 2c + side, and the halves' sizes.
  __syncthreads();  // every side is written
  int32_t* sub = p.sub_labels + b * p.l_stride_b + h * p.l_stride_h;
  int64_t ones = 0;
  for (int64_t m = tid; m < n; m += kSplitThreads) {
    sub[member[m]] = static_cast<int32_t>(2 * c + side[m]);
    ones += side[m];
  }
  const int64_t n1 = ReduceCount(count_temp).Sum(ones);
  if (tid == 0) {
    p.sub_sizes[bh * 2 * p.C + 2 * c] = static_cast<int32_t>(n - n1);
    p.sub_sizes[bh * 2 * p.C + 2 * c + 1] = static_cast<int32_t>(n1);
  }
}

}  // namespace

namespace ear {

SplitScratch carve_split(Carver& carver, int64_t batch_heads, int64_t tokens, int64_t clusters) {
  SplitScratch s;
  s.clusters = ear::carve_cluster_sort(carver, batch_heads, tokens, clusters);
  s.side = carver.take<uint8_t>(batch_heads * tokens);
  return s;
}

}  // namespace ear

void split_clusters(const TensorView& points, const TensorView& labels, const TensorView& centroids,
                    TensorView sub_labels, TensorView sub_sizes, const Stream& stream, Workspace workspace) {
  const DeviceGuard guard(stream.device);
  const int64_t B = points.shape[0], H = points.shape[1], N = points.shape[2], D = points.shape[3];
  const int64_t BH = B * H, C = centroids.shape[2];
  Carver carver("split_clusters", workspace);
  const SplitScratch s = ear::carve_split(carver, BH, N, C);
  carver.check();
  if (BH == 0) return;
  ear::check_head_dim(D, kMaxSplitDim, "split_clusters");
  SAPATTN_CHECK(BH <= 65535, UnsupportedError, "split_clusters on CUDA takes at most 65535 (b,h) pairs");
  SplitParams p{};
  p.points = points.data;
  ear::copy_strides(points, p.p_stride, 4);
  p.centroids = static_cast<const float*>(centroids.data);
  p.order = s.clusters.sort.index_out;
  p.offsets = s.clusters.offsets;
  p.side = s.side;
  p.sub_labels = static_cast<int32_t*>(sub_labels.data);
  p.l_stride_b = sub_labels.stride[0];
  p.l_stride_h = sub_labels.stride[1];
  p.sub_sizes = static_cast<int32_t*>(sub_sizes.data);
  p.H = H;
  p.N = N;
  p.C = C;
  p.D = D;
  const cudaStream_t st = stream_of(stream);
  with_value_check(stream, "split_clusters", [&] {
    ear::sort_clusters(s.clusters, labels, st);
    const int smem = split_smem_bytes(D);
    dispatch_float(points.dtype, [&](auto tag) {
      const auto kernel = split_kernel<typename decltype(tag)::type>;
      set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
      kernel<<<dim3(static_cast<unsigned>(C), static_cast<unsigned>(BH)), kSplitThreads, smem, st>>>(p);
      SAPATTN_CUDA_CHECK_LAUNCH();
    });
  });
}

}  // namespace sapattn::cuda
