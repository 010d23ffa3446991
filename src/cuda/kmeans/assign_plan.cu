// Which tensor-core k-means assignment runs (plan_assign, prepared_rows in kmeans_internal.hpp;
// set_assign_kernel, assign_kernel in backend.hpp): the wgmma kernel on sm_90 devices, where TMA can
// read the prepared centroids, in the configuration with the least padded work; the mma.sync kernel
// elsewhere, or wherever the switch asks for it. Support and dispatch both ask plan_assign.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <iterator>
#include <string>

#include "cuda/kmeans/kmeans_internal.hpp"
#include "cuda/runtime/device.cuh"
#include "cuda/runtime/tensor_map.hpp"

namespace sapattn::cuda {

namespace {

constexpr int kConfigs = static_cast<int>(std::size(kSm90AssignConfigs));

// A tile costs its columns and about this many more (its barrier waits, its turn, the merge of its
// two best keys): a guess that makes few wide tiles win over many narrow ones of equal padding.
constexpr int64_t kTileOverheadColumns = 32;

std::string config_name(const Sm90AssignConfig& c) {
  return std::to_string(c.group_rows) + "x" + std::to_string(c.tile_n);
}

// The switch: kind + 4 * (forced configuration + 1); -1 until the environment is read.
enum Kind : int { kAuto = 0, kMma = 1, kWgmma = 2 };
std::atomic<int> g_choice{-1};

int parse_choice(const char* name) {
  if (name == nullptr || name[0] == '\0' || std::strcmp(name, "auto") == 0) return kAuto;
  if (std::strcmp(name, "mma") == 0) return kMma;
  if (std::strcmp(name, "wgmma") == 0) return kWgmma;
  std::string known;
  for (int i = 0; i < kConfigs; ++i) {
    const std::string config = config_name(kSm90AssignConfigs[i]);
    if (std::strcmp(name, ("wgmma:" + config).c_str()) == 0) return kWgmma + 4 * (i + 1);
    known += (i > 0 ? ", " : "") + config;
  }
  SAPATTN_THROW(InvalidArgumentError, "unknown k-means assignment kernel '", name,
                "' (expected auto, mma, wgmma or wgmma:RxN with RxN one of ", known, ")");
}

int choice() { return knob_value(g_choice, "SAPATTN_KMEANS_ASSIGN", parse_choice); }

// The default configuration for C clusters: the least work counted as tiles x (tile width + overhead),
// among those of 64 rows per warpgroup; ties to the wider tile. Wan 14B's 300 and 1000 clusters take
// 64x160 (2 tiles, 320 columns) and 64x256 (4 tiles, 1024 columns).
Sm90AssignConfig default_config(int64_t clusters) {
  Sm90AssignConfig best{};
  int64_t best_cost = INT64_MAX;
  for (const Sm90AssignConfig& c : kSm90AssignConfigs) {
    if (c.group_rows != 64) continue;
    const int64_t cost = ceil_div(clusters, c.tile_n) * (c.tile_n + kTileOverheadColumns);
    if (cost < best_cost || (cost == best_cost && c.tile_n > best.tile_n)) {
      best = c;
      best_cost = cost;
    }
  }
  return best;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

AssignPlan plan_assign(int device, int64_t clusters, int64_t dim, const PreparedCentroids& prepared) {
  const int v = choice(), kind = v % 4, forced = v / 4 - 1;
  AssignPlan plan;
  plan.config = forced >= 0 ? kSm90AssignConfigs[forced] : default_config(clusters);
  if (kind != kMma && tensor_core_assign(dim)) {
    const DeviceArch arch = device_arch(device);
    const bool capable = arch.major == 9 && arch.minor == 0 && tensor_maps_available() && aligned16(prepared.operand) &&
                         aligned16(prepared.half_norm);
    SAPATTN_CHECK(capable || kind != kWgmma, UnsupportedError,
                  "the wgmma k-means assignment needs an sm_90 GPU (cuda:", device, " is sm_", arch.major, arch.minor,
                  "), a driver with tensor maps and a 16-byte aligned workspace");
    plan.sm90 = capable;
    plan.num_sms = arch.sms;
  }
  plan.c_pad = round_up(clusters, plan.sm90 ? plan.config.tile_n : kCentroidTile);
  return plan;
}

int64_t prepared_rows(int64_t clusters) {
  int64_t rows = round_up(clusters, kCentroidTile);
  for (const Sm90AssignConfig& c : kSm90AssignConfigs) rows = std::max(rows, round_up(clusters, c.tile_n));
  return rows;
}

void set_assign_kernel(const char* name) { g_choice.store(parse_choice(name)); }

AssignKernel assign_kernel(int device, int64_t clusters, int64_t dim) {
  if (!tensor_core_assign(dim)) return {};
  const AssignPlan plan = plan_assign(device, clusters, dim, PreparedCentroids{});  // a workspace from cudaMalloc
  if (!plan.sm90) return {true, false, 0, 0};
  return {true, true, plan.config.group_rows, plan.config.tile_n};
}

}  // namespace sapattn::cuda
