// sapattn eval: one method on the user's own Q, K, V, measured against dense attention.
#include <unistd.h>

#include <algorithm>
#include <iostream>
#include <optional>
#include <sstream>

#include "commands.hpp"
#include "io/json.hpp"
#include "progress.hpp"
#include "sapattn/io.hpp"
#include "sapattn/svg2.hpp"
#include "workload_json.hpp"

namespace sapattn::cli {

namespace {

// Loads tensor `name` from `path` and views it as [B,H,S,D] according to the file's layout.
TensorView load_view(const std::string& path, const std::string& name, bool bshd, Tensor& storage) {
  storage = io::read_tensor(path, name);
  const auto& s = storage.shape();
  SAPATTN_CHECK(s.size() == 4, ShapeError, name, " from ", path, " must have rank 4 (",
                bshd ? "[B,S,H,D]" : "[B,H,S,D]", "), got rank ", s.size());
  return bshd ? TensorView::bshd(storage.data(), storage.dtype(), s[0], s[2], s[1], s[3]) : storage.view();
}

// An FP8 row's error against the native sparse output of the same selection.
struct NativeComparison {
  std::string fp8;        // fp8_options_name
  eval::Metrics metrics;  // compare(fp8 result, native sparse result)
};

std::string metrics_json(const std::string& method, const eval::Metrics& m, const Config& c, const TensorView& q,
                         double seconds, double dense_seconds, const NativeComparison* native = nullptr) {
  std::ostringstream os;
  os << "{\"method\": " << io::detail::json_quote(method);
  if (native != nullptr) {
    double worst = 0.0;
    for (const eval::HeadMetrics& h : native->metrics.per_head) worst = std::max(worst, h.rel_l2);
    os << ", \"fp8\": " << io::detail::json_quote(native->fp8)
       << ", \"rel_l2_native\": " << json_number(native->metrics.mean.rel_l2)
       << ", \"rel_l2_native_max\": " << json_number(worst)
       << ", \"cosine_native\": " << json_number(native->metrics.mean.cosine)
       << ", \"recall_native\": " << json_number(native->metrics.mean.recall);
  }
  os << ", \"density\": " << json_number(m.mean.density) << ", \"recall\": " << json_number(m.mean.recall)
     << ", \"rel_l2\": " << json_number(m.mean.rel_l2) << ", \"cosine\": " << json_number(m.mean.cosine)
     << ", \"seconds\": " << json_number(seconds) << ", \"dense_seconds\": " << json_number(dense_seconds)
     << ", \"shape\": [" << q.shape[0] << ", " << q.shape[1] << ", " << q.shape[2] << ", " << q.shape[3]
     << "], \"config\": {\"q_clusters\": " << c.q_clusters << ", \"k_clusters\": " << c.k_clusters
     << ", \"top_p\": " << json_number(c.top_p) << ", \"min_kc_ratio\": " << json_number(c.min_kc_ratio)
     << ", \"kmeans_seeding\": " << (c.kmeans_seeding == KMeansSeeding::Sample ? "\"sample\"" : "\"greedy_pp\"")
     << ", \"kmeans_iters\": " << c.kmeans_iters_init << ", \"kmeans_candidates\": " << c.kmeans_candidates
     << ", \"seed\": " << c.seed
     << ", \"text_tokens\": " << c.text_tokens << ", \"prompt_length\": " << c.prompt_length
     << ", \"compensate\": " << (c.compensate ? "true" : "false") << ", \"density\": " << json_number(c.density)
     << ", \"attention_dtype\": " << (c.attention_dtype == AttentionDType::E4M3 ? "\"fp8_e4m3\"" : "\"native\"")
     << "}, \"per_head\": [";
  for (size_t i = 0; i < m.per_head.size(); ++i) {
    const eval::HeadMetrics& h = m.per_head[i];
    os << (i ? ", " : "") << "{\"batch\": " << h.batch << ", \"head\": " << h.head
       << ", \"density\": " << json_number(h.density) << ", \"recall\": " << json_number(h.recall)
       << ", \"rel_l2\": " << json_number(h.rel_l2) << ", \"cosine\": " << json_number(h.cosine);
    if (native != nullptr) os << ", \"rel_l2_native\": " << json_number(native->metrics.per_head[i].rel_l2);
    os << "}";
  }
  os << "]}\n";
  return os.str();
}

// The expected cost of each step of a run, in multiply-adds per head, from which the progress line
// estimates the time left: dense attention 2 * S^2 * D; a method's clusters the k-means
// assignments, iters * (Cq + Ck) * S * D, and the greedy seeding's T * min(S, factor * C) * C * D per
// tensor (positional blocks need none), plus one more pass over all pairs for the oracle's true
// mass; a budget its share of the pairs (the density asked for, else 0.25, a guess for top-p).
struct WorkModel {
  double S, D;
  const Config& config;
  double dense() const { return 2.0 * S * S * D; }
  double clusters(eval::Method m) const {
    if (m == eval::Method::Blocks) return S * D;
    double kmeans = config.kmeans_iters_init * static_cast<double>(config.q_clusters + config.k_clusters) * S * D;
    if (config.kmeans_seeding == KMeansSeeding::GreedyPP)
      for (const double C : {static_cast<double>(config.q_clusters), static_cast<double>(config.k_clusters)})
        kmeans += kmeans_greedy_trials(static_cast<int64_t>(C)) * std::min(S, config.kmeans_sample_factor * C) * C * D;
    return m == eval::Method::Oracle ? kmeans + dense() : kmeans;
  }
  double budget(const eval::SweepPoint& point) const { return dense() * (point.density > 0.0f ? point.density : 0.25); }
};

}  // namespace

int run_eval(int argc, char** argv) {
  std::vector<Option> options = {
      {"in", "FILE", "a .safetensors file holding tensors q, k and v", ""},
      {"q", "FILE", "queries (.npy, or .safetensors with a tensor 'q')", ""},
      {"k", "FILE", "keys (.npy, or .safetensors with a tensor 'k')", ""},
      {"v", "FILE", "values (.npy, or .safetensors with a tensor 'v')", ""},
      {"layout", "L", "bhsd ([B,H,S,D]) or bshd ([B,S,H,D], diffusers)", "workload.json's, else bhsd"},
      {"method", "M[,M...]", "sap, blocks, oracle, ear (SVG-EAR, docs/ear.md), ear-plus or dense", "sap"},
      {"compensate", "", "sap, blocks, oracle: skipped key clusters count through their centroids", ""},
      {"ear-spread", "", "ear: compensation logits gain the key spread seen from the query centroid", ""},
      {"ear-pair-values", "", "ear: compensation values weighted by attention from the query centroid", ""},
      {"ear-head-budget", "", "ear: one area budget per head, pairs ranked by normalised error per area", ""},
      {"ear-split", "", "ear: compensation through two sub-centroids per key cluster", ""},
      {"density", "D[,D...]",
       "instead of top-p: per head, the top-p whose selection computes this share of\n"
       "                               the video query-key pairs (EAR: its budget)",
       ""},
      {"text-tokens", "N", "trailing text tokens of a joint sequence (HunyuanVideo)", "workload.json's, else 0"},
      {"prompt-length", "N", "real prompt tokens at the start of the text; the rest is padding",
       "workload.json's, else 0"},
      {"fp8", "SPEC[,SPEC...]",
       "sap, blocks, oracle: run each result's selection again with the FP8 attention,\n"
       "                               one row per spec, with its error against that native sparse output\n"
       "                               (spec fields in docs/fp8.md; the defaults: q128:khead:vch:smooth:p448:sumq)",
       ""},
      {"json", "", "print one JSON object instead of the table", ""},
      {"progress", "", "show progress on stderr, one line per step, also when it is not a terminal", "on a terminal"},
  };
  for (Option& o : svg2_options()) options.push_back(o);
  Args args("eval",
            "Runs one attention method on your Q, K, V and measures it against dense attention: density (share\n"
            "of query-key pairs computed), recall (share of the dense attention mass kept), relative L2 error\n"
            "and cosine similarity of the output; means over heads, and per head with --json. Lists of\n"
            "methods and top-p values run every pair against one dense reference, clustering once per\n"
            "method (--json then prints one object per line). A workload.json beside the input (as\n"
            "sapattn gen writes) gives the defaults of --layout, --text-tokens and --prompt-length.",
            options);
  if (!args.parse(argc, argv)) return 0;
  const bool have_in = args.has("in");
  SAPATTN_CHECK(have_in != (args.has("q") || args.has("k") || args.has("v")), UsageError,
                "give either --in FILE or all of --q, --k, --v");
  const std::string qp = have_in ? args.get("in", "") : args.require("q");
  const std::string kp = have_in ? args.get("in", "") : args.require("k");
  const std::string vp = have_in ? args.get("in", "") : args.require("v");
  // A generated workload's description gives the layout and the text tokens unless told otherwise.
  const std::optional<WorkloadJson> described = read_workload_json_beside(qp);
  const bool bshd = args.get_choice("layout", described ? described->layout : "bhsd", {"bhsd", "bshd"}) == "bshd";
  std::vector<eval::Method> methods;
  for (const std::string& name :
       args.get_choices("method", "sap", {"sap", "blocks", "oracle", "ear", "ear-plus", "dense"}))
    methods.push_back(eval::parse_method(name));
  const bool json = args.flag("json");
  // Progress goes to stderr: on a terminal, when asked, or as the step lines of a run without --json.
  const bool asked = args.flag("progress");
  const bool show_progress = asked || !json || isatty(STDERR_FILENO) != 0;
  // The budgets of the sweep: densities when given, else top-p values.
  const bool by_density = args.has("density");
  const std::vector<double> budgets =
      by_density ? args.get_doubles("density", 0.0, 1e-6, 1.0) : args.get_doubles("top-p", 0.9, 1e-6, 1.0);
  const int threads = threads_from(args);
  config_from(args, 1);  // checks the SVG2 options now, before a load that may take a while
  std::vector<Fp8Options> fp8_specs;
  for (std::string rest = args.get("fp8", ""); !rest.empty();) {
    const size_t comma = rest.find(',');
    try {
      fp8_specs.push_back(eval::parse_fp8_options(rest.substr(0, comma)));
    } catch (const InvalidArgumentError& e) {
      throw UsageError(std::string("--fp8: ") + e.what(), __FILE__, __LINE__);
    }
    rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
  }
  for (const eval::Method m : methods)
    SAPATTN_CHECK(fp8_specs.empty() || m == eval::Method::Sap || m == eval::Method::Blocks ||
                      m == eval::Method::Oracle || m == eval::Method::Dense,
                  UsageError, "--fp8 compares the attention of sap, blocks or oracle; not ", eval::method_name(m));
  SAPATTN_CHECK(fp8_specs.empty() || !args.flag("compensate"), UsageError,
                "--fp8 compares the attention alone: leave out --compensate");

  Tensor qs, ks, vs;
  TensorView q, k, v;
  {
    Progress progress("loading tensors", show_progress);
    q = load_view(qp, "q", bshd, qs);
    k = load_view(kp, "k", bshd, ks);
    v = load_view(vp, "v", bshd, vs);
  }
  // The description is of these tensors only if it has their shape.
  const bool use_description =
      described && described->shape == qs.shape() && !args.has("text-tokens") && !args.has("prompt-length");
  if (described && described->shape != qs.shape() && !json)
    std::cerr << "note: " << described->path << " describes tensors of another shape; not used\n";
  const int64_t S = q.shape[2];
  const int64_t text = args.get_int("text-tokens", use_description ? described->text_tokens : 0, 0, S - 1);
  Config config = config_from(args, S - text);
  check_cluster_counts(args, config, S - text);
  config.text_tokens = text;
  config.prompt_length = args.get_int("prompt-length", use_description ? described->prompt_length : 0, 0, text);
  config.compensate = args.flag("compensate");
  // The ear-plus ideas one at a time, on top of ear (ear-plus turns its winners on itself).
  const bool ear_spread = args.flag("ear-spread"), ear_pair_values = args.flag("ear-pair-values"),
             ear_head_budget = args.flag("ear-head-budget"), ear_split = args.flag("ear-split");
  std::vector<eval::SweepPoint> points;
  for (double x : budgets)
    points.push_back(by_density ? eval::SweepPoint{config.top_p, static_cast<float>(x)}
                                : eval::SweepPoint{static_cast<float>(x), 0.0f});
  const Stream stream = Stream::cpu(threads);
  check_finite(q, "q", stream);
  check_finite(k, "k", stream);
  check_finite(v, "v", stream);

  // The methods as they run: a name for the table and each method's config.
  struct Run {
    eval::Method method;
    std::string name;
    Config config;
  };
  std::vector<Run> runs;
  for (eval::Method method : methods) {
    Run run{method, std::string(eval::method_name(method)), config};
    const bool ear_like = method == eval::Method::Ear || method == eval::Method::EarPlus;
    if (config.compensate && !ear_like && method != eval::Method::Dense) run.name += "+c";
    if (ear_like) {
      run.config.routing = Routing::ErrorAware;
      run.config.ear_spread = ear_spread;
      run.config.ear_pair_values = ear_pair_values;
      run.config.ear_head_budget = ear_head_budget;
      run.config.ear_split = ear_split;
      if (method == eval::Method::Ear) {
        if (ear_spread) run.name += "+spread";
        if (ear_pair_values) run.name += "+values";
        if (ear_head_budget) run.name += "+head";
        if (ear_split) run.name += "+split";
      }
    }
    runs.push_back(std::move(run));
  }
  const auto budget_name = [&](size_t i) { return (by_density ? " d=" : " p=") + json_number(budgets[i]); };

  // One progress line over the whole run: its steps are dense attention, then per sparse method its
  // clusters and each budget, weighted by their expected cost for the estimate of the time left.
  const WorkModel work{static_cast<double>(S), static_cast<double>(q.shape[3]), config};
  std::vector<std::pair<std::string, double>> steps = {{"dense attention", work.dense()}};
  for (const Run& run : runs) {
    if (run.method == eval::Method::Dense) continue;
    steps.emplace_back(run.name + " clusters", work.clusters(run.method));
    for (size_t i = 0; i < points.size(); ++i) steps.emplace_back(run.name + budget_name(i), work.budget(points[i]));
    for (size_t i = 0; i < points.size(); ++i)
      for (const Fp8Options& spec : fp8_specs)
        steps.emplace_back(run.name + budget_name(i) + " fp8 " + eval::fp8_options_name(spec), work.budget(points[i]));
  }
  double total_work = 0.0, done_work = 0.0;
  for (const auto& step : steps) total_work += step.second;
  size_t done_steps = 0;
  Progress progress("eval", show_progress, asked);
  const auto report = [&] {
    if (done_steps < steps.size()) progress.set_step(steps[done_steps].first);
    progress.update(static_cast<int64_t>(done_steps), static_cast<int64_t>(steps.size()), done_work / total_work);
  };
  const auto step_done = [&] {
    done_work += steps[done_steps++].second;
    report();
  };
  report();
  const eval::MethodResult dense = eval::run_method(eval::Method::Dense, q, k, v, config, nullptr, threads);
  step_done();
  std::vector<Row> rows{{"dense", eval::compare(dense, dense), dense.seconds}};
  std::vector<Row> fp8_rows;  // each FP8 row against its native sparse output
  for (const Run& run : runs) {
    if (run.method == eval::Method::Dense) {  // the reference itself, already in the table
      if (json) std::cout << metrics_json("dense", rows[0].metrics, config, q, dense.seconds, dense.seconds);
      continue;
    }
    const std::vector<eval::MethodResult> results = eval::run_sweep(run.method, q, k, v, run.config, points, &dense,
                                                                    threads, [&](int64_t, int64_t) { step_done(); });
    for (size_t i = 0; i < results.size(); ++i) {
      Config c = config;
      c.top_p = points[i].top_p;
      c.density = points[i].density;
      const eval::Metrics metrics = eval::compare(results[i], dense);
      if (json) std::cout << metrics_json(run.name, metrics, c, q, results[i].seconds, dense.seconds);
      const std::string name = points.size() > 1 || by_density ? run.name + budget_name(i) : run.name;
      rows.push_back({name, metrics, results[i].seconds});
      for (const Fp8Options& spec : fp8_specs) {
        const eval::MethodResult e4m3 = eval::run_e4m3(results[i], q, k, v, c, spec, threads);
        const NativeComparison native{eval::fp8_options_name(spec), eval::compare(e4m3, results[i])};
        const eval::Metrics to_dense = eval::compare(e4m3, dense);
        if (json) std::cout << metrics_json(run.name, to_dense, c, q, e4m3.seconds, dense.seconds, &native);
        rows.push_back({name + " fp8 " + native.fp8, to_dense, e4m3.seconds});
        fp8_rows.push_back({name + " fp8 " + native.fp8, native.metrics, e4m3.seconds});
        step_done();
      }
    }
  }
  progress.finish();
  if (!json) {
    std::cout << "[" << q.shape[0] << "," << q.shape[1] << "," << q.shape[2] << "," << q.shape[3] << "] "
              << dtype_name(q.dtype) << ", Cq=" << config.q_clusters << " Ck=" << config.k_clusters
              << " min_kc_ratio=" << config.min_kc_ratio;
    if (config.text_tokens > 0)
      std::cout << ", text_tokens=" << config.text_tokens << " prompt_length=" << config.prompt_length
                << (use_description ? " (from " + described->path + ")" : "");
    std::cout << "\n" << format_table(rows);
    if (!fp8_rows.empty())
      std::cout << "\nFP8 rows against the native sparse output of the same selection:\n" << format_table(fp8_rows);
  }
  return 0;
}

}  // namespace sapattn::cli
