// The probe's pass over the key tokens from every query centroid, shared by ear_probe
// (ear_estimate.cu) and ear_plus_probe (ear_plus.cu): the parameters, the choice between the
// tensor-core pass (ear_probe_tc.cu, the default) and the CUDA-core pass, and the CUDA-core pass's
// staging of query centroids and cluster-sorted tokens with the logits bit-identical to the CPU's
// dot(). The CUDA-core pass kernel (ear_estimate.cu) ends in EAR's score or in ear-plus's per-pair
// state; ear-plus's pair values (ear_plus.cu) recompute the same logits over the same tiles.
//
// The CUDA-core tiling: one block per (32 query centroids, key clusters, (b,h)); lane l of every warp
// owns query centroid a0 + l, warp w the tokens w, w + 8, ... of each tile of 64 cluster-sorted
// tokens staged in shared memory.
#pragma once

#include <cstdint>

#include "cuda/ear/ear.cuh"
#include "cuda/ear/ear_internal.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda::ear {

inline constexpr double kProbeEps = 1e-8;                     // the published probe's floor on errors and areas
inline constexpr int kProbeCentroids = 32;                    // query centroids per block (one per lane)
inline constexpr int kProbeWarps = kThreads / 32;             // token slots per tile row
inline constexpr int kProbeSlots = 8;                         // tokens per warp per tile
inline constexpr int kProbeTile = kProbeWarps * kProbeSlots;  // 64 tokens staged at a time
inline constexpr int kProbeClusters = 8;                      // key clusters per block (amortises the q tile)
inline constexpr int64_t kMaxProbeDim = 256;                  // head dims the probes take (shared memory)

// Row stride of the staged fp32 rows: a multiple of 4 floats (float4 reads) with stride/4 odd, so
// that 8 lanes reading float4s of 8 different rows hit 8 different bank groups.
constexpr int64_t probe_stride(int64_t D) { return (D + 7) / 8 * 8 + 4; }

struct ProbeParams {
  const float* q_centroids;  // [BH, Cq, D]
  const float* k_centroids;  // [BH, Ck, D]
  const float* v_centroids;  // [BH, Ck, D]
  const void* k;             // [B,H,N,D] any strides, of k_dtype
  const void* v;             // [B,H,N,D] any strides, of v_dtype
  int64_t k_stride[4], v_stride[4];
  DType k_dtype, v_dtype;
  const int32_t* labels;  // k_labels, unit stride along N
  int64_t l_stride_b, l_stride_h;
  const int32_t* q_sizes;  // [BH, Cq]
  const int32_t* k_sizes;  // [BH, Ck]
  const int32_t* order;    // [BH, N]: token indices sorted by cluster
  const int32_t* offsets;  // [BH, Ck+1]
  double2* token_stats;    // [BH, N] in sorted order: (|v_t|^2, vbar_label(t) . v_t); the tensor-core
                           // pass keeps float2 (|v_t - vbar|^2, vbar . (v_t - vbar)) in its first half
  double* centroid_norm2;  // [BH, Ck]: |vbar_j|^2
  int64_t H, N, Cq, Ck, D;
  float scale, gamma;
  Strided4<float> scores;  // ear_probe's output
  // ear_plus_probe's pass writes, per (a, j), log E_aj and log M_aj (both with their running max
  // added back; -inf for E <= 0 or M = 0), and the spread when asked for (spread.data non-null).
  double* log_error;  // [BH, Cq, Ck]
  double* log_mass;   // [BH, Cq, Ck]
  Strided4<float> spread;
  int* flag;
};

// The parameters of both probes' passes; the ear-plus outputs are left null.
inline ProbeParams probe_params(const TensorView& q_centroids, const TensorView& k_centroids,
                                const TensorView& v_centroids, const TensorView& k, const TensorView& v,
                                const TensorView& k_labels, const TensorView& q_sizes, const TensorView& k_sizes,
                                float scale, float gamma, const ProbeScratch& s) {
  ProbeParams p{};
  p.q_centroids = static_cast<const float*>(q_centroids.data);
  p.k_centroids = static_cast<const float*>(k_centroids.data);
  p.v_centroids = static_cast<const float*>(v_centroids.data);
  p.k = k.data;
  p.v = v.data;
  copy_strides(k, p.k_stride, 4);
  copy_strides(v, p.v_stride, 4);
  p.k_dtype = k.dtype;
  p.v_dtype = v.dtype;
  p.labels = static_cast<const int32_t*>(k_labels.data);
  p.l_stride_b = k_labels.stride[0];
  p.l_stride_h = k_labels.stride[1];
  p.q_sizes = static_cast<const int32_t*>(q_sizes.data);
  p.k_sizes = static_cast<const int32_t*>(k_sizes.data);
  p.order = s.clusters.sort.index_out;
  p.offsets = s.clusters.offsets;
  p.token_stats = s.token_stats;
  p.centroid_norm2 = s.centroid_norm2;
  p.H = k.shape[1];
  p.N = k.shape[2];
  p.Cq = q_centroids.shape[2];
  p.Ck = k_centroids.shape[2];
  p.D = k.shape[3];
  p.scale = scale;
  p.gamma = gamma;
  p.flag = value_error_flag();
  return p;
}

// The limits both probes share (UnsupportedError naming `op`).
inline void check_probe_limits(int64_t BH, int64_t Ck, int64_t D, const char* op) {
  check_head_dim(D, kMaxProbeDim, op);
  SAPATTN_CHECK(BH <= 65535 && Ck <= 65535 * kProbeClusters, UnsupportedError, op,
                " on CUDA takes at most 65535 (b,h) pairs and ", 65535 * kProbeClusters, " key clusters");
}

// The CPU's dot() on two staged fp32 rows: 8 lanes in order of d, separate multiply and add, the
// remainder into lane 0, the lanes added as a tree.
__device__ __forceinline__ float dot8_tree(const float (&part)[8]) {
  return __fadd_rn(__fadd_rn(__fadd_rn(part[0], part[1]), __fadd_rn(part[2], part[3])),
                   __fadd_rn(__fadd_rn(part[4], part[5]), __fadd_rn(part[6], part[7])));
}

// The block's 32 query centroids a0 .. a0+31 into q_tile [32][Dp] (zero rows past Cq).
__device__ __forceinline__ void stage_query_centroids(const ProbeParams& p, int64_t bh, int64_t a0, float* q_tile) {
  const int64_t D = p.D, Dp = probe_stride(D);
  for (int64_t t = threadIdx.x; t < kProbeCentroids * D; t += kThreads) {
    const int64_t r = t / D, d = t % D;
    q_tile[r * Dp + d] = a0 + r < p.Cq ? p.q_centroids[(bh * p.Cq + a0 + r) * D + d] : 0.0f;
  }
}

// Rows of a [B,H,N,D] tensor (base at (b,h), element strides `stride`) for the n sorted tokens from
// position `first` into rows [n][Dp] as fp32.
template <typename T>
__device__ __forceinline__ void stage_sorted_rows(const T* base, const int64_t* stride, const int32_t* order,
                                                  int32_t first, int n, int64_t D, float* rows) {
  const int64_t Dp = probe_stride(D);
  for (int64_t e = threadIdx.x; e < n * D; e += kThreads) {
    const int64_t i = e / D, d = e % D;
    rows[i * Dp + d] = to_f32(base[order[first + i] * stride[2] + d * stride[3]]);
  }
}

// The logits scale qa . k of this warp's tokens warp, warp + 8, ... below n of a staged tile, as the
// CPU's dot() rounds them; returns how many there are.
__device__ __forceinline__ int tile_logits(const float* qa, const float* tokens, int n, int warp, int64_t D,
                                           float scale, float (&logit)[kProbeSlots]) {
  const int64_t Dp = probe_stride(D);
  const int slots = n > warp ? (n - warp + kProbeWarps - 1) / kProbeWarps : 0;
  float part[kProbeSlots][8] = {};
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
      if (s < slots) part[s][0] = __fadd_rn(part[s][0], __fmul_rn(qa[d], tokens[(warp + s * kProbeWarps) * Dp + d]));
#pragma unroll
  for (int s = 0; s < kProbeSlots; ++s) logit[s] = __fmul_rn(dot8_tree(part[s]), scale);
  return slots;
}

// The pass of both probes on `stream`: the label sort, the clusters' offsets, |vbar_j|^2, then the
// value statistics and the pass kernel, on tensor cores (ear_probe_tc.cu) or CUDA cores
// (ear_estimate.cu), with EAR's epilogue (plus = false: p.scores) or ear-plus's (plus = true:
// p.log_error, p.log_mass, p.spread). p's scratch pointers are s's.
void launch_probe_pass(const ProbeParams& p, const ProbeScratch& s, const TensorView& k_labels, bool plus,
                       bool tensor_cores, cudaStream_t stream);

// Whether a probe's pass runs on tensor cores (ear_probe_tc.cu): bf16 or f16 keys, head dims up to
// 128, an sm_80+ device, no pair values (their second pass recomputes the CUDA-core logits) and no
// set_probe_kernel_override("cuda_cores"). The one place that decides, for both probes.
bool probe_on_tensor_cores(const ProbeParams& p, const Stream& stream, bool pair_values);

// The tensor-core pass (after launch_probe_pass's sort and |vbar_j|^2): its value statistics (fp32,
// in token_stats' bytes) and the pass kernel.
void launch_probe_pass_tc(const ProbeParams& p, int64_t batch_heads, bool plus, cudaStream_t stream);

}  // namespace sapattn::cuda::ear
