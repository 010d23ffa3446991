// Greedy k-means++ seeding on the GPU (kmeans_seed_greedy, include/sapattn/ops.hpp): kmeans_init's
// key sort (kmeans.cu), then the C - 1 dependent steps on the first M points of the order, by one of
// two kernels that seed_kernel() chooses (one function answers "which kernel?" for the op, the tests
// and the benchmark):
//   - the cluster kernel (seed_cluster.cu, sm_90): a thread-block cluster of CTAs per (b,h), the
//     sample in shared memory, a tensor-core screen that leaves few exact distances per step;
//   - the block kernel (below; sm_80, shapes whose sample does not fit 8 CTAs' shared memory, and the
//     knob "block"): one block per (b,h).
// Both are the CPU backend's arithmetic bit for bit: the same fp32 distances (exact_distance.cuh), the
// same draws and 64-bit fixed-point sums (core/kmeans_seeding.hpp), so all three pick the same points;
// the integer sums are exact, so the order in which threads add them does not matter.
//
// Block kernel: thread k owns the contiguous points [k * chunk, (k + 1) * chunk) of the sample and
// their current distance D2 (global workspace, read only by its owner). A step: a block scan of the
// owners' fixed-point sums gives the total Q and each chunk's offset; the thread whose range holds a
// trial's target walks its chunk to the candidate; the T candidate rows go to shared memory; each
// thread adds its points' q(min(D2, distance to a candidate)) into one shared 64-bit counter per
// trial; every thread reads the smallest, and updates its D2. Measured 1,350 ms at Wan 14B's keys
// (docs/cuda.md): 40 blocks on 132 SMs, each reading the sample from global memory T + 1 times a step.
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cstdlib>
#include <cstring>

#include "core/kmeans_seeding.hpp"
#include "cuda/kmeans/exact_distance.cuh"
#include "cuda/kmeans/kmeans_internal.hpp"
#include "cuda/kmeans/seed_cluster.hpp"
#include "cuda/kmeans/seed_screen.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda {

namespace {

constexpr int kSeedThreads = 256;
constexpr int kMaxTrials = kSeedMaxTrials;
constexpr int kTrialsPerPass = 8;  // candidates whose sums a thread keeps in registers at once (C <= 1096: one pass)

struct SeedParams : SeedProblem {
  float* dist = nullptr;  // [B*H, M] workspace: D2 of each sample point
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

// ---------------------------------------------------------------------------------------------
// Kernel choice
// ---------------------------------------------------------------------------------------------

// The knob: kind + 16 * forced CTAs per head (0: the default count); -1 until the environment is read.
enum Kind : int { kAuto = 0, kBlock = 1, kCluster = 2, kUnscreened = 3 };
std::atomic<int> g_seed_choice{-1};

int parse_seed_choice(const char* name) {
  if (name == nullptr || name[0] == '\0') return kAuto;
  if (std::strcmp(name, "block") == 0) return kBlock;
  for (const auto& [prefix, kind] : {std::pair{"cluster", kCluster}, std::pair{"unscreened", kUnscreened}}) {
    const size_t n = std::strlen(prefix);
    if (std::strncmp(name, prefix, n) != 0) continue;
    if (name[n] == '\0') return kind;
    if (name[n] != ':') break;
    char* end = nullptr;
    const long ctas = std::strtol(name + n + 1, &end, 10);
    if (end != name + n + 1 && *end == '\0' && ctas >= 1 && ctas <= kSeedMaxClusterCtas)
      return kind + 16 * static_cast<int>(ctas);
    break;
  }
  SAPATTN_THROW(InvalidArgumentError, "unknown kmeans_seed_greedy kernel '", name,
                "' (expected \"block\", \"cluster\", \"cluster:K\", \"unscreened\" or \"unscreened:K\" with 1 <= K <= ",
                kSeedMaxClusterCtas, ", or \"\")");
}

int seed_choice() { return knob_value(g_seed_choice, "SAPATTN_KMEANS_SEED", parse_seed_choice); }

// Below this many sample points per CTA a further CTA shortens a step less than its share of the
// cluster's exchanges costs (a guess: 8 of the screen's 16-row tiles).
constexpr int64_t kMinPointsPerCta = 128;

}  // namespace

SeedKernel seed_kernel(int device, int64_t batch_heads, int64_t sample, int64_t clusters, int64_t dim, DType dtype) {
  const int choice = seed_choice(), kind = choice % 16, forced_ctas = choice / 16;
  const int trials = seeding::greedy_trials(std::max<int64_t>(clusters, 1));
  SeedKernel k;
  k.smem = sizeof(float) * static_cast<size_t>(trials) * static_cast<size_t>(std::max<int64_t>(dim, 0));
  if (kind == kBlock || sample < 1 || dim < 1) return k;
  const bool forced = kind != kAuto;
  const DeviceArch arch = device_arch(device);
  const bool screened = dtype != DType::F32 && kind != kUnscreened && dim <= screen::kMaxDim;
  cudaFuncAttributes attr{};
  if (arch.major >= 9) attr = seed_cluster_attributes(dtype, screened);
  SAPATTN_CHECK(attr.ptxVersion >= 90 || !forced, UnsupportedError,
                "kmeans_seed_greedy's cluster kernel needs an sm_90 GPU and sm_90 code in this build (cuda:", device,
                " is sm_", arch.major, arch.minor, ")");
  if (attr.ptxVersion < 90) return k;
  int optin = 0;
  SAPATTN_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int elem = static_cast<int>(dtype_size(dtype));
  auto layout = [&](int ctas) {
    return seed_cluster_layout(ceil_div(sample, ctas), dim, elem, trials, ctas, screened);
  };
  auto fits = [&](int ctas) {
    return ceil_div(sample, ctas) <= 65535 && layout(ctas).bytes + attr.sharedSizeBytes <= static_cast<size_t>(optin);
  };
  int ctas = forced_ctas;
  if (ctas > 0) {
    SAPATTN_CHECK(fits(ctas), UnsupportedError, "kmeans_seed_greedy's cluster kernel: ", sample, " points of D = ", dim,
                  " do not fit the shared memory of ", ctas, " CTAs");
  } else {
    // The fewest CTAs whose shares fit; more while every head still gets its SMs at one CTA per SM
    // (Wan 14B: 40 heads on 132 SMs take 3) and each CTA keeps kMinPointsPerCta points.
    int fewest = 1;
    while (fewest <= kSeedMaxClusterCtas && !fits(fewest)) ++fewest;
    SAPATTN_CHECK(fewest <= kSeedMaxClusterCtas || !forced, UnsupportedError,
                  "kmeans_seed_greedy's cluster kernel: ", sample, " points of D = ", dim,
                  " do not fit the shared memory of ", kSeedMaxClusterCtas, " CTAs");
    if (fewest > kSeedMaxClusterCtas) return k;
    const int64_t per_head = std::max<int64_t>(1, arch.sms / std::max<int64_t>(batch_heads, 1));
    const int64_t useful = ceil_div(sample, kMinPointsPerCta);
    ctas = static_cast<int>(std::max<int64_t>(fewest, std::min({per_head, useful, int64_t{kSeedMaxClusterCtas}})));
  }
  k.cluster = true;
  k.screen = screened;
  k.ctas = ctas;
  k.smem = layout(ctas).bytes;
  return k;
}

void set_seed_kernel_override(const char* name) { g_seed_choice.store(parse_seed_choice(name)); }

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
  const int64_t M = std::min(N, sample_factor * C);
  const int trials = seeding::greedy_trials(C);
  SAPATTN_CHECK(trials <= kMaxTrials, UnsupportedError, "kmeans_seed_greedy on CUDA takes fewer than 2^31 clusters");
  const SeedKernel k = C < N ? seed_kernel(stream.device.index, BH, M, C, pts.D, points.dtype) : SeedKernel{};
  // 96 KB fits every GPU from sm_80 on (A100: 163 KB per block); D = 128 needs 4 KB at C = 1000.
  SAPATTN_CHECK(k.cluster || k.smem <= 96 * 1024, UnsupportedError, "kmeans_seed_greedy on CUDA keeps ", trials,
                " candidate rows of the head dim in shared memory: D = ", pts.D, " is too large");
  const cudaStream_t st = stream_of(stream);
  const int32_t* ids = static_cast<const int32_t*>(sample_ids.data);
  sort_sample(s.sort, seed, BH, N, ids, st);
  if (C >= N) {  // every point is a centroid: kmeans_init's
    gather_sample(points, s.sort.index_out, centroids, st);
    return;
  }
  SeedProblem problem;
  problem.pts = pts;
  problem.order = s.sort.index_out;
  problem.sample_ids = ids;
  problem.centroids = static_cast<float*>(centroids.data);
  problem.seed = seed;
  problem.M = M;
  problem.C = C;
  problem.trials = trials;
  problem.bits = seeding::sample_bits(M);
  if (k.cluster) {
    SeedClusterParams p{problem};
    p.per_cta = static_cast<int>(ceil_div(M, k.ctas));
    p.layout =
        seed_cluster_layout(p.per_cta, pts.D, static_cast<int>(dtype_size(points.dtype)), trials, k.ctas, k.screen);
    launch_seed_cluster(p, points.dtype, k.screen, k.ctas, BH, st);
    return;
  }
  SeedParams p{problem};
  p.dist = s.dist;
  dispatch_float(points.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto kernel = greedy_seed_kernel<T>;
    set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), static_cast<int>(k.smem));
    kernel<<<static_cast<unsigned>(BH), kSeedThreads, k.smem, st>>>(p);
    SAPATTN_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace sapattn::cuda
