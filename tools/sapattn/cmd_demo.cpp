// sapattn demo: the main job. Generates a small video workload, compares dense, sap, blocks,
// oracle, sap+c, ear and ear-plus attention, sweeps top-p and the density budget for the density /
// error trade-off, and writes three pictures and a summary.
#include <algorithm>
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
            "oracle, sap+c (SVG2 with centroid compensation), ear (SVG-EAR) and ear-plus attention, prints\n"
            "density / recall / error / time, sweeps top-p (sap, blocks, oracle) and the density budget\n"
            "(sap, sap+c, ear, ear-plus), and writes clusters.png, mask.png, pareto.png and summary.txt to\n"
            "the output folder.",
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
  make_output_folder(out);

  const workload::Workload w = generate_workload(preset, config.seed, DType::BF16, threads);
  const TensorView q = w.q.view(), k = w.k.view(), v = w.v.view();

  // Two sweeps, each method clustering once and then run at every budget of its sweep (clusters,
  // the oracle's mass and EAR's probe do not depend on the budget). Top-p compares how SVG2, blocks
  // and the oracle identify what to compute (low top-p values too: blocks reach SVG2's densities
  // only there). The density budget compares the methods that differ in what they do with a budget
  // at equal speed: sap, sap+c (SVG2 plus compensation), ear (SVG-EAR) and ear-plus. Each method's
  // table row is its run at the configured top-p, one more point of its sweep.
  std::vector<float> sweep = {0.1f, 0.2f, 0.3f, 0.5f, 0.7f, 0.8f, 0.9f, 0.95f, 0.98f};
  if (std::find(sweep.begin(), sweep.end(), config.top_p) == sweep.end()) sweep.push_back(config.top_p);
  std::sort(sweep.begin(), sweep.end());
  const size_t at_p = static_cast<size_t>(std::find(sweep.begin(), sweep.end(), config.top_p) - sweep.begin());
  // From min_kc_ratio's floor (the top 10% of key clusters, about 0.11 on tiny) to twice SVG2's own
  // density at top-p 0.9; six points keep the demo near its old time on 2 cores.
  const std::vector<float> budgets = {0.1f, 0.15f, 0.2f, 0.25f, 0.3f, 0.4f};
  struct Variant {
    eval::Method method;
    bool compensate;
    bool top_p_sweep;  // else the density sweep
    const char* name;
    render::Marker marker;
  };
  const Variant methods[] = {{eval::Method::Sap, false, true, "sap", render::Marker::kCircle},
                             {eval::Method::Blocks, false, true, "blocks", render::Marker::kSquare},
                             {eval::Method::Oracle, false, true, "oracle", render::Marker::kTriangle},
                             {eval::Method::Sap, true, false, "sap+c", render::Marker::kDiamond},
                             {eval::Method::Ear, false, false, "ear", render::Marker::kCircle},
                             {eval::Method::EarPlus, false, false, "ear-plus", render::Marker::kSquare}};
  constexpr int kMethods = sizeof(methods) / sizeof(methods[0]);
  // Points of each method's run_sweep: its sweep, then sap's density sweep (sap is on both
  // pictures) or the configured top-p (the table row of a density-swept method).
  std::vector<eval::SweepPoint> top_p_points, density_points;
  for (float p : sweep) top_p_points.push_back({p, 0.0f});
  for (float d : budgets) density_points.push_back({config.top_p, d});
  eval::MethodResult dense;
  std::vector<eval::Metrics> swept[kMethods];      // along each method's sweep
  std::vector<eval::Metrics> by_budget[kMethods];  // along the density sweep (empty for blocks, oracle)
  std::vector<Row> rows;
  std::optional<eval::MethodResult> sap, blocks;
  {
    Progress progress("dense, sap, blocks, oracle, sap+c, ear, ear-plus");
    dense = eval::run_method(eval::Method::Dense, q, k, v, config, nullptr, threads);
    rows.push_back({"dense", eval::compare(dense, dense), dense.seconds});
    for (int m = 0; m < kMethods; ++m) {
      progress.update(m + 1, kMethods + 1);
      Config c = config;
      c.compensate = methods[m].compensate;
      const bool sap_like = methods[m].method == eval::Method::Sap && !methods[m].compensate;
      std::vector<eval::SweepPoint> points = methods[m].top_p_sweep ? top_p_points : density_points;
      if (sap_like) points.insert(points.end(), density_points.begin(), density_points.end());
      if (!methods[m].top_p_sweep) points.push_back({config.top_p, 0.0f});
      std::vector<eval::MethodResult> runs = eval::run_sweep(methods[m].method, q, k, v, c, points, &dense, threads);
      std::vector<eval::Metrics> metrics;
      for (const eval::MethodResult& r : runs) metrics.push_back(eval::compare(r, dense));
      const size_t row = methods[m].top_p_sweep ? at_p : budgets.size();
      rows.push_back({methods[m].name, metrics[row], runs[row].seconds});
      if (methods[m].top_p_sweep) {
        swept[m].assign(metrics.begin(), metrics.begin() + static_cast<std::ptrdiff_t>(sweep.size()));
        if (sap_like) by_budget[m].assign(metrics.begin() + static_cast<std::ptrdiff_t>(sweep.size()), metrics.end());
      } else {
        swept[m] = by_budget[m] = std::vector<eval::Metrics>(metrics.begin(), metrics.end() - 1);
      }
      if (sap_like) sap = std::move(runs[row]);
      if (methods[m].method == eval::Method::Blocks) blocks = std::move(runs[row]);
    }
  }
  const auto curve = [&](int m, const std::vector<eval::Metrics>& along) {
    render::Series s{methods[m].name, render::category_color(m), {}, methods[m].marker};
    for (const eval::Metrics& x : along) s.points.push_back({x.mean.density, x.mean.rel_l2});
    return s;
  };
  render::LineChart by_top_p, by_density;
  by_top_p.title = "top-p swept: what to compute (" + preset.name + ")";
  by_density.title = "density budget swept: equal speed (" + preset.name + ")";
  for (render::LineChart* chart : {&by_top_p, &by_density}) {
    chart->x_label = "density (share of query-key pairs computed)";
    chart->y_label = "relative L2 error of O";
    chart->log_y = true;
  }
  for (int m = 0; m < kMethods; ++m) {
    if (methods[m].top_p_sweep) by_top_p.series.push_back(curve(m, swept[m]));
    if (!by_budget[m].empty()) by_density.series.push_back(curve(m, by_budget[m]));
  }
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
    render::write_png(out + "/clusters.png", clusters_picture(w, head, *sap, *blocks, config));
    const std::string mask_title = "Kept query-key pairs of sap, head " + std::to_string(head) + " (" +
                                   std::string(workload::head_kind_name(w.head_kinds[head])) + ")";
    render::write_png(out + "/mask.png", mask_picture(*sap, head, w.preset.width, mask_title));
    const render::Image left = by_top_p.render(900, 600), right = by_density.render(900, 600);
    render::Image pareto(left.width() + right.width(), std::max(left.height(), right.height()));
    pareto.blit(left, 0, 0);
    pareto.blit(right, left.width(), 0);
    render::write_png(out + "/pareto.png", pareto);
  }
  std::ostringstream summary;
  summary << "workload " << preset.name << " [" << q.shape[0] << "," << q.shape[1] << "," << q.shape[2] << ","
          << q.shape[3] << "] bf16, seed " << config.seed << "; Cq=" << config.q_clusters << " Ck=" << config.k_clusters
          << " top_p=" << config.top_p << " min_kc_ratio=" << config.min_kc_ratio
          << " kmeans_seeding=" << (config.kmeans_seeding == KMeansSeeding::Sample ? "sample" : "greedy_pp")
          << " kmeans_iters=" << config.kmeans_iters_init << "\n"
          << table;
  summary << "\ntop-p sweep: density / recall / rel_l2\n  top_p ";
  for (const render::Series& s : by_top_p.series) summary << "  " << std::setw(24) << std::left << s.name;
  summary << "\n" << std::fixed << std::setprecision(4);
  for (size_t i = 0; i < sweep.size(); ++i) {
    summary << "  " << std::setw(5) << sweep[i] << " ";
    for (int m = 0; m < kMethods; ++m) {
      if (!methods[m].top_p_sweep) continue;
      const eval::HeadMetrics& h = swept[m][i].mean;
      summary << "  " << h.density << " / " << h.recall << " / " << h.rel_l2;
    }
    summary << "\n";
  }
  // The compensated methods' recall counts the centroid mass too (docs/ear.md): rel_l2 compares them.
  summary << "\ndensity budget sweep (--density): density / rel_l2 (x sap's)\n  budget";
  for (const render::Series& s : by_density.series) summary << "  " << std::setw(23) << std::left << s.name;
  summary << "\n";
  for (size_t i = 0; i < budgets.size(); ++i) {
    summary << "  " << std::setw(6) << budgets[i];
    const double sap_l2 = by_budget[0][i].mean.rel_l2;
    for (int m = 0; m < kMethods; ++m) {
      if (by_budget[m].empty()) continue;
      const eval::HeadMetrics& h = by_budget[m][i].mean;
      summary << "  " << h.density << " / " << h.rel_l2 << " (" << std::setprecision(2) << h.rel_l2 / sap_l2 << "x)"
              << std::setprecision(4);
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
    summary << "  " << std::setw(8) << std::left << methods[m].name;
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
