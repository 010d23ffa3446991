// k-means on the GPU, batched over (b,h): the seeded initial sample, the centroid preparation for
// the tensor-core assignment, the exact fp32 assignment (any head dim), the update (a stable sort by
// label, then one block per cluster summing its points in fp64), and the Lloyd loop. Nothing here
// synchronises the host: `kmeans` is a fixed sequence of launches on the caller's stream.
#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <bit>

#include "core/splitmix64.hpp"
#include "cuda/kmeans/exact_distance.cuh"
#include "cuda/kmeans/kmeans_internal.hpp"
#include "cuda/permute/label_sort.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda {

namespace {

constexpr int kThreads = 256;

LabelsView labels_view(const TensorView& t) {
  return {static_cast<const int32_t*>(t.data), t.stride[0], t.stride[1], t.shape[0], t.shape[1], t.shape[2]};
}

// ---------------------------------------------------------------------------------------------
// Scratch
// ---------------------------------------------------------------------------------------------

struct KmeansScratch {
  void* operand = nullptr;     // [B*H, rows, D] operand dtype (2 bytes); each call uses [B*H, C_pad, D]
  float* half_norm = nullptr;  // [B*H, rows]
  int32_t* stats = nullptr;    // [B*H, 2]
  int64_t rows = 0;            // prepared_rows(C): room for the padding of either assignment kernel
  LabelSort sort;
  int32_t* offsets = nullptr;  // [B*H, C+1]
};

KmeansScratch carve_kmeans(Carver& carver, int64_t batch_heads, int64_t points, int64_t clusters, int64_t dim) {
  KmeansScratch s;
  if (tensor_core_assign(dim)) {
    s.rows = prepared_rows(clusters);
    s.operand = carver.take<uint16_t>(batch_heads * s.rows * dim);
    s.half_norm = carver.take<float>(batch_heads * s.rows);
    s.stats = carver.take<int32_t>(batch_heads * 2);
  }
  s.sort = carve_label_sort(carver, batch_heads, points, clusters);
  s.offsets = carver.take<int32_t>(batch_heads * (clusters + 1));
  return s;
}

// ---------------------------------------------------------------------------------------------
// Initial sample
// ---------------------------------------------------------------------------------------------

// sample_ids: [B*H] or null (then the id of (b,h) is b*H + h); ids are >= 0 by the op's contract
// (the CPU checks it; here a negative id is read as 0).
__global__ void init_keys_kernel(uint64_t seed, int64_t batch_heads, int64_t N, const int32_t* __restrict__ sample_ids,
                                 uint64_t* __restrict__ keys, int32_t* __restrict__ index,
                                 int32_t* __restrict__ segments) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t <= batch_heads) segments[t] = static_cast<int32_t>(t * N);
  if (t >= batch_heads * N) return;
  const int64_t bh = t / N;
  const uint64_t id = sample_ids != nullptr ? static_cast<uint64_t>(max(sample_ids[bh], 0)) : static_cast<uint64_t>(bh);
  const uint64_t i = static_cast<uint64_t>(t % N);
  keys[t] = splitmix64(seed ^ splitmix64((id << 32) + i));
  index[t] = static_cast<int32_t>(i);
}

// centroid c of (b,h) = the point of sample rank c mod N.
template <typename T>
__global__ void init_gather_kernel(PointsView pts, const int32_t* __restrict__ order, int64_t C,
                                   float* __restrict__ centroids) {
  const int64_t bh = blockIdx.y;
  const int64_t b = bh / pts.H, h = bh % pts.H;
  const T* base = static_cast<const T*>(pts.data) + b * pts.stride[0] + h * pts.stride[1];
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < C * pts.D;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = t / pts.D, d = t % pts.D;
    const int64_t src = order[bh * pts.N + c % pts.N];
    centroids[bh * C * pts.D + t] = to_f32(base[src * pts.stride[2] + d * pts.stride[3]]);
  }
}

}  // namespace

SampleSort carve_sample_sort(Carver& carver, int64_t batch_heads, int64_t points) {
  SampleSort s;
  const int64_t items = batch_heads * points;
  SAPATTN_CHECK(items < (int64_t{1} << 31), UnsupportedError,
                "kmeans_init and kmeans_seed_greedy on CUDA sample from fewer than 2^31 points in all, got ",
                batch_heads, " x ", points);
  s.keys_in = carver.take<uint64_t>(items);
  s.keys_out = carver.take<uint64_t>(items);
  s.index_in = carver.take<int32_t>(items);
  s.index_out = carver.take<int32_t>(items);
  s.segments = carver.take<int32_t>(batch_heads + 1);
  SAPATTN_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairs(
      nullptr, s.temp_bytes, s.keys_in, s.keys_out, s.index_in, s.index_out, static_cast<int>(items),
      static_cast<int>(batch_heads), s.segments, s.segments + 1, 0, 64));
  s.temp = carver.take_bytes(s.temp_bytes);
  return s;
}

void sort_sample(const SampleSort& s, uint64_t seed, int64_t batch_heads, int64_t points, const int32_t* sample_ids,
                 cudaStream_t stream) {
  init_keys_kernel<<<static_cast<unsigned>(ceil_div(batch_heads * points + 1, kThreads)), kThreads, 0, stream>>>(
      seed, batch_heads, points, sample_ids, s.keys_in, s.index_in, s.segments);
  SAPATTN_CUDA_CHECK_LAUNCH();
  size_t temp_bytes = s.temp_bytes;
  SAPATTN_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairs(
      s.temp, temp_bytes, s.keys_in, s.keys_out, s.index_in, s.index_out, static_cast<int>(batch_heads * points),
      static_cast<int>(batch_heads), s.segments, s.segments + 1, 0, 64, stream));
}

void gather_sample(const TensorView& points, const int32_t* order, TensorView centroids, cudaStream_t stream) {
  const PointsView pts = points_view(points);
  const int64_t BH = pts.B * pts.H, C = centroids.shape[2];
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(C * pts.D, kThreads), 1024)),
                  static_cast<unsigned>(BH));
  dispatch_float(points.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    init_gather_kernel<T><<<grid, kThreads, 0, stream>>>(pts, order, C, static_cast<float*>(centroids.data));
    SAPATTN_CUDA_CHECK_LAUNCH();
  });
}

namespace {

// ---------------------------------------------------------------------------------------------
// Centroid preparation for the tensor-core assignment: one warp per centroid row.
// ---------------------------------------------------------------------------------------------

template <typename OpT, int D>
__global__ void prepare_kernel(const float* __restrict__ centroids, int64_t C, int64_t c_pad, OpT* __restrict__ operand,
                               float* __restrict__ half_norm, int32_t* __restrict__ stats) {
  constexpr int kPerLane = D / 32;
  const int64_t bh = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + warp;
  if (c >= c_pad) return;
  OpT* out = operand + (bh * c_pad + c) * D + lane * kPerLane;
  if (c >= C) {  // padding: zero operands, +inf norm, so no row ever picks it
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) out[e] = from_f32<OpT>(0.0f);
    if (lane == 0) half_norm[bh * c_pad + c] = INFINITY;
    return;
  }
  const float* in = centroids + (bh * C + c) * D + lane * kPerLane;
  float norm2 = 0.0f, resid2 = 0.0f;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const float v = in[e];
    const OpT r = from_f32<OpT>(-v);
    out[e] = r;
    const float diff = v + to_f32(r);  // v - round(v), exact in fp32
    norm2 = fmaf(v, v, norm2);
    resid2 = fmaf(diff, diff, resid2);
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    norm2 += __shfl_xor_sync(0xffffffffu, norm2, o);
    resid2 += __shfl_xor_sync(0xffffffffu, resid2, o);
  }
  if (lane == 0) {
    half_norm[bh * c_pad + c] = 0.5f * norm2;
    // Non-negative floats order like their bits: an integer max is a float max. Round the fp32
    // values up a little, so that the bound stays a bound despite their own rounding.
    atomicMax(&stats[bh * 2 + 0], __float_as_int(norm2 * (1.0f + 0x1p-20f)));
    atomicMax(&stats[bh * 2 + 1], __float_as_int(sqrtf(resid2) * (1.0f + 0x1p-20f)));
  }
}

// Writes the prepared centroids padded to c_pad rows (<= s.rows), as the chosen kernel reads them.
template <int D>
void prepare_centroids(const TensorView& centroids, DType points_dtype, const KmeansScratch& s, int64_t c_pad,
                       cudaStream_t stream) {
  const int64_t BH = centroids.shape[0] * centroids.shape[1], C = centroids.shape[2];
  SAPATTN_CUDA_CHECK(cudaMemsetAsync(s.stats, 0, BH * 2 * sizeof(int32_t), stream));
  const dim3 grid(static_cast<unsigned>(ceil_div(c_pad, kThreads / 32)), static_cast<unsigned>(BH));
  const float* c = static_cast<const float*>(centroids.data);
  if (operand_dtype(points_dtype) == DType::F16) {
    prepare_kernel<__half, D>
        <<<grid, kThreads, 0, stream>>>(c, C, c_pad, static_cast<__half*>(s.operand), s.half_norm, s.stats);
  } else {
    prepare_kernel<__nv_bfloat16, D>
        <<<grid, kThreads, 0, stream>>>(c, C, c_pad, static_cast<__nv_bfloat16*>(s.operand), s.half_norm, s.stats);
  }
  SAPATTN_CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------
// Exact fp32 assignment (any head dim): the CPU reference's arithmetic, bit for bit
// (exact_distance.cuh).
// One warp per block, one point per lane; centroids are staged 8 at a time.
// ---------------------------------------------------------------------------------------------

constexpr int kExactPoints = 32;
constexpr int kExactCentroids = 8;

template <typename T>
__global__ void __launch_bounds__(kExactPoints)
    exact_assign_kernel(PointsView pts, const float* __restrict__ centroids, int64_t C, int32_t* __restrict__ labels,
                        int64_t l_stride_b, int64_t l_stride_h) {
  extern __shared__ float exact_smem[];
  const int64_t D = pts.D;
  float* xs = exact_smem;                           // [32][D + 1]
  float* cs = exact_smem + kExactPoints * (D + 1);  // [8][D]
  const int64_t bh = blockIdx.y, b = bh / pts.H, h = bh % pts.H;
  const int lane = threadIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kExactPoints;
  const T* base = static_cast<const T*>(pts.data) + b * pts.stride[0] + h * pts.stride[1];
  for (int64_t t = lane; t < kExactPoints * D; t += kExactPoints) {
    const int64_t r = t / D, d = t % D;
    xs[r * (D + 1) + d] = n0 + r < pts.N ? to_f32(base[(n0 + r) * pts.stride[2] + d * pts.stride[3]]) : 0.0f;
  }
  const float* x = xs + lane * (D + 1);
  const float* cent = centroids + bh * C * D;
  float best = INFINITY;
  int32_t arg = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kExactCentroids) {
    const int64_t rows = min_of<int64_t>(kExactCentroids, C - c0);
    __syncwarp();
    for (int64_t t = lane; t < rows * D; t += kExactPoints) cs[t] = cent[c0 * D + t];
    __syncwarp();
    for (int64_t r = 0; r < rows; ++r) {
      const float dist = exact_squared_distance([x](int64_t d) { return x[d]; }, cs + r * D, D);
      if (dist < best) {  // strict: ties keep the lower index
        best = dist;
        arg = static_cast<int32_t>(c0 + r);
      }
    }
  }
  if (n0 + lane < pts.N) labels[b * l_stride_b + h * l_stride_h + n0 + lane] = arg;
}

void exact_assign(const PointsView& pts, const float* centroids, int64_t C, int32_t* labels, int64_t l_stride_b,
                  int64_t l_stride_h, DType dtype, cudaStream_t stream) {
  const size_t smem = sizeof(float) * (kExactPoints * (pts.D + 1) + kExactCentroids * pts.D);
  SAPATTN_CHECK(smem <= 200 * 1024, UnsupportedError, "kmeans_assign on CUDA takes head dims up to 1400, got ", pts.D);
  const dim3 grid(static_cast<unsigned>(ceil_div(pts.N, kExactPoints)), static_cast<unsigned>(pts.B * pts.H));
  dispatch_float(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto kernel = exact_assign_kernel<T>;
    set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), static_cast<int>(smem));
    kernel<<<grid, kExactPoints, smem, stream>>>(pts, centroids, C, labels, l_stride_b, l_stride_h);
    SAPATTN_CUDA_CHECK_LAUNCH();
  });
}

// ---------------------------------------------------------------------------------------------
// Update
// ---------------------------------------------------------------------------------------------

constexpr int kMeanWarps = 4;
constexpr int kMeanDims = 256;  // dims per pass of the generic kernel: 8 per lane
constexpr int kMeanUnroll = 4;  // rows in flight per warp

// One block per (b,h, cluster). Warp w sums rows w, w + 4, ... of the cluster (in token order) in
// fp64; the four partial sums are added in warp order. Deterministic; the CPU adds the same fp64
// terms in one sequence, so the fp32 means agree except where the two fp64 sums round to fp32
// differently (at most 1 ulp, rarely).
//
// kVec > 0: unit stride along d, D = 32 * kVec and rows aligned to kVec elements: lane l owns dims
// [kVec l, kVec l + kVec) and reads them with one vector load per row, kMeanUnroll rows at a time.
template <typename T, int kVec>
__global__ void __launch_bounds__(kMeanWarps * 32)
    mean_kernel(PointsView pts, const int32_t* __restrict__ order, const int32_t* __restrict__ offsets, int64_t C,
                float* __restrict__ centroids) {
  constexpr int kDims = kVec > 0 ? 32 * kVec : kMeanDims;
  constexpr int kPerLane = kDims / 32;
  __shared__ double partial[kMeanWarps][kDims];
  const int64_t bh = blockIdx.y, c = blockIdx.x;
  const int64_t b = bh / pts.H, h = bh % pts.H;
  const int32_t begin = offsets[bh * (C + 1) + c], end = offsets[bh * (C + 1) + c + 1];
  if (end <= begin) return;  // an empty cluster keeps its centroid
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* base = static_cast<const T*>(pts.data) + b * pts.stride[0] + h * pts.stride[1];
  const int32_t* idx = order + bh * pts.N;
  const int64_t D = pts.D;
  for (int64_t d0 = 0; d0 < D; d0 += kDims) {
    double sum[kPerLane];
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) sum[e] = 0.0;
    if constexpr (kVec > 0) {
      struct alignas(kVec * sizeof(T)) Chunk {
        T v[kVec];
      };
      int32_t j = begin + warp;
      for (; j + (kMeanUnroll - 1) * kMeanWarps < end; j += kMeanUnroll * kMeanWarps) {
        Chunk chunk[kMeanUnroll];
#pragma unroll
        for (int u = 0; u < kMeanUnroll; ++u)
          chunk[u] = reinterpret_cast<const Chunk*>(base + static_cast<int64_t>(idx[j + u * kMeanWarps]) *
                                                               pts.stride[2])[lane];
#pragma unroll
        for (int u = 0; u < kMeanUnroll; ++u)
#pragma unroll
          for (int e = 0; e < kVec; ++e) sum[e] += static_cast<double>(to_f32(chunk[u].v[e]));
      }
      for (; j < end; j += kMeanWarps) {
        const Chunk chunk = reinterpret_cast<const Chunk*>(base + static_cast<int64_t>(idx[j]) * pts.stride[2])[lane];
#pragma unroll
        for (int e = 0; e < kVec; ++e) sum[e] += static_cast<double>(to_f32(chunk.v[e]));
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) partial[warp][lane * kVec + e] = sum[e];
    } else {
      // Lane l owns dims d0 + l + 32e: coalesced across the warp for unit stride.
      for (int32_t j = begin + warp; j < end; j += kMeanWarps) {
        const T* row = base + static_cast<int64_t>(idx[j]) * pts.stride[2];
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) {
          const int64_t d = d0 + lane + 32 * e;
          if (d < D) sum[e] += static_cast<double>(to_f32(row[d * pts.stride[3]]));
        }
      }
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) partial[warp][lane + 32 * e] = sum[e];
    }
    __syncthreads();
    for (int t = threadIdx.x; t < kDims && d0 + t < D; t += kMeanWarps * 32) {
      double s = partial[0][t];
      for (int w = 1; w < kMeanWarps; ++w) s += partial[w][t];
      centroids[(bh * C + c) * D + d0 + t] = static_cast<float>(s / static_cast<double>(end - begin));
    }
    __syncthreads();
  }
}

__global__ void count_kernel(LabelsView labels, int64_t C, int32_t* __restrict__ sizes, int* __restrict__ flag) {
  const int64_t bh = blockIdx.y, b = bh / labels.H, h = bh % labels.H;
  const int32_t* lab = labels.data + b * labels.stride_b + h * labels.stride_h;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < labels.N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t l = lab[i];
    if (l < 0 || l >= C) {
      atomicOr(flag, kBadLabel);
      continue;
    }
    atomicAdd(&sizes[bh * C + l], 1);
  }
}

void update(const TensorView& points, const TensorView& labels, TensorView centroids, TensorView sizes,
            bool move_centroids, const KmeansScratch& s, cudaStream_t stream) {
  const PointsView pts = points_view(points);
  const int64_t BH = pts.B * pts.H, C = centroids.shape[2];
  if (!move_centroids) {  // sizes only: a histogram, no sort
    SAPATTN_CUDA_CHECK(cudaMemsetAsync(sizes.data, 0, BH * C * sizeof(int32_t), stream));
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(pts.N, kThreads), 1024)),
                    static_cast<unsigned>(BH));
    count_kernel<<<grid, kThreads, 0, stream>>>(labels_view(labels), C, static_cast<int32_t*>(sizes.data),
                                                value_error_flag());
    SAPATTN_CUDA_CHECK_LAUNCH();
    return;
  }
  sort_by_label(s.sort, labels_view(labels), stream);
  label_offsets(s.sort, s.offsets, static_cast<int32_t*>(sizes.data), stream);
  const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(BH));
  dispatch_float(points.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t es = static_cast<int64_t>(sizeof(T));
    auto aligned = [&](int64_t vec) {  // rows readable as vectors of vec elements
      if (points.stride[3] != 1 || pts.D != 32 * vec) return false;
      if (reinterpret_cast<uintptr_t>(points.data) % (vec * es) != 0) return false;
      for (int d = 0; d < 3; ++d)
        if (points.shape[d] > 1 && points.stride[d] % vec != 0) return false;
      return true;
    };
    float* out = static_cast<float*>(centroids.data);
    if (aligned(4)) {
      mean_kernel<T, 4><<<grid, kMeanWarps * 32, 0, stream>>>(pts, s.sort.index_out, s.offsets, C, out);
    } else if (aligned(2)) {
      mean_kernel<T, 2><<<grid, kMeanWarps * 32, 0, stream>>>(pts, s.sort.index_out, s.offsets, C, out);
    } else {
      mean_kernel<T, 0><<<grid, kMeanWarps * 32, 0, stream>>>(pts, s.sort.index_out, s.offsets, C, out);
    }
    SAPATTN_CUDA_CHECK_LAUNCH();
  });
}

// Whether rows of `points` can be read as aligned 16-byte chunks of 8 elements.
bool vector_rows(const TensorView& points) {
  const int64_t es = static_cast<int64_t>(dtype_size(points.dtype));
  if (points.stride[3] != 1 || points.shape[3] % 8 != 0) return false;
  if (reinterpret_cast<uintptr_t>(points.data) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d)
    if (points.shape[d] > 1 && (points.stride[d] * es) % 16 != 0) return false;
  return true;
}

void assign(const TensorView& points, const TensorView& centroids, TensorView labels, const KmeansScratch* s,
            AssignStats stats, int device, cudaStream_t stream) {
  const PointsView pts = points_view(points);
  const int64_t C = centroids.shape[2];
  if (pts.N == 0) return;
  SAPATTN_CHECK(pts.B * pts.H <= 65535, UnsupportedError, "k-means on CUDA takes at most 65535 (b,h) pairs");
  if (s == nullptr || !tensor_core_assign(pts.D)) {
    exact_assign(pts, static_cast<const float*>(centroids.data), C, static_cast<int32_t*>(labels.data),
                 labels.stride[0], labels.stride[1], points.dtype, stream);
    return;
  }
  TensorCoreAssignParams p;
  p.points = points.data;
  for (int d = 0; d < 4; ++d) p.p_stride[d] = points.stride[d];
  p.H = pts.H;
  p.N = pts.N;
  p.C = C;
  p.vector_rows = vector_rows(points);
  const AssignPlan plan = plan_assign(device, C, pts.D, {s->operand, s->half_norm, s->stats, 0});
  p.prepared = {s->operand, s->half_norm, s->stats, plan.c_pad};
  p.centroids = static_cast<const float*>(centroids.data);
  p.labels = static_cast<int32_t*>(labels.data);
  p.l_stride_b = labels.stride[0];
  p.l_stride_h = labels.stride[1];
  p.refined = stats.d_refined_rows;
  p.index_bits = std::max(1, static_cast<int>(std::bit_width(static_cast<uint64_t>(plan.c_pad - 1))));
  p.index_mask = (1 << p.index_bits) - 1;
  SAPATTN_CHECK(p.index_bits <= 16, UnsupportedError, "the tensor-core assignment takes up to 65536 clusters, got ", C);
  const int64_t BH = pts.B * pts.H;
  auto run = [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    prepare_centroids<D>(centroids, points.dtype, *s, plan.c_pad, stream);
    if (plan.sm90) {
      launch_sm90_assign<D>(p, points.dtype, BH, plan.config, plan.num_sms, stream);
    } else {
      launch_tensor_core_assign<D>(p, points.dtype, BH, stream);
    }
  };
  switch (pts.D) {  // one case per head dim of the list; tensor_core_assign(pts.D) holds here
#define SAPATTN_ASSIGN_CASE(D)             \
  case D:                                  \
    run(std::integral_constant<int, D>{}); \
    break;
    SAPATTN_TENSOR_CORE_ASSIGN_HEAD_DIMS(SAPATTN_ASSIGN_CASE)
#undef SAPATTN_ASSIGN_CASE
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

size_t kmeans_workspace_bytes(int64_t batch_heads, int64_t points, int64_t clusters, int64_t dim) {
  Carver init("kmeans_init"), loop("kmeans");
  carve_sample_sort(init, batch_heads, points);
  carve_kmeans(loop, batch_heads, points, std::max<int64_t>(clusters, 1), dim);
  return std::max(init.used(), loop.used());
}

void kmeans_init(const TensorView& points, TensorView centroids, uint64_t seed, const Stream& stream,
                 Workspace workspace, const TensorView& sample_ids) {
  const int64_t BH = points.shape[0] * points.shape[1], N = points.shape[2];
  const DeviceGuard guard(stream.device);
  Carver carver("kmeans_init", workspace);
  const SampleSort s = carve_sample_sort(carver, BH, N);
  carver.check();
  if (BH * N == 0) return;
  SAPATTN_CHECK(BH <= 65535, UnsupportedError, "k-means on CUDA takes at most 65535 (b,h) pairs");
  const cudaStream_t st = stream_of(stream);
  sort_sample(s, seed, BH, N, static_cast<const int32_t*>(sample_ids.data), st);
  gather_sample(points, s.index_out, centroids, st);
}

void kmeans_assign(const TensorView& points, const TensorView& centroids, TensorView labels, const Stream& stream,
                   Workspace workspace, AssignStats stats) {
  const DeviceGuard guard(stream.device);
  const int64_t BH = points.shape[0] * points.shape[1];
  if (workspace.data == nullptr) {
    assign(points, centroids, labels, nullptr, stats, stream.device.index, stream_of(stream));
    return;
  }
  Carver carver("kmeans_assign", workspace);
  const KmeansScratch s = carve_kmeans(carver, BH, points.shape[2], centroids.shape[2], points.shape[3]);
  carver.check();
  assign(points, centroids, labels, &s, stats, stream.device.index, stream_of(stream));
}

void kmeans_update(const TensorView& points, const TensorView& labels, TensorView centroids, TensorView sizes,
                   bool move_centroids, const Stream& stream, Workspace workspace) {
  const DeviceGuard guard(stream.device);
  const int64_t BH = points.shape[0] * points.shape[1];
  Carver carver("kmeans_update", workspace);
  const KmeansScratch s = carve_kmeans(carver, BH, points.shape[2], centroids.shape[2], points.shape[3]);
  if (move_centroids) carver.check();
  if (BH == 0) return;
  const bool checked = begin_value_check(stream);
  update(points, labels, centroids, sizes, move_centroids, s, stream_of(stream));
  if (checked) end_value_check(stream, "kmeans_update");
}

void kmeans(const TensorView& points, TensorView centroids, TensorView labels, TensorView sizes, int iters,
            const Stream& stream, Workspace workspace, AssignStats stats) {
  const DeviceGuard guard(stream.device);
  const int64_t BH = points.shape[0] * points.shape[1];
  Carver carver("kmeans", workspace);
  const KmeansScratch s = carve_kmeans(carver, BH, points.shape[2], centroids.shape[2], points.shape[3]);
  carver.check();
  if (BH == 0) return;
  const cudaStream_t st = stream_of(stream);
  const bool checked = begin_value_check(stream);
  for (int it = 0; it < std::max(iters, 1); ++it) {
    assign(points, centroids, labels, &s, stats, stream.device.index, st);
    update(points, labels, centroids, sizes, /*move_centroids=*/iters > 0, s, st);
  }
  if (checked) end_value_check(stream, "kmeans");
}

}  // namespace sapattn::cuda
