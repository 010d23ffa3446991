// The cost steps of round_query_clusters on tensor cores (round_internal.hpp; docs/cuda.md,
// "round_query_clusters"): held to a tolerance against the CPU reference instead of bit-identity, the
// default for f16/bf16 points on sm_80+ (round_on_tensor_cores). The role choice, the candidate
// ranks and the matching that consume these costs are the exact path's (round.cu).
//
// Both steps are the FlashAttention-2 tile steps of the mma.sync kernels (attention/flash_tile.cuh:
// bf16 operands, fp32 accumulators that start at a per-key bias), with Q = a tile of 128 candidates
// (4 warps x two m16 tiles), gathered from q and rounded to bf16:
//   - prefilter: K = the query centroids, the bias -|c_r|^2 / 2 for a target r (kTcPadBias for any
//     other cluster), so that the scores are x.c_r - |c_r|^2 / 2; only the S step runs, with a
//     running maximum per row: best = -2 max_r s_r - (|c_own|^2 - 2 x.c_own), the last term in fp32 on
//     the CUDA cores;
//   - mass: K = the key centroids, the bias log|K_j| / scale (kTcPadBias for an empty cluster), so
//     that the softmax of the logits is the reference's weights p_j; V = the mask transposed,
//     V[j][a] = mask[a, j], so that O[a] = sum_j p_j mask[a, j] is the mass that every query cluster
//     a keeps, 128 clusters per pass (the S step is recomputed per pass: at most 128 fp32 columns of O
//     fit a warp's registers next to S). The masses go to the block's scratch row; cost(x, r) =
//     O[own] - O[target r], ranked per candidate as in the exact path.
// Numerics: a logit differs from the reference's by the bf16 rounding of kbar (and of x for f32
// points, 2^-9 relative each, of scale sum_d |x_d kbar_jd|) plus fp32 accumulation; P is rounded to
// bf16 for P V (2^-9 relative), V is exact (0 or 1), the row sums are fp32. Deterministic: a
// candidate's costs depend on its own row and its head's operands only (fixed mma order, no atomics).
#include <cmath>
#include <cstdint>

#include "cuda/attention/flash_tile.cuh"
#include "cuda/ear/ear.cuh"
#include "cuda/round/round_device.cuh"
#include "cuda/round/round_internal.hpp"
#include "cuda/runtime/device.cuh"
#include "cuda/runtime/primitives.cuh"

namespace sapattn::cuda::qround {

namespace {

using Op = __nv_bfloat16;  // the mma operand type, whatever q's dtype

constexpr int kTcWarps = 4;
constexpr int kTcThreads = kTcWarps * 32;
constexpr int kWarpRows = kTcRows / kTcWarps;  // 32: two m16 tiles share every K and V fragment
constexpr int kMTiles = kWarpRows / 16;
constexpr int kNTiles = kTcKeys / 8;  // n8 tiles of S per m16 tile (prefilter)
// The mass kernel: 8 warps of one m16 tile each, so that O (128 columns: 64 registers) and S (64 keys:
// 32) leave room for the rest (two m16 tiles a warp, as the prefilter and ear_compensation_tc, take
// ~236 registers for O, S and their softmax state in ear_compensation_tc's loop).
constexpr int kMassWarps = 8;
constexpr int kMassThreads = kMassWarps * 32;
constexpr int kMassWarpRows = kTcRows / kMassWarps;
constexpr int kMassMTiles = kMassWarpRows / 16;
constexpr int kVTiles = kTcCols / 8;  // n8 tiles of O per m16 tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kOperandThreads = 256;
constexpr unsigned kOperandBlocksPerHead = 32;
static_assert(kTcThreads == kTcRows && kTcCols == 128 && kTcKeys == 64);

// The 128 rows of a candidate tile (points list[0, count) of head bh; zero rows past count) as bf16
// operands in a swizzled row-major tile of Dp dims, zero past D.
template <typename T, int Dp>
__device__ void load_rows(const PointsView& q, int64_t bh, int64_t H, const int32_t* list, int count,
                          unsigned char* tile) {
  constexpr int kChunks = Dp / 8;
  const T* base = static_cast<const T*>(q.data) + (bh / H) * q.stride[0] + (bh % H) * q.stride[1];
  for (int e = static_cast<int>(threadIdx.x); e < kTcRows * kChunks; e += static_cast<int>(blockDim.x)) {
    const int row = e / kChunks, chunk = e % kChunks;
    float f[8];
    ear::load8(row < count ? base + list[row] * q.stride[2] : nullptr, q.stride[3], chunk * 8, q.D, f);
    *reinterpret_cast<uint4*>(tile + swizzle<kChunks>(row, chunk) * 16) = ear::pack8_bf16(f);
  }
}

// kRows rows of kCols bf16 values from `src` (row stride `stride` elements) into a swizzled tile.
template <int kRows, int kCols>
__device__ __forceinline__ void load_tile_async(uint32_t dst, const Op* src, int64_t stride) {
  constexpr int kChunks = kCols / 8;
  for (int e = static_cast<int>(threadIdx.x); e < kRows * kChunks; e += static_cast<int>(blockDim.x)) {
    const int row = e / kChunks, chunk = e % kChunks;
    cp_async16(dst + swizzle<kChunks>(row, chunk) * 16, src + row * stride + chunk * 8);
  }
}

// The tile's first S values: column j * 8 + 2 t4 (+ 1) of a key tile starts at its bias.
template <int kM, int kN>
__device__ __forceinline__ void start_scores(float (&s)[kM][kN][4], const float* bias, int t4) {
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    const float2 bj = *reinterpret_cast<const float2*>(bias + j * 8 + 2 * t4);
#pragma unroll
    for (int mt = 0; mt < kM; ++mt) {
      s[mt][j][0] = s[mt][j][2] = bj.x;
      s[mt][j][1] = s[mt][j][3] = bj.y;
    }
  }
}

// Every operand of a head that takes part: key and query centroids rounded to bf16, the biases, the
// mask transposed to 0/1 values. Grid (kOperandBlocksPerHead, B*H).
template <int Dp>
__global__ void __launch_bounds__(kOperandThreads) operands_kernel(CostInputs in, Dims d, Work w) {
  constexpr int kChunks = Dp / 8;
  const int64_t bh = blockIdx.y;
  const HeadInfo info = w.info[bh];
  if (!info.active) return;
  const int64_t C = d.C, Ck = d.Ck, D = d.D, W = d.W, v_chunks = d.v_cols / 8;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kOperandThreads;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kOperandThreads + threadIdx.x;
  const float* kc = in.kc + bh * Ck * D;
  const float* qc = in.qc + bh * C * D;
  const int32_t* ks = in.ks + bh * Ck;
  auto* kc_op = reinterpret_cast<uint4*>(w.kc_op + bh * d.ck_pad * Dp);
  auto* qc_op = reinterpret_cast<uint4*>(w.qc_op + bh * d.c_pad * Dp);
  auto* v_op = reinterpret_cast<uint4*>(w.v_op + bh * d.ck_pad * d.v_cols);
  for (int64_t e = start; e < d.ck_pad * kChunks; e += step) {
    const int64_t j = e / kChunks;
    float f[8];
    ear::load8(j < Ck ? kc + j * D : nullptr, int64_t{1}, (e % kChunks) * 8, D, f);
    kc_op[e] = ear::pack8_bf16(f);
  }
  for (int64_t e = start; e < d.c_pad * kChunks; e += step) {
    const int64_t a = e / kChunks;
    float f[8];
    ear::load8(a < C ? qc + a * D : nullptr, int64_t{1}, (e % kChunks) * 8, D, f);
    qc_op[e] = ear::pack8_bf16(f);
  }
  const uint32_t* rowbits = w.rowbits + bh * C * W;
  for (int64_t e = start; e < d.ck_pad * v_chunks; e += step) {
    const int64_t j = e / v_chunks, a0 = (e % v_chunks) * 8;
    float f[8];
#pragma unroll
    for (int u = 0; u < 8; ++u)
      f[u] = a0 + u < C && j < Ck ? static_cast<float>((rowbits[(a0 + u) * W + j / 32] >> (j % 32)) & 1u) : 0.0f;
    v_op[e] = ear::pack8_bf16(f);
  }
  // log|K_j| / scale: the accumulators carry it, and s scale log2 e is then the logit in the log2
  // domain, as in the attention.
  for (int64_t j = start; j < d.ck_pad; j += step)
    w.k_bias[bh * d.ck_pad + j] = j < Ck && ks[j] > 0 ? logf(static_cast<float>(ks[j])) / d.scale : kTcPadBias;
  // A cluster is a target when it is in the head's ascending target list.
  const int32_t* targets = w.targets + bh * C;
  for (int64_t a = start; a < d.c_pad; a += step) {
    int lo = 0, hi = info.R;  // the first target >= a
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (targets[mid] < a)
        lo = mid + 1;
      else
        hi = mid;
    }
    const bool target = lo < info.R && targets[lo] == a;
    w.pf_bias[bh * d.c_pad + a] = target ? -0.5f * w.c2[bh * C + a] : kTcPadBias;
  }
}

// A tile of the flat list `tiles` (tile_rows = kTcRows): its head, the head's info and its first
// candidate.
struct TileAt {
  int64_t bh, first;
  HeadInfo info;
};
__device__ __forceinline__ TileAt tile_at(const Dims& dims, const Work& w, const int32_t* tiles, int64_t t) {
  const int64_t bh = head_of(tiles, dims.BH, t);
  return {bh, (t - tiles[bh]) * kTcRows, w.info[bh]};
}

// ---------------------------------------------------------------------------------------------
// Prefilter: best[u] = min_r (|c_r|^2 - 2 x.c_r) - (|c_own|^2 - 2 x.c_own) = -2 max_r s_r - own.
// ---------------------------------------------------------------------------------------------

template <int Dp>
struct PrefilterLayout {
  static constexpr int kRowBytes = Dp * 2;
  static constexpr int kOffQ = 0;                                  // Op [128][Dp], swizzled
  static constexpr int kOffK = kOffQ + kTcRows * kRowBytes;        // Op [2][64][Dp], swizzled
  static constexpr int kOffOwn = kOffK + 2 * kTcKeys * kRowBytes;  // f32 [128]
  static constexpr int kBytes = kOffOwn + kTcRows * 4;
};

template <typename T, int Dp>
__global__ void __launch_bounds__(kTcThreads, 2) prefilter_tc_kernel(CostInputs in, Dims dims, Work w) {
  using L = PrefilterLayout<Dp>;
  extern __shared__ __align__(128) unsigned char smem[];
  float* own = reinterpret_cast<float*>(smem + L::kOffOwn);
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int64_t D = dims.D, C = dims.C, N = dims.N, key_tiles = dims.c_pad / kTcKeys;
  const flash::LaneOffsets lanes = flash::lane_offsets<Dp>(lane, warp * kWarpRows);
  const uint32_t q_tile = smem_addr(smem + L::kOffQ), k_tiles = smem_addr(smem + L::kOffK);
  const int64_t total = w.tiles0[dims.BH];
  for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
    const TileAt at = tile_at(dims, w, w.tiles0, t);
    const int64_t bh = at.bh;
    const int count = static_cast<int>(min_of<int64_t>(kTcRows, at.info.P0 - at.first));
    const int32_t* list = w.pts0 + bh * N + at.first;
    const Op* keys = reinterpret_cast<const Op*>(w.qc_op) + bh * dims.c_pad * Dp;
    const float* bias = w.pf_bias + bh * dims.c_pad;
    __syncthreads();  // every warp is done with the previous tile's rows and keys
    load_tile_async<kTcKeys, Dp>(k_tiles, keys, Dp);
    cp_async_commit();
    load_rows<T, Dp>(in.q, bh, dims.H, list, count, smem + L::kOffQ);
    if (tid < count) {  // |c_own|^2 - 2 x.c_own in fp32, x as given
      const int32_t i = list[tid];
      const int64_t c = in.labels[(bh / dims.H) * in.labels_stride_b + (bh % dims.H) * in.labels_stride_h + i];
      const T* x = static_cast<const T*>(in.q.data) + (bh / dims.H) * in.q.stride[0] + (bh % dims.H) * in.q.stride[1] +
                   i * in.q.stride[2];
      const float* cr = in.qc + (bh * C + c) * D;
      float dot = 0.0f;
      for (int64_t d = 0; d < D; ++d) dot = fmaf(to_f32(x[d * in.q.stride[3]]), cr[d], dot);
      own[tid] = w.c2[bh * C + c] - 2.0f * dot;
    }
    const bool warp_live = warp * kWarpRows < count;
    float best[2 * kMTiles];
#pragma unroll
    for (int i = 0; i < 2 * kMTiles; ++i) best[i] = -INFINITY;
    for (int64_t n = 0; n < key_tiles; ++n) {
      cp_async_wait<0>();
      __syncthreads();  // K[n] and the rows landed; every warp is done with K[n - 1]
      if (n + 1 < key_tiles) {
        load_tile_async<kTcKeys, Dp>(k_tiles + ((n + 1) % 2) * kTcKeys * L::kRowBytes, keys + (n + 1) * kTcKeys * Dp,
                                     Dp);
        cp_async_commit();
      }
      if (!warp_live) continue;
      float s[kMTiles][kNTiles][4];
      start_scores(s, bias + n * kTcKeys, t4);
      flash::qk_tile<Op, kMTiles, kNTiles, Dp>(s, q_tile, opaque(lanes.q), k_tiles + (n % 2) * kTcKeys * L::kRowBytes,
                                               opaque(lanes.k));
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int j = 0; j < kNTiles; ++j)
#pragma unroll
          for (int half = 0; half < 2; ++half)  // fmaxf: a NaN never wins
            best[2 * mt + half] = fmaxf(best[2 * mt + half], fmaxf(s[mt][j][2 * half], s[mt][j][2 * half + 1]));
    }
    if (!warp_live) continue;
#pragma unroll
    for (int i = 0; i < 2 * kMTiles; ++i) {
      // The four lanes of a quad hold the row's other columns.
      float m = fmaxf(best[i], __shfl_xor_sync(0xffffffffu, best[i], 1));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
      const int row = warp * kWarpRows + (i / 2) * 16 + (i % 2) * 8 + g;
      if (t4 == 0 && row < count) w.best[bh * N + at.first + row] = -2.0f * m - own[row];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Mass cost and ranking.
// ---------------------------------------------------------------------------------------------

template <int Dp>
struct MassLayout {
  static constexpr int kRowBytes = Dp * 2;
  static constexpr int kOffQ = 0;                            // Op [128][Dp], swizzled
  static constexpr int kOffK = kOffQ + kTcRows * kRowBytes;  // Op [64][Dp], swizzled
  static constexpr int kOffV = kOffK + kTcKeys * kRowBytes;  // Op [64][128], swizzled
  static constexpr int kOffItem = kOffV + kTcKeys * kTcCols * 2;
  static constexpr int kBytes = kOffItem + 32;
};

// The operands of the tile's head, in shared memory: the main loop keeps its registers for O and S.
struct MassItem {
  const Op* keys;     // [ck_pad, Dp]
  const Op* values;   // [ck_pad, v_cols]
  const float* bias;  // [ck_pad]
};

template <typename T, int Dp>
__global__ void __launch_bounds__(kMassThreads, 1) mass_tc_kernel(CostInputs in, Dims dims, Work w) {
  using L = MassLayout<Dp>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int64_t C = dims.C;
  const int v_cols = static_cast<int>(dims.v_cols), key_tiles = static_cast<int>(dims.ck_pad / kTcKeys);
  const float scale_log2 = dims.scale * kLog2e;
  const double max_cost = dims.max_cost;
  const flash::LaneOffsets lanes = flash::lane_offsets<Dp>(lane, warp * kMassWarpRows);
  const uint32_t v_at0 = flash::lane_offsets<kTcCols>(lane, 0).v;
  const uint32_t q_tile = smem_addr(smem + L::kOffQ), k_tile = smem_addr(smem + L::kOffK),
                 v_tile = smem_addr(smem + L::kOffV);
  float* mass = w.tile_mass + blockIdx.x * kTcRows * v_cols;  // [128][v_cols]: this block's rows
  MassItem& item = *reinterpret_cast<MassItem*>(smem + L::kOffItem);
  const int64_t total = w.tiles[dims.BH];
  for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
    const TileAt at = tile_at(dims, w, w.tiles, t);
    const int64_t bh = at.bh;
    const int count = static_cast<int>(min_of<int64_t>(kTcRows, at.info.P - at.first));
    const bool warp_live = warp * kMassWarpRows < count;
    __syncthreads();  // every warp is done with the previous tile's rows, keys, values and item
    if (tid == 0)
      item = MassItem{reinterpret_cast<const Op*>(w.kc_op) + bh * dims.ck_pad * Dp,
                      reinterpret_cast<const Op*>(w.v_op) + bh * dims.ck_pad * v_cols, w.k_bias + bh * dims.ck_pad};
    load_rows<T, Dp>(in.q, bh, dims.H, w.pts + bh * dims.Pb + at.first, count, smem + L::kOffQ);
    __syncthreads();  // the item is stored
    for (int c0 = 0; at.info.any_key && c0 < v_cols; c0 += kTcCols) {
      float o[kMassMTiles][kVTiles][4];
      float row_max[2 * kMassMTiles], row_sum[2 * kMassMTiles];
      flash::start_rows(o, row_max, row_sum);
      load_tile_async<kTcKeys, Dp>(k_tile, item.keys, Dp);
      cp_async_commit();
      for (int n = 0; n < key_tiles; ++n) {
        cp_async_wait<0>();
        __syncthreads();  // K[n] (and the rows) landed; every warp is done with V[n - 1]
        load_tile_async<kTcKeys, kTcCols>(v_tile, item.values + static_cast<int64_t>(n) * kTcKeys * v_cols + c0,
                                          v_cols);
        cp_async_commit();
        float s[kMassMTiles][kNTiles][4];
        if (warp_live) {
          start_scores(s, item.bias + n * kTcKeys, t4);
          flash::qk_tile<Op, kMassMTiles, kNTiles, Dp>(s, q_tile, opaque(lanes.q), k_tile, opaque(lanes.k));
        }
        cp_async_wait<0>();
        __syncthreads();  // V[n] landed; every warp is done with K[n]
        if (n + 1 < key_tiles) {
          load_tile_async<kTcKeys, Dp>(k_tile, item.keys + (n + 1) * kTcKeys * Dp, Dp);
          cp_async_commit();
        }
        if (warp_live) {
          float base[2 * kMassMTiles], rescale[2 * kMassMTiles];
          flash::softmax_step(s, scale_log2, row_max, row_sum, base, rescale);
          flash::rescale_o(o, rescale);
          flash::pv_tile<Op, kMassMTiles, kNTiles, kVTiles>(o, s, scale_log2, base, row_sum, v_tile, opaque(v_at0));
        }
      }
      if (!warp_live) continue;
        // The masses O / sum of this warp's rows, for clusters c0 .. c0 + 127.
#pragma unroll
      for (int mt = 0; mt < kMassMTiles; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int i = 2 * mt + half, row = warp * kMassWarpRows + mt * 16 + half * 8 + g;
          float sum = row_sum[i];
          sum += __shfl_xor_sync(0xffffffffu, sum, 1);
          sum += __shfl_xor_sync(0xffffffffu, sum, 2);
          const float inv = 1.0f / sum;
          float* out = mass + row * v_cols + c0 + 2 * t4;
#pragma unroll
          for (int j = 0; j < kVTiles; ++j)
            *reinterpret_cast<float2*>(out + j * 8) =
                make_float2(o[mt][j][2 * half] * inv, o[mt][j][2 * half + 1] * inv);
        }
    }
    __syncwarp();  // the warp's mass rows are written (each warp ranks its own rows)
    // cost = own mass - the target's; above the cap (or NaN) forbidden; with no non-empty key cluster
    // every cost is 0.
    const int32_t* targets = w.targets + bh * C;
    const int32_t* donor = w.donor + bh * dims.Pb + at.first;
    const bool any_key = at.info.any_key;
    const auto cost_of = [=](int i, int r) {
      const float* m = mass + i * v_cols;
      const double c = any_key ? static_cast<double>(m[donor[i]]) - static_cast<double>(m[targets[r]]) : 0.0;
      return c != c || c > max_cost ? static_cast<double>(INFINITY) : c;
    };
    const int64_t kk = at.info.kk, at_cand = bh * dims.Pb * dims.kk + at.first * kk;
    rank_targets(warp * kMassWarpRows, min_of(count, (warp + 1) * kMassWarpRows), 1, at.info.R, kk, cost_of,
                 w.cand_idx + at_cand, w.cand_cost + at_cand);
  }
}

template <class Kernel>
void launch_tc(Kernel kernel, int threads, const CostInputs& in, const Dims& dims, const Work& w, int smem,
               cudaStream_t stream) {
  set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  kernel<<<static_cast<unsigned>(dims.blocks), threads, smem, stream>>>(in, dims, w);
  SAPATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace

void launch_tc_operands(const CostInputs& in, const Dims& dims, const Work& w, cudaStream_t stream) {
  const dim3 grid(kOperandBlocksPerHead, static_cast<unsigned>(dims.BH));
  if (dims.Dp == 64)
    operands_kernel<64><<<grid, kOperandThreads, 0, stream>>>(in, dims, w);
  else
    operands_kernel<128><<<grid, kOperandThreads, 0, stream>>>(in, dims, w);
  SAPATTN_CUDA_CHECK_LAUNCH();
}

void launch_prefilter_tc(const CostInputs& in, const Dims& dims, const Work& w, DType dtype, cudaStream_t stream) {
  dispatch_float(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (dims.Dp == 64)
      launch_tc(prefilter_tc_kernel<T, 64>, kTcThreads, in, dims, w, PrefilterLayout<64>::kBytes, stream);
    else
      launch_tc(prefilter_tc_kernel<T, 128>, kTcThreads, in, dims, w, PrefilterLayout<128>::kBytes, stream);
  });
}

void launch_mass_cost_tc(const CostInputs& in, const Dims& dims, const Work& w, DType dtype, cudaStream_t stream) {
  dispatch_float(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (dims.Dp == 64)
      launch_tc(mass_tc_kernel<T, 64>, kMassThreads, in, dims, w, MassLayout<64>::kBytes, stream);
    else
      launch_tc(mass_tc_kernel<T, 128>, kMassThreads, in, dims, w, MassLayout<128>::kBytes, stream);
  });
}

}  // namespace sapattn::cuda::qround
