// kmeans_seed_greedy's cluster kernel (sm_90): a thread-block cluster of K CTAs per (b,h) runs the
// C - 1 dependent steps of greedy k-means++ on the sample, each CTA holding a slice of ceil(M / K)
// sample points in shared memory. The CPU's arithmetic bit for bit, as the block kernel
// (kmeans_seed.cu): the same draws and 64-bit fixed-point sums (core/kmeans_seeding.hpp), which no
// order of addition changes, and the same fp32 distances (exact_distance.cuh).
//
// A step (after the previous step's barrier B):
//   (f) every thread reads the K CTAs' slots: the trial with the largest reduction of the potential
//       wins; each CTA's new sum of q(D2), the total Q and this CTA's offset follow. CTA 0 writes the
//       winner's row as the next centroid; each CTA applies the winner's listed distances to D2.
//   (a) barrier 1; a block scan of the q(D2) of contiguous points per thread (the live list, the points
//       with q(D2) > 0, is rebuilt on the way); the thread whose range of running sums holds a target
//       walks its points to the candidate; barrier 2.
//   (b) the owner CTA's warps write each candidate's row (and norm) into every CTA (DSMEM);
//       cluster barrier A.
//   (c) the screen (bf16 and f16 points): a warp takes 16 live points at a time against the T
//       candidates, one mma.sync m16n8k16 per 16 dimensions and 8 trials, and lists, per trial, the
//       points whose distance the bound of seed_screen.hpp cannot place at or above their D2 (the
//       others keep D2: min_distance returns it). f32 points list every live point. Barrier 3.
//   (d) the listed pairs' exact distances, 4 lanes each (exact_squared_distance_lanes); a pair that
//       lowers D2 adds q(D2) - q(d) to its trial's reduction (a shared 64-bit counter). Barrier 4.
//   (e) threads 0..T write the CTA's T reductions and its sum of q(D2) into every CTA's slots (DSMEM);
//       cluster barrier B.
// A trial's potential is Q minus its reduction summed over the CTAs, so that the best trial, the next
// Q and the CTAs' offsets come from one exchange. Candidate rows are double-buffered by step parity: a
// CTA writes a buffer again two steps later, after a barrier that every CTA passes only when it is done
// reading it; the slots are written after barrier A of the next step, when every CTA has read them.
//
// Why the screen: a step is T M distances of D terms, 3 fp32 operations each (sub, mul, add, each
// rounded: no FMA), and at Wan 14B's keys (40 heads, M = 2,000, T = 8, D = 128) that is 14,500 issue
// cycles per step on 132 SMs: 8 us, 8 ms over 1000 steps, before any synchronisation. Late in the
// seeding a candidate lowers the D2 of very few points: 0.42% of the pairs over the whole seeding on
// the generator's Wan heads (docs/cuda.md), so the exact work shrinks to a few hundred pairs per step.
// docs/cuda.md ("kmeans_seed_greedy") has the estimate of a step.
#include <cooperative_groups.h>

#include <cfloat>
#include <cub/block/block_scan.cuh>

#include "core/kmeans_seeding.hpp"
#include "cuda/kmeans/exact_distance.cuh"
#include "cuda/kmeans/seed_cluster.hpp"
#include "cuda/kmeans/seed_screen.hpp"
#include "cuda/runtime/device.cuh"
#include "cuda/runtime/primitives.cuh"

namespace sapattn::cuda {

namespace {

constexpr int kThreads = kSeedClusterThreads;

// Element e of sample row i, as fp32 (exact).
template <typename T>
__device__ __forceinline__ float row_element(const uint8_t* rows, const SeedClusterLayout& l, int i, int64_t e) {
  constexpr int kPerChunk = 16 / static_cast<int>(sizeof(T));
  const int c = static_cast<int>(e / kPerChunk), within = static_cast<int>(e % kPerChunk);
  return to_f32(
      reinterpret_cast<const T*>(rows + static_cast<int64_t>(i) * l.row_stride + l.chunk_offset(i, c))[within]);
}

// Grid (K, B*H), clusters of (K, 1, 1). Shared memory: seed_cluster_layout's regions (dynamic), and
// the per-trial values below (static). One CTA of 512 threads per SM: __launch_bounds__(512, 1) lets
// ptxas use up to 128 registers.
template <typename T, bool kScreen>
__global__ void __launch_bounds__(kThreads, 1) greedy_seed_cluster_kernel(const SeedClusterParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using namespace seeding;
  namespace cg = cooperative_groups;
  constexpr int kWarps = kThreads / 32;
  // Lanes per exact distance: 4 keep a late step's few distances short (2 of the 8 partial sums per
  // lane, 2 shuffles) and cost about twice one lane's instructions, which only the first steps pay in bulk.
  constexpr int kLanes = 4;
  constexpr int kGroupsPerWarp = 32 / kLanes;
  constexpr int kGroups = kThreads / kLanes;
  constexpr int kMaxTiles = kSeedMaxTrials / 8;  // the screen's mma tiles of 8 trials
  using Scan = cub::BlockScan<unsigned long long, kThreads, cub::BLOCK_SCAN_WARP_SCANS>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ unsigned long long target[kSeedMaxTrials], red[kSeedMaxTrials];
  __shared__ int cand_local[kSeedMaxTrials], list_count[kSeedMaxTrials];
  __shared__ float cand_norm[2][kSeedMaxTrials];
  __shared__ int live_count;
  __shared__ unsigned largest_bits;
  extern __shared__ __align__(16) uint8_t smem[];

  const cg::cluster_group cluster = cg::this_cluster();
  const int ctas = static_cast<int>(cluster.num_blocks()), me = static_cast<int>(cluster.block_rank());
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int sub = lane % kLanes, group_lane = lane / kLanes;
  const SeedClusterLayout& l = p.layout;
  const PointsView& pts = p.pts;
  const int64_t bh = blockIdx.y, D = pts.D, M = p.M;
  const int trials = p.trials, P = p.per_cta, slot_width = trials + 1;
  const int64_t first = static_cast<int64_t>(me) * P;  // this CTA's sample positions: first .. first + count - 1
  const int count = static_cast<int>(max_of<int64_t>(0, min_of<int64_t>(P, M - first)));
  const int chunks = l.row_bytes / 16;
  uint8_t* rows = smem + l.rows;
  uint8_t* cand = smem + l.cand;
  auto* d2 = reinterpret_cast<float*>(smem + l.d2);
  auto* norm = reinterpret_cast<float*>(smem + l.norm);
  auto* live = reinterpret_cast<uint16_t*>(smem + l.live);
  auto* list_p = reinterpret_cast<uint16_t*>(smem + l.list_p);
  auto* list_m = reinterpret_cast<float*>(smem + l.list_m);
  auto* slots = reinterpret_cast<unsigned long long*>(smem + l.slots);
  auto* max_bits = reinterpret_cast<unsigned*>(smem + l.max_bits);
  auto cand_row = [&](int buffer, int t) {
    return reinterpret_cast<const T*>(cand + static_cast<int64_t>(buffer * l.cand_rows + t) * l.cand_stride);
  };

  const T* base = static_cast<const T*>(pts.data) + (bh / pts.H) * pts.stride[0] + (bh % pts.H) * pts.stride[1];
  const int32_t* order = p.order + bh * pts.N;
  float* out = p.centroids + bh * p.C * D;
  const uint64_t id =
      p.sample_ids != nullptr ? static_cast<uint64_t>(max(p.sample_ids[bh], 0)) : static_cast<uint64_t>(bh);
  // 16-byte chunk c of tensor row `point` into `dst`, zero past D.
  constexpr int kPerChunk = 16 / static_cast<int>(sizeof(T));
  auto load_chunk = [&](uint8_t* dst, int64_t point, int c) {
    const T* x = base + point * pts.stride[2];
    T* to = reinterpret_cast<T*>(dst);
#pragma unroll
    for (int j = 0; j < kPerChunk; ++j) {
      const int64_t d = static_cast<int64_t>(c) * kPerChunk + j;
      to[j] = d < D ? x[d * pts.stride[3]] : from_f32<T>(0.0f);
    }
  };

  // ---- Prologue: the slice's rows, centroid 0 (sample point 0), its distances, the unit 2^E ----
  for (int e = tid; e < count * chunks; e += kThreads) {
    const int i = e / chunks, c = e % chunks;
    load_chunk(rows + static_cast<int64_t>(i) * l.row_stride + l.chunk_offset(i, c), order[first + i], c);
  }
  const int cand_chunks = 2 * l.cand_rows * (l.cand_stride / 16);  // row 0 of buffer 0: centroid 0; zeros
  for (int e = tid; e < cand_chunks; e += kThreads) {
    uint8_t* dst = cand + static_cast<int64_t>(e) * 16;
    if (e < chunks) {
      load_chunk(dst, order[0], e);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
  }
  if (me == 0)
    for (int64_t d = tid; d < D; d += kThreads) out[d] = to_f32(base[order[0] * pts.stride[2] + d * pts.stride[3]]);
  if (tid == 0) largest_bits = 0;
  // Every CTA of the cluster has started before any writes into another; the rows are in place.
  cluster.sync();

  float largest = 0.0f;
  for (int i0 = warp * kGroupsPerWarp; i0 < count; i0 += kGroups) {  // warp-uniform: the shuffles take all lanes
    const int i = i0 + group_lane;
    const bool valid = i < count;
    const int r = valid ? i : i0;
    const T* c0 = cand_row(0, 0);
    const float d = exact_squared_distance_lanes<kLanes>([&](int64_t e) { return row_element<T>(rows, l, r, e); },
                                                         [&](int64_t e) { return to_f32(c0[e]); }, D, sub);
    if (valid && sub == 0) {
      d2[i] = d;
      if (d <= FLT_MAX && d > largest) largest = d;
    }
    if constexpr (kScreen) {  // |x|^2 in any order; NaN where an element is subnormal (see seed_screen.hpp)
      float sum = 0.0f;
      bool tiny = false;
      for (int64_t e = sub; e < D; e += kLanes) {
        const float v = row_element<T>(rows, l, r, e);
        sum += v * v;
        tiny |= v != 0.0f && fabsf(v) < screen::smallest_normal(std::is_same_v<T, __nv_bfloat16>);
      }
#pragma unroll
      for (int m = 1; m < kLanes; m *= 2) {
        sum += __shfl_xor_sync(0xffffffffu, sum, m);
        tiny |= __shfl_xor_sync(0xffffffffu, static_cast<int>(tiny), m) != 0;
      }
      if (valid && sub == 0) norm[i] = tiny ? __int_as_float(0x7fc00000) : sum;
    }
  }
  atomicMax(&largest_bits, __float_as_uint(largest));  // non-negative floats order as their bits
  __syncthreads();
  if (tid < ctas) *cluster.map_shared_rank(max_bits + me, tid) = largest_bits;
  cluster.sync();
  unsigned all_bits = 0;
  for (int c = 0; c < ctas; ++c) all_bits = max(all_bits, max_bits[c]);
  const int exponent = fixed_point_exponent(__uint_as_float(all_bits), p.bits);

  // Thread k's contiguous points for the scans: [lo, hi).
  const int chunk = (count + kThreads - 1) / kThreads;
  const int lo = min(count, tid * chunk), hi = min(count, lo + chunk);
  auto q_of = [&](int i) { return static_cast<unsigned long long>(to_fixed(d2[i], exponent, p.bits)); };
  {
    unsigned long long own = 0, before = 0, total = 0;
    for (int i = lo; i < hi; ++i) own += q_of(i);
    Scan(scan_storage).ExclusiveSum(own, before, total);
    // The slots as a step with no reduction would leave them: step 1 takes each CTA's sum as it is.
    if (tid <= trials)
      for (int r = 0; r < ctas; ++r)
        *cluster.map_shared_rank(slots + me * slot_width + tid, r) = tid < trials ? 0 : total;
    cluster.sync();
  }

  for (int64_t step = 1;; ++step) {
    // ---- (f) The previous step's outcome ----------------------------------------------------------
    int best = 0;  // the largest reduction is the smallest potential; ties keep the lower trial
    unsigned long long best_reduction = 0;
    for (int t = 0; t < trials; ++t) {
      unsigned long long reduction = 0;
      for (int c = 0; c < ctas; ++c) reduction += slots[c * slot_width + t];
      if (reduction > best_reduction) {
        best_reduction = reduction;
        best = t;
      }
    }
    unsigned long long Q = 0, offset = 0;
    for (int c = 0; c < ctas; ++c) {
      const unsigned long long sum = slots[c * slot_width + trials] - slots[c * slot_width + best];
      Q += sum;
      if (c < me) offset += sum;
    }
    if (step > 1) {
      const T* chosen = cand_row(static_cast<int>((step - 1) & 1), best);
      if (me == 0)
        for (int64_t d = tid; d < D; d += kThreads) out[(step - 1) * D + d] = to_f32(chosen[d]);
      const int listed = list_count[best];
      for (int i = tid; i < listed; i += kThreads) d2[list_p[best * P + i]] = list_m[best * P + i];
    }
    if (step == p.C) break;  // every CTA reads the same slots: all leave together
    if (tid < trials) {
      target[tid] = draw_target(Q, draw(p.seed, id, static_cast<uint64_t>(step), static_cast<uint64_t>(tid)));
      cand_local[tid] = -1;
      red[tid] = 0;
    }
    if (tid == 0) live_count = 0;
    __syncthreads();

    // ---- (a) Q's running sums, the live list, the candidates -------------------------------------
    if (tid < trials) list_count[tid] = 0;  // read in (f) by every thread, before the barrier above
    unsigned long long own = 0, before = 0, total = 0;
    for (int k = 0; k < chunk; ++k) {  // the same trip count in every lane: the ballot takes them all
      const int i = lo + k;
      const unsigned long long q = i < hi ? q_of(i) : 0;
      own += q;
      const unsigned alive = __ballot_sync(0xffffffffu, q != 0);
      int at = 0;
      if (lane == 0 && alive != 0) at = atomicAdd(&live_count, __popc(alive));
      at = __shfl_sync(0xffffffffu, at, 0);
      if (q != 0) live[at + __popc(alive & ((1u << lane) - 1u))] = static_cast<uint16_t>(i);
    }
    Scan(scan_storage).ExclusiveSum(own, before, total);
    const unsigned long long from = offset + before;  // this thread's first running sum
    if (Q == 0) {  // no running sum exceeds a target: every trial takes the sample's last point
      if (tid == 0 && M - 1 >= first && M - 1 < first + count)
        for (int t = 0; t < trials; ++t) cand_local[t] = static_cast<int>(M - 1 - first);
    } else if (own != 0) {
      for (int t = 0; t < trials; ++t) {
        const unsigned long long goal = target[t];
        if (goal < from || goal - from >= own) continue;
        unsigned long long running = from;
        for (int i = lo; i < hi; ++i) {
          running += q_of(i);
          if (running > goal) {  // the first point whose running sum exceeds the target
            cand_local[t] = i;
            break;
          }
        }
      }
    }
    __syncthreads();

    // ---- (b) The candidates' rows into every CTA --------------------------------------------------
    const int buffer = static_cast<int>(step & 1);
    for (int t = warp; t < trials; t += kWarps) {
      const int i = cand_local[t];
      if (i < 0) continue;  // another CTA owns it
      uint8_t* to = cand + static_cast<int64_t>(buffer * l.cand_rows + t) * l.cand_stride;
      for (int c = lane; c < chunks; c += 32) {
        const uint4 v =
            *reinterpret_cast<const uint4*>(rows + static_cast<int64_t>(i) * l.row_stride + l.chunk_offset(i, c));
        for (int r = 0; r < ctas; ++r) *cluster.map_shared_rank(reinterpret_cast<uint4*>(to + c * 16), r) = v;
      }
      if (kScreen && lane == 0)
        for (int r = 0; r < ctas; ++r) *cluster.map_shared_rank(&cand_norm[buffer][t], r) = norm[i];
    }
    cluster.sync();

    // ---- (c) The pairs whose exact distance is needed, per trial ------------------------------------
    const int L = live_count;
    if constexpr (kScreen) {
      const int tiles = (trials + 7) / 8;
      const uint8_t* cand_buffer = cand + static_cast<int64_t>(buffer) * l.cand_rows * l.cand_stride;
      const int g = lane / 4, pair = 2 * (lane % 4);  // the accumulator's rows g, g + 8 and columns pair, pair + 1
      for (int row0 = warp * 16; row0 < L; row0 += kWarps * 16) {
        // ldmatrix: lanes 0-15 give rows 0-15 at k .. k + 7, lanes 16-31 the same rows at k + 8 .. k + 15.
        const int a_row = live[min(row0 + (lane & 15), L - 1)];
        const uint32_t a_base = smem_addr(rows + static_cast<int64_t>(a_row) * l.row_stride);
        // B: lanes 0-7 give trials 0-7 at k, lanes 8-15 at k + 8 (the others' addresses are unused).
        const uint32_t b_base = smem_addr(cand_buffer + (lane & 7) * l.cand_stride + ((lane >> 3) & 1) * 16);
        float acc[kMaxTiles][4];
#pragma unroll
        for (int nt = 0; nt < kMaxTiles; ++nt)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[nt][j] = 0.0f;
        for (int c = 0; c < chunks; c += 2) {
          uint32_t a[4];
          ldmatrix_x4(a_base + l.chunk_offset(a_row, c + (lane >> 4)), a);
#pragma unroll
          for (int nt = 0; nt < kMaxTiles; ++nt) {
            if (nt >= tiles) break;
            uint32_t b0, b1;
            ldmatrix_x2(b_base + nt * 8 * l.cand_stride + c * 16, b0, b1);
            mma16816<T>(acc[nt], a, b0, b1);
          }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = row0 + g + 8 * h;
          if (r >= L) continue;
          const int point = live[r];
          const float current = d2[point], n = norm[point];
#pragma unroll
          for (int nt = 0; nt < kMaxTiles; ++nt)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              const int t = nt * 8 + pair + j;
              if (nt < tiles && t < trials && !screen::clears(n, cand_norm[buffer][t], acc[nt][2 * h + j], current))
                list_p[t * P + atomicAdd(&list_count[t], 1)] = static_cast<uint16_t>(point);
            }
        }
      }
    } else {
      for (int e = tid; e < trials * L; e += kThreads) list_p[(e / L) * P + e % L] = live[e % L];
      if (tid < trials) list_count[tid] = L;
    }
    __syncthreads();

    // ---- (d) The listed pairs' exact distances ----------------------------------------------------
    int listed = 0;
    for (int t = 0; t < trials; ++t) listed += list_count[t];
    int t = 0, start = 0;  // entry e belongs to trial t, whose entries begin at `start`
    for (int e0 = warp * kGroupsPerWarp; e0 < listed; e0 += kGroups) {  // warp-uniform
      const int e = min(e0 + group_lane, listed - 1);
      while (e - start >= list_count[t]) start += list_count[t++];
      const int i = e - start, point = list_p[t * P + i];
      const T* c = cand_row(buffer, t);
      const float d = exact_squared_distance_lanes<kLanes>([&](int64_t k) { return row_element<T>(rows, l, point, k); },
                                                           [&](int64_t k) { return to_f32(c[k]); }, D, sub);
      if (e0 + group_lane < listed && sub == 0) {
        const float current = d2[point];
        list_m[t * P + i] = min_distance(current, d);
        if (d < current) {
          const unsigned long long gain = q_of(point) - to_fixed(d, exponent, p.bits);
          if (gain != 0) atomicAdd(&red[t], gain);
        }
      }
    }
    __syncthreads();

    // ---- (e) This CTA's reductions and sum of q(D2) into every CTA ---------------------------------
    if (tid <= trials) {
      const unsigned long long v = tid < trials ? red[tid] : total;
      for (int r = 0; r < ctas; ++r) *cluster.map_shared_rank(slots + me * slot_width + tid, r) = v;
    }
    cluster.sync();
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // never launched: seed_kernel() takes it only where sm_90 code was built
#endif
}

template <typename T, bool kScreen>
auto cluster_kernel() {
  return greedy_seed_cluster_kernel<T, kScreen>;
}

// Calls f(kernel) with the kernel for `dtype` and `screen` (f32 points have no screen).
template <typename F>
void with_kernel(DType dtype, bool screen, F&& f) {
  switch (dtype) {
    case DType::BF16:
      return screen ? f(cluster_kernel<__nv_bfloat16, true>()) : f(cluster_kernel<__nv_bfloat16, false>());
    case DType::F16:
      return screen ? f(cluster_kernel<__half, true>()) : f(cluster_kernel<__half, false>());
    case DType::F32:
      SAPATTN_CHECK(!screen, UnsupportedError, "kmeans_seed_greedy's screen takes bf16 or f16 points");
      return f(cluster_kernel<float, false>());
    default:
      break;
  }
  SAPATTN_THROW(DTypeError, "expected a floating dtype, got ", dtype_name(dtype));
}

}  // namespace

cudaFuncAttributes seed_cluster_attributes(DType dtype, bool screen) {
  cudaFuncAttributes attr{};
  with_kernel(dtype, screen, [&](auto kernel) {
    SAPATTN_CUDA_CHECK(cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(kernel)));
  });
  return attr;
}

void launch_seed_cluster(const SeedClusterParams& p, DType dtype, bool screen, int ctas, int64_t batch_heads,
                         cudaStream_t stream) {
  with_kernel(dtype, screen, [&](auto kernel) {
    set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), static_cast<int>(p.layout.bytes));
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(static_cast<unsigned>(ctas), static_cast<unsigned>(batch_heads));
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = p.layout.bytes;
    config.stream = stream;
    cudaLaunchAttribute cluster_dims[1];
    cluster_dims[0].id = cudaLaunchAttributeClusterDimension;
    cluster_dims[0].val.clusterDim.x = static_cast<unsigned>(ctas);
    cluster_dims[0].val.clusterDim.y = 1;
    cluster_dims[0].val.clusterDim.z = 1;
    config.attrs = cluster_dims;
    config.numAttrs = 1;
    SAPATTN_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
  });
}

}  // namespace sapattn::cuda
