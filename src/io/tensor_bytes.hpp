// Shared by the .npy and .safetensors code: sizes, row-major serialisation of strided views, and
// whole-file reads and writes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "sapattn/tensor.hpp"

namespace sapattn::io::detail {

// "[2,3,5]".
std::string shape_string(std::span<const int64_t> shape);

// numel * itemsize for non-negative extents, or nullopt when the product of the nonzero extents
// times itemsize exceeds int64: Tensor and TensorView compute numel and strides in int64 without
// overflow checks, and a zero extent must not hide an overflowing product of the others.
std::optional<int64_t> checked_byte_size(std::span<const int64_t> shape, size_t itemsize);

// Checks that `t` can be serialized: a CPU view (UnsupportedError otherwise), rank 0..4 with
// non-negative extents whose byte size fits (ShapeError), data present when numel > 0
// (InvalidArgumentError). `what` names the caller in messages.
void check_serializable(const TensorView& t, std::string_view what);

// Appends the elements of `t` in row-major order as raw little-endian bytes (any strides).
void append_row_major(const TensorView& t, std::vector<std::byte>& out);

// The whole file. IoError naming the path and the system's reason when it cannot be read.
std::vector<std::byte> read_file(const std::string& path);
// Creates or truncates the file. IoError naming the path and the reason; a partial file is removed.
void write_file(const std::string& path, std::span<const std::byte> bytes);

}  // namespace sapattn::io::detail
