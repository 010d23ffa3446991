// order_clusters on the CPU: the reference of the greedy nearest-neighbour chain. Similarities are
// computed in exactly the arithmetic of the CUDA kernel (32 fused multiply-add partial sums, lane l
// taking dimensions l, l + 32, ..., then the butterfly of a warp's xor shuffles), so both backends
// choose the same chain bit for bit.
#include <cmath>
#include <limits>
#include <vector>

#include "core/parallel.hpp"
#include "cpu/backend.hpp"
#include "sapattn/error.hpp"

namespace sapattn::cpu {

namespace {

float warp_dot(const float* a, const float* b, int64_t D) {
  float lane[32];
  for (int l = 0; l < 32; ++l) {
    float s = 0.0f;
    for (int64_t d = l; d < D; d += 32) s = std::fma(a[d], b[d], s);
    lane[l] = s;
  }
  for (int m = 16; m > 0; m /= 2) {
    float next[32];
    for (int l = 0; l < 32; ++l) next[l] = lane[l] + lane[l ^ m];
    for (int l = 0; l < 32; ++l) lane[l] = next[l];
  }
  return lane[0];
}

}  // namespace

void order_clusters(TensorView centroids, TensorView sizes, TensorView labels, int threads) {
  const int64_t B = centroids.shape[0], H = centroids.shape[1], C = centroids.shape[2], D = centroids.shape[3];
  const int64_t N = labels.shape[2];
  auto* cent = static_cast<float*>(centroids.data);
  auto* size = static_cast<int32_t*>(sizes.data);
  auto* label = static_cast<int32_t*>(labels.data);
  // Labels first: a bad one throws before anything is changed.
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int32_t* row = label + b * labels.stride[0] + h * labels.stride[1];
      for (int64_t i = 0; i < N; ++i)
        SAPATTN_CHECK(row[i] >= 0 && row[i] < C, InvalidArgumentError, "order_clusters: label ", row[i],
                      " of (b,h) = (", b, ",", h, ") token ", i, " is outside [0, ", C, ")");
    }
  parallel_for(B * H, threads, [&](int64_t bh) {
    float* c0 = cent + bh * C * D;
    int32_t* s0 = size + bh * C;
    std::vector<float> inv(static_cast<size_t>(C));
    for (int64_t c = 0; c < C; ++c) {
      const float n = warp_dot(c0 + c * D, c0 + c * D, D);
      inv[static_cast<size_t>(c)] = n > 0.0f ? 1.0f / std::sqrt(n) : 0.0f;
    }
    std::vector<int32_t> order;
    order.reserve(static_cast<size_t>(C));
    std::vector<char> used(static_cast<size_t>(C), 0);
    int64_t cur = 0;
    while (cur < C && s0[cur] == 0) ++cur;
    while (cur < C) {
      order.push_back(static_cast<int32_t>(cur));
      used[static_cast<size_t>(cur)] = 1;
      int64_t best = C;
      float best_sim = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < C; ++c) {
        if (used[static_cast<size_t>(c)] || s0[c] == 0) continue;
        float sim = warp_dot(c0 + cur * D, c0 + c * D, D) * inv[static_cast<size_t>(cur)] * inv[static_cast<size_t>(c)];
        if (std::isnan(sim)) sim = -std::numeric_limits<float>::infinity();
        if (best == C || sim > best_sim) {  // ties keep the lower index
          best = c;
          best_sim = sim;
        }
      }
      cur = best;
    }
    for (int64_t c = 0; c < C; ++c)
      if (s0[c] == 0) order.push_back(static_cast<int32_t>(c));
    std::vector<float> old_cent(c0, c0 + C * D);
    std::vector<int32_t> old_size(s0, s0 + C), rank(static_cast<size_t>(C));
    for (int64_t p = 0; p < C; ++p) {
      const int32_t c = order[static_cast<size_t>(p)];
      rank[static_cast<size_t>(c)] = static_cast<int32_t>(p);
      s0[p] = old_size[static_cast<size_t>(c)];
      for (int64_t d = 0; d < D; ++d) c0[p * D + d] = old_cent[static_cast<size_t>(c * D + d)];
    }
    int32_t* row = label + (bh / H) * labels.stride[0] + (bh % H) * labels.stride[1];
    for (int64_t i = 0; i < N; ++i) row[i] = rank[static_cast<size_t>(row[i])];
  });
}

}  // namespace sapattn::cpu
