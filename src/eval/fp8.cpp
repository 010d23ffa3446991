// The FP8 attention in the evaluation: run_e4m3 on a sparse result's selection, and the text form
// of Fp8Options that `sapattn eval --fp8` takes (include/sapattn/eval.hpp).
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>

#include "sapattn/eval.hpp"
#include "sapattn/ops.hpp"

namespace sapattn::eval {

MethodResult run_e4m3(const MethodResult& sparse, const TensorView& q, const TensorView& k, const TensorView& v,
                      const Config& config, const Fp8Options& options, int threads) {
  SAPATTN_CHECK(sparse.method == Method::Sap || sparse.method == Method::Blocks || sparse.method == Method::Oracle,
                InvalidArgumentError, "run_e4m3 takes a result of sap, blocks or oracle, got ",
                method_name(sparse.method));
  SAPATTN_CHECK(!config.compensate, InvalidArgumentError,
                "run_e4m3 compares the attention alone: the result must come from a config without compensate");
  const Stream stream = Stream::cpu(threads);
  const int64_t B = q.shape[0], H = q.shape[1], S = q.shape[2], D = q.shape[3];
  const int64_t Cq = sparse.mask.shape()[2], Ck = sparse.mask.shape()[3];
  // The selection's cluster order, rebuilt from its labels as svg2_attention builds it.
  Tensor q_perm(DType::I32, {B, H, S}), k_perm(DType::I32, {B, H, S});
  Tensor q_offsets(DType::I32, {B, H, Cq + 1}), k_offsets(DType::I32, {B, H, Ck + 1});
  cluster_permutation(sparse.q_labels.view(), static_cast<int>(Cq), q_perm.view(), q_offsets.view(), stream);
  cluster_permutation(sparse.k_labels.view(), static_cast<int>(Ck), k_perm.view(), k_offsets.view(), stream);
  MethodResult r;
  r.method = sparse.method;
  r.out = Tensor(DType::F32, {B, H, S, D});
  r.lse = Tensor(DType::F32, {B, H, S});
  r.density = Tensor(DType::F32, {B, H});
  std::memcpy(r.density.data(), sparse.density.data(), r.density.bytes());
  const auto start = std::chrono::steady_clock::now();
  block_sparse_attention_e4m3(q, k, v, BlockLayout{q_offsets.view(), k_offsets.view(), sparse.mask.view()},
                              config.scale_for(D), options, r.out.view(), r.lse.view(), stream, {},
                              RowPermutation{q_perm.view(), k_perm.view()});
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

namespace {

// The number after a one-letter prefix ("64" of "k64"), or false.
template <typename T>
bool number_after(std::string_view field, size_t prefix, T& value) {
  const char* end = field.data() + field.size();
  const auto [ptr, ec] = std::from_chars(field.data() + prefix, end, value);
  return ec == std::errc{} && ptr == end && field.size() > prefix;
}

// One granularity field of Q, K or V ("k64", "kc", "vch").
bool scale_field(std::string_view field, char letter, bool channel_ok, Fp8Scale& scale, int& tile) {
  if (field.empty() || field[0] != letter) return false;
  const std::string_view rest = field.substr(1);
  if (rest == "c") {
    scale = Fp8Scale::Cluster;
    return true;
  }
  if (channel_ok && rest == "ch") {
    scale = Fp8Scale::Channel;
    return true;
  }
  if (rest == "head") {
    scale = Fp8Scale::Tile;
    tile = Fp8Options::kHeadTile;
    return true;
  }
  int rows = 0;
  if (!number_after(field, 1, rows) || rows < 1) return false;
  scale = Fp8Scale::Tile;
  tile = rows;
  return true;
}

std::string scale_name(char letter, Fp8Scale scale, int tile) {
  switch (scale) {
    case Fp8Scale::Cluster:
      return std::string(1, letter) + "c";
    case Fp8Scale::Channel:
      return std::string(1, letter) + "ch";
    case Fp8Scale::Tile:
      break;
  }
  if (tile >= Fp8Options::kHeadTile) return std::string(1, letter) + "head";
  return std::string(1, letter) + std::to_string(tile);
}

}  // namespace

Fp8Options parse_fp8_options(std::string_view spec) {
  Fp8Options o;
  for (bool more = !spec.empty(); more;) {
    const size_t colon = spec.find(':');
    const std::string_view field = spec.substr(0, colon);
    more = colon != std::string_view::npos;
    spec = more ? spec.substr(colon + 1) : std::string_view{};
    float p = 0.0f;
    if (scale_field(field, 'q', false, o.q_scale, o.q_tile) || scale_field(field, 'k', false, o.k_scale, o.k_tile) ||
        scale_field(field, 'v', true, o.v_scale, o.v_tile))
      continue;
    if (field == "smooth" || field == "nosmooth") {
      o.smooth_k = field == "smooth";
    } else if (field == "sumf" || field == "sumq") {
      o.p_sum_e4m3 = field == "sumq";
    } else if (!field.empty() && field[0] == 'p' && number_after(field, 1, p)) {
      o.p_scale = p;
    } else {
      SAPATTN_THROW(InvalidArgumentError, "FP8 options: unknown field '", field,
                    "' (fields: q<N>|qc|qhead, k<N>|kc|khead, v<N>|vc|vch|vhead, smooth|nosmooth, p<scale>, sumf|sumq; e.g. "
                    "q64:kc:vch:smooth:p448:sumf)");
    }
  }
  return o;
}

std::string fp8_options_name(const Fp8Options& o) {
  char p[32];
  std::snprintf(p, sizeof p, "%g", static_cast<double>(o.p_scale));
  return scale_name('q', o.q_scale, o.q_tile) + ":" + scale_name('k', o.k_scale, o.k_tile) + ":" +
         scale_name('v', o.v_scale, o.v_tile) + ":" + (o.smooth_k ? "smooth" : "nosmooth") + ":p" + p + ":" +
         (o.p_sum_e4m3 ? "sumq" : "sumf");
}

}  // namespace sapattn::eval
