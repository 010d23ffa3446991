// Argument checks shared by the op entry points (src/ops/, src/svg2/). Each throws the
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
  SAPATTN_CHECK(t.shape[dim] == extent, ShapeError, name, " dim ", t.caller_dim(dim), " must be ", extent, " (", what,
                "), got ", t.describe());
}

// Attention tensors [B,H,S,D]: t's logical dim `dim` must equal ref's. The message names the dim as
// the caller's layout does: "k dim 1 (S of [B,S,H,D]) must be 256 as in q, got [1,100,2,64] f32 cpu".
inline void expect_extent_of(const TensorView& t, int dim, const char* name, const TensorView& ref,
                             const char* ref_name) {
  SAPATTN_CHECK(t.shape[dim] == ref.shape[dim], ShapeError, name, " dim ", t.caller_dim(dim), " (", "BHSD"[dim], " of ",
                t.dim_names(), ") must be ", ref.shape[dim], " as in ", ref_name, ", got ", t.describe());
}

// An attention input with a zero extent has nothing to attend: say so before any other check
// reads its extents (a sequence of 0 tokens would otherwise surface as a text-token error).
inline void expect_nonempty(const TensorView& t, const char* name) {
  SAPATTN_CHECK(t.numel() > 0, ShapeError, name, " is empty (", t.describe(), " as ", t.dim_names(),
                "): attention needs B, S, H and D >= 1");
}

inline void expect_device(const TensorView& t, const Stream& s) {
  SAPATTN_CHECK(t.device == s.device, UnsupportedError, "tensor ", t.describe(), " is not on the stream's device ",
                to_string(s.device));
}

}  // namespace sapattn::checks
