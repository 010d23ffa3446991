// The CUDA attention entry points: the argument rules the kernels add to the op contract, the
// kernel choice by architecture, and planning. The kernels themselves live in attention_sm90.cu
// and attention_sm80.cu, the planner in attention_plan.cu.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "core/carver.hpp"
#include "cuda/attention/attention.hpp"
#include "cuda/runtime/device.cuh"

namespace sapattn::cuda {

namespace {

// 0: choose by architecture; 80: always the mma.sync kernel; -1: environment not read yet.
std::atomic<int> g_override{-1};

int parse_override(const char* name) {
  if (name == nullptr || name[0] == '\0') return 0;
  if (std::strcmp(name, "sm80") == 0) return 80;
  SAPATTN_THROW(InvalidArgumentError, "unknown attention kernel override '", name, "' (expected \"sm80\" or \"\")");
}

int override_arch() {
  int v = g_override.load();
  if (v < 0) {
    const char* env = std::getenv("SAPATTN_ATTENTION_KERNEL");
    v = (env != nullptr && std::strcmp(env, "sm80") == 0) ? 80 : 0;
    int expected = -1;
    g_override.compare_exchange_strong(expected, v);
    v = g_override.load();
  }
  return v;
}

struct DeviceInfo {
  int major = 0, minor = 0, sms = 0;
};

DeviceInfo device_info(int device) {
  static std::mutex mutex;
  static std::vector<DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= 0 && device < static_cast<int>(cache.size()) && cache[device].major != 0) return cache[device];
  DeviceInfo info;
  SAPATTN_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device));
  SAPATTN_CUDA_CHECK(cudaDeviceGetAttribute(&info.minor, cudaDevAttrComputeCapabilityMinor, device));
  SAPATTN_CUDA_CHECK(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device));
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1);
  cache[device] = info;
  return info;
}

// The kernels read rows with 16-byte vector loads.
void expect_kernel_rows(const TensorView& t, const char* name) {
  const int64_t elem = static_cast<int64_t>(dtype_size(t.dtype));
  bool ok = t.stride[3] == 1 && reinterpret_cast<uintptr_t>(t.data) % 16 == 0;
  for (int d = 0; d < 3; ++d) ok = ok && (t.stride[d] * elem) % 16 == 0;
  SAPATTN_CHECK(ok, UnsupportedError, name, " ", t.describe(),
                ": the CUDA attention kernels need unit stride along D and 16-byte aligned rows "
                "(make the tensor contiguous)");
}

attn::Params make_params(const TensorView& q, const TensorView& k, const TensorView& v, float scale,
                         const TensorView& out, const TensorView& lse, const RowPermutation& perm, int device) {
  const AttentionKernel choice = attention_kernel(device, q.dtype, q.shape[3]);
  SAPATTN_CHECK(choice.supported, UnsupportedError, "attention on cuda:", device, ": ", choice.reason);
  for (const auto& [t, name] : {std::pair{&k, "k"}, {&v, "v"}, {&out, "out"}})
    SAPATTN_CHECK(t->dtype == q.dtype, DTypeError, "the CUDA attention kernels take q, k, v and out of one dtype; ",
                  name, " is ", dtype_name(t->dtype), ", q is ", dtype_name(q.dtype));
  for (const auto& [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&out, "out"}}) expect_kernel_rows(*t, name);
  const int64_t B = q.shape[0], H = q.shape[1], Sq = q.shape[2], Sk = k.shape[2];
  SAPATTN_CHECK(B * H < (int64_t{1} << 31) && Sq < (int64_t{1} << 31) && Sk < (int64_t{1} << 31), ShapeError,
                "the CUDA attention kernels take fewer than 2^31 heads and tokens, got q ", q.describe());
  attn::Params p;
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.out = out.data;
  p.lse = lse.empty() ? nullptr : static_cast<float*>(lse.data);
  for (int d = 0; d < 3; ++d) {
    p.q_stride[d] = q.stride[d];
    p.k_stride[d] = k.stride[d];
    p.v_stride[d] = v.stride[d];
    p.o_stride[d] = out.stride[d];
    p.lse_stride[d] = lse.empty() ? 0 : lse.stride[d];
  }
  p.batch = static_cast<int32_t>(B);
  p.heads = static_cast<int32_t>(H);
  p.seq_q = static_cast<int32_t>(Sq);
  p.seq_k = static_cast<int32_t>(Sk);
  p.head_dim = static_cast<int32_t>(q.shape[3]);
  p.q_perm = perm.q_perm.empty() ? nullptr : static_cast<const int32_t*>(perm.q_perm.data);
  p.k_perm = perm.k_perm.empty() ? nullptr : static_cast<const int32_t*>(perm.k_perm.data);
  p.scale = scale;
  p.num_sms = device_info(device).sms;
  p.flag = value_error_flag();
  return p;
}

bool is_sm90(DType dtype, int device, int64_t head_dim) {
  return std::strcmp(attention_kernel(device, dtype, head_dim).name, "sm90a-wgmma") == 0;
}

void launch(const attn::Params& p, DType dtype, int device, cudaStream_t stream) {
  const bool bf16 = dtype == DType::BF16;
  if (is_sm90(dtype, device, p.head_dim)) {
    attn::run_sm90(p, bf16, stream);
  } else {
    attn::run_sm80(p, bf16, stream);
  }
}

// Key phases of a sparse call (attention.hpp, build_plan). SAPATTN_KV_PHASES=N (1-16) sets the
// count, for measurement; default 1. The sm_80 kernel runs one phase.
constexpr int kMaxPhases = 16;

int key_phases(DType dtype, int device, int64_t head_dim) {
  if (!is_sm90(dtype, device, head_dim)) return 1;
  const char* env = std::getenv("SAPATTN_KV_PHASES");
  if (env == nullptr || env[0] == '\0') return 1;
  char* end = nullptr;
  const long n = std::strtol(env, &end, 10);
  SAPATTN_CHECK(*end == '\0' && n >= 1 && n <= kMaxPhases, InvalidArgumentError, "SAPATTN_KV_PHASES='", env,
                "' is not a phase count in [1, ", kMaxPhases, "]");
  return static_cast<int>(n);
}

}  // namespace

void set_attention_kernel_override(const char* name) { g_override.store(parse_override(name)); }

AttentionKernel attention_kernel(int device, DType dtype, int64_t head_dim) {
  if (dtype != DType::F16 && dtype != DType::BF16)
    return {false, "", "the CUDA attention kernels take f16 or bf16 inputs (convert f32 first, or use the CPU)"};
  if (!attn::KernelHeadDims::contains(head_dim))
    return {false, "", "the CUDA attention kernels take head dim 64 or 128"};
  const DeviceInfo info = device_info(device);
  if (info.major < 8) return {false, "", "the CUDA attention kernels need an sm_80 or newer GPU"};
  if (override_arch() != 80 && info.major == 9 && info.minor == 0 && attn::sm90_compiled())
    return {true, "sm90a-wgmma", ""};
  return {true, "sm80-mma", ""};
}

// The plan, then an lse of the queries for the key phases' merge when the caller passes none.
size_t block_sparse_attention_workspace_bytes(int64_t batch_heads, int64_t q_clusters, int64_t k_clusters,
                                              int64_t q_tokens) {
  Carver carver("block_sparse_attention");
  carver.take_bytes(attn::plan_workspace_bytes(batch_heads, q_clusters, k_clusters, q_tokens));
  carver.take<float>(batch_heads * q_tokens);
  return carver.used();
}

void block_sparse_attention(const TensorView& q, const TensorView& k, const TensorView& v, const BlockLayout& layout,
                            float scale, TensorView out, TensorView lse, const Stream& stream, Workspace workspace,
                            const RowPermutation& perm) {
  const DeviceGuard guard(stream.device);
  attn::Params p = make_params(q, k, v, scale, out, lse, perm, stream.device.index);
  const int64_t BH = q.shape[0] * q.shape[1], Sq = q.shape[2];
  const int64_t Cq = layout.q_offsets.shape[2] - 1, Ck = layout.k_offsets.shape[2] - 1;
  const size_t need = block_sparse_attention_workspace_bytes(BH, Cq, Ck, Sq);
  SAPATTN_CHECK(workspace.bytes >= need && (need == 0 || workspace.data != nullptr), WorkspaceError,
                "block_sparse_attention needs a workspace of ", need, " bytes on CUDA, got ", workspace.bytes,
                " (ask block_sparse_attention_workspace_bytes)");
  if (BH == 0 || Sq == 0) return;
  const int phases = k.shape[2] == 0 ? 1 : key_phases(q.dtype, stream.device.index, p.head_dim);
  p.pair = is_sm90(q.dtype, stream.device.index, p.head_dim) && attn::sm90_pairs(p);
  Carver carver("block_sparse_attention", workspace);
  const size_t plan_bytes = attn::plan_workspace_bytes(BH, Cq, Ck, Sq);
  const Workspace plan_workspace{carver.take_bytes(plan_bytes), plan_bytes};
  float* lse_scratch = carver.take<float>(BH * Sq);
  if (phases > 1 && p.lse == nullptr) {  // the phases merge through an lse: the workspace's, [B, H, Sq]
    p.lse = lse_scratch;
    p.lse_stride[0] = q.shape[1] * Sq;
    p.lse_stride[1] = Sq;
    p.lse_stride[2] = 1;
  }
  const bool checked = begin_value_check(stream);
  for (int phase = 0; phase < phases; ++phase) {
    p.plan = attn::build_plan(layout, Sq, k.shape[2], plan_workspace, stream_of(stream), phase, phases,
                              p.pair ? attn::kPairTileQ : attn::kTileQ);
    p.accumulate = phase > 0;
    launch(p, q.dtype, stream.device.index, stream_of(stream));
  }
  if (checked) end_value_check(stream, "block_sparse_attention");
}

void dense_attention(const TensorView& q, const TensorView& k, const TensorView& v, float scale, TensorView out,
                     TensorView lse, const Stream& stream, const RowPermutation& perm) {
  const DeviceGuard guard(stream.device);
  attn::Params p = make_params(q, k, v, scale, out, lse, perm, stream.device.index);
  if (q.shape[0] * q.shape[1] == 0 || q.shape[2] == 0) return;
  p.dense = true;
  p.pair = is_sm90(q.dtype, stream.device.index, p.head_dim) && attn::sm90_pairs(p);
  const bool checked = begin_value_check(stream);
  launch(p, q.dtype, stream.device.index, stream_of(stream));
  if (checked) end_value_check(stream, "dense_attention");
}

}  // namespace sapattn::cuda
