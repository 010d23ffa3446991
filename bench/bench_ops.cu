// Times the CUDA semantic-aware permutation ops at the official SVG2 shapes (CUTLASS's method:
// warm-up apart from timing, CUDA events, the median of many runs, random structured inputs that
// are far larger than the L2 for every memory-bound op). Prints one JSON object per measurement;
// bench/report.py puts them next to the floors and the peers measured in the same run.
//
//   sapattn_bench_ops [--shape wan14b|wan13b|hunyuan|all] [--reps N]   (--help needs no GPU)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "core/cuda_check.hpp"
#include "cuda/backend.hpp"
#include "sapattn/ops.hpp"

namespace {

using namespace sapattn;

struct Shape {
  const char* name;
  int64_t B, H, S, D, Cq, Ck;
};

constexpr Shape kShapes[] = {
    {"wan14b_720p", 1, 40, 75600, 128, 300, 1000},
    {"wan13b_480p", 1, 12, 32760, 128, 200, 1000},
    {"hunyuan_720p", 1, 24, 118800, 128, 400, 1000},
};

__device__ uint64_t mix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

__device__ float gauss(uint64_t key) {
  const uint64_t r = mix(key);
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
    const int64_t mode = static_cast<int64_t>(mix(seed ^ (s * 1315423911ull + h)) % static_cast<uint64_t>(modes));
    const float centre = gauss(seed * 31 + ((h * modes + mode) * D + d) * 2 + 1);
    x[t] = __float2bfloat16_rn(1.5f * centre + gauss(seed * 17 + t * 2));
  }
}

__global__ void fill_f32_kernel(float* x, int64_t n, uint64_t seed) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < n;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[t] = gauss(seed + t);
}

struct Timer {
  cudaStream_t stream;
  // Median (and min) over `reps` timed runs after `warmup` untimed ones; each run between events.
  std::pair<double, double> run(const std::function<void()>& f, int warmup, int reps) {
    for (int i = 0; i < warmup; ++i) f();
    SAPATTN_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<double> ms;
    cudaEvent_t a, b;
    SAPATTN_CUDA_CHECK(cudaEventCreate(&a));
    SAPATTN_CUDA_CHECK(cudaEventCreate(&b));
    for (int i = 0; i < reps; ++i) {
      SAPATTN_CUDA_CHECK(cudaEventRecord(a, stream));
      f();
      SAPATTN_CUDA_CHECK(cudaEventRecord(b, stream));
      SAPATTN_CUDA_CHECK(cudaEventSynchronize(b));
      float t = 0;
      SAPATTN_CUDA_CHECK(cudaEventElapsedTime(&t, a, b));
      ms.push_back(t);
    }
    SAPATTN_CUDA_CHECK(cudaEventDestroy(a));
    SAPATTN_CUDA_CHECK(cudaEventDestroy(b));
    std::sort(ms.begin(), ms.end());
    return {ms[ms.size() / 2], ms.front()};
  }
};

void emit(const Shape& s, const char* what, std::pair<double, double> t, int reps, double bytes, double flops,
          const char* extra = "") {
  std::printf(
      "{\"shape\": \"%s\", \"op\": \"%s\", \"median_ms\": %.4f, \"min_ms\": %.4f, \"reps\": %d, \"bytes\": %.6g, "
      "\"flops\": %.6g%s}\n",
      s.name, what, t.first, t.second, reps, bytes, flops, extra);
  std::fflush(stdout);
}

void bench(const Shape& s, int reps) {
  const Device dev = Device::cuda(0);
  cudaStream_t cs;
  SAPATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
  const Stream st{dev, cs, 0};
  Timer timer{cs};
  const int64_t B = s.B, H = s.H, S = s.S, D = s.D, BH = B * H;
  const double elem = static_cast<double>(B * H * S * D);
  auto tensor = [&](DType t, std::vector<int64_t> shape) { return Tensor(t, std::move(shape), dev); };
  // Q, K, V in the diffusers layout [B,S,H,D], seen as [B,H,S,D].
  Tensor q = tensor(DType::BF16, {B, S, H, D}), k = tensor(DType::BF16, {B, S, H, D}),
         v = tensor(DType::BF16, {B, S, H, D});
  fill_kernel<<<4096, 256, 0, cs>>>(q.data_as<__nv_bfloat16>(), S, H, D, 4 * s.Cq, 1);
  fill_kernel<<<4096, 256, 0, cs>>>(k.data_as<__nv_bfloat16>(), S, H, D, 4 * s.Ck, 2);
  fill_kernel<<<4096, 256, 0, cs>>>(v.data_as<__nv_bfloat16>(), S, H, D, 64, 3);
  SAPATTN_CUDA_CHECK(cudaGetLastError());
  const TensorView qv = TensorView::bshd(q.data(), DType::BF16, B, H, S, D, dev);
  const TensorView kv = TensorView::bshd(k.data(), DType::BF16, B, H, S, D, dev);
  const TensorView vv = TensorView::bshd(v.data(), DType::BF16, B, H, S, D, dev);
  Tensor qc = tensor(DType::F32, {B, H, s.Cq, D}), kc = tensor(DType::F32, {B, H, s.Ck, D});
  Tensor ql = tensor(DType::I32, {B, H, S}), kl = tensor(DType::I32, {B, H, S});
  Tensor qs = tensor(DType::I32, {B, H, s.Cq}), ks = tensor(DType::I32, {B, H, s.Ck});
  const size_t ws_bytes =
      std::max({kmeans_workspace_bytes(BH, S, s.Cq, D, dev), kmeans_workspace_bytes(BH, S, s.Ck, D, dev),
                cluster_permutation_workspace_bytes(BH, S, static_cast<int>(s.Ck), dev)});
  const Buffer ws_buf = Buffer::allocate(ws_bytes, dev);
  const Workspace ws{ws_buf.data(), ws_buf.bytes()};
  const double point_bytes = elem * 2;  // one bf16 tensor
  auto lloyd_flops = [&](int iters) { return 2.0 * iters * static_cast<double>(BH * S) * (s.Cq + s.Ck) * D; };

  // ---- 50 iterations from the seeded sample (a branch's first sparse call) ----------------------
  auto init50 = [&] {
    kmeans_init(qv, qc.view(), 11, st, ws);
    kmeans(qv, qc.view(), ql.view(), qs.view(), 50, st, ws);
    kmeans_init(kv, kc.view(), 12, st, ws);
    kmeans(kv, kc.view(), kl.view(), ks.view(), 50, st, ws);
  };
  emit(s, "kmeans_init_50it_qk", timer.run(init50, 1, 3), 3, 50 * 2 * point_bytes, lloyd_flops(50));

  // ---- 2 iterations warm-started (every later sparse call) ---------------------------------------
  auto step = [&] {
    kmeans(qv, qc.view(), ql.view(), qs.view(), 2, st, ws);
    kmeans(kv, kc.view(), kl.view(), ks.view(), 2, st, ws);
  };
  emit(s, "kmeans_2it_qk", timer.run(step, 3, reps), reps, 2 * 2 * point_bytes, lloyd_flops(2));
  emit(s, "kmeans_2it_q", timer.run([&] { kmeans(qv, qc.view(), ql.view(), qs.view(), 2, st, ws); }, 3, reps), reps,
       2 * point_bytes, 2.0 * 2 * BH * S * s.Cq * D);
  emit(s, "kmeans_2it_k", timer.run([&] { kmeans(kv, kc.view(), kl.view(), ks.view(), 2, st, ws); }, 3, reps), reps,
       2 * point_bytes, 2.0 * 2 * BH * S * s.Ck * D);
  // The parts of one iteration, and how many rows the exact re-ranking touched.
  Buffer counter = Buffer::allocate(sizeof(unsigned long long), dev);
  for (int side = 0; side < 2; ++side) {
    const TensorView& x = side == 0 ? qv : kv;
    Tensor& c = side == 0 ? qc : kc;
    Tensor& l = side == 0 ? ql : kl;
    Tensor& sz = side == 0 ? qs : ks;
    const int64_t C = side == 0 ? s.Cq : s.Ck;
    const char* tag = side == 0 ? "q" : "k";
    SAPATTN_CUDA_CHECK(cudaMemsetAsync(counter.data(), 0, sizeof(unsigned long long), cs));
    cuda::kmeans_assign(x, c.view(), l.view(), st, ws, {static_cast<unsigned long long*>(counter.data())});
    unsigned long long refined = 0;
    SAPATTN_CUDA_CHECK(cudaMemcpyAsync(&refined, counter.data(), sizeof(refined), cudaMemcpyDeviceToHost, cs));
    SAPATTN_CUDA_CHECK(cudaStreamSynchronize(cs));
    char extra[96];
    std::snprintf(extra, sizeof(extra), ", \"refined_share\": %.5f", static_cast<double>(refined) / (BH * S));
    emit(s, (std::string("assign_") + tag).c_str(),
         timer.run([&] { cuda::kmeans_assign(x, c.view(), l.view(), st, ws); }, 3, reps), reps, point_bytes,
         2.0 * BH * S * C * D, extra);
    cuda::set_assign_columns_per_pass(8);  // the other variant, for the record
    emit(s, (std::string("assign_8cols_") + tag).c_str(),
         timer.run([&] { cuda::kmeans_assign(x, c.view(), l.view(), st, ws); }, 3, reps), reps, point_bytes,
         2.0 * BH * S * C * D);
    cuda::set_assign_columns_per_pass(16);
    emit(s, (std::string("update_") + tag).c_str(),
         timer.run([&] { cuda::kmeans_update(x, l.view(), c.view(), sz.view(), true, st, ws); }, 3, reps), reps,
         point_bytes, 0);
  }

  // ---- selection -----------------------------------------------------------------------------
  Tensor mask = tensor(DType::U8, {B, H, s.Cq, s.Ck});
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  emit(s, "select_blocks",
       timer.run(
           [&] {
             select_blocks(qc.view(), kc.view(), ks.view(), scale, 0.9f, static_cast<int>(s.Ck / 10), mask.view(), st);
           },
           5, reps * 2),
       reps * 2, static_cast<double>(BH) * ((s.Cq + s.Ck) * D * 4 + s.Ck * 4 + s.Cq * s.Ck),
       2.0 * BH * s.Cq * s.Ck * D);
  {  // the density this selection gives (for the record)
    std::vector<uint8_t> m(static_cast<size_t>(BH * s.Cq * s.Ck));
    SAPATTN_CUDA_CHECK(cudaMemcpy(m.data(), mask.data(), m.size(), cudaMemcpyDeviceToHost));
    size_t kept = 0;
    for (uint8_t x : m) kept += x;
    std::printf("{\"shape\": \"%s\", \"op\": \"kept_cluster_share\", \"value\": %.4f}\n", s.name,
                static_cast<double>(kept) / static_cast<double>(m.size()));
  }

  // ---- permutation of Q, K, V and its inverse ------------------------------------------------
  Tensor qp = tensor(DType::I32, {B, H, S}), kp = tensor(DType::I32, {B, H, S});
  Tensor qo = tensor(DType::I32, {B, H, s.Cq + 1}), ko = tensor(DType::I32, {B, H, s.Ck + 1});
  Tensor qr = tensor(DType::BF16, {B, H, S, D}), kr = tensor(DType::BF16, {B, H, S, D}),
         vr = tensor(DType::BF16, {B, H, S, D});
  auto perms = [&] {
    cluster_permutation(ql.view(), static_cast<int>(s.Cq), qp.view(), qo.view(), st, ws);
    cluster_permutation(kl.view(), static_cast<int>(s.Ck), kp.view(), ko.view(), st, ws);
  };
  auto gathers = [&] {
    gather_rows(qv, qp.view(), qr.view(), st);
    gather_rows(kv, kp.view(), kr.view(), st);
    gather_rows(vv, kp.view(), vr.view(), st);
  };
  emit(s, "cluster_permutation_qk", timer.run(perms, 3, reps), reps, 2.0 * BH * S * 4 * 2, 0);
  emit(s, "gather_qkv", timer.run(gathers, 3, reps), reps, 6 * point_bytes, 0);
  emit(s, "permute_qkv",
       timer.run(
           [&] {
             perms();
             gathers();
           },
           3, reps),
       reps, 6 * point_bytes, 0);
  // The layout of the random side: Q gathered from [B,S,H,D] memory vs from [B,H,S,D] memory.
  emit(s, "gather_q_from_bshd", timer.run([&] { gather_rows(qv, qp.view(), qr.view(), st); }, 3, reps), reps,
       2 * point_bytes, 0);
  emit(s, "gather_q_from_bhsd", timer.run([&] { gather_rows(kr.view(), qp.view(), qr.view(), st); }, 3, reps), reps,
       2 * point_bytes, 0);
  Tensor out = tensor(DType::BF16, {B, S, H, D});
  const TensorView outv = TensorView::bshd(out.data(), DType::BF16, B, H, S, D, dev);
  emit(s, "inverse_o_bf16", timer.run([&] { scatter_rows(qr.view(), qp.view(), outv, st); }, 3, reps), reps,
       2 * point_bytes, 0);
  {
    Tensor of32 = tensor(DType::F32, {B, H, S, D});
    fill_f32_kernel<<<4096, 256, 0, cs>>>(of32.data_as<float>(), of32.numel(), 5);
    emit(s, "inverse_o_f32_to_bf16", timer.run([&] { scatter_rows(of32.view(), qp.view(), outv, st); }, 3, reps), reps,
         3 * point_bytes, 0);
  }
  // The device's copy rate in this process (the torch measurement is the reference floor).
  {
    Tensor a = tensor(DType::BF16, {B, H, S, D});
    emit(s, "memcpy_d2d_point_tensor",
         timer.run(
             [&] { SAPATTN_CUDA_CHECK(cudaMemcpyAsync(a.data(), q.data(), q.bytes(), cudaMemcpyDeviceToDevice, cs)); },
             3, reps),
         reps, 2 * point_bytes, 0);
  }
  SAPATTN_CUDA_CHECK(cudaStreamSynchronize(cs));
  SAPATTN_CUDA_CHECK(cudaStreamDestroy(cs));
}

constexpr const char* kUsage =
    "usage: sapattn_bench_ops [--shape wan14b|wan13b|hunyuan|all] [--reps N]\n"
    "\n"
    "Times the CUDA k-means, selection and permutation ops at the official SVG2 shapes on GPU 0 and\n"
    "prints one JSON object per measurement (bench/report.py makes the table of docs/cuda.md).\n"
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
  const bool known = which == "all" || std::any_of(std::begin(kShapes), std::end(kShapes), [&](const Shape& s) {
                       return std::string(s.name).rfind(which, 0) == 0;
                     });
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
    cudaDeviceProp prop{};
    SAPATTN_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("{\"device\": \"%s\", \"sms\": %d, \"l2_bytes\": %d}\n", prop.name, prop.multiProcessorCount,
                prop.l2CacheSize);
    int failed = 0;
    for (const Shape& s : kShapes) {
      if (which != "all" && std::string(s.name).rfind(which, 0) != 0) continue;
      try {
        bench(s, reps);
      } catch (const std::exception& e) {  // report, and go on with the next shape
        std::printf("{\"shape\": \"%s\", \"op\": \"failed\", \"error\": \"%s\"}\n", s.name, e.what());
        ++failed;
      }
    }
    return failed == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench failed: %s\n", e.what());
    return 1;
  }
  return 0;
}
