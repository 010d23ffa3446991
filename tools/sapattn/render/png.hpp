// PNG encoding for the demo's pictures: 8-bit truecolour (RGB) or truecolour with alpha (RGBA),
// non-interlaced, one adaptive filter per row, zlib deflate. Just enough of the format to write
// files every viewer opens; there is no decoder.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "render/canvas.hpp"

namespace sapattn::render {

// The whole PNG file: signature, IHDR, IDAT (split every kPngIdatChunkBytes), IEND.
// Throws InvalidArgumentError for an empty image.
std::vector<std::uint8_t> encode_png(const Image& image);

// Raw pixels: `channels` is 3 (RGB) or 4 (RGBA), rows packed top to bottom with no padding, so
// `pixels` holds width * height * channels bytes. Sizes follow Image's limits.
std::vector<std::uint8_t> encode_png(const std::uint8_t* pixels, int width, int height, int channels);

// Encodes and writes the file, replacing any existing one. Throws IoError naming the path and the
// system's reason when it cannot be created or fully written.
void write_png(const std::string& path, const Image& image);

// Compressed data is cut into IDAT chunks of at most this many bytes; decoders concatenate them.
inline constexpr std::size_t kPngIdatChunkBytes = std::size_t{1} << 20;

}  // namespace sapattn::render
