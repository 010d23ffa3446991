// The compared methods. All sparse methods end in pipeline::attend_clusters, the same permute /
// attend / unpermute path as svg2_attention; they differ only in how clusters and the mask are made.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/parallel.hpp"
#include "cpu/rows.hpp"
#include "sapattn/eval.hpp"
#include "sapattn/ops.hpp"
#include "sapattn/svg2.hpp"
#include "svg2/pipeline.hpp"

namespace sapattn::eval {

std::string_view method_name(Method m) {
  switch (m) {
    case Method::Sap:
      return "sap";
    case Method::Blocks:
      return "blocks";
    case Method::Oracle:
      return "oracle";
    case Method::Ear:
      return "ear";
    case Method::EarPlus:
      return "ear-plus";
    case Method::Dense:
      return "dense";
  }
  return "?";
}

Method parse_method(std::string_view name) {
  for (Method m : {Method::Sap, Method::Blocks, Method::Oracle, Method::Ear, Method::EarPlus, Method::Dense})
    if (name == method_name(m)) return m;
  SAPATTN_THROW(InvalidArgumentError, "unknown method '", name,
                "' (choose sap, blocks, oracle, ear, ear-plus or dense)");
}

Config use_ear_plus(Config config) {
  config.routing = Routing::ErrorAware;
  config.compensate = true;
  // The ideas that won at equal density (docs/results.md, "ear-plus").
  config.ear_spread = true;
  config.ear_split = true;
  config.ear_head_budget = true;
  return config;
}

namespace {

using cpu::at;

Tensor copy_of(const TensorView& t) {
  Tensor c(t.dtype, std::vector<int64_t>(t.shape.begin(), t.shape.begin() + t.rank));
  std::memcpy(c.data(), t.data, c.bytes());  // views carved from a workspace are contiguous
  return c;
}

// Positional clusters: video token i of N belongs to block floor(i * C / N), so blocks are
// contiguous in the frame-major order and differ in size by at most one token.
void label_blocks(const TensorView& labels, int64_t clusters) {
  const int64_t B = labels.shape[0], H = labels.shape[1], N = labels.shape[2];
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < N; ++i) at<int32_t>(labels, b, h, i) = static_cast<int32_t>(i * clusters / N);
}

// The oracle's ranking: mass[a][c] = mean over the video queries of cluster a of the dense
// attention probability mass on the video keys of cluster c, each row renormalised over the video
// keys. Keys are visited in cluster order so each cluster's mass is one contiguous sum.
Tensor true_cluster_mass(const TensorView& q, const TensorView& k, const MethodResult& dense, const Config& config,
                         const pipeline::Buffers& buf, int threads) {
  const int64_t B = q.shape[0], H = q.shape[1], D = q.shape[3], Sv = buf.video_tokens;
  const int64_t Cq = buf.q_video_clusters, Ck = buf.k_video_clusters;
  const float scale = config.scale_for(D);
  Tensor mass(DType::F32, {B, H, Cq, Ck});
  const TensorView dense_lse = dense.lse.view();
  // fp32 copies of the video rows, [B*H, Sv, D], keys sorted by cluster, converted once.
  std::vector<float> qf(B * H * Sv * D), kf(B * H * Sv * D);
  std::vector<int64_t> key_offsets(B * H * (Ck + 1));
  parallel_for(B * H, threads, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    const int32_t* kl = &at<int32_t>(buf.k_labels, b, h);
    int64_t* off = &key_offsets[bh * (Ck + 1)];
    std::fill(off, off + Ck + 1, 0);
    for (int64_t j = 0; j < Sv; ++j) ++off[kl[j] + 1];
    for (int64_t c = 0; c < Ck; ++c) off[c + 1] += off[c];
    std::vector<int64_t> cursor(off, off + Ck);
    for (int64_t i = 0; i < Sv; ++i) {
      cpu::load_row(q, b, h, i, &qf[(bh * Sv + i) * D]);
      cpu::load_row(k, b, h, i, &kf[(bh * Sv + cursor[kl[i]]++) * D]);
    }
  });
  parallel_for(B * H * Cq, threads, [&](int64_t task) {
    const int64_t bh = task / Cq, b = bh / H, h = bh % H, a = task % Cq;
    const int32_t* ql = &at<int32_t>(buf.q_labels, b, h);
    const int64_t* off = &key_offsets[bh * (Ck + 1)];
    std::vector<double> row(Ck, 0.0);
    int64_t members = 0;
    for (int64_t i = 0; i < Sv; ++i) {
      if (ql[i] != a) continue;
      ++members;
      const float* qi = &qf[(bh * Sv + i) * D];
      const float lse = at<float>(dense_lse, b, h, i);
      for (int64_t c = 0; c < Ck; ++c) {
        float sum = 0.0f;
        for (int64_t j = off[c]; j < off[c + 1]; ++j) {
          const float* kj = &kf[(bh * Sv + j) * D];
          float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent lanes, so it vectorises
          int64_t d = 0;
          for (; d + 8 <= D; d += 8)
            for (int l = 0; l < 8; ++l) part[l] += qi[d + l] * kj[d + l];
          for (; d < D; ++d) part[0] += qi[d] * kj[d];
          const float dot = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
          sum += std::exp(dot * scale - lse);
        }
        row[c] += sum;
      }
    }
    double total = 0.0;
    for (double m : row) total += m;
    for (int64_t c = 0; c < Ck; ++c)
      at<float>(mass.view(), b, h, a, c) =
          members > 0 && total > 0 ? static_cast<float>(row[c] / total) : 1.0f / static_cast<float>(Ck);
  });
  return mass;
}

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

MethodResult empty_result(Method method, const AttentionShape& shape) {
  MethodResult r;
  r.method = method;
  r.out = Tensor(DType::F32, {shape.batch, shape.heads, shape.seq, shape.head_dim});
  r.lse = Tensor(DType::F32, {shape.batch, shape.heads, shape.seq});
  r.density = Tensor(DType::F32, {shape.batch, shape.heads});
  return r;
}

Svg2Outputs outputs_of(MethodResult& r) { return {r.out.view(), r.lse.view(), r.density.view(), {}, {}}; }

}  // namespace

MethodResult run_method(Method method, const TensorView& q, const TensorView& k, const TensorView& v,
                        const Config& config, const MethodResult* dense, int threads) {
  if (method != Method::Dense)
    return std::move(run_sweep(method, q, k, v, config, {SweepPoint{config.top_p, config.density}}, dense, threads)[0]);
  const Stream stream = Stream::cpu(threads);
  const AttentionShape shape = AttentionShape::of(q);
  MethodResult r = empty_result(method, shape);
  pipeline::check_inputs(q, k, v, config, outputs_of(r), stream);
  const auto start = std::chrono::steady_clock::now();
  dense_attention(q, k, v, config.scale_for(shape.head_dim), r.out.view(), r.lse.view(), stream);
  for (int64_t i = 0; i < shape.batch * shape.heads; ++i) r.density.data_as<float>()[i] = 1.0f;
  r.seconds = seconds_since(start);
  return r;
}

std::vector<MethodResult> run_sweep(Method method, const TensorView& q, const TensorView& k, const TensorView& v,
                                    const Config& config, const std::vector<float>& top_ps, const MethodResult* dense,
                                    int threads) {
  std::vector<SweepPoint> points;
  for (float p : top_ps) points.push_back({p, 0.0f});
  return run_sweep(method, q, k, v, config, points, dense, threads);
}

std::vector<MethodResult> run_sweep(Method method, const TensorView& q, const TensorView& k, const TensorView& v,
                                    const Config& config, const std::vector<SweepPoint>& points,
                                    const MethodResult* dense, int threads, const SweepProgress& progress) {
  SAPATTN_CHECK(method != Method::Dense, InvalidArgumentError, "a top-p sweep needs a sparse method, not dense");
  SAPATTN_CHECK(method != Method::Oracle || (dense != nullptr && dense->method == Method::Dense), InvalidArgumentError,
                "the oracle needs the dense result of the same inputs");
  const Stream stream = Stream::cpu(threads);
  const AttentionShape shape = AttentionShape::of(q);
  const int64_t B = shape.batch, H = shape.heads, D = shape.head_dim;
  Config base = method == Method::EarPlus ? use_ear_plus(config) : config;
  if (method == Method::Ear) {
    base.routing = Routing::ErrorAware;
    base.compensate = true;
  }
  // Any density point needs SVG2's weights in the workspace.
  base.density = 0.0f;
  for (const SweepPoint& point : points) base.density = std::max(base.density, point.density);
  const auto point_config = [&](const SweepPoint& point) {
    Config c = base;
    c.top_p = point.top_p;
    c.density = point.density;
    return c;
  };
  // q stands in for the output: only its shape is checked; each result gets its own outputs below.
  pipeline::check_inputs(q, k, v, base, Svg2Outputs{q}, stream);
  for (const SweepPoint& point : points) point_config(point).validate();
  const auto start = std::chrono::steady_clock::now();
  const Buffer scratch = Buffer::allocate(svg2_workspace_bytes(shape, base, q.dtype, stream.device));
  const Workspace ws{scratch.data(), scratch.bytes()};
  pipeline::Buffers buf;
  pipeline::carve(shape, base, q.dtype, stream.device, &ws, &buf);

  // Clusters (and the ranking they are scored by) do not depend on top-p: made once.
  BranchState state;
  state.q_centroids = Tensor(DType::F32, {B, H, config.q_clusters, D});
  state.k_centroids = Tensor(DType::F32, {B, H, config.k_clusters, D});
  Tensor mass;
  if (method == Method::Blocks) {
    label_blocks(buf.q_video_labels(), buf.q_video_clusters);
    label_blocks(buf.k_video_labels(), buf.k_video_clusters);
    // Block centroids are their members' means: one k-means update step from the positional labels.
    const TensorView qv = q.slice(2, 0, buf.video_tokens), kv = k.slice(2, 0, buf.video_tokens);
    kmeans_update(qv, buf.q_video_labels(), state.q_centroids.view(), buf.q_sizes, stream, buf.op_scratch);
    kmeans_update(kv, buf.k_video_labels(), state.k_centroids.view(), buf.k_sizes, stream, buf.op_scratch);
  } else {
    pipeline::cluster(q, k, base, state.views(), true, buf, buf.q_sizes, buf.k_sizes, stream);
    if (method == Method::Oracle) mass = true_cluster_mass(q, k, *dense, base, buf, threads);
  }
  pipeline::probe(k, v, base, state.views(), buf.q_sizes, buf.k_sizes, buf, stream);
  const double shared_seconds = seconds_since(start);
  const auto steps = static_cast<int64_t>(points.size()) + 1;
  if (progress) progress(1, steps);

  std::vector<MethodResult> results;
  for (const SweepPoint& point : points) {
    const auto t0 = std::chrono::steady_clock::now();
    const Config c = point_config(point);
    MethodResult r = empty_result(method, shape);
    if (method == Method::Oracle && c.density > 0.0f) {
      select_top_p_at_density(mass.view(), buf.q_sizes, buf.k_sizes, c.density, c.min_kept_clusters(), buf.video_mask(),
                              stream, buf.op_scratch);
    } else if (method == Method::Oracle) {
      select_top_p(mass.view(), c.top_p, c.min_kept_clusters(), buf.video_mask(), stream);
    } else {
      pipeline::select(c, state.views(), buf.q_sizes, buf.k_sizes, buf, stream);
    }
    pipeline::attend_clusters(q, k, v, c, state.views(), buf.k_sizes, buf, outputs_of(r), stream);
    r.q_labels = copy_of(buf.q_labels);
    r.k_labels = copy_of(buf.k_labels);
    r.mask = copy_of(buf.mask);
    r.seconds = shared_seconds + seconds_since(t0);
    results.push_back(std::move(r));
    if (progress) progress(static_cast<int64_t>(results.size()) + 1, steps);
  }
  return results;
}

}  // namespace sapattn::eval
