// Process-wide pieces of the CUDA backend: the value-check flag, graph-capture queries, and
// check_finite (the one op that reads an answer back to the host).
#include "cuda/runtime/runtime.hpp"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#include "cuda/runtime/device.cuh"

namespace sapattn::cuda {

namespace {

__device__ int g_value_error = 0;
__device__ unsigned long long g_first_nonfinite = ULLONG_MAX;

std::atomic<int> g_value_checks{-1};
std::atomic<int> g_assign_columns{16};  // -1: not read from the environment yet

// check_finite shares one device word among all streams; the host lock keeps one call at a time
// between the reset and the read-back (each call synchronises its stream anyway).
std::mutex g_finite_mutex;
std::mutex g_value_mutex;

template <typename T, int VEC>
__global__ void find_nonfinite_kernel(const T* __restrict__ x, int64_t H, int64_t S, int64_t D, int64_t s0, int64_t s1,
                                      int64_t s2, int64_t s3) {
  // One (b,h) per blockIdx.y; threads walk (s, d-chunk) pairs of that head. VEC > 1 only with unit
  // stride along d and D a multiple of VEC.
  const int64_t bh = blockIdx.y;
  const int64_t b = bh / H, h = bh % H;
  const int64_t chunks = D / VEC;
  const T* base = x + b * s0 + h * s1;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < S * chunks;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = t / chunks, d0 = (t % chunks) * VEC;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float f = to_f32(base[s * s2 + (d0 + v) * s3]);
      if (!isfinite(f)) atomicMin(&g_first_nonfinite, static_cast<unsigned long long>(((bh * S + s) * D) + d0 + v));
    }
  }
}

}  // namespace

void set_assign_columns_per_pass(int columns) { g_assign_columns.store(columns == 8 ? 8 : 16); }
int assign_columns_per_pass() { return g_assign_columns.load(); }

void set_value_checks(bool on) { g_value_checks.store(on ? 1 : 0); }

bool value_checks() {
  int v = g_value_checks.load();
  if (v < 0) {
    const char* env = std::getenv("SAPATTN_CUDA_CHECK_VALUES");
    v = (env != nullptr && env[0] != '\0' && std::strcmp(env, "0") != 0) ? 1 : 0;
    int expected = -1;
    g_value_checks.compare_exchange_strong(expected, v);
    v = g_value_checks.load();
  }
  return v == 1;
}

int* value_error_flag() {
  void* p = nullptr;
  SAPATTN_CUDA_CHECK(cudaGetSymbolAddress(&p, g_value_error));
  return static_cast<int*>(p);
}

bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  SAPATTN_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

bool begin_value_check(const Stream& stream) {
  if (!value_checks() || is_capturing(stream_of(stream))) return false;
  g_value_mutex.lock();  // released by end_value_check
  const int zero = 0;
  const cudaError_t e =
      cudaMemcpyToSymbolAsync(g_value_error, &zero, sizeof(int), 0, cudaMemcpyHostToDevice, stream_of(stream));
  if (e != cudaSuccess) {
    g_value_mutex.unlock();
    throw_cuda_error(e, "cudaMemcpyToSymbolAsync(value flag)", __FILE__, __LINE__);
  }
  return true;
}

void end_value_check(const Stream& stream, const char* op) {
  std::unique_lock<std::mutex> lock(g_value_mutex, std::adopt_lock);
  int flag = 0;
  SAPATTN_CUDA_CHECK(
      cudaMemcpyFromSymbolAsync(&flag, g_value_error, sizeof(int), 0, cudaMemcpyDeviceToHost, stream_of(stream)));
  SAPATTN_CUDA_CHECK(cudaStreamSynchronize(stream_of(stream)));
  SAPATTN_CHECK((flag & kBadLabel) == 0, InvalidArgumentError, op, ": a label is outside [0, C) (CUDA value check)");
  SAPATTN_CHECK((flag & kBadPermIndex) == 0, InvalidArgumentError, op,
                ": a permutation index is outside [0, N) (CUDA value check)");
  SAPATTN_CHECK((flag & kBadOffsets) == 0, InvalidArgumentError, op,
                ": offsets are not non-decreasing within [0, S] (CUDA value check)");
  SAPATTN_CHECK((flag & kBadSize) == 0, InvalidArgumentError, op, ": a cluster size is negative (CUDA value check)");
}

DeviceArch device_arch(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceArch> known;
  std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find(device);
  if (found != known.end()) return found->second;
  DeviceArch arch;
  SAPATTN_CUDA_CHECK(cudaDeviceGetAttribute(&arch.major, cudaDevAttrComputeCapabilityMajor, device));
  SAPATTN_CUDA_CHECK(cudaDeviceGetAttribute(&arch.minor, cudaDevAttrComputeCapabilityMinor, device));
  SAPATTN_CUDA_CHECK(cudaDeviceGetAttribute(&arch.sms, cudaDevAttrMultiProcessorCount, device));
  known.emplace(device, arch);
  return arch;
}

int knob_value(std::atomic<int>& value, const char* env, int (*parse)(const char*)) {
  int v = value.load();
  if (v < 0) {
    int expected = -1;
    value.compare_exchange_strong(expected, parse(std::getenv(env)));
    v = value.load();
  }
  return v;
}

void set_max_dynamic_smem(const void* kernel, int bytes) {
  // The attribute is a ceiling, so it is only ever raised: once per (kernel, device) and larger
  // size. (Setting each size once, as this did first, lowered the ceiling when a smaller size came
  // after a larger one, and the larger launch then failed with cudaErrorInvalidValue.) Not a stream
  // operation, but doing it once keeps calls out of graph capture after the first eager run.
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> ceiling;
  int device = 0;
  SAPATTN_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  int& current = ceiling[{kernel, device}];
  if (bytes <= current) return;
  SAPATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  current = bytes;
}

void check_finite(const TensorView& x, const char* name, const Stream& stream) {
  const DeviceGuard guard(stream.device);
  const cudaStream_t s = stream_of(stream);
  SAPATTN_CHECK(!is_capturing(s), UnsupportedError, "check_finite reads its answer back to the host and cannot ",
                "run inside CUDA graph capture; check the inputs before capturing");
  const int64_t B = x.shape[0], H = x.shape[1], S = x.shape[2], D = x.shape[3];
  if (B * H * S * D == 0) return;
  std::lock_guard<std::mutex> lock(g_finite_mutex);
  const unsigned long long none = ULLONG_MAX;
  SAPATTN_CUDA_CHECK(cudaMemcpyToSymbolAsync(g_first_nonfinite, &none, sizeof(none), 0, cudaMemcpyHostToDevice, s));
  dispatch_float(x.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* p = static_cast<const T*>(x.data);
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(S * D, 256 * 8), 1024)),
                    static_cast<unsigned>(B * H));
    if (x.stride[3] == 1 && D % 8 == 0) {
      find_nonfinite_kernel<T, 8><<<grid, 256, 0, s>>>(p, H, S, D, x.stride[0], x.stride[1], x.stride[2], 1);
    } else {
      find_nonfinite_kernel<T, 1><<<grid, 256, 0, s>>>(p, H, S, D, x.stride[0], x.stride[1], x.stride[2], x.stride[3]);
    }
    SAPATTN_CUDA_CHECK_LAUNCH();
  });
  unsigned long long first = none;
  SAPATTN_CUDA_CHECK(cudaMemcpyFromSymbolAsync(&first, g_first_nonfinite, sizeof(first), 0, cudaMemcpyDeviceToHost, s));
  SAPATTN_CUDA_CHECK(cudaStreamSynchronize(s));
  if (first == none) return;
  const int64_t f = static_cast<int64_t>(first);
  const int64_t d = f % D, row = f / D, sidx = row % S, bh = row / S;
  SAPATTN_THROW(NonFiniteError, name, " holds a non-finite value at [b=", bh / H, ", h=", bh % H, ", s=", sidx,
                ", d=", d, "]");
}

}  // namespace sapattn::cuda
