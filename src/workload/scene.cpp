// The scene model of the workload generator: background materials, moving objects, text, and the
// per-token content features and picture they render to. See docs/generator.md.
#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/parallel.hpp"
#include "workload/internal.hpp"

namespace sapattn::workload::detail {

namespace {

// Purpose tags of the hash keys (arbitrary distinct constants).
constexpr uint64_t kTagScene = 0x5ce4e0001ull;
constexpr uint64_t kTagText = 0x7e470002ull;
constexpr uint64_t kTagNoise = 0x4015e0003ull;
constexpr uint64_t kTagLight = 0x1169700004ull;
constexpr uint64_t kTagWarp = 0x3a4b0005ull;
constexpr uint64_t kTagParts = 0x9a4750006ull;
constexpr uint64_t kTagEntity = 0xe4717e0007ull;

std::vector<float> unit_vector(Rng& rng, int dim) {
  std::vector<float> v(dim);
  double n2 = 0;
  for (float& x : v) {
    x = static_cast<float>(rng.normal());
    n2 += static_cast<double>(x) * x;
  }
  const float inv = static_cast<float>(1.0 / std::sqrt(std::max(n2, 1e-30)));
  for (float& x : v) x *= inv;
  return v;
}

std::array<float, 3> hsv_to_rgb(double h, double s, double v) {
  const double hh = std::fmod(h, 1.0) * 6.0;
  const int i = static_cast<int>(hh);
  const double f = hh - i;
  const double p = v * (1 - s), q = v * (1 - s * f), t = v * (1 - s * (1 - f));
  double r = v, g = t, b = p;
  switch (i) {
    case 0:
      r = v;
      g = t;
      b = p;
      break;
    case 1:
      r = q;
      g = v;
      b = p;
      break;
    case 2:
      r = p;
      g = v;
      b = t;
      break;
    case 3:
      r = p;
      g = q;
      b = v;
      break;
    case 4:
      r = t;
      g = p;
      b = v;
      break;
    default:
      r = v;
      g = p;
      b = q;
      break;
  }
  return {static_cast<float>(r), static_cast<float>(g), static_cast<float>(b)};
}

Entity make_entity(Rng& rng, int dim, bool is_object) {
  Entity e;
  e.is_object = is_object;
  e.proto = unit_vector(rng, dim);
  // 3-5 parts: a figure's head/body/limbs, or the patches of a material (grass and soil in a field).
  const int parts = static_cast<int>(rng.uniform_int(3, 5));
  for (int p = 0; p < parts; ++p) {
    e.parts.push_back(unit_vector(rng, dim));
    e.part_rgb.push_back({static_cast<float>(rng.uniform(-0.08, 0.08)), static_cast<float>(rng.uniform(-0.08, 0.08)),
                          static_cast<float>(rng.uniform(-0.08, 0.08))});
    const double r = std::sqrt(rng.uniform()) * 0.8, a = rng.uniform(0, 2 * std::numbers::pi);
    e.part_seeds.push_back({static_cast<float>(r * std::cos(a)), static_cast<float>(r * std::sin(a))});
  }
  for (auto& t : e.tex) t = unit_vector(rng, dim);
  // Backgrounds muted (saturation 0.2-0.55), objects vivid (0.6-0.95), so the picture reads well.
  e.rgb = is_object ? hsv_to_rgb(rng.uniform(), rng.uniform(0.6, 0.95), rng.uniform(0.65, 1.0))
                    : hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 0.55), rng.uniform(0.35, 0.8));
  return e;
}

}  // namespace

std::vector<float> model_direction(uint64_t seed, uint64_t tag, int dim) {
  Rng rng(mix(seed, tag));
  return unit_vector(rng, dim);
}

float value_noise(uint64_t key, float y, float x) {
  const float fy = std::floor(y), fx = std::floor(x);
  const auto iy = static_cast<int64_t>(fy), ix = static_cast<int64_t>(fx);
  auto lattice = [&](int64_t a, int64_t b) {
    const uint64_t h = mix(key, static_cast<uint64_t>(a) * 0x9e3779b1ull ^ static_cast<uint64_t>(b));
    return unit_float(h) * 2.0f - 1.0f;
  };
  auto smooth = [](float t) { return t * t * (3.0f - 2.0f * t); };
  const float ty = smooth(y - fy), tx = smooth(x - fx);
  const float a = lattice(iy, ix), b = lattice(iy, ix + 1);
  const float c = lattice(iy + 1, ix), d = lattice(iy + 1, ix + 1);
  return (a + (b - a) * tx) + ((c + (d - c) * tx) - (a + (b - a) * tx)) * ty;
}

float fractal_noise(uint64_t key, float y, float x, float scale) {
  const float inv = 1.0f / scale;
  return 0.7f * value_noise(key, y * inv, x * inv) +
         0.3f * value_noise(key ^ 0x5bd1e995ull, 2.0f * y * inv + 17.3f, 2.0f * x * inv + 5.1f);
}

Scene build_scene(const Preset& preset, uint64_t seed, int64_t batch_index, const Knobs& knobs) {
  Scene sc;
  sc.frames = preset.frames;
  sc.height = preset.height;
  sc.width = preset.width;
  sc.key = mix(mix(seed, kTagScene), static_cast<uint64_t>(batch_index));
  Rng rng(sc.key);
  const int dim = knobs.feature_dim;
  const double H = static_cast<double>(preset.height), W = static_cast<double>(preset.width);
  const double L = std::min(H, W);
  const double span = static_cast<double>(std::max<int64_t>(preset.frames - 1, 1));

  // Camera: 70% of clips pan, by 5-20% of the width (and +-5% of the height) over the clip.
  if (rng.uniform() < 0.7) {
    const double dir = rng.uniform() < 0.5 ? -1.0 : 1.0;
    sc.pan_x = static_cast<float>(dir * rng.uniform(0.05, 0.2) * W / span);
    sc.pan_y = static_cast<float>(rng.uniform(-0.05, 0.05) * H / span);
  }

  // Background: 4-7 materials over 2M..2M+4 Voronoi cells; the first 2M cells take each material
  // twice, so every material shows in at least two places (disjoint unless the cells touch).
  sc.materials = static_cast<int>(rng.uniform_int(4, 7));
  for (int m = 0; m < sc.materials; ++m) sc.entities.push_back(make_entity(rng, dim, false));
  const int n_cells = 2 * sc.materials + static_cast<int>(rng.uniform_int(0, 4));
  const double pan_extent_y = std::abs(sc.pan_y) * span, pan_extent_x = std::abs(sc.pan_x) * span;
  const double y_lo = std::min(0.0, sc.pan_y * span) - 0.1 * H, y_hi = y_lo + 1.2 * H + pan_extent_y;
  const double x_lo = std::min(0.0, sc.pan_x * span) - 0.1 * W, x_hi = x_lo + 1.2 * W + pan_extent_x;
  for (int c = 0; c < n_cells; ++c) {
    Cell cell;
    cell.y = static_cast<float>(rng.uniform(y_lo, y_hi));
    cell.x = static_cast<float>(rng.uniform(x_lo, x_hi));
    cell.material = c < 2 * sc.materials ? c % sc.materials : static_cast<int>(rng.uniform_int(0, sc.materials - 1));
    sc.cells.push_back(cell);
  }

  // Objects: 3-8, each 10-25% of min(H, W) in radius, crossing 15-50% of the width over the clip
  // with a little wobble, growing or shrinking by up to 25%, turning by up to 0.5 rad. 30% of
  // the objects after the first reuse an earlier object's class (same look, another place).
  const int n_objects = static_cast<int>(rng.uniform_int(3, 8));
  std::vector<int> classes;
  for (int i = 0; i < n_objects; ++i) {
    Object o;
    if (i > 0 && rng.uniform() < 0.3) {
      o.entity = classes[rng.uniform_int(0, static_cast<int64_t>(classes.size()) - 1)];
    } else {
      o.entity = static_cast<int>(sc.entities.size());
      sc.entities.push_back(make_entity(rng, dim, true));
      classes.push_back(o.entity);
    }
    const double r = rng.uniform(0.1, 0.25) * L;
    o.ry = static_cast<float>(std::max(1.0, r * rng.uniform(0.7, 1.3)));
    o.rx = static_cast<float>(std::max(1.0, r * rng.uniform(0.7, 1.4)));
    o.y0 = static_cast<float>(rng.uniform(0.15, 0.85) * H);
    o.x0 = static_cast<float>(rng.uniform(0.1, 0.9) * W);
    const double travel = rng.uniform(0.15, 0.5) * W, heading = rng.uniform(0, 2 * std::numbers::pi);
    o.vy = static_cast<float>(0.5 * travel * std::sin(heading) / span);  // vertical motion is slower
    o.vx = static_cast<float>(travel * std::cos(heading) / span);
    if (preset.frames < 2) o.vy = o.vx = 0;
    o.wobble_amp = static_cast<float>(rng.uniform(0.0, 0.05) * L);
    o.wobble_freq = static_cast<float>(rng.uniform(0.5, 2.0) * 2 * std::numbers::pi / span);
    o.wobble_phase = static_cast<float>(rng.uniform(0, 2 * std::numbers::pi));
    o.growth = static_cast<float>(rng.uniform(-0.2, 0.25));
    o.angle0 = static_cast<float>(rng.uniform(0, std::numbers::pi));
    o.spin = static_cast<float>(rng.uniform(-0.5, 0.5) / span);
    sc.objects.push_back(o);
  }
  // 60% of scenes also hold a swarm: 8-20 blobs of 0.04 min(H, W) (at least 0.6 tokens) spread
  // over 60% of the frame, one class and one object id, drifting together with some flutter. Its
  // tokens are scattered in small groups over many rows and frames.
  if (rng.uniform() < 0.6) {
    Object o;
    o.entity = static_cast<int>(sc.entities.size());
    sc.entities.push_back(make_entity(rng, dim, true));
    o.ry = o.rx = static_cast<float>(std::max(0.6, 0.04 * L));
    o.y0 = static_cast<float>(rng.uniform(0.3, 0.7) * H);
    o.x0 = static_cast<float>(rng.uniform(0.3, 0.7) * W);
    const double travel = rng.uniform(0.2, 0.5) * W, heading = rng.uniform(0, 2 * std::numbers::pi);
    o.vy = static_cast<float>(0.5 * travel * std::sin(heading) / span);
    o.vx = static_cast<float>(travel * std::cos(heading) / span);
    if (preset.frames < 2) o.vy = o.vx = 0;
    o.wobble_amp = static_cast<float>(0.03 * L);
    o.wobble_freq = static_cast<float>(rng.uniform(1.0, 3.0) * 2 * std::numbers::pi / span);
    const int n_blobs = static_cast<int>(rng.uniform_int(8, 20));
    for (int i = 0; i < n_blobs; ++i) {
      o.blobs.push_back({static_cast<float>(rng.uniform(-0.3, 0.3) * H), static_cast<float>(rng.uniform(-0.3, 0.3) * W),
                         static_cast<float>(rng.uniform(0, 2 * std::numbers::pi))});
    }
    // Somewhere in the depth order.
    const auto at = rng.uniform_int(0, static_cast<int64_t>(sc.objects.size()));
    sc.objects.insert(sc.objects.begin() + at, o);
  }
  sc.light_dir = unit_vector(rng, dim);
  sc.modality = model_direction(seed, kTagModality, dim);

  // Text: the "text modality" direction, the vocabulary of non-visual words and the padding vector
  // are properties of the model (seed only); which words the prompt uses is per batch item.
  if (preset.text_tokens > 0) {
    Rng model_rng(mix(seed, kTagText));
    const std::vector<float> text_dir = unit_vector(model_rng, dim);
    const std::vector<float> pad = unit_vector(model_rng, dim);
    std::vector<std::vector<float>> vocab;
    for (int w = 0; w < 24; ++w) vocab.push_back(unit_vector(model_rng, dim));
    for (int64_t j = 0; j < preset.text_tokens; ++j) {
      std::vector<float> f(dim, 0.0f);
      const bool prompt = j < preset.prompt_length;
      if (prompt && rng.uniform() < 0.45) {
        // A word naming something in the video: mostly objects, else a material.
        const int n_ent = static_cast<int>(sc.entities.size());
        const int e = rng.uniform() < 0.7 && n_ent > sc.materials
                          ? static_cast<int>(rng.uniform_int(sc.materials, n_ent - 1))
                          : static_cast<int>(rng.uniform_int(0, sc.materials - 1));
        const Entity& ent = sc.entities[e];
        const auto& part = ent.parts[rng.uniform_int(0, static_cast<int64_t>(ent.parts.size()) - 1)];
        for (int d = 0; d < dim; ++d) f[d] = 0.9f * ent.proto[d] + 0.4f * part[d];
      } else if (prompt) {
        const auto& w = vocab[rng.uniform_int(0, static_cast<int64_t>(vocab.size()) - 1)];
        for (int d = 0; d < dim; ++d) f[d] = 0.9f * w[d];
      } else {
        f = pad;
      }
      const float noise = prompt ? 0.2f : knobs.pad_noise;
      for (int d = 0; d < dim; ++d) {
        const uint64_t h = mix(mix(sc.key, kTagText), static_cast<uint64_t>(j * dim + d));
        f[d] += knobs.text_offset * text_dir[d] + noise * approx_normal(h) / std::sqrt(static_cast<float>(dim));
      }
      sc.text_features.push_back(std::move(f));
    }
  }
  return sc;
}

void render_scene(const Scene& sc, const Knobs& knobs, int threads, float* features, int32_t* object_ids,
                  uint8_t* rgb) {
  const int dim = knobs.feature_dim;
  const int64_t T = sc.frames, H = sc.height, W = sc.width, HW = H * W;
  const float L = static_cast<float>(std::min(H, W));
  const float tex_period = std::max(2.0f, knobs.texture_period * L);
  const float part_cell = std::max(2.0f, 0.3f * L);  // background part patches ~30% of min(H, W)
  const float warp_amp = 0.12f * L, warp_period = 0.35f * L;
  const float span = static_cast<float>(std::max<int64_t>(T - 1, 1));
  const float inv_sqrt_f = 1.0f / std::sqrt(static_cast<float>(dim));

  // One task per frame: each token depends only on (scene, t, y, x), so the split is free.
  parallel_for(T, threads, [&](int64_t t) {
    const float tf = static_cast<float>(t);
    // Object geometry of this frame.
    struct Pose {
      float cy, cx, c, s, ry, rx, scale;
    };
    std::vector<Pose> poses;
    for (const Object& o : sc.objects) {
      const float w = o.wobble_freq * tf + o.wobble_phase;
      const float scale = 1.0f + o.growth * tf / span;
      const float a = o.angle0 + o.spin * tf;
      poses.push_back({o.y0 + o.vy * tf + o.wobble_amp * std::sin(w), o.x0 + o.vx * tf + o.wobble_amp * std::cos(w),
                       std::cos(a), std::sin(a), o.ry * scale, o.rx * scale, scale});
    }
    std::vector<float> f(dim);
    for (int64_t y = 0; y < H; ++y) {
      for (int64_t x = 0; x < W; ++x) {
        const int64_t s = t * HW + y * W + x;
        const float fy = static_cast<float>(y), fx = static_cast<float>(x);
        // Front-most object covering the token centre, if any.
        int obj = -1, blob = -1;
        float ty = 0, tx = 0, nu = 0, nv = 0;
        for (size_t i = 0; i < poses.size() && obj < 0; ++i) {
          const Pose& p = poses[i];
          const Object& ob = sc.objects[i];
          if (!ob.blobs.empty()) {
            for (size_t k = 0; k < ob.blobs.size(); ++k) {
              const auto& bl = ob.blobs[k];
              const float ph = ob.wobble_freq * tf + bl[2];
              const float dy = fy - (p.cy + bl[0] + ob.wobble_amp * std::sin(ph));
              const float dx = fx - (p.cx + bl[1] + ob.wobble_amp * std::cos(1.3f * ph));
              if (dy * dy + dx * dx <= p.ry * p.ry) {
                obj = static_cast<int>(i);
                ty = dy;
                tx = dx;
                blob = static_cast<int>(k);
                break;
              }
            }
            continue;
          }
          const float dy = fy - p.cy, dx = fx - p.cx;
          const float ly = p.c * dy + p.s * dx, lx = -p.s * dy + p.c * dx;
          const float u = ly / p.ry, v = lx / p.rx;
          if (u * u + v * v <= 1.0f) {
            obj = static_cast<int>(i);
            ty = ly / p.scale;  // texture coordinates ride (and stretch) with the object
            tx = lx / p.scale;
            nu = u;
            nv = v;
            break;
          }
        }
        const float wy = fy + sc.pan_y * tf, wx = fx + sc.pan_x * tf;  // world coordinates
        int ent = 0, part = 0;
        uint64_t tex_key = 0;
        if (obj >= 0) {
          ent = sc.objects[obj].entity;
          const Entity& e = sc.entities[ent];
          if (blob >= 0) {
            part = blob % static_cast<int>(e.parts.size());  // a swarm: sub-groups of blobs
          } else {
            float best = 1e30f;
            for (size_t k = 0; k < e.part_seeds.size(); ++k) {
              const float a = nu - e.part_seeds[k][0], b = nv - e.part_seeds[k][1];
              if (a * a + b * b < best) {
                best = a * a + b * b;
                part = static_cast<int>(k);
              }
            }
          }
          tex_key = mix(sc.key, kTagEntity + static_cast<uint64_t>(ent));
        } else {
          // Material: nearest Voronoi cell of the noise-warped world position.
          const float py = wy + warp_amp * value_noise(mix(sc.key, kTagWarp), wy / warp_period, wx / warp_period);
          const float px = wx + warp_amp * value_noise(mix(sc.key, kTagWarp + 1), wy / warp_period, wx / warp_period);
          float best = 1e30f;
          for (const Cell& c : sc.cells) {
            const float a = py - c.y, b = px - c.x;
            if (a * a + b * b < best) {
              best = a * a + b * b;
              ent = c.material;
            }
          }
          // Part: a jittered lattice Voronoi in world space, labels hashed per material.
          const float gy = wy / part_cell, gx = wx / part_cell;
          const auto iy = static_cast<int64_t>(std::floor(gy)), ix = static_cast<int64_t>(std::floor(gx));
          float pbest = 1e30f;
          const auto n_parts = static_cast<uint64_t>(sc.entities[ent].parts.size());
          for (int64_t a = iy - 1; a <= iy + 1; ++a) {
            for (int64_t b = ix - 1; b <= ix + 1; ++b) {
              const uint64_t h =
                  mix(mix(sc.key, kTagParts), static_cast<uint64_t>(a) * 0x632be5abull ^ static_cast<uint64_t>(b));
              const float cy = static_cast<float>(a) + unit_float(h), cx = static_cast<float>(b) + unit_float(h << 24);
              const float d2 = (gy - cy) * (gy - cy) + (gx - cx) * (gx - cx);
              if (d2 < pbest) {
                pbest = d2;
                part = static_cast<int>(mix(h, static_cast<uint64_t>(ent)) % n_parts);
              }
            }
          }
          ty = wy;
          tx = wx;
          tex_key = mix(sc.key, kTagEntity + static_cast<uint64_t>(ent));
        }
        const Entity& e = sc.entities[ent];
        float n[3];
        for (int j = 0; j < 3; ++j) n[j] = fractal_noise(tex_key + static_cast<uint64_t>(j), ty, tx, tex_period);
        // Illumination: a smooth field drifting slowly over time, shared by all entities.
        const float light = fractal_noise(mix(sc.key, kTagLight), wy + 0.1f * tf, wx, 0.6f * L);

        const uint64_t noise_key = mix(mix(sc.key, kTagNoise), static_cast<uint64_t>(s));
        const auto& pv = e.parts[part];
        for (int d = 0; d < dim; ++d) {
          f[d] = knobs.w_proto * e.proto[d] + knobs.w_part * pv[d] +
                 knobs.w_texture * (n[0] * e.tex[0][d] + n[1] * e.tex[1][d] + n[2] * e.tex[2][d]) +
                 knobs.w_light * light * sc.light_dir[d] + knobs.w_modality * sc.modality[d] +
                 knobs.w_noise * inv_sqrt_f * approx_normal(mix(noise_key, static_cast<uint64_t>(d)));
        }
        std::copy(f.begin(), f.end(), features + s * dim);
        object_ids[s] = obj + 1;

        if (rgb != nullptr) {
          for (int c = 0; c < 3; ++c) {
            const float val =
                e.rgb[c] * (1.0f + 0.3f * n[0] + 0.1f * n[c]) * (1.0f + 0.25f * light) + e.part_rgb[part][c];
            rgb[s * 3 + c] = static_cast<uint8_t>(std::clamp(val, 0.0f, 1.0f) * 255.0f + 0.5f);
          }
        }
      }
    }
  });
  const int64_t S_video = T * HW;
  for (size_t j = 0; j < sc.text_features.size(); ++j) {
    std::copy(sc.text_features[j].begin(), sc.text_features[j].end(),
              features + (S_video + static_cast<int64_t>(j)) * dim);
  }
}

}  // namespace sapattn::workload::detail
