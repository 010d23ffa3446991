// Host-side CUDA plumbing shared by the CUDA backend and Buffer::allocate: the typed error every
// failed CUDA call becomes, the check macro, and a guard that makes the stream's device current.
// Host-only (it includes the runtime API, not the device headers), so plain C++ files can use it.
// It lives in core/ because sapattn_base (Buffer::allocate, src/core/tensor.cpp) uses it and base
// sits below the CUDA backend: includes run from src/cuda down to src/core, never up.
#pragma once

#include <cuda_runtime_api.h>

#include "sapattn/error.hpp"
#include "sapattn/tensor.hpp"

namespace sapattn::cuda {

// A CUDA runtime call that failed for another reason than a missing device (launch failure,
// illegal address, out of memory, ...). Catch it as sapattn::Error.
class CudaError : public Error {
 public:
  CudaError(const std::string& message, cudaError_t code, const char* file, int line)
      : Error(message, file, line), code_(code) {}
  cudaError_t code() const noexcept { return code_; }

 private:
  cudaError_t code_;
};

// No usable GPU (no driver, no device, a device index that does not exist) is a missing feature of
// the machine, reported as UnsupportedError like a build without the backend; the CPU suites rely
// on that when they run a CUDA-enabled build on a machine without a GPU.
inline bool is_no_device_error(cudaError_t e) {
  return e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver || e == cudaErrorInvalidDevice ||
         e == cudaErrorDevicesUnavailable || e == cudaErrorSystemDriverMismatch ||
         e == cudaErrorCompatNotSupportedOnDevice;
}

[[noreturn]] inline void throw_cuda_error(cudaError_t e, const char* what, const char* file, int line) {
  // Consume the error, so that a later call (CUB reads cudaGetLastError after its launches) does not
  // report this one again. Sticky errors (a kernel fault) stay: the context is lost anyway.
  (void)cudaGetLastError();
  const std::string message = detail::concat(what, " failed: ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
  if (is_no_device_error(e)) throw UnsupportedError("no usable CUDA device: " + message, file, line);
  throw CudaError(message, e, file, line);
}

}  // namespace sapattn::cuda

// Checks the cudaError_t of a runtime call and throws the typed error above when it failed.
#define SAPATTN_CUDA_CHECK(call)                                                          \
  do {                                                                                    \
    const cudaError_t sapattn_cuda_status_ = (call);                                      \
    if (sapattn_cuda_status_ != cudaSuccess)                                              \
      ::sapattn::cuda::throw_cuda_error(sapattn_cuda_status_, #call, __FILE__, __LINE__); \
  } while (0)

namespace sapattn::cuda {

// Makes `device` current for the guard's lifetime (ops run on the stream's device whatever the
// calling thread had selected) and restores the previous device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(Device device) {
    SAPATTN_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device.index) SAPATTN_CUDA_CHECK(cudaSetDevice(device.index));
    current_ = device.index;
  }
  ~DeviceGuard() {
    if (previous_ != current_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  int current_ = 0;
};

}  // namespace sapattn::cuda
