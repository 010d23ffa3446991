// The Hopper (sm_90a) variable-block attention kernel: warpgroup MMA (wgmma) with accumulators in
// registers, a producer warpgroup filling a multi-stage shared-memory pipeline signalled by
// mbarriers, and two consumer warpgroups that each own 64 query rows of a 128-row work item. One
// persistent CTA per SM walks the plan's items (by head, heaviest first).
//
// This file composes the roles, each in its header under sm90/ as in CUTLASS's FMHA examples and
// FA3: the tile scheduler (scheduler.cuh) hands the same items to the producer (load.cuh: TMA boxes
// where rows are unpermuted, else the cp.async gather) and to the consumers, which run the main loop
// (mainloop.cuh: Q K^T, online softmax, P V, the split-item merge) and the epilogue (epilogue.cuh:
// normalise, write O and LSE, merge key phases). Below the kernel: the tensor maps, the runtime
// switches (SAPATTN_SM90_LOAD, _SCHED, _SPLIT, _PAIR) and the launch for each instance of
// KernelHeadDims (attention.hpp).
#include <cuda.h>  // CUtensorMap and its encoder's types (the encoder is reached through the runtime)
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cute/arch/cluster_sm90.hpp>

#include "cuda/attention/attention.hpp"
#include "cuda/attention/sm90/epilogue.cuh"
#include "cuda/attention/sm90/load.cuh"
#include "cuda/attention/sm90/mainloop.cuh"
#include "cuda/attention/sm90/scheduler.cuh"
#include "cuda/attention/sm90/traits.cuh"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda::attn {

namespace {

using sm90::Barrier;
using sm90::kBoxHeights;
using sm90::kThreads;
using sm90::TmaMaps;

// kTma: K and V (and Q unless kQGather) come as TMA boxes; kQGather: Q rows are read through q_perm
// by the TMA warp with cp.async. kPair (with kTma): launched in clusters of two CTAs that share each
// item's K/V loads (p.pair; scheduler.cuh, load.cuh).
template <class Tr, bool kTma, bool kQGather, bool kPair>
__global__ void __launch_bounds__(kThreads, 1)
    attention_kernel(const __grid_constant__ Params p, const __grid_constant__ TmaMaps maps) {
  static_assert(kTma || !kPair, "CTA pairs multicast TMA boxes");
  extern __shared__ __align__(1024) char smem_raw[];
  auto& s = *reinterpret_cast<typename Tr::Smem*>(smem_raw);
  if (threadIdx.x == 0) {
    // TMA: one arrival (the producer's, with the stage's bytes) completes a "full" phase;
    // cp.async: one per producer thread (the TMA warp's Q gather: one per lane and lane 0's).
    // Pairs: a stage is empty once the consumers of both CTAs have freed it.
    const int loaders = kTma ? 1 : 128;
    const int freers = kPair ? 512 : 256;
    Barrier::init(&s.q_full, kQGather ? sm90::kQGatherArrivals : loaders);
    Barrier::init(&s.q_empty, 256);
    for (int i = 0; i < Tr::kStages; ++i) {
      Barrier::init(&s.k_full[i], loaders);
      Barrier::init(&s.v_full[i], loaders);
      Barrier::init(&s.k_empty[i], freers);
      Barrier::init(&s.v_empty[i], freers);
    }
    cutlass::arch::fence_barrier_init();
  }
  if constexpr (kPair) {
    cute::cluster_sync();  // the peer's barriers exist before any multicast or arrival reaches them
  } else {
    __syncthreads();
  }
  const int tile_rows = kPair ? kPairTileQ : kTileQ;
  const int q_tiles = (p.seq_q + tile_rows - 1) / tile_rows;
  const int num_items = p.dense ? p.batch * p.heads * q_tiles : *p.plan.num_items;
  if (threadIdx.x < 128) {
    // The producer warpgroup: one warp issues TMA boxes; all four gather with cp.async.
    cutlass::arch::warpgroup_reg_dealloc<sm90::kProducerRegs>();
    if constexpr (kTma) {
      if (threadIdx.x < 32) sm90::producer_tma<Tr, kQGather, kPair>(p, maps, s, num_items, q_tiles);
    } else {
      sm90::producer_cp_async<Tr>(p, s, num_items, q_tiles);
    }
  } else {
    // The consumer warpgroups: the main loop's O and row statistics go to the epilogue.
    cutlass::arch::warpgroup_reg_alloc<sm90::kConsumerRegs>();
    sm90::consumer<Tr, kTma, kPair>(p, s, num_items, q_tiles, sm90::Epilogue<Tr>(p));
  }
}

// cuTensorMapEncodeTiled, reached through the runtime (no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found{};
    SAPATTN_CUDA_CHECK(
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &found));
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
  constexpr auto kType =
      std::is_same_v<T, cutlass::bfloat16_t> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
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

// Which loads run. TMA needs key rows in cluster order (no permutation to read K and V through);
// where they are, it is faster in both modes. Measured on an H100 (docs/attention.md, 2026-12-06):
// dense Wan 14B 720p 209 ms against the cp.async gather's 232; sparse, with the warp-parallel box
// finder, 16.5 / 42.7 / 86.6 ms against 17.6 / 47.8 / 98.3 at densities 0.05 / 0.15 / 0.30, and
// 8-13% ahead on Wan 1.3B 480p and HunyuanVideo 720p. Queries read through q_perm are then gathered
// by the TMA warp. SAPATTN_SM90_LOAD overrides: "cpasync" everywhere, "tma" (or "" or "auto")
// wherever key rows are unpermuted.
bool use_tma(const Params& p) {
  if (p.k_perm != nullptr) return false;
  const char* env = std::getenv("SAPATTN_SM90_LOAD");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return true;
  if (std::strcmp(env, "cpasync") == 0) return false;
  if (std::strcmp(env, "tma") == 0) return true;
  SAPATTN_THROW(InvalidArgumentError, "SAPATTN_SM90_LOAD is '", env, "'; expected auto, cpasync or tma");
}

// A two-way measurement switch from the environment: true where `name` is unset, empty or `on`,
// false where it is `off`, an InvalidArgumentError for anything else.
bool env_switch(const char* name, const char* on, const char* off) {
  const char* env = std::getenv(name);
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, on) == 0) return true;
  SAPATTN_CHECK(std::strcmp(env, off) == 0, InvalidArgumentError, name, " is '", env, "'; expected ", off, " or ", on);
  return false;
}

// SAPATTN_SM90_SCHED=static|dynamic (default dynamic): how the sparse TMA kernel hands out items
// (ItemScheduler). A measurement switch (docs/attention.md); it goes once measured.
bool dynamic_schedule() { return env_switch("SAPATTN_SM90_SCHED", "dynamic", "static"); }

// SAPATTN_SM90_SPLIT=0|1 (default 1): whether items of at most 64 rows are split across both
// consumer warpgroups. A measurement switch (docs/attention.md); it goes once measured.
bool split_tails() { return env_switch("SAPATTN_SM90_SPLIT", "1", "0"); }

// SAPATTN_SM90_PAIR=0|1 (default 0): CTA pairs (clusters of two CTAs on one item of up to two
// tiles, K and V multicast) where the TMA loads run. A measurement switch (docs/attention.md).
bool pair_switch() { return !env_switch("SAPATTN_SM90_PAIR", "0", "1"); }

// A launch of the pairs: clusters of two CTAs (`cluster` holds the attribute that says so).
cudaLaunchConfig_t pair_config(cudaLaunchAttribute& cluster, unsigned grid, int smem, cudaStream_t stream) {
  cluster = cudaLaunchAttribute{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = 2;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = static_cast<size_t>(smem);
  config.stream = stream;
  config.attrs = &cluster;
  config.numAttrs = 1;
  return config;
}

// How many clusters of two CTAs of the pairs' kernel fit on the device at once (their persistent
// grid), asked once per kernel (and process: one device type assumed): the GPCs' SM counts decide,
// not just the SMs.
template <class Tr, bool kQGather>
int max_pair_clusters(int smem, int num_sms) {
  static const int clusters = [&] {
    cudaLaunchAttribute cluster;
    const cudaLaunchConfig_t config = pair_config(cluster, static_cast<unsigned>(num_sms / 2 * 2), smem, nullptr);
    int n = 0;
    SAPATTN_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&n, attention_kernel<Tr, true, kQGather, true>, &config));
    return n;
  }();
  SAPATTN_CHECK(clusters > 0, UnsupportedError, "the sm90 attention kernel's CTA pairs do not fit on this device");
  return clusters;
}

template <typename T, int kHeadDim>
void launch(const Params& p, cudaStream_t stream) {
  using Tr = sm90::Traits<T, kHeadDim>;
  static_assert(sizeof(typename Tr::Smem) <= 227 * 1024, "more shared memory than an H100 SM gives a block");
  TmaMaps maps{};
  Params params = p;
  const bool q_gather = p.q_perm != nullptr;
  bool tma = use_tma(p) && (q_gather || encode_map<T>(maps.q, p.q, p.seq_q, p, p.q_stride, 64));
  for (int j = 0; j < kBoxHeights && tma; ++j)
    tma = encode_map<T>(maps.k[j], p.k, p.seq_k, p, p.k_stride, Tr::kSlotRows << j) &&
          encode_map<T>(maps.v[j], p.v, p.seq_k, p, p.v_stride, Tr::kSlotRows << j);
  const int smem = static_cast<int>(sizeof(typename Tr::Smem));
  params.split_tails = split_tails();
  // Items: dense q tiles (of two tiles with pairs) or the plan's.
  const int tile_rows = p.pair ? kPairTileQ : kTileQ;
  const int64_t q_tiles = (p.seq_q + tile_rows - 1) / tile_rows;
  const int64_t max_items = std::max<int64_t>(p.dense ? int64_t{p.batch} * p.heads * q_tiles : p.plan.max_items, 1);
  if (p.pair) {
    // The plan was built for pairs (sm90_pairs said yes): only the TMA kernel of pairs runs it.
    SAPATTN_CHECK(tma && (p.dense || p.plan.item_rows == kPairTileQ), UnsupportedError,
                  "SAPATTN_SM90_PAIR=1 needs the TMA loads, and the driver refused this call's tensor maps");
    auto* kernel = q_gather ? attention_kernel<Tr, true, true, true> : attention_kernel<Tr, true, false, true>;
    set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
    const int max_clusters =
        q_gather ? max_pair_clusters<Tr, true>(smem, p.num_sms) : max_pair_clusters<Tr, false>(smem, p.num_sms);
    params.next_item = nullptr;  // pairs walk their items statically
    cudaLaunchAttribute cluster;
    const cudaLaunchConfig_t config =
        pair_config(cluster, static_cast<unsigned>(2 * std::min<int64_t>(max_clusters, max_items)), smem, stream);
    SAPATTN_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, params, maps));
    return;
  }
  auto* kernel = !tma ? attention_kernel<Tr, false, false, false>
                      : (q_gather ? attention_kernel<Tr, true, true, false> : attention_kernel<Tr, true, false, false>);
  set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  const int grid = static_cast<int>(std::min<int64_t>(p.num_sms, max_items));
  params.next_item = tma && !p.dense && dynamic_schedule() ? p.plan.next_item : nullptr;
  kernel<<<grid, kThreads, smem, stream>>>(params, maps);
  SAPATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace

bool sm90_compiled() { return true; }

bool sm90_pairs(const Params& params) { return pair_switch() && use_tma(params); }

void run_sm90(const Params& params, bool is_bf16, cudaStream_t stream) {
  const bool found =
      KernelHeadDims::dispatch<cutlass::bfloat16_t, cutlass::half_t>(is_bf16, params.head_dim, [&](auto instance) {
        using I = decltype(instance);
        launch<typename I::T, I::kHeadDim>(params, stream);
      });
  SAPATTN_CHECK(found, UnsupportedError, "the sm90 attention kernel takes head dim 64 or 128, got ", params.head_dim);
}

}  // namespace sapattn::cuda::attn
