#include "sapattn/tensor.hpp"

#include <cstdlib>
#include <new>
#include <sstream>

#if SAPATTN_HAS_CUDA
#include "core/cuda_check.hpp"
#endif

namespace sapattn {

std::string to_string(Device d) {
  return d.type == DeviceType::CPU ? std::string("cpu") : "cuda:" + std::to_string(d.index);
}

TensorView TensorView::contiguous(void* data, DType dtype, std::vector<int64_t> shape, Device device) {
  SAPATTN_CHECK(shape.size() <= kMaxRank, ShapeError, "rank ", shape.size(), " exceeds ", kMaxRank);
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.rank = static_cast<int>(shape.size());
  t.device = device;
  int64_t s = 1;
  for (int i = t.rank - 1; i >= 0; --i) {
    SAPATTN_CHECK(shape[i] >= 0, ShapeError, "negative extent ", shape[i], " in dim ", i);
    t.shape[i] = shape[i];
    t.stride[i] = s;
    s *= shape[i];
  }
  return t;
}

TensorView TensorView::bhsd(void* data, DType dtype, int64_t B, int64_t H, int64_t S, int64_t D, Device device) {
  return contiguous(data, dtype, {B, H, S, D}, device);
}

TensorView TensorView::bshd(void* data, DType dtype, int64_t B, int64_t H, int64_t S, int64_t D, Device device) {
  // Memory [B,S,H,D]; logical dims (b,h,s,d) map to strides (S*H*D, D, H*D, 1).
  TensorView t = contiguous(data, dtype, {B, H, S, D}, device);
  t.stride = {S * H * D, D, H * D, 1};
  t.order = Order::BSHD;
  return t;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < rank; ++i) n *= shape[i];
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t s = 1;
  for (int i = rank - 1; i >= 0; --i) {
    if (shape[i] != 1 && stride[i] != s) return false;
    s *= shape[i];
  }
  return true;
}

TensorView TensorView::slice(int dim, int64_t lo, int64_t hi) const {
  SAPATTN_CHECK(dim >= 0 && dim < rank, ShapeError, "slice dim ", dim, " out of rank ", rank);
  SAPATTN_CHECK(0 <= lo && lo <= hi && hi <= shape[dim], ShapeError, "slice [", lo, ",", hi, ") out of extent ",
                shape[dim], " in dim ", dim);
  TensorView t = *this;
  if (data != nullptr) t.data = static_cast<char*>(data) + lo * stride[dim] * static_cast<int64_t>(dtype_size(dtype));
  t.shape[dim] = hi - lo;
  return t;
}

std::string TensorView::describe() const {
  std::ostringstream os;
  std::array<int64_t, kMaxRank> caller_shape{};
  for (int i = 0; i < rank; ++i) caller_shape[caller_dim(i)] = shape[i];
  os << "[";
  for (int i = 0; i < rank; ++i) os << (i ? "," : "") << caller_shape[i];
  os << "] " << dtype_name(dtype) << " " << to_string(device);
  return os.str();
}

Buffer Buffer::allocate(size_t bytes, Device device) {
#if SAPATTN_HAS_CUDA
  if (device.type == DeviceType::CUDA) {
    // cudaMalloc on the given device (256-byte aligned); freed on that device with the last owner.
    // Plain device memory, never managed memory (which can hang a GPU when oversubscribed).
    Buffer b;
    b.bytes_ = bytes;
    b.device_ = device;
    const cuda::DeviceGuard guard(device);
    if (bytes == 0) return b;
    void* p = nullptr;
    SAPATTN_CUDA_CHECK(cudaMalloc(&p, bytes));
    const int index = device.index;
    b.ptr_ = std::shared_ptr<void>(p, [index](void* q) {
      int previous = 0;
      if (cudaGetDevice(&previous) != cudaSuccess) return;
      if (previous != index) (void)cudaSetDevice(index);
      (void)cudaFree(q);  // a destructor cannot throw; a failed free leaves a sticky error to the next call
      if (previous != index) (void)cudaSetDevice(previous);
    });
    return b;
  }
#endif
  SAPATTN_CHECK(device.type == DeviceType::CPU, UnsupportedError, "cannot allocate on ", to_string(device),
                ": this build has only the CPU backend");
  Buffer b;
  b.bytes_ = bytes;
  b.device_ = device;
  if (bytes == 0) return b;
  const size_t rounded = (bytes + 63) / 64 * 64;  // aligned_alloc wants a multiple of the alignment
  void* p = std::aligned_alloc(64, rounded);
  if (p == nullptr) throw std::bad_alloc();
  b.ptr_ = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  return b;
}

Tensor::Tensor(DType dtype, std::vector<int64_t> shape, Device device) : dtype_(dtype), shape_(std::move(shape)) {
  SAPATTN_CHECK(shape_.size() <= kMaxRank, ShapeError, "rank ", shape_.size(), " exceeds ", kMaxRank);
  for (int64_t e : shape_) SAPATTN_CHECK(e >= 0, ShapeError, "negative extent ", e);
  buffer_ = Buffer::allocate(bytes(), device);
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t e : shape_) n *= e;
  return n;
}

TensorView Tensor::view() const { return TensorView::contiguous(buffer_.data(), dtype_, shape_, buffer_.device()); }

}  // namespace sapattn
