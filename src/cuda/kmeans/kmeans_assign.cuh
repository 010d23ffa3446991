// The tensor-core k-means assignment: labels[i] = argmin_c ||x_i - c||^2 without an N x C matrix.
//
// Each block owns 256 points of one (b,h) (8 warps x 32 rows); two blocks share an SM (<= 128
// registers, ~100 KB of shared memory), so one block's start and end overlap the other's main loop.
// The points tile is converted to the operand type (bf16, or f16 for f16 points) once (cp.async
// when it needs no conversion) and held in registers as mma A fragments; the prepared centroids
// round(-c) stream through shared memory in tiles of 64 (cp.async, double buffered).
// mma.sync m16n8k16 with fp32 accumulators starts from ||c||^2/2 + ||x||^2/2 + M, so each
// accumulator ends as ||x - c||^2 / 2 + M: half the distance plus a per-row margin M that keeps it
// positive despite rounding. Positive floats order like their bits, so the epilogue packs the column
// into the low mantissa bits (a key) and keeps the two smallest keys per row with three integer
// min/max instructions per value; equal keys go to the lower column.
//
// Near-ties are re-ranked exactly. The bf16 operands move a distance by at most E (the error bound
// below); when the two best approximate distances are within 2E, the two candidates' distances are
// recomputed the CPU reference's way (fp32 sum of squared differences, 8 partial sums combined as a
// tree, no FMA) and the smaller wins, ties to the lower index. The label then equals the CPU's
// unless the CPU's best is not among the two best approximate candidates, which needs a third
// centroid within 2E of the best: a tie within rounding.
#pragma once

#include <type_traits>

#include "cuda/kmeans/kmeans_internal.hpp"
#include "cuda/runtime/device.cuh"
#include "cuda/runtime/primitives.cuh"

namespace sapattn::cuda::tc {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 32;
constexpr int kBlockRows = kWarps * kRowsPerWarp;
constexpr int kTileN = static_cast<int>(kCentroidTile);
constexpr int kStages = 2;
// Accumulator columns per pass over k (a template parameter, 8 or 16): 16 give each warp four
// independent mma chains per k step (8: two), at 8 more registers; both keep the block near 128
// registers (two blocks per SM). Each B fragment serves both m tiles either way.

// Shared memory of the block, in bytes: the swizzled A tile, the B stages with their half norms,
// the points' squared norms, and per warp a list of rows to re-rank.
template <int D>
struct Layout {
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kKSteps = D / 16;
  static constexpr int kATileBytes = kBlockRows * D * 2;
  static constexpr int kBTileBytes = kTileN * D * 2;
  static constexpr int kOffA = 0;
  static constexpr int kOffB = kOffA + kATileBytes;
  static constexpr int kOffNorm = kOffB + kStages * kBTileBytes;
  static constexpr int kOffRowNorm = kOffNorm + kStages * kTileN * 4;
  static constexpr int kOffRowBase = kOffRowNorm + kBlockRows * 4;
  static constexpr int kOffList = kOffRowBase + kBlockRows * 4;
  static constexpr int kOffCount = kOffList + kWarps * 32 * 16;
  static constexpr int kBytes = kOffCount + kWarps * 4;
};

template <typename OpT>
__device__ __forceinline__ float unpack(uint32_t w, int hi) {
  const uint16_t bits = static_cast<uint16_t>(hi ? (w >> 16) : (w & 0xffffu));
  if constexpr (std::is_same_v<OpT, __nv_bfloat16>) {
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  } else {
    return __half2float(__ushort_as_half(bits));
  }
}

// Keys: the bits of a positive float whose low `bits` mantissa bits are replaced by the column.
// Integer order of keys = float order (truncated to 23 - bits mantissa bits), then column order.
__device__ __forceinline__ int make_key(float v, int col, int mask) { return (__float_as_int(v) & ~mask) | col; }
__device__ __forceinline__ float key_value(int key, int mask) { return __int_as_float(key & ~mask); }

template <typename OpT, int D, typename InT, int kColsPerPass>
__global__ void __launch_bounds__(kThreads, 2) assign_kernel(const TensorCoreAssignParams p) {
  using L = Layout<D>;
  constexpr int kChunks = L::kChunks;
  constexpr int kKSteps = L::kKSteps;
  extern __shared__ __align__(128) unsigned char smem[];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const int64_t c_pad = p.prepared.c_pad;
  const int tiles = static_cast<int>(c_pad / kTileN);
  const int mask = p.index_mask;  // low bits that hold the column
  const OpT* cent = static_cast<const OpT*>(p.prepared.operand) + bh * c_pad * D;
  const float* half_norm = p.prepared.half_norm + bh * c_pad;
  const InT* pts = static_cast<const InT*>(p.points) + b * p.p_stride[0] + h * p.p_stride[1];
  int* list_count = reinterpret_cast<int*>(smem + L::kOffCount);
  int4* list = reinterpret_cast<int4*>(smem + L::kOffList) + warp * 32;
  float* row_norm2 = reinterpret_cast<float*>(smem + L::kOffRowNorm);
  float* row_base = reinterpret_cast<float*>(smem + L::kOffRowBase);

  auto issue_tile = [&](int tile, int stage) {
    const uint32_t base = smem_addr(smem + L::kOffB + stage * L::kBTileBytes);
    const OpT* src = cent + static_cast<int64_t>(tile) * kTileN * D;
#pragma unroll
    for (int u = 0; u < kTileN * kChunks / kThreads; ++u) {
      const int i = tid + u * kThreads;
      const int row = i / kChunks, ch = i % kChunks;
      cp_async16(base + swizzle<kChunks>(row, ch) * 16, src + row * D + ch * 8);
    }
    if (tid < kTileN / 4)
      cp_async16(smem_addr(smem + L::kOffNorm + stage * kTileN * 4) + tid * 16,
                 half_norm + static_cast<int64_t>(tile) * kTileN + tid * 4);
  };

  // ---- the points tile, in the operand type, swizzled ------------------------------------------
  constexpr int kAChunksPerThread = kBlockRows * kChunks / kThreads;
  if (std::is_same_v<InT, OpT> && p.vector_rows) {
    // No conversion: cp.async straight into the swizzled tile, zeros past the last point.
#pragma unroll
    for (int u = 0; u < kAChunksPerThread; ++u) {
      const int i = tid + u * kThreads;
      const int row = i / kChunks, ch = i % kChunks;
      const int64_t n = n0 + row;
      const InT* src = pts + (n < p.N ? n : 0) * p.p_stride[2] + ch * 8;
      cp_async16_zfill(smem_addr(smem + L::kOffA + swizzle<kChunks>(row, ch) * 16), src, n < p.N);
    }
    cp_async_commit();
  } else {
    // Converted through registers, 4 chunks in flight per thread.
#pragma unroll
    for (int u0 = 0; u0 < kAChunksPerThread; u0 += 4) {
      float f[4][8];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = tid + (u0 + u) * kThreads;
        const int row = i / kChunks, ch = i % kChunks;
        const int64_t n = n0 + row;
        const InT* src = pts + (n < p.N ? n : 0) * p.p_stride[2] + static_cast<int64_t>(ch) * 8 * p.p_stride[3];
        if (std::is_same_v<InT, float> && p.vector_rows) {
          const float4 lo = reinterpret_cast<const float4*>(src)[0], hi = reinterpret_cast<const float4*>(src)[1];
          f[u][0] = lo.x, f[u][1] = lo.y, f[u][2] = lo.z, f[u][3] = lo.w;
          f[u][4] = hi.x, f[u][5] = hi.y, f[u][6] = hi.z, f[u][7] = hi.w;
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) f[u][e] = to_f32(src[e * p.p_stride[3]]);
        }
        if (n >= p.N)
#pragma unroll
          for (int e = 0; e < 8; ++e) f[u][e] = 0.0f;
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = tid + (u0 + u) * kThreads;
        const int row = i / kChunks, ch = i % kChunks;
        *reinterpret_cast<uint4*>(smem + L::kOffA + swizzle<kChunks>(row, ch) * 16) =
            make_uint4(pack2<OpT>(f[u][0], f[u][1]), pack2<OpT>(f[u][2], f[u][3]), pack2<OpT>(f[u][4], f[u][5]),
                       pack2<OpT>(f[u][6], f[u][7]));
      }
    }
  }
  issue_tile(0, 0);
  cp_async_commit();
  if (lane == 0) list_count[warp] = 0;
  cp_async_wait<1>();  // the points tile (the first centroid tile may still be in flight)
  __syncthreads();

  // The near-tie bound E of a row (docs/cuda.md), in full-distance units: the rounding of the
  // centroids (and of f32 points) to the operand type, fp32 accumulation in the matrix unit and of
  // the norms, and the CPU reference's own fp32 rounding. Half distances are compared, so two
  // candidates are re-ranked when their half distances are within E/2 (plus the key truncation)
  // of each other. A row's accumulators start at ||x||^2/2 + M, where the margin M keeps them
  // positive: ||x - c~||^2/2 + (||c||^2 - ||c~||^2)/2 >= -||c|| ||c - c~||.
  const int32_t* stats = p.prepared.stats + bh * 2;
  const float max_norm2 = __int_as_float(stats[0]), max_resid = __int_as_float(stats[1]);
  const float nc = sqrtf(max_norm2);
  struct Bound {
    float margin, half_gap;
  };
  auto bound_of = [&](float x2) {
    const float nx = sqrtf(x2);
    const float ux = std::is_same_v<InT, float> ? 0x1p-8f : 0.0f;
    const float span = (nx + nc) * (nx + nc);
    const float accumulate = (D + 4) * 0x1p-23f * span;
    const float full = 2.0f * nx * max_resid + 2.0f * ux * nx * nc + accumulate + (D + 4) * 0x1p-24f * span;
    const float margin = 1.01f * nc * max_resid + accumulate;
    // Keys keep 23 - index bits of mantissa: truncation error <= value * 2^(bits - 23) per key.
    const float quant = ldexpf(0.5f * span + margin, p.index_bits - 23);
    return Bound{margin, (0.5f * full + 2.0f * quant) * 1.0625f};
  };

  // Squared norms of the operand rows and the rows' accumulator start: lane l of warp w takes row 32w + l.
  {
    const int row = warp * kRowsPerWarp + lane;
    float s = 0.0f;
#pragma unroll
    for (int ch = 0; ch < kChunks; ++ch) {
      const uint4 c = *reinterpret_cast<const uint4*>(smem + L::kOffA + swizzle<kChunks>(row, ch) * 16);
      const uint32_t w[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float v = unpack<OpT>(w[e / 2], e % 2);
        s = fmaf(v, v, s);
      }
    }
    row_norm2[row] = s;
    row_base[row] = 0.5f * s + bound_of(s).margin;
  }
  __syncwarp();

  // A fragments: this warp's 32 rows x D, for every k step.
  uint32_t a[2][kKSteps][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      const int row = warp * kRowsPerWarp + mt * 16 + (lane % 16);
      const int ch = ks * 2 + lane / 16;
      ldmatrix_x4(smem_addr(smem + L::kOffA + swizzle<kChunks>(row, ch) * 16), a[mt][ks][0], a[mt][ks][1], a[mt][ks][2],
                  a[mt][ks][3]);
    }

  // Per row slot (m tile, upper/lower 8 rows) the two smallest keys so far.
  int k1[4], k2[4];
#pragma unroll
  for (int s = 0; s < 4; ++s) k1[s] = k2[s] = 0x7fffffff;

  for (int tile = 0; tile < tiles; ++tile) {
    cp_async_wait<0>();
    __syncthreads();  // tile `tile` has landed for all; the other stage is free to refill
    if (tile + 1 < tiles) issue_tile(tile + 1, (tile + 1) % kStages);
    cp_async_commit();
    const int stage = tile % kStages;
    const uint32_t bbase = smem_addr(smem + L::kOffB + stage * L::kBTileBytes);
    const float* nrm = reinterpret_cast<const float*>(smem + L::kOffNorm + stage * kTileN * 4);
#pragma unroll 1  // unrolled passes hoist B fragments past the 128-register budget
    for (int pass = 0; pass < kTileN / kColsPerPass; ++pass) {
      constexpr int kNT = kColsPerPass / 8;  // n8 tiles per pass
      // acc[mt][j] covers rows (mt*16 + g, +8) x columns (pass*kColsPerPass + j*8 + 2*t4, +1).
      float acc[2][kNT][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const float lo = row_base[warp * kRowsPerWarp + mt * 16 + g];
        const float hi = row_base[warp * kRowsPerWarp + mt * 16 + g + 8];
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          const float2 nv = *reinterpret_cast<const float2*>(nrm + pass * kColsPerPass + j * 8 + 2 * t4);
          acc[mt][j][0] = nv.x + lo;
          acc[mt][j][1] = nv.y + lo;
          acc[mt][j][2] = nv.x + hi;
          acc[mt][j][3] = nv.y + hi;
        }
      }
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        uint32_t bf[kNT][2];
        const int ch = ks * 2 + (lane / 8) % 2;
        if constexpr (kNT == 1) {
          // ldmatrix x2 reads the addresses of lanes 0-15; lanes 16-31 repeat them.
          ldmatrix_x2(bbase + swizzle<kChunks>(pass * 8 + (lane % 8), ch) * 16, bf[0][0], bf[0][1]);
        } else {
          const int n = pass * kColsPerPass + (lane % 8) + (lane / 16) * 8;
          ldmatrix_x4(bbase + swizzle<kChunks>(n, ch) * 16, bf[0][0], bf[0][1], bf[1][0], bf[1][1]);
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int j = 0; j < kNT; ++j) mma16816<OpT>(acc[mt][j], a[mt][ks], bf[j][0], bf[j][1]);
      }
      const int col0 = tile * kTileN + pass * kColsPerPass + 2 * t4;
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e)
#pragma unroll
          for (int s = 0; s < 4; ++s) {
            const int key = make_key(acc[s / 2][j][(s % 2) * 2 + e], col0 + j * 8 + e, mask);
            k2[s] = min(k2[s], max(k1[s], key));
            k1[s] = min(k1[s], key);
          }
    }
  }

  // ---- the four lanes of a quad hold disjoint columns of the same rows: merge their pairs ---------
#pragma unroll
  for (int s = 0; s < 4; ++s)
#pragma unroll
    for (int o = 1; o <= 2; o *= 2) {
      const int o1 = __shfl_xor_sync(0xffffffffu, k1[s], o), o2 = __shfl_xor_sync(0xffffffffu, k2[s], o);
      k2[s] = min(max(k1[s], o1), min(k2[s], o2));
      k1[s] = min(k1[s], o1);
    }

  // ---- labels, or a place in the warp's re-ranking list --------------------------------------------
  int32_t* labels = p.labels + b * p.l_stride_b + h * p.l_stride_h;
  if (t4 == 0) {
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int row = warp * kRowsPerWarp + (s / 2) * 16 + (s % 2) * 8 + g;
      const int64_t n = n0 + row;
      if (n >= p.N) continue;
      const int c1 = k1[s] & mask, c2 = k2[s] & mask;
      const float v1 = key_value(k1[s], mask), v2 = key_value(k2[s], mask);
      // A row without one finite value (NaN points) keeps label 0, as the CPU's strict comparison does.
      if (!(v1 < INFINITY) || c1 >= p.C) {
        labels[n] = 0;
      } else if (v2 - v1 <= bound_of(row_norm2[row]).half_gap && c2 < p.C) {
        const int at = atomicAdd(&list_count[warp], 1);
        list[at] = make_int4(row, c1, c2, 0);
      } else {
        labels[n] = c1;
      }
    }
  }
  __syncwarp();
  const int count = *reinterpret_cast<volatile int*>(&list_count[warp]);
  if (p.refined != nullptr && lane == 0 && count > 0) atomicAdd(p.refined, static_cast<unsigned long long>(count));

  // ---- exact re-ranking: two rows per pass, 8 lanes per candidate, one CPU partial sum per lane ---
  const float* centroids = p.centroids + bh * p.C * D;
  for (int base = 0; base < count; base += 2) {
    const bool valid = base + lane / 16 < count;
    const int4 item = list[valid ? base + lane / 16 : base];
    const int sub = lane % 16, part = sub % 8;
    const int cand = sub < 8 ? item.y : item.z;
    const float* c = centroids + static_cast<int64_t>(cand) * D;
    float acc = 0.0f;
#pragma unroll 4
    for (int k = 0; k < D / 8; ++k) {
      const int d = k * 8 + part;
      float x;
      if constexpr (std::is_same_v<InT, OpT>) {
        const uint16_t bits =
            *reinterpret_cast<const uint16_t*>(smem + L::kOffA + swizzle<kChunks>(item.x, k) * 16 + part * 2);
        x = unpack<OpT>(bits, 0);
      } else {
        x = to_f32(pts[(n0 + item.x) * p.p_stride[2] + d * p.p_stride[3]]);
      }
      const float diff = __fsub_rn(x, c[d]);
      acc = __fadd_rn(acc, __fmul_rn(diff, diff));
    }
    // ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)), the CPU's combination (addition commutes).
    acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, 1));
    acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, 2));
    acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, 4));
    const float other = __shfl_sync(0xffffffffu, acc, (lane & ~15) + 8);
    if (valid && sub == 0) {
      const bool first = acc < other || (acc == other && item.y < item.z);
      labels[n0 + item.x] = first ? item.y : item.z;
    }
  }
}

template <int D>
void launch(const TensorCoreAssignParams& p, DType points_dtype, int64_t batch_heads, cudaStream_t stream) {
  if (p.N == 0 || batch_heads == 0) return;
  SAPATTN_CHECK(batch_heads <= 65535, UnsupportedError, "k-means on CUDA takes at most 65535 (b,h) pairs");
  dispatch_float(points_dtype, [&](auto tag) {
    using InT = typename decltype(tag)::type;
    using OpT = std::conditional_t<std::is_same_v<InT, __half>, __half, __nv_bfloat16>;
    auto kernel = assign_columns_per_pass() == 8 ? assign_kernel<OpT, D, InT, 8> : assign_kernel<OpT, D, InT, 16>;
    set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), Layout<D>::kBytes);
    const dim3 grid(static_cast<unsigned>(ceil_div(p.N, kBlockRows)), static_cast<unsigned>(batch_heads));
    kernel<<<grid, kThreads, Layout<D>::kBytes, stream>>>(p);
    SAPATTN_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace sapattn::cuda::tc
