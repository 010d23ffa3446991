// A small RGB8 raster for the demo's pictures: filled shapes, lines, markers, text in a built-in
// 5x7 bitmap font, nearest-neighbour blits, and two colour maps (categorical and sequential).
//
// Conventions: (0, 0) is the top-left pixel, x grows right, y grows down. Drawing calls clip to the
// image (and to the clip rectangle, when one is set) and never fail on coordinates outside it;
// only sizes that cannot make sense (negative, too large, non-finite) throw InvalidArgumentError.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>
#include <vector>

namespace sapattn::render {

struct Rgb {
  std::uint8_t r = 0;
  std::uint8_t g = 0;
  std::uint8_t b = 0;
  friend bool operator==(const Rgb&, const Rgb&) = default;
};

inline constexpr Rgb kWhite{255, 255, 255};
inline constexpr Rgb kBlack{0, 0, 0};

// Filled marker shapes for chart points; kNone draws nothing.
enum class Marker { kNone, kCircle, kSquare, kDiamond, kTriangle };

// The largest image side and pixel count accepted; far above anything the demo draws, low enough
// that a typo in a size fails with a message instead of an allocation failure.
inline constexpr int kMaxImageSide = 1 << 15;
inline constexpr std::int64_t kMaxImagePixels = std::int64_t{1} << 27;

class Image {
 public:
  // An empty 0x0 image; drawing on it does nothing and encoding it throws.
  Image() = default;
  // width and height in [1, kMaxImageSide], width * height <= kMaxImagePixels.
  Image(int width, int height, Rgb background = kWhite);

  int width() const { return width_; }
  int height() const { return height_; }
  bool empty() const { return pixels_.empty(); }
  // Row-major RGB triples, 3 * width bytes per row, no padding.
  const std::uint8_t* data() const { return pixels_.data(); }
  std::uint8_t* data() { return pixels_.data(); }

  // Reading outside the image is a caller bug: throws InvalidArgumentError.
  Rgb pixel(int x, int y) const;
  // Writing outside the image (or the clip rectangle) is ignored, like every drawing call.
  void set_pixel(int x, int y, Rgb color);
  // out = alpha * color + (1 - alpha) * out; alpha is clamped to [0, 1].
  void blend_pixel(int x, int y, Rgb color, float alpha);

  // Restricts all later drawing to the given rectangle (intersected with the image).
  void set_clip(int x, int y, int w, int h);
  void reset_clip();

  void fill(Rgb color);
  void fill_rect(int x, int y, int w, int h, Rgb color);
  void blend_rect(int x, int y, int w, int h, Rgb color, float alpha);
  // Outline drawn inside the rectangle.
  void draw_rect(int x, int y, int w, int h, Rgb color, int thickness = 1);

  // Lines between pixel centres; thickness >= 1 (square pen up to 2, round pen above).
  // Non-finite endpoints draw nothing. Coordinates may lie far outside the image.
  void draw_line(double x0, double y0, double x1, double y1, Rgb color, int thickness = 1);
  // Alternating dash_length pixels on, gap_length pixels off, counted along the major axis.
  void draw_dashed_line(double x0, double y0, double x1, double y1, Rgb color, int thickness = 1, int dash_length = 6,
                        int gap_length = 4);
  // A filled marker centred on (cx, cy) whose shape fits a circle of the given radius.
  void draw_marker(double cx, double cy, Marker shape, int radius, Rgb color);

  // Text in the built-in font, (x, y) being the top-left corner of the first glyph cell. Each
  // glyph pixel becomes a scale x scale square. Bytes outside ASCII 32..126 print as '?', one per
  // UTF-8 code point. No line breaks: '\n' prints as '?' too.
  void draw_text(int x, int y, std::string_view text, Rgb color, int scale = 1);
  // The same text turned 90 degrees counter-clockwise (reading bottom to top), as for a y-axis
  // label: (x, y) is the top-left corner of its box, which is text_height(scale) wide (plus the
  // descent of g, p, q, y, to the right) and text_width(text, scale) tall.
  void draw_text_vertical(int x, int y, std::string_view text, Rgb color, int scale = 1);

  // Copies src into the rectangle (x, y, w, h), scaling with nearest-neighbour sampling.
  void blit(const Image& src, int x, int y, int w, int h);
  // Copies src unscaled with its top-left corner at (x, y).
  void blit(const Image& src, int x, int y) { blit(src, x, y, src.width(), src.height()); }

 private:
  template <typename Plot>
  void rasterize_line(double x0, double y0, double x1, double y1, int thickness, Plot plot);
  void stamp_pen(int x, int y, Rgb color, int thickness);

  int width_ = 0;
  int height_ = 0;
  std::vector<std::uint8_t> pixels_;
  // Clip rectangle as half-open bounds [clip_x0_, clip_x1_) x [clip_y0_, clip_y1_).
  int clip_x0_ = 0, clip_y0_ = 0, clip_x1_ = 0, clip_y1_ = 0;
};

// ---- Font ----------------------------------------------------------------------------------

inline constexpr int kGlyphWidth = 5;
inline constexpr int kGlyphHeight = 7;
// Horizontal distance between glyph origins (one blank column between glyphs), unscaled.
inline constexpr int kGlyphAdvance = 6;
// g, p, q and y are drawn this many rows lower than other glyphs: their tails hang below the
// text_height() box (the height of capitals and digits), which keeps them from reading as 9, P.
inline constexpr int kGlyphDescent = 2;
// Suggested distance between text lines, unscaled: glyph, descent and two blank rows.
inline constexpr int kLineHeight = 11;

// Seven rows, top to bottom; bit 4 of each row is the leftmost column. Characters outside
// 32..126 give the glyph of '?'.
std::array<std::uint8_t, kGlyphHeight> glyph_bitmap(char c);
// Rows by which draw_text lowers the glyph: kGlyphDescent for g, p, q, y, else 0.
int glyph_descent(char c);
// Number of glyphs draw_text prints for the text (UTF-8 code points).
int glyph_count(std::string_view text);
// Width in pixels of the drawn text: glyph_count * kGlyphAdvance * scale minus the trailing
// blank column; 0 for empty text.
int text_width(std::string_view text, int scale = 1);
// Height in pixels of capitals and digits, kGlyphHeight * scale: the box layouts align on. Tails
// of g, p, q, y reach kGlyphDescent * scale pixels further down.
int text_height(int scale = 1);

// ---- Colour maps ---------------------------------------------------------------------------

// Distinct colours for category ids (clusters, series): hue advances by the golden ratio, and
// saturation/value cycle through four levels so that ids whose hues land close together (ids 21,
// 34 and 55 apart) still differ. All are dark enough to read on white (luma <= 205). Negative
// ids are allowed (they wrap onto the same sequence).
Rgb category_color(int id);
// A dark-to-bright sequential map for t in [0, 1] (indigo, blue, teal, green, yellow), with luma
// rising linearly in t. t is clamped; NaN maps to mid grey.
Rgb heat_color(float t);
// Rec. 709 luma of the gamma-encoded values, 0..255. Used to pick legible text colours.
double luma(Rgb c);

}  // namespace sapattn::render
