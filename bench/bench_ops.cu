// Times the CUDA semantic-aware permutation ops, order_clusters, round_query_clusters, SVG-EAR's
// compensation and probe and the attention planner at the official SVG2 shapes (the full-size ones of
// bench/shapes.json, over their video tokens), with the harness's timer (bench/harness.hpp:
// CUTLASS's method, warm-up apart from timing, CUDA events, the median of many runs) on random
// structured inputs that are far larger than the L2 for every memory-bound op.
// Prints one JSON object per measurement; bench/report.py puts them next to the floors and the peers
// measured in the same run.
//
//   sapattn_bench_ops [--shape wan14b|wan13b|hunyuan|all] [--reps N]   (--help needs no GPU)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/cuda_check.hpp"
#include "core/splitmix64.hpp"
#include "cuda/attention/attention.hpp"
#include "cuda/backend.hpp"
#include "harness.hpp"
#include "sapattn/config.hpp"
#include "sapattn/ops.hpp"

namespace {

using namespace sapattn;
using bench::BenchShape;
using bench::JsonLine;
using bench::Timing;

constexpr int kMaxCandidates = 64;  // the largest candidate count the k-means rows time

__device__ float gauss(uint64_t key) {
  const uint64_t r = splitmix64(key);
  const float u = (static_cast<float>(r >> 40) + 0.5f) * 0x1p-24f;
  const float v = static_cast<float>((r >> 16) & 0xffffff) * 0x1p-24f;
  return sqrtf(-2.0f * logf(u)) * cospif(2.0f * v);
}

// x[b,s,h,d] (memory [B,S,H,D]) = 1.5 * centre[h, mode(s)] + noise: tokens gather around `modes`
// centres per head, as video tokens gather around objects, with noise so that no two are equal.
__global__ void fill_kernel(__nv_bfloat16* x, int64_t S, int64_t H, int64_t D, int64_t modes, uint64_t seed) {
  const int64_t n = S * H * D;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < n;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = t % D, h = (t / D) % H, s = t / (D * H);
    const int64_t mode =
        static_cast<int64_t>(splitmix64(seed ^ (s * 1315423911ull + h)) % static_cast<uint64_t>(modes));
    const float centre = gauss(seed * 31 + ((h * modes + mode) * D + d) * 2 + 1);
    x[t] = __float2bfloat16_rn(1.5f * centre + gauss(seed * 17 + t * 2));
  }
}

__global__ void fill_f32_kernel(float* x, int64_t n, uint64_t seed) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < n;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[t] = gauss(seed + t);
}

// mask[i] = 1 (kept) with probability `keep`, from a hash of i: a selection of fixed density.
__global__ void fill_mask_kernel(uint8_t* mask, int64_t n, float keep, uint64_t seed) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < n;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x)
    mask[t] = (static_cast<float>(splitmix64(seed + t) >> 40) * 0x1p-24f) < keep ? 1 : 0;
}

// One measurement: {"shape", "op", "median_ms", "min_ms", "reps", "bytes", "flops"}, the bytes and
// FLOPs being what bench/report.py divides by the floors' rates. Callers may add fields, then print.
JsonLine measurement(const BenchShape& s, const std::string& op, const Timing& t, double bytes, double flops) {
  JsonLine j;
  j.str("shape", s.name)
      .str("op", op)
      .fixed("median_ms", t.median_ms, 4)
      .fixed("min_ms", t.min_ms, 4)
      .integer("reps", t.iters)
      .num("bytes", bytes, 6)
      .num("flops", flops, 6);
  return j;
}

void emit(const BenchShape& s, const std::string& op, const Timing& t, double bytes, double flops) {
  measurement(s, op, t, bytes, flops).print();
}

// SVG-EAR's compensation (docs/ear.md) on the clusters of this run: every video query row against the
// key clusters its query cluster skips, at a kept share of 0.15 (the density of the attention
// estimates), on each kernel (set_compensation_kernel_override): wgmma (sm_90 only; the default
// there), mma.sync and, for EAR, the CUDA-core one; and ear-plus's (two pseudo-keys per key cluster,
// with the spread) on both tensor-core kernels. FLOPs: the two GEMMs over the skipped pairs (the
// useful work; the wgmma kernel computes every pair and masks the kept ones).
void bench_compensation(const BenchShape& s, int reps, const Stream& st, const bench::EventTimer& timer,
                        const TensorView& q, const Tensor& q_labels, const Tensor& k_centroids, const Tensor& k_sizes) {
  const Device dev = st.device;
  const cudaStream_t cs = static_cast<cudaStream_t>(st.handle);
  const int64_t B = s.batch, H = s.heads, S = s.video_tokens(), D = s.head_dim, BH = B * H;
  const int64_t Cq = s.q_clusters, Ck = s.k_clusters;
  constexpr float kKept = 0.15f;
  auto tensor = [&](DType t, std::vector<int64_t> shape) { return Tensor(t, std::move(shape), dev); };
  Tensor mask = tensor(DType::U8, {B, H, Cq, Ck}), vc = tensor(DType::F32, {B, H, Ck, D});
  Tensor out = tensor(DType::BF16, {B, S, H, D}), lse = tensor(DType::F32, {B, H, S});
  fill_mask_kernel<<<1024, 256, 0, cs>>>(mask.data_as<uint8_t>(), mask.numel(), kKept, 21);
  fill_f32_kernel<<<1024, 256, 0, cs>>>(vc.data_as<float>(), vc.numel(), 22);
  fill_kernel<<<4096, 256, 0, cs>>>(out.data_as<__nv_bfloat16>(), S, H, D, 64, 23);
  fill_f32_kernel<<<1024, 256, 0, cs>>>(lse.data_as<float>(), lse.numel(), 24);
  SAPATTN_CUDA_CHECK(cudaGetLastError());
  const TensorView outv = TensorView::bshd(out.data(), DType::BF16, B, H, S, D, dev);
  // ear-plus's pseudo-keys: each key cluster's centroid twice, its size split in two, and a spread.
  Tensor kc2 = tensor(DType::F32, {B, H, 2 * Ck, D}), vc2 = tensor(DType::F32, {B, H, 2 * Ck, D});
  Tensor ks2 = tensor(DType::I32, {B, H, 2 * Ck}), spread = tensor(DType::F32, {B, H, Cq, 2 * Ck});
  fill_f32_kernel<<<1024, 256, 0, cs>>>(kc2.data_as<float>(), kc2.numel(), 25);
  fill_f32_kernel<<<1024, 256, 0, cs>>>(vc2.data_as<float>(), vc2.numel(), 26);
  fill_f32_kernel<<<1024, 256, 0, cs>>>(spread.data_as<float>(), spread.numel(), 27);
  SAPATTN_CUDA_CHECK(cudaGetLastError());
  {
    std::vector<int32_t> sizes(static_cast<size_t>(BH * Ck)), halves(static_cast<size_t>(2 * BH * Ck));
    SAPATTN_CUDA_CHECK(cudaMemcpyAsync(sizes.data(), k_sizes.data(), sizes.size() * 4, cudaMemcpyDeviceToHost, cs));
    SAPATTN_CUDA_CHECK(cudaStreamSynchronize(cs));
    for (size_t j = 0; j < sizes.size(); ++j) {
      halves[2 * j] = sizes[j] / 2;
      halves[2 * j + 1] = sizes[j] - sizes[j] / 2;
    }
    SAPATTN_CUDA_CHECK(cudaMemcpyAsync(ks2.data(), halves.data(), halves.size() * 4, cudaMemcpyHostToDevice, cs));
    SAPATTN_CUDA_CHECK(cudaStreamSynchronize(cs));
  }
  const Buffer ws_buf = Buffer::allocate(compensation_workspace_bytes(BH, S, Cq, 2 * Ck, D, dev), dev);
  const Workspace ws{ws_buf.data(), ws_buf.bytes()};
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  // Q, the output and its lse read, the output and lse written (bf16, f32); the centroids are
  // L2-resident. FLOPs: 2 GEMMs of 2 FLOPs per multiply-add over the skipped (row, pseudo-key) pairs.
  const double bytes = static_cast<double>(BH * S) * (D * 2 * 3 + 8);
  const double flops = 4.0 * static_cast<double>(BH * S) * (1.0 - kKept) * static_cast<double>(Ck * D);
  auto ear = [&] {
    centroid_compensation(q, q_labels.view(), mask.view(), k_centroids.view(), vc.view(), k_sizes.view(), scale, outv,
                          lse.view(), st, ws);
  };
  auto ear_plus = [&] {
    corrected_centroid_compensation(q, q_labels.view(), mask.view(), kc2.view(), vc2.view(), ks2.view(), spread.view(),
                                    {}, scale, outv, lse.view(), st, ws);
  };
  int major = 0, minor = 0;
  SAPATTN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev.index));
  SAPATTN_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev.index));
  const bool sm90 = major == 9 && minor == 0;
  for (const char* kernel : {"wgmma", "mma_sync"}) {
    if (std::string(kernel) == "wgmma" && !sm90) continue;
    cuda::set_compensation_kernel_override(kernel);
    measurement(s, std::string("ear_compensation_") + kernel, timer.time(ear, 3, reps), bytes, flops)
        .fixed("kept_share", kKept, 2)
        .print();
    measurement(s, std::string("ear_plus_compensation_") + kernel, timer.time(ear_plus, 3, reps), bytes, 2 * flops)
        .fixed("kept_share", kKept, 2)
        .print();
  }
  cuda::set_compensation_kernel_override("cuda_cores");
  measurement(s, "ear_compensation_cuda_cores", timer.time(ear, 2, std::max(reps / 4, 3)), bytes, flops)
      .fixed("kept_share", kKept, 2)
      .print();
  cuda::set_compensation_kernel_override("");
}

// SVG-EAR's probe and ear-plus's (the spread with it) on the clusters of this run, on the tensor
// cores (the default for bf16 keys) and on the CUDA-core pass they replace (the CPU's logits bit for
// bit, fp64 state). Bytes: K and V read once (the label sort and the statistics aside), the scores
// written; FLOPs: the logits, 2 Cq S D per head (the tensor cores do twice that: hi and lo).
void bench_probe(const BenchShape& s, int reps, const Stream& st, const bench::EventTimer& timer,
                 const TensorView& k, const TensorView& v, const Tensor& q_centroids, const Tensor& k_centroids,
                 const Tensor& k_labels, const Tensor& q_sizes, const Tensor& k_sizes) {
  const Device dev = st.device;
  const int64_t B = s.batch, H = s.heads, S = s.video_tokens(), D = s.head_dim, BH = B * H;
  const int64_t Cq = s.q_clusters, Ck = s.k_clusters;
  auto tensor = [&](DType t, std::vector<int64_t> shape) { return Tensor(t, std::move(shape), dev); };
  Tensor vc = tensor(DType::F32, {B, H, Ck, D}), scores = tensor(DType::F32, {B, H, Cq, Ck});
  Tensor spread = tensor(DType::F32, {B, H, Cq, Ck});
  const Buffer ws_buf = Buffer::allocate(
      std::max(ear_workspace_bytes(BH, S, Cq, Ck, D, dev), ear_plus_workspace_bytes(BH, S, Cq, Ck, dev)), dev);
  const Workspace ws{ws_buf.data(), ws_buf.bytes()};
  cluster_means(v, k_labels.view(), vc.view(), st, ws);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const double bytes = static_cast<double>(BH * S) * D * 2 * 2 + static_cast<double>(BH * Cq * Ck) * 4;
  const double flops = 2.0 * static_cast<double>(BH * Cq * S * D);
  auto ear = [&] {
    ear_probe(q_centroids.view(), k_centroids.view(), vc.view(), k, v, k_labels.view(), q_sizes.view(),
              k_sizes.view(), scale, 1.0f, scores.view(), st, ws);
  };
  auto plus = [&] {
    ear_plus_probe(q_centroids.view(), k_centroids.view(), vc.view(), k, v, k_labels.view(), q_sizes.view(),
                   k_sizes.view(), scale, 1.0f, scores.view(), spread.view(), {}, st, ws);
  };
  emit(s, "ear_probe_tc", timer.time(ear, 3, reps), bytes, flops);
  emit(s, "ear_plus_probe_tc", timer.time(plus, 3, reps), bytes, flops);
  cuda::set_probe_kernel_override("cuda_cores");
  emit(s, "ear_probe_cuda_cores", timer.time(ear, 2, std::max(reps / 4, 3)), bytes, flops);
  emit(s, "ear_plus_probe_cuda_cores", timer.time(plus, 2, std::max(reps / 4, 3)), bytes, flops);
  cuda::set_probe_kernel_override("");
}

void bench_shape(const BenchShape& s, int reps) {
  const Device dev = Device::cuda(0);
  cudaStream_t cs;
  SAPATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
  const Stream st{dev, cs, 0};
  const bench::EventTimer timer(cs);
  // Q, K and V are the video tokens alone: [B,H,S,D] with S = S_video, Cq and Ck clusters.
  const int64_t B = s.batch, H = s.heads, S = s.video_tokens(), D = s.head_dim, BH = B * H;
  const int64_t Cq = s.q_clusters, Ck = s.k_clusters;
  const double elem = static_cast<double>(B * H * S * D);
  auto tensor = [&](DType t, std::vector<int64_t> shape) { return Tensor(t, std::move(shape), dev); };
  // Q, K, V in the diffusers layout [B,S,H,D], seen as [B,H,S,D].
  Tensor q = tensor(DType::BF16, {B, S, H, D}), k = tensor(DType::BF16, {B, S, H, D}),
         v = tensor(DType::BF16, {B, S, H, D});
  fill_kernel<<<4096, 256, 0, cs>>>(q.data_as<__nv_bfloat16>(), S, H, D, 4 * Cq, 1);
  fill_kernel<<<4096, 256, 0, cs>>>(k.data_as<__nv_bfloat16>(), S, H, D, 4 * Ck, 2);
  fill_kernel<<<4096, 256, 0, cs>>>(v.data_as<__nv_bfloat16>(), S, H, D, 64, 3);
  SAPATTN_CUDA_CHECK(cudaGetLastError());
  const TensorView qv = TensorView::bshd(q.data(), DType::BF16, B, H, S, D, dev);
  const TensorView kv = TensorView::bshd(k.data(), DType::BF16, B, H, S, D, dev);
  const TensorView vv = TensorView::bshd(v.data(), DType::BF16, B, H, S, D, dev);
  Tensor qc = tensor(DType::F32, {B, H, Cq, D}), kc = tensor(DType::F32, {B, H, Ck, D});
  Tensor ql = tensor(DType::I32, {B, H, S}), kl = tensor(DType::I32, {B, H, S});
  Tensor qs = tensor(DType::I32, {B, H, Cq}), ks = tensor(DType::I32, {B, H, Ck});
  const int factor = Config{}.kmeans_sample_factor;
  const size_t ws_bytes =
      std::max({kmeans_workspace_bytes(BH, S, Cq, D, dev), kmeans_workspace_bytes(BH, S, Ck, D, dev),
                kmeans_seed_greedy_workspace_bytes(BH, S, Cq, factor, dev),
                kmeans_seed_greedy_workspace_bytes(BH, S, Ck, factor, dev),
                cluster_permutation_workspace_bytes(BH, S, static_cast<int>(Ck), dev),
                kmeans_assign_candidates_workspace_bytes(BH, S, Ck, kMaxCandidates, dev),
                kmeans_assign_candidates_workspace_bytes(BH, S, Cq, kMaxCandidates, dev)});
  const Buffer ws_buf = Buffer::allocate(ws_bytes, dev);
  const Workspace ws{ws_buf.data(), ws_buf.bytes()};
  const double point_bytes = elem * 2;  // one bf16 tensor
  auto lloyd_flops = [&](int iters) { return 2.0 * iters * static_cast<double>(BH * S) * (Cq + Ck) * D; };

  // ---- 50 iterations from the seeded sample (a branch's first sparse call) ----------------------
  auto init50 = [&] {
    kmeans_init(qv, qc.view(), 11, st, ws);
    kmeans(qv, qc.view(), ql.view(), qs.view(), 50, st, ws);
    kmeans_init(kv, kc.view(), 12, st, ws);
    kmeans(kv, kc.view(), kl.view(), ks.view(), 50, st, ws);
  };
  emit(s, "kmeans_init_50it_qk", timer.time(init50, 1, 3), 50 * 2 * point_bytes, lloyd_flops(50));

  // ---- The default first call (docs/design.md): greedy k-means++ on 2C sampled points, then 14 ---
  // The seeding's FLOPs: T candidates against M = min(S, 2C) points per step, C - 1 steps, 3 per element.
  auto seed_flops = [&](int64_t C) {
    return 3.0 * BH * kmeans_greedy_trials(C) * std::min<int64_t>(S, factor * C) * (C - 1) * D;
  };
  const int iters_init = Config{}.kmeans_iters_init;
  // Each seeding kernel in the same run (cuda::seed_kernel): the default (the cluster kernel with its
  // tensor-core screen on an H100), the cluster kernel without the screen, the block kernel.
  for (const char* kernel : {"", "unscreened", "block"}) {
    try {
      cuda::set_seed_kernel_override(kernel);
      cuda::seed_kernel(0, BH, std::min<int64_t>(S, factor * Ck), Ck, D, DType::BF16);
    } catch (const UnsupportedError&) {
      continue;  // no cluster kernel on this device
    }
    const std::string tag = kernel[0] == '\0' ? "" : std::string("_") + kernel;
    for (int side = 0; side < 2; ++side) {
      const TensorView& x = side == 0 ? qv : kv;
      Tensor& c = side == 0 ? qc : kc;
      const int64_t C = side == 0 ? Cq : Ck;
      const cuda::SeedKernel k = cuda::seed_kernel(0, BH, std::min<int64_t>(S, factor * C), C, D, DType::BF16);
      measurement(s, std::string("kmeans_seed_greedy_") + (side == 0 ? "q" : "k") + tag,
                  timer.time([&] { kmeans_seed_greedy(x, c.view(), 11 + side, factor, st, ws); }, 1, 3), point_bytes,
                  seed_flops(C))
          .str("kernel", k.cluster ? (k.screen ? "cluster" : "cluster_unscreened") : "block")
          .integer("ctas_per_head", k.ctas)
          .integer("smem", static_cast<int64_t>(k.smem))
          .print();
    }
  }
  cuda::set_seed_kernel_override("");
  auto first_call = [&] {
    kmeans_seed_greedy(qv, qc.view(), 11, factor, st, ws);
    kmeans(qv, qc.view(), ql.view(), qs.view(), iters_init, st, ws);
    kmeans_seed_greedy(kv, kc.view(), 12, factor, st, ws);
    kmeans(kv, kc.view(), kl.view(), ks.view(), iters_init, st, ws);
  };
  emit(s, "kmeans_gpp2_" + std::to_string(iters_init) + "it_qk", timer.time(first_call, 1, 3),
       iters_init * 2 * point_bytes, lloyd_flops(iters_init) + seed_flops(Cq) + seed_flops(Ck));

  // ---- 2 iterations warm-started (every later sparse call) ---------------------------------------
  auto step = [&] {
    kmeans(qv, qc.view(), ql.view(), qs.view(), 2, st, ws);
    kmeans(kv, kc.view(), kl.view(), ks.view(), 2, st, ws);
  };
  emit(s, "kmeans_2it_qk", timer.time(step, 3, reps), 2 * 2 * point_bytes, lloyd_flops(2));
  emit(s, "kmeans_2it_q", timer.time([&] { kmeans(qv, qc.view(), ql.view(), qs.view(), 2, st, ws); }, 3, reps),
       2 * point_bytes, 2.0 * 2 * BH * S * Cq * D);
  emit(s, "kmeans_2it_k", timer.time([&] { kmeans(kv, kc.view(), kl.view(), ks.view(), 2, st, ws); }, 3, reps),
       2 * point_bytes, 2.0 * 2 * BH * S * Ck * D);
  // The step and one assignment of each with each tensor-core assignment kernel (docs/cuda.md): the
  // mma.sync kernel and, on an sm_90 device, the wgmma kernel in its default configuration. The rows
  // above ran the default ("auto": the wgmma kernel where it runs).
  for (const char* kernel : {"mma", "wgmma"}) {
    cuda::set_assign_kernel(kernel);
    cuda::AssignKernel q_kernel, k_kernel;
    try {
      q_kernel = cuda::assign_kernel(0, Cq, D);
      k_kernel = cuda::assign_kernel(0, Ck, D);
    } catch (const UnsupportedError&) {
      continue;  // no wgmma kernel on this device
    }
    auto config = [](const cuda::AssignKernel& a) {
      return a.wgmma ? std::to_string(a.group_rows) + "x" + std::to_string(a.tile_n) : std::string("mma.sync");
    };
    const std::string tag = std::string("_") + kernel;
    measurement(s, "kmeans_2it_qk" + tag, timer.time(step, 3, reps), 2 * 2 * point_bytes, lloyd_flops(2))
        .str("q_config", config(q_kernel))
        .str("k_config", config(k_kernel))
        .print();
    measurement(s, "assign_q" + tag,
                timer.time([&] { cuda::kmeans_assign(qv, qc.view(), ql.view(), st, ws); }, 3, reps), point_bytes,
                2.0 * BH * S * Cq * D)
        .str("config", config(q_kernel))
        .print();
    measurement(s, "assign_k" + tag,
                timer.time([&] { cuda::kmeans_assign(kv, kc.view(), kl.view(), st, ws); }, 3, reps), point_bytes,
                2.0 * BH * S * Ck * D)
        .str("config", config(k_kernel))
        .print();
  }
  cuda::set_assign_kernel("auto");

  // The parts of one iteration, and how many rows the exact re-ranking touched.
  Buffer counter = Buffer::allocate(sizeof(unsigned long long), dev);
  for (int side = 0; side < 2; ++side) {
    const TensorView& x = side == 0 ? qv : kv;
    Tensor& c = side == 0 ? qc : kc;
    Tensor& l = side == 0 ? ql : kl;
    Tensor& sz = side == 0 ? qs : ks;
    const int64_t C = side == 0 ? Cq : Ck;
    const char* tag = side == 0 ? "q" : "k";
    SAPATTN_CUDA_CHECK(cudaMemsetAsync(counter.data(), 0, sizeof(unsigned long long), cs));
    cuda::kmeans_assign(x, c.view(), l.view(), st, ws, {static_cast<unsigned long long*>(counter.data())});
    unsigned long long refined = 0;
    SAPATTN_CUDA_CHECK(cudaMemcpyAsync(&refined, counter.data(), sizeof(refined), cudaMemcpyDeviceToHost, cs));
    SAPATTN_CUDA_CHECK(cudaStreamSynchronize(cs));
    measurement(s, std::string("assign_") + tag,
                timer.time([&] { cuda::kmeans_assign(x, c.view(), l.view(), st, ws); }, 3, reps), point_bytes,
                2.0 * BH * S * C * D)
        .fixed("refined_share", static_cast<double>(refined) / (BH * S), 5)
        .print();
    cuda::set_assign_kernel("mma");  // the mma.sync kernel's other variant, for the record
    cuda::set_assign_columns_per_pass(8);
    emit(s, std::string("assign_8cols_") + tag,
         timer.time([&] { cuda::kmeans_assign(x, c.view(), l.view(), st, ws); }, 3, reps), point_bytes,
         2.0 * BH * S * C * D);
    cuda::set_assign_columns_per_pass(16);
    cuda::set_assign_kernel("auto");
    emit(s, std::string("update_") + tag,
         timer.time([&] { cuda::kmeans_update(x, l.view(), c.view(), sz.view(), true, st, ws); }, 3, reps), point_bytes,
         0);
  }

  // ---- Candidate assignment (docs/cuda.md, "Candidate assignment"): one assignment of each tensor
  // against m candidates from the labels above, and a warm step of 2 iterations whose second
  // assignment takes candidates (the first has no labels of the step's own).
  for (const int m : {32, kMaxCandidates}) {
    for (int side = 0; side < 2; ++side) {
      const TensorView& x = side == 0 ? qv : kv;
      Tensor& c = side == 0 ? qc : kc;
      Tensor& l = side == 0 ? ql : kl;
      emit(s, std::string("assign_candidates") + std::to_string(m) + "_" + (side == 0 ? "q" : "k"),
           timer.time([&] { kmeans_assign_candidates(x, c.view(), l.view(), l.view(), m, st, ws); }, 3, reps),
           point_bytes, 2.0 * BH * S * m * D);
    }
  }
  auto candidate_step = [&] {
    for (int side = 0; side < 2; ++side) {
      const TensorView& x = side == 0 ? qv : kv;
      Tensor& c = side == 0 ? qc : kc;
      Tensor& l = side == 0 ? ql : kl;
      Tensor& sz = side == 0 ? qs : ks;
      kmeans(x, c.view(), l.view(), sz.view(), 1, st, ws);
      kmeans_assign_candidates(x, c.view(), l.view(), l.view(), 32, st, ws);
      kmeans_update(x, l.view(), c.view(), sz.view(), st, ws);
    }
  };
  emit(s, "kmeans_2it_candidates32_qk", timer.time(candidate_step, 3, reps), 2 * 2 * point_bytes,
       2.0 * static_cast<double>(BH * S) * (Cq + Ck + 2 * 32) * D);

  // ---- order_clusters on the key clusters (svg2's first sparse call of a layer) --------------------
  // On copies of the key centroids, sizes and labels (the op works in place; ordering clusters that
  // are already in chain order takes as many steps of the same work). Each chain kernel in the same
  // run: the default (the matrix kernels at C <= 2048: their workspace holds 4 C^2 bytes of keys per
  // head), the cluster kernel, the same with CTAs of at most 256 threads, the block kernel.
  {
    Tensor oc = tensor(DType::F32, {B, H, Ck, D}), os = tensor(DType::I32, {B, H, Ck}),
           ol = tensor(DType::I32, {B, H, S});
    SAPATTN_CUDA_CHECK(cudaMemcpyAsync(oc.data(), kc.data(), kc.bytes(), cudaMemcpyDeviceToDevice, cs));
    SAPATTN_CUDA_CHECK(cudaMemcpyAsync(os.data(), ks.data(), ks.bytes(), cudaMemcpyDeviceToDevice, cs));
    SAPATTN_CUDA_CHECK(cudaMemcpyAsync(ol.data(), kl.data(), kl.bytes(), cudaMemcpyDeviceToDevice, cs));
    for (const char* kernel : {"", "cluster", "cluster:256", "block"}) {
      cuda::set_order_chain_override(kernel);
      const cuda::OrderChainKernel k = cuda::order_chain_kernel(0, Ck, D);
      const size_t order_bytes = order_clusters_workspace_bytes(BH, Ck, D, dev);
      const Buffer order_buf = Buffer::allocate(order_bytes, dev);
      const Workspace order_ws{order_buf.data(), order_bytes};
      const std::string name = kernel[0] == '\0' ? "order_clusters_k" : std::string("order_clusters_k_") + kernel;
      // The matrix kernels also write every key and read one row of them per step.
      const double key_bytes = k.matrix ? 4.0 * Ck * Ck * 2 : 0.0;
      measurement(s, name, timer.time([&] { order_clusters(oc.view(), os.view(), ol.view(), st, order_ws); }, 2, reps),
                  static_cast<double>(BH) * (Ck * D * 4 * 3 + Ck * 4 * 3 + S * 4 * 2 + key_bytes),
                  0)  // latency-bound (C dependent steps): no rate floor applies
          .str("kernel", k.name())
          .integer("ctas_per_head", k.ctas)
          .integer("threads", k.threads)
          .print();
    }
    cuda::set_order_chain_override("");
  }

  // ---- selection -----------------------------------------------------------------------------
  Tensor mask = tensor(DType::U8, {B, H, Cq, Ck});
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  emit(s, "select_blocks",
       timer.time(
           [&] {
             select_blocks(qc.view(), kc.view(), ks.view(), scale, 0.9f, static_cast<int>(Ck / 10), mask.view(), st);
           },
           5, reps * 2),
       static_cast<double>(BH) * ((Cq + Ck) * D * 4 + Ck * 4 + Cq * Ck), 2.0 * BH * Cq * Ck * D);
  {  // the density this selection gives (for the record)
    std::vector<uint8_t> m(static_cast<size_t>(BH * Cq * Ck));
    SAPATTN_CUDA_CHECK(cudaMemcpy(m.data(), mask.data(), m.size(), cudaMemcpyDeviceToHost));
    size_t kept = 0;
    for (uint8_t x : m) kept += x;
    JsonLine()
        .str("shape", s.name)
        .str("op", "kept_cluster_share")
        .fixed("value", static_cast<double>(kept) / static_cast<double>(m.size()), 4)
        .print();
    // The peer in the same run: the kernel that repeats the CPU's arithmetic (bit-identical masks),
    // and how many mask bytes the default threshold kernel sets otherwise.
    Tensor exact_mask = tensor(DType::U8, {B, H, Cq, Ck});
    cuda::set_select_kernel_override("exact");
    emit(s, "select_blocks_exact",
         timer.time(
             [&] {
               select_blocks(qc.view(), kc.view(), ks.view(), scale, 0.9f, static_cast<int>(Ck / 10), exact_mask.view(),
                             st);
             },
             5, reps * 2),
         static_cast<double>(BH) * ((Cq + Ck) * D * 4 + Ck * 4 + Cq * Ck), 2.0 * BH * Cq * Ck * D);
    cuda::set_select_kernel_override("");
    std::vector<uint8_t> e(m.size());
    SAPATTN_CUDA_CHECK(cudaMemcpy(e.data(), exact_mask.data(), e.size(), cudaMemcpyDeviceToHost));
    size_t differ = 0;
    for (size_t i = 0; i < m.size(); ++i) differ += m[i] != e[i];
    JsonLine()
        .str("shape", s.name)
        .str("op", "select_blocks_bytes_unlike_exact")
        .integer("value", static_cast<int64_t>(differ))
        .print();
  }

  bench_compensation(s, reps, st, timer, qv, ql, kc, ks);
  bench_probe(s, reps, st, timer, kv, vv, qc, kc, kl, qs, ks);

  // ---- round_query_clusters on this clustering and selection -------------------------------------
  // The op rewrites the labels, so every run starts from a copy of the k-means labels (a 4-byte-per-
  // token device copy, timed with it). The line also says how much it moved and what it saved. Twice:
  // the default path (tensor cores for bf16 points), then the exact one (set_round_kernel_override).
  auto bench_round = [&](const char* op) {
    const RoundQueryOptions ro;
    const size_t round_bytes = round_query_clusters_workspace_bytes(BH, S, Cq, Ck, ro, dev);
    const Buffer round_buf = Buffer::allocate(round_bytes, dev);
    const Workspace round_ws{round_buf.data(), round_bytes};
    Tensor rl = tensor(DType::I32, {B, H, S}), rs = tensor(DType::I32, {B, H, Cq});
    auto rounding = [&] {
      SAPATTN_CUDA_CHECK(cudaMemcpyAsync(rl.data(), ql.data(), ql.bytes(), cudaMemcpyDeviceToDevice, cs));
      round_query_clusters(qv, qc.view(), kc.view(), ks.view(), mask.view(), scale, ro, rl.view(), rs.view(), st,
                           round_ws);
    };
    const Timing t = timer.time(rounding, 2, reps);
    std::vector<int32_t> before(static_cast<size_t>(BH * S)), after(before.size()), sizes(static_cast<size_t>(BH * Cq));
    SAPATTN_CUDA_CHECK(cudaMemcpy(before.data(), ql.data(), ql.bytes(), cudaMemcpyDeviceToHost));
    SAPATTN_CUDA_CHECK(cudaMemcpy(after.data(), rl.data(), rl.bytes(), cudaMemcpyDeviceToHost));
    SAPATTN_CUDA_CHECK(cudaMemcpy(sizes.data(), rs.data(), rs.bytes(), cudaMemcpyDeviceToHost));
    std::vector<int64_t> old_sizes(static_cast<size_t>(BH * Cq), 0);
    int64_t moved = 0, pad_before = 0, pad_after = 0;
    for (int64_t i = 0; i < BH * S; ++i) {
      moved += before[i] != after[i];
      ++old_sizes[(i / S) * Cq + before[i]];
    }
    for (int64_t a = 0; a < BH * Cq; ++a) {
      pad_before += (old_sizes[a] + 63) / 64 * 64 - old_sizes[a];
      pad_after += (sizes[a] + 63) / 64 * 64 - sizes[a];
    }
    measurement(s, op, t, static_cast<double>(BH) * (S * 4 * 3 + S * D * 2), 0)
        .integer("workspace_bytes", static_cast<int64_t>(round_bytes))
        .fixed("moved_share", static_cast<double>(moved) / static_cast<double>(BH * S), 5)
        .fixed("q_pad_rows_share_before", static_cast<double>(pad_before) / static_cast<double>(BH * S), 5)
        .fixed("q_pad_rows_share_after", static_cast<double>(pad_after) / static_cast<double>(BH * S), 5)
        .print();
  };
  bench_round("round_query_clusters");
  cuda::set_round_kernel_override("exact");
  bench_round("round_query_clusters_exact");
  cuda::set_round_kernel_override("");

  // ---- permutation of Q, K, V and its inverse ------------------------------------------------
  Tensor qp = tensor(DType::I32, {B, H, S}), kp = tensor(DType::I32, {B, H, S});
  Tensor qo = tensor(DType::I32, {B, H, Cq + 1}), ko = tensor(DType::I32, {B, H, Ck + 1});
  Tensor qr = tensor(DType::BF16, {B, H, S, D}), kr = tensor(DType::BF16, {B, H, S, D}),
         vr = tensor(DType::BF16, {B, H, S, D});
  auto perms = [&] {
    cluster_permutation(ql.view(), static_cast<int>(Cq), qp.view(), qo.view(), st, ws);
    cluster_permutation(kl.view(), static_cast<int>(Ck), kp.view(), ko.view(), st, ws);
  };
  auto gathers = [&] {
    gather_rows(qv, qp.view(), qr.view(), st);
    gather_rows(kv, kp.view(), kr.view(), st);
    gather_rows(vv, kp.view(), vr.view(), st);
  };
  emit(s, "cluster_permutation_qk", timer.time(perms, 3, reps), 2.0 * BH * S * 4 * 2, 0);
  emit(s, "gather_qkv", timer.time(gathers, 3, reps), 6 * point_bytes, 0);
  emit(s, "permute_qkv",
       timer.time(
           [&] {
             perms();
             gathers();
           },
           3, reps),
       6 * point_bytes, 0);
  // The layout of the random side: Q gathered from [B,S,H,D] memory vs from [B,H,S,D] memory.
  emit(s, "gather_q_from_bshd", timer.time([&] { gather_rows(qv, qp.view(), qr.view(), st); }, 3, reps),
       2 * point_bytes, 0);
  emit(s, "gather_q_from_bhsd", timer.time([&] { gather_rows(kr.view(), qp.view(), qr.view(), st); }, 3, reps),
       2 * point_bytes, 0);
  Tensor out = tensor(DType::BF16, {B, S, H, D});
  const TensorView outv = TensorView::bshd(out.data(), DType::BF16, B, H, S, D, dev);
  emit(s, "inverse_o_bf16", timer.time([&] { scatter_rows(qr.view(), qp.view(), outv, st); }, 3, reps), 2 * point_bytes,
       0);
  {
    Tensor of32 = tensor(DType::F32, {B, H, S, D});
    fill_f32_kernel<<<4096, 256, 0, cs>>>(of32.data_as<float>(), of32.numel(), 5);
    emit(s, "inverse_o_f32_to_bf16", timer.time([&] { scatter_rows(of32.view(), qp.view(), outv, st); }, 3, reps),
         3 * point_bytes, 0);
  }
  // ---- the attention planner -----------------------------------------------------------------
  // What every CUDA block_sparse_attention call runs before its kernel, on the layout of this
  // selection and permutation (it read the mask and the offsets: the bytes). It was timed inside the
  // planner's GPU test before; tests check, benchmarks time.
  {
    const BlockLayout layout{qo.view(), ko.view(), mask.view()};
    const size_t plan_bytes = cuda::attn::plan_workspace_bytes(BH, Cq, Ck, S);
    const Buffer plan_buf = Buffer::allocate(plan_bytes, dev);
    const Workspace plan_ws{plan_buf.data(), plan_bytes};
    measurement(s, "build_plan", timer.time([&] { cuda::attn::build_plan(layout, S, S, plan_ws, cs); }, 3, reps),
                static_cast<double>(BH) * static_cast<double>(Cq * Ck + (Cq + 1 + Ck + 1) * 4), 0)
        .integer("workspace_bytes", static_cast<int64_t>(plan_bytes))
        .print();
  }
  // The device's copy rate in this process (the torch measurement is the reference floor).
  {
    Tensor a = tensor(DType::BF16, {B, H, S, D});
    emit(s, "memcpy_d2d_point_tensor",
         timer.time(
             [&] { SAPATTN_CUDA_CHECK(cudaMemcpyAsync(a.data(), q.data(), q.bytes(), cudaMemcpyDeviceToDevice, cs)); },
             3, reps),
         2 * point_bytes, 0);
  }
  SAPATTN_CUDA_CHECK(cudaStreamSynchronize(cs));
  SAPATTN_CUDA_CHECK(cudaStreamDestroy(cs));
}

constexpr const char* kUsage =
    "usage: sapattn_bench_ops [--shape wan14b|wan13b|hunyuan|all] [--reps N]\n"
    "\n"
    "Times the CUDA k-means, order_clusters, selection, EAR compensation and permutation ops and the\n"
    "attention planner\n"
    "at the official SVG2 shapes (bench/shapes.json) on GPU 0 and prints one JSON object per measurement\n"
    "(bench/report.py makes the table of docs/cuda.md).\n"
    "  --shape S   the shapes whose name starts with S (wan14b_720p, wan13b_480p, hunyuan_720p) or all\n"
    "              (default: all)\n"
    "  --reps N    timed runs per op, after the warm-up; the median is reported (default: 20)\n";

// The options, read before anything touches the GPU, so that --help and a usage error need no
// driver. Returns the exit code to leave with, or -1 to go on.
int parse_options(int argc, char** argv, std::string& which, int& reps) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if ((a == "--shape" || a == "--reps") && i + 1 < argc) {
      const std::string value = argv[++i];
      if (a == "--shape") {
        which = value;
      } else {
        char* end = nullptr;
        const long n = std::strtol(value.c_str(), &end, 10);
        if (end == value.c_str() || *end != '\0' || n < 1 || n > 100000) {
          std::fprintf(stderr, "sapattn_bench_ops: --reps needs a count in [1, 100000], got '%s'\n", value.c_str());
          return 2;
        }
        reps = static_cast<int>(n);
      }
      continue;
    }
    std::fprintf(stderr, "sapattn_bench_ops: unexpected argument '%s'\n%s", a.c_str(), kUsage);
    return 2;
  }
  const std::vector<BenchShape>& shapes = bench::bench_shapes();
  const bool known = std::any_of(shapes.begin(), shapes.end(),
                                 [&](const BenchShape& s) { return s.in_all && bench::shape_selected(s, which); });
  if (!known) {
    std::fprintf(stderr, "sapattn_bench_ops: no shape starts with '%s'\n%s", which.c_str(), kUsage);
    return 2;
  }
  return -1;
}

}  // namespace

int main(int argc, char** argv) {
  std::string which = "all";
  int reps = 20;
  if (const int rc = parse_options(argc, argv, which, reps); rc >= 0) return rc;
  try {
    bench::device_line().print();
    return bench::run_shapes([&](const BenchShape& s) { return s.in_all && bench::shape_selected(s, which); },
                             [&](const BenchShape& s) { bench_shape(s, reps); });
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench failed: %s\n", e.what());
    return 1;
  }
}
