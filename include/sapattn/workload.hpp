// Synthetic video-DiT attention workloads, made without model weights: a latent video of moving
// objects over a textured background, per-token content features, per-head projections to Q/K/V
// with Wan-style 3D RoPE, and a mix of head kinds. docs/generator.md explains the model and its
// calibration (keeping the top 13% of keys per query holds about 90-97% of the attention mass).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "sapattn/tensor.hpp"

namespace sapattn::workload {

enum class HeadKind : uint8_t { Positional, Semantic, Mixed };
std::string_view head_kind_name(HeadKind k);

struct Preset {
  std::string name;
  int64_t batch = 1;
  int64_t frames = 1, height = 1, width = 1;  // latent grid: S_video = frames * height * width
  int64_t heads = 1, head_dim = 64;
  int64_t text_tokens = 0, prompt_length = 0;  // trailing joint-text tokens (HunyuanVideo)
  int64_t video_tokens() const { return frames * height * width; }
  int64_t tokens() const { return video_tokens() + text_tokens; }
};

// "tiny" (tests and demo), "wan-1.3b-480p", "wan-14b-720p", "hunyuan-720p".
std::vector<std::string> preset_names();
// Throws InvalidArgumentError listing the valid names.
Preset preset(std::string_view name);

struct Workload {
  Preset preset;
  uint64_t seed = 0;
  Tensor q, k, v;                     // [B,H,S,D], the dtype asked for; S = video tokens then text
  std::vector<HeadKind> head_kinds;   // [H]
  Tensor frames_rgb;                  // [B,T,Hl,Wl,3] u8: the scene at latent resolution, for pictures
  Tensor object_ids;                  // [B,S_video] i32: object shown by each video token, 0 = background
};

// Called with (done, total) as the work proceeds.
using Progress = std::function<void(int64_t done, int64_t total)>;

// Deterministic for (preset, seed, dtype): the same bytes on every run and thread count.
Workload generate(const Preset& preset, uint64_t seed, DType dtype = DType::BF16,
                  const Progress& progress = {});

}  // namespace sapattn::workload
