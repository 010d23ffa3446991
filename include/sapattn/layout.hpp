// The types that the op contracts (sapattn/ops.hpp) and every backend share, apart from the tensor
// views: the variable-size block layout that selection hands to attention, the row permutations
// an attention call may fuse, the answer to "which attention kernel runs", and how the FP8
// attention quantises. A backend includes
// this header, not ops.hpp: it implements the ops, it does not call them. ops.hpp includes it, so
// user code that includes ops.hpp sees these types as before.
#pragma once

#include <cstdint>

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

// Which rows share one fp32 scale in the e4m3 quantisation (quantize_e4m3, docs/fp8.md). Rows are
// counted in cluster order (the permuted sequence).
enum class Fp8Scale : uint8_t {
  Tile,     // fixed tiles of `tile` rows, [t * tile, (t + 1) * tile), whatever the clusters
  Cluster,  // one scale per cluster of the layout's offsets
  Channel,  // one scale per column d over all rows of the head (V only: it factors out of P V)
};

// How block_sparse_attention_e4m3 quantises. The defaults are the choice of docs/fp8.md, which says
// what every option measured: scales per fixed 128-row tile for Q and K and per channel for V, K
// smoothed, P * 448 in e4m3, and the softmax denominator summed from the quantised P. Q and K take
// Tile or Cluster; V any of the three.
struct Fp8Options {
  static constexpr int kHeadTile = 1 << 30;  // a tile longer than any head: one scale per head ("khead")
  Fp8Scale q_scale = Fp8Scale::Tile;
  int q_tile = 128;
  Fp8Scale k_scale = Fp8Scale::Tile;
  int k_tile = kHeadTile;  // one K scale per head (K is smoothed: its keys are centred), docs/fp8.md
  Fp8Scale v_scale = Fp8Scale::Channel;
  int v_tile = 128;
  bool smooth_k = true;    // subtract the head's mean key before quantising K (softmax-invariant)
  float p_scale = 448.0f;  // P in [0, 1] is stored as e4m3(P * p_scale); in [1, 448]
  bool p_sum_e4m3 = true;  // the softmax denominator sums the quantised P (needs V per channel)
};

}  // namespace sapattn
