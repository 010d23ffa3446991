// splitmix64 (Steele, Lea, Flood 2014), the one 64-bit mixer of the project: kmeans_init's keys,
// the greedy seeding's draws (core/kmeans_seeding.hpp) and the workload generator's
// counter-based random numbers hash with it, on the host and on the device.
#pragma once

#include <cstdint>

#include "core/host_device.hpp"

namespace sapattn {

SAPATTN_HOST_DEVICE constexpr uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace sapattn
