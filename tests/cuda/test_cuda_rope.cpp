// rope_pairs on CUDA against the CPU op on the same inputs: the same fp32 operations, so the same
// bytes, for every dtype, [B,H,S,D] and [B,S,H,D] memory, and in place.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "cuda_support.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace sapattn::cuda_test {
namespace {

class CudaRope : public ::testing::TestWithParam<std::tuple<DType, ref::Layout>> {};

TEST_P(CudaRope, IdenticalToCpu) {
  const auto [dtype, layout] = GetParam();
  const int64_t B = 2, H = 3, S = 300, D = 128;
  ref::Rng rng(testing_support::case_seed());
  HostTensor x = ref::make_tensor(dtype, {B, H, S, D}, layout);
  std::vector<double> xv(static_cast<size_t>(B * H * S * D));
  for (double& v : xv) v = 3.0 * rng.normal();
  ref::from_vector(x.view, xv);
  HostTensor c = ref::make_tensor(DType::F32, {S, D}), n = ref::make_tensor(DType::F32, {S, D});
  std::vector<double> cv(static_cast<size_t>(S * D)), nv(cv.size());
  for (size_t p = 0; p < cv.size(); p += 2) {
    const double angle = 6.3 * rng.normal();
    cv[p] = cv[p + 1] = std::cos(angle);
    nv[p] = nv[p + 1] = std::sin(angle);
  }
  ref::from_vector(c.view, cv);
  ref::from_vector(n.view, nv);
  HostTensor cpu_out = poisoned(dtype, {B, H, S, D});
  rope_pairs(x.view, c.view, n.view, cpu_out.view, kCpu);
  NonBlockingStream cs;
  DeviceTensor dx = to_device(x);
  const DeviceTensor dc = to_device(c), dn = to_device(n);
  DeviceTensor dout = to_device(poisoned(dtype, {B, H, S, D}));
  rope_pairs(dx.view, dc.view, dn.view, dout.view, cs.stream());
  rope_pairs(dx.view, dc.view, dn.view, dx.view, cs.stream());  // in place
  cs.sync();
  EXPECT_EQ(to_host(dout, cpu_out).bytes(), cpu_out.bytes());
  EXPECT_EQ(ref::to_vector(to_host(dx, x).view), ref::to_vector(cpu_out.view));
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaRope,
                         ::testing::Combine(::testing::Values(DType::F32, DType::F16, DType::BF16),
                                            ::testing::Values(ref::Layout::Contiguous, ref::Layout::Transposed)),
                         [](const auto& p) {
                           return testing_support::case_name(dtype_name(std::get<0>(p.param)),
                                                             ref::layout_name(std::get<1>(p.param)));
                         });

}  // namespace
}  // namespace sapattn::cuda_test
