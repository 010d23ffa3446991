// Permutation on the GPU: the label sort (shared with the k-means update), cluster_permutation,
// label_text_tokens, and the row gathers/scatters that move Q, K, V into cluster order and O back.
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <bit>

#include "cuda/permute/label_sort.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda {

namespace {

constexpr int kThreads = 256;

// ---------------------------------------------------------------------------------------------
// Label sort
// ---------------------------------------------------------------------------------------------

__global__ void label_keys_kernel(LabelsView labels, uint32_t clusters, uint32_t* __restrict__ keys,
                                  int32_t* __restrict__ index, int* __restrict__ flag) {
  const int64_t bh = blockIdx.y;
  const int64_t b = bh / labels.H, h = bh % labels.H;
  const int32_t* lab = labels.data + b * labels.stride_b + h * labels.stride_h;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < labels.N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t l = lab[i];
    uint32_t bucket = static_cast<uint32_t>(l);
    if (l < 0 || static_cast<uint32_t>(l) >= clusters) {
      bucket = clusters;  // the trash bucket after the last cluster
      atomicOr(flag, kBadLabel);
    }
    keys[bh * labels.N + i] = static_cast<uint32_t>(bh) * (clusters + 1) + bucket;
    index[bh * labels.N + i] = static_cast<int32_t>(i);
  }
}

// One thread per (bh, c <= C): a binary search for the first key >= (bh, c) in the sorted keys of bh.
__global__ void label_offsets_kernel(const uint32_t* __restrict__ keys, int64_t batch_heads, int64_t N,
                                     uint32_t clusters, int32_t* __restrict__ offsets, int32_t* __restrict__ sizes) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= batch_heads * (clusters + 1)) return;
  const int64_t bh = t / (clusters + 1), c = t % (clusters + 1);
  const uint32_t target = static_cast<uint32_t>(bh) * (clusters + 1) + static_cast<uint32_t>(c);
  const uint32_t* k = keys + bh * N;
  int64_t lo = 0, hi = N;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (k[mid] < target)
      lo = mid + 1;
    else
      hi = mid;
  }
  offsets[t] = static_cast<int32_t>(lo);
  if (sizes != nullptr && c < clusters) {
    int64_t lo2 = lo, hi2 = N;  // first key >= target + 1
    while (lo2 < hi2) {
      const int64_t mid = (lo2 + hi2) / 2;
      if (k[mid] <= target)
        lo2 = mid + 1;
      else
        hi2 = mid;
    }
    sizes[bh * clusters + c] = static_cast<int32_t>(lo2 - lo);
  }
}

// ---------------------------------------------------------------------------------------------
// Text labels
// ---------------------------------------------------------------------------------------------

__global__ void label_text_kernel(int32_t* __restrict__ labels, int64_t S, int64_t video, int64_t prompt_end,
                                  int32_t prompt_label) {
  const int64_t bh = blockIdx.y;
  const int64_t s = video + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s < S) labels[bh * S + s] = s < prompt_end ? prompt_label : prompt_label + 1;
}

// ---------------------------------------------------------------------------------------------
// Row moves: out[dst(j)] = x[src(j)], where one of src, dst is perm[j] and the other j.
// ---------------------------------------------------------------------------------------------

struct MoveRowsParams {
  const char* src;
  char* dst;
  const int32_t* perm;  // [B*H, N]
  int64_t H, N, D;
  int64_t src_stride[4], dst_stride[4];  // elements
  uint32_t chunks_per_row;               // D / VEC
  int* flag;
};

template <int BYTES>
struct alignas(BYTES) Raw {
  unsigned char b[BYTES];
};

constexpr int kMoveUnroll = 4;  // chunks per thread, all loads issued before the first store (8 measured
                                // 1.7x slower: 158 registers, one block per SM)

// VEC elements per chunk; VEC > 1 only with unit stride along d on both sides, VEC | D and every
// chunk aligned to its width (checked on the host), so each chunk is one vector load and store.
// One (b,h) per blockIdx.y. (Numbering blocks head-fastest, so that all heads are in flight, made
// no measurable difference on the H100, with [B,S,H,D] or [B,H,S,D] memory.)
template <typename Tin, typename Tout, int VEC, bool kGather>
__global__ void __launch_bounds__(kThreads) move_rows_kernel(MoveRowsParams p) {
  const int64_t bh = blockIdx.y;
  const uint32_t piece = blockIdx.x;
  const int64_t b = bh / p.H, h = bh % p.H;
  const char* src = p.src + (b * p.src_stride[0] + h * p.src_stride[1]) * static_cast<int64_t>(sizeof(Tin));
  char* dst = p.dst + (b * p.dst_stride[0] + h * p.dst_stride[1]) * static_cast<int64_t>(sizeof(Tout));
  const int32_t* perm = p.perm + bh * p.N;
  const uint32_t total = static_cast<uint32_t>(p.N) * p.chunks_per_row;
  const uint32_t first = piece * (kThreads * kMoveUnroll) + threadIdx.x;

  using InChunk = Raw<VEC * sizeof(Tin)>;
  using OutChunk = Raw<VEC * sizeof(Tout)>;
  InChunk v[kMoveUnroll];
  int64_t dst_off[kMoveUnroll];
  bool live[kMoveUnroll];
#pragma unroll
  for (int u = 0; u < kMoveUnroll; ++u) {
    const uint32_t t = first + u * kThreads;
    live[u] = t < total;
    dst_off[u] = 0;
    if (!live[u]) continue;
    const uint32_t j = t / p.chunks_per_row, k = t % p.chunks_per_row;
    const int32_t q = __ldg(perm + j);
    if (q < 0 || q >= p.N) {
      atomicOr(p.flag, kBadPermIndex);
      live[u] = false;
      continue;
    }
    const int64_t src_row = kGather ? q : j, dst_row = kGather ? j : q;
    const int64_t d0 = static_cast<int64_t>(k) * VEC;
    const char* s = src + (src_row * p.src_stride[2] + d0 * p.src_stride[3]) * static_cast<int64_t>(sizeof(Tin));
    dst_off[u] = (dst_row * p.dst_stride[2] + d0 * p.dst_stride[3]) * static_cast<int64_t>(sizeof(Tout));
    v[u] = *reinterpret_cast<const InChunk*>(s);
  }
#pragma unroll
  for (int u = 0; u < kMoveUnroll; ++u) {
    if (!live[u]) continue;
    if constexpr (std::is_same_v<Tin, Tout>) {
      *reinterpret_cast<OutChunk*>(dst + dst_off[u]) = v[u];
    } else {
      OutChunk o;
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        reinterpret_cast<Tout*>(o.b)[e] = from_f32<Tout>(to_f32(reinterpret_cast<const Tin*>(v[u].b)[e]));
      *reinterpret_cast<OutChunk*>(dst + dst_off[u]) = o;
    }
  }
}

// Whether a view's rows can be moved in aligned chunks of `vec` elements.
bool chunkable(const TensorView& t, int64_t vec) {
  if (vec <= 1) return true;
  const int64_t bytes = vec * static_cast<int64_t>(dtype_size(t.dtype));
  if (t.stride[3] != 1 || t.shape[3] % vec != 0) return false;
  if (reinterpret_cast<uintptr_t>(t.data) % bytes != 0) return false;
  for (int d = 0; d < 3; ++d)
    if (t.shape[d] > 1 && t.stride[d] % vec != 0) return false;
  return true;
}

template <bool kGather>
void move_rows(const TensorView& x, const TensorView& perm, TensorView out, const Stream& stream) {
  const int64_t B = x.shape[0], H = x.shape[1], N = x.shape[2], D = x.shape[3];
  if (B * H * N * D == 0) return;
  SAPATTN_CHECK(N * D < (int64_t{1} << 31), UnsupportedError, "gather/scatter on CUDA take fewer than 2^31 ",
                "elements per (b,h), got ", x.describe());
  SAPATTN_CHECK(B * H <= 65535, UnsupportedError, "gather/scatter on CUDA take at most 65535 (b,h) pairs, got ",
                x.describe());
  const DeviceGuard guard(stream.device);
  const bool checked = begin_value_check(stream);
  MoveRowsParams p{};
  p.src = static_cast<const char*>(x.data);
  p.dst = static_cast<char*>(out.data);
  p.perm = static_cast<const int32_t*>(perm.data);
  p.H = H;
  p.N = N;
  p.D = D;
  for (int d = 0; d < 4; ++d) {
    p.src_stride[d] = x.stride[d];
    p.dst_stride[d] = out.stride[d];
  }
  p.flag = value_error_flag();
  dispatch_float(x.dtype, [&](auto tin) {
    dispatch_float(out.dtype, [&](auto tout) {
      using Tin = typename decltype(tin)::type;
      using Tout = typename decltype(tout)::type;
      constexpr int kVec = 16 / static_cast<int>(std::max(sizeof(Tin), sizeof(Tout)));
      const bool vec = chunkable(x, kVec) && chunkable(out, kVec);
      p.chunks_per_row = static_cast<uint32_t>(vec ? D / kVec : D);
      const dim3 grid(static_cast<unsigned>(ceil_div(N * p.chunks_per_row, kThreads * kMoveUnroll)),
                      static_cast<unsigned>(B * H));
      if (vec) {
        move_rows_kernel<Tin, Tout, kVec, kGather><<<grid, kThreads, 0, stream_of(stream)>>>(p);
      } else {
        move_rows_kernel<Tin, Tout, 1, kGather><<<grid, kThreads, 0, stream_of(stream)>>>(p);
      }
      SAPATTN_CUDA_CHECK_LAUNCH();
    });
  });
  if (checked) end_value_check(stream, kGather ? "gather_rows" : "scatter_rows");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Label sort (label_sort.hpp)
// ---------------------------------------------------------------------------------------------

LabelSort carve_label_sort(Carver& carver, int64_t batch_heads, int64_t tokens, int64_t clusters, int32_t* index_out) {
  LabelSort s;
  s.batch_heads = batch_heads;
  s.tokens = tokens;
  s.clusters = clusters;
  const int64_t items = batch_heads * tokens;
  const int64_t max_key = batch_heads * (clusters + 1);  // keys lie in [0, max_key)
  SAPATTN_CHECK(max_key <= (int64_t{1} << 32) && items < (int64_t{1} << 31), UnsupportedError, "sorting ", batch_heads,
                " x ", tokens, " tokens into ", clusters, " clusters exceeds the 32-bit keys of the CUDA label sort");
  s.end_bit = std::max(1, static_cast<int>(std::bit_width(static_cast<uint64_t>(std::max<int64_t>(max_key - 1, 1)))));
  s.keys_in = carver.take<uint32_t>(items);
  s.keys_out = carver.take<uint32_t>(items);
  s.index_in = carver.take<int32_t>(items);
  s.index_out = index_out != nullptr ? index_out : carver.take<int32_t>(items);
  // The query only computes sizes (no launch, no pointer dereference).
  SAPATTN_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, s.temp_bytes, s.keys_in, s.keys_out, s.index_in,
                                                     s.index_out, static_cast<int>(items), 0, s.end_bit));
  s.temp = carver.take_bytes(s.temp_bytes);
  return s;
}

void sort_by_label(const LabelSort& s, const LabelsView& labels, cudaStream_t stream) {
  if (s.batch_heads * s.tokens == 0) return;
  SAPATTN_CHECK(s.batch_heads <= 65535, UnsupportedError, "the CUDA label sort takes at most 65535 (b,h) pairs");
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(s.tokens, kThreads), 4096)),
                  static_cast<unsigned>(s.batch_heads));
  label_keys_kernel<<<grid, kThreads, 0, stream>>>(labels, static_cast<uint32_t>(s.clusters), s.keys_in, s.index_in,
                                                   value_error_flag());
  SAPATTN_CUDA_CHECK_LAUNCH();
  size_t temp_bytes = s.temp_bytes;
  SAPATTN_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(s.temp, temp_bytes, s.keys_in, s.keys_out, s.index_in, s.index_out,
                                                     static_cast<int>(s.batch_heads * s.tokens), 0, s.end_bit, stream));
}

void label_offsets(const LabelSort& s, int32_t* offsets, int32_t* sizes, cudaStream_t stream) {
  const int64_t n = s.batch_heads * (s.clusters + 1);
  if (n == 0) return;
  label_offsets_kernel<<<static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0, stream>>>(
      s.keys_out, s.batch_heads, s.tokens, static_cast<uint32_t>(s.clusters), offsets, sizes);
  SAPATTN_CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

size_t cluster_permutation_workspace_bytes(int64_t batch_heads, int64_t tokens, int num_clusters) {
  Carver carver("cluster_permutation");
  int32_t placeholder = 0;  // perm is the caller's: only the other buffers count
  carve_label_sort(carver, batch_heads, tokens, std::max(num_clusters, 1), &placeholder);
  return carver.used();
}

void cluster_permutation(const TensorView& labels, int num_clusters, TensorView perm, TensorView offsets,
                         const Stream& stream, Workspace workspace) {
  const int64_t B = labels.shape[0], H = labels.shape[1], N = labels.shape[2];
  const DeviceGuard guard(stream.device);
  Carver carver("cluster_permutation", workspace);
  const LabelSort sort = carve_label_sort(carver, B * H, N, num_clusters, static_cast<int32_t*>(perm.data));
  carver.check();
  const bool checked = begin_value_check(stream);
  const LabelsView view{static_cast<const int32_t*>(labels.data), labels.stride[0], labels.stride[1], B, H, N};
  sort_by_label(sort, view, stream_of(stream));
  label_offsets(sort, static_cast<int32_t*>(offsets.data), nullptr, stream_of(stream));
  if (checked) end_value_check(stream, "cluster_permutation");
}

void label_text_tokens(TensorView labels, int64_t video_tokens, int64_t prompt_length, int prompt_label,
                       const Stream& stream) {
  const int64_t B = labels.shape[0], H = labels.shape[1], S = labels.shape[2];
  const int64_t text = S - video_tokens;
  if (B * H * text == 0) return;
  SAPATTN_CHECK(B * H <= 65535, UnsupportedError, "label_text_tokens on CUDA takes at most 65535 (b,h) pairs");
  const DeviceGuard guard(stream.device);
  const dim3 grid(static_cast<unsigned>(ceil_div(text, kThreads)), static_cast<unsigned>(B * H));
  label_text_kernel<<<grid, kThreads, 0, stream_of(stream)>>>(static_cast<int32_t*>(labels.data), S, video_tokens,
                                                              video_tokens + prompt_length, prompt_label);
  SAPATTN_CUDA_CHECK_LAUNCH();
}

void gather_rows(const TensorView& x, const TensorView& perm, TensorView out, const Stream& stream) {
  move_rows<true>(x, perm, out, stream);
}

void scatter_rows(const TensorView& y, const TensorView& perm, TensorView out, const Stream& stream) {
  move_rows<false>(y, perm, out, stream);
}

}  // namespace sapattn::cuda
