// Row access to [B,H,S,D] views of any float dtype and strides, converting through fp32.
#pragma once

#include <cstdint>

#include "sapattn/error.hpp"
#include "sapattn/tensor.hpp"

namespace sapattn::cpu {

inline const char* row_ptr(const TensorView& t, int64_t b, int64_t h, int64_t s) {
  return static_cast<const char*>(t.data) +
         (b * t.stride[0] + h * t.stride[1] + s * t.stride[2]) * static_cast<int64_t>(dtype_size(t.dtype));
}

// dst[0..D) = t[b,h,s,:] as fp32.
inline void load_row(const TensorView& t, int64_t b, int64_t h, int64_t s, float* dst) {
  load_run_as_f32(row_ptr(t, b, h, s), t.dtype, 0, t.stride[3], t.shape[3], dst);
}

// t[b,h,s,:] = src[0..D), rounded to t's dtype.
inline void store_row(const TensorView& t, int64_t b, int64_t h, int64_t s, const float* src) {
  store_run_from_f32(const_cast<char*>(row_ptr(t, b, h, s)), t.dtype, 0, t.stride[3], t.shape[3], src);
}

// Element (i0, i1, i2, i3) of a view of rank <= 4 of a given C type.
template <typename T>
inline T& at(const TensorView& t, int64_t i0, int64_t i1 = 0, int64_t i2 = 0, int64_t i3 = 0) {
  return static_cast<T*>(t.data)[i0 * t.stride[0] + i1 * t.stride[1] + i2 * t.stride[2] + i3 * t.stride[3]];
}

// a . b in fp32 with 8 independent lanes: vectorises without reassociation, so the result is the
// same on every run and thread count.
inline float dot(const float* a, const float* b, int64_t D) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int j = 0; j < 8; ++j) part[j] += a[d + j] * b[d + j];
  for (; d < D; ++d) part[0] += a[d] * b[d];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// Throws InvalidArgumentError naming the first negative entry of a [B,H,C] i32 size tensor.
inline void check_sizes_nonnegative(const TensorView& sizes, const char* name) {
  const int64_t B = sizes.shape[0], H = sizes.shape[1], C = sizes.shape[2];
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < C; ++j)
        SAPATTN_CHECK(at<int32_t>(sizes, b, h, j) >= 0, InvalidArgumentError, name, "[b=", b, ", h=", h, ", ", j,
                      "] = ", at<int32_t>(sizes, b, h, j), " is negative");
}

// Throws InvalidArgumentError unless every entry of the i32 [B,H,N] index tensor (unit stride
// along N) lies in [0, limit). Ops check before writing, so bad indices leave outputs untouched.
inline void check_index_range(const TensorView& index, int64_t limit, const char* what) {
  const int64_t B = index.shape[0], H = index.shape[1], N = index.shape[2];
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int32_t* p = &at<int32_t>(index, b, h);
      for (int64_t i = 0; i < N; ++i)
        SAPATTN_CHECK(p[i] >= 0 && p[i] < limit, InvalidArgumentError, what, "[b=", b, ", h=", h, ", ", i, "] = ", p[i],
                      " is outside [0, ", limit, ")");
    }
}

}  // namespace sapattn::cpu
