// The layer call with SVG-EAR on a CUDA stream (svg2_attention with --method ear, ear-plus, sap
// --compensate and --density) against the CPU layer, and the whole call captured into a CUDA graph.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/cuda_check.hpp"
#include "cuda_ear_support.hpp"
#include "reference.hpp"
#include "sapattn/svg2.hpp"
#include "test_support.hpp"

namespace sapattn {
namespace {

using cuda_test::deep_copy;
using cuda_test::kCpu;
using cuda_test::TestStream;
using cuda_test::Twin;
using ear_cuda_test::where;
using ref::HostTensor;

// ---------------------------------------------------------------------------------------------
// The layer call on a CUDA stream against the CPU layer. Both start from the same centroids, the
// centres of the blobs the tokens are drawn around, and run zero Lloyd iterations: each token's
// nearest centroid wins by a margin far beyond either backend's rounding (squared distances ~128
// apart against noise of ~8), so sizes, probabilities, budgets and masks are the same, and the
// outputs differ by the attention kernels' bf16 error (the tolerance of test_cuda_svg2.cpp's layer
// test) plus the compensation's. The centres are rounded to bf16 values (a move of ~2^-9 of the
// margin), so that the tensor-core compensation's logits, from bf16 q and kbar, carry only fp32
// error and its output differs by the bf16 rounding of P and vbar (2^-8 each, of the compensated
// share of the row): within the same 2^-7 max|v| as the attention's rounding of P.
// ---------------------------------------------------------------------------------------------

struct LayerCase {
  const char* name;
  Routing routing;
  bool compensate;
  float density;
  int64_t text;
  bool ear_plus = false;  // eval::use_ear_plus: key spread, split key clusters, one budget per head
};

Config layer_config(const LayerCase& lc) {
  Config c;
  c.q_clusters = 8;
  c.k_clusters = 40;
  c.top_p = 0.7f;
  c.kmeans_iters_step = 0;
  c.routing = lc.routing;
  c.compensate = lc.compensate;
  c.density = lc.density;
  c.text_tokens = lc.text;
  c.prompt_length = lc.text / 2;
  c.check_finite = false;  // it synchronises; the graph test captures the call
  c.ear_spread = c.ear_split = c.ear_head_budget = lc.ear_plus;
  return c;
}

struct LayerResult {
  std::vector<double> out, lse, density, q_sizes, k_sizes;
};

struct LayerInputs {
  HostTensor q, k, v, qc, kc;
  double max_v = 0;
};

LayerInputs layer_inputs(int64_t B, int64_t H, int64_t S, int64_t D, const Config& config) {
  const uint32_t seed = static_cast<uint32_t>(testing_support::case_seed());
  auto host_of = [](Tensor t) { return HostTensor{std::move(t), TensorView{}}; };
  std::vector<float> q_centres, k_centres;
  const int qn = static_cast<int>(config.q_clusters), kn = static_cast<int>(config.k_clusters);
  LayerInputs in{
      host_of(testing_support::clustered_tensor(DType::BF16, B, H, S, D, qn, seed, 1.0f, 0.3f, &q_centres)),
      host_of(testing_support::clustered_tensor(DType::BF16, B, H, S, D, kn, seed + 1, 1.0f, 0.3f, &k_centres)),
      host_of(testing_support::random_tensor(DType::BF16, {B, H, S, D}, seed + 2)),
      host_of(Tensor(DType::F32, {B, H, config.q_clusters, D})),
      host_of(Tensor(DType::F32, {B, H, config.k_clusters, D}))};
  for (HostTensor* t : {&in.q, &in.k, &in.v, &in.qc, &in.kc}) t->view = t->storage.view();
  for (double x : ref::to_vector(in.v.view)) in.max_v = std::max(in.max_v, std::abs(x));
  // The centroids: the blobs' centres as bf16 values, in every head.
  for (std::vector<float>* centres : {&q_centres, &k_centres})
    for (float& x : *centres) x = ear_cuda_test::bf16_round(x);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    std::copy(q_centres.begin(), q_centres.end(), in.qc.storage.data_as<float>() + bh * qn * D);
    std::copy(k_centres.begin(), k_centres.end(), in.kc.storage.data_as<float>() + bh * kn * D);
  }
  return in;
}

LayerResult run_layer(const LayerInputs& in, const Config& config, const Stream& stream) {
  const int64_t B = in.q.view.shape[0], H = in.q.view.shape[1], S = in.q.view.shape[2];
  const bool gpu = stream.device.type == DeviceType::CUDA;
  std::vector<Twin> inputs;
  std::vector<TensorView> views;
  for (const HostTensor* t : {&in.q, &in.k, &in.v, &in.qc, &in.kc}) {
    if (gpu) {
      inputs.emplace_back(*t);
      views.push_back(inputs.back().dev);
    } else {
      views.push_back(t->view);
    }
  }
  // The centroids are read and (with zero iterations) not moved; copies keep `in` untouched.
  const HostTensor qc_copy = deep_copy(in.qc), kc_copy = deep_copy(in.kc);
  if (!gpu) {
    views[3] = qc_copy.view;
    views[4] = kc_copy.view;
  }
  const Device dev = stream.device;
  Tensor out(DType::BF16, in.q.storage.shape(), dev), lse(DType::F32, {B, H, S}, dev), density(DType::F32, {B, H}, dev);
  Tensor qs(DType::I32, {B, H, config.q_clusters}, dev), ks(DType::I32, {B, H, config.k_clusters}, dev);
  const AttentionShape shape = AttentionShape::of(in.q.view);
  const Buffer scratch =
      Buffer::allocate(std::max<size_t>(svg2_workspace_bytes(shape, config, DType::BF16, dev), 1), dev);
  try {
    svg2_attention(views[0], views[1], views[2], config, CentroidViews{views[3], views[4], {}}, false,
                   {out.view(), lse.view(), density.view(), qs.view(), ks.view()}, {scratch.data(), scratch.bytes()},
                   stream);
  } catch (const Error& e) {
    ADD_FAILURE() << (gpu ? "GPU" : "CPU") << " layer call: " << e.what() << " (" << e.file() << ":" << e.line() << ")";
    throw;
  }
  auto values = [&](const Tensor& t) {
    if (!gpu) return ref::to_vector(t.view());
    SAPATTN_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream.handle)));
    return cuda_test::host_values(t);
  };
  return {values(out), values(lse), values(density), values(qs), values(ks)};
}

class EarLayer : public ::testing::TestWithParam<LayerCase> {};

TEST_P(EarLayer, CudaLayerMatchesCpuLayer) {
  const LayerCase lc = GetParam();
  // The probe's CUDA-core pass: the CPU's logits bit for bit, so the routing is the CPU's and the masks
  // compare equal. The tensor-core pass (the default) routes as the CPU does wherever no score within
  // its bound can change the kept set (test_cuda_ear_probe_tc.cpp); EarGraph runs the layer with it.
  const ear_cuda_test::CudaCoreProbe cuda_cores;
  // select_blocks (sap_compensate's selection) on the kernel that repeats the CPU's arithmetic, for
  // the same reason: the threshold kernel's masks may differ at the cut (test_cuda_select.cpp).
  const cuda_test::SelectKernelScope exact_select("exact");
  const Config config = layer_config(lc);
  const int64_t B = 1, H = 2, S = 1200 + lc.text, D = 64;
  const LayerInputs in = layer_inputs(B, H, S, D, config);
  TestStream cs;
  const LayerResult cpu = run_layer(in, config, kCpu);
  const LayerResult gpu = run_layer(in, config, cs.stream());
  const LayerResult again = run_layer(in, config, cs.stream());
  ASSERT_EQ(gpu.q_sizes, cpu.q_sizes) << "query clusters differ: the GPU assignment broke a tie (see the comment)";
  ASSERT_EQ(gpu.k_sizes, cpu.k_sizes) << "key clusters differ: the GPU assignment broke a tie (see the comment)";
  EXPECT_EQ(gpu.density, cpu.density) << "the masks differ (exact integer areas on both backends)";
  // ear-plus compensates with the split halves' means, which are not bf16 values: the tensor-core
  // compensation's logits then carry the bf16 rounding of kbar, up to 2^-8 scale |q| |kbar| (~0.04
  // here), so its weights differ by up to ~4% of the compensated share (docs/ear.md's bound).
  const double tol = lc.ear_plus ? 0x1p-4 : 0x1p-7;
  for (size_t i = 0; i < cpu.out.size(); ++i)
    ASSERT_LE(std::abs(gpu.out[i] - cpu.out[i]), tol * in.max_v + 0x1p-7 * std::abs(cpu.out[i]))
        << "out element " << where(in.q.view, static_cast<int64_t>(i)) << ": GPU " << gpu.out[i] << ", CPU "
        << cpu.out[i];
  for (size_t i = 0; i < cpu.lse.size(); ++i)
    ASSERT_LE(std::abs(gpu.lse[i] - cpu.lse[i]), tol / 2 * (1.0 + std::abs(cpu.lse[i])))
        << "lse element " << i << ": GPU " << gpu.lse[i] << ", CPU " << cpu.lse[i];
  EXPECT_EQ(gpu.out, again.out) << "two GPU calls differ: not deterministic";
  EXPECT_EQ(gpu.lse, again.lse) << "two GPU calls differ: not deterministic";
  if (lc.density > 0.0f) {
    for (double d : gpu.density) EXPECT_GE(d, lc.density * (S - lc.text) * (S - lc.text) / (double(S) * S) - 1e-6);
  }
}

INSTANTIATE_TEST_SUITE_P(Methods, EarLayer,
                         ::testing::Values(LayerCase{"ear", Routing::ErrorAware, true, 0.0f, 0},
                                           LayerCase{"sap_compensate", Routing::TopP, true, 0.0f, 0},
                                           LayerCase{"sap_density", Routing::TopP, false, 0.25f, 0},
                                           LayerCase{"ear_density", Routing::ErrorAware, true, 0.2f, 0},
                                           LayerCase{"ear_text", Routing::ErrorAware, true, 0.0f, 40},
                                           LayerCase{"ear_plus", Routing::ErrorAware, true, 0.0f, 0, true},
                                           LayerCase{"ear_plus_text", Routing::ErrorAware, true, 0.2f, 40, true}),
                         [](const ::testing::TestParamInfo<LayerCase>& p) { return std::string(p.param.name); });

// The whole EAR layer call (no check_finite) captured into a CUDA graph: no host synchronisation and
// no allocation inside, and replays equal the eager call bit for bit (with the default kernels: the
// probe and the compensation on tensor cores).
TEST(EarGraph, CapturedLayerMatchesEager) {
  const LayerCase lc{"ear_density", Routing::ErrorAware, true, 0.2f, 0};
  const Config config = layer_config(lc);
  const int64_t B = 1, H = 2, S = 1000, D = 64;
  const LayerInputs in = layer_inputs(B, H, S, D, config);
  TestStream cs;
  const LayerResult eager = run_layer(in, config, cs.stream());
  Twin q(in.q), k(in.k), v(in.v), qc(in.qc), kc(in.kc);
  const Device dev = Device::cuda(0);
  Tensor out(DType::BF16, {B, H, S, D}, dev), lse(DType::F32, {B, H, S}, dev), density(DType::F32, {B, H}, dev);
  const Buffer scratch =
      Buffer::allocate(svg2_workspace_bytes(AttentionShape::of(in.q.view), config, DType::BF16, dev), dev);
  auto call = [&] {
    svg2_attention(q.dev, k.dev, v.dev, config, CentroidViews{qc.dev, kc.dev, {}}, false,
                   {out.view(), lse.view(), density.view()}, {scratch.data(), scratch.bytes()}, cs.stream());
  };
  call();  // eager once: kernel attributes are set outside the capture
  cs.sync();
  const cuda_test::CapturedGraph graph(cs.handle(), call);
  SAPATTN_CUDA_CHECK(cudaMemset(out.data(), 0xff, out.bytes()));
  SAPATTN_CUDA_CHECK(cudaMemset(lse.data(), 0xff, lse.bytes()));
  graph.launch(cs.handle());
  cs.sync();
  EXPECT_EQ(cuda_test::host_values(out), eager.out) << "the graph replay differs from the eager call";
  EXPECT_EQ(cuda_test::host_values(lse), eager.lse) << "the graph replay differs from the eager call";
}

}  // namespace
}  // namespace sapattn
