// Naive float64 references of the SVG2 ops (no tiling, no threads), written from the contracts in
// sapattn/ops.hpp, plus the host-side helpers the op suites share: seeded random inputs, tensors in
// chosen memory layouts, poisoning, and random cluster layouts.
//
// Every reference reads its tensor inputs through their views, element by element, as the values
// actually stored: f16/bf16 inputs are compared after their rounding, never against the fp32 values
// they were drawn from. Results are returned as row-major float64 (or integer) vectors in the
// logical [B,H,...] order of the op's output.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>
#include <vector>

#include "sapattn/ops.hpp"
#include "sapattn/tensor.hpp"

namespace sapattn::ref {

// fp32 unit roundoff (round to nearest): every fp32 operation has relative error <= kF32Eps.
inline constexpr double kF32Eps = 0x1p-24;

// The largest |x| over the finite elements, and the largest |a_i - b_i| over the pairs where both are
// finite (a row that attends to nothing has lse -inf in both): the magnitudes the error models scale.
double max_abs(const std::vector<double>& x);
double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b);

// ---------------------------------------------------------------------------------------------
// Seeded randomness
// ---------------------------------------------------------------------------------------------

// splitmix64 (Steele, Lea, Flood 2014), exactly as ops.hpp's kmeans_init uses it.
uint64_t splitmix64(uint64_t z);

// A seed per test case: FNV-1a of the test's name, mixed with the case index.
uint64_t test_seed(std::string_view name, uint64_t index = 0);

// A small portable generator (a splitmix64 stream), so the inputs are the same on every platform.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next();
  double uniform();                         // [0, 1)
  double uniform(double lo, double hi);     // [lo, hi)
  double normal();                          // N(0, 1), Box-Muller
  int64_t integer(int64_t lo, int64_t hi);  // uniform in [lo, hi], inclusive

 private:
  uint64_t state_;
};

// ---------------------------------------------------------------------------------------------
// Host tensors in chosen memory layouts
// ---------------------------------------------------------------------------------------------

enum class Layout : uint8_t {
  Contiguous,        // row-major
  Transposed,        // dims 1 and 2 swapped in memory: [B,H,S,D] lies as [B,S,H,D] (TensorView::bshd)
  Padded,            // an interior block of a larger buffer: each memory dim 3 longer, starting at 1
  TransposedPadded,  // both
};

const char* layout_name(Layout layout);

// Owning storage plus a view of it. For padded layouts the storage holds more than the view.
struct HostTensor {
  Tensor storage;
  TensorView view;
  // Copy of every storage byte (to check later that the bytes outside the view were not touched).
  std::vector<uint8_t> bytes() const;
  // True when every storage byte that the view does not address equals `before`.
  bool outside_view_unchanged(const std::vector<uint8_t>& before) const;
};

HostTensor make_tensor(DType dtype, std::vector<int64_t> shape, Layout layout = Layout::Contiguous);

// The same view with its device tagged as CUDA (for the UnsupportedError checks; never read).
TensorView on_cuda(TensorView view);

// Calls f(idx) for every multi-index of `shape` in row-major order.
template <typename F>
void for_each_index(const TensorView& view, F&& f) {
  std::array<int64_t, kMaxRank> idx{};
  const int64_t n = view.numel();
  for (int64_t flat = 0; flat < n; ++flat) {
    int64_t rem = flat;
    for (int d = view.rank - 1; d >= 0; --d) {
      idx[d] = rem % view.shape[d];
      rem /= view.shape[d];
    }
    f(idx);
  }
}

// Element access through a view as double (floating, I32 and U8 dtypes). set() rounds to the dtype.
double get(const TensorView& view, const std::array<int64_t, kMaxRank>& idx);
void set(const TensorView& view, const std::array<int64_t, kMaxRank>& idx, double value);

// All elements in logical row-major order / written from such a vector.
std::vector<double> to_vector(const TensorView& view);
std::vector<int32_t> to_i32(const TensorView& view);
void from_vector(const TensorView& view, const std::vector<double>& values);

// Fill with seeded random values (rounded to the dtype: read back with get/to_vector).
void fill_normal(const TensorView& view, Rng& rng, double mean = 0.0, double stddev = 1.0);
void fill_uniform(const TensorView& view, Rng& rng, double lo, double hi);

// Poisons the whole storage: 0xFF bytes for floating dtypes (a NaN in f32, f16 and bf16), 0xAB bytes
// for I32 and U8 (0xABABABAB is negative, 0xAB is neither 0 nor 1).
void poison(HostTensor& t);
// Number of view elements still holding the poison pattern.
int64_t count_poisoned(const TensorView& view);

// ---------------------------------------------------------------------------------------------
// Random cluster layouts
// ---------------------------------------------------------------------------------------------

// `clusters` sizes summing to `total`. With clusters >= 4 the draw always contains an empty cluster
// and a 1-token cluster, and with total >= 200 also a cluster of more than 128 tokens (larger than
// any tile); the other sizes are random cut points, so further empty clusters occur too.
std::vector<int64_t> random_cluster_sizes(Rng& rng, int64_t total, int64_t clusters);

// Offsets [0, s0, s0+s1, ..., total] of sizes.
std::vector<int64_t> offsets_of(const std::vector<int64_t>& sizes);

// Labels of `sizes.size()` clusters with exactly these counts, in random token order.
std::vector<int32_t> random_labels_with_sizes(Rng& rng, const std::vector<int64_t>& sizes);

// ---------------------------------------------------------------------------------------------
// k-means references
// ---------------------------------------------------------------------------------------------

// Squared Euclidean distances [B,H,N,C] of points [B,H,N,D] to centroids [B,H,C,D].
std::vector<double> sq_distances(const TensorView& points, const TensorView& centroids);

// A bound [B,H,N,C] on the fp32 rounding error of ||x - c||^2 whichever way an op evaluates it
// (sum of squared differences, or ||x||^2 - 2 x.c + ||c||^2, in any summation order): each form is a
// sum of D terms plus at most 3 more roundings, so its error is at most (D + 3) u sum_d (|x_d|+|c_d|)^2
// to first order (Higham, Accuracy and Stability, eq. 3.5); we take (D + 4) to cover the second order.
std::vector<double> sq_distance_error_bound(const TensorView& points, const TensorView& centroids);

// Exact argmin labels [B,H,N] (float64; ties to the lowest centroid index).
std::vector<int32_t> kmeans_assign(const TensorView& points, const TensorView& centroids);

struct KmeansUpdate {
  std::vector<double> centroids;  // [B,H,C,D]: mean of the labelled points, or the previous centroid
  std::vector<int32_t> sizes;     // [B,H,C]
  // [B,H,C,D]: bound on the fp32 error of the mean: any-order fp32 sum of n terms then one division
  // (or a multiplication by a rounded 1/n): (n + 2) u sum_i |x_id| / n.
  std::vector<double> error_bound;
};
KmeansUpdate kmeans_update(const TensorView& points, const std::vector<int32_t>& labels,
                           const TensorView& previous_centroids);

// Per (b,h) the k-means objective sum_i ||x_i - c_{label_i}||^2, [B,H].
std::vector<double> kmeans_objective(const TensorView& points, const TensorView& centroids,
                                     const std::vector<int32_t>& labels);

// The documented sampling rule of kmeans_init: centroids [B,H,C,D].
std::vector<double> kmeans_init(const TensorView& points, int64_t num_clusters, uint64_t seed);

// ---------------------------------------------------------------------------------------------
// Block selection references
// ---------------------------------------------------------------------------------------------

// The ranking of one row: indices by weight descending, ties by lower index.
std::vector<int64_t> rank_descending(const double* weights, int64_t n);

// select_top_p on float64 weights: rows x cols, row-major. top_p >= 1 keeps every cluster.
std::vector<uint8_t> top_p_mask(const std::vector<double>& weights, int64_t rows, int64_t cols, double top_p,
                                int min_kept);

// SVG2's size-weighted centroid softmax P [B,H,Cq,Ck] (the row max over non-empty key clusters).
// Rows whose key clusters are all empty are all zero.
std::vector<double> centroid_probs(const TensorView& q_centroids, const TensorView& k_centroids,
                                   const TensorView& k_sizes, double scale);

// A bound [B,H,Cq,Ck] on the absolute fp32 error of P. The score s_j = scale * q.k_j has error at
// most (D + 2) u scale sum_d |q_d k_dj|; P_j depends on s_j and the row max, and the size weight,
// exp, the sum over Ck terms and the division add (|s_j - m| + Ck + 4) u relative error. The bound
// is twice that sum of relative errors, times P_j: the factor 2 covers the second-order terms and a
// libm exp of up to a few ulps.
std::vector<double> centroid_probs_error_bound(const TensorView& q_centroids, const TensorView& k_centroids,
                                               const TensorView& k_sizes, double scale);

// The joint-text rule on a [B,H,R,C] row-major u8 mask (R = Cq+2, C = Ck+2).
void apply_text_rule(std::vector<uint8_t>& mask, int64_t B, int64_t H, int64_t R, int64_t C);

// ---------------------------------------------------------------------------------------------
// Permutation references
// ---------------------------------------------------------------------------------------------

struct Permutation {
  std::vector<int32_t> perm;     // [B,H,N]
  std::vector<int32_t> offsets;  // [B,H,C+1]
};
Permutation cluster_permutation(const TensorView& labels, int64_t num_clusters);

// ---------------------------------------------------------------------------------------------
// Attention references
// ---------------------------------------------------------------------------------------------

struct Attention {
  std::vector<double> out;  // [B,H,Sq,D]; 0 for rows that attend to no key
  std::vector<double> lse;  // [B,H,Sq];   -inf for rows that attend to no key
};

// Naive softmax attention: every score, then the row max, exp, the sum and the weighted sum of V,
// one query at a time. `token_mask` [B,H,Sq,Sk] (nonzero = attend) may be null (dense).
// attention_f64 is the reference; attention_f32 runs the same algorithm in fp32 arithmetic and is
// the "low-precision reference" of the error model (the op's error is compared with its error).
Attention attention_f64(const TensorView& q, const TensorView& k, const TensorView& v, double scale,
                        const std::vector<uint8_t>* token_mask);
Attention attention_f32(const TensorView& q, const TensorView& k, const TensorView& v, double scale,
                        const std::vector<uint8_t>* token_mask);

// The token mask [B,H,Sq,Sk] of a block layout: (i, j) attends iff the block mask keeps the pair of
// clusters holding query row i and key row j.
std::vector<uint8_t> expand_block_mask(const BlockLayout& layout, int64_t Sq, int64_t Sk);

// block_density's definition, [B,H].
std::vector<double> block_density(const BlockLayout& layout, int64_t Sq, int64_t Sk);

// ---------------------------------------------------------------------------------------------
// SVG-EAR references (docs/ear.md), written from the contracts of the EAR ops
// ---------------------------------------------------------------------------------------------

// ear_probe's scores [B,H,Cq,Ck] evaluated as the contract writes them: for every key token t of
// cluster j the difference exp(s_t) v_t - exp(c_aj) vbar_j, squared and summed, with no rescaling
// (inputs must keep exp(2 s) finite), then log(max(E, 1e-8)) - gamma log(max(area, 1e-8)).
//   k_labels [B,H,N]; q_sizes [B,H,Cq]; k_sizes [B,H,Ck].
std::vector<double> ear_probe(const TensorView& q_centroids, const TensorView& k_centroids,
                              const TensorView& v_centroids, const TensorView& k, const TensorView& v,
                              const std::vector<int32_t>& k_labels, const std::vector<int32_t>& q_sizes,
                              const std::vector<int32_t>& k_sizes, double scale, double gamma);

// select_error_aware by a brute-force characterisation, [B,H,R,C]: the first `guaranteed` clusters
// of each row's probs ranking are kept; any other cluster j is kept iff the area of the other
// non-guaranteed clusters ranked before it by score (higher, or equal with a lower index; NaN as
// -inf) is below max(0, budget - guaranteed area), budget the area budget_mask keeps. per_head
// (select_error_aware_per_head): the same over all pairs (a, j) of a head at once, the index a*C+j.
std::vector<uint8_t> error_aware_mask(const std::vector<double>& probs, const std::vector<uint8_t>& budget_mask,
                                      const std::vector<double>& scores, const std::vector<int32_t>& q_sizes,
                                      const std::vector<int32_t>& k_sizes, int64_t B, int64_t H, int64_t R, int64_t C,
                                      int guaranteed, bool per_head = false);

// ear_plus_probe as its contract writes it, every exp evaluated directly (inputs must keep exp(2 s)
// finite): scores [B,H,Cq,Ck], spread [B,H,Cq,Ck] and pair_values [B,H,Cq*Ck,D].
struct EarPlusProbe {
  std::vector<double> scores, spread, pair_values;
};
EarPlusProbe ear_plus_probe(const TensorView& q_centroids, const TensorView& k_centroids,
                            const TensorView& v_centroids, const TensorView& k, const TensorView& v,
                            const std::vector<int32_t>& k_labels, const std::vector<int32_t>& q_sizes,
                            const std::vector<int32_t>& k_sizes, double scale, double gamma);

// corrected_centroid_compensation's terms for compensated_attention: the pseudo-keys' logit terms
// spread [B,H,Cq,Ck'] and values pair_values [B,H,Cq*Ck',D] (either may be null), with Ck' =
// per_cluster * the cluster mask's columns (pseudo-key c stands for mask column c / per_cluster).
struct CompensationTerms {
  const std::vector<double>* spread = nullptr;
  const std::vector<double>* pair_values = nullptr;
  int64_t per_cluster = 1;
};

// Attention with centroid compensation as one float64 softmax per query row: query row i attends
// the keys token_mask [B,H,S,S] allows and, when i < N (q_labels [B,H,N] gives its cluster a), one
// pseudo-key of logit log|K_j| + scale q_i . kbar_j and value vbar_j for every key cluster j with
// cluster_mask[a,j] = 0 ([B,H,Cq,Ck] row-major) and |K_j| > 0. `terms` adds spread[a,j] to the
// logit and replaces vbar_j by pair_values[a*Ck+j] where given.
Attention compensated_attention(const TensorView& q, const TensorView& k, const TensorView& v, double scale,
                                const std::vector<uint8_t>& token_mask, const std::vector<int32_t>& q_labels, int64_t N,
                                const std::vector<uint8_t>& cluster_mask, int64_t Cq, const TensorView& k_centroids,
                                const TensorView& v_centroids, const std::vector<int32_t>& k_sizes,
                                const CompensationTerms& terms = {});

}  // namespace sapattn::ref
