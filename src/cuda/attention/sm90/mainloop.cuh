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
//
// The e4m3 kernel (Tr::kFp8, traits.cuh) runs the same loop with three differences: the scores take
// the key scales per column (or one per head) and the query scale per row (softmax_fp8), P is
// stored as e4m3(p * p_scale) in the A layout of the e4m3 GEMM (convert_p_fp8, which may also sum
// the quantised P), and the epilogue gets V's channel scales and the smoothing's LSE term. P V is
// accumulated by the MMA into O as in the bf16 kernel (Hopper's e4m3 MMA accumulates with fewer bits
// than fp32; the GPU tests bound the effect on rows of many key tiles, docs/fp8.md).
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
__device__ void consumer(const Params& p, typename Tr::Smem& s, int num_items, int q_tiles, const Epilogue& epilogue,
                         const Fp8Params* fp8 = nullptr) {
  using T = typename Tr::T;
  constexpr int kBlockN = Tr::kBlockN;
  const int wg = threadIdx.x / 128 - 1;  // 0 or 1: rows [64 wg, 64 wg + 64) of the item
  const int thread = threadIdx.x % 128;
  const int lane = thread % 32, warp = thread / 32;

  auto sQ = make_tensor(make_smem_ptr(s.q.data()), typename Tr::LayoutQ{});
  auto sQw = local_tile(sQ, Shape<_64, Int<Tr::kHeadDim>>{}, make_coord(wg, _0{}));
  auto sQ0 = local_tile(sQ, Shape<_64, Int<Tr::kHeadDim>>{}, make_coord(0, _0{}));
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
  // O, and with Tr::kSumByMma the row sums in columns kHeadDim.. (value kHeadDim / 2 + 2 r: row r).
  auto tOrO = partition_fragment_C(mma_pv, Shape<_64, Int<Tr::kVtRows>>{});
  auto tOrP = make_tensor<T>(typename Tr::LayoutP{});
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
  // The exponent's factor of each of this thread's two rows: scale * log2(e), times the row's
  // query scale in the e4m3 kernel.
  float row_factor[2] = {scale_log2, scale_log2};
  const auto factor = [&](int r) {
    if constexpr (Tr::kFp8) {
      return row_factor[r];
    } else {
      return scale_log2;
    }
  };

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
  // The key counts of the tile in `stage`'s slots (TMA loads), read before the stage is released.
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
  // The online softmax's step for this thread's two rows over the masked scores in tSrS: the new row
  // maxima (the quad's), the factor O must be rescaled by, exp2 of the scores in the row's units
  // (factor(r)) less the maximum, plus log2_p_scale (the e4m3 kernel's P scale), in tSrS, and the
  // row sums, which add the tile's only if add_sum (the e4m3 kernel may sum the quantised P instead).
  // Every tile holds at least one key of every row, so mx is finite; exp2(-inf) = 0 on the first tile.
  // The maxima are a tree over the row's column pairs and the sums four interleaved partial sums: a
  // warpgroup's softmax runs while only the other's MMAs keep its SM sub-partitions busy, so every
  // dependent step of a chain is exposed (ncu: the row maxima as a 16-step chain of FMNMX were 12%
  // of the e4m3 loop's samples).
  auto update_rows = [&](float(&rescale)[2], float log2_p_scale, bool add_sum) {
    constexpr int kGroups = kBlockN / 8;
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < 2; ++r) {
      float pair_max[kGroups];
      CUTLASS_PRAGMA_UNROLL
      for (int g = 0; g < kGroups; ++g) pair_max[g] = fmaxf(tSrS(4 * g + 2 * r), tSrS(4 * g + 2 * r + 1));
      CUTLASS_PRAGMA_UNROLL
      for (int w = 1; w < kGroups; w *= 2) CUTLASS_PRAGMA_UNROLL
      for (int g = 0; g + w < kGroups; g += 2 * w) pair_max[g] = fmaxf(pair_max[g], pair_max[g + w]);
      float mx = fmaxf(row_max[r], pair_max[0]);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
      rescale[r] = fast_exp2((row_max[r] - mx) * factor(r));
      row_max[r] = mx;
      const float offset = mx * factor(r) - log2_p_scale;
      float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      CUTLASS_PRAGMA_UNROLL
      for (int g = 0; g < kGroups; ++g) CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < 2; ++c) {
        // Tr::kFmaExps of every 8 column groups take 2^x from the FMA pipe (exp2_fma), the rest from MUFU.
        const float x = tSrS(4 * g + 2 * r + c) * factor(r) - offset;
        const float e = g % 8 < Tr::kFmaExps ? exp2_fma(x) : fast_exp2(x);
        tSrS(4 * g + 2 * r + c) = e;
        sum[g % 4] += e;
      }
      row_sum[r] = row_sum[r] * rescale[r] + (add_sum ? (sum[0] + sum[1]) + (sum[2] + sum[3]) : 0.0f);
    }
  };
  auto softmax = [&](int n, int keys, const Counts& counts, float(&rescale)[2]) {
    warpgroup_fence_operand(tSrS);
    // Accumulator value (c, r, g) is row lane/4 + 8r (+16 warp), column 8g + 2(lane%4) + c.
    if (slot_masks) {
      // Slot by slot: a slot's count is the same in every thread, so the branch is uniform, and only
      // the partial slots (a run's last, one or two per tile) pay for the per-element masks.
      constexpr int kGroups = Tr::kSlotRows / 8;  // 8-column groups per slot
      constexpr int kPerSlot = 4 * kGroups;       // accumulator values of a slot per thread
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < Tr::kSlots; ++j) {
        const int count = (counts[j / 4] >> (8 * (j % 4))) & 0xff;
        if (count < Tr::kSlotRows) {
          const int limit = count - 2 * (lane % 4);  // this thread's column c of group g is a key iff 8 g + c < limit
          CUTLASS_PRAGMA_UNROLL
          for (int e = 0; e < kPerSlot; ++e) {
            const int i = j * kPerSlot + e, c = i % 2, g = i / 4;
            if (8 * (g % kGroups) + c >= limit) tSrS(i) = -INFINITY;
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
    update_rows(rescale, 0.0f, true);
  };
  // The e4m3 kernel's online softmax of the tile in tSrS (stage `stage`): each score times its key's
  // scale (the thread's four keys of a slot are 4t..4t+3, traits.cuh: one 16-byte read), what is not
  // a key masked (outside a slot's rows [lo, hi)), then as softmax above with the row's factor (query
  // scale x scale x log2 e) and P scaled to [0, p_scale] (log2(p_scale) added to the exponent). The
  // row sums take the fp32 P unless the quantised P are summed (convert_p_fp8).
  auto softmax_fp8 = [&](int stage, const Counts& counts, float(&rescale)[2]) {
    if constexpr (Tr::kFp8) {  // (the bf16 kernel's Smem has no key scales)
      warpgroup_fence_operand(tSrS);
      const int t = lane % 4;
      if constexpr (!Tr::kHeadKeyScale) {
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < Tr::kSlots; ++j) {
          const float4 sk = *reinterpret_cast<const float4*>(&s.k_scale[stage][j * Tr::kScaleSlotFloats + 4 * t]);
          const float key_scale[4] = {sk.x, sk.y, sk.z, sk.w};
          CUTLASS_PRAGMA_UNROLL
          for (int e = 0; e < 8; ++e) tSrS(8 * j + e) *= key_scale[2 * (e / 4) + e % 2];
        }
      }
      // The slot's keys are its rows [lo, hi) (load.cuh, producer_tma_fp8), 16 bits per slot: a whole
      // slot is hi 16, lo 0. Most tiles are whole (a run's last slot is the partial one), so one
      // uniform branch skips the per-element masks, which predicated cost 4-5 instructions a score.
      bool whole = true;
      CUTLASS_PRAGMA_UNROLL
      for (int w = 0; w < Tr::kCountWords; ++w) whole &= counts[w] == (Tr::kSlotRows | Tr::kSlotRows << 16);
      if (!whole) {
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < Tr::kSlots; ++j) {
          const uint32_t keys = counts[j / 2] >> (16 * (j % 2));
          const int hi = keys & 0xff, lo = (keys >> 8) & 0xff;
          if (lo > 0 || hi < Tr::kSlotRows) {
            CUTLASS_PRAGMA_UNROLL
            for (int e = 0; e < 8; ++e) {
              // Value i = 8 j + e: group g = 2 j + e / 4 (gg = e / 4 within the slot), column c.
              const int i = 8 * j + e, key = 4 * t + 2 * (e / 4) + e % 2;
              if (key < lo || key >= hi) tSrS(i) = -INFINITY;
            }
          }
        }
      }
      update_rows(rescale, __log2f(fp8->p_scale), !Tr::kSumQuantised && !Tr::kSumByMma);
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
  // After the softmax of a tile: waits for the warpgroup's P V of the previous tile (in flight
  // during the softmax), frees its V stage and rescales O, skipping the 64 multiplies where no row of
  // the warp has a new maximum (a factor of exactly 1: most tiles after the first few).
  //
  // The waits sit behind that uniform branch, in blocks of their own, not in the softmax's block:
  // there ptxas placed the wgmma wait at the top of the block, above the whole softmax (the wait has no
  // operands, so nothing keeps it below), and the softmax ran after the P V instead of beside it,
  // in both kernels (cuobjdump -sass, 2026-12-07). A second wait when the first ran returns at once.
  auto finish_pv = [&](uint64_t& v_empty, const float(&rescale)[2]) {
    if (__any_sync(0xffffffffu, rescale[0] != 1.0f || rescale[1] != 1.0f)) {
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
      rescale_o(rescale);
    }
    warpgroup_wait<0>();
    free_stage(v_empty);
    warpgroup_fence_operand(tOrO);
  };
  auto convert_p = [&] {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tSrS); ++i) tOrP(i) = static_cast<T>(tSrS(i));
  };
  // The e4m3 kernel's P into the A operand: register (row half rh, key half kh) of 32-key block kb
  // holds keys 4t..4t+3 of its 16, which (K's rows permuted, traits.cuh) are the accumulator's
  // columns 2t, 2t+1, 8+2t, 9+2t of those 16: values i0, i0+1, i0+4, i0+5 with i0 = 4 (4 kb + 2 kh) +
  // 2 rh. With the quantised sum, each row adds its decoded P, in f16 pairs per 32 keys (exact
  // below 2048, 11 bits beyond) and then in fp32.
  auto convert_p_fp8 = [&] {
    auto regs = recast<uint32_t>(tOrP);
    float quantised[2] = {0.0f, 0.0f};
    CUTLASS_PRAGMA_UNROLL
    for (int kb = 0; kb < kBlockN / 32; ++kb) {
      __half2 block_sum[2] = {__float2half2_rn(0.0f), __float2half2_rn(0.0f)};
      CUTLASS_PRAGMA_UNROLL
      for (int kh = 0; kh < 2; ++kh) CUTLASS_PRAGMA_UNROLL
      for (int rh = 0; rh < 2; ++rh) {
        const int i0 = 4 * (4 * kb + 2 * kh) + 2 * rh;
        const uint16_t lo = e4m3x2_of(tSrS(i0), tSrS(i0 + 1)), hi = e4m3x2_of(tSrS(i0 + 4), tSrS(i0 + 5));
        regs(rh + 2 * kh + 4 * kb) = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
        if (Tr::kSumQuantised)
          block_sum[rh] = __hadd2(block_sum[rh], __hadd2(half2_of_e4m3x2(lo), half2_of_e4m3x2(hi)));
      }
      if (Tr::kSumQuantised) {
        CUTLASS_PRAGMA_UNROLL
        for (int rh = 0; rh < 2; ++rh) {
          const float2 f = __half22float2(block_sum[rh]);
          quantised[rh] += f.x + f.y;
        }
      }
    }
    if (Tr::kSumQuantised) {
      row_sum[0] += quantised[0];
      row_sum[1] += quantised[1];
    }
  };
  // The steps of one key tile, for either kernel. The e4m3 kernel's key scales arrive with the
  // tile's V (its K stage is freed before the softmax), so it waits for them; with one K scale per
  // head there are none, and V need not have landed before its P V.
  auto tile_softmax = [&](int n, int stage, int phase, int keys, const Counts& counts, float(&rescale)[2]) {
    if constexpr (Tr::kFp8) {
      if constexpr (!Tr::kHeadKeyScale) Barrier::wait(&s.v_full[stage], phase);
      softmax_fp8(stage, counts, rescale);
    } else {
      softmax(n, keys, counts, rescale);
    }
  };
  auto tile_convert = [&] {
    if constexpr (Tr::kFp8) {
      convert_p_fp8();
    } else {
      convert_p();
    }
  };

  // Ping-pong (FA3): the two warpgroups take turns to issue their MMAs, so that one's softmax runs
  // while the other's MMAs hold the tensor cores. Every warpgroup takes the same number of turns
  // per item, active or not.
  auto wait_turn = [&] { cutlass::arch::NamedBarrier::sync(256, kTurnBarrier + wg); };
  auto pass_turn = [&] { cutlass::arch::NamedBarrier::arrive(256, kTurnBarrier + 1 - wg); };
  auto empty_turn = [&] {
    wait_turn();
    pass_turn();
  };
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
    // The e4m3 kernel: the rows' query scales (read from global memory, as an item may start at any
    // row, where a TMA box may not; rows past the item's end read the next rows or 0).
    const auto row_of = [&](int r) { return (split ? 0 : 64 * wg) + 16 * warp + lane / 4 + 8 * r; };
    const auto query_scale = [&](int r) {
      const int local = row_of(r);
      float sq = local < it.rows ? fp8->q_scale[static_cast<int64_t>(it.bh) * p.seq_q + it.q_begin + local] : 0.0f;
      if constexpr (Tr::kHeadKeyScale) sq *= fp8->k_scale[static_cast<int64_t>(it.bh) * fp8->v_keys];  // the head's sk
      return sq;
    };
    if constexpr (Tr::kFp8) {
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < 2; ++r) {
        // A group of zero queries has scale 0 and every score 0: any positive factor gives its uniform
        // softmax, while 0 would make -inf x 0 (masked keys, the first tile's maximum) NaN.
        const float sq = query_scale(r);
        row_factor[r] = (sq == 0.0f ? 1.0f : sq) * scale_log2;
      }
    }
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
        empty_turn();
        release(n);
      }
      if (n_blocks > 0) empty_turn();
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
      free_stage(s.k_empty[stage]);
      tile_softmax(first, stage, phase, it.keys, counts, rescale);
      tile_convert();
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
        free_stage(s.k_empty[stage]);
        tile_softmax(n, stage, phase, it.keys, counts, rescale);
        finish_pv(s.v_empty[prev_stage], rescale);
        tile_convert();
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
    if (split && wg == 1 && n_blocks % 2 == 1) empty_turn();
    tile_count += n_blocks;
    if (split) {
      // Warpgroup 1's O, row maxima and partial sums go through shared memory (its O through the Q
      // buffer, free once both warpgroups' last Q K^T is done); warpgroup 0 rescales both halves to
      // the larger maximum and adds them. Same thread, same fragment: element i of thread t sits at
      // i * 128 + t.
      float* merge_o = Tr::merge_o(s);
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
          own[r] = fast_exp2((row_max[r] - m) * factor(r));  // both halves saw a key: m is finite
          other[r] = fast_exp2((m1 - m) * factor(r));
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
    // The e4m3 kernel's epilogue takes the rows' query scales and the smoothing's LSE term, read
    // again now (registers are short until the main loop is done).
    float row_sq[2] = {1.0f, 1.0f}, lse_shift[2] = {0.0f, 0.0f};
    if constexpr (Tr::kFp8) {
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < 2; ++r) {
        const int local = row_of(r);
        row_sq[r] = query_scale(r);
        if (fp8->lse_shift != nullptr && local < it.rows)
          lse_shift[r] = fp8->lse_shift[static_cast<int64_t>(it.bh) * p.seq_q + it.q_begin + local];
      }
    }
    Barrier::arrive(&s.q_empty);     // Q of this item is no longer read
    if (split && wg == 1) continue;  // warpgroup 0 writes the merged rows

    if constexpr (Tr::kFp8) {
      // The epilogue's units: the row maximum of the logits over scale (x sq_i), the sum in units of
      // P (over p_scale); the output takes sv_d / p_scale per channel.
      float logit_max[2], p_sum[2];
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < 2; ++r) {
        logit_max[r] = row_max[r] * row_sq[r];
        p_sum[r] = (Tr::kSumByMma ? tOrO(Tr::kHeadDim / 2 + 2 * r) : row_sum[r]) / fp8->p_scale;
      }
      epilogue.store(it, wg, warp, lane, tOrO, logit_max, p_sum, lse_shift);
    } else {
      epilogue.store(it, wg, warp, lane, tOrO, row_max, row_sum);
    }
  }
  if (wg == 0) wait_turn();  // takes warpgroup 1's last pass, so no arrival is left on a barrier
}

}  // namespace sapattn::cuda::attn::sm90
