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

// .npy versions 1.0, 2.0 and 3.0, little-endian '<f4' or '<f2', C order, rank 0 (a NumPy scalar
// array) to 4. The data must be exactly numel * itemsize bytes.
Tensor parse_npy(std::span<const std::byte> bytes);
Tensor read_npy(const std::string& path);
// Writes version 1.0 (2.0 when the header needs it), byte-identical to np.save of the same array.
// f32 and f16 only: bf16 throws DTypeError (NumPy has no bf16; use safetensors). Any strides: the
// file holds the row-major copy. A non-CPU view throws UnsupportedError.
std::vector<std::byte> serialize_npy(const TensorView& t);
void write_npy(const std::string& path, const TensorView& t);

// .safetensors: 8-byte little-endian header size, JSON header, data. Every tensor of the file is
// returned by name; "__metadata__" is accepted and ignored. F32, F16 and BF16, rank 0 to 4; the
// tensors must tile the data buffer exactly (no overlap, no hole), as the format requires.
std::map<std::string, Tensor> parse_safetensors(std::span<const std::byte> bytes);
std::map<std::string, Tensor> read_safetensors(const std::string& path);
// Tensors in the given order with contiguous offsets; names must be unique, non-empty, valid UTF-8
// and not "__metadata__" (InvalidArgumentError).
std::vector<std::byte> serialize_safetensors(const std::vector<std::pair<std::string, TensorView>>& tensors);
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, TensorView>>& tensors);

// Picks the reader by extension (.npy, .safetensors, any letter case); other extensions throw
// FormatError. For .safetensors, `name` selects the tensor (FormatError listing the names if
// absent); for .npy it is not used.
Tensor read_tensor(const std::string& path, const std::string& name);

}  // namespace sapattn::io
