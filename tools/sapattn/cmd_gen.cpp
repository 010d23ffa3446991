// sapattn gen: writes a synthetic video-attention workload to disk.
#include <fstream>
#include <iostream>

#include "commands.hpp"
#include "progress.hpp"
#include "sapattn/io.hpp"
#include "sapattn/workload.hpp"
#include "workload_json.hpp"

namespace sapattn::cli {

namespace {

DType parse_dtype(const std::string& s) { return s == "f32" ? DType::F32 : s == "f16" ? DType::F16 : DType::BF16; }

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path);
  f << text;
  SAPATTN_CHECK(f.good(), IoError, "cannot write ", path);
}

}  // namespace

int run_gen(int argc, char** argv) {
  std::string names;
  for (const std::string& n : workload::preset_names()) names += (names.empty() ? "" : ", ") + n;
  Args args(
      "gen",
      "Writes a synthetic video-attention workload (Q, K, V as [B,H,S,D]) and a JSON description.\n"
      "Presets: " +
          names + ".",
      {{"preset", "NAME", "workload preset", ""},
       {"out", "DIR", "output folder (created if missing)", ""},
       {"seed", "S", "scene and projection seed", "0"},
       {"dtype", "T", "bf16, f16 or f32", "bf16"},
       {"format", "F", "safetensors (q, k, v in workload.safetensors) or npy (q.npy, k.npy, v.npy)", "safetensors"},
       {"threads", "N", "CPU threads", "all cores"}});
  if (!args.parse(argc, argv)) return 0;
  const workload::Preset preset = workload::preset(args.require("preset"));
  const std::string out = args.require("out");
  const uint64_t seed = static_cast<uint64_t>(args.get_int("seed", 0, 0, INT64_MAX));
  const std::string dtype_name = args.get_choice("dtype", "bf16", {"bf16", "f16", "f32"});
  const std::string format = args.get_choice("format", "safetensors", {"safetensors", "npy"});
  SAPATTN_CHECK(!(format == "npy" && dtype_name == "bf16"), UsageError,
                ".npy has no bf16; use --dtype f16/f32 or --format safetensors");
  const int threads = static_cast<int>(args.get_int("threads", 0, 0, 4096));

  make_output_folder(out);

  const workload::Workload w = generate_workload(preset, seed, parse_dtype(dtype_name), threads);
  {
    Progress progress("writing " + format);
    if (format == "safetensors") {
      io::write_safetensors(out + "/workload.safetensors", {{"q", w.q.view()}, {"k", w.k.view()}, {"v", w.v.view()}});
    } else {
      io::write_npy(out + "/q.npy", w.q.view());
      io::write_npy(out + "/k.npy", w.k.view());
      io::write_npy(out + "/v.npy", w.v.view());
    }
  }
  double mass = 0.0;
  {
    Progress progress("calibration check");
    mass = workload::top_fraction_mass(w.q.view(), w.k.view(), 0.13, 64, seed, 0.0f, threads);
  }
  write_text(out + "/workload.json", workload_json(w, seed, dtype_name, mass));
  const auto& s = w.q.shape();
  std::cout << "wrote " << preset.name << " [" << s[0] << "," << s[1] << "," << s[2] << "," << s[3] << "] "
            << dtype_name << " to " << out << " (" << (format == "safetensors" ? "workload.safetensors" : "q/k/v.npy")
            << ", workload.json)\n"
            << "top 13% of keys hold " << mass << " of the attention mass on average (64 sampled queries per head)\n";
  return 0;
}

}  // namespace sapattn::cli
