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
};

// The plan's outputs and the sort's input.
struct PlanOut {
  Segment* segments;      // [rows, Ck]
  int32_t* num_segments;  // [rows]
  int32_t* bh_ok;         // [BH]
  uint64_t* key;          // [capacity], unsorted sort keys
  WorkItem* items;        // [capacity], unsorted
  int32_t* num_items;  // [2]: the item count, the kernels' scheduling counter
};

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

// Key cluster states for the run scan: an empty cluster (0) neither starts nor breaks a run.
enum : uint8_t { kEmpty = 0, kSkipped = 1, kKept = 2 };
// The state of the last non-empty cluster so far (associative: the right operand wins unless empty).
struct LastNonEmpty {
  __device__ uint8_t operator()(uint8_t a, uint8_t b) const { return b != kEmpty ? b : a; }
};

// One block per row r = bh * Cq + a. A first scan tells each kept cluster whether the last non-empty
// cluster before it is kept (then its rows continue that cluster's run). Each kept cluster then
// contributes (run start << 32) + its size to a 64-bit exclusive scan, which so gives both its
// segment index (high word) and its first virtual key (low word); the low word cannot carry into the
// high one, as the keys sum to at most Sk < 2^31. A run's start writes the segment's delta and the
// previous segment's end; the last segment's end is the row's key count.
__global__ void __launch_bounds__(kRowThreads) plan_rows_kernel(LayoutView layout, PlanOut out) {
  using Scan = cub::BlockScan<uint64_t, kRowThreads>;
  using StateScan = cub::BlockScan<uint8_t, kRowThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ typename StateScan::TempStorage state_storage;
  const int64_t r = blockIdx.x;
  const int64_t bh = r / layout.q_clusters, a = r % layout.q_clusters;
  const int64_t Ck = layout.k_clusters;
  if (out.bh_ok[bh] == 0) {
    if (threadIdx.x == 0) out.num_segments[r] = 0;
    return;
  }
  const int64_t b = bh / layout.heads, h = bh % layout.heads;
  const int32_t* ko = layout.k_offsets + bh * (Ck + 1);
  const uint8_t* mask = layout.mask + b * layout.mask_stride[0] + h * layout.mask_stride[1] + a * layout.mask_stride[2];
  const int64_t mask_col = layout.mask_stride[3];
  Segment* seg = out.segments + r * Ck;

  uint64_t running = 0;  // (segments << 32) + keys of the earlier passes
  uint64_t moment = 0;   // sum over this thread's kept clusters of (2 begin + size) size
  uint8_t carry = kEmpty;  // the last non-empty cluster's state in the earlier passes
  for (int64_t base = 0; base < Ck; base += kRowTile) {
    const int64_t first = base + static_cast<int64_t>(threadIdx.x) * kRowItems;
    int32_t begin[kRowItems], size[kRowItems];
    uint8_t state[kRowItems], before[kRowItems];
#pragma unroll
    for (int u = 0; u < kRowItems; ++u) {
      const int64_t c = first + u;
      begin[u] = c < Ck ? ko[c] : 0;
      size[u] = c < Ck ? ko[c + 1] - begin[u] : 0;
      const bool in_phase =
          layout.phases == 1 || int64_t{begin[u]} * layout.phases / layout.k_tokens == layout.phase;
      state[u] = size[u] == 0 ? kEmpty : mask[c * mask_col] != 0 && in_phase ? kKept : kSkipped;
      if (state[u] == kKept)
        moment += (2 * static_cast<uint64_t>(begin[u]) + static_cast<uint64_t>(size[u])) * static_cast<uint64_t>(size[u]);
    }
    uint8_t pass_state = kEmpty;
    StateScan(state_storage).ExclusiveScan(state, before, carry, LastNonEmpty{}, pass_state);
    uint64_t scan[kRowItems];
#pragma unroll
    for (int u = 0; u < kRowItems; ++u) {
      const uint64_t starts = state[u] == kKept && before[u] != kKept ? uint64_t{1} << 32 : 0;
      scan[u] = state[u] == kKept ? starts + static_cast<uint64_t>(size[u]) : 0;
    }
    uint64_t pass_total = 0;
    Scan(scan_storage).ExclusiveSum(scan, scan, pass_total);
#pragma unroll
    for (int u = 0; u < kRowItems; ++u) {
      if (state[u] != kKept || before[u] == kKept) continue;  // only a run's first cluster writes
      const uint64_t at = running + scan[u];
      const int32_t cum_begin = static_cast<int32_t>(at & 0xffffffffu);
      const int64_t index = static_cast<int64_t>(at >> 32);
      seg[index].delta = begin[u] - cum_begin;
      if (index > 0) seg[index - 1].cum_end = cum_begin;
    }
    running += pass_total;
    carry = LastNonEmpty{}(carry, pass_state);
    __syncthreads();  // the scans' storage is reused by the next pass
  }
  const uint64_t keys = running & 0xffffffffu;  // the same in every thread: CUB gives each the aggregate
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
    out.items[slot0 + t] = WorkItem{static_cast<int32_t>(bh), static_cast<int32_t>(a), q_begin, q_end};
  }
  if (threadIdx.x == 0) {
    const int32_t segments = static_cast<int32_t>(running >> 32);
    if (segments > 0) seg[segments - 1].cum_end = static_cast<int32_t>(keys);
    out.num_segments[r] = segments;
    if (tiles > 0) atomicAdd(out.num_items, tiles);
  }
}

// The workspace, carved the same way by plan_workspace_bytes (counting only) and build_plan.
struct PlanScratch {
  WorkItem* items = nullptr;  // [capacity], the sorted result
  int32_t* num_items = nullptr;
  Segment* segments = nullptr;      // [rows, Ck]
  int32_t* num_segments = nullptr;  // [rows]
  int32_t* bh_ok = nullptr;         // [BH]
  uint64_t* key_in = nullptr;       // [capacity]
  uint64_t* key_out = nullptr;      // [capacity]
  WorkItem* items_in = nullptr;     // [capacity], in slot order
  void* sort_temp = nullptr;
  size_t sort_temp_bytes = 0;
  int64_t rows = 0, capacity = 0;
};

PlanScratch carve_plan(Carver& carver, int64_t batch_heads, int64_t q_clusters, int64_t k_clusters, int64_t q_tokens) {
  PlanScratch s;
  s.rows = batch_heads * q_clusters;
  s.capacity = max_work_items(batch_heads, q_clusters, q_tokens);
  constexpr int64_t kLimit = int64_t{1} << 31;  // grid sizes and CUB's int item counts
  SAPATTN_CHECK(batch_heads < kLimit && s.rows < kLimit && s.capacity < kLimit, UnsupportedError,
                "the CUDA attention planner takes fewer than 2^31 heads, query-cluster rows and work items, got ",
                batch_heads, " heads x ", q_clusters, " clusters over ", q_tokens, " tokens");
  s.items = carver.take<WorkItem>(s.capacity);
  s.num_items = carver.take<int32_t>(2);
  s.segments = carver.take<Segment>(s.rows * k_clusters);
  s.num_segments = carver.take<int32_t>(s.rows);
  s.bh_ok = carver.take<int32_t>(batch_heads);
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

size_t plan_workspace_bytes(int64_t batch_heads, int64_t q_clusters, int64_t k_clusters, int64_t q_tokens) {
  Carver carver("block_sparse_attention (plan)");
  carve_plan(carver, batch_heads, q_clusters, k_clusters, q_tokens);
  return carver.used();
}

PlanView build_plan(const BlockLayout& layout, int64_t q_tokens, int64_t k_tokens, Workspace workspace,
                    cudaStream_t stream, int phase, int phases, int item_rows) {
  SAPATTN_CHECK(phases >= 1 && phase >= 0 && phase < phases, InvalidArgumentError, "key phase ", phase, " of ", phases,
                " is not a phase");
  SAPATTN_CHECK(item_rows == kTileQ || item_rows == kPairTileQ, InvalidArgumentError, "a plan's items take ", kTileQ,
                " or ", kPairTileQ, " query rows, got ", item_rows);
  const int64_t B = layout.q_offsets.shape[0], H = layout.q_offsets.shape[1];
  const int64_t BH = B * H, Cq = layout.q_offsets.shape[2] - 1, Ck = layout.k_offsets.shape[2] - 1;
  Carver carver("block_sparse_attention (plan)", workspace);
  const PlanScratch s = carve_plan(carver, BH, Cq, Ck, q_tokens);
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
  view.order = plan_order();
  view.phase = phase;
  view.phases = phases;
  view.item_rows = item_rows;
  const int key_bits = view.cost_bits + static_cast<int>(std::bit_width(static_cast<uint64_t>(BH)));
  const PlanOut out{s.segments, s.num_segments, s.bh_ok, s.key_in, s.items_in, s.num_items};

  check_offsets_kernel<<<static_cast<unsigned>(BH), kCheckThreads, 0, stream>>>(view, out, value_error_flag());
  SAPATTN_CUDA_CHECK_LAUNCH();
  if (s.rows > 0) {
    plan_rows_kernel<<<static_cast<unsigned>(s.rows), kRowThreads, 0, stream>>>(view, out);
    SAPATTN_CUDA_CHECK_LAUNCH();
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
