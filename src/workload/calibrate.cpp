// Calibration measure of attention concentration: the share of a query's softmax mass held by its
// top fraction of keys (the SVG2 paper: 13% of keys keep 95% of the mass in real video DiTs).
#include <algorithm>
#include <cmath>

#include "core/parallel.hpp"
#include "sapattn/error.hpp"
#include "workload/internal.hpp"

namespace sapattn::workload {

namespace {

void check_qk(const TensorView& q, const TensorView& k) {
  SAPATTN_CHECK(q.rank == 4 && k.rank == 4, ShapeError, "q and k must be [B,H,S,D], got ", q.describe(), " and ",
                k.describe());
  SAPATTN_CHECK(q.shape[0] == k.shape[0] && q.shape[1] == k.shape[1] && q.shape[3] == k.shape[3], ShapeError, "q ",
                q.describe(), " and k ", k.describe(), " disagree in B, H or D");
  SAPATTN_CHECK(q.shape[2] >= 1 && k.shape[2] >= 1 && q.shape[3] >= 1, ShapeError, "empty q or k: ", q.describe(), ", ",
                k.describe());
  SAPATTN_CHECK(is_floating(q.dtype) && is_floating(k.dtype), DTypeError, "q and k must be f32/f16/bf16, got ",
                q.describe(), " and ", k.describe());
  SAPATTN_CHECK(q.device.type == DeviceType::CPU && k.device.type == DeviceType::CPU, UnsupportedError,
                "top_fraction_mass runs on the host; got ", q.describe(), " and ", k.describe());
  SAPATTN_CHECK(!q.empty() && !k.empty(), ShapeError, "q or k has no data");
}

// Rows of one (b, h) of a [B,H,S,D] view as a dense fp32 [S][D] array.
std::vector<float> load_rows(const TensorView& x, int64_t b, int64_t h, const std::vector<int64_t>* rows) {
  const int64_t D = x.shape[3];
  const int64_t n = rows ? static_cast<int64_t>(rows->size()) : x.shape[2];
  std::vector<float> out(static_cast<size_t>(n * D));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = rows ? (*rows)[i] : i;
    const int64_t base = x.offset({b, h, s, 0}), step = x.stride[3];
    load_run_as_f32(x.data, x.dtype, base, step, D, out.data() + i * D);
  }
  return out;
}

// Dot product with 8 independent fp32 accumulators (vectorisable without reassociation flags).
float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

std::vector<double> top_fraction_mass_per_head(const TensorView& q, const TensorView& k, double fraction,
                                               int64_t sample_queries, uint64_t seed, float scale, int threads) {
  check_qk(q, k);
  SAPATTN_CHECK(std::isfinite(fraction) && fraction > 0.0 && fraction <= 1.0, InvalidArgumentError,
                "fraction must be in (0, 1], got ", fraction);
  SAPATTN_CHECK(sample_queries >= 0, InvalidArgumentError, "sample_queries must be >= 0, got ", sample_queries);
  SAPATTN_CHECK(std::isfinite(scale) && scale >= 0.0f, InvalidArgumentError,
                "scale must be finite and >= 0 (0 = 1/sqrt(D)), got ", scale);
  const int64_t B = q.shape[0], H = q.shape[1], Sq = q.shape[2], Sk = k.shape[2], D = q.shape[3];
  const float sc = scale > 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(D));
  const auto top = std::min<int64_t>(Sk, std::max<int64_t>(1, static_cast<int64_t>(std::ceil(fraction * Sk - 1e-9))));

  // The sampled query rows of each batch item: a seeded partial Fisher-Yates shuffle.
  std::vector<std::vector<int64_t>> rows(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> all(static_cast<size_t>(Sq));
    for (int64_t i = 0; i < Sq; ++i) all[i] = i;
    const int64_t n = sample_queries == 0 || sample_queries >= Sq ? Sq : sample_queries;
    detail::Rng rng(detail::mix(seed, static_cast<uint64_t>(b)));
    if (n < Sq) {
      for (int64_t i = 0; i < n; ++i) std::swap(all[i], all[rng.uniform_int(i, Sq - 1)]);
      all.resize(static_cast<size_t>(n));
      std::sort(all.begin(), all.end());
    }
    rows[b] = std::move(all);
  }

  // One task per (b, h); each writes its own mean, combined in a fixed order afterwards.
  std::vector<double> share(static_cast<size_t>(B * H), 0.0);
  parallel_for(B * H, threads, [&](int64_t task) {
    const int64_t b = task / H, h = task % H;
    const std::vector<float> qs = load_rows(q, b, h, &rows[b]);
    const std::vector<float> ks = load_rows(k, b, h, nullptr);
    // Queries in blocks of 16 against each key in turn: one pass over K (38 MB per head at 720p)
    // serves 16 queries, instead of streaming K from memory once per query.
    constexpr int64_t kBlock = 16;
    std::vector<float> p(static_cast<size_t>(kBlock * Sk));
    double sum_share = 0;
    const auto nq = static_cast<int64_t>(rows[b].size());
    for (int64_t i0 = 0; i0 < nq; i0 += kBlock) {
      const int64_t nb = std::min(kBlock, nq - i0);
      for (int64_t j = 0; j < Sk; ++j) {
        const float* kj = ks.data() + j * D;
        for (int64_t i = 0; i < nb; ++i) p[i * Sk + j] = sc * dot(qs.data() + (i0 + i) * D, kj, D);
      }
      for (int64_t i = 0; i < nb; ++i) {
        float* pi = p.data() + i * Sk;
        const float mx = *std::max_element(pi, pi + Sk);
        double total = 0;
        for (int64_t j = 0; j < Sk; ++j) {
          pi[j] = std::exp(pi[j] - mx);
          total += pi[j];
        }
        std::nth_element(pi, pi + (top - 1), pi + Sk, std::greater<float>());
        double kept = 0;
        for (int64_t j = 0; j < top; ++j) kept += pi[j];
        sum_share += kept / total;
      }
    }
    share[task] = sum_share / static_cast<double>(nq);
  });
  std::vector<double> per_head(static_cast<size_t>(H), 0.0);
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t b = 0; b < B; ++b) per_head[h] += share[b * H + h];
    per_head[h] /= static_cast<double>(B);
  }
  return per_head;
}

double top_fraction_mass(const TensorView& q, const TensorView& k, double fraction, int64_t sample_queries,
                         uint64_t seed, float scale, int threads) {
  const std::vector<double> per_head = top_fraction_mass_per_head(q, k, fraction, sample_queries, seed, scale, threads);
  double s = 0;
  for (double x : per_head) s += x;
  return s / static_cast<double>(per_head.size());
}

}  // namespace sapattn::workload
