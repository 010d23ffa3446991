// The host side that the SVG-EAR and ear-plus files (ear_estimate.cu, ear_select.cu,
// ear_compensation*.cu, ear_plus.cu, ear_split.cu) share: each op family's scratch, carved from the
// caller's workspace (ear_workspace_bytes takes the largest of EAR's, ear_plus_workspace_bytes of
// ear-plus's, compensation_workspace_bytes the compensation's), the argument checks of the
// launchers and the value-check bracket around an op's launches.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

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

// The compensation on tensor cores. Both kernels (ear_compensation_tc.cu: mma.sync, any sm_80+;
// ear_compensation_sm90.cu: wgmma, sm_90a) take the pseudo-keys as bf16 operands [BH, Ck_pad, Dp]:
// Ck_pad = Ck rounded up to kCompensationTile with zero rows, Dp = compensation_dim(D). The wgmma
// kernel cuts each query cluster's sorted rows into slots of kCompensationSlotRows rows.
inline constexpr int kCompensationTile = 128;
inline constexpr int kCompensationSlotRows = 16;
constexpr int64_t compensation_dim(int64_t D) { return D <= 64 ? 64 : 128; }
constexpr int64_t compensation_rows(int64_t pseudo_keys) {
  return (pseudo_keys + kCompensationTile - 1) / kCompensationTile * kCompensationTile;
}
// The wgmma kernel's slots per (b,h): the clusters' sum of ceil(|Q_a| / 16) is at most
// ceil((N + 15 Cq) / 16); rounded up to whole items of 8 slots.
constexpr int64_t compensation_slots(int64_t tokens, int64_t q_clusters) {
  const int64_t slots =
      (tokens + (kCompensationSlotRows - 1) * q_clusters + kCompensationSlotRows - 1) / kCompensationSlotRows;
  return (slots + 7) / 8 * 8;
}

// What both tensor-core kernels read and write per video row, as kernel parameters: q [B,H,S,D] (any
// float dtype and strides), the rows of every (b,h) in query-cluster order (the label sort's), and
// out [B,H,S,D], lse [B,H,S] (strided) that the compensation merges into.
struct CompensationIo {
  const void* q;
  int64_t q_stride[4];
  DType q_dtype;
  const int32_t* order;  // [BH, N]
  void* out;
  int64_t out_stride[4];
  DType out_dtype;
  float* lse;
  int64_t lse_stride[3];
  int64_t H, N, Cq, D;
};

// The compensation's scratch: the label sort of the video query rows and each query cluster's first
// sorted row [BH, Cq + 1]; the pseudo-keys' bf16 operands (k, v) and log sizes [BH, Ck]; for the
// wgmma kernel the slots [BH, compensation_slots] (int4: cluster, first sorted row, rows, 0), their
// count [BH] and the logit bias [BH, Cq, Ck_pad] (f32, log2 units, -inf where nothing is added).
struct CompensationScratch {
  LabelSort sort;
  int32_t* offsets = nullptr;
  void* k_operand = nullptr;
  void* v_operand = nullptr;
  float* log_size = nullptr;
  int4* slots = nullptr;
  int32_t* slot_count = nullptr;
  float* bias = nullptr;
};

CompensationScratch carve_compensation(Carver& carver, int64_t batch_heads, int64_t tokens, int64_t q_clusters,
                                       int64_t pseudo_keys, int64_t dim);

// Which kernel the compensation ops run (set_compensation_kernel_override): Auto takes wgmma where
// it runs (compensation_wgmma_available, no pair values) and mma.sync elsewhere; CudaCores is
// centroid_compensation's CUDA-core kernel (corrected_centroid_compensation takes Auto's then);
// Wgmma refuses a device without it (pair values still take mma.sync).
enum class CompensationKernel { Auto, CudaCores, MmaSync, Wgmma };

// corrected_centroid_compensation's contract (centroid_compensation's with spread and pair_values
// empty) on tensor cores, head dims up to 128, after the op's checks; `op` names it in errors.
void compensation_tensor_cores(const char* op, const TensorView& q, const TensorView& q_labels, const TensorView& mask,
                               const TensorView& k_centroids, const TensorView& v_centroids, const TensorView& k_sizes,
                               const TensorView& spread, const TensorView& pair_values, float scale, TensorView out,
                               TensorView lse, const Stream& stream, Workspace workspace, CompensationKernel kernel);

// The wgmma kernel (ear_compensation_sm90.cu): whether `device` runs it (sm_90, tensor maps, a
// 16-byte aligned workspace), and its launches after compensation_tensor_cores' sort and operands.
bool compensation_wgmma_available(int device, const void* workspace);
void compensation_wgmma(const CompensationScratch& s, const TensorView& q, const TensorView& mask,
                        const TensorView& spread, int64_t pseudo_keys, float scale, TensorView out, TensorView lse,
                        int device, cudaStream_t stream);

// The name set_probe_kernel_override takes: true for "cuda_cores", false for "" or nullptr (the
// default kernel); any other name throws InvalidArgumentError naming `what`.
inline bool cuda_cores_override(const char* name, const char* what) {
  const bool cuda_cores = name != nullptr && std::strcmp(name, "cuda_cores") == 0;
  SAPATTN_CHECK(cuda_cores || name == nullptr || name[0] == '\0', InvalidArgumentError, "unknown ", what,
                " kernel override '", name, "' (expected \"cuda_cores\" or \"\")");
  return cuda_cores;
}

inline void copy_strides(const TensorView& t, int64_t* out, int rank) {
  for (int d = 0; d < rank; ++d) out[d] = t.stride[d];
}

// The CompensationIo of a call: its q, out and lse, and the label sort's order of its N video rows.
inline CompensationIo compensation_io(const TensorView& q, const int32_t* order, int64_t tokens, int64_t q_clusters,
                                      const TensorView& out, const TensorView& lse) {
  CompensationIo io{};
  io.q = q.data;
  copy_strides(q, io.q_stride, 4);
  io.q_dtype = q.dtype;
  io.order = order;
  io.out = out.data;
  copy_strides(out, io.out_stride, 4);
  io.out_dtype = out.dtype;
  io.lse = static_cast<float*>(lse.data);
  copy_strides(lse, io.lse_stride, 3);
  io.H = q.shape[1];
  io.N = tokens;
  io.Cq = q_clusters;
  io.D = q.shape[3];
  return io;
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
