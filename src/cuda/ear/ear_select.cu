// SVG-EAR on the GPU, the selections (docs/ear.md): the error-aware routing (select_error_aware),
// ear-plus's routing with one budget per head (select_error_aware_per_head) and the density budget
// (select_top_p_at_density), all built on one block ranking a row with a stable radix sort; the
// per-head routing then ranks all pairs of every head with one device-wide stable radix sort of
// (head, score) keys. The weights and scores they rank come from ear_estimate.cu and ear_plus.cu.
// Every op is a fixed sequence of launches on the caller's stream, takes its scratch from the
// caller's workspace and is deterministic: reductions run in a fixed order, and the only atomics are
// integer ORs into the value-check flag.
//
// Numerics against the CPU backend (the tests' tolerances, docs/ear.md "The CUDA backend"):
// - the three rank and count exactly (integer areas): their masks are bit-identical for the same
//   inputs.
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/ear/ear.cuh"
#include "cuda/ear/ear_internal.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda {

using ear::carve_density;
using ear::carve_head_routing;
using ear::checked_size;
using ear::DensityScratch;
using ear::HeadRoutingScratch;
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
  union Temp {
    typename Sort::TempStorage sort;
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
  };
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
// select_error_aware: one block per query-cluster row. select_error_aware_per_head shares its first
// two steps (guarantee_row).
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

RoutingParams routing_params(const TensorView& probs, const TensorView& budget_mask, const TensorView& scores,
                             const TensorView& q_sizes, const TensorView& k_sizes, int guaranteed, TensorView mask) {
  RoutingParams p{};
  p.probs = strided<const float>(probs);
  p.scores = strided<const float>(scores);
  p.budget_mask = strided<const uint8_t>(budget_mask);
  p.mask = strided<uint8_t>(mask);
  p.q_sizes = static_cast<const int32_t*>(q_sizes.data);
  p.k_sizes = static_cast<const int32_t*>(k_sizes.data);
  p.H = probs.shape[1];
  p.R = probs.shape[2];
  p.C = probs.shape[3];
  p.guaranteed = guaranteed;
  p.flag = value_error_flag();
  return p;
}

// Steps 1 and 2 of the routing of row r: guaranteed[j] = whether j is among the first `guaranteed`
// clusters of the ranking by probs, and the row's budget less the guaranteed area (exact in 64-bit
// integers, maybe negative), valid in thread 0.
template <int kItems>
__device__ long long guarantee_row(const RoutingParams& p, int64_t b, int64_t h, int64_t r, int64_t q_size,
                                   typename RowRank<kItems>::Temp& temp, uint8_t* guaranteed) {
  using Rank = RowRank<kItems>;
  const int64_t bh = b * p.H + h, C = p.C;
  const int32_t* k_sizes = p.k_sizes + bh * C;
  uint32_t keys[kItems];
  uint16_t cols[kItems];
  load_row_keys<kItems, true>(p.probs, b, h, r, C, keys, cols);
  typename Rank::Sort(temp.sort).Sort(keys, cols);
#pragma unroll
  for (int i = 0; i < kItems; ++i) guaranteed[cols[i]] = threadIdx.x * kItems + i < p.guaranteed ? 1 : 0;
  __syncthreads();
  long long budget = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t j = static_cast<int64_t>(threadIdx.x) * kItems + i;
    if (j >= C) continue;
    const long long area = q_size * checked_size(k_sizes[j], p.flag);
    if (p.budget_mask.at(b, h, r, j) != 0) budget += area;
    if (guaranteed[j]) budget -= area;
  }
  return typename Rank::Reduce(temp.reduce).Sum(budget);
}

template <int kItems>
__global__ void __launch_bounds__(kThreads) select_error_aware_kernel(RoutingParams p) {
  using Rank = RowRank<kItems>;
  __shared__ typename Rank::Temp temp;
  __shared__ uint8_t guaranteed[Rank::kCapacity];
  __shared__ long long remaining;
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H, r = blockIdx.x;
  const int64_t C = p.C;
  const int64_t q_size = checked_size(p.q_sizes[bh * p.R + r], p.flag);
  const int32_t* k_sizes = p.k_sizes + bh * C;

  // 1, 2. The guaranteed clusters; remaining = max(0, budget - guaranteed area).
  const long long budget = guarantee_row<kItems>(p, b, h, r, q_size, temp, guaranteed);
  if (threadIdx.x == 0) remaining = budget > 0 ? budget : 0;
  __syncthreads();

  // 3. The others by score, kept while the area kept before them is below `remaining`.
  uint32_t keys[kItems];
  uint16_t cols[kItems];
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
// select_error_aware_per_head. (1) Per row, as select_error_aware: the guaranteed clusters, written
// to the mask as its first state, and the row's budget less their area. (2) Per head, remaining =
// max(0, sum of the rows'). (3) Every pair (b,h,a,j) gets the key (b*H + h) << 32 | its score's
// descending key, and one stable radix sort over all heads ranks each head's pairs by score (ties
// to the lower a*C + j, NaN last), as one segmented sort would. (4) The non-guaranteed areas in rank
// order, (5) their exclusive prefix sum over all heads (unsigned: the difference from the head's
// first entry is the area ranked before a pair within its head, exactly), (6) the mask: kept if
// guaranteed or ranked after less than `remaining`.
// ---------------------------------------------------------------------------------------------

template <int kItems>
__global__ void __launch_bounds__(kThreads) head_guarantee_kernel(RoutingParams p, long long* row_budget) {
  using Rank = RowRank<kItems>;
  __shared__ typename Rank::Temp temp;
  __shared__ uint8_t guaranteed[Rank::kCapacity];
  // b and h by a 32-bit division (bh < 65536, check_rows): a 64-bit one is a called subroutine, and
  // around that call the sm_80 code of kItems = 8 spilled (8 bytes).
  const uint32_t bh = blockIdx.y, H = static_cast<uint32_t>(p.H);
  const int64_t b = bh / H, h = bh % H, r = blockIdx.x;
  const int64_t q_size = checked_size(p.q_sizes[bh * p.R + r], p.flag);
  const long long budget = guarantee_row<kItems>(p, b, h, r, q_size, temp, guaranteed);
  if (threadIdx.x == 0) row_budget[bh * p.R + r] = budget;
  for (int64_t j = threadIdx.x; j < p.C; j += kThreads) p.mask.at(b, h, r, j) = guaranteed[j];
}

__global__ void __launch_bounds__(kThreads)
    head_remaining_kernel(int64_t R, const long long* __restrict__ row_budget, long long* __restrict__ remaining) {
  using Reduce = cub::BlockReduce<long long, kThreads>;
  __shared__ Reduce::TempStorage temp;
  const int64_t bh = blockIdx.x;
  long long part = 0;
  for (int64_t r = threadIdx.x; r < R; r += kThreads) part += row_budget[bh * R + r];
  const long long total = Reduce(temp).Sum(part);
  if (threadIdx.x == 0) remaining[bh] = total > 0 ? total : 0;
}

// The pair at flat index i of the [BH, R*C] pairs: its head and (a, j).
struct PairIndex {
  int64_t b, h, a, j;
};

__device__ __forceinline__ PairIndex pair_of(const RoutingParams& p, int64_t bh, int64_t pair) {
  return {bh / p.H, bh % p.H, pair / p.C, pair % p.C};
}

__global__ void pair_keys_kernel(RoutingParams p, int64_t pairs, unsigned long long* __restrict__ keys,
                                 int32_t* __restrict__ index) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= pairs) return;
  const int64_t per_head = p.R * p.C, bh = i / per_head, pair = i % per_head;
  const PairIndex x = pair_of(p, bh, pair);
  keys[i] = static_cast<unsigned long long>(bh) << 32 | descending_key<true>(p.scores.at(x.b, x.h, x.a, x.j));
  index[i] = static_cast<int32_t>(pair);
}

// area[i] = the area of the i-th ranked pair, 0 when guaranteed (the mask holds step 1's flags).
__global__ void ranked_area_kernel(RoutingParams p, int64_t pairs, const int32_t* __restrict__ ranked,
                                   unsigned long long* __restrict__ area) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= pairs) return;
  const int64_t bh = i / (p.R * p.C);
  const PairIndex x = pair_of(p, bh, ranked[i]);
  const long long q_size = checked_size(p.q_sizes[bh * p.R + x.a], p.flag);
  const long long k_size = checked_size(p.k_sizes[bh * p.C + x.j], p.flag);
  area[i] = p.mask.at(x.b, x.h, x.a, x.j) != 0 ? 0ull : static_cast<unsigned long long>(q_size * k_size);
}

__global__ void head_mark_kernel(RoutingParams p, int64_t pairs, const int32_t* __restrict__ ranked,
                                 const unsigned long long* __restrict__ before,
                                 const long long* __restrict__ remaining) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= pairs) return;
  const int64_t per_head = p.R * p.C, bh = i / per_head;
  const PairIndex x = pair_of(p, bh, ranked[i]);
  const unsigned long long spent = before[i] - before[bh * per_head];  // the head's own prefix
  uint8_t& keep = p.mask.at(x.b, x.h, x.a, x.j);
  keep = keep != 0 || spent < static_cast<unsigned long long>(remaining[bh]) ? 1 : 0;
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

HeadRoutingScratch carve_head_routing(Carver& carver, int64_t batch_heads, int64_t rows, int64_t cols) {
  const int64_t pairs = batch_heads * rows * cols;
  SAPATTN_CHECK(pairs < (int64_t{1} << 31), UnsupportedError,
                "select_error_aware_per_head on CUDA ranks at most 2^31 - 1 "
                "cluster pairs in all, got ",
                batch_heads, " x ", rows, " x ", cols);
  HeadRoutingScratch s;
  s.end_bit = 32 + static_cast<int>(std::bit_width(static_cast<uint64_t>(std::max<int64_t>(batch_heads - 1, 0))));
  s.keys_in = carver.take<unsigned long long>(pairs);
  s.keys_out = carver.take<unsigned long long>(pairs);
  s.pairs_in = carver.take<int32_t>(pairs);
  s.pairs_out = carver.take<int32_t>(pairs);
  s.row_budget = carver.take<long long>(batch_heads * rows);
  s.remaining = carver.take<long long>(batch_heads);
  // The queries only compute sizes (no launch, no pointer dereference). The double-buffer sort needs
  // no copy of the keys and pairs in its temporary storage.
  size_t sort_bytes = 0, scan_bytes = 0;
  cub::DoubleBuffer<unsigned long long> keys(s.keys_in, s.keys_out);
  cub::DoubleBuffer<int32_t> index(s.pairs_in, s.pairs_out);
  SAPATTN_CUDA_CHECK(
      cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, keys, index, static_cast<int>(pairs), 0, s.end_bit));
  SAPATTN_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, s.keys_in, static_cast<int>(pairs)));
  s.temp_bytes = std::max(sort_bytes, scan_bytes);
  s.temp = carver.take_bytes(s.temp_bytes);
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
  const RoutingParams p = routing_params(probs, budget_mask, scores, q_sizes, k_sizes, guaranteed, mask);
  with_value_check(stream, "select_error_aware", [&] {
    dispatch_capacity(C, [&](auto items) {
      select_error_aware_kernel<decltype(items)::value>
          <<<dim3(static_cast<unsigned>(R), static_cast<unsigned>(BH)), kThreads, 0, stream_of(stream)>>>(p);
      SAPATTN_CUDA_CHECK_LAUNCH();
    });
  });
}

void select_error_aware_per_head(const TensorView& probs, const TensorView& budget_mask, const TensorView& scores,
                                 const TensorView& q_sizes, const TensorView& k_sizes, int guaranteed, TensorView mask,
                                 const Stream& stream, Workspace workspace) {
  const DeviceGuard guard(stream.device);
  const int64_t BH = probs.shape[0] * probs.shape[1], R = probs.shape[2], C = probs.shape[3];
  Carver carver("select_error_aware_per_head", workspace);
  const HeadRoutingScratch s = carve_head_routing(carver, BH, R, C);
  carver.check();
  const int64_t pairs = BH * R * C;
  if (pairs == 0) return;
  check_rows(BH, R, C, "select_error_aware_per_head");
  const RoutingParams p = routing_params(probs, budget_mask, scores, q_sizes, k_sizes, guaranteed, mask);
  const cudaStream_t st = stream_of(stream);
  const unsigned pair_blocks = static_cast<unsigned>(ceil_div(pairs, kThreads));
  with_value_check(stream, "select_error_aware_per_head", [&] {
    dispatch_capacity(C, [&](auto items) {
      head_guarantee_kernel<decltype(items)::value>
          <<<dim3(static_cast<unsigned>(R), static_cast<unsigned>(BH)), kThreads, 0, st>>>(p, s.row_budget);
      SAPATTN_CUDA_CHECK_LAUNCH();
    });
    head_remaining_kernel<<<static_cast<unsigned>(BH), kThreads, 0, st>>>(R, s.row_budget, s.remaining);
    SAPATTN_CUDA_CHECK_LAUNCH();
    pair_keys_kernel<<<pair_blocks, kThreads, 0, st>>>(p, pairs, s.keys_in, s.pairs_in);
    SAPATTN_CUDA_CHECK_LAUNCH();
    // The sort leaves its output in one buffer of each pair; which one is decided on the host from
    // the number of digit passes (no synchronisation).
    cub::DoubleBuffer<unsigned long long> keys(s.keys_in, s.keys_out);
    cub::DoubleBuffer<int32_t> index(s.pairs_in, s.pairs_out);
    size_t temp_bytes = s.temp_bytes;
    SAPATTN_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(s.temp, temp_bytes, keys, index, static_cast<int>(pairs), 0,
                                                       s.end_bit, st));
    const int32_t* ranked = index.Current();
    // The keys are spent: one of their buffers takes the ranked areas, then their prefix sums.
    unsigned long long* before = keys.Current();
    ranked_area_kernel<<<pair_blocks, kThreads, 0, st>>>(p, pairs, ranked, before);
    SAPATTN_CUDA_CHECK_LAUNCH();
    temp_bytes = s.temp_bytes;
    SAPATTN_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(s.temp, temp_bytes, before, static_cast<int>(pairs), st));
    head_mark_kernel<<<pair_blocks, kThreads, 0, st>>>(p, pairs, ranked, before, s.remaining);
    SAPATTN_CUDA_CHECK_LAUNCH();
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
