// sapattn demo: the main job. Generates a small video workload, compares dense, sap, blocks and
// oracle attention, sweeps top-p for the density / error trade-off, and writes three pictures.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <numeric>
#include <optional>
#include <sstream>

#include "commands.hpp"
#include "progress.hpp"
#include "render/pair_grid.hpp"
#include "render/plot.hpp"
#include "render/png.hpp"
#include "sapattn/workload.hpp"

namespace sapattn::cli {

namespace {

constexpr int kZoom = 8;  // latent token -> 8x8 pixels (a VAE's spatial factor)

// Paints one latent frame of the scene with a cluster colour per token, and darkens the borders
// between clusters so that regions read as shapes.
render::Image paint_frame(const workload::Workload& w, int64_t t, const int32_t* labels) {
  const int64_t Hl = w.preset.height, Wl = w.preset.width;
  render::Image img(static_cast<int>(Wl * kZoom), static_cast<int>(Hl * kZoom));
  const uint8_t* rgb = w.frames_rgb.data_as<uint8_t>() + t * Hl * Wl * 3;  // batch item 0
  for (int64_t y = 0; y < Hl; ++y) {
    for (int64_t x = 0; x < Wl; ++x) {
      const int64_t tok = (t * Hl + y) * Wl + x;
      const uint8_t* p = rgb + (y * Wl + x) * 3;
      img.fill_rect(static_cast<int>(x * kZoom), static_cast<int>(y * kZoom), kZoom, kZoom, {p[0], p[1], p[2]});
      if (labels == nullptr) continue;
      img.blend_rect(static_cast<int>(x * kZoom), static_cast<int>(y * kZoom), kZoom, kZoom,
                     render::category_color(labels[tok]), 0.6f);
      const bool right = x + 1 < Wl && labels[tok + 1] != labels[tok];
      const bool down = y + 1 < Hl && labels[tok + Wl] != labels[tok];
      if (right)
        img.fill_rect(static_cast<int>((x + 1) * kZoom - 1), static_cast<int>(y * kZoom), 1, kZoom, render::kBlack);
      if (down)
        img.fill_rect(static_cast<int>(x * kZoom), static_cast<int>((y + 1) * kZoom - 1), kZoom, 1, render::kBlack);
    }
  }
  return img;
}

// Rows: the scene, SAP's query clusters, positional blocks; columns: four frames.
render::Image clusters_picture(const workload::Workload& w, int64_t head, const eval::MethodResult& sap,
                               const eval::MethodResult& blocks, const Config& config) {
  const int64_t T = w.preset.frames, S = w.q.shape()[2];
  const std::vector<int64_t> frames = {0, T / 3, (2 * T) / 3, T - 1};
  const int fw = static_cast<int>(w.preset.width * kZoom), fh = static_cast<int>(w.preset.height * kZoom);
  const int left = 110, top = 40, gap = 10, row_h = fh + 30;
  render::Image img(left + 4 * (fw + gap), top + 3 * row_h + 10);
  img.draw_text(10, 10,
                "Query clusters of head " + std::to_string(head) + " (" +
                    std::string(workload::head_kind_name(w.head_kinds[head])) +
                    "), Cq=" + std::to_string(config.q_clusters),
                render::kBlack, 2);
  const int32_t* rows[3] = {nullptr, sap.q_labels.data_as<int32_t>() + head * S,
                            blocks.q_labels.data_as<int32_t>() + head * S};
  const char* names[3] = {"scene", "sap", "blocks"};
  for (int r = 0; r < 3; ++r) {
    const int y = top + r * row_h + 20;
    img.draw_text(10, y + fh / 2 - 7, names[r], render::kBlack, 2);
    for (size_t c = 0; c < frames.size(); ++c) {
      const int x = left + static_cast<int>(c) * (fw + gap);
      if (r == 0) img.draw_text(x, y - 18, "frame " + std::to_string(frames[c]), render::kBlack, 2);
      img.blit(paint_frame(w, frames[c], rows[r]), x, y);
    }
  }
  return img;
}

// The kept query-key pairs of one head, in the original token order (left) and in cluster order
// (right), where kept blocks are contiguous; each cell is the share of its pairs that are kept.
// Cells hold whole latent rows (row_tokens, the frame width, or a multiple of it): in token order a
// cluster's tokens recur once per row, and cells of a fractional number of rows caught that period
// at drifting phases, which drew moire.
render::Image mask_picture(const eval::MethodResult& r, int64_t head, int64_t row_tokens, const std::string& title) {
  constexpr int64_t kMaxCells = 200;
  constexpr int kPanelPixels = 400;
  const int64_t S = r.out.shape()[2];
  const int64_t Cq = r.mask.shape()[2], Ck = r.mask.shape()[3];
  const int32_t* ql = r.q_labels.data_as<int32_t>() + head * S;
  const int32_t* kl = r.k_labels.data_as<int32_t>() + head * S;
  const uint8_t* mask = r.mask.data_as<uint8_t>() + head * Cq * Ck;
  // Position of each token in cluster order (a stable sort by label, as cluster_permutation does).
  auto rank_of = [&](const int32_t* labels) {
    std::vector<int64_t> order(S), rank(S);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return labels[a] < labels[b]; });
    for (int64_t j = 0; j < S; ++j) rank[order[j]] = j;
    return rank;
  };
  std::vector<int64_t> token_order(S);
  std::iota(token_order.begin(), token_order.end(), 0);
  const std::vector<int64_t> q_rank = rank_of(ql), k_rank = rank_of(kl);
  const int64_t per_cell = row_tokens * ((S + row_tokens * kMaxCells - 1) / (row_tokens * kMaxCells));

  const auto panel = [&](const std::vector<int64_t>& q_pos, const std::vector<int64_t>& k_pos, const char* order,
                         bool colorbar) {
    const render::PairGrid grid = render::kept_pair_grid(S, ql, kl, mask, Ck, q_pos.data(), k_pos.data(), per_cell);
    render::MatrixChart chart;
    chart.title = order;
    chart.x_label = "key token";
    chart.y_label = "query token";
    chart.values = grid.share;
    chart.rows = chart.cols = grid.cells;
    chart.x_extent = chart.y_extent = static_cast<double>(grid.cells * per_cell);
    chart.colorbar = colorbar;
    chart.colorbar_label = "share of pairs kept";
    return chart.render(std::max<int>(1, kPanelPixels / static_cast<int>(grid.cells)));
  };
  const render::Image left = panel(token_order, token_order, "token order (frame by frame)", false);
  const render::Image right = panel(q_rank, k_rank, "cluster order", true);
  render::Image img(left.width() + right.width(), std::max(left.height(), right.height()) + 40);
  img.draw_text(10, 10, title + ", " + std::to_string(per_cell) + " tokens per cell", render::kBlack, 2);
  img.blit(left, 0, 40);
  img.blit(right, left.width(), 40);
  return img;
}

// Mean metrics at `density`, linearly interpolated between the two sweep points around it
// (sweep points ordered by top-p have non-decreasing density); nothing if it is out of range.
std::optional<eval::HeadMetrics> at_density(const std::vector<eval::Metrics>& sweep, double density) {
  for (size_t i = 0; i + 1 < sweep.size(); ++i) {
    const eval::HeadMetrics &lo = sweep[i].mean, &hi = sweep[i + 1].mean;
    if (density < lo.density || density > hi.density) continue;
    const double t = hi.density > lo.density ? (density - lo.density) / (hi.density - lo.density) : 0.0;
    eval::HeadMetrics h = lo;
    h.density = density;
    h.recall = lo.recall + t * (hi.recall - lo.recall);
    h.rel_l2 = lo.rel_l2 + t * (hi.rel_l2 - lo.rel_l2);
    h.cosine = lo.cosine + t * (hi.cosine - lo.cosine);
    return h;
  }
  return std::nullopt;
}

}  // namespace

int run_demo(int argc, char** argv) {
  std::vector<Option> options = {{"out", "DIR", "folder for the pictures and summary", "out/demo"},
                                 {"preset", "NAME", "workload preset", "tiny"}};
  for (Option& o : svg2_options()) options.push_back(o);
  Args args("demo",
            "Generates a small synthetic video workload, runs dense, sap (SVG2), blocks (positional clusters),\n"
            "oracle, sap+c (SVG2 with centroid compensation) and ear (SVG-EAR) attention, prints density /\n"
            "recall / error / time, sweeps top-p, and writes clusters.png, mask.png and pareto.png to the\n"
            "output folder.",
            options);
  if (!args.parse(argc, argv)) return 0;
  const std::string out = args.get("out", "out/demo");
  const workload::Preset preset = workload::preset(args.get("preset", "tiny"));
  SAPATTN_CHECK(preset.video_tokens() <= 20000, UsageError, "preset ", preset.name, " has ", preset.video_tokens(),
                " tokens; the CPU demo takes presets up to 20,000 (use sapattn eval)");
  const int threads = threads_from(args);
  Config config = config_from(args, preset.video_tokens());
  check_cluster_counts(args, config, preset.video_tokens());
  config.text_tokens = preset.text_tokens;
  config.prompt_length = preset.prompt_length;
  std::error_code ec;
  std::filesystem::create_directories(out, ec);
  SAPATTN_CHECK(!ec, IoError, "cannot create ", out, ": ", ec.message());

  workload::Workload w;
  {
    Progress progress("generating " + preset.name);
    w = workload::generate(
        preset, config.seed, DType::BF16, [&](int64_t done, int64_t total) { progress.update(done, total); }, threads);
  }
  const TensorView q = w.q.view(), k = w.k.view(), v = w.v.view();

  // Each sparse method clusters once and is then run at every top-p of the sweep; the table row
  // is the run at the configured top-p.
  // Low top-p values too: positional blocks reach SVG2's densities only there.
  std::vector<float> sweep = {0.1f, 0.2f, 0.3f, 0.5f, 0.7f, 0.8f, 0.9f, 0.95f, 0.98f};
  if (std::find(sweep.begin(), sweep.end(), config.top_p) == sweep.end()) sweep.push_back(config.top_p);
  std::sort(sweep.begin(), sweep.end());
  const size_t at_p = static_cast<size_t>(std::find(sweep.begin(), sweep.end(), config.top_p) - sweep.begin());
  struct Variant {
    eval::Method method;
    bool compensate;
    const char* name;
    render::Marker marker;
  };
  const Variant methods[] = {{eval::Method::Sap, false, "sap", render::Marker::kCircle},
                             {eval::Method::Blocks, false, "blocks", render::Marker::kSquare},
                             {eval::Method::Oracle, false, "oracle", render::Marker::kTriangle},
                             {eval::Method::Sap, true, "sap+c", render::Marker::kDiamond},
                             {eval::Method::Ear, false, "ear", render::Marker::kNone}};
  constexpr int kMethods = sizeof(methods) / sizeof(methods[0]);
  eval::MethodResult dense;
  std::vector<eval::MethodResult> runs[kMethods];
  {
    Progress progress("dense, sap, blocks, oracle, sap+c, ear");
    dense = eval::run_method(eval::Method::Dense, q, k, v, config, nullptr, threads);
    for (int m = 0; m < kMethods; ++m) {
      progress.update(m + 1, kMethods + 1);
      Config c = config;
      c.compensate = methods[m].compensate;
      runs[m] = eval::run_sweep(methods[m].method, q, k, v, c, sweep, &dense, threads);
    }
  }
  std::vector<Row> rows = {{"dense", eval::compare(dense, dense), dense.seconds}};
  std::vector<render::Series> series;
  std::vector<eval::Metrics> swept[kMethods];
  for (int m = 0; m < kMethods; ++m) {
    const std::string name = methods[m].name;
    series.push_back({name, render::category_color(m), {}, methods[m].marker});
    for (const eval::MethodResult& r : runs[m]) {
      swept[m].push_back(eval::compare(r, dense));
      series.back().points.push_back({swept[m].back().mean.density, swept[m].back().mean.rel_l2});
    }
    rows.push_back({name, swept[m][at_p], runs[m][at_p].seconds});
  }
  const eval::MethodResult& sap = runs[0][at_p];
  const eval::MethodResult& blocks = runs[1][at_p];
  const std::string table = format_table(rows);

  // The first semantic head shows what k-means finds that positions do not.
  int64_t head = 0;
  for (size_t h = 0; h < w.head_kinds.size(); ++h)
    if (w.head_kinds[h] == workload::HeadKind::Semantic) {
      head = static_cast<int64_t>(h);
      break;
    }
  {
    Progress progress("pictures");
    render::write_png(out + "/clusters.png", clusters_picture(w, head, sap, blocks, config));
    const std::string mask_title = "Kept query-key pairs of sap, head " + std::to_string(head) + " (" +
                                   std::string(workload::head_kind_name(w.head_kinds[head])) + ")";
    render::write_png(out + "/mask.png", mask_picture(sap, head, w.preset.width, mask_title));
    render::LineChart chart;
    chart.title = "Density vs error, top-p swept (" + preset.name + ")";
    chart.x_label = "density (share of query-key pairs computed)";
    chart.y_label = "relative L2 error of O";
    chart.log_y = true;
    chart.series = series;
    render::write_png(out + "/pareto.png", chart.render(900, 600));
  }
  std::ostringstream summary;
  summary << "workload " << preset.name << " [" << q.shape[0] << "," << q.shape[1] << "," << q.shape[2] << ","
          << q.shape[3] << "] bf16, seed " << config.seed << "; Cq=" << config.q_clusters << " Ck=" << config.k_clusters
          << " top_p=" << config.top_p << " min_kc_ratio=" << config.min_kc_ratio
          << " kmeans_iters=" << config.kmeans_iters_init << "\n"
          << table;
  summary << "\ntop-p sweep: density / recall / rel_l2\n  top_p ";
  for (const render::Series& s : series) summary << "  " << std::setw(24) << std::left << s.name;
  summary << "\n" << std::fixed << std::setprecision(4);
  for (size_t i = 0; i < sweep.size(); ++i) {
    summary << "  " << std::setw(5) << sweep[i] << " ";
    for (int m = 0; m < kMethods; ++m) {
      const eval::HeadMetrics& h = swept[m][i].mean;
      summary << "  " << h.density << " / " << h.recall << " / " << h.rel_l2;
    }
    summary << "\n";
  }
  // At equal top-p the methods keep very different densities (blocks' centroids average unlike
  // tokens, so their estimate is flat and top-p keeps many blocks): compare at equal density.
  const double target = swept[0][at_p].mean.density;
  summary << "\nat sap's density " << target << " (top-p " << config.top_p
          << "), interpolated along each method's sweep:\n";
  for (int m = 0; m < kMethods; ++m) {
    const std::optional<eval::HeadMetrics> h = at_density(swept[m], target);
    summary << "  " << std::setw(7) << std::left << methods[m].name;
    if (h) {
      summary << " recall " << h->recall << "  rel_l2 " << h->rel_l2 << "  cosine " << h->cosine << "\n";
    } else {
      summary << " does not reach this density within its sweep\n";
    }
  }
  std::ofstream(out + "/summary.txt") << summary.str();
  std::cout << summary.str() << "\nwrote " << out << "/clusters.png, mask.png, pareto.png, summary.txt\n";
  return 0;
}

}  // namespace sapattn::cli
