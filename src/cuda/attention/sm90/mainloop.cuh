// The Hopper attention kernel's consumer warpgroups: per work item, S = Q K^T, the online softmax
// and O += P V over the item's key tiles as they arrive in the stage ring, the merge of a split
// item's two halves, and then the epilogue that the kernel composes in (epilogue.cuh), which gets
// O and the row statistics of the rows this warpgroup finished.
//
// Per key tile a consumer warpgroup computes S = Q K^T (SS wgmma, both operands in swizzled shared
// memory), the online softmax in fp32 on the accumulator fragment, converts P to 16 bits in
// registers and accumulates O += P V (RS wgmma, V read through a transposed view of its tile).
// Query rows of a work item beyond its end are zero-filled and never stored; a warpgroup whose 64
// rows are all beyond the end skips its MMAs but keeps the barrier protocol.
#pragma once

#include <cutlass/arch/barrier.h>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/tensor.hpp>

#include "cuda/attention/sm90/scheduler.cuh"
#include "cuda/attention/sm90/traits.cuh"
#include "cuda/runtime/primitives.cuh"

namespace sapattn::cuda::attn::sm90 {

// Epilogue: epilogue.cuh's, or any type with the same store(). kPair (CTA pairs, load.cuh): a
// stage is freed on both CTAs' "empty" barriers, the peer's through one arrival of 32 per warp.
template <class Tr, bool kTma, bool kPair, class Epilogue>
__device__ void consumer(const Params& p, typename Tr::Smem& s, int num_items, int q_tiles, const Epilogue& epilogue) {
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

  // Frees a stage's K or V buffer for the producers (both CTAs' with pairs).
  auto free_stage = [&](uint64_t& empty) {
    Barrier::arrive(&empty);
    if constexpr (kPair) {
      __syncwarp();
      if (lane == 0) mbarrier_arrive_cluster(&empty, pair_rank() ^ 1, 32);
    }
  };

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
  // The key counts of the tile in `stage`'s slots (TMA loads) and, in a mixed item, the members that
  // keep each slot's keys: read before the stage is released.
  using Counts = uint32_t[Tr::kCountWords];
  bool mixed = false;              // the current item is a mixed block of a slab plan
  uint32_t row_bit[2] = {1u, 1u};  // this thread's two rows' members as bits of a slot's members byte (1 unmixed)
  auto read_counts = [&](int stage, Counts& counts, Counts& members) {
    if constexpr (kTma) {
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < Tr::kCountWords; ++j) counts[j] = s.slot_count[stage][j];
      if (mixed) {
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < Tr::kCountWords; ++j) members[j] = s.slot_members[stage][j];
      }
    }
  };
  // Online softmax of the tile in tSrS (key tile n): masks what is not a key (past the end; with TMA
  // loads in the sparse mode, the rows of a slot past its cluster's end, and in a mixed item the
  // slots whose keys the row's own cluster does not keep), updates the row maxima and sums, leaves
  // exp(S - max) in tSrS and returns the factor O must be rescaled by. A row may see no key in a tile
  // of a mixed item (its maximum stays -inf), so the exponent's offset treats -inf as 0.
  const bool slot_masks = kTma && !p.dense;
  auto softmax = [&](int n, int keys, const Counts& counts, const Counts& members, float(&rescale)[2]) {
    warpgroup_fence_operand(tSrS);
    // Accumulator value (c, r, g) is row lane/4 + 8r (+16 warp), column 8g + 2(lane%4) + c.
    if (slot_masks) {
      // Slot by slot: a slot's count is the same in every thread, so the branch is uniform, and only
      // the partial slots (a run's last, one or two per tile) pay for the per-element masks; a mixed
      // item also masks the slots a row's own cluster does not keep.
      constexpr int kGroups = Tr::kSlotRows / 8;  // 8-column groups per slot
      constexpr int kPerSlot = 4 * kGroups;       // accumulator values of a slot per thread
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < Tr::kSlots; ++j) {
        const int count = (counts[j / 4] >> (8 * (j % 4))) & 0xff;
        const uint32_t keep = mixed ? members[j / 4] >> (8 * (j % 4)) : 1u;
        if (count < Tr::kSlotRows || mixed) {
          const int limit = count - 2 * (lane % 4);  // this thread's column c of group g is a key iff 8 g + c < limit
          CUTLASS_PRAGMA_UNROLL
          for (int e = 0; e < kPerSlot; ++e) {
            const int i = j * kPerSlot + e, c = i % 2, r = i / 2 % 2, g = i / 4;
            if (8 * (g % kGroups) + c >= limit || (keep & row_bit[r]) == 0) tSrS(i) = -INFINITY;
          }
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
      // Outside mixed items every tile holds a key of every row, so mx is finite; exp2(-inf) = 0 on
      // the first tile.
      const float mx_finite = mx == -INFINITY ? 0.0f : mx;
      rescale[r] = fast_exp2((row_max[r] - mx_finite) * scale_log2);
      row_max[r] = mx;
      const float offset = mx_finite * scale_log2;
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

  int tile_count = 0;  // key tiles consumed by this CTA so far: the pipeline position
  ItemScheduler<Tr, false> items(p, s, num_items, q_tiles);
  int item_count = 0;  // items computed so far: the Q buffer's position
  for (; items.valid(item_count); items.advance(), ++item_count) {
    const Item it = items.item();  // its Q has landed
    row_max[0] = row_max[1] = -INFINITY;
    row_sum[0] = row_sum[1] = 0.0f;
    clear(tOrO);
    // With TMA loads key tiles are slots of 8 rows per cluster: the producer counted them.
    const int n_blocks = kTma ? s.item_blocks : (it.keys + kBlockN - 1) / kBlockN;
    // An item of at most 64 rows is split: both warpgroups compute rows [0, 64), warpgroup w the key
    // tiles w, w + 2, ..., and warpgroup 0 merges the two halves (by their row maxima) before the
    // epilogue. Unsplit, such an item would leave warpgroup 1 idle and run at half the pair rate.
    const bool split = p.split_tails && it.rows > 0 && it.rows <= 64 && n_blocks >= 2;
    mixed = !kPair && it.members > 1;  // pairs take no slab plan (attention.hpp)
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < 2; ++r)
      row_bit[r] = mixed ? 1u << member_of(it, (split ? 0 : 64 * wg) + 16 * warp + lane / 4 + 8 * r) : 1u;
    const auto stage_of = [&](int n) { return (tile_count + n) % Tr::kStages; };
    const auto phase_of = [&](int n) { return ((tile_count + n) / Tr::kStages) & 1; };
    // A key tile this warpgroup does not compute: released once loaded, which keeps every stage's
    // barrier phases in order.
    const auto release = [&](int n) {
      Barrier::wait(&s.k_full[stage_of(n)], phase_of(n));
      free_stage(s.k_empty[stage_of(n)]);
      Barrier::wait(&s.v_full[stage_of(n)], phase_of(n));
      free_stage(s.v_empty[stage_of(n)]);
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
      Counts counts, members = {};
      if (first > 0) release(0);
      int stage = stage_of(first), phase = phase_of(first);
      Barrier::wait(&s.k_full[stage], phase);
      read_counts(stage, counts, members);
      wait_turn();
      issue_qk(stage, split);
      pass_turn();
      warpgroup_wait<0>();
      free_stage(s.k_empty[stage]);
      softmax(first, it.keys, counts, members, rescale);
      convert_p();
      for (int n = first + step; n < n_blocks; n += step) {
        if (split) release(n - 1);
        const int prev_stage = stage, prev_phase = phase;
        stage = stage_of(n);
        phase = phase_of(n);
        Barrier::wait(&s.k_full[stage], phase);
        read_counts(stage, counts, members);
        Barrier::wait(&s.v_full[prev_stage], prev_phase);
        wait_turn();
        issue_qk(stage, split);
        issue_pv(prev_stage);
        pass_turn();
        warpgroup_wait<1>();  // S of tile n is ready; P V of the previous tile may still run
        free_stage(s.k_empty[stage]);
        softmax(n, it.keys, counts, members, rescale);
        warpgroup_wait<0>();
        free_stage(s.v_empty[prev_stage]);
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
      free_stage(s.v_empty[stage]);
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
          const float m_finite = m == -INFINITY ? 0.0f : m;  // a mixed item's row may have no key at all
          own[r] = fast_exp2((row_max[r] - m_finite) * scale_log2);
          other[r] = fast_exp2((m1 - m_finite) * scale_log2);
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
    Barrier::arrive(&s.q_empty);     // Q of this item is no longer read
    if (split && wg == 1) continue;  // warpgroup 0 writes the merged rows

    epilogue.store(it, wg, warp, lane, tOrO, row_max, row_sum);
  }
  if (wg == 0) wait_turn();  // takes warpgroup 1's last pass, so no arrival is left on a barrier
}

}  // namespace sapattn::cuda::attn::sm90
