// TMA tensor maps built on the host at launch (sm_90+): cuTensorMapEncodeTiled, reached through the
// runtime's driver entry point so that nothing links against libcuda. Host code only. The Hopper
// attention launcher (attention/attention_sm90.cu) has its own copy of the encoder lookup from before
// this header; the k-means assignment (kmeans/assign_sm90.cuh) uses this one.
#pragma once

#include <cuda.h>  // CUtensorMap

#include <cstdint>

#include "sapattn/dtype.hpp"

namespace sapattn::cuda {

// Whether the driver offers cuTensorMapEncodeTiled (12.0 or newer).
bool tensor_maps_available();

// A tiled map of a rank-`rank` (2 to 5) tensor of BF16, F16, F32 or U8 elements at `base`: dims[0]
// is the contiguous dimension, byte_strides[i] the stride of dimension i + 1 in bytes (rank - 1 of
// them), boxes of box[i] elements, 128-byte swizzle (box[0] elements must then be 128 bytes) or
// none, zeros outside the tensor. A stride of a dimension of extent 1 is never used and may be
// anything; strides need not grow (the e4m3 attention's K map walks rows in a permuted order). False
// where the driver refuses the map (alignment, strides that are not multiples of 16, no driver
// support).
bool encode_tiled_map(CUtensorMap& map, DType dtype, int rank, const void* base, const uint64_t* dims,
                      const uint64_t* byte_strides, const uint32_t* box, bool swizzle_128b = true);

}  // namespace sapattn::cuda
