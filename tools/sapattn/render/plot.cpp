#include "render/plot.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>

#include "sapattn/error.hpp"

namespace sapattn::render {
namespace {

constexpr Rgb kInk{40, 40, 40};
constexpr Rgb kGrid{230, 230, 230};
constexpr Rgb kFrame{110, 110, 110};
constexpr Rgb kLegendBorder{190, 190, 190};

// m * 10^k as the double nearest the decimal value: dividing by an exact power of ten avoids
// 3 * 0.1 = 0.30000000000000004, which would leak into the labels.
double decimal(double m, int k) { return k >= 0 ? m * std::pow(10.0, k) : m / std::pow(10.0, -k); }

// Shortest "%.*f" rendering of v that reads back within a relative 1e-9.
std::string fixed_label(double v) {
  if (v == 0.0) return "0";
  char buf[64];
  for (int digits = 0; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*f", digits, v);
    if (std::abs(std::strtod(buf, nullptr) - v) <= 1e-9 * std::abs(v)) break;
  }
  return buf;
}

// "2.5e-4", "1e5"; exponent 0 leaves the mantissa alone ("3").
std::string sci_label(double v) {
  if (v == 0.0) return "0";
  int e = static_cast<int>(std::floor(std::log10(std::abs(v))));
  double m = v / decimal(1.0, e);
  // log10 may land a hair off an exact power of ten; renormalise the mantissa into [1, 10).
  if (std::abs(m) >= 10.0 - 1e-9) {
    ++e;
    m /= 10.0;
  } else if (std::abs(m) < 1.0 - 1e-9) {
    --e;
    m *= 10.0;
  }
  char buf[64];
  for (int digits = 0; digits <= 6; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*f", digits, m);
    if (std::abs(std::strtod(buf, nullptr) - m) <= 1e-9 * std::abs(m)) break;
  }
  std::string out = buf;
  if (e != 0) {
    // Appended in two steps: GCC 12 warns falsely (-Wrestrict) about "e" + std::string.
    out += 'e';
    out += std::to_string(e);
  }
  return out;
}

int max_width(const std::vector<std::string>& labels, int scale) {
  int w = 0;
  for (const auto& l : labels) w = std::max(w, text_width(l, scale));
  return w;
}

// One axis in the space it is drawn in (log10 of the value for a log axis).
struct AxisRange {
  double lo = 0.0;
  double hi = 1.0;
};

// Data extent plus a 4% margin on each end the caller did not fix. Degenerate extents (one
// value, or a fixed end beyond the data) are widened so that lo < hi always holds.
AxisRange axis_range(const std::vector<double>& values, std::optional<double> fixed_lo, std::optional<double> fixed_hi,
                     bool log_scale, const char* axis) {
  auto to_axis = [&](double v, const char* which) {
    SAPATTN_CHECK(std::isfinite(v), InvalidArgumentError, axis, " axis ", which, " must be finite, got ", v);
    if (!log_scale) return v;
    SAPATTN_CHECK(v > 0.0, InvalidArgumentError, "log ", axis, " axis ", which, " must be > 0, got ", v);
    return std::log10(v);
  };
  AxisRange r;
  if (!values.empty()) {
    const auto [mn, mx] = std::minmax_element(values.begin(), values.end());
    r.lo = log_scale ? std::log10(*mn) : *mn;
    r.hi = log_scale ? std::log10(*mx) : *mx;
  }
  if (fixed_lo) r.lo = to_axis(*fixed_lo, "minimum");
  if (fixed_hi) r.hi = to_axis(*fixed_hi, "maximum");
  if (fixed_lo && fixed_hi) {
    SAPATTN_CHECK(r.lo < r.hi, InvalidArgumentError, axis, " axis minimum ", *fixed_lo, " must be below its maximum ",
                  *fixed_hi);
    return r;
  }
  if (!(r.lo < r.hi)) {
    const double w = log_scale ? 1.0 : (r.lo != 0.0 ? std::abs(r.lo) * 0.2 : 1.0);
    if (fixed_lo) {
      r.hi = r.lo + w;
    } else if (fixed_hi) {
      r.lo = r.hi - w;
    } else {
      r.lo -= w / 2;
      r.hi += w / 2;
    }
  }
  const double margin = (r.hi - r.lo) * 0.04;
  if (!fixed_lo) r.lo -= margin;
  if (!fixed_hi) r.hi += margin;
  SAPATTN_CHECK(std::isfinite(r.hi - r.lo), InvalidArgumentError, axis, " axis range is too wide to draw");
  return r;
}

struct Ticks {
  std::vector<double> at;  // positions in axis space
  std::vector<std::string> labels;
};

// The most ticks (up to 10) whose neighbours stay at least min_gap(labels) pixels apart.
template <typename MinGap>
Ticks choose_ticks(const AxisRange& r, bool log_scale, double pixels, MinGap min_gap) {
  Ticks best;
  for (int n = 10; n >= 2; --n) {
    const std::vector<double> values =
        log_scale ? log_ticks(std::pow(10.0, r.lo), std::pow(10.0, r.hi), n) : nice_ticks(r.lo, r.hi, n);
    Ticks t;
    t.labels = format_ticks(values);
    for (double v : values) t.at.push_back(log_scale ? std::log10(v) : v);
    double closest = std::numeric_limits<double>::infinity();
    for (std::size_t i = 1; i < t.at.size(); ++i) {
      closest = std::min(closest, (t.at[i] - t.at[i - 1]) / (r.hi - r.lo) * pixels);
    }
    best = std::move(t);
    if (closest >= min_gap(best.labels)) break;
  }
  return best;
}

int auto_text_scale(int width, int height) {
  const double s = std::min(width / 450.0, height / 320.0);
  return static_cast<int>(std::clamp(std::lround(s), 1L, 4L));
}

}  // namespace

// ---- Ticks ---------------------------------------------------------------------------------

std::vector<double> nice_ticks(double lo, double hi, int max_count) {
  SAPATTN_CHECK(std::isfinite(lo) && std::isfinite(hi) && lo < hi && std::isfinite(hi - lo), InvalidArgumentError,
                "tick range [", lo, ", ", hi, "] must be finite and non-empty");
  SAPATTN_CHECK(max_count >= 2, InvalidArgumentError, "max tick count must be >= 2, got ", max_count);
  const double span = hi - lo;
  // A range this narrow next to its magnitude has no distinct decimal ticks worth printing.
  if (std::max(std::abs(lo), std::abs(hi)) / span > 1e12) return {lo, hi};
  const int m_steps[] = {1, 2, 5};
  for (int k = static_cast<int>(std::floor(std::log10(span / max_count))) - 1;; ++k) {
    for (int m : m_steps) {
      const double step = decimal(m, k);
      const auto first = static_cast<std::int64_t>(std::ceil(lo / step - 1e-9));
      const auto last = static_cast<std::int64_t>(std::floor(hi / step + 1e-9));
      if (last - first + 1 > max_count) continue;
      std::vector<double> ticks;
      for (std::int64_t i = first; i <= last; ++i) ticks.push_back(decimal(static_cast<double>(i * m), k));
      return ticks;
    }
  }
}

std::vector<double> log_ticks(double lo, double hi, int max_count) {
  SAPATTN_CHECK(std::isfinite(lo) && std::isfinite(hi) && lo > 0.0 && lo < hi, InvalidArgumentError, "log tick range [",
                lo, ", ", hi, "] must be positive and non-empty");
  SAPATTN_CHECK(max_count >= 2, InvalidArgumentError, "max tick count must be >= 2, got ", max_count);
  const double tol = 1e-9;
  auto inside = [&](double v) { return v >= lo * (1 - tol) && v <= hi * (1 + tol); };
  const int e0 = static_cast<int>(std::floor(std::log10(lo)));
  const int e1 = static_cast<int>(std::ceil(std::log10(hi)));
  // 1, 2 and 5 times each power of ten, when that many fit: short ranges (under ~2 decades) then
  // still get four or five labelled lines instead of one or two.
  std::vector<double> ticks;
  std::vector<int> decades;
  for (int e = e0; e <= e1; ++e) {
    for (int m : {1, 2, 5}) {
      if (inside(decimal(m, e))) ticks.push_back(decimal(m, e));
    }
    if (inside(decimal(1, e))) decades.push_back(e);
  }
  if (ticks.size() >= 2 && static_cast<int>(ticks.size()) <= max_count) return ticks;
  const int n = static_cast<int>(decades.size());
  if (n >= 2) {
    const int stride = (n + max_count - 1) / max_count;
    // Prefer exponents that are multiples of the stride (1e-4, 1e-2, 1) over ones counted from the
    // first decade, unless that leaves a single tick.
    std::vector<double> aligned;
    std::vector<double> counted;
    for (int i = 0; i < n; ++i) {
      if (decades[i] % stride == 0) aligned.push_back(decimal(1, decades[i]));
      if (i % stride == 0) counted.push_back(decimal(1, decades[i]));
    }
    return aligned.size() >= 2 ? aligned : counted;
  }
  return nice_ticks(lo, hi, max_count);
}

std::vector<std::string> format_ticks(const std::vector<double>& ticks) {
  std::vector<std::string> fixed;
  std::vector<std::string> sci;
  std::size_t fixed_len = 0;
  std::size_t sci_len = 0;
  std::size_t decimals = 0;
  for (double v : ticks) {
    fixed.push_back(fixed_label(v));
    sci.push_back(sci_label(v));
    fixed_len = std::max(fixed_len, fixed.back().size());
    sci_len = std::max(sci_len, sci.back().size());
    const std::size_t point = fixed.back().find('.');
    if (point != std::string::npos) decimals = std::max(decimals, fixed.back().size() - point - 1);
  }
  // Runs of zeros are hard to count at a glance: past four decimals ("0.00025") scientific reads
  // better even when it is not shorter.
  return fixed_len > sci_len + 1 || decimals > 4 ? sci : fixed;
}

// ---- Line chart ----------------------------------------------------------------------------

Image LineChart::render(int width, int height) const {
  SAPATTN_CHECK(text_scale >= 0, InvalidArgumentError, "text scale must be >= 0, got ", text_scale);
  const int s = text_scale > 0 ? text_scale : auto_text_scale(width, height);
  const int th = text_height(s);
  const int pad = 5 * s;
  const int gap = 3 * s;
  const int tick_len = 3 * s;
  const int line_width = s + 1;
  const int marker_radius = 2 * s + 1;

  // Points the chart can place: finite, and positive y on a log axis.
  auto usable = [&](const std::pair<double, double>& p) {
    return std::isfinite(p.first) && std::isfinite(p.second) && (!log_y || p.second > 0.0);
  };
  std::vector<double> xs;
  std::vector<double> ys;
  for (const Series& ser : series) {
    for (const auto& p : ser.points) {
      if (!usable(p)) continue;
      xs.push_back(p.first);
      ys.push_back(p.second);
    }
  }
  const AxisRange xr = axis_range(xs, x_min, x_max, false, "x");
  const AxisRange yr = axis_range(ys, y_min, y_max, log_y, "y");

  // Vertical layout first: it does not depend on label widths.
  const int top = pad + (title.empty() ? 0 : th + 2 * gap);
  const int bottom = tick_len + gap + th + (x_label.empty() ? 0 : 2 * gap + th) + pad;
  const int plot_h = height - top - bottom;
  SAPATTN_CHECK(plot_h >= 30, InvalidArgumentError, "chart height ", height, " leaves no room to plot");
  const Ticks yt = choose_ticks(yr, log_y, plot_h - 1, [&](const auto&) { return 2.5 * th; });

  const int left = pad + (y_label.empty() ? 0 : th + 2 * gap) + max_width(yt.labels, s) + gap + tick_len;
  // The last x label is centred on the right edge of the plot: leave room for its right half.
  const int right_guess = pad + text_width("0.00", s) / 2;
  const Ticks xt = choose_ticks(xr, false, width - left - right_guess - 1,
                                [&](const auto& labels) { return max_width(labels, s) + 3.0 * kGlyphAdvance * s; });
  const int right = std::max(2 * pad, pad + (xt.labels.empty() ? 0 : text_width(xt.labels.back(), s) / 2));
  const int plot_w = width - left - right;
  SAPATTN_CHECK(plot_w >= 40, InvalidArgumentError, "chart width ", width, " leaves no room to plot");

  auto px = [&](double x) { return left + (x - xr.lo) / (xr.hi - xr.lo) * (plot_w - 1); };
  auto py = [&](double y) {
    const double a = log_y ? std::log10(y) : y;
    return top + (plot_h - 1) - (a - yr.lo) / (yr.hi - yr.lo) * (plot_h - 1);
  };

  Image img(width, height, kWhite);

  // Grid, frame, ticks and their labels.
  for (std::size_t i = 0; i < xt.at.size(); ++i) {
    const int x = static_cast<int>(std::lround(px(xt.at[i])));
    img.fill_rect(x, top, 1, plot_h, kGrid);
    img.fill_rect(x, top + plot_h, 1, tick_len, kFrame);
    img.draw_text(x - text_width(xt.labels[i], s) / 2, top + plot_h + tick_len + gap, xt.labels[i], kInk, s);
  }
  for (std::size_t i = 0; i < yt.at.size(); ++i) {
    // Tick positions are in axis space; py() expects values, so undo the log for log axes.
    const double value = log_y ? std::pow(10.0, yt.at[i]) : yt.at[i];
    const int y = static_cast<int>(std::lround(py(value)));
    img.fill_rect(left, y, plot_w, 1, kGrid);
    img.fill_rect(left - tick_len, y, tick_len, 1, kFrame);
    img.draw_text(left - tick_len - gap - text_width(yt.labels[i], s), y - th / 2, yt.labels[i], kInk, s);
  }
  img.draw_rect(left - 1, top - 1, plot_w + 2, plot_h + 2, kFrame);

  if (!title.empty()) {
    img.draw_text(left + (plot_w - text_width(title, s)) / 2, pad, title, kInk, s);
  }
  if (!x_label.empty()) {
    img.draw_text(left + (plot_w - text_width(x_label, s)) / 2, height - pad - th, x_label, kInk, s);
  }
  if (!y_label.empty()) {
    img.draw_text_vertical(pad, top + (plot_h - text_width(y_label, s)) / 2, y_label, kInk, s);
  }

  // Series, clipped to the inside of the frame. Pixels they cover are sampled for the legend.
  std::vector<std::pair<double, double>> ink;
  img.set_clip(left, top, plot_w, plot_h);
  for (const Series& ser : series) {
    const std::pair<double, double>* prev = nullptr;
    for (const auto& p : ser.points) {
      if (!usable(p)) {
        prev = nullptr;
        continue;
      }
      if (prev) {
        const double x0 = px(prev->first), y0 = py(prev->second), x1 = px(p.first), y1 = py(p.second);
        if (ser.dashed) {
          img.draw_dashed_line(x0, y0, x1, y1, ser.color, line_width, 5 * s, 3 * s);
        } else {
          img.draw_line(x0, y0, x1, y1, ser.color, line_width);
        }
        const double len = std::hypot(x1 - x0, y1 - y0);
        const int samples = static_cast<int>(std::min(len / 2.0, 4096.0)) + 1;
        for (int k = 0; k <= samples; ++k) {
          const double f = static_cast<double>(k) / samples;
          ink.emplace_back(x0 + f * (x1 - x0), y0 + f * (y1 - y0));
        }
      }
      prev = &p;
    }
  }
  // Markers after all lines, so that no line crosses a marker; a white ring keeps overlapping
  // markers of different series apart.
  for (const Series& ser : series) {
    for (const auto& p : ser.points) {
      if (!usable(p) || ser.marker == Marker::kNone) continue;
      img.draw_marker(px(p.first), py(p.second), ser.marker, marker_radius + std::max(1, s / 2), kWhite);
      img.draw_marker(px(p.first), py(p.second), ser.marker, marker_radius, ser.color);
      ink.emplace_back(px(p.first), py(p.second));
    }
  }

  // Legend: one row per named series, a line-and-marker sample then the name.
  std::vector<const Series*> named;
  for (const Series& ser : series) {
    if (!ser.name.empty()) named.push_back(&ser);
  }
  if (legend != LegendPlacement::kNone && !named.empty()) {
    const int inner = 3 * s;
    const int sample_w = 8 * s + 2 * marker_radius;
    const int row_h = std::max(th, 2 * marker_radius + 2) + gap;
    int name_w = 0;
    for (const Series* ser : named) name_w = std::max(name_w, text_width(ser->name, s));
    const int box_w = inner + sample_w + 2 * gap + name_w + inner;
    const int box_h = 2 * inner + static_cast<int>(named.size()) * row_h - gap;
    const int inset = 4 * s;
    const std::pair<int, int> corners[] = {
        {left + plot_w - inset - box_w, top + inset},                   // top right
        {left + inset, top + inset},                                    // top left
        {left + plot_w - inset - box_w, top + plot_h - inset - box_h},  // bottom right
        {left + inset, top + plot_h - inset - box_h},                   // bottom left
    };
    int pick = 0;
    switch (legend) {
      case LegendPlacement::kTopLeft:
        pick = 1;
        break;
      case LegendPlacement::kBottomRight:
        pick = 2;
        break;
      case LegendPlacement::kBottomLeft:
        pick = 3;
        break;
      case LegendPlacement::kAuto: {
        std::size_t fewest = std::numeric_limits<std::size_t>::max();
        for (int c = 0; c < 4; ++c) {
          const double margin = line_width + marker_radius;
          const double x0 = corners[c].first - margin, x1 = corners[c].first + box_w + margin;
          const double y0 = corners[c].second - margin, y1 = corners[c].second + box_h + margin;
          const auto covered = static_cast<std::size_t>(std::count_if(ink.begin(), ink.end(), [&](auto& q) {
            return q.first >= x0 && q.first <= x1 && q.second >= y0 && q.second <= y1;
          }));
          if (covered < fewest) {
            fewest = covered;
            pick = c;
          }
        }
        break;
      }
      default:
        break;
    }
    const auto [bx, by] = corners[pick];
    img.blend_rect(bx, by, box_w, box_h, kWhite, 0.9f);
    img.draw_rect(bx, by, box_w, box_h, kLegendBorder);
    for (std::size_t i = 0; i < named.size(); ++i) {
      const Series& ser = *named[i];
      const int cy = by + inner + static_cast<int>(i) * row_h + (row_h - gap) / 2;
      const int sx = bx + inner;
      if (ser.dashed) {
        img.draw_dashed_line(sx, cy, sx + sample_w - 1, cy, ser.color, line_width, 5 * s, 3 * s);
      } else {
        img.draw_line(sx, cy, sx + sample_w - 1, cy, ser.color, line_width);
      }
      if (ser.marker != Marker::kNone) {
        const int mx = sx + sample_w / 2;
        img.draw_marker(mx, cy, ser.marker, marker_radius + std::max(1, s / 2), kWhite);
        img.draw_marker(mx, cy, ser.marker, marker_radius, ser.color);
      }
      img.draw_text(sx + sample_w + 2 * gap, cy - th / 2, ser.name, kInk, s);
    }
  }
  img.reset_clip();
  return img;
}

// ---- Matrix chart --------------------------------------------------------------------------

Image MatrixChart::render(int cell_pixels) const {
  SAPATTN_CHECK(rows >= 1 && cols >= 1 && static_cast<std::int64_t>(values.size()) == rows * cols, InvalidArgumentError,
                "matrix chart: ", values.size(), " values for ", rows, " x ", cols, " cells");
  SAPATTN_CHECK(cell_pixels >= 1 && cols * cell_pixels <= kMaxImageSide / 2 && rows * cell_pixels <= kMaxImageSide / 2,
                InvalidArgumentError, "matrix chart: ", rows, " x ", cols, " cells of ", cell_pixels,
                " pixels do not fit a picture");
  SAPATTN_CHECK(std::isfinite(vmin) && std::isfinite(vmax) && vmin < vmax, InvalidArgumentError,
                "matrix chart: colour range [", vmin, ", ", vmax, "] must be finite with vmin < vmax");
  SAPATTN_CHECK(text_scale >= 1, InvalidArgumentError, "text scale must be >= 1, got ", text_scale);
  const int s = text_scale, th = text_height(s), pad = 5 * s, gap = 3 * s, tick_len = 3 * s;
  const int plot_w = static_cast<int>(cols) * cell_pixels, plot_h = static_cast<int>(rows) * cell_pixels;
  const AxisRange xr{0.0, x_extent > 0.0 ? x_extent : static_cast<double>(cols)};
  const AxisRange yr{0.0, y_extent > 0.0 ? y_extent : static_cast<double>(rows)};
  const auto label_gap = [&](const std::vector<std::string>& labels) { return max_width(labels, s) + 2.0 * gap; };
  const Ticks xt = choose_ticks(xr, false, plot_w, label_gap);
  const Ticks yt = choose_ticks(yr, false, plot_h, [&](const auto&) { return 2.0 * th; });
  const Ticks ct = choose_ticks(AxisRange{vmin, vmax}, false, plot_h, [&](const auto&) { return 2.0 * th; });

  const int left = pad + (y_label.empty() ? 0 : th + 2 * gap) + max_width(yt.labels, s) + gap + tick_len;
  const int top = pad + (title.empty() ? 0 : th + 2 * gap);
  const int bar_x = left + plot_w + 4 * gap, bar_w = 4 * gap;
  const int bar_right = bar_x + bar_w + tick_len + gap + max_width(ct.labels, s) +
                        (colorbar_label.empty() ? 0 : 2 * gap + th + kGlyphDescent * s);
  const int right_edge = colorbar ? bar_right : left + plot_w + text_width(xt.labels.back(), s) / 2;
  const int width = std::max(right_edge, left + text_width(title, s)) + pad;
  const int height = top + plot_h + tick_len + gap + th + (x_label.empty() ? 0 : 2 * gap + th) + pad;
  Image img(width, height, kWhite);

  const double vscale = 1.0 / (static_cast<double>(vmax) - vmin);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) {
      const double v = values[static_cast<std::size_t>(r * cols + c)];
      img.fill_rect(left + static_cast<int>(c) * cell_pixels, top + static_cast<int>(r) * cell_pixels, cell_pixels,
                    cell_pixels, heat_color(static_cast<float>((v - vmin) * vscale)));
    }
  img.draw_rect(left - 1, top - 1, plot_w + 2, plot_h + 2, kFrame);
  for (std::size_t i = 0; i < xt.at.size(); ++i) {
    const int x = left + static_cast<int>(std::lround(xt.at[i] / xr.hi * plot_w));
    img.fill_rect(x, top + plot_h + 1, 1, tick_len, kFrame);
    img.draw_text(x - text_width(xt.labels[i], s) / 2, top + plot_h + tick_len + gap, xt.labels[i], kInk, s);
  }
  for (std::size_t i = 0; i < yt.at.size(); ++i) {  // row 0 at the top: values grow downwards
    const int y = top + static_cast<int>(std::lround(yt.at[i] / yr.hi * plot_h));
    img.fill_rect(left - 1 - tick_len, y, tick_len, 1, kFrame);
    img.draw_text(left - 1 - tick_len - gap - text_width(yt.labels[i], s), y - th / 2, yt.labels[i], kInk, s);
  }
  if (!title.empty()) img.draw_text(left, pad, title, kInk, s);
  if (!x_label.empty())
    img.draw_text(left + (plot_w - text_width(x_label, s)) / 2, height - pad - th, x_label, kInk, s);
  if (!y_label.empty()) img.draw_text_vertical(pad, top + (plot_h - text_width(y_label, s)) / 2, y_label, kInk, s);

  if (colorbar) {  // vmax at the top, one colour per pixel row
    for (int y = 0; y < plot_h; ++y) {
      const double t = 1.0 - (y + 0.5) / plot_h;
      img.fill_rect(bar_x, top + y, bar_w, 1, heat_color(static_cast<float>(t)));
    }
    img.draw_rect(bar_x - 1, top - 1, bar_w + 2, plot_h + 2, kFrame);
    for (std::size_t i = 0; i < ct.at.size(); ++i) {
      const int y = top + static_cast<int>(std::lround((vmax - ct.at[i]) * vscale * (plot_h - 1)));
      img.fill_rect(bar_x + bar_w + 1, y, tick_len, 1, kFrame);
      img.draw_text(bar_x + bar_w + 1 + tick_len + gap, y - th / 2, ct.labels[i], kInk, s);
    }
    if (!colorbar_label.empty())
      img.draw_text_vertical(bar_right - th - kGlyphDescent * s, top + (plot_h - text_width(colorbar_label, s)) / 2,
                             colorbar_label, kInk, s);
  }
  return img;
}

}  // namespace sapattn::render
