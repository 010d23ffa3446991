// The sapattn subcommands and what they share: SVG2 options, the output folder and the generated
// workload, the metrics table and JSON output.
#pragma once

#include <string>
#include <vector>

#include "cli_args.hpp"
#include "sapattn/config.hpp"
#include "sapattn/eval.hpp"
#include "sapattn/workload.hpp"

namespace sapattn::cli {

int run_demo(int argc, char** argv);
int run_eval(int argc, char** argv);
int run_gen(int argc, char** argv);

// --q-clusters, --k-clusters, --top-p, --min-kc-ratio, --kmeans-seeding, --kmeans-iters, --seed,
// --attention-dtype, --threads.
std::vector<Option> svg2_options();

// The config the SVG2 options ask for. Cluster counts default to the official Wan 720p ones (300
// query, 1000 key clusters for 75,600 tokens); a shorter sequence gets the same tokens per cluster
// (one query cluster per 252 video tokens, one key cluster per 75.6), so small inputs are not cut
// into clusters of a handful of tokens.
Config config_from(const Args& args, int64_t video_tokens);
// UsageError naming --q-clusters or --k-clusters when the count given exceeds the video tokens (the
// engine refuses it too, in its own names).
void check_cluster_counts(const Args& args, const Config& config, int64_t video_tokens);
int threads_from(const Args& args);

// Creates the folder `out` and its parents; IoError naming it when that fails.
void make_output_folder(const std::string& out);
// The preset's workload from `seed` in `dtype`, with a progress line on stderr.
workload::Workload generate_workload(const workload::Preset& preset, uint64_t seed, DType dtype, int threads);

// One row of the methods table.
struct Row {
  std::string method;
  eval::Metrics metrics;
  double seconds;
};
std::string format_table(const std::vector<Row>& rows);

// A JSON number literal (non-finite values become null). Strings are quoted with
// io::detail::json_quote, the escaper of the safetensors writer.
std::string json_number(double x);

}  // namespace sapattn::cli
