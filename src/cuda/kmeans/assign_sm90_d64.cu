// The wgmma (sm_90a) k-means assignment for head dim 64: every configuration of kSm90AssignConfigs,
// for bf16 and f16 operands. Compiled for sm_90a alone (src/CMakeLists.txt: sapattn_cuda_sm90).
#include "cuda/kmeans/assign_sm90.cuh"

namespace sapattn::cuda {

template <>
void launch_sm90_assign<64>(const TensorCoreAssignParams& p, DType points_dtype, int64_t batch_heads,
                            Sm90AssignConfig config, int num_sms, cudaStream_t stream) {
  sm90_assign::launch_config<64>(p, points_dtype, batch_heads, config, num_sms, stream,
                                 std::make_index_sequence<std::size(kSm90AssignConfigs)>{});
}

}  // namespace sapattn::cuda
