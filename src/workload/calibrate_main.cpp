// workload_calibrate: generates one preset and prints how concentrated its attention is (the share
// of the softmax mass in each query's top 13% of keys, per head, per head kind and overall) and
// how long generation and measurement took. The numbers in docs/generator.md come from it.
//
//   workload_calibrate PRESET [--seed N] [--queries N] [--fraction F] [--dtype f32|f16|bf16]
//                             [--batch N] [--threads N]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "sapattn/error.hpp"
#include "sapattn/workload.hpp"

namespace {

int usage() {
  std::fprintf(stderr,
               "usage: workload_calibrate PRESET [--seed N] [--queries N] [--fraction F] "
               "[--dtype f32|f16|bf16] [--batch N] [--threads N]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace sapattn;
  using namespace sapattn::workload;
  if (argc < 2) return usage();
  const std::string name = argv[1];
  uint64_t seed = 1;
  int64_t queries = 256, batch = 1;
  int threads = 0;
  double fraction = 0.13;
  DType dtype = DType::BF16;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) return usage();
    const char* v = argv[++i];
    if (a == "--seed") {
      seed = std::strtoull(v, nullptr, 10);
    } else if (a == "--queries") {
      queries = std::strtoll(v, nullptr, 10);
    } else if (a == "--fraction") {
      fraction = std::strtod(v, nullptr);
    } else if (a == "--batch") {
      batch = std::strtoll(v, nullptr, 10);
    } else if (a == "--threads") {
      threads = static_cast<int>(std::strtol(v, nullptr, 10));
    } else if (a == "--dtype") {
      const std::string d = v;
      if (d == "f32") {
        dtype = DType::F32;
      } else if (d == "f16") {
        dtype = DType::F16;
      } else if (d == "bf16") {
        dtype = DType::BF16;
      } else {
        return usage();
      }
    } else {
      return usage();
    }
  }
  try {
    Preset p = preset(name);
    p.batch = batch;
    using Clock = std::chrono::steady_clock;
    const auto t0 = Clock::now();
    const Workload w = generate(p, seed, dtype, {}, threads);
    const auto t1 = Clock::now();
    const std::vector<double> share =
        top_fraction_mass_per_head(w.q.view(), w.k.view(), fraction, queries, seed, 0.0f, threads);
    const auto t2 = Clock::now();
    std::printf("%s: B=%lld S=%lld (video %lld, text %lld) H=%lld D=%lld %s seed %llu\n", p.name.c_str(),
                static_cast<long long>(p.batch), static_cast<long long>(p.tokens()),
                static_cast<long long>(p.video_tokens()), static_cast<long long>(p.text_tokens),
                static_cast<long long>(p.heads), static_cast<long long>(p.head_dim),
                std::string(dtype_name(dtype)).c_str(), static_cast<unsigned long long>(seed));
    std::printf("generate %.2f s, measure %.2f s (%lld queries per batch item, all heads)\n",
                std::chrono::duration<double>(t1 - t0).count(), std::chrono::duration<double>(t2 - t1).count(),
                static_cast<long long>(queries));
    double kind_sum[3] = {0, 0, 0}, all = 0;
    int kind_n[3] = {0, 0, 0};
    for (size_t h = 0; h < share.size(); ++h) {
      const int k = static_cast<int>(w.head_kinds[h]);
      std::printf("  head %2zu %-10s %.4f\n", h, std::string(head_kind_name(w.head_kinds[h])).c_str(), share[h]);
      kind_sum[k] += share[h];
      kind_n[k] += 1;
      all += share[h];
    }
    for (int k = 0; k < 3; ++k) {
      if (kind_n[k] == 0) continue;
      std::printf("  %-10s mean %.4f over %d heads\n", std::string(head_kind_name(static_cast<HeadKind>(k))).c_str(),
                  kind_sum[k] / kind_n[k], kind_n[k]);
    }
    std::printf("  overall    mean %.4f (top %.0f%% of keys)\n", all / static_cast<double>(share.size()),
                100.0 * fraction);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
