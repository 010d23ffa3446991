// SVG-EAR on the GPU (docs/ear.md): value centroids, SVG2's centroid weights, the error probe, the
// error-aware routing, the density budget and the centroid compensation. Every op is a fixed
// sequence of launches on the caller's stream, takes its scratch from the caller's workspace and
// is deterministic: reductions run in a fixed order, and the only atomics are integer ORs into the
// value-check flag.
//
// Numerics against the CPU backend (the tests' tolerances, docs/ear.md "The CUDA backend"):
// - cluster_means is kmeans_update's mean (fp64 sums in another order): <= 1 fp32 ulp.
// - centroid_probs repeats the CPU's arithmetic step by step, as select_blocks does: bit-identical.
// - ear_probe computes the logits exactly as the CPU does (8-lane fp32 dot product, no FMA), the
//   per-token value statistics in the same fp64 order, and sums tokens in fp64 in another order: the
//   scores differ by the fp64 rounding of E times its cancellation, plus an fp32 rounding.
// - select_error_aware and select_top_p_at_density rank and count exactly (integer areas): their
//   masks are bit-identical for the same inputs.
// - centroid_compensation accumulates in fp32 (FMA) instead of fp64: relative errors ~1e-6.
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cfloat>
#include <cmath>

#include "cuda/device.cuh"
#include "cuda/label_sort.hpp"

namespace sapattn::cuda {

namespace {

constexpr int kThreads = 256;
constexpr double kProbeEps = 1e-8;  // the published probe's floor on errors and areas

LabelsView labels_view(const TensorView& t) {
  return {static_cast<const int32_t*>(t.data), t.stride[0], t.stride[1], t.shape[0], t.shape[1], t.shape[2]};
}

// A [B,H,R,C] (or [B,H,S,D]) view's data and element strides, as kernels take them.
template <typename T>
struct Strided4 {
  T* data = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  __device__ T& at(int64_t b, int64_t h, int64_t r, int64_t c) const { return data[b * s0 + h * s1 + r * s2 + c * s3]; }
};

template <typename T>
Strided4<T> strided(const TensorView& t) {
  return {static_cast<T*>(t.data), t.stride[0], t.stride[1], t.stride[2], t.stride[3]};
}

// Clusters sizes are non-negative by contract; a negative one counts as 0 and raises kBadSize.
__device__ __forceinline__ int64_t checked_size(int32_t n, int* flag) {
  if (n < 0) {
    atomicOr(flag, kBadSize);
    return 0;
  }
  return n;
}

// ---------------------------------------------------------------------------------------------
// Ranking a row: ascending order of these keys = descending order of the floats, with -0 == +0
// (the CPU compares with >, under which they tie) and, with kNanLast, NaN ranked as -inf.
// ---------------------------------------------------------------------------------------------

template <bool kNanLast>
__device__ __forceinline__ uint32_t descending_key(float f) {
  if (f == 0.0f) f = 0.0f;
  if (kNanLast && isnan(f)) f = -INFINITY;
  const uint32_t u = __float_as_uint(f);
  const uint32_t ascending = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~ascending;
}

__device__ __forceinline__ float key_value(uint32_t key) {
  const uint32_t ascending = ~key;
  return __uint_as_float((ascending & 0x80000000u) ? (ascending & 0x7fffffffu) : ~ascending);
}

// One block ranks one row of up to kThreads * kItems columns with a stable radix sort of
// (key, column): ties keep the lower column first. Column capacities 1024 .. 8192.
template <int kItems>
struct RowRank {
  static constexpr int kCapacity = kThreads * kItems;
  using Sort = cub::BlockRadixSort<uint32_t, kThreads, kItems, uint16_t>;
  using Scan = cub::BlockScan<long long, kThreads>;
  using Reduce = cub::BlockReduce<long long, kThreads>;
};

// Loads row r of a [B,H,R,C] f32 view into blocked keys (thread t holds columns t*kItems + i);
// columns past C sort last.
template <int kItems, bool kNanLast>
__device__ void load_row_keys(const Strided4<const float>& m, int64_t b, int64_t h, int64_t r, int64_t C,
                              uint32_t (&keys)[kItems], uint16_t (&cols)[kItems]) {
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t j = static_cast<int64_t>(threadIdx.x) * kItems + i;
    keys[i] = j < C ? descending_key<kNanLast>(m.at(b, h, r, j)) : 0xffffffffu;
    cols[i] = static_cast<uint16_t>(j);
  }
}

// Calls f(kItems tag) with the smallest capacity that holds C columns.
template <typename F>
void dispatch_capacity(int64_t C, F&& f) {
  if (C <= 1024) {
    f(std::integral_constant<int, 4>{});
  } else if (C <= 2048) {
    f(std::integral_constant<int, 8>{});
  } else if (C <= 4096) {
    f(std::integral_constant<int, 16>{});
  } else {
    f(std::integral_constant<int, 32>{});
  }
}

// ---------------------------------------------------------------------------------------------
// centroid_probs: select_blocks' weights, with the CPU's arithmetic (see select.cu): fp32 dot
// products in order of d without FMA, exp in double rounded once, a sequential fp32 row total in
// column order, one correctly rounded division. The raw scores go through `probs` itself.
// ---------------------------------------------------------------------------------------------

constexpr int kProbRows = 8;  // query-centroid rows per block: one warp per row for the softmax

__global__ void __launch_bounds__(kThreads)
    centroid_probs_kernel(const float* __restrict__ q_centroids, const float* __restrict__ k_centroids,
                          const int32_t* __restrict__ k_sizes, int64_t H, int64_t Cq, int64_t Ck, int64_t D,
                          float scale, Strided4<float> probs, int* flag) {
  extern __shared__ float q_rows[];  // [kProbRows][D]
  const int64_t bh = blockIdx.y, b = bh / H, h = bh % H;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kProbRows;
  const int rows = static_cast<int>(min_of<int64_t>(kProbRows, Cq - row0));
  const float* cq = q_centroids + (bh * Cq + row0) * D;
  const float* ck = k_centroids + bh * Ck * D;
  const int32_t* size = k_sizes + bh * Ck;
  for (int64_t t = threadIdx.x; t < rows * D; t += kThreads) q_rows[t] = cq[t];
  __syncthreads();
  for (int64_t j = threadIdx.x; j < Ck; j += kThreads) {
    float acc[kProbRows];
#pragma unroll
    for (int r = 0; r < kProbRows; ++r) acc[r] = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      const float kv = ck[j * D + d];
#pragma unroll
      for (int r = 0; r < kProbRows; ++r)
        if (r < rows) acc[r] = __fadd_rn(acc[r], __fmul_rn(q_rows[r * D + d], kv));
    }
#pragma unroll
    for (int r = 0; r < kProbRows; ++r)
      if (r < rows) probs.at(b, h, row0 + r, j) = __fmul_rn(acc[r], scale);
  }
  __syncthreads();  // the scores are visible to the whole block
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp >= rows) return;
  const int64_t r = row0 + warp;
  float m = -INFINITY;
  for (int64_t j = lane; j < Ck; j += 32)
    if (checked_size(size[j], flag) > 0) m = fmaxf(m, probs.at(b, h, r, j));
#pragma unroll
  for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (m == -INFINITY) {  // every key cluster is empty: the row is all zero
    for (int64_t j = lane; j < Ck; j += 32) probs.at(b, h, r, j) = 0.0f;
    return;
  }
  for (int64_t j = lane; j < Ck; j += 32) {
    const int32_t n = size[j];
    const float e = static_cast<float>(exp(static_cast<double>(__fsub_rn(probs.at(b, h, r, j), m))));
    probs.at(b, h, r, j) = n > 0 ? __fmul_rn(static_cast<float>(n), e) : 0.0f;
  }
  __syncwarp();
  float total = 0.0f;
  if (lane == 0)
    for (int64_t j = 0; j < Ck; ++j) total = __fadd_rn(total, probs.at(b, h, r, j));
  total = __shfl_sync(0xffffffffu, total, 0);
  for (int64_t j = lane; j < Ck; j += 32) probs.at(b, h, r, j) = __fdiv_rn(probs.at(b, h, r, j), total);
}

// ---------------------------------------------------------------------------------------------
// ear_probe. The key tokens are sorted by cluster (the label sort of the k-means update); per
// sorted token, |v_t|^2 and vbar . v_t in fp64 in order of d (the CPU's sums); per value centroid,
// |vbar|^2. Then one block per (32 query centroids, 8 key clusters, (b,h)): lane l of every warp
// owns query centroid a0 + l, warp w the tokens w, w + 8, ... of each tile of 64 tokens. Each
// thread keeps the CPU's running-max state (m, sum exp(2(s-m)) |v|^2, sum exp(s-m) vbar.v) over its
// tokens; the 8 warps' states merge in warp order.
// ---------------------------------------------------------------------------------------------

constexpr int kProbeCentroids = 32;                    // query centroids per block (one per lane)
constexpr int kProbeWarps = kThreads / 32;             // token slots per tile row
constexpr int kProbeSlots = 8;                         // tokens per warp per tile
constexpr int kProbeTile = kProbeWarps * kProbeSlots;  // 64 tokens staged at a time
constexpr int kProbeClusters = 8;                      // key clusters per block (amortises the q tile)
constexpr int64_t kMaxProbeDim = 256;                  // head dims ear_probe takes (shared memory)

// Row stride of the staged fp32 rows: a multiple of 4 floats (float4 reads) with stride/4 odd, so
// that 8 lanes reading float4s of 8 different rows hit 8 different bank groups.
constexpr int64_t probe_stride(int64_t D) { return (D + 7) / 8 * 8 + 4; }

struct ProbeParams {
  const float* q_centroids;  // [BH, Cq, D]
  const float* k_centroids;  // [BH, Ck, D]
  const float* v_centroids;  // [BH, Ck, D]
  const void* k;             // [B,H,N,D] any strides
  const void* v;
  int64_t k_stride[4], v_stride[4];
  const int32_t* labels;  // k_labels, unit stride along N
  int64_t l_stride_b, l_stride_h;
  const int32_t* q_sizes;  // [BH, Cq]
  const int32_t* k_sizes;  // [BH, Ck]
  const int32_t* order;    // [BH, N]: token indices sorted by cluster
  const int32_t* offsets;  // [BH, Ck+1]
  double2* token_stats;    // [BH, N] in sorted order: (|v_t|^2, vbar_label(t) . v_t)
  double* centroid_norm2;  // [BH, Ck]: |vbar_j|^2
  int64_t H, N, Cq, Ck, D;
  float scale, gamma;
  Strided4<float> scores;
  int* flag;
};

// One thread per sorted token; the CPU's value_stats loop (fp64, separate multiply and add).
template <typename T>
__global__ void probe_token_stats_kernel(ProbeParams p) {
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.N) return;
  const int32_t t = p.order[bh * p.N + i];
  const int32_t j = p.labels[b * p.l_stride_b + h * p.l_stride_h + t];
  if (j < 0 || j >= p.Ck) return;  // the trash bucket: the sort raised kBadLabel
  const T* vt = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1] + t * p.v_stride[2];
  const float* vc = p.v_centroids + (bh * p.Ck + j) * p.D;
  double n2 = 0.0, cd = 0.0;
  for (int64_t d = 0; d < p.D; ++d) {
    const double x = to_f32(vt[d * p.v_stride[3]]);
    n2 = __dadd_rn(n2, __dmul_rn(x, x));
    cd = __dadd_rn(cd, __dmul_rn(static_cast<double>(vc[d]), x));
  }
  p.token_stats[bh * p.N + i] = make_double2(n2, cd);
}

__global__ void probe_centroid_norm_kernel(ProbeParams p) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, bh = blockIdx.y;
  if (t >= p.Ck) return;
  const float* vc = p.v_centroids + (bh * p.Ck + t) * p.D;
  double n2 = 0.0;
  for (int64_t d = 0; d < p.D; ++d) n2 = __dadd_rn(n2, __dmul_rn(static_cast<double>(vc[d]), vc[d]));
  p.centroid_norm2[bh * p.Ck + t] = n2;
}

// The CPU's dot() on two staged fp32 rows: 8 lanes in order of d, separate multiply and add, the
// remainder into lane 0, the lanes added as a tree.
__device__ __forceinline__ float dot8_tree(const float (&part)[8]) {
  return __fadd_rn(__fadd_rn(__fadd_rn(part[0], part[1]), __fadd_rn(part[2], part[3])),
                   __fadd_rn(__fadd_rn(part[4], part[5]), __fadd_rn(part[6], part[7])));
}

__device__ __forceinline__ float dot8(const float* a, const float* c, int64_t D) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const float4 a0 = *reinterpret_cast<const float4*>(a + d), a1 = *reinterpret_cast<const float4*>(a + d + 4);
    const float4 c0 = *reinterpret_cast<const float4*>(c + d), c1 = *reinterpret_cast<const float4*>(c + d + 4);
    part[0] = __fadd_rn(part[0], __fmul_rn(a0.x, c0.x));
    part[1] = __fadd_rn(part[1], __fmul_rn(a0.y, c0.y));
    part[2] = __fadd_rn(part[2], __fmul_rn(a0.z, c0.z));
    part[3] = __fadd_rn(part[3], __fmul_rn(a0.w, c0.w));
    part[4] = __fadd_rn(part[4], __fmul_rn(a1.x, c1.x));
    part[5] = __fadd_rn(part[5], __fmul_rn(a1.y, c1.y));
    part[6] = __fadd_rn(part[6], __fmul_rn(a1.z, c1.z));
    part[7] = __fadd_rn(part[7], __fmul_rn(a1.w, c1.w));
  }
  for (; d < D; ++d) part[0] = __fadd_rn(part[0], __fmul_rn(a[d], c[d]));
  return dot8_tree(part);
}

// The running-max state of one (query centroid, key cluster) over a set of tokens.
struct ProbeState {
  double m, squared, cross;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) probe_kernel(ProbeParams p) {
  extern __shared__ __align__(16) float probe_smem[];
  const int64_t Dp = probe_stride(p.D);
  float* q_tile = probe_smem;                                  // [32][Dp]
  float* tokens = q_tile + kProbeCentroids * Dp;               // [64][Dp]
  float* centroid = tokens + kProbeTile * Dp;                  // [Dp]: kbar_j
  auto* merge = reinterpret_cast<ProbeState*>(centroid + Dp);  // [8 warps][32 lanes]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.z, b = bh / p.H, h = bh % p.H;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kProbeCentroids, a = a0 + lane;
  const int64_t D = p.D;
  const T* kbase = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
  const int32_t* order = p.order + bh * p.N;
  const double2* stats = p.token_stats + bh * p.N;

  for (int64_t t = threadIdx.x; t < kProbeCentroids * D; t += kThreads) {
    const int64_t r = t / D, d = t % D;
    q_tile[r * Dp + d] = a0 + r < p.Cq ? p.q_centroids[(bh * p.Cq + a0 + r) * D + d] : 0.0f;
  }
  const float* qa = q_tile + lane * Dp;
  const double q_size = a < p.Cq ? static_cast<double>(checked_size(p.q_sizes[bh * p.Cq + a], p.flag)) : 0.0;

  const int64_t j_end = min_of<int64_t>(p.Ck, (static_cast<int64_t>(blockIdx.y) + 1) * kProbeClusters);
  for (int64_t j = static_cast<int64_t>(blockIdx.y) * kProbeClusters; j < j_end; ++j) {
    __syncthreads();  // the previous cluster's tiles and merge slots are consumed
    for (int64_t d = threadIdx.x; d < D; d += kThreads) centroid[d] = p.k_centroids[(bh * p.Ck + j) * D + d];
    __syncthreads();
    const double c = static_cast<double>(__fmul_rn(dot8(qa, centroid, D), p.scale));
    ProbeState st{c, 0.0, 0.0};
    const int32_t begin = p.offsets[bh * (p.Ck + 1) + j], end = p.offsets[bh * (p.Ck + 1) + j + 1];
    for (int32_t tile = begin; tile < end; tile += kProbeTile) {
      const int n = static_cast<int>(min_of<int64_t>(kProbeTile, end - tile));
      __syncthreads();  // the previous tile is consumed
      for (int64_t e = threadIdx.x; e < n * D; e += kThreads) {
        const int64_t i = e / D, d = e % D;
        tokens[i * Dp + d] = to_f32(kbase[order[tile + i] * p.k_stride[2] + d * p.k_stride[3]]);
      }
      __syncthreads();
      // This warp's tokens: w, w + 8, ... below n.
      const int slots = n > warp ? (n - warp + kProbeWarps - 1) / kProbeWarps : 0;
      float part[kProbeSlots][8];
#pragma unroll
      for (int s = 0; s < kProbeSlots; ++s)
#pragma unroll
        for (int l = 0; l < 8; ++l) part[s][l] = 0.0f;
      int64_t d = 0;
      for (; d + 8 <= D; d += 8) {
        const float4 q0 = *reinterpret_cast<const float4*>(qa + d), q1 = *reinterpret_cast<const float4*>(qa + d + 4);
#pragma unroll
        for (int s = 0; s < kProbeSlots; ++s) {
          if (s >= slots) break;
          const float* kt = tokens + (warp + s * kProbeWarps) * Dp + d;
          const float4 k0 = *reinterpret_cast<const float4*>(kt), k1 = *reinterpret_cast<const float4*>(kt + 4);
          part[s][0] = __fadd_rn(part[s][0], __fmul_rn(q0.x, k0.x));
          part[s][1] = __fadd_rn(part[s][1], __fmul_rn(q0.y, k0.y));
          part[s][2] = __fadd_rn(part[s][2], __fmul_rn(q0.z, k0.z));
          part[s][3] = __fadd_rn(part[s][3], __fmul_rn(q0.w, k0.w));
          part[s][4] = __fadd_rn(part[s][4], __fmul_rn(q1.x, k1.x));
          part[s][5] = __fadd_rn(part[s][5], __fmul_rn(q1.y, k1.y));
          part[s][6] = __fadd_rn(part[s][6], __fmul_rn(q1.z, k1.z));
          part[s][7] = __fadd_rn(part[s][7], __fmul_rn(q1.w, k1.w));
        }
      }
      for (; d < D; ++d)
#pragma unroll
        for (int s = 0; s < kProbeSlots; ++s)
          if (s < slots)
            part[s][0] = __fadd_rn(part[s][0], __fmul_rn(qa[d], tokens[(warp + s * kProbeWarps) * Dp + d]));
#pragma unroll
      for (int s = 0; s < kProbeSlots; ++s) {
        if (s >= slots) break;
        const int i = warp + s * kProbeWarps;
        const double logit = static_cast<double>(__fmul_rn(dot8_tree(part[s]), p.scale));
        const double2 tv = stats[tile + i];
        if (logit > st.m) {
          const double r = exp(st.m - logit);
          st.squared *= r * r;
          st.cross *= r;
          st.m = logit;
        }
        const double e = exp(logit - st.m);
        st.squared += e * e * tv.x;
        st.cross += e * tv.y;
      }
    }
    // Merge the warps' states in warp order (the max first, so the sum order is fixed).
    merge[warp * 32 + lane] = st;
    __syncthreads();
    if (warp == 0 && a < p.Cq) {
      double m = merge[lane].m;
      for (int w = 1; w < kProbeWarps; ++w) m = fmax(m, merge[w * 32 + lane].m);
      double squared = 0.0, cross = 0.0;
      for (int w = 0; w < kProbeWarps; ++w) {
        const ProbeState s = merge[w * 32 + lane];
        const double r = exp(s.m - m);
        squared = __dadd_rn(squared, __dmul_rn(s.squared, __dmul_rn(r, r)));
        cross = __dadd_rn(cross, __dmul_rn(s.cross, r));
      }
      const double k_size = static_cast<double>(checked_size(p.k_sizes[bh * p.Ck + j], p.flag));
      // E / exp(2 m) = squared - 2 pc cross + pc^2 |K_j| |vbar|^2 with pc = exp(c - m) <= 1 (the
      // CPU's expression, without contraction, so that an exact zero stays zero).
      const double pc = exp(c - m);
      const double rest = __dadd_rn(__dsub_rn(squared, __dmul_rn(__dmul_rn(2.0, pc), cross)),
                                    __dmul_rn(__dmul_rn(__dmul_rn(pc, pc), k_size), p.centroid_norm2[bh * p.Ck + j]));
      const double log_eps = log(kProbeEps);
      const double log_error = rest > 0.0 ? fmax(log(rest) + 2.0 * m, log_eps) : log_eps;
      const double log_area = log(fmax(q_size * k_size, kProbeEps));
      p.scores.at(b, h, a, j) = static_cast<float>(log_error - static_cast<double>(p.gamma) * log_area);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// select_error_aware: one block per query-cluster row.
// ---------------------------------------------------------------------------------------------

struct RoutingParams {
  Strided4<const float> probs, scores;
  Strided4<const uint8_t> budget_mask;
  Strided4<uint8_t> mask;
  const int32_t* q_sizes;  // [BH, R]
  const int32_t* k_sizes;  // [BH, C]
  int64_t H, R, C;
  int64_t guaranteed;
  int* flag;
};

template <int kItems>
__global__ void __launch_bounds__(kThreads) select_error_aware_kernel(RoutingParams p) {
  using Rank = RowRank<kItems>;
  __shared__ union {
    typename Rank::Sort::TempStorage sort;
    typename Rank::Scan::TempStorage scan;
    typename Rank::Reduce::TempStorage reduce;
  } temp;
  __shared__ uint8_t guaranteed[Rank::kCapacity];
  __shared__ long long remaining;
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H, r = blockIdx.x;
  const int64_t C = p.C;
  const int64_t q_size = checked_size(p.q_sizes[bh * p.R + r], p.flag);
  const int32_t* k_sizes = p.k_sizes + bh * C;

  // 1. The first `guaranteed` clusters of the ranking by probs.
  uint32_t keys[kItems];
  uint16_t cols[kItems];
  load_row_keys<kItems, true>(p.probs, b, h, r, C, keys, cols);
  typename Rank::Sort(temp.sort).Sort(keys, cols);
#pragma unroll
  for (int i = 0; i < kItems; ++i) guaranteed[cols[i]] = threadIdx.x * kItems + i < p.guaranteed ? 1 : 0;
  __syncthreads();

  // 2. remaining = max(0, budget - guaranteed area), exact in 64-bit integers.
  long long budget = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t j = static_cast<int64_t>(threadIdx.x) * kItems + i;
    if (j >= C) continue;
    const long long area = q_size * checked_size(k_sizes[j], p.flag);
    if (p.budget_mask.at(b, h, r, j) != 0) budget += area;
    if (guaranteed[j]) budget -= area;
  }
  budget = typename Rank::Reduce(temp.reduce).Sum(budget);
  if (threadIdx.x == 0) remaining = budget > 0 ? budget : 0;
  __syncthreads();

  // 3. The others by score, kept while the area kept before them is below `remaining`.
  load_row_keys<kItems, true>(p.scores, b, h, r, C, keys, cols);
  typename Rank::Sort(temp.sort).Sort(keys, cols);
  long long area[kItems], before[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const bool valid = static_cast<int64_t>(threadIdx.x) * kItems + i < C;
    area[i] = valid && !guaranteed[cols[i]] ? q_size * max_of<int32_t>(k_sizes[cols[i]], 0) : 0;
  }
  __syncthreads();  // the sort's storage becomes the scan's
  typename Rank::Scan(temp.scan).ExclusiveSum(area, before);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (static_cast<int64_t>(threadIdx.x) * kItems + i >= C) continue;
    const bool keep = guaranteed[cols[i]] || before[i] < remaining;
    p.mask.at(b, h, r, cols[i]) = keep ? 1 : 0;
  }
}

// ---------------------------------------------------------------------------------------------
// select_top_p_at_density. (1) Per row: the stable ranking by weight, the fp32 running sum in rank
// order (sequential, as keep_top_p_row adds) and the running key count (int64). (2) Per (b,h): the
// smallest float p in (0, 1) whose kept area reaches the target, by bisection on the float's bits
// (the kept area only steps where p crosses a running sum, and is monotone); then the smallest
// running sum in (0, 1) at or above it, which is the CPU's candidate (1 when there is none). (3)
// Per row: the mask at that top_p.
// ---------------------------------------------------------------------------------------------

struct DensityParams {
  Strided4<const float> probs;
  Strided4<uint8_t> mask;
  const int32_t* q_sizes;  // [BH, R]
  const int32_t* k_sizes;  // [BH, C]
  int64_t H, R, C;
  int64_t min_kept;
  float density;
  float* running;        // [BH, R, C]
  long long* key_count;  // [BH, R, C]: keys of the first rank+1 clusters
  float* top_p;          // [BH]
  int* flag;
};

// The first rank whose running sum reaches p (C when none does): running sums of non-negative
// weights never decrease, so this is the CPU's lower_bound.
__device__ __forceinline__ int64_t first_reaching(const float* running, int64_t C, float p) {
  int64_t lo = 0, hi = C;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (running[mid] < p)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

template <int kItems>
__global__ void __launch_bounds__(kThreads) density_rank_kernel(DensityParams p, bool write_mask) {
  using Rank = RowRank<kItems>;
  __shared__ union {
    typename Rank::Sort::TempStorage sort;
    typename Rank::Scan::TempStorage scan;
    float ranked[Rank::kCapacity];
  } temp;
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H, r = blockIdx.x;
  const int64_t C = p.C;
  uint32_t keys[kItems];
  uint16_t cols[kItems];
  load_row_keys<kItems, false>(p.probs, b, h, r, C, keys, cols);
  typename Rank::Sort(temp.sort).Sort(keys, cols);
  __syncthreads();
  float* running = p.running + (bh * p.R + r) * C;
  if (!write_mask) {
#pragma unroll
    for (int i = 0; i < kItems; ++i) temp.ranked[threadIdx.x * kItems + i] = key_value(keys[i]);
    __syncthreads();
    if (threadIdx.x == 0) {
      float sum = 0.0f;
      for (int64_t i = 0; i < C; ++i) running[i] = sum = __fadd_rn(sum, temp.ranked[i]);
    }
    __syncthreads();
    long long count[kItems], prefix[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      count[i] =
          static_cast<int64_t>(threadIdx.x) * kItems + i < C ? checked_size(p.k_sizes[bh * C + cols[i]], p.flag) : 0;
    typename Rank::Scan(temp.scan).InclusiveSum(count, prefix);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t rank = static_cast<int64_t>(threadIdx.x) * kItems + i;
      if (rank < C) p.key_count[(bh * p.R + r) * C + rank] = prefix[i];
    }
    return;
  }
  // The mask at this (b,h)'s top_p, as keep_top_p_row writes it.
  const float top_p = p.top_p[bh];
  int64_t kept = C;
  if (top_p < 1.0f) {
    const int64_t lo = first_reaching(running, C, top_p);
    kept = min_of<int64_t>(C, max_of<int64_t>(lo < C ? lo + 1 : C, p.min_kept));
  }
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t rank = static_cast<int64_t>(threadIdx.x) * kItems + i;
    if (rank < C) p.mask.at(b, h, r, cols[i]) = rank < kept ? 1 : 0;
  }
}

// kept area at top_p (< 1) of every row of one (b,h), summed over the block.
__device__ long long density_kept_area(const DensityParams& p, int64_t bh, float top_p,
                                       cub::BlockReduce<long long, kThreads>::TempStorage& temp) {
  long long area = 0;
  for (int64_t r = threadIdx.x; r < p.R; r += kThreads) {
    const int64_t lo = first_reaching(p.running + (bh * p.R + r) * p.C, p.C, top_p);
    const int64_t kept = min_of<int64_t>(p.C, max_of<int64_t>(lo + 1, p.min_kept));
    const long long keys = kept > 0 ? p.key_count[(bh * p.R + r) * p.C + kept - 1] : 0;
    area += max_of<int32_t>(p.q_sizes[bh * p.R + r], 0) * keys;
  }
  const long long total = cub::BlockReduce<long long, kThreads>(temp).Sum(area);
  __syncthreads();  // temp is reused by the next call
  return total;
}

struct MinFloat {
  __device__ float operator()(float x, float y) const { return y < x ? y : x; }
};

__global__ void __launch_bounds__(kThreads) density_top_p_kernel(DensityParams p) {
  using Reduce = cub::BlockReduce<long long, kThreads>;
  using ReduceF = cub::BlockReduce<float, kThreads>;
  __shared__ union {
    Reduce::TempStorage sum;
    ReduceF::TempStorage min;
  } temp;
  __shared__ long long shared_area;
  const int64_t bh = blockIdx.x;
  long long q_part = 0, k_part = 0;
  for (int64_t r = threadIdx.x; r < p.R; r += kThreads) q_part += checked_size(p.q_sizes[bh * p.R + r], p.flag);
  for (int64_t j = threadIdx.x; j < p.C; j += kThreads) k_part += checked_size(p.k_sizes[bh * p.C + j], p.flag);
  const long long q_total = Reduce(temp.sum).Sum(q_part);
  __syncthreads();
  const long long k_total = Reduce(temp.sum).Sum(k_part);
  __syncthreads();
  __shared__ double target;
  if (threadIdx.x == 0)
    target = static_cast<double>(p.density) * static_cast<double>(q_total) * static_cast<double>(k_total);
  __syncthreads();
  // Smallest bits u in [1, bits(1.0f)) with kept_area(float(u)) >= target; hi = bits(1.0f): none.
  uint32_t lo = 1, hi = 0x3f800000u;
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    const long long area = density_kept_area(p, bh, __uint_as_float(mid), temp.sum);
    if (threadIdx.x == 0) shared_area = area;
    __syncthreads();
    const bool reaches = static_cast<double>(shared_area) >= target;
    __syncthreads();
    if (reaches)
      hi = mid;
    else
      lo = mid + 1;
  }
  float candidate = 1.0f;
  if (lo < 0x3f800000u) {
    const float at = __uint_as_float(lo);
    for (int64_t r = threadIdx.x; r < p.R; r += kThreads) {
      const float* run = p.running + (bh * p.R + r) * p.C;
      const int64_t a = first_reaching(run, p.C, at);
      if (a < p.C && run[a] < 1.0f) candidate = fminf(candidate, run[a]);
    }
  }
  candidate = ReduceF(temp.min).Reduce(candidate, MinFloat{});
  if (threadIdx.x == 0) p.top_p[bh] = candidate;
}

// ---------------------------------------------------------------------------------------------
// centroid_compensation: a block takes 64 query rows (token order) of one (b,h) and streams the
// key and value centroids through shared memory 32 at a time. Thread t owns row t/4: the logits of
// columns t%4 + 4k (k < 8) and the output dims 4(t%4) + 16k + e (e < 4, k < kChunks). The four
// threads of a row share its online-softmax state (max, total) through quad shuffles in a fixed
// order, so every thread of the quad holds the same values and the result is deterministic.
// ---------------------------------------------------------------------------------------------

constexpr int kCompRows = 64;
constexpr int kCompCols = 32;

struct CompensationParams {
  const void* q;  // [B,H,S,D]
  int64_t q_stride[4];
  const int32_t* q_labels;  // [B,H,N] unit stride
  int64_t l_stride_b, l_stride_h;
  Strided4<const uint8_t> mask;  // [B,H,Cq,Ck]
  const float* k_centroids;      // [BH, Ck, D]
  const float* v_centroids;
  const int32_t* k_sizes;  // [BH, Ck]
  void* out;               // [B,H,S,D]
  int64_t out_stride[4];
  float* lse;  // [B,H,S]
  int64_t lse_stride[3];
  int64_t H, N, Cq, Ck, D;
  float scale;
  int* flag;
};

constexpr int64_t comp_stride(int64_t D) { return (D + 15) / 16 * 16; }
// The output row lives in registers (4 kChunks floats per thread): 128 dims need 32, and 256 dims
// spilled. The CUDA attention takes head dims 64 and 128 only.
constexpr int64_t kMaxCompensationDim = 128;

template <typename TQ, typename TO, int kChunks>
__global__ void __launch_bounds__(kThreads) compensation_kernel(CompensationParams p) {
  extern __shared__ __align__(16) float comp_smem[];
  const int64_t Dp = comp_stride(p.D);
  float* q_tile = comp_smem;                                                        // [64][Dp]
  float* k_tile = q_tile + kCompRows * Dp;                                          // [32][Dp]
  float* v_tile = k_tile + kCompCols * Dp;                                          // [32][Dp]
  float* weights = v_tile + kCompCols * Dp;                                         // [64][33]
  auto* sizes = reinterpret_cast<int32_t*>(weights + kCompRows * (kCompCols + 1));  // [32]

  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kCompRows;
  const int r = threadIdx.x / 4, quad = threadIdx.x % 4;
  const int64_t i = row0 + r, D = p.D;
  const TQ* qbase = static_cast<const TQ*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  for (int64_t t = threadIdx.x; t < kCompRows * Dp; t += kThreads) {
    const int64_t rr = t / Dp, d = t % Dp;
    q_tile[t] = (row0 + rr < p.N && d < D) ? to_f32(qbase[(row0 + rr) * p.q_stride[2] + d * p.q_stride[3]]) : 0.0f;
  }
  int64_t label = -1;
  if (i < p.N) {
    label = p.q_labels[b * p.l_stride_b + h * p.l_stride_h + i];
    if (label < 0 || label >= p.Cq) {
      if (quad == 0) atomicOr(p.flag, kBadLabel);
      label = -1;
    }
  }
  const bool active = label >= 0;
  // The exact part enters as (max = lse, total = 1, acc = out); a row that attended to nothing
  // (lse = -inf) as an empty state.
  TO* out_row = static_cast<TO*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2];
  float* lse_at = p.lse + b * p.lse_stride[0] + h * p.lse_stride[1] + i * p.lse_stride[2];
  const float lse0 = active ? *lse_at : -INFINITY;
  float m = lse0, total = lse0 == -INFINITY ? 0.0f : 1.0f;
  float acc[kChunks][4];
#pragma unroll
  for (int k = 0; k < kChunks; ++k)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t d = 4 * quad + 16 * k + e;
      acc[k][e] = (total > 0.0f && d < D) ? to_f32(out_row[d * p.out_stride[3]]) : 0.0f;
    }
  bool touched = false;

  for (int64_t j0 = 0; j0 < p.Ck; j0 += kCompCols) {
    __syncthreads();  // the previous chunk is consumed (and the q tile is written)
    for (int64_t t = threadIdx.x; t < kCompCols * Dp; t += kThreads) {
      const int64_t c = t / Dp, d = t % Dp;
      const bool in = j0 + c < p.Ck && d < D;
      k_tile[t] = in ? p.k_centroids[(bh * p.Ck + j0 + c) * D + d] : 0.0f;
      v_tile[t] = in ? p.v_centroids[(bh * p.Ck + j0 + c) * D + d] : 0.0f;
    }
    if (threadIdx.x < kCompCols)
      sizes[threadIdx.x] = j0 + threadIdx.x < p.Ck
                               ? static_cast<int32_t>(checked_size(p.k_sizes[bh * p.Ck + j0 + threadIdx.x], p.flag))
                               : 0;
    __syncthreads();
    // Logits of the skipped clusters: w = log|K_j| + scale q_i . kbar_j, -inf for the others.
    float w[kCompCols / 4];
    float chunk_max = -INFINITY;
#pragma unroll
    for (int k = 0; k < kCompCols / 4; ++k) {
      const int c = quad + 4 * k;
      w[k] = -INFINITY;
      const bool skipped = active && sizes[c] > 0 && p.mask.at(b, h, label, j0 + c) == 0;
      if (!skipped) continue;
      const float* qr = q_tile + r * Dp;
      const float* kc = k_tile + c * Dp;
      float dot = 0.0f;
      for (int64_t d = 0; d < Dp; d += 4) {
        const float4 qv = *reinterpret_cast<const float4*>(qr + d), kv = *reinterpret_cast<const float4*>(kc + d);
        dot = fmaf(qv.x, kv.x, dot);
        dot = fmaf(qv.y, kv.y, dot);
        dot = fmaf(qv.z, kv.z, dot);
        dot = fmaf(qv.w, kv.w, dot);
      }
      w[k] = logf(static_cast<float>(sizes[c])) + dot * p.scale;
      chunk_max = fmaxf(chunk_max, w[k]);
    }
    chunk_max = fmaxf(chunk_max, __shfl_xor_sync(0xffffffffu, chunk_max, 1));
    chunk_max = fmaxf(chunk_max, __shfl_xor_sync(0xffffffffu, chunk_max, 2));
    const float m_new = fmaxf(m, chunk_max);
    const float alpha = m_new == -INFINITY ? 1.0f : expf(m - m_new);
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < kCompCols / 4; ++k) {
      const float e = w[k] == -INFINITY ? 0.0f : expf(w[k] - m_new);
      weights[r * (kCompCols + 1) + quad + 4 * k] = e;
      sum += e;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    touched = touched || chunk_max != -INFINITY;
    total = total * alpha + sum;
    m = m_new;
    __syncthreads();  // the weights are visible
#pragma unroll
    for (int k = 0; k < kChunks; ++k)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[k][e] *= alpha;
    if (chunk_max != -INFINITY) {  // the quad's row skipped something in this chunk
      for (int c = 0; c < kCompCols; ++c) {
        const float e = weights[r * (kCompCols + 1) + c];
        const float* vc = v_tile + c * Dp + 4 * quad;
#pragma unroll
        for (int k = 0; k < kChunks; ++k) {
          if (16 * k >= Dp) break;
          const float4 vv = *reinterpret_cast<const float4*>(vc + 16 * k);
          acc[k][0] = fmaf(e, vv.x, acc[k][0]);
          acc[k][1] = fmaf(e, vv.y, acc[k][1]);
          acc[k][2] = fmaf(e, vv.z, acc[k][2]);
          acc[k][3] = fmaf(e, vv.w, acc[k][3]);
        }
      }
    }
  }
  if (!touched) return;  // nothing skipped: the row stays as the attention wrote it
#pragma unroll
  for (int k = 0; k < kChunks; ++k)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t d = 4 * quad + 16 * k + e;
      if (d < D) out_row[d * p.out_stride[3]] = from_f32<TO>(acc[k][e] / total);
    }
  if (quad == 0) *lse_at = m + logf(total);
}

// ---------------------------------------------------------------------------------------------
// Scratch
// ---------------------------------------------------------------------------------------------

struct ProbeScratch {
  LabelSort sort;
  int32_t* offsets = nullptr;
  double2* token_stats = nullptr;
  double* centroid_norm2 = nullptr;
};

ProbeScratch carve_probe(Carver& carver, int64_t batch_heads, int64_t tokens, int64_t k_clusters) {
  ProbeScratch s;
  s.sort = carve_label_sort(carver, batch_heads, tokens, k_clusters);
  s.offsets = carver.take<int32_t>(batch_heads * (k_clusters + 1));
  s.token_stats = carver.take<double2>(batch_heads * tokens);
  s.centroid_norm2 = carver.take<double>(batch_heads * k_clusters);
  return s;
}

struct DensityScratch {
  float* running = nullptr;
  long long* key_count = nullptr;
  float* top_p = nullptr;
};

DensityScratch carve_density(Carver& carver, int64_t batch_heads, int64_t rows, int64_t cols) {
  DensityScratch s;
  s.running = carver.take<float>(batch_heads * rows * cols);
  s.key_count = carver.take<long long>(batch_heads * rows * cols);
  s.top_p = carver.take<float>(batch_heads);
  return s;
}

// cluster_means: a [B*H, C] i32 sizes buffer, then kmeans_update's scratch.
void carve_means(Carver& carver, int64_t batch_heads, int64_t tokens, int64_t clusters, int64_t dim, int32_t** sizes,
                 Workspace* update) {
  *sizes = carver.take<int32_t>(batch_heads * clusters);
  const size_t bytes = kmeans_workspace_bytes(batch_heads, tokens, clusters, dim);
  *update = Workspace{carver.take_bytes(bytes), bytes};
}

void copy_strides(const TensorView& t, int64_t* out, int rank) {
  for (int d = 0; d < rank; ++d) out[d] = t.stride[d];
}

void check_head_dim(int64_t D, int64_t limit, const char* op) {
  SAPATTN_CHECK(D <= limit, UnsupportedError, op, " on CUDA takes head dims up to ", limit, ", got ", D);
}

void check_rows(int64_t batch_heads, int64_t rows, int64_t cols, const char* op) {
  SAPATTN_CHECK(batch_heads <= 65535 && rows <= 2147483647, UnsupportedError, op,
                " on CUDA takes at most 65535 (b,h) pairs");
  SAPATTN_CHECK(cols <= kMaxSelectColumns, UnsupportedError, op, " on CUDA ranks at most ", kMaxSelectColumns,
                " key clusters per row, got ", cols);
}

// Runs `launches` between the value-check bracket (see backend.hpp).
template <typename F>
void with_value_check(const Stream& stream, const char* op, F&& launches) {
  const bool checked = begin_value_check(stream);
  try {
    launches();
  } catch (...) {
    if (checked) {
      try {
        end_value_check(stream, op);  // releases the check's lock
      } catch (...) {
      }
    }
    throw;  // the launch error, not what the check found after it
  }
  if (checked) end_value_check(stream, op);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

size_t ear_workspace_bytes(int64_t batch_heads, int64_t tokens, int64_t q_clusters, int64_t k_clusters, int64_t dim) {
  Carver means("cluster_means"), probe("ear_probe"), density("select_top_p_at_density");
  int32_t* sizes = nullptr;
  Workspace update;
  carve_means(means, batch_heads, tokens, std::max<int64_t>(k_clusters, 1), dim, &sizes, &update);
  carve_probe(probe, batch_heads, tokens, std::max<int64_t>(k_clusters, 1));
  carve_density(density, batch_heads, q_clusters, k_clusters);
  return std::max({means.used(), probe.used(), density.used()});
}

void cluster_means(const TensorView& points, const TensorView& labels, TensorView means, const Stream& stream,
                   Workspace workspace) {
  const DeviceGuard guard(stream.device);
  const int64_t B = points.shape[0], H = points.shape[1], C = means.shape[2];
  Carver carver("cluster_means", workspace);
  int32_t* sizes = nullptr;
  Workspace update;
  carve_means(carver, B * H, points.shape[2], C, points.shape[3], &sizes, &update);
  carver.check();
  if (B * H == 0) return;
  // kmeans_update's mean with zero as the centroid an empty cluster keeps (the CPU's definition).
  SAPATTN_CUDA_CHECK(cudaMemsetAsync(means.data, 0, means.numel() * sizeof(float), stream_of(stream)));
  const TensorView size_view = TensorView::contiguous(sizes, DType::I32, {B, H, C}, stream.device);
  kmeans_update(points, labels, means, size_view, /*move_centroids=*/true, stream, update);
}

void centroid_probs(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& k_sizes,
                    float scale, TensorView probs, const Stream& stream) {
  const DeviceGuard guard(stream.device);
  const int64_t BH = q_centroids.shape[0] * q_centroids.shape[1];
  const int64_t Cq = q_centroids.shape[2], Ck = k_centroids.shape[2], D = q_centroids.shape[3];
  if (BH * Cq * Ck == 0) return;
  SAPATTN_CHECK(BH <= 65535, UnsupportedError, "centroid_probs on CUDA takes at most 65535 (b,h) pairs");
  SAPATTN_CHECK(D <= 1024, UnsupportedError, "centroid_probs on CUDA takes head dims up to 1024, got ", D);
  with_value_check(stream, "centroid_probs", [&] {
    const int smem = static_cast<int>(kProbRows * D * sizeof(float));
    set_max_dynamic_smem(reinterpret_cast<const void*>(centroid_probs_kernel), smem);
    const dim3 grid(static_cast<unsigned>(ceil_div(Cq, kProbRows)), static_cast<unsigned>(BH));
    centroid_probs_kernel<<<grid, kThreads, smem, stream_of(stream)>>>(
        static_cast<const float*>(q_centroids.data), static_cast<const float*>(k_centroids.data),
        static_cast<const int32_t*>(k_sizes.data), q_centroids.shape[1], Cq, Ck, D, scale, strided<float>(probs),
        value_error_flag());
    SAPATTN_CUDA_CHECK_LAUNCH();
  });
}

void ear_probe(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& v_centroids,
               const TensorView& k, const TensorView& v, const TensorView& k_labels, const TensorView& q_sizes,
               const TensorView& k_sizes, float scale, float gamma, TensorView scores, const Stream& stream,
               Workspace workspace) {
  const DeviceGuard guard(stream.device);
  const int64_t B = k.shape[0], H = k.shape[1], N = k.shape[2], D = k.shape[3];
  const int64_t BH = B * H, Cq = q_centroids.shape[2], Ck = k_centroids.shape[2];
  Carver carver("ear_probe", workspace);
  const ProbeScratch s = carve_probe(carver, BH, N, Ck);
  carver.check();
  if (BH * Cq * Ck == 0) return;
  check_head_dim(D, kMaxProbeDim, "ear_probe");
  SAPATTN_CHECK(BH <= 65535 && Ck <= 65535 * kProbeClusters, UnsupportedError,
                "ear_probe on CUDA takes at most 65535 (b,h) pairs and ", 65535 * kProbeClusters, " key clusters");
  ProbeParams p{};
  p.q_centroids = static_cast<const float*>(q_centroids.data);
  p.k_centroids = static_cast<const float*>(k_centroids.data);
  p.v_centroids = static_cast<const float*>(v_centroids.data);
  p.k = k.data;
  p.v = v.data;
  copy_strides(k, p.k_stride, 4);
  copy_strides(v, p.v_stride, 4);
  p.labels = static_cast<const int32_t*>(k_labels.data);
  p.l_stride_b = k_labels.stride[0];
  p.l_stride_h = k_labels.stride[1];
  p.q_sizes = static_cast<const int32_t*>(q_sizes.data);
  p.k_sizes = static_cast<const int32_t*>(k_sizes.data);
  p.order = s.sort.index_out;
  p.offsets = s.offsets;
  p.token_stats = s.token_stats;
  p.centroid_norm2 = s.centroid_norm2;
  p.H = H;
  p.N = N;
  p.Cq = Cq;
  p.Ck = Ck;
  p.D = D;
  p.scale = scale;
  p.gamma = gamma;
  p.scores = strided<float>(scores);
  p.flag = value_error_flag();
  const cudaStream_t st = stream_of(stream);
  with_value_check(stream, "ear_probe", [&] {
    sort_by_label(s.sort, labels_view(k_labels), st);
    label_offsets(s.sort, s.offsets, nullptr, st);
    probe_centroid_norm_kernel<<<dim3(static_cast<unsigned>(ceil_div(Ck, kThreads)), static_cast<unsigned>(BH)),
                                 kThreads, 0, st>>>(p);
    SAPATTN_CUDA_CHECK_LAUNCH();
    const int64_t Dp = probe_stride(D);
    const int smem =
        static_cast<int>((kProbeCentroids + kProbeTile + 1) * Dp * sizeof(float) + kThreads * sizeof(ProbeState));
    const dim3 grid(static_cast<unsigned>(ceil_div(Cq, kProbeCentroids)),
                    static_cast<unsigned>(ceil_div(Ck, kProbeClusters)), static_cast<unsigned>(BH));
    dispatch_float(k.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      if (N > 0) {
        probe_token_stats_kernel<T>
            <<<dim3(static_cast<unsigned>(ceil_div(N, kThreads)), static_cast<unsigned>(BH)), kThreads, 0, st>>>(p);
        SAPATTN_CUDA_CHECK_LAUNCH();
      }
      set_max_dynamic_smem(reinterpret_cast<const void*>(probe_kernel<T>), smem);
      probe_kernel<T><<<grid, kThreads, smem, st>>>(p);
      SAPATTN_CUDA_CHECK_LAUNCH();
    });
  });
}

void select_error_aware(const TensorView& probs, const TensorView& budget_mask, const TensorView& scores,
                        const TensorView& q_sizes, const TensorView& k_sizes, int guaranteed, TensorView mask,
                        const Stream& stream) {
  const DeviceGuard guard(stream.device);
  const int64_t BH = probs.shape[0] * probs.shape[1], R = probs.shape[2], C = probs.shape[3];
  if (BH * R * C == 0) return;
  check_rows(BH, R, C, "select_error_aware");
  RoutingParams p{};
  p.probs = strided<const float>(probs);
  p.scores = strided<const float>(scores);
  p.budget_mask = strided<const uint8_t>(budget_mask);
  p.mask = strided<uint8_t>(mask);
  p.q_sizes = static_cast<const int32_t*>(q_sizes.data);
  p.k_sizes = static_cast<const int32_t*>(k_sizes.data);
  p.H = probs.shape[1];
  p.R = R;
  p.C = C;
  p.guaranteed = guaranteed;
  p.flag = value_error_flag();
  with_value_check(stream, "select_error_aware", [&] {
    dispatch_capacity(C, [&](auto items) {
      select_error_aware_kernel<decltype(items)::value>
          <<<dim3(static_cast<unsigned>(R), static_cast<unsigned>(BH)), kThreads, 0, stream_of(stream)>>>(p);
      SAPATTN_CUDA_CHECK_LAUNCH();
    });
  });
}

void select_top_p_at_density(const TensorView& probs, const TensorView& q_sizes, const TensorView& k_sizes,
                             float density, int min_kept, TensorView mask, const Stream& stream, Workspace workspace) {
  const DeviceGuard guard(stream.device);
  const int64_t BH = probs.shape[0] * probs.shape[1], R = probs.shape[2], C = probs.shape[3];
  Carver carver("select_top_p_at_density", workspace);
  const DensityScratch s = carve_density(carver, BH, R, C);
  carver.check();
  if (BH * R * C == 0) return;
  check_rows(BH, R, C, "select_top_p_at_density");
  DensityParams p{};
  p.probs = strided<const float>(probs);
  p.mask = strided<uint8_t>(mask);
  p.q_sizes = static_cast<const int32_t*>(q_sizes.data);
  p.k_sizes = static_cast<const int32_t*>(k_sizes.data);
  p.H = probs.shape[1];
  p.R = R;
  p.C = C;
  p.min_kept = min_kept;
  p.density = density;
  p.running = s.running;
  p.key_count = s.key_count;
  p.top_p = s.top_p;
  p.flag = value_error_flag();
  const cudaStream_t st = stream_of(stream);
  with_value_check(stream, "select_top_p_at_density", [&] {
    dispatch_capacity(C, [&](auto items) {
      const dim3 rows(static_cast<unsigned>(R), static_cast<unsigned>(BH));
      density_rank_kernel<decltype(items)::value><<<rows, kThreads, 0, st>>>(p, false);
      SAPATTN_CUDA_CHECK_LAUNCH();
      density_top_p_kernel<<<static_cast<unsigned>(BH), kThreads, 0, st>>>(p);
      SAPATTN_CUDA_CHECK_LAUNCH();
      density_rank_kernel<decltype(items)::value><<<rows, kThreads, 0, st>>>(p, true);
      SAPATTN_CUDA_CHECK_LAUNCH();
    });
  });
}

void centroid_compensation(const TensorView& q, const TensorView& q_labels, const TensorView& mask,
                           const TensorView& k_centroids, const TensorView& v_centroids, const TensorView& k_sizes,
                           float scale, TensorView out, TensorView lse, const Stream& stream) {
  const DeviceGuard guard(stream.device);
  const int64_t B = q.shape[0], H = q.shape[1], N = q_labels.shape[2], D = q.shape[3];
  const int64_t BH = B * H, Ck = k_centroids.shape[2];
  if (BH * N * Ck == 0) return;
  check_head_dim(D, kMaxCompensationDim, "centroid_compensation");
  SAPATTN_CHECK(BH <= 65535, UnsupportedError, "centroid_compensation on CUDA takes at most 65535 (b,h) pairs");
  CompensationParams p{};
  p.q = q.data;
  copy_strides(q, p.q_stride, 4);
  p.q_labels = static_cast<const int32_t*>(q_labels.data);
  p.l_stride_b = q_labels.stride[0];
  p.l_stride_h = q_labels.stride[1];
  p.mask = strided<const uint8_t>(mask);
  p.k_centroids = static_cast<const float*>(k_centroids.data);
  p.v_centroids = static_cast<const float*>(v_centroids.data);
  p.k_sizes = static_cast<const int32_t*>(k_sizes.data);
  p.out = out.data;
  copy_strides(out, p.out_stride, 4);
  p.lse = static_cast<float*>(lse.data);
  copy_strides(lse, p.lse_stride, 3);
  p.H = H;
  p.N = N;
  p.Cq = mask.shape[2];
  p.Ck = Ck;
  p.D = D;
  p.scale = scale;
  p.flag = value_error_flag();
  const int64_t Dp = comp_stride(D);
  const int smem = static_cast<int>(((kCompRows + 2 * kCompCols) * Dp + kCompRows * (kCompCols + 1)) * sizeof(float) +
                                    kCompCols * sizeof(int32_t));
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kCompRows)), static_cast<unsigned>(BH));
  with_value_check(stream, "centroid_compensation", [&] {
    dispatch_float(q.dtype, [&](auto q_tag) {
      dispatch_float(out.dtype, [&](auto out_tag) {
        using TQ = typename decltype(q_tag)::type;
        using TO = typename decltype(out_tag)::type;
        auto launch = [&](auto kernel) {
          set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
          kernel<<<grid, kThreads, smem, stream_of(stream)>>>(p);
          SAPATTN_CUDA_CHECK_LAUNCH();
        };
        if (Dp <= 64) {
          launch(compensation_kernel<TQ, TO, 4>);
        } else {
          launch(compensation_kernel<TQ, TO, 8>);
        }
      });
    });
  });
}

}  // namespace sapattn::cuda
