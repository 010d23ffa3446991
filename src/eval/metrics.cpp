// Metrics of a method's output against dense attention, per (b,h) and averaged.
#include <cmath>

#include "sapattn/error.hpp"
#include "sapattn/eval.hpp"

namespace sapattn::eval {

Metrics compare(const MethodResult& result, const MethodResult& dense) {
  SAPATTN_CHECK(result.out.shape() == dense.out.shape() && result.lse.shape() == dense.lse.shape(), ShapeError,
                "compare: the result ", result.out.view().describe(), " and the dense reference ",
                dense.out.view().describe(), " differ in shape");
  const auto& shape = result.out.shape();
  const int64_t B = shape[0], H = shape[1], S = shape[2], D = shape[3];
  Metrics m;
  m.mean = {-1, -1, 0, 0, 0, 0};
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t bh = b * H + h;
      const float* o = result.out.data_as<float>() + bh * S * D;
      const float* od = dense.out.data_as<float>() + bh * S * D;
      const float* lse = result.lse.data_as<float>() + bh * S;
      const float* lsed = dense.lse.data_as<float>() + bh * S;
      double diff2 = 0, ref2 = 0, out2 = 0, dot = 0, recall = 0;
      for (int64_t i = 0; i < S * D; ++i) {
        const double x = o[i], y = od[i];
        diff2 += (x - y) * (x - y);
        ref2 += y * y;
        out2 += x * x;
        dot += x * y;
      }
      // exp(-inf - finite) = 0: a row that attended to nothing kept none of the mass.
      for (int64_t s = 0; s < S; ++s) recall += std::exp(static_cast<double>(lse[s]) - lsed[s]);
      HeadMetrics hm;
      hm.batch = b;
      hm.head = h;
      hm.density = result.density.data_as<float>()[bh];
      hm.recall = recall / static_cast<double>(S);
      hm.rel_l2 = ref2 > 0 ? std::sqrt(diff2 / ref2) : std::sqrt(diff2);
      hm.cosine = (out2 > 0 && ref2 > 0) ? dot / std::sqrt(out2 * ref2) : (out2 == ref2 ? 1.0 : 0.0);
      m.per_head.push_back(hm);
      m.mean.density += hm.density;
      m.mean.recall += hm.recall;
      m.mean.rel_l2 += hm.rel_l2;
      m.mean.cosine += hm.cosine;
    }
  }
  const double n = static_cast<double>(m.per_head.size());
  m.mean.density /= n;
  m.mean.recall /= n;
  m.mean.rel_l2 /= n;
  m.mean.cosine /= n;
  return m;
}

}  // namespace sapattn::eval
