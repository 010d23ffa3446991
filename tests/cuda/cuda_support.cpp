// The GPU suites' shared helpers (cuda_support.hpp) and the global environment of test_cuda_ops.
#include "cuda_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <utility>

namespace sapattn::cuda_test {
namespace {

// Fails the run before any test when there is no GPU, and names the one the tests run on (the
// "[device]" line goes to numbers.txt, scripts/device/test.sh).
struct Environment : ::testing::Environment {
  void SetUp() override {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    ASSERT_EQ(e, cudaSuccess) << "no CUDA device: " << cudaGetErrorString(e);
    ASSERT_GT(count, 0) << "no CUDA device";
    cudaDeviceProp prop{};
    SAPATTN_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("[device] %s, sm_%d%d, %d SMs\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
  }
};
[[maybe_unused]] const auto* const kEnvironment = ::testing::AddGlobalTestEnvironment(new Environment);

// `view`'s data moved from `from`'s storage to the same byte offset in `to`.
void* same_offset(const TensorView& view, const void* from, void* to) {
  return static_cast<char*>(to) + (static_cast<const char*>(view.data) - static_cast<const char*>(from));
}

}  // namespace

std::vector<int64_t> shape_of(const TensorView& v) { return {v.shape.begin(), v.shape.begin() + v.rank}; }

HostTensor poisoned(DType dtype, std::vector<int64_t> shape, ref::Layout layout) {
  HostTensor t = ref::make_tensor(dtype, std::move(shape), layout);
  ref::poison(t);
  return t;
}

HostTensor deep_copy(const HostTensor& t) {
  HostTensor c{Tensor(t.storage.dtype(), t.storage.shape()), t.view};
  std::memcpy(c.storage.data(), t.storage.data(), t.storage.bytes());
  c.view.data = same_offset(t.view, t.storage.data(), c.storage.data());
  return c;
}

const char* layout_tag(ref::Layout layout) {
  return layout == ref::Layout::Transposed ? "bshd" : ref::layout_name(layout);
}

HostTensor mixture_points(DType dtype, int64_t B, int64_t H, int64_t N, int64_t D, ref::Layout layout, int64_t modes,
                          ref::Rng& rng) {
  HostTensor x = poisoned(dtype, {B, H, N, D}, layout);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      std::vector<double> centers(static_cast<size_t>(std::max<int64_t>(modes, 1) * D));
      for (double& c : centers) c = modes > 0 ? 2.0 * rng.normal() : 0.0;
      for (int64_t i = 0; i < N; ++i) {
        const int64_t m = modes > 0 ? rng.integer(0, modes - 1) : 0;
        for (int64_t d = 0; d < D; ++d)
          ref::set(x.view, {b, h, i, d}, centers[static_cast<size_t>(m * D + d)] + rng.normal());
      }
    }
  return x;
}

DeviceTensor to_device(const HostTensor& h) {
  DeviceTensor d;
  if (h.storage.data() == nullptr) return d;
  d.buffer = Buffer::allocate(h.storage.bytes(), Device::cuda(0));
  upload(h, d);
  d.view = h.view;
  d.view.data = same_offset(h.view, h.storage.data(), d.buffer.data());
  d.view.device = Device::cuda(0);
  return d;
}

void upload(const HostTensor& h, const DeviceTensor& d) {
  if (h.storage.data() == nullptr) return;
  SAPATTN_CUDA_CHECK(cudaMemcpy(d.buffer.data(), h.storage.data(), h.storage.bytes(), cudaMemcpyHostToDevice));
}

HostTensor to_host(const DeviceTensor& d, const HostTensor& like) {
  HostTensor h;
  if (d.buffer.data() == nullptr) return h;
  h.storage = Tensor(like.storage.dtype(), like.storage.shape());
  SAPATTN_CUDA_CHECK(cudaMemcpy(h.storage.data(), d.buffer.data(), h.storage.bytes(), cudaMemcpyDeviceToHost));
  h.view = like.view;
  h.view.data = same_offset(like.view, like.storage.data(), h.storage.data());
  return h;
}

std::vector<uint8_t> device_bytes(const DeviceTensor& d) {
  return download(static_cast<const uint8_t*>(d.buffer.data()), static_cast<int64_t>(d.buffer.bytes()));
}

Buffer upload_bytes(const void* data, size_t bytes) {
  Buffer b = device_workspace(bytes);
  if (bytes > 0) SAPATTN_CUDA_CHECK(cudaMemcpy(b.data(), data, bytes, cudaMemcpyHostToDevice));
  return b;
}

Tensor copy_to(const Tensor& t, Device device) {
  Tensor c(t.dtype(), t.shape(), device);
  const auto kind = device.type == DeviceType::CUDA ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost;
  SAPATTN_CUDA_CHECK(cudaMemcpy(c.data(), t.data(), t.bytes(), kind));
  return c;
}

std::vector<double> host_values(const Tensor& device_tensor) {
  return ref::to_vector(copy_to(device_tensor, Device::cpu()).view());
}

Buffer device_workspace(size_t bytes) { return Buffer::allocate(std::max<size_t>(bytes, 1), Device::cuda(0)); }

CapturedGraph::CapturedGraph(cudaStream_t stream, const std::function<void()>& record) {
  SAPATTN_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  try {
    record();
  } catch (...) {
    (void)cudaStreamEndCapture(stream, &graph_);  // leave capture mode before reporting
    if (graph_ != nullptr) (void)cudaGraphDestroy(graph_);
    throw;
  }
  SAPATTN_CUDA_CHECK(cudaStreamEndCapture(stream, &graph_));
  const cudaError_t e = cudaGraphInstantiate(&exec_, graph_, 0);
  if (e != cudaSuccess) (void)cudaGraphDestroy(graph_);
  SAPATTN_CUDA_CHECK(e);
}

CapturedGraph::~CapturedGraph() {
  (void)cudaGraphExecDestroy(exec_);
  (void)cudaGraphDestroy(graph_);
}

size_t CapturedGraph::nodes() const {
  size_t n = 0;
  SAPATTN_CUDA_CHECK(cudaGraphGetNodes(graph_, nullptr, &n));
  return n;
}

GraphReplay expect_replays_match_eager(const TestStream& stream, const std::function<void()>& sequence,
                                       const std::vector<const DeviceTensor*>& outputs) {
  auto snapshot = [&] {
    stream.sync();
    std::vector<std::vector<uint8_t>> s;
    for (const DeviceTensor* d : outputs) s.push_back(device_bytes(*d));
    return s;
  };
  auto poison = [&] {
    for (const DeviceTensor* d : outputs) SAPATTN_CUDA_CHECK(cudaMemset(d->buffer.data(), 0xff, d->buffer.bytes()));
  };
  sequence();
  GraphReplay r;
  r.eager = snapshot();
  poison();
  const CapturedGraph graph(stream.handle(), sequence);
  r.nodes = graph.nodes();
  for (int replay = 0; replay < 2; ++replay) {
    poison();
    graph.launch(stream.handle());
    const auto replayed = snapshot();
    for (size_t i = 0; i < outputs.size(); ++i)
      EXPECT_EQ(replayed[i], r.eager[i]) << "output " << i << " replay " << replay;
  }
  return r;
}

}  // namespace sapattn::cuda_test
