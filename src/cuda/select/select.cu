// Block selection on the GPU: SVG2's size-weighted centroid softmax and the per-row top-p rule,
// the joint-text rule and the block density.
//
// select_blocks runs the threshold kernel of select_threshold.cu by default; the kernel here, which
// select_top_p always runs, reproduces the CPU reference's arithmetic step by step, so that its masks
// agree bit for bit (select_blocks takes it under set_select_kernel_override("exact")): scores are
// fp32 dot products accumulated in order of d with separate multiply and add roundings (the CPU's
// loop; no FMA contraction), exp(s - m) is evaluated in double and rounded once (the correctly
// rounded fp32 value; the CPU computes it the same way), the row total is a sequential fp32 sum in
// column order, and the top-p running sum is a sequential fp32 sum in rank order. The only parallel
// parts are order-free: the row max, the ranking (a stable radix sort of (weight desc, index asc))
// and the mask writes.
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_reduce.cuh>

#include <atomic>
#include <cfloat>
#include <cstring>

#include "cuda/runtime/device.cuh"
#include "cuda/select/select_internal.hpp"

namespace sapattn::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kTileCols = kThreads;          // key centroids staged per block of the score phase: one per thread
constexpr int kTileDepth = 32;               // head-dim chunk staged at a time
constexpr int kTileStride = kTileDepth + 4;  // floats; 144-byte rows keep float4 reads conflict-free

struct SelectParams {
  // select_blocks inputs (contiguous [B,H,C,D] f32 and [B,H,Ck] i32)
  const float* q_centroids = nullptr;
  const float* k_centroids = nullptr;
  const int32_t* k_sizes = nullptr;
  int64_t D = 0;
  float scale = 1.0f;
  // select_top_p input: probs [B,H,R,C] f32, any strides
  const float* probs = nullptr;
  int64_t probs_stride[4] = {0, 0, 0, 0};
  // common
  int64_t H = 0, rows = 0, cols = 0;
  float top_p = 1.0f;
  int64_t min_kept = 0;
  uint8_t* mask = nullptr;
  int64_t mask_stride[4] = {0, 0, 0, 0};
};

// Ascending order of these keys = descending order of the floats (any sign; -0 < +0).
__device__ __forceinline__ uint32_t descending_key(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint32_t ascending = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~ascending;
}

// Rows per block for a column capacity: the weights of all rows stay in shared memory (32 KB).
constexpr int rows_per_block(int capacity) { return 8192 / capacity; }

template <int kCapacity>
struct alignas(16) SelectSmem {
  static constexpr int kRows = rows_per_block(kCapacity);
  static constexpr int kItems = kCapacity / kThreads;
  using Sort = cub::BlockRadixSort<uint32_t, kThreads, kItems, uint16_t, 6>;
  float weights[kRows][kCapacity];
  uint16_t order[kRows][kCapacity];
  int32_t sizes[kCapacity];
  float row_max[kRows];
  int32_t kept[kRows];
  bool unranked[kRows];  // a NaN weight: the row keeps every cluster (as the CPU's keep_top_p_row)
  union alignas(16) {
    float tile[kTileCols][kTileStride];  // score phase (float4 reads)
    typename Sort::TempStorage sort;     // ranking phase
  } scratch;
  // q rows [kRows][D] follow (dynamic), at a 16-byte aligned offset.
};
static_assert(sizeof(SelectSmem<1024>) % 16 == 0 && sizeof(SelectSmem<8192>) % 16 == 0);

// One block per (b,h, group of kRows rows). kFromProbs: select_top_p (weights read from probs);
// otherwise select_blocks (weights from the centroids). kVec4: D % 4 == 0 (float4 score loads).
template <int kCapacity, bool kFromProbs, bool kVec4>
__global__ void __launch_bounds__(kThreads, kCapacity <= 2048 ? 2 : 1) select_kernel(SelectParams p) {
  using Smem = SelectSmem<kCapacity>;
  constexpr int kRows = Smem::kRows;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  float* q_rows = reinterpret_cast<float*>(smem_raw + sizeof(Smem));

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.y;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int rows_here = static_cast<int>(min_of<int64_t>(kRows, p.rows - row0));
  const int64_t C = p.cols;

  // ---- weights -------------------------------------------------------------------------------
  if constexpr (kFromProbs) {
    for (int r = 0; r < rows_here; ++r)
      for (int64_t j = threadIdx.x; j < C; j += kThreads)
        sm.weights[r][j] = p.probs[b * p.probs_stride[0] + h * p.probs_stride[1] + (row0 + r) * p.probs_stride[2] +
                                   j * p.probs_stride[3]];
  } else {
    const int64_t D = p.D;
    const float* qc = p.q_centroids + (bh * p.rows + row0) * D;
    const float* kc = p.k_centroids + bh * C * D;
    for (int64_t t = threadIdx.x; t < kRows * D; t += kThreads) q_rows[t] = t < rows_here * D ? qc[t] : 0.0f;
    for (int64_t j = threadIdx.x; j < C; j += kThreads) sm.sizes[j] = p.k_sizes[bh * C + j];
    // Lane l of warp w owns key centroid w*32 + l of each 256-column block, for every row of the
    // block: its k values are read once per 4 d (one float4) and the q values are broadcasts.
    const int jj = warp * 32 + lane;
    for (int64_t j0 = 0; j0 < C; j0 += kTileCols) {
      float acc[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
      for (int64_t d0 = 0; d0 < D; d0 += kTileDepth) {
        const int depth = static_cast<int>(min_of<int64_t>(kTileDepth, D - d0));
        // All of a thread's loads are issued before its first store (32 floats in flight).
        if constexpr (kVec4) {
          constexpr int kLoads = kTileCols * kTileDepth / 4 / kThreads;
          float4 v[kLoads];
#pragma unroll
          for (int u = 0; u < kLoads; ++u) {
            const int t = threadIdx.x + u * kThreads, tj = t / (kTileDepth / 4), dd = (t % (kTileDepth / 4)) * 4;
            const int64_t j = j0 + tj;
            v[u] = (j < C && dd < depth) ? *reinterpret_cast<const float4*>(kc + j * D + d0 + dd)
                                         : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          }
          __syncthreads();  // the previous chunk is consumed (and q_rows/sizes are written)
#pragma unroll
          for (int u = 0; u < kLoads; ++u) {
            const int t = threadIdx.x + u * kThreads, tj = t / (kTileDepth / 4), dd = (t % (kTileDepth / 4)) * 4;
            *reinterpret_cast<float4*>(&sm.scratch.tile[tj][dd]) = v[u];
          }
        } else {
          constexpr int kLoads = kTileCols * kTileDepth / kThreads;
          float v[kLoads];
#pragma unroll
          for (int u = 0; u < kLoads; ++u) {
            const int t = threadIdx.x + u * kThreads, tj = t / kTileDepth, dd = t % kTileDepth;
            const int64_t j = j0 + tj;
            v[u] = (j < C && dd < depth) ? kc[j * D + d0 + dd] : 0.0f;
          }
          __syncthreads();
#pragma unroll
          for (int u = 0; u < kLoads; ++u) {
            const int t = threadIdx.x + u * kThreads;
            sm.scratch.tile[t / kTileDepth][t % kTileDepth] = v[u];
          }
        }
        __syncthreads();
        const float* k = sm.scratch.tile[jj];
        if constexpr (kVec4) {
          for (int dd = 0; dd < depth; dd += 4) {
            const float4 kv = *reinterpret_cast<const float4*>(k + dd);
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
              const float4 qv = *reinterpret_cast<const float4*>(q_rows + r * D + d0 + dd);
              acc[r] = __fadd_rn(acc[r], __fmul_rn(qv.x, kv.x));
              acc[r] = __fadd_rn(acc[r], __fmul_rn(qv.y, kv.y));
              acc[r] = __fadd_rn(acc[r], __fmul_rn(qv.z, kv.z));
              acc[r] = __fadd_rn(acc[r], __fmul_rn(qv.w, kv.w));
            }
          }
        } else {
          for (int dd = 0; dd < depth; ++dd) {
            const float kv = k[dd];
#pragma unroll
            for (int r = 0; r < kRows; ++r) acc[r] = __fadd_rn(acc[r], __fmul_rn(q_rows[r * D + d0 + dd], kv));
          }
        }
      }
      const int64_t j = j0 + jj;
      if (j < C)
#pragma unroll
        for (int r = 0; r < kRows; ++r)
          if (r < rows_here) sm.weights[r][j] = __fmul_rn(acc[r], p.scale);
    }
    __syncthreads();
    // Size-weighted softmax numerators: one warp per row.
    if (warp < rows_here) {
      float m = -INFINITY;
      bool finite = true;
      for (int64_t j = lane; j < C; j += 32)
        if (sm.sizes[j] > 0) {
          m = fmaxf(m, sm.weights[warp][j]);
          finite = finite && isfinite(sm.weights[warp][j]);
        }
#pragma unroll
      for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      if (!__all_sync(0xffffffffu, finite)) {
        // A NaN or Inf score (from NaN or Inf inputs): every weight is NaN, as on the CPU.
        m = NAN;
        for (int64_t j = lane; j < C; j += 32) sm.weights[warp][j] = NAN;
      }
      if (lane == 0) sm.row_max[warp] = m;
      if (m != -INFINITY && !isnan(m)) {
        for (int64_t j = lane; j < C; j += 32) {
          const int32_t n = sm.sizes[j];
          const float e = static_cast<float>(exp(static_cast<double>(__fsub_rn(sm.weights[warp][j], m))));
          sm.weights[warp][j] = n > 0 ? __fmul_rn(static_cast<float>(n), e) : 0.0f;
        }
        __syncwarp();
        // The CPU's sequential fp32 total, in column order.
        float total = 0.0f;
        if (lane == 0)
          for (int64_t j = 0; j < C; j += 8) {
            float w[8];  // loads first, then the dependent adds
#pragma unroll
            for (int u = 0; u < 8; ++u) w[u] = j + u < C ? sm.weights[warp][j + u] : 0.0f;
#pragma unroll
            for (int u = 0; u < 8; ++u)
              if (j + u < C) total = __fadd_rn(total, w[u]);
          }
        total = __shfl_sync(0xffffffffu, total, 0);
        for (int64_t j = lane; j < C; j += 32) sm.weights[warp][j] = __fdiv_rn(sm.weights[warp][j], total);
      }
    }
  }
  __syncthreads();
  // A row with a NaN weight cannot be ranked: it keeps every cluster, so that the NaN reaches its
  // queries' outputs as in dense attention instead of an empty row's zeros.
  if (warp < rows_here) {
    bool nan = false;
    for (int64_t j = lane; j < C; j += 32) nan = nan || isnan(sm.weights[warp][j]);
    nan = __any_sync(0xffffffffu, nan);
    if (lane == 0) sm.unranked[warp] = nan;
  }
  __syncthreads();

  // ---- ranking: stable radix sort of (weight desc, index asc), one row at a time ----------------
  const bool keep_all = p.top_p >= 1.0f;
  if (!keep_all) {
    for (int r = 0; r < rows_here; ++r) {
      if (sm.unranked[r]) continue;
      if constexpr (!kFromProbs) {
        if (sm.row_max[r] == -INFINITY) continue;  // nothing to rank: the row keeps nothing
      }
      uint32_t keys[Smem::kItems];
      uint16_t idx[Smem::kItems];
#pragma unroll
      for (int i = 0; i < Smem::kItems; ++i) {
        const int j = threadIdx.x * Smem::kItems + i;  // blocked: index order in, so ties keep it
        keys[i] = j < C ? descending_key(sm.weights[r][j]) : 0xffffffffu;
        idx[i] = static_cast<uint16_t>(j);
      }
      // select_blocks' weights lie in [0, 1]: their keys differ only in the low 30 bits.
      typename Smem::Sort(sm.scratch.sort).Sort(keys, idx, 0, kFromProbs ? 32 : 30);
#pragma unroll
      for (int i = 0; i < Smem::kItems; ++i) sm.order[r][threadIdx.x * Smem::kItems + i] = idx[i];
      __syncthreads();  // the sort's storage is reused by the next row
    }
  }

  // ---- the crossing: sequential fp32 running sum in rank order, one warp per row ----------------
  if (warp < rows_here && lane == 0) {
    int64_t kept = C;
    bool empty = false;
    if constexpr (!kFromProbs) empty = sm.row_max[warp] == -INFINITY;
    if (empty) {
      kept = 0;
    } else if (!keep_all && !sm.unranked[warp]) {
      float running = 0.0f;
      for (int64_t rank = 0; rank < C; rank += 8) {
        float w[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) w[u] = rank + u < C ? sm.weights[warp][sm.order[warp][rank + u]] : 0.0f;
        bool crossed = false;
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          if (crossed || rank + u >= C) continue;
          running = __fadd_rn(running, w[u]);
          if (running >= p.top_p) {
            kept = rank + u + 1;
            crossed = true;
          }
        }
        if (crossed) break;
      }
      kept = min_of<int64_t>(C, max_of<int64_t>(kept, p.min_kept));
    }
    sm.kept[warp] = static_cast<int32_t>(kept);
  }
  __syncthreads();

  // ---- the mask rows ---------------------------------------------------------------------------
  for (int r = 0; r < rows_here; ++r) {
    uint8_t* m = p.mask + b * p.mask_stride[0] + h * p.mask_stride[1] + (row0 + r) * p.mask_stride[2];
    const int64_t kept = sm.kept[r];
    for (int64_t rank = threadIdx.x; rank < C; rank += kThreads) {
      const int64_t j = (keep_all || kept == 0 || sm.unranked[r]) ? rank : sm.order[r][rank];
      m[j * p.mask_stride[3]] = rank < kept ? 1 : 0;
    }
  }
}

template <int kCapacity, bool kFromProbs>
void launch_select(const SelectParams& p, int64_t batch_heads, bool vec4, cudaStream_t stream) {
  constexpr int kRows = rows_per_block(kCapacity);
  const size_t smem = sizeof(SelectSmem<kCapacity>) + (kFromProbs ? 0 : kRows * p.D * sizeof(float));
  const dim3 grid(static_cast<unsigned>(ceil_div(p.rows, kRows)), static_cast<unsigned>(batch_heads));
  auto kernel = vec4 ? select_kernel<kCapacity, kFromProbs, true> : select_kernel<kCapacity, kFromProbs, false>;
  set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), static_cast<int>(smem));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  SAPATTN_CUDA_CHECK_LAUNCH();
}

template <bool kFromProbs>
void run_select(const SelectParams& p, int64_t batch_heads, bool vec4, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0 || batch_heads == 0) return;
  SAPATTN_CHECK(p.cols <= kMaxSelectColumns, UnsupportedError, "block selection on CUDA ranks at most ",
                kMaxSelectColumns, " key clusters per row, got ", p.cols);
  SAPATTN_CHECK(batch_heads <= 65535, UnsupportedError, "block selection on CUDA takes at most 65535 (b,h) pairs");
  SAPATTN_CHECK(kFromProbs || p.D <= 1024, UnsupportedError, "select_blocks on CUDA takes head dims up to 1024");
  if (p.cols <= 1024) {
    launch_select<1024, kFromProbs>(p, batch_heads, vec4, stream);
  } else if (p.cols <= 2048) {
    launch_select<2048, kFromProbs>(p, batch_heads, vec4, stream);
  } else if (p.cols <= 4096) {
    launch_select<4096, kFromProbs>(p, batch_heads, vec4, stream);
  } else {
    launch_select<8192, kFromProbs>(p, batch_heads, vec4, stream);
  }
}

void copy_strides(const TensorView& t, int64_t (&out)[4]) {
  for (int d = 0; d < 4; ++d) out[d] = t.stride[d];
}

// ---------------------------------------------------------------------------------------------
// Joint-text rule and density
// ---------------------------------------------------------------------------------------------

__global__ void text_rule_kernel(uint8_t* __restrict__ mask, int64_t H, int64_t Cq, int64_t Ck, int64_t s0, int64_t s1,
                                 int64_t s2, int64_t s3) {
  const int64_t bh = blockIdx.x;
  uint8_t* m = mask + (bh / H) * s0 + (bh % H) * s1;
  auto at = [&](int64_t r, int64_t c) -> uint8_t& { return m[r * s2 + c * s3]; };
  const int64_t prompt = Ck, padding = Ck + 1;
  for (int64_t a = threadIdx.x; a < Cq; a += blockDim.x) {
    at(a, prompt) = 1;   // video rows also see the prompt
    at(a, padding) = 0;  // never the padding
  }
  for (int64_t c = threadIdx.x; c < Ck; c += blockDim.x) {
    at(Cq, c) = 1;      // the prompt sees all video
    at(Cq + 1, c) = 0;  // padding sees no video
  }
  if (threadIdx.x == 0) {
    at(Cq, prompt) = 1;
    at(Cq, padding) = 0;
    at(Cq + 1, prompt) = 0;
    at(Cq + 1, padding) = 1;
  }
}

// One block per (b, h) row of the mask; threads stride over its R x C entries.
__global__ void shard_key_clusters_kernel(uint8_t* __restrict__ mask, int64_t H, int64_t R, int64_t C, int index,
                                          int count, int64_t s0, int64_t s1, int64_t s2, int64_t s3) {
  const int64_t bh = blockIdx.x;
  uint8_t* m = mask + (bh / H) * s0 + (bh % H) * s1;
  for (int64_t i = threadIdx.x; i < R * C; i += blockDim.x) {
    const int64_t r = i / C, c = i % C;
    if (c % count != index) m[r * s2 + c * s3] = 0;
  }
}

struct DensityParams {
  const int32_t* q_offsets;  // [B*H, Cq+1]
  const int32_t* k_offsets;  // [B*H, Ck+1]
  const uint8_t* mask;
  int64_t mask_stride[4];
  int64_t H, Cq, Ck;
  float* density;
  int64_t density_stride[2];
};

// One block per (b,h). Pairs are summed as 64-bit integers, so the order does not matter and the
// result equals the CPU's (whose double sum of integers below 2^53 is exact too).
__global__ void density_kernel(DensityParams p) {
  using Reduce = cub::BlockReduce<long long, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int32_t* qo = p.q_offsets + bh * (p.Cq + 1);
  const int32_t* ko = p.k_offsets + bh * (p.Ck + 1);
  const uint8_t* m = p.mask + b * p.mask_stride[0] + h * p.mask_stride[1];
  long long pairs = 0;
  for (int64_t a = 0; a < p.Cq; ++a) {
    const long long qa = static_cast<long long>(qo[a + 1]) - qo[a];
    for (int64_t c = threadIdx.x; c < p.Ck; c += kThreads)
      if (m[a * p.mask_stride[2] + c * p.mask_stride[3]] != 0)
        pairs += qa * (static_cast<long long>(ko[c + 1]) - ko[c]);
  }
  const long long total = Reduce(temp).Sum(pairs);
  if (threadIdx.x == 0) {
    const double sq = static_cast<double>(qo[p.Cq]) - qo[0], sk = static_cast<double>(ko[p.Ck]) - ko[0];
    p.density[b * p.density_stride[0] + h * p.density_stride[1]] =
        (sq > 0 && sk > 0) ? static_cast<float>(static_cast<double>(total) / (sq * sk)) : 0.0f;
  }
}

// select_blocks' kernel (set_select_kernel_override): 0 the threshold kernel, 1 the exact one.
constexpr int kThresholdKernel = 0, kExactKernel = 1;
std::atomic<int> g_select_kernel{-1};

int parse_select_kernel(const char* name) {
  if (name == nullptr || name[0] == '\0') return kThresholdKernel;
  if (std::strcmp(name, "exact") == 0) return kExactKernel;
  SAPATTN_THROW(InvalidArgumentError, "unknown select_blocks kernel '", name, "' (expected \"exact\" or \"\")");
}

// What select_top_p and select_blocks share: the mask [B,H,rows,cols] they write and the top-p rule.
SelectParams rule_params(int64_t H, int64_t rows, int64_t cols, float top_p, int min_kept, TensorView mask) {
  SelectParams p;
  p.H = H;
  p.rows = rows;
  p.cols = cols;
  p.top_p = top_p;
  p.min_kept = min_kept;
  p.mask = static_cast<uint8_t*>(mask.data);
  copy_strides(mask, p.mask_stride);
  return p;
}

}  // namespace

void select_top_p(const TensorView& probs, float top_p, int min_kept, TensorView mask, const Stream& stream) {
  const DeviceGuard guard(stream.device);
  SelectParams p = rule_params(probs.shape[1], probs.shape[2], probs.shape[3], top_p, min_kept, mask);
  p.probs = static_cast<const float*>(probs.data);
  copy_strides(probs, p.probs_stride);
  run_select<true>(p, probs.shape[0] * probs.shape[1], false, stream_of(stream));
}

void set_select_kernel_override(const char* name) { g_select_kernel.store(parse_select_kernel(name)); }

void select_blocks(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& k_sizes, float scale,
                   float top_p, int min_kept, TensorView mask, const Stream& stream) {
  const DeviceGuard guard(stream.device);
  if (knob_value(g_select_kernel, "SAPATTN_SELECT_KERNEL", parse_select_kernel) == kThresholdKernel)
    return select_blocks_threshold(q_centroids, k_centroids, k_sizes, scale, top_p, min_kept, mask, stream_of(stream));
  SelectParams p = rule_params(q_centroids.shape[1], q_centroids.shape[2], k_centroids.shape[2], top_p, min_kept, mask);
  p.q_centroids = static_cast<const float*>(q_centroids.data);
  p.k_centroids = static_cast<const float*>(k_centroids.data);
  p.k_sizes = static_cast<const int32_t*>(k_sizes.data);
  p.D = q_centroids.shape[3];
  p.scale = scale;
  run_select<false>(p, q_centroids.shape[0] * q_centroids.shape[1], p.D % 4 == 0, stream_of(stream));
}

void apply_text_rule(TensorView mask, const Stream& stream) {
  const int64_t B = mask.shape[0], H = mask.shape[1];
  if (B * H == 0) return;
  const DeviceGuard guard(stream.device);
  text_rule_kernel<<<static_cast<unsigned>(B * H), kThreads, 0, stream_of(stream)>>>(
      static_cast<uint8_t*>(mask.data), H, mask.shape[2] - 2, mask.shape[3] - 2, mask.stride[0], mask.stride[1],
      mask.stride[2], mask.stride[3]);
  SAPATTN_CUDA_CHECK_LAUNCH();
}

void shard_key_clusters(TensorView mask, int index, int count, const Stream& stream) {
  const int64_t B = mask.shape[0], H = mask.shape[1];
  if (B * H == 0) return;
  const DeviceGuard guard(stream.device);
  shard_key_clusters_kernel<<<static_cast<unsigned>(B * H), kThreads, 0, stream_of(stream)>>>(
      static_cast<uint8_t*>(mask.data), H, mask.shape[2], mask.shape[3], index, count, mask.stride[0], mask.stride[1],
      mask.stride[2], mask.stride[3]);
  SAPATTN_CUDA_CHECK_LAUNCH();
}

void block_density(const BlockLayout& layout, TensorView density, const Stream& stream) {
  const int64_t B = layout.q_offsets.shape[0], H = layout.q_offsets.shape[1];
  if (B * H == 0) return;
  const DeviceGuard guard(stream.device);
  DensityParams p{};
  p.q_offsets = static_cast<const int32_t*>(layout.q_offsets.data);
  p.k_offsets = static_cast<const int32_t*>(layout.k_offsets.data);
  p.mask = static_cast<const uint8_t*>(layout.mask.data);
  copy_strides(layout.mask, p.mask_stride);
  p.H = H;
  p.Cq = layout.q_offsets.shape[2] - 1;
  p.Ck = layout.k_offsets.shape[2] - 1;
  p.density = static_cast<float*>(density.data);
  p.density_stride[0] = density.stride[0];
  p.density_stride[1] = density.stride[1];
  density_kernel<<<static_cast<unsigned>(B * H), kThreads, 0, stream_of(stream)>>>(p);
  SAPATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace sapattn::cuda
