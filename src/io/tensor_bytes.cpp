#include "io/tensor_bytes.hpp"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <system_error>

#include "sapattn/error.hpp"

namespace sapattn::io::detail {
namespace {

std::string errno_text(int err) { return std::generic_category().message(err); }

}  // namespace

std::string shape_string(std::span<const int64_t> shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ',';
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

std::optional<int64_t> checked_byte_size(std::span<const int64_t> shape, size_t itemsize) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  int64_t product = static_cast<int64_t>(itemsize);
  bool has_zero = false;
  for (const int64_t e : shape) {
    if (e < 0) return std::nullopt;
    if (e == 0) {
      has_zero = true;
      continue;
    }
    if (product > kMax / e) return std::nullopt;
    product *= e;
  }
  return has_zero ? 0 : product;
}

void check_serializable(const TensorView& t, std::string_view what) {
  SAPATTN_CHECK(t.device.type == DeviceType::CPU, UnsupportedError, what, " needs a CPU tensor, got ", t.describe(),
                "; copy it to the host first");
  SAPATTN_CHECK(t.rank >= 0 && t.rank <= kMaxRank, ShapeError, what, ": rank ", t.rank, " is outside [0, ", kMaxRank,
                "]");
  const std::span<const int64_t> shape(t.shape.data(), static_cast<size_t>(t.rank));
  for (int i = 0; i < t.rank; ++i) {
    SAPATTN_CHECK(t.shape[i] >= 0, ShapeError, what, ": negative extent ", t.shape[i], " in dim ", i);
  }
  SAPATTN_CHECK(checked_byte_size(shape, dtype_size(t.dtype)).has_value(), ShapeError, what, ": shape ",
                shape_string(shape), " holds more bytes than fit in int64");
  SAPATTN_CHECK(t.data != nullptr || t.numel() == 0, InvalidArgumentError, what, ": tensor ", t.describe(),
                " has no data");
}

void append_row_major(const TensorView& t, std::vector<std::byte>& out) {
  const size_t item = dtype_size(t.dtype);
  const int64_t n = t.numel();
  const size_t start = out.size();
  out.resize(start + static_cast<size_t>(n) * item);
  if (n == 0) return;
  std::byte* dst = out.data() + start;
  const auto* src = static_cast<const std::byte*>(t.data);
  if (t.is_contiguous()) {
    std::memcpy(dst, src, static_cast<size_t>(n) * item);
    return;
  }
  // Right-align the dims into four so one loop nest covers every rank; padded dims have extent 1.
  std::array<int64_t, kMaxRank> shape{1, 1, 1, 1};
  std::array<int64_t, kMaxRank> stride{0, 0, 0, 0};
  for (int i = 0; i < t.rank; ++i) {
    shape[kMaxRank - t.rank + i] = t.shape[i];
    stride[kMaxRank - t.rank + i] = t.stride[i];
  }
  const auto bytes_at = [&](int64_t elements) { return elements * static_cast<int64_t>(item); };
  const bool rows_contiguous = stride[3] == 1;
  for (int64_t i0 = 0; i0 < shape[0]; ++i0) {
    for (int64_t i1 = 0; i1 < shape[1]; ++i1) {
      for (int64_t i2 = 0; i2 < shape[2]; ++i2) {
        const std::byte* row = src + bytes_at(i0 * stride[0] + i1 * stride[1] + i2 * stride[2]);
        if (rows_contiguous) {
          std::memcpy(dst, row, static_cast<size_t>(shape[3]) * item);
          dst += shape[3] * static_cast<int64_t>(item);
          continue;
        }
        for (int64_t i3 = 0; i3 < shape[3]; ++i3) {
          std::memcpy(dst, row + bytes_at(i3 * stride[3]), item);
          dst += item;
        }
      }
    }
  }
}

std::vector<std::byte> read_file(const std::string& path) {
  std::FILE* raw = std::fopen(path.c_str(), "rb");
  SAPATTN_CHECK(raw != nullptr, IoError, "cannot open '", path, "': ", errno_text(errno));
  const std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(raw, &std::fclose);
  // Read in chunks rather than trusting a size from fseek: that also covers pipes and /proc files.
  std::vector<std::byte> bytes;
  std::vector<std::byte> chunk(1 << 20);
  while (true) {
    const size_t n = std::fread(chunk.data(), 1, chunk.size(), raw);
    bytes.insert(bytes.end(), chunk.begin(), chunk.begin() + static_cast<std::ptrdiff_t>(n));
    if (n < chunk.size()) {
      SAPATTN_CHECK(!std::ferror(raw), IoError, "cannot read '", path, "': ", errno_text(errno));
      return bytes;
    }
  }
}

void write_file(const std::string& path, std::span<const std::byte> bytes) {
  std::FILE* file = std::fopen(path.c_str(), "wb");
  SAPATTN_CHECK(file != nullptr, IoError, "cannot create '", path, "': ", errno_text(errno));
  const bool written = bytes.empty() || std::fwrite(bytes.data(), 1, bytes.size(), file) == bytes.size();
  int err = errno;
  const bool closed = std::fclose(file) == 0;  // flushes: a full disk may only show up here
  if (written && closed) return;
  if (written) err = errno;
  std::remove(path.c_str());
  SAPATTN_THROW(IoError, "cannot write ", bytes.size(), " bytes to '", path, "': ", errno_text(err));
}

}  // namespace sapattn::io::detail
