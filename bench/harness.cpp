#include "harness.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

#include "bench_shapes_json.hpp"  // kBenchShapesJson: bench/shapes.json, written in by bench/CMakeLists.txt
#include "core/cuda_check.hpp"
#include "io/json.hpp"
#include "sapattn/error.hpp"

namespace sapattn::bench {
namespace {

using io::detail::JsonValue;

const JsonValue& member(const JsonValue& object, std::string_view key, JsonValue::Kind kind, std::string_view where) {
  const JsonValue* v = object.find(key);
  SAPATTN_CHECK(v != nullptr, FormatError, where, ": no \"", key, "\"");
  SAPATTN_CHECK(v->kind == kind, FormatError, where, ": \"", key, "\" must be ", io::detail::json_kind_name(kind),
                ", got ", io::detail::json_kind_name(v->kind));
  return *v;
}

int64_t positive(const JsonValue& object, std::string_view key, std::string_view where, int64_t min = 1) {
  const int64_t v = member(object, key, JsonValue::Kind::kInt, where).integer;
  SAPATTN_CHECK(v >= min && v <= std::numeric_limits<int32_t>::max(), FormatError, where, ": \"", key,
                "\" must lie in [", min, ", 2^31), got ", v);
  return v;
}

}  // namespace

std::vector<BenchShape> parse_bench_shapes(std::string_view json_text, std::string_view context) {
  const JsonValue doc = io::detail::parse_json(json_text, context);
  SAPATTN_CHECK(doc.kind == JsonValue::Kind::kObject, FormatError, context, ": must be an object");
  const JsonValue& list = member(doc, "shapes", JsonValue::Kind::kArray, context);
  std::vector<BenchShape> shapes;
  for (const JsonValue& e : list.array) {
    const std::string where = detail::concat(context, ": shapes[", shapes.size(), "]");
    SAPATTN_CHECK(e.kind == JsonValue::Kind::kObject, FormatError, where, ": must be an object");
    BenchShape s;
    s.name = member(e, "name", JsonValue::Kind::kString, where).string;
    s.preset = member(e, "preset", JsonValue::Kind::kString, where).string;
    SAPATTN_CHECK(!s.name.empty() && s.name != "all", FormatError, where,
                  ": \"name\" must be a non-empty name other "
                  "than \"all\"");
    s.batch = positive(e, "batch", where);
    s.heads = positive(e, "heads", where);
    s.head_dim = positive(e, "head_dim", where);
    const JsonValue& grid = member(e, "latent_grid", JsonValue::Kind::kArray, where);
    SAPATTN_CHECK(grid.array.size() == 3 &&
                      std::all_of(grid.array.begin(), grid.array.end(),
                                  [](const JsonValue& x) { return x.kind == JsonValue::Kind::kInt && x.integer >= 1; }),
                  FormatError, where, ": \"latent_grid\" must be [frames, height, width], three positive integers");
    s.frames = grid.array[0].integer;
    s.height = grid.array[1].integer;
    s.width = grid.array[2].integer;
    s.text_tokens = positive(e, "text_tokens", where, 0);
    s.q_clusters = static_cast<int>(positive(e, "q_clusters", where));
    s.k_clusters = static_cast<int>(positive(e, "k_clusters", where));
    s.in_all = member(e, "in_all", JsonValue::Kind::kBool, where).boolean;
    for (const BenchShape& other : shapes)
      SAPATTN_CHECK(other.name != s.name, FormatError, where, ": \"", s.name, "\" is listed twice");
    shapes.push_back(std::move(s));
  }
  SAPATTN_CHECK(!shapes.empty(), FormatError, context, ": \"shapes\" is empty");
  return shapes;
}

const std::vector<BenchShape>& bench_shapes() {
  static const std::vector<BenchShape> shapes = parse_bench_shapes(kBenchShapesJson, "bench/shapes.json");
  return shapes;
}

bool shape_selected(const BenchShape& shape, std::string_view wanted) {
  return wanted == "all" ? shape.in_all : std::string_view(shape.name).starts_with(wanted);
}

int run_shapes(const std::function<bool(const BenchShape&)>& selected,
               const std::function<void(const BenchShape&)>& bench) {
  int failed = 0;
  for (const BenchShape& s : bench_shapes()) {
    if (!selected(s)) continue;
    try {
      bench(s);
    } catch (const std::exception& e) {  // report, and go on with the next shape
      JsonLine().str("shape", s.name).str("op", "failed").str("error", e.what()).print();
      ++failed;
    }
  }
  return failed == 0 ? 0 : 1;
}

Timing summarize(std::vector<double> ms) {
  if (ms.empty()) return {};
  std::sort(ms.begin(), ms.end());
  return {ms[ms.size() / 2], ms.front(), static_cast<int>(ms.size())};
}

Timing time_host(const std::function<void()>& f, int warmup, int iters) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return summarize(std::move(ms));
}

EventTimer::EventTimer(cudaStream_t stream) : stream_(stream) {
  SAPATTN_CUDA_CHECK(cudaEventCreate(&start_));
  try {
    SAPATTN_CUDA_CHECK(cudaEventCreate(&stop_));
  } catch (...) {
    cudaEventDestroy(start_);
    throw;
  }
}

EventTimer::~EventTimer() {
  cudaEventDestroy(start_);
  cudaEventDestroy(stop_);
}

Timing EventTimer::time(const std::function<void()>& f, int warmup, int iters) const {
  for (int i = 0; i < warmup; ++i) f();
  SAPATTN_CUDA_CHECK(cudaStreamSynchronize(stream_));
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    SAPATTN_CUDA_CHECK(cudaEventRecord(start_, stream_));
    f();
    SAPATTN_CUDA_CHECK(cudaEventRecord(stop_, stream_));
    SAPATTN_CUDA_CHECK(cudaEventSynchronize(stop_));
    float t = 0;
    SAPATTN_CUDA_CHECK(cudaEventElapsedTime(&t, start_, stop_));
    ms.push_back(t);
  }
  return summarize(std::move(ms));
}

void JsonLine::key(std::string_view k) {
  if (!fields_.empty()) fields_ += ", ";
  fields_ += io::detail::json_quote(k);
  fields_ += ": ";
}

JsonLine& JsonLine::str(std::string_view k, std::string_view value) {
  key(k);
  // json_quote wants UTF-8; an exception's text from a driver might not be.
  fields_ += io::detail::is_valid_utf8(value)
                 ? io::detail::json_quote(value)
                 : io::detail::json_quote(io::detail::printable(value, std::numeric_limits<size_t>::max()));
  return *this;
}

JsonLine& JsonLine::number(std::string_view k, double value, const char* format, int precision) {
  key(k);
  if (!std::isfinite(value)) {
    fields_ += "null";
    return *this;
  }
  char buf[400];  // %f of the largest double has 309 digits before the point
  std::snprintf(buf, sizeof(buf), format, precision, value);
  fields_ += buf;
  return *this;
}

JsonLine& JsonLine::num(std::string_view k, double value, int significant) {
  return number(k, value, "%.*g", significant);
}

JsonLine& JsonLine::fixed(std::string_view k, double value, int decimals) { return number(k, value, "%.*f", decimals); }

JsonLine& JsonLine::integer(std::string_view k, int64_t value) {
  key(k);
  fields_ += std::to_string(value);
  return *this;
}

JsonLine device_line() {
  cudaDeviceProp prop{};
  SAPATTN_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  JsonLine j;
  j.str("device", prop.name).integer("sms", prop.multiProcessorCount).integer("l2_bytes", prop.l2CacheSize);
  return j;
}

std::string JsonLine::text() const { return "{" + fields_ + "}"; }

void JsonLine::print(std::FILE* out) const {
  std::fprintf(out, "%s\n", text().c_str());
  std::fflush(out);
}

}  // namespace sapattn::bench
