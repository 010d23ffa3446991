// SVG-EAR's centroid compensation on tensor cores (docs/ear.md, "The CUDA backend"): a small
// flash-attention of every video query row against the pseudo-keys its query cluster skips, merged
// into the row's (out, lse). It runs centroid_compensation (one pseudo-key per key cluster, value
// vbar_j) and corrected_centroid_compensation (m pseudo-keys per mask column, the spread added to
// the logits, per-(a, j) pair values). This file holds the host side of both tensor-core kernels and
// the mma.sync one (any sm_80+ GPU; pair values); ear_compensation_sm90.cu the wgmma one (sm_90a).
//
// Launches, all on the caller's stream (no allocation, no host synchronisation):
//   1. the label sort of the video rows (cluster_permutation's): per (b,h), the rows in query-cluster
//      order and each cluster's first sorted row;
//   2. prepare_kernel: k and v centroids rounded to bf16 once (the operands every block reads),
//      zero-padded to Dp = 64 or 128 dims and to Ck_pad rows, and log|K_j| per pseudo-key (-inf for
//      an empty one);
//   3. on sm_90, the wgmma kernel's launches (compensation_wgmma); elsewhere, with pair values or
//      set_compensation_kernel_override("mma_sync"), compensation_tc_kernel: a block takes up to
//      128 sorted rows of one query cluster a, so that it sees one mask row and one bias row. It
//      lists the pseudo-keys that a skips (mask column j / m is 0, |K_j| > 0) in shared memory, 1024
//      candidates at a time, and streams them in tiles of 64 through the FlashAttention-2 steps of the
//      sm80 attention kernel (flash_tile.cuh): S = Q Kbar^T on mma.sync m16n8k16 (bf16 operands, fp32
//      accumulators that start at the logit bias (log|K_j| + spread) / scale, so that s scale is the
//      logit), online softmax, O += P Vbar. Kept and empty pseudo-keys cost nothing: at density d a
//      row does (1 - d) of EAR's dense work.
// Blocks are laid out per (b,h) so that cluster a owns blocks [first(a), first(a) + ceil(|Q_a| / 128))
// with first(a) = ceil((offset_a + a * 127) / 128): the ranges never overlap and the grid needs no
// prefix over the clusters (ceil((N + Cq * 127) / 128) blocks per (b,h); the few in the gaps return
// at once). A warp whose 32 rows are all past the cluster's end computes nothing.
//
// Numerics (the tests' bound, docs/ear.md): the logits differ from exact ones by the bf16 rounding of
// q and kbar (2^-8 relative each, of scale sum_d |q_d kbar_jd|) plus fp32 accumulation; P and V are
// bf16 operands of P V (2^-8 relative each); the row sums and the merge with (out, lse) are fp32.
// Deterministic: a row's result depends on its own q and its cluster's pseudo-key list only.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/attention/flash_tile.cuh"
#include "cuda/ear/ear.cuh"
#include "cuda/ear/ear_internal.hpp"
#include "cuda/permute/label_sort.hpp"
#include "cuda/runtime/device.cuh"
#include "cuda/runtime/primitives.cuh"

namespace sapattn::cuda {

using ear::checked_size;
using ear::strided;
using ear::Strided4;
using ear::with_value_check;

namespace {

using Op = __nv_bfloat16;  // the mma operand type, whatever q's dtype

constexpr int kWarps = 4;
constexpr int kTcThreads = kWarps * 32;  // not ear::kThreads (256), which the host code in namespace ear would find first
constexpr int kTileRows = 128;                 // query rows per block
constexpr int kWarpRows = kTileRows / kWarps;  // 32 per warp: two m16 tiles share every K and V fragment
constexpr int kMTiles = kWarpRows / 16;
constexpr int kTileK = 64;      // pseudo-keys per tile (the sm80 attention's at head dim 128)
constexpr int kWindow = 1024;   // candidate pseudo-keys per list build
constexpr int kPerThread = kWindow / kTcThreads;
constexpr float kLog2e = 1.4426950408889634f;
// The bias of a padding entry: its zero key row scores kPadBias, whose weight exp2(kPadBias scale
// log2 e - max) is 0 for any scale the op takes (> 0, finite). Finite, so that no -inf enters the
// mma accumulators; every tile holds at least one real entry, so it never sets a row's maximum.
constexpr float kPadBias = -0x1p120f;
static_assert(kTcThreads == kTileRows && kWindow % kTileK == 0 && kPerThread <= 32);

struct TcParams : ear::CompensationIo {
  const int32_t* offsets;        // [BH, Cq + 1]: each cluster's first position in `order`
  Strided4<const uint8_t> mask;  // [B,H,Cq,Ck / m]
  Strided4<const float> spread;  // [B,H,Cq,Ck]; data null: no spread
  const Op* k_op;                // [BH, Ck_pad, Dp]: kbar rounded to bf16, zero-padded
  const Op* v_op;                // [BH, Ck_pad, Dp]: vbar likewise (unused with pair values)
  const float* pair_values;      // [BH, Cq * Ck, D] or null
  const float* log_size;         // [BH, Ck]: log|K_j|, -inf for an empty pseudo-key
  int Ck;                        // pseudo-keys (< 2^30)
  int ck_pad;                    // the operands' rows per (b,h)
  int per_column;                // m: pseudo-keys per mask column
  float scale_log2;              // scale * log2 e
  float inv_scale;               // 1 / scale
};

// What the main loop and the list builds need about the block's work, set by thread 0. It lives in
// shared memory: with O, S and the softmax state of two m16 tiles at head dim 128, the loop has no
// registers to spare for it (the list build's row pointers, the same in every window, were hoisted
// out of the window loop into registers and spilled).
struct Item {
  const Op* k_head;         // this head's pseudo-key operands [Ck, Dp]
  const Op* v_head;         // (null with pair values)
  const float* pair_head;   // the pair values of cluster a [Ck, D], or null
  const float* log_size;    // this head's log|K_c| [Ck]
  const uint8_t* mask_row;  // mask[b, h, a, :]
  const float* spread_row;  // spread[b, h, a, :], or null
};

// Shared memory of a block, in bytes.
template <int Dp>
struct Layout {
  static constexpr int kRowBytes = Dp * 2;
  static constexpr int kOffQ = 0;                               // Op [128][Dp], swizzled; then fp32 staging
  static constexpr int kOffK = kOffQ + kTileRows * kRowBytes;   // Op [64][Dp], swizzled
  static constexpr int kOffV = kOffK + kTileK * kRowBytes;      // Op [64][Dp], swizzled
  static constexpr int kOffList = kOffV + kTileK * kRowBytes;   // int32 [kWindow]: skipped pseudo-keys, -1 pads
  static constexpr int kOffBias = kOffList + kWindow * 4;       // f32 [kWindow]: their bias, dot-product units
  static constexpr int kOffRows = kOffBias + kWindow * 4;       // int32 [128]: token row of each tile row, -1 none
  static constexpr int kOffState = kOffRows + kTileRows * 4;    // float2 [128]: (max, sum) of each row
  static constexpr int kOffItem = kOffState + kTileRows * 8;    // Item
  static constexpr int kOffScan = kOffItem + 48;                 // int32 [kWarps]: list build
  static constexpr int kBytes = kOffScan + kWarps * 4;
  static_assert(sizeof(Item) <= 48 && kOffItem % alignof(Item) == 0);
  // After the main loop each warp stages one m16 tile of O in fp32 in its own 32 rows of the Q tile.
  static_assert(16 * Dp * 4 <= kWarpRows * kRowBytes);
};

// The thread index, opaque to the compiler: what the tile loop and the epilogue derive from it (copy
// and ldmatrix offsets, the lane's rows) is recomputed where it is used, a few integer operations a
// tile, instead of being held in registers through the loop. O, S and the softmax state of two m16
// tiles at Dp = 128 nearly fill the 255 registers: the loop needs ~236 (with nvcc 13.0, capped at
// 236 it compiles without spills on sm_80 and sm_90, at 232 it spills).
__device__ __forceinline__ int thread_index() { return static_cast<int>(opaque(threadIdx.x)); }

__host__ __device__ constexpr int64_t first_block(int64_t offset, int64_t cluster) {
  return (offset + cluster * (kTileRows - 1) + kTileRows - 1) / kTileRows;
}

// ---------------------------------------------------------------------------------------------
// prepare_kernel: the pseudo-keys' bf16 operands and log sizes, once per call
// ---------------------------------------------------------------------------------------------

// One thread per 8 padded dims of one operand row (BH * Ck_pad rows; rows past Ck are zeros).
template <int Dp>
__global__ void prepare_kernel(const float* __restrict__ k_centroids, const float* __restrict__ v_centroids,
                               const int32_t* __restrict__ k_sizes, int64_t batch_heads, int64_t Ck, int64_t ck_pad,
                               int64_t D, Op* __restrict__ k_op, Op* __restrict__ v_op, float* __restrict__ log_size,
                               int* flag) {
  constexpr int kChunks = Dp / 8;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < batch_heads * ck_pad * kChunks;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = t / kChunks, d0 = t % kChunks * 8, j = row % ck_pad, r = row / ck_pad * Ck + j;
    float k[8], v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const bool in = j < Ck && d0 + e < D;
      k[e] = in ? k_centroids[r * D + d0 + e] : 0.0f;
      v[e] = in && v_op != nullptr ? v_centroids[r * D + d0 + e] : 0.0f;
    }
    *reinterpret_cast<uint4*>(k_op + row * Dp + d0) = ear::pack8_bf16(k);
    if (v_op != nullptr) *reinterpret_cast<uint4*>(v_op + row * Dp + d0) = ear::pack8_bf16(v);
    if (d0 == 0 && j < Ck) {
      const int64_t n = checked_size(k_sizes[r], flag);
      log_size[r] = n > 0 ? logf(static_cast<float>(n)) : -INFINITY;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// compensation_tc_kernel, its pieces
// ---------------------------------------------------------------------------------------------

// The Q tile: the block's rows (token rows[r], or zero rows) rounded to bf16, zero-padded to Dp
// dims, swizzled. Four 16-byte chunks per thread are loaded before any is stored.
template <typename TQ, int Dp>
__device__ __forceinline__ void load_q_tile(const TcParams& p, const int32_t* rows, unsigned char* tile) {
  constexpr int kChunks = Dp / 8;
  const int64_t b = blockIdx.y / p.H, h = blockIdx.y % p.H;
  constexpr int kPerThreadChunks = kTileRows * kChunks / kTcThreads;
  static_assert(kPerThreadChunks % 4 == 0);
  const TQ* q = static_cast<const TQ*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
#pragma unroll 1
  for (int u0 = 0; u0 < kPerThreadChunks; u0 += 4) {
    float f[4][8];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int i = threadIdx.x + (u0 + u) * kTcThreads, row = i / kChunks, ch = i % kChunks;
      const int32_t t = rows[row];
      ear::load8(t >= 0 ? q + t * p.q_stride[2] : nullptr, p.q_stride[3], ch * 8, p.D, f[u]);
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int i = threadIdx.x + (u0 + u) * kTcThreads, row = i / kChunks, ch = i % kChunks;
      *reinterpret_cast<uint4*>(tile + swizzle<kChunks>(row, ch) * 16) = ear::pack8_bf16(f[u]);
    }
  }
}

// The pseudo-keys of candidates [w0, w0 + kWindow) that cluster a skips (mask column c / m is 0 and
// |K_c| > 0), in ascending order, with their logit bias in units of the dot product, (log|K_c| +
// spread[a, c]) / scale; entries up to the next multiple of kTileK are padding (-1, kPadBias).
// Returns their count (the same in every thread). Thread t looks at candidates w0 + kPerThread t + e;
// a block scan places them. Both kinds of warp (stream, below) call it, so both its barriers are the
// unaligned block_barrier: synccheck reported an aligned __syncthreads here as divergent even with
// the function not inlined (run 20 the first, run 21 the second). Not inlined: inlined, the
// unaligned barrier spilled 8 bytes.
__device__ __noinline__ int build_list(const TcParams& p, const Item& item, int w0, int32_t* list, float* bias,
                                       int* scan) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int c0 = w0 + tid * kPerThread;  // Ck < 2^30 (checked on the host)
  const float* log_size = item.log_size;
  const uint8_t* mask_row = item.mask_row;
  // Mask column c / m of the candidates, stepped without a division per candidate.
  int column = c0 / p.per_column, in_column = c0 - column * p.per_column;
  uint32_t bits = 0;
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    const int c = c0 + e;
    if (c < p.Ck && log_size[c] != -INFINITY && mask_row[column * p.mask.s3] == 0) bits |= 1u << e;
    if (++in_column == p.per_column) {
      in_column = 0;
      ++column;
    }
  }
  const int mine = __popc(bits);
  int inclusive = mine;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const int y = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += y;
  }
  if (lane == 31) scan[warp] = inclusive;
  block_barrier();
  int pos = inclusive - mine, count = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) pos += scan[w];
    count += scan[w];
  }
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    if (!((bits >> e) & 1u)) continue;
    const int c = c0 + e;
    float logit = log_size[c];
    if (item.spread_row != nullptr) logit += item.spread_row[c * p.spread.s3];
    list[pos] = c;
    bias[pos] = logit * p.inv_scale;
    ++pos;
  }
  const int padded = (count + kTileK - 1) / kTileK * kTileK;
  for (int i = count + tid; i < padded; i += kTcThreads) {
    list[i] = -1;
    bias[i] = kPadBias;
  }
  block_barrier();  // the list is complete; every thread has read the scan
  return count;
}

// Writes the merged rows of one m16 tile: row r of `stage` ([16][Dp] fp32, column d at d ^ 8 (r % 4)
// for conflict-free float2 stores) holds the compensation's unnormalised O, `state[row0 + r]` its
// (max, sum) in the log2 domain, merged with the exact part by ear::merge_row. Every lane of the
// warp computes the row's merge (the same values); lane l takes dims l, l + 32, ...
template <typename TO, int Dp>
__device__ __forceinline__ void write_rows(const TcParams& p, const int32_t* rows, const float2* state,
                                           const float* stage, int row0) {
  const int lane = threadIdx.x % 32;
  const int64_t b = blockIdx.y / p.H, h = blockIdx.y % p.H;
  TO* out = static_cast<TO*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1];
  float* lse = p.lse + b * p.lse_stride[0] + h * p.lse_stride[1];
  for (int r = 0; r < 16; ++r) {
    const int32_t t = rows[row0 + r];
    if (t < 0) continue;  // the same for the whole warp
    const float2 ms = state[row0 + r];
    const ear::RowMerge m = ear::merge_row(lse[t * p.lse_stride[2]], ms.x, ms.y);
    TO* o = out + t * p.out_stride[2];
    for (int64_t d = lane; d < p.D; d += 32) {
      const float c = stage[r * Dp + (static_cast<int>(d) ^ (8 * (r & 3)))];
      o[d * p.out_stride[3]] = from_f32<TO>(m.keep * to_f32(o[d * p.out_stride[3]]) + m.add * c);
    }
    __syncwarp();  // every lane has read lse0
    if (lane == 0) lse[t * p.lse_stride[2]] = m.lse;
  }
}

template <int Dp, bool kPairValues>
__global__ void __launch_bounds__(kTcThreads, 2) compensation_tc_kernel(const TcParams p) {
  using L = Layout<Dp>;
  constexpr int kChunks = Dp / 8;
  constexpr int kNTiles = kTileK / 8;  // n8 tiles of S per m16 tile
  constexpr int kDTiles = Dp / 8;      // n8 tiles of O per m16 tile
  extern __shared__ __align__(128) unsigned char smem[];
  int32_t* list = reinterpret_cast<int32_t*>(smem + L::kOffList);
  float* bias = reinterpret_cast<float*>(smem + L::kOffBias);
  int32_t* rows = reinterpret_cast<int32_t*>(smem + L::kOffRows);
  float2* state = reinterpret_cast<float2*>(smem + L::kOffState);
  int* scan = reinterpret_cast<int*>(smem + L::kOffScan);
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t bh = blockIdx.y;

  // ---- the work item: sorted rows [r0, r1) of query cluster a --------------------------------------
  // a = the number of clusters whose first block is at or before this one, minus 1 (first() does
  // not decrease with a, and a cluster's blocks end before the next cluster's first).
  Item& item = *reinterpret_cast<Item*>(smem + L::kOffItem);
  const int32_t* offsets = p.offsets + bh * (p.Cq + 1);
  const int64_t x = blockIdx.x;
  int64_t before = 0;
  for (int64_t a0 = 0; a0 < p.Cq; a0 += kTcThreads) {
    const int64_t c = a0 + tid;
    before += __syncthreads_count(c < p.Cq && first_block(offsets[c], c) <= x);
  }
  if (before == 0) return;  // no query cluster (Cq = 0)
  const int64_t a = before - 1;
  const int64_t r0 = offsets[a] + (x - first_block(offsets[a], a)) * kTileRows, r1 = offsets[a + 1];
  if (r0 >= r1) return;  // between two clusters' blocks, or past the last
  const int n_rows = static_cast<int>(min_of<int64_t>(r1 - r0, kTileRows));
  rows[tid] = tid < n_rows ? p.order[bh * p.N + r0 + tid] : -1;
  if (tid == 0) {
    const int64_t b = bh / p.H, h = bh % p.H;
    item = Item{p.k_op + bh * p.ck_pad * Dp,
                kPairValues ? nullptr : p.v_op + bh * p.ck_pad * Dp,
                kPairValues ? p.pair_values + (bh * p.Cq + a) * p.Ck * p.D : nullptr,
                p.log_size + bh * p.Ck,
                &p.mask.at(b, h, a, 0),
                p.spread.data != nullptr ? &p.spread.at(b, h, a, 0) : nullptr};
  }
  __syncthreads();
  switch (p.q_dtype) {
    case DType::F32:
      load_q_tile<float, Dp>(p, rows, smem + L::kOffQ);
      break;
    case DType::F16:
      load_q_tile<__half, Dp>(p, rows, smem + L::kOffQ);
      break;
    default:
      load_q_tile<__nv_bfloat16, Dp>(p, rows, smem + L::kOffQ);
      break;
  }

  // ---- the pseudo-keys a skips, streamed through the flash-attention steps ----------------------------
  const uint32_t q_tile = smem_addr(smem + L::kOffQ);
  const uint32_t k_tile = smem_addr(smem + L::kOffK);
  const uint32_t v_tile = smem_addr(smem + L::kOffV);
  float o[kMTiles][kDTiles][4];
  float row_max[2 * kMTiles], row_sum[2 * kMTiles];
  flash::start_rows(o, row_max, row_sum);

  // Tiles are copied as rows of 16-byte chunks: thread t copies chunk t % kChunks of every
  // (kTcThreads / kChunks)-th row. A padding entry (-1) becomes a zero row: finite scores, 0 * V = 0.
  auto load_operand = [&](uint32_t dst, const Op* head, int n) {
    const int t = thread_index(), load_row = t / kChunks, load_chunk = t % kChunks;
#pragma unroll
    for (int u = 0; u < kTileK * kChunks / kTcThreads; ++u) {
      const int row = load_row + u * (kTcThreads / kChunks);
      const int32_t c = list[n * kTileK + row];
      cp_async16_zfill(dst + swizzle<kChunks>(row, load_chunk) * 16,
                       c >= 0 ? static_cast<const void*>(head + static_cast<int64_t>(c) * Dp + load_chunk * 8) : head,
                       c >= 0);
    }
  };
  // Pair values [Cq * Ck, D] f32: row a * Ck + c, rounded to bf16 on the way (no cp.async).
  auto store_pair_values = [&](int n) {
    const int t = thread_index(), load_row = t / kChunks, load_chunk = t % kChunks;
    const float* head = item.pair_head;
#pragma unroll
    for (int u = 0; u < kTileK * kChunks / kTcThreads; ++u) {
      const int row = load_row + u * (kTcThreads / kChunks);
      const int32_t c = list[n * kTileK + row];
      float f[8];
      ear::load8(c >= 0 ? head + static_cast<int64_t>(c) * p.D : nullptr, int64_t{1}, load_chunk * 8, p.D, f);
      *reinterpret_cast<uint4*>(smem + L::kOffV + swizzle<kChunks>(row, load_chunk) * 16) = ear::pack8_bf16(f);
    }
  };

  // The window and tile loop. A warp whose 32 rows are all past the cluster's end loads its share of
  // the tiles and meets every barrier but computes nothing (a cluster wastes < 32 rows of work
  // instead of < 128). The loop is instantiated once for each kind of warp (kCompute) rather than
  // branching on a runtime flag around the tile steps: with such branches S is defined on one path
  // only, and ptxas used all 255 registers even at Dp = 64 and spilled 8-16 bytes. The two kinds
  // meet the same block barriers in the same order from different instructions, each warp converged
  // (its kind is the same for all its lanes): barrier 0 counts the warps that arrive wherever they
  // arrive from, as the sm90 kernels' ping-pong named barriers do (CUTLASS's bar.sync and bar.arrive
  // in the two consumer warpgroups' different code). So these barriers are the unaligned
  // block_barrier (primitives.cuh), not __syncthreads, which requires one instruction for the block
  // (synccheck reported it), as build_list's is.
  // Returns whether the cluster skips any pseudo-key (the same in every thread).
  auto stream = [&](auto compute) {
    constexpr bool kCompute = decltype(compute)::value;
    bool skipped = false;
    for (int w0 = 0; w0 < p.Ck; w0 += kWindow) {
      block_barrier();  // the Q tile and item are stored; every warp is done with the previous window's list and tiles
      const int count = build_list(p, item, w0, list, bias, scan);
      skipped = skipped || count > 0;
      const int tiles = (count + kTileK - 1) / kTileK;
      if (tiles == 0) continue;
      load_operand(k_tile, item.k_head, 0);
      cp_async_commit();
      for (int n = 0; n < tiles; ++n) {
        cp_async_wait<0>();
        block_barrier();  // K[n] landed; every warp is done with V[n - 1]
        if constexpr (kPairValues) {
          store_pair_values(n);
        } else {
          load_operand(v_tile, item.v_head, n);
          cp_async_commit();
        }

        // ---- S = bias + Q Kbar^T, in units of the dot product ---------------------------------------
        // Column j * 8 + 2 t4 (+ 1) of the tile starts at (log|K| + spread) / scale (the accumulators
        // carry it for free); s scale log2 e is then the logit in the log2 domain, as the attention's.
        const int t = thread_index(), t4 = t % 4;
        const flash::LaneOffsets at = flash::lane_offsets<Dp>(t % 32, t / 32 * kWarpRows);
        float s[kMTiles][kNTiles][4];
        if constexpr (kCompute) {
#pragma unroll
          for (int j = 0; j < kNTiles; ++j) {
            const float2 bj = *reinterpret_cast<const float2*>(bias + n * kTileK + j * 8 + 2 * t4);
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
              s[mt][j][0] = s[mt][j][2] = bj.x;
              s[mt][j][1] = s[mt][j][3] = bj.y;
            }
          }
          flash::qk_tile<Op, kMTiles, kNTiles, Dp>(s, q_tile, at.q, k_tile, at.k);
        }

        cp_async_wait<0>();
        block_barrier();  // V[n] landed (or is stored); every warp is done with K[n]
        if (n + 1 < tiles) {
          load_operand(k_tile, item.k_head, n + 1);
          cp_async_commit();
        }

        // ---- online softmax, O += P Vbar ---------------------------------------------------------------
        if constexpr (kCompute) {
          float base[2 * kMTiles], rescale[2 * kMTiles];
          flash::softmax_step(s, p.scale_log2, row_max, row_sum, base, rescale);
          flash::rescale_o(o, rescale);
          flash::pv_tile<Op, kMTiles, kNTiles, kDTiles>(o, s, p.scale_log2, base, row_sum, v_tile, at.v);
        }
      }
    }
    return skipped;
  };
  if (warp * kWarpRows >= n_rows) {
    stream(std::false_type{});
    return;
  }
  // A cluster that skips nothing keeps its rows as the attention wrote them.
  if (!stream(std::true_type{})) return;

  // ---- epilogue: merge with (out, lse) through the log-sum-exp (write_rows) ----------------------------
  // The warp's O goes through its own 32 Q rows (no other warp reads them), one m16 tile at a time.
  const int t = thread_index(), g = t % 32 / 4, t4 = t % 4;
  float* stage = reinterpret_cast<float*>(smem + L::kOffQ + warp * kWarpRows * L::kRowBytes);
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    __syncwarp();  // the previous tile's rows are written out (and Q is read)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = 2 * mt + half, r = half * 8 + g;
      float sum = row_sum[i];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      if (t4 == 0) state[warp * kWarpRows + mt * 16 + r] = make_float2(row_max[i], sum);
#pragma unroll
      for (int j = 0; j < kDTiles; ++j) {
        const int col = (j * 8 + 2 * t4) ^ (8 * (r & 3));
        *reinterpret_cast<float2*>(stage + r * Dp + col) = make_float2(o[mt][j][2 * half], o[mt][j][2 * half + 1]);
      }
    }
    __syncwarp();
    const int row0 = warp * kWarpRows + mt * 16;
    switch (p.out_dtype) {
      case DType::F32:
        write_rows<float, Dp>(p, rows, state, stage, row0);
        break;
      case DType::F16:
        write_rows<__half, Dp>(p, rows, state, stage, row0);
        break;
      default:
        write_rows<__nv_bfloat16, Dp>(p, rows, state, stage, row0);
        break;
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

namespace ear {

CompensationScratch carve_compensation(Carver& carver, int64_t batch_heads, int64_t tokens, int64_t q_clusters,
                                       int64_t pseudo_keys, int64_t dim) {
  CompensationScratch s;
  s.sort = carve_label_sort(carver, batch_heads, tokens, q_clusters);
  s.offsets = carver.take<int32_t>(batch_heads * (q_clusters + 1));
  const int64_t rows = compensation_rows(pseudo_keys), operand = batch_heads * rows * compensation_dim(dim);
  s.k_operand = carver.take_bytes(static_cast<size_t>(operand) * sizeof(Op));
  s.v_operand = carver.take_bytes(static_cast<size_t>(operand) * sizeof(Op));
  s.log_size = carver.take<float>(batch_heads * pseudo_keys);
  s.slots = carver.take<int4>(batch_heads * compensation_slots(tokens, q_clusters));
  s.slot_count = carver.take<int32_t>(batch_heads);
  s.bias = carver.take<float>(batch_heads * q_clusters * rows);
  return s;
}

void compensation_tensor_cores(const char* op, const TensorView& q, const TensorView& q_labels, const TensorView& mask,
                               const TensorView& k_centroids, const TensorView& v_centroids, const TensorView& k_sizes,
                               const TensorView& spread, const TensorView& pair_values, float scale, TensorView out,
                               TensorView lse, const Stream& stream, Workspace workspace, CompensationKernel kernel) {
  const int64_t B = q.shape[0], H = q.shape[1], N = q_labels.shape[2], D = q.shape[3];
  const int64_t BH = B * H, Cq = mask.shape[2], Ck = k_centroids.shape[2];
  Carver carver(op, workspace);
  const CompensationScratch s = carve_compensation(carver, BH, N, Cq, Ck, D);
  carver.check();
  const int64_t blocks = ceil_div(N + Cq * (kTileRows - 1), kTileRows);
  SAPATTN_CHECK(blocks < (int64_t{1} << 31), UnsupportedError, op, " on CUDA takes fewer than 2^31 row tiles per ",
                "(b,h), got ", blocks);
  SAPATTN_CHECK(Ck < (int64_t{1} << 30), UnsupportedError, op, " on CUDA takes fewer than 2^30 pseudo-keys, got ", Ck);
  const bool pairs = !pair_values.empty();
  const int device = stream.device.index;
  const bool wgmma_runs = compensation_wgmma_available(device, workspace.data);
  SAPATTN_CHECK(kernel != CompensationKernel::Wgmma || wgmma_runs, UnsupportedError, op,
                ": the wgmma compensation needs an sm_90 GPU (cuda:", device, " is sm_", device_arch(device).major,
                device_arch(device).minor, "), a driver with tensor maps and a 16-byte aligned workspace");
  // Pair values differ per query cluster: only the mma.sync kernel gathers them.
  const bool wgmma = wgmma_runs && !pairs && kernel != CompensationKernel::MmaSync;
  const cudaStream_t cs = stream_of(stream);
  with_value_check(stream, op, [&] {
    // 1. The video rows in query-cluster order (labels outside [0, Cq) go last and are not touched).
    const LabelsView labels{static_cast<const int32_t*>(q_labels.data), q_labels.stride[0], q_labels.stride[1], B, H,
                            N};
    sort_by_label(s.sort, labels, cs);
    label_offsets(s.sort, s.offsets, nullptr, cs);
    // 2. The pseudo-keys' operands and log sizes.
    auto* k_op = static_cast<Op*>(s.k_operand);
    auto* v_op = pairs ? nullptr : static_cast<Op*>(s.v_operand);
    const int64_t ck_pad = compensation_rows(Ck);
    const unsigned prepare_blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(BH * ck_pad * 16, 256), 8192));
    const auto* kc = static_cast<const float*>(k_centroids.data);
    const auto* vc = static_cast<const float*>(v_centroids.data);
    const auto* ks = static_cast<const int32_t*>(k_sizes.data);
    if (compensation_dim(D) == 64) {
      prepare_kernel<64>
          <<<prepare_blocks, 256, 0, cs>>>(kc, vc, ks, BH, Ck, ck_pad, D, k_op, v_op, s.log_size, value_error_flag());
    } else {
      prepare_kernel<128>
          <<<prepare_blocks, 256, 0, cs>>>(kc, vc, ks, BH, Ck, ck_pad, D, k_op, v_op, s.log_size, value_error_flag());
    }
    SAPATTN_CUDA_CHECK_LAUNCH();
    // 3. The compensation.
    if (wgmma) return compensation_wgmma(s, q, mask, spread, Ck, scale, out, lse, device, cs);
    TcParams p{};
    static_cast<CompensationIo&>(p) = compensation_io(q, s.sort.index_out, N, Cq, out, lse);
    p.offsets = s.offsets;
    p.mask = strided<const uint8_t>(mask);
    if (!spread.empty()) p.spread = strided<const float>(spread);
    p.k_op = k_op;
    p.v_op = v_op;
    p.pair_values = pairs ? static_cast<const float*>(pair_values.data) : nullptr;
    p.log_size = s.log_size;
    p.Ck = static_cast<int>(Ck);
    p.ck_pad = static_cast<int>(ck_pad);
    p.per_column = static_cast<int>(Ck / mask.shape[3]);
    p.scale_log2 = scale * kLog2e;
    p.inv_scale = 1.0f / scale;
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(BH));
    auto launch = [&](auto kernel_fn, int smem) {
      set_max_dynamic_smem(reinterpret_cast<const void*>(kernel_fn), smem);
      kernel_fn<<<grid, kTcThreads, smem, cs>>>(p);
      SAPATTN_CUDA_CHECK_LAUNCH();
    };
    if (compensation_dim(D) == 64) {
      pairs ? launch(compensation_tc_kernel<64, true>, Layout<64>::kBytes)
            : launch(compensation_tc_kernel<64, false>, Layout<64>::kBytes);
    } else {
      pairs ? launch(compensation_tc_kernel<128, true>, Layout<128>::kBytes)
            : launch(compensation_tc_kernel<128, false>, Layout<128>::kBytes);
    }
  });
}

}  // namespace ear

}  // namespace sapattn::cuda
