// quantize_e4m3 on the CPU, and the per-head quantisation the FP8 attention shares with it
// (cpu/fp8.hpp). The arithmetic is the codec's (core/fp8.hpp) on fp32 values, so that a CUDA
// kernel can reproduce every code and scale bit for bit.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/fp8.hpp"
#include "core/parallel.hpp"
#include "cpu/attention_layout.hpp"
#include "cpu/backend.hpp"
#include "cpu/fp8.hpp"
#include "cpu/rows.hpp"

namespace sapattn::cpu {

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// y = x - shift, or x.
inline float shifted(const float* row, const float* shift, int64_t d) {
  return shift != nullptr ? row[d] - shift[d] : row[d];
}

// amax of rows [lo, hi) over every column: NaN when one of the values is not finite.
float group_amax(const float* rows, int64_t lo, int64_t hi, int64_t D, const float* shift) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t r = lo; r < hi; ++r)
    for (int64_t d = 0; d < D; ++d) {
      const float y = shifted(rows + r * D, shift, d);
      finite = finite && std::isfinite(y);
      amax = std::max(amax, std::abs(y));
    }
  return finite ? amax : kNaN;
}

// The groups of rows of a Tile or Cluster granularity, as boundaries [0, ..., S].
std::vector<int64_t> group_bounds(int64_t S, Fp8Scale granularity, int tile, const int32_t* offsets, int64_t clusters) {
  std::vector<int64_t> bounds;
  if (granularity == Fp8Scale::Cluster) {
    bounds.assign(offsets, offsets + clusters + 1);
  } else {
    for (int64_t r = 0; r < S; r += tile) bounds.push_back(r);
    bounds.push_back(S);
  }
  return bounds;
}

}  // namespace

void quantize_head_e4m3(const float* rows, int64_t S, int64_t D, const float* shift, Fp8Scale granularity, int tile,
                        const int32_t* offsets, int64_t clusters, E4M3Rows& out, int threads) {
  out.codes.resize(S * D);
  if (granularity == Fp8Scale::Channel) {
    out.scales.resize(D);
    std::vector<float> amax(D, 0.0f), inverse(D);
    std::vector<uint8_t> finite(D, 1);
    for (int64_t r = 0; r < S; ++r)
      for (int64_t d = 0; d < D; ++d) {
        const float y = shifted(rows + r * D, shift, d);
        finite[d] = finite[d] && std::isfinite(y);
        amax[d] = std::max(amax[d], std::abs(y));
      }
    for (int64_t d = 0; d < D; ++d) {
      const fp8::E4M3Scale s = fp8::e4m3_scale(finite[d] ? amax[d] : kNaN);
      out.scales[d] = s.scale;
      inverse[d] = s.inverse;
    }
    parallel_for((S + 255) / 256, threads, [&](int64_t chunk) {
      for (int64_t r = chunk * 256; r < std::min(S, (chunk + 1) * 256); ++r)
        for (int64_t d = 0; d < D; ++d)
          out.codes[r * D + d] = fp8::e4m3_encode(shifted(rows + r * D, shift, d) * inverse[d]);
    });
    return;
  }
  out.scales.resize(S);
  const std::vector<int64_t> bounds = group_bounds(S, granularity, tile, offsets, clusters);
  parallel_for(static_cast<int64_t>(bounds.size()) - 1, threads, [&](int64_t g) {
    const int64_t lo = bounds[g], hi = bounds[g + 1];
    const fp8::E4M3Scale s = fp8::e4m3_scale(group_amax(rows, lo, hi, D, shift));
    for (int64_t r = lo; r < hi; ++r) {
      out.scales[r] = s.scale;
      for (int64_t d = 0; d < D; ++d)
        out.codes[r * D + d] = fp8::e4m3_encode(shifted(rows + r * D, shift, d) * s.inverse);
    }
  });
}

void mean_row(const float* rows, int64_t S, int64_t D, float* mean) {
  std::vector<double> sum(D, 0.0);
  for (int64_t r = 0; r < S; ++r)
    for (int64_t d = 0; d < D; ++d) sum[d] += rows[r * D + d];
  for (int64_t d = 0; d < D; ++d) mean[d] = static_cast<float>(sum[d] / static_cast<double>(S));
}

const float* e4m3_values() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int c = 0; c < 256; ++c) t[c] = fp8::e4m3_decode(static_cast<uint8_t>(c));
    return t;
  }();
  return table.data();
}

void quantize_e4m3(const TensorView& x, const TensorView& perm, const TensorView& offsets, const TensorView& shift,
                   Fp8Scale granularity, int tile_rows, TensorView codes, TensorView scales, int threads) {
  const int64_t B = x.shape[0], H = x.shape[1], S = x.shape[2], D = x.shape[3];
  check_permutation(perm, "perm");
  const bool by_cluster = granularity == Fp8Scale::Cluster;
  const int64_t C = by_cluster ? offsets.shape[2] - 1 : 0;
  if (by_cluster)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) check_offsets(&at<int32_t>(offsets, b, h), C, S, "offsets", b, h);
  std::vector<float> rows;
  E4M3Rows q;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      load_slice(x, b, h, perm_row(perm, b, h), rows, threads);
      quantize_head_e4m3(rows.data(), S, D, shift.empty() ? nullptr : &at<float>(shift, b, h), granularity, tile_rows,
                         by_cluster ? &at<int32_t>(offsets, b, h) : nullptr, C, q, threads);
      std::memcpy(&at<uint8_t>(codes, b, h), q.codes.data(), q.codes.size());
      std::memcpy(&at<float>(scales, b, h), q.scales.data(), q.scales.size() * sizeof(float));
    }
}

}  // namespace sapattn::cpu
