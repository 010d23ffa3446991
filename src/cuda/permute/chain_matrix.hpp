// The matrix kernels of order_clusters' chain (chain_matrix.cu), chosen by the knob
// set_order_chain_override("matrix"): all C x C similarity keys of a head first, then a chain that
// only reads them. cluster_order.cu chooses, carves and launches them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/carver.hpp"

namespace sapattn::cuda::chain_matrix {

// The chain kernel's CTA holds at most 1024 threads of 8 candidates each.
inline constexpr int64_t kMaxClusters = 8192;

// Whether the matrix kernels take C clusters of dimension D (rows padded to 64 or 128, as the
// cluster kernel pads them).
constexpr bool fits(int64_t clusters, int64_t dim) {
  return clusters >= 1 && clusters <= kMaxClusters && dim >= 1 && dim <= 128;
}

// The chain kernel's threads per CTA for C clusters: 8 candidates a thread, whole warps.
int chain_threads(int64_t clusters);

struct Scratch {
  float* inv_norms = nullptr;  // [BH, C]
  uint32_t* keys = nullptr;    // [BH, C, C]: row i holds the keys of every candidate j with i current
};
// 4 C (C + 1) bytes per head (plus alignment): 160 MB at [1,40,1000,128].
Scratch carve(Carver& carver, int64_t batch_heads, int64_t clusters);

// Writes rank[bh * C + c], the chain's position of cluster c (empty clusters last, in index order),
// bit for bit the CPU reference's. Needs fits(C, D).
void build_chain(const float* centroids, const int32_t* sizes, int64_t batch_heads, int64_t clusters, int64_t dim,
                 const Scratch& scratch, int32_t* rank, cudaStream_t stream);

}  // namespace sapattn::cuda::chain_matrix
