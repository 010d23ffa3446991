// The workload generator: presets, head kinds, per-head projections with 3D RoPE, and the
// threaded projection of the scene features to Q, K, V. See docs/generator.md.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <mutex>
#include <numbers>
#include <thread>

#include "core/parallel.hpp"
#include "sapattn/error.hpp"
#include "workload/internal.hpp"

namespace sapattn::workload {

namespace {

constexpr uint64_t kTagHead = 0x4ead0101ull;
constexpr uint64_t kTagHeadNoise = 0x4015e0102ull;

Preset make_preset(std::string name, int64_t frames, int64_t height, int64_t width, int64_t heads, int64_t head_dim,
                   int64_t text = 0, int64_t prompt = 0) {
  Preset p;
  p.name = std::move(name);
  p.frames = frames;
  p.height = height;
  p.width = width;
  p.heads = heads;
  p.head_dim = head_dim;
  p.text_tokens = text;
  p.prompt_length = prompt;
  return p;
}

std::vector<Preset> all_presets() {
  std::vector<Preset> v;
  v.push_back(make_preset("tiny", 8, 20, 32, 4, 64));
  v.push_back(make_preset("tiny-text", 4, 16, 24, 2, 64, 64, 40));
  // Wan 2.1: 81 frames -> 21 latent frames; 480x832 -> 30x52 and 720x1280 -> 45x80 tokens
  // (VAE 8x, patch 2x2).
  v.push_back(make_preset("wan-1.3b-480p", 21, 30, 52, 12, 128));
  v.push_back(make_preset("wan-14b-720p", 21, 45, 80, 40, 128));
  // HunyuanVideo 720p: 129 frames -> 33 latent frames of 45x80 tokens = 118,800, then 256 text
  // tokens of which a typical ~50-word prompt fills 64. Its RoPE splits 128 dims as 16/56/56 with
  // theta 256 (not Wan's 44/42/42 with theta 10000).
  Preset h = make_preset("hunyuan-720p", 33, 45, 80, 24, 128, 256, 64);
  h.rope_dims = {16, 56, 56};
  h.rope_theta = 256.0;
  v.push_back(h);
  return v;
}

void validate_preset(const Preset& p) {
  SAPATTN_CHECK(p.batch >= 1 && p.frames >= 1 && p.height >= 1 && p.width >= 1 && p.heads >= 1, InvalidArgumentError,
                "preset '", p.name,
                "': batch, frames, height, width and heads must be "
                "positive, got ",
                p.batch, ", ", p.frames, ", ", p.height, ", ", p.width, ", ", p.heads);
  SAPATTN_CHECK(p.head_dim >= 2 && p.head_dim % 2 == 0, InvalidArgumentError, "preset '", p.name,
                "': head_dim must be even and >= 2 (RoPE turns pairs), got ", p.head_dim);
  SAPATTN_CHECK(p.text_tokens >= 0 && p.prompt_length >= 0 && p.prompt_length <= p.text_tokens, InvalidArgumentError,
                "preset '", p.name, "': need 0 <= prompt_length (", p.prompt_length, ") <= text_tokens (",
                p.text_tokens, ")");
  SAPATTN_CHECK(std::isfinite(p.rope_theta) && p.rope_theta > 1.0, InvalidArgumentError, "preset '", p.name,
                "': rope_theta must be > 1, got ", p.rope_theta);
  (void)rope_band_dims(p);
}

}  // namespace

std::string_view head_kind_name(HeadKind k) {
  switch (k) {
    case HeadKind::Positional:
      return "positional";
    case HeadKind::Semantic:
      return "semantic";
    case HeadKind::Mixed:
      return "mixed";
  }
  return "?";
}

std::vector<std::string> preset_names() {
  std::vector<std::string> names;
  for (const Preset& p : all_presets()) names.push_back(p.name);
  return names;
}

Preset preset(std::string_view name) {
  std::string valid;
  for (const Preset& p : all_presets()) {
    if (p.name == name) return p;
    valid += (valid.empty() ? "" : ", ") + p.name;
  }
  SAPATTN_THROW(InvalidArgumentError, "unknown workload preset '", name, "'; valid presets: ", valid);
}

std::array<int64_t, 3> rope_band_dims(const Preset& p) {
  const int64_t D = p.head_dim;
  if (p.rope_dims[0] == 0 && p.rope_dims[1] == 0 && p.rope_dims[2] == 0) {
    const int64_t sixth = D / 6;
    return {D - 4 * sixth, 2 * sixth, 2 * sixth};
  }
  const auto& r = p.rope_dims;
  SAPATTN_CHECK(
      r[0] >= 0 && r[1] >= 0 && r[2] >= 0 && r[0] % 2 == 0 && r[1] % 2 == 0 && r[2] % 2 == 0 && r[0] + r[1] + r[2] == D,
      InvalidArgumentError, "preset '", p.name, "': rope_dims (", r[0], ", ", r[1], ", ", r[2],
      ") must be even, non-negative and sum to head_dim ", D);
  return r;
}

HeadKind head_kind_for(int64_t h, int64_t heads) {
  SAPATTN_CHECK(heads >= 1 && h >= 0 && h < heads, InvalidArgumentError, "head ", h, " out of [0, ", heads, ")");
  // Largest deficit first: after head i, kind k should have about share_k * (i + 1) heads.
  constexpr double kShare[3] = {0.40, 0.35, 0.25};
  int64_t count[3] = {0, 0, 0};
  int chosen = 0;
  for (int64_t i = 0; i <= h; ++i) {
    double best = -1e30;
    for (int k = 0; k < 3; ++k) {
      const double deficit = kShare[k] * static_cast<double>(i + 1) - static_cast<double>(count[k]);
      if (deficit > best + 1e-12) {
        best = deficit;
        chosen = k;
      }
    }
    ++count[chosen];
  }
  return static_cast<HeadKind>(chosen);
}

namespace detail {

HeadParams head_params(const Preset& preset, uint64_t seed, int64_t head, const Knobs& knobs) {
  HeadParams hp;
  const int64_t D = preset.head_dim;
  const int F = knobs.feature_dim;
  hp.dim = D;
  hp.kind = head_kind_for(head, preset.heads);
  const int kind = static_cast<int>(hp.kind);
  Rng rng(mix(mix(seed, kTagHead), static_cast<uint64_t>(head)));

  // RoPE pairs in Wan's order: the t band's pairs, then h's, then w's; pair k of a band of m dims
  // turns by theta^(-2k/m) per unit of position.
  const auto bands = rope_band_dims(preset);
  for (int b = 0; b < 3; ++b) {
    for (int64_t k = 0; k < bands[b] / 2; ++k) {
      hp.theta.push_back(static_cast<float>(
          std::pow(preset.rope_theta, -2.0 * static_cast<double>(k) / static_cast<double>(bands[b]))));
      hp.band.push_back(b);
    }
  }

  // Content gain per dim: content sits mostly on slowly turning pairs (theta < sem_theta = 0.01 rad
  // per token keeps a pair within ~1 rad over 100 tokens, more than any latent grid's extent), so
  // it matches across the whole video; the fast pairs keep sem_floor of it. Mean square 1.
  std::vector<double> gain(D);
  double g2 = 0;
  for (int64_t d = 0; d < D; ++d) {
    const double th = hp.theta[d / 2];
    gain[d] = knobs.sem_floor + (1.0 - knobs.sem_floor) * std::exp(-th / knobs.sem_theta);
    g2 += gain[d] * gain[d];
  }
  for (double& g : gain) g /= std::sqrt(g2 / static_cast<double>(D));

  const double lambda_sem = knobs.lambda_sem[kind] * std::exp(knobs.head_jitter * rng.normal());
  const double lambda_pos = knobs.lambda_pos[kind] * std::exp(knobs.head_jitter * rng.normal());
  const double sqrt_d = std::sqrt(static_cast<double>(D));
  const double eps = knobs.k_perturb;
  // W entries N(0, 1/D) * gain: E[W_q^T G^2 W_k] = I / sqrt(1 + eps^2) with W_k normalised, so
  // c_s^2 = lambda_sem * sqrt(D) * sqrt(1 + eps^2) makes the content logit lambda_sem * f_i.f_j.
  const double c_sem = std::sqrt(lambda_sem * sqrt_d * std::sqrt(1.0 + eps * eps));
  hp.wq_t.assign(static_cast<size_t>(F) * D, 0.0f);
  hp.wk_t.assign(static_cast<size_t>(F) * D, 0.0f);
  hp.wv_t.assign(static_cast<size_t>(F) * D, 0.0f);
  const double w_sd = 1.0 / sqrt_d;
  for (int64_t d = 0; d < D; ++d) {
    for (int j = 0; j < F; ++j) {
      const double a = rng.normal() * w_sd, b = rng.normal() * w_sd;
      const size_t idx = static_cast<size_t>(j) * D + d;
      hp.wq_t[idx] = static_cast<float>(c_sem * gain[d] * a);
      hp.wk_t[idx] = static_cast<float>(c_sem * gain[d] * (a + eps * b) / std::sqrt(1.0 + eps * eps));
    }
  }
  // V: entries of std 0.7, so that v elements have about unit variance (|f|^2 is about 2).
  for (float& w : hp.wv_t) w = static_cast<float>(0.7 * rng.normal());

  // Positional vector u: on the fast pairs (1 - exp(-theta / pos_theta)), band weights alpha.
  // 40% of heads care little about time (alpha_t 0.1-0.3: the same place in every frame, SVG1's
  // "temporal" heads), the rest attend within nearby frames ("spatial" heads). |u| = 1, times
  // c_p = sqrt(lambda_pos * sqrt(D)): the positional logit is lambda_pos at distance 0.
  std::array<double, 3> alpha{rng.uniform() < 0.4 ? rng.uniform(0.1, 0.3) : rng.uniform(0.7, 1.0),
                              rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)};
  hp.pos.assign(D, 0.0f);
  std::vector<double> u(D);
  double u2 = 0;
  for (int64_t c = 0; c < D / 2; ++c) {
    const double mag = alpha[hp.band[c]] * (1.0 - std::exp(-hp.theta[c] / knobs.pos_theta));
    const double phase = rng.uniform(0, 2 * std::numbers::pi);
    u[2 * c] = mag * std::cos(phase);
    u[2 * c + 1] = mag * std::sin(phase);
    u2 += mag * mag;
  }
  const double c_pos = std::sqrt(lambda_pos * sqrt_d) / std::sqrt(std::max(u2, 1e-30));
  for (int64_t d = 0; d < D; ++d) hp.pos[d] = static_cast<float>(c_pos * u[d]);

  // Text keys: a per-head pull of the video queries towards the prompt (see Knobs::text_boost).
  const std::vector<float> modality = model_direction(seed, kTagModality, F);
  // A video query holds w_modality * M, so beta * M on the key side adds a content logit of about
  // lambda_sem * w_modality * beta: beta = boost / (lambda_sem * w_modality).
  const double boost =
      rng.uniform(knobs.text_boost[0], knobs.text_boost[1]) / (lambda_sem * std::max(knobs.w_modality, 1e-3f));
  hp.text_k.assign(D, 0.0f);
  for (int j = 0; j < F; ++j) {
    for (int64_t d = 0; d < D; ++d) hp.text_k[d] += static_cast<float>(boost * modality[j]) * hp.wk_t[j * D + d];
  }

  hp.v_pos.assign(6 * static_cast<size_t>(D), 0.0f);
  for (float& w : hp.v_pos) w = static_cast<float>(0.5 * rng.normal());

  // q/k norm asymmetry (logits unchanged), and per-element noise at qk_noise of the typical
  // element size sqrt((c_s^2 |f|^2 + c_p^2) / D) with |f|^2 ~ 2.
  const double rho = std::exp(0.25 * rng.normal());
  hp.q_scale = static_cast<float>(rho);
  hp.k_scale = static_cast<float>(1.0 / rho);
  hp.noise = static_cast<float>(knobs.qk_noise *
                                std::sqrt((c_sem * c_sem * 2.0 + lambda_pos * sqrt_d) / static_cast<double>(D)));
  return hp;
}

namespace {

// Projects one (batch item, head) to its [S, D] slices of q, k, v.
void project_head(const Preset& preset, const HeadParams& hp, const float* features, int feature_dim,
                  uint64_t noise_key, DType dtype, void* q_out, void* k_out, void* v_out) {
  const int64_t D = hp.dim, F = feature_dim;
  const int64_t T = preset.frames, H = preset.height, W = preset.width, HW = H * W;
  const int64_t S_video = preset.video_tokens(), S = preset.tokens(), P = D / 2;
  // cos/sin tables per band and position.
  const int64_t extent[3] = {T, H, W};
  std::array<std::vector<float>, 3> cos_t, sin_t;
  for (int b = 0; b < 3; ++b) {
    cos_t[b].assign(static_cast<size_t>(extent[b] * P), 1.0f);
    sin_t[b].assign(static_cast<size_t>(extent[b] * P), 0.0f);
    for (int64_t pos = 0; pos < extent[b]; ++pos) {
      for (int64_t c = 0; c < P; ++c) {
        if (hp.band[c] != b) continue;
        const double a = static_cast<double>(hp.theta[c]) * static_cast<double>(pos);
        cos_t[b][pos * P + c] = static_cast<float>(std::cos(a));
        sin_t[b][pos * P + c] = static_cast<float>(std::sin(a));
      }
    }
  }
  std::vector<float> qa(D), ka(D), va(D);
  auto store = [dtype](void* base, int64_t offset, const float* src, int64_t n) {
    store_run_from_f32(base, dtype, offset, 1, n, src);
  };
  const float pi = static_cast<float>(std::numbers::pi);
  for (int64_t s = 0; s < S; ++s) {
    const float* f = features + s * F;
    std::fill(qa.begin(), qa.end(), 0.0f);
    std::fill(ka.begin(), ka.end(), 0.0f);
    std::fill(va.begin(), va.end(), 0.0f);
    // f-major so that the inner loop over d vectorises without reassociating sums.
    for (int64_t j = 0; j < F; ++j) {
      const float fj = f[j];
      const float* wq = hp.wq_t.data() + j * D;
      const float* wk = hp.wk_t.data() + j * D;
      const float* wv = hp.wv_t.data() + j * D;
      for (int64_t d = 0; d < D; ++d) {
        qa[d] += wq[d] * fj;
        ka[d] += wk[d] * fj;
        va[d] += wv[d] * fj;
      }
    }
    // Padding tokens stay near-identical: one embedding through the same layers, no extra noise.
    const uint64_t nk = mix(noise_key, static_cast<uint64_t>(s));
    for (int64_t d = 0; d < D && s < S_video + preset.prompt_length; ++d) {
      qa[d] += hp.noise * approx_normal(splitmix64(nk + static_cast<uint64_t>(2 * d)));
      ka[d] += hp.noise * approx_normal(splitmix64(nk + static_cast<uint64_t>(2 * d + 1)));
    }
    if (s >= S_video && s < S_video + preset.prompt_length) {
      for (int64_t d = 0; d < D; ++d) ka[d] += hp.text_k[d];
    }
    if (s < S_video) {
      const int64_t pos[3] = {s / HW, (s % HW) / W, s % W};
      // V gets a smooth code of the position, so outputs of local heads differ from place to place.
      float code[6];
      for (int b = 0; b < 3; ++b) {
        const float r = static_cast<float>(pos[b]) / static_cast<float>(std::max<int64_t>(extent[b] - 1, 1));
        code[2 * b] = std::cos(pi * r);
        code[2 * b + 1] = std::cos(2.0f * pi * r);
      }
      for (int i = 0; i < 6; ++i) {
        const float* vp = hp.v_pos.data() + i * D;
        for (int64_t d = 0; d < D; ++d) va[d] += code[i] * vp[d];
      }
      for (int64_t d = 0; d < D; ++d) {
        qa[d] += hp.pos[d];
        ka[d] += hp.pos[d];
      }
      // RoPE: pair c turns by theta_c * (its band's position).
      for (int64_t c = 0; c < P; ++c) {
        const int b = hp.band[c];
        const float cs = cos_t[b][pos[b] * P + c], sn = sin_t[b][pos[b] * P + c];
        const float q0 = qa[2 * c], q1 = qa[2 * c + 1], k0 = ka[2 * c], k1 = ka[2 * c + 1];
        qa[2 * c] = q0 * cs - q1 * sn;
        qa[2 * c + 1] = q0 * sn + q1 * cs;
        ka[2 * c] = k0 * cs - k1 * sn;
        ka[2 * c + 1] = k0 * sn + k1 * cs;
      }
    }
    for (int64_t d = 0; d < D; ++d) {
      qa[d] *= hp.q_scale;
      ka[d] *= hp.k_scale;
    }
    store(q_out, s * D, qa.data(), D);
    store(k_out, s * D, ka.data(), D);
    store(v_out, s * D, va.data(), D);
  }
}

}  // namespace

Workload generate_with(const Preset& preset, uint64_t seed, DType dtype, const Progress& progress, int threads,
                       const Knobs& knobs) {
  validate_preset(preset);
  SAPATTN_CHECK(is_floating(dtype), DTypeError, "workload dtype must be f32, f16 or bf16, got ", dtype_name(dtype));
  const int64_t B = preset.batch, Hh = preset.heads, D = preset.head_dim;
  const int64_t S = preset.tokens(), S_video = preset.video_tokens();
  const int F = knobs.feature_dim;
  Workload w;
  w.preset = preset;
  w.seed = seed;
  w.q = Tensor(dtype, {B, Hh, S, D});
  w.k = Tensor(dtype, {B, Hh, S, D});
  w.v = Tensor(dtype, {B, Hh, S, D});
  // Tensors hold at most rank 4: the [B,T,Hl,Wl,3] picture is stored as [B*T, Hl, Wl, 3].
  w.frames_rgb = Tensor(DType::U8, {B * preset.frames, preset.height, preset.width, 3});
  w.object_ids = Tensor(DType::I32, {B, S_video});
  for (int64_t h = 0; h < Hh; ++h) w.head_kinds.push_back(head_kind_for(h, Hh));

  const int n_threads = resolve_threads(threads);
  const int64_t total = B * (Hh + 1);
  std::mutex progress_mutex;
  int64_t done = 0;
  auto tick = [&] {
    if (!progress) return;
    std::lock_guard<std::mutex> lock(progress_mutex);
    progress(++done, total);
  };

  std::vector<float> features(static_cast<size_t>(B * S * F));
  for (int64_t b = 0; b < B; ++b) {
    const Scene scene = build_scene(preset, seed, b, knobs);
    render_scene(scene, knobs, n_threads, features.data() + b * S * F, w.object_ids.data_as<int32_t>() + b * S_video,
                 w.frames_rgb.data_as<uint8_t>() + b * S_video * 3);
    tick();
  }
  std::vector<HeadParams> params(static_cast<size_t>(Hh));
  parallel_for(Hh, n_threads, [&](int64_t h) { params[h] = head_params(preset, seed, h, knobs); });

  const size_t elem = dtype_size(dtype);
  const int64_t slice = S * D;
  parallel_for(B * Hh, n_threads, [&](int64_t task) {
    const int64_t b = task / Hh, h = task % Hh;
    const int64_t offset = (b * Hh + h) * slice * static_cast<int64_t>(elem);
    const uint64_t noise_key = mix(mix(mix(seed, kTagHeadNoise), static_cast<uint64_t>(b)), static_cast<uint64_t>(h));
    project_head(preset, params[h], features.data() + b * S * F, F, noise_key, dtype,
                 static_cast<char*>(w.q.data()) + offset, static_cast<char*>(w.k.data()) + offset,
                 static_cast<char*>(w.v.data()) + offset);
    tick();
  });
  return w;
}

}  // namespace detail

Workload generate(const Preset& preset, uint64_t seed, DType dtype, const Progress& progress, int threads) {
  return detail::generate_with(preset, seed, dtype, progress, threads, detail::Knobs{});
}

}  // namespace sapattn::workload
