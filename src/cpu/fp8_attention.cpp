// block_sparse_attention_e4m3 on the CPU: the arithmetic of the future FP8 Hopper kernel, emulated
// in fp32 (include/sapattn/ops.hpp gives the rule, docs/fp8.md the reasons). Per (b,h) the rows are
// loaded in cluster order, quantised once (cpu/fp8.hpp) and decoded to fp32, where every product of
// two e4m3 values is exact; query rows then run in tiles of kQueryTile rows within a cluster (for
// the threads only) over their kept keys, packed into chunks of kKeyChunk virtual keys as the GPU
// plan packs its key tiles, since P is quantised against the running maximum of each chunk. Each
// query row is owned by one task, so results do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/fp8.hpp"
#include "core/parallel.hpp"
#include "cpu/attention_layout.hpp"
#include "cpu/backend.hpp"
#include "cpu/fp8.hpp"
#include "cpu/rows.hpp"

namespace sapattn::cpu {

namespace {

constexpr int64_t kQueryTile = 16;
constexpr int64_t kKeyChunk = 128;

// One head, quantised and decoded: what the kernel's main loop would read.
struct E4M3Head {
  int64_t D = 0;
  std::vector<float> q, k, v;     // decoded codes, [S, D]
  std::vector<float> q_factor;    // sq_i * scale, [Sq]
  std::vector<float> k_scale;     // sk_j, [Sk]
  std::vector<float> p_factor;    // f_j: P of key j is stored as e4m3(p * f_j), [Sk]
  std::vector<float> out_factor;  // c_d: acc[d] * c_d / l is the output, [D]
  std::vector<float> lse_shift;   // scale * q_i . mean (smoothing), [Sq], or empty
  float sum_unit = 1.0f;          // l / sum_unit is the softmax denominator in units of P
  bool sum_e4m3 = false;          // l sums the quantised P
};

void decode(const E4M3Rows& rows, std::vector<float>& values) {
  const float* table = e4m3_values();
  values.resize(rows.codes.size());
  for (size_t i = 0; i < rows.codes.size(); ++i) values[i] = table[rows.codes[i]];
}

// Steps 1 and 2 of the contract, and the factors of steps 3 and 4.
void quantize_head(const std::vector<float>& qf, const std::vector<float>& kf, const std::vector<float>& vf, int64_t Sq,
                   int64_t Sk, int64_t D, const int32_t* q_off, int64_t Cq, const int32_t* k_off, int64_t Ck,
                   float scale, const Fp8Options& o, E4M3Head& head, int threads) {
  head.D = D;
  std::vector<float> mean;
  if (o.smooth_k) {
    mean.resize(D);
    mean_row(kf.data(), Sk, D, mean.data());
    head.lse_shift.resize(Sq);
    for (int64_t i = 0; i < Sq; ++i) head.lse_shift[i] = scale * dot(qf.data() + i * D, mean.data(), D);
  } else {
    head.lse_shift.clear();
  }
  E4M3Rows rq, rk, rv;
  quantize_head_e4m3(qf.data(), Sq, D, nullptr, o.q_scale, o.q_tile, q_off, Cq, rq, threads);
  quantize_head_e4m3(kf.data(), Sk, D, o.smooth_k ? mean.data() : nullptr, o.k_scale, o.k_tile, k_off, Ck, rk, threads);
  quantize_head_e4m3(vf.data(), Sk, D, nullptr, o.v_scale, o.v_tile, k_off, Ck, rv, threads);
  decode(rq, head.q);
  decode(rk, head.k);
  decode(rv, head.v);
  head.q_factor.resize(Sq);
  for (int64_t i = 0; i < Sq; ++i) head.q_factor[i] = rq.scales[i] * scale;
  head.k_scale = rk.scales;
  head.sum_e4m3 = o.p_sum_e4m3;
  head.sum_unit = o.p_sum_e4m3 ? o.p_scale : 1.0f;
  head.p_factor.resize(Sk);
  head.out_factor.resize(D);
  if (o.v_scale == Fp8Scale::Channel) {
    std::fill(head.p_factor.begin(), head.p_factor.end(), o.p_scale);
    for (int64_t d = 0; d < D; ++d) head.out_factor[d] = o.p_sum_e4m3 ? rv.scales[d] : rv.scales[d] / o.p_scale;
    return;
  }
  // V's row scales fold into P, relative to the head's largest (a NaN scale makes it NaN).
  float v_max = 0.0f;
  for (const float s : rv.scales) v_max = std::isnan(s) || std::isnan(v_max) ? std::nanf("") : std::max(v_max, s);
  for (int64_t j = 0; j < Sk; ++j) head.p_factor[j] = v_max != 0.0f ? (o.p_scale * rv.scales[j]) / v_max : 0.0f;
  std::fill(head.out_factor.begin(), head.out_factor.end(), v_max / o.p_scale);
}

// The next up to kKeyChunk virtual keys of a query cluster's runs, as key rows.
class KeyChunks {
 public:
  explicit KeyChunks(const std::vector<Segment>& runs) : runs_(runs) {}
  int64_t next(int64_t* keys) {
    int64_t n = 0;
    while (n < kKeyChunk && run_ < runs_.size()) {
      const Segment& s = runs_[run_];
      const int64_t take = std::min(kKeyChunk - n, s.end - s.begin - pos_);
      for (int64_t t = 0; t < take; ++t) keys[n++] = s.begin + pos_ + t;
      pos_ += take;
      if (s.begin + pos_ == s.end) {
        ++run_;
        pos_ = 0;
      }
    }
    return n;
  }

 private:
  const std::vector<Segment>& runs_;
  size_t run_ = 0;
  int64_t pos_ = 0;
};

// Steps 3 and 4 for query rows [q_begin, q_end) (at most kQueryTile) of one cluster.
void attend_tile(const E4M3Head& head, int64_t q_begin, int64_t q_end, const std::vector<Segment>& runs,
                 const TensorView& out, const TensorView& lse, int64_t b, int64_t h, const int32_t* q_perm) {
  const int64_t rows = q_end - q_begin, D = head.D;
  const float* table = e4m3_values();
  RowSoftmax row[kQueryTile];
  std::fill(row, row + rows, RowSoftmax{-std::numeric_limits<float>::infinity(), 0.0f});
  std::vector<float> acc(rows * D, 0.0f);
  int64_t keys[kKeyChunk];
  float s[kKeyChunk];
  KeyChunks chunks(runs);
  for (int64_t n; (n = chunks.next(keys)) > 0;) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = q_begin + r;
      const float* qi = head.q.data() + i * D;
      float chunk_max = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < n; ++c) {
        const int64_t j = keys[c];
        s[c] = dot(qi, head.k.data() + j * D, D) * (head.q_factor[i] * head.k_scale[j]);
        chunk_max = std::max(chunk_max, s[c]);
      }
      float* a = acc.data() + r * D;
      const float new_max = advance_max(row[r], chunk_max, a, D);
      float chunk_sum = 0.0f;
      for (int64_t c = 0; c < n; ++c) {
        const int64_t j = keys[c];
        const float p = std::exp(s[c] - new_max);
        const float p8 = table[fp8::e4m3_encode(p * head.p_factor[j])];
        chunk_sum += head.sum_e4m3 ? p8 : p;
        const float* vj = head.v.data() + j * D;
        for (int64_t d = 0; d < D; ++d) a[d] += p8 * vj[d];
      }
      row[r].sum += chunk_sum;
    }
  }
  // A row's largest logit gives p = 1, stored as p_scale * f >= 1 or summed in fp32: only a row
  // that saw no key ends with a sum of 0 (finish_row).
  std::vector<float> o(D);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = q_begin + r;
    finish_row(acc.data() + r * D, D, row[r], head.out_factor.data(), head.sum_unit,
               head.lse_shift.empty() ? 0.0f : head.lse_shift[i], out, lse, b, h, q_perm != nullptr ? q_perm[i] : i,
               o.data());
  }
}

}  // namespace

void block_sparse_attention_e4m3(const TensorView& q, const TensorView& k, const TensorView& v,
                                 const BlockLayout& layout, float scale, const Fp8Options& options, TensorView out,
                                 TensorView lse, const RowPermutation& perm, int threads) {
  const int64_t B = q.shape[0], H = q.shape[1], Sq = q.shape[2], Sk = k.shape[2], D = q.shape[3];
  check_layout_values(layout, perm, Sq, Sk);
  const int64_t Cq = layout.q_offsets.shape[2] - 1, Ck = layout.k_offsets.shape[2] - 1;
  std::vector<float> qf, kf, vf;
  E4M3Head head;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int32_t* q_perm = perm_row(perm.q_perm, b, h);
      const int32_t* k_perm = perm_row(perm.k_perm, b, h);
      load_slice(q, b, h, q_perm, qf, threads);
      load_slice(k, b, h, k_perm, kf, threads);
      load_slice(v, b, h, k_perm, vf, threads);
      const int32_t* q_off = &at<int32_t>(layout.q_offsets, b, h);
      const int32_t* k_off = &at<int32_t>(layout.k_offsets, b, h);
      quantize_head(qf, kf, vf, Sq, Sk, D, q_off, Cq, k_off, Ck, scale, options, head, threads);
      const std::vector<QueryTile> tiles = query_tiles(std::vector<int64_t>(q_off, q_off + Cq + 1), kQueryTile);
      std::vector<std::vector<Segment>> runs(Cq);
      for (int64_t a = 0; a < Cq; ++a) runs[a] = kept_key_runs(layout, b, h, a);
      parallel_for(static_cast<int64_t>(tiles.size()), threads, [&](int64_t t) {
        const QueryTile& tile = tiles[t];
        attend_tile(head, tile.begin, tile.end, runs[tile.cluster], out, lse, b, h, q_perm);
      });
    }
  }
}

}  // namespace sapattn::cpu
