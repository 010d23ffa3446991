// What the e4m3 quantisation's generic passes (fp8_quantize.cu) and the e4m3 attention's fused
// operand passes (fp8_operands.cu) share on the device: the range-checked permutation read and the
// group maximum. The amax
// travels as an unsigned key, the bits of |y| for finite y, which order as the values do (-0 gives
// +0's key 0), and kNonFinite above them all for a NaN or an infinity, so that one unsigned max
// carries both the CPU's amax and its "group holds a non-finite value" flag.
#pragma once

#include <cstdint>

#include "core/fp8.hpp"
#include "cuda/runtime/runtime.hpp"

namespace sapattn::cuda::fp8_group {

constexpr uint32_t kNonFinite = 0xffffffffu;
// The NaN scale of a group holding a non-finite value: the CPU's quiet NaN (std::numeric_limits),
// not the GPU's canonical NaN that NaN / 448 would give, so that scales compare bit for bit.
constexpr uint32_t kQuietNaN = 0x7fc00000u;

// Row r's source row through perm (null: r), or -1 for an entry outside [0, S), which raises
// kBadPermIndex in the value-check flag.
__device__ __forceinline__ int64_t source_row(const int32_t* perm, int64_t r, int64_t S, int* flag) {
  if (perm == nullptr) return r;
  const int32_t s = perm[r];
  if (s >= 0 && s < S) return s;
  atomicOr(flag, kBadPermIndex);
  return -1;
}

__device__ __forceinline__ uint32_t amax_key(float y) { return isfinite(y) ? __float_as_uint(fabsf(y)) : kNonFinite; }

// The group's amax (NaN when it holds a non-finite value) -> its scale and inverse, as the CPU's.
__device__ __forceinline__ fp8::E4M3Scale scale_of_key(uint32_t key) {
  if (key == kNonFinite) return {__uint_as_float(kQuietNaN), __uint_as_float(kQuietNaN)};
  return fp8::e4m3_scale(__uint_as_float(key));
}

// The maximum of v over a block of kThreads threads (a multiple of 32, at most 1024); `shared`
// holds kThreads / 32 words. Every thread gets the result; the block must not diverge.
template <int kThreads>
__device__ __forceinline__ uint32_t block_max(uint32_t v, uint32_t* shared) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? shared[lane] : 0u;
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace sapattn::cuda::fp8_group
