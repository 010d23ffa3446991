// How an op entry point of src/ops/ picks its backend, after its argument checks (ops/checks.hpp):
// the stream's device type, once every view was checked to live there; CPU -> cpu::, CUDA -> cuda::
// (when this build has it). This layer sits above both backends and is the only one that includes
// their headers.
#pragma once

#include "cpu/backend.hpp"
#include "ops/checks.hpp"
#include "sapattn/error.hpp"
#include "sapattn/tensor.hpp"
// Declarations only (plain C++): a build without CUDA names them in decltype but never calls them.
#include "cuda/backend.hpp"

// The CUDA version of an op; `call` is evaluated only in builds with the CUDA backend. Without it,
// the expression throws UnsupportedError and has the CUDA op's return type (decltype does not
// evaluate `call`), so `return SAPATTN_ON_CUDA(...)` compiles in ops returning void or a value.
#if SAPATTN_HAS_CUDA
#define SAPATTN_ON_CUDA(call) ::sapattn::cuda::call
#else
#define SAPATTN_ON_CUDA(call) ::sapattn::dispatch::no_cuda_backend<decltype(::sapattn::cuda::call)>()
#endif

namespace sapattn::dispatch {

template <class R = void>
[[noreturn]] R no_cuda_backend() {
  SAPATTN_THROW(UnsupportedError, "this build has no CUDA backend");
}

inline int cpu_threads(const Stream& s) { return s.cpu_threads; }

// The backend an op runs on: the stream's device type, after every view was checked to live there.
// A device type this build has no backend for throws UnsupportedError.
template <typename... Views>
DeviceType backend(const Stream& stream, const Views&... views) {
  (checks::expect_device(views, stream), ...);
  switch (stream.device.type) {
    case DeviceType::CPU:
      return DeviceType::CPU;
    case DeviceType::CUDA:
#if SAPATTN_HAS_CUDA
      return DeviceType::CUDA;
#else
      break;
#endif
  }
  SAPATTN_THROW(UnsupportedError, "no backend for ", to_string(stream.device),
                " in this build (CPU only; "
                "configure with -DSAPATTN_CUDA=ON where nvcc is installed)");
}

}  // namespace sapattn::dispatch
