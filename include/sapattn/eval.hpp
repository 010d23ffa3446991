// Evaluation: the attention methods sapattn is compared with, run through one code path, and the
// metrics of a run against dense attention. Runs on the CPU backend.
//
//   sap     SVG2: k-means clusters of Q and K, key clusters chosen by the size-weighted centroid
//           softmax and top-p (svg2_attention's clustering and selection).
//   blocks  positional clusters: contiguous blocks of the token order (frame-major) with the same
//           cluster counts, scored and selected by the same rule — what position-based methods do.
//   oracle  the SAP clusters, with key clusters chosen by their true attention mass (from dense
//           attention), same top-p: the upper bound of identification for these clusters.
//   ear     SVG-EAR: the SAP clusters, key clusters routed by the error probe within the area SVG2's
//           top-p computes, every skipped video key cluster compensated through its centroids
//           (docs/ear.md). The config's ear_* fields apply; compensate is implied.
//   ear-plus SVG-EAR with the improvements that won on the generator's workloads (use_ear_plus,
//           docs/ear.md and docs/results.md): ear with those ear_* fields turned on.
//   dense   full attention.
// config.compensate adds the centroid compensation to sap, blocks and oracle too.
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "sapattn/config.hpp"
#include "sapattn/layout.hpp"
#include "sapattn/tensor.hpp"

namespace sapattn::eval {

enum class Method : uint8_t { Sap, Blocks, Oracle, Ear, EarPlus, Dense };
std::string_view method_name(Method m);
// "sap", "blocks", "oracle", "ear", "ear-plus", "dense"; anything else throws InvalidArgumentError.
Method parse_method(std::string_view name);

// ear-plus's config: config with error-aware routing, compensation and the winning ear_* ideas on.
Config use_ear_plus(Config config);

struct MethodResult {
  Method method = Method::Dense;
  Tensor out;            // [B,H,S,D] f32, original token order
  Tensor lse;            // [B,H,S] f32
  Tensor density;        // [B,H] f32 (1 for dense)
  Tensor q_labels;       // [B,H,S] i32: query cluster of each token (text clusters after the video ones)
  Tensor k_labels;       // [B,H,S] i32
  Tensor mask;           // [B,H,Cq',Ck'] u8 over the clusters incl. text; empty for dense
  double seconds = 0.0;  // wall time of the method's attention call, clustering included
};

// Runs one method on q, k, v ([B,H,S,D], any float dtype and strides, on the CPU). The oracle
// needs the dense result (its LSE gives the true attention mass): pass it as `dense`, else
// InvalidArgumentError.
MethodResult run_method(Method method, const TensorView& q, const TensorView& k, const TensorView& v,
                        const Config& config, const MethodResult* dense = nullptr, int threads = 0);

// A selection budget: top_p, or a density (> 0: Config::density, which then replaces top_p).
struct SweepPoint {
  float top_p = 0.9f;
  float density = 0.0f;
};

// Called with (done, total) after each step of a sweep: first the shared part (clusters, the
// oracle's mass, EAR's probe), then each budget; total = points + 1.
using SweepProgress = std::function<void(int64_t done, int64_t total)>;

// One sparse method at several budgets (config.top_p and config.density are ignored): the
// clusters, the oracle's mass matrix and EAR's probe are computed once and shared, as none of them
// depends on the budget. Each result's `seconds` is what a single run at that budget would take
// (the shared part included).
std::vector<MethodResult> run_sweep(Method method, const TensorView& q, const TensorView& k, const TensorView& v,
                                    const Config& config, const std::vector<SweepPoint>& points,
                                    const MethodResult* dense = nullptr, int threads = 0,
                                    const SweepProgress& progress = {});
// The same over top-p values.
std::vector<MethodResult> run_sweep(Method method, const TensorView& q, const TensorView& k, const TensorView& v,
                                    const Config& config, const std::vector<float>& top_ps,
                                    const MethodResult* dense = nullptr, int threads = 0);

// The e4m3 attention (block_sparse_attention_e4m3 with `options`) on the clusters and mask of a
// sparse result of the same inputs and config: the same selection, so its difference from `sparse`
// is the quantisation's alone (docs/fp8.md). The labels, mask and density are sparse's; `seconds`
// is the attention call's. `sparse` must come from sap, blocks or oracle without compensation
// (the e4m3 path does not add it), else InvalidArgumentError.
MethodResult run_e4m3(const MethodResult& sparse, const TensorView& q, const TensorView& k, const TensorView& v,
                      const Config& config, const Fp8Options& options, int threads = 0);

// Fp8Options as text: fields separated by ':', in any order, each optional (the default otherwise):
//   q<N> | qc             Q's scale per tile of N rows | per cluster
//   k<N> | kc             K's
//   v<N> | vc | vch       V's per tile | per cluster | per channel
//   smooth | nosmooth     K smoothing on or off
//   p<X>                  P's scale (a number, 1 to 448)
//   sumf | sumq           the softmax denominator from fp32 P | from the quantised P
// e.g. "q64:kc:vch:smooth:p448:sumf", the order fp8_options_name writes every field in. Anything
// else throws InvalidArgumentError naming the field.
Fp8Options parse_fp8_options(std::string_view spec);
std::string fp8_options_name(const Fp8Options& options);

struct HeadMetrics {
  int64_t batch = 0, head = 0;
  double density = 0;  // share of query-key pairs computed
  double recall = 0;   // mean over query rows of exp(lse - lse_dense): dense attention mass kept
  double rel_l2 = 0;   // ||O - O_dense|| / ||O_dense|| over the head's [S,D] output
  double cosine = 0;   // cosine similarity of the flattened [S,D] outputs
};

struct Metrics {
  std::vector<HeadMetrics> per_head;  // B*H entries, (b, h) order
  HeadMetrics mean;                   // means over per_head (batch = head = -1)
};

// Metrics of `result` against `dense` (same shape).
Metrics compare(const MethodResult& result, const MethodResult& dense);

}  // namespace sapattn::eval
