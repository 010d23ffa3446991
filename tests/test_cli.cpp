// The sapattn executable as a user meets it: exit codes (0 ok, 2 bad usage or input), one-line
// error messages, the files it writes, and the JSON it prints.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "sapattn/io.hpp"
#include "sapattn/tensor.hpp"
#include "test_support.hpp"

namespace sapattn {
namespace {

namespace fs = std::filesystem;

struct Result {
  int code;
  std::string output;  // stdout and stderr
};

Result run(const std::string& args) {
  const std::string cmd = std::string(SAPATTN_CLI_PATH) + " " + args + " 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  EXPECT_NE(pipe, nullptr);
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, pipe)) out.append(buf, n);
  const int status = pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

// A fresh folder per test under the system temp dir.
fs::path scratch(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("sapattn_cli_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

using testing_support::random_tensor;

// The value of "key": <number> at the top level of a one-line JSON object (first occurrence).
double json_value(const std::string& json, const std::string& key) {
  const size_t at = json.find("\"" + key + "\": ");
  EXPECT_NE(at, std::string::npos) << key << " missing in " << json;
  return at == std::string::npos ? NAN : std::stod(json.substr(at + key.size() + 4));
}

void expect_one_line_error(const Result& r, const std::string& needle) {
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("error"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(needle), std::string::npos) << "expected '" << needle << "' in: " << r.output;
  EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
}

TEST(Cli, HelpAndUsage) {
  EXPECT_EQ(run("--help").code, 0);
  EXPECT_EQ(run("").code, 2);
  const Result unknown = run("frobnicate");
  EXPECT_EQ(unknown.code, 2);
  EXPECT_NE(unknown.output.find("unknown command"), std::string::npos);
  for (const char* cmd : {"demo", "eval", "gen"}) {
    const Result r = run(std::string(cmd) + " --help");
    EXPECT_EQ(r.code, 0) << cmd;
    EXPECT_NE(r.output.find("usage: sapattn"), std::string::npos) << cmd;
  }
  EXPECT_NE(run("eval --help").output.find("--top-p"), std::string::npos);
}

// The version is the CMake project's (SAPATTN_VERSION, from the top-level CMakeLists.txt).
TEST(Cli, VersionIsTheProjectVersion) {
  const Result r = run("--version");
  EXPECT_EQ(r.code, 0);
  EXPECT_EQ(r.output.rfind("sapattn " SAPATTN_VERSION " (", 0), 0u) << r.output;
  EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
}

TEST(Cli, BadOptionsExitWithTwo) {
  // The command is named once, by main; messages carry no prefix of their own.
  EXPECT_EQ(run("eval --bogus 1").output, "sapattn eval: error: unknown option --bogus (see sapattn eval --help)\n");
  EXPECT_EQ(run("gen --preset tiny --out /tmp/x --format npy").output,
            "sapattn gen: error: .npy has no bf16; use --dtype f16/f32 or --format safetensors\n");
  expect_one_line_error(run("eval --q a.npy"), "--k is required");
  expect_one_line_error(run("eval --in a.safetensors --q a.npy"), "either --in FILE or all of --q, --k, --v");
  expect_one_line_error(run("eval --in x.safetensors --top-p 1.5"), "--top-p must be in");
  expect_one_line_error(run("eval --in x.safetensors --top-p abc"), "--top-p needs a number");
  expect_one_line_error(run("eval --in x.safetensors --method svg"), "--method must be one of");
  expect_one_line_error(run("eval --in x.safetensors --method sap,svg"), "--method must be one of");
  expect_one_line_error(run("eval --in x.safetensors --top-p 0.9,2"), "--top-p must be in");
  expect_one_line_error(run("eval --in x.safetensors --density 0"), "--density must be in");
  expect_one_line_error(run("eval --in x.safetensors --q-clusters 0"), "--q-clusters must be in");
  expect_one_line_error(run("eval --in x.safetensors --top-p"), "needs a value");
  expect_one_line_error(run("eval --in x.safetensors --kmeans-seeding kmeans++"), "--kmeans-seeding must be one of");
  expect_one_line_error(run("gen --preset nope --out /tmp/x"), "nope");
  expect_one_line_error(run("gen --preset tiny --out /tmp/x --format npy"), "no bf16");
  expect_one_line_error(run("eval --in /nonexistent/x.safetensors"), "/nonexistent/x.safetensors");
}

TEST(Cli, GenThenEvalJson) {
  const fs::path dir = scratch("gen");
  const Result g = run("gen --preset tiny --out " + dir.string() + " --seed 5");
  ASSERT_EQ(g.code, 0) << g.output;
  ASSERT_TRUE(fs::exists(dir / "workload.safetensors"));
  ASSERT_TRUE(fs::exists(dir / "workload.json"));
  const auto tensors = io::read_safetensors((dir / "workload.safetensors").string());
  ASSERT_EQ(tensors.count("q") + tensors.count("k") + tensors.count("v"), 3u);
  const std::vector<int64_t> shape = tensors.at("q").shape();
  ASSERT_EQ(shape.size(), 4u);

  const Result e = run("eval --in " + (dir / "workload.safetensors").string() + " --json --top-p 0.9");
  ASSERT_EQ(e.code, 0) << e.output;
  ASSERT_EQ(e.output.front(), '{') << "--json must print only the object: " << e.output;
  const double density = json_value(e.output, "density"), recall = json_value(e.output, "recall");
  EXPECT_GT(density, 0.0);
  EXPECT_LT(density, 1.0);
  EXPECT_GT(recall, 0.5);
  EXPECT_LE(recall, 1.0 + 1e-6);
  EXPECT_GE(json_value(e.output, "rel_l2"), 0.0);
  EXPECT_LE(json_value(e.output, "cosine"), 1.0 + 1e-6);
  // One per_head entry per head of the workload.
  size_t heads = 0;
  for (size_t at = e.output.find("\"head\": "); at != std::string::npos; at = e.output.find("\"head\": ", at + 1))
    ++heads;
  EXPECT_EQ(static_cast<int64_t>(heads), shape[0] * shape[1]);
  fs::remove_all(dir);
}

// A generated workload with joint text: eval takes the text tokens from its workload.json, unless
// told otherwise, with the tensors in either format.
// The first call's seeding: greedy k-means++ by default, the official sample when asked; the JSON
// says which ran, and the two give other clusters.
TEST(Cli, EvalTakesTheKmeansSeeding) {
  const fs::path dir = scratch("seeding");
  ASSERT_EQ(run("gen --preset tiny --out " + dir.string()).code, 0);
  const std::string in = " --in " + (dir / "workload.safetensors").string() + " --json --method sap";
  const Result greedy = run("eval" + in), sample = run("eval" + in + " --kmeans-seeding sample --kmeans-iters 50");
  ASSERT_EQ(greedy.code, 0) << greedy.output;
  ASSERT_EQ(sample.code, 0) << sample.output;
  EXPECT_NE(greedy.output.find("\"kmeans_seeding\": \"greedy_pp\", \"kmeans_iters\": 14"), std::string::npos)
      << greedy.output;
  EXPECT_NE(sample.output.find("\"kmeans_seeding\": \"sample\", \"kmeans_iters\": 50"), std::string::npos)
      << sample.output;
  EXPECT_NE(json_value(greedy.output, "rel_l2"), json_value(sample.output, "rel_l2"));
  fs::remove_all(dir);
}

// --fp8 adds one row per spec with its error against the native sparse output of the same
// selection; --attention-dtype runs the method itself in FP8; bad specs are usage errors.
TEST(Cli, EvalRunsTheFp8Attention) {
  const fs::path dir = scratch("fp8");
  ASSERT_EQ(run("gen --preset tiny --out " + dir.string()).code, 0);
  const std::string file = " --in " + (dir / "workload.safetensors").string() + " --json", in = file + " --method sap";
  const Result r = run("eval" + in + " --fp8 q64:k128:vch:smooth:p448:sumq,qc:kc:vc:nosmooth:p16:sumf");
  ASSERT_EQ(r.code, 0) << r.output;
  std::vector<std::string> lines;
  std::istringstream text(r.output);
  for (std::string line; std::getline(text, line);) lines.push_back(line);
  ASSERT_EQ(lines.size(), 3u) << r.output;
  EXPECT_EQ(lines[0].find("\"fp8\""), std::string::npos) << "the native row first";
  EXPECT_NE(lines[1].find("\"fp8\": \"q64:k128:vch:smooth:p448:sumq\""), std::string::npos) << lines[1];
  EXPECT_NE(lines[2].find("\"fp8\": \"qc:kc:vc:nosmooth:p16:sumf\""), std::string::npos) << lines[2];
  for (size_t i = 1; i < 3; ++i) {
    EXPECT_GT(json_value(lines[i], "rel_l2_native"), 0.0);
    EXPECT_LT(json_value(lines[i], "rel_l2_native_max"), 0.05);
    EXPECT_EQ(json_value(lines[i], "density"), json_value(lines[0], "density")) << "the same selection";
  }
  const Result switched = run("eval" + in + " --attention-dtype fp8_e4m3");
  ASSERT_EQ(switched.code, 0) << switched.output;
  EXPECT_NE(switched.output.find("\"attention_dtype\": \"fp8_e4m3\""), std::string::npos) << switched.output;
  EXPECT_NE(json_value(switched.output, "rel_l2"), json_value(lines[0], "rel_l2"));
  expect_one_line_error(run("eval" + in + " --fp8 q64:k7x"), "unknown field 'k7x'");
  expect_one_line_error(run("eval" + file + " --fp8 q64 --method ear"), "--fp8 compares the attention");
  expect_one_line_error(run("eval" + in + " --attention-dtype fp16"), "--attention-dtype must be one of");
  fs::remove_all(dir);
}

TEST(Cli, EvalHonoursTheWorkloadDescription) {
  const fs::path dir = scratch("text");
  ASSERT_EQ(run("gen --preset tiny-text --out " + dir.string()).code, 0);
  ASSERT_EQ(run("gen --preset tiny-text --dtype f32 --format npy --out " + (dir / "npy").string()).code, 0);
  const std::string in = " --in " + (dir / "workload.safetensors").string() + " --json --kmeans-iters 3";
  const Result described = run("eval" + in);
  ASSERT_EQ(described.code, 0) << described.output;
  EXPECT_EQ(json_value(described.output, "text_tokens"), 64) << described.output;  // the preset's
  EXPECT_EQ(json_value(described.output, "prompt_length"), 40) << described.output;
  const Result overridden = run("eval" + in + " --text-tokens 0");
  ASSERT_EQ(overridden.code, 0) << overridden.output;
  EXPECT_EQ(json_value(overridden.output, "text_tokens"), 0);
  EXPECT_NE(json_value(overridden.output, "density"), json_value(described.output, "density"));
  const fs::path npy = dir / "npy";
  const Result from_npy = run("eval --q " + (npy / "q.npy").string() + " --k " + (npy / "k.npy").string() + " --v " +
                              (npy / "v.npy").string() + " --kmeans-iters 3");
  ASSERT_EQ(from_npy.code, 0) << from_npy.output;
  EXPECT_NE(from_npy.output.find("text_tokens=64 prompt_length=40 (from " + (npy / "workload.json").string()),
            std::string::npos)
      << from_npy.output;
  fs::remove_all(dir);
}

// Progress on stderr when asked (here stderr is a pipe, not a terminal): one line per step, with
// the steps done, the total and an estimate of the time left; nothing with --json otherwise.
TEST(Cli, EvalShowsProgressWhenAsked) {
  const fs::path dir = scratch("progress");
  ASSERT_EQ(run("gen --preset tiny --out " + dir.string()).code, 0);
  const std::string in = " --in " + (dir / "workload.safetensors").string() + " --json --kmeans-iters 3";
  const Result r = run("eval" + in + " --method sap,blocks --top-p 0.8,0.9 --progress");
  ASSERT_EQ(r.code, 0) << r.output;
  for (const char* line : {"eval: dense attention", "] 0/7", "eval: sap clusters", "] 1/7", "eval: sap p=0.8",
                           "eval: blocks p=0.9", "] 6/7", "s left\n", "] 7/7"})
    EXPECT_NE(r.output.find(line), std::string::npos) << line << " missing in " << r.output;
  const Result quiet = run("eval" + in);
  ASSERT_EQ(quiet.code, 0) << quiet.output;
  EXPECT_EQ(quiet.output.find("eval:"), std::string::npos) << quiet.output;
  fs::remove_all(dir);
}

TEST(Cli, EvalOnNpyInBothLayouts) {
  const fs::path dir = scratch("npy");
  const int64_t B = 1, H = 2, S = 300, D = 64;
  // The same values written as [B,H,S,D] and as [B,S,H,D]; both layouts give the same answer.
  for (const char* name : {"q", "k", "v"}) {
    const Tensor t = random_tensor(DType::F32, {B, H, S, D}, name[0]);
    io::write_npy((dir / (std::string(name) + "_bhsd.npy")).string(), t.view());
    Tensor bshd(DType::F32, {B, S, H, D});
    const TensorView view = TensorView::bshd(bshd.data(), DType::F32, B, H, S, D);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t d = 0; d < D; ++d)
          bshd.data_as<float>()[view.offset({0, h, s, d})] = t.data_as<float>()[(h * S + s) * D + d];
    io::write_npy((dir / (std::string(name) + "_bshd.npy")).string(), bshd.view());
  }
  auto files = [&](const std::string& layout) {
    return " --q " + (dir / ("q_" + layout + ".npy")).string() + " --k " + (dir / ("k_" + layout + ".npy")).string() +
           " --v " + (dir / ("v_" + layout + ".npy")).string() + " --layout " + layout;
  };
  const Result a = run("eval --json --method blocks --q-clusters 6 --k-clusters 12" + files("bhsd"));
  const Result b = run("eval --json --method blocks --q-clusters 6 --k-clusters 12" + files("bshd"));
  ASSERT_EQ(a.code, 0) << a.output;
  ASSERT_EQ(b.code, 0) << b.output;
  EXPECT_DOUBLE_EQ(json_value(a.output, "rel_l2"), json_value(b.output, "rel_l2"));
  EXPECT_DOUBLE_EQ(json_value(a.output, "density"), json_value(b.output, "density"));
  const Result table = run("eval --method dense" + files("bhsd"));
  ASSERT_EQ(table.code, 0) << table.output;
  EXPECT_NE(table.output.find("recall"), std::string::npos);
  // Lists of methods and budgets: one JSON line per (method, budget), each at its density.
  const Result sweep =
      run("eval --json --method sap,ear --density 0.2,0.4 --q-clusters 6 --k-clusters 12" + files("bhsd"));
  ASSERT_EQ(sweep.code, 0) << sweep.output;
  EXPECT_EQ(std::count(sweep.output.begin(), sweep.output.end(), '\n'), 4) << sweep.output;
  EXPECT_NE(sweep.output.find("\"method\": \"ear\""), std::string::npos);
  EXPECT_GE(json_value(sweep.output, "density"), 0.2 - 1e-6);
  const Result compensated = run("eval --json --compensate --top-p 0.5 --q-clusters 6 --k-clusters 12" + files("bhsd"));
  ASSERT_EQ(compensated.code, 0) << compensated.output;
  EXPECT_NE(compensated.output.find("\"method\": \"sap+c\""), std::string::npos);
  EXPECT_NE(compensated.output.find("\"compensate\": true"), std::string::npos);
  // ear-plus, and the ear-plus ideas one at a time on top of ear, named after them.
  const Result plus =
      run("eval --json --method ear,ear-plus --ear-spread --ear-split --density 0.3 --q-clusters 6 "
          "--k-clusters 12" +
          files("bhsd"));
  ASSERT_EQ(plus.code, 0) << plus.output;
  EXPECT_NE(plus.output.find("\"method\": \"ear+spread+split\""), std::string::npos) << plus.output;
  EXPECT_NE(plus.output.find("\"method\": \"ear-plus\""), std::string::npos) << plus.output;
  fs::remove_all(dir);
}

TEST(Cli, BadInputFilesExitWithTwo) {
  const fs::path dir = scratch("bad");
  const std::string d = dir.string();
  const Tensor good = random_tensor(DType::F32, {1, 2, 64, 32}, 1);
  io::write_npy(d + "/good.npy", good.view());
  // Non-finite values.
  Tensor nan = random_tensor(DType::F32, {1, 2, 64, 32}, 2);
  nan.data_as<float>()[77] = NAN;
  io::write_npy(d + "/nan.npy", nan.view());
  expect_one_line_error(run("eval --q " + d + "/nan.npy --k " + d + "/good.npy --v " + d + "/good.npy"), "non-finite");
  // Mismatched shapes.
  io::write_npy(d + "/short.npy", random_tensor(DType::F32, {1, 2, 63, 32}, 3).view());
  const std::string short_k = "eval --q " + d + "/good.npy --k " + d + "/short.npy --v " + d + "/short.npy";
  expect_one_line_error(run(short_k), "k dim 2 (S of [B,H,S,D]) must be 64 as in q, got [1,2,63,32] f32 cpu");
  // The same files read as [B,S,H,D]: the message speaks that layout (the third dim is H there).
  expect_one_line_error(run(short_k + " --layout bshd"),
                        "k dim 2 (H of [B,S,H,D]) must be 64 as in q, got [1,2,63,32] f32 cpu");
  // An empty tensor is reported as empty.
  io::write_npy(d + "/empty.npy", Tensor(DType::F32, {1, 2, 0, 32}).view());
  expect_one_line_error(run("eval --q " + d + "/empty.npy --k " + d + "/empty.npy --v " + d + "/empty.npy"),
                        "q is empty ([1,2,0,32] f32 cpu as [B,H,S,D])");
  // More clusters than tokens (64 here).
  const std::string good_qkv = "eval --q " + d + "/good.npy --k " + d + "/good.npy --v " + d + "/good.npy";
  expect_one_line_error(run(good_qkv + " --q-clusters 10000"),
                        "--q-clusters 10000 exceeds the 64 video tokens of the input: a cluster needs at least one "
                        "token");
  expect_one_line_error(run(good_qkv + " --k-clusters 65"), "--k-clusters 65 exceeds the 64 video tokens");
  EXPECT_EQ(run(good_qkv + " --k-clusters 64 --q-clusters 64").code, 0);
  // Wrong rank.
  io::write_npy(d + "/rank3.npy", random_tensor(DType::F32, {2, 64, 32}, 4).view());
  expect_one_line_error(run("eval --q " + d + "/rank3.npy --k " + d + "/good.npy --v " + d + "/good.npy"), "rank 4");
  // A truncated file and one with a lying header.
  std::ifstream good_file(d + "/good.npy", std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(good_file)), std::istreambuf_iterator<char>());
  std::ofstream(d + "/cut.npy", std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 2));
  expect_one_line_error(run("eval --q " + d + "/cut.npy --k " + d + "/good.npy --v " + d + "/good.npy"), "cut.npy");
  std::ofstream(d + "/junk.safetensors", std::ios::binary) << "\xff\xff\xff\xff\xff\xff\xff\x7f{}";
  expect_one_line_error(run("eval --in " + d + "/junk.safetensors"), "junk.safetensors");
  // Wrong extension and missing tensor.
  std::ofstream(d + "/q.txt") << "1 2 3";
  expect_one_line_error(run("eval --q " + d + "/q.txt --k " + d + "/good.npy --v " + d + "/good.npy"), "q.txt");
  io::write_safetensors(d + "/only_q.safetensors", {{"q", good.view()}});
  expect_one_line_error(run("eval --in " + d + "/only_q.safetensors"), "'k'");
  fs::remove_all(dir);
}

TEST(Cli, DemoWritesItsPictures) {
  const fs::path dir = scratch("demo");
  const Result r = run("demo --out " + dir.string());
  ASSERT_EQ(r.code, 0) << r.output;
  for (const char* name : {"clusters.png", "mask.png", "pareto.png"}) {
    std::ifstream f(dir / name, std::ios::binary);
    char sig[8] = {};
    f.read(sig, 8);
    EXPECT_EQ(std::string(sig, 8), std::string("\x89PNG\r\n\x1a\n", 8)) << name;
  }
  // pareto.png holds two charts side by side (top-p swept; density budget swept), 900 x 600 each:
  // the IHDR's big-endian width and height.
  std::ifstream png(dir / "pareto.png", std::ios::binary);
  unsigned char ihdr[24] = {};
  png.read(reinterpret_cast<char*>(ihdr), sizeof ihdr);
  const auto be32 = [&](int at) { return (ihdr[at] << 24) | (ihdr[at + 1] << 16) | (ihdr[at + 2] << 8) | ihdr[at + 3]; };
  EXPECT_EQ(be32(16), 1800);
  EXPECT_EQ(be32(20), 600);
  for (const char* method : {"dense", "sap", "blocks", "oracle", "sap+c", "ear", "ear-plus"})
    EXPECT_NE(r.output.find(method), std::string::npos);

  // The density budget's curves: each method at each budget computes about that density (at
  // least it, and at most about one key cluster per query cluster more: 1/68 on tiny, plus the
  // selection's granularity), and EAR errs less than SVG2 at every one of them.
  std::ifstream summary_file(dir / "summary.txt");
  std::string line;
  while (std::getline(summary_file, line) && line.rfind("density budget sweep", 0) != 0) {
  }
  ASSERT_FALSE(summary_file.eof()) << "summary.txt has no density budget sweep";
  std::getline(summary_file, line);
  std::istringstream header(line);
  const std::vector<std::string> columns{std::istream_iterator<std::string>(header), {}};
  EXPECT_EQ(columns, (std::vector<std::string>{"budget", "sap", "sap+c", "ear", "ear-plus"}));
  int budgets = 0;
  while (std::getline(summary_file, line) && !line.empty()) {
    std::istringstream row(line);
    double budget = 0.0;
    row >> budget;
    std::vector<double> rel_l2;
    std::string slash, times;
    double density = 0.0, l2 = 0.0;
    while (row >> density >> slash >> l2 >> times) {
      EXPECT_GE(density, budget - 1e-3) << line;
      EXPECT_LE(density, budget + 0.05) << line;
      rel_l2.push_back(l2);
    }
    ASSERT_EQ(rel_l2.size(), 4u) << line;
    EXPECT_LT(rel_l2[2], rel_l2[0]) << "ear against sap: " << line;
    ++budgets;
  }
  EXPECT_EQ(budgets, 6);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace sapattn
