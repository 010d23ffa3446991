// The Hopper attention kernel (attention_sm90.cu), what every role shares: the warp roles and their
// registers, the named barriers, the tile shapes and the shared-memory layout (Traits), and the
// range-checked permutation read of the cp.async loads and the epilogue.
//
// The roles, one header each, as in CUTLASS's FMHA examples and FA3: scheduler.cuh (which items a
// CTA works on), load.cuh (the producer warpgroup: TMA or cp.async loads into the stage ring),
// mainloop.cuh (the two consumer warpgroups: Q K^T, online softmax, P V, the split-item merge) and
// epilogue.cuh (normalise, write O and LSE, merge key phases). attention_sm90.cu composes them into
// the kernel and holds the launch.
#pragma once

#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/tensor.hpp>

#include "cuda/attention/attention.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda::attn::sm90 {

using namespace cute;

using Barrier = cutlass::arch::ClusterBarrier;

constexpr int kThreads = 384;      // warpgroup 0 loads, warpgroups 1 and 2 compute
constexpr int kProducerRegs = 56;  // 128 x 56 + 256 x 224 = the 384 x 168 the launch holds
constexpr int kConsumerRegs = 224;
constexpr int kTurnBarrier = 2;   // named barriers 2 and 3: the consumer warpgroups' turns to issue MMAs
constexpr int kMergeBarrier = 4;  // both consumer warpgroups: merging the halves of a split item
constexpr int kBoxHeights = 4;    // TMA: K and V boxes of 16, 32, 64 and 128 rows (one tensor map each)

template <typename Element, int HeadDim>
struct Traits {
  using T = Element;
  static constexpr bool kFp8 = false;  // Fp8Traits below: e4m3 operands, scales, V transposed
  static constexpr bool kSumQuantised = false;
  static constexpr bool kHeadKeyScale = false;
  static constexpr int kFmaExps = 0;
  static constexpr bool kSumByMma = false;
  static constexpr int kHeadDim = HeadDim;
  static constexpr int kVtRows = HeadDim;                 // the P V MMA's N: O's columns
  static constexpr int kBlockM = kTileQ;                  // query rows per item, 64 per consumer warpgroup
  static constexpr int kBlockN = 128;                     // keys per tile
  static constexpr int kStages = kHeadDim == 64 ? 6 : 3;  // as deep as 227 KB of shared memory allows
  static constexpr int kChunksPerRow = kHeadDim / 8;      // 16-byte chunks
  static constexpr int kSlotRows = 16;                    // TMA: rows per slot in the sparse mode
  static constexpr int kSlots = kBlockN / kSlotRows;      // TMA: slots per key tile
  static constexpr int kCountWords = (kSlots + 3) / 4;    // TMA: slot key counts, one byte each
  static constexpr int kColBlocks = kHeadDim / 64;        // TMA: 128-byte-wide boxes per row
  static_assert(kSlotRows * (1 << (kBoxHeights - 1)) == kBlockN, "the tallest box is a whole key tile");

  using SmemAtom = decltype(GMMA::Layout_K_SW128_Atom<T>{});
  using LayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using LayoutK = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  // V^T (head dim x keys x stages) over V's memory: the B operand of P V, MN-major.
  using LayoutVt = decltype(composition(
      LayoutK{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  using MmaQK = decltype(make_tiled_mma(GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kBlockN>, Int<kHeadDim>>>()));
  using MmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<T, T, float, Shape<_64, Int<kHeadDim>, Int<kBlockN>>, GMMA::Major::K, GMMA::Major::MN>()));
  // P as the A operand of P V: the accumulator's register order is (col pair, row half, 8-col
  // group), the A fragment's is (col pair, row half, k half, 16-col block): the same flat order.
  using LayoutP = Layout<Shape<Shape<_2, _2, _2>, _1, Int<kBlockN / 16>>>;

  struct Smem {
    array_aligned<T, cosize_v<LayoutQ>, 1024> q;
    array_aligned<T, cosize_v<LayoutK>, 1024> k;
    array_aligned<T, cosize_v<LayoutK>, 1024> v;
    uint64_t q_full, q_empty;
    uint64_t k_full[kStages], k_empty[kStages], v_full[kStages], v_empty[kStages];
    // TMA loads only: each key tile is kSlots slots of kSlotRows rows; slot_count[stage][j] of slot
    // j's rows are keys (the rest are masked), and item_blocks is the current item's number of key
    // tiles.
    uint32_t slot_count[kStages][kCountWords];  // per slot: how many of its rows are keys
    int32_t item_blocks;
    int32_t item_index;  // dynamic scheduling: the item the producer took (num_items: none left)
    // A split item's merge: warpgroup 1's row maxima and partial sums, per thread (its O goes
    // through the Q buffer, which holds exactly its 128 x kHeadDim / 2 fp32 accumulators).
    float merge_max[2][128], merge_sum[2][128];
  };
  static_assert(sizeof(float) * 128 * (kHeadDim / 2) == sizeof(T) * kBlockM * kHeadDim,
                "a warpgroup's O accumulators fill the Q buffer exactly");
  // A split item's merge: where warpgroup 1's O goes (the Q buffer, free by then).
  __device__ static float* merge_o(Smem& s) { return reinterpret_cast<float*>(s.q.data()); }
};

// The e4m3 kernel (attention_sm90_fp8.cu, docs/fp8.md), head dim 128: Q, K and V as e4m3 codes in
// cluster order with fp32 scales, Q per row (sq_i), K per row (sk_j), V per channel (sv_d); the
// logit is (Q K^T)_ij * sk_j * (sq_i * scale). Both GEMMs are e4m3 wgmma, which takes K-major
// operands only, so P V reads V^T: the codes written transposed, [B*H, D, keys], by the
// quantisation pass. A key tile is kKeyTile / 16 slots of 16 keys as in the bf16 sparse mode,
// every slot its own box for K, V^T and K's scales.
//
// The P V GEMM reads P from registers in the e4m3 A layout, where thread t of a quad holds k
// columns 4t..4t+3 (and 16 + 4t..); the Q K^T accumulator gives it columns 2t, 2t+1, 8+2t, 9+2t. So
// K's rows are loaded permuted within each slot (a 5-D tensor map, attention_sm90_fp8.cu): slot row
// c + 2t + 8h holds key 4t + 2h + c of the slot (c, h in {0, 1}, t in 0..3), so that the accumulator
// columns a thread holds are the keys 4t..4t+3, and P goes to the A operand with no shuffle: only
// its registers are renamed (convert_p_fp8 in mainloop.cuh). V^T stays in key order.
//
// The parameters (measurement builds beside the defaults, attention_sm90_fp8.cu):
// - kQuantisedSum: the softmax denominator sums the quantised P (Fp8Options::p_sum_e4m3), a
//   compile-time choice: as a runtime one the consumers spill.
// - kOneKeyScale: K has one scale per head (Fp8Options' key tile at least the head's keys), folded
//   into the rows' factor: no key scale is loaded or multiplied per score.
// - kFmaExpsPer8: of every 8 column groups of the softmax, how many take their exponentials from the
//   FMA pipe (exp2_fma) instead of MUFU, whose 16 results a clock per SM are exactly the e4m3 tensor
//   rate's need at head dim 128.
// - kKeyTile: keys per tile, 128 or 160 (slots of 16; the stages are as many as shared memory
//   holds: 5 of 128 keys, 4 of 160), which spreads each tile's fixed costs (barriers, the
//   turn, the row statistics' shuffles) over more keys.
// - kRowSumByMma: the softmax denominator comes from the P V MMA: V^T has 8 more rows of ones
//   (written once per launch after every slot's 16 x 128 box), so O's columns 128..135 each hold the
//   row's sum of the quantised P, rescaled and merged with O. No per-score add, at 6% more P V MMA
//   work (N = 136).
template <bool kQuantisedSum, bool kOneKeyScale = false, int kFmaExpsPer8 = 0, int kKeyTile = 128,
          bool kRowSumByMma = false>
struct Fp8Traits {
  using T = cutlass::float_e4m3_t;
  static constexpr bool kFp8 = true;
  static constexpr bool kSumQuantised = kQuantisedSum;
  static constexpr bool kHeadKeyScale = kOneKeyScale;
  static constexpr int kFmaExps = kFmaExpsPer8;
  static constexpr bool kSumByMma = kRowSumByMma;
  static_assert(!(kSumByMma && kQuantisedSum), "one denominator");
  static constexpr int kHeadDim = 128;
  static constexpr int kVtRows = kHeadDim + (kSumByMma ? 8 : 0);  // V^T's rows (the ones last): P V's N
  static constexpr int kBlockM = kTileQ;
  static constexpr int kBlockN = kKeyTile;
  static constexpr int kChunksPerRow = kHeadDim / 16;  // 16-byte chunks of a row
  static constexpr int kSlotRows = 16;
  static constexpr int kSlots = kBlockN / kSlotRows;
  static constexpr int kCountWords = kSlots / 2;  // a slot's keys as rows [lo, hi): 16 bits (load.cuh)
  static constexpr int kScaleSlotFloats = 32;     // a slot's 16 key scales, at 128-byte steps (TMA destinations)
  static_assert(kBlockN % 32 == 0 && kBlockN <= 256, "key tiles of 32-key blocks (P's e4m3 A operand), wgmma's N");
  // Stages: what 227 KB hold besides Q, V's scales, the merge's O and statistics (and 1 KB of
  // barriers, counts and alignment), at most 5.
  static constexpr int kStageBytes = (kHeadDim + kVtRows) * kBlockN + kSlots * kScaleSlotFloats * 4;
  static constexpr int kFixedBytes = kBlockM * kHeadDim + kHeadDim * 4 + 128 * kVtRows / 2 * 4 + 4 * 128 * 4 + 1024;
  static constexpr int kStages = cute::min(5, (227 * 1024 - kFixedBytes) / kStageBytes);
  static_assert(kStages >= 2);

  using SmemAtom = decltype(GMMA::Layout_K_SW128_Atom<T>{});
  using LayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using LayoutK = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  // V^T (kVtRows x keys x stages), K-major without swizzle: a core matrix is 8 channels x 16 keys
  // (128 bytes), channels first, so slot j (keys 16 j ...) is the [channel][16 keys] block at
  // j kVtSlotBytes whose first 2 KB a V^T box of 16 keys x 128 channels fills (the ones rows follow).
  using LayoutVt =
      decltype(tile_to_shape(GMMA::Layout_K_INTER_Atom<T>{}, Shape<Int<kVtRows>, Int<kBlockN>, Int<kStages>>{}));
  static constexpr int kVtSlotBytes = kVtRows * kSlotRows;
  static constexpr int kVtStageBytes = kVtRows * kBlockN;

  using MmaQK = decltype(make_tiled_mma(GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kBlockN>, Int<kHeadDim>>>()));
  using MmaPV = decltype(make_tiled_mma(GMMA::rs_op_selector<T, T, float, Shape<_64, Int<kVtRows>, Int<kBlockN>>>()));
  // P as the A operand of P V: per 32 keys, 4 bytes x 2 row halves x 2 key halves (GMMA's 8-bit A).
  using LayoutP = Layout<Shape<Shape<_4, _2, _2>, _1, Int<kBlockN / 32>>>;

  struct Smem {
    array_aligned<T, cosize_v<LayoutQ>, 1024> q;
    array_aligned<T, cosize_v<LayoutK>, 1024> k;
    array_aligned<T, cosize_v<LayoutVt>, 1024> v;
    alignas(128) float k_scale[kStages][kSlots * kScaleSlotFloats];  // sk_j of the stage's slots
    alignas(128) float v_scale[kHeadDim];                            // sv_d of the item's head
    alignas(16) float merge_o[128 * kVtRows / 2];                    // a split item's merge: warpgroup 1's O
    uint64_t q_full, q_empty;
    uint64_t k_full[kStages], k_empty[kStages], v_full[kStages], v_empty[kStages];
    uint32_t slot_count[kStages][kCountWords];
    int32_t item_blocks;
    int32_t item_index;
    float merge_max[2][128], merge_sum[2][128];
  };
  __device__ static float* merge_o(Smem& s) { return s.merge_o; }
  // Slot `slot` of stage `stage` of V^T: its box's 2 KB, then (kSumByMma) its rows of ones.
  __device__ static T* vt_slot(Smem& s, int stage, int slot) {
    return s.v.data() + stage * kVtStageBytes + slot * kVtSlotBytes;
  }
};

// A permutation entry, range-checked: out-of-range entries raise the value-check flag and read as
// "no row" (-1).
__device__ __forceinline__ int32_t through_perm(const int32_t* perm, int64_t base, int32_t j, int32_t n, int* flag) {
  if (perm == nullptr) return j;
  const int32_t r = perm[base + j];
  if (r < 0 || r >= n) {
    atomicOr(flag, kBadPermIndex);
    return -1;
  }
  return r;
}

}  // namespace sapattn::cuda::attn::sm90
