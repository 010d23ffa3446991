// The pieces of the CPU attention engines that attention_layout.hpp declares.
#include "cpu/attention_layout.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/parallel.hpp"
#include "cpu/rows.hpp"
#include "sapattn/error.hpp"

namespace sapattn::cpu {

void load_slice(const TensorView& t, int64_t b, int64_t h, const int32_t* perm, std::vector<float>& dst, int threads) {
  const int64_t S = t.shape[2], D = t.shape[3];
  dst.resize(S * D);
  const int64_t chunks = (S + 1023) / 1024;
  parallel_for(chunks, threads, [&](int64_t c) {
    for (int64_t s = c * 1024; s < std::min(S, (c + 1) * 1024); ++s)
      load_row(t, b, h, perm != nullptr ? perm[s] : s, dst.data() + s * D);
  });
}

const int32_t* perm_row(const TensorView& perm, int64_t b, int64_t h) {
  return perm.empty() ? nullptr : &at<int32_t>(perm, b, h);
}

std::vector<QueryTile> query_tiles(const std::vector<int64_t>& bounds, int64_t rows) {
  std::vector<QueryTile> tiles;
  for (size_t a = 0; a + 1 < bounds.size(); ++a)
    for (int64_t r = bounds[a]; r < bounds[a + 1]; r += rows)
      tiles.push_back({static_cast<int64_t>(a), r, std::min(bounds[a + 1], r + rows)});
  return tiles;
}

std::vector<Segment> kept_key_runs(const BlockLayout& layout, int64_t b, int64_t h, int64_t a) {
  const int64_t Ck = layout.k_offsets.shape[2] - 1;
  const int32_t* off = &at<int32_t>(layout.k_offsets, b, h);
  std::vector<Segment> segs;
  for (int64_t c = 0; c < Ck; ++c) {
    if (at<uint8_t>(layout.mask, b, h, a, c) == 0 || off[c] == off[c + 1]) continue;
    if (!segs.empty() && segs.back().end == off[c]) {
      segs.back().end = off[c + 1];  // adjacent kept clusters form one run of keys
    } else {
      segs.push_back({off[c], off[c + 1]});
    }
  }
  return segs;
}

void check_offsets(const int32_t* off, int64_t C, int64_t total, const char* name, int64_t b, int64_t h) {
  SAPATTN_CHECK(off[0] == 0, InvalidArgumentError, name, "[b=", b, ",h=", h, "] must start at 0, got ", off[0]);
  for (int64_t c = 0; c < C; ++c)
    SAPATTN_CHECK(off[c + 1] >= off[c], InvalidArgumentError, name, "[b=", b, ",h=", h, "] decreases at cluster ", c,
                  ": ", off[c], " -> ", off[c + 1]);
  SAPATTN_CHECK(total < 0 || off[C] == total, InvalidArgumentError, name, "[b=", b, ",h=", h, "] must end at ", total,
                ", got ", off[C]);
}

void check_permutation(const TensorView& perm, const char* name) {
  if (perm.empty()) return;
  check_index_range(perm, perm.shape[2], name);
  std::vector<uint8_t> seen(perm.shape[2]);
  for (int64_t b = 0; b < perm.shape[0]; ++b)
    for (int64_t h = 0; h < perm.shape[1]; ++h) {
      std::fill(seen.begin(), seen.end(), 0);
      const int32_t* p = &at<int32_t>(perm, b, h);
      for (int64_t i = 0; i < perm.shape[2]; ++i) {
        SAPATTN_CHECK(seen[p[i]] == 0, InvalidArgumentError, name, "[b=", b, ", h=", h, "] repeats index ", p[i],
                      " (at ", i, "): not a permutation");
        seen[p[i]] = 1;
      }
    }
}

void finish_row(const float* acc, int64_t D, RowSoftmax s, const float* out_scale, float sum_unit, float lse_shift,
                const TensorView& out, const TensorView& lse, int64_t b, int64_t h, int64_t row, float* o) {
  const bool no_keys = s.sum == 0.0f;
  const float inv = no_keys ? 0.0f : 1.0f / s.sum;
  if (out_scale != nullptr) {
    for (int64_t d = 0; d < D; ++d) o[d] = (acc[d] * out_scale[d]) * inv;
  } else {
    for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv;
  }
  store_row(out, b, h, row, o);
  if (!lse.empty())
    at<float>(lse, b, h, row) =
        no_keys ? -std::numeric_limits<float>::infinity() : s.max + std::log(s.sum / sum_unit) + lse_shift;
}

void check_layout_values(const BlockLayout& layout, const RowPermutation& perm, int64_t Sq, int64_t Sk) {
  check_permutation(perm.q_perm, "q_perm");
  check_permutation(perm.k_perm, "k_perm");
  const int64_t B = layout.q_offsets.shape[0], H = layout.q_offsets.shape[1];
  const int64_t Cq = layout.q_offsets.shape[2] - 1, Ck = layout.k_offsets.shape[2] - 1;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      check_offsets(&at<int32_t>(layout.q_offsets, b, h), Cq, Sq, "q_offsets", b, h);
      check_offsets(&at<int32_t>(layout.k_offsets, b, h), Ck, Sk, "k_offsets", b, h);
    }
}

}  // namespace sapattn::cpu
