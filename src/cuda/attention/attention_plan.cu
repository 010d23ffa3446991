// The GPU planner (attention.hpp): from a BlockLayout to the segments of every (b,h, query cluster)
// row and the cost-sorted work items, as a fixed sequence of three launches (two kernels and a CUB
// radix sort) on the caller's stream.
//
// Item slots need no prefix sum: (b,h) owns max_work_items / BH slots, and query cluster a's tiles
// go to slots floor(q_offsets[a] / kTileQ) + a + t, t = 0, 1, ... These ranges never overlap (a
// cluster of n rows starting at o ends before floor((o + n) / kTileQ) + a + 1) and end before
// floor(Sq / kTileQ) + Cq, and slot order is (bh, cluster, q_begin) order. The slots left over
// keep key 0; every item's key is larger, so the stable descending sort puts the items first, equal
// keys in slot order, the empty slots after them. Items of item_rows = kPairTileQ rows (the sm90
// kernel's CTA pairs) take the first ceil(n / kPairTileQ) of the same slots.
//
// The sort key is (head, cost): heads in ascending order, within a head the heaviest items first.
// A persistent grid striding over the items then works on one or two heads at a time, whose K and
// V (39 MB per head at Wan 14B 720p) stay in L2 while every CTA reads them; sorting by cost alone
// spread the CTAs over all heads and made the kernel DRAM-bound (310 vs 500 TFLOP/s).
//
//   1. check_offsets_kernel, one block per (b,h): offsets start at 0, never decrease and end at the
//      sequence length, or the (b,h) raises kBadOffsets and plans nothing. It also clears the
//      (b,h)'s item slots.
//   2. plan_rows_kernel, one block per row: block-wide scans of the mask row compact the kept
//      non-empty key clusters into segments, one per run of clusters whose rows are contiguous (a
//      kept cluster whose previous non-empty cluster is kept too extends that one's segment), then
//      the row's items are written to their slots with their cost. Fewer, longer segments are what
//      the TMA loads want: each run is read as a few large boxes instead of one per cluster.
//   3. cub::DeviceRadixSort sorts all slots by key, descending.
//
// With slabs (attention.hpp) step 2 also runs one block per mixed row, the union of a mixed block's
// members: a run of kept clusters is cut where the members that keep it change, and each segment
// records them (PlanView::mixed_members). The rows do not write items; slab_items_kernel, one thread
// per (b,h), walks the head's clusters along its grid of slab_rows and writes them to the head's slots in
// row order (the sort then orders them).
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <bit>
#include <cstdlib>
#include <cstring>

#include "cuda/attention/attention.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda::attn {

namespace {

constexpr int kCheckThreads = 256;
constexpr int kRowThreads = 128;
constexpr int kRowItems = 8;  // consecutive key clusters per thread: 1024 per scan, a Wan row in one pass
constexpr int kRowTile = kRowThreads * kRowItems;

struct LayoutView {
  const int32_t* q_offsets;  // [BH, Cq+1]
  const int32_t* k_offsets;  // [BH, Ck+1]
  const uint8_t* mask;       // [B, H, Cq, Ck] with mask_stride
  int64_t mask_stride[4];
  int64_t heads, batch_heads, q_clusters, k_clusters;
  int64_t q_tokens, k_tokens;
  int64_t slots_per_bh;  // max_work_items / BH
  int cost_bits;         // bits of the largest cost; the head goes above them in the sort key
  PlanOrder order;       // what orders the items within a head
  int phase, phases;     // key phases (build_plan): only kept clusters starting in phase `phase`
  int item_rows;         // the most rows of an item (kTileQ or kPairTileQ)
  int slab_rows;         // 0, or the grid of a slab plan (attention.hpp): mixed rows planned too
};

// The plan's outputs and the sort's input.
struct PlanOut {
  Segment* segments;      // [rows, Ck]
  int32_t* num_segments;  // [rows]
  int32_t* bh_ok;         // [BH]
  uint64_t* key;          // [capacity], unsorted sort keys
  WorkItem* items;        // [capacity], unsorted
  int32_t* num_items;  // [2]: the item count, the kernels' scheduling counter
  Segment* mixed_segments;      // slabs: [rows, Ck]
  int32_t* mixed_num_segments;  // slabs: [rows]
  uint8_t* mixed_members;       // slabs: [rows, Ck]
};

// The mixed block that query cluster `a` begins on a grid of `block` rows, if any: the block holding a's last row, when
// a's rows start at or before the block's first row (no earlier cluster is in it) and end before the
// block's end (a later one is). Returns its non-empty clusters in row order (their count, which may
// exceed kMaxMembers; only the first kMaxMembers are written to ids, where not null) and the block's
// rows [begin, end); 0 where a begins no mixed block.
__device__ int mixed_block(const int32_t* qo, int64_t Cq, int64_t Sq, int32_t block, int64_t a, int32_t& begin,
                           int32_t& end, int32_t* ids) {
  const int32_t lo = qo[a], hi = qo[a + 1];
  if (lo == hi || hi >= Sq || hi % block == 0) return 0;
  begin = hi / block * block;
  end = static_cast<int32_t>(min_of<int64_t>(begin + block, Sq));
  if (lo > begin) return 0;
  int count = 0;
  for (int64_t c = a; c < Cq && qo[c] < end; ++c) {
    if (qo[c + 1] == qo[c]) continue;
    if (ids != nullptr && count < kMaxMembers) ids[count] = static_cast<int32_t>(c);
    ++count;
  }
  return count;
}

// One block per (b,h). Requiring the ends to be the sequence lengths (not just at most them) keeps
// the items within their slots and the key rows within the key tensor.
__global__ void __launch_bounds__(kCheckThreads) check_offsets_kernel(LayoutView layout, PlanOut out, int* flag) {
  const int64_t bh = blockIdx.x;
  const int32_t* qo = layout.q_offsets + bh * (layout.q_clusters + 1);
  const int32_t* ko = layout.k_offsets + bh * (layout.k_clusters + 1);
  bool bad = false;
  for (int64_t i = threadIdx.x; i < layout.q_clusters; i += kCheckThreads) bad = bad || qo[i] > qo[i + 1];
  for (int64_t i = threadIdx.x; i < layout.k_clusters; i += kCheckThreads) bad = bad || ko[i] > ko[i + 1];
  if (threadIdx.x == 0) {
    bad = bad || qo[0] != 0 || qo[layout.q_clusters] != layout.q_tokens || ko[0] != 0 ||
          ko[layout.k_clusters] != layout.k_tokens;
  }
  for (int64_t i = bh * layout.slots_per_bh + threadIdx.x; i < (bh + 1) * layout.slots_per_bh; i += kCheckThreads) {
    out.key[i] = 0;
    out.items[i] = WorkItem{0, 0, 0, 0};
  }
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) {
    out.bh_ok[bh] = bad ? 0 : 1;
    if (bad) atomicOr(flag, kBadOffsets);
    if (bh == 0) out.num_items[0] = out.num_items[1] = 0;  // the row blocks add their items to [0]
  }
}

// Key cluster states for the run scan: an empty cluster (0) neither starts nor breaks a run; a
// skipped one (1) breaks it; a kept one is 1 + 2 x the members that keep it (one bit for a row of
// one cluster), so a run continues only where the same members keep the next cluster.
enum : uint16_t { kEmpty = 0, kSkipped = 1 };
__device__ __forceinline__ bool is_kept(uint16_t state) { return state > kSkipped; }
// The state of the last non-empty cluster so far (associative: the right operand wins unless empty).
struct LastNonEmpty {
  __device__ uint16_t operator()(uint16_t a, uint16_t b) const { return b != kEmpty ? b : a; }
};

// One block per row r = bh * Cq + a, and with slabs one more per mixed row (block Rows + r: the
// mixed block that cluster a begins, over its members' kept keys). A first scan tells each kept
// cluster whether the last non-empty cluster before it is kept by the same members (then its rows
// continue that cluster's run). Each kept cluster then
// contributes (run start << 32) + its size to a 64-bit exclusive scan, which so gives both its
// segment index (high word) and its first virtual key (low word); the low word cannot carry into the
// high one, as the keys sum to at most Sk < 2^31. A run's start writes the segment's delta and the
// previous segment's end; the last segment's end is the row's key count.
__global__ void __launch_bounds__(kRowThreads) plan_rows_kernel(LayoutView layout, PlanOut out) {
  using Scan = cub::BlockScan<uint64_t, kRowThreads>;
  using StateScan = cub::BlockScan<uint16_t, kRowThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ typename StateScan::TempStorage state_storage;
  const int64_t rows = layout.batch_heads * layout.q_clusters;
  const bool mixed = blockIdx.x >= rows;
  const int64_t r = mixed ? blockIdx.x - rows : blockIdx.x;
  const int64_t bh = r / layout.q_clusters, a = r % layout.q_clusters;
  const int64_t Ck = layout.k_clusters;
  int32_t* num_segments = mixed ? out.mixed_num_segments : out.num_segments;
  // The clusters whose kept keys this row unites: a alone, or the members of the mixed block a begins.
  __shared__ int32_t member_ids[kMaxMembers];
  __shared__ int members;
  if (threadIdx.x == 0) {
    members = 0;
    if (out.bh_ok[bh] != 0 && !mixed) {
      members = 1;
      member_ids[0] = static_cast<int32_t>(a);
    } else if (out.bh_ok[bh] != 0) {
      int32_t begin, end;
      const int count = mixed_block(layout.q_offsets + bh * (layout.q_clusters + 1), layout.q_clusters,
                                    layout.q_tokens, layout.slab_rows, a, begin, end, member_ids);
      members = count >= 2 && count <= kMaxMembers ? count : 0;  // more: slab_items_kernel cuts the block up
    }
  }
  __syncthreads();
  if (members == 0) {
    if (threadIdx.x == 0) num_segments[r] = 0;
    return;
  }
  const int64_t b = bh / layout.heads, h = bh % layout.heads;
  const int32_t* ko = layout.k_offsets + bh * (Ck + 1);
  const uint8_t* mask = layout.mask + b * layout.mask_stride[0] + h * layout.mask_stride[1];
  const int64_t mask_row = layout.mask_stride[2], mask_col = layout.mask_stride[3];
  Segment* seg = (mixed ? out.mixed_segments : out.segments) + r * Ck;
  uint8_t* seg_members = mixed ? out.mixed_members + r * Ck : nullptr;

  uint64_t running = 0;  // (segments << 32) + keys of the earlier passes
  uint64_t moment = 0;   // sum over this thread's kept clusters of (2 begin + size) size
  uint16_t carry = kEmpty;  // the last non-empty cluster's state in the earlier passes
  for (int64_t base = 0; base < Ck; base += kRowTile) {
    const int64_t first = base + static_cast<int64_t>(threadIdx.x) * kRowItems;
    int32_t begin[kRowItems], size[kRowItems];
    uint16_t state[kRowItems], before[kRowItems];
#pragma unroll
    for (int u = 0; u < kRowItems; ++u) {
      const int64_t c = first + u;
      begin[u] = c < Ck ? ko[c] : 0;
      size[u] = c < Ck ? ko[c + 1] - begin[u] : 0;
      const bool in_phase =
          layout.phases == 1 || int64_t{begin[u]} * layout.phases / layout.k_tokens == layout.phase;
      uint32_t keep = 0;  // bit j: member j keeps cluster c
      if (size[u] != 0 && in_phase)
        for (int j = 0; j < members; ++j) keep |= (mask[member_ids[j] * mask_row + c * mask_col] != 0 ? 1u : 0u) << j;
      state[u] = size[u] == 0 ? kEmpty : static_cast<uint16_t>(kSkipped + 2 * keep);
      if (is_kept(state[u]))
        moment += (2 * static_cast<uint64_t>(begin[u]) + static_cast<uint64_t>(size[u])) * static_cast<uint64_t>(size[u]);
    }
    uint16_t pass_state = kEmpty;
    StateScan(state_storage).ExclusiveScan(state, before, carry, LastNonEmpty{}, pass_state);
    uint64_t scan[kRowItems];
#pragma unroll
    for (int u = 0; u < kRowItems; ++u) {
      const uint64_t starts = is_kept(state[u]) && before[u] != state[u] ? uint64_t{1} << 32 : 0;
      scan[u] = is_kept(state[u]) ? starts + static_cast<uint64_t>(size[u]) : 0;
    }
    uint64_t pass_total = 0;
    Scan(scan_storage).ExclusiveSum(scan, scan, pass_total);
#pragma unroll
    for (int u = 0; u < kRowItems; ++u) {
      if (!is_kept(state[u]) || before[u] == state[u]) continue;  // only a run's first cluster writes
      const uint64_t at = running + scan[u];
      const int32_t cum_begin = static_cast<int32_t>(at & 0xffffffffu);
      const int64_t index = static_cast<int64_t>(at >> 32);
      seg[index].delta = begin[u] - cum_begin;
      if (index > 0) seg[index - 1].cum_end = cum_begin;
      if (seg_members != nullptr) seg_members[index] = static_cast<uint8_t>(state[u] >> 1);
    }
    running += pass_total;
    carry = LastNonEmpty{}(carry, pass_state);
    __syncthreads();  // the scans' storage is reused by the next pass
  }
  const uint64_t keys = running & 0xffffffffu;  // the same in every thread: CUB gives each the aggregate
  if (layout.slab_rows > 0) {  // slab_items_kernel writes the items
    if (threadIdx.x == 0) {
      const int32_t segments = static_cast<int32_t>(running >> 32);
      if (segments > 0) seg[segments - 1].cum_end = static_cast<int32_t>(keys);
      num_segments[r] = segments;
    }
    return;
  }
  // The item's place within its head: Locality sorts by the mean kept key row (moment / 2 keys),
  // ascending; Cost by rows x keys, descending; Slot keeps (cluster, q_begin).
  __shared__ uint64_t mean_row;
  if (layout.order == PlanOrder::Locality) {
    using Reduce = cub::BlockReduce<uint64_t, kRowThreads>;
    __shared__ typename Reduce::TempStorage reduce_storage;
    const uint64_t total = Reduce(reduce_storage).Sum(moment);
    if (threadIdx.x == 0) mean_row = keys > 0 ? total / (2 * keys) : static_cast<uint64_t>(layout.k_tokens);
    __syncthreads();
  }
  const int32_t* qo = layout.q_offsets + bh * (layout.q_clusters + 1);
  const int32_t q_lo = qo[a], q_hi = qo[a + 1];
  const int32_t tiles = (q_hi - q_lo + layout.item_rows - 1) / layout.item_rows;
  const int64_t slot0 = bh * layout.slots_per_bh + q_lo / kTileQ + a;
  const uint64_t head_key = static_cast<uint64_t>(layout.batch_heads - 1 - bh) << layout.cost_bits;
  for (int32_t t = threadIdx.x; t < tiles; t += kRowThreads) {
    const int32_t q_begin = q_lo + t * layout.item_rows, q_end = min_of(q_begin + layout.item_rows, q_hi);
    const uint64_t cost = static_cast<uint64_t>(q_end - q_begin) * keys + kItemBaseCost;
    // Every field is below 2^cost_bits, and nonzero, so that the empty slots (key 0) sort last.
    const uint64_t place = layout.order == PlanOrder::Cost       ? cost
                           : layout.order == PlanOrder::Locality ? static_cast<uint64_t>(layout.k_tokens) + 1 - mean_row
                                                                 : 1;
    out.key[slot0 + t] = head_key | place;
    out.items[slot0 + t] = WorkItem{static_cast<int32_t>(bh), static_cast<int32_t>(a), q_begin, q_end, 1, 0, 0};
  }
  if (threadIdx.x == 0) {
    const int32_t segments = static_cast<int32_t>(running >> 32);
    if (segments > 0) seg[segments - 1].cum_end = static_cast<int32_t>(keys);
    out.num_segments[r] = segments;
    if (tiles > 0) atomicAdd(out.num_items, tiles);
  }
}

// The keys of a planned row: its last segment's end.
__device__ __forceinline__ uint64_t row_keys(const Segment* segments, const int32_t* num_segments, int64_t row, int64_t Ck) {
  const int32_t n = num_segments[row];
  return n > 0 ? static_cast<uint64_t>(segments[row * Ck + n - 1].cum_end) : 0;
}

// Slabs: one thread per (b,h) writes its items to its slots, cluster by cluster along the grid of
// slab_rows (attention.hpp): a cluster's whole blocks in items of kTileQ rows, then the mixed block it begins, if
// any (cut into one item per member where it has more than kMaxMembers). Within a head the sort key
// is the cost (slabs take PlanOrder::Cost only).
constexpr int kItemThreads = 128;

__global__ void __launch_bounds__(kItemThreads) slab_items_kernel(LayoutView layout, PlanOut out) {
  const int64_t bh = static_cast<int64_t>(blockIdx.x) * kItemThreads + threadIdx.x;
  if (bh >= layout.batch_heads) return;
  if (out.bh_ok[bh] == 0) return;
  const int64_t Cq = layout.q_clusters, Ck = layout.k_clusters, Sq = layout.q_tokens;
  const int32_t block = layout.slab_rows;
  const int32_t* qo = layout.q_offsets + bh * (Cq + 1);
  const uint64_t head_key = static_cast<uint64_t>(layout.batch_heads - 1 - bh) << layout.cost_bits;
  int64_t slot = bh * layout.slots_per_bh;
  int32_t count = 0;
  const auto emit = [&](int64_t a, int32_t begin, int32_t end, int members, uint64_t ends, uint64_t keys) {
    out.key[slot] = head_key | (static_cast<uint64_t>(end - begin) * keys + kItemBaseCost);
    out.items[slot] = WorkItem{static_cast<int32_t>(bh), static_cast<int32_t>(a), begin, end, members, 0, ends};
    ++slot;
    ++count;
  };
  for (int64_t a = 0; a < Cq; ++a) {
    const int32_t lo = qo[a], hi = qo[a + 1];
    if (lo == hi) continue;
    const int64_t row = bh * Cq + a;
    const uint64_t keys = row_keys(out.segments, out.num_segments, row, Ck);
    // Whole blocks: from a's first block boundary to its last (to its end at the head's end).
    const int32_t first = (lo + block - 1) / block * block;
    const int32_t last = hi == Sq ? hi : hi / block * block;
    for (int32_t q = first; q < last; q += kTileQ) emit(a, q, min_of(q + kTileQ, last), 1, 0, keys);
    int32_t begin = 0, end = 0;
    const int members = mixed_block(qo, Cq, Sq, block, a, begin, end, nullptr);
    if (members == 0) continue;
    if (members <= kMaxMembers) {
      uint64_t ends = 0;  // byte j: where member j's rows end in the block (the last member's: not stored)
      int j = 0;
      for (int64_t c = a; j + 1 < members; ++c) {
        if (qo[c + 1] == qo[c]) continue;
        ends |= static_cast<uint64_t>(qo[c + 1] - begin) << (8 * j++);
      }
      emit(a, begin, end, members, ends, row_keys(out.mixed_segments, out.mixed_num_segments, row, Ck));
    } else {
      for (int64_t c = a; c < Cq && qo[c] < end; ++c) {
        if (qo[c + 1] == qo[c]) continue;
        emit(c, max_of(qo[c], begin), min_of(qo[c + 1], end), 1, 0,
             row_keys(out.segments, out.num_segments, bh * Cq + c, Ck));
      }
    }
  }
  if (count > 0) atomicAdd(out.num_items, count);
}

// The workspace, carved the same way by plan_workspace_bytes (counting only) and build_plan.
struct PlanScratch {
  WorkItem* items = nullptr;  // [capacity], the sorted result
  int32_t* num_items = nullptr;
  Segment* segments = nullptr;      // [rows, Ck]
  int32_t* num_segments = nullptr;  // [rows]
  int32_t* bh_ok = nullptr;         // [BH]
  Segment* mixed_segments = nullptr;      // [rows, Ck]: slabs
  int32_t* mixed_num_segments = nullptr;  // [rows]
  uint8_t* mixed_members = nullptr;       // [rows, Ck]
  uint64_t* key_in = nullptr;       // [capacity]
  uint64_t* key_out = nullptr;      // [capacity]
  WorkItem* items_in = nullptr;     // [capacity], in slot order
  void* sort_temp = nullptr;
  size_t sort_temp_bytes = 0;
  int64_t rows = 0, capacity = 0;
};

PlanScratch carve_plan(Carver& carver, int64_t batch_heads, int64_t q_clusters, int64_t k_clusters, int64_t q_tokens,
                       bool slabs) {
  PlanScratch s;
  s.rows = batch_heads * q_clusters;
  s.capacity = max_work_items(batch_heads, q_clusters, q_tokens);
  constexpr int64_t kLimit = int64_t{1} << 30;  // grid sizes (two blocks a row with slabs), CUB's int item counts
  SAPATTN_CHECK(batch_heads < kLimit && s.rows < kLimit && s.capacity < kLimit, UnsupportedError,
                "the CUDA attention planner takes fewer than 2^30 heads, query-cluster rows and work items, got ",
                batch_heads, " heads x ", q_clusters, " clusters over ", q_tokens, " tokens");
  s.items = carver.take<WorkItem>(s.capacity);
  s.num_items = carver.take<int32_t>(2);
  s.segments = carver.take<Segment>(s.rows * k_clusters);
  s.num_segments = carver.take<int32_t>(s.rows);
  s.bh_ok = carver.take<int32_t>(batch_heads);
  if (slabs) {
    s.mixed_segments = carver.take<Segment>(s.rows * k_clusters);
    s.mixed_num_segments = carver.take<int32_t>(s.rows);
    s.mixed_members = carver.take<uint8_t>(s.rows * k_clusters);
  }
  s.key_in = carver.take<uint64_t>(s.capacity);
  s.key_out = carver.take<uint64_t>(s.capacity);
  s.items_in = carver.take<WorkItem>(s.capacity);
  // A size query only (no launch, no dereference), for all 64 key bits: build_plan sorts fewer,
  // which needs no more scratch.
  SAPATTN_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(
      nullptr, s.sort_temp_bytes, s.key_in, s.key_out, s.items_in, s.items, static_cast<int>(s.capacity), 0, 64));
  s.sort_temp = carver.take_bytes(s.sort_temp_bytes);
  return s;
}

PlanOrder plan_order() {
  const char* env = std::getenv("SAPATTN_PLAN_ORDER");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "cost") == 0) return PlanOrder::Cost;
  if (std::strcmp(env, "locality") == 0) return PlanOrder::Locality;
  if (std::strcmp(env, "slot") == 0) return PlanOrder::Slot;
  SAPATTN_THROW(InvalidArgumentError, "SAPATTN_PLAN_ORDER is '", env, "'; expected cost, locality or slot");
}

}  // namespace

int requested_slab_rows() {
  const char* env = std::getenv("SAPATTN_PLAN_SLABS");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "0") == 0) return 0;
  if (std::strcmp(env, "64") == 0) return 64;
  if (std::strcmp(env, "128") == 0) return kTileQ;
  SAPATTN_THROW(InvalidArgumentError, "SAPATTN_PLAN_SLABS is '", env, "'; expected 0, 64 or 128");
}

size_t plan_workspace_bytes(int64_t batch_heads, int64_t q_clusters, int64_t k_clusters, int64_t q_tokens,
                            bool slabs) {
  Carver carver("block_sparse_attention (plan)");
  carve_plan(carver, batch_heads, q_clusters, k_clusters, q_tokens, slabs);
  return carver.used();
}

PlanView build_plan(const BlockLayout& layout, int64_t q_tokens, int64_t k_tokens, Workspace workspace,
                    cudaStream_t stream, int phase, int phases, int item_rows, int slab_rows) {
  SAPATTN_CHECK(phases >= 1 && phase >= 0 && phase < phases, InvalidArgumentError, "key phase ", phase, " of ", phases,
                " is not a phase");
  SAPATTN_CHECK(item_rows == kTileQ || item_rows == kPairTileQ, InvalidArgumentError, "a plan's items take ", kTileQ,
                " or ", kPairTileQ, " query rows, got ", item_rows);
  SAPATTN_CHECK(slab_rows == 0 || ((slab_rows == 64 || slab_rows == kTileQ) && phases == 1 && item_rows == kTileQ),
                InvalidArgumentError, "a slab plan takes a grid of 64 or ", kTileQ, " rows, one key phase and items of ",
                kTileQ, " rows; got ", slab_rows, " rows, ", phases, " phases, items of ", item_rows);
  const bool slabs = slab_rows > 0;
  const int64_t B = layout.q_offsets.shape[0], H = layout.q_offsets.shape[1];
  const int64_t BH = B * H, Cq = layout.q_offsets.shape[2] - 1, Ck = layout.k_offsets.shape[2] - 1;
  Carver carver("block_sparse_attention (plan)", workspace);
  const PlanScratch s = carve_plan(carver, BH, Cq, Ck, q_tokens, slab_rows > 0);
  carver.check();

  PlanView plan;
  plan.items = s.items;
  plan.num_items = s.num_items;
  plan.next_item = s.num_items + 1;
  plan.segments = s.segments;
  plan.num_segments = s.num_segments;
  plan.q_clusters = static_cast<int32_t>(Cq);
  plan.k_clusters = static_cast<int32_t>(Ck);
  plan.max_items = static_cast<int32_t>(s.capacity);
  plan.item_rows = item_rows;
  if (slabs) {
    plan.mixed_segments = s.mixed_segments;
    plan.mixed_num_segments = s.mixed_num_segments;
    plan.mixed_members = s.mixed_members;
  }
  if (BH == 0) {
    SAPATTN_CUDA_CHECK(cudaMemsetAsync(s.num_items, 0, 2 * sizeof(int32_t), stream));
    return plan;
  }

  LayoutView view{};
  view.q_offsets = static_cast<const int32_t*>(layout.q_offsets.data);
  view.k_offsets = static_cast<const int32_t*>(layout.k_offsets.data);
  view.mask = static_cast<const uint8_t*>(layout.mask.data);
  for (int d = 0; d < 4; ++d) view.mask_stride[d] = layout.mask.stride[d];
  view.heads = H;
  view.q_clusters = Cq;
  view.k_clusters = Ck;
  view.q_tokens = q_tokens;
  view.k_tokens = k_tokens;
  view.slots_per_bh = s.capacity / BH;
  view.batch_heads = BH;
  // Only the bits a key can occupy: fewer radix passes.
  const uint64_t max_cost =
      static_cast<uint64_t>(item_rows) * static_cast<uint64_t>(std::max<int64_t>(k_tokens, 0)) + kItemBaseCost;
  view.cost_bits = static_cast<int>(std::bit_width(max_cost));
  view.order = slabs ? PlanOrder::Cost : plan_order();
  view.slab_rows = slab_rows;
  view.phase = phase;
  view.phases = phases;
  view.item_rows = item_rows;
  const int key_bits = view.cost_bits + static_cast<int>(std::bit_width(static_cast<uint64_t>(BH)));
  const PlanOut out{s.segments,       s.num_segments,       s.bh_ok,          s.key_in, s.items_in,
                    s.num_items,      s.mixed_segments,     s.mixed_num_segments, s.mixed_members};

  check_offsets_kernel<<<static_cast<unsigned>(BH), kCheckThreads, 0, stream>>>(view, out, value_error_flag());
  SAPATTN_CUDA_CHECK_LAUNCH();
  if (s.rows > 0) {
    plan_rows_kernel<<<static_cast<unsigned>(slabs ? 2 * s.rows : s.rows), kRowThreads, 0, stream>>>(view, out);
    SAPATTN_CUDA_CHECK_LAUNCH();
    if (slabs) {
      slab_items_kernel<<<static_cast<unsigned>((BH + kItemThreads - 1) / kItemThreads), kItemThreads, 0, stream>>>(
          view, out);
      SAPATTN_CUDA_CHECK_LAUNCH();
    }
  }
  if (s.capacity > 0) {
    size_t temp_bytes = s.sort_temp_bytes;
    SAPATTN_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(s.sort_temp, temp_bytes, s.key_in, s.key_out,
                                                                 s.items_in, s.items, static_cast<int>(s.capacity), 0,
                                                                 key_bits, stream));
  }
  return plan;
}

}  // namespace sapattn::cuda::attn
