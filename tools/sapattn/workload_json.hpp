// workload.json: the description `sapattn gen` writes beside a workload's tensors, and what
// `sapattn eval` reads back from it (the layout and the joint-text token counts).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "sapattn/workload.hpp"

namespace sapattn::cli {

struct WorkloadJson {
  std::string path;            // where it was read from
  std::string layout;          // "bhsd" or "bshd": how `shape` and the tensors are laid out
  std::vector<int64_t> shape;  // of q, k and v as stored
  int64_t text_tokens = 0, prompt_length = 0;
};

// The description of a generated workload `w`, stored as `dtype` in [B,H,S,D] ("bhsd").
// top13_mass: the calibration check (the mean share of attention mass in the top 13% of keys).
std::string workload_json(const workload::Workload& w, uint64_t seed, const std::string& dtype, double top13_mass);

// The workload.json in the folder of `tensor_path`, or nothing when that folder has none. A file
// that is not such a description throws FormatError naming it.
std::optional<WorkloadJson> read_workload_json_beside(const std::string& tensor_path);

}  // namespace sapattn::cli
