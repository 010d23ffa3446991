// The e4m3 codec of src/core/fp8.hpp compiled for the device, against the hardware conversions the
// FP8 kernel may use instead (sm_89+): cvt.rn.satfinite.e4m3x2.f32 for every one of the 2^32 fp32
// bit patterns, and cvt.rn.f16x2.e4m3x2 for the 256 codes; the device codec against the host codec
// on a walk of the bit patterns. The CPU reference of the FP8 attention (docs/fp8.md) relies on
// these being the same conversion.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/fp8.hpp"

namespace {

using sapattn::fp8::e4m3_decode;
using sapattn::fp8::e4m3_encode;

constexpr int kMaxReported = 8;

// The hardware conversion of x to e4m3 (the low byte of the pair), or -1 where the device lacks it.
__device__ int hardware_encode(float x) {
#if __CUDA_ARCH__ >= 890
  unsigned short pair;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(0.0f), "f"(x));
  return pair & 0xff;
#else
  (void)x;
  return -1;
#endif
}

// Every bit pattern in [first, first + count): the shared codec against the instruction.
__global__ void compare_encoders(uint64_t first, uint64_t count, unsigned long long* mismatches, uint32_t* examples,
                                 int* unsupported) {
  for (uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    const auto bits = static_cast<uint32_t>(first + i);
    const float x = __uint_as_float(bits);
    const int hw = hardware_encode(x);
    if (hw < 0) {
      *unsupported = 1;
      return;
    }
    if (hw != e4m3_encode(x)) {
      const unsigned long long n = atomicAdd(mismatches, 1ull);
      if (n < kMaxReported) examples[n] = bits;
    }
  }
}

// The 256 codes: the shared decoder, and the instruction's f16 (exact for every e4m3 value).
__global__ void decode_codes(float* shared, float* hardware) {
  const int c = threadIdx.x;
  shared[c] = e4m3_decode(static_cast<uint8_t>(c));
#if __CUDA_ARCH__ >= 890
  unsigned int halves;
  const auto pair = static_cast<unsigned short>(c);
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(halves) : "h"(pair));
  hardware[c] = __half2float(__ushort_as_half(static_cast<unsigned short>(halves & 0xffff)));
#else
  hardware[c] = 0.0f;
#endif
}

// Every 97th bit pattern through the device codec, for the host comparison.
__global__ void encode_walk(uint64_t count, uint8_t* codes) {
  for (uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<uint64_t>(gridDim.x) * blockDim.x)
    codes[i] = e4m3_encode(__uint_as_float(static_cast<uint32_t>(i * 97)));
}

bool has_fp8_conversions() {
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  return major * 10 + minor >= 89;
}

TEST(CudaE4M3Codec, EncoderMatchesTheSatfiniteInstructionOnEveryFloat) {
  if (!has_fp8_conversions()) GTEST_SKIP() << "the e4m3 conversions need sm_89 or newer";
  unsigned long long* mismatches = nullptr;
  uint32_t* examples = nullptr;
  int* unsupported = nullptr;
  ASSERT_EQ(cudaMalloc(&mismatches, sizeof *mismatches), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&examples, kMaxReported * sizeof *examples), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&unsupported, sizeof *unsupported), cudaSuccess);
  ASSERT_EQ(cudaMemset(mismatches, 0, sizeof *mismatches), cudaSuccess);
  ASSERT_EQ(cudaMemset(unsupported, 0, sizeof *unsupported), cudaSuccess);
  compare_encoders<<<4096, 256>>>(0, uint64_t{1} << 32, mismatches, examples, unsupported);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  unsigned long long wrong = 0;
  int missing = 0;
  std::vector<uint32_t> bits(kMaxReported);
  ASSERT_EQ(cudaMemcpy(&wrong, mismatches, sizeof wrong, cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(&missing, unsupported, sizeof missing, cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(bits.data(), examples, bits.size() * sizeof(uint32_t), cudaMemcpyDeviceToHost), cudaSuccess);
  cudaFree(mismatches);
  cudaFree(examples);
  cudaFree(unsupported);
  ASSERT_EQ(missing, 0) << "this build has no sm_89+ code for the device";
  EXPECT_EQ(wrong, 0ull);
  for (unsigned long long i = 0; i < std::min<unsigned long long>(wrong, kMaxReported); ++i)
    ADD_FAILURE() << "bits 0x" << std::hex << bits[i] << ": codec 0x"
                  << int{e4m3_encode(__builtin_bit_cast(float, bits[i]))};
}

TEST(CudaE4M3Codec, DecoderMatchesTheInstructionAndTheHost) {
  float *shared = nullptr, *hardware = nullptr;
  ASSERT_EQ(cudaMalloc(&shared, 256 * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&hardware, 256 * sizeof(float)), cudaSuccess);
  decode_codes<<<1, 256>>>(shared, hardware);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> a(256), b(256);
  ASSERT_EQ(cudaMemcpy(a.data(), shared, 256 * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(b.data(), hardware, 256 * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  cudaFree(shared);
  cudaFree(hardware);
  const bool check_hardware = has_fp8_conversions();
  for (int c = 0; c < 256; ++c) {
    const float host = e4m3_decode(static_cast<uint8_t>(c));
    if (std::isnan(host)) {
      EXPECT_TRUE(std::isnan(a[c])) << c;
      if (check_hardware) EXPECT_TRUE(std::isnan(b[c])) << c;
      continue;
    }
    EXPECT_EQ(__builtin_bit_cast(uint32_t, a[c]), __builtin_bit_cast(uint32_t, host)) << "code " << c;
    if (check_hardware)
      EXPECT_EQ(__builtin_bit_cast(uint32_t, b[c]), __builtin_bit_cast(uint32_t, host)) << "code " << c;
  }
}

TEST(CudaE4M3Codec, DeviceEncoderMatchesTheHostEncoder) {
  const uint64_t count = ((uint64_t{1} << 32) + 96) / 97;
  uint8_t* codes = nullptr;
  ASSERT_EQ(cudaMalloc(&codes, count), cudaSuccess);
  encode_walk<<<4096, 256>>>(count, codes);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<uint8_t> got(count);
  ASSERT_EQ(cudaMemcpy(got.data(), codes, count, cudaMemcpyDeviceToHost), cudaSuccess);
  cudaFree(codes);
  int64_t wrong = 0;
  for (uint64_t i = 0; i < count; ++i)
    if (got[i] != e4m3_encode(__builtin_bit_cast(float, static_cast<uint32_t>(i * 97))) && ++wrong <= kMaxReported)
      ADD_FAILURE() << "bits 0x" << std::hex << i * 97;
  EXPECT_EQ(wrong, 0);
}

}  // namespace
