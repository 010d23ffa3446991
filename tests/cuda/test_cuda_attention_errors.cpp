// The attention ops on bad input, each a typed error that names what is wrong and leaves the outputs'
// bytes as they were (ops.hpp): unsupported dtypes and head dims (f32, D = 96, f16 at D = 32, also as
// attention_kernel reports them), mixed dtypes, views the kernels cannot read with 16-byte row loads,
// too small a workspace, bad permutation entries and offsets with the value checks on; and an unknown
// kernel override changes nothing.
#include <gtest/gtest.h>

#include <array>
#include <exception>
#include <functional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "cuda_attention_support.hpp"

namespace sapattn::cuda_test {
namespace {

const SparseCase kErrorCase{.name = "errors", .Sq = 96, .Sk = 80, .Cq = 4, .Ck = 5};

// A small valid problem on the GPU with poisoned outputs.
struct ErrorSetup {
  explicit ErrorSetup(const SparseCase& c = kErrorCase)
      : host(make_sparse_problem(c)),
        device(to_device(host)),
        workspace(workspace_for(device.inputs())),
        poisoned(poisoned_outputs(c.dtype, host.q.view, true)),
        out(to_device(poisoned.out)),
        lse(to_device(poisoned.lse)) {}
  void attend(const Inputs& in, Workspace ws) const { in.attend(out.view, lse.view, cs.stream(), ws); }

  HostProblem host;
  DeviceProblem device;
  Buffer workspace;
  Outputs poisoned;
  DeviceTensor out, lse;
  TestStream cs;
};

// Whether `call` throws E with a message that mentions `mention`, leaving the outputs' bytes as they were
// (ops.hpp: outputs are untouched when an argument check fails).
template <typename E>
::testing::AssertionResult fails_with(const std::function<void()>& call, std::string_view mention,
                                      const std::vector<const DeviceTensor*>& outputs) {
  std::vector<std::vector<uint8_t>> before;
  for (const DeviceTensor* o : outputs) before.push_back(device_bytes(*o));
  try {
    call();
    return ::testing::AssertionFailure() << "no exception";
  } catch (const E& e) {
    if (std::string_view(e.what()).find(mention) == std::string_view::npos)
      return ::testing::AssertionFailure() << "the message does not mention '" << mention << "': " << e.what();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "another exception: " << e.what();
  }
  for (size_t i = 0; i < outputs.size(); ++i)
    if (device_bytes(*outputs[i]) != before[i]) return ::testing::AssertionFailure() << "output " << i << " written";
  return ::testing::AssertionSuccess();
}

TEST(AttentionCudaErrors, UnsupportedDTypesAndHeadDims) {
  const ErrorSetup s;
  for (const auto& [dtype, head_dim, mention] : {std::tuple{DType::F32, int64_t{64}, "bf16"},
                                                 {DType::BF16, int64_t{96}, "head dim"},
                                                 {DType::F16, int64_t{32}, "head dim"}}) {
    SCOPED_TRACE(std::string(dtype_name(dtype)) + " D=" + std::to_string(head_dim));
    const AttentionKernel k = attention_kernel(Device::cuda(0), dtype, head_dim);
    EXPECT_FALSE(k.supported);
    EXPECT_NE(std::string_view(k.reason).find(mention), std::string_view::npos) << k.reason;
    SparseCase c = kErrorCase;
    c.dtype = dtype;
    c.D = head_dim;
    const DeviceProblem d = to_device(make_sparse_problem(c));
    const Outputs poisoned = poisoned_outputs(dtype, d.q.view, true);
    const DeviceTensor out = to_device(poisoned.out), lse = to_device(poisoned.lse);
    Inputs dense = d.inputs();
    dense.layout = {};
    for (const Inputs& in : {d.inputs(), dense}) {
      EXPECT_TRUE(fails_with<UnsupportedError>(
          [&] { in.attend(out.view, lse.view, s.cs.stream(), as_workspace(s.workspace)); }, mention, {&out, &lse}))
          << (in.dense() ? "dense_attention" : "block_sparse_attention");
    }
  }
  for (DType dtype : {DType::BF16, DType::F16})
    for (int64_t head_dim : {64, 128}) EXPECT_TRUE(attention_kernel(Device::cuda(0), dtype, head_dim).supported);
}

TEST(AttentionCudaErrors, MixedDTypes) {
  const ErrorSetup s;
  HostTensor k16 = ref::make_tensor(DType::F16, shape_of(s.host.k.view));
  ref::from_vector(k16.view, ref::to_vector(s.host.k.view));
  const DeviceTensor dk16 = to_device(k16);
  Inputs mixed = s.device.inputs();
  mixed.k = dk16.view;
  EXPECT_TRUE(fails_with<DTypeError>([&] { s.attend(mixed, as_workspace(s.workspace)); }, "f16", {&s.out, &s.lse}));
  for (DType out_dtype : {DType::F32, DType::F16}) {
    const DeviceTensor out = to_device(poisoned_outputs(out_dtype, s.host.q.view, false).out);
    EXPECT_TRUE(fails_with<DTypeError>(
        [&] { s.device.inputs().attend(out.view, s.lse.view, s.cs.stream(), as_workspace(s.workspace)); },
        dtype_name(out_dtype), {&out, &s.lse}));
  }
}

enum class Misalignment { DStride2, OffsetByOneElement, RowStride8Bytes };

// x's values in a view the kernels cannot read with 16-byte row loads.
HostTensor misaligned(const HostTensor& x, Misalignment kind) {
  const int64_t B = x.view.shape[0], H = x.view.shape[1], S = x.view.shape[2], D = x.view.shape[3];
  const int64_t row = kind == Misalignment::DStride2 ? 2 * D : kind == Misalignment::RowStride8Bytes ? D + 4 : D;
  const int64_t offset = kind == Misalignment::OffsetByOneElement ? 1 : 0;
  HostTensor t =
      strided_view(x.view.dtype, {B, H, S, D}, {H * S * row, S * row, row, kind == Misalignment::DStride2 ? 2 : 1},
                   B * H * S * row + offset, offset);
  ref::from_vector(t.view, ref::to_vector(x.view));
  return t;
}

TEST(AttentionCudaErrors, MisalignedViews) {
  const ErrorSetup s;
  for (Misalignment kind : {Misalignment::DStride2, Misalignment::OffsetByOneElement, Misalignment::RowStride8Bytes}) {
    for (const std::string role : {"q", "k", "v", "out"}) {
      SCOPED_TRACE(role + " misalignment " + std::to_string(static_cast<int>(kind)));
      const HostTensor& like = role == "q"   ? s.host.q
                               : role == "k" ? s.host.k
                               : role == "v" ? s.host.v
                                             : s.poisoned.out;
      const DeviceTensor bad = to_device(misaligned(like, kind));
      Inputs in = s.device.inputs();
      TensorView out = s.out.view;
      (role == "q" ? in.q : role == "k" ? in.k : role == "v" ? in.v : out) = bad.view;
      EXPECT_TRUE(
          fails_with<UnsupportedError>([&] { in.attend(out, s.lse.view, s.cs.stream(), as_workspace(s.workspace)); },
                                       "aligned", {&s.out, &s.lse, &bad}));
    }
  }
}

TEST(AttentionCudaErrors, WorkspaceTooSmall) {
  const ErrorSetup s;
  const Inputs in = s.device.inputs();
  const size_t need = block_sparse_attention_workspace_bytes(in.q.shape[0] * in.q.shape[1], kErrorCase.Cq,
                                                             kErrorCase.Ck, in.q.shape[2], Device::cuda(0));
  ASSERT_GT(need, 0u);
  for (const Workspace ws : {Workspace{}, Workspace{s.workspace.data(), need - 1}})
    EXPECT_TRUE(fails_with<WorkspaceError>([&] { s.attend(in, ws); }, "workspace", {&s.out, &s.lse}));
  EXPECT_NO_THROW(s.attend(in, Workspace{s.workspace.data(), need}));
}

TEST(AttentionCudaErrors, BadValuesWithValueChecks) {
  const ValueChecksOn on;
  SparseCase c = kErrorCase;
  c.q_perm = c.k_perm = true;
  const ErrorSetup s(c);
  struct Bad {
    const char* what;
    HostTensor HostProblem::*tensor;
    std::array<int64_t, kMaxRank> index;
    double value;
  };
  const int64_t Sq = c.Sq, Sk = c.Sk, Ck = c.Ck;
  for (const Bad& bad :
       {Bad{"q_perm entry Sq", &HostProblem::q_perm, {0, 1, 5}, static_cast<double>(Sq)},
        Bad{"k_perm entry -1", &HostProblem::k_perm, {0, 0, 7}, -1.0},
        Bad{"q_offsets decrease", &HostProblem::q_offsets, {0, 1, 2}, -1.0},
        Bad{"k_offsets end past Sk", &HostProblem::k_offsets, {0, 0, Ck}, static_cast<double>(Sk + 5)},
        Bad{"k_offsets end before Sk", &HostProblem::k_offsets, {0, 1, Ck}, static_cast<double>(Sk - 1)}}) {
    SCOPED_TRACE(bad.what);
    HostProblem h = s.host;
    const HostTensor& good = s.host.*bad.tensor;
    h.*bad.tensor = ref::make_tensor(DType::I32, shape_of(good.view));
    ref::from_vector((h.*bad.tensor).view, ref::to_vector(good.view));
    ref::set((h.*bad.tensor).view, bad.index, bad.value);
    const DeviceProblem d = to_device(h);
    EXPECT_THROW(s.attend(d.inputs(), as_workspace(s.workspace)), InvalidArgumentError);
  }
  // The flag is cleared for the next call.
  EXPECT_NO_THROW(s.attend(s.device.inputs(), as_workspace(s.workspace)));
}

TEST(AttentionCudaErrors, UnknownKernelOverrideChangesNothing) {
  cuda::set_attention_kernel_override("sm80");
  EXPECT_THROW(cuda::set_attention_kernel_override("sm70"), InvalidArgumentError);
  EXPECT_STREQ(attention_kernel(Device::cuda(0), DType::BF16, 128).name, "sm80-mma");
  cuda::set_attention_kernel_override("");
  EXPECT_STREQ(attention_kernel(Device::cuda(0), DType::BF16, 128).name, is_sm90() ? "sm90a-wgmma" : "sm80-mma");
}

}  // namespace
}  // namespace sapattn::cuda_test
