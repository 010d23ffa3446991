// The Hopper attention kernel's tile scheduler: which work items a CTA computes and in which order,
// behind one small interface that the producer warp and the consumer warpgroups share (FA3's and
// CUTLASS's tile schedulers: valid / current item / advance).
#pragma once

#include "cuda/attention/sm90/traits.cuh"

namespace sapattn::cuda::attn::sm90 {

// What one work item is, for producer and consumers alike.
struct Item {
  int32_t bh, q_begin, rows;
  const Segment* segments;  // nullptr in dense mode
  int32_t num_segments;
  int32_t keys;  // length of the virtual key sequence
};

// The CTA pairs (Params::pair, a cluster of two CTAs): both CTAs of a pair work on the same item
// of up to kPairTileQ rows, which share their keys, and each computes its own rows of it: CTA 0
// the first kTileQ rows and CTA 1 the rest, or, in an item of at most kTileQ rows, 64 rows each (so
// that each CTA's two consumer warpgroups split the key tiles of its rows). An item of at most 64
// rows leaves CTA 1 no rows: it keeps loading its share of the keys and the barrier protocol.
__device__ __forceinline__ int pair_rank() { return static_cast<int>(blockIdx.x % 2); }

__device__ __forceinline__ void take_pair_share(Item& it) {
  const int32_t first = it.rows > kTileQ ? kTileQ : min(it.rows, 64);
  if (pair_rank() == 0) {
    it.rows = first;
  } else {
    it.q_begin += first;
    it.rows -= first;
  }
}

// The query rows of a dense-mode item (a q tile), and the q tiles of a sequence.
__device__ __forceinline__ int dense_tile_rows(const Params& p) { return p.pair ? kPairTileQ : kTileQ; }

__device__ __forceinline__ Item load_item(const Params& p, int index, int q_tiles) {
  Item it;
  if (p.dense) {
    const int tile_rows = dense_tile_rows(p);
    it.bh = index / q_tiles;
    it.q_begin = (index % q_tiles) * tile_rows;
    it.rows = min(tile_rows, p.seq_q - it.q_begin);
    it.segments = nullptr;
    it.num_segments = 1;
    it.keys = p.seq_k;
  } else {
    const WorkItem w = p.plan.items[index];
    const int64_t row = static_cast<int64_t>(w.bh) * p.plan.q_clusters + w.q_cluster;
    it.bh = w.bh;
    it.q_begin = w.q_begin;
    it.rows = w.q_end - w.q_begin;
    it.segments = p.plan.segments + row * p.plan.k_clusters;
    it.num_segments = p.plan.num_segments[row];
    it.keys = it.num_segments > 0 ? it.segments[it.num_segments - 1].cum_end : 0;
  }
  if (p.pair) take_pair_share(it);
  return it;
}

// The producer warp's next item. Static: `stride` on (the grid, or the pairs). Dynamic (p.next_item):
// the next one nobody has taken, so that CTAs whose items were lighter do not drift ahead of the
// others into other heads. Every item but the first grid's is handed out by one fetch, and each
// CTA's last fetch finds none left: the fetches return 0 ... num_items - 1 in all, and the one that
// returns num_items - 1 is the launch's last, which puts the counter back to 0 for the next launch.
__device__ __forceinline__ int next_index(const Params& p, int index, int stride, int num_items, int lane) {
  if (p.next_item == nullptr) return index + stride;
  int taken = 0;
  if (lane == 0) {
    taken = atomicAdd(p.next_item, 1);
    if (taken == num_items - 1) *p.next_item = 0;
  }
  return __shfl_sync(0xffffffff, taken, 0) + gridDim.x;
}

// The items of one CTA, walked the same way by the producer and by the consumers:
//
//   ItemScheduler<...> items(p, s, num_items, q_tiles);
//   for (int q_count = 0; items.valid(q_count); items.advance(), ++q_count) work(items.item());
//
// Static (p.next_item null): CTA i takes items i, i + grid, ... (CTA pair i: i, i + pairs, ...).
// Dynamic (not with pairs): the producer warp takes the
// next item nobody has taken (next_index) and hands its index to the consumers with the item's Q:
// it writes s.item_index before it arrives on q_full, and the consumers read it once q_full has
// completed. So on the consumer side valid() first waits for the current item's Q (in the static
// mode only where there is an item): an item a consumer sees valid() has its queries in shared
// memory, and valid() is called once per item, as the loop condition. After its last item the
// producer calls finish(), which in the dynamic mode hands the consumers "none left" (num_items)
// the same way. The Q buffer's position (q_count, the items a role has finished) stays with each
// role, as the K/V stage ring's does: the scheduler is told it where it waits on Q's barriers.
//
// kProducer picks the side. kMayBeDynamic: whether p.next_item is read at all; the launcher sets it
// only with TMA loads, so the cp.async producer walks statically (the consumers read it in both
// kernels, as they always have: making it compile-time there would change the cp.async kernel's code).
template <class Tr, bool kProducer, bool kMayBeDynamic = true>
class ItemScheduler {
 public:
  __device__ __forceinline__ ItemScheduler(const Params& p, typename Tr::Smem& s, int num_items, int q_tiles)
      : p_(p),
        s_(s),
        num_items_(num_items),
        q_tiles_(q_tiles),
        index_(p.pair ? blockIdx.x / 2 : blockIdx.x),
        stride_(p.pair ? gridDim.x / 2 : gridDim.x) {}

  // Whether the current item exists. A consumer first waits for the item's Q: q_count, the items it has
  // finished, gives q_full's phase (in the dynamic mode the item's index comes with its Q). The
  // producer's ignores q_count.
  __device__ __forceinline__ bool valid(int q_count = 0) {
    if constexpr (kProducer) {
      return index_ < num_items_;
    } else {
      if (!dynamic() && index_ >= num_items_) return false;
      Barrier::wait(&s_.q_full, q_count & 1);
      if (dynamic()) {
        index_ = s_.item_index;
        if (index_ >= num_items_) return false;
      }
      return true;
    }
  }
  __device__ __forceinline__ int index() const { return index_; }
  __device__ __forceinline__ Item item() const { return load_item(p_, index_, q_tiles_); }

  __device__ __forceinline__ void advance() {
    if constexpr (kProducer && kMayBeDynamic) {
      index_ = next_index(p_, index_, stride_, num_items_, threadIdx.x % 32);
    } else {
      index_ += stride_;  // a consumer in the dynamic mode: replaced by the producer's in valid()
    }
  }

  // The producer, after its last item (`q_count` items in all): tell the consumers that no item is
  // left, completing q_full's phase with its `arrivals`.
  __device__ __forceinline__ void finish(int q_count, int arrivals) const {
    static_assert(kProducer);
    if (dynamic()) {
      Barrier::wait(&s_.q_empty, (q_count & 1) ^ 1);
      if (threadIdx.x % 32 == 0) {
        s_.item_index = num_items_;
        for (int i = 0; i < arrivals; ++i) Barrier::arrive(&s_.q_full);
      }
    }
  }

 private:
  __device__ __forceinline__ bool dynamic() const { return kMayBeDynamic && p_.next_item != nullptr; }

  const Params& p_;
  typename Tr::Smem& s_;
  const int num_items_, q_tiles_;
  int index_;
  const int stride_;
};

}  // namespace sapattn::cuda::attn::sm90
