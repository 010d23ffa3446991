// CUDA graphs: op sequences captured into a graph and replayed give byte for byte what eager launches
// give, so a caller can capture them (no host synchronisation, no allocation inside):
//   - the SVG2 op sequence (kmeans_init, kmeans, select_blocks, cluster_permutation, the gathers and a
//     scatter that undoes one), replayed twice into poisoned outputs;
//   - the attention op under every kernel, planning included, also after new inputs (the layout
//     included) are written into the same buffers: the replay plans again from them.
// The planner alone is captured in test_cuda_plan.cpp, the EAR layer call in test_cuda_ear_layer.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <utility>
#include <vector>

#include "cuda_attention_support.hpp"
#include "cuda_support.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace sapattn::cuda_test {
namespace {

TEST(Graph, CapturedSequenceMatchesEager) {
  ref::Rng rng(testing_support::case_seed());
  const int64_t B = 1, H = 3, N = 3000, D = 128, Cq = 30, Ck = 100;
  const HostTensor q = mixture_points(DType::BF16, B, H, N, D, ref::Layout::Transposed, 20, rng);
  const HostTensor k = mixture_points(DType::BF16, B, H, N, D, ref::Layout::Transposed, 60, rng);
  const DeviceTensor dq = to_device(q), dk = to_device(k), dv = to_device(q);
  auto dev = [](DType t, std::vector<int64_t> shape) { return to_device(poisoned(t, std::move(shape))); };
  DeviceTensor qc = dev(DType::F32, {B, H, Cq, D}), kc = dev(DType::F32, {B, H, Ck, D});
  DeviceTensor ql = dev(DType::I32, {B, H, N}), kl = dev(DType::I32, {B, H, N});
  DeviceTensor qs = dev(DType::I32, {B, H, Cq}), ks = dev(DType::I32, {B, H, Ck});
  DeviceTensor mask = dev(DType::U8, {B, H, Cq, Ck});
  DeviceTensor qp = dev(DType::I32, {B, H, N}), kp = dev(DType::I32, {B, H, N});
  DeviceTensor qo = dev(DType::I32, {B, H, Cq + 1}), ko = dev(DType::I32, {B, H, Ck + 1});
  DeviceTensor qr = dev(DType::BF16, {B, H, N, D}), kr = dev(DType::BF16, {B, H, N, D}),
               vr = dev(DType::BF16, {B, H, N, D});
  DeviceTensor back = to_device(poisoned(DType::BF16, {B, H, N, D}, ref::Layout::Transposed));
  const size_t ws_bytes =
      std::max({kmeans_workspace_bytes(B * H, N, Ck, D, Device::cuda(0)),
                cluster_permutation_workspace_bytes(B * H, N, static_cast<int>(Ck), Device::cuda(0))});
  const Buffer ws = device_workspace(ws_bytes);
  NonBlockingStream cs;
  const Stream st = cs.stream();
  auto sequence = [&] {
    kmeans_init(dq.view, qc.view, 7, st, as_workspace(ws));
    kmeans_init(dk.view, kc.view, 8, st, as_workspace(ws));
    kmeans(dq.view, qc.view, ql.view, qs.view, 2, st, as_workspace(ws));
    kmeans(dk.view, kc.view, kl.view, ks.view, 2, st, as_workspace(ws));
    select_blocks(qc.view, kc.view, ks.view, 0.088f, 0.9f, 10, mask.view, st);
    cluster_permutation(ql.view, static_cast<int>(Cq), qp.view, qo.view, st, as_workspace(ws));
    cluster_permutation(kl.view, static_cast<int>(Ck), kp.view, ko.view, st, as_workspace(ws));
    gather_rows(dq.view, qp.view, qr.view, st);
    gather_rows(dk.view, kp.view, kr.view, st);
    gather_rows(dv.view, kp.view, vr.view, st);
    scatter_rows(qr.view, qp.view, back.view, st);
  };
  const std::vector<const DeviceTensor*> outs = {&qc, &kc, &ql, &kl, &qs, &ks, &mask, &qp,
                                                 &kp, &qo, &ko, &qr, &kr, &vr, &back};
  const GraphReplay replay = expect_replays_match_eager(cs, sequence, outs);
  std::printf("[graph] %zu nodes captured, replays identical to eager\n", replay.nodes);
  // The scatter undid the gather.
  EXPECT_EQ(replay.eager.back(), device_bytes(dq));
}

const std::vector<SparseCase> kGraphCases = {
    {.name = "graph_perm_bf16_D128", .Sq = 900, .Sk = 1100, .D = 128, .q_perm = true, .k_perm = true},
    {.name = "graph_f16_D64_no_lse", .Sq = 700, .Sk = 700, .dtype = DType::F16, .with_lse = false},
};

class AttentionGraph : public UnderKernel<SparseCase> {};

TEST_P(AttentionGraph, ReplaysMatchEagerRuns) {
  const SparseCase& c = test_case();
  ASSERT_TRUE(runs_expected_kernel(c.dtype, c.D));
  const HostProblem first = make_sparse_problem(c, 0), second = make_sparse_problem(c, 1);
  const TestStream cs;
  const DeviceProblem d = to_device(first);
  const Buffer ws = workspace_for(d.inputs());
  const Outputs poisoned = poisoned_outputs(c.dtype, first.q.view, c.with_lse);
  const DeviceTensor out = to_device(poisoned.out), lse = to_device(poisoned.lse);
  // Poisons the outputs, runs `launch` and reads the outputs back.
  auto run = [&](const std::function<void()>& launch) {
    upload(poisoned.out, out);
    upload(poisoned.lse, lse);
    launch();
    cs.sync();
    return Outputs{to_host(out, poisoned.out), to_host(lse, poisoned.lse)};
  };
  const std::function<void()> eager = [&] { d.inputs().attend(out.view, lse.view, cs.stream(), as_workspace(ws)); };
  const Outputs first_eager = run(eager);
  // Planning included: the graph holds every launch of the op.
  const CapturedGraph graph(cs.handle(), eager);
  const std::function<void()> replay = [&] { graph.launch(cs.handle()); };
  for (int i = 0; i < 2; ++i) EXPECT_TRUE(identical(run(replay), first_eager)) << "replay " << i;
  // New values in the same buffers, the layout included: the replay plans again from them.
  for (const auto& [h, dev] : {std::pair{&second.q, &d.q},
                               {&second.k, &d.k},
                               {&second.v, &d.v},
                               {&second.q_offsets, &d.q_offsets},
                               {&second.k_offsets, &d.k_offsets},
                               {&second.mask, &d.mask},
                               {&second.q_perm, &d.q_perm},
                               {&second.k_perm, &d.k_perm}})
    upload(*h, *dev);
  const Outputs second_eager = run(eager);
  EXPECT_FALSE(identical(second_eager, first_eager)) << "the new inputs changed nothing";
  EXPECT_TRUE(matches(second_eager, expect(second, c.with_lse)));
  EXPECT_TRUE(identical(run(replay), second_eager));
}

INSTANTIATE_TEST_SUITE_P(Cases, AttentionGraph, ::testing::Combine(::testing::ValuesIn(kGraphCases), kKernels),
                         case_and_kernel<SparseCase>);

}  // namespace
}  // namespace sapattn::cuda_test
