// Tensor files: NumPy .npy (fp32, fp16) and .safetensors (F32, F16, BF16). Readers validate the
// whole header against the file (magic, version, dtype, shape, offsets, sizes) and throw
// FormatError naming the problem; files that cannot be opened throw IoError.
#pragma once

#include <cstddef>
#include <map>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "sapattn/tensor.hpp"

namespace sapattn::io {

// .npy versions 1.0, 2.0 and 3.0, little-endian '<f4' or '<f2', C order, any rank up to 4.
Tensor parse_npy(std::span<const std::byte> bytes);
Tensor read_npy(const std::string& path);
// Writes version 1.0 (2.0 when the header needs it). f32 and f16 only: bf16 throws DTypeError
// (NumPy has no bf16; use safetensors). Any strides: the file holds the row-major copy.
std::vector<std::byte> serialize_npy(const TensorView& t);
void write_npy(const std::string& path, const TensorView& t);

// .safetensors: 8-byte little-endian header size, JSON header, data. Every tensor of the file is
// returned by name; "__metadata__" is accepted and ignored.
std::map<std::string, Tensor> parse_safetensors(std::span<const std::byte> bytes);
std::map<std::string, Tensor> read_safetensors(const std::string& path);
std::vector<std::byte> serialize_safetensors(
    const std::vector<std::pair<std::string, TensorView>>& tensors);
void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, TensorView>>& tensors);

// Picks the reader by extension (.npy, .safetensors); other extensions throw FormatError.
// For .safetensors, `name` selects the tensor (FormatError if absent).
Tensor read_tensor(const std::string& path, const std::string& name);

}  // namespace sapattn::io
