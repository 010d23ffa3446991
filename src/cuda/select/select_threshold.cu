// select_blocks' default kernel: the top-p crossing of each row found by a threshold search over the
// weights instead of a ranking of all of them (docs/cuda.md, "Selection").
//
// A block takes kRows query centroids of one (b,h) and every key centroid:
//   1. scores S = q . k^T by fp32 FMA, as a small GEMM: key centroids stream through shared memory in
//      tiles of 256 columns x 32 dims (stored [d][j]), each thread owns a (kRows/4) x 4 block of
//      scores, so one broadcast read of q and one of k feed 4 * kRows/4 FMAs. Scores are kept in
//      log2 units (scale * log2 e), a row per kRows in shared memory.
//   2. per row, one warp: the max over non-empty key clusters, the weights u_j = |K_j| 2^(s_j - m)
//      and their fp32 total (lane order, then a butterfly: deterministic), and each weight's mass as
//      an integer, round(u_j 2^31 / total) (the masses sum to about 2^31 < 2^32).
//   3. the crossing: the key clusters ranked by weight descending would keep the shortest prefix
//      whose mass reaches target = ceil(top_p * total mass). A radix search over the weights' float
//      bits (non-negative floats order as their bits) finds the weight w* of the crossing cluster
//      and the mass above it in 4 passes of 8 bits, each a 256-bin mass histogram of the clusters
//      still in range (shared-memory integer atomics: the sums do not depend on their order) and a
//      warp scan of the bins from the top. Of the clusters tied at w*, the fewest whose mass reaches
//      the target are kept, lowest index first (the CPU's stable order).
//   4. min_kept: if the crossing keeps fewer, the same search on counts (every cluster weighs 1)
//      finds the min_kept-th weight instead.
//   5. the mask row: weight > w*, or = w* among the first ties.
// No ranking and no sequential sum: the masks differ from the CPU's only where the two backends'
// weights (FMA against separate roundings, exp2 against exp in double) or mass sums (exact integers
// of rounded masses against an fp32 running sum) differ across the cut: docs/cuda.md states the
// tolerance, tests/cuda/test_cuda_select.cpp checks it.
#include <cfloat>
#include <cmath>

#include "cuda/runtime/device.cuh"
#include "cuda/select/select_internal.hpp"

namespace sapattn::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileCols = kThreads;  // key centroids per score tile: one column of loads per thread
constexpr int kDepth = 32;           // head-dim chunk per score tile
constexpr int kBins = 256;           // 8 bits of the weights' keys per pass
constexpr unsigned kFull = 0xffffffffu;
constexpr double kLog2e = 1.4426950408889634;

// Query rows per block: their weights fill 64 KB of shared memory up to 4096 key clusters, 128 KB
// beyond. With the tiles, histograms and sizes a block takes 113 KB at 1024 and 116 KB at 2048 key
// clusters (two blocks per SM), 123 KB at 4096 and 201 KB at 8192 (one).
constexpr int rows_per_block(int64_t cols) { return cols <= 1024 ? 16 : cols <= 2048 ? 8 : 4; }

// Dynamic shared memory, in this order (every part a multiple of 16 bytes): the key tile
// [kDepth][kTileCols], the query tile [kDepth][kRows], a histogram per warp, the weights
// [kRows][stride] and the key-cluster sizes [stride] (stride = Ck rounded up to 4).
template <int kRows>
struct ThresholdLayout {
  static constexpr size_t kKTile = sizeof(float) * kDepth * kTileCols;
  static constexpr size_t kQTile = sizeof(float) * kDepth * kRows;
  static constexpr size_t kHist = sizeof(uint32_t) * kWarps * kBins;
  static constexpr size_t kWeights = kKTile + kQTile + kHist;
  static size_t bytes(int64_t stride) { return kWeights + sizeof(float) * (kRows + 1) * stride; }
};

struct ThresholdParams {
  const float* q_centroids = nullptr;  // [B,H,Cq,D] contiguous
  const float* k_centroids = nullptr;  // [B,H,Ck,D] contiguous
  const int32_t* k_sizes = nullptr;    // [B,H,Ck] contiguous
  uint8_t* mask = nullptr;             // [B,H,Cq,Ck], any strides
  int64_t mask_stride[4] = {0, 0, 0, 0};
  int64_t H = 0, rows = 0, cols = 0, D = 0;
  int64_t stride = 0;        // floats per weight row in shared memory
  float score_scale = 0.0f;  // scale * log2(e): scores in log2 units, so the weights are 2^(s - m)
  float top_p = 1.0f;
  int64_t min_kept = 0;
};

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// A butterfly: every lane adds the same pairs (a + b = b + a), so every lane holds the same sum.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

__device__ __forceinline__ int warp_count(bool pred) { return __popc(__ballot_sync(kFull, pred)); }

struct Crossing {
  uint32_t key = 0;     // float bits of the crossing weight w*
  uint32_t above = 0;   // amount of the weights above w*
  uint32_t target = 0;  // the amount the kept prefix must reach
};

// The weight at which the descending running amount of a row first reaches the target: 4 passes of a
// 256-bin amount histogram over the next 8 bits of the keys still in range. amount(u) is each
// weight's integer amount (the same for equal weights); target_of(total) gives the target from the
// row's total amount, 1 <= target <= total. One warp; hist is its own 256 bins.
template <typename Amount, typename TargetOf>
__device__ Crossing find_crossing(const float* w, int64_t C, int lane, uint32_t* hist, Amount amount,
                                  TargetOf target_of) {
  Crossing c;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int bin = lane; bin < kBins; bin += 32) hist[bin] = 0;
    __syncwarp();
    for (int64_t j = lane; j < C; j += 32) {
      const float u = w[j];
      const uint32_t key = __float_as_uint(u);
      // The keys of the bin the previous passes chose (every key in the first pass).
      if (shift == 24 || (key >> (shift + 8)) == (c.key >> (shift + 8))) {
        const uint32_t a = amount(u);
        if (a != 0) atomicAdd(&hist[(key >> shift) & (kBins - 1)], a);
      }
    }
    __syncwarp();
    // Lane l holds bins 255 - 8l down to 248 - 8l: the scan runs from the largest weights down.
    uint32_t bins[8], local = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      bins[i] = hist[kBins - 1 - 8 * lane - i];
      local += bins[i];
    }
    uint32_t inclusive = local;
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
      const uint32_t v = __shfl_up_sync(kFull, inclusive, o);
      if (lane >= o) inclusive += v;
    }
    if (shift == 24) c.target = target_of(__shfl_sync(kFull, inclusive, 31));
    // The invariant above < target <= above + (amount in range) puts the crossing in some bin.
    const int leader = __ffs(__ballot_sync(kFull, c.above + inclusive >= c.target)) - 1;
    uint32_t bin = 0, before = 0;
    if (lane == leader) {
      before = c.above + inclusive - local;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (before + bins[i] >= c.target) {
          bin = kBins - 1 - 8 * lane - i;
          break;
        }
        before += bins[i];
      }
    }
    c.key |= __shfl_sync(kFull, bin, leader) << shift;
    c.above = __shfl_sync(kFull, before, leader);
    __syncwarp();  // every lane has read the bins before the next pass clears them
  }
  return c;
}

// Writes value to the C entries of a mask row.
__device__ __forceinline__ void fill_row(uint8_t* m, int64_t C, int64_t stride, int first, int step, uint8_t value) {
  for (int64_t j = first; j < C; j += step) m[j * stride] = value;
}

// One block per (b,h, group of kRows query rows). kVec4: D % 4 == 0 (float4 loads).
template <int kRows, bool kVec4>
__global__ void __launch_bounds__(kThreads, 2) select_threshold_kernel(ThresholdParams p) {
  using Layout = ThresholdLayout<kRows>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto k_tile = reinterpret_cast<float(*)[kTileCols]>(smem_raw);
  auto q_tile = reinterpret_cast<float(*)[kRows]>(smem_raw + Layout::kKTile);
  auto hist = reinterpret_cast<uint32_t(*)[kBins]>(smem_raw + Layout::kKTile + Layout::kQTile);
  float* weights = reinterpret_cast<float*>(smem_raw + Layout::kWeights);
  int32_t* sizes = reinterpret_cast<int32_t*>(weights + kRows * p.stride);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int rows_here = static_cast<int>(min_of<int64_t>(kRows, p.rows - row0));
  const int64_t C = p.cols, D = p.D;
  auto mask_row = [&](int r) {
    return p.mask + b * p.mask_stride[0] + h * p.mask_stride[1] + (row0 + r) * p.mask_stride[2];
  };

  int any = 0;
  for (int64_t j = tid; j < C; j += kThreads) {
    const int32_t n = p.k_sizes[bh * C + j];
    sizes[j] = n;
    any |= n > 0;
  }
  // A head whose key clusters are all empty keeps nothing; at top_p = 1 every other row keeps all
  // (NaN rows too), whatever the scores.
  const bool nonempty = __syncthreads_or(any) != 0;
  if (!nonempty || p.top_p >= 1.0f) {
    for (int r = 0; r < rows_here; ++r) fill_row(mask_row(r), C, p.mask_stride[3], tid, kThreads, nonempty ? 1 : 0);
    return;
  }

  // ---- scores ----------------------------------------------------------------------------------
  {
    constexpr int kRowsPerThread = kRows / 4;
    constexpr int kKLoads = kVec4 ? kDepth / 4 : kDepth;  // a thread loads one column's chunk
    constexpr int kQElems = kRows * kDepth;
    constexpr int kQLoads = kVec4 ? 1 : (kQElems + kThreads - 1) / kThreads;
    static_assert(!kVec4 || kQElems / 4 <= kThreads);
    using Load = std::conditional_t<kVec4, float4, float>;
    const int rg = lane / 8, cg = lane % 8;   // the thread's rows rg*kRowsPerThread.., columns
    const int tile_col = warp * 32 + cg * 4;  // tile_col..tile_col+3 of the tile
    const float* qc = p.q_centroids + (bh * p.rows + row0) * D;
    const float* kc = p.k_centroids + bh * C * D;
    const int64_t depth_tiles = max_of<int64_t>(1, ceil_div(D, kDepth));
    const int64_t tiles = depth_tiles * ceil_div(C, kTileCols);

    Load kv[kKLoads], qv[kQLoads];
    auto load = [&](int64_t t) {
      const int64_t j0 = t / depth_tiles * kTileCols, d0 = t % depth_tiles * kDepth;
      const int64_t j = j0 + tid;
#pragma unroll
      for (int u = 0; u < kKLoads; ++u) {
        if constexpr (kVec4) {
          const int64_t d = d0 + 4 * u;
          kv[u] = j < C && d < D ? *reinterpret_cast<const float4*>(kc + j * D + d) : make_float4(0.f, 0.f, 0.f, 0.f);
        } else {
          const int64_t d = d0 + u;
          kv[u] = j < C && d < D ? kc[j * D + d] : 0.0f;
        }
      }
#pragma unroll
      for (int u = 0; u < kQLoads; ++u) {
        if constexpr (kVec4) {
          const int r = tid / 8;
          const int64_t d = d0 + 4 * (tid % 8);
          qv[u] = tid < kQElems / 4 && r < rows_here && d < D ? *reinterpret_cast<const float4*>(qc + r * D + d)
                                                              : make_float4(0.f, 0.f, 0.f, 0.f);
        } else {
          const int e = tid + u * kThreads, r = e / kDepth;
          const int64_t d = d0 + e % kDepth;
          qv[u] = e < kQElems && r < rows_here && d < D ? qc[r * D + d] : 0.0f;
        }
      }
    };
    auto store = [&] {
#pragma unroll
      for (int u = 0; u < kKLoads; ++u) {
        if constexpr (kVec4) {
          k_tile[4 * u + 0][tid] = kv[u].x;  // consecutive threads, consecutive columns: no conflicts
          k_tile[4 * u + 1][tid] = kv[u].y;
          k_tile[4 * u + 2][tid] = kv[u].z;
          k_tile[4 * u + 3][tid] = kv[u].w;
        } else {
          k_tile[u][tid] = kv[u];
        }
      }
#pragma unroll
      for (int u = 0; u < kQLoads; ++u) {
        if constexpr (kVec4) {
          if (tid < kQElems / 4) {
            const int r = tid / 8, d = 4 * (tid % 8);
            q_tile[d + 0][r] = qv[u].x;
            q_tile[d + 1][r] = qv[u].y;
            q_tile[d + 2][r] = qv[u].z;
            q_tile[d + 3][r] = qv[u].w;
          }
        } else {
          const int e = tid + u * kThreads;
          if (e < kQElems) q_tile[e % kDepth][e / kDepth] = qv[u];
        }
      }
    };

    float acc[kRowsPerThread][4];
    load(0);
    for (int64_t t = 0; t < tiles; ++t) {
      __syncthreads();  // the previous tile is consumed
      store();
      __syncthreads();
      if (t + 1 < tiles) load(t + 1);  // in flight during this tile's FMAs
      const int64_t depth_tile = t % depth_tiles;
      if (depth_tile == 0) {
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[r][c] = 0.0f;
      }
#pragma unroll
      for (int d = 0; d < kDepth; ++d) {
        float q[kRowsPerThread];
        if constexpr (kRowsPerThread == 4) {
          const float4 v = *reinterpret_cast<const float4*>(&q_tile[d][rg * 4]);
          q[0] = v.x, q[1] = v.y, q[2] = v.z, q[3] = v.w;
        } else if constexpr (kRowsPerThread == 2) {
          const float2 v = *reinterpret_cast<const float2*>(&q_tile[d][rg * 2]);
          q[0] = v.x, q[1] = v.y;
        } else {
          q[0] = q_tile[d][rg];
        }
        const float4 k = *reinterpret_cast<const float4*>(&k_tile[d][tile_col]);
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r) {
          acc[r][0] = fmaf(q[r], k.x, acc[r][0]);
          acc[r][1] = fmaf(q[r], k.y, acc[r][1]);
          acc[r][2] = fmaf(q[r], k.z, acc[r][2]);
          acc[r][3] = fmaf(q[r], k.w, acc[r][3]);
        }
      }
      if (depth_tile == depth_tiles - 1) {
        const int64_t j0 = t / depth_tiles * kTileCols + tile_col;
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r) {
          const int row = rg * kRowsPerThread + r;
#pragma unroll
          for (int c = 0; c < 4; ++c)
            if (row < rows_here && j0 + c < C) weights[row * p.stride + j0 + c] = acc[r][c] * p.score_scale;
        }
      }
    }
  }
  __syncthreads();

  // ---- per row, one warp: weights, the crossing, the mask row ------------------------------------
  uint32_t* my_hist = hist[warp];
  const int64_t floor_kept = min_of<int64_t>(p.min_kept, C);
  for (int r = warp; r < rows_here; r += kWarps) {
    float* w = weights + r * p.stride;
    uint8_t* m = mask_row(r);
    float mx = -INFINITY;
    bool finite = true;
    for (int64_t j = lane; j < C; j += 32)
      if (sizes[j] > 0) {
        mx = fmaxf(mx, w[j]);
        finite = finite && isfinite(w[j]);
      }
    if (!__all_sync(kFull, finite)) {
      // A NaN or Inf score (from NaN or Inf inputs) cannot be ranked: the row keeps every cluster, so
      // that the NaN reaches its queries' outputs (the CPU's rule).
      fill_row(m, C, p.mask_stride[3], lane, 32, 1);
      continue;
    }
    mx = warp_max(mx);
    float total = 0.0f;
    for (int64_t j = lane; j < C; j += 32) {
      const int32_t n = sizes[j];
      const float u = n > 0 ? static_cast<float>(n) * exp2f(w[j] - mx) : 0.0f;
      w[j] = u;
      total += u;
    }
    // total >= 1: the maximum's cluster adds its size times 2^0. Each mass is at most 2^31.
    const float mass_scale = 0x1p31f / warp_sum(total);
    const auto mass = [mass_scale](float u) { return __float2uint_rn(u * mass_scale); };
    const float top_p = p.top_p;
    Crossing c = find_crossing(w, C, lane, my_hist, mass, [top_p](uint32_t all) {
      const double t = ceil(static_cast<double>(top_p) * static_cast<double>(all));
      return static_cast<uint32_t>(min_of(max_of(t, 1.0), static_cast<double>(all)));
    });
    // Of the ties at w* (each of mass a > 0: their bin reached the target), the fewest that reach it.
    const uint32_t a = mass(__uint_as_float(c.key));
    uint32_t take = (c.target - c.above + a - 1) / a;
    int64_t greater = 0, ties = 0;
    for (int64_t j0 = 0; j0 < C; j0 += 32) {
      const int64_t j = j0 + lane;
      const uint32_t key = j < C ? __float_as_uint(w[j]) : 0u;
      greater += warp_count(j < C && key > c.key);
      ties += warp_count(j < C && key == c.key);
    }
    take = static_cast<uint32_t>(min_of<int64_t>(take, ties));
    if (greater + take < floor_kept) {
      // min_kept binds: the min_kept-th weight instead, every cluster weighing 1.
      c = find_crossing(
          w, C, lane, my_hist, [](float) { return 1u; },
          [floor_kept](uint32_t) { return static_cast<uint32_t>(floor_kept); });
      take = c.target - c.above;
    }
    uint32_t tie_rank = 0;  // ties at w* before this chunk
    for (int64_t j0 = 0; j0 < C; j0 += 32) {
      const int64_t j = j0 + lane;
      const uint32_t key = j < C ? __float_as_uint(w[j]) : 0u;
      const unsigned tie = __ballot_sync(kFull, j < C && key == c.key);
      const uint32_t rank = tie_rank + __popc(tie & ((1u << lane) - 1u));
      if (j < C) m[j * p.mask_stride[3]] = key > c.key || (key == c.key && rank < take) ? 1 : 0;
      tie_rank += __popc(tie);
    }
  }
}

template <int kRows>
void launch_threshold(const ThresholdParams& p, int64_t batch_heads, bool vec4, cudaStream_t stream) {
  const size_t smem = ThresholdLayout<kRows>::bytes(p.stride);
  const dim3 grid(static_cast<unsigned>(ceil_div(p.rows, kRows)), static_cast<unsigned>(batch_heads));
  auto kernel = vec4 ? select_threshold_kernel<kRows, true> : select_threshold_kernel<kRows, false>;
  set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), static_cast<int>(smem));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  SAPATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace

void select_blocks_threshold(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& k_sizes,
                             float scale, float top_p, int min_kept, TensorView mask, cudaStream_t stream) {
  const int64_t batch_heads = q_centroids.shape[0] * q_centroids.shape[1];
  ThresholdParams p;
  p.q_centroids = static_cast<const float*>(q_centroids.data);
  p.k_centroids = static_cast<const float*>(k_centroids.data);
  p.k_sizes = static_cast<const int32_t*>(k_sizes.data);
  p.mask = static_cast<uint8_t*>(mask.data);
  for (int d = 0; d < 4; ++d) p.mask_stride[d] = mask.stride[d];
  p.H = q_centroids.shape[1];
  p.rows = q_centroids.shape[2];
  p.cols = k_centroids.shape[2];
  p.D = q_centroids.shape[3];
  p.stride = round_up(p.cols, 4);
  p.score_scale = static_cast<float>(static_cast<double>(scale) * kLog2e);
  p.top_p = top_p;
  p.min_kept = min_kept;
  if (p.rows == 0 || p.cols == 0 || batch_heads == 0) return;
  SAPATTN_CHECK(p.cols <= kMaxSelectColumns, UnsupportedError, "select_blocks on CUDA takes at most ",
                kMaxSelectColumns, " key clusters per row, got ", p.cols);
  SAPATTN_CHECK(batch_heads <= 65535, UnsupportedError, "select_blocks on CUDA takes at most 65535 (b,h) pairs");
  const bool vec4 = p.D % 4 == 0;
  switch (rows_per_block(p.cols)) {
    case 16:
      return launch_threshold<16>(p, batch_heads, vec4, stream);
    case 8:
      return launch_threshold<8>(p, batch_heads, vec4, stream);
    default:
      return launch_threshold<4>(p, batch_heads, vec4, stream);
  }
}

}  // namespace sapattn::cuda
