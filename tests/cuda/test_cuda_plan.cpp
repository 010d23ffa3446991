// The GPU attention planner (src/cuda/attention/attention_plan.cu) against a host construction of the same
// plan: random layouts (empty, one-token and multi-tile clusters, all-kept and none-kept mask rows,
// strided masks, several batches and heads) must give the same segments per row, the same items in
// the same order (heads ascending, within a head cost descending, ties in (cluster, q_begin)
// order) and the same count. Also:
// a captured and replayed plan equals the eager one, a small workspace throws, bad offsets raise
// the value-check flag and leave their (b,h) without items or segments, and the Wan 14B size plans
// as the host does. The planner's time is measured by the benchmarks, not here: sapattn_bench_ops
// (op "build_plan") and sapattn_bench_attention (variant "plan").
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "core/cuda_check.hpp"
#include "cuda/attention/attention.hpp"
#include "cuda/backend.hpp"
#include "cuda/runtime/device.cuh"
#include "cuda_support.hpp"
#include "test_support.hpp"

namespace sapattn::cuda_test {
namespace {

namespace attn = sapattn::cuda::attn;
using ref::Rng;

// ---------------------------------------------------------------------------------------------
// Layouts on the host and the device
// ---------------------------------------------------------------------------------------------

enum class Sizes {
  Mixed,  // empty, one-token, small, exactly one or two tiles, and multi-tile clusters
  Tiny,   // 0 or 1 token: as many items as tokens
  Huge,   // hundreds to thousands of tokens
};

int32_t draw_size(Rng& rng, Sizes sizes) {
  switch (sizes) {
    case Sizes::Tiny:
      return static_cast<int32_t>(rng.integer(0, 1));
    case Sizes::Huge:
      return static_cast<int32_t>(rng.integer(200, 3000));
    case Sizes::Mixed:
      break;
  }
  const double u = rng.uniform();
  if (u < 0.15) return 0;
  if (u < 0.3) return 1;
  if (u < 0.4) return rng.uniform() < 0.5 ? attn::kTileQ : 2 * attn::kTileQ;
  if (u < 0.55) return static_cast<int32_t>(rng.integer(attn::kTileQ + 1, 3 * attn::kTileQ + 17));
  return static_cast<int32_t>(rng.integer(2, attn::kTileQ - 1));
}

struct HostLayout {
  int64_t B = 0, H = 0, Cq = 0, Ck = 0, Sq = 0, Sk = 0;
  std::vector<int32_t> q_offsets;  // [B*H, Cq+1]
  std::vector<int32_t> k_offsets;  // [B*H, Ck+1]
  std::vector<uint8_t> mask_storage;
  std::array<int64_t, 4> mask_stride{};
  int64_t mask_base = 0;  // element [0,0,0,0] of the mask view within mask_storage

  int64_t heads() const { return B * H; }
  int32_t* qo(int64_t bh) { return q_offsets.data() + bh * (Cq + 1); }
  int32_t* ko(int64_t bh) { return k_offsets.data() + bh * (Ck + 1); }
  const int32_t* qo(int64_t bh) const { return q_offsets.data() + bh * (Cq + 1); }
  const int32_t* ko(int64_t bh) const { return k_offsets.data() + bh * (Ck + 1); }
  size_t mask_index(int64_t bh, int64_t a, int64_t c) const {
    return static_cast<size_t>(mask_base + (bh / H) * mask_stride[0] + (bh % H) * mask_stride[1] + a * mask_stride[2] +
                               c * mask_stride[3]);
  }
  uint8_t& mask(int64_t bh, int64_t a, int64_t c) { return mask_storage[mask_index(bh, a, c)]; }
  uint8_t mask(int64_t bh, int64_t a, int64_t c) const { return mask_storage[mask_index(bh, a, c)]; }
};

// Offsets of `heads` heads of C clusters, all ending at one total: each head's sizes are drawn, then
// its last cluster takes what it misses to the largest head's total.
std::vector<int32_t> draw_offsets(Rng& rng, int64_t heads, int64_t C, Sizes sizes, int64_t& total) {
  std::vector<std::vector<int32_t>> drawn(static_cast<size_t>(heads), std::vector<int32_t>(static_cast<size_t>(C)));
  total = 0;
  for (auto& head : drawn) {
    int64_t sum = 0;
    for (int32_t& s : head) sum += s = draw_size(rng, sizes);
    total = std::max(total, sum);
  }
  std::vector<int32_t> offsets;
  for (auto& head : drawn) {
    int64_t sum = 0;
    for (int32_t s : head) sum += s;
    if (C > 0) head.back() += static_cast<int32_t>(total - sum);
    offsets.push_back(0);
    for (int32_t s : head) offsets.push_back(offsets.back() + s);
  }
  return offsets;
}

// Strided: the mask is the [.., 1:Cq+1, 1::2] view of a [B, H, Cq+1, 2*Ck+2] tensor whose other bytes
// are random, so a planner that ignores the strides reads them. Mask rows are all kept (10%), none
// kept (10%), or kept with a density of their own; kept entries are any non-zero byte.
HostLayout make_layout(Rng& rng, int64_t B, int64_t H, int64_t Cq, int64_t Ck, Sizes sizes, bool strided) {
  HostLayout l;
  l.B = B;
  l.H = H;
  l.Cq = Cq;
  l.Ck = Ck;
  l.q_offsets = draw_offsets(rng, B * H, Cq, sizes, l.Sq);
  l.k_offsets = draw_offsets(rng, B * H, Ck, sizes, l.Sk);
  if (strided) {
    const int64_t row = 2 * Ck + 2;
    l.mask_storage.resize(static_cast<size_t>(B * H * (Cq + 1) * row));
    l.mask_stride = {H * (Cq + 1) * row, (Cq + 1) * row, row, 2};
    l.mask_base = row + 1;
  } else {
    l.mask_storage.resize(static_cast<size_t>(B * H * Cq * Ck));
    l.mask_stride = {H * Cq * Ck, Cq * Ck, Ck, 1};
  }
  for (uint8_t& m : l.mask_storage) m = static_cast<uint8_t>(rng.next());
  for (int64_t bh = 0; bh < l.heads(); ++bh)
    for (int64_t a = 0; a < Cq; ++a) {
      const double mode = rng.uniform(), density = rng.uniform();
      for (int64_t c = 0; c < Ck; ++c) {
        const bool keep = mode < 0.1 || (mode >= 0.2 && rng.uniform() < density);
        l.mask(bh, a, c) = keep ? static_cast<uint8_t>(rng.integer(1, 255)) : 0;
      }
    }
  return l;
}

struct DeviceLayout {
  Buffer q, k, mask;
  BlockLayout view;
};

DeviceLayout to_device(const HostLayout& l) {
  DeviceLayout d;
  d.q = upload_bytes(l.q_offsets.data(), l.q_offsets.size() * sizeof(int32_t));
  d.k = upload_bytes(l.k_offsets.data(), l.k_offsets.size() * sizeof(int32_t));
  d.mask = upload_bytes(l.mask_storage.data(), l.mask_storage.size());
  d.view.q_offsets = TensorView::contiguous(d.q.data(), DType::I32, {l.B, l.H, l.Cq + 1}, Device::cuda(0));
  d.view.k_offsets = TensorView::contiguous(d.k.data(), DType::I32, {l.B, l.H, l.Ck + 1}, Device::cuda(0));
  TensorView m;
  m.data = static_cast<uint8_t*>(d.mask.data()) + l.mask_base;
  m.dtype = DType::U8;
  m.rank = 4;
  m.shape = {l.B, l.H, l.Cq, l.Ck};
  m.stride = l.mask_stride;
  m.device = Device::cuda(0);
  d.view.mask = m;
  return d;
}

// ---------------------------------------------------------------------------------------------
// Plans
// ---------------------------------------------------------------------------------------------

struct Plan {
  std::vector<attn::WorkItem> items;                 // the valid items, in plan order
  std::vector<std::vector<attn::Segment>> segments;  // per row
};

auto item_key(const attn::WorkItem& w) { return std::tuple(w.bh, w.q_cluster, w.q_begin, w.q_end); }
auto segment_key(const attn::Segment& s) { return std::tuple(s.delta, s.cum_end); }

std::string describe(const attn::WorkItem& w) {
  return "{bh " + std::to_string(w.bh) + ", cluster " + std::to_string(w.q_cluster) + ", rows " +
         std::to_string(w.q_begin) + ".." + std::to_string(w.q_end) + "}";
}

// The plan by its definition. bh_ok[bh] = false: that head plans nothing (its offsets are bad).
Plan host_plan(const HostLayout& l, const std::vector<bool>& bh_ok) {
  Plan p;
  p.segments.resize(static_cast<size_t>(l.heads() * l.Cq));
  std::vector<std::pair<uint64_t, attn::WorkItem>> items;  // in (bh, cluster, q_begin) order
  for (int64_t bh = 0; bh < l.heads(); ++bh) {
    if (!bh_ok[static_cast<size_t>(bh)]) continue;
    const int32_t *qo = l.qo(bh), *ko = l.ko(bh);
    for (int64_t a = 0; a < l.Cq; ++a) {
      auto& segs = p.segments[static_cast<size_t>(bh * l.Cq + a)];
      int32_t keys = 0;
      for (int64_t c = 0; c < l.Ck; ++c) {
        const int32_t size = ko[c + 1] - ko[c];
        if (l.mask(bh, a, c) == 0 || size == 0) continue;
        if (!segs.empty() && segs.back().delta + segs.back().cum_end == ko[c]) {
          segs.back().cum_end += size;  // rows continue the previous kept cluster's: one run
        } else {
          segs.push_back({ko[c] - keys, keys + size});
        }
        keys += size;
      }
      for (int32_t q = qo[a]; q < qo[a + 1]; q += attn::kTileQ) {
        const int32_t end = std::min(q + attn::kTileQ, qo[a + 1]);
        const uint64_t cost = static_cast<uint64_t>(end - q) * static_cast<uint64_t>(keys) + attn::kItemBaseCost;
        items.push_back({cost, {static_cast<int32_t>(bh), static_cast<int32_t>(a), q, end}});
      }
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const auto& x, const auto& y) {
    if (x.second.bh != y.second.bh) return x.second.bh < y.second.bh;
    return x.first > y.first;
  });
  for (const auto& item : items) p.items.push_back(item.second);
  return p;
}

Plan read_plan(const attn::PlanView& view, int64_t heads, cudaStream_t stream) {
  SAPATTN_CUDA_CHECK(cudaStreamSynchronize(stream));
  Plan p;
  const int32_t n = download(view.num_items, 1)[0];
  EXPECT_GE(n, 0);
  EXPECT_LE(n, view.max_items);
  p.items = download(view.items, std::clamp(n, 0, view.max_items));
  const int64_t rows = heads * view.q_clusters;
  const std::vector<int32_t> counts = download(view.num_segments, rows);
  const std::vector<attn::Segment> all = download(view.segments, rows * view.k_clusters);
  p.segments.resize(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t count = counts[static_cast<size_t>(r)];
    EXPECT_TRUE(count >= 0 && count <= view.k_clusters) << "row " << r << ": " << count << " segments";
    const auto first = all.begin() + r * view.k_clusters;
    p.segments[static_cast<size_t>(r)].assign(first, first + std::clamp<int64_t>(count, 0, view.k_clusters));
  }
  return p;
}

// Compares the items as a set first (a wrong item), then their order, then the segments, and
// reports the first difference of each kind.
void expect_same_plan(const Plan& got, const Plan& want, const std::string& what) {
  ASSERT_EQ(got.items.size(), want.items.size()) << what << ": number of items";
  auto by_position = [](std::vector<attn::WorkItem> v) {
    std::sort(v.begin(), v.end(), [](const auto& x, const auto& y) { return item_key(x) < item_key(y); });
    return v;
  };
  const auto got_set = by_position(got.items), want_set = by_position(want.items);
  for (size_t i = 0; i < got_set.size(); ++i)
    ASSERT_EQ(item_key(got_set[i]), item_key(want_set[i]))
        << what << ": items differ as a set: " << describe(got_set[i]) << " vs " << describe(want_set[i]);
  for (size_t i = 0; i < got.items.size(); ++i)
    ASSERT_EQ(item_key(got.items[i]), item_key(want.items[i]))
        << what << ": item " << i << " out of order: " << describe(got.items[i]) << ", expected "
        << describe(want.items[i]);
  ASSERT_EQ(got.segments.size(), want.segments.size()) << what;
  for (size_t r = 0; r < got.segments.size(); ++r) {
    const auto &g = got.segments[r], &w = want.segments[r];
    ASSERT_EQ(g.size(), w.size()) << what << ": segments of row " << r;
    for (size_t i = 0; i < g.size(); ++i)
      ASSERT_EQ(segment_key(g[i]), segment_key(w[i])) << what << ": segment " << i << " of row " << r;
  }
}

struct PlanWorkspace {
  explicit PlanWorkspace(const HostLayout& l)
      : bytes(attn::plan_workspace_bytes(l.heads(), l.Cq, l.Ck, l.Sq)), buffer(device_workspace(bytes)) {}
  Workspace workspace() const { return {buffer.data(), bytes}; }
  void poison() const { SAPATTN_CUDA_CHECK(cudaMemset(buffer.data(), 0xff, buffer.bytes())); }
  size_t bytes;
  Buffer buffer;
};

// ---------------------------------------------------------------------------------------------
// Random layouts
// ---------------------------------------------------------------------------------------------

struct PlanCase {
  int64_t B, H, Cq, Ck;
  Sizes sizes;
  bool strided;
};

class PlanCaseTest : public ::testing::TestWithParam<PlanCase> {};

TEST_P(PlanCaseTest, MatchesHostConstruction) {
  const PlanCase& pc = GetParam();
  Rng rng(testing_support::case_seed());
  for (int trial = 0; trial < 3; ++trial) {
    const HostLayout l = make_layout(rng, pc.B, pc.H, pc.Cq, pc.Ck, pc.sizes, pc.strided);
    const DeviceLayout d = to_device(l);
    const PlanWorkspace ws(l);
    ws.poison();  // the planner must not rely on a cleared workspace
    NonBlockingStream cs;
    const attn::PlanView view = attn::build_plan(d.view, l.Sq, l.Sk, ws.workspace(), cs.handle());
    EXPECT_EQ(view.q_clusters, l.Cq);
    EXPECT_EQ(view.k_clusters, l.Ck);
    EXPECT_EQ(view.max_items, attn::max_work_items(l.heads(), l.Cq, l.Sq));
    const Plan want = host_plan(l, std::vector<bool>(static_cast<size_t>(l.heads()), true));
    expect_same_plan(read_plan(view, l.heads(), cs.handle()), want, "trial " + std::to_string(trial));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, PlanCaseTest,
    ::testing::Values(PlanCase{1, 1, 5, 7, Sizes::Mixed, false}, PlanCase{2, 3, 20, 30, Sizes::Mixed, true},
                      PlanCase{1, 2, 40, 1500, Sizes::Mixed, true},  // several scan passes per row
                      PlanCase{2, 2, 64, 64, Sizes::Tiny, false}, PlanCase{1, 3, 6, 9, Sizes::Huge, true},
                      PlanCase{3, 1, 1, 1, Sizes::Mixed, false},
                      PlanCase{1, 2, 8, 0, Sizes::Mixed, false},   // no key clusters: items, no segments
                      PlanCase{2, 1, 0, 5, Sizes::Mixed, false}),  // no query clusters: nothing
    [](const auto& p) {
      const PlanCase& c = p.param;
      const char* sizes = c.sizes == Sizes::Mixed ? "mixed" : c.sizes == Sizes::Tiny ? "tiny" : "huge";
      return "B" + std::to_string(c.B) + "_H" + std::to_string(c.H) + "_Cq" + std::to_string(c.Cq) + "_Ck" +
             std::to_string(c.Ck) + "_" + sizes + (c.strided ? "_strided" : "");
    });

// ---------------------------------------------------------------------------------------------
// Graph capture, workspace, value checks
// ---------------------------------------------------------------------------------------------

TEST(Plan, GraphReplayMatchesEager) {
  Rng rng(testing_support::case_seed());
  const HostLayout l = make_layout(rng, 2, 4, 50, 80, Sizes::Mixed, true);
  const DeviceLayout d = to_device(l);
  const PlanWorkspace ws(l);
  NonBlockingStream cs;
  const Plan eager =
      read_plan(attn::build_plan(d.view, l.Sq, l.Sk, ws.workspace(), cs.handle()), l.heads(), cs.handle());
  expect_same_plan(eager, host_plan(l, std::vector<bool>(static_cast<size_t>(l.heads()), true)), "eager");

  attn::PlanView captured;
  const CapturedGraph graph(cs.handle(),
                            [&] { captured = attn::build_plan(d.view, l.Sq, l.Sk, ws.workspace(), cs.handle()); });
  for (int replay = 0; replay < 2; ++replay) {
    ws.poison();
    graph.launch(cs.handle());
    expect_same_plan(read_plan(captured, l.heads(), cs.handle()), eager, "replay " + std::to_string(replay));
  }
}

TEST(Plan, SmallWorkspaceThrows) {
  Rng rng(testing_support::case_seed());
  const HostLayout l = make_layout(rng, 1, 2, 10, 12, Sizes::Mixed, false);
  const DeviceLayout d = to_device(l);
  const PlanWorkspace ws(l);
  NonBlockingStream cs;
  ASSERT_GT(ws.bytes, 0u);
  EXPECT_THROW(attn::build_plan(d.view, l.Sq, l.Sk, Workspace{ws.buffer.data(), ws.bytes - 1}, cs.handle()),
               WorkspaceError);
  EXPECT_THROW(attn::build_plan(d.view, l.Sq, l.Sk, Workspace{}, cs.handle()), WorkspaceError);
  EXPECT_NO_THROW(attn::build_plan(d.view, l.Sq, l.Sk, ws.workspace(), cs.handle()));
  SAPATTN_CUDA_CHECK(cudaStreamSynchronize(cs.handle()));
}

TEST(Plan, BadOffsetsRaiseTheFlagAndPlanNothingForTheirHead) {
  const ValueChecksOn on;
  const int64_t bad_bh = 2;  // b = 1, h = 0
  struct Corruption {
    const char* name;
    std::function<void(HostLayout&)> apply;
  };
  const std::vector<Corruption> corruptions = {
      {"q starts at 1", [&](HostLayout& l) { l.qo(bad_bh)[0] = 1; }},
      {"q decreases", [&](HostLayout& l) { l.qo(bad_bh)[4] = l.qo(bad_bh)[3] - 1; }},
      {"q ends before Sq", [&](HostLayout& l) { l.qo(bad_bh)[l.Cq] = static_cast<int32_t>(l.Sq - 1); }},
      {"q ends past Sq", [&](HostLayout& l) { l.qo(bad_bh)[l.Cq] = static_cast<int32_t>(l.Sq + 1000); }},
      {"k starts below 0", [&](HostLayout& l) { l.ko(bad_bh)[0] = -5; }},
      {"k decreases", [&](HostLayout& l) { l.ko(bad_bh)[7] = l.ko(bad_bh)[6] - 1; }},
      {"k ends past Sk", [&](HostLayout& l) { l.ko(bad_bh)[l.Ck] = static_cast<int32_t>(l.Sk + 1); }},
  };
  Rng rng(testing_support::case_seed());
  const HostLayout good = make_layout(rng, 2, 2, 10, 12, Sizes::Mixed, true);
  std::vector<bool> ok(static_cast<size_t>(good.heads()), true);
  NonBlockingStream cs;
  const PlanWorkspace ws(good);
  {
    const DeviceLayout d = to_device(good);
    ASSERT_TRUE(cuda::begin_value_check(cs.stream()));
    const attn::PlanView view = attn::build_plan(d.view, good.Sq, good.Sk, ws.workspace(), cs.handle());
    EXPECT_NO_THROW(cuda::end_value_check(cs.stream(), "build_plan"));
    expect_same_plan(read_plan(view, good.heads(), cs.handle()), host_plan(good, ok), "good offsets");
  }
  ok[bad_bh] = false;
  for (const Corruption& corruption : corruptions) {
    HostLayout bad = good;
    corruption.apply(bad);
    const DeviceLayout d = to_device(bad);
    ws.poison();
    ASSERT_TRUE(cuda::begin_value_check(cs.stream()));
    const attn::PlanView view = attn::build_plan(d.view, bad.Sq, bad.Sk, ws.workspace(), cs.handle());
    EXPECT_THROW(cuda::end_value_check(cs.stream(), "build_plan"), InvalidArgumentError) << corruption.name;
    // The other heads are planned as usual.
    expect_same_plan(read_plan(view, bad.heads(), cs.handle()), host_plan(bad, ok), corruption.name);
  }
}

// ---------------------------------------------------------------------------------------------
// The Wan 14B size: 40 heads, 300 x 1000 clusters over 75600 tokens (its time: bench/bench_ops.cu).
// ---------------------------------------------------------------------------------------------

TEST(PlanLarge, WanSizeMatchesHost) {
  const int64_t H = 40, Cq = 300, Ck = 1000, S = 75600;
  Rng rng(testing_support::case_seed());
  HostLayout l;
  l.B = 1;
  l.H = H;
  l.Cq = Cq;
  l.Ck = Ck;
  l.Sq = l.Sk = S;
  // Cluster sizes around the mean, some empty; the last cluster takes the rest.
  auto offsets = [&](int64_t C) {
    std::vector<int32_t> o;
    for (int64_t bh = 0; bh < H; ++bh) {
      o.push_back(0);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t left = S - o.back();
        const int64_t size = c == C - 1 ? left : std::min<int64_t>(left, rng.integer(0, 2 * S / C));
        o.push_back(o.back() + static_cast<int32_t>(size));
      }
    }
    return o;
  };
  l.q_offsets = offsets(Cq);
  l.k_offsets = offsets(Ck);
  l.mask_storage.resize(static_cast<size_t>(H * Cq * Ck));
  l.mask_stride = {H * Cq * Ck, Cq * Ck, Ck, 1};
  for (int64_t r = 0; r < H * Cq; ++r) {
    const double density = 0.05 + 0.35 * rng.uniform();  // SVG2's top-p keeps a few to a few tens of percent
    for (int64_t c = 0; c < Ck; ++c) l.mask_storage[static_cast<size_t>(r * Ck + c)] = rng.uniform() < density;
  }
  const DeviceLayout d = to_device(l);
  const PlanWorkspace ws(l);
  NonBlockingStream cs;
  const attn::PlanView view = attn::build_plan(d.view, S, S, ws.workspace(), cs.handle());
  expect_same_plan(read_plan(view, H, cs.handle()), host_plan(l, std::vector<bool>(H, true)), "wan");
}

}  // namespace
}  // namespace sapattn::cuda_test
