#include "reference.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numbers>
#include <numeric>
#include <utility>

namespace sapattn::ref {

// ---------------------------------------------------------------------------------------------
// Seeded randomness
// ---------------------------------------------------------------------------------------------

uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t test_seed(std::string_view name, uint64_t index) {
  uint64_t h = 14695981039346656037ull;  // FNV-1a 64-bit offset basis
  for (char c : name) {
    h ^= static_cast<uint8_t>(c);
    h *= 1099511628211ull;  // FNV-1a 64-bit prime
  }
  return splitmix64(h ^ splitmix64(index));
}

uint64_t Rng::next() {
  const uint64_t r = splitmix64(state_);
  state_ += 0x9e3779b97f4a7c15ull;
  return r;
}

double Rng::uniform() { return static_cast<double>(next() >> 11) * 0x1p-53; }

double Rng::uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }

double Rng::normal() {
  const double u1 = 1.0 - uniform();  // (0, 1]: log stays finite
  const double u2 = uniform();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
}

int64_t Rng::integer(int64_t lo, int64_t hi) {
  const uint64_t span = static_cast<uint64_t>(hi - lo) + 1;
  return lo + static_cast<int64_t>(next() % span);
}

double max_abs(const std::vector<double>& x) {
  double m = 0.0;
  for (double e : x)
    if (std::isfinite(e)) m = std::max(m, std::abs(e));
  return m;
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0.0;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::isfinite(a[i]) && std::isfinite(b[i])) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

// ---------------------------------------------------------------------------------------------
// Host tensors
// ---------------------------------------------------------------------------------------------

const char* layout_name(Layout layout) {
  switch (layout) {
    case Layout::Contiguous:
      return "contiguous";
    case Layout::Transposed:
      return "transposed";
    case Layout::Padded:
      return "padded";
    case Layout::TransposedPadded:
      return "transposed+padded";
  }
  return "?";
}

HostTensor make_tensor(DType dtype, std::vector<int64_t> shape, Layout layout) {
  const int r = static_cast<int>(shape.size());
  const bool transposed = layout == Layout::Transposed || layout == Layout::TransposedPadded;
  const bool padded = layout == Layout::Padded || layout == Layout::TransposedPadded;
  // order[m] = the logical dim stored at memory position m.
  std::vector<int> order(r);
  std::iota(order.begin(), order.end(), 0);
  if (transposed) {
    if (r >= 3)
      std::swap(order[1], order[2]);
    else if (r == 2)
      std::swap(order[0], order[1]);
  }
  const int64_t pad = padded ? 3 : 0;
  std::vector<int64_t> mem_shape(r);
  for (int m = 0; m < r; ++m) mem_shape[m] = shape[order[m]] + pad;
  HostTensor t;
  t.storage = Tensor(dtype, mem_shape);
  std::vector<int64_t> mem_stride(r);
  int64_t s = 1;
  for (int m = r - 1; m >= 0; --m) {
    mem_stride[m] = s;
    s *= mem_shape[m];
  }
  t.view = TensorView::contiguous(t.storage.data(), dtype, shape);
  int64_t start = 0;
  for (int m = 0; m < r; ++m) {
    t.view.stride[order[m]] = mem_stride[m];
    if (padded) start += mem_stride[m];  // the view starts at index 1 of every memory dim
  }
  t.view.data = static_cast<char*>(t.storage.data()) + start * static_cast<int64_t>(dtype_size(dtype));
  return t;
}

std::vector<uint8_t> HostTensor::bytes() const {
  if (storage.data() == nullptr) return {};  // no tensor (e.g. an omitted lse)
  std::vector<uint8_t> b(storage.bytes());
  if (!b.empty()) std::memcpy(b.data(), storage.data(), b.size());
  return b;
}

bool HostTensor::outside_view_unchanged(const std::vector<uint8_t>& before) const {
  const size_t esize = dtype_size(view.dtype);
  std::vector<uint8_t> covered(storage.bytes(), 0);
  const auto* base = static_cast<const char*>(storage.data());
  const auto* vbase = static_cast<const char*>(view.data);
  for_each_index(view, [&](const std::array<int64_t, kMaxRank>& idx) {
    const int64_t byte = (vbase - base) + view.offset(idx) * static_cast<int64_t>(esize);
    for (size_t k = 0; k < esize; ++k) covered[static_cast<size_t>(byte) + k] = 1;
  });
  const auto* now = static_cast<const uint8_t*>(storage.data());
  for (size_t i = 0; i < covered.size(); ++i) {
    if (!covered[i] && now[i] != before[i]) return false;
  }
  return true;
}

TensorView on_cuda(TensorView view) {
  view.device = Device::cuda(0);
  return view;
}

double get(const TensorView& view, const std::array<int64_t, kMaxRank>& idx) {
  const int64_t o = view.offset(idx);
  switch (view.dtype) {
    case DType::I32:
      return static_cast<const int32_t*>(view.data)[o];
    case DType::U8:
      return static_cast<const uint8_t*>(view.data)[o];
    default:
      return load_as_f32(view.data, view.dtype, o);
  }
}

void set(const TensorView& view, const std::array<int64_t, kMaxRank>& idx, double value) {
  const int64_t o = view.offset(idx);
  switch (view.dtype) {
    case DType::I32:
      static_cast<int32_t*>(view.data)[o] = static_cast<int32_t>(value);
      break;
    case DType::U8:
      static_cast<uint8_t*>(view.data)[o] = static_cast<uint8_t>(value);
      break;
    default:
      store_from_f32(view.data, view.dtype, o, static_cast<float>(value));
      break;
  }
}

std::vector<double> to_vector(const TensorView& view) {
  std::vector<double> out;
  out.reserve(static_cast<size_t>(view.numel()));
  for_each_index(view, [&](const std::array<int64_t, kMaxRank>& idx) { out.push_back(get(view, idx)); });
  return out;
}

std::vector<int32_t> to_i32(const TensorView& view) {
  std::vector<int32_t> out;
  out.reserve(static_cast<size_t>(view.numel()));
  for_each_index(
      view, [&](const std::array<int64_t, kMaxRank>& idx) { out.push_back(static_cast<int32_t>(get(view, idx))); });
  return out;
}

void from_vector(const TensorView& view, const std::vector<double>& values) {
  size_t i = 0;
  for_each_index(view, [&](const std::array<int64_t, kMaxRank>& idx) { set(view, idx, values[i++]); });
}

void fill_normal(const TensorView& view, Rng& rng, double mean, double stddev) {
  for_each_index(view, [&](const std::array<int64_t, kMaxRank>& idx) { set(view, idx, mean + stddev * rng.normal()); });
}

void fill_uniform(const TensorView& view, Rng& rng, double lo, double hi) {
  for_each_index(view, [&](const std::array<int64_t, kMaxRank>& idx) { set(view, idx, rng.uniform(lo, hi)); });
}

void poison(HostTensor& t) {
  const int byte = is_floating(t.view.dtype) ? 0xFF : 0xAB;
  if (t.storage.data() != nullptr) std::memset(t.storage.data(), byte, t.storage.bytes());
}

int64_t count_poisoned(const TensorView& view) {
  int64_t n = 0;
  for_each_index(view, [&](const std::array<int64_t, kMaxRank>& idx) {
    const int64_t o = view.offset(idx);
    switch (view.dtype) {
      case DType::I32:
        n += static_cast<const uint32_t*>(view.data)[o] == 0xABABABABu;
        break;
      case DType::U8:
        n += static_cast<const uint8_t*>(view.data)[o] == 0xABu;
        break;
      default:
        n += std::isnan(load_as_f32(view.data, view.dtype, o));
        break;
    }
  });
  return n;
}

// ---------------------------------------------------------------------------------------------
// Random cluster layouts
// ---------------------------------------------------------------------------------------------

namespace {
template <typename T>
void shuffle(std::vector<T>& v, Rng& rng) {
  for (int64_t i = static_cast<int64_t>(v.size()) - 1; i > 0; --i) {
    std::swap(v[static_cast<size_t>(i)], v[static_cast<size_t>(rng.integer(0, i))]);
  }
}
}  // namespace

std::vector<int64_t> random_cluster_sizes(Rng& rng, int64_t total, int64_t clusters) {
  std::vector<int64_t> sizes(static_cast<size_t>(clusters), 0);
  if (clusters == 1) {
    sizes[0] = total;
    return sizes;
  }
  std::vector<int64_t> roles(static_cast<size_t>(clusters));
  std::iota(roles.begin(), roles.end(), 0);
  shuffle(roles, rng);
  std::vector<bool> fixed(static_cast<size_t>(clusters), false);
  int64_t remaining = total;
  if (clusters >= 4) {
    fixed[static_cast<size_t>(roles[0])] = true;  // an empty cluster
    if (remaining >= 1) {
      sizes[static_cast<size_t>(roles[1])] = 1;  // a 1-token cluster
      fixed[static_cast<size_t>(roles[1])] = true;
      remaining -= 1;
    }
    if (total >= 200) {
      // A cluster of more than 128 tokens: larger than any attention tile.
      const int64_t big = 129 + rng.integer(0, std::min<int64_t>(70, remaining - 129));
      sizes[static_cast<size_t>(roles[2])] = big;
      fixed[static_cast<size_t>(roles[2])] = true;
      remaining -= big;
    }
  }
  std::vector<int64_t> free;
  for (int64_t c = 0; c < clusters; ++c) {
    if (!fixed[static_cast<size_t>(c)]) free.push_back(c);
  }
  // Random cut points split the rest among the free clusters (a repeated cut = an empty cluster).
  std::vector<int64_t> cuts;
  for (size_t i = 0; i + 1 < free.size(); ++i) cuts.push_back(rng.integer(0, remaining));
  std::sort(cuts.begin(), cuts.end());
  cuts.insert(cuts.begin(), 0);
  cuts.push_back(remaining);
  for (size_t i = 0; i < free.size(); ++i) sizes[static_cast<size_t>(free[i])] = cuts[i + 1] - cuts[i];
  return sizes;
}

std::vector<int64_t> offsets_of(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> off(sizes.size() + 1, 0);
  for (size_t c = 0; c < sizes.size(); ++c) off[c + 1] = off[c] + sizes[c];
  return off;
}

std::vector<int32_t> random_labels_with_sizes(Rng& rng, const std::vector<int64_t>& sizes) {
  std::vector<int32_t> labels;
  for (size_t c = 0; c < sizes.size(); ++c)
    labels.insert(labels.end(), static_cast<size_t>(sizes[c]), static_cast<int32_t>(c));
  shuffle(labels, rng);
  return labels;
}

// ---------------------------------------------------------------------------------------------
// k-means
// ---------------------------------------------------------------------------------------------

namespace {
struct Dims {
  int64_t B, H, N, D;
};
Dims dims_of(const TensorView& x) { return {x.shape[0], x.shape[1], x.shape[2], x.shape[3]}; }
}  // namespace

// out[(bh*N + i)*C + j] = sum over e of term(x_i[e], c_j[e]), in float64.
template <typename Term>
std::vector<double> pairwise_sums(const TensorView& points, const TensorView& centroids, Term term) {
  const auto [B, H, N, D] = dims_of(points);
  const int64_t C = centroids.shape[2];
  const std::vector<double> x = to_vector(points);
  const std::vector<double> c = to_vector(centroids);
  std::vector<double> out(static_cast<size_t>(B * H * N * C));
  for (int64_t bh = 0; bh < B * H; ++bh) {
    for (int64_t i = 0; i < N; ++i) {
      const double* xi = &x[static_cast<size_t>((bh * N + i) * D)];
      for (int64_t j = 0; j < C; ++j) {
        const double* cj = &c[static_cast<size_t>((bh * C + j) * D)];
        double s = 0.0;
        for (int64_t e = 0; e < D; ++e) s += term(xi[e], cj[e]);
        out[static_cast<size_t>((bh * N + i) * C + j)] = s;
      }
    }
  }
  return out;
}

std::vector<double> sq_distances(const TensorView& points, const TensorView& centroids) {
  return pairwise_sums(points, centroids, [](double a, double b) { return (a - b) * (a - b); });
}

std::vector<double> sq_distance_error_bound(const TensorView& points, const TensorView& centroids) {
  std::vector<double> bound = pairwise_sums(
      points, centroids, [](double a, double b) { return (std::abs(a) + std::abs(b)) * (std::abs(a) + std::abs(b)); });
  for (double& b : bound) b *= static_cast<double>(points.shape[3] + 4) * kF32Eps;
  return bound;
}

std::vector<int32_t> kmeans_assign(const TensorView& points, const TensorView& centroids) {
  const auto [B, H, N, D] = dims_of(points);
  const int64_t C = centroids.shape[2];
  const std::vector<double> d = sq_distances(points, centroids);
  std::vector<int32_t> labels(static_cast<size_t>(B * H * N));
  for (int64_t p = 0; p < B * H * N; ++p) {
    int64_t best = 0;
    for (int64_t j = 1; j < C; ++j) {
      if (d[static_cast<size_t>(p * C + j)] < d[static_cast<size_t>(p * C + best)])
        best = j;  // strict: ties keep the lower index
    }
    labels[static_cast<size_t>(p)] = static_cast<int32_t>(best);
  }
  return labels;
}

KmeansUpdate kmeans_update(const TensorView& points, const std::vector<int32_t>& labels,
                           const TensorView& previous_centroids) {
  const auto [B, H, N, D] = dims_of(points);
  const int64_t C = previous_centroids.shape[2];
  const std::vector<double> x = to_vector(points);
  KmeansUpdate r;
  r.centroids = to_vector(previous_centroids);
  r.sizes.assign(static_cast<size_t>(B * H * C), 0);
  r.error_bound.assign(static_cast<size_t>(B * H * C * D), 0.0);
  std::vector<double> sum(static_cast<size_t>(C * D)), abs_sum(static_cast<size_t>(C * D));
  for (int64_t bh = 0; bh < B * H; ++bh) {
    std::fill(sum.begin(), sum.end(), 0.0);
    std::fill(abs_sum.begin(), abs_sum.end(), 0.0);
    int32_t* sizes = &r.sizes[static_cast<size_t>(bh * C)];
    for (int64_t i = 0; i < N; ++i) {
      const int32_t l = labels[static_cast<size_t>(bh * N + i)];
      ++sizes[l];
      for (int64_t e = 0; e < D; ++e) {
        const double v = x[static_cast<size_t>((bh * N + i) * D + e)];
        sum[static_cast<size_t>(l * D + e)] += v;
        abs_sum[static_cast<size_t>(l * D + e)] += std::abs(v);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      if (sizes[c] == 0) continue;  // an empty cluster keeps its previous centroid
      const double n = sizes[c];
      for (int64_t e = 0; e < D; ++e) {
        const size_t o = static_cast<size_t>((bh * C + c) * D + e);
        r.centroids[o] = sum[static_cast<size_t>(c * D + e)] / n;
        r.error_bound[o] = (n + 2.0) * kF32Eps * abs_sum[static_cast<size_t>(c * D + e)] / n;
      }
    }
  }
  return r;
}

std::vector<double> kmeans_objective(const TensorView& points, const TensorView& centroids,
                                     const std::vector<int32_t>& labels) {
  const auto [B, H, N, D] = dims_of(points);
  const int64_t C = centroids.shape[2];
  const std::vector<double> d = sq_distances(points, centroids);
  std::vector<double> j(static_cast<size_t>(B * H), 0.0);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    for (int64_t i = 0; i < N; ++i) {
      const int64_t p = bh * N + i;
      j[static_cast<size_t>(bh)] += d[static_cast<size_t>(p * C + labels[static_cast<size_t>(p)])];
    }
  }
  return j;
}

std::vector<double> kmeans_init(const TensorView& points, int64_t num_clusters, uint64_t seed) {
  const auto [B, H, N, D] = dims_of(points);
  const int64_t C = num_clusters;
  std::vector<double> out(static_cast<size_t>(B * H * C * D));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      std::vector<std::pair<uint64_t, int64_t>> keyed(static_cast<size_t>(N));
      for (int64_t i = 0; i < N; ++i) {
        const uint64_t stream_index = (static_cast<uint64_t>(b * H + h) << 32) + static_cast<uint64_t>(i);
        keyed[static_cast<size_t>(i)] = {splitmix64(seed ^ splitmix64(stream_index)), i};
      }
      std::sort(keyed.begin(), keyed.end());  // by key, then by index
      const int64_t sampled = std::min(C, N);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = keyed[static_cast<size_t>(c % sampled)].second;
        for (int64_t e = 0; e < D; ++e) {
          out[static_cast<size_t>(((b * H + h) * C + c) * D + e)] = get(points, {b, h, i, e});
        }
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Block selection
// ---------------------------------------------------------------------------------------------

std::vector<int64_t> rank_descending(const double* weights, int64_t n) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return weights[a] > weights[b]; });
  return order;
}

std::vector<uint8_t> top_p_mask(const std::vector<double>& weights, int64_t rows, int64_t cols, double top_p,
                                int min_kept) {
  std::vector<uint8_t> mask(static_cast<size_t>(rows * cols), 0);
  for (int64_t r = 0; r < rows; ++r) {
    const double* w = &weights[static_cast<size_t>(r * cols)];
    uint8_t* m = &mask[static_cast<size_t>(r * cols)];
    int64_t kept = cols;
    const std::vector<int64_t> order = rank_descending(w, cols);
    if (top_p < 1.0) {
      double running = 0.0;
      for (int64_t k = 0; k < cols; ++k) {
        running += w[order[static_cast<size_t>(k)]];
        if (running >= top_p) {
          kept = k + 1;
          break;
        }
      }
    }
    kept = std::max(kept, std::min<int64_t>(min_kept, cols));
    for (int64_t k = 0; k < kept; ++k) m[order[static_cast<size_t>(k)]] = 1;
  }
  return mask;
}

namespace {
// Scores [B,H,Cq,Ck] and the sums of |q_d k_d| behind each.
void centroid_scores(const TensorView& qc, const TensorView& kc, double scale, std::vector<double>& s,
                     std::vector<double>& abs_dot) {
  const int64_t B = qc.shape[0], H = qc.shape[1], Cq = qc.shape[2], D = qc.shape[3], Ck = kc.shape[2];
  const std::vector<double> q = to_vector(qc);
  const std::vector<double> k = to_vector(kc);
  s.assign(static_cast<size_t>(B * H * Cq * Ck), 0.0);
  abs_dot.assign(s.size(), 0.0);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    for (int64_t i = 0; i < Cq; ++i) {
      for (int64_t j = 0; j < Ck; ++j) {
        double dot = 0.0, adot = 0.0;
        for (int64_t e = 0; e < D; ++e) {
          const double a = q[static_cast<size_t>((bh * Cq + i) * D + e)];
          const double b = k[static_cast<size_t>((bh * Ck + j) * D + e)];
          dot += a * b;
          adot += std::abs(a * b);
        }
        s[static_cast<size_t>((bh * Cq + i) * Ck + j)] = scale * dot;
        abs_dot[static_cast<size_t>((bh * Cq + i) * Ck + j)] = scale * adot;
      }
    }
  }
}
}  // namespace

std::vector<double> centroid_probs(const TensorView& q_centroids, const TensorView& k_centroids,
                                   const TensorView& k_sizes, double scale) {
  const int64_t B = q_centroids.shape[0], H = q_centroids.shape[1], Cq = q_centroids.shape[2];
  const int64_t Ck = k_centroids.shape[2];
  std::vector<double> s, abs_dot;
  centroid_scores(q_centroids, k_centroids, scale, s, abs_dot);
  const std::vector<double> sizes = to_vector(k_sizes);
  std::vector<double> p(s.size(), 0.0);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const double* n = &sizes[static_cast<size_t>(bh * Ck)];
    for (int64_t i = 0; i < Cq; ++i) {
      const size_t row = static_cast<size_t>((bh * Cq + i) * Ck);
      double m = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < Ck; ++j) {
        if (n[j] > 0) m = std::max(m, s[row + static_cast<size_t>(j)]);
      }
      if (m == -std::numeric_limits<double>::infinity()) continue;  // all key clusters empty
      double total = 0.0;
      for (int64_t j = 0; j < Ck; ++j) {
        const double w = n[j] > 0 ? n[j] * std::exp(s[row + static_cast<size_t>(j)] - m) : 0.0;
        p[row + static_cast<size_t>(j)] = w;
        total += w;
      }
      for (int64_t j = 0; j < Ck; ++j) p[row + static_cast<size_t>(j)] /= total;
    }
  }
  return p;
}

std::vector<double> centroid_probs_error_bound(const TensorView& q_centroids, const TensorView& k_centroids,
                                               const TensorView& k_sizes, double scale) {
  const int64_t B = q_centroids.shape[0], H = q_centroids.shape[1], Cq = q_centroids.shape[2];
  const int64_t D = q_centroids.shape[3], Ck = k_centroids.shape[2];
  std::vector<double> s, abs_dot;
  centroid_scores(q_centroids, k_centroids, scale, s, abs_dot);
  const std::vector<double> p = centroid_probs(q_centroids, k_centroids, k_sizes, scale);
  const std::vector<double> sizes = to_vector(k_sizes);
  std::vector<double> bound(p.size(), 0.0);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const double* n = &sizes[static_cast<size_t>(bh * Ck)];
    for (int64_t i = 0; i < Cq; ++i) {
      const size_t row = static_cast<size_t>((bh * Cq + i) * Ck);
      double m = -std::numeric_limits<double>::infinity(), score_err_max = 0.0;
      for (int64_t j = 0; j < Ck; ++j) {
        if (n[j] <= 0) continue;
        m = std::max(m, s[row + static_cast<size_t>(j)]);
        score_err_max =
            std::max(score_err_max, static_cast<double>(D + 2) * kF32Eps * abs_dot[row + static_cast<size_t>(j)]);
      }
      for (int64_t j = 0; j < Ck; ++j) {
        const size_t o = row + static_cast<size_t>(j);
        const double score_err = static_cast<double>(D + 2) * kF32Eps * abs_dot[o];
        const double rel = score_err + score_err_max + (std::abs(s[o] - m) + static_cast<double>(Ck) + 4.0) * kF32Eps;
        bound[o] = 2.0 * p[o] * rel;
      }
    }
  }
  return bound;
}

void apply_text_rule(std::vector<uint8_t>& mask, int64_t B, int64_t H, int64_t R, int64_t C) {
  const int64_t prompt_row = R - 2, padding_row = R - 1, prompt_col = C - 2, padding_col = C - 1;
  for (int64_t bh = 0; bh < B * H; ++bh) {
    uint8_t* m = &mask[static_cast<size_t>(bh * R * C)];
    for (int64_t r = 0; r < prompt_row; ++r) {
      m[r * C + prompt_col] = 1;
      m[r * C + padding_col] = 0;
    }
    for (int64_t c = 0; c < C; ++c) {
      m[prompt_row * C + c] = c == padding_col ? 0 : 1;
      m[padding_row * C + c] = c == padding_col ? 1 : 0;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Permutation
// ---------------------------------------------------------------------------------------------

Permutation cluster_permutation(const TensorView& labels, int64_t num_clusters) {
  const int64_t B = labels.shape[0], H = labels.shape[1], N = labels.shape[2], C = num_clusters;
  const std::vector<int32_t> l = to_i32(labels);
  Permutation p;
  p.perm.resize(static_cast<size_t>(B * H * N));
  p.offsets.resize(static_cast<size_t>(B * H * (C + 1)));
  for (int64_t bh = 0; bh < B * H; ++bh) {
    int32_t* off = &p.offsets[static_cast<size_t>(bh * (C + 1))];
    std::fill(off, off + C + 1, 0);
    for (int64_t i = 0; i < N; ++i) ++off[l[static_cast<size_t>(bh * N + i)] + 1];
    for (int64_t c = 0; c < C; ++c) off[c + 1] += off[c];
    std::vector<int32_t> next(off, off + C);
    for (int64_t i = 0; i < N; ++i) {
      const int32_t c = l[static_cast<size_t>(bh * N + i)];
      p.perm[static_cast<size_t>(bh * N + next[static_cast<size_t>(c)]++)] = static_cast<int32_t>(i);
    }
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

namespace {
template <typename T>
Attention naive_attention(const TensorView& q, const TensorView& k, const TensorView& v, double scale,
                          const std::vector<uint8_t>* token_mask) {
  const int64_t B = q.shape[0], H = q.shape[1], Sq = q.shape[2], D = q.shape[3], Sk = k.shape[2];
  const std::vector<double> qd = to_vector(q), kd = to_vector(k), vd = to_vector(v);
  const std::vector<T> qt(qd.begin(), qd.end()), kt(kd.begin(), kd.end()), vt(vd.begin(), vd.end());
  const T sc = static_cast<T>(scale);
  Attention r;
  r.out.assign(static_cast<size_t>(B * H * Sq * D), 0.0);
  r.lse.assign(static_cast<size_t>(B * H * Sq), -std::numeric_limits<double>::infinity());
  std::vector<T> s(static_cast<size_t>(Sk));
  std::vector<uint8_t> use(static_cast<size_t>(Sk));
  std::vector<T> acc(static_cast<size_t>(D));
  for (int64_t bh = 0; bh < B * H; ++bh) {
    for (int64_t i = 0; i < Sq; ++i) {
      const T* qi = &qt[static_cast<size_t>((bh * Sq + i) * D)];
      T m = -std::numeric_limits<T>::infinity();
      bool any = false;
      for (int64_t j = 0; j < Sk; ++j) {
        use[static_cast<size_t>(j)] =
            token_mask == nullptr || (*token_mask)[static_cast<size_t>((bh * Sq + i) * Sk + j)] != 0;
        if (!use[static_cast<size_t>(j)]) continue;
        const T* kj = &kt[static_cast<size_t>((bh * Sk + j) * D)];
        T dot = 0;
        for (int64_t e = 0; e < D; ++e) dot += qi[e] * kj[e];
        s[static_cast<size_t>(j)] = sc * dot;
        m = std::max(m, s[static_cast<size_t>(j)]);
        any = true;
      }
      if (!any) continue;  // out = 0, lse = -inf
      T l = 0;
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t j = 0; j < Sk; ++j) {
        if (!use[static_cast<size_t>(j)]) continue;
        const T p = std::exp(s[static_cast<size_t>(j)] - m);
        l += p;
        const T* vj = &vt[static_cast<size_t>((bh * Sk + j) * D)];
        for (int64_t e = 0; e < D; ++e) acc[static_cast<size_t>(e)] += p * vj[e];
      }
      for (int64_t e = 0; e < D; ++e)
        r.out[static_cast<size_t>((bh * Sq + i) * D + e)] = static_cast<double>(acc[static_cast<size_t>(e)] / l);
      r.lse[static_cast<size_t>(bh * Sq + i)] = static_cast<double>(m + std::log(l));
    }
  }
  return r;
}
}  // namespace

Attention attention_f64(const TensorView& q, const TensorView& k, const TensorView& v, double scale,
                        const std::vector<uint8_t>* token_mask) {
  return naive_attention<double>(q, k, v, scale, token_mask);
}

Attention attention_f32(const TensorView& q, const TensorView& k, const TensorView& v, double scale,
                        const std::vector<uint8_t>* token_mask) {
  return naive_attention<float>(q, k, v, scale, token_mask);
}

std::vector<uint8_t> expand_block_mask(const BlockLayout& layout, int64_t Sq, int64_t Sk) {
  const int64_t B = layout.mask.shape[0], H = layout.mask.shape[1];
  const int64_t Cq = layout.mask.shape[2], Ck = layout.mask.shape[3];
  const std::vector<int32_t> qo = to_i32(layout.q_offsets), ko = to_i32(layout.k_offsets);
  const std::vector<double> bm = to_vector(layout.mask);
  std::vector<uint8_t> tok(static_cast<size_t>(B * H * Sq * Sk), 0);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    for (int64_t a = 0; a < Cq; ++a) {
      for (int64_t b = 0; b < Ck; ++b) {
        if (bm[static_cast<size_t>((bh * Cq + a) * Ck + b)] == 0) continue;
        for (int64_t i = qo[static_cast<size_t>(bh * (Cq + 1) + a)]; i < qo[static_cast<size_t>(bh * (Cq + 1) + a + 1)];
             ++i) {
          for (int64_t j = ko[static_cast<size_t>(bh * (Ck + 1) + b)];
               j < ko[static_cast<size_t>(bh * (Ck + 1) + b + 1)]; ++j) {
            tok[static_cast<size_t>((bh * Sq + i) * Sk + j)] = 1;
          }
        }
      }
    }
  }
  return tok;
}

std::vector<double> block_density(const BlockLayout& layout, int64_t Sq, int64_t Sk) {
  const int64_t B = layout.mask.shape[0], H = layout.mask.shape[1];
  const int64_t Cq = layout.mask.shape[2], Ck = layout.mask.shape[3];
  const std::vector<int32_t> qo = to_i32(layout.q_offsets), ko = to_i32(layout.k_offsets);
  const std::vector<double> bm = to_vector(layout.mask);
  std::vector<double> density(static_cast<size_t>(B * H), 0.0);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    double pairs = 0.0;  // exact: integers far below 2^53
    for (int64_t a = 0; a < Cq; ++a) {
      for (int64_t b = 0; b < Ck; ++b) {
        if (bm[static_cast<size_t>((bh * Cq + a) * Ck + b)] == 0) continue;
        pairs += static_cast<double>(qo[static_cast<size_t>(bh * (Cq + 1) + a + 1)] -
                                     qo[static_cast<size_t>(bh * (Cq + 1) + a)]) *
                 static_cast<double>(ko[static_cast<size_t>(bh * (Ck + 1) + b + 1)] -
                                     ko[static_cast<size_t>(bh * (Ck + 1) + b)]);
      }
    }
    density[static_cast<size_t>(bh)] = pairs / (static_cast<double>(Sq) * static_cast<double>(Sk));
  }
  return density;
}

}  // namespace sapattn::ref
