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

#include "sapattn/layout.hpp"
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

// Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, with scikit-learn's greedy trials) on a
// seeded sample: the first call's start of Config::kmeans_seeding = GreedyPP (docs/cuda.md). Per
// (b,h), with the problem id of kmeans_init (b*H + h, or sample_ids[b,h]):
//   - The sample: the first M = min(N, sample_factor * C) points of kmeans_init's order (the M
//     smallest keys, in key order). When C >= N the centroids are kmeans_init's.
//   - Centroid 0 is sample point 0 (kmeans_init's centroid 0). Each sample point i keeps D2[i], its
//     fp32 squared distance to the nearest centroid so far (the exact kmeans_assign's fp32 sum), as
//     the 64-bit fixed-point value q(D2[i]) = floor(D2[i] / 2^E), one E per (b,h) from the largest
//     finite D2 to centroid 0 (src/core/kmeans_seeding.hpp); all sums below are exact integers.
//   - Steps s = 1..C-1, each with T = kmeans_greedy_trials(C) trials. Trial t draws
//     r = splitmix64(splitmix64(seed ^ 0x243f6a8885a308d3 ^ splitmix64(id * 2^32 + s)) + t) and the
//     target floor(r * Q / 2^64), Q the sum of q over the sample; its candidate is the first sample
//     point whose running sum of q (in sample order) exceeds the target (a point at distance 0 is
//     never drawn; the last point when Q = 0), and its potential is the sum over i of
//     q(min(D2[i], ||x_i - x_candidate||^2)). The candidate of the smallest potential (ties: the
//     lowest trial) becomes centroid s, and D2 takes the minimum with it.
// Both backends compute the same fp32 distances and integers, so they write identical centroids.
// Points should be finite (svg2_attention checks them); a NaN or infinite distance counts as the
// largest one, deterministically. sample_factor must be >= 1 (InvalidArgumentError). Scratch:
// kmeans_seed_greedy_workspace_bytes (WorkspaceError when smaller). The CPU runs the C - 1 steps of
// a (b,h) in sequence, M * T distances each: about T * M / N of a Lloyd iteration's work.
void kmeans_seed_greedy(const TensorView& points, TensorView centroids, uint64_t seed, int sample_factor,
                        const Stream& stream, Workspace workspace = {}, const TensorView& sample_ids = {});

// Trials per step of kmeans_seed_greedy for C clusters: 2 + floor(ln C), scikit-learn's default.
int kmeans_greedy_trials(int64_t clusters);

// Scratch bytes kmeans_seed_greedy needs on `device` for B*H problems of N points, C clusters and a
// sample factor (0 on the CPU).
size_t kmeans_seed_greedy_workspace_bytes(int64_t batch_heads, int64_t points, int64_t clusters, int sample_factor,
                                          Device device);

// labels[i] = argmin_c ||x_i - c||^2; ties go to the lowest centroid index.
void kmeans_assign(const TensorView& points, const TensorView& centroids, TensorView labels, const Stream& stream,
                   Workspace workspace = {});

// Candidate assignment, one Lloyd assignment restricted to a few centroids per point: point i, whose
// previous label is a = prev_labels[i], is measured against centroid a and the candidates - 1 other
// centroids nearest to centroid a (fp32 squared distance between centroids, ties to the lower
// index) only, and labels[i] is the nearest of those, ties to the lower index. candidates >= C
// measures every centroid: kmeans_assign's labels. Its label is never farther than centroid a, so
// Lloyd's objective still never rises; after the first iterations the nearest centroid is almost
// always among 32 candidates (docs/cuda.md, "Candidate assignment"). prev_labels [B,H,N] i32 in
// [0, C) (InvalidArgumentError otherwise: on CUDA from the value check after the call, as
// kmeans_update, and only when candidates < C: else it is not read), unit stride along N; it may
// be `labels` itself. candidates >= 1
// (InvalidArgumentError). On CUDA the labels are the CPU's bit for bit, with a workspace of
// kmeans_assign_candidates_workspace_bytes (none when candidates >= C).
void kmeans_assign_candidates(const TensorView& points, const TensorView& centroids, const TensorView& prev_labels,
                              TensorView labels, int candidates, const Stream& stream, Workspace workspace = {});

// Scratch bytes kmeans_assign_candidates needs on `device` (0 on the CPU).
size_t kmeans_assign_candidates_workspace_bytes(int64_t batch_heads, int64_t points, int64_t clusters, int candidates,
                                                Device device);

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
// top_p = 1 (the largest it takes) keeps every cluster of the row. A row holding a NaN weight
// cannot be ranked and keeps every cluster too, so NaN inputs reach the row's queries.
void select_top_p(const TensorView& probs, float top_p, int min_kept, TensorView mask, const Stream& stream);

// select_top_p with one top-p per (b,h), chosen for a speed budget: the smallest top_p in (0, 1]
// whose kept area sum_{kept (a,j)} q_sizes[a] k_sizes[j] reaches `density` times
// sum_a q_sizes[a] * sum_j k_sizes[j]. The kept area only changes where top_p crosses a row's fp32
// running sum, so those values (and 1) are the candidates, searched by bisection; the rows are then
// written exactly as select_top_p writes them at that top_p. min_kept floors the density.
//   probs [B,H,R,C] f32 as select_top_p; q_sizes [B,H,R], k_sizes [B,H,C] i32, contiguous,
//   non-negative; 0 < density <= 1. CUDA: scratch of ear_workspace_bytes (R = Cq, C = Ck) in `workspace`;
//   the masks are bit-identical to the CPU's.
void select_top_p_at_density(const TensorView& probs, const TensorView& q_sizes, const TensorView& k_sizes,
                             float density, int min_kept, TensorView mask, const Stream& stream,
                             Workspace workspace = {});

// SVG2's selection: S = q_centroids . k_centroids^T * scale; per row the key-cluster-size
// weighted softmax P_ij = |K_j| exp(S_ij - m_i) / sum_j |K_j| exp(S_ij - m_i), with m_i the row
// max over non-empty key clusters; then select_top_p. Query-cluster sizes play no part.
//   q_centroids [B,H,Cq,D] f32, k_centroids [B,H,Ck,D] f32, k_sizes [B,H,Ck] i32 (contiguous)
//   mask        [B,H,Cq,Ck] u8 (any strides)
// A row whose key clusters are all empty keeps nothing. A row with a non-finite score of a non-empty
// key cluster (NaN or Inf in the centroids) keeps every cluster on the CPU backend: its queries then
// attend to every key, and a NaN comes out in their rows as in dense attention.
// CUDA: scores by FMA and the crossing by a threshold search instead of a ranking, deterministic; a
// mask entry may differ from the CPU's only for clusters whose weights lie within the tolerance of
// docs/cuda.md ("Selection") of the row's cut, ties still kept by lower index (the empty-head, NaN
// and top_p = 1 rules as on the CPU). The test knob cuda::set_select_kernel_override("exact") gives
// the CPU's masks byte for byte.
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

// Size rounding of the query clusters (docs/attention.md, "Query padding at 64-row blocks"): after
// the selection, moves a few video query points between query clusters so that every cluster's tail
// t = n mod 64 is 0 or at least 64 - slack, so the 64-row warpgroup blocks of the sparse kernel
// carry fewer padding rows. The study's variant B:mass:SLACK:MAX:F:ROUNDS:keep
// (tools/studies/size_rounding.py, round_clusters with match_rounds); per (b,h):
//   1. Roles. n_a = the count of label a, t_a = n_a mod 64. A cluster with t = 0 or t >= 64 - slack
//      is done; it may still take up to 64 - t points when t > 0 (optional capacity). The other
//      ("open") clusters, ranked by ascending t (ties by lower index), split into the first k
//      (donors: they give all t points away) and the rest (receivers: they need 64 - slack - t and
//      take at most 64 - t). k in [0, #open] minimises (pad, supply) lexicographically, the lowest
//      k on ties: supply = the donors' tails, dmin / dmax = the receivers' total need / capacity
//      (dmax with the optional capacity), pad = dmin - supply when supply < dmin, else
//      (dmax - supply) mod 64 when supply > dmax, else 0.
//   2. Candidates: the points of the donors (ascending index). With options.prefilter = F > 0, each
//      donor's candidates are its F * t points with the lowest best distance cost
//      min_r (|x - c_r|^2 - |x - c_own|^2) over the targets r (computed as |c|^2 - 2 x.c in fp32;
//      ties by lower point index); they are then ordered by donor, best distance, point index.
//      Targets: every cluster with capacity left (receivers and done clusters with t > 0), ascending.
//   3. Move cost (mass): p_j = |K_j| exp(scale x.kbar_j) / sum_j' |K_j'| exp(scale x.kbar_j') over the
//      non-empty key clusters (the selection's estimate with the point x in place of its centroid;
//      fp32 dot products, fp64 softmax and sums in order of j; the dot products and the exp are those
//      of src/core/round_arithmetic.hpp, shared by both backends); cost(x, r) = sum_j p_j mask[own, j] -
//      sum_j p_j mask[r, j]: the mass x loses by taking r's kept key clusters. A cost above
//      options.max_cost (or NaN) forbids the move; with no non-empty key cluster every cost is 0.
//   4. Matching in rounds: each candidate ranks its options.candidates cheapest targets (ties by
//      lower target index). Two phases, first up to each receiver's need, then up to its capacity,
//      each of up to options.rounds rounds: at the start of a round every unplaced candidate picks
//      its cheapest ranked target with room left (none: it sits the round out); per donor the
//      (t - placed) cheapest such picks are offered (ties by candidate order); each target accepts
//      the cheapest offers up to its room (ties by candidate order). A phase ends early when
//      nothing is offered. A donor that has not placed its whole tail at the end takes its points
//      back (a partial tail would still pad to 64), so a donor moves all t points or none.
//   Centroids and mask are left as they are (the study's "keep"): a moved point takes its new
//   cluster's kept keys through its label. Only labels and sizes change.
//   q [B,H,N,D] f32/f16/bf16 any strides, N >= 1 (the video queries); q_centroids [B,H,Cq,D] and
//   k_centroids [B,H,Ck,D] f32 contiguous; k_sizes [B,H,Ck] i32 contiguous, >= 0; mask [B,H,Cq,Ck]
//   u8 any strides (the video x video block of the selection); labels [B,H,N] i32 in [0, Cq), unit
//   stride along N, read and rewritten; sizes [B,H,Cq] i32 contiguous, written with the new counts.
//   slack in [0, 63], max_cost not NaN (+inf: uncapped), prefilter >= 0 (0: every donor point is a
//   candidate), rounds >= 1, candidates >= 1; scale finite > 0.
//   The CPU and the CUDA op's exact path give the same labels and sizes bit for bit (it reproduces every
//   arithmetic step and tie rule); for f16/bf16 q on sm_80+ the CUDA op takes the costs of steps 2 and 3
//   on tensor cores by default (bf16 operands, fp32 accumulators; labels may differ where two costs lie
//   within the bf16 error, about 1% of a mass; steps 1 and 4, the size rules and run-to-run identity
//   hold all the same; docs/cuda.md, "round_query_clusters"). CUDA: scratch of round_query_clusters_workspace_bytes in
//   `workspace` (WorkspaceError when smaller); labels outside [0, Cq) and negative k_sizes raise the
//   value-check flag (InvalidArgumentError with value checks on; such a head is left as it was).
struct RoundQueryOptions {
  int slack = 16;
  float max_cost = 0.1f;
  int prefilter = 4;
  int rounds = 8;
  int candidates = 16;
};
void round_query_clusters(const TensorView& q, const TensorView& q_centroids, const TensorView& k_centroids,
                          const TensorView& k_sizes, const TensorView& mask, float scale,
                          const RoundQueryOptions& options, TensorView labels, TensorView sizes,
                          const Stream& stream, Workspace workspace = {});

// Scratch bytes round_query_clusters needs on `device` for B*H heads of N points, Cq query and Ck key
// clusters and these options (0 on the CPU). It grows with the candidate bound
// min(N, prefilter * (63 - slack) * Cq) (N without the prefilter) times options.candidates, and with
// the tensor-core path's bf16 operands, Ck x (128 + Cq) per head (carved whichever path runs).
size_t round_query_clusters_workspace_bytes(int64_t batch_heads, int64_t points, int64_t q_clusters,
                                            int64_t k_clusters, const RoundQueryOptions& options, Device device);

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
// Rotary embedding on interleaved pairs, the convention of Wan and HunyuanVideo in diffusers, in one
// pass (the diffusers integration runs it on Q and K before the attention). For token s and pair i
// of x[b,h,s,:] (elements 2i and 2i+1), with c = cos[s,2i] and n = sin[s,2i+1] (diffusers stores each
// pair's value at both elements and reads these):
//   out[2i]   = x[2i] c - x[2i+1] n,    out[2i+1] = x[2i] n + x[2i+1] c,
// each product and sum rounded to fp32 on its own (no FMA: what PyTorch's eager ops compute), the
// result rounded to out's dtype. x, out [B,H,S,D] of one floating dtype, any strides (out may be x
// itself, not another overlap), D even; cos, sin [S,D] f32 contiguous.
// ---------------------------------------------------------------------------------------------
void rope_pairs(const TensorView& x, const TensorView& cos, const TensorView& sin, TensorView out,
                const Stream& stream);

// ---------------------------------------------------------------------------------------------
// Attention (non-causal, fp32 softmax and accumulation). Outputs:
//   out [B,H,Sq,D] f32/f16/bf16, any strides
//   lse [B,H,Sq]   f32, any strides, natural-log log-sum-exp of the scaled scores of the keys
//                  actually attended; optional (pass an empty view). A query row that attends to no
//                  key gets out = 0 and lse = -inf. A row whose softmax sum is NaN (a NaN input)
//                  gets NaN out and lse, as in dense attention.
// ---------------------------------------------------------------------------------------------

// BlockLayout (the offsets and mask of cluster-permuted tensors) and RowPermutation (the fused
// permutations) are in sapattn/layout.hpp.

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
// none does (AttentionKernel, sapattn/layout.hpp). One answer for "is this supported" and "what runs".
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
// FP8 attention (docs/fp8.md): the e4m3 quantisation, and block-sparse attention with both
// GEMMs in e4m3. quantize_e4m3 runs on the CPU and on CUDA (codes and scales bit for bit the CPU's).
// block_sparse_attention_e4m3 runs on the CPU (the reference) and, on CUDA, on the Hopper e4m3
// kernel (sm_90a, head dim 128, V per channel; UnsupportedError otherwise), which takes a workspace
// of block_sparse_attention_e4m3_workspace_bytes and matches the reference within a tolerance
// (docs/fp8.md says which). The codec (OCP E4M3, round to nearest even, saturating at +-448, NaN ->
// 0x7f) is src/core/fp8.hpp, shared with the kernels.
// ---------------------------------------------------------------------------------------------

// Quantises rows of x to e4m3 with fp32 scales. Row r of the result is y_r = x[perm[r]] - shift
// (fp32; row r itself when perm is empty, no subtraction when shift is empty). Per group of rows
// (Fp8Scale): amax = the largest |y| of the group, NaN when the group holds a non-finite value;
// scale = amax / 448 and inverse = 448 / amax (fp32, both 0 when amax = 0); codes[r,d] =
// e4m3(y[r,d] * inverse), so that y ~= e4m3_decode(code) * scale. Channel takes amax per column d
// over every row of the head.
//   x       [B,H,S,D] f32/f16/bf16, any strides
//   perm    [B,H,S] i32 contiguous, a permutation of [0, S), or empty
//   offsets [B,H,C+1] i32 contiguous, the clusters of the result's rows (from 0, non-decreasing, to
//           S): used by Cluster only, and may be empty otherwise
//   shift   [B,H,D] f32 contiguous, or empty (K's smoothing subtracts the head's mean key)
//   codes   [B,H,S,D] u8 contiguous, written
//   scales  [B,H,S] f32 contiguous, each row's group scale (Tile, Cluster), or [B,H,D] (Channel)
// tile_rows >= 1 (Tile only). On CUDA: no scratch, no synchronisation (but for the value checks of
// cuda/backend.hpp: perm entries outside [0, S) and bad offsets are reported there, a repeated perm
// entry is not), at most 65535 (b,h) pairs, S * D < 2^31, per channel D <= 12288 (UnsupportedError).
void quantize_e4m3(const TensorView& x, const TensorView& perm, const TensorView& offsets, const TensorView& shift,
                   Fp8Scale granularity, int tile_rows, TensorView codes, TensorView scales, const Stream& stream);

// block_sparse_attention (same arguments, same empty-row rule) with Q K^T and P V in e4m3,
// fp32 accumulation and softmax. Per (b,h), in cluster order:
//   1. mean = the head's mean key over all Sk rows (fp64 sum rounded to fp32, cluster_means' value
//      for one cluster) when options.smooth_k, else no shift.
//   2. quantize_e4m3 of Q (q_scale, q_tile, q_offsets), of K - mean (k_scale, k_tile, k_offsets) and
//      of V (v_scale, v_tile, k_offsets): row scales sq_i, sk_j and V's sv_d (Channel) or sv_j.
//   3. Query row i walks the keys of its cluster's kept key clusters, in key order, in chunks of 128
//      (the GPU plan's key tiles): logit_ij = dot(q8_i, k8_j) * ((sq_i * scale) * sk_j), the dot an
//      fp32 sum of the exact products of decoded codes; per chunk the online softmax in fp32
//      (m = max(m, chunk max), acc and l scaled by exp(m_old - m)), p_ij = exp(logit_ij - m) in
//      [0, 1], p8 = e4m3(p_ij * f_j) with f_j = p_scale (V per channel) or (p_scale * sv_j) / sv_max
//      (V per tile or cluster: its scale folds into P; sv_max = the head's largest, and f_j = 0 when
//      it is 0), acc[d] += decode(p8) * decode(v8_jd), and l += p_ij (l += decode(p8) with
//      p_sum_e4m3).
//   4. out[i,d] = (acc[d] * c_d) * (1 / l) with c_d = sv_d or sv_max, divided by p_scale unless
//      p_sum_e4m3; lse_i = m + log(l) (log(l / p_scale) with p_sum_e4m3) + scale * dot(q_i, mean),
//      q_i unquantised: smoothing moved row i's logits by -scale q_i . mean, which its softmax does
//      not see and its LSE must.
// A non-finite input makes its group's scale NaN, and every result computed with that scale NaN:
// the rows of a Q group, every row that reads a K group, one column of every row for V per channel,
// every row for V per tile or cluster (through sv_max). check_finite (svg2_attention's
// Config::check_finite) reports such inputs before they get here.
// Options (Fp8Options): q_scale and k_scale Tile or Cluster (a scale per column does not factor out
// of Q K^T), tiles >= 1, p_scale in [1, 448] (P = 1 must stay a normal e4m3 number and never
// saturate), p_sum_e4m3 only with V per channel; else InvalidArgumentError.
void block_sparse_attention_e4m3(const TensorView& q, const TensorView& k, const TensorView& v,
                                 const BlockLayout& layout, float scale, const Fp8Options& options, TensorView out,
                                 TensorView lse, const Stream& stream, Workspace workspace = {},
                                 const RowPermutation& perm = {});

// Workspace bytes block_sparse_attention_e4m3 needs on `device` (0 on the CPU): the plan, the
// e4m3 codes of Q, K and V^T (about S * D bytes each), their scales, the mean key and the LSE terms.
size_t block_sparse_attention_e4m3_workspace_bytes(int64_t batch_heads, int64_t q_clusters, int64_t k_clusters,
                                                   int64_t q_tokens, int64_t k_tokens, Device device);

// ---------------------------------------------------------------------------------------------
// Error-aware routing and centroid compensation (SVG-EAR, arXiv 2603.08982; docs/ear.md). Shapes as
// above; every cluster-size tensor is [B,H,C] i32, contiguous, non-negative (InvalidArgumentError
// otherwise; on CUDA a value check, see cuda/backend.hpp). On CUDA, cluster_means, ear_probe and
// select_top_p_at_density take scratch of ear_workspace_bytes; ear_probe takes head dims up to 256,
// centroid_compensation up to 128, the routing up to 8192 key clusters (UnsupportedError beyond);
// the compensation takes scratch of compensation_workspace_bytes.
// How close each CUDA op is to the CPU's: docs/ear.md, "The CUDA backend".
// ---------------------------------------------------------------------------------------------

// Scratch bytes cluster_means, ear_probe and select_top_p_at_density need on `device` for B*H
// heads, N key tokens, Cq x Ck clusters and head dim D (0 on the CPU). A smaller one throws
// WorkspaceError.
size_t ear_workspace_bytes(int64_t batch_heads, int64_t tokens, int64_t q_clusters, int64_t k_clusters, int64_t dim,
                           Device device);

// means[c] = the mean of the points labelled c (fp64 sums, rounded to fp32), 0 for an empty cluster.
//   points [B,H,N,D] f32/f16/bf16, any strides; labels [B,H,N] i32 in [0, C), unit stride along N;
//   means [B,H,C,D] f32, contiguous.
void cluster_means(const TensorView& points, const TensorView& labels, TensorView means, const Stream& stream,
                   Workspace workspace = {});

// select_blocks' weights written out: P_ij = |K_j| exp(S_ij - m_i) / sum_j |K_j| exp(S_ij - m_i) with
// S = q_centroids . k_centroids^T * scale and m_i the row max over non-empty key clusters; a row
// whose key clusters are all empty is all zero; a row with a non-finite score of a non-empty key
// cluster is all NaN. probs [B,H,Cq,Ck] f32, any strides.
void centroid_probs(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& k_sizes,
                    float scale, TensorView probs, const Stream& stream);

// The EAR probe. For query cluster a and key cluster j, the error of standing in for j's keys and
// values by their centroids, seen from a's centroid:
//   E_aj = sum_{t in j} || exp(s_t) v_t - exp(c_aj) vbar_j ||^2,  s_t = scale qbar_a . k_t,
//   c_aj = scale qbar_a . kbar_j,
// and its log error per area: scores_aj = log(max(E_aj, eps)) - gamma log(max(|Q_a| |K_j|, eps)),
// eps = 1e-8 (E is unnormalised, as the published code has it; the row's softmax denominator is common
// to a row and does not change its ranking). E is evaluated in the log domain (fp64 sums), so it
// does not overflow where exp(2 s_t) would. An empty key cluster gets E = eps.
//   q_centroids [B,H,Cq,D], k_centroids and v_centroids [B,H,Ck,D] f32 contiguous;
//   k and v [B,H,N,D] f32/f16/bf16, any strides; k_labels [B,H,N] i32 in [0, Ck), unit stride;
//   q_sizes [B,H,Cq], k_sizes [B,H,Ck]; scores [B,H,Cq,Ck] f32, any strides. gamma >= 0.
void ear_probe(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& v_centroids,
               const TensorView& k, const TensorView& v, const TensorView& k_labels, const TensorView& q_sizes,
               const TensorView& k_sizes, float scale, float gamma, TensorView scores, const Stream& stream,
               Workspace workspace = {});

// EAR's routing, per query-cluster row a (area_j = |Q_a| |K_j|, counted exactly in integers):
//   1. the first `guaranteed` key clusters of the row's ranking by probs (descending, ties by lower
//      index) are always kept;
//   2. budget = sum of area_j over the clusters budget_mask keeps (SVG2's selection: the area top-p
//      would compute); remaining = max(0, budget - area of the guaranteed clusters);
//   3. the other clusters, by score descending (ties by lower index, NaN last), are kept while the
//      area kept before them is below `remaining` (the crossing cluster included).
//   probs, scores [B,H,Cq,Ck] f32 and budget_mask [B,H,Cq,Ck] u8, any strides; q_sizes [B,H,Cq],
//   k_sizes [B,H,Ck]; mask [B,H,Cq,Ck] u8, any strides, written; 0 <= guaranteed.
void select_error_aware(const TensorView& probs, const TensorView& budget_mask, const TensorView& scores,
                        const TensorView& q_sizes, const TensorView& k_sizes, int guaranteed, TensorView mask,
                        const Stream& stream);

// Scratch bytes centroid_compensation and corrected_centroid_compensation need on `device` for B*H
// heads, N video query rows, Cq query clusters, Ck' pseudo-keys (the k_centroids' count: Ck, or m Ck
// with m pseudo-keys per mask column) and head dim D (0 on the CPU). A smaller one throws
// WorkspaceError.
size_t compensation_workspace_bytes(int64_t batch_heads, int64_t tokens, int64_t q_clusters, int64_t pseudo_keys,
                                    int64_t dim, Device device);

// Adds the skipped key clusters to an attention result through their centroids. For every query
// row i with q_labels[i] = a and every key cluster j with mask[a,j] = 0 and |K_j| > 0, the row gains
// the pseudo-key kbar_j of multiplicity |K_j| and value vbar_j, merged by log-sum-exp with the row's
// exact part (out_i, lse_i):
//   w_j = log|K_j| + scale q_i . kbar_j,  lse' = logsumexp(lse_i, w_j...),
//   out_i' = exp(lse_i - lse') out_i + sum_j exp(w_j - lse') vbar_j.
// Each row uses its own q_i. Rows of q beyond q_labels' N (text tokens) are left as they are.
//   q [B,H,S,D] f32/f16/bf16, any strides; q_labels [B,H,N] i32 in [0, Cq), N <= S, unit stride;
//   mask [B,H,Cq,Ck] u8, any strides (the video part of a layout's mask); k_centroids, v_centroids
//   [B,H,Ck,D] f32 contiguous; k_sizes [B,H,Ck]; out [B,H,S,D] f32/f16/bf16 and lse [B,H,S] f32, any
//   strides, read and written (a row with lse = -inf and nothing to add stays out = 0, lse = -inf).
// On CUDA the logits and P V run on tensor cores with bf16 operands (docs/ear.md: the error bound).
void centroid_compensation(const TensorView& q, const TensorView& q_labels, const TensorView& mask,
                           const TensorView& k_centroids, const TensorView& v_centroids, const TensorView& k_sizes,
                           float scale, TensorView out, TensorView lse, const Stream& stream,
                           Workspace workspace = {});

// ---------------------------------------------------------------------------------------------
// ear-plus: SVG-EAR's probe, routing and compensation refined (docs/ear.md, the numbers in
// docs/results.md). Shapes as for the EAR ops above. On CUDA, ear_plus_probe,
// select_error_aware_per_head and split_clusters take scratch of ear_plus_workspace_bytes; the
// probe and the split take head dims up to 256, the routing up to 8192 key clusters and 2^31 - 1
// cluster pairs over all heads (UnsupportedError beyond). corrected_centroid_compensation takes
// centroid_compensation's scratch and limits.
// ---------------------------------------------------------------------------------------------

// Scratch bytes ear_plus_probe, select_error_aware_per_head and split_clusters need on `device` for
// B*H heads, N key tokens and Cq x Ck clusters (Ck: the clusters the probe or split is given; 0 on
// the CPU). A smaller one throws WorkspaceError.
size_t ear_plus_workspace_bytes(int64_t batch_heads, int64_t tokens, int64_t q_clusters, int64_t k_clusters,
                                Device device);

// One pass over the video keys from every query centroid, like ear_probe, that also keeps per
// (a, j) the attention mass M_aj = sum_{t in j} exp(s_t) and, optionally, its value sum:
//   scores_aj = log(max(|Q_a| E_aj / Z_a^2, eps)) - gamma log(max(|Q_a| |K_j|, eps)), Z_a = sum_j M_aj
// with E_aj as in ear_probe and eps = 1e-30 on the error, 1e-8 on the area: the squared output error
// the compensation leaves on the |Q_a| rows of cluster a, seen from its centroid and normalised by
// the row's softmax denominator, per pair computed. Within one row it ranks as ear_probe does (at
// equal gamma the terms added are common to the row; only pairs under a floor may order otherwise);
// unlike it, it compares pairs across rows.
//   spread [B,H,Cq,Ck] f32, any strides, or empty: log(M_aj / (|K_j| exp(c_aj))), the log-mean of
//     exp(scale qbar_a . (k_t - kbar_j)) over j's keys (>= 0 when kbar_j is their mean), 0 for an
//     empty cluster.
//   pair_values [B,H,Cq*Ck,D] f32 contiguous, or empty: row a*Ck + j = sum_t exp(s_t) v_t / M_aj, the
//     values of j weighted by their attention from qbar_a; v_centroids[j] for an empty cluster.
void ear_plus_probe(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& v_centroids,
                    const TensorView& k, const TensorView& v, const TensorView& k_labels, const TensorView& q_sizes,
                    const TensorView& k_sizes, float scale, float gamma, TensorView scores, TensorView spread,
                    TensorView pair_values, const Stream& stream, Workspace workspace = {});

// select_error_aware with one budget per head instead of one per row: the guaranteed clusters of
// every row are kept first; budget = the area budget_mask keeps summed over the head's rows;
// remaining = max(0, budget - the guaranteed area); then all other (a, j) pairs of the head by score
// descending (ties by lower a * C + j, NaN last) are kept while the area kept before them is below
// `remaining`. The head's area exceeds the budget's by at most one pair (select_error_aware: one
// cluster per row). Arguments as select_error_aware.
void select_error_aware_per_head(const TensorView& probs, const TensorView& budget_mask, const TensorView& scores,
                                 const TensorView& q_sizes, const TensorView& k_sizes, int guaranteed, TensorView mask,
                                 const Stream& stream, Workspace workspace = {});

// Splits every cluster in two for a finer compensation: per (b,h) and cluster c with centroid
// centroids[c] (its points' mean), the principal axis u of its points (8 power iterations from
// the point farthest from the centroid, fp64), the side of each point (u . (x - centroid) > 0),
// then two 2-means steps between the two halves' means (ties to side 0). A point of cluster c gets
// sub-label 2c + side; sub_sizes counts them. A cluster of one point, or of identical points,
// keeps them all on side 0.
//   points [B,H,N,D] f32/f16/bf16 any strides; labels [B,H,N] i32 in [0, C), unit stride; centroids
//   [B,H,C,D] f32 contiguous; sub_labels [B,H,N] i32 unit stride and sub_sizes [B,H,2C] i32
//   contiguous, written.
void split_clusters(const TensorView& points, const TensorView& labels, const TensorView& centroids,
                    TensorView sub_labels, TensorView sub_sizes, const Stream& stream, Workspace workspace = {});

// centroid_compensation with the probe's corrections: the pseudo-key of skipped cluster j for a row
// of query cluster a has the logit w_j + spread[a, j] (when spread is given) and the value
// pair_values[a * Ck + j] (when given; else v_centroids[j]). With both, it is the first-order
// translation of j's exact contribution seen from qbar_a to the row's own q_i:
//   sum_t exp(scale q_i . k_t) v_t ~= exp(scale (q_i - qbar_a) . kbar_j) sum_t exp(scale qbar_a . k_t) v_t.
// Sub-centroids: k_centroids, v_centroids, k_sizes (and spread, pair_values) may hold m pseudo-keys
// per mask column (Ck = m * the mask's key clusters, split_clusters gives m = 2): pseudo-key c is
// added when the mask skips key cluster c / m.
//   spread [B,H,Cq,Ck] f32 any strides or empty; pair_values [B,H,Cq*Ck,D] f32 contiguous or empty;
//   the rest (the CUDA scratch too) as centroid_compensation.
void corrected_centroid_compensation(const TensorView& q, const TensorView& q_labels, const TensorView& mask,
                                     const TensorView& k_centroids, const TensorView& v_centroids,
                                     const TensorView& k_sizes, const TensorView& spread, const TensorView& pair_values,
                                     float scale, TensorView out, TensorView lse, const Stream& stream,
                                     Workspace workspace = {});

// ---------------------------------------------------------------------------------------------
// Input checks.
// ---------------------------------------------------------------------------------------------

// Throws NonFiniteError naming the tensor and the first bad element if x ([B,H,S,D], any float
// dtype and strides) holds NaN or Inf. On CUDA it must read its answer back, so it synchronises
// the stream and cannot run under graph capture (UnsupportedError there).
void check_finite(const TensorView& x, const char* name, const Stream& stream);

}  // namespace sapattn
