// Grouping tokens by label on the GPU, shared by cluster_permutation and the k-means update: one
// stable radix sort of (b*H + h, label) keys over all B*H problems at once, then the cluster
// offsets by binary search in the sorted keys. Stable, so the tokens of a cluster stay in their
// original order, and deterministic.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/carver.hpp"

namespace sapattn::cuda {

// Labels [B,H,N] i32 with unit stride along N.
struct LabelsView {
  const int32_t* data = nullptr;
  int64_t stride_b = 0, stride_h = 0;
  int64_t B = 0, H = 0, N = 0;
};

struct LabelSort {
  int64_t batch_heads = 0, tokens = 0, clusters = 0;
  uint32_t* keys_in = nullptr;   // [B*H*N]
  uint32_t* keys_out = nullptr;  // [B*H*N]: sorted keys (b*H+h)*(C+1) + label; label C = out of range
  int32_t* index_in = nullptr;   // [B*H*N]
  int32_t* index_out = nullptr;  // [B*H*N]: per (b,h), the token indices in cluster order
  void* temp = nullptr;
  size_t temp_bytes = 0;
  int end_bit = 1;
};

// Takes the sort's buffers from `carver`. With `index_out` given (the caller's perm tensor), that is
// the output; otherwise it is carved too. Throws UnsupportedError when (b,h, label) keys would not
// fit in 32 bits.
LabelSort carve_label_sort(Carver& carver, int64_t batch_heads, int64_t tokens, int64_t clusters,
                           int32_t* index_out = nullptr);

// Sorts the tokens of every (b,h) by label. Labels outside [0, C) go last (a trash bucket) and
// raise kBadLabel in the value flag.
void sort_by_label(const LabelSort& sort, const LabelsView& labels, cudaStream_t stream);

// offsets[bh*(C+1) + c] = first position of cluster c in the sorted tokens of (b,h) (c = C: the
// number of tokens with a valid label). With sizes non-null, also sizes[bh*C + c] = its count.
void label_offsets(const LabelSort& sort, int32_t* offsets, int32_t* sizes, cudaStream_t stream);

}  // namespace sapattn::cuda
