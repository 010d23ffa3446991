// The CUDA attention kernels' shared contract: the work plan built on the GPU from a BlockLayout
// (attention_plan.cu), the parameters every kernel takes, and the kernels' entry points
// (attention_sm90.cu: wgmma, sm_90a only; attention_sm80.cu: mma.sync, any sm_80+ GPU).
// attention.cu checks the arguments, builds the plan and picks the kernel.
//
// The plan. Cluster-ordered queries are cut into work items of at most kTileQ rows that never
// cross a query cluster, so every row of an item attends to the same key clusters. Each
// (b,h, query cluster) has a list of segments, one per run of kept key clusters whose rows are
// contiguous (consecutive non-empty clusters), in ascending cluster order; a kernel walks the
// concatenation of its segments as one "virtual" key sequence and packs consecutive virtual keys
// into key tiles, so small key clusters do not pad tiles. Items are
// sorted by head, then by cost (rows x kept keys), heaviest first: a persistent grid striding over
// them works on one or two heads at a time (their K and V stay in L2) and finishes together.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "sapattn/layout.hpp"

namespace sapattn::cuda::attn {

inline constexpr int kTileQ = 128;  // query rows per work item (the plan's default)
// The sm90 kernel's CTA pairs (Params::pair) take items of up to two tiles: one per CTA of the pair.
inline constexpr int kPairTileQ = 2 * kTileQ;
// An item's cost: its rows x its kept keys, plus this fixed part (loading its queries, writing its
// outputs, as much as 64 keys of a full tile), so that items whose rows keep no key are cheap but
// not free.
inline constexpr uint64_t kItemBaseCost = 64 * kTileQ;

struct WorkItem {
  int32_t bh;         // b * H + h
  int32_t q_cluster;  // query cluster of every row
  int32_t q_begin;    // rows [q_begin, q_end) of cluster-ordered Q, 0 < q_end - q_begin <= PlanView::item_rows
  int32_t q_end;
};

// A run of kept key clusters as a piece of the virtual key sequence: virtual keys [cum_end - len, cum_end)
// are cluster-ordered key rows [p + delta for p in that range], len = this cum_end minus the
// previous segment's (0 for the first).
struct Segment {
  int32_t delta;    // key row of virtual key p is p + delta
  int32_t cum_end;  // virtual position one past this segment's last key
};

// How build_plan orders the work items within a head (heads always go in ascending order).
// Cost: heaviest first. Locality: by the mean row of the keys an item keeps, so that the items a
// persistent grid runs at one time read overlapping keys. Slot: (query cluster, q_begin).
// SAPATTN_PLAN_ORDER=cost|locality|slot picks one (an experiment, docs/attention.md).
enum class PlanOrder : int { Cost, Locality, Slot };

// Device pointers into the plan workspace. Row r = bh * q_clusters + query cluster.
struct PlanView {
  const WorkItem* items = nullptr;        // [max_items]; items[0, *num_items) are valid, by head, heaviest first
  const int32_t* num_items = nullptr;     // device scalar
  // The persistent kernel's item counter (dynamic scheduling): 0 after build_plan, and back to 0 at
  // the end of every launch that uses it, so a plan serves one launch at a time, launches in stream
  // order.
  int32_t* next_item = nullptr;
  const Segment* segments = nullptr;      // [rows, k_clusters]: row r's segments start at r * k_clusters
  const int32_t* num_segments = nullptr;  // [rows]
  int32_t q_clusters = 0;
  int32_t k_clusters = 0;
  int32_t max_items = 0;  // capacity; a kernel's grid may be sized from it
  int32_t item_rows = kTileQ;  // the most query rows of an item: kTileQ, or kPairTileQ for CTA pairs
};

// Upper bound on the number of work items (of kTileQ rows or more): every cluster may end with a
// partial tile.
inline int64_t max_work_items(int64_t batch_heads, int64_t q_clusters, int64_t q_tokens) {
  return batch_heads * ((q_tokens + kTileQ - 1) / kTileQ + q_clusters);
}

// Workspace bytes of a plan (items, sort scratch, segments, counts), 256-byte aligned pieces.
size_t plan_workspace_bytes(int64_t batch_heads, int64_t q_clusters, int64_t k_clusters, int64_t q_tokens);

// Builds the plan for `layout` (offsets contiguous, mask any strides) of q_tokens queries and
// k_tokens keys into `workspace` on `stream`: no host sync, no allocation, graph-capturable. Throws
// WorkspaceError if the workspace is smaller than plan_workspace_bytes. Reads the offsets as given
// (the caller validated shapes); a (b,h) whose offsets do not start at 0, decrease, or do not end at
// q_tokens (resp. k_tokens) raises kBadOffsets in the device value-check flag and gets no items and
// no segments. Ties in cost keep the order (bh, query cluster, q_begin).
//
// Key phases: with phases > 1 the plan keeps only the kept key clusters whose first row r has
// r * phases / k_tokens == phase (about the phase-th 1/phases of each head's keys); every query tile
// still gets an item, with no keys where its row keeps none there. Running the phases one after
// another, each merged into the earlier ones by LSE (Params::accumulate), gives the whole layout's
// result while the CTAs of a phase share a 1/phases slice of a head's K and V in L2.
//
// item_rows (kTileQ or kPairTileQ) is the most rows of an item: the sm90 kernel's CTA pairs take
// items of two tiles.
PlanView build_plan(const BlockLayout& layout, int64_t q_tokens, int64_t k_tokens, Workspace workspace,
                    cudaStream_t stream, int phase = 0, int phases = 1, int item_rows = kTileQ);

// Everything a kernel needs. Strides are in elements; rows must have unit stride along D.
struct Params {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;      // may be null
  int64_t q_stride[3] = {};  // batch, head, row
  int64_t k_stride[3] = {};
  int64_t v_stride[3] = {};
  int64_t o_stride[3] = {};
  int64_t lse_stride[3] = {};  // batch, head, row
  int32_t batch = 0, heads = 0, seq_q = 0, seq_k = 0, head_dim = 0;
  const int32_t* q_perm = nullptr;  // [B*H, seq_q] or null: read Q / write out and lse through it
  const int32_t* k_perm = nullptr;  // [B*H, seq_k] or null: read K and V through it
  float scale = 0.0f;               // softmax scale; kernels use scale * log2(e) with exp2
  bool dense = false;               // no plan: items are (bh, q tile) and every key is kept
  PlanView plan;                    // when !dense
  int num_sms = 0;                  // for persistent grids
  bool split_tails = true;          // sm90: items of at most 64 rows split across both consumer warpgroups
  int32_t* next_item = nullptr;     // sm90 with TMA loads: plan.next_item, items taken as CTAs free up;
                                    // null: CTA i takes items i, i + grid, ...  (set by the launcher)
  bool accumulate = false;          // sm90: out and lse hold an earlier key phase's rows; merge by LSE
  bool pair = false;                // sm90 with TMA loads: CTA pairs share each item's K/V loads
                                    // (plan.item_rows == kPairTileQ; set by the attention call)
  int* flag = nullptr;              // value-check flag: a perm entry outside [0, S) ORs kBadPermIndex in
                                    // (the row is then read as zeros / not written)
};

// The e4m3 kernel's operands beyond Params (attention_sm90_fp8.cu, docs/fp8.md). Params' q, k and
// v are then the e4m3 codes in cluster order: q [B*H, seq_q, 128], k [B*H * seq_k + 16, 128] (16
// rows past the end: a slot may read them, masked), v transposed in 16-key slots [B*H, v_keys / 16,
// 128, 16] (v_keys = seq_k rounded up to 16, zeros past seq_k: a slot is one contiguous 2 KB box);
// k_perm is null and q_perm, if set, only places the output rows.
struct Fp8Params {
  const float* q_scale = nullptr;    // [B*H, seq_q]: sq_i
  const float* k_scale = nullptr;    // [B*H, v_keys]: sk_j (rows padded to v_keys)
  const float* v_scale = nullptr;    // [B*H, 128]: sv_d
  const float* lse_shift = nullptr;  // [B*H, seq_q] in cluster order: scale * q_i . mean (K smoothed), or null
  int32_t v_keys = 0;                // keys per head of v^T, a multiple of 16
  float p_scale = 448.0f;            // P is stored as e4m3(p * p_scale)
  bool p_sum_e4m3 = true;            // the softmax denominator sums the quantised P
  bool one_key_scale = false;        // K has one scale per head (k_scale[bh * v_keys] holds it)
};

// The instances every attention kernel is compiled for, listed once: f16 and bf16 (each kernel names
// its own element types) times the head dims of KernelHeadDims. attention_kernel() answers
// "supported" from the same list that each kernel's entry point dispatches on, so the two cannot
// disagree (docs/attention.md).
template <typename Element, int HeadDim>
struct Instance {
  using T = Element;
  static constexpr int kHeadDim = HeadDim;
};

template <int... kDims>
struct HeadDims {
  static constexpr bool contains(int64_t head_dim) { return ((head_dim == kDims) || ...); }
  // Calls f(Instance<Bf16 or F16, head_dim>{}); false (and no call) for a head dim not in the list.
  template <typename Bf16, typename F16, typename F>
  static bool dispatch(bool is_bf16, int64_t head_dim, F&& f) {
    const auto with = [&](auto element) {
      using T = typename decltype(element)::T;
      return ((head_dim == kDims && (f(Instance<T, kDims>{}), true)) || ...);
    };
    return is_bf16 ? with(Instance<Bf16, 0>{}) : with(Instance<F16, 0>{});
  }
};
using KernelHeadDims = HeadDims<64, 128>;

// The kernels, for the instances above (is_bf16 picks the element type). Both launch on `stream`
// and return without waiting.
void run_sm90(const Params& params, bool is_bf16, cudaStream_t stream);
void run_sm80(const Params& params, bool is_bf16, cudaStream_t stream);  // params.accumulate and .pair false
// The e4m3 kernel (sm_90a, head dim 128, no key phases, no CTA pairs).
// out_bf16: the output's dtype (bf16, else f16).
void run_sm90_fp8(const Params& params, const Fp8Params& fp8, bool out_bf16, cudaStream_t stream);
bool sm90_compiled();  // whether this build holds the sm_90a kernel
// Whether the sm90 kernel runs `params` (its plan still to be built) as CTA pairs: the
// SAPATTN_SM90_PAIR switch, where the TMA loads run.
bool sm90_pairs(const Params& params);

}  // namespace sapattn::cuda::attn
