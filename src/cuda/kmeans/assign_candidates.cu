// kmeans_assign_candidates on the GPU (include/sapattn/ops.hpp; docs/cuda.md, "Candidate
// assignment"): the CPU's candidate lists and labels bit for bit, every distance the CPU's fp32
// arithmetic (exact_distance.cuh). Three steps on the caller's stream, no host sync:
//   1. lists_kernel: per (b,h) and block of kSources centroids a, the distances from each a to
//      every centroid (the targets streamed through the block once), then per a one warp picks the
//      m - 1 nearest others by (distance, index), NaN last: lists [B*H, C, m], a first.
//   2. the previous labels sorted per (b,h) (label_sort.hpp, as the k-means update), with offsets.
//   3. assign_kernel: one block per (b,h, cluster a): a's list in ascending index order staged as
//      fp32 rows in shared memory; each warp takes 8 of the cluster's points at a time (4 lanes a
//      point, the split distance of exact_distance.cuh) and keeps the strictly nearest: ties to the
//      lower index, as the CPU's scan in ascending order.
// m >= C is the exact kmeans_assign. This is the correctness-first kernel: the CPU-exact distances
// cost 3 rounded operations per term on the CUDA cores; the tensor-core screen with exact re-checks
// of near-ties (as kmeans_assign's) is the next step, once this one has run and been timed.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/backend.hpp"
#include "cuda/kmeans/exact_distance.cuh"
#include "cuda/kmeans/kmeans_internal.hpp"
#include "cuda/permute/label_sort.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda {

namespace {

constexpr int kThreads = 128;  // both kernels: 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kLanesPerPoint = 4;  // exact_squared_distance_lanes<4>
constexpr int kPointsPerWarp = 32 / kLanesPerPoint;
constexpr size_t kListSmemBytes = 96 * 1024;   // lists_kernel's target for its source rows of C ordinals
constexpr size_t kMaxSmemBytes = 160 * 1024;   // dynamic shared memory a block may ask for (sm_80 and up)
constexpr uint32_t kTaken = 0xffffffffu;       // an ordinal no longer selectable (a itself, picked)
constexpr uint32_t kNanOrdinal = 0xfffffffeu;  // NaN distances order after every number

struct CandidateScratch {
  int32_t* lists = nullptr;  // [B*H, C, m]
  LabelSort sort;
  int32_t* offsets = nullptr;  // [B*H, C+1]
};

CandidateScratch carve_candidates(Carver& carver, int64_t batch_heads, int64_t points, int64_t clusters, int64_t m) {
  CandidateScratch s;
  s.lists = carver.take<int32_t>(batch_heads * clusters * m);
  s.sort = carve_label_sort(carver, batch_heads, points, clusters);
  s.offsets = carver.take<int32_t>(batch_heads * (clusters + 1));
  return s;
}

// How many source centroids a lists_kernel block takes: their ordinal rows fit kListSmemBytes (one
// row at least).
int sources_per_block(int64_t C) {
  return static_cast<int>(std::clamp<int64_t>(static_cast<int64_t>(kListSmemBytes / sizeof(uint32_t)) / C, 1, 16));
}

// A distance as an unsigned ordinal that orders as the CPU's comparison does: squared distances
// are >= 0 (their bits order as their values) or NaN (last).
__device__ __forceinline__ uint32_t ordinal(float d) { return isnan(d) ? kNanOrdinal : __float_as_uint(d); }

// grid (ceil(C / sources), B*H), kThreads threads; dynamic shared memory: sources * D floats (the
// source rows) and sources * C ordinals.
__global__ void __launch_bounds__(kThreads) lists_kernel(const float* __restrict__ centroids, int64_t C, int64_t D,
                                                         int m, int sources, int32_t* __restrict__ lists) {
  extern __shared__ float list_smem[];
  float* src = list_smem;                                                // [sources][D]
  uint32_t* ord = reinterpret_cast<uint32_t*>(list_smem + sources * D);  // [sources][C]
  const int64_t bh = blockIdx.y;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * sources;
  const int rows = static_cast<int>(min_of<int64_t>(sources, C - a0));
  const float* cent = centroids + bh * C * D;
  for (int64_t t = threadIdx.x; t < rows * D; t += kThreads) src[t] = cent[a0 * D + t];
  __syncthreads();
  for (int64_t j = threadIdx.x; j < C; j += kThreads) {
    const float* cj = cent + j * D;
    for (int r = 0; r < rows; ++r) {
      const float* ca = src + r * D;
      // The CPU's squared_distance(cent + a D, cent + j D): the source's elements first.
      const float d = exact_squared_distance([ca](int64_t e) { return ca[e]; }, cj, D);
      ord[r * C + j] = a0 + r == j ? kTaken : ordinal(d);
    }
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < rows; r += kWarps) {
    uint32_t* row = ord + r * C;
    int32_t* out = lists + (bh * C + a0 + r) * m;
    if (lane == 0) out[0] = static_cast<int32_t>(a0 + r);
    for (int pick = 1; pick < m; ++pick) {
      // The smallest (ordinal, index) not yet taken; C - 1 >= m - 1 others exist.
      unsigned long long best = ~0ull;
      for (int64_t j = lane; j < C; j += 32) {
        const unsigned long long key = static_cast<unsigned long long>(row[j]) << 32 | static_cast<uint32_t>(j);
        best = row[j] == kTaken ? best : min_of(best, key);
      }
#pragma unroll
      for (int o = 16; o > 0; o /= 2) best = min_of(best, __shfl_xor_sync(0xffffffffu, best, o));
      const int64_t j = static_cast<int64_t>(best & 0xffffffffull);
      __syncwarp();
      if (lane == 0) {
        out[pick] = static_cast<int32_t>(j);
        row[j] = kTaken;
      }
      __syncwarp();
    }
  }
}

// grid (C, B*H), kThreads threads; dynamic shared memory: m candidate rows of D floats, their
// indices, and per warp kPointsPerWarp staged point rows of D floats.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    assign_kernel(PointsView pts, const float* __restrict__ centroids, int64_t C, int m,
                  const int32_t* __restrict__ lists, const int32_t* __restrict__ order,
                  const int32_t* __restrict__ offsets, int32_t* __restrict__ labels, int64_t l_stride_b,
                  int64_t l_stride_h) {
  extern __shared__ float assign_smem[];
  const int64_t D = pts.D;
  float* rows = assign_smem;                                  // [m][D], ascending index
  int32_t* index = reinterpret_cast<int32_t*>(rows + m * D);  // [m]
  float* staged = reinterpret_cast<float*>(index + m);        // [kWarps][kPointsPerWarp][D]
  const int64_t bh = blockIdx.y, a = blockIdx.x;
  const int64_t b = bh / pts.H, h = bh % pts.H;
  const int32_t begin = offsets[bh * (C + 1) + a], end = offsets[bh * (C + 1) + a + 1];
  if (begin >= end) return;
  // a's list sorted by index: entries are distinct, so each one's rank is the count of smaller ones.
  const int32_t* list = lists + (bh * C + a) * m;
  for (int t = threadIdx.x; t < m; t += kThreads) {
    const int32_t c = list[t];
    int rank = 0;
    for (int u = 0; u < m; ++u) rank += list[u] < c;
    index[rank] = c;
  }
  __syncthreads();
  const float* cent = centroids + bh * C * D;
  for (int64_t t = threadIdx.x; t < m * D; t += kThreads)
    rows[t] = cent[static_cast<int64_t>(index[t / D]) * D + t % D];
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / kLanesPerPoint, sub = lane % kLanesPerPoint;
  float* mine = staged + (warp * kPointsPerWarp) * D;
  const T* base = static_cast<const T*>(pts.data) + b * pts.stride[0] + h * pts.stride[1];
  const int32_t* sorted = order + bh * pts.N;
  // The warp's trip count is uniform (the distance's shuffles need every lane).
  for (int32_t first = begin + warp * kPointsPerWarp; first < end; first += kWarps * kPointsPerWarp) {
    const int points = min_of<int32_t>(kPointsPerWarp, end - first);
    __syncwarp();
    for (int64_t t = lane; t < kPointsPerWarp * D; t += 32) {
      const int p = static_cast<int>(t / D);
      const int64_t d = t % D;
      mine[t] =
          p < points ? to_f32(base[static_cast<int64_t>(sorted[first + p]) * pts.stride[2] + d * pts.stride[3]]) : 0.0f;
    }
    __syncwarp();
    const float* x = mine + group * D;
    float best = INFINITY;
    int32_t arg = index[0];
    for (int r = 0; r < m; ++r) {
      const float* c = rows + r * D;
      const float d = exact_squared_distance_lanes<kLanesPerPoint>([x](int64_t e) { return x[e]; },
                                                                   [c](int64_t e) { return c[e]; }, D, sub);
      if (d < best) {  // strict, in ascending index: ties keep the lower index
        best = d;
        arg = index[r];
      }
    }
    if (group < points && sub == 0) labels[b * l_stride_b + h * l_stride_h + sorted[first + group]] = arg;
  }
}

size_t assign_smem_bytes(int m, int64_t D) {
  return sizeof(float) * static_cast<size_t>(m) * static_cast<size_t>(D) + sizeof(int32_t) * static_cast<size_t>(m) +
         sizeof(float) * static_cast<size_t>(kWarps * kPointsPerWarp) * static_cast<size_t>(D);
}

}  // namespace

size_t kmeans_assign_candidates_workspace_bytes(int64_t batch_heads, int64_t points, int64_t clusters, int candidates) {
  const int64_t C = std::max<int64_t>(clusters, 1);
  if (candidates >= C) return 0;  // the exact kmeans_assign
  Carver carver("kmeans_assign_candidates");
  carve_candidates(carver, batch_heads, points, C, candidates);
  return carver.used();
}

void kmeans_assign_candidates(const TensorView& points, const TensorView& centroids, const TensorView& prev_labels,
                              TensorView labels, int candidates, const Stream& stream, Workspace workspace) {
  const DeviceGuard guard(stream.device);
  const PointsView pts = points_view(points);
  const int64_t BH = pts.B * pts.H, C = centroids.shape[2], D = pts.D;
  if (candidates >= C) {  // every centroid a candidate: kmeans_assign's labels (the exact kernel)
    kmeans_assign(points, centroids, labels, stream);
    return;
  }
  const int m = candidates;
  Carver carver("kmeans_assign_candidates", workspace);
  const CandidateScratch s = carve_candidates(carver, BH, pts.N, C, m);
  carver.check();
  if (BH == 0) return;
  SAPATTN_CHECK(BH <= 65535, UnsupportedError, "kmeans_assign_candidates on CUDA takes at most 65535 (b,h) pairs");
  const int sources = sources_per_block(C);
  const size_t list_smem = sizeof(float) * static_cast<size_t>(sources) * static_cast<size_t>(D) +
                           sizeof(uint32_t) * static_cast<size_t>(sources) * static_cast<size_t>(C);
  SAPATTN_CHECK(list_smem <= kMaxSmemBytes, UnsupportedError, "kmeans_assign_candidates on CUDA: ", C,
                " clusters of head dim ", D, " need ", list_smem,
                " bytes of shared memory for the candidate lists (at most ", kMaxSmemBytes, ")");
  const size_t smem = assign_smem_bytes(m, D);
  SAPATTN_CHECK(smem <= kMaxSmemBytes, UnsupportedError, "kmeans_assign_candidates on CUDA: ", m,
                " candidates of head dim ", D, " need ", smem, " bytes of shared memory (at most ", kMaxSmemBytes,
                "); ask for fewer candidates");
  const cudaStream_t st = stream_of(stream);
  const bool checked = begin_value_check(stream);
  const float* cent = static_cast<const float*>(centroids.data);

  set_max_dynamic_smem(reinterpret_cast<const void*>(lists_kernel), static_cast<int>(list_smem));
  lists_kernel<<<dim3(static_cast<unsigned>(ceil_div(C, sources)), static_cast<unsigned>(BH)), kThreads, list_smem,
                 st>>>(cent, C, D, m, sources, s.lists);
  SAPATTN_CUDA_CHECK_LAUNCH();

  const LabelsView prev{
      static_cast<const int32_t*>(prev_labels.data), prev_labels.stride[0], prev_labels.stride[1], pts.B, pts.H, pts.N};
  sort_by_label(s.sort, prev, st);  // a label outside [0, C) raises kBadLabel; its point is not assigned
  label_offsets(s.sort, s.offsets, nullptr, st);

  dispatch_float(points.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto kernel = assign_kernel<T>;
    set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), static_cast<int>(smem));
    kernel<<<dim3(static_cast<unsigned>(C), static_cast<unsigned>(BH)), kThreads, smem, st>>>(
        pts, cent, C, m, s.lists, s.sort.index_out, s.offsets, static_cast<int32_t*>(labels.data), labels.stride[0],
        labels.stride[1]);
    SAPATTN_CUDA_CHECK_LAUNCH();
  });
  if (checked) end_value_check(stream, "kmeans_assign_candidates");
}

}  // namespace sapattn::cuda
