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
// - ear_probe runs on tensor cores by default (ear_probe_tc.cu: hi + lo query centroids, fp32 sums of
//   per-token errors; docs/ear.md has its bound). The CUDA-core pass here
//   (set_probe_kernel_override("cuda_cores"), f32 keys, head dims over 128) computes the logits exactly
//   as the CPU does (8-lane fp32 dot product, no FMA), the per-token value statistics in the same fp64
//   order, and sums tokens in fp64 in another order: the scores differ by the fp64 rounding of E times
//   its cancellation, plus an fp32 rounding. The same pass, with the attention mass kept, is the first
//   half of ear_plus_probe (ear_plus.cu).
#include <algorithm>
#include <cmath>

#include "cuda/ear/ear.cuh"
#include "cuda/ear/ear_internal.hpp"
#include "cuda/ear/ear_probe.cuh"
#include "cuda/permute/label_sort.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda {

using ear::carve_density;
using ear::carve_means;
using ear::carve_probe;
using ear::checked_size;
using ear::dot8_tree;
using ear::kProbeCentroids;
using ear::kProbeClusters;
using ear::kProbeEps;
using ear::kProbeSlots;
using ear::kProbeTile;
using ear::kProbeWarps;
using ear::kThreads;
using ear::probe_stride;
using ear::ProbeParams;
using ear::ProbeScratch;
using ear::stage_query_centroids;
using ear::stage_sorted_rows;
using ear::strided;
using ear::Strided4;
using ear::tile_logits;
using ear::with_value_check;

namespace {

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
// The probe's pass (ear_probe.cuh has the tiling). Per sorted token, |v_t|^2 and vbar . v_t in
// fp64 in order of d (the CPU's sums); per value centroid, |vbar|^2. Then each thread keeps the
// CPU's running-max state (m, sum exp(2(s-m)) |v|^2, sum exp(s-m) vbar.v and, for ear-plus,
// sum exp(s-m)) over its tokens of a key cluster; the 8 warps' states merge in warp order.
// ---------------------------------------------------------------------------------------------

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

// The CPU's dot() of two staged fp32 rows (the centroid logit).
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
  double m, squared, cross, mass;
};

int probe_smem_bytes(int64_t D) {
  return static_cast<int>((kProbeCentroids + kProbeTile + 1) * probe_stride(D) * sizeof(float) +
                          kThreads * sizeof(ProbeState));
}

// kPlus = false: ear_probe's score. kPlus = true: ear_plus_probe's log E, log M and spread per pair.
template <typename T, bool kPlus>
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

  stage_query_centroids(p, bh, a0, q_tile);
  const float* qa = q_tile + lane * Dp;
  const double q_size = a < p.Cq ? static_cast<double>(checked_size(p.q_sizes[bh * p.Cq + a], p.flag)) : 0.0;

  const int64_t j_end = min_of<int64_t>(p.Ck, (static_cast<int64_t>(blockIdx.y) + 1) * kProbeClusters);
  for (int64_t j = static_cast<int64_t>(blockIdx.y) * kProbeClusters; j < j_end; ++j) {
    __syncthreads();  // the previous cluster's tiles and merge slots are consumed
    for (int64_t d = threadIdx.x; d < D; d += kThreads) centroid[d] = p.k_centroids[(bh * p.Ck + j) * D + d];
    __syncthreads();
    const double c = static_cast<double>(__fmul_rn(dot8(qa, centroid, D), p.scale));
    ProbeState st{c, 0.0, 0.0, 0.0};
    const int32_t begin = p.offsets[bh * (p.Ck + 1) + j], end = p.offsets[bh * (p.Ck + 1) + j + 1];
    for (int32_t tile = begin; tile < end; tile += kProbeTile) {
      const int n = static_cast<int>(min_of<int64_t>(kProbeTile, end - tile));
      __syncthreads();  // the previous tile is consumed
      stage_sorted_rows(kbase, p.k_stride, order, tile, n, D, tokens);
      __syncthreads();
      float logit[kProbeSlots];
      const int slots = tile_logits(qa, tokens, n, warp, D, p.scale, logit);
#pragma unroll
      for (int s = 0; s < kProbeSlots; ++s) {
        if (s >= slots) break;
        const double x = static_cast<double>(logit[s]);
        const double2 tv = stats[tile + warp + s * kProbeWarps];
        if (x > st.m) {
          const double r = exp(st.m - x);
          st.squared *= r * r;
          st.cross *= r;
          if constexpr (kPlus) st.mass *= r;
          st.m = x;
        }
        const double e = exp(x - st.m);
        st.squared += e * e * tv.x;
        st.cross += e * tv.y;
        if constexpr (kPlus) st.mass += e;
      }
    }
    // Merge the warps' states in warp order (the max first, so the sum order is fixed).
    merge[warp * 32 + lane] = st;
    __syncthreads();
    if (warp != 0 || a >= p.Cq) continue;
    double m = merge[lane].m;
    for (int w = 1; w < kProbeWarps; ++w) m = fmax(m, merge[w * 32 + lane].m);
    double squared = 0.0, cross = 0.0, mass = 0.0;
    for (int w = 0; w < kProbeWarps; ++w) {
      const ProbeState s = merge[w * 32 + lane];
      const double r = exp(s.m - m);
      squared = __dadd_rn(squared, __dmul_rn(s.squared, __dmul_rn(r, r)));
      cross = __dadd_rn(cross, __dmul_rn(s.cross, r));
      if constexpr (kPlus) mass = __dadd_rn(mass, __dmul_rn(s.mass, r));
    }
    const double k_size = static_cast<double>(checked_size(p.k_sizes[bh * p.Ck + j], p.flag));
    // E / exp(2 m) = squared - 2 pc cross + pc^2 |K_j| |vbar|^2 with pc = exp(c - m) <= 1 (the
    // CPU's expression, without contraction, so that an exact zero stays zero).
    const double pc = exp(c - m);
    const double rest = __dadd_rn(__dsub_rn(squared, __dmul_rn(__dmul_rn(2.0, pc), cross)),
                                  __dmul_rn(__dmul_rn(__dmul_rn(pc, pc), k_size), p.centroid_norm2[bh * p.Ck + j]));
    if constexpr (kPlus) {
      const int64_t at = (bh * p.Cq + a) * p.Ck + j;
      p.log_error[at] = rest > 0.0 ? log(rest) + 2.0 * m : -INFINITY;
      p.log_mass[at] = mass > 0.0 ? log(mass) + m : -INFINITY;
      if (p.spread.data != nullptr)  // the CPU's log(M / |K_j|) + m - c, 0 for an empty cluster
        p.spread.at(b, h, a, j) = mass == 0.0 || k_size == 0.0 ? 0.0f : static_cast<float>(log(mass / k_size) + m - c);
    } else {
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

ClusterSort carve_cluster_sort(Carver& carver, int64_t batch_heads, int64_t tokens, int64_t clusters) {
  ClusterSort s;
  s.sort = carve_label_sort(carver, batch_heads, tokens, clusters);
  s.offsets = carver.take<int32_t>(batch_heads * (clusters + 1));
  return s;
}

void sort_clusters(const ClusterSort& s, const TensorView& labels, cudaStream_t stream) {
  sort_by_label(s.sort, labels_view(labels), stream);
  label_offsets(s.sort, s.offsets, nullptr, stream);
}

ProbeScratch carve_probe(Carver& carver, int64_t batch_heads, int64_t tokens, int64_t k_clusters) {
  ProbeScratch s;
  s.clusters = carve_cluster_sort(carver, batch_heads, tokens, k_clusters);
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

void launch_probe_pass(const ProbeParams& p, const ProbeScratch& s, const TensorView& k_labels, bool plus,
                       bool tensor_cores, cudaStream_t stream) {
  const int64_t BH = s.clusters.sort.batch_heads;
  sort_clusters(s.clusters, k_labels, stream);
  probe_centroid_norm_kernel<<<dim3(static_cast<unsigned>(ceil_div(p.Ck, kThreads)), static_cast<unsigned>(BH)),
                               kThreads, 0, stream>>>(p);
  SAPATTN_CUDA_CHECK_LAUNCH();
  if (tensor_cores) return launch_probe_pass_tc(p, BH, plus, stream);
  const int smem = probe_smem_bytes(p.D);
  const dim3 grid(static_cast<unsigned>(ceil_div(p.Cq, kProbeCentroids)),
                  static_cast<unsigned>(ceil_div(p.Ck, kProbeClusters)), static_cast<unsigned>(BH));
  dispatch_float(p.v_dtype, [&](auto tag) {  // k and v may differ in dtype
    probe_token_stats_kernel<typename decltype(tag)::type>
        <<<dim3(static_cast<unsigned>(ceil_div(p.N, kThreads)), static_cast<unsigned>(BH)), kThreads, 0, stream>>>(p);
    SAPATTN_CUDA_CHECK_LAUNCH();
  });
  dispatch_float(p.k_dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto launch = [&](auto kernel) {
      set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
      kernel<<<grid, kThreads, smem, stream>>>(p);
      SAPATTN_CUDA_CHECK_LAUNCH();
    };
    if (plus)
      launch(probe_kernel<T, true>);
    else
      launch(probe_kernel<T, false>);
  });
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
  ear::check_probe_limits(BH, Ck, D, "ear_probe");
  ProbeParams p =
      ear::probe_params(q_centroids, k_centroids, v_centroids, k, v, k_labels, q_sizes, k_sizes, scale, gamma, s);
  p.scores = strided<float>(scores);
  const bool tensor_cores = ear::probe_on_tensor_cores(p, stream, /*pair_values=*/false);
  with_value_check(stream, "ear_probe",
                   [&] { ear::launch_probe_pass(p, s, k_labels, /*plus=*/false, tensor_cores, stream_of(stream)); });
}

}  // namespace sapattn::cuda
