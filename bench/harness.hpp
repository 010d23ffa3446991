// What every C++ benchmark shares (bench_ops.cu, bench_attention.cu; bench/harness.py is the Python
// side): the shape table of bench/shapes.json, one timer (CUDA events on a stream, or the host clock),
// and one JSON-lines writer on the project's JSON quoting (src/io/json.hpp). The methods follow
// CUTLASS's: warm-up apart from timing, each timed run between two events, the median of many.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace sapattn::bench {

// ---- shapes ---------------------------------------------------------------------------------------

// One entry of bench/shapes.json: an attention shape [B,H,S,D] with S = video tokens + text tokens,
// the workload preset that generates it and the official cluster counts over its video tokens.
struct BenchShape {
  std::string name;    // "wan14b_720p": what --shape matches (by prefix) and the JSON lines carry
  std::string preset;  // the workload preset of the same size (include/sapattn/workload.hpp)
  int64_t batch = 1, heads = 0, head_dim = 0;
  int64_t frames = 0, height = 0, width = 0;  // latent grid of video tokens
  int64_t text_tokens = 0;
  int q_clusters = 0, k_clusters = 0;  // the official scripts' Cq and Ck
  bool in_all = false;                 // run by --shape all; the others are for the CPU smoke test
  int64_t video_tokens() const { return frames * height * width; }
};

// The shapes of bench/shapes.json, in file order (the text is compiled in: no file to find at run time).
const std::vector<BenchShape>& bench_shapes();
// Parses the text of a shapes file; throws FormatError naming `context` and what is wrong.
std::vector<BenchShape> parse_bench_shapes(std::string_view json_text, std::string_view context);
// Whether `shape` is selected by `wanted`: "all" selects the in_all shapes, anything else the shapes
// whose name starts with it (as the benchmarks' --shape always did).
bool shape_selected(const BenchShape& shape, std::string_view wanted);
// A benchmark's main loop: `bench` on every shape that `selected` picks, in table order. A shape that
// throws is reported as a line {"shape": ..., "op": "failed", "error": ...} and the next one runs.
// Returns the exit code: 0 when every shape ran, 1 otherwise.
int run_shapes(const std::function<bool(const BenchShape&)>& selected,
               const std::function<void(const BenchShape&)>& bench);

// ---- timing ---------------------------------------------------------------------------------------

struct Timing {
  double median_ms = 0, min_ms = 0;
  int iters = 0;
};

// Median and minimum of the runs' milliseconds. The median is the middle value of the sorted runs,
// the upper one of the two middle values for an even count (as every benchmark here reported it).
Timing summarize(std::vector<double> ms);

// `iters` runs of f after `warmup` untimed ones, each timed with the host's steady clock (for the CPU
// backend: the attention benchmark's --cpu smoke test).
Timing time_host(const std::function<void()>& f, int warmup, int iters);

// Times work enqueued on one stream: `warmup` untimed runs, a synchronisation, then `iters` runs each
// between two events recorded on the stream (the second waited for before the next run starts).
// The events are created once and reused; no other work is enqueued, so a profiler sees exactly the
// launches of f (scripts/device/ncu-attention.sh counts them).
class EventTimer {
 public:
  explicit EventTimer(cudaStream_t stream);
  ~EventTimer();
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;

  Timing time(const std::function<void()>& f, int warmup, int iters) const;

 private:
  cudaStream_t stream_;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

// ---- JSON lines -------------------------------------------------------------------------------------

// One JSON object built field by field, in the order given, printed as one line:
// {"shape": "wan14b_720p", "op": "select_blocks", "median_ms": 0.9213}. Keys and strings are quoted by
// io::detail::json_quote (text that is not UTF-8 is first made printable); a non-finite number is null.
class JsonLine {
 public:
  JsonLine& str(std::string_view key, std::string_view value);
  // printf's %.*g: `significant` significant digits, the shortest form.
  JsonLine& num(std::string_view key, double value, int significant = 6);
  // printf's %.*f: `decimals` digits after the point.
  JsonLine& fixed(std::string_view key, double value, int decimals);
  JsonLine& integer(std::string_view key, int64_t value);

  std::string text() const;
  // The line and a newline, flushed: a reader (a pipe, a timeout that kills the run) sees every line
  // printed so far.
  void print(std::FILE* out = stdout) const;

 private:
  void key(std::string_view k);
  JsonLine& number(std::string_view k, double value, const char* format, int precision);
  std::string fields_;
};

// The first line of a GPU benchmark's output, GPU 0 described: {"device": name, "sms": SM count,
// "l2_bytes": L2 size}; callers may add fields before they print it.
JsonLine device_line();

}  // namespace sapattn::bench
