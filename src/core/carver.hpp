// Carving one caller-owned Workspace into 256-byte aligned slices, for every op and backend. With
// no workspace the same carver only counts bytes (for the *_workspace_bytes queries), so a query
// and the carve that follows can never disagree.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "sapattn/error.hpp"
#include "sapattn/tensor.hpp"

namespace sapattn {

class Carver {
 public:
  // `op` names the caller in WorkspaceError messages.
  explicit Carver(const char* op, Workspace ws = {}) : op_(op), ws_(ws) {}

  void* take_bytes(size_t bytes) {
    void* p = ws_.data != nullptr ? static_cast<char*>(ws_.data) + used_ : nullptr;
    used_ += (bytes + 255) / 256 * 256;
    return p;
  }
  template <typename T>
  T* take(int64_t count) {
    return static_cast<T*>(take_bytes(static_cast<size_t>(count) * sizeof(T)));
  }
  // A contiguous view of a fresh slice.
  TensorView take_view(DType dtype, std::vector<int64_t> shape, Device device) {
    int64_t n = 1;
    for (int64_t e : shape) n *= e;
    return TensorView::contiguous(take_bytes(static_cast<size_t>(n) * dtype_size(dtype)), dtype, std::move(shape),
                                  device);
  }
  size_t used() const { return used_; }
  // Throws WorkspaceError unless the workspace holds everything taken so far.
  void check() const {
    SAPATTN_CHECK(ws_.data != nullptr || used_ == 0, WorkspaceError, op_, " needs a workspace of ", used_,
                  " bytes (ask its *_workspace_bytes), got none");
    SAPATTN_CHECK(ws_.bytes >= used_, WorkspaceError, op_, " needs ", used_, " bytes of workspace, got ", ws_.bytes);
  }

 private:
  const char* op_;
  Workspace ws_;
  size_t used_ = 0;
};

}  // namespace sapattn
