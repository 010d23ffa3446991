// Charts for the demo: a line chart with nice ticks and a legend, and a matrix chart (a heatmap
// with axes and a colour bar).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "render/canvas.hpp"

namespace sapattn::render {

struct Series {
  std::string name;
  Rgb color;
  // Drawn in the given order, joined by straight lines. Points with a non-finite coordinate (or
  // y <= 0 on a log axis) are skipped and break the line.
  std::vector<std::pair<double, double>> points;
  Marker marker = Marker::kCircle;  // kNone: line only
  bool dashed = false;
};

enum class LegendPlacement { kAuto, kTopRight, kTopLeft, kBottomRight, kBottomLeft, kNone };

struct LineChart {
  std::string title;
  std::string x_label;
  std::string y_label;
  std::vector<Series> series;
  bool log_y = false;
  // Fixed axis ends; any left unset comes from the data plus a small margin.
  std::optional<double> x_min, x_max, y_min, y_max;
  // kAuto puts the legend in the inner corner that covers the fewest line and marker pixels.
  LegendPlacement legend = LegendPlacement::kAuto;
  // Font scale for all text; 0 picks one from the picture size (2 for about 900x600).
  int text_scale = 0;

  // Throws InvalidArgumentError when the picture is too small for the labels and an axis range
  // that is empty or (for log_y) not positive.
  Image render(int width, int height) const;
};

// A rows x cols matrix as a picture with axes: each cell a square of cell_pixels x cell_pixels
// (whole pixels, so that no cell is drawn larger than another), coloured heat_color((v - vmin) /
// (vmax - vmin)), row 0 at the top. The axes are ticked in their own units: the columns span
// [0, x_extent] and the rows [0, y_extent] (e.g. tokens, when each cell holds several). The colour
// bar on the right, when asked for, is ticked over [vmin, vmax] and carries colorbar_label.
struct MatrixChart {
  std::string title;
  std::string x_label;
  std::string y_label;
  std::vector<float> values;  // rows * cols, row-major
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  double x_extent = 0.0;  // 0: cols
  double y_extent = 0.0;  // 0: rows
  float vmin = 0.0f;
  float vmax = 1.0f;
  bool colorbar = true;
  std::string colorbar_label;
  int text_scale = 2;

  // The picture's size follows from the matrix, the cell size and the labels. Throws
  // InvalidArgumentError when values does not hold rows * cols entries, the picture would exceed
  // the canvas limits, or vmin < vmax fails.
  Image render(int cell_pixels) const;
};

// Tick values at multiples of the step 1, 2 or 5 x 10^k, the smallest such step that leaves at
// most max_count ticks inside [lo, hi]. Needs finite lo < hi and max_count >= 2.
// Example: [0.03, 0.41] with max_count 6 gives 0.1, 0.2, 0.3, 0.4.
std::vector<double> nice_ticks(double lo, double hi, int max_count = 6);
// Ticks for a log axis over [lo, hi], 0 < lo < hi: 1, 2 and 5 times powers of ten when at most
// max_count of those fit, else powers of ten (every second, third, ... one when there are too
// many), else (a range within one decade) nice_ticks.
std::vector<double> log_ticks(double lo, double hi, int max_count = 6);
// Compact labels for one axis: plain decimals with no trailing zeros ("0.05", "0.1", "2") unless
// scientific notation ("1e-3", "2.5e-4", "1e5") is more than one character shorter for the
// longest label or a decimal label would need more than four decimals; the choice is made once
// per axis so labels look alike.
std::vector<std::string> format_ticks(const std::vector<double>& ticks);

}  // namespace sapattn::render
