// rope_pairs on the CPU (include/sapattn/ops.hpp): one row of x at a time, through fp32.
#include <vector>

#include "core/parallel.hpp"
#include "cpu/backend.hpp"
#include "cpu/rows.hpp"

namespace sapattn::cpu {

void rope_pairs(const TensorView& x, const TensorView& cos, const TensorView& sin, TensorView out, int threads) {
  const int64_t B = x.shape[0], H = x.shape[1], S = x.shape[2], D = x.shape[3];
  const float* c = static_cast<const float*>(cos.data);
  const float* n = static_cast<const float*>(sin.data);
  parallel_for(B * H, threads, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    std::vector<float> row(static_cast<size_t>(D)), rotated(static_cast<size_t>(D));
    for (int64_t s = 0; s < S; ++s) {
      load_row(x, b, h, s, row.data());  // the whole row first: out may be x
      const float* cs = c + s * D;
      const float* sn = n + s * D;
      for (int64_t i = 0; i < D; i += 2) {
        const float even = row[i], odd = row[i + 1], ci = cs[i], si = sn[i + 1];
        const float a = even * ci, b2 = odd * si, e = even * si, f = odd * ci;
        rotated[i] = a - b2;
        rotated[i + 1] = e + f;
      }
      store_row(out, b, h, s, rotated.data());
    }
  });
}

}  // namespace sapattn::cpu
