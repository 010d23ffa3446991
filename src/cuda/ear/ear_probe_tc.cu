// The probe's pass on tensor cores (docs/ear.md, "The probe on tensor cores"), for ear_probe and
// ear_plus_probe with bf16 or f16 keys and head dims up to 128 (probe_on_tensor_cores says when; the
// CUDA-core pass of ear_estimate.cu, bit-identical logits and fp64 state, stays behind
// set_probe_kernel_override("cuda_cores") and serves the other cases).
//
// Launches, after the label sort and |vbar_j|^2 that both passes share (launch_probe_pass), all on the
// caller's stream, no allocation, no host synchronisation:
//   1. stats_kernel: per sorted token, |v_t - vbar_j|^2 and vbar_j . (v_t - vbar_j) in fp32 (one warp a
//      token), in the bytes of the CUDA-core pass's fp64 statistics;
//   2. pass_kernel: one block per (group of up to 128 query centroids, 32 key clusters, (b,h)); warp w
//      owns 16 centroids, whose query rows live in registers as mma A fragments, each centroid split
//      into hi + lo of the key dtype (f16: scaled by a power of two so that its largest entry is in
//      [2^14, 2^15)). The block's tokens (those of its 32 clusters, contiguous in cluster order) are
//      gathered 64 at a time into shared memory (cp.async, double-buffered) and multiplied on
//      mma.sync m16n8k16 (hi and lo: two MMAs per fragment, fp32 accumulation), 32 tokens per step.
//      The centroid logits c_aj go through the same MMAs first (kbar_j split into hi + lo rows of one
//      tile), so a token equal to its centroid gets exactly c_aj: E = 0 for a one-token cluster at its
//      mean, as on the CPU.
// The logits of a step go through the warp's staging rows in shared memory; lane (row, parity) then
// takes one centroid and every other token of the step, so that a cluster's segment of the step (a
// warp-uniform column range: the tokens are cluster-sorted) splits evenly between the row's two lanes.
// Each lane keeps, for the open cluster, a running max m (starting at c_aj) and fp32 sums of the
// per-token error ||w_t v_t - e_c vbar||^2 = w_t^2 d2_t + 2 w_t (w_t - e_c) g_t + (w_t - e_c)^2 |vbar|^2
// (w_t = exp(s_t - m), e_c = exp(c - m)) and, for ear-plus, of w_t: the terms are non-negative squared
// norms, so fp32 sums lose no more than their own rounding (the CPU's expanded form cancels and needs
// fp64). When the cluster ends, the row's two lanes merge their states (the max first, then a + b in
// both) and one writes the pair's score (or log E, log M and the spread) with the CPU's floors and its
// |K_j| term. Deterministic: every sum has a fixed order, and every pair is written once.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "cuda/attention/flash_tile.cuh"
#include "cuda/ear/ear.cuh"
#include "cuda/ear/ear_internal.hpp"
#include "cuda/ear/ear_probe.cuh"
#include "cuda/runtime/device.cuh"
#include "cuda/runtime/primitives.cuh"

namespace sapattn::cuda {

using ear::checked_size;
using ear::kProbeEps;
using ear::kThreads;
using ear::ProbeParams;

namespace {

constexpr int kWarps = kThreads / 32;
constexpr int kTileTokens = 64;              // sorted tokens staged at a time
constexpr int kStepTokens = 32;              // tokens per MMA + epilogue step: 16 accumulators a lane
constexpr int kStepTiles = kStepTokens / 8;  // n8 tiles of a step
constexpr int kChunk = 32;                   // key clusters per block: their kbar hi and lo rows fill one tile
constexpr int kCStride = kChunk + 1;         // row stride of the centroid-logit table (no bank conflicts)
constexpr int kSStride = kStepTokens + 2;    // row stride of a step's staged logits: lanes (row, parity) of
                                             // one column read 32 distinct banks
constexpr int kMaxDim = 128;                 // head dims the pass takes (A fragments in registers)
constexpr int kF16Top = 14;                  // f16 query rows are scaled to a largest entry in [2^14, 2^15)
constexpr int kMaxShift = 100;               // bound on that scaling's exponent (rows of tiny or huge entries)
constexpr float kLog2e = 1.4426950408889634f;
constexpr double kLogProbeEps = -18.420680743952367;  // log(kProbeEps), correctly rounded (the CPU's value)

constexpr int padded_dim(int64_t D) { return D <= 64 ? 64 : 128; }

// Shared memory of a block, in bytes.
template <int Dp>
struct Layout {
  static constexpr int kRowBytes = Dp * 2;
  static constexpr int kTileBytes = kTileTokens * kRowBytes;
  static constexpr int kOffKeys = 0;                                       // 2 stages [64][Dp] swizzled
  static constexpr int kOffStats = kOffKeys + 2 * kTileBytes;              // 2 stages float2 [64]
  static constexpr int kOffLogit = kOffStats + 2 * kTileTokens * 8;        // f32 [warps][16][kCStride]: c_aj
  static constexpr int kOffStep = kOffLogit + kWarps * 16 * kCStride * 4;  // f32 [warps][16][kSStride]: a step
  static constexpr int kOffNorm = kOffStep + kWarps * 16 * kSStride * 4;   // f32 [kChunk]: |vbar_j|^2
  static constexpr int kOffSize = kOffNorm + kChunk * 4;                   // i32 [kChunk]: |K_j|
  static constexpr int kOffOffsets = kOffSize + kChunk * 4;                // i32 [kChunk + 1]
  static constexpr int kBytes = kOffOffsets + (kChunk + 1) * 4;
};

// Which kernel the probes run: false = tensor cores where probe_on_tensor_cores allows (the default).
std::atomic<bool> g_cuda_cores{false};

// ---------------------------------------------------------------------------------------------
// stats_kernel: one warp per sorted token
// ---------------------------------------------------------------------------------------------

// (|v_t - vbar_j|^2, vbar_j . (v_t - vbar_j)) of sorted token i, j its cluster (fp32: lanes over d, a
// fixed butterfly sum). Trash-bucket tokens (labels out of range) get zeros and are never read.
template <typename TV>
__global__ void __launch_bounds__(kThreads) stats_kernel(ProbeParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (i >= p.N) return;
  float2* out = reinterpret_cast<float2*>(p.token_stats) + bh * p.N + i;
  const int32_t t = p.order[bh * p.N + i];
  const int32_t j = p.labels[b * p.l_stride_b + h * p.l_stride_h + t];
  float d2 = 0.0f, g = 0.0f;
  if (j >= 0 && j < p.Ck) {
    const TV* vt = static_cast<const TV*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1] + t * p.v_stride[2];
    const float* vc = p.v_centroids + (bh * p.Ck + j) * p.D;
    for (int64_t d = lane; d < p.D; d += 32) {
      const float c = vc[d], dv = to_f32(vt[d * p.v_stride[3]]) - c;
      d2 = fmaf(dv, dv, d2);
      g = fmaf(c, dv, g);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    d2 += __shfl_xor_sync(0xffffffffu, d2, o);
    g += __shfl_xor_sync(0xffffffffu, g, o);
  }
  if (lane == 0) *out = make_float2(d2, g);
}

// ---------------------------------------------------------------------------------------------
// pass_kernel, its pieces
// ---------------------------------------------------------------------------------------------

// x and y rounded to T (hi) and the remainders x - hi, y - hi rounded to T (lo), as register pairs.
template <typename T>
__device__ __forceinline__ void split2(float x, float y, uint32_t& hi, uint32_t& lo) {
  hi = pack2<T>(x, y);
  const T* h = reinterpret_cast<const T*>(&hi);
  lo = pack2<T>(x - to_f32(h[0]), y - to_f32(h[1]));
}

// The warp's 16 query centroids from row a0 as A fragments of mma.m16n8k16 (row g = lane / 4 and
// g + 8; register i: row g + 8 (i & 1), columns 2 (lane % 4) + 8 (i / 2) + {0, 1} of each k16 step),
// hi and lo, zero past Cq and D. row_scale[r] = scale 2^-e_r undoes an f16 row's scaling 2^e_r
// together with the softmax scale (exactly: a power of two commutes with rounding).
template <typename T, int kSteps>
__device__ __forceinline__ void query_fragments(const ProbeParams& p, int64_t bh, int64_t a0, uint32_t (&hi)[kSteps][4],
                                                uint32_t (&lo)[kSteps][4], float (&row_scale)[2]) {
  const int lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const float* row[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t a = a0 + g + 8 * r;
    row[r] = a < p.Cq ? p.q_centroids + (bh * p.Cq + a) * p.D : nullptr;
  }
  auto at = [&](int r, int64_t d) { return row[r] != nullptr && d < p.D ? row[r][d] : 0.0f; };
  float pow2[2] = {1.0f, 1.0f};
#pragma unroll
  for (int r = 0; r < 2; ++r) row_scale[r] = p.scale;
  if constexpr (std::is_same_v<T, __half>) {
    // The quad reads every dim of its two rows: the row maxima by two shuffles.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float top = 0.0f;
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks)
#pragma unroll
        for (int c = 0; c < 4; ++c) top = fmaxf(top, fabsf(at(r, 16 * ks + 2 * t4 + 8 * (c / 2) + c % 2)));
      top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, 1));
      top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, 2));
      const int shift = top > 0.0f ? min(max(kF16Top - ilogbf(top), -kMaxShift), kMaxShift) : 0;
      pow2[r] = ldexpf(1.0f, shift);
      row_scale[r] = p.scale * ldexpf(1.0f, -shift);
    }
  }
#pragma unroll
  for (int ks = 0; ks < kSteps; ++ks)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = i & 1;
      const int64_t d = 16 * ks + 2 * t4 + 8 * (i / 2);
      split2<T>(at(r, d) * pow2[r], at(r, d + 1) * pow2[r], hi[ks][i], lo[ks][i]);
    }
}

// s += (hi + lo) k^T for the warp's 16 centroids against the 32 tile rows from `rows` (byte address in
// shared memory): per k16 step, one ldmatrix per 16 rows, then the hi and the lo MMA. Tokens and
// centroid rows go through this same sequence, so equal rows give equal logits.
template <typename T, int kSteps>
__device__ __forceinline__ void step_logits(float (&s)[kStepTiles][4], const uint32_t (&hi)[kSteps][4],
                                            const uint32_t (&lo)[kSteps][4], uint32_t rows, uint32_t k_at) {
  constexpr int kRowBytes = kSteps * 32;
#pragma unroll
  for (int ks = 0; ks < kSteps; ++ks)
#pragma unroll
    for (int jp = 0; jp < kStepTiles / 2; ++jp) {
      uint32_t kb[4];
      ldmatrix_x4(rows + (k_at ^ (ks * 32)) + jp * 16 * kRowBytes, kb);
      mma16816<T>(s[2 * jp], hi[ks], kb[0], kb[1]);
      mma16816<T>(s[2 * jp], lo[ks], kb[0], kb[1]);
      mma16816<T>(s[2 * jp + 1], hi[ks], kb[2], kb[3]);
      mma16816<T>(s[2 * jp + 1], lo[ks], kb[2], kb[3]);
    }
}

// Sorted tokens [t0, t0 + 64) (rows at or past `end` zero) into a swizzled [64][Dp] tile, and their
// statistics. With `vec` (unit stride along D, 16-byte aligned rows, D % 8 == 0) by cp.async, the
// caller committing the group; otherwise through registers.
// The pointers are made here from the block's (b,h), not kept live through the main loop.
template <typename T, int Dp>
__device__ __forceinline__ void load_tile(const ProbeParams& p, int32_t t0, int32_t end, bool vec, unsigned char* tile,
                                          float2* stats) {
  constexpr int kChunks = Dp / 8;
  const int bh = static_cast<int>(blockIdx.z), b = bh / static_cast<int>(p.H), h = bh - b * static_cast<int>(p.H);
  const T* kbase = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
  const int32_t* order = p.order + bh * p.N;
  const float2* stats_in = reinterpret_cast<const float2*>(p.token_stats) + bh * p.N;
  const uint32_t dst = smem_addr(tile);
#pragma unroll 1
  for (int i = threadIdx.x; i < kTileTokens * kChunks; i += kThreads) {
    const int row = i / kChunks, ch = i % kChunks;
    const bool in = t0 + row < end && ch * 8 < p.D;
    const T* src = in ? kbase + order[t0 + row] * p.k_stride[2] + ch * 8 * p.k_stride[3] : kbase;
    if (vec) {
      cp_async16_zfill(dst + swizzle<kChunks>(row, ch) * 16, src, in);
    } else {
      uint4 raw = make_uint4(0, 0, 0, 0);
      T* x = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int e = 0; e < 8; ++e)
        if (in && ch * 8 + e < p.D) x[e] = src[e * p.k_stride[3]];
      *reinterpret_cast<uint4*>(tile + swizzle<kChunks>(row, ch) * 16) = raw;
    }
  }
  if (threadIdx.x < kTileTokens)
    stats[threadIdx.x] = t0 + static_cast<int>(threadIdx.x) < end ? stats_in[t0 + threadIdx.x] : make_float2(0, 0);
}

// The block's key centroids j0 .. j0 + n - 1 as a [64][Dp] tile of T: row jj their hi part, row
// 32 + jj the lo part (zero rows and dims past n and D). With f16 keys the centroids must lie in f16's
// range, as means of f16 keys do (a larger entry's hi part is inf).
template <typename T, int Dp>
__device__ __forceinline__ void load_centroid_tile(const ProbeParams& p, int64_t bh, int64_t j0, int n,
                                                   unsigned char* tile) {
  constexpr int kChunks = Dp / 8;
  for (int i = threadIdx.x; i < kChunk * kChunks; i += kThreads) {
    const int jj = i / kChunks, ch = i % kChunks;
    float x[8];
#pragma unroll
    for (int e = 0; e < 8; ++e)
      x[e] = jj < n && ch * 8 + e < p.D ? p.k_centroids[(bh * p.Ck + j0 + jj) * p.D + ch * 8 + e] : 0.0f;
    uint4 hi, lo;
    split2<T>(x[0], x[1], hi.x, lo.x);
    split2<T>(x[2], x[3], hi.y, lo.y);
    split2<T>(x[4], x[5], hi.z, lo.z);
    split2<T>(x[6], x[7], hi.w, lo.w);
    *reinterpret_cast<uint4*>(tile + swizzle<kChunks>(jj, ch) * 16) = hi;
    *reinterpret_cast<uint4*>(tile + swizzle<kChunks>(kChunk + jj, ch) * 16) = lo;
  }
}

// The pair's outputs from the quad-merged state, with the CPU's floors: E = error exp(2m), plus
// (|K_j| - n) e_c^2 |vbar|^2 when the sizes are not the label counts (the centroid term of the CPU's
// formula for tokens the labels do not count). The logs of the fp32 sums are taken in fp32 (as
// exact as the sums); the area's, which the CPU's closed form of an empty cluster holds, in fp64.
template <bool kPlus>
__device__ __forceinline__ void write_pair(const ProbeParams& p, int64_t a, int64_t j, float error, float mass, float m,
                                           float c, int32_t k_size, int32_t tokens, float norm) {
  const int bh = static_cast<int>(blockIdx.z), b = bh / static_cast<int>(p.H), h = bh - b * static_cast<int>(p.H);
  if (k_size != tokens) {
    const float ec = fast_exp2((c - m) * kLog2e);
    error += static_cast<float>(k_size - tokens) * (ec * ec) * norm;
  }
  const double log_error = error > 0.0f ? static_cast<double>(logf(error)) + 2.0 * m : -INFINITY;
  if constexpr (kPlus) {
    const int64_t at = (bh * p.Cq + a) * p.Ck + j;
    p.log_error[at] = log_error;
    p.log_mass[at] = mass > 0.0f ? static_cast<double>(logf(mass)) + m : -INFINITY;
    if (p.spread.data != nullptr)
      p.spread.at(b, h, a, j) =
          mass == 0.0f || k_size == 0
              ? 0.0f
              : static_cast<float>(static_cast<double>(logf(mass / static_cast<float>(k_size))) + m - c);
  } else {
    const double q_size = static_cast<double>(checked_size(p.q_sizes[bh * p.Cq + a], p.flag));
    const double log_area = log(fmax(q_size * k_size, kProbeEps));
    p.scores.at(b, h, a, j) =
        static_cast<float>(fmax(log_error, kLogProbeEps) - static_cast<double>(p.gamma) * log_area);
  }
}

template <typename T, int Dp, bool kPlus>
__global__ void __launch_bounds__(kThreads, 2) pass_kernel(const ProbeParams p, int group_rows, bool vec) {
  using L = Layout<Dp>;
  constexpr int kSteps = Dp / 16;
  extern __shared__ __align__(128) unsigned char smem[];
  float2* stats = reinterpret_cast<float2*>(smem + L::kOffStats);
  float* logit = reinterpret_cast<float*>(smem + L::kOffLogit);
  float* norm = reinterpret_cast<float*>(smem + L::kOffNorm);
  int32_t* size = reinterpret_cast<int32_t*>(smem + L::kOffSize);
  int32_t* offsets = reinterpret_cast<int32_t*>(smem + L::kOffOffsets);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  // Cq, Ck < 2^31 and (b,h) < 65536 (check_probe_limits): 32-bit indices, widened where they address.
  const int bh = static_cast<int>(blockIdx.z);
  const int a0 = static_cast<int>(blockIdx.x) * group_rows + warp * 16;  // the warp's first row
  const bool live = warp * 16 < group_rows && a0 < p.Cq;
  const int j0 = static_cast<int>(blockIdx.y) * kChunk;
  const int n_clusters = static_cast<int>(min_of<int64_t>(kChunk, p.Ck - j0));
  const int32_t* cluster_offsets = p.offsets + bh * (p.Ck + 1) + j0;
  const int32_t first = cluster_offsets[0], end = cluster_offsets[n_clusters];  // the block's sorted tokens

  // ---- the chunk's clusters, the centroid operands and the first token tile ----------------------------
  for (int i = tid; i <= n_clusters; i += kThreads) offsets[i] = cluster_offsets[i];
  for (int i = tid; i < n_clusters; i += kThreads) {
    norm[i] = static_cast<float>(p.centroid_norm2[bh * p.Ck + j0 + i]);
    size[i] = static_cast<int32_t>(checked_size(p.k_sizes[bh * p.Ck + j0 + i], p.flag));
  }
  const int tiles = static_cast<int>((end - first + kTileTokens - 1) / kTileTokens);
  if (tiles > 0) load_tile<T, Dp>(p, first, end, vec, smem + L::kOffKeys, stats);
  cp_async_commit();
  load_centroid_tile<T, Dp>(p, bh, j0, n_clusters, smem + L::kOffKeys + L::kTileBytes);
  uint32_t q_hi[kSteps][4], q_lo[kSteps][4];
  float row_scale[2];
  query_fragments<T, kSteps>(p, bh, a0, q_hi, q_lo, row_scale);
  __syncthreads();  // the centroid tile and the chunk's data are stored

  const uint32_t k_at = flash::lane_offsets<Dp>(lane, 0).k;
  const uint32_t keys = smem_addr(smem + L::kOffKeys);
  float* warp_logit = logit + warp * 16 * kCStride;                                        // [16 rows][kCStride]
  float* warp_step = reinterpret_cast<float*>(smem + L::kOffStep) + warp * 16 * kSStride;  // [16 rows][kSStride]
  if (live) {
    // c_aj = ((hi + lo) . kbar_hi + (hi + lo) . kbar_lo) scale, through the tokens' MMA sequence (the
    // first product kept in the table while the second is computed).
#pragma unroll 1
    for (int part = 0; part < 2; ++part)
#pragma unroll 1
      for (int sub = 0; sub < kChunk / kStepTokens; ++sub) {
        float c[kStepTiles][4] = {};
        step_logits<T, kSteps>(c, q_hi, q_lo, keys + L::kTileBytes + (part * kChunk + sub * kStepTokens) * L::kRowBytes,
                               k_at);
#pragma unroll
        for (int nt = 0; nt < kStepTiles; ++nt)
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            float& at = warp_logit[(g + 8 * (x / 2)) * kCStride + sub * kStepTokens + 8 * nt + 2 * t4 + x % 2];
            at = part == 0 ? c[nt][x] : (at + c[nt][x]) * row_scale[x / 2];
          }
      }
    __syncwarp();
  }

  // ---- the segmented reductions ------------------------------------------------------------------------
  // Lane (row = lane % 16, parity = lane / 16) takes row a0 + row and the step's columns of its parity,
  // read from the warp's logits staged in shared memory: a segment's columns split evenly between the
  // row's two lanes, and no register array is indexed by column.
  const int row = lane % 16, parity = lane / 16;
  const float* row_logit = warp_logit + row * kCStride;  // c_aj of the chunk's clusters
  float* row_step = warp_step + row * kSStride;          // the step's logits of this row
  int jj = 0;                                            // the open cluster, j0 + jj (the same in every lane)
  // The lane's state of the open cluster: the running max m, e_c = exp(c - m), the sums of the
  // per-token errors and (ear-plus) of the weights, relative to m; |vbar_j|^2.
  float m = 0.0f, ec = 1.0f, error = 0.0f, mass = 0.0f, vbar_norm = 0.0f;
  auto open = [&] {
    m = row_logit[jj];
    ec = 1.0f;
    error = mass = 0.0f;
    vbar_norm = norm[jj];
  };
  // Merges the row's two states (the max first; a + b in both lanes), and lane parity 0 writes the pair.
  auto close = [&] {
    const float top = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 16));
    const float f = fast_exp2((m - top) * kLog2e);
    float e = error * (f * f), w = mass * f;
    e += __shfl_xor_sync(0xffffffffu, e, 16);
    if constexpr (kPlus) w += __shfl_xor_sync(0xffffffffu, w, 16);
    const int64_t a = a0 + row;
    if (parity == 0 && a < p.Cq)
      write_pair<kPlus>(p, a, j0 + jj, e, w, top, row_logit[jj], size[jj], offsets[jj + 1] - offsets[jj], vbar_norm);
  };
  // Adds the step's columns [lo, hi) of this lane's parity (all of the open cluster) to its state.
  auto accumulate = [&](const float2* step_stats, int lo, int hi) {
    const int from = lo + ((lo ^ parity) & 1);
    float top = -INFINITY;
    for (int col = from; col < hi; col += 2) top = fmaxf(top, row_step[col]);
    if (top > m) {  // a new maximum: rescale the sums to it
      const float f = fast_exp2((m - top) * kLog2e);
      error *= f * f;
      mass *= f;
      m = top;
      ec = fast_exp2((row_logit[jj] - top) * kLog2e);
    }
    for (int col = from; col < hi; col += 2) {
      const float2 tv = step_stats[col];  // (|v - vbar|^2, vbar . (v - vbar))
      const float w = fast_exp2((row_step[col] - m) * kLog2e), dw = w - ec;
      error += fmaf(w, fmaf(w, tv.x, (dw + dw) * tv.y), dw * dw * vbar_norm);
      if constexpr (kPlus) mass += w;
    }
  };

  if (live) open();
  for (int n = 0; n < tiles; ++n) {
    cp_async_wait<0>();
    __syncthreads();  // tile n landed; every warp is done with the other stage (tile n - 1, or the centroids)
    if (n + 1 < tiles) {
      const int next = (n + 1) % 2;
      load_tile<T, Dp>(p, first + (n + 1) * kTileTokens, end, vec, smem + L::kOffKeys + next * L::kTileBytes,
                       stats + next * kTileTokens);
      cp_async_commit();
    }
    if (!live) continue;
#pragma unroll 1
    for (int step = 0; step < kTileTokens / kStepTokens; ++step) {
      const int32_t h0 = first + n * kTileTokens + step * kStepTokens, h1 = min(h0 + kStepTokens, end);
      if (h0 >= end) break;
      {
        float s[kStepTiles][4] = {};
        step_logits<T, kSteps>(s, q_hi, q_lo, keys + (n % 2) * L::kTileBytes + step * kStepTokens * L::kRowBytes, k_at);
        __syncwarp();  // the previous step's logits are read
#pragma unroll
        for (int nt = 0; nt < kStepTiles; ++nt)
#pragma unroll
          for (int r = 0; r < 2; ++r)
            *reinterpret_cast<float2*>(warp_step + (g + 8 * r) * kSStride + 8 * nt + 2 * t4) =
                make_float2(s[nt][2 * r] * row_scale[r], s[nt][2 * r + 1] * row_scale[r]);
        __syncwarp();
      }
      const float2* step_stats = stats + (n % 2) * kTileTokens + step * kStepTokens;
      // The clusters that meet [h0, h1), in order: the open one's columns, then, if it ends here, the
      // next (empty clusters close at once).
      int32_t pos = h0;
      while (true) {
        const int32_t cluster_end = offsets[jj + 1];
        const int lo = pos - h0, hi = min(cluster_end, h1) - h0;
        if (lo < hi) accumulate(step_stats, lo, hi);
        if (cluster_end > h1) break;  // it goes on in the next step
        close();
        if (++jj == n_clusters) break;
        open();
        pos = cluster_end;
      }
    }
  }
  // Clusters after the last token (all of them when the chunk has none) are empty.
  if (live)
    while (jj < n_clusters) {
      close();
      if (++jj < n_clusters) open();
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

void set_probe_kernel_override(const char* name) { g_cuda_cores.store(ear::cuda_cores_override(name, "probe")); }

namespace ear {

bool probe_on_tensor_cores(const ProbeParams& p, const Stream& stream, bool pair_values) {
  return !g_cuda_cores.load() && !pair_values && (p.k_dtype == DType::BF16 || p.k_dtype == DType::F16) &&
         p.D <= kMaxDim && device_arch(stream.device.index).major >= 8;
}

void launch_probe_pass_tc(const ProbeParams& p, int64_t batch_heads, bool plus, cudaStream_t stream) {
  if (p.N > 0)
    dispatch_float(p.v_dtype, [&](auto tag) {
      stats_kernel<typename decltype(tag)::type>
          <<<dim3(static_cast<unsigned>(ceil_div(p.N, kWarps)), static_cast<unsigned>(batch_heads)), kThreads, 0,
             stream>>>(p);
      SAPATTN_CUDA_CHECK_LAUNCH();
    });
  // Query centroids per block: the m16 tiles spread evenly over the fewest blocks of at most 8 warps
  // (Cq 300: 19 tiles, 3 blocks of 7 warps, 336 rows computed for 300).
  const int64_t row_tiles = ceil_div(p.Cq, 16), groups = ceil_div(row_tiles, kWarps);
  const int group_rows = static_cast<int>(ceil_div(row_tiles, groups) * 16);
  const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(ceil_div(p.Ck, kChunk)),
                  static_cast<unsigned>(batch_heads));
  bool vec = p.k_stride[3] == 1 && p.D % 8 == 0 && reinterpret_cast<uintptr_t>(p.k) % 16 == 0;
  for (int d = 0; d < 3; ++d) vec = vec && p.k_stride[d] % 8 == 0;
  const auto launch = [&](auto kernel, int smem) {
    set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
    kernel<<<grid, kThreads, smem, stream>>>(p, group_rows, vec);
    SAPATTN_CUDA_CHECK_LAUNCH();
  };
  const auto by_dim = [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (padded_dim(p.D) == 64) {
      plus ? launch(pass_kernel<T, 64, true>, Layout<64>::kBytes)
           : launch(pass_kernel<T, 64, false>, Layout<64>::kBytes);
    } else {
      plus ? launch(pass_kernel<T, 128, true>, Layout<128>::kBytes)
           : launch(pass_kernel<T, 128, false>, Layout<128>::kBytes);
    }
  };
  if (p.k_dtype == DType::F16)
    by_dim(TypeTag<__half>{});
  else
    by_dim(TypeTag<__nv_bfloat16>{});
}

}  // namespace ear

}  // namespace sapattn::cuda
