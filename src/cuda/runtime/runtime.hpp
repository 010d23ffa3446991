// The host side of the CUDA backend's runtime (runtime.cu): the value-check flag that kernels raise
// on a bad value and the bracket an op puts around its launches to read it, whether a stream is being
// captured into a CUDA graph, the device's architecture and the kernels' shared-memory limit. Host
// code only: plain C++ files can include it.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>

#include "sapattn/tensor.hpp"

namespace sapattn::cuda {

// ---------------------------------------------------------------------------------------------
// Value checks (see cuda/backend.hpp). Kernels OR these bits into the flag when they meet a bad value.
// ---------------------------------------------------------------------------------------------

enum ValueError : int {
  kBadLabel = 1,      // a label outside [0, C)
  kBadPermIndex = 2,  // a permutation index outside [0, N)
  kBadOffsets = 4,    // offsets not non-decreasing or outside [0, S]
  kBadSize = 8,       // a negative cluster size
};

// The device's flag word (a __device__ variable of runtime.cu; one per device).
int* value_error_flag();
// Before an op's launches: clears the flag when value checks are on and the stream is not capturing.
// Returns whether end_value_check must run.
bool begin_value_check(const Stream& stream);
// After them: synchronises, reads the flag and throws InvalidArgumentError naming `op`.
void end_value_check(const Stream& stream, const char* op);

// True while `stream` is being captured into a CUDA graph (no synchronisation allowed then).
bool is_capturing(cudaStream_t stream);

// A device's compute capability and SM count, queried once per device (thread-safe).
struct DeviceArch {
  int major = 0, minor = 0, sms = 0;
};
DeviceArch device_arch(int device);

// A process-wide kernel knob: `value` holds what its setter stored, or -1 until the first read, which
// stores parse(getenv(env)) (thread-safe). Returns the value.
int knob_value(std::atomic<int>& value, const char* env, int (*parse)(const char*));

// Raises the dynamic shared-memory limit of a kernel once (thread-safe; not a stream operation, so it
// is allowed during graph capture).
void set_max_dynamic_smem(const void* kernel, int bytes);

}  // namespace sapattn::cuda
