// kmeans_seed_greedy's cluster kernel (seed_cluster.cu, sm_90): what the launcher in kmeans_seed.cu
// hands it, and the shared-memory layout of a CTA, computed by the same function on the host (to
// choose the CTAs per head, cuda::seed_kernel) and in the kernel. Host-includable.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "core/host_device.hpp"
#include "cuda/kmeans/kmeans_internal.hpp"
#include "sapattn/dtype.hpp"

namespace sapattn::cuda {

inline constexpr int kSeedClusterThreads = 512;  // per CTA: one CTA per SM, 16 warps
inline constexpr int kSeedMaxTrials = 32;        // 2 + floor(ln C) <= 23 for C < 2^31
inline constexpr int kSeedMaxClusterCtas = 8;    // the portable cluster size

// Byte offsets of a CTA's dynamic shared memory for `per_cta` sample points of `dim` elements of
// `elem_bytes` each, `trials` trials and `ctas` CTAs per head. Regions are 16-byte aligned.
struct SeedClusterLayout {
  int row_bytes = 0;   // one point's elements in shared memory, padded with zeros to a multiple of 16
                       // elements (screened: the mma's k) or of 8 (a whole 16- or 32-byte chunk)
  int row_stride = 0;  // row_bytes where rows are XOR-swizzled (rows of a multiple of 128 bytes),
                       // else row_bytes + 16 (the same bank spreading by padding)
  bool swizzle = false;
  int cand_rows = 0;    // candidate rows per buffer: trials rounded up to the mma's 8 columns
  int cand_stride = 0;  // row_bytes + 16
  size_t rows = 0;      // [per_cta] sample rows, the point dtype
  size_t cand = 0;      // [2][cand_rows] candidate rows (double-buffered by step parity)
  size_t d2 = 0;        // [per_cta] f32: current distance D2
  size_t norm = 0;      // [per_cta] f32: |x|^2 for the screen (screened only)
  size_t live = 0;      // [per_cta] u16: the points with q(D2) > 0, in no particular order
  size_t list_p = 0;    // [trials][per_cta] u16: per trial, the points whose exact distance is computed
  size_t list_m = 0;    // [trials][per_cta] f32: their min(D2, distance)
  size_t slots = 0;     // [ctas][trials + 1] u64: each CTA's potential reductions and its sum of q(D2)
  size_t max_bits = 0;  // [ctas] u32: each CTA's largest finite first distance
  size_t bytes = 0;     // in all

  // The byte offset of sample row `row`'s 16-byte chunk `chunk` from the row's start: chunk ^ (row % 8)
  // where rows are swizzled.
  SAPATTN_HOST_DEVICE constexpr int chunk_offset(int row, int chunk) const {
    return (swizzle ? chunk ^ (row & 7) : chunk) * 16;
  }
};

SAPATTN_HOST_DEVICE constexpr size_t seed_align16(size_t b) { return (b + 15) / 16 * 16; }

SAPATTN_HOST_DEVICE constexpr SeedClusterLayout seed_cluster_layout(int64_t per_cta, int64_t dim, int elem_bytes,
                                                                    int trials, int ctas, bool screen) {
  SeedClusterLayout l;
  const int64_t padded = screen ? (dim + 15) / 16 * 16 : (dim + 7) / 8 * 8;
  l.row_bytes = static_cast<int>(padded * elem_bytes);
  l.swizzle = l.row_bytes % 128 == 0;
  l.row_stride = l.swizzle ? l.row_bytes : l.row_bytes + 16;
  l.cand_rows = (trials + 7) / 8 * 8;
  l.cand_stride = l.row_bytes + 16;
  const size_t P = static_cast<size_t>(per_cta), T = static_cast<size_t>(trials);
  // Each region starts where the previous one ends, rounded up to 16 bytes.
  l.rows = 0;
  l.cand = l.rows + seed_align16(P * static_cast<size_t>(l.row_stride));
  l.d2 = l.cand + seed_align16(2 * static_cast<size_t>(l.cand_rows) * static_cast<size_t>(l.cand_stride));
  l.norm = l.d2 + seed_align16(P * 4);
  l.live = l.norm + seed_align16(screen ? P * 4 : 0);
  l.list_p = l.live + seed_align16(P * 2);
  l.list_m = l.list_p + seed_align16(T * P * 2);
  l.slots = l.list_m + seed_align16(T * P * 4);
  l.max_bits = l.slots + seed_align16(static_cast<size_t>(ctas) * (T + 1) * 8);
  l.bytes = l.max_bits + seed_align16(static_cast<size_t>(ctas) * 4);
  return l;
}

// One seeding, as both kernels take it.
struct SeedProblem {
  PointsView pts;
  const int32_t* order = nullptr;       // [B*H, N]: kmeans_init's order; the sample is its first M entries
  const int32_t* sample_ids = nullptr;  // [B*H] or null
  float* centroids = nullptr;           // [B*H, C, D]
  uint64_t seed = 0;
  int64_t M = 0, C = 0;
  int trials = 0;
  int bits = 0;  // seeding::sample_bits(M)
};

struct SeedClusterParams : SeedProblem {
  int per_cta = 0;  // sample points per CTA: ceil(M / ctas); the last CTAs may hold fewer, or none
  SeedClusterLayout layout;
};

// The CTAs' static shared memory and the PTX version of the kernel for `dtype` on the current device
// (below 90: no sm_90 code in this build, the kernel cannot run).
cudaFuncAttributes seed_cluster_attributes(DType dtype, bool screen);

// Grid (ctas, B*H), clusters of (ctas, 1, 1), kSeedClusterThreads threads, layout.bytes of dynamic
// shared memory. screen: bf16 or f16 points.
void launch_seed_cluster(const SeedClusterParams& p, DType dtype, bool screen, int ctas, int64_t batch_heads,
                         cudaStream_t stream);

}  // namespace sapattn::cuda
