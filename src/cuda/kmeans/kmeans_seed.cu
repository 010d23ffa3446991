// Greedy k-means++ seeding on the GPU (kmeans_seed_greedy, include/sapattn/ops.hpp): kmeans_init's
// key sort (kmeans.cu), then one block per (b,h) running the C - 1 dependent steps on the first M
// points of the order. The CPU backend's arithmetic bit for bit: the same fp32 distances
// (exact_distance.cuh), the same draws and 64-bit fixed-point sums (core/kmeans_seeding.hpp), so
// both backends pick the same points; the integer sums are exact, so the order in which the block's
// threads add them does not matter.
//
// Within a block, thread k owns the contiguous points [k * chunk, (k + 1) * chunk) of the sample
// and their current distance D2 (global workspace, read only by its owner). A step: a block scan of
// the owners' fixed-point sums gives the total Q and each chunk's offset; the thread whose range
// holds a trial's target walks its chunk to the candidate; the T candidate rows go to shared memory;
// each thread adds its points' q(min(D2, distance to a candidate)) into one shared 64-bit counter per
// trial; every thread reads the smallest, and updates its D2. Correctness first: one block per
// problem leaves most SMs idle at B*H = 40 (docs/cuda.md says what a cluster would add).
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cfloat>

#include "core/kmeans_seeding.hpp"
#include "cuda/runtime/device.cuh"
#include "cuda/kmeans/exact_distance.cuh"
#include "cuda/kmeans/kmeans_internal.hpp"

namespace sapattn::cuda {

namespace {

constexpr int kSeedThreads = 256;
constexpr int kMaxTrials = 32;     // 2 + floor(ln C) <= 23 for C < 2^31
constexpr int kTrialsPerPass = 8;  // candidates whose sums a thread keeps in registers at once (C <= 1096: one pass)

struct SeedParams {
  PointsView pts;
  const int32_t* order = nullptr;       // [B*H, N]: kmeans_init's order; the sample is its first M entries
  const int32_t* sample_ids = nullptr;  // [B*H] or null
  float* dist = nullptr;                // [B*H, M] workspace: D2 of each sample point
  float* centroids = nullptr;           // [B*H, C, D]
  uint64_t seed = 0;
  int64_t M = 0, C = 0;
  int trials = 0;
  int bits = 0;  // seeding::sample_bits(M)
};

// Row of a point with element stride `stride`, read as fp32.
template <typename T>
struct StridedRow {
  const T* x;
  int64_t stride;
  __device__ float operator()(int64_t d) const { return to_f32(x[d * stride]); }
};

// One block per (b,h), at most a few per SM: minBlocks = 1 lets ptxas keep the 8 trial sums and the
// distance's 8 partial sums in registers (117-128 of them; a bare __launch_bounds__(256) made it cap
// at 64-80 and spill on sm_80 and sm_90a).
template <typename T>
__global__ void __launch_bounds__(kSeedThreads, 1) greedy_seed_kernel(SeedParams p) {
  using namespace seeding;
  using Scan = cub::BlockScan<unsigned long long, kSeedThreads>;  // integer sums: exact in any order
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ unsigned long long target[kMaxTrials], potential[kMaxTrials];
  __shared__ int64_t candidate[kMaxTrials];
  __shared__ unsigned int max_bits;
  extern __shared__ float candidate_rows[];  // [trials, D]

  const PointsView& pts = p.pts;
  const int64_t bh = blockIdx.x, b = bh / pts.H, h = bh % pts.H, D = pts.D, M = p.M;
  const T* base = static_cast<const T*>(pts.data) + b * pts.stride[0] + h * pts.stride[1];
  const int32_t* order = p.order + bh * pts.N;
  float* d2 = p.dist + bh * M;
  float* out = p.centroids + bh * p.C * D;
  const uint64_t id =
      p.sample_ids != nullptr ? static_cast<uint64_t>(max(p.sample_ids[bh], 0)) : static_cast<uint64_t>(bh);
  const int tid = threadIdx.x;
  const int64_t chunk = (M + kSeedThreads - 1) / kSeedThreads;
  const int64_t lo = min_of<int64_t>(M, tid * chunk), hi = min_of<int64_t>(M, lo + chunk);
  // Sample point i as fp32 (an exact conversion, as the CPU's load_row), and its distance to a row.
  const int64_t ds = pts.stride[3];
  auto point = [=](int64_t i) { return StridedRow<T>{base + static_cast<int64_t>(order[i]) * pts.stride[2], ds}; };
  auto distance = [=](int64_t i, const float* row) { return exact_squared_distance(point(i), row, D); };

  // Centroid 0: sample point 0. The unit 2^E from the largest finite distance to it.
  for (int64_t d = tid; d < D; d += kSeedThreads) out[d] = candidate_rows[d] = point(0)(d);
  if (tid == 0) max_bits = 0;
  __syncthreads();
  float largest = 0.0f;
  for (int64_t i = lo; i < hi; ++i) {
    const float d = distance(i, candidate_rows);
    d2[i] = d;
    if (d <= FLT_MAX && d > largest) largest = d;
  }
  atomicMax(&max_bits, __float_as_uint(largest));  // non-negative floats order as their bits
  __syncthreads();
  const int exponent = fixed_point_exponent(__uint_as_float(max_bits), p.bits);

  for (int64_t step = 1; step < p.C; ++step) {
    // Q and each chunk's offset in the running sums of q(D2).
    unsigned long long own = 0, before = 0, total = 0;
    for (int64_t i = lo; i < hi; ++i) own += to_fixed(d2[i], exponent, p.bits);
    Scan(scan_storage).ExclusiveSum(own, before, total);
    if (tid < p.trials) {
      target[tid] = draw_target(total, draw(p.seed, id, static_cast<uint64_t>(step), static_cast<uint64_t>(tid)));
      candidate[tid] = M - 1;  // Q = 0: no running sum exceeds the target
      potential[tid] = 0;
    }
    __syncthreads();
    // The candidate of a target: the first point whose running sum exceeds it, in one chunk.
    for (int t = 0; t < p.trials; ++t) {
      const unsigned long long goal = target[t];
      if (before <= goal && goal < before + own) {
        unsigned long long running = before;
        for (int64_t i = lo; i < hi; ++i) {
          running += to_fixed(d2[i], exponent, p.bits);
          if (running > goal) {
            candidate[t] = i;
            break;
          }
        }
      }
    }
    __syncthreads();
    for (int64_t e = tid; e < p.trials * D; e += kSeedThreads) candidate_rows[e] = point(candidate[e / D])(e % D);
    __syncthreads();
    // Each trial's potential: integer sums, the same in any order.
    for (int t0 = 0; t0 < p.trials; t0 += kTrialsPerPass) {
      unsigned long long sum[kTrialsPerPass];
#pragma unroll
      for (int u = 0; u < kTrialsPerPass; ++u) sum[u] = 0;
      for (int64_t i = lo; i < hi; ++i) {
        const float current = d2[i];
#pragma unroll
        for (int u = 0; u < kTrialsPerPass; ++u)
          if (t0 + u < p.trials)
            sum[u] += to_fixed(min_distance(current, distance(i, candidate_rows + (t0 + u) * D)), exponent, p.bits);
      }
#pragma unroll
      for (int u = 0; u < kTrialsPerPass; ++u)
        if (t0 + u < p.trials && sum[u] != 0) atomicAdd(&potential[t0 + u], sum[u]);
    }
    __syncthreads();
    int best = 0;  // the smallest potential; ties keep the lower trial
    for (int t = 1; t < p.trials; ++t)
      if (potential[t] < potential[best]) best = t;
    const float* chosen = candidate_rows + best * D;
    for (int64_t i = lo; i < hi; ++i) d2[i] = min_distance(d2[i], distance(i, chosen));
    for (int64_t d = tid; d < D; d += kSeedThreads) out[step * D + d] = chosen[d];
    __syncthreads();  // scan_storage, candidate_rows, candidate and potential are reused by the next step
  }
}

struct SeedScratch {
  SampleSort sort;
  float* dist = nullptr;  // [B*H, M]
};

SeedScratch carve_seed(Carver& carver, int64_t batch_heads, int64_t points, int64_t clusters, int sample_factor) {
  SeedScratch s;
  s.sort = carve_sample_sort(carver, batch_heads, points);
  if (clusters < points) s.dist = carver.take<float>(batch_heads * std::min(points, sample_factor * clusters));
  return s;
}

}  // namespace

size_t kmeans_seed_greedy_workspace_bytes(int64_t batch_heads, int64_t points, int64_t clusters, int sample_factor) {
  Carver carver("kmeans_seed_greedy");
  carve_seed(carver, batch_heads, points, clusters, sample_factor);
  return carver.used();
}

void kmeans_seed_greedy(const TensorView& points, TensorView centroids, uint64_t seed, int sample_factor,
                        const Stream& stream, Workspace workspace, const TensorView& sample_ids) {
  const PointsView pts = points_view(points);
  const int64_t BH = pts.B * pts.H, N = pts.N, C = centroids.shape[2];
  const DeviceGuard guard(stream.device);
  Carver carver("kmeans_seed_greedy", workspace);
  const SeedScratch s = carve_seed(carver, BH, N, C, sample_factor);
  carver.check();
  if (BH * N == 0) return;
  SAPATTN_CHECK(BH <= 65535, UnsupportedError, "k-means on CUDA takes at most 65535 (b,h) pairs");
  const cudaStream_t st = stream_of(stream);
  const int32_t* ids = static_cast<const int32_t*>(sample_ids.data);
  sort_sample(s.sort, seed, BH, N, ids, st);
  if (C >= N) {  // every point is a centroid: kmeans_init's
    gather_sample(points, s.sort.index_out, centroids, st);
    return;
  }
  SeedParams p;
  p.pts = pts;
  p.order = s.sort.index_out;
  p.sample_ids = ids;
  p.dist = s.dist;
  p.centroids = static_cast<float*>(centroids.data);
  p.seed = seed;
  p.M = std::min(N, sample_factor * C);
  p.C = C;
  p.trials = seeding::greedy_trials(C);
  p.bits = seeding::sample_bits(p.M);
  SAPATTN_CHECK(p.trials <= kMaxTrials, UnsupportedError, "kmeans_seed_greedy on CUDA takes fewer than 2^31 clusters");
  const size_t smem = sizeof(float) * static_cast<size_t>(p.trials) * static_cast<size_t>(pts.D);
  // 96 KB fits every GPU from sm_80 on (A100: 163 KB per block); D = 128 needs 4 KB at C = 1000.
  SAPATTN_CHECK(smem <= 96 * 1024, UnsupportedError, "kmeans_seed_greedy on CUDA keeps ", p.trials,
                " candidate rows of the head dim in shared memory: D = ", pts.D, " is too large");
  dispatch_float(points.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto kernel = greedy_seed_kernel<T>;
    set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), static_cast<int>(smem));
    kernel<<<static_cast<unsigned>(BH), kSeedThreads, smem, st>>>(p);
    SAPATTN_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace sapattn::cuda
