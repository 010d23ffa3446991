// The Hopper attention kernel's producer warpgroup: fills the Q buffer and the ring of K/V stages
// that the consumers read, signalled by mbarriers. Two producers; attention_sm90.cu's launcher picks
// one (use_tma).
//
// producer_cp_async, the gather: the rows of a sparse key tile come from several kept key clusters
// (and, with the fused permutation, from anywhere in the sequence), so a tile is a gather; 16-byte
// cp.async per row chunk, completion tied to the stage's "full" mbarrier with
// cp.async.mbarrier.arrive.noinc, as CUTLASS's cp.async GMMA mainloops do. All 128 threads load.
//
// producer_tma: where key rows are not permuted, boxes from tensor maps; in the dense mode a tile is
// one box per 64 columns, in the sparse mode 16-row slots per run of kept clusters, loaded as boxes of
// 16 to 128 rows that the whole producer warp finds at once (box_at). Q comes as boxes too, or, where
// it is read through q_perm (svg2's calls, with K and V laid out in cluster order), as a cp.async
// gather by the same warp. One warp loads.
//
// Both walk the items the scheduler (scheduler.cuh) hands out and keep their own pipeline
// positions: item_count for the Q buffer, tile_count for the K/V stage ring.
#pragma once

#include <cuda.h>  // CUtensorMap

#include <cutlass/arch/barrier.h>
#include <cute/arch/copy_sm80.hpp>
#include <cute/tensor.hpp>

#include "cuda/attention/sm90/scheduler.cuh"
#include "cuda/attention/sm90/traits.cuh"
#include "cuda/runtime/primitives.cuh"

namespace sapattn::cuda::attn::sm90 {

// ---------------------------------------------------------------------------------------------
// The cp.async producer
// ---------------------------------------------------------------------------------------------

// Row ownership in a tile. Each producer thread copies one 16-byte chunk of every kRowsPerPass-th
// row; the 32 rows a warp copies are "owned" one per lane: the owner finds the row's source and
// the copying lanes fetch it with a shuffle (no shared-memory exchange, no barrier).
template <class Tr>
struct TileRows {
  static constexpr int kRowsPerPass = 128 / Tr::kChunksPerRow;
  static constexpr int kRowsPerWarpPass = kRowsPerPass / 4;
  static constexpr int kPasses = Tr::kBlockN / kRowsPerPass;
  static_assert(kRowsPerPass % 8 == 0 && kRowsPerWarpPass * kPasses == 32);
  // The tile row owned by `lane` of `warp`.
  __device__ static int owned(int warp, int lane) {
    return lane % kRowsPerWarpPass + warp * kRowsPerWarpPass + lane / kRowsPerWarpPass * kRowsPerPass;
  }
};

// The source rows of the tile rows this thread copies, fetched from their owners (`src`: the
// owned row's source, -1 for none).
template <class Tr>
struct RowSources {
  int32_t row[TileRows<Tr>::kPasses];
  __device__ RowSources(int32_t src, int thread) {
#pragma unroll
    for (int i = 0; i < TileRows<Tr>::kPasses; ++i)
      row[i] = __shfl_sync(0xffffffff, src, i * TileRows<Tr>::kRowsPerWarpPass + thread % 32 / Tr::kChunksPerRow);
  }
};

// Copies a tile of rows (-1: zero-fill) of a [.., D] tensor into a swizzled shared tile. In the
// 128-byte-swizzled K-major layout a block of 8 rows is one 1 KB atom column, so a thread's rows
// (all with the same row mod 8) sit at a fixed distance from each other: one shared address to
// compute.
template <class Tr, class SmemTensor>
__device__ __forceinline__ void gather_tile(const typename Tr::T* base, int64_t row_stride,
                                            const RowSources<Tr>& sources, SmemTensor tile, int thread) {
  using Rows = TileRows<Tr>;
  const int chunk = thread % Tr::kChunksPerRow, row0 = thread / Tr::kChunksPerRow;
  const uint32_t smem0 = cast_smem_ptr_to_uint(&tile(row0, chunk * 8));
  constexpr uint32_t kPassBytes = Rows::kRowsPerPass * 64 * sizeof(typename Tr::T);  // atoms of 8 x 64
#pragma unroll
  for (int i = 0; i < Rows::kPasses; ++i) {
    const int32_t r = sources.row[i];
    const typename Tr::T* g = base + (r >= 0 ? static_cast<int64_t>(r) * row_stride : 0) + chunk * 8;
    cp_async16_zfill(smem0 + i * kPassBytes, g, r >= 0);
  }
}

template <class Tr>
__device__ void producer_cp_async(const Params& p, typename Tr::Smem& s, int num_items, int q_tiles) {
  using T = typename Tr::T;
  const int thread = threadIdx.x;  // 0..127
  const int own = TileRows<Tr>::owned(thread / 32, thread % 32);
  auto sQ = make_tensor(make_smem_ptr(s.q.data()), typename Tr::LayoutQ{});
  auto sK = make_tensor(make_smem_ptr(s.k.data()), typename Tr::LayoutK{});
  auto sV = make_tensor(make_smem_ptr(s.v.data()), typename Tr::LayoutK{});
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  int tile_count = 0;  // key tiles loaded by this CTA so far: the pipeline position
  ItemScheduler<Tr, true, false> items(p, s, num_items, q_tiles);
  int item_count = 0;  // items loaded so far: the Q buffer's position
  for (; items.valid(); items.advance(), ++item_count) {
    const Item it = items.item();
    const int b = it.bh / p.heads, h = it.bh % p.heads;

    // Q rows of the item.
    Barrier::wait(&s.q_empty, (item_count & 1) ^ 1);
    const int32_t j = own < it.rows ? it.q_begin + own : -1;
    const int32_t q_src = j < 0 ? -1 : through_perm(p.q_perm, int64_t{it.bh} * p.seq_q, j, p.seq_q, p.flag);
    gather_tile<Tr>(q + b * p.q_stride[0] + h * p.q_stride[1], p.q_stride[2], RowSources<Tr>(q_src, thread), sQ,
                    thread);
    cutlass::arch::cpasync_barrier_arrive_noinc(&s.q_full);

    // Key tiles: the owner of tile row r follows virtual key position n * kBlockN + r through the
    // segments (monotonically, so one cursor per thread).
    const int n_blocks = (it.keys + Tr::kBlockN - 1) / Tr::kBlockN;
    int seg = 0;
    const int64_t k_base = b * p.k_stride[0] + h * p.k_stride[1];
    const int64_t v_base = b * p.v_stride[0] + h * p.v_stride[1];
    for (int n = 0; n < n_blocks; ++n, ++tile_count) {
      const int stage = tile_count % Tr::kStages;
      const int phase = (tile_count / Tr::kStages) & 1;
      const int32_t pos = n * Tr::kBlockN + own;
      int32_t src = -1;
      if (pos < it.keys) {
        if (it.segments == nullptr) {
          src = pos;
        } else {
          while (it.segments[seg].cum_end <= pos) ++seg;  // pos < keys = last cum_end: terminates
          src = pos + it.segments[seg].delta;
        }
        src = through_perm(p.k_perm, int64_t{it.bh} * p.seq_k, src, p.seq_k, p.flag);
      }
      // The row sources are shuffled again for V: holding them across K's copies spills.
      Barrier::wait(&s.k_empty[stage], phase ^ 1);
      gather_tile<Tr>(k + k_base, p.k_stride[2], RowSources<Tr>(src, thread), sK(_, _, stage), thread);
      cutlass::arch::cpasync_barrier_arrive_noinc(&s.k_full[stage]);
      Barrier::wait(&s.v_empty[stage], phase ^ 1);
      gather_tile<Tr>(v + v_base, p.v_stride[2], RowSources<Tr>(src, thread), sV(_, _, stage), thread);
      cutlass::arch::cpasync_barrier_arrive_noinc(&s.v_full[stage]);
    }
  }
  cute::cp_async_wait<0>();  // leave no copy in flight behind an exiting thread
}

// ---------------------------------------------------------------------------------------------
// The TMA producer (no permutation to read through: q and k/v rows are in cluster order).
// ---------------------------------------------------------------------------------------------

// The tensor maps of q, k, v as 4-D tensors (D, S, H, B) with 128-byte swizzle: Q boxes are 64 rows
// x 64 columns, K and V boxes kSlotRows << j rows x 64 columns in map j. A kernel parameter: TMA
// reads it from there.
struct TmaMaps {
  CUtensorMap q, k[kBoxHeights], v[kBoxHeights];
};

// The slots of an item's keys: each segment (a run of kept clusters with contiguous rows) of L keys
// takes ceil(L / kRows) slots of kRows rows, the last one partly masked. Every lane of the producer
// warp follows the slots of its own position in the tile with a cursor that only moves forward; it
// counts the slots of the segments it passes, so the plan needs no slot prefix.
//
// kAligned (the e4m3 kernel): slots start at multiples of kRows rows instead, so that a segment from
// row r takes ceil((r mod kRows + L) / kRows) slots, its first slot's rows before r masked too (a TMA
// box must start at a 16-byte multiple of its innermost dimension, which for V^T is the keys).
template <int kRows, bool kAligned = false>
struct LaneSlots {
  const Segment* segments;
  int32_t num_segments;
  int32_t seg = -1, slot_begin = 0, slot_end = 0;  // the current segment and its slots [begin, end)
  int32_t row = 0, len = 0, cum = 0;               // its first key row, its keys, its end in the virtual keys
  int32_t lead = 0;  // kAligned: the rows before the segment's first key in its first slot (row, len include them)
  __device__ explicit LaneSlots(const Item& it) : segments(it.segments), num_segments(it.num_segments) {}
  // Slot `slot`: its first key row, how many of its rows are keys, and its segment (num_segments past
  // the last one, where the slot reads zeros and is masked).
  __device__ void at(int32_t slot, int32_t& slot_row, int32_t& count, int32_t& slot_seg) {
    while (seg < num_segments && slot >= slot_end) {
      if (++seg == num_segments) break;
      const Segment sg = segments[seg];
      len = sg.cum_end - cum;
      row = cum + sg.delta;
      cum = sg.cum_end;
      if constexpr (kAligned) {
        lead = row % kRows;
        row -= lead;
        len += lead;
      }
      slot_begin = slot_end;
      slot_end += (len + kRows - 1) / kRows;
    }
    slot_seg = seg;
    if (seg >= num_segments) {
      slot_row = -kRows;  // a box wholly outside the tensor reads zeros
      count = 0;
      return;
    }
    const int32_t local = (slot - slot_begin) * kRows;
    slot_row = row + local;
    count = min(kRows, len - local);
  }
  // kAligned: the first row of slot `slot` (as `at` gives it) that is a key.
  __device__ int32_t first_key(int32_t slot) const { return slot == slot_begin ? lead : 0; }
};

// Slots of an item: the sum over its segments of ceil(keys / kRows) (kAligned: of ceil((lead +
// keys) / kRows), LaneSlots), summed across the warp.
template <int kRows, bool kAligned = false>
__device__ __forceinline__ int32_t count_slots(const Item& it, int lane) {
  if (it.segments == nullptr) return (it.keys + kRows - 1) / kRows;
  int32_t slots = 0;
  for (int i = lane; i < it.num_segments; i += 32) {
    const int32_t begin = i > 0 ? it.segments[i - 1].cum_end : 0;
    const int32_t lead = kAligned ? (begin + it.segments[i].delta) % kRows : 0;
    slots += (lead + it.segments[i].cum_end - begin + kRows - 1) / kRows;
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) slots += __shfl_xor_sync(0xffffffff, slots, o);
  return slots;
}

// The TMA box that slot j (= lane % kSlots) of a sparse key tile begins, found by the whole warp at
// once. Consecutive slots of one segment form a stretch (every slot but a segment's last is full),
// cut into boxes of 8, 4, 2 and 1 slots, largest first: the slot at offset o of a stretch of L slots
// begins a box iff o is L with some low bits cleared, and that box spans the largest power of two
// <= L - o. Slots past the item's last key are stretches of their own. Lanes j, j + kSlots, ... see
// the same slots (one column block each). Returns whether this lane's slot begins a box, and its
// height as log2(slots).
template <int kSlots>
__device__ __forceinline__ bool box_at(int32_t slot_seg, int32_t num_segments, int lane, int& lg) {
  static_assert(kSlots <= 8 && (kSlots & (kSlots - 1)) == 0);
  const int j = lane % kSlots;
  const int32_t prev_seg = __shfl_up_sync(0xffffffff, slot_seg, 1, kSlots);
  const bool starts = j == 0 || slot_seg != prev_seg || slot_seg >= num_segments;
  const uint32_t group = (__ballot_sync(0xffffffff, starts) >> (lane - j)) & ((1u << kSlots) - 1);
  const int a = 31 - __clz(group & ((2u << j) - 1));  // this stretch's first slot
  const uint32_t later = group & ~((2u << j) - 1);
  const int b = later != 0 ? __ffs(later) - 1 : kSlots;  // the next stretch's first slot
  const int length = b - a, o = j - a;
  lg = 31 - __clz(length - o);
  return o == 0 || ((o & ~length) == 0 && (length ^ o) < (o & -o));
}

// The Q rows of an item read through q_perm by the one TMA producer warp, with cp.async (TMA boxes
// need contiguous rows; K and V still come as boxes). Lane l owns item rows l, l + 32, ... and finds
// their sources (QSources, before the warp waits for the Q buffer); in each pass the warp copies
// 32 / kChunksPerRow rows, one 16-byte chunk per lane, the source fetched from the row's owner by a
// shuffle. Rows past the item's end are zero-filled. Each lane ties its copies to q_full
// (cp.async.mbarrier.arrive.noinc): 32 of the phase's kQGatherArrivals.
constexpr int kQGatherArrivals = 33;  // 32 lanes' copies + lane 0's publication of the item

template <class Tr>
struct QSources {
  static constexpr int kOwned = Tr::kBlockM / 32;
  int32_t row[kOwned];  // the source rows of item rows lane + 32 j, -1 for none
  __device__ __forceinline__ QSources(const Params& p, const Item& it, int lane) {
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kOwned; ++j) {
      const int r = lane + 32 * j;
      row[j] = r < it.rows ? through_perm(p.q_perm, int64_t{it.bh} * p.seq_q, it.q_begin + r, p.seq_q, p.flag) : -1;
    }
  }
};

template <class Tr>
__device__ __forceinline__ void gather_q_warp(const Params& p, const Item& it, const QSources<Tr>& sources,
                                              typename Tr::Smem& s, int lane) {
  using T = typename Tr::T;
  constexpr int kChunks = Tr::kChunksPerRow, kRowsPerPass = 32 / kChunks;
  static_assert(32 % kChunks == 0 && Tr::kBlockM % 32 == 0);
  const int b = it.bh / p.heads, h = it.bh % p.heads;
  const T* base = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  auto sQ = make_tensor(make_smem_ptr(s.q.data()), typename Tr::LayoutQ{});
  const int chunk = lane % kChunks;
  // Not unrolled further: the producer holds kProducerRegs registers.
  CUTLASS_PRAGMA_UNROLL
  for (int j = 0; j < QSources<Tr>::kOwned; ++j) {
#pragma unroll 2
    for (int i = 0; i < 32 / kRowsPerPass; ++i) {
      const int owner = i * kRowsPerPass + lane / kChunks;  // the row's lane; the row is 32 j + owner
      const int32_t src = __shfl_sync(0xffffffff, sources.row[j], owner);
      const T* g = base + (src >= 0 ? static_cast<int64_t>(src) * p.q_stride[2] : 0) + chunk * 8;
      cp_async16_zfill(cast_smem_ptr_to_uint(&sQ(32 * j + owner, chunk * 8)), g, src >= 0);
    }
  }
  cutlass::arch::cpasync_barrier_arrive_noinc(&s.q_full);
}

// One warp loads: one elected lane signs each stage up for its bytes and issues its boxes
// (issue_boxes); in the sparse mode lane j < kSlots finds the box its slot begins (box_at), one per
// column block, for K and then V. In the dense mode a key tile is one kBlockN-row box per column
// block. With Q lane 0 also publishes the item's key tile count and its index (s.item_blocks,
// s.item_index).
// kQGather: Q rows are read through q_perm with cp.async (gather_q_warp), not as boxes.
//
// kPair (CTA pairs, scheduler.cuh): both CTAs of the pair walk the same items and key tiles, so
// their stage rings stay in step; CTA 0 loads each K tile and CTA 1 each V tile, multicast into both
// CTAs' stage (the same offsets), and each CTA's elected lane expects the whole tile's bytes on its own
// barriers, as without pairs. A stage is rewritten only once the consumers of both CTAs have freed
// it: its "empty" barriers count both CTAs' consumer threads (the consumers arrive on the peer's too).
// Each CTA's Q is its own. At the end the producer waits until every stage is free again (both CTAs'
// consumers have arrived on its barriers), so that no arrival reaches a CTA that has exited.
template <class Tr, bool kQGather, bool kPair>
__device__ void producer_tma(const Params& p, const TmaMaps& maps, typename Tr::Smem& s, int num_items, int q_tiles) {
  using T = typename Tr::T;
  constexpr uint32_t kQBytes = Tr::kBlockM * Tr::kChunksPerRow * 16;
  constexpr uint32_t kTileBytes = Tr::kBlockN * Tr::kChunksPerRow * 16;
  constexpr int kAtomElems = 8 * 64;  // one 8 x 64 swizzle atom
  const int lane = threadIdx.x % 32;
  const int slot = lane % Tr::kSlots;
  constexpr uint16_t kBothCtas = 0b11;
  const bool loads_k = !kPair || pair_rank() == 0, loads_v = !kPair || pair_rank() == 1;
  // One elected lane issues a stage's boxes (bit j of `boxes`: slot j begins one), slot j's first
  // row and map shuffled from lane j, a constant lane, so that the compiler knows them warp-uniform
  // and issues straight-line TMA copies; slot j is rows [j kSlotRows, (j + 1) kSlotRows) of the
  // tile, kSlotRows / 8 swizzle atoms, and column block c the atoms c kBlockN / 8 on. (Issued by
  // each lane with its own coordinates, ptxas looped over the issuing lanes, one turn per box: the
  // e4m3 producer spent 42% of its samples there in run 23, docs/fp8.md.)
  const auto issue_boxes = [&](const CUtensorMap* tensor_maps, uint64_t* full, T* stage_base, uint32_t boxes,
                               int32_t row, int map, bool leader, int h, int b) {
#pragma unroll
    for (int j = 0; j < Tr::kSlots; ++j) {
      const int32_t r = __shfl_sync(0xffffffffu, row, j);
      const int m = __shfl_sync(0xffffffffu, map, j);
      if (!leader || !(boxes >> j & 1u)) continue;
#pragma unroll
      for (int c = 0; c < Tr::kColBlocks; ++c) {
        T* dst = stage_base + (j * (Tr::kSlotRows / 8) + c * (Tr::kBlockN / 8)) * kAtomElems;
        if constexpr (kPair) {
          tma_load_4d_multicast(&tensor_maps[m], full, dst, kBothCtas, c * 64, r, h, b);
        } else {
          tma_load_4d(&tensor_maps[m], full, dst, c * 64, r, h, b);
        }
      }
    }
  };
  int tile_count = 0;  // key tiles loaded by this CTA so far: the pipeline position
  ItemScheduler<Tr, true> items(p, s, num_items, q_tiles);
  int item_count = 0;  // items loaded so far: the Q buffer's position
  for (; items.valid(); items.advance(), ++item_count) {
    const int index = items.index();
    const Item it = items.item();
    const int b = it.bh / p.heads, h = it.bh % p.heads;
    const int n_blocks = (count_slots<Tr::kSlotRows>(it, lane) + Tr::kSlots - 1) / Tr::kSlots;
    LaneSlots<Tr::kSlotRows> slots(it);

    // Q: 64-row boxes, or rows gathered through q_perm (rows past the item's end are computed and
    // never stored).
    if constexpr (kQGather) {
      const QSources<Tr> sources(p, it, lane);
      Barrier::wait(&s.q_empty, (item_count & 1) ^ 1);
      gather_q_warp<Tr>(p, it, sources, s, lane);
      if (lane == 0) {
        s.item_blocks = n_blocks;
        s.item_index = index;
        Barrier::arrive(&s.q_full);  // releases the two fields to the consumers' wait
      }
    } else {
      Barrier::wait(&s.q_empty, (item_count & 1) ^ 1);
      if (lane == 0) {
        s.item_blocks = n_blocks;
        s.item_index = index;  // the dynamic scheduler's hand-off (ItemScheduler)
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&s.q_full, kQBytes);
#pragma unroll
        for (int cb = 0; cb < Tr::kColBlocks; ++cb) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            T* dst = s.q.data() + (half * 8 + cb * (Tr::kBlockM / 8)) * kAtomElems;
            tma_load_4d(&maps.q, &s.q_full, dst, cb * 64, it.q_begin + 64 * half, h, b);
          }
        }
      }
      __syncwarp();
    }

    for (int n = 0; n < n_blocks; ++n, ++tile_count) {
      const int stage = tile_count % Tr::kStages;
      const int phase = (tile_count / Tr::kStages) & 1;
      // Lane j < kSlots finds the box that slot j begins, if any (bit j of `boxes`): its first row
      // and its map (height). Dense: one whole-tile box at slot 0.
      int map = kBoxHeights - 1;
      int32_t row = n * Tr::kBlockN;
      uint32_t boxes = 1;
      uint32_t counts[Tr::kCountWords] = {};
      if (!p.dense) {
        int32_t count, seg;
        slots.at(n * Tr::kSlots + slot, row, count, seg);
        const bool starts = box_at<Tr::kSlots>(seg, it.num_segments, lane, map);
        boxes = __ballot_sync(0xffffffff, starts) & ((1u << Tr::kSlots) - 1);
        // Slot j's count goes to byte j % 4 of word j / 4 (lanes 0..kSlots-1 hold every slot).
#pragma unroll
        for (int w = 0; w < Tr::kCountWords; ++w) {
          const bool mine = lane < Tr::kSlots && slot / 4 == w;
          counts[w] = __reduce_or_sync(0xffffffff, mine ? static_cast<uint32_t>(count) << (8 * (slot % 4)) : 0u);
        }
      }
      const bool leader = cute::elect_one_sync();
      const int stage_elems = stage * Tr::kBlockN * Tr::kChunksPerRow * 8;
      Barrier::wait(&s.k_empty[stage], phase ^ 1);
      if (leader) {
        if (!p.dense) {
#pragma unroll
          for (int w = 0; w < Tr::kCountWords; ++w) s.slot_count[stage][w] = counts[w];
        }
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&s.k_full[stage], kTileBytes);
      }
      if (loads_k) issue_boxes(maps.k, &s.k_full[stage], s.k.data() + stage_elems, boxes, row, map, leader, h, b);
      Barrier::wait(&s.v_empty[stage], phase ^ 1);
      if (leader) cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&s.v_full[stage], kTileBytes);
      if (loads_v) issue_boxes(maps.v, &s.v_full[stage], s.v.data() + stage_elems, boxes, row, map, leader, h, b);
    }
  }
  items.finish(item_count, kQGather ? kQGatherArrivals : 1);
  if constexpr (kPair) {
    for (int i = 0; i < Tr::kStages; ++i, ++tile_count) {
      const int stage = tile_count % Tr::kStages;
      const int phase = (tile_count / Tr::kStages) & 1;
      Barrier::wait(&s.k_empty[stage], phase ^ 1);
      Barrier::wait(&s.v_empty[stage], phase ^ 1);
    }
  }
  if constexpr (kQGather) cute::cp_async_wait<0>();  // leave no copy in flight behind an exiting lane
}

}  // namespace sapattn::cuda::attn::sm90

namespace sapattn::cuda::attn::sm90 {

// ---------------------------------------------------------------------------------------------
// The e4m3 kernel's TMA producer (Fp8Traits, attention_sm90_fp8.cu)
// ---------------------------------------------------------------------------------------------

// The e4m3 operands as tensor maps (attention_sm90_fp8.cu encodes them): q codes (128 bytes, rows,
// heads) with 64-row boxes; k codes as 5-D (128 bytes, c, t, h, row of all heads) whose 16-row box
// lands slot row c + 2t + 8h from key 4t + 2h + c (Fp8Traits); v^T codes (keys, channels, heads)
// with boxes of 16 keys x 128 channels; k scales (keys, heads) with boxes of 16. A box starts at a
// 16-byte multiple of its innermost dimension (else the copy is an illegal instruction), so the
// slots are aligned to 16 keys (LaneSlots' kAligned) and the query scales, whose items start
// anywhere, are read by the consumers instead.
struct Fp8Maps {
  CUtensorMap q, k, vt, k_scale;
};

// One warp, as producer_tma, every slot of a key tile its own box for K, V^T and K's scales: the
// permuted K rows leave no room for boxes over runs. Lane j < kSlots finds slot j; one elected lane
// issues every box, slot j's coordinate broadcast from lane j by a shuffle from a constant lane,
// which the compiler knows to be warp-uniform: straight-line TMA issues. (Issued by lane j each,
// with a per-lane coordinate, ptxas looped over the lanes and each turn waited on the previous
// box's operands: 42% of the producer warp's samples in run 23, while the consumers waited for K
// tiles a sixth of their time.) Slot j's keys
// are its rows [lo, hi), published as hi | lo << 8 in the 16 bits 16 (j % 2) of slot_count word
// j / 2. With Q comes the head's V scales. The key scales arrive on the V stage's barrier: the
// consumers read them after freeing the K stage. A dense item's slots are the tile's 16-row steps.
template <class Tr>
__device__ void producer_tma_fp8(const Params& p, const Fp8Params& f, const Fp8Maps& maps, typename Tr::Smem& s,
                                 int num_items, int q_tiles) {
  using T = typename Tr::T;
  constexpr uint32_t kQBytes = Tr::kBlockM * Tr::kHeadDim + Tr::kHeadDim * sizeof(float);
  constexpr uint32_t kTileBytes = Tr::kBlockN * Tr::kHeadDim;
  constexpr uint32_t kScaleBytes = Tr::kHeadKeyScale ? 0 : Tr::kBlockN * sizeof(float);
  constexpr int kSlotBytes = Tr::kSlotRows * Tr::kHeadDim;
  const int lane = threadIdx.x % 32;
  const int slot = lane % Tr::kSlots;
  int tile_count = 0;
  ItemScheduler<Tr, true> items(p, s, num_items, q_tiles);
  int item_count = 0;
  for (; items.valid(); items.advance(), ++item_count) {
    const int index = items.index();
    const Item it = items.item();
    const int n_blocks = (count_slots<Tr::kSlotRows, true>(it, lane) + Tr::kSlots - 1) / Tr::kSlots;
    LaneSlots<Tr::kSlotRows, true> slots(it);

    Barrier::wait(&s.q_empty, (item_count & 1) ^ 1);
    if (lane == 0) {
      s.item_blocks = n_blocks;
      s.item_index = index;
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&s.q_full, kQBytes);
    }
    __syncwarp();
    if (lane < 2) {
      tma_load_3d(&maps.q, &s.q_full, s.q.data() + lane * 64 * Tr::kHeadDim, 0, it.q_begin + 64 * lane, it.bh);
    } else if (lane == 2) {
      bulk_load(s.v_scale, f.v_scale + static_cast<int64_t>(it.bh) * Tr::kHeadDim, Tr::kHeadDim * sizeof(float),
                &s.q_full);
    }

    for (int n = 0; n < n_blocks; ++n, ++tile_count) {
      const int stage = tile_count % Tr::kStages;
      const int phase = (tile_count / Tr::kStages) & 1;
      int32_t row, count, seg, lo = 0;
      if (p.dense) {
        row = n * Tr::kBlockN + slot * Tr::kSlotRows;
        count = min(Tr::kSlotRows, it.keys - row);
        if (count <= 0) {
          count = 0;
          row = -Tr::kSlotRows;  // wholly outside every map: zeros
        }
      } else {
        slots.at(n * Tr::kSlots + slot, row, count, seg);
        lo = slots.first_key(n * Tr::kSlots + slot);
      }
      const uint32_t keys = static_cast<uint32_t>(count) | static_cast<uint32_t>(lo) << 8;
      uint32_t counts[Tr::kCountWords];
#pragma unroll
      for (int w = 0; w < Tr::kCountWords; ++w) {
        const bool mine = lane < Tr::kSlots && slot / 2 == w;
        counts[w] = __reduce_or_sync(0xffffffff, mine ? keys << (16 * (slot % 2)) : 0u);
      }
      // A key row of this head as a row of all heads' K (rows before the head's first belong to the
      // previous head and are masked; row -16 of head 0 is outside the map: zeros).
      const int32_t k_row = row + it.bh * p.seq_k;
      // V^T's slot of key `row` (a multiple of 16): 16 rows of 128 bytes (attention_sm90_fp8.cu);
      // no keys (row < 0): a box outside the map, zeros.
      constexpr int kVtBoxRows = Tr::kSlotRows * Tr::kHeadDim / 128;
      const int32_t vt_row =
          row < 0 ? -kVtBoxRows : (it.bh * (f.v_keys / Tr::kSlotRows) + row / Tr::kSlotRows) * kVtBoxRows;
      const bool leader = cute::elect_one_sync();
      T* k_tile = s.k.data() + stage * Tr::kBlockN * Tr::kHeadDim;
      Barrier::wait(&s.k_empty[stage], phase ^ 1);
      if (leader) {
#pragma unroll
        for (int w = 0; w < Tr::kCountWords; ++w) s.slot_count[stage][w] = counts[w];
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&s.k_full[stage], kTileBytes);
      }
#pragma unroll
      for (int j = 0; j < Tr::kSlots; ++j) {
        const int32_t r = __shfl_sync(0xffffffffu, k_row, j);
        if (leader) tma_load_5d(&maps.k, &s.k_full[stage], k_tile + j * kSlotBytes, 0, 0, 0, 0, r);
      }
      Barrier::wait(&s.v_empty[stage], phase ^ 1);
      if (leader)
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&s.v_full[stage], kTileBytes + kScaleBytes);
#pragma unroll
      for (int j = 0; j < Tr::kSlots; ++j) {
        const int32_t r = __shfl_sync(0xffffffffu, vt_row, j);
        if (leader) tma_load_2d(&maps.vt, &s.v_full[stage], Tr::vt_slot(s, stage, j), 0, r);
        if constexpr (!Tr::kHeadKeyScale) {
          const int32_t key = __shfl_sync(0xffffffffu, row, j);
          if (leader)
            tma_load_2d(&maps.k_scale, &s.v_full[stage], &s.k_scale[stage][j * Tr::kScaleSlotFloats], key, it.bh);
        }
      }
    }
  }
  items.finish(item_count, 1);
}

}  // namespace sapattn::cuda::attn::sm90
