// What the SVG-EAR GPU suites (test_cuda_ear_*.cpp) share beyond cuda_support.hpp (streams, device
// twins of host tensors, workspaces, poisoned tensors): inputs drawn on the host (normal values, labels
// with empty, 1-token and large clusters, sizes) and the byte-for-byte comparison of a GPU output with
// the CPU's.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_support.hpp"
#include "reference.hpp"
#include "sapattn/tensor.hpp"

namespace sapattn::ear_cuda_test {

using ref::HostTensor;
using ref::Layout;

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

inline HostTensor normal(DType dtype, std::vector<int64_t> shape, ref::Rng& rng, Layout layout = Layout::Contiguous,
                         double stddev = 1.0) {
  HostTensor t = cuda_test::poisoned(dtype, std::move(shape), layout);
  ref::fill_normal(t.view, rng, 0.0, stddev);
  return t;
}

inline HostTensor i32_tensor(std::vector<int64_t> shape, const std::vector<int32_t>& values) {
  HostTensor t = cuda_test::poisoned(DType::I32, std::move(shape));
  std::copy(values.begin(), values.end(), t.storage.data_as<int32_t>());
  return t;
}

// Labels [B,H,N] (every (b,h) with empty, 1-token and large clusters) as the video part of a
// [B,H,N+extra] tensor, so that the views have a row stride other than N.
inline HostTensor random_labels(ref::Rng& rng, int64_t B, int64_t H, int64_t N, int64_t C, int64_t extra = 3) {
  HostTensor t = cuda_test::poisoned(DType::I32, {B, H, N + extra});
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const std::vector<int32_t> l = ref::random_labels_with_sizes(rng, ref::random_cluster_sizes(rng, N, C));
    std::copy(l.begin(), l.end(), t.storage.data_as<int32_t>() + bh * (N + extra));
  }
  t.view = t.view.slice(2, 0, N);
  return t;
}

inline std::vector<int32_t> counts_of(const TensorView& labels, int64_t C) {
  const int64_t B = labels.shape[0], H = labels.shape[1], N = labels.shape[2];
  std::vector<int32_t> counts(static_cast<size_t>(B * H * C), 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < N; ++i) ++counts[static_cast<size_t>((b * H + h) * C + ref::get(labels, {b, h, i}))];
  return counts;
}

// Random sizes in [0, hi], a quarter of them 0.
inline std::vector<int32_t> random_sizes(ref::Rng& rng, int64_t n, int64_t hi) {
  std::vector<int32_t> s(static_cast<size_t>(n));
  for (auto& x : s) x = rng.uniform() < 0.25 ? 0 : static_cast<int32_t>(rng.integer(1, hi));
  return s;
}

inline std::string where(const TensorView& v, int64_t flat) {
  std::ostringstream os;
  os << "[";
  std::vector<int64_t> idx(static_cast<size_t>(v.rank));
  for (int d = v.rank - 1; d >= 0; --d) {
    idx[static_cast<size_t>(d)] = flat % v.shape[d];
    flat /= v.shape[d];
  }
  for (int d = 0; d < v.rank; ++d) os << (d ? "," : "") << idx[static_cast<size_t>(d)];
  os << "]";
  return os.str();
}

// Expects the two storages to be byte-identical; names the first differing view element.
inline void expect_identical(const HostTensor& gpu, const HostTensor& cpu, const char* what) {
  if (gpu.bytes() == cpu.bytes()) return;
  const std::vector<double> g = ref::to_vector(gpu.view), c = ref::to_vector(cpu.view);
  for (size_t i = 0; i < g.size(); ++i)
    if (!(g[i] == c[i]) && !(std::isnan(g[i]) && std::isnan(c[i]))) {
      ADD_FAILURE() << what << ": GPU " << g[i] << " != CPU " << c[i] << " at " << where(gpu.view, i);
      return;
    }
  ADD_FAILURE() << what << ": the views agree but bytes outside the view differ (written out of bounds)";
}

}  // namespace sapattn::ear_cuda_test
