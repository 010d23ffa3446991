// The wgmma (sm_90a) k-means assignment: labels[i] = argmin_c ||x_i - c||^2 with the output contract
// of the mma.sync kernel (kmeans_assign.cuh, assign_common.cuh): the same prepared operand round(-c),
// accumulators that start at ||c||^2/2 + ||x||^2/2 + M, the same keys, bound and exact re-ranking.
// Instantiated per head dim in assign_sm90_d<D>.cu, generated from assign_sm90_instance.cu.in (sm_90a
// only); docs/cuda.md describes the
// design and what to measure.
//
// A persistent CTA per SM walks items (b,h, a tile of kItemRows points), (b,h)-major, so that the CTAs
// running at one time read the same (b,h)'s centroids from L2. Three warpgroups, as in the Hopper
// attention kernel (attention/sm90/):
//   - producer warpgroup (setmaxnreg 56): lane 0 of warp 0 issues the TMA loads: per item the point
//     tile (bf16/f16 points that a tensor map can describe) into one of two point slots, then every
//     centroid tile of the (b,h) (N rows x D of the prepared operand, 128-byte swizzle) with its N half
//     norms (a bulk copy) into a ring of stages. Where TMA cannot load the points (f32 points, strides
//     that are not multiples of 16 bytes), warps 1-3 load and convert them into the slot instead.
//   - two consumer warpgroups (setmaxnreg 224), kGroupRows = 64 or 128 rows each: per centroid tile an
//     SS wgmma (both operands in shared memory) into fp32 accumulators that start at the norm terms,
//     then the argmin epilogue on the accumulators: two best keys per row. The warpgroups take turns
//     to issue (named barriers, the attention mainloop's ping-pong), so one's epilogue runs while the
//     other's wgmma holds the tensor cores.
// After the item's last tile: the quad merge, labels, and the exact re-ranking of near ties, one warp
// re-ranking its flagged rows two at a time (found by ballots, no shared list).
#pragma once

#include <cuda.h>  // CUtensorMap

#include <iterator>
#include <type_traits>
#include <utility>

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/tensor.hpp>

#include "cuda/kmeans/assign_common.cuh"
#include "cuda/kmeans/kmeans_internal.hpp"
#include "cuda/runtime/device.cuh"
#include "cuda/runtime/primitives.cuh"
#include "cuda/runtime/tensor_map.hpp"

namespace sapattn::cuda::sm90_assign {

using namespace cute;
using Barrier = cutlass::arch::ClusterBarrier;

constexpr int kThreads = 384;      // warpgroup 0 loads, warpgroups 1 and 2 compute
constexpr int kProducerRegs = 72;  // 128 x 72 + 256 x 216 = 64512 <= the 384 x 168 the launch holds
constexpr int kConsumerRegs = 216;
constexpr int kConsumers = 256;
constexpr int kConverters = 96;  // producer warps 1-3, where the points need converting
constexpr int kPointSlots = 2;   // the next item's points load while the current one computes
constexpr int kMaxStages = 4;
constexpr int kSmemLimit = 227 * 1024;  // an H100 SM's dynamic shared memory per block
constexpr int kTurnBarrier = 0;         // CUTLASS user barriers 0 and 1: the consumer warpgroups' turns

template <typename OpT, int D, int GroupRows, int TileN>
struct Traits {
  using Op = OpT;
  using T = std::conditional_t<std::is_same_v<OpT, __half>, cutlass::half_t, cutlass::bfloat16_t>;
  static constexpr int kDim = D;
  static constexpr int kGroupRows = GroupRows;  // point rows per consumer warpgroup
  static constexpr int kMBlocks = GroupRows / 64;
  static constexpr int kItemRows = 2 * GroupRows;
  static constexpr int kTileN = TileN;  // centroids per tile
  static constexpr int kChunks = D / 8;
  static constexpr int kColBlocks = D / 64;  // 128-byte-wide TMA boxes per row
  static constexpr uint32_t kSlotBytes = kItemRows * D * 2;
  static constexpr uint32_t kTileBytes = TileN * D * 2;
  static constexpr uint32_t kNormBytes = TileN * 4;
  static constexpr int kStages = min_of<int>(
      kMaxStages, static_cast<int>((kSmemLimit - kPointSlots * kSlotBytes - 256) / (kTileBytes + kNormBytes)));
  static_assert(GroupRows == 64 || GroupRows == 128, "one or two m64 wgmma blocks per warpgroup");
  static_assert(TileN % 8 == 0 && TileN <= 256, "a wgmma N and a TMA box height");
  static_assert(kStages >= 2, "a double-buffered centroid ring at least");

  using SmemAtom = decltype(GMMA::Layout_K_SW128_Atom<T>{});
  // Points: (row of a warpgroup, d, warpgroup + 2 slot); each (kGroupRows x D) block is one TMA box
  // per 64 columns.
  using LayoutA = decltype(tile_to_shape(SmemAtom{}, Shape<Int<GroupRows>, Int<D>, Int<2 * kPointSlots>>{}));
  using LayoutB = decltype(tile_to_shape(SmemAtom{}, Shape<Int<TileN>, Int<D>, Int<kStages>>{}));
  using Mma = decltype(make_tiled_mma(GMMA::ss_op_selector<T, T, float, Shape<Int<GroupRows>, Int<TileN>, Int<D>>>()));

  struct Smem {
    array_aligned<T, cosize_v<LayoutA>, 1024> a;
    array_aligned<T, cosize_v<LayoutB>, 1024> b;
    alignas(16) float norm[kStages][TileN];  // the tile's ||c||^2 / 2
    uint64_t a_full[kPointSlots], a_empty[kPointSlots];
    uint64_t b_full[kStages], b_empty[kStages];
  };
  static_assert(sizeof(Smem) <= kSmemLimit, "more shared memory than an H100 SM gives a block");
};

// What the kernel reads besides the tensor-core assignment's parameters. A __grid_constant__ kernel
// parameter: TMA reads the maps from there.
struct Args {
  CUtensorMap points;     // [B,H,N,D] as (D, N, H, B), boxes of 64 x kGroupRows (points_tma only)
  CUtensorMap centroids;  // the prepared operand [B*H, c_pad, D] as (D, c_pad, B*H), boxes of 64 x kTileN
  TensorCoreAssignParams p;
  int64_t items;        // B*H * point_tiles
  int64_t point_tiles;  // point tiles per (b,h): ceil(N / kItemRows)
  int tiles;            // centroid tiles per (b,h): c_pad / kTileN
  bool points_tma;      // points come as TMA boxes (else warps 1-3 convert them)
  bool points_f32;      // f32 points (bf16 operands; the re-ranking reads them from global memory)
};

// Item i: (b,h) = i / point_tiles, rows [n0, n0 + kItemRows).
struct Item {
  int64_t bh, b, h, n0;
  __device__ Item(const Args& a, int64_t index, int64_t rows) {
    bh = index / a.point_tiles;
    b = bh / a.p.H;
    h = bh % a.p.H;
    n0 = (index % a.point_tiles) * rows;
  }
};

// ---------------------------------------------------------------------------------------------
// Producer
// ---------------------------------------------------------------------------------------------

// One thread (lane 0 of warp 0) issues every TMA load: per item its points (points_tma), then its
// centroid tiles with their half norms. Both rings keep their own positions (item_count, tile_count).
template <class Tr>
__device__ void load_tiles(const Args& a, typename Tr::Smem& s) {
  using T = typename Tr::T;
  constexpr int kAtomElems = 8 * 64;  // one 8 x 64 swizzle atom
  int tile_count = 0, item_count = 0;
  for (int64_t index = blockIdx.x; index < a.items; index += gridDim.x, ++item_count) {
    const Item it(a, index, Tr::kItemRows);
    if (a.points_tma) {
      const int slot = item_count % kPointSlots;
      Barrier::wait(&s.a_empty[slot], ((item_count / kPointSlots) & 1) ^ 1);
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&s.a_full[slot], Tr::kSlotBytes);
      for (int wg = 0; wg < 2; ++wg)
        for (int cb = 0; cb < Tr::kColBlocks; ++cb) {
          T* dst = s.a.data() + (wg + 2 * slot) * Tr::kGroupRows * Tr::kDim + cb * (Tr::kGroupRows / 8) * kAtomElems;
          tma_load_4d(&a.points, &s.a_full[slot], dst, cb * 64, static_cast<int32_t>(it.n0 + wg * Tr::kGroupRows),
                      static_cast<int32_t>(it.h), static_cast<int32_t>(it.b));
        }
    }
    const float* half_norm = a.p.prepared.half_norm + it.bh * a.p.prepared.c_pad;
    for (int t = 0; t < a.tiles; ++t, ++tile_count) {
      const int stage = tile_count % Tr::kStages;
      Barrier::wait(&s.b_empty[stage], ((tile_count / Tr::kStages) & 1) ^ 1);
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&s.b_full[stage], Tr::kTileBytes + Tr::kNormBytes);
      for (int cb = 0; cb < Tr::kColBlocks; ++cb) {
        T* dst = s.b.data() + stage * Tr::kTileN * Tr::kDim + cb * (Tr::kTileN / 8) * kAtomElems;
        tma_load_3d(&a.centroids, &s.b_full[stage], dst, cb * 64, t * Tr::kTileN, static_cast<int32_t>(it.bh));
      }
      bulk_load(s.norm[stage], half_norm + t * Tr::kTileN, Tr::kNormBytes, &s.b_full[stage]);
    }
  }
}

// Warps 1-3 where TMA cannot load the points: each of the 96 threads converts 16-byte chunks of the
// item's rows (zeros past the last point) to the operand type, four chunks in flight, and stores them
// into the slot's swizzled layout; the stores are made visible to wgmma (the async proxy) before the
// thread arrives on the slot's barrier.
template <class Tr, typename InT>
__device__ void convert_points(const Args& a, typename Tr::Smem& s, int thread) {
  using OpT = typename Tr::Op;
  constexpr int kChunks = Tr::kChunks, kTotal = Tr::kItemRows * kChunks, kBatch = 4;
  auto sA = make_tensor(make_smem_ptr(s.a.data()), typename Tr::LayoutA{});
  const TensorCoreAssignParams& p = a.p;
  int item_count = 0;
  for (int64_t index = blockIdx.x; index < a.items; index += gridDim.x, ++item_count) {
    const Item it(a, index, Tr::kItemRows);
    const InT* pts = static_cast<const InT*>(p.points) + it.b * p.p_stride[0] + it.h * p.p_stride[1];
    const int slot = item_count % kPointSlots;
    Barrier::wait(&s.a_empty[slot], ((item_count / kPointSlots) & 1) ^ 1);
    for (int q0 = thread; q0 < kTotal; q0 += kBatch * kConverters) {
      float f[kBatch][8];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int q = q0 + u * kConverters;
        const int64_t n = it.n0 + q / kChunks;
        if (q < kTotal && n < p.N) {
          assign::load_chunk(pts + n * p.p_stride[2] + static_cast<int64_t>(q % kChunks) * 8 * p.p_stride[3],
                             p.vector_rows, p.p_stride[3], f[u]);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) f[u][e] = 0.0f;
        }
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int q = q0 + u * kConverters;
        if (q >= kTotal) break;
        const int row = q / kChunks, ch = q % kChunks;
        *reinterpret_cast<uint4*>(&sA(row % Tr::kGroupRows, ch * 8, row / Tr::kGroupRows + 2 * slot)) =
            make_uint4(pack2<OpT>(f[u][0], f[u][1]), pack2<OpT>(f[u][2], f[u][3]), pack2<OpT>(f[u][4], f[u][5]),
                       pack2<OpT>(f[u][6], f[u][7]));
      }
    }
    cutlass::arch::fence_view_async_shared();
    Barrier::arrive(&s.a_full[slot]);
  }
}

// ---------------------------------------------------------------------------------------------
// Consumers
// ---------------------------------------------------------------------------------------------

// A thread's rows: q = 2 mb + r is row 64 mb + 16 warp + lane / 4 + 8 r of its warpgroup's block, and
// accumulator value (c, r, g) of m block mb is column 8 g + 2 (lane % 4) + c of the tile.
__device__ __forceinline__ int group_row(int q, int warp, int lane) {
  return 64 * (q / 2) + 16 * warp + lane / 4 + 8 * (q % 2);
}

template <class Tr>
__device__ void consume(const Args& a, typename Tr::Smem& s) {
  using OpT = typename Tr::Op;
  constexpr int D = Tr::kDim, N = Tr::kTileN, kRows = 2 * Tr::kMBlocks;  // rows per thread
  const TensorCoreAssignParams& p = a.p;
  const int wg = threadIdx.x / 128 - 1;  // 0 or 1: rows [kGroupRows wg, kGroupRows (wg + 1)) of an item
  const int thread = threadIdx.x % 128, lane = thread % 32, warp = thread / 32, t4 = lane % 4;
  const int mask = p.index_mask;

  auto sA = make_tensor(make_smem_ptr(s.a.data()), typename Tr::LayoutA{});
  auto sB = make_tensor(make_smem_ptr(s.b.data()), typename Tr::LayoutB{});
  typename Tr::Mma mma;
  auto thr = mma.get_slice(thread);
  auto tSrA = thr.partition_fragment_A(sA);  // (MMA, MMA_M, MMA_K, warpgroup + 2 slot)
  auto tSrB = thr.partition_fragment_B(sB);  // (MMA, MMA_N, MMA_K, stage)
  auto acc = partition_fragment_C(mma, Shape<Int<Tr::kGroupRows>, Int<N>>{});  // (MMA, MMA_M, 1)
  static_assert(decltype(size<0>(acc))::value == N / 2, "one wgmma atom spans the tile");
  static_assert(decltype(size<1>(acc))::value == Tr::kMBlocks);
  static_assert(decltype(rank(acc))::value == 3);

  auto wait_turn = [&] { cutlass::arch::NamedBarrier::sync(kConsumers, kTurnBarrier + wg); };
  auto pass_turn = [&] { cutlass::arch::NamedBarrier::arrive(kConsumers, kTurnBarrier + 1 - wg); };
  if (wg == 1) pass_turn();  // warpgroup 0 goes first

  int tile_count = 0, item_count = 0;
  for (int64_t index = blockIdx.x; index < a.items; index += gridDim.x, ++item_count) {
    const Item it(a, index, Tr::kItemRows);
    const int slot = item_count % kPointSlots, block = wg + 2 * slot;
    Barrier::wait(&s.a_full[slot], (item_count / kPointSlots) & 1);

    // Squared norms of the thread's rows in the operand type, in the mma.sync kernel's order (one lane
    // of the quad per row, d ascending), then shared across the quad.
    float x2[kRows], base[kRows];
    {
      float own = 0.0f;
      if (t4 < kRows) {
        const int row = group_row(t4, warp, lane);
#pragma unroll
        for (int ch = 0; ch < Tr::kChunks; ++ch) {
          const uint4 c = *reinterpret_cast<const uint4*>(&sA(row, ch * 8, block));
          const uint32_t w[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const float v = assign::unpack<OpT>(w[e / 2], e % 2);
            own = fmaf(v, v, own);
          }
        }
      }
      const assign::NearTieBound<D> bound(p.prepared.stats + it.bh * 2, a.points_f32, p.index_bits);
#pragma unroll
      for (int q = 0; q < kRows; ++q) {
        x2[q] = __shfl_sync(0xffffffffu, own, (lane & ~3) | q);
        base[q] = bound.row_base(x2[q]);
      }
    }

    int k1[kRows], k2[kRows];
#pragma unroll
    for (int q = 0; q < kRows; ++q) k1[q] = k2[q] = 0x7fffffff;

    for (int t = 0; t < a.tiles; ++t, ++tile_count) {
      const int stage = tile_count % Tr::kStages;
      Barrier::wait(&s.b_full[stage], (tile_count / Tr::kStages) & 1);
      // The accumulators start at ||c||^2/2 + ||x||^2/2 + M.
#pragma unroll
      for (int g = 0; g < N / 8; ++g) {
        const float2 nv = *reinterpret_cast<const float2*>(&s.norm[stage][8 * g + 2 * t4]);
#pragma unroll
        for (int q = 0; q < kRows; ++q) {
          acc(4 * g + 2 * (q % 2), q / 2, 0) = nv.x + base[q];
          acc(4 * g + 2 * (q % 2) + 1, q / 2, 0) = nv.y + base[q];
        }
      }
      wait_turn();
      warpgroup_fence_operand(acc);
      warpgroup_arrive();
      mma.accumulate_ = GMMA::ScaleOut::One;
      CUTLASS_PRAGMA_UNROLL
      for (int kb = 0; kb < size<2>(tSrA); ++kb) cute::gemm(mma, tSrA(_, _, kb, block), tSrB(_, _, kb, stage), acc);
      warpgroup_commit_batch();
      pass_turn();
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc);
      Barrier::arrive(&s.b_empty[stage]);

      // The tile's two best keys per row, with the column within the tile less 2 (lane % 4) in the
      // low bits (an immediate: one LOP3 per value), then moved to the item's column and merged.
      const int offset = t * N + 2 * t4;
#pragma unroll
      for (int q = 0; q < kRows; ++q) {
        const int r = q % 2, mb = q / 2;
        const int e0 = assign::make_key(acc(2 * r, mb, 0), 0, mask);
        const int e1 = assign::make_key(acc(2 * r + 1, mb, 0), 1, mask);
        int t1 = min(e0, e1), t2 = max(e0, e1);
#pragma unroll
        for (int g = 1; g < N / 8; ++g)
#pragma unroll
          for (int c = 0; c < 2; ++c)
            assign::keep_two(t1, t2, assign::make_key(acc(4 * g + 2 * r + c, mb, 0), 8 * g + c, mask));
        assign::merge_two(k1[q], k2[q], t1 + offset, t2 + offset);
      }
    }

    // ---- labels, then the exact re-ranking of near ties --------------------------------------------
    const int64_t row0 = it.n0 + wg * Tr::kGroupRows;  // point of the warpgroup's row 0
    int32_t* labels = p.labels + it.b * p.l_stride_b + it.h * p.l_stride_h;
    const assign::NearTieBound<D> bound(p.prepared.stats + it.bh * 2, a.points_f32, p.index_bits);
    uint32_t flagged[kRows];
    int refined = 0;
#pragma unroll
    for (int q = 0; q < kRows; ++q) {
      assign::merge_quad(k1[q], k2[q]);
      const int64_t n = row0 + group_row(q, warp, lane);
      int label = 0;
      if (t4 == 0 && n < p.N) {
        label = assign::settle(k1[q], k2[q], mask, p.C, bound.of(x2[q]).half_gap);
        if (label != assign::kRerank) labels[n] = label;
      }
      flagged[q] = __ballot_sync(0xffffffffu, t4 == 0 && n < p.N && label == assign::kRerank);
      refined += __popc(flagged[q]);
    }
    if (p.refined != nullptr && lane == 0 && refined > 0)
      atomicAdd(p.refined, static_cast<unsigned long long>(refined));
    const float* centroids = p.centroids + it.bh * p.C * D;
    const float* pts_f32 = static_cast<const float*>(p.points) + it.b * p.p_stride[0] + it.h * p.p_stride[1];
#pragma unroll
    for (int q = 0; q < kRows; ++q) {
      // Two flagged rows per pass: lanes 0-15 take the lowest, lanes 16-31 the next.
      for (uint32_t pending = flagged[q]; pending != 0;) {
        const int l0 = __ffs(pending) - 1;
        pending &= pending - 1;
        const int l1 = pending != 0 ? __ffs(pending) - 1 : l0;
        const bool second = pending != 0;
        if (second) pending &= pending - 1;
        const int src = lane < 16 ? l0 : l1;
        const int c1 = __shfl_sync(0xffffffffu, k1[q], src) & mask, c2 = __shfl_sync(0xffffffffu, k2[q], src) & mask;
        const int row = group_row(q, warp, src);
        auto x_at = [&](int d) {
          if (a.points_f32) return pts_f32[(row0 + row) * p.p_stride[2] + d * p.p_stride[3]];
          return static_cast<float>(sA(row, d, block));
        };
        const int label = assign::exact_pick<D>(c1, c2, x_at, centroids, lane);
        if (lane == 0 || (lane == 16 && second)) labels[row0 + row] = label;
      }
    }
    Barrier::arrive(&s.a_empty[slot]);
  }
  if (wg == 0) wait_turn();  // takes warpgroup 1's last pass, so no arrival is left on a barrier
}

template <class Tr>
__global__ void __launch_bounds__(kThreads, 1) assign_kernel(const __grid_constant__ Args a) {
  extern __shared__ __align__(1024) char smem_raw[];
  auto& s = *reinterpret_cast<typename Tr::Smem*>(smem_raw);
  if (threadIdx.x == 0) {
    for (int i = 0; i < kPointSlots; ++i) {
      Barrier::init(&s.a_full[i], a.points_tma ? 1 : kConverters);
      Barrier::init(&s.a_empty[i], kConsumers);
    }
    for (int i = 0; i < Tr::kStages; ++i) {
      Barrier::init(&s.b_full[i], 1);
      Barrier::init(&s.b_empty[i], kConsumers);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x < 128) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (threadIdx.x == 0) {
      load_tiles<Tr>(a, s);
    } else if (threadIdx.x >= 32 && !a.points_tma) {
      if constexpr (std::is_same_v<typename Tr::Op, __half>) {
        convert_points<Tr, __half>(a, s, threadIdx.x - 32);
      } else if (a.points_f32) {
        convert_points<Tr, float>(a, s, threadIdx.x - 32);
      } else {
        convert_points<Tr, __nv_bfloat16>(a, s, threadIdx.x - 32);
      }
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
    consume<Tr>(a, s);
  }
}

// ---------------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------------

template <class Tr>
void launch(const TensorCoreAssignParams& p, DType points_dtype, int64_t batch_heads, int num_sms,
            cudaStream_t stream) {
  constexpr int D = Tr::kDim;
  const DType op = operand_dtype(points_dtype);
  Args a{};
  a.p = p;
  a.point_tiles = ceil_div(p.N, Tr::kItemRows);
  a.items = batch_heads * a.point_tiles;
  a.tiles = static_cast<int>(p.prepared.c_pad / Tr::kTileN);
  a.points_f32 = points_dtype == DType::F32;
  SAPATTN_CHECK(p.prepared.c_pad % Tr::kTileN == 0 && batch_heads < (int64_t{1} << 31) && p.N < (int64_t{1} << 31),
                UnsupportedError, "the wgmma k-means assignment got ", p.N, " points in ", batch_heads,
                " (b,h) pairs and centroids padded to ", p.prepared.c_pad, " for tiles of ", Tr::kTileN);
  {
    const uint64_t dims[3] = {D, static_cast<uint64_t>(p.prepared.c_pad), static_cast<uint64_t>(batch_heads)};
    const uint64_t strides[2] = {D * 2, static_cast<uint64_t>(p.prepared.c_pad) * D * 2};
    const uint32_t box[3] = {64, Tr::kTileN, 1};
    SAPATTN_CHECK(encode_tiled_map(a.centroids, op, 3, p.prepared.operand, dims, strides, box), UnsupportedError,
                  "the driver refused the tensor map of the prepared centroids (a workspace not 16-byte aligned?)");
  }
  if (!a.points_f32 && p.p_stride[3] == 1) {
    const int64_t B = batch_heads / p.H;
    const uint64_t dims[4] = {D, static_cast<uint64_t>(p.N), static_cast<uint64_t>(p.H), static_cast<uint64_t>(B)};
    const uint64_t strides[3] = {static_cast<uint64_t>(p.p_stride[2]) * 2, static_cast<uint64_t>(p.p_stride[1]) * 2,
                                 static_cast<uint64_t>(p.p_stride[0]) * 2};
    const uint32_t box[4] = {64, Tr::kGroupRows, 1, 1};
    a.points_tma = encode_tiled_map(a.points, op, 4, p.points, dims, strides, box);
  }
  const int smem = static_cast<int>(sizeof(typename Tr::Smem));
  auto* kernel = &assign_kernel<Tr>;
  set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  const int grid = static_cast<int>(min_of<int64_t>(num_sms, a.items));
  kernel<<<grid, kThreads, smem, stream>>>(a);
  SAPATTN_CUDA_CHECK_LAUNCH();
}

// Launches the configuration `config` of kSm90AssignConfigs (kmeans_internal.hpp) for head dim D.
template <int D, size_t... I>
void launch_config(const TensorCoreAssignParams& p, DType points_dtype, int64_t batch_heads, Sm90AssignConfig config,
                   int num_sms, cudaStream_t stream, std::index_sequence<I...>) {
  if (p.N == 0 || batch_heads == 0) return;
  auto with_op = [&](auto op_tag) {
    using OpT = typename decltype(op_tag)::type;
    const bool found = ((config == kSm90AssignConfigs[I]
                             ? (launch<Traits<OpT, D, kSm90AssignConfigs[I].group_rows, kSm90AssignConfigs[I].tile_n>>(
                                    p, points_dtype, batch_heads, num_sms, stream),
                                true)
                             : false) ||
                        ...);
    SAPATTN_CHECK(found, UnsupportedError, "no wgmma k-means assignment of ", config.group_rows,
                  " rows per warpgroup x ", config.tile_n, " centroids is compiled");
  };
  if (operand_dtype(points_dtype) == DType::F16) {
    with_op(TypeTag<__half>{});
  } else {
    with_op(TypeTag<__nv_bfloat16>{});
  }
}

}  // namespace sapattn::cuda::sm90_assign
