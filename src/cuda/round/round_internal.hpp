// The pieces of round_query_clusters on the GPU shared by round.cu (the op: label sort, roles,
// candidate choice, matching), round_cost.cu (the exact path's fp32 dot products: the prefilter's
// distances and the mass cost) and round_cost_tc.cu (the same two steps on tensor cores, held to a
// tolerance). Every per-head array lives in the op's workspace, laid out [B*H, ...].
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "cuda/kmeans/kmeans_internal.hpp"

namespace sapattn::cuda::qround {

inline constexpr int kBlock = 64;             // rows of a warpgroup block: the size the tails are rounded to
inline constexpr int kTile = 32;              // candidates a cost block holds at once (one per lane)
inline constexpr int kCostThreads = 256;      // 64 row lanes x 4 groups of 8 candidates
inline constexpr int64_t kMaxClusters = 8192;  // Cq: the roles kernel keeps its per-cluster arrays in shared memory
// The cost kernels walk one flat list of tiles over all heads (tile t of the list: the head whose
// range holds it), block b taking tiles b, b + grid, ... A head's share of blocks no longer depends
// on B*H: 264 blocks are two per SM (128 registers, 256 threads) on an H100's 132 SMs, one wave;
// with few heads, 16 blocks per head bound the per-block scratch.
inline constexpr int64_t kCostBlocks = 264;
inline constexpr int64_t kMaxCostBlocksPerHead = 16;
// The tensor-core path (round_cost_tc.cu): 128 candidates a block (4 warps of two m16 tiles), key
// tiles of 64 rows, the mass cost's output columns (query clusters) 128 at a time, head dims up to 128
// (operands zero-padded to 64 or 128).
inline constexpr int kTcRows = 128;
inline constexpr int kTcKeys = 64;
inline constexpr int kTcCols = 128;
inline constexpr int64_t kTcMaxDim = 128;
// The bias of a row the tensor cores must ignore (a non-target in the prefilter, an empty or padding
// key cluster in the mass): finite, so no -inf enters the accumulators, and low enough that it never
// wins a maximum and its weight exp2(bias scale log2 e - max) is 0 once any real row is seen.
inline constexpr float kTcPadBias = -0x1p120f;

inline int64_t cost_blocks(int64_t batch_heads) {
  return batch_heads * kMaxCostBlocksPerHead < kCostBlocks ? batch_heads * kMaxCostBlocksPerHead : kCostBlocks;
}

// What the roles kernel found for one head.
struct HeadInfo {
  int32_t active;   // something may move: donors, targets and candidates exist
  int32_t any_key;  // a key cluster is non-empty (else every cost is 0)
  int32_t R;        // targets
  int32_t P0;       // donor points (the prefilter's input)
  int32_t P;        // candidates
  int32_t kk;       // ranked targets per candidate: min(candidates, R)
};

// Sizes of one call. Pb bounds P; Pb * kk bounds the ranked lists.
struct Dims {
  int64_t BH = 0, H = 0, N = 0, D = 0, C = 0, Ck = 0;
  int64_t W = 0;              // 32-bit words per mask row: ceil(Ck / 32)
  int64_t Pb = 0;             // candidates per head at most
  int64_t blocks = 0;         // cost blocks of the flat tile list: cost_blocks(BH)
  int64_t kk = 0;             // ranked targets per candidate at most: min(candidates, C)
  int64_t tile_rows = kTile;  // candidates per tile of the flat lists: kTile, or kTcRows on tensor cores
  // Tensor-core operands: query-centroid rows padded to kTcKeys, key-centroid rows likewise, the mass
  // cost's value columns (one per query cluster) padded to kTcCols, the head dim padded to 64 or 128.
  int64_t c_pad = 0, ck_pad = 0, v_cols = 0, Dp = 0;
  int slack = 0, prefilter = 0, rounds = 0;
  float scale = 0.0f;
  double max_cost = 0.0;
};

// The workspace arrays (per head: the stride in brackets).
struct Work {
  int* bad = nullptr;              // one word for the call: a bad label or key-cluster size anywhere
  HeadInfo* info = nullptr;        // [1]
  int32_t* sorted = nullptr;       // [N]: point indices grouped by label (the label sort)
  int32_t* offsets = nullptr;      // [C+1]: label c occupies sorted[offsets[c], offsets[c+1])
  int32_t* give = nullptr;         // [C]: a donor's tail, 0 for other clusters
  int32_t* placed_of = nullptr;    // [C]: candidates of a donor placed so far
  int32_t* group_off = nullptr;    // [C+1]: the candidates of donor d (see members)
  int32_t* donor_off = nullptr;    // [C+1]: the points of donor d in pts0 (prefilter)
  int32_t* targets = nullptr;      // [C]: cluster of target r, r < R
  int32_t* need = nullptr;         // [C]: per target
  int32_t* cap = nullptr;          // [C]
  int32_t* received = nullptr;     // [C]
  int32_t* room = nullptr;         // [C]
  int32_t* bucket_off = nullptr;   // [C+1]: offers per target, scanned
  int32_t* bucket_fill = nullptr;  // [C]
  float* c2 = nullptr;             // [C]: |c|^2 of every query centroid
  uint32_t* rowbits = nullptr;     // [C*W]: mask row a as bits, bit j of word j / 32
  int32_t* pts0 = nullptr;         // [N]: donor points grouped by donor (prefilter)
  float* best = nullptr;           // [N]: their best distance cost, by position in pts0
  int32_t* pts = nullptr;          // [Pb]: candidate p's point
  int32_t* donor = nullptr;        // [Pb]: candidate p's cluster
  int32_t* members = nullptr;      // [Pb]: without the prefilter, the candidates of donor d are
                                   // members[group_off[d] ..]; with it, the range group_off[d] .. itself
  int32_t* p_of_point = nullptr;   // [N]: without the prefilter, the candidate of a donor point
  int32_t* cand_idx = nullptr;     // [Pb*kk]: candidate p's ranked targets
  double* cand_cost = nullptr;     // [Pb*kk]: and their costs (+inf: forbidden)
  int32_t* first = nullptr;        // [Pb]: matching state: rank of this round's pick, or -1
  double* cur = nullptr;           // [Pb]: its cost
  int32_t* dest = nullptr;         // [Pb]: the target a candidate was placed on, or -1
  int32_t* offer = nullptr;        // [Pb]: the target offered to this round, or -1
  int32_t* bucket = nullptr;       // [Pb]: offers grouped by target
  // Call-wide, not per head:
  int32_t* tiles0 = nullptr;    // [BH+1]: the prefilter's flat tile list, head bh's tiles from tiles0[bh]
  int32_t* tiles = nullptr;     // [BH+1]: the mass cost's
  double* tile_z = nullptr;     // [blocks * kTile * Ck]: a cost block's softmax weights
  double* tile_cost = nullptr;  // [blocks * kTile * C]: and its costs
  // The tensor-core path's (carved on every call: the scratch size does not know the path):
  uint16_t* qc_op = nullptr;   // [c_pad, Dp] bf16: query centroids, zero-padded (prefilter keys)
  float* pf_bias = nullptr;    // [c_pad]: -|c_r|^2 / 2 for a target, kTcPadBias for any other row
  uint16_t* kc_op = nullptr;   // [ck_pad, Dp] bf16: key centroids, zero-padded (mass keys)
  float* k_bias = nullptr;     // [ck_pad]: log|K_j| / scale, kTcPadBias for an empty or padding row
  uint16_t* v_op = nullptr;    // [ck_pad, v_cols] bf16: V[j][a] = mask[a, j] (0 or 1), 0 past C or Ck
  float* tile_mass = nullptr;  // call-wide [blocks * kTcRows * v_cols]: a block's masses per query cluster
};

// The inputs the cost kernels read.
struct CostInputs {
  PointsView q;
  const float* qc = nullptr;    // [B*H, C, D]
  const float* kc = nullptr;    // [B*H, Ck, D]
  const int32_t* ks = nullptr;  // [B*H, Ck]
  const int32_t* labels = nullptr;
  int64_t labels_stride_b = 0, labels_stride_h = 0;
  bool vector_rows = false;  // centroid rows can be read as aligned float4 (D % 4 == 0, 16-byte base)
};

// round_cost.cu: each candidate's best distance cost over the targets (pts0 -> best), and each
// candidate's kk cheapest targets by mass cost (pts -> cand_idx, cand_cost).
void launch_prefilter(const CostInputs& in, const Dims& dims, const Work& w, DType dtype, cudaStream_t stream);
void launch_mass_cost(const CostInputs& in, const Dims& dims, const Work& w, DType dtype, cudaStream_t stream);

// round_cost_tc.cu: the same two results on tensor cores (bf16 operands, fp32 accumulators), after
// launch_tc_operands has rounded the centroids and the mask to the operands (once the roles kernel
// has written the targets, |c|^2 and the mask bits). Dims::tile_rows must be kTcRows.
void launch_tc_operands(const CostInputs& in, const Dims& dims, const Work& w, cudaStream_t stream);
void launch_prefilter_tc(const CostInputs& in, const Dims& dims, const Work& w, DType dtype, cudaStream_t stream);
void launch_mass_cost_tc(const CostInputs& in, const Dims& dims, const Work& w, DType dtype, cudaStream_t stream);

// Which cost path a call takes (the one answer for "supported?" and "which kernel?"): the tensor
// cores for f16/bf16 points of head dim <= 128 on sm_80+, unless set_round_kernel_override("exact");
// "tc" forces them for any dtype (f32 points rounded to bf16) and throws UnsupportedError where they
// cannot run.
bool round_on_tensor_cores(DType dtype, int64_t dim, int device);

// For tests: what the last call on `workspace` ranked (synchronous copies). Per head bh: info[bh];
// candidate p < info[bh].P is point pts[bh * Pb + p] of cluster donor[bh * Pb + p]; ranked_target and
// ranked_cost give its k-th cheapest target cluster (k < info[bh].kk) and that move's cost.
struct RankedCosts {
  int64_t C = 0, Pb = 0, kk_max = 0;
  std::vector<HeadInfo> info;
  std::vector<int32_t> pts, donor, targets, cand_idx;
  std::vector<double> cand_cost;
  int32_t ranked_target(int64_t bh, int64_t p, int64_t k) const {
    return targets[bh * C + cand_idx[bh * Pb * kk_max + p * info[bh].kk + k]];
  }
  double ranked_cost(int64_t bh, int64_t p, int64_t k) const {
    return cand_cost[bh * Pb * kk_max + p * info[bh].kk + k];
  }
};
RankedCosts read_ranked_costs(const void* workspace, int64_t batch_heads, int64_t points, int64_t q_clusters,
                              int64_t k_clusters, int slack, int prefilter, int candidates);

}  // namespace sapattn::cuda::qround
