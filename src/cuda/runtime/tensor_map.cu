// TMA tensor maps (tensor_map.hpp).
#include "cuda/runtime/tensor_map.hpp"

#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000
#include <cuda_runtime_api.h>

namespace sapattn::cuda {

namespace {

PFN_cuTensorMapEncodeTiled_v12000 encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* entry = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &entry, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();  // a missing driver is an answer here, not a pending error
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(entry);
  }();
  return fn;
}

}  // namespace

bool tensor_maps_available() { return encoder() != nullptr; }

bool encode_tiled_map(CUtensorMap& map, DType dtype, int rank, const void* base, const uint64_t* dims,
                      const uint64_t* byte_strides, const uint32_t* box, bool swizzle_128b) {
  const auto encode = encoder();
  if (encode == nullptr || rank < 2 || rank > 5 || dtype == DType::I32) return false;
  cuuint64_t extent[5], stride[4];
  cuuint32_t boxes[5], unit[5];
  for (int i = 0; i < rank; ++i) {
    extent[i] = dims[i];
    boxes[i] = box[i];
    unit[i] = 1;
  }
  for (int i = 0; i + 1 < rank; ++i) stride[i] = dims[i + 1] == 1 ? 16 : byte_strides[i];
  const auto type = dtype == DType::BF16  ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                    : dtype == DType::F16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                    : dtype == DType::F32 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32
                                          : CU_TENSOR_MAP_DATA_TYPE_UINT8;
  return encode(&map, type, static_cast<cuuint32_t>(rank), const_cast<void*>(base), extent, stride, boxes, unit,
                CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle_128b ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace sapattn::cuda
