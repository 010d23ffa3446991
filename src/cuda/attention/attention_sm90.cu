// The Hopper (sm_90a) variable-block attention kernel: warpgroup MMA (wgmma) with accumulators in
// registers, a producer warpgroup filling a multi-stage shared-memory pipeline signalled by
// mbarriers, and two consumer warpgroups that each own 64 query rows of a 128-row work item. One
// persistent CTA per SM strides over the plan's items (by head, heaviest first).
//
// Two producers (use_tma chooses). The cp.async gather: the rows of a sparse key tile come from
// several kept key clusters (and, with the fused permutation, from anywhere in the sequence), so a
// tile is a gather; 16-byte cp.async per row chunk, completion tied to the stage's "full" mbarrier
// with cp.async.mbarrier.arrive.noinc, as CUTLASS's cp.async GMMA mainloops do. TMA: where rows are
// not permuted, boxes from tensor maps; in the dense mode a tile is one box per 64 columns, in the
// sparse mode 16-row slots per run of kept clusters, loaded as boxes of 16 to 128 rows that the
// whole producer warp finds at once (box_at). TMA is the faster of the two in both modes
// (docs/attention.md), so it runs wherever rows are unpermuted.
//
// Per key tile a consumer warpgroup computes S = Q K^T (SS wgmma, both operands in swizzled shared
// memory), the online softmax in fp32 on the accumulator fragment, converts P to 16 bits in
// registers and accumulates O += P V (RS wgmma, V read through a transposed view of its tile).
// Query rows of a work item beyond its end are zero-filled and never stored; a warpgroup whose 64
// rows are all beyond the end skips its MMAs but keeps the barrier protocol.
#include <cuda.h>  // CUtensorMap and its encoder's types (the encoder is reached through the runtime)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/tensor.hpp>

#include "cuda/attention/attention.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda::attn {

namespace {

using namespace cute;

using Barrier = cutlass::arch::ClusterBarrier;

constexpr int kThreads = 384;      // warpgroup 0 loads, warpgroups 1 and 2 compute
constexpr int kProducerRegs = 56;  // 128 x 56 + 256 x 224 = the 384 x 168 the launch holds
constexpr int kConsumerRegs = 224;
constexpr int kTurnBarrier = 2;  // named barriers 2 and 3: the consumer warpgroups' turns to issue MMAs
constexpr int kMergeBarrier = 4;  // both consumer warpgroups: merging the halves of a split item
constexpr int kBoxHeights = 4;   // TMA: K and V boxes of 16, 32, 64 and 128 rows (one tensor map each)

template <typename Element, int kHeadDim>
struct Traits {
  using T = Element;
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
    int32_t item_blocks;
    int32_t item_index;  // dynamic scheduling: the item the producer took (num_items: none left)
    // A split item's merge: warpgroup 1's row maxima and partial sums, per thread (its O goes
    // through the Q buffer, which holds exactly its 128 x kHeadDim / 2 fp32 accumulators).
    float merge_max[2][128], merge_sum[2][128];
  };
  static_assert(sizeof(float) * 128 * (kHeadDim / 2) == sizeof(T) * kBlockM * kHeadDim,
                "a warpgroup's O accumulators fill the Q buffer exactly");
};

// What one work item is, for producer and consumers alike.
struct Item {
  int32_t bh, q_begin, rows;
  const Segment* segments;  // nullptr in dense mode
  int32_t num_segments;
  int32_t keys;  // length of the virtual key sequence
};

__device__ __forceinline__ Item load_item(const Params& p, int index, int q_tiles) {
  Item it;
  if (p.dense) {
    it.bh = index / q_tiles;
    it.q_begin = (index % q_tiles) * kTileQ;
    it.rows = min(kTileQ, p.seq_q - it.q_begin);
    it.segments = nullptr;
    it.num_segments = 1;
    it.keys = p.seq_k;
    return it;
  }
  const WorkItem w = p.plan.items[index];
  const int64_t row = static_cast<int64_t>(w.bh) * p.plan.q_clusters + w.q_cluster;
  it.bh = w.bh;
  it.q_begin = w.q_begin;
  it.rows = w.q_end - w.q_begin;
  it.segments = p.plan.segments + row * p.plan.k_clusters;
  it.num_segments = p.plan.num_segments[row];
  it.keys = it.num_segments > 0 ? it.segments[it.num_segments - 1].cum_end : 0;
  return it;
}

__device__ __forceinline__ void cp_async_16(uint32_t smem_addr, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

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
    cp_async_16(smem0 + i * kPassBytes, g, r >= 0);
  }
}

template <class Tr>
__device__ void producer(const Params& p, typename Tr::Smem& s, int num_items, int q_tiles) {
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
  int item_count = 0;
  for (int index = blockIdx.x; index < num_items; index += gridDim.x, ++item_count) {
    const Item it = load_item(p, index, q_tiles);
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

// (An L2 eviction hint on these loads, evict-first on Q and evict-last on K/V, was measured and
// changed nothing: docs/attention.md.)
__device__ __forceinline__ void tma_load(const CUtensorMap& map, uint64_t* bar, void* smem, int32_t col, int32_t row,
                                         int32_t head, int32_t batch) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(cast_smem_ptr_to_uint(smem)),
      "l"(reinterpret_cast<uint64_t>(&map)), "r"(col), "r"(row), "r"(head), "r"(batch),
      "r"(cast_smem_ptr_to_uint(bar))
      : "memory");
}

// The slots of an item's keys: each segment (a run of kept clusters with contiguous rows) of L keys
// takes ceil(L / kRows) slots of kRows rows, the last one partly masked. Every lane of the producer
// warp follows the slots of its own position in the tile with a cursor that only moves forward; it
// counts the slots of the segments it passes, so the plan needs no slot prefix.
template <int kRows>
struct LaneSlots {
  const Segment* segments;
  int32_t num_segments;
  int32_t seg = -1, slot_begin = 0, slot_end = 0;  // the current segment and its slots [begin, end)
  int32_t row = 0, len = 0, cum = 0;               // its first key row, its keys, its end in the virtual keys
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
};

// Slots of an item: the sum over its segments of ceil(keys / kRows), summed across the warp.
template <int kRows>
__device__ __forceinline__ int32_t count_slots(const Item& it, int lane) {
  if (it.segments == nullptr) return (it.keys + kRows - 1) / kRows;
  int32_t slots = 0;
  for (int i = lane; i < it.num_segments; i += 32) {
    const int32_t begin = i > 0 ? it.segments[i - 1].cum_end : 0;
    slots += (it.segments[i].cum_end - begin + kRows - 1) / kRows;
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

// The producer warp's next item. Static: CTA i takes items i, i + grid, ... Dynamic (p.next_item):
// the next one nobody has taken, so that CTAs whose items were lighter do not drift ahead of the
// others into other heads. Every item but the first grid's is handed out by one fetch, and each
// CTA's last fetch finds none left: the fetches return 0 ... num_items - 1 in all, and the one that
// returns num_items - 1 is the launch's last, which puts the counter back to 0 for the next launch.
__device__ __forceinline__ int next_index(const Params& p, int index, int num_items, int lane) {
  if (p.next_item == nullptr) return index + gridDim.x;
  int taken = 0;
  if (lane == 0) {
    taken = atomicAdd(p.next_item, 1);
    if (taken == num_items - 1) *p.next_item = 0;
  }
  return __shfl_sync(0xffffffff, taken, 0) + gridDim.x;
}

// One warp loads: lane 0 signs each stage up for its bytes; in the sparse mode every lane finds the
// box its slot begins (box_at) and lane c * kSlots + j issues the box at slot j of column block c,
// for K and then V. In the dense mode a key tile is one kBlockN-row box per column block.
template <class Tr>
__device__ void producer_tma(const Params& p, const TmaMaps& maps, typename Tr::Smem& s, int num_items, int q_tiles) {
  using T = typename Tr::T;
  constexpr uint32_t kQBytes = Tr::kBlockM * Tr::kChunksPerRow * 16;
  constexpr uint32_t kTileBytes = Tr::kBlockN * Tr::kChunksPerRow * 16;
  constexpr int kAtomElems = 8 * 64;  // one 8 x 64 swizzle atom
  const int lane = threadIdx.x % 32;
  const int slot = lane % Tr::kSlots, col_block = lane / Tr::kSlots;
  int tile_count = 0;
  int index = blockIdx.x;
  for (int item_count = 0;; ++item_count) {
    if (index >= num_items) {
      if (p.next_item != nullptr) {  // tell the consumers that no item is left
        Barrier::wait(&s.q_empty, (item_count & 1) ^ 1);
        if (lane == 0) {
          s.item_index = num_items;
          Barrier::arrive(&s.q_full);
        }
      }
      return;
    }
    const Item it = load_item(p, index, q_tiles);
    const int b = it.bh / p.heads, h = it.bh % p.heads;
    const int n_blocks = (count_slots<Tr::kSlotRows>(it, lane) + Tr::kSlots - 1) / Tr::kSlots;
    LaneSlots<Tr::kSlotRows> slots(it);

    // Q: 64-row boxes (rows past the item's end are computed and never stored).
    Barrier::wait(&s.q_empty, (item_count & 1) ^ 1);
    if (lane == 0) {
      s.item_blocks = n_blocks;
      s.item_index = index;
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&s.q_full, kQBytes);
    }
    __syncwarp();
    if (lane < 2 * Tr::kColBlocks) {
      const int half = lane % 2, cb = lane / 2;
      T* dst = s.q.data() + (half * 8 + cb * (Tr::kBlockM / 8)) * kAtomElems;
      tma_load(maps.q, &s.q_full, dst, cb * 64, it.q_begin + 64 * half, h, b);
    }

    for (int n = 0; n < n_blocks; ++n, ++tile_count) {
      const int stage = tile_count % Tr::kStages;
      const int phase = (tile_count / Tr::kStages) & 1;
      // This lane's box: where it starts in the tile (in slots), its first row and its map. Dense:
      // one whole-tile box per column block.
      int at = 0, map = kBoxHeights - 1;
      int32_t row = n * Tr::kBlockN;
      bool issues = slot == 0 && col_block < Tr::kColBlocks;
      uint32_t counts[Tr::kCountWords] = {};
      if (!p.dense) {
        int32_t count, seg;
        slots.at(n * Tr::kSlots + slot, row, count, seg);
        issues = box_at<Tr::kSlots>(seg, it.num_segments, lane, map) && col_block < Tr::kColBlocks;
        at = slot;
        // Slot j's count goes to byte j % 4 of word j / 4 (lanes of column block 0 hold every slot).
#pragma unroll
        for (int w = 0; w < Tr::kCountWords; ++w) {
          const bool mine = col_block == 0 && slot / 4 == w;
          counts[w] = __reduce_or_sync(0xffffffff, mine ? static_cast<uint32_t>(count) << (8 * (slot % 4)) : 0u);
        }
      }
      // Slot j is rows [j kSlotRows, (j + 1) kSlotRows) of the tile: kSlotRows / 8 swizzle atoms.
      const int atom = at * (Tr::kSlotRows / 8) + col_block * (Tr::kBlockN / 8);
      T* k_dst = s.k.data() + stage * Tr::kBlockN * Tr::kChunksPerRow * 8 + atom * kAtomElems;
      T* v_dst = s.v.data() + stage * Tr::kBlockN * Tr::kChunksPerRow * 8 + atom * kAtomElems;
      Barrier::wait(&s.k_empty[stage], phase ^ 1);
      if (lane == 0) {
        if (!p.dense) {
#pragma unroll
          for (int w = 0; w < Tr::kCountWords; ++w) s.slot_count[stage][w] = counts[w];
        }
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&s.k_full[stage], kTileBytes);
      }
      __syncwarp();  // the expected bytes are set before any copy of the stage is issued
      if (issues) tma_load(maps.k[map], &s.k_full[stage], k_dst, col_block * 64, row, h, b);
      Barrier::wait(&s.v_empty[stage], phase ^ 1);
      if (lane == 0) cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&s.v_full[stage], kTileBytes);
      __syncwarp();
      if (issues) tma_load(maps.v[map], &s.v_full[stage], v_dst, col_block * 64, row, h, b);
    }
    index = next_index(p, index, num_items, lane);
  }
}

template <class Tr, bool kTma>
__device__ void consumer(const Params& p, typename Tr::Smem& s, int num_items, int q_tiles) {
  using T = typename Tr::T;
  constexpr int kBlockN = Tr::kBlockN;
  const int wg = threadIdx.x / 128 - 1;  // 0 or 1: rows [64 wg, 64 wg + 64) of the item
  const int thread = threadIdx.x % 128;
  const int lane = thread % 32, warp = thread / 32;

  auto sQ = make_tensor(make_smem_ptr(s.q.data()), typename Tr::LayoutQ{});
  auto sQw = local_tile(sQ, Shape<_64, Int<Tr::kChunksPerRow * 8>>{}, make_coord(wg, _0{}));
  auto sQ0 = local_tile(sQ, Shape<_64, Int<Tr::kChunksPerRow * 8>>{}, make_coord(0, _0{}));
  auto sK = make_tensor(make_smem_ptr(s.k.data()), typename Tr::LayoutK{});
  auto sVt = make_tensor(make_smem_ptr(s.v.data()), typename Tr::LayoutVt{});

  typename Tr::MmaQK mma_qk;
  typename Tr::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_slice(thread);
  auto thr_pv = mma_pv.get_slice(thread);
  auto tSrQ = thr_qk.partition_fragment_A(sQw);
  auto tSrQ0 = thr_qk.partition_fragment_A(sQ0);  // rows [0, 64): both warpgroups' in a split item
  auto tSrK = thr_qk.partition_fragment_B(sK);
  auto tOrV = thr_pv.partition_fragment_B(sVt);
  auto tSrS = partition_fragment_C(mma_qk, Shape<_64, Int<kBlockN>>{});
  auto tOrO = partition_fragment_C(mma_pv, Shape<_64, Int<Tr::kChunksPerRow * 8>>{});
  // P as the A operand of P V: the accumulator's register order is (col pair, row half, 8-col
  // group), the A fragment's is (col pair, row half, k half, 16-col block): the same flat order.
  auto tOrP = make_tensor<T>(Layout<Shape<Shape<_2, _2, _2>, _1, Int<kBlockN / 16>>>{});
  static_assert(size(tOrP) == size(tSrS));

  const float scale_log2 = p.scale * 1.4426950408889634f;
  float row_max[2], row_sum[2];

  // S = Q K^T for the tile in `stage`, issued asynchronously; Q is this warpgroup's rows, or rows
  // [0, 64) in a split item.
  auto issue_qk = [&](int stage, bool rows0) {
    warpgroup_fence_operand(tSrS);
    warpgroup_arrive();
    mma_qk.accumulate_ = GMMA::ScaleOut::Zero;
    CUTLASS_PRAGMA_UNROLL
    for (int kb = 0; kb < size<2>(tSrQ); ++kb) {
      cute::gemm(mma_qk, rows0 ? tSrQ0(_, _, kb) : tSrQ(_, _, kb), tSrK(_, _, kb, stage), tSrS);
      mma_qk.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
  };
  // O += P V for the tile in `stage`, issued asynchronously (P is read from registers until done).
  auto issue_pv = [&](int stage) {
    warpgroup_fence_operand(tOrO);
    warpgroup_arrive();
    cute::gemm(mma_pv, tOrP, tOrV(_, _, _, stage), tOrO);
    warpgroup_commit_batch();
  };
  // The key counts of the tile in `stage`'s 16 slots (TMA loads), read before the stage is released.
  using Counts = uint32_t[Tr::kCountWords];
  auto read_counts = [&](int stage, Counts& counts) {
    if constexpr (kTma) {
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < Tr::kCountWords; ++j) counts[j] = s.slot_count[stage][j];
    }
  };
  // Online softmax of the tile in tSrS (key tile n): masks what is not a key (past the end; with TMA
  // loads in the sparse mode, the rows of a slot past its cluster's end), updates the row maxima and
  // sums, leaves exp(S - max) in tSrS and returns the factor O must be rescaled by.
  const bool slot_masks = kTma && !p.dense;
  auto softmax = [&](int n, int keys, const Counts& counts, float(&rescale)[2]) {
    warpgroup_fence_operand(tSrS);
    // Accumulator value (c, r, g) is row lane/4 + 8r (+16 warp), column 8g + 2(lane%4) + c.
    if (slot_masks) {
      constexpr int kGroups = Tr::kSlotRows / 8;  // 8-column groups per slot
      bool full = true;
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < Tr::kSlots; ++j) full = full && ((counts[j / 4] >> (8 * (j % 4))) & 0xff) == Tr::kSlotRows;
      if (!full) {
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(tSrS); ++i) {
          const int c = i % 2, g = i / 4, slot = g / kGroups;
          const int count = (counts[slot / 4] >> (8 * (slot % 4))) & 0xff;
          if (8 * (g % kGroups) + 2 * (lane % 4) + c >= count) tSrS(i) = -INFINITY;
        }
      }
    }
    const int valid = slot_masks ? kBlockN : keys - n * kBlockN;
    if (valid < kBlockN) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(tSrS); ++i) {
        const int c = i % 2, g = i / 4;
        if (8 * g + 2 * (lane % 4) + c >= valid) tSrS(i) = -INFINITY;
      }
    }
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
      CUTLASS_PRAGMA_UNROLL
      for (int g = 0; g < kBlockN / 8; ++g) mx = fmaxf(mx, fmaxf(tSrS(4 * g + 2 * r), tSrS(4 * g + 2 * r + 1)));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
      // Every tile holds at least one key, so mx is finite; exp2(-inf) = 0 on the first tile.
      rescale[r] = fast_exp2((row_max[r] - mx) * scale_log2);
      row_max[r] = mx;
      const float offset = mx * scale_log2;
      float sum = 0.0f;
      CUTLASS_PRAGMA_UNROLL
      for (int g = 0; g < kBlockN / 8; ++g) CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < 2; ++c) {
        const float e = fast_exp2(tSrS(4 * g + 2 * r + c) * scale_log2 - offset);
        tSrS(4 * g + 2 * r + c) = e;
        sum += e;
      }
      row_sum[r] = row_sum[r] * rescale[r] + sum;
    }
  };
  auto rescale_o = [&](const float(&rescale)[2]) {
    CUTLASS_PRAGMA_UNROLL
    for (int g = 0; g < size(tOrO) / 4; ++g) CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < 2; ++r) {
      tOrO(4 * g + 2 * r) *= rescale[r];
      tOrO(4 * g + 2 * r + 1) *= rescale[r];
    }
  };
  auto convert_p = [&] {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tSrS); ++i) tOrP(i) = static_cast<T>(tSrS(i));
  };

  // Ping-pong (FA3): the two warpgroups take turns to issue their MMAs, so that one's softmax runs
  // while the other's MMAs hold the tensor cores. Every warpgroup takes the same number of turns
  // per item, active or not.
  auto wait_turn = [&] { cutlass::arch::NamedBarrier::sync(256, kTurnBarrier + wg); };
  auto pass_turn = [&] { cutlass::arch::NamedBarrier::arrive(256, kTurnBarrier + 1 - wg); };
  if (wg == 1) pass_turn();  // warpgroup 0 goes first

  int tile_count = 0, item_count = 0;
  for (int index = blockIdx.x;; index += gridDim.x, ++item_count) {
    if (p.next_item == nullptr && index >= num_items) break;
    Barrier::wait(&s.q_full, item_count & 1);
    if (p.next_item != nullptr) {  // the item the producer took
      index = s.item_index;
      if (index >= num_items) break;
    }
    const Item it = load_item(p, index, q_tiles);
    row_max[0] = row_max[1] = -INFINITY;
    row_sum[0] = row_sum[1] = 0.0f;
    clear(tOrO);
    // With TMA loads key tiles are slots of 8 rows per cluster: the producer counted them.
    const int n_blocks = kTma ? s.item_blocks : (it.keys + kBlockN - 1) / kBlockN;
    // An item of at most 64 rows is split: both warpgroups compute rows [0, 64), warpgroup w the key
    // tiles w, w + 2, ..., and warpgroup 0 merges the two halves (by their row maxima) before the
    // epilogue. Unsplit, such an item would leave warpgroup 1 idle and run at half the pair rate.
    const bool split = p.split_tails && it.rows <= 64 && n_blocks >= 2;
    const auto stage_of = [&](int n) { return (tile_count + n) % Tr::kStages; };
    const auto phase_of = [&](int n) { return ((tile_count + n) / Tr::kStages) & 1; };
    // A key tile this warpgroup does not compute: released once loaded, which keeps every stage's
    // barrier phases in order.
    const auto release = [&](int n) {
      Barrier::wait(&s.k_full[stage_of(n)], phase_of(n));
      Barrier::arrive(&s.k_empty[stage_of(n)]);
      Barrier::wait(&s.v_full[stage_of(n)], phase_of(n));
      Barrier::arrive(&s.v_empty[stage_of(n)]);
    };
    if (!split && it.rows <= 64 * wg) {
      // No row of this warpgroup: keep the barrier protocol without computing.
      for (int n = 0; n < n_blocks; ++n) {
        wait_turn();
        pass_turn();
        release(n);
      }
      if (n_blocks > 0) {
        wait_turn();
        pass_turn();
      }
      tile_count += n_blocks;
      Barrier::arrive(&s.q_empty);
      continue;
    }
    // Software pipeline within the warpgroup (FA3's intra-warpgroup overlap): the softmax of tile n
    // runs while the tensor cores compute P V of the warpgroup's previous tile.
    const int step = split ? 2 : 1, first = split ? wg : 0;
    if (first < n_blocks) {
      float rescale[2];
      Counts counts;
      if (first > 0) release(0);
      int stage = stage_of(first), phase = phase_of(first);
      Barrier::wait(&s.k_full[stage], phase);
      read_counts(stage, counts);
      wait_turn();
      issue_qk(stage, split);
      pass_turn();
      warpgroup_wait<0>();
      Barrier::arrive(&s.k_empty[stage]);
      softmax(first, it.keys, counts, rescale);
      convert_p();
      for (int n = first + step; n < n_blocks; n += step) {
        if (split) release(n - 1);
        const int prev_stage = stage, prev_phase = phase;
        stage = stage_of(n);
        phase = phase_of(n);
        Barrier::wait(&s.k_full[stage], phase);
        read_counts(stage, counts);
        Barrier::wait(&s.v_full[prev_stage], prev_phase);
        wait_turn();
        issue_qk(stage, split);
        issue_pv(prev_stage);
        pass_turn();
        warpgroup_wait<1>();  // S of tile n is ready; P V of the previous tile may still run
        Barrier::arrive(&s.k_empty[stage]);
        softmax(n, it.keys, counts, rescale);
        warpgroup_wait<0>();
        Barrier::arrive(&s.v_empty[prev_stage]);
        warpgroup_fence_operand(tOrO);
        rescale_o(rescale);
        convert_p();
      }
      Barrier::wait(&s.v_full[stage], phase);
      wait_turn();
      issue_pv(stage);
      pass_turn();
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
      Barrier::arrive(&s.v_empty[stage]);
      if (split && (n_blocks - 1) % 2 != wg) release(n_blocks - 1);  // the last tile is the other's
    }
    // Warpgroup 1 of a split item with an odd number of tiles computed one tile fewer: one more
    // (empty) turn keeps the two warpgroups' turns equal.
    if (split && wg == 1 && n_blocks % 2 == 1) {
      wait_turn();
      pass_turn();
    }
    tile_count += n_blocks;
    if (split) {
      // Warpgroup 1's O, row maxima and partial sums go through shared memory (its O through the Q
      // buffer, free once both warpgroups' last Q K^T is done); warpgroup 0 rescales both halves to
      // the larger maximum and adds them. Same thread, same fragment: element i of thread t sits at
      // i * 128 + t.
      float* merge_o = reinterpret_cast<float*>(s.q.data());
      cutlass::arch::NamedBarrier::sync(256, kMergeBarrier);
      if (wg == 1) {
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(tOrO); ++i) merge_o[i * 128 + thread] = tOrO(i);
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < 2; ++r) {
          s.merge_max[r][thread] = row_max[r];
          s.merge_sum[r][thread] = row_sum[r];
        }
      }
      cutlass::arch::NamedBarrier::sync(256, kMergeBarrier);
      if (wg == 0) {
        float own[2], other[2];
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < 2; ++r) {
          const float m1 = s.merge_max[r][thread], m = fmaxf(row_max[r], m1);
          own[r] = fast_exp2((row_max[r] - m) * scale_log2);
          other[r] = fast_exp2((m1 - m) * scale_log2);
          row_sum[r] = row_sum[r] * own[r] + s.merge_sum[r][thread] * other[r];
          row_max[r] = m;
        }
        CUTLASS_PRAGMA_UNROLL
        for (int g = 0; g < size(tOrO) / 4; ++g) CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < 2; ++r) CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < 2; ++c) {
          const int i = 4 * g + 2 * r + c;
          tOrO(i) = tOrO(i) * own[r] + merge_o[i * 128 + thread] * other[r];
        }
      }
      // The Q buffer was written and read through the generic proxy; the next Q arrives by TMA.
      cutlass::arch::fence_view_async_shared();
    }
    Barrier::arrive(&s.q_empty);  // Q of this item is no longer read
    if (split && wg == 1) continue;  // warpgroup 0 writes the merged rows

    // Epilogue: normalise, then write the rows of this item in place (or through q_perm). Under
    // p.accumulate (key phases) out and lse already hold an earlier phase's result for these rows and
    // the two merge by their LSEs; the four lanes of a quad share a row, so all of them read its old
    // lse before any writes the new one.
    const int b = it.bh / p.heads, h = it.bh % p.heads;
    T* out = static_cast<T*>(p.out) + b * p.o_stride[0] + h * p.o_stride[1];
    float* lse = p.lse == nullptr ? nullptr : p.lse + b * p.lse_stride[0] + h * p.lse_stride[1];
    int32_t rows[2];
    float old_lse[2] = {-INFINITY, -INFINITY};
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int local = 64 * wg + 16 * warp + lane / 4 + 8 * r;
      rows[r] = local < it.rows
                    ? through_perm(p.q_perm, int64_t{it.bh} * p.seq_q, it.q_begin + local, p.seq_q, p.flag)
                    : -1;
      if (p.accumulate && rows[r] >= 0) old_lse[r] = lse[static_cast<int64_t>(rows[r]) * p.lse_stride[2]];
    }
    __syncwarp();
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[r];
      sum += __shfl_xor_sync(0xffffffff, sum, 1);
      sum += __shfl_xor_sync(0xffffffff, sum, 2);
      const int32_t row = rows[r];
      if (row < 0) continue;
      float inv = sum != 0.0f ? 1.0f / sum : 0.0f;
      float new_lse = sum != 0.0f ? row_max[r] * p.scale + logf(sum) : -INFINITY;
      T* dst = out + static_cast<int64_t>(row) * p.o_stride[2] + 2 * (lane % 4);
      float keep = 0.0f;  // the old row's weight in the merged one
      if (p.accumulate) {
        if (new_lse == -INFINITY) continue;  // no key of this phase: the row keeps its earlier result
        const float m = fmaxf(old_lse[r], new_lse);
        const float w_old = __expf(old_lse[r] - m), w_new = __expf(new_lse - m), total = w_old + w_new;
        keep = w_old / total;
        inv *= w_new / total;
        new_lse = m + logf(total);
      }
      CUTLASS_PRAGMA_UNROLL
      for (int g = 0; g < size(tOrO) / 4; ++g) {
        float x0 = tOrO(4 * g + 2 * r) * inv, x1 = tOrO(4 * g + 2 * r + 1) * inv;
        if (p.accumulate) {
          const uint32_t bits = *reinterpret_cast<const uint32_t*>(dst + 8 * g);
          const T* old = reinterpret_cast<const T*>(&bits);
          x0 += keep * static_cast<float>(old[0]);
          x1 += keep * static_cast<float>(old[1]);
        }
        T pair[2] = {static_cast<T>(x0), static_cast<T>(x1)};
        *reinterpret_cast<uint32_t*>(dst + 8 * g) = *reinterpret_cast<const uint32_t*>(pair);
      }
      if (lse != nullptr && lane % 4 == 0) lse[static_cast<int64_t>(row) * p.lse_stride[2]] = new_lse;
    }
  }
  if (wg == 0) wait_turn();  // takes warpgroup 1's last pass, so no arrival is left on a barrier
}

template <class Tr, bool kTma>
__global__ void __launch_bounds__(kThreads, 1)
    attention_kernel(const __grid_constant__ Params p, const __grid_constant__ TmaMaps maps) {
  extern __shared__ __align__(1024) char smem_raw[];
  auto& s = *reinterpret_cast<typename Tr::Smem*>(smem_raw);
  if (threadIdx.x == 0) {
    // TMA: one arrival (the producer's, with the stage's bytes) completes a "full" phase;
    // cp.async: one per producer thread.
    const int loaders = kTma ? 1 : 128;
    Barrier::init(&s.q_full, loaders);
    Barrier::init(&s.q_empty, 256);
    for (int i = 0; i < Tr::kStages; ++i) {
      Barrier::init(&s.k_full[i], loaders);
      Barrier::init(&s.v_full[i], loaders);
      Barrier::init(&s.k_empty[i], 256);
      Barrier::init(&s.v_empty[i], 256);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  const int q_tiles = (p.seq_q + kTileQ - 1) / kTileQ;
  const int num_items = p.dense ? p.batch * p.heads * q_tiles : *p.plan.num_items;
  if (threadIdx.x < 128) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if constexpr (kTma) {
      if (threadIdx.x < 32) producer_tma<Tr>(p, maps, s, num_items, q_tiles);
    } else {
      producer<Tr>(p, s, num_items, q_tiles);
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
    consumer<Tr, kTma>(p, s, num_items, q_tiles);
  }
}

// cuTensorMapEncodeTiled, reached through the runtime (no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found{};
    SAPATTN_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                                        &found));
    return found == cudaDriverEntryPointSuccess ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr) : nullptr;
  }();
  return fn;
}

// A [B, S, H, D] view (strides in elements: batch, head, row) as a 4-D tensor map (D, S, H, B) with
// boxes of 64 columns x box_rows rows, 128-byte swizzle, zeros outside. False where the driver
// refuses it (the cp.async loads then run).
template <typename T>
bool encode_map(CUtensorMap& map, const void* base, int seq, const Params& p, const int64_t (&stride)[3],
                int box_rows) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  constexpr auto kType = std::is_same_v<T, cutlass::bfloat16_t> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                                : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(p.head_dim), static_cast<cuuint64_t>(seq),
                              static_cast<cuuint64_t>(p.heads), static_cast<cuuint64_t>(p.batch)};
  const cuuint64_t bytes[3] = {static_cast<cuuint64_t>(stride[2]) * sizeof(T),
                               static_cast<cuuint64_t>(stride[1]) * sizeof(T),
                               static_cast<cuuint64_t>(stride[0]) * sizeof(T)};
  for (const cuuint64_t b : bytes)
    if (b == 0 || b % 16 != 0 || b >= (cuuint64_t{1} << 40)) return false;
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  return encode(&map, kType, 4, const_cast<void*>(base), dims, bytes, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Which loads run. TMA needs rows in cluster order (no permutation to read through); where they
// are, it is faster in both modes. Measured on an H100 (docs/attention.md, 2026-12-06): dense Wan
// 14B 720p 209 ms against the cp.async gather's 232; sparse, with the warp-parallel box finder, 16.5
// / 42.7 / 86.6 ms against 17.6 / 47.8 / 98.3 at densities 0.05 / 0.15 / 0.30, and 8-13% ahead on
// Wan 1.3B 480p and HunyuanVideo 720p. SAPATTN_SM90_LOAD overrides: "cpasync" everywhere, "tma" (or
// "" or "auto") wherever rows are unpermuted.
bool use_tma(const Params& p) {
  if (p.q_perm != nullptr || p.k_perm != nullptr) return false;
  const char* env = std::getenv("SAPATTN_SM90_LOAD");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return true;
  if (std::strcmp(env, "cpasync") == 0) return false;
  if (std::strcmp(env, "tma") == 0) return true;
  SAPATTN_THROW(InvalidArgumentError, "SAPATTN_SM90_LOAD is '", env, "'; expected auto, cpasync or tma");
}

// SAPATTN_SM90_SCHED=static|dynamic (default dynamic): how the sparse TMA kernel hands out items
// (next_index). An experiment of issue 12.
bool dynamic_schedule() {
  const char* env = std::getenv("SAPATTN_SM90_SCHED");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "dynamic") == 0) return true;
  SAPATTN_CHECK(std::strcmp(env, "static") == 0, InvalidArgumentError, "SAPATTN_SM90_SCHED is '", env,
                "'; expected static or dynamic");
  return false;
}

// SAPATTN_SM90_SPLIT=0|1 (default 1): whether items of at most 64 rows are split across both
// consumer warpgroups. An experiment of issue 12.
bool split_tails() {
  const char* env = std::getenv("SAPATTN_SM90_SPLIT");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "1") == 0) return true;
  SAPATTN_CHECK(std::strcmp(env, "0") == 0, InvalidArgumentError, "SAPATTN_SM90_SPLIT is '", env,
                "'; expected 0 or 1");
  return false;
}

template <typename T, int kHeadDim>
void launch(const Params& p, cudaStream_t stream) {
  using Tr = Traits<T, kHeadDim>;
  static_assert(sizeof(typename Tr::Smem) <= 227 * 1024, "more shared memory than an H100 SM gives a block");
  TmaMaps maps{};
  Params params = p;
  bool tma = use_tma(p) && encode_map<T>(maps.q, p.q, p.seq_q, p, p.q_stride, 64);
  for (int j = 0; j < kBoxHeights && tma; ++j)
    tma = encode_map<T>(maps.k[j], p.k, p.seq_k, p, p.k_stride, Tr::kSlotRows << j) &&
          encode_map<T>(maps.v[j], p.v, p.seq_k, p, p.v_stride, Tr::kSlotRows << j);
  const int smem = static_cast<int>(sizeof(typename Tr::Smem));
  auto* kernel = tma ? attention_kernel<Tr, true> : attention_kernel<Tr, false>;
  set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  const int64_t q_tiles = (p.seq_q + kTileQ - 1) / kTileQ;
  const int64_t max_items = p.dense ? int64_t{p.batch} * p.heads * q_tiles : p.plan.max_items;
  const int grid = static_cast<int>(std::min<int64_t>(p.num_sms, std::max<int64_t>(max_items, 1)));
  params.next_item = tma && !p.dense && dynamic_schedule() ? p.plan.next_item : nullptr;
  params.split_tails = split_tails();
  kernel<<<grid, kThreads, smem, stream>>>(params, maps);
  SAPATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace

bool sm90_compiled() { return true; }

void run_sm90(const Params& params, bool is_bf16, cudaStream_t stream) {
  if (is_bf16) {
    params.head_dim == 64 ? launch<cutlass::bfloat16_t, 64>(params, stream)
                          : launch<cutlass::bfloat16_t, 128>(params, stream);
  } else {
    params.head_dim == 64 ? launch<cutlass::half_t, 64>(params, stream) : launch<cutlass::half_t, 128>(params, stream);
  }
}

}  // namespace sapattn::cuda::attn
