// PyTorch custom ops over the engine: torch.ops.sapattn.svg2_attention and .dense_attention.
//
// Tensors come in diffusers' layout, [B,S,H,D], with any strides; they are handed to the engine as
// logical [B,H,S,D] views over the same memory (no copy). CUDA tensors run on the current stream of
// their device, CPU tensors on the CPU backend with torch's intra-op thread count. Every temporary
// (the SVG2 workspace, the outputs) comes from torch's allocator, so a call makes no cudaMalloc of
// its own (the caching allocator serves it) and works under CUDA graph capture. The k-means state
// is two caller-owned f32 tensors that the op updates in place (declared as mutated in the schema),
// so that torch.compile and graph capture see every read and write.
//
// Engine errors become the Python exception a user expects: shapes, values and NaN/Inf ->
// ValueError; dtypes -> TypeError; unsupported devices or features -> NotImplementedError; the
// message names the sapattn error kind and the tensor at fault, with shapes as the caller passed
// them ([B,S,H,D]).
//
// The ops are inference-only: their Autograd kernels give outputs that depend on an input requiring
// grad a node that raises on backward, so a gradient request fails loudly (see refuse_backward).
//
// svg2_attention's options are written once, in kSvg2Options: its schema is generated from that
// table (torch types from the C++ types, defaults from Config{}), and its kernel, boxed, unpacks a
// call's arguments into the engine's Config through the same table (docs/torch.md, "One config").
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#ifdef SAPATTN_HAS_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <charconv>
#include <cmath>
#include <concepts>
#include <iterator>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>

#include "sapattn/ops.hpp"
#include "sapattn/svg2.hpp"

namespace sapattn::torch_ops {
namespace {

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::F32;
    case at::kHalf:
      return DType::F16;
    case at::kBFloat16:
      return DType::BF16;
    case at::kInt:
      return DType::I32;
    case at::kByte:
      return DType::U8;
    default:
      TORCH_CHECK_TYPE(false, "sapattn: ", name, " has dtype ", t.scalar_type(),
                       "; sapattn takes float32, float16 or bfloat16 tensors");
  }
  return DType::F32;
}

Device device_of(const at::Tensor& t, const char* name) {
  if (t.device().is_cpu()) return Device::cpu();
#ifdef SAPATTN_HAS_CUDA
  if (t.device().is_cuda()) return Device::cuda(t.device().index());
  constexpr const char* kDevices = "the CPU and CUDA";
#else
  constexpr const char* kDevices = "the CPU (built without CUDA)";
#endif
  TORCH_CHECK_NOT_IMPLEMENTED(false, "sapattn: ", name, " is on ", t.device(), "; this build of sapattn runs on ",
                              kDevices, " only");
  return Device::cpu();
}

// A view of `t` with its own shape and strides (rank <= 4).
TensorView view_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() <= kMaxRank, "sapattn: ", name, " has ", t.dim(), " dims");
  TensorView v;
  v.data = t.data_ptr();
  v.dtype = dtype_of(t, name);
  v.rank = static_cast<int>(t.dim());
  for (int d = 0; d < v.rank; ++d) {
    v.shape[d] = t.size(d);
    v.stride[d] = t.stride(d);
  }
  v.device = device_of(t, name);
  return v;
}

// [B,S,H,D] tensor -> logical [B,H,S,D] view over the same memory.
TensorView bshd_view(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, "sapattn: ", name, " must be [batch, seq, heads, head_dim], got shape ", t.sizes());
  TensorView v = view_of(t, name);
  std::swap(v.shape[1], v.shape[2]);
  std::swap(v.stride[1], v.stride[2]);
  v.order = TensorView::Order::BSHD;  // messages print the shape as the caller passed it
  return v;
}

Stream stream_for(const at::Tensor& t) {
#ifdef SAPATTN_HAS_CUDA
  if (t.is_cuda()) {
    return Stream{Device::cuda(t.device().index()), c10::cuda::getCurrentCUDAStream(t.device().index()).stream(), 0};
  }
#endif
  return Stream::cpu(at::get_num_threads());
}

// Makes t's device current for the call (CUDA tensors only).
#ifdef SAPATTN_HAS_CUDA
using DeviceGuard = std::optional<c10::cuda::CUDAGuard>;
DeviceGuard guard_device(const at::Tensor& t) {
  if (!t.is_cuda()) return std::nullopt;
  return DeviceGuard(std::in_place, t.device());
}
#else
struct DeviceGuard {};
DeviceGuard guard_device(const at::Tensor&) { return {}; }
#endif

// Runs `body`, turning the engine's typed errors into torch's.
template <typename F>
auto translating_errors(F&& body) {
  try {
    return body();
  } catch (const DTypeError& e) {
    TORCH_CHECK_TYPE(false, "sapattn DTypeError: ", e.what());
  } catch (const UnsupportedError& e) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, "sapattn UnsupportedError: ", e.what());
  } catch (const ShapeError& e) {
    TORCH_CHECK_VALUE(false, "sapattn ShapeError: ", e.what());
  } catch (const InvalidArgumentError& e) {
    TORCH_CHECK_VALUE(false, "sapattn InvalidArgumentError: ", e.what());
  } catch (const NonFiniteError& e) {
    TORCH_CHECK_VALUE(false, "sapattn NonFiniteError: ", e.what());
  } catch (const Error& e) {
    TORCH_CHECK(false, "sapattn error: ", e.what());
  }
  __builtin_unreachable();  // every catch above throws
}

// k and v against q: one device and one dtype.
void check_like_q(const at::Tensor& q, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(q.device() == t.device(), "sapattn: ", name, " is on ", t.device(), " but q is on ", q.device());
  TORCH_CHECK_TYPE(q.scalar_type() == t.scalar_type(), "sapattn: ", name, " has dtype ", t.scalar_type(), " but q has ",
                   q.scalar_type());
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "sapattn: ", name, " is on ", b.device(), " but q is on ", a.device());
}

// The names the op takes for the engine's enums (SVG2Config's string fields in
// python/sapattn/config.py): one table per enum, listed in the order the error message names them.
template <typename E>
struct EnumNames;
template <>
struct EnumNames<Routing> {
  static constexpr const char* field = "routing";
  static constexpr std::pair<Routing, std::string_view> table[] = {{Routing::TopP, "top_p"},
                                                                   {Routing::ErrorAware, "error_aware"}};
};
template <>
struct EnumNames<KMeansSeeding> {
  static constexpr const char* field = "kmeans_seeding";
  static constexpr std::pair<KMeansSeeding, std::string_view> table[] = {{KMeansSeeding::GreedyPP, "greedy_pp"},
                                                                         {KMeansSeeding::Sample, "sample"}};
};
template <>
struct EnumNames<AttentionDType> {
  static constexpr const char* field = "attention_dtype";
  static constexpr std::pair<AttentionDType, std::string_view> table[] = {{AttentionDType::Native, "native"},
                                                                          {AttentionDType::E4M3, "fp8_e4m3"}};
};

// The value of a name, or ValueError: "routing must be 'top_p' or 'error_aware', got 'ear'".
template <typename E>
E enum_of(std::string_view name) {
  std::string choices;
  for (const auto& [value, known] : EnumNames<E>::table) {
    if (name == known) return value;
    choices += (choices.empty() ? "'" : " or '") + std::string(known) + "'";
  }
  TORCH_CHECK_VALUE(false, "sapattn: ", EnumNames<E>::field, " must be ", choices, ", got '", std::string(name), "'");
  return EnumNames<E>::table[0].first;
}

template <typename E>
std::string_view name_of(E value) {
  for (const auto& [known, name] : EnumNames<E>::table)
    if (value == known) return name;
  return "?";
}

// O as [B,S,H,D] in q's dtype, LSE as [B,H,S] f32 when asked for (else an empty tensor).
std::tuple<at::Tensor, at::Tensor> make_outputs(const at::Tensor& q, bool return_lse) {
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = return_lse ? at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat))
                              : at::empty({0}, q.options().dtype(at::kFloat));
  return {out, lse};
}

// ---- svg2_attention's options: one table -----------------------------------------------------
//
// The op's schema is
//   svg2_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) q_centroids, Tensor(b!) k_centroids,
//                  bool initialize, <one argument per row of kSvg2Options>) -> (Tensor, Tensor, Tensor)
// A row names a Config field or one of the call's own options (Svg2Options). Its torch type follows
// from the member's C++ type and its default is the member's value in Svg2Options{}, so the schema's
// defaults are the C++ Config's. The rows keep the order the op's arguments had before the table,
// in which return_lse and sample_ids sit among the config fields, so positional callers keep working.
// python/sapattn/attention.py maps the config rows to SVG2Config's fields by name and refuses to
// import where names or defaults disagree.

// One call's options: the engine's Config (but the cluster counts, the centroids' shapes) and the
// call's own.
struct Svg2Options {
  Config config;
  bool return_lse = false;
  std::optional<at::Tensor> sample_ids;  // [B,H] i32: each (b,h)'s initial sample stream
};

using Svg2Member = std::variant<bool Config::*, int Config::*, int64_t Config::*, uint64_t Config::*, float Config::*,
                                Routing Config::*, KMeansSeeding Config::*, AttentionDType Config::*,
                                bool Svg2Options::*, std::optional<at::Tensor> Svg2Options::*>;

struct Svg2Option {
  const char* name;
  Svg2Member member;
};

constexpr Svg2Option kSvg2Options[] = {
    {"top_p", &Config::top_p},
    {"min_kc_ratio", &Config::min_kc_ratio},
    {"kmeans_iters_init", &Config::kmeans_iters_init},
    {"kmeans_iters_step", &Config::kmeans_iters_step},
    {"seed", &Config::seed},
    {"text_tokens", &Config::text_tokens},
    {"prompt_length", &Config::prompt_length},
    {"scale", &Config::scale},
    {"check_finite", &Config::check_finite},
    {"return_lse", &Svg2Options::return_lse},
    {"key_shard_index", &Config::key_shard_index},
    {"key_shard_count", &Config::key_shard_count},
    {"sample_ids", &Svg2Options::sample_ids},
    {"density", &Config::density},
    {"routing", &Config::routing},
    {"compensate", &Config::compensate},
    {"ear_gamma", &Config::ear_gamma},
    {"ear_keep_ratio", &Config::ear_keep_ratio},
    {"ear_spread", &Config::ear_spread},
    {"ear_pair_values", &Config::ear_pair_values},
    {"ear_head_budget", &Config::ear_head_budget},
    {"ear_split", &Config::ear_split},
    {"kmeans_seeding", &Config::kmeans_seeding},
    {"kmeans_sample_factor", &Config::kmeans_sample_factor},
    {"kmeans_candidates", &Config::kmeans_candidates},
    {"round_q_clusters", &Config::round_q_clusters},
    {"attention_dtype", &Config::attention_dtype},
};

// The arguments before the options, read by position in svg2_attention_boxed.
constexpr std::string_view kSvg2Inputs =
    "Tensor q, Tensor k, Tensor v, Tensor(a!) q_centroids, Tensor(b!) k_centroids, bool initialize";
constexpr size_t kSvg2InputCount = std::ranges::count(kSvg2Inputs, ',') + 1;

// The member a row names, in `options`.
template <typename T>
T& field(Svg2Options& options, T Config::*member) {
  return options.config.*member;
}
template <typename T>
T& field(Svg2Options& options, T Svg2Options::*member) {
  return options.*member;
}

// How a member of each C++ type crosses the boundary: its torch type, its value as a schema default,
// its value from a call's argument.
template <typename T>
struct TorchArg;
template <>
struct TorchArg<bool> {
  static constexpr std::string_view type = "bool";
  static std::string literal(bool value) { return value ? "True" : "False"; }
  static bool read(const c10::IValue& value) { return value.toBool(); }
};
template <std::integral T>
struct TorchArg<T> {
  static constexpr std::string_view type = "int";
  static std::string literal(T value) { return std::to_string(value); }
  static T read(const c10::IValue& value) { return static_cast<T>(value.toInt()); }
};
template <>
struct TorchArg<float> {
  static constexpr std::string_view type = "float";
  // The shortest decimal that reads back as this float: 0.9f is "0.9", the double Python's 0.9 is,
  // not 0.899999976.
  static std::string literal(float value) {
    char digits[32];
    std::string text(digits, std::to_chars(digits, digits + sizeof digits, value).ptr);
    return text.find_first_of(".e") == std::string::npos ? text + ".0" : text;
  }
  static float read(const c10::IValue& value) { return static_cast<float>(value.toDouble()); }
};
template <typename E>
requires requires { EnumNames<E>::table; }
struct TorchArg<E> {
  static constexpr std::string_view type = "str";
  static std::string literal(E value) { return "\"" + std::string(name_of(value)) + "\""; }
  static E read(const c10::IValue& value) { return enum_of<E>(value.toStringView()); }
};
template <>
struct TorchArg<std::optional<at::Tensor>> {
  static constexpr std::string_view type = "Tensor?";
  static std::string literal(const std::optional<at::Tensor>&) { return "None"; }
  static std::optional<at::Tensor> read(const c10::IValue& value) { return value.toOptional<at::Tensor>(); }
};

template <typename M>
struct MemberOf;
template <typename T, typename C>
struct MemberOf<T C::*> {
  using type = C;
};

// Whether a row names a field of the engine's Config (check_config takes those) or the call's own.
bool names_config(const Svg2Option& option) {
  return std::visit([](auto member) { return std::is_same_v<typename MemberOf<decltype(member)>::type, Config>; },
                    option.member);
}

// The options' part of a schema, ", <torch type> <name>=<default>" per row (the Config rows only
// with config_only).
std::string options_schema(bool config_only) {
  Svg2Options defaults;
  std::string schema;
  for (const Svg2Option& option : kSvg2Options) {
    if (config_only && !names_config(option)) continue;
    std::visit(
        [&](auto member) {
          using T = std::remove_reference_t<decltype(field(defaults, member))>;
          schema += ", " + std::string(TorchArg<T>::type) + " " + option.name + "=" +
                    TorchArg<T>::literal(field(defaults, member));
        },
        option.member);
  }
  return schema;
}

std::string svg2_schema() {
  return "svg2_attention(" + std::string(kSvg2Inputs) + options_schema(false) + ") -> (Tensor, Tensor, Tensor)";
}

std::string check_config_schema() { return "check_config(" + options_schema(true).substr(2) + ") -> ()"; }

// Reads a call's options, one argument per row (per Config row with config_only), into their members.
Svg2Options unpack_options(at::ArrayRef<c10::IValue> arguments, bool config_only = false) {
  Svg2Options options;
  size_t at = 0;
  for (const Svg2Option& option : kSvg2Options) {
    if (config_only && !names_config(option)) continue;
    std::visit(
        [&](auto member) {
          auto& to = field(options, member);
          to = TorchArg<std::remove_reference_t<decltype(to)>>::read(arguments[at++]);
        },
        option.member);
  }
  return options;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> svg2_attention(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& q_centroids,
                                                              const at::Tensor& k_centroids, bool initialize,
                                                              const Svg2Options& options) {
  return translating_errors([&] {
    check_like_q(q, k, "k");
    check_like_q(q, v, "v");
    check_same_device(q, q_centroids, "q_centroids");
    check_same_device(q, k_centroids, "k_centroids");
    TORCH_CHECK_VALUE(q_centroids.dim() == 4 && k_centroids.dim() == 4,
                      "sapattn: centroids must be [batch, heads, clusters, head_dim], got ", q_centroids.sizes(),
                      " and ", k_centroids.sizes());
    const DeviceGuard guard = guard_device(q);
    Config config = options.config;
    config.q_clusters = static_cast<int>(q_centroids.size(2));
    config.k_clusters = static_cast<int>(k_centroids.size(2));

    const TensorView qv = bshd_view(q, "q"), kv = bshd_view(k, "k"), vv = bshd_view(v, "v");
    auto [out, lse] = make_outputs(q, options.return_lse);
    at::Tensor reached = at::empty({q.size(0), q.size(2)}, q.options().dtype(at::kFloat));  // density per (b,h)
    Svg2Outputs outputs;
    outputs.out = bshd_view(out, "out");
    if (options.return_lse) outputs.lse = view_of(lse, "lse");
    outputs.density = view_of(reached, "density");

    const Stream stream = stream_for(q);
    const size_t bytes = svg2_workspace_bytes(qv, kv, vv, config, outputs, stream);
    at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
    CentroidViews centroids{view_of(q_centroids, "q_centroids"), view_of(k_centroids, "k_centroids"), {}};
    if (options.sample_ids.has_value()) {
      check_same_device(q, *options.sample_ids, "sample_ids");
      centroids.sample_ids = view_of(*options.sample_ids, "sample_ids");
    }
    sapattn::svg2_attention(qv, kv, vv, config, centroids, initialize, outputs, Workspace{workspace.data_ptr(), bytes},
                            stream);
    return std::make_tuple(out, lse, reached);
  });
}

// The CPU and CUDA kernel, boxed: it takes the arguments from the stack in schema order (the inputs,
// then the options), so that no C++ signature lists them again.
void svg2_attention_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const size_t count = op.schema().arguments().size();
  const at::ArrayRef<c10::IValue> arguments = torch::jit::last(stack, count);
  static_assert(kSvg2InputCount == 6);  // q, k, v, q_centroids, k_centroids, initialize: read below
  auto [out, lse, density] =
      svg2_attention(arguments[0].toTensor(), arguments[1].toTensor(), arguments[2].toTensor(), arguments[3].toTensor(),
                     arguments[4].toTensor(), arguments[5].toBool(), unpack_options(arguments.slice(kSvg2InputCount)));
  torch::jit::drop(stack, count);
  torch::jit::push(stack, std::move(out), std::move(lse), std::move(density));
}

// Config::validate over the config rows, boxed like svg2_attention: SVG2Config's construction calls
// it, so that a bad config fails there with the message the call would give, checked by one rule.
void check_config_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const size_t count = op.schema().arguments().size();
  translating_errors([&] {
    unpack_options(torch::jit::last(stack, count), /*config_only=*/true).config.validate();
    return 0;
  });
  torch::jit::drop(stack, count);
}

std::tuple<at::Tensor, at::Tensor> dense_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   double scale, bool return_lse) {
  return translating_errors([&] {
    check_like_q(q, k, "k");
    check_like_q(q, v, "v");
    const DeviceGuard guard = guard_device(q);
    const TensorView qv = bshd_view(q, "q"), kv = bshd_view(k, "k"), vv = bshd_view(v, "v");
    TORCH_CHECK_VALUE(std::isfinite(scale) && scale >= 0.0, "sapattn: scale must be finite and >= 0, got ", scale);
    const float s = scale > 0.0 ? static_cast<float>(scale) : 1.0f / std::sqrt(static_cast<float>(q.size(3)));
    auto [out, lse] = make_outputs(q, return_lse);
    sapattn::dense_attention(qv, kv, vv, s, bshd_view(out, "out"), return_lse ? view_of(lse, "lse") : TensorView{},
                             stream_for(q));
    return std::make_tuple(out, lse);
  });
}

// Rotary embedding on interleaved pairs of x [B,S,H,D] with cos, sin [S,D] f32 (sapattn::rope_pairs,
// the arithmetic of PyTorch's eager ops in one pass): a new contiguous [B,S,H,D] tensor of x's dtype.
at::Tensor rope_pairs(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return translating_errors([&] {
    check_same_device(x, cos, "cos");
    check_same_device(x, sin, "sin");
    const DeviceGuard guard = guard_device(x);
    at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    sapattn::rope_pairs(bshd_view(x, "x"), view_of(cos, "cos"), view_of(sin, "sin"), bshd_view(out, "out"),
                        stream_for(x));
    return out;
  });
}

// Lloyd k-means of points [B,S,H,D] into centroids [B,H,C,D] f32 (in place), per (batch, head):
// with `initialize`, first the seeding (kmeans_seed_greedy on sample_factor * C points, or
// kmeans_init's sample); `keys` draws from the keys' stream of the seed (key_sample_seed) and, when
// initialising, numbers the clusters along order_clusters' chain afterwards, as svg2_attention does.
// Returns the labels, [B,H,S] i32.
at::Tensor kmeans(const at::Tensor& points, at::Tensor& centroids, bool initialize, int64_t iters, int64_t seed,
                  bool keys, c10::string_view seeding_name, int64_t sample_factor) {
  return translating_errors([&] {
    check_same_device(points, centroids, "centroids");
    TORCH_CHECK_VALUE(iters >= 0, "sapattn: iters must be >= 0, got ", iters);
    // Checked whichever seeding runs, as Config::validate checks kmeans_sample_factor.
    TORCH_CHECK_VALUE(sample_factor >= 1, "sapattn: sample_factor must be >= 1, got ", sample_factor);
    const auto seeding = enum_of<KMeansSeeding>(std::string_view(seeding_name.data(), seeding_name.size()));
    const DeviceGuard guard = guard_device(points);
    const TensorView pv = bshd_view(points, "points"), cv = view_of(centroids, "centroids");
    TORCH_CHECK_VALUE(cv.rank == 4, "sapattn: centroids must be [batch, heads, clusters, head_dim], got shape ",
                      centroids.sizes());
    const int64_t B = pv.shape[0], H = pv.shape[1], S = pv.shape[2], D = pv.shape[3], C = cv.shape[2];
    at::Tensor labels = at::empty({B, H, S}, points.options().dtype(at::kInt));
    at::Tensor sizes = at::empty({B, H, C}, points.options().dtype(at::kInt));
    const Stream stream = stream_for(points);
    const int factor = static_cast<int>(sample_factor);
    const bool greedy = initialize && seeding == KMeansSeeding::GreedyPP;
    const bool order = initialize && keys;  // svg2_attention numbers a fresh clustering of the keys along the chain
    const size_t bytes = std::max({kmeans_workspace_bytes(B * H, S, C, D, stream.device),
                                   greedy ? kmeans_seed_greedy_workspace_bytes(B * H, S, C, factor, stream.device) : 0,
                                   order ? order_clusters_workspace_bytes(B * H, C, D, stream.device) : 0});
    at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, points.options().dtype(at::kByte));
    const Workspace ws{workspace.data_ptr(), bytes};
    const uint64_t sample_seed = keys ? key_sample_seed(static_cast<uint64_t>(seed)) : static_cast<uint64_t>(seed);
    if (greedy)
      kmeans_seed_greedy(pv, cv, sample_seed, factor, stream, ws);
    else if (initialize)
      kmeans_init(pv, cv, sample_seed, stream, ws);
    const TensorView lv = view_of(labels, "labels"), sv = view_of(sizes, "sizes");
    sapattn::kmeans(pv, cv, lv, sv, static_cast<int>(iters), stream, ws);
    if (order) order_clusters(cv, sv, lv, stream, ws);
    return labels;
  });
}

// The kmeans op's seeding arguments default to the engine Config's, as svg2_attention's do.
std::string kmeans_schema() {
  const Config defaults;
  return "kmeans(Tensor points, Tensor(a!) centroids, bool initialize, int iters, int seed, bool keys=False, "
         "str seeding=" +
         TorchArg<KMeansSeeding>::literal(defaults.kmeans_seeding) +
         ", int sample_factor=" + TorchArg<int>::literal(defaults.kmeans_sample_factor) + ") -> Tensor";
}

// Which kernel would run for these inputs ("cpu", "sm90a-wgmma", "sm80-mma"), or why none does.
std::string attention_kernel_name(const at::Tensor& q) {
  return translating_errors([&] {
    TORCH_CHECK_VALUE(q.dim() == 4, "sapattn: q must be [batch, seq, heads, head_dim], got shape ", q.sizes());
    const AttentionKernel k = attention_kernel(device_of(q, "q"), dtype_of(q, "q"), q.size(3));
    return k.supported ? std::string(k.name) : std::string("unsupported: ") + k.reason;
  });
}

// What backward through an op raises. The ops have no backward: a training step must not run
// them, and the caller learns it at the backward call rather than from a gradient left as None.
void refuse_backward(std::string_view op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     at::ArrayRef<c10::IValue> outputs) {
  if (!torch::autograd::compute_requires_grad(q, k, v)) return;
  const std::string message = "sapattn." + std::string(op.substr(op.rfind(':') + 1)) +
                              " is inference-only and has no backward; run it under torch.no_grad() or "
                              "torch.inference_mode(), or use torch's scaled_dot_product_attention to train";
  const std::shared_ptr<torch::autograd::Node> node(
      new torch::autograd::Error(message, torch::autograd::collect_next_edges(q, k, v)), torch::autograd::deleteNode);
  for (const c10::IValue& output : outputs) {
    const at::Tensor& t = output.toTensor();
    if (t.defined() && t.is_floating_point()) torch::autograd::set_history(t, node);
  }
}

// The Autograd kernel of the attention ops (each takes q, k, v first; rope_pairs x, cos, sin): the op itself below
// autograd, then refuse_backward on its float outputs. Boxed, so that it passes the arguments on
// without listing them.
void inference_only(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const at::ArrayRef<c10::IValue> arguments = torch::jit::last(stack, op.schema().arguments().size());
  const at::Tensor q = arguments[0].toTensor(), k = arguments[1].toTensor(), v = arguments[2].toTensor();
  {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    op.callBoxed(stack);
  }
  refuse_backward(op.schema().name(), q, k, v, torch::jit::last(stack, op.schema().returns().size()));
}

}  // namespace

TORCH_LIBRARY(sapattn, m) {
  m.def(svg2_schema().c_str());
  m.def(check_config_schema().c_str(), torch::CppFunction::makeFromBoxedFunction<&check_config_boxed>());
  m.def("dense_attention(Tensor q, Tensor k, Tensor v, float scale, bool return_lse) -> (Tensor, Tensor)");
  m.def(kmeans_schema().c_str());
  m.def("attention_kernel(Tensor q) -> str");
  m.def("rope_pairs(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(sapattn, CPU, m) {
  m.impl("rope_pairs", &rope_pairs);
  m.impl("svg2_attention", torch::CppFunction::makeFromBoxedFunction<&svg2_attention_boxed>());
  m.impl("dense_attention", &dense_attention);
  m.impl("kmeans", &kmeans);
}

#ifdef SAPATTN_HAS_CUDA
TORCH_LIBRARY_IMPL(sapattn, CUDA, m) {
  m.impl("rope_pairs", &rope_pairs);
  m.impl("svg2_attention", torch::CppFunction::makeFromBoxedFunction<&svg2_attention_boxed>());
  m.impl("dense_attention", &dense_attention);
  m.impl("kmeans", &kmeans);
}
#endif

TORCH_LIBRARY_IMPL(sapattn, Autograd, m) {
  m.impl("svg2_attention", torch::CppFunction::makeFromBoxedFunction<&inference_only>());
  m.impl("dense_attention", torch::CppFunction::makeFromBoxedFunction<&inference_only>());
  m.impl("rope_pairs", torch::CppFunction::makeFromBoxedFunction<&inference_only>());
}

// The kernel query reads only metadata: one implementation for every device.
TORCH_LIBRARY_IMPL(sapattn, CompositeExplicitAutograd, m) { m.impl("attention_kernel", &attention_kernel_name); }

}  // namespace sapattn::torch_ops
