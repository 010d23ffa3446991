// SVG-EAR's centroid compensation on Hopper (sm_90a) tensor cores: ear_compensation_tc.cu's contract
// and numerics model, computed as a dense, masked flash-attention with wgmma (docs/ear.md, "The
// compensation on wgmma"). The mma.sync kernel gathers each query cluster's skipped pseudo-keys into
// a list; here every query row meets every pseudo-key tile of its head, in the order of the operand
// matrix [Ck, Dp] (TMA boxes, no gather, no list), and a kept or empty pseudo-key gets the logit
// bias -inf, so it weighs exactly 0. At density d that is 1 / (1 - d) of the gathered kernel's MMA
// work, and in exchange:
//   - the K and V tiles are the same for every row of a head, so a work item may hold rows of
//     several query clusters: 8 slots of 16 sorted rows, each slot within one cluster, so a cluster
//     pads to 16 rows (not to 128), and every item has the same cost;
//   - the bias of a slot is one row of a dense [Cq, Ck_pad] matrix, loaded with the tile;
//   - the kernel is FA3's shape: a producer warpgroup (TMA for K, V and the bias rows; warps 1-3
//     gather the item's rows of q into a double-buffered Q tile) and two consumer warpgroups of 64
//     rows that take turns at the tensor cores (ping-pong), with S = Q K^T (SS wgmma) and O += P V
//     (RS wgmma) software-pipelined as in the attention kernel (attention/sm90/mainloop.cuh).
//
// Launches, after ear_compensation_tc.cu's label sort and operands (kbar, vbar as bf16 [BH, Ck_pad,
// Dp], zero rows past Ck; log|K_j|):
//   1. slot_plan_kernel: per (b,h), each query cluster's sorted rows cut into 16-row slots, the slots
//      of all clusters packed in cluster order (a block scan of ceil(|Q_a| / 16)), and their count;
//   2. bias_kernel: bias[bh, a, j] = (log|K_j| + spread_aj) log2 e where cluster a skips pseudo-key j,
//      -inf where it keeps it, where j is empty or past Ck;
//   3. compensation_sm90_kernel: one persistent CTA per SM walks the items (b,h)-major, statically.
//
// Numerics: those of the mma.sync kernel (q, kbar rounded to bf16, fp32 accumulation; P and V bf16
// operands of P V; fp32 row sums and merge), except that the bias is added to the fp32 dot product
// by one FMA in the log2 domain instead of starting the accumulators: fewer roundings, within the
// same bound. A row whose cluster skips nothing (every bias -inf) keeps its exact part bit for bit.
// Deterministic: a row's result depends on its own q and its cluster's bias row only.
#include <cuda.h>  // CUtensorMap

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cub/block/block_scan.cuh>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/tensor.hpp>

#include "cuda/ear/ear.cuh"
#include "cuda/ear/ear_internal.hpp"
#include "cuda/runtime/device.cuh"
#include "cuda/runtime/primitives.cuh"
#include "cuda/runtime/tensor_map.hpp"

namespace sapattn::cuda::ear_sm90 {

using namespace cute;
using Barrier = cutlass::arch::ClusterBarrier;
using ear::Strided4;

constexpr int kSm90Threads = 384;  // warpgroup 0 loads, warpgroups 1 and 2 compute
constexpr int kProducerRegs = 72;  // 128 x 72 + 256 x 216 = 64512 <= the 384 x 168 the launch holds
constexpr int kConsumerRegs = 216;
constexpr int kConsumers = 256;
constexpr int kGatherers = 96;                         // producer warps 1-3: the items' rows and Q
constexpr int kTurnBarrier = 0;                        // CUTLASS user barriers 0 and 1: the consumer warpgroups' turns
constexpr int kGatherBarrier = 2;                      // the gatherers: an item's rows are listed
constexpr int kSlotRows = ear::kCompensationSlotRows;  // 16: one warp's rows of an m64 wgmma
constexpr int kSlots = 8;                              // per item
constexpr int kItemRows = kSlots * kSlotRows;          // 128: 64 per consumer warpgroup
constexpr int kTileN = ear::kCompensationTile;         // 128 pseudo-keys per tile
constexpr int kQBuffers = 2;                           // the next item's rows load while the current one computes
constexpr int kPlanThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kSlots % 4 == 0 && kItemRows == 2 * 64);

// What the gatherers publish with an item's Q: its (b,h) (-1: no item left) and each slot's query
// cluster (-1: an empty slot).
struct ItemInfo {
  int32_t bh;
  int32_t cluster[kSlots];
};

template <int Dp>
struct Traits {
  using T = cutlass::bfloat16_t;
  static constexpr int kDim = Dp;
  static constexpr int kChunks = Dp / 8;            // 16-byte chunks per row
  static constexpr int kColBlocks = Dp / 64;        // 128-byte-wide TMA boxes per row
  static constexpr int kStages = Dp == 64 ? 4 : 2;  // as deep as 227 KB of shared memory allows
  static constexpr uint32_t kTileBytes = kTileN * Dp * 2;
  static constexpr uint32_t kBiasBytes = kTileN * 4;  // one slot's bias row of a tile

  using SmemAtom = decltype(GMMA::Layout_K_SW128_Atom<T>{});
  // Q: (row of a warpgroup, d, warpgroup + 2 buffer); K and V: (key, d, stage).
  using LayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<_64, Int<Dp>, Int<2 * kQBuffers>>{}));
  using LayoutK = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kTileN>, Int<Dp>, Int<kStages>>{}));
  // V^T (d x keys x stages) over V's memory: the B operand of P V, MN-major.
  using LayoutVt = decltype(composition(
      LayoutK{}, make_ordered_layout(Shape<Int<Dp>, Int<kTileN>, Int<kStages>>{}, Step<_2, _1, _3>{})));
  using MmaQK = decltype(make_tiled_mma(GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kTileN>, Int<Dp>>>()));
  using MmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<T, T, float, Shape<_64, Int<Dp>, Int<kTileN>>, GMMA::Major::K, GMMA::Major::MN>()));

  struct Smem {
    array_aligned<T, cosize_v<LayoutQ>, 1024> q;
    array_aligned<T, cosize_v<LayoutK>, 1024> k;
    array_aligned<T, cosize_v<LayoutK>, 1024> v;
    alignas(16) float bias[kStages][kSlots][kTileN];  // log2 units; arrives with the K tile
    int32_t rows[kQBuffers][kItemRows];               // token row of each item row, -1 for none
    ItemInfo info[kQBuffers];
    uint64_t q_full[kQBuffers], q_empty[kQBuffers];
    uint64_t k_full[kStages], k_empty[kStages], v_full[kStages], v_empty[kStages];
  };
  static_assert(sizeof(Smem) <= 227 * 1024, "more shared memory than an H100 SM gives a block");
};

// The kernel's parameters; a __grid_constant__ parameter, so that TMA reads the maps from there.
struct Args : ear::CompensationIo {
  CUtensorMap k_map, v_map;   // the operands [BH, Ck_pad, Dp] bf16 as (Dp, Ck_pad, BH), boxes of 64 x kTileN
  bool q_async;               // bf16 q whose row chunks cp.async can copy (else loaded and converted)
  const int4* slots;          // [BH, max_slots]: (cluster, first sorted row, rows, 0); cluster -1: empty
  const int32_t* slot_count;  // [BH]
  const float* bias;          // [BH, Cq, Ck_pad], log2 units
  int64_t max_slots, items;   // items: BH * max_slots / kSlots, the live ones and the rest
  int ck_pad, tiles;
  float scale_log2;  // scale * log2 e
};

// A barrier wait after which this thread reads what other threads stored before they arrived.
__device__ __forceinline__ void wait_for(uint64_t* bar, int phase) {
  Barrier::wait(bar, phase);
  asm volatile("" ::: "memory");  // keep the reads below the wait
}

// ---------------------------------------------------------------------------------------------
// Planning kernels
// ---------------------------------------------------------------------------------------------

// One block per (b,h): slot s of the head holds sorted rows [row0, row0 + count) of query cluster a;
// slots past the last cluster's, up to the next multiple of kSlots, are empty (cluster -1).
__global__ void __launch_bounds__(kPlanThreads)
    slot_plan_kernel(const int32_t* __restrict__ offsets, int64_t Cq, int64_t max_slots, int4* __restrict__ slots,
                     int32_t* __restrict__ slot_count) {
  using Scan = cub::BlockScan<int, kPlanThreads>;
  __shared__ typename Scan::TempStorage temp;
  const int64_t bh = blockIdx.x;
  const int32_t* off = offsets + bh * (Cq + 1);
  int4* out = slots + bh * max_slots;
  int carry = 0;  // slots of the clusters before this chunk
  for (int64_t a0 = 0; a0 < Cq; a0 += kPlanThreads) {
    const int64_t a = a0 + threadIdx.x;
    const int32_t row0 = a < Cq ? off[a] : 0, n = a < Cq ? off[a + 1] - row0 : 0;
    const int mine = (n + kSlotRows - 1) / kSlotRows;
    int first = 0, total = 0;
    Scan(temp).ExclusiveSum(mine, first, total);
    for (int k = 0; k < mine; ++k)
      out[carry + first + k] =
          make_int4(static_cast<int>(a), row0 + k * kSlotRows, min_of(kSlotRows, n - k * kSlotRows), 0);
    carry += total;
    __syncthreads();  // the scan's storage is reused
  }
  const int end = (carry + kSlots - 1) / kSlots * kSlots;
  for (int t = carry + static_cast<int>(threadIdx.x); t < end; t += kPlanThreads) out[t] = make_int4(-1, 0, 0, 0);
  if (threadIdx.x == 0) slot_count[bh] = carry;
}

// One block per (b,h, query cluster a): its bias row over the Ck_pad pseudo-key columns.
__global__ void __launch_bounds__(256)
    bias_kernel(Strided4<const uint8_t> mask, Strided4<const float> spread, const float* __restrict__ log_size,
                int64_t H, int64_t Cq, int Ck, int ck_pad, int per_column, float* __restrict__ bias) {
  const int64_t row = blockIdx.x, a = row % Cq, bh = row / Cq, b = bh / H, h = bh % H;
  const uint8_t* mask_row = &mask.at(b, h, a, 0);
  const float* sizes = log_size + bh * Ck;
  float* out = bias + row * ck_pad;
  for (int j = threadIdx.x; j < ck_pad; j += blockDim.x) {
    float x = -INFINITY;
    if (j < Ck && sizes[j] != -INFINITY && mask_row[static_cast<int64_t>(j / per_column) * mask.s3] == 0) {
      float logit = sizes[j];
      if (spread.data != nullptr) logit += spread.at(b, h, a, j);
      x = logit * kLog2e;
    }
    out[j] = x;
  }
}

// ---------------------------------------------------------------------------------------------
// Producer warpgroup
// ---------------------------------------------------------------------------------------------

// The CTA's next item at or after `index` (index += gridDim.x) that holds a slot; a.items if none.
__device__ __forceinline__ int64_t next_item(const Args& a, int64_t index) {
  const int64_t per_head = a.max_slots / kSlots;
  for (; index < a.items; index += gridDim.x)
    if ((index % per_head) * kSlots < a.slot_count[index / per_head]) break;
  return index;
}

// Pulls a row's output and lse into L2 for the consumers' merge (L1 would not keep them).
__device__ __forceinline__ void prefetch_row(const Args& a, int64_t b, int64_t h, int32_t token) {
  prefetch_l2(a.lse + b * a.lse_stride[0] + h * a.lse_stride[1] + token * a.lse_stride[2]);
  const int64_t bytes = a.out_dtype == DType::F32 ? 4 : 2;
  const char* row =
      static_cast<const char*>(a.out) + (b * a.out_stride[0] + h * a.out_stride[1] + token * a.out_stride[2]) * bytes;
  if (a.out_stride[3] != 1) {
    prefetch_l2(row);
    return;
  }
  for (int64_t at = 0; at < a.D * bytes; at += 128) prefetch_l2(row + at);
  prefetch_l2(row + a.D * bytes - 1);
}

// Warps 1-3 (thread g of 96): per item, its token rows and slot clusters (published with Q), then Q:
// cp.async of 16-byte chunks for bf16 rows it can copy, else loaded, rounded to bf16 and stored (2
// chunks in flight per thread; 4 spill at kProducerRegs), zeros for empty rows and past D. Each
// thread arrives on q_full twice: once when its copies land (cp.async.mbarrier.arrive.noinc), once
// for its stores.
template <class Tr, typename TQ>
__device__ void gather_items(const Args& a, typename Tr::Smem& s, int g) {
  constexpr int kChunks = Tr::kChunks, kTotal = kItemRows * kChunks, kBatch = 2;
  auto sQ = make_tensor(make_smem_ptr(s.q.data()), typename Tr::LayoutQ{});
  const int64_t per_head = a.max_slots / kSlots;
  int item_count = 0;
  for (int64_t index = next_item(a, blockIdx.x);; index = next_item(a, index + gridDim.x), ++item_count) {
    const int buf = item_count % kQBuffers;
    Barrier::wait(&s.q_empty[buf], ((item_count / kQBuffers) & 1) ^ 1);
    if (index >= a.items) {  // none left: the TMA thread and the consumers stop at this buffer
      if (g == 0) s.info[buf].bh = -1;
      cutlass::arch::cpasync_barrier_arrive_noinc(&s.q_full[buf]);
      Barrier::arrive(&s.q_full[buf]);
      break;
    }
    const int64_t bh = index / per_head, b = bh / a.H, h = bh % a.H;
    const int4* slots = a.slots + bh * a.max_slots + (index % per_head) * kSlots;
    for (int r = g; r < kItemRows; r += kGatherers) {
      const int4 e = slots[r / kSlotRows];
      const int k = r % kSlotRows;
      const int32_t token = e.x >= 0 && k < e.z ? a.order[bh * a.N + e.y + k] : -1;
      s.rows[buf][r] = token;
      if (k == 0) s.info[buf].cluster[r / kSlotRows] = e.x;
      if (token >= 0) prefetch_row(a, b, h, token);
    }
    if (g == 0) s.info[buf].bh = static_cast<int32_t>(bh);
    cutlass::arch::NamedBarrier::sync(kGatherers, kGatherBarrier);  // every row is listed

    const TQ* q = static_cast<const TQ*>(a.q) + b * a.q_stride[0] + h * a.q_stride[1];
    bool copied = false;
    if constexpr (std::is_same_v<TQ, __nv_bfloat16>) {
      if (a.q_async) {
        for (int c = g; c < kTotal; c += kGatherers) {
          const int row = c / kChunks, ch = c % kChunks;
          const int32_t t = s.rows[buf][row];
          const bool valid = t >= 0 && ch * 8 < a.D;
          cp_async16_zfill(cast_smem_ptr_to_uint(&sQ(row % 64, ch * 8, row / 64 + 2 * buf)),
                           valid ? q + t * a.q_stride[2] + ch * 8 : q, valid);
        }
        copied = true;
      }
    }
    if (!copied) {
      for (int c0 = g; c0 < kTotal; c0 += kBatch * kGatherers) {
        float f[kBatch][8];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int c = c0 + u * kGatherers;
          const int32_t t = c < kTotal ? s.rows[buf][c / kChunks] : -1;
          ear::load8(t >= 0 ? q + t * a.q_stride[2] : nullptr, a.q_stride[3], (c % kChunks) * 8, a.D, f[u]);
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int c = c0 + u * kGatherers;
          if (c < kTotal)
            *reinterpret_cast<uint4*>(&sQ(c / kChunks % 64, c % kChunks * 8, c / kChunks / 64 + 2 * buf)) =
                ear::pack8_bf16(f[u]);
        }
      }
    }
    cutlass::arch::cpasync_barrier_arrive_noinc(&s.q_full[buf]);
    cutlass::arch::fence_view_async_shared();  // the stores, visible to wgmma (the async proxy)
    Barrier::arrive(&s.q_full[buf]);
  }
  cute::cp_async_wait<0>();  // leave no copy in flight behind an exiting thread
}

// Lane 0 of warp 0: per item (as the gatherers publish them), every pseudo-key tile of the head: K
// with the bias rows of the item's live slots on k_full, then V on v_full.
template <class Tr>
__device__ void load_tiles(const Args& a, typename Tr::Smem& s) {
  constexpr int kAtomElems = 8 * 64;  // one 8 x 64 swizzle atom
  constexpr int Dp = Tr::kDim;
  int tile_count = 0;
  for (int item_count = 0;; ++item_count) {
    const int buf = item_count % kQBuffers;
    wait_for(&s.q_full[buf], (item_count / kQBuffers) & 1);
    const ItemInfo info = s.info[buf];
    if (info.bh < 0) break;
    uint32_t live = 0;
#pragma unroll
    for (int j = 0; j < kSlots; ++j) live += info.cluster[j] >= 0 ? 1 : 0;
    const float* bias = a.bias + static_cast<int64_t>(info.bh) * a.Cq * a.ck_pad;
    for (int n = 0; n < a.tiles; ++n, ++tile_count) {
      const int stage = tile_count % Tr::kStages, phase = (tile_count / Tr::kStages) & 1;
      Barrier::wait(&s.k_empty[stage], phase ^ 1);
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&s.k_full[stage],
                                                                     Tr::kTileBytes + live * Tr::kBiasBytes);
      for (int cb = 0; cb < Tr::kColBlocks; ++cb)
        tma_load_3d(&a.k_map, &s.k_full[stage], s.k.data() + stage * kTileN * Dp + cb * (kTileN / 8) * kAtomElems,
                    cb * 64, n * kTileN, info.bh);
      for (int j = 0; j < kSlots; ++j)
        if (info.cluster[j] >= 0)
          bulk_load(s.bias[stage][j], bias + static_cast<int64_t>(info.cluster[j]) * a.ck_pad + n * kTileN,
                    Tr::kBiasBytes, &s.k_full[stage]);
      Barrier::wait(&s.v_empty[stage], phase ^ 1);
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&s.v_full[stage], Tr::kTileBytes);
      for (int cb = 0; cb < Tr::kColBlocks; ++cb)
        tma_load_3d(&a.v_map, &s.v_full[stage], s.v.data() + stage * kTileN * Dp + cb * (kTileN / 8) * kAtomElems,
                    cb * 64, n * kTileN, info.bh);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Consumer warpgroups
// ---------------------------------------------------------------------------------------------

// The merge of this thread's two rows (row lane / 4 + 8 r of the warp's slot) with their exact
// part: O and the row statistics from the main loop, the old lse read at the item's start. The
// quad's four lanes hold a row's columns 8 g + 2 (lane % 4) + {0, 1}; lane 0 of the quad writes lse.
// A row with no skipped pseudo-key (sum 0) or no token is left as it is.
template <typename TO, int Dp, class FragO>
__device__ __forceinline__ void store_rows(const Args& a, int64_t bh, const int32_t (&token)[2],
                                           const float (&old_lse)[2], const FragO& tOrO, const float (&row_max)[2],
                                           const float (&row_sum)[2], int lane) {
  const int64_t b = bh / a.H, h = bh % a.H;
  TO* out = static_cast<TO*>(a.out) + b * a.out_stride[0] + h * a.out_stride[1];
  float* lse = a.lse + b * a.lse_stride[0] + h * a.lse_stride[1];
  const int t4 = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (token[r] < 0 || sum == 0.0f) continue;  // the same in the quad
    const ear::RowMerge m = ear::merge_row(old_lse[r], row_max[r], sum);
    TO* o = out + token[r] * a.out_stride[2];
    // Every old value first, so that the loads are in flight together.
    float prev[Dp / 8][2];
#pragma unroll
    for (int g = 0; g < Dp / 8; ++g)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int64_t d = 8 * g + 2 * t4 + c;
        prev[g][c] = d < a.D ? to_f32(o[d * a.out_stride[3]]) : 0.0f;
      }
#pragma unroll
    for (int g = 0; g < Dp / 8; ++g)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int64_t d = 8 * g + 2 * t4 + c;
        if (d < a.D) o[d * a.out_stride[3]] = from_f32<TO>(m.keep * prev[g][c] + m.add * tOrO(4 * g + 2 * r + c));
      }
    if (t4 == 0) lse[token[r] * a.lse_stride[2]] = m.lse;
  }
}

template <class Tr>
__device__ void consume(const Args& a, typename Tr::Smem& s) {
  using T = typename Tr::T;
  constexpr int Dp = Tr::kDim;
  const int wg = threadIdx.x / 128 - 1;  // 0 or 1: slots [4 wg, 4 wg + 4) of an item
  const int thread = threadIdx.x % 128, lane = thread % 32, warp = thread / 32, t4 = lane % 4;
  const int slot = 4 * wg + warp;  // the m64 wgmma's warp w holds rows [16 w, 16 w + 16)

  auto sQ = make_tensor(make_smem_ptr(s.q.data()), typename Tr::LayoutQ{});
  auto sK = make_tensor(make_smem_ptr(s.k.data()), typename Tr::LayoutK{});
  auto sVt = make_tensor(make_smem_ptr(s.v.data()), typename Tr::LayoutVt{});
  typename Tr::MmaQK mma_qk;
  typename Tr::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_slice(thread);
  auto thr_pv = mma_pv.get_slice(thread);
  auto tSrQ = thr_qk.partition_fragment_A(sQ);   // (MMA, MMA_M, MMA_K, warpgroup + 2 buffer)
  auto tSrK = thr_qk.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, stage)
  auto tOrV = thr_pv.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, stage)
  auto tSrS = partition_fragment_C(mma_qk, Shape<_64, Int<kTileN>>{});
  auto tOrO = partition_fragment_C(mma_pv, Shape<_64, Int<Dp>>{});
  // P as the A operand of P V: the accumulator's register order is (col pair, row half, 8-col
  // group), the A fragment's is (col pair, row half, k half, 16-col block): the same flat order.
  auto tOrP = make_tensor<T>(Layout<Shape<Shape<_2, _2, _2>, _1, Int<kTileN / 16>>>{});
  static_assert(size(tOrP) == size(tSrS));

  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
  auto issue_qk = [&](int stage, int block) {
    warpgroup_fence_operand(tSrS);
    warpgroup_arrive();
    mma_qk.accumulate_ = GMMA::ScaleOut::Zero;
    CUTLASS_PRAGMA_UNROLL
    for (int kb = 0; kb < size<2>(tSrQ); ++kb) {
      cute::gemm(mma_qk, tSrQ(_, _, kb, block), tSrK(_, _, kb, stage), tSrS);
      mma_qk.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
  };
  auto issue_pv = [&](int stage) {
    warpgroup_fence_operand(tOrO);
    warpgroup_arrive();
    cute::gemm(mma_pv, tOrP, tOrV(_, _, _, stage), tOrO);
    warpgroup_commit_batch();
  };
  // The online softmax of the tile in tSrS (stage's bias rows), in the log2 domain: x = s scale log2 e
  // + bias (-inf for a kept or empty pseudo-key); exp2(x - max) is left in tSrS, and rescale is what
  // O must be multiplied by. A row all of whose pseudo-keys so far are masked stays at max -inf
  // (exponent base 0, so no -inf - -inf), its sum and O at 0.
  auto softmax = [&](int stage, float(&rescale)[2]) {
    warpgroup_fence_operand(tSrS);
    const float* bias = s.bias[stage][slot];
    float mx[2] = {row_max[0], row_max[1]};
    // Accumulator value (c, r, g) is row lane/4 + 8r (+16 warp), column 8g + 2(lane%4) + c.
    CUTLASS_PRAGMA_UNROLL
    for (int g = 0; g < kTileN / 8; ++g) {
      const float2 bg = *reinterpret_cast<const float2*>(bias + 8 * g + 2 * t4);
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < 2; ++r) {
        const float x0 = fmaf(tSrS(4 * g + 2 * r), a.scale_log2, bg.x);
        const float x1 = fmaf(tSrS(4 * g + 2 * r + 1), a.scale_log2, bg.y);
        tSrS(4 * g + 2 * r) = x0;
        tSrS(4 * g + 2 * r + 1) = x1;
        mx[r] = fmaxf(mx[r], fmaxf(x0, x1));
      }
    }
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float base = mx[r] == -INFINITY ? 0.0f : mx[r];
      rescale[r] = fast_exp2(row_max[r] - base);
      row_max[r] = mx[r];
      float sum = 0.0f;
      CUTLASS_PRAGMA_UNROLL
      for (int g = 0; g < kTileN / 8; ++g) CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < 2; ++c) {
        const float e = fast_exp2(tSrS(4 * g + 2 * r + c) - base);
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
  // while the other's MMAs hold the tensor cores; both take a.tiles + 1 turns per item.
  auto wait_turn = [&] { cutlass::arch::NamedBarrier::sync(kConsumers, kTurnBarrier + wg); };
  auto pass_turn = [&] { cutlass::arch::NamedBarrier::arrive(kConsumers, kTurnBarrier + 1 - wg); };
  if (wg == 1) pass_turn();  // warpgroup 0 goes first

  int tile_count = 0;  // key tiles consumed so far: the stage ring's position
  for (int item_count = 0;; ++item_count) {
    const int buf = item_count % kQBuffers;
    wait_for(&s.q_full[buf], (item_count / kQBuffers) & 1);
    const int32_t bh = s.info[buf].bh;
    if (bh < 0) break;
    const int block = wg + 2 * buf;
    // The rows' tokens and their exact part's lse (no one else writes them during the item).
    int32_t token[2];
    float old_lse[2];
    const float* lse = a.lse + bh / a.H * a.lse_stride[0] + bh % a.H * a.lse_stride[1];
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < 2; ++r) {
      token[r] = s.rows[buf][64 * wg + 16 * warp + lane / 4 + 8 * r];
      old_lse[r] = token[r] >= 0 ? lse[token[r] * a.lse_stride[2]] : 0.0f;
    }
    row_max[0] = row_max[1] = -INFINITY;
    row_sum[0] = row_sum[1] = 0.0f;
    clear(tOrO);
    const auto stage_of = [&](int n) { return (tile_count + n) % Tr::kStages; };
    const auto phase_of = [&](int n) { return ((tile_count + n) / Tr::kStages) & 1; };

    // Software pipeline within the warpgroup (FA3's intra-warpgroup overlap): the softmax of tile n
    // runs while the tensor cores compute P V of the previous tile. A K stage (with its bias rows)
    // is freed once the softmax has read the bias.
    float rescale[2];
    int stage = stage_of(0), phase = phase_of(0);
    wait_for(&s.k_full[stage], phase);
    wait_turn();
    issue_qk(stage, block);
    pass_turn();
    warpgroup_wait<0>();
    softmax(stage, rescale);
    Barrier::arrive(&s.k_empty[stage]);
    convert_p();
    for (int n = 1; n < a.tiles; ++n) {
      const int prev_stage = stage, prev_phase = phase;
      stage = stage_of(n);
      phase = phase_of(n);
      wait_for(&s.k_full[stage], phase);
      Barrier::wait(&s.v_full[prev_stage], prev_phase);
      wait_turn();
      issue_qk(stage, block);
      issue_pv(prev_stage);
      pass_turn();
      warpgroup_wait<1>();  // S of tile n is ready; P V of the previous tile may still run
      softmax(stage, rescale);
      Barrier::arrive(&s.k_empty[stage]);
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
    tile_count += a.tiles;

    switch (a.out_dtype) {
      case DType::F32:
        store_rows<float, Dp>(a, bh, token, old_lse, tOrO, row_max, row_sum, lane);
        break;
      case DType::F16:
        store_rows<__half, Dp>(a, bh, token, old_lse, tOrO, row_max, row_sum, lane);
        break;
      default:
        store_rows<__nv_bfloat16, Dp>(a, bh, token, old_lse, tOrO, row_max, row_sum, lane);
        break;
    }
    Barrier::arrive(&s.q_empty[buf]);  // the item's Q, rows and info are no longer read
  }
  if (wg == 0) wait_turn();  // takes warpgroup 1's last pass, so no arrival is left on a barrier
}

template <int Dp>
__global__ void __launch_bounds__(kSm90Threads, 1) compensation_sm90_kernel(const __grid_constant__ Args a) {
  using Tr = Traits<Dp>;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& s = *reinterpret_cast<typename Tr::Smem*>(smem_raw);
  if (threadIdx.x == 0) {
    for (int i = 0; i < kQBuffers; ++i) {
      Barrier::init(&s.q_full[i], 2 * kGatherers);  // each gatherer's copies and its stores
      Barrier::init(&s.q_empty[i], kConsumers);
    }
    for (int i = 0; i < Tr::kStages; ++i) {
      Barrier::init(&s.k_full[i], 1);
      Barrier::init(&s.v_full[i], 1);
      Barrier::init(&s.k_empty[i], kConsumers);
      Barrier::init(&s.v_empty[i], kConsumers);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x < 128) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (threadIdx.x == 0) {
      load_tiles<Tr>(a, s);
    } else if (threadIdx.x >= 32) {
      const int g = static_cast<int>(threadIdx.x) - 32;
      switch (a.q_dtype) {
        case DType::F32:
          gather_items<Tr, float>(a, s, g);
          break;
        case DType::F16:
          gather_items<Tr, __half>(a, s, g);
          break;
        default:
          gather_items<Tr, __nv_bfloat16>(a, s, g);
          break;
      }
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
    consume<Tr>(a, s);
  }
}

}  // namespace sapattn::cuda::ear_sm90

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

namespace sapattn::cuda::ear {

bool compensation_wgmma_available(int device, const void* workspace) {
  const DeviceArch arch = device_arch(device);
  return arch.major == 9 && arch.minor == 0 && tensor_maps_available() &&
         reinterpret_cast<uintptr_t>(workspace) % 16 == 0;
}

void compensation_wgmma(const CompensationScratch& s, const TensorView& q, const TensorView& mask,
                        const TensorView& spread, int64_t pseudo_keys, float scale, TensorView out, TensorView lse,
                        int device, cudaStream_t stream) {
  namespace k = ear_sm90;
  const int64_t BH = s.sort.batch_heads, N = s.sort.tokens, H = q.shape[1], D = q.shape[3], Cq = mask.shape[2];
  const int64_t Dp = compensation_dim(D), ck_pad = round_up(pseudo_keys, kCompensationTile);
  const int per_column = static_cast<int>(pseudo_keys / mask.shape[3]);
  // 1. The slots, 2. the bias rows.
  k::slot_plan_kernel<<<static_cast<unsigned>(BH), k::kPlanThreads, 0, stream>>>(
      s.offsets, Cq, compensation_slots(N, Cq), s.slots, s.slot_count);
  SAPATTN_CUDA_CHECK_LAUNCH();
  if (Cq > 0) {
    k::bias_kernel<<<static_cast<unsigned>(BH * Cq), 256, 0, stream>>>(
        strided<const uint8_t>(mask), spread.empty() ? Strided4<const float>{} : strided<const float>(spread),
        s.log_size, H, Cq, static_cast<int>(pseudo_keys), static_cast<int>(ck_pad), per_column, s.bias);
    SAPATTN_CUDA_CHECK_LAUNCH();
  }
  // 3. The compensation.
  k::Args a{};
  {
    const uint64_t dims[3] = {static_cast<uint64_t>(Dp), static_cast<uint64_t>(ck_pad), static_cast<uint64_t>(BH)};
    const uint64_t strides[2] = {static_cast<uint64_t>(Dp) * 2, static_cast<uint64_t>(ck_pad * Dp) * 2};
    const uint32_t box[3] = {64, k::kTileN, 1};
    SAPATTN_CHECK(encode_tiled_map(a.k_map, DType::BF16, 3, s.k_operand, dims, strides, box) &&
                      encode_tiled_map(a.v_map, DType::BF16, 3, s.v_operand, dims, strides, box),
                  UnsupportedError, "the driver refused the tensor maps of the compensation's pseudo-keys");
  }
  static_cast<CompensationIo&>(a) = compensation_io(q, s.sort.index_out, N, Cq, out, lse);
  const auto aligned = [](int64_t elements) { return elements * 2 % 16 == 0; };
  a.q_async = q.dtype == DType::BF16 && q.stride[3] == 1 && D % 8 == 0 &&
              reinterpret_cast<uintptr_t>(q.data) % 16 == 0 && aligned(q.stride[0]) && aligned(q.stride[1]) &&
              aligned(q.stride[2]);
  a.slots = s.slots;
  a.slot_count = s.slot_count;
  a.bias = s.bias;
  a.max_slots = compensation_slots(N, Cq);
  a.items = BH * (a.max_slots / k::kSlots);
  a.ck_pad = static_cast<int>(ck_pad);
  a.tiles = static_cast<int>(ck_pad / k::kTileN);
  a.scale_log2 = scale * k::kLog2e;
  if (a.items == 0 || Cq == 0) return;
  const int grid = static_cast<int>(std::min<int64_t>(device_arch(device).sms, a.items));
  auto launch = [&](auto kernel, int smem) {
    set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
    kernel<<<grid, k::kSm90Threads, smem, stream>>>(a);
    SAPATTN_CUDA_CHECK_LAUNCH();
  };
  if (Dp == 64) {
    launch(k::compensation_sm90_kernel<64>, static_cast<int>(sizeof(k::Traits<64>::Smem)));
  } else {
    launch(k::compensation_sm90_kernel<128>, static_cast<int>(sizeof(k::Traits<128>::Smem)));
  }
}

}  // namespace sapattn::cuda::ear
