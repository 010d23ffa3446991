// The types that the op contracts (sapattn/ops.hpp) and every backend share, apart from the tensor
// views: the variable-size block layout that selection hands to attention, the row permutations
// an attention call may fuse, and the answer to "which attention kernel runs". A backend includes
// this header, not ops.hpp: it implements the ops, it does not call them. ops.hpp includes it, so
// user code that includes ops.hpp sees these types as before.
#pragma once

#include "sapattn/tensor.hpp"

namespace sapattn {

// The variable-size block layout of cluster-permuted tensors, the interface between selection and
// attention (block_sparse_attention, block_density).
struct BlockLayout {
  TensorView q_offsets;  // [B,H,Cq+1] i32: query cluster a = rows [q_offsets[a], q_offsets[a+1])
  TensorView k_offsets;  // [B,H,Ck+1] i32: key cluster b = rows [k_offsets[b], k_offsets[b+1])
  TensorView mask;       // [B,H,Cq,Ck] u8: query cluster a attends to key cluster b iff mask != 0
};

// Optional row permutations fused into the attention kernel (CUDA; the CPU applies them the same
// way). With q_perm, q, out and lse are in token order: the j-th cluster-ordered query row is
// q[b,h,q_perm[b,h,j],:], and its result lands in out/lse row q_perm[b,h,j]. With k_perm, k and v are
// in token order and the j-th cluster-ordered key row is k/v[b,h,k_perm[b,h,j],:]. Offsets and the
// mask always refer to cluster order. Permutations are [B,H,S] i32, contiguous, and must be
// permutations of [0, S) (the CPU checks; on CUDA it is the caller's contract, see cuda/backend.hpp).
struct RowPermutation {
  TensorView q_perm;  // [B,H,Sq] or empty
  TensorView k_perm;  // [B,H,Sk] or empty
};

// What attention_kernel (ops.hpp) answers for a device, dtype and head dim: `name` is "cpu",
// "sm90a-wgmma" or "sm80-mma"; when supported is false, `reason` says what is missing.
struct AttentionKernel {
  bool supported = false;
  const char* name = "";
  const char* reason = "";
};

}  // namespace sapattn
