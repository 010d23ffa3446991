// rope_pairs (include/sapattn/ops.hpp): the argument checks every backend shares, then dispatch on
// the stream's device.
#include "ops/checks.hpp"
#include "ops/dispatch.hpp"
#include "sapattn/ops.hpp"

namespace sapattn {

using namespace checks;    // the argument checks of src/ops/
using namespace dispatch;  // backend(), cpu_threads(), SAPATTN_ON_CUDA

void rope_pairs(const TensorView& x, const TensorView& cos, const TensorView& sin, TensorView out,
                const Stream& stream) {
  expect_rank(x, 4, "x");
  expect_floating(x, "x");
  SAPATTN_CHECK(x.shape[3] % 2 == 0, ShapeError, "x: the head dim must be even (pairs), got ", x.describe());
  expect_rank(out, 4, "out");
  expect_dtype(out, x.dtype, "out");
  for (int d = 0; d < 4; ++d) expect_extent(out, d, x.shape[d], "out", "the extent of x");
  expect_contiguous_tensor(cos, DType::F32, {x.shape[2], x.shape[3]}, "cos", "S, D of x");
  expect_contiguous_tensor(sin, DType::F32, {x.shape[2], x.shape[3]}, "sin", "S, D of x");
  if (x.data == out.data)
    for (int d = 0; d < 4; ++d)
      SAPATTN_CHECK(x.stride[d] == out.stride[d], InvalidArgumentError,
                    "rope_pairs: out may be x itself but not another view of its memory");
  if (backend(stream, x, cos, sin, out) == DeviceType::CUDA)
    return SAPATTN_ON_CUDA(rope_pairs(x, cos, sin, out, stream));
  cpu::rope_pairs(x, cos, sin, out, cpu_threads(stream));
}

}  // namespace sapattn
