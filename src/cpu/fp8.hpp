// The e4m3 quantisation of one head on the CPU (quantize_e4m3's rule, include/sapattn/ops.hpp),
// shared by the quantize_e4m3 op and the FP8 attention (fp8_attention.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "sapattn/layout.hpp"

namespace sapattn::cpu {

// One head's rows in e4m3: codes [S, D] row-major and scales per row (Tile, Cluster) or per
// column (Channel).
struct E4M3Rows {
  std::vector<uint8_t> codes;
  std::vector<float> scales;
};

// Quantises the rows y_r = rows[r] - shift (S x D fp32 row-major; shift D floats or null) by
// `granularity`: fixed tiles of `tile` rows, the clusters of offsets[0..clusters] (i32), or one
// scale per column.
void quantize_head_e4m3(const float* rows, int64_t S, int64_t D, const float* shift, Fp8Scale granularity, int tile,
                        const int32_t* offsets, int64_t clusters, E4M3Rows& out, int threads);

// mean[d] = the mean of column d of the S x D rows: an fp64 sum in row order, rounded to fp32.
void mean_row(const float* rows, int64_t S, int64_t D, float* mean);

// e4m3_decode of every code, as a table.
const float* e4m3_values();

}  // namespace sapattn::cpu
