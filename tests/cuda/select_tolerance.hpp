// The tolerance of select_blocks' threshold kernel against the CPU reference (docs/cuda.md,
// "Selection"), as a check of one mask row against the CPU's weights of that row.
//
// The kernel's weights differ from the CPU's by a relative rtol (up to a factor common to the row):
// its scores are FMA dot products in another order (each backend within (D + 2) 2^-24 A of the exact
// score, A = scale * max_j sum_d |q_d k_jd| over the row's non-empty key clusters), in log2 units
// (the products by scale and log2 e and the subtraction of the maximum: 8 2^-24 S more, S the
// largest |score|), and exp2 to 2 ulp against exp in double rounded once, plus the size products
// and the masses' rounding: 2^-20 covers these. So rtol = 2^-24 (2 (D + 2) A + 8 S) + 2^-20.
// Its mass sums are exact integers of masses rounded to 2^-31 of the row; the CPU's running sum is
// fp32 over normalised weights whose total is 1 within C 2^-24. Swapping near-equal weights moves a
// prefix mass by up to 2 rtol. So the crossing moves by at most atol = 4 rtol + (2 C + 4) 2^-24 of mass.
//
// A mask row is accepted when, with the CPU's weights ranked (descending, ties by lower index), P(r)
// their exact prefix sums, K_lo the first rank with P >= top_p - atol and K_hi the first with
// P >= top_p + atol (C if none), both raised to min(min_kept, C):
//   - it keeps between K_lo and K_hi clusters;
//   - it keeps every cluster of weight above w(K_lo) (1 + 2 rtol) and none below w(K_hi) (1 - 2 rtol)
//     (the band between is where the two backends may rank differently or cut elsewhere);
//   - its kept mass is at least min(top_p - atol, P(C)) - 2 rtol.
// The CPU's own row passes the same check (its running sum errs by less than atol).
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

namespace sapattn::cuda_test {

struct TopPTolerance {
  double rtol = 0;  // relative, per weight
  double atol = 0;  // absolute, of the row's mass (weights sum to 1)
};

inline TopPTolerance top_p_tolerance(int64_t D, int64_t C, double max_abs_dot, double max_abs_score) {
  TopPTolerance t;
  t.rtol = 0x1p-24 * (2.0 * static_cast<double>(D + 2) * max_abs_dot + 8.0 * max_abs_score) + 0x1p-20;
  t.atol = 4.0 * t.rtol + 0x1p-24 * static_cast<double>(2 * C + 4);
  return t;
}

struct RowVerdict {
  std::string failure;       // empty when the row passes
  bool floor_binds = false;  // min_kept raised the kept count above the mass crossing's band
};

// `weights` are the CPU's weights of the row (finite, summing to about 1), `kept` a mask row (0/1).
inline RowVerdict check_top_p_row(const std::vector<float>& weights, const std::vector<uint8_t>& kept, float top_p,
                                  int64_t min_kept, const TopPTolerance& tol) {
  const int64_t C = static_cast<int64_t>(weights.size());
  std::vector<int64_t> order(static_cast<size_t>(C));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return weights[a] > weights[b]; });
  std::vector<double> prefix(static_cast<size_t>(C) + 1, 0.0);
  for (int64_t r = 0; r < C; ++r) prefix[r + 1] = prefix[r] + weights[order[r]];
  auto first_reaching = [&](double level) {
    for (int64_t r = 1; r <= C; ++r)
      if (prefix[r] >= level) return r;
    return C;
  };
  const int64_t floor = std::min(min_kept, C);
  int64_t k_lo = first_reaching(top_p - tol.atol), k_hi = first_reaching(top_p + tol.atol);
  RowVerdict v;
  v.floor_binds = floor > k_hi;
  k_lo = std::max(k_lo, floor);
  k_hi = std::max(k_hi, floor);
  const double must = weights[order[k_lo - 1]] * (1.0 + 2.0 * tol.rtol);
  const double may = weights[order[k_hi - 1]] * (1.0 - 2.0 * tol.rtol);
  int64_t count = 0;
  double mass = 0;
  for (int64_t j = 0; j < C; ++j) {
    if (kept[j] > 1) return {"column " + std::to_string(j) + " holds " + std::to_string(kept[j]), v.floor_binds};
    if (kept[j]) {
      ++count;
      mass += weights[j];
    }
    if (weights[j] > must && !kept[j])
      return {"column " + std::to_string(j) + " of weight " + std::to_string(weights[j]) + " above the band (" +
                  std::to_string(must) + ") is dropped",
              v.floor_binds};
    if (weights[j] < may && kept[j])
      return {"column " + std::to_string(j) + " of weight " + std::to_string(weights[j]) + " below the band (" +
                  std::to_string(may) + ") is kept",
              v.floor_binds};
  }
  if (count < k_lo || count > k_hi)
    v.failure = "keeps " + std::to_string(count) + " clusters, not in [" + std::to_string(k_lo) + ", " +
                std::to_string(k_hi) + "]";
  else if (mass < std::min(top_p - tol.atol, prefix[C]) - 2.0 * tol.rtol)
    v.failure = "kept mass " + std::to_string(mass) + " below top_p " + std::to_string(top_p);
  return v;
}

}  // namespace sapattn::cuda_test
