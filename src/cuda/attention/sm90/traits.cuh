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
  static constexpr int kHeadDim = HeadDim;
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
    uint32_t slot_members[kStages][kCountWords];  // a mixed item's: per slot, the members that keep its keys
    int32_t item_blocks;
    int32_t item_index;  // dynamic scheduling: the item the producer took (num_items: none left)
    // A split item's merge: warpgroup 1's row maxima and partial sums, per thread (its O goes
    // through the Q buffer, which holds exactly its 128 x kHeadDim / 2 fp32 accumulators).
    float merge_max[2][128], merge_sum[2][128];
  };
  static_assert(sizeof(float) * 128 * (kHeadDim / 2) == sizeof(T) * kBlockM * kHeadDim,
                "a warpgroup's O accumulators fill the Q buffer exactly");
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
