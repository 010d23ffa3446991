// Non-owning tensor views, owning buffers, and the execution stream every op takes.
//
// A TensorView is (pointer, dtype, shape, int64 element strides, device). Attention tensors are
// always seen through the logical shape [B,H,S,D]; a caller holding [B,S,H,D] memory builds the view
// with TensorView::bshd() and passes it without a copy. The view remembers that order, so that an
// error about it prints shapes and dim numbers as the caller wrote them.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "sapattn/dtype.hpp"
#include "sapattn/error.hpp"

namespace sapattn {

enum class DeviceType : uint8_t { CPU, CUDA };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;
  static constexpr Device cpu() { return {DeviceType::CPU, 0}; }
  static constexpr Device cuda(int i = 0) { return {DeviceType::CUDA, i}; }
  bool operator==(const Device&) const = default;
};

std::string to_string(Device d);

inline constexpr int kMaxRank = 4;

struct TensorView {
  // The order in which the caller's own shape lists the dims of a rank-4 attention view. Ops index
  // every view logically ([B,H,S,D], shape and stride below); only messages use the order.
  enum class Order : uint8_t { BHSD, BSHD };

  void* data = nullptr;
  DType dtype = DType::F32;
  int rank = 0;
  std::array<int64_t, kMaxRank> shape{};
  std::array<int64_t, kMaxRank> stride{};  // in elements
  Device device = Device::cpu();
  Order order = Order::BHSD;  // BSHD for views made by bshd() (and the PyTorch ops' inputs)

  // Row-major contiguous view of the given shape.
  static TensorView contiguous(void* data, DType dtype, std::vector<int64_t> shape, Device device = Device::cpu());
  // Logical [B,H,S,D] over memory laid out as [B,H,S,D] (contiguous).
  static TensorView bhsd(void* data, DType dtype, int64_t B, int64_t H, int64_t S, int64_t D,
                         Device device = Device::cpu());
  // Logical [B,H,S,D] over memory laid out as [B,S,H,D] (contiguous), the layout of diffusers;
  // its messages speak [B,S,H,D] (order = BSHD).
  static TensorView bshd(void* data, DType dtype, int64_t B, int64_t H, int64_t S, int64_t D,
                         Device device = Device::cpu());

  int64_t size(int dim) const { return shape[dim]; }
  int64_t numel() const;
  bool empty() const { return data == nullptr; }
  bool is_contiguous() const;
  // Element offset of a multi-index (missing trailing indices are 0).
  int64_t offset(std::array<int64_t, kMaxRank> idx) const {
    int64_t o = 0;
    for (int i = 0; i < rank; ++i) o += idx[i] * stride[i];
    return o;
  }
  // View of dims [lo, hi) along `dim` (same strides).
  TensorView slice(int dim, int64_t lo, int64_t hi) const;
  // "[2,4,128,64] bf16 cpu" for messages: the shape in the caller's order.
  std::string describe() const;
  // The index the caller's shape gives logical dim `dim` (S is dim 1 of a BSHD view).
  int caller_dim(int dim) const { return order == Order::BSHD && rank == 4 && (dim == 1 || dim == 2) ? 3 - dim : dim; }
  // "[B,S,H,D]" or "[B,H,S,D]": how the caller's shape names the dims of a rank-4 attention view.
  const char* dim_names() const { return order == Order::BSHD ? "[B,S,H,D]" : "[B,H,S,D]"; }
};

// Owning, device-tagged memory. CPU memory is 64-byte aligned. Allocation on a device this build
// has no backend for throws UnsupportedError.
class Buffer {
 public:
  Buffer() = default;
  static Buffer allocate(size_t bytes, Device device = Device::cpu());
  void* data() const { return ptr_.get(); }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  std::shared_ptr<void> ptr_;
  size_t bytes_ = 0;
  Device device_ = Device::cpu();
};

// A contiguous owning tensor: a Buffer plus shape and dtype.
class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, std::vector<int64_t> shape, Device device = Device::cpu());
  TensorView view() const;
  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t numel() const;
  size_t bytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  void* data() const { return buffer_.data(); }
  template <typename T>
  T* data_as() const {
    return static_cast<T*>(buffer_.data());
  }
  Device device() const { return buffer_.device(); }
  bool defined() const { return buffer_.data() != nullptr || numel() == 0; }

 private:
  Buffer buffer_;
  DType dtype_ = DType::F32;
  std::vector<int64_t> shape_;
};

// Where an op runs: the device, and for CUDA the cudaStream_t (as void*) every launch goes to.
// CPU ops run synchronously on the calling thread plus `cpu_threads - 1` workers
// (0 = all hardware threads).
struct Stream {
  Device device = Device::cpu();
  void* handle = nullptr;
  int cpu_threads = 0;
  static Stream cpu(int threads = 0) { return {Device::cpu(), nullptr, threads}; }
};

// Caller-owned scratch memory, CUB style: ask the op for its bytes, allocate once, pass it in.
struct Workspace {
  void* data = nullptr;
  size_t bytes = 0;
};

}  // namespace sapattn
