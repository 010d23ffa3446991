// Internals of the workload generator shared by its sources (and the calibration tooling): the
// counter-based random numbers, the tuning knobs, the scene model and the per-head parameters.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/splitmix64.hpp"
#include "sapattn/workload.hpp"

namespace sapattn::workload::detail {

// ---------------------------------------------------------------------------------------------
// Random numbers. Everything is derived from hashes of (seed, purpose, index...), never from a
// shared sequential stream, so any thread can compute any value and the bytes do not depend on
// the thread count or the order of work. The hash is splitmix64 (core/splitmix64.hpp).
// ---------------------------------------------------------------------------------------------

// A key for a sub-purpose of `key`: mix(mix(seed, tag), index) and so on.
inline uint64_t mix(uint64_t key, uint64_t value) { return splitmix64(key ^ splitmix64(value)); }

// Uniform in [0, 1) from the top 24 bits (exact in float).
inline float unit_float(uint64_t h) { return static_cast<float>(h >> 40) * (1.0f / 16777216.0f); }

// Approximately standard normal from one hash: the Irwin-Hall sum of four 16-bit uniforms,
// centred and scaled to variance 1 (tails end at +-3.46). It costs one hash instead of a log and
// a cosine, which matters for the ~10^9 per-element noise values of the 720p presets.
inline float approx_normal(uint64_t h) {
  constexpr float kInv = 1.0f / 65536.0f;
  const float s = static_cast<float>(h & 0xffffu) + static_cast<float>((h >> 16) & 0xffffu) +
                  static_cast<float>((h >> 32) & 0xffffu) + static_cast<float>(h >> 48);
  return (s * kInv + 2.0f * kInv - 2.0f) * 1.7320508f;  // +2/65536 centres the 16-bit grid
}

// A sequential generator for the few hundred scene and head parameters (built on one thread).
class Rng {
 public:
  explicit Rng(uint64_t key) : state_(key) {}
  uint64_t next() { return splitmix64(state_++ * 0x2545f4914f6cdd1dull); }
  double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  int64_t uniform_int(int64_t lo, int64_t hi) {  // inclusive
    return lo + static_cast<int64_t>(next() % static_cast<uint64_t>(hi - lo + 1));
  }
  double normal() {  // Box-Muller; the parameters are few, so exactness is cheap here
    const double u1 = (static_cast<double>(next() >> 11) + 1.0) * (1.0 / 9007199254740992.0);  // (0, 1]
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

 private:
  uint64_t state_;
};

// Smooth 2D value noise in about [-1, 1] (std ~0.35): hashed lattice values, smoothstep-blended.
float value_noise(uint64_t key, float y, float x);
// Two octaves (0.7 + 0.3 weights), period `scale` in the units of (y, x).
float fractal_noise(uint64_t key, float y, float x, float scale);

// ---------------------------------------------------------------------------------------------
// Knobs: every strength of the model in one place. The defaults are the calibrated values
// (docs/generator.md gives the measurements); tools/tests may override them to study the model.
// ---------------------------------------------------------------------------------------------
struct Knobs {
  int feature_dim = 64;  // F: content feature dims per token

  // Video token feature f = proto*P_e + part*P_{e,part} + texture*sum_j n_j E_{e,j} + light*l*L
  // + modality*M + noise*xi: directions are unit vectors in R^F, n_j and l smooth noise fields,
  // xi ~ N(0, I/F).
  float w_proto = 1.0f;
  float w_part = 0.8f;
  float w_texture = 0.55f;
  float w_light = 0.25f;
  float w_noise = 0.3f;
  float texture_period = 0.2f;  // texture noise period, in units of min(height, width)

  // Per head kind (Positional, Semantic, Mixed): lambda_sem is the logit gained per unit of
  // content similarity f_i . f_j; lambda_pos the logit of the positional term at distance 0
  // (it decays with RoPE distance). See head_params().
  std::array<float, 3> lambda_sem{2.5f, 3.6f, 3.0f};
  std::array<float, 3> lambda_pos{8.0f, 3.0f, 5.0f};
  float head_jitter = 0.12f;  // per-head log-normal spread of both lambdas

  float k_perturb = 0.3f;    // W_k = W_q + k_perturb * W' (shared structure, not identical)
  float qk_noise = 0.08f;    // per-element noise on q and k, relative to their typical element
  float sem_theta = 0.01f;   // content goes to RoPE pairs turning slower than this (rad/token)
  float sem_floor = 0.15f;   // ... and this much to the fast ones
  float pos_theta = 0.12f;   // the positional vector lives on pairs faster than this
  float text_offset = 0.7f;  // the shared "text modality" direction in text features
  float w_modality = 0.5f;   // the shared "video modality" direction M in video features
  // Prompt keys of a head get a multiple of its projection of M, so that video queries, which
  // share M, gain this logit (uniform over heads) on every prompt key.
  std::array<float, 2> text_boost{3.0f, 6.0f};
  float pad_noise = 0.01f;  // padding tokens: one vector plus this little noise
};

// A unit direction of the feature space that belongs to the "model" (seed and tag only).
std::vector<float> model_direction(uint64_t seed, uint64_t tag, int dim);
inline constexpr uint64_t kTagModality = 0x3d0a11700aull;

// ---------------------------------------------------------------------------------------------
// Scene: per batch item, a background of materials (a warped Voronoi tiling whose cells reuse
// materials, so one material shows in several disjoint places) under a slow camera pan, and moving,
// scaling, rotating ellipses in depth order. Entities: materials 0..M-1, then object classes
// (two objects may share a class: the same appearance in two places).
// ---------------------------------------------------------------------------------------------
struct Entity {
  std::vector<float> proto;                    // [F]
  std::vector<std::vector<float>> parts;       // [parts][F]
  std::array<std::vector<float>, 3> tex;       // texture directions, [F] each
  std::array<float, 3> rgb{};                  // base colour in [0, 1]
  std::vector<std::array<float, 3>> part_rgb;  // per-part tint
  bool is_object = false;
  // Object parts: nearest of these seeds in the unit disk of object-local coordinates.
  std::vector<std::array<float, 2>> part_seeds;
};

struct Object {
  int entity = 0;
  float y0 = 0, x0 = 0;  // centre at frame 0, tokens
  float vy = 0, vx = 0;  // drift, tokens per frame
  float wobble_amp = 0, wobble_freq = 0, wobble_phase = 0;
  float ry = 1, rx = 1;        // semi-axes at frame 0, tokens
  float growth = 0;            // scale(t) = 1 + growth * t / (T - 1)
  float angle0 = 0, spin = 0;  // orientation (rad) and its change per frame
  // A swarm (birds, leaves, a crowd): many small ellipses of semi-axes (ry, rx) at these offsets
  // from the centre, each with its own flutter phase; blob i shows part i mod parts. Empty for a
  // single ellipse.
  std::vector<std::array<float, 3>> blobs;  // (dy, dx, phase)
};

struct Cell {
  float y = 0, x = 0;  // world coordinates, tokens
  int material = 0;
};

struct Scene {
  int64_t frames = 1, height = 1, width = 1;
  uint64_t key = 0;
  float pan_y = 0, pan_x = 0;  // camera motion, tokens per frame
  std::vector<Entity> entities;
  int materials = 0;
  std::vector<Cell> cells;
  std::vector<Object> objects;   // in depth order, front first; object id = index + 1
  std::vector<float> light_dir;  // [F]
  std::vector<float> modality;   // [F]: M, shared by every video token
  // Text (when the preset has some).
  std::vector<std::vector<float>> text_features;  // [text_tokens][F]
};

Scene build_scene(const Preset& preset, uint64_t seed, int64_t batch_index, const Knobs& knobs);

// Features [S][F] (video tokens in frame-major order, then text), object ids [S_video] and the
// picture [T][H][W][3] of one scene. Tokens are split over `threads` threads.
void render_scene(const Scene& scene, const Knobs& knobs, int threads, float* features, int32_t* object_ids,
                  uint8_t* rgb);

// ---------------------------------------------------------------------------------------------
// Per-head parameters, a function of (seed, head) only: the same "layer weights" for every batch
// item, as in a real model.
// ---------------------------------------------------------------------------------------------
struct HeadParams {
  HeadKind kind = HeadKind::Positional;
  int64_t dim = 0;
  std::vector<float> wq_t;         // [F][D]: q content = gain .* (W_q f); stored transposed
  std::vector<float> wk_t;         // [F][D]
  std::vector<float> wv_t;         // [F][D]
  std::vector<float> pos;          // [D]: the positional vector u (same for q and k)
  std::vector<float> v_pos;        // [6][D]: smooth position code added to v
  std::vector<float> text_k;       // [D]: added to text keys (before the q/k scales)
  float q_scale = 1, k_scale = 1;  // rho and 1/rho: unequal q/k norms, as trained models have
  float noise = 0;                 // per-element q/k noise
  std::vector<float> theta;        // [D/2] RoPE angle per unit position of each pair
  std::vector<int> band;           // [D/2] 0 = t, 1 = h, 2 = w
};

HeadParams head_params(const Preset& preset, uint64_t seed, int64_t head, const Knobs& knobs);

// The generator with explicit knobs (generate() uses the defaults).
Workload generate_with(const Preset& preset, uint64_t seed, DType dtype, const Progress& progress, int threads,
                       const Knobs& knobs);

}  // namespace sapattn::workload::detail
