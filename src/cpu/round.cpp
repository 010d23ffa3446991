// round_query_clusters on the CPU: the reference of the size rounding that the query-padding
// study recommends (tools/studies/size_rounding.py's round_clusters with match_rounds, variant
// B:mass:SLACK:MAX:F:ROUNDS:keep of query_padding.py). The contract, the role choice and every tie rule are in include/sapattn/ops.hpp.
// Its dot products and exp are core/round_arithmetic.hpp's, which the CUDA backend computes too.
// Each (b,h) is one task; its arithmetic does not depend on the thread that runs it, so results
// are bit-identical for any thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "core/parallel.hpp"
#include "core/round_arithmetic.hpp"
#include "cpu/backend.hpp"
#include "cpu/rows.hpp"
#include "sapattn/error.hpp"

namespace sapattn::cpu {

namespace {

constexpr int64_t kBlock = 64;  // rows of a warpgroup block
constexpr double kInf = std::numeric_limits<double>::infinity();

// Rank of each element of `items` among those of its group, by ascending key, ties by position in
// `items` (the study's rank_within). group and key are indexed by position.
std::vector<int64_t> rank_within(const std::vector<int64_t>& group, const std::vector<double>& key) {
  const size_t n = group.size();
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    if (group[a] != group[b]) return group[a] < group[b];
    if (key[a] != key[b]) return key[a] < key[b];
    return a < b;
  });
  std::vector<int64_t> rank(n);
  for (size_t i = 0; i < n;) {
    size_t j = i;
    while (j < n && group[order[j]] == group[order[i]]) {
      rank[order[j]] = static_cast<int64_t>(j - i);
      ++j;
    }
    i = j;
  }
  return rank;
}

struct Head {
  const TensorView& q;
  const float* qc;  // [C, D]
  const float* kc;  // [Ck, D]
  const int32_t* ks;
  const TensorView& mask;
  int64_t b, h, N, D, C, Ck;
  float scale;
  int slack;
  double max_cost;
  int prefilter, rounds, candidates;
  int32_t* labels;
  int32_t* sizes;

  bool kept(int64_t a, int64_t j) const { return at<uint8_t>(mask, b, h, a, j) != 0; }

  void run() {
    std::vector<int64_t> n(C, 0);
    for (int64_t i = 0; i < N; ++i) ++n[labels[i]];
    rebalance(n);
    std::fill(n.begin(), n.end(), 0);
    for (int64_t i = 0; i < N; ++i) ++n[labels[i]];
    for (int64_t c = 0; c < C; ++c) sizes[c] = static_cast<int32_t>(n[c]);
  }

  void rebalance(const std::vector<int64_t>& n) {
    // 1. Roles.
    std::vector<int64_t> t(C);
    std::vector<bool> done(C);
    std::vector<int64_t> open;
    int64_t optional_cap = 0;
    for (int64_t c = 0; c < C; ++c) {
      t[c] = n[c] % kBlock;
      done[c] = t[c] == 0 || t[c] >= kBlock - slack;
      if (!done[c]) open.push_back(c);
      if (done[c] && t[c] > 0) optional_cap += kBlock - t[c];
    }
    std::stable_sort(open.begin(), open.end(), [&](int64_t a, int64_t a2) { return t[a] < t[a2]; });
    const int64_t no = static_cast<int64_t>(open.size());
    // Suffix sums over the receivers open[k..).
    std::vector<int64_t> dmin_suffix(no + 1, 0), dmax_suffix(no + 1, 0);
    for (int64_t i = no - 1; i >= 0; --i) {
      dmin_suffix[i] = dmin_suffix[i + 1] + (kBlock - slack - t[open[i]]);
      dmax_suffix[i] = dmax_suffix[i + 1] + (kBlock - t[open[i]]);
    }
    int64_t best_k = 0, best_pad = 0, best_supply = 0, supply = 0;
    for (int64_t k = 0; k <= no; ++k) {
      if (k > 0) supply += t[open[k - 1]];
      const int64_t dmin = dmin_suffix[k], dmax = dmax_suffix[k] + optional_cap;
      const int64_t excess = supply - dmax;
      const int64_t pad = supply < dmin ? dmin - supply : (excess > 0 ? ((-excess) % kBlock + kBlock) % kBlock : 0);
      if (k == 0 || pad < best_pad || (pad == best_pad && supply < best_supply)) {
        best_k = k, best_pad = pad, best_supply = supply;
      }
    }
    std::vector<int64_t> give(C, 0), need(C, 0), cap(C, 0);
    std::vector<bool> is_donor(C, false);
    for (int64_t i = 0; i < no; ++i) {
      const int64_t c = open[i];
      if (i < best_k) {
        give[c] = t[c];
        is_donor[c] = true;
      } else {
        need[c] = kBlock - slack - t[c];
        cap[c] = kBlock - t[c];
      }
    }
    for (int64_t c = 0; c < C; ++c)
      if (done[c] && t[c] > 0) cap[c] = kBlock - t[c];
    std::vector<int64_t> targets;
    for (int64_t c = 0; c < C; ++c)
      if (cap[c] > 0) targets.push_back(c);
    if (best_k == 0 || targets.empty()) return;
    const int64_t R = static_cast<int64_t>(targets.size());

    // 2. Candidates.
    std::vector<int64_t> pts;
    for (int64_t i = 0; i < N; ++i)
      if (is_donor[labels[i]]) pts.push_back(i);
    std::vector<float> x(static_cast<size_t>(D));
    if (prefilter > 0) {
      std::vector<float> c2(C);
      for (int64_t c = 0; c < C; ++c) c2[c] = round_math::lane_dot(qc + c * D, qc + c * D, D);
      std::vector<double> best(pts.size());
      for (size_t p = 0; p < pts.size(); ++p) {
        load_row(q, b, h, pts[p], x.data());
        const int64_t own_c = labels[pts[p]];
        const float own = c2[own_c] - 2.0f * round_math::lane_dot(x.data(), qc + own_c * D, D);
        float m = std::numeric_limits<float>::infinity();
        for (int64_t r : targets) {
          const float v = c2[r] - 2.0f * round_math::lane_dot(x.data(), qc + r * D, D) - own;
          if (v < m) m = v;  // NaN never wins
        }
        best[p] = m;
      }
      std::vector<int64_t> order(pts.size());
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b2) {
        const int64_t la = labels[pts[a]], lb = labels[pts[b2]];
        if (la != lb) return la < lb;
        if (best[a] != best[b2]) return best[a] < best[b2];
        return a < b2;
      });
      std::vector<int64_t> kept_pts;
      for (size_t i = 0; i < order.size();) {
        const int64_t donor = labels[pts[order[i]]];
        int64_t rank = 0;
        for (; i < order.size() && labels[pts[order[i]]] == donor; ++i, ++rank)
          if (rank < static_cast<int64_t>(prefilter) * t[donor]) kept_pts.push_back(pts[order[i]]);
      }
      pts.swap(kept_pts);
    }
    const int64_t P = static_cast<int64_t>(pts.size());

    // 3. Mass cost [P, R]: p_j = |K_j| exp(s_j - top) / sum over the non-empty key clusters, s_j the
    // fp32 score, top the largest (a NaN score never is; a non-finite top makes every weight NaN).
    bool any_key = false;
    for (int64_t j = 0; j < Ck; ++j) any_key = any_key || ks[j] > 0;
    std::vector<double> cost(static_cast<size_t>(P * R), 0.0), z(Ck);
    std::vector<float> score(Ck);
    for (int64_t p = 0; p < P && any_key; ++p) {
      load_row(q, b, h, pts[p], x.data());
      double top = -kInf;
      for (int64_t j = 0; j < Ck; ++j) {
        if (ks[j] <= 0) continue;
        score[j] = scale * round_math::lane_dot(x.data(), kc + j * D, D);
        top = std::max(top, static_cast<double>(score[j]));
      }
      double sum = 0.0;
      for (int64_t j = 0; j < Ck; ++j) {
        z[j] = ks[j] > 0 ? static_cast<double>(ks[j]) * round_math::mass_exp(static_cast<double>(score[j]) - top) : 0.0;
        sum += z[j];
      }
      for (int64_t j = 0; j < Ck; ++j) z[j] /= sum;
      const int64_t own_c = labels[pts[p]];
      double own = 0.0;
      for (int64_t j = 0; j < Ck; ++j)
        if (kept(own_c, j)) own += z[j];
      for (int64_t r = 0; r < R; ++r) {
        double m = 0.0;
        for (int64_t j = 0; j < Ck; ++j)
          if (kept(targets[r], j)) m += z[j];
        cost[p * R + r] = own - m;
      }
    }
    for (double& c : cost)
      if (std::isnan(c) || c > max_cost) c = kInf;

    // 4. Matching in rounds.
    const int64_t kk = std::min<int64_t>(candidates, R);
    std::vector<int64_t> cand_idx(static_cast<size_t>(P * kk));
    std::vector<double> cand_cost(static_cast<size_t>(P * kk));
    std::vector<int64_t> ids(R);
    for (int64_t p = 0; p < P; ++p) {
      std::iota(ids.begin(), ids.end(), 0);
      const double* row = &cost[p * R];
      std::partial_sort(ids.begin(), ids.begin() + kk, ids.end(), [&](int64_t a, int64_t b2) {
        if (row[a] != row[b2]) return row[a] < row[b2];
        return a < b2;
      });
      for (int64_t j = 0; j < kk; ++j) {
        cand_idx[p * kk + j] = ids[j];
        cand_cost[p * kk + j] = row[ids[j]];
      }
    }
    std::vector<int64_t> donor(P);
    for (int64_t p = 0; p < P; ++p) donor[p] = labels[pts[p]];
    std::vector<bool> placed(P, false);
    std::vector<int64_t> dest(P, -1), received(R, 0), placed_of(C, 0), room(R), first(P);
    std::vector<double> cur(P);
    for (int phase = 0; phase < 2; ++phase) {
      for (int round = 0; round < rounds; ++round) {
        for (int64_t r = 0; r < R; ++r) {
          const int64_t c = targets[r];
          room[r] = phase == 0 ? std::max<int64_t>(0, need[c] - received[r]) : cap[c] - received[r];
        }
        for (int64_t p = 0; p < P; ++p) {
          first[p] = -1;
          cur[p] = kInf;
          if (placed[p]) continue;
          for (int64_t j = 0; j < kk; ++j) {
            const double c = cand_cost[p * kk + j];
            if (std::isfinite(c) && room[cand_idx[p * kk + j]] > 0) {
              first[p] = j;
              cur[p] = c;
              break;
            }
          }
        }
        const std::vector<int64_t> rank = rank_within(donor, cur);
        std::vector<int64_t> offered;
        for (int64_t p = 0; p < P; ++p)
          if (first[p] >= 0 && rank[p] < give[donor[p]] - placed_of[donor[p]]) offered.push_back(p);
        if (offered.empty()) break;
        std::vector<int64_t> to(offered.size());
        std::vector<double> key(offered.size());
        for (size_t i = 0; i < offered.size(); ++i) {
          to[i] = cand_idx[offered[i] * kk + first[offered[i]]];
          key[i] = cur[offered[i]];
        }
        const std::vector<int64_t> rank_r = rank_within(to, key);
        for (size_t i = 0; i < offered.size(); ++i) {
          if (rank_r[i] >= room[to[i]]) continue;
          const int64_t p = offered[i];
          placed[p] = true;
          dest[p] = to[i];
          ++placed_of[donor[p]];
          ++received[to[i]];  // room stays as it was at the round's start
        }
      }
    }
    for (int64_t p = 0; p < P; ++p)
      if (placed[p] && placed_of[donor[p]] == give[donor[p]]) labels[pts[p]] = static_cast<int32_t>(targets[dest[p]]);
  }
};

}  // namespace

void round_query_clusters(const TensorView& q, const TensorView& q_centroids, const TensorView& k_centroids,
                          const TensorView& k_sizes, const TensorView& mask, float scale, int slack, float max_cost,
                          int prefilter, int rounds, int candidates, TensorView labels, TensorView sizes,
                          int threads) {
  const int64_t B = q.shape[0], H = q.shape[1], N = q.shape[2], D = q.shape[3];
  const int64_t C = q_centroids.shape[2], Ck = k_centroids.shape[2];
  // Values only this backend reads; checked before anything is written.
  check_index_range(labels, C, "labels");
  check_sizes_nonnegative(k_sizes, "k_sizes");
  parallel_for(B * H, threads, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    Head head{q,
              &at<float>(q_centroids, b, h),
              &at<float>(k_centroids, b, h),
              &at<int32_t>(k_sizes, b, h),
              mask,
              b,
              h,
              N,
              D,
              C,
              Ck,
              scale,
              slack,
              static_cast<double>(max_cost),
              prefilter,
              rounds,
              candidates,
              &at<int32_t>(labels, b, h),
              &at<int32_t>(sizes, b, h)};
    head.run();
  });
}

}  // namespace sapattn::cpu
