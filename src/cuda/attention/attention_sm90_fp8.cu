// The Hopper (sm_90a) e4m3 attention kernel (docs/fp8.md): the roles of attention_sm90.cu with
// Fp8Traits (sm90/traits.cuh): the e4m3 TMA producer (load.cuh, producer_tma_fp8), the same
// consumer warpgroups and scheduler (mainloop.cuh, scheduler.cuh) and the epilogue with V's channel
// scales (epilogue.cuh). Below the kernel: its tensor maps and the launch. The operands come
// quantised, in cluster order, from fp8/fp8_attention.cu.
#include <cuda.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <type_traits>
#include <utility>

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

#include "cuda/attention/attention.hpp"
#include "cuda/attention/sm90/epilogue.cuh"
#include "cuda/attention/sm90/load.cuh"
#include "cuda/attention/sm90/mainloop.cuh"
#include "cuda/attention/sm90/scheduler.cuh"
#include "cuda/attention/sm90/traits.cuh"
#include "cuda/runtime/device.cuh"
#include "cuda/runtime/tensor_map.hpp"

namespace sapattn::cuda::attn {

namespace {

using sm90::Barrier;
using sm90::Fp8Maps;

// The producer's single TMA warp needs few registers; the consumers' two accumulators of O (the
// running one and a tile's, traits.cuh) take the rest: 128 x 40 + 256 x 232 <= 64 K, no spills
// (with 32 / 240 the producer spills).
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;

template <class Tr, typename Out>
__global__ void __launch_bounds__(sm90::kThreads, 1)
    attention_fp8_kernel(const __grid_constant__ Params p, const __grid_constant__ Fp8Params f,
                         const __grid_constant__ Fp8Maps maps) {
  extern __shared__ __align__(1024) char smem_raw[];
  auto& s = *reinterpret_cast<typename Tr::Smem*>(smem_raw);
  if (threadIdx.x == 0) {
    Barrier::init(&s.q_full, 1);
    Barrier::init(&s.q_empty, 256);
    for (int i = 0; i < Tr::kStages; ++i) {
      Barrier::init(&s.k_full[i], 1);
      Barrier::init(&s.v_full[i], 1);
      Barrier::init(&s.k_empty[i], 256);
      Barrier::init(&s.v_empty[i], 256);
    }
    cutlass::arch::fence_barrier_init();
  }
  if constexpr (Tr::kSumByMma) {
    // V^T's rows of ones after every slot's box (Fp8Traits), which no TMA load overwrites: e4m3 1.0
    // is 0x38. Written through the generic proxy, read by wgmma through the async one.
    constexpr int kWords = Tr::kStages * Tr::kSlots * (Tr::kVtRows - Tr::kHeadDim) * Tr::kSlotRows / 4;
    for (int i = threadIdx.x; i < kWords; i += blockDim.x) {
      const int per_slot = (Tr::kVtRows - Tr::kHeadDim) * Tr::kSlotRows / 4, slot = i / per_slot;
      const int stage = slot / Tr::kSlots, j = slot % Tr::kSlots;
      auto* word = reinterpret_cast<uint32_t*>(Tr::vt_slot(s, stage, j) + Tr::kHeadDim * Tr::kSlotRows);
      word[i % per_slot] = 0x38383838u;
    }
    cutlass::arch::fence_view_async_shared();
  }
  __syncthreads();
  const int q_tiles = (p.seq_q + kTileQ - 1) / kTileQ;
  const int num_items = p.dense ? p.batch * p.heads * q_tiles : *p.plan.num_items;
  if (threadIdx.x < 128) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (threadIdx.x < 32) sm90::producer_tma_fp8<Tr>(p, f, maps, s, num_items, q_tiles);
  } else {
    cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
    const sm90::Epilogue<Tr, Out> epilogue(p, s.v_scale, 1.0f / f.p_scale);
    sm90::consumer<Tr, true, false>(p, s, num_items, q_tiles, epilogue, &f);
  }
}

// The four maps of Fp8Maps over the operands fp8_attention.cu wrote; false where the driver
// refuses one (the caller raises UnsupportedError).
template <class Tr>
bool encode_maps(Fp8Maps& maps, const Params& p, const Fp8Params& f) {
  const uint64_t bh = static_cast<uint64_t>(p.batch) * p.heads, D = Tr::kHeadDim;
  // (No keys at all: every item is empty and no box is loaded, but a map needs extents of at least 1.)
  const uint64_t sq = static_cast<uint64_t>(p.seq_q), sk = std::max<uint64_t>(p.seq_k, 1);
  bool ok = true;
  {  // q codes (128 bytes, rows, heads): 64-row boxes, 128-byte swizzle
    const uint64_t dims[3] = {D, sq, bh}, strides[2] = {D, sq * D};
    const uint32_t box[3] = {static_cast<uint32_t>(D), 64, 1};
    ok = ok && encode_tiled_map(maps.q, DType::U8, 3, p.q, dims, strides, box);
  }
  {  // k codes: row = c + 4 t + 2 h of the box's first, landing at c + 2 t + 8 h (traits.cuh)
    const uint64_t dims[5] = {D, 2, 4, 2, bh * sk}, strides[4] = {D, 4 * D, 2 * D, D};
    const uint32_t box[5] = {static_cast<uint32_t>(D), 2, 4, 2, 1};
    ok = ok && encode_tiled_map(maps.k, DType::U8, 5, p.k, dims, strides, box);
  }
  {  // v^T codes in 16-key slots ([bh][slot][channel][16 keys], 2 KB each) as rows of 128 bytes: a
     // slot is 16 rows, one contiguous box that lands as the consumers read it (no swizzle). Slot
     // boxes of 16 keys x 128 channels over [bh][channel][keys] fetched 16 bytes per channel, half
     // of every 32-byte L2 sector.
    const uint64_t rows = bh * static_cast<uint64_t>(f.v_keys) * D / 128;
    const uint64_t dims[2] = {128, rows}, strides[1] = {128};
    const uint32_t box[2] = {128, static_cast<uint32_t>(Tr::kSlotRows * D / 128)};
    ok = ok && rows < (uint64_t{1} << 31) &&
         encode_tiled_map(maps.vt, DType::U8, 2, p.v, dims, strides, box, /*swizzle_128b=*/false);
  }
  {  // k scales (keys, heads), rows of v_keys floats (fp8_attention.cu pads them): boxes of 16
    const uint64_t dims[2] = {sk, bh}, strides[1] = {static_cast<uint64_t>(f.v_keys) * sizeof(float)};
    const uint32_t box[2] = {static_cast<uint32_t>(Tr::kSlotRows), 1};
    ok = ok && encode_tiled_map(maps.k_scale, DType::F32, 2, f.k_scale, dims, strides, box, false);
  }
  return ok;
}

template <class Tr, typename Out>
void launch(const Params& p, const Fp8Params& f, cudaStream_t stream) {
  static_assert(sizeof(typename Tr::Smem) <= 227 * 1024, "more shared memory than an H100 SM gives a block");
  Fp8Maps maps{};
  SAPATTN_CHECK(encode_maps<Tr>(maps, p, f), UnsupportedError,
                "the e4m3 attention kernel's tensor maps were refused by the driver (it needs "
                "cuTensorMapEncodeTiled of CUDA 12 or newer and 16-byte aligned operands)");
  const int smem = static_cast<int>(sizeof(typename Tr::Smem));
  auto* kernel = attention_fp8_kernel<Tr, Out>;
  set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  const int64_t q_tiles = (p.seq_q + kTileQ - 1) / kTileQ;
  const int64_t max_items = std::max<int64_t>(p.dense ? int64_t{p.batch} * p.heads * q_tiles : p.plan.max_items, 1);
  const int grid = static_cast<int>(std::min<int64_t>(p.num_sms, max_items));
  Params params = p;
  params.split_tails = true;
  params.next_item = p.dense ? nullptr : p.plan.next_item;
  kernel<<<grid, sm90::kThreads, smem, stream>>>(params, f, maps);
  SAPATTN_CUDA_CHECK_LAUNCH();
}

template <class Tr>
void launch_for_output(const Params& params, const Fp8Params& fp8, bool out_bf16, cudaStream_t stream) {
  out_bf16 ? launch<Tr, cutlass::bfloat16_t>(params, fp8, stream) : launch<Tr, cutlass::half_t>(params, fp8, stream);
}

// Measurement switches, built for one K scale per head only (Fp8Traits): SAPATTN_FP8_FMA_EXPS=0..4
// (default 0), of every 8 column groups of the softmax, how many take 2^x from the FMA pipe instead
// of MUFU; SAPATTN_FP8_KEY_TILE=128|160 (default 128), keys per tile; SAPATTN_FP8_ROW_SUM=mma, the
// sum of the quantised P (Fp8Options::p_sum_e4m3, which it needs) made by the P V MMA from V^T's
// rows of ones (without it the builds take the fp32 sum of P, p_sum_e4m3 false). Only the
// combinations of kMeasured are built; {128, 0, true} is the same kernel as run_sm90_fp8's default
// for one K scale per head with p_sum_e4m3. (192-key tiles are not built: they spilled 32 bytes
// outside the loop, and with FMA exponentials ptxas serialised their wgmmas for want of registers;
// 160 measures the wider tile. Nor are 160 keys with 2-4 FMA exponentials and the fp32 sum: with
// the producer's straight-line TMA issues they spilled 12 bytes, and FMA exponentials lost 5-18% in
// run 21.)
struct Measured {
  int key_tile = 128;
  int fma_exps = 0;
  bool sum_by_mma = false;
  bool any() const { return key_tile != 128 || fma_exps != 0 || sum_by_mma; }
};
constexpr Measured kMeasured[] = {{128, 1, false}, {128, 2, false}, {128, 3, false}, {128, 4, false}, {160, 0, false},
                                  {160, 1, false}, {128, 0, true},  {128, 2, true},  {128, 3, true},  {128, 4, true},
                                  {160, 0, true},  {160, 2, true},  {160, 3, true},  {160, 4, true}};

Measured measured_build() {
  Measured m;
  if (const char* env = std::getenv("SAPATTN_FP8_FMA_EXPS"); env != nullptr && env[0] != '\0') {
    SAPATTN_CHECK(env[1] == '\0' && env[0] >= '0' && env[0] <= '4', InvalidArgumentError, "SAPATTN_FP8_FMA_EXPS is '",
                  env, "'; expected 0 to 4");
    m.fma_exps = env[0] - '0';
  }
  if (const char* env = std::getenv("SAPATTN_FP8_KEY_TILE"); env != nullptr && env[0] != '\0') {
    SAPATTN_CHECK(std::strcmp(env, "128") == 0 || std::strcmp(env, "160") == 0, InvalidArgumentError,
                  "SAPATTN_FP8_KEY_TILE is '", env, "'; expected 128 or 160");
    m.key_tile = std::atoi(env);
  }
  if (const char* env = std::getenv("SAPATTN_FP8_ROW_SUM"); env != nullptr && env[0] != '\0') {
    SAPATTN_CHECK(std::strcmp(env, "default") == 0 || std::strcmp(env, "mma") == 0, InvalidArgumentError,
                  "SAPATTN_FP8_ROW_SUM is '", env, "'; expected default or mma");
    m.sum_by_mma = std::strcmp(env, "mma") == 0;
  }
  return m;
}

// Launches the measured build m if kMeasured holds it; false otherwise.
template <size_t... I>
bool launch_measured(const Measured& m, const Params& params, const Fp8Params& fp8, bool out_bf16, cudaStream_t stream,
                     std::index_sequence<I...>) {
  const auto one = [&](auto index) {
    constexpr Measured b = kMeasured[decltype(index)::value];
    if (b.key_tile != m.key_tile || b.fma_exps != m.fma_exps || b.sum_by_mma != m.sum_by_mma) return false;
    launch_for_output<sm90::Fp8Traits<false, true, b.fma_exps, b.key_tile, b.sum_by_mma>>(params, fp8, out_bf16,
                                                                                          stream);
    return true;
  };
  return (one(std::integral_constant<size_t, I>{}) || ...);
}

}  // namespace

void run_sm90_fp8(const Params& params, const Fp8Params& fp8, bool out_bf16, cudaStream_t stream) {
  SAPATTN_CHECK(params.head_dim == sm90::Fp8Traits<true>::kHeadDim, UnsupportedError,
                "the e4m3 attention kernel takes head dim ", sm90::Fp8Traits<true>::kHeadDim, ", got ",
                params.head_dim);
  if (const Measured m = measured_build(); m.any()) {
    SAPATTN_CHECK(fp8.one_key_scale && fp8.p_sum_e4m3 == m.sum_by_mma, UnsupportedError,
                  "SAPATTN_FP8_FMA_EXPS, SAPATTN_FP8_KEY_TILE and SAPATTN_FP8_ROW_SUM are built for one K scale per "
                  "head, with the sum of the quantised P (p_sum_e4m3) exactly where SAPATTN_FP8_ROW_SUM=mma");
    SAPATTN_CHECK(launch_measured(m, params, fp8, out_bf16, stream, std::make_index_sequence<std::size(kMeasured)>{}),
                  UnsupportedError, "the e4m3 kernel is not built with key tile ", m.key_tile, ", ", m.fma_exps,
                  " FMA exponentials per 8 and the row sum by ", m.sum_by_mma ? "the MMA" : "fp32 adds");
    return;
  }
  // With one K scale per head the quantised P's sum comes from the P V MMA (V^T's rows of ones):
  // measured 2-3% faster than the fp32 sum and as accurate as the f16 sums (docs/fp8.md, runs 21-23).
  if (fp8.one_key_scale) {
    fp8.p_sum_e4m3 ? launch_for_output<sm90::Fp8Traits<false, true, 0, 128, true>>(params, fp8, out_bf16, stream)
                   : launch_for_output<sm90::Fp8Traits<false, true>>(params, fp8, out_bf16, stream);
  } else {
    fp8.p_sum_e4m3 ? launch_for_output<sm90::Fp8Traits<true, false>>(params, fp8, out_bf16, stream)
                   : launch_for_output<sm90::Fp8Traits<false, false>>(params, fp8, out_bf16, stream);
  }
}

}  // namespace sapattn::cuda::attn
