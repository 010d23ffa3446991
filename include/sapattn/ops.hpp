// The SVG2 operations, one contract each. Every op dispatches on the device of its stream; all
// tensors must live on that device. The CPU backend is the reference every other backend is tested
// against on the same inputs. Ops never allocate device memory: outputs and workspaces are the
// caller's. Shapes are written [B,H,...]; "any strides" means any int64 element strides.
//
// Errors, for every op: a tensor of the wrong rank or extents, or inconsistent with another
// argument -> ShapeError; a dtype the op does not take -> DTypeError; a tensor on a device this
// build has no backend for, or on another device than the stream -> UnsupportedError; values out
// of range (labels, permutation entries, offsets, cluster sizes, top_p outside (0, 1], negative
// counts, iteration counts) -> InvalidArgumentError. Outputs are untouched when an argument check
// fails.
//
// Scratch: ops that need device scratch take a Workspace (CUB's contract: ask *_workspace_bytes,
// allocate once, pass it in); the CPU backend needs none and ignores it.
//
// Determinism: every op is deterministic for its inputs (and seed) on a given backend and thread
// count; the CPU backend gives bit-identical results for any thread count.
#pragma once

#include <cstdint>

#include "sapattn/tensor.hpp"

namespace sapattn {

// ---------------------------------------------------------------------------------------------
// k-means (Lloyd, squared Euclidean, fp32 accumulation), batched over (b, h).
//   points    [B,H,N,D]  f32/f16/bf16, any strides (N >= 1)
//   centroids [B,H,C,D]  f32, contiguous, read and written
//   labels    [B,H,N]    i32, unit stride along N (it may be the video part of a longer labels
//                        tensor), written
//   sizes     [B,H,C]    i32, contiguous, written
// ---------------------------------------------------------------------------------------------

// Seeded sample of C data points per (b,h) as initial centroids. Point i of (b,h) gets the key
// splitmix64(seed ^ splitmix64(id * 2^32 + i)) with id = b*H + h, or sample_ids[b,h] when given
// ([B,H] i32 >= 0, contiguous: a problem keeps its sample when it is run among other heads, e.g.
// a head of a larger call on one of several devices). The C points with the smallest keys (ties by
// index) become centroids 0..C-1 in ascending key order. When C > N, centroid c takes the sampled
// point c mod N (the duplicates then stay empty: ties go to the lowest centroid index).
void kmeans_init(const TensorView& points, TensorView centroids, uint64_t seed, const Stream& stream,
                 Workspace workspace = {}, const TensorView& sample_ids = {});

// labels[i] = argmin_c ||x_i - c||^2; ties go to the lowest centroid index.
void kmeans_assign(const TensorView& points, const TensorView& centroids, TensorView labels, const Stream& stream,
                   Workspace workspace = {});

// sizes[c] = |{i : labels[i] = c}|; centroid c becomes the fp32 mean of its points; an empty
// cluster keeps its previous centroid. Labels outside [0, C) throw InvalidArgumentError.
void kmeans_update(const TensorView& points, const TensorView& labels, TensorView centroids, TensorView sizes,
                   const Stream& stream, Workspace workspace = {});

// `iters` Lloyd iterations from the given centroids, each one assign then update. On return the
// labels are the last assignment, sizes count them, and every non-empty centroid is the mean of its
// labelled points. iters = 0 only assigns (warm-start with no refinement).
void kmeans(const TensorView& points, TensorView centroids, TensorView labels, TensorView sizes, int iters,
            const Stream& stream, Workspace workspace = {});

// Scratch bytes kmeans_init, kmeans_assign, kmeans_update and kmeans need on `device` for B*H problems of N points,
// C clusters and dimension D (0 on the CPU). A smaller workspace throws WorkspaceError.
size_t kmeans_workspace_bytes(int64_t batch_heads, int64_t points, int64_t clusters, int64_t dim, Device device);

// Renumbers each (b,h)'s clusters so that similar ones are neighbours, without changing the
// clustering: the greedy nearest-neighbour chain by cosine similarity of the centroids, from the
// lowest-numbered non-empty cluster, each step to the most similar unvisited non-empty cluster
// (ties to the lower index), empty clusters last in index order. Centroids [B,H,C,D] f32 and sizes
// [B,H,C] i32 (contiguous) move to their new numbers and labels [B,H,N] i32 (unit stride along N)
// are remapped, in place. Both backends compute the same chain bit for bit. Why: laid out in this
// order, the key clusters a query cluster keeps are mostly neighbours (runs of about 6 clusters
// instead of 1.2 at density 0.15 on the generator's Wan 1.3B workload, docs/attention.md), which the
// attention kernels read as a few large TMA boxes. A label outside [0, C) throws
// InvalidArgumentError (on CUDA with value checks on).
void order_clusters(TensorView centroids, TensorView sizes, TensorView labels, const Stream& stream,
                    Workspace workspace = {});
size_t order_clusters_workspace_bytes(int64_t batch_heads, int64_t clusters, int64_t dim, Device device);

// ---------------------------------------------------------------------------------------------
// Block selection.
//   mask [B,H,R,C] u8, any strides (it may be a sub-view of a larger mask); 1 = keep.
// ---------------------------------------------------------------------------------------------

// The per-row top-p rule, shared by SVG2 and the oracle. probs [B,H,R,C] f32 (any strides) holds,
// per row, non-negative weights summing to 1. A row's clusters are ranked by weight, descending,
// ties by lower index; the shortest prefix whose fp32 running sum reaches top_p is kept (the
// crossing cluster included, rank 0 always), and the first `min_kept` ranks are always kept.
// top_p >= 1 keeps every cluster of the row.
void select_top_p(const TensorView& probs, float top_p, int min_kept, TensorView mask, const Stream& stream);

// SVG2's selection: S = q_centroids . k_centroids^T * scale; per row the key-cluster-size
// weighted softmax P_ij = |K_j| exp(S_ij - m_i) / sum_j |K_j| exp(S_ij - m_i), with m_i the row
// max over non-empty key clusters; then select_top_p. Query-cluster sizes play no part.
//   q_centroids [B,H,Cq,D] f32, k_centroids [B,H,Ck,D] f32, k_sizes [B,H,Ck] i32 (contiguous)
//   mask        [B,H,Cq,Ck] u8 (any strides)
// A row whose key clusters are all empty keeps nothing.
void select_blocks(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& k_sizes, float scale,
                   float top_p, int min_kept, TensorView mask, const Stream& stream);

// HunyuanVideo's joint-text rule on a mask of Cq+2 rows and Ck+2 columns whose last two rows and
// columns are the "prompt" and "padding" clusters: video rows also keep the prompt column (never
// padding); the prompt row keeps every video column and the prompt; the padding row keeps only
// padding. The video x video block is left as it is.
void apply_text_rule(TensorView mask, const Stream& stream);

// One share of a layout's kept blocks, for splitting a call's keys across devices: every key-cluster
// column c with c % count != index is cleared, the others are left as they are. The shares of
// index = 0..count-1 partition the kept blocks; their outputs combine by LSE into the whole call's
// (out = sum_i exp(lse_i - lse) out_i, lse = logsumexp_i lse_i).   mask [B,H,R,C] u8, any strides;
// 0 <= index < count.
void shard_key_clusters(TensorView mask, int index, int count, const Stream& stream);

// Labels the trailing text tokens of a joint [video | text] sequence as two extra clusters:
// tokens [video_tokens, video_tokens + prompt_length) get `prompt_label`, the rest
// prompt_label + 1 ("padding"). Video labels are left as they are.   labels [B,H,S] i32, contiguous.
void label_text_tokens(TensorView labels, int64_t video_tokens, int64_t prompt_length, int prompt_label,
                       const Stream& stream);

// ---------------------------------------------------------------------------------------------
// Permutation.
//   labels  [B,H,N]   i32 in [0, C), contiguous
//   perm    [B,H,N]   i32, contiguous: perm[j] = original index of the j-th token in cluster order
//   offsets [B,H,C+1] i32, contiguous: cluster c occupies positions [offsets[c], offsets[c+1])
// ---------------------------------------------------------------------------------------------

// Stable counting sort of tokens by label: clusters in index order, tokens of one cluster in
// their original order.
void cluster_permutation(const TensorView& labels, int num_clusters, TensorView perm, TensorView offsets,
                         const Stream& stream, Workspace workspace = {});

// Scratch bytes cluster_permutation needs on `device` (0 on the CPU).
size_t cluster_permutation_workspace_bytes(int64_t batch_heads, int64_t tokens, int num_clusters, Device device);

// out[b,h,j,:] = x[b,h,perm[b,h,j],:]. x and out [B,H,N,D], any strides and floating dtypes.
void gather_rows(const TensorView& x, const TensorView& perm, TensorView out, const Stream& stream);

// out[b,h,perm[b,h,j],:] = y[b,h,j,:], the inverse of gather_rows.
void scatter_rows(const TensorView& y, const TensorView& perm, TensorView out, const Stream& stream);

// ---------------------------------------------------------------------------------------------
// Attention (non-causal, fp32 softmax and accumulation). Outputs:
//   out [B,H,Sq,D] f32/f16/bf16, any strides
//   lse [B,H,Sq]   f32, any strides, natural-log log-sum-exp of the scaled scores of the keys
//                  actually attended; optional (pass an empty view). A query row that attends to no
//                  key gets out = 0 and lse = -inf.
// ---------------------------------------------------------------------------------------------

// The variable-size block layout of cluster-permuted tensors.
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

// Attention of each query over exactly the keys of its query cluster's kept key clusters.
//   q [B,H,Sq,D], k and v [B,H,Sk,D]: cluster-permuted (unless `perm` says otherwise),
//   f32/f16/bf16, any strides on the CPU. The CUDA kernels take f16/bf16 with q, k, v and out of
//   one dtype, D = 64 or 128, unit stride along D and 16-byte aligned rows (UnsupportedError
//   otherwise; attention_kernel() says what runs).
// Offsets must start at 0, be non-decreasing and end at Sq (resp. Sk).
// The CUDA backend plans on the GPU into `workspace` (block_sparse_attention_workspace_bytes; a
// smaller one throws WorkspaceError); it never synchronises and can be captured in a CUDA graph.
void block_sparse_attention(const TensorView& q, const TensorView& k, const TensorView& v, const BlockLayout& layout,
                            float scale, TensorView out, TensorView lse, const Stream& stream, Workspace workspace = {},
                            const RowPermutation& perm = {});

// Scratch bytes block_sparse_attention needs on `device` for B*H heads, Cq x Ck clusters and Sq
// query tokens (0 on the CPU).
size_t block_sparse_attention_workspace_bytes(int64_t batch_heads, int64_t q_clusters, int64_t k_clusters,
                                              int64_t q_tokens, Device device);

// Which attention kernel runs for inputs of `dtype` and head dim `head_dim` on `device`, or why
// none does. One answer for "is this supported" and "what runs": `name` is "cpu", "sm90a-wgmma" or
// "sm80-mma"; when supported is false, `reason` says what is missing.
struct AttentionKernel {
  bool supported = false;
  const char* name = "";
  const char* reason = "";
};
AttentionKernel attention_kernel(Device device, DType dtype, int64_t head_dim);

// Share of query-key pairs a layout computes, per (b,h): sum over kept (a,b) of |Q_a|*|K_b|,
// divided by Sq*Sk, where Sq and Sk are the last offsets. Offsets must start at 0 and be
// non-decreasing.   density [B,H] f32, any strides.
void block_density(const BlockLayout& layout, TensorView density, const Stream& stream);

// Full attention of every query over every key (same dtype and layout rules as
// block_sparse_attention; no workspace).
void dense_attention(const TensorView& q, const TensorView& k, const TensorView& v, float scale, TensorView out,
                     TensorView lse, const Stream& stream);

// ---------------------------------------------------------------------------------------------
// Input checks.
// ---------------------------------------------------------------------------------------------

// Throws NonFiniteError naming the tensor and the first bad element if x ([B,H,S,D], any float
// dtype and strides) holds NaN or Inf. On CUDA it must read its answer back, so it synchronises
// the stream and cannot run under graph capture (UnsupportedError there).
void check_finite(const TensorView& x, const char* name, const Stream& stream);

}  // namespace sapattn
