// The k-means pieces shared between kmeans.cu (the ops), the tensor-core assignments (mma.sync and
// wgmma, each instantiated in one generated file per head dim of SAPATTN_TENSOR_CORE_ASSIGN_HEAD_DIMS
// below; which one runs: assign_plan.cu), and the
// greedy seeding (kmeans_seed.cu), which starts from kmeans_init's order.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/carver.hpp"
#include "sapattn/dtype.hpp"
#include "sapattn/tensor.hpp"

namespace sapattn::cuda {

// Points [B,H,N,D] of any float dtype and element strides, as the kernels take them.
struct PointsView {
  const void* data = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};
  int64_t B = 0, H = 0, N = 0, D = 0;
};

inline PointsView points_view(const TensorView& t) {
  PointsView v;
  v.data = t.data;
  for (int d = 0; d < 4; ++d) v.stride[d] = t.stride[d];
  v.B = t.shape[0];
  v.H = t.shape[1];
  v.N = t.shape[2];
  v.D = t.shape[3];
  return v;
}

// kmeans_init's order of every (b,h)'s points (kmeans.cu): point i of problem id gets the key
// splitmix64(seed ^ splitmix64(id * 2^32 + i)); one segmented radix sort orders them all.
struct SampleSort {
  uint64_t* keys_in = nullptr;
  uint64_t* keys_out = nullptr;
  int32_t* index_in = nullptr;
  int32_t* index_out = nullptr;  // [B*H, N]: per (b,h), the point indices by ascending key
  int32_t* segments = nullptr;   // [B*H + 1]
  void* temp = nullptr;
  size_t temp_bytes = 0;
};

// Takes the sort's buffers from `carver`; UnsupportedError past 2^31 points in all.
SampleSort carve_sample_sort(Carver& carver, int64_t batch_heads, int64_t points);
// Sorts the points of every (b,h) by key into s.index_out. sample_ids: [B*H] or null (ids b*H + h).
void sort_sample(const SampleSort& s, uint64_t seed, int64_t batch_heads, int64_t points, const int32_t* sample_ids,
                 cudaStream_t stream);
// kmeans_init's centroids from the order: centroid c of (b,h) = its point of rank c mod N.
void gather_sample(const TensorView& points, const int32_t* order, TensorView centroids, cudaStream_t stream);

// The head dims with a tensor-core assignment, X(D) for each: the one list that support
// (tensor_core_assign), the dispatch (kmeans.cu) and the instantiations read. src/CMakeLists.txt
// generates one translation unit per head dim and kernel from kmeans_assign_instance.cu.in (mma.sync)
// and assign_sm90_instance.cu.in (wgmma); a unit holds the dim's kernels for every point dtype (more
// in one unit would raise nvcc's peak memory).
#define SAPATTN_TENSOR_CORE_ASSIGN_HEAD_DIMS(X) X(64) X(128)

// Whether head dim `dim` has a tensor-core assignment. Support and dispatch both ask this one function.
constexpr bool tensor_core_assign(int64_t dim) {
#define SAPATTN_IS_HEAD_DIM(D) dim == D ||
  return SAPATTN_TENSOR_CORE_ASSIGN_HEAD_DIMS(SAPATTN_IS_HEAD_DIM) false;
#undef SAPATTN_IS_HEAD_DIM
}

// The mma.sync kernel streams centroids in tiles of this many rows; its prepared copy is padded to a
// multiple.
inline constexpr int64_t kCentroidTile = 64;

// The operand type of the matrix units for points of a dtype: f16 points multiply in f16 (exact),
// bf16 and f32 points in bf16 (f32 points are rounded; bf16 keeps their range).
constexpr DType operand_dtype(DType points) { return points == DType::F16 ? DType::F16 : DType::BF16; }

// The centroids as the assignment kernel reads them, written once per Lloyd iteration by
// prepare_centroids (kmeans.cu).
struct PreparedCentroids {
  const void* operand = nullptr;     // [B*H, C_pad, D] operand dtype: round(-c); zero rows past C
  const float* half_norm = nullptr;  // [B*H, C_pad]: ||c||^2 / 2 in fp32; +inf past C
  const int32_t* stats = nullptr;    // [B*H, 2]: fp32 bits of max_c ||c||^2 and max_c ||c - round(c)||
  int64_t c_pad = 0;
};

struct TensorCoreAssignParams {
  const void* points = nullptr;  // [B,H,N,D], any strides (elements)
  int64_t p_stride[4] = {0, 0, 0, 0};
  int64_t H = 0, N = 0;
  int64_t C = 0;
  bool vector_rows = false;  // points rows can be read in aligned 16-byte chunks of the operand type
  PreparedCentroids prepared;
  const float* centroids = nullptr;  // [B*H, C, D] f32: the exact distances of near-ties
  int32_t* labels = nullptr;
  int64_t l_stride_b = 0, l_stride_h = 0;
  unsigned long long* refined = nullptr;  // optional counter of re-ranked rows
  int index_bits = 1;                     // bits of a column index: bit_width(C_pad - 1)
  int index_mask = 1;                     // (1 << index_bits) - 1
};

// Launches the tensor-core assignment for head dim D over B*H problems; defined for each D of
// SAPATTN_TENSOR_CORE_ASSIGN_HEAD_DIMS in its generated translation unit.
template <int D>
void launch_tensor_core_assign(const TensorCoreAssignParams& p, DType points_dtype, int64_t batch_heads,
                               cudaStream_t stream);

// The wgmma (sm_90a) assignment (assign_sm90.cuh; generated assign_sm90_d<D>.cu): a configuration is
// its point rows per consumer warpgroup and its centroid tile width. The compiled ones:
struct Sm90AssignConfig {
  int group_rows = 64;
  int tile_n = 256;
  constexpr bool operator==(const Sm90AssignConfig&) const = default;
};
inline constexpr Sm90AssignConfig kSm90AssignConfigs[] = {{64, 64}, {64, 160}, {64, 256}, {128, 128}};

// Launches the wgmma assignment for head dim D over B*H problems (p.prepared padded to a multiple of
// config.tile_n), one persistent CTA per SM.
template <int D>
void launch_sm90_assign(const TensorCoreAssignParams& p, DType points_dtype, int64_t batch_heads,
                        Sm90AssignConfig config, int num_sms, cudaStream_t stream);

// Which tensor-core assignment runs for C clusters at head dim D on `device` (assign_plan.cu, after
// cuda::set_assign_kernel), and the padding of the prepared centroids it reads: a multiple of
// kCentroidTile for the mma.sync kernel, of the tile width for the wgmma kernel. `prepared`: the
// operand and half norms the wgmma kernel would load by TMA (they must be 16-byte aligned).
struct AssignPlan {
  bool sm90 = false;
  Sm90AssignConfig config;
  int64_t c_pad = 0;
  int num_sms = 0;
};
AssignPlan plan_assign(int device, int64_t clusters, int64_t dim, const PreparedCentroids& prepared);
// Rows per (b,h) of the prepared centroids in the workspace: enough for every plan of C clusters.
int64_t prepared_rows(int64_t clusters);

}  // namespace sapattn::cuda
