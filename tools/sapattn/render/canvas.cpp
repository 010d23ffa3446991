#include "render/canvas.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <utility>

#include "sapattn/error.hpp"

namespace sapattn::render {
namespace {

// The built-in font, ASCII 32..126. Each glyph is seven rows of five bits (bit 4 = left column).
// Digits are drawn with distinct silhouettes (slashed zero, flat-topped 3, open 4) because tick
// labels are most of what the demo prints. Lower case has a five-row x-height (rows 2..6); g, p,
// q and y are stored two rows high and drawn kGlyphDescent rows lower (see glyph_descent).
constexpr std::uint8_t kFont[95][kGlyphHeight] = {
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00},  // space
    {0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04},  // !
    {0x0A, 0x0A, 0x0A, 0x00, 0x00, 0x00, 0x00},  // "
    {0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A},  // #
    {0x04, 0x0F, 0x14, 0x0E, 0x05, 0x1E, 0x04},  // $
    {0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03},  // %
    {0x0C, 0x12, 0x14, 0x08, 0x15, 0x12, 0x0D},  // &
    {0x04, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00},  // quote
    {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02},  // (
    {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08},  // )
    {0x00, 0x04, 0x15, 0x0E, 0x15, 0x04, 0x00},  // *
    {0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00},  // +
    {0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08},  // ,
    {0x00, 0x00, 0x00, 0x0E, 0x00, 0x00, 0x00},  // -
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C},  // .
    {0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00},  // /
    {0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E},  // 0
    {0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E},  // 1
    {0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F},  // 2
    {0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E},  // 3
    {0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02},  // 4
    {0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E},  // 5
    {0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E},  // 6
    {0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08},  // 7
    {0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E},  // 8
    {0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C},  // 9
    {0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00},  // :
    {0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x04, 0x08},  // ;
    {0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02},  // <
    {0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00},  // =
    {0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08},  // >
    {0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04},  // ?
    {0x0E, 0x11, 0x01, 0x0D, 0x15, 0x15, 0x0E},  // @
    {0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11},  // A
    {0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E},  // B
    {0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E},  // C
    {0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C},  // D
    {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F},  // E
    {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10},  // F
    {0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F},  // G
    {0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11},  // H
    {0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E},  // I
    {0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C},  // J
    {0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11},  // K
    {0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F},  // L
    {0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11},  // M
    {0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11},  // N
    {0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E},  // O
    {0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10},  // P
    {0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D},  // Q
    {0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11},  // R
    {0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E},  // S
    {0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04},  // T
    {0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E},  // U
    {0x11, 0x11, 0x11, 0x0A, 0x0A, 0x04, 0x04},  // V
    {0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A},  // W
    {0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11},  // X
    {0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04},  // Y
    {0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F},  // Z
    {0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E},  // [
    {0x00, 0x10, 0x08, 0x04, 0x02, 0x01, 0x00},  // backslash
    {0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E},  // ]
    {0x04, 0x0A, 0x11, 0x00, 0x00, 0x00, 0x00},  // ^
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F},  // _
    {0x08, 0x04, 0x02, 0x00, 0x00, 0x00, 0x00},  // `
    {0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F},  // a
    {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E},  // b
    {0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E},  // c
    {0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F},  // d
    {0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E},  // e
    {0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08},  // f
    {0x0F, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E},  // g
    {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11},  // h
    {0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E},  // i
    {0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C},  // j
    {0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12},  // k
    {0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E},  // l
    {0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11},  // m
    {0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11},  // n
    {0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E},  // o
    {0x1E, 0x11, 0x11, 0x11, 0x1E, 0x10, 0x10},  // p
    {0x0F, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x01},  // q
    {0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10},  // r
    {0x00, 0x00, 0x0F, 0x10, 0x0E, 0x01, 0x1E},  // s
    {0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06},  // t
    {0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D},  // u
    {0x00, 0x00, 0x11, 0x11, 0x0A, 0x0A, 0x04},  // v
    {0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A},  // w
    {0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11},  // x
    {0x11, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E},  // y
    {0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F},  // z
    {0x03, 0x04, 0x04, 0x08, 0x04, 0x04, 0x03},  // {
    {0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04},  // |
    {0x18, 0x04, 0x04, 0x02, 0x04, 0x04, 0x18},  // }
    {0x00, 0x00, 0x08, 0x15, 0x02, 0x00, 0x00},  // ~
};

constexpr int kMaxTextScale = 64;
constexpr int kMaxThickness = 256;

void check_scale(int scale) {
  SAPATTN_CHECK(scale >= 1 && scale <= kMaxTextScale, InvalidArgumentError, "text scale must be in [1, ", kMaxTextScale,
                "], got ", scale);
}

void check_thickness(int thickness) {
  SAPATTN_CHECK(thickness >= 1 && thickness <= kMaxThickness, InvalidArgumentError, "line thickness must be in [1, ",
                kMaxThickness, "], got ", thickness);
}

// Calls fn(glyph_char) once per UTF-8 code point: continuation bytes (10xxxxxx) are skipped so
// that a multi-byte character prints as a single '?'.
template <typename Fn>
void for_each_glyph(std::string_view text, Fn fn) {
  for (char ch : text) {
    const auto byte = static_cast<unsigned char>(ch);
    if ((byte & 0xC0) == 0x80) continue;
    fn(byte >= 32 && byte <= 126 ? static_cast<char>(byte) : '?');
  }
}

std::uint8_t to_byte(double v) { return static_cast<std::uint8_t>(std::clamp(std::lround(v), 0L, 255L)); }

// Half-open interval intersection of [a0, a0 + len) with [lo, hi), in 64 bits so that callers'
// x + w never overflows int.
std::pair<int, int> clamp_span(int a0, int len, int lo, int hi) {
  const std::int64_t begin = std::max<std::int64_t>(a0, lo);
  const std::int64_t end = std::min<std::int64_t>(std::int64_t{a0} + len, hi);
  if (end <= begin) return {0, 0};
  return {static_cast<int>(begin), static_cast<int>(end)};
}

// Liang-Barsky clipping of the segment to [xmin, xmax] x [ymin, ymax]. Returns false when
// nothing is left; otherwise moves the endpoints and reports the parameter t0 of the new start.
bool clip_segment(double& x0, double& y0, double& x1, double& y1, double xmin, double ymin, double xmax, double ymax,
                  double& t_start) {
  const double dx = x1 - x0;
  const double dy = y1 - y0;
  double t0 = 0.0;
  double t1 = 1.0;
  auto edge = [&](double p, double q) {
    if (p == 0.0) return q >= 0.0;
    const double r = q / p;
    if (p < 0.0) {
      if (r > t1) return false;
      t0 = std::max(t0, r);
    } else {
      if (r < t0) return false;
      t1 = std::min(t1, r);
    }
    return true;
  };
  if (!edge(-dx, x0 - xmin) || !edge(dx, xmax - x0) || !edge(-dy, y0 - ymin) || !edge(dy, ymax - y0)) {
    return false;
  }
  const double ox = x0;
  const double oy = y0;
  x0 = ox + t0 * dx;
  y0 = oy + t0 * dy;
  x1 = ox + t1 * dx;
  y1 = oy + t1 * dy;
  t_start = t0;
  return true;
}

Rgb hsv_to_rgb(double h, double s, double v) {
  const double h6 = (h - std::floor(h)) * 6.0;
  const int sector = static_cast<int>(h6) % 6;
  const double f = h6 - std::floor(h6);
  // The channels of a sector, as indices into {v, p, q, t}: red falls (q) over sector 1 and rises
  // (t) over sector 4, green rises over 0 and falls over 3, blue rises over 2 and falls over 5.
  static constexpr int kSectorChannels[6][3] = {{0, 3, 1}, {2, 0, 1}, {1, 0, 3}, {1, 2, 0}, {3, 1, 0}, {0, 1, 2}};
  const double level[4] = {v, v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))};
  const int* c = kSectorChannels[sector];
  return {to_byte(level[c[0]] * 255.0), to_byte(level[c[1]] * 255.0), to_byte(level[c[2]] * 255.0)};
}

}  // namespace

// ---- Image ---------------------------------------------------------------------------------

Image::Image(int width, int height, Rgb background) {
  SAPATTN_CHECK(width >= 1 && height >= 1 && width <= kMaxImageSide && height <= kMaxImageSide, InvalidArgumentError,
                "image size ", width, "x", height, " outside [1, ", kMaxImageSide, "] per side");
  SAPATTN_CHECK(std::int64_t{width} * height <= kMaxImagePixels, InvalidArgumentError, "image size ", width, "x",
                height, " exceeds ", kMaxImagePixels, " pixels");
  width_ = width;
  height_ = height;
  pixels_.resize(static_cast<std::size_t>(width) * height * 3);
  reset_clip();
  fill(background);
}

Rgb Image::pixel(int x, int y) const {
  SAPATTN_CHECK(x >= 0 && y >= 0 && x < width_ && y < height_, InvalidArgumentError, "pixel (", x, ", ", y,
                ") outside the ", width_, "x", height_, " image");
  const std::uint8_t* p = &pixels_[(static_cast<std::size_t>(y) * width_ + x) * 3];
  return {p[0], p[1], p[2]};
}

void Image::set_pixel(int x, int y, Rgb color) {
  if (x < clip_x0_ || y < clip_y0_ || x >= clip_x1_ || y >= clip_y1_) return;
  std::uint8_t* p = &pixels_[(static_cast<std::size_t>(y) * width_ + x) * 3];
  p[0] = color.r;
  p[1] = color.g;
  p[2] = color.b;
}

void Image::blend_pixel(int x, int y, Rgb color, float alpha) {
  if (x < clip_x0_ || y < clip_y0_ || x >= clip_x1_ || y >= clip_y1_) return;
  if (!(alpha > 0.0f)) return;  // also drops NaN
  const double a = std::min(alpha, 1.0f);
  std::uint8_t* p = &pixels_[(static_cast<std::size_t>(y) * width_ + x) * 3];
  p[0] = to_byte(a * color.r + (1.0 - a) * p[0]);
  p[1] = to_byte(a * color.g + (1.0 - a) * p[1]);
  p[2] = to_byte(a * color.b + (1.0 - a) * p[2]);
}

void Image::set_clip(int x, int y, int w, int h) {
  SAPATTN_CHECK(w >= 0 && h >= 0, InvalidArgumentError, "clip rectangle size ", w, "x", h, " is negative");
  std::tie(clip_x0_, clip_x1_) = clamp_span(x, w, 0, width_);
  std::tie(clip_y0_, clip_y1_) = clamp_span(y, h, 0, height_);
}

void Image::reset_clip() {
  clip_x0_ = 0;
  clip_y0_ = 0;
  clip_x1_ = width_;
  clip_y1_ = height_;
}

void Image::fill(Rgb color) { fill_rect(0, 0, width_, height_, color); }

void Image::fill_rect(int x, int y, int w, int h, Rgb color) {
  SAPATTN_CHECK(w >= 0 && h >= 0, InvalidArgumentError, "rectangle size ", w, "x", h, " is negative");
  const auto [x0, x1] = clamp_span(x, w, clip_x0_, clip_x1_);
  const auto [y0, y1] = clamp_span(y, h, clip_y0_, clip_y1_);
  for (int yy = y0; yy < y1; ++yy) {
    std::uint8_t* p = &pixels_[(static_cast<std::size_t>(yy) * width_ + x0) * 3];
    for (int xx = x0; xx < x1; ++xx, p += 3) {
      p[0] = color.r;
      p[1] = color.g;
      p[2] = color.b;
    }
  }
}

void Image::blend_rect(int x, int y, int w, int h, Rgb color, float alpha) {
  SAPATTN_CHECK(w >= 0 && h >= 0, InvalidArgumentError, "rectangle size ", w, "x", h, " is negative");
  const auto [x0, x1] = clamp_span(x, w, clip_x0_, clip_x1_);
  const auto [y0, y1] = clamp_span(y, h, clip_y0_, clip_y1_);
  for (int yy = y0; yy < y1; ++yy) {
    for (int xx = x0; xx < x1; ++xx) blend_pixel(xx, yy, color, alpha);
  }
}

void Image::draw_rect(int x, int y, int w, int h, Rgb color, int thickness) {
  check_thickness(thickness);
  SAPATTN_CHECK(w >= 0 && h >= 0, InvalidArgumentError, "rectangle size ", w, "x", h, " is negative");
  const int t = std::min({thickness, w, h});
  fill_rect(x, y, w, t, color);
  fill_rect(x, static_cast<int>(std::int64_t{y} + h - t), w, t, color);
  fill_rect(x, y, t, h, color);
  fill_rect(static_cast<int>(std::int64_t{x} + w - t), y, t, h, color);
}

void Image::stamp_pen(int x, int y, Rgb color, int thickness) {
  if (thickness <= 2) {
    // Square pen: thickness 2 covers the pixel and its right/lower neighbour.
    fill_rect(x, y, thickness, thickness, color);
    return;
  }
  const double r = thickness / 2.0;
  const int reach = thickness / 2;
  const double r2 = r * r;
  for (int dy = -reach; dy <= reach; ++dy) {
    for (int dx = -reach; dx <= reach; ++dx) {
      if (dx * dx + dy * dy <= r2) set_pixel(x + dx, y + dy, color);
    }
  }
}

// Bresenham over the clipped segment; plot(x, y, step) gets the step index counted from the
// unclipped start along the major axis, so dash patterns do not shift when a line is clipped.
template <typename Plot>
void Image::rasterize_line(double x0, double y0, double x1, double y1, int thickness, Plot plot) {
  if (!std::isfinite(x0) || !std::isfinite(y0) || !std::isfinite(x1) || !std::isfinite(y1)) return;
  if (clip_x1_ <= clip_x0_ || clip_y1_ <= clip_y0_) return;
  const double major_length = std::max(std::abs(x1 - x0), std::abs(y1 - y0));
  const double pad = thickness + 1.0;
  double t_start = 0.0;
  if (!clip_segment(x0, y0, x1, y1, clip_x0_ - pad, clip_y0_ - pad, clip_x1_ - 1 + pad, clip_y1_ - 1 + pad, t_start)) {
    return;
  }
  const std::int64_t step_offset = std::llround(t_start * major_length);
  std::int64_t x = std::llround(x0);
  std::int64_t y = std::llround(y0);
  const std::int64_t xe = std::llround(x1);
  const std::int64_t ye = std::llround(y1);
  const std::int64_t dx = std::llabs(xe - x);
  const std::int64_t dy = -std::llabs(ye - y);
  const int sx = x < xe ? 1 : -1;
  const int sy = y < ye ? 1 : -1;
  std::int64_t err = dx + dy;
  for (std::int64_t step = step_offset;; ++step) {
    plot(static_cast<int>(x), static_cast<int>(y), step);
    if (x == xe && y == ye) break;
    // Every iteration moves one pixel along the major axis (and maybe one along the minor).
    const std::int64_t e2 = 2 * err;
    if (e2 >= dy) {
      err += dy;
      x += sx;
    }
    if (e2 <= dx) {
      err += dx;
      y += sy;
    }
  }
}

void Image::draw_line(double x0, double y0, double x1, double y1, Rgb color, int thickness) {
  check_thickness(thickness);
  rasterize_line(x0, y0, x1, y1, thickness, [&](int x, int y, std::int64_t) { stamp_pen(x, y, color, thickness); });
}

void Image::draw_dashed_line(double x0, double y0, double x1, double y1, Rgb color, int thickness, int dash_length,
                             int gap_length) {
  check_thickness(thickness);
  SAPATTN_CHECK(dash_length >= 1 && gap_length >= 0, InvalidArgumentError,
                "dash pattern needs dash >= 1 and gap >= 0, got ", dash_length, " and ", gap_length);
  const std::int64_t period = std::int64_t{dash_length} + gap_length;
  rasterize_line(x0, y0, x1, y1, thickness, [&](int x, int y, std::int64_t step) {
    if (step % period < dash_length) stamp_pen(x, y, color, thickness);
  });
}

void Image::draw_marker(double cx, double cy, Marker shape, int radius, Rgb color) {
  SAPATTN_CHECK(radius >= 0 && radius <= kMaxThickness, InvalidArgumentError, "marker radius must be in [0, ",
                kMaxThickness, "], got ", radius);
  if (shape == Marker::kNone || !std::isfinite(cx) || !std::isfinite(cy)) return;
  // Far-away centres cannot touch the image; rejecting them keeps the int conversion safe.
  if (std::abs(cx) > 4.0 * kMaxImageSide || std::abs(cy) > 4.0 * kMaxImageSide) return;
  const int x0 = static_cast<int>(std::lround(cx));
  const int y0 = static_cast<int>(std::lround(cy));
  const double r = radius;
  // Sizes are tuned so that the four shapes look about equally heavy at the same radius.
  auto inside = [&](int dx, int dy) {
    switch (shape) {
      case Marker::kCircle:
        return dx * dx + dy * dy <= r * r + r * 0.8;
      case Marker::kSquare:
        return std::max(std::abs(dx), std::abs(dy)) <= std::lround(r * 0.85);
      case Marker::kDiamond:
        return std::abs(dx) + std::abs(dy) <= std::lround(r * 1.25);
      case Marker::kTriangle: {
        // Apex up; the centre sits at the triangle's centroid so it lines up with the data point.
        const double top = -r * 1.15;
        const double bottom = r * 0.7;
        if (dy < top || dy > bottom) return false;
        const double half = (dy - top) / (bottom - top) * r * 1.15;
        return std::abs(dx) <= half + 0.25;
      }
      case Marker::kNone:
        return false;
    }
    return false;
  };
  const int reach = static_cast<int>(std::ceil(r * 1.3)) + 1;
  for (int dy = -reach; dy <= reach; ++dy) {
    for (int dx = -reach; dx <= reach; ++dx) {
      if (inside(dx, dy)) set_pixel(x0 + dx, y0 + dy, color);
    }
  }
}

void Image::draw_text(int x, int y, std::string_view text, Rgb color, int scale) {
  check_scale(scale);
  // Lines entirely above or below the clip rectangle draw nothing; skipping them also keeps the
  // pixel arithmetic below within int.
  if (std::int64_t{y} + (kGlyphHeight + kGlyphDescent) * scale <= clip_y0_ || y >= clip_y1_) return;
  std::int64_t pen_x = x;
  for_each_glyph(text, [&](char c) {
    const bool visible = pen_x < clip_x1_ && pen_x + kGlyphWidth * scale > clip_x0_;
    pen_x += kGlyphAdvance * scale;
    if (!visible) return;
    const std::int64_t left = pen_x - kGlyphAdvance * scale;
    const auto rows = glyph_bitmap(c);
    const int top = y + glyph_descent(c) * scale;
    for (int row = 0; row < kGlyphHeight; ++row) {
      for (int col = 0; col < kGlyphWidth; ++col) {
        if (rows[row] & (0x10 >> col)) {
          fill_rect(static_cast<int>(left + col * scale), top + row * scale, scale, scale, color);
        }
      }
    }
  });
}

void Image::draw_text_vertical(int x, int y, std::string_view text, Rgb color, int scale) {
  check_scale(scale);
  // Glyph pixel (u along the text, v down the glyph) lands at (x + v, y + total - 1 - u): a
  // counter-clockwise quarter turn, so the tops of the letters face left.
  if (std::int64_t{x} + (kGlyphHeight + kGlyphDescent) * scale <= clip_x0_ || x >= clip_x1_) return;
  const std::int64_t total = text_width(text, scale);
  std::int64_t pen_u = 0;
  for_each_glyph(text, [&](char c) {
    // Glyph cells wholly outside the clip rectangle vertically are skipped (keeps ints in range).
    const std::int64_t cell_bottom = std::int64_t{y} + total - 1 - pen_u;
    if (cell_bottom - kGlyphAdvance * scale >= clip_y1_ || cell_bottom < clip_y0_) {
      pen_u += kGlyphAdvance * scale;
      return;
    }
    const auto rows = glyph_bitmap(c);
    const int left = x + glyph_descent(c) * scale;
    for (int row = 0; row < kGlyphHeight; ++row) {
      for (int col = 0; col < kGlyphWidth; ++col) {
        if (!(rows[row] & (0x10 >> col))) continue;
        const std::int64_t u_last = pen_u + (col + 1) * scale - 1;
        fill_rect(left + row * scale, static_cast<int>(y + total - 1 - u_last), scale, scale, color);
      }
    }
    pen_u += kGlyphAdvance * scale;
  });
}

void Image::blit(const Image& src, int x, int y, int w, int h) {
  SAPATTN_CHECK(w >= 0 && h >= 0, InvalidArgumentError, "blit size ", w, "x", h, " is negative");
  if (src.empty() || w == 0 || h == 0) return;
  if (&src == this) {
    const Image copy = src;
    blit(copy, x, y, w, h);
    return;
  }
  const auto [x0, x1] = clamp_span(x, w, clip_x0_, clip_x1_);
  const auto [y0, y1] = clamp_span(y, h, clip_y0_, clip_y1_);
  if (x0 >= x1 || y0 >= y1) return;
  // Sample the source at the centre of each destination pixel: ((2i + 1) * src) / (2 * dst).
  std::vector<int> src_x(static_cast<std::size_t>(x1 - x0));
  for (int xx = x0; xx < x1; ++xx) {
    const std::int64_t i = std::int64_t{xx} - x;
    src_x[xx - x0] = static_cast<int>((2 * i + 1) * src.width_ / (2 * std::int64_t{w}));
  }
  for (int yy = y0; yy < y1; ++yy) {
    const std::int64_t j = std::int64_t{yy} - y;
    const auto sy = static_cast<std::size_t>((2 * j + 1) * src.height_ / (2 * std::int64_t{h}));
    const std::uint8_t* src_row = &src.pixels_[sy * src.width_ * 3];
    std::uint8_t* dst = &pixels_[(static_cast<std::size_t>(yy) * width_ + x0) * 3];
    for (int xx = x0; xx < x1; ++xx, dst += 3) {
      const std::uint8_t* s = src_row + static_cast<std::size_t>(src_x[xx - x0]) * 3;
      dst[0] = s[0];
      dst[1] = s[1];
      dst[2] = s[2];
    }
  }
}

// ---- Font ----------------------------------------------------------------------------------

std::array<std::uint8_t, kGlyphHeight> glyph_bitmap(char c) {
  auto byte = static_cast<unsigned char>(c);
  if (byte < 32 || byte > 126) byte = '?';
  std::array<std::uint8_t, kGlyphHeight> rows{};
  std::copy(std::begin(kFont[byte - 32]), std::end(kFont[byte - 32]), rows.begin());
  return rows;
}

int glyph_descent(char c) { return c == 'g' || c == 'p' || c == 'q' || c == 'y' ? kGlyphDescent : 0; }

int glyph_count(std::string_view text) {
  int n = 0;
  for_each_glyph(text, [&](char) { ++n; });
  return n;
}

int text_width(std::string_view text, int scale) {
  check_scale(scale);
  const std::int64_t n = glyph_count(text);
  if (n == 0) return 0;
  const std::int64_t width = (n * kGlyphAdvance - (kGlyphAdvance - kGlyphWidth)) * scale;
  SAPATTN_CHECK(width <= std::numeric_limits<int>::max(), InvalidArgumentError, "text of ", n,
                " glyphs is too wide to measure at scale ", scale);
  return static_cast<int>(width);
}

int text_height(int scale) {
  check_scale(scale);
  return kGlyphHeight * scale;
}

// ---- Colour maps ---------------------------------------------------------------------------

Rgb category_color(int id) {
  // Golden-ratio hue steps spread any prefix of ids evenly around the wheel. Ids 21, 34 and 55
  // apart land within a few degrees of hue, so consecutive ids cycle through four
  // saturation/value levels (those distances are 1, 2 and 3 mod 4). The starting hue and the
  // levels come from a search for the largest smallest CIELAB distance among ids 0..63 (about
  // 8.9), keeping every id dark enough to read on white (luma <= 205) and ids 0..2 (brick red,
  // slate blue, green) dark enough for chart lines.
  constexpr double kGoldenFraction = 0.6180339887498949;
  constexpr double kStartHue = 0.03;
  constexpr double kLevels[4][2] = {{0.65, 0.72}, {0.53, 0.61}, {0.90, 0.61}, {0.69, 0.83}};
  const std::int64_t i = id;  // negative ids wrap through the same sequence
  const double hue = kStartHue + static_cast<double>(i) * kGoldenFraction;
  const auto level = static_cast<std::size_t>(((i % 4) + 4) % 4);
  return hsv_to_rgb(hue - std::floor(hue), kLevels[level][0], kLevels[level][1]);
}

Rgb heat_color(float t) {
  if (std::isnan(t)) return {128, 128, 128};
  // Control points from deep indigo to pale yellow. Each sits at the position where its luma
  // falls on a straight line from the first to the last, so brightness grows evenly with t.
  struct Knot {
    double t;
    double r, g, b;
  };
  constexpr Knot kKnots[] = {
      {0.000, 38, 16, 64},   {0.256, 62, 74, 137},  {0.430, 38, 130, 142},
      {0.624, 53, 183, 121}, {0.852, 170, 220, 50}, {1.000, 250, 235, 80},
  };
  const double x = std::clamp(static_cast<double>(t), 0.0, 1.0);
  std::size_t k = 1;
  while (k + 1 < std::size(kKnots) && x > kKnots[k].t) ++k;
  const Knot& a = kKnots[k - 1];
  const Knot& b = kKnots[k];
  const double f = (x - a.t) / (b.t - a.t);
  return {to_byte(a.r + f * (b.r - a.r)), to_byte(a.g + f * (b.g - a.g)), to_byte(a.b + f * (b.b - a.b))};
}

double luma(Rgb c) { return 0.2126 * c.r + 0.7152 * c.g + 0.0722 * c.b; }

}  // namespace sapattn::render
