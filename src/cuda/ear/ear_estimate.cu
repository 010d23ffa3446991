// SVG-EAR on the GPU, the estimates that its routing reads (docs/ear.md): the value centroids
// (cluster_means), SVG2's centroid weights (centroid_probs) and the error probe (ear_probe); and the
// scratch size of every EAR op (ear_workspace_bytes). The routing and the density budget are in
// ear_select.cu, the compensation in ear_compensation.cu. Every op is a fixed sequence of launches
// on the caller's stream, takes its scratch from the caller's workspace and is deterministic:
// reductions run in a fixed order, and the only atomics are integer ORs into the value-check flag.
//
// Numerics against the CPU backend (the tests' tolerances, docs/ear.md "The CUDA backend"):
// - cluster_means is kmeans_update's mean (fp64 sums in another order): <= 1 fp32 ulp.
// - centroid_probs repeats the CPU's arithmetic step by step, as select_blocks does: bit-identical.
// - ear_probe computes the logits exactly as the CPU does (8-lane fp32 dot product, no FMA), the
//   per-token value statistics in the same fp64 order, and sums tokens in fp64 in another order: the
//   scores differ by the fp64 rounding of E times its cancellation, plus an fp32 rounding.
#include <algorithm>
#include <cmath>

#include "cuda/ear/ear.cuh"
#include "cuda/ear/ear_internal.hpp"
#include "cuda/permute/label_sort.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda {

using ear::carve_density;
using ear::carve_means;
using ear::carve_probe;
using ear::check_head_dim;
using ear::checked_size;
using ear::copy_strides;
using ear::kThreads;
using ear::ProbeScratch;
using ear::strided;
using ear::Strided4;
using ear::with_value_check;

namespace {

constexpr double kProbeEps = 1e-8;  // the published probe's floor on errors and areas

LabelsView labels_view(const TensorView& t) {
  return {static_cast<const int32_t*>(t.data), t.stride[0], t.stride[1], t.shape[0], t.shape[1], t.shape[2]};
}

// ---------------------------------------------------------------------------------------------
// centroid_probs: select_blocks' weights, with the CPU's arithmetic (see cuda/select/select.cu): fp32 dot
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

}  // namespace

// ---------------------------------------------------------------------------------------------
// Scratch
// ---------------------------------------------------------------------------------------------

namespace ear {

ProbeScratch carve_probe(Carver& carver, int64_t batch_heads, int64_t tokens, int64_t k_clusters) {
  ProbeScratch s;
  s.sort = carve_label_sort(carver, batch_heads, tokens, k_clusters);
  s.offsets = carver.take<int32_t>(batch_heads * (k_clusters + 1));
  s.token_stats = carver.take<double2>(batch_heads * tokens);
  s.centroid_norm2 = carver.take<double>(batch_heads * k_clusters);
  return s;
}

void carve_means(Carver& carver, int64_t batch_heads, int64_t tokens, int64_t clusters, int64_t dim, int32_t** sizes,
                 Workspace* update) {
  *sizes = carver.take<int32_t>(batch_heads * clusters);
  const size_t bytes = kmeans_workspace_bytes(batch_heads, tokens, clusters, dim);
  *update = Workspace{carver.take_bytes(bytes), bytes};
}

}  // namespace ear

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

}  // namespace sapattn::cuda
