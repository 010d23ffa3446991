// Attention on the CPU: one engine for dense and variable-block sparse attention. Per (b,h) the
// inputs are converted once to fp32 rows; queries are processed in tiles of kQueryTile rows that
// never straddle a query cluster, keys in tiles of up to kKeyTile rows of one kept key cluster,
// with the online softmax in fp32. Each query row is owned by one task, so results do not depend
// on the thread count.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/parallel.hpp"
#include "cpu/attention_layout.hpp"
#include "cpu/backend.hpp"
#include "cpu/rows.hpp"
#include "sapattn/error.hpp"

namespace sapattn::cpu {

namespace {

constexpr int64_t kQueryTile = 16;
constexpr int64_t kKeyTile = 64;

// Attention of the query rows [q_begin, q_end) (at most kQueryTile) over the key segments.
// Writes out rows and lse entries of those queries (row q_perm[r] for row r when q_perm is given).
void attend_tile(const float* q, const float* k, const float* v, int64_t D, float scale, int64_t q_begin, int64_t q_end,
                 const std::vector<Segment>& keys, const TensorView& out, const TensorView& lse, int64_t b, int64_t h,
                 const int32_t* q_perm) {
  const int64_t rows = q_end - q_begin;
  RowSoftmax row[kQueryTile];
  std::fill(row, row + rows, RowSoftmax{-std::numeric_limits<float>::infinity(), 0.0f});
  std::vector<float> acc(rows * D, 0.0f);
  float s[kQueryTile][kKeyTile];
  for (const Segment& seg : keys) {
    for (int64_t k0 = seg.begin; k0 < seg.end; k0 += kKeyTile) {
      const int64_t cols = std::min(kKeyTile, seg.end - k0);
      for (int64_t r = 0; r < rows; ++r) {
        const float* qr = q + (q_begin + r) * D;
        float tile_max = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < cols; ++c) {
          s[r][c] = dot(qr, k + (k0 + c) * D, D) * scale;
          tile_max = std::max(tile_max, s[r][c]);
        }
        float* a = acc.data() + r * D;
        const float new_max = advance_max(row[r], tile_max, a, D);
        float tile_sum = 0.0f;
        for (int64_t c = 0; c < cols; ++c) {
          const float p = std::exp(s[r][c] - new_max);
          tile_sum += p;
          const float* vr = v + (k0 + c) * D;
          for (int64_t d = 0; d < D; ++d) a[d] += p * vr[d];
        }
        row[r].sum += tile_sum;
      }
    }
  }
  std::vector<float> o(D);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = q_begin + r;
    finish_row(acc.data() + r * D, D, row[r], nullptr, 1.0f, 0.0f, out, lse, b, h, q_perm != nullptr ? q_perm[i] : i,
               o.data());
  }
}

// The shared engine. `key_list(b, h, a)` gives the key segments of query cluster a; `q_offsets` the
// query cluster boundaries of (b,h).
template <typename QueryOffsets, typename KeyList>
void run_attention(const TensorView& q, const TensorView& k, const TensorView& v, float scale, TensorView out,
                   TensorView lse, const RowPermutation& perm, int threads, QueryOffsets q_offsets, KeyList key_list) {
  const int64_t B = q.shape[0], H = q.shape[1], D = q.shape[3];
  std::vector<float> qf, kf, vf;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int32_t* q_perm = perm_row(perm.q_perm, b, h);
      load_slice(q, b, h, q_perm, qf, threads);
      load_slice(k, b, h, perm_row(perm.k_perm, b, h), kf, threads);
      load_slice(v, b, h, perm_row(perm.k_perm, b, h), vf, threads);
      const std::vector<int64_t> bounds = q_offsets(b, h);
      const std::vector<QueryTile> tiles = query_tiles(bounds, kQueryTile);
      std::vector<std::vector<Segment>> lists(bounds.size() - 1);
      for (size_t a = 0; a + 1 < bounds.size(); ++a) lists[a] = key_list(b, h, static_cast<int64_t>(a));
      parallel_for(static_cast<int64_t>(tiles.size()), threads, [&](int64_t t) {
        const QueryTile& tile = tiles[t];
        attend_tile(qf.data(), kf.data(), vf.data(), D, scale, tile.begin, tile.end, lists[tile.cluster], out, lse, b,
                    h, q_perm);
      });
    }
  }
}

}  // namespace

void block_sparse_attention(const TensorView& q, const TensorView& k, const TensorView& v, const BlockLayout& layout,
                            float scale, TensorView out, TensorView lse, const RowPermutation& perm, int threads) {
  check_layout_values(layout, perm, q.shape[2], k.shape[2]);
  const int64_t Cq = layout.q_offsets.shape[2] - 1;
  run_attention(
      q, k, v, scale, out, lse, perm, threads,
      [&](int64_t b, int64_t h) {
        const int32_t* off = &at<int32_t>(layout.q_offsets, b, h);
        return std::vector<int64_t>(off, off + Cq + 1);
      },
      [&](int64_t b, int64_t h, int64_t a) { return kept_key_runs(layout, b, h, a); });
}

void dense_attention(const TensorView& q, const TensorView& k, const TensorView& v, float scale, TensorView out,
                     TensorView lse, int threads) {
  const int64_t Sq = q.shape[2], Sk = k.shape[2];
  run_attention(
      q, k, v, scale, out, lse, RowPermutation{}, threads,
      [&](int64_t, int64_t) {
        return std::vector<int64_t>{0, Sq};
      },
      [&](int64_t, int64_t, int64_t) {
        return std::vector<Segment>{{0, Sk}};
      });
}

void block_density(const BlockLayout& layout, TensorView density, int threads) {
  const int64_t B = layout.q_offsets.shape[0], H = layout.q_offsets.shape[1];
  const int64_t Cq = layout.q_offsets.shape[2] - 1, Ck = layout.k_offsets.shape[2] - 1;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      check_offsets(&at<int32_t>(layout.q_offsets, b, h), Cq, -1, "q_offsets", b, h);
      check_offsets(&at<int32_t>(layout.k_offsets, b, h), Ck, -1, "k_offsets", b, h);
    }
  parallel_for(B * H, threads, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    const int32_t* qo = &at<int32_t>(layout.q_offsets, b, h);
    const int32_t* ko = &at<int32_t>(layout.k_offsets, b, h);
    const double Sq = qo[Cq] - qo[0], Sk = ko[Ck] - ko[0];
    double pairs = 0.0;
    for (int64_t a = 0; a < Cq; ++a)
      for (int64_t c = 0; c < Ck; ++c)
        if (at<uint8_t>(layout.mask, b, h, a, c) != 0)
          pairs += static_cast<double>(qo[a + 1] - qo[a]) * static_cast<double>(ko[c + 1] - ko[c]);
    at<float>(density, b, h) = (Sq > 0 && Sk > 0) ? static_cast<float>(pairs / (Sq * Sk)) : 0.0f;
  });
}

void check_finite(const TensorView& x, const char* name, int threads) {
  const int64_t B = x.shape[0], H = x.shape[1], S = x.shape[2], D = x.shape[3];
  std::vector<int64_t> first_bad(B * H, -1);
  parallel_for(B * H, threads, [&](int64_t bh) {
    std::vector<float> row(D);
    for (int64_t s = 0; s < S && first_bad[bh] < 0; ++s) {
      load_row(x, bh / H, bh % H, s, row.data());
      for (int64_t d = 0; d < D; ++d)
        if (!std::isfinite(row[d])) {
          first_bad[bh] = s * D + d;
          break;
        }
    }
  });
  for (int64_t bh = 0; bh < B * H; ++bh)
    SAPATTN_CHECK(first_bad[bh] < 0, NonFiniteError, name, " holds a non-finite value at [b=", bh / H, ", h=", bh % H,
                  ", s=", first_bad[bh] / D, ", d=", first_bad[bh] % D, "]");
}

}  // namespace sapattn::cpu
