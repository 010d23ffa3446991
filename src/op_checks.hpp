// Argument checks shared by the op entry points (src/ops.cpp, src/svg2.cpp). Each throws the
// typed error the contract names, with the tensor's name and what was expected.
#pragma once

#include <cmath>

#include "sapattn/error.hpp"
#include "sapattn/tensor.hpp"

namespace sapattn::checks {

inline void expect_rank(const TensorView& t, int rank, const char* name) {
  SAPATTN_CHECK(t.data != nullptr || t.numel() == 0, ShapeError, name, ": null data pointer");
  SAPATTN_CHECK(t.rank == rank, ShapeError, name, " must have rank ", rank, ", got ", t.describe());
  for (int d = 0; d < t.rank; ++d)
    SAPATTN_CHECK(t.shape[d] >= 0, ShapeError, name, " has a negative extent: ", t.describe());
}

inline void expect_dtype(const TensorView& t, DType dtype, const char* name) {
  SAPATTN_CHECK(t.dtype == dtype, DTypeError, name, " must be ", dtype_name(dtype), ", got ", t.describe());
}

inline void expect_floating(const TensorView& t, const char* name) {
  SAPATTN_CHECK(is_floating(t.dtype), DTypeError, name, " must be f32, f16 or bf16, got ", t.describe());
}

inline void expect_contiguous(const TensorView& t, const char* name) {
  SAPATTN_CHECK(t.is_contiguous(), ShapeError, name, " must be contiguous, got strides of ", t.describe());
}

inline void expect_extent(const TensorView& t, int dim, int64_t extent, const char* name, const char* what) {
  SAPATTN_CHECK(t.shape[dim] == extent, ShapeError, name, " dim ", dim, " must be ", extent, " (", what, "), got ",
                t.describe());
}

inline void expect_device(const TensorView& t, const Stream& s) {
  SAPATTN_CHECK(t.device == s.device, UnsupportedError, "tensor ", t.describe(), " is not on the stream's device ",
                to_string(s.device));
}

}  // namespace sapattn::checks
