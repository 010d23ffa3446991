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

#include "cuda/kmeans/assign_common.cuh"
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

template <typename OpT, int D, typename InT, int kColsPerPass>
__global__ void __launch_bounds__(kThreads, 2) assign_kernel(const TensorCoreAssignParams p) {
  using L = Layout<D>;
  constexpr int kChunks = L::kChunks;
  constexpr int kKSteps = L::kKSteps;
  extern __shared__ __align__(128) unsigned char smem[];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  // 32-bit (batch_heads <= 65535, checked at launch): one register each where 64-bit values took two.
  const int bh = static_cast<int>(blockIdx.y), b = bh / static_cast<int>(p.H), h = bh % static_cast<int>(p.H);
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

  // Tile copies: kThreads is a multiple of kChunks, so a thread copies the 16-byte chunk `copy_ch` of
  // rows copy_row + u * kRowStep; kRowStep is a multiple of 8, so all of them share the swizzle of the
  // first and their offsets differ by constants. (Computed per chunk from tid + u * kThreads, the
  // offsets were hoisted into a dozen registers live through the main loop: the kernel spilled.)
  constexpr int kRowStep = kThreads / kChunks;
  static_assert(kThreads % kChunks == 0 && kRowStep % 8 == 0);
  const int copy_ch = tid % kChunks, copy_row = tid / kChunks;

  auto issue_tile = [&](int tile, int stage) {
    const uint32_t dst = smem_addr(smem + L::kOffB + stage * L::kBTileBytes) + swizzle<kChunks>(copy_row, copy_ch) * 16;
    const OpT* src = cent + static_cast<int64_t>(tile) * kTileN * D + copy_row * D + copy_ch * 8;
#pragma unroll
    for (int u = 0; u < kTileN / kRowStep; ++u) cp_async16(dst + u * kRowStep * kChunks * 16, src + u * kRowStep * D);
    if (tid < kTileN / 4)
      cp_async16(smem_addr(smem + L::kOffNorm + stage * kTileN * 4) + tid * 16,
                 half_norm + static_cast<int64_t>(tile) * kTileN + tid * 4);
  };

  // ---- the points tile, in the operand type, swizzled ------------------------------------------
  // A thread fills the chunks of its tile copies (above): one base pointer and one row step.
  constexpr int kAChunksPerThread = kBlockRows / kRowStep;
  const int rows = static_cast<int>(min(p.N - n0, static_cast<int64_t>(kBlockRows)));  // rows that exist
  const int64_t step = kRowStep * p.p_stride[2];
  if (std::is_same_v<InT, OpT> && p.vector_rows) {
    // No conversion: cp.async straight into the swizzled tile, zeros past the last point.
    const InT* src0 = pts + (n0 + copy_row) * p.p_stride[2] + copy_ch * 8;
    const uint32_t dst0 = smem_addr(smem + L::kOffA) + swizzle<kChunks>(copy_row, copy_ch) * 16;
#pragma unroll
    for (int u = 0; u < kAChunksPerThread; ++u) {
      const bool valid = copy_row + u * kRowStep < rows;
      cp_async16_zfill(dst0 + u * kRowStep * kChunks * 16, valid ? src0 + u * step : pts, valid);
    }
    cp_async_commit();
  } else {
    // Converted through registers, 4 chunks in flight per thread.
    const InT* src0 = pts + (n0 + copy_row) * p.p_stride[2] + static_cast<int64_t>(copy_ch) * 8 * p.p_stride[3];
#pragma unroll
    for (int u0 = 0; u0 < kAChunksPerThread; u0 += 4) {
      float f[4][8];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        // (Rows of 16-bit points in vectors took the branch above: only f32 rows come here as vectors.)
        if (copy_row + (u0 + u) * kRowStep < rows) {
          assign::load_chunk(src0 + (u0 + u) * step, p.vector_rows, p.p_stride[3], f[u]);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) f[u][e] = 0.0f;
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int row = copy_row + (u0 + u) * kRowStep;
        *reinterpret_cast<uint4*>(smem + L::kOffA + swizzle<kChunks>(row, copy_ch) * 16) =
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
        const float v = assign::unpack<OpT>(w[e / 2], e % 2);
        s = fmaf(v, v, s);
      }
    }
    row_norm2[row] = s;
    row_base[row] =
        assign::NearTieBound<D>(p.prepared.stats + bh * 2, std::is_same_v<InT, float>, p.index_bits).row_base(s);
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
            assign::keep_two(k1[s], k2[s], assign::make_key(acc[s / 2][j][(s % 2) * 2 + e], col0 + j * 8 + e, mask));
          }
    }
  }

  // ---- the four lanes of a quad hold disjoint columns of the same rows: merge their pairs ---------
#pragma unroll
  for (int s = 0; s < 4; ++s) assign::merge_quad(k1[s], k2[s]);

  // ---- labels, or a place in the warp's re-ranking list --------------------------------------------
  // (b,h) again, opaque so that it is not kept from the start: live through the main loop, it spilled.
  const int head = static_cast<int>(opaque(blockIdx.y)), heads = static_cast<int>(p.H);
  int32_t* labels = p.labels + (head / heads) * p.l_stride_b + (head % heads) * p.l_stride_h;
  const assign::NearTieBound<D> bound(p.prepared.stats + bh * 2, std::is_same_v<InT, float>, p.index_bits);
  if (t4 == 0) {
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int row = warp * kRowsPerWarp + (s / 2) * 16 + (s % 2) * 8 + g;
      const int64_t n = n0 + row;
      if (n >= p.N) continue;
      const int label = assign::settle(k1[s], k2[s], mask, p.C, bound.of(row_norm2[row]).half_gap);
      if (label == assign::kRerank) {
        const int at = atomicAdd(&list_count[warp], 1);
        list[at] = make_int4(row, k1[s] & mask, k2[s] & mask, 0);
      } else {
        labels[n] = label;
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
    auto x_at = [&](int d) {
      if constexpr (std::is_same_v<InT, OpT>) {
        const uint16_t bits =
            *reinterpret_cast<const uint16_t*>(smem + L::kOffA + swizzle<kChunks>(item.x, d / 8) * 16 + (d % 8) * 2);
        return assign::unpack<OpT>(bits, 0);
      } else {
        return to_f32(pts[(n0 + item.x) * p.p_stride[2] + d * p.p_stride[3]]);
      }
    };
    const int label = assign::exact_pick<D>(item.y, item.z, x_at, centroids, lane);
    if (valid && lane % 16 == 0) labels[n0 + item.x] = label;
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
