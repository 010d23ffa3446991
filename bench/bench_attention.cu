// The attention benchmark: SVG2's block-sparse attention at the official shapes, on the
// layouts SVG2 itself would build. Per shape it generates the full-size synthetic workload
// (include/sapattn/workload.hpp), clusters Q and K with 50 Lloyd iterations from the seeded sample
// (the official Cq/Ck), permutes, and for each target density finds the top-p that reaches it
// (bisection on the host, reading block_density back; min_kept = floor(0.1 * Ck) as the official
// scripts, lowered to 0 only when a target lies below what that floor allows). On each layout it
// times the planner alone and block_sparse_attention four ways (on permuted tensors; the same with
// the gathers of Q, K, V and the scatter of O around it; fused through both permutations on
// token-order tensors; fused through the query permutation only), and dense_attention once per
// shape, each with the kernel picked by architecture and with the sm80 kernel forced. Effective
// TFLOP/s counts the computed pairs only: 4 * pairs * D / time. Q, K, V are [B,H,S,D] bf16.
//
// Each layout is saved under --out (q_offsets.npy, k_offsets.npy as f32, mask_d<target>.npy as f16,
// manifest.jsonl) so that bench/attention_peers.py times the peers on exactly the same clusters
// and masks. Prints one JSON object per line on stdout; progress goes to stderr. The shapes, the
// timer and the JSON lines are the harness's (bench/harness.hpp, bench/shapes.json).
//
//   sapattn_bench_attention [--shape wan13b|wan14b|hunyuan|all[,...]] [--densities 0.05,0.1,...]
//                           [--out DIR] [--iters N] [--warmup N] [--kernels auto,cpasync,tma,sm80] [--seed N]
//                           [--cq N] [--ck N] [--threads N] [--order chain|none] [--cpu]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "core/cuda_check.hpp"
#include "cuda/attention/attention.hpp"
#include "cuda/backend.hpp"
#include "cuda/fp8/fp8.hpp"
#include "harness.hpp"
#include "sapattn/io.hpp"
#include "sapattn/ops.hpp"
#include "sapattn/workload.hpp"

namespace {

using namespace sapattn;

using bench::BenchShape;
using bench::JsonLine;
using bench::Timing;

struct Options {
  std::vector<std::string> shapes{"all"};
  std::vector<double> densities{0.05, 0.10, 0.15, 0.20, 0.30, 0.40};
  std::string out = "attention-layouts";
  int iters = 10;
  int warmup = 2;
  std::vector<std::string> kernels{"auto", "sm80"};
  uint64_t seed = 2026;
  int cq = 0, ck = 0;  // 0: the shape's official counts
  int threads = 0;     // generator threads, 0 = all
  bool cpu = false;    // run on the CPU backend (harness smoke test)
  bool order =
      true;  // order_clusters on the query and key clusters after k-means ("--order chain"; "none": k-means numbering)
  // --variants; fp8: the e4m3 kernel (plan + kernel) on operands quantised once per layout (fp8_sumf:
  // with the fp32 sum of P, fp8_khead: with one K scale per head, fp8_khead_sumf: both), fp8_e2e:
  // the whole block_sparse_attention_e4m3 from token order (quantisation passes included; fp8_khead_e2e:
  // with one K scale per head and the fp32 sum, the fused head-scale passes)
  std::vector<std::string> variants{"unfused",  "fused_qk",  "fused_q",        "sorted_kv", "unfused_e2e",  "fp8",
                                    "fp8_sumf", "fp8_khead", "fp8_khead_sumf", "fp8_e2e",   "fp8_khead_e2e"};
  // --fp8-builds TILE:EXPS[:mma],...: fp8_khead_sumf again under each measured build of the e4m3
  // kernel (SAPATTN_FP8_KEY_TILE=TILE SAPATTN_FP8_FMA_EXPS=EXPS; with ":mma" SAPATTN_FP8_ROW_SUM=mma
  // and the sum of the quantised P instead of the fp32 sum), reported as "fp8_khead_sumf@" and the
  // build.
  std::vector<std::string> fp8_builds;
};

// Where the benchmark runs: the GPU (one non-blocking stream, timed with events), or with --cpu the
// CPU backend on the small presets, timed with the host clock: a smoke test of the harness itself.
class Runtime {
 public:
  explicit Runtime(bool gpu) : gpu_(gpu) {
    if (!gpu_) return;
    SAPATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    timer_.emplace(stream_);
  }
  ~Runtime() {
    if (!gpu_) return;
    timer_.reset();
    cudaStreamDestroy(stream_);
  }
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  bool gpu() const { return gpu_; }
  Device device() const { return gpu_ ? Device::cuda(0) : Device::cpu(); }
  Stream stream() const { return gpu_ ? Stream{Device::cuda(0), stream_, 0} : Stream::cpu(); }
  cudaStream_t cuda_stream() const { return stream_; }

  void sync() const {
    if (gpu_) SAPATTN_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  // dst (on this runtime's device) = src (host), same byte size.
  void upload(const Tensor& dst, const Tensor& src) const {
    if (gpu_)
      SAPATTN_CUDA_CHECK(cudaMemcpy(dst.data(), src.data(), src.bytes(), cudaMemcpyHostToDevice));
    else
      std::memcpy(dst.data(), src.data(), src.bytes());
  }
  void zero(const Tensor& t) const {
    if (gpu_)
      SAPATTN_CUDA_CHECK(cudaMemsetAsync(t.data(), 0, t.bytes(), stream_));
    else
      std::memset(t.data(), 0, t.bytes());
  }
  template <typename T>
  std::vector<T> to_host(const Tensor& t) const {
    std::vector<T> h(static_cast<size_t>(t.numel()));
    if (gpu_) {
      SAPATTN_CUDA_CHECK(cudaMemcpyAsync(h.data(), t.data(), t.bytes(), cudaMemcpyDeviceToHost, stream_));
      SAPATTN_CUDA_CHECK(cudaStreamSynchronize(stream_));
    } else {
      std::memcpy(h.data(), t.data(), t.bytes());
    }
    return h;
  }

  // Median and min of `iters` runs after `warmup` untimed ones; on the GPU each run lies between two
  // events recorded on the stream.
  Timing time(const std::function<void()>& f, int warmup, int iters) const {
    return gpu_ ? timer_->time(f, warmup, iters) : bench::time_host(f, warmup, iters);
  }

 private:
  bool gpu_;
  cudaStream_t stream_ = nullptr;
  std::optional<bench::EventTimer> timer_;
};

std::vector<std::string> split(const std::string& s, char separator = ',') {
  std::vector<std::string> v;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, separator);)
    if (!item.empty()) v.push_back(item);
  return v;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Cluster-size summary over every (b,h) of the first `clusters` clusters of [BH, C+1] offsets.
void print_size_summary(const char* shape, const char* side, const std::vector<int32_t>& offsets, int64_t bh,
                        int64_t stride, int64_t clusters) {
  std::vector<int32_t> sizes;
  sizes.reserve(static_cast<size_t>(bh * clusters));
  for (int64_t r = 0; r < bh; ++r)
    for (int64_t c = 0; c < clusters; ++c) sizes.push_back(offsets[r * stride + c + 1] - offsets[r * stride + c]);
  std::sort(sizes.begin(), sizes.end());
  const auto pct = [&](double p) { return sizes[static_cast<size_t>(p * static_cast<double>(sizes.size() - 1))]; };
  double sum = 0;
  int64_t empty = 0;
  for (int32_t s : sizes) {
    sum += s;
    empty += s == 0;
  }
  JsonLine()
      .str("shape", shape)
      .str("op", "cluster_sizes")
      .str("side", side)
      .integer("clusters_per_head", clusters)
      .num("mean", sum / static_cast<double>(sizes.size()))
      .integer("min", sizes.front())
      .integer("p10", pct(0.10))
      .integer("p50", pct(0.50))
      .integer("p90", pct(0.90))
      .integer("max", sizes.back())
      .integer("empty", empty)
      .print();
}

// Writes an int32 tensor as an f32 .npy (the repo's npy writer takes f32/f16; offsets < 2^24 are exact).
void save_i32_as_f32(const std::string& path, const std::vector<int32_t>& v, std::vector<int64_t> shape) {
  Tensor t(DType::F32, std::move(shape));
  float* p = t.data_as<float>();
  for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<float>(v[i]);
  io::write_npy(path, t.view());
}

void save_mask_as_f16(const std::string& path, const std::vector<uint8_t>& m, std::vector<int64_t> shape) {
  Tensor t(DType::F16, std::move(shape));
  uint16_t* p = t.data_as<uint16_t>();
  const uint16_t one = f32_to_f16(1.0f);
  for (size_t i = 0; i < m.size(); ++i) p[i] = m[i] != 0 ? one : 0;
  io::write_npy(path, t.view());
}

void bench_shape(const BenchShape& spec, const Options& opt) {
  const Runtime rt(!opt.cpu);
  const Device dev = rt.device();
  const Stream st = rt.stream();
  const char* name = spec.name.c_str();

  // ---- the workload: generated on the host, copied to the GPU ----------------------------------
  const workload::Preset preset = workload::preset(spec.preset);
  SAPATTN_CHECK(preset.batch == spec.batch && preset.heads == spec.heads && preset.head_dim == spec.head_dim &&
                    preset.frames == spec.frames && preset.height == spec.height && preset.width == spec.width &&
                    preset.text_tokens == spec.text_tokens,
                InvalidArgumentError, "bench/shapes.json: shape ", spec.name, " differs from workload preset ",
                spec.preset, " (batch, heads, head_dim, latent_grid or text_tokens)");
  const int64_t B = preset.batch, H = preset.heads, S = preset.tokens(), D = preset.head_dim, BH = B * H;
  const int64_t Sv = preset.video_tokens();
  const bool text = preset.text_tokens > 0;
  const int Cqv = opt.cq > 0 ? opt.cq : spec.q_clusters, Ckv = opt.ck > 0 ? opt.ck : spec.k_clusters;
  const int Cq = Cqv + (text ? 2 : 0), Ck = Ckv + (text ? 2 : 0);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  auto tensor = [&](DType t, std::vector<int64_t> shape) { return Tensor(t, std::move(shape), dev); };
  Tensor q = tensor(DType::BF16, {B, H, S, D}), k = tensor(DType::BF16, {B, H, S, D}),
         v = tensor(DType::BF16, {B, H, S, D});
  {
    std::fprintf(stderr, "[%s] generating %s (B%lld H%lld S%lld D%lld)\n", name, spec.preset.c_str(),
                 static_cast<long long>(B), static_cast<long long>(H), static_cast<long long>(S),
                 static_cast<long long>(D));
    const auto t0 = std::chrono::steady_clock::now();
    const workload::Workload w = workload::generate(preset, opt.seed, DType::BF16, {}, opt.threads);
    const double gen_s = seconds_since(t0);
    rt.upload(q, w.q);
    rt.upload(k, w.k);
    rt.upload(v, w.v);
    JsonLine()
        .str("shape", name)
        .str("op", "workload")
        .str("preset", spec.preset)
        .integer("B", B)
        .integer("H", H)
        .integer("S", S)
        .integer("D", D)
        .integer("video_tokens", Sv)
        .integer("text_tokens", preset.text_tokens)
        .integer("q_clusters", Cqv)
        .integer("k_clusters", Ckv)
        .integer("seed", static_cast<int64_t>(opt.seed))
        .num("generate_s", gen_s, 4)
        .num("total_s", seconds_since(t0), 4)
        .print();
  }
  const TensorView qv = q.view(), kv = k.view(), vv = v.view();

  // ---- clustering: 50 Lloyd iterations from the seeded sample, as a layer's first sparse call ------
  Tensor qc = tensor(DType::F32, {B, H, Cqv, D}), kc = tensor(DType::F32, {B, H, Ckv, D});
  Tensor ql = tensor(DType::I32, {B, H, S}), kl = tensor(DType::I32, {B, H, S});
  Tensor qs = tensor(DType::I32, {B, H, Cqv}), ks = tensor(DType::I32, {B, H, Ckv});
  const size_t ws_bytes =
      std::max({kmeans_workspace_bytes(BH, Sv, Cqv, D, dev), kmeans_workspace_bytes(BH, Sv, Ckv, D, dev),
                cluster_permutation_workspace_bytes(BH, S, std::max(Cq, Ck), dev)});
  const Buffer ws_buf = Buffer::allocate(ws_bytes, dev);
  const Workspace ws{ws_buf.data(), ws_buf.bytes()};
  const TensorView q_video = qv.slice(2, 0, Sv), k_video = kv.slice(2, 0, Sv);
  const TensorView ql_video = ql.view().slice(2, 0, Sv), kl_video = kl.view().slice(2, 0, Sv);
  const Timing kmeans_t = rt.time(
      [&] {
        kmeans_init(q_video, qc.view(), opt.seed, st, ws);
        kmeans(q_video, qc.view(), ql_video, qs.view(), 50, st, ws);
        kmeans_init(k_video, kc.view(), opt.seed ^ 0x5bd1e9955bd1e995ull, st, ws);
        kmeans(k_video, kc.view(), kl_video, ks.view(), 50, st, ws);
      },
      0, 1);
  // The clusters renumbered so that similar ones are neighbours: key clusters so that kept ones form
  // runs, and query clusters too (since run 17, docs/attention.md: dropping it would change the
  // layouts that every later timing was taken on); timed apart, as svg2 pays it only when it
  // clusters from scratch.
  double order_ms = 0, order_q_ms = 0;
  if (opt.order) {
    const Buffer order_buf =
        Buffer::allocate(std::max<size_t>(order_clusters_workspace_bytes(BH, std::max(Ckv, Cqv), D, dev), 256), dev);
    const Workspace order_ws{order_buf.data(), order_buf.bytes()};
    order_ms = rt.time([&] { order_clusters(kc.view(), ks.view(), kl_video, st, order_ws); }, 0, 1).median_ms;
    order_q_ms = rt.time([&] { order_clusters(qc.view(), qs.view(), ql_video, st, order_ws); }, 0, 1).median_ms;
  }
  if (text) {
    label_text_tokens(ql.view(), Sv, preset.prompt_length, Cqv, st);
    label_text_tokens(kl.view(), Sv, preset.prompt_length, Ckv, st);
  }
  Tensor qp = tensor(DType::I32, {B, H, S}), kp = tensor(DType::I32, {B, H, S});
  Tensor qo = tensor(DType::I32, {B, H, Cq + 1}), ko = tensor(DType::I32, {B, H, Ck + 1});
  cluster_permutation(ql.view(), Cq, qp.view(), qo.view(), st, ws);
  cluster_permutation(kl.view(), Ck, kp.view(), ko.view(), st, ws);
  Tensor qr = tensor(DType::BF16, {B, H, S, D}), kr = tensor(DType::BF16, {B, H, S, D}),
         vr = tensor(DType::BF16, {B, H, S, D});
  gather_rows(qv, qp.view(), qr.view(), st);
  gather_rows(kv, kp.view(), kr.view(), st);
  gather_rows(vv, kp.view(), vr.view(), st);
  rt.sync();
  JsonLine().str("shape", name).str("op", "kmeans_50it_qk").num("ms", kmeans_t.median_ms, 5).print();
  JsonLine()
      .str("shape", name)
      .str("op", "order_clusters")
      .str("order", opt.order ? "chain" : "none")
      .num("ms", order_ms, 5)
      .num("q_ms", order_q_ms, 5)
      .print();
  const std::vector<int32_t> q_off = rt.to_host<int32_t>(qo), k_off = rt.to_host<int32_t>(ko);
  print_size_summary(name, "q", q_off, BH, Cq + 1, Cqv);
  print_size_summary(name, "k", k_off, BH, Ck + 1, Ckv);

  const std::string dir = opt.out + "/" + name;
  std::filesystem::create_directories(dir);
  save_i32_as_f32(dir + "/q_offsets.npy", q_off, {B, H, Cq + 1});
  save_i32_as_f32(dir + "/k_offsets.npy", k_off, {B, H, Ck + 1});
  std::FILE* manifest = std::fopen((dir + "/manifest.jsonl").c_str(), "w");
  SAPATTN_CHECK(manifest != nullptr, IoError, "cannot write ", dir, "/manifest.jsonl");

  // ---- selection, with the top-p that reaches each target density ---------------------------------
  Tensor mask = tensor(DType::U8, {B, H, Cq, Ck});
  const TensorView video_mask = mask.view().slice(2, 0, Cqv).slice(3, 0, Ckv);
  const BlockLayout layout{qo.view(), ko.view(), mask.view()};
  Tensor dens = tensor(DType::F32, {B, H});
  const int official_min_kept = Ckv / 10;  // floor(min_kc_ratio * Ck), min_kc_ratio = 0.10
  auto select = [&](float top_p, int min_kept) {
    rt.zero(mask);
    select_blocks(qc.view(), kc.view(), ks.view(), scale, top_p, min_kept, video_mask, st);
    if (text) apply_text_rule(mask.view(), st);
    block_density(layout, dens.view(), st);
    const std::vector<float> d = rt.to_host<float>(dens);
    double sum = 0;
    for (float x : d) sum += x;
    return sum / static_cast<double>(d.size());
  };

  // Buffers of the timed calls.
  Tensor out = tensor(DType::BF16, {B, H, S, D}), out_perm = tensor(DType::BF16, {B, H, S, D});
  const TensorView no_lse{};
  const size_t attn_ws_bytes = block_sparse_attention_workspace_bytes(BH, Cq, Ck, S, dev);
  const Buffer attn_ws_buf = Buffer::allocate(std::max<size_t>(attn_ws_bytes, 256), dev);
  const Workspace attn_ws{attn_ws_buf.data(), attn_ws_bytes};
  const bool fp8 = std::any_of(opt.variants.begin(), opt.variants.end(),
                               [](const std::string& v) { return v.rfind("fp8", 0) == 0; });
  const size_t fp8_ws_bytes = fp8 ? block_sparse_attention_e4m3_workspace_bytes(BH, Cq, Ck, S, S, dev) : 0;
  const Buffer fp8_ws_buf = Buffer::allocate(std::max<size_t>(fp8_ws_bytes, 256), dev);
  const Workspace fp8_ws{fp8_ws_buf.data(), fp8_ws_bytes};
  const size_t plan_bytes = rt.gpu() ? cuda::attn::plan_workspace_bytes(BH, Cq, Ck, S) : 0;
  const Buffer plan_buf = Buffer::allocate(std::max<size_t>(plan_bytes, 256), dev);
  const double dense_pairs = static_cast<double>(BH) * static_cast<double>(S) * static_cast<double>(S);
  auto tflops = [&](double pairs, double ms) { return 4.0 * pairs * static_cast<double>(D) / (ms * 1e-3) / 1e12; };

  // "cpasync" / "tma": the Hopper kernel with its cp.async loads everywhere, or with TMA loads wherever
  // rows are unpermuted ("auto" is the library default: TMA wherever rows are unpermuted, as measured).
  auto set_kernel = [&](const std::string& kernel) {
    if (!rt.gpu()) return;
    cuda::set_attention_kernel_override(kernel == "sm80" ? "sm80" : "");
    if (kernel == "cpasync" || kernel == "tma") {
      setenv("SAPATTN_SM90_LOAD", kernel.c_str(), 1);
    } else {
      unsetenv("SAPATTN_SM90_LOAD");
    }
  };
  // variant: as --variants names it, reported as `label` where one is given.
  auto report = [&](const char* variant, const std::string& kernel, const std::string& layout_tag, double target,
                    double density, double pairs, const std::function<void()>& call, const std::string& label = "") {
    const std::string v = variant;
    if (v != "dense" && std::find(opt.variants.begin(), opt.variants.end(), v) == opt.variants.end()) return;
    JsonLine j;
    j.str("shape", name).str("impl", "sapattn").str("variant", label.empty() ? v : label).str("kernel", kernel);
    try {
      set_kernel(kernel);
      j.str("kernel_name", attention_kernel(dev, DType::BF16, D).name);
      const Timing t = rt.time(call, opt.warmup, opt.iters);
      j.str("layout", layout_tag)
          .num("density_target", target, 4)
          .num("density", density, 5)
          .num("pairs", pairs, 8)
          .num("median_ms", t.median_ms, 6)
          .num("min_ms", t.min_ms, 6)
          .integer("iters", t.iters)
          .num("tflops", tflops(pairs, t.median_ms), 5);
    } catch (const std::exception& e) {
      j.str("layout", layout_tag).num("density_target", target, 4).str("error", e.what());
      if (rt.gpu()) (void)cudaGetLastError();
    }
    j.print();
  };

  // ---- dense references ---------------------------------------------------------------------------
  for (const std::string& kernel : opt.kernels)
    report("dense", kernel, "dense", 1.0, 1.0, dense_pairs,
           [&] { dense_attention(qv, kv, vv, scale, out.view(), no_lse, st); });

  for (const double target : opt.densities) {
    std::fprintf(stderr, "[%s] layout at density %.3f\n", name, target);
    // top_p -> density is non-decreasing; bisect on it.
    int min_kept = official_min_kept;
    float best_p = 1.0f;
    std::string note;
    if (target < 1.0) {
      const float p_floor = 1e-6f;
      double d_floor = select(p_floor, min_kept);
      if (d_floor > target && min_kept > 0) {
        note = "target below the density of min_kept=" + std::to_string(min_kept) + " (" + std::to_string(d_floor) +
               "); min_kept lowered to 0";
        min_kept = 0;
        d_floor = select(p_floor, min_kept);
      }
      if (d_floor >= target) {
        best_p = p_floor;
        if (d_floor > 1.05 * target) note += (note.empty() ? "" : "; ") + std::string("target not reachable by top-p");
      } else {
        float lo = p_floor, hi = 1.0f;
        double best_err = std::abs(d_floor - target);
        best_p = lo;
        for (int it = 0; it < 40; ++it) {
          const float mid = 0.5f * (lo + hi);
          if (mid <= lo || mid >= hi) break;
          const double d = select(mid, min_kept);
          if (std::abs(d - target) < best_err) {
            best_err = std::abs(d - target);
            best_p = mid;
          }
          if (d < target)
            lo = mid;
          else
            hi = mid;
          if (best_err < 0.002 * target) break;
        }
      }
    }
    select(best_p, min_kept);
    const std::vector<uint8_t> m = rt.to_host<uint8_t>(mask);
    // Exact pairs from the host copies: sum over kept (a,b) of |Q_a| * |K_b|. Also what the kernels
    // see of the layout: runs of kept clusters with contiguous rows (the plan's segments) and the
    // pairs computed and discarded by padding (query rows to 64 per warpgroup, keys to 16-row slots
    // per run, as the TMA loads do, or per cluster, as they would without runs).
    double pairs = 0, runs = 0, kept = 0, rows_with_keys = 0, q_padded = 0, k_slots_runs = 0, k_slots_clusters = 0;
    for (int64_t r = 0; r < BH; ++r) {
      const int32_t* qo_r = &q_off[r * (Cq + 1)];
      const int32_t* ko_r = &k_off[r * (Ck + 1)];
      for (int a = 0; a < Cq; ++a) {
        int64_t keys = 0, run = 0, slots_runs = 0, slots_clusters = 0, row_runs = 0, row_kept = 0;
        bool previous_kept = false;  // the last non-empty cluster's
        const uint8_t* row = &m[(r * Cq + a) * Ck];
        for (int b = 0; b <= Ck; ++b) {
          const int64_t size = b < Ck ? ko_r[b + 1] - ko_r[b] : 1;
          if (size == 0) continue;
          const bool keep = b < Ck && row[b] != 0;
          if (!keep && previous_kept) slots_runs += (run + 15) / 16;  // a run ends
          if (keep) {
            if (!previous_kept) ++row_runs, run = 0;
            run += size;
            keys += size;
            ++row_kept;
            slots_clusters += (size + 15) / 16;
          }
          previous_kept = keep;
        }
        const int64_t n = qo_r[a + 1] - qo_r[a];
        pairs += static_cast<double>(keys) * static_cast<double>(n);
        if (keys == 0 || n == 0) continue;
        const int64_t computed = n / 128 * 128 + (n % 128 + 63) / 64 * 64;  // items of 128, warpgroups of 64
        q_padded += static_cast<double>(computed - n) * static_cast<double>(keys);
        k_slots_runs += static_cast<double>(slots_runs) * 16.0 * static_cast<double>(n);
        k_slots_clusters += static_cast<double>(slots_clusters) * 16.0 * static_cast<double>(n);
        runs += static_cast<double>(row_runs) * static_cast<double>(n);
        kept += static_cast<double>(row_kept) * static_cast<double>(n);
        rows_with_keys += static_cast<double>(n);
      }
    }
    const double density = pairs / dense_pairs;
    char tag[32];
    std::snprintf(tag, sizeof(tag), "d%.3f", target);
    const std::string mask_file = std::string("mask_") + tag + ".npy";
    save_mask_as_f16(dir + "/" + mask_file, m, {B, H, Cq, Ck});
    JsonLine layout_line;
    layout_line.str("shape", name)
        .str("layout", tag)
        .integer("B", B)
        .integer("H", H)
        .integer("S", S)
        .integer("D", D)
        .integer("q_clusters", Cq)
        .integer("k_clusters", Ck)
        .num("density_target", target, 4)
        .num("density", density, 6)
        .num("pairs", pairs, 10)
        .num("top_p", best_p, 8)
        .integer("min_kept", min_kept)
        .str("key_order", opt.order ? "chain" : "none")
        // per query row: kept clusters and runs; shares of computed pairs that padding discards
        .num("clusters_per_row", kept / std::max(rows_with_keys, 1.0), 5)
        .num("runs_per_row", runs / std::max(rows_with_keys, 1.0), 5)
        .num("q_pad_share", q_padded / std::max(pairs + q_padded, 1.0), 5)
        .num("k_pad_share_slot16_runs", 1.0 - pairs / std::max(k_slots_runs, 1.0), 5)
        .num("k_pad_share_slot16_clusters", 1.0 - pairs / std::max(k_slots_clusters, 1.0), 5)
        .str("q_offsets", "q_offsets.npy")
        .str("k_offsets", "k_offsets.npy")
        .str("mask", mask_file);
    if (!note.empty()) layout_line.str("note", note);
    layout_line.print(manifest);
    JsonLine(layout_line).str("op", "layout").print();

    // The planner alone (what every CUDA block_sparse_attention call runs before its kernel).
    if (rt.gpu()) {
      JsonLine j;
      j.str("shape", name).str("impl", "sapattn").str("variant", "plan").str("layout", tag);
      try {
        const Workspace plan_ws{plan_buf.data(), plan_bytes};
        const Timing t =
            rt.time([&] { cuda::attn::build_plan(layout, S, S, plan_ws, rt.cuda_stream()); }, opt.warmup, opt.iters);
        j.num("density_target", target, 4).num("density", density, 5).num("plan_ms", t.median_ms, 6);
      } catch (const std::exception& e) {
        j.str("error", e.what());
        (void)cudaGetLastError();
      }
      j.print();
    }
    const RowPermutation both{qp.view(), kp.view()}, q_only{qp.view(), TensorView{}};
    for (const std::string& kernel : opt.kernels) {
      report("unfused", kernel, tag, target, density, pairs, [&] {
        block_sparse_attention(qr.view(), kr.view(), vr.view(), layout, scale, out.view(), no_lse, st, attn_ws);
      });
      report("fused_qk", kernel, tag, target, density, pairs,
             [&] { block_sparse_attention(qv, kv, vv, layout, scale, out.view(), no_lse, st, attn_ws, both); });
      report("fused_q", kernel, tag, target, density, pairs, [&] {
        block_sparse_attention(qv, kr.view(), vr.view(), layout, scale, out.view(), no_lse, st, attn_ws, q_only);
      });
      // What svg2_attention runs on the Hopper kernel: K and V gathered into cluster order (TMA
      // loads), Q read and O written through q_perm.
      report("sorted_kv", kernel, tag, target, density, pairs, [&] {
        gather_rows(kv, kp.view(), kr.view(), st);
        gather_rows(vv, kp.view(), vr.view(), st);
        block_sparse_attention(qv, kr.view(), vr.view(), layout, scale, out.view(), no_lse, st, attn_ws, q_only);
      });
      // The e4m3 kernel on the cluster-ordered operands, quantised once (default Fp8Options), and
      // the whole e4m3 op as svg2_attention calls it (token order, both permutations).
      if (fp8 && kernel != "sm80" && D == 128) {
        std::optional<cuda::E4m3Operands> operands;
        try {
          operands = cuda::quantize_e4m3_operands(qr.view(), kr.view(), vr.view(), layout, scale, Fp8Options{}, st,
                                                  fp8_ws, RowPermutation{});
        } catch (const std::exception& e) {
          std::fprintf(stderr, "fp8: %s\n", e.what());
          (void)cudaGetLastError();
        }
        report("fp8", kernel, tag, target, density, pairs, [&] {
          SAPATTN_CHECK(operands.has_value(), UnsupportedError, "the e4m3 operands could not be made");
          cuda::attend_e4m3(*operands, layout, out.view(), no_lse, st);
        });
        report("fp8_sumf", kernel, tag, target, density, pairs, [&] {  // p_sum_e4m3 = false
          SAPATTN_CHECK(operands.has_value(), UnsupportedError, "the e4m3 operands could not be made");
          cuda::E4m3Operands sumf = *operands;
          sumf.p_sum_e4m3 = false;
          cuda::attend_e4m3(sumf, layout, out.view(), no_lse, st);
        });
        // One K scale per head (the key tile covers the head): the kernel's per-score key scale goes.
        Fp8Options one_key_scale;
        one_key_scale.k_tile = Fp8Options::kHeadTile;
        const auto wanted = [&](const char* v) {
          return std::find(opt.variants.begin(), opt.variants.end(), v) != opt.variants.end();
        };
        if (wanted("fp8_khead") || wanted("fp8_khead_sumf")) {
          try {
            operands = cuda::quantize_e4m3_operands(qr.view(), kr.view(), vr.view(), layout, scale, one_key_scale, st,
                                                    fp8_ws, RowPermutation{});
          } catch (const std::exception& e) {
            operands.reset();
            std::fprintf(stderr, "fp8_khead: %s\n", e.what());
            (void)cudaGetLastError();
          }
        }
        report("fp8_khead", kernel, tag, target, density, pairs, [&] {
          SAPATTN_CHECK(operands.has_value(), UnsupportedError, "the e4m3 operands could not be made");
          cuda::attend_e4m3(*operands, layout, out.view(), no_lse, st);
        });
        report("fp8_khead_sumf", kernel, tag, target, density, pairs, [&] {
          SAPATTN_CHECK(operands.has_value(), UnsupportedError, "the e4m3 operands could not be made");
          cuda::E4m3Operands sumf = *operands;
          sumf.p_sum_e4m3 = false;
          cuda::attend_e4m3(sumf, layout, out.view(), no_lse, st);
        });
        for (const std::string& build : opt.fp8_builds) {
          const std::vector<std::string> parts = split(build, ':');
          setenv("SAPATTN_FP8_KEY_TILE", parts[0].c_str(), 1);
          setenv("SAPATTN_FP8_FMA_EXPS", parts[1].c_str(), 1);
          const bool mma = parts.size() > 2 && parts[2] == "mma";  // the sum of the quantised P, by the MMA
          setenv("SAPATTN_FP8_ROW_SUM", mma ? "mma" : "default", 1);
          report(
              "fp8_khead_sumf", kernel, tag, target, density, pairs,
              [&] {
                SAPATTN_CHECK(operands.has_value(), UnsupportedError, "the e4m3 operands could not be made");
                cuda::E4m3Operands head = *operands;
                head.p_sum_e4m3 = mma;
                cuda::attend_e4m3(head, layout, out.view(), no_lse, st);
              },
              "fp8_khead_sumf@" + build);
          unsetenv("SAPATTN_FP8_KEY_TILE");
          unsetenv("SAPATTN_FP8_FMA_EXPS");
          unsetenv("SAPATTN_FP8_ROW_SUM");
        }
        report("fp8_e2e", kernel, tag, target, density, pairs, [&] {
          block_sparse_attention_e4m3(qv, kv, vv, layout, scale, Fp8Options{}, out.view(), no_lse, st, fp8_ws, both);
        });
        report("fp8_khead_e2e", kernel, tag, target, density, pairs, [&] {  // the fused head-scale passes
          Fp8Options head = one_key_scale;
          head.p_sum_e4m3 = false;
          block_sparse_attention_e4m3(qv, kv, vv, layout, scale, head, out.view(), no_lse, st, fp8_ws, both);
        });
      }
      // What the unfused call costs in a layer: permuted copies of Q, K, V in, the output put back.
      report("unfused_e2e", kernel, tag, target, density, pairs, [&] {
        gather_rows(qv, qp.view(), qr.view(), st);
        gather_rows(kv, kp.view(), kr.view(), st);
        gather_rows(vv, kp.view(), vr.view(), st);
        block_sparse_attention(qr.view(), kr.view(), vr.view(), layout, scale, out_perm.view(), no_lse, st, attn_ws);
        scatter_rows(out_perm.view(), qp.view(), out.view(), st);
      });
    }
    if (target == opt.densities.front()) {  // once per shape: the fused call computes what the unfused one does
      JsonLine j;
      j.str("shape", name).str("op", "check_fused_vs_unfused").str("layout", tag);
      try {
        set_kernel("auto");
        gather_rows(qv, qp.view(), qr.view(), st);
        block_sparse_attention(qr.view(), kr.view(), vr.view(), layout, scale, out_perm.view(), no_lse, st, attn_ws);
        scatter_rows(out_perm.view(), qp.view(), out.view(), st);
        const std::vector<uint16_t> unfused = rt.to_host<uint16_t>(out);
        block_sparse_attention(qv, kv, vv, layout, scale, out.view(), no_lse, st, attn_ws, both);
        const std::vector<uint16_t> fused = rt.to_host<uint16_t>(out);
        double max_diff = 0, max_ref = 0;
        for (size_t i = 0; i < fused.size(); ++i) {
          const double a = bf16_to_f32(fused[i]), b = bf16_to_f32(unfused[i]);
          max_diff = std::max(max_diff, std::abs(a - b));
          max_ref = std::max(max_ref, std::abs(b));
          if (std::isnan(a) != std::isnan(b)) max_diff = INFINITY;
        }
        j.num("max_abs_diff", max_diff).num("max_abs", max_ref);
      } catch (const std::exception& e) {
        j.str("error", e.what());
        if (rt.gpu()) (void)cudaGetLastError();
      }
      j.print();
    }
  }
  set_kernel("auto");
  std::fclose(manifest);
  rt.sync();
}

// The usage text: on stdout for --help (exit 0), on stderr after a bad argument (exit 2). The
// options are all read before anything touches the GPU, so neither needs a driver.
int usage(const char* argv0, bool asked = false) {
  std::fprintf(
      asked ? stdout : stderr,
      "usage: %s [--shape wan13b|wan14b|hunyuan|all[,...]] [--densities 0.05,0.1,...] [--out DIR]\n"
      "          [--iters N] [--warmup N] [--kernels auto,cpasync,tma,sm80] [--seed N] [--cq N] [--ck N] [--threads "
      "N]\n"
      "          [--order chain|none]   (query and key clusters renumbered by order_clusters, the default, or as "
      "k-means left them)\n"
      "          [--variants "
      "unfused,fused_qk,fused_q,sorted_kv,unfused_e2e,fp8,fp8_sumf,fp8_khead,fp8_khead_sumf,fp8_e2e,fp8_khead_e2e]\n"
      "          (the sparse calls to time; default all; fp8*: head dim 128 on the Hopper kernel)\n"
      "          [--fp8-builds 128:2,160:0:mma,...]   (fp8_khead_sumf again under each measured e4m3 build,\n"
      "          SAPATTN_FP8_KEY_TILE:SAPATTN_FP8_FMA_EXPS[:mma, SAPATTN_FP8_ROW_SUM=mma])\n"
      "          [--cpu]   (CPU backend, for a smoke test on --shape tiny or tiny-text)\n",
      argv0);
  return asked ? 0 : 2;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") return usage(argv[0], true);
    if (a == "--cpu") {
      opt.cpu = true;
      continue;
    }
    if (i + 1 >= argc) return usage(argv[0]);
    const std::string val = argv[++i];
    if (a == "--shape") {
      opt.shapes = split(val);
    } else if (a == "--densities") {
      opt.densities.clear();
      for (const std::string& d : split(val)) opt.densities.push_back(std::atof(d.c_str()));
    } else if (a == "--out") {
      opt.out = val;
    } else if (a == "--iters") {
      opt.iters = std::max(1, std::atoi(val.c_str()));
    } else if (a == "--warmup") {
      opt.warmup = std::max(0, std::atoi(val.c_str()));
    } else if (a == "--order") {
      if (val != "chain" && val != "none") return usage(argv[0]);
      opt.order = val == "chain";
    } else if (a == "--kernels") {
      opt.kernels = split(val);
    } else if (a == "--variants") {
      const std::vector<std::string> known = Options{}.variants;
      opt.variants = split(val);
      for (const std::string& v : opt.variants)
        if (std::find(known.begin(), known.end(), v) == known.end()) return usage(argv[0]);
    } else if (a == "--fp8-builds") {
      opt.fp8_builds = split(val);
      for (const std::string& b : opt.fp8_builds)
        if (const size_t n = split(b, ':').size(); n < 2 || n > 3) return usage(argv[0]);
    } else if (a == "--seed") {
      opt.seed = std::strtoull(val.c_str(), nullptr, 10);
    } else if (a == "--cq") {
      opt.cq = std::atoi(val.c_str());
    } else if (a == "--ck") {
      opt.ck = std::atoi(val.c_str());
    } else if (a == "--threads") {
      opt.threads = std::atoi(val.c_str());
    } else {
      return usage(argv[0]);
    }
  }
  for (double d : opt.densities)
    if (!(d > 0.0 && d <= 1.0)) {
      std::fprintf(stderr, "densities must lie in (0, 1], got %g\n", d);
      return 2;
    }
  for (const std::string& kname : opt.kernels)
    if (kname != "auto" && kname != "sm80" && kname != "cpasync" && kname != "tma") {
      std::fprintf(stderr, "kernels are 'auto', 'cpasync', 'tma' and 'sm80', got '%s'\n", kname.c_str());
      return 2;
    }
  if (opt.cpu) opt.kernels = {"auto"};
  const auto wanted = [&](const BenchShape& s) {
    return std::any_of(opt.shapes.begin(), opt.shapes.end(),
                       [&](const std::string& w) { return bench::shape_selected(s, w); });
  };
  const std::vector<BenchShape>& shapes = bench::bench_shapes();
  if (std::none_of(shapes.begin(), shapes.end(), wanted)) {
    std::fprintf(stderr, "no shape matched\n");
    return usage(argv[0]);
  }
  try {
    if (opt.cpu) {
      JsonLine().str("device", "cpu").print();
    } else {
      bench::device_line().str("kernel_auto", attention_kernel(Device::cuda(0), DType::BF16, 128).name).print();
    }
    return bench::run_shapes(wanted, [&](const BenchShape& s) { bench_shape(s, opt); });
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench failed: %s\n", e.what());
    return 1;
  }
}
