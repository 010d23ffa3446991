// What the CPU attention engines (attention.cpp in the inputs' precision, fp8_attention.cpp in
// e4m3) share: a head's rows in cluster order as fp32, query tiles within clusters, the kept key
// runs of a query cluster, a row's last step, and the value checks of a layout and its permutations.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "sapattn/layout.hpp"

namespace sapattn::cpu {

// A contiguous run of rows [begin, end) of the permuted sequence.
struct Segment {
  int64_t begin, end;
};

// Rows [begin, end) of query cluster `cluster`.
struct QueryTile {
  int64_t cluster, begin, end;
};

// fp32 copy of one (b,h) slice: [S, D] row-major; row s comes from row perm[s] when perm is given.
void load_slice(const TensorView& t, int64_t b, int64_t h, const int32_t* perm, std::vector<float>& dst, int threads);

// The (b,h) row of a [B,H,N] i32 permutation, or null for an empty view.
const int32_t* perm_row(const TensorView& perm, int64_t b, int64_t h);

// Tiles of at most `rows` rows that never cross a boundary of `bounds` (cluster c = rows
// [bounds[c], bounds[c+1])).
std::vector<QueryTile> query_tiles(const std::vector<int64_t>& bounds, int64_t rows);

// The key segments query cluster a of (b,h) attends: its kept non-empty key clusters, adjacent
// ones merged into one run, in key order.
std::vector<Segment> kept_key_runs(const BlockLayout& layout, int64_t b, int64_t h, int64_t a);

// The running maximum and sum of one query row's online softmax.
struct RowSoftmax {
  float max, sum;
};

// A new chunk of a row's keys whose largest logit is chunk_max: the row's maximum moves to the larger
// of the two, and its sum and accumulator acc[0..D) are scaled by exp(old max - new max) (0 on the
// first chunk, whose old max is -inf). Returns the new maximum, against which the chunk's weights
// are taken.
inline float advance_max(RowSoftmax& s, float chunk_max, float* acc, int64_t D) {
  const float new_max = std::max(s.max, chunk_max);
  const float rescale = std::exp(s.max - new_max);
  if (rescale != 1.0f) {
    for (int64_t d = 0; d < D; ++d) acc[d] *= rescale;
  }
  s.sum *= rescale;
  s.max = new_max;
  return new_max;
}

// The last step of a query row: out[b,h,row,:] = (acc[d] * out_scale[d]) * (1 / sum) (out_scale null:
// acc[d] * (1 / sum)) and lse[b,h,row] = max + log(sum / sum_unit) + lse_shift (lse may be empty).
// Only a row that saw no key has a sum of 0 (its largest logit contributes exp(0) = 1): O = 0 and
// LSE = -inf. A NaN among its inputs makes the sum NaN, and the NaN goes on to O and LSE, as in dense
// attention (SDPA), rather than passing for an empty row. `o` is D floats of scratch.
void finish_row(const float* acc, int64_t D, RowSoftmax s, const float* out_scale, float sum_unit, float lse_shift,
                const TensorView& out, const TensorView& lse, int64_t b, int64_t h, int64_t row, float* o);

// Throws InvalidArgumentError unless both permutations (when given) are permutations and every
// (b,h)'s offsets start at 0, do not decrease and end at Sq (queries) and Sk (keys).
void check_layout_values(const BlockLayout& layout, const RowPermutation& perm, int64_t Sq, int64_t Sk);

// Throws InvalidArgumentError unless every (b,h) row of perm [B,H,N] (when not empty) is a
// permutation of [0, N).
void check_permutation(const TensorView& perm, const char* name);

// Checks one (b,h)'s offsets: start at 0, non-decreasing, end at `total` (any end if total < 0).
void check_offsets(const int32_t* off, int64_t C, int64_t total, const char* name, int64_t b, int64_t h);

}  // namespace sapattn::cpu
