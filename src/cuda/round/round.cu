// round_query_clusters on the GPU (include/sapattn/ops.hpp): the CPU reference (src/cpu/round.cpp)
// step by step, so that both write the same labels and sizes. A fixed sequence of launches on the
// caller's stream, no allocation, no synchronisation (but the value check's):
//   1. the label sort (permute/label_sort.hpp): every head's points grouped by label, in index order,
//      and the cluster offsets; a label outside [0, Cq) raises the value flag, and so does a negative
//      key-cluster size (validate_kernel);
//   2. roles (one block per head): counts, the role choice and the targets, in shared memory by one
//      thread (the reference's integer loops); the mask rows as bits, |c|^2 of the query centroids,
//      the donors' points (prefilter) or the candidates in index order (no prefilter: a block scan);
//   3. the flat tile lists of the cost kernels (one block scans the heads' candidate counts), so
//      that their blocks share every head's tiles whatever B*H is;
//   4. with the prefilter: each donor point's best distance cost (round_cost.cu), then its rank
//      within its donor by (cost, index), which places the kept ones in the reference's order;
//   5. the mass cost and each candidate's ranked targets (round_cost.cu);
//   6. the matching (one block per head): the rounds of proposals and acceptances of the reference,
//      every rank within a donor or a target counted by comparing (cost, candidate) pairs, a warp
//      per donor or target, so that the order in which threads see them does not matter; then the
//      moves of whole donor tails.
// The order-dependent floating-point steps all sit in round_cost.cu. A bad label or a negative
// key-cluster size anywhere leaves every head untouched (sizes included), as the CPU's checks do.
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <atomic>
#include <string>

#include "core/round_arithmetic.hpp"
#include "cuda/permute/label_sort.hpp"
#include "cuda/round/round_internal.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda {

namespace qround {
namespace {

constexpr int kPlanThreads = 256;
constexpr int kScanItems = 4;  // points per thread of the roles kernel's scan
constexpr int kSelectThreads = 256;
constexpr int kSelectBlocksPerHead = 8;
// 8 warps per head for the matching's ranks (a warp per group); at 512 or 1024 threads ptxas spills.
constexpr int kMatchThreads = 256;
constexpr int kMatchWarps = kMatchThreads / 32;
// The matching's launch bound: 4 blocks per SM, at most 64 registers, the occupancy its sm_90 code had
// (62 registers). With no minimum, ptxas aimed at 5 blocks (48 registers) and spilled 32-40 bytes of
// loop bounds, on sm_80 and, once the kernel lost its 64-bit division, on sm_90. The grid is one block
// per head, so a fifth block per SM would take more than 4 heads per SM (B*H > 528 on an H100).
constexpr int kMatchMinBlocks = 4;
constexpr int kDonor = 1, kReceiver = 2;  // roles in the roles kernel's shared memory

struct PlanParams {
  Dims dims;
  Work w;
  const float* qc = nullptr;     // [B*H, C, D]
  const int32_t* ks = nullptr;   // [B*H, Ck]
  const uint8_t* mask = nullptr; // [B,H,C,Ck], strides in elements
  int64_t mask_stride[4] = {0, 0, 0, 0};
  const int32_t* labels = nullptr;
  int64_t labels_stride_b = 0, labels_stride_h = 0;
  int32_t* sizes = nullptr;      // [B*H, C]
  int candidates = 0;
};

// Per-head slices of the workspace arrays.
struct HeadWork {
  const int32_t *sorted, *offsets;
  int32_t *give, *placed_of, *group_off, *donor_off, *targets, *need, *cap, *received, *room, *bucket_off, *bucket_fill;
  float* c2;
  uint32_t* rowbits;
  int32_t *pts0, *pts, *donor, *members, *p_of_point, *cand_idx;
  float* best;
  double* cand_cost;
  int32_t *first, *dest, *offer, *bucket;
  double* cur;
};

__device__ HeadWork head_work(const Work& w, const Dims& d, int64_t bh) {
  const int64_t C = d.C, N = d.N, Pb = d.Pb;
  return {w.sorted + bh * N,          w.offsets + bh * (C + 1),  w.give + bh * C,      w.placed_of + bh * C,
          w.group_off + bh * (C + 1), w.donor_off + bh * (C + 1), w.targets + bh * C,  w.need + bh * C,
          w.cap + bh * C,             w.received + bh * C,        w.room + bh * C,     w.bucket_off + bh * (C + 1),
          w.bucket_fill + bh * C,     w.c2 + bh * C,              w.rowbits + bh * C * d.W,
          w.pts0 + bh * N,            w.pts + bh * Pb,            w.donor + bh * Pb,   w.members + bh * Pb,
          w.p_of_point + bh * N,      w.cand_idx + bh * Pb * d.kk, w.best + bh * N,    w.cand_cost + bh * Pb * d.kk,
          w.first + bh * Pb,          w.dest + bh * Pb,           w.offer + bh * Pb,   w.bucket + bh * Pb,
          w.cur + bh * Pb};
}

// ---------------------------------------------------------------------------------------------
// 2. Roles
// ---------------------------------------------------------------------------------------------

// The reference's role choice (CpuHead::rebalance, step 1) over the counts n[0..C), by one thread:
// writes kind[c] and the per-cluster and per-target arrays; returns the head's HeadInfo fields.
__device__ HeadInfo choose_roles(const PlanParams& p, const HeadWork& hw, const int32_t* n, int32_t* order,
                                 int32_t* kind) {
  const int64_t C = p.dims.C;
  const int slack = p.dims.slack;
  int hist[kBlock] = {};
  int64_t optional_cap = 0, tot_dmin = 0, tot_dmax = 0;
  for (int64_t c = 0; c < C; ++c) {
    const int t = n[c] % kBlock;
    if (t != 0 && t < kBlock - slack) {
      ++hist[t];
      tot_dmin += kBlock - slack - t;
      tot_dmax += kBlock - t;
    } else if (t > 0) {
      optional_cap += kBlock - t;
    }
  }
  // The open clusters by ascending tail, ties by index: a stable counting sort.
  int no = 0;
  for (int t = 0; t < kBlock; ++t) {
    const int h = hist[t];
    hist[t] = no;
    no += h;
  }
  for (int64_t c = 0; c < C; ++c) {
    const int t = n[c] % kBlock;
    if (t != 0 && t < kBlock - slack) order[hist[t]++] = static_cast<int32_t>(c);
  }
  int64_t best_k = 0, best_pad = 0, best_supply = 0, supply = 0, pre_dmin = 0, pre_dmax = 0;
  for (int64_t k = 0; k <= no; ++k) {
    if (k > 0) {
      const int t = n[order[k - 1]] % kBlock;
      supply += t;
      pre_dmin += kBlock - slack - t;
      pre_dmax += kBlock - t;
    }
    const int64_t dmin = tot_dmin - pre_dmin, dmax = tot_dmax - pre_dmax + optional_cap;
    const int64_t excess = supply - dmax;
    const int64_t pad = supply < dmin ? dmin - supply : (excess > 0 ? ((-excess) % kBlock + kBlock) % kBlock : 0);
    if (k == 0 || pad < best_pad || (pad == best_pad && supply < best_supply)) {
      best_k = k, best_pad = pad, best_supply = supply;
    }
  }
  for (int64_t c = 0; c < C; ++c) kind[c] = 0;
  for (int64_t i = 0; i < no; ++i) kind[order[i]] = i < best_k ? kDonor : kReceiver;
  // Targets: every cluster with capacity, ascending; donors' groups in label order.
  HeadInfo info{};
  int64_t P0 = 0, P = 0;
  for (int64_t c = 0; c < C; ++c) {
    const int t = n[c] % kBlock;
    hw.donor_off[c] = static_cast<int32_t>(P0);
    hw.group_off[c] = static_cast<int32_t>(P);
    hw.give[c] = kind[c] == kDonor ? t : 0;
    if (kind[c] == kDonor) {
      P0 += n[c];
      P += p.dims.prefilter > 0 ? min_of<int64_t>(static_cast<int64_t>(p.dims.prefilter) * t, n[c]) : n[c];
    } else if (t > 0 && (kind[c] == kReceiver || t >= kBlock - slack)) {
      hw.targets[info.R] = static_cast<int32_t>(c);
      hw.need[info.R] = kind[c] == kReceiver ? kBlock - slack - t : 0;
      hw.cap[info.R] = kBlock - t;
      ++info.R;
    }
  }
  hw.donor_off[C] = static_cast<int32_t>(P0);
  hw.group_off[C] = static_cast<int32_t>(P);
  info.P0 = static_cast<int32_t>(P0);
  info.P = static_cast<int32_t>(P);
  info.kk = min_of(p.candidates, info.R);
  info.active = best_k > 0 && info.R > 0;
  return info;
}

// A label outside [0, Cq) (the sort put it past the last cluster and raised the flag) or a negative
// key-cluster size anywhere in the call: no head is touched, as on the CPU.
__global__ void __launch_bounds__(kPlanThreads) validate_kernel(Dims d, const int32_t* offsets, const int32_t* ks,
                                                                int* bad, int* flag) {
  const int64_t bh = blockIdx.x;
  if (threadIdx.x == 0 && offsets[bh * (d.C + 1) + d.C] != d.N) atomicOr(bad, 1);
  for (int64_t j = threadIdx.x; j < d.Ck; j += kPlanThreads)
    if (ks[bh * d.Ck + j] < 0) {
      atomicOr(flag, kBadSize);
      atomicOr(bad, 1);
    }
}

__global__ void __launch_bounds__(kPlanThreads) plan_kernel(PlanParams p) {
  using Scan = cub::BlockScan<int32_t, kPlanThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ HeadInfo s_info;
  __shared__ int32_t s_carry;
  extern __shared__ int32_t smem_i32[];
  const int64_t bh = blockIdx.x;
  const Dims& d = p.dims;
  const int64_t C = d.C, Ck = d.Ck, N = d.N, D = d.D, W = d.W;
  const HeadWork hw = head_work(p.w, d, bh);
  int32_t* n = smem_i32;        // [C]
  int32_t* order = n + C;       // [C]
  int32_t* kind = order + C;    // [C]
  const int tid = static_cast<int>(threadIdx.x);
  const int32_t* ks = p.ks + bh * Ck;
  if (*p.w.bad != 0) {
    if (tid == 0) p.w.info[bh] = HeadInfo{};
    return;
  }
  int any_key = 0;
  for (int64_t j = tid; j < Ck; j += kPlanThreads) any_key |= ks[j] > 0;
  any_key = __syncthreads_or(any_key);
  for (int64_t c = tid; c < C; c += kPlanThreads) {
    n[c] = hw.offsets[c + 1] - hw.offsets[c];
    p.sizes[bh * C + c] = n[c];
  }
  __syncthreads();
  if (tid == 0) {
    s_info = choose_roles(p, hw, n, order, kind);
    s_info.any_key = any_key;
    p.w.info[bh] = s_info;
  }
  __syncthreads();
  if (!s_info.active) return;
  const float* qc = p.qc + bh * C * D;
  for (int64_t c = tid; c < C; c += kPlanThreads) hw.c2[c] = round_math::lane_dot(qc + c * D, qc + c * D, D);
  const int64_t b = bh / d.H, h = bh % d.H;
  const uint8_t* mask = p.mask + b * p.mask_stride[0] + h * p.mask_stride[1];
  for (int64_t e = tid; e < C * W; e += kPlanThreads) {
    const int64_t a = e / W, j0 = (e % W) * 32;
    uint32_t bits = 0;
    for (int64_t l = 0; l < 32 && j0 + l < Ck; ++l)
      bits |= static_cast<uint32_t>(mask[a * p.mask_stride[2] + (j0 + l) * p.mask_stride[3]] != 0) << l;
    hw.rowbits[e] = bits;
  }
  if (d.prefilter > 0) {  // the donors' points, grouped by donor in label order, each in index order
    for (int64_t c = 0; c < C; ++c) {
      if (kind[c] != kDonor) continue;
      for (int64_t u = tid; u < n[c]; u += kPlanThreads) hw.pts0[hw.donor_off[c] + u] = hw.sorted[hw.offsets[c] + u];
    }
    return;
  }
  // No prefilter: the candidates are the donors' points in index order (a block scan over N).
  const int32_t* labels = p.labels + b * p.labels_stride_b + h * p.labels_stride_h;
  if (tid == 0) s_carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < N; base += kPlanThreads * kScanItems) {
    int32_t flags[kScanItems], pos[kScanItems];
    for (int k = 0; k < kScanItems; ++k) {
      const int64_t i = base + tid * kScanItems + k;
      flags[k] = i < N && kind[labels[i]] == kDonor;
    }
    int32_t total = 0;
    Scan(scan_storage).ExclusiveSum(flags, pos, total);
    const int32_t carry = s_carry;
    for (int k = 0; k < kScanItems; ++k) {
      if (!flags[k]) continue;
      const int64_t i = base + tid * kScanItems + k, q = carry + pos[k];
      hw.pts[q] = static_cast<int32_t>(i);
      hw.donor[q] = labels[i];
      hw.p_of_point[i] = static_cast<int32_t>(q);
    }
    __syncthreads();
    if (tid == 0) s_carry = carry + total;
    __syncthreads();
  }
  for (int64_t c = 0; c < C; ++c) {
    if (kind[c] != kDonor) continue;
    for (int64_t u = tid; u < n[c]; u += kPlanThreads)
      hw.members[hw.group_off[c] + u] = hw.p_of_point[hw.sorted[hw.offsets[c] + u]];
  }
}

// The flat tile lists of the cost kernels (round_internal.hpp): head bh's prefilter tiles,
// ceil(P0 / tile_rows) of them (none when nothing moves), start at tiles0[bh], its mass-cost tiles,
// ceil(P / tile_rows), at tiles[bh]. One block scans over B*H.
__global__ void __launch_bounds__(kPlanThreads) tile_lists_kernel(Dims d, Work w) {
  using Scan = cub::BlockScan<int32_t, kPlanThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int32_t s_carry[2];
  if (threadIdx.x == 0) s_carry[0] = s_carry[1] = 0;
  __syncthreads();
  for (int64_t base = 0; base < d.BH; base += kPlanThreads) {
    const int64_t bh = base + threadIdx.x;
    const HeadInfo info = bh < d.BH ? w.info[bh] : HeadInfo{};
    const int32_t rows = static_cast<int32_t>(d.tile_rows);
    const int32_t n0 = info.active ? (info.P0 + rows - 1) / rows : 0;
    const int32_t n = info.active ? (info.P + rows - 1) / rows : 0;
    int32_t pos0 = 0, pos = 0, total0 = 0, total = 0;
    Scan(scan_storage).ExclusiveSum(n0, pos0, total0);
    __syncthreads();  // the scan's storage is used again
    Scan(scan_storage).ExclusiveSum(n, pos, total);
    if (bh < d.BH) {
      w.tiles0[bh] = s_carry[0] + pos0;
      w.tiles[bh] = s_carry[1] + pos;
    }
    __syncthreads();
    if (threadIdx.x == 0) s_carry[0] += total0, s_carry[1] += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) w.tiles0[d.BH] = s_carry[0], w.tiles[d.BH] = s_carry[1];
}

// ---------------------------------------------------------------------------------------------
// 3. The prefilter's choice: donor point u is kept when fewer than F * t points of its donor come
// before it by (best, position); its rank is its place among the donor's candidates.
// ---------------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kSelectThreads) select_kernel(Dims d, Work w, const int32_t* labels,
                                                                int64_t labels_stride_b, int64_t labels_stride_h) {
  const int64_t bh = blockIdx.y;
  const HeadInfo info = w.info[bh];
  if (!info.active) return;
  const HeadWork hw = head_work(w, d, bh);
  const int32_t* lab = labels + (bh / d.H) * labels_stride_b + (bh % d.H) * labels_stride_h;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kSelectThreads + threadIdx.x; u < info.P0;
       u += static_cast<int64_t>(gridDim.x) * kSelectThreads) {
    const int32_t i = hw.pts0[u], c = lab[i];
    const int64_t keep = static_cast<int64_t>(d.prefilter) * hw.give[c];
    const float bu = hw.best[u];
    int64_t rank = 0;
    for (int64_t v = hw.donor_off[c]; v < hw.donor_off[c + 1] && rank < keep; ++v) {
      const float bv = hw.best[v];
      rank += bv < bu || (bv == bu && v < u);
    }
    if (rank < keep) {
      const int64_t q = hw.group_off[c] + rank;
      hw.pts[q] = i;
      hw.donor[q] = c;
      hw.members[q] = static_cast<int32_t>(q);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 5. Matching
// ---------------------------------------------------------------------------------------------

// (a, pa) before (b, pb): by cost, then candidate order.
__device__ __forceinline__ bool ahead(double a, int32_t pa, double b, int32_t pb) {
  return a < b || (a == b && pa < pb);
}

// Ranks within one group by comparison counting, by one warp: the group is the candidates
// ids[lo, hi), those with in(q) take part, ranked by (cur[q], q); visit(p, rank) for each of them.
// A batch of 32 members (one per lane) meets the group 32 members at a time, broadcast by shuffles,
// so every read is a coalesced load (the previous design had each thread walk its group through
// dependent global loads: about 0.5 to 1 ms per Wan 14B call). Every rank is a count, so the order
// in which members meet does not matter.
template <class In, class Visit>
__device__ __forceinline__ void rank_group(const int32_t* ids, int32_t lo, int32_t hi, const double* cur, In&& in,
                                           Visit&& visit) {
  constexpr unsigned kAll = 0xffffffffu;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  for (int32_t a = lo; a < hi; a += 32) {
    const int32_t p = a + lane < hi ? ids[a + lane] : -1;
    const bool take = p >= 0 && in(p);
    const double cp = take ? cur[p] : 0.0;
    int32_t rank = 0;
    for (int32_t b = lo; b < hi; b += 32) {
      int32_t q0 = b + lane < hi ? ids[b + lane] : -1;
      if (q0 >= 0 && !in(q0)) q0 = -1;  // -1: takes no part (one shuffle fewer per member)
      const double cq0 = q0 >= 0 ? cur[q0] : 0.0;
      const int n = min_of(32, hi - b);
      for (int k = 0; k < n; ++k) {
        const int32_t q = __shfl_sync(kAll, q0, k);
        const double cq = __shfl_sync(kAll, cq0, k);
        rank += q >= 0 && ahead(cq, q, cp, p);
      }
    }
    if (take) visit(p, rank);
  }
}

__global__ void __launch_bounds__(kMatchThreads, kMatchMinBlocks)
    match_kernel(Dims d, Work w, int32_t* labels, int64_t labels_stride_b, int64_t labels_stride_h, int32_t* sizes) {
  using Scan = cub::BlockScan<int32_t, kMatchThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int s_any;
  __shared__ int32_t s_carry;
  const uint32_t bh = blockIdx.x;  // < 65536: b and h by a 32-bit division, not a called subroutine
  const HeadInfo info = w.info[bh];
  if (!info.active) return;
  const HeadWork hw = head_work(w, d, bh);
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32;
  const int32_t P = info.P, R = info.R, kk = info.kk, C = static_cast<int32_t>(d.C);
  for (int32_t p = tid; p < P; p += kMatchThreads) hw.dest[p] = -1;
  for (int32_t r = tid; r < R; r += kMatchThreads) hw.received[r] = 0;
  for (int32_t c = tid; c < C; c += kMatchThreads) hw.placed_of[c] = 0;
  __syncthreads();
  for (int phase = 0; phase < 2; ++phase) {
    for (int round = 0; round < d.rounds; ++round) {
      for (int32_t r = tid; r < R; r += kMatchThreads) {
        hw.room[r] = phase == 0 ? max_of(0, hw.need[r] - hw.received[r]) : hw.cap[r] - hw.received[r];
        hw.bucket_fill[r] = 0;
      }
      if (tid == 0) s_any = 0;
      __syncthreads();
      // Every unplaced candidate picks its cheapest ranked target with room.
      for (int32_t p = tid; p < P; p += kMatchThreads) {
        int32_t f = -1;
        double c = INFINITY;
        if (hw.dest[p] < 0) {
          for (int32_t j = 0; j < kk; ++j) {
            const double cj = hw.cand_cost[static_cast<int64_t>(p) * kk + j];
            if (isfinite(cj) && hw.room[hw.cand_idx[static_cast<int64_t>(p) * kk + j]] > 0) {
              f = j, c = cj;
              break;
            }
          }
        }
        hw.first[p] = f;
        hw.cur[p] = c;
        hw.offer[p] = -1;
      }
      __syncthreads();
      // Per donor, its (t - placed) cheapest picks are offered: a warp per donor.
      for (int32_t c = warp; c < C; c += kMatchWarps) {
        const int32_t limit = hw.give[c] - hw.placed_of[c];
        if (limit <= 0) continue;  // not a donor, or its whole tail is placed
        const int32_t* first = hw.first;
        rank_group(
            hw.members, hw.group_off[c], hw.group_off[c + 1], hw.cur, [=](int32_t q) { return first[q] >= 0; },
            [=](int32_t p, int32_t rank) {
              if (rank >= limit) return;
              const int32_t to = hw.cand_idx[static_cast<int64_t>(p) * kk + first[p]];
              atomicAdd(&hw.bucket_fill[to], 1);
              hw.offer[p] = to;
              s_any = 1;
            });
      }
      __syncthreads();
      if (!s_any) break;  // the same answer in every thread: a phase ends when nothing is offered
      // The offers grouped by target: the counts scanned, then each offer takes a slot.
      if (tid == 0) s_carry = 0;
      __syncthreads();
      for (int32_t base = 0; base < R; base += kMatchThreads) {
        const int32_t r = base + tid;
        const int32_t count = r < R ? hw.bucket_fill[r] : 0;
        int32_t pos = 0, total = 0;
        Scan(scan_storage).ExclusiveSum(count, pos, total);
        if (r < R) {
          hw.bucket_off[r] = s_carry + pos;
          hw.bucket_fill[r] = 0;
        }
        __syncthreads();
        if (tid == 0) s_carry += total;
        __syncthreads();
      }
      for (int32_t p = tid; p < P; p += kMatchThreads) {
        const int32_t r = hw.offer[p];
        if (r >= 0) hw.bucket[hw.bucket_off[r] + atomicAdd(&hw.bucket_fill[r], 1)] = p;
      }
      __syncthreads();
      // Each target accepts its cheapest offers up to the room it had at the round's start: a warp
      // per target.
      for (int32_t r = warp; r < R; r += kMatchWarps) {
        const int32_t room = hw.room[r], lo = hw.bucket_off[r];
        rank_group(
            hw.bucket, lo, lo + hw.bucket_fill[r], hw.cur, [](int32_t) { return true; },
            [=](int32_t p, int32_t rank) {
              if (rank >= room) return;
              hw.dest[p] = r;
              atomicAdd(&hw.placed_of[hw.donor[p]], 1);
              atomicAdd(&hw.received[r], 1);
            });
      }
      __syncthreads();
    }
  }
  // A donor moves its whole tail or nothing.
  const uint32_t H = static_cast<uint32_t>(d.H);
  int32_t* lab = labels + (bh / H) * labels_stride_b + (bh % H) * labels_stride_h;
  int32_t* sz = sizes + bh * d.C;
  for (int32_t p = tid; p < P; p += kMatchThreads) {
    const int32_t r = hw.dest[p], c = hw.donor[p];
    if (r < 0 || hw.placed_of[c] != hw.give[c]) continue;
    const int32_t target = hw.targets[r];
    lab[hw.pts[p]] = target;
    atomicSub(&sz[c], 1);
    atomicAdd(&sz[target], 1);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

Dims make_dims(int64_t batch_heads, int64_t points, int64_t q_clusters, int64_t k_clusters, int slack, int prefilter,
               int candidates) {
  Dims d;
  d.BH = batch_heads;
  d.N = points;
  d.C = q_clusters;
  d.Ck = k_clusters;
  d.W = (k_clusters + 31) / 32;
  d.slack = slack;
  d.prefilter = prefilter;
  // A donor's tail is at most 63 - slack, and it keeps at most F times that many candidates.
  const int64_t per_prefilter = (kBlock - 1 - slack) * q_clusters;
  if (prefilter == 0)
    d.Pb = points;
  else if (per_prefilter == 0)
    d.Pb = 0;
  else  // F * per > N exactly when F > floor(N / per); otherwise the product cannot overflow
    d.Pb = prefilter > points / per_prefilter ? points : prefilter * per_prefilter;
  d.kk = std::min<int64_t>(candidates, q_clusters);
  d.blocks = cost_blocks(batch_heads);
  d.c_pad = (q_clusters + kTcKeys - 1) / kTcKeys * kTcKeys;
  d.ck_pad = (k_clusters + kTcKeys - 1) / kTcKeys * kTcKeys;
  d.v_cols = (q_clusters + kTcCols - 1) / kTcCols * kTcCols;
  d.Dp = kTcMaxDim;  // the scratch holds the largest operands; a call sets its own
  return d;
}

// The workspace's slices; `sort` and the Work's pointers are set only with a real workspace. Both cost
// paths' scratch is carved (the size query does not know the dtype, the device or the override).
Work carve_work(Carver& c, const Dims& d, LabelSort& sort) {
  const int64_t BH = d.BH, C = d.C, N = d.N, Pb = d.Pb;
  sort = carve_label_sort(c, BH, N, C);
  Work w;
  w.bad = c.take<int>(1);
  w.sorted = sort.index_out;
  w.offsets = c.take<int32_t>(BH * (C + 1));
  w.info = c.take<HeadInfo>(BH);
  for (int32_t** a : {&w.give, &w.placed_of, &w.targets, &w.need, &w.cap, &w.received, &w.room, &w.bucket_fill})
    *a = c.take<int32_t>(BH * C);
  for (int32_t** a : {&w.group_off, &w.donor_off, &w.bucket_off}) *a = c.take<int32_t>(BH * (C + 1));
  w.c2 = c.take<float>(BH * C);
  w.rowbits = c.take<uint32_t>(BH * C * d.W);
  if (d.prefilter > 0) {
    w.pts0 = c.take<int32_t>(BH * N);
    w.best = c.take<float>(BH * N);
  } else {
    w.p_of_point = c.take<int32_t>(BH * N);
  }
  for (int32_t** a : {&w.pts, &w.donor, &w.members, &w.first, &w.dest, &w.offer, &w.bucket})
    *a = c.take<int32_t>(BH * Pb);
  w.cur = c.take<double>(BH * Pb);
  w.cand_idx = c.take<int32_t>(BH * Pb * d.kk);
  w.cand_cost = c.take<double>(BH * Pb * d.kk);
  w.tiles0 = c.take<int32_t>(BH + 1);
  w.tiles = c.take<int32_t>(BH + 1);
  w.tile_z = c.take<double>(d.blocks * kTile * d.Ck);
  w.tile_cost = c.take<double>(d.blocks * kTile * C);
  w.qc_op = c.take<uint16_t>(BH * d.c_pad * kTcMaxDim);
  w.pf_bias = c.take<float>(BH * d.c_pad);
  w.kc_op = c.take<uint16_t>(BH * d.ck_pad * kTcMaxDim);
  w.k_bias = c.take<float>(BH * d.ck_pad);
  w.v_op = c.take<uint16_t>(BH * d.ck_pad * d.v_cols);
  w.tile_mass = c.take<float>(d.blocks * kTcRows * d.v_cols);
  return w;
}

// set_round_kernel_override's choice: kDefault, kExact or kTensorCores (process-wide).
constexpr int kDefault = 0, kExact = 1, kTensorCores = 2;
std::atomic<int> g_round_kernel{kDefault};

}  // namespace

bool round_on_tensor_cores(DType dtype, int64_t dim, int device) {
  const int kernel = g_round_kernel.load();
  if (kernel == kExact) return false;
  const bool fits = dim <= kTcMaxDim && device_arch(device).major >= 8;
  if (kernel == kTensorCores) {
    SAPATTN_CHECK(fits, UnsupportedError, "round_query_clusters on tensor cores needs an sm_80+ GPU and a head dim of ",
                  "at most ", kTcMaxDim, " (got ", dim, " on cuda:", device, ")");
    return true;
  }
  return fits && (dtype == DType::BF16 || dtype == DType::F16);
}

RankedCosts read_ranked_costs(const void* workspace, int64_t batch_heads, int64_t points, int64_t q_clusters,
                              int64_t k_clusters, int slack, int prefilter, int candidates) {
  const Dims d = make_dims(batch_heads, points, q_clusters, k_clusters, slack, prefilter, candidates);
  Carver carver("read_ranked_costs", Workspace{const_cast<void*>(workspace), ~size_t{0} >> 1});
  LabelSort sort;
  const Work w = carve_work(carver, d, sort);
  RankedCosts out;
  out.C = d.C;
  out.Pb = d.Pb;
  out.kk_max = d.kk;
  auto copy = [](auto& v, const auto* src, int64_t n) {
    v.resize(static_cast<size_t>(n));
    SAPATTN_CUDA_CHECK(cudaMemcpy(v.data(), src, v.size() * sizeof(v[0]), cudaMemcpyDeviceToHost));
  };
  copy(out.info, w.info, d.BH);
  copy(out.pts, w.pts, d.BH * d.Pb);
  copy(out.donor, w.donor, d.BH * d.Pb);
  copy(out.targets, w.targets, d.BH * d.C);
  copy(out.cand_idx, w.cand_idx, d.BH * d.Pb * d.kk);
  copy(out.cand_cost, w.cand_cost, d.BH * d.Pb * d.kk);
  return out;
}

}  // namespace qround

void set_round_kernel_override(const char* name) {
  using namespace qround;
  const std::string n = name == nullptr ? "" : name;
  SAPATTN_CHECK(n.empty() || n == "exact" || n == "tc", InvalidArgumentError, "unknown round kernel override '", n,
                "' (expected \"exact\", \"tc\" or \"\")");
  g_round_kernel.store(n == "exact" ? kExact : n == "tc" ? kTensorCores : kDefault);
}

size_t round_query_clusters_workspace_bytes(int64_t batch_heads, int64_t points, int64_t q_clusters,
                                            int64_t k_clusters, int slack, int prefilter, int candidates) {
  Carver carver("round_query_clusters");
  LabelSort sort;
  qround::carve_work(carver,
                     qround::make_dims(batch_heads, points, std::max<int64_t>(q_clusters, 1), k_clusters, slack,
                                       prefilter, candidates),
                     sort);
  return carver.used();
}

void round_query_clusters(const TensorView& q, const TensorView& q_centroids, const TensorView& k_centroids,
                          const TensorView& k_sizes, const TensorView& mask, float scale, int slack, float max_cost,
                          int prefilter, int rounds, int candidates, TensorView labels, TensorView sizes,
                          const Stream& stream, Workspace workspace) {
  using namespace qround;
  const int64_t B = q.shape[0], H = q.shape[1], N = q.shape[2], D = q.shape[3];
  const int64_t C = q_centroids.shape[2], Ck = k_centroids.shape[2];
  if (B * H == 0) return;
  SAPATTN_CHECK(C <= kMaxClusters, UnsupportedError, "round_query_clusters on CUDA takes at most ", kMaxClusters,
                " query clusters, got ", C);
  SAPATTN_CHECK(D <= 1024, UnsupportedError, "round_query_clusters on CUDA takes a head dim of at most 1024, got ", D);
  SAPATTN_CHECK(B * H <= 65535, UnsupportedError, "round_query_clusters on CUDA takes at most 65535 (b,h) pairs");
  const DeviceGuard guard(stream.device);
  Dims dims = make_dims(B * H, N, C, Ck, slack, prefilter, candidates);
  dims.H = H;
  dims.D = D;
  dims.rounds = rounds;
  dims.scale = scale;
  dims.max_cost = static_cast<double>(max_cost);
  const bool tc = round_on_tensor_cores(q.dtype, D, stream.device.index);
  Carver carver("round_query_clusters", workspace);
  LabelSort sort;
  const Work w = carve_work(carver, dims, sort);
  carver.check();
  dims.tile_rows = tc ? kTcRows : kTile;
  dims.Dp = D <= 64 ? 64 : kTcMaxDim;
  const cudaStream_t s = stream_of(stream);
  const bool checked = begin_value_check(stream);

  auto* lab = static_cast<int32_t*>(labels.data);
  sort_by_label(sort, LabelsView{lab, labels.stride[0], labels.stride[1], B, H, N}, s);
  label_offsets(sort, w.offsets, nullptr, s);

  PlanParams plan;
  plan.dims = dims;
  plan.w = w;
  plan.qc = static_cast<const float*>(q_centroids.data);
  plan.ks = static_cast<const int32_t*>(k_sizes.data);
  plan.mask = static_cast<const uint8_t*>(mask.data);
  for (int i = 0; i < 4; ++i) plan.mask_stride[i] = mask.stride[i];
  plan.labels = lab;
  plan.labels_stride_b = labels.stride[0];
  plan.labels_stride_h = labels.stride[1];
  plan.sizes = static_cast<int32_t*>(sizes.data);
  plan.candidates = candidates;
  SAPATTN_CUDA_CHECK(cudaMemsetAsync(w.bad, 0, sizeof(int), s));
  validate_kernel<<<static_cast<unsigned>(B * H), kPlanThreads, 0, s>>>(dims, w.offsets, plan.ks, w.bad,
                                                                          value_error_flag());
  SAPATTN_CUDA_CHECK_LAUNCH();
  const size_t plan_smem = 3 * static_cast<size_t>(C) * sizeof(int32_t);
  set_max_dynamic_smem(reinterpret_cast<const void*>(&plan_kernel), static_cast<int>(plan_smem));
  plan_kernel<<<static_cast<unsigned>(B * H), kPlanThreads, plan_smem, s>>>(plan);
  SAPATTN_CUDA_CHECK_LAUNCH();
  tile_lists_kernel<<<1, kPlanThreads, 0, s>>>(dims, w);
  SAPATTN_CUDA_CHECK_LAUNCH();

  CostInputs in;
  in.q = points_view(q);
  in.qc = plan.qc;
  in.kc = static_cast<const float*>(k_centroids.data);
  in.ks = plan.ks;
  in.labels = lab;
  in.labels_stride_b = labels.stride[0];
  in.labels_stride_h = labels.stride[1];
  in.vector_rows = D % 4 == 0 && reinterpret_cast<uintptr_t>(q_centroids.data) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(k_centroids.data) % 16 == 0;
  if (tc) launch_tc_operands(in, dims, w, s);
  if (prefilter > 0) {
    if (tc)
      launch_prefilter_tc(in, dims, w, q.dtype, s);
    else
      launch_prefilter(in, dims, w, q.dtype, s);
    select_kernel<<<dim3(kSelectBlocksPerHead, static_cast<unsigned>(B * H)), kSelectThreads, 0, s>>>(
        dims, w, lab, labels.stride[0], labels.stride[1]);
    SAPATTN_CUDA_CHECK_LAUNCH();
  }
  if (tc)
    launch_mass_cost_tc(in, dims, w, q.dtype, s);
  else
    launch_mass_cost(in, dims, w, q.dtype, s);
  match_kernel<<<static_cast<unsigned>(B * H), kMatchThreads, 0, s>>>(dims, w, lab, labels.stride[0],
                                                                       labels.stride[1], plan.sizes);
  SAPATTN_CUDA_CHECK_LAUNCH();
  if (checked) end_value_check(stream, "round_query_clusters");
}

}  // namespace sapattn::cuda
