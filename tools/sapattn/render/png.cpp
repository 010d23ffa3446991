#include "render/png.hpp"

#include <zlib.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "sapattn/error.hpp"

namespace sapattn::render {
namespace {

constexpr std::array<std::uint8_t, 8> kSignature = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};

void put_u32(std::vector<std::uint8_t>& out, std::uint32_t v) {
  out.push_back(static_cast<std::uint8_t>(v >> 24));
  out.push_back(static_cast<std::uint8_t>(v >> 16));
  out.push_back(static_cast<std::uint8_t>(v >> 8));
  out.push_back(static_cast<std::uint8_t>(v));
}

// Appends one chunk: length, type, data, and the CRC-32 of type and data.
void put_chunk(std::vector<std::uint8_t>& out, const char (&type)[5], const std::uint8_t* data, std::size_t size) {
  put_u32(out, static_cast<std::uint32_t>(size));
  const std::size_t type_at = out.size();
  out.insert(out.end(), type, type + 4);
  if (size > 0) out.insert(out.end(), data, data + size);
  const uLong crc = crc32(crc32(0L, Z_NULL, 0), out.data() + type_at, static_cast<uInt>(4 + size));
  put_u32(out, static_cast<std::uint32_t>(crc));
}

std::uint8_t paeth(int a, int b, int c) {
  const int p = a + b - c;
  const int pa = std::abs(p - a);
  const int pb = std::abs(p - b);
  const int pc = std::abs(p - c);
  if (pa <= pb && pa <= pc) return static_cast<std::uint8_t>(a);
  return static_cast<std::uint8_t>(pb <= pc ? b : c);
}

// The byte that filter `type` stores for position i of a row (a: left, b: above, c: above-left).
std::uint8_t filtered_byte(int type, const std::uint8_t* row, const std::uint8_t* prev, std::size_t i,
                           std::size_t bpp) {
  const int a = i >= bpp ? row[i - bpp] : 0;
  const int b = prev ? prev[i] : 0;
  const int c = prev && i >= bpp ? prev[i - bpp] : 0;
  int predicted = 0;
  switch (type) {
    case 1:
      predicted = a;
      break;
    case 2:
      predicted = b;
      break;
    case 3:
      predicted = (a + b) / 2;
      break;
    case 4:
      predicted = paeth(a, b, c);
      break;
    default:
      break;
  }
  return static_cast<std::uint8_t>(row[i] - predicted);
}

// Picks, per row, the filter whose output read as signed bytes has the smallest sum of
// magnitudes (the heuristic the PNG specification suggests), then appends the filter type and
// the filtered row. Five cost passes per row are cheap next to deflate and shrink charts and
// heatmaps (long runs, smooth ramps) well.
void filter_row(const std::uint8_t* row, const std::uint8_t* prev, std::size_t row_bytes, std::size_t bpp,
                std::vector<std::uint8_t>& out) {
  std::size_t best_cost = SIZE_MAX;
  int best_type = 0;
  for (int type = 0; type <= 4; ++type) {
    std::size_t cost = 0;
    for (std::size_t i = 0; i < row_bytes && cost < best_cost; ++i) {
      const std::uint8_t v = filtered_byte(type, row, prev, i, bpp);
      cost += v < 128 ? v : 256 - v;
    }
    if (cost < best_cost) {
      best_cost = cost;
      best_type = type;
    }
  }
  out.push_back(static_cast<std::uint8_t>(best_type));
  for (std::size_t i = 0; i < row_bytes; ++i) out.push_back(filtered_byte(best_type, row, prev, i, bpp));
}

}  // namespace

std::vector<std::uint8_t> encode_png(const std::uint8_t* pixels, int width, int height, int channels) {
  SAPATTN_CHECK(channels == 3 || channels == 4, InvalidArgumentError, "PNG channels must be 3 or 4, got ", channels);
  SAPATTN_CHECK(width >= 1 && height >= 1 && width <= kMaxImageSide && height <= kMaxImageSide &&
                    std::int64_t{width} * height <= kMaxImagePixels,
                InvalidArgumentError, "cannot encode a ", width, "x", height, " PNG");
  SAPATTN_CHECK(pixels != nullptr, InvalidArgumentError, "PNG pixel pointer is null");

  const std::size_t row_bytes = static_cast<std::size_t>(width) * channels;
  std::vector<std::uint8_t> filtered;
  filtered.reserve((row_bytes + 1) * height);
  for (int y = 0; y < height; ++y) {
    const std::uint8_t* row = pixels + row_bytes * y;
    filter_row(row, y > 0 ? row - row_bytes : nullptr, row_bytes, channels, filtered);
  }

  uLongf compressed_size = compressBound(static_cast<uLong>(filtered.size()));
  std::vector<std::uint8_t> compressed(compressed_size);
  const int rc = compress2(compressed.data(), &compressed_size, filtered.data(), static_cast<uLong>(filtered.size()),
                           Z_DEFAULT_COMPRESSION);
  // compress2 only fails for lack of memory or a too-small buffer, and compressBound rules out the
  // latter; report it as a typed error rather than writing a broken file.
  SAPATTN_CHECK(rc == Z_OK, IoError, "zlib compress2 failed with code ", rc);
  compressed.resize(compressed_size);

  std::vector<std::uint8_t> out(kSignature.begin(), kSignature.end());
  std::vector<std::uint8_t> header;
  put_u32(header, static_cast<std::uint32_t>(width));
  put_u32(header, static_cast<std::uint32_t>(height));
  header.push_back(8);                      // bits per sample
  header.push_back(channels == 3 ? 2 : 6);  // colour type: truecolour, truecolour + alpha
  header.push_back(0);                      // compression: deflate
  header.push_back(0);                      // filter method: adaptive, five types
  header.push_back(0);                      // no interlace
  put_chunk(out, "IHDR", header.data(), header.size());
  for (std::size_t at = 0; at < compressed.size(); at += kPngIdatChunkBytes) {
    put_chunk(out, "IDAT", compressed.data() + at, std::min(kPngIdatChunkBytes, compressed.size() - at));
  }
  put_chunk(out, "IEND", nullptr, 0);
  return out;
}

std::vector<std::uint8_t> encode_png(const Image& image) {
  SAPATTN_CHECK(!image.empty(), InvalidArgumentError, "cannot encode an empty image as PNG");
  return encode_png(image.data(), image.width(), image.height(), 3);
}

void write_png(const std::string& path, const Image& image) {
  const std::vector<std::uint8_t> bytes = encode_png(image);
  std::FILE* file = std::fopen(path.c_str(), "wb");
  SAPATTN_CHECK(file != nullptr, IoError, "cannot write ", path, ": ", std::strerror(errno));
  const std::size_t written = std::fwrite(bytes.data(), 1, bytes.size(), file);
  const int write_errno = errno;
  const bool closed = std::fclose(file) == 0;
  if (written != bytes.size() || !closed) {
    const int err = written != bytes.size() ? write_errno : errno;
    std::remove(path.c_str());  // a truncated PNG is worse than none
    SAPATTN_THROW(IoError, "cannot write ", path, ": ", std::strerror(err));
  }
}

}  // namespace sapattn::render
