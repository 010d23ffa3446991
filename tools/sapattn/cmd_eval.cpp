// sapattn eval: one method on the user's own Q, K, V, measured against dense attention.
#include <iostream>
#include <sstream>

#include "commands.hpp"
#include "io/json.hpp"
#include "progress.hpp"
#include "sapattn/io.hpp"
#include "sapattn/svg2.hpp"

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

std::string metrics_json(const std::string& method, const eval::Metrics& m, const Config& c, const TensorView& q,
                         double seconds, double dense_seconds) {
  std::ostringstream os;
  os << "{\"method\": " << io::detail::json_quote(method) << ", \"density\": " << json_number(m.mean.density)
     << ", \"recall\": " << json_number(m.mean.recall) << ", \"rel_l2\": " << json_number(m.mean.rel_l2)
     << ", \"cosine\": " << json_number(m.mean.cosine) << ", \"seconds\": " << json_number(seconds)
     << ", \"dense_seconds\": " << json_number(dense_seconds) << ", \"shape\": [" << q.shape[0] << ", " << q.shape[1]
     << ", " << q.shape[2] << ", " << q.shape[3] << "], \"config\": {\"q_clusters\": " << c.q_clusters
     << ", \"k_clusters\": " << c.k_clusters << ", \"top_p\": " << json_number(c.top_p)
     << ", \"min_kc_ratio\": " << json_number(c.min_kc_ratio) << ", \"kmeans_iters\": " << c.kmeans_iters_init
     << ", \"seed\": " << c.seed << ", \"text_tokens\": " << c.text_tokens << ", \"prompt_length\": " << c.prompt_length
     << ", \"compensate\": " << (c.compensate ? "true" : "false") << ", \"density\": " << json_number(c.density)
     << "}, \"per_head\": [";
  for (size_t i = 0; i < m.per_head.size(); ++i) {
    const eval::HeadMetrics& h = m.per_head[i];
    os << (i ? ", " : "") << "{\"batch\": " << h.batch << ", \"head\": " << h.head
       << ", \"density\": " << json_number(h.density) << ", \"recall\": " << json_number(h.recall)
       << ", \"rel_l2\": " << json_number(h.rel_l2) << ", \"cosine\": " << json_number(h.cosine) << "}";
  }
  os << "]}\n";
  return os.str();
}

}  // namespace

int run_eval(int argc, char** argv) {
  std::vector<Option> options = {
      {"in", "FILE", "a .safetensors file holding tensors q, k and v", ""},
      {"q", "FILE", "queries (.npy, or .safetensors with a tensor 'q')", ""},
      {"k", "FILE", "keys (.npy, or .safetensors with a tensor 'k')", ""},
      {"v", "FILE", "values (.npy, or .safetensors with a tensor 'v')", ""},
      {"layout", "L", "bhsd ([B,H,S,D]) or bshd ([B,S,H,D], diffusers)", "bhsd"},
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
      {"text-tokens", "N", "trailing text tokens of a joint sequence (HunyuanVideo)", "0"},
      {"prompt-length", "N", "real prompt tokens at the start of the text; the rest is padding", "0"},
      {"json", "", "print one JSON object instead of the table", ""},
  };
  for (Option& o : svg2_options()) options.push_back(o);
  Args args("eval",
            "Runs one attention method on your Q, K, V and measures it against dense attention: density (share\n"
            "of query-key pairs computed), recall (share of the dense attention mass kept), relative L2 error\n"
            "and cosine similarity of the output; means over heads, and per head with --json. Lists of\n"
            "methods and top-p values run every pair against one dense reference, clustering once per\n"
            "method (--json then prints one object per line).",
            options);
  if (!args.parse(argc, argv)) return 0;
  const bool have_in = args.has("in");
  SAPATTN_CHECK(have_in != (args.has("q") || args.has("k") || args.has("v")), UsageError,
                "give either --in FILE or all of --q, --k, --v");
  const std::string qp = have_in ? args.get("in", "") : args.require("q");
  const std::string kp = have_in ? args.get("in", "") : args.require("k");
  const std::string vp = have_in ? args.get("in", "") : args.require("v");
  const bool bshd = args.get_choice("layout", "bhsd", {"bhsd", "bshd"}) == "bshd";
  std::vector<eval::Method> methods;
  for (const std::string& name :
       args.get_choices("method", "sap", {"sap", "blocks", "oracle", "ear", "ear-plus", "dense"}))
    methods.push_back(eval::parse_method(name));
  const bool json = args.flag("json");
  // The budgets of the sweep: densities when given, else top-p values.
  const bool by_density = args.has("density");
  const std::vector<double> budgets =
      by_density ? args.get_doubles("density", 0.0, 1e-6, 1.0) : args.get_doubles("top-p", 0.9, 1e-6, 1.0);
  const int threads = threads_from(args);
  config_from(args, 1);  // checks the SVG2 options now, before a load that may take a while

  Tensor qs, ks, vs;
  TensorView q, k, v;
  {
    Progress progress("loading tensors", !json);
    q = load_view(qp, "q", bshd, qs);
    k = load_view(kp, "k", bshd, ks);
    v = load_view(vp, "v", bshd, vs);
  }
  const int64_t S = q.shape[2];
  const int64_t text = args.get_int("text-tokens", 0, 0, S - 1);
  Config config = config_from(args, S - text);
  check_cluster_counts(args, config, S - text);
  config.text_tokens = text;
  config.prompt_length = args.get_int("prompt-length", 0, 0, text);
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

  eval::MethodResult dense;
  {
    Progress progress("dense attention", !json);
    dense = eval::run_method(eval::Method::Dense, q, k, v, config, nullptr, threads);
  }
  std::vector<Row> rows{{"dense", eval::compare(dense, dense), dense.seconds}};
  for (eval::Method method : methods) {
    if (method == eval::Method::Dense) {  // the reference itself, already in the table
      if (json) std::cout << metrics_json("dense", rows[0].metrics, config, q, dense.seconds, dense.seconds);
      continue;
    }
    std::string name(eval::method_name(method));
    const bool ear_like = method == eval::Method::Ear || method == eval::Method::EarPlus;
    if (config.compensate && !ear_like) name += "+c";
    Config method_config = config;
    if (ear_like) {
      method_config.routing = Routing::ErrorAware;
      method_config.ear_spread = ear_spread;
      method_config.ear_pair_values = ear_pair_values;
      method_config.ear_head_budget = ear_head_budget;
      method_config.ear_split = ear_split;
      if (method == eval::Method::Ear) {
        if (ear_spread) name += "+spread";
        if (ear_pair_values) name += "+values";
        if (ear_head_budget) name += "+head";
        if (ear_split) name += "+split";
      }
    }
    std::vector<eval::MethodResult> results;
    {
      Progress progress(name, !json);
      results = eval::run_sweep(method, q, k, v, method_config, points, &dense, threads);
    }
    for (size_t i = 0; i < results.size(); ++i) {
      Config c = config;
      c.top_p = points[i].top_p;
      c.density = points[i].density;
      const eval::Metrics metrics = eval::compare(results[i], dense);
      if (json) std::cout << metrics_json(name, metrics, c, q, results[i].seconds, dense.seconds);
      const std::string budget = (by_density ? " d=" : " p=") + json_number(budgets[i]);
      rows.push_back({points.size() > 1 || by_density ? name + budget : name, metrics, results[i].seconds});
    }
  }
  if (!json) {
    std::cout << "[" << q.shape[0] << "," << q.shape[1] << "," << q.shape[2] << "," << q.shape[3] << "] "
              << dtype_name(q.dtype) << ", Cq=" << config.q_clusters << " Ck=" << config.k_clusters
              << " min_kc_ratio=" << config.min_kc_ratio << "\n"
              << format_table(rows);
  }
  return 0;
}

}  // namespace sapattn::cli
