// Tests of the demo's picture code: the PNG encoder (checked by an independent decoder written
// here), the canvas and its font and colour maps, tick generation, charts and the kept-pair grid.
#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "render/canvas.hpp"
#include "render/pair_grid.hpp"
#include "render/plot.hpp"
#include "render/png.hpp"
#include "sapattn/error.hpp"

namespace sapattn::render {
namespace {

// ---- A minimal PNG decoder, enough for what encode_png writes ---------------------------------

struct DecodedPng {
  int width = 0;
  int height = 0;
  int channels = 0;
  int idat_chunks = 0;
  std::set<int> filters_used;
  std::vector<std::uint8_t> pixels;
};

std::uint32_t read_u32(const std::vector<std::uint8_t>& b, std::size_t at) {
  if (at + 4 > b.size()) throw std::runtime_error("truncated");
  return (std::uint32_t{b[at]} << 24) | (std::uint32_t{b[at + 1]} << 16) | (std::uint32_t{b[at + 2]} << 8) | b[at + 3];
}

int paeth_predictor(int a, int b, int c) {
  const int p = a + b - c;
  const int pa = std::abs(p - a), pb = std::abs(p - b), pc = std::abs(p - c);
  return (pa <= pb && pa <= pc) ? a : (pb <= pc ? b : c);
}

// Throws std::runtime_error describing the first thing that is wrong with the file.
DecodedPng decode_png(const std::vector<std::uint8_t>& file) {
  const std::uint8_t signature[8] = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A};
  if (file.size() < 8 || std::memcmp(file.data(), signature, 8) != 0) throw std::runtime_error("signature");
  DecodedPng out;
  std::vector<std::uint8_t> idat;
  std::vector<std::string> order;
  std::size_t at = 8;
  while (at < file.size()) {
    const std::uint32_t length = read_u32(file, at);
    if (at + 12 + length > file.size()) throw std::runtime_error("chunk overruns file");
    const std::string type(file.begin() + at + 4, file.begin() + at + 8);
    const std::uint8_t* data = file.data() + at + 8;
    const uLong crc = crc32(crc32(0L, Z_NULL, 0), file.data() + at + 4, length + 4);
    if (crc != read_u32(file, at + 8 + length)) throw std::runtime_error("bad CRC in " + type);
    order.push_back(type);
    if (type == "IHDR") {
      if (length != 13) throw std::runtime_error("IHDR length");
      std::vector<std::uint8_t> h(data, data + 13);
      out.width = static_cast<int>(read_u32(h, 0));
      out.height = static_cast<int>(read_u32(h, 4));
      if (h[8] != 8) throw std::runtime_error("bit depth");
      if (h[9] == 2) {
        out.channels = 3;
      } else if (h[9] == 6) {
        out.channels = 4;
      } else {
        throw std::runtime_error("colour type");
      }
      if (h[10] != 0 || h[11] != 0 || h[12] != 0) throw std::runtime_error("method/interlace");
    } else if (type == "IDAT") {
      idat.insert(idat.end(), data, data + length);
      ++out.idat_chunks;
    } else if (type == "IEND") {
      if (length != 0) throw std::runtime_error("IEND length");
    } else {
      throw std::runtime_error("unexpected chunk " + type);
    }
    at += 12 + length;
  }
  if (order.size() < 3 || order.front() != "IHDR" || order.back() != "IEND") {
    throw std::runtime_error("chunk order");
  }
  for (std::size_t i = 1; i + 1 < order.size(); ++i) {
    if (order[i] != "IDAT") throw std::runtime_error("chunk order");
  }

  const std::size_t stride = static_cast<std::size_t>(out.width) * out.channels;
  std::vector<std::uint8_t> raw((stride + 1) * out.height);
  uLongf raw_size = raw.size();
  if (uncompress(raw.data(), &raw_size, idat.data(), idat.size()) != Z_OK || raw_size != raw.size()) {
    throw std::runtime_error("IDAT does not inflate to the expected size");
  }
  out.pixels.resize(stride * out.height);
  const std::size_t bpp = out.channels;
  for (int y = 0; y < out.height; ++y) {
    const int filter = raw[y * (stride + 1)];
    out.filters_used.insert(filter);
    const std::uint8_t* in = &raw[y * (stride + 1) + 1];
    std::uint8_t* row = &out.pixels[y * stride];
    const std::uint8_t* up = y > 0 ? row - stride : nullptr;
    for (std::size_t i = 0; i < stride; ++i) {
      const int a = i >= bpp ? row[i - bpp] : 0;
      const int b = up ? up[i] : 0;
      const int c = up && i >= bpp ? up[i - bpp] : 0;
      int pred = 0;
      switch (filter) {
        case 0:
          pred = 0;
          break;
        case 1:
          pred = a;
          break;
        case 2:
          pred = b;
          break;
        case 3:
          pred = (a + b) / 2;
          break;
        case 4:
          pred = paeth_predictor(a, b, c);
          break;
        default:
          throw std::runtime_error("filter type " + std::to_string(filter));
      }
      row[i] = static_cast<std::uint8_t>(in[i] + pred);
    }
  }
  return out;
}

Image random_image(int w, int h, std::mt19937& rng) {
  Image img(w, h);
  std::uniform_int_distribution<int> byte(0, 255);
  for (int i = 0; i < w * h * 3; ++i) img.data()[i] = static_cast<std::uint8_t>(byte(rng));
  return img;
}

void expect_round_trip(const Image& img, DecodedPng* decoded_out = nullptr) {
  const std::vector<std::uint8_t> file = encode_png(img);
  DecodedPng d;
  ASSERT_NO_THROW(d = decode_png(file)) << img.width() << "x" << img.height();
  EXPECT_EQ(d.width, img.width());
  EXPECT_EQ(d.height, img.height());
  EXPECT_EQ(d.channels, 3);
  ASSERT_EQ(d.pixels.size(), static_cast<std::size_t>(img.width()) * img.height() * 3);
  EXPECT_EQ(std::memcmp(d.pixels.data(), img.data(), d.pixels.size()), 0)
      << "pixels differ for " << img.width() << "x" << img.height();
  if (decoded_out) *decoded_out = std::move(d);
}

// ---- PNG ---------------------------------------------------------------------------------------

TEST(Png, RandomImagesRoundTripExactly) {
  std::mt19937 rng(7);
  const std::pair<int, int> sizes[] = {{1, 1}, {1, 9}, {9, 1}, {2, 3}, {7, 5}, {33, 17}, {101, 64}};
  for (const auto& [w, h] : sizes) expect_round_trip(random_image(w, h, rng));
}

TEST(Png, LargeImageIsSplitIntoSeveralIdatChunks) {
  std::mt19937 rng(11);
  // Noise does not compress: 700 x 600 x 3 bytes stay above the 1 MiB chunk size.
  DecodedPng d;
  expect_round_trip(random_image(700, 600, rng), &d);
  EXPECT_GE(d.idat_chunks, 2);
}

TEST(Png, SmoothImagesUseEveryFilterAndRoundTrip) {
  // Gradients and flat areas make the per-row choice pick different filters; decoding them all
  // exercises each filter's inverse against the encoder.
  std::set<int> used;
  std::mt19937 rng(3);
  for (int variant = 0; variant < 4; ++variant) {
    Image img(61, 47);
    for (int y = 0; y < img.height(); ++y) {
      for (int x = 0; x < img.width(); ++x) {
        const int noise = static_cast<int>(rng() % 3);
        const int v = variant == 0 ? x * 4 : variant == 1 ? y * 5 : variant == 2 ? (x + y) * 2 : x * y / 7;
        img.set_pixel(x, y,
                      {static_cast<std::uint8_t>(v + noise), static_cast<std::uint8_t>(v / 2),
                       static_cast<std::uint8_t>(255 - v)});
      }
    }
    img.fill_rect(5, 5, 20, 9, {10, 200, 30});
    DecodedPng d;
    expect_round_trip(img, &d);
    used.insert(d.filters_used.begin(), d.filters_used.end());
  }
  EXPECT_GE(used.size(), 3u) << "expected the adaptive filter choice to vary between rows";
}

TEST(Png, RgbaRoundTrips) {
  std::mt19937 rng(5);
  const int w = 13, h = 6;
  std::vector<std::uint8_t> px(w * h * 4);
  for (auto& b : px) b = static_cast<std::uint8_t>(rng());
  DecodedPng d;
  ASSERT_NO_THROW(d = decode_png(encode_png(px.data(), w, h, 4)));
  EXPECT_EQ(d.channels, 4);
  EXPECT_EQ(d.pixels, px);
}

TEST(Png, RejectsBadInput) {
  EXPECT_THROW(encode_png(Image()), InvalidArgumentError);
  std::vector<std::uint8_t> px(16);
  EXPECT_THROW(encode_png(px.data(), 2, 2, 2), InvalidArgumentError);
  EXPECT_THROW(encode_png(px.data(), 0, 2, 3), InvalidArgumentError);
  EXPECT_THROW(encode_png(nullptr, 1, 1, 3), InvalidArgumentError);
}

TEST(Png, WritePngWritesTheEncodedBytes) {
  const auto dir = std::filesystem::temp_directory_path() / ("test_render_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "out.png").string();
  Image img(5, 4, {1, 2, 3});
  img.set_pixel(4, 3, {250, 0, 9});
  write_png(path, img);
  std::ifstream in(path, std::ios::binary);
  const std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(bytes, encode_png(img));
  std::filesystem::remove_all(dir);
}

TEST(Png, WritePngToUnwritablePathThrowsIoError) {
  const Image img(3, 3);
  EXPECT_THROW(write_png("/nonexistent-sapattn-dir/sub/out.png", img), IoError);
  // A directory cannot be opened for writing either (this holds even when running as root).
  EXPECT_THROW(write_png(std::filesystem::temp_directory_path().string(), img), IoError);
  try {
    write_png("/nonexistent-sapattn-dir/out.png", img);
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent-sapattn-dir/out.png"), std::string::npos);
  }
}

// ---- Canvas --------------------------------------------------------------------------------

int count_color(const Image& img, Rgb c) {
  int n = 0;
  for (int y = 0; y < img.height(); ++y) {
    for (int x = 0; x < img.width(); ++x) n += img.pixel(x, y) == c;
  }
  return n;
}

// Bounding box of pixels that differ from `background`: {x0, y0, x1, y1} inclusive, or all -1.
std::array<int, 4> ink_box(const Image& img, Rgb background) {
  std::array<int, 4> box = {-1, -1, -1, -1};
  for (int y = 0; y < img.height(); ++y) {
    for (int x = 0; x < img.width(); ++x) {
      if (img.pixel(x, y) == background) continue;
      if (box[0] < 0) box = {x, y, x, y};
      box = {std::min(box[0], x), std::min(box[1], y), std::max(box[2], x), std::max(box[3], y)};
    }
  }
  return box;
}

TEST(Canvas, RejectsBadSizes) {
  EXPECT_THROW(Image(0, 5), InvalidArgumentError);
  EXPECT_THROW(Image(5, -1), InvalidArgumentError);
  EXPECT_THROW(Image(kMaxImageSide + 1, 1), InvalidArgumentError);
  EXPECT_THROW(Image(kMaxImageSide, kMaxImageSide), InvalidArgumentError);
  Image img(4, 4);
  EXPECT_THROW(img.pixel(4, 0), InvalidArgumentError);
  EXPECT_THROW(img.pixel(0, -1), InvalidArgumentError);
  EXPECT_THROW(img.fill_rect(0, 0, -1, 2, kBlack), InvalidArgumentError);
  EXPECT_THROW(img.draw_line(0, 0, 3, 3, kBlack, 0), InvalidArgumentError);
  EXPECT_THROW(img.draw_text(0, 0, "a", kBlack, 0), InvalidArgumentError);
  EXPECT_THROW(img.blit(img, 0, 0, -2, 2), InvalidArgumentError);
}

TEST(Canvas, FillRectClipsToImageAndClipRect) {
  Image img(10, 8);
  const Rgb red{255, 0, 0};
  img.fill_rect(-3, 6, 5, 10, red);  // visible part: x 0..1, y 6..7
  EXPECT_EQ(count_color(img, red), 4);
  EXPECT_EQ(img.pixel(1, 7), red);
  img.fill_rect(2'000'000'000, 2'000'000'000, 2'000'000'000, 5, red);  // no overflow, nothing drawn
  EXPECT_EQ(count_color(img, red), 4);

  img.fill(kWhite);
  img.set_clip(2, 2, 3, 3);
  img.fill(red);
  EXPECT_EQ(count_color(img, red), 9);
  EXPECT_EQ(ink_box(img, kWhite), (std::array<int, 4>{2, 2, 4, 4}));
  img.reset_clip();
  img.fill(red);
  EXPECT_EQ(count_color(img, red), 80);
}

TEST(Canvas, BlendRectMixesColours) {
  Image img(4, 4, kWhite);
  img.blend_rect(0, 0, 2, 4, kBlack, 0.5f);
  EXPECT_EQ(img.pixel(0, 0), (Rgb{128, 128, 128}));  // 127.5 rounds up
  EXPECT_EQ(img.pixel(3, 0), kWhite);
  img.blend_rect(2, 0, 2, 4, {0, 0, 200}, 2.0f);  // alpha clamps to 1
  EXPECT_EQ(img.pixel(3, 3), (Rgb{0, 0, 200}));
  img.blend_rect(0, 0, 4, 4, kBlack, std::nanf(""));  // NaN alpha changes nothing
  EXPECT_EQ(img.pixel(3, 3), (Rgb{0, 0, 200}));
}

TEST(Canvas, LinesCoverTheirEndpointsAndClip) {
  Image img(20, 10);
  img.draw_line(2, 3, 12, 3, kBlack);
  EXPECT_EQ(count_color(img, kBlack), 11);
  EXPECT_EQ(ink_box(img, kWhite), (std::array<int, 4>{2, 3, 12, 3}));

  img.fill(kWhite);
  img.draw_line(0, 0, 9, 9, kBlack);
  EXPECT_EQ(count_color(img, kBlack), 10);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(img.pixel(i, i), kBlack);

  // A line from far outside crosses the image along its true path (y = 5 everywhere).
  img.fill(kWhite);
  img.draw_line(-1e9, 5, 1e9, 5, kBlack, 1);
  EXPECT_EQ(count_color(img, kBlack), 20);
  EXPECT_EQ(ink_box(img, kWhite), (std::array<int, 4>{0, 5, 19, 5}));

  img.fill(kWhite);
  img.draw_line(std::nan(""), 0, 5, 5, kBlack);
  img.draw_line(-50, -50, -10, -20, kBlack, 5);
  EXPECT_EQ(count_color(img, kBlack), 0);

  // Thickness 3 uses a round pen of diameter 3: a horizontal line is three rows tall.
  img.draw_line(5, 5, 14, 5, kBlack, 3);
  EXPECT_EQ(ink_box(img, kWhite), (std::array<int, 4>{4, 4, 15, 6}));
}

TEST(Canvas, DashedLineAlternates) {
  Image img(30, 3);
  img.draw_dashed_line(0, 1, 29, 1, kBlack, 1, 4, 2);
  for (int x = 0; x < 30; ++x) EXPECT_EQ(img.pixel(x, 1) == kBlack, x % 6 < 4) << x;
}

TEST(Canvas, MarkersAreCentredAndSized) {
  for (Marker m : {Marker::kCircle, Marker::kSquare, Marker::kDiamond, Marker::kTriangle}) {
    Image img(41, 41);
    img.draw_marker(20, 20, m, 6, kBlack);
    const auto box = ink_box(img, kWhite);
    ASSERT_GE(box[0], 0);
    EXPECT_EQ(img.pixel(20, 20), kBlack);
    EXPECT_NEAR((box[0] + box[2]) / 2.0, 20.0, 0.5);
    EXPECT_GE(box[2] - box[0] + 1, 9);
    EXPECT_LE(box[2] - box[0] + 1, 17);
  }
  Image img(5, 5);
  img.draw_marker(2, 2, Marker::kNone, 3, kBlack);
  EXPECT_EQ(count_color(img, kBlack), 0);
}

TEST(Canvas, BlitScalesWithNearestNeighbour) {
  Image src(2, 2);
  const Rgb c[4] = {{255, 0, 0}, {0, 255, 0}, {0, 0, 255}, {9, 9, 9}};
  src.set_pixel(0, 0, c[0]);
  src.set_pixel(1, 0, c[1]);
  src.set_pixel(0, 1, c[2]);
  src.set_pixel(1, 1, c[3]);
  Image dst(8, 8);
  dst.blit(src, 2, 2, 4, 4);
  for (int y = 0; y < 8; ++y) {
    for (int x = 0; x < 8; ++x) {
      const bool inside = x >= 2 && x < 6 && y >= 2 && y < 6;
      const Rgb want = inside ? c[(y - 2) / 2 * 2 + (x - 2) / 2] : kWhite;
      EXPECT_EQ(dst.pixel(x, y), want) << x << "," << y;
    }
  }
  // Shrinking 8x8 to 2x2 samples the centres of the 4x4 source blocks: (2, 2), (6, 2), ...
  Image small(2, 2);
  small.blit(dst, 0, 0, 2, 2);
  EXPECT_EQ(small.pixel(0, 0), dst.pixel(2, 2));
  EXPECT_EQ(small.pixel(1, 1), dst.pixel(6, 6));
  // Unscaled, partly off the destination: only the overlap is copied.
  Image edge(3, 3);
  edge.blit(src, 2, -1);
  EXPECT_EQ(edge.pixel(2, 0), c[2]);
  EXPECT_EQ(edge.pixel(1, 0), kWhite);
  // Blitting an image into itself reads the original pixels.
  dst.blit(dst, 0, 0, 4, 4);
  EXPECT_EQ(dst.pixel(1, 1), c[0]);
}

// ---- Font --------------------------------------------------------------------------------------

TEST(Font, EveryPrintableGlyphHasInkExceptSpace) {
  for (int ch = 32; ch <= 126; ++ch) {
    const auto rows = glyph_bitmap(static_cast<char>(ch));
    int bits = 0;
    for (auto r : rows) {
      EXPECT_EQ(r & ~0x1F, 0) << "glyph " << ch << " uses more than five columns";
      bits += __builtin_popcount(r);
    }
    if (ch == ' ') {
      EXPECT_EQ(bits, 0);
    } else {
      EXPECT_GT(bits, 0) << "glyph '" << static_cast<char>(ch) << "' is empty";
    }
  }
}

TEST(Font, PrintableGlyphsArePairwiseDistinct) {
  std::set<std::array<std::uint8_t, kGlyphHeight>> seen;
  for (int ch = 32; ch <= 126; ++ch) {
    EXPECT_TRUE(seen.insert(glyph_bitmap(static_cast<char>(ch))).second)
        << "glyph '" << static_cast<char>(ch) << "' repeats an earlier one";
  }
  // Digits must also differ clearly, not by one pixel: at least 3 pixels apart pairwise.
  for (char a = '0'; a <= '9'; ++a) {
    for (char b = a + 1; b <= '9'; ++b) {
      int diff = 0;
      const auto ga = glyph_bitmap(a), gb = glyph_bitmap(b);
      for (int r = 0; r < kGlyphHeight; ++r) diff += __builtin_popcount(ga[r] ^ gb[r]);
      EXPECT_GE(diff, 3) << a << " vs " << b;
    }
  }
}

TEST(Font, UnknownCharactersPrintAsQuestionMark) {
  EXPECT_EQ(glyph_bitmap('\n'), glyph_bitmap('?'));
  EXPECT_EQ(glyph_bitmap(static_cast<char>(0xC3)), glyph_bitmap('?'));
  EXPECT_EQ(glyph_count("a\xC3\xA9z"), 3);    // "aéz": one glyph for the two-byte é
  EXPECT_EQ(glyph_count("\xE2\x89\x88"), 1);  // three-byte "≈"
}

TEST(Font, TextWidthMatchesGlyphCountAndDrawnInk) {
  EXPECT_EQ(text_width("", 2), 0);
  EXPECT_EQ(text_width("A", 1), 5);
  EXPECT_EQ(text_width("density", 1), 7 * 6 - 1);
  EXPECT_EQ(text_width("density", 3), (7 * 6 - 1) * 3);
  EXPECT_EQ(text_height(2), 14);
  // "W|W" touches both the leftmost and rightmost columns, so the ink spans the measured width.
  for (int scale : {1, 2, 3}) {
    Image img(80, 40);
    img.draw_text(4, 5, "W|W", kBlack, scale);
    const auto box = ink_box(img, kWhite);
    EXPECT_EQ(box[0], 4);
    EXPECT_EQ(box[2], 4 + text_width("W|W", scale) - 1);
    EXPECT_EQ(box[1], 5);
    EXPECT_EQ(box[3], 5 + text_height(scale) - 1);
  }
}

TEST(Font, DescendersHangBelowTheTextBox) {
  for (char c : std::string("gpqy")) {
    Image img(10, 14);
    const std::string text(1, c);
    img.draw_text(2, 1, text, kBlack, 1);
    EXPECT_EQ(ink_box(img, kWhite)[3], 1 + text_height(1) + kGlyphDescent - 1) << c;
    EXPECT_EQ(glyph_descent(c), kGlyphDescent);
  }
  EXPECT_EQ(glyph_descent('a'), 0);
  EXPECT_EQ(glyph_descent('j'), 0);
  // Every other printable glyph stays within text_height.
  for (int ch = 33; ch <= 126; ++ch) {
    if (glyph_descent(static_cast<char>(ch)) != 0) continue;
    Image img(10, 14);
    img.draw_text(2, 1, std::string(1, static_cast<char>(ch)), kBlack, 1);
    EXPECT_LE(ink_box(img, kWhite)[3], text_height(1)) << static_cast<char>(ch);
  }
}

TEST(Font, ScaledGlyphMatchesBitmap) {
  Image img(12, 16);
  img.draw_text(1, 1, "8", kBlack, 2);
  const auto rows = glyph_bitmap('8');
  for (int y = 0; y < 14; ++y) {
    for (int x = 0; x < 10; ++x) {
      const bool on = rows[y / 2] & (0x10 >> (x / 2));
      EXPECT_EQ(img.pixel(1 + x, 1 + y) == kBlack, on) << x << "," << y;
    }
  }
}

TEST(Font, VerticalTextIsTheQuarterTurnOfHorizontalText) {
  const std::string text = "Err 1 gp";
  const int w = text_width(text, 2), h = text_height(2);
  const int tall = h + kGlyphDescent * 2;
  Image flat(w, tall);
  flat.draw_text(0, 0, text, kBlack, 2);
  Image turned(tall + 6, w + 6);
  turned.draw_text_vertical(3, 3, text, kBlack, 2);
  for (int v = 0; v < tall; ++v) {
    for (int u = 0; u < w; ++u) {
      ASSERT_EQ(flat.pixel(u, v), turned.pixel(3 + v, 3 + w - 1 - u)) << u << "," << v;
    }
  }
  EXPECT_EQ(count_color(flat, kBlack), count_color(turned, kBlack));
}

// ---- Colour maps -------------------------------------------------------------------------------

std::array<double, 3> to_lab(Rgb c) {
  auto lin = [](double v) {
    v /= 255.0;
    return v <= 0.04045 ? v / 12.92 : std::pow((v + 0.055) / 1.055, 2.4);
  };
  const double r = lin(c.r), g = lin(c.g), b = lin(c.b);
  const double x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.9505;
  const double y = 0.2126 * r + 0.7152 * g + 0.0722 * b;
  const double z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.089;
  auto f = [](double t) { return t > 0.008856 ? std::cbrt(t) : 7.787 * t + 16.0 / 116.0; };
  return {116.0 * f(y) - 16.0, 500.0 * (f(x) - f(y)), 200.0 * (f(y) - f(z))};
}

TEST(Palette, FirstCategoryColoursAreWellSeparated) {
  // CIE76 distance of about 2.3 is "just noticeable"; 8 is clearly different side by side.
  double closest = 1e9;
  for (int i = 0; i < 64; ++i) {
    for (int j = i + 1; j < 64; ++j) {
      const auto a = to_lab(category_color(i)), b = to_lab(category_color(j));
      closest = std::min(closest, std::hypot(a[0] - b[0], a[1] - b[1], a[2] - b[2]));
    }
  }
  EXPECT_GE(closest, 8.0);
  // Every category colour stays readable on white (not near-white).
  for (int i = -5; i < 1000; ++i) EXPECT_LE(luma(category_color(i)), 206.0) << i;
  EXPECT_EQ(category_color(3), category_color(3));
}

TEST(Palette, HeatColorGetsBrighterMonotonically) {
  // Between neighbouring samples a channel that falls can round down one step before a rising one
  // rounds up, so fine steps may dip by at most half a unit of luma; coarse steps must rise.
  double prev = -1.0;
  for (int i = 0; i <= 1000; ++i) {
    const double l = luma(heat_color(i / 1000.0f));
    EXPECT_GE(l, prev - 0.5) << "t = " << i / 1000.0;
    prev = l;
  }
  for (int i = 1; i <= 50; ++i) {
    EXPECT_GT(luma(heat_color(i / 50.0f)), luma(heat_color((i - 1) / 50.0f)) + 2.0) << "t = " << i / 50.0;
  }
  EXPECT_GT(luma(heat_color(1.0f)) - luma(heat_color(0.0f)), 150.0);
  EXPECT_EQ(heat_color(-3.0f), heat_color(0.0f));
  EXPECT_EQ(heat_color(7.0f), heat_color(1.0f));
  EXPECT_EQ(heat_color(std::nanf("")), (Rgb{128, 128, 128}));
}

// ---- Ticks -------------------------------------------------------------------------------------

TEST(Ticks, NiceTicksOnKnownRanges) {
  EXPECT_EQ(nice_ticks(0.03, 0.41, 6), (std::vector<double>{0.1, 0.2, 0.3, 0.4}));
  EXPECT_EQ(nice_ticks(0.0, 1.0, 6), (std::vector<double>{0.0, 0.2, 0.4, 0.6, 0.8, 1.0}));
  EXPECT_EQ(nice_ticks(0.0, 1.0, 11), (std::vector<double>{0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0}));
  EXPECT_EQ(nice_ticks(-3.7, 12.2, 6), (std::vector<double>{0.0, 5.0, 10.0}));
  EXPECT_EQ(nice_ticks(-3.7, 12.2, 9), (std::vector<double>{-2, 0, 2, 4, 6, 8, 10, 12}));
  EXPECT_EQ(nice_ticks(1200, 4800, 5), (std::vector<double>{2000, 3000, 4000}));
  EXPECT_EQ(nice_ticks(0.0012, 0.0049, 4), (std::vector<double>{0.002, 0.003, 0.004}));
  EXPECT_THROW(nice_ticks(1.0, 1.0), InvalidArgumentError);
  EXPECT_THROW(nice_ticks(0.0, std::nan("")), InvalidArgumentError);
  EXPECT_THROW(nice_ticks(0.0, 1.0, 1), InvalidArgumentError);
}

TEST(Ticks, LogTicks) {
  EXPECT_EQ(log_ticks(1e-4, 1.0, 6), (std::vector<double>{1e-4, 1e-3, 1e-2, 1e-1, 1.0}));
  EXPECT_EQ(log_ticks(3e-9, 5e4, 6), (std::vector<double>{1e-6, 1e-3, 1.0, 1e3}));
  EXPECT_EQ(log_ticks(0.02, 0.3, 6), (std::vector<double>{0.02, 0.05, 0.1, 0.2}));
  EXPECT_EQ(log_ticks(0.006, 0.22, 6), (std::vector<double>{0.01, 0.02, 0.05, 0.1, 0.2}));
  EXPECT_EQ(log_ticks(0.006, 0.22, 4), (std::vector<double>{0.01, 0.1}));
  EXPECT_EQ(log_ticks(0.011, 0.019, 6), nice_ticks(0.011, 0.019, 6));
  EXPECT_THROW(log_ticks(0.0, 1.0), InvalidArgumentError);
}

TEST(Ticks, CompactLabels) {
  using V = std::vector<std::string>;
  EXPECT_EQ(format_ticks({0.1, 0.2, 0.3, 0.4}), (V{"0.1", "0.2", "0.3", "0.4"}));
  EXPECT_EQ(format_ticks({0.0, 0.05, 0.1, 0.15}), (V{"0", "0.05", "0.1", "0.15"}));
  EXPECT_EQ(format_ticks({1e-4, 1e-3, 1e-2, 1e-1, 1.0}), (V{"1e-4", "1e-3", "1e-2", "1e-1", "1"}));
  EXPECT_EQ(format_ticks({1e-3, 1e-2, 1e-1, 1.0}), (V{"0.001", "0.01", "0.1", "1"}));
  EXPECT_EQ(format_ticks({0.0, 2.5e-4, 5e-4}), (V{"0", "2.5e-4", "5e-4"}));
  EXPECT_EQ(format_ticks({1000, 2000, 3000}), (V{"1000", "2000", "3000"}));
  EXPECT_EQ(format_ticks({0, 1e5, 2e5}), (V{"0", "1e5", "2e5"}));
  EXPECT_EQ(format_ticks({-0.5, 0.0, 0.5}), (V{"-0.5", "0", "0.5"}));
  EXPECT_EQ(format_ticks({-0.0025, 0.0, 0.0025}), (V{"-0.0025", "0", "0.0025"}));
  EXPECT_EQ(format_ticks(nice_ticks(0.03, 0.41, 6)), (V{"0.1", "0.2", "0.3", "0.4"}));
}

// ---- Matrix chart and the kept-pair grid ------------------------------------------------------

// The first pixel (scanning rows, then columns) of the given colour, or (-1, -1).
std::pair<int, int> find_pixel(const Image& img, Rgb color) {
  for (int y = 0; y < img.height(); ++y)
    for (int x = 0; x < img.width(); ++x)
      if (img.pixel(x, y) == color) return {x, y};
  return {-1, -1};
}

TEST(MatrixChart, CellsAreWholeSquaresWithAxesAndAColourBar) {
  MatrixChart chart;
  chart.title = "kept pairs";
  chart.x_label = "key token";
  chart.y_label = "query token";
  chart.rows = 2;
  chart.cols = 3;
  chart.values = {0.0f, 0.5f, 1.0f,  //
                  1.0f, 0.5f, 0.0f};
  chart.x_extent = 96;  // 32 tokens per cell
  chart.colorbar_label = "share kept";
  const Image img = chart.render(10);
  // Cell (0, 0) is a 10 x 10 square of heat_color(0), with cell (0, 1) to its right and (1, 0) below.
  const auto [x0, y0] = find_pixel(img, heat_color(0.0f));
  ASSERT_GE(x0, 0);
  for (int dy = 0; dy < 10; ++dy)
    for (int dx = 0; dx < 10; ++dx) ASSERT_EQ(img.pixel(x0 + dx, y0 + dy), heat_color(0.0f)) << dx << "," << dy;
  EXPECT_EQ(img.pixel(x0 + 10, y0), heat_color(0.5f));
  EXPECT_EQ(img.pixel(x0 + 20, y0 + 9), heat_color(1.0f));
  EXPECT_EQ(img.pixel(x0, y0 + 10), heat_color(1.0f));
  // Left of the plot: the y label and tick labels (ink); below it: x tick labels and the x label.
  const auto inked = [&](int xa, int ya, int xb, int yb) {
    for (int y = ya; y < yb; ++y)
      for (int x = xa; x < xb; ++x)
        if (luma(img.pixel(x, y)) < 100) return true;
    return false;
  };
  EXPECT_TRUE(inked(0, y0, x0 - 2, y0 + 20));
  EXPECT_TRUE(inked(x0, y0 + 22, x0 + 30, img.height()));
  // The colour bar right of the plot runs from heat_color(1) at the top to heat_color(0) at the
  // bottom, and is ticked.
  const auto [bar_x, bar_top] = find_pixel(img, heat_color(1.0f - 0.5f / 20));
  EXPECT_GT(bar_x, x0 + 30);
  EXPECT_EQ(bar_top, y0);
  EXPECT_EQ(img.pixel(bar_x, y0 + 19), heat_color(0.5f / 20));
  EXPECT_TRUE(inked(bar_x + 1, y0, img.width(), y0 + 20));

  chart.colorbar = false;
  EXPECT_LT(chart.render(10).width(), img.width());
  chart.values.pop_back();
  EXPECT_THROW(chart.render(10), InvalidArgumentError);
  chart.values.push_back(0.0f);
  chart.vmax = 0.0f;
  EXPECT_THROW(chart.render(10), InvalidArgumentError);
}

// Token order repeats a cluster layout every latent row (W tokens): cells of whole rows hold whole
// periods and show the same share everywhere; each cell is an exact share however many tokens it
// holds (the last one holds fewer).
TEST(KeptPairGrid, WholeRowCellsShowNoMoire) {
  const std::int64_t W = 32, S = 20 * W;
  std::vector<std::int32_t> labels(S);
  for (std::int64_t i = 0; i < S; ++i) labels[i] = (i % W) < 12 ? 0 : 1;  // two vertical stripes
  const std::uint8_t diagonal[4] = {1, 0, 0, 1};                          // kept within a cluster
  std::vector<std::int64_t> order(S);
  for (std::int64_t i = 0; i < S; ++i) order[i] = i;
  const PairGrid rows = kept_pair_grid(S, labels.data(), labels.data(), diagonal, 2, order.data(), order.data(), W);
  ASSERT_EQ(rows.cells, 20);
  const float want = static_cast<float>((12.0 * 12 + 20.0 * 20) / (32.0 * 32));
  for (float share : rows.share) ASSERT_FLOAT_EQ(share, want);
  // Cells of 13 tokens cut the period at drifting phases: their shares differ.
  const PairGrid cut = kept_pair_grid(S, labels.data(), labels.data(), diagonal, 2, order.data(), order.data(), 13);
  EXPECT_EQ(cut.cells, 50);  // 49 of 13 tokens and one of 3
  EXPECT_NE(*std::min_element(cut.share.begin(), cut.share.end()),
            *std::max_element(cut.share.begin(), cut.share.end()));
  const std::uint8_t all[4] = {1, 1, 1, 1};
  for (float share : kept_pair_grid(S, labels.data(), labels.data(), all, 2, order.data(), order.data(), 13).share)
    ASSERT_EQ(share, 1.0f);
  EXPECT_THROW(kept_pair_grid(S, labels.data(), labels.data(), all, 2, order.data(), order.data(), 0),
               InvalidArgumentError);
}

TEST(KeptPairGrid, ClusterOrderMakesKeptBlocksContiguous) {
  // 8 tokens, clusters alternate; in cluster order (ranks) cluster 0 holds positions 0-3.
  const std::int32_t labels[8] = {0, 1, 0, 1, 0, 1, 0, 1};
  const std::int64_t rank[8] = {0, 4, 1, 5, 2, 6, 3, 7};
  const std::uint8_t only_00[4] = {1, 0, 0, 0};
  const PairGrid grid = kept_pair_grid(8, labels, labels, only_00, 2, rank, rank, 4);
  EXPECT_EQ(grid.share, (std::vector<float>{1.0f, 0.0f, 0.0f, 0.0f}));
}

// ---- Line chart --------------------------------------------------------------------------------

LineChart sample_chart(bool log_y) {
  LineChart chart;
  chart.title = "Relative L2 error vs density";
  chart.x_label = "density";
  chart.y_label = "relative L2 error";
  chart.log_y = log_y;
  const Marker markers[3] = {Marker::kCircle, Marker::kSquare, Marker::kTriangle};
  const char* names[3] = {"SVG2 (k-means + top-p)", "block top-k", "sliding window"};
  for (int m = 0; m < 3; ++m) {
    Series s{names[m], category_color(m), {}, markers[m], m == 2};
    for (int i = 0; i < 8; ++i) {
      const double density = 0.03 + 0.05 * i;
      s.points.emplace_back(density, (0.05 + 0.1 * m) * std::exp(-6.0 * density) + 0.002 * (m + 1));
    }
    chart.series.push_back(s);
  }
  return chart;
}

TEST(LineChart, RendersEverySeriesColour) {
  for (bool log_y : {false, true}) {
    const LineChart chart = sample_chart(log_y);
    const Image img = chart.render(900, 600);
    ASSERT_EQ(img.width(), 900);
    ASSERT_EQ(img.height(), 600);
    const int white = count_color(img, kWhite);
    EXPECT_LT(white, 900 * 600 * 97 / 100) << "chart is (nearly) blank";
    for (const Series& s : chart.series) {
      EXPECT_GT(count_color(img, s.color), 200) << s.name << (log_y ? " (log)" : "");
    }
    // The frame's corner sits inside the image, away from its edges.
    const auto box = ink_box(img, kWhite);
    EXPECT_GT(box[0], 0);
    EXPECT_GT(box[1], 0);
    EXPECT_LT(box[2], 899);
    EXPECT_LT(box[3], 599);
  }
}

TEST(LineChart, ToleratesOddData) {
  LineChart chart;
  EXPECT_NO_THROW(chart.render(400, 300));  // nothing to plot: axes only
  chart.series.push_back({"flat", {200, 0, 0}, {{1, 2}, {1, 2}}, Marker::kCircle, false});
  EXPECT_NO_THROW(chart.render(400, 300));
  chart.series.push_back({"gaps", {0, 0, 200}, {{0, 1}, {NAN, 3}, {2, INFINITY}, {3, -1}}, Marker::kDiamond, false});
  EXPECT_NO_THROW(chart.render(400, 300));
  chart.log_y = true;  // y <= 0 points are dropped on a log axis
  const Image img = chart.render(400, 300);
  EXPECT_GT(count_color(img, {200, 0, 0}), 0);
  chart.y_max = 1e9;  // fixed ends far from the data
  chart.x_min = -1e6;
  EXPECT_NO_THROW(chart.render(400, 300));
}

TEST(LineChart, RejectsImpossibleLayouts) {
  LineChart chart = sample_chart(false);
  EXPECT_THROW(chart.render(60, 40), InvalidArgumentError);
  chart.log_y = true;
  chart.y_min = 0.0;
  EXPECT_THROW(chart.render(900, 600), InvalidArgumentError);
  chart.y_min = 2.0;
  chart.y_max = 1.0;
  EXPECT_THROW(chart.render(900, 600), InvalidArgumentError);
}

}  // namespace
}  // namespace sapattn::render
