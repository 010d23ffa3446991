// The whole SVG2 attention of one layer: cluster (k-means, warm-started from the layer's state),
// select key clusters per query cluster (top-p), permute, attend over the kept blocks, and put the
// output back in the original token order. Text tokens (Config::text_tokens > 0) follow the joint
// text rule of apply_text_rule: they are not clustered but appended as a "prompt" and a "padding"
// cluster on both the query and the key side.
#pragma once

#include <map>

#include "sapattn/config.hpp"
#include "sapattn/ops.hpp"
#include "sapattn/tensor.hpp"

namespace sapattn {

struct AttentionShape {
  int64_t batch = 1, heads = 1, seq = 1, head_dim = 64;
  static AttentionShape of(const TensorView& q) { return {q.shape[0], q.shape[1], q.shape[2], q.shape[3]}; }
};

// A branch's centroids in memory the caller owns (a framework's tensors, say):
//   q [B,H,Cq,D] f32, k [B,H,Ck,D] f32, contiguous, on the stream's device; read and written.
struct CentroidViews {
  TensorView q;
  TensorView k;
  TensorView sample_ids;  // [B,H] i32 or empty: each row's initial sample stream (kmeans_init)
};

// k-means centroids of one denoising branch of one layer, per (batch item, head), kept on the
// device of the calls that use them. Empty until the first sparse call.
struct BranchState {
  Tensor q_centroids;  // [B,H,Cq,D] f32
  Tensor k_centroids;  // [B,H,Ck,D] f32
  int64_t calls = 0;   // sparse calls that used this state
  bool initialized() const { return calls > 0; }
  CentroidViews views() const { return {q_centroids.view(), k_centroids.view()}; }
};

// Per-layer state: one BranchState per classifier-free-guidance branch (any small integer id,
// e.g. 0 = conditional, 1 = unconditional), so branches never warm-start from each other.
class LayerState {
 public:
  BranchState& branch(int id = 0) { return branches_[id]; }
  bool has_branch(int id) const { return branches_.count(id) != 0; }
  // Forgets every branch: the next call re-initialises from a fresh sample.
  void reset() { branches_.clear(); }

 private:
  std::map<int, BranchState> branches_;
};

// Optional outputs besides O; leave a view empty to skip it.
struct Svg2Outputs {
  TensorView out;              // [B,H,S,D] f32/f16/bf16, any strides, original token order (required)
  TensorView lse;              // [B,H,S] f32, original token order
  TensorView density;          // [B,H] f32, as block_density defines it, over the whole sequence
  TensorView q_cluster_sizes;  // [B,H,Cq] i32, video query clusters
  TensorView k_cluster_sizes;  // [B,H,Ck] i32, video key clusters
};

// Bytes of workspace svg2_attention needs for this shape, config and input dtype on `device`.
size_t svg2_workspace_bytes(const AttentionShape& shape, const Config& config, DType dtype, Device device);
// The same for the arguments of a call, checked first as svg2_attention checks them: a caller that
// sizes the workspace before the call hears of bad input in its own layout and names (an empty q, a
// k of another length), not as a problem of a shape it never wrote.
size_t svg2_workspace_bytes(const TensorView& q, const TensorView& k, const TensorView& v, const Config& config,
                            const Svg2Outputs& outputs, const Stream& stream);

// q, k, v: [B,H,S,D] f32/f16/bf16, any strides, finite (checked unless config.check_finite is
// false: NonFiniteError otherwise; unchecked, a NaN reaches the same output rows as in dense
// attention on the CPU backend, docs/design.md). None may be empty (ShapeError), and neither
// cluster count may exceed the video tokens S - text_tokens (InvalidArgumentError).
// The first call on a fresh branch samples centroids (seeded by config.seed) and runs
// kmeans_iters_init iterations, then numbers the key clusters along order_clusters' chain (so that
// the clusters a query cluster keeps are mostly neighbours); later calls warm-start and run
// kmeans_iters_step, keeping the numbering. A branch whose cached centroids have another shape
// throws InvalidArgumentError (call LayerState::reset()).
void svg2_attention(const TensorView& q, const TensorView& k, const TensorView& v, const Config& config,
                    BranchState& state, const Svg2Outputs& outputs, Workspace workspace, const Stream& stream);

// The same call with the centroids in caller-owned memory (what bindings to a framework use, so
// that the framework's allocator owns all state). initialize = true samples them (config.seed) and
// runs kmeans_iters_init iterations; false warm-starts from their contents with kmeans_iters_step.
// Their shape must match q and the config (ShapeError), their dtype be f32 (DTypeError).
// centroids.sample_ids, when given, names each (b,h)'s sample stream for the initialisation.
void svg2_attention(const TensorView& q, const TensorView& k, const TensorView& v, const Config& config,
                    const CentroidViews& centroids, bool initialize, const Svg2Outputs& outputs, Workspace workspace,
                    const Stream& stream);

// Convenience for hosts that do not manage memory: allocates the workspace on the stream's device.
void svg2_attention(const TensorView& q, const TensorView& k, const TensorView& v, const Config& config,
                    BranchState& state, const Svg2Outputs& outputs, const Stream& stream);

}  // namespace sapattn
