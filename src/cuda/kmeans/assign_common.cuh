// What every tensor-core k-means assignment shares (the mma.sync kernel of kmeans_assign.cuh and the
// wgmma kernel of assign_sm90.cuh), so that both have one output contract: the keys that carry a
// column in the low mantissa bits of an approximate half distance, the two best keys per row, the
// near-tie bound E and margin M of docs/cuda.md, the decision a row's two best keys make, and the
// exact re-ranking of a near tie (the CPU reference's fp32 arithmetic).
#pragma once

#include <cstdint>

#include "cuda/runtime/device.cuh"

namespace sapattn::cuda::assign {

// One element of an operand register pair (`hi`: the upper half) as fp32.
template <typename OpT>
__device__ __forceinline__ float unpack(uint32_t w, int hi) {
  const uint16_t bits = static_cast<uint16_t>(hi ? (w >> 16) : (w & 0xffffu));
  if constexpr (std::is_same_v<OpT, __nv_bfloat16>) {
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  } else {
    return __half2float(__ushort_as_half(bits));
  }
}

// Eight elements of a point row, from `src` on, as fp32. vector: unit stride and 16-byte aligned
// chunks (one 16-byte load of a 16-bit type, two of f32); else element by element, `step` apart.
template <typename InT>
__device__ __forceinline__ void load_chunk(const InT* src, bool vector, int64_t step, float (&f)[8]) {
  if (!vector) {
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = to_f32(src[e * step]);
  } else if constexpr (std::is_same_v<InT, float>) {
    const float4 lo = reinterpret_cast<const float4*>(src)[0], hi = reinterpret_cast<const float4*>(src)[1];
    f[0] = lo.x, f[1] = lo.y, f[2] = lo.z, f[3] = lo.w;
    f[4] = hi.x, f[5] = hi.y, f[6] = hi.z, f[7] = hi.w;
  } else {
    const uint4 c = *reinterpret_cast<const uint4*>(src);
    const uint32_t w[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = unpack<InT>(w[e / 2], e % 2);
  }
}

// Keys: the bits of a positive float whose low `bits` mantissa bits are replaced by the column.
// Integer order of keys = float order (truncated to 23 - bits mantissa bits), then column order.
__device__ __forceinline__ int make_key(float v, int col, int mask) { return (__float_as_int(v) & ~mask) | col; }
__device__ __forceinline__ float key_value(int key, int mask) { return __int_as_float(key & ~mask); }

// (k1, k2), k1 <= k2, the two smallest keys so far, takes `key`: three integer min/max.
__device__ __forceinline__ void keep_two(int& k1, int& k2, int key) {
  k2 = min(k2, max(k1, key));
  k1 = min(k1, key);
}
// (k1, k2) becomes the two smallest of itself and (o1, o2), o1 <= o2.
__device__ __forceinline__ void merge_two(int& k1, int& k2, int o1, int o2) {
  k2 = min(max(k1, o1), min(k2, o2));
  k1 = min(k1, o1);
}
// The four lanes of a quad hold disjoint columns of the same rows: afterwards each holds the quad's pair.
__device__ __forceinline__ void merge_quad(int& k1, int& k2) {
#pragma unroll
  for (int o = 1; o <= 2; o *= 2)
    merge_two(k1, k2, __shfl_xor_sync(0xffffffffu, k1, o), __shfl_xor_sync(0xffffffffu, k2, o));
}

// The near-tie bound E of a row (docs/cuda.md), in full-distance units: the rounding of the centroids
// (and of f32 points) to the operand type, fp32 accumulation in the matrix unit and of the norms, and
// the CPU reference's own fp32 rounding. Half distances are compared, so two candidates are re-ranked
// when their half distances are within E/2 (plus the key truncation) of each other. A row's
// accumulators start at ||x||^2/2 + M, where the margin M keeps them positive:
// ||x - c~||^2/2 + (||c||^2 - ||c~||^2)/2 >= -||c|| ||c - c~||.
template <int D>
class NearTieBound {
 public:
  struct Row {
    float margin, half_gap;
  };
  // stats: the (b,h)'s [2] fp32 bits of max ||c||^2 and max ||c - round(c)|| (prepare_centroids);
  // f32_points: the points are rounded to bf16 too; index_bits: the key's column bits.
  __device__ NearTieBound(const int32_t* stats, bool f32_points, int index_bits)
      : nc_(sqrtf(reinterpret_cast<const float*>(stats)[0])),
        max_resid_(reinterpret_cast<const float*>(stats)[1]),
        ux_(f32_points ? 0x1p-8f : 0.0f),
        index_bits_(index_bits) {}

  // x2: the row's squared norm in the operand type.
  __device__ __forceinline__ Row of(float x2) const {
    const float nx = sqrtf(x2);
    const float span = (nx + nc_) * (nx + nc_);
    const float accumulate = (D + 4) * 0x1p-23f * span;
    const float full = 2.0f * nx * max_resid_ + 2.0f * ux_ * nx * nc_ + accumulate + (D + 4) * 0x1p-24f * span;
    const float margin = 1.01f * nc_ * max_resid_ + accumulate;
    // Keys keep 23 - index bits of mantissa: truncation error <= value * 2^(bits - 23) per key.
    const float quant = ldexpf(0.5f * span + margin, index_bits_ - 23);
    return Row{margin, (0.5f * full + 2.0f * quant) * 1.0625f};
  }
  // A row's accumulator start besides the column's ||c||^2 / 2: ||x||^2/2 + M.
  __device__ __forceinline__ float row_base(float x2) const { return 0.5f * x2 + of(x2).margin; }

 private:
  float nc_, max_resid_, ux_;
  int index_bits_;
};

// Marks a row whose two best candidates must be re-ranked exactly.
inline constexpr int kRerank = -1;

// What a row's two best keys decide: its label, or kRerank (the two best half distances are within
// half_gap: c1 and c2 are compared exactly). A row without one finite value (NaN points) gets label 0,
// as the CPU's strict comparison gives.
__device__ __forceinline__ int settle(int k1, int k2, int mask, int64_t clusters, float half_gap) {
  const int c1 = k1 & mask, c2 = k2 & mask;
  const float v1 = key_value(k1, mask), v2 = key_value(k2, mask);
  if (!(v1 < INFINITY) || c1 >= clusters) return 0;
  if (v2 - v1 <= half_gap && c2 < clusters) return kRerank;
  return c1;
}

// The exact re-ranking of one near tie per half warp (lanes 0-15 and 16-31 take a row each; every lane
// of the warp calls it): the candidates' distances the CPU reference's way (fp32 sums of squared
// differences over d mod 8, combined as ((0+1)+(2+3))+((4+5)+(6+7)), no FMA), 8 lanes per candidate,
// one partial sum per lane; the smaller wins, ties to the lower index. x_at(d): element d of this half's
// point as fp32. The winner is valid in lane 0 of each half.
template <int D, typename XAt>
__device__ __forceinline__ int exact_pick(int c1, int c2, XAt x_at, const float* centroids, int lane) {
  const int sub = lane % 16, part = sub % 8;
  const float* c = centroids + static_cast<int64_t>(sub < 8 ? c1 : c2) * D;
  float acc = 0.0f;
#pragma unroll 4
  for (int k = 0; k < D / 8; ++k) {
    const int d = k * 8 + part;
    const float diff = __fsub_rn(x_at(d), c[d]);
    acc = __fadd_rn(acc, __fmul_rn(diff, diff));
  }
  // The CPU's combination (addition commutes).
  acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, 1));
  acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, 2));
  acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, 4));
  const float other = __shfl_sync(0xffffffffu, acc, (lane & ~15) + 8);
  return acc < other || (acc == other && c1 < c2) ? c1 : c2;
}

}  // namespace sapattn::cuda::assign
