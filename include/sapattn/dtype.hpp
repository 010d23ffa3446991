// Element types and host-side conversions between fp32 and the 16-bit formats.
// Conversions round to nearest even; NaN stays NaN, overflow becomes Inf (IEEE behaviour).
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace sapattn {

enum class DType : uint8_t { F32, F16, BF16, I32, U8 };

constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32:
      return 4;
    case DType::F16:
      return 2;
    case DType::BF16:
      return 2;
    case DType::I32:
      return 4;
    case DType::U8:
      return 1;
  }
  return 0;
}

constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::F32:
      return "f32";
    case DType::F16:
      return "f16";
    case DType::BF16:
      return "bf16";
    case DType::I32:
      return "i32";
    case DType::U8:
      return "u8";
  }
  return "?";
}

constexpr bool is_floating(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

inline float bf16_to_f32(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                                       // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Reads element i (counted in elements, not bytes) of a floating buffer as fp32.
inline float load_as_f32(const void* base, DType t, int64_t i) {
  switch (t) {
    case DType::F32:
      return static_cast<const float*>(base)[i];
    case DType::F16:
      return f16_to_f32(static_cast<const uint16_t*>(base)[i]);
    case DType::BF16:
      return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
    default:
      return 0.0f;  // callers check is_floating() first
  }
}

inline void store_from_f32(void* base, DType t, int64_t i, float v) {
  switch (t) {
    case DType::F32:
      static_cast<float*>(base)[i] = v;
      break;
    case DType::F16:
      static_cast<uint16_t*>(base)[i] = f32_to_f16(v);
      break;
    case DType::BF16:
      static_cast<uint16_t*>(base)[i] = f32_to_bf16(v);
      break;
    default:
      break;  // callers check is_floating() first
  }
}

// A run of n elements of a floating buffer, elements offset + i * stride for i in [0, n): read as
// fp32 into dst, or written from src rounded to the dtype. The dtype is switched on once per run,
// not per element (the generator converts 10^9 elements at 720p). A non-floating dtype reads as
// zeros and writes nothing, as load_as_f32 and store_from_f32 (callers check is_floating() first).
inline void load_run_as_f32(const void* base, DType t, int64_t offset, int64_t stride, int64_t n, float* dst) {
  switch (t) {
    case DType::F32: {
      const float* p = static_cast<const float*>(base) + offset;
      if (stride == 1) {
        std::copy(p, p + n, dst);
      } else {
        for (int64_t i = 0; i < n; ++i) dst[i] = p[i * stride];
      }
      return;
    }
    case DType::F16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(p[i * stride]);
      return;
    }
    case DType::BF16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(p[i * stride]);
      return;
    }
    default:
      std::fill(dst, dst + n, 0.0f);
      return;
  }
}

inline void store_run_from_f32(void* base, DType t, int64_t offset, int64_t stride, int64_t n, const float* src) {
  switch (t) {
    case DType::F32: {
      float* p = static_cast<float*>(base) + offset;
      if (stride == 1) {
        std::copy(src, src + n, p);
      } else {
        for (int64_t i = 0; i < n; ++i) p[i * stride] = src[i];
      }
      return;
    }
    case DType::F16: {
      uint16_t* p = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) p[i * stride] = f32_to_f16(src[i]);
      return;
    }
    case DType::BF16: {
      uint16_t* p = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) p[i * stride] = f32_to_bf16(src[i]);
      return;
    }
    default:
      return;
  }
}

}  // namespace sapattn
