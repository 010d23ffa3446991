// What every GPU suite (tests/cuda/test_cuda_*.cpp) shares, built on the host helpers of
// tests/reference.hpp (tensors in chosen layouts, poisoning, the seeded Rng) and tests/test_support.hpp
// (per-test seeds): a stream the test owns, a scope with the device value checks on, host tensors the
// suites start from, device copies of host tensors (the whole storage byte for byte, the view at the
// same offset and strides), device workspaces and captured CUDA graphs. cuda_support.cpp also
// registers the one global environment that checks for a GPU before any test runs.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "core/cuda_check.hpp"
#include "cuda/backend.hpp"
#include "reference.hpp"
#include "sapattn/tensor.hpp"

namespace sapattn::cuda_test {

using ref::HostTensor;

// The CPU backend gives bit-identical results for any thread count: the references take them all.
inline const Stream kCpu = Stream::cpu(0);

// ---------------------------------------------------------------------------------------------
// Streams and value checks
// ---------------------------------------------------------------------------------------------

// A CUDA stream owned by a test. Blocking (the default): synchronous cudaMemcpy calls on the legacy
// default stream are ordered with its work. NonBlocking: they are not; the test synchronises itself.
class TestStream {
 public:
  enum Kind { Blocking, NonBlocking };
  explicit TestStream(Kind kind = Blocking) {
    SAPATTN_CUDA_CHECK(
        cudaStreamCreateWithFlags(&stream_, kind == Blocking ? cudaStreamDefault : cudaStreamNonBlocking));
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

// The stream of the suites that synchronise themselves (the op, selection, permutation and plan
// suites): their copies are not ordered with its work.
class NonBlockingStream : public TestStream {
 public:
  NonBlockingStream() : TestStream(NonBlocking) {}
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

// A process-wide kernel knob (one of the cuda::set_*_override functions of cuda/backend.hpp) on
// `name` for a scope, the default ("") restored after.
template <void (*kSet)(const char*)>
class KernelOverrideScope {
 public:
  explicit KernelOverrideScope(const char* name) { kSet(name); }
  ~KernelOverrideScope() { kSet(""); }
  KernelOverrideScope(const KernelOverrideScope&) = delete;
  KernelOverrideScope& operator=(const KernelOverrideScope&) = delete;
};

// select_blocks' kernel: "exact" repeats the CPU's arithmetic, so its masks equal the CPU's byte for
// byte.
using SelectKernelScope = KernelOverrideScope<cuda::set_select_kernel_override>;

// ---------------------------------------------------------------------------------------------
// Host tensors
// ---------------------------------------------------------------------------------------------

std::vector<int64_t> shape_of(const TensorView& v);

// A host tensor in `layout`, its whole storage poisoned (ref::poison): an element an op does not
// write keeps the poison, and so do the bytes outside a strided view.
HostTensor poisoned(DType dtype, std::vector<int64_t> shape, ref::Layout layout = ref::Layout::Contiguous);

// A copy with storage of its own (Tensor copies share their buffer), laid out as `t`.
HostTensor deep_copy(const HostTensor& t);

// The name a layout has in the case names of the k-means and gather suites: "bshd" for
// ref::Layout::Transposed (the [B,S,H,D] memory of a rank-4 view), ref::layout_name otherwise.
const char* layout_tag(ref::Layout layout);

// Points [B,H,N,D] in `layout` from a mixture of `modes` Gaussians (centres N(0, 4), unit spread),
// so k-means has structure to find; modes = 0: pure N(0, 1) noise.
HostTensor mixture_points(DType dtype, int64_t B, int64_t H, int64_t N, int64_t D, ref::Layout layout, int64_t modes,
                          ref::Rng& rng);

// ---------------------------------------------------------------------------------------------
// Device copies
// ---------------------------------------------------------------------------------------------

// A device copy of a host tensor's whole storage; the view keeps the host view's strides and offset.
// Without storage (an omitted lse or permutation) both are empty.
struct DeviceTensor {
  Buffer buffer;
  TensorView view;
};

DeviceTensor to_device(const HostTensor& h);
// Copies the host storage into the device copy made from it (or from a tensor of the same storage).
void upload(const HostTensor& h, const DeviceTensor& d);
// The device storage copied back, laid out as `like` (the host tensor the device one was made from).
HostTensor to_host(const DeviceTensor& d, const HostTensor& like);
// Every byte of the device storage.
std::vector<uint8_t> device_bytes(const DeviceTensor& d);

// A device buffer holding `bytes` bytes of host memory (at least one byte, so never null).
Buffer upload_bytes(const void* data, size_t bytes);

template <typename T>
std::vector<T> download(const T* device, int64_t count) {
  std::vector<T> host(static_cast<size_t>(count));
  if (count > 0) SAPATTN_CUDA_CHECK(cudaMemcpy(host.data(), device, host.size() * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

// A contiguous tensor copied to `device` (host to device or device to host).
Tensor copy_to(const Tensor& t, Device device);
// A device tensor's values in row-major order (after the copies the legacy stream orders).
std::vector<double> host_values(const Tensor& device_tensor);

// A host tensor and its device copy, kept together (the EAR suites).
struct Twin {
  HostTensor host;
  DeviceTensor device;
  TensorView dev;  // device.view

  explicit Twin(HostTensor h) : host(std::move(h)), device(to_device(host)), dev(device.view) {}
  void upload() const { cuda_test::upload(host, device); }
  HostTensor download() const { return to_host(device, host); }
};

// ---------------------------------------------------------------------------------------------
// Workspaces and graphs
// ---------------------------------------------------------------------------------------------

// A device workspace of `bytes` (at least one byte, so never null).
Buffer device_workspace(size_t bytes);
inline Workspace as_workspace(const Buffer& b) { return {b.data(), b.bytes()}; }

// A captured CUDA graph and its executable.
class CapturedGraph {
 public:
  // Captures what `record` launches on `stream`; a throw from `record` leaves capture mode first.
  CapturedGraph(cudaStream_t stream, const std::function<void()>& record);
  ~CapturedGraph();
  CapturedGraph(const CapturedGraph&) = delete;
  CapturedGraph& operator=(const CapturedGraph&) = delete;
  void launch(cudaStream_t stream) const { SAPATTN_CUDA_CHECK(cudaGraphLaunch(exec_, stream)); }
  size_t nodes() const;

 private:
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

// Runs `sequence` on `stream` eagerly, then captured into a graph and replayed twice into outputs
// poisoned with 0xff bytes: every output's bytes must equal the eager run's (EXPECT). Returns the
// eager run's bytes of each output and the graph's node count.
struct GraphReplay {
  std::vector<std::vector<uint8_t>> eager;
  size_t nodes = 0;
};
GraphReplay expect_replays_match_eager(const TestStream& stream, const std::function<void()>& sequence,
                                       const std::vector<const DeviceTensor*>& outputs);

}  // namespace sapattn::cuda_test
