// order_clusters on the GPU. One block per (b,h) builds the greedy nearest-neighbour chain: per step
// its warps score the unvisited non-empty clusters against the current one (a warp per cluster,
// lane l summing dimensions l, l + 32, ... with fused multiply-adds, then a xor-shuffle butterfly:
// the CPU reference's arithmetic exactly) and the block takes the best, ties to the lower index.
// The chain is sequential, C steps of C dot products: 37 ms at 40 heads x 1000 clusters x D 128 on
// an H100 (latency-bound: one dependent shuffle reduction per candidate), so it is meant for when
// the clusters are made from scratch; later warm-started steps keep the numbering.
// A second kernel moves centroids and sizes to their new places and remaps the labels.
#include <cuda_runtime.h>

#include <cmath>

#include "core/carver.hpp"
#include "core/cuda_check.hpp"
#include "cuda/backend.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda {

namespace {

constexpr int kChainThreads = 256;
constexpr int kChainWarps = kChainThreads / 32;
constexpr int kRemapThreads = 256;

// The dot product of rows a and b of length D, the same value in every lane.
__device__ __forceinline__ float warp_dot(const float* a, const float* b, int64_t D, int lane) {
  float s = 0.0f;
  for (int64_t d = lane; d < D; d += 32) s = __fmaf_rn(a[d], b[d], s);
#pragma unroll
  for (int m = 16; m > 0; m /= 2) s = __fadd_rn(s, __shfl_xor_sync(0xffffffff, s, m));
  return s;
}

struct Best {
  float sim;
  int32_t index;  // -1: none
};
// The better of two candidates: higher similarity, then the lower index.
__device__ __forceinline__ Best better(Best a, Best b) {
  if (b.index < 0) return a;
  if (a.index < 0) return b;
  return b.sim > a.sim || (b.sim == a.sim && b.index < a.index) ? b : a;
}

// Shared memory: inverse norms [C] f32, then the visited flags [C] u8.
__global__ void __launch_bounds__(kChainThreads) chain_kernel(const float* centroids, const int32_t* sizes, int64_t C,
                                                              int64_t D, int32_t* rank_out) {
  extern __shared__ float inv[];
  auto* used = reinterpret_cast<uint8_t*>(inv + C);
  __shared__ Best warp_best[kChainWarps];
  __shared__ int32_t current, position;
  const int64_t bh = blockIdx.x;
  const float* cent = centroids + bh * C * D;
  const int32_t* size = sizes + bh * C;
  int32_t* rank = rank_out + bh * C;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t c = warp; c < C; c += kChainWarps) {
    const float n = warp_dot(cent + c * D, cent + c * D, D, lane);
    if (lane == 0) inv[c] = n > 0.0f ? __frcp_rn(__fsqrt_rn(n)) : 0.0f;
  }
  for (int64_t c = threadIdx.x; c < C; c += kChainThreads) used[c] = size[c] == 0 ? 1 : 0;
  if (threadIdx.x == 0) {
    int32_t first = 0;
    while (first < C && size[first] == 0) ++first;
    current = first;
    position = 0;
  }
  __syncthreads();
  while (current < C) {
    const int32_t cur = current;
    if (threadIdx.x == 0) {
      used[cur] = 1;
      rank[cur] = position++;
    }
    __syncthreads();
    Best best{0.0f, -1};
    for (int64_t c = warp; c < C; c += kChainWarps) {
      if (used[c]) continue;
      float sim = __fmul_rn(__fmul_rn(warp_dot(cent + cur * D, cent + c * D, D, lane), inv[cur]), inv[c]);
      if (isnan(sim)) sim = -INFINITY;
      best = better(best, Best{sim, static_cast<int32_t>(c)});
    }
    if (lane == 0) warp_best[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
      Best all = warp_best[0];
      for (int w = 1; w < kChainWarps; ++w) all = better(all, warp_best[w]);
      current = all.index < 0 ? static_cast<int32_t>(C) : all.index;
    }
    __syncthreads();
  }
  // Empty clusters last, in index order.
  if (threadIdx.x == 0) {
    int32_t p = position;
    for (int64_t c = 0; c < C; ++c)
      if (size[c] == 0) rank[c] = p++;
  }
}

// Moves centroid rows and sizes to their ranks (from the copies in the workspace).
__global__ void move_kernel(const float* old_centroids, const int32_t* old_sizes, const int32_t* rank, int64_t C,
                            int64_t D, float* centroids, int32_t* sizes) {
  const int64_t bh = blockIdx.y;
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    const int64_t to = rank[bh * C + c];
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
      centroids[(bh * C + to) * D + d] = old_centroids[(bh * C + c) * D + d];
    if (threadIdx.x == 0) sizes[bh * C + to] = old_sizes[bh * C + c];
  }
}

// labels[i] = rank[labels[i]]; a label outside [0, C) raises kBadLabel and is left as it is.
__global__ void remap_kernel(int32_t* labels, int64_t stride_b, int64_t stride_h, int64_t heads, int64_t N,
                             const int32_t* rank, int64_t C, int* flag) {
  const int64_t bh = blockIdx.y;
  int32_t* row = labels + (bh / heads) * stride_b + (bh % heads) * stride_h;
  for (int64_t i = blockIdx.x * int64_t{kRemapThreads} + threadIdx.x; i < N; i += int64_t{gridDim.x} * kRemapThreads) {
    const int32_t l = row[i];
    if (l < 0 || l >= C) {
      atomicOr(flag, kBadLabel);
      continue;
    }
    row[i] = rank[bh * C + l];
  }
}

struct OrderScratch {
  int32_t* rank = nullptr;
  float* centroids = nullptr;
  int32_t* sizes = nullptr;
};

OrderScratch carve_order(Carver& carver, int64_t batch_heads, int64_t clusters, int64_t dim) {
  OrderScratch s;
  s.rank = carver.take<int32_t>(batch_heads * clusters);
  s.centroids = carver.take<float>(batch_heads * clusters * dim);
  s.sizes = carver.take<int32_t>(batch_heads * clusters);
  return s;
}

}  // namespace

size_t order_clusters_workspace_bytes(int64_t batch_heads, int64_t clusters, int64_t dim) {
  Carver carver("order_clusters");
  carve_order(carver, batch_heads, clusters, dim);
  return carver.used();
}

void order_clusters(TensorView centroids, TensorView sizes, TensorView labels, const Stream& stream,
                    Workspace workspace) {
  const int64_t B = centroids.shape[0], H = centroids.shape[1], C = centroids.shape[2], D = centroids.shape[3];
  const int64_t BH = B * H, N = labels.shape[2];
  Carver carver("order_clusters", workspace);
  const OrderScratch s = carve_order(carver, BH, C, D);
  carver.check();
  if (BH == 0 || C == 0) return;
  const int64_t smem = C * (sizeof(float) + 1);
  SAPATTN_CHECK(smem <= 200 * 1024, UnsupportedError, "order_clusters on CUDA takes at most ", 200 * 1024 / 5,
                " clusters, got ", C);
  SAPATTN_CHECK(BH < (int64_t{1} << 16), UnsupportedError, "order_clusters on CUDA takes fewer than 65536 heads, got ",
                BH);
  const cudaStream_t st = stream_of(stream);
  const bool checked = begin_value_check(stream);
  set_max_dynamic_smem(reinterpret_cast<const void*>(chain_kernel), static_cast<int>(smem));
  chain_kernel<<<static_cast<unsigned>(BH), kChainThreads, static_cast<size_t>(smem), st>>>(
      static_cast<const float*>(centroids.data), static_cast<const int32_t*>(sizes.data), C, D, s.rank);
  SAPATTN_CUDA_CHECK_LAUNCH();
  SAPATTN_CUDA_CHECK(cudaMemcpyAsync(s.centroids, centroids.data, static_cast<size_t>(BH * C * D) * sizeof(float),
                                     cudaMemcpyDeviceToDevice, st));
  SAPATTN_CUDA_CHECK(cudaMemcpyAsync(s.sizes, sizes.data, static_cast<size_t>(BH * C) * sizeof(int32_t),
                                     cudaMemcpyDeviceToDevice, st));
  const dim3 move_grid(static_cast<unsigned>(min_of<int64_t>(C, 1024)), static_cast<unsigned>(BH));
  move_kernel<<<move_grid, 128, 0, st>>>(s.centroids, s.sizes, s.rank, C, D, static_cast<float*>(centroids.data),
                                         static_cast<int32_t*>(sizes.data));
  SAPATTN_CUDA_CHECK_LAUNCH();
  if (N > 0) {
    const dim3 remap_grid(static_cast<unsigned>(min_of<int64_t>(ceil_div(N, kRemapThreads), 1024)),
                          static_cast<unsigned>(BH));
    remap_kernel<<<remap_grid, kRemapThreads, 0, st>>>(static_cast<int32_t*>(labels.data), labels.stride[0],
                                                       labels.stride[1], H, N, s.rank, C, value_error_flag());
    SAPATTN_CUDA_CHECK_LAUNCH();
  }
  if (checked) end_value_check(stream, "order_clusters");
}

}  // namespace sapattn::cuda
