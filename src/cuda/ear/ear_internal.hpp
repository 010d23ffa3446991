// The host side that the SVG-EAR and ear-plus files (ear_estimate.cu, ear_select.cu,
// ear_compensation*.cu, ear_plus.cu, ear_split.cu) share: each op family's scratch, carved from the
// caller's workspace (ear_workspace_bytes takes the largest of EAR's, ear_plus_workspace_bytes of
// ear-plus's, compensation_workspace_bytes the compensation's), the argument checks of the
// launchers and the value-check bracket around an op's launches.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/carver.hpp"
#include "cuda/permute/label_sort.hpp"
#include "cuda/runtime/runtime.hpp"
#include "sapattn/error.hpp"
#include "sapattn/tensor.hpp"

namespace sapattn::cuda::ear {

// Labels [B,H,N] i32 (unit stride along N) as the label sort takes them.
inline LabelsView labels_view(const TensorView& t) {
  return {static_cast<const int32_t*>(t.data), t.stride[0], t.stride[1], t.shape[0], t.shape[1], t.shape[2]};
}

// The tokens of every (b,h) grouped by cluster (the label sort: stable, token order within a
// cluster) and each cluster's first position in them (ear_estimate.cu). The probes and the split
// sweep clusters through it.
struct ClusterSort {
  LabelSort sort;              // sort.index_out [BH, N]: the tokens by cluster
  int32_t* offsets = nullptr;  // [BH, C+1]
};

ClusterSort carve_cluster_sort(Carver& carver, int64_t batch_heads, int64_t tokens, int64_t clusters);
void sort_clusters(const ClusterSort& s, const TensorView& labels, cudaStream_t stream);

// ear_probe (ear_estimate.cu): the key tokens by cluster, the per-token value statistics and the
// value centroids' squared norms.
struct ProbeScratch {
  ClusterSort clusters;
  double2* token_stats = nullptr;
  double* centroid_norm2 = nullptr;
};

ProbeScratch carve_probe(Carver& carver, int64_t batch_heads, int64_t tokens, int64_t k_clusters);

// select_top_p_at_density (ear_select.cu): per row, the running sums and key counts in rank order;
// per (b,h), the top-p that meets the density.
struct DensityScratch {
  float* running = nullptr;
  long long* key_count = nullptr;
  float* top_p = nullptr;
};

DensityScratch carve_density(Carver& carver, int64_t batch_heads, int64_t rows, int64_t cols);

// ear_plus_probe (ear_plus.cu): the probe's scratch, then per (a, j) the pass's log E and log M.
struct PlusProbeScratch {
  ProbeScratch probe;
  double* log_error = nullptr;  // [BH, Cq, Ck]
  double* log_mass = nullptr;   // [BH, Cq, Ck]
};

PlusProbeScratch carve_plus_probe(Carver& carver, int64_t batch_heads, int64_t tokens, int64_t q_clusters,
                                  int64_t k_clusters);

// select_error_aware_per_head (ear_select.cu): the double buffers of one radix sort of every pair's
// (head, score) key and its index a*C + j within the head (the ranking: per head, the pairs by
// score); once sorted, a key buffer takes the area ranked before each pair. Per row its budget less
// its guaranteed area, per head the remaining area.
struct HeadRoutingScratch {
  unsigned long long* keys_in = nullptr;   // [BH*R*C]
  unsigned long long* keys_out = nullptr;  // [BH*R*C]
  int32_t* pairs_in = nullptr;             // [BH*R*C]
  int32_t* pairs_out = nullptr;            // [BH*R*C]
  long long* row_budget = nullptr;         // [BH*R]
  long long* remaining = nullptr;          // [BH]
  void* temp = nullptr;                    // the radix sort's and the scan's
  size_t temp_bytes = 0;
  int end_bit = 32;
};

HeadRoutingScratch carve_head_routing(Carver& carver, int64_t batch_heads, int64_t rows, int64_t cols);

// split_clusters (ear_split.cu): the points by cluster and the side of each sorted point.
struct SplitScratch {
  ClusterSort clusters;
  uint8_t* side = nullptr;  // [BH, N]
};

SplitScratch carve_split(Carver& carver, int64_t batch_heads, int64_t tokens, int64_t clusters);

// cluster_means (ear_estimate.cu): a [B*H, C] i32 sizes buffer, then kmeans_update's scratch.
void carve_means(Carver& carver, int64_t batch_heads, int64_t tokens, int64_t clusters, int64_t dim, int32_t** sizes,
                 Workspace* update);

// The compensation on tensor cores (ear_compensation_tc.cu): the label sort of the video query rows
// and each query cluster's first sorted row [BH, Cq + 1]; the pseudo-keys' bf16 operands (k, v:
// [BH, Ck, Dp], Dp = 64 or 128) and log sizes [BH, Ck].
struct CompensationScratch {
  LabelSort sort;
  int32_t* offsets = nullptr;
  void* k_operand = nullptr;
  void* v_operand = nullptr;
  float* log_size = nullptr;
};

CompensationScratch carve_compensation(Carver& carver, int64_t batch_heads, int64_t tokens, int64_t q_clusters,
                                       int64_t pseudo_keys, int64_t dim);

// corrected_centroid_compensation's contract (centroid_compensation's with spread and pair_values
// empty) on tensor cores, head dims up to 128, after the op's checks; `op` names it in errors.
void compensation_tensor_cores(const char* op, const TensorView& q, const TensorView& q_labels,
                               const TensorView& mask, const TensorView& k_centroids, const TensorView& v_centroids,
                               const TensorView& k_sizes, const TensorView& spread, const TensorView& pair_values,
                               float scale, TensorView out, TensorView lse, const Stream& stream, Workspace workspace);

inline void copy_strides(const TensorView& t, int64_t* out, int rank) {
  for (int d = 0; d < rank; ++d) out[d] = t.stride[d];
}

inline void check_head_dim(int64_t D, int64_t limit, const char* op) {
  SAPATTN_CHECK(D <= limit, UnsupportedError, op, " on CUDA takes head dims up to ", limit, ", got ", D);
}

// Runs `launches` between the value-check bracket (see cuda/backend.hpp).
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

}  // namespace sapattn::cuda::ear
