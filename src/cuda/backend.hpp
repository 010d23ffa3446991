// The CUDA backend: one function per op of include/sapattn/ops.hpp, mirroring src/cpu/backend.hpp.
// src/ops/ checks shapes, dtypes and devices before calling here. Every function launches on
// stream.handle (a cudaStream_t) and returns without waiting for the GPU; none allocates or
// synchronises, except check_finite (it must read its answer back) and the value checks below.
//
// Values the CPU backend checks on the host (labels in [0, C), permutation indices in [0, N),
// cluster sizes >= 0) would need a device-to-host copy and a sync to check here. On CUDA they are
// the caller's contract: kernels never read or write out of bounds on a bad value (the token is
// skipped, or lands in a trash bucket), and they raise a device-side error flag. With value checks
// on (set_value_checks(true), or SAPATTN_CUDA_CHECK_VALUES=1 in the environment; the device tests
// turn them on), each op that reads such values synchronises its stream afterwards, reads the flag
// and throws InvalidArgumentError; under CUDA graph capture the check is skipped. Outputs are then
// unspecified (the CPU backend leaves them untouched).
#pragma once

#include <cstddef>
#include <cstdint>

#include "sapattn/layout.hpp"

namespace sapattn::cuda {

// Scratch of the k-means ops for B*H problems of N points, C clusters, dimension D.
size_t kmeans_workspace_bytes(int64_t batch_heads, int64_t points, int64_t clusters, int64_t dim);
size_t cluster_permutation_workspace_bytes(int64_t batch_heads, int64_t tokens, int num_clusters);

// Counters an assignment can report (for the benchmark): rows whose two best approximate distances
// were close enough to be re-ranked with the exact fp32 distance.
struct AssignStats {
  unsigned long long* d_refined_rows = nullptr;  // device counter, incremented (not reset)
};

void kmeans_init(const TensorView& points, TensorView centroids, uint64_t seed, const Stream& stream,
                 Workspace workspace, const TensorView& sample_ids);
// Greedy k-means++ seeding (kmeans/kmeans_seed.cu): kmeans_init's key sort, then the steps by the
// kernel seed_kernel() names.
size_t kmeans_seed_greedy_workspace_bytes(int64_t batch_heads, int64_t points, int64_t clusters, int sample_factor);
void kmeans_seed_greedy(const TensorView& points, TensorView centroids, uint64_t seed, int sample_factor,
                        const Stream& stream, Workspace workspace, const TensorView& sample_ids);
// The kernel that runs kmeans_seed_greedy's steps on `device` for B*H problems with a sample of M
// points of dimension D and `dtype`, and C clusters: the cluster kernel (kmeans/seed_cluster.cu; sm_90
// with sm_90 code built, the sample fitting the shared memory of at most 8 CTAs) or the block kernel
// (any other case).
struct SeedKernel {
  bool cluster = false;  // true: a thread-block cluster of `ctas` CTAs per (b,h); else one block per (b,h)
  bool screen = false;   // the cluster kernel's tensor-core screen (bf16 and f16 points, D <= 1024)
  int ctas = 1;
  size_t smem = 0;  // dynamic shared memory per CTA or block, bytes
};
SeedKernel seed_kernel(int device, int64_t batch_heads, int64_t sample, int64_t clusters, int64_t dim, DType dtype);
// Test and benchmark knob (process-wide): "block" forces the block kernel, "cluster" the cluster kernel
// (UnsupportedError where it cannot run), "unscreened" the cluster kernel without its screen (every
// distance exact, as for f32 points), "cluster:K" and "unscreened:K" with K CTAs per head (1-8), ""
// (or nullptr) restores the default. SAPATTN_KMEANS_SEED in the environment says the same until this
// is called. Throws InvalidArgumentError for other names.
void set_seed_kernel_override(const char* name);
// With a workspace of kmeans_workspace_bytes: the tensor-core assignment. Without one (the public
// kmeans_assign has no workspace parameter): the exact fp32 assignment, bit-identical to the CPU's.
void kmeans_assign(const TensorView& points, const TensorView& centroids, TensorView labels, const Stream& stream,
                   Workspace workspace = {}, AssignStats stats = {});
// kmeans/assign_candidates.cu: the CPU's lists and labels bit for bit; a previous label outside
// [0, C) raises the value flag (InvalidArgumentError after the call when value checks are on).
size_t kmeans_assign_candidates_workspace_bytes(int64_t batch_heads, int64_t points, int64_t clusters, int candidates);
void kmeans_assign_candidates(const TensorView& points, const TensorView& centroids, const TensorView& prev_labels,
                              TensorView labels, int candidates, const Stream& stream, Workspace workspace);
// move_centroids = false only counts sizes (kmeans with zero iterations).
void kmeans_update(const TensorView& points, const TensorView& labels, TensorView centroids, TensorView sizes,
                   bool move_centroids, const Stream& stream, Workspace workspace);
void kmeans(const TensorView& points, TensorView centroids, TensorView labels, TensorView sizes, int iters,
            const Stream& stream, Workspace workspace, AssignStats stats = {});

size_t order_clusters_workspace_bytes(int64_t batch_heads, int64_t clusters, int64_t dim);
void order_clusters(TensorView centroids, TensorView sizes, TensorView labels, const Stream& stream,
                    Workspace workspace);
// The kernel that builds order_clusters' chain on `device` for C clusters of dimension D
// (permute/cluster_order.cu): the cluster kernel (sm_90+ with a data-centre GPU's shared memory,
// D <= 128, C <= 2816, or 4096 at D <= 64) or the block kernel (any other shape or GPU, up to 40960
// clusters; `supported` is false above that); the matrix kernels only under the knob "matrix"
// (C <= 8192, D <= 128; permute/chain_matrix.cu).
struct OrderChainKernel {
  bool supported = true;
  bool cluster = false;  // true: a thread-block cluster of `ctas` CTAs per head, rows padded to padded_dim
  bool matrix = false;   // true: the C x C similarity keys, then one CTA of `threads` per head
  int padded_dim = 0;
  int ctas = 1;
  int threads = 0;  // per CTA
  size_t smem = 0;  // dynamic shared memory per CTA, bytes
  const char* name() const { return matrix ? "matrix" : cluster ? "cluster" : "block"; }
};
OrderChainKernel order_chain_kernel(int device, int64_t clusters, int64_t dim);
// Test and benchmark knob (process-wide). The default ("" or nullptr) takes the matrix kernels up to
// C = 2048 at D <= 128 (order_clusters_workspace_bytes counts their 4 C (C + 1) bytes per head), else
// the cluster kernel (sm_90), else the block kernel. "matrix" takes them wherever they fit (C <= 8192,
// D <= 128); "cluster" takes the cluster kernel where it fits, "cluster:N" with its CTAs capped at N
// threads (a multiple of 32; more CTAs per head, shorter steps), and "block" the block kernel: none of
// these three counts the matrix kernels' share. Set the knob before sizing the workspace. Throws
// InvalidArgumentError for other names.
void set_order_chain_override(const char* name);

void select_top_p(const TensorView& probs, float top_p, int min_kept, TensorView mask, const Stream& stream);
void select_blocks(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& k_sizes, float scale,
                   float top_p, int min_kept, TensorView mask, const Stream& stream);
// Test and benchmark knob (process-wide), select_blocks' kernel: "" (or nullptr) the threshold kernel
// (the default; masks within docs/cuda.md's tolerance of the CPU's), "exact" the kernel that repeats
// the CPU's arithmetic (bit-identical masks; 0.93 ms at Wan 14B on an H100). SAPATTN_SELECT_KERNEL in
// the environment says the same until this is called. Throws InvalidArgumentError for other names.
void set_select_kernel_override(const char* name);
void apply_text_rule(TensorView mask, const Stream& stream);
void shard_key_clusters(TensorView mask, int index, int count, const Stream& stream);
void label_text_tokens(TensorView labels, int64_t video_tokens, int64_t prompt_length, int prompt_label,
                       const Stream& stream);
void cluster_permutation(const TensorView& labels, int num_clusters, TensorView perm, TensorView offsets,
                         const Stream& stream, Workspace workspace);
void gather_rows(const TensorView& x, const TensorView& perm, TensorView out, const Stream& stream);
// rope/rope.cu: the CPU's values bit for bit.
void rope_pairs(const TensorView& x, const TensorView& cos, const TensorView& sin, TensorView out,
                const Stream& stream);
void scatter_rows(const TensorView& y, const TensorView& perm, TensorView out, const Stream& stream);
void block_density(const BlockLayout& layout, TensorView density, const Stream& stream);

// SVG-EAR and the density budget (ear/: ear_estimate.cu, ear_probe_tc.cu, ear_select.cu,
// ear_compensation.cu). One scratch size covers cluster_means, ear_probe and select_top_p_at_density
// for B*H heads, N key tokens, Cq x Ck clusters and head dim D.
size_t ear_workspace_bytes(int64_t batch_heads, int64_t tokens, int64_t q_clusters, int64_t k_clusters, int64_t dim);
void cluster_means(const TensorView& points, const TensorView& labels, TensorView means, const Stream& stream,
                   Workspace workspace);
void centroid_probs(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& k_sizes,
                    float scale, TensorView probs, const Stream& stream);
void ear_probe(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& v_centroids,
               const TensorView& k, const TensorView& v, const TensorView& k_labels, const TensorView& q_sizes,
               const TensorView& k_sizes, float scale, float gamma, TensorView scores, const Stream& stream,
               Workspace workspace);
void select_error_aware(const TensorView& probs, const TensorView& budget_mask, const TensorView& scores,
                        const TensorView& q_sizes, const TensorView& k_sizes, int guaranteed, TensorView mask,
                        const Stream& stream);
void select_top_p_at_density(const TensorView& probs, const TensorView& q_sizes, const TensorView& k_sizes,
                             float density, int min_kept, TensorView mask, const Stream& stream, Workspace workspace);
// The compensation (ear/ear_compensation*.cu): tensor cores, scratch of compensation_workspace_bytes
// for Ck' pseudo-keys (Ck' = m * the mask's key clusters).
size_t compensation_workspace_bytes(int64_t batch_heads, int64_t tokens, int64_t q_clusters, int64_t pseudo_keys,
                                    int64_t dim);
void centroid_compensation(const TensorView& q, const TensorView& q_labels, const TensorView& mask,
                           const TensorView& k_centroids, const TensorView& v_centroids, const TensorView& k_sizes,
                           float scale, TensorView out, TensorView lse, const Stream& stream, Workspace workspace);
void corrected_centroid_compensation(const TensorView& q, const TensorView& q_labels, const TensorView& mask,
                                     const TensorView& k_centroids, const TensorView& v_centroids,
                                     const TensorView& k_sizes, const TensorView& spread, const TensorView& pair_values,
                                     float scale, TensorView out, TensorView lse, const Stream& stream,
                                     Workspace workspace);
// Test and benchmark knob (process-wide), the compensation ops' kernel: "" (or nullptr) the default
// (wgmma on an sm_90 GPU, mma.sync elsewhere and with pair values); "mma_sync" the mma.sync kernel on
// any GPU; "wgmma" the wgmma kernel (UnsupportedError at the call on a GPU without it; pair values
// still take mma.sync); "cuda_cores" makes centroid_compensation run the CUDA-core kernel it had
// before the tensor-core ones (no scratch needed; corrected_centroid_compensation takes the default
// then). Throws InvalidArgumentError for other names.
void set_compensation_kernel_override(const char* name);
// Test and benchmark knob (process-wide): "cuda_cores" makes ear_probe and ear_plus_probe run the
// CUDA-core pass (the CPU's logits bit for bit, fp64 sums) where they would take the tensor cores, ""
// (or nullptr) restores the default. Throws InvalidArgumentError for other names.
void set_probe_kernel_override(const char* name);
// Test and benchmark knob (process-wide): "exact" makes round_query_clusters take the exact path (the
// CPU's labels bit for bit) where it would take the tensor cores, "tc" takes the tensor cores for any
// dtype (f32 points rounded to bf16; UnsupportedError where they cannot run: before sm_80, head dims
// over 128), "" (or nullptr) restores the default. Throws InvalidArgumentError for other names.
void set_round_kernel_override(const char* name);

// ear-plus (ear/: ear_plus.cu, ear_select.cu, ear_split.cu). One scratch size covers ear_plus_probe,
// select_error_aware_per_head and split_clusters for B*H heads, N key tokens and Cq x Ck clusters.
size_t ear_plus_workspace_bytes(int64_t batch_heads, int64_t tokens, int64_t q_clusters, int64_t k_clusters);
void ear_plus_probe(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& v_centroids,
                    const TensorView& k, const TensorView& v, const TensorView& k_labels, const TensorView& q_sizes,
                    const TensorView& k_sizes, float scale, float gamma, TensorView scores, TensorView spread,
                    TensorView pair_values, const Stream& stream, Workspace workspace);
void select_error_aware_per_head(const TensorView& probs, const TensorView& budget_mask, const TensorView& scores,
                                 const TensorView& q_sizes, const TensorView& k_sizes, int guaranteed, TensorView mask,
                                 const Stream& stream, Workspace workspace);
void split_clusters(const TensorView& points, const TensorView& labels, const TensorView& centroids,
                    TensorView sub_labels, TensorView sub_sizes, const Stream& stream, Workspace workspace);
// Size rounding of the query clusters (round/: round.cu, round_cost.cu, round_cost_tc.cu). Cq at most
// qround::kMaxClusters (8192), D at most 1024 (UnsupportedError otherwise). f16/bf16 points of head dim
// <= 128 on sm_80+ take the costs on tensor cores (bf16 operands: labels may differ from the CPU's
// where two costs are within the bf16 error); every other call the exact path, the CPU's labels and
// sizes bit for bit.
size_t round_query_clusters_workspace_bytes(int64_t batch_heads, int64_t points, int64_t q_clusters,
                                            int64_t k_clusters, int slack, int prefilter, int candidates);
void round_query_clusters(const TensorView& q, const TensorView& q_centroids, const TensorView& k_centroids,
                          const TensorView& k_sizes, const TensorView& mask, float scale, int slack, float max_cost,
                          int prefilter, int rounds, int candidates, TensorView labels, TensorView sizes,
                          const Stream& stream, Workspace workspace);

// Attention (attention.cu: argument rules for the kernels, planning, kernel choice).
size_t block_sparse_attention_workspace_bytes(int64_t batch_heads, int64_t q_clusters, int64_t k_clusters,
                                              int64_t q_tokens);
void block_sparse_attention(const TensorView& q, const TensorView& k, const TensorView& v, const BlockLayout& layout,
                            float scale, TensorView out, TensorView lse, const Stream& stream, Workspace workspace,
                            const RowPermutation& perm);
void dense_attention(const TensorView& q, const TensorView& k, const TensorView& v, float scale, TensorView out,
                     TensorView lse, const Stream& stream, const RowPermutation& perm = {});
AttentionKernel attention_kernel(int device, DType dtype, int64_t head_dim);
// Forces a kernel family for tests and benchmarks: "sm80" runs the mma.sync kernel on any GPU,
// "" (or nullptr) restores the choice by architecture. SAPATTN_ATTENTION_KERNEL=sm80 in the
// environment does the same. Throws InvalidArgumentError for other names.
void set_attention_kernel_override(const char* name);

// FP8 (fp8/fp8_quantize.cu): quantize_e4m3's codes and scales bit for bit as the CPU's. No scratch:
// per channel, scales holds the column maxima until the op's last kernel turns them into scales.
void quantize_e4m3(const TensorView& x, const TensorView& perm, const TensorView& offsets, const TensorView& shift,
                   Fp8Scale granularity, int tile_rows, TensorView codes, TensorView scales, const Stream& stream);

// FP8 attention (fp8/fp8_attention.cu): the e4m3 Hopper kernel with its quantisation passes. The
// workspace: the plan, the operands' codes and scales, the mean and the LSE terms.
size_t block_sparse_attention_e4m3_workspace_bytes(int64_t batch_heads, int64_t q_clusters, int64_t k_clusters,
                                                   int64_t q_tokens, int64_t k_tokens);
void block_sparse_attention_e4m3(const TensorView& q, const TensorView& k, const TensorView& v,
                                 const BlockLayout& layout, float scale, const Fp8Options& options, TensorView out,
                                 TensorView lse, const Stream& stream, Workspace workspace, const RowPermutation& perm);

// Throws NonFiniteError if x holds a NaN or Inf. Synchronises the stream (it must read the answer),
// so it cannot run inside graph capture (UnsupportedError there).
void check_finite(const TensorView& x, const char* name, const Stream& stream);

// The device-side value checks described above (process-wide; off unless the environment says so).
void set_value_checks(bool on);
bool value_checks();

// Accumulator columns per pass of the tensor-core assignment: 16 (default) or 8. A benchmark and
// test knob; both variants compute the same labels.
void set_assign_columns_per_pass(int columns);
int assign_columns_per_pass();

// The tensor-core k-means assignment's kernel (kmeans/assign_plan.cu), process-wide, for tests and
// benchmarks: "auto" ("" or nullptr too; the default) runs the wgmma kernel on sm_90 devices for head
// dims 64 and 128 and the mma.sync kernel elsewhere; "mma" the mma.sync kernel everywhere; "wgmma" the
// wgmma kernel (UnsupportedError where it cannot run); "wgmma:RxN" its configuration of R point rows per
// consumer warpgroup and N centroids per tile (64x64, 64x160, 64x256 or 128x128; by default the one
// with the least padded work). SAPATTN_KMEANS_ASSIGN in the environment says the same until this is
// called. InvalidArgumentError for other names.
void set_assign_kernel(const char* name);
// What the assignment of C clusters at head dim D with a workspace runs on `device`.
struct AssignKernel {
  bool tensor_cores = false;  // false: the exact fp32 kernel (head dims other than 64 and 128)
  bool wgmma = false;         // else the mma.sync kernel
  int group_rows = 0, tile_n = 0;
};
AssignKernel assign_kernel(int device, int64_t clusters, int64_t dim);

// Largest key-cluster count select_blocks / select_top_p take on CUDA (one block holds a row).
inline constexpr int64_t kMaxSelectColumns = 8192;

}  // namespace sapattn::cuda
