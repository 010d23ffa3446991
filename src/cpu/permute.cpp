// Cluster permutation on the CPU: a stable counting sort per (b,h), and row gathers/scatters.
#include <vector>

#include "core/parallel.hpp"
#include "cpu/backend.hpp"
#include "cpu/rows.hpp"
#include "sapattn/error.hpp"

namespace sapattn::cpu {

void label_text_tokens(TensorView labels, int64_t video_tokens, int64_t prompt_length, int prompt_label, int threads) {
  const int64_t B = labels.shape[0], H = labels.shape[1], S = labels.shape[2];
  parallel_for(B * H, threads, [&](int64_t bh) {
    int32_t* lab = &at<int32_t>(labels, bh / H, bh % H);
    for (int64_t s = video_tokens; s < S; ++s)
      lab[s] = s < video_tokens + prompt_length ? prompt_label : prompt_label + 1;
  });
}

void cluster_permutation(const TensorView& labels, int num_clusters, TensorView perm, TensorView offsets, int threads) {
  const int64_t B = labels.shape[0], H = labels.shape[1], N = labels.shape[2];
  const int64_t C = num_clusters;
  check_index_range(labels, C, "labels");
  parallel_for(B * H, threads, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    const int32_t* lab = &at<int32_t>(labels, b, h);
    int32_t* off = &at<int32_t>(offsets, b, h);
    int32_t* out = &at<int32_t>(perm, b, h);
    std::fill(off, off + C + 1, 0);
    for (int64_t i = 0; i < N; ++i) ++off[lab[i] + 1];
    for (int64_t c = 0; c < C; ++c) off[c + 1] += off[c];
    std::vector<int32_t> cursor(off, off + C);
    for (int64_t i = 0; i < N; ++i) out[cursor[lab[i]]++] = static_cast<int32_t>(i);
  });
}

namespace {

constexpr int64_t kRowChunk = 512;

// Moves rows between x and out: out[dst(j)] = x[src(j)] where one side is perm[j] and the other j.
template <bool kGather>
void move_rows(const TensorView& x, const TensorView& perm, TensorView out, int threads) {
  const int64_t B = x.shape[0], H = x.shape[1], N = x.shape[2], D = x.shape[3];
  check_index_range(perm, N, "perm");
  const int64_t chunks = (N + kRowChunk - 1) / kRowChunk;
  parallel_for(B * H * chunks, threads, [&](int64_t task) {
    const int64_t bh = task / chunks, b = bh / H, h = bh % H;
    const int64_t lo = (task % chunks) * kRowChunk, hi = std::min(N, lo + kRowChunk);
    const int32_t* p = &at<int32_t>(perm, b, h);
    std::vector<float> row(D);
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t src = kGather ? p[j] : j, dst = kGather ? j : p[j];
      load_row(x, b, h, src, row.data());
      store_row(out, b, h, dst, row.data());
    }
  });
}

}  // namespace

void gather_rows(const TensorView& x, const TensorView& perm, TensorView out, int threads) {
  move_rows<true>(x, perm, out, threads);
}

void scatter_rows(const TensorView& y, const TensorView& perm, TensorView out, int threads) {
  move_rows<false>(y, perm, out, threads);
}

}  // namespace sapattn::cpu
