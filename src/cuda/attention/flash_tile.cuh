// The FlashAttention-2 tile steps of the mma.sync kernels (sm_80+), shared by the sm80 attention
// kernel (attention_sm80.cu) and the tensor-core EAR compensation (ear/ear_compensation_tc.cu):
// the ldmatrix lane addresses into swizzled row-major tiles, S = Q K^T, the online-softmax update
// and O += P V over one key tile.
//
// Shapes, per warp: kMTiles m16 tiles of query rows; a key tile of kTileK keys (kNTiles = kTileK / 8
// n8 tiles of S); head dim D (kDTiles = D / 8 n8 tiles of O). Tiles in shared memory are row-major,
// D * 2 bytes a row, 16-byte chunks XOR-swizzled with the row (swizzle<D / 8>, primitives.cuh), so
// the eight 16-byte rows of every ldmatrix phase fall in distinct banks; D / 8 must be a multiple
// of 8 (D = 64 or 128).
//
// Fragments follow mma.m16n8k16: s[mt][j] and o[mt][j] are C fragments, lane (g = lane / 4,
// t4 = lane % 4) holding rows (mt * 16 + g, + 8) x columns (j * 8 + 2 * t4, + 1); row_max, row_sum,
// base and rescale are indexed 2 * mt + half for those two rows.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/runtime/primitives.cuh"

namespace sapattn::cuda::flash {

// Byte offsets, relative to a tile's base, of the rows whose addresses this lane gives ldmatrix, at
// chunk pair 0 and swizzled: q for the A fragments of the warp's rows from q_row0 (a multiple of 8),
// k for the B fragments of S (16 keys x 16 dims per ldmatrix_x4), v for the transposed B fragments
// of P V (16 keys x 16 dims). Every such row is lane % 8 mod 8 and its chunk is 2 c + (0 or 1), so
// chunk pair c is at offset ^ (32 c): one LOP3 per ldmatrix, the row steps being immediates.
struct LaneOffsets {
  uint32_t q, k, v;
};

template <int D>
__device__ __forceinline__ LaneOffsets lane_offsets(int lane, int q_row0) {
  constexpr int kRowBytes = D * 2;
  const int x7 = lane & 7;
  return {static_cast<uint32_t>((q_row0 + lane % 16) * kRowBytes + ((lane / 16) ^ x7) * 16),
          static_cast<uint32_t>(((lane / 16) * 8 + x7) * kRowBytes + (((lane / 8) % 2) ^ x7) * 16),
          static_cast<uint32_t>((lane % 16) * kRowBytes + ((lane / 16) ^ x7) * 16)};
}

// The rows' state before the first key tile: O = 0, no maximum yet, an empty sum.
template <int kMTiles, int kDTiles>
__device__ __forceinline__ void start_rows(float (&o)[kMTiles][kDTiles][4], float (&row_max)[2 * kMTiles],
                                           float (&row_sum)[2 * kMTiles]) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int j = 0; j < kDTiles; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.0f;
    row_max[2 * mt] = row_max[2 * mt + 1] = -INFINITY;
    row_sum[2 * mt] = row_sum[2 * mt + 1] = 0.0f;
  }
}

// s += Q K^T for the warp's rows against the key tile (fp32 accumulation). The caller sets s's
// starting value: 0 for plain scores, or a per-key term that the accumulators carry for free.
template <typename T, int kMTiles, int kNTiles, int D>
__device__ __forceinline__ void qk_tile(float (&s)[kMTiles][kNTiles][4], uint32_t q_tile, uint32_t q_at,
                                        uint32_t k_tile, uint32_t k_at) {
  constexpr int kRowBytes = D * 2;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) ldmatrix_x4(q_tile + (q_at ^ (ks * 32)) + mt * 16 * kRowBytes, a[mt]);
#pragma unroll
    for (int jp = 0; jp < kNTiles / 2; ++jp) {
      // Matrices: keys jp*16 + 0..7 at dims ks*16 + 0..7 and + 8..15, then keys + 8..15 likewise.
      uint32_t kb[4];
      ldmatrix_x4(k_tile + (k_at ^ (ks * 32)) + jp * 16 * kRowBytes, kb);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        mma16816<T>(s[mt][2 * jp], a[mt], kb[0], kb[1]);
        mma16816<T>(s[mt][2 * jp + 1], a[mt], kb[2], kb[3]);
      }
    }
  }
}

// The online-softmax update for one tile of scores s (masked keys at -inf), in the log2 domain:
// per row the new maximum of s * scale_log2 (row_max), the exponent base the tile's weights are
// taken relative to, and the factor rescale that the row's earlier weights are multiplied by;
// row_sum is rescaled here, O by rescale_o.
template <int kMTiles, int kNTiles>
__device__ __forceinline__ void softmax_step(const float (&s)[kMTiles][kNTiles][4], float scale_log2,
                                             float (&row_max)[2 * kMTiles], float (&row_sum)[2 * kMTiles],
                                             float (&base)[2 * kMTiles], float (&rescale)[2 * kMTiles]) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = 2 * mt + half;
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) mx = fmaxf(mx, fmaxf(s[mt][j][2 * half], s[mt][j][2 * half + 1]));
      // The four lanes of a quad hold the row's other columns.
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      mx = fmaxf(row_max[i], mx * scale_log2);
      // Only non-finite inputs leave a row at -inf after a tile with a valid key; subtracting 0 then
      // keeps exp2 away from -inf - (-inf) = NaN.
      base[i] = mx == -INFINITY ? 0.0f : mx;
      rescale[i] = fast_exp2(row_max[i] - base[i]);
      row_max[i] = mx;
      row_sum[i] *= rescale[i];
    }
}

// O *= rescale per row. Row maxima settle as keys go by; a warp whose rows all kept theirs skips
// the multiplications.
template <int kMTiles, int kDTiles>
__device__ __forceinline__ void rescale_o(float (&o)[kMTiles][kDTiles][4], const float (&rescale)[2 * kMTiles]) {
  bool changed = false;
#pragma unroll
  for (int i = 0; i < 2 * kMTiles; ++i) changed |= rescale[i] != 1.0f;
  if (__any_sync(0xffffffffu, changed)) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int j = 0; j < kDTiles; ++j) {
        o[mt][j][0] *= rescale[2 * mt];
        o[mt][j][1] *= rescale[2 * mt];
        o[mt][j][2] *= rescale[2 * mt + 1];
        o[mt][j][3] *= rescale[2 * mt + 1];
      }
  }
}

// O += P V over the key tile, 16 keys at a time, with P = exp2(s * scale_log2 - base) per row.
// The C fragments of S over 16 keys, as weights rounded to T, are the A fragment of P: register q
// holds n8 tile 2 kk + q / 2, row half q % 2. Making them just in time keeps S and P from being
// live at once. row_sum adds the unrounded fp32 weights (this lane's columns), so the LSE is as
// exact as fp32 allows and O differs from the exact weighted sum by the rounding of P only.
template <typename T, int kMTiles, int kNTiles, int kDTiles>
__device__ __forceinline__ void pv_tile(float (&o)[kMTiles][kDTiles][4], const float (&s)[kMTiles][kNTiles][4],
                                        float scale_log2, const float (&base)[2 * kMTiles],
                                        float (&row_sum)[2 * kMTiles], uint32_t v_tile, uint32_t v_at) {
  constexpr int kRowBytes = kDTiles * 8 * 2;
#pragma unroll
  for (int kk = 0; kk < kNTiles / 2; ++kk) {
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int i = 2 * mt + q % 2;
        const float* sv = s[mt][2 * kk + q / 2] + 2 * (q % 2);
        const float p0 = fast_exp2(fmaf(sv[0], scale_log2, -base[i]));
        const float p1 = fast_exp2(fmaf(sv[1], scale_log2, -base[i]));
        row_sum[i] += p0 + p1;
        a[mt][q] = pack2<T>(p0, p1);
      }
#pragma unroll
    for (int jp = 0; jp < kDTiles / 2; ++jp) {
      // Transposed matrices: keys kk*16 + 0..7 and + 8..15 at dims jp*16 + 0..7, then dims + 8..15.
      uint32_t vb[4];
      ldmatrix_x4_trans(v_tile + (v_at ^ (jp * 32)) + kk * 16 * kRowBytes, vb);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        mma16816<T>(o[mt][2 * jp], a[mt], vb[0], vb[1]);
        mma16816<T>(o[mt][2 * jp + 1], a[mt], vb[2], vb[3]);
      }
    }
  }
}

}  // namespace sapattn::cuda::flash
