// The e4m3 attention's operands in two passes over Q, K and V (fp8/fp8.hpp, docs/fp8.md "The
// quantisation on CUDA"), at head dim 128: Q per tile of 128 cluster-ordered rows, K per such tile or
// one scale per head (head_k), V per channel, K smoothed by the head's mean key.
//
// Pass 1 (stats_kernel) reads K and V once, in token order: the fp64 column sums of K (its mean),
// the column amax keys of V (amax.cuh; a permutation does not change a maximum) and, for one K
// scale per head, K's column maxima and minima. finish_stats_kernel (a block per head) turns them
// into the mean, V's scales and inverses and the head's K scale: fl(x - m) is monotonic in x, so
// the largest |fl(k - m_d)| of column d is at its maximum or its minimum, and the head's amax of
// K - mean is exact without a second read. Pass 2 (codes_kernel) reads Q, K and V once, through the
// permutations: a block per 128-row tile of Q (its amax, codes, scales and the LSE term
// scale * q_i . mean) or of K (the same with K - mean, or the head's scale) together with the same keys of V
// (codes with the channel inverses, written transposed through shared memory for the e4m3 P V
// GEMM). Codes and scales are the CPU's (src/cpu/fp8_quantize.cpp) bit for bit: the same fp32
// subtraction and product, e4m3_scale's divisions and the hardware conversion, which matches the
// shared codec on every fp32 value (tests/cuda/test_cuda_fp8_codec.cu). The LSE term is summed as a
// tree over the row (the CPU sums eight strided partials), within a few ulps of the CPU's.
//
// Each thread holds 8 consecutive channels of a row (one 16-byte load for unit-stride 16-bit rows,
// kVec, else 8 strided loads): 16 threads per row, 16 rows per pass of a 256-thread block.
#include <algorithm>
#include <cstdint>

#include "core/fp8.hpp"
#include "cuda/fp8/amax.cuh"
#include "cuda/fp8/fp8.hpp"
#include "cuda/runtime/device.cuh"
#include "cuda/runtime/primitives.cuh"

namespace sapattn::cuda {

namespace {

using fp8_group::amax_key;
using fp8_group::scale_of_key;
using fp8_group::source_row;

constexpr int kD = 128;                     // the e4m3 kernel's head dim
constexpr int kThreads = 256;
constexpr int kChunks = kD / 8;             // threads per row: 8 channels each
constexpr int kRowStep = kThreads / kChunks;  // rows per pass of a block: 16
constexpr int kTile = 128;                  // rows per scale group of Q and K
constexpr int kPasses = kTile / kRowStep;   // 8
constexpr int kStatRows = 1024;             // key rows per block of pass 1

template <typename T>
struct Input {
  const T* x;
  int64_t stride[4];  // elements
};

struct OperandParams {
  int64_t H, Sq, Sk, v_keys;
  const int32_t *q_perm, *k_perm;  // [B,H,S] or null
  float scale;
  bool smooth, head_k;
  Fp8OperandBuffers out;
  int* flag;
};

// A finite float as an unsigned key that orders as the values do (-0 below +0), and back.
__device__ __forceinline__ uint32_t ordered_key(float x) {
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) != 0u ? ~u : u | 0x80000000u;
}
__device__ __forceinline__ float of_ordered_key(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) != 0u ? k & 0x7fffffffu : ~k);
}

// Row `row` of head (b, h), channels 8c .. 8c + 7, as fp32.
template <typename T, bool kVec>
__device__ __forceinline__ void load8(const Input<T>& in, int64_t b, int64_t h, int64_t row, int c, float (&v)[8]) {
  const T* p = in.x + b * in.stride[0] + h * in.stride[1] + row * in.stride[2];
  if constexpr (kVec) {
    struct alignas(8 * sizeof(T)) Eight {
      T e[8];
    };
    const Eight u = reinterpret_cast<const Eight*>(p)[c];
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_f32(u.e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_f32(p[(8 * c + i) * in.stride[3]]);
  }
}

// Two codes, lo in the low byte: the hardware conversion where there is one (sm_89 and newer; the
// e4m3 attention runs on sm_90 only), else the shared codec, the same function.
__device__ __forceinline__ uint32_t codes2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  return e4m3x2_of(lo, hi);
#else
  return fp8::e4m3_encode(lo) | static_cast<uint32_t>(fp8::e4m3_encode(hi)) << 8;
#endif
}

// Eight values times `inverse` (per value) as e4m3 codes, first value in the lowest byte.
__device__ __forceinline__ uint2 codes8(const float (&y)[8], const float (&inverse)[8]) {
  uint32_t w[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t lo = codes2(y[4 * h] * inverse[4 * h], y[4 * h + 1] * inverse[4 * h + 1]);
    const uint32_t hi = codes2(y[4 * h + 2] * inverse[4 * h + 2], y[4 * h + 3] * inverse[4 * h + 3]);
    w[h] = lo | hi << 16;
  }
  return make_uint2(w[0], w[1]);
}

// Pass 1: block (chunk of kStatRows keys, b*h) adds its K column sums into k_sum (fp64), max-es its
// V column keys into v_scale (zeroed, read as keys until finish_stats_kernel) and, with head_k, its K
// column extrema and non-finite flags into k_extrema (initialised by the host).
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads, 2) stats_kernel(Input<T> k, Input<T> v, OperandParams p) {
  constexpr int kWarps = kThreads / 32;
  __shared__ double col_sum[kWarps][kD];
  __shared__ uint32_t col_key[kWarps][kD], col_max[kWarps][kD], col_min[kWarps][kD], col_bad[kWarps][kD];
  const int c = threadIdx.x % kChunks, rs = threadIdx.x / kChunks, warp = threadIdx.x / 32;
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * kStatRows, hi = min_of<int64_t>(lo + kStatRows, p.Sk);
  const bool read_k = p.smooth || p.head_k;
  double sum[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  uint32_t key[8], kmax[8], kmin[8], bad[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    key[i] = kmax[i] = bad[i] = 0u;
    kmin[i] = 0xffffffffu;
  }
#pragma unroll 2
  for (int64_t r = lo + rs; r < hi; r += kRowStep) {
    float kr[8], vr[8];
    if (read_k) load8<T, kVec>(k, b, h, r, c, kr);
    load8<T, kVec>(v, b, h, r, c, vr);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (p.smooth) sum[i] += static_cast<double>(kr[i]);
      key[i] = max(key[i], amax_key(vr[i]));
      if (p.head_k) {
        if (isfinite(kr[i])) {
          kmax[i] = max(kmax[i], ordered_key(kr[i]));
          kmin[i] = min(kmin[i], ordered_key(kr[i]));
        } else {
          bad[i] = 1u;
        }
      }
    }
  }
  // The two rows of a warp (lanes l and l + 16 hold the same channels), then the warps.
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 16);
    key[i] = max(key[i], __shfl_xor_sync(0xffffffffu, key[i], 16));
    kmax[i] = max(kmax[i], __shfl_xor_sync(0xffffffffu, kmax[i], 16));
    kmin[i] = min(kmin[i], __shfl_xor_sync(0xffffffffu, kmin[i], 16));
    bad[i] |= __shfl_xor_sync(0xffffffffu, bad[i], 16);
  }
  if (rs % 2 == 0) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      col_sum[warp][8 * c + i] = sum[i];
      col_key[warp][8 * c + i] = key[i];
      col_max[warp][8 * c + i] = kmax[i];
      col_min[warp][8 * c + i] = kmin[i];
      col_bad[warp][8 * c + i] = bad[i];
    }
  }
  __syncthreads();
  if (threadIdx.x < kD) {
    const int d = threadIdx.x;
    double s = 0.0;
    uint32_t m = 0u, hi_key = 0u, lo_key = 0xffffffffu, any_bad = 0u;
    for (int w = 0; w < kWarps; ++w) {
      s += col_sum[w][d];
      m = max(m, col_key[w][d]);
      hi_key = max(hi_key, col_max[w][d]);
      lo_key = min(lo_key, col_min[w][d]);
      any_bad |= col_bad[w][d];
    }
    if (p.smooth) atomicAdd(&p.out.k_sum[bh * kD + d], s);
    if (m != 0u) atomicMax(reinterpret_cast<uint32_t*>(p.out.v_scale) + bh * kD + d, m);
    if (p.head_k) {
      uint32_t* e = p.out.k_extrema + bh * kD + d;
      const int64_t plane = static_cast<int64_t>(gridDim.y) * kD;
      if (hi_key != 0u) atomicMax(e, hi_key);
      if (lo_key != 0xffffffffu) atomicMin(e + plane, lo_key);
      if (any_bad != 0u) atomicMax(e + 2 * plane, 1u);
    }
  }
}

// Block b*h of D threads: the mean key (the CPU's mean_row: the fp64 sum over S, rounded once), V's
// scales and inverses from their keys (in place) and, with head_k, the head's K scale and inverse:
// the largest key of |fl(max_d - m_d)| and |fl(min_d - m_d)| over the columns (kNonFinite where a
// column holds a NaN or an infinity).
__global__ void __launch_bounds__(kD) finish_stats_kernel(OperandParams p) {
  __shared__ uint32_t partial[kD / 32];
  const int64_t bh = blockIdx.x, i = bh * kD + threadIdx.x;
  float m = 0.0f;
  if (p.smooth) {
    m = static_cast<float>(p.out.k_sum[i] / static_cast<double>(p.Sk));
    p.out.k_mean[i] = m;
  }
  const fp8::E4M3Scale s = scale_of_key(__float_as_uint(p.out.v_scale[i]));
  p.out.v_scale[i] = s.scale;
  p.out.v_inverse[i] = s.inverse;
  if (!p.head_k) return;  // (uniform: no thread reaches the barrier)
  const int64_t plane = static_cast<int64_t>(gridDim.x) * kD;
  uint32_t key = 0u;
  if (p.out.k_extrema[i + 2 * plane] != 0u) {
    key = fp8_group::kNonFinite;
  } else if (p.Sk > 0) {
    key = max(amax_key(of_ordered_key(p.out.k_extrema[i]) - m), amax_key(of_ordered_key(p.out.k_extrema[i + plane]) - m));
  }
  const fp8::E4M3Scale ks = scale_of_key(fp8_group::block_max<kD>(key, partial));
  if (threadIdx.x == 0) {
    p.out.k_head[2 * bh] = ks.scale;
    p.out.k_head[2 * bh + 1] = ks.inverse;
  }
}

// The rows [lo, lo + 128) of one tile of Q or K (cluster order, through perm) minus `shift` (null:
// none): their amax gives one scale, with which the codes are written to codes (rows of 128 bytes)
// and the scale to scales[r] of each row. With `dot` (Q), the row's scale * q . mean goes to dot[r].
// With `fixed` (the head's K scale and inverse), no amax is taken.
template <typename T, bool kVec>
__device__ void quantize_tile(const Input<T>& in, int64_t b, int64_t h, int64_t lo, int64_t hi, int64_t S,
                              const int32_t* perm, const float* shift, uint8_t* codes, float* scales,
                              const float* mean, float* dot, float scale, int* flag, uint32_t* partial,
                              const float* fixed) {
  const int c = threadIdx.x % kChunks, rs = threadIdx.x / kChunks;
  float sh[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) sh[i] = shift != nullptr ? shift[8 * c + i] : 0.0f;
  float y[kPasses][8];
  uint32_t key = 0u;
#pragma unroll
  for (int j = 0; j < kPasses; ++j) {
    const int64_t r = lo + rs + kRowStep * j;
    const int64_t src = r < hi ? source_row(perm, r, S, flag) : -1;
    if (src >= 0) {
      load8<T, kVec>(in, b, h, src, c, y[j]);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (shift != nullptr) y[j][i] = y[j][i] - sh[i];
        if (fixed == nullptr) key = max(key, amax_key(y[j][i]));
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) y[j][i] = 0.0f;  // a bad entry (reported) gets zero codes
    }
  }
  const fp8::E4M3Scale s =
      fixed != nullptr ? fp8::E4M3Scale{fixed[0], fixed[1]} : scale_of_key(fp8_group::block_max<kThreads>(key, partial));
  float inverse[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) inverse[i] = s.inverse;
  float m[8];
  if (dot != nullptr) {
#pragma unroll
    for (int i = 0; i < 8; ++i) m[i] = mean[8 * c + i];
  }
#pragma unroll
  for (int j = 0; j < kPasses; ++j) {
    const int64_t r = lo + rs + kRowStep * j;
    float partial_dot = 0.0f;
    if (dot != nullptr) {
#pragma unroll
      for (int i = 0; i < 8; ++i) partial_dot = __fadd_rn(partial_dot, __fmul_rn(y[j][i], m[i]));
      // The 16 threads of the row (a half warp: xor offsets below 16 stay in it).
#pragma unroll
      for (int o = kChunks / 2; o > 0; o >>= 1) partial_dot += __shfl_xor_sync(0xffffffffu, partial_dot, o);
    }
    if (r >= hi) continue;
    reinterpret_cast<uint2*>(codes + r * kD)[c] = codes8(y[j], inverse);
    if (c == 0) {
      scales[r] = s.scale;
      if (dot != nullptr) dot[r] = __fmul_rn(scale, partial_dot);
    }
  }
}

// V's codes of the key tile [lo, hi) with the channel inverses, through shared memory into V^T in
// 16-key slots ([slot][channel][16 keys], fp8.hpp; keys of the tile's last slot past hi are zeros). The
// tile sits in shared memory as [key][128 channels] with 8-byte chunks XOR-swizzled by key / 16,
// so that the transposed byte reads of a warp (8 key chunks x 4 channels) hit 8 different banks.
template <typename T, bool kVec>
__device__ void quantize_v_tile(const Input<T>& in, int64_t b, int64_t h, int64_t bh, int64_t lo, int64_t hi,
                                const OperandParams& p, uint8_t* tile) {
  const int c = threadIdx.x % kChunks, rs = threadIdx.x / kChunks;
  float inverse[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) inverse[i] = p.out.v_inverse[bh * kD + 8 * c + i];
  const int32_t* perm = p.k_perm != nullptr ? p.k_perm + bh * p.Sk : nullptr;
#pragma unroll 2
  for (int j = 0; j < kPasses; ++j) {
    const int key = rs + kRowStep * j;
    const int64_t r = lo + key;
    // Bad entries were reported by K's tile, which read the same ones.
    const int64_t src = r < hi ? (perm != nullptr ? perm[r] : r) : -1;
    uint2 w = make_uint2(0u, 0u);
    if (src >= 0 && src < p.Sk) {
      float y[8];
      load8<T, kVec>(in, b, h, src, c, y);
      w = codes8(y, inverse);
    }
    reinterpret_cast<uint2*>(tile + key * kD)[c ^ ((key / 16) & 7)] = w;
  }
  __syncthreads();
  // Thread (channel d, key chunk q): 16 codes, one byte read per key, as one 16-byte store at
  // channel d of slot lo / 16 + q; 8 threads write a channel's 128 keys.
  uint8_t* vt = p.out.vt_codes + (bh * p.v_keys + lo) * kD;
  const int q = threadIdx.x % 8;
#pragma unroll
  for (int pass = 0; pass < kD / (kThreads / 8); ++pass) {
    const int d = threadIdx.x / 8 + (kThreads / 8) * pass;
    if (lo + 16 * q >= hi) continue;
    uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      const int key = 16 * q + k;
      const uint32_t byte = tile[key * kD + 8 * ((d / 8) ^ (key / 16 & 7)) + d % 8];
      w[k / 4] |= byte << (8 * (k % 4));
    }
    *reinterpret_cast<uint4*>(vt + 16 * (q * kD + d)) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// Pass 2: block (tile, b*h, z): z = 0 quantises a tile of Q, z = 1 a tile of K and the same keys of V.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) codes_kernel(Input<T> q, Input<T> k, Input<T> v, OperandParams p) {
  __shared__ uint32_t partial[kThreads / 32];
  __shared__ __align__(16) uint8_t tile[kTile * kD];
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * kTile;
  if (blockIdx.z == 0) {
    if (lo >= p.Sq) return;
    const int64_t hi = min_of<int64_t>(lo + kTile, p.Sq);
    const int32_t* perm = p.q_perm != nullptr ? p.q_perm + bh * p.Sq : nullptr;
    quantize_tile<T, kVec>(q, b, h, lo, hi, p.Sq, perm, nullptr, p.out.q_codes + bh * p.Sq * kD,
                           p.out.q_scale + bh * p.Sq, p.out.k_mean + bh * kD,
                           p.smooth ? p.out.lse_shift + bh * p.Sq : nullptr, p.scale, p.flag, partial, nullptr);
    return;
  }
  if (lo >= p.Sk) return;
  const int64_t hi = min_of<int64_t>(lo + kTile, p.Sk);
  const int32_t* perm = p.k_perm != nullptr ? p.k_perm + bh * p.Sk : nullptr;
  quantize_tile<T, kVec>(k, b, h, lo, hi, p.Sk, perm, p.smooth ? p.out.k_mean + bh * kD : nullptr,
                         p.out.k_codes + bh * p.Sk * kD, p.out.k_scale_rows + bh * p.v_keys, nullptr, nullptr,
                         p.scale, p.flag, partial, p.head_k ? p.out.k_head + 2 * bh : nullptr);
  quantize_v_tile<T, kVec>(v, b, h, bh, lo, hi, p, tile);
}

// Whether a tensor's rows can be read 16 bytes at a time: unit stride along D, rows and the base
// aligned to 8 elements.
bool vector_rows(const TensorView& t) {
  const auto base = reinterpret_cast<uintptr_t>(t.data);
  const int64_t width = 8 * static_cast<int64_t>(dtype_size(t.dtype));
  return t.stride[3] == 1 && base % width == 0 && t.stride[0] % 8 == 0 && t.stride[1] % 8 == 0 &&
         t.stride[2] % 8 == 0;
}

template <typename T>
Input<T> input_of(const TensorView& t) {
  Input<T> in{static_cast<const T*>(t.data), {}};
  for (int d = 0; d < 4; ++d) in.stride[d] = t.stride[d];
  return in;
}

}  // namespace

bool fused_operand_passes(const Fp8Options& options, int64_t head_dim, int64_t keys) {
  return head_dim == kD && options.q_scale == Fp8Scale::Tile && options.q_tile == kTile &&
         options.k_scale == Fp8Scale::Tile && (options.k_tile == kTile || options.k_tile >= keys) &&
         options.v_scale == Fp8Scale::Channel;
}

void quantize_operands_fused(const TensorView& q, const TensorView& k, const TensorView& v, const RowPermutation& perm,
                             float scale, bool smooth, bool head_k, const Fp8OperandBuffers& out,
                             const Stream& stream) {
  const int64_t BH = q.shape[0] * q.shape[1], Sq = q.shape[2], Sk = k.shape[2];
  if (BH == 0) return;
  const cudaStream_t cs = stream_of(stream);
  OperandParams p{};
  p.H = q.shape[1];
  p.Sq = Sq;
  p.Sk = Sk;
  p.v_keys = out.v_keys;
  p.q_perm = perm.q_perm.empty() ? nullptr : static_cast<const int32_t*>(perm.q_perm.data);
  p.k_perm = perm.k_perm.empty() ? nullptr : static_cast<const int32_t*>(perm.k_perm.data);
  p.scale = scale;
  p.smooth = smooth && Sk > 0;
  p.head_k = head_k;
  p.out = out;
  p.flag = value_error_flag();
  const int64_t n = BH * kD;
  if (p.smooth) SAPATTN_CUDA_CHECK(cudaMemsetAsync(out.k_sum, 0, static_cast<size_t>(n) * sizeof(double), cs));
  SAPATTN_CUDA_CHECK(cudaMemsetAsync(out.v_scale, 0, static_cast<size_t>(n) * sizeof(float), cs));
  if (head_k) {  // maxima 0 (below every key), minima all ones, flags 0
    const size_t plane = static_cast<size_t>(n) * sizeof(uint32_t);
    SAPATTN_CUDA_CHECK(cudaMemsetAsync(out.k_extrema, 0, plane, cs));
    SAPATTN_CUDA_CHECK(cudaMemsetAsync(out.k_extrema + n, 0xff, plane, cs));
    SAPATTN_CUDA_CHECK(cudaMemsetAsync(out.k_extrema + 2 * n, 0, plane, cs));
  }
  const bool vec = vector_rows(q) && vector_rows(k) && vector_rows(v);
  dispatch_float(q.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Input<T> qi = input_of<T>(q), ki = input_of<T>(k), vi = input_of<T>(v);
    const auto run = [&](auto vector) {
      constexpr bool kVec = decltype(vector)::value;
      if (Sk > 0) {
        stats_kernel<T, kVec>
            <<<dim3(static_cast<unsigned>(ceil_div(Sk, kStatRows)), static_cast<unsigned>(BH)), kThreads, 0, cs>>>(
                ki, vi, p);
        SAPATTN_CUDA_CHECK_LAUNCH();
      }
      finish_stats_kernel<<<static_cast<unsigned>(BH), kD, 0, cs>>>(p);
      SAPATTN_CUDA_CHECK_LAUNCH();
      const int64_t tiles = ceil_div(std::max(Sq, Sk), kTile);
      if (tiles > 0) {
        codes_kernel<T, kVec><<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(BH), 2), kThreads, 0, cs>>>(
            qi, ki, vi, p);
        SAPATTN_CUDA_CHECK_LAUNCH();
      }
    };
    vec ? run(std::true_type{}) : run(std::false_type{});
  });
}

}  // namespace sapattn::cuda
