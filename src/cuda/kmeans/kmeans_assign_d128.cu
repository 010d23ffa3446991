// The tensor-core k-means assignment for head dim 128 (all point dtypes).
#include "cuda/kmeans/kmeans_assign.cuh"

namespace sapattn::cuda {

template <>
void launch_tensor_core_assign<128>(const TensorCoreAssignParams& p, DType points_dtype, int64_t batch_heads,
                                    cudaStream_t stream) {
  tc::launch<128>(p, points_dtype, batch_heads, stream);
}

}  // namespace sapattn::cuda
