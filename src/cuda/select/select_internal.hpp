// What select.cu (the ops, the exact kernel, the kernel choice) and select_threshold.cu (the default
// select_blocks kernel) share.
#pragma once

#include <cuda_runtime.h>

#include "sapattn/tensor.hpp"

namespace sapattn::cuda {

// select_blocks by a threshold search instead of a ranking (select_threshold.cu): FMA scores, and
// per row the crossing of the top-p mass found by a radix search over the weights' float bits on
// exact integer masses. Same contract as select_blocks; masks within docs/cuda.md's tolerance of
// the CPU's. The op's argument checks are the caller's; UnsupportedError beyond kMaxSelectColumns key
// clusters or 65535 (b,h) pairs; any head dim.
void select_blocks_threshold(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& k_sizes,
                             float scale, float top_p, int min_kept, TensorView mask, cudaStream_t stream);

}  // namespace sapattn::cuda
