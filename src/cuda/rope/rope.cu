// rope_pairs on the GPU (include/sapattn/ops.hpp): one thread per pair, a token's pairs (all heads)
// in the blocks of one grid column, so that they read its cos and sin row together; the CPU's fp32
// operations, each rounded on its own (__f*_rn: no FMA), so the values are the CPU's (and PyTorch's
// eager ops') bit for bit.
#include "cuda/backend.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda {

namespace {

constexpr int kThreads = 256;

struct RopeView {
  void* data;
  int64_t stride[4];
};

// grid (B*S tokens, ceil(H*D/2 / kThreads)): block (token, chunk) rotates pairs [chunk * kThreads,
// ...) of the token's H*D/2, all reading the token's cos and sin row.
template <typename T>
__global__ void __launch_bounds__(kThreads) rope_kernel(RopeView x, RopeView out, const float* __restrict__ cos,
                                                        const float* __restrict__ sin, int S, int H, int D) {
  const int half = D / 2;
  const int pair = static_cast<int>(blockIdx.y) * kThreads + static_cast<int>(threadIdx.x);
  if (pair >= H * half) return;
  const int token = static_cast<int>(blockIdx.x), b = token / S, s = token % S;
  const int h = pair / half, i = pair % half;
  const T* xr = static_cast<const T*>(x.data) + b * x.stride[0] + h * x.stride[1] + s * x.stride[2];
  const float even = to_f32(xr[2 * i * x.stride[3]]), odd = to_f32(xr[(2 * i + 1) * x.stride[3]]);
  const float c = cos[static_cast<int64_t>(s) * D + 2 * i], n = sin[static_cast<int64_t>(s) * D + 2 * i + 1];
  T* o = static_cast<T*>(out.data) + b * out.stride[0] + h * out.stride[1] + s * out.stride[2];
  o[2 * i * out.stride[3]] = from_f32<T>(__fsub_rn(__fmul_rn(even, c), __fmul_rn(odd, n)));
  o[(2 * i + 1) * out.stride[3]] = from_f32<T>(__fadd_rn(__fmul_rn(even, n), __fmul_rn(odd, c)));
}

RopeView rope_view(const TensorView& t) { return {t.data, {t.stride[0], t.stride[1], t.stride[2], t.stride[3]}}; }

}  // namespace

void rope_pairs(const TensorView& x, const TensorView& cos, const TensorView& sin, TensorView out,
                const Stream& stream) {
  const DeviceGuard guard(stream.device);
  const int64_t B = x.shape[0], H = x.shape[1], S = x.shape[2], D = x.shape[3];
  if (B * H * S * D == 0) return;
  const int64_t per_token = H * (D / 2);
  SAPATTN_CHECK(B * S <= 2147483647 && per_token <= 65535LL * kThreads && S <= 2147483647, UnsupportedError,
                "rope_pairs on CUDA takes up to 2^31 - 1 tokens and ", 65535LL * kThreads, " pairs a token, got ",
                B * S, " and ", per_token);
  const dim3 grid(static_cast<unsigned>(B * S), static_cast<unsigned>(ceil_div(per_token, kThreads)));
  dispatch_float(x.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    rope_kernel<T><<<grid, kThreads, 0, stream_of(stream)>>>(
        rope_view(x), rope_view(out), static_cast<const float*>(cos.data), static_cast<const float*>(sin.data),
        static_cast<int>(S), static_cast<int>(H), static_cast<int>(D));
    SAPATTN_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace sapattn::cuda
