// SVG-EAR on the GPU, the selections (docs/ear.md): the error-aware routing (select_error_aware)
// and the density budget (select_top_p_at_density), both built on one block ranking a row with a
// stable radix sort. The weights and scores they rank come from ear_estimate.cu. Every op is a
// fixed sequence of launches on the caller's stream, takes its scratch from the caller's workspace
// and is deterministic: reductions run in a fixed order, and the only atomics are integer ORs into
// the value-check flag.
//
// Numerics against the CPU backend (the tests' tolerances, docs/ear.md "The CUDA backend"):
// - select_error_aware and select_top_p_at_density rank and count exactly (integer areas): their
//   masks are bit-identical for the same inputs.
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/ear/ear.cuh"
#include "cuda/ear/ear_internal.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda {

using ear::carve_density;
using ear::checked_size;
using ear::DensityScratch;
using ear::kThreads;
using ear::strided;
using ear::Strided4;
using ear::with_value_check;

namespace {

// ---------------------------------------------------------------------------------------------
// Ranking a row: ascending order of these keys = descending order of the floats, with -0 == +0
// (the CPU compares with >, under which they tie) and, with kNanLast, NaN ranked as -inf.
// ---------------------------------------------------------------------------------------------

template <bool kNanLast>
__device__ __forceinline__ uint32_t descending_key(float f) {
  if (f == 0.0f) f = 0.0f;
  if (kNanLast && isnan(f)) f = -INFINITY;
  const uint32_t u = __float_as_uint(f);
  const uint32_t ascending = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~ascending;
}

__device__ __forceinline__ float key_value(uint32_t key) {
  const uint32_t ascending = ~key;
  return __uint_as_float((ascending & 0x80000000u) ? (ascending & 0x7fffffffu) : ~ascending);
}

// One block ranks one row of up to kThreads * kItems columns with a stable radix sort of
// (key, column): ties keep the lower column first. Column capacities 1024 .. 8192.
template <int kItems>
struct RowRank {
  static constexpr int kCapacity = kThreads * kItems;
  using Sort = cub::BlockRadixSort<uint32_t, kThreads, kItems, uint16_t>;
  using Scan = cub::BlockScan<long long, kThreads>;
  using Reduce = cub::BlockReduce<long long, kThreads>;
};

// Loads row r of a [B,H,R,C] f32 view into blocked keys (thread t holds columns t*kItems + i);
// columns past C sort last.
template <int kItems, bool kNanLast>
__device__ void load_row_keys(const Strided4<const float>& m, int64_t b, int64_t h, int64_t r, int64_t C,
                              uint32_t (&keys)[kItems], uint16_t (&cols)[kItems]) {
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t j = static_cast<int64_t>(threadIdx.x) * kItems + i;
    keys[i] = j < C ? descending_key<kNanLast>(m.at(b, h, r, j)) : 0xffffffffu;
    cols[i] = static_cast<uint16_t>(j);
  }
}

// Calls f(kItems tag) with the smallest capacity that holds C columns.
template <typename F>
void dispatch_capacity(int64_t C, F&& f) {
  if (C <= 1024) {
    f(std::integral_constant<int, 4>{});
  } else if (C <= 2048) {
    f(std::integral_constant<int, 8>{});
  } else if (C <= 4096) {
    f(std::integral_constant<int, 16>{});
  } else {
    f(std::integral_constant<int, 32>{});
  }
}

// ---------------------------------------------------------------------------------------------
// select_error_aware: one block per query-cluster row.
// ---------------------------------------------------------------------------------------------

struct RoutingParams {
  Strided4<const float> probs, scores;
  Strided4<const uint8_t> budget_mask;
  Strided4<uint8_t> mask;
  const int32_t* q_sizes;  // [BH, R]
  const int32_t* k_sizes;  // [BH, C]
  int64_t H, R, C;
  int64_t guaranteed;
  int* flag;
};

template <int kItems>
__global__ void __launch_bounds__(kThreads) select_error_aware_kernel(RoutingParams p) {
  using Rank = RowRank<kItems>;
  __shared__ union {
    typename Rank::Sort::TempStorage sort;
    typename Rank::Scan::TempStorage scan;
    typename Rank::Reduce::TempStorage reduce;
  } temp;
  __shared__ uint8_t guaranteed[Rank::kCapacity];
  __shared__ long long remaining;
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H, r = blockIdx.x;
  const int64_t C = p.C;
  const int64_t q_size = checked_size(p.q_sizes[bh * p.R + r], p.flag);
  const int32_t* k_sizes = p.k_sizes + bh * C;

  // 1. The first `guaranteed` clusters of the ranking by probs.
  uint32_t keys[kItems];
  uint16_t cols[kItems];
  load_row_keys<kItems, true>(p.probs, b, h, r, C, keys, cols);
  typename Rank::Sort(temp.sort).Sort(keys, cols);
#pragma unroll
  for (int i = 0; i < kItems; ++i) guaranteed[cols[i]] = threadIdx.x * kItems + i < p.guaranteed ? 1 : 0;
  __syncthreads();

  // 2. remaining = max(0, budget - guaranteed area), exact in 64-bit integers.
  long long budget = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t j = static_cast<int64_t>(threadIdx.x) * kItems + i;
    if (j >= C) continue;
    const long long area = q_size * checked_size(k_sizes[j], p.flag);
    if (p.budget_mask.at(b, h, r, j) != 0) budget += area;
    if (guaranteed[j]) budget -= area;
  }
  budget = typename Rank::Reduce(temp.reduce).Sum(budget);
  if (threadIdx.x == 0) remaining = budget > 0 ? budget : 0;
  __syncthreads();

  // 3. The others by score, kept while the area kept before them is below `remaining`.
  load_row_keys<kItems, true>(p.scores, b, h, r, C, keys, cols);
  typename Rank::Sort(temp.sort).Sort(keys, cols);
  long long area[kItems], before[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const bool valid = static_cast<int64_t>(threadIdx.x) * kItems + i < C;
    area[i] = valid && !guaranteed[cols[i]] ? q_size * max_of<int32_t>(k_sizes[cols[i]], 0) : 0;
  }
  __syncthreads();  // the sort's storage becomes the scan's
  typename Rank::Scan(temp.scan).ExclusiveSum(area, before);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (static_cast<int64_t>(threadIdx.x) * kItems + i >= C) continue;
    const bool keep = guaranteed[cols[i]] || before[i] < remaining;
    p.mask.at(b, h, r, cols[i]) = keep ? 1 : 0;
  }
}

// ---------------------------------------------------------------------------------------------
// select_top_p_at_density. (1) Per row: the stable ranking by weight, the fp32 running sum in rank
// order (sequential, as keep_top_p_row adds) and the running key count (int64). (2) Per (b,h): the
// smallest float p in (0, 1) whose kept area reaches the target, by bisection on the float's bits
// (the kept area only steps where p crosses a running sum, and is monotone); then the smallest
// running sum in (0, 1) at or above it, which is the CPU's candidate (1 when there is none). (3)
// Per row: the mask at that top_p.
// ---------------------------------------------------------------------------------------------

struct DensityParams {
  Strided4<const float> probs;
  Strided4<uint8_t> mask;
  const int32_t* q_sizes;  // [BH, R]
  const int32_t* k_sizes;  // [BH, C]
  int64_t H, R, C;
  int64_t min_kept;
  float density;
  float* running;        // [BH, R, C]
  long long* key_count;  // [BH, R, C]: keys of the first rank+1 clusters
  float* top_p;          // [BH]
  int* flag;
};

// The first rank whose running sum reaches p (C when none does): running sums of non-negative
// weights never decrease, so this is the CPU's lower_bound.
__device__ __forceinline__ int64_t first_reaching(const float* running, int64_t C, float p) {
  int64_t lo = 0, hi = C;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (running[mid] < p)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

template <int kItems>
__global__ void __launch_bounds__(kThreads) density_rank_kernel(DensityParams p, bool write_mask) {
  using Rank = RowRank<kItems>;
  __shared__ union {
    typename Rank::Sort::TempStorage sort;
    typename Rank::Scan::TempStorage scan;
    float ranked[Rank::kCapacity];
  } temp;
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H, r = blockIdx.x;
  const int64_t C = p.C;
  uint32_t keys[kItems];
  uint16_t cols[kItems];
  load_row_keys<kItems, false>(p.probs, b, h, r, C, keys, cols);
  typename Rank::Sort(temp.sort).Sort(keys, cols);
  __syncthreads();
  float* running = p.running + (bh * p.R + r) * C;
  if (!write_mask) {
#pragma unroll
    for (int i = 0; i < kItems; ++i) temp.ranked[threadIdx.x * kItems + i] = key_value(keys[i]);
    __syncthreads();
    if (threadIdx.x == 0) {
      float sum = 0.0f;
      for (int64_t i = 0; i < C; ++i) running[i] = sum = __fadd_rn(sum, temp.ranked[i]);
    }
    __syncthreads();
    long long count[kItems], prefix[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      count[i] =
          static_cast<int64_t>(threadIdx.x) * kItems + i < C ? checked_size(p.k_sizes[bh * C + cols[i]], p.flag) : 0;
    typename Rank::Scan(temp.scan).InclusiveSum(count, prefix);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t rank = static_cast<int64_t>(threadIdx.x) * kItems + i;
      if (rank < C) p.key_count[(bh * p.R + r) * C + rank] = prefix[i];
    }
    return;
  }
  // The mask at this (b,h)'s top_p, as keep_top_p_row writes it.
  const float top_p = p.top_p[bh];
  int64_t kept = C;
  if (top_p < 1.0f) {
    const int64_t lo = first_reaching(running, C, top_p);
    kept = min_of<int64_t>(C, max_of<int64_t>(lo < C ? lo + 1 : C, p.min_kept));
  }
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t rank = static_cast<int64_t>(threadIdx.x) * kItems + i;
    if (rank < C) p.mask.at(b, h, r, cols[i]) = rank < kept ? 1 : 0;
  }
}

// kept area at top_p (< 1) of every row of one (b,h), summed over the block.
__device__ long long density_kept_area(const DensityParams& p, int64_t bh, float top_p,
                                       cub::BlockReduce<long long, kThreads>::TempStorage& temp) {
  long long area = 0;
  for (int64_t r = threadIdx.x; r < p.R; r += kThreads) {
    const int64_t lo = first_reaching(p.running + (bh * p.R + r) * p.C, p.C, top_p);
    const int64_t kept = min_of<int64_t>(p.C, max_of<int64_t>(lo + 1, p.min_kept));
    const long long keys = kept > 0 ? p.key_count[(bh * p.R + r) * p.C + kept - 1] : 0;
    area += max_of<int32_t>(p.q_sizes[bh * p.R + r], 0) * keys;
  }
  const long long total = cub::BlockReduce<long long, kThreads>(temp).Sum(area);
  __syncthreads();  // temp is reused by the next call
  return total;
}

struct MinFloat {
  __device__ float operator()(float x, float y) const { return y < x ? y : x; }
};

__global__ void __launch_bounds__(kThreads) density_top_p_kernel(DensityParams p) {
  using Reduce = cub::BlockReduce<long long, kThreads>;
  using ReduceF = cub::BlockReduce<float, kThreads>;
  __shared__ union {
    Reduce::TempStorage sum;
    ReduceF::TempStorage min;
  } temp;
  __shared__ long long shared_area;
  const int64_t bh = blockIdx.x;
  long long q_part = 0, k_part = 0;
  for (int64_t r = threadIdx.x; r < p.R; r += kThreads) q_part += checked_size(p.q_sizes[bh * p.R + r], p.flag);
  for (int64_t j = threadIdx.x; j < p.C; j += kThreads) k_part += checked_size(p.k_sizes[bh * p.C + j], p.flag);
  const long long q_total = Reduce(temp.sum).Sum(q_part);
  __syncthreads();
  const long long k_total = Reduce(temp.sum).Sum(k_part);
  __syncthreads();
  __shared__ double target;
  if (threadIdx.x == 0)
    target = static_cast<double>(p.density) * static_cast<double>(q_total) * static_cast<double>(k_total);
  __syncthreads();
  // Smallest bits u in [1, bits(1.0f)) with kept_area(float(u)) >= target; hi = bits(1.0f): none.
  uint32_t lo = 1, hi = 0x3f800000u;
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    const long long area = density_kept_area(p, bh, __uint_as_float(mid), temp.sum);
    if (threadIdx.x == 0) shared_area = area;
    __syncthreads();
    const bool reaches = static_cast<double>(shared_area) >= target;
    __syncthreads();
    if (reaches)
      hi = mid;
    else
      lo = mid + 1;
  }
  float candidate = 1.0f;
  if (lo < 0x3f800000u) {
    const float at = __uint_as_float(lo);
    for (int64_t r = threadIdx.x; r < p.R; r += kThreads) {
      const float* run = p.running + (bh * p.R + r) * p.C;
      const int64_t a = first_reaching(run, p.C, at);
      if (a < p.C && run[a] < 1.0f) candidate = fminf(candidate, run[a]);
    }
  }
  candidate = ReduceF(temp.min).Reduce(candidate, MinFloat{});
  if (threadIdx.x == 0) p.top_p[bh] = candidate;
}

void check_rows(int64_t batch_heads, int64_t rows, int64_t cols, const char* op) {
  SAPATTN_CHECK(batch_heads <= 65535 && rows <= 2147483647, UnsupportedError, op,
                " on CUDA takes at most 65535 (b,h) pairs");
  SAPATTN_CHECK(cols <= kMaxSelectColumns, UnsupportedError, op, " on CUDA ranks at most ", kMaxSelectColumns,
                " key clusters per row, got ", cols);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Scratch
// ---------------------------------------------------------------------------------------------

namespace ear {

DensityScratch carve_density(Carver& carver, int64_t batch_heads, int64_t rows, int64_t cols) {
  DensityScratch s;
  s.running = carver.take<float>(batch_heads * rows * cols);
  s.key_count = carver.take<long long>(batch_heads * rows * cols);
  s.top_p = carver.take<float>(batch_heads);
  return s;
}

}  // namespace ear

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

void select_error_aware(const TensorView& probs, const TensorView& budget_mask, const TensorView& scores,
                        const TensorView& q_sizes, const TensorView& k_sizes, int guaranteed, TensorView mask,
                        const Stream& stream) {
  const DeviceGuard guard(stream.device);
  const int64_t BH = probs.shape[0] * probs.shape[1], R = probs.shape[2], C = probs.shape[3];
  if (BH * R * C == 0) return;
  check_rows(BH, R, C, "select_error_aware");
  RoutingParams p{};
  p.probs = strided<const float>(probs);
  p.scores = strided<const float>(scores);
  p.budget_mask = strided<const uint8_t>(budget_mask);
  p.mask = strided<uint8_t>(mask);
  p.q_sizes = static_cast<const int32_t*>(q_sizes.data);
  p.k_sizes = static_cast<const int32_t*>(k_sizes.data);
  p.H = probs.shape[1];
  p.R = R;
  p.C = C;
  p.guaranteed = guaranteed;
  p.flag = value_error_flag();
  with_value_check(stream, "select_error_aware", [&] {
    dispatch_capacity(C, [&](auto items) {
      select_error_aware_kernel<decltype(items)::value>
          <<<dim3(static_cast<unsigned>(R), static_cast<unsigned>(BH)), kThreads, 0, stream_of(stream)>>>(p);
      SAPATTN_CUDA_CHECK_LAUNCH();
    });
  });
}

void select_top_p_at_density(const TensorView& probs, const TensorView& q_sizes, const TensorView& k_sizes,
                             float density, int min_kept, TensorView mask, const Stream& stream, Workspace workspace) {
  const DeviceGuard guard(stream.device);
  const int64_t BH = probs.shape[0] * probs.shape[1], R = probs.shape[2], C = probs.shape[3];
  Carver carver("select_top_p_at_density", workspace);
  const DensityScratch s = carve_density(carver, BH, R, C);
  carver.check();
  if (BH * R * C == 0) return;
  check_rows(BH, R, C, "select_top_p_at_density");
  DensityParams p{};
  p.probs = strided<const float>(probs);
  p.mask = strided<uint8_t>(mask);
  p.q_sizes = static_cast<const int32_t*>(q_sizes.data);
  p.k_sizes = static_cast<const int32_t*>(k_sizes.data);
  p.H = probs.shape[1];
  p.R = R;
  p.C = C;
  p.min_kept = min_kept;
  p.density = density;
  p.running = s.running;
  p.key_count = s.key_count;
  p.top_p = s.top_p;
  p.flag = value_error_flag();
  const cudaStream_t st = stream_of(stream);
  with_value_check(stream, "select_top_p_at_density", [&] {
    dispatch_capacity(C, [&](auto items) {
      const dim3 rows(static_cast<unsigned>(R), static_cast<unsigned>(BH));
      density_rank_kernel<decltype(items)::value><<<rows, kThreads, 0, st>>>(p, false);
      SAPATTN_CUDA_CHECK_LAUNCH();
      density_top_p_kernel<<<static_cast<unsigned>(BH), kThreads, 0, st>>>(p);
      SAPATTN_CUDA_CHECK_LAUNCH();
      density_rank_kernel<decltype(items)::value><<<rows, kThreads, 0, st>>>(p, true);
      SAPATTN_CUDA_CHECK_LAUNCH();
    });
  });
}

}  // namespace sapattn::cuda
