// The softmax's exponentials of cuda/runtime/primitives.cuh on the device against exp2 in double:
// fast_exp2 (MUFU, ex2.approx.ftz) and exp2_fma (the FMA pipe's cubic, the e4m3 kernel's
// SAPATTN_FP8_FMA_EXPS), over every fp32 argument the e4m3 softmax can give it (its exponent is at
// most log2(448) < 9, masked keys are -inf) and past both ends of exp2_fma's range.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda/runtime/primitives.cuh"

namespace {

__global__ void both_exp2(const float* x, int n, float* mufu, float* fma) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    mufu[i] = sapattn::cuda::fast_exp2(x[i]);
    fma[i] = sapattn::cuda::exp2_fma(x[i]);
  }
}

struct Results {
  std::vector<float> mufu, fma;
};

Results run(const std::vector<float>& x) {
  const int n = static_cast<int>(x.size());
  float *dx = nullptr, *dm = nullptr, *df = nullptr;
  EXPECT_EQ(cudaMalloc(&dx, n * sizeof(float)), cudaSuccess);
  EXPECT_EQ(cudaMalloc(&dm, n * sizeof(float)), cudaSuccess);
  EXPECT_EQ(cudaMalloc(&df, n * sizeof(float)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(dx, x.data(), n * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  both_exp2<<<1024, 256>>>(dx, n, dm, df);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  Results r{std::vector<float>(n), std::vector<float>(n)};
  EXPECT_EQ(cudaMemcpy(r.mufu.data(), dm, n * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(r.fma.data(), df, n * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  cudaFree(dx);
  cudaFree(dm);
  cudaFree(df);
  return r;
}

// Every fp32 in [-16, 16] whose low 7 mantissa bits are zero, and every 64th step of 2^-12 over
// [-125, 127.49]: relative error at most 1.02e-4 for exp2_fma (its cubic's bound, 1.014e-4, plus
// the rounding of four operations) and 2^-21 for MUFU.
TEST(CudaSoftmaxExp2, FmaCubicWithinItsBoundOverTheSoftmaxRange) {
  std::vector<float> x;
  for (uint32_t bits = 0; bits < (1u << 31); bits += 1u << 7) {
    const float v = __builtin_bit_cast(float, bits);
    if (v > 16.0f) break;
    x.push_back(v);
    x.push_back(-v);
  }
  for (double v = -125.0; v < 127.49; v += 64.0 / 4096) x.push_back(static_cast<float>(v));
  const Results r = run(x);
  double worst_fma = 0, worst_mufu = 0;
  float at = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double want = std::exp2(static_cast<double>(x[i]));
    const double e_fma = std::abs(r.fma[i] / want - 1.0);
    if (e_fma > worst_fma) {
      worst_fma = e_fma;
      at = x[i];
    }
    if (want >= 0x1p-126) worst_mufu = std::max(worst_mufu, std::abs(r.mufu[i] / want - 1.0));
  }
  std::printf("[ exp2 ] %zu arguments: exp2_fma worst relative error %.3g (at %g), MUFU %.3g\n", x.size(), worst_fma,
              at, worst_mufu);
  EXPECT_LE(worst_fma, 1.02e-4) << "at " << at;
  EXPECT_LE(worst_mufu, 0x1p-21);
}

// Below -125 (masked keys: -inf) exp2_fma gives 2^-125, a weight no row sum of at least 1 can
// notice, never garbage from the exponent field; the integer and half-integer points are exact to
// the cubic's bound.
TEST(CudaSoftmaxExp2, FmaCubicAtTheEnds) {
  const std::vector<float> x{-INFINITY, -1e30f, -300.0f, -125.5f, -125.0f, -0.5f, 0.0f, 0.5f, 8.807f, 127.0f};
  const Results r = run(x);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(r.fma[i], 0x1p-125f) << "x = " << x[i];
  for (size_t i = 4; i < x.size(); ++i)
    EXPECT_NEAR(r.fma[i] / std::exp2(static_cast<double>(x[i])), 1.0, 1.02e-4) << "x = " << x[i];
  EXPECT_EQ(r.fma[6], 1.0f);
}

}  // namespace
