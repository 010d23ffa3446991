// Synthetic video-DiT attention workloads, made without model weights: a latent video of moving
// objects over a textured background, per-token content features, per-head projections to Q/K/V
// with 3D RoPE (Wan's band split; HunyuanVideo's for its preset), and a fixed mix of head kinds.
// docs/generator.md explains the model and its calibration (keeping the top 13% of keys per query
// holds about 90-97% of the attention mass, as the SVG2 paper measures on real video DiTs).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "sapattn/tensor.hpp"

namespace sapattn::workload {

// Positional: attention follows RoPE distance in (t, y, x). Semantic: attention follows content
// (the same object or material anywhere in the video). Mixed: both with comparable weight.
enum class HeadKind : uint8_t { Positional, Semantic, Mixed };
std::string_view head_kind_name(HeadKind k);

struct Preset {
  std::string name;
  int64_t batch = 1;
  int64_t frames = 1, height = 1, width = 1;  // latent grid: S_video = frames * height * width
  int64_t heads = 1, head_dim = 64;
  int64_t text_tokens = 0, prompt_length = 0;  // trailing joint-text tokens (HunyuanVideo)
  // 3D RoPE: dims of head_dim given to (t, h, w), each even, summing to head_dim; all zero means
  // Wan's split (t: D - 4*(D/6), h and w: 2*(D/6) each). Pair k of a band of m dims turns by
  // pos * rope_theta^(-2k/m).
  std::array<int64_t, 3> rope_dims{0, 0, 0};
  double rope_theta = 10000.0;
  int64_t video_tokens() const { return frames * height * width; }
  int64_t tokens() const { return video_tokens() + text_tokens; }
};

// "tiny" (tests and demo), "tiny-text" (joint text path), "wan-1.3b-480p", "wan-14b-720p",
// "hunyuan-720p".
std::vector<std::string> preset_names();
// Throws InvalidArgumentError listing the valid names.
Preset preset(std::string_view name);

// The (t, h, w) RoPE band dims of a preset (rope_dims, or Wan's split when they are all zero).
// Throws InvalidArgumentError when they are odd, negative or do not sum to head_dim.
std::array<int64_t, 3> rope_band_dims(const Preset& preset);

// The head kind of head h of H: a fixed interleaved mix of about 40% positional, 35% semantic and
// 25% mixed (each head takes the kind furthest behind its share; H = 4 gives P, S, M, P).
HeadKind head_kind_for(int64_t h, int64_t heads);

struct Workload {
  Preset preset;
  uint64_t seed = 0;
  Tensor q, k, v;                    // [B,H,S,D], the dtype asked for; S = video tokens then text
  std::vector<HeadKind> head_kinds;  // [H]
  // The scene at latent resolution, for pictures: [B,T,Hl,Wl,3] u8 in memory, held as the rank-4
  // shape [B*T, Hl, Wl, 3] (tensors have rank <= 4): frame t of batch item b is image b*T + t,
  // and pixel (y, x) of it is video token t*Hl*Wl + y*Wl + x.
  Tensor frames_rgb;
  // [B,S_video] i32: object shown by each video token, 0 = background, 1.. objects (front-most
  // wins). A swarm (many small blobs of one class) is one object.
  Tensor object_ids;
};

// Called with (done, total) as the work proceeds: one unit per batch item's scene and features,
// one per (batch item, head) projected; total = B * (H + 1). Calls are serialised (never
// concurrent) and `done` only grows; they may come from worker threads.
using Progress = std::function<void(int64_t done, int64_t total)>;

// Deterministic for (preset, seed, dtype): the same bytes on every run and thread count.
// threads: worker threads (0 = all hardware threads). Throws InvalidArgumentError for a preset
// with non-positive sizes or bad text/RoPE fields, DTypeError for a non-floating dtype.
Workload generate(const Preset& preset, uint64_t seed, DType dtype = DType::BF16, const Progress& progress = {},
                  int threads = 0);

// Calibration: per head, the mean over batch items and sampled queries of the share of the
// softmax attention mass (scores q.k * scale, all keys) held by that query's top
// ceil(fraction * S_k) keys. q [B,H,Sq,D], k [B,H,Sk,D], CPU, f32/f16/bf16, any strides.
// sample_queries: queries per batch item, drawn without replacement (seeded; the same rows for
// every head); 0 or >= Sq means all. scale 0 = 1/sqrt(D). Deterministic for any thread count.
std::vector<double> top_fraction_mass_per_head(const TensorView& q, const TensorView& k, double fraction,
                                               int64_t sample_queries, uint64_t seed, float scale = 0.0f,
                                               int threads = 0);
// The mean of top_fraction_mass_per_head over heads.
double top_fraction_mass(const TensorView& q, const TensorView& k, double fraction, int64_t sample_queries,
                         uint64_t seed, float scale = 0.0f, int threads = 0);

}  // namespace sapattn::workload
