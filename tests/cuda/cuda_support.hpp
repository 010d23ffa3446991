// What every GPU suite needs around the library: a stream it owns and a scope with the device value
// checks on. The host-side helpers (tensors, layouts, seeds) are in tests/reference.hpp and
// tests/test_support.hpp.
#pragma once

#include <cuda_runtime_api.h>

#include "core/cuda_check.hpp"
#include "cuda/backend.hpp"
#include "sapattn/tensor.hpp"

namespace sapattn::cuda_test {

// A CUDA stream owned by a test. Blocking (the default): synchronous cudaMemcpy calls on the legacy
// default stream are ordered with its work. NonBlocking: they are not; the test synchronises itself.
class TestStream {
 public:
  enum Kind { Blocking, NonBlocking };
  explicit TestStream(Kind kind = Blocking) {
    SAPATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, kind == Blocking ? cudaStreamDefault : cudaStreamNonBlocking));
  }
  ~TestStream() { (void)cudaStreamDestroy(stream_); }
  TestStream(const TestStream&) = delete;
  TestStream& operator=(const TestStream&) = delete;
  Stream stream() const { return {Device::cuda(0), stream_, 0}; }
  cudaStream_t handle() const { return stream_; }
  void sync() const { SAPATTN_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

 private:
  cudaStream_t stream_ = nullptr;
};

// The device value checks on for a scope; the previous setting comes back at its end.
class ValueChecksOn {
 public:
  ValueChecksOn() : was_on_(cuda::value_checks()) { cuda::set_value_checks(true); }
  ~ValueChecksOn() { cuda::set_value_checks(was_on_); }
  ValueChecksOn(const ValueChecksOn&) = delete;
  ValueChecksOn& operator=(const ValueChecksOn&) = delete;

 private:
  bool was_on_;
};

}  // namespace sapattn::cuda_test
