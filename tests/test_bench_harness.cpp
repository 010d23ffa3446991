// The benchmarks' harness (bench/harness.hpp) without a GPU: bench/shapes.json agrees with the
// workload presets it names (bench_attention generates its tensors from them, bench_ops and the
// Python peers take the sizes from the table), --shape selects as it always did, the timer's
// statistics, and the JSON lines keep the format that scripts/device.sh, bench/report.py and
// bench/attention_peers.py read.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "harness.hpp"
#include "io/json.hpp"
#include "sapattn/error.hpp"
#include "sapattn/workload.hpp"
#include "test_support.hpp"

namespace {

using sapattn::bench::BenchShape;
using sapattn::bench::JsonLine;
using sapattn::testing_support::expect_error_message;

std::vector<std::string> selected(std::string_view wanted) {
  std::vector<std::string> names;
  for (const BenchShape& s : sapattn::bench::bench_shapes())
    if (sapattn::bench::shape_selected(s, wanted)) names.push_back(s.name);
  return names;
}

TEST(BenchShapes, AgreeWithTheirWorkloadPresets) {
  for (const BenchShape& s : sapattn::bench::bench_shapes()) {
    SCOPED_TRACE(s.name);
    const sapattn::workload::Preset p = sapattn::workload::preset(s.preset);
    EXPECT_EQ(s.batch, p.batch);
    EXPECT_EQ(s.heads, p.heads);
    EXPECT_EQ(s.head_dim, p.head_dim);
    EXPECT_EQ(s.frames, p.frames);
    EXPECT_EQ(s.height, p.height);
    EXPECT_EQ(s.width, p.width);
    EXPECT_EQ(s.video_tokens(), p.video_tokens());
    EXPECT_EQ(s.text_tokens, p.text_tokens);
    EXPECT_LE(s.q_clusters, s.video_tokens());
    EXPECT_LE(s.k_clusters, s.video_tokens());
  }
}

TEST(BenchShapes, AreTheOfficialOnes) {
  // What the benchmarks ran at before the table moved to bench/shapes.json ([B,H,S_video,D], Cq, Ck).
  const auto& shapes = sapattn::bench::bench_shapes();
  ASSERT_GE(shapes.size(), 3u);
  const auto expect = [](const BenchShape& s, const char* name, int64_t H, int64_t S, int Cq) {
    EXPECT_EQ(s.name, name);
    EXPECT_EQ(s.batch, 1);
    EXPECT_EQ(s.heads, H);
    EXPECT_EQ(s.video_tokens(), S);
    EXPECT_EQ(s.head_dim, 128);
    EXPECT_EQ(s.q_clusters, Cq);
    EXPECT_EQ(s.k_clusters, 1000);
  };
  expect(shapes[0], "wan14b_720p", 40, 75600, 300);
  expect(shapes[1], "wan13b_480p", 12, 32760, 200);
  expect(shapes[2], "hunyuan_720p", 24, 118800, 400);
}

TEST(BenchShapes, SelectByPrefixOrAll) {
  EXPECT_EQ(selected("all"), (std::vector<std::string>{"wan14b_720p", "wan13b_480p", "hunyuan_720p"}));
  EXPECT_EQ(selected("wan1"), (std::vector<std::string>{"wan14b_720p", "wan13b_480p"}));
  EXPECT_EQ(selected("hunyuan"), (std::vector<std::string>{"hunyuan_720p"}));
  EXPECT_EQ(selected("tiny"), (std::vector<std::string>{"tiny", "tiny-text"}));
  EXPECT_TRUE(selected("nope").empty());
}

TEST(BenchShapes, BadTableNamesTheEntryAndTheField) {
  using sapattn::bench::parse_bench_shapes;
  const auto parse = [](const char* text) { return [text] { parse_bench_shapes(text, "shapes.json"); }; };
  expect_error_message<sapattn::FormatError>(parse(R"({"shapes": [{"name": "a"}]})"),
                                             "shapes.json: shapes[0]: no \"preset\"");
  expect_error_message<sapattn::FormatError>(
      parse(R"({"shapes": [{"name": "a", "preset": "tiny", "batch": 1, "heads": 0}]})"), "\"heads\" must lie in [1");
  expect_error_message<sapattn::FormatError>(parse(R"({"shapes": []})"), "\"shapes\" is empty");
  expect_error_message<sapattn::FormatError>(parse(R"({"shapes": [)"), "shapes.json: invalid JSON");
  const char* row =
      R"({"name": "a", "preset": "tiny", "batch": 1, "heads": 4, "head_dim": 64, "latent_grid": [8, 20, 32],
                        "text_tokens": 0, "q_clusters": 16, "k_clusters": 40, "in_all": false})";
  const std::string twice = std::string(R"({"shapes": [)") + row + ", " + row + "]}";
  expect_error_message<sapattn::FormatError>([&] { parse_bench_shapes(twice, "shapes.json"); },
                                             "shapes[1]: \"a\" is listed twice");
  EXPECT_EQ(parse_bench_shapes(std::string(R"({"shapes": [)") + row + "]}", "t").at(0).video_tokens(), 8 * 20 * 32);
}

TEST(BenchShapes, RunShapesReportsAFailedShapeAndGoesOn) {
  std::vector<std::string> ran;
  ::testing::internal::CaptureStdout();
  const int rc =
      sapattn::bench::run_shapes([](const BenchShape& s) { return sapattn::bench::shape_selected(s, "tiny"); },
                                 [&](const BenchShape& s) {
                                   ran.push_back(s.name);
                                   if (s.name == "tiny")
                                     throw sapattn::InvalidArgumentError("out of \"memory\"", __FILE__, __LINE__);
                                 });
  const std::string out = ::testing::internal::GetCapturedStdout();
  EXPECT_EQ(rc, 1);
  EXPECT_EQ(ran, (std::vector<std::string>{"tiny", "tiny-text"}));
  EXPECT_EQ(out.rfind(R"({"shape": "tiny", "op": "failed", "error": ")", 0), 0u) << out;
  EXPECT_NE(out.find(R"(out of \"memory\")"), std::string::npos) << out;
  EXPECT_EQ(sapattn::bench::run_shapes([](const BenchShape&) { return true; }, [](const BenchShape&) {}), 0);
}

TEST(BenchTiming, UpperMedianAndMinimum) {
  using sapattn::bench::summarize;
  const auto odd = summarize({5.0, 1.0, 3.0});
  EXPECT_EQ(odd.median_ms, 3.0);
  EXPECT_EQ(odd.min_ms, 1.0);
  EXPECT_EQ(odd.iters, 3);
  const auto even = summarize({4.0, 1.0, 3.0, 2.0});  // the upper of 2 and 3, as the benchmarks always took it
  EXPECT_EQ(even.median_ms, 3.0);
  EXPECT_EQ(even.min_ms, 1.0);
  EXPECT_EQ(summarize({}).iters, 0);
}

TEST(BenchTiming, HostTimerRunsWarmupThenTimedRuns) {
  int calls = 0;
  const auto t = sapattn::bench::time_host([&] { ++calls; }, 2, 5);
  EXPECT_EQ(calls, 7);
  EXPECT_EQ(t.iters, 5);
  EXPECT_GE(t.median_ms, t.min_ms);
  EXPECT_GE(t.min_ms, 0.0);
}

TEST(BenchJsonLine, KeepsTheFormatTheReadersParse) {
  // The benchmarks' lines before the harness: ", " between fields, ": " after a key, %.*g numbers,
  // bench_ops's fixed decimals, null for a non-finite number.
  const std::string line = JsonLine()
                               .str("shape", "wan14b_720p")
                               .str("op", "select_blocks")
                               .fixed("median_ms", 0.92134, 4)
                               .integer("reps", 40)
                               .num("bytes", 1.5e9, 6)
                               .num("tflops", 364.123456, 5)
                               .num("max_abs_diff", NAN)
                               .text();
  EXPECT_EQ(line,
            R"({"shape": "wan14b_720p", "op": "select_blocks", "median_ms": 0.9213, "reps": 40, "bytes": 1.5e+09, )"
            R"("tflops": 364.12, "max_abs_diff": null})");
  const auto parsed = sapattn::io::detail::parse_json(line, "line", sapattn::io::detail::JsonNumbers::kAny);
  EXPECT_EQ(parsed.find("op")->string, "select_blocks");
}

TEST(BenchJsonLine, QuotesWithTheProjectsJsonQuoting) {
  const std::string line = JsonLine().str("error", "bad \"x\"\\\n\x01").str("bytes", "caf\xc3\xa9 \xff").text();
  const auto parsed = sapattn::io::detail::parse_json(line, "line");
  EXPECT_EQ(parsed.find("error")->string, "bad \"x\"\\\n\x01");  // round trip
  EXPECT_EQ(parsed.find("bytes")->string, "caf\xc3\xa9 \\xff");  // not UTF-8: printable first
}

}  // namespace
