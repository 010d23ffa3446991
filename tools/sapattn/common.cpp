#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <sstream>
#include <string>
#include <system_error>
#include <utility>

#include "commands.hpp"
#include "progress.hpp"

namespace sapattn::cli {

std::vector<Option> svg2_options() {
  return {
      {"q-clusters", "N", "query clusters (k-means over video-token queries)", "300, or 1 per 252 video tokens"},
      {"k-clusters", "N", "key clusters (k-means over video-token keys)", "1000, or 1 per 75.6 video tokens"},
      {"top-p", "P", "per query cluster, keep key clusters until this share of estimated mass (eval: P,P,...)", "0.9"},
      {"min-kc-ratio", "R", "always keep the top floor(R * key clusters) key clusters", "0.1"},
      {"kmeans-seeding", "NAME",
       "first call's k-means start: greedy_pp (greedy k-means++ on 2C sampled tokens) or sample (C sampled tokens, "
       "SVG2's official start, with --kmeans-iters 50)",
       "greedy_pp"},
      {"kmeans-iters", "N", "k-means iterations (first call, after the seeding)",
       std::to_string(Config{}.kmeans_iters_init)},
      {"kmeans-candidates", "M",
       "after the first two k-means iterations, assign each token among its cluster's M nearest centroids only "
       "(0: all; docs/cuda.md, \"Candidate assignment\")",
       "0"},
      {"seed", "S", "seed of the initial centroid sample", "0"},
      {"attention-dtype", "T",
       "native (the inputs' precision) or fp8_e4m3 (Q K^T and P V in FP8 E4M3, emulated on the CPU; docs/fp8.md)",
       "native"},
      {"threads", "N", "CPU threads", "all cores"},
  };
}

Config config_from(const Args& args, int64_t video_tokens) {
  Config c;
  const auto per = [&](double tokens_per_cluster, int64_t cap) {
    return std::clamp<int64_t>(static_cast<int64_t>(std::ceil(video_tokens / tokens_per_cluster)), 1, cap);
  };
  c.q_clusters = static_cast<int>(args.get_int("q-clusters", per(252.0, 300), 1, 1 << 20));
  c.k_clusters = static_cast<int>(args.get_int("k-clusters", per(75.6, 1000), 1, 1 << 20));
  c.top_p = static_cast<float>(args.get_doubles("top-p", 0.9, 1e-6, 1.0).front());
  c.min_kc_ratio = static_cast<float>(args.get_double("min-kc-ratio", 0.1, 0.0, 1.0));
  c.kmeans_seeding = args.get_choice("kmeans-seeding", "greedy_pp", {"greedy_pp", "sample"}) == "sample"
                         ? KMeansSeeding::Sample
                         : KMeansSeeding::GreedyPP;
  c.kmeans_iters_init = static_cast<int>(args.get_int("kmeans-iters", c.kmeans_iters_init, 0, 100000));
  c.kmeans_candidates = static_cast<int>(args.get_int("kmeans-candidates", 0, 0, 1 << 20));
  c.seed = static_cast<uint64_t>(args.get_int("seed", 0, 0, INT64_MAX));
  c.attention_dtype = args.get_choice("attention-dtype", "native", {"native", "fp8_e4m3"}) == "fp8_e4m3"
                          ? AttentionDType::E4M3
                          : AttentionDType::Native;
  return c;
}

void check_cluster_counts(const Args& args, const Config& config, int64_t video_tokens) {
  // The defaults never exceed a non-empty input; an empty one is the engine's to report.
  if (video_tokens < 1) return;
  for (const auto& [option, count] : {std::pair{"q-clusters", config.q_clusters}, {"k-clusters", config.k_clusters}})
    SAPATTN_CHECK(!args.has(option) || count <= video_tokens, UsageError, "--", option, " ", count, " exceeds the ",
                  video_tokens,
                  " video tokens of the input: a cluster needs at least one token (leave it out for the default)");
}

int threads_from(const Args& args) { return static_cast<int>(args.get_int("threads", 0, 0, 4096)); }

void make_output_folder(const std::string& out) {
  std::error_code ec;
  std::filesystem::create_directories(out, ec);
  SAPATTN_CHECK(!ec, IoError, "cannot create ", out, ": ", ec.message());
}

workload::Workload generate_workload(const workload::Preset& preset, uint64_t seed, DType dtype, int threads) {
  Progress progress("generating " + preset.name);
  return workload::generate(
      preset, seed, dtype, [&](int64_t done, int64_t total) { progress.update(done, total); }, threads);
}

std::string format_table(const std::vector<Row>& rows) {
  std::ostringstream os;
  char line[160];
  std::snprintf(line, sizeof line, "%-8s %9s %9s %9s %9s %10s\n", "method", "density", "recall", "rel_l2", "cosine",
                "time");
  os << line;
  for (const Row& r : rows) {
    const auto& m = r.metrics.mean;
    std::snprintf(line, sizeof line, "%-8s %9.4f %9.4f %9.4f %9.5f %8.2f s\n", r.method.c_str(), m.density, m.recall,
                  m.rel_l2, m.cosine, r.seconds);
    os << line;
  }
  return os.str();
}

std::string json_number(double x) {
  if (!std::isfinite(x)) return "null";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", x);
  return buf;
}

}  // namespace sapattn::cli
