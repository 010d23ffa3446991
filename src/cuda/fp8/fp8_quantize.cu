// quantize_e4m3 on the GPU (include/sapattn/ops.hpp, docs/fp8.md): the CPU reference's codes and
// scales bit for bit (src/cpu/fp8_quantize.cpp). Both sides compute y = x - shift and y * inverse in
// fp32 (no operation here can contract into an FMA), take scale and inverse from fp8::e4m3_scale
// (IEEE divisions: the CUDA build has no fast-math flags) and encode with fp8::e4m3_encode, the
// codec the reference uses. The amax is a maximum, so its reduction order cannot change it.
//
// The amax travels as an unsigned key (amax.cuh).
//
// Tile and Cluster: one block per (group, b*h) reduces its group's key, then writes the rows' scale
// and codes (a second read of the group's rows, from L2). Channel: scales [B,H,D] holds the column
// keys first (zeroed, then an atomicMax per block of rows and column), a second kernel encodes every
// element with its column's inverse, and a third turns the keys into scales in place: no workspace.
// The e4m3 attention's V takes the same three kernels with the codes written transposed
// (quantize_e4m3_channel_transposed, fp8/fp8.hpp).
#include <cstdint>

#include "core/fp8.hpp"
#include "cuda/fp8/amax.cuh"
#include "cuda/fp8/fp8.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda {

namespace {

using fp8_group::amax_key;
using fp8_group::scale_of_key;
using fp8_group::source_row;

constexpr int kThreads = 256;
constexpr int kChannelRows = 64;  // rows per block of the per-channel kernels (whole 16-row slots of V^T)
template <typename T>
struct QuantizeParams {
  const T* x;
  int64_t stride[4];          // x's strides, in elements
  const int32_t* perm;        // [B,H,S] or null
  const int32_t* offsets;     // [B,H,C+1] (Cluster) or null
  const float* shift;         // [B,H,D] or null
  uint8_t* codes;             // [B,H,S,D], or transposed [B*H, D, ld] (channel_codes_kernel<T, true>)
  int64_t ld;                 // the transposed codes' row length
  float* scales;              // [B,H,S] or [B,H,D]
  int64_t H, S, D, clusters;  // clusters: C (Cluster)
  int tile;                   // rows per group (Tile)
  int* flag;                  // value-check flag
};

// y of result row r (of head bh), column d, as fp32: x[b,h,perm[r],d] - shift[d]. `src` is the row
// of x already resolved through perm.
template <typename T>
__device__ __forceinline__ float shifted(const QuantizeParams<T>& p, const T* head, const float* shift, int64_t src,
                                         int64_t d) {
  const float v = to_f32(head[src * p.stride[2] + d * p.stride[3]]);
  return shift != nullptr ? v - shift[d] : v;
}

// Tile and Cluster: block (g, bh) quantises the rows [lo, hi) of group g of head bh.
template <typename T, bool kByCluster>
__global__ void __launch_bounds__(kThreads) quantize_groups_kernel(QuantizeParams<T> p) {
  __shared__ uint32_t partial[kThreads / 32];
  const int64_t g = blockIdx.x, bh = blockIdx.y;
  const int64_t b = bh / p.H, h = bh % p.H;
  int64_t lo, hi;
  if constexpr (kByCluster) {
    const int32_t* off = p.offsets + bh * (p.clusters + 1);
    lo = off[g];
    hi = off[g + 1];
    const bool bad = lo < 0 || hi < lo || hi > p.S || (g == 0 && lo != 0) || (g == p.clusters - 1 && hi != p.S);
    if (bad) {
      if (threadIdx.x == 0) atomicOr(p.flag, kBadOffsets);
      return;  // the whole block: no thread has reached a barrier
    }
  } else {
    lo = g * p.tile;
    hi = min_of<int64_t>(lo + p.tile, p.S);
  }
  const T* head = p.x + b * p.stride[0] + h * p.stride[1];
  const int32_t* perm = p.perm != nullptr ? p.perm + bh * p.S : nullptr;
  const float* shift = p.shift != nullptr ? p.shift + bh * p.D : nullptr;
  const int64_t count = (hi - lo) * p.D;  // < 2^31 (checked on the host), yet int64 for the products

  uint32_t key = 0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) {
    const int64_t r = lo + i / p.D, d = i % p.D;
    const int64_t src = source_row(perm, r, p.S, p.flag);
    if (src >= 0) key = max(key, amax_key(shifted(p, head, shift, src, d)));
  }
  const fp8::E4M3Scale s = scale_of_key(fp8_group::block_max<kThreads>(key, partial));

  for (int64_t r = lo + threadIdx.x; r < hi; r += kThreads) p.scales[bh * p.S + r] = s.scale;
  uint8_t* codes = p.codes + (bh * p.S + lo) * p.D;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) {
    const int64_t src = perm != nullptr ? perm[lo + i / p.D] : lo + i / p.D;
    // A bad entry was reported above; its codes are left unwritten (outputs are unspecified then).
    if (src >= 0 && src < p.S) codes[i] = fp8::e4m3_encode(shifted(p, head, shift, src, i % p.D) * s.inverse);
  }
}

// Channel, pass 1: the column keys of a block of kChannelRows rows, max-ed into scales (as keys).
template <typename T>
__global__ void __launch_bounds__(kThreads) channel_amax_kernel(QuantizeParams<T> p) {
  extern __shared__ uint32_t column_key[];  // [D]
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  for (int64_t d = threadIdx.x; d < p.D; d += kThreads) column_key[d] = 0u;
  __syncthreads();
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * kChannelRows, hi = min_of<int64_t>(lo + kChannelRows, p.S);
  const T* head = p.x + b * p.stride[0] + h * p.stride[1];
  const int32_t* perm = p.perm != nullptr ? p.perm + bh * p.S : nullptr;
  const float* shift = p.shift != nullptr ? p.shift + bh * p.D : nullptr;
  for (int64_t i = threadIdx.x; i < (hi - lo) * p.D; i += kThreads) {
    const int64_t src = source_row(perm, lo + i / p.D, p.S, p.flag);
    const int64_t d = i % p.D;
    if (src >= 0) atomicMax(&column_key[d], amax_key(shifted(p, head, shift, src, d)));
  }
  __syncthreads();
  auto* keys = reinterpret_cast<uint32_t*>(p.scales) + bh * p.D;
  for (int64_t d = threadIdx.x; d < p.D; d += kThreads)
    if (column_key[d] != 0u) atomicMax(&keys[d], column_key[d]);
}

// Channel, pass 2: every element of a block of rows encoded with its column's inverse. kTransposed
// (the e4m3 attention's V^T): the block's codes go to shared memory as [rows][D] first and are then
// written out in 16-row slots, [slot][D][16] (fp8.hpp), the last slot's rows past S as zeros.
template <typename T, bool kTransposed>
__global__ void __launch_bounds__(kThreads) channel_codes_kernel(QuantizeParams<T> p) {
  extern __shared__ float column_inverse[];  // [D] (then, transposed, the block's codes [kChannelRows][D])
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const auto* keys = reinterpret_cast<const uint32_t*>(p.scales) + bh * p.D;
  for (int64_t d = threadIdx.x; d < p.D; d += kThreads) column_inverse[d] = scale_of_key(keys[d]).inverse;
  __syncthreads();
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * kChannelRows, hi = min_of<int64_t>(lo + kChannelRows, p.S);
  const T* head = p.x + b * p.stride[0] + h * p.stride[1];
  const int32_t* perm = p.perm != nullptr ? p.perm + bh * p.S : nullptr;
  const float* shift = p.shift != nullptr ? p.shift + bh * p.D : nullptr;
  uint8_t* codes = kTransposed ? reinterpret_cast<uint8_t*>(column_inverse + p.D) : p.codes + (bh * p.S + lo) * p.D;
  for (int64_t i = threadIdx.x; i < (hi - lo) * p.D; i += kThreads) {
    const int64_t r = lo + i / p.D, d = i % p.D;
    const int64_t src = perm != nullptr ? perm[r] : r;
    // A bad entry was reported by pass 1; its codes are left unwritten (zeros when transposed).
    if (src >= 0 && src < p.S) {
      codes[i] = fp8::e4m3_encode(shifted(p, head, shift, src, d) * column_inverse[d]);
    } else if (kTransposed) {
      codes[i] = 0;
    }
  }
  if constexpr (kTransposed) {
    __syncthreads();
    uint8_t* out = p.codes + (bh * p.ld + lo) * p.D;  // slot lo / 16 of the head (kChannelRows % 16 == 0)
    const int64_t rows = hi - lo, slot_rows = (rows + 15) / 16 * 16;
    for (int64_t i = threadIdx.x; i < slot_rows * p.D; i += kThreads) {
      const int64_t slot = i / (16 * p.D), d = i / 16 % p.D, r = 16 * slot + i % 16;
      out[i] = r < rows ? codes[r * p.D + d] : uint8_t{0};
    }
  }
}

// Channel, pass 3: the column keys become the scales, in place.
__global__ void channel_scales_kernel(float* scales, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) scales[i] = scale_of_key(__float_as_uint(scales[i])).scale;
}

// The three per-channel passes, pass 2 writing the codes as the launcher says.
template <typename T, typename Codes>
void quantize_channels(const QuantizeParams<T>& p, int64_t heads, const Stream& stream, Codes&& launch_codes) {
  const cudaStream_t s = stream_of(stream);
  SAPATTN_CUDA_CHECK(cudaMemsetAsync(p.scales, 0, static_cast<size_t>(heads * p.D) * sizeof(float), s));
  const dim3 grid(static_cast<unsigned>(ceil_div(p.S, kChannelRows)), static_cast<unsigned>(heads));
  if (p.S > 0) {
    channel_amax_kernel<T><<<grid, kThreads, static_cast<size_t>(p.D) * 4, s>>>(p);
    SAPATTN_CUDA_CHECK_LAUNCH();
    launch_codes(grid, s);
  }
  // Zeroed keys (S = 0) become scale 0, as the CPU's amax of no rows.
  const int64_t n = heads * p.D;
  channel_scales_kernel<<<static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0, s>>>(p.scales, n);
  SAPATTN_CUDA_CHECK_LAUNCH();
}

template <typename T>
QuantizeParams<T> quantize_params(const TensorView& x, const TensorView& perm, uint8_t* codes, float* scales) {
  QuantizeParams<T> p{};
  p.x = static_cast<const T*>(x.data);
  for (int d = 0; d < 4; ++d) p.stride[d] = x.stride[d];
  p.perm = perm.empty() ? nullptr : static_cast<const int32_t*>(perm.data);
  p.codes = codes;
  p.scales = scales;
  p.H = x.shape[1];
  p.S = x.shape[2];
  p.D = x.shape[3];
  p.flag = value_error_flag();
  return p;
}

}  // namespace

void quantize_e4m3_channel_transposed(const TensorView& x, const TensorView& perm, uint8_t* codes_t, int64_t ld,
                                      float* scales, const Stream& stream) {
  const int64_t B = x.shape[0], H = x.shape[1], S = x.shape[2], D = x.shape[3];
  SAPATTN_CHECK(B * H <= 65535 && D <= 256 && ld >= S && ld % 16 == 0, UnsupportedError,
                "the transposed e4m3 quantisation takes at most 65535 (b,h) pairs, head dims up to 256 and "
                "rows of a multiple of 16 keys, got ",
                x.describe(), " with rows of ", ld);
  if (B * H == 0 || D == 0) return;
  const DeviceGuard guard(stream.device);
  const bool checked = !perm.empty() && begin_value_check(stream);
  dispatch_float(x.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    QuantizeParams<T> p = quantize_params<T>(x, perm, codes_t, scales);
    p.ld = ld;
    const size_t smem = static_cast<size_t>(D) * 4 + static_cast<size_t>(kChannelRows * D);
    quantize_channels(p, B * H, stream, [&](dim3 grid, cudaStream_t s) {
      channel_codes_kernel<T, true><<<grid, kThreads, smem, s>>>(p);
      SAPATTN_CUDA_CHECK_LAUNCH();
    });
  });
  if (checked) end_value_check(stream, "quantize_e4m3 (V transposed)");
}

void quantize_e4m3(const TensorView& x, const TensorView& perm, const TensorView& offsets, const TensorView& shift,
                   Fp8Scale granularity, int tile_rows, TensorView codes, TensorView scales, const Stream& stream) {
  const int64_t B = x.shape[0], H = x.shape[1], S = x.shape[2], D = x.shape[3];
  SAPATTN_CHECK(B * H <= 65535, UnsupportedError, "quantize_e4m3 on CUDA takes at most 65535 (b,h) pairs, got ",
                x.describe());
  SAPATTN_CHECK(S * D < (int64_t{1} << 31), UnsupportedError, "quantize_e4m3 on CUDA takes fewer than 2^31 ",
                "elements per (b,h), got ", x.describe());
  const bool per_channel = granularity == Fp8Scale::Channel, by_cluster = granularity == Fp8Scale::Cluster;
  const int64_t C = by_cluster ? offsets.shape[2] - 1 : 0;
  // The per-channel kernels keep one word per column in shared memory.
  SAPATTN_CHECK(!per_channel || D * 4 <= 48 * 1024, UnsupportedError,
                "quantize_e4m3 on CUDA takes head dims up to 12288 per channel, got ", x.describe());
  // Tile and Cluster (tile_rows is not checked for the other granularities).
  const int64_t groups = by_cluster ? C : per_channel ? 0 : ceil_div(S, tile_rows);
  SAPATTN_CHECK(per_channel || groups < (int64_t{1} << 31), UnsupportedError,
                "quantize_e4m3 on CUDA takes fewer than 2^31 groups per (b,h), got ", groups);
  if (B * H == 0 || (!per_channel && S == 0)) return;
  const DeviceGuard guard(stream.device);
  const cudaStream_t s = stream_of(stream);
  const bool checked = (!perm.empty() || by_cluster) && begin_value_check(stream);
  dispatch_float(x.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    QuantizeParams<T> p =
        quantize_params<T>(x, perm, static_cast<uint8_t*>(codes.data), static_cast<float*>(scales.data));
    p.offsets = by_cluster ? static_cast<const int32_t*>(offsets.data) : nullptr;
    p.shift = shift.empty() ? nullptr : static_cast<const float*>(shift.data);
    p.clusters = C;
    p.tile = tile_rows;
    const unsigned heads = static_cast<unsigned>(B * H);
    if (per_channel) {
      if (D == 0) return;
      quantize_channels(p, B * H, stream, [&](dim3 grid, cudaStream_t stream_) {
        channel_codes_kernel<T, false><<<grid, kThreads, static_cast<size_t>(D) * 4, stream_>>>(p);
        SAPATTN_CUDA_CHECK_LAUNCH();
      });
      return;
    }
    const dim3 grid(static_cast<unsigned>(groups), heads);
    if (by_cluster) {
      quantize_groups_kernel<T, true><<<grid, kThreads, 0, s>>>(p);
    } else {
      quantize_groups_kernel<T, false><<<grid, kThreads, 0, s>>>(p);
    }
    SAPATTN_CUDA_CHECK_LAUNCH();
  });
  if (checked) end_value_check(stream, "quantize_e4m3");
}

}  // namespace sapattn::cuda
